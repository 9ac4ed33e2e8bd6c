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
        // Clients that got at least one echo back: the load is on once all have.
        let talking = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut load = Vec::new();
        for client in 0..8 {
            let url = proxy.url("/load");
            let busy = Arc::clone(&busy);
            let talking = Arc::clone(&talking);
            load.push(tokio::spawn(async move {
                let mut ws = connect(&url).await;
                let mut sent = 0u64;
                while sent == 0 || busy.load(Ordering::Relaxed) {
                    let text = format!("client {client} message {sent}");
                    bounded(ws.send(Message::text(text.clone()))).await.unwrap();
                    let back = bounded(ws.next()).await.unwrap().unwrap();
                    assert_eq!(back, Message::text(text));
                    if sent == 0 {
                        talking.fetch_add(1, Ordering::Relaxed);
                    }
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
        assert!(eventually(|| talking.load(Ordering::Relaxed) == 8));
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

/// Asks a Prometheus server at `addr` for `query`; the JSON answer.
fn prometheus_query(addr: std::net::SocketAddr, query: &str) -> serde_json::Value {
    use std::io::Read as _;
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return serde_json::Value::Null;
    };
    let request = format!("GET /api/v1/query?query={query} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut answer = String::new();
    if stream.write_all(request.as_bytes()).is_err() || stream.read_to_string(&mut answer).is_err()
    {
        return serde_json::Value::Null;
    }
    answer
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_admin_listener() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let mut ws = connect(&proxy.url("/scraped")).await;
    echo_text(&mut ws, "seen by prometheus").await;

    let dir = scratch_dir("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: wsplice\n    \
             static_configs:\n      - targets: ['{}']\n",
            proxy.admin_addr()
        ),
    )
    .unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = Process::spawn(
        Command::new(prometheus())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )
    .expect("prometheus (cargo xtask test unpacks it into .tools/prometheus)");
    // Scraped: the target is up and the open tunnel is counted.
    let scraped = eventually(|| {
        let up = prometheus_query(listen, "up");
        let tunnels = prometheus_query(listen, "wsplice_tunnels_open");
        let value = |answer: &serde_json::Value| {
            answer["data"]["result"][0]["value"][1]
                .as_str()
                .map(str::to_owned)
        };
        value(&up).as_deref() == Some("1") && value(&tunnels).as_deref() == Some("1")
    });
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert!(scraped, "Prometheus did not scrape wsplice:\n{log}");
    echo_text(&mut ws, "still open").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_shows_every_exported_metric_and_only_those() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let scrape = proxy.admin_get("/metrics");
    let exported: std::collections::BTreeSet<String> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exported.len() > 20, "{scrape}");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/wsplice.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
            .expect("JSON");
    let mut shown = std::collections::BTreeSet::new();
    // A row groups the panels below it; a collapsed one holds them in its own `panels`.
    let panels = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| match panel["type"].as_str() {
            Some("row") => panel["panels"].as_array().expect("a row's panels").clone(),
            _ => vec![panel.clone()],
        });
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("an expression");
            // Metric names: `wsplice_` and the name characters after it.
            let mut rest = expr;
            while let Some(start) = rest.find("wsplice_") {
                let name: String = rest[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[start + name.len()..];
                shown.insert(name);
            }
        }
    }
    let unknown: Vec<&String> = shown.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics wsplice does not export: {unknown:?}"
    );
    let missing: Vec<&String> = exported.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "exported metrics the dashboard does not show: {missing:?}"
    );
}
