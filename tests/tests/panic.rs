//! A worker that panics takes the whole process down (issue #14, finding 5): a supervisor must
//! see the death (SIGABRT) and restart it, and `/healthz` must not keep answering ok for a
//! proxy with a dead worker. The panic comes from the hidden fault-injection flag
//! `--test-panic-after-accepts N`.

use std::os::unix::process::ExitStatusExt as _;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use wsplice_tests::*;

/// The admin listener's answer to `GET /healthz`, or `None` when nothing answers.
fn healthz(admin: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_aborts_the_process_and_health_stops_answering() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.workers = 1;
        // `Proxy::start`'s readiness check is the worker's first accepted connection and the
        // tunnel below its second: the third connection makes it panic.
        config.extra_args = vec!["--test-panic-after-accepts".into(), "3".into()];
        let mut proxy = Proxy::start(datapath, &config);
        let mut ws = connect(&proxy.url("/before-the-panic")).await;
        echo_text(&mut ws, "still fine").await;
        assert!(
            healthz(proxy.admin_addr()).is_some_and(|answer| answer.starts_with("HTTP/1.1 200 ")),
            "{datapath:?}: not healthy before the panic"
        );

        let _trigger = bounded(tokio::net::TcpStream::connect(proxy.addr()))
            .await
            .expect("connect");

        // Health does not stay ok: within a few seconds nothing answers any more.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = None;
        while Instant::now() < deadline {
            last = healthz(proxy.admin_addr());
            if last.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            last.is_none(),
            "{datapath:?}: /healthz still answers 5 s after the worker panicked: {last:?}\n{}",
            proxy.log()
        );

        // The process ended on its own, by abort, and its log says why.
        let status = proxy.process().wait_exit(Duration::from_secs(5));
        assert_eq!(
            status.and_then(|status| status.signal()),
            Some(libc::SIGABRT),
            "{datapath:?}: {status:?}\n{}",
            proxy.log()
        );
        let log = proxy.log();
        let line = log
            .lines()
            .find(|line| line.contains("panic: a bug; aborting the whole process"))
            .unwrap_or_else(|| panic!("{datapath:?}: no panic line in:\n{log}"));
        for expected in [
            "ERROR",
            "thread=\"wsplice-w0\"",
            "location=proxy/src/runtime/worker.rs:",
            "test hook: worker 0 accepted connection 3",
        ] {
            assert!(line.contains(expected), "{expected} missing from: {line}");
        }

        // The tunnel died with it, and the client is told.
        let end = bounded(ws.next()).await;
        assert!(
            !matches!(end, Some(Ok(ref message)) if message.is_text()),
            "{datapath:?}: {end:?}"
        );
    }
}
