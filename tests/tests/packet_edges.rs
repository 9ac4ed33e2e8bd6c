//! The packet splice (`--datapath packet`) at its edges: IPv6, tunnels it must refuse (two
//! address families, no TCP timestamps) and that must then work on the userspace relay, a
//! 16 MiB message through a lossy line, and the ends of a spliced tunnel (a half-close either
//! way, a reset either way), which the proxy only sees in what the program recorded.
//!
//! The ends are tested with raw sockets on both sides: the client speaks the upgrade by hand,
//! and the upstream is a small server of the test's own on the echo's address (the echo is
//! stopped first), since `wsplice echo` answers a client's FIN by closing at once and can
//! neither send after a FIN nor half-close or reset first.

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wsplice_tests::cluster::in_netns;
use wsplice_tests::line::{End, LineOptions};
use wsplice_tests::packet::{
    can_run, chaos_on_every_link, converse, lossy_line, metric, records_settle, set_up, Setup,
    ADMIN, ECHO_PORT, ONE_PERCENT, PROXY_PORT,
};
use wsplice_tests::{
    admin_request, eventually_within, server_frame, switching_protocols, upgrade_request,
};

/// The proxy's whole `/metrics` text.
fn metrics_text(setup: &Setup) -> String {
    let admin: SocketAddr = ADMIN.parse().expect("admin");
    let (status, text) = in_netns(setup.line.proxy_ns(), move || {
        admin_request(admin, "GET", "/metrics", "", Duration::from_secs(5))
    });
    assert_eq!(status, 200, "GET /metrics: {text}");
    text
}

/// `wsplice_packet_refusals_total{reason="REASON"}`.
fn refusals(setup: &Setup, reason: &str) -> u64 {
    let text = metrics_text(setup);
    let prefix = format!("wsplice_packet_refusals_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refusals for {reason} in the metrics:\n{text}"))
}

/// A tunnel to `url` that is not eligible for the packet splice: every message still comes
/// back whole (on the relay), nothing was handed over, and the refusal is counted under
/// `reason` and logged.
fn assert_stays_on_the_relay_and_works(setup: &Setup, url: String, reason: &str) {
    let result = converse(
        setup,
        url,
        vec![1, 125, 126, 65_536, 1 << 20],
        Duration::from_millis(300),
        Duration::from_secs(10),
    );
    let log = setup.proxy.log_text();
    result.unwrap_or_else(|e| panic!("{e}\nproxy log:\n{log}"));
    assert_eq!(metric(setup, "tunnels_packet_spliced_total"), 0, "{log}");
    assert_eq!(refusals(setup, reason), 1, "{log}");
    assert!(log.contains("packet splice: not eligible"), "{log}");
}

/// Waits (linger 1 s + the proxy's 1 s check + slack) until the packet-spliced record is gone
/// and the log says why; panics with the log otherwise.
fn assert_retired(setup: &Setup, why: &str) {
    let gone = records_settle(setup, 0, Duration::from_secs(6));
    let log = setup.proxy.log_text();
    assert!(
        gone,
        "the record stayed (tunnels_packet_open {})\n{}\n{}\nproxy log:\n{log}",
        metric(setup, "tunnels_packet_open"),
        kernel_counters(setup),
        flow_dump(setup)
    );
    assert!(log.contains(why), "the log does not say {why:?}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The resets and aborts each namespace's TCP counted (`nstat`), for a failure's message.
fn kernel_counters(setup: &Setup) -> String {
    let mut out = String::new();
    for (name, ns) in [
        ("client", setup.line.client_ns()),
        ("proxy", setup.line.proxy_ns()),
        ("upstream", setup.line.upstream_ns()),
    ] {
        let counters = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "nstat", "-saz"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("nstat: {e}"));
        let wanted: Vec<&str> = counters
            .lines()
            .filter(|l| {
                ["Rst", "Abort", "Reset", "InSegs", "OutSegs", "InErrs"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .filter(|l| l.split_whitespace().nth(1) != Some("0"))
            .collect();
        out.push_str(&format!("{name} namespace: {}\n", wanted.join("; ")));
    }
    out
}

/// The packet program's flow entries and counters as the proxy's maps hold them now (walked
/// with the `bpf` syscall), decoded by `wsplice_common::packet::FlowEntry`'s layout, with
/// CLOCK_MONOTONIC now: for a failure's message.
fn flow_dump(setup: &Setup) -> String {
    let pid = setup.proxy.process.pid();
    let mut out = format!("CLOCK_MONOTONIC now {} ns\n", monotonic_ns());
    let mut seen = std::collections::BTreeSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out + "no fdinfo";
    };
    for fd in fds.flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        match dump_map(id) {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("map {id}: {e}\n")),
        }
    }
    out
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// `bpf(cmd, attr)` with a 128-byte attribute block.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr with the command's fields set; its pointers point at
    // live buffers of the sizes the kernel expects.
    let result = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn dump_map(id: u32) -> io::Result<String> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    let raw = bpf(14, &mut attr)? as i32; // BPF_MAP_GET_FD_BY_ID
                                          // SAFETY: a descriptor the kernel just returned.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut info = [0u8; 256];
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(15, &mut attr)?; // BPF_OBJ_GET_INFO_BY_FD
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    let (kind, key_size, value_size) = (word(0), word(8) as usize, word(12) as usize);
    let name_bytes = &info[24..40];
    let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(16);
    let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
    if name != "FLOWS" && name != "PACKET_STATS" {
        return Ok(String::new());
    }
    let cpus = if kind == 6 {
        // BPF_MAP_TYPE_PERCPU_ARRAY: one value per possible CPU.
        std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .ok()
            .and_then(|t| {
                t.trim()
                    .rsplit('-')
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
            })
            .map_or(1, |last| last + 1)
    } else {
        1
    };
    let mut out = format!("map {id} {name}:\n");
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size.div_ceil(8) * 8 * cpus];
    let mut first = true;
    loop {
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        let from = if first { 0 } else { key.as_ptr() as u64 };
        attr[8..16].copy_from_slice(&from.to_ne_bytes());
        attr[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
        match bpf(4, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        key.copy_from_slice(&next);
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
        bpf(1, &mut attr)?; // BPF_MAP_LOOKUP_ELEM
        let u32_at = |at: usize| u32::from_ne_bytes(value[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_ne_bytes(value[at..at + 8].try_into().unwrap());
        if name == "PACKET_STATS" {
            let total: u64 = (0..cpus).map(|cpu| u64_at(cpu * 8)).sum();
            out.push_str(&format!("  stat {}: {total}\n", u32_at_key(&key)));
        } else if value_size >= 96 {
            // `wsplice_common::packet::FlowEntry`'s layout.
            out.push_str(&format!(
                "  key {:02x?} sport {} dport {}: state {} flags {:#x} seq_delta {:#x} ack_delta {:#x} fin_end {:#x} peer_fin_end {:#x} seq_next {:#x} last_ns {} bytes {}\n",
                &key[..8],
                u16::from_be_bytes([key[32], key[33]]),
                u16::from_be_bytes([key[34], key[35]]),
                value[38],
                u32_at(60),
                u32_at(40),
                u32_at(44),
                u32_at(64),
                u32_at(68),
                u32_at(76),
                u64_at(80),
                u64_at(88),
            ));
        } else {
            out.push_str(&format!("  key {key:02x?}: value {value:02x?}\n"));
        }
    }
    Ok(out)
}

fn u32_at_key(key: &[u8]) -> u32 {
    key.get(..4)
        .map_or(0, |k| u32::from_ne_bytes(k.try_into().unwrap()))
}

// ---------------------------------------------------------------------------------------
// Address families and options.

#[test]
fn an_ipv6_tunnel_is_packet_spliced_and_carries_every_byte_both_ways() {
    if !can_run() {
        return;
    }
    let setup = set_up("pke1", &LineOptions::default(), "60s");
    let sizes = vec![
        1,
        2,
        125,
        126,
        1000,
        1440,
        4096,
        65_535,
        65_536,
        200_000,
        1 << 20,
    ];
    let result = converse(
        &setup,
        setup.url_v6.clone(),
        sizes,
        Duration::from_millis(300),
        Duration::from_secs(10),
    );
    let log = setup.proxy.log_text();
    result.unwrap_or_else(|e| panic!("{e}\nproxy log:\n{log}"));
    assert_eq!(
        metric(&setup, "tunnels_packet_spliced_total"),
        1,
        "the IPv6 tunnel was not handed over\n{log}"
    );
    assert!(!log.contains("not eligible"), "{log}");
    assert_retired(&setup, "both ends closed (packet path)");
}

#[test]
fn a_tunnel_of_two_address_families_stays_on_the_relay_and_works() {
    if !can_run() {
        return;
    }
    let setup = set_up("pke2", &LineOptions::default(), "60s");
    // An IPv6 client on a path routed to the IPv4 echo.
    let url = format!(
        "ws://[{}]:{PROXY_PORT}/mixed",
        setup.line.v6(End::ProxyToClient)
    );
    assert_stays_on_the_relay_and_works(&setup, url, "family");
}

#[test]
fn a_client_without_tcp_timestamps_stays_on_the_relay_and_works() {
    if !can_run() {
        return;
    }
    let setup = set_up("pke3", &LineOptions::default(), "60s");
    // Per namespace: the client's SYNs then carry no timestamp option.
    in_netns(setup.line.client_ns(), || {
        std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", "0")
    })
    .expect("net.ipv4.tcp_timestamps=0 in the client namespace");
    assert_stays_on_the_relay_and_works(&setup, setup.url.clone(), "no_timestamps");
}

// ---------------------------------------------------------------------------------------
// Volume through a bad line.

#[test]
fn a_16_mib_message_each_way_survives_loss_and_reordering_on_the_packet_path() {
    if !can_run() {
        return;
    }
    let setup = set_up("pke4", &lossy_line(), "60s");
    // Loss and reordering on every link into and out of the proxy, both ways.
    let shims = chaos_on_every_link(&setup, ONE_PERCENT);
    let started = Instant::now();
    let result = converse(
        &setup,
        setup.url.clone(),
        vec![16 << 20],
        Duration::from_millis(300),
        Duration::from_secs(30),
    );
    let log = setup.proxy.log_text();
    result.unwrap_or_else(|e| panic!("{e}\nproxy log:\n{log}"));
    println!("16 MiB each way in {:?}", started.elapsed());
    assert_eq!(metric(&setup, "tunnels_packet_spliced_total"), 1, "{log}");
    let counts: Vec<_> = shims.iter().map(|s| s.counts().expect("counts")).collect();
    println!("shims: {counts:?}");
    assert!(
        counts.iter().map(|c| c.dropped).sum::<u64>() > 0,
        "the shims dropped nothing"
    );
}

// ---------------------------------------------------------------------------------------
// The ends of a spliced tunnel, with raw sockets on both sides.

/// How long a raw socket waits for anything.
const RAW_WAIT: Duration = Duration::from_secs(5);

/// A masked client → server text frame (payload under 126 bytes).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask: [u8; 4] = rand::random();
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads a complete HTTP head byte by byte (nothing after it is consumed).
fn read_head(stream: &mut TcpStream) -> Result<String, String> {
    stream
        .set_read_timeout(Some(RAW_WAIT))
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "EOF inside a head: {:?}",
                    String::from_utf8_lossy(&head)
                ))
            }
            Ok(_) => head.push(byte[0]),
            Err(e) => {
                return Err(format!(
                    "reading a head: {e} after {:?}",
                    String::from_utf8_lossy(&head)
                ))
            }
        }
        if head.len() > 16 * 1024 {
            return Err("head too large".into());
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn read_exact(stream: &mut TcpStream, n: usize, what: &str) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(RAW_WAIT))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; n];
    stream
        .read_exact(&mut buf)
        .map_err(|e| format!("{what}: {e} ({:?})", e.kind()))?;
    Ok(buf)
}

/// Reads one small text frame; unmasks it if masked. Its payload.
fn read_frame(stream: &mut TcpStream, what: &str) -> Result<Vec<u8>, String> {
    let head = read_exact(stream, 2, what)?;
    if head[0] != 0x81 {
        return Err(format!(
            "{what}: first byte {:#x}, not a final text frame",
            head[0]
        ));
    }
    let len = usize::from(head[1] & 0x7f);
    if len >= 126 {
        return Err(format!("{what}: length byte {len}"));
    }
    let mask = if head[1] & 0x80 != 0 {
        Some(read_exact(stream, 4, what)?)
    } else {
        None
    };
    let mut payload = read_exact(stream, len, what)?;
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok(payload)
}

/// How a read for the end of a stream came out.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// 0 bytes: the peer's FIN.
    Eof,
    /// ECONNRESET.
    Reset,
    /// Bytes where an end was expected.
    Data(Vec<u8>),
    /// Nothing within the wait.
    TimedOut,
    /// Another error.
    Other(String),
}

/// Reads once, within `within`, expecting the stream's end.
fn read_end(stream: &mut TcpStream, within: Duration) -> Ending {
    if let Err(e) = stream.set_read_timeout(Some(within)) {
        return Ending::Other(e.to_string());
    }
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => Ending::Eof,
        Ok(n) => Ending::Data(buf[..n].to_vec()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ending::Reset,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ending::TimedOut
        }
        Err(e) => Ending::Other(format!("{e} ({:?})", e.kind())),
    }
}

/// Resets `stream` (SO_LINGER 0, then close).
fn reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

/// What an upstream script does once the tunnel is established and its first frame echoed.
type Script = Box<dyn FnOnce(TcpStream) -> Result<String, String> + Send>;

/// Stops the echo on the upstream's IPv4 address and serves one connection there instead: the
/// upgrade request is answered with a 101 by hand, the first (masked) frame echoed as a server
/// frame, and then `script` runs with the stream. The thread's result is the script's (or why
/// it did not get that far).
fn own_upstream(setup: &mut Setup, script: Script) -> JoinHandle<Result<String, String>> {
    setup
        .echo
        .process
        .terminate(Duration::from_secs(5))
        .expect("the echo stops");
    let addr = SocketAddr::from((setup.line.v4(End::Upstream), ECHO_PORT));
    let listener = in_netns(setup.line.upstream_ns(), move || TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr} in the upstream namespace: {e}"));
    std::thread::spawn(move || {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("upstream: no connection within 10 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("upstream accept: {e}")),
            }
        };
        drop(listener);
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let head = read_head(&mut stream).map_err(|e| format!("upstream: {e}"))?;
        stream
            .write_all(&switching_protocols(&head))
            .map_err(|e| format!("upstream: write 101: {e}"))?;
        let first = read_frame(&mut stream, "upstream: first frame")?;
        stream
            .write_all(&server_frame(&first))
            .map_err(|e| format!("upstream: echo: {e}"))?;
        script(stream)
    })
}

/// Connects from the client namespace, upgrades by hand, waits for the hand-off and proves the
/// path with one frame each way. The stream, established on the packet path.
fn spliced_client(setup: &Setup) -> TcpStream {
    let proxy = SocketAddr::from((setup.line.v4(End::ProxyToClient), PROXY_PORT));
    let mut stream = in_netns(setup.line.client_ns(), move || {
        TcpStream::connect_timeout(&proxy, RAW_WAIT)
    })
    .unwrap_or_else(|e| panic!("connect {proxy}: {e}"));
    stream.set_nodelay(true).expect("nodelay");
    stream
        .write_all(&upgrade_request("/", &[]))
        .expect("send the upgrade");
    let head = read_head(&mut stream)
        .unwrap_or_else(|e| panic!("client: {e}\n{}", setup.proxy.log_text()));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The hand-off: at the tunnel's first quiet moment.
    std::thread::sleep(Duration::from_millis(300));
    let handed = eventually_within(Duration::from_secs(3), || {
        metric(setup, "tunnels_packet_spliced_total") == 1
    });
    assert!(
        handed,
        "the tunnel was not packet-spliced\n{}",
        setup.proxy.log_text()
    );
    assert_eq!(metric(setup, "tunnels_packet_open"), 1);
    stream.write_all(&client_frame(b"ping")).expect("send ping");
    let back = read_frame(&mut stream, "client: the echo of ping")
        .unwrap_or_else(|e| panic!("{e}\n{}", setup.proxy.log_text()));
    assert_eq!(back, b"ping", "the echo of ping");
    stream
}

/// Joins the upstream thread (bounded by its own reads), panicking with the proxy log on error.
fn upstream_result(setup: &Setup, upstream: JoinHandle<Result<String, String>>) -> String {
    upstream
        .join()
        .expect("the upstream thread")
        .unwrap_or_else(|e| panic!("{e}\nproxy log:\n{}", setup.proxy.log_text()))
}

#[test]
fn a_client_half_close_crosses_the_packet_path_and_the_upstream_may_still_send() {
    if !can_run() {
        return;
    }
    let mut setup = set_up("pke5", &LineOptions::default(), "60s");
    let upstream = own_upstream(
        &mut setup,
        Box::new(|mut stream| {
            // The client's FIN, after its data.
            match read_end(&mut stream, RAW_WAIT) {
                Ending::Eof => {}
                other => {
                    return Err(format!(
                        "upstream: expected the client's FIN, got {other:?}"
                    ))
                }
            }
            // Data the other way after that FIN still arrives; then the upstream's FIN.
            stream
                .write_all(&server_frame(b"after the client's FIN"))
                .map_err(|e| format!("upstream: write after the client's FIN: {e}"))?;
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("upstream: shutdown: {e}"))?;
            // Kept until the client has everything (a close now could not reset: all read).
            std::thread::sleep(Duration::from_millis(500));
            Ok("upstream saw the client's FIN".into())
        }),
    );
    let mut client = spliced_client(&setup);
    client.shutdown(Shutdown::Write).expect("client shutdown");
    let after = read_frame(&mut client, "client: data after its FIN")
        .unwrap_or_else(|e| panic!("{e}\n{}", setup.proxy.log_text()));
    assert_eq!(after, b"after the client's FIN");
    let end = read_end(&mut client, RAW_WAIT);
    assert_eq!(
        end,
        Ending::Eof,
        "the client did not see the upstream's FIN\n{}",
        setup.proxy.log_text()
    );
    println!("{}", upstream_result(&setup, upstream));
    assert_retired(&setup, "both ends closed (packet path)");
    drop(client);
}

#[test]
fn an_upstream_half_close_crosses_the_packet_path_and_the_client_may_still_send() {
    if !can_run() {
        return;
    }
    let mut setup = set_up("pke6", &LineOptions::default(), "60s");
    let upstream = own_upstream(
        &mut setup,
        Box::new(|mut stream| {
            // The upstream's FIN first.
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("upstream: shutdown: {e}"))?;
            let after = read_frame(&mut stream, "upstream: data after its FIN")?;
            if after != b"after the upstream's FIN" {
                return Err(format!(
                    "upstream: got {:?}",
                    String::from_utf8_lossy(&after)
                ));
            }
            match read_end(&mut stream, RAW_WAIT) {
                Ending::Eof => Ok("upstream saw the client's data and FIN".into()),
                other => Err(format!(
                    "upstream: expected the client's FIN, got {other:?}"
                )),
            }
        }),
    );
    let mut client = spliced_client(&setup);
    let end = read_end(&mut client, RAW_WAIT);
    assert_eq!(
        end,
        Ending::Eof,
        "the client did not see the upstream's FIN\n{}",
        setup.proxy.log_text()
    );
    client
        .write_all(&client_frame(b"after the upstream's FIN"))
        .expect("client: send after the upstream's FIN");
    client.shutdown(Shutdown::Write).expect("client shutdown");
    println!("{}", upstream_result(&setup, upstream));
    assert_retired(&setup, "both ends closed (packet path)");
    drop(client);
}

#[test]
fn a_client_reset_reaches_the_upstream_over_the_packet_path() {
    if !can_run() {
        return;
    }
    let mut setup = set_up("pke7", &LineOptions::default(), "60s");
    let upstream = own_upstream(
        &mut setup,
        Box::new(|mut stream| {
            let started = Instant::now();
            match read_end(&mut stream, RAW_WAIT) {
                ending @ (Ending::Reset | Ending::Eof) => Ok(format!(
                    "upstream saw {ending:?} after {:?}",
                    started.elapsed()
                )),
                other => Err(format!(
                    "upstream: expected the client's reset, got {other:?}"
                )),
            }
        }),
    );
    let client = spliced_client(&setup);
    reset(client);
    println!("{}", upstream_result(&setup, upstream));
    assert_retired(&setup, "reset (packet path)");
}

#[test]
fn an_upstream_reset_reaches_the_client_over_the_packet_path() {
    if !can_run() {
        return;
    }
    let mut setup = set_up("pke8", &LineOptions::default(), "60s");
    let (echoed, reset_now) = mpsc::channel::<()>();
    let upstream = own_upstream(
        &mut setup,
        Box::new(move |stream| {
            // Reset once the client has read the echo of its first frame.
            reset_now
                .recv_timeout(Duration::from_secs(10))
                .map_err(|e| format!("upstream: no go-ahead: {e}"))?;
            reset(stream);
            Ok("upstream reset".into())
        }),
    );
    let mut client = spliced_client(&setup);
    echoed.send(()).expect("the upstream waits");
    let started = Instant::now();
    let end = read_end(&mut client, RAW_WAIT);
    println!("{}", upstream_result(&setup, upstream));
    assert_eq!(
        end,
        Ending::Reset,
        "the client did not see the upstream's reset (after {:?})\n{}",
        started.elapsed(),
        setup.proxy.log_text()
    );
    assert_retired(&setup, "reset (packet path)");
    drop(client);
}
