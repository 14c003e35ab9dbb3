//! Where a replica's models score: the CPU, or one GPU. The MLP scores on a GPU through
//! ringlet-train's cuBLAS model (the forward pass its GPU training runs); the CNN and the
//! transformer through Burn's CUDA backend, in a build with the `cuda` feature. Whether a GPU
//! exists is settled when the replica starts (`--device gpu` without one is an error then); the
//! GPU itself is opened when the first version that needs it is loaded, and kept for every later
//! version, so a swap compiles no kernels and makes no context. A GPU that cannot be opened for a
//! kind of model is remembered: `auto` scores that kind on the CPU, `gpu` refuses it, without
//! trying again at every version.

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
    /// Burn's CUDA device, once it has run a first operation.
    burn_gpu: Option<Device>,
    /// Model kinds the GPU could not be opened for, and why.
    failed: Vec<(&'static str, String)>,
}

impl Compute {
    /// Everything on the CPU.
    pub fn cpu() -> Compute {
        Compute {
            choice: DeviceChoice::Cpu,
            ordinal: None,
            mlp_gpu: None,
            burn_gpu: None,
            failed: Vec::new(),
        }
    }

    /// `choice` with GPU `gpu` or, without it, the replica's local rank modulo the GPUs found
    /// (each replica of a host on its own GPU while there are enough). `Err`: `--device gpu`
    /// where no GPU can be used, or a `--gpu` the machine does not have (or with `cpu`).
    pub fn new(
        choice: DeviceChoice,
        gpu: Option<usize>,
        local_rank: usize,
    ) -> Result<Compute, String> {
        if choice == DeviceChoice::Cpu {
            return match gpu {
                Some(g) => Err(format!("--gpu {g} with --device cpu: choose one")),
                None => Ok(Compute::cpu()),
            };
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
            ..Compute::cpu()
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
        if let Some(why) = self.failed_for("mlp") {
            return self.fall_back("mlp", why).map(|()| None);
        }
        match GpuBackend::new(ordinal) {
            Ok(g) => {
                tracing::info!("the MLP scores on {}", g.describe());
                let g = Rc::new(g);
                self.mlp_gpu = Some(Rc::clone(&g));
                Ok(Some(g))
            }
            Err(e) => self
                .fall_back("mlp", format!("opening GPU {ordinal}: {e}"))
                .map(|()| None),
        }
    }

    /// The Burn device the CNN and the transformer score on. Burn's CUDA device must first run
    /// one small operation: Burn panics where its runtime cannot start, and that must be a
    /// refusal (or the CPU under `auto`), not the end of a serving replica.
    pub fn burn_device(&mut self) -> Result<Device, String> {
        const KIND: &str = "cnn and transformer";
        let Some(ordinal) = self.ordinal else {
            return Ok(Device::flex());
        };
        if let Some(d) = &self.burn_gpu {
            return Ok(d.clone());
        }
        let opened = match self.failed_for(KIND) {
            Some(why) => Err(why),
            None => burn_models::cuda_device(ordinal).and_then(|d| probe(&d).map(|()| d)),
        };
        match opened {
            Ok(d) => {
                tracing::info!("the CNN and the transformer score on {d:?}");
                self.burn_gpu = Some(d.clone());
                Ok(d)
            }
            Err(why) => self.fall_back(KIND, why).map(|()| Device::flex()),
        }
    }

    fn failed_for(&self, kind: &str) -> Option<String> {
        self.failed
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, why)| why.clone())
    }

    /// Remembers that `kind` cannot have the GPU; under `auto` (`Ok`) that kind scores on the
    /// CPU (said once), under `gpu` it is refused.
    fn fall_back(&mut self, kind: &'static str, why: String) -> Result<(), String> {
        if self.failed_for(kind).is_none() {
            if self.choice != DeviceChoice::Gpu {
                tracing::warn!("{kind} models score on the CPU: {why}");
            }
            self.failed.push((kind, why.clone()));
        }
        if self.choice == DeviceChoice::Gpu {
            return Err(format!("--device gpu: {why}"));
        }
        Ok(())
    }
}

/// One addition on `device`, its result read back; a panic in Burn's runtime is the error.
fn probe(device: &Device) -> Result<(), String> {
    use burn::tensor::{Tensor, TensorData};
    let run = || {
        let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), device);
        ringlet_burn::params::to_host(t.clone() + t)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(Ok(v)) if v == [2.0, 4.0] => Ok(()),
        Ok(Ok(v)) => Err(format!("{device:?} computed 1+1, 2+2 as {v:?}")),
        Ok(Err(e)) => Err(format!("{device:?}: {e}")),
        Err(panic) => Err(format!(
            "{device:?} failed its first operation: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic")
        )),
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
        let cpu = Compute::new(DeviceChoice::Cpu, None, 0).unwrap();
        assert_eq!(cpu.ordinal, None);
        let e = Compute::new(DeviceChoice::Cpu, Some(1), 0).err().unwrap();
        assert!(e.contains("--gpu 1 with --device cpu"), "{e}");
    }

    /// A GPU that cannot be opened for a kind of model is remembered: `gpu` refuses that kind
    /// with the first reason at every later version, `auto` scores it on the CPU.
    #[test]
    fn a_gpu_that_failed_is_not_tried_again() {
        for choice in [DeviceChoice::Gpu, DeviceChoice::Auto] {
            let mut c = Compute {
                choice,
                ordinal: Some(0),
                ..Compute::cpu()
            };
            let first = c.fall_back("mlp", "no room".into());
            assert_eq!(c.failed_for("mlp").as_deref(), Some("no room"));
            let again = c.mlp_gpu();
            match choice {
                DeviceChoice::Gpu => {
                    assert_eq!(first.err().unwrap(), "--device gpu: no room");
                    assert_eq!(again.err().unwrap(), "--device gpu: no room");
                }
                _ => {
                    first.unwrap();
                    assert!(again.unwrap().is_none());
                }
            }
            assert_eq!(c.failed.len(), 1);
        }
    }

    /// The probe runs a first operation where Burn runs: on the CPU here.
    #[test]
    fn the_probe_runs_an_operation() {
        probe(&Device::flex()).unwrap();
    }
}
