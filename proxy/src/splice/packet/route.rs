//! Which interface the kernel would send a packet through: one route lookup over NETLINK_ROUTE.
//!
//! Why: the tc program that rewrites packets hands them on with `bpf_redirect_neigh(ifindex)`,
//! which needs the output interface, while a packet for one of this host's own addresses must
//! go up the stack instead. Userspace asks the kernel (`RTM_GETROUTE`, what `ip route get DST
//! from SRC` does) and tells the program. The kernel resolves the route as it would for a packet
//! sent from that source (policy rules, the multipath choice), so the answer is the real egress,
//! not a guess from reading the routing tables.
//!
//! The socket half ([`RouteLookup`]) sends one request and reads until the answer carrying its
//! sequence number; the parsing half ([`parse_answer`]) is pure and treats the kernel's bytes as
//! untrusted input: every length is checked before it is used, and every loop consumes bytes.

use std::io;
use std::mem;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Where the kernel sends packets for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Delivered on this host (the destination is one of its addresses): the tc program passes
    /// the packet up the stack.
    Local,
    /// Out of this interface (its index), for `bpf_redirect_neigh`.
    Interface(u32),
}

/// Why a route lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The NETLINK_ROUTE socket could not be opened or configured.
    #[error("cannot open a NETLINK_ROUTE socket: {0}")]
    Socket(#[source] io::Error),
    /// The request could not be sent to the kernel.
    #[error("cannot send the route request: {0}")]
    Send(#[source] io::Error),
    /// The answer could not be read, or did not come within the receive timeout (1 s).
    #[error("cannot receive the route answer: {0}")]
    Receive(#[source] io::Error),
    /// The kernel refused the lookup (the errno of its NLMSG_ERROR answer), e.g. EINVAL when
    /// the source is not an address of this host.
    #[error("the kernel refused the route lookup: {0}")]
    Kernel(#[source] io::Error),
    /// The request could not be built (source and destination of different families) or the
    /// answer could not be parsed (what was wrong with it).
    #[error("malformed route lookup: {0}")]
    Malformed(&'static str),
    /// The kernel has no unicast or local route to the destination (unreachable, blackhole,
    /// prohibit, or a broadcast/multicast destination).
    #[error("no route to the destination")]
    NoRoute,
}

/// Length of `struct nlmsghdr`, which is already 4-byte aligned.
const NLMSG_HDRLEN: usize = 16;
/// Length of `struct rtmsg`, which is already 4-byte aligned.
const RTMSG_LEN: usize = 12;
/// Length of `struct rtattr`.
const RTA_HDRLEN: usize = 4;
/// `NLMSG_ERROR` from `linux/netlink.h`, typed as `nlmsg_type` (libc has it as `c_int`).
const NLMSG_ERROR: u16 = 2;
/// `NLM_F_REQUEST` from `linux/netlink.h`, typed as `nlmsg_flags`.
const NLM_F_REQUEST: u16 = 1;
/// The attribute-type bits of `rta_type`, without NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Room for any answer: a route answer is a few hundred bytes; a larger one is rejected.
const RECEIVE_BUFFER: usize = 8192;
/// Reads per lookup before giving up: stale answers (to requests that timed out) are skipped,
/// and there can only be as many of them as earlier lookups.
const MAX_READS: usize = 16;
/// Attempts at a system call interrupted by a signal (EINTR) before giving up.
const MAX_ATTEMPTS: usize = 8;
/// How long one read waits for the kernel, so a lookup can never hang.
const RECEIVE_TIMEOUT_SECONDS: libc::time_t = 1;

/// A NETLINK_ROUTE socket kept open for repeated lookups (one per worker thread).
///
/// Why one per thread: a lookup is a request then its answer on the socket, so the socket is
/// used by one caller at a time (`&mut self`); opening a socket per lookup would cost three
/// extra system calls. The socket belongs to the network namespace it was opened in.
#[derive(Debug)]
pub struct RouteLookup {
    /// The NETLINK_ROUTE socket, with a 1 s receive timeout.
    fd: OwnedFd,
    /// The sequence number of the last request; answers carrying another one are stale.
    seq: u32,
}

impl RouteLookup {
    /// Opens the NETLINK_ROUTE socket (close-on-exec, 1 s receive timeout).
    pub fn open() -> Result<RouteLookup, RouteError> {
        // SAFETY: plain system call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(RouteError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        set_receive_timeout(&fd).map_err(RouteError::Socket)?;
        Ok(RouteLookup { fd, seq: 0 })
    }

    /// Where the kernel would send a packet from `source` to `destination`: out of an interface,
    /// or up the stack of this host.
    ///
    /// `source` must be an address of this host (or unspecified) and of the same family as
    /// `destination`; IPv4-mapped IPv6 addresses count as IPv4. An IPv6 link-local destination
    /// is looked up without a scope, so its answer is whatever the kernel picks.
    pub fn egress(&mut self, source: IpAddr, destination: IpAddr) -> Result<Egress, RouteError> {
        let (source, destination) = same_family(source, destination)?;
        self.seq = self.seq.wrapping_add(1);
        let request = build_request(self.seq, &source, &destination);
        self.send(&request)?;
        self.receive_answer(self.seq)
    }

    /// Sends `request` to the kernel whole.
    fn send(&self, request: &[u8]) -> Result<(), RouteError> {
        let kernel = netlink_address(0);
        for _ in 0..MAX_ATTEMPTS {
            // SAFETY: `request` is valid for reads of its length and `kernel` is a
            // `sockaddr_nl` of the given size, both for the duration of the call.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    request.as_ptr().cast(),
                    request.len(),
                    0,
                    (&raw const kernel).cast(),
                    socklen_of::<libc::sockaddr_nl>(),
                )
            };
            if sent < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(RouteError::Send(error));
            }
            if sent.unsigned_abs() != request.len() {
                let error = io::Error::new(io::ErrorKind::WriteZero, "the request was cut short");
                return Err(RouteError::Send(error));
            }
            return Ok(());
        }
        Err(RouteError::Send(interrupted()))
    }

    /// Reads until the answer to request `seq`, skipping stale answers.
    fn receive_answer(&self, seq: u32) -> Result<Egress, RouteError> {
        let mut buffer = [0u8; RECEIVE_BUFFER];
        for _ in 0..MAX_READS {
            let Some(len) = self.receive(&mut buffer)? else {
                continue;
            };
            let bytes = buffer
                .get(..len)
                .ok_or(RouteError::Malformed("answer length"))?;
            if let Some(egress) = parse_answer(bytes, seq)? {
                return Ok(egress);
            }
        }
        Err(RouteError::Malformed(
            "no answer to the request among the kernel's messages",
        ))
    }

    /// Reads one datagram into `buffer`: its length, or `None` when there is nothing to parse
    /// (the read was interrupted, or the datagram did not come from the kernel).
    fn receive(&self, buffer: &mut [u8]) -> Result<Option<usize>, RouteError> {
        let mut sender = netlink_address(0);
        let mut sender_len = socklen_of::<libc::sockaddr_nl>();
        // SAFETY: `buffer` is valid for writes of its length and `sender` for writes of
        // `sender_len` bytes, both for the duration of the call.
        let received = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                // Report the datagram's real length, to detect one larger than the buffer.
                libc::MSG_TRUNC,
                (&raw mut sender).cast(),
                &mut sender_len,
            )
        };
        if received < 0 {
            return receive_failure(io::Error::last_os_error());
        }
        let len = received.unsigned_abs();
        if len > buffer.len() {
            return Err(RouteError::Malformed(
                "answer larger than the receive buffer",
            ));
        }
        if sender.nl_pid != 0 {
            return Ok(None);
        }
        Ok(Some(len))
    }
}

/// What a failed read means: nothing yet (EINTR), a timeout, or an error.
fn receive_failure(error: io::Error) -> Result<Option<usize>, RouteError> {
    match error.kind() {
        io::ErrorKind::Interrupted => Ok(None),
        io::ErrorKind::WouldBlock => Err(RouteError::Receive(io::Error::new(
            io::ErrorKind::TimedOut,
            "no answer from the kernel within the receive timeout",
        ))),
        _ => Err(RouteError::Receive(error)),
    }
}

/// The error of a system call interrupted `MAX_ATTEMPTS` times in a row.
fn interrupted() -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        "interrupted by signals repeatedly",
    )
}

/// Sets SO_RCVTIMEO on `fd`, so a read waits at most `RECEIVE_TIMEOUT_SECONDS`.
fn set_receive_timeout(fd: &OwnedFd) -> io::Result<()> {
    let timeout = libc::timeval {
        tv_sec: RECEIVE_TIMEOUT_SECONDS,
        tv_usec: 0,
    };
    // SAFETY: `timeout` is a `timeval` of the given size for the duration of the call.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            socklen_of::<libc::timeval>(),
        )
    };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A netlink socket address for port `port` (0: the kernel).
fn netlink_address(port: u32) -> libc::sockaddr_nl {
    // SAFETY: `sockaddr_nl` is plain integers, for which all zeroes is a valid value.
    let mut address: libc::sockaddr_nl = unsafe { mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    address.nl_pid = port;
    address
}

/// The size of `T` as a socket-address length (the structures here are a few bytes long).
fn socklen_of<T>() -> libc::socklen_t {
    mem::size_of::<T>() as libc::socklen_t
}

/// An address as a request carries it, in network byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// An IPv4 address.
    V4([u8; 4]),
    /// An IPv6 address.
    V6([u8; 16]),
}

impl Wire {
    /// `address` in wire form; IPv4-mapped IPv6 addresses become IPv4.
    fn of(address: IpAddr) -> Wire {
        match address.to_canonical() {
            IpAddr::V4(v4) => Wire::V4(v4.octets()),
            IpAddr::V6(v6) => Wire::V6(v6.octets()),
        }
    }

    /// The address family (`rtm_family`).
    fn family(&self) -> u8 {
        match self {
            Wire::V4(_) => libc::AF_INET as u8,
            Wire::V6(_) => libc::AF_INET6 as u8,
        }
    }

    /// The prefix length of one host (`rtm_dst_len`, `rtm_src_len`).
    fn host_bits(&self) -> u8 {
        match self {
            Wire::V4(_) => 32,
            Wire::V6(_) => 128,
        }
    }

    /// The address bytes.
    fn bytes(&self) -> &[u8] {
        match self {
            Wire::V4(octets) => octets,
            Wire::V6(octets) => octets,
        }
    }
}

/// Both addresses in wire form, or `Malformed` when their families differ.
fn same_family(source: IpAddr, destination: IpAddr) -> Result<(Wire, Wire), RouteError> {
    let (source, destination) = (Wire::of(source), Wire::of(destination));
    if source.family() != destination.family() {
        return Err(RouteError::Malformed(
            "source and destination are of different address families",
        ));
    }
    Ok((source, destination))
}

/// The RTM_GETROUTE request `seq` for one destination from one source: a `nlmsghdr`, a
/// `rtmsg` with host prefix lengths, then RTA_DST and RTA_SRC.
///
/// No RTM_F_LOOKUP_TABLE or RTM_F_FIB_MATCH: the plain request resolves the route the way a
/// sent packet would (the multipath choice included), and the table id is of no use here.
fn build_request(seq: u32, source: &Wire, destination: &Wire) -> Vec<u8> {
    let attributes = 2 * RTA_HDRLEN + source.bytes().len() + destination.bytes().len();
    let len = NLMSG_HDRLEN + RTMSG_LEN + attributes;
    let mut request = Vec::with_capacity(len);
    // At most 16 + 12 + 2 * (4 + 16) = 68 bytes, so the length fits any integer type.
    request.extend_from_slice(&(len as u32).to_ne_bytes());
    request.extend_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    request.extend_from_slice(&seq.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills in ours
    let bits = destination.host_bits();
    // rtm_family, rtm_dst_len, rtm_src_len, then tos, table, protocol, scope, type all 0.
    request.extend_from_slice(&[destination.family(), bits, bits, 0, 0, 0, 0, 0]);
    request.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    push_attribute(&mut request, libc::RTA_DST, destination.bytes());
    push_attribute(&mut request, libc::RTA_SRC, source.bytes());
    request
}

/// Appends a `rtattr` carrying `value` (4 or 16 bytes, so no padding is needed).
fn push_attribute(request: &mut Vec<u8>, kind: u16, value: &[u8]) {
    // 4 + at most 16 bytes: fits in u16.
    let len = (RTA_HDRLEN + value.len()) as u16;
    request.extend_from_slice(&len.to_ne_bytes());
    request.extend_from_slice(&kind.to_ne_bytes());
    request.extend_from_slice(value);
}

/// Parses the datagram `bytes` read from the socket, looking for the answer to request `seq`.
///
/// `Ok(Some(_))` for the route answer, `Ok(None)` when the datagram holds no answer to `seq`
/// (only stale answers or other messages: read again), an error when the kernel refused the
/// lookup or the bytes are not well-formed netlink. Public so a fuzz target can feed it
/// arbitrary bytes; it never panics.
pub fn parse_answer(bytes: &[u8], seq: u32) -> Result<Option<Egress>, RouteError> {
    let mut rest = bytes;
    // Bounded: each pass consumes at least NLMSG_HDRLEN bytes or fails.
    while !rest.is_empty() {
        let (message, next) = split_message(rest)?;
        rest = next;
        if message.seq != seq {
            continue; // stale: the answer to an earlier request that timed out
        }
        if let Some(egress) = interpret(&message)? {
            return Ok(Some(egress));
        }
    }
    Ok(None)
}

/// One netlink message: the header fields used here and the payload.
#[derive(Debug)]
struct Message<'a> {
    /// `nlmsg_type`.
    kind: u16,
    /// `nlmsg_seq`.
    seq: u32,
    /// The bytes after the header, up to `nlmsg_len`.
    payload: &'a [u8],
}

/// The first message of `bytes` and what follows it (after its alignment padding).
fn split_message(bytes: &[u8]) -> Result<(Message<'_>, &[u8]), RouteError> {
    let header = bytes
        .get(..NLMSG_HDRLEN)
        .ok_or(RouteError::Malformed("message header truncated"))?;
    let (Some(len), Some(kind), Some(seq)) =
        (u32_at(header, 0), u16_at(header, 4), u32_at(header, 8))
    else {
        return Err(RouteError::Malformed("message header truncated"));
    };
    let len = len as usize; // u32 to usize: lossless on the 32- and 64-bit Linux targets
    if len < NLMSG_HDRLEN {
        return Err(RouteError::Malformed(
            "message length shorter than its header",
        ));
    }
    let payload = bytes.get(NLMSG_HDRLEN..len).ok_or(RouteError::Malformed(
        "message length overruns the datagram",
    ))?;
    // The last message may go without its padding.
    let next = bytes.get(align4(len)..).unwrap_or(&[]);
    Ok((Message { kind, seq, payload }, next))
}

/// What a message answering our request says: an egress, nothing (an acknowledgement or a
/// message of another type), or the kernel's error.
fn interpret(message: &Message<'_>) -> Result<Option<Egress>, RouteError> {
    match message.kind {
        NLMSG_ERROR => parse_error(message.payload),
        libc::RTM_NEWROUTE => parse_route(message.payload).map(Some),
        _ => Ok(None),
    }
}

/// An NLMSG_ERROR payload (`struct nlmsgerr`): 0 is an acknowledgement, a negative errno a
/// refusal.
fn parse_error(payload: &[u8]) -> Result<Option<Egress>, RouteError> {
    let code = i32_at(payload, 0).ok_or(RouteError::Malformed("error message truncated"))?;
    if code == 0 {
        return Ok(None);
    }
    match code.checked_neg() {
        Some(errno) if errno > 0 => Err(kernel_error(errno)),
        _ => Err(RouteError::Malformed("error code is not a negative errno")),
    }
}

/// The error for the kernel's `errno`: no route for the unreachable ones, else `Kernel`.
fn kernel_error(errno: i32) -> RouteError {
    match errno {
        libc::ENETUNREACH | libc::EHOSTUNREACH => RouteError::NoRoute,
        _ => RouteError::Kernel(io::Error::from_raw_os_error(errno)),
    }
}

/// A RTM_NEWROUTE payload: a `rtmsg` then attributes; the route type and RTA_OIF decide.
fn parse_route(payload: &[u8]) -> Result<Egress, RouteError> {
    let header: &[u8; RTMSG_LEN] = payload
        .get(..RTMSG_LEN)
        .and_then(|header| header.try_into().ok())
        .ok_or(RouteError::Malformed("route message truncated"))?;
    let route_type = header[7]; // rtm_type
    let attributes = payload.get(RTMSG_LEN..).unwrap_or(&[]);
    let output = find_output_interface(attributes)?;
    match (route_type, output) {
        (libc::RTN_LOCAL, _) => Ok(Egress::Local),
        (libc::RTN_UNICAST, Some(index)) => Ok(Egress::Interface(index)),
        (libc::RTN_UNICAST, None) => Err(RouteError::Malformed(
            "unicast route without an output interface",
        )),
        _ => Err(RouteError::NoRoute),
    }
}

/// The RTA_OIF value among `attributes`, checking every attribute's length; unknown
/// attributes are skipped.
fn find_output_interface(attributes: &[u8]) -> Result<Option<u32>, RouteError> {
    let mut output = None;
    let mut rest = attributes;
    // Bounded: each pass consumes at least RTA_HDRLEN bytes or fails.
    while !rest.is_empty() {
        let (kind, value, next) = split_attribute(rest)?;
        rest = next;
        if kind == libc::RTA_OIF {
            output = Some(parse_interface_index(value)?);
        }
    }
    Ok(output)
}

/// An RTA_OIF value: a non-zero `u32` interface index.
fn parse_interface_index(value: &[u8]) -> Result<u32, RouteError> {
    if value.len() != 4 {
        return Err(RouteError::Malformed("RTA_OIF is not 4 bytes long"));
    }
    match u32_at(value, 0) {
        Some(index) if index != 0 => Ok(index),
        _ => Err(RouteError::Malformed("RTA_OIF holds no interface index")),
    }
}

/// The first attribute of `bytes`: its type (flags masked off), its value, and what follows
/// it (after its alignment padding).
fn split_attribute(bytes: &[u8]) -> Result<(u16, &[u8], &[u8]), RouteError> {
    let len = u16_at(bytes, 0).ok_or(RouteError::Malformed("attribute header truncated"))?;
    let kind = u16_at(bytes, 2).ok_or(RouteError::Malformed("attribute header truncated"))?;
    let len = usize::from(len);
    if len < RTA_HDRLEN {
        return Err(RouteError::Malformed(
            "attribute length shorter than its header",
        ));
    }
    let value = bytes.get(RTA_HDRLEN..len).ok_or(RouteError::Malformed(
        "attribute length overruns its message",
    ))?;
    // The last attribute may go without its padding.
    let next = bytes.get(align4(len)..).unwrap_or(&[]);
    Ok((kind & NLA_TYPE_MASK, value, next))
}

/// `len` rounded up to the netlink alignment of 4 bytes (`len` is at most a buffer's length,
/// so this cannot overflow).
fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// The native-endian `u16` at `offset` of `bytes`, if there.
fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    let field = bytes.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_ne_bytes(field.try_into().ok()?))
}

/// The native-endian `u32` at `offset` of `bytes`, if there.
fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let field = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_ne_bytes(field.try_into().ok()?))
}

/// The native-endian `i32` at `offset` of `bytes`, if there.
fn i32_at(bytes: &[u8], offset: usize) -> Option<i32> {
    let field = bytes.get(offset..offset.checked_add(4)?)?;
    Some(i32::from_ne_bytes(field.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::ffi::CString;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::path::Path;
    use std::process::Command;

    // --- hand-built answers ---

    /// A netlink message of type `kind` with `payload`, padded to 4 bytes.
    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(&0u16.to_ne_bytes());
        bytes.extend_from_slice(&seq.to_ne_bytes());
        bytes.extend_from_slice(&1234u32.to_ne_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    /// An attribute of type `kind` carrying `value`, padded to 4 bytes.
    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&((RTA_HDRLEN + value.len()) as u16).to_ne_bytes());
        bytes.extend_from_slice(&kind.to_ne_bytes());
        bytes.extend_from_slice(value);
        bytes.resize(align4(bytes.len()), 0);
        bytes
    }

    /// A RTM_NEWROUTE payload of `route_type` followed by `attributes`.
    fn route(route_type: u8, attributes: &[u8]) -> Vec<u8> {
        let mut bytes = vec![
            libc::AF_INET as u8,
            32,
            32,
            0,
            libc::RT_TABLE_MAIN,
            0,
            0,
            route_type,
        ];
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(attributes);
        bytes
    }

    /// A RTM_NEWROUTE answer `seq` for a unicast route out of interface `index`, with the
    /// attributes a real answer carries around RTA_OIF.
    fn unicast_answer(seq: u32, index: u32) -> Vec<u8> {
        let mut attributes = attribute(libc::RTA_TABLE, &254u32.to_ne_bytes());
        attributes.extend(attribute(libc::RTA_DST, &[10, 0, 0, 2]));
        attributes.extend(attribute(libc::RTA_OIF, &index.to_ne_bytes()));
        attributes.extend(attribute(libc::RTA_PREFSRC, &[10, 0, 0, 1]));
        attributes.extend(attribute(0x7ff, &[1, 2, 3])); // unknown, unaligned value
        message(
            libc::RTM_NEWROUTE,
            seq,
            &route(libc::RTN_UNICAST, &attributes),
        )
    }

    /// An NLMSG_ERROR answer `seq` with `code` (a negative errno, or 0 for an ack).
    fn error_answer(seq: u32, code: i32) -> Vec<u8> {
        let mut payload = code.to_ne_bytes().to_vec();
        payload.extend(message(libc::RTM_GETROUTE, seq, &[0; RTMSG_LEN])); // the request echoed
        message(NLMSG_ERROR, seq, &payload)
    }

    fn malformed(result: Result<Option<Egress>, RouteError>) -> &'static str {
        match result {
            Err(RouteError::Malformed(what)) => what,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn unicast_answer_gives_its_output_interface() {
        let answer = unicast_answer(7, 3);
        assert_eq!(
            parse_answer(&answer, 7).unwrap(),
            Some(Egress::Interface(3))
        );
    }

    #[test]
    fn local_answer_is_local() {
        let attributes = attribute(libc::RTA_OIF, &1u32.to_ne_bytes());
        let answer = message(libc::RTM_NEWROUTE, 9, &route(libc::RTN_LOCAL, &attributes));
        assert_eq!(parse_answer(&answer, 9).unwrap(), Some(Egress::Local));
    }

    #[test]
    fn kernel_error_carries_its_errno() {
        match parse_answer(&error_answer(4, -libc::EINVAL), 4) {
            Err(RouteError::Kernel(error)) => assert_eq!(error.raw_os_error(), Some(libc::EINVAL)),
            other => panic!("expected Kernel(EINVAL), got {other:?}"),
        }
    }

    #[test]
    fn unreachable_is_no_route() {
        let result = parse_answer(&error_answer(4, -libc::ENETUNREACH), 4);
        assert!(matches!(result, Err(RouteError::NoRoute)), "{result:?}");
        let blackhole = message(libc::RTM_NEWROUTE, 4, &route(libc::RTN_BLACKHOLE, &[]));
        let result = parse_answer(&blackhole, 4);
        assert!(matches!(result, Err(RouteError::NoRoute)), "{result:?}");
    }

    #[test]
    fn error_code_must_be_a_negative_errno() {
        assert!(malformed(parse_answer(&error_answer(4, 5), 4)).contains("errno"));
        assert!(malformed(parse_answer(&error_answer(4, i32::MIN), 4)).contains("errno"));
        assert_eq!(
            parse_answer(&error_answer(4, 0), 4).unwrap(),
            None,
            "an ack is no answer"
        );
        let short = message(NLMSG_ERROR, 4, &[0xff, 0xff]);
        assert!(malformed(parse_answer(&short, 4)).contains("truncated"));
    }

    #[test]
    fn stale_messages_are_skipped() {
        let mut datagram = error_answer(6, -libc::EINVAL);
        datagram.extend(unicast_answer(5, 8));
        datagram.extend(unicast_answer(7, 2));
        assert_eq!(
            parse_answer(&datagram, 7).unwrap(),
            Some(Egress::Interface(2))
        );
        assert_eq!(parse_answer(&unicast_answer(5, 8), 7).unwrap(), None);
    }

    #[test]
    fn other_message_types_are_skipped() {
        let mut datagram = message(libc::NLMSG_NOOP as u16, 3, &[]);
        datagram.extend(message(libc::RTM_NEWLINK, 3, &[1, 2, 3, 4]));
        datagram.extend(unicast_answer(3, 4));
        assert_eq!(
            parse_answer(&datagram, 3).unwrap(),
            Some(Egress::Interface(4))
        );
        assert_eq!(parse_answer(&[], 3).unwrap(), None);
    }

    #[test]
    fn truncated_message_is_malformed() {
        let answer = unicast_answer(7, 3);
        let cut = &answer[..answer.len() - 8];
        assert!(malformed(parse_answer(cut, 7)).contains("overruns the datagram"));
        assert!(malformed(parse_answer(&answer[..10], 7)).contains("header truncated"));
        let mut short = answer.clone();
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(malformed(parse_answer(&short, 7)).contains("shorter than its header"));
        let bare = message(libc::RTM_NEWROUTE, 7, &[0; 6]);
        assert!(malformed(parse_answer(&bare, 7)).contains("route message truncated"));
    }

    #[test]
    fn overrunning_attribute_is_malformed() {
        let mut attributes = attribute(libc::RTA_OIF, &3u32.to_ne_bytes());
        attributes[..2].copy_from_slice(&40u16.to_ne_bytes());
        let answer = message(
            libc::RTM_NEWROUTE,
            1,
            &route(libc::RTN_UNICAST, &attributes),
        );
        assert!(malformed(parse_answer(&answer, 1)).contains("overruns its message"));

        attributes[..2].copy_from_slice(&2u16.to_ne_bytes());
        let answer = message(
            libc::RTM_NEWROUTE,
            1,
            &route(libc::RTN_UNICAST, &attributes),
        );
        assert!(malformed(parse_answer(&answer, 1)).contains("shorter than its header"));

        let answer = message(libc::RTM_NEWROUTE, 1, &route(libc::RTN_UNICAST, &[4, 0]));
        assert!(malformed(parse_answer(&answer, 1)).contains("attribute header truncated"));
    }

    #[test]
    fn output_interface_must_be_a_valid_index() {
        let wrong_size = attribute(libc::RTA_OIF, &[3, 0]);
        let answer = message(
            libc::RTM_NEWROUTE,
            1,
            &route(libc::RTN_UNICAST, &wrong_size),
        );
        assert!(malformed(parse_answer(&answer, 1)).contains("4 bytes"));
        let zero = attribute(libc::RTA_OIF, &0u32.to_ne_bytes());
        let answer = message(libc::RTM_NEWROUTE, 1, &route(libc::RTN_UNICAST, &zero));
        assert!(malformed(parse_answer(&answer, 1)).contains("no interface index"));
        let none = attribute(libc::RTA_TABLE, &254u32.to_ne_bytes());
        let answer = message(libc::RTM_NEWROUTE, 1, &route(libc::RTN_UNICAST, &none));
        assert!(malformed(parse_answer(&answer, 1)).contains("without an output interface"));
    }

    #[test]
    fn flag_bits_of_attribute_types_are_ignored() {
        let flagged = libc::RTA_OIF | libc::NLA_F_NET_BYTEORDER as u16;
        let attributes = attribute(flagged, &6u32.to_ne_bytes());
        let answer = message(
            libc::RTM_NEWROUTE,
            1,
            &route(libc::RTN_UNICAST, &attributes),
        );
        assert_eq!(
            parse_answer(&answer, 1).unwrap(),
            Some(Egress::Interface(6))
        );
    }

    #[test]
    fn no_prefix_or_mutation_panics() {
        let mut datagram = error_answer(2, -libc::EPERM);
        datagram.extend(unicast_answer(3, 4));
        for end in 0..=datagram.len() {
            let _ = parse_answer(&datagram[..end], 3);
        }
        for position in 0..datagram.len() {
            for value in [0x00, 0x01, 0x03, 0x7f, 0x80, 0xff] {
                let mut mutated = datagram.clone();
                mutated[position] = value;
                let _ = parse_answer(&mutated, 3);
            }
        }
    }

    #[test]
    fn request_layout() {
        let source = Wire::of(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let destination = Wire::of("::ffff:10.0.0.2".parse().unwrap());
        let request = build_request(42, &source, &destination);
        assert_eq!(
            request.len(),
            NLMSG_HDRLEN + RTMSG_LEN + 2 * (RTA_HDRLEN + 4)
        );
        let (message, rest) = split_message(&request).unwrap();
        assert!(rest.is_empty());
        assert_eq!((message.kind, message.seq), (libc::RTM_GETROUTE, 42));
        assert_eq!(u16_at(&request, 6), Some(NLM_F_REQUEST));
        assert_eq!(&message.payload[..3], &[libc::AF_INET as u8, 32, 32]);
        let (kind, value, rest) = split_attribute(&message.payload[RTMSG_LEN..]).unwrap();
        assert_eq!((kind, value), (libc::RTA_DST, &[10, 0, 0, 2][..]));
        let (kind, value, rest) = split_attribute(rest).unwrap();
        assert_eq!((kind, value), (libc::RTA_SRC, &[10, 0, 0, 1][..]));
        assert!(rest.is_empty());

        let v6 = Wire::of(IpAddr::V6(Ipv6Addr::LOCALHOST));
        let request = build_request(1, &v6, &v6);
        assert_eq!(
            request.len(),
            NLMSG_HDRLEN + RTMSG_LEN + 2 * (RTA_HDRLEN + 16)
        );
        assert_eq!(
            &request[NLMSG_HDRLEN..NLMSG_HDRLEN + 3],
            &[libc::AF_INET6 as u8, 128, 128]
        );
    }

    #[test]
    fn mixed_families_are_refused() {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(matches!(same_family(v4, v6), Err(RouteError::Malformed(_))));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(same_family(v4, mapped).is_ok());
    }

    // --- the real kernel ---

    #[test]
    fn loopback_is_local() {
        let mut lookup = RouteLookup::open().unwrap();
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(lookup.egress(v4, v4).unwrap(), Egress::Local);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        match lookup.egress(v6, v6) {
            Ok(egress) => assert_eq!(egress, Egress::Local),
            // A kernel or namespace without IPv6 has no ::1.
            Err(error) if !Path::new("/proc/net/if_inet6").exists() => {
                eprintln!("skipping ::1: no IPv6 here ({error})")
            }
            Err(error) => panic!("::1 -> ::1: {error}"),
        }
        // The socket stays usable for further lookups.
        assert_eq!(lookup.egress(v4, v4).unwrap(), Egress::Local);
    }

    /// This host's addresses, except loopback and IPv6 link-local ones (those need a scope).
    fn host_addresses() -> Vec<IpAddr> {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: `list` receives a list the C library allocates; freed below.
        assert_eq!(
            unsafe { libc::getifaddrs(&mut list) },
            0,
            "getifaddrs failed"
        );
        let mut addresses = Vec::new();
        let mut entry = list;
        while !entry.is_null() {
            // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
            let node = unsafe { &*entry };
            // SAFETY: as above; `ifa_addr` is null or points to a sockaddr of its family.
            if let Some(address) = unsafe { address_of(node.ifa_addr) } {
                if !address.is_loopback() && !is_link_local_v6(address) {
                    addresses.push(address);
                }
            }
            entry = node.ifa_next;
        }
        // SAFETY: `list` came from getifaddrs and is freed once.
        unsafe { libc::freeifaddrs(list) };
        addresses
    }

    /// The IP address in `address`, if it is IPv4 or IPv6.
    ///
    /// # Safety
    /// `address` is null or points to a valid socket address of its `sa_family`.
    unsafe fn address_of(address: *const libc::sockaddr) -> Option<IpAddr> {
        if address.is_null() {
            return None;
        }
        match i32::from(unsafe { (*address).sa_family }) {
            libc::AF_INET => {
                let v4 = unsafe { &*address.cast::<libc::sockaddr_in>() };
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let v6 = unsafe { &*address.cast::<libc::sockaddr_in6>() };
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }

    fn is_link_local_v6(address: IpAddr) -> bool {
        matches!(address, IpAddr::V6(v6) if v6.is_unicast_link_local())
    }

    #[test]
    fn host_addresses_are_local() {
        let addresses = host_addresses();
        if addresses.is_empty() {
            eprintln!("skipping: this host has no non-loopback address");
            return;
        }
        let mut lookup = RouteLookup::open().unwrap();
        for address in addresses {
            let egress = lookup.egress(address, address);
            assert_eq!(egress.unwrap(), Egress::Local, "{address} -> {address}");
        }
    }

    // --- a network namespace of our own (root only) ---

    /// A network namespace made with `ip netns add`, deleted on drop (also when a test fails).
    struct Namespace {
        name: String,
    }

    impl Namespace {
        /// Creates the namespace, or `None` (with the reason printed) when this cannot be done.
        fn create(name: String) -> Option<Namespace> {
            // SAFETY: plain system call without arguments.
            if unsafe { libc::geteuid() } != 0 {
                eprintln!("skipping: creating a network namespace needs root");
                return None;
            }
            match Command::new("ip").args(["netns", "add", &name]).output() {
                Ok(output) if output.status.success() => Some(Namespace { name }),
                Ok(output) => {
                    let reason = String::from_utf8_lossy(&output.stderr);
                    eprintln!("skipping: ip netns add {name} failed: {reason}");
                    None
                }
                Err(error) => {
                    eprintln!("skipping: cannot run ip: {error}");
                    None
                }
            }
        }

        /// Runs `ip -n NAME ARGS`, panicking when it fails.
        fn ip(&self, args: &[&str]) {
            let output = Command::new("ip")
                .args(["-n", &self.name])
                .args(args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "ip -n {} {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }

        /// Runs `work` on a new thread that entered the namespace (the thread then ends, so no
        /// thread of the test harness stays in it).
        fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
            let path = format!("/run/netns/{}", self.name);
            let thread = std::thread::spawn(move || {
                let file = std::fs::File::open(&path).unwrap();
                // SAFETY: `file` is an open namespace file for the duration of the call.
                let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(result, 0, "setns {path}: {}", io::Error::last_os_error());
                work()
            });
            match thread.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    #[test]
    fn namespace_routes_out_of_its_interface() {
        let name = format!("rt-test-{}", std::process::id());
        let Some(namespace) = Namespace::create(name) else {
            return;
        };
        namespace.ip(&[
            "link", "add", "wsp0", "type", "veth", "peer", "name", "wsp1",
        ]);
        namespace.ip(&["addr", "add", "10.99.0.1/24", "dev", "wsp0"]);
        namespace.ip(&["link", "set", "wsp1", "up"]);
        namespace.ip(&["link", "set", "wsp0", "up"]);
        let (index, remote, local, unreachable) = namespace.run(|| {
            let interface = CString::new("wsp0").unwrap();
            // SAFETY: `interface` is a NUL-terminated string for the duration of the call.
            let index = unsafe { libc::if_nametoindex(interface.as_ptr()) };
            let mut lookup = RouteLookup::open().unwrap();
            let own = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
            let remote = lookup
                .egress(own, IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2)))
                .unwrap();
            let local = lookup.egress(own, own).unwrap();
            let elsewhere = lookup.egress(own, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)));
            (
                index,
                remote,
                local,
                matches!(elsewhere, Err(RouteError::NoRoute)),
            )
        });
        assert_ne!(index, 0, "wsp0 has an index");
        assert_eq!(remote, Egress::Interface(index));
        assert_eq!(local, Egress::Local);
        assert!(unreachable, "no default route in the namespace: NoRoute");
    }
}
