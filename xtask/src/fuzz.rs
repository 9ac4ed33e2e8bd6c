//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/`, built with the eBPF nightly (libFuzzer's
//! instrumentation needs nightly flags) by a pinned cargo-fuzz installed into `.tools/`.
//!
//! Each run reads the committed seeds (`fuzz/corpus/<target>/`) and writes what it learns to a
//! scratch corpus under `target/fuzz/` (so the repository stays clean); a crash leaves its input
//! in `target/fuzz/artifacts/<target>/` and fails the run. `cargo xtask test` runs every target
//! for [`BOUNDED_SECONDS`].

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use wsplice_ebpf_build::{ebpf_nightly, nested_tool, run_command, TOOLS_DIR};

/// The cargo-fuzz release installed into `.tools/` (`cargo install --locked`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The fuzz targets (`fuzz/Cargo.toml` names each as a `[[bin]]`).
pub const TARGETS: [&str; 10] = [
    "request_head",
    "response_head",
    "header_rewrite",
    "target_route",
    "chunked_body",
    "config",
    "import",
    "tls_session",
    "proxy_protocol",
    "dns_answer",
];

/// How long `cargo xtask test` runs each target (10 × 18 s, about 3 minutes in all).
pub const BOUNDED_SECONDS: u32 = 18;

/// Memory a fuzzing process may use before libFuzzer calls it a crash (the machine has others
/// building beside it).
const RSS_LIMIT_MB: u32 = 1024;

/// The cargo-fuzz binary `cargo xtask` installs.
fn cargo_fuzz(root: &Path) -> PathBuf {
    root.join(TOOLS_DIR).join("bin/cargo-fuzz")
}

/// What the stamp file says for this cargo-fuzz and nightly.
fn stamp_text(nightly: &str) -> String {
    format!("{CARGO_FUZZ_VERSION} {nightly}")
}

/// cargo-fuzz in `.tools/`, installed with the eBPF nightly when missing or of another version.
pub fn ensure_cargo_fuzz(root: &Path) -> anyhow::Result<()> {
    let nightly = ebpf_nightly(root)?;
    let tools = root.join(TOOLS_DIR);
    let stamp = tools.join("cargo-fuzz.stamp");
    let wanted = stamp_text(&nightly);
    if cargo_fuzz(root).is_file()
        && std::fs::read_to_string(&stamp).is_ok_and(|text| text.trim() == wanted)
    {
        return Ok(());
    }
    println!(
        "==> installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once)",
        tools.display()
    );
    let mut install = nested_tool(&nightly, "cargo");
    install
        .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION])
        .args(["--locked", "--force", "--root"])
        .arg(&tools);
    run_command(&mut install).context(
        "installing cargo-fuzz failed: it needs crates.io; retry with `cargo xtask fuzz --build-only`",
    )?;
    std::fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

/// `cargo fuzz SUBCOMMAND` run by the nightly in the repository root (where it finds `fuzz/`),
/// with the eBPF stub (a release-profile build of `wsplice` would otherwise build the eBPF
/// object).
fn cargo_fuzz_command(root: &Path, subcommand: &str) -> anyhow::Result<Command> {
    let nightly = ebpf_nightly(root)?;
    let mut command = nested_tool(&nightly, &cargo_fuzz(root).to_string_lossy());
    command
        .arg(subcommand)
        .current_dir(root)
        .env("WSPLICE_EBPF", "stub");
    Ok(command)
}

/// Builds every target under `target/fuzz`, without a sanitizer: the code under test is safe
/// Rust, and libFuzzer still catches panics, overflows and debug assertions, at twice the speed
/// of ASan.
pub fn build(root: &Path) -> anyhow::Result<()> {
    let mut command = cargo_fuzz_command(root, "build")?;
    command
        .args(["--sanitizer", "none", "--target-dir"])
        .arg(root.join("target/fuzz"));
    run_command(&mut command).context("building the fuzz targets failed")?;
    Ok(())
}

/// The fuzzer binary of `target`, as `build` leaves it.
fn binary(root: &Path, target: &str) -> PathBuf {
    root.join("target/fuzz")
        .join(HOST_TRIPLE)
        .join("release")
        .join(target)
}

/// The triple cargo-fuzz builds for (it passes `--target` explicitly).
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// The fuzzer of `target`, checked to be a known target that [`build`] built.
fn fuzzer(root: &Path, target: &str) -> anyhow::Result<Command> {
    if !TARGETS.contains(&target) {
        bail!(
            "no fuzz target {target:?} (targets: {})",
            TARGETS.join(", ")
        );
    }
    let binary = binary(root, target);
    if !binary.is_file() {
        bail!("{} is missing: the build did not make it", binary.display());
    }
    Ok(Command::new(binary))
}

/// The seed of the bounded runs of `cargo xtask test`: with it, libFuzzer explores the same
/// inputs in the same order on every machine (from the committed seeds), so the test suite
/// passes or fails the same way everywhere; a slower machine stops earlier in the same
/// sequence. Long sessions (`cargo xtask fuzz TARGET --seconds N`) take a random seed to find
/// new inputs.
pub const TEST_SEED: u32 = 20261206;

/// Runs `target` for `seconds` (after [`build`]: the binary is run directly, with no cargo
/// in between), from `seed` if given; fails on a crash, naming the input that caused it.
pub fn run(root: &Path, target: &str, seconds: u32, seed: Option<u32>) -> anyhow::Result<()> {
    let mut command = fuzzer(root, target)?;
    let scratch = root.join("target/fuzz/corpus").join(target);
    let artifacts = root.join("target/fuzz/artifacts").join(target);
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("cannot create {}", artifacts.display()))?;
    // libFuzzer writes new inputs into the first corpus folder and reads them all.
    command
        .arg(&scratch)
        .arg(root.join("fuzz/corpus").join(target))
        .arg(format!("-max_total_time={seconds}"))
        .args(seed.map(|seed| format!("-seed={seed}")))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    let status = command
        .status()
        .with_context(|| format!("cannot run the fuzzer of {target}"))?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}): the input is in {} (replay it: \
             cargo xtask fuzz {target} -- FILE)",
            artifacts.display()
        );
    }
    Ok(())
}

/// Replays `inputs` (files) through `target` once each, as libFuzzer does with file arguments.
pub fn replay(root: &Path, target: &str, inputs: &[String]) -> anyhow::Result<()> {
    let mut command = fuzzer(root, target)?;
    command.args(inputs);
    let status = command
        .status()
        .with_context(|| format!("cannot run the fuzzer of {target}"))?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed on {} ({status})",
            inputs.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate_with_seeds() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask sits in the repository root");
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("fuzz/");
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} is not a [[bin]] of fuzz/Cargo.toml"
            );
            let seeds = std::fs::read_dir(root.join("fuzz/corpus").join(target))
                .expect("a seed folder per target")
                .count();
            assert!((1..=64).contains(&seeds), "{target}: {seeds} seeds");
        }
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(
            bins,
            TARGETS.len(),
            "fuzz/Cargo.toml has targets xtask does not run"
        );
    }

    #[test]
    fn the_stamp_changes_with_the_nightly() {
        assert_ne!(
            stamp_text("nightly-2026-10-29"),
            stamp_text("nightly-2026-11-30")
        );
    }
}
