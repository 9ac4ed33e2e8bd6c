//! The loader against the real kernel: each test loads the embedded program and splices real
//! TCP connections over 127.0.0.1. They need root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (as in CI) and a
//! build with the eBPF object; elsewhere they say so and pass without running.
//!
//! Topology of one tunnel, as the proxy sees it:
//! `client ⇄ proxy_client` (the accepted socket) and `proxy_upstream ⇄ upstream` (the connected
//! socket and the upstream's accepted one). The kernel moves bytes between the two proxy sockets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::thread;
use std::time::{Duration, Instant};

use super::{SpliceError, SpliceMaps, SpliceProgram};
use crate::sys::{queued_bytes, set_rcvlowat, socket_cookie};
use crate::tunnel::frames::FrameTracker;

/// The hand-off kick (`SO_RCVLOWAT` = 1).
fn kick(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    set_rcvlowat(fd, 1)
}

/// How long a test waits for bytes or for the kernel to drop map entries.
const PATIENCE: Duration = Duration::from_secs(5);

/// The loaded program (kept alive by the caller) and a handle on its maps; `None`, with the
/// reason printed, when this test cannot run here: a build without the eBPF object (plain
/// `cargo test`: use `cargo xtask test`), or a process that may not load eBPF (not root).
fn load() -> Option<(SpliceProgram, SpliceMaps)> {
    if !super::ebpf_object_built() {
        println!("skipped: this test build has no eBPF object (run `cargo xtask test`)");
        return None;
    }
    match SpliceProgram::load(64) {
        Ok(program) => {
            let maps = program.maps().expect("a handle on the maps");
            Some((program, maps))
        }
        Err(SpliceError::PermissionDenied(reason)) => {
            println!("skipped: loading eBPF needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON ({reason})");
            None
        }
        Err(error) => panic!("loading the splice program: {error}"),
    }
}

/// A connected pair over loopback: (the connecting side, the accepted side).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    let connecting = TcpStream::connect(listener.local_addr().expect("listener address"))
        .expect("connect over loopback");
    let (accepted, _) = listener.accept().expect("accept the connection");
    for stream in [&connecting, &accepted] {
        stream
            .set_read_timeout(Some(PATIENCE))
            .expect("set a read timeout");
    }
    (connecting, accepted)
}

/// Both connections of one tunnel, not yet spliced.
struct Tunnel {
    client: TcpStream,
    proxy_client: TcpStream,
    proxy_upstream: TcpStream,
    upstream: TcpStream,
}

impl Tunnel {
    fn new() -> Tunnel {
        let (client, proxy_client) = tcp_pair();
        let (proxy_upstream, upstream) = tcp_pair();
        Tunnel {
            client,
            proxy_client,
            proxy_upstream,
            upstream,
        }
    }

    fn client_cookie(&self) -> u64 {
        socket_cookie(self.proxy_client.as_fd()).expect("cookie of the client-facing socket")
    }

    fn upstream_cookie(&self) -> u64 {
        socket_cookie(self.proxy_upstream.as_fd()).expect("cookie of the upstream-facing socket")
    }

    /// Hand-off steps 3–5 (ARCHITECTURE.md): track both sockets, `cookie(upstream) → client`,
    /// then `cookie(client) → upstream`, then kick both.
    fn splice(&self, program: &mut SpliceMaps) {
        let (client_cookie, upstream_cookie) = (self.client_cookie(), self.upstream_cookie());
        program
            .track(client_cookie, 1, FrameTracker::at_boundary())
            .expect("track the client socket");
        program
            .track(upstream_cookie, 2, FrameTracker::at_boundary())
            .expect("track the upstream socket");
        program
            .insert_peer(upstream_cookie, self.proxy_client.as_fd())
            .expect("insert cookie(upstream) → client");
        program
            .insert_peer(client_cookie, self.proxy_upstream.as_fd())
            .expect("insert cookie(client) → upstream");
        kick(self.proxy_upstream.as_fd()).expect("kick the upstream socket");
        kick(self.proxy_client.as_fd()).expect("kick the client socket");
    }
}

/// `len` bytes that are not periodic over small strides, so a reordering shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buffer = vec![0; len];
    stream
        .read_exact(&mut buffer)
        .unwrap_or_else(|error| panic!("reading {len} bytes: {error}"));
    buffer
}

/// Writes `bytes` from another thread (a large write may block until the far side reads) and
/// reads as many on `reader`.
fn send_through(writer: &TcpStream, reader: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    let mut writer = writer.try_clone().expect("clone the writing socket");
    let owned = bytes.to_vec();
    let sending = thread::spawn(move || writer.write_all(&owned));
    let received = read_exactly(reader, bytes.len());
    sending
        .join()
        .expect("the writer thread panicked")
        .expect("writing the bytes");
    received
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    u64::try_from(now.tv_sec).expect("monotonic seconds are positive") * 1_000_000_000
        + u64::try_from(now.tv_nsec).expect("nanoseconds are positive")
}

/// Bytes waiting in the socket's receive queue (`FIONREAD`).
fn readable_bytes(stream: &TcpStream) -> usize {
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut pending) };
    assert_eq!(rc, 0, "ioctl(FIONREAD)");
    usize::try_from(pending).expect("FIONREAD is not negative")
}

/// Polls `condition` until it holds or `PATIENCE` runs out.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn spliced_bytes_flow_both_ways_in_order() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    tunnel.splice(&mut program);

    // Over a MiB each way: several skbs, a full socket buffer, the pressure report.
    let up = pattern(1_500_000, 0x11);
    assert!(send_through(&tunnel.client, &mut tunnel.upstream, &up) == up);
    let down = pattern(1_200_000, 0x22);
    assert!(send_through(&tunnel.upstream, &mut tunnel.client, &down) == down);
}

/// A WebSocket frame of `payload`, masked with a fixed key when `masked` (as a client's).
fn ws_frame(payload: &[u8], masked: bool) -> Vec<u8> {
    crate::tunnel::frames::frame(payload, masked.then_some([7, 1, 9, 3]))
}

/// Where the program says the client socket's frames stand.
fn kernel_frames(program: &SpliceMaps, cookie: u64) -> FrameTracker {
    let activity = program
        .activity(cookie)
        .expect("read activity")
        .expect("tracked");
    FrameTracker::from_kernel(activity.frame_left, activity.frame_state)
}

#[test]
fn the_program_follows_the_frames_it_passes_on_as_the_relay_would() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    tunnel.splice(&mut program);
    let cookie = tunnel.client_cookie();
    let mut expected = FrameTracker::at_boundary();
    // Small frames one by one, a frame over several skbs, and a write that ends mid-frame.
    let mut pieces: Vec<Vec<u8>> = (0..20)
        .map(|i| ws_frame(&pattern(10 + i, 1), true))
        .collect();
    pieces.push(ws_frame(&pattern(300_000, 2), true));
    pieces.push(ws_frame(&pattern(200, 3), true)[..50].to_vec());
    for piece in &pieces {
        assert!(send_through(&tunnel.client, &mut tunnel.upstream, piece) == *piece);
        expected.feed(piece);
        assert_eq!(kernel_frames(&program, cookie), expected);
    }
    assert!(
        !expected.is_at_boundary(),
        "the last write stopped inside a frame"
    );
    let rest = ws_frame(&pattern(200, 3), true)[50..].to_vec();
    assert!(send_through(&tunnel.client, &mut tunnel.upstream, &rest) == rest);
    assert!(kernel_frames(&program, cookie).is_at_boundary());
}

#[test]
fn more_frames_in_one_skb_than_the_program_follows_make_the_position_unknown() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    tunnel.splice(&mut program);
    // 100 tiny frames in one write: one skb, far more steps than the program takes.
    let burst: Vec<u8> = (0..100).flat_map(|_| ws_frame(b"x", true)).collect();
    assert!(send_through(&tunnel.client, &mut tunnel.upstream, &burst) == burst);
    assert!(!kernel_frames(&program, tunnel.client_cookie()).is_known());
}

#[test]
fn activity_counts_redirected_bytes_and_stamps_the_time() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    tunnel.splice(&mut program);
    let (client_cookie, upstream_cookie) = (tunnel.client_cookie(), tunnel.upstream_cookie());
    let fresh = program.activity(client_cookie).expect("read activity");
    assert_eq!(fresh.map(|a| (a.bytes, a.last_ns)), Some((0, 0)));

    let before = monotonic_ns();
    send_through(&tunnel.client, &mut tunnel.upstream, &pattern(3000, 1));
    let after = monotonic_ns();
    let first = program
        .activity(client_cookie)
        .expect("read activity")
        .expect("the client socket is tracked");
    assert_eq!(first.bytes, 3000);
    assert!(
        (before..=after).contains(&first.last_ns),
        "last_ns {} outside [{before}, {after}]",
        first.last_ns
    );

    thread::sleep(Duration::from_millis(5));
    send_through(&tunnel.client, &mut tunnel.upstream, &pattern(500, 2));
    let second = program
        .activity(client_cookie)
        .expect("read activity")
        .expect("the client socket is tracked");
    assert_eq!(second.bytes, 3500);
    assert!(second.last_ns > first.last_ns, "last_ns did not move");

    send_through(&tunnel.upstream, &mut tunnel.client, &pattern(700, 3));
    let upstream = program
        .activity(upstream_cookie)
        .expect("read activity")
        .expect("the upstream socket is tracked");
    assert_eq!(upstream.bytes, 700);
    // What the kernel pushed into the client-facing socket's send queue.
    let pushed = queued_bytes(tunnel.proxy_client.as_fd()).expect("queued bytes");
    assert_eq!(pushed, 700);
}

#[test]
fn bytes_queued_before_insertion_arrive_after_the_kick() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    let early_up = pattern(4000, 0x33);
    let early_down = pattern(2500, 0x44);
    tunnel.client.write_all(&early_up).expect("client writes");
    tunnel
        .upstream
        .write_all(&early_down)
        .expect("upstream writes");
    // Let both land in the proxy sockets' receive queues before the splice.
    eventually("the early bytes are queued", || {
        readable_bytes(&tunnel.proxy_client) == 4000
            && readable_bytes(&tunnel.proxy_upstream) == 2500
    });

    tunnel.splice(&mut program);

    assert!(read_exactly(&mut tunnel.upstream, early_up.len()) == early_up);
    assert!(read_exactly(&mut tunnel.client, early_down.len()) == early_down);
    // And the splice goes on carrying what comes after, behind them.
    let later = pattern(900, 0x55);
    assert!(send_through(&tunnel.client, &mut tunnel.upstream, &later) == later);
}

#[test]
fn a_socket_without_a_peer_entry_keeps_its_bytes() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    let client_cookie = tunnel.client_cookie();
    program
        .track(client_cookie, 1, FrameTracker::at_boundary())
        .expect("track");
    // Step 4 alone: the client-facing socket is live as a map value but has no key of its own.
    program
        .insert_peer(tunnel.upstream_cookie(), tunnel.proxy_client.as_fd())
        .expect("insert cookie(upstream) → client");

    let early = pattern(1000, 0x66);
    tunnel.client.write_all(&early).expect("client writes");
    assert!(read_exactly(&mut tunnel.proxy_client, early.len()) == early);
    let activity = program
        .activity(client_cookie)
        .expect("read activity")
        .expect("tracked");
    assert_eq!(
        activity.bytes, 0,
        "bytes that were not redirected were counted"
    );
}

#[test]
fn a_live_socket_without_its_own_entry_reaches_its_peer_through_the_bridge() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    let (client_cookie, upstream_cookie) = (tunnel.client_cookie(), tunnel.upstream_cookie());
    program
        .track(client_cookie, 1, FrameTracker::at_boundary())
        .expect("track");
    program
        .track(upstream_cookie, 2, FrameTracker::at_boundary())
        .expect("track");
    // A promotion's step 3: the bridge first, then the client-facing socket goes live.
    program
        .insert_bridge(client_cookie, tunnel.proxy_upstream.as_fd())
        .expect("bridge cookie(client) → upstream");
    // Being a bridge value does not make the upstream-facing socket live.
    let unspliced = pattern(300, 0x21);
    tunnel
        .upstream
        .write_all(&unspliced)
        .expect("upstream writes");
    assert!(read_exactly(&mut tunnel.proxy_upstream, unspliced.len()) == unspliced);
    program
        .insert_peer(upstream_cookie, tunnel.proxy_client.as_fd())
        .expect("insert cookie(upstream) → client");
    // The client talks in the moment before its own entry exists: over the bridge.
    let during = pattern(1500, 0x31);
    assert!(send_through(&tunnel.client, &mut tunnel.upstream, &during) == during);
    // Step 4, then the bridge comes out: the stream goes on, in order.
    program
        .insert_peer(client_cookie, tunnel.proxy_upstream.as_fd())
        .expect("insert cookie(client) → upstream");
    program
        .remove_bridge(client_cookie)
        .expect("remove the bridge");
    let after = pattern(64 * 1024, 0x41);
    assert!(send_through(&tunnel.client, &mut tunnel.upstream, &after) == after);
    let back = pattern(2000, 0x51);
    assert!(send_through(&tunnel.upstream, &mut tunnel.client, &back) == back);
    let activity = program
        .activity(client_cookie)
        .expect("read activity")
        .expect("tracked");
    assert_eq!(activity.bytes, (during.len() + after.len()) as u64);
}

/// Writes from `writer` (non-blocking) until it has been blocked for half a second, and
/// returns how much it could write: what the way to a reader that does not read takes in.
fn write_until_blocked(writer: &TcpStream, bytes: &[u8]) -> usize {
    writer.set_nonblocking(true).expect("non-blocking writer");
    let mut writer = writer;
    let (mut written, mut blocked_since) = (0, None);
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        match writer.write(&bytes[written % bytes.len()..]) {
            Ok(n) => {
                written += n;
                blocked_since = None;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(error) => panic!("writing: {error}"),
        }
    }
    writer.set_nonblocking(false).expect("blocking writer");
    written
}

#[test]
fn a_paused_socket_keeps_its_bytes_in_order_and_its_sender_is_throttled() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    tunnel.splice(&mut program);
    let (client_cookie, upstream_cookie) = (tunnel.client_cookie(), tunnel.upstream_cookie());
    let first = pattern(100_000, 3);
    assert!(send_through(&tunnel.upstream, &mut tunnel.client, &first) == first);
    let counted = |program: &SpliceMaps| {
        program
            .activity(upstream_cookie)
            .expect("read activity")
            .map(|activity| activity.bytes)
    };
    let before = counted(&program);

    program
        .pause(upstream_cookie)
        .expect("pause the upstream socket");
    program
        .pause(client_cookie)
        .expect("pause the client socket");
    // The upstream floods; nobody reads the proxy's socket: TCP's window closes, so what it
    // can write is bounded by the socket buffers (a few MiB), not by the kernel's patience.
    let flood = pattern(1 << 20, 4);
    let written = write_until_blocked(&tunnel.upstream, &flood);
    assert!(written > 0, "nothing could be written");
    assert!(
        written < 32 << 20,
        "a paused socket let its sender write {written} bytes"
    );
    // Nothing was redirected to the client...
    tunnel
        .client
        .set_nonblocking(true)
        .expect("non-blocking client");
    let mut byte = [0u8; 1];
    let nothing = (&tunnel.client).read(&mut byte);
    assert!(
        matches!(&nothing, Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
        "the client got bytes from a paused socket: {nothing:?}"
    );
    assert_eq!(
        counted(&program),
        before,
        "the program counted paused bytes"
    );
    // ...they wait on the paused socket, whole and in order, for the relay to read.
    let held = read_exactly(&mut tunnel.proxy_upstream, written);
    let expected: Vec<u8> = flood.iter().copied().cycle().take(written).collect();
    assert!(held == expected, "the paused bytes came out changed");
    // And the other paused socket keeps the client's bytes the same way.
    let up = pattern(5000, 5);
    tunnel
        .client
        .set_nonblocking(false)
        .expect("blocking client");
    tunnel.client.write_all(&up).expect("the client writes");
    assert!(read_exactly(&mut tunnel.proxy_client, up.len()) == up);
    program.unpause(upstream_cookie).expect("unpause");
    program.unpause(client_cookie).expect("unpause");
}

#[test]
fn removing_a_peer_entry_stops_the_redirect() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let mut tunnel = Tunnel::new();
    tunnel.splice(&mut program);
    send_through(&tunnel.client, &mut tunnel.upstream, &pattern(100, 7));

    program
        .remove_peer(tunnel.client_cookie())
        .expect("remove the client's peer entry");
    let after = pattern(800, 8);
    tunnel.client.write_all(&after).expect("client writes");
    assert!(read_exactly(&mut tunnel.proxy_client, after.len()) == after);
    assert_eq!(program.peer_entries(), 1);
}

#[test]
fn closed_sockets_leave_peer_and_untrack_empties_activity() {
    let Some((_loaded, mut program)) = load() else {
        return;
    };
    let tunnel = Tunnel::new();
    tunnel.splice(&mut program);
    let (client_cookie, upstream_cookie) = (tunnel.client_cookie(), tunnel.upstream_cookie());
    assert_eq!(program.peer_entries(), 2);
    assert_eq!(program.tracked_entries(), 2);

    drop(tunnel);
    eventually("PEER empties by itself", || program.peer_entries() == 0);
    assert_eq!(
        program.tracked_entries(),
        2,
        "the kernel keeps ACTIVITY entries"
    );
    // Removing entries the kernel already dropped is not an error.
    program
        .remove_peer(client_cookie)
        .expect("remove a gone peer");
    program.untrack(client_cookie).expect("untrack");
    program.untrack(upstream_cookie).expect("untrack");
    program.untrack(upstream_cookie).expect("untrack twice");
    assert_eq!(program.tracked_entries(), 0);
    assert_eq!(
        program.activity(client_cookie).expect("read activity"),
        None
    );
}

#[test]
fn cookies_are_stable_per_socket_and_distinct_across_sockets() {
    let (a, b) = tcp_pair();
    let first = socket_cookie(a.as_fd()).expect("cookie");
    assert_eq!(socket_cookie(a.as_fd()).expect("cookie"), first);
    assert_ne!(socket_cookie(b.as_fd()).expect("cookie"), first);
    assert_ne!(first, 0);
}

#[test]
fn cookie_of_a_non_socket_is_an_error() {
    let file = std::fs::File::open("/proc/self/stat").expect("open a regular file");
    let error = socket_cookie(file.as_fd()).expect_err("a file has no socket cookie");
    assert_eq!(error.raw_os_error(), Some(libc::ENOTSOCK));
}

#[test]
fn permission_errors_are_told_apart() {
    let denied = aya::maps::MapError::CreateError {
        name: "PEER".into(),
        io_error: std::io::Error::from_raw_os_error(libc::EPERM),
    };
    let error = SpliceError::from(denied);
    assert!(matches!(error, SpliceError::PermissionDenied(_)), "{error}");
    assert!(error.to_string().contains("CAP_BPF"), "{error}");

    let full = aya::maps::MapError::CreateError {
        name: "PEER".into(),
        io_error: std::io::Error::from_raw_os_error(libc::ENOMEM),
    };
    let error = SpliceError::from(full);
    assert!(matches!(error, SpliceError::Map(_)), "{error}");
    // The kernel's reason is in the message, not only in the source chain.
    assert!(error.to_string().contains("os error 12"), "{error}");
}
