//! Where a replica's models score: the CPU, or one GPU. The MLP scores on a GPU through
//! ringlet-train's cuBLAS model (the forward pass its GPU training runs); the CNN and the
//! transformer through Burn's CUDA backend, in a build with the `cuda` feature. Whether a GPU
//! exists is settled when the replica starts (`--device gpu` without one is an error then); the
//! GPU itself is opened when the first version that needs it is loaded, and kept for every later
//! version, so a swap compiles no kernels and makes no context.

use burn::tensor::Device;
use ringlet_train::burn_models;
use ringlet_train::gpu::GpuBackend;
use ringlet_train::tensor::Backend;
use ringlet_train::train::DeviceChoice;
use std::rc::Rc;

/// What a replica computes on, and what it has opened there.
pub struct Compute {
    choice: DeviceChoice,
    /// The GPU's ordinal, where one is to be used.
    ordinal: Option<usize>,
    /// The MLP's GPU model, once opened.
    mlp_gpu: Option<Rc<GpuBackend>>,
    /// Why a model kind runs on the CPU under `auto` although a GPU was found (logged once each).
    fell_back: Vec<&'static str>,
}

impl Compute {
    /// Everything on the CPU.
    pub fn cpu() -> Compute {
        Compute {
            choice: DeviceChoice::Cpu,
            ordinal: None,
            mlp_gpu: None,
            fell_back: Vec::new(),
        }
    }

    /// `choice` with GPU `gpu` or, without it, the replica's local rank modulo the GPUs found
    /// (each replica of a host on its own GPU while there are enough). `Err`: `--device gpu`
    /// where no GPU can be used, or a `--gpu` the machine does not have.
    pub fn new(
        choice: DeviceChoice,
        gpu: Option<usize>,
        local_rank: usize,
    ) -> Result<Compute, String> {
        if choice == DeviceChoice::Cpu {
            return Ok(Compute::cpu());
        }
        let found = ringlet::cuda::devices()
            .map_err(|e| e.to_string())
            .and_then(|d| match d.len() {
                0 => Err("no CUDA device".to_string()),
                n => Ok(n),
            });
        let count = match (found, choice) {
            (Ok(n), _) => n,
            (Err(why), DeviceChoice::Gpu) => return Err(format!("--device gpu: {why}")),
            (Err(why), _) => {
                tracing::info!("scoring on the CPU ({why})");
                return Ok(Compute::cpu());
            }
        };
        let ordinal = match gpu {
            Some(g) if g < count => g,
            Some(g) => {
                return Err(format!(
                    "--gpu {g}: this machine has {count} GPU(s), numbered from 0"
                ))
            }
            None => local_rank % count,
        };
        Ok(Compute {
            choice,
            ordinal: Some(ordinal),
            mlp_gpu: None,
            fell_back: Vec::new(),
        })
    }

    /// The GPU the MLP scores on (opened at the first call), or `None` for the CPU.
    pub fn mlp_gpu(&mut self) -> Result<Option<Rc<GpuBackend>>, String> {
        let Some(ordinal) = self.ordinal else {
            return Ok(None);
        };
        if let Some(g) = &self.mlp_gpu {
            return Ok(Some(Rc::clone(g)));
        }
        if self.fell_back.contains(&"mlp") {
            return Ok(None);
        }
        match GpuBackend::new(ordinal) {
            Ok(g) => {
                tracing::info!("the MLP scores on {}", g.describe());
                let g = Rc::new(g);
                self.mlp_gpu = Some(Rc::clone(&g));
                Ok(Some(g))
            }
            Err(e) => self.fall_back("mlp", format!("opening GPU {ordinal}: {e}")),
        }
    }

    /// The Burn device the CNN and the transformer score on.
    pub fn burn_device(&mut self) -> Result<Device, String> {
        let Some(ordinal) = self.ordinal else {
            return Ok(Device::flex());
        };
        match burn_models::cuda_device(ordinal) {
            Ok(d) => Ok(d),
            Err(why) => self
                .fall_back("cnn and transformer", why)
                .map(|_: Option<()>| Device::flex()),
        }
    }

    /// Under `auto`, the CPU (said once per model kind); under `gpu`, the error.
    fn fall_back<T>(&mut self, kind: &'static str, why: String) -> Result<Option<T>, String> {
        if self.choice == DeviceChoice::Gpu {
            return Err(format!("--device gpu: {why}"));
        }
        if !self.fell_back.contains(&kind) {
            self.fell_back.push(kind);
            tracing::warn!("{kind} models score on the CPU: {why}");
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--device gpu` with no usable GPU is refused when the replica starts, naming why; `auto`
    /// then scores on the CPU. Where a GPU exists, both find it and a `--gpu` beyond the last
    /// one is refused.
    #[test]
    fn a_gpu_is_used_where_one_is_found_and_required_only_under_gpu() {
        let auto = Compute::new(DeviceChoice::Auto, None, 3).unwrap();
        match ringlet::cuda::devices().map(|d| d.len()) {
            Ok(n) if n > 0 => {
                println!("{n} GPU(s): checking the choice of ordinal");
                assert_eq!(auto.ordinal, Some(3 % n));
                let gpu = Compute::new(DeviceChoice::Gpu, Some(n - 1), 0).unwrap();
                assert_eq!(gpu.ordinal, Some(n - 1));
                let e = Compute::new(DeviceChoice::Gpu, Some(n), 0).err().unwrap();
                assert!(e.contains(&format!("--gpu {n}")), "{e}");
            }
            found => {
                println!("no GPU ({found:?}): checking the refusal and the CPU fallback");
                assert_eq!(auto.ordinal, None);
                let e = Compute::new(DeviceChoice::Gpu, None, 0).err().unwrap();
                assert!(e.starts_with("--device gpu: "), "{e}");
                assert!(e.len() > "--device gpu: ".len() + 5, "{e}");
            }
        }
        let cpu = Compute::new(DeviceChoice::Cpu, Some(7), 0).unwrap();
        assert_eq!(cpu.ordinal, None);
    }
}
