//! Admission control: past `limits.max_connections` (in all) or `limits.max_connections_per_ip`
//! (from one address), a new connection is closed at once, counted, and the open ones go on; so
//! is a TLS connection while its worker runs `limits.max_tls_handshakes` handshakes.

use std::net::SocketAddr;

use futures_util::SinkExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use wsplice_tests::*;

/// Sends an upgrade request from `source` and returns what came back before the close (empty:
/// closed unanswered).
async fn try_upgrade(proxy: SocketAddr, source: &str) -> Vec<u8> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream: TcpStream = bounded(socket.connect(proxy)).await.unwrap();
    let _ = stream.write_all(&upgrade_request("/", &[])).await;
    let mut answer = vec![0u8; 4096];
    match bounded(stream.read(&mut answer)).await {
        Ok(n) => answer.truncate(n),
        Err(_) => answer.clear(),
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_total_limit_are_closed_at_once_and_the_others_go_on() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.limits = "max_connections = 3";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect(&proxy.url("/")).await);
    }
    assert!(
        try_upgrade(proxy.addr(), "127.0.0.1").await.is_empty(),
        "the fourth connection was answered"
    );
    assert_eq!(proxy.metrics()["connections_refused_limit_total"], 1);
    for client in &mut open {
        echo_text(client, "hi").await;
    }
    // A place freed is a place taken again.
    let mut first = open.remove(0);
    bounded(first.close(None)).await.unwrap();
    drop(first);
    assert!(eventually(|| proxy.metrics()["connections_open"] == 2));
    let answer = try_upgrade(proxy.addr(), "127.0.0.1").await;
    assert!(answer.starts_with(b"HTTP/1.1 101"), "{answer:?}");
    assert!(proxy.log().contains("over a connection limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_more_than_its_share() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.limits = "max_connections_per_ip = 2";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let _first = connect(&proxy.url("/")).await;
    let _second = connect(&proxy.url("/")).await;
    // Counted from here: the readiness probes of `Proxy::start` (plain connects to the
    // listener, from this address) may have been refused a place while earlier ones closed.
    let refused = proxy.metrics()["connections_refused_per_ip_total"];
    assert!(try_upgrade(proxy.addr(), "127.0.0.1").await.is_empty());
    assert_eq!(
        proxy.metrics()["connections_refused_per_ip_total"],
        refused + 1
    );
    let answer = try_upgrade(proxy.addr(), "127.0.0.2").await;
    assert!(
        answer.starts_with(b"HTTP/1.1 101"),
        "another address was refused: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_over_the_handshake_limit_are_closed_until_handshakes_finish() {
    use wsplice_tests::tls::*;
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.tls = Some(tls_table(&leaf, ""));
    config.workers = 1;
    config.limits = "max_tls_handshakes = 2";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    // The start-up probe's connection took a place too, until it is gone.
    assert!(eventually(|| proxy.metrics()["connections_open"] == 0));
    // Two clients that never say hello hold the worker's two handshakes.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(bounded(TcpStream::connect(proxy.addr())).await.unwrap());
    }
    assert!(eventually(|| proxy.metrics()["connections_open"] == 2));
    assert_eq!(
        proxy.metrics()["connections_refused_tls_handshakes_total"],
        0
    );
    // A third TLS client is closed at once, before its handshake.
    let refused = tls_connect(proxy.addr(), "localhost", ca.client_config()).await;
    assert!(refused.is_err(), "a third handshake was served");
    assert_eq!(
        proxy.metrics()["connections_refused_tls_handshakes_total"],
        1
    );
    // A finished handshake frees its place: once the silent ones are gone, clients are served,
    // and a finished one does not count any more.
    drop(silent);
    assert!(eventually(|| proxy.metrics()["connections_open"] == 0));
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        tunnels.push(connect_wss(proxy.addr(), "localhost", "/", ca.client_config()).await);
    }
    for ws in &mut tunnels {
        bounded(ws.send(tokio_tungstenite::tungstenite::Message::text("hi")))
            .await
            .unwrap();
    }
    assert_eq!(
        proxy.metrics()["connections_refused_tls_handshakes_total"],
        1
    );
}
