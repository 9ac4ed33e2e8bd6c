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
            assert_eq!(metrics["splice_peer_entries"], 0);
            assert_eq!(metrics["splice_activity_entries"], 0);
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

/// `memlock` of each distinct BPF map the process holds, by map type (`/proc/PID/fdinfo`).
fn map_memlock(pid: u32) -> Vec<(u32, u64)> {
    let mut seen = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    for entry in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(kind), Some(memlock)) =
            (field("map_id:"), field("map_type:"), field("memlock:"))
        {
            seen.insert(id, (kind as u32, memlock));
        }
    }
    seen.into_values().collect()
}

#[test]
fn the_splice_maps_do_not_lock_kernel_memory_for_every_possible_tunnel_at_start() {
    if !datapaths().contains(&DataPath::Kernel) {
        return;
    }
    let echo = Echo::start();
    // The default capacity: a million tunnels, two million sockets.
    let mut proxy = Proxy::start(DataPath::Kernel, &ProxyConfig::new(&[echo.addr()]));
    let maps = map_memlock(proxy.process().pid());
    const BPF_MAP_TYPE_HASH: u32 = 1;
    let activity: Vec<u64> = maps
        .iter()
        .filter(|(kind, _)| *kind == BPF_MAP_TYPE_HASH)
        .map(|(_, memlock)| *memlock)
        .collect();
    assert_eq!(activity.len(), 1, "one ACTIVITY hash map: {maps:?}");
    // Preallocated, two million entries took 251 MB; the buckets alone are 32 MiB.
    assert!(
        activity[0] < 64 << 20,
        "ACTIVITY locks {} bytes at start",
        activity[0]
    );
}
