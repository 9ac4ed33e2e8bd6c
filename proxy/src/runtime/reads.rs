//! What a readable socket means before and around the tunnel: the request and response heads
//! (read, or on the kernel path peeked at), a TLS client's handshake, and spliced sockets.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _};

use super::splice;
use super::table::Intent;
use super::worker::Worker;
use crate::clock::monotonic_ns;
use crate::connection::{Actions, Side, SplicedEvent};
use crate::sys;

impl Worker {
    /// Reads a head's bytes (the client's plaintext for TLS) into the scratch buffer and hands
    /// them to the connection.
    pub(super) fn read_side_into(&mut self, slot: u32, side: Side, actions: &mut Actions) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let Some(entry) = self.table.get(slot) else {
            self.scratch = scratch;
            return;
        };
        let read = entry.read(side, &mut scratch);
        if side == Side::Client && entry.is_tls() {
            if let Err(error) = &read {
                if error.kind() == io::ErrorKind::InvalidData {
                    self.scratch = scratch;
                    return self.tls_failed(slot, error, actions);
                }
            }
            self.after_tls_read(slot);
        }
        let now = monotonic_ns();
        match read {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.arm_poll(slot, side, Intent::Read);
            }
            Ok(0) | Err(_) => {
                if let Some(entry) = self.table.get(slot) {
                    entry.conn.on_read_end(side, now, &entry.services, actions);
                }
            }
            Ok(n) => {
                if let Some(entry) = self.table.get(slot) {
                    entry
                        .conn
                        .on_data(side, &scratch[..n], now, &entry.services, actions);
                }
            }
        }
        self.scratch = scratch;
    }

    /// Kernel path: looks at the upstream's response without consuming it.
    pub(super) fn peek(&mut self, slot: u32, side: Side, actions: &mut Actions) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let Some(entry) = self.table.get(slot) else {
            self.scratch = scratch;
            return;
        };
        let fd = entry.side(side).map_or(-1, |io| io.raw());
        let read = sys::peek(fd, &mut scratch);
        let now = monotonic_ns();
        let (conn, services) = (&mut entry.conn, &entry.services);
        match read {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.arm_poll(slot, side, Intent::Peek);
            }
            Ok(0) | Err(_) => conn.on_read_end(side, now, services, actions),
            Ok(n) => match side {
                Side::Upstream => conn.on_peeked(&scratch[..n], now, services, actions),
                Side::Client => conn.on_proxy_header_peeked(&scratch[..n], services, actions),
            },
        }
        self.scratch = scratch;
    }

    /// A peek of `side` that waits until more than the `seen` bytes are queued.
    pub(super) fn peek_beyond(&mut self, slot: u32, side: Side, seen: usize) {
        if seen > 0 {
            let io = self.table.get(slot).and_then(|entry| entry.side(side));
            if let Some(fd) = io.and_then(|io| io.fd.as_ref()) {
                let _ = sys::set_rcvlowat(fd.as_fd(), seen + 1);
            }
        }
        self.arm_poll(slot, side, Intent::Peek);
    }

    /// Consumes `len` bytes of `side` that a peek saw (they are queued, so the read takes
    /// them all at once) and resets the peek's receive mark.
    pub(super) fn consume_peeked(&mut self, slot: u32, side: Side, len: usize) {
        let io = self.table.get(slot).and_then(|entry| entry.side(side));
        if let Some(fd) = io.and_then(|io| io.fd.as_ref()) {
            let _ = sys::set_rcvlowat(fd.as_fd(), 1);
            let len = len.min(self.scratch.len());
            let _ = sys::recv(fd.as_raw_fd(), &mut self.scratch[..len]);
        }
    }

    /// A spliced socket woke up: a FIN, a reset, or stray bytes.
    pub(super) fn look_at_spliced(&mut self, slot: u32, side: Side, actions: &mut Actions) {
        if let Some(event) = self.inspect_spliced(slot, side) {
            if let Some(entry) = self.table.get(slot) {
                entry
                    .conn
                    .on_spliced_event(side, event, &entry.services, actions);
            }
        }
    }

    /// Reports are also how the program tells of bytes that stayed on a spliced socket (spliced
    /// sockets are polled for FINs and errors only): peek at both sockets; anything else a
    /// peek finds is left to the poll.
    pub(super) fn look_for_stray_bytes(&mut self, slot: u32) {
        for side in [Side::Client, Side::Upstream] {
            if let Some(event @ SplicedEvent::Stray { .. }) = self.inspect_spliced(slot, side) {
                self.drive(slot, |conn, services, out| {
                    conn.on_spliced_event(side, event, services, out)
                });
            }
        }
    }

    /// What a peek at a spliced socket finds (`None`: not a spliced connection any more).
    fn inspect_spliced(&mut self, slot: u32, side: Side) -> Option<SplicedEvent> {
        let maps = self.maps.as_ref()?;
        let io = self.table.get(slot)?.io_mut()?;
        let sockets = io.spliced.as_deref().copied()?;
        Some(splice::inspect(maps, &sockets, side, io.side(side).raw()))
    }

    /// After bytes from a TLS client were processed: count a finished handshake, send what the
    /// session wants to send (handshake flights, tickets, key updates).
    pub(super) fn after_tls_read(&mut self, slot: u32) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let done = entry.io_mut().and_then(|io| io.stream.take_completed());
        if let Some(done) = done {
            if std::mem::take(&mut entry.counted_handshake) {
                self.tls_handshakes -= 1;
            }
            let metrics = &self.services.metrics;
            metrics.tls_handshakes.inc();
            if done.resumed {
                metrics.tls_resumed.inc();
            }
            tracing::debug!(
                client = %entry.conn.client_addr(),
                version = %done.version,
                suite = %done.suite,
                sni = done.server_name.as_deref().unwrap_or(""),
                resumed = done.resumed,
                "TLS handshake done"
            );
        }
        self.flush_client(slot);
    }

    /// The client's TLS stream is broken: tell the client what we can, then the connection.
    pub(super) fn tls_failed(&mut self, slot: u32, error: &io::Error, actions: &mut Actions) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let Some(io) = entry.io_mut() else {
            return; // Not reached: a read from the client needs its socket.
        };
        let fd = io.client.raw();
        let free = !io.client.sending();
        let failure = io.stream.fail(fd, error, free);
        entry.conn.on_tls_failed(
            failure.during_handshake,
            failure.reason,
            &entry.services,
            actions,
        );
    }
}
