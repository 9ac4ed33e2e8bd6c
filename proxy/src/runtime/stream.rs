//! The client's byte stream, plain or TLS: the one place that knows the difference. Reads give
//! plaintext (a TLS session decrypts what the socket has); bytes for a TLS client are encrypted
//! into the session and its ciphertext is what goes out.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::sys;
use crate::tls::{Negotiated, ServerConfigs, TlsSession};

/// The answer to a plain HTTP request on a TLS port (nginx answers 400 too).
const PLAIN_HTTP_ON_TLS_PORT: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    Content-Type: text/plain\r\nContent-Length: 47\r\nConnection: close\r\n\r\n\
    This port speaks TLS: use wss:// or https://.\r\n";

/// Plain bytes, or a TLS session.
#[derive(Debug)]
pub enum ClientStream {
    /// `ws://`.
    Plain,
    /// `wss://`.
    Tls(Box<TlsSession>),
}

/// The client socket as the session's ciphertext source: non-blocking reads.
struct SocketReader(RawFd);

impl io::Read for SocketReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.0, buffer)
    }
}

/// A TLS stream broke: what to log, and whether it happened during the handshake.
#[derive(Debug)]
pub struct TlsFailure {
    /// For the log and the access line.
    pub reason: String,
    /// The handshake had not finished.
    pub during_handshake: bool,
}

impl ClientStream {
    /// A stream for a new client of a listener with `tls` (its rustls configuration).
    pub fn new(tls: Option<&Arc<ServerConfigs>>) -> ClientStream {
        match tls {
            Some(configs) => ClientStream::Tls(Box::new(TlsSession::new(configs))),
            None => ClientStream::Plain,
        }
    }

    /// Whether this is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Whether a TLS handshake is still going on.
    pub fn is_handshaking(&self) -> bool {
        matches!(self, ClientStream::Tls(session) if session.is_handshaking())
    }

    /// Plaintext is already decrypted and waiting (no readiness would announce it).
    pub fn has_plaintext(&self) -> bool {
        match self {
            ClientStream::Tls(session) => session.has_plaintext(),
            ClientStream::Plain => false,
        }
    }

    /// Reads the client's plaintext from `fd` into `buffer` (`Ok(0)` at end of stream). A
    /// broken TLS stream is an `InvalidData` error.
    pub fn read(&mut self, fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain => sys::recv(fd, buffer),
            ClientStream::Tls(session) => session.read_plaintext(&mut SocketReader(fd), buffer),
        }
    }

    /// TLS: takes these plaintext bytes for encryption (call [`ClientStream::take_ciphertext`]
    /// to send them). Plain streams send bytes as they are and never call this.
    pub fn encrypt(&mut self, bytes: &[u8]) {
        if let ClientStream::Tls(session) = self {
            session.write_plaintext(bytes);
        }
    }

    /// TLS: queues `close_notify`.
    pub fn close_notify(&mut self) {
        if let ClientStream::Tls(session) = self {
            session.close_notify();
        }
    }

    /// TLS: moves queued ciphertext into `out`; how many bytes (0: nothing to send).
    pub fn take_ciphertext(&mut self, out: &mut [u8]) -> usize {
        match self {
            ClientStream::Tls(session) if session.wants_write() => session.take_ciphertext(out),
            _ => 0,
        }
    }

    /// TLS: the handshake just finished (reported once).
    pub fn take_completed(&mut self) -> Option<Negotiated> {
        match self {
            ClientStream::Tls(session) => session.take_completed(),
            ClientStream::Plain => None,
        }
    }

    /// For the access line: `None` for plain clients, `Some(None)` for an unfinished handshake.
    pub fn negotiated(&self) -> Option<Option<Negotiated>> {
        match self {
            ClientStream::Tls(session) => Some(session.negotiated()),
            ClientStream::Plain => None,
        }
    }

    /// The connection closes on our initiative (idle, drain, upstream gone): say
    /// `close_notify` first if the stream is established and nothing else is being sent, so the
    /// client sees an orderly end rather than a truncation. Best effort, not waited for.
    pub fn goodbye(&mut self, fd: RawFd, socket_free: bool) {
        if let ClientStream::Tls(session) = self {
            if socket_free && !session.is_handshaking() && !session.closing() {
                session.close_notify();
                sys::send_now(fd, &session.take_all_ciphertext());
            }
        }
    }

    /// The TLS stream is broken (`error`: bad handshake, garbage, plain HTTP): tell the client
    /// what we can without waiting — a 400 for plain HTTP, else the alert rustls queued (only if
    /// nothing else is being sent, which it would interleave with).
    pub fn fail(&mut self, fd: RawFd, error: &io::Error, socket_free: bool) -> TlsFailure {
        let ClientStream::Tls(session) = self else {
            return TlsFailure {
                reason: format!("read from Client failed: {error}"),
                during_handshake: false,
            };
        };
        let during_handshake = session.is_handshaking();
        let reason = if during_handshake && session.looks_like_plain_http() {
            sys::send_now(fd, PLAIN_HTTP_ON_TLS_PORT);
            "plain HTTP sent to a TLS port (answered 400)".to_owned()
        } else {
            let alert = session.take_all_ciphertext();
            if socket_free {
                sys::send_now(fd, &alert);
            }
            let phase = if during_handshake {
                "handshake"
            } else {
                "stream"
            };
            format!("TLS {phase} failed: {error}")
        };
        TlsFailure {
            reason,
            during_handshake,
        }
    }
}
