//! The kernel half of wsplice: an `sk_skb/stream_verdict` program that moves every byte arriving
//! on a spliced socket to its peer's egress, and stamps the socket's activity for userspace.
//!
//! It never drops: a socket without a peer entry gets `SK_PASS`, so its bytes stay readable and
//! userspace notices them (DESIGN.md §4 step 7).
#![no_std]
#![no_main]

use aya_ebpf::bindings::sk_action::SK_PASS;
use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns};
use aya_ebpf::macros::{map, stream_verdict};
use aya_ebpf::maps::{HashMap, RingBuf, SockHash};
use aya_ebpf::programs::SkBuffContext;
use aya_ebpf::EbpfContext as _;
use wsplice_common::{Activity, DEFAULT_MAP_ENTRIES, PRESSURE_RING_BYTES, PRESSURE_STEP};

/// cookie(socket) → peer socket.
#[map(name = "PEER")]
static PEER: SockHash<u64> = SockHash::with_max_entries(DEFAULT_MAP_ENTRIES, 0);

/// cookie(socket) → activity of that socket (inserted and removed by userspace).
#[map(name = "ACTIVITY")]
static ACTIVITY: HashMap<u64, Activity> = HashMap::with_max_entries(DEFAULT_MAP_ENTRIES, 0);

/// Owners of sockets that moved another `PRESSURE_STEP` bytes (userspace checks their backlog).
#[map(name = "PRESSURE")]
static PRESSURE: RingBuf = RingBuf::with_byte_size(PRESSURE_RING_BYTES, 0);

/// Redirects each skb to the egress of the socket's peer.
#[stream_verdict]
pub fn wsplice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context pointer is the skb this program was called with.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Flags 0: the peer's egress (its send queue), not its ingress.
    let verdict = PEER.redirect_skb(&ctx, &mut cookie, 0);
    if verdict == i64::from(SK_PASS) {
        if let Some(activity) = ACTIVITY.get_ptr_mut(&cookie) {
            // SAFETY: a valid map value pointer; the verdict for one socket runs under that
            // socket's lock, so plain read-modify-write is not racy (and bpfel has no fetch_add).
            unsafe {
                (*activity).last_ns = bpf_ktime_get_ns();
                (*activity).bytes += u64::from(ctx.len());
                if (*activity).bytes >= (*activity).notify_at {
                    (*activity).notify_at = (*activity).bytes + PRESSURE_STEP;
                    // A full ring only delays the check to the next step: nothing is lost.
                    let _ = PRESSURE.output(&(*activity).owner, 0);
                }
            }
        }
    }
    // After a successful redirect SK_PASS means "deliver to the peer"; without a peer entry the
    // redirect is not set and SK_PASS keeps the bytes on this socket.
    SK_PASS
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
