//! The one way to build the eBPF crate, shared by `cargo xtask build-ebpf` and `proxy/build.rs`
//! (included there with `#[path]`), so both run the same command. Standard library only.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `cargo xtask setup` puts the tools the eBPF build needs, under the repository root.
pub const TOOLS_DIR: &str = ".tools";

/// Environment that an outer cargo/rustup sets and that would leak into the nested nightly build.
const SCRUBBED_ENV: [&str; 10] = [
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
];

/// The nightly channel pinned in `ebpf/rust-toolchain.toml`.
pub fn ebpf_nightly(root: &Path) -> Result<String, String> {
    toolchain_channel(&root.join("ebpf/rust-toolchain.toml"))
}

/// The `channel` of a `rust-toolchain.toml`.
pub fn toolchain_channel(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .ok_or_else(|| format!("{} has no channel", file.display()))
}

/// The bpf-linker binary installed by `cargo xtask setup`.
pub fn bpf_linker(root: &Path) -> PathBuf {
    root.join(TOOLS_DIR).join("bin/bpf-linker")
}

/// Builds `ebpf/` in release mode and returns the object's path.
pub fn build_ebpf(root: &Path) -> Result<PathBuf, String> {
    let nightly = ebpf_nightly(root)?;
    let linker = bpf_linker(root);
    if !linker.is_file() {
        return Err(format!(
            "{} is missing: run `cargo xtask setup` first (it builds bpf-linker for {nightly})",
            linker.display()
        ));
    }
    let target_dir = root.join("ebpf/target");
    let mut command = Command::new("rustup");
    command
        .args(["run", &nightly, "cargo", "build", "--release"])
        .current_dir(root.join("ebpf"))
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env("CARGO_TARGET_DIR", &target_dir);
    for name in SCRUBBED_ENV {
        command.env_remove(name);
    }
    // Variables cargo sets for a build script (CARGO_PKG_*, CARGO_CFG_*, ...) must not reach
    // the nested cargo either.
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str() {
            if name.starts_with("CARGO_")
                && name != "CARGO_HOME"
                && name != "CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER"
            {
                command.env_remove(name);
            }
        }
    }
    command.env("CARGO_TARGET_DIR", &target_dir);
    let status = command
        .status()
        .map_err(|e| format!("cannot run `rustup run {nightly} cargo build`: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the eBPF crate failed ({status}); command: rustup run {nightly} cargo build --release (in ebpf/)"
        ));
    }
    let object = target_dir.join("bpfel-unknown-none/release/wsplice-ebpf");
    if !object.is_file() {
        return Err(format!(
            "the eBPF build did not produce {}",
            object.display()
        ));
    }
    Ok(object)
}
