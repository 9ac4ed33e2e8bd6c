//! One client's TLS session, sans-IO: ciphertext comes from any `io::Read`, goes out through a
//! byte slice; the worker does the socket I/O around it.
//!
//! rustls' unbuffered connection does the handshake (and the whole of a TLS 1.2 session). A
//! TLS 1.3 session then protects its own records ([`Traffic`]): rustls keeps only what a key
//! update needs. The session owns buffers only while they hold bytes: the start of a record not
//! yet complete, plaintext the caller had no room for yet, ciphertext not yet taken; and AEAD
//! contexts only while it is busy. An idle session holds none of them.

use std::io::{self, Read};
use std::sync::Arc;

use rustls::pki_types::DnsName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
};
use rustls::{HandshakeKind, ProtocolVersion};

use super::client_hello::{hello_complete, server_name, suite_preference, SuitePreference};
use super::record::{protects, record_len};
use super::traffic::{Opened, Traffic, TrafficError};
use super::ServerConfigs;
use crate::config::CryptoProvider;

/// The TLS state of one client connection.
pub struct TlsSession {
    phase: Phase,
    /// Whose crypto protects records once [`Traffic`] does (the listener's provider).
    provider: CryptoProvider,
    /// The socket reached end of stream.
    eof: bool,
    /// The client sent `close_notify`: nothing after it is read.
    peer_closed: bool,
    /// rustls reported an error: the stream is broken.
    failed: bool,
    /// `close_notify` has been queued.
    closing: bool,
    /// The first bytes the client sent, to recognise plain HTTP sent to a TLS port.
    first: [u8; 8],
    first_len: usize,
    /// The handshake's completion has been reported by [`TlsSession::take_completed`].
    reported: bool,
    /// The host name of the client's server name indication, read from its ClientHello
    /// (rustls' unbuffered connection does not tell the one it read).
    server_name: Option<Box<str>>,
    /// Ciphertext received and not processed yet: the start of a record (and, while a
    /// handshake message spans records, its records so far, as rustls asks).
    incoming: Vec<u8>,
    /// Decrypted plaintext the caller has not taken yet, from `plaintext_at`.
    plaintext: Vec<u8>,
    plaintext_at: usize,
    /// Ciphertext waiting to be sent, from `outgoing_at`.
    outgoing: Vec<u8>,
    outgoing_at: usize,
}

/// Before and after the client's cipher-suite preference is known.
enum Phase {
    /// Reading the start of the ClientHello: the listener's configurations, and the bytes so
    /// far (handed to rustls once the configuration is chosen).
    Hello {
        configs: Arc<ServerConfigs>,
        bytes: Vec<u8>,
    },
    /// rustls has the connection: during the handshake, and for all of a TLS 1.2 session.
    Rustls(Box<UnbufferedServerConnection>),
    /// A TLS 1.3 session after its handshake: records are protected by the session.
    Traffic(Box<Traffic>),
    /// rustls' connection could not be handed over to [`Traffic`]: the session failed.
    Lost,
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

/// Why a TLS session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The TLS protocol failed: a bad record, a failed handshake, an alert from the client.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// The traffic keys may encrypt no more records.
    #[error("TLS traffic keys exhausted")]
    KeysExhausted,
    /// The client sent early data, which this server never accepts.
    #[error("unexpected TLS early data")]
    EarlyData,
    /// A record after the handshake (TLS 1.3) was refused.
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    /// rustls gave a handshake record to send and then refused to encode it.
    #[error("TLS handshake data could not be encoded")]
    Encode,
    /// The session failed before: nothing more is read from it.
    #[error("the TLS session failed earlier")]
    Broken,
}

/// Ciphertext read from the socket per call while the ClientHello starts: room for a whole
/// typical hello (post-quantum key shares included), so rustls gets it in one piece.
const HELLO_READ: usize = 2048;

/// The largest plaintext of one record: encryption goes 16 KB per record.
const MAX_FRAGMENT: usize = 1 << 14;

/// Per-record room for what encryption adds (header, nonce, content type, tag: 29 bytes at most
/// with rustls' suites), rounded up. Too little only costs a second try.
const RECORD_OVERHEAD: usize = 64;

/// What to encrypt once rustls lets traffic flow.
enum Pending<'a> {
    Nothing,
    Plaintext(&'a [u8]),
    CloseNotify,
}

impl TlsSession {
    /// A new server-side session of a listener with these configurations (one is chosen when
    /// the client's ClientHello arrives).
    pub fn new(configs: &Arc<ServerConfigs>) -> TlsSession {
        TlsSession {
            phase: Phase::Hello {
                configs: Arc::clone(configs),
                bytes: Vec::new(),
            },
            provider: configs.provider(),
            eof: false,
            peer_closed: false,
            failed: false,
            closing: false,
            first: [0; 8],
            first_len: 0,
            reported: false,
            server_name: None,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            plaintext_at: 0,
            outgoing: Vec::new(),
            outgoing_at: 0,
        }
    }

    /// Whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        match &self.phase {
            Phase::Hello { .. } => true,
            Phase::Rustls(conn) => conn.is_handshaking(),
            Phase::Traffic(_) | Phase::Lost => false,
        }
    }

    /// Reads plaintext into `buffer`, pulling ciphertext from `source` as needed (into
    /// `buffer`, where it is decrypted).
    ///
    /// `Ok(0)`: the client closed (with or without `close_notify`). `WouldBlock`: `source` has
    /// nothing more now; a read from it that returned less than asked for counts as that (it
    /// took everything queued: another would only hear `WouldBlock`). `InvalidData`: a TLS
    /// error; an alert may be waiting in [`take_ciphertext`](Self::take_ciphertext), then the
    /// connection must close.
    pub fn read_plaintext(
        &mut self,
        source: &mut dyn Read,
        buffer: &mut [u8],
    ) -> io::Result<usize> {
        let mut drained = false;
        let result = self.read_into(source, buffer, &mut drained);
        if drained {
            // The client is quiet until its socket is readable again.
            self.release_contexts();
        }
        result
    }

    /// [`read_plaintext`](Self::read_plaintext); `drained`: a read from `source` came back
    /// short or with `WouldBlock`.
    fn read_into(
        &mut self,
        source: &mut dyn Read,
        buffer: &mut [u8],
        drained: &mut bool,
    ) -> io::Result<usize> {
        if buffer.is_empty() {
            return Ok(0);
        }
        if !self.start(source, drained)? {
            return Ok(0);
        }
        loop {
            // Plaintext already decrypted is handed out before more ciphertext is read: what
            // the session holds is bounded by one read.
            if self.plaintext_at < self.plaintext.len() {
                return Ok(self.deliver(buffer));
            }
            if self.failed {
                return Err(invalid(SessionError::Broken));
            }
            if self.eof || self.peer_closed {
                return Ok(0);
            }
            if *drained {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = match (Recording {
                source: &mut *source,
                first: &mut self.first,
                first_len: &mut self.first_len,
            })
            .read(buffer)
            {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    *drained = true;
                    return Err(error);
                }
                result => result?,
            };
            if n == 0 {
                self.eof = true;
                continue;
            }
            *drained = n < buffer.len();
            if matches!(self.phase, Phase::Traffic(_)) {
                let opened = self.open_received(buffer, n).map_err(invalid)?;
                if opened > 0 {
                    return Ok(opened);
                }
            } else {
                self.receive(&mut buffer[..n]).map_err(invalid)?;
            }
        }
    }

    /// rustls finished the handshake of a TLS 1.3 session and sent all it had to send: the
    /// session takes the connection over ([`Traffic`]) and opens the records `incoming` holds.
    fn hand_over(&mut self) -> Result<(), SessionError> {
        let Phase::Rustls(conn) = std::mem::replace(&mut self.phase, Phase::Lost) else {
            return Ok(());
        };
        let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
        match Traffic::new(*conn, self.provider, resumed) {
            Ok(traffic) => self.phase = Phase::Traffic(Box::new(traffic)),
            Err(error) => {
                // Not expected: rustls said the handshake is over and it has nothing to send.
                tracing::error!(%error, "TLS session could not take over its traffic keys");
                self.failed = true;
                return Err(error.into());
            }
        }
        let mut incoming = std::mem::take(&mut self.incoming);
        let (used, opened, result) = self.open_records(&mut incoming);
        self.plaintext.extend_from_slice(&incoming[..opened]);
        self.keep_unprocessed(incoming, used);
        result
    }

    /// Keeps what is left of `incoming` after its first `used` bytes for the next read:
    /// usually nothing, and then no capacity either.
    fn keep_unprocessed(&mut self, mut incoming: Vec<u8>, used: usize) {
        incoming.drain(..used.min(incoming.len()));
        if incoming.is_empty() || self.failed || self.peer_closed {
            incoming = Vec::new();
        } else {
            incoming.shrink_to_fit();
        }
        self.incoming = incoming;
    }

    /// Drops the AEAD contexts of a [`Traffic`] session (built again for the next record).
    fn release_contexts(&mut self) {
        if let Phase::Traffic(traffic) = &mut self.phase {
            traffic.release();
        }
    }

    /// [`Traffic`]: opens the records in the `n` bytes just read into `buffer`, after what
    /// `incoming` holds. Their plaintext goes to the front of `buffer` (how many bytes are
    /// returned), what does not fit to `plaintext`, an incomplete record to `incoming`.
    fn open_received(&mut self, buffer: &mut [u8], n: usize) -> Result<usize, SessionError> {
        if self.incoming.is_empty() {
            // The usual case: records opened where they were read, their plaintext moved to the
            // front.
            let (used, opened, result) = self.open_records(&mut buffer[..n]);
            if !self.failed && !self.peer_closed {
                self.incoming = buffer.get(used..n).unwrap_or_default().to_vec();
            }
            return result.map(|()| opened);
        }
        let mut incoming = std::mem::take(&mut self.incoming);
        incoming.extend_from_slice(&buffer[..n]);
        let (used, opened, result) = self.open_records(&mut incoming);
        let direct = opened.min(buffer.len());
        buffer[..direct].copy_from_slice(&incoming[..direct]);
        if opened > direct {
            self.plaintext = incoming[direct..opened].to_vec();
            self.plaintext_at = 0;
        }
        self.keep_unprocessed(incoming, used);
        result.map(|()| direct)
    }

    /// [`Traffic`]: opens the whole records at the start of `bytes` in place and moves their
    /// plaintext to its front. Returns how many bytes of records were used, how many bytes of
    /// plaintext are at the front, and whether the records were good (after a bad one, its
    /// alert waits in `outgoing`).
    fn open_records(&mut self, bytes: &mut [u8]) -> (usize, usize, Result<(), SessionError>) {
        let Phase::Traffic(traffic) = &mut self.phase else {
            return (0, 0, Ok(()));
        };
        let (mut used, mut opened) = (0, 0);
        loop {
            let rest = bytes.get_mut(used..).unwrap_or_default();
            let len = match record_len(rest) {
                Ok(Some(len)) if len <= rest.len() => len,
                Ok(_) => break,
                Err(error) => {
                    let error = TrafficError::from(error);
                    self.failed = true;
                    traffic.seal_alert_for(&error, &mut self.outgoing);
                    return (used, opened, Err(error.into()));
                }
            };
            match traffic.open(&mut rest[..len], &mut self.outgoing) {
                Ok(Opened::Data(range)) => {
                    // Plaintext is shorter than its record: it never overtakes what is unread.
                    bytes.copy_within(used + range.start..used + range.end, opened);
                    opened += range.len();
                }
                Ok(Opened::Nothing) => {}
                Ok(Opened::Closed) => {
                    self.peer_closed = true;
                    return (used + len, opened, Ok(()));
                }
                Err(error) => {
                    self.failed = true;
                    traffic.seal_alert_for(&error, &mut self.outgoing);
                    return (used, opened, Err(error.into()));
                }
            }
            used += len;
        }
        (used, opened, Ok(()))
    }

    /// Reads the start of the ClientHello until the client's suite preference is known and
    /// the whole hello is in, then starts rustls' connection with the configuration that
    /// suits it. False: the client closed before sending a byte.
    fn start(&mut self, source: &mut dyn Read, drained: &mut bool) -> io::Result<bool> {
        let Phase::Hello { configs, bytes } = &mut self.phase else {
            return Ok(true);
        };
        let mut recorded = Recording {
            source,
            first: &mut self.first,
            first_len: &mut self.first_len,
        };
        while !self.eof
            && (suite_preference(bytes) == SuitePreference::NeedMore || !hello_complete(bytes))
        {
            if *drained {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut chunk = [0u8; HELLO_READ];
            let n = recorded.read(&mut chunk)?;
            if n == 0 {
                self.eof = true;
            }
            bytes.extend_from_slice(&chunk[..n]);
            *drained = n < chunk.len();
        }
        if bytes.is_empty() {
            return Ok(false);
        }
        let config = Arc::clone(configs.for_client(suite_preference(bytes)));
        let conn = UnbufferedServerConnection::new(config).map_err(|e| invalid(e.into()))?;
        // As rustls keeps it: a valid DNS name (not an IP address), in lower case.
        self.server_name = server_name(bytes).and_then(|name| {
            let name = DnsName::try_from(name.as_str()).ok()?;
            Some(name.to_lowercase_owned().as_ref().into())
        });
        let hello = std::mem::take(bytes);
        self.phase = Phase::Rustls(Box::new(conn));
        self.process_incoming(hello, Pending::Nothing)
            .map_err(invalid)?;
        Ok(true)
    }

    /// Copies waiting plaintext into `buffer`; releases it once all is taken.
    fn deliver(&mut self, buffer: &mut [u8]) -> usize {
        let waiting = self.plaintext.get(self.plaintext_at..).unwrap_or_default();
        let n = waiting.len().min(buffer.len());
        buffer[..n].copy_from_slice(&waiting[..n]);
        self.plaintext_at += n;
        if self.plaintext_at >= self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_at = 0;
        }
        n
    }

    /// Processes ciphertext just received (it follows what `incoming` holds).
    fn receive(&mut self, ciphertext: &mut [u8]) -> Result<(), SessionError> {
        if !self.incoming.is_empty() {
            let mut incoming = std::mem::take(&mut self.incoming);
            incoming.extend_from_slice(ciphertext);
            return self.process_incoming(incoming, Pending::Nothing);
        }
        // The usual case: whole records, processed where they are.
        let (used, result) = self.process(ciphertext, Pending::Nothing);
        if !self.failed && !self.peer_closed {
            self.incoming = ciphertext.get(used..).unwrap_or_default().to_vec();
        }
        if result? {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Runs rustls over `incoming` (the session's unprocessed ciphertext, taken out of it) and
    /// keeps what is left of it: nothing, usually, and then no capacity either.
    fn process_incoming(
        &mut self,
        mut incoming: Vec<u8>,
        pending: Pending<'_>,
    ) -> Result<(), SessionError> {
        let (used, result) = self.process(&mut incoming, pending);
        self.keep_unprocessed(incoming, used);
        if result? {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Runs rustls' state machine over `incoming` until it needs more bytes from the client:
    /// what rustls sends (handshake flights, tickets, alerts) and `pending` (once traffic may
    /// flow) go to `outgoing`, decrypted records to `plaintext`. Returns how many bytes at the
    /// front of `incoming` rustls is done with, and whether the session is to take over from
    /// rustls now: a TLS 1.3 handshake just ended, and the records after it are left for
    /// [`Traffic`] (a KeyUpdate rustls handled would leave its answer in rustls).
    fn process(
        &mut self,
        incoming: &mut [u8],
        mut pending: Pending<'_>,
    ) -> (usize, Result<bool, SessionError>) {
        let Phase::Rustls(conn) = &mut self.phase else {
            return (0, Ok(false));
        };
        let mut used = 0;
        loop {
            if matches!(pending, Pending::Nothing) && hands_over(conn) {
                match flush_handshake(conn, &mut self.outgoing) {
                    Ok(true) => return (used, Ok(true)),
                    Ok(false) => {}
                    Err(error) => {
                        self.failed = true;
                        return (used, Err(error));
                    }
                }
            }
            let status = conn.process_tls_records(incoming.get_mut(used..).unwrap_or_default());
            let mut discard = status.discard;
            let step = match status.state {
                Err(error) => Err(SessionError::Tls(error)),
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut self.outgoing, &mut data).map(|()| false)
                }
                // What was encoded waits in `outgoing`, in order, until the worker sends it.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(false)
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut step = Ok(false);
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                self.plaintext.extend_from_slice(record.payload);
                            }
                            Err(error) => {
                                step = Err(error.into());
                                break;
                            }
                        }
                    }
                    step
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(false)
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    match std::mem::replace(&mut pending, Pending::Nothing) {
                        Pending::Nothing => Ok(true),
                        Pending::Plaintext(bytes) => {
                            let records = bytes.len().div_ceil(MAX_FRAGMENT);
                            let estimate = bytes.len() + records * RECORD_OVERHEAD;
                            encrypt(&mut self.outgoing, estimate, |out| {
                                traffic.encrypt(bytes, out)
                            })
                            .map(|()| true)
                        }
                        Pending::CloseNotify => {
                            encrypt(&mut self.outgoing, RECORD_OVERHEAD, |out| {
                                traffic.queue_close_notify(out)
                            })
                            .map(|()| true)
                        }
                    }
                }
                Ok(ConnectionState::BlockedHandshake | ConnectionState::Closed) => Ok(true),
                Ok(ConnectionState::ReadEarlyData(_)) => Err(SessionError::EarlyData),
                // States a later rustls may add: wait for more bytes.
                Ok(_) => Ok(true),
            };
            used += discard;
            match step {
                Ok(false) => {}
                Ok(true) => return (used, Ok(false)),
                Err(error) => {
                    self.failed = true;
                    let rest = incoming.get_mut(used..).unwrap_or_default();
                    queue_alert(conn, rest, &mut self.outgoing);
                    return (used, Err(error));
                }
            }
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
    pub fn has_plaintext(&self) -> bool {
        self.plaintext_at < self.plaintext.len()
    }

    /// Encrypts plaintext; the ciphertext waits for [`take_ciphertext`](Self::take_ciphertext).
    pub fn write_plaintext(&mut self, bytes: &[u8]) {
        // Nothing is written before the handshake is done (the Upgrade's answer comes after
        // the client's request, which comes after the handshake).
        if self.is_handshaking() || self.failed {
            tracing::error!("plaintext written to a TLS session not ready for it");
            return;
        }
        let result = match &mut self.phase {
            Phase::Traffic(traffic) => traffic
                .seal(bytes, &mut self.outgoing)
                .map_err(SessionError::from),
            _ => {
                let incoming = std::mem::take(&mut self.incoming);
                self.process_incoming(incoming, Pending::Plaintext(bytes))
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "TLS refused plaintext");
        }
        // The next record may be a while: the upstream sends when it has something.
        self.release_contexts();
    }

    /// Queues `close_notify` (once): the client learns the stream ended, not that it was cut.
    pub fn close_notify(&mut self) {
        if self.closing {
            return;
        }
        self.closing = true;
        if self.is_handshaking() || self.failed {
            return;
        }
        let result = match &mut self.phase {
            Phase::Traffic(traffic) => traffic
                .seal_close_notify(&mut self.outgoing)
                .map_err(SessionError::from),
            _ => {
                let incoming = std::mem::take(&mut self.incoming);
                self.process_incoming(incoming, Pending::CloseNotify)
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "close_notify not sent");
        }
    }

    /// Whether `close_notify` has been queued.
    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Whether ciphertext (handshake, records, alerts) is waiting to be sent.
    pub fn wants_write(&self) -> bool {
        self.outgoing_at < self.outgoing.len()
    }

    /// Moves waiting ciphertext into `out`; returns how many bytes were written. What does not
    /// fit stays queued (see [`wants_write`](Self::wants_write)).
    pub fn take_ciphertext(&mut self, out: &mut [u8]) -> usize {
        let waiting = self.outgoing.get(self.outgoing_at..).unwrap_or_default();
        let n = waiting.len().min(out.len());
        out[..n].copy_from_slice(&waiting[..n]);
        self.outgoing_at += n;
        if self.outgoing_at >= self.outgoing.len() {
            self.outgoing = Vec::new();
            self.outgoing_at = 0;
        }
        n
    }

    /// All queued ciphertext, however large (handshake flights, alerts).
    pub fn take_all_ciphertext(&mut self) -> Vec<u8> {
        let mut all = std::mem::take(&mut self.outgoing);
        all.drain(..std::mem::take(&mut self.outgoing_at).min(all.len()));
        all
    }

    /// What the handshake negotiated, once it is done.
    pub fn negotiated(&self) -> Option<Negotiated> {
        let (version, suite, resumed) = match &self.phase {
            Phase::Rustls(conn) if !conn.is_handshaking() => (
                conn.protocol_version(),
                conn.negotiated_cipher_suite().map(|s| s.suite()),
                conn.handshake_kind() == Some(HandshakeKind::Resumed),
            ),
            Phase::Traffic(traffic) => (
                Some(traffic.version()),
                Some(traffic.suite()),
                traffic.resumed(),
            ),
            Phase::Rustls(_) | Phase::Hello { .. } | Phase::Lost => return None,
        };
        Some(Negotiated {
            version: version.map_or_else(String::new, |v| format!("{v:?}")),
            suite: suite
                .and_then(|s| s.as_str())
                .unwrap_or_default()
                .to_owned(),
            server_name: self.server_name.as_deref().map(str::to_owned),
            resumed,
        })
    }

    /// The record layer, once the session protects its records itself.
    #[cfg(test)]
    pub(crate) fn traffic(&mut self) -> Option<&mut Traffic> {
        match &mut self.phase {
            Phase::Traffic(traffic) => Some(traffic),
            _ => None,
        }
    }

    /// Bytes of buffer capacity the session holds besides rustls' own state (0 when idle).
    #[cfg(test)]
    pub(crate) fn buffered_bytes(&self) -> usize {
        let hello = match &self.phase {
            Phase::Hello { bytes, .. } => bytes.capacity(),
            Phase::Rustls(_) | Phase::Traffic(_) | Phase::Lost => 0,
        };
        hello + self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }
}

/// Whether rustls' connection is done with a handshake whose records the session protects
/// itself (TLS 1.3, a suite [`super::record`] implements).
fn hands_over(conn: &UnbufferedServerConnection) -> bool {
    !conn.is_handshaking()
        && conn.protocol_version() == Some(ProtocolVersion::TLSv1_3)
        && conn
            .negotiated_cipher_suite()
            .is_some_and(|suite| protects(suite.suite()))
}

/// Moves what rustls still has to send (the session tickets after a handshake) into
/// `outgoing` without giving it more input. True once it has nothing left and traffic may flow.
fn flush_handshake(
    conn: &mut UnbufferedServerConnection,
    outgoing: &mut Vec<u8>,
) -> Result<bool, SessionError> {
    loop {
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut data)) => {
                encode(outgoing, &mut data)?;
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
            Ok(ConnectionState::WriteTraffic(_)) => return Ok(true),
            Ok(_) => return Ok(false),
            Err(error) => return Err(error.into()),
        }
    }
}

/// After an error: moves the alert rustls queued for the client into `outgoing`. `incoming` is
/// what is left of the ciphertext the error came from (rustls keeps positions in it).
///
/// One call only: rustls hands out what it queued (the alert, one record) before it reads
/// input again, and reading the input that failed again would fail again and queue a second
/// fatal alert (a debug assertion in rustls; found by the `tls_session` fuzz target).
fn queue_alert(conn: &mut UnbufferedServerConnection, incoming: &mut [u8], outgoing: &mut Vec<u8>) {
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = conn.process_tls_records(incoming).state {
        // An alert that cannot be encoded is not sent: the connection closes anyway.
        let _ = encode(outgoing, &mut data);
    }
}

/// Appends the record rustls has to send (a handshake message, an alert) to `outgoing`.
fn encode(
    outgoing: &mut Vec<u8>,
    data: &mut EncodeTlsData<'_, ServerConnectionData>,
) -> Result<(), SessionError> {
    append(outgoing, 0, |out| match data.encode(out) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(size)) => Err(Some(size)),
        Err(EncodeError::AlreadyEncoded) => Err(None),
    })
    .map_err(|()| SessionError::Encode)
}

/// Encrypts into `outgoing` with [`append`].
fn encrypt(
    outgoing: &mut Vec<u8>,
    estimate: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), SessionError> {
    append(outgoing, estimate, |out| match write(out) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(size)) => Err(Some(size)),
        Err(EncryptError::EncryptExhausted) => Err(None),
    })
    .map_err(|()| SessionError::KeysExhausted)
}

/// Appends to `out` what `write` puts into a slice: into `estimate` bytes of room first, then,
/// if that was too little, into the size it asked for. `write` fails with the size it needs, or
/// `None` when it cannot write at all.
fn append(
    out: &mut Vec<u8>,
    estimate: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<InsufficientSizeError>>,
) -> Result<(), ()> {
    let start = out.len();
    out.resize(start + estimate, 0);
    let mut written = write(out.get_mut(start..).unwrap_or_default());
    if let Err(Some(size)) = written {
        out.resize(start + size.required_size, 0);
        written = write(out.get_mut(start..).unwrap_or_default());
    }
    match written {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(_) => {
            out.truncate(start);
            Err(())
        }
    }
}

/// An error as the `InvalidData` the worker treats as a broken stream.
fn invalid(error: SessionError) -> io::Error {
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
    use crate::config::{TlsConfig, TlsFiles};
    use std::collections::VecDeque;
    use std::io::Write;

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
        let config = TlsConfig::with_files(TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        });
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
        let mut pair = established();
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
    fn a_corrupted_record_gets_one_alert_and_the_session_stays_broken() {
        let mut pair = established();
        pair.client.writer().write_all(b"hello").unwrap();
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        let last = wire.len() - 1;
        wire[last] ^= 0x5a; // the record's tag no longer matches
        pair.to_server.bytes.extend(wire);
        let mut plain = [0u8; 64];
        let error = pair
            .server
            .read_plaintext(&mut pair.to_server, &mut plain)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let alert = pair.server.take_all_ciphertext();
        assert_eq!(
            alert.first(),
            Some(&0x17),
            "one encrypted record: the alert"
        );
        assert_eq!(
            alert.len(),
            5 + usize::from(u16::from_be_bytes([alert[3], alert[4]]))
        );
        pair.client.read_tls(&mut alert.as_slice()).unwrap();
        assert_eq!(
            pair.client.process_new_packets().unwrap_err(),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
        );
        // The worker may call it again (a late readiness): still broken, no second alert.
        let again = pair
            .server
            .read_plaintext(&mut pair.to_server, &mut plain)
            .unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::InvalidData);
        assert!(pair.server.take_all_ciphertext().is_empty());
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

    /// A finished handshake (the pair's ciphertext exchanged until both are done).
    fn established() -> Pair {
        let mut pair = pair(&["localhost"], "localhost");
        for _ in 0..4 {
            pair.exchange().unwrap();
        }
        assert!(!pair.server.is_handshaking());
        assert!(
            pair.server.traffic().is_some(),
            "a TLS 1.3 session protects its records itself"
        );
        pair
    }

    /// What the client receives from the server's queued ciphertext.
    fn client_receives(pair: &mut Pair) -> Vec<u8> {
        let wire = pair.server.take_all_ciphertext();
        let mut wire = wire.as_slice();
        let mut received = Vec::new();
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
        received
    }

    /// The client's ciphertext for `message`.
    fn client_sends(pair: &mut Pair, message: &[u8]) -> Vec<u8> {
        pair.client.set_buffer_limit(None);
        pair.client.writer().write_all(message).unwrap();
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Reads what the server decrypts until the pipe is empty, `buffer_len` bytes at a time.
    fn server_reads(pair: &mut Pair, buffer_len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buffer = vec![0; buffer_len];
        loop {
            match pair.server.read_plaintext(&mut pair.to_server, &mut buffer) {
                Ok(0) => panic!("unexpected end of stream"),
                Ok(n) => got.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if pair.to_server.bytes.is_empty() && !pair.server.has_plaintext() {
                        return got;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn an_idle_session_holds_no_buffers() {
        let mut pair = established();
        assert_eq!(pair.server.buffered_bytes(), 0, "after the handshake");
        let wire = client_sends(&mut pair, b"hello");
        pair.to_server.bytes.extend(wire);
        assert_eq!(server_reads(&mut pair, 4096), b"hello");
        pair.server.write_plaintext(b"hello back");
        assert!(
            pair.server.buffered_bytes() > 0,
            "the reply waits to be sent"
        );
        assert_eq!(client_receives(&mut pair), b"hello back");
        assert_eq!(pair.server.buffered_bytes(), 0, "after a message each way");
    }

    #[test]
    fn records_split_at_every_byte_arrive_whole() {
        let mut pair = established();
        let message: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let first = client_sends(&mut pair, &message);
        let second = client_sends(&mut pair, b"second record");
        let mut wire = first;
        wire.extend(second);
        for cut in 1..wire.len() {
            let mut pair = established();
            let mut copy = client_sends(&mut pair, &message);
            copy.extend(client_sends(&mut pair, b"second record"));
            pair.to_server.bytes.extend(&copy[..cut]);
            let mut got = server_reads(&mut pair, 1 << 16);
            pair.to_server.bytes.extend(&copy[cut..]);
            got.extend(server_reads(&mut pair, 1 << 16));
            let mut expected = message.clone();
            expected.extend_from_slice(b"second record");
            assert_eq!(got, expected, "cut after {cut} bytes");
            assert_eq!(pair.server.buffered_bytes(), 0, "cut after {cut} bytes");
        }
    }

    #[test]
    fn a_record_larger_than_the_callers_buffer_is_delivered_whole_across_calls() {
        let mut pair = established();
        let message: Vec<u8> = (0..16_384u32).map(|i| (i * 7) as u8).collect();
        let wire = client_sends(&mut pair, &message);
        pair.to_server.bytes.extend(wire);
        let mut buffer = [0u8; 1000];
        let n = pair
            .server
            .read_plaintext(&mut pair.to_server, &mut buffer)
            .unwrap();
        assert_eq!(&buffer[..n], &message[..n]);
        assert!(pair.server.has_plaintext(), "the rest waits, decrypted");
        let mut got = buffer[..n].to_vec();
        got.extend(server_reads(&mut pair, 1000));
        assert_eq!(got, message);
        assert_eq!(pair.server.buffered_bytes(), 0);
    }

    #[test]
    fn messages_of_every_size_cross_record_boundaries_both_ways() {
        let mut pair = established();
        for size in [0, 1, 16_383, 16_384, 16_385, 100_000, 1 << 20] {
            let message: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let wire = client_sends(&mut pair, &message);
            pair.to_server.bytes.extend(wire);
            for buffer_len in [4096, 65_536] {
                if buffer_len == 65_536 {
                    let wire = client_sends(&mut pair, &message);
                    pair.to_server.bytes.extend(wire);
                }
                let got = server_reads(&mut pair, buffer_len);
                assert!(
                    got == message,
                    "{size} bytes to the server, {buffer_len} at a time"
                );
            }
            pair.server.write_plaintext(&message);
            assert!(
                client_receives(&mut pair) == message,
                "{size} bytes to the client"
            );
            assert_eq!(pair.server.buffered_bytes(), 0, "{size} bytes");
        }
    }

    #[test]
    fn a_short_read_means_the_socket_is_drained() {
        /// Counts reads; hands out what it has, then `WouldBlock`.
        struct Counting(Pipe, usize);
        impl Read for Counting {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 += 1;
                self.0.read(buf)
            }
        }
        let mut pair = established();
        let wire = client_sends(&mut pair, b"ping");
        let mut socket = Counting(Pipe::default(), 0);
        socket.0.bytes.extend(wire);
        let mut buffer = [0u8; 4096];
        let n = pair
            .server
            .read_plaintext(&mut socket, &mut buffer)
            .unwrap();
        assert_eq!(&buffer[..n], b"ping");
        let error = pair
            .server
            .read_plaintext(&mut socket, &mut buffer)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(socket.1, 2, "one read per call: none only to hear EAGAIN");
    }

    #[test]
    fn tls_1_2_clients_get_their_session_too() {
        let mut pair = pair(&["localhost"], "localhost");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate))
            .with_no_client_auth();
        pair.client = rustls::ClientConnection::new(
            Arc::new(config),
            "localhost".to_owned().try_into().unwrap(),
        )
        .unwrap();
        for _ in 0..4 {
            pair.exchange().unwrap();
        }
        let negotiated = pair.server.take_completed().unwrap();
        assert_eq!(negotiated.version, "TLSv1_2");
        assert!(pair.server.traffic().is_none(), "rustls keeps TLS 1.2");
        assert_eq!(negotiated.server_name.as_deref(), Some("localhost"));
        let wire = client_sends(&mut pair, b"over TLS 1.2");
        pair.to_server.bytes.extend(wire);
        assert_eq!(server_reads(&mut pair, 4096), b"over TLS 1.2");
        pair.server.write_plaintext(b"and back");
        assert_eq!(client_receives(&mut pair), b"and back");
        pair.server.close_notify();
        client_receives(&mut pair);
        assert!(pair.client.process_new_packets().unwrap().peer_has_closed());
        assert_eq!(pair.server.buffered_bytes(), 0);
    }

    #[test]
    fn a_key_update_from_the_client_is_answered_and_traffic_goes_on() {
        let mut pair = established();
        pair.client.refresh_traffic_keys().unwrap();
        let wire = client_sends(&mut pair, b"after the update");
        pair.to_server.bytes.extend(wire);
        assert_eq!(server_reads(&mut pair, 4096), b"after the update");
        pair.server.write_plaintext(b"under new keys");
        assert_eq!(client_receives(&mut pair), b"under new keys");
        assert_eq!(pair.server.buffered_bytes(), 0);
    }

    #[test]
    fn a_key_update_right_behind_the_clients_finished_is_answered() {
        let mut pair = pair(&["localhost"], "localhost");
        while pair.client.is_handshaking() {
            pair.exchange().unwrap();
        }
        // The client's Finished, its KeyUpdate (asking for ours) and a message: one flight.
        pair.client.refresh_traffic_keys().unwrap();
        let wire = client_sends(&mut pair, b"first words");
        pair.to_server.bytes.extend(wire);
        assert_eq!(server_reads(&mut pair, 4096), b"first words");
        assert!(pair.server.traffic().is_some());
        pair.server.write_plaintext(b"answered under the new key");
        assert_eq!(client_receives(&mut pair), b"answered under the new key");
    }

    #[test]
    fn the_server_updates_its_key_before_the_confidentiality_limit() {
        let mut pair = established();
        pair.server.traffic().unwrap().set_tx_limit(3);
        let mut expected = Vec::new();
        for round in 0..10u8 {
            let message = vec![round; 20_000];
            pair.server.write_plaintext(&message);
            expected.extend_from_slice(&message);
        }
        assert_eq!(client_receives(&mut pair), expected);
        // And the client's own traffic still reads (its key did not change).
        let wire = client_sends(&mut pair, b"still here");
        pair.to_server.bytes.extend(wire);
        assert_eq!(server_reads(&mut pair, 4096), b"still here");
    }

    #[test]
    fn an_idle_session_keeps_no_aead_context() {
        let mut pair = established();
        assert_eq!(pair.server.traffic().unwrap().built(), (false, false));
        let wire = client_sends(&mut pair, b"ping");
        pair.to_server.bytes.extend(wire);
        assert_eq!(server_reads(&mut pair, 4096), b"ping");
        assert_eq!(
            pair.server.traffic().unwrap().built(),
            (false, false),
            "the socket was drained"
        );
        pair.server.write_plaintext(b"pong");
        assert_eq!(pair.server.traffic().unwrap().built(), (false, false));
        assert_eq!(client_receives(&mut pair), b"pong");
    }

    #[test]
    fn records_after_close_notify_are_not_read() {
        let mut pair = established();
        pair.client.writer().write_all(b"last words").unwrap();
        pair.client.send_close_notify();
        let mut wire = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
        // Garbage after the alert: never looked at.
        wire.extend_from_slice(&[0x17, 3, 3, 0, 20]);
        wire.extend_from_slice(&[0; 20]);
        pair.to_server.bytes.extend(wire);
        let mut plain = [0u8; 4096];
        let n = pair
            .server
            .read_plaintext(&mut pair.to_server, &mut plain)
            .unwrap();
        assert_eq!(&plain[..n], b"last words");
        assert_eq!(
            pair.server
                .read_plaintext(&mut pair.to_server, &mut plain)
                .unwrap(),
            0
        );
    }

    #[test]
    fn a_record_longer_than_tls_allows_is_refused_before_it_arrives() {
        let mut pair = established();
        pair.to_server
            .bytes
            .extend([0x17, 3, 3, 0x41, 0x01, 0, 0, 0]);
        let mut plain = [0u8; 4096];
        let error = pair
            .server
            .read_plaintext(&mut pair.to_server, &mut plain)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let alert = pair.server.take_all_ciphertext();
        pair.client.read_tls(&mut alert.as_slice()).unwrap();
        assert_eq!(
            pair.client.process_new_packets().unwrap_err(),
            rustls::Error::AlertReceived(rustls::AlertDescription::RecordOverflow)
        );
    }

    #[test]
    fn a_hello_in_many_small_records_still_completes() {
        let mut pair = pair(&["localhost"], "localhost");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pair_certificate(&pair)).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.max_fragment_size = Some(64);
        pair.client = rustls::ClientConnection::new(
            Arc::new(config),
            "localhost".to_owned().try_into().unwrap(),
        )
        .unwrap();
        for _ in 0..4 {
            pair.exchange().unwrap();
        }
        let negotiated = pair.server.take_completed().unwrap();
        assert_eq!(negotiated.server_name.as_deref(), Some("localhost"));
        let message = vec![9u8; 1000];
        let wire = client_sends(&mut pair, &message);
        pair.to_server.bytes.extend(wire);
        assert_eq!(server_reads(&mut pair, 4096), message);
        assert_eq!(pair.server.buffered_bytes(), 0);
    }

    /// The certificate the pair's server presents.
    fn pair_certificate(pair: &Pair) -> rustls::pki_types::CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(pair._dir.0.join("cert.pem")).unwrap()
    }

    /// Accepts any server certificate (the TLS 1.2 test is about the records, not trust).
    #[derive(Debug)]
    struct AnyCertificate;

    impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// Heap bytes in use in the whole process, as glibc counts them (chunk headers and
    /// rounding included: what the pages hold). aws-lc allocates with `malloc` directly, so a
    /// Rust allocator would not see its contexts.
    fn heap_in_use() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        unsafe { libc::mallinfo2() }.uordblks
    }

    /// The memory an idle established session holds, part by part. Run alone, with glibc's
    /// per-thread cache off (its chunks would still count as in use when freed):
    /// `GLIBC_TUNABLES=glibc.malloc.tcache_count=0 cargo test --release -p wsplice --lib
    /// idle_session_memory -- --ignored --nocapture --test-threads=1`.
    #[test]
    #[ignore = "measurement: needs a single test thread"]
    fn idle_session_memory() {
        use rustls::crypto::cipher::{AeadKey, Iv};
        let cases: [(&str, rustls::crypto::CryptoProvider); 2] = [
            ("TLS 1.3", rustls::crypto::aws_lc_rs::default_provider()),
            ("TLS 1.2", {
                let mut provider = rustls::crypto::aws_lc_rs::default_provider();
                provider.cipher_suites.retain(|s| s.tls13().is_none());
                provider
            }),
        ];
        for (name, provider) in cases {
            let mut pair = pair_with(&["localhost"], "localhost", provider);
            for _ in 0..4 {
                pair.exchange().unwrap();
            }
            let wire = client_sends(&mut pair, b"hello");
            pair.to_server.bytes.extend(wire);
            assert_eq!(server_reads(&mut pair, 4096), b"hello");
            pair.server.write_plaintext(b"hello back");
            assert_eq!(client_receives(&mut pair), b"hello back");
            assert_eq!(pair.server.buffered_bytes(), 0);
            let suite = pair.server.negotiated().unwrap().suite;
            let server = pair.server;
            let before = heap_in_use();
            drop(server);
            let connection = before - heap_in_use();
            println!(
                "{name} {suite}: TlsSession {} B (boxed), its heap {} B (the box of rustls' \
                 connection: {} B; of the session's own record layer, TLS 1.3: {} B)",
                std::mem::size_of::<TlsSession>(),
                connection,
                std::mem::size_of::<UnbufferedServerConnection>(),
                std::mem::size_of::<Traffic>(),
            );
        }
        use rustls::crypto::{aws_lc_rs, ring};
        for (name, suite) in [
            (
                "aws-lc-rs AES-GCM",
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ),
            (
                "aws-lc-rs ChaCha20",
                aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ),
            ("ring AES-GCM", ring::cipher_suite::TLS13_AES_256_GCM_SHA384),
        ] {
            let aead = suite.tls13().unwrap().aead_alg;
            let before = heap_in_use();
            let encrypter = aead.encrypter(AeadKey::from([7; 32]), Iv::new([1; 12]));
            let decrypter = aead.decrypter(AeadKey::from([7; 32]), Iv::new([1; 12]));
            println!(
                "{name} encrypter + decrypter (the record layer): {} B",
                heap_in_use() - before
            );
            drop((encrypter, decrypter));
        }
    }
}
