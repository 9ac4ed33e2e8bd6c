//! The kernel path's I/O inside a worker: hand-off steps 3–5, looking at spliced sockets,
//! measuring what the kernel still has to deliver, pausing a tunnel whose reader fell behind,
//! and taking a tunnel out of the maps.
//! Decisions are the connection's (`connection/splice.rs`); this only does and measures.
//!
//! Hand-off steps 3–5 (steps 1–2 are the connection's):
//! 3. `PEER[cookie(upstream)] = client` — the client socket goes live without its own key, safe
//!    right after the 101 because the client is silent until it sees it; a promoted tunnel's
//!    client may be sending, so `BRIDGE[cookie(client)] = upstream` goes in first (the program
//!    looks there when `PEER` has no entry; the bridge has no program, so the upstream does not
//!    go live by it) and comes out after step 4;
//! 4. `PEER[cookie(client)] = upstream` — the upstream goes live with its key already present;
//! 5. kick both (`SO_RCVLOWAT`): the queued 101 and every frame behind it pass through the verdict
//!    program to the client in order, and anything the client queued goes upstream.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use wsplice_common::DIVERTED;

use crate::connection::{Backlog, Counted, Side, SplicedEvent};
use crate::splice::{SpliceError, SpliceMaps};
use crate::sys;
use crate::tag::Tag;
use crate::tunnel::frames::FrameTracker;

/// A tunnel's sockets as the splice maps know them.
#[derive(Debug, Clone, Copy)]
pub struct SplicedSockets {
    client_cookie: u64,
    upstream_cookie: u64,
    /// `queued_bytes` of each socket at the hand-off (what userspace wrote before the splice).
    client_baseline: u64,
    upstream_baseline: u64,
    /// Both sockets are in `PAUSED` (the tunnel left the kernel path for the relay).
    paused: bool,
    /// The owner tag the activity records carry (the process that spliced them wrote it).
    owner: u64,
}

impl SplicedSockets {
    /// What a successor needs to know of them (binary upgrade).
    pub fn handed(&self) -> crate::upgrade::KernelSockets {
        crate::upgrade::KernelSockets {
            client_cookie: self.client_cookie,
            upstream_cookie: self.upstream_cookie,
            client_baseline: self.client_baseline,
            upstream_baseline: self.upstream_baseline,
            owner: self.owner,
        }
    }

    /// The sockets of a tunnel a predecessor spliced.
    pub fn adopted(kernel: &crate::upgrade::KernelSockets) -> SplicedSockets {
        SplicedSockets {
            client_cookie: kernel.client_cookie,
            upstream_cookie: kernel.upstream_cookie,
            client_baseline: kernel.client_baseline,
            upstream_baseline: kernel.upstream_baseline,
            paused: false,
            owner: kernel.owner,
        }
    }

    /// The owner tag in their activity records.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    fn cookie(&self, side: Side) -> u64 {
        match side {
            Side::Client => self.client_cookie,
            Side::Upstream => self.upstream_cookie,
        }
    }

    fn baseline(&self, side: Side) -> u64 {
        match side {
            Side::Client => self.client_baseline,
            Side::Upstream => self.upstream_baseline,
        }
    }
}

/// Why a hand-off to the kernel failed (the tunnel then goes to the userspace relay).
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// `SO_COOKIE` failed.
    #[error("socket cookie: {0}")]
    Cookie(#[source] io::Error),
    /// A map update failed.
    #[error("sockmap: {0}")]
    Map(#[from] SpliceError),
    /// The kick failed.
    #[error("kick: {0}")]
    Kick(#[source] io::Error),
}

/// Hand-off steps 3–5: tracks both sockets, inserts them in the safe order (`bridged`: with the
/// client's bridge, for a client that may be sending) and kicks them.
pub fn hand_off(
    maps: &mut SpliceMaps,
    client: BorrowedFd<'_>,
    upstream: BorrowedFd<'_>,
    owner: Tag,
    bridged: bool,
    frames: [FrameTracker; 2],
) -> Result<SplicedSockets, HandoffError> {
    let sockets = SplicedSockets {
        client_cookie: sys::socket_cookie(client).map_err(HandoffError::Cookie)?,
        upstream_cookie: sys::socket_cookie(upstream).map_err(HandoffError::Cookie)?,
        // What userspace wrote before the splice; everything queued beyond it came from the
        // kernel.
        client_baseline: sys::queued_bytes(client).unwrap_or(0),
        upstream_baseline: sys::queued_bytes(upstream).unwrap_or(0),
        paused: false,
        owner: owner.encode(),
    };
    let inserted = (|| {
        let [from_client, from_upstream] = frames;
        maps.track(sockets.client_cookie, owner.encode(), from_client)?;
        maps.track(sockets.upstream_cookie, owner.encode(), from_upstream)?;
        if bridged {
            maps.insert_bridge(sockets.client_cookie, upstream)?;
        }
        maps.insert_peer(sockets.upstream_cookie, client)?;
        maps.insert_peer(sockets.client_cookie, upstream)?;
        Ok::<(), SpliceError>(())
    })();
    if bridged {
        // PEER has both entries now (or the hand-off is being undone): the bridge is done.
        if let Err(error) = maps.remove_bridge(sockets.client_cookie) {
            tracing::warn!(%error, "removing a bridge entry");
        }
    }
    if let Err(error) = inserted {
        forget(maps, &sockets);
        return Err(error.into());
    }
    let kicked = sys::set_rcvlowat(upstream, 1).and_then(|()| sys::set_rcvlowat(client, 1));
    if let Err(error) = kicked {
        // The tunnel goes to the userspace relay: the kernel must not move its bytes too.
        forget(maps, &sockets);
        return Err(HandoffError::Kick(error));
    }
    Ok(sockets)
}

/// Removes a tunnel's entries (peer links first, so nothing is redirected any more) and
/// returns what the program counted.
pub fn forget(maps: &mut SpliceMaps, sockets: &SplicedSockets) -> Counted {
    let cookies = [sockets.client_cookie, sockets.upstream_cookie];
    for cookie in cookies {
        if let Err(error) = maps.remove_peer(cookie) {
            tracing::debug!(%error, cookie, "removing a peer entry");
        }
    }
    let counted = counted(maps, sockets);
    for cookie in cookies {
        if let Err(error) = maps.untrack(cookie) {
            tracing::debug!(%error, cookie, "removing an activity record");
        }
        if sockets.paused {
            if let Err(error) = maps.unpause(cookie) {
                tracing::debug!(%error, cookie, "removing a pause");
            }
        }
    }
    counted
}

/// What the program counted for the tunnel so far.
fn counted(maps: &SpliceMaps, sockets: &SplicedSockets) -> Counted {
    let activity = |cookie| maps.activity(cookie).ok().flatten().unwrap_or_default();
    let (client, upstream) = (
        activity(sockets.client_cookie),
        activity(sockets.upstream_cookie),
    );
    Counted {
        up: client.bytes,
        down: upstream.bytes,
        repeated: client.repeated_bytes + upstream.repeated_bytes,
        frames: [client, upstream]
            .map(|record| FrameTracker::from_kernel(record.frame_left, record.frame_state)),
    }
}

/// Takes a tunnel off the kernel path without dropping a byte: pauses both sockets (their
/// bytes then stay on them, in order, for the userspace relay), waits for any verdict that
/// still redirects, and returns what the program counted; from then on the counts no longer
/// move. Both sockets stay in the maps until the tunnel closes: taking a socket out drops
/// what the kernel queued for it.
///
/// Why a lock is enough: the verdict runs with the source socket's lock held (in softirq, or
/// from its backlog while a process owns it), and a `recv` takes that lock, so once the peek
/// on each socket returned, no verdict that missed the pause can still be running.
pub fn pause(
    maps: &mut SpliceMaps,
    sockets: &mut SplicedSockets,
    client: BorrowedFd<'_>,
    upstream: BorrowedFd<'_>,
) -> Result<Counted, SpliceError> {
    sockets.paused = true;
    maps.pause(sockets.client_cookie)?;
    maps.pause(sockets.upstream_cookie)?;
    for fd in [client, upstream] {
        let mut byte = [0u8; 1];
        // Only the lock matters; what the peek finds (bytes, EOF, EAGAIN, an error) is the
        // relay's to read.
        let _ = sys::peek(fd.as_raw_fd(), &mut byte);
    }
    Ok(counted(maps, sockets))
}

/// When the program last moved a byte of the tunnel (either socket).
pub fn last_activity(maps: &SpliceMaps, sockets: &SplicedSockets) -> Option<u64> {
    [sockets.client_cookie, sockets.upstream_cookie]
        .into_iter()
        .filter_map(|cookie| maps.activity(cookie).ok().flatten())
        .map(|activity| activity.last_ns)
        .max()
}

/// Bytes the program redirected towards `towards` that its socket `fd` has not taken in yet.
pub fn backlog(
    maps: &SpliceMaps,
    sockets: &SplicedSockets,
    towards: Side,
    fd: BorrowedFd<'_>,
) -> Backlog {
    let redirected = maps
        .activity(sockets.cookie(towards.peer()))
        .ok()
        .flatten()
        .map_or(0, |activity| activity.bytes);
    let taken = sys::queued_bytes(fd)
        .unwrap_or(0)
        .saturating_sub(sockets.baseline(towards));
    Backlog {
        bytes: redirected.saturating_sub(taken),
        destination_gone: sys::is_closed(fd),
    }
}

/// Looks at a spliced socket without consuming anything. A diverted socket is reported as
/// such even when nothing stays on it (a paused socket's program drops what it diverts).
pub fn inspect(maps: &SpliceMaps, sockets: &SplicedSockets, side: Side, fd: RawFd) -> SplicedEvent {
    let diverted = maps
        .activity(sockets.cookie(side))
        .ok()
        .flatten()
        .is_some_and(|activity| activity.flags & DIVERTED != 0);
    if diverted {
        return SplicedEvent::Stray { diverted };
    }
    let mut byte = [0u8; 1];
    match sys::peek(fd, &mut byte) {
        Ok(0) => SplicedEvent::Eof,
        Ok(_) => SplicedEvent::Stray { diverted },
        Err(error) => match error.raw_os_error() {
            Some(libc::EAGAIN) => SplicedEvent::Nothing,
            // The kernel reports EPIPE on a socket when it could not push redirected bytes
            // into the peer after that peer's send side was shut down (a half-close in
            // progress, e.g. the zero-length skb behind a FIN). Reading it cleared it; the
            // FIN itself arrives as EOF.
            Some(libc::EPIPE) => SplicedEvent::Nothing,
            _ => SplicedEvent::Failed {
                reset: error.raw_os_error() == Some(libc::ECONNRESET),
                error: error.to_string(),
            },
        },
    }
}
