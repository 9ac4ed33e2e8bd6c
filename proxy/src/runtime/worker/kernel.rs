//! The kernel data path inside a worker (DESIGN.md §4–§5): hand a plain tunnel to the sockmap
//! program without losing or reordering a byte, then only watch it for closes and idleness.
//!
//! Hand-off order, each step a reason:
//! 1. the upstream's response head was only *peeked* (still queued in the upstream socket);
//! 2. bytes the client pipelined behind its request are sent upstream now, after the valid 101;
//! 3. `PEER[cookie(upstream)] = client` — the client socket goes live without its own key, safe
//!    because the client is silent until it sees the 101;
//! 4. `PEER[cookie(client)] = upstream` — the upstream goes live with its key already present;
//! 5. kick both (`SO_RCVLOWAT`): the queued 101 and every frame behind it pass through the verdict
//!    program to the client in order, and anything the client queued goes upstream.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, RawFd};

use crate::clock::monotonic_ns;
use crate::splice::{kick, queued_bytes, socket_cookie, Owner, SpliceProgram};

use super::{shutdown_write, Stage, Which, Worker};

/// A tunnel carried by the kernel; userspace holds only this.
#[derive(Debug)]
pub(super) struct SplicedState {
    pub(super) client_cookie: u64,
    pub(super) upstream_cookie: u64,
    pub(super) client_eof: bool,
    pub(super) upstream_eof: bool,
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

/// Removes a tunnel's entries (peer links first, so nothing is redirected any more) and returns
/// the bytes each way (client → upstream, upstream → client) the program counted.
pub(super) fn forget(
    program: &mut SpliceProgram,
    client_cookie: u64,
    upstream_cookie: u64,
) -> (u64, u64) {
    for cookie in [client_cookie, upstream_cookie] {
        if let Err(error) = program.remove_peer(cookie) {
            tracing::debug!(%error, cookie, "removing a peer entry");
        }
    }
    let bytes = |cookie| {
        program
            .activity(cookie)
            .ok()
            .flatten()
            .map_or(0, |activity| activity.bytes)
    };
    let counted = (bytes(client_cookie), bytes(upstream_cookie));
    for cookie in [client_cookie, upstream_cookie] {
        if let Err(error) = program.untrack(cookie) {
            tracing::debug!(%error, cookie, "removing an activity record");
        }
    }
    counted
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

impl Worker {
    /// The pipelined bytes are upstream (or there were none): splice the tunnel now.
    pub(super) fn splice_now(&mut self, slot: u32) {
        let Some(program) = self.services.splice.clone() else {
            return self.fall_back_to_relay(slot, "no splice program".into());
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
            Err(error) => return self.fall_back_to_relay(slot, error.to_string()),
        };
        let idle_ns = self.route_idle_ns(slot);
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        conn.stage = Stage::Spliced(SplicedState {
            client_cookie,
            upstream_cookie,
            client_eof: false,
            upstream_eof: false,
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

    /// The kernel could not take the tunnel: relay it in userspace instead. The upstream's 101
    /// is still queued in its socket, so the relay delivers it like any other byte.
    fn fall_back_to_relay(&mut self, slot: u32, reason: String) {
        tracing::warn!(%reason, "kernel hand-off failed; relaying this tunnel in userspace");
        if let Some(conn) = self.conns[slot as usize].as_ref() {
            if let Some(fd) = conn.upstream.fd.as_ref() {
                // Undo the peek-time receive low-water mark, if one was set.
                let _ = kick(fd.as_fd());
            }
        }
        self.start_relay(slot, Vec::new(), Vec::new());
    }

    /// A spliced socket woke up: a FIN, a reset, or (never expected) stray bytes.
    pub(super) fn on_spliced_readable(&mut self, slot: u32, which: Which) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let fd = conn.side_mut(which).raw();
        let peer_fd = conn.side_mut(which.peer()).raw();
        let Stage::Spliced(state) = &mut conn.stage else {
            return;
        };
        match inspect(fd) {
            SplicedEvent::Nothing => self.arm_poll(slot, which),
            SplicedEvent::Eof => {
                match which {
                    Which::Client => state.client_eof = true,
                    Which::Upstream => state.upstream_eof = true,
                }
                shutdown_write(peer_fd);
                if state.client_eof && state.upstream_eof {
                    self.begin_close(slot, "both sides closed".into(), false);
                }
            }
            SplicedEvent::Stray => self.begin_close(
                slot,
                format!("bytes from {which:?} bypassed the splice (no peer entry)"),
                false,
            ),
            SplicedEvent::Failed(error) => {
                let abortive = error.raw_os_error() == Some(libc::ECONNRESET);
                self.begin_close(slot, format!("{which:?} socket failed: {error}"), abortive);
            }
        }
    }

    /// The program reported that a socket of this tunnel moved another `PRESSURE_STEP` bytes:
    /// close the tunnel if either reader has fallen more than `kernel_backlog` behind.
    pub(super) fn check_pressure(&mut self, slot: u32) {
        let Some(program) = self.services.splice.clone() else {
            return;
        };
        let limit = self.services.kernel_backlog;
        let Some(conn) = self.conns[slot as usize].as_ref() else {
            return;
        };
        let Stage::Spliced(state) = &conn.stage else {
            return;
        };
        let (Some(client), Some(upstream)) = (conn.client.fd.as_ref(), conn.upstream.fd.as_ref())
        else {
            return;
        };
        let (redirected_up, redirected_down) = {
            let program = program
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let bytes = |cookie| {
                program
                    .activity(cookie)
                    .ok()
                    .flatten()
                    .map_or(0, |activity| activity.bytes)
            };
            (bytes(state.client_cookie), bytes(state.upstream_cookie))
        };
        let taken_by_upstream = queued_bytes(upstream.as_fd())
            .unwrap_or(0)
            .saturating_sub(state.upstream_baseline);
        let taken_by_client = queued_bytes(client.as_fd())
            .unwrap_or(0)
            .saturating_sub(state.client_baseline);
        let backlog_up = redirected_up.saturating_sub(taken_by_upstream);
        let backlog_down = redirected_down.saturating_sub(taken_by_client);
        let (backlog, reader) = if backlog_down >= backlog_up {
            (backlog_down, "client")
        } else {
            (backlog_up, "upstream")
        };
        if backlog > limit {
            self.services.metrics.slow_consumers_closed.inc();
            let reason = format!(
                "slow consumer: the {reader} is {backlog} bytes behind (limit {limit}); closed to bound kernel memory"
            );
            self.begin_close(slot, reason, false);
        }
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
        let (up, down) = forget(&mut program, state.client_cookie, state.upstream_cookie);
        state.bytes_up = up;
        state.bytes_down = down;
        self.services.metrics.spliced_bytes_kernel.add(up + down);
    }
}
