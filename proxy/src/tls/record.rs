//! TLS 1.3 record protection (RFC 8446 §5) for one direction of an established session: the
//! traffic key, its IV and the record sequence number, and the AEAD that seals and opens
//! records with them.
//!
//! rustls does the handshake; once it is over, the session takes the traffic secrets from it
//! (as kTLS would) and protects records here. The point is memory: an AEAD context costs about
//! 600 bytes of key schedule and GHASH tables, and an idle tunnel needs none. The keys are kept
//! as bytes (about 60 per direction) and the context is built when a record comes or goes
//! (≈150 ns) and released when the session goes quiet ([`RecordKeys::release`]).

use std::ops::Range;

use rustls::ConnectionTrafficSecrets;
use zeroize::Zeroize;

use crate::config::CryptoProvider;

/// Bytes of a record header: content type, legacy version, length.
pub const HEADER_LEN: usize = 5;

/// Bytes of the AEAD tag of every TLS 1.3 suite.
const TAG_LEN: usize = 16;

/// The largest plaintext of one record (2^14).
pub const MAX_PLAINTEXT: usize = 1 << 14;

/// The largest protected record body: plaintext, content type, padding and tag (2^14 + 256).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

/// The outer content type of every protected TLS 1.3 record.
const APPLICATION_DATA: u8 = 23;

/// A TLS 1.3 record content type, as the protected record's inner type names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// An alert (close_notify or a fatal one).
    Alert,
    /// A post-handshake handshake message (KeyUpdate, for a server).
    Handshake,
    /// Application bytes.
    ApplicationData,
}

impl ContentType {
    /// The type byte on the wire.
    fn byte(self) -> u8 {
        match self {
            ContentType::Alert => 21,
            ContentType::Handshake => 22,
            ContentType::ApplicationData => APPLICATION_DATA,
        }
    }

    fn parse(byte: u8) -> Option<ContentType> {
        match byte {
            21 => Some(ContentType::Alert),
            22 => Some(ContentType::Handshake),
            APPLICATION_DATA => Some(ContentType::ApplicationData),
            _ => None,
        }
    }
}

/// Why a record cannot be opened or sealed. Each maps to the alert the peer is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A record longer than TLS allows (`record_overflow`).
    #[error("TLS record too long")]
    Overflow,
    /// A record that is not application data on the outside, or has no or an unknown inner
    /// content type (`unexpected_message`).
    #[error("unexpected TLS record type")]
    UnexpectedType,
    /// A record that does not decrypt: tampered with, or not ours (`bad_record_mac`).
    #[error("TLS record failed to decrypt")]
    BadRecordMac,
    /// The sequence number ran out: no more records under these keys.
    #[error("TLS record sequence number exhausted")]
    SequenceExhausted,
    /// Traffic secrets of an AEAD this module does not implement (see [`protects`]).
    #[error("TLS record protection of this suite is rustls' own")]
    UnknownAead,
}

/// Whether this module protects the records of `suite` (the TLS 1.3 suites rustls offers).
pub fn protects(suite: rustls::CipherSuite) -> bool {
    matches!(
        suite,
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
            | rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
    )
}

/// How long the record at the start of `bytes` is, header included: `None` until its header is
/// in. Fails for a record longer than TLS allows, before its bytes are waited for.
pub fn record_len(bytes: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if body > MAX_CIPHERTEXT {
        return Err(RecordError::Overflow);
    }
    Ok(Some(HEADER_LEN + body))
}

/// The AEAD of a suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Aes128Gcm,
    Aes256Gcm,
    ChaCha20Poly1305,
}

/// A built AEAD context, from the crate of the listener's crypto provider (aws-lc keeps its
/// context on the heap itself; ring's is boxed here).
enum Context {
    AwsLc(aws_lc_rs::aead::LessSafeKey),
    Ring(Box<ring::aead::LessSafeKey>),
}

/// Runs `$body` with `$key` bound to the context's key and `$aead` to its crate's `aead`
/// module: aws-lc-rs and ring share that API, not its types, so the code is written once.
macro_rules! with_aead {
    ($context:expr, |$key:ident, $aead:ident| $body:expr) => {
        match $context {
            Context::AwsLc($key) => {
                use aws_lc_rs::aead as $aead;
                $body
            }
            Context::Ring($key) => {
                use ring::aead as $aead;
                $body
            }
        }
    };
}

/// The traffic key of one direction. The AEAD context is built on use and released when the
/// session is quiet: an idle session holds the key's bytes only.
pub struct RecordKeys {
    provider: CryptoProvider,
    algorithm: Algorithm,
    /// The key (16 or 32 bytes are used), zeroed on drop.
    key: [u8; 32],
    iv: [u8; 12],
    /// The sequence number of the next record.
    seq: u64,
    context: Option<Context>,
}

impl std::fmt::Debug for RecordKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKeys")
            .field("algorithm", &self.algorithm)
            .field("seq", &self.seq)
            .field("built", &self.context.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for RecordKeys {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

impl RecordKeys {
    /// Keys for the traffic secrets rustls handed over, starting at record `seq`.
    pub fn new(
        provider: CryptoProvider,
        secrets: &ConnectionTrafficSecrets,
        seq: u64,
    ) -> Result<Self, RecordError> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Algorithm::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Algorithm::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Algorithm::ChaCha20Poly1305, key, iv)
            }
            _ => return Err(RecordError::UnknownAead),
        };
        let mut keys = RecordKeys {
            provider,
            algorithm,
            key: [0; 32],
            iv: [0; 12],
            seq,
            context: None,
        };
        let key = key.as_ref();
        keys.key[..key.len()].copy_from_slice(key);
        keys.iv.copy_from_slice(iv.as_ref());
        Ok(keys)
    }

    /// The keys after a key update (the same crate's AEAD, new secrets from record `seq`).
    pub fn next(&self, secrets: &ConnectionTrafficSecrets, seq: u64) -> Result<Self, RecordError> {
        RecordKeys::new(self.provider, secrets, seq)
    }

    /// The sequence number of the next record.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Drops the AEAD context (built again on the next record).
    pub fn release(&mut self) {
        self.context = None;
    }

    /// Whether the AEAD context is built.
    #[cfg(test)]
    pub fn is_built(&self) -> bool {
        self.context.is_some()
    }

    /// Appends one record holding `content` (at most [`MAX_PLAINTEXT`] bytes) of `content_type`.
    pub fn seal(
        &mut self,
        content_type: ContentType,
        content: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        debug_assert!(content.len() <= MAX_PLAINTEXT);
        let start = out.len();
        out.extend_from_slice(&record_header(content.len() + 1 + TAG_LEN));
        out.extend_from_slice(content);
        out.push(content_type.byte());
        self.seal_tail(start, out)
    }

    /// Encrypts the record that starts at `start` in `out` (its header, then its inner
    /// plaintext up to the end of `out`) and appends its tag.
    fn seal_tail(&mut self, start: usize, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let nonce = match self.next_nonce() {
            Ok(nonce) => nonce,
            Err(error) => {
                out.truncate(start);
                return Err(error);
            }
        };
        let Some((header, inner)) = out
            .get_mut(start..)
            .and_then(|record| record.split_first_chunk_mut::<HEADER_LEN>())
        else {
            return Err(RecordError::UnexpectedType);
        };
        let aad = *header;
        let mut tag = [0u8; TAG_LEN];
        let sealed = with_aead!(self.context(), |key, aead| key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                inner,
            )
            .map(|t| tag.copy_from_slice(t.as_ref()))
            .is_ok());
        if !sealed {
            // Only a plaintext longer than the AEAD allows fails, which a record never is.
            out.truncate(start);
            return Err(RecordError::Overflow);
        }
        out.extend_from_slice(&tag);
        Ok(())
    }

    /// Opens the whole record `record` (header included, as [`record_len`] measured it) in
    /// place: its inner content type and where its content now lies in `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(ContentType, Range<usize>), RecordError> {
        let Some((header, body)) = record.split_first_chunk_mut::<HEADER_LEN>() else {
            return Err(RecordError::UnexpectedType);
        };
        if header[0] != APPLICATION_DATA {
            return Err(RecordError::UnexpectedType);
        }
        if body.len() > MAX_CIPHERTEXT {
            return Err(RecordError::Overflow);
        }
        if body.len() < TAG_LEN {
            return Err(RecordError::BadRecordMac);
        }
        let nonce = self.next_nonce()?;
        let aad = *header;
        let inner_len = with_aead!(self.context(), |key, aead| key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                body,
            )
            .map(|plain| plain.len())
            .ok())
        .ok_or(RecordError::BadRecordMac)?;
        // TLSInnerPlaintext: content, the content type, then zeros of padding.
        let inner = &body[..inner_len];
        let type_at = inner
            .iter()
            .rposition(|&byte| byte != 0)
            .ok_or(RecordError::UnexpectedType)?;
        if type_at > MAX_PLAINTEXT {
            return Err(RecordError::Overflow);
        }
        let content_type = ContentType::parse(inner[type_at]).ok_or(RecordError::UnexpectedType)?;
        Ok((content_type, HEADER_LEN..HEADER_LEN + type_at))
    }

    /// The nonce of the next record (the IV xor its sequence number, RFC 8446 §5.3), and the
    /// sequence number moves on.
    fn next_nonce(&mut self) -> Result<[u8; 12], RecordError> {
        if self.seq == u64::MAX {
            return Err(RecordError::SequenceExhausted);
        }
        let mut nonce = self.iv;
        for (byte, seq) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *byte ^= seq;
        }
        self.seq += 1;
        Ok(nonce)
    }

    /// The AEAD context, built if it was released.
    fn context(&mut self) -> &Context {
        let (provider, algorithm, key) = (self.provider, self.algorithm, &self.key);
        self.context
            .get_or_insert_with(|| build(provider, algorithm, key))
    }
}

/// The header of a protected record with a body of `body_len` bytes (at most 2^14 + 256, so it
/// fits the 16-bit length).
fn record_header(body_len: usize) -> [u8; HEADER_LEN] {
    let [high, low] = u16::try_from(body_len).unwrap_or(u16::MAX).to_be_bytes();
    [APPLICATION_DATA, 3, 3, high, low]
}

/// Builds the AEAD context of `algorithm` for `key` with `provider`'s crate.
fn build(provider: CryptoProvider, algorithm: Algorithm, key: &[u8; 32]) -> Context {
    let key_len = match algorithm {
        Algorithm::Aes128Gcm => 16,
        Algorithm::Aes256Gcm | Algorithm::ChaCha20Poly1305 => 32,
    };
    let key = &key[..key_len];
    // The key length matches the algorithm by construction: neither crate can refuse it.
    match provider {
        CryptoProvider::AwsLcRs => {
            use aws_lc_rs::aead;
            let algorithm = match algorithm {
                Algorithm::Aes128Gcm => &aead::AES_128_GCM,
                Algorithm::Aes256Gcm => &aead::AES_256_GCM,
                Algorithm::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
            };
            #[allow(clippy::expect_used)]
            let key = aead::UnboundKey::new(algorithm, key).expect("key length matches the AEAD");
            Context::AwsLc(aead::LessSafeKey::new(key))
        }
        CryptoProvider::Ring => {
            use ring::aead;
            let algorithm = match algorithm {
                Algorithm::Aes128Gcm => &aead::AES_128_GCM,
                Algorithm::Aes256Gcm => &aead::AES_256_GCM,
                Algorithm::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
            };
            #[allow(clippy::expect_used)]
            let key = aead::UnboundKey::new(algorithm, key).expect("key length matches the AEAD");
            Context::Ring(Box::new(aead::LessSafeKey::new(key)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(algorithm: Algorithm) -> ConnectionTrafficSecrets {
        let key = AeadKey::from([0x42; 32]);
        let iv = Iv::new([0x24; 12]);
        match algorithm {
            // rustls hands AES-128 keys over 16 bytes long; the first 16 of these are used.
            Algorithm::Aes128Gcm => ConnectionTrafficSecrets::Aes128Gcm { key, iv },
            Algorithm::Aes256Gcm => ConnectionTrafficSecrets::Aes256Gcm { key, iv },
            Algorithm::ChaCha20Poly1305 => ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv },
        }
    }

    fn keys(provider: CryptoProvider, algorithm: Algorithm) -> RecordKeys {
        RecordKeys::new(provider, &secrets(algorithm), 0).unwrap()
    }

    const ALL: [(CryptoProvider, Algorithm); 6] = [
        (CryptoProvider::AwsLcRs, Algorithm::Aes128Gcm),
        (CryptoProvider::AwsLcRs, Algorithm::Aes256Gcm),
        (CryptoProvider::AwsLcRs, Algorithm::ChaCha20Poly1305),
        (CryptoProvider::Ring, Algorithm::Aes128Gcm),
        (CryptoProvider::Ring, Algorithm::Aes256Gcm),
        (CryptoProvider::Ring, Algorithm::ChaCha20Poly1305),
    ];

    #[test]
    fn sealed_records_open_in_order_with_either_crate() {
        for (provider, algorithm) in ALL {
            let mut sealer = keys(provider, algorithm);
            // The other crate opens what this one sealed: both follow RFC 8446.
            let other = match provider {
                CryptoProvider::AwsLcRs => CryptoProvider::Ring,
                CryptoProvider::Ring => CryptoProvider::AwsLcRs,
            };
            let mut opener = keys(other, algorithm);
            let mut wire = Vec::new();
            for content in [&b""[..], b"hello", &[7u8; MAX_PLAINTEXT]] {
                sealer
                    .seal(ContentType::ApplicationData, content, &mut wire)
                    .unwrap();
            }
            sealer.seal(ContentType::Alert, &[1, 0], &mut wire).unwrap();
            let mut opened = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let len = record_len(&wire[at..]).unwrap().unwrap();
                let record = &mut wire[at..at + len];
                let (content_type, range) = opener.open(record).unwrap();
                opened.push((content_type, record[range].to_vec()));
                at += len;
            }
            assert_eq!(
                opened,
                vec![
                    (ContentType::ApplicationData, Vec::new()),
                    (ContentType::ApplicationData, b"hello".to_vec()),
                    (ContentType::ApplicationData, vec![7u8; MAX_PLAINTEXT]),
                    (ContentType::Alert, vec![1, 0]),
                ],
                "{provider:?} {algorithm:?}"
            );
            assert_eq!(opener.seq(), 4);
        }
    }

    #[test]
    fn a_flipped_bit_or_a_replayed_record_does_not_open() {
        for (provider, algorithm) in ALL {
            let mut sealer = keys(provider, algorithm);
            let mut wire = Vec::new();
            sealer
                .seal(ContentType::ApplicationData, b"first", &mut wire)
                .unwrap();
            let original = wire.clone();
            for at in 0..wire.len() {
                let mut tampered = original.clone();
                tampered[at] ^= 0x01;
                let result = keys(provider, algorithm).open(&mut tampered);
                assert!(result.is_err(), "{provider:?} {algorithm:?} byte {at}");
            }
            // The same record again is sealed for sequence number 0, not 1.
            let mut opener = keys(provider, algorithm);
            opener.open(&mut wire.clone()).unwrap();
            assert_eq!(
                opener.open(&mut wire.clone()),
                Err(RecordError::BadRecordMac)
            );
        }
    }

    #[test]
    fn padding_is_stripped_and_a_record_of_only_zeros_is_refused() {
        for (provider, algorithm) in ALL {
            // Content, its type (handshake), then padding, as a peer may send it.
            let mut padded = Vec::new();
            keys(provider, algorithm).seal_inner(b"ab\x16\0\0\0", &mut padded);
            let (content_type, range) = keys(provider, algorithm).open(&mut padded).unwrap();
            assert_eq!(
                (content_type, &padded[range]),
                (ContentType::Handshake, &b"ab"[..])
            );
            let mut zeros = Vec::new();
            keys(provider, algorithm).seal_inner(&[0, 0, 0], &mut zeros);
            assert_eq!(
                keys(provider, algorithm).open(&mut zeros),
                Err(RecordError::UnexpectedType)
            );
            let mut unknown = Vec::new();
            keys(provider, algorithm).seal_inner(b"x\x18", &mut unknown);
            assert_eq!(
                keys(provider, algorithm).open(&mut unknown),
                Err(RecordError::UnexpectedType)
            );
        }
    }

    #[test]
    fn lengths_and_outer_types_are_checked_before_decrypting() {
        assert_eq!(record_len(&[23, 3, 3, 0]), Ok(None));
        assert_eq!(record_len(&[23, 3, 3, 0, 17, 9]), Ok(Some(22)));
        assert_eq!(
            record_len(&[23, 3, 3, 0x41, 0x01]),
            Err(RecordError::Overflow)
        );
        assert_eq!(record_len(&[23, 3, 3, 0x41, 0x00]), Ok(Some(5 + 16640)));
        let mut keys = keys(CryptoProvider::AwsLcRs, Algorithm::Aes128Gcm);
        let mut wire = Vec::new();
        keys.seal(ContentType::ApplicationData, b"x", &mut wire)
            .unwrap();
        wire[0] = 21;
        assert_eq!(
            self::keys(CryptoProvider::AwsLcRs, Algorithm::Aes128Gcm).open(&mut wire),
            Err(RecordError::UnexpectedType)
        );
        assert_eq!(
            self::keys(CryptoProvider::AwsLcRs, Algorithm::Aes128Gcm)
                .open(&mut [23, 3, 3, 0, 3, 1, 2, 3]),
            Err(RecordError::BadRecordMac)
        );
    }

    #[test]
    fn a_released_context_is_built_again_and_the_sequence_goes_on() {
        let mut sealer = keys(CryptoProvider::AwsLcRs, Algorithm::Aes128Gcm);
        let mut opener = keys(CryptoProvider::AwsLcRs, Algorithm::Aes128Gcm);
        for round in 0..3u8 {
            let mut wire = Vec::new();
            sealer
                .seal(ContentType::ApplicationData, &[round], &mut wire)
                .unwrap();
            assert!(sealer.is_built());
            sealer.release();
            assert!(!sealer.is_built());
            let (_, range) = opener.open(&mut wire).unwrap();
            assert_eq!(wire[range], [round]);
            opener.release();
        }
        assert_eq!((sealer.seq(), opener.seq()), (3, 3));
    }

    #[test]
    fn the_last_sequence_number_is_never_used() {
        let mut keys = RecordKeys::new(
            CryptoProvider::AwsLcRs,
            &secrets(Algorithm::ChaCha20Poly1305),
            u64::MAX - 1,
        )
        .unwrap();
        let mut wire = Vec::new();
        keys.seal(ContentType::ApplicationData, b"last", &mut wire)
            .unwrap();
        assert_eq!(
            keys.seal(ContentType::ApplicationData, b"one more", &mut wire),
            Err(RecordError::SequenceExhausted)
        );
    }

    impl RecordKeys {
        /// Seals `inner` as the whole TLSInnerPlaintext (content, type and padding as given).
        fn seal_inner(&mut self, inner: &[u8], out: &mut Vec<u8>) {
            let start = out.len();
            out.extend_from_slice(&record_header(inner.len() + TAG_LEN));
            out.extend_from_slice(inner);
            self.seal_tail(start, out).unwrap();
        }
    }
}
