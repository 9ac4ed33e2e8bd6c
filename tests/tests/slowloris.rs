//! Slowloris: 5,000 connections trickle an upgrade request head, one byte a second. While they
//! do, real clients (tokio-tungstenite: handshake, one message echoed, close) keep connecting,
//! and their handshake p99 stays within twice the p99 measured on the same proxy just before,
//! without the tricklers. Every trickler is answered 408 and closed by the proxy at
//! `timeouts.handshake` (8 s here): each one sees the end of its connection no sooner than 8 s
//! after it began connecting and no later than [`SLACK`] after that, and each is counted in
//! `wsplice_requests_rejected_total` and in a 408 access line. On both data paths.
//!
//! The tricklers connect over one second from 127.0.0.2-127.0.0.9, on a thread and runtime of
//! their own (the real clients use 127.0.0.1); the loaded measurement runs from when the proxy
//! holds all 5,000 until half a second before the first one's deadline.
//!
//! Robust on a shared 2-core VM: each p99 is taken over every handshake of 4 s or more (real
//! clients one after the other, their close handshakes left to run beside the next ones; at
//! least 200 while loaded); the unloaded p99 is raised to [`P99_FLOOR`] before it is doubled;
//! and a failed comparison is measured again, unloaded then loaded, up to [`ATTEMPTS`] times
//! before the test fails (a proxy that stalls under the tricklers fails every time; a
//! neighbour's build that took the CPUs for a moment does not).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use wsplice_tests::*;

/// Connections trickling at once.
const TRICKLERS: usize = 5_000;
/// `timeouts.handshake` of the proxy under test: long enough for the measurement to fit
/// between the last trickler connected and the first one closed.
const HANDSHAKE: Duration = Duration::from_secs(8);
/// The tricklers connect over this much time (so no listen backlog overflows).
const RAMP: Duration = Duration::from_secs(1);
/// How late after `timeouts.handshake` a trickler may see its connection end: the proxy's timer
/// tick (50 ms), its worker's turn among thousands of connections, and this test's own
/// scheduling on a 2-core VM shared with other builds.
const SLACK: Duration = Duration::from_millis(1500);
/// The unloaded p99 is taken as at least this before doubling. Unloaded handshakes on loopback
/// take well under a millisecond, where one scheduler time slice of a busy neighbour (a few
/// milliseconds on this VM) would double a p99 without the proxy doing anything wrong: 2 ms is
/// about one such slice.
const P99_FLOOR: Duration = Duration::from_millis(2);
/// Handshakes per measured round.
const ROUND: usize = 100;
/// How long real clients are measured without tricklers.
const UNLOADED: Duration = Duration::from_secs(4);
/// Measurements (unloaded, then loaded) before a p99 that doubled fails the test.
const ATTEMPTS: u32 = 3;
/// Source addresses of the tricklers: 127.0.0.2 to 127.0.0.9 (the real clients use 127.0.0.1).
const TRICKLER_SOURCES: u8 = 8;

/// What the head looks like, byte after byte (never finished within 8 s).
const HEAD: &[u8] = b"GET /slowloris HTTP/1.1\r\nHost: wsplice.test\r\nUpgrade: websocket\r\n";

/// How one trickler connection ended.
#[derive(Debug)]
struct Ended {
    /// From just before `connect` to the end seen (EOF, reset or a failed write).
    after: Duration,
    /// What the proxy sent.
    answer: Vec<u8>,
    /// How it ended.
    how: String,
    /// Bytes of the head sent.
    sent: usize,
}

/// Every trickler connection's outcome.
type Outcomes = Arc<Mutex<Vec<Result<Ended, String>>>>;

async fn trickle_once(proxy: SocketAddr, source: IpAddr) -> Result<Ended, String> {
    let began = Instant::now();
    let mut stream = connect_from(source, proxy)
        .await
        .map_err(|e| format!("connect from {source}: {e}"))?;
    let (mut reader, mut writer) = stream.split();
    let mut answer = Vec::new();
    let mut sent = 0;
    let mut next_byte = tokio::time::Instant::now();
    let give_up = tokio::time::Instant::from_std(began + HANDSHAKE + SLACK + WAIT);
    let mut chunk = [0u8; 1024];
    let how = loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_byte) => {
                if sent < HEAD.len() {
                    if let Err(error) = writer.write_all(&HEAD[sent..=sent]).await {
                        break format!("write failed: {error}");
                    }
                    sent += 1;
                }
                next_byte += Duration::from_secs(1);
            }
            read = reader.read(&mut chunk) => match read {
                Ok(0) => break "EOF".to_owned(),
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(error) => break format!("read failed: {error}"),
            },
            () = tokio::time::sleep_until(give_up) => {
                return Err(format!("from {source}: still open after {:?}", began.elapsed()));
            }
        }
    };
    Ok(Ended {
        after: began.elapsed(),
        answer,
        how,
        sent,
    })
}

/// `TRICKLERS` connections, opened over [`RAMP`], each trickling until the proxy closes it.
fn start_tricklers(proxy: SocketAddr, outcomes: Outcomes) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("trickler runtime");
        runtime.block_on(async move {
            let mut tasks = Vec::new();
            for i in 0..TRICKLERS {
                let outcomes = outcomes.clone();
                let last = 2 + (i % TRICKLER_SOURCES as usize) as u8;
                let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
                let delay = RAMP * i as u32 / TRICKLERS as u32;
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let outcome = trickle_once(proxy, source).await;
                    outcomes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(outcome);
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
        });
    })
}

/// The p99 of `times` (the value 99% of them do not exceed).
fn p99(times: &mut [Duration]) -> Duration {
    times.sort();
    let index = (times.len() * 99).div_ceil(100).saturating_sub(1);
    times[index]
}

/// One real client: the handshake's duration (TCP connect to the 101), then one message
/// echoed; the close handshake goes on in the returned task (the next client does not wait
/// for it).
async fn real_client(url: &str) -> (Duration, tokio::task::JoinHandle<()>) {
    let began = Instant::now();
    let mut ws = connect(url).await;
    let took = began.elapsed();
    echo_text(&mut ws, "real client").await;
    let closing = tokio::spawn(async move {
        bounded(ws.close(None)).await.expect("close");
        while let Some(Ok(_)) = bounded(ws.next()).await {}
    });
    (took, closing)
}

/// Handshake durations of up to `ROUND` real clients one after the other, none starting after
/// `until`.
async fn round(proxy: &Proxy, until: Instant) -> Vec<Duration> {
    let url = proxy.url("/real");
    let mut times = Vec::with_capacity(ROUND);
    let mut closing = Vec::with_capacity(ROUND);
    while times.len() < ROUND && Instant::now() < until {
        let (took, close) = real_client(&url).await;
        times.push(took);
        closing.push(close);
    }
    for close in closing {
        close.await.expect("a real client's close");
    }
    times
}

/// Tricklers' outcomes checked: how many connections, and what went wrong.
fn check_tricklers(outcomes: &[Result<Ended, String>]) -> Vec<String> {
    let mut problems = Vec::new();
    for outcome in outcomes {
        match outcome {
            Err(error) => problems.push(error.clone()),
            Ok(ended) => {
                let answer = String::from_utf8_lossy(&ended.answer);
                if ended.after < HANDSHAKE || ended.after > HANDSHAKE + SLACK {
                    problems.push(format!(
                        "closed after {:?} ({}, {} bytes sent): {answer:?}",
                        ended.after, ended.how, ended.sent
                    ));
                } else if !answer.starts_with("HTTP/1.1 408 ") {
                    problems.push(format!(
                        "answered {answer:?} ({}, after {:?})",
                        ended.how, ended.after
                    ));
                }
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricklers_are_closed_at_the_handshake_timeout_and_do_not_slow_real_clients() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.handshake = "8s"; // HANDSHAKE
        let proxy = Proxy::start(datapath, &config);
        round(&proxy, Instant::now() + Duration::from_millis(500)).await;
        let mut trickled = 0;
        let mut verdicts = Vec::new();
        for attempt in 1..=ATTEMPTS {
            let mut unloaded = Vec::new();
            let unloaded_until = Instant::now() + UNLOADED;
            while Instant::now() < unloaded_until {
                unloaded.extend(round(&proxy, unloaded_until).await);
            }
            let unloaded_p99 = p99(&mut unloaded);
            let rejected_before = proxy.metrics()["requests_rejected_total"];
            let outcomes: Outcomes = Arc::default();
            let ramp_began = Instant::now();
            let tricklers = start_tricklers(proxy.addr(), outcomes.clone());
            let open = eventually(|| proxy.metrics()["connections_open"] >= TRICKLERS as u64);
            assert!(
                open,
                "{datapath:?}: the tricklers did not all get connected"
            );
            // Measured until half a second before the first trickler's deadline, so every
            // sample of the open connections counts all the tricklers.
            let loaded_until = ramp_began + HANDSHAKE - Duration::from_millis(500);
            let mut loaded = Vec::new();
            let mut fewest_open = u64::MAX;
            let loaded_since = Instant::now();
            while Instant::now() < loaded_until {
                loaded.extend(round(&proxy, loaded_until).await);
                fewest_open = fewest_open.min(proxy.metrics()["connections_open"]);
            }
            let loaded_seconds = loaded_since.elapsed().as_secs_f64();
            let loaded_p99 = p99(&mut loaded);
            let join_by = Instant::now() + HANDSHAKE + SLACK + WAIT;
            while !tricklers.is_finished() && Instant::now() < join_by {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                tricklers.is_finished(),
                "{datapath:?}: tricklers still open"
            );
            tricklers.join().expect("trickler thread");
            let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
            let problems = check_tricklers(&outcomes);
            let count = outcomes.len() as u64;
            trickled += count;
            let (earliest, latest) = outcomes
                .iter()
                .filter_map(|o| o.as_ref().ok())
                .fold((Duration::MAX, Duration::ZERO), |(lo, hi), e| {
                    (lo.min(e.after), hi.max(e.after))
                });
            println!(
                "slowloris {datapath:?} attempt {attempt}: real clients' handshake p99 \
                 {unloaded_p99:?} alone ({} handshakes), {loaded_p99:?} with {TRICKLERS} \
                 tricklers ({} handshakes in {loaded_seconds:.1} s, at least {fewest_open} \
                 connections open); {count} tricklers closed after {earliest:?} to {latest:?}",
                unloaded.len(),
                loaded.len()
            );
            assert_eq!(count, TRICKLERS as u64, "{datapath:?}");
            assert!(
                problems.is_empty(),
                "{datapath:?}: {} of {count} tricklers were not closed with a 408 at the \
                 handshake timeout, e.g.\n{}",
                problems.len(),
                problems[..problems.len().min(10)].join("\n")
            );
            assert!(
                loaded.len() >= 2 * ROUND && fewest_open >= TRICKLERS as u64,
                "{datapath:?}: {} handshakes measured while the tricklers were open (at least \
                 {fewest_open} connections)",
                loaded.len()
            );
            // Each trickler is counted once: 408 for all of them.
            let rejected = || proxy.metrics()["requests_rejected_total"] - rejected_before;
            assert!(
                eventually(|| rejected() == count),
                "{datapath:?}: {} rejections counted for {count} tricklers",
                rejected()
            );
            let allowed = 2 * unloaded_p99.max(P99_FLOOR);
            verdicts.push(format!(
                "attempt {attempt}: {loaded_p99:?} loaded against {unloaded_p99:?} unloaded \
                 (allowed {allowed:?})"
            ));
            if loaded_p99 <= allowed {
                break;
            }
            assert!(
                attempt < ATTEMPTS,
                "{datapath:?}: real clients' handshake p99 more than doubled under slowloris:\n{}",
                verdicts.join("\n")
            );
        }
        // One access line per trickler connection: 408, from the tricklers' addresses.
        let lines = proxy.access_lines();
        let from_tricklers = lines
            .iter()
            .filter(|line| {
                line["client"]
                    .as_str()
                    .and_then(|c| c.parse::<SocketAddr>().ok())
                    .is_some_and(|c| match c.ip() {
                        IpAddr::V4(ip) => {
                            let last = ip.octets()[3];
                            (2..2 + TRICKLER_SOURCES).contains(&last)
                        }
                        IpAddr::V6(_) => false,
                    })
            })
            .collect::<Vec<_>>();
        assert_eq!(from_tricklers.len() as u64, trickled, "{datapath:?}");
        assert!(
            from_tricklers.iter().all(|line| line["status"] == 408),
            "{datapath:?}: a trickler's access line is not a 408"
        );
        // The proxy holds nothing of them afterwards.
        assert!(eventually(|| proxy.metrics()["connections_open"] == 0));
    }
}
