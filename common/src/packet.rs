//! The packet splice: a tc program (`wsplice_packet`, on the ingress of the proxy's
//! interfaces) that rewrites the packets of a tunnel whose proxy sockets are gone into the
//! packets of its other connection. Userspace fills one [`FlowEntry`] per direction at the
//! hand-off; the program translates every packet by it and records what it saw (activity, the
//! FINs and their acknowledgments, a reset), from which userspace retires the entry.

/// Name of the tc (tcx ingress) program.
pub const PACKET_PROGRAM: &str = "wsplice_packet";
/// Name of the HASH map of packet-spliced directions: [`FlowKey`] → [`FlowEntry`].
pub const FLOWS_MAP: &str = "FLOWS";
/// Name of the per-CPU ARRAY of counters (indexed by the `STAT_*` constants).
pub const PACKET_STATS_MAP: &str = "PACKET_STATS";
/// Entries the flows map is compiled with (two per tunnel); the loader resizes it.
pub const DEFAULT_FLOW_ENTRIES: u32 = 1 << 17;

/// [`FlowEntry::state`]: packets of the flow are dropped while userspace reads the sockets'
/// state (the ends retransmit them once the flow is active).
pub const FLOW_HOLD: u8 = 1;
/// [`FlowEntry::state`]: packets of the flow are translated and sent on.
pub const FLOW_ACTIVE: u8 = 2;

/// [`FlowEntry::flags`]: `tsval_delta` is known (learnt from this direction's first packet).
pub const TSVAL_KNOWN: u32 = 1;
/// [`FlowEntry::flags`]: `tsecr_delta` is known (the reverse direction learnt its delta).
pub const TSECR_KNOWN: u32 = 2;
/// [`FlowEntry::flags`]: this direction's sender sent its FIN (`fin_end` is valid).
pub const FIN_SENT: u32 = 4;
/// [`FlowEntry::flags`]: the reverse direction's sender sent its FIN (`peer_fin_end` valid).
pub const PEER_FIN_SENT: u32 = 8;
/// [`FlowEntry::flags`]: this direction's sender acknowledged the reverse direction's FIN.
pub const PEER_FIN_ACKED: u32 = 16;
/// [`FlowEntry::flags`]: a reset went through, one way or the other.
pub const RESET_SEEN: u32 = 32;
/// [`FlowEntry::flags`], set by userspace: this entry is for the client's packets (a process
/// that adopts pinned flows tells the two directions apart by it).
pub const FROM_CLIENT: u32 = 64;
/// [`FlowEntry::flags`]: the flow ended (both FINs acknowledged, or a reset); set on both
/// directions at once. Userspace retires it once `[packet] linger` passed since the last
/// packet of either direction (late retransmissions keep it a while, as TIME_WAIT would).
pub const CLOSED: u32 = 128;

/// [`PACKET_STATS_MAP`] index: packets translated and sent on.
pub const STAT_TRANSLATED: u32 = 0;
/// [`PACKET_STATS_MAP`] index: packets dropped while their flow was held.
pub const STAT_HELD: u32 = 1;
/// [`PACKET_STATS_MAP`] index: packets of a flow that could not be translated (a header the
/// program does not read, a failed rewrite or redirect), dropped for the sender to resend.
pub const STAT_FAILED: u32 = 2;
/// Number of counters in [`PACKET_STATS_MAP`].
pub const STAT_COUNT: u32 = 3;

/// The margin, in timestamp ticks, by which the first translated TSval lies ahead of the last
/// one the receiving end saw from the proxy's socket: later segments of the sender that were
/// sent earlier (reordered) still pass the receiver's PAWS check.
pub const TSVAL_MARGIN: u32 = 1000;

/// A TCP flow as the packet arrives at the proxy: its addresses and ports exactly as they are
/// in the packet (network byte order, IPv4 addresses in the first word, the rest zero).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub saddr: [u32; 4],
    /// Destination address.
    pub daddr: [u32; 4],
    /// Source port (network byte order).
    pub sport: u16,
    /// Destination port (network byte order).
    pub dport: u16,
    /// 4 or 6.
    pub family: u8,
    /// Zero.
    pub reserved: [u8; 3],
}

/// What the program does with one direction of a packet-spliced tunnel: the packet's new
/// addresses and ports, how its numbers translate, where it goes; and what it saw.
///
/// Sequence numbers are translated by plain addition (`seq_delta`; the acknowledgment and
/// SACK edges by `ack_delta`), so the ends' retransmissions, SACK and window probes work end to
/// end. Windows are rescaled from the sender's announced scale to the scale the receiver
/// expects from the proxy's socket. Timestamps: the receiver must see TSvals that continue
/// the proxy socket's clock, and the sender must get its own clock back in TSecr; the delta is
/// learnt from the first packet (`ts_base`: the proxy socket's clock at the hand-off plus
/// [`TSVAL_MARGIN`]), and the reverse direction's TSecr uses its negation.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// New source address (the proxy's address on the other connection).
    pub saddr: [u32; 4],
    /// New destination address (the other end).
    pub daddr: [u32; 4],
    /// New source port (network byte order).
    pub sport: u16,
    /// New destination port (network byte order).
    pub dport: u16,
    /// Window scale the sender announced (its windows are shifted by it).
    pub scale_in: u8,
    /// Window scale the proxy's socket announced to the receiver (it shifts by this).
    pub scale_out: u8,
    /// [`FLOW_HOLD`] or [`FLOW_ACTIVE`].
    pub state: u8,
    /// 4 or 6, as in the flow's key (the reverse direction's key is built from it).
    pub family: u8,
    /// Added to the sequence number.
    pub seq_delta: u32,
    /// Added to the acknowledgment number and to SACK block edges.
    pub ack_delta: u32,
    /// TSval the first translated packet carries (see the type's docs).
    pub ts_base: u32,
    /// Added to TSval (valid with [`TSVAL_KNOWN`]).
    pub tsval_delta: u32,
    /// Added to TSecr (valid with [`TSECR_KNOWN`]; without it TSecr becomes 0, "no echo").
    pub tsecr_delta: u32,
    /// `TSVAL_KNOWN`, `TSECR_KNOWN`, `FIN_SENT`, `PEER_FIN_SENT`, `PEER_FIN_ACKED`,
    /// `RESET_SEEN`, `FROM_CLIENT`, `CLOSED`.
    pub flags: u32,
    /// Sequence number just after this direction's FIN, untranslated (with [`FIN_SENT`]).
    pub fin_end: u32,
    /// Sequence number just after the reverse direction's FIN as this direction's sender
    /// acknowledges it, untranslated (with [`PEER_FIN_SENT`]).
    pub peer_fin_end: u32,
    /// Interface to send the translated packet out of (`bpf_redirect_neigh`), or 0: the other
    /// end is on this host, the packet goes up the stack.
    pub ifindex: u32,
    /// Translated sequence number just after the furthest byte (or FIN) this direction sent:
    /// where the receiver's stream stands once everything sent has arrived (set at the
    /// hand-off; a reset the proxy writes to the receiver uses it).
    pub seq_next: u32,
    /// `bpf_ktime_get_ns()` of the last packet.
    pub last_ns: u64,
    /// TCP payload bytes translated.
    pub bytes: u64,
}

impl FlowEntry {
    /// The key of the reverse direction's packets as they arrive at the proxy: they come from
    /// where this direction's packets go, to the address and port they leave from.
    pub fn reverse_key(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            family: self.family,
            reserved: [0; 3],
        }
    }
}

// SAFETY: both types are `repr(C)` without padding (checked by the size assertions below) and
// every bit pattern is valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowEntry {}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
// 96 bytes: with the hash map's 48-byte element header, the 40-byte key and the 8-byte list
// node its allocator puts before each element, an entry fills a 192-byte object exactly (at
// 104 bytes it took a 256-byte one: measured in /proc/slabinfo). Two per tunnel.
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 96);
