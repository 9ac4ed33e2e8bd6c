//! Harness for the end-to-end tests: the real `wsplice` binary (path in `WSPLICE_BIN`), real
//! sockets on 127.0.0.1, tokio-tungstenite clients, scripted upstreams.
//!
//! Every process a test starts is owned by a guard that kills it by PID on drop, so a failing
//! test leaks nothing. Every wait is bounded.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod bpf;
pub mod chaos;
pub mod churn;
pub mod cluster;
pub mod http;
pub mod line;
pub mod packet;
pub mod segment;
pub mod soak;
pub mod tls;

/// Largest message the test clients accept.
pub const MAX_MESSAGE: usize = 64 << 20;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// The data path a proxy runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// io_uring userspace relay.
    Userspace,
    /// sockmap eBPF splice from the 101 on.
    Kernel,
    /// The userspace relay first, the kernel once a tunnel is promoted (`[kernel]` keys).
    Auto,
}

impl DataPath {
    /// The `--datapath` value.
    pub fn flag(self) -> &'static str {
        match self {
            DataPath::Userspace => "userspace",
            DataPath::Kernel => "kernel",
            DataPath::Auto => "auto",
        }
    }
}

/// The data paths to test: `WSPLICE_DATAPATHS` (comma list), default userspace and kernel.
/// The kernel path needs root (loading eBPF): without it, it is left out with a message.
pub fn datapaths() -> Vec<DataPath> {
    datapaths_or("userspace,kernel")
}

/// [`datapaths`] with another default list (`auto`: promotion, which needs the program too).
pub fn datapaths_or(default: &str) -> Vec<DataPath> {
    let wanted = std::env::var("WSPLICE_DATAPATHS").unwrap_or_else(|_| default.into());
    wanted
        .split(',')
        .filter_map(|name| match name.trim() {
            "userspace" => Some(DataPath::Userspace),
            "kernel" if is_root() => Some(DataPath::Kernel),
            "auto" if is_root() => Some(DataPath::Auto),
            "kernel" | "auto" => {
                println!("skipped the {name} data path: loading eBPF needs root");
                None
            }
            _ => None,
        })
        .collect()
}

/// Whether this process runs as root (eBPF, `TCP_REPAIR` and raw sockets need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The wsplice binary under test.
pub fn binary() -> PathBuf {
    match std::env::var_os("WSPLICE_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/wsplice"),
    }
}

/// The Python with the `websockets` package the tests drive: the project's virtual environment
/// that `cargo xtask test` creates in `.tools/python` (whatever `python3` comes first on PATH),
/// or `python3` when the tests run without it.
pub fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/python/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// `promtool`, unpacked by `cargo xtask test` into `.tools/prometheus` (or one on PATH).
pub fn promtool() -> PathBuf {
    prometheus_tool("promtool")
}

/// The `node_modules` folder `cargo xtask test` puts the pinned Node `ws` package in (for
/// `NODE_PATH`).
pub fn node_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/node/node_modules")
}

/// The Prometheus server from the same package.
pub fn prometheus() -> PathBuf {
    prometheus_tool("prometheus")
}

fn prometheus_tool(name: &str) -> PathBuf {
    let unpacked = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.tools/prometheus/usr/bin")
        .join(name);
    if unpacked.is_file() {
        unpacked
    } else {
        PathBuf::from(name)
    }
}

/// Runs `command` for at most two minutes (then it is killed by PID); returns its stdout,
/// failing on a non-zero exit.
pub fn run_bounded(mut command: Command, what: &str) -> String {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {what} (`cargo xtask test` installs the clients): {e}")
        });
    // Drain both pipes while waiting, so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "{what} failed ({status:?}):\n{stdout}\n{stderr}"
    );
    stdout
}

/// A port free at the time of asking on 127.0.0.1, for a process the test starts.
///
/// Chosen at random below the ephemeral range (32768+, and 20000+ while `cargo xtask bench`
/// widens it): a port the kernel handed out for "port 0" could be taken by any of the thousands
/// of outgoing connections the tests make before the child binds it.
pub fn free_port() -> u16 {
    free_port_in(10_000..20_000)
}

/// A port of `range` free at the time of asking on 127.0.0.1 (below 1024: a privileged one).
pub fn free_port_in(range: std::ops::Range<u16>) -> u16 {
    for _ in 0..1000 {
        let port = rand::random_range(range.clone());
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {range:?} on 127.0.0.1");
}

/// A fresh scratch folder for one process's files.
pub fn scratch_dir(what: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "wsplice-test-{}-{what}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Waits until `addr` accepts TCP connections, or panics after [`WAIT`].
pub fn wait_for_port(addr: SocketAddr, child: &mut Child, what: &str, log: &Path) {
    if let Err(error) = try_wait_for_port(addr, child, what, log) {
        panic!("{error}");
    }
}

/// Waits until `addr` accepts TCP connections; the error says why not (early exit with the
/// child's log, or time-out).
pub fn try_wait_for_port(
    addr: SocketAddr,
    child: &mut Child,
    what: &str,
    log: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("{what} exited early with {status}:\n{log}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{what} did not listen on {addr} in time"))
}

/// A process the test owns, killed by PID when dropped.
#[derive(Debug)]
pub struct Process {
    owned: Owned,
}

/// How the test holds a [`Process`].
#[derive(Debug)]
enum Owned {
    /// The test started it: its own child, reaped through [`Child`].
    Child(Child),
    /// Started by another process (a proxy's successor), taken over by PID.
    Adopted(Adopted),
}

/// A process the test did not start, known by PID and start time (so a PID the kernel reuses
/// after it ended is never signalled).
#[derive(Debug)]
struct Adopted {
    pid: u32,
    /// `starttime` of `/proc/PID/stat` when adopted (clock ticks after boot).
    started: u64,
    /// Set once it is known to be gone: its status if this process reaped it.
    ended: Option<Option<ExitStatus>>,
}

/// What `/proc/PID/stat` says of a process.
#[derive(Debug, Clone, Copy)]
struct Stat {
    /// `R`, `S`, `Z` (a zombie), `X` (dead)...
    state: char,
    /// The parent's PID.
    parent: u32,
    /// Clock ticks after boot when it started (with the PID, names one process for good).
    started: u64,
}

impl Stat {
    /// Whether it runs (neither a zombie nor dead).
    fn running(self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

/// `/proc/PID/stat` of `pid`; `None` if there is no such process.
fn proc_stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after its end.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        parent: fields.get(1)?.parse().ok()?,
        started: fields.get(19)?.parse().ok()?,
    })
}

impl Adopted {
    /// Whether it still runs (not gone, not a zombie, not replaced by another process with its
    /// PID); reaps it when it ended as a child of this process (see [`become_subreaper`]).
    fn poll(&mut self) -> bool {
        if self.ended.is_some() {
            return false;
        }
        // The start time first: a PID the kernel gave to another process since is not waited for.
        let Some(stat) = proc_stat(self.pid).filter(|stat| stat.started == self.started) else {
            self.ended = Some(None);
            return false;
        };
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid on one PID with a pointer to a live c_int; WNOHANG never blocks. It
        // only reaps the process if it is this process's child, which makes it ours to reap.
        let reaped = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if reaped == self.pid as libc::pid_t {
            use std::os::unix::process::ExitStatusExt as _;
            self.ended = Some(Some(ExitStatus::from_raw(status)));
            return false;
        }
        if !stat.running() {
            // A zombie whose parent is not this process: ended, its status unknown here.
            self.ended = Some(None);
            return false;
        }
        true
    }

    /// Sends `signal` if it still runs.
    fn signal(&mut self, signal: libc::c_int) {
        if self.poll() {
            // SAFETY: kill(2) on the process adopted, checked above to be the same process.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// Polls until it is gone or `within` passes.
    fn wait_gone(&mut self, within: Duration) -> Option<Option<ExitStatus>> {
        let deadline = Instant::now() + within;
        loop {
            if !self.poll() {
                return self.ended;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Makes this (test) process the reaper of its orphaned descendants (`PR_SET_CHILD_SUBREAPER`):
/// a proxy's successor, whose parent (the old proxy) exits after the upgrade, then becomes this
/// process's child rather than init's, so the test can reap it and read its exit status. Call
/// it before the old process exits; calling it again does nothing more.
pub fn become_subreaper() {
    // SAFETY: prctl with an integer option and argument; no memory is passed.
    let result = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
    assert_eq!(
        result,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
}

impl Process {
    /// Starts `command` as a process the test owns (killed and reaped when dropped).
    pub fn spawn(command: &mut Command) -> std::io::Result<Process> {
        Ok(Process {
            owned: Owned::Child(command.spawn()?),
        })
    }

    /// Takes over the running process `pid`, which the test did not start (a proxy's
    /// successor): from now on it is killed by PID when the guard drops. Fails if there is no
    /// such process (or only its zombie).
    pub fn adopt(pid: u32) -> std::io::Result<Process> {
        match proc_stat(pid) {
            Some(stat) if stat.running() => Ok(Process {
                owned: Owned::Adopted(Adopted {
                    pid,
                    started: stat.started,
                    ended: None,
                }),
            }),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no running process {pid}"),
            )),
        }
    }

    /// The PID.
    pub fn pid(&self) -> u32 {
        match &self.owned {
            Owned::Child(child) => child.id(),
            Owned::Adopted(adopted) => adopted.pid,
        }
    }

    /// The child the test started (a process just spawned: never an adopted one).
    fn child(&mut self) -> &mut Child {
        match &mut self.owned {
            Owned::Child(child) => child,
            Owned::Adopted(adopted) => panic!("process {} was adopted, not started", adopted.pid),
        }
    }

    /// Waits at most `within` for the process to exit on its own; its status if it did. An
    /// adopted process that ended without this process reaping it has no status here: `None`
    /// as well (tell the cases apart with [`Process::wait_gone`]).
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        self.wait_gone(within).flatten()
    }

    /// Waits at most `within` for the process to end on its own (gone from `/proc`, or a
    /// zombie of another parent): `None` if it still runs, else `Some` of its exit status when
    /// it is known (always for a child; for an adopted process when it ended as this process's
    /// child, see [`become_subreaper`]).
    pub fn wait_gone(&mut self, within: Duration) -> Option<Option<ExitStatus>> {
        match &mut self.owned {
            Owned::Child(child) => {
                let deadline = Instant::now() + within;
                loop {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Some(Some(status));
                    }
                    if Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Owned::Adopted(adopted) => adopted.wait_gone(within),
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status (`None` also for an adopted process
    /// that ended with no status known here: see [`Process::terminate_gone`]).
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        self.terminate_gone(within).flatten()
    }

    /// SIGTERM, then wait at most `within` until it is gone: as [`Process::wait_gone`].
    pub fn terminate_gone(&mut self, within: Duration) -> Option<Option<ExitStatus>> {
        match &mut self.owned {
            Owned::Child(child) => {
                if let Ok(None) = child.try_wait() {
                    // SAFETY: kill(2) on our own child, not yet reaped (so its PID is still its).
                    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                }
            }
            Owned::Adopted(adopted) => adopted.signal(libc::SIGTERM),
        }
        self.wait_gone(within)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        match &mut self.owned {
            Owned::Child(child) => {
                if let Ok(None) = child.try_wait() {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
            Owned::Adopted(adopted) => {
                adopted.signal(libc::SIGKILL);
                // Bounded: a process stuck in the kernel must not hang the test run.
                let _ = adopted.wait_gone(Duration::from_secs(10));
            }
        }
    }
}

/// `[WRAPPER…] wsplice run -c config --datapath … EXTRA…` with its stderr (access lines
/// included) in `log`, logging what `filter` (`RUST_LOG`) lets through. It runs in the log's
/// folder, so a core dump (if the machine writes them) lands there.
fn spawn_run(
    config: &Path,
    datapath: DataPath,
    (wrapper, extra): (&[String], &[String]),
    log: &Path,
    filter: &str,
) -> Process {
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(binary());
            command
        }
        None => Command::new(binary()),
    };
    let child = command
        .current_dir(log.parent().unwrap_or(Path::new("/")))
        .args(["run", "-c"])
        .arg(config)
        .args(["--datapath", datapath.flag()])
        .args(extra)
        .env("RUST_LOG", filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary().display()));
    Process {
        owned: Owned::Child(child),
    }
}

/// Starts `wsplice run -c config` (a file the test wrote, e.g. from `wsplice import`) on
/// `datapath` and waits until every address of `listening` accepts connections. The process
/// is killed by PID when the returned guard drops; its stderr goes to the second value.
pub fn run_config_file(
    config: &Path,
    datapath: DataPath,
    listening: &[SocketAddr],
) -> (Process, PathBuf) {
    let log = scratch_dir("run").join("stderr.log");
    let mut process = spawn_run(config, datapath, (&[], &[]), &log, DEFAULT_LOG_FILTER);
    for addr in listening {
        wait_for_port(*addr, process.child(), "wsplice run", &log);
    }
    (process, log)
}

/// What a proxy under test logs unless told otherwise: everything at info, access lines
/// included.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// Settings of a proxy under test; `to_toml` writes the config.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Upstream servers of the default pool.
    pub servers: Vec<SocketAddr>,
    /// `timeouts.idle`.
    pub idle: &'static str,
    /// `timeouts.handshake`.
    pub handshake: &'static str,
    /// `timeouts.connect`.
    pub connect: &'static str,
    /// `timeouts.drain`.
    pub drain: &'static str,
    /// `upstream.default.fail_timeout`.
    pub fail_timeout: &'static str,
    /// Extra `[[route]]` keys (e.g. `path_prefix = "/x"`).
    pub route_extra: &'static str,
    /// `[limits]` body.
    pub limits: &'static str,
    /// `[kernel]` body (promotion thresholds for `--datapath auto`).
    pub kernel: &'static str,
    /// The `trusted_proxies` array's items (e.g. `"127.0.0.0/8"`), if any.
    pub trusted_proxies: &'static str,
    /// Worker threads.
    pub workers: usize,
    /// The listener's `tls` value (see [`tls::tls_table`]): the proxy serves `wss://`.
    pub tls: Option<String>,
    /// `timeouts.response` (waiting for an upstream's response head); `None`: the default.
    pub response: Option<&'static str>,
    /// `timeouts.keepalive` (a client idle between requests); `None`: the default.
    pub keepalive: Option<&'static str>,
    /// `timeouts.close_spread` (closes spread at the drain's end); `None`: the default.
    pub close_spread: Option<&'static str>,
    /// `timeouts.grace` (accepting on, unready, after SIGTERM); `None`: the default.
    pub grace: Option<&'static str>,
    /// `upstream.default.keepalive` (idle upstream connections kept per server and worker).
    pub upstream_keepalive: Option<usize>,
    /// `upstream.default.keepalive_timeout`.
    pub upstream_keepalive_timeout: Option<&'static str>,
    /// Top-level keys written before the tables (e.g. `user = "nobody"`).
    pub top_level: String,
    /// Arguments after `wsplice run -c FILE --datapath D`.
    pub extra_args: Vec<String>,
    /// A command the binary runs under (e.g. `setpriv …`; the binary's path is appended).
    pub wrapper: Vec<String>,
    /// The listener's port (default: a free one in 10000..20000).
    pub port: Option<u16>,
    /// `RUST_LOG` of the process ([`DEFAULT_LOG_FILTER`]; the churn leaves access lines out,
    /// a million of them would fill the log).
    pub log_filter: &'static str,
    /// Extra keys of the `[[listener]]` (e.g. `proxy_protocol = true`).
    pub listener_extra: String,
    /// The default pool's `servers` array items as written (e.g. `{ addr = "…", weight = 2 }`);
    /// `None`: `servers` quoted one by one.
    pub server_entries: Option<String>,
    /// Extra keys of `[upstream.default]` (e.g. `balance = "consistent_hash"`).
    pub upstream_extra: String,
    /// Tables written at the end (e.g. `[upstream.default.health_check]`, more pools).
    pub extra_tables: String,
}

impl ProxyConfig {
    /// Defaults in front of `servers`.
    pub fn new(servers: &[SocketAddr]) -> ProxyConfig {
        ProxyConfig {
            servers: servers.to_vec(),
            idle: "60s",
            handshake: "10s",
            connect: "2s",
            drain: "5s",
            fail_timeout: "0s",
            route_extra: "",
            limits: "",
            kernel: "",
            trusted_proxies: "",
            workers: 2,
            tls: None,
            response: None,
            keepalive: None,
            close_spread: None,
            grace: None,
            upstream_keepalive: None,
            upstream_keepalive_timeout: None,
            top_level: String::new(),
            extra_args: Vec::new(),
            wrapper: Vec::new(),
            port: None,
            log_filter: DEFAULT_LOG_FILTER,
            listener_extra: String::new(),
            server_entries: None,
            upstream_extra: String::new(),
            extra_tables: String::new(),
        }
    }

    fn to_toml(&self, listen: SocketAddr, admin: SocketAddr) -> String {
        let servers: Vec<String> = match &self.server_entries {
            Some(entries) => vec![entries.clone()],
            None => self.servers.iter().map(|s| format!("\"{s}\"")).collect(),
        };
        let tls = self
            .tls
            .as_ref()
            .map_or_else(String::new, |tls| format!("tls = {tls}\n"));
        let mut upstream_extra = self.upstream_extra.clone();
        if !upstream_extra.is_empty() {
            upstream_extra.push('\n');
        }
        if let Some(keepalive) = self.upstream_keepalive {
            upstream_extra.push_str(&format!("keepalive = {keepalive}\n"));
        }
        if let Some(timeout) = self.upstream_keepalive_timeout {
            upstream_extra.push_str(&format!("keepalive_timeout = \"{timeout}\"\n"));
        }
        let mut timeouts_extra = String::new();
        if let Some(response) = self.response {
            timeouts_extra.push_str(&format!("response = \"{response}\"\n"));
        }
        if let Some(keepalive) = self.keepalive {
            timeouts_extra.push_str(&format!("keepalive = \"{keepalive}\"\n"));
        }
        if let Some(spread) = self.close_spread {
            timeouts_extra.push_str(&format!("close_spread = \"{spread}\"\n"));
        }
        if let Some(grace) = self.grace {
            timeouts_extra.push_str(&format!("grace = \"{grace}\"\n"));
        }
        format!(
            "{}\nworkers = {}\ntrusted_proxies = [{}]\n\n[[listener]]\nbind = \"{listen}\"\n{tls}{}\n\n[[route]]\nupstream = \"default\"\n{}\n\n\
             [upstream.default]\nservers = [{}]\nfail_timeout = \"{}\"\n{upstream_extra}\n\
             [timeouts]\nidle = \"{}\"\nhandshake = \"{}\"\nconnect = \"{}\"\ndrain = \"{}\"\n{timeouts_extra}\n\
             [limits]\n{}\n\n[kernel]\n{}\n\n[admin]\nbind = \"{admin}\"\n\n{}\n",
            self.top_level,
            self.workers,
            self.trusted_proxies,
            self.listener_extra,
            self.route_extra,
            servers.join(", "),
            self.fail_timeout,
            self.idle,
            self.handshake,
            self.connect,
            self.drain,
            self.limits,
            self.kernel,
            self.extra_tables,
        )
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    process: Process,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    config_path: PathBuf,
    /// Processes it ran in before an upgrade that did not end when they should have (killed
    /// by PID when the proxy drops).
    retired: Vec<Process>,
    /// The data path it runs with.
    pub datapath: DataPath,
}

/// How long each step of a binary upgrade may take: the answer to `POST /upgrade` (the proxy
/// gives a successor 30 s to say it is ready before it answers that the upgrade failed), then
/// the old process handing over its tunnels and exiting.
pub const UPGRADE_WAIT: Duration = Duration::from_secs(45);

/// The PID in an upgrade's answer (`upgraded: successor pid PID`).
pub fn successor_pid(answer: &str) -> Option<u32> {
    let (_, rest) = answer.split_once("successor pid ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl Proxy {
    /// Starts a proxy with `config` on `datapath` and waits until it listens. A port taken
    /// between choosing and binding it (another test's process) is retried with new ports.
    pub fn start(datapath: DataPath, config: &ProxyConfig) -> Proxy {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Proxy::try_start(datapath, config) {
                Ok(proxy) => return proxy,
                Err(error) if attempt < 3 && error.contains("Address already in use") => continue,
                Err(error) => panic!("{error}"),
            }
        }
    }

    fn try_start(datapath: DataPath, config: &ProxyConfig) -> Result<Proxy, String> {
        let dir = scratch_dir("proxy");
        let port = config.port.unwrap_or_else(free_port);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let config_path = dir.join("wsplice.toml");
        std::fs::write(&config_path, config.to_toml(addr, admin)).expect("write config");
        let log = dir.join("stderr.log");
        let args = (&config.wrapper[..], &config.extra_args[..]);
        let mut process = spawn_run(&config_path, datapath, args, &log, config.log_filter);
        try_wait_for_port(addr, process.child(), "wsplice run", &log)?;
        try_wait_for_port(admin, process.child(), "wsplice admin", &log)?;
        let proxy = Proxy {
            process,
            addr,
            admin,
            log,
            config_path,
            retired: Vec::new(),
            datapath,
        };
        // The listeners are bound before the workers' rings exist: wait for every ring, so
        // descriptor counts taken from now on are stable.
        let rings = |proxy: &Proxy| {
            proxy
                .fd_targets()
                .iter()
                .filter(|target| target.contains("io_uring"))
                .count()
        };
        if !eventually(|| rings(&proxy) >= config.workers) {
            return Err(format!(
                "wsplice did not start its {} workers",
                config.workers
            ));
        }
        // One full admin exchange: the readiness probes' connections are closed after it.
        let _ = proxy.metrics();
        Ok(proxy)
    }

    /// The listener address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ws:// URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Where its admin listener (`/metrics`) is.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Open file descriptors of the proxy process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.pid()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }

    /// Resident memory of the proxy process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.process.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    /// What each open descriptor of the proxy points at (for failure messages).
    pub fn fd_targets(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.pid()))
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                    .map(|target| target.display().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rewrites the proxy's config file from `config` (same listener and admin addresses) and
    /// sends `SIGHUP`; true if the proxy logged that it reloaded, false if it refused.
    pub fn reload(&self, config: &ProxyConfig) -> bool {
        self.reload_text(&config.to_toml(self.addr, self.admin))
    }

    /// The config file it runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The config file text `config` gives this proxy (its listener and admin addresses).
    pub fn config_text(&self, config: &ProxyConfig) -> String {
        config.to_toml(self.addr, self.admin)
    }

    /// [`Proxy::reload`] with the file's whole text.
    pub fn reload_text(&self, text: &str) -> bool {
        let outcomes = |log: &str| {
            (
                log.matches("configuration reloaded").count(),
                log.matches("configuration reload refused").count(),
            )
        };
        let before = outcomes(&self.log());
        std::fs::write(&self.config_path, text).expect("rewrite the config");
        // SAFETY: kill only sends a signal to the proxy this test started.
        unsafe { libc::kill(self.process.pid() as i32, libc::SIGHUP) };
        let deadline = Instant::now() + WAIT;
        loop {
            let now = outcomes(&self.log());
            if now.0 > before.0 {
                // Each worker takes the new generation at its next wake-up, a tick (50 ms) at
                // the latest.
                std::thread::sleep(Duration::from_millis(150));
                return true;
            }
            if now.1 > before.1 || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A binary upgrade through the admin listener (`POST /upgrade`): on a 200 answer, waits
    /// (at most [`UPGRADE_WAIT`]) for the old process to exit and adopts the successor (see
    /// [`Proxy::adopt_successor`]); returns its PID. Any other answer: `Err` with its body, the
    /// proxy left as it was. Orphans are reaped by the test from now on ([`become_subreaper`]).
    pub fn upgrade(&mut self) -> Result<u32, String> {
        become_subreaper();
        let (status, body) = self.upgrade_status();
        if status != 200 {
            return Err(body);
        }
        let pid = successor_pid(&body)
            .ok_or_else(|| format!("no successor PID in the upgrade's answer: {body:?}"))?;
        self.adopt_successor(pid)
    }

    /// Sends `POST /upgrade` to the admin listener and reads the whole answer (at most
    /// [`UPGRADE_WAIT`]): its status (0 if none came) and body. The proxy is not adopted: see
    /// [`Proxy::upgrade`].
    pub fn upgrade_status(&self) -> (u16, String) {
        post_upgrade(self.admin)
    }

    /// After an upgrade answered with successor `pid` (`POST /upgrade`, `wsplice upgrade`,
    /// `SIGUSR2`): adopts the successor as this proxy's process, then waits (at most
    /// [`UPGRADE_WAIT`]) for the old process to exit; returns `pid`. `Err` if the successor
    /// does not run, or the old process did not exit, or exited with a failure (the successor is
    /// this proxy's process all the same, the old one is killed when the proxy drops). Call
    /// [`become_subreaper`] before the upgrade to reap the successors (and get their statuses).
    pub fn adopt_successor(&mut self, pid: u32) -> Result<u32, String> {
        let successor = Process::adopt(pid).map_err(|e| {
            format!(
                "the successor {pid} does not run: {e}\n{}",
                self.log_tail(50)
            )
        })?;
        let mut old = std::mem::replace(&mut self.process, successor);
        let old_pid = old.pid();
        match old.wait_gone(UPGRADE_WAIT) {
            Some(Some(status)) if !status.success() => Err(format!(
                "the old process {old_pid} exited with {status} after the upgrade:\n{}",
                self.log_tail(50)
            )),
            Some(_) => Ok(pid),
            None => {
                self.retired.push(old);
                Err(format!(
                    "the old process {old_pid} still runs {UPGRADE_WAIT:?} after the upgrade:\n{}",
                    self.log_tail(50)
                ))
            }
        }
    }

    /// A binary upgrade by `SIGUSR2`: waits (at most [`UPGRADE_WAIT`] in all) for the old
    /// process to exit, then adopts its successor (a process running `run` with this proxy's
    /// config file, now this test's child: see [`become_subreaper`]) as
    /// [`Proxy::adopt_successor`] does; returns its PID. `Err` with the log's end if the proxy
    /// logs `upgrade failed` (the old process then serves on, this proxy's process still), or
    /// the old process does not exit in time, or no successor is found.
    pub fn signal_upgrade(&mut self) -> Result<u32, String> {
        become_subreaper();
        let failures = |log: &str| log.matches("upgrade failed").count();
        let failed_before = failures(&self.log());
        let old = self.pid();
        // SAFETY: kill only sends a signal to the proxy this test started (or adopted).
        unsafe { libc::kill(old as libc::pid_t, libc::SIGUSR2) };
        let deadline = Instant::now() + UPGRADE_WAIT;
        loop {
            if failures(&self.log()) > failed_before {
                return Err(self.log_tail(50));
            }
            if self.process.wait_gone(Duration::ZERO).is_some() {
                return match self.find_successor(old) {
                    Some(pid) => self.adopt_successor(pid),
                    None => Err(format!(
                        "the old process {old} exited with no successor running:\n{}",
                        self.log_tail(50)
                    )),
                };
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the old process {old} still runs {UPGRADE_WAIT:?} after SIGUSR2:\n{}",
                    self.log_tail(50)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A running process other than `old` whose parent is `old` or this test and whose command
    /// line is `… run … FILE …` with this proxy's config file: `old`'s successor.
    fn find_successor(&self, old: u32) -> Option<u32> {
        let parents = [old, std::process::id()];
        let config = self.config_path.as_os_str().as_encoded_bytes();
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != old && self.retired.iter().all(|retired| retired.pid() != pid))
            .find(|&pid| {
                let parented = proc_stat(pid)
                    .is_some_and(|stat| stat.running() && parents.contains(&stat.parent));
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let mut args = cmdline.split(|&b| b == 0);
                parented && args.clone().any(|arg| arg == b"run") && args.any(|arg| arg == config)
            })
    }

    /// The last `lines` lines of the log (for failure messages: the whole log of a test with
    /// thousands of tunnels is mostly access lines).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Everything the proxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access lines (JSON) logged so far.
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter(|line| line.contains("wsplice::access"))
            .filter_map(|line| line.find('{').map(|start| &line[start..]))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect()
    }

    /// Waits until `count` access lines are logged; returns them.
    pub fn wait_access_lines(&self, count: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let lines = self.access_lines();
            if lines.len() >= count || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole answer (status line, headers, body) of the admin listener to `GET path`.
    pub fn admin_get(&self, path: &str) -> String {
        let mut stream = StdStream::connect(self.admin).expect("admin connect");
        use std::io::{Read, Write};
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .expect("admin write");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("admin read");
        text
    }

    /// The `/metrics` values by name (without the `wsplice_` prefix).
    pub fn metrics(&self) -> BTreeMap<String, u64> {
        self.admin_get("/metrics")
            .lines()
            .filter(|line| line.starts_with("wsplice_"))
            .filter_map(|line| {
                let (name, value) = line.split_once(' ')?;
                Some((
                    name.trim_start_matches("wsplice_").to_owned(),
                    value.parse().ok()?,
                ))
            })
            .collect()
    }
}

impl Drop for Proxy {
    /// Kills a successor the test never adopted (an upgrade that failed half-way, or a test
    /// that failed before adopting it) by PID too; the process and the retired ones are killed
    /// when their guards drop.
    fn drop(&mut self) {
        if let Some(pid) = self.find_successor(self.process.pid()) {
            // Adopting it and dropping the guard kills it by PID, bounded.
            drop(Process::adopt(pid));
        }
    }
}

/// One request to the admin listener at `admin` and the whole answer, read until the listener closes
/// the connection or `within` passes (an error, with what came so far).
fn admin_exchange(admin: SocketAddr, request: &[u8], within: Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + within;
    let mut stream = StdStream::connect_timeout(&admin, WAIT)
        .map_err(|e| format!("admin connect {}: {e}", admin))?;
    stream
        .write_all(request)
        .map_err(|e| format!("admin write: {e}"))?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete answer from the admin listener in {within:?}: {:?}",
                String::from_utf8_lossy(&answer)
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("admin read timeout: {e}"))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(String::from_utf8_lossy(&answer).into_owned()),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("admin read: {e}")),
        }
    }
}

/// `POST /upgrade` to the admin listener at `admin` (at most [`UPGRADE_WAIT`]): the answer's
/// status (0 if none came) and body.
pub fn post_upgrade(admin: SocketAddr) -> (u16, String) {
    admin_request(admin, "POST", "/upgrade", "", UPGRADE_WAIT)
}

/// `METHOD path` with `body` on the admin listener at `admin`, waiting at most `within` for
/// the whole answer: its status and body (status 0 and the reason when there is none).
pub fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    within: Duration,
) -> (u16, String) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = match admin_exchange(admin, request.as_bytes(), within) {
        Ok(answer) => answer,
        Err(error) => return (0, error),
    };
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(answer.as_str(), |(_, body)| body)
        .to_owned();
    (status, body)
}

/// Tunnels [`open_tunnels`] opens at once (the rest wait for the chunk before).
pub const CHUNK: usize = 100;

/// Lifts this process's soft limit on open files to the hard one (inherited by the processes
/// it starts from now on); fails the test if that leaves no room for `tunnels` client sockets.
pub fn raise_fd_limit(tunnels: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a pointer to a live rlimit.
    let lifted = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    assert!(
        lifted && limit.rlim_cur >= tunnels as libc::rlim_t + 512,
        "{tunnels} tunnels need more open files than the limit {} allows",
        limit.rlim_cur
    );
}

/// Opens `count` tunnels through `proxy` in chunks of [`CHUNK`], each on a path naming
/// `label` and its index.
pub async fn open_tunnels(proxy: &Proxy, label: &str, count: usize) -> Vec<Client> {
    let mut tunnels = Vec::with_capacity(count);
    for first in (0..count).step_by(CHUNK) {
        let chunk = first..count.min(first + CHUNK);
        let urls = chunk.map(|index| proxy.url(&format!("/{label}-{index}")));
        let opening = urls.map(|url| async move { connect(&url).await });
        tunnels.extend(futures_util::future::join_all(opening).await);
    }
    tunnels
}

/// Every tunnel echoes its next sequenced message (`"{index}:{round}"`), all sent first, then
/// every reply checked.
pub async fn echo_round(tunnels: &mut [Client], round: usize) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    for (index, ws) in tunnels.iter_mut().enumerate() {
        bounded(ws.send(Message::text(format!("{index}:{round}"))))
            .await
            .expect("send");
    }
    for (index, ws) in tunnels.iter_mut().enumerate() {
        let reply = bounded(ws.next()).await.expect("a reply").expect("a frame");
        assert_eq!(
            reply,
            Message::text(format!("{index}:{round}")),
            "tunnel {index}, round {round}: lost or reordered"
        );
    }
}

/// The values of every header named `name` (any case) in `headers`, in order.
pub fn header_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// One request head (handshake or plain request) the echo upstream recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Request target.
    pub path: String,
    /// Method (plain requests; empty in records without it).
    pub method: String,
    /// The echo's serial of the connection it came on (plain requests), if recorded.
    pub connection: Option<u64>,
    /// Headers in received order, original spelling.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The values of every header named `name` (any case), in received order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        header_values(&self.headers, name)
    }
}

/// A running `wsplice echo`.
#[derive(Debug)]
pub struct Echo {
    _process: Process,
    addr: SocketAddr,
    record: PathBuf,
}

impl Echo {
    /// Starts an echo upstream that records handshakes.
    pub fn start() -> Echo {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Echo::start_on(addr)
    }

    /// Starts an echo upstream on `addr` (a server coming back where a proxy expects it).
    pub fn start_on(addr: SocketAddr) -> Echo {
        Echo::spawn(addr, true)
    }

    /// Starts an echo upstream that records nothing (for a million handshakes).
    pub fn start_unrecorded() -> Echo {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        Echo::spawn(addr, false)
    }

    fn spawn(addr: SocketAddr, recorded: bool) -> Echo {
        let dir = scratch_dir("echo");
        let record = dir.join("record.jsonl");
        let log = dir.join("stderr.log");
        let mut command = Command::new(binary());
        command.args(["echo", "--listen", &addr.to_string()]);
        if recorded {
            command.arg("--record").arg(&record);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start wsplice echo");
        let mut process = Process {
            owned: Owned::Child(child),
        };
        wait_for_port(addr, process.child(), "wsplice echo", &log);
        Echo {
            _process: process,
            addr,
            record,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The handshakes recorded so far (the port probe of `start` made none: it sent no head).
    pub fn records(&self) -> Vec<Recorded> {
        records_in(&self.record)
    }
}

/// The request heads a `wsplice echo --record FILE` wrote to `file` so far.
pub fn records_in(file: &Path) -> Vec<Recorded> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|value| Recorded {
            path: value["path"].as_str().unwrap_or_default().to_owned(),
            method: value["method"].as_str().unwrap_or_default().to_owned(),
            connection: value["connection"].as_u64().or_else(|| {
                value["connection"]
                    .as_str()
                    .and_then(|text| text.parse().ok())
            }),
            headers: value["headers"]
                .as_array()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| {
                            (
                                h[0].as_str().unwrap_or_default().to_owned(),
                                h[1].as_str().unwrap_or_default().to_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

/// A WebSocket client connection.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// WebSocket settings allowing large messages.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// Connects a tokio-tungstenite client to `url`.
pub async fn connect(url: &str) -> Client {
    let (ws, _) = bounded(tokio_tungstenite::connect_async_with_config(
        url,
        Some(ws_config()),
        true,
    ))
    .await
    .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    ws
}

/// Sends `text` and asserts it comes back unchanged (through an echo upstream).
pub async fn echo_text(client: &mut Client, text: &str) {
    let message = Message::text(text);
    bounded(client.send(message.clone())).await.expect("send");
    let reply = bounded(client.next())
        .await
        .expect("a reply")
        .expect("a frame");
    assert_eq!(reply, message);
}

/// Sends a raw request head from a new connection and returns the response head, asserting it
/// is a `101` (`what` names the request in the failure).
pub async fn upgrade_raw(addr: SocketAddr, request: &[u8], what: &str) -> String {
    let mut stream = bounded(TcpStream::connect(addr)).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let (head, _) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{what}: {head}");
    head
}

/// Opens a TCP connection to `addr` from `source` (any address of 127.0.0.0/8): the port is
/// chosen at connect time for the whole address pair (`IP_BIND_ADDRESS_NO_PORT`), so many
/// source addresses multiply the connections that can be open or in TIME_WAIT at once.
pub async fn connect_from(
    source: std::net::IpAddr,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    let result = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    socket.connect(addr).await
}

/// Awaits `future`, failing the test after [`WAIT`].
pub async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .expect("operation did not finish in time")
}

/// A valid Upgrade request head for `path` with extra header lines.
pub fn upgrade_request(path: &str, extra: &[&str]) -> Vec<u8> {
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: wsplice.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Sends raw bytes, reads until the proxy closes; returns the status and the whole answer.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = bounded(TcpStream::connect(addr)).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut answer = Vec::new();
    let _ = bounded(stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Reads from `stream` until a complete HTTP head; returns it and the bytes after it.
pub async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = bounded(stream.read(&mut chunk)).await.expect("read head");
        assert!(
            n > 0,
            "stream closed before a complete head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
    }
}

/// `Sec-WebSocket-Accept` for the key in `head`.
pub fn accept_for(head: &str) -> String {
    let key = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .expect("request has a Sec-WebSocket-Key");
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A server→client text frame (unmasked), payload under 126 bytes.
pub fn server_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x81, payload.len() as u8];
    frame.extend_from_slice(payload);
    frame
}

/// The 101 answer for a request head.
pub fn switching_protocols(head: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_for(head)
    )
    .into_bytes()
}

/// A scripted upstream: for each connection, the request head is read and `script` runs with
/// the stream, the head and the bytes that followed it.
pub struct Scripted {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    /// Starts listening on 127.0.0.1.
    pub async fn start<F, Fut>(script: F) -> Scripted
    where
        F: Fn(TcpStream, String, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind scripted upstream");
        let addr = listener.local_addr().expect("addr");
        let script = std::sync::Arc::new(script);
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let script = script.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let (head, rest) = read_head(&mut stream).await;
                    script(stream, head, rest).await;
                });
            }
        });
        Scripted { addr, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wraps a stream whose handshake is done as the server side of a WebSocket.
pub async fn server_socket(stream: TcpStream) -> WebSocketStream<TcpStream> {
    WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config())).await
}

/// The most of `moves` (times something happened) within any one second.
pub fn busiest_second(moves: &[Instant]) -> usize {
    moves
        .iter()
        .map(|&start| {
            moves
                .iter()
                .filter(|&&t| t >= start && t < start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Polls `check` until it is true or [`WAIT`] passes; returns the last result.
pub fn eventually(check: impl FnMut() -> bool) -> bool {
    eventually_within(WAIT, check)
}

/// Polls `check` every 50 ms until it is true or `within` passes; returns the last result.
pub fn eventually_within(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`eventually`] for async tests: polls without holding a runtime thread meanwhile.
pub async fn settles(check: impl FnMut() -> bool) -> bool {
    settles_within(WAIT, check).await
}

/// [`eventually_within`] for async tests.
pub async fn settles_within(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
