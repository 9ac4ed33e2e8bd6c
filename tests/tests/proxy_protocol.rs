//! The PROXY protocol, end to end: a listener with `proxy_protocol = true` behind an L4 load
//! balancer (the tests play the balancer from 127.0.0.0/8, `trusted_proxies`), and pools with
//! `send_proxy_protocol = true` in front of upstreams that expect the header.
//!
//! - A v1 or v2 header, then a WebSocket (both data paths; the kernel path really splices),
//!   `wss://` (TLS after the header) or plain HTTP keep-alive: the header's source is the
//!   client for `X-Real-IP`, `X-Forwarded-For`, the access line, `max_connections_per_ip` and
//!   `consistent_hash`; a v2 LOCAL header keeps the connection's own address; the client's
//!   forwarding headers pass only when that source is itself trusted.
//! - Refusals: no header, a malformed one, one from a peer outside `trusted_proxies`, half a
//!   header that stalls: closed without a byte of answer, counted in
//!   `wsplice_proxy_headers_refused_total`, the reason in the access line. A header trickling in
//!   byte by byte is waited for.
//!   (Ignored until the proxy is fixed: half a header then a FIN should end the connection at
//!   once; today a worker spins until the handshake timeout.)
//! - `wsplice check` refuses `proxy_protocol = true` without `trusted_proxies`.
//! - `send_proxy_protocol`: every upstream connection starts with a v2 header of the client's
//!   addresses (parsed here by hand), one connection per request.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsplice_tests::http::{parse_requests, HttpConn, Request};
use wsplice_tests::tls::{tls_table, TestCa};
use wsplice_tests::*;

// ---------------------------------------------------------------------------------------------
// Headers, connections and what the proxy reports
// ---------------------------------------------------------------------------------------------

/// The load balancer the tests play: their connections come from it (in `trusted_proxies`).
const BALANCER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// Where the clients the headers report connected to: the balancer's public side (TEST-NET-3).
const FRONT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 443);

/// The v2 signature every v2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A client as a header reports it: `198.51.100.{last}:{port}` (TEST-NET-2, not trusted).
fn client(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, last), port)
}

/// `PROXY TCP4 src dst sport dport\r\n`.
fn v1_header(source: SocketAddrV4, destination: SocketAddrV4) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// A v2 PROXY header (command PROXY, TCP over IPv4, no TLVs).
fn v2_header(source: SocketAddrV4, destination: SocketAddrV4) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x21, 0x11]);
    header.extend_from_slice(&12u16.to_be_bytes());
    header.extend_from_slice(&source.ip().octets());
    header.extend_from_slice(&destination.ip().octets());
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

/// A v2 LOCAL header (the balancer's own connection: AF_UNSPEC, no addresses).
fn v2_local() -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[0x20, 0x00, 0, 0]);
    header
}

/// Reads the PROXY v2 header an upstream connection must begin with (parsed by hand: fixed
/// part, then TCP4 addresses; TLVs skipped): its source and destination, or what is wrong.
async fn read_v2_header(stream: &mut TcpStream) -> Result<(SocketAddrV4, SocketAddrV4), String> {
    let mut fixed = [0u8; 16];
    tokio::time::timeout(WAIT, stream.read_exact(&mut fixed))
        .await
        .map_err(|_| "no complete v2 header in time".to_owned())?
        .map_err(|e| format!("reading the v2 header: {e}"))?;
    if &fixed[..12] != V2_SIGNATURE {
        return Err(format!(
            "no v2 signature: {:?}",
            String::from_utf8_lossy(&fixed)
        ));
    }
    if fixed[12] != 0x21 {
        return Err(format!("version/command 0x{:02x}, not 0x21", fixed[12]));
    }
    if fixed[13] != 0x11 {
        return Err(format!("family 0x{:02x}, not 0x11 (TCP4)", fixed[13]));
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len < 12 {
        return Err(format!("payload of {len} bytes, too short for TCP4"));
    }
    let mut payload = vec![0u8; len];
    tokio::time::timeout(WAIT, stream.read_exact(&mut payload))
        .await
        .map_err(|_| "no complete v2 payload in time".to_owned())?
        .map_err(|e| format!("reading the v2 payload: {e}"))?;
    let ip = |at: usize| {
        Ipv4Addr::new(
            payload[at],
            payload[at + 1],
            payload[at + 2],
            payload[at + 3],
        )
    };
    let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
    Ok((
        SocketAddrV4::new(ip(0), port(8)),
        SocketAddrV4::new(ip(4), port(10)),
    ))
}

/// A proxy config whose listener expects a PROXY header from 127.0.0.0/8.
fn behind_balancer(servers: &[SocketAddr]) -> ProxyConfig {
    let mut config = ProxyConfig::new(servers);
    config.trusted_proxies = "\"127.0.0.0/8\"";
    config.listener_extra = "proxy_protocol = true".into();
    config
}

/// A TCP connection from `peer` (an address of 127.0.0.0/8) to `addr` that has sent `header`
/// (alone, in its own write).
async fn connect_with(addr: SocketAddr, peer: Ipv4Addr, header: &[u8]) -> TcpStream {
    let mut stream = bounded(connect_from(IpAddr::V4(peer), addr))
        .await
        .unwrap_or_else(|e| panic!("connect from {peer} to {addr}: {e}"));
    stream.set_nodelay(true).expect("nodelay");
    bounded(stream.write_all(header))
        .await
        .expect("write the PROXY header");
    stream
}

/// The WebSocket handshake for `path` on `stream` (its PROXY header sent), with extra request
/// headers.
async fn ws_over(
    stream: TcpStream,
    proxy: SocketAddr,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Client {
    let mut request = format!("ws://{proxy}{path}")
        .into_client_request()
        .expect("a request");
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, value.parse().expect("a header value"));
    }
    let (ws, _) = bounded(tokio_tungstenite::client_async_with_config(
        request,
        MaybeTlsStream::Plain(stream),
        Some(ws_config()),
    ))
    .await
    .unwrap_or_else(|e| panic!("ws handshake for {path} after a PROXY header: {e}"));
    ws
}

/// Sends `message` and asserts it comes back unchanged (any stream; [`echo_text`] for text on
/// a plain client).
async fn round_trip<S>(ws: &mut WebSocketStream<S>, message: Message, what: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    bounded(ws.send(message.clone())).await.expect("send");
    let back = bounded(ws.next())
        .await
        .unwrap_or_else(|| panic!("{what}: closed before the echo"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(back == message, "{what}: the echo differs");
}

/// Closes a WebSocket and reads until the proxy has closed it too (bounded).
async fn close_ws<S>(mut ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = bounded(ws.close(None)).await;
    while let Some(Ok(_)) = bounded(ws.next()).await {}
}

/// What came before the proxy closed `stream`, waiting at most `within` (`None`: still open
/// then; a reset counts as a close).
async fn closed_within(stream: TcpStream, within: Duration) -> Option<Vec<u8>> {
    HttpConn::new(stream).closed_within(within).await
}

/// The value of `wsplice_{name}`, failing if the proxy does not export it.
fn metric(proxy: &Proxy, name: &str) -> u64 {
    let metrics = proxy.metrics();
    *metrics
        .get(name)
        .unwrap_or_else(|| panic!("no wsplice_{name} among {metrics:?}"))
}

/// The first access line `wanted` accepts, waiting for it (bounded); `what` names it in the
/// failure, which shows the log's end.
fn access_line(
    proxy: &Proxy,
    what: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut found = None;
    let logged = eventually(|| {
        found = proxy.access_lines().into_iter().find(|line| wanted(line));
        found.is_some()
    });
    assert!(logged, "no access line for {what}:\n{}", proxy.log_tail(30));
    found.expect("found")
}

/// The access line of the (first) request for `path`.
fn access_line_for(proxy: &Proxy, path: &str) -> serde_json::Value {
    access_line(proxy, path, |line| line["path"] == path)
}

/// The handshake or request the echo upstream recorded for `path` (waited for, bounded).
fn record_for(echo: &Echo, path: &str) -> Recorded {
    let mut found = None;
    let recorded = eventually(|| {
        found = echo
            .records()
            .into_iter()
            .find(|record| record.path == path);
        found.is_some()
    });
    assert!(recorded, "the echo upstream recorded no request for {path}");
    found.expect("found")
}

/// How an access line begins its reason when a connection is refused for its PROXY header
/// (each of these is counted in `wsplice_proxy_headers_refused_total`).
const REFUSALS: [&str; 4] = [
    "bad PROXY header",
    "PROXY header expected from",
    "PROXY header longer than",
    "no complete PROXY header",
];

/// How many access lines say a connection was refused for its PROXY header.
fn refusal_lines(proxy: &Proxy) -> u64 {
    proxy
        .access_lines()
        .iter()
        .filter(|line| {
            let reason = line["reason"].as_str().unwrap_or_default();
            REFUSALS.iter().any(|refusal| reason.starts_with(refusal))
        })
        .count() as u64
}

/// Asserts the proxy closes `stream` within `within` without a byte of answer, logs an access
/// line for it (the peer's address: no header was taken) whose reason starts with `reason`,
/// and that `wsplice_proxy_headers_refused_total` counts every such refusal, this one
/// included. Returns the access line.
async fn assert_refused(
    proxy: &Proxy,
    stream: TcpStream,
    reason: &str,
    within: Duration,
) -> serde_json::Value {
    let peer = stream.local_addr().expect("local addr").to_string();
    let answer = closed_within(stream, within)
        .await
        .unwrap_or_else(|| panic!("the connection expecting `{reason}` is still open"));
    assert!(
        answer.is_empty(),
        "a refused connection was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let line = access_line(proxy, &format!("the refused {peer}"), |line| {
        line["client"] == peer.as_str()
    });
    let logged = line["reason"].as_str().unwrap_or_default();
    assert!(logged.starts_with(reason), "{reason:?}: {line}");
    assert_eq!(line["status"], 0, "{line}");
    // The counter is bumped before the line is written: equal once the lines are all there.
    assert!(
        eventually(|| metric(proxy, "proxy_headers_refused_total") == refusal_lines(proxy)),
        "wsplice_proxy_headers_refused_total {} for {} refusals logged",
        metric(proxy, "proxy_headers_refused_total"),
        refusal_lines(proxy)
    );
    line
}

// ---------------------------------------------------------------------------------------------
// An upstream behind a `send_proxy_protocol` pool
// ---------------------------------------------------------------------------------------------

/// One connection a [`HeaderedUpstream`] accepted.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The v2 header it began with (`None` until read).
    header: Option<Result<(SocketAddrV4, SocketAddrV4), String>>,
    /// The requests after it (`METHOD target`), in order.
    requests: Vec<String>,
}

/// An upstream written for the `send_proxy_protocol` tests: each connection must begin with a
/// PROXY v2 header (read and recorded); then an upgrade request is answered `101` and echoed as
/// a WebSocket, a plain request `200 ok` (and the connection kept open for the next one).
struct HeaderedUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HeaderedUpstream {
    async fn start() -> HeaderedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut log = log.lock().unwrap();
                    log.push(Seen::default());
                    log.len() - 1
                };
                tokio::spawn(HeaderedUpstream::serve(stream, log.clone(), index));
            }
        });
        HeaderedUpstream { addr, seen, task }
    }

    async fn serve(mut stream: TcpStream, log: Arc<Mutex<Vec<Seen>>>, index: usize) {
        let _ = stream.set_nodelay(true);
        let header = read_v2_header(&mut stream).await;
        let valid = header.is_ok();
        log.lock().unwrap()[index].header = Some(header);
        if !valid {
            return;
        }
        let mut pending = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return,
            };
            pending.extend_from_slice(&chunk[..n]);
            let (requests, rest): (Vec<Request>, Vec<u8>) = parse_requests(&pending);
            pending = rest;
            for request in requests {
                log.lock().unwrap()[index].requests.push(request.line());
                let upgrade = request
                    .values("upgrade")
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case("websocket"));
                if upgrade {
                    let head = String::from_utf8_lossy(&request.raw).into_owned();
                    if stream.write_all(&switching_protocols(&head)).await.is_err() {
                        return;
                    }
                    let mut ws = server_socket(stream).await;
                    while let Some(Ok(message)) = ws.next().await {
                        if message.is_close() || ws.send(message).await.is_err() {
                            break;
                        }
                    }
                    return;
                }
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if stream.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every connection so far, in accept order.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for HeaderedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy config for a pool of `upstream` with `send_proxy_protocol = true`.
fn sending_headers(mut config: ProxyConfig) -> ProxyConfig {
    config.upstream_extra = "send_proxy_protocol = true".into();
    config
}

/// Asserts `upstream` holds exactly one connection whose requests are `requests`, begun by a
/// v2 header from `source` to `destination`.
fn assert_one_connection(
    upstream: &HeaderedUpstream,
    source: SocketAddrV4,
    destination: SocketAddrV4,
    requests: &[&str],
    what: &str,
) {
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{what}: upstream connections {seen:?}");
    let header = seen[0].header.clone().expect("a header read");
    assert_eq!(header, Ok((source, destination)), "{what}");
    assert_eq!(seen[0].requests, requests, "{what}");
}

// ---------------------------------------------------------------------------------------------
// Accepted headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_after_a_v1_or_v2_header_echoes_with_the_header_source_on_every_datapath() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &behind_balancer(&[echo.addr()]));
        let cases = [
            ("v1", client(7, 40000), v1_header(client(7, 40000), FRONT)),
            ("v2", client(8, 40001), v2_header(client(8, 40001), FRONT)),
        ];
        for (version, source, header) in cases {
            let what = format!("{datapath:?} {version}");
            let path = format!("/ws-{}-{version}", datapath.flag());
            let spliced = metric(&proxy, "tunnels_spliced_total");
            let stream = connect_with(proxy.addr(), BALANCER, &header).await;
            // The client's own X-Forwarded-For is not passed: its source is not trusted.
            let mut ws = ws_over(
                stream,
                proxy.addr(),
                &path,
                &[("X-Forwarded-For", "203.0.113.99")],
            )
            .await;
            echo_text(&mut ws, &format!("hello {what}")).await;
            let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            round_trip(&mut ws, Message::binary(big), &what).await;

            let record = record_for(&echo, &path);
            let ip = source.ip().to_string();
            assert_eq!(record.values("x-real-ip"), [ip.as_str()], "{what}");
            assert_eq!(record.values("x-forwarded-for"), [ip.as_str()], "{what}");
            match datapath {
                DataPath::Kernel => assert!(
                    eventually(|| metric(&proxy, "tunnels_spliced_total") == spliced + 1),
                    "{what}: the tunnel was not spliced"
                ),
                _ => assert_eq!(metric(&proxy, "tunnels_spliced_total"), spliced, "{what}"),
            }
            // Still echoing once spliced.
            echo_text(&mut ws, "after the splice").await;
            close_ws(ws).await;

            let line = access_line_for(&proxy, &path);
            assert_eq!(line["client"], source.to_string(), "{what}: {line}");
            assert_eq!(line["status"], 101, "{what}: {line}");
            let expected = match datapath {
                DataPath::Kernel => "kernel",
                _ => "userspace",
            };
            assert_eq!(line["datapath"], expected, "{what}: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_local_header_keeps_the_connections_own_address() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &behind_balancer(&[echo.addr()]));
    // The balancer's own connection (a health check) from 127.0.0.3: the client is that
    // address, a trusted one, so its X-Forwarded-For is passed on and appended to.
    let peer = Ipv4Addr::new(127, 0, 0, 3);
    let stream = connect_with(proxy.addr(), peer, &v2_local()).await;
    let local = stream.local_addr().expect("local addr");
    let mut ws = ws_over(
        stream,
        proxy.addr(),
        "/local",
        &[("X-Forwarded-For", "203.0.113.99")],
    )
    .await;
    echo_text(&mut ws, "local").await;
    close_ws(ws).await;
    let record = record_for(&echo, "/local");
    assert_eq!(record.values("x-real-ip"), ["127.0.0.3"]);
    assert_eq!(
        record.values("x-forwarded-for"),
        ["203.0.113.99, 127.0.0.3"]
    );
    let line = access_line_for(&proxy, "/local");
    assert_eq!(line["client"], local.to_string(), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_reads_the_header_before_the_client_hello() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    for datapath in datapaths() {
        let mut config = behind_balancer(&[echo.addr()]);
        config.tls = Some(tls_table(&leaf, ""));
        let proxy = Proxy::start(datapath, &config);
        let source = client(21, 41000);
        let path = format!("/wss-{}", datapath.flag());
        let tcp = connect_with(proxy.addr(), BALANCER, &v1_header(source, FRONT)).await;
        let name = ServerName::try_from("localhost").expect("a name");
        let tls = bounded(TlsConnector::from(ca.client_config()).connect(name, tcp))
            .await
            .unwrap_or_else(|e| panic!("{datapath:?}: TLS handshake after the header: {e}"));
        let url = format!("wss://localhost:{}{path}", proxy.addr().port());
        let (mut ws, _) = bounded(tokio_tungstenite::client_async_with_config(
            url.as_str(),
            tls,
            Some(ws_config()),
        ))
        .await
        .unwrap_or_else(|e| panic!("{datapath:?}: ws handshake {url}: {e}"));
        round_trip(&mut ws, Message::text("over tls"), &path).await;
        round_trip(&mut ws, Message::binary(vec![7u8; 70_000]), &path).await;
        close_ws(ws).await;

        let record = record_for(&echo, &path);
        assert_eq!(
            record.values("x-real-ip"),
            ["198.51.100.21"],
            "{datapath:?}"
        );
        assert_eq!(
            record.values("x-forwarded-proto"),
            ["https"],
            "{datapath:?}"
        );
        let line = access_line_for(&proxy, &path);
        assert_eq!(line["client"], source.to_string(), "{line}");
        assert_eq!(line["tls"]["sni"], "localhost", "{line}");
        assert_eq!(line["status"], 101, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_keep_alive_after_a_v1_header_carries_its_client_on_every_request() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &behind_balancer(&[echo.addr()]));
    let source = client(30, 42000);
    let stream = bounded(connect_from(IpAddr::V4(BALANCER), proxy.addr()))
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut conn = HttpConn::new(stream);
    // The header and the first request in one write, as a balancer that relays at once does.
    let mut first = v1_header(source, FRONT);
    first.extend_from_slice(b"GET /plain-1 HTTP/1.1\r\nHost: wsplice.test\r\n\r\n");
    conn.send(&first).await;
    let one = conn.response(false).await;
    assert_eq!(one.status, 200, "{}", one.head);
    assert_eq!(one.text(), "wsplice echo: GET /plain-1\n");
    conn.send(b"GET /plain-2 HTTP/1.1\r\nHost: wsplice.test\r\n\r\n")
        .await;
    let two = conn.response(false).await;
    assert_eq!(two.status, 200, "{}", two.head);
    assert_eq!(two.text(), "wsplice echo: GET /plain-2\n");
    // Still open after both: one keep-alive connection carried them.
    assert!(
        conn.closed_within(Duration::from_millis(200))
            .await
            .is_none(),
        "the connection closed after two requests"
    );

    for path in ["/plain-1", "/plain-2"] {
        let line = access_line_for(&proxy, path);
        assert_eq!(line["client"], source.to_string(), "{path}: {line}");
        assert_eq!(line["status"], 200, "{path}: {line}");
        let record = record_for(&echo, path);
        assert_eq!(record.values("x-real-ip"), ["198.51.100.30"], "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_pass_only_when_the_header_source_is_trusted() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &behind_balancer(&[echo.addr()]));
    let request = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: wsplice.test\r\nX-Forwarded-For: 203.0.113.99\r\n\
             X-Forwarded-Host: public.test\r\n\r\n"
        )
        .into_bytes()
    };
    // Both come from the trusted balancer; only the header's source decides.
    let cases = [
        ("/untrusted-source", client(40, 43000), None),
        (
            "/trusted-source",
            SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), 43001),
            Some("public.test"),
        ),
    ];
    for (path, source, forwarded_host) in cases {
        let stream = connect_with(proxy.addr(), BALANCER, &v1_header(source, FRONT)).await;
        let mut conn = HttpConn::new(stream);
        conn.send(&request(path)).await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{path}: {}", response.head);
        let record = record_for(&echo, path);
        let ip = source.ip().to_string();
        let xff = match forwarded_host {
            Some(_) => format!("203.0.113.99, {ip}"),
            None => ip.clone(),
        };
        assert_eq!(record.values("x-real-ip"), [ip.as_str()], "{path}");
        assert_eq!(record.values("x-forwarded-for"), [xff.as_str()], "{path}");
        let host: Vec<&str> = forwarded_host.into_iter().collect();
        assert_eq!(record.values("x-forwarded-host"), host, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_trickling_in_byte_by_byte_is_waited_for() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &behind_balancer(&[echo.addr()]));
    let cases = [
        (
            "/trickle-v1",
            client(50, 44000),
            v1_header(client(50, 44000), FRONT),
        ),
        (
            "/trickle-v2",
            client(51, 44001),
            v2_header(client(51, 44001), FRONT),
        ),
    ];
    for (path, source, header) in cases {
        let mut stream = connect_with(proxy.addr(), BALANCER, &[]).await;
        for byte in &header {
            bounded(stream.write_all(std::slice::from_ref(byte)))
                .await
                .expect("write one byte");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut conn = HttpConn::new(stream);
        conn.send(format!("GET {path} HTTP/1.1\r\nHost: wsplice.test\r\n\r\n").as_bytes())
            .await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{path}: {}", response.head);
        assert_eq!(response.text(), format!("wsplice echo: GET {path}\n"));
        let line = access_line_for(&proxy, path);
        assert_eq!(line["client"], source.to_string(), "{path}: {line}");
    }
    assert_eq!(metric(&proxy, "proxy_headers_refused_total"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_ip_counts_the_header_source_not_the_balancer() {
    let echo = Echo::start();
    let mut config = behind_balancer(&[echo.addr()]);
    config.limits = "max_connections_per_ip = 2";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let tunnel = |source: SocketAddrV4, path: String| {
        let addr = proxy.addr();
        async move {
            let stream = connect_with(addr, BALANCER, &v1_header(source, FRONT)).await;
            let mut ws = ws_over(stream, addr, &path, &[]).await;
            echo_text(&mut ws, &path).await;
            ws
        }
    };
    let mut first = tunnel(client(7, 45001), "/per-ip-1".into()).await;
    let mut second = tunnel(client(7, 45002), "/per-ip-2".into()).await;

    // A third from 198.51.100.7 is one too many.
    let refused = metric(&proxy, "connections_refused_per_ip_total");
    let mut third = connect_with(proxy.addr(), BALANCER, &v1_header(client(7, 45003), FRONT)).await;
    let _ = third.write_all(&upgrade_request("/per-ip-3", &[])).await;
    let answer = closed_within(third, WAIT)
        .await
        .expect("the third connection from 198.51.100.7 stayed open");
    assert!(
        answer.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(
        metric(&proxy, "connections_refused_per_ip_total"),
        refused + 1
    );
    let line = access_line(&proxy, "the third from 198.51.100.7", |line| {
        line["client"] == client(7, 45003).to_string()
    });
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("max_connections_per_ip") && reason.contains("198.51.100.7"),
        "{line}"
    );

    // Other sources through the same balancer (four connections from 127.0.0.1 now) are fine.
    let mut eighth = tunnel(client(8, 45004), "/per-ip-8".into()).await;
    let mut ninth = tunnel(client(9, 45005), "/per-ip-9".into()).await;
    for ws in [&mut first, &mut second, &mut eighth, &mut ninth] {
        echo_text(ws, "still here").await;
    }
    assert_eq!(
        metric(&proxy, "connections_refused_per_ip_total"),
        refused + 1
    );

    // A place 198.51.100.7 frees is its own again.
    close_ws(first).await;
    access_line_for(&proxy, "/per-ip-1");
    let mut again = tunnel(client(7, 45006), "/per-ip-again".into()).await;
    echo_text(&mut again, "back").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_hashes_the_header_source_not_the_balancer() {
    let (a, b) = (Echo::start(), Echo::start());
    let mut config = behind_balancer(&[a.addr(), b.addr()]);
    config.upstream_extra = "balance = \"consistent_hash\"".into();
    config.upstream_keepalive = Some(0);
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let balancers = [
        BALANCER,
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
    ];
    let mut used = [false; 2];
    for last in 1..=16u8 {
        let source = client(last, 46000);
        let mut servers = Vec::new();
        for (index, balancer) in balancers.iter().enumerate() {
            let path = format!("/hash-{last}-{index}");
            let stream = connect_with(proxy.addr(), *balancer, &v1_header(source, FRONT)).await;
            let mut conn = HttpConn::new(stream);
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: wsplice.test\r\nConnection: close\r\n\r\n");
            conn.send(request.as_bytes()).await;
            assert_eq!(conn.response(false).await.status, 200, "{path}");
            conn.until_closed().await;
            let on = |echo: &Echo| echo.records().iter().any(|r| r.path == path);
            let server = match (on(&a), on(&b)) {
                (true, false) => 0,
                (false, true) => 1,
                seen => panic!("{path} reached the servers {seen:?}"),
            };
            used[server] = true;
            servers.push(server);
        }
        assert!(
            servers.iter().all(|&s| s == servers[0]),
            "{source} through different balancers went to servers {servers:?}"
        );
    }
    assert_eq!(used, [true, true], "16 sources all hashed to one server");
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_header_is_closed_unanswered_and_counted() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &behind_balancer(&[echo.addr()]));
    let before = metric(&proxy, "proxy_headers_refused_total");
    let stream = connect_with(
        proxy.addr(),
        BALANCER,
        b"GET / HTTP/1.1\r\nHost: wsplice.test\r\n\r\n",
    )
    .await;
    assert_refused(&proxy, stream, "bad PROXY header", WAIT).await;
    assert_eq!(metric(&proxy, "proxy_headers_refused_total"), before + 1);
    assert!(
        echo.records().is_empty(),
        "the request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_are_closed_unanswered_and_counted() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &behind_balancer(&[echo.addr()]));
    let mut bad_version = v2_header(client(7, 40000), FRONT);
    bad_version[12] = 0x31;
    let cases: [(&str, Vec<u8>); 3] = [
        ("v1 with one address", b"PROXY TCP4 1.2.3.4\r\n".to_vec()),
        (
            "v1 with a bad port",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 80\r\n".to_vec(),
        ),
        ("v2 of version 3", bad_version),
    ];
    for (what, header) in cases {
        let before = metric(&proxy, "proxy_headers_refused_total");
        let mut bytes = header;
        bytes.extend_from_slice(&upgrade_request("/malformed", &[]));
        let stream = connect_with(proxy.addr(), BALANCER, &bytes).await;
        let line = assert_refused(&proxy, stream, "bad PROXY header", WAIT).await;
        assert_eq!(
            metric(&proxy, "proxy_headers_refused_total"),
            before + 1,
            "{what}: {line}"
        );
    }
    assert!(echo.records().is_empty(), "a request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_from_a_peer_outside_trusted_proxies_is_refused() {
    let echo = Echo::start();
    let mut config = behind_balancer(&[echo.addr()]);
    config.trusted_proxies = "\"10.99.0.0/16\"";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut bytes = v1_header(client(7, 40000), FRONT);
    bytes.extend_from_slice(&upgrade_request("/untrusted", &[]));
    let stream = connect_with(proxy.addr(), BALANCER, &bytes).await;
    let line = assert_refused(&proxy, stream, "PROXY header expected from 127.0.0.1", WAIT).await;
    let reason = line["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("trusted_proxies"), "{line}");
    assert!(
        echo.records().is_empty(),
        "the request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_that_stalls_is_closed_at_the_handshake_timeout() {
    let echo = Echo::start();
    let mut config = behind_balancer(&[echo.addr()]);
    config.handshake = "1s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    for partial in [
        &b"PROXY TCP4 198.51"[..],
        &v2_header(client(7, 1), FRONT)[..20],
    ] {
        let started = Instant::now();
        let stream = connect_with(proxy.addr(), BALANCER, partial).await;
        let peer = stream.local_addr().expect("local addr");
        // Waited for, not refused at once...
        let mut conn = HttpConn::new(stream);
        assert!(
            conn.closed_within(Duration::from_millis(500))
                .await
                .is_none(),
            "{peer}: closed before the handshake timeout"
        );
        let (stream, _) = conn.into_parts();
        // ...then closed at the timeout.
        let line = assert_refused(
            &proxy,
            stream,
            "no complete PROXY header within the handshake timeout",
            Duration::from_secs(5),
        )
        .await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "closed after {took:?}: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_header_then_a_close_ends_the_connection_at_once() {
    let echo = Echo::start();
    let mut config = behind_balancer(&[echo.addr()]);
    config.handshake = "10s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut stream = connect_with(proxy.addr(), BALANCER, b"PROXY TCP4 198.51").await;
    let peer = stream.local_addr().expect("local addr").to_string();
    bounded(stream.shutdown()).await.expect("shutdown");
    let answer = closed_within(stream, Duration::from_secs(2)).await;
    assert_eq!(
        answer,
        Some(Vec::new()),
        "not closed at once after the client's FIN"
    );
    let line = access_line(&proxy, "the closed half header", |line| {
        line["client"] == peer.as_str()
    });
    assert_eq!(
        line["reason"], "client closed in the middle of its PROXY header (17 bytes)",
        "{line}"
    );
    assert_eq!(proxy.metrics()["proxy_headers_refused_total"], 1);
}

// ---------------------------------------------------------------------------------------------
// The config
// ---------------------------------------------------------------------------------------------

#[test]
fn check_refuses_proxy_protocol_without_trusted_proxies_and_names_the_line() {
    let dir = scratch_dir("proxy-protocol-check");
    let rest = "[[listener]]\nbind = \"127.0.0.1:8080\"\nproxy_protocol = true\n\n\
                [[route]]\nupstream = \"default\"\n\n\
                [upstream.default]\nservers = [\"127.0.0.1:9001\"]\n";
    // (top of the file, the line of `proxy_protocol = true` if refused)
    let cases = [
        ("", Some(3)),
        ("trusted_proxies = []\n", Some(4)),
        ("trusted_proxies = [\"10.0.0.0/8\"]\n", None),
    ];
    for (index, (top, refused_at)) in cases.into_iter().enumerate() {
        let file = dir.join(format!("wsplice-{index}.toml"));
        std::fs::write(&file, format!("{top}{rest}")).expect("write the config");
        let stderr_path = dir.join(format!("check-{index}.log"));
        let stderr = std::fs::File::create(&stderr_path).expect("log file");
        let mut process = Process::spawn(
            Command::new(binary())
                .arg("check")
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr),
        )
        .expect("run wsplice check");
        let status = process
            .wait_exit(WAIT)
            .unwrap_or_else(|| panic!("wsplice check {} did not finish", file.display()));
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        match refused_at {
            Some(line) => {
                assert!(!status.success(), "{top:?}: accepted: {stderr}");
                let spot = format!("{}:{line}:", file.display());
                assert!(stderr.contains(&spot), "{top:?}: no {spot} in {stderr}");
                assert!(
                    stderr.contains("proxy_protocol needs trusted_proxies"),
                    "{top:?}: {stderr}"
                );
            }
            None => assert!(status.success(), "{top:?}: refused: {stderr}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// send_proxy_protocol
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_protocol_starts_each_upstream_tunnel_with_the_clients_v2_header() {
    for datapath in datapaths() {
        // A listener without PROXY headers: the client is the connection's own peer.
        let upstream = HeaderedUpstream::start().await;
        let proxy = Proxy::start(
            datapath,
            &sending_headers(ProxyConfig::new(&[upstream.addr()])),
        );
        let stream = bounded(connect_from(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)),
            proxy.addr(),
        ))
        .await
        .expect("connect");
        let SocketAddr::V4(local) = stream.local_addr().expect("local addr") else {
            panic!("an IPv4 client");
        };
        let SocketAddr::V4(front) = proxy.addr() else {
            panic!("an IPv4 listener");
        };
        let mut ws = ws_over(stream, proxy.addr(), "/sent-direct", &[]).await;
        echo_text(&mut ws, "direct").await;
        round_trip(&mut ws, Message::binary(vec![3u8; 100_000]), "direct").await;
        assert_one_connection(
            &upstream,
            local,
            front,
            &["GET /sent-direct"],
            &format!("{datapath:?} direct"),
        );
        close_ws(ws).await;

        // Behind a balancer: the header it got is the one passed on.
        let upstream = HeaderedUpstream::start().await;
        let proxy = Proxy::start(
            datapath,
            &sending_headers(behind_balancer(&[upstream.addr()])),
        );
        let source = client(60, 47000);
        let stream = connect_with(proxy.addr(), BALANCER, &v1_header(source, FRONT)).await;
        let mut ws = ws_over(stream, proxy.addr(), "/sent-relayed", &[]).await;
        echo_text(&mut ws, "relayed").await;
        round_trip(&mut ws, Message::binary(vec![4u8; 100_000]), "relayed").await;
        assert_one_connection(
            &upstream,
            source,
            FRONT,
            &["GET /sent-relayed"],
            &format!("{datapath:?} relayed"),
        );
        if datapath == DataPath::Kernel {
            assert!(
                eventually(|| metric(&proxy, "tunnels_spliced_total") >= 1),
                "the tunnel to a send_proxy_protocol pool was not spliced"
            );
        }
        close_ws(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_protocol_gives_each_plain_request_its_own_upstream_connection_and_header() {
    let upstream = HeaderedUpstream::start().await;
    let proxy = Proxy::start(
        DataPath::Userspace,
        &sending_headers(behind_balancer(&[upstream.addr()])),
    );
    let source = client(70, 48000);
    let stream = connect_with(proxy.addr(), BALANCER, &v1_header(source, FRONT)).await;
    let mut conn = HttpConn::new(stream);
    for path in ["/sent-plain-1", "/sent-plain-2"] {
        conn.send(format!("GET {path} HTTP/1.1\r\nHost: wsplice.test\r\n\r\n").as_bytes())
            .await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{path}: {}", response.head);
        assert_eq!(response.text(), "ok", "{path}");
    }
    // The upstream kept each connection open: a pool that reused one would have sent the
    // second request on it, without a header.
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "upstream connections: {seen:?}");
    for (conn, path) in seen.iter().zip(["GET /sent-plain-1", "GET /sent-plain-2"]) {
        assert_eq!(conn.header, Some(Ok((source, FRONT))), "{seen:?}");
        assert_eq!(conn.requests, [path], "{seen:?}");
    }
}
