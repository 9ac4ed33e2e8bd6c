//! The test infrastructure for the packet splice path proves itself: the three-namespace line
//! (`wsplice_tests::line`) and the loss-and-reorder shim (`wsplice_tests::chaos`).
//!
//! The proxy namespace does not forward, so the shim is tested on the client link alone: a TCP
//! server in the proxy namespace (on its client-side address), a client in the client
//! namespace, 8 MiB of a sequenced pattern each way at once, over IPv4 and IPv6, with the shim
//! on the client's egress and on the proxy's egress towards the client (1% loss, 1% reordered
//! through 4 detour hops, offloads off). Every byte must arrive in order within a bounded time,
//! the shims must have dropped and detoured packets, and the senders must have retransmitted.
//! Last, two loss-free one-way rounds with every thread on one CPU (where a veth by itself never
//! reorders): through a shim that detours nothing the receiver sees every segment in order;
//! through the detour (5%, 255 hops) it sees segments out of order.

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use wsplice_tests::chaos::{Chaos, ChaosCounts, ChaosSettings, MAX_BOUNCES};
use wsplice_tests::cluster::{in_netns, spawn_in_netns};
use wsplice_tests::is_root;
use wsplice_tests::line::{End, Line, LineOptions, LinkSettings, Offloads};

/// Bytes sent each way in the lossy rounds.
const VOLUME: usize = 8 << 20;
/// Bytes sent (client to server) in the loss-free reordering rounds.
const REORDER_VOLUME: usize = 2 << 20;
/// The most one round may take.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

/// Byte `offset` of the stream seeded `seed`: consecutive little-endian u32 counters, so a
/// byte out of place, repeated or missing shows at once.
fn pattern(seed: u32, offset: usize) -> u8 {
    ((offset / 4) as u32).wrapping_add(seed).to_le_bytes()[offset % 4]
}

/// What TCP_INFO says of one socket after a round.
#[derive(Clone, Copy)]
struct Info {
    /// Segments it retransmitted.
    total_retrans: u32,
    /// Reordering events it detected as a sender.
    reord_seen: u32,
    /// Its current reordering estimate (segments).
    reordering: u32,
    /// Out-of-order packets it received.
    rcv_ooopack: u32,
}

impl std::fmt::Debug for Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "retransmitted {}, reordering seen {} (estimate {} segments), received out of order {}",
            self.total_retrans, self.reord_seen, self.reordering, self.rcv_ooopack
        )
    }
}

fn tcp_info(stream: &TcpStream) -> io::Result<Info> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt on a live socket into a tcp_info of the size passed.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Info {
        total_retrans: info.tcpi_total_retrans,
        reord_seen: info.tcpi_reord_seen,
        reordering: info.tcpi_reordering,
        rcv_ooopack: info.tcpi_rcv_ooopack,
    })
}

/// One round's traffic: bytes each way, and the CPU every thread of it runs on (if any).
#[derive(Debug, Clone, Copy)]
struct Round {
    /// Client to server.
    up: usize,
    /// Server to client.
    down: usize,
    /// Pin the round's threads (and so the softirq work their sends start) to this CPU.
    cpu: Option<usize>,
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: Option<usize>) -> io::Result<()> {
    let Some(cpu) = cpu else {
        return Ok(());
    };
    // SAFETY: a cpu_set_t is a plain bit array; CPU_ZERO/CPU_SET write inside it, and
    // sched_setaffinity(0) reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The first CPU this process may run on.
fn first_cpu() -> usize {
    // SAFETY: sched_getaffinity(0) fills a cpu_set_t of the size passed; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let got = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set);
        assert_eq!(got, 0, "sched_getaffinity: {}", io::Error::last_os_error());
        (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| libc::CPU_ISSET(cpu, &set))
            .expect("some CPU is allowed")
    }
}

/// Sends `send` bytes of pattern `send_seed` while reading `receive` bytes of pattern
/// `receive_seed`, checking each; then the socket's TCP_INFO. Fails past `deadline`.
fn exchange(
    stream: TcpStream,
    (send, send_seed): (usize, u32),
    (receive, receive_seed): (usize, u32),
    cpu: Option<usize>,
    deadline: Instant,
) -> io::Result<Info> {
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero())
            .then_some(left)
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "round deadline passed"))
    };
    stream.set_write_timeout(Some(left()?))?;
    stream.set_read_timeout(Some(left()?))?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> io::Result<()> {
        pin(cpu)?;
        let mut chunk = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < send {
            let len = chunk.len().min(send - sent);
            for (i, byte) in chunk[..len].iter_mut().enumerate() {
                *byte = pattern(send_seed, sent + i);
            }
            writer.write_all(&chunk[..len])?;
            sent += len;
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut reader = &stream;
    let mut chunk = vec![0u8; 64 << 10];
    let mut received = 0;
    loop {
        stream.set_read_timeout(Some(left()?))?;
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        if let Some(bad) = (0..n).find(|&i| chunk[i] != pattern(receive_seed, received + i)) {
            return Err(io::Error::other(format!(
                "byte {} is {:#04x}, expected {:#04x}",
                received + bad,
                chunk[bad],
                pattern(receive_seed, received + bad)
            )));
        }
        received += n;
    }
    let sent = sender
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    sent?;
    if received != receive {
        return Err(io::Error::other(format!(
            "received {received} bytes of {receive}"
        )));
    }
    tcp_info(&stream)
}

/// One connection from the client namespace to the proxy's client-side address `server`,
/// carrying `traffic`; (client's, server's) TCP_INFO.
fn round(line: &Line, server: IpAddr, traffic: Round) -> (Info, Info) {
    let deadline = Instant::now() + ROUND_LIMIT;
    let listener = in_netns(line.proxy_ns(), move || {
        TcpListener::bind(SocketAddr::new(server, 0))
    })
    .expect("listen in the proxy namespace");
    let addr = listener.local_addr().expect("listening address");
    let accepting = std::thread::spawn(move || -> io::Result<Info> {
        pin(traffic.cpu)?;
        listener.set_nonblocking(true)?;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no connection"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(error) => return Err(error),
            }
        };
        stream.set_nonblocking(false)?;
        exchange(
            stream,
            (traffic.down, 2),
            (traffic.up, 1),
            traffic.cpu,
            deadline,
        )
    });
    let connecting = spawn_in_netns(line.client_ns(), move || -> io::Result<Info> {
        pin(traffic.cpu)?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        exchange(
            stream,
            (traffic.up, 1),
            (traffic.down, 2),
            traffic.cpu,
            deadline,
        )
    });
    let client = connecting
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let server = accepting
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    (
        client.unwrap_or_else(|e| panic!("client side to {addr}: {e}")),
        server.unwrap_or_else(|e| panic!("server side on {addr}: {e}")),
    )
}

/// `after - before`, field by field.
fn delta(after: ChaosCounts, before: ChaosCounts) -> ChaosCounts {
    ChaosCounts {
        passed: after.passed - before.passed,
        dropped: after.dropped - before.dropped,
        detoured: after.detoured - before.detoured,
        returned: after.returned - before.returned,
        hops: after.hops - before.hops,
    }
}

#[test]
fn shim_drops_and_reorders_without_corrupting() {
    if !is_root() {
        println!("skipped: needs root");
        return;
    }
    let started = Instant::now();
    let line = Line::build(
        "ps1",
        &LineOptions {
            client_link: LinkSettings {
                mtu: None,
                offloads: Some(Offloads::OFF),
            },
            upstream_link: LinkSettings::default(),
        },
    )
    .expect("build the line");
    assert_eq!(line.netns(End::Client), line.client_ns());
    assert_eq!(line.netns(End::ProxyToClient), line.proxy_ns());
    assert_ne!(
        line.ifindex(End::ProxyToClient),
        line.ifindex(End::ProxyToUpstream)
    );
    let lossy = ChaosSettings {
        loss_per_million: 10_000,
        reorder_per_million: 10_000,
        bounces: 4,
    };
    {
        let shims = [
            Chaos::attach(line.client_ns(), line.interface(End::Client), lossy),
            Chaos::attach(line.proxy_ns(), line.interface(End::ProxyToClient), lossy),
        ]
        .map(|shim| shim.expect("attach the shim"));
        for server in [
            IpAddr::V4(line.v4(End::ProxyToClient)),
            IpAddr::V6(line.v6(End::ProxyToClient)),
        ] {
            let before = shims.each_ref().map(|shim| shim.counts().expect("counts"));
            let round_started = Instant::now();
            let (client, server_info) = round(
                &line,
                server,
                Round {
                    up: VOLUME,
                    down: VOLUME,
                    cpu: None,
                },
            );
            let took = round_started.elapsed();
            let counts: Vec<ChaosCounts> = shims
                .iter()
                .zip(before)
                .map(|(shim, before)| delta(shim.counts().expect("counts"), before))
                .collect();
            eprintln!(
                "{server}: 2 x {VOLUME} bytes in {took:?}\n  client egress shim {:?}\n  \
                 proxy egress shim {:?}\n  client (sender c->s) {client:?}\n  server (sender \
                 s->c) {server_info:?}",
                counts[0], counts[1]
            );
            for (shim, counts) in shims.iter().zip(&counts) {
                let what = format!("shim on {} ({server})", shim.interface());
                assert!(counts.dropped > 0, "{what} dropped nothing: {counts:?}");
                assert!(counts.detoured > 0, "{what} detoured nothing: {counts:?}");
                assert!(counts.returned > 0, "{what}: nothing came back: {counts:?}");
                assert!(
                    counts.passed > (VOLUME / 1500) as u64,
                    "{what}: fewer packets than MSS-sized segments (offloads on?): {counts:?}"
                );
            }
            assert!(client.total_retrans > 0, "client never retransmitted");
            assert!(server_info.total_retrans > 0, "server never retransmitted");
        }
    }
    // Reordering alone, on one CPU. Two CPUs reorder a veth's packets by themselves (each
    // queues what it sends on its own receive backlog), one does not: a loss-free control round
    // through a shim that changes nothing must see every segment in order, and the same round
    // with the detour must not. With [`MAX_BOUNCES`] hops (beyond the backlog's quota of 64 per
    // poll) a detoured packet is still on its way when the sender's next segments arrive; a few
    // hops drain within the softirq run its own send triggered (see `ChaosSettings::bounces`).
    let cpu = Some(first_cpu());
    let one_way = Round {
        up: REORDER_VOLUME,
        down: 0,
        cpu,
    };
    let server = IpAddr::V4(line.v4(End::ProxyToClient));
    let mut seen = Vec::new();
    for reorder_per_million in [0, 50_000] {
        let shim = Chaos::attach(
            line.client_ns(),
            line.interface(End::Client),
            ChaosSettings {
                loss_per_million: 0,
                reorder_per_million,
                bounces: MAX_BOUNCES,
            },
        )
        .expect("attach the reorder-only shim");
        let (client, server) = round(&line, server, one_way);
        let counts = shim.counts().expect("counts");
        eprintln!(
            "reordering {reorder_per_million} per million, one CPU, client egress: {counts:?}\n  \
             client (sender) {client:?}\n  server (receiver) {server:?}"
        );
        assert_eq!(counts.dropped, 0);
        assert_eq!(counts.detoured > 0, reorder_per_million > 0, "{counts:?}");
        seen.push(server.rcv_ooopack);
    }
    assert_eq!(
        seen[0], 0,
        "segments out of order on one CPU without the detour"
    );
    assert!(
        seen[1] > 0,
        "the receiver saw no segment out of order through the detour"
    );
    eprintln!("test took {:?}", started.elapsed());
}
