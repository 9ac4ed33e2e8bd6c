//! The kernel data path inside a worker (DESIGN.md §4–§5): hand a plain tunnel to the sockmap
//! program without losing or reordering a byte, then only watch it for closes and idleness.
//!
//! Hand-off order, each step a reason:
//! 1. the upstream's response head was only *peeked* (still queued in the upstream socket);
//! 2. bytes the client pipelined behind its request, and anything else it sent since, are read
//!    and sent upstream now, after the valid 101 (so no skb is left half-read: the program
//!    takes each socket's place in its TCP stream from the first skb it sees);
//! 3. `PEER[cookie(upstream)] = client` — the client socket goes live without its own key, safe
//!    because the client is silent until it sees the 101;
//! 4. `PEER[cookie(client)] = upstream` — the upstream goes live with its key already present;
//! 5. kick both (`SO_RCVLOWAT`): the queued 101 and every frame behind it pass through the verdict
//!    program to the client in order, and anything the client queued goes upstream.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use wsplice_common::DIVERTED;

use crate::clock::monotonic_ns;
use crate::splice::{is_closed, kick, queued_bytes, socket_cookie, Owner, SpliceProgram};

use super::{recv, shutdown_write, Outgoing, Stage, Which, Worker};

impl SplicedState {
    /// Records that `destination` got its FIN (`shutdown(SHUT_WR)`).
    fn fin_passed(&mut self, destination: Which) {
        match destination {
            Which::Upstream => self.fin_to_upstream = true,
            Which::Client => self.fin_to_client = true,
        }
    }

    /// Both sources ended and both FINs were passed on: the tunnel is done.
    pub(super) fn both_closed(&self) -> bool {
        self.fin_to_client && self.fin_to_upstream
    }

    /// The cookie of the socket whose bytes go to `destination`.
    fn source_cookie(&self, destination: Which) -> u64 {
        match destination {
            Which::Upstream => self.client_cookie,
            Which::Client => self.upstream_cookie,
        }
    }

    /// `queued_bytes` of `destination` at the hand-off.
    fn baseline(&self, destination: Which) -> u64 {
        match destination {
            Which::Upstream => self.upstream_baseline,
            Which::Client => self.client_baseline,
        }
    }
}

/// A tunnel carried by the kernel; userspace holds only this.
#[derive(Debug)]
pub(super) struct SplicedState {
    pub(super) client_cookie: u64,
    pub(super) upstream_cookie: u64,
    /// FIN passed on to the upstream / the client.
    pub(super) fin_to_upstream: bool,
    pub(super) fin_to_client: bool,
    pub(super) since_ns: u64,
    pub(super) idle_ns: u64,
    /// Bytes each way read from the eBPF counters when the tunnel closed.
    pub(super) bytes_up: u64,
    pub(super) bytes_down: u64,
    /// `queued_bytes` of each socket at the hand-off (what userspace wrote before the splice).
    pub(super) client_baseline: u64,
    pub(super) upstream_baseline: u64,
}

/// Why a hand-off to the kernel failed (the tunnel then stays on the userspace relay).
#[derive(Debug, thiserror::Error)]
pub(super) enum HandoffError {
    #[error("socket cookie: {0}")]
    Cookie(#[source] io::Error),
    #[error("sockmap: {0}")]
    Map(#[from] crate::splice::SpliceError),
    #[error("kick: {0}")]
    Kick(#[source] io::Error),
}

/// Inserts both sockets in the splice maps in the safe order and kicks them.
pub(super) fn hand_off(
    program: &mut SpliceProgram,
    client: BorrowedFd<'_>,
    upstream: BorrowedFd<'_>,
    owner: Owner,
) -> Result<(u64, u64), HandoffError> {
    let client_cookie = socket_cookie(client).map_err(HandoffError::Cookie)?;
    let upstream_cookie = socket_cookie(upstream).map_err(HandoffError::Cookie)?;
    let inserted = (|| {
        program.track(client_cookie, owner.encode())?;
        program.track(upstream_cookie, owner.encode())?;
        program.insert_peer(upstream_cookie, client)?;
        program.insert_peer(client_cookie, upstream)?;
        Ok::<(), crate::splice::SpliceError>(())
    })();
    if let Err(error) = inserted {
        forget(program, client_cookie, upstream_cookie);
        return Err(error.into());
    }
    kick(upstream).map_err(HandoffError::Kick)?;
    kick(client).map_err(HandoffError::Kick)?;
    Ok((client_cookie, upstream_cookie))
}

/// What the program counted for a tunnel, read when it leaves the kernel.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counted {
    /// Bytes client → upstream.
    pub(super) up: u64,
    /// Bytes upstream → client.
    pub(super) down: u64,
    /// Bytes the kernel handed over twice that the program cut off (both sockets).
    pub(super) repeated: u64,
}

/// Removes a tunnel's entries (peer links first, so nothing is redirected any more) and returns
/// what the program counted.
pub(super) fn forget(
    program: &mut SpliceProgram,
    client_cookie: u64,
    upstream_cookie: u64,
) -> Counted {
    for cookie in [client_cookie, upstream_cookie] {
        if let Err(error) = program.remove_peer(cookie) {
            tracing::debug!(%error, cookie, "removing a peer entry");
        }
    }
    let activity = |cookie| program.activity(cookie).ok().flatten().unwrap_or_default();
    let (client, upstream) = (activity(client_cookie), activity(upstream_cookie));
    for cookie in [client_cookie, upstream_cookie] {
        if let Err(error) = program.untrack(cookie) {
            tracing::debug!(%error, cookie, "removing an activity record");
        }
    }
    Counted {
        up: client.bytes,
        down: upstream.bytes,
        repeated: client.repeated_bytes + upstream.repeated_bytes,
    }
}

/// The latest activity the program recorded on either socket, or `since_ns`.
pub(super) fn last_activity(program: &SpliceProgram, state: &SplicedState) -> u64 {
    [state.client_cookie, state.upstream_cookie]
        .into_iter()
        .filter_map(|cookie| program.activity(cookie).ok().flatten())
        .map(|activity| activity.last_ns)
        .fold(state.since_ns, u64::max)
}

/// What a readiness event on a spliced socket means.
pub(super) enum SplicedEvent {
    /// The side sent its FIN.
    Eof,
    /// Bytes are readable in userspace: they bypassed the splice (never expected).
    Stray,
    /// Nothing to see (spurious wake-up).
    Nothing,
    /// The socket failed (reset).
    Failed(io::Error),
}

/// Looks at a spliced socket without consuming anything.
pub(super) fn inspect(fd: RawFd) -> SplicedEvent {
    let mut byte = [0u8; 1];
    // SAFETY: `byte` is valid for one byte of writes during the call.
    let n = unsafe {
        libc::recv(
            fd,
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => SplicedEvent::Eof,
        n if n > 0 => SplicedEvent::Stray,
        _ => {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN) => SplicedEvent::Nothing,
                // The kernel reports EPIPE on a socket when it could not push redirected bytes
                // into the peer after that peer's send side was shut down (a half-close in
                // progress, e.g. the zero-length skb behind a FIN). Reading it cleared it; the
                // FIN itself arrives as EOF.
                Some(libc::EPIPE) => SplicedEvent::Nothing,
                _ => SplicedEvent::Failed(error),
            }
        }
    }
}

/// Most bytes a client may send behind its request before it has seen the 101 and still get a
/// kernel-path tunnel (they are read and sent upstream in userspace first); beyond this the
/// tunnel is relayed in userspace.
const MAX_UNREAD_BEFORE_SPLICE: usize = 1 << 20;

impl Worker {
    /// Kernel path: send what the client pipelined (now that the 101 is valid), then splice.
    /// The peeked 101 stays queued in the upstream socket for the kernel to deliver.
    ///
    /// The program takes each socket's place in its TCP stream from the first skb it sees, so
    /// no skb may be half-read by userspace when the splice starts: everything the client has
    /// sent so far is read here and goes upstream with the pipelined bytes. (The upstream
    /// socket was only peeked at, so nothing of it is half-read.)
    pub(super) fn hand_off_to_kernel(&mut self, slot: u32, mut to_upstream: Vec<u8>) {
        if !self.read_unread_client_bytes(slot, &mut to_upstream) {
            let reason = format!(
                "the client sent more than {MAX_UNREAD_BEFORE_SPLICE} bytes before the 101"
            );
            return self.fall_back_to_relay(slot, reason, to_upstream);
        }
        if to_upstream.is_empty() {
            return self.splice_now(slot);
        }
        if let Some(conn) = self.conn(slot) {
            conn.stage = Stage::Handoff;
        }
        self.send(slot, Which::Upstream, Outgoing::owned(to_upstream));
    }

    /// Appends every byte queued on the client socket to `into`; false when that would pass
    /// [`MAX_UNREAD_BEFORE_SPLICE`].
    fn read_unread_client_bytes(&mut self, slot: u32, into: &mut Vec<u8>) -> bool {
        let Some(fd) = self.conn(slot).map(|conn| conn.client.raw()) else {
            return true;
        };
        loop {
            match recv(fd, &mut self.scratch) {
                Ok(0) | Err(_) => return true, // drained, or the poll will report it
                Ok(n) => {
                    into.extend_from_slice(&self.scratch[..n]);
                    if into.len() > MAX_UNREAD_BEFORE_SPLICE {
                        return false;
                    }
                }
            }
        }
    }

    /// The pipelined bytes are upstream (or there were none): splice the tunnel now.
    pub(super) fn splice_now(&mut self, slot: u32) {
        let Some(program) = self.services.splice.clone() else {
            return self.fall_back_to_relay(slot, "no splice program".into(), Vec::new());
        };
        let now = monotonic_ns();
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let (Some(client), Some(upstream)) = (conn.client.fd.as_ref(), conn.upstream.fd.as_ref())
        else {
            return;
        };
        // What userspace wrote before the splice; everything queued beyond it came from the kernel.
        let client_baseline = queued_bytes(client.as_fd()).unwrap_or(0);
        let upstream_baseline = queued_bytes(upstream.as_fd()).unwrap_or(0);
        let owner = Owner {
            worker: self.index as u8,
            slot,
            generation: (conn.id & 0xff_ffff) as u32,
        };
        let handed = {
            let mut program = program
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            hand_off(&mut program, client.as_fd(), upstream.as_fd(), owner)
        };
        let (client_cookie, upstream_cookie) = match handed {
            Ok(cookies) => cookies,
            Err(error) => return self.fall_back_to_relay(slot, error.to_string(), Vec::new()),
        };
        let idle_ns = self.route_idle_ns(slot);
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        conn.stage = Stage::Spliced(SplicedState {
            client_cookie,
            upstream_cookie,
            fin_to_upstream: false,
            fin_to_client: false,
            since_ns: now,
            idle_ns,
            bytes_up: 0,
            bytes_down: 0,
            client_baseline,
            upstream_baseline,
        });
        let metrics = &self.services.metrics;
        metrics.tunnels_opened.inc();
        metrics.tunnels_open.inc();
        metrics.tunnels_spliced.inc();
        self.set_deadline(slot, now.saturating_add(idle_ns));
        self.arm_poll(slot, Which::Client);
        self.arm_poll(slot, Which::Upstream);
    }

    /// The kernel could not take the tunnel: relay it in userspace instead, starting with
    /// `to_upstream`. The upstream's 101 is still queued in its socket, so the relay delivers
    /// it like any other byte.
    fn fall_back_to_relay(&mut self, slot: u32, reason: String, to_upstream: Vec<u8>) {
        tracing::warn!(%reason, "kernel hand-off failed; relaying this tunnel in userspace");
        if let Some(conn) = self.conns[slot as usize].as_ref() {
            if let Some(fd) = conn.upstream.fd.as_ref() {
                // Undo the peek-time receive low-water mark, if one was set.
                let _ = kick(fd.as_fd());
            }
        }
        self.start_relay(slot, Vec::new(), to_upstream);
    }

    /// Passes a FIN on to `destination` once the kernel has delivered everything it redirected
    /// there: the redirect is asynchronous, so a FIN sent at once could overtake queued bytes
    /// (which the kernel then drops with EPIPE).
    pub(super) fn pass_fin(&mut self, slot: u32, destination: Which) {
        let backlog = self.kernel_backlog(slot, destination);
        if backlog.is_some_and(|backlog| backlog > 0) && self.is_gone(slot, destination) {
            // What the program redirected there can never be delivered (the psock drops it
            // once the socket failed): waiting for it would keep the tunnel open forever.
            let reason = format!("{destination:?} connection is gone (reset) with bytes queued");
            return self.begin_close(slot, reason, true);
        }
        if backlog.is_some_and(|backlog| backlog > 0) {
            if let Some(conn) = self.conns[slot as usize].as_ref() {
                self.fin_pending.push((slot, conn.id, destination));
            }
            return;
        }
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let fd = conn.side_mut(destination).raw();
        let Stage::Spliced(state) = &mut conn.stage else {
            return;
        };
        shutdown_write(fd);
        state.fin_passed(destination);
        if state.both_closed() {
            self.begin_close(slot, "both sides closed".into(), false);
        }
    }

    /// Whether the `which` socket of this tunnel is closed (see [`is_closed`]).
    fn is_gone(&mut self, slot: u32, which: Which) -> bool {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return true;
        };
        conn.side_mut(which)
            .fd
            .as_ref()
            .is_none_or(|fd| is_closed(fd.as_fd()))
    }

    /// Retries the FINs waiting for the kernel to drain (once per tick; usually empty).
    pub(super) fn check_pending_fins(&mut self) {
        if self.fin_pending.is_empty() {
            return;
        }
        for (slot, id, destination) in std::mem::take(&mut self.fin_pending) {
            let alive = self.conns[slot as usize]
                .as_ref()
                .is_some_and(|conn| conn.id == id && conn.closing.is_none());
            if alive {
                self.pass_fin(slot, destination);
            }
        }
    }

    /// A spliced socket woke up: a FIN, a reset, or (never expected) stray bytes.
    pub(super) fn on_spliced_readable(&mut self, slot: u32, which: Which) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let fd = conn.side_mut(which).raw();
        if !matches!(conn.stage, Stage::Spliced(_)) {
            return;
        }
        match inspect(fd) {
            SplicedEvent::Nothing => self.arm_poll(slot, which),
            SplicedEvent::Eof => self.pass_fin(slot, which.peer()),
            SplicedEvent::Stray => self.on_stray_bytes(slot, which),
            SplicedEvent::Failed(error) => {
                let abortive = error.raw_os_error() == Some(libc::ECONNRESET);
                self.begin_close(slot, format!("{which:?} socket failed: {error}"), abortive);
            }
        }
    }

    /// Bytes wait on a spliced socket: the program did not redirect them, so the peer will never
    /// get them. The tunnel cannot go on without a gap: reset both sides.
    fn on_stray_bytes(&mut self, slot: u32, which: Which) {
        let diverted = self
            .services
            .splice
            .clone()
            .zip(self.conn(slot))
            .is_some_and(|(program, conn)| {
                let Stage::Spliced(state) = &conn.stage else {
                    return false;
                };
                let cookie = match which {
                    Which::Client => state.client_cookie,
                    Which::Upstream => state.upstream_cookie,
                };
                program
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .activity(cookie)
                    .ok()
                    .flatten()
                    .is_some_and(|activity| activity.flags & DIVERTED != 0)
            });
        let reason = if diverted {
            self.services.metrics.kernel_diverted.inc();
            format!(
                "the kernel handed over bytes from {which:?} twice and the copy could not be cut \
                 off; the bytes were held back"
            )
        } else {
            format!("bytes from {which:?} bypassed the splice (no peer entry)")
        };
        tracing::warn!(%reason, "resetting a kernel-path tunnel");
        self.begin_close(slot, reason, true);
    }

    /// The program reported that a socket of this tunnel moved another `PRESSURE_STEP` bytes:
    /// a tunnel whose reader is more than `kernel_backlog` behind is closed as a slow consumer
    /// (reset both ways), which frees what the kernel queued for it.
    ///
    /// Why not slow the writer down instead: the only way to stop the redirect for one socket
    /// is to make the program pass its bytes to the socket itself, and on this kernel bytes
    /// passed to a socket that also has redirected bytes waiting to be sent to it go through
    /// the psock backlog, which loses their direction when it must retry (they are then sent
    /// back out of the socket they came from). A tunnel busy both ways was corrupted that way
    /// in testing (about one run in six), so the kernel path keeps no such state: it closes.
    /// `--datapath userspace` throttles slow readers instead (TCP backpressure).
    pub(super) fn check_pressure(&mut self, slot: u32) {
        for destination in [Which::Client, Which::Upstream] {
            let Some(backlog) = self.kernel_backlog(slot, destination) else {
                continue;
            };
            if backlog > self.services.kernel_backlog {
                self.services.metrics.kernel_slow_consumers.inc();
                let reason = format!(
                    "slow consumer: {destination:?} is {backlog} bytes behind on the kernel path \
                     (limits.kernel_backlog)"
                );
                tracing::info!(
                    ?destination,
                    backlog,
                    "closing a tunnel whose reader fell behind"
                );
                return self.begin_close(slot, reason, true);
            }
        }
    }

    /// Bytes the program redirected towards `destination` that its socket has not taken in
    /// yet; `None` unless the tunnel is spliced.
    pub(super) fn kernel_backlog(&mut self, slot: u32, destination: Which) -> Option<u64> {
        let program = self.services.splice.clone()?;
        let conn = self.conns.get_mut(slot as usize)?.as_mut()?;
        let fd = conn.side_mut(destination).fd.as_ref()?.as_raw_fd();
        let Stage::Spliced(state) = &mut conn.stage else {
            return None;
        };
        let redirected = program
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .activity(state.source_cookie(destination))
            .ok()
            .flatten()
            .map_or(0, |activity| activity.bytes);
        // SAFETY: `fd` belongs to this live connection for the duration of the call.
        let taken = queued_bytes(unsafe { BorrowedFd::borrow_raw(fd) })
            .unwrap_or(0)
            .saturating_sub(state.baseline(destination));
        Some(redirected.saturating_sub(taken))
    }

    /// Stops the kernel from moving this tunnel's bytes and records what it moved.
    pub(super) fn unsplice(&mut self, slot: u32) {
        let Some(program) = self.services.splice.clone() else {
            return;
        };
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let Stage::Spliced(state) = &mut conn.stage else {
            return;
        };
        let mut program = program
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let counted = forget(&mut program, state.client_cookie, state.upstream_cookie);
        state.bytes_up = counted.up;
        state.bytes_down = counted.down;
        let metrics = &self.services.metrics;
        metrics.spliced_bytes_kernel.add(counted.up + counted.down);
        if counted.repeated > 0 {
            metrics.kernel_repeated_bytes_cut.add(counted.repeated);
            tracing::debug!(
                client = %conn.client_addr,
                bytes = counted.repeated,
                "the kernel handed this tunnel's bytes over twice; the copies were cut off"
            );
        }
    }
}
