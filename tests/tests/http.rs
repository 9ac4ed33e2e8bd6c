//! Plain HTTP/1.1 reverse proxying on the WebSocket listeners (issue #12) as real clients see it:
//! curl, Python `requests`, raw keep-alive and pipelining, 1 GiB bodies with bounded memory,
//! wss, header rewriting, timeouts, upstream failures, and Socket.IO's long-polling then
//! websocket upgrade through one proxy.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use wsplice_tests::http::*;
use wsplice_tests::tls::{tls_connect, tls_table, TestCa};
use wsplice_tests::*;

/// A GET of `path` with Host and nothing else.
fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: wsplice.test\r\n\r\n").into_bytes()
}

/// A POST of `body` to `path` with Content-Length.
fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: wsplice.test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// The echo's text answer to a GET or HEAD.
fn echo_line(method: &str, target: &str) -> String {
    format!("wsplice echo: {method} {target}\n")
}

/// The echo's connection serial on a response.
fn serial(response: &Response) -> u64 {
    response
        .header("X-Echo-Connection")
        .unwrap_or_else(|| panic!("no X-Echo-Connection: {}", response.head))
        .trim()
        .parse()
        .expect("a numeric X-Echo-Connection")
}

/// Test data that is not the echo's own pattern: byte `i` is `(i * 7 + i / 251) % 256`.
fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + i / 251) % 256) as u8).collect()
}

/// Asserts the echo's JSON digest answer matches `body`.
fn assert_digest(response: &Response, body: &[u8], what: &str) {
    assert_eq!(response.status, 200, "{what}: {}", response.head);
    let (bytes, hash) = parse_digest(&response.body);
    let (want_bytes, want_hash) = echo_digest(body);
    assert_eq!(bytes, want_bytes, "{what}: byte count");
    assert!(
        hash.eq_ignore_ascii_case(&want_hash),
        "{what}: {hash} != {want_hash}"
    );
}

/// Runs curl (bounded by `--max-time`) and returns its stdout, failing on a non-zero exit.
fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "60"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl (`cargo xtask test` installs it)");
    assert!(
        output.status.success(),
        "curl {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a Python script from the tests' venv; returns stdout, failing on a non-zero exit.
fn run_python(script: &str, args: &[&str]) -> String {
    let mut command = Command::new(python());
    command.arg("-c").arg(script).args(args);
    run_bounded(command, "python")
}

#[test]
fn curl_gets_posts_uploads_chunked_with_expect_and_reuses_one_connection() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let base = format!("http://{}", proxy.addr());
    let dir = scratch_dir("curl");

    let out = curl(&["-i", &format!("{base}/hello?x=1")]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with(&echo_line("GET", "/hello?x=1")), "{out}");

    let body = data(300_000);
    let file = dir.join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let at_file = format!("@{}", file.display());
    let (want_bytes, want_hash) = echo_digest(&body);
    let check = |out: &str, what: &str| {
        let value: serde_json::Value =
            serde_json::from_str(out).unwrap_or_else(|e| panic!("{what}: {out:?}: {e}"));
        assert_eq!(value["bytes"].as_u64(), Some(want_bytes), "{what}: {out}");
        assert!(
            value["fnv1a64"]
                .as_str()
                .is_some_and(|h| h.eq_ignore_ascii_case(&want_hash)),
            "{what}: {out}"
        );
    };
    check(
        &curl(&["--data-binary", &at_file, &format!("{base}/upload")]),
        "Content-Length upload",
    );
    check(
        &curl(&[
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &at_file,
            &format!("{base}/chunked-upload"),
        ]),
        "chunked upload",
    );
    let chunked = echo
        .records()
        .into_iter()
        .find(|r| r.path == "/chunked-upload")
        .expect("the echo recorded the chunked upload");
    assert_eq!(
        chunked.values("transfer-encoding"),
        ["chunked"],
        "{chunked:?}"
    );
    assert!(chunked.values("content-length").is_empty(), "{chunked:?}");
    check(
        &curl(&[
            "-H",
            "Expect: 100-continue",
            "--expect100-timeout",
            "10",
            "--data-binary",
            &at_file,
            &format!("{base}/expect"),
        ]),
        "Expect: 100-continue upload",
    );
    let expect = echo
        .records()
        .into_iter()
        .find(|r| r.path == "/expect")
        .expect("the echo recorded the Expect upload");
    assert_eq!(expect.values("expect"), ["100-continue"], "{expect:?}");

    // Three URLs on one command line: curl reuses its connection, and so does the proxy.
    let before = proxy.access_lines().len();
    let out = curl(&[
        "-i",
        "-w",
        "\nconnects=%{num_connects}\n",
        &format!("{base}/a"),
        &format!("{base}/b"),
        &format!("{base}/c"),
    ]);
    let connects: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects="))
        .collect();
    assert_eq!(connects, ["1", "0", "0"], "{out}");
    let serials: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-echo-connection")
                .then_some(value.trim())
        })
        .collect();
    assert_eq!(serials.len(), 3, "{out}");
    assert!(serials.iter().all(|s| *s == serials[0]), "{out}");
    for path in ["/a", "/b", "/c"] {
        assert!(out.contains(&echo_line("GET", path)), "{out}");
    }
    let lines = proxy.wait_access_lines(before + 3);
    let ours: Vec<&serde_json::Value> = lines[before..]
        .iter()
        .filter(|l| ["/a", "/b", "/c"].contains(&l["path"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(ours.len(), 3, "one access line per request: {lines:?}");
    assert!(
        ours.iter()
            .all(|l| l["client"] == ours[0]["client"] && l["status"] == 200),
        "one client connection for the three: {ours:?}"
    );
}

#[test]
fn python_requests_session_keeps_alive_posts_and_streams_downloads() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let script = r#"
import json, sys, requests
base = sys.argv[1]
s = requests.Session()
serials = []
for i in range(3):
    r = s.get(base + "/req/%d" % i, timeout=20)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.text == "wsplice echo: GET /req/%d\n" % i, r.text
    serials.append(r.headers["X-Echo-Connection"])
data = bytes(((i * 7 + i // 251) % 256) for i in range(300000))
posted = s.post(base + "/upload", data=data, timeout=20).json()
def pieces():
    for _ in range(4):
        yield data
streamed_up = s.post(base + "/upload", data=pieces(), timeout=20).json()
pattern = bytes(i % 251 for i in range(251 * 600))
downloads = {}
for query in ("", "?chunked=1"):
    n = 20 * 1024 * 1024 + 3
    r = s.get(base + "/bytes/%d%s" % (n, query), stream=True, timeout=20)
    assert r.status_code == 200, r.status_code
    count = 0
    for chunk in r.iter_content(65536):
        start = count % 251
        assert chunk == pattern[start:start + len(chunk)], count
        count += len(chunk)
    downloads[query or "length"] = [count, r.headers.get("Transfer-Encoding", ""), r.headers.get("Content-Length", "")]
print(json.dumps({"serials": serials, "posted": posted, "streamed_up": streamed_up, "downloads": downloads}))
"#;
    let out = run_python(script, &[&format!("http://{}", proxy.addr())]);
    let value: serde_json::Value = serde_json::from_str(out.trim()).expect(&out);
    let serials = value["serials"].as_array().unwrap();
    assert!(
        serials.iter().all(|s| *s == serials[0]),
        "a Session reuses one connection: {value}"
    );
    let body = data(300_000);
    let (bytes, hash) = echo_digest(&body);
    assert_eq!(value["posted"]["bytes"].as_u64(), Some(bytes), "{value}");
    assert!(value["posted"]["fnv1a64"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case(&hash));
    let four = body.repeat(4);
    let (bytes, hash) = echo_digest(&four);
    assert_eq!(
        value["streamed_up"]["bytes"].as_u64(),
        Some(bytes),
        "{value}"
    );
    assert!(value["streamed_up"]["fnv1a64"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case(&hash));
    let n = 20 * 1024 * 1024 + 3;
    assert_eq!(value["downloads"]["length"][0].as_u64(), Some(n), "{value}");
    assert_eq!(
        value["downloads"]["length"][2].as_str(),
        Some(n.to_string().as_str()),
        "{value}"
    );
    assert_eq!(
        value["downloads"]["?chunked=1"][0].as_u64(),
        Some(n),
        "{value}"
    );
    assert_eq!(
        value["downloads"]["?chunked=1"][1].as_str(),
        Some("chunked"),
        "{value}"
    );
}

/// Samples the proxy's resident memory every 20 ms until stopped; the peak in KiB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak seen (and the kernel's own high-water mark) in KiB.
    fn finish(mut self, pid: u32) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        (self.peak.load(Ordering::Relaxed), status_kib(pid, "VmHWM:"))
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A `/proc/PID/status` value in KiB.
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

const GIB: u64 = 1 << 30;
/// The proxy's memory bound while a gigabyte passes through it.
const MEMORY_BOUND_KIB: u64 = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_uploaded_and_a_gib_downloaded_pass_with_bounded_memory() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        let sampler = RssSampler::start(proxy.pid());
        let transfer = async {
            // Upload: 1 GiB with Content-Length, written as it is produced, hashed as it goes.
            let mut conn = HttpConn::connect(proxy.addr()).await;
            conn.send(
                format!(
                    "POST /upload HTTP/1.1\r\nHost: wsplice.test\r\nContent-Length: {GIB}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            let mut piece = vec![0u8; 1 << 20];
            let mut hash = FNV_OFFSET;
            let mut sent = 0u64;
            while sent < GIB {
                // Offset by 3 so it is not the download pattern.
                pattern_at(sent + 3, &mut piece);
                hash = fnv1a64(hash, &piece);
                bounded(conn.stream().write_all(&piece))
                    .await
                    .expect("upload write");
                sent += piece.len() as u64;
            }
            let response = conn.response(false).await;
            assert_eq!(response.status, 200, "{datapath:?}: {}", response.head);
            let (bytes, got) = parse_digest(&response.body);
            assert_eq!(bytes, GIB, "{datapath:?}");
            assert!(
                got.eq_ignore_ascii_case(&format!("{hash:016x}")),
                "{datapath:?}: {got} != {hash:016x}"
            );

            // Download on the same connection: 1 GiB, checked as it arrives, never held.
            conn.send(&get(&format!("/bytes/{GIB}"))).await;
            let head = conn.response_head().await;
            assert_eq!(head.status, 200, "{datapath:?}: {}", head.head);
            assert_eq!(
                head.header("content-length"),
                Some(GIB.to_string().as_str())
            );
            let mut expected = vec![0u8; 1 << 20];
            let mut received = 0u64;
            while received < GIB {
                let chunk = conn.body_chunk().await;
                assert!(!chunk.is_empty(), "{datapath:?}: closed at {received}");
                assert!(received + chunk.len() as u64 <= GIB, "more than announced");
                let want = &mut expected[..chunk.len()];
                pattern_at(received, want);
                assert!(chunk == *want, "{datapath:?}: wrong bytes after {received}");
                received += chunk.len() as u64;
            }
        };
        tokio::time::timeout(Duration::from_secs(300), transfer)
            .await
            .expect("2 GiB through the proxy within 5 minutes");
        let (peak, hwm) = sampler.finish(proxy.pid());
        println!("{datapath:?}: proxy peak RSS {peak} KiB, VmHWM {hwm} KiB");
        assert!(peak > 0 && hwm > 0, "{datapath:?}: no memory samples");
        assert!(
            peak < MEMORY_BOUND_KIB && hwm < MEMORY_BOUND_KIB,
            "{datapath:?}: the proxy's memory grew with the body: peak RSS {peak} KiB, \
             VmHWM {hwm} KiB"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_plain_get_and_post_with_https_forwarding_headers() {
    let ca = TestCa::new();
    let leaf = ca.issue("leaf", &["localhost"]);
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.tls = Some(tls_table(&leaf, ""));
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let stream = tls_connect(proxy.addr(), "localhost", ca.client_config())
        .await
        .expect("TLS connect");
    let mut conn = HttpConn::new(stream);
    conn.send(b"GET /secure?q=1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let response = conn.response(false).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.text(), echo_line("GET", "/secure?q=1"));
    let body = data(200_000);
    conn.send(&post("/secure-upload", &body)).await;
    let posted = conn.response(false).await;
    assert_digest(&posted, &body, "POST over wss");
    assert_eq!(
        serial(&response),
        serial(&posted),
        "one upstream connection"
    );
    let record = echo
        .records()
        .into_iter()
        .find(|r| r.path == "/secure?q=1")
        .expect("recorded");
    assert_eq!(record.values("x-forwarded-proto"), ["https"], "{record:?}");
    assert_eq!(record.values("host"), ["localhost"], "{record:?}");
    assert_eq!(record.method, "GET", "{record:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_get_the_same_header_rewriting_as_upgrades() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.route_extra = "headers = { set = { \"X-Env\" = \"prod\" }, remove = [\"Cookie\"] }";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut conn = HttpConn::connect(proxy.addr()).await;
    let request = "GET /rewrite?a=b HTTP/1.1\r\nHost: app.test:8080\r\n\
                   Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
                   Proxy-Connection: keep-alive\r\nTE: trailers\r\n\
                   Proxy-Authorization: Basic c2VjcmV0\r\nX-Forwarded-For: 198.51.100.9\r\n\
                   X-Real-IP: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nCookie: a=b\r\n\
                   X-Env: dev\r\nX-Custom: 42\r\n\r\n";
    conn.send(request.as_bytes()).await;
    let response = conn.response(false).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.text(), echo_line("GET", "/rewrite?a=b"));
    let record = echo
        .records()
        .into_iter()
        .find(|r| r.path == "/rewrite?a=b")
        .expect("recorded");
    let value = |name: &str| record.values(name);
    assert_eq!(record.method, "GET");
    assert_eq!(value("host"), ["app.test:8080"], "{record:?}");
    assert_eq!(value("x-real-ip"), ["127.0.0.1"], "{record:?}");
    assert_eq!(
        value("x-forwarded-for"),
        ["127.0.0.1"],
        "untrusted client: {record:?}"
    );
    assert_eq!(value("x-forwarded-proto"), ["http"], "{record:?}");
    assert_eq!(value("x-env"), ["prod"], "{record:?}");
    assert_eq!(value("x-custom"), ["42"], "{record:?}");
    for hop in [
        "cookie",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(value(hop).is_empty(), "{hop} forwarded: {record:?}");
    }
    // HTTP/1.1 to the upstream, kept alive: no `Connection: close`, whatever else it says.
    assert!(
        value("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("close")
                && !v.to_ascii_lowercase().contains("x-hop")),
        "{record:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_only_routes_refuse_plain_requests_with_426() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.route_extra = "websocket_only = true";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let (status, answer) = raw_exchange(proxy.addr(), &get("/plain")).await;
    assert_eq!(status, 426, "{answer}");
    assert!(
        echo.records().iter().all(|r| r.path != "/plain"),
        "the upstream saw the refused request"
    );
    // Upgrades still work there.
    let mut ws = connect(&proxy.url("/ws")).await;
    echo_text(&mut ws, "still a websocket route").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_body_is_413_and_a_body_within_it_passes() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.limits = "max_body = 1024";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let (status, answer) = raw_exchange(proxy.addr(), &post("/big", &data(1025))).await;
    assert_eq!(status, 413, "{answer}");
    let mut chunked =
        b"POST /big-chunked HTTP/1.1\r\nHost: wsplice.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&data(512));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (status, answer) = raw_exchange(proxy.addr(), &chunked).await;
    assert_eq!(status, 413, "{answer}");
    let mut small =
        b"POST /small HTTP/1.1\r\nHost: wsplice.test\r\nConnection: close\r\nContent-Length: 1024\r\n\r\n"
            .to_vec();
    small.extend_from_slice(&data(1024));
    // `raw_exchange` reads to the end: this one asks for the close.
    let (status, answer) = raw_exchange(proxy.addr(), &small).await;
    assert_eq!(status, 200, "{answer}");
    let seen: Vec<String> = echo.records().into_iter().map(|r| r.path).collect();
    assert!(!seen.contains(&"/big".to_owned()), "{seen:?}");
}

/// A masked client text frame (payload under 126 bytes).
fn client_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_after_two_plain_gets_on_one_connection_becomes_a_tunnel() {
    let echo = Echo::start();
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[echo.addr()]));
        let mut conn = HttpConn::connect(proxy.addr()).await;
        for path in ["/first", "/second"] {
            conn.send(&get(path)).await;
            let response = conn.response(false).await;
            assert_eq!(response.status, 200, "{datapath:?}: {}", response.head);
            assert_eq!(response.text(), echo_line("GET", path));
            assert!(!response.says_close(), "{datapath:?}: {}", response.head);
        }
        conn.send(&upgrade_request("/third", &[])).await;
        let switched = conn.response(false).await;
        assert_eq!(switched.status, 101, "{datapath:?}: {}", switched.head);
        conn.send(&client_frame(b"after two GETs")).await;
        let (mut stream, mut rest) = conn.into_parts();
        let want = server_frame(b"after two GETs");
        while rest.len() < want.len() {
            let mut chunk = [0u8; 256];
            let n = bounded(tokio::io::AsyncReadExt::read(&mut stream, &mut chunk))
                .await
                .expect("read the echoed frame");
            assert!(n > 0, "{datapath:?}: closed before the echo");
            rest.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(rest, want, "{datapath:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_head_204_304_have_no_body() {
    let upstream = Recorder::answering(Arc::new(|request: &Request| {
        let body = format!("answer to {}", request.line());
        match request.target.as_str() {
            "/no-content" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            // A 304's Content-Length describes the representation; no body follows.
            "/not-modified" => {
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n".to_vec()
            }
            _ if request.method == "HEAD" => {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes()
            }
            _ => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        }
    }))
    .await;
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[upstream.addr()]));
    let mut conn = HttpConn::connect(proxy.addr()).await;
    let mut pipeline = Vec::new();
    pipeline.extend(post("/posted", b"hello"));
    pipeline.extend(get("/one"));
    pipeline.extend(b"HEAD /head HTTP/1.1\r\nHost: wsplice.test\r\n\r\n");
    pipeline.extend(get("/no-content"));
    pipeline.extend(get("/not-modified"));
    pipeline.extend(
        b"POST /chunked HTTP/1.1\r\nHost: wsplice.test\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n0\r\n\r\n",
    );
    pipeline.extend(get("/last"));
    conn.send(&pipeline).await;
    let expect: [(&str, bool, u16, &str); 7] = [
        ("POST /posted", false, 200, "answer to POST /posted"),
        ("GET /one", false, 200, "answer to GET /one"),
        ("HEAD /head", true, 200, ""),
        ("GET /no-content", false, 204, ""),
        ("GET /not-modified", false, 304, ""),
        ("POST /chunked", false, 200, "answer to POST /chunked"),
        ("GET /last", false, 200, "answer to GET /last"),
    ];
    for (what, head, status, body) in expect {
        let response = conn.response(head).await;
        assert_eq!(response.status, status, "{what}: {}", response.head);
        assert_eq!(response.text(), body, "{what}");
    }
    // Nothing else came: no stray body bytes of the HEAD, 204 or 304.
    assert_eq!(conn.closed_within(Duration::from_millis(300)).await, None);
    let requests: Vec<String> = upstream
        .bytes()
        .iter()
        .flat_map(|bytes| parse_requests(bytes).0)
        .map(|r| r.line())
        .collect();
    assert_eq!(
        requests,
        expect.iter().map(|e| e.0).collect::<Vec<_>>(),
        "the upstream got each request once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_pass_through_verbatim_both_ways() {
    const RESPONSE_BODY: &[u8] =
        b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n";
    let upstream = Recorder::answering(Arc::new(|_: &Request| {
        let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        answer.extend_from_slice(RESPONSE_BODY);
        answer
    }))
    .await;
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[upstream.addr()]));
    let mut conn = HttpConn::connect(proxy.addr()).await;
    let body = b"5;name=value\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Sum: 12\r\n\r\n";
    let mut request =
        b"POST /chunks HTTP/1.1\r\nHost: wsplice.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    request.extend_from_slice(body);
    conn.send(&request).await;
    let response = conn.response(false).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(
        response.raw_body, RESPONSE_BODY,
        "the response's chunks as sent"
    );
    assert_eq!(response.body, b"abc0123456789abcdef");
    let received = upstream.bytes().concat();
    let (requests, rest) = parse_requests(&received);
    assert_eq!(
        requests.len(),
        1,
        "{:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(rest.is_empty());
    let head_end = find(&requests[0].raw, b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        String::from_utf8_lossy(&requests[0].raw[head_end..]),
        String::from_utf8_lossy(body),
        "the request's chunks as sent"
    );
    assert_eq!(requests[0].values("transfer-encoding"), ["chunked"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_forwarded_and_the_interim_answer_relayed() {
    let upstream = Scripted::start(|mut stream, head, mut rest| async move {
        use tokio::io::AsyncReadExt as _;
        if !head.to_ascii_lowercase().contains("expect: 100-continue") || !rest.is_empty() {
            let _ = stream
                .write_all(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        }
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        while rest.len() < 11 {
            let mut chunk = [0u8; 64];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            rest.len(),
            String::from_utf8_lossy(&rest)
        );
        let _ = stream.write_all(answer.as_bytes()).await;
    })
    .await;
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[upstream.addr()]));
    let mut conn = HttpConn::connect(proxy.addr()).await;
    conn.send(
        b"POST /expect HTTP/1.1\r\nHost: wsplice.test\r\nContent-Length: 11\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await;
    // The body is held back until the interim answer comes.
    let interim = conn.response(false).await;
    assert_eq!(interim.status, 100, "{}", interim.head);
    conn.send(b"hello world").await;
    let response = conn.response(false).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.text(), "hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_dropped_after_keepalive_timeout() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.workers = 1;
    config.upstream_keepalive = Some(4);
    config.upstream_keepalive_timeout = Some("1s");
    let proxy = Proxy::start(DataPath::Userspace, &config);
    // Three client connections one after the other: one upstream connection for them all.
    let mut serials = Vec::new();
    for round in 0..3 {
        let mut conn = HttpConn::connect(proxy.addr()).await;
        conn.send(&get(&format!("/pooled/{round}"))).await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{}", response.head);
        serials.push(serial(&response));
    }
    assert!(serials.iter().all(|s| *s == serials[0]), "{serials:?}");
    // Idle past keepalive_timeout: the pooled connection is gone, a new one is opened.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut conn = HttpConn::connect(proxy.addr()).await;
    conn.send(&get("/after-idle")).await;
    let response = conn.response(false).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_ne!(
        serial(&response),
        serials[0],
        "an expired connection was reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_timeouts_408_silent_close_keepalive_and_504() {
    let silent = Scripted::start(|stream, _, _| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    })
    .await;
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.handshake = "1s";
    config.keepalive = Some("1s");
    config.idle = "1s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let window =
        |took: Duration| took >= Duration::from_millis(800) && took < Duration::from_secs(5);

    // A partial head at the deadline: 408, then the close.
    let mut conn = HttpConn::connect(proxy.addr()).await;
    conn.send(b"GET /slow HTTP/1.1\r\nHost: wsp").await;
    let started = Instant::now();
    let response = conn.response(false).await;
    assert_eq!(response.status, 408, "{}", response.head);
    assert!(response.says_close(), "{}", response.head);
    assert!(window(started.elapsed()), "{:?}", started.elapsed());
    assert_eq!(conn.until_closed().await, b"");

    // Not a byte: a silent close.
    let mut conn = HttpConn::connect(proxy.addr()).await;
    let started = Instant::now();
    assert_eq!(
        conn.until_closed().await,
        b"",
        "nothing is answered to nothing"
    );
    assert!(window(started.elapsed()), "{:?}", started.elapsed());

    // Idle between requests past `keepalive`: a silent close.
    let mut conn = HttpConn::connect(proxy.addr()).await;
    conn.send(&get("/then-idle")).await;
    assert_eq!(conn.response(false).await.status, 200);
    let started = Instant::now();
    assert_eq!(
        conn.until_closed().await,
        b"",
        "keep-alive expiry says nothing"
    );
    assert!(window(started.elapsed()), "{:?}", started.elapsed());

    // A request body that stops coming: closed after `idle`.
    let mut conn = HttpConn::connect(proxy.addr()).await;
    conn.send(b"POST /stalled HTTP/1.1\r\nHost: wsplice.test\r\nContent-Length: 10\r\n\r\nhalf!")
        .await;
    let started = Instant::now();
    conn.until_closed().await;
    assert!(window(started.elapsed()), "{:?}", started.elapsed());

    // An upstream that never answers: 504 after `response`.
    let mut config = ProxyConfig::new(&[silent.addr()]);
    config.response = Some("1s");
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut conn = HttpConn::connect(proxy.addr()).await;
    let started = Instant::now();
    conn.send(&get("/never")).await;
    let response = conn.response(false).await;
    assert_eq!(response.status, 504, "{}", response.head);
    assert!(response.says_close(), "{}", response.head);
    assert!(window(started.elapsed()), "{:?}", started.elapsed());
    assert_eq!(conn.until_closed().await, b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_responses_are_502_and_their_connection_is_not_reused() {
    let cases: [(&str, &[u8]); 5] = [
        ("bad status line", b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok"),
        (
            "Content-Length with Transfer-Encoding",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        ("invalid Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok"),
        ("two Content-Lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
        ("101 to a plain request", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
    ];
    for (what, bad) in cases {
        let upstream = Recorder::answering(Arc::new(move |request: &Request| {
            if request.target == "/bad" {
                bad.to_vec()
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood".to_vec()
            }
        }))
        .await;
        let mut config = ProxyConfig::new(&[upstream.addr()]);
        config.workers = 1;
        let proxy = Proxy::start(DataPath::Userspace, &config);
        let mut conn = HttpConn::connect(proxy.addr()).await;
        conn.send(&get("/bad")).await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 502, "{what}: {}", response.head);
        assert!(response.says_close(), "{what}: {}", response.head);
        assert_eq!(conn.until_closed().await, b"", "{what}");
        // The next request goes to a fresh upstream connection; the bad one got nothing more.
        let mut conn = HttpConn::connect(proxy.addr()).await;
        conn.send(&get("/good")).await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{what}: {}", response.head);
        assert_eq!(response.text(), "good", "{what}");
        let per_connection = upstream.bytes();
        assert_eq!(per_connection.len(), 2, "{what}: {per_connection:?}");
        let lines: Vec<Vec<String>> = per_connection
            .iter()
            .map(|bytes| {
                let (requests, rest) = parse_requests(bytes);
                assert!(
                    rest.is_empty(),
                    "{what}: {:?}",
                    String::from_utf8_lossy(&rest)
                );
                requests.iter().map(Request::line).collect()
            })
            .collect();
        assert_eq!(
            lines,
            [vec!["GET /bad".to_owned()], vec!["GET /good".to_owned()]],
            "{what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_without_length_is_read_until_the_upstream_closes_then_the_client_is_closed() {
    let upstream = Scripted::start(|mut stream, _, _| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            .await;
        for i in 0..5 {
            let _ = stream.write_all(format!("part {i}\n").as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Dropping the stream ends the body.
    })
    .await;
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[upstream.addr()]));
    let mut conn = HttpConn::connect(proxy.addr()).await;
    conn.send(&get("/until-close")).await;
    // No length: the client reads until the proxy closes too.
    let response = conn.response(false).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.text(), "part 0\npart 1\npart 2\npart 3\npart 4\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_request() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let mut conn = HttpConn::connect(proxy.addr()).await;
    for path in ["/log/1", "/log/2", "/log/3"] {
        conn.send(&get(path)).await;
        assert_eq!(conn.response(false).await.status, 200);
    }
    conn.send(&post("/log/4", b"body")).await;
    assert_eq!(conn.response(false).await.status, 200);
    drop(conn);
    let lines = proxy.wait_access_lines(4);
    let paths: Vec<&str> = lines.iter().filter_map(|l| l["path"].as_str()).collect();
    assert_eq!(paths, ["/log/1", "/log/2", "/log/3", "/log/4"], "{lines:?}");
    assert!(lines.iter().all(|l| l["status"] == 200), "{lines:?}");
    assert!(
        lines.iter().all(|l| l["client"] == lines[0]["client"]),
        "{lines:?}"
    );
}

/// A Socket.IO server from the tests' venv, stopped by PID on drop.
struct SocketIoServer {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl SocketIoServer {
    fn start() -> SocketIoServer {
        let dir = scratch_dir("socketio");
        let log = dir.join("requests.log");
        let port = free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/socketio_server.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(port.to_string())
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .expect("python with python-socketio (`cargo xtask test` makes .tools/python)");
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for_port(addr, &mut child, "socketio server", &dir.join("stderr.log"));
        SocketIoServer { child, addr, log }
    }

    /// The HTTP requests it got: `METHOD target upgrade`.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for SocketIoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the Socket.IO client through `url`; checks it long-polled first, upgraded to websocket,
/// and round-tripped its events.
fn socketio_round_trip(server: &SocketIoServer, url: &str, ca: Option<&Path>, what: &str) {
    let before = server.requests().len();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/socketio_client.py");
    let mut command = Command::new(python());
    command.arg(&script).arg(url);
    if let Some(ca) = ca {
        command.arg(ca);
    }
    let stdout = run_bounded(command, &format!("{what}: the socketio client"));
    let value: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(value["transports"][2], "websocket", "{what}: {value}");
    assert_eq!(value["acked"], 20, "{what}: {value}");
    assert_eq!(value["pushed"], 20, "{what}: {value}");
    let sid = value["sid"].as_str().unwrap_or_default().to_owned();
    let requests = server.requests()[before..].to_vec();
    let polling = requests
        .iter()
        .position(|r| r.starts_with("GET /socket.io/") && r.contains("transport=polling"))
        .unwrap_or_else(|| panic!("{what}: no long-polling request: {requests:?}"));
    let upgrade = requests
        .iter()
        .position(|r| r.contains("transport=websocket") && r.ends_with(" websocket"))
        .unwrap_or_else(|| panic!("{what}: no websocket upgrade: {requests:?}"));
    assert!(polling < upgrade, "{what}: {requests:?}");
    assert!(
        requests.iter().all(|r| r.contains("/socket.io/")),
        "{what}: {requests:?}"
    );
    assert!(
        !sid.is_empty() && requests[upgrade].contains(&format!("sid={sid}")),
        "{what}: the upgraded session is the polled one: {requests:?}"
    );
}

#[test]
fn socketio_long_polls_then_upgrades_to_websocket_through_ws_and_wss() {
    let server = SocketIoServer::start();
    let ca = TestCa::new();
    let leaf = ca.issue("leaf", &["localhost"]);
    for datapath in datapaths() {
        let proxy = Proxy::start(datapath, &ProxyConfig::new(&[server.addr]));
        socketio_round_trip(
            &server,
            &format!("http://{}", proxy.addr()),
            None,
            &format!("ws {datapath:?}"),
        );
        let lines = proxy.access_lines();
        assert!(
            lines.iter().any(|l| l["status"] == 101),
            "{datapath:?}: the upgrade went through the proxy: {lines:?}"
        );
        let mut config = ProxyConfig::new(&[server.addr]);
        config.tls = Some(tls_table(&leaf, ""));
        let proxy = Proxy::start(datapath, &config);
        socketio_round_trip(
            &server,
            &format!("https://localhost:{}", proxy.addr().port()),
            Some(&ca.ca_pem()),
            &format!("wss {datapath:?}"),
        );
    }
}
