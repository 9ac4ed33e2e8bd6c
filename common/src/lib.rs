//! Types and constants shared by the eBPF programs (`ebpf/`) and the proxy (`proxy/`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel program writes it, userspace reads it
//! through the maps named below.
#![no_std]

/// Name of the SOCKHASH that links a socket (key: its cookie) to its peer socket (value).
pub const PEER_MAP: &str = "PEER";
/// Name of the SOCKHASH that bridges a socket's bytes to its peer while a hand-off inserts the
/// `PEER` entries (key: the sending socket's cookie). No program is attached to it, so being
/// in it does not make a socket's bytes go through the program.
pub const BRIDGE_MAP: &str = "BRIDGE";
/// Entries of [`BRIDGE_MAP`]: one per hand-off in progress, at most one per worker.
pub const BRIDGE_ENTRIES: u32 = 1024;
/// Name of the HASH map of per-socket activity (key: socket cookie).
pub const ACTIVITY_MAP: &str = "ACTIVITY";
/// Name of the HASH map of paused sockets (key: socket cookie, value ignored). The program
/// redirects nothing from a paused socket: its bytes stay on it, in order, for the userspace
/// relay, charged to its receive buffer (so TCP's window throttles its sender). A tunnel whose
/// reader fell behind is paused on both sockets, then relayed in userspace.
pub const PAUSED_MAP: &str = "PAUSED";
/// Name of the ring buffer through which the program reports sockets that moved another
/// [`PRESSURE_STEP`] bytes, so userspace checks their peer's backlog, and sockets where bytes
/// stayed ([`STRAY_REPORTED`]).
pub const PRESSURE_MAP: &str = "PRESSURE";
/// Size of the pressure ring buffer in bytes (a power of two, a multiple of the page size).
pub const PRESSURE_RING_BYTES: u32 = 256 * 1024;
/// A socket is reported each time it has redirected this many more bytes.
pub const PRESSURE_STEP: u64 = 1 << 20;
/// A socket is reported the first time once it has redirected this many bytes: a tunnel that
/// starts flooding a reader that does not read is measured early, so many of them starting at
/// once overshoot `limits.kernel_backlog_total` by less. Small-message tunnels pay one report
/// in their life for it.
pub const PRESSURE_FIRST: u64 = 64 << 10;
/// Name of the `sk_skb/stream_verdict` program.
pub const VERDICT_PROGRAM: &str = "wsplice_verdict";
/// Entries the maps are compiled with; the loader resizes them to the configured capacity.
pub const DEFAULT_MAP_ENTRIES: u32 = 1 << 16;

/// [`Activity::flags`]: `next_seq` holds the sequence number after the last byte passed on.
pub const SEQ_KNOWN: u32 = 1;
/// [`Activity::flags`]: the program could not cut repeated bytes off an skb, so it stopped
/// redirecting this socket; its bytes stay on the socket, where userspace sees them and closes
/// the tunnel (abortively: a byte is missing downstream). On a paused socket (see
/// [`PAUSED_MAP`]) they are dropped instead: the userspace relay reads what stays on a paused
/// socket, and must never read the repeated copy.
pub const DIVERTED: u32 = 2;
/// [`Activity::flags`]: bytes stayed on this socket (no peer to redirect to, or [`DIVERTED`])
/// and the program reported its owner on the pressure ring. Spliced sockets are not polled for
/// bytes (that would wake userspace per message), so this report is how userspace learns of
/// them; once per socket is enough, as the tunnel is closed on it.
pub const STRAY_REPORTED: u32 = 4;
/// Most bytes one `bpf_skb_adjust_room` call may cut from an `sk_skb` (the kernel's limit).
pub const TRIM_STEP: u32 = 0xfff;
/// Calls the program makes at most to cut repeated bytes off one skb (1 MiB in all; a TCP
/// receive skb is far smaller).
pub const TRIM_STEPS: u32 = 256;

/// [`Activity::frame_state`] kinds (low byte): skipping payload (`frame_left` bytes; at a frame
/// boundary when 0).
pub const FRAME_PAYLOAD: u32 = 0;
/// The header's length byte comes next.
pub const FRAME_LENGTH: u32 = 1;
/// Extended length bytes come next (how many: the second byte; masked: the third).
pub const FRAME_EXTENDED: u32 = 2;
/// Masking key bytes come next (how many: the second byte).
pub const FRAME_MASK: u32 = 3;
/// Where the frames stand is not known (more frames in one skb than the program follows).
pub const FRAME_UNKNOWN: u32 = 4;
/// Steps the program takes at most to follow the frames of one skb (a step: a header byte, a
/// payload skip or a masking-key skip; a small frame takes 3 or 4): beyond, `FRAME_UNKNOWN`.
pub const FRAME_STEPS: u32 = 32;

/// What the verdict program records for one socket: when bytes last arrived on it, how many it
/// has redirected to the peer, and where in the TCP byte stream it is. Userspace writes it once
/// (at hand-off); afterwards only the program writes it, running under that socket's lock.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activity {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last redirected skb.
    pub last_ns: u64,
    /// Bytes received on this socket and redirected to its peer.
    pub bytes: u64,
    /// When `bytes` reaches this, the program reports `owner` on the pressure ring and moves
    /// the mark [`PRESSURE_STEP`] further.
    pub notify_at: u64,
    /// Opaque to the kernel: who in userspace owns this socket (worker, slot, generation).
    pub owner: u64,
    /// TCP sequence number just after the last byte passed on (valid with [`SEQ_KNOWN`]).
    pub next_seq: u32,
    /// [`SEQ_KNOWN`], [`DIVERTED`], [`STRAY_REPORTED`].
    pub flags: u32,
    /// Bytes the kernel handed to the program a second time (an skb that overlaps bytes already
    /// passed on: TCP queues partly retransmitted segments whole, and the sockmap's receive
    /// path does not skip what was already consumed), cut off instead of being sent twice.
    pub repeated_bytes: u64,
    /// WebSocket frames of the bytes passed on, so the drain's goodbye can wait for a frame
    /// boundary: payload bytes of the current frame still to come, or the extended length read
    /// so far inside a header.
    pub frame_left: u64,
    /// Where in a frame the bytes passed on stopped: a `FRAME_*` kind in the low byte, a count
    /// of header bytes still to come in the second, the mask bit in the third.
    pub frame_state: u32,
    /// Zero (keeps the record free of padding).
    pub reserved: u32,
}

// SAFETY: `Activity` is `repr(C)`, has no padding (u64 fields, then two u32 that fill one u64,
// then two u64, then two u32 that fill one u64) and every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Activity {}

pub mod packet;
