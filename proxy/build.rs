//! Embeds the eBPF object (DESIGN.md §7: `cargo build --release -p wsplice` alone gives a
//! complete binary): builds `ebpf/` with the pinned nightly and the bpf-linker of `.tools/`
//! (the same code as `cargo xtask build-ebpf`), or takes the file named by
//! `WSPLICE_EBPF_OBJECT`. The object lands in `OUT_DIR/wsplice-ebpf.o`.

#[path = "../xtask/src/ebpf_build.rs"]
mod ebpf_build;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Name of the embedded object in OUT_DIR (`splice::program` includes it).
const OBJECT_NAME: &str = "wsplice-ebpf.o";

fn main() -> ExitCode {
    println!("cargo:rerun-if-env-changed=WSPLICE_EBPF_OBJECT");
    for path in [
        "../ebpf/src",
        "../ebpf/Cargo.toml",
        "../ebpf/Cargo.lock",
        "../ebpf/rust-toolchain.toml",
        "../ebpf/.cargo/config.toml",
        "../common/src",
        "../common/Cargo.toml",
        "../xtask/src/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    match embed() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // cargo shows a build script's stderr when it fails.
            eprintln!("error: wsplice needs its eBPF object: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Finds or builds the object and copies it into OUT_DIR.
fn embed() -> Result<(), String> {
    let out_dir = env_path("OUT_DIR")?;
    let object = match std::env::var_os("WSPLICE_EBPF_OBJECT") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            path
        }
        None => {
            let manifest_dir = env_path("CARGO_MANIFEST_DIR")?;
            let root = manifest_dir
                .parent()
                .map(Path::to_owned)
                .ok_or("proxy/ has no parent folder")?;
            ebpf_build::build_ebpf(&root).map_err(|error| error.to_string())?
        }
    };
    std::fs::copy(&object, out_dir.join(OBJECT_NAME))
        .map_err(|error| format!("cannot copy {}: {error}", object.display()))?;
    Ok(())
}

/// A path cargo passes to every build script.
fn env_path(name: &str) -> Result<PathBuf, String> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("cargo did not set {name}"))
}
