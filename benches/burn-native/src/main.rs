//! Data-parallel CNN training benchmark using Burn's own multi-process collective
//! machinery (`burn-collective` 0.21 global orchestrator + per-node websocket
//! tensor data service), on the ndarray CPU backend.
//!
//! One process per rank. Gradients are synchronised with
//! `GradientsParams::all_reduce` (burn-optim's `collective` feature), which
//! calls `burn_collective::all_reduce` once per parameter, in ParamId order.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLoss;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use burn_collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, finish_collective, register,
};

type Inner = Flex<f32>;
type TB = Autodiff<Inner>;

const TRAIN_SAMPLES: usize = 1438;
const WARMUP_STEPS: usize = 5;

// ---------------------------------------------------------------- model

#[derive(Module, Debug)]
struct Cnn<B: Backend> {
    c1: Conv2d<B>,
    c2: Conv2d<B>,
    c3: Conv2d<B>,
    c4: Conv2d<B>,
    pool: MaxPool2d,
    fc1: Linear<B>,
    fc2: Linear<B>,
    relu: Relu,
}

impl<B: Backend> Cnn<B> {
    fn new(c: usize, h: usize, device: &B::Device) -> Self {
        let conv = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            c1: conv(1, c),
            c2: conv(c, c),
            c3: conv(c, 2 * c),
            c4: conv(2 * c, 2 * c),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(2 * c * 2 * 2, h).init(device),
            fc2: LinearConfig::new(h, 10).init(device),
            relu: Relu::new(),
        }
    }

    /// x: [n, 1, 8, 8] -> logits [n, 10]
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.relu.forward(self.c1.forward(x));
        let x = self.relu.forward(self.c2.forward(x));
        let x = self.pool.forward(x);
        let x = self.relu.forward(self.c3.forward(x));
        let x = self.relu.forward(self.c4.forward(x));
        let x = self.pool.forward(x);
        let x: Tensor<B, 2> = x.flatten(1, 3);
        let x = self.relu.forward(self.fc1.forward(x));
        self.fc2.forward(x)
    }
}

/// Burn draws ParamIds from the OS RNG, so they differ between processes.
/// `GradientsParams::all_reduce` all-reduces parameters in sorted-ParamId order,
/// so every rank must use the same ids: renumber them in (deterministic) visit order.
struct RenumberIds(u64);

impl<B: Backend> ModuleMapper<B> for RenumberIds {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_id, tensor, mapper) = param.consume();
        self.0 += 1;
        Param::from_mapped_value(ParamId::from(self.0), tensor, mapper)
    }
}

/// Sum of |w| over all parameters (used to check that ranks stay in sync).
fn param_abs_sum<B: Backend, M: Module<B>>(model: &M) -> f64 {
    struct Sum(f64);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Sum {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0 += p.val().abs().sum().into_scalar().elem::<f64>();
        }
    }
    let mut s = Sum(0.0);
    model.visit(&mut s);
    s.0
}

// ---------------------------------------------------------------- data

fn read_be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Returns (pixels [n*64] in 0..1, labels [n]).
fn load_idx(images: &PathBuf, labels: &PathBuf) -> (Vec<f32>, Vec<i64>, usize) {
    let img = std::fs::read(images).unwrap_or_else(|e| panic!("read {images:?}: {e}"));
    let lab = std::fs::read(labels).unwrap_or_else(|e| panic!("read {labels:?}: {e}"));
    assert_eq!(read_be_u32(&img, 0), 0x0803, "bad image magic");
    assert_eq!(read_be_u32(&lab, 0), 0x0801, "bad label magic");
    let n = read_be_u32(&img, 4) as usize;
    let (r, c) = (read_be_u32(&img, 8) as usize, read_be_u32(&img, 12) as usize);
    assert_eq!((r, c), (8, 8), "expected 8x8 images");
    assert_eq!(read_be_u32(&lab, 4) as usize, n, "image/label count mismatch");
    let px = img[16..16 + n * 64].iter().map(|&v| v as f32 / 16.0).collect();
    let ls = lab[8..8 + n].iter().map(|&v| v as i64).collect();
    (px, ls, n)
}

/// Fixed permutation (Fisher-Yates driven by a 64-bit LCG, seed 0x5eed).
fn permutation(n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut s: u64 = 0x5eed;
    for i in (1..n).rev() {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = ((s >> 33) % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

// ---------------------------------------------------------------- cli

struct Args {
    rank: usize,
    world: usize,
    global_addr: String,
    node_addr: String,
    orchestrator: bool,
    strategy: AllReduceStrategy,
    channels: usize,
    hidden: usize,
    global_batch: usize,
    steps: usize,
    data_dir: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage:\n  burn-native orchestrator --port PORT\n  \
         burn-native --rank R --world N --global-addr HOST:PORT --node-addr HOST:PORT \
         [--orchestrator] [--strategy ring|tree|centralized] [--channels 16] [--hidden 64] \
         [--global-batch 64] [--steps 200] [--data-dir DIR]"
    );
    std::process::exit(2)
}

fn ws(addr: &str) -> String {
    if addr.contains("://") { addr.to_string() } else { format!("ws://{addr}") }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).unwrap_or_else(|| {
        eprintln!("address {addr} has no :PORT");
        usage()
    })
}

fn parse_args(argv: &[String]) -> Args {
    let mut a = Args {
        rank: usize::MAX,
        world: 0,
        global_addr: String::new(),
        node_addr: String::new(),
        orchestrator: false,
        strategy: AllReduceStrategy::Ring,
        channels: 16,
        hidden: 64,
        global_batch: 64,
        steps: 200,
        data_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../crates/ringlet-train/data")),
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage());
        let num = |s: String| s.parse::<usize>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--rank" => a.rank = num(val()),
            "--world" => a.world = num(val()),
            "--global-addr" => a.global_addr = val(),
            "--node-addr" => a.node_addr = val(),
            "--orchestrator" => a.orchestrator = true,
            "--strategy" => {
                a.strategy = match val().as_str() {
                    "ring" => AllReduceStrategy::Ring,
                    "tree" => AllReduceStrategy::Tree(2),
                    "centralized" => AllReduceStrategy::Centralized,
                    _ => usage(),
                }
            }
            "--channels" => a.channels = num(val()),
            "--hidden" => a.hidden = num(val()),
            "--global-batch" => a.global_batch = num(val()),
            "--steps" => a.steps = num(val()),
            "--data-dir" => a.data_dir = PathBuf::from(val()),
            "-h" | "--help" => usage(),
            _ => {
                eprintln!("unknown argument {flag}");
                usage()
            }
        }
    }
    if a.world == 0 || a.rank >= a.world || a.global_addr.is_empty() || a.node_addr.is_empty() {
        usage();
    }
    if a.global_batch % a.world != 0 {
        eprintln!("--global-batch must be divisible by --world");
        usage();
    }
    a
}

fn run_orchestrator(port: u16) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(burn_collective::start_global_orchestrator(port));
}

// ---------------------------------------------------------------- train

fn main() {
    // burn-communication installs an INFO-level stdout logger unless a global
    // subscriber already exists; install one on stderr instead (WARN+, or BURN_NATIVE_LOG=info|debug|trace).
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(
            std::env::var("BURN_NATIVE_LOG")
                .ok()
                .and_then(|l| l.parse::<tracing_subscriber::filter::LevelFilter>().ok())
                .unwrap_or(tracing_subscriber::filter::LevelFilter::WARN),
        )
        .try_init();

    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("orchestrator") {
        let mut port = None;
        let mut it = argv[1..].iter();
        while let Some(f) = it.next() {
            match f.as_str() {
                "--port" => port = it.next().and_then(|p| p.parse().ok()),
                _ => usage(),
            }
        }
        run_orchestrator(port.unwrap_or_else(|| usage()));
        return;
    }
    let args = parse_args(&argv);
    let (rank, world) = (args.rank, args.world);

    if args.orchestrator {
        let port = port_of(&args.global_addr);
        std::thread::spawn(move || run_orchestrator(port));
    }

    // ---- data
    let (px, labels, n) = load_idx(
        &args.data_dir.join("digits-images.idx3-ubyte"),
        &args.data_dir.join("digits-labels.idx1-ubyte"),
    );
    assert!(n >= TRAIN_SAMPLES, "need at least {TRAIN_SAMPLES} samples, got {n}");
    let train: Vec<usize> = permutation(n).into_iter().take(TRAIN_SAMPLES).collect();

    // ---- model (same seed + same ParamIds on every rank)
    let device = Default::default();
    <TB as Backend>::seed(&device, 42);
    let model: Cnn<TB> = Cnn::new(args.channels, args.hidden, &device);
    let mut model = Module::<TB>::map(model, &mut RenumberIds(0));
    let mut optim = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)))
        .init::<TB, Cnn<TB>>();
    eprintln!("[rank {rank}] initial param-abs-sum {:.6}", param_abs_sum::<TB, _>(&model));
    let lr = 0.05;
    let loss_fn = CrossEntropyLoss::new(None, &device);

    // ---- collective registration (one peer/device per process, one process per node)
    let node_addr = ws(&args.node_addr);
    let config = CollectiveConfig::default()
        .with_num_devices(1)
        .with_num_nodes(world as u32)
        .with_global_address(ws(&args.global_addr).parse().unwrap())
        .with_node_address(node_addr.parse().unwrap())
        .with_data_service_port(port_of(&node_addr))
        .with_global_all_reduce_strategy(args.strategy);
    let peer = PeerId::from(rank);
    register::<Inner>(peer, device, config).expect("collective register failed");
    eprintln!("[rank {rank}] registered with the global collective ({world} nodes)");

    // ---- training loop
    let local = args.global_batch / world;
    let mut xs = vec![0f32; local * 64];
    let mut ys = vec![0i64; local];
    let mut timed_total = Duration::ZERO;
    let mut timed_comm = Duration::ZERO;
    let mut timed_steps = 0usize;
    let mut last_loss = f32::NAN;

    for step in 0..args.steps {
        let t0 = Instant::now();
        let start = step * args.global_batch + rank * local;
        for i in 0..local {
            let s = train[(start + i) % TRAIN_SAMPLES];
            xs[i * 64..(i + 1) * 64].copy_from_slice(&px[s * 64..(s + 1) * 64]);
            ys[i] = labels[s];
        }
        let x = Tensor::<TB, 4>::from_data(TensorData::new(xs.clone(), [local, 1, 8, 8]), &device);
        let y = Tensor::<TB, 1, Int>::from_data(TensorData::new(ys.clone(), [local]), &device);

        let logits = model.forward(x);
        let loss = loss_fn.forward(logits, y);
        let grads = GradientsParams::from_grads::<TB, Cnn<TB>>(loss.backward(), &model);

        let tc = Instant::now();
        let grads = grads
            .all_reduce::<<TB as AutodiffBackend>::InnerBackend>(peer, ReduceOperation::Mean)
            .expect("gradient all-reduce failed");
        let comm = tc.elapsed();

        model = optim.step(lr, model, grads);
        let dt = t0.elapsed();

        if step >= WARMUP_STEPS {
            timed_total += dt;
            timed_comm += comm;
            timed_steps += 1;
        }
        if step + 1 == args.steps || step % 25 == 0 {
            last_loss = loss.into_scalar();
            eprintln!(
                "[rank {rank}] step {step} loss {last_loss:.4} step_ms {:.1} comm_ms {:.1}",
                dt.as_secs_f64() * 1e3,
                comm.as_secs_f64() * 1e3
            );
        }
    }

    // Parameter checksum: identical on every rank iff the gradients were synchronised.
    let checksum = param_abs_sum::<TB, _>(&model);
    eprintln!("[rank {rank}] final loss {last_loss:.4} param-abs-sum {checksum:.6}");

    if rank == 0 && timed_steps > 0 {
        let step_s = timed_total.as_secs_f64() / timed_steps as f64;
        println!(
            "{{\"samples_per_s\": {:.1}, \"mean_step_ms\": {:.3}, \"comm_wait_fraction\": {:.4}, \"steps\": {}, \"world\": {}}}",
            args.global_batch as f64 / step_s,
            step_s * 1e3,
            timed_comm.as_secs_f64() / timed_total.as_secs_f64(),
            timed_steps,
            world
        );
    }

    // A last all-reduce acts as a barrier so nobody closes its data service while a
    // neighbour is still downloading from it; then leave the collective.
    let barrier = Tensor::<Inner, 1>::ones([world], &device);
    let _ = burn_collective::all_reduce::<Inner>(
        peer,
        barrier.into_primitive().tensor(),
        ReduceOperation::Sum,
    );
    if let Err(e) = finish_collective::<Inner>(peer) {
        eprintln!("[rank {rank}] finish_collective: {e:?}");
    }
    if args.orchestrator {
        // Keep the in-process orchestrator alive while the other ranks unregister.
        std::thread::sleep(Duration::from_millis(1500));
    }
}
