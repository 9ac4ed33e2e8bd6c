//! The drain says goodbye: when shutdown ends a tunnel, the client gets a WebSocket Close frame
//! with status 1001 ("going away") and then a clean end of stream, never a reset, so it
//! reconnects politely; a frame either side was in the middle of sending is delivered whole
//! first, on both data paths (the kernel program follows the frames it moves).

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

/// Tunnels open when the drain ends.
const TUNNELS: usize = 2000;

/// How one client saw its tunnel end: the Close frames it got, then whether the stream ended
/// cleanly (or the error it ended with).
async fn ending<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
) -> (Vec<Option<CloseCode>>, Result<(), String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut closes = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Err(_) => return (closes, Err("no end within 30 s".into())),
            Ok(None) => return (closes, Ok(())),
            Ok(Some(Ok(Message::Close(frame)))) => closes.push(frame.map(|f| f.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => {
                use tokio_tungstenite::tungstenite::Error;
                return match error {
                    Error::ConnectionClosed | Error::AlreadyClosed => (closes, Ok(())),
                    other => (closes, Err(other.to_string())),
                };
            }
        }
    }
}

/// Every one of `tunnels` gets exactly one Close 1001, then a clean end; `what` names the case.
async fn all_said_goodbye<S>(tunnels: Vec<tokio_tungstenite::WebSocketStream<S>>, what: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let endings = futures_util::future::join_all(tunnels.into_iter().map(ending)).await;
    for (index, (closes, end)) in endings.iter().enumerate() {
        assert_eq!(
            closes,
            &vec![Some(CloseCode::Away)],
            "{what}, tunnel {index}: one Close 1001 ({end:?})"
        );
        assert!(end.is_ok(), "{what}, tunnel {index}: {end:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_gets_a_close_1001_and_a_clean_end_when_the_drain_ends() {
    raise_fd_limit(TUNNELS);
    let echo = Echo::start_unrecorded();
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.drain = "2s";
        config.close_spread = Some("1s");
        let mut proxy = Proxy::start(datapath, &config);
        let mut tunnels = open_tunnels(&proxy, &format!("{datapath:?}-bye"), TUNNELS).await;
        echo_round(&mut tunnels, 0).await;
        // SAFETY: kill(2) on the proxy this test started.
        unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
        all_said_goodbye(tunnels, &format!("{datapath:?}")).await;
        let status = tokio::task::spawn_blocking(move || {
            let status = proxy.process().terminate(Duration::from_secs(10));
            (status, proxy)
        })
        .await
        .expect("join");
        let (status, proxy) = status;
        assert!(
            status.is_some_and(|s| s.success()),
            "{}",
            proxy.log_tail(30)
        );
        let said_goodbye = proxy
            .access_lines()
            .iter()
            .filter(|line| {
                line["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("said goodbye (Close 1001)"))
            })
            .count();
        assert_eq!(
            said_goodbye,
            TUNNELS,
            "{datapath:?}: {}",
            proxy.log_tail(10)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_client_gets_the_close_1001_then_close_notify_and_a_clean_end() {
    const WSS_TUNNELS: usize = 50;
    let ca = wsplice_tests::tls::TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start_unrecorded();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.tls = Some(wsplice_tests::tls::tls_table(&leaf, ""));
    config.drain = "1s";
    let mut proxy = Proxy::start(DataPath::Userspace, &config);
    let mut tunnels = Vec::with_capacity(WSS_TUNNELS);
    for index in 0..WSS_TUNNELS {
        let path = format!("/wss-bye-{index}");
        let ws =
            wsplice_tests::tls::connect_wss(proxy.addr(), "localhost", &path, ca.client_config())
                .await;
        tunnels.push(ws);
    }
    // SAFETY: kill(2) on the proxy this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    // Without close_notify, rustls would report an unexpected end of the TLS stream.
    all_said_goodbye(tunnels, "wss").await;
    let status =
        tokio::task::spawn_blocking(move || proxy.process().terminate(Duration::from_secs(10)))
            .await
            .expect("join");
    assert!(status.is_some_and(|s| s.success()));
}

/// A binary frame of `payload` (length in 16 bits), masked with `key` if given (a client's).
fn frame(payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x82, if key.is_some() { 0x80 | 126 } else { 126 }];
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    if let Some(key) = key {
        out.extend_from_slice(&key);
    }
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key.map_or(0, |key| key[i % 4])),
    );
    out
}

/// The status code in a Close frame at the start of `bytes` (unmasking it if masked), and
/// what follows it.
fn close_code(bytes: &[u8]) -> (u16, &[u8]) {
    assert!(
        bytes.len() >= 4 && bytes[0] == 0x88,
        "not a Close frame: {bytes:?}"
    );
    let (len, masked) = (usize::from(bytes[1] & 0x7f), bytes[1] & 0x80 != 0);
    let (key, payload) = if masked {
        (Some(&bytes[2..6]), &bytes[6..])
    } else {
        (None, &bytes[2..])
    };
    let byte = |i: usize| payload[i] ^ key.map_or(0, |key| key[i % 4]);
    (u16::from_be_bytes([byte(0), byte(1)]), &payload[len..])
}

/// Reads `stream` until its end, which must be clean (no reset), within 10 s.
async fn read_to_end(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    mut received: Vec<u8>,
) -> Vec<u8> {
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(0)) => return received,
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Ok(Err(error)) => panic!("the stream ended with an error (a reset?): {error}"),
            Err(_) => panic!("no end of stream within 10 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_in_flight_when_the_drain_ends_are_delivered_whole_before_the_close() {
    for datapath in datapaths() {
        frames_in_flight_on(datapath).await;
    }
}

/// [`frames_in_flight_when_the_drain_ends_are_delivered_whole_before_the_close`] on one data
/// path.
async fn frames_in_flight_on(datapath: DataPath) {
    let payload: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let from_upstream = frame(&payload, None);
    let from_client = frame(&payload, Some([1, 2, 3, 4]));
    // The upstream sends the first 400 bytes of its frame, then the rest after the drain
    // ended, and tells what it received from the proxy.
    let (report, upstream_received) = tokio::sync::oneshot::channel();
    let report = std::sync::Mutex::new(Some(report));
    let upstream_frame = from_upstream.clone();
    let upstream = Scripted::start(move |mut stream, head, _| {
        let report = report.lock().expect("report").take();
        let frame = upstream_frame.clone();
        async move {
            stream
                .write_all(&switching_protocols(&head))
                .await
                .expect("101");
            let (reader, mut writer) = stream.into_split();
            let reading = tokio::spawn(read_to_end(reader, Vec::new()));
            writer.write_all(&frame[..400]).await.expect("first part");
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            writer.write_all(&frame[400..]).await.expect("the rest");
            let received = reading.await.expect("reader");
            if let Some(report) = report {
                let _ = report.send(received);
            }
        }
    })
    .await;
    let mut config = ProxyConfig::new(&[upstream.addr()]);
    config.drain = "1s";
    let mut proxy = Proxy::start(datapath, &config);
    let mut stream = tokio::net::TcpStream::connect(proxy.addr())
        .await
        .expect("connect");
    stream
        .write_all(&upgrade_request("/in-flight", &[]))
        .await
        .expect("request");
    let (head, received) = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
        .write_all(&from_client[..400])
        .await
        .expect("first part");
    // SAFETY: kill(2) on the proxy this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stream
        .write_all(&from_client[400..])
        .await
        .expect("the rest, after the drain's deadline");
    let (reader, _writer) = stream.into_split();
    let client_received = read_to_end(reader, received).await;
    assert!(
        client_received.starts_with(&from_upstream),
        "{datapath:?}: the client gets the upstream's whole frame first"
    );
    let (code, rest) = close_code(&client_received[from_upstream.len()..]);
    assert_eq!(
        (code, rest),
        (1001, &[][..]),
        "{datapath:?}: then Close 1001 and the end"
    );
    let upstream_received = tokio::time::timeout(Duration::from_secs(10), upstream_received)
        .await
        .expect("the upstream's report in time")
        .expect("a report");
    assert!(
        upstream_received.starts_with(&from_client),
        "{datapath:?}: the upstream gets the client's whole frame first"
    );
    let to_upstream = &upstream_received[from_client.len()..];
    assert_eq!(
        to_upstream[1] & 0x80,
        0x80,
        "masked, as a client's frames are"
    );
    let (code, rest) = close_code(to_upstream);
    assert_eq!(
        (code, rest),
        (1001, &[][..]),
        "{datapath:?}: then Close 1001 and the end"
    );
    let status =
        tokio::task::spawn_blocking(move || proxy.process().terminate(Duration::from_secs(10)))
            .await
            .expect("join");
    assert!(status.is_some_and(|s| s.success()));
}

/// With `timeouts.grace`, SIGTERM first makes the host unready for its load balancer while it
/// still takes connections; only then do the listeners close and the drain begin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_grace_period_readyz_says_503_and_connections_are_still_taken() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.grace = Some("2s");
    let mut proxy = Proxy::start(DataPath::Userspace, &config);
    assert!(proxy.admin_get("/readyz").starts_with("HTTP/1.1 200 "));
    let mut before = connect(&proxy.url("/")).await;
    let pid = proxy.pid();
    // SAFETY: kill(2) of the proxy this test started and still holds.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let unready = settles_within(Duration::from_secs(1), || {
        proxy.admin_get("/readyz").starts_with("HTTP/1.1 503 ")
    })
    .await;
    assert!(unready, "/readyz still ready after SIGTERM");
    // Still taken, and the open tunnel goes on.
    let mut during = connect(&proxy.url("/")).await;
    echo_text(&mut during, "in the grace period").await;
    echo_text(&mut before, "still here").await;
    // Then the listener closes.
    let closed = settles_within(Duration::from_secs(4), || {
        std::net::TcpStream::connect_timeout(&proxy.addr(), Duration::from_millis(200)).is_err()
    })
    .await;
    assert!(closed, "still accepting after the grace period");
    assert!(
        proxy.log().contains("grace period over: draining"),
        "{}",
        proxy.log_tail(20)
    );
    drop((before, during));
    assert!(
        proxy.process().wait_exit(Duration::from_secs(15)).is_some(),
        "the drain ends"
    );
}
