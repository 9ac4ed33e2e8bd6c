//! Churn: connect/upgrade/close cycles, in steps, leave the proxy and the kernel where they
//! started — descriptors, `PEER`/`BRIDGE`/`ACTIVITY` entries (walked from outside the proxy),
//! the proxy's RSS and the kernel's slab.
//!
//! A cycle: connect (from one of 16 addresses of 127.0.0.0/8), upgrade, one message echoed, the
//! close handshake, the server's FIN, the client's (`wsplice_tests::churn`, which also says who
//! holds TIME_WAIT). After every step all connections are closed and each count must be back:
//! descriptors and map entries exactly, TCP sockets of the test's ports exactly (TIME_WAIT
//! aside, which the kernel holds 60 s). RSS is measured against a plateau: warm-up steps run
//! first, for at least [`WARM_UP`], and every later step must stay within [`RSS_GROWTH_KIB`] of
//! where they left it. Kernel slab (unreclaimable) is compared once at the end, after the
//! TIME_WAIT sockets of the run expired, within [`SLAB_TOLERANCE_KIB`] (the machine's other
//! processes allocate slab too).
//!
//! Data paths: `kernel` (every tunnel handed to the sockmap at its 101) and `auto`, here with
//! `promote_after_bytes = 16`, so each tunnel is promoted once its first message went through,
//! close to its close (auto's defaults would leave such short tunnels on the relay).
//!
//! `cargo xtask test` runs the bounded shape: the warm-up, then 50,000 cycles per data path in
//! steps of 10,000, 128 at once (about 25 s per data path on the 2-core VM, then a minute for
//! TIME_WAIT to expire); `cargo xtask churn` the full one: 1,000,000 cycles in steps of 100,000.
//! Settings: `WSPLICE_CHURN_CYCLES`, `WSPLICE_CHURN_STEP`, `WSPLICE_CHURN_IN_FLIGHT` (cycles at
//! once, default 128), `WSPLICE_DATAPATHS` (default `kernel,auto`; both need root).

use std::time::{Duration, Instant};

use wsplice_tests::churn::{
    meminfo_kib, run_cycles, sources, tcp_sockets, wait_time_wait_gone, within, Held,
};
use wsplice_tests::*;

/// How long the warm-up steps last at least: two of the test's 5 s timeouts, the horizon of the
/// reminders a connection leaves in its worker's timer wheel.
const WARM_UP: Duration = Duration::from_secs(10);

/// How far RSS may rise above the plateau the warm-up steps reached: an allocator's free lists,
/// a few more connection slots, more live timer reminders at a higher rate; not a per-cycle
/// leak (the bounded shape catches one of 64 bytes a cycle, the full one of 4).
const RSS_GROWTH_KIB: u64 = 3072;

/// How far unreclaimable slab may be above where it started once the run's TIME_WAIT sockets
/// expired. Other sessions on the machine build and test beside this one (a neighbour's test
/// with 20,000 connections holds about 100 MiB for a few seconds), so the comparison is retried
/// for a while; a per-cycle leak of a socket (2.3 KiB of `TCP` slab) or of a psock (a few
/// hundred bytes) over 50,000 cycles is 15-115 MiB, over a million far more.
const SLAB_TOLERANCE_KIB: u64 = 16 * 1024;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn config(datapath: DataPath, echo: &Echo) -> ProxyConfig {
    let mut config = ProxyConfig::new(&[echo.addr()]);
    // A million access lines would be half a gigabyte of log.
    config.log_filter = "info,wsplice::access=off";
    // A connection's reminders (handshake, idle) stay in its worker's timer wheel until they
    // are due, even once it closed (a wheel costs O(expiring): it is never searched), so the
    // wheel holds a timeout's worth of reminders at the churn's rate. Short timeouts put that
    // plateau inside the warm-up.
    config.handshake = "5s";
    config.idle = "5s";
    if datapath == DataPath::Auto {
        config.kernel = "promote_after = \"1h\"\npromote_after_bytes = 16";
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_upgrade_close_cycles_leave_fds_maps_memory_and_slab_where_they_started() {
    let cycles = setting("WSPLICE_CHURN_CYCLES", 50_000);
    let step = setting("WSPLICE_CHURN_STEP", 10_000).clamp(1, cycles.max(1));
    let in_flight = setting("WSPLICE_CHURN_IN_FLIGHT", 128) as usize;
    let datapaths = datapaths_or("kernel,auto");
    if datapaths.is_empty() {
        println!("churn: no data path to run (kernel and auto need root)");
        return;
    }
    let sources = sources(16);
    let echo = Echo::start_unrecorded();
    // Every proxy starts (and loads its maps) before the slab baseline is taken.
    let proxies: Vec<Proxy> = datapaths
        .iter()
        .map(|&datapath| Proxy::start(datapath, &config(datapath, &echo)))
        .collect();
    let mut ports = vec![echo.addr().port()];
    ports.extend(proxies.iter().map(|proxy| proxy.addr().port()));
    // One cycle each first: what a proxy creates once (rings, pools, the first slots) exists.
    for proxy in &proxies {
        let warm_up = run_cycles(proxy.addr(), 0, 1, 1, &sources).await;
        assert_eq!(warm_up.completed, 1, "warm-up: {:?}", warm_up.errors);
        assert!(eventually(|| proxy.metrics()["connections_open"] == 0));
    }
    let slab_before = meminfo_kib("SUnreclaim:");
    let started = Instant::now();
    println!(
        "churn: {cycles} cycles per data path in steps of {step}, {in_flight} at once, from {} \
         source addresses; unreclaimable slab {slab_before} KiB",
        sources.len()
    );
    for proxy in &proxies {
        churn(proxy, cycles, step, in_flight, &sources, &ports).await;
    }
    // TIME_WAIT sockets of the run hold slab for 60 s: wait them out, then compare.
    let left = wait_time_wait_gone(&ports, Duration::from_secs(90));
    assert_eq!(left, 0, "sockets of the run still in TIME_WAIT after 90 s");
    let mut slab_after = 0;
    let back = eventually_for(Duration::from_secs(40), || {
        slab_after = meminfo_kib("SUnreclaim:");
        slab_after <= slab_before + SLAB_TOLERANCE_KIB
    });
    for proxy in &proxies {
        println!(
            "churn {:?}: at the end {}",
            proxy.datapath,
            Held::of(proxy, &ports).line()
        );
    }
    println!(
        "churn: unreclaimable slab {slab_before} KiB before, {slab_after} KiB after \
         ({:+} KiB; {:.0} s in all)",
        slab_after as i64 - slab_before as i64,
        started.elapsed().as_secs_f64()
    );
    assert!(
        back,
        "unreclaimable kernel slab grew from {slab_before} KiB to {slab_after} KiB over the run"
    );
}

/// Runs warm-up steps, then `cycles` cycles on `proxy` in steps of `step_size`, checking what
/// it holds after each.
async fn churn(
    proxy: &Proxy,
    cycles: u64,
    step_size: u64,
    in_flight: usize,
    sources: &[std::net::IpAddr],
    ports: &[u16],
) {
    let datapath = proxy.datapath;
    let start = Held::of(proxy, ports);
    println!("churn {datapath:?}: at the start {}", start.line());
    let metrics_before = proxy.metrics();
    // Warm-up steps first, for at least WARM_UP: then every reminder armed in them came due,
    // and what the allocator keeps is the plateau.
    let warm_up_began = Instant::now();
    let mut warm_up = 0;
    let mut warm_up_steps = 0;
    while warm_up_steps == 0 || warm_up_began.elapsed() < WARM_UP {
        warm_up_steps += 1;
        let (held, rate) = step(proxy, ports, &start, warm_up, step_size, in_flight, sources).await;
        warm_up += step_size;
        println!(
            "churn {datapath:?} warm-up {warm_up_steps}: {warm_up} cycles, {rate}; {}",
            held.line()
        );
    }
    let plateau = Held::of(proxy, ports).rss_kib;
    let mut done = 0;
    let mut step_number = 0;
    while done < cycles {
        step_number += 1;
        let count = step_size.min(cycles - done);
        let (held, rate) = step(
            proxy,
            ports,
            &start,
            warm_up + done,
            count,
            in_flight,
            sources,
        )
        .await;
        done += count;
        println!(
            "churn {datapath:?} step {step_number}: {done} cycles, {rate}; {}",
            held.line()
        );
        assert!(
            held.rss_kib <= plateau + RSS_GROWTH_KIB,
            "{datapath:?}: RSS grew from {plateau} KiB after the warm-up to {} KiB after {done} \
             more cycles",
            held.rss_kib
        );
    }
    let cycles = warm_up + cycles;
    let metrics = proxy.metrics();
    let delta = |name: &str| {
        metrics.get(name).copied().unwrap_or(0) - metrics_before.get(name).copied().unwrap_or(0)
    };
    println!(
        "churn {datapath:?}: {} tunnels opened, {} spliced ({} promoted), {} hand-off failures, \
         {} rejected",
        delta("tunnels_opened_total"),
        delta("tunnels_spliced_total"),
        delta("tunnels_promoted_total"),
        delta("kernel_handoff_failures_total"),
        delta("requests_rejected_total"),
    );
    assert_eq!(delta("tunnels_opened_total"), cycles, "{datapath:?}");
    assert_eq!(metrics["tunnels_open"], 0, "{datapath:?}");
    assert_eq!(metrics["tunnels_spliced_open"], 0, "{datapath:?}");
    match datapath {
        DataPath::Kernel => assert_eq!(delta("tunnels_spliced_total"), cycles),
        DataPath::Auto => assert!(
            delta("tunnels_promoted_total") > 0,
            "auto: no tunnel was promoted"
        ),
        DataPath::Userspace => {}
    }
    let (sockets, _) = tcp_sockets(ports);
    assert_eq!(sockets, 0, "{datapath:?}: sockets left open");
}

/// Runs cycles `first + 1..=first + count` and waits until `proxy` holds what it held at `start`
/// (no connection, no descriptor more, no map entry, no TCP socket of `ports` but in TIME_WAIT);
/// returns what it holds then and the step's rate.
async fn step(
    proxy: &Proxy,
    ports: &[u16],
    start: &Held,
    first: u64,
    count: u64,
    in_flight: usize,
    sources: &[std::net::IpAddr],
) -> (Held, String) {
    let datapath = proxy.datapath;
    let began = Instant::now();
    // At least 200 cycles a second, or the step fails.
    let limit = Duration::from_secs(30 + count / 200);
    let outcome = within(
        limit,
        run_cycles(proxy.addr(), first + 1, count, in_flight, sources),
    )
    .await
    .unwrap_or_else(|| panic!("{datapath:?}: cycles {first}.. not done in {limit:?}"));
    let seconds = began.elapsed().as_secs_f64();
    assert_eq!(
        outcome.failed,
        0,
        "{datapath:?}: {} of cycles {first}..{} failed, e.g.\n{}",
        outcome.failed,
        first + count,
        outcome.errors.join("\n")
    );
    let mut held = Held::default();
    // What the proxy holds must be back at once; a socket it closed may still be finishing its
    // close in the kernel (an orphan in FIN_WAIT or LAST_ACK, held by no process), which the
    // kernel ends within `tcp_fin_timeout` (60 s): the sockets get that long.
    let settled = eventually(|| {
        held = Held::of(proxy, ports);
        proxy.metrics()["connections_open"] == 0
            && held.fds <= start.fds
            && ["PEER", "BRIDGE", "ACTIVITY"]
                .iter()
                .all(|map| held.map(map) == 0)
    }) && eventually_for(Duration::from_secs(65), || {
        held = Held::of(proxy, ports);
        held.sockets == 0
    });
    assert!(
        settled,
        "{datapath:?} after {} cycles, not back where it started:\n  start {}\n  now   {}\n\
         descriptors now: {:?}",
        first + count,
        start.line(),
        held.line(),
        proxy.fd_targets()
    );
    let rate = format!(
        "{count} in {seconds:.1} s ({:.0}/s)",
        count as f64 / seconds
    );
    (held, rate)
}

/// [`eventually`] with its own limit.
fn eventually_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
