//! The loaded `sk_skb/stream_verdict` program: loading, attaching, handles on its maps.

use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{HashMap, Map, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use wsplice_common::packet::{FLOWS_MAP, PACKET_STATS_MAP};
use wsplice_common::{
    Activity, ACTIVITY_MAP, BRIDGE_MAP, PAUSED_MAP, PEER_MAP, PRESSURE_MAP, VERDICT_PROGRAM,
};

use super::SpliceMaps;

/// The eBPF object built from `ebpf/` by `build.rs`, embedded in the binary (or a stub).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsplice-ebpf.o"));

/// Whether this binary carries the real object (`build.rs` embeds a stub in debug builds).
pub fn ebpf_object_built() -> bool {
    !EBPF_OBJECT.starts_with(b"wsplice: no eBPF object")
}

/// Loading or using the program failed. Each message carries the whole cause chain (the
/// kernel's errno, the verifier's log), since callers log only the top-level `Display`.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The kernel refused a bpf() call with EPERM/EACCES: not root, or CAP_BPF, CAP_NET_ADMIN
    /// or CAP_PERFMON is missing (without CAP_PERFMON the verifier also walks speculative paths
    /// and gives up on the program), or a locked-down kernel.
    #[error("not permitted to load eBPF (run as root or with CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON): {0}")]
    PermissionDenied(String),
    /// The object could not be loaded (parsing, BTF, map creation).
    #[error("cannot load the eBPF object: {}", crate::error_chain::describe(.0))]
    Load(aya::EbpfError),
    /// The verdict program could not be loaded (the message holds the verifier's log) or
    /// attached to the sockhash.
    #[error("cannot load or attach the verdict program: {}", crate::error_chain::describe(.0))]
    Program(aya::programs::ProgramError),
    /// A map operation failed.
    #[error("map operation failed: {}", crate::error_chain::describe(.0))]
    Map(aya::maps::MapError),
    /// The object lacks a map or program this build expects.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// This binary was built without the eBPF object (a debug build or `WSPLICE_EBPF=stub`).
    #[error(
        "this binary has no eBPF object (a debug build, or WSPLICE_EBPF=stub): build it with \
         `cargo build --release -p wsplice` or WSPLICE_EBPF=build"
    )]
    NotBuilt,
    /// The verdict program could not be attached to `PEER`.
    #[error("cannot attach the verdict program to the sockhash: {0}")]
    Attach(#[source] std::io::Error),
    /// A map's descriptor could not be duplicated for a new handle.
    #[error("cannot duplicate a map descriptor: {0}")]
    Duplicate(#[source] std::io::Error),
    /// The packet splice's route socket (rtnetlink) could not be opened.
    #[error("cannot open a route socket: {0}")]
    Route(String),
    /// The packet splice's pin folder (`[packet] pin`) or a pin in it could not be made.
    #[error("cannot pin the packet splice's map or links: {0}")]
    Pin(String),
}

impl SpliceError {
    /// `PermissionDenied` when the chain of `error` holds an EPERM/EACCES, else `otherwise`.
    fn classify<E>(error: E, otherwise: fn(E) -> SpliceError) -> SpliceError
    where
        E: std::error::Error + 'static,
    {
        if is_permission_error(&error) {
            SpliceError::PermissionDenied(crate::error_chain::describe(&error))
        } else {
            otherwise(error)
        }
    }
}

impl From<aya::EbpfError> for SpliceError {
    fn from(error: aya::EbpfError) -> Self {
        SpliceError::classify(error, SpliceError::Load)
    }
}

impl From<aya::programs::ProgramError> for SpliceError {
    fn from(error: aya::programs::ProgramError) -> Self {
        SpliceError::classify(error, SpliceError::Program)
    }
}

impl From<aya::maps::MapError> for SpliceError {
    fn from(error: aya::maps::MapError) -> Self {
        SpliceError::classify(error, SpliceError::Map)
    }
}

/// Whether any error in the chain is an `io::Error` with EPERM or EACCES.
fn is_permission_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                return true;
            }
        }
        current = error.source();
    }
    false
}

/// The loaded and attached program. It lives as long as the proxy; workers reach its maps
/// through their own [`SpliceMaps`] handles (duplicated descriptors), so no lock is taken on
/// the hot path.
pub struct SpliceProgram {
    /// Descriptors of `PEER`, `BRIDGE`, `ACTIVITY` and `PAUSED`, duplicated into each handle.
    peer_fd: OwnedFd,
    bridge_fd: OwnedFd,
    activity_fd: OwnedFd,
    paused_fd: OwnedFd,
    /// The `PRESSURE` ring buffer's descriptor (for a successor).
    pressure_fd: OwnedFd,
    /// Taken by the pressure watcher (`take_pressure_ring`).
    pressure: Option<RingBuf<MapData>>,
    /// Owns the loaded program. `None` when the maps were adopted from a predecessor (its
    /// program is attached to them).
    _ebpf: Option<Ebpf>,
    /// Tunnels adopted from a predecessor: the owner tag their activity records carry (written
    /// by the process that spliced them) → the tag of their connection here.
    pub adopted_owners: super::AdoptedOwners,
}

/// A stable 64-bit hash (FNV-1a) of the embedded eBPF object: a successor adopts the maps of
/// a predecessor only when both carry the same object.
pub fn object_hash() -> u64 {
    crate::hash::fnv1a(EBPF_OBJECT)
}

impl std::fmt::Debug for SpliceProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpliceProgram").finish_non_exhaustive()
    }
}

/// A duplicate of a map's descriptor.
fn duplicate(map: &Map) -> Result<OwnedFd, SpliceError> {
    let data = match map {
        Map::SockHash(data) | Map::HashMap(data) => data,
        _ => return Err(SpliceError::Missing("a map of the expected type")),
    };
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(SpliceError::Duplicate)
}

impl SpliceProgram {
    /// Loads the embedded object, sizes both maps for `max_sockets` and attaches the verdict
    /// program to `PEER`. Needs root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON.
    pub fn load(max_sockets: u32) -> Result<SpliceProgram, SpliceError> {
        if !ebpf_object_built() {
            return Err(SpliceError::NotBuilt);
        }
        let max_sockets = max_sockets.max(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(PEER_MAP, max_sockets)
            .map_max_entries(ACTIVITY_MAP, max_sockets)
            .map_max_entries(PAUSED_MAP, max_sockets)
            .map_max_entries(FLOWS_MAP, 1)
            .load(EBPF_OBJECT)?;
        // The object's packet-splice maps are created with it (at their smallest); this
        // program does not use them, so they are not kept (a successor that adopts the maps
        // holds exactly what this process held).
        drop(ebpf.take_map(FLOWS_MAP));
        drop(ebpf.take_map(PACKET_STATS_MAP));
        let peer_map = ebpf
            .take_map(PEER_MAP)
            .ok_or(SpliceError::Missing("PEER map"))?;
        let activity_map = ebpf
            .take_map(ACTIVITY_MAP)
            .ok_or(SpliceError::Missing("ACTIVITY map"))?;
        let bridge_map = ebpf
            .take_map(BRIDGE_MAP)
            .ok_or(SpliceError::Missing("BRIDGE map"))?;
        let (peer_fd, activity_fd) = (duplicate(&peer_map)?, duplicate(&activity_map)?);
        let bridge_fd = duplicate(&bridge_map)?;
        let paused_map = ebpf
            .take_map(PAUSED_MAP)
            .ok_or(SpliceError::Missing("PAUSED map"))?;
        let paused_fd = duplicate(&paused_map)?;
        let peer: SockHash<MapData, u64> = SockHash::try_from(peer_map)?;
        let pressure = RingBuf::try_from(
            ebpf.take_map(PRESSURE_MAP)
                .ok_or(SpliceError::Missing("PRESSURE ring buffer"))?,
        )?;
        let pressure_fd = pressure
            .as_fd()
            .try_clone_to_owned()
            .map_err(SpliceError::Duplicate)?;
        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROGRAM)
            .ok_or(SpliceError::Missing("verdict program"))?
            .try_into()?;
        program.load()?;
        // Attached to the map itself (BPF_PROG_ATTACH), not through a link: a link would
        // detach when the process that made it exits, and the program must stay attached for
        // as long as the map lives, through binary upgrades (a successor adopts the map).
        crate::sys::attach_stream_verdict(program.fd()?.as_fd(), peer.fd().as_fd())
            .map_err(SpliceError::Attach)?;
        // Checks the activity map's type once, so `maps()` cannot fail on it later.
        let _: HashMap<MapData, u64, Activity> = HashMap::try_from(activity_map)?;
        // Checked once too; the program is not attached to it.
        let _: SockHash<MapData, u64> = SockHash::try_from(bridge_map)?;
        let _: HashMap<MapData, u64, u32> = HashMap::try_from(paused_map)?;
        Ok(SpliceProgram {
            peer_fd,
            bridge_fd,
            activity_fd,
            paused_fd,
            pressure_fd,
            pressure: Some(pressure),
            _ebpf: Some(ebpf),
            adopted_owners: super::AdoptedOwners::default(),
        })
    }

    /// The maps a predecessor passed (binary upgrade), in the order of
    /// [`SpliceProgram::offer`], with its program attached to them.
    pub fn adopt(fds: [OwnedFd; 5]) -> Result<SpliceProgram, SpliceError> {
        let [peer_fd, bridge_fd, activity_fd, paused_fd, pressure_fd] = fds;
        let ring_fd = pressure_fd.try_clone().map_err(SpliceError::Duplicate)?;
        let pressure = RingBuf::try_from(Map::RingBuf(MapData::from_fd(ring_fd)?))?;
        let program = SpliceProgram {
            peer_fd,
            bridge_fd,
            activity_fd,
            paused_fd,
            pressure_fd,
            pressure: Some(pressure),
            _ebpf: None,
            adopted_owners: super::AdoptedOwners::default(),
        };
        // The types are checked once, as `load` does.
        program.maps()?;
        Ok(program)
    }

    /// The maps' descriptors for a successor: `PEER`, `BRIDGE`, `ACTIVITY`, `PAUSED`,
    /// `PRESSURE`.
    pub fn offer(&self) -> [std::os::fd::BorrowedFd<'_>; 5] {
        [
            self.peer_fd.as_fd(),
            self.bridge_fd.as_fd(),
            self.activity_fd.as_fd(),
            self.paused_fd.as_fd(),
            self.pressure_fd.as_fd(),
        ]
    }

    /// A new handle on the program's maps (one per worker, one for the admin gauges).
    pub fn maps(&self) -> Result<SpliceMaps, SpliceError> {
        let open = |fd: &OwnedFd| -> Result<MapData, SpliceError> {
            let copy = fd.try_clone().map_err(SpliceError::Duplicate)?;
            Ok(MapData::from_fd(copy)?)
        };
        Ok(SpliceMaps::new(
            SockHash::try_from(Map::SockHash(open(&self.peer_fd)?))?,
            SockHash::try_from(Map::SockHash(open(&self.bridge_fd)?))?,
            HashMap::try_from(Map::HashMap(open(&self.activity_fd)?))?,
            HashMap::try_from(Map::HashMap(open(&self.paused_fd)?))?,
        ))
    }

    /// The pressure ring buffer, once (for the pressure watcher thread).
    pub fn take_pressure_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.pressure.take()
    }
}
