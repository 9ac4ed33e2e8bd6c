//! Bytes through the tunnel: every size, both directions, byte for byte and in order.

use futures_util::{SinkExt as _, StreamExt as _};
use rand::{Rng as _, SeedableRng as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

fn random_message(rng: &mut rand::rngs::StdRng) -> Message {
    let len = rng.random_range(0..16 * 1024);
    if rng.random_bool(0.5) {
        let text: String = (0..len)
            .map(|_| char::from(rng.random_range(b' '..=b'~')))
            .collect();
        Message::text(text)
    } else {
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        Message::binary(bytes)
    }
}

/// These tests push 80 MB as fast as they can while the reader checks every message, so on the
/// kernel path the reader may lag tens of MiB behind: they check integrity, not the slow-consumer
/// policy (`backpressure.rs` does), so the kernel backlog limit is set out of their way.
fn integrity_config(servers: &[std::net::SocketAddr]) -> ProxyConfig {
    let mut config = ProxyConfig::new(servers);
    config.limits = "kernel_backlog = \"1024MiB\"";
    config
}

fn seed() -> u64 {
    let seed = std::env::var("WSPLICE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed: {seed} (set WSPLICE_SEED to replay)");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_of_every_size_echo_unchanged() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        let mut ws = connect(&proxy.url("/sizes")).await;
        for size in [0usize, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20] {
            let text = Message::text("é".repeat(size / 2) + &"a".repeat(size % 2));
            let binary =
                Message::binary((0..size).map(|i| (i * 7 + size) as u8).collect::<Vec<_>>());
            for message in [text, binary] {
                bounded(ws.send(message.clone())).await.expect("send");
                let back = bounded(ws.next()).await.expect("open").expect("message");
                assert!(back == message, "{datapath:?}: {size} B message changed");
            }
        }
        bounded(ws.close(None)).await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_messages_from_the_client_come_back_in_order() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &integrity_config(&[echo.addr()]));
        let ws = connect(&proxy.url("/random")).await;
        let (mut sink, mut stream) = ws.split();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
        let messages: Vec<Message> = (0..10_000).map(|_| random_message(&mut rng)).collect();
        let expected = messages.clone();
        let writer = tokio::spawn(async move {
            for message in messages {
                sink.send(message).await.expect("send");
            }
            sink
        });
        for (index, want) in expected.iter().enumerate() {
            let got = bounded(stream.next())
                .await
                .expect("open")
                .expect("message");
            assert!(&got == want, "{datapath:?}: message {index} differs");
        }
        let mut sink = writer.await.expect("writer");
        bounded(sink.close()).await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_random_messages_from_the_upstream_arrive_in_order() {
    let seed = seed();
    let upstream = Scripted::start(move |mut stream, head, _| async move {
        use tokio::io::AsyncWriteExt as _;
        stream
            .write_all(&switching_protocols(&head))
            .await
            .expect("101");
        let mut ws = server_socket(stream).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..10_000 {
            ws.send(random_message(&mut rng)).await.expect("push");
        }
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &integrity_config(&[upstream.addr()]));
        let mut ws = connect(&proxy.url("/push")).await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for index in 0..10_000 {
            let want = random_message(&mut rng);
            let got = bounded(ws.next()).await.expect("open").expect("message");
            assert!(got == want, "{datapath:?}: message {index} differs");
        }
        let last = bounded(ws.next()).await;
        assert!(
            matches!(last, Some(Ok(Message::Close(_)))),
            "{datapath:?}: expected the upstream's close, got {last:?}"
        );
    }
}
