//! The upstream's answer: `http::parse_response_head` (plain requests), `handshake::parse_response`
//! (the answer to an upgrade: a valid 101 or a refusal relayed as is) and the head the client
//! gets back, `headers::rewrite_response`.
//!
//! Properties: prefixes of a complete head are "read more"; a 101 is accepted only with
//! `Upgrade: websocket`, `Connection: upgrade` and the right `Sec-WebSocket-Accept`; the
//! rewritten head parses back to the same status and reason, carries the upstream's end-to-end
//! headers in order and no hop-by-hop one, says `Connection: close` exactly when asked, and is
//! framed as the proxy relays the body (`http::response_framing`), so the client finds the
//! answer's end where the proxy does.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsplice::handshake::{accept_key, has_token, parse_response, UpstreamAnswer};
use wsplice::headers::rewrite_response;
use wsplice::http::{parse_response_head, response_framing, Framing};
use wsplice_fuzz::{head_limits, is_subsequence, prefix_lengths, values, Input, GENEROUS};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Hop-by-hop headers the client must not get from the upstream (`Transfer-Encoding` aside:
/// the body is relayed in wire form).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let limits = head_limits(input.byte());
    let flags = input.byte();
    let close = flags & 1 != 0;
    let method = if flags & 2 != 0 { "HEAD" } else { "GET" };
    let buf = input.rest();

    let answer = parse_response(buf, KEY, &limits);
    let head = match parse_response_head(buf, &limits) {
        Ok(Some(head)) => head,
        Ok(None) => {
            assert!(buf.len() < limits.max_bytes);
            assert_eq!(answer, Ok(None));
            return;
        }
        Err(_) => {
            assert!(answer.is_err());
            return;
        }
    };
    assert!(head.head_len <= buf.len() && head.head_len <= limits.max_bytes);
    for k in prefix_lengths(head.head_len) {
        assert_eq!(
            parse_response_head(&buf[..k], &limits),
            Ok(None),
            "prefix {k}"
        );
        assert_eq!(
            parse_response(&buf[..k], KEY, &limits),
            Ok(None),
            "prefix {k}"
        );
    }

    // The answer to an upgrade.
    let tokens = |name: &str, token: &str| {
        has_token(
            head.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value.as_slice()),
            token,
        )
    };
    match answer {
        Ok(Some(UpstreamAnswer::Upgraded { head_len })) => {
            assert_eq!(head.status, 101);
            assert_eq!(head_len, head.head_len);
            assert!(tokens("upgrade", "websocket") && tokens("connection", "upgrade"));
            let accepts = values(&head.headers, "sec-websocket-accept");
            assert_eq!(accepts.len(), 1);
            assert_eq!(accepts[0].trim_ascii(), accept_key(KEY).as_bytes());
        }
        Ok(Some(UpstreamAnswer::Refused {
            status, head_len, ..
        })) => {
            assert!(status >= 200, "interim {status} taken as the answer");
            assert_eq!((status, head_len), (head.status, head.head_len));
        }
        Ok(None) => panic!("a complete head judged incomplete"),
        Err(_) => assert!((100..200).contains(&head.status)),
    }

    // The head the client gets for a plain request.
    let framing = response_framing(head.status, method, &head.headers, head.http_minor);
    let rewritten = rewrite_response(head.status, &head.reason, &head.headers, close);
    let again = parse_response_head(&rewritten, &GENEROUS)
        .unwrap_or_else(|e| panic!("rewritten head does not parse: {e}"))
        .expect("the rewritten head is complete");
    assert_eq!(again.head_len, rewritten.len());
    assert_eq!(again.status, head.status);
    assert_eq!(again.reason, head.reason);
    assert_eq!(again.http_minor, 1);
    let connection = values(&again.headers, "connection");
    if close {
        assert_eq!(connection, [b"close"]);
        assert_eq!(
            again.headers.last().map(|h| h.name.as_str()),
            Some("Connection")
        );
    } else {
        assert!(connection.is_empty());
    }
    let end_to_end: Vec<_> = again
        .headers
        .iter()
        .filter(|h| !(close && h.name == "Connection"))
        .cloned()
        .collect();
    assert!(is_subsequence(&end_to_end, &head.headers));
    for h in &end_to_end {
        let name = h.name.to_ascii_lowercase();
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "{name} passed on");
    }
    // The client frames the body as the proxy relays it. An answer that ends with the
    // upstream's close is relayed with `Connection: close`.
    if let Ok(framing) = framing {
        let seen = response_framing(again.status, method, &again.headers, again.http_minor);
        match framing {
            Framing::UntilClose => {}
            framing => assert_eq!(
                seen,
                Ok(framing),
                "the client frames the answer differently"
            ),
        }
    }
});
