//! The gradient sum's ways meet in one ring: ranks summing device-style buffers bucket by bucket
//! (`RINGLET_GRAD_PATH=device`, here on host memory through the same `Backend` code a GPU runs)
//! and ranks overlapping host buckets with backward issue the same collectives, so a mixed job
//! ends with the same bits as an all-host one. Ranks run as threads (`local_world`) where the way
//! is given per rank, and as processes where the variable sets it. The decision itself (NCCL or
//! the TCP ring, each rank's way, the start-up line) is checked from made-up rank tables, GPUs
//! included.

mod common;

use common::{args, max_relative_difference, params, Job, Scratch};
use ringlet::topology::BackendChoice;
use ringlet_ddp::grad_sync::plan_buckets;
use ringlet_ddp::{local_world, Balance};
use ringlet_train::data::{self, Dataset};
use ringlet_train::grad_path::{decide, describe, Choice, Path, RankTraits};
use ringlet_train::optim::{AdamW, Sgd};
use ringlet_train::train::{self, DeviceChoice, OptimizerKind, Options, Summary};
use std::time::Duration;

fn options(hidden: Vec<usize>, optimizer: OptimizerKind) -> Options {
    Options {
        device: DeviceChoice::Cpu,
        hidden,
        optimizer,
        warmup: 5,
        global_batch: 48,
        steps: 30,
        seed: 4,
        balance: Balance::Off,
        bucket_cap_bytes: 25 << 20,
        first_bucket_bytes: 1 << 20,
        overlap: true,
        checkpoint: None,
        rebalance_every: 0,
        calibration_steps: 0,
        locality: None,
    }
}

fn sgd() -> OptimizerKind {
    OptimizerKind::Sgd(Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
    })
}

/// One job, rank r summing its gradients the way `ways[r]` says.
fn job(data: &Dataset, opts: &Options, ways: &[Choice]) -> Vec<Summary> {
    local_world::run(ways.len(), |mut comm| {
        let way = ways[comm.rank()];
        train::train_with(&mut comm, data, opts, way, |_| {}).expect("training")
    })
}

/// Every rank of every run holds `reference`'s parameters, bit for bit, and the same evaluation.
fn assert_same(reference: &Summary, runs: &[(&str, &[Summary])]) {
    for (tag, run) in runs {
        for (r, s) in run.iter().enumerate() {
            assert!(
                s.params == reference.params,
                "{tag} rank {r}: parameters differ from the all-host run (max relative {:.2e})",
                max_relative_difference(&reference.params, &s.params)
            );
            assert_eq!(
                (s.test_accuracy.to_bits(), s.test_loss.to_bits(), s.steps),
                (
                    reference.test_accuracy.to_bits(),
                    reference.test_loss.to_bits(),
                    reference.steps
                ),
                "{tag} rank {r}"
            );
        }
    }
}

fn ways_of(run: &[Summary]) -> Vec<&'static str> {
    run.iter().map(|s| s.grad_sync).collect()
}

/// Three buckets (the first small enough for recursive doubling, the others over the ring's
/// chunked schedule), an unequal split: ranks 0 and 2 copy buckets out of the gradient buffer,
/// sum them with `all_reduce_tcp` and copy them back, rank 1 overlaps host buckets with
/// backward; the parameters, test accuracy and loss equal an all-host run's bit for bit, on
/// every rank, as do those of a job where every rank takes the device way.
#[test]
fn device_bucket_ranks_and_host_bucket_ranks_meet_bit_for_bit() {
    let data = data::load("digits").unwrap();
    let mut opts = options(vec![256, 64], sgd());
    opts.first_bucket_bytes = 1024;
    opts.bucket_cap_bytes = 64 << 10;
    opts.balance = Balance::Static(vec![1.0, 2.0, 3.0]);
    let numels = [64 * 256 + 256, 256 * 64 + 64, 64 * 10 + 10];
    let plan = plan_buckets(&numels, opts.first_bucket_bytes, opts.bucket_cap_bytes);
    assert_eq!(plan.len(), 3, "{plan:?}");
    // 3 ranks: the ring for buckets over 64 KiB / 2, a gather for the first.
    assert!((plan[0].elems.len() + 1) * 4 * 2 <= 64 << 10);
    assert!(plan[1].elems.len() * 4 * 2 > 64 << 10);

    let (h, d) = (Choice::Host, Choice::Device);
    let host = job(&data, &opts, &[h, h, h]);
    let mixed = job(&data, &opts, &[d, h, d]);
    let device = job(&data, &opts, &[d, d, d]);
    assert_eq!(ways_of(&host), ["tcp-host-buckets"; 3]);
    assert_eq!(
        ways_of(&mixed),
        [
            "tcp-device-buckets",
            "tcp-host-buckets",
            "tcp-device-buckets"
        ]
    );
    assert_eq!(ways_of(&device), ["tcp-device-buckets"; 3]);
    // On the CPU the default is the host way.
    let auto = job(&data, &opts, &[Choice::Auto, h, Choice::Auto]);
    assert_eq!(ways_of(&auto), ["tcp-host-buckets"; 3]);
    assert_same(
        &host[0],
        &[
            ("host", &host),
            ("mixed", &mixed),
            ("device", &device),
            ("auto", &auto),
        ],
    );
    assert!(host[0].test_accuracy > 0.5, "{}", host[0].test_accuracy);
}

/// One bucket (the default sizes): a device-way rank sums its gradient buffer in place, the loss
/// in the slot after the gradient, with no copies; with AdamW, and with host ranks that do not
/// overlap, the bits are still the all-host run's.
#[test]
fn one_bucket_is_summed_in_place_and_meets_host_ranks() {
    let data = data::load("digits").unwrap();
    let mut opts = options(vec![32, 16], OptimizerKind::AdamW(AdamW::default()));
    let (h, d) = (Choice::Host, Choice::Device);
    let host = job(&data, &opts, &[h, h]);
    let mixed = job(&data, &opts, &[h, d]);
    opts.overlap = false;
    let serial = job(&data, &opts, &[d, h]);
    assert_eq!(ways_of(&mixed), ["tcp-host-buckets", "tcp-device-buckets"]);
    assert_same(&host[0], &[("mixed", &mixed), ("serial", &serial)]);
}

/// One rank sums nothing, whatever it asks for, and lands where two ranks do (to float
/// rounding: the split changes the order of the per-sample sums).
#[test]
fn one_rank_sums_nothing() {
    let data = data::load("digits").unwrap();
    let opts = options(vec![32, 16], sgd());
    let one = job(&data, &opts, &[Choice::Device]);
    assert_eq!(ways_of(&one), ["none"]);
    let two = job(&data, &opts, &[Choice::Host, Choice::Device]);
    let diff = max_relative_difference(&one[0].params, &two[0].params);
    assert!(
        diff < 1e-5,
        "one rank vs two: max relative difference {diff}"
    );
}

fn run_args(out: &std::path::Path) -> Vec<String> {
    let mut a = args(&[
        "--steps",
        "40",
        "--global-batch",
        "48",
        "--hidden",
        "64,32",
        "--first-bucket-kb",
        "4",
        "--bucket-cap-mb",
        "0.01",
        "--seed",
        "5",
        "--dump-params",
    ]);
    a.push(out.display().to_string());
    a
}

/// Processes: `RINGLET_GRAD_PATH=device` on rank 1 of 3 ends with the default run's parameters
/// bit for bit, and rank 0's start-up line says which rank takes which way.
#[test]
fn the_variable_forces_a_ranks_way() {
    let dir = Scratch::new("grad-path");
    let plain = dir.join("plain.params");
    Job::start(3, &run_args(&plain), &dir.0, "plain").finish();
    let forced = dir.join("forced.params");
    let logs = Job::start_env(3, &run_args(&forced), &dir.0, "forced", |r| {
        if r == 1 {
            vec![("RINGLET_GRAD_PATH", "device".to_string())]
        } else {
            Vec::new()
        }
    })
    .finish();
    let line = logs[0]
        .lines()
        .find(|l| l.contains("gradient sync:"))
        .unwrap_or_else(|| panic!("no gradient sync line:\n{}", logs[0]));
    assert!(
        line.contains("TCP ring (no NCCL for every rank: rank 0 trains on the CPU")
            && line.contains("ranks 0,2 host buckets overlapped with backward")
            && line.contains("rank 1 sum host buffers bucket by bucket after backward"),
        "{line}"
    );
    assert!(
        !logs[1].contains("gradient sync:"),
        "only rank 0 says:\n{}",
        logs[1]
    );
    assert!(
        params(&plain) == params(&forced),
        "forcing a way changed the result"
    );
}

/// Processes: an impossible demand fails every rank with the same reason instead of leaving
/// some on one backend and some on another — `RINGLET_BACKEND=nccl` on CPU ranks, and a bad
/// `RINGLET_GRAD_PATH` on one rank.
#[test]
fn impossible_demands_fail_every_rank() {
    let dir = Scratch::new("grad-path-fail");
    let out = dir.join("p");
    let nccl = "RINGLET_BACKEND=nccl, but 2 of 2 ranks cannot use NCCL for the gradients: rank 0 \
                trains on the CPU; rank 1 trains on the CPU";
    for (tag, var, value, on, want) in [
        ("nccl", "RINGLET_BACKEND", "nccl", None, [nccl, nccl]),
        (
            "bad-path",
            "RINGLET_GRAD_PATH",
            "gpu",
            Some(1),
            [
                "reading RINGLET_GRAD_PATH failed on rank 1",
                "RINGLET_GRAD_PATH=\"gpu\" is not auto, host or device",
            ],
        ),
    ] {
        let job = Job::start_env(2, &run_args(&out), &dir.0, tag, |r| {
            if on.is_none_or(|on| on == r) {
                vec![(var, value.to_string())]
            } else {
                Vec::new()
            }
        });
        let (codes, logs) = job.codes(Duration::from_secs(60));
        for (r, (code, log)) in codes.iter().zip(&logs).enumerate() {
            assert!(
                code.is_some_and(|c| c != 0),
                "{tag}: rank {r} {code:?}\n{log}"
            );
            assert!(log.contains(want[r]), "{tag}: rank {r}:\n{log}");
        }
    }
}

fn rank(on_device: bool, nccl: bool) -> RankTraits {
    RankTraits {
        on_device,
        nccl,
        forced: Choice::Auto,
        backend: BackendChoice::Auto,
        shares_gpu: false,
    }
}

/// NCCL only when every rank is on a GPU with NCCL and none forces a way; otherwise the TCP
/// ring, GPU ranks staging device buffers and CPU ranks overlapping host buckets.
#[test]
fn nccl_only_when_every_rank_can_use_it() {
    let all = [rank(true, true), rank(true, true), rank(true, true)];
    let d = decide(&all).unwrap();
    assert_eq!(d.paths, vec![Path::Nccl; 3]);
    assert_eq!(
        describe(&d, &all, true),
        "gradient sync: NCCL on device buffers (3 GPU ranks)"
    );

    let mixed = [rank(true, true), rank(true, false), rank(false, false)];
    let d = decide(&mixed).unwrap();
    use Path::{DeviceBuckets as D, HostBuckets as H};
    assert_eq!(d.paths, vec![D, D, H]);
    assert_eq!(
        describe(&d, &mixed, true),
        "gradient sync: TCP ring (no NCCL for every rank: rank 1 cannot load NCCL; rank 2 \
         trains on the CPU); ranks 0,1 stage device buffers through pinned host blocks, rank \
         2 host buckets overlapped with backward"
    );

    // Two ranks on one GPU (ringrun -n 2 on a one-GPU machine): NCCL refuses them.
    let mut shared = all;
    shared[0].shares_gpu = true;
    shared[1].shares_gpu = true;
    let d = decide(&shared).unwrap();
    assert_eq!(d.paths, vec![D; 3]);
    assert!(
        d.reason.contains("rank 0 shares its GPU with another rank")
            && d.reason.contains("rank 1 shares"),
        "{}",
        d.reason
    );

    let mut tcp = all;
    tcp[2].backend = BackendChoice::Tcp;
    let d = decide(&tcp).unwrap();
    assert_eq!(
        (d.paths, d.reason.as_str()),
        (vec![D; 3], "RINGLET_BACKEND=tcp")
    );

    let mut forced = all;
    forced[1].forced = Choice::Host;
    forced[2].forced = Choice::Device;
    let d = decide(&forced).unwrap();
    assert_eq!(d.paths, vec![D, H, D]);
    assert!(
        d.reason.contains("rank 1 sets RINGLET_GRAD_PATH=host"),
        "{}",
        d.reason
    );
    let line = describe(&d, &forced, false);
    assert!(
        line.ends_with(
            "ranks 0,2 stage device buffers through pinned host blocks, rank 1 host buckets \
             after backward (read from the GPU layer by layer)"
        ),
        "{line}"
    );

    let mut cpu = [rank(false, false); 2];
    cpu[0].forced = Choice::Device;
    let d = decide(&cpu).unwrap();
    assert_eq!(d.paths, vec![D, H]);
    assert!(describe(&d, &cpu, true).contains("rank 0 sum host buffers bucket by bucket"));

    let one = decide(&[rank(true, true)]).unwrap();
    assert_eq!(one.paths, vec![Path::None]);
    assert_eq!(
        describe(&one, &[rank(true, true)], true),
        "gradient sync: none (one rank)"
    );
}

/// RINGLET_BACKEND=nccl where a rank cannot use NCCL, or ranks asking for different
/// backends, is an error naming the ranks.
#[test]
fn impossible_demands_are_errors_naming_the_ranks() {
    let mut ranks = [rank(true, true), rank(false, false), rank(true, false)];
    ranks[0].backend = BackendChoice::Nccl;
    let e = decide(&ranks).unwrap_err();
    assert!(
        e.contains("RINGLET_BACKEND=nccl, but 2 of 3 ranks")
            && e.contains("rank 1 trains on the CPU; rank 2 cannot load NCCL"),
        "{e}"
    );
    let e = decide(&[
        ranks[0],
        rank(false, false),
        rank(false, false),
        ranks[1],
        ranks[2],
        ranks[1],
    ])
    .unwrap_err();
    assert!(
        e.contains("5 of 6") && e.ends_with("cannot load NCCL; and 1 more"),
        "{e}"
    );
    let mut ok = [rank(true, true); 2];
    ok[1].backend = BackendChoice::Nccl;
    assert_eq!(decide(&ok).unwrap().paths, vec![Path::Nccl; 2]);
    ok[0].backend = BackendChoice::Tcp;
    let e = decide(&ok).unwrap_err();
    assert!(e.contains("tcp on rank 0, nccl on rank 1"), "{e}");
}
