//! Soak: sequenced bulk tunnels, many at once, on every data path; not one byte may be lost,
//! duplicated, changed or reordered (see `wsplice_tests::soak`). `auto` promotes tunnels from
//! the userspace relay to the kernel in the middle of their traffic (after 64 KiB), and in the
//! flood, tunnels whose reader falls behind leave the kernel path in the middle of theirs.
//!
//! Two busy loops spin beside it (CPU contention: the kernel-path corruption was found under
//! it), and every tunnel's access line must give a clean close reason.
//!
//! `cargo xtask test` runs the bounded form; `cargo xtask soak` the long one. Settings:
//! `WSPLICE_SOAK_RUNS` (rounds per data path, each round both scenarios), `WSPLICE_SOAK_MINUTES`
//! (instead of a count of runs: this long in all, shared by data paths and scenarios),
//! `WSPLICE_SOAK_SHAPE` (`full`: 16 tunnels × 300 messages up to 1 MiB; `bounded`, the default:
//! 16 × 24 up to 1 MiB), `WSPLICE_SOAK_CONTENTION` (busy loops, default 2), `WSPLICE_SEED`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wsplice_tests::soak::{run_once, RunError, Scenario, Shape, SoakUpstream};
use wsplice_tests::*;

fn shape() -> Shape {
    let full = Shape::full();
    match std::env::var("WSPLICE_SOAK_SHAPE").as_deref() {
        Ok("full") => full,
        _ => Shape {
            messages: 24,
            ..full
        },
    }
}

fn runs() -> u32 {
    std::env::var("WSPLICE_SOAK_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(50)
}

/// The time budget of the whole soak, if it runs by time rather than by count.
fn minutes() -> Option<f64> {
    std::env::var("WSPLICE_SOAK_MINUTES")
        .ok()
        .and_then(|minutes| minutes.parse().ok())
}

/// Threads that spin while the soak runs.
struct BusyLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoops {
    fn start() -> BusyLoops {
        let count = std::env::var("WSPLICE_SOAK_CONTENTION")
            .ok()
            .and_then(|count| count.parse().ok())
            .unwrap_or(2);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..count)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut spins = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        spins = std::hint::black_box(spins.wrapping_add(1));
                    }
                })
            })
            .collect();
        BusyLoops { stop, threads }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What a tunnel of the soak may end with: both sides closed, after the client's close.
const CLEAN: &str = "both sides closed";

fn scenarios() -> Vec<Scenario> {
    let wanted = std::env::var("WSPLICE_SOAK_SCENARIOS").unwrap_or_default();
    [Scenario::DelayedEcho, Scenario::Flood]
        .into_iter()
        .filter(|scenario| wanted.is_empty() || wanted.split(',').any(|w| w == scenario.name()))
        .collect()
}

/// The delayed-echo scenario runs with default limits, as a user would. The flood has no
/// window, so on the kernel path its reader falls behind: the backlog limit is set low, so
/// that tunnels leave the kernel path (pause, then the relay) while both ways are busy, at a
/// different moment in each run. Promotion comes early, so it happens while bytes flow.
fn config(scenario: Scenario, upstream: &SoakUpstream) -> ProxyConfig {
    let mut config = ProxyConfig::new(&[upstream.addr()]);
    if scenario == Scenario::Flood {
        config.limits = "kernel_backlog = \"1MiB\"";
    }
    config.kernel = "promote_after = \"1h\"\npromote_after_bytes = \"64KiB\"";
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequenced_bulk_tunnels_arrive_intact_on_every_data_path() {
    let upstream = SoakUpstream::start().await;
    let shape = shape();
    let runs = runs();
    let first_seed = std::env::var("WSPLICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    let datapaths = datapaths_or("userspace,kernel,auto");
    let scenarios = scenarios();
    let share = minutes().map(|minutes| {
        Duration::from_secs_f64(minutes * 60.0 / (datapaths.len() * scenarios.len()) as f64)
    });
    match share {
        Some(share) => println!(
            "soak: {share:?} per data path and scenario, {shape:?}, first seed {first_seed}"
        ),
        None => println!(
            "soak: {runs} runs per data path and scenario, {shape:?}, first seed {first_seed}"
        ),
    }
    let _contention = BusyLoops::start();
    let mut failures = Vec::new();
    for &datapath in &datapaths {
        for &scenario in &scenarios {
            let proxy = Proxy::start(datapath, &config(scenario, &upstream));
            let started = Instant::now();
            let mut moved = 0u64;
            let runs = if share.is_some() { u32::MAX } else { runs };
            for run in 0..runs {
                if share.is_some_and(|share| started.elapsed() >= share) {
                    break;
                }
                let seed = first_seed.wrapping_add(u64::from(run));
                let outcome = run_once(
                    proxy.addr(),
                    &upstream,
                    scenario,
                    shape,
                    seed,
                    Duration::from_secs(120),
                )
                .await;
                match outcome {
                    Ok(stats) => moved += stats.bytes_up + stats.bytes_down,
                    Err(error) => {
                        let line = format!(
                            "{datapath:?} {} run {run} (seed {seed}): {error}",
                            scenario.name()
                        );
                        println!("{line}");
                        if matches!(error, RunError::Corrupted(_)) {
                            println!("proxy log tail:\n{}", tail(&proxy.log(), 40));
                        }
                        failures.push(line);
                    }
                }
                if (run + 1) % 50 == 0 {
                    println!(
                        "soak {datapath:?} {}: {} runs done, {} failed so far ({:.0} s)",
                        scenario.name(),
                        run + 1,
                        failures.len(),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            let unclean: Vec<String> = proxy
                .access_lines()
                .iter()
                .filter(|line| line["status"] == 101)
                .filter_map(|line| line["reason"].as_str().map(str::to_owned))
                .filter(|reason| reason != CLEAN)
                .collect();
            if !unclean.is_empty() {
                failures.push(format!(
                    "{datapath:?} {}: {} tunnels did not end cleanly, e.g. {:?}",
                    scenario.name(),
                    unclean.len(),
                    &unclean[..unclean.len().min(5)]
                ));
            }
            let metrics = proxy.metrics();
            let metric = |name: &str| metrics.get(name).copied().unwrap_or(0);
            println!(
                "soak {datapath:?} {}: {} MB in {:.1} s; the kernel handed over \
                 {} bytes twice (cut off by the splice program), {} tunnels diverted; {} of {} \
                 tunnels promoted from userspace, {} moved back to it (a reader fell behind)",
                scenario.name(),
                moved / 1_000_000,
                started.elapsed().as_secs_f64(),
                metric("kernel_repeated_bytes_cut_total"),
                metric("kernel_diverted_total"),
                metric("tunnels_promoted_total"),
                metric("tunnels_opened_total"),
                metric("tunnels_demoted_total"),
            );
            let spliced = matches!(datapath, DataPath::Kernel | DataPath::Auto);
            if spliced && scenario == Scenario::Flood && metric("tunnels_demoted_total") == 0 {
                failures.push(format!(
                    "{datapath:?} flood: no tunnel left the kernel path, the soak did not test it"
                ));
            }
            if datapath == DataPath::Auto && metric("tunnels_promoted_total") == 0 {
                failures.push(format!(
                    "auto {}: no tunnel was promoted to the kernel",
                    scenario.name()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed soak run(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
