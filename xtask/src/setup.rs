//! `cargo xtask setup`: everything a fresh machine lacks, installed once and cached.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use crate::ebpf_build::{bpf_linker, ebpf_nightly, toolchain_channel, TOOLS_DIR};

/// The bpf-linker release built for the eBPF nightly.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs the pinned toolchains and bpf-linker; fast when everything is there.
pub fn setup(root: &Path) -> anyhow::Result<()> {
    let userspace =
        toolchain_channel(&root.join("rust-toolchain.toml")).map_err(anyhow::Error::msg)?;
    let nightly = ebpf_nightly(root).map_err(anyhow::Error::msg)?;
    ensure_toolchain(&userspace, &["rustfmt", "clippy"])?;
    ensure_toolchain(&nightly, &["rust-src"])?;
    ensure_bpf_linker(root, &nightly)
}

fn ensure_toolchain(channel: &str, components: &[&str]) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", channel])
        .output()
        .context("cannot run rustup (is it installed and on PATH?)")?;
    let listed = String::from_utf8_lossy(&installed.stdout);
    let has = |component: &str| listed.lines().any(|line| line.starts_with(component));
    if installed.status.success() && components.iter().all(|c| has(c)) {
        return Ok(());
    }
    println!(
        "==> installing toolchain {channel} with {}",
        components.join(", ")
    );
    let mut command = Command::new("rustup");
    command.args(["toolchain", "install", channel, "--profile", "minimal"]);
    for component in components {
        command.args(["-c", component]);
    }
    let status = command.status().context("cannot run rustup")?;
    if !status.success() {
        bail!(
            "`rustup toolchain install {channel}` failed ({status}); check that rustup can reach its \
             distribution server"
        );
    }
    Ok(())
}

/// bpf-linker linked against the nightly's own LLVM (shared/ebpf-toolchain.md), rebuilt when
/// the nightly changes (a stamp file records which one it was built for).
fn ensure_bpf_linker(root: &Path, nightly: &str) -> anyhow::Result<()> {
    let tools = root.join(TOOLS_DIR);
    let stamp = tools.join("bpf-linker.stamp");
    let wanted = format!("{BPF_LINKER_VERSION} {nightly}");
    if bpf_linker(root).is_file()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted)
    {
        return Ok(());
    }
    println!(
        "==> building bpf-linker {BPF_LINKER_VERSION} against {nightly}'s LLVM (1-2 minutes, once)"
    );
    let sysroot = Command::new("rustc")
        .args([&format!("+{nightly}"), "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("cannot run rustc for the nightly's sysroot")?;
    if !sysroot.status.success() {
        bail!("`rustc +{nightly} --print sysroot` failed");
    }
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let lib_dir = Path::new(&sysroot).join("lib");
    let library = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("{nightly} ships no libLLVM.so.* in {}", lib_dir.display()))?;
    // A prefix with lib/libLLVM.so (for -lLLVM when linking) and lib/<soname> (at run time).
    let prefix = tools.join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for link in ["libLLVM.so", library.as_str()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(lib_dir.join(&library), &path)
            .with_context(|| format!("cannot link {}", path.display()))?;
    }
    let status = Command::new("rustup")
        .args(["run", nightly, "cargo", "install", "bpf-linker"])
        .args([
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--root",
        ])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("cannot run cargo install bpf-linker")?;
    if !status.success() {
        bail!(
            "building bpf-linker failed ({status}); LLVM_PREFIX={}",
            prefix.display()
        );
    }
    std::fs::write(&stamp, wanted)?;
    Ok(())
}
