//! The `packet-scale` workload: one wsplice process on the packet path holding a very large
//! fleet of idle tunnels (200,000 at full scale, 20,000 in a quick pass), beside the same
//! fleet connected directly, in the packet workload's line of three namespaces.
//!
//! No process may hold more than 20,000 descriptors here, so the ends are spread out:
//! - the load side over processes of 5,000 tunnels each, and over client source addresses of
//!   10,000 tunnels each (one address to one listener gives 55,000 ports, but connect's search
//!   for a free one slows down long before they run out);
//! - the upstream side over echo processes of at most 15,000 tunnels, each on its own port
//!   (the packet path takes the upstream connection's local port from its reserved range, per
//!   local address and upstream address: 20,000 per echo port).
//!
//! The proxy itself holds no socket for a tunnel once it is packet-spliced, only a record and
//! two flow entries; this run shows it: the proxy's RSS, its descriptors and the kernel's
//! memory per tunnel, measured against the same fleet with no proxy (`direct`). Each target
//! gets fresh namespaces, so nothing of the previous target (TIME_WAITs) is left in the
//! measurement. After the tunnels are held (and, on the packet path, handed over) every load
//! process checks that a sample of its tunnels still echoes.

use std::io::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{
    line_reader, metric, per_tunnel, refusals, slab_caches, snapshot_settled, threads_cpu_seconds,
    wait_spliced, Line, Mem, Pids, CLIENT, ECHO_PORT, PROXY_PORT, PROXY_TO_CLIENT, UPSTREAM,
};
use crate::bench::targets::{pids_of, Guard};
use crate::bench::{stop_requested, Env};

/// Idle tunnels of a full run and of a quick pass.
pub const FULL_TUNNELS: usize = 200_000;
pub const QUICK_TUNNELS: usize = 20_000;
/// Tunnels per load-generator process (well under its 20,000 descriptors).
const PER_LOAD_PROCESS: usize = 5_000;
/// Tunnels per echo process and port (one descriptor each; and at most 20,000 per echo port on
/// the packet path, the size of the reserved port range).
const PER_ECHO: usize = 15_000;
/// Tunnels per client source address. One address to one listener has 55,000 ports, but the
/// kernel's connect looks for a free one by walking them: at 40,000 per address the load
/// generators' connects took 90% of the machine in `__inet_check_established` and the fleet
/// took 266 s to connect instead of 14 s.
const PER_CLIENT_ADDRESS: usize = 10_000;
/// How long the proxy's CPU is measured while it holds the idle fleet.
const IDLE_CPU_WINDOW: Duration = Duration::from_secs(10);
/// Handshakes in flight per load process.
const CONNECT_PARALLEL: &str = "8";

/// The two targets of the scale run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTarget {
    Direct,
    WsplicePacket,
}

impl ScaleTarget {
    pub fn name(self) -> &'static str {
        match self {
            ScaleTarget::Direct => "direct",
            ScaleTarget::WsplicePacket => "wsplice packet",
        }
    }
}

/// What one target measured.
#[derive(Debug, Clone)]
pub struct ScaleRun {
    pub target: ScaleTarget,
    /// Tunnels every load process reported held (and echoing a sample).
    pub held: usize,
    /// Seconds from the first load process's start to the last one's `ready`.
    pub connect_seconds: f64,
    /// Packet path: tunnels handed over; refusals by reason.
    pub spliced: f64,
    pub refusals: Vec<(String, f64)>,
    /// Memory per tunnel (before vs held).
    pub mem: Mem,
    /// The proxy's RSS and descriptors while holding the fleet.
    pub proxy_rss_kb: f64,
    pub proxy_fds: usize,
    /// The proxy's CPU while it holds the idle fleet, share of one core (over 10 s: its flows
    /// are looked at up to 10 s apart).
    pub proxy_cpu_idle: f64,
    /// The kernel slab caches that grew most per tunnel (name, bytes per tunnel).
    pub slab_caches: Vec<(String, f64)>,
    /// Tunnels checked again after the hold (a sample per load process) and failures.
    pub checked: usize,
    pub check_failures: Vec<String>,
}

/// Everything the scale workload measured.
#[derive(Debug, Default)]
pub struct ScaleReport {
    pub tunnels: usize,
    pub runs: Vec<ScaleRun>,
    pub notes: Vec<String>,
    pub seconds: f64,
}

/// Runs both targets once with `tunnels` idle tunnels each.
pub fn run(env: &Env, tunnels: usize) -> anyhow::Result<ScaleReport> {
    let started = Instant::now();
    let mut report = ScaleReport {
        tunnels,
        ..ScaleReport::default()
    };
    // A first direct pass, not reported, warms the kernel's caches: the slab pages it grows
    // stay for the passes after it (without it, direct, run first, showed 1.5 KB more kernel
    // slab per tunnel than the packet path run after it).
    let passes = [
        (ScaleTarget::Direct, false),
        (ScaleTarget::WsplicePacket, true),
        (ScaleTarget::Direct, true),
    ];
    for (target, reported) in passes {
        stop_requested()?;
        env.progress.say(&format!(
            "packet-scale · {}: {tunnels} idle tunnels{}",
            target.name(),
            if reported {
                ""
            } else {
                " (warm-up, not reported)"
            }
        ));
        match hold_fleet(env, target, tunnels) {
            Ok(_) if !reported => {}
            Ok(run) => {
                env.progress.say(&format!(
                    "packet-scale · {}: {} held in {:.0} s, proxy RSS {:.0} MB, {} proxy fds",
                    target.name(),
                    run.held,
                    run.connect_seconds,
                    run.proxy_rss_kb / 1024.0,
                    run.proxy_fds
                ));
                report.runs.push(run);
            }
            Err(error) => {
                let message = format!("packet-scale · {}: {error:#}", target.name());
                env.progress.say(&message);
                report.notes.push(message);
            }
        }
        // The namespaces are gone; their sockets are freed by the kernel's cleanup work.
        std::thread::sleep(Duration::from_secs(3));
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// How many processes and addresses `tunnels` are spread over.
struct Spread {
    load_processes: usize,
    echoes: usize,
    client_addresses: usize,
}

impl Spread {
    fn of(tunnels: usize) -> Spread {
        let load_processes = tunnels.div_ceil(PER_LOAD_PROCESS).max(1);
        // Direct: load process `i` connects to echo `i % echoes`: no echo may get more than
        // PER_ECHO tunnels that way either.
        let mut echoes = tunnels.div_ceil(PER_ECHO).max(1);
        while load_processes.div_ceil(echoes) * PER_LOAD_PROCESS > PER_ECHO {
            echoes += 1;
        }
        Spread {
            load_processes,
            echoes,
            client_addresses: tunnels.div_ceil(PER_CLIENT_ADDRESS).max(1),
        }
    }

    /// The tunnels of load process `i` (the last takes what is left).
    fn conns(&self, tunnels: usize, i: usize) -> usize {
        if i + 1 == self.load_processes {
            tunnels - PER_LOAD_PROCESS * i
        } else {
            PER_LOAD_PROCESS
        }
    }
}

/// Client source address `i`: the line's own client address first, then 10.231.1.10 and on.
fn client_address(i: usize) -> String {
    if i == 0 {
        CLIENT.to_owned()
    } else {
        format!("10.231.1.{}", 9 + i)
    }
}

fn echo_port(i: usize) -> u16 {
    ECHO_PORT + i as u16
}

/// One target: fresh namespaces, echoes and proxy; the fleet connected, held, measured,
/// checked, then everything stopped.
fn hold_fleet(env: &Env, target: ScaleTarget, tunnels: usize) -> anyhow::Result<ScaleRun> {
    let spread = Spread::of(tunnels);
    let line = Line::build()?;
    for i in 1..spread.client_addresses {
        super::ip(&[
            "-n",
            &line.client,
            "addr",
            "add",
            &format!("{}/24", client_address(i)),
            "dev",
            super::IF_CLIENT,
        ])?;
    }
    // The client namespace gives every source address 10000-65000; TIME_WAITs do not matter
    // (the namespaces are new).
    let work = env.work.join("packet-scale");
    std::fs::create_dir_all(&work)?;
    let mut echoes = Vec::new();
    for i in 0..spread.echoes {
        let log = work.join(format!("echo-{i}.log"));
        let listen = format!("{UPSTREAM}:{}", echo_port(i));
        let mut guard = vec![line.spawn(
            &line.upstream,
            &env.tools.wsplice,
            &["echo", "--listen", &listen, "--small-buffers"],
            &log,
        )?];
        line.wait_listening(&line.upstream, UPSTREAM, echo_port(i), &mut guard, &log)?;
        echoes.extend(guard);
    }
    let echo_pids: Vec<u32> = echoes.iter().map(|g| g.0.id()).collect();
    let mut proxy = Vec::new();
    let mut proxy_pids = Vec::new();
    match target {
        ScaleTarget::Direct => line.sysctl(&line.proxy, "net.ipv4.ip_forward", "1")?,
        ScaleTarget::WsplicePacket => {
            let conf = work.join("wsplice.toml");
            let ports: Vec<u16> = (0..spread.echoes).map(echo_port).collect();
            std::fs::write(&conf, super::wsplice_config(true, &ports))?;
            let log = work.join("wsplice.log");
            let conf = conf.to_string_lossy().into_owned();
            proxy.push(line.spawn(
                &line.proxy,
                &env.tools.wsplice,
                &["run", "-c", &conf, "--datapath", "packet", "--workers", "2"],
                &log,
            )?);
            line.wait_listening(&line.proxy, PROXY_TO_CLIENT, PROXY_PORT, &mut proxy, &log)?;
            std::thread::sleep(Duration::from_millis(300));
            proxy_pids = pids_of(&proxy);
        }
    }
    let url = |i: usize| match target {
        ScaleTarget::Direct => format!("ws://{UPSTREAM}:{}/scale", echo_port(i % spread.echoes)),
        ScaleTarget::WsplicePacket => format!("ws://{PROXY_TO_CLIENT}:{PROXY_PORT}/scale"),
    };
    let before_metrics = line.metrics();
    std::thread::sleep(Duration::from_millis(300));
    let mut pids = Pids {
        proxy: proxy_pids.clone(),
        echo: echo_pids,
        client: Vec::new(),
    };
    let before = snapshot_settled(&pids);
    let caches_before = slab_caches();
    let connecting = Instant::now();
    let mut loads = Vec::new();
    for i in 0..spread.load_processes {
        let log = work.join(format!("load-{i}.log"));
        let mut child = Guard(
            line.command(&line.client, &env.load)
                .args(["hold", "--url", &url(i)])
                .args(["--conns", &spread.conns(tunnels, i).to_string()])
                .args(["--connect-parallel", CONNECT_PARALLEL])
                .args(["--source", &client_address(i % spread.client_addresses)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("cannot run wsplice-load hold")?,
        );
        let lines = line_reader(child.0.stdout.take().context("no stdout")?);
        pids.client.push(child.0.id());
        loads.push((child, lines, log));
    }
    // Every load process connects its tunnels, checks a sample and says `ready`.
    let deadline = Instant::now() + Duration::from_secs(60 + tunnels as u64 / 100);
    for (i, (_, lines, log)) in loads.iter().enumerate() {
        let ready = next_line(lines, deadline)?;
        if ready.as_deref().map(str::trim) != Some("ready") {
            bail!(
                "load process {i} did not get ready ({ready:?}): {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            );
        }
    }
    let connect_seconds = connecting.elapsed().as_secs_f64();
    let mut run = ScaleRun {
        target,
        held: tunnels,
        connect_seconds,
        spliced: 0.0,
        refusals: Vec::new(),
        mem: Mem::default(),
        proxy_rss_kb: 0.0,
        proxy_fds: 0,
        proxy_cpu_idle: 0.0,
        slab_caches: Vec::new(),
        checked: 0,
        check_failures: Vec::new(),
    };
    if target == ScaleTarget::WsplicePacket {
        let spliced_before = metric(&before_metrics, "tunnels_packet_spliced_total");
        run.spliced = wait_spliced(&line, spliced_before, tunnels, Duration::from_secs(120));
        run.refusals = refusals(&line.metrics());
    }
    std::thread::sleep(Duration::from_secs(2));
    let held = snapshot_settled(&pids);
    run.slab_caches = cache_growth(&caches_before, &slab_caches(), tunnels);
    run.mem = per_tunnel(&before, &held, tunnels);
    run.proxy_rss_kb = held.proxy;
    run.proxy_fds = proxy_pids.iter().map(|pid| descriptors(*pid)).sum();
    let cpu_before = threads_cpu_seconds(&proxy_pids);
    std::thread::sleep(IDLE_CPU_WINDOW);
    run.proxy_cpu_idle =
        (threads_cpu_seconds(&proxy_pids) - cpu_before) / IDLE_CPU_WINDOW.as_secs_f64();
    // Every load process checks a sample of its tunnels again: they still carry bytes.
    for (child, _, _) in loads.iter_mut() {
        if let Some(stdin) = child.0.stdin.as_mut() {
            let _ = stdin.write_all(b"check\n");
            let _ = stdin.flush();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, (_, lines, _)) in loads.iter().enumerate() {
        match next_line(lines, deadline)? {
            Some(answer) => match answer.trim().strip_prefix("checked ") {
                Some(count) => run.checked += count.parse::<usize>().unwrap_or(0),
                None => run
                    .check_failures
                    .push(format!("load {i}: {}", answer.trim())),
            },
            None => run
                .check_failures
                .push(format!("load {i}: no answer to the check")),
        }
    }
    // Closing stdin ends each holder; the guards stop them by PID if they do not.
    for (child, _, _) in loads.iter_mut() {
        drop(child.0.stdin.take());
    }
    let stop_by = Instant::now() + Duration::from_secs(30);
    for (child, _, _) in loads.iter_mut() {
        while Instant::now() < stop_by && matches!(child.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(loads);
    drop(proxy);
    drop(echoes);
    drop(line);
    Ok(run)
}

/// The next line a load process writes, waiting at most until `deadline` (`None`: none came,
/// or the process ended); Ctrl-C ends the wait at once (every process is stopped by its guard).
fn next_line(
    lines: &std::sync::mpsc::Receiver<String>,
    deadline: Instant,
) -> anyhow::Result<Option<String>> {
    loop {
        stop_requested()?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match lines.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => return Ok(Some(line)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(None),
        }
    }
}

/// The twelve caches that grew most from `before` to `after`, in bytes per tunnel.
fn cache_growth(
    before: &std::collections::HashMap<String, f64>,
    after: &std::collections::HashMap<String, f64>,
    tunnels: usize,
) -> Vec<(String, f64)> {
    let mut growth: Vec<(String, f64)> = after
        .iter()
        .map(|(name, bytes)| {
            let grown = bytes - before.get(name).copied().unwrap_or(0.0);
            (name.clone(), grown / tunnels.max(1) as f64)
        })
        .collect();
    growth.sort_by(|a, b| b.1.total_cmp(&a.1));
    growth.truncate(12);
    growth
}

/// Descriptors process `pid` has open.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count())
}

impl ScaleReport {
    /// The report's section.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "\n\n**Packet splice at scale** ({} idle tunnels held by one wsplice process on the \
             packet path, beside the same fleet connected directly; the line of three network \
             namespaces of the packet workload, fresh for each target; load processes of \
             {PER_LOAD_PROCESS} tunnels over {} client addresses, echo processes of at most \
             {PER_ECHO} tunnels on their own ports; a first direct pass warms the kernel's \
             caches and is not reported; whole workload {:.0} s). Memory per tunnel is the \
             change from before the fleet connected to while it is held:\n\n",
            self.tunnels,
            Spread::of(self.tunnels).client_addresses,
            self.seconds
        );
        out.push_str("| | ");
        out.push_str(
            &self
                .runs
                .iter()
                .map(|r| r.target.name())
                .collect::<Vec<_>>()
                .join(" | "),
        );
        out.push_str(" |\n|---|");
        out.push_str(&"---:|".repeat(self.runs.len()));
        out.push('\n');
        let row = |out: &mut String, name: &str, value: &dyn Fn(&ScaleRun) -> String| {
            out.push_str(&format!("| {name} |"));
            for run in &self.runs {
                out.push_str(&format!(" {} |", value(run)));
            }
            out.push('\n');
        };
        row(&mut out, "tunnels held", &|r| r.held.to_string());
        row(&mut out, "connected in, s", &|r| {
            format!("{:.0}", r.connect_seconds)
        });
        row(&mut out, "handed over to the packet splice", &|r| {
            if r.target == ScaleTarget::WsplicePacket {
                format!("{:.0}", r.spliced)
            } else {
                "–".to_owned()
            }
        });
        row(&mut out, "tunnels checked again while held (echo)", &|r| {
            format!("{} ({} failed)", r.checked, r.check_failures.len())
        });
        row(&mut out, "proxy RSS while holding, MB", &|r| {
            format!("{:.1}", r.proxy_rss_kb / 1024.0)
        });
        row(&mut out, "proxy CPU while holding, % of a core", &|r| {
            format!("{:.1}", r.proxy_cpu_idle * 100.0)
        });
        row(&mut out, "proxy descriptors while holding", &|r| {
            r.proxy_fds.to_string()
        });
        let bytes = |f: fn(&Mem) -> f64| move |r: &ScaleRun| format!("{:.0}", f(&r.mem));
        row(
            &mut out,
            "machine memory per tunnel (MemAvailable drop), B",
            &bytes(|m| m.machine),
        );
        row(
            &mut out,
            "kernel slab objects in use per tunnel (/proc/slabinfo), B",
            &bytes(|m| m.slab_objects),
        );
        row(
            &mut out,
            "kernel slab pages per tunnel (Slab:), B",
            &bytes(|m| m.slab),
        );
        row(
            &mut out,
            "TCP buffer pages per tunnel, B",
            &bytes(|m| m.tcp),
        );
        row(&mut out, "proxy RSS per tunnel, B", &bytes(|m| m.proxy));
        row(
            &mut out,
            "proxy eBPF map memlock per tunnel, B",
            &bytes(|m| m.maps),
        );
        row(
            &mut out,
            "proxy-side memory per tunnel (slab objects + TCP pages + proxy RSS), B",
            &bytes(Mem::proxy_side),
        );
        row(&mut out, "echo RSS per tunnel, B", &bytes(|m| m.echo));
        row(
            &mut out,
            "load generator RSS per tunnel, B",
            &bytes(|m| m.client),
        );
        let direct = self.runs.iter().find(|r| r.target == ScaleTarget::Direct);
        let packet = self
            .runs
            .iter()
            .find(|r| r.target == ScaleTarget::WsplicePacket);
        if let (Some(direct), Some(packet)) = (direct, packet) {
            out.push_str(&format!(
                "\nAbove direct, per tunnel: proxy-side memory {:.0} B (kernel slab objects {:.0} \
                 B, TCP pages {:.0} B, proxy RSS {:.0} B; the flow entries are slab objects), \
                 machine memory {:.0} B (target ≤ 1024 B).\n",
                packet.mem.proxy_side() - direct.mem.proxy_side(),
                packet.mem.slab_objects - direct.mem.slab_objects,
                packet.mem.tcp - direct.mem.tcp,
                packet.mem.proxy,
                packet.mem.machine - direct.mem.machine,
            ));
        }
        for run in &self.runs {
            let caches: Vec<String> = run
                .slab_caches
                .iter()
                .map(|(name, bytes)| format!("{name} {bytes:.0}"))
                .collect();
            out.push_str(&format!(
                "\n- {}: the slab caches that grew most, B per tunnel: {}",
                run.target.name(),
                caches.join(", ")
            ));
            for (reason, count) in run.refusals.iter().filter(|(_, count)| *count > 0.0) {
                out.push_str(&format!(
                    "\n- {}: refused for the packet path, {reason}: {count}",
                    run.target.name()
                ));
            }
            for failure in &run.check_failures {
                out.push_str(&format!("\n- {}: check: {failure}", run.target.name()));
            }
        }
        for note in &self.notes {
            out.push_str(&format!("\n- {note}"));
        }
        out.push('\n');
        out
    }

    /// The report's JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "tunnels": self.tunnels,
            "seconds": self.seconds,
            "notes": self.notes,
            "runs": self.runs.iter().map(|r| serde_json::json!({
                "target": r.target.name(),
                "held": r.held,
                "connect_seconds": r.connect_seconds,
                "spliced": r.spliced,
                "refusals": r.refusals,
                "checked": r.checked,
                "check_failures": r.check_failures,
                "slab_caches": r.slab_caches,
                "proxy_rss_kb": r.proxy_rss_kb,
                "proxy_fds": r.proxy_fds,
                "proxy_cpu_idle": r.proxy_cpu_idle,
                "per_tunnel_bytes": {
                    "machine": r.mem.machine,
                    "slab": r.mem.slab,
                    "slab_objects": r.mem.slab_objects,
                    "tcp": r.mem.tcp,
                    "proxy_rss": r.mem.proxy,
                    "maps": r.mem.maps,
                    "proxy_side": r.mem.proxy_side(),
                    "echo_rss": r.mem.echo,
                    "load_rss": r.mem.client,
                },
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_fleet_fits_every_process_and_port_limit() {
        let spread = Spread::of(FULL_TUNNELS);
        assert_eq!(spread.load_processes, 40);
        let total: usize = (0..spread.load_processes)
            .map(|i| spread.conns(FULL_TUNNELS, i))
            .sum();
        assert_eq!(total, FULL_TUNNELS);
        // Direct: echo `i % echoes` gets the load processes i, i + echoes, ...
        assert!(spread.load_processes.div_ceil(spread.echoes) * PER_LOAD_PROCESS <= PER_ECHO);
        // Packet: each echo port has 20,000 reserved local ports for it.
        assert!(FULL_TUNNELS.div_ceil(spread.echoes) <= 20_000);
        assert!(FULL_TUNNELS.div_ceil(spread.client_addresses) <= PER_CLIENT_ADDRESS);
    }

    #[test]
    fn an_uneven_fleet_gives_the_last_process_the_rest() {
        let spread = Spread::of(12_345);
        assert_eq!(spread.load_processes, 3);
        assert_eq!(spread.conns(12_345, 2), 2_345);
        assert_eq!(client_address(0), CLIENT);
        assert_eq!(client_address(1), "10.231.1.10");
    }
}
