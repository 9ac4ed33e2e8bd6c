//! The loaded `sk_skb/stream_verdict` program and its two maps (DESIGN.md §4).

use std::os::fd::{AsRawFd, BorrowedFd};

use aya::maps::{HashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use wsplice_common::{
    Activity, ACTIVITY_MAP, PEER_MAP, PRESSURE_MAP, PRESSURE_STEP, VERDICT_PROGRAM,
};

/// The eBPF object built from `ebpf/` by `build.rs`, embedded in the binary.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wsplice-ebpf.o"));

/// Loading or using the program failed. Each message carries the whole cause chain (the
/// kernel's errno, the verifier's log), since callers log only the top-level `Display`.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The kernel refused a bpf() call with EPERM/EACCES: not root, or CAP_BPF and
    /// CAP_NET_ADMIN are missing (or a locked-down kernel).
    #[error("not permitted to load eBPF (run as root or with CAP_BPF + CAP_NET_ADMIN): {0}")]
    PermissionDenied(String),
    /// The object could not be loaded (parsing, BTF, map creation).
    #[error("cannot load the eBPF object: {}", causes(.0))]
    Load(aya::EbpfError),
    /// The verdict program could not be loaded (the message holds the verifier's log) or
    /// attached to the sockhash.
    #[error("cannot load or attach the verdict program: {}", causes(.0))]
    Program(aya::programs::ProgramError),
    /// A map operation failed.
    #[error("map operation failed: {}", causes(.0))]
    Map(aya::maps::MapError),
    /// The object lacks a map or program this build expects.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

impl SpliceError {
    /// `PermissionDenied` when the chain of `error` holds an EPERM/EACCES, else `otherwise`.
    fn classify<E>(error: E, otherwise: fn(E) -> SpliceError) -> SpliceError
    where
        E: std::error::Error + 'static,
    {
        if is_permission_error(&error) {
            SpliceError::PermissionDenied(causes(&error))
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

/// `error` and its sources joined by ": ", e.g. "failed to create map `PEER`: Operation not
/// permitted (os error 1)".
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some aya variants already print their source; do not repeat it.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
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

/// The loaded program with its `PEER` sockhash and `ACTIVITY` hash map.
pub struct SpliceProgram {
    peer: SockHash<MapData, u64>,
    activity: HashMap<MapData, u64, Activity>,
    /// Taken by the pressure watcher (`take_pressure_ring`).
    pressure: Option<RingBuf<MapData>>,
    /// Owns the program and its attachment; dropping it detaches the verdict.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for SpliceProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpliceProgram").finish_non_exhaustive()
    }
}

impl SpliceProgram {
    /// Loads the embedded object, sizes both maps for `max_sockets` and attaches the verdict
    /// program to `PEER`. Needs root or CAP_BPF + CAP_NET_ADMIN.
    pub fn load(max_sockets: u32) -> Result<SpliceProgram, SpliceError> {
        let max_sockets = max_sockets.max(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(PEER_MAP, max_sockets)
            .map_max_entries(ACTIVITY_MAP, max_sockets)
            .load(EBPF_OBJECT)?;
        let peer: SockHash<MapData, u64> = SockHash::try_from(
            ebpf.take_map(PEER_MAP)
                .ok_or(SpliceError::Missing("PEER map"))?,
        )?;
        let activity: HashMap<MapData, u64, Activity> = HashMap::try_from(
            ebpf.take_map(ACTIVITY_MAP)
                .ok_or(SpliceError::Missing("ACTIVITY map"))?,
        )?;
        let pressure = RingBuf::try_from(
            ebpf.take_map(PRESSURE_MAP)
                .ok_or(SpliceError::Missing("PRESSURE ring buffer"))?,
        )?;
        let program: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROGRAM)
            .ok_or(SpliceError::Missing("verdict program"))?
            .try_into()?;
        program.load()?;
        program.attach(peer.fd())?;
        Ok(SpliceProgram {
            peer,
            activity,
            pressure: Some(pressure),
            _ebpf: ebpf,
        })
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

    /// Starts recording activity for the socket with `cookie`; `owner` comes back on the
    /// pressure ring each time the socket has redirected another `PRESSURE_STEP` bytes.
    pub fn track(&mut self, cookie: u64, owner: u64) -> Result<(), SpliceError> {
        let record = Activity {
            notify_at: PRESSURE_STEP,
            owner,
            ..Activity::default()
        };
        self.activity.insert(&cookie, &record, 0)?;
        Ok(())
    }

    /// The pressure ring buffer, once (for the pressure watcher thread).
    pub fn take_pressure_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.pressure.take()
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

    /// Entries in `PEER` (walks the map: for metrics and tests, not the hot path).
    pub fn peer_entries(&self) -> usize {
        self.peer.keys().filter(Result::is_ok).count()
    }

    /// Entries in `ACTIVITY` (walks the map).
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

/// The socket's cookie (`SO_COOKIE`): the key of its map entries.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes; SO_COOKIE writes a u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `TCP_INFO` of a socket.
fn tcp_info(fd: BorrowedFd<'_>) -> std::io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

/// Whether the connection is gone (TCP state CLOSE: reset, or closed both ways): bytes
/// redirected to it can no longer be delivered.
pub fn is_closed(fd: BorrowedFd<'_>) -> bool {
    // TCP_CLOSE in the kernel's enum (include/net/tcp_states.h).
    const TCP_CLOSE: u8 = 7;
    tcp_info(fd).is_ok_and(|info| info.tcpi_state == TCP_CLOSE)
}

/// Bytes ever written into the socket's send queue: acked bytes plus what is still queued
/// (`TCP_INFO.tcpi_bytes_acked + SIOCOUTQ`). On a spliced socket, what the kernel pushed in.
pub fn queued_bytes(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let info = tcp_info(fd)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + u64::try_from(outq).unwrap_or(0))
}

/// `SO_RCVLOWAT = 1`: re-runs the receive path, so bytes queued before the socket entered the
/// map pass through the verdict program now, in order (ebpf-toolchain.md, kernel facts).
pub fn kick(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: plain setsockopt with a valid int value.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
