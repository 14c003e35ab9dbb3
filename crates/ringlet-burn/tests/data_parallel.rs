//! `DataParallel` on real communicators (ranks as threads, loopback sockets): parameters
//! broadcast from rank 0, gradients summed over ranks equal one process's on the whole batch,
//! stage-by-stage backward gives the same bits as one backward, and the optimizer's state survives
//! a trip through named tensors into a model with other parameter ids.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use ringlet_burn::{optim_state, params, DataParallel, Stages};
use ringlet_ddp::grad_sync::SyncOptions;
use ringlet_ddp::local_world;

#[derive(Module, Debug)]
struct Net {
    a: Linear,
    b: Linear,
    relu: Relu,
}

impl Net {
    fn new(device: &Device) -> Net {
        Net {
            a: LinearConfig::new(3, 5).init(device),
            b: LinearConfig::new(5, 2).init(device),
            relu: Relu::new(),
        }
    }
    fn loss_sum(&self, x: Tensor<2>, stages: &mut Stages) -> Tensor<1> {
        let h = stages.cut(self.relu.forward(self.a.forward(x)));
        let y = self.b.forward(h);
        (y.clone() * y).sum()
    }
}

fn device() -> Device {
    Device::flex().autodiff()
}

/// Sample rows `range` of a fixed 8×3 input.
fn rows(range: std::ops::Range<usize>) -> Tensor<2> {
    let v: Vec<f32> = range
        .clone()
        .flat_map(|i| (0..3).map(move |k| ((i * 3 + k) as f32 * 0.37).sin()))
        .collect();
    Tensor::<2>::from_data(TensorData::new(v, [range.len(), 3]), &device())
}

fn host(grads: &GradientsParams, net: &Net) -> Vec<Vec<f32>> {
    params::list(net)
        .iter()
        .map(|p| match p.shape.len() {
            1 => params::to_host(grads.get::<1>(p.id).expect("a gradient")).unwrap(),
            _ => params::to_host(grads.get::<2>(p.id).expect("a gradient")).unwrap(),
        })
        .collect()
}

#[test]
fn gradients_summed_over_ranks_are_one_process_gradients() {
    // One process, the whole batch of 8, the mean over it.
    let whole = Net::new(&device());
    let reference = params::flatten(&whole, &params::list(&whole)).unwrap();
    let g = whole.loss_sum(rows(0..8), &mut Stages::whole()).backward();
    let gp = GradientsParams::from_grads(g, &whole);
    let want: Vec<Vec<f32>> = host(&gp, &whole)
        .iter()
        .map(|v| v.iter().map(|x| x / 8.0).collect())
        .collect();

    // Three ranks with 2, 5 and 1 samples, each starting from its own random parameters.
    let splits = [0..2, 2..7, 7..8];
    let results = local_world::run(3, |comm| {
        let own = Net::new(&device());
        let opts = SyncOptions {
            first_bucket_bytes: 4,
            ..SyncOptions::default()
        };
        let mut dp = DataParallel::new(&comm, &own, opts).unwrap();
        let net = if comm.rank() == 0 {
            params::unflatten(own, dp.params(), &reference).unwrap()
        } else {
            own
        };
        let net = dp.broadcast(net, 0).unwrap();
        let start = params::flatten(&net, dp.params()).unwrap();
        let mut out = Vec::new();
        for staged in [false, true] {
            let mut stages = if staged {
                Stages::new()
            } else {
                Stages::whole()
            };
            let loss = net.loss_sum(rows(splits[comm.rank()].clone()), &mut stages);
            dp.backward(&net, loss, stages).unwrap();
            let (grads, _) = dp.finish(&net, 8).unwrap();
            out.push(host(&grads, &net));
        }
        (start, out)
    });
    for (rank, (start, out)) in results.iter().enumerate() {
        assert_eq!(
            start, &reference,
            "rank {rank} did not get rank 0's parameters"
        );
        assert_eq!(
            out[0], out[1],
            "rank {rank}: staged backward changed the gradients"
        );
        for (got, want) in out[0].iter().zip(&want) {
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "rank {rank}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn optimizer_state_survives_new_parameter_ids() {
    local_world::run(1, |comm| {
        let net = Net::new(&device());
        let mut dp = DataParallel::new(&comm, &net, SyncOptions::default()).unwrap();
        let mut optim: ModuleOptimizer = AdamWConfig::new().init();
        let step = |net: Net, optim: &mut ModuleOptimizer, dp: &mut DataParallel| {
            let mut stages = Stages::new();
            let loss = net.loss_sum(rows(0..8), &mut stages);
            dp.backward(&net, loss, stages).unwrap();
            let (g, _) = dp.finish(&net, 8).unwrap();
            optim.step(0.01, net, g)
        };
        let net = step(net, &mut optim, &mut dp);
        let list = dp.params().to_vec();
        let (tensors, extra) = optim_state::save(&optim, &list).unwrap();
        let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        let want: Vec<String> = ["a.bias", "a.weight", "b.bias", "b.weight"]
            .iter()
            .flat_map(|p| [1, 2].map(|m| format!("{p}.momentum.moment_{m}")))
            .collect();
        assert_eq!(names, want, "AdamW's moments by parameter name, sorted");
        assert_eq!(
            extra["scalars"]["a.weight.momentum.time"]["uint"], 1,
            "{extra}"
        );
        let saved = params::named_tensors(&net, &list).unwrap();

        // A new model: other parameter ids, same names.
        let fresh = Net::new(&device());
        let fresh_list = params::list(&fresh);
        assert_ne!(fresh_list[0].id, list[0].id);
        let fresh = params::load_named(fresh, &fresh_list, &saved, "test").unwrap();
        let mut dp2 = DataParallel::new(&comm, &fresh, SyncOptions::default()).unwrap();
        // A state tensor edited to another shape is refused, never handed to Burn's loader.
        let mut edited = tensors.clone();
        edited[0].shape = vec![1];
        edited[0].data.truncate(1);
        let e = optim_state::load(AdamWConfig::new().init(), &fresh_list, &edited, &extra)
            .err()
            .expect("a state tensor of the wrong shape is refused")
            .to_string();
        assert!(
            e.contains("a.bias.momentum.moment_1 has shape [1], its parameter a.bias has [5]"),
            "{e}"
        );
        let mut optim2 =
            optim_state::load(AdamWConfig::new().init(), &fresh_list, &tensors, &extra).unwrap();
        let a = step(net, &mut optim, &mut dp);
        let b = step(fresh, &mut optim2, &mut dp2);
        assert_eq!(
            params::flatten(&a, &params::list(&a)).unwrap(),
            params::flatten(&b, &params::list(&b)).unwrap(),
            "the restored optimizer stepped differently"
        );
    });
}
