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
    Ok(Some(ResponseHead {
        status: response.code.unwrap_or_default(),
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
