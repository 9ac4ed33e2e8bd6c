//! A TLS 1.3 session once its handshake is over: the session protects its records itself
//! ([`RecordKeys`], one per direction) and rustls keeps only what a key update needs (its
//! kernel connection, as for kTLS). An idle session then holds about 1 KB instead of rustls'
//! 3.6 KB: no record buffers, no AEAD contexts.
//!
//! What a server may receive after the handshake (RFC 8446 §4.6, §6): application data,
//! alerts, and KeyUpdate. Anything else ends the session with the alert the RFC names.

use std::ops::Range;

use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::{CipherSuite, ProtocolVersion};

use super::record::{ContentType, RecordError, RecordKeys, MAX_PLAINTEXT};
use crate::config::CryptoProvider;

/// Alert descriptions (RFC 8446 §6) this module sends or reads.
mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    pub const INTERNAL_ERROR: u8 = 80;
    pub const USER_CANCELED: u8 = 90;
}

/// Alert levels.
const WARNING: u8 = 1;
const FATAL: u8 = 2;

/// The handshake message type of KeyUpdate.
const KEY_UPDATE: u8 = 24;

/// Why an established session cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// A record was malformed, too long, or did not decrypt.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The client sent a fatal alert.
    #[error("the client sent TLS alert {0}")]
    PeerAlert(u8),
    /// The client sent a post-handshake message a server does not take, or split one over
    /// records.
    #[error("unexpected TLS handshake message after the handshake")]
    UnexpectedHandshake,
    /// An alert or KeyUpdate that does not parse.
    #[error("malformed TLS {0}")]
    Malformed(&'static str),
    /// A KeyUpdate whose request is neither "update requested" nor "not requested".
    #[error("TLS KeyUpdate with an unknown request")]
    KeyUpdateRequest,
    /// rustls could not derive the next traffic keys.
    #[error("TLS key update failed: {0}")]
    KeyUpdate(#[source] rustls::Error),
    /// rustls did not hand the traffic keys over after the handshake.
    #[error("TLS traffic keys not handed over: {0}")]
    TakeOver(#[source] rustls::Error),
}

impl TrafficError {
    /// The alert that tells the client why (none when the client ended it).
    fn alert(&self) -> Option<u8> {
        match self {
            TrafficError::Record(RecordError::Overflow) => Some(alert::RECORD_OVERFLOW),
            TrafficError::Record(RecordError::UnexpectedType)
            | TrafficError::UnexpectedHandshake => Some(alert::UNEXPECTED_MESSAGE),
            TrafficError::Record(RecordError::BadRecordMac) => Some(alert::BAD_RECORD_MAC),
            TrafficError::Record(RecordError::SequenceExhausted | RecordError::UnknownAead)
            | TrafficError::KeyUpdate(_)
            | TrafficError::TakeOver(_) => Some(alert::INTERNAL_ERROR),
            TrafficError::Malformed(_) => Some(alert::DECODE_ERROR),
            TrafficError::KeyUpdateRequest => Some(alert::ILLEGAL_PARAMETER),
            TrafficError::PeerAlert(_) => None,
        }
    }
}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application bytes, at this range of the record.
    Data(Range<usize>),
    /// Nothing for the application (a key update, a warning alert).
    Nothing,
    /// The client's `close_notify`: nothing after it is read.
    Closed,
}

/// An established TLS 1.3 session's record layer.
pub struct Traffic {
    /// rustls' remains of the connection: derives the next traffic secrets.
    kernel: KernelConnection<ServerConnectionData>,
    rx: RecordKeys,
    tx: RecordKeys,
    /// The suite's confidentiality limit: records sealed under one key before it is updated.
    tx_limit: u64,
    resumed: bool,
}

impl std::fmt::Debug for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traffic")
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .finish_non_exhaustive()
    }
}

impl Traffic {
    /// Takes the traffic secrets over from rustls' connection, whose handshake is over and
    /// which has nothing left to send (its config enables secret extraction). `resumed`: what
    /// the handshake was, for the access log.
    pub fn new(
        conn: UnbufferedServerConnection,
        provider: CryptoProvider,
        resumed: bool,
    ) -> Result<Traffic, TrafficError> {
        let (secrets, kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(TrafficError::TakeOver)?;
        let tx_limit = kernel
            .negotiated_cipher_suite()
            .tls13()
            .map_or(u64::MAX, |suite| suite.common.confidentiality_limit);
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        Ok(Traffic {
            rx: RecordKeys::new(provider, &rx, rx_seq)?,
            tx: RecordKeys::new(provider, &tx, tx_seq)?,
            kernel,
            tx_limit,
            resumed,
        })
    }

    /// The protocol version (TLS 1.3).
    pub fn version(&self) -> ProtocolVersion {
        self.kernel.protocol_version()
    }

    /// The cipher suite.
    pub fn suite(&self) -> CipherSuite {
        self.kernel.negotiated_cipher_suite().suite()
    }

    /// Whether the handshake resumed a session.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Drops both AEAD contexts: the session is quiet.
    pub fn release(&mut self) {
        self.rx.release();
        self.tx.release();
    }

    /// Opens one whole record in place (`record`: header included). A KeyUpdate the client
    /// asks to be answered is answered into `outgoing`.
    pub fn open(
        &mut self,
        record: &mut [u8],
        outgoing: &mut Vec<u8>,
    ) -> Result<Opened, TrafficError> {
        let (content_type, range) = self.rx.open(record)?;
        let content = &record[range.clone()];
        match content_type {
            ContentType::ApplicationData => Ok(Opened::Data(range)),
            ContentType::Alert => match *content {
                [_, alert::CLOSE_NOTIFY] => Ok(Opened::Closed),
                // "The peer canceled the handshake": after it, a warning to be ignored.
                [WARNING, alert::USER_CANCELED] => Ok(Opened::Nothing),
                [_, description] => Err(TrafficError::PeerAlert(description)),
                _ => Err(TrafficError::Malformed("alert")),
            },
            ContentType::Handshake => {
                let request = key_update_request(content)?;
                self.key_update_received(request, outgoing)?;
                Ok(Opened::Nothing)
            }
        }
    }

    /// Seals `bytes` into application data records (16 KB each) appended to `outgoing`.
    pub fn seal(&mut self, bytes: &[u8], outgoing: &mut Vec<u8>) -> Result<(), TrafficError> {
        for chunk in bytes.chunks(MAX_PLAINTEXT) {
            if self.tx.seq() >= self.tx_limit.saturating_sub(1) {
                // One more record (the KeyUpdate) under the old key, then a new key.
                self.update_tx(outgoing)?;
            }
            self.tx
                .seal(ContentType::ApplicationData, chunk, outgoing)?;
        }
        Ok(())
    }

    /// Seals `close_notify`.
    pub fn seal_close_notify(&mut self, outgoing: &mut Vec<u8>) -> Result<(), TrafficError> {
        self.tx.seal(
            ContentType::Alert,
            &[WARNING, alert::CLOSE_NOTIFY],
            outgoing,
        )?;
        Ok(())
    }

    /// Seals the fatal alert that tells the client why `error` ends the session, if any (best
    /// effort: the session closes anyway).
    pub fn seal_alert_for(&mut self, error: &TrafficError, outgoing: &mut Vec<u8>) {
        if let Some(description) = error.alert() {
            let _ = self
                .tx
                .seal(ContentType::Alert, &[FATAL, description], outgoing);
        }
    }

    /// The client changed its sending key; answers with ours when it asks.
    fn key_update_received(
        &mut self,
        update_requested: bool,
        outgoing: &mut Vec<u8>,
    ) -> Result<(), TrafficError> {
        let (seq, secrets) = self
            .kernel
            .update_rx_secret()
            .map_err(TrafficError::KeyUpdate)?;
        self.rx = self.rx.next(&secrets, seq)?;
        if update_requested {
            self.update_tx(outgoing)?;
        }
        Ok(())
    }

    /// Sends a KeyUpdate (not asking for one back) and moves to the next sending key.
    fn update_tx(&mut self, outgoing: &mut Vec<u8>) -> Result<(), TrafficError> {
        self.tx
            .seal(ContentType::Handshake, &[KEY_UPDATE, 0, 0, 1, 0], outgoing)?;
        let (seq, secrets) = self
            .kernel
            .update_tx_secret()
            .map_err(TrafficError::KeyUpdate)?;
        self.tx = self.tx.next(&secrets, seq)?;
        Ok(())
    }

    /// Sets the confidentiality limit, to see key updates happen.
    #[cfg(test)]
    pub fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    /// Whether an AEAD context is built (rx, tx).
    #[cfg(test)]
    pub fn built(&self) -> (bool, bool) {
        (self.rx.is_built(), self.tx.is_built())
    }
}

/// The content of a handshake record after the handshake: exactly one KeyUpdate (a server gets
/// no other post-handshake message; a message split over records, or one followed by another
/// in the record that changes the key, is refused as RFC 8446 §5.1 asks). Whether it asks for
/// an update back.
fn key_update_request(content: &[u8]) -> Result<bool, TrafficError> {
    match *content {
        [KEY_UPDATE, 0, 0, 1, request] => match request {
            0 => Ok(false),
            1 => Ok(true),
            // RFC 8446 §4.6.3: any other value is an illegal_parameter.
            _ => Err(TrafficError::KeyUpdateRequest),
        },
        [KEY_UPDATE, ..] => Err(TrafficError::Malformed("KeyUpdate")),
        _ => Err(TrafficError::UnexpectedHandshake),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_key_update_is_taken_after_the_handshake() {
        assert_eq!(key_update_request(&[24, 0, 0, 1, 0]).ok(), Some(false));
        assert_eq!(key_update_request(&[24, 0, 0, 1, 1]).ok(), Some(true));
        assert!(matches!(
            key_update_request(&[24, 0, 0, 1, 2]),
            Err(TrafficError::KeyUpdateRequest)
        ));
        for malformed in [&[24, 0, 0, 2, 1, 0][..], &[24, 0, 0, 1]] {
            assert!(matches!(
                key_update_request(malformed),
                Err(TrafficError::Malformed(_))
            ));
        }
        // Two KeyUpdates in one record: the first changes the key mid-record.
        assert!(key_update_request(&[24, 0, 0, 1, 0, 24, 0, 0, 1, 0]).is_err());
        // A NewSessionTicket, a certificate, an empty record.
        for unexpected in [&[4, 0, 0, 0][..], &[11, 0, 0, 0], &[]] {
            assert!(matches!(
                key_update_request(unexpected),
                Err(TrafficError::UnexpectedHandshake)
            ));
        }
    }

    #[test]
    fn every_error_the_client_did_not_end_itself_names_an_alert() {
        assert_eq!(
            TrafficError::Record(RecordError::BadRecordMac).alert(),
            Some(alert::BAD_RECORD_MAC)
        );
        assert_eq!(
            TrafficError::Record(RecordError::Overflow).alert(),
            Some(alert::RECORD_OVERFLOW)
        );
        assert_eq!(TrafficError::PeerAlert(40).alert(), None);
        assert_eq!(
            TrafficError::UnexpectedHandshake.alert(),
            Some(alert::UNEXPECTED_MESSAGE)
        );
        assert_eq!(
            TrafficError::KeyUpdateRequest.alert(),
            Some(alert::ILLEGAL_PARAMETER)
        );
    }
}
