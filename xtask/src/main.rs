//! Project tasks: `cargo xtask setup | build-ebpf | run | test | bench | soak | churn | fuzz`.
//!
//! `setup` makes a fresh machine able to build everything (pinned toolchains, bpf-linker built
//! against the eBPF nightly's own LLVM); the other tasks run it first, so the README's two
//! commands work on a machine that has only rustup, gcc and git.

mod bench;
mod demo;
mod fuzz;
mod process;
mod setup;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "wsplice project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the pinned toolchains and build bpf-linker (idempotent, cached in .tools/).
    Setup,
    /// Build the eBPF object and print its path.
    BuildEbpf,
    /// Build everything and run the proxy (wsplice.toml) in front of the built-in echo upstream.
    Run {
        /// Extra arguments for `wsplice run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Side-by-side benchmarks: direct, nginx, HAProxy, wsplice userspace and kernel paths.
    Bench {
        /// A short pass (1 round, 1 s runs, 1,000 held tunnels, fleet of 2,000; under 2 minutes).
        #[arg(long)]
        quick: bool,
        /// Only these workloads (repeat or comma-separate).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Workload>,
        /// Rounds of the alternation (default: 3, quick: 1).
        #[arg(long)]
        rounds: Option<usize>,
    },
    /// The long soak: sequenced bulk tunnels, checked byte for byte (see tests/tests/soak.rs).
    Soak {
        /// Runs per data path and scenario (default 500: 3,000 runs in all).
        #[arg(long, default_value_t = 500)]
        runs: u32,
        /// Run for this many minutes in all instead of a count of runs (shared by the data
        /// paths and scenarios), e.g. `--minutes 10` for the contention soak of issue #14.
        #[arg(long)]
        minutes: Option<f64>,
        /// The bounded shape of `cargo xtask test` (16 tunnels x 24 messages) instead of the
        /// full one (16 x 300 messages up to 1 MiB).
        #[arg(long)]
        bounded: bool,
        /// Only these data paths (`userspace`, `kernel`, `auto`; comma-separated).
        #[arg(long)]
        datapath: Option<String>,
        /// Only these scenarios (`delayed-echo`, `flood`; comma-separated).
        #[arg(long)]
        scenario: Option<String>,
    },
    /// The full churn: connect/upgrade/close cycles in steps, then descriptors, eBPF map entries,
    /// RSS and kernel slab checked against where they started (see tests/tests/churn.rs).
    Churn {
        /// Cycles per data path (`cargo xtask test` runs 50,000).
        #[arg(long, default_value_t = 1_000_000)]
        cycles: u64,
        /// Cycles per step (the first step is the warm-up that sets the RSS plateau).
        #[arg(long, default_value_t = 100_000)]
        step: u64,
        /// Cycles at once.
        #[arg(long, default_value_t = 128)]
        in_flight: u32,
        /// Only these data paths (`kernel`, `auto`, `userspace`; comma-separated; default
        /// kernel,auto).
        #[arg(long)]
        datapath: Option<String>,
    },
    /// fmt, clippy, build, unit and end-to-end tests, then each fuzz target for a short while
    /// (skipped when a test filter is given).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The cargo-fuzz targets of fuzz/: every one for a bounded time (what `cargo xtask test`
    /// runs), or one for as long as asked; with input files after `--`, replays them.
    Fuzz {
        /// One target (default: all of them, one after the other).
        target: Option<String>,
        /// Seconds per target (default: the bounded run of `cargo xtask test`).
        #[arg(long)]
        seconds: Option<u32>,
        /// Only install cargo-fuzz and build the targets.
        #[arg(long)]
        build_only: bool,
        /// Input files to replay through the target (a crash's artifact, a corpus file).
        #[arg(last = true)]
        inputs: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one task; the exit code is the task's (for `run`, the proxy's).
fn run(task: Task) -> anyhow::Result<ExitCode> {
    let root = repository_root()?;
    match task {
        Task::Setup => setup::setup(&root).map(|()| ExitCode::SUCCESS),
        Task::BuildEbpf => {
            setup::setup(&root)?;
            let object = wsplice_ebpf_build::build_ebpf(&root)?;
            println!("{}", object.display());
            Ok(ExitCode::SUCCESS)
        }
        Task::Run { args } => {
            setup::setup(&root)?;
            step("build wsplice (release)", || {
                cargo(&root, &["build", "--release", "-p", "wsplice"])
            })?;
            demo::run(&root, &args)
        }
        Task::Bench {
            quick,
            only,
            rounds,
        } => {
            setup::setup(&root)?;
            step("build wsplice and wsplice-load (release)", || {
                cargo(
                    &root,
                    &[
                        "build",
                        "--release",
                        "-p",
                        "wsplice",
                        "-p",
                        "wsplice-benches",
                    ],
                )
            })?;
            bench::bench(
                &root,
                &bench::Options {
                    quick,
                    only,
                    rounds,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Test { args } => {
            setup::setup(&root)?;
            test(&root, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Fuzz {
            target,
            seconds,
            build_only,
            inputs,
        } => {
            setup::setup(&root)?;
            fuzz::ensure_cargo_fuzz(&root)?;
            step("build the fuzz targets", || fuzz::build(&root))?;
            if build_only {
                return Ok(ExitCode::SUCCESS);
            }
            let seconds = seconds.unwrap_or(fuzz::BOUNDED_SECONDS);
            match target {
                Some(target) if !inputs.is_empty() => fuzz::replay(&root, &target, &inputs)?,
                Some(target) => step(&format!("fuzz {target} for {seconds} s"), || {
                    fuzz::run(&root, &target, seconds, None)
                })?,
                None => fuzz_all(&root, seconds, None)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Task::Soak {
            runs,
            minutes,
            bounded,
            datapath,
            scenario,
        } => {
            let shape = if bounded { "bounded" } else { "full" };
            let mut env = vec![
                ("WSPLICE_SOAK_RUNS", runs.to_string()),
                ("WSPLICE_SOAK_SHAPE", shape.to_owned()),
            ];
            env.extend(minutes.map(|minutes| ("WSPLICE_SOAK_MINUTES", minutes.to_string())));
            env.extend(datapath.map(|datapath| ("WSPLICE_DATAPATHS", datapath)));
            env.extend(scenario.map(|scenario| ("WSPLICE_SOAK_SCENARIOS", scenario)));
            long_test(&root, "soak", &env)?;
            Ok(ExitCode::SUCCESS)
        }
        Task::Churn {
            cycles,
            step: step_size,
            in_flight,
            datapath,
        } => {
            let mut env = vec![
                ("WSPLICE_CHURN_CYCLES", cycles.to_string()),
                ("WSPLICE_CHURN_STEP", step_size.to_string()),
                ("WSPLICE_CHURN_IN_FLIGHT", in_flight.to_string()),
            ];
            env.extend(datapath.map(|datapath| ("WSPLICE_DATAPATHS", datapath)));
            long_test(&root, "churn", &env)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The long form of a standing test (`soak`, `churn`): set-up, the release binary, then that
/// one test binary of `tests/` with its settings in `env`, its output shown as it runs.
fn long_test(root: &Path, test: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
    setup::setup(root)?;
    step("build wsplice (release)", || {
        cargo(root, &["build", "--release", "-p", "wsplice"])
    })?;
    let mut command = Command::new("cargo");
    command
        .args(["test", "--release", "-p", "wsplice-tests", "--test", test])
        .args(["--", "--nocapture"])
        .current_dir(root)
        .env("WSPLICE_BIN", root.join("target/release/wsplice"))
        .envs(env.iter().map(|(name, value)| (*name, value)));
    step(test, || {
        let status = command.status().context("cannot run cargo test")?;
        if !status.success() {
            bail!("the {test} failed ({status})");
        }
        Ok(())
    })
}

/// The repository root: the folder above this crate's manifest.
fn repository_root() -> anyhow::Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_owned)
        .context("xtask has no parent folder")
}

fn test(root: &Path, extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    step("cargo fmt --check", || {
        cargo(root, &["fmt", "--all", "--", "--check"])?;
        cargo(
            root,
            &["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"],
        )
    })?;
    step("cargo clippy", || {
        cargo(
            root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )?;
        // fuzz/ is its own workspace (nightly for fuzzing); its code is checked here with the
        // same toolchain and target folder as the rest.
        cargo(
            root,
            &[
                "clippy",
                "--manifest-path",
                "fuzz/Cargo.toml",
                "--target-dir",
                "target",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        )
    })?;
    step("build wsplice (release)", || {
        cargo(root, &["build", "--release", "-p", "wsplice"])
    })?;
    step(
        "test clients (openssl, curl, promtool, Python venv)",
        || setup::ensure_test_clients(root),
    )?;
    let binary = root.join("target/release/wsplice");
    step("cargo test (unit and end-to-end)", || {
        let mut args = vec!["test", "--workspace", "--release"];
        if !extra.is_empty() {
            args.push("--");
            args.extend(extra.iter().map(String::as_str));
        }
        let status = Command::new("cargo")
            .args(&args)
            .current_dir(root)
            .env("WSPLICE_BIN", &binary)
            .status()
            .context("cannot run cargo test")?;
        if !status.success() {
            bail!("tests failed ({status})");
        }
        Ok(())
    })?;
    if extra.is_empty() {
        step("cargo fuzz (install, build)", || {
            fuzz::ensure_cargo_fuzz(root)?;
            fuzz::build(root)
        })?;
        fuzz_all(root, fuzz::BOUNDED_SECONDS, Some(fuzz::TEST_SEED))?;
    } else {
        println!(
            "==> fuzz targets skipped (a test filter was given; `cargo xtask fuzz` runs them)"
        );
    }
    println!(
        "xtask test: everything passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every fuzz target for `seconds`, one after the other; the first crash fails.
fn fuzz_all(root: &Path, seconds: u32, seed: Option<u32>) -> anyhow::Result<()> {
    for target in fuzz::TARGETS {
        step(&format!("fuzz {target} for {seconds} s"), || {
            fuzz::run(root, target, seconds, seed)
        })?;
    }
    Ok(())
}

/// Runs `cargo ARGS` in the repository root.
fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("cargo")
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs one named step and prints how long it took.
fn step(name: &str, body: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    println!("==> {name}");
    let started = Instant::now();
    let result = body();
    let seconds = started.elapsed().as_secs_f64();
    match &result {
        Ok(()) => println!("==> {name}: ok ({seconds:.1} s)"),
        Err(_) => println!("==> {name}: FAILED ({seconds:.1} s)"),
    }
    result
}
