//! A handle on the program's maps: `PEER` (which socket each socket's bytes go to), `BRIDGE`
//! (the same, only during a hand-off), `ACTIVITY` (what the program records per socket) and
//! `PAUSED` (sockets whose bytes stay on them for the userspace relay). Each worker owns one,
//! so inserts and lookups take no lock in userspace; the kernel serializes map updates itself.

use std::os::fd::{AsRawFd, BorrowedFd};

use aya::maps::{HashMap, MapData, SockHash};
use wsplice_common::{Activity, PRESSURE_FIRST};

use super::SpliceError;
use crate::tunnel::frames::FrameTracker;

/// `PEER`, `BRIDGE`, `ACTIVITY` and `PAUSED`, through this handle's own descriptors.
pub struct SpliceMaps {
    peer: SockHash<MapData, u64>,
    bridge: SockHash<MapData, u64>,
    activity: HashMap<MapData, u64, Activity>,
    paused: HashMap<MapData, u64, u32>,
}

impl std::fmt::Debug for SpliceMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpliceMaps").finish_non_exhaustive()
    }
}

impl SpliceMaps {
    pub(super) fn new(
        peer: SockHash<MapData, u64>,
        bridge: SockHash<MapData, u64>,
        activity: HashMap<MapData, u64, Activity>,
        paused: HashMap<MapData, u64, u32>,
    ) -> SpliceMaps {
        SpliceMaps {
            peer,
            bridge,
            activity,
            paused,
        }
    }

    /// `PEER[cookie] = peer`: bytes arriving on the socket with `cookie` go to `peer`'s egress.
    /// The kernel keeps a reference to the socket, not to the descriptor.
    pub fn insert_peer(&mut self, cookie: u64, peer: BorrowedFd<'_>) -> Result<(), SpliceError> {
        self.peer.insert(&cookie, peer.as_raw_fd(), 0)?;
        Ok(())
    }

    /// Removes `PEER[cookie]`; a missing entry (the socket closed) is fine.
    pub fn remove_peer(&mut self, cookie: u64) -> Result<(), SpliceError> {
        ignore_missing(self.peer.remove(&cookie))
    }

    /// `BRIDGE[cookie] = peer`: while the socket with `cookie` is live without its own `PEER`
    /// entry, its bytes still go to `peer`. `peer` does not go live by this.
    pub fn insert_bridge(&mut self, cookie: u64, peer: BorrowedFd<'_>) -> Result<(), SpliceError> {
        self.bridge.insert(&cookie, peer.as_raw_fd(), 0)?;
        Ok(())
    }

    /// Removes `BRIDGE[cookie]`; a missing entry is fine.
    pub fn remove_bridge(&mut self, cookie: u64) -> Result<(), SpliceError> {
        ignore_missing(self.bridge.remove(&cookie))
    }

    /// Starts recording activity for the socket with `cookie`; `owner` comes back on the
    /// pressure ring once the socket has redirected `PRESSURE_FIRST` bytes, then each time it
    /// has redirected another `PRESSURE_STEP`. `frames`: where the socket's stream stands
    /// between WebSocket frames (the program follows them from there).
    pub fn track(
        &mut self,
        cookie: u64,
        owner: u64,
        frames: FrameTracker,
    ) -> Result<(), SpliceError> {
        let (frame_left, frame_state) = frames.to_kernel();
        let record = Activity {
            notify_at: PRESSURE_FIRST,
            owner,
            frame_left,
            frame_state,
            ..Activity::default()
        };
        self.activity.insert(&cookie, &record, 0)?;
        Ok(())
    }

    /// The activity recorded for `cookie`, if tracked.
    pub fn activity(&self, cookie: u64) -> Result<Option<Activity>, SpliceError> {
        match self.activity.get(&cookie, 0) {
            Ok(activity) => Ok(Some(activity)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Stops recording activity for `cookie` (per-socket records are not removed by the kernel).
    pub fn untrack(&mut self, cookie: u64) -> Result<(), SpliceError> {
        ignore_missing(self.activity.remove(&cookie))
    }

    /// Pauses the socket with `cookie`: from the next skb on, the program leaves its bytes on
    /// it (in order, charged to its receive buffer) instead of redirecting them. A verdict
    /// already running may still redirect one skb: the caller takes the socket's lock
    /// afterwards (any setsockopt does) to wait for it.
    pub fn pause(&mut self, cookie: u64) -> Result<(), SpliceError> {
        self.paused.insert(&cookie, &1, 0)?;
        Ok(())
    }

    /// Removes the pause of `cookie`; a missing entry is fine.
    pub fn unpause(&mut self, cookie: u64) -> Result<(), SpliceError> {
        ignore_missing(self.paused.remove(&cookie))
    }

    /// Entries in `PEER` (walks the map: for tests only; metrics come from the workers).
    #[cfg(test)]
    pub fn peer_entries(&self) -> usize {
        self.peer.keys().filter(Result::is_ok).count()
    }

    /// Entries in `ACTIVITY` (walks the map; tests only).
    #[cfg(test)]
    pub fn tracked_entries(&self) -> usize {
        self.activity.keys().filter(Result::is_ok).count()
    }
}

fn ignore_missing(result: Result<(), aya::maps::MapError>) -> Result<(), SpliceError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}
