//! Strict request framing on plain HTTP/1.1 (issue #12): every ambiguous or malformed request
//! gets its status, `Connection: close` and the close, and the upstream — a recording raw
//! listener that logs every byte — never receives bytes it could read as another request.

use std::sync::Arc;
use std::time::Duration;

use wsplice_tests::http::*;
use wsplice_tests::*;

/// A request the upstream must never see; its marker must never reach it.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: wsplice.test\r\n\r\n";
const MARKER: &[u8] = b"smuggled";

/// A head from `lines` (CRLF-joined, blank line added) followed by `body`.
fn req(lines: &[&str], body: &str) -> Vec<u8> {
    let mut bytes = lines.join("\r\n").into_bytes();
    bytes.extend_from_slice(b"\r\n\r\n");
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// `POST /` with `Transfer-Encoding: chunked` and `chunks` as the body, then the smuggled
/// request.
fn chunked(chunks: &str) -> Vec<u8> {
    req(
        &[
            "POST /chunks HTTP/1.1",
            "Host: wsplice.test",
            "Transfer-Encoding: chunked",
        ],
        &format!("{chunks}{SMUGGLED}"),
    )
}

/// A head from raw text (bare CR/LF cases) with the smuggled request after it.
fn raw(text: &str) -> Vec<u8> {
    format!("{text}{SMUGGLED}").into_bytes()
}

struct Case {
    name: &'static str,
    request: Vec<u8>,
    /// The accepted statuses of each response, in order.
    answers: Vec<&'static [u16]>,
    /// The requests (`METHOD /path`) the upstream gets, in order: the legitimate ones answered.
    forwarded: Vec<&'static str>,
    /// The proxy may have started streaming a request whose body then turned out malformed:
    /// the upstream may hold an incomplete request (never a complete extra one).
    partial_ok: bool,
    /// The connection is closed after the last answer even when it succeeded.
    closes: bool,
}

fn refused(name: &'static str, request: Vec<u8>, status: &'static [u16]) -> Case {
    Case {
        name,
        request,
        answers: vec![status],
        forwarded: vec![],
        partial_ok: false,
        closes: true,
    }
}

fn bad_chunks(name: &'static str, chunks: &str) -> Case {
    Case {
        partial_ok: true,
        ..refused(name, chunked(chunks), &[400])
    }
}

fn served(name: &'static str, request: Vec<u8>, forwarded: Vec<&'static str>) -> Case {
    Case {
        name,
        request,
        answers: vec![&[200]; forwarded.len()],
        forwarded,
        partial_ok: false,
        closes: false,
    }
}

const H: &str = "Host: wsplice.test";
/// A request inside a Content-Length body: only a body.
const INSIDE: &str = "GET /inside-body HTTP/1.1\r\nHost: wsplice\r\n\r\n";
const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";

fn cases() -> Vec<Case> {
    let s = SMUGGLED;
    let mut cases = vec![
        // Content-Length and Transfer-Encoding together, or Content-Length ambiguous.
        refused(
            "CL then TE (CL.TE)",
            req(
                &[
                    "POST / HTTP/1.1",
                    H,
                    "Content-Length: 5",
                    "Transfer-Encoding: chunked",
                ],
                &format!("0\r\n\r\n{s}"),
            ),
            &[400],
        ),
        refused(
            "TE then CL (TE.CL)",
            req(
                &[
                    "POST / HTTP/1.1",
                    H,
                    "Transfer-Encoding: chunked",
                    "Content-Length: 4",
                ],
                &format!("5c\r\n{s}\r\n0\r\n\r\n"),
            ),
            &[400],
        ),
        refused(
            "GET with CL: 0 and TE",
            req(
                &[
                    "GET / HTTP/1.1",
                    H,
                    "Content-Length: 0",
                    "Transfer-Encoding: chunked",
                ],
                &format!("0\r\n\r\n{s}"),
            ),
            &[400],
        ),
        refused(
            "two equal Content-Lengths",
            req(
                &[
                    "POST / HTTP/1.1",
                    H,
                    "Content-Length: 5",
                    "Content-Length: 5",
                ],
                &format!("hello{s}"),
            ),
            &[400],
        ),
        refused(
            "Content-Length: 5, 5",
            req(
                &["POST / HTTP/1.1", H, "Content-Length: 5, 5"],
                &format!("hello{s}"),
            ),
            &[400],
        ),
        refused(
            "two different Content-Lengths",
            req(
                &[
                    "POST / HTTP/1.1",
                    H,
                    "Content-Length: 5",
                    "Content-Length: 50",
                ],
                &format!("hello{s}"),
            ),
            &[400],
        ),
    ];
    for (name, value) in [
        ("Content-Length: +5", "+5"),
        ("Content-Length: -1", "-1"),
        ("Content-Length: 0x5", "0x5"),
        ("empty Content-Length", ""),
        ("Content-Length overflow", "99999999999999999999999"),
        ("Content-Length: 5a", "5a"),
        ("Content-Length: 5 5", "5 5"),
    ] {
        let header: &'static str = Box::leak(format!("Content-Length: {value}").into_boxed_str());
        cases.push(refused(
            name,
            req(&["POST / HTTP/1.1", H, header], &format!("hello{s}")),
            &[400],
        ));
    }
    for (name, lines, status) in [
        (
            "TE: chunked, chunked",
            &["Transfer-Encoding: chunked, chunked"][..],
            &[400][..],
        ),
        (
            "TE: chunked on two lines",
            &["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"][..],
            &[400][..],
        ),
        ("empty TE", &["Transfer-Encoding: "][..], &[400][..]),
        (
            "TE: identity",
            &["Transfer-Encoding: identity"][..],
            &[501][..],
        ),
        (
            "TE: foo, chunked",
            &["Transfer-Encoding: foo, chunked"][..],
            &[501][..],
        ),
        (
            "TE: xchunked",
            &["Transfer-Encoding: xchunked"][..],
            &[501][..],
        ),
        (
            "TE: chunked then TE: x (TE.TE)",
            &["Transfer-Encoding: chunked", "Transfer-Encoding: x"][..],
            &[400, 501][..],
        ),
        (
            "TE with a vertical tab",
            &["Transfer-Encoding: \x0bchunked"][..],
            &[400, 501][..],
        ),
        (
            "space before the colon of TE",
            &["Transfer-Encoding : chunked"][..],
            &[400][..],
        ),
        (
            "obs-fold of TE",
            &["Transfer-Encoding:", " chunked"][..],
            &[400][..],
        ),
        (
            "obs-fold of another header",
            &["X-A: 1", "\tcontinued"][..],
            &[400][..],
        ),
    ] {
        let mut head = vec!["POST / HTTP/1.1", H];
        head.extend_from_slice(lines);
        let status: &'static [u16] = Box::leak(status.to_vec().into_boxed_slice());
        cases.push(refused(name, req(&head, &format!("0\r\n\r\n{s}")), status));
    }
    cases.extend([
        refused(
            "TE on HTTP/1.0",
            req(
                &["POST / HTTP/1.0", H, "Transfer-Encoding: chunked"],
                &format!("0\r\n\r\n{s}"),
            ),
            &[400],
        ),
        refused(
            "space before the colon of Content-Length",
            req(
                &["POST / HTTP/1.1", H, "Content-Length : 5"],
                &format!("hello{s}"),
            ),
            &[400],
        ),
        refused(
            "the first header line starts with a space",
            req(
                &["POST / HTTP/1.1", " Transfer-Encoding: chunked", H],
                &format!("0\r\n\r\n{s}"),
            ),
            &[400],
        ),
        // Bare LF and bare CR in the head.
        refused(
            "bare LF ends the request line",
            raw("GET / HTTP/1.1\nHost: a\r\n\r\n"),
            &[400],
        ),
        refused(
            "bare LF ends a header line",
            raw("GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n"),
            &[400],
        ),
        refused(
            "bare LF ends the head",
            raw("GET / HTTP/1.1\r\nHost: a\r\n\n"),
            &[400],
        ),
        refused("bare LF only", raw("GET / HTTP/1.1\nHost: a\n\n"), &[400]),
        refused(
            "bare CR in a header value",
            raw("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n"),
            &[400],
        ),
        refused(
            "bare CR ends a header line",
            raw("GET / HTTP/1.1\r\nX: a\rHost: a\r\n\r\n"),
            &[400],
        ),
        refused(
            "NUL in a header value",
            raw("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n"),
            &[400],
        ),
        refused(
            "a header line without a colon",
            raw("GET / HTTP/1.1\r\nHost: a\r\nGarbage\r\n\r\n"),
            &[400],
        ),
        refused(
            "an empty header name",
            raw("GET / HTTP/1.1\r\nHost: a\r\n: value\r\n\r\n"),
            &[400],
        ),
        refused(
            "a space inside a header name",
            raw("GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n"),
            &[400],
        ),
        // Chunked framing errors.
        bad_chunks("chunk size 0x5", "0x5\r\nhello\r\n0\r\n\r\n"),
        bad_chunks("chunk size -1", "-1\r\nhello\r\n0\r\n\r\n"),
        bad_chunks("empty chunk size", "\r\nhello\r\n0\r\n\r\n"),
        bad_chunks(
            "17 hex digits of chunk size",
            "00000000000000005\r\nhello\r\n0\r\n\r\n",
        ),
        bad_chunks("a space after the chunk size", "5 \r\nhello\r\n0\r\n\r\n"),
        bad_chunks("a space before the chunk size", " 5\r\nhello\r\n0\r\n\r\n"),
        bad_chunks("a non-hex chunk size", "g\r\nhello\r\n0\r\n\r\n"),
        bad_chunks("an empty chunk extension", "5;\r\nhello\r\n0\r\n\r\n"),
        bad_chunks(
            "an unterminated quoted extension",
            "5;a=\"b\r\nhello\r\n0\r\n\r\n",
        ),
        bad_chunks("no CRLF after chunk data", "5\r\nhelloXX0\r\n\r\n"),
        bad_chunks("bare LF after the chunk size", "5\nhello\r\n0\r\n\r\n"),
        bad_chunks("bare LF after chunk data", "5\r\nhello\n0\r\n\r\n"),
        bad_chunks("bare LF after the last chunk", "5\r\nhello\r\n0\n\r\n"),
        bad_chunks("bare LF ending the trailers", "5\r\nhello\r\n0\r\n\n"),
        // Request-line oddities.
        refused(
            "two spaces after the method",
            raw("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
            &[400],
        ),
        refused("no version", raw("GET /\r\nHost: a\r\n\r\n"), &[400]),
        refused(
            "HTTP/2.0",
            raw("GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
            &[400, 505],
        ),
        refused(
            "tabs as separators",
            raw("GET\t/\tHTTP/1.1\r\nHost: a\r\n\r\n"),
            &[400],
        ),
        refused(
            "a space after the version",
            raw("GET / HTTP/1.1 \r\nHost: a\r\n\r\n"),
            &[400],
        ),
        refused(
            "a space before the method",
            raw(" GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            &[400],
        ),
        refused(
            "lowercase version",
            raw("GET / http/1.1\r\nHost: a\r\n\r\n"),
            &[400],
        ),
        refused(
            "absolute-form naming another host",
            raw("GET http://evil.test/ HTTP/1.1\r\nHost: wsplice.test\r\n\r\n"),
            &[400],
        ),
        refused(
            "CONNECT",
            raw("CONNECT wsplice.test:443 HTTP/1.1\r\nHost: wsplice.test:443\r\n\r\n"),
            &[405],
        ),
        refused(
            "no Host on HTTP/1.1",
            raw("GET / HTTP/1.1\r\nX: y\r\n\r\n"),
            &[400],
        ),
        refused(
            "two Host headers",
            raw("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            &[400],
        ),
        refused(
            "TLS bytes on a plain listener",
            b"\x16\x03\x01\x00\x05hello\r\n\r\n".to_vec(),
            &[400],
        ),
        // Broken WebSocket handshakes keep today's answers.
        refused(
            "websocket upgrade without a key",
            req(
                &[
                    "GET / HTTP/1.1",
                    H,
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Version: 13",
                ],
                s,
            ),
            &[400],
        ),
        refused(
            "websocket upgrade by POST",
            req(
                &[
                    "POST / HTTP/1.1",
                    H,
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    KEY,
                    "Sec-WebSocket-Version: 13",
                ],
                s,
            ),
            &[405],
        ),
        refused(
            "websocket version 8",
            req(
                &[
                    "GET / HTTP/1.1",
                    H,
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    KEY,
                    "Sec-WebSocket-Version: 8",
                ],
                s,
            ),
            &[426],
        ),
        // What is valid is served, once, in order.
        served(
            "lowercase method",
            req(&["get /lower HTTP/1.1", H], ""),
            vec!["get /lower"],
        ),
        served(
            "absolute-form naming the Host",
            req(&["GET http://wsplice.test/abs HTTP/1.1", H], ""),
            vec!["GET /abs"],
        ),
        served(
            "TE: Chunked in capitals",
            req(
                &["POST /caps HTTP/1.1", H, "Transfer-Encoding: Chunked"],
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            vec!["POST /caps"],
        ),
        served(
            "TE with whitespace around chunked",
            req(
                &["POST /ows HTTP/1.1", H, "Transfer-Encoding: \t chunked \t"],
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            vec!["POST /ows"],
        ),
        served(
            "a valid chunk extension and a trailer",
            req(
                &["POST /ext HTTP/1.1", H, "Transfer-Encoding: chunked"],
                "5;name=value\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
            ),
            vec!["POST /ext"],
        ),
        served(
            "a GET with Content-Length: 0",
            req(&["GET /zero HTTP/1.1", H, "Content-Length: 0"], ""),
            vec!["GET /zero"],
        ),
        served(
            "a body holding a request is only a body",
            req(
                &[
                    "POST /carrier HTTP/1.1",
                    H,
                    &format!("Content-Length: {}", INSIDE.len()),
                ],
                INSIDE,
            ),
            vec!["POST /carrier"],
        ),
        served(
            "a POST with a Content-Length body then a GET, pipelined",
            [
                req(&["POST /first HTTP/1.1", H, "Content-Length: 5"], "hello"),
                req(&["GET /second HTTP/1.1", H], ""),
            ]
            .concat(),
            vec!["POST /first", "GET /second"],
        ),
        served(
            "a chunked POST then a GET, pipelined",
            [
                req(
                    &["POST /first HTTP/1.1", H, "Transfer-Encoding: chunked"],
                    "5\r\nhello\r\n0\r\n\r\n",
                ),
                req(&["GET /second HTTP/1.1", H], ""),
            ]
            .concat(),
            vec!["POST /first", "GET /second"],
        ),
        served(
            "three pipelined GETs",
            [
                req(&["GET /1 HTTP/1.1", H], ""),
                req(&["GET /2 HTTP/1.1", H], ""),
                req(&["GET /3 HTTP/1.1", H], ""),
            ]
            .concat(),
            vec!["GET /1", "GET /2", "GET /3"],
        ),
        Case {
            closes: true,
            ..served(
                "HTTP/1.0 is served, then closed",
                raw("GET /ten HTTP/1.0\r\nHost: a\r\n\r\n"),
                vec!["GET /ten"],
            )
        },
        Case {
            closes: true,
            ..served(
                "nothing after Connection: close is read",
                raw("GET /closing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
                vec!["GET /closing"],
            )
        },
        Case {
            answers: vec![&[200], &[400]],
            closes: true,
            ..served(
                "a good GET then CL with TE",
                [
                    req(&["GET /good HTTP/1.1", H], ""),
                    req(
                        &[
                            "POST / HTTP/1.1",
                            H,
                            "Content-Length: 5",
                            "Transfer-Encoding: chunked",
                        ],
                        &format!("0\r\n\r\n{s}"),
                    ),
                ]
                .concat(),
                vec!["GET /good"],
            )
        },
        Case {
            answers: vec![&[200], &[400]],
            closes: true,
            partial_ok: true,
            ..served(
                "a good POST then a bad chunk size",
                [
                    req(&["POST /good HTTP/1.1", H, "Content-Length: 2"], "ok"),
                    chunked("0x5\r\nhello\r\n0\r\n\r\n"),
                ]
                .concat(),
                vec!["POST /good"],
            )
        },
    ]);
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ambiguous_request_is_refused_and_nothing_extra_reaches_the_upstream() {
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let upstream = Recorder::start().await;
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[upstream.addr()]));
    let mut failures = Vec::new();
    for case in &cases {
        let _ = upstream.take();
        if let Err(failure) = run_case(&proxy, &upstream, case).await {
            failures.push(format!(
                "{}: {failure}\n    request: {:?}",
                case.name,
                String::from_utf8_lossy(&case.request)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// One case over a fresh connection: the answers, the close, and what the upstream got.
async fn run_case(proxy: &Proxy, upstream: &Recorder, case: &Case) -> Result<(), String> {
    let mut conn = HttpConn::connect(proxy.addr()).await;
    conn.send(&case.request).await;
    let mut statuses = Vec::new();
    for accepted in &case.answers {
        let response = conn
            .try_response(false)
            .await
            .map_err(|e| format!("after answers {statuses:?}: {e}"))?;
        statuses.push(response.status);
        if !accepted.contains(&response.status) {
            return Err(format!(
                "answered {} where {accepted:?} was expected (answers so far {statuses:?}):\n{}",
                response.status, response.head
            ));
        }
        if response.status >= 400 && !response.says_close() {
            return Err(format!(
                "a {} without Connection: close:\n{}",
                response.status, response.head
            ));
        }
    }
    if case.closes {
        match conn.closed_within(Duration::from_secs(5)).await {
            Some(rest) if rest.is_empty() => {}
            Some(rest) => {
                return Err(format!(
                    "more after the last answer: {:?}",
                    String::from_utf8_lossy(&rest)
                ))
            }
            None => return Err("the connection stayed open after the last answer".into()),
        }
    } else if let Some(rest) = conn.closed_within(Duration::from_millis(100)).await {
        return Err(format!(
            "closed after a successful exchange (then {:?})",
            String::from_utf8_lossy(&rest)
        ));
    }
    drop(conn);
    // Late bytes (a proxy forwarding what it refused) get a moment to arrive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let received = upstream.take();
    let mut lines = Vec::new();
    for bytes in &received {
        if find(bytes, MARKER).is_some() {
            return Err(format!(
                "the upstream received the smuggled bytes: {:?}",
                String::from_utf8_lossy(bytes)
            ));
        }
        let (requests, rest) = parse_requests(bytes);
        lines.extend(requests.iter().map(Request::line));
        if !rest.is_empty() && !case.partial_ok {
            return Err(format!(
                "the upstream received bytes that are no complete request: {:?}",
                String::from_utf8_lossy(&rest)
            ));
        }
    }
    if lines != case.forwarded {
        return Err(format!(
            "the upstream received {lines:?}, not {:?}: {:?}",
            case.forwarded,
            received
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect::<Vec<_>>()
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_does_not_disturb_the_pooled_upstream_connection() {
    // After each refusal, a legitimate request on a new client connection is served from the
    // pool and the upstream sees exactly it: no leftovers of the refused one in front of it.
    let upstream = Recorder::answering(Arc::new(|request: &Request| {
        let body = request.line();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }))
    .await;
    let mut config = ProxyConfig::new(&[upstream.addr()]);
    config.workers = 1;
    let proxy = Proxy::start(DataPath::Userspace, &config);
    for case in cases().iter().filter(|c| c.forwarded.is_empty()).take(20) {
        let mut conn = HttpConn::connect(proxy.addr()).await;
        conn.send(&case.request).await;
        let refusal = conn.response(false).await;
        assert!(refusal.status >= 400, "{}: {}", case.name, refusal.head);
        let mut conn = HttpConn::connect(proxy.addr()).await;
        conn.send(b"GET /after HTTP/1.1\r\nHost: wsplice.test\r\n\r\n")
            .await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "{}: {}", case.name, response.head);
        assert_eq!(response.text(), "GET /after", "{}", case.name);
    }
    for bytes in upstream.bytes() {
        assert!(
            find(&bytes, MARKER).is_none(),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
        let (requests, rest) = parse_requests(&bytes);
        assert!(
            requests.iter().all(|r| r.line() == "GET /after"),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
        // A partial chunked request (streamed before the error) ends its connection: nothing
        // is sent after it.
        assert!(
            find(&rest, b"GET /after").is_none(),
            "a request was sent behind an unfinished one: {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
}
