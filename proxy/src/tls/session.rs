//! One client's TLS session, sans-IO: ciphertext comes from any `io::Read`, goes out through a
//! byte slice; the worker does the socket I/O around it.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::{HandshakeKind, ServerConnection};

use super::client_hello::{suite_preference, SuitePreference, MAX_PEEK};
use super::ServerConfigs;

/// The TLS state of one client connection.
pub struct TlsSession {
    phase: Phase,
    /// The socket reached end of stream.
    eof: bool,
    /// `close_notify` has been queued.
    closing: bool,
    /// The first bytes the client sent, to recognise plain HTTP sent to a TLS port.
    first: [u8; 8],
    first_len: usize,
    /// The handshake's completion has been reported by [`TlsSession::take_completed`].
    reported: bool,
}

/// Before and after the client's cipher-suite preference is known.
enum Phase {
    /// Reading the start of the ClientHello: the listener's configurations, and the bytes so
    /// far (handed to rustls once the configuration is chosen).
    Hello {
        configs: Arc<ServerConfigs>,
        bytes: Vec<u8>,
    },
    /// rustls has the connection.
    Session(Box<ServerConnection>),
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.is_handshaking())
            .field("eof", &self.eof)
            .field("closing", &self.closing)
            .finish()
    }
}

/// What a finished handshake negotiated, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// `TLSv1_3` or `TLSv1_2`.
    pub version: String,
    /// IANA name of the cipher suite.
    pub suite: String,
    /// The SNI name the client sent.
    pub server_name: Option<String>,
    /// The session was resumed (ticket or cache).
    pub resumed: bool,
}

/// Ciphertext read from the socket per call while the ClientHello starts: room for a whole
/// typical hello (post-quantum key shares included), so rustls gets it in one piece.
const HELLO_READ: usize = 2048;

impl TlsSession {
    /// A new server-side session of a listener with these configurations (one is chosen when
    /// the client's ClientHello arrives).
    pub fn new(configs: &Arc<ServerConfigs>) -> TlsSession {
        TlsSession {
            phase: Phase::Hello {
                configs: Arc::clone(configs),
                bytes: Vec::new(),
            },
            eof: false,
            closing: false,
            first: [0; 8],
            first_len: 0,
            reported: false,
        }
    }

    /// rustls' connection, once the ClientHello chose the configuration.
    fn conn(&self) -> Option<&ServerConnection> {
        match &self.phase {
            Phase::Session(conn) => Some(conn),
            Phase::Hello { .. } => None,
        }
    }

    fn conn_mut(&mut self) -> Option<&mut ServerConnection> {
        match &mut self.phase {
            Phase::Session(conn) => Some(conn),
            Phase::Hello { .. } => None,
        }
    }

    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.conn().is_none_or(|conn| conn.is_handshaking())
    }

    /// Reads plaintext into `buffer`, pulling ciphertext from `source` as needed.
    ///
    /// `Ok(0)`: the client closed (with or without `close_notify`). `WouldBlock`: `source` has
    /// nothing more now. `InvalidData`: a TLS error; an alert may be waiting in
    /// [`take_ciphertext`](Self::take_ciphertext), then the connection must close.
    pub fn read_plaintext(
        &mut self,
        source: &mut dyn Read,
        buffer: &mut [u8],
    ) -> io::Result<usize> {
        let mut recorded = Recording {
            source,
            first: &mut self.first,
            first_len: &mut self.first_len,
        };
        let conn = loop {
            let (configs, bytes) = match &mut self.phase {
                Phase::Session(conn) => break conn,
                Phase::Hello { configs, bytes } => (configs, bytes),
            };
            let mut conn = match start(configs, bytes, &mut recorded, &mut self.eof) {
                Ok(conn) => conn,
                Err(Started::Waiting(error)) => return Err(error),
                Err(Started::Closed) => return Ok(0),
            };
            let fed = feed(&mut conn, bytes);
            // In place before a failure is reported: the alert rustls queued goes out.
            self.phase = Phase::Session(conn);
            fed?;
        };
        loop {
            // Plaintext already decrypted is handed out before more ciphertext is read, so
            // rustls' received-plaintext buffer never overflows.
            match conn.reader().read(buffer) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.eof {
                return Ok(0);
            }
            if conn.read_tls(&mut recorded)? == 0 {
                self.eof = true;
            }
            conn.process_new_packets().map_err(invalid)?;
        }
    }

    /// Whether the client's first bytes look like a plain HTTP request (an `http://` or
    /// `ws://` client on a TLS port): an upper-case method and a space.
    pub fn looks_like_plain_http(&self) -> bool {
        let first = &self.first[..self.first_len];
        let method_len = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
        method_len >= 3 && first.get(method_len) == Some(&b' ')
    }

    /// What the handshake negotiated, exactly once: the first call after it finished.
    pub fn take_completed(&mut self) -> Option<Negotiated> {
        if self.reported {
            return None;
        }
        let negotiated = self.negotiated()?;
        self.reported = true;
        Some(negotiated)
    }

    /// Whether decrypted plaintext is waiting to be read (so the socket need not be polled).
    pub fn has_plaintext(&mut self) -> bool {
        self.conn_mut().is_some_and(|conn| {
            conn.process_new_packets()
                .is_ok_and(|state| state.plaintext_bytes_to_read() > 0)
        })
    }

    /// Queues plaintext to be encrypted.
    pub fn write_plaintext(&mut self, bytes: &[u8]) {
        // Unlimited buffer (see `start`): `write` takes everything, so `write_all` cannot
        // fail. Nothing is written before the handshake is done.
        let Some(conn) = self.conn_mut() else {
            tracing::error!("plaintext written before the TLS handshake");
            return;
        };
        if let Err(error) = conn.writer().write_all(bytes) {
            tracing::error!(%error, "rustls refused plaintext");
        }
    }

    /// Queues `close_notify` (once): the client learns the stream ended, not that it was cut.
    pub fn close_notify(&mut self) {
        if !self.closing {
            self.closing = true;
            if let Some(conn) = self.conn_mut() {
                conn.send_close_notify();
            }
        }
    }

    /// Whether `close_notify` has been queued.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Whether ciphertext (handshake, records, alerts) is waiting to be sent.
    pub fn wants_write(&self) -> bool {
        self.conn().is_some_and(|conn| conn.wants_write())
    }

    /// Moves waiting ciphertext into `out`; returns how many bytes were written. What does not
    /// fit stays queued (see [`wants_write`](Self::wants_write)).
    pub fn take_ciphertext(&mut self, out: &mut [u8]) -> usize {
        let Some(conn) = self.conn_mut() else {
            return 0;
        };
        let mut written = 0;
        while written < out.len() && conn.wants_write() {
            let mut rest = &mut out[written..];
            match conn.write_tls(&mut rest) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n,
            }
        }
        written
    }

    /// All queued ciphertext, however large (handshake flights, alerts).
    pub fn take_all_ciphertext(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let Some(conn) = self.conn_mut() else {
            return out;
        };
        while conn.wants_write() {
            match conn.write_tls(&mut out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        out
    }

    /// What the handshake negotiated, once it is done.
    pub fn negotiated(&self) -> Option<Negotiated> {
        let conn = self.conn().filter(|conn| !conn.is_handshaking())?;
        Some(Negotiated {
            version: conn
                .protocol_version()
                .map_or_else(String::new, |v| format!("{v:?}")),
            suite: conn
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or_default()
                .to_owned(),
            server_name: conn.server_name().map(str::to_owned),
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
        })
    }
}

/// Why the session's connection could not be started yet.
enum Started {
    /// The socket has no more bytes now (or failed): the error to return.
    Waiting(io::Error),
    /// The client closed before sending a byte.
    Closed,
}

/// Reads the start of the ClientHello into `bytes` until the client's suite preference is
/// known, then starts rustls' connection with the configuration that suits it.
fn start(
    configs: &ServerConfigs,
    bytes: &mut Vec<u8>,
    source: &mut dyn Read,
    eof: &mut bool,
) -> Result<Box<ServerConnection>, Started> {
    let mut preference = suite_preference(bytes);
    while preference == SuitePreference::NeedMore && !*eof {
        let mut chunk = [0u8; HELLO_READ];
        match source.read(&mut chunk) {
            Ok(0) => *eof = true,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(error) => return Err(Started::Waiting(error)),
        }
        preference = suite_preference(bytes);
    }
    if bytes.is_empty() {
        return Err(Started::Closed);
    }
    debug_assert!(bytes.len() >= MAX_PEEK || preference != SuitePreference::NeedMore || *eof);
    let config = Arc::clone(configs.for_client(preference));
    let mut conn = ServerConnection::new(config).map_err(|e| Started::Waiting(invalid(e)))?;
    // The relay bounds memory itself: it encrypts one relay buffer at a time and sends it
    // before reading more, so rustls may take a whole chunk at once.
    conn.set_buffer_limit(None);
    Ok(Box::new(conn))
}

/// Hands the ClientHello bytes read by [`start`] to rustls.
fn feed(conn: &mut ServerConnection, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes)?;
        conn.process_new_packets().map_err(invalid)?;
    }
    Ok(())
}

/// A TLS error as the `InvalidData` the worker treats as a broken stream.
fn invalid(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Passes reads through and keeps a copy of the connection's first bytes.
struct Recording<'a> {
    source: &'a mut dyn Read,
    first: &'a mut [u8; 8],
    first_len: &'a mut usize,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.source.read(buf)?;
        let room = self.first.len() - *self.first_len;
        let copied = room.min(n);
        self.first[*self.first_len..*self.first_len + copied].copy_from_slice(&buf[..copied]);
        *self.first_len += copied;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CryptoProvider, TlsConfig, TlsFiles, TlsVersion};
    use std::collections::VecDeque;

    /// An in-memory socket end that reports `WouldBlock` when empty (unless closed).
    #[derive(Default)]
    struct Pipe {
        bytes: VecDeque<u8>,
        closed: bool,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.bytes.is_empty() {
                return if self.closed {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.bytes.len());
            for (slot, byte) in buf.iter_mut().zip(self.bytes.drain(..n)) {
                *slot = byte;
            }
            Ok(n)
        }
    }

    struct Pair {
        client: rustls::ClientConnection,
        server: TlsSession,
        to_server: Pipe,
        _dir: tempdir::Dir,
    }

    mod tempdir {
        /// A scratch folder removed on drop.
        pub struct Dir(pub std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn pair(names: &[&str], server_name: &str) -> Pair {
        pair_with(
            names,
            server_name,
            rustls::crypto::aws_lc_rs::default_provider(),
        )
    }

    /// A pair whose client offers `client_provider`'s suites, in its order.
    fn pair_with(
        names: &[&str],
        server_name: &str,
        client_provider: rustls::crypto::CryptoProvider,
    ) -> Pair {
        let certified = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let dir = std::env::temp_dir().join(format!(
            "wsplice-tls-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
        let config = TlsConfig {
            default: TlsFiles {
                cert: dir.join("cert.pem"),
                key: dir.join("key.pem"),
            },
            sni: Vec::new(),
            strict_sni: false,
            min_version: TlsVersion::V1_2,
            ciphers: Vec::new(),
            session_cache: 16,
            session_tickets: true,
            provider: CryptoProvider::AwsLcRs,
        };
        let server_configs = super::super::server_configs(&config).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certified.cert.der().clone()).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = rustls::ClientConnection::new(
            Arc::new(client_config),
            server_name.to_owned().try_into().unwrap(),
        )
        .unwrap();
        Pair {
            client,
            server: TlsSession::new(&server_configs),
            to_server: Pipe::default(),
            _dir: tempdir::Dir(dir),
        }
    }

    impl Pair {
        /// Moves client ciphertext to the server pipe and server ciphertext to the client.
        fn exchange(&mut self) -> io::Result<Vec<u8>> {
            let mut wire = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut wire).unwrap();
            }
            self.to_server.bytes.extend(wire);
            let mut plain = vec![0; 1 << 16];
            let got = match self.server.read_plaintext(&mut self.to_server, &mut plain) {
                Ok(n) => plain[..n].to_vec(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Vec::new(),
                Err(e) => return Err(e),
            };
            let back = self.server.take_all_ciphertext();
            let mut back = back.as_slice();
            while !back.is_empty() {
                self.client.read_tls(&mut back).unwrap();
                self.client.process_new_packets().unwrap();
            }
            Ok(got)
        }
    }

    #[test]
    fn handshake_then_plaintext_both_ways_and_close_notify() {
        let mut pair = pair(&["localhost"], "localhost");
        for _ in 0..4 {
            pair.exchange().unwrap();
        }
        assert!(!pair.server.is_handshaking());
        let negotiated = pair.server.take_completed().unwrap();
        assert_eq!(pair.server.take_completed(), None, "reported once");
        assert_eq!(negotiated.server_name.as_deref(), Some("localhost"));
        assert!(!negotiated.resumed);
        assert_eq!(pair.client.alpn_protocol(), None, "client offered no ALPN");

        pair.client
            .writer()
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .unwrap();
        assert_eq!(pair.exchange().unwrap(), b"GET / HTTP/1.1\r\n\r\n");

        // A chunk larger than one record and than a small output buffer arrives whole.
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        pair.server.write_plaintext(&big);
        let mut received = Vec::new();
        let mut out = vec![0; 4096];
        while pair.server.wants_write() {
            let n = pair.server.take_ciphertext(&mut out);
            let mut wire = &out[..n];
            while !wire.is_empty() {
                pair.client.read_tls(&mut wire).unwrap();
                pair.client.process_new_packets().unwrap();
                let mut buf = vec![0; 1 << 17];
                while let Ok(got) = pair.client.reader().read(&mut buf) {
                    if got == 0 {
                        break;
                    }
                    received.extend_from_slice(&buf[..got]);
                }
            }
        }
        assert_eq!(received, big);

        pair.client.send_close_notify();
        assert_eq!(
            pair.exchange().unwrap(),
            b"",
            "close_notify reads as end of stream"
        );
    }

    #[test]
    fn cut_connection_reads_as_end_of_stream_and_garbage_as_invalid_data() {
        let mut pair = pair(&["localhost"], "localhost");
        pair.to_server.closed = true;
        assert_eq!(pair.exchange().unwrap(), b"");

        let mut pair = self::pair(&["localhost"], "localhost");
        pair.to_server
            .bytes
            .extend(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".iter());
        let mut plain = [0u8; 64];
        let error = pair
            .server
            .read_plaintext(&mut pair.to_server, &mut plain)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(pair.server.looks_like_plain_http());
        assert!(
            pair.server.wants_write(),
            "an alert is queued for the client"
        );

        let mut pair = self::pair(&["localhost"], "localhost");
        pair.to_server
            .bytes
            .extend([0x16u8, 3, 1, 0, 1, 0xff, 0xff, 0xff]);
        pair.to_server.bytes.extend([0u8; 600]);
        let error = pair
            .server
            .read_plaintext(&mut pair.to_server, &mut plain)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(!pair.server.looks_like_plain_http());
    }

    /// Runs a handshake; returns the suite the server chose.
    fn negotiated_suite(client_provider: rustls::crypto::CryptoProvider) -> String {
        let mut pair = pair_with(&["localhost"], "localhost", client_provider);
        for _ in 0..4 {
            pair.exchange().unwrap();
        }
        pair.server.take_completed().unwrap().suite
    }

    #[test]
    fn clients_with_aes_get_aes_128_and_chacha_clients_get_chacha() {
        // rustls' default order (AES-256 first) is what most clients send.
        let aes_client = rustls::crypto::aws_lc_rs::default_provider();
        let expected = if super::super::server_config::has_aes_hardware() {
            "TLS13_AES_128_GCM_SHA256"
        } else {
            "TLS13_AES_256_GCM_SHA384"
        };
        assert_eq!(negotiated_suite(aes_client), expected);

        let mut chacha_client = rustls::crypto::aws_lc_rs::default_provider();
        chacha_client.cipher_suites.sort_by_key(|suite| {
            suite.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        });
        assert_eq!(
            negotiated_suite(chacha_client),
            "TLS13_CHACHA20_POLY1305_SHA256"
        );
    }

    #[test]
    fn a_hello_that_trickles_in_byte_by_byte_still_completes() {
        let mut pair = pair(&["localhost"], "localhost");
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        let mut plain = [0u8; 64];
        for byte in &wire {
            assert!(pair.server.is_handshaking());
            pair.to_server.bytes.push_back(*byte);
            let error = pair
                .server
                .read_plaintext(&mut pair.to_server, &mut plain)
                .unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        }
        assert!(pair.server.wants_write(), "the server's flight is ready");
        for _ in 0..4 {
            pair.exchange().unwrap();
        }
        assert!(!pair.server.is_handshaking());
    }
}
