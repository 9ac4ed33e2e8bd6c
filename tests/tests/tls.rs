//! `wss://`: TLS termination with real TLS clients (tokio-rustls + tokio-tungstenite, openssl
//! s_client, Python `websockets`), SNI, resumption, bad input, close_notify and half-close.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use rand::{Rng as _, SeedableRng as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::tls::*;
use wsplice_tests::*;

fn tls_proxy(datapath: DataPath, servers: &[std::net::SocketAddr], tls: String) -> Proxy {
    let mut config = ProxyConfig::new(servers);
    config.tls = Some(tls);
    Proxy::start(datapath, &config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_carries_every_size_and_thousands_of_messages_in_order_with_https_headers() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    for datapath in datapaths() {
        // A kernel-path proxy relays TLS tunnels in userspace: wss must work on both.
        let proxy = tls_proxy(datapath, &[echo.addr()], tls_table(&leaf, ""));
        let mut ws = connect_wss(proxy.addr(), "localhost", "/tls", ca.client_config()).await;
        for size in [
            0usize,
            1,
            125,
            126,
            16383,
            16384,
            16385,
            65536,
            1 << 20,
            16 << 20,
        ] {
            let binary =
                Message::binary((0..size).map(|i| (i * 13 + size) as u8).collect::<Vec<_>>());
            bounded(ws.send(binary.clone())).await.expect("send");
            let back = bounded(ws.next()).await.expect("open").expect("message");
            assert!(back == binary, "{datapath:?}: {size} B message changed");
        }
        let (mut sink, mut stream) = ws.split();
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let messages: Vec<Message> = (0..3000)
            .map(|i| {
                let len = rng.random_range(0..20_000);
                Message::text(format!("{i:05}:{}", "x".repeat(len)))
            })
            .collect();
        let expected = messages.clone();
        let sender = tokio::spawn(async move {
            for message in messages {
                sink.send(message).await.expect("send");
            }
            sink
        });
        for (i, want) in expected.iter().enumerate() {
            let got = bounded(stream.next())
                .await
                .expect("open")
                .expect("message");
            assert!(&got == want, "{datapath:?}: message {i} differs");
        }
        let mut sink = sender.await.expect("sender");
        bounded(sink.close()).await.expect("close");
        drop((sink, stream));

        let record = echo.records().pop().expect("echo saw the handshake");
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(header("x-real-ip").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            header("host"),
            Some(format!("localhost:{}", proxy.addr().port()))
        );
        let lines = proxy.wait_access_lines(1);
        let line = lines.last().expect("access line");
        assert_eq!(line["tls"]["sni"], "localhost", "{line}");
        assert_eq!(line["datapath"], "userspace", "{line}");
        assert!(proxy.metrics()["tls_handshakes_total"] >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_unknown_names_get_the_default_or_an_alert_when_strict() {
    let ca = TestCa::new();
    let default = ca.issue("default", &["localhost"]);
    let chat = ca.issue("chat", &["chat.test"]);
    let wild = ca.issue("wild", &["*.example.test"]);
    let echo = Echo::start();
    let sni = format!(
        "sni = [{{ names = [\"chat.test\"], cert = \"{}\", key = \"{}\" }}, \
         {{ names = [\"*.example.test\"], cert = \"{}\", key = \"{}\" }}]",
        chat.cert.display(),
        chat.key.display(),
        wild.cert.display(),
        wild.key.display()
    );
    let lenient = tls_proxy(
        DataPath::Userspace,
        &[echo.addr()],
        tls_table(&default, &sni),
    );
    let strict = tls_proxy(
        DataPath::Userspace,
        &[echo.addr()],
        tls_table(&default, &format!("{sni}, strict_sni = true")),
    );
    // The client checks names against what it asked for, so ask it to trust anything the CA
    // signed and compare the served leaf ourselves.
    for (name, want) in [
        ("chat.test", &chat.der),
        ("a.example.test", &wild.der),
        ("localhost", &default.der),
    ] {
        let stream = tls_connect(lenient.addr(), name, ca.client_config()).await;
        let stream = stream.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(&served_leaf(&stream) == want, "{name}: wrong certificate");
    }
    // An unknown name: the default certificate (which does not carry that name, so a
    // verifying client refuses it) — or, when strict, an alert from the proxy.
    let unknown = tls_connect(lenient.addr(), "other.test", ca.client_config()).await;
    let error = unknown.expect_err("default cert does not cover other.test");
    assert!(
        error.to_string().contains("certificate"),
        "the client refused the default certificate: {error}"
    );
    let refused = tls_connect(strict.addr(), "other.test", ca.client_config()).await;
    let error = refused.expect_err("strict SNI refuses unknown names");
    assert!(
        error.to_string().to_lowercase().contains("alert"),
        "the proxy sent an alert: {error}"
    );
    assert!(eventually(|| strict
        .log()
        .contains("no certificate for this name")));
    // Strict mode still serves the names it knows.
    let mut ws = connect_wss(strict.addr(), "chat.test", "/", ca.client_config()).await;
    bounded(ws.send(Message::text("still fine"))).await.unwrap();
    let back = bounded(ws.next()).await.unwrap().unwrap();
    assert_eq!(back, Message::text("still fine"));
}

/// Runs `openssl s_client` against `addr`, sending an Upgrade request; returns its output.
fn s_client(addr: std::net::SocketAddr, ca: &std::path::Path, args: &[&str]) -> String {
    let request = upgrade_request("/openssl", &[]);
    // Stdin stays open long enough for the 101 and TLS 1.3 tickets to arrive, then EOF.
    s_client_typing(addr, ca, args, &[&request], Duration::from_millis(700))
}

/// Runs `openssl s_client` against `addr` (as `localhost`), writing each of `inputs` to its
/// standard input with `pause` after each, then closing it; returns what it printed.
fn s_client_typing(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    args: &[&str],
    inputs: &[&[u8]],
    pause: Duration,
) -> String {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .arg("-CAfile")
        .arg(ca)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client (install the openssl package)");
    let mut stdin = child.stdin.take().expect("stdin");
    for input in inputs {
        std::io::Write::write_all(&mut stdin, input).expect("write to s_client");
        std::thread::sleep(pause);
    }
    drop(stdin);
    let deadline = Instant::now() + WAIT;
    while !matches!(child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("s_client output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn openssl_resumes_sessions_over_tls12_and_tls13_and_min_version_is_enforced() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    let proxy = tls_proxy(DataPath::Userspace, &[echo.addr()], tls_table(&leaf, ""));
    let dir = scratch_dir("sessions");
    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let session = dir.join(format!("{version}.pem"));
        let session = session.to_str().expect("utf-8 path");
        let first = s_client(proxy.addr(), &ca.ca_pem(), &[flag, "-sess_out", session]);
        assert!(
            first.contains("HTTP/1.1 101 "),
            "{version}: no 101:\n{first}"
        );
        assert!(
            first.contains(&format!("New, {version}")),
            "{version}:\n{first}"
        );
        assert!(
            first.contains("Verify return code: 0"),
            "{version}:\n{first}"
        );
        let second = s_client(proxy.addr(), &ca.ca_pem(), &[flag, "-sess_in", session]);
        assert!(
            second.contains(&format!("Reused, {version}")),
            "{version}: the session was not resumed:\n{second}"
        );
        assert!(
            second.contains("HTTP/1.1 101 "),
            "{version}: no 101:\n{second}"
        );
    }
    let metrics = proxy.metrics();
    assert!(metrics["tls_resumed_total"] >= 2, "{metrics:?}");
    let resumed = proxy
        .wait_access_lines(4)
        .iter()
        .filter(|line| line["tls"]["resumed"] == true)
        .count();
    assert!(resumed >= 2, "access lines show the resumed sessions");

    // Without tickets, TLS 1.2 resumes from the server-side session cache.
    let cache_only = tls_proxy(
        DataPath::Userspace,
        &[echo.addr()],
        tls_table(&leaf, "session_tickets = false"),
    );
    let session = dir.join("cache.pem");
    let session = session.to_str().expect("utf-8 path");
    let args = ["-tls1_2", "-no_ticket"];
    s_client(
        cache_only.addr(),
        &ca.ca_pem(),
        &[&args[..], &["-sess_out", session]].concat(),
    );
    let second = s_client(
        cache_only.addr(),
        &ca.ca_pem(),
        &[&args[..], &["-sess_in", session]].concat(),
    );
    assert!(
        second.contains("Reused, TLSv1.2"),
        "session cache:\n{second}"
    );

    // min_version = "1.3": a client forcing TLS 1.2 is refused with an alert.
    let modern = tls_proxy(
        DataPath::Userspace,
        &[echo.addr()],
        tls_table(&leaf, "min_version = \"1.3\""),
    );
    let old = s_client(modern.addr(), &ca.ca_pem(), &["-tls1_2"]);
    assert!(
        !old.contains("HTTP/1.1 101"),
        "TLS 1.2 was accepted:\n{old}"
    );
    assert!(old.to_lowercase().contains("alert"), "{old}");
    let new = s_client(modern.addr(), &ca.ca_pem(), &["-tls1_3"]);
    assert!(new.contains("HTTP/1.1 101 "), "{new}");
}

/// OpenSSL, not rustls, at the other end of the records the proxy protects itself after a TLS
/// 1.3 handshake: requests over one connection with a key update between them (`K`: OpenSSL
/// asks for ours back), each answered.
#[test]
fn openssl_key_updates_in_both_directions_keep_the_connection_going() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    let proxy = tls_proxy(DataPath::Userspace, &[echo.addr()], tls_table(&leaf, ""));
    // s_client reads its input line by line: a line `K` is its key-update command.
    let output = s_client_typing(
        proxy.addr(),
        &ca.ca_pem(),
        &["-tls1_3", "-crlf"],
        &[
            b"GET /before HTTP/1.1\nHost: localhost\n\n",
            b"K\n",
            b"GET /after-ours HTTP/1.1\nHost: localhost\n\n",
            b"K\n",
            b"GET /after-two HTTP/1.1\nHost: localhost\n\n",
        ],
        Duration::from_millis(300),
    );
    assert_eq!(output.matches("KEYUPDATE").count(), 2, "{output}");
    for path in ["/before", "/after-ours", "/after-two"] {
        assert!(
            output.contains(&format!("wsplice echo: GET {path}")),
            "no answer to {path}:\n{output}"
        );
    }
    assert_eq!(
        output.matches("HTTP/1.1 200 ").count(),
        3,
        "every request answered:\n{output}"
    );
}

#[test]
fn python_websockets_client_echoes_over_wss() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    let proxy = tls_proxy(DataPath::Userspace, &[echo.addr()], tls_table(&leaf, ""));
    let script = format!(
        r#"
import asyncio, ssl, sys
import websockets
async def main():
    ctx = ssl.create_default_context(cafile="{ca}")
    async with websockets.connect("wss://localhost:{port}/python", ssl=ctx, max_size=None) as ws:
        for message in ["hello", "é" * 70000, bytes(range(256)) * 1000]:
            await ws.send(message)
            back = await ws.recv()
            assert back == message, "echo differs"
    print("python ok")
asyncio.run(asyncio.wait_for(main(), 20))
"#,
        ca = ca.ca_pem().display(),
        port = proxy.addr().port()
    );
    let output = Command::new(python())
        .args(["-c", &script])
        .output()
        .expect("a Python with the websockets package (`cargo xtask test` makes .tools/python)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("python ok"),
        "python websockets over wss failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Reads until the peer closes or [`WAIT`]; returns what arrived.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match bounded(stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_input_is_closed_cleanly_without_disturbing_a_live_tunnel() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.tls = Some(tls_table(&leaf, ""));
    config.handshake = "1s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let fds_before = proxy.fd_count();
    let mut live = connect_wss(proxy.addr(), "localhost", "/live", ca.client_config()).await;

    // Plain HTTP on the TLS port: a clear 400.
    let (status, answer) = raw_exchange(proxy.addr(), &upgrade_request("/", &[])).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("TLS"), "{answer}");

    // Garbage: an alert or a close, and the socket is closed.
    let mut garbage = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await
        .unwrap();
    let answer = read_until_closed(&mut garbage).await;
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "alert record or nothing: {answer:?}"
    );

    // Silent client and a client stalled mid-ClientHello: closed at the handshake deadline.
    let started = Instant::now();
    let mut silent = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
    let mut stalled = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01])
        .await
        .unwrap();
    assert!(read_until_closed(&mut silent).await.is_empty());
    read_until_closed(&mut stalled).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}, handshake deadline is 1 s"
    );

    // A client that goes away mid-handshake.
    let stream = bounded(TcpStream::connect(proxy.addr())).await.unwrap();
    drop(stream);

    // The live tunnel never noticed.
    for i in 0..10 {
        let message = Message::text(format!("still here {i}"));
        bounded(live.send(message.clone())).await.unwrap();
        assert_eq!(bounded(live.next()).await.unwrap().unwrap(), message);
    }
    bounded(live.close(None)).await.unwrap();
    drop((live, garbage, silent, stalled));
    assert!(proxy.metrics()["tls_failures_total"] >= 3);
    let log = proxy.log();
    assert!(log.contains("plain HTTP sent to a TLS port"), "{log}");
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(
        eventually(|| proxy.fd_count() <= fds_before),
        "descriptors leaked: {:?}",
        proxy.fd_targets()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_notify_precedes_the_fin_and_a_client_half_close_reaches_the_upstream() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    // Upstream: answers 101, waits for the client's EOF, then sends a frame and closes.
    let upstream = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        stream
            .write_all(&server_frame(b"after your FIN"))
            .await
            .unwrap();
        let _ = stream.shutdown().await;
    })
    .await;
    let proxy = tls_proxy(
        DataPath::Userspace,
        &[upstream.addr()],
        tls_table(&leaf, ""),
    );
    let mut tls = tls_connect(proxy.addr(), "localhost", ca.client_config())
        .await
        .expect("TLS");
    tls.write_all(&upgrade_request("/half", &[])).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = bounded(tls.read(&mut buf)).await.expect("read 101");
        assert!(n > 0, "closed before the 101");
        received.extend_from_slice(&buf[..n]);
    }
    let head_end = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(received.starts_with(b"HTTP/1.1 101 "));
    received.drain(..head_end);
    // Half-close: close_notify + FIN from the client; the upstream still answers.
    bounded(tls.shutdown()).await.expect("client shutdown");
    // A clean end (close_notify seen) reads as Ok(0); a cut one would be an error.
    loop {
        let n = bounded(tls.read(&mut buf))
            .await
            .expect("the proxy ends the stream with close_notify, not a cut");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
    }
    assert_eq!(received, server_frame(b"after your FIN"));
    let lines = proxy.wait_access_lines(1);
    assert_eq!(lines[0]["reason"], "both sides closed", "{:?}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_wss_tunnel_is_closed_and_a_slow_reader_keeps_memory_bounded() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    // Upstream floods 256 MiB as fast as the proxy takes it.
    let flood = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        let chunk = vec![0x82u8; 1 << 20];
        for _ in 0..256 {
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
        }
    })
    .await;
    let mut config = ProxyConfig::new(&[flood.addr()]);
    config.tls = Some(tls_table(&leaf, ""));
    config.idle = "10s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let rss_before = proxy.rss_kib();
    let mut tls = tls_connect(proxy.addr(), "localhost", ca.client_config())
        .await
        .expect("TLS");
    tls.write_all(&upgrade_request("/slow", &[])).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = bounded(tls.read(&mut buf)).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101 "));
    let head_end = buf[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("101 head in the first read")
        + 4;
    // The reader stalls: the proxy may hold one relay buffer, the sockets their buffers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = proxy.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 16 * 1024,
        "proxy RSS grew {grown} KiB behind a stalled TLS reader"
    );
    // Then every byte arrives, and the stream ends with close_notify (Ok(0), not an error).
    let mut total = n - head_end;
    loop {
        let n = bounded(tls.read(&mut buf)).await.expect("clean end");
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|&b| b == 0x82), "payload corrupted");
        total += n;
    }
    assert_eq!(total, 256 << 20, "bytes lost behind a slow TLS reader");
    drop(tls);

    // Idle: a tunnel with no traffic is closed after `idle`.
    let quiet = Scripted::start(|mut stream, head, _| async move {
        stream.write_all(&switching_protocols(&head)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let mut config = ProxyConfig::new(&[quiet.addr()]);
    config.tls = Some(tls_table(&leaf, ""));
    config.idle = "1s";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let mut ws = connect_wss(proxy.addr(), "localhost", "/idle", ca.client_config()).await;
    let started = Instant::now();
    let end = bounded(ws.next()).await;
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "idle close after {waited:?}"
    );
    let lines = proxy.wait_access_lines(1);
    assert!(
        lines[0]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("idle timeout"),
        "{:?}",
        lines[0]
    );
}

/// `wsplice check` on a config whose listener uses `tls`; returns (success, stderr).
fn check_tls(dir: &std::path::Path, tls: &str) -> (bool, String) {
    let config = dir.join(format!("check-{}.toml", rand::random::<u32>()));
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nbind = \"127.0.0.1:8443\"\ntls = {tls}\n\n[[route]]\nupstream = \"default\"\n\n\
             [upstream.default]\nservers = [\"127.0.0.1:9001\"]\n"
        ),
    )
    .unwrap();
    let output = Command::new(binary())
        .arg("check")
        .arg(&config)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (install the openssl package)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_reads_every_key_format_and_reports_unreadable_or_mismatched_pairs() {
    let ca = TestCa::new();
    let one = ca.issue("one", &["localhost"]);
    let two = ca.issue("two", &["localhost"]);
    let dir = scratch_dir("check-tls");
    let path = |name: &str| dir.join(name).display().to_string();

    // PKCS#8 (rcgen), SEC1 EC and PKCS#1 RSA keys (openssl) are all served.
    assert_eq!(check_tls(&dir, &tls_table(&one, "")), (true, String::new()));
    openssl(&[
        "ec",
        "-in",
        one.key.to_str().unwrap(),
        "-out",
        &path("sec1.key"),
    ]);
    let sec1 = std::fs::read_to_string(path("sec1.key")).unwrap();
    assert!(sec1.contains("BEGIN EC PRIVATE KEY"), "{sec1}");
    let (ok, stderr) = check_tls(&dir, &files_table(&one.cert, &dir.join("sec1.key"), ""));
    assert!(ok, "SEC1 key refused: {stderr}");
    openssl(&["genrsa", "-traditional", "-out", &path("rsa.key"), "2048"]);
    openssl(&[
        "req",
        "-new",
        "-x509",
        "-key",
        &path("rsa.key"),
        "-out",
        &path("rsa.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=localhost",
    ]);
    assert!(std::fs::read_to_string(path("rsa.key"))
        .unwrap()
        .contains("BEGIN RSA PRIVATE KEY"));
    let (ok, stderr) = check_tls(
        &dir,
        &files_table(&dir.join("rsa.pem"), &dir.join("rsa.key"), ""),
    );
    assert!(ok, "PKCS#1 RSA key refused: {stderr}");

    // A key from another certificate.
    let (ok, stderr) = check_tls(&dir, &files_table(&one.cert, &two.key, ""));
    assert!(!ok);
    assert!(stderr.contains("does not match certificate"), "{stderr}");
    assert!(
        stderr.contains("127.0.0.1:8443"),
        "names the listener: {stderr}"
    );
    // Missing files and files without PEM.
    let (ok, stderr) = check_tls(&dir, &files_table(&dir.join("missing.pem"), &one.key, ""));
    assert!(
        !ok && stderr.contains("missing.pem") && stderr.contains("cannot read"),
        "{stderr}"
    );
    std::fs::write(path("empty.pem"), "not a certificate\n").unwrap();
    let (ok, stderr) = check_tls(&dir, &files_table(&dir.join("empty.pem"), &one.key, ""));
    assert!(!ok && stderr.contains("BEGIN CERTIFICATE"), "{stderr}");
    let (ok, stderr) = check_tls(&dir, &files_table(&one.cert, &one.cert, ""));
    assert!(!ok && stderr.contains("private key"), "{stderr}");
}

/// Sends `request` over TLS and reads until the proxy ends the stream; the end must be a clean
/// one (close_notify), returned as the whole answer.
async fn tls_exchange(addr: std::net::SocketAddr, ca: &TestCa, request: &[u8]) -> String {
    let mut tls = tls_connect(addr, "localhost", ca.client_config())
        .await
        .expect("TLS");
    tls.write_all(request).await.expect("write request");
    let mut answer = Vec::new();
    bounded(tls.read_to_end(&mut answer))
        .await
        .expect("the answer ends with close_notify, not a cut");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_refused_upgrades_are_answered_inside_tls_then_closed_cleanly() {
    let ca = TestCa::new();
    let leaf = ca.issue("localhost", &["localhost"]);
    let refusing = Scripted::start(|mut stream, _, _| async move {
        let body = "members only";
        let answer = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(answer.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let mut config = ProxyConfig::new(&[refusing.addr()]);
    config.tls = Some(tls_table(&leaf, ""));
    config.route_extra = "path_prefix = \"/app\"";
    let proxy = Proxy::start(DataPath::Userspace, &config);

    let answer = tls_exchange(proxy.addr(), &ca, &upgrade_request("/elsewhere", &[])).await;
    assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    let answer = tls_exchange(
        proxy.addr(),
        &ca,
        b"POST /app HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405 "), "{answer}");
    let answer = tls_exchange(proxy.addr(), &ca, &upgrade_request("/app", &[])).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(answer.ends_with("members only"), "{answer}");
    let statuses: Vec<u64> = proxy
        .wait_access_lines(3)
        .iter()
        .filter_map(|line| line["status"].as_u64())
        .collect();
    assert_eq!(statuses, [404, 405, 403]);
}
