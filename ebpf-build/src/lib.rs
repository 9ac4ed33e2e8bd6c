//! The one way to build the eBPF crate, shared by `cargo xtask build-ebpf`, `cargo xtask setup`
//! and `proxy/build.rs`, so all of them run the same commands. Standard library only: it is a
//! build dependency.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// Where `cargo xtask setup` puts the tools the eBPF build needs, under the repository root.
pub const TOOLS_DIR: &str = ".tools";

/// Variables an outer cargo, rustup or build-script run sets that would steer a nested build
/// (toolchain, compiler, flags, output folders). `CARGO_*` ones are handled by prefix.
const OUTER_BUILD_ENV: [&str; 16] = [
    "RUSTUP_TOOLCHAIN",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_LINKER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
    "MAKEFLAGS",
];

/// `CARGO_*` settings that describe the machine or the user, not the outer build: the nested
/// cargo keeps them (registry access, proxies, terminal, job count).
const KEPT_CARGO_ENV_PREFIXES: [&str; 7] = [
    "CARGO_HOME",
    "CARGO_NET_",
    "CARGO_HTTP_",
    "CARGO_REGISTRIES_",
    "CARGO_REGISTRY_",
    "CARGO_TERM_",
    "CARGO_BUILD_JOBS",
];

/// Why the eBPF build (or finding what it needs) failed. Each message says what to try.
#[derive(Debug)]
pub enum EbpfBuildError {
    /// A toolchain file could not be read.
    ToolchainFile {
        /// The file.
        file: PathBuf,
        /// Why reading failed.
        error: std::io::Error,
    },
    /// A toolchain file names no channel.
    NoChannel(PathBuf),
    /// bpf-linker is not installed in `.tools/`.
    LinkerMissing {
        /// Where it was expected.
        linker: PathBuf,
        /// The nightly it must be built for.
        nightly: String,
    },
    /// A command could not be started.
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        error: std::io::Error,
    },
    /// A command ran and failed.
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// The build succeeded but the object is not where it should be.
    NoObject(PathBuf),
}

impl fmt::Display for EbpfBuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EbpfBuildError::ToolchainFile { file, error } => {
                write!(f, "cannot read {}: {error}", file.display())
            }
            EbpfBuildError::NoChannel(file) => {
                write!(f, "{} has no `channel = \"...\"` line", file.display())
            }
            EbpfBuildError::LinkerMissing { linker, nightly } => write!(
                f,
                "{} is missing: run `cargo xtask setup` (it builds bpf-linker for {nightly}), or \
                 set WSPLICE_EBPF_OBJECT to a prebuilt eBPF object",
                linker.display()
            ),
            EbpfBuildError::Spawn { command, error } => {
                write!(
                    f,
                    "cannot run `{command}`: {error} (are rustup and cargo on PATH?)"
                )
            }
            EbpfBuildError::Failed { command, status } => write!(
                f,
                "`{command}` failed ({status}); its output is above. If the toolchain or \
                 bpf-linker is the problem, `cargo xtask setup` reinstalls them"
            ),
            EbpfBuildError::NoObject(object) => write!(
                f,
                "the eBPF build succeeded but produced no {}",
                object.display()
            ),
        }
    }
}

impl std::error::Error for EbpfBuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            EbpfBuildError::ToolchainFile { error, .. } | EbpfBuildError::Spawn { error, .. } => {
                Some(error)
            }
            _ => None,
        }
    }
}

/// The userspace toolchain pinned in `toolchain.toml` (not a `rust-toolchain.toml`, so that the
/// first `cargo` call on a fresh machine does not need it; `cargo xtask` installs it).
pub fn userspace_toolchain(root: &Path) -> Result<String, EbpfBuildError> {
    toolchain_channel(&root.join("toolchain.toml"))
}

/// The nightly channel pinned in `ebpf/rust-toolchain.toml`.
pub fn ebpf_nightly(root: &Path) -> Result<String, EbpfBuildError> {
    toolchain_channel(&root.join("ebpf/rust-toolchain.toml"))
}

/// The `channel` of a toolchain file (`rust-toolchain.toml` format).
pub fn toolchain_channel(file: &Path) -> Result<String, EbpfBuildError> {
    let text = std::fs::read_to_string(file).map_err(|error| EbpfBuildError::ToolchainFile {
        file: file.to_owned(),
        error,
    })?;
    parse_channel(&text).ok_or_else(|| EbpfBuildError::NoChannel(file.to_owned()))
}

/// The value of the first `channel = "..."` line.
fn parse_channel(toml: &str) -> Option<String> {
    toml.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .find(|channel| !channel.is_empty())
}

/// The bpf-linker binary installed by `cargo xtask setup`.
pub fn bpf_linker(root: &Path) -> PathBuf {
    root.join(TOOLS_DIR).join("bin/bpf-linker")
}

/// `rustup run CHANNEL PROGRAM` with the outer build's environment removed, so the nested
/// tool is the one of `CHANNEL` with its own settings, whoever runs us (cargo run, a build
/// script, a shell).
pub fn nested_tool(channel: &str, program: &str) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", channel, program]);
    for (name, _) in std::env::vars_os() {
        if is_outer_build_env(&name) {
            command.env_remove(name);
        }
    }
    command
}

/// Whether `name` is set by an outer cargo/rustup/build script and must not leak into a
/// nested build.
fn is_outer_build_env(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if OUTER_BUILD_ENV.contains(&name) || name.starts_with("__CARGO") {
        return true;
    }
    name.starts_with("CARGO")
        && !KEPT_CARGO_ENV_PREFIXES
            .iter()
            .any(|kept| name.starts_with(kept))
}

/// Runs `command`, mapping a failure to start or a non-zero exit to an error naming it.
pub fn run_command(command: &mut Command) -> Result<(), EbpfBuildError> {
    let line = command_line(command);
    let status = command.status().map_err(|error| EbpfBuildError::Spawn {
        command: line.clone(),
        error,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(EbpfBuildError::Failed {
            command: line,
            status,
        })
    }
}

/// The command as a shell-like line, for messages.
pub fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds `ebpf/` in release mode (target dir `ebpf/target`) and returns the object's path.
pub fn build_ebpf(root: &Path) -> Result<PathBuf, EbpfBuildError> {
    let nightly = ebpf_nightly(root)?;
    let linker = bpf_linker(root);
    if !linker.is_file() {
        return Err(EbpfBuildError::LinkerMissing { linker, nightly });
    }
    let target_dir = root.join("ebpf/target");
    let mut command = nested_tool(&nightly, "cargo");
    command
        .args(["build", "--release"])
        .current_dir(root.join("ebpf"))
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env("CARGO_TARGET_DIR", &target_dir);
    run_command(&mut command)?;
    let object = target_dir.join("bpfel-unknown-none/release/wsplice-ebpf");
    if !object.is_file() {
        return Err(EbpfBuildError::NoObject(object));
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_is_read_from_the_toolchain_table() {
        let toml = "# comment\n[toolchain]\nchannel = \"nightly-2026-10-29\"\ncomponents = [\"rust-src\"]\n";
        assert_eq!(parse_channel(toml).as_deref(), Some("nightly-2026-10-29"));
        assert_eq!(parse_channel("[toolchain]\nprofile = \"minimal\"\n"), None);
    }

    #[test]
    fn the_pinned_files_name_their_channels() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask sits in the repository root");
        let nightly = ebpf_nightly(root).expect("ebpf/rust-toolchain.toml");
        assert!(nightly.starts_with("nightly-"), "{nightly}");
        let userspace = userspace_toolchain(root).expect("toolchain.toml");
        assert!(
            userspace.split('.').all(|part| part.parse::<u32>().is_ok()),
            "the userspace toolchain is a release number: {userspace}"
        );
        assert!(
            !root.join("rust-toolchain.toml").exists(),
            "a root rust-toolchain.toml would make the first cargo call need the pinned toolchain"
        );
    }

    #[test]
    fn outer_build_environment_is_scrubbed_and_user_settings_kept() {
        for leaked in [
            "RUSTUP_TOOLCHAIN",
            "RUSTC",
            "RUSTC_WRAPPER",
            "CARGO",
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_CFG_TARGET_OS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "CARGO_MAKEFLAGS",
            "__CARGO_FIX_PLZ",
            "OUT_DIR",
        ] {
            assert!(is_outer_build_env(OsStr::new(leaked)), "{leaked} leaks");
        }
        for kept in [
            "CARGO_HOME",
            "CARGO_NET_OFFLINE",
            "CARGO_HTTP_CAINFO",
            "CARGO_REGISTRIES_CRATES_IO_PROTOCOL",
            "CARGO_BUILD_JOBS",
            "RUSTUP_HOME",
            "PATH",
            "HOME",
        ] {
            assert!(!is_outer_build_env(OsStr::new(kept)), "{kept} was dropped");
        }
    }

    #[test]
    fn nested_tool_names_the_channel() {
        let command = nested_tool("nightly-2026-10-29", "cargo");
        assert_eq!(
            command_line(&command),
            "rustup run nightly-2026-10-29 cargo"
        );
    }
}
