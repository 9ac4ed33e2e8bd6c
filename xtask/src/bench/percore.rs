//! Per-core connection count: each proxy with one worker pinned to CPU 0 (`taskset -c 0`), the
//! echo upstream and the load generators pinned to CPU 1; a fleet of growing N until p99 > 10 ms,
//! a failure, or the bounds of this machine. Past ~9,000 tunnels one process runs out of its
//! 20,000 fds (2 per tunnel): then several processes share the port (SO_REUSEPORT), all on CPU 0;
//! the echo upstream likewise runs as several processes on CPU 1 past 18,000.
//!
//! Pinning flatters the kernel path: its softirq and kworker time lands on any CPU, not on the
//! proxy's. So each step also records machine-wide CPU, and the report gives tunnels per core as
//! N divided by the machine CPU above the direct run's at that N (cores busy for the proxy).

use std::time::{Duration, Instant};

use super::load::{self, Endpoint};
use super::targets::{self, Kind, Layout, PINNED_ECHO_PORT};
use super::{Env, Scale};

/// A fleet passes when its p99 round trip stays at or under this.
const P99_BOUND_US: f64 = 10_000.0;
/// Tunnels one proxy process holds within its 20,000 fds.
const TUNNELS_PER_PROCESS: usize = 9000;
/// Connections one echo process holds within its 20,000 fds.
const ECHO_CONNS_PER_PROCESS: usize = 18_000;
/// Time allowed per target.
const BUDGET: Duration = Duration::from_secs(120);

/// One fleet size tried.
#[derive(Debug, Clone)]
pub struct Step {
    pub conns: usize,
    pub processes: usize,
    pub p99_us: f64,
    pub failures: u64,
    pub messages: u64,
    /// Machine-wide busy CPU seconds per second of the window (all cores).
    pub machine_cores: f64,
    pub passed: bool,
    pub why: Option<String>,
}

/// The outcome for one target.
#[derive(Debug, Clone)]
pub struct PercoreResult {
    pub target: &'static str,
    pub steps: Vec<Step>,
    /// Why it stopped growing N.
    pub stopped: String,
}

impl PercoreResult {
    /// The largest N that passed.
    pub fn largest(&self) -> Option<&Step> {
        self.steps.iter().rfind(|s| s.passed)
    }

    /// At the largest N that passed: N divided by the machine-wide CPU above `direct`'s at the
    /// same N (in cores), i.e. tunnels per core the proxy really costs, kernel work included.
    pub fn per_machine_core(&self, direct: Option<&PercoreResult>) -> Option<f64> {
        let step = self.largest()?;
        let baseline = direct?.steps.iter().find(|s| s.conns == step.conns)?;
        let cores = step.machine_cores - baseline.machine_cores;
        (cores > 0.0).then(|| step.conns as f64 / cores)
    }
}

pub fn run(
    env: &Env,
    scale: &Scale,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<PercoreResult>> {
    let largest = scale.percore_steps.iter().copied().max().unwrap_or(0);
    let _echo = targets::start_echo_group(
        &env.tools.wsplice,
        PINNED_ECHO_PORT,
        Some("1"),
        &env.work,
        largest.div_ceil(ECHO_CONNS_PER_PROCESS),
    )?;
    let mut all = Vec::new();
    // `auto` is left out: fleet tunnels live far beyond `kernel.promote_after`, so per core it
    // is the kernel path measured a second time, at the cost of minutes.
    for kind in targets::ALL.into_iter().filter(|&k| k != Kind::WspliceAuto) {
        let started = Instant::now();
        let mut result = PercoreResult {
            target: kind.name(),
            steps: Vec::new(),
            stopped: "tried every N of the scale".into(),
        };
        for &conns in scale.percore_steps {
            super::stop_requested()?;
            if started.elapsed() > BUDGET {
                result.stopped = format!("bound: {} s per target", BUDGET.as_secs());
                break;
            }
            let processes = conns.div_ceil(TUNNELS_PER_PROCESS).max(1);
            env.progress.say(&format!(
                "percore · {} · {conns} conns ({processes} process(es) on CPU 0)",
                kind.name()
            ));
            let mut attempt = one_step(env, scale, kind, conns, processes);
            // The machine is shared: a step that fails on p99 alone gets a second try.
            if matches!(&attempt, Ok(step) if !step.passed && step.failures == 0) {
                env.progress.say(&format!(
                    "percore · {} · {conns}: p99 over 10 ms, trying again",
                    kind.name()
                ));
                super::stop_requested()?;
                attempt = one_step(env, scale, kind, conns, processes);
            }
            let step = match attempt {
                Ok(step) => step,
                Err(error) => Step {
                    conns,
                    processes,
                    p99_us: 0.0,
                    failures: 0,
                    messages: 0,
                    machine_cores: 0.0,
                    passed: false,
                    why: Some(format!("{error:#}")),
                },
            };
            let passed = step.passed;
            let why = step.why.clone();
            result.steps.push(step);
            if !passed {
                result.stopped = format!("{conns}: {}", why.unwrap_or_default());
                break;
            }
        }
        if kind != Kind::Direct && result.steps.iter().any(|s| s.processes > 1) {
            notes.push(format!(
                "percore {}: above {TUNNELS_PER_PROCESS} tunnels it ran several processes \
                 (SO_REUSEPORT, same port) pinned to CPU 0: one process holds at most 20,000 fds",
                kind.name()
            ));
        }
        all.push(result);
    }
    Ok(all)
}

fn one_step(
    env: &Env,
    scale: &Scale,
    kind: Kind,
    conns: usize,
    processes: usize,
) -> anyhow::Result<Step> {
    // nginx: one worker process per "process"; HAProxy: nbthread 1 each; wsplice: --workers 1 each.
    let layout = Layout {
        workers: 1,
        processes,
        pin: Some("0"),
        tls: false,
        echo_port: PINNED_ECHO_PORT,
    };
    let running = targets::start(kind, &layout, &env.tools)?;
    let at = Endpoint {
        url: format!("ws://127.0.0.1:{}/bench", running.port),
        ca: None,
    };
    let run = load::fleet(
        &env.load,
        &at,
        conns,
        scale.percore_window,
        Some("1"),
        &env.work,
    )?;
    drop(running);
    // Let the closes settle before the next step.
    std::thread::sleep(Duration::from_millis(500));
    let why = if run.failures > 0 {
        Some(format!(
            "{} failures ({})",
            run.failures,
            run.first_error.as_deref().unwrap_or("echo later than 2 s")
        ))
    } else if run.p99_us > P99_BOUND_US {
        Some(format!("p99 {:.1} ms > 10 ms", run.p99_us / 1000.0))
    } else if run.messages == 0 {
        Some("no message echoed".into())
    } else {
        None
    };
    Ok(Step {
        conns,
        processes: if kind == Kind::Direct { 0 } else { processes },
        p99_us: run.p99_us,
        failures: run.failures,
        messages: run.messages,
        machine_cores: run.cpu_seconds / scale.percore_window,
        passed: why.is_none(),
        why,
    })
}
