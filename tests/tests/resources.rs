//! Nothing leaks: descriptors and kernel map entries return to where they started.

use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

const CONNECTIONS: usize = 20_000;
const IN_FLIGHT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_connections_leave_fds_and_maps_where_they_started() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        // One tunnel first, so everything the proxy creates once (rings, buffers) exists.
        let mut warm_up = connect(&proxy.url("/warm-up")).await;
        bounded(warm_up.close(None)).await.expect("close");
        while let Some(Ok(_)) = bounded(warm_up.next()).await {}
        drop(warm_up);
        assert!(eventually(|| proxy.metrics()["connections_open"] == 0));
        let fds_before = proxy.fd_count();
        let targets_before = proxy.fd_targets();
        let url = Arc::new(proxy.url("/churn"));
        let mut workers = Vec::new();
        for worker in 0..IN_FLIGHT {
            let url = url.clone();
            workers.push(tokio::spawn(async move {
                for i in (worker..CONNECTIONS).step_by(IN_FLIGHT) {
                    let mut ws = connect(&url).await;
                    let message = Message::text(format!("n{i}"));
                    bounded(ws.send(message.clone())).await.expect("send");
                    assert_eq!(
                        bounded(ws.next()).await.expect("open").expect("echo"),
                        message
                    );
                    bounded(ws.close(None)).await.expect("close");
                    while let Some(Ok(_)) = bounded(ws.next()).await {}
                }
            }));
        }
        for worker in workers {
            worker.await.expect("client worker");
        }
        let settled = eventually(|| proxy.fd_count() <= fds_before);
        assert!(
            settled,
            "{datapath:?}: fds {:?} -> {:?}",
            targets_before,
            proxy.fd_targets()
        );
        let metrics = proxy.metrics();
        assert_eq!(
            metrics["tunnels_opened_total"],
            CONNECTIONS as u64 + 1,
            "{datapath:?}"
        );
        assert_eq!(metrics["tunnels_open"], 0, "{datapath:?}");
        assert_eq!(metrics["connections_open"], 0, "{datapath:?}");
        if datapath == DataPath::Kernel {
            assert_eq!(metrics["tunnels_spliced_total"], CONNECTIONS as u64 + 1);
            assert_eq!(metrics["tunnels_spliced_open"], 0);
            // What the kernel holds, walked from outside the proxy.
            let entries = wsplice_tests::bpf::map_entries(proxy.pid());
            for map in ["PEER", "BRIDGE", "ACTIVITY"] {
                assert_eq!(entries.get(map), Some(&0), "{map}: {entries:?}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_path_moves_payload_without_userspace_copies() {
    if !datapaths().contains(&DataPath::Kernel) {
        return;
    }
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Kernel, &ProxyConfig::new(&[echo.addr()]));
    let mut ws = connect(&proxy.url("/zero-copy")).await;
    let payload = Message::binary(vec![42u8; 1 << 20]);
    for _ in 0..8 {
        bounded(ws.send(payload.clone())).await.unwrap();
        assert_eq!(bounded(ws.next()).await.unwrap().unwrap(), payload);
    }
    // While it is open: one tunnel in the kernel, its two sockets in PEER and ACTIVITY, and
    // nothing left on the hand-off's bridge.
    assert_eq!(proxy.metrics()["tunnels_spliced_open"], 1);
    let entries = wsplice_tests::bpf::map_entries(proxy.pid());
    assert_eq!(
        (
            entries.get("PEER"),
            entries.get("ACTIVITY"),
            entries.get("BRIDGE")
        ),
        (Some(&2), Some(&2), Some(&0)),
        "{entries:?}"
    );
    bounded(ws.close(None)).await.unwrap();
    while let Some(Ok(_)) = bounded(ws.next()).await {}
    drop(ws);
    let lines = proxy.wait_access_lines(1);
    let line = &lines[0];
    assert_eq!(line["datapath"], "kernel", "{line}");
    assert!(line["bytes_up"].as_u64().unwrap() > 8 << 20, "{line}");
    assert!(line["bytes_down"].as_u64().unwrap() > 8 << 20, "{line}");
    let metrics = proxy.metrics();
    assert_eq!(
        metrics["relayed_bytes_userspace_total"], 0,
        "userspace copied payload"
    );
    assert!(metrics["spliced_bytes_kernel_total"] > 16 << 20);
}

#[test]
fn the_splice_maps_do_not_lock_kernel_memory_for_every_possible_tunnel_at_start() {
    if !datapaths().contains(&DataPath::Kernel) {
        return;
    }
    let echo = Echo::start();
    // The default capacity: a million tunnels, two million sockets.
    let proxy = Proxy::start(DataPath::Kernel, &ProxyConfig::new(&[echo.addr()]));
    let maps = wsplice_tests::bpf::held_maps(proxy.pid());
    let activity: Vec<u64> = maps
        .values()
        .filter(|map| map.name == "ACTIVITY")
        .map(|map| map.memlock)
        .collect();
    assert_eq!(activity.len(), 1, "one ACTIVITY map: {maps:?}");
    // Preallocated, two million entries took 251 MB; the buckets alone are 32 MiB.
    assert!(
        activity[0] < 64 << 20,
        "ACTIVITY locks {} bytes at start",
        activity[0]
    );
}
