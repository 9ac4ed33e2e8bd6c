//! `cargo xtask bench`: side-by-side runs of the same load generator against the echo upstream
//! directly, through nginx and HAProxy (Debian packages) and through wsplice on both data paths,
//! in alternation over several rounds: WebSocket workloads, and plain HTTP/1.1 (`http`) on the
//! same listeners. Reports the median and the spread (min–max) of each
//! cell: a markdown table, JSON and SVG charts under `benches/results/`.

mod load;
mod packet;
mod percore;
mod report;
mod targets;
mod tls;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use load::Endpoint;
use targets::{Kind, Layout, Running, Tools, Wss, ECHO_PORT};

/// The workloads `--only` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// MB/s through 1 and 16 tunnels, 64 KiB messages.
    Bulk,
    /// New tunnels per second (upgrade + one echo + close), 64 in parallel.
    Storm,
    /// Ping-pong p50/p99 at 64 connections, 64 B.
    Latency,
    /// N idle tunnels: memory per tunnel.
    Hold,
    /// N connections each sending 64 B every 2 s: p50/p99 and CPU per million messages.
    Fleet,
    /// Over wss://: storm with full handshakes and with resumed sessions, bulk 1 tunnel, and
    /// N idle tunnels' proxy RSS (first round only).
    Wss,
    /// Plain HTTP/1.1: keep-alive GETs/s and p50/p99 at 64 connections.
    Http,
    /// Largest fleet one core serves (p99 ≤ 10 ms, no failure).
    Percore,
    /// The packet splice in three network namespaces beside direct, nginx, HAProxy (TCP) and
    /// the sockmap path: memory per idle tunnel, fleet CPU per million messages and p99. Only
    /// with `--only packet` (about 130 s per round at full scale: 7 minutes for 3 rounds).
    Packet,
    /// One wsplice process on the packet path holding 200,000 idle tunnels (20,000 with
    /// `--quick`) beside the same fleet connected directly: the proxy's RSS, descriptors and
    /// the kernel's memory per tunnel. Only with `--only packet-scale` (a few minutes).
    PacketScale,
}

impl Workload {
    /// Everything, in the order of the report.
    pub const ALL: [Workload; 10] = [
        Workload::Bulk,
        Workload::Storm,
        Workload::Latency,
        Workload::Hold,
        Workload::Fleet,
        Workload::Wss,
        Workload::Http,
        Workload::Percore,
        Workload::Packet,
        Workload::PacketScale,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::Storm => "storm",
            Workload::Latency => "latency",
            Workload::Hold => "hold",
            Workload::Fleet => "fleet",
            Workload::Wss => "wss",
            Workload::Http => "http",
            Workload::Percore => "percore",
            Workload::Packet => "packet",
            Workload::PacketScale => "packet-scale",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    /// Empty: every workload (a quick pass leaves percore out unless asked).
    pub only: Vec<Workload>,
    pub rounds: Option<usize>,
}

/// How large the runs are.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Seconds per bulk/storm/latency run.
    pub seconds: f64,
    /// Bulk warm-up seconds.
    pub warmup: f64,
    /// Idle tunnels in the hold workload.
    pub hold: usize,
    /// Fleet connections, and the measured window in seconds.
    pub fleet: usize,
    pub fleet_window: f64,
    /// Measured seconds of the http workload (after `warmup`).
    pub http_seconds: f64,
    /// Rounds of the alternation.
    pub rounds: usize,
    /// Fleet sizes tried per core, and their window.
    pub percore_steps: &'static [usize],
    pub percore_window: f64,
}

impl Scale {
    /// The full suite (about 21 minutes on 2 cores: 1,168 s before the wss storm ran twice and
    /// the wss hold was added).
    pub const FULL: Scale = Scale {
        seconds: 3.0,
        warmup: 0.5,
        hold: 8000,
        // The largest fleet every proxy serves from one process (2 fds per tunnel, 20,000 fds).
        fleet: 9000,
        fleet_window: 8.0,
        http_seconds: 10.0,
        rounds: 3,
        percore_steps: &[1000, 2000, 4000, 8000, 16000, 32000],
        percore_window: 4.0,
    };
    /// A quick pass (under 2 minutes).
    pub const QUICK: Scale = Scale {
        seconds: 1.0,
        warmup: 0.3,
        hold: 1000,
        fleet: 2000,
        fleet_window: 4.0,
        http_seconds: 3.0,
        rounds: 1,
        percore_steps: &[1000, 2000, 4000],
        percore_window: 4.0,
    };
}

/// One cell: the samples of every round, or why there are none.
#[derive(Debug, Clone, Default)]
pub struct Cell {
    pub samples: Vec<f64>,
    pub note: Option<String>,
}

/// One metric across the targets.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: &'static str,
    pub label: String,
    pub cells: Vec<Cell>,
}

/// Everything measured.
#[derive(Debug, Default)]
pub struct Results {
    pub rows: Vec<Row>,
    /// Errors and remarks, printed under the table.
    pub notes: Vec<String>,
    pub percore: Vec<percore::PercoreResult>,
    pub packet: Option<packet::PacketReport>,
    pub packet_scale: Option<packet::scale::ScaleReport>,
}

impl Results {
    fn row(&mut self, key: &'static str, label: &str) -> &mut Row {
        let index = match self.rows.iter().position(|r| r.key == key) {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    key,
                    label: label.to_owned(),
                    cells: vec![Cell::default(); targets::ALL.len()],
                });
                self.rows.len() - 1
            }
        };
        &mut self.rows[index]
    }

    fn add(&mut self, key: &'static str, label: &str, target: usize, value: f64) {
        self.row(key, label).cells[target].samples.push(value);
    }

    fn note(&mut self, key: &'static str, label: &str, target: usize, note: &str) {
        self.row(key, label).cells[target].note = Some(note.to_owned());
    }
}

/// Progress on stderr: elapsed time, round, target, workload.
struct Progress {
    started: Instant,
}

impl Progress {
    fn say(&self, message: &str) {
        eprintln!(
            "[{:>5.0} s] {message}",
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Everything a run needs.
struct Env {
    load: PathBuf,
    work: PathBuf,
    tools: Tools,
    progress: Progress,
}

pub fn bench(root: &Path, options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut scale = if options.quick {
        Scale::QUICK
    } else {
        Scale::FULL
    };
    if let Some(rounds) = options.rounds {
        scale.rounds = rounds.max(1);
    }
    let workloads: Vec<Workload> = if options.only.is_empty() {
        Workload::ALL
            .into_iter()
            .filter(|w| !(options.quick && *w == Workload::Percore))
            // The packet workloads run only when asked for (`--only packet`, `packet-scale`).
            .filter(|w| !matches!(w, Workload::Packet | Workload::PacketScale))
            .collect()
    } else {
        Workload::ALL
            .into_iter()
            .filter(|w| options.only.contains(w))
            .collect()
    };
    // SIGINT/SIGTERM end the run between steps, so every process started is stopped by PID.
    crate::process::catch_termination().context("cannot handle SIGINT/SIGTERM")?;
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work)?;
    // Many short-lived loopback connections: let new connects reuse TIME_WAIT ports.
    let _ = std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1");
    // Every proxy connects to the one echo address: with the TIME_WAITs of the previous steps,
    // 16,000 upstream connects exhaust the default 28,000 ephemeral ports (EADDRNOTAVAIL, 502).
    // Ports 20000-65535 (above the bench's own 19xxx) for the run; restored when it ends.
    let _ports = Sysctl::set("/proc/sys/net/ipv4/ip_local_port_range", "20000 65535");
    let progress = Progress { started };
    progress.say(&format!(
        "workloads {:?}, {} round(s)",
        workloads.iter().map(|w| w.name()).collect::<Vec<_>>(),
        scale.rounds
    ));
    let nginx = ensure_package("/usr/sbin/nginx", "nginx-light", &progress)?;
    let haproxy = ensure_package("/usr/sbin/haproxy", "haproxy", &progress)?;
    let wsplice = root.join("target/release/wsplice");
    let tls = if workloads.contains(&Workload::Wss) {
        Some(tls::ensure(root)?)
    } else {
        None
    };
    let wsplice_tls_refused = match &tls {
        Some(files) => wsplice_refuses_tls(&wsplice, &work, files)?,
        None => None,
    };
    let mut results = Results::default();
    if let Some(reason) = &wsplice_tls_refused {
        progress.say(&format!("wsplice check refuses a TLS listener: {reason}"));
        results.notes.push(format!(
            "wsplice wss cells are n/a: `wsplice check` refuses a TLS listener: {reason}"
        ));
    }
    let env = Env {
        load: root.join("target/release/wsplice-load"),
        work: work.clone(),
        tools: Tools {
            wsplice,
            nginx,
            haproxy,
            work,
            tls,
            wsplice_tls_refused,
        },
        progress,
    };
    let alternation: Vec<Workload> = workloads
        .iter()
        .copied()
        .filter(|w| {
            !matches!(
                w,
                Workload::Percore | Workload::Packet | Workload::PacketScale
            )
        })
        .collect();
    if !alternation.is_empty() {
        let _echo = targets::start_echo(&env.tools.wsplice, ECHO_PORT, None, &env.work)?;
        for round in 1..=scale.rounds {
            let mut direct_fleet = None;
            for (index, kind) in targets::ALL.into_iter().enumerate() {
                stop_requested()?;
                let at = format!("round {round}/{} · {}", scale.rounds, kind.name());
                run_target(
                    &env,
                    &mut results,
                    &scale,
                    &alternation,
                    (index, kind),
                    &at,
                    round == 1,
                    &mut direct_fleet,
                );
            }
        }
    }
    if workloads.contains(&Workload::Percore) {
        results.percore = percore::run(&env, &scale, &mut results.notes)?;
    }
    if workloads.contains(&Workload::Packet) {
        match packet::run(&env, &scale, scale.rounds) {
            Ok(report) => results.packet = Some(report),
            Err(error) => {
                let message = format!("packet: {error:#}");
                env.progress.say(&message);
                results.notes.push(message);
            }
        }
    }
    if workloads.contains(&Workload::PacketScale) {
        let tunnels = if options.quick {
            packet::scale::QUICK_TUNNELS
        } else {
            packet::scale::FULL_TUNNELS
        };
        match packet::scale::run(&env, tunnels) {
            Ok(report) => results.packet_scale = Some(report),
            Err(error) => {
                let message = format!("packet-scale: {error:#}");
                env.progress.say(&message);
                results.notes.push(message);
            }
        }
    }
    stop_requested()?;
    let header = report::Header::collect(root, &env.tools, &scale, &workloads, started);
    // A run of every workload is `latest`; an `--only` run gets its own name.
    let stem = if options.only.is_empty() {
        "latest".to_owned()
    } else {
        format!(
            "latest-{}",
            workloads
                .iter()
                .map(|w| w.name())
                .collect::<Vec<_>>()
                .join("-")
        )
    };
    // The committed results are a full run's: `--quick` and `--only` runs are written beside
    // them (git-ignored), never over them.
    let folder = if options.quick || !options.only.is_empty() {
        "benches/results/partial"
    } else {
        "benches/results"
    };
    report::write(root, folder, &stem, &header, &results)?;
    env.progress.say("done");
    Ok(())
}

/// A sysctl set for the run and restored when dropped.
struct Sysctl {
    path: &'static str,
    old: Option<String>,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = std::fs::read_to_string(path).ok();
        let old = match std::fs::write(path, value) {
            Ok(()) => old,
            Err(_) => None,
        };
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = std::fs::write(self.path, old.trim());
        }
    }
}

/// Fails once SIGINT or SIGTERM arrived (the callers' guards then stop their processes).
pub(crate) fn stop_requested() -> anyhow::Result<()> {
    match crate::process::termination_requested() {
        Some(signal) => bail!("stopped by signal {signal}"),
        None => Ok(()),
    }
}

/// Runs every workload of the alternation against one target, once.
#[allow(clippy::too_many_arguments)]
fn run_target(
    env: &Env,
    results: &mut Results,
    scale: &Scale,
    workloads: &[Workload],
    (index, kind): (usize, Kind),
    at: &str,
    first_round: bool,
    direct_fleet: &mut Option<f64>,
) {
    env.progress.say(&format!("{at}: starting"));
    let layout = Layout {
        workers: 2,
        processes: 1,
        pin: None,
        tls: workloads.contains(&Workload::Wss),
        echo_port: ECHO_PORT,
    };
    let running = match targets::start(kind, &layout, &env.tools) {
        Ok(running) => running,
        Err(error) => {
            let message = format!("{at}: cannot start: {error:#}");
            env.progress.say(&message);
            results.notes.push(message);
            return;
        }
    };
    for &workload in workloads {
        if crate::process::termination_requested().is_some() {
            break;
        }
        env.progress.say(&format!("{at} · {}", workload.name()));
        if let Err(error) = run_workload(
            env,
            results,
            scale,
            workload,
            (index, kind),
            &running,
            first_round,
            direct_fleet,
        ) {
            let message = format!("{at} · {}: {error:#}", workload.name());
            env.progress.say(&message);
            results.notes.push(message);
        }
    }
    let stopping = Instant::now();
    drop(running);
    if stopping.elapsed() > Duration::from_secs(1) {
        let message = format!(
            "{at}: took {:.1} s to stop after SIGTERM: tunnels still open after every client had left",
            stopping.elapsed().as_secs_f64()
        );
        env.progress.say(&message);
        results.notes.push(message);
    }
}

#[allow(clippy::too_many_arguments)]
fn run_workload(
    env: &Env,
    results: &mut Results,
    scale: &Scale,
    workload: Workload,
    (index, kind): (usize, Kind),
    running: &Running,
    first_round: bool,
    direct_fleet: &mut Option<f64>,
) -> anyhow::Result<()> {
    let plain = Endpoint {
        url: format!("ws://127.0.0.1:{}/bench", running.port),
        ca: None,
    };
    let seconds = scale.seconds.to_string();
    let warmup = scale.warmup.to_string();
    let f = |json: &serde_json::Value, key: &str| json[key].as_f64().unwrap_or(0.0);
    match workload {
        Workload::Bulk => {
            for (key, label, conns) in [
                ("bulk1", "bulk 1 tunnel, MB/s", "1"),
                ("bulk16", "bulk 16 tunnels, MB/s", "16"),
            ] {
                let cpu_before = load::process_cpu_seconds(&running.pids);
                let json = load::run_json(
                    &env.load,
                    "bulk",
                    &plain,
                    &["--conns", conns, "--seconds", &seconds, "--warmup", &warmup],
                )?;
                let cpu = load::process_cpu_seconds(&running.pids) - cpu_before;
                results.add(key, label, index, f(&json, "mb_per_s"));
                if conns == "1" && !running.pids.is_empty() {
                    let gb = f(&json, "echoed_bytes_total") / 1e9;
                    results.add(
                        "bulk1_cpu_per_gb",
                        "bulk 1 tunnel: proxy process CPU-s per GB echoed",
                        index,
                        if gb > 0.0 { cpu / gb } else { 0.0 },
                    );
                }
            }
        }
        Workload::Storm => {
            let json = load::run_json(
                &env.load,
                "storm",
                &plain,
                &["--conns", "64", "--seconds", &seconds],
            )?;
            results.add(
                "storm",
                "storm: new tunnels/s (upgrade + echo + close), 64 in parallel",
                index,
                f(&json, "per_second"),
            );
        }
        Workload::Latency => {
            let json = load::run_json(
                &env.load,
                "latency",
                &plain,
                &["--conns", "64", "--seconds", &seconds],
            )?;
            results.add(
                "latency_p50",
                "latency p50 at 64 conns, 64 B, µs",
                index,
                f(&json, "p50_us"),
            );
            results.add(
                "latency_p99",
                "latency p99 at 64 conns, 64 B, µs",
                index,
                f(&json, "p99_us"),
            );
        }
        Workload::Hold => {
            let held = load::hold(&env.load, &plain, scale.hold, &running.pids, &[])?;
            let n = scale.hold;
            results.add(
                "hold_rss",
                &format!("proxy RSS per idle tunnel ({n} held), KB"),
                index,
                held.rss_kb,
            );
            results.add(
                "hold_slab",
                &format!("kernel slab per idle tunnel, all its sockets ({n} held), KB"),
                index,
                held.slab_kb,
            );
            results.add(
                "hold_machine",
                &format!("machine-wide memory per idle tunnel, MemAvailable drop incl. load side ({n} held), KB"),
                index,
                held.machine_kb,
            );
        }
        Workload::Fleet => {
            let n = scale.fleet;
            let run = load::fleet(&env.load, &plain, n, scale.fleet_window, None, &env.work)?;
            results.add(
                "fleet_p50",
                &format!("fleet p50 round trip ({n} conns, 64 B every 2 s), µs"),
                index,
                run.p50_us,
            );
            results.add(
                "fleet_p99",
                &format!("fleet p99 round trip ({n} conns), µs"),
                index,
                run.p99_us,
            );
            results.add(
                "fleet_messages",
                &format!("fleet messages echoed in {} s", scale.fleet_window),
                index,
                run.messages as f64,
            );
            results.add(
                "fleet_failures",
                "fleet failures (connect, error, echo later than 2 s)",
                index,
                run.failures as f64,
            );
            results.add(
                "fleet_cpu",
                "fleet machine CPU-s per million messages (total)",
                index,
                run.cpu_per_million(),
            );
            if kind == Kind::Direct {
                *direct_fleet = Some(run.cpu_per_million());
            } else if let Some(direct) = *direct_fleet {
                results.add(
                    "fleet_cpu_proxy",
                    "fleet CPU-s per million messages attributable to the proxy (total − direct)",
                    index,
                    run.cpu_per_million() - direct,
                );
            }
            if let Some(error) = run.first_error {
                results
                    .notes
                    .push(format!("{} fleet: first error: {error}", kind.name()));
            }
        }
        Workload::Wss => wss(env, results, scale, index, running, first_round)?,
        Workload::Http => http(env, results, scale, index, kind, running)?,
        Workload::Percore | Workload::Packet | Workload::PacketScale => {}
    }
    Ok(())
}

/// The storm over wss://, once per client resumption mode: (`--resumption`, row key, label).
const WSS_STORMS: [(&str, &str, &str); 2] = [
    (
        "full",
        "wss_storm_full",
        "wss storm, full handshakes: new tunnels/s (TLS + upgrade + echo + close), 64 in parallel",
    ),
    (
        "resumed",
        "wss_storm_resumed",
        "wss storm, resumed sessions: new tunnels/s (TLS resumption + upgrade + echo + close), 64 in parallel",
    ),
];

/// The proxy's own CPU per tunnel in each storm (the load generator, one thread on the same
/// two cores, caps the tunnels per second of every target alike).
const WSS_STORM_CPU: [(&str, &str); 2] = [
    (
        "wss_storm_full_cpu",
        "wss storm, full handshakes: proxy process CPU-µs per tunnel",
    ),
    (
        "wss_storm_resumed_cpu",
        "wss storm, resumed sessions: proxy process CPU-µs per tunnel",
    ),
];

/// Handshakes in flight while the wss hold connects: the load generator's TLS work overlaps the
/// proxy's (8,000 tunnels in about 5 s instead of 7; the proxy's RSS per tunnel is the same).
const WSS_HOLD_CONNECT_PARALLEL: &str = "4";

/// The wss workload: the storm with full handshakes only and with every loop resuming its
/// previous session, bulk 1 tunnel, and (first round only: RSS per idle tunnel does not move
/// between rounds, and 8,000 TLS handshakes per target are a minute of the run) the proxy's RSS
/// per idle wss tunnel.
fn wss(
    env: &Env,
    results: &mut Results,
    scale: &Scale,
    index: usize,
    running: &Running,
    first_round: bool,
) -> anyhow::Result<()> {
    let n = scale.hold;
    let resumed_key = "wss_storm_resumed_share";
    let resumed_label = "wss storm, resumed sessions: share of handshakes resumed, %";
    let bulk_label = "wss bulk 1 tunnel, MB/s";
    let hold_key = "wss_hold_rss";
    let hold_label = format!("proxy RSS per idle wss tunnel ({n} held, first round), KB");
    let port = match &running.wss {
        Wss::Unavailable(why) => {
            for (_, key, label) in WSS_STORMS {
                results.note(key, label, index, why);
            }
            for (key, label) in WSS_STORM_CPU {
                results.note(key, label, index, why);
            }
            results.note(resumed_key, resumed_label, index, why);
            results.note("wss_bulk1", bulk_label, index, why);
            results.note(hold_key, &hold_label, index, why);
            return Ok(());
        }
        Wss::Port(port) => *port,
    };
    let tls = Endpoint {
        url: format!("wss://127.0.0.1:{port}/bench"),
        ca: env
            .tools
            .tls
            .as_ref()
            .map(|t| t.ca.to_string_lossy().into_owned()),
    };
    let seconds = scale.seconds.to_string();
    let f = |json: &serde_json::Value, key: &str| json[key].as_f64().unwrap_or(0.0);
    for ((mode, key, label), (cpu_key, cpu_label)) in WSS_STORMS.into_iter().zip(WSS_STORM_CPU) {
        let cpu_before = load::process_cpu_seconds(&running.pids);
        let json = load::run_json(
            &env.load,
            "storm",
            &tls,
            &["--conns", "64", "--seconds", &seconds, "--resumption", mode],
        )?;
        let cpu = load::process_cpu_seconds(&running.pids) - cpu_before;
        results.add(key, label, index, f(&json, "per_second"));
        let tunnels = f(&json, "tunnels");
        if tunnels > 0.0 {
            results.add(cpu_key, cpu_label, index, cpu / tunnels * 1e6);
        }
        let (handshakes, resumed) = (f(&json, "tls_handshakes"), f(&json, "tls_resumed"));
        if mode == "resumed" && handshakes > 0.0 {
            results.add(
                resumed_key,
                resumed_label,
                index,
                resumed / handshakes * 100.0,
            );
        }
        let tls12 = handshakes - f(&json, "tls13_handshakes");
        if tls12 > 0.0 {
            // The rows compare TLS 1.3 handshakes: a TLS 1.2 resumption skips the key exchange.
            results.notes.push(format!(
                "{} wss storm, {mode}: {tls12} of {handshakes} handshakes were TLS 1.2",
                targets::ALL[index].name()
            ));
        }
        if mode == "full" && resumed > 0.0 {
            // The client offers no session: a resumption here would be a bug of the client.
            results.notes.push(format!(
                "{} wss storm, full handshakes: {resumed} of {handshakes} handshakes resumed",
                targets::ALL[index].name()
            ));
        }
    }
    let json = load::run_json(
        &env.load,
        "bulk",
        &tls,
        &[
            "--conns",
            "1",
            "--seconds",
            &seconds,
            "--warmup",
            &scale.warmup.to_string(),
        ],
    )?;
    results.add("wss_bulk1", bulk_label, index, f(&json, "mb_per_s"));
    if first_round {
        // Full handshakes: every held tunnel has the same history, whatever the target's tickets.
        let held = load::hold(
            &env.load,
            &tls,
            n,
            &running.pids,
            &[
                "--resumption",
                "full",
                "--connect-parallel",
                WSS_HOLD_CONNECT_PARALLEL,
            ],
        )?;
        results.add(hold_key, &hold_label, index, held.rss_kb);
    }
    Ok(())
}

/// Client connections of the http workload.
const HTTP_CONNS: usize = 64;

/// The http workload: keep-alive GETs through `running` to the echo's plain HTTP. A target that
/// answers anything but 200 (wsplice before it proxied plain HTTP: 426) fails its cells with the
/// statuses seen, and the run goes on.
fn http(
    env: &Env,
    results: &mut Results,
    scale: &Scale,
    index: usize,
    kind: Kind,
    running: &Running,
) -> anyhow::Result<()> {
    let at = Endpoint {
        url: format!("http://127.0.0.1:{}/bench", running.port),
        ca: None,
    };
    let cpu_before = load::process_cpu_seconds(&running.pids);
    let json = load::run_json(
        &env.load,
        "http",
        &at,
        &[
            "--conns",
            &HTTP_CONNS.to_string(),
            "--seconds",
            &scale.http_seconds.to_string(),
            "--warmup",
            &scale.warmup.to_string(),
        ],
    )?;
    let cpu = load::process_cpu_seconds(&running.pids) - cpu_before;
    let f = |key: &str| json[key].as_f64().unwrap_or(0.0);
    let n = HTTP_CONNS;
    let rows = [
        ("http_rps", format!("http keep-alive GETs/s at {n} conns")),
        ("http_p50", format!("http GET p50 at {n} conns, µs")),
        ("http_p99", format!("http GET p99 at {n} conns, µs")),
        (
            "http_upstream",
            "http upstream connections the answers came over (echo serials)".to_owned(),
        ),
    ];
    let errors_label = "http errors (non-200 answers, broken connections, timeouts)";
    results.add("http_errors", errors_label, index, f("errors"));
    let first_error = json["first_error"].as_str().unwrap_or("none");
    if f("non_200") > 0.0 || f("requests") == 0.0 {
        let statuses = json["statuses"]
            .as_object()
            .map(|s| {
                s.iter()
                    .map(|(status, count)| format!("{count}×{status}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let why = if statuses.is_empty() {
            "failed: no answer".to_owned()
        } else {
            format!("failed: {statuses}")
        };
        for (key, label) in &rows {
            results.note(key, label, index, &why);
        }
        let prefix = format!("{} http: ", kind.name());
        let message = format!(
            "{prefix}{why}, {} broken connections; first error: {first_error}",
            f("failures")
        );
        env.progress.say(&message);
        // One note per target: the cells show every round's statuses.
        if !results.notes.iter().any(|n| n.starts_with(&prefix)) {
            results.notes.push(message);
        }
        return Ok(());
    }
    let values = [
        f("per_second"),
        f("p50_us"),
        f("p99_us"),
        f("upstream_connections"),
    ];
    for ((key, label), value) in rows.iter().zip(values) {
        results.add(key, label, index, value);
    }
    // Every request of the run, warm-up included, is what the proxy's CPU is divided by.
    let answered = f("answered");
    if !running.pids.is_empty() && answered > 0.0 {
        results.add(
            "http_cpu",
            "http: proxy process CPU-µs per request",
            index,
            cpu / answered * 1e6,
        );
    }
    if f("failures") > 0.0 {
        results.notes.push(format!(
            "{} http: {} broken connections or timeouts; first error: {first_error}",
            kind.name(),
            f("failures")
        ));
    }
    Ok(())
}

/// The path of a Debian package's binary, installing the package when missing.
fn ensure_package(binary: &str, package: &str, progress: &Progress) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(binary);
    if path.is_file() {
        return Ok(path);
    }
    progress.say(&format!("installing {package} from Debian packages"));
    crate::setup::apt_install(&[package])?;
    if !path.is_file() {
        bail!("{package} is installed but {binary} is missing");
    }
    Ok(path)
}

/// `None` when this wsplice build accepts a TLS listener (`wsplice check`), else its reason.
fn wsplice_refuses_tls(
    wsplice: &Path,
    work: &Path,
    files: &tls::TlsFiles,
) -> anyhow::Result<Option<String>> {
    let conf = work.join("wsplice-tls-check.toml");
    std::fs::write(
        &conf,
        targets::wsplice_config(19999, ECHO_PORT, Some((19998, files))),
    )?;
    let output = Command::new(wsplice)
        .arg("check")
        .arg(&conf)
        .output()
        .context("cannot run wsplice check")?;
    if output.status.success() {
        return Ok(None);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("refused")
        .trim()
        .to_owned();
    Ok(Some(reason))
}
