//! `/metrics` as Prometheus reads it: a scrape taken under load (tunnels relaying messages and
//! plain HTTP requests) passes `promtool check metrics`, on every data path.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

/// Runs `promtool check metrics` on `scrape`; its verdict and what it said.
fn promtool_check(scrape: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask test unpacks it into .tools/prometheus)");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(scrape.as_bytes())
        .expect("write the scrape");
    let output = child.wait_with_output().expect("promtool ends");
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_under_load_passes_promtool_on_every_data_path() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        let busy = Arc::new(AtomicBool::new(true));
        let mut load = Vec::new();
        for client in 0..8 {
            let url = proxy.url("/load");
            let busy = Arc::clone(&busy);
            load.push(tokio::spawn(async move {
                let mut ws = connect(&url).await;
                let mut sent = 0u64;
                while busy.load(Ordering::Relaxed) {
                    let text = format!("client {client} message {sent}");
                    bounded(ws.send(Message::text(text.clone()))).await.unwrap();
                    let back = bounded(ws.next()).await.unwrap().unwrap();
                    assert_eq!(back, Message::text(text));
                    sent += 1;
                }
                sent
            }));
        }
        let addr = proxy.addr();
        let busy_http = Arc::clone(&busy);
        let http = tokio::spawn(async move {
            let mut stream = bounded(tokio::net::TcpStream::connect(addr)).await.unwrap();
            let mut answered = 0u64;
            let mut buffer = vec![0u8; 4096];
            while busy_http.load(Ordering::Relaxed) {
                stream
                    .write_all(b"GET /page HTTP/1.1\r\nHost: metrics.test\r\n\r\n")
                    .await
                    .unwrap();
                let n = bounded(stream.read(&mut buffer)).await.unwrap();
                assert!(
                    buffer[..n].starts_with(b"HTTP/1.1 200 "),
                    "plain GET failed"
                );
                answered += 1;
            }
            answered
        });
        // Under load: tunnels open, requests going through.
        assert!(eventually(|| proxy.metrics()["tunnels_open"] == 8));
        assert!(eventually(|| proxy.metrics()["http_requests_total"] > 10));
        let scrape = proxy.admin_get("/metrics");
        let body = scrape
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .unwrap_or_default();
        let (valid, said) = promtool_check(body);
        busy.store(false, Ordering::Relaxed);
        for client in load {
            assert!(client.await.unwrap() > 0);
        }
        assert!(http.await.unwrap() > 0);
        assert!(
            valid,
            "{datapath:?}: promtool check metrics failed:\n{said}\n{body}"
        );
        assert!(body.contains("wsplice_tunnels_open 8"), "{body}");
    }
}
