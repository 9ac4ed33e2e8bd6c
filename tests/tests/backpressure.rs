//! A reader that never reads must not make the proxy buffer without bound, nor stall others.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

/// The tests of this file flood the machine; run beside each other on two cores, each one's
/// round-trip checks would measure the others' floods. They take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the flooding upstream may get written in total while its reader is stuck: the socket
/// buffers on the way (autotuned, at most a few MiB each) plus one 64 KiB relay buffer.
const BOUND: u64 = 32 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_reader_pins_bounded_memory_and_stalls_no_other_tunnel() {
    let _turn = ONE_AT_A_TIME.lock().await;
    for datapath in datapaths() {
        stuck_reader(datapath).await;
    }
}

/// Userspace relay: the upstream is throttled by TCP backpressure. Kernel path: the kernel
/// queues redirected bytes without backpressure, so once the reader is `kernel_backlog` behind
/// the tunnel leaves the kernel path: its sockets are paused (TCP throttles the upstream from
/// then on) and the userspace relay takes over once the reader caught up. It stays open.
async fn stuck_reader(datapath: DataPath) {
    let written = Arc::new(AtomicU64::new(0));
    let upstream = flooding_upstream(written.clone()).await;
    let mut config = ProxyConfig::new(&[upstream.addr()]);
    config.limits = "kernel_backlog = \"4MiB\"";
    let proxy = Proxy::start(datapath, &config);
    let rss_before = proxy.rss_kib();

    let mut stuck = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
    stuck
        .write_all(&upgrade_request("/flood", &[]))
        .await
        .unwrap();
    // Read only the 101, then never again.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match bounded(stuck.read(&mut byte)).await {
            Ok(1) => head.push(byte[0]),
            other => panic!("{datapath:?}: reading the 101: {other:?}"),
        }
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    // Another tunnel of the same proxy keeps working meanwhile.
    let mut other = connect(&proxy.url("/echo")).await;
    for i in 0..20 {
        let started = Instant::now();
        bounded(other.send(Message::text(format!("ping {i}"))))
            .await
            .unwrap();
        assert_eq!(
            bounded(other.next()).await.unwrap().unwrap(),
            Message::text(format!("ping {i}"))
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "round trip took {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let flooded = written.load(Ordering::Relaxed);
    let grown = proxy.rss_kib().saturating_sub(rss_before);
    assert!(
        flooded < BOUND,
        "{datapath:?}: the upstream could write {flooded} bytes to a stuck reader"
    );
    assert!(
        grown < 16 * 1024,
        "{datapath:?}: proxy RSS grew by {grown} KiB"
    );
    let metrics = proxy.metrics();
    // Kept open on every data path, the other tunnel too. On the kernel path the tunnel left
    // it (auto: never quiet while the reader is stuck, so never promoted).
    let demoted = u64::from(datapath == DataPath::Kernel);
    assert_eq!(
        (
            metrics["kernel_slow_consumers_total"],
            metrics["tunnels_demoted_total"],
            metrics["tunnels_open"]
        ),
        (0, demoted, 2),
        "{datapath:?}: {metrics:?}"
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_still_gets_every_byte_in_order() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const FRAMES: u32 = 3000;
    let upstream = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let mut ws = server_socket(stream).await;
        for seq in 0..FRAMES {
            let mut payload = vec![(seq % 251) as u8; 16 * 1024];
            payload[..4].copy_from_slice(&seq.to_be_bytes());
            if ws.send(Message::binary(payload)).await.is_err() {
                return;
            }
        }
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    for datapath in datapaths() {
        // 48 MiB pushed to a reader that starts a second late.
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[upstream.addr()]));
        let mut ws = connect(&proxy.url("/slow")).await;
        // Fall behind: read nothing for a while, then everything.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for seq in 0..FRAMES {
            let message = bounded(ws.next()).await.expect("open").expect("message");
            let data = message.into_data();
            assert_eq!(data.len(), 16 * 1024, "{datapath:?}: frame {seq}");
            assert_eq!(
                u32::from_be_bytes(data[..4].try_into().unwrap()),
                seq,
                "{datapath:?}"
            );
            if let Some(at) = data[4..].iter().position(|&b| b != (seq % 251) as u8) {
                let wrong = data[4 + at];
                let run = data[4 + at..].iter().take_while(|&&b| b == wrong).count();
                panic!(
                    "{datapath:?}: frame {seq} corrupted at byte {}: {run} bytes of {wrong} instead of {}",
                    4 + at,
                    seq % 251
                );
            }
        }
        let last = bounded(ws.next()).await;
        assert!(
            matches!(last, Some(Ok(Message::Close(_)))),
            "{datapath:?}: {last:?}"
        );
        let metrics = proxy.metrics();
        assert_eq!(metrics["kernel_slow_consumers_total"], 0, "{datapath:?}");
        if datapath == DataPath::Kernel {
            // 48 MiB sent to a reader that waits a second: more than `kernel_backlog` (16 MiB)
            // queued in the kernel, so the tunnel left the kernel path in mid-stream, and not
            // a byte was lost, repeated or reordered by it.
            assert_eq!(metrics["tunnels_demoted_total"], 1, "{metrics:?}");
        }
    }
}

/// An upstream that answers 101 and then, on `/flood`, writes 64 KiB binary frames for 3 s
/// (counting what it could write in `written`); on any other path it echoes.
async fn flooding_upstream(written: Arc<AtomicU64>) -> Scripted {
    let counter = written;
    Scripted::start(move |mut stream, head, _| {
        let counter = counter.clone();
        async move {
            stream.write_all(&switching_protocols(&head)).await.unwrap();
            if head.starts_with("GET /flood") {
                let mut frame = vec![0x82, 127];
                frame.extend_from_slice(&65536u64.to_be_bytes());
                frame.extend_from_slice(&[0x33; 65536]);
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(3) {
                    match tokio::time::timeout(Duration::from_millis(200), stream.write_all(&frame))
                        .await
                    {
                        Ok(Ok(())) => {
                            counter.fetch_add(frame.len() as u64, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => return,
                        Err(_) => {} // blocked: backpressure reached the upstream
                    }
                }
            } else {
                let mut ws = server_socket(stream).await;
                while let Some(Ok(message)) = ws.next().await {
                    if ws.send(message).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

/// `limits.kernel_backlog_total` bounds what all slow readers together make the kernel hold:
/// a hundred readers that stop reading while their upstreams flood, each far below the
/// per-tunnel limit, take their tunnels off the kernel path once together they pass 16 MiB
/// (give or take the measurement's step per tunnel); every one of them stays open, and a
/// tunnel beside them keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_stuck_readers_are_kept_inside_the_total_kernel_backlog() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // The userspace relay runs it too: its echo round trips beside the floods are what the
    // kernel path's are compared with.
    for datapath in datapaths() {
        hundred_stuck_readers(datapath).await;
    }
}

async fn hundred_stuck_readers(datapath: DataPath) {
    const READERS: usize = 100;
    const TOTAL: u64 = 16 << 20;
    let upstream = flooding_upstream(Arc::new(AtomicU64::new(0))).await;
    let mut config = ProxyConfig::new(&[upstream.addr()]);
    config.limits = "kernel_backlog = \"64MiB\"\nkernel_backlog_total = \"16MiB\"";
    let proxy = Proxy::start(datapath, &config);
    let mut other = connect(&proxy.url("/echo")).await;
    let mut unloaded = Vec::new();
    for round in 0..40 {
        let sent = Instant::now();
        echo_text(&mut other, &format!("before {round}")).await;
        unloaded.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Readers that never read, not even the 101.
    let mut stuck = Vec::new();
    for _ in 0..READERS {
        let mut reader = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
        reader
            .write_all(&upgrade_request("/flood", &[]))
            .await
            .unwrap();
        stuck.push(reader);
    }
    let mut highest = 0;
    let started = Instant::now();
    let mut loaded = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        highest = highest.max(proxy.metrics()["kernel_backlog_bytes"]);
        let sent = Instant::now();
        echo_text(&mut other, &format!("ping {}", loaded.len())).await;
        loaded.push(sent.elapsed());
        // Not stalled behind the floods (how fast it stays is the machine's: two cores
        // shared with a hundred floods; the numbers are printed below).
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{datapath:?}: round trip {} took {:?}",
            loaded.len(),
            sent.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{datapath:?}: echo round trip p99: {:?} before the stuck readers, {:?} beside them; \
         the kernel backlog peaked at {highest} bytes",
        p99(&mut unloaded),
        p99(&mut loaded)
    );
    let metrics = proxy.metrics();
    // Each tunnel is measured once per MiB it moves, and pausing it takes the worker a moment
    // in which the flood goes on: the total may overshoot by a step and what one flood moves
    // in that moment (about 2 MiB here, on two cores with a hundred floods) per tunnel still
    // on the kernel path when it is crossed.
    assert!(
        highest <= TOTAL + READERS as u64 * (3 << 20),
        "the kernel held {highest} bytes for stuck readers (limit {TOTAL})"
    );
    assert_eq!(
        (
            metrics["kernel_slow_consumers_total"],
            metrics["tunnels_open"]
        ),
        (0, READERS as u64 + 1),
        "{datapath:?}: every stuck reader is kept: {metrics:?}"
    );
    assert_eq!(
        metrics["tunnels_demoted_total"] >= 1,
        datapath == DataPath::Kernel,
        "{datapath:?}: {metrics:?}"
    );
    assert!(metrics["kernel_backlog_bytes"] <= highest, "{metrics:?}");
    drop(stuck);
}

fn p99(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}
