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

/// The largest TLS record payload a peer may send (2^14 bytes, RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
/// Bytes of a ClientHello split over records waited for before leaving it to rustls (a hello is
/// a few hundred bytes to 2 KB; rustls takes up to 64 KB).
const MAX_HELLO_WAIT: usize = 1 << 15;
/// Extension type of the server name indication (RFC 6066 §3).
const SERVER_NAME_EXTENSION: u16 = 0;
/// `name_type` of a host name in the server name list.
const HOST_NAME: u8 = 0;

/// Where the ClientHello message in the connection's first bytes stands.
enum Hello {
    /// Its records so far end before it does.
    Partial,
    /// The whole message (handshake header and body), joined from its records.
    Complete(Vec<u8>),
    /// Not a ClientHello in handshake records: nothing to wait for.
    Other,
}

/// Joins the payloads of the handshake records at the start of `bytes` until they hold the
/// whole ClientHello.
fn hello(bytes: &[u8]) -> Hello {
    let mut message = Vec::new();
    let mut rest = bytes;
    loop {
        let header: Option<[u8; 5]> = rest.get(..5).and_then(|h| h.try_into().ok());
        let Some([content_type, _, _, high, low]) = header else {
            return Hello::Partial;
        };
        let record_len = usize::from(u16::from_be_bytes([high, low]));
        if content_type != HANDSHAKE_RECORD || record_len == 0 || record_len > MAX_RECORD {
            return Hello::Other;
        }
        let Some(payload) = rest.get(5..5 + record_len) else {
            return Hello::Partial;
        };
        message.extend_from_slice(payload);
        rest = rest.get(5 + record_len..).unwrap_or_default();
        let Some(&[kind, a, b, c]) = message.get(..4) else {
            continue;
        };
        if kind != CLIENT_HELLO {
            return Hello::Other;
        }
        let hello_len = usize::from(a) << 16 | usize::from(u16::from_be_bytes([b, c]));
        if message.len() >= 4 + hello_len {
            message.truncate(4 + hello_len);
            return Hello::Complete(message);
        }
    }
}

/// Whether the connection's first bytes hold the whole ClientHello, so the server name can be
/// read from them (see [`server_name`]). `true` also when waiting is pointless: not a hello in
/// handshake records, or one longer than any client sends (rustls judges those).
pub fn hello_complete(bytes: &[u8]) -> bool {
    !matches!(hello(bytes), Hello::Partial) || bytes.len() >= MAX_HELLO_WAIT
}

/// The host name of the server name extension of the ClientHello at the start of `bytes`, as
/// the client sent it. `None`: no such extension, a malformed or unfinished hello (rustls judges
/// those).
pub fn server_name(bytes: &[u8]) -> Option<String> {
    let Hello::Complete(message) = hello(bytes) else {
        return None;
    };
    let mut body = Reader(message.get(4..)?);
    body.skip(VERSION_AND_RANDOM)?;
    let session_id_len = usize::from(body.u8()?);
    body.skip(session_id_len)?;
    let suites_len = usize::from(body.u16()?);
    body.skip(suites_len)?;
    let compression_len = usize::from(body.u8()?);
    body.skip(compression_len)?;
    let extensions_len = usize::from(body.u16()?);
    let mut extensions = Reader(body.take(extensions_len)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let len = usize::from(extensions.u16()?);
        let mut data = Reader(extensions.take(len)?);
        if kind != SERVER_NAME_EXTENSION {
            continue;
        }
        let list_len = usize::from(data.u16()?);
        let mut list = Reader(data.take(list_len)?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name_len = usize::from(list.u16()?);
            let name = list.take(name_len)?;
            if name_type == HOST_NAME {
                return std::str::from_utf8(name).ok().map(str::to_owned);
            }
        }
        return None;
    }
    None
}

/// Big-endian fields off the front of a byte slice; `None` past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }

    fn skip(&mut self, len: usize) -> Option<()> {
        self.take(len).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }
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

    /// A whole ClientHello record with these extensions after the suites.
    fn hello_with_extensions(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]); // no session id, one suite, no compression
        let mut all = Vec::new();
        for (kind, data) in extensions {
            all.extend(kind.to_be_bytes());
            all.extend((data.len() as u16).to_be_bytes());
            all.extend(data);
        }
        body.extend((all.len() as u16).to_be_bytes());
        body.extend(all);
        let mut message = vec![CLIENT_HELLO, 0];
        message.extend((body.len() as u16).to_be_bytes());
        message.extend(body);
        let mut record = vec![HANDSHAKE_RECORD, 3, 1];
        record.extend((message.len() as u16).to_be_bytes());
        record.extend(message);
        record
    }

    fn sni(name: &str) -> (u16, Vec<u8>) {
        let mut data = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        data.push(HOST_NAME);
        data.extend((name.len() as u16).to_be_bytes());
        data.extend(name.as_bytes());
        (SERVER_NAME_EXTENSION, data)
    }

    #[test]
    fn the_server_name_is_read_from_the_whole_hello_in_one_record_or_many() {
        let record = hello_with_extensions(&[(10, vec![0, 2, 0, 29]), sni("chat.test")]);
        assert_eq!(server_name(&record).as_deref(), Some("chat.test"));
        assert!(hello_complete(&record));
        for len in 0..record.len() {
            assert!(!hello_complete(&record[..len]), "{len} bytes");
            assert_eq!(server_name(&record[..len]), None, "{len} bytes");
        }
        // The same hello in records of 7 bytes each.
        let message = &record[5..];
        let mut split = Vec::new();
        for piece in message.chunks(7) {
            split.extend([HANDSHAKE_RECORD, 3, 1, 0, piece.len() as u8]);
            split.extend(piece);
        }
        assert_eq!(server_name(&split).as_deref(), Some("chat.test"));
        assert!(!hello_complete(&split[..split.len() - 1]));
        assert_eq!(server_name(&hello_with_extensions(&[(10, vec![0])])), None);
        // A lying length inside the extension list: no name, rustls judges the hello.
        let mut lying = hello_with_extensions(&[sni("chat.test")]);
        let last = lying.len() - 10;
        lying[last] = 0xff;
        assert_eq!(server_name(&lying), None);
        assert!(hello_complete(b"GET / HTTP/1.1\r\n"));
    }
}
