//! The worker's side of TLS (`wss://`): moving a client session's ciphertext through the
//! socket. The session itself ([`TlsSession`]) is sans-IO; here are the reads, the sends of
//! what it queued, and the close after a failure.

use std::io;
use std::os::fd::RawFd;

use super::{recv, Outgoing, Payload, Stage, Which, Worker};
use crate::tls::TlsSession;

/// The answer to a plain HTTP request on a TLS port (nginx answers 400 too).
const PLAIN_HTTP_ON_TLS_PORT: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    Content-Type: text/plain\r\nContent-Length: 47\r\nConnection: close\r\n\r\n\
    This port speaks TLS: use wss:// or https://.\r\n";

/// The client socket as the session's ciphertext source: non-blocking reads.
struct SocketReader(RawFd);

impl io::Read for SocketReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        recv(self.0, buffer)
    }
}

/// Reads the client's plaintext through its session (see [`TlsSession::read_plaintext`]).
pub(super) fn read(fd: RawFd, session: &mut TlsSession, buffer: &mut [u8]) -> io::Result<usize> {
    session.read_plaintext(&mut SocketReader(fd), buffer)
}

impl Worker {
    /// Sends what the client's session has queued, if nothing is in flight to the client.
    /// True when a send was started.
    pub(super) fn flush_tls(&mut self, slot: u32) -> bool {
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        let Some(session) = conn.tls.as_deref_mut() else {
            return false;
        };
        if conn.client.out.is_some() || !session.wants_write() {
            return false;
        }
        let mut buffer = self.buffers.take();
        let len = session.take_ciphertext(&mut buffer);
        if len == 0 {
            self.buffers.give(buffer);
            return false;
        }
        conn.client.out = Some(Outgoing {
            data: Payload::Pooled(buffer),
            pos: 0,
            len,
        });
        self.submit_send(slot, Which::Client);
        true
    }

    /// After bytes from a TLS client were processed: count a finished handshake, send what the
    /// session wants to send (handshake flights, tickets).
    pub(super) fn after_tls_read(&mut self, slot: u32) {
        let Some(conn) = self.conn(slot) else { return };
        let client = conn.client_addr;
        if let Some(done) = conn.tls.as_deref_mut().and_then(TlsSession::take_completed) {
            let metrics = &self.services.metrics;
            metrics.tls_handshakes.inc();
            if done.resumed {
                metrics.tls_resumed.inc();
            }
            tracing::debug!(
                %client,
                version = %done.version,
                suite = %done.suite,
                sni = done.server_name.as_deref().unwrap_or(""),
                resumed = done.resumed,
                "TLS handshake done"
            );
        }
        self.flush_tls(slot);
    }

    /// A TLS client's connection closes on our initiative (idle, drain, upstream gone): say
    /// `close_notify` first if the stream is established and the socket is free, so the client
    /// sees an orderly end rather than a truncation.
    pub(super) fn tls_goodbye(&mut self, slot: u32) {
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = conn.client.raw();
        let free = conn.client.out.is_none();
        let Some(session) = conn.tls.as_deref_mut() else {
            return;
        };
        if free && !session.is_handshaking() && !session.closing() {
            session.close_notify();
            send_now(fd, &session.take_all_ciphertext());
        }
    }

    /// The client's TLS stream is broken (bad handshake, garbage, plain HTTP): tell the client
    /// what we can without waiting (a 400 for plain HTTP, else the alert rustls queued) and
    /// close.
    pub(super) fn fail_tls(&mut self, slot: u32, error: &io::Error) {
        let Some(conn) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = conn.client.raw();
        let idle_client_side = conn.client.out.is_none();
        let Some(session) = conn.tls.as_deref_mut() else {
            return;
        };
        let handshaking = session.is_handshaking();
        let reason = if handshaking && session.looks_like_plain_http() {
            send_now(fd, PLAIN_HTTP_ON_TLS_PORT);
            "plain HTTP sent to a TLS port (answered 400)".to_owned()
        } else {
            let alert = session.take_all_ciphertext();
            // A send in flight would interleave with the alert: then the client gets none.
            if idle_client_side {
                send_now(fd, &alert);
            }
            let phase = if handshaking { "handshake" } else { "stream" };
            format!("TLS {phase} failed: {error}")
        };
        if handshaking {
            self.services.metrics.tls_failures.inc();
        }
        tracing::info!(client = %conn.client_addr, %reason, "TLS connection closed");
        let in_tunnel = matches!(conn.stage, Stage::Tunnel(_));
        // A broken stream mid-tunnel is passed on as a reset, like a client that vanished.
        self.begin_close(slot, reason, in_tunnel);
    }
}

/// Best-effort, non-blocking send of a few bytes on a socket with nothing else in flight
/// (an alert, an error answer): if the socket cannot take them now the client sees a close.
fn send_now(fd: RawFd, bytes: &[u8]) {
    if bytes.is_empty() || fd < 0 {
        return;
    }
    // SAFETY: `bytes` is valid for reads of its length for the duration of the call.
    unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}
