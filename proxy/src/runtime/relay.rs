//! Moving bytes in userspace: a relayed chunk goes from a source socket through one buffer to
//! its peer, and a send's completion tells the connection its side is free again.
//!
//! Two ways to read a chunk. Where the tunnel can never move to the kernel path (no splice
//! program, or a TLS tunnel) and the source is a plain socket, a receive into a provided buffer
//! waits in the kernel (`provided.rs`): one completion per chunk, no buffer held while idle.
//! Elsewhere, and when the provided buffers run out, the worker reads the socket itself into a
//! pooled buffer once it is readable: a promotion needs to know that no read is pending and
//! no segment is half-read, which a receive waiting in the kernel cannot tell.

use std::io;

use super::ring::Op;
use super::table::{Intent, Outgoing};
use super::worker::Worker;
use crate::clock::monotonic_ns;
use crate::connection::{Actions, Side};
use crate::sys;

impl Worker {
    /// Whether relay reads of `from` go through provided buffers (see the module docs).
    pub(super) fn reads_provided(&mut self, slot: u32, from: Side) -> bool {
        let never_spliced = self.services.splice.is_none();
        if self.ring.provided().is_none() {
            return false;
        }
        self.table.get(slot).is_some_and(|entry| {
            let plain_source = from == Side::Upstream || !entry.stream.is_tls();
            let never_promoted = never_spliced || entry.stream.is_tls();
            plain_source && never_promoted && entry.spliced.is_none()
        })
    }

    /// Relay: reads up to `budget` bytes from `from` and sends them to its peer.
    pub(super) fn forward(&mut self, slot: u32, from: Side, budget: usize, actions: &mut Actions) {
        if self.reads_provided(slot, from) {
            return self.submit_relay_recv(slot, from, budget);
        }
        self.forward_now(slot, from, budget, actions);
    }

    /// A relay receive into a provided buffer: it completes when bytes arrive.
    fn submit_relay_recv(&mut self, slot: u32, from: Side, budget: usize) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let id = entry.conn.id();
        let io = entry.side(from);
        if io.relaying != 0 || io.fd.is_none() {
            return;
        }
        // Budgets are at most a relay buffer, far below 4 GiB; 0 never reaches here.
        let len = u32::try_from(budget).unwrap_or(u32::MAX).max(1);
        io.relaying = len;
        let fd = io.raw();
        entry.inflight += 1;
        let op = match from {
            Side::Client => Op::RelayClient,
            Side::Upstream => Op::RelayUpstream,
        };
        self.ring.recv_provided(fd, len, op.user_data(slot, id));
    }

    /// A relay receive into a provided buffer completed (`flags` name the buffer).
    pub(super) fn on_relay_recv(&mut self, slot: u32, from: Side, result: i32, flags: u32) {
        let services = std::sync::Arc::clone(&self.services);
        let filled = self.filled_buffer(result, flags);
        let Some(entry) = self.table.get(slot) else {
            if let Some(buffer) = filled {
                self.release(super::table::Payload::Provided(buffer));
            }
            return;
        };
        let budget = std::mem::take(&mut entry.side(from).relaying) as usize;
        if let Some(buffer) = filled {
            let n = buffer.len;
            // The kernel says whether bytes are left; a short read alone does not prove it.
            let drained = !io_uring::cqueue::sock_nonempty(flags);
            entry
                .conn
                .on_forwarded(from, n, drained, monotonic_ns(), &services);
            return self.send_to(slot, from.peer(), Outgoing::provided(buffer));
        }
        match result {
            0 => self.drive(slot, |conn, _, out| conn.on_source_eof(from, out)),
            error if error == -libc::ENOBUFS => {
                // Every provided buffer is out: read this chunk the other way.
                self.with_actions(slot, |worker, out| {
                    worker.forward_now(slot, from, budget, out);
                });
            }
            error if error == -libc::ECANCELED => {}
            error if error < 0 => {
                let error = io::Error::from_raw_os_error(-error);
                let reset = Worker::is_reset(&error);
                self.drive(slot, |conn, _, out| {
                    conn.on_source_failed(from, &error.to_string(), reset, out)
                });
            }
            _ => tracing::error!(result, "a relay receive filled no provided buffer"),
        }
    }

    /// The provided buffer a completed receive filled with bytes, if any (a buffer the
    /// completion names without bytes goes straight back to the ring).
    pub(super) fn filled_buffer(
        &mut self,
        result: i32,
        flags: u32,
    ) -> Option<super::provided::FilledBuffer> {
        let bid = io_uring::cqueue::buffer_select(flags)?;
        let provided = self.ring.provided()?;
        let len = usize::try_from(result).unwrap_or(0);
        let buffer = provided.filled(bid, len.min(provided.size()))?;
        if len == 0 {
            provided.recycle(buffer);
            return None;
        }
        Some(buffer)
    }

    /// Relay: reads up to `budget` bytes from `from` now (it is readable, or nothing is known)
    /// and sends them to its peer.
    fn forward_now(&mut self, slot: u32, from: Side, budget: usize, actions: &mut Actions) {
        let services = std::sync::Arc::clone(&self.services);
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let fd = entry.side(from).raw();
        let mut buffer = self.buffers.take();
        let budget = budget.min(buffer.len());
        let read = match from {
            Side::Client => entry.stream.read(fd, &mut buffer[..budget]),
            Side::Upstream => sys::recv(fd, &mut buffer[..budget]),
        };
        if from == Side::Client && entry.stream.is_tls() {
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
                entry
                    .conn
                    .on_forwarded(from, n, drained, monotonic_ns(), &services);
                self.send_to(slot, from.peer(), Outgoing::pooled(buffer, n));
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.buffers.give(buffer);
                self.arm_poll(slot, from, Intent::Forward);
                if let Some(entry) = self.table.get(slot) {
                    entry
                        .conn
                        .on_source_waiting(from, monotonic_ns(), &services, actions);
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
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let io = entry.side(side);
        let Some(out) = io.in_flight() else {
            return;
        };
        out.pos += result as usize;
        if out.pos < out.len {
            return self.submit_send(slot, side);
        }
        if let Some(out) = io.end_send() {
            self.release(out.data);
        }
        // TLS: everything the session queued goes out before the connection hears the send is
        // done; handshake flights are not the connection's sends at all.
        if side == Side::Client && self.flush_client(slot) {
            return;
        }
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let io = entry.side(side);
        if std::mem::take(&mut io.owes_sent) {
            let now = monotonic_ns();
            self.drive(slot, |conn, services, out| {
                conn.on_sent(side, now, services, out)
            });
        }
    }
}
