//! `ringlet-shards`: writes and checks sharded datasets for `ringlet-train --dataset shards:DIR`.

use clap::{Parser, Subcommand};
use ringlet_train::shards;
use std::path::PathBuf;
use std::time::Duration;

/// Sharded datasets for ringlet-train: safetensors shards (`x` F32 [n, features], `y` U32 [n])
/// and an index.json with each file's samples, bytes and SHA-256.
///
/// e.g. ringlet-shards convert digits /data/digits --shard-samples 256
///      ringlet-shards verify /data/digits
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Converts a dataset into shards: `digits`, `synthetic:N`, or a directory of MNIST-format
    /// IDX files (`idx:PATH`), as ringlet-train's --dataset names them. Training samples are
    /// shuffled (fixed seed) before sharding, so every shard is a uniform draw of the set; the
    /// held-out set is one shard of its own. OUT must be new or empty.
    Convert {
        source: String,
        out: PathBuf,
        /// Training samples per shard (the last shard holds the rest).
        #[arg(long, default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 24))]
        shard_samples: usize,
    },
    /// Reads every shard of DIR and checks it against the index (length, SHA-256, tensors,
    /// labels); prints the shards and exits non-zero on the first that fails.
    Verify {
        dir: PathBuf,
        /// Give up on a file after this many seconds (storage that stops answering).
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
    },
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("ringlet-shards: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    match args.command {
        Command::Convert {
            source,
            out,
            shard_samples,
        } => {
            let data = ringlet_train::data::load(&source).map_err(|e| e.to_string())?;
            let index = shards::convert(&data, &out, shard_samples).map_err(|e| e.to_string())?;
            let bytes: u64 = index.train.iter().map(|s| s.bytes).sum::<u64>() + index.test.bytes;
            println!(
                "ringlet-shards: {} -> {}: {} training samples in {} shards, {} held out, {} features, {} classes, {bytes} bytes",
                data.name,
                out.display(),
                index.train_samples(),
                index.train.len(),
                index.test.samples,
                index.features,
                index.classes
            );
            Ok(())
        }
        Command::Verify { dir, timeout_s } => {
            let deadline = Duration::from_secs(timeout_s.max(1));
            let index = shards::read_index(&dir, deadline).map_err(|e| e.to_string())?;
            let check = |s: &shards::ShardFile| {
                shards::read_shard(&dir.join(&s.file), s, &index, deadline)
                    .map_err(|e| e.to_string())
            };
            for (i, s) in index.train.iter().enumerate() {
                check(s)?;
                println!(
                    "train {i:>5} {} {} samples {} bytes ok",
                    s.file, s.samples, s.bytes
                );
            }
            let t = &index.test;
            check(t)?;
            println!(
                "test        {} {} samples {} bytes ok",
                t.file, t.samples, t.bytes
            );
            println!(
                "ringlet-shards: {} ({}): {} training samples in {} shards, all verified",
                dir.display(),
                index.name,
                index.train_samples(),
                index.train.len()
            );
            Ok(())
        }
    }
}
