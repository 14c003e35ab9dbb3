//! Every collective, dtype and op across real processes, for world sizes 1 to 8, checked element
//! by element against an independent reference (f64, or exact wrapping integers) and for
//! bit-identical results on every rank.

mod common;

use common::Job;
use std::time::Duration;

const EDGE_COUNTS: &str = "0,1,n-1,n+1,1000003";

fn run(
    n: usize,
    counts: &str,
    dtypes: &str,
    ops: &str,
    collectives: &str,
    env: &[(&str, &str)],
    timeout_s: u64,
) {
    let mut job = Job::start(n, &["correctness", counts, dtypes, ops, collectives], env);
    let statuses = job.wait_all(Duration::from_secs(timeout_s));
    let outputs = job.all_outputs();
    for (rank, st) in statuses.iter().enumerate() {
        assert!(st.success(), "rank {rank} failed: {st}\n{outputs}");
        assert!(
            job.output(rank).contains("OK checks="),
            "rank {rank} did not report\n{outputs}"
        );
    }
}

macro_rules! every_dtype_op_and_collective {
    ($($name:ident: $n:expr,)*) => {$(
        #[test]
        fn $name() {
            run($n, EDGE_COUNTS, "all", "all", "all", &[], 600);
        }
    )*};
}

/// The same across TCP loopback: ranks of one host take shared memory unless told not to.
#[test]
fn every_dtype_op_and_collective_over_tcp_loopback() {
    for n in [3, 4] {
        run(
            n,
            EDGE_COUNTS,
            "all",
            "all",
            "all",
            &[("RINGLET_SHM", "0")],
            600,
        );
    }
}

/// Each all-reduce algorithm forced for every size, on shared memory and on TCP.
#[test]
fn every_all_reduce_algorithm_forced_across_processes() {
    for algo in ["ring", "doubling", "halving"] {
        for shm in ["1", "0"] {
            let env = [("RINGLET_ALGO", algo), ("RINGLET_SHM", shm)];
            run(
                5,
                EDGE_COUNTS,
                "float,int32,bfloat16",
                "all",
                "all_reduce",
                &env,
                600,
            );
        }
    }
}

/// Over several TCP connections per peer: bytes dealt to three connections in 512 KiB blocks
/// come out whole and in order, for the ring and for the links halving makes on demand.
#[test]
fn every_collective_over_three_tcp_streams_per_peer() {
    for algo in ["ring", "halving"] {
        let env = [
            ("RINGLET_SHM", "0"),
            ("RINGLET_NSOCKS", "3"),
            ("RINGLET_ALGO", algo),
        ];
        run(
            4,
            EDGE_COUNTS,
            "float,uint8,bfloat16",
            "sum,max",
            "all",
            &env,
            600,
        );
    }
    let env = [("RINGLET_SHM", "0"), ("RINGLET_NSOCKS", "2")];
    run(
        3,
        "64MiB",
        "float",
        "sum",
        "all_reduce,broadcast",
        &env,
        600,
    );
}

every_dtype_op_and_collective! {
    world_of_1: 1,
    world_of_2: 2,
    world_of_3: 3,
    world_of_4: 4,
    world_of_5: 5,
    world_of_6: 6,
    world_of_7: 7,
    world_of_8: 8,
}

#[test]
fn sixty_four_mib_every_dtype_three_ranks() {
    run(3, "64MiB", "all", "sum", "all_reduce", &[], 600);
}

#[test]
fn sixty_four_mib_every_op_and_async_two_ranks() {
    run(
        2,
        "64MiB",
        "float",
        "all",
        "all_reduce,all_reduce_async,broadcast",
        &[],
        600,
    );
}

#[test]
fn sixty_four_mib_eight_ranks() {
    run(
        8,
        "64MiB",
        "float,bfloat16",
        "sum,avg",
        "all_reduce",
        &[],
        600,
    );
}

#[test]
fn many_small_chunks_pipeline_correctly() {
    let env = [("RINGLET_CHUNK_BYTES", "4K")];
    run(
        3,
        "1000003,4097",
        "float,int64,half",
        "sum,max",
        "all",
        &env,
        600,
    );
}

#[test]
fn small_buffers_use_the_ring_when_doubling_is_disabled() {
    // The smallest chunk: 10007 elements are several chunks per rank for every type.
    let env = [("RINGLET_SMALL_BYTES", "0"), ("RINGLET_CHUNK_BYTES", "4K")];
    run(
        2,
        "0,1,2,3,1000,10007",
        "all",
        "all",
        "all_reduce",
        &env,
        600,
    );
    run(
        3,
        "0,1,2,3,1000,10007",
        "float,int32,bfloat16",
        "all",
        "all_reduce",
        &env,
        600,
    );
}

#[test]
fn larger_buffers_use_recursive_doubling_when_the_threshold_allows() {
    let env = [("RINGLET_SMALL_BYTES", "16M")];
    run(
        4,
        "1000003",
        "float,uint8",
        "sum,avg,max",
        "all_reduce,all_reduce_async",
        &env,
        600,
    );
}

fn scenario(n: usize, name: &str) {
    let mut job = Job::start(n, &[name], &[]);
    let statuses = job.wait_all(Duration::from_secs(120));
    let outputs = job.all_outputs();
    for (rank, st) in statuses.iter().enumerate() {
        assert!(st.success(), "rank {rank} failed: {st}\n{outputs}");
        assert!(job.output(rank).contains("OK checks="), "{outputs}");
    }
}

#[test]
fn collectives_issued_from_several_threads_at_once_complete_in_order() {
    scenario(2, "threads");
    scenario(3, "threads");
}

#[test]
fn signed_zeros_and_nan_payloads_agree_bit_for_bit_on_every_rank() {
    scenario(2, "bits");
    scenario(3, "bits");
}

/// Device buffers through the staged TCP fallback, on `HostDevice` (host memory behind the
/// device interface): every dtype and op, edge counts and several pipeline chunks (small chunks
/// make the few staging blocks run out, so back-pressure is exercised), and a rank mixing in
/// host calls. Results must be exact and bit-identical to the host path's.
#[test]
fn device_buffers_staged_through_host_blocks() {
    run(
        3,
        "0,1,n+1,1000003",
        "all",
        "all",
        "all_reduce_device,broadcast_device",
        &[],
        600,
    );
    run(
        4,
        "1000003,4097",
        "float,half,int64",
        "sum,avg,max",
        "all_reduce_device,all_reduce_device_lagging,broadcast_device,all_reduce",
        &[("RINGLET_CHUNK_BYTES", "4K"), ("RINGLET_SMALL_BYTES", "0")],
        600,
    );
}
