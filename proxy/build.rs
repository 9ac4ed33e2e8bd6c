//! Embeds the eBPF object: builds `ebpf/` with the pinned nightly (the same code as
//! `cargo xtask build-ebpf`), or takes the file named by `WSPLICE_EBPF_OBJECT`.

#[path = "../xtask/src/ebpf_build.rs"]
mod ebpf_build;

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=WSPLICE_EBPF_OBJECT");
    for path in [
        "../ebpf/src",
        "../ebpf/Cargo.toml",
        "../ebpf/rust-toolchain.toml",
        "../common/src",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = match std::env::var_os("WSPLICE_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
            let root = manifest.parent().unwrap_or(Path::new("..")).to_owned();
            match ebpf_build::build_ebpf(&root) {
                Ok(object) => object,
                Err(message) => {
                    eprintln!("error: {message}");
                    panic!("wsplice needs its eBPF object: {message}");
                }
            }
        }
    };
    if let Err(e) = std::fs::copy(&object, out.join("wsplice-ebpf.o")) {
        panic!("cannot copy the eBPF object {}: {e}", object.display());
    }
}
