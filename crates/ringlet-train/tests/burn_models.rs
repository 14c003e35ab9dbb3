//! `ringlet-train --model cnn|transformer` (Burn models through ringlet-burn) end to end: real
//! rank processes on loopback. Exactness across world sizes and splits, stage-by-stage backward
//! changing no bit, resumed training ending bit for bit where an uninterrupted run ends, and
//! checkpoints Python's `safetensors` reads by parameter name.

mod common;

use common::{args, max_relative_difference, params, Job, Scratch};

/// The CNN on the digits, 50 steps from seed 5, on `n` ranks with `extra` flags.
fn cnn(dir: &Scratch, tag: &str, n: usize, extra: &[&str]) -> (Vec<f32>, Vec<String>) {
    let out = dir.join(&format!("{tag}.params"));
    let mut a = args(&[
        "--model",
        "cnn",
        "--cnn-channels",
        "8",
        "--global-batch",
        "60",
        "--lr",
        "0.1",
        "--warmup",
        "5",
        "--seed",
        "5",
        "--dump-params",
    ]);
    a.push(out.display().to_string());
    if !extra.contains(&"--steps") {
        a.extend(args(&["--steps", "50"]));
    }
    a.extend(args(extra));
    let logs = Job::start(n, &a, &dir.0, tag).finish();
    (params(&out), logs)
}

/// After 50 steps, 1, 2 and 4 ranks with equal and unequal local batches hold the same CNN
/// parameters to float rounding (1e-5 of the largest); back-propagating stage by stage with the
/// all-reduce overlapped gives the same bits as one backward after which it starts.
#[test]
fn burn_cnn_training_is_exact() {
    let dir = Scratch::new("burn-exact");
    let (one, logs) = cnn(&dir, "n1", 1, &[]);
    assert!(logs[0].contains("test accuracy"), "{}", logs[0]);
    let (start, _) = cnn(&dir, "n1-0steps", 1, &["--steps", "0"]);
    let moved = max_relative_difference(&start, &one);
    assert!(
        moved > 1e-3,
        "50 steps hardly moved the parameters ({moved})"
    );
    for (tag, n, extra) in [
        ("n2", 2, vec![]),
        ("n4", 4, vec![]),
        ("n2-static", 2, vec!["--balance", "static:1,3"]),
        ("n4-static", 4, vec!["--balance", "static:1,2,3,5"]),
    ] {
        let (p, logs) = cnn(&dir, tag, n, &extra);
        let d = max_relative_difference(&one, &p);
        assert!(d < 1e-5, "{tag}: max relative difference {d}\n{}", logs[0]);
        println!("{tag}: max relative difference to one process {d:.2e}");
    }
    let (staged, _) = cnn(&dir, "n2-staged", 2, &["--first-bucket-kb", "1"]);
    let (whole, _) = cnn(
        &dir,
        "n2-whole",
        2,
        &["--first-bucket-kb", "1", "--no-overlap"],
    );
    assert!(
        staged == whole,
        "stage-by-stage backward changed the result"
    );
}

/// 20 steps, a checkpoint, then 20 more in a new job: the same bits as 40 steps in one job
/// (static split 1:3 on 2 ranks); resumed on 4 ranks instead, the same to float rounding.
#[test]
fn burn_cnn_resumes_bit_for_bit() {
    let dir = Scratch::new("burn-resume");
    let ckpt = dir.join("ckpt").display().to_string();
    let flags = |steps: &str, ck: bool, balance: &str| {
        let mut a = vec![
            "--steps",
            steps,
            "--balance",
            balance,
            "--checkpoint-every",
            "10",
        ];
        if ck {
            a.extend(["--checkpoint-dir", ckpt.as_str()]);
        }
        a.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run = |tag: &str, n: usize, f: Vec<String>| {
        let f: Vec<&str> = f.iter().map(String::as_str).collect();
        cnn(&dir, tag, n, &f)
    };
    let (whole, _) = run("whole", 2, flags("40", false, "static:1,3"));
    run("first", 2, flags("20", true, "static:1,3"));
    let (resumed, logs) = run("second", 2, flags("40", true, "static:1,3"));
    assert!(logs[0].contains("resumed at step 20"), "{}", logs[0]);
    assert!(
        whole == resumed,
        "the resumed run differs from the uninterrupted one"
    );
    std::fs::remove_dir_all(dir.join("ckpt").join("step-000000000040")).unwrap();
    let (reshaped, logs) = run("four", 4, flags("40", true, "off"));
    assert!(logs[0].contains("resumed at step 30"), "{}", logs[0]);
    let d = max_relative_difference(&whole, &reshaped);
    assert!(d < 1e-5, "resumed on 4 ranks: max relative difference {d}");
}

/// The character transformer trains on 2 ranks and reports held-out perplexity; its checkpoint
/// (parameters and AdamW's moments by parameter name, step counts in the manifest) opens in
/// Python's `safetensors` and resumes.
#[test]
fn transformer_trains_and_its_checkpoint_opens_in_python() {
    let dir = Scratch::new("burn-lm");
    let ckpt = dir.join("ckpt");
    let a = args(&[
        "--model",
        "transformer",
        "--steps",
        "12",
        "--global-batch",
        "16",
        "--context",
        "16",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "2",
        "--checkpoint-every",
        "6",
        "--checkpoint-dir",
        &ckpt.display().to_string(),
    ]);
    let logs = Job::start(2, &a, &dir.0, "lm").finish();
    assert!(
        logs[0].contains("held-out loss") && logs[0].contains("perplexity"),
        "{}",
        logs[0]
    );
    let step = ckpt.join("step-000000000012");
    let script = r#"
import json, sys
from safetensors.numpy import load_file
d = sys.argv[1]
model = load_file(d + "/model.safetensors")
optim = load_file(d + "/optimizer.safetensors")
manifest = json.load(open(d + "/manifest.json"))
print("model", sorted(model)[:3], len(model))
assert model["blocks.0.attention.query.weight"].shape == (16, 16), model.keys()
assert model["tokens.weight"].shape[1] == 16
moments = [k for k in optim if k.startswith("blocks.1.up.weight.")]
assert len(moments) == 2, list(optim)[:8]
assert manifest["state"]["model"]["model"] == "transformer"
assert manifest["state"]["extra"]["scalars"], manifest["state"]["extra"]
print("ok", len(model), len(optim))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&step)
        .output()
        .expect("python3 runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("ok"), "{text}");
    let mut more = a.clone();
    let at = more.iter().position(|s| s == "12").unwrap();
    more[at] = "18".into();
    let logs = Job::start(2, &more, &dir.0, "lm-more").finish();
    assert!(logs[0].contains("resumed at step 12"), "{}", logs[0]);
}

/// Writes an MNIST-format IDX pair: `n` 28×28 images whose class (0..10) is where a bright
/// square sits, and their labels.
fn write_mnist_like(dir: &std::path::Path, prefix: &str, n: usize) {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    images.extend(0x0000_0803u32.to_be_bytes());
    labels.extend(0x0000_0801u32.to_be_bytes());
    for d in [n as u32, 28, 28] {
        images.extend(d.to_be_bytes());
    }
    labels.extend((n as u32).to_be_bytes());
    for i in 0..n {
        let class = i % 10;
        let (r0, c0) = (2 + (class / 5) * 12, 2 + (class % 5) * 5);
        for r in 0..28 {
            for c in 0..28 {
                let on = (r0..r0 + 8).contains(&r) && (c0..c0 + 4).contains(&c);
                images.push(if on {
                    200 + (i % 50) as u8
                } else {
                    (i * 7 + r * c) as u8 % 30
                });
            }
        }
        labels.push(class as u8);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
}

/// The CNN takes MNIST-format IDX directories of 28×28 images (two pooling stages: 7×7 maps).
#[test]
fn burn_cnn_trains_on_an_mnist_format_directory() {
    let dir = Scratch::new("burn-mnist");
    let data = dir.join("mnist");
    std::fs::create_dir_all(&data).unwrap();
    write_mnist_like(&data, "train", 400);
    write_mnist_like(&data, "t10k", 100);
    let a = args(&[
        "--model",
        "cnn",
        "--dataset",
        &data.display().to_string(),
        "--cnn-channels",
        "4",
        "--global-batch",
        "40",
        "--epochs",
        "4",
    ]);
    let logs = Job::start(2, &a, &dir.0, "mnist").finish();
    let line = logs[0]
        .lines()
        .find(|l| l.contains("test accuracy"))
        .unwrap_or_else(|| panic!("{}", logs[0]));
    assert!(
        line.contains("40 steps on 2 ranks") && line.contains("on 100 held-out samples"),
        "{line}"
    );
    println!("{line}");
}
