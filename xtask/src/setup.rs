//! `cargo xtask setup`: everything a fresh machine lacks, installed once and cached.
//!
//! 1. the userspace toolchain of `toolchain.toml` with rustfmt and clippy, which every cargo
//!    that xtask starts afterwards uses (xtask itself builds with any stable Rust);
//! 2. the eBPF nightly of `ebpf/rust-toolchain.toml` with rust-src;
//! 3. bpf-linker built against that nightly's own LLVM (its release, with that LLVM's static
//!    libraries; see [`ensure_bpf_linker`]) in `.tools/`,
//!    with a stamp recording the version and nightly, so bumping either rebuilds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use wsplice_ebpf_build::{
    bpf_linker, command_line, ebpf_nightly, nested_tool, run_command, userspace_toolchain,
    TOOLS_DIR,
};

/// The bpf-linker release built for the eBPF nightly.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs the pinned toolchains and bpf-linker; fast when everything is there. Afterwards
/// every child process (cargo, rustc, the tests) runs with the pinned userspace toolchain.
pub fn setup(root: &Path) -> anyhow::Result<()> {
    let userspace = userspace_toolchain(root)?;
    let nightly = ebpf_nightly(root)?;
    ensure_toolchain(&userspace, &["rustfmt", "clippy"])?;
    ensure_toolchain(&nightly, &["rust-src"])?;
    ensure_bpf_linker(root, &nightly)?;
    // The one place the pinned toolchain is chosen for what xtask runs: rustup's proxies
    // (`cargo`, `rustc`) honour RUSTUP_TOOLCHAIN over any file, and xtask, built by whatever
    // stable Rust the machine has, is still single-threaded here. Nested eBPF builds remove it
    // again (`nested_tool`).
    std::env::set_var("RUSTUP_TOOLCHAIN", &userspace);
    Ok(())
}

/// The Python `websockets` release the tests' virtual environment pins.
const PYTHON_WEBSOCKETS: &str = "15.0.1";

/// Every package the tests' virtual environment pins (name, version): the
/// `websockets` client, `requests` for plain HTTP, a Socket.IO server and client
/// (`python-socketio` on `aiohttp`, with the `python-engineio` it speaks through), and
/// `kubernetes-validate` (the Kubernetes API schemas, bundled: it validates
/// deploy/kubernetes/ offline) with the `PyYAML` it reads manifests with, which the test uses too.
const PYTHON_PACKAGES: [(&str, &str); 7] = [
    ("websockets", PYTHON_WEBSOCKETS),
    ("requests", "2.34.2"),
    ("aiohttp", "3.14.5"),
    ("python-socketio", "5.18.1"),
    ("python-engineio", "4.15.1"),
    ("kubernetes-validate", "1.37.0"),
    ("PyYAML", "6.0.4"),
];

/// Where the tests' Python virtual environment lives (git-ignored, under [`TOOLS_DIR`]). The test
/// harness runs `bin/python` from here (`wsplice_tests::python`).
const PYTHON_VENV: &str = "python";

/// The clients the end-to-end tests drive besides the Rust ones: `openssl s_client`, `curl` and HAProxy
/// (Debian packages when missing) and the pinned Python packages in a project-local virtual
/// environment, so whichever `python3` comes first on PATH (a pyenv shim, say) does not matter.
pub fn ensure_test_clients(root: &Path) -> anyhow::Result<()> {
    for (program, package) in [("openssl", "openssl"), ("curl", "curl")] {
        if !probe(program, &["--version"]) && !probe(program, &["version"]) {
            apt_install(&[package])
                .with_context(|| format!("the end-to-end tests need {program}"))?;
            if !probe(program, &["--version"]) && !probe(program, &["version"]) {
                bail!("{program} still missing after apt-get install {package}");
            }
        }
    }
    // The cluster test runs HAProxy in front of two wsplice hosts in network namespaces.
    if !Path::new(HAPROXY).is_file() {
        apt_install(&["haproxy", "iproute2"]).context("the cluster test needs haproxy")?;
        if !Path::new(HAPROXY).is_file() {
            bail!("{HAPROXY} still missing after apt-get install haproxy");
        }
    }
    ensure_promtool(root)?;
    ensure_node_ws(root)?;
    ensure_python_venv(root)
}

/// Where Debian's haproxy package puts the binary (the cluster test runs it from there).
const HAPROXY: &str = "/usr/sbin/haproxy";

/// The Node `ws` release the tests run (it has no dependencies), and its npm integrity.
const NODE_WS_VERSION: &str = "8.23.0";
const NODE_WS_INTEGRITY: &str =
    "sha512-wCkmX8QMOrKjgO8HW2WyDbTSGeqkocxgDzS9iR79rEAexty6/2qzilx3Ag8Tqf9ykop3irLKle0MtVn5qjVnoQ==";
/// Where `node_modules/ws` is unpacked (git-ignored, under [`TOOLS_DIR`]); the tests set
/// `NODE_PATH` to its `node_modules` (`wsplice_tests::node_modules`).
const NODE_DIR: &str = "node";

/// Node.js (Debian's `nodejs` when missing) and the pinned `ws` package from the npm registry,
/// checked against its published integrity and unpacked without npm.
fn ensure_node_ws(root: &Path) -> anyhow::Result<()> {
    if !probe("node", &["--version"]) {
        apt_install(&["nodejs"]).context("the Node client tests need node")?;
        if !probe("node", &["--version"]) {
            bail!("node still missing after apt-get install nodejs");
        }
    }
    let ws = root.join(TOOLS_DIR).join(NODE_DIR).join("node_modules/ws");
    let manifest = std::fs::read_to_string(ws.join("package.json")).unwrap_or_default();
    if manifest.contains(&format!("\"version\": \"{NODE_WS_VERSION}\"")) {
        return Ok(());
    }
    println!(
        "==> fetching Node ws {NODE_WS_VERSION} from the npm registry into {}",
        ws.display()
    );
    let tarball = root.join(TOOLS_DIR).join(NODE_DIR).join("ws.tgz");
    std::fs::create_dir_all(tarball.parent().unwrap_or(root))?;
    let url = format!("https://registry.npmjs.org/ws/-/ws-{NODE_WS_VERSION}.tgz");
    run_command(
        Command::new("curl")
            .args(["-fsSL", "-o"])
            .arg(&tarball)
            .arg(&url),
    )
    .with_context(|| format!("cannot download {url}"))?;
    let digest = Command::new("sh")
        .arg("-c")
        .arg("openssl dgst -sha512 -binary \"$1\" | openssl base64 -A")
        .arg("sh")
        .arg(&tarball)
        .output()
        .context("cannot run openssl")?;
    let integrity = format!("sha512-{}", String::from_utf8_lossy(&digest.stdout).trim());
    if integrity != NODE_WS_INTEGRITY {
        bail!("{url} does not match its npm integrity ({integrity})");
    }
    if ws.exists() {
        std::fs::remove_dir_all(&ws)?;
    }
    std::fs::create_dir_all(&ws)?;
    // npm tarballs hold the package under `package/`.
    run_command(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&ws)
            .arg("--strip-components=1"),
    )
    .context("cannot unpack the ws tarball")?;
    std::fs::remove_file(&tarball)?;
    Ok(())
}

/// Where `promtool` is unpacked (git-ignored, under [`TOOLS_DIR`]); the tests run
/// `usr/bin/promtool` from here (`wsplice_tests::promtool`).
const PROMETHEUS_DIR: &str = "prometheus";

/// `promtool` (Debian's `prometheus` package), to validate `/metrics` as Prometheus reads it.
/// The package is unpacked into `.tools/`, not installed: installing it would start a
/// Prometheus server on the machine.
fn ensure_promtool(root: &Path) -> anyhow::Result<()> {
    let dir = root.join(TOOLS_DIR).join(PROMETHEUS_DIR);
    let promtool = dir.join("usr/bin/promtool");
    if probe(&promtool, &["--version"]) {
        return Ok(());
    }
    println!(
        "==> unpacking promtool from Debian's prometheus package into {}",
        dir.display()
    );
    let download = dir.join("download");
    std::fs::create_dir_all(&download)?;
    let fetch = |update_first: bool| -> anyhow::Result<bool> {
        if update_first {
            Command::new("apt-get")
                .arg("update")
                .status()
                .context("cannot run apt-get")?;
        }
        Ok(Command::new("apt-get")
            .args(["download", "prometheus"])
            .current_dir(&download)
            .status()
            .context("cannot run apt-get")?
            .success())
    };
    // The package lists may be missing on a fresh machine: refresh them once if needed.
    if !fetch(false)? && !fetch(true)? {
        bail!("apt-get download prometheus failed: the metrics test needs promtool");
    }
    for entry in std::fs::read_dir(&download)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            let unpacked = Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&dir)
                .status()
                .context("cannot run dpkg-deb")?;
            if !unpacked.success() {
                bail!("dpkg-deb -x {} failed", deb.display());
            }
        }
    }
    std::fs::remove_dir_all(&download)?;
    if !probe(&promtool, &["--version"]) {
        bail!(
            "promtool missing from Debian's prometheus package at {}",
            promtool.display()
        );
    }
    Ok(())
}

/// A Python check that exits 0 when every pinned package is installed at its version.
fn venv_check() -> String {
    let pins: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|(name, version)| format!("('{name}', '{version}')"))
        .collect();
    format!(
        "import sys\nfrom importlib.metadata import version\n\
         try:\n    ok = all(version(n) == v for n, v in [{}])\n\
         except Exception:\n    ok = False\nsys.exit(0 if ok else 1)\n",
        pins.join(", ")
    )
}

/// `.tools/python` with the pinned packages, created from a Python that can make virtual
/// environments (Debian's own first, then the one on PATH; `python3-venv` installed if neither).
fn ensure_python_venv(root: &Path) -> anyhow::Result<()> {
    let venv = root.join(TOOLS_DIR).join(PYTHON_VENV);
    let python = venv.join("bin/python");
    let check = venv_check();
    if probe(&python, &["-c", &check]) {
        return Ok(());
    }
    let base = match venv_capable_python() {
        Some(base) => base,
        None => {
            apt_install(&["python3", "python3-venv"])
                .context("the Python client tests need python3 with the venv module")?;
            venv_capable_python().context(
                "no python3 can create a virtual environment even after apt-get install \
                 python3-venv; install python3 with venv and ensurepip, then run again",
            )?
        }
    };
    println!("==> creating {} from {base}", venv.display());
    run_command(
        Command::new(&base)
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .context("python3 -m venv failed")?;
    let pins: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    run_command(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(&pins),
    )
    .with_context(|| {
        format!(
            "pip could not install {} from PyPI (is it reachable?)",
            pins.join(" ")
        )
    })?;
    if !probe(&python, &["-c", &check]) {
        bail!(
            "{} still lacks one of {} after pip install",
            python.display(),
            pins.join(" ")
        );
    }
    Ok(())
}

/// The first of Debian's `/usr/bin/python3` and the `python3` on PATH that has `venv` and
/// `ensurepip` (Debian splits them into `python3-venv`).
fn venv_capable_python() -> Option<String> {
    ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|python| probe(python, &["-c", "import venv, ensurepip"]))
        .map(str::to_owned)
}

/// Whether `program args` runs and succeeds.
fn probe(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> bool {
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
