//! The packet splice (`--datapath packet`) end to end, in a topology the test makes: a client
//! namespace, a proxy namespace (wsplice, with its tc program on both of its interfaces) and an
//! upstream namespace (`wsplice echo`). Once a tunnel is handed over, the proxy holds no
//! socket for it: every byte the client gets back went client → program → upstream → program
//! → client as rewritten packets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::chaos::{Chaos, ChaosSettings};
use wsplice_tests::cluster::{in_netns, wait_listening};
use wsplice_tests::line::{End, Line, LineOptions, LinkSettings, Offloads};
use wsplice_tests::{admin_request, binary, is_root, scratch_dir, Process};

const PROXY_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const ADMIN: &str = "127.0.0.1:9901";

/// A process in a namespace, killed by PID when dropped, with its log.
struct InNetns {
    _process: Process,
    log: PathBuf,
}

impl InNetns {
    fn start(ns: &str, args: &[&str], what: &str) -> InNetns {
        let log = scratch_dir(what).join("log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .arg(binary())
            .args(args)
            .env("RUST_LOG", "info,wsplice=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        let process = Process::spawn(&mut command).unwrap_or_else(|e| panic!("start {what}: {e}"));
        InNetns {
            _process: process,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The line, an echo upstream and a proxy on the packet path.
struct Setup {
    line: Line,
    proxy: InNetns,
    _echo: InNetns,
    url: String,
}

fn set_up(prefix: &str, options: &LineOptions, idle: &str) -> Setup {
    let line = Line::build(prefix, options).expect("the topology");
    let echo_addr = SocketAddr::from((line.v4(End::Upstream), ECHO_PORT));
    let echo = InNetns::start(
        line.upstream_ns(),
        &["echo", "--listen", &echo_addr.to_string()],
        &format!("{prefix}-echo"),
    );
    let proxy_addr = SocketAddr::from((line.v4(End::ProxyToClient), PROXY_PORT));
    let config = format!(
        "workers = 1\n\n[[listener]]\nbind = \"{proxy_addr}\"\n\n[[route]]\nupstream = \"echo\"\n\n\
         [upstream.echo]\nservers = [\"{echo_addr}\"]\n\n[timeouts]\nidle = \"{idle}\"\n\n\
         [admin]\nbind = \"{ADMIN}\"\n\n[packet]\ninterfaces = [\"{}\", \"{}\"]\n\
         ports = \"41000-41999\"\nlinger = \"1s\"\n",
        line.interface(End::ProxyToClient),
        line.interface(End::ProxyToUpstream),
    );
    let dir = scratch_dir(&format!("{prefix}-proxy"));
    let path = dir.join("wsplice.toml");
    std::fs::write(&path, config).expect("config");
    let proxy = InNetns::start(
        line.proxy_ns(),
        &[
            "run",
            "-c",
            path.to_str().expect("utf-8 path"),
            "--datapath",
            "packet",
        ],
        &format!("{prefix}-wsplice"),
    );
    wait_listening(line.upstream_ns(), echo_addr);
    wait_listening(line.client_ns(), proxy_addr);
    Setup {
        line,
        proxy,
        _echo: echo,
        url: format!("ws://{proxy_addr}/"),
    }
}

/// A counter of the proxy's metrics (read from inside its namespace).
fn metric(setup: &Setup, name: &str) -> u64 {
    let admin: SocketAddr = ADMIN.parse().expect("admin");
    let (_, text) = in_netns(setup.line.proxy_ns(), move || {
        admin_request(admin, "GET", "/metrics", "", Duration::from_secs(5))
    });
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("wsplice_{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}

/// A message of `len` bytes that names its place in the conversation.
fn message(round: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(round as u32 * 7) as u8)
        .collect()
}

/// Sends each of `sizes` as a binary message and checks its echo, in order.
fn converse(setup: &Setup, sizes: &'static [usize], settle: Duration) -> Result<(), String> {
    let url = setup.url.clone();
    in_netns(setup.line.client_ns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (mut ws, _) = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(&url))
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| format!("connect: {e}"))?;
            // A first exchange, then a pause: the tunnel is handed over at its quiet moment.
            ws.send(Message::binary(b"hello".to_vec())).await.map_err(|e| e.to_string())?;
            let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            if !matches!(first, Ok(Some(Ok(Message::Binary(ref b)))) if b.as_ref() == b"hello") {
                return Err(format!("first echo: {first:?}"));
            }
            tokio::time::sleep(settle).await;
            for (round, &len) in sizes.iter().enumerate() {
                let sent = message(round, len);
                ws.send(Message::binary(sent.clone())).await.map_err(|e| format!("send {len}: {e}"))?;
                let back = tokio::time::timeout(Duration::from_secs(30), ws.next()).await;
                match back {
                    Ok(Some(Ok(Message::Binary(got)))) if got.as_ref() == sent.as_slice() => {}
                    Ok(Some(Ok(Message::Binary(got)))) => {
                        let at = got.iter().zip(&sent).position(|(a, b)| a != b);
                        return Err(format!("round {round} ({len} bytes): {} bytes back, first difference at {at:?}", got.len()));
                    }
                    other => return Err(format!("round {round} ({len} bytes): {other:?}")),
                }
            }
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
            // The close handshake completes end to end.
            let end = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(frame) = ws.next().await {
                    if frame.is_err() {
                        break;
                    }
                }
            })
            .await;
            end.map_err(|_| "the close did not complete".to_owned())
        })
    })
}

const SIZES: &[usize] = &[
    1,
    2,
    125,
    126,
    1000,
    1460,
    4096,
    65_535,
    65_536,
    200_000,
    1 << 20,
];

fn can_run() -> bool {
    if !is_root() {
        println!("skipped: the packet splice needs root (namespaces, eBPF, TCP_REPAIR)");
    }
    is_root()
}

#[test]
fn a_tunnel_on_the_packet_path_carries_every_byte_both_ways_with_no_proxy_socket() {
    if !can_run() {
        return;
    }
    let setup = set_up("pkt1", &LineOptions::default(), "60s");
    let result = converse(&setup, SIZES, Duration::from_millis(300));
    let log = setup.proxy.log_text();
    result.unwrap_or_else(|e| panic!("{e}\nproxy log:\n{log}"));
    assert_eq!(
        metric(&setup, "tunnels_packet_spliced_total"),
        1,
        "the tunnel was handed over\n{log}"
    );
    // Both ends closed: the flows go after the linger time, and so does the record.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&setup, "tunnels_packet_open") != 0 {
        assert!(
            Instant::now() < deadline,
            "the record stayed\n{}",
            setup.proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = setup.proxy.log_text();
    assert!(log.contains("both ends closed (packet path)"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn the_packet_path_survives_loss_and_reordering_both_ways() {
    if !can_run() {
        return;
    }
    let link = LinkSettings {
        mtu: None,
        offloads: Some(Offloads::OFF),
    };
    let options = LineOptions {
        client_link: link,
        upstream_link: link,
    };
    let setup = set_up("pkt2", &options, "60s");
    let chaos = ChaosSettings {
        loss_per_million: 10_000,
        reorder_per_million: 10_000,
        bounces: 4,
    };
    // Loss and reordering on every link into and out of the proxy, both ways.
    let shims: Vec<Chaos> = [
        (setup.line.client_ns(), End::Client),
        (setup.line.proxy_ns(), End::ProxyToClient),
        (setup.line.proxy_ns(), End::ProxyToUpstream),
        (setup.line.upstream_ns(), End::Upstream),
    ]
    .into_iter()
    .map(|(ns, end)| Chaos::attach(ns, setup.line.interface(end), chaos).expect("shim"))
    .collect();
    let result = converse(&setup, SIZES, Duration::from_millis(300));
    let log = setup.proxy.log_text();
    result.unwrap_or_else(|e| panic!("{e}\nproxy log:\n{log}"));
    assert_eq!(metric(&setup, "tunnels_packet_spliced_total"), 1, "{log}");
    let dropped: u64 = shims
        .iter()
        .map(|s| s.counts().expect("counts").dropped)
        .sum();
    assert!(dropped > 0, "the shims dropped nothing");
}

#[test]
fn an_idle_packet_spliced_tunnel_is_retired_at_the_idle_timeout() {
    if !can_run() {
        return;
    }
    let setup = set_up("pkt3", &LineOptions::default(), "2s");
    let url = setup.url.clone();
    let client = in_netns(setup.line.client_ns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                .await
                .expect("connect");
            ws.send(Message::text("once")).await.expect("send");
            let back = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            assert!(matches!(back, Ok(Some(Ok(Message::Text(_))))), "{back:?}");
            // Kept open (not dropped) while the proxy's idle timeout passes.
            tokio::time::sleep(Duration::from_secs(4)).await;
            ws
        })
    });
    let log = setup.proxy.log_text();
    assert_eq!(metric(&setup, "tunnels_packet_spliced_total"), 1, "{log}");
    assert_eq!(metric(&setup, "tunnels_packet_open"), 0, "{log}");
    assert!(log.contains("idle timeout (packet path)"), "{log}");
    drop(client);
}
