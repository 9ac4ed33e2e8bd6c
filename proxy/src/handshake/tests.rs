//! Parsing and validating heads: every status, limit and malformed input.

use super::*;

const LIMITS: HeadLimits = HeadLimits {
    max_bytes: 4096,
    max_headers: 32,
};
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request_with(lines: &[&str]) -> Vec<u8> {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

fn valid() -> Vec<u8> {
    request_with(&[
        "GET /chat?room=1 HTTP/1.1",
        "Host: example.com:8080",
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: chat, superchat",
        "Sec-WebSocket-Extensions: permessage-deflate",
    ])
}

fn status_of(lines: &[&str]) -> u16 {
    parse_request(&request_with(lines), &LIMITS)
        .expect_err("must be rejected")
        .status()
}

fn base(except: &str) -> Vec<&'static str> {
    [
        "Host: a",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    .into_iter()
    .filter(|line| !line.starts_with(except))
    .collect()
}

fn with(first: &'static str, except: &str, extra: &[&'static str]) -> Vec<&'static str> {
    let mut lines = vec![first];
    lines.extend(base(except));
    lines.extend_from_slice(extra);
    lines
}

#[test]
fn a_valid_request_parses_with_its_headers_in_order() {
    let bytes = valid();
    let (request, head_len) = parse_request(&bytes, &LIMITS).unwrap().unwrap();
    assert_eq!(head_len, bytes.len());
    let Request::Upgrade(request) = request else {
        panic!("an upgrade");
    };
    assert_eq!(request.path, "/chat?room=1");
    assert_eq!(request.host, "example.com:8080");
    assert_eq!(request.key, KEY);
    assert_eq!(request.headers.len(), 7);
    assert_eq!(request.headers[6].name, "Sec-WebSocket-Extensions");
    assert_eq!(request.headers[6].value, b"permessage-deflate");
}

#[test]
fn every_split_point_gives_none_until_complete_and_keeps_pipelined_bytes() {
    let mut bytes = valid();
    let head = bytes.len();
    bytes.extend_from_slice(b"\x81\x05hello");
    for cut in 0..head {
        assert_eq!(
            parse_request(&bytes[..cut], &LIMITS),
            Ok(None),
            "cut at {cut}"
        );
    }
    let (_, head_len) = parse_request(&bytes, &LIMITS).unwrap().unwrap();
    assert_eq!(head_len, head);
    assert_eq!(&bytes[head_len..], b"\x81\x05hello");
}

#[test]
fn rejections_carry_their_status() {
    assert_eq!(status_of(&with("POST / HTTP/1.1", "-", &[])), 405);
    assert_eq!(status_of(&with("GET / HTTP/1.0", "-", &[])), 400);
    assert_eq!(status_of(&with("GET / HTTP/1.1", "Host", &[])), 400);
    assert_eq!(status_of(&with("GET / HTTP/1.1", "-", &["Host: b"])), 400);
    assert_eq!(status_of(&with("GET / HTTP/1.1", "Connection", &[])), 426);
    assert_eq!(
        status_of(&with(
            "GET / HTTP/1.1",
            "Connection",
            &["Connection: keep-alive"]
        )),
        426
    );
    assert_eq!(
        status_of(&with("GET / HTTP/1.1", "Sec-WebSocket-Version", &[])),
        426
    );
    assert_eq!(
        status_of(&with(
            "GET / HTTP/1.1",
            "Sec-WebSocket-Version",
            &["Sec-WebSocket-Version: 8"]
        )),
        426
    );
    assert_eq!(
        status_of(&with("GET / HTTP/1.1", "Sec-WebSocket-Key", &[])),
        400
    );
    assert_eq!(
        status_of(&with(
            "GET / HTTP/1.1",
            "Sec-WebSocket-Key",
            &["Sec-WebSocket-Key: c2hvcnQ="]
        )),
        400
    );
    assert_eq!(
        status_of(&with(
            "GET / HTTP/1.1",
            "Sec-WebSocket-Key",
            &["Sec-WebSocket-Key: !!!notbase64!!!"]
        )),
        400
    );
    assert_eq!(
        status_of(&with("GET / HTTP/1.1", "-", &["Content-Length: 0"])),
        400
    );
    assert_eq!(
        status_of(&with(
            "GET / HTTP/1.1",
            "-",
            &["Transfer-Encoding: chunked"]
        )),
        400
    );
    assert_eq!(
        parse_request(b"GARBAGE\x00\r\n\r\n", &LIMITS)
            .unwrap_err()
            .status(),
        400
    );
}

fn plain(bytes: &[u8]) -> PlainRequest {
    match parse_request(bytes, &LIMITS) {
        Ok(Some((Request::Plain(request), _))) => request,
        other => panic!("expected a plain request, got {other:?}"),
    }
}

#[test]
fn requests_without_upgrade_websocket_are_plain_with_their_framing() {
    let get = plain(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!((get.method.as_str(), get.path.as_str()), ("GET", "/a"));
    assert_eq!(get.framing, Framing::None);
    assert!(!get.wants_close());
    let h2c = plain(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n");
    assert_eq!(h2c.framing, Framing::None);
    let post = plain(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(post.framing, Framing::Length(5));
    let chunked = plain(
        b"PUT /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(chunked.framing, Framing::Chunked);
    assert!(chunked.wants_close());
    let old = plain(b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!((old.host.as_str(), old.http_minor), ("", 0));
    assert!(old.wants_close());
    assert!(!plain(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").wants_close());
}

#[test]
fn plain_requests_that_could_be_read_two_ways_are_refused() {
    let status = |bytes: &[u8]| parse_request(bytes, &LIMITS).unwrap_err().status();
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
        400
    );
    assert_eq!(
        status(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: foo, chunked\r\n\r\n"),
        501
    );
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n"), 400);
    assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n"), 400);
    assert_eq!(
        status(b"GET / HTTP/1.1\r\n\r\n"),
        400,
        "HTTP/1.1 needs Host"
    );
    assert_eq!(
        status(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
        405
    );
}

#[test]
fn the_version_answer_names_13() {
    let lines = with(
        "GET / HTTP/1.1",
        "Sec-WebSocket-Version",
        &["Sec-WebSocket-Version: 8"],
    );
    let error = parse_request(&request_with(&lines), &LIMITS).unwrap_err();
    let response = String::from_utf8(error.response()).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{response}"
    );
    assert!(
        response.contains("\r\nSec-WebSocket-Version: 13\r\n"),
        "{response}"
    );
    assert!(response.contains("\r\nConnection: close\r\n"), "{response}");
}

#[test]
fn tokens_are_case_insensitive_and_may_span_several_lines() {
    let lines = with(
        "GET / HTTP/1.1",
        "Upgrade",
        &["Upgrade: foo", "Upgrade:  WebSocket , bar"],
    );
    assert!(parse_request(&request_with(&lines), &LIMITS)
        .unwrap()
        .is_some());
}

#[test]
fn limits_give_431() {
    let small = HeadLimits {
        max_bytes: 64,
        max_headers: 32,
    };
    let error = parse_request(&valid(), &small).unwrap_err();
    assert_eq!(error, RequestError::HeadTooLarge(64));
    assert_eq!(error.status(), 431);
    let few = HeadLimits {
        max_bytes: 4096,
        max_headers: 3,
    };
    let error = parse_request(&valid(), &few).unwrap_err();
    assert_eq!(error, RequestError::TooManyHeaders(3));
    assert_eq!(error.status(), 431);
}

#[test]
fn accept_key_matches_rfc_6455() {
    assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn responses_are_judged() {
    let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
    assert_eq!(
        parse_response(ok, KEY, &LIMITS),
        Ok(Some(UpstreamAnswer::Upgraded {
            head_len: ok.len() - 2
        }))
    );
    assert_eq!(parse_response(&ok[..40], KEY, &LIMITS), Ok(None));
    let wrong = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n";
    assert!(parse_response(wrong, KEY, &LIMITS).is_err());
    let no_upgrade = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    assert!(parse_response(no_upgrade, KEY, &LIMITS).is_err());
    let forbidden = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!";
    assert_eq!(
        parse_response(forbidden, KEY, &LIMITS),
        Ok(Some(UpstreamAnswer::Refused {
            status: 403,
            head_len: forbidden.len() - 5,
            body: BodyLength::Known(5)
        }))
    );
    let chunked = b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(matches!(
        parse_response(chunked, KEY, &LIMITS),
        Ok(Some(UpstreamAnswer::Refused {
            body: BodyLength::UntilClose,
            ..
        }))
    ));
    let empty = b"HTTP/1.1 204 No Content\r\n\r\n";
    assert!(matches!(
        parse_response(empty, KEY, &LIMITS),
        Ok(Some(UpstreamAnswer::Refused {
            body: BodyLength::Known(0),
            ..
        }))
    ));
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    assert_eq!(
        parse_response(interim, KEY, &LIMITS),
        Err(ResponseError::Interim(100))
    );
    assert!(parse_response(b"NOT HTTP\r\n\r\n", KEY, &LIMITS).is_err());
}
