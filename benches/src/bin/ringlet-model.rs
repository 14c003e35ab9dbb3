//! `ringlet-model`: the all-reduce cost model ([`ringlet::cost`]) fitted to `ringlet-bench`
//! runs, and projected to worlds this machine cannot hold.

use clap::{Parser, Subcommand};
use ringlet::algo::{Algo, AlgoSetting, HostLayout};
use ringlet::config::{parse_bytes, DEFAULT_SMALL_BYTES};
use ringlet::cost::{self, Costs, LinkCost, Sample, Terms};
use std::path::PathBuf;

/// The alpha–beta model of Ringlet's all-reduce algorithms: a step costs α, a byte through the
/// busiest link β, with one (α, β) within a host and one between hosts; each algorithm's steps
/// and bytes are read off its schedules.
///
///   ringlet-model fit runs/*.json      fit α and β to `ringlet-bench --json` files (all-reduce
///                                      rows of Ringlet's transport, any algorithms, any world
///                                      sizes) and print every row's measured and predicted time
///   ringlet-model project -n 1024 --alpha-us 20 --gbit 25
///                                      predicted time of every algorithm per size, what `auto`
///                                      picks and which is fastest
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fit α and β to measured runs.
    Fit {
        /// `ringlet-bench --json` files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Project every algorithm to a world of `-n` ranks.
    Project {
        /// Ranks, 2 to 4096 (every rank's schedule is built).
        #[arg(short = 'n', long, default_value_t = 1024)]
        ranks: usize,
        /// Ranks per host (hosts of equal size; 1: every rank on its own host).
        #[arg(long, default_value_t = 1)]
        per_host: usize,
        /// Network latency per step, µs.
        #[arg(long, default_value_t = 20.0)]
        alpha_us: f64,
        /// Network bandwidth per host, Gbit/s.
        #[arg(long, default_value_t = 25.0)]
        gbit: f64,
        /// Latency per step within a host, µs.
        #[arg(long, default_value_t = 1.0)]
        local_alpha_us: f64,
        /// Bandwidth within a host, GB/s.
        #[arg(long, default_value_t = 10.0)]
        local_gbyte: f64,
        /// Smallest size (K, M, G suffixes).
        #[arg(short = 'b', long, default_value = "4", value_parser = size)]
        min_bytes: usize,
        /// Largest size.
        #[arg(short = 'e', long, default_value = "1G", value_parser = size)]
        max_bytes: usize,
        /// Size factor between rows.
        #[arg(short = 'f', long, default_value_t = 16)]
        factor: usize,
    },
}

fn size(s: &str) -> Result<usize, String> {
    parse_bytes(s).ok_or_else(|| format!("{s:?} is not a size (e.g. 8, 64K, 128M)"))
}

const ALGOS: [Algo; 4] = [Algo::Doubling, Algo::Halving, Algo::Ring, Algo::TwoLevel];

fn main() {
    let result = match Args::parse().command {
        Command::Fit { files } => fit(&files),
        Command::Project {
            ranks,
            per_host,
            alpha_us,
            gbit,
            local_alpha_us,
            local_gbyte,
            min_bytes,
            max_bytes,
            factor,
        } => {
            let costs = Costs {
                local: LinkCost {
                    alpha: local_alpha_us * 1e-6,
                    beta: 1.0 / (local_gbyte * 1e9),
                },
                network: LinkCost {
                    alpha: alpha_us * 1e-6,
                    beta: 8.0 / (gbit * 1e9),
                },
            };
            project(ranks, per_host, &costs, (min_bytes, max_bytes, factor))
        }
    };
    if let Err(e) = result {
        ringlet_core::error_line!("ringlet-model: {e}");
        std::process::exit(1);
    }
}

#[derive(serde::Deserialize)]
struct Run {
    ranks: usize,
    /// Absent in files from before hosts were recorded: one host per rank.
    #[serde(default)]
    hosts: Option<Vec<Vec<usize>>>,
    rows: Vec<RunRow>,
}

#[derive(serde::Deserialize)]
struct RunRow {
    #[serde(default)]
    algo: String,
    size_bytes: usize,
    time_us: f64,
}

struct Point {
    file: String,
    layout: HostLayout,
    algo: Algo,
    bytes: usize,
    sample: Sample,
}

fn algo_named(name: &str) -> Option<Algo> {
    ALGOS.into_iter().find(|a| a.name() == name)
}

fn layout_of(run: &Run) -> Result<HostLayout, String> {
    let labels: Vec<String> = match &run.hosts {
        Some(hosts) => {
            let mut labels = vec![String::new(); run.ranks];
            for (h, ranks) in hosts.iter().enumerate() {
                for &r in ranks {
                    *labels
                        .get_mut(r)
                        .ok_or_else(|| format!("host list names rank {r} of {}", run.ranks))? =
                        h.to_string();
                }
            }
            labels
        }
        None => (0..run.ranks).map(|r| r.to_string()).collect(),
    };
    if labels.iter().any(String::is_empty) {
        return Err("the host list misses a rank".into());
    }
    Ok(HostLayout::from_labels(&labels))
}

fn fit(files: &[PathBuf]) -> Result<(), String> {
    let mut points = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
        let run: Run =
            serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", f.display()))?;
        if !(2..=4096).contains(&run.ranks) {
            return Err(format!("{}: {} ranks", f.display(), run.ranks));
        }
        let layout = layout_of(&run).map_err(|e| format!("{}: {e}", f.display()))?;
        for row in &run.rows {
            let Some(algo) = algo_named(&row.algo) else {
                continue;
            };
            if !(row.time_us.is_finite() && row.time_us > 0.0) {
                continue;
            }
            let terms = cost::terms(algo, row.size_bytes as f64, &layout);
            points.push(Point {
                file: f.display().to_string(),
                layout: layout.clone(),
                algo,
                bytes: row.size_bytes,
                sample: Sample {
                    terms,
                    time: row.time_us * 1e-6,
                },
            });
        }
    }
    if points.len() < 2 {
        return Err("need at least two all-reduce rows with an algorithm".into());
    }
    let samples: Vec<Sample> = points.iter().map(|p| p.sample).collect();
    let c = cost::fit(&samples);
    println!(
        "# fitted on {} rows from {} files",
        points.len(),
        files.len()
    );
    print_costs(&c);
    println!("#");
    println!(
        "# {:>5} {:>6} {:>10} {:>11} {:>12} {:>12} {:>7}  file",
        "ranks", "hosts", "algo", "size", "measured us", "predicted us", "error"
    );
    let mut errors = Vec::new();
    for p in &points {
        let predicted = p.sample.terms.time(&c);
        let err = (predicted - p.sample.time) / p.sample.time;
        errors.push(err.abs());
        println!(
            "  {:>5} {:>6} {:>10} {:>11} {:>12.1} {:>12.1} {:>+6.1}%  {}",
            p.layout.world_size(),
            p.layout.hosts().len(),
            p.algo.name(),
            p.bytes,
            p.sample.time * 1e6,
            predicted * 1e6,
            err * 100.0,
            p.file
        );
    }
    errors.sort_by(f64::total_cmp);
    let within = errors.iter().filter(|&&e| e <= 0.15).count();
    println!(
        "# |error|: median {:.1}%, worst {:.1}%; {within} of {} rows within 15%",
        errors[errors.len() / 2] * 100.0,
        errors[errors.len() - 1] * 100.0,
        errors.len()
    );
    Ok(())
}

fn print_costs(c: &Costs) {
    let show = |what: &str, l: &LinkCost| {
        let bw = if l.beta > 0.0 {
            format!("{:.3} GB/s", 1e-9 / l.beta)
        } else {
            "unused".into()
        };
        println!(
            "# {what}: alpha {:.2} us per step, beta {:.3} ns per byte ({bw})",
            l.alpha * 1e6,
            l.beta * 1e9
        );
    };
    show("between hosts", &c.network);
    show("within a host", &c.local);
}

fn project(
    n: usize,
    per_host: usize,
    costs: &Costs,
    (min, max, factor): (usize, usize, usize),
) -> Result<(), String> {
    // The terms are read off every rank's schedule: n² work.
    if !(2..=4096).contains(&n)
        || per_host == 0
        || !n.is_multiple_of(per_host)
        || factor < 2
        || min > max
    {
        return Err("need 2 <= -n <= 4096, --per-host dividing -n, -f >= 2 and -b <= -e".into());
    }
    let labels: Vec<String> = (0..n).map(|r| (r / per_host).to_string()).collect();
    let layout = HostLayout::from_labels(&labels);
    let algos: Vec<Algo> = ALGOS
        .into_iter()
        .filter(|&a| a != Algo::TwoLevel || layout.two_level())
        .collect();
    // The terms at one byte, scaled to each size.
    let unit: Vec<Terms> = algos
        .iter()
        .map(|&a| cost::terms(a, 1.0, &layout))
        .collect();
    println!(
        "# {n} ranks, {per_host} per host; between hosts alpha {:.1} us, {:.1} Gbit/s; within a host alpha {:.1} us, {:.1} GB/s",
        costs.network.alpha * 1e6,
        8e-9 / costs.network.beta,
        costs.local.alpha * 1e6,
        1e-9 / costs.local.beta
    );
    print!("| size |");
    for a in &algos {
        print!(" {} |", a.name());
    }
    println!(" auto picks | fastest |");
    println!("|---:|{}---|---|", "---:|".repeat(algos.len()));
    let mut bytes = min;
    while bytes <= max {
        let times: Vec<f64> = unit
            .iter()
            .map(|t| t.scaled(bytes as f64).time(costs))
            .collect();
        let best = (0..algos.len())
            .min_by(|&i, &j| times[i].total_cmp(&times[j]))
            .expect("some algorithm");
        let auto = AlgoSetting::Auto.choose(bytes, &layout, DEFAULT_SMALL_BYTES);
        print!("| {} |", show_bytes(bytes));
        for t in &times {
            print!(" {} |", show_time(*t));
        }
        println!(" {} | {} |", auto.name(), algos[best].name());
        bytes = match bytes.checked_mul(factor) {
            Some(b) => b,
            None => break,
        };
    }
    Ok(())
}

fn show_bytes(b: usize) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn show_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}
