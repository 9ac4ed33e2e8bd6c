//! The packet splice's kernel half: `wsplice_packet`, a tc program on the ingress of the
//! proxy's interfaces. For a packet of a flow in `FLOWS` it rewrites the addresses and ports
//! into the tunnel's other connection, translates the sequence and acknowledgment numbers,
//! the SACK blocks, the window (rescaled) and the timestamps, fixes the checksums
//! incrementally, and sends the packet on: out of the other connection's interface
//! (`bpf_redirect_neigh`), or up the stack when the other end is on this host. Every other
//! packet passes untouched. See `wsplice_common::packet` for the entries.
//!
//! It reads Ethernet-framed IPv4 (without IP options, not fragmented) and IPv6 (TCP as the
//! first header); a packet of a spliced flow it cannot read is dropped and counted, and the
//! sender resends it (the hand-off refuses tunnels whose packets would not be readable).

use aya_ebpf::bindings::{__sk_buff, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR};
use aya_ebpf::helpers::{
    bpf_csum_diff, bpf_ktime_get_ns, bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_redirect_neigh,
    bpf_skb_load_bytes, bpf_skb_store_bytes,
};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{HashMap, PerCpuArray};
use aya_ebpf::programs::TcContext;
use aya_ebpf::EbpfContext as _;
use wsplice_common::packet::{
    FlowEntry, FlowKey, CLOSED, DEFAULT_FLOW_ENTRIES, FIN_SENT, FLOW_ACTIVE, FLOW_HOLD,
    PEER_FIN_ACKED, PEER_FIN_SENT, RESET_SEEN, STAT_COUNT, STAT_FAILED, STAT_HELD, STAT_TRANSLATED,
    TSECR_KNOWN, TSVAL_KNOWN,
};

/// One entry per direction of each packet-spliced tunnel (inserted and removed by userspace).
/// Not preallocated: the map takes memory for the tunnels it holds, not its capacity.
#[map(name = "FLOWS")]
static FLOWS: HashMap<FlowKey, FlowEntry> =
    HashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, BPF_F_NO_PREALLOC);

/// Packets translated, held, failed (`STAT_*`).
#[map(name = "PACKET_STATS")]
static PACKET_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// The tc verdicts used (the bindings' types differ between targets).
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// TCP options: end of list, no-op, SACK, timestamps.
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;
/// The TCP header buffer: 60 bytes at most, room for 80 (see `translate`), indexed with
/// `& 63`.
const HEADER_BUFFER: usize = 80;
/// Most option steps a walk takes (see `translate_options`).
const OPTION_STEPS: usize = 4;
/// SACK blocks in one option (40 bytes of options hold 4).
const MAX_SACK_BLOCKS: usize = 4;

/// Where the packet's headers are, and what the key of its flow is.
struct Packet {
    key: FlowKey,
    /// Offset of the TCP header.
    l4: u32,
    /// Offset of the IPv4 header checksum (IPv4 only).
    ip_check: u32,
    /// Bytes after the IP header (`tot_len` - IP header, or the IPv6 payload length).
    ip_payload: u32,
}

/// Rewrites a packet of a spliced flow; passes every other packet.
#[classifier]
pub fn wsplice_packet(ctx: TcContext) -> i32 {
    let Some(packet) = read_packet(&ctx) else {
        return TC_ACT_OK;
    };
    let Some(entry) = FLOWS.get_ptr_mut(&packet.key) else {
        return TC_ACT_OK;
    };
    // SAFETY: a valid map value pointer. Two CPUs may translate packets of one direction at
    // once; the fields they both write are counters and stamps (a lost update is harmless)
    // and flags that only ever gain bits the same way.
    let entry = unsafe { &mut *entry };
    if entry.state == FLOW_HOLD {
        count(STAT_HELD);
        return TC_ACT_SHOT;
    }
    if entry.state != FLOW_ACTIVE {
        return TC_ACT_OK;
    }
    match translate(&ctx, &packet, entry) {
        Ok(action) => {
            count(STAT_TRANSLATED);
            action
        }
        Err(()) => {
            count(STAT_FAILED);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = PACKET_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: nothing else writes it while this program runs here.
        unsafe { *counter += 1 };
    }
}

/// The flow of an IPv4 or IPv6 TCP packet, or `None` for anything else.
#[inline(always)]
fn read_packet(ctx: &TcContext) -> Option<Packet> {
    let protocol = u16::from_be(ctx.skb.protocol() as u16);
    let mut key = FlowKey::default();
    let (l4, ip_check, ip_payload) = if protocol == ETH_P_IP {
        let version_ihl: u8 = ctx.load(ETH_HLEN as usize).ok()?;
        if version_ihl != 0x45 {
            return None;
        }
        let fragment: u16 = ctx.load(ETH_HLEN as usize + 6).ok()?;
        if u16::from_be(fragment) & 0x3fff != 0 {
            return None;
        }
        let proto: u8 = ctx.load(ETH_HLEN as usize + 9).ok()?;
        if proto != IPPROTO_TCP {
            return None;
        }
        let total: u16 = ctx.load(ETH_HLEN as usize + 2).ok()?;
        key.saddr[0] = ctx.load(ETH_HLEN as usize + 12).ok()?;
        key.daddr[0] = ctx.load(ETH_HLEN as usize + 16).ok()?;
        key.family = 4;
        let total = u32::from(u16::from_be(total));
        // GSO packets past 64 KiB carry 0 (BIG TCP): their length is the skb's.
        let payload = if total == 0 {
            ctx.len().saturating_sub(ETH_HLEN + 20)
        } else {
            total.saturating_sub(20)
        };
        (ETH_HLEN + 20, ETH_HLEN + 10, payload)
    } else if protocol == ETH_P_IPV6 {
        let next: u8 = ctx.load(ETH_HLEN as usize + 6).ok()?;
        if next != IPPROTO_TCP {
            return None;
        }
        let payload: u16 = ctx.load(ETH_HLEN as usize + 4).ok()?;
        key.saddr = ctx.load(ETH_HLEN as usize + 8).ok()?;
        key.daddr = ctx.load(ETH_HLEN as usize + 24).ok()?;
        key.family = 6;
        let payload = u32::from(u16::from_be(payload));
        let payload = if payload == 0 {
            ctx.len().saturating_sub(ETH_HLEN + 40)
        } else {
            payload
        };
        (ETH_HLEN + 40, 0, payload)
    } else {
        return None;
    };
    key.sport = ctx.load(l4 as usize).ok()?;
    key.dport = ctx.load(l4 as usize + 2).ok()?;
    Some(Packet {
        key,
        l4,
        ip_check,
        ip_payload,
    })
}

/// Reads a big-endian u32 at `at` (masked into the buffer: the verifier sees every index in
/// bounds, and a header never reaches the mask).
#[inline(always)]
fn get32(buf: &[u8; HEADER_BUFFER], at: usize) -> u32 {
    u32::from_be_bytes([
        buf[at & 63],
        buf[(at + 1) & 63],
        buf[(at + 2) & 63],
        buf[(at + 3) & 63],
    ])
}

#[inline(always)]
fn put32(buf: &mut [u8; HEADER_BUFFER], at: usize, value: u32) {
    let bytes = value.to_be_bytes();
    buf[at & 63] = bytes[0];
    buf[(at + 1) & 63] = bytes[1];
    buf[(at + 2) & 63] = bytes[2];
    buf[(at + 3) & 63] = bytes[3];
}

/// Translates the packet by `entry` and sends it on.
#[inline(always)]
fn translate(ctx: &TcContext, packet: &Packet, entry: &mut FlowEntry) -> Result<i32, ()> {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    let mut old = [0u8; HEADER_BUFFER];
    let offset_flags: u8 = ctx.load(packet.l4 as usize + 12).map_err(|_| ())?;
    // The data offset, read back through a volatile access so LLVM cannot fold the
    // arithmetic below away: written like this, the verifier sees a length of 20 to 80 bytes
    // (it is 20 to 60: the offset has four bits).
    let data_offset = offset_flags >> 4;
    // SAFETY: a read of a local.
    let data_offset = unsafe { core::ptr::read_volatile(&data_offset) };
    if data_offset < 5 {
        return Err(());
    }
    let header_len = 20 + u32::from((data_offset - 5) & 0xf) * 4;
    // SAFETY: `old` holds 80 bytes; `header_len` is at most 80.
    if unsafe { bpf_skb_load_bytes(skb.cast(), packet.l4, old.as_mut_ptr().cast(), header_len) }
        != 0
    {
        return Err(());
    }
    let mut new = old;
    let flags = old[13];
    let seq = get32(&old, 4);
    let ack = get32(&old, 8);
    let payload = packet.ip_payload.saturating_sub(header_len);
    follow_close(entry, flags, seq, ack, payload);

    // Ports, numbers, window.
    let ports = [entry.sport.to_ne_bytes(), entry.dport.to_ne_bytes()];
    new[0] = ports[0][0];
    new[1] = ports[0][1];
    new[2] = ports[1][0];
    new[3] = ports[1][1];
    let translated = seq.wrapping_add(entry.seq_delta);
    put32(&mut new, 4, translated);
    let end = translated
        .wrapping_add(payload)
        .wrapping_add(u32::from(flags & TCP_FIN != 0));
    if end.wrapping_sub(entry.seq_next) as i32 > 0 {
        entry.seq_next = end;
    }
    if flags & TCP_ACK != 0 {
        put32(&mut new, 8, ack.wrapping_add(entry.ack_delta));
    }
    let window = u32::from(u16::from_be_bytes([old[14], old[15]]));
    let window = ((window << entry.scale_in) >> entry.scale_out).min(0xffff) as u16;
    let window = window.to_be_bytes();
    new[14] = window[0];
    new[15] = window[1];
    translate_options(&mut new, header_len as usize, entry);

    // The TCP header goes back whole; its checksum moves by the difference (for a
    // CHECKSUM_PARTIAL packet the helper leaves it: the device sums the header later).
    // SAFETY: both buffers hold 80 bytes; `header_len` is a multiple of 4, at most 80.
    let diff = unsafe {
        bpf_csum_diff(
            old.as_mut_ptr().cast(),
            header_len,
            new.as_mut_ptr().cast(),
            header_len,
            0,
        )
    };
    if diff < 0 {
        return Err(());
    }
    // SAFETY: `new` holds `header_len` bytes; the offset was read above.
    if unsafe { bpf_skb_store_bytes(skb, packet.l4, new.as_ptr().cast(), header_len, 0) } != 0 {
        return Err(());
    }
    let check = packet.l4 + 16;
    // SAFETY: helper calls on this program's skb.
    if unsafe { bpf_l4_csum_replace(skb, check, 0, diff as u64, 0) } != 0 {
        return Err(());
    }
    rewrite_addresses(ctx, packet, entry, check)?;

    // SAFETY: plain helper call.
    entry.last_ns = unsafe { bpf_ktime_get_ns() };
    entry.bytes += u64::from(payload);
    if entry.ifindex == 0 {
        // The other end is on this host: up the stack with the new addresses.
        return Ok(TC_ACT_OK);
    }
    // SAFETY: no parameters: the kernel resolves the next hop of the new destination.
    let action = unsafe { bpf_redirect_neigh(entry.ifindex, core::ptr::null_mut(), 0, 0) };
    if action as i32 == TC_ACT_SHOT {
        return Err(());
    }
    Ok(action as i32)
}

/// Translates the SACK blocks and the timestamps of the options in `header[20..len]`.
///
/// Established connections put them where RFC 7323's appendix suggests and every common stack
/// does: NOP, NOP, timestamps first; NOP, NOP, SACK after them. That layout is read directly.
/// Any other is walked, a few options deep (each step of a walk multiplies the paths the
/// verifier follows); options past the walk, or malformed ones, stay as they are.
#[inline(always)]
fn translate_options(header: &mut [u8; HEADER_BUFFER], len: usize, entry: &mut FlowEntry) {
    let (timestamps, sack, sack_blocks) = if len >= 32
        && header[20] == OPT_NOP
        && header[21] == OPT_NOP
        && header[22] == OPT_TIMESTAMP
        && header[23] == 10
    {
        let sack_size = header[35] as usize;
        let sack_follows = len >= 44
            && header[32] == OPT_NOP
            && header[33] == OPT_NOP
            && header[34] == OPT_SACK
            && sack_size >= 10
            && (sack_size - 2) % 8 == 0
            && 34 + sack_size <= len;
        if sack_follows {
            (24, 36, (sack_size - 2) / 8)
        } else {
            (24, 0, 0)
        }
    } else {
        walk_options(header, len)
    };
    for block in 0..MAX_SACK_BLOCKS {
        if block >= sack_blocks {
            break;
        }
        for edge in [sack + 8 * block, sack + 8 * block + 4] {
            let value = get32(header, edge);
            put32(header, edge, value.wrapping_add(entry.ack_delta));
        }
    }
    if timestamps != 0 {
        translate_timestamps(header, timestamps, entry);
    }
}

/// Where the timestamps and the SACK blocks are (0: none), and how many blocks, in options
/// laid out otherwise.
#[inline(always)]
fn walk_options(header: &[u8; HEADER_BUFFER], len: usize) -> (usize, usize, usize) {
    let mut at = 20usize;
    let (mut timestamps, mut sack, mut sack_blocks) = (0usize, 0usize, 0usize);
    for _ in 0..OPTION_STEPS {
        if at >= len || at >= 60 {
            break;
        }
        let kind = header[at & 63];
        if kind == OPT_END {
            break;
        }
        if kind == OPT_NOP {
            at += 1;
            continue;
        }
        let size = header[(at + 1) & 63] as usize;
        if size < 2 || at + size > len {
            break;
        }
        if kind == OPT_TIMESTAMP && size == 10 {
            timestamps = at + 2;
        } else if kind == OPT_SACK && size >= 10 && (size - 2) % 8 == 0 {
            sack = at + 2;
            sack_blocks = (size - 2) / 8;
        }
        at += size;
    }
    (timestamps, sack, sack_blocks)
}

/// TSval continues the receiver's view of the proxy socket's clock; TSecr gives the receiver
/// back its own clock (or 0, "no echo", until the reverse direction's delta is known).
#[inline(always)]
fn translate_timestamps(header: &mut [u8; HEADER_BUFFER], at: usize, entry: &mut FlowEntry) {
    let tsval = get32(header, at);
    let tsecr = get32(header, at + 4);
    if entry.flags & TSVAL_KNOWN == 0 {
        entry.tsval_delta = entry.ts_base.wrapping_sub(tsval);
        entry.flags |= TSVAL_KNOWN;
        // The reverse direction echoes these TSvals: it takes the delta off again.
        let reverse = entry.reverse_key();
        if let Some(other) = FLOWS.get_ptr_mut(&reverse) {
            // SAFETY: a valid map value pointer (see `wsplice_packet`).
            let other = unsafe { &mut *other };
            other.tsecr_delta = 0u32.wrapping_sub(entry.tsval_delta);
            other.flags |= TSECR_KNOWN;
        }
    }
    if entry.flags & TSECR_KNOWN == 0 {
        // The reverse direction may have learnt its delta before this entry was activated
        // (userspace writes the two entries one after the other): take it from there.
        let reverse = entry.reverse_key();
        if let Some(other) = FLOWS.get_ptr(&reverse) {
            // SAFETY: a valid map value pointer (see `wsplice_packet`).
            let other = unsafe { &*other };
            if other.flags & TSVAL_KNOWN != 0 {
                entry.tsecr_delta = 0u32.wrapping_sub(other.tsval_delta);
                entry.flags |= TSECR_KNOWN;
            }
        }
    }
    put32(header, at, tsval.wrapping_add(entry.tsval_delta));
    let echo = if entry.flags & TSECR_KNOWN != 0 && tsecr != 0 {
        tsecr.wrapping_add(entry.tsecr_delta)
    } else {
        0
    };
    put32(header, at + 4, echo);
}

/// Follows the close: this direction's FIN, its acknowledgment of the reverse direction's FIN
/// (the flow ends when both FINs are acknowledged), and resets.
#[inline(always)]
fn follow_close(entry: &mut FlowEntry, flags: u8, seq: u32, ack: u32, payload: u32) {
    if flags & TCP_RST != 0 {
        entry.flags |= RESET_SEEN | CLOSED;
        let reverse = entry.reverse_key();
        if let Some(other) = FLOWS.get_ptr_mut(&reverse) {
            // SAFETY: a valid map value pointer.
            let other = unsafe { &mut *other };
            other.flags |= RESET_SEEN | CLOSED;
        }
        return;
    }
    if flags & TCP_FIN != 0 && entry.flags & FIN_SENT == 0 {
        entry.fin_end = seq.wrapping_add(payload).wrapping_add(1);
        entry.flags |= FIN_SENT;
        let reverse = entry.reverse_key();
        if let Some(other) = FLOWS.get_ptr_mut(&reverse) {
            // SAFETY: a valid map value pointer.
            let other = unsafe { &mut *other };
            // The reverse sender acknowledges it in this direction's translated numbers.
            other.peer_fin_end = entry.fin_end.wrapping_add(entry.seq_delta);
            other.flags |= PEER_FIN_SENT;
        }
    }
    let waiting = entry.flags & (PEER_FIN_SENT | PEER_FIN_ACKED) == PEER_FIN_SENT;
    if waiting && flags & TCP_ACK != 0 && ack.wrapping_sub(entry.peer_fin_end) as i32 >= 0 {
        entry.flags |= PEER_FIN_ACKED;
        let reverse = entry.reverse_key();
        if let Some(other) = FLOWS.get_ptr_mut(&reverse) {
            // SAFETY: a valid map value pointer.
            let other = unsafe { &mut *other };
            if other.flags & PEER_FIN_ACKED != 0 {
                entry.flags |= CLOSED;
                other.flags |= CLOSED;
            }
        }
    }
}

/// Writes the new addresses, fixing the IPv4 header checksum and the TCP checksum's
/// pseudo-header part.
#[inline(always)]
fn rewrite_addresses(
    ctx: &TcContext,
    packet: &Packet,
    entry: &FlowEntry,
    check: u32,
) -> Result<(), ()> {
    let skb = ctx.as_ptr() as *mut __sk_buff;
    let (words, source_at, dest_at) = if packet.key.family == 4 {
        (1usize, ETH_HLEN + 12, ETH_HLEN + 16)
    } else {
        (4usize, ETH_HLEN + 8, ETH_HLEN + 24)
    };
    for word in 0..4usize {
        if word >= words {
            break;
        }
        let pairs = [
            (packet.key.saddr[word], entry.saddr[word], source_at),
            (packet.key.daddr[word], entry.daddr[word], dest_at),
        ];
        for (from, to, base) in pairs {
            if from == to {
                continue;
            }
            let at = base + 4 * word as u32;
            // SAFETY: helper calls on this program's skb, 4-byte values from the stack.
            unsafe {
                if bpf_skb_store_bytes(skb, at, (&to as *const u32).cast(), 4, 0) != 0 {
                    return Err(());
                }
                if packet.key.family == 4
                    && bpf_l3_csum_replace(skb, packet.ip_check, u64::from(from), u64::from(to), 4)
                        != 0
                {
                    return Err(());
                }
                let pseudo = u64::from(BPF_F_PSEUDO_HDR) | 4;
                if bpf_l4_csum_replace(skb, check, u64::from(from), u64::from(to), pseudo) != 0 {
                    return Err(());
                }
            }
        }
    }
    Ok(())
}
