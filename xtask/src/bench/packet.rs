//! The `packet` workload: the packet splice (`wsplice run --datapath packet`) side by side with
//! the client talking to the upstream directly, nginx as an http proxy (`proxy_pass` with the
//! Upgrade/Connection headers, as people front a ws backend), HAProxy in TCP mode and wsplice's
//! sockmap path (`--datapath kernel`), in a line of three network namespaces the run makes:
//!
//! ```text
//!   client ns                  proxy ns                                 upstream ns
//!   wsbc 10.231.1.2 ── veth ── wsbpc 10.231.1.1   wsbpu 10.231.2.1 ── veth ── wsbu 10.231.2.2
//! ```
//!
//! The packet splice only sees packets that cross the interfaces its tc program is attached to,
//! so the loopback targets of the other workloads cannot measure it. The proxy namespace does
//! not forward, except for the `direct` target (`net.ipv4.ip_forward=1` there, the client
//! connecting to the upstream's address): every target's packets cross the same two veths.
//!
//! Per target and round: `hold` (N idle tunnels: memory per tunnel) and `fleet` (N tunnels, one
//! 64 B message every 2 s each: p50/p99, CPU per million messages and memory per tunnel under
//! load). Memory is measured two ways: the machine's MemAvailable drop (what the issue names;
//! other work on the machine moves it too), and an accounted sum that other processes do not
//! move much: kernel slab objects in use (`/proc/slabinfo`) + TCP buffer pages + the RSS of
//! the run's own processes (load generator, echo, proxy). CPU likewise: machine-wide busy time (/proc/stat) and an
//! attributable part: the run's own processes' CPU plus the machine's irq and softirq time
//! (where the veth and tc work is accounted).

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use super::load::{machine_busy_seconds, meminfo_kb, p50_p99, rss_kb, sleep_until};
use super::report::summary;
use super::targets::{children_of, pids_of, Guard, NGINX_WS_LOCATION};
use super::{stop_requested, Env, Scale};

/// The proxy's listening port (client side) and the echo's.
const PROXY_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
/// The proxy's admin listener, inside the proxy namespace.
const ADMIN: &str = "127.0.0.1:9901";
/// Subnets: 10.231.1.0/24 client link, 10.231.2.0/24 upstream link.
const CLIENT: &str = "10.231.1.2";
const PROXY_TO_CLIENT: &str = "10.231.1.1";
const PROXY_TO_UPSTREAM: &str = "10.231.2.1";
const UPSTREAM: &str = "10.231.2.2";
/// Interface names (each lives in its own namespace).
const IF_CLIENT: &str = "wsbc";
const IF_PROXY_CLIENT: &str = "wsbpc";
const IF_PROXY_UPSTREAM: &str = "wsbpu";
const IF_UPSTREAM: &str = "wsbu";
/// Local ports the packet path reserves for its upstream connections.
const PACKET_PORTS: &str = "40000-59999";
/// Fleet connections per load-generator process (well under its 20,000 fds).
const CONNS_PER_PROCESS: usize = 5000;

/// One target of the packet workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Direct,
    Nginx,
    Haproxy,
    WspliceKernel,
    WsplicePacket,
}

/// Direct first: the "above direct" rows subtract its round.
pub const TARGETS: [Target; 5] = [
    Target::Direct,
    Target::Nginx,
    Target::Haproxy,
    Target::WspliceKernel,
    Target::WsplicePacket,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy (tcp)",
            Target::WspliceKernel => "wsplice kernel",
            Target::WsplicePacket => "wsplice packet",
        }
    }

    /// Its place in TARGETS (and in `PacketReport::rounds`).
    fn index(self) -> usize {
        TARGETS
            .iter()
            .position(|t| *t == self)
            .expect("every target is in TARGETS")
    }
}

/// Memory per tunnel, bytes: the machine's MemAvailable drop and the accounted components.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub machine: f64,
    pub slab: f64,
    /// Kernel slab objects in use (`/proc/slabinfo`: active objects × object size): unlike
    /// `slab` (pages), not lowered by the pages earlier work left partly free.
    pub slab_objects: f64,
    pub tcp: f64,
    pub proxy: f64,
    pub echo: f64,
    pub client: f64,
    /// The proxy's eBPF maps (memlock: with BPF_F_NO_PREALLOC it grows with the entries).
    pub maps: f64,
}

impl Mem {
    /// Slab objects + TCP pages + RSS of the load generator, echo and proxy.
    pub fn accounted(&self) -> f64 {
        self.slab_objects + self.tcp + self.proxy + self.echo + self.client
    }

    /// What differs between targets (the echo and the load generator are the same programs
    /// with the same traffic in each): slab objects + TCP pages + the proxy's RSS. Objects,
    /// not slab pages: pages a previous run left partly free are filled first, so page growth
    /// depends on what ran before.
    pub fn proxy_side(&self) -> f64 {
        self.slab_objects + self.tcp + self.proxy
    }
}

/// What one target measured in one round.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Idle tunnels: memory per tunnel.
    pub idle: Mem,
    /// Fleet.
    pub p50_us: f64,
    pub p99_us: f64,
    pub messages: f64,
    pub failures: f64,
    pub machine_cpu_s: f64,
    pub attributable_cpu_s: f64,
    /// Its parts: the proxy's processes, the load generators and the echo, irq + softirq.
    pub proxy_cpu_s: f64,
    pub ends_cpu_s: f64,
    pub irq_cpu_s: f64,
    /// Share of the machine's CPUs busy during the window (1.0: saturated).
    pub machine_busy: f64,
    /// Memory per tunnel under the fleet load.
    pub load: Mem,
    /// Packet path: tunnels handed over in hold and fleet (by the window's start and by its
    /// end), refusals by reason (both runs).
    pub spliced_hold: f64,
    pub spliced_fleet: f64,
    pub spliced_fleet_end: f64,
    pub refusals: Vec<(String, f64)>,
}

impl Round {
    /// `cpu` seconds per million messages of the window.
    fn per_million(&self, cpu: f64) -> f64 {
        if self.messages > 0.0 {
            cpu / self.messages * 1e6
        } else {
            f64::NAN
        }
    }

    /// Machine-wide or attributable CPU seconds per million messages.
    fn cpu_per_million(&self, attributable: bool) -> f64 {
        self.per_million(if attributable {
            self.attributable_cpu_s
        } else {
            self.machine_cpu_s
        })
    }
}

/// Everything the packet workload measured, for the report.
#[derive(Debug, Default)]
pub struct PacketReport {
    pub hold: usize,
    pub fleet: usize,
    pub window: f64,
    /// Per target (TARGETS order), one entry per round that completed.
    pub rounds: Vec<Vec<Round>>,
    pub notes: Vec<String>,
    /// Memory the packet path's eBPF maps reserve up front (memlock of the proxy's map fds), KB.
    pub packet_maps_kb: Option<f64>,
    pub seconds: f64,
}

/// The network namespaces and their veths; deleted (with everything in them) when dropped.
struct Line {
    client: String,
    proxy: String,
    upstream: String,
}

impl Line {
    fn build() -> anyhow::Result<Line> {
        let pid = std::process::id();
        let line = Line {
            client: format!("wsb{pid}c"),
            proxy: format!("wsb{pid}p"),
            upstream: format!("wsb{pid}u"),
        };
        for ns in line.all() {
            // A namespace left by a killed run of the same PID.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        // From here on, dropping `line` deletes whatever was made.
        for ns in line.all() {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (c, p, u) = (&line.client, &line.proxy, &line.upstream);
        ip(&[
            "-n",
            c,
            "link",
            "add",
            "name",
            IF_CLIENT,
            "type",
            "veth",
            "peer",
            "name",
            IF_PROXY_CLIENT,
            "netns",
            p,
        ])?;
        ip(&[
            "-n",
            p,
            "link",
            "add",
            "name",
            IF_PROXY_UPSTREAM,
            "type",
            "veth",
            "peer",
            "name",
            IF_UPSTREAM,
            "netns",
            u,
        ])?;
        for (ns, dev, addr) in [
            (c, IF_CLIENT, CLIENT),
            (p, IF_PROXY_CLIENT, PROXY_TO_CLIENT),
            (p, IF_PROXY_UPSTREAM, PROXY_TO_UPSTREAM),
            (u, IF_UPSTREAM, UPSTREAM),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
        }
        ip(&["-n", c, "route", "add", "default", "via", PROXY_TO_CLIENT])?;
        ip(&["-n", u, "route", "add", "default", "via", PROXY_TO_UPSTREAM])?;
        // The proxy terminates connections (the direct target turns forwarding on for itself).
        line.sysctl(p, "net.ipv4.ip_forward", "0")?;
        // Ports: the client's for up to 2 × N tunnels a target plus TIME_WAITs; the proxy's
        // ephemeral range stays below the packet path's reserved one.
        line.sysctl(c, "net.ipv4.ip_local_port_range", "10000 65000")?;
        line.sysctl(p, "net.ipv4.ip_local_port_range", "10000 39999")?;
        for ns in line.all() {
            line.sysctl(ns, "net.ipv4.tcp_tw_reuse", "1")?;
            line.sysctl(ns, "net.core.somaxconn", "4096")?;
        }
        Ok(line)
    }

    fn all(&self) -> [&str; 3] {
        [&self.client, &self.proxy, &self.upstream]
    }

    fn sysctl(&self, ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
        run_quiet(
            Command::new("ip")
                .args(["netns", "exec", ns, "sysctl", "-qw"])
                .arg(format!("{key}={value}")),
        )
    }

    /// `program ARGS` in namespace `ns` (`ip netns exec` execs it: the PID is the program's).
    fn command(&self, ns: &str, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }

    /// Starts `program ARGS` in `ns`, its output to `log`.
    fn spawn(&self, ns: &str, program: &Path, args: &[&str], log: &Path) -> anyhow::Result<Guard> {
        let file = std::fs::File::create(log)?;
        let child = self
            .command(ns, program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {} in {ns}", program.display()))?;
        Ok(Guard(child))
    }

    /// Waits (at most 10 s) until `addr:port` listens in `ns` and `guards` still run.
    fn wait_listening(
        &self,
        ns: &str,
        addr: &str,
        port: u16,
        guards: &mut [Guard],
        log: &Path,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let wanted = format!("{addr}:{port}");
        loop {
            for guard in guards.iter_mut() {
                if let Ok(Some(status)) = guard.0.try_wait() {
                    bail!(
                        "it exited ({status}): {}",
                        std::fs::read_to_string(log).unwrap_or_default().trim()
                    );
                }
            }
            let output = Command::new("ip")
                .args(["netns", "exec", ns, "ss", "-Hltn"])
                .output()?;
            if String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .any(|w| w == wanted)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {wanted} in {ns}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The proxy's admin /metrics (empty if it does not answer within 5 s).
    fn metrics(&self) -> String {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.proxy,
                "curl",
                "-s",
                "--max-time",
                "5",
            ])
            .arg(format!("http://{ADMIN}/metrics"))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        for ns in self.all() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn run_quiet(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output().with_context(|| format!("{command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_quiet(Command::new("ip").args(args))
}

/// `wsplice_NAME value` of a metrics text (labels included in NAME), 0 if absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("wsplice_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Every `wsplice_packet_refusals_total{reason="R"} V` of a metrics text.
fn refusals(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("wsplice_packet_refusals_total{reason=\""))
        .filter_map(|rest| {
            let (reason, value) = rest.split_once("\"}")?;
            Some((reason.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Kernel slab objects in use machine-wide, KB: the sum over `/proc/slabinfo`'s caches of
/// active objects × object size (0 if it cannot be read: it needs root), procfs inodes left
/// out (see [`slab_caches`]).
fn slab_objects_kb() -> f64 {
    slab_caches().values().sum::<f64>() / 1024.0
}

/// Bytes of objects in use per slab cache (`/proc/slabinfo`: active objects × object size).
/// Without `proc_inode_cache`: a process that walks `/proc/PID/fd` (this machine's supervisor
/// does, now and then) makes one per descriptor it looks at, 700 bytes per tunnel end when it
/// happens to walk the run's processes: not the tunnels' memory, and not every run's.
fn slab_caches() -> std::collections::HashMap<String, f64> {
    let text = std::fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_owned();
            let active: f64 = fields.next()?.parse().ok()?;
            let size: f64 = fields.nth(1)?.parse().ok()?;
            Some((name, active * size))
        })
        .filter(|(name, _)| name != "proc_inode_cache")
        .collect()
}

/// Pages of TCP buffers allocated machine-wide (`/proc/net/sockstat`, `TCP: ... mem N`).
fn tcp_mem_kb() -> f64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("TCP:"))?.to_owned();
            let mut words = line.split_whitespace();
            words.find(|w| *w == "mem")?;
            words.next()?.parse::<f64>().ok()
        })
        .map_or(0.0, |pages| pages * 4.0)
}

/// CPU time the threads of `pids` have run so far, seconds, to the nanosecond (the sum of
/// `/proc/PID/task/*/schedstat`; `/proc/PID/stat` counts in 10 ms ticks, too coarse for a few
/// CPU-seconds split over six processes). Irq and softirq time is not in it (accounted apart).
fn threads_cpu_seconds(pids: &[u32]) -> f64 {
    let mut ns = 0u64;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.filter_map(Result::ok) {
            if let Some(run) = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                ns += run;
            }
        }
    }
    ns as f64 / 1e9
}

/// Busy irq + softirq time of the whole machine so far, seconds.
fn machine_irq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq
    let irq = fields.get(5).copied().unwrap_or(0.0) + fields.get(6).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    irq / if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The processes whose RSS is accounted, by role.
#[derive(Debug, Clone, Default)]
struct Pids {
    proxy: Vec<u32>,
    echo: Vec<u32>,
    client: Vec<u32>,
}

/// A memory snapshot (absolute, KB; `machine` is MemAvailable).
fn snapshot(pids: &Pids) -> Mem {
    Mem {
        machine: meminfo_kb("MemAvailable:"),
        slab: meminfo_kb("Slab:"),
        slab_objects: slab_objects_kb(),
        tcp: tcp_mem_kb(),
        proxy: rss_kb(&pids.proxy),
        echo: rss_kb(&pids.echo),
        client: rss_kb(&pids.client),
        maps: bpf_maps(&pids.proxy).map_or(0.0, |m| m.0),
    }
}

/// The mean of three snapshots 200 ms apart (MemAvailable moves with the rest of the machine).
fn snapshot_settled(pids: &Pids) -> Mem {
    let shots: Vec<Mem> = (0..3)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            snapshot(pids)
        })
        .collect();
    let mean = |f: fn(&Mem) -> f64| shots.iter().map(f).sum::<f64>() / shots.len() as f64;
    Mem {
        machine: mean(|m| m.machine),
        slab: mean(|m| m.slab),
        slab_objects: mean(|m| m.slab_objects),
        tcp: mean(|m| m.tcp),
        proxy: mean(|m| m.proxy),
        echo: mean(|m| m.echo),
        client: mean(|m| m.client),
        maps: mean(|m| m.maps),
    }
}

/// Per tunnel, bytes, from two snapshots.
fn per_tunnel(before: &Mem, after: &Mem, n: usize) -> Mem {
    let k = 1024.0 / n as f64;
    Mem {
        machine: (before.machine - after.machine) * k,
        slab: (after.slab - before.slab) * k,
        slab_objects: (after.slab_objects - before.slab_objects) * k,
        tcp: (after.tcp - before.tcp) * k,
        proxy: (after.proxy - before.proxy) * k,
        echo: (after.echo - before.echo) * k,
        client: (after.client - before.client) * k,
        maps: (after.maps - before.maps) * k,
    }
}

/// A running target: its processes (stopped by PID when dropped) and where clients connect.
struct Running {
    guards: Vec<Guard>,
    pids: Vec<u32>,
    url: String,
    /// Resets the proxy namespace's forwarding after the direct target.
    forwarding: bool,
    proxy_ns: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.guards.clear();
        if self.forwarding {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.proxy_ns, "sysctl", "-qw"])
                .arg("net.ipv4.ip_forward=0")
                .status();
        }
    }
}

/// wsplice's config for the line: the echo upstream's servers on `echo_ports`, and the packet
/// splice on the proxy's two interfaces if `packet`.
fn wsplice_config(packet: bool, echo_ports: &[u16]) -> String {
    let servers: Vec<String> = echo_ports
        .iter()
        .map(|port| format!("\"{UPSTREAM}:{port}\""))
        .collect();
    let mut config = format!(
        "[[listener]]\nbind = \"{PROXY_TO_CLIENT}:{PROXY_PORT}\"\n\n[[route]]\nupstream = \"echo\"\n\n\
         [upstream.echo]\nservers = [{}]\n\n[timeouts]\nidle = \"3600s\"\n\n\
         [admin]\nbind = \"{ADMIN}\"\n",
        servers.join(", ")
    );
    if packet {
        config.push_str(&format!(
            "\n[packet]\ninterfaces = [\"{IF_PROXY_CLIENT}\", \"{IF_PROXY_UPSTREAM}\"]\n\
             ports = \"{PACKET_PORTS}\"\n"
        ));
    }
    config
}

/// HAProxy in TCP mode: bytes relayed, nothing parsed (two fds per tunnel: 9,700 fit the
/// 20,000-fd limit).
fn haproxy_config() -> String {
    format!(
        "global\n  nbthread 2\n  maxconn 9700\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 3600s\n  timeout server 3600s\n\
         frontend ws\n  bind {PROXY_TO_CLIENT}:{PROXY_PORT}\n  default_backend echo\n\
         backend echo\n  server echo {UPSTREAM}:{ECHO_PORT}\n"
    )
}

/// nginx as people front a ws backend, with the loopback workloads' headers (`targets.rs`):
/// http proxy, `proxy_http_version 1.1`, Upgrade and Connection passed on, 3600 s timeouts. Two
/// worker processes on a `reuseport` listener (connections spread over both; each worker has its
/// own fd limit): two fds per tunnel, and one process may hold at most 20,000 fds. No upstream
/// `keepalive`: upgraded connections never go back to a pool, and this workload sends nothing
/// else.
fn nginx_config(work: &Path) -> String {
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\nworker_rlimit_nofile 20000;\n\
         pid {pid};\nerror_log {error_log} warn;\n\
         events {{ worker_connections 19000; }}\n\
         http {{\n  access_log off;\n\
           map $http_upgrade $connection_upgrade {{ default upgrade; '' \"\"; }}\n\
           upstream echo {{ server {UPSTREAM}:{ECHO_PORT}; }}\n\
           server {{\n    listen {PROXY_TO_CLIENT}:{PROXY_PORT} reuseport;\n    location / {{\n\
         {NGINX_WS_LOCATION}    }}\n  }}\n}}\n",
        pid = work.join("nginx.pid").display(),
        error_log = work.join("nginx-error.log").display(),
    )
}

/// Starts a fresh echo upstream (each target's own: the memory an echo process grows to at its
/// first tunnels stays with it, and would otherwise count for the first target only).
fn start_echo(line: &Line, env: &Env, work: &Path) -> anyhow::Result<Guard> {
    let echo_log = work.join("echo.log");
    let listen = format!("{UPSTREAM}:{ECHO_PORT}");
    let mut echo = vec![line.spawn(
        &line.upstream,
        &env.tools.wsplice,
        &["echo", "--listen", &listen],
        &echo_log,
    )?];
    line.wait_listening(&line.upstream, UPSTREAM, ECHO_PORT, &mut echo, &echo_log)?;
    Ok(echo.pop().expect("one echo"))
}

fn start(target: Target, line: &Line, env: &Env, work: &Path) -> anyhow::Result<Running> {
    let proxy_ns = line.proxy.clone();
    match target {
        Target::Direct => {
            line.sysctl(&line.proxy, "net.ipv4.ip_forward", "1")?;
            Ok(Running {
                guards: Vec::new(),
                pids: Vec::new(),
                url: format!("ws://{UPSTREAM}:{ECHO_PORT}/bench"),
                forwarding: true,
                proxy_ns,
            })
        }
        Target::Nginx => {
            let conf = work.join("nginx.conf");
            std::fs::write(&conf, nginx_config(work))?;
            let log = work.join("nginx.log");
            let conf = conf.to_string_lossy().into_owned();
            let prefix = work.to_string_lossy().into_owned();
            let mut guards = vec![line.spawn(
                &line.proxy,
                &env.tools.nginx,
                &["-c", &conf, "-p", &prefix],
                &log,
            )?];
            line.wait_listening(&line.proxy, PROXY_TO_CLIENT, PROXY_PORT, &mut guards, &log)?;
            // The master listens before it forks the workers: `finish` must see both.
            wait_children(&mut guards[0], 2, &log)?;
            finish(guards, proxy_ns)
        }
        Target::Haproxy => {
            let conf = work.join("haproxy-tcp.cfg");
            std::fs::write(&conf, haproxy_config())?;
            let log = work.join("haproxy-tcp.log");
            let conf = conf.to_string_lossy().into_owned();
            let mut guards =
                vec![line.spawn(&line.proxy, &env.tools.haproxy, &["-db", "-f", &conf], &log)?];
            line.wait_listening(&line.proxy, PROXY_TO_CLIENT, PROXY_PORT, &mut guards, &log)?;
            finish(guards, proxy_ns)
        }
        Target::WspliceKernel | Target::WsplicePacket => {
            let packet = target == Target::WsplicePacket;
            let datapath = if packet { "packet" } else { "kernel" };
            let conf = work.join(format!("wsplice-{datapath}.toml"));
            std::fs::write(&conf, wsplice_config(packet, &[ECHO_PORT]))?;
            let log = work.join(format!("wsplice-{datapath}.log"));
            let conf = conf.to_string_lossy().into_owned();
            let mut guards = vec![line.spawn(
                &line.proxy,
                &env.tools.wsplice,
                &["run", "-c", &conf, "--datapath", datapath, "--workers", "2"],
                &log,
            )?];
            line.wait_listening(&line.proxy, PROXY_TO_CLIENT, PROXY_PORT, &mut guards, &log)?;
            finish(guards, proxy_ns)
        }
    }
}

/// Waits (at most 10 s) until `guard`'s process has `want` children (nginx's workers).
fn wait_children(guard: &mut Guard, want: usize, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while children_of(guard.0.id()).len() < want {
        if let Ok(Some(status)) = guard.0.try_wait() {
            bail!(
                "it exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "process {} has fewer than {want} children after 10 s",
                guard.0.id()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The target's processes (for RSS and CPU: the guards' and their children, e.g. nginx's
/// workers) and where clients connect.
fn finish(guards: Vec<Guard>, proxy_ns: String) -> anyhow::Result<Running> {
    std::thread::sleep(Duration::from_millis(300));
    Ok(Running {
        pids: pids_of(&guards),
        guards,
        url: format!("ws://{PROXY_TO_CLIENT}:{PROXY_PORT}/bench"),
        forwarding: false,
        proxy_ns,
    })
}

/// Lines of a child's stdout, read on a thread so every wait has a deadline.
fn line_reader(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (at most `within`) until the packet path has handed over `want` tunnels more than
/// `before`; returns how many it did.
fn wait_spliced(line: &Line, before: f64, want: usize, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    let mut last = -1.0;
    let mut stable_since = Instant::now();
    loop {
        let now = metric(&line.metrics(), "tunnels_packet_spliced_total") - before;
        if now >= want as f64 || Instant::now() > deadline {
            return now;
        }
        // No progress for 3 s: the rest stays relayed.
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() > Duration::from_secs(3) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// N idle tunnels: memory per tunnel (bytes).
fn hold(
    env: &Env,
    line: &Line,
    running: &Running,
    target: Target,
    n: usize,
    round: &mut Round,
) -> anyhow::Result<()> {
    let before_metrics = line.metrics();
    std::thread::sleep(Duration::from_millis(300));
    let mut pids = Pids {
        proxy: running.pids.clone(),
        echo: echo_pids(line),
        client: Vec::new(),
    };
    let before = snapshot_settled(&pids);
    let mut child = Guard(
        line.command(&line.client, &env.load)
            .args(["hold", "--url", &running.url, "--conns", &n.to_string()])
            .args(["--connect-parallel", "8"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(env.work.join("packet-hold.log"))?)
            .spawn()
            .context("cannot run wsplice-load hold")?,
    );
    let lines = line_reader(child.0.stdout.take().context("no stdout")?);
    pids.client.push(child.0.id());
    let ready = lines.recv_timeout(Duration::from_secs(120));
    if ready.as_deref().map(str::trim) != Ok("ready") {
        bail!(
            "hold did not get ready ({ready:?}): {}",
            std::fs::read_to_string(env.work.join("packet-hold.log"))
                .unwrap_or_default()
                .trim()
        );
    }
    if target == Target::WsplicePacket {
        let spliced_before = metric(&before_metrics, "tunnels_packet_spliced_total");
        round.spliced_hold = wait_spliced(line, spliced_before, n, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let held = snapshot_settled(&pids);
    // Closing stdin ends the holder; the guard stops it by PID if it does not.
    drop(child.0.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && matches!(child.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    // Before vs held: the load generator's own runtime counts as the tunnels' (the same for
    // every target, so not in the differences to direct).
    round.idle = per_tunnel(&before, &held, n);
    // Let the closes settle before the next run (each run has a fresh proxy).
    std::thread::sleep(Duration::from_millis(2500));
    Ok(())
}

/// PIDs of the processes in the upstream namespace's echo (by their namespace: ours only).
fn echo_pids(line: &Line) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", &line.upstream])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// N fleet tunnels over several load processes, one window: latency, CPU, memory under load.
#[allow(clippy::too_many_arguments)]
fn fleet(
    env: &Env,
    line: &Line,
    running: &Running,
    target: Target,
    n: usize,
    window: f64,
    round: &mut Round,
) -> anyhow::Result<()> {
    let before_metrics = line.metrics();
    std::thread::sleep(Duration::from_millis(300));
    let processes = n.div_ceil(CONNS_PER_PROCESS).max(1);
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for i in 0..processes {
        let share = n / processes + usize::from(i < n % processes);
        let mut child = Guard(
            line.command(&line.client, &env.load)
                .args(["fleet", "--url", &running.url])
                .args([
                    "--conns",
                    &share.to_string(),
                    "--seconds",
                    &window.to_string(),
                ])
                .args(["--connect-parallel", &(96 / processes).max(8).to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(
                    env.work.join(format!("packet-fleet-{i}.log")),
                )?)
                .spawn()
                .context("cannot run wsplice-load fleet")?,
        );
        readers.push(line_reader(child.0.stdout.take().context("no stdout")?));
        children.push(child);
    }
    // The memory baseline: every process started, nothing connected yet (a load process
    // connects within milliseconds, so this is taken right away; its runtime is small).
    let pids = Pids {
        proxy: running.pids.clone(),
        echo: echo_pids(line),
        client: children.iter().map(|c| c.0.id()).collect(),
    };
    let all_pids: Vec<u32> = [&pids.proxy, &pids.echo, &pids.client]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    let base = snapshot(&pids);
    for (i, reader) in readers.iter().enumerate() {
        let line_ = reader.recv_timeout(Duration::from_secs(120));
        match line_ {
            Ok(l) if l.starts_with("connected") => {}
            other => bail!(
                "fleet load generator {i} did not connect ({other:?}): {}",
                std::fs::read_to_string(env.work.join(format!("packet-fleet-{i}.log")))
                    .unwrap_or_default()
                    .trim()
            ),
        }
    }
    if target == Target::WsplicePacket {
        let spliced_before = metric(&before_metrics, "tunnels_packet_spliced_total");
        round.spliced_fleet = wait_spliced(line, spliced_before, n, Duration::from_secs(20));
    }
    // Every connection sends once (one 2 s interval) before the window.
    let lead = Duration::from_millis(2500);
    let start_ms =
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64 + lead.as_millis() as u64;
    let start = Instant::now() + lead;
    for child in &mut children {
        if let Some(stdin) = child.0.stdin.as_mut() {
            writeln!(stdin, "{start_ms}")?;
        }
    }
    sleep_until(start);
    let cpu_before = machine_busy_seconds()?;
    let irq_before = machine_irq_seconds();
    let own_before = threads_cpu_seconds(&all_pids);
    let proxy_before = threads_cpu_seconds(&pids.proxy);
    sleep_until(start + Duration::from_secs_f64(window / 2.0));
    let loaded = snapshot(&pids);
    sleep_until(start + Duration::from_secs_f64(window));
    round.machine_cpu_s = machine_busy_seconds()? - cpu_before;
    let own = threads_cpu_seconds(&all_pids) - own_before;
    round.proxy_cpu_s = threads_cpu_seconds(&pids.proxy) - proxy_before;
    round.ends_cpu_s = own - round.proxy_cpu_s;
    round.irq_cpu_s = machine_irq_seconds() - irq_before;
    round.attributable_cpu_s = own + round.irq_cpu_s;
    round.load = per_tunnel(&base, &loaded, n);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    round.machine_busy = round.machine_cpu_s / (cores * window);
    let mut samples: Vec<u64> = Vec::new();
    let mut first_error = None;
    for (i, reader) in readers.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while let Ok(l) = reader.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            last = Some(l);
        }
        let l = last.with_context(|| format!("fleet load generator {i} printed no result"))?;
        let json: serde_json::Value = serde_json::from_str(&l)?;
        round.messages += json["messages"].as_f64().unwrap_or(0.0);
        round.failures += json["failures"].as_f64().unwrap_or(0.0);
        if first_error.is_none() {
            first_error = json["first_error"].as_str().map(str::to_owned);
        }
        if let Some(rtts) = json["rtt_us"].as_array() {
            samples.extend(rtts.iter().filter_map(serde_json::Value::as_u64));
        }
    }
    drop(children);
    if target == Target::WsplicePacket {
        let spliced_before = metric(&before_metrics, "tunnels_packet_spliced_total");
        round.spliced_fleet_end =
            metric(&line.metrics(), "tunnels_packet_spliced_total") - spliced_before;
    }
    (round.p50_us, round.p99_us) = p50_p99(&mut samples);
    if let Some(error) = first_error {
        note_fleet_error(round, &error);
    }
    // The closes settle before the next run (each run has a fresh proxy).
    std::thread::sleep(Duration::from_millis(2000));
    Ok(())
}

/// A fleet error is kept as a pseudo-refusal line so it reaches the notes.
fn note_fleet_error(round: &mut Round, error: &str) {
    round
        .refusals
        .push((format!("fleet first error: {error}"), f64::NAN));
}

/// The memory the proxy's eBPF maps reserve (memlock in their fdinfo), KB, and a list of them
/// (type, max entries, KB).
fn bpf_maps(pids: &[u32]) -> Option<(f64, String)> {
    let mut total = 0.0;
    let mut any = false;
    let mut maps = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if !info.contains("map_type:") {
                continue;
            }
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            let id = field("map_id:");
            if seen.contains(&id) {
                continue;
            }
            seen.push(id);
            if let Ok(bytes) = field("memlock:").parse::<f64>() {
                total += bytes / 1024.0;
                any = true;
                maps.push(format!(
                    "type {} × {} entries: {:.0} KB",
                    field("map_type:"),
                    field("max_entries:"),
                    bytes / 1024.0
                ));
            }
        }
    }
    maps.sort();
    any.then(|| (total, maps.join("; ")))
}

/// Runs the packet workload: every target in the same line, `scale.rounds` rounds.
pub fn run(env: &Env, scale: &Scale, rounds: usize) -> anyhow::Result<PacketReport> {
    let started = Instant::now();
    let n = scale.fleet;
    let mut report = PacketReport {
        hold: n,
        fleet: n,
        window: scale.fleet_window,
        rounds: vec![Vec::new(); TARGETS.len()],
        ..PacketReport::default()
    };
    let work: PathBuf = env.work.join("packet");
    std::fs::create_dir_all(&work)?;
    let line = Line::build().context("cannot build the namespaces")?;
    env.progress.say(&format!(
        "packet: namespaces {}, {}, {} built",
        line.client, line.proxy, line.upstream
    ));
    for r in 1..=rounds {
        for (index, target) in TARGETS.into_iter().enumerate() {
            stop_requested()?;
            let at = format!("packet round {r}/{rounds} · {}", target.name());
            env.progress.say(&format!("{at}: starting"));
            let echo = match start_echo(&line, env, &work) {
                Ok(echo) => echo,
                Err(error) => {
                    let message = format!("{at}: cannot start the echo: {error:#}");
                    env.progress.say(&message);
                    report.notes.push(message);
                    continue;
                }
            };
            let running = match start(target, &line, env, &work) {
                Ok(running) => running,
                Err(error) => {
                    let message = format!("{at}: cannot start: {error:#}");
                    env.progress.say(&message);
                    report.notes.push(message);
                    continue;
                }
            };
            if target == Target::WsplicePacket && report.packet_maps_kb.is_none() {
                if let Some((kb, maps)) = bpf_maps(&running.pids) {
                    report.packet_maps_kb = Some(kb);
                    report
                        .notes
                        .push(format!("wsplice packet's eBPF maps: {maps}"));
                }
            }
            let mut round = Round::default();
            env.progress.say(&format!("{at} · hold {n}"));
            let held = hold(env, &line, &running, target, n, &mut round);
            stop_requested()?;
            if target == Target::WsplicePacket {
                let text = line.metrics();
                round.refusals.extend(
                    refusals(&text)
                        .into_iter()
                        .map(|(reason, count)| (format!("hold: {reason}"), count)),
                );
            }
            // A fresh proxy and echo for the fleet: memory the hold made them grow to (and
            // their allocators keep) would otherwise hide the fleet's own.
            drop(running);
            drop(echo);
            let restarted = start_echo(&line, env, &work)
                .and_then(|echo| start(target, &line, env, &work).map(|running| (echo, running)));
            let (echo, running) = match restarted {
                Ok(both) => both,
                Err(error) => {
                    let message = format!("{at}: cannot restart for the fleet: {error:#}");
                    env.progress.say(&message);
                    report.notes.push(message);
                    continue;
                }
            };
            env.progress.say(&format!("{at} · fleet {n}"));
            let fleet_run = fleet(
                env,
                &line,
                &running,
                target,
                n,
                scale.fleet_window,
                &mut round,
            );
            let mut open_at_stop = None;
            if target == Target::WsplicePacket {
                let text = line.metrics();
                round.refusals.extend(
                    refusals(&text)
                        .into_iter()
                        .map(|(reason, count)| (format!("fleet: {reason}"), count)),
                );
                open_at_stop = Some(metric(&text, "tunnels_packet_open"));
            }
            let stopping = Instant::now();
            drop(running);
            let stop_s = stopping.elapsed().as_secs_f64();
            if stop_s > 1.0 {
                let open = open_at_stop.map_or(String::new(), |open| {
                    format!(", wsplice_tunnels_packet_open {open} at the SIGTERM")
                });
                let message = format!(
                    "{at}: the proxy took {stop_s:.1} s to stop after SIGTERM (every client had left{open})"
                );
                env.progress.say(&message);
                if !report
                    .notes
                    .iter()
                    .any(|n| n.contains("to stop after SIGTERM") && n.contains(target.name()))
                {
                    report.notes.push(message);
                }
            }
            drop(echo);
            match (held, fleet_run) {
                (Ok(()), Ok(())) => {
                    env.progress.say(&format!(
                        "{at}: idle {:.0} B/tunnel (accounted {:.0}, proxy side {:.0}), p99 {:.0} µs, {:.2} CPU-s/M msgs (attributable {:.2}), {:.0} messages, {} failures",
                        round.idle.machine,
                        round.idle.accounted(),
                        round.idle.proxy_side(),
                        round.p99_us,
                        round.cpu_per_million(false),
                        round.cpu_per_million(true),
                        round.messages,
                        round.failures
                    ));
                    report.rounds[index].push(round);
                }
                (held, fleet_run) => {
                    for error in [held.err(), fleet_run.err()].into_iter().flatten() {
                        let message = format!("{at}: {error:#}");
                        env.progress.say(&message);
                        report.notes.push(message);
                    }
                }
            }
        }
    }
    drop(line);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn median_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    summary(&v).map(|s| s.0)
}

/// One row of the table: label and the value of a round.
type Metric = (&'static str, fn(&Round) -> f64);

/// The table's rows, in order.
const ROWS: [Metric; 30] = [
    (
        "idle: machine memory per tunnel (MemAvailable drop), B",
        |r| r.idle.machine,
    ),
    ("idle: accounted memory per tunnel, B", |r| {
        r.idle.accounted()
    }),
    (
        "idle: proxy-side memory per tunnel (slab objects + TCP pages + proxy RSS), B",
        |r| r.idle.proxy_side(),
    ),
    ("idle: kernel slab objects per tunnel, B", |r| {
        r.idle.slab_objects
    }),
    ("idle: kernel slab pages per tunnel, B", |r| r.idle.slab),
    ("idle: TCP buffer pages per tunnel, B", |r| r.idle.tcp),
    ("idle: proxy RSS per tunnel, B", |r| r.idle.proxy),
    ("idle: echo RSS per tunnel, B", |r| r.idle.echo),
    ("idle: load generator RSS per tunnel, B", |r| r.idle.client),
    ("idle: proxy eBPF map memlock per tunnel, B", |r| {
        r.idle.maps
    }),
    ("fleet: p50 round trip, µs", |r| r.p50_us),
    ("fleet: p99 round trip, µs", |r| r.p99_us),
    ("fleet: messages in the window", |r| r.messages),
    ("fleet: failures", |r| r.failures),
    ("fleet: machine busy during the window, %", |r| {
        r.machine_busy * 100.0
    }),
    ("fleet: machine CPU-s per million messages", |r| {
        r.cpu_per_million(false)
    }),
    ("fleet: attributable CPU-s per million messages", |r| {
        r.cpu_per_million(true)
    }),
    ("fleet: proxy process CPU-s per million messages", |r| {
        r.per_million(r.proxy_cpu_s)
    }),
    (
        "fleet: irq + softirq CPU-s per million messages (whole machine)",
        |r| r.per_million(r.irq_cpu_s),
    ),
    (
        "fleet: load generator + echo CPU-s per million messages",
        |r| r.per_million(r.ends_cpu_s),
    ),
    (
        "fleet: proxy-side CPU-s per million messages (proxy process + irq/softirq)",
        |r| r.per_million(r.proxy_cpu_s + r.irq_cpu_s),
    ),
    ("fleet: machine memory per tunnel under load, B", |r| {
        r.load.machine
    }),
    ("fleet: accounted memory per tunnel under load, B", |r| {
        r.load.accounted()
    }),
    ("fleet: proxy-side memory per tunnel under load, B", |r| {
        r.load.proxy_side()
    }),
    ("fleet: proxy RSS per tunnel under load, B", |r| {
        r.load.proxy
    }),
    (
        "fleet: proxy eBPF map memlock per tunnel under load, B",
        |r| r.load.maps,
    ),
    ("packet: tunnels handed over (hold)", |r| r.spliced_hold),
    (
        "packet: tunnels handed over (fleet, by the window's start)",
        |r| r.spliced_fleet,
    ),
    ("packet: tunnels handed over (fleet, by its end)", |r| {
        r.spliced_fleet_end
    }),
    ("fleet: machine CPU-s (window)", |r| r.machine_cpu_s),
];

/// Rows repeated as "above direct" (label prefixes of ROWS).
const ABOVE: [&str; 9] = [
    "idle: machine memory",
    "idle: accounted memory",
    "idle: proxy-side memory",
    "idle: proxy RSS",
    "fleet: machine CPU-s",
    "fleet: attributable CPU-s",
    "fleet: proxy-side CPU-s",
    "fleet: machine memory",
    "fleet: proxy-side memory",
];

/// The row whose label starts with `prefix`.
fn row(prefix: &str) -> Metric {
    ROWS.into_iter()
        .find(|(label, _)| label.starts_with(prefix))
        .expect("a row of ROWS")
}

impl PacketReport {
    fn cell(&self, target: usize, f: fn(&Round) -> f64) -> Option<f64> {
        median_of(self.rounds[target].iter().map(f))
    }

    /// Median, min and max over the rounds.
    fn spread(&self, target: usize, f: fn(&Round) -> f64) -> Option<(f64, f64, f64)> {
        let v: Vec<f64> = self.rounds[target]
            .iter()
            .map(f)
            .filter(|x| x.is_finite())
            .collect();
        summary(&v)
    }

    /// Per round, target minus direct (rounds paired by index): median, min, max.
    fn above_direct(&self, target: usize, f: fn(&Round) -> f64) -> Option<(f64, f64, f64)> {
        let v: Vec<f64> = self.rounds[target]
            .iter()
            .zip(&self.rounds[Target::Direct.index()])
            .map(|(t, d)| f(t) - f(d))
            .filter(|x| x.is_finite())
            .collect();
        summary(&v)
    }

    pub fn markdown(&self) -> String {
        let rounds = self.rounds.iter().map(Vec::len).max().unwrap_or(0);
        let mut out = format!(
            "\n**Packet splice** (three network namespaces: client ── veth ── proxy ── veth ── upstream; \
             every target's packets cross both veths; direct = forwarding on in the proxy namespace and the \
             client connecting to the upstream's address; nginx as an http proxy (`proxy_pass`, HTTP/1.1, \
             Upgrade/Connection headers, 3600 s timeouts; worker_processes 2 on a reuseport listener), \
             HAProxy in TCP mode (nbthread 2), wsplice with 2 workers; \
             a fresh proxy and `wsplice echo` for the hold and again for the fleet; {} idle tunnels (connected 8 at a time), then a fleet of {} \
             tunnels each sending 64 B every 2 s, measured over {} s; median of {} round(s) with min–max; \
             whole workload {:.0} s). *Machine* memory is the MemAvailable drop; *accounted* memory is kernel \
             slab objects in use (/proc/slabinfo, procfs inodes left out) + TCP buffer pages + RSS of the load generator, echo and proxy; *proxy-side* leaves out the \
             RSS of the echo and the load generator (the same programs with the same traffic for every target). \
             *Machine* CPU is all CPUs' busy time (/proc/stat); *attributable* CPU is the CPU time of the run's \
             own processes plus all irq and softirq time (where the veth and tc work is accounted); *proxy-side* \
             CPU leaves out the load generator's and the echo's (the same work for every target, and the noisiest \
             part on a shared machine). The machine \
             is shared: other work moves the machine rows, see the busy row. \"Above direct\" rows pair each \
             round with the direct run of the same round:\n\n",
            self.hold, self.fleet, self.window, rounds, self.seconds
        );
        out.push_str("| metric |");
        for t in TARGETS {
            out.push_str(&format!(" {} |", t.name()));
        }
        out.push_str("\n|---|");
        for _ in TARGETS {
            out.push_str("---:|");
        }
        out.push('\n');
        let fmt = |v: Option<f64>| v.map_or("–".to_owned(), super::report::number);
        let fmt3 = |v: Option<(f64, f64, f64)>| match v {
            Some((m, lo, hi)) if rounds > 1 && (hi - lo).abs() > f64::EPSILON => format!(
                "{} ({}–{})",
                super::report::number(m),
                super::report::number(lo),
                super::report::number(hi)
            ),
            Some((m, ..)) => super::report::number(m),
            None => "–".to_owned(),
        };
        let packet_only = |label: &str| label.starts_with("packet:");
        for (label, f) in ROWS {
            out.push_str(&format!("| {label} |"));
            for (i, target) in TARGETS.into_iter().enumerate() {
                let v = if packet_only(label) && target != Target::WsplicePacket {
                    "–".to_owned()
                } else {
                    fmt3(self.spread(i, f))
                };
                out.push_str(&format!(" {v} |"));
            }
            out.push('\n');
        }
        for prefix in ABOVE {
            let (label, f) = row(prefix);
            out.push_str(&format!("| {label}, **above direct** |"));
            for (i, target) in TARGETS.into_iter().enumerate() {
                let v = if target == Target::Direct {
                    "–".to_owned()
                } else {
                    fmt3(self.above_direct(i, f))
                };
                out.push_str(&format!(" {v} |"));
            }
            out.push('\n');
        }
        // The issue's targets: HAProxy is the CPU ratio's reference; nginx is shown beside it.
        let (direct, nginx, haproxy, packet) = (
            Target::Direct.index(),
            Target::Nginx.index(),
            Target::Haproxy.index(),
            Target::WsplicePacket.index(),
        );
        let med = |v: Option<(f64, f64, f64)>| v.map(|s| s.0);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b.abs() > f64::EPSILON => format!("{:.2}", a / b),
            _ => "n/a".to_owned(),
        };
        out.push_str("\nAgainst the issue's targets (wsplice packet):\n\n");
        for name in ["machine", "attributable", "proxy-side"] {
            let f = row(&format!("fleet: {name} CPU-s")).1;
            let (p, h, x) = (
                med(self.above_direct(packet, f)),
                med(self.above_direct(haproxy, f)),
                med(self.above_direct(nginx, f)),
            );
            out.push_str(&format!(
                "- {name} CPU-s per million messages above direct, packet / haproxy: {} (target ≤ 0.3; packet {}, haproxy {}); \
                 packet / nginx: {} (nginx {})\n",
                ratio(p, h),
                fmt(p),
                fmt(h),
                ratio(p, x),
                fmt(x),
            ));
        }
        let p99 = row("fleet: p99").1;
        out.push_str(&format!(
            "- fleet p99 / direct p99: {} (target ≤ 1.2; packet {} µs, direct {} µs)\n",
            ratio(self.cell(packet, p99), self.cell(direct, p99)),
            fmt(self.cell(packet, p99)),
            fmt(self.cell(direct, p99)),
        ));
        for (label, prefix) in [
            ("idle, machine", "idle: machine memory"),
            ("idle, accounted", "idle: accounted memory"),
            ("idle, proxy-side", "idle: proxy-side memory"),
            ("under load, machine", "fleet: machine memory"),
            ("under load, accounted", "fleet: accounted memory"),
            ("under load, proxy-side", "fleet: proxy-side memory"),
        ] {
            let f = row(prefix).1;
            out.push_str(&format!(
                "- memory per tunnel above direct, {label}: {} B (target ≤ 1024; nginx {} B, haproxy {} B)\n",
                fmt3(self.above_direct(packet, f)),
                fmt(med(self.above_direct(nginx, f))),
                fmt(med(self.above_direct(haproxy, f))),
            ));
        }
        if let Some(kb) = self.packet_maps_kb {
            out.push_str(&format!(
                "- the packet path's eBPF maps take {kb:.0} KB with no tunnel (memlock of the proxy's map fds at \
                 start): not in the per-tunnel rows, which start from a running proxy\n"
            ));
        }
        let busy = median_of(self.rounds.iter().flatten().map(|r| r.machine_busy));
        if busy.is_some_and(|b| b > 0.9) {
            out.push_str(&format!(
                "- the machine was {:.0}% busy during the fleet windows (median): other work filled the CPUs, so \
                 the machine CPU rows measure that work, not the targets'; the attributable rows stand\n",
                busy.unwrap_or(0.0) * 100.0
            ));
        }
        let mut notes: Vec<String> = Vec::new();
        for (i, t) in TARGETS.into_iter().enumerate() {
            for round in &self.rounds[i] {
                for (reason, count) in &round.refusals {
                    if count.is_nan() {
                        notes.push(format!("{}: {reason}", t.name()));
                    } else if *count > 0.0 {
                        notes.push(format!("{}: refusals {reason}: {count}", t.name()));
                    }
                }
                if t == Target::WsplicePacket && round.spliced_fleet_end < self.fleet as f64 {
                    notes.push(format!(
                        "{}: {} of {} fleet tunnels handed over by the window's end",
                        t.name(),
                        round.spliced_fleet_end,
                        self.fleet
                    ));
                }
            }
        }
        for note in notes.iter().chain(&self.notes) {
            out.push_str(&format!("- {}\n", note.replace('\n', " ")));
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let mem = |m: &Mem| {
            serde_json::json!({
                "machine": m.machine, "accounted": m.accounted(), "proxy_side": m.proxy_side(),
                "slab": m.slab, "slab_objects": m.slab_objects, "tcp": m.tcp, "proxy_rss": m.proxy, "echo_rss": m.echo,
                "client_rss": m.client, "maps": m.maps,
            })
        };
        serde_json::json!({
            "hold": self.hold,
            "fleet": self.fleet,
            "window_s": self.window,
            "seconds": self.seconds,
            "packet_maps_kb": self.packet_maps_kb,
            "notes": self.notes,
            "targets": TARGETS.iter().enumerate().map(|(i, t)| serde_json::json!({
                "target": t.name(),
                "rounds": self.rounds[i].iter().map(|r| serde_json::json!({
                    "idle_bytes_per_tunnel": mem(&r.idle),
                    "load_bytes_per_tunnel": mem(&r.load),
                    "p50_us": r.p50_us,
                    "p99_us": r.p99_us,
                    "messages": r.messages,
                    "failures": r.failures,
                    "machine_cpu_s": r.machine_cpu_s,
                    "attributable_cpu_s": r.attributable_cpu_s,
                    "proxy_cpu_s": r.proxy_cpu_s,
                    "ends_cpu_s": r.ends_cpu_s,
                    "irq_cpu_s": r.irq_cpu_s,
                    "machine_busy": r.machine_busy,
                    "spliced_hold": r.spliced_hold,
                    "spliced_fleet": r.spliced_fleet,
                    "spliced_fleet_end": r.spliced_fleet_end,
                    "refusals": r.refusals.iter().filter(|(_, c)| c.is_finite())
                        .map(|(k, c)| (k.clone(), serde_json::Value::from(*c)))
                        .collect::<serde_json::Map<_, _>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_metrics_parse() {
        let text = "wsplice_tunnels_packet_spliced_total 12\n\
                    wsplice_packet_refusals_total{reason=\"not_quiet\"} 3\n\
                    wsplice_packet_refusals_total{reason=\"busy\"} 0\n";
        assert_eq!(metric(text, "tunnels_packet_spliced_total"), 12.0);
        assert_eq!(
            refusals(text),
            vec![("not_quiet".to_owned(), 3.0), ("busy".to_owned(), 0.0)]
        );
    }

    #[test]
    fn configs_name_the_line() {
        let c = wsplice_config(true, &[ECHO_PORT]);
        assert!(c.contains("interfaces = [\"wsbpc\", \"wsbpu\"]"));
        assert!(c.contains("bind = \"10.231.1.1:8080\""));
        assert!(c.contains("servers = [\"10.231.2.2:9000\"]"));
        assert!(!wsplice_config(false, &[ECHO_PORT]).contains("[packet]"));
        assert!(wsplice_config(true, &[9000, 9001])
            .contains("servers = [\"10.231.2.2:9000\", \"10.231.2.2:9001\"]"));
        assert!(haproxy_config().contains("mode tcp"));
    }

    #[test]
    fn nginx_fronts_the_echo_as_a_ws_proxy() {
        let c = nginx_config(Path::new("/tmp/w"));
        for needed in [
            "listen 10.231.1.1:8080 reuseport;",
            "server 10.231.2.2:9000;",
            "proxy_pass http://echo;",
            "proxy_http_version 1.1;",
            "proxy_set_header Upgrade $http_upgrade;",
            "proxy_set_header Connection $connection_upgrade;",
            "proxy_read_timeout 3600s;",
            "proxy_send_timeout 3600s;",
            "worker_processes 2;",
            "worker_rlimit_nofile 20000;",
            "worker_connections 19000;",
            "daemon off;",
            "master_process on;",
            "access_log off;",
            "pid /tmp/w/nginx.pid;",
            "error_log /tmp/w/nginx-error.log warn;",
        ] {
            assert!(c.contains(needed), "missing {needed:?} in\n{c}");
        }
    }

    #[test]
    fn direct_comes_first_and_every_target_has_its_index() {
        assert_eq!(TARGETS[0], Target::Direct);
        for (i, t) in TARGETS.into_iter().enumerate() {
            assert_eq!(t.index(), i);
        }
    }
}

/// The same line at a much larger scale: one proxy, 200,000 idle tunnels.
pub mod scale;
