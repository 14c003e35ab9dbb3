//! Gradient synchronisation for a Burn module: every rank's gradient sums added up in buckets
//! (ringlet-ddp's [`GradSync`]), divided by the global batch, and handed back as Burn's
//! [`GradientsParams`] for Burn's own optimizers.
//!
//! The loss each rank back-propagates is the *sum* of its samples' losses (not the mean): the
//! all-reduce adds the sums, and dividing by the global batch gives the gradient of the mean
//! over the whole batch, whatever the number of ranks or the split.
//!
//! [`Stages`] overlaps communication with backward for models written as a sequence of stages:
//! forward cuts the graph between stages; backward runs one stage at a time, seeding each with
//! the gradient of the stage above's input (the vector-Jacobian product), and each stage's
//! gradients go into their buckets as soon as they exist, so the all-reduce of the top layers
//! runs while the layers below are still back-propagating.

use crate::params::{self, ParamInfo};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use ringlet::{Communicator, Error};
use ringlet_ddp::grad_sync::{GradSync, ParamSpec, SyncOptions, SyncStats};
use std::collections::HashMap;

/// Data-parallel bookkeeping for one module on one communicator.
pub struct DataParallel<'c> {
    comm: &'c Communicator,
    params: Vec<ParamInfo>,
    index: HashMap<ParamId, usize>,
    sync: GradSync<'c>,
    /// Where each gradient lives (the optimizer gets the sums back there).
    devices: Vec<Option<Device>>,
}

impl<'c> DataParallel<'c> {
    /// Describes `module`'s trainable float parameters to the bucket planner. Every rank must
    /// build the same architecture. `opts.scalars` extra values (a loss sum, a count) can ride
    /// with the gradients: [`set_scalar`](Self::set_scalar).
    pub fn new<M: Module>(
        comm: &'c Communicator,
        module: &M,
        opts: SyncOptions,
    ) -> Result<DataParallel<'c>, Error> {
        let params = params::list(module);
        let specs = params
            .iter()
            .map(|p| ParamSpec::new(p.name.clone(), p.numel()))
            .collect();
        let sync = GradSync::new(comm, specs, opts)?;
        let index = params.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        Ok(DataParallel {
            comm,
            devices: vec![None; params.len()],
            params,
            index,
            sync,
        })
    }

    pub fn comm(&self) -> &'c Communicator {
        self.comm
    }

    /// The parameters, in the order the buckets were planned from (reversed).
    pub fn params(&self) -> &[ParamInfo] {
        &self.params
    }

    /// Elements of all parameters together.
    pub fn numel(&self) -> usize {
        self.sync.numel()
    }

    /// How many buckets a step all-reduces.
    pub fn buckets(&self) -> usize {
        self.sync.buckets().len()
    }

    /// `module` with rank `root`'s parameter values on every rank (collective).
    pub fn broadcast<M: Module>(&self, module: M, root: usize) -> Result<M, Error> {
        let mut flat = if self.comm.rank() == root {
            params::flatten(&module, &self.params)?
        } else {
            vec![0.0; self.numel()]
        };
        self.comm.broadcast(&mut flat, root)?;
        params::unflatten(module, &self.params, &flat)
    }

    /// Sets this step's extra value `k` (summed over ranks along with the first bucket).
    pub fn set_scalar(&mut self, k: usize, value: f32) -> Result<(), Error> {
        self.sync.set_scalar(k, value)
    }

    /// Extra value `k` summed over all ranks, after [`finish`](Self::finish).
    pub fn scalar(&self, k: usize) -> f32 {
        self.sync.scalar(k)
    }

    /// Hands over the gradient of every parameter of `module` present in `grads` (the result of
    /// one backward: of the whole loss, or of one stage), last parameters first. Buckets that
    /// are complete start their all-reduce at once. Returns how many were handed over.
    pub fn push_gradients<M: Module>(
        &mut self,
        module: &M,
        grads: &mut Gradients,
    ) -> Result<usize, Error> {
        struct Take<'a> {
            grads: &'a mut Gradients,
            index: &'a HashMap<ParamId, usize>,
            out: Vec<(usize, Result<Vec<f32>, Error>, Device)>,
        }
        impl ModuleVisitor for Take<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(&i) = self.index.get(&param.id) else {
                    return;
                };
                if !param.is_require_grad() {
                    return;
                }
                if let Some(g) = param.val().grad_remove(self.grads) {
                    let device = g.device();
                    self.out.push((i, params::to_host(g), device));
                }
            }
        }
        let mut take = Take {
            grads,
            index: &self.index,
            out: Vec::new(),
        };
        module.visit(&mut take);
        let mut found = take.out;
        found.sort_by_key(|(i, _, _)| std::cmp::Reverse(*i));
        let n = found.len();
        for (i, values, device) in found {
            let values = values?;
            self.devices[i] = Some(device);
            self.sync.push(i, &values)?;
        }
        Ok(n)
    }

    /// Waits for every bucket's sum and returns the gradients divided by `divisor` (the global
    /// batch), on the devices they came from, for `optimizer.step(lr, module, grads)`.
    pub fn finish<M: Module>(
        &mut self,
        module: &M,
        divisor: usize,
    ) -> Result<(GradientsParams, SyncStats), Error> {
        let stats = self.sync.finish()?;
        let scale = 1.0 / divisor.max(1) as f32;
        struct Give<'a, 'c> {
            dp: &'a DataParallel<'c>,
            scale: f32,
            out: GradientsParams,
        }
        impl ModuleVisitor for Give<'_, '_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let Some(&i) = self.dp.index.get(&param.id) else {
                    return;
                };
                // A rank that computed nothing this step (see push_zeros) updates the
                // parameter on the parameter's own device.
                let device = self.dp.devices[i]
                    .clone()
                    .unwrap_or_else(|| param.lazy_device().inner());
                let values: Vec<f32> = self
                    .dp
                    .sync
                    .grad(i)
                    .iter()
                    .map(|g| g * self.scale)
                    .collect();
                let shape = self.dp.params[i].shape.clone();
                let t = Tensor::<D>::from_data(TensorData::new(values, shape), &device);
                self.out.register(param.id, t);
            }
        }
        let mut give = Give {
            dp: self,
            scale,
            out: GradientsParams::new(),
        };
        module.visit(&mut give);
        Ok((give.out, stats))
    }

    /// Hands over zeros for every parameter not handed over yet this step: a rank with no
    /// sample in a step still takes part in every bucket's all-reduce.
    pub fn push_zeros(&mut self) -> Result<(), Error> {
        for i in (0..self.params.len()).rev() {
            if !self.sync.is_pushed(i) {
                self.sync.push_with(i, |dst| {
                    dst.fill(0.0);
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Back-propagates `loss` (this rank's loss *sum*) and hands every gradient over. With an
    /// empty `stages` the buckets start once the whole backward is done; with the cuts forward
    /// recorded, backward runs one stage at a time (last first) and each stage's gradients go
    /// into their buckets as soon as they exist, so their all-reduce overlaps the stages below.
    /// Then [`finish`](Self::finish).
    pub fn backward<M: Module>(
        &mut self,
        module: &M,
        loss: Tensor<1>,
        stages: Stages,
    ) -> Result<(), Error> {
        let mut grads = loss.backward();
        self.push_gradients(module, &mut grads)?;
        for cut in stages.cuts.into_iter().rev() {
            grads = cut(&grads)?;
            self.push_gradients(module, &mut grads)?;
        }
        Ok(())
    }
}

type Cut = Box<dyn FnOnce(&Gradients) -> Result<Gradients, Error>>;

/// The cuts between a model's stages, recorded during forward (see the module docs).
pub struct Stages {
    cuts: Vec<Cut>,
    enabled: bool,
}

impl Default for Stages {
    fn default() -> Stages {
        Stages::new()
    }
}

impl Stages {
    /// Records cuts: backward goes stage by stage.
    pub fn new() -> Stages {
        Stages {
            cuts: Vec::new(),
            enabled: true,
        }
    }

    /// Ignores cuts: one backward over the whole graph (for comparison, and for evaluation).
    pub fn whole() -> Stages {
        Stages {
            cuts: Vec::new(),
            enabled: false,
        }
    }

    /// Ends a stage whose output is `out`: returns the next stage's input, the same values as a
    /// fresh leaf that collects its gradient. Backward of the stage is then the backward of
    /// `sum(out * seed)` with `seed` that gradient. With [`Stages::whole`], returns `out`.
    pub fn cut<const D: usize>(&mut self, out: Tensor<D>) -> Tensor<D> {
        if !self.enabled || !out.is_tracked() {
            return out;
        }
        let input = out.clone().detach().require_grad();
        let leaf = input.clone();
        let k = self.cuts.len();
        self.cuts.push(Box::new(move |grads: &Gradients| {
            let seed = leaf.grad(grads).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "stage {} has no gradient: its output does not reach the loss",
                    k + 1
                ))
            })?;
            Ok((out * seed).sum().backward())
        }));
        input
    }

    pub fn len(&self) -> usize {
        self.cuts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty()
    }
}
