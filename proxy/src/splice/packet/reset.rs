//! Resets for the ends of a packet-spliced tunnel the proxy ends itself (idle timeout, drain):
//! no socket is left to reset, so the segments are written by hand — from each end's view of
//! the proxy's address, at the sequence number that end expects next (the program keeps it in
//! `FlowEntry::seq_next`), so the end accepts it at once (RFC 5961: an exact match).
//!
//! The segment is pure bytes (`reset_packet`, unit-tested); sending it is a raw socket
//! (`IPPROTO_RAW`: the whole IP packet is ours, for IPv6 too since Linux 4.5).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// TCP flags: RST.
const RST: u8 = 0x04;
/// Hop limit of the segments written.
const TTL: u8 = 64;

/// An IPv4 or IPv6 packet holding a TCP reset from `source` to `destination` at `seq`, or
/// `None` when the two are of different families.
pub fn reset_packet(source: SocketAddr, destination: SocketAddr, seq: u32) -> Option<Vec<u8>> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&source.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&destination.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = RST;
    let (source_ip, destination_ip) = (source.ip().to_canonical(), destination.ip().to_canonical());
    let mut pseudo = Vec::with_capacity(40);
    let mut packet = Vec::with_capacity(60);
    match (source_ip, destination_ip) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            pseudo.extend_from_slice(&from.octets());
            pseudo.extend_from_slice(&to.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = TTL;
            ip[9] = libc::IPPROTO_TCP as u8;
            ip[12..16].copy_from_slice(&from.octets());
            ip[16..20].copy_from_slice(&to.octets());
            let check = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            packet.extend_from_slice(&ip);
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            pseudo.extend_from_slice(&from.octets());
            pseudo.extend_from_slice(&to.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, libc::IPPROTO_TCP as u8]);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = libc::IPPROTO_TCP as u8;
            ip[7] = TTL;
            ip[8..24].copy_from_slice(&from.octets());
            ip[24..40].copy_from_slice(&to.octets());
            packet.extend_from_slice(&ip);
        }
        _ => return None,
    }
    let check = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    packet.extend_from_slice(&tcp);
    Some(packet)
}

/// The Internet checksum of the concatenated parts (each of even length).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Raw sockets for writing resets (one per family, opened on first use).
#[derive(Debug, Default)]
pub struct Resetter {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
}

impl Resetter {
    /// Sends a reset from `source` to `destination` at `seq`.
    pub fn send(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        seq: u32,
    ) -> io::Result<()> {
        let packet = reset_packet(source, destination, seq)
            .ok_or_else(|| io::Error::other("a reset between two address families"))?;
        let destination = destination.ip().to_canonical();
        let (slot, family) = match destination {
            IpAddr::V4(_) => (&mut self.v4, libc::AF_INET),
            IpAddr::V6(_) => (&mut self.v6, libc::AF_INET6),
        };
        if slot.is_none() {
            *slot = Some(open_raw(family)?);
        }
        let Some(socket) = slot.as_ref() else {
            return Err(io::Error::other("no raw socket"));
        };
        let address = socket2::SockAddr::from(SocketAddr::new(destination, 0));
        // SAFETY: a valid socket, a buffer of `packet.len()` bytes, a valid address.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                address.as_ptr().cast(),
                address.len(),
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn open_raw(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by socket(2), owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of a whole header that carries its checksum is zero.
    fn sums_to_zero(parts: &[&[u8]]) -> bool {
        checksum(parts) == 0
    }

    #[test]
    fn an_ipv4_reset_has_valid_checksums_and_the_fields_asked_for() {
        let from: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let to: SocketAddr = "10.0.0.2:51000".parse().unwrap();
        let packet = reset_packet(from, to, 0xdead_beef).unwrap();
        assert_eq!(packet.len(), 40);
        assert!(sums_to_zero(&[&packet[..20]]), "IP header checksum");
        let pseudo = [&[10, 0, 0, 1, 10, 0, 0, 2, 0, 6, 0, 20][..], &packet[20..]];
        assert!(sums_to_zero(&pseudo), "TCP checksum");
        let tcp = &packet[20..];
        assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 443);
        assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 51000);
        assert_eq!(
            u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            0xdead_beef
        );
        assert_eq!(tcp[13], RST);
    }

    #[test]
    fn an_ipv6_reset_has_a_valid_checksum_and_mapped_addresses_are_ipv4() {
        let from: SocketAddr = "[fd00::1]:443".parse().unwrap();
        let to: SocketAddr = "[fd00::2]:51000".parse().unwrap();
        let packet = reset_packet(from, to, 7).unwrap();
        assert_eq!(packet.len(), 60);
        assert_eq!(packet[0] >> 4, 6);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&packet[8..40]);
        pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, 6]);
        assert!(sums_to_zero(&[&pseudo, &packet[40..]]));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:443".parse().unwrap();
        let v4: SocketAddr = "10.0.0.2:1".parse().unwrap();
        assert_eq!(reset_packet(mapped, v4, 1).unwrap().len(), 40);
        assert_eq!(reset_packet(from, v4, 1), None);
    }
}
