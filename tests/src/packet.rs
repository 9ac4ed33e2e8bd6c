//! The packet splice (`--datapath packet`) in a topology a test makes: a client namespace, a
//! proxy namespace (wsplice with its tc program on both of its interfaces) and an upstream
//! namespace (`wsplice echo`). Shared by the packet path's end-to-end tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::chaos::{Chaos, ChaosSettings};
use crate::cluster::{in_netns, wait_listening};
use crate::line::{End, Line, LineOptions, LinkSettings, Offloads};
use crate::{admin_request, binary, scratch_dir, Process};

/// The port the proxy listens on (on its client-side addresses).
pub const PROXY_PORT: u16 = 8080;
/// The port the echo upstream listens on.
pub const ECHO_PORT: u16 = 9000;
/// The proxy's admin listener, inside its namespace.
pub const ADMIN: &str = "127.0.0.1:9901";

/// A process in a namespace, killed by PID when dropped, with its log.
pub struct InNetns {
    /// The process.
    pub process: Process,
    log: PathBuf,
}

impl InNetns {
    /// Starts `wsplice ARGS` in namespace `ns`, logging to a scratch file named after `what`.
    pub fn start(ns: &str, args: &[&str], what: &str) -> InNetns {
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
        InNetns { process, log }
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The line, an echo upstream and a proxy on the packet path.
pub struct Setup {
    /// The namespaces.
    pub line: Line,
    /// wsplice, in the proxy namespace.
    pub proxy: InNetns,
    /// Its configuration file.
    pub config: PathBuf,
    /// `wsplice echo`, in the upstream namespace.
    pub echo: InNetns,
    /// The same on its IPv6 address.
    pub echo6: InNetns,
    /// `ws://` URL of the proxy (IPv4).
    pub url: String,
    /// `ws://` URL of the proxy over IPv6, routed to the echo's IPv6 address (`/v6`; other
    /// paths from IPv6 clients go to the IPv4 echo: a tunnel of two address families).
    pub url_v6: String,
}

/// Builds the line `prefix`, starts the echo and the proxy (`--datapath packet`, idle timeout
/// `idle`, flows lingering 1 s after their close) and waits until both listen.
pub fn set_up(prefix: &str, options: &LineOptions, idle: &str) -> Setup {
    set_up_with(prefix, options, idle, "")
}

/// [`set_up`] with more keys in the proxy's `[packet]` table.
pub fn set_up_with(prefix: &str, options: &LineOptions, idle: &str, packet_extra: &str) -> Setup {
    let line = Line::build(prefix, options).expect("the topology");
    let echo_addr = SocketAddr::from((line.v4(End::Upstream), ECHO_PORT));
    let echo = InNetns::start(
        line.upstream_ns(),
        &["echo", "--listen", &echo_addr.to_string()],
        &format!("{prefix}-echo"),
    );
    let echo6 = InNetns::start(
        line.upstream_ns(),
        &[
            "echo",
            "--listen",
            &SocketAddr::from((line.v6(End::Upstream), ECHO_PORT)).to_string(),
        ],
        &format!("{prefix}-echo6"),
    );
    let proxy_addr = SocketAddr::from((line.v4(End::ProxyToClient), PROXY_PORT));
    let proxy_v6 = SocketAddr::from((line.v6(End::ProxyToClient), PROXY_PORT));
    let echo_v6 = SocketAddr::from((line.v6(End::Upstream), ECHO_PORT));
    let config = format!(
        "workers = 1\n\n[[listener]]\nbind = \"{proxy_addr}\"\n\n[[listener]]\nbind = \"{proxy_v6}\"\n\n[[route]]\npath_prefix = \"/v6\"\nupstream = \"echo6\"\n\n[upstream.echo6]\nservers = [\"{echo_v6}\"]\n\n[[route]]\nupstream = \"echo\"\n\n\
         [upstream.echo]\nservers = [\"{echo_addr}\"]\n\n[timeouts]\nidle = \"{idle}\"\ndrain = \"3s\"\n\n\
         [admin]\nbind = \"{ADMIN}\"\n\n[packet]\ninterfaces = [\"{}\", \"{}\"]\n\
         ports = \"41000-41999\"\nlinger = \"1s\"\n{packet_extra}\n",
        line.interface(End::ProxyToClient),
        line.interface(End::ProxyToUpstream),
    );
    let dir = scratch_dir(&format!("{prefix}-proxy"));
    let path = dir.join("wsplice.toml");
    std::fs::write(&path, config).expect("config");
    let proxy = start_proxy(line.proxy_ns(), &path, prefix);
    wait_listening(line.upstream_ns(), echo_addr);
    wait_listening(line.client_ns(), proxy_addr);
    Setup {
        line,
        proxy,
        config: path,
        echo,
        echo6,
        url: format!("ws://{proxy_addr}/"),
        url_v6: format!("ws://{proxy_v6}/v6"),
    }
}

/// Starts `wsplice run -c CONFIG --datapath packet` in namespace `ns`.
pub fn start_proxy(ns: &str, config: &std::path::Path, what: &str) -> InNetns {
    InNetns::start(
        ns,
        &[
            "run",
            "-c",
            config.to_str().expect("utf-8 path"),
            "--datapath",
            "packet",
        ],
        &format!("{what}-wsplice"),
    )
}

/// A counter of the proxy's metrics (read from inside its namespace).
pub fn metric(setup: &Setup, name: &str) -> u64 {
    let admin: SocketAddr = ADMIN.parse().expect("admin");
    let (_, text) = in_netns(setup.line.proxy_ns(), move || {
        admin_request(admin, "GET", "/metrics", "", Duration::from_secs(5))
    });
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("wsplice_{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
}

/// Whether this test can run (root); says why not.
pub fn can_run() -> bool {
    if !crate::is_root() {
        println!("skipped: the packet splice needs root (namespaces, eBPF, TCP_REPAIR)");
    }
    crate::is_root()
}

/// A message of `len` bytes that names its place in the conversation.
pub fn message(round: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(round as u32 * 7) as u8)
        .collect()
}

/// From the client namespace, opens a WebSocket to `url`, exchanges a first message, waits
/// `settle` (the hand-off happens at the tunnel's first quiet moment), sends each of `sizes`
/// as a binary message and checks its echo, in order, then closes end to end.
pub fn converse(
    setup: &Setup,
    url: String,
    sizes: Vec<usize>,
    settle: Duration,
    per_round: Duration,
) -> Result<(), String> {
    in_netns(setup.line.client_ns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (mut ws, _) = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_tungstenite::connect_async_with_config(
                    &url,
                    Some(crate::ws_config()),
                    false,
                ),
            )
            .await
            .map_err(|_| format!("connect {url} timed out"))?
            .map_err(|e| format!("connect {url}: {e}"))?;
            ws.send(Message::binary(b"hello".to_vec()))
                .await
                .map_err(|e| e.to_string())?;
            let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            if !matches!(first, Ok(Some(Ok(Message::Binary(ref b)))) if b.as_ref() == b"hello") {
                return Err(format!("first echo: {first:?}"));
            }
            tokio::time::sleep(settle).await;
            for (round, &len) in sizes.iter().enumerate() {
                let sent = message(round, len);
                let started = Instant::now();
                ws.send(Message::binary(sent.clone()))
                    .await
                    .map_err(|e| format!("send {len}: {e}"))?;
                let back = tokio::time::timeout(per_round, ws.next()).await;
                match back {
                    Ok(Some(Ok(Message::Binary(got)))) if got.as_ref() == sent.as_slice() => {
                        println!("round {round}: {len} bytes echoed in {:?}", started.elapsed());
                    }
                    Ok(Some(Ok(Message::Binary(got)))) => {
                        let at = got.iter().zip(&sent).position(|(a, b)| a != b);
                        return Err(format!(
                            "round {round} ({len} bytes): {} bytes back, first difference at {at:?}",
                            got.len()
                        ));
                    }
                    Ok(other) => return Err(format!("round {round} ({len} bytes): {other:?}")),
                    Err(_) => {
                        return Err(format!(
                            "round {round} ({len} bytes): no echo within {per_round:?}"
                        ))
                    }
                }
            }
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
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

/// A line with every offload off on both links: MSS-sized packets, several in flight, so loss
/// and reordering hit a stream the way a real path does.
pub fn lossy_line() -> LineOptions {
    let link = LinkSettings {
        mtu: None,
        offloads: Some(Offloads::OFF),
    };
    LineOptions {
        client_link: link,
        upstream_link: link,
    }
}

/// 1% of the packets lost and 1% reordered (through 4 detour hops).
pub const ONE_PERCENT: ChaosSettings = ChaosSettings {
    loss_per_million: 10_000,
    reorder_per_million: 10_000,
    bounces: 4,
};

/// The shim with `settings` on every link into and out of the proxy, both ways.
pub fn chaos_on_every_link(setup: &Setup, settings: ChaosSettings) -> Vec<Chaos> {
    [
        (setup.line.client_ns(), End::Client),
        (setup.line.proxy_ns(), End::ProxyToClient),
        (setup.line.proxy_ns(), End::ProxyToUpstream),
        (setup.line.upstream_ns(), End::Upstream),
    ]
    .into_iter()
    .map(|(ns, end)| Chaos::attach(ns, setup.line.interface(end), settings).expect("shim"))
    .collect()
}

/// Whether the proxy's live packet-spliced records come to `count` within `within`.
pub fn records_settle(setup: &Setup, count: u64, within: Duration) -> bool {
    crate::eventually_within(within, || metric(setup, "tunnels_packet_open") == count)
}
