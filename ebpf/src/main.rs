//! The kernel half of wsplice: an `sk_skb/stream_verdict` program that moves every byte arriving
//! on a spliced socket to its peer's egress, and stamps the socket's activity for userspace.
//!
//! It never drops: a socket without a peer entry gets `SK_PASS`, so its bytes stay readable, and
//! the program reports the socket on the pressure ring so userspace notices them (userspace does
//! not poll spliced sockets for bytes: that would wake it for every message). A paused socket
//! (`PAUSED`) gets `SK_PASS` too, without a report: its tunnel is leaving the kernel path because
//! a reader fell behind, and the userspace relay reads those bytes in order.
//!
//! It follows the WebSocket frame headers in what it moves, too (`follow_frames`), so a tunnel
//! that leaves the kernel to say goodbye at shutdown can wait for a frame boundary.
//!
//! It also never passes a byte on twice. TCP may queue a segment that starts before bytes it
//! already delivered (a retransmission that covers received bytes and new ones, out-of-order
//! segments merged and then partly resent); `tcp_recvmsg` skips the old part, but the receive
//! path the sockmap uses (`tcp_read_skb`) hands the whole skb to this program. So the program
//! remembers where each socket's stream is (`Activity::next_seq`) and cuts the repeated head off
//! before redirecting. Found by the soak test: without it a busy tunnel now and then received
//! two MSS-sized chunks of its stream twice.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::{map, stream_verdict};
use aya_ebpf::maps::{HashMap, RingBuf, SockHash};
use aya_ebpf::programs::SkBuffContext;
use aya_ebpf::EbpfContext as _;
use wsplice_common::{
    Activity, BRIDGE_ENTRIES, DEFAULT_MAP_ENTRIES, DIVERTED, FRAME_EXTENDED, FRAME_LENGTH,
    FRAME_MASK, FRAME_PAYLOAD, FRAME_STEPS, FRAME_UNKNOWN, PRESSURE_RING_BYTES, PRESSURE_STEP,
    SEQ_KNOWN, STRAY_REPORTED, TRIM_STEP, TRIM_STEPS,
};

/// cookie(socket) → peer socket.
#[map(name = "PEER")]
static PEER: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_ENTRIES, 0);

/// cookie(socket) → peer socket, only while a hand-off inserts the `PEER` entries: a socket
/// goes live (its bytes reach this program) as soon as it is a `PEER` value, which is before
/// its own `PEER` key exists; when both sides may be sending (a tunnel promoted from the
/// userspace relay), its bytes find the peer here in that moment.
#[map(name = "BRIDGE")]
static BRIDGE: SockHash<u64> = SockHash::with_max_entries(BRIDGE_ENTRIES, 0);

/// cookie(socket) → activity of that socket (inserted and removed by userspace).
///
/// Not preallocated: entries take kernel memory only while their tunnel is spliced (a
/// preallocated map of the default capacity pins about 200 MB from the start), and a removed
/// entry is freed after an RCU grace period instead of being reused at once, so a verdict still
/// running for a tunnel that is being taken out never writes into the next tunnel's record.
#[map(name = "ACTIVITY")]
static ACTIVITY: HashMap<u64, Activity> =
    HashMap::with_max_entries(DEFAULT_MAP_ENTRIES, BPF_F_NO_PREALLOC);

/// cookie(socket) → anything: the socket is paused (see `PAUSED_MAP` in `wsplice-common`).
/// Not preallocated: only tunnels whose reader fell behind have entries.
#[map(name = "PAUSED")]
static PAUSED: HashMap<u64, u32> =
    HashMap::with_max_entries(DEFAULT_MAP_ENTRIES, BPF_F_NO_PREALLOC);

/// Owners of sockets that moved another `PRESSURE_STEP` bytes (userspace checks their backlog).
#[map(name = "PRESSURE")]
static PRESSURE: RingBuf = RingBuf::with_byte_size(PRESSURE_RING_BYTES, 0);

/// Redirects each skb to the egress of the socket's peer, without bytes it already passed on.
#[stream_verdict]
pub fn wsplice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context pointer is the skb this program was called with.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(activity) = ACTIVITY.get_ptr_mut(&cookie) else {
        // Not a spliced socket: the bytes stay on it.
        return SK_PASS;
    };
    // SAFETY: a valid map value pointer; the verdict for one socket runs under that socket's
    // lock, so plain read-modify-write is not racy (and bpfel has no fetch_add).
    let activity = unsafe { &mut *activity };
    if !skip_repeated_bytes(&ctx, activity) {
        activity.flags |= DIVERTED;
    }
    // SAFETY: the value is only tested for presence, never read through.
    let paused = unsafe { PAUSED.get(&cookie) }.is_some();
    if activity.flags & DIVERTED != 0 {
        report_stray(activity);
        // Not paused: keep this skb and every later one on the socket, in order (userspace
        // reads nothing from a spliced socket; told of them, it closes the tunnel). Paused: the
        // userspace relay reads what stays on the socket, so the repeated copy must not stay;
        // nothing after it may be read either (the tunnel is reset on the report).
        return if paused { SK_DROP } else { SK_PASS };
    }
    if paused {
        // Userspace relays this socket's bytes now: they stay on it, in order, charged to its
        // receive buffer, so TCP's window throttles the sender while the relay waits.
        return SK_PASS;
    }
    // Flags 0: the peer's egress (its send queue), not its ingress.
    let mut verdict = PEER.redirect_skb(&ctx, &mut cookie, 0);
    if verdict != i64::from(SK_PASS) {
        verdict = BRIDGE.redirect_skb(&ctx, &mut cookie, 0);
    }
    if verdict != i64::from(SK_PASS) {
        report_stray(activity);
    } else {
        // SAFETY: plain helper call without arguments.
        activity.last_ns = unsafe { bpf_ktime_get_ns() };
        activity.bytes += u64::from(ctx.len());
        follow_frames(&ctx, activity);
        if activity.bytes >= activity.notify_at {
            activity.notify_at = activity.bytes + PRESSURE_STEP;
            // A full ring only delays the check to the next step: nothing is lost.
            let _ = PRESSURE.output(&activity.owner, 0);
        }
    }
    // After a successful redirect SK_PASS means "deliver to the peer"; without a peer entry the
    // redirect is not set and SK_PASS keeps the bytes on this socket.
    SK_PASS
}

/// Tells userspace, once per socket, that bytes stay on it: spliced sockets are watched for a
/// FIN or an error only, so nothing else would wake it. A full ring leaves the flag clear, so
/// the next such skb tries again.
#[inline(always)]
fn report_stray(activity: &mut Activity) {
    if activity.flags & STRAY_REPORTED == 0 && PRESSURE.output(&activity.owner, 0).is_ok() {
        activity.flags |= STRAY_REPORTED;
    }
}

/// Cuts off the head of the skb that this socket already passed on (see the crate docs), and
/// moves `next_seq` past the skb. False when the skb cannot be passed on without repeating
/// bytes (a whole repeated skb, or the kernel refused to cut).
///
/// The sequence numbers come from the skb's control block, where TCP keeps `seq` and
/// `end_seq` of a received skb (`struct tcp_skb_cb`, first two words, which `__sk_buff.cb`
/// maps for `sk_skb` programs). They are trusted only if they span the skb's length (plus one
/// for a FIN), so a kernel laid out otherwise gets the old behaviour instead of wrong cuts.
#[inline(always)]
fn skip_repeated_bytes(ctx: &SkBuffContext, activity: &mut Activity) -> bool {
    let len = ctx.len();
    let [seq, end, ..] = *ctx.cb();
    let span = end.wrapping_sub(seq);
    if len == 0 || (span != len && span != len + 1) {
        return true;
    }
    if activity.flags & SEQ_KNOWN == 0 {
        // The first skb after the hand-off: userspace left nothing half-read on the socket,
        // so it starts exactly where the stream stands.
        activity.next_seq = end;
        activity.flags |= SEQ_KNOWN;
        return true;
    }
    // Serial-number arithmetic: the distance is far below 2^31 either way.
    let repeated = activity.next_seq.wrapping_sub(seq) as i32;
    if repeated <= 0 {
        activity.next_seq = end;
        return true;
    }
    let repeated = repeated as u32;
    if repeated >= len {
        return false;
    }
    let mut left = repeated;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            break;
        }
        let step = if left < TRIM_STEP { left } else { TRIM_STEP };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            return false;
        }
        left -= step;
    }
    if left != 0 {
        return false;
    }
    activity.repeated_bytes += u64::from(repeated);
    activity.next_seq = end;
    true
}

/// Follows the WebSocket frame headers in the bytes this skb passes on and skips their
/// payloads, so userspace knows where the next frame starts when the tunnel leaves the kernel
/// to say goodbye (`Activity::frame_left`, `frame_state`: the same steps as the relay's
/// `FrameTracker`). More than [`FRAME_STEPS`] steps in one skb, or a byte that cannot be read,
/// and the position is unknown from then on.
#[inline(always)]
fn follow_frames(ctx: &SkBuffContext, activity: &mut Activity) {
    let state = activity.frame_state;
    let mut kind = state & 0xff;
    if kind == FRAME_UNKNOWN {
        return;
    }
    let mut count = (state >> 8) & 0xff;
    let mut masked = (state >> 16) & 1;
    let mut left = activity.frame_left;
    let len = ctx.len();
    let mut pos: u32 = 0;
    for _ in 0..FRAME_STEPS {
        if pos >= len {
            break;
        }
        let rest = len - pos;
        if kind == FRAME_PAYLOAD {
            if left == 0 {
                // The first header byte (FIN, RSV, opcode): nothing in it sizes the frame.
                kind = FRAME_LENGTH;
                pos += 1;
            } else {
                let skip = if left < u64::from(rest) { left as u32 } else { rest };
                left -= u64::from(skip);
                pos += skip;
            }
            continue;
        }
        if kind == FRAME_MASK {
            let skip = if count < rest { count } else { rest };
            count -= skip;
            pos += skip;
            if count == 0 {
                kind = FRAME_PAYLOAD;
            }
            continue;
        }
        let Ok(byte) = ctx.load::<u8>(pos as usize) else {
            kind = FRAME_UNKNOWN;
            break;
        };
        pos += 1;
        if kind == FRAME_LENGTH {
            masked = u32::from(byte >> 7);
            let length = byte & 0x7f;
            left = 0;
            if length >= 126 {
                kind = FRAME_EXTENDED;
                count = if length == 126 { 2 } else { 8 };
                continue;
            }
            left = u64::from(length);
        } else {
            // FRAME_EXTENDED
            left = (left << 8) | u64::from(byte);
            count = count.saturating_sub(1);
            if count > 0 {
                continue;
            }
        }
        if masked == 1 {
            kind = FRAME_MASK;
            count = 4;
        } else {
            kind = FRAME_PAYLOAD;
        }
    }
    if pos < len {
        kind = FRAME_UNKNOWN;
    }
    activity.frame_left = left;
    activity.frame_state = kind | (count << 8) | (masked << 16);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible, so the GPL-only helpers are allowed.
#[link_section = "license"]
#[used]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
