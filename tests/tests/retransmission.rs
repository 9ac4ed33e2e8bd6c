//! TCP segments that repeat bytes already delivered (partial retransmissions) must not repeat
//! them on the other side of the tunnel.
//!
//! The kernel path once forwarded such segments whole: the sockmap's receive path hands the
//! whole skb to the verdict program even when its head was delivered before. A test writes the
//! segment itself (`wsplice_tests::segment`), so the case is exercised every run instead of
//! once in many thousand loopback retransmissions.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use wsplice_tests::segment::{send_overlapping_segment, sequence_state};
use wsplice_tests::*;

/// Bytes that name their own offset (so a repeat or a gap shows where it is).
fn pattern(from: usize, len: usize) -> Vec<u8> {
    (from..from + len)
        .map(|i| b"0123456789abcdefghijklmnopqrstuvwxyz"[(i / 7) % 36])
        .collect()
}

const FIRST: usize = 3000;
const REPEATED: usize = 1200;
const FRESH: usize = 700;
const SECOND: usize = 2500;

/// Reads from `stream` until `len` bytes arrived and nothing more comes for a moment.
async fn read_exactly_then_quiet(stream: &mut TcpStream, len: usize, sink: &Mutex<Vec<u8>>) {
    let deadline = Instant::now() + WAIT;
    let mut chunk = [0u8; 65536];
    loop {
        let have = sink.lock().unwrap().len();
        let wait = if have >= len {
            Duration::from_millis(300)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
        }
    }
}

async fn eventually_len(buffer: &Mutex<Vec<u8>>, len: usize) {
    let deadline = Instant::now() + WAIT;
    while buffer.lock().unwrap().len() < len && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn check(datapath: DataPath, direction: &str, got: &[u8]) {
    let want = pattern(0, FIRST + SECOND);
    if got != want.as_slice() {
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{datapath:?} {direction}: received {} bytes, sent {}; first difference at {first:?}",
            got.len(),
            want.len()
        );
    }
}

/// Writing segments by hand needs root (`TCP_REPAIR`, a raw socket).
fn can_run() -> bool {
    if !is_root() {
        println!("skipped: writing TCP segments by hand needs root");
    }
    is_root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_retransmitted_client_segment_reaches_the_upstream_once() {
    if !can_run() {
        return;
    }
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let upstream = Scripted::start(move |mut stream, head, _| {
        let sink = sink.clone();
        async move {
            stream.write_all(&switching_protocols(&head)).await.unwrap();
            read_exactly_then_quiet(&mut stream, usize::MAX, &sink).await;
        }
    })
    .await;
    for datapath in datapaths() {
        received.lock().unwrap().clear();
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[upstream.addr()]));
        let mut client = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
        client.write_all(&upgrade_request("/", &[])).await.unwrap();
        let (head, _) = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");

        let bytes = pattern(0, FIRST + SECOND);
        client.write_all(&bytes[..FIRST]).await.unwrap();
        eventually_len(&received, FIRST).await;
        let state = sequence_state(&client).expect("TCP_REPAIR (run as root)");
        send_overlapping_segment(
            client.local_addr().unwrap(),
            client.peer_addr().unwrap(),
            state,
            &bytes[FIRST - REPEATED..FIRST],
            &bytes[FIRST..FIRST + FRESH],
        )
        .expect("raw socket (run as root)");
        eventually_len(&received, FIRST + FRESH).await;
        // The socket now sends what the segment already carried, and more.
        client.write_all(&bytes[FIRST..]).await.unwrap();
        eventually_len(&received, FIRST + SECOND).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        check(datapath, "client→upstream", &received.lock().unwrap());
        let metrics = proxy.metrics();
        if datapath == DataPath::Kernel {
            assert_eq!(
                metrics
                    .get("kernel_repeated_bytes_cut_total")
                    .copied()
                    .unwrap_or(0),
                0,
                "counted only when the tunnel closes"
            );
        }
        drop(client);
        if datapath == DataPath::Kernel {
            let counted = eventually(|| {
                proxy
                    .metrics()
                    .get("kernel_repeated_bytes_cut_total")
                    .is_some_and(|&cut| cut == (REPEATED + FRESH) as u64)
            });
            assert!(
                counted,
                "the cut bytes are counted: {:?}",
                proxy.metrics().get("kernel_repeated_bytes_cut_total")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_retransmitted_upstream_segment_reaches_the_client_once() {
    if !can_run() {
        return;
    }
    let upstream = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let bytes = pattern(0, FIRST + SECOND);
        stream.write_all(&bytes[..FIRST]).await.unwrap();
        // Wait for the client's go-ahead: it has all of FIRST.
        let mut go = [0u8; 1];
        if stream.read_exact(&mut go).await.is_err() {
            return;
        }
        let state = sequence_state(&stream).expect("TCP_REPAIR (run as root)");
        send_overlapping_segment(
            stream.local_addr().unwrap(),
            stream.peer_addr().unwrap(),
            state,
            &bytes[FIRST - REPEATED..FIRST],
            &bytes[FIRST..FIRST + FRESH],
        )
        .expect("raw socket (run as root)");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(&bytes[FIRST..]).await.unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[upstream.addr()]));
        let mut client = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
        client.write_all(&upgrade_request("/", &[])).await.unwrap();
        let (head, rest) = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let received = Mutex::new(rest);
        let mut chunk = [0u8; 65536];
        while received.lock().unwrap().len() < FIRST {
            let n = bounded(client.read(&mut chunk)).await.unwrap();
            assert!(n > 0, "closed early");
            received.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
        client.write_all(b"g").await.unwrap();
        read_exactly_then_quiet(&mut client, FIRST + SECOND, &received).await;
        check(datapath, "upstream→client", &received.lock().unwrap());
    }
}
