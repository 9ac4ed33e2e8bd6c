//! Churn: WebSocket connections opened, upgraded, used once and closed, over and over, and what
//! the proxy and the kernel hold between the steps (see `tests/tests/churn.rs`).
//!
//! One cycle is what a short-lived client does: connect, upgrade, one message echoed, the close
//! handshake, and the end of the TCP connection as RFC 6455 orders it (the server closes first:
//! the upstream after its Close, the proxy passing its FIN on, the client closing when it reads
//! EOF). So TIME_WAIT is held by the server sides, the proxy's listener side and the upstream's,
//! never by a connecting side: no ephemeral port of the client or of the proxy's upstream
//! connections waits out TIME_WAIT, and a new SYN that meets an old TIME_WAIT of the same
//! address pair is taken (its TCP timestamp is newer). The client still spreads its connections
//! over several source addresses of 127.0.0.0/8, so the four-tuples of a million connections
//! rarely meet at all.
//!
//! The client speaks raw frames (one fixed request, one masked frame each way) so that a cycle
//! costs the proxy, not the client, most of the CPU.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::{connect_from, Proxy};

/// The request every cycle sends (the key of RFC 6455's example).
const REQUEST: &[u8] = b"GET /churn HTTP/1.1\r\nHost: wsplice.test\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// `Sec-WebSocket-Accept` for that key.
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Source addresses the cycles rotate over: 127.0.0.2 and up.
pub fn sources(count: u8) -> Vec<IpAddr> {
    (0..count)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
        .collect()
}

/// What a batch of cycles did.
#[derive(Debug, Default)]
pub struct Cycles {
    /// Cycles that went through: 101, the message echoed, both Close frames, EOF.
    pub completed: u64,
    /// Cycles that did not, with the first few reasons.
    pub failed: u64,
    /// Up to ten failure reasons (cycle number: reason).
    pub errors: Vec<String>,
}

/// Runs cycles `first..first + count` against `proxy`, `in_flight` at a time, rotating over
/// `sources`.
pub async fn run_cycles(
    proxy: SocketAddr,
    first: u64,
    count: u64,
    in_flight: usize,
    sources: &[IpAddr],
) -> Cycles {
    let next = Arc::new(AtomicU64::new(first));
    let end = first + count;
    let outcome = Arc::new(Mutex::new(Cycles::default()));
    let sources: Arc<[IpAddr]> = sources.into();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let next = next.clone();
        let outcome = outcome.clone();
        let sources = sources.clone();
        tasks.push(tokio::spawn(async move {
            let (mut completed, mut failed, mut errors) = (0u64, 0u64, Vec::new());
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= end {
                    break;
                }
                let source = sources[n as usize % sources.len()];
                match tokio::time::timeout(crate::WAIT, cycle(proxy, source, n)).await {
                    Ok(Ok(())) => completed += 1,
                    Ok(Err(error)) => {
                        failed += 1;
                        errors.push(format!("cycle {n} from {source}: {error}"));
                    }
                    Err(_) => {
                        failed += 1;
                        errors.push(format!("cycle {n} from {source}: not done in time"));
                    }
                }
            }
            let mut outcome = outcome.lock().unwrap_or_else(|e| e.into_inner());
            outcome.completed += completed;
            outcome.failed += failed;
            let room = 10usize.saturating_sub(outcome.errors.len());
            outcome.errors.extend(errors.into_iter().take(room));
        }));
    }
    for task in tasks {
        if let Err(error) = task.await {
            let mut outcome = outcome.lock().unwrap_or_else(|e| e.into_inner());
            outcome.errors.push(format!("a client task died: {error}"));
            outcome.failed += 1;
        }
    }
    let mut outcome = outcome.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *outcome)
}

/// One connect/upgrade/message/close cycle.
async fn cycle(proxy: SocketAddr, source: IpAddr, n: u64) -> Result<(), String> {
    let mut stream = connect_from(source, proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(REQUEST)
        .await
        .map_err(|e| format!("send the request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        read_more(&mut stream, &mut buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    if !head.starts_with("HTTP/1.1 101 ") || !head.contains(ACCEPT) {
        return Err(format!("not a valid 101: {head:?}"));
    }
    buf.drain(..end);
    let message = format!("churn {n}");
    stream
        .write_all(&client_frame(0x1, message.as_bytes()))
        .await
        .map_err(|e| format!("send the message: {e}"))?;
    let (opcode, payload) = read_frame(&mut stream, &mut buf).await?;
    if opcode != 0x1 || payload != message.as_bytes() {
        return Err(format!(
            "echo: opcode {opcode}, {:?}",
            String::from_utf8_lossy(&payload)
        ));
    }
    stream
        .write_all(&client_frame(0x8, &1000u16.to_be_bytes()))
        .await
        .map_err(|e| format!("send Close: {e}"))?;
    let (opcode, _) = read_frame(&mut stream, &mut buf).await?;
    if opcode != 0x8 {
        return Err(format!("expected the Close answer, got opcode {opcode}"));
    }
    // The server closes the TCP connection first; the client closes when it reads EOF.
    let mut rest = [0u8; 64];
    match stream.read(&mut rest).await {
        Ok(0) if buf.is_empty() => Ok(()),
        Ok(0) => Err(format!("{} bytes after the Close", buf.len())),
        Ok(n) => Err(format!("{n} bytes after the Close")),
        Err(e) => Err(format!("waiting for EOF after the Close: {e}")),
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 1024];
    match stream.read(&mut chunk).await {
        Ok(0) => Err(format!(
            "EOF after {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        )),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

/// Reads one unmasked server frame with a payload under 126 bytes; returns opcode and payload.
async fn read_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u8, Vec<u8>), String> {
    while buf.len() < 2 {
        read_more(stream, buf).await?;
    }
    if buf[0] & 0x80 == 0 || buf[1] & 0x80 != 0 || buf[1] & 0x7f >= 126 {
        return Err(format!(
            "unexpected frame header {:02x} {:02x}",
            buf[0], buf[1]
        ));
    }
    let len = usize::from(buf[1] & 0x7f);
    while buf.len() < 2 + len {
        read_more(stream, buf).await?;
    }
    let opcode = buf[0] & 0x0f;
    let payload = buf[2..2 + len].to_vec();
    buf.drain(..2 + len);
    Ok((opcode, payload))
}

/// A final client frame (masked, as a client must), payload under 126 bytes.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = rand::random();
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// What the proxy process and the kernel hold at one moment.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// Open descriptors of the proxy.
    pub fds: usize,
    /// Entries of the proxy's eBPF maps by name (`PEER`, `BRIDGE`, `ACTIVITY`), walked from
    /// outside the process; empty without the program.
    pub maps: BTreeMap<String, usize>,
    /// Resident memory of the proxy, KiB.
    pub rss_kib: u64,
    /// TCP sockets of the test's ports, neither listening nor in TIME_WAIT.
    pub sockets: usize,
    /// TCP sockets of the test's ports in TIME_WAIT.
    pub time_wait: usize,
    /// Kernel slab that cannot be reclaimed (`SUnreclaim`: sockets, psocks, map elements,
    /// socket buffers), machine-wide, KiB.
    pub slab_unreclaimable_kib: u64,
    /// All kernel slab (`Slab`), machine-wide, KiB (dentries and inodes of every build on the
    /// machine included: reported, not compared).
    pub slab_kib: u64,
}

impl Held {
    /// Measures `proxy` and the TCP sockets whose local or remote port is one of `ports`.
    pub fn of(proxy: &Proxy, ports: &[u16]) -> Held {
        let (sockets, time_wait) = tcp_sockets(ports);
        Held {
            fds: proxy.fd_count(),
            maps: crate::bpf::map_entries(proxy.pid()),
            rss_kib: proxy.rss_kib(),
            sockets,
            time_wait,
            slab_unreclaimable_kib: meminfo_kib("SUnreclaim:"),
            slab_kib: meminfo_kib("Slab:"),
        }
    }

    /// Entries of map `name` (0 when the proxy holds no such map).
    pub fn map(&self, name: &str) -> usize {
        self.maps.get(name).copied().unwrap_or(0)
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        format!(
            "fds {}, PEER {}, ACTIVITY {}, BRIDGE {}, RSS {} KiB, sockets {} (+{} in TIME_WAIT), \
             slab {} KiB (unreclaimable {} KiB)",
            self.fds,
            self.map("PEER"),
            self.map("ACTIVITY"),
            self.map("BRIDGE"),
            self.rss_kib,
            self.sockets,
            self.time_wait,
            self.slab_kib,
            self.slab_unreclaimable_kib,
        )
    }
}

/// A `/proc/meminfo` field in KiB (0 if missing).
pub fn meminfo_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|value| value.parse().ok())
        })
        .unwrap_or(0)
}

/// IPv4 TCP sockets (`/proc/net/tcp`) with a local or remote port among `ports`: how many are
/// neither listening nor in TIME_WAIT, and how many are in TIME_WAIT.
pub fn tcp_sockets(ports: &[u16]) -> (usize, usize) {
    const TIME_WAIT: &str = "06";
    const LISTEN: &str = "0A";
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |address: &str| {
        address
            .rsplit(':')
            .next()
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    let (mut open, mut time_wait) = (0, 0);
    for line in text.lines().skip(1) {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(remote), Some(state)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let ours = [local, remote]
            .into_iter()
            .filter_map(port)
            .any(|p| ports.contains(&p));
        if !ours || state == LISTEN {
            continue;
        }
        if state == TIME_WAIT {
            time_wait += 1;
        } else {
            open += 1;
        }
    }
    (open, time_wait)
}

/// Waits until no socket of `ports` is in TIME_WAIT (the kernel keeps one for 60 s), at most
/// `limit`; returns how many are left.
pub fn wait_time_wait_gone(ports: &[u16], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let (_, time_wait) = tcp_sockets(ports);
        if time_wait == 0 || Instant::now() > deadline {
            return time_wait;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `bounded` for a whole step: awaits `future` for at most `limit`.
pub async fn within<T>(limit: Duration, future: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, future).await.ok()
}
