//! `cargo xtask setup`: everything a fresh machine lacks, installed once and cached.
//!
//! 1. the userspace toolchain of `rust-toolchain.toml` with rustfmt and clippy;
//! 2. the eBPF nightly of `ebpf/rust-toolchain.toml` with rust-src;
//! 3. bpf-linker built against that nightly's own LLVM (shared/ebpf-toolchain.md) in `.tools/`,
//!    with a stamp recording the version and nightly, so bumping either rebuilds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use wsplice_ebpf_build::{
    bpf_linker, command_line, ebpf_nightly, nested_tool, run_command, toolchain_channel, TOOLS_DIR,
};

/// The bpf-linker release built for the eBPF nightly.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs the pinned toolchains and bpf-linker; fast when everything is there.
pub fn setup(root: &Path) -> anyhow::Result<()> {
    let userspace = toolchain_channel(&root.join("rust-toolchain.toml"))?;
    let nightly = ebpf_nightly(root)?;
    ensure_toolchain(&userspace, &["rustfmt", "clippy"])?;
    ensure_toolchain(&nightly, &["rust-src"])?;
    ensure_bpf_linker(root, &nightly)
}

/// The clients the `wss://` tests drive besides the Rust ones: `openssl s_client` and Python
/// `websockets`. Installed from Debian packages when missing.
pub fn ensure_test_clients() -> anyhow::Result<()> {
    let has_openssl = probe("openssl", &["version"]);
    let has_python = probe("python3", &["-c", "import websockets"]);
    if has_openssl && has_python {
        return Ok(());
    }
    apt_install(&["openssl", "python3", "python3-websockets"])
        .context("the TLS tests need openssl and python3-websockets")?;
    if !probe("openssl", &["version"]) || !probe("python3", &["-c", "import websockets"]) {
        bail!("openssl or python3-websockets still missing after apt-get install");
    }
    Ok(())
}

/// Whether `program args` runs and succeeds.
fn probe(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `apt-get install -y PACKAGES` (after an `apt-get update`), non-interactive.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    println!("==> installing {} from Debian packages", packages.join(" "));
    let update = Command::new("apt-get")
        .arg("update")
        .status()
        .context("cannot run apt-get")?;
    let install = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !update.success() || !install.success() {
        bail!("apt-get install {} failed", packages.join(" "));
    }
    Ok(())
}

/// Installs `channel` with `components` unless rustup lists them all as installed. Explicit,
/// because rustup's auto-install may be off (RUSTUP_AUTO_INSTALL=0).
fn ensure_toolchain(channel: &str, components: &[&str]) -> anyhow::Result<()> {
    if has_components(channel, components) {
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
    command.env_remove("RUSTUP_TOOLCHAIN");
    run_command(&mut command).with_context(|| {
        format!(
            "installing {channel} failed: check that rustup can reach its distribution server \
             (or install it by hand: `{}`)",
            command_line(&command)
        )
    })
}

/// Whether rustup lists `channel` as installed with every one of `components`.
fn has_components(channel: &str, components: &[&str]) -> bool {
    let Ok(listed) = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", channel])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
    else {
        return false;
    };
    listed.status.success()
        && lists_components(&String::from_utf8_lossy(&listed.stdout), components)
}

/// Whether `rustup component list --installed` output names every one of `components`; its
/// lines read like `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
fn lists_components(listed: &str, components: &[&str]) -> bool {
    components.iter().all(|component| {
        listed.lines().any(|line| {
            line == *component
                || line
                    .strip_prefix(component)
                    .is_some_and(|rest| rest.starts_with('-'))
        })
    })
}

/// What the stamp file says for this bpf-linker and nightly.
fn stamp_text(nightly: &str) -> String {
    format!("{BPF_LINKER_VERSION} {nightly}")
}

/// bpf-linker linked against the nightly's own LLVM, rebuilt when the stamp differs.
fn ensure_bpf_linker(root: &Path, nightly: &str) -> anyhow::Result<()> {
    let tools = root.join(TOOLS_DIR);
    let stamp = tools.join("bpf-linker.stamp");
    let wanted = stamp_text(nightly);
    if bpf_linker(root).is_file()
        && std::fs::read_to_string(&stamp).is_ok_and(|text| text.trim() == wanted)
    {
        return Ok(());
    }
    println!(
        "==> building bpf-linker {BPF_LINKER_VERSION} against {nightly}'s LLVM (1-2 minutes, once)"
    );
    let prefix = llvm_prefix(&tools, nightly)?;
    let mut install = nested_tool(nightly, "cargo");
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--locked", "--force", "--root"])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix);
    run_command(&mut install).with_context(|| {
        format!(
            "building bpf-linker failed (LLVM_PREFIX={}). It needs crates.io and a C++ linker \
             (gcc); retry with `cargo xtask setup`",
            prefix.display()
        )
    })?;
    std::fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(())
}

/// A folder `PREFIX/lib` with `libLLVM.so` (for `-lLLVM` when linking bpf-linker) and the
/// library's own soname (found at run time through bpf-linker's RUNPATH), both links to the
/// nightly's `libLLVM.so.*`: bpf-linker's build takes LLVM from `LLVM_PREFIX`, and the system
/// LLVM (if any) is the wrong major version.
fn llvm_prefix(tools: &Path, nightly: &str) -> anyhow::Result<PathBuf> {
    let sysroot = nested_tool(nightly, "rustc")
        .args(["--print", "sysroot"])
        .output()
        .with_context(|| format!("cannot run `rustup run {nightly} rustc --print sysroot`"))?;
    if !sysroot.status.success() {
        bail!(
            "`rustup run {nightly} rustc --print sysroot` failed ({}); is {nightly} installed?",
            sysroot.status
        );
    }
    let lib_dir = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let library = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "{nightly} ships no libLLVM.so.* in {}; bpf-linker needs the nightly's LLVM",
                lib_dir.display()
            )
        })?;
    let prefix = tools.join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", library.as_str()] {
        let path = prefix_lib.join(link);
        // A link from an older nightly may be there; replace it.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error).context(format!("cannot replace {}", path.display())),
        }
        std::os::unix::fs::symlink(lib_dir.join(&library), &path)
            .with_context(|| format!("cannot link {}", path.display()))?;
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_components_are_recognised() {
        let listed = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\n\
                      rustfmt-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n";
        assert!(lists_components(listed, &["rustfmt", "clippy"]));
        assert!(!lists_components(listed, &["rust-src"]));
        assert!(lists_components(
            "rust-src\nrustc-x86_64-unknown-linux-gnu\n",
            &["rust-src"]
        ));
        assert!(!lists_components("", &["clippy"]));
    }

    #[test]
    fn the_stamp_changes_with_the_nightly() {
        assert_ne!(
            stamp_text("nightly-2026-10-29"),
            stamp_text("nightly-2026-11-30")
        );
    }
}
