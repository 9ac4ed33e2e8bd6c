//! Hand-made TCP segments: a test writes, on behalf of one of its own connected sockets, a
//! segment that repeats bytes the peer already has and carries new ones after them — a partial
//! retransmission, which real networks produce all the time and loopback only by chance.
//!
//! The socket's sequence numbers and timestamp clock are read with `TCP_REPAIR` (root or
//! `CAP_NET_ADMIN`); the segment goes out through a raw IPv4 socket.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

// From <linux/tcp.h>; the libc crate does not export all of them.
const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// Leave repair mode without sending a window probe.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

/// Where a connected socket stands in both byte streams.
#[derive(Debug, Clone, Copy)]
pub struct SequenceState {
    /// Sequence number of the next byte this socket will send.
    pub send_next: u32,
    /// Sequence number of the next byte this socket expects to receive.
    pub receive_next: u32,
    /// The socket's TCP timestamp clock now (the TSval its next segment would carry).
    pub timestamp: u32,
}

fn set_int(fd: RawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt with a valid int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_u32(fd: RawFd, option: libc::c_int) -> io::Result<u32> {
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt into a valid u32.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            option,
            (&mut value as *mut u32).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads `socket`'s sequence numbers and timestamp clock (briefly in repair mode).
pub fn sequence_state(socket: &impl AsRawFd) -> io::Result<SequenceState> {
    let fd = socket.as_raw_fd();
    set_int(fd, TCP_REPAIR, 1)?;
    let read = (|| {
        set_int(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        let send_next = get_u32(fd, TCP_QUEUE_SEQ)?;
        set_int(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
        let receive_next = get_u32(fd, TCP_QUEUE_SEQ)?;
        let timestamp = get_u32(fd, TCP_TIMESTAMP)?;
        Ok(SequenceState {
            send_next,
            receive_next,
            timestamp,
        })
    })();
    set_int(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)?;
    read
}

/// Sends, from `from` to `to` (both IPv4), a segment whose payload starts `repeated.len()`
/// bytes before `state.send_next`: `repeated` must be the bytes the socket sent last, `fresh`
/// the bytes it will send next. The peer then holds `fresh` too; the real socket sends it
/// again later (a duplicate the peer must ignore).
pub fn send_overlapping_segment(
    from: SocketAddr,
    to: SocketAddr,
    state: SequenceState,
    repeated: &[u8],
    fresh: &[u8],
) -> io::Result<()> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        return Err(io::Error::other("IPv4 addresses only"));
    };
    let mut payload = repeated.to_vec();
    payload.extend_from_slice(fresh);
    let seq = state.send_next.wrapping_sub(repeated.len() as u32);
    let segment = tcp_segment(from, to, seq, state.receive_next, state.timestamp, &payload);
    let packet = ipv4_packet(*from.ip(), *to.ip(), &segment);
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `packet` and `address` are valid for the call; `fd` is ours and closed after.
    let sent = unsafe {
        let sent = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        libc::close(fd);
        sent
    };
    if sent == packet.len() as isize {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP header (ACK|PSH, timestamps option) with `payload` and a valid checksum.
fn tcp_segment(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: u32,
    timestamp: u32,
    payload: &[u8],
) -> Vec<u8> {
    const HEADER: usize = 32; // 20 bytes + NOP, NOP, timestamps (10 bytes)
    let mut segment = Vec::with_capacity(HEADER + payload.len());
    segment.extend_from_slice(&from.port().to_be_bytes());
    segment.extend_from_slice(&to.port().to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&ack.to_be_bytes());
    segment.push(((HEADER / 4) as u8) << 4);
    segment.push(0x18); // ACK | PSH
    segment.extend_from_slice(&0xffffu16.to_be_bytes()); // window
    segment.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    segment.extend_from_slice(&[1, 1, 8, 10]);
    segment.extend_from_slice(&timestamp.to_be_bytes());
    segment.extend_from_slice(&0u32.to_be_bytes());
    segment.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&from.ip().octets());
    pseudo.extend_from_slice(&to.ip().octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&segment);
    let checksum = internet_checksum(&pseudo);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

/// An IPv4 header (DF, TTL 64) in front of `segment`.
fn ipv4_packet(from: Ipv4Addr, to: Ipv4Addr, segment: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(20 + segment.len());
    packet.push(0x45);
    packet.push(0);
    packet.extend_from_slice(&((20 + segment.len()) as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0]); // id (filled in by the kernel), DF
    packet.push(64);
    packet.push(libc::IPPROTO_TCP as u8);
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(&from.octets());
    packet.extend_from_slice(&to.octets());
    let checksum = internet_checksum(&packet);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(segment);
    packet
}

/// RFC 1071 checksum.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_header() {
        // The IPv4 header example of RFC 1071's companion texts: checksum 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
    }
}
