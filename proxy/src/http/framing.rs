//! Which bytes after a head are its body (RFC 9112 §6), decided from the head alone.
//!
//! Requests are judged strictly: anything two parsers could read two ways (both
//! `Content-Length` and `Transfer-Encoding`, repeated lengths, odd digits, a coding list that
//! does not end in exactly one `chunked`) is refused, because the proxy forwards the body
//! verbatim and an upstream that framed it differently would see a smuggled request.
//! Responses are judged as RFC 9112 §6.3 says, except that a response carrying both framing
//! headers, or lengths that disagree, is refused (502) rather than guessed at.

use crate::handshake::Header;

use super::syntax::{excerpt, is_token, trim_ows};

/// How a message's body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: the next message starts right after the head.
    None,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// The chunked transfer coding (RFC 9112 §7.1), ending with the last chunk and trailers.
    Chunked,
    /// Everything until the sender closes the connection (responses only).
    UntilClose,
}

/// Why a request's framing is refused; each maps to an HTTP status (400 or 501).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestFramingError {
    /// Both `Content-Length` and `Transfer-Encoding` (the classic smuggling vector).
    #[error("request has both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    /// More than one length, as several header lines or a comma list, even if all agree.
    #[error("request has {0} Content-Length values (exactly one is allowed)")]
    RepeatedLength(usize),
    /// A length that is not 1 or more ASCII digits fitting in 64 bits.
    #[error("invalid Content-Length {0:?}")]
    InvalidLength(String),
    /// `Transfer-Encoding` on an HTTP/1.0 request, which cannot carry it (RFC 9112 §6.1).
    #[error("Transfer-Encoding is not allowed on an HTTP/1.0 request")]
    EncodingOnHttp10,
    /// An empty `Transfer-Encoding` value or list item, or an item that is not a coding.
    #[error("malformed Transfer-Encoding {0:?}")]
    MalformedEncoding(String),
    /// A transfer coding the proxy does not know (or one with parameters).
    #[error("unsupported transfer coding {0:?}")]
    UnsupportedCoding(String),
    /// The codings do not end in `chunked`, so the body's end cannot be found.
    #[error("Transfer-Encoding {0:?} does not end in chunked")]
    ChunkedNotFinal(String),
    /// `chunked` applied more than once (RFC 9112 §6.1 forbids it).
    #[error("Transfer-Encoding {0:?} applies chunked more than once")]
    ChunkedRepeated(String),
}

impl RequestFramingError {
    /// The HTTP status this error is answered with: 501 for a coding the proxy does not
    /// implement (RFC 9112 §6.1), 400 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            RequestFramingError::UnsupportedCoding(_) => 501,
            RequestFramingError::LengthAndEncoding
            | RequestFramingError::RepeatedLength(_)
            | RequestFramingError::InvalidLength(_)
            | RequestFramingError::EncodingOnHttp10
            | RequestFramingError::MalformedEncoding(_)
            | RequestFramingError::ChunkedNotFinal(_)
            | RequestFramingError::ChunkedRepeated(_) => 400,
        }
    }
}

/// Why an upstream response's framing is unusable (the proxy answers 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseFramingError {
    /// Both `Content-Length` and `Transfer-Encoding`.
    #[error("response has both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    /// Several `Content-Length` values that disagree.
    #[error("response has conflicting Content-Length values {0:?}")]
    ConflictingLengths(String),
    /// A length that is not 1 or more ASCII digits fitting in 64 bits.
    #[error("invalid Content-Length {0:?}")]
    InvalidLength(String),
}

/// Transfer codings the proxy knows (RFC 9112 §7). Only `chunked` is ever decoded; the others
/// are passed through untouched inside the chunked framing.
const KNOWN_CODINGS: [&str; 6] = [
    "chunked",
    "gzip",
    "x-gzip",
    "deflate",
    "compress",
    "x-compress",
];

/// How a request's body is framed (RFC 9112 §6.1–6.3). `http_minor` is the `x` of
/// `HTTP/1.x`, 0 or 1.
///
/// A request with neither `Content-Length` nor `Transfer-Encoding` has no body
/// ([`Framing::None`]); a request is never framed by the connection closing.
pub fn request_framing(headers: &[Header], http_minor: u8) -> Result<Framing, RequestFramingError> {
    let lengths = values(headers, "content-length");
    let encodings = values(headers, "transfer-encoding");
    match (lengths.is_empty(), encodings.is_empty()) {
        (true, true) => Ok(Framing::None),
        (false, false) => Err(RequestFramingError::LengthAndEncoding),
        (false, true) => request_length(&lengths),
        (true, false) if http_minor == 0 => Err(RequestFramingError::EncodingOnHttp10),
        (true, false) => request_encoding(&encodings),
    }
}

/// How a response to a `request_method` request is framed (RFC 9112 §6.3). `http_minor`
/// is the response's `x` of `HTTP/1.x`.
///
/// `HEAD` responses, 1xx, 204 and 304 have no body whatever their headers say. A
/// `Transfer-Encoding` that does not end in exactly one `chunked`, or any on an HTTP/1.0
/// response, means the body runs until the upstream closes.
pub fn response_framing(
    status: u16,
    request_method: &str,
    headers: &[Header],
    http_minor: u8,
) -> Result<Framing, ResponseFramingError> {
    // Methods are case-sensitive (RFC 9110 §9.1): `head` is not HEAD.
    if request_method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::None);
    }
    let lengths = values(headers, "content-length");
    let encodings = values(headers, "transfer-encoding");
    match (lengths.is_empty(), encodings.is_empty()) {
        (true, true) => Ok(Framing::UntilClose),
        (false, false) => Err(ResponseFramingError::LengthAndEncoding),
        (false, true) => response_length(&lengths),
        // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        (true, false) if http_minor == 0 => Ok(Framing::UntilClose),
        (true, false) if ends_in_single_chunked(&encodings) => Ok(Framing::Chunked),
        (true, false) => Ok(Framing::UntilClose),
    }
}

/// The values of every header named `name` (case-insensitive), in order.
fn values<'a>(headers: &'a [Header], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_slice())
        .collect()
}

/// The comma-separated items of all `lines` as one list, each trimmed of OWS.
fn list_items<'a>(lines: &[&'a [u8]]) -> Vec<&'a [u8]> {
    lines
        .iter()
        .flat_map(|line| line.split(|&b| b == b','))
        .map(trim_ows)
        .collect()
}

/// The header lines joined back as one list, for error messages.
fn joined(lines: &[&[u8]]) -> String {
    excerpt(&lines.join(&b", "[..]))
}

/// `Content-Length = 1*DIGIT` (surrounding OWS allowed), fitting in a u64.
fn parse_length(item: &[u8]) -> Option<u64> {
    if item.is_empty() {
        return None;
    }
    item.iter().try_fold(0u64, |total, &b| {
        let digit = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        total.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn request_length(lines: &[&[u8]]) -> Result<Framing, RequestFramingError> {
    let items = list_items(lines);
    let mut lengths = Vec::with_capacity(items.len());
    for item in &items {
        let length =
            parse_length(item).ok_or_else(|| RequestFramingError::InvalidLength(excerpt(item)))?;
        lengths.push(length);
    }
    match lengths.as_slice() {
        [length] => Ok(Framing::Length(*length)),
        // Strict like nginx: even equal repeats are refused, since some upstreams reject
        // them and a request must mean the same thing to everyone on the path.
        other => Err(RequestFramingError::RepeatedLength(other.len())),
    }
}

fn response_length(lines: &[&[u8]]) -> Result<Framing, ResponseFramingError> {
    let mut agreed = None;
    for item in list_items(lines) {
        let length =
            parse_length(item).ok_or_else(|| ResponseFramingError::InvalidLength(excerpt(item)))?;
        match agreed {
            // RFC 9110 §8.6: identical repeats may be read as one.
            Some(seen) if seen != length => {
                return Err(ResponseFramingError::ConflictingLengths(joined(lines)))
            }
            _ => agreed = Some(length),
        }
    }
    // `list_items` yields at least one item per line, so `agreed` is set; stay total anyway.
    agreed
        .map(Framing::Length)
        .ok_or_else(|| ResponseFramingError::InvalidLength(String::new()))
}

fn request_encoding(lines: &[&[u8]]) -> Result<Framing, RequestFramingError> {
    let items = list_items(lines);
    for item in &items {
        check_coding(item).map_err(|error| match error {
            CodingError::Malformed => RequestFramingError::MalformedEncoding(joined(lines)),
            CodingError::Unsupported => RequestFramingError::UnsupportedCoding(excerpt(item)),
        })?;
    }
    let chunked = items.iter().filter(|item| is_chunked(item)).count();
    if !items.last().is_some_and(|item| is_chunked(item)) {
        return Err(RequestFramingError::ChunkedNotFinal(joined(lines)));
    }
    if chunked > 1 {
        return Err(RequestFramingError::ChunkedRepeated(joined(lines)));
    }
    Ok(Framing::Chunked)
}

/// What is wrong with one transfer-coding item.
enum CodingError {
    /// Not a coding at all: empty, or its name is not a token.
    Malformed,
    /// A well-formed coding the proxy does not implement.
    Unsupported,
}

/// One `transfer-coding` item: a known name, without parameters (none of the known codings
/// takes any, so a parameter means a coding the proxy does not know).
fn check_coding(item: &[u8]) -> Result<(), CodingError> {
    let name = trim_ows(item.split(|&b| b == b';').next().unwrap_or_default());
    if !is_token(name) {
        return Err(CodingError::Malformed);
    }
    let known = KNOWN_CODINGS
        .iter()
        .any(|coding| name.eq_ignore_ascii_case(coding.as_bytes()));
    if !known || name.len() != item.len() {
        return Err(CodingError::Unsupported);
    }
    Ok(())
}

fn is_chunked(item: &[u8]) -> bool {
    item.eq_ignore_ascii_case(b"chunked")
}

fn ends_in_single_chunked(lines: &[&[u8]]) -> bool {
    let items = list_items(lines);
    let chunked = items.iter().filter(|item| is_chunked(item)).count();
    chunked == 1 && items.last().is_some_and(|item| is_chunked(item))
}

#[cfg(test)]
mod tests;
