//! `SIGHUP` reloads the config: new connections follow the new routes and certificates within
//! a second, open tunnels go on untouched, a config that does not load is refused and the
//! running one stays.

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::tls::*;
use wsplice_tests::*;

/// Tunnels kept open through the reloads, each echoing a sequenced message per round.
const TUNNELS: usize = 2000;

/// Reloads in a row, the upstream switching at each.
const RELOADS: usize = 10;

/// Opens a tunnel on a path that names `label`, so the echo's records tell where it went.
async fn tunnel(proxy: &Proxy, label: &str) -> Client {
    connect(&proxy.url(&format!("/{label}"))).await
}

/// Whether `echo` recorded a handshake for `label`.
fn saw(echo: &Echo, label: &str) -> bool {
    let path = format!("/{label}");
    echo.records().iter().any(|record| record.path == path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_switch_new_connections_and_leave_open_tunnels_alone() {
    raise_fd_limit(TUNNELS);
    let (first, second) = (Echo::start(), Echo::start());
    for datapath in datapaths() {
        let config = |echo: &Echo| ProxyConfig::new(&[echo.addr()]);
        let proxy = Proxy::start(datapath, &config(&first));
        let mut tunnels = open_tunnels(&proxy, &format!("{datapath:?}-open"), TUNNELS).await;
        echo_round(&mut tunnels, 0).await;
        let fds_before = proxy.fd_count();

        for reload in 1..=RELOADS {
            let target = if reload % 2 == 1 { &second } else { &first };
            let reloaded_at = Instant::now();
            assert!(proxy.reload(&config(target)), "reload {reload} refused");
            // New connections go to the new upstream within a second of the reload.
            let mut attempt = 0;
            loop {
                let label = format!("{datapath:?}-after-{reload}-{attempt}");
                let mut ws = tunnel(&proxy, &label).await;
                echo_text(&mut ws, "new").await;
                if saw(target, &label) {
                    break;
                }
                assert!(
                    reloaded_at.elapsed() < Duration::from_secs(1),
                    "reload {reload}: new connections still went to the old upstream"
                );
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The open tunnels did not notice.
            echo_round(&mut tunnels, reload).await;
        }
        let paths: std::collections::HashSet<String> = first
            .records()
            .into_iter()
            .map(|record| record.path)
            .collect();
        assert!(
            (0..TUNNELS).all(|index| paths.contains(&format!("/{datapath:?}-open-{index}"))),
            "the open tunnels were all opened to the first upstream"
        );

        // A file that does not load: refused, logged, the running configuration stays.
        assert!(
            !proxy.reload_text("[[listener]\nbind = "),
            "a broken file was taken"
        );
        let log = proxy.log();
        assert!(
            log.contains("configuration reload refused"),
            "the refusal names itself:\n{log}"
        );
        let metrics = proxy.metrics();
        assert_eq!(
            metrics["config_reloads_total"], RELOADS as u64,
            "{metrics:?}"
        );
        assert_eq!(metrics["config_reload_failures_total"], 1, "{metrics:?}");
        let label = format!("{datapath:?}-after-refusal");
        let mut ws = tunnel(&proxy, &label).await;
        echo_text(&mut ws, "still served").await;
        assert!(saw(&first, &label), "the last good config still routes");
        echo_round(&mut tunnels, RELOADS + 1).await;
        drop(ws);

        // Nothing leaked: the same descriptors as before the reloads (the probes are closed).
        assert!(
            eventually(|| proxy.fd_count() <= fds_before),
            "descriptors grew over the reloads: {} -> {}",
            fds_before,
            proxy.fd_count()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_certificate_for_new_connections_and_names_restart_only_settings() {
    let (old_ca, new_ca) = (TestCa::new(), TestCa::new());
    let old_leaf = old_ca.issue("old", &["localhost"]);
    let new_leaf = new_ca.issue("new", &["localhost"]);
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.tls = Some(tls_table(&old_leaf, ""));
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut open = connect_wss(proxy.addr(), "localhost", "/open", old_ca.client_config()).await;
    echo_text_tls(&mut open, "before").await;
    assert!(
        tls_connect(proxy.addr(), "localhost", new_ca.client_config())
            .await
            .is_err(),
        "the new certificate is not served before the reload"
    );

    config.tls = Some(tls_table(&new_leaf, ""));
    config.limits = "relay_buffer = 16384";
    assert!(proxy.reload(&config), "reload refused:\n{}", proxy.log());
    let log = proxy.log();
    assert!(
        log.contains("limits.relay_buffer") && log.contains("next restart"),
        "a setting that needs a restart is named:\n{log}"
    );
    let served_new = eventually(|| {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                tls_connect(proxy.addr(), "localhost", new_ca.client_config())
                    .await
                    .is_ok()
            })
        })
    });
    assert!(served_new, "new connections get the new certificate");
    let mut fresh = connect_wss(proxy.addr(), "localhost", "/fresh", new_ca.client_config()).await;
    echo_text_tls(&mut fresh, "after").await;
    // The tunnel opened under the old certificate goes on.
    echo_text_tls(&mut open, "still here").await;
}

/// Sends `text` over a wss tunnel and asserts it comes back.
async fn echo_text_tls(ws: &mut TlsClient, text: &str) {
    bounded(ws.send(Message::text(text))).await.expect("send");
    let reply = bounded(ws.next()).await.expect("a reply").expect("a frame");
    assert_eq!(reply, Message::text(text));
}

/// Whether a TLS connection to the proxy with `client` succeeds, and whether it resumed.
async fn tls_outcome(proxy: &Proxy, client: &std::sync::Arc<rustls::ClientConfig>) -> Option<bool> {
    let stream = tls_connect(proxy.addr(), "localhost", std::sync::Arc::clone(client))
        .await
        .ok()?;
    Some(stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_signal_and_sessions_resume_across_a_reload() {
    let (ca, renewing_ca) = (TestCa::new(), TestCa::new());
    let leaf = ca.issue("served", &["localhost"]);
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.tls = Some(tls_table(&leaf, ""));
    let proxy = Proxy::start(DataPath::Userspace, &config);

    // A session from before a reload resumes after it: the ticket keys carried over.
    let client = ca.client_config();
    let mut ws = connect_wss(proxy.addr(), "localhost", "/ticket", client.clone()).await;
    echo_text_tls(&mut ws, "tickets arrive with the first answer").await;
    drop(ws);
    assert!(proxy.reload(&config), "reload refused:\n{}", proxy.log());
    assert_eq!(
        tls_outcome(&proxy, &client).await,
        Some(true),
        "the session did not resume across the reload"
    );

    // The files are replaced in place, as an ACME client renews: no signal needed.
    let mut open = connect_wss(proxy.addr(), "localhost", "/open", ca.client_config()).await;
    let renewed = renewing_ca.issue("renewed", &["localhost"]);
    std::fs::copy(&renewed.key, &leaf.key).expect("replace the key");
    std::fs::copy(&renewed.cert, &leaf.cert).expect("replace the certificate");
    let renewed_client = renewing_ca.client_config();
    let served = eventually(|| {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(tls_outcome(&proxy, &renewed_client))
                .is_some()
        })
    });
    assert!(
        served,
        "the renewed certificate is not served:\n{}",
        proxy.log()
    );
    assert!(
        proxy.log().contains("certificate files changed"),
        "{}",
        proxy.log()
    );
    assert!(proxy.metrics()["certificate_reloads_total"] >= 1);
    // The tunnel opened under the old certificate goes on.
    echo_text_tls(&mut open, "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_and_removed_by_a_reload_and_open_connections_stay() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let config = ProxyConfig::new(&[echo.addr()]);
        let proxy = Proxy::start(datapath, &config);
        let original = proxy.addr();
        let listener = |addr: std::net::SocketAddr| format!("[[listener]]\nbind = \"{addr}\"\n");
        let text = proxy.config_text(&config);
        let mut on_original = tunnel(&proxy, "on-original").await;
        echo_text(&mut on_original, "before").await;

        // Added: accepted at once, on every worker.
        let extra: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let both = text.replace(
            &listener(original),
            &format!("{}\n{}", listener(extra), listener(original)),
        );
        assert!(proxy.reload_text(&both), "{}", proxy.log());
        let mut on_extra = Vec::new();
        for index in 0..8 {
            let mut ws = connect(&format!("ws://{extra}/on-extra-{index}")).await;
            echo_text(&mut ws, "through the added listener").await;
            on_extra.push(ws);
        }
        let fds_with_both = proxy.fd_count();

        // Removed: new connections are refused, the open ones go on.
        let only_extra = text.replace(&listener(original), &listener(extra));
        assert!(proxy.reload_text(&only_extra), "{}", proxy.log());
        assert!(
            eventually(|| std::net::TcpStream::connect(original).is_err()),
            "the removed listener still accepts"
        );
        echo_text(&mut on_original, "still open").await;
        for ws in &mut on_extra {
            echo_text(ws, "still open too").await;
        }
        assert!(proxy.log().contains("listener removed"), "{}", proxy.log());
        let workers = config.workers;
        assert!(
            eventually(|| proxy.fd_count() + workers <= fds_with_both),
            "the removed listener's {workers} sockets were not closed"
        );

        // And back, on the same port.
        assert!(proxy.reload_text(&both), "{}", proxy.log());
        let mut again = tunnel(&proxy, "on-original-again").await;
        echo_text(&mut again, "back").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_take_the_new_idle_timeout() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.idle = "60s";
        let proxy = Proxy::start(datapath, &config);
        let mut ws = tunnel(&proxy, "idle").await;
        echo_text(&mut ws, "then quiet").await;
        config.idle = "1s";
        let reloaded_at = Instant::now();
        assert!(proxy.reload(&config), "{}", proxy.log());
        // The proxy closes the quiet tunnel about a second after its last message.
        let end = bounded(ws.next()).await;
        assert!(
            matches!(end, None | Some(Ok(Message::Close(_))) | Some(Err(_))),
            "{datapath:?}: expected the end of the tunnel, got {end:?}"
        );
        assert!(
            reloaded_at.elapsed() < Duration::from_secs(10),
            "{datapath:?}: closed only after {:?}",
            reloaded_at.elapsed()
        );
        let closed = proxy.wait_access_lines(1);
        assert!(
            closed.iter().any(|line| line["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("1000 ms")),
            "{datapath:?}: {closed:?}"
        );
    }
}

/// `wsplice reload -c FILE`: its exit status and what it printed.
fn reload_command(file: &std::path::Path) -> (bool, String) {
    let output = std::process::Command::new(binary())
        .args(["reload", "-c"])
        .arg(file)
        .output()
        .expect("run wsplice reload");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wsplice_reload_asks_through_the_admin_listener_and_reports_the_outcome() {
    let (first, second) = (Echo::start(), Echo::start());
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[first.addr()]));
    let file = proxy.config_path().to_owned();

    std::fs::write(
        &file,
        proxy.config_text(&ProxyConfig::new(&[second.addr()])),
    )
    .unwrap();
    let (ok, text) = reload_command(&file);
    assert!(ok && text.contains("reloaded: generation 1"), "{text}");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut ws = tunnel(&proxy, "after-command").await;
    echo_text(&mut ws, "routed by the new file").await;
    assert!(saw(&second, "after-command"));

    // A file that does not load is refused by the command itself, naming where.
    std::fs::write(&file, "[[route]]\nupstream = \"nowhere\"\n").unwrap();
    let (ok, text) = reload_command(&file);
    assert!(!ok && text.contains("wsplice.toml:1:1"), "{text}");
    let mut ws = tunnel(&proxy, "still-second").await;
    echo_text(&mut ws, "unchanged").await;
    assert!(saw(&second, "still-second"));
}
