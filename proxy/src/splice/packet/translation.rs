//! From where the proxy's two sockets stand at the hand-off to the two flow entries that make
//! their packets into each other's (pure: unit-tested without sockets or the kernel).
//!
//! A tunnel is a client connection (client ↔ proxy) and an upstream connection (proxy ↔
//! upstream). At a quiet point every byte the proxy sent is acknowledged and every byte it
//! received was read and passed on, so each end's stream continues exactly where the proxy's
//! socket on the other connection stands: a byte the client sends at sequence number `s`
//! (client's numbering, which the proxy's client socket expects from `receive_next` on) is
//! the byte the upstream expects at `s - client.receive_next + upstream.send_next`.

use std::net::{IpAddr, SocketAddr};

use wsplice_common::packet::{FlowEntry, FlowKey, FLOW_ACTIVE, FROM_CLIENT, TSVAL_MARGIN};

/// What the translation needs of one of the proxy's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The proxy's address on this connection.
    pub local: SocketAddr,
    /// The other end.
    pub peer: SocketAddr,
    /// Sequence number of the next byte the proxy would send.
    pub send_next: u32,
    /// Sequence number of the next byte the proxy expects.
    pub receive_next: u32,
    /// The socket's timestamp clock (the TSval its next segment would carry).
    pub timestamp: u32,
    /// Window scale the other end announced (its windows are shifted by it).
    pub peer_scale: u8,
    /// Window scale the proxy's socket announced (the other end shifts the proxy's windows).
    pub own_scale: u8,
    /// Interface packets towards the other end leave by, or 0 when it is on this host.
    pub egress_ifindex: u32,
}

/// The two directions of a packet-spliced tunnel, as the program's map holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flows {
    /// Packets the client sends, made into the upstream connection's.
    pub from_client: (FlowKey, FlowEntry),
    /// Packets the upstream sends, made into the client connection's.
    pub from_upstream: (FlowKey, FlowEntry),
}

impl Flows {
    /// The entries for a tunnel of `client` and `upstream`, active.
    ///
    /// Both connections must be of one address family (the hand-off checks it first); a
    /// v4-mapped IPv6 address counts as the IPv4 address it carries, since that is what
    /// its packets hold.
    pub fn new(client: &Endpoint, upstream: &Endpoint) -> Flows {
        let mut up = direction(client, upstream);
        up.flags = FROM_CLIENT;
        Flows {
            from_client: (flow_key(client.peer, client.local), up),
            from_upstream: (
                flow_key(upstream.peer, upstream.local),
                direction(upstream, client),
            ),
        }
    }
}

/// The entry for packets arriving on connection `from` and leaving on connection `to`.
fn direction(from: &Endpoint, to: &Endpoint) -> FlowEntry {
    let (saddr, family) = address_words(to.local.ip());
    let (daddr, _) = address_words(to.peer.ip());
    FlowEntry {
        saddr,
        daddr,
        sport: network_port(to.local.port()),
        dport: network_port(to.peer.port()),
        scale_in: from.peer_scale,
        scale_out: to.own_scale,
        state: FLOW_ACTIVE,
        family,
        seq_delta: to.send_next.wrapping_sub(from.receive_next),
        ack_delta: to.receive_next.wrapping_sub(from.send_next),
        ts_base: to.timestamp.wrapping_add(TSVAL_MARGIN),
        ifindex: to.egress_ifindex,
        seq_next: to.send_next,
        ..FlowEntry::default()
    }
}

/// The key of packets that `sender` sends to `receiver`.
pub fn flow_key(sender: SocketAddr, receiver: SocketAddr) -> FlowKey {
    let (saddr, family) = address_words(sender.ip());
    let (daddr, _) = address_words(receiver.ip());
    FlowKey {
        saddr,
        daddr,
        sport: network_port(sender.port()),
        dport: network_port(receiver.port()),
        family,
        reserved: [0; 3],
    }
}

/// The address as the program reads it from a packet (network byte order words; IPv4 in the
/// first), and its family (4 or 6).
pub fn address_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], 4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], 6)
        }
    }
}

/// The address an entry's words and port name (the inverse of [`address_words`] and the
/// port's encoding).
pub fn socket_address(words: [u32; 4], port: u16, family: u8) -> SocketAddr {
    let ip = if family == 4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.as_chunks_mut::<4>().0.iter_mut().zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::from(octets)
    };
    SocketAddr::new(ip, u16::from_be_bytes(port.to_ne_bytes()))
}

/// The port as the program reads it from a packet.
fn network_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The family a connection's packets have (4 or 6).
pub fn family(ip: IpAddr) -> u8 {
    address_words(ip).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Endpoint {
        Endpoint {
            local: "10.0.1.1:443".parse().unwrap(),
            peer: "10.0.1.2:51000".parse().unwrap(),
            send_next: 1_000,
            receive_next: 4_000_000_000,
            timestamp: 77,
            peer_scale: 7,
            own_scale: 9,
            egress_ifindex: 3,
        }
    }

    fn upstream() -> Endpoint {
        Endpoint {
            local: "10.0.2.1:40001".parse().unwrap(),
            peer: "10.0.2.2:9000".parse().unwrap(),
            send_next: 500,
            receive_next: 123_456,
            timestamp: 5_000,
            peer_scale: 10,
            own_scale: 8,
            egress_ifindex: 4,
        }
    }

    #[test]
    fn a_client_byte_lands_where_the_upstream_expects_it_and_acks_map_back() {
        let (c, u) = (client(), upstream());
        let flows = Flows::new(&c, &u);
        let (_, up) = flows.from_client;
        let (_, down) = flows.from_upstream;
        // The client's next byte is the upstream's next expected byte (wrapping past 2^32).
        assert_eq!(c.receive_next.wrapping_add(up.seq_delta), u.send_next);
        // The client acknowledges what the proxy sent it: the upstream sees its own numbers.
        assert_eq!(c.send_next.wrapping_add(up.ack_delta), u.receive_next);
        assert_eq!(u.receive_next.wrapping_add(down.seq_delta), c.send_next);
        assert_eq!(u.send_next.wrapping_add(down.ack_delta), c.receive_next);
        // Each direction undoes the other.
        assert_eq!(up.seq_delta.wrapping_add(down.ack_delta), 0);
        assert_eq!(up.ack_delta.wrapping_add(down.seq_delta), 0);
        assert_eq!((up.state, down.state), (FLOW_ACTIVE, FLOW_ACTIVE));
    }

    #[test]
    fn windows_rescale_from_the_senders_scale_to_the_one_the_receiver_expects() {
        let flows = Flows::new(&client(), &upstream());
        let (_, up) = flows.from_client;
        let (_, down) = flows.from_upstream;
        // The client shifts by 7; the upstream expects the proxy's 8.
        assert_eq!((up.scale_in, up.scale_out), (7, 8));
        // The upstream shifts by 10; the client expects the proxy's 9.
        assert_eq!((down.scale_in, down.scale_out), (10, 9));
    }

    #[test]
    fn addresses_ports_egress_and_reverse_keys_name_the_other_connection() {
        let (c, u) = (client(), upstream());
        let flows = Flows::new(&c, &u);
        let (key, up) = flows.from_client;
        let (reverse, down) = flows.from_upstream;
        assert_eq!(key, flow_key(c.peer, c.local));
        assert_eq!(reverse, flow_key(u.peer, u.local));
        // Each entry names the key of the other direction's packets.
        assert_eq!(up.reverse_key(), reverse);
        assert_eq!(down.reverse_key(), key);
        assert_eq!((up.family, down.family), (4, 4));
        assert_eq!(up.saddr[0], u32::from_ne_bytes([10, 0, 2, 1]));
        assert_eq!(up.daddr[0], u32::from_ne_bytes([10, 0, 2, 2]));
        assert_eq!(up.sport, u16::from_ne_bytes(40001u16.to_be_bytes()));
        assert_eq!(up.dport, u16::from_ne_bytes(9000u16.to_be_bytes()));
        assert_eq!(down.daddr[0], u32::from_ne_bytes([10, 0, 1, 2]));
        assert_eq!(down.dport, u16::from_ne_bytes(51000u16.to_be_bytes()));
        assert_eq!((up.ifindex, down.ifindex), (4, 3));
        assert_eq!(key.family, 4);
    }

    #[test]
    fn timestamps_start_ahead_of_what_each_receiver_last_saw() {
        let flows = Flows::new(&client(), &upstream());
        assert_eq!(flows.from_client.1.ts_base, 5_000 + TSVAL_MARGIN);
        assert_eq!(flows.from_upstream.1.ts_base, 77 + TSVAL_MARGIN);
    }

    #[test]
    fn entries_name_their_addresses_back() {
        let (c, u) = (client(), upstream());
        let flows = Flows::new(&c, &u);
        let (key, up) = flows.from_client;
        assert_eq!(socket_address(up.saddr, up.sport, key.family), u.local);
        assert_eq!(socket_address(up.daddr, up.dport, key.family), u.peer);
        let v6: SocketAddr = "[fd00::1:2]:443".parse().unwrap();
        let (words, family) = address_words(v6.ip());
        let port = network_port(443);
        assert_eq!(socket_address(words, port, family), v6);
        assert_eq!(
            up.seq_next, u.send_next,
            "the upstream expects the proxy's next byte"
        );
    }

    #[test]
    fn v4_mapped_addresses_are_ipv4_and_ipv6_fills_four_words() {
        let mapped: IpAddr = "::ffff:10.0.1.2".parse().unwrap();
        assert_eq!(
            address_words(mapped),
            ([u32::from_ne_bytes([10, 0, 1, 2]), 0, 0, 0], 4)
        );
        let v6: IpAddr = "fd00::1:2".parse().unwrap();
        let (words, family) = address_words(v6);
        assert_eq!(family, 6);
        assert_eq!(words[0], u32::from_ne_bytes([0xfd, 0, 0, 0]));
        assert_eq!(words[3], u32::from_ne_bytes([0, 1, 0, 2]));
    }
}
