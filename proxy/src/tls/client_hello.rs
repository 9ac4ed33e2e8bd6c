//! Reads the client's cipher-suite preference from the first bytes of a TLS connection, before
//! rustls sees them, so the server can pick the suite that is fastest for both ends (see
//! [`super::ServerConfigs`]).
//!
//! Only the start of the first ClientHello is parsed: the record header, the handshake header,
//! the version, random and session id, then the cipher suites up to the first one that is not
//! GREASE. Anything that does not look like that is left to rustls to refuse.

/// What the first bytes say about the client's preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuitePreference {
    /// Not enough bytes yet.
    NeedMore,
    /// The client lists ChaCha20-Poly1305 first: it has no AES hardware (browsers and TLS
    /// libraries put AES first when they have it), so ChaCha20 is faster for it.
    ChaCha20,
    /// The client lists another suite first (AES-GCM).
    Other,
    /// Not a TLS ClientHello (plain HTTP, garbage, a fragmented hello): rustls decides.
    Unknown,
}

/// TLS record content type of handshake messages.
const HANDSHAKE_RECORD: u8 = 0x16;
/// Handshake message type of the ClientHello.
const CLIENT_HELLO: u8 = 0x01;
/// Record header (type, version, length) and handshake header (type, length).
const HEADERS: usize = 5 + 4;
/// Legacy version and random.
const VERSION_AND_RANDOM: usize = 2 + 32;
/// Bytes read before giving up on finding the first suite: past every sane session id and
/// GREASE prefix.
pub const MAX_PEEK: usize = 512;

/// Where the client puts ChaCha20-Poly1305 in its list, from the connection's first bytes.
pub fn suite_preference(bytes: &[u8]) -> SuitePreference {
    match parse(bytes) {
        Some(preference) => preference,
        None if bytes.len() >= MAX_PEEK => SuitePreference::Unknown,
        None => SuitePreference::NeedMore,
    }
}

/// `None` while the bytes end before the answer is known.
fn parse(bytes: &[u8]) -> Option<SuitePreference> {
    let (&content_type, _) = bytes.split_first()?;
    if content_type != HANDSHAKE_RECORD {
        return Some(SuitePreference::Unknown);
    }
    if *bytes.get(5)? != CLIENT_HELLO {
        return Some(SuitePreference::Unknown);
    }
    let session_id_len = usize::from(*bytes.get(HEADERS + VERSION_AND_RANDOM)?);
    let suites_at = HEADERS + VERSION_AND_RANDOM + 1 + session_id_len;
    let suites_len = usize::from(u16::from_be_bytes([
        *bytes.get(suites_at)?,
        *bytes.get(suites_at + 1)?,
    ]));
    let record_len = usize::from(u16::from_be_bytes([*bytes.get(3)?, *bytes.get(4)?]));
    if suites_len % 2 != 0 || suites_at + 2 + suites_len > 5 + record_len {
        // Malformed, or a hello split over several records: not worth a guess.
        return Some(SuitePreference::Unknown);
    }
    let mut at = suites_at + 2;
    while at < suites_at + 2 + suites_len {
        let suite = u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]);
        if !is_grease(suite) {
            return Some(if is_chacha20(suite) {
                SuitePreference::ChaCha20
            } else {
                SuitePreference::Other
            });
        }
        at += 2;
    }
    Some(SuitePreference::Unknown)
}

/// RFC 8701 values (0x0A0A, 0x1A1A, … 0xFAFA) that clients sprinkle to keep servers tolerant.
fn is_grease(suite: u16) -> bool {
    suite & 0x0f0f == 0x0a0a && (suite >> 8) == (suite & 0xff)
}

/// TLS 1.3 `TLS_CHACHA20_POLY1305_SHA256` and the TLS 1.2 ECDHE ChaCha20 suites.
fn is_chacha20(suite: u16) -> bool {
    matches!(suite, 0x1303 | 0xcca8 | 0xcca9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record as far as the cipher suites (and a little after).
    fn hello(session_id: &[u8], suites: &[u16]) -> Vec<u8> {
        let mut body = vec![CLIENT_HELLO, 0, 0, 0, 3, 3];
        body.extend([7u8; 32]);
        body.push(session_id.len() as u8);
        body.extend(session_id);
        body.extend(((suites.len() * 2) as u16).to_be_bytes());
        for suite in suites {
            body.extend(suite.to_be_bytes());
        }
        body.extend([1, 0]); // compression methods
        let mut record = vec![HANDSHAKE_RECORD, 3, 1];
        record.extend((body.len() as u16).to_be_bytes());
        record.extend(body);
        record
    }

    #[test]
    fn first_real_suite_decides() {
        let aes = hello(&[1; 32], &[0x1302, 0x1301, 0x1303]);
        assert_eq!(suite_preference(&aes), SuitePreference::Other);
        let chacha = hello(&[], &[0x1303, 0x1301]);
        assert_eq!(suite_preference(&chacha), SuitePreference::ChaCha20);
        let tls12_chacha = hello(&[], &[0xcca9, 0xc02b]);
        assert_eq!(suite_preference(&tls12_chacha), SuitePreference::ChaCha20);
    }

    #[test]
    fn grease_is_skipped() {
        let chrome_like = hello(&[9; 32], &[0x3a3a, 0x1303, 0x1301]);
        assert_eq!(suite_preference(&chrome_like), SuitePreference::ChaCha20);
        assert!(is_grease(0xfafa) && is_grease(0x0a0a));
        assert!(!is_grease(0x0a1a) && !is_grease(0x1301));
    }

    #[test]
    fn every_prefix_needs_more_until_the_first_suite_is_in() {
        let record = hello(&[5; 16], &[0x1301, 0x1303]);
        let first_suite_end = HEADERS + VERSION_AND_RANDOM + 1 + 16 + 2 + 2;
        for len in 0..first_suite_end {
            assert_eq!(
                suite_preference(&record[..len]),
                SuitePreference::NeedMore,
                "prefix of {len} bytes"
            );
        }
        assert_eq!(
            suite_preference(&record[..first_suite_end]),
            SuitePreference::Other
        );
    }

    #[test]
    fn anything_else_is_left_to_rustls() {
        assert_eq!(
            suite_preference(b"GET / HTTP/1.1\r\n"),
            SuitePreference::Unknown
        );
        let mut not_hello = hello(&[], &[0x1303]);
        not_hello[5] = 0x02;
        assert_eq!(suite_preference(&not_hello), SuitePreference::Unknown);
        // Suites that run past the record: a fragmented or lying hello.
        let mut lying = hello(&[], &[0x1303]);
        let at = HEADERS + VERSION_AND_RANDOM + 1;
        lying[at..at + 2].copy_from_slice(&0x4000u16.to_be_bytes());
        assert_eq!(suite_preference(&lying), SuitePreference::Unknown);
        // Only GREASE, or an endless stream of bytes that never completes a hello.
        assert_eq!(
            suite_preference(&hello(&[], &[0x2a2a])),
            SuitePreference::Unknown
        );
        let mut long = vec![HANDSHAKE_RECORD, 3, 1, 0xff, 0xff, CLIENT_HELLO];
        long.resize(MAX_PEEK, 0xff);
        assert_eq!(suite_preference(&long), SuitePreference::Unknown);
    }
}
