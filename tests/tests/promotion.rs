//! `--datapath auto`: tunnels start on the userspace relay and move to the kernel once they
//! have earned it (`[kernel] promote_after`, `promote_after_bytes`); short ones never leave
//! userspace. What a user sees: the same bytes in the same order before, during and after the
//! move, the access line and the metrics saying which path carried the tunnel.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

fn auto_proxy(echo: &Echo, kernel: &'static str) -> Option<Proxy> {
    if !datapaths_or("auto").contains(&DataPath::Auto) {
        return None;
    }
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.kernel = kernel;
    Some(Proxy::start(DataPath::Auto, &config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_lives_past_promote_after_moves_to_the_kernel_without_a_gap() {
    let echo = Echo::start();
    let Some(proxy) = auto_proxy(&echo, "promote_after = \"300ms\"") else {
        return;
    };
    let mut client = connect(&proxy.url("/")).await;
    // A steady trickle across the promotion: every echo comes back intact and in order.
    for round in 0..40 {
        echo_text(&mut client, &format!("message {round}")).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = proxy.metrics();
    assert_eq!(metrics["tunnels_promoted_total"], 1, "{metrics:?}");
    assert_eq!(metrics["tunnels_spliced_total"], 1);
    assert_eq!(metrics["tunnels_opened_total"], 1, "counted once");
    // Large messages after the move go through the kernel.
    for size in [70_000, 1 << 20] {
        let payload = vec![b'x'; size];
        bounded(client.send(Message::binary(payload.clone())))
            .await
            .expect("send");
        let reply = bounded(client.next()).await.expect("reply").expect("frame");
        assert_eq!(reply.into_data().len(), size);
    }
    bounded(client.close(None)).await.expect("close");
    drop(client);
    let lines = proxy.wait_access_lines(1);
    assert_eq!(lines[0]["datapath"], "kernel", "{lines:?}");
    let up = lines[0]["bytes_up"].as_u64().unwrap_or(0);
    assert!(
        up > (1 << 20) + 70_000,
        "bytes before and after the move: {up}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_tunnels_stay_in_userspace() {
    let echo = Echo::start();
    let Some(proxy) = auto_proxy(&echo, "promote_after = \"5s\"") else {
        return;
    };
    for round in 0..5 {
        let mut client = connect(&proxy.url("/")).await;
        echo_text(&mut client, &format!("short {round}")).await;
        bounded(client.close(None)).await.expect("close");
        drop(client);
    }
    let lines = proxy.wait_access_lines(5);
    assert!(
        lines.iter().all(|line| line["datapath"] == "userspace"),
        "{lines:?}"
    );
    let metrics = proxy.metrics();
    assert_eq!(metrics["tunnels_spliced_total"], 0, "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_tunnel_moves_once_it_has_relayed_promote_after_bytes() {
    let echo = Echo::start();
    let Some(proxy) = auto_proxy(
        &echo,
        "promote_after = \"1h\"\npromote_after_bytes = \"256KiB\"",
    ) else {
        return;
    };
    let mut client = connect(&proxy.url("/")).await;
    for round in 0..8u8 {
        let payload = vec![round; 100_000];
        bounded(client.send(Message::binary(payload.clone())))
            .await
            .expect("send");
        let reply = bounded(client.next()).await.expect("reply").expect("frame");
        assert_eq!(reply.into_data(), payload, "round {round}");
    }
    let metrics = proxy.metrics();
    assert_eq!(metrics["tunnels_promoted_total"], 1, "{metrics:?}");
}
