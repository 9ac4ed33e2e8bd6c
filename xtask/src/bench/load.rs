//! Running `wsplice-load`: one-shot workloads, `hold` (memory per idle tunnel) and `fleet`
//! spread over several processes and loopback source addresses, with machine-wide CPU accounting
//! from /proc/stat over the measured window.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use super::targets::Guard;

/// Connections per load-generator process: well under the 20,000-fd limit and one source
/// address's ephemeral ports.
const CONNS_PER_PROCESS: usize = 5000;

/// Where the load generator connects and how.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: String,
    /// The CA to trust for wss://.
    pub ca: Option<String>,
}

impl Endpoint {
    fn args(&self) -> Vec<String> {
        let mut args = vec!["--url".to_owned(), self.url.clone()];
        if let Some(ca) = &self.ca {
            args.extend([
                "--ca".to_owned(),
                ca.clone(),
                "--server-name".to_owned(),
                "localhost".to_owned(),
            ]);
        }
        args
    }
}

/// Runs `wsplice-load WORKLOAD --url .. ARGS` and returns its JSON line.
pub fn run_json(
    load: &Path,
    workload: &str,
    at: &Endpoint,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(load)
        .arg(workload)
        .args(at.args())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run wsplice-load")?;
    if !output.status.success() {
        bail!(
            "wsplice-load {workload} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .last()
        .context("wsplice-load printed nothing")?;
    Ok(serde_json::from_str(line)?)
}

/// CPU time (user + system, all threads) the processes `pids` have used so far, in seconds.
pub fn process_cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // After "pid (comm) ": state is field 3, utime 14 and stime 15 of the whole line.
            let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .sum()
}

pub fn rss_kb(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum()
}

/// A `/proc/meminfo` field, KB (0 when it cannot be read).
pub(super) fn meminfo_kb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}

/// Memory per idle tunnel.
pub struct HoldResult {
    /// Proxy RSS per tunnel, KB.
    pub rss_kb: f64,
    /// Kernel slab per tunnel (sockets, psocks, map entries), KB.
    pub slab_kb: f64,
    /// Machine-wide: MemAvailable drop per tunnel (load generator and echo included), KB.
    pub machine_kb: f64,
}

/// Opens `conns` idle tunnels (the load generator checks a sample still echoes) and measures;
/// `args` go to `wsplice-load hold` as they are (e.g. `--connect-parallel 4`).
pub fn hold(
    load: &Path,
    at: &Endpoint,
    conns: usize,
    pids: &[u32],
    args: &[&str],
) -> anyhow::Result<HoldResult> {
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = rss_kb(pids);
    let slab_before = meminfo_kb("Slab:");
    let available_before = meminfo_kb("MemAvailable:");
    let child = Command::new(load)
        .arg("hold")
        .args(at.args())
        .args(["--conns", &conns.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run wsplice-load hold")?;
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = lines.next().transpose()?.unwrap_or_default();
    if ready.trim() != "ready" {
        bail!("hold did not get ready ({ready:?}): see the errors above");
    }
    std::thread::sleep(Duration::from_millis(500));
    let n = conns as f64;
    let result = HoldResult {
        rss_kb: (rss_kb(pids) - rss_before) / n,
        slab_kb: (meminfo_kb("Slab:") - slab_before) / n,
        machine_kb: (available_before - meminfo_kb("MemAvailable:")) / n,
    };
    // Closing stdin ends the holder; the guard stops it by PID if it does not.
    drop(guard.0.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(guard.0.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(guard);
    // Let the closes settle before the next run.
    std::thread::sleep(Duration::from_millis(700));
    Ok(result)
}

/// Busy CPU time of the whole machine so far (all CPUs: user, nice, system, irq, softirq,
/// steal), in seconds.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(busy / if ticks > 0 { ticks as f64 } else { 100.0 })
}

/// What a fleet run measured over its window.
#[derive(Debug, Clone, Default)]
pub struct FleetResult {
    pub messages: u64,
    pub failures: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Busy CPU of the whole machine during the window.
    pub cpu_seconds: f64,
    pub first_error: Option<String>,
}

impl FleetResult {
    /// Machine CPU-seconds per million echoed messages.
    pub fn cpu_per_million(&self) -> f64 {
        if self.messages == 0 {
            0.0
        } else {
            self.cpu_seconds / self.messages as f64 * 1e6
        }
    }
}

/// `conns` fleet connections over ceil(conns / 5,000) load processes, each binding its own
/// source address 127.0.0.2.., all measuring the same `window` seconds.
pub fn fleet(
    load: &Path,
    at: &Endpoint,
    conns: usize,
    window: f64,
    pin: Option<&str>,
    log_dir: &Path,
) -> anyhow::Result<FleetResult> {
    let processes = conns.div_ceil(CONNS_PER_PROCESS).max(1);
    let mut children = Vec::new();
    for i in 0..processes {
        let share = conns / processes + usize::from(i < conns % processes);
        let mut command = match pin {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(load);
                c
            }
            None => Command::new(load),
        };
        command
            .arg("fleet")
            .args(at.args())
            .args([
                "--conns",
                &share.to_string(),
                "--seconds",
                &window.to_string(),
            ])
            .args(["--source", &format!("127.0.0.{}", 2 + i)])
            // At most 96 handshakes in flight in all: under the echo upstream's listen backlog
            // (128), which the proxies' upstream connects fill during a burst.
            .args(["--connect-parallel", &(96 / processes).max(8).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(
                log_dir.join(format!("fleet-{i}.log")),
            )?);
        children.push(Guard(
            command.spawn().context("cannot run wsplice-load fleet")?,
        ));
    }
    // Every process reports `connected` before the window starts.
    let mut readers = Vec::new();
    for child in &mut children {
        let stdout = child.0.stdout.take().context("no stdout")?;
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if !line.starts_with("connected") {
            bail!(
                "fleet load generator did not connect: {}",
                std::fs::read_to_string(log_dir.join("fleet-0.log"))
                    .unwrap_or_default()
                    .trim()
            );
        }
        readers.push(reader);
    }
    // Every connection sends once (one 2 s interval) before the window: first-message costs
    // (buffers faulted in on both sides) stay out of it.
    let lead = Duration::from_millis(2500);
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let start_ms = now_ms + lead.as_millis() as u64;
    let start = Instant::now() + lead;
    for child in &mut children {
        if let Some(stdin) = child.0.stdin.as_mut() {
            writeln!(stdin, "{start_ms}")?;
        }
    }
    sleep_until(start);
    let cpu_before = machine_busy_seconds()?;
    sleep_until(start + Duration::from_secs_f64(window));
    let cpu_seconds = machine_busy_seconds()? - cpu_before;
    let mut result = FleetResult {
        cpu_seconds,
        ..FleetResult::default()
    };
    let mut samples: Vec<u64> = Vec::new();
    for (mut reader, child) in readers.into_iter().zip(&mut children) {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut reader, &mut text)?;
        let _ = child.0.wait();
        let line = text.lines().last().context("fleet printed no result")?;
        let json: serde_json::Value = serde_json::from_str(line)?;
        result.messages += json["messages"].as_u64().unwrap_or(0);
        result.failures += json["failures"].as_u64().unwrap_or(0);
        if result.first_error.is_none() {
            result.first_error = json["first_error"].as_str().map(str::to_owned);
        }
        if let Some(rtts) = json["rtt_us"].as_array() {
            samples.extend(rtts.iter().filter_map(serde_json::Value::as_u64));
        }
    }
    (result.p50_us, result.p99_us) = p50_p99(&mut samples);
    Ok(result)
}

/// The median and the 99th percentile of round-trip samples (sorted in place); 0 without any.
pub fn p50_p99(samples: &mut [u64]) -> (f64, f64) {
    samples.sort_unstable();
    let pick = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    (pick(0.5), pick(0.99))
}

/// Sleeps until `when` (at once if it passed).
pub(super) fn sleep_until(when: Instant) {
    let now = Instant::now();
    if when > now {
        std::thread::sleep(when - now);
    }
}
