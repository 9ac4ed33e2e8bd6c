//! Carrying out a connection's actions: each [`Action`] becomes ring submissions or a few
//! syscalls, and what those find out goes back to the connection as an event.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use super::packet;
use super::ring::{ConnectArgs, Op};
use super::splice;
use super::table::{Entry, Intent, Outgoing, Payload, SideIo};
use super::worker::Worker;
use crate::clock::monotonic_ns;
use crate::connection::{Action, Actions, ConnectFailure, Side};
use crate::sys;
use crate::tag::Tag;
use crate::timeouts::TimerKey;

impl Worker {
    /// Carries out one action for the connection in `slot`; events it causes append their
    /// actions to `actions`.
    pub(super) fn execute(&mut self, slot: u32, action: Action, actions: &mut Actions) {
        // Read only by the actions that pass the time on (a clock read per action adds up at
        // tens of thousands of requests a second).
        let now = || monotonic_ns();
        match action {
            Action::ArmDeadline(deadline) => self.arm_deadline(slot, deadline),
            // The upstream's answer comes soon after its request: a receive that waits for it
            // saves the readiness round trip (a poll, then `recv`) that an idle client's read
            // needs so that it holds no buffer while it waits.
            Action::Read(Side::Upstream) => self.recv_upstream(slot),
            Action::Read(side) => {
                if self.plaintext_waiting(slot, side) {
                    self.read_side_into(slot, side, actions);
                } else {
                    self.arm_poll(slot, side, Intent::Read);
                }
            }
            Action::PeekUpstream { seen } => self.peek_beyond(slot, Side::Upstream, seen),
            Action::PeekClient { seen } => self.peek_beyond(slot, Side::Client, seen),
            Action::ConsumeUpstream { len } => self.consume_peeked(slot, Side::Upstream, len),
            Action::ConsumeClient { len } => self.consume_peeked(slot, Side::Client, len),
            Action::Connect(addr) => self.connect(slot, addr, actions),
            Action::ConnectReusing(server) => match self.take_idle_upstream(server) {
                Some(fd) => {
                    if let Some(entry) = self.table.get(slot) {
                        // A connection that connects has its I/O state (only packet-spliced
                        // tunnels are without); were it gone, the socket closes here and the
                        // upstream is a socket gone, like a side without a descriptor.
                        if let Some(io) = entry.io_mut() {
                            io.upstream = SideIo::with(fd);
                        }
                        entry
                            .conn
                            .on_connected(true, now(), &entry.services, actions);
                    }
                }
                None => self.connect(slot, server, actions),
            },
            Action::ReleaseUpstream { server, keepalive } => {
                if let Some(fd) = self.detach_upstream(slot) {
                    // What the pool cannot keep is closed by dropping it.
                    drop(self.idle_upstreams.put(server, fd, now(), keepalive));
                }
            }
            Action::CloseUpstream => drop(self.detach_upstream(slot)),
            Action::AccessLine(mut record) => {
                if let Some(io) = self.table.get(slot).and_then(|entry| entry.io()) {
                    record.tls = io.stream.negotiated();
                }
                record.log();
            }
            Action::CancelUpstream => {
                if let Some([_, fd]) = self.table.get(slot).map(|entry| entry.raw_fds()) {
                    if fd >= 0 {
                        self.cancel_fd(slot, fd);
                    }
                }
            }
            Action::Send(side, bytes) => self.send_to(slot, side, Outgoing::owned(bytes)),
            Action::Forward { from, budget } => self.forward(slot, from, budget, actions),
            Action::AwaitReadable(side) => {
                if self.plaintext_waiting(slot, side) {
                    if let Some(entry) = self.table.get(slot) {
                        entry.conn.on_readable(side, &entry.services, actions);
                    }
                } else {
                    self.arm_poll(slot, side, Intent::Forward);
                }
            }
            Action::ShutdownWrite(side) => {
                if let Some(io) = self.table.get(slot).and_then(|entry| entry.side(side)) {
                    sys::shutdown_write(io.raw());
                }
            }
            Action::CloseNotify => {
                if let Some(io) = self.table.get(slot).and_then(Entry::io_mut) {
                    io.stream.close_notify();
                    io.client.owes_sent = true;
                }
                self.flush_client(slot);
            }
            Action::DrainClient { limit } => {
                let (bytes, complete) = self.drain_client(slot, limit);
                if let Some(entry) = self.table.get(slot) {
                    entry
                        .conn
                        .on_client_drained(&bytes, complete, now(), &entry.services, actions);
                }
            }
            Action::Splice { bridged } => {
                if self
                    .table
                    .get(slot)
                    .is_none_or(|entry| entry.conn.is_closing())
                {
                    // Decided to close since: the sockets must not enter the maps.
                    return;
                }
                let result = self.splice(slot, bridged);
                if let Some(entry) = self.table.get(slot) {
                    entry
                        .conn
                        .on_splice_result(result, now(), &entry.services, actions);
                }
            }
            Action::PacketSplice => {
                let result = self.packet_splice(slot);
                if let Some(entry) = self.table.get(slot) {
                    entry
                        .conn
                        .on_packet_splice_result(result, now(), &entry.services, actions);
                }
            }
            Action::UndoPeekMark => {
                let io = self.table.get(slot).and_then(Entry::io_mut);
                if let Some(fd) = io.and_then(|io| io.upstream.fd.as_ref()) {
                    let _ = sys::set_rcvlowat(fd.as_fd(), 1);
                }
            }
            Action::WatchSpliced(side) => self.arm_poll(slot, side, Intent::WatchSpliced),
            Action::CheckKernelBacklog { towards, next_tick } => {
                let id = self.table.get(slot).map(|entry| entry.conn.id());
                match (next_tick, id) {
                    (true, Some(id)) => self.backlog_checks.push((slot, id, towards)),
                    (false, Some(_)) => {
                        if let Some(backlog) = self.measure_backlog(slot, towards) {
                            if let Some(entry) = self.table.get(slot) {
                                entry.conn.on_kernel_backlog(towards, backlog, actions);
                            }
                        }
                    }
                    (_, None) => {}
                }
            }
            Action::MeasurePressure => {
                let id = self.table.get(slot).map(|entry| entry.conn.id());
                if let Some(id) = id {
                    if !self.pressure_checks.contains(&(slot, id)) {
                        self.pressure_checks.push((slot, id));
                    }
                }
            }
            Action::PauseSplice => {
                let result = self.pause_splice(slot);
                if let Some(entry) = self.table.get(slot) {
                    entry
                        .conn
                        .on_paused(result, now(), &entry.services, actions);
                }
            }
            Action::Unsplice => {
                let maps = self.maps.as_mut();
                let Some(entry) = self.table.get(slot) else {
                    return;
                };
                let spliced = entry.io_mut().and_then(|io| io.spliced.take());
                if let (Some(maps), Some(sockets)) = (maps, spliced) {
                    let counted = splice::forget(maps, &sockets);
                    entry.conn.on_unspliced(counted, &entry.services);
                }
            }
            Action::Close { abortive } => self.close(slot, abortive),
        }
    }

    fn arm_deadline(&mut self, slot: u32, deadline: u64) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        if deadline < entry.armed_ns {
            entry.armed_ns = deadline;
            let key = TimerKey {
                slot,
                id: entry.conn.id(),
            };
            self.wheel.arm(key, deadline);
        }
    }

    /// Counts an operation of the connection in `slot` as in flight.
    fn count_inflight(&mut self, slot: u32) -> Option<u64> {
        let entry = self.table.get(slot)?;
        entry.inflight += 1;
        Some(entry.conn.id())
    }

    /// TLS: the client's session already decrypted bytes that were not read yet; no
    /// readiness would announce them, so the read goes ahead without a poll.
    fn plaintext_waiting(&mut self, slot: u32, side: Side) -> bool {
        side == Side::Client
            && self
                .table
                .get(slot)
                .and_then(|entry| entry.io())
                .is_some_and(|io| io.stream.has_plaintext())
    }

    pub(super) fn arm_poll(&mut self, slot: u32, side: Side, intent: Intent) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let id = entry.conn.id();
        let Some(io) = entry.side(side) else {
            return;
        };
        io.intent = intent;
        if io.polling || io.fd.is_none() {
            return;
        }
        io.polling = true;
        let fd = io.raw();
        entry.inflight += 1;
        let op = match side {
            Side::Client => Op::PollClient,
            Side::Upstream => Op::PollUpstream,
        };
        self.ring
            .poll_once(fd, intent.poll_events(), op.user_data(slot, id));
    }

    pub(super) fn cancel_fd(&mut self, slot: u32, fd: std::os::fd::RawFd) {
        if let Some(id) = self.count_inflight(slot) {
            self.ring.cancel_fd(fd, Op::Cancel.user_data(slot, id));
        }
    }

    /// Submits a send of what the side's in-flight send has left.
    pub(super) fn submit_send(&mut self, slot: u32, side: Side) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let id = entry.conn.id();
        let Some(io) = entry.side(side) else {
            return;
        };
        let fd = io.raw();
        let Some(out) = io.in_flight() else {
            return;
        };
        let bytes = out.remaining();
        // Relay buffers and heads are far below 4 GiB; a larger send is split by the kernel.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let pointer = bytes.as_ptr();
        entry.inflight += 1;
        let op = match side {
            Side::Client => Op::SendClient,
            Side::Upstream => Op::SendUpstream,
        };
        self.ring.send(fd, pointer, len, op.user_data(slot, id));
    }

    /// Sends `out` to a side on the connection's behalf (it then owes `on_sent`). Bytes for a
    /// TLS client are encrypted first: the ciphertext is sent in their place.
    pub(super) fn send_to(&mut self, slot: u32, side: Side, out: Outgoing) {
        let Some(io) = self.table.get(slot).and_then(Entry::io_mut) else {
            // The sockets are gone: nothing to send to.
            if let Payload::Pooled(buffer) = out.data {
                self.buffers.give(buffer);
            }
            return;
        };
        io.side(side).owes_sent = true;
        if side == Side::Client && io.stream.is_tls() {
            io.stream.encrypt(out.remaining());
            if let Payload::Pooled(buffer) = out.data {
                self.buffers.give(buffer);
            }
            self.flush_client(slot);
            return;
        }
        if let Err(refused) = io.side(side).begin_send(out) {
            // The connection sends to a side only when its previous send completed.
            tracing::error!(?side, "a second send on a side while one is in flight");
            if let Payload::Pooled(buffer) = refused.data {
                self.buffers.give(buffer);
            }
            return;
        }
        self.submit_send(slot, side);
    }

    /// TLS: sends what the client's session has queued, if nothing is in flight to the client.
    /// True when a send was started.
    pub(super) fn flush_client(&mut self, slot: u32) -> bool {
        let Some(io) = self.table.get(slot).and_then(Entry::io_mut) else {
            return false;
        };
        if io.client.sending() || !io.stream.is_tls() {
            return false;
        }
        let mut buffer = self.buffers.take();
        let len = io.stream.take_ciphertext(&mut buffer);
        if len == 0 {
            self.buffers.give(buffer);
            return false;
        }
        if io.client.begin_send(Outgoing::pooled(buffer, len)).is_err() {
            return false; // not reached: checked above
        }
        self.submit_send(slot, Side::Client);
        true
    }

    /// Opens the upstream socket and starts a connect bounded by the connect timeout.
    fn connect(&mut self, slot: u32, addr: SocketAddr, actions: &mut Actions) {
        // The connection's own generation (the services of a reload apply to new ones).
        // Only a connection with sockets connects (a packet-spliced tunnel never does).
        let Some(timeout) = self
            .table
            .get(slot)
            .filter(|entry| entry.io().is_some())
            .map(|entry| entry.services.connect_timeout)
        else {
            return;
        };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .and_then(|socket| socket.set_cloexec(true).map(|()| socket));
        let socket = match socket {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "cannot create an upstream socket");
                if let Some(entry) = self.table.get(slot) {
                    let error = error.to_string();
                    let now = monotonic_ns();
                    entry.conn.on_connect_failed(
                        ConnectFailure::Local,
                        &error,
                        now,
                        &entry.services,
                        actions,
                    );
                }
                return;
            }
        };
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        if let (true, Some(path)) = (entry.conn.wants_packet_port(), &entry.services.packet) {
            // A retry gives back the port of the server that failed.
            if let Some(taken) = packet::PacketState::take_port(&mut entry.packet) {
                path.ports.release(
                    packet::unspecified_for(taken.remote),
                    taken.remote,
                    taken.port,
                );
            }
            let local = packet::unspecified_for(addr);
            if let Some(port) = path.ports.take(local, addr) {
                match crate::splice::packet::ports::bind_local_port(&socket, local, port) {
                    Ok(()) => packet::PacketState::set_port(
                        &mut entry.packet,
                        packet::TakenPort { remote: addr, port },
                    ),
                    Err(error) => {
                        path.ports.release(local, addr, port);
                        tracing::warn!(%error, port, "packet splice: cannot bind a reserved port; this tunnel stays in userspace");
                    }
                }
            }
        }
        let id = entry.conn.id();
        let Some(io) = entry.io_mut() else {
            return; // Not reached: checked above, and nothing since took the I/O state.
        };
        io.upstream.fd = Some(socket.into());
        let fd = io.upstream.raw();
        let args = io.connect.insert(Box::new(ConnectArgs {
            addr: SockAddr::from(addr),
            timeout: io_uring::types::Timespec::from(timeout),
        }));
        let args: *const ConnectArgs = &**args;
        entry.inflight += 2;
        // SAFETY: `args` points into the entry's boxed connect arguments, which live until the
        // connect completes (the entry is freed, and its I/O state dropped, only with no
        // operation in flight).
        let args = unsafe { &*args };
        self.ring.connect(
            fd,
            args,
            Op::Connect.user_data(slot, id),
            Op::ConnectTimeout.user_data(slot, id),
        );
    }

    /// Takes the upstream socket out of the connection (plain HTTP, between requests). One with
    /// an operation still pending stays with the connection and is closed with it.
    fn detach_upstream(&mut self, slot: u32) -> Option<OwnedFd> {
        let io = self.table.get(slot)?.io_mut()?;
        let upstream = &io.upstream;
        let pending = upstream.polling || upstream.sending() || io.receiving.is_some();
        if pending || io.connect.is_some() {
            tracing::error!("an upstream connection released with an operation pending");
            return None;
        }
        std::mem::take(&mut io.upstream).fd
    }

    /// Submits a receive from the upstream into a pooled buffer (unless one is in flight).
    fn recv_upstream(&mut self, slot: u32) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let id = entry.conn.id();
        let Some(io) = entry.io_mut() else {
            return;
        };
        if io.receiving.is_some() || io.upstream.fd.is_none() {
            return;
        }
        let fd = io.upstream.raw();
        let mut buffer = self.buffers.take();
        // Relay buffers are far below 4 GiB.
        let len = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
        let pointer = buffer.as_mut_ptr();
        // The buffer moves into the I/O state, its heap memory does not: `pointer` stays valid
        // until the completion (the entry is freed, and its I/O state dropped, only with
        // nothing in flight).
        io.receiving = Some(buffer);
        entry.inflight += 1;
        self.ring
            .recv(fd, pointer, len, Op::RecvUpstream.user_data(slot, id));
    }

    /// Kernel path: reads everything the client has sent so far (at most `limit` plus one
    /// read); false with it when there was more.
    fn drain_client(&mut self, slot: u32, limit: usize) -> (Vec<u8>, bool) {
        let Some([fd, _]) = self.table.get(slot).map(|entry| entry.raw_fds()) else {
            return (Vec::new(), true);
        };
        let mut bytes = Vec::new();
        loop {
            match sys::recv(fd, &mut self.scratch) {
                Ok(0) | Err(_) => return (bytes, true), // drained, or the poll will report it
                Ok(n) => {
                    bytes.extend_from_slice(&self.scratch[..n]);
                    if bytes.len() > limit {
                        return (bytes, false);
                    }
                }
            }
        }
    }

    /// Kernel path: hand-off steps 3–5 (`bridged`: both sides may be sending).
    fn splice(&mut self, slot: u32, bridged: bool) -> Result<(), String> {
        let index = self.index;
        let maps = self.maps.as_mut().ok_or("no splice program")?;
        let entry = self.table.get(slot).ok_or("connection gone")?;
        // The owner comes back on the pressure ring: kind = this worker's index, which fits a
        // byte (`serve` refuses more than MAX_WORKERS workers).
        let worker = u8::try_from(index).map_err(|_| "worker index over 255")?;
        let owner = Tag::new(worker, slot, entry.conn.id());
        let frames = entry.conn.splice_frames();
        let Some(io) = entry.io_mut() else {
            return Err("a socket is missing".into());
        };
        let (Some(client), Some(upstream)) = (io.client.fd.as_ref(), io.upstream.fd.as_ref())
        else {
            return Err("a socket is missing".into());
        };
        let sockets = splice::hand_off(
            maps,
            client.as_fd(),
            upstream.as_fd(),
            owner,
            bridged,
            frames,
        )
        .map_err(|error| error.to_string())?;
        io.spliced = Some(Box::new(sockets));
        Ok(())
    }

    /// Kernel path: pauses a tunnel's sockets, stops watching them (the relay polls them for
    /// bytes from now on) and measures what the kernel still has to deliver each way.
    fn pause_splice(&mut self, slot: u32) -> Result<crate::connection::Paused, String> {
        let maps = self.maps.as_mut().ok_or("no splice program")?;
        let entry = self.table.get(slot).ok_or("connection gone")?;
        let io = entry.io_mut().ok_or("a socket is missing")?;
        let (Some(client), Some(upstream), Some(sockets)) = (
            io.client.fd.as_ref(),
            io.upstream.fd.as_ref(),
            io.spliced.as_mut(),
        ) else {
            return Err("a socket is missing".into());
        };
        let counted = splice::pause(maps, sockets, client.as_fd(), upstream.as_fd())
            .map_err(|error| error.to_string())?;
        for side in [Side::Client, Side::Upstream] {
            io.side(side).intent = Intent::None;
        }
        self.remove_polls(slot);
        let to_client = self.measure_backlog(slot, Side::Client);
        let to_upstream = self.measure_backlog(slot, Side::Upstream);
        let (Some(to_client), Some(to_upstream)) = (to_client, to_upstream) else {
            return Err("a socket is missing".into());
        };
        Ok(crate::connection::Paused {
            counted,
            to_client,
            to_upstream,
        })
    }

    /// Starts closing: resets both ways if abortive (else says goodbye to a TLS client), and
    /// cancels pending operations; the entry is freed (sockets closed) once none is in flight.
    fn close(&mut self, slot: u32, abortive: bool) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        if let Some(io) = entry.io_mut() {
            if abortive {
                // Propagate a reset: close with SO_LINGER 0 sends RST instead of FIN.
                for side in [&io.client, &io.upstream] {
                    if let Some(fd) = side.fd.as_ref() {
                        let _ = SockRef::from(fd).set_linger(Some(Duration::ZERO));
                    }
                }
            } else {
                let fd = io.client.raw();
                let free = !io.client.sending();
                io.stream.goodbye(fd, free);
            }
        }
        if entry.inflight == 0 {
            return self.finish(slot);
        }
        let fds = entry.raw_fds();
        for fd in fds.into_iter().filter(|&fd| fd >= 0) {
            self.cancel_fd(slot, fd);
        }
    }

    /// A read or a send on a socket failed with this error: was it a reset?
    pub(super) fn is_reset(error: &io::Error) -> bool {
        error.raw_os_error() == Some(libc::ECONNRESET)
    }
}
