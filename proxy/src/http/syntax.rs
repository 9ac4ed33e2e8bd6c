//! The few ABNF rules of RFC 9110 §5.6 that framing and chunked parsing share.

/// `tchar` (RFC 9110 §5.6.2): the bytes a token is made of.
pub(super) fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// `token = 1*tchar`.
pub(super) fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|&b| is_tchar(b))
}

/// Space or horizontal tab: the only whitespace of `OWS`/`BWS`.
pub(super) fn is_ows(byte: u8) -> bool {
    byte == b' ' || byte == b'\t'
}

/// `bytes` without leading and trailing `OWS`. Unlike `trim_ascii` this keeps CR, LF and
/// form feed, which are never whitespace in a field value and must stay visible to checks.
pub(super) fn trim_ows(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_ows(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// A field value's bytes: visible ASCII, obs-text, SP and HTAB (RFC 9110 §5.5); no other
/// control character (NUL, CR, LF, DEL, ...).
pub(super) fn is_field_value_byte(byte: u8) -> bool {
    is_ows(byte) || (0x21..=0x7e).contains(&byte) || byte >= 0x80
}

/// Up to 64 bytes of `bytes` as text, for error messages that go to the log.
pub(super) fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let shown = &bytes[..bytes.len().min(MAX)];
    let mut text = String::from_utf8_lossy(shown).into_owned();
    if bytes.len() > MAX {
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_token(b"chunked"));
        assert!(is_token(b"x-Gzip!~"));
        assert!(!is_token(b""));
        assert!(!is_token(b"a b"));
        assert!(!is_token(b"a;b"));
        assert!(!is_token(b"a\"b"));
        assert!(!is_token(b"caf\xe9"));
    }

    #[test]
    fn ows_trimming_keeps_other_whitespace() {
        assert_eq!(trim_ows(b" \t5\t "), b"5");
        assert_eq!(trim_ows(b"  "), b"");
        assert_eq!(trim_ows(b""), b"");
        assert_eq!(trim_ows(b"\r5\n"), b"\r5\n");
        assert_eq!(trim_ows(b"5 5"), b"5 5");
    }

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt(b"abc"), "abc");
        assert_eq!(excerpt(&[b'a'; 100]).len(), 67);
    }
}
