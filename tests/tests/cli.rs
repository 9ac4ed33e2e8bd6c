//! The command line: `wsplice check`, and SIGTERM's drain.

use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

#[test]
fn check_accepts_the_sample_config_and_points_at_errors() {
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wsplice.toml");
    let ok = Command::new(binary())
        .arg("check")
        .arg(&sample)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = scratch_dir("check");
    let broken = dir.join("broken.toml");
    std::fs::write(
        &broken,
        "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]\nupstream = \"nope\"\n\n[upstream.default]\nservers = [\"127.0.0.1:9001\"]\n",
    )
    .unwrap();
    let failed = Command::new(binary())
        .arg("check")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:5:12: route upstream \"nope\" is not defined",
            broken.display()
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_drains_open_tunnels_and_exits_zero() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.drain = "2s";
        let mut proxy = Proxy::start(datapath, &config);
        let mut ws = connect(&proxy.url("/draining")).await;
        assert!(proxy.admin_get("/readyz").starts_with("HTTP/1.1 200 "));
        let pid = proxy.process().pid();
        // SAFETY: kill(2) on the proxy we started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Alive, but load balancers are told to send no more.
        let readyz = proxy.admin_get("/readyz");
        assert!(
            readyz.starts_with("HTTP/1.1 503 "),
            "{datapath:?}: {readyz}"
        );
        assert!(proxy.admin_get("/healthz").starts_with("HTTP/1.1 200 "));
        // New connections are refused, the open tunnel still works.
        assert!(
            tokio::net::TcpStream::connect(proxy.addr()).await.is_err(),
            "{datapath:?}"
        );
        bounded(ws.send(Message::text("during drain")))
            .await
            .unwrap();
        assert_eq!(
            bounded(ws.next()).await.unwrap().unwrap(),
            Message::text("during drain")
        );
        // At the drain deadline the tunnel is closed and the proxy exits 0.
        let status = tokio::task::spawn_blocking(move || {
            let status = proxy.process().terminate(Duration::from_secs(10));
            (status, proxy)
        })
        .await
        .unwrap();
        let (status, proxy) = status;
        assert!(
            status.is_some_and(|s| s.success()),
            "{datapath:?}: {status:?}\n{}",
            proxy.log()
        );
        while let Some(Ok(_)) = bounded(ws.next()).await {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_closes_tunnels_one_by_one_over_its_spread_window() {
    const TUNNELS: usize = 40;
    let echo = Echo::start();
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.drain = "4s";
        config.close_spread = Some("2s");
        let mut proxy = Proxy::start(datapath, &config);
        let mut tunnels = Vec::with_capacity(TUNNELS);
        for index in 0..TUNNELS {
            let mut ws = connect(&proxy.url(&format!("/spread-{index}"))).await;
            echo_text(&mut ws, "open").await;
            tunnels.push(ws);
        }
        let pid = proxy.process().pid();
        let started = std::time::Instant::now();
        // SAFETY: kill(2) on the proxy we started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        // When each client sees its tunnel end.
        let ends = futures_util::future::join_all(tunnels.into_iter().map(|mut ws| async move {
            while let Some(Ok(_)) = bounded(ws.next()).await {}
            started.elapsed()
        }))
        .await;
        let first = ends.iter().min().copied().unwrap_or_default();
        let last = ends.iter().max().copied().unwrap_or_default();
        assert!(
            first >= Duration::from_millis(1_800),
            "{datapath:?}: a tunnel closed before the spread window: {first:?}"
        );
        // The drain starts when a worker sees the signal (a few ticks at most): 4 s after that,
        // with room for a loaded machine.
        assert!(
            last <= Duration::from_millis(5_500),
            "{datapath:?}: a tunnel outlived the drain: {last:?}"
        );
        assert!(
            last - first >= Duration::from_secs(1),
            "{datapath:?}: closes were not spread: {first:?}..{last:?}"
        );
        let status = tokio::task::spawn_blocking(move || {
            let status = proxy.process().terminate(Duration::from_secs(10));
            (status, proxy)
        })
        .await
        .unwrap();
        assert!(status.0.is_some_and(|s| s.success()), "{}", status.1.log());
        let spread = status
            .1
            .access_lines()
            .iter()
            .filter(|line| {
                line["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("spread window")
            })
            .count();
        assert!(
            spread >= TUNNELS - 1,
            "{datapath:?}: {spread} closed by the spread"
        );
    }
}

#[test]
fn version_names_the_revision_and_the_embedded_program() {
    let output = Command::new(binary()).arg("--version").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let revision = text
        .split("(git ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_default();
    // The tests run from a git checkout, so the revision is known.
    assert!(
        revision.len() >= 7 && revision.bytes().all(|b| b.is_ascii_hexdigit()),
        "{text}"
    ); // The tests run a release build, which embeds the real object.
    assert!(text.contains("eBPF object: embedded"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_says_in_one_line_which_data_paths_and_limits_are_in_effect() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.limits = "max_connections = 1000";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let log = proxy.log();
    let line = log
        .lines()
        .find(|line| line.contains("wsplice starting"))
        .unwrap_or_else(|| panic!("no start line in:\n{log}"));
    for expected in [
        "plain_tunnels=\"userspace relay\"",
        "workers=2",
        "max_connections=Some(1000)",
        "kernel_backlog_total=1073741824",
    ] {
        assert!(line.contains(expected), "{expected} missing from: {line}");
    }
}
