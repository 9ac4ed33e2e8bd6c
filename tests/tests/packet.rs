//! The packet splice (`--datapath packet`) end to end, in a topology the test makes
//! (`wsplice_tests::packet`). Once a tunnel is handed over, the proxy holds no socket for it:
//! every byte the client gets back went client → program → upstream → program → client as
//! rewritten packets.

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::cluster::in_netns;
use wsplice_tests::line::LineOptions;
use wsplice_tests::packet::{
    can_run, chaos_on_every_link, converse, lossy_line, message, metric, records_settle, set_up,
    set_up_with, start_proxy, ONE_PERCENT,
};

const SIZES: &[usize] = &[
    1,
    2,
    125,
    126,
    1000,
    1460,
    4096,
    65_535,
    65_536,
    200_000,
    1 << 20,
];

#[test]
fn a_tunnel_on_the_packet_path_carries_every_byte_both_ways_with_no_proxy_socket() {
    if !can_run() {
        return;
    }
    let setup = set_up("pkt1", &LineOptions::default(), "60s");
    let result = converse(
        &setup,
        setup.url.clone(),
        SIZES.to_vec(),
        Duration::from_millis(300),
        Duration::from_secs(30),
    );
    let log = setup.proxy.log_text();
    result.unwrap_or_else(|e| panic!("{e}\nproxy log:\n{log}"));
    assert_eq!(
        metric(&setup, "tunnels_packet_spliced_total"),
        1,
        "the tunnel was handed over\n{log}"
    );
    // Both ends closed: the flows go after the linger time, and so does the record.
    assert!(
        records_settle(&setup, 0, Duration::from_secs(10)),
        "the record stayed\n{}",
        setup.proxy.log_text()
    );
    let log = setup.proxy.log_text();
    assert!(log.contains("both ends closed (packet path)"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn the_packet_path_survives_loss_and_reordering_both_ways() {
    if !can_run() {
        return;
    }
    let setup = set_up("pkt2", &lossy_line(), "60s");
    // Loss and reordering on every link into and out of the proxy, both ways.
    let shims = chaos_on_every_link(&setup, ONE_PERCENT);
    let result = converse(
        &setup,
        setup.url.clone(),
        SIZES.to_vec(),
        Duration::from_millis(300),
        Duration::from_secs(30),
    );
    let log = setup.proxy.log_text();
    result.unwrap_or_else(|e| panic!("{e}\nproxy log:\n{log}"));
    assert_eq!(metric(&setup, "tunnels_packet_spliced_total"), 1, "{log}");
    let dropped: u64 = shims
        .iter()
        .map(|s| s.counts().expect("counts").dropped)
        .sum();
    assert!(dropped > 0, "the shims dropped nothing");
}

#[test]
fn an_idle_packet_spliced_tunnel_is_reset_and_retired_at_the_idle_timeout() {
    if !can_run() {
        return;
    }
    let setup = set_up("pkt3", &LineOptions::default(), "2s");
    let url = setup.url.clone();
    let client = in_netns(setup.line.client_ns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                .await
                .expect("connect");
            ws.send(Message::text("once")).await.expect("send");
            let back = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            assert!(matches!(back, Ok(Some(Ok(Message::Text(_))))), "{back:?}");
            // Kept open, silent: at the proxy's idle timeout (2 s) the client is reset at
            // once, not left to find out at its next send.
            let quiet_since = Instant::now();
            let end = tokio::time::timeout(Duration::from_secs(8), ws.next()).await;
            let waited = quiet_since.elapsed();
            assert!(
                matches!(end, Ok(Some(Err(_))) | Ok(None)),
                "the client was not told: {end:?}"
            );
            assert!(
                waited >= Duration::from_millis(1500),
                "ended after {waited:?}"
            );
            ws
        })
    });
    // The resets go out as the record ends: its books close a moment after.
    assert!(
        records_settle(&setup, 0, Duration::from_secs(5)),
        "{}",
        setup.proxy.log_text()
    );
    let log = setup.proxy.log_text();
    assert_eq!(metric(&setup, "tunnels_packet_spliced_total"), 1, "{log}");
    assert!(log.contains("idle timeout (packet path)"), "{log}");
    drop(client);
}

#[test]
fn many_tunnels_handed_over_at_once_each_carry_their_own_bytes() {
    if !can_run() {
        return;
    }
    const TUNNELS: usize = 100;
    const ROUNDS: usize = 20;
    let setup = set_up("pkt4", &LineOptions::default(), "60s");
    let url = setup.url.clone();
    let errors = in_netns(setup.line.client_ns(), move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut tasks = Vec::new();
            for tunnel in 0..TUNNELS {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                        .await
                        .map_err(|e| format!("{tunnel}: connect: {e}"))?;
                    for round in 0..ROUNDS {
                        // Each tunnel's messages name it: crossed wires show.
                        let sent = message(
                            tunnel * ROUNDS + round,
                            1 + (tunnel * 97 + round * 531) % 20_000,
                        );
                        ws.send(Message::binary(sent.clone()))
                            .await
                            .map_err(|e| format!("{tunnel}: send: {e}"))?;
                        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                            Ok(Some(Ok(Message::Binary(got))))
                                if got.as_ref() == sent.as_slice() => {}
                            other => return Err(format!("{tunnel} round {round}: {other:?}")),
                        }
                        if round == 0 {
                            // A pause after the first echo: the hand-offs happen meanwhile.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    ws.close(None)
                        .await
                        .map_err(|e| format!("{tunnel}: close: {e}"))
                }));
            }
            let mut errors = Vec::new();
            for task in tasks {
                match tokio::time::timeout(Duration::from_secs(60), task).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(error))) => errors.push(error),
                    other => errors.push(format!("{other:?}")),
                }
            }
            errors
        })
    });
    let log = setup.proxy.log_text();
    assert!(errors.is_empty(), "{errors:?}\n{log}");
    assert_eq!(
        metric(&setup, "tunnels_packet_spliced_total"),
        TUNNELS as u64,
        "{log}"
    );
}

/// A bpffs of the test's own (a new instance: nothing of the host's pins is seen or touched),
/// unmounted with what was pinned in it when dropped.
struct PinFolder(std::path::PathBuf);

impl PinFolder {
    fn mount(what: &str) -> PinFolder {
        let path = wsplice_tests::scratch_dir(what).join("bpffs");
        std::fs::create_dir_all(&path).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "cannot mount a bpffs at {}",
            path.display()
        );
        PinFolder(path)
    }
}

impl Drop for PinFolder {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn pinned_tunnels_outlive_the_proxy_and_the_next_one_adopts_them() {
    if !can_run() {
        return;
    }
    let pin = PinFolder::mount("pkt5-pins");
    let mut setup = set_up_with(
        "pkt5",
        &LineOptions::default(),
        "60s",
        &format!("pin = \"{}/wsplice\"", pin.0.display()),
    );
    let url = setup.url.clone();
    // A client that talks, then waits for the word to talk again (a message on `go`), and
    // last closes.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (said, heard) = std::sync::mpsc::channel::<Result<(), String>>();
    let client = wsplice_tests::cluster::spawn_in_netns(setup.line.client_ns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                .await
                .expect("connect");
            for phase in 0..3 {
                let mut result = Ok(());
                for round in 0..5 {
                    let sent = message(phase * 10 + round, 1000 + round * 5000);
                    if let Err(e) = ws.send(Message::binary(sent.clone())).await {
                        result = Err(format!("phase {phase}: send: {e}"));
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                        Ok(Some(Ok(Message::Binary(got)))) if got.as_ref() == sent.as_slice() => {}
                        other => {
                            result = Err(format!("phase {phase} round {round}: {other:?}"));
                            break;
                        }
                    }
                }
                said.send(result).expect("report");
                if phase < 2
                    && tokio::task::spawn_blocking({
                        let wait = wait.recv();
                        move || wait
                    })
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .is_none()
                {
                    return;
                }
            }
            let _ = ws.close(None).await;
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_secs(5), ws.next()).await
            {}
        })
    });
    let heard_within = |what: &str| {
        heard
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{what}: no word from the client"))
    };
    heard_within("first phase").expect("talks through the first proxy");
    // The client is quiet now: the hand-off comes at the tunnel's first quiet moment, which
    // the five quick rounds may not have given it.
    assert!(
        wsplice_tests::eventually_within(Duration::from_secs(5), || {
            metric(&setup, "tunnels_packet_spliced_total") == 1
        }),
        "the tunnel was not packet-spliced\n{}",
        setup.proxy.log_text()
    );
    // The proxy stops (SIGTERM: its drain leaves the pinned tunnel alone) ...
    assert!(
        setup
            .proxy
            .process
            .terminate(Duration::from_secs(20))
            .is_some(),
        "the proxy did not exit\n{}",
        setup.proxy.log_text()
    );
    let first_log = setup.proxy.log_text();
    assert!(
        first_log.contains("left to the next process"),
        "{first_log}"
    );
    // ... and with no proxy running, the tunnel still carries every byte.
    go.send(()).expect("go");
    heard_within("no proxy").unwrap_or_else(|e| panic!("{e}\n{first_log}"));
    // The next process adopts it and retires it when both ends close.
    setup.proxy = start_proxy(setup.line.proxy_ns(), &setup.config, "pkt5-next");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !setup
        .proxy
        .log_text()
        .contains("adopting the pinned tunnels")
    {
        assert!(Instant::now() < deadline, "{}", setup.proxy.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    wsplice_tests::cluster::wait_listening(
        setup.line.client_ns(),
        setup
            .url
            .trim_start_matches("ws://")
            .trim_end_matches('/')
            .parse()
            .expect("addr"),
    );
    assert_eq!(metric(&setup, "tunnels_packet_open"), 1);
    go.send(()).expect("go");
    heard_within("second proxy").expect("talks with the next proxy");
    client.join().expect("the client");
    assert!(
        records_settle(&setup, 0, Duration::from_secs(10)),
        "{}",
        setup.proxy.log_text()
    );
    assert!(setup
        .proxy
        .log_text()
        .contains("both ends closed (packet path)"));
}

#[test]
fn the_drain_resets_packet_spliced_tunnels_and_the_proxy_exits() {
    if !can_run() {
        return;
    }
    let mut setup = set_up("pkt6", &LineOptions::default(), "60s");
    let url = setup.url.clone();
    let (said, heard) = std::sync::mpsc::channel::<()>();
    let client = wsplice_tests::cluster::spawn_in_netns(setup.line.client_ns(), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                .await
                .expect("connect");
            ws.send(Message::text("before the drain"))
                .await
                .expect("send");
            let back = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            assert!(matches!(back, Ok(Some(Ok(Message::Text(_))))), "{back:?}");
            said.send(()).expect("report");
            // Silent from now on: the drain (3 s) must end the tunnel, and say so at once.
            tokio::time::timeout(Duration::from_secs(15), ws.next()).await
        })
    });
    heard
        .recv_timeout(Duration::from_secs(20))
        .expect("the first echo");
    assert!(
        records_settle(&setup, 1, Duration::from_secs(10)),
        "{}",
        setup.proxy.log_text()
    );
    let stopped = Instant::now();
    let status = setup.proxy.process.terminate(Duration::from_secs(15));
    let log = setup.proxy.log_text();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "took {:?}",
        stopped.elapsed()
    );
    let end = client.join().expect("the client");
    assert!(
        matches!(end, Ok(Some(Err(_))) | Ok(None)),
        "the client was not told: {end:?}\n{log}"
    );
    assert!(log.contains("\"datapath\":\"packet\""), "{log}");
}
