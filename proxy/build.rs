//! Embeds the eBPF object, so `cargo build --release -p wsplice` alone gives a complete binary.
//!
//! Which object:
//! - `WSPLICE_EBPF_OBJECT=path`: that file;
//! - release builds, or `WSPLICE_EBPF=build`: built from `ebpf/` with the pinned nightly and the
//!   bpf-linker of `.tools/` (`cargo xtask setup` installs them; the same code as
//!   `cargo xtask build-ebpf`);
//! - otherwise (`cargo check`, `cargo clippy`, debug builds, or `WSPLICE_EBPF=stub`): a stub, so
//!   the Rust code builds without the eBPF toolchain. A binary with the stub runs the userspace
//!   relay only (`--datapath kernel` says why it cannot).
//!
//! The object lands in `OUT_DIR/wsplice-ebpf.o`. The build also tells `wsplice --version` the
//! git revision (`WSPLICE_GIT_REVISION`) and which object it embedded (`WSPLICE_EBPF_KIND`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Name of the embedded object in OUT_DIR (`splice::program` includes it).
const OBJECT_NAME: &str = "wsplice-ebpf.o";
/// The stub's contents (`splice::program` recognises it).
const STUB: &[u8] = b"wsplice: no eBPF object in this build\n";

fn main() -> ExitCode {
    println!("cargo:rerun-if-env-changed=WSPLICE_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=WSPLICE_EBPF");
    for path in [
        "../ebpf/src",
        "../ebpf/Cargo.toml",
        "../ebpf/Cargo.lock",
        "../ebpf/rust-toolchain.toml",
        "../ebpf/.cargo/config.toml",
        "../common/src",
        "../common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    describe_revision();
    match embed() {
        Ok(kind) => {
            println!("cargo:rustc-env=WSPLICE_EBPF_KIND={kind}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            // cargo shows a build script's stderr when it fails.
            eprintln!("error: wsplice needs its eBPF object: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The git revision of the source tree (short hash), or `unknown` outside a git checkout.
fn describe_revision() {
    println!("cargo:rerun-if-changed=../.git/HEAD");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir("..")
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    // The branch's ref file moves with every commit (HEAD itself only names the branch).
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        println!("cargo:rerun-if-changed=../.git/{reference}");
    }
    let revision = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=WSPLICE_GIT_REVISION={revision}");
}

/// Finds, builds or stubs the object and puts it into OUT_DIR; says which it embedded.
fn embed() -> Result<&'static str, String> {
    let out = env_path("OUT_DIR")?.join(OBJECT_NAME);
    if let Some(path) = std::env::var_os("WSPLICE_EBPF_OBJECT") {
        let path = PathBuf::from(path);
        println!("cargo:rerun-if-changed={}", path.display());
        return copy(&path, &out).map(|()| "embedded (WSPLICE_EBPF_OBJECT)");
    }
    let wanted = std::env::var("WSPLICE_EBPF").unwrap_or_default();
    let release = std::env::var("PROFILE").is_ok_and(|profile| profile == "release");
    if wanted == "stub" || (wanted != "build" && !release) {
        return std::fs::write(&out, STUB)
            .map(|()| "stub (userspace relay only)")
            .map_err(|error| format!("cannot write the stub: {error}"));
    }
    let manifest_dir = env_path("CARGO_MANIFEST_DIR")?;
    let root = manifest_dir
        .parent()
        .map(Path::to_owned)
        .ok_or("proxy/ has no parent folder")?;
    let object = wsplice_ebpf_build::build_ebpf(&root).map_err(|error| error.to_string())?;
    copy(&object, &out).map(|()| "embedded")
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|error| format!("cannot copy {}: {error}", from.display()))
}

/// A path cargo passes to every build script.
fn env_path(name: &str) -> Result<PathBuf, String> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("cargo did not set {name}"))
}
