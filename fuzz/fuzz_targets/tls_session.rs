//! A TLS client's bytes as the proxy's session reads them: `tls::TlsSession` (the ClientHello
//! peek that picks the configuration, then rustls' unbuffered connection and the buffers the
//! session keeps around it).
//!
//! Two kinds of input. *Garbage*: the input is what the client sends. *A real client*: a rustls
//! client (this target's own certificate, `fuzz/certs/`) handshakes with the session and sends
//! messages, and the input decides how its bytes are cut into socket reads, how small the
//! caller's buffer is, whether one byte is flipped or the stream cut short, whether the client
//! asks for a key update before each message (TLS 1.3 records are the session's own after the
//! handshake: `tls::record`), and whether the session echoes what it read.
//!
//! Properties: nothing panics, also when the session is called again after it failed; a read
//! returns at most the caller's buffer; with nothing flipped and nothing cut, the handshake
//! completes and every message arrives whole and in order, and so does every echo.

#![no_main]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use wsplice::config::{TlsConfig, TlsFiles};
use wsplice::tls::{server_configs, ServerConfigs, TlsSession};
use wsplice_fuzz::Input;

const CERT: &[u8] = include_bytes!("../certs/cert.pem");
const KEY: &[u8] = include_bytes!("../certs/key.pem");

/// The session's configurations and a client that trusts its certificate, made once.
fn setup() -> &'static (Arc<ServerConfigs>, Arc<rustls::ClientConfig>) {
    static SETUP: OnceLock<(Arc<ServerConfigs>, Arc<rustls::ClientConfig>)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir: PathBuf =
            std::env::temp_dir().join(format!("wsplice-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        std::fs::write(dir.join("cert.pem"), CERT).expect("certificate written");
        std::fs::write(dir.join("key.pem"), KEY).expect("key written");
        let config = TlsConfig::with_files(TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        });
        let server = server_configs(&config).expect("the fuzz certificate loads");
        let mut roots = rustls::RootCertStore::empty();
        for cert in pem_certificates(CERT) {
            roots
                .add(cert)
                .expect("the fuzz certificate is a trust anchor");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client))
    })
}

/// The certificates of a PEM file.
fn pem_certificates(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|cert| cert.expect("a PEM certificate"))
        .collect()
}

/// The socket as the session sees it: reads of at most the sizes the input chose, WouldBlock
/// when empty, end of stream once closed.
struct Socket {
    bytes: VecDeque<u8>,
    read_sizes: Vec<usize>,
    next: usize,
    closed: bool,
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.bytes.is_empty() {
            return if self.closed {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let size = self.read_sizes[self.next % self.read_sizes.len()];
        self.next += 1;
        let n = buf.len().min(self.bytes.len()).min(size);
        for (slot, byte) in buf.iter_mut().zip(self.bytes.drain(..n)) {
            *slot = byte;
        }
        Ok(n)
    }
}

/// Reads everything the session has now; `Err` once it failed (then it must stay callable).
fn read_all(session: &mut TlsSession, socket: &mut Socket, cap: usize) -> Result<Vec<u8>, ()> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; cap];
    for _ in 0..1_000_000 {
        match session.read_plaintext(socket, &mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => {
                assert!(n <= cap, "read {n} bytes into a {cap}-byte buffer");
                got.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The worker then waits for readiness: it comes at once while bytes are queued
                // (a short read is taken as "drained", which this socket's cut reads are not).
                if socket.bytes.is_empty() && !session.has_plaintext() {
                    return Ok(got);
                }
            }
            Err(_) => {
                // A failed session is still called by the worker: alert, goodbye, a late read.
                let _ = session.take_all_ciphertext();
                let _ = session.read_plaintext(socket, &mut buf);
                let _ = session.negotiated();
                return Err(());
            }
        }
    }
    panic!("the session kept returning bytes from a finite input");
}

fuzz_target!(|data: &[u8]| {
    let (configs, client_config) = setup();
    let mut input = Input::new(data);
    let mode = input.byte();
    let cap = 1 + usize::from(input.byte()) * 97;
    let read_sizes: Vec<usize> = input
        .take(8)
        .iter()
        .map(|&b| 1 + usize::from(b) * 67)
        .collect();
    let read_sizes = if read_sizes.is_empty() {
        vec![4096]
    } else {
        read_sizes
    };
    let mut socket = Socket {
        bytes: VecDeque::new(),
        read_sizes,
        next: 0,
        closed: false,
    };
    let mut session = TlsSession::new(configs);

    if mode.is_multiple_of(4) {
        // Garbage: whatever the input is, the session answers or fails, never panics.
        socket.bytes.extend(input.rest());
        socket.closed = mode & 4 != 0;
        let _ = read_all(&mut session, &mut socket, cap);
        let _ = session.take_all_ciphertext();
        session.close_notify();
        let _ = session.take_all_ciphertext();
        return;
    }

    let flip_at = usize::from(u16::from_le_bytes([input.byte(), input.byte()]));
    let flip = mode & 8 != 0;
    let cut = mode & 16 != 0;
    let key_updates = mode & 32 != 0;
    let echo = mode & 64 != 0;
    let messages: Vec<&[u8]> = input.rest().split(|&b| b == 0xff).take(8).collect();
    let mut client = rustls::ClientConnection::new(
        Arc::clone(client_config),
        "localhost".try_into().expect("a server name"),
    )
    .expect("a client");
    let mut sent_bytes = 0usize;
    let mut tampered = false;
    let mut received = Vec::new();
    let mut expected = Vec::new();
    let mut echoed = Vec::new();
    let mut pending: VecDeque<&[u8]> = messages.into_iter().collect();
    for _round in 0..16 {
        if !client.is_handshaking() {
            if let Some(message) = pending.pop_front() {
                if key_updates {
                    client.refresh_traffic_keys().expect("a TLS 1.3 key update");
                }
                client
                    .writer()
                    .write_all(message)
                    .expect("client plaintext");
                expected.extend_from_slice(message);
            }
        }
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client ciphertext");
        }
        if flip && !tampered && flip_at >= sent_bytes && flip_at < sent_bytes + wire.len() {
            wire[flip_at - sent_bytes] ^= 0x5a;
            tampered = true;
        }
        sent_bytes += wire.len();
        if cut && !tampered && sent_bytes > flip_at {
            wire.truncate(wire.len().saturating_sub(sent_bytes - flip_at));
            socket.closed = true;
            tampered = true;
        }
        socket.bytes.extend(wire);
        let Ok(got) = read_all(&mut session, &mut socket, cap) else {
            assert!(tampered, "an untampered stream failed");
            return;
        };
        if echo && !got.is_empty() {
            session.write_plaintext(&got);
        }
        received.extend(got);
        let back = session.take_all_ciphertext();
        let mut back = back.as_slice();
        while !back.is_empty() {
            if client.read_tls(&mut back).is_err() || client.process_new_packets().is_err() {
                assert!(tampered, "the client refused an untampered session's bytes");
                return;
            }
        }
        let _ = client.reader().read_to_end(&mut echoed);
        if socket.closed {
            break;
        }
        if !client.is_handshaking() && pending.is_empty() && !client.wants_write() {
            break;
        }
    }
    if !tampered {
        assert!(
            !session.is_handshaking(),
            "an untampered handshake did not complete"
        );
        assert_eq!(received, expected, "messages changed on the way");
        if echo {
            assert_eq!(echoed, expected, "echoes changed on the way");
        }
    }
});
