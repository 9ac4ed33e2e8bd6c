//! The `wsplice` command line: `run`, `reload`, `upgrade`, `check`, `echo`, `import`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use wsplice::config::{Config, Splicing};
use wsplice::splice::SpliceProgram;

/// `wsplice --version`: the release, the git revision and whether the eBPF object is in.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("WSPLICE_GIT_REVISION"),
    "; eBPF object: ",
    env!("WSPLICE_EBPF_KIND"),
    ")"
);

/// WebSocket edge proxy: io_uring front end, kernel splice for plain tunnels.
#[derive(Debug, Parser)]
#[command(name = "wsplice", version = VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Data path for plain ws:// tunnels.
        #[arg(long, value_enum, default_value_t = DataPath::Auto)]
        datapath: DataPath,
        /// Worker threads (default: `workers` from the config, else one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Fault injection for the end-to-end tests, hidden from `--help`: each worker panics
        /// when it accepts its N-th connection (tests/tests/panic.rs checks that the process
        /// then aborts). A hidden flag rather than an environment variable: a variable is
        /// inherited silently (a shell profile, a unit's EnvironmentFile, a parent test run)
        /// and shows nowhere, while a flag has to be typed on purpose and shows in `ps` and
        /// in the unit's ExecStart. It costs one branch per accepted connection.
        #[arg(long, hide = true, value_name = "N")]
        test_panic_after_accepts: Option<std::num::NonZeroU64>,
    },
    /// Ask the running proxy to read its configuration file again (as SIGHUP does), through
    /// the admin listener the file names; the file is checked first, and the answer says
    /// whether it was applied.
    Reload {
        /// Configuration file (TOML): the one the proxy runs with.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Replace the running proxy with the binary now installed at its path, without dropping
    /// a connection (as SIGUSR2 does), through the admin listener the file names: the running
    /// process starts its successor and hands it its listeners and open tunnels; the answer
    /// names the successor's process id.
    Upgrade {
        /// Configuration file (TOML): the one the proxy runs with.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration file; errors name the line and column.
    Check {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Run a WebSocket echo upstream (for demos and tests).
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: SocketAddr,
        /// Append one JSON line per handshake (path and request headers) to this file.
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Small per-connection buffers (4 KiB instead of 128 KiB): for holding very many idle
        /// tunnels in benchmarks.
        #[arg(long)]
        small_buffers: bool,
    },
    /// Print the wsplice configuration equivalent to an nginx one; what does not carry over
    /// is reported on stderr, one line per directive.
    Import {
        /// The nginx configuration (its `include`s are followed).
        file: PathBuf,
    },
}

/// Which data path moves the bytes of plain tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DataPath {
    /// The kernel path when the eBPF program loads, else userspace: tunnels start on the
    /// userspace relay and are promoted once they have earned it (`[kernel]` in the config).
    Auto,
    /// The sockmap eBPF program for every plain tunnel right after the 101 (fails to start if
    /// the program cannot be loaded).
    Kernel,
    /// The io_uring userspace relay.
    Userspace,
    /// The packet splice: each plain tunnel starts on the userspace relay and, at its first
    /// quiet moment, is handed to a tc program that rewrites its packets into each other; the
    /// proxy then keeps no socket for it (`[packet]` in the config; fails to start if the
    /// program cannot be loaded). Tunnels it cannot take stay on the userspace relay.
    Packet,
}

fn main() -> ExitCode {
    init_logging();
    abort_on_panic();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "wsplice: {}",
                wsplice::error_chain::describe(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            datapath,
            workers,
            test_panic_after_accepts,
        } => {
            // A successor (binary upgrade) first takes what its predecessor hands it.
            let mut inherited = wsplice::upgrade::Inherited::from_environment()
                .context("upgrade: cannot take over from the predecessor")?;
            if let Some(inherited) = &inherited {
                tracing::info!(
                    predecessor = inherited.predecessor,
                    listening_sockets = inherited.listeners.len(),
                    "upgrade: starting as the successor"
                );
            }
            let path = config;
            let mut config = Config::load(&path)?;
            // Looked up before anything is loaded or bound: an unknown user stops the start.
            let identity = config
                .run_as
                .as_ref()
                .map(wsplice::privileges::resolve)
                .transpose()?;
            if datapath == DataPath::Kernel {
                // Tests and benchmarks measure the kernel path itself: no userspace prelude.
                config.splicing = Splicing::AtOnce;
            }
            let workers = workers
                .or(config.workers)
                .unwrap_or_else(|| {
                    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                    cpus.min(wsplice::tag::MAX_WORKERS)
                })
                .max(1);
            raise_fd_limit();
            let kernel = inherited
                .as_mut()
                .and_then(|inherited| inherited.kernel.take());
            let (splice, adopted) = choose_datapath(datapath, config.limits.max_tunnels, kernel)?;
            if let Some(inherited) = inherited.as_mut() {
                inherited.kernel_adopted = adopted;
            }
            log_settings(&config, workers, splice.is_some());
            let options = wsplice::runtime::ServeOptions {
                identity,
                panic_after_accepts: test_panic_after_accepts,
                reload: Some(wsplice::runtime::ReloadSource {
                    path,
                    splice_at_once: datapath == DataPath::Kernel,
                }),
                packet: match datapath {
                    DataPath::Packet => Some(load_packet_path(&config)?),
                    _ => None,
                },
                launch: wsplice::upgrade::Launch::of_this_process()
                    .inspect_err(|error| {
                        tracing::warn!(%error, "cannot tell this binary's path: upgrades are refused")
                    })
                    .ok(),
            };
            wsplice::runtime::serve(&config, workers, splice, &options, inherited)
                .context("proxy stopped with an error")
        }
        Command::Upgrade { config: file } => {
            let config = Config::load(&file)?;
            ask_admin(&file, &config, "SIGUSR2", wsplice::admin::request_upgrade)
        }
        Command::Reload { config: file } => {
            let config = Config::load(&file)?;
            wsplice::runtime::tls_configs(&config)
                .with_context(|| format!("{}", file.display()))?;
            ask_admin(&file, &config, "SIGHUP", wsplice::admin::request_reload)
        }
        Command::Check { file } => {
            let config = Config::load(&file)?;
            // Certificates and keys are read and matched, as `run` would.
            wsplice::runtime::tls_configs(&config)
                .with_context(|| format!("{}", file.display()))?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Echo {
            listen,
            record,
            small_buffers,
        } => {
            wsplice::echo::run(wsplice::echo::EchoOptions {
                listen,
                record,
                small_buffers,
            })?;
            Ok(())
        }
        Command::Import { file } => match wsplice::import::import(&file) {
            Ok(imported) => {
                for warning in &imported.warnings {
                    eprintln!("{warning}");
                }
                print!("{}", imported.toml);
                Ok(())
            }
            Err(error) => {
                if let wsplice::import::ImportError::NothingProxied { warnings, .. } = &error {
                    for warning in warnings {
                        eprintln!("{warning}");
                    }
                }
                Err(error.into())
            }
        },
    }
}

/// `wsplice reload` and `wsplice upgrade`: asks the running proxy through the admin listener
/// `config` names (`signal` does the same without one), prints its answer, fails on a refusal.
fn ask_admin(
    file: &std::path::Path,
    config: &Config,
    signal: &str,
    request: fn(SocketAddr) -> std::io::Result<(u16, String)>,
) -> anyhow::Result<()> {
    let admin = config.admin.as_ref().with_context(|| {
        format!(
            "{}: no [admin] listener to ask; send {signal} to the process instead",
            file.display()
        )
    })?;
    let (status, answer) = request(admin.bind)
        .with_context(|| format!("cannot reach the admin listener at {}", admin.bind))?;
    if status != 200 {
        anyhow::bail!("{answer}");
    }
    println!("{answer}");
    Ok(())
}

/// Loads the sockmap program when the data path asks for it (`auto`: if it loads). A
/// successor adopts its predecessor's maps instead when both carry the same eBPF object (the
/// second value says so): the spliced tunnels in them can then move.
fn choose_datapath(
    datapath: DataPath,
    max_tunnels: usize,
    inherited: Option<wsplice::upgrade::KernelMaps>,
) -> anyhow::Result<(Option<SpliceProgram>, bool)> {
    // Two sockets per tunnel in the maps.
    let max_sockets = u32::try_from(max_tunnels.saturating_mul(2)).unwrap_or(u32::MAX);
    if matches!(datapath, DataPath::Userspace | DataPath::Packet) {
        tracing::info!(?datapath, "data path: no sockmap program (asked for)");
        return Ok((None, false));
    }
    if let Some(maps) = inherited {
        if maps.object == wsplice::splice::object_hash() && wsplice::splice::ebpf_object_built() {
            match SpliceProgram::adopt(maps.fds) {
                Ok(program) => {
                    tracing::info!("data path: kernel splice (the predecessor's program and maps)");
                    return Ok((Some(program), true));
                }
                Err(error) => tracing::warn!(
                    %error,
                    "upgrade: cannot adopt the predecessor's maps; loading this binary's program"
                ),
            }
        } else {
            tracing::info!(
                "upgrade: this binary's eBPF program differs from the predecessor's: its spliced \
                 tunnels stay with it until they end or its drain does"
            );
        }
    }
    match datapath {
        DataPath::Userspace | DataPath::Packet => Ok((None, false)),
        DataPath::Kernel => {
            let program = SpliceProgram::load(max_sockets)
                .context("--datapath kernel: cannot load the sockmap program")?;
            tracing::info!(max_sockets, "data path: kernel splice (asked for)");
            Ok((Some(program), false))
        }
        DataPath::Auto => match SpliceProgram::load(max_sockets) {
            Ok(program) => {
                tracing::info!(
                    max_sockets,
                    "data path: kernel splice (auto: the program loaded)"
                );
                Ok((Some(program), false))
            }
            Err(error) => {
                tracing::warn!(%error, "data path: userspace relay (auto: the program did not load)");
                Ok((None, false))
            }
        },
    }
}

/// `--datapath packet`: reserves the upstream ports, loads the tc program and attaches it to
/// the configured interfaces (default: every interface that is up).
fn load_packet_path(config: &Config) -> anyhow::Result<wsplice::splice::packet::SharedPacketPath> {
    use wsplice::splice::packet::{ports, program::PacketProgram, PacketPath};
    let settings = &config.packet;
    let interfaces = if settings.interfaces.is_empty() {
        interfaces_up().context("--datapath packet: cannot list the network interfaces")?
    } else {
        settings.interfaces.clone()
    };
    let reserved = ports::reserve(settings.ports).with_context(|| {
        format!(
            "--datapath packet: cannot reserve the ports {} (net.ipv4.ip_local_reserved_ports)",
            settings.ports
        )
    })?;
    if reserved.changed {
        tracing::info!(ports = %settings.ports, previous = %reserved.previous,
            "packet splice: reserved the upstream ports from the ephemeral range");
    }
    let max_tunnels = u32::try_from(config.limits.max_tunnels).unwrap_or(u32::MAX);
    let program = PacketProgram::load(max_tunnels, &interfaces, settings.pin.as_deref())
        .context("--datapath packet: cannot load the packet splice program")?;
    tracing::info!(?interfaces, ports = %settings.ports, "data path: packet splice (asked for)");
    let adopted = program.tunnels();
    if !adopted.is_empty() {
        tracing::info!(
            tunnels = adopted.len(),
            "packet splice: adopting the pinned tunnels of a previous process"
        );
    }
    Ok(std::sync::Arc::new(PacketPath {
        program,
        ports: ports::SharedPorts::new(settings.ports),
        linger_ns: u64::try_from(settings.linger.as_nanos()).unwrap_or(u64::MAX),
        pinned: settings.pin.is_some(),
        adopted: std::sync::Mutex::new(adopted),
    }))
}

/// The names of the interfaces that are up (`IFF_UP` in `/sys/class/net/NAME/flags`).
fn interfaces_up() -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/sys/class/net")? {
        let entry = entry?;
        let flags = std::fs::read_to_string(entry.path().join("flags")).unwrap_or_default();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap_or(0);
        if flags & libc::IFF_UP as u32 != 0 {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// One line that says what is in effect: data paths, workers, limits.
fn log_settings(config: &Config, workers: usize, kernel: bool) {
    let plain_tunnels = match (kernel, config.splicing) {
        (false, _) => "userspace relay".to_owned(),
        (true, Splicing::AtOnce) => "kernel splice from the 101".to_owned(),
        (true, Splicing::Promote { after, after_bytes }) => format!(
            "userspace relay, promoted to the kernel after {} ms or {after_bytes} bytes",
            after.as_millis()
        ),
    };
    let limits = &config.limits;
    tracing::info!(
        version = VERSION,
        workers,
        plain_tunnels,
        tls_tunnels = "userspace relay",
        max_tunnels = limits.max_tunnels,
        kernel_backlog = limits.kernel_backlog,
        kernel_backlog_total = limits.kernel_backlog_total,
        max_connections = ?limits.max_connections,
        max_connections_per_ip = ?limits.max_connections_per_ip,
        trusted_proxies = config.trusted_proxies.len(),
        "wsplice starting"
    );
}

/// A panic anywhere is a bug, and the process cannot be trusted after it: a worker that
/// unwound would leave its connections' tunnels dead, their kernel map entries behind and its
/// ring's receives writing into buffers being freed, while `/healthz` still said ok. So the
/// panic is logged (thread, place, message) and the whole process aborts: the supervisor sees
/// SIGABRT and restarts it.
fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let location = info
            .location()
            .map_or_else(|| "unknown".to_owned(), ToString::to_string);
        let message = info.payload_as_str().unwrap_or("(not a string)");
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => backtrace.to_string(),
            _ => "set RUST_BACKTRACE=1 for one".to_owned(),
        };
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            %location,
            message,
            backtrace,
            "panic: a bug; aborting the whole process so that it is restarted"
        );
        std::process::abort();
    }));
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Each tunnel holds two descriptors: lift the soft RLIMIT_NOFILE to the hard limit.
fn raise_fd_limit() {
    let fds = wsplice::sys::raise_fd_limit();
    tracing::debug!(fds, "file descriptor limit");
}
