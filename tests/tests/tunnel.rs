//! The tunnel's life: every race window of the hand-off, idle timeouts, closes, half-closes.

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

/// A client→server text frame, masked with a zero key (payload unchanged on the wire).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// Reads exactly `len` bytes.
async fn read_exact(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    bounded(stream.read_exact(&mut buf)).await.expect("read");
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_after_and_long_after_the_101_arrive_in_order() {
    let upstream = Scripted::start(|mut stream, head, _| async move {
        let mut first = switching_protocols(&head);
        first.extend_from_slice(&server_frame(b"same segment"));
        stream.write_all(&first).await.unwrap();
        stream
            .write_all(&server_frame(b"right after"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stream
            .write_all(&server_frame(b"two seconds later"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[upstream.addr()]));
        let mut client = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
        client.write_all(&upgrade_request("/", &[])).await.unwrap();
        let (head, mut rest) = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{datapath:?}: {head}");
        let mut expected = server_frame(b"same segment");
        expected.extend_from_slice(&server_frame(b"right after"));
        expected.extend_from_slice(&server_frame(b"two seconds later"));
        let missing = expected.len() - rest.len();
        rest.extend_from_slice(&read_exact(&mut client, missing).await);
        assert_eq!(rest, expected, "{datapath:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_pipelined_behind_the_request_reaches_the_upstream_after_the_101() {
    let upstream = Scripted::start(|mut stream, head, rest| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let expected = client_frame(b"pipelined");
        let mut got = rest;
        while got.len() < expected.len() {
            let mut buf = [0u8; 64];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        // Echo the payload back so the client can tell what arrived.
        let reply = if got == expected {
            &b"got it"[..]
        } else {
            &b"garbled"[..]
        };
        stream.write_all(&server_frame(reply)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[upstream.addr()]));
        let mut client = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
        let mut bytes = upgrade_request("/", &[]);
        bytes.extend_from_slice(&client_frame(b"pipelined"));
        client.write_all(&bytes).await.unwrap();
        let (head, mut rest) = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{datapath:?}: {head}");
        let expected = server_frame(b"got it");
        let missing = expected.len().saturating_sub(rest.len());
        rest.extend_from_slice(&read_exact(&mut client, missing).await);
        assert_eq!(rest, expected, "{datapath:?}");
    }
}

/// Waits for the client's stream to end; returns how long it took.
async fn time_until_closed(ws: &mut Client) -> Duration {
    let started = Instant::now();
    loop {
        match bounded(ws.next()).await {
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return started.elapsed(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_and_traffic_either_way_keeps_it_open() {
    // The upstream only listens, or only talks, depending on the path.
    let upstream = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let talks = head.starts_with("GET /talk");
        let mut ws = server_socket(stream).await;
        if talks {
            for i in 0..10 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if ws.send(Message::text(format!("tick {i}"))).await.is_err() {
                    return;
                }
            }
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[upstream.addr()]);
        config.idle = "1s";
        let proxy = Proxy::start(datapath, &config);

        // Silent both ways: closed after about a second.
        let mut ws = connect(&proxy.url("/quiet")).await;
        let took = time_until_closed(&mut ws).await;
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(4),
            "{datapath:?}: {took:?}"
        );

        // Client → upstream traffic every 300 ms for 3 s keeps it open.
        let mut ws = connect(&proxy.url("/listen")).await;
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            bounded(ws.send(Message::text(format!("ping {i}"))))
                .await
                .expect("still open");
        }
        let took = time_until_closed(&mut ws).await;
        assert!(
            took >= Duration::from_millis(700),
            "{datapath:?}: closed {took:?} after the last message"
        );

        // Upstream → client traffic every 300 ms keeps it open too.
        let mut ws = connect(&proxy.url("/talk")).await;
        for i in 0..10 {
            let got = bounded(ws.next()).await.expect("open").expect("message");
            assert_eq!(got, Message::text(format!("tick {i}")), "{datapath:?}");
        }
        let took = time_until_closed(&mut ws).await;
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(4),
            "{datapath:?}: {took:?}"
        );
        let closes = proxy.access_lines();
        assert!(
            closes
                .iter()
                .filter(|l| l["reason"].as_str().unwrap_or("").contains("idle"))
                .count()
                >= 3,
            "{closes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_frames_are_seen_by_the_other_side_both_ways() {
    let echo = Echo::start();
    let closing_upstream = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let mut ws = server_socket(stream).await;
        let _ = ws.next().await;
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    for datapath in datapaths() {
        // Client closes: the echo upstream answers the Close, the client sees it.
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        let mut ws = connect(&proxy.url("/")).await;
        bounded(ws.close(None)).await.expect("close");
        let answer = bounded(ws.next()).await;
        assert!(
            matches!(answer, Some(Ok(Message::Close(_))) | None),
            "{datapath:?}: {answer:?}"
        );

        // Upstream closes: the client sees its Close frame.
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[closing_upstream.addr()]));
        let mut ws = connect(&proxy.url("/")).await;
        bounded(ws.send(Message::text("bye"))).await.unwrap();
        let got = bounded(ws.next()).await;
        assert!(
            matches!(got, Some(Ok(Message::Close(_)))),
            "{datapath:?}: {got:?}"
        );
        // Answering the Close ends the TCP connection on both sides.
        while let Some(Ok(_)) = bounded(ws.next()).await {}
        drop(ws);
        let lines = proxy.wait_access_lines(1);
        assert!(
            lines.iter().any(|l| l["reason"] == "both sides closed"),
            "{datapath:?}: {lines:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_is_passed_on_and_the_other_direction_keeps_flowing() {
    // Mirror 1: the client shuts down first; the upstream sees EOF, then still sends.
    let upstream = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        if head.starts_with("GET /client-first") {
            let mut buf = [0u8; 16];
            let n = stream.read(&mut buf).await.unwrap();
            assert_eq!(n, 0, "upstream expected EOF");
            stream.write_all(b"after your FIN").await.unwrap();
            stream.shutdown().await.unwrap();
        } else {
            stream.shutdown().await.unwrap();
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.unwrap();
            let _ = got;
        }
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[upstream.addr()]));
        let mut client = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
        client
            .write_all(&upgrade_request("/client-first", &[]))
            .await
            .unwrap();
        let (_, rest) = read_head(&mut client).await;
        client.shutdown().await.unwrap();
        let mut got = rest;
        bounded(client.read_to_end(&mut got)).await.unwrap();
        assert_eq!(got, b"after your FIN", "{datapath:?}");

        // Mirror 2: the upstream shuts down first; the client sees EOF and can still send.
        let mut client = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
        client
            .write_all(&upgrade_request("/upstream-first", &[]))
            .await
            .unwrap();
        let (_, rest) = read_head(&mut client).await;
        let mut got = rest;
        bounded(client.read_to_end(&mut got)).await.unwrap();
        assert!(got.is_empty(), "{datapath:?}");
        client.write_all(b"still talking").await.unwrap();
        client.shutdown().await.unwrap();
        let lines = proxy.wait_access_lines(2);
        assert!(
            lines.iter().all(|l| l["reason"] == "both sides closed"),
            "{datapath:?}: {lines:?}"
        );
        // The two tunnels may end in either order (the kernel path passes a FIN on once the
        // kernel delivered what came before it, at a tick).
        let upstream_first = lines
            .iter()
            .find(|l| l["path"] == "/upstream-first")
            .unwrap_or_else(|| panic!("{datapath:?}: no line for /upstream-first: {lines:?}"));
        assert_eq!(upstream_first["bytes_up"], 13, "{datapath:?}: {lines:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_upstream_closes_the_client() {
    let upstream = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let mut buf = [0u8; 16];
        let _ = stream.read(&mut buf).await;
        // SO_LINGER 0: close sends a RST.
        let std = stream.into_std().unwrap();
        socket2::SockRef::from(&std)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(std);
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[upstream.addr()]));
        let mut ws = connect(&proxy.url("/")).await;
        bounded(ws.send(Message::text("trigger"))).await.unwrap();
        let took = time_until_closed(&mut ws).await;
        assert!(took < Duration::from_secs(3), "{datapath:?}: {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_with_echoes_unread_leaves_no_tunnel_behind() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        for _ in 0..8 {
            let mut ws = connect(&proxy.url("/vanish")).await;
            // Keep sending, never read: the echoes pile up in the client's socket, so closing
            // it resets the connection while the proxy still has bytes on their way to it.
            for _ in 0..64 {
                bounded(ws.send(Message::binary(vec![7u8; 64 * 1024])))
                    .await
                    .expect("send");
            }
            drop(ws);
        }
        // Well before the 60 s idle timeout, every tunnel is gone.
        assert!(
            eventually(|| proxy.metrics()["tunnels_open"] == 0),
            "{datapath:?}: tunnels left open: {:?}",
            proxy.metrics()
        );
    }
}
