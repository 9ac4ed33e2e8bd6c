//! Upstream failures as a client sees them: 502, 504, the next server, panic routing, relayed
//! refusals.

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

/// An address where nothing listens.
fn dead_server() -> std::net::SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upstream_is_502_and_the_next_server_is_used() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[dead_server()]));
        let (status, answer) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
        assert_eq!(status, 502, "{datapath:?}: {answer}");
        assert!(proxy.log().contains("connect"), "the log names the reason");

        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[dead_server(), echo.addr()]));
        for round in 0..4 {
            let mut ws = connect(&proxy.url("/")).await;
            bounded(ws.send(Message::text(format!("round {round}"))))
                .await
                .unwrap();
            let back = bounded(ws.next()).await.unwrap().unwrap();
            assert_eq!(
                back,
                Message::text(format!("round {round}")),
                "{datapath:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_only_server_is_never_marked_down_and_serves_at_once_when_back() {
    // The only server of the pool refuses for a moment (a restart): the client of that moment
    // gets 502, and the next one, arriving once it is back, is served at once — no
    // `fail_timeout` of 503s.
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut config = ProxyConfig::new(&[addr]);
    config.fail_timeout = "30s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let (first, _) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
    assert_eq!(first, 502);
    let echo = Echo::start_on(addr);
    let mut ws = connect(&proxy.url("/")).await;
    bounded(ws.send(Message::text("back"))).await.unwrap();
    let back = bounded(ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::text("back"));
    drop(echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_servers_all_failed_recently_still_tries_them() {
    let dead = dead_server();
    let port = free_port();
    let revived: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut config = ProxyConfig::new(&[dead, revived]);
    config.fail_timeout = "30s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    // Both refuse: 502, and both are marked down for 30 s.
    let (first, answer) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
    assert_eq!(first, 502, "{answer}");
    let echo = Echo::start_on(revived);
    // Marked down or not, they are tried: the revived one answers.
    let mut ws = connect(&proxy.url("/")).await;
    bounded(ws.send(Message::text("panic routing")))
        .await
        .unwrap();
    let back = bounded(ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::text("panic routing"));
    drop(echo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_before_answering_is_skipped_for_the_next_server() {
    // A server that accepts, reads the request and dies before a byte of its answer (killed
    // between accept and answer): the request goes to the next server, the client never knows.
    let dying = Scripted::start(|stream, _, _| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(stream);
    })
    .await;
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[dying.addr(), echo.addr()]));
        for round in 0..4 {
            let mut ws = connect(&proxy.url("/")).await;
            bounded(ws.send(Message::text(format!("round {round}"))))
                .await
                .unwrap();
            let back = bounded(ws.next()).await.unwrap().unwrap();
            assert_eq!(
                back,
                Message::text(format!("round {round}")),
                "{datapath:?}"
            );
        }
        // The only server dying: 502 at once, with the reason in the log.
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[dying.addr()]));
        let started = Instant::now();
        let (status, answer) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
        assert_eq!(status, 502, "{datapath:?}: {answer}");
        assert!(started.elapsed() < Duration::from_secs(2), "{datapath:?}");
        assert!(
            proxy.log().contains("before answering"),
            "{datapath:?}: the log names the reason"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_504_within_the_handshake_timeout() {
    let silent = Scripted::start(|stream, _, _| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    })
    .await;
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[silent.addr()]);
        config.handshake = "1s";
        let proxy = Proxy::start(datapath, &config);
        let started = Instant::now();
        let (status, answer) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
        let took = started.elapsed();
        assert_eq!(status, 504, "{datapath:?}: {answer}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_in_the_middle_of_its_answer_is_502_at_once() {
    let cut = Scripted::start(|mut stream, _, _| async move {
        use tokio::io::AsyncWriteExt as _;
        let _ = stream
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: webso")
            .await;
        // Dropping the stream sends the FIN right behind the half head.
    })
    .await;
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[cut.addr()]);
        config.handshake = "5s";
        let proxy = Proxy::start(datapath, &config);
        let started = Instant::now();
        let (status, answer) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
        let took = started.elapsed();
        assert_eq!(status, 502, "{datapath:?}: {answer}");
        assert!(
            took < Duration::from_secs(2),
            "{datapath:?}: answered after {took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_101_answer_is_relayed_as_is_then_closed() {
    let refusing = Scripted::start(|mut stream, _, _| async move {
        let body = "not allowed here";
        let head = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Why: test\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // The body comes in a second write, later.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(body.as_bytes()).await.unwrap();
        // Keep the connection open: the proxy must close after the body, not wait for us.
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[refusing.addr()]));
        let started = Instant::now();
        let (status, answer) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
        assert_eq!(status, 403, "{datapath:?}");
        assert!(answer.contains("X-Why: test\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nnot allowed here"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_101_is_502_and_pipelined_bytes_never_reach_the_upstream() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let bad = Scripted::start(move |mut stream, _, rest| {
        let seen = seen_tx.clone();
        async move {
            let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n";
            stream.write_all(answer).await.unwrap();
            let mut more = rest;
            let mut buf = [0u8; 1024];
            use tokio::io::AsyncReadExt as _;
            while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                more.extend_from_slice(&buf[..n]);
            }
            let _ = seen.send(more);
        }
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[bad.addr()]));
        let mut request = upgrade_request("/", &[]);
        request.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
        let (status, _) = raw_exchange(proxy.addr(), &request).await;
        assert_eq!(status, 502, "{datapath:?}");
        let seen = bounded(seen_rx.recv()).await.unwrap();
        assert!(
            seen.is_empty(),
            "{datapath:?}: the upstream got {:?}",
            String::from_utf8_lossy(&seen)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_answers_101_and_never_reads_is_closed_at_the_idle_timeout() {
    // A tiny receive window, and an MSS as on a real network (on loopback's 64 KiB MSS the
    // proxy's send buffer starts at 4 MiB and swallows any early bytes), so the client's early
    // bytes cannot all be queued towards the upstream.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_tcp_mss(1460).unwrap();
    socket.set_nonblocking(true).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(16).unwrap();
    let listener = tokio::net::TcpListener::from_std(socket.into()).unwrap();
    let upstream = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let (head, _) = read_head(&mut stream).await;
            // The client's early bytes queue in the proxy meanwhile.
            tokio::time::sleep(Duration::from_millis(200)).await;
            stream.write_all(&switching_protocols(&head)).await.unwrap();
            held.push(stream); // never read
        }
    });
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[upstream]);
        config.idle = "1s";
        let proxy = Proxy::start(datapath, &config);
        let stream = bounded(tokio::net::TcpStream::connect(proxy.addr()))
            .await
            .unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let writing = tokio::spawn(async move {
            let _ = writer.write_all(&upgrade_request("/", &[])).await;
            let _ = writer.write_all(&vec![0x82; 512 * 1024]).await;
        });
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        use tokio::io::AsyncReadExt as _;
        let closed = tokio::time::timeout(Duration::from_secs(6), async {
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "{datapath:?}: the tunnel was still open after {:?} with a 1 s idle timeout",
            started.elapsed()
        );
        let lines = proxy.wait_access_lines(1);
        let reason = lines[0]["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.starts_with("idle timeout"), "{datapath:?}: {reason}");
        writing.abort();
    }
    server.abort();
}
