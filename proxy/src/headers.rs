//! Header rewriting with nginx's defaults for a WebSocket `proxy_pass` (and plain requests
//! through the same `location`), pure.
//!
//! `Host` is kept, `X-Real-IP` is the client address, `X-Forwarded-Proto` says `http`/`https`,
//! hop-by-hop headers are dropped; an upgrade gets `Upgrade: websocket` /
//! `Connection: upgrade`, a plain request no `Connection` (keep-alive to the upstream), and a
//! plain response loses its hop-by-hop headers on the way back.
//! `X-Forwarded-For` appends the client to what came in (`$proxy_add_x_forwarded_for`) only
//! when the peer is a trusted proxy (`trusted_proxies`); from anyone else it is the client
//! alone, and the client's own `Forwarded`, `X-Forwarded-Host` and `X-Forwarded-Port` are
//! dropped, so an upstream never takes a client's word for where it came from. Route rules
//! come last.

use std::net::IpAddr;

use crate::handshake::{Header, PlainRequest, UpgradeRequest};
use crate::http::Framing;

/// The scheme of the listener a client came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain `ws://` (forwarded as `http`).
    Ws,
    /// TLS `wss://` (forwarded as `https`).
    Wss,
}

impl Scheme {
    /// The value of `X-Forwarded-Proto`.
    pub fn forwarded_proto(self) -> &'static str {
        match self {
            Scheme::Ws => "http",
            Scheme::Wss => "https",
        }
    }
}

/// Who the request came from and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardContext {
    /// The client's address (or the one a trusted PROXY header gave).
    pub client_addr: IpAddr,
    /// The listener's scheme.
    pub scheme: Scheme,
    /// The peer is a trusted proxy: its forwarding headers are passed on.
    pub trusted_peer: bool,
}

/// Per-route rules: headers to set (replace or add) and to remove (case-insensitive names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// `(name, value)` pairs; each replaces every header of that name.
    pub set: Vec<(String, String)>,
    /// Names of headers to drop.
    pub remove: Vec<String>,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the usual extras), never forwarded as sent.
/// `Proxy-Authorization` is the client's credential for this proxy, not for the upstream.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether route header rules may not set or remove `name` (any case): hop-by-hop headers
/// and those that frame the body or make the Upgrade handshake. The proxy writes these from
/// what it read; a rule could make the upstream read a body of another length than the
/// proxy passes on (request smuggling) or break every handshake.
pub fn managed_by_the_proxy(name: &str) -> bool {
    const FRAMING_AND_HANDSHAKE: [&str; 4] = [
        "content-length",
        "transfer-encoding",
        "sec-websocket-key",
        "sec-websocket-version",
    ];
    let name = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&name.as_str()) || FRAMING_AND_HANDSHAKE.contains(&name.as_str())
}

/// Forwarding headers passed on only from a trusted peer (`X-Forwarded-For` is rebuilt).
const FORWARDING: [&str; 3] = ["forwarded", "x-forwarded-host", "x-forwarded-port"];

/// Headers the proxy sets itself; the client's own values are replaced.
const REPLACED: [&str; 3] = ["x-real-ip", "x-forwarded-for", "x-forwarded-proto"];

/// The complete upgrade request head to send upstream, ending in an empty line.
pub fn rewrite_request(req: &UpgradeRequest, ctx: &ForwardContext, rules: &HeaderRules) -> Vec<u8> {
    let mut out = forwarded_headers(&req.headers, ctx);
    out.push(header("Upgrade", b"websocket"));
    out.push(header("Connection", b"upgrade"));
    apply_rules(&mut out, rules);
    serialize_head("GET", &req.path, 1, &out)
}

/// The complete head of a plain request to send upstream (nginx `proxy_pass` with
/// `proxy_http_version 1.1` and an upstream `keepalive`: no `Connection` header, so the
/// upstream connection stays open for the next request). A chunked body is passed on as it
/// came, so its `Transfer-Encoding` is too; an HTTP/1.0 request stays HTTP/1.0 (its answer
/// must not be chunked) and closes.
pub fn rewrite_plain_request(
    req: &PlainRequest,
    ctx: &ForwardContext,
    rules: &HeaderRules,
) -> Vec<u8> {
    let mut out = forwarded_headers(&req.headers, ctx);
    if req.framing == Framing::Chunked {
        out.extend(
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
                .cloned(),
        );
    }
    if req.http_minor == 0 {
        out.push(header("Connection", b"close"));
    }
    apply_rules(&mut out, rules);
    serialize_head(&req.method, &req.path, req.http_minor, &out)
}

/// The request's headers as the upstream gets them, before route rules: Host first, then the
/// end-to-end headers as received, then the forwarding headers the proxy sets.
fn forwarded_headers(headers: &[Header], ctx: &ForwardContext) -> Vec<Header> {
    let named_in_connection = named_in_connection(headers);
    let incoming_xff: Vec<&[u8]> = headers
        .iter()
        .filter(|h| ctx.trusted_peer && h.name.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|h| h.value.trim_ascii())
        .filter(|v| !v.is_empty())
        .collect();

    let mut out: Vec<Header> = Vec::with_capacity(headers.len() + 5);
    // Host first, as the client sent it.
    out.extend(
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"))
            .cloned(),
    );
    out.extend(
        headers
            .iter()
            .filter(|h| {
                let name = h.name.to_ascii_lowercase();
                name != "host"
                    && !HOP_BY_HOP.contains(&name.as_str())
                    && !REPLACED.contains(&name.as_str())
                    && !(FORWARDING.contains(&name.as_str()) && !ctx.trusted_peer)
                    && !named_in_connection.contains(&name)
            })
            .cloned(),
    );
    let client = ctx.client_addr.to_string();
    let mut xff = incoming_xff.join(&b", "[..]);
    if !xff.is_empty() {
        xff.extend_from_slice(b", ");
    }
    xff.extend_from_slice(client.as_bytes());
    out.push(header("X-Real-IP", client.as_bytes()));
    out.push(header("X-Forwarded-For", &xff));
    out.push(header(
        "X-Forwarded-Proto",
        ctx.scheme.forwarded_proto().as_bytes(),
    ));
    out
}

/// Headers a `Connection` list cannot make hop-by-hop: the proxy framed the body, routed the
/// request or checked the handshake with them, and the next hop must read the same (a body
/// whose `Content-Length` was dropped would be read by the upstream as the next request).
const NEVER_HOP_BY_HOP: [&str; 5] = [
    "content-length",
    "transfer-encoding",
    "host",
    "sec-websocket-key",
    "sec-websocket-version",
];

/// Lower-case names listed in `Connection` (hop-by-hop by declaration), `upgrade` and
/// [`NEVER_HOP_BY_HOP`] aside.
fn named_in_connection(headers: &[Header]) -> Vec<String> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|token| String::from_utf8_lossy(token.trim_ascii()).to_ascii_lowercase())
        .filter(|token| {
            !token.is_empty() && token != "upgrade" && !NEVER_HOP_BY_HOP.contains(&token.as_str())
        })
        .collect()
}

/// A response head for the client: the upstream's status line (as HTTP/1.1) and its
/// end-to-end headers; `Transfer-Encoding` stays (the body is passed on as it came), and
/// `Connection: close` is added when the client connection ends after this answer.
pub fn rewrite_response(status: u16, reason: &str, headers: &[Header], close: bool) -> Vec<u8> {
    let named_in_connection = named_in_connection(headers);
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    for h in headers {
        let name = h.name.to_ascii_lowercase();
        let hop_by_hop = name != "transfer-encoding" && HOP_BY_HOP.contains(&name.as_str());
        if hop_by_hop || named_in_connection.contains(&name) {
            continue;
        }
        push_field(&mut head, &h.name, &h.value);
    }
    if close {
        push_field(&mut head, "Connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn serialize_head(method: &str, target: &str, http_minor: u8, headers: &[Header]) -> Vec<u8> {
    let mut head = Vec::with_capacity(1024);
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(if http_minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for h in headers {
        push_field(&mut head, &h.name, &h.value);
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn push_field(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

fn header(name: &str, value: &[u8]) -> Header {
    Header {
        name: name.to_owned(),
        value: value.to_vec(),
    }
}

fn apply_rules(headers: &mut Vec<Header>, rules: &HeaderRules) {
    for name in &rules.remove {
        headers.retain(|h| !h.name.eq_ignore_ascii_case(name));
    }
    for (name, value) in &rules.set {
        if name.contains(['\r', '\n', ':']) || value.chars().any(|c| c.is_control() && c != '\t') {
            // The config loader rejects these; never emit a broken head if one slips through.
            tracing::warn!(%name, "header rule with CR/LF or a control character skipped");
            continue;
        }
        match headers
            .iter()
            .position(|h| h.name.eq_ignore_ascii_case(name))
        {
            Some(first) => {
                headers[first] = header(name, value.as_bytes());
                let mut index = 0;
                headers.retain(|h| {
                    index += 1;
                    index - 1 == first || !h.name.eq_ignore_ascii_case(name)
                });
            }
            None => headers.push(header(name, value.as_bytes())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &[u8])]) -> UpgradeRequest {
        UpgradeRequest {
            path: "/ws?x=1".into(),
            host: "example.com".into(),
            key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
            headers: headers.iter().map(|(n, v)| header(n, v)).collect(),
        }
    }

    fn ctx() -> ForwardContext {
        ForwardContext {
            client_addr: "203.0.113.7".parse().unwrap(),
            scheme: Scheme::Ws,
            trusted_peer: false,
        }
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_browser_request_is_rewritten_like_nginx() {
        let req = request(&[
            ("User-Agent", b"test"),
            ("Upgrade", b"websocket"),
            ("Connection", b"keep-alive, Upgrade"),
            ("Host", b"example.com"),
            ("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", b"13"),
            ("Sec-WebSocket-Protocol", b"chat"),
            ("Keep-Alive", b"timeout=5"),
        ]);
        assert_eq!(
            text(rewrite_request(&req, &ctx(), &HeaderRules::default())),
            "GET /ws?x=1 HTTP/1.1\r\n\
             Host: example.com\r\n\
             User-Agent: test\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: chat\r\n\
             X-Real-IP: 203.0.113.7\r\n\
             X-Forwarded-For: 203.0.113.7\r\n\
             X-Forwarded-Proto: http\r\n\
             Upgrade: websocket\r\n\
             Connection: upgrade\r\n\r\n"
        );
    }

    #[test]
    fn an_untrusted_peer_cannot_say_where_the_request_came_from() {
        let req = request(&[
            ("Host", b"a"),
            ("X-Forwarded-For", b"10.0.0.1"),
            ("Forwarded", b"for=10.0.0.1;proto=https"),
            ("X-Forwarded-Host", b"admin.internal"),
            ("X-Forwarded-Port", b"8443"),
            ("Proxy-Authorization", b"Basic c2VjcmV0"),
            ("X-Other", b"kept"),
        ]);
        let out = text(rewrite_request(&req, &ctx(), &HeaderRules::default()));
        assert!(out.contains("X-Forwarded-For: 203.0.113.7\r\n"), "{out}");
        for gone in [
            "10.0.0.1",
            "Forwarded:",
            "admin.internal",
            "8443",
            "c2VjcmV0",
        ] {
            assert!(!out.contains(gone), "{gone} passed: {out}");
        }
        assert!(out.contains("X-Other: kept\r\n"));
    }

    #[test]
    fn forwarded_for_chains_and_client_values_are_replaced() {
        let req = request(&[
            ("Host", b"a"),
            ("X-Forwarded-For", b"10.0.0.1"),
            ("X-Real-IP", b"1.1.1.1"),
            ("x-forwarded-for", b"10.0.0.2, 10.0.0.3"),
            ("X-Forwarded-Proto", b"https"),
        ]);
        let ctx = ForwardContext {
            scheme: Scheme::Wss,
            trusted_peer: true,
            ..ctx()
        };
        let out = text(rewrite_request(&req, &ctx, &HeaderRules::default()));
        assert!(
            out.contains("X-Forwarded-For: 10.0.0.1, 10.0.0.2, 10.0.0.3, 203.0.113.7\r\n"),
            "{out}"
        );
        assert_eq!(
            out.matches("X-Forwarded-For").count() + out.matches("x-forwarded-for").count(),
            1
        );
        assert!(!out.contains("1.1.1.1"));
        assert!(out.contains("X-Forwarded-Proto: https\r\n"));
    }

    #[test]
    fn headers_named_in_connection_are_dropped() {
        let req = request(&[
            ("Host", b"a"),
            ("Connection", b"Upgrade, X-Hop"),
            ("X-Hop", b"1"),
            ("X-Keep", b"2"),
            ("TE", b"trailers"),
        ]);
        let out = text(rewrite_request(&req, &ctx(), &HeaderRules::default()));
        assert!(!out.contains("X-Hop"), "{out}");
        assert!(!out.contains("TE:"), "{out}");
        assert!(out.contains("X-Keep: 2\r\n"));
    }

    #[test]
    fn rules_remove_and_set_after_the_defaults() {
        let req = request(&[
            ("Host", b"a"),
            ("Cookie", b"s=1"),
            ("X-A", b"old"),
            ("X-A", b"old2"),
        ]);
        let rules = HeaderRules {
            set: vec![("X-A".into(), "new".into()), ("X-B".into(), "b".into())],
            remove: vec!["cookie".into(), "X-Real-IP".into()],
        };
        let out = text(rewrite_request(&req, &ctx(), &rules));
        assert!(!out.contains("Cookie"));
        assert!(!out.contains("X-Real-IP"));
        assert!(out.contains("X-A: new\r\n"));
        assert!(!out.contains("old"));
        assert!(out.contains("X-B: b\r\n"));
    }

    #[test]
    fn non_utf8_values_pass_through_byte_for_byte() {
        let req = request(&[("Host", b"a"), ("X-Bin", b"caf\xe9")]);
        let out = rewrite_request(&req, &ctx(), &HeaderRules::default());
        let needle = b"X-Bin: caf\xe9\r\n";
        assert!(out.windows(needle.len()).any(|w| w == needle));
    }

    /// Found by the header_rewrite fuzz target: `Connection: Content-Length` made the proxy
    /// drop the length it framed the body with, so the upstream read the body as the next
    /// request (smuggling). Framing, Host and the handshake's own headers are never dropped.
    #[test]
    fn connection_cannot_drop_framing_host_or_handshake_headers() {
        let limits = crate::handshake::HeadLimits {
            max_bytes: 1024,
            max_headers: 16,
        };
        let parsed = crate::handshake::parse_request(
            b"POST /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Content-Length, Host, X-Hop\r\n\
              Content-Length: 4\r\nX-Hop: 1\r\n\r\nabcd",
            &limits,
        );
        let Ok(Some((crate::handshake::Request::Plain(plain), _))) = parsed else {
            panic!("{parsed:?}");
        };
        let out = text(rewrite_plain_request(
            &plain,
            &ctx(),
            &HeaderRules::default(),
        ));
        assert!(out.contains("\r\nContent-Length: 4\r\n"), "{out}");
        assert!(out.contains("\r\nHost: a\r\n"), "{out}");
        assert!(!out.contains("X-Hop"), "{out}");

        let upgrade = request(&[
            ("Host", b"a"),
            (
                "Connection",
                b"Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version",
            ),
            ("Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", b"13"),
        ]);
        let out = text(rewrite_request(&upgrade, &ctx(), &HeaderRules::default()));
        assert!(
            out.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Version: 13\r\n"), "{out}");

        let answer = text(rewrite_response(
            200,
            "OK",
            &[
                header("Connection", b"Content-Length, Transfer-Encoding"),
                header("Transfer-Encoding", b"chunked"),
            ],
            false,
        ));
        assert!(
            answer.contains("Transfer-Encoding: chunked\r\n"),
            "{answer}"
        );
    }
}
