//! `wsplice-load`: the load generator of the benchmark suite. A plain tokio-tungstenite client,
//! independent of the proxy's code, printing one JSON result line per run.
//!
//! - `bulk`: N connections each keep one 64 KiB message in flight against an echo upstream;
//!   MB/s of echoed payload received.
//! - `latency`: N connections ping-pong a small message; p50/p99 round trip.
//! - `hold`: open N idle tunnels, check a sample still echoes, print `ready`, hold until stdin
//!   closes or SIGTERM.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

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
        /// ws:// URL.
        #[arg(long)]
        url: String,
        /// Connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 65536)]
        size: usize,
        /// Measured seconds (after a 1 s warm-up).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Round-trip latency of small messages.
    Latency {
        /// ws:// URL.
        #[arg(long)]
        url: String,
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
        /// ws:// URL.
        #[arg(long)]
        url: String,
        /// Parallel loops.
        #[arg(long, default_value_t = 64)]
        conns: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Open idle tunnels and hold them.
    Hold {
        /// ws:// URL.
        #[arg(long)]
        url: String,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        conns: usize,
    },
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> anyhow::Result<Ws> {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_with_config(url, Some(config()), true),
    )
    .await
    .context("connect timed out")?
    .with_context(|| format!("connect {url}"))?;
    Ok(ws)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let result = match Cli::parse().workload {
        Workload::Bulk {
            url,
            conns,
            size,
            seconds,
        } => bulk(&url, conns, size, seconds).await?,
        Workload::Latency {
            url,
            conns,
            size,
            seconds,
        } => latency(&url, conns, size, seconds).await?,
        Workload::Storm {
            url,
            conns,
            seconds,
        } => storm(&url, conns, seconds).await?,
        Workload::Hold { url, conns } => hold(&url, conns).await?,
    };
    println!("{result}");
    Ok(())
}

async fn bulk(
    url: &str,
    conns: usize,
    size: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let warm_up = Duration::from_secs(1);
    let measured = Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let ws = open(url).await?;
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let payload = Message::binary(vec![0x5au8; size]);
            let started = Instant::now();
            let mut counted = 0u64;
            // Two messages in flight keep both directions busy.
            for _ in 0..2 {
                sink.send(payload.clone()).await?;
            }
            loop {
                let message = stream.next().await.context("stream ended")??;
                let elapsed = started.elapsed();
                if elapsed >= warm_up + measured {
                    break;
                }
                if elapsed >= warm_up {
                    counted += message.len() as u64;
                }
                sink.send(payload.clone()).await?;
            }
            anyhow::Ok(counted)
        }));
    }
    let mut bytes = 0;
    for task in tasks {
        bytes += task.await??;
    }
    let mb_per_s = bytes as f64 / measured.as_secs_f64() / 1e6;
    Ok(serde_json::json!({"workload": "bulk", "conns": conns, "size": size, "mb_per_s": mb_per_s}))
}

async fn latency(
    url: &str,
    conns: usize,
    size: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let measured = Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut ws = open(url).await?;
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
    let pick = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    Ok(serde_json::json!({
        "workload": "latency", "conns": conns, "size": size, "round_trips": samples.len(),
        "p50_us": pick(0.50), "p99_us": pick(0.99),
    }))
}

async fn storm(url: &str, conns: usize, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let measured = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let message = Message::binary(vec![0x22u8; 64]);
            while started.elapsed() < measured {
                let mut ws = open(&url).await?;
                ws.send(message.clone()).await?;
                ws.next().await.context("stream ended")??;
                ws.close(None).await?;
                while let Some(Ok(_)) = ws.next().await {}
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let per_second = total as f64 / started.elapsed().as_secs_f64();
    Ok(
        serde_json::json!({"workload": "storm", "conns": conns, "tunnels": total, "per_second": per_second}),
    )
}

async fn hold(url: &str, conns: usize) -> anyhow::Result<serde_json::Value> {
    let mut held = Vec::with_capacity(conns);
    for _ in 0..conns {
        held.push(open(url).await?);
    }
    // A sample of the held tunnels must still echo.
    for ws in held.iter_mut().step_by((conns / 10).max(1)) {
        ws.send(Message::text("still there?")).await?;
        let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .context("held tunnel did not echo")?
            .context("held tunnel ended")??;
        anyhow::ensure!(
            answer == Message::text("still there?"),
            "held tunnel echoed {answer:?}"
        );
    }
    println!("ready");
    // Hold until stdin closes (the orchestrator drops it) or a signal ends the process.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
    })
    .await;
    Ok(serde_json::json!({"workload": "hold", "conns": conns}))
}
