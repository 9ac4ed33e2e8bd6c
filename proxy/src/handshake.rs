//! Request heads as seen by a proxy, and the WebSocket opening handshake (RFC 6455 §4),
//! sans-IO.
//!
//! [`parse_request`] turns the client's bytes into a validated [`Request`] — a WebSocket
//! [`UpgradeRequest`] or a [`PlainRequest`] to pass through with its body framing — or a
//! [`RequestError`] that knows its HTTP status; [`parse_response`] judges the upstream's answer
//! to an upgrade. Both work on a prefix of the stream: `Ok(None)` means "read more".

use crate::http::{parse_response_head, request_framing, Framing, RequestFramingError};
use crate::target::{is_valid_host, normalize, TargetError};
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 §1.3, appended to the key to compute `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Limits on a request or response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Largest head in bytes, final CRLF included.
    pub max_bytes: usize,
    /// Most header lines.
    pub max_headers: usize,
}

/// One header as received: original name spelling, raw value bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name as sent.
    pub name: String,
    /// Value bytes as sent (not necessarily UTF-8).
    pub value: Vec<u8>,
}

impl Header {
    /// Owned copies of the headers httparse found.
    pub fn owned(headers: &[httparse::Header<'_>]) -> Vec<Header> {
        headers
            .iter()
            .map(|h| Header {
                name: h.name.to_owned(),
                value: h.value.to_vec(),
            })
            .collect()
    }
}

/// A validated WebSocket Upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// Request target in normal origin form (`crate::target`): what routing matches and the
    /// upstream receives.
    pub path: String,
    /// `Host` header value as sent.
    pub host: String,
    /// `Sec-WebSocket-Key` as sent (base64 of 16 bytes).
    pub key: String,
    /// Every header, in order, as received.
    pub headers: Vec<Header>,
}

/// A plain HTTP request (anything but a WebSocket upgrade), validated, to pass through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRequest {
    /// The method as sent (a token).
    pub method: String,
    /// Request target in normal origin form, as for upgrades.
    pub path: String,
    /// `Host` header value as sent (empty for an HTTP/1.0 request without one).
    pub host: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub http_minor: u8,
    /// Every header, in order, as received.
    pub headers: Vec<Header>,
    /// How the request's body is delimited.
    pub framing: Framing,
}

impl PlainRequest {
    /// The client wants its connection closed after the answer (HTTP/1.0 without
    /// `keep-alive`, or `Connection: close`).
    pub fn wants_close(&self) -> bool {
        let connection = || {
            self.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .map(|h| h.value.as_slice())
        };
        if self.http_minor == 0 {
            return !has_token(connection(), "keep-alive");
        }
        has_token(connection(), "close")
    }
}

/// A client's request: a WebSocket upgrade or a plain request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `Upgrade: websocket`, validated as an opening handshake.
    Upgrade(UpgradeRequest),
    /// Anything else: proxied as HTTP.
    Plain(PlainRequest),
}

impl Request {
    /// The Host header as sent.
    pub fn host(&self) -> &str {
        match self {
            Request::Upgrade(r) => &r.host,
            Request::Plain(r) => &r.host,
        }
    }

    /// The normal request target.
    pub fn path(&self) -> &str {
        match self {
            Request::Upgrade(r) => &r.path,
            Request::Plain(r) => &r.path,
        }
    }

    /// Every header, in order, as received.
    pub fn headers(&self) -> &[Header] {
        match self {
            Request::Upgrade(r) => &r.headers,
            Request::Plain(r) => &r.headers,
        }
    }
}

/// Why a client's request is refused; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed request head: {0}")]
    Malformed(String),
    /// The head grew past the size limit before it was complete.
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// More header lines than allowed.
    #[error("more than {0} request headers")]
    TooManyHeaders(usize),
    /// Not a GET.
    #[error("method {0} is not allowed (WebSocket upgrades use GET)")]
    MethodNotAllowed(String),
    /// Not HTTP/1.1.
    #[error("HTTP/1.{0} is not supported (WebSocket upgrades need HTTP/1.1)")]
    WrongVersion(u8),
    /// No Host header, or more than one.
    #[error("request needs exactly one Host header, found {0}")]
    BadHost(usize),
    /// A Host value that is not a host name or address with an optional port.
    #[error("the Host header is not a valid host name or address")]
    InvalidHost,
    /// A request target that could be read two ways (see [`crate::target`]).
    #[error("bad request target: {0}")]
    BadTarget(#[from] TargetError),
    /// No `Upgrade: websocket`.
    #[error("not a WebSocket upgrade (Upgrade header lacks \"websocket\")")]
    NotWebSocket,
    /// No `upgrade` token in `Connection`.
    #[error("Connection header lacks the \"upgrade\" token")]
    NoConnectionUpgrade,
    /// Missing or unsupported `Sec-WebSocket-Version`.
    #[error("unsupported Sec-WebSocket-Version {0:?} (only 13)")]
    UnsupportedVersion(String),
    /// Missing, repeated or malformed `Sec-WebSocket-Key`.
    #[error("bad Sec-WebSocket-Key: {0}")]
    BadKey(&'static str),
    /// A body-framing header on the Upgrade GET (request smuggling guard).
    #[error("{0} is not allowed on a WebSocket upgrade request")]
    BodyNotAllowed(&'static str),
    /// A line of the head ends in a bare LF, or holds a bare CR (parsers disagree on these).
    #[error("a line of the request head does not end in CRLF")]
    BareLineEnd,
    /// A plain request's body framing cannot be trusted (RFC 9112 §6).
    #[error(transparent)]
    Framing(#[from] RequestFramingError),
    /// `CONNECT`: the proxy does not open tunnels to arbitrary hosts.
    #[error("method CONNECT is not supported")]
    Connect,
}

impl RequestError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_)
            | RequestError::WrongVersion(_)
            | RequestError::BadHost(_)
            | RequestError::InvalidHost
            | RequestError::BadTarget(_)
            | RequestError::BadKey(_)
            | RequestError::BodyNotAllowed(_)
            | RequestError::BareLineEnd => 400,
            RequestError::Framing(error) => error.status(),
            RequestError::MethodNotAllowed(_) | RequestError::Connect => 405,
            RequestError::HeadTooLarge(_) | RequestError::TooManyHeaders(_) => 431,
            RequestError::NotWebSocket
            | RequestError::NoConnectionUpgrade
            | RequestError::UnsupportedVersion(_) => 426,
        }
    }

    /// The complete HTTP answer for this error.
    pub fn response(&self) -> Vec<u8> {
        let status = self.status();
        let extra: &[(&str, &str)] = match self {
            RequestError::MethodNotAllowed(_) => &[("Allow", "GET")],
            RequestError::Connect => &[("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")],
            RequestError::NotWebSocket | RequestError::NoConnectionUpgrade => {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
            }
            RequestError::UnsupportedVersion(_) => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        };
        let body = format!("{}\n", self);
        response_with(status, extra, &body)
    }
}

/// An HTTP error answer for the client: a short text/plain body and `Connection: close`.
pub fn error_response(status: u16, body: &str) -> Vec<u8> {
    response_with(status, &[], body)
}

fn response_with(status: u16, extra: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    out.into_bytes()
}

/// The standard reason phrase of the statuses the proxy answers with.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        501 => "Not Implemented",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Header slots for httparse: on the stack for the usual limits, on the heap beyond (a head is
/// parsed per request, and a plain HTTP request is a few microseconds in all).
pub fn with_header_slots<'b, R>(
    max_headers: usize,
    parse: impl FnOnce(&mut [httparse::Header<'b>]) -> R,
) -> R {
    const ON_STACK: usize = 128;
    if max_headers <= ON_STACK {
        let mut slots: [httparse::Header<'b>; ON_STACK] = [httparse::EMPTY_HEADER; ON_STACK];
        parse(&mut slots[..max_headers])
    } else {
        let mut slots = vec![httparse::EMPTY_HEADER; max_headers];
        parse(&mut slots)
    }
}

/// Parses and validates the client's request head.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((request, head_len)))`: bytes after `head_len`
/// were pipelined by the client (a plain request's body and what follows it, or the tunnel's
/// first bytes).
pub fn parse_request(
    buf: &[u8],
    limits: &HeadLimits,
) -> Result<Option<(Request, usize)>, RequestError> {
    let head = with_header_slots(limits.max_headers, |slots| {
        read_request_head(buf, limits, slots)
    })?;
    let Some(RawRequestHead {
        method,
        version,
        path,
        headers,
        head_len,
    }) = head
    else {
        return Ok(None);
    };
    let wants_websocket = has_token(
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("upgrade"))
            .map(|h| h.value.as_slice()),
        "websocket",
    );
    let request = if wants_websocket {
        if method != "GET" {
            return Err(RequestError::MethodNotAllowed(method));
        }
        if version != 1 {
            return Err(RequestError::WrongVersion(version));
        }
        Request::Upgrade(validate(path, headers)?)
    } else {
        Request::Plain(validate_plain(method, version, path, headers)?)
    };
    Ok(Some((request, head_len)))
}

/// A request head as httparse read it, before validation.
struct RawRequestHead {
    method: String,
    version: u8,
    path: String,
    headers: Vec<Header>,
    head_len: usize,
}

/// The request head at the start of `buf`, if complete, with its lines checked for CRLF.
fn read_request_head<'b>(
    buf: &'b [u8],
    limits: &HeadLimits,
    slots: &mut [httparse::Header<'b>],
) -> Result<Option<RawRequestHead>, RequestError> {
    let mut request = httparse::Request::new(slots);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > limits.max_bytes => {
            return Err(RequestError::HeadTooLarge(limits.max_bytes))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_bytes => {
            return Err(RequestError::HeadTooLarge(limits.max_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::TooManyHeaders(limits.max_headers))
        }
        Err(error) => return Err(RequestError::Malformed(error.to_string())),
    };
    if !lines_end_in_crlf(&buf[..head_len]) {
        return Err(RequestError::BareLineEnd);
    }
    Ok(Some(RawRequestHead {
        method: request.method.unwrap_or_default().to_owned(),
        version: request.version.unwrap_or_default(),
        path: request.path.unwrap_or_default().to_owned(),
        headers: Header::owned(request.headers),
        head_len,
    }))
}

/// Whether every line of `head` ends in CRLF and no CR stands alone: httparse accepts a bare
/// LF as a line end, and a proxy that reads a head differently from its upstream is how
/// requests get smuggled.
fn lines_end_in_crlf(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &byte)| match byte {
        b'\n' => i > 0 && head[i - 1] == b'\r',
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

fn validate_plain(
    method: String,
    http_minor: u8,
    path: String,
    headers: Vec<Header>,
) -> Result<PlainRequest, RequestError> {
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err(RequestError::Connect);
    }
    let hosts: Vec<&[u8]> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value.as_slice())
        .collect();
    let host = match hosts.as_slice() {
        [host] if !host.is_empty() => String::from_utf8_lossy(host).into_owned(),
        // HTTP/1.0 predates Host: such a request matches routes without a host.
        [] if http_minor == 0 => String::new(),
        [_] => return Err(RequestError::BadHost(0)),
        other => return Err(RequestError::BadHost(other.len())),
    };
    if !host.is_empty() && !is_valid_host(&host) {
        return Err(RequestError::InvalidHost);
    }
    let path = normalize(&path, &host)?;
    let framing = request_framing(&headers, http_minor)?;
    Ok(PlainRequest {
        method,
        path,
        host,
        http_minor,
        headers,
        framing,
    })
}

fn validate(path: String, headers: Vec<Header>) -> Result<UpgradeRequest, RequestError> {
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    };
    if values("content-length").next().is_some() {
        return Err(RequestError::BodyNotAllowed("Content-Length"));
    }
    if values("transfer-encoding").next().is_some() {
        return Err(RequestError::BodyNotAllowed("Transfer-Encoding"));
    }
    let hosts: Vec<&[u8]> = values("host").collect();
    let host = match hosts.as_slice() {
        [host] if !host.is_empty() => String::from_utf8_lossy(host).into_owned(),
        [_] => return Err(RequestError::BadHost(0)),
        other => return Err(RequestError::BadHost(other.len())),
    };
    if !is_valid_host(&host) {
        return Err(RequestError::InvalidHost);
    }
    // Routing and the upstream see the same, normal form of the target.
    let path = normalize(&path, &host)?;
    if !has_token(values("upgrade"), "websocket") {
        return Err(RequestError::NotWebSocket);
    }
    if !has_token(values("connection"), "upgrade") {
        return Err(RequestError::NoConnectionUpgrade);
    }
    let versions: Vec<&[u8]> = values("sec-websocket-version").collect();
    match versions.as_slice() {
        [v] if v.trim_ascii() == b"13" => {}
        [] => return Err(RequestError::UnsupportedVersion(String::new())),
        other => {
            let seen = other
                .iter()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RequestError::UnsupportedVersion(seen));
        }
    }
    let keys: Vec<&[u8]> = values("sec-websocket-key").collect();
    let key = match keys.as_slice() {
        [key] => key.trim_ascii(),
        [] => return Err(RequestError::BadKey("missing")),
        _ => return Err(RequestError::BadKey("sent more than once")),
    };
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(decoded) if decoded.len() == 16 => {}
        Ok(_) => return Err(RequestError::BadKey("does not decode to 16 bytes")),
        Err(_) => return Err(RequestError::BadKey("not base64")),
    }
    // Base64 is ASCII, so this conversion is lossless.
    let key = String::from_utf8_lossy(key).into_owned();
    Ok(UpgradeRequest {
        path,
        host,
        key,
        headers,
    })
}

/// Whether any of the comma-separated token lists contains `token` (case-insensitive).
pub fn has_token<'a>(mut lists: impl Iterator<Item = &'a [u8]>, token: &str) -> bool {
    lists.any(|list| {
        list.split(|&b| b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// `Sec-WebSocket-Accept` for `key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// How much body follows a refused upgrade's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// Exactly this many bytes.
    Known(usize),
    /// Until the upstream closes (chunked or unframed).
    UntilClose,
}

/// The upstream's answer to the rewritten request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAnswer {
    /// A valid 101 for our key.
    Upgraded {
        /// Length of the response head.
        head_len: usize,
    },
    /// A final status other than 101: relay it, then close.
    Refused {
        /// The status.
        status: u16,
        /// Length of the response head.
        head_len: usize,
        /// How much body follows.
        body: BodyLength,
    },
}

/// Why an upstream answer cannot be used (502 to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not valid HTTP.
    #[error("malformed response head: {0}")]
    Malformed(String),
    /// Too large.
    #[error("response head larger than {0} bytes")]
    TooLarge(usize),
    /// A 101 that is not a valid WebSocket switch.
    #[error("invalid 101 answer: {0}")]
    BadUpgrade(&'static str),
    /// An interim status other than 101.
    #[error("unexpected interim status {0}")]
    Interim(u16),
}

/// Parses the upstream's response head (possibly a prefix of it).
pub fn parse_response(
    buf: &[u8],
    key: &str,
    limits: &HeadLimits,
) -> Result<Option<UpstreamAnswer>, ResponseError> {
    let Some(head) = parse_response_head(buf, limits)? else {
        return Ok(None);
    };
    let (status, head_len) = (head.status, head.head_len);
    let values = |name: &'static str| {
        head.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    };
    match status {
        101 => {
            if !has_token(values("upgrade"), "websocket") {
                return Err(ResponseError::BadUpgrade("no Upgrade: websocket"));
            }
            if !has_token(values("connection"), "upgrade") {
                return Err(ResponseError::BadUpgrade("no Connection: upgrade"));
            }
            let accepts: Vec<&[u8]> = values("sec-websocket-accept").collect();
            match accepts.as_slice() {
                [accept] if accept.trim_ascii() == accept_key(key).as_bytes() => {
                    Ok(Some(UpstreamAnswer::Upgraded { head_len }))
                }
                [] => Err(ResponseError::BadUpgrade("no Sec-WebSocket-Accept")),
                _ => Err(ResponseError::BadUpgrade("wrong Sec-WebSocket-Accept")),
            }
        }
        100..=199 => Err(ResponseError::Interim(status)),
        _ => {
            let body = if status == 204 || status == 304 {
                BodyLength::Known(0)
            } else if values("transfer-encoding").next().is_some() {
                BodyLength::UntilClose
            } else {
                let lengths: Vec<&[u8]> = values("content-length").collect();
                match lengths.as_slice() {
                    [length] => std::str::from_utf8(length)
                        .ok()
                        .and_then(|s| s.trim().parse::<usize>().ok())
                        .map_or(BodyLength::UntilClose, BodyLength::Known),
                    _ => BodyLength::UntilClose,
                }
            };
            Ok(Some(UpstreamAnswer::Refused {
                status,
                head_len,
                body,
            }))
        }
    }
}

#[cfg(test)]
mod tests;
