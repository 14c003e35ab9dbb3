//! Times `Element::reduce_into` (sum) per element type on 64 MiB buffers: the reduction's share
//! of a collective's cost. `cargo run --release -p ringlet-core --example reduce_speed`
use ringlet_core::half_types::{bf16, f16};
use ringlet_core::{Element, ReduceOp};
use std::time::Instant;

fn time<T: Element>(name: &str) {
    let n = (64 << 20) / std::mem::size_of::<T>();
    let mut a: Vec<T> = (0..n).map(|i| T::from_f64((i % 7) as f64)).collect();
    let b: Vec<T> = (0..n).map(|i| T::from_f64((i % 5) as f64)).collect();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        T::reduce_into(ReduceOp::Sum, &mut a, &b);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{name:>9}: {:6.2} ms per 64 MiB, {:5.2} GB/s of accumulator",
        best * 1e3,
        (64 << 20) as f64 / best / 1e9
    );
}

fn main() {
    time::<f32>("f32");
    time::<f64>("f64");
    time::<f16>("f16");
    time::<bf16>("bf16");
    time::<i32>("i32");
    time::<u8>("u8");
}
