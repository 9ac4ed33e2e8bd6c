//! Moving bytes in userspace: a relayed chunk goes from a source socket through one pooled
//! buffer to its peer, and a send's completion tells the connection its side is free again.

use std::io;

use super::table::{Intent, Outgoing, Payload};
use super::worker::Worker;
use crate::clock::monotonic_ns;
use crate::connection::{Actions, Side};

impl Worker {
    /// Relay: reads up to `budget` bytes from `from` and sends them to its peer.
    pub(super) fn forward(&mut self, slot: u32, from: Side, budget: usize, actions: &mut Actions) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let mut buffer = self.buffers.take();
        let budget = budget.min(buffer.len());
        let read = entry.read(from, &mut buffer[..budget]);
        if from == Side::Client && entry.is_tls() {
            if let Err(error) = &read {
                if error.kind() == io::ErrorKind::InvalidData {
                    self.buffers.give(buffer);
                    return self.tls_failed(slot, error, actions);
                }
            }
            // A key update or alert from the client may need an answer.
            self.flush_client(slot);
        }
        let Some(entry) = self.table.get(slot) else {
            self.buffers.give(buffer);
            return;
        };
        match read {
            Ok(0) => {
                self.buffers.give(buffer);
                entry.conn.on_source_eof(from, actions);
            }
            Ok(n) => {
                // Fewer bytes than asked for: the read took everything queued.
                let drained = n < budget;
                entry.conn.on_forwarded(
                    from,
                    &buffer[..n],
                    drained,
                    monotonic_ns(),
                    &entry.services,
                );
                self.send_to(slot, from.peer(), Outgoing::pooled(buffer, n));
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.buffers.give(buffer);
                self.arm_poll(slot, from, Intent::Forward);
                if let Some(entry) = self.table.get(slot) {
                    entry
                        .conn
                        .on_source_waiting(from, monotonic_ns(), &entry.services, actions);
                }
            }
            Err(error) => {
                self.buffers.give(buffer);
                let reset = Worker::is_reset(&error);
                entry
                    .conn
                    .on_source_failed(from, &error.to_string(), reset, actions);
            }
        }
    }

    /// A send to `side` completed (`result`: bytes taken, or an error).
    pub(super) fn on_send(&mut self, slot: u32, side: Side, result: i32) {
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result).to_string();
            let reset = result == -libc::ECONNRESET || result == -libc::EPIPE;
            return self.drive(slot, |conn, _, out| {
                conn.on_send_failed(side, &error, reset, out)
            });
        }
        let Some(io) = self.table.get(slot).and_then(|entry| entry.side(side)) else {
            return;
        };
        let Some(out) = io.in_flight() else {
            return;
        };
        if !out.advance(result as usize) {
            return self.submit_send(slot, side);
        }
        if let Some(Outgoing {
            data: Payload::Pooled(buffer),
            ..
        }) = io.end_send()
        {
            self.buffers.give(buffer);
        }
        // TLS: everything the session queued goes out before the connection hears the send is
        // done; handshake flights are not the connection's sends at all.
        if side == Side::Client && self.flush_client(slot) {
            return;
        }
        let Some(io) = self.table.get(slot).and_then(|entry| entry.side(side)) else {
            return;
        };
        if std::mem::take(&mut io.owes_sent) {
            let now = monotonic_ns();
            self.drive(slot, |conn, services, out| {
                conn.on_sent(side, now, services, out)
            });
        }
    }
}
