//! `wsplice-load`: the load generator of the benchmark suite. A plain tokio-tungstenite client,
//! independent of the proxy's code, printing one JSON result line per run.
//!
//! - `bulk`: N connections each keep one 64 KiB message in flight against an echo upstream;
//!   MB/s of echoed payload received.
//! - `latency`: N connections ping-pong a small message; p50/p99 round trip.
//! - `storm`: new tunnels per second (upgrade, one echo, close); over wss:// it also counts the
//!   TLS handshakes that resumed a session (`--resumption full|resumed|shared` chooses the
//!   client's side of that).
//! - `hold`: open N idle tunnels (one after the other, or `--connect-parallel` at a time), check
//!   a sample still echoes, print `ready`, hold until stdin closes or SIGTERM.
//! - `fleet`: N connections each send a small message every few seconds (random phase), echoed;
//!   prints `connected {json}`, waits for the window's start (Unix ms) on stdin so several
//!   processes measure the same window, then reports the round trips of the window.
//! - `http`: plain HTTP/1.1, N keep-alive connections each sending sequential small GETs;
//!   requests/s and p50/p99 of `200` answers, every other answer counted as an error.
//!
//! Every WebSocket workload speaks `wss://` too (`--tls`, or a `wss://` URL) trusting `--ca`, and can bind
//! its sockets to a loopback source address (`--source 127.0.0.2`) so several processes can hold
//! more connections than one address's ephemeral ports and one process's descriptors allow.

mod client;
mod http;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use rand::Rng as _;
use tokio_tungstenite::tungstenite::Message;

use client::{Buffers, Client, ConnArgs, Ws};

#[derive(Debug, Parser)]
#[command(name = "wsplice-load")]
struct Cli {
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// Throughput: every connection keeps one message in flight.
    Bulk {
        #[command(flatten)]
        conn: ConnArgs,
        /// Connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 65536)]
        size: usize,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Warm-up seconds, not counted.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// Round-trip latency of small messages.
    Latency {
        #[command(flatten)]
        conn: ConnArgs,
        /// Connections.
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// New tunnels per second: upgrade, one echoed message, close; `conns` loops in parallel.
    Storm {
        #[command(flatten)]
        conn: ConnArgs,
        /// Parallel loops.
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Open idle tunnels and hold them.
    Hold {
        #[command(flatten)]
        conn: ConnArgs,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        /// Handshakes in flight while connecting (1: one after the other).
        #[arg(long, default_value_t = 1)]
        connect_parallel: usize,
    },
    /// Many mostly idle connections, each sending a small message every `interval` seconds.
    Fleet {
        #[command(flatten)]
        conn: ConnArgs,
        /// Connections.
        #[arg(long, default_value_t = 2000)]
        conns: usize,
        /// Seconds between two messages of one connection (each starts at a random phase).
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Handshakes in flight while connecting (keep the sum over all load processes under
        /// the upstream's listen backlog: a burst is not what this workload measures).
        #[arg(long, default_value_t = 32)]
        connect_parallel: usize,
        /// Start the window at once instead of reading its start (Unix ms) from stdin.
        #[arg(long)]
        no_wait: bool,
    },
    /// Plain HTTP/1.1: keep-alive connections each sending sequential GETs.
    Http {
        /// http:// URL to GET.
        #[arg(long)]
        url: String,
        /// Connections.
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// Measured seconds (after the warm-up).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Warm-up seconds, not counted.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Local address to bind before connecting (e.g. 127.0.0.2).
        #[arg(long)]
        source: Option<std::net::IpAddr>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let result = match Cli::parse().workload {
        Workload::Bulk {
            conn,
            conns,
            size,
            seconds,
            warmup,
        } => {
            bulk(
                &Client::new(&conn, Buffers::Large).await?,
                conns,
                size,
                seconds,
                warmup,
            )
            .await?
        }
        Workload::Latency {
            conn,
            conns,
            size,
            seconds,
        } => {
            latency(
                &Client::new(&conn, Buffers::Small).await?,
                conns,
                size,
                seconds,
            )
            .await?
        }
        Workload::Storm {
            conn,
            conns,
            seconds,
        } => storm(&Client::new(&conn, Buffers::Small).await?, conns, seconds).await?,
        Workload::Hold {
            conn,
            conns,
            connect_parallel,
        } => {
            hold(
                &Client::new(&conn, Buffers::Small).await?,
                conns,
                connect_parallel.max(1),
            )
            .await?
        }
        Workload::Fleet {
            conn,
            conns,
            interval,
            size,
            seconds,
            connect_parallel,
            no_wait,
        } => {
            let options = FleetOptions {
                conns,
                interval: Duration::from_secs_f64(interval),
                size,
                seconds: Duration::from_secs_f64(seconds),
                wait_for_start: !no_wait,
                connect_parallel: connect_parallel.max(1),
            };
            fleet(&Client::new(&conn, Buffers::Small).await?, options).await?
        }
        Workload::Http {
            url,
            conns,
            seconds,
            warmup,
            source,
        } => {
            http::run(http::HttpOptions {
                url,
                conns,
                seconds,
                warmup,
                source,
            })
            .await?
        }
    };
    println!("{result}");
    Ok(())
}

async fn bulk(
    client: &Client,
    conns: usize,
    size: usize,
    seconds: f64,
    warmup: f64,
) -> anyhow::Result<serde_json::Value> {
    let warm_up = Duration::from_secs_f64(warmup);
    let measured = Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let ws = client.open().await?;
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let payload = Message::binary(vec![0x5au8; size]);
            let started = Instant::now();
            let mut counted = 0u64;
            let mut echoed = 0u64;
            // Two messages in flight keep both directions busy.
            for _ in 0..2 {
                sink.send(payload.clone()).await?;
            }
            loop {
                let message = stream.next().await.context("stream ended")??;
                echoed += message.len() as u64;
                let elapsed = started.elapsed();
                if elapsed >= warm_up + measured {
                    break;
                }
                if elapsed >= warm_up {
                    counted += message.len() as u64;
                }
                sink.send(payload.clone()).await?;
            }
            anyhow::Ok((counted, echoed))
        }));
    }
    let (mut bytes, mut echoed_total) = (0, 0);
    for task in tasks {
        let (counted, echoed) = task.await??;
        bytes += counted;
        echoed_total += echoed;
    }
    let mb_per_s = bytes as f64 / measured.as_secs_f64() / 1e6;
    // Every echoed byte of the run, warm-up included: what the proxy's CPU is divided by.
    Ok(serde_json::json!({
        "workload": "bulk",
        "conns": conns,
        "size": size,
        "mb_per_s": mb_per_s,
        "echoed_bytes_total": echoed_total,
    }))
}

/// The `q` quantile of sorted samples (0 when there are none).
fn quantile(sorted: &[u64], q: f64) -> u64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q) as usize)
        .copied()
        .unwrap_or(0)
}

async fn latency(
    client: &Client,
    conns: usize,
    size: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let measured = Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut ws = client.open().await?;
        tasks.push(tokio::spawn(async move {
            let payload = Message::binary(vec![0x11u8; size]);
            let started = Instant::now();
            let mut samples = Vec::new();
            while started.elapsed() < measured {
                let sent = Instant::now();
                ws.send(payload.clone()).await?;
                ws.next().await.context("stream ended")??;
                samples.push(sent.elapsed().as_micros() as u64);
            }
            let _ = ws.close(None).await;
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await??);
    }
    samples.sort_unstable();
    Ok(serde_json::json!({
        "workload": "latency", "conns": conns, "size": size, "round_trips": samples.len(),
        "p50_us": quantile(&samples, 0.50), "p99_us": quantile(&samples, 0.99),
    }))
}

async fn storm(client: &Client, conns: usize, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let measured = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let client = client.for_loop();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let (mut handshakes, mut resumed, mut tls13) = (0u64, 0u64, 0u64);
            let message = Message::binary(vec![0x22u8; 64]);
            while started.elapsed() < measured {
                let mut ws = client.open().await?;
                if let Some(handshake) = client::handshake(&ws) {
                    handshakes += 1;
                    resumed += u64::from(handshake.resumed);
                    tls13 += u64::from(handshake.tls13);
                }
                ws.send(message.clone()).await?;
                ws.next().await.context("stream ended")??;
                ws.close(None).await?;
                while let Some(Ok(_)) = ws.next().await {}
                done += 1;
            }
            anyhow::Ok((done, handshakes, resumed, tls13))
        }));
    }
    let (mut total, mut handshakes, mut resumed, mut tls13) = (0, 0, 0, 0);
    for task in tasks {
        let (done, loop_handshakes, loop_resumed, loop_tls13) = task.await??;
        total += done;
        handshakes += loop_handshakes;
        resumed += loop_resumed;
        tls13 += loop_tls13;
    }
    let per_second = total as f64 / started.elapsed().as_secs_f64();
    // `tls_handshakes` is 0 over ws://; `tls_resumed` of them resumed a session,
    // `tls13_handshakes` negotiated TLS 1.3.
    Ok(serde_json::json!({
        "workload": "storm", "conns": conns, "tunnels": total, "per_second": per_second,
        "tls_handshakes": handshakes, "tls_resumed": resumed, "tls13_handshakes": tls13,
    }))
}

async fn hold(
    client: &Client,
    conns: usize,
    connect_parallel: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut held = Vec::with_capacity(conns);
    let mut pending = futures_util::stream::iter((0..conns).map(|_| client.open()))
        .buffer_unordered(connect_parallel);
    while let Some(ws) = pending.next().await {
        held.push(ws?);
    }
    drop(pending);
    let resumed = held
        .iter()
        .filter(|ws| client::handshake(ws).is_some_and(|h| h.resumed))
        .count();
    echo_sample(&mut held, 10).await?;
    println!("ready");
    // `check` on stdin: a larger sample must still echo (e.g. once the proxy handed the
    // tunnels over to another data path); anything else, or stdin closing, ends the hold.
    while wait_for_stdin_line().await.trim() == "check" {
        match echo_sample(&mut held, 100).await {
            Ok(checked) => println!("checked {checked}"),
            Err(error) => println!("check failed: {error:#}"),
        }
    }
    Ok(serde_json::json!({"workload": "hold", "conns": conns, "tls_resumed": resumed}))
}

/// Sends a message on about `samples` of the `held` tunnels spread evenly, and checks each
/// echoes it within 5 s; returns how many were checked.
async fn echo_sample(held: &mut [Ws], samples: usize) -> anyhow::Result<usize> {
    let step = (held.len() / samples.max(1)).max(1);
    let mut checked = 0;
    for ws in held.iter_mut().step_by(step) {
        ws.send(Message::text("still there?")).await?;
        let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .context("held tunnel did not echo")?
            .context("held tunnel ended")??;
        anyhow::ensure!(
            answer == Message::text("still there?"),
            "held tunnel echoed {answer:?}"
        );
        checked += 1;
    }
    Ok(checked)
}

/// One line from stdin (empty when stdin closes or fails).
async fn wait_for_stdin_line() -> String {
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        line
    })
    .await
    .unwrap_or_default()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct FleetOptions {
    conns: usize,
    interval: Duration,
    size: usize,
    seconds: Duration,
    wait_for_start: bool,
    connect_parallel: usize,
}

/// What one fleet connection saw in the measured window.
#[derive(Default)]
struct FleetTally {
    rtt_us: Vec<u64>,
    failures: u64,
}

async fn fleet(client: &Client, options: FleetOptions) -> anyhow::Result<serde_json::Value> {
    // Connect everything first, `connect_parallel` handshakes at a time.
    let connect_started = Instant::now();
    let mut sockets = Vec::with_capacity(options.conns);
    let mut connect_failures = 0u64;
    let mut first_error = None;
    let mut pending = futures_util::stream::iter((0..options.conns).map(|_| client.open()))
        .buffer_unordered(options.connect_parallel);
    while let Some(result) = pending.next().await {
        match result {
            Ok(ws) => sockets.push(ws),
            Err(error) => {
                connect_failures += 1;
                first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
    drop(pending);
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    println!(
        "connected {}",
        serde_json::json!({"connected": sockets.len(), "connect_failures": connect_failures,
            "connect_seconds": connect_seconds})
    );
    // The window: from the start the orchestrator sends (Unix ms), else after one interval and
    // a half second, so every connection has sent once before it.
    let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
    let interval = options.interval;
    let payload = Message::binary(vec![0x33u8; options.size]);
    let mut tasks = Vec::with_capacity(sockets.len());
    for mut ws in sockets {
        let payload = payload.clone();
        let start_rx = start_rx.clone();
        let window = options.seconds;
        let phase = interval.mul_f64(rand::rng().random::<f64>());
        tasks.push(tokio::spawn(async move {
            let mut tally = FleetTally::default();
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The next tick, unless the window ends first.
                let window_end = async {
                    let mut rx = start_rx.clone();
                    match rx.wait_for(Option::is_some).await.map(|s| *s) {
                        Ok(Some(start)) => tokio::time::sleep_until((start + window).into()).await,
                        // The sender is gone without a start: wait for ticks only.
                        _ => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = window_end => break,
                }
                let start = *start_rx.borrow();
                let sent = Instant::now();
                let counted = start.is_some_and(|s| sent >= s && sent < s + window);
                if start.is_some_and(|s| sent >= s + window) {
                    break;
                }
                // An echo later than the interval (at least 2 s) counts as a failure.
                let deadline = interval.max(Duration::from_secs(2));
                let echoed = tokio::time::timeout(deadline, async {
                    ws.send(payload.clone()).await?;
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Binary(_))) => return anyhow::Ok(()),
                            Some(Ok(_)) => {}
                            Some(Err(error)) => return Err(error.into()),
                            None => anyhow::bail!("stream ended"),
                        }
                    }
                })
                .await;
                match echoed {
                    Ok(Ok(())) if counted => tally.rtt_us.push(sent.elapsed().as_micros() as u64),
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => {
                        if counted || start.is_none() {
                            tally.failures += 1;
                        }
                        // A broken or stuck connection sends no more.
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            tally
        }));
    }
    let start_unix_ms = if options.wait_for_start {
        wait_for_stdin_line()
            .await
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| unix_ms() + interval.as_millis() as u64 + 500)
    } else {
        unix_ms() + interval.as_millis() as u64 + 500
    };
    let now_ms = unix_ms();
    let start = Instant::now() + Duration::from_millis(start_unix_ms.saturating_sub(now_ms));
    let _ = start_tx.send(Some(start));
    let mut rtt_us = Vec::new();
    let mut failures = connect_failures;
    let mut broken = 0u64;
    for task in tasks {
        match task.await {
            Ok(tally) => {
                rtt_us.extend(tally.rtt_us);
                failures += tally.failures;
                broken += u64::from(tally.failures > 0);
            }
            Err(_) => failures += 1,
        }
    }
    rtt_us.sort_unstable();
    Ok(serde_json::json!({
        "workload": "fleet", "conns": options.conns, "size": options.size,
        "interval_s": interval.as_secs_f64(), "window_s": options.seconds.as_secs_f64(),
        "messages": rtt_us.len(), "failures": failures, "broken_conns": broken,
        "connect_failures": connect_failures, "first_error": first_error,
        "p50_us": quantile(&rtt_us, 0.50), "p99_us": quantile(&rtt_us, 0.99),
        "max_us": rtt_us.last().copied().unwrap_or(0),
        "rtt_us": rtt_us,
    }))
}
