//! The upstream's answer to a plain request: its head, parsed (httparse), sans-IO.

use crate::handshake::{with_header_slots, HeadLimits, Header, ResponseError};

/// A complete response head from the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// The reason phrase as sent (may be empty).
    pub reason: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub http_minor: u8,
    /// Every header, in order, as received.
    pub headers: Vec<Header>,
    /// Length of the head, final CRLF included.
    pub head_len: usize,
}

impl ResponseHead {
    /// An interim answer (1xx): another head follows.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// The upstream keeps the connection open after this answer (HTTP/1.1 without
    /// `Connection: close`).
    pub fn keeps_alive(&self) -> bool {
        self.http_minor == 1
            && !crate::handshake::has_token(
                self.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                    .map(|h| h.value.as_slice()),
                "close",
            )
    }
}

/// Parses the upstream's response head from the start of `buf`; `Ok(None)`: read more.
pub fn parse_response_head(
    buf: &[u8],
    limits: &HeadLimits,
) -> Result<Option<ResponseHead>, ResponseError> {
    with_header_slots(limits.max_headers, |slots| read(buf, limits, slots))
}

fn read<'b>(
    buf: &'b [u8],
    limits: &HeadLimits,
    slots: &mut [httparse::Header<'b>],
) -> Result<Option<ResponseHead>, ResponseError> {
    let mut response = httparse::Response::new(slots);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > limits.max_bytes => {
            return Err(ResponseError::TooLarge(limits.max_bytes))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_bytes => {
            return Err(ResponseError::TooLarge(limits.max_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(ResponseError::Malformed(error.to_string())),
    };
    // httparse takes any three digits; a status outside the five classes (RFC 9110 §15) has no
    // meaning to relay, and `020` would reach the client as `20`.
    let status = response.code.unwrap_or_default();
    if !(100..=599).contains(&status) {
        return Err(ResponseError::Malformed(format!(
            "status {status:03} is not in 100-599"
        )));
    }
    Ok(Some(ResponseHead {
        status,
        reason: response.reason.unwrap_or_default().to_owned(),
        http_minor: response.version.unwrap_or_default(),
        headers: Header::owned(response.headers),
        head_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 1024,
        max_headers: 16,
    };

    #[test]
    fn a_head_is_read_once_complete() {
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
        assert_eq!(parse_response_head(&bytes[..20], &LIMITS), Ok(None));
        let head = parse_response_head(bytes, &LIMITS).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.reason, "OK");
        assert_eq!(head.head_len, bytes.len() - 2);
        assert!(head.keeps_alive());
        assert!(!head.is_interim());
    }

    #[test]
    fn http_1_0_and_connection_close_do_not_keep_alive() {
        let old = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n", &LIMITS)
            .unwrap()
            .unwrap();
        assert!(!old.keeps_alive());
        let closing = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: Close\r\n\r\n", &LIMITS)
            .unwrap()
            .unwrap();
        assert!(!closing.keeps_alive());
    }

    #[test]
    fn statuses_outside_the_five_classes_are_malformed() {
        // Found by the response_head fuzz target: `020` was relayed as a final answer `20`.
        for head in [
            &b"HTTP/1.1 020\n\r\n"[..],
            b"HTTP/1.1 000 Zero\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"HTTP/1.1 600 High\r\n\r\n",
            b"HTTP/1.1 999 High\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_response_head(head, &LIMITS),
                    Err(ResponseError::Malformed(_))
                ),
                "{head:?}"
            );
        }
        for status in [100, 101, 200, 599] {
            let head = format!("HTTP/1.1 {status} X\r\n\r\n");
            let parsed = parse_response_head(head.as_bytes(), &LIMITS);
            assert_eq!(parsed.map(|h| h.map(|h| h.status)), Ok(Some(status)));
        }
    }

    #[test]
    fn garbage_and_oversized_heads_are_errors() {
        assert!(parse_response_head(b"HTTP/1.1 abc\r\n\r\n", &LIMITS).is_err());
        let huge = vec![b'a'; 2048];
        assert!(parse_response_head(&huge, &LIMITS).is_err());
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(vec![b'a'; 2048]);
        assert_eq!(
            parse_response_head(&long, &LIMITS),
            Err(ResponseError::TooLarge(1024))
        );
    }
}
