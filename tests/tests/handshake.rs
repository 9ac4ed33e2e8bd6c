//! The opening handshake as a client and an upstream see it: rejections, forwarded headers.

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::*;

const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";

fn request(lines: &[&str]) -> Vec<u8> {
    let mut text = lines.join("\r\n");
    text.push_str("\r\n\r\n");
    text.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_the_proxy_keeps_serving() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.limits = "max_request_head = 1024\nmax_headers = 10";
    // A route for WebSockets only: plain requests get the 426 they got before plain HTTP was
    // proxied (tests/tests/http.rs covers proxying them).
    config.route_extra = "websocket_only = true";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let upgrade = [
        "Host: a",
        "Upgrade: websocket",
        "Connection: Upgrade",
        KEY,
        "Sec-WebSocket-Version: 13",
    ];
    let without = |skip: &str, first: &'static str, extra: &[&'static str]| {
        let mut lines = vec![first];
        lines.extend(upgrade.iter().copied().filter(|l| !l.starts_with(skip)));
        lines.extend_from_slice(extra);
        request(&lines)
    };
    let long_header = format!("X-Long: {}", "x".repeat(2000));
    let many: Vec<String> = (0..12).map(|i| format!("X-{i}: {i}")).collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let mut too_many = vec!["GET / HTTP/1.1"];
    too_many.extend(upgrade);
    too_many.extend(many_refs);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("POST", without("-", "POST / HTTP/1.1", &[]), 405),
        ("HTTP/1.0", without("-", "GET / HTTP/1.0", &[]), 400),
        ("bare LF", without("-", "GET / HTTP/1.1\nX-A: b", &[]), 400),
        ("garbage", b"\x16\x03\x01 hello\r\n\r\n".to_vec(), 400),
        ("no Host", without("Host", "GET / HTTP/1.1", &[]), 400),
        ("plain GET", request(&["GET / HTTP/1.1", "Host: a"]), 426),
        ("no Upgrade", without("Upgrade", "GET / HTTP/1.1", &[]), 426),
        (
            "no Connection: upgrade",
            without("Connection", "GET / HTTP/1.1", &["Connection: keep-alive"]),
            426,
        ),
        (
            "version 8",
            without(
                "Sec-WebSocket-Version",
                "GET / HTTP/1.1",
                &["Sec-WebSocket-Version: 8"],
            ),
            426,
        ),
        (
            "no key",
            without("Sec-WebSocket-Key", "GET / HTTP/1.1", &[]),
            400,
        ),
        (
            "short key",
            without(
                "Sec-WebSocket-Key",
                "GET / HTTP/1.1",
                &["Sec-WebSocket-Key: c2hvcnQ="],
            ),
            400,
        ),
        (
            "Content-Length",
            without("-", "GET / HTTP/1.1", &["Content-Length: 0"]),
            400,
        ),
        (
            "Transfer-Encoding",
            without("-", "GET / HTTP/1.1", &["Transfer-Encoding: chunked"]),
            400,
        ),
        (
            "head too large",
            {
                let mut lines = vec!["GET / HTTP/1.1"];
                lines.extend(upgrade);
                lines.push(&long_header);
                request(&lines)
            },
            431,
        ),
        ("too many headers", request(&too_many), 431),
    ];
    for (name, bytes, status) in cases {
        let (got, answer) = raw_exchange(proxy.addr(), &bytes).await;
        assert_eq!(got, status, "{name}: {answer}");
        assert!(answer.contains("Connection: close"), "{name}: {answer}");
        if status == 426 && name == "version 8" {
            assert!(
                answer.contains("Sec-WebSocket-Version: 13\r\n"),
                "{name}: {answer}"
            );
        }
    }
    // Still serving, and nothing reached the upstream.
    let mut ws = connect(&proxy.url("/after")).await;
    bounded(ws.send(Message::text("still here"))).await.unwrap();
    assert_eq!(
        bounded(ws.next()).await.unwrap().unwrap(),
        Message::text("still here")
    );
    assert_eq!(echo.records().len(), 1);
    assert!(!proxy.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_is_not_a_trusted_proxy_cannot_forge_where_it_came_from() {
    let echo = Echo::start();
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[echo.addr()]));
    let lines = [
        "GET /who HTTP/1.1",
        "Host: chat.test",
        "Upgrade: websocket",
        "Connection: Upgrade",
        KEY,
        "Sec-WebSocket-Version: 13",
        "X-Forwarded-For: 10.9.8.7",
        "Forwarded: for=10.9.8.7;host=admin.internal",
        "X-Forwarded-Host: admin.internal",
        "X-Forwarded-Port: 8443",
        "Proxy-Authorization: Basic c2VjcmV0",
    ];
    upgrade_raw(proxy.addr(), &request(&lines), "forged forwarding headers").await;
    let record = echo.records().pop().expect("the upstream saw the request");
    assert_eq!(record.values("X-Forwarded-For"), ["127.0.0.1"]);
    for dropped in [
        "Forwarded",
        "X-Forwarded-Host",
        "X-Forwarded-Port",
        "Proxy-Authorization",
    ] {
        assert!(
            record.values(dropped).is_empty(),
            "{dropped}: {:?}",
            record.headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_receives_the_nginx_equivalent_header_set() {
    let echo = Echo::start();
    for datapath in datapaths() {
        // The client is a trusted proxy: the chain it sent is extended, as nginx's
        // `$proxy_add_x_forwarded_for` does.
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.trusted_proxies = "\"127.0.0.0/8\"";
        let proxy = Proxy::start(datapath, &config);
        let before = echo.records().len();
        let lines = [
            "GET /room/1?x=y HTTP/1.1",
            "Origin: http://app.test",
            "Host: chat.test:8080",
            "Upgrade: websocket",
            "Connection: keep-alive, Upgrade, X-Hop",
            "X-Hop: 1",
            KEY,
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Extensions: permessage-deflate",
            "Keep-Alive: timeout=5",
            "X-Custom: 42",
            "X-Forwarded-For: 198.51.100.9",
            "X-Real-IP: 6.6.6.6",
        ];
        upgrade_raw(proxy.addr(), &request(&lines), &format!("{datapath:?}")).await;
        let records = echo.records();
        assert_eq!(records.len(), before + 1, "{datapath:?}");
        let record = &records[before];
        assert_eq!(record.path, "/room/1?x=y");
        let names: Vec<&str> = record.headers.iter().map(|(n, _)| n.as_str()).collect();
        let value = |name: &str| record.values(name);
        assert_eq!(names[0], "Host", "{datapath:?}: {names:?}");
        assert_eq!(value("host"), ["chat.test:8080"]);
        assert_eq!(value("origin"), ["http://app.test"]);
        assert_eq!(value("sec-websocket-protocol"), ["chat, superchat"]);
        assert_eq!(value("sec-websocket-extensions"), ["permessage-deflate"]);
        assert_eq!(value("x-custom"), ["42"]);
        assert_eq!(value("sec-websocket-version"), ["13"]);
        assert_eq!(value("sec-websocket-key").len(), 1);
        assert!(
            value("x-hop").is_empty(),
            "hop-by-hop header forwarded: {names:?}"
        );
        assert!(
            value("keep-alive").is_empty(),
            "hop-by-hop header forwarded: {names:?}"
        );
        assert_eq!(value("X-Real-IP"), ["127.0.0.1"]);
        assert_eq!(value("X-Forwarded-For"), ["198.51.100.9, 127.0.0.1"]);
        assert_eq!(value("X-Forwarded-Proto"), ["http"]);
        assert_eq!(value("Upgrade"), ["websocket"]);
        assert_eq!(value("Connection"), ["upgrade"]);
        // The proxy adds its five headers last, in this order.
        let tail: Vec<&str> = names[names.len() - 5..].to_vec();
        assert_eq!(
            tail,
            [
                "X-Real-IP",
                "X-Forwarded-For",
                "X-Forwarded-Proto",
                "Upgrade",
                "Connection"
            ]
        );
        let kept = [
            "Host",
            "Origin",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Protocol",
            "Sec-WebSocket-Extensions",
            "X-Custom",
        ];
        assert_eq!(
            names[..names.len() - 5],
            kept,
            "{datapath:?}: client order kept, Host first"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.route_extra = "path_prefix = \"/chat\"";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let (status, _) = raw_exchange(proxy.addr(), &upgrade_request("/other", &[])).await;
    assert_eq!(status, 404);
    let mut ws = connect(&proxy.url("/chat/room")).await;
    bounded(ws.send(Message::text("routed"))).await.unwrap();
    assert_eq!(
        bounded(ws.next()).await.unwrap().unwrap(),
        Message::text("routed")
    );
}

/// Routing and the upstream see one normal form of the target: a route for `/chat` cannot be
/// used to reach another path (`..`, encoded dots, doubled slashes), targets that servers read
/// in different ways are refused, and an absolute URI must name the Host it is sent to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_target_is_normalised_before_routing_and_forwarding() {
    let echo = Echo::start();
    let mut config = ProxyConfig::new(&[echo.addr()]);
    config.route_extra = "path_prefix = \"/chat\"";
    let proxy = Proxy::start(DataPath::Userspace, &config);
    let upgrade = |target: &str, host: &str| {
        let first = format!("GET {target} HTTP/1.1");
        let host = format!("Host: {host}");
        request(&[
            &first,
            &host,
            "Upgrade: websocket",
            "Connection: Upgrade",
            KEY,
            "Sec-WebSocket-Version: 13",
        ])
    };
    let refused = [
        ("/chat/../admin", "chat.test", 404),
        ("/chat/%2e%2e/admin", "chat.test", 404),
        ("/chat/%2E%2E/%2e%2e/admin", "chat.test", 400),
        ("/chat\\..\\admin", "chat.test", 400),
        ("/chat%2F..%2Fadmin", "chat.test", 400),
        ("http://admin.internal/chat", "chat.test", 400),
        ("/chat", "chat.test/../admin", 400),
        ("/chat", "user@chat.test", 400),
    ];
    for (target, host, status) in refused {
        let (got, answer) = raw_exchange(proxy.addr(), &upgrade(target, host)).await;
        assert_eq!(got, status, "{target} (Host {host}): {answer}");
    }
    let forwarded = [
        ("//chat/room", "chat.test", "/chat/room"),
        ("/chat/./a/../b?x=/../y", "chat.test", "/chat/b?x=/../y"),
        ("/c%68at", "chat.test", "/chat"),
        ("http://chat.test:8080/chat?q", "chat.test:8080", "/chat?q"),
    ];
    for (target, host, expected) in forwarded {
        let before = echo.records().len();
        upgrade_raw(proxy.addr(), &upgrade(target, host), target).await;
        let records = echo.records();
        assert_eq!(records.len(), before + 1, "{target}");
        assert_eq!(records[before].path, expected, "{target}");
    }
    assert_eq!(
        echo.records().len(),
        forwarded.len(),
        "a refused target reached the upstream"
    );
}
