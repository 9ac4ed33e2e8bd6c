//! The userspace edge of the packet splice: what one connected TCP socket knows about its
//! connection, read at the hand-off, and the silent close that follows it.
//!
//! The packet splice hands a plain tunnel (client↔proxy and proxy↔upstream) to a tc program that
//! rewrites one connection's packets into the other's. To do that it needs, per socket, where
//! both byte streams stand (sequence numbers), the timestamp clock, the windows and what the
//! handshake negotiated. Part of it is only readable with `TCP_REPAIR` (root or
//! `CAP_NET_ADMIN`), which also makes a close silent: no FIN, no RST, so the proxy can step
//! aside without the peers noticing.
//!
//! The order at a hand-off: [`pending`] on both sockets until both are quiet, then
//! [`read_in_repair`] on both, [`eligibility`] on the pair, and then either [`close_silently`]
//! on both (the program carries the connection on) or [`leave_repair`] on both (the tunnel stays
//! in userspace).
//!
//! Repair mode does not freeze the receive path: a socket in repair mode still takes the
//! peer's segments, acknowledges them and processes a FIN (Linux 6.18). Bytes or a FIN that
//! arrive between [`read_in_repair`] and the moment the program rewrites the connection's
//! packets are acknowledged by the proxy's socket and lost with its close. So the hand-off reads
//! again once the program's flow entries are in place ([`read_in_repair`] may be called on a
//! socket already in repair mode) and gives up unless `receive_next` and `state` are unchanged.

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use socket2::SockRef;

use crate::connection::Side;
use crate::sys;

// From <linux/tcp.h>; the libc crate does not export these for Linux.
/// `TCP_REPAIR` value: enter repair mode.
const TCP_REPAIR_ON: libc::c_int = 1;
/// `TCP_REPAIR` value: leave repair mode without sending a window probe.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
/// `TCP_REPAIR_QUEUE` values: which queue `TCP_QUEUE_SEQ` (and a send or receive) refers to.
const TCP_NO_QUEUE: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const TCPI_OPT_ECN: u8 = 8;
/// `tcpi_state` of an established connection (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;

/// What the packet splice needs to know about one connected socket, read at the hand-off (see
/// [`read_in_repair`]). Sequence numbers and timestamps are the ones on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketState {
    /// The socket's own address, as in its packets: an IPv4-mapped IPv6 address (a dual-stack
    /// socket talking IPv4) is given as IPv4, since the packets are IPv4.
    pub local: SocketAddr,
    /// The peer's address, mapped like `local`.
    pub peer: SocketAddr,
    /// Sequence number of the next byte this socket would send (`write_seq`, the end of the send
    /// queue): with nothing pending, the peer has acknowledged everything before it.
    pub send_next: u32,
    /// Sequence number of the next byte this socket expects (`rcv_nxt`).
    pub receive_next: u32,
    /// The socket's timestamp clock (`TCP_TIMESTAMP`): the TSval its next segment would carry.
    /// The kernel keeps the lowest bit as a flag (set: the clock counts microseconds, see
    /// [`NegotiatedOptions::usec_timestamps`]; clear: milliseconds), so the value is exact to
    /// two ticks.
    pub timestamp: u32,
    /// The socket's window bookkeeping (`TCP_REPAIR_WINDOW`).
    pub window: RepairWindow,
    /// What the handshake negotiated.
    pub options: NegotiatedOptions,
    /// The window scale the peer announced (`tcpi_snd_wscale`): the window field of the peer's
    /// segments is shifted left by it. 0 without window scaling.
    pub send_scale: u8,
    /// The window scale this socket announced (`tcpi_rcv_wscale`): the peer shifts the window
    /// field of our segments by it. 0 without window scaling.
    pub receive_scale: u8,
    /// Largest payload this socket puts in one segment now (`tcpi_snd_mss`, `mss_cache`): the
    /// peer's MSS and the path MTU less the options every segment carries (12 bytes of
    /// timestamps), but also at most half the largest window the peer ever announced (32768 on
    /// a fresh loopback connection), so not a limit of the path: see
    /// [`SocketState::accepted_payload`].
    pub send_mss: u32,
    /// The kernel's estimate of the peer's segment size (`tcpi_rcv_mss`), from what arrived
    /// (536 until a full segment came).
    pub receive_mss: u32,
    /// Largest payload the peer may put in one segment (`tcpi_advmss`: the MSS this socket
    /// announced, less the timestamps option once timestamps are on).
    pub advertised_mss: u32,
    /// The MSS the peer announced (`TCP_MAXSEG`, which in repair mode gives `mss_clamp`
    /// instead of `mss_cache`): the most payload and TCP options the peer takes in one
    /// segment.
    pub peer_mss: u32,
    /// The path MTU towards the peer as the socket knows it (`tcpi_pmtu`).
    pub path_mtu: u32,
    /// The TCP state (`tcpi_state`; [`TCP_ESTABLISHED`] is 1). Repair mode can be entered in
    /// any state of a connected socket (CLOSE_WAIT after a FIN, CLOSE after a reset), so this
    /// is what tells.
    pub state: u8,
    /// The peer announced urgent data this socket has not read past (see [`Pending::urgent`]).
    pub urgent: bool,
}

impl SocketState {
    /// Largest payload a segment on this connection may carry: the peer's MSS and the path MTU
    /// (less the IP and TCP headers), less the timestamps option. Unlike
    /// [`SocketState::send_mss`] it does not depend on the windows.
    pub fn accepted_payload(&self) -> u32 {
        /// IP header (without options or extension headers) and TCP header.
        const IPV4_TCP: u32 = 20 + 20;
        const IPV6_TCP: u32 = 40 + 20;
        /// The timestamps option, aligned (`TCPOLEN_TSTAMP_ALIGNED`).
        const TIMESTAMPS: u32 = 12;
        let headers = if self.local.is_ipv4() {
            IPV4_TCP
        } else {
            IPV6_TCP
        };
        let options = if self.options.timestamps {
            TIMESTAMPS
        } else {
            0
        };
        self.peer_mss
            .min(self.path_mtu.saturating_sub(headers))
            .saturating_sub(options)
    }
}

/// The socket's window bookkeeping, as `TCP_REPAIR_WINDOW` gives it (`struct
/// tcp_repair_window`). The windows are in bytes (already shifted by the scales).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairWindow {
    /// Sequence number of the segment that last updated the send window (`snd_wl1`): a later
    /// segment updates it only if it is not older.
    pub snd_wl1: u32,
    /// The peer's receive window, in bytes from the last acknowledged byte (`snd_wnd`).
    pub snd_wnd: u32,
    /// The largest window the peer ever announced (`max_window`).
    pub max_window: u32,
    /// The window this socket last announced, in bytes from `rcv_wup` (`rcv_wnd`).
    pub rcv_wnd: u32,
    /// `rcv_nxt` when this socket last announced its window (`rcv_wup`): the announced window
    /// ends at `rcv_wup + rcv_wnd`, an edge TCP never moves back.
    pub rcv_wup: u32,
}

/// The options the handshake negotiated (`tcpi_options`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NegotiatedOptions {
    /// Timestamps (RFC 7323): every segment carries TSval and TSecr.
    pub timestamps: bool,
    /// The timestamp clock counts microseconds instead of milliseconds (Linux 6.7+, a route
    /// feature); it changes only the meaning of [`SocketState::timestamp`].
    pub usec_timestamps: bool,
    /// Selective acknowledgements.
    pub sack: bool,
    /// Window scaling: both ends announced a scale ([`SocketState::send_scale`] and
    /// [`SocketState::receive_scale`]).
    pub window_scaling: bool,
    /// ECN. Not required by [`eligibility`]: the data path must clear the ECN bits of packets
    /// it moves to a connection that did not negotiate it.
    pub ecn: bool,
}

/// Bytes still queued in a socket: the hand-off waits for all of them to be zero (see
/// [`Pending::is_quiet`]), since a packet splice carries new segments only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Bytes written and not yet acknowledged by the peer, including the unsent ones
    /// (`SIOCOUTQ`).
    pub unacknowledged: u32,
    /// Bytes written and not yet sent (`SIOCOUTQNSD`), part of `unacknowledged`.
    pub unsent: u32,
    /// Bytes received and not yet read (`SIOCINQ`).
    pub unread: u32,
    /// The peer announced urgent data this socket has not read past (a `recv(MSG_OOB |
    /// MSG_PEEK)` probe; a socket with `SO_OOBINLINE` always answers no).
    pub urgent: bool,
}

impl Pending {
    /// Nothing queued either way and no urgent data: the hand-off can read the socket's state.
    pub fn is_quiet(&self) -> bool {
        *self == Pending::default()
    }
}

/// Why [`read_in_repair`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SocketStateError {
    /// `TCP_REPAIR` was refused: the process lacks `CAP_NET_ADMIN` (`EPERM`), or the socket is
    /// not a connected TCP socket.
    #[error("cannot enter TCP repair mode: {0}")]
    EnterRepair(#[source] io::Error),
    /// A read failed; the socket is out of repair mode again.
    #[error("reading {what} in TCP repair mode: {source}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// The error of that read.
        #[source]
        source: io::Error,
    },
    /// A read failed and leaving repair mode failed too: the socket no longer takes data to
    /// send (a send fails), so its connection must be torn down.
    #[error(
        "reading {what} in TCP repair mode: {source}; leaving repair mode failed too: {leave}"
    )]
    StuckInRepair {
        /// What was being read.
        what: &'static str,
        /// The error of that read.
        #[source]
        source: io::Error,
        /// The error of `TCP_REPAIR` off.
        leave: io::Error,
    },
}

/// [`close_silently`] could not put the socket in repair mode; the socket is not closed (a
/// close now would send a FIN or a RST) and is handed back.
#[derive(Debug, thiserror::Error)]
#[error("cannot enter TCP repair mode for a silent close: {source}")]
pub struct NotSilenced {
    /// The socket, still open.
    pub socket: OwnedFd,
    /// The error of `TCP_REPAIR` on.
    #[source]
    pub source: io::Error,
}

/// Why a pair of sockets cannot go to the packet splice (the tunnel then stays where it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ineligible {
    /// A connection is not ESTABLISHED (it was reset, or a FIN arrived).
    #[error("the {} connection is not established (TCP state {state})", side_name(*.side))]
    NotEstablished {
        /// Which connection.
        side: Side,
        /// Its `tcpi_state`.
        state: u8,
    },
    /// One connection is IPv4 on the wire, the other IPv6: the data path rewrites headers in
    /// place and does not translate between IP versions.
    #[error("the client connection and the upstream connection use different IP versions")]
    Family,
    /// A connection has no timestamps: the data path needs them on both, since it translates
    /// TSval and TSecr and a segment cannot gain or lose the option in a rewrite.
    #[error("the {} connection did not negotiate TCP timestamps", side_name(*.0))]
    NoTimestamps(Side),
    /// A connection has no SACK: a SACK block from one peer would mean nothing to the other.
    #[error(
        "the {} connection did not negotiate selective acknowledgements",
        side_name(*.0)
    )]
    NoSack(Side),
    /// A connection has no window scaling: its windows stop at 64 KiB and the rescaling of
    /// window fields between the connections assumes a scale on both.
    #[error("the {} connection did not negotiate window scaling", side_name(*.0))]
    NoWindowScaling(Side),
    /// A peer announced urgent data not yet read past.
    #[error("the {} peer announced urgent data", side_name(*.0))]
    Urgent(Side),
    /// A peer may send segments larger than the other connection accepts.
    #[error(
        "the {} peer may send {largest}-byte segments, the other connection takes {accepted}",
        side_name(*.from)
    )]
    Mss {
        /// The peer whose segments are too large.
        from: Side,
        /// The largest payload it may send ([`SocketState::advertised_mss`] of its socket).
        largest: u32,
        /// What the other connection takes ([`SocketState::accepted_payload`] of the other
        /// socket).
        accepted: u32,
    },
}

impl Ineligible {
    /// A short, stable name for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            Ineligible::NotEstablished { .. } => "not_established",
            Ineligible::Family => "family",
            Ineligible::NoTimestamps(_) => "no_timestamps",
            Ineligible::NoSack(_) => "no_sack",
            Ineligible::NoWindowScaling(_) => "no_window_scaling",
            Ineligible::Urgent(_) => "urgent",
            Ineligible::Mss { .. } => "mss",
        }
    }
}

/// What is still queued in a connected socket (in or out of repair mode).
pub fn pending(fd: BorrowedFd<'_>) -> io::Result<Pending> {
    Ok(Pending {
        unacknowledged: ioctl_count(fd, libc::TIOCOUTQ)?,
        unsent: ioctl_count(fd, libc::SIOCOUTQNSD as libc::Ioctl)?,
        unread: ioctl_count(fd, libc::FIONREAD)?,
        urgent: urgent_pending(fd)?,
    })
}

/// Turns `TCP_REPAIR` on (`CAP_NET_ADMIN`) and reads the socket's state. Leaves the socket in
/// repair mode, where it sends no data (a send fails with `EINVAL`) but still acknowledges what
/// arrives (see the module docs): the caller then closes it with [`close_silently`] or calls
/// [`leave_repair`]. If a read fails, repair mode is left again before the error returns.
pub fn read_in_repair(fd: BorrowedFd<'_>) -> Result<SocketState, SocketStateError> {
    set_tcp_option(fd, libc::TCP_REPAIR, TCP_REPAIR_ON).map_err(SocketStateError::EnterRepair)?;
    read_repairing(fd).map_err(|Failed { what, source }| match leave_repair(fd) {
        Ok(()) => SocketStateError::Read { what, source },
        Err(leave) => SocketStateError::StuckInRepair {
            what,
            source,
            leave,
        },
    })
}

/// Turns `TCP_REPAIR` off without a window probe (`TCP_REPAIR_OFF_NO_WP`): nothing was changed
/// in repair mode, so the peer has nothing to learn, and a probe would be one more segment on
/// the wire. The socket then sends and receives as before.
pub fn leave_repair(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_tcp_option(fd, libc::TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
}

/// Closes a socket without a trace on the wire: in repair mode `tcp_close` goes through
/// `tcp_disconnect`, which skips the FIN and the RST (even for unread bytes) and drops the
/// socket without TIME_WAIT. The peer's connection lives on, carried by the packet splice.
///
/// Only the last reference to the socket closes it: a duplicate of the descriptor (io_uring's
/// fixed files, a request in flight) keeps the socket open, still in repair mode and silent.
/// Once closed, the kernel answers a packet of this connection that reaches its stack with a
/// RST (no socket matches): every packet must be rewritten before that.
pub fn close_silently(socket: OwnedFd) -> Result<(), NotSilenced> {
    match set_tcp_option(socket.as_fd(), libc::TCP_REPAIR, TCP_REPAIR_ON) {
        Ok(()) => {
            drop(socket);
            Ok(())
        }
        Err(source) => Err(NotSilenced { socket, source }),
    }
}

/// Whether two connections can be joined by the packet splice, `client` and `upstream` being
/// the proxy's sockets of a tunnel, read by [`read_in_repair`].
///
/// Enforced: both ESTABLISHED; the same IP version on the wire; timestamps, SACK and window
/// scaling on both (window scaling on both rather than "the same on both": the data path rescales
/// window fields, which needs a scale on each side, and a stack without scaling is rare enough to
/// leave to the userspace relay); no urgent data; and in each direction the peer's largest
/// segment ([`SocketState::advertised_mss`] of its socket) fits the other connection
/// ([`SocketState::accepted_payload`] of the other socket), so the data path never has to split
/// a segment. Not enforced: equal scales (rescaling a window only rounds it) and ECN (see
/// [`NegotiatedOptions::ecn`]).
pub fn eligibility(client: &SocketState, upstream: &SocketState) -> Result<(), Ineligible> {
    let sides = [(Side::Client, client), (Side::Upstream, upstream)];
    for (side, socket) in sides {
        if socket.state != TCP_ESTABLISHED {
            return Err(Ineligible::NotEstablished {
                side,
                state: socket.state,
            });
        }
    }
    if client.local.is_ipv4() != upstream.local.is_ipv4()
        || client.peer.is_ipv4() != upstream.peer.is_ipv4()
    {
        return Err(Ineligible::Family);
    }
    for (side, socket) in sides {
        options_suffice(side, socket)?;
    }
    segments_fit(Side::Client, client, upstream)?;
    segments_fit(Side::Upstream, upstream, client)
}

/// The per-connection requirements of [`eligibility`].
fn options_suffice(side: Side, socket: &SocketState) -> Result<(), Ineligible> {
    if !socket.options.timestamps {
        Err(Ineligible::NoTimestamps(side))
    } else if !socket.options.sack {
        Err(Ineligible::NoSack(side))
    } else if !socket.options.window_scaling {
        Err(Ineligible::NoWindowScaling(side))
    } else if socket.urgent {
        Err(Ineligible::Urgent(side))
    } else {
        Ok(())
    }
}

/// Whether the segments of the peer behind `from` fit the connection of `to`.
fn segments_fit(side: Side, from: &SocketState, to: &SocketState) -> Result<(), Ineligible> {
    let accepted = to.accepted_payload();
    if from.advertised_mss <= accepted {
        Ok(())
    } else {
        Err(Ineligible::Mss {
            from: side,
            largest: from.advertised_mss,
            accepted,
        })
    }
}

/// How the messages of [`Ineligible`] name a side.
fn side_name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Upstream => "upstream",
    }
}

/// A read in repair mode that failed, and what it was reading.
struct Failed {
    what: &'static str,
    source: io::Error,
}

/// Names the read of a result.
fn step<T>(what: &'static str, result: io::Result<T>) -> Result<T, Failed> {
    result.map_err(|source| Failed { what, source })
}

/// The reads of [`read_in_repair`], the socket being in repair mode.
fn read_repairing(fd: BorrowedFd<'_>) -> Result<SocketState, Failed> {
    let socket = SockRef::from(&fd);
    let local = step("the local address", socket.local_addr())?;
    let peer = step("the peer address", socket.peer_addr())?;
    let info = step("TCP_INFO", sys::tcp_info(fd))?;
    let send_next = step("the send sequence", queue_seq(fd, TCP_SEND_QUEUE))?;
    let receive_next = step("the receive sequence", queue_seq(fd, TCP_RECV_QUEUE))?;
    // In repair mode TCP_MAXSEG gives the MSS the peer announced, not the current mss_cache.
    let peer_mss = step("TCP_MAXSEG", get_tcp_u32(fd, libc::TCP_MAXSEG))?;
    // No queue selected: in repair mode a send would otherwise go straight into the selected
    // queue (into the receive queue, even) without reaching the wire.
    step(
        "TCP_REPAIR_QUEUE",
        set_tcp_option(fd, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE),
    )?;
    Ok(SocketState {
        local: step("the local address", wire_address(local.as_socket()))?,
        peer: step("the peer address", wire_address(peer.as_socket()))?,
        send_next,
        receive_next,
        timestamp: step("TCP_TIMESTAMP", get_tcp_u32(fd, libc::TCP_TIMESTAMP))?,
        window: step("TCP_REPAIR_WINDOW", repair_window(fd))?,
        options: negotiated_options(info.tcpi_options),
        // `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4` in <linux/tcp.h>: the first bit-field
        // takes the low bits on the little- and big-endian ABIs Linux has (GCC's layout).
        send_scale: bit_field(info.tcpi_snd_rcv_wscale, 0),
        receive_scale: bit_field(info.tcpi_snd_rcv_wscale, 4),
        send_mss: info.tcpi_snd_mss,
        receive_mss: info.tcpi_rcv_mss,
        advertised_mss: info.tcpi_advmss,
        peer_mss,
        path_mtu: info.tcpi_pmtu,
        state: info.tcpi_state,
        urgent: step("urgent data", urgent_pending(fd))?,
    })
}

/// A 4-bit field of `byte`: the little-endian layout puts the first field in the low bits, the
/// big-endian one in the high bits.
fn bit_field(byte: u8, little_endian_shift: u32) -> u8 {
    let shift = if cfg!(target_endian = "little") {
        little_endian_shift
    } else {
        4 - little_endian_shift
    };
    (byte >> shift) & 0x0f
}

/// The address as the packets carry it: IPv4-mapped IPv6 addresses become IPv4.
fn wire_address(address: Option<SocketAddr>) -> io::Result<SocketAddr> {
    match address {
        Some(SocketAddr::V6(v6)) => Ok(match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => SocketAddr::V6(v6),
        }),
        Some(v4) => Ok(v4),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an IP socket",
        )),
    }
}

/// The flags of `tcpi_options`.
fn negotiated_options(bits: u8) -> NegotiatedOptions {
    /// `TCPI_OPT_USEC_TS`.
    const USEC_TS: u8 = 64;
    NegotiatedOptions {
        timestamps: bits & TCPI_OPT_TIMESTAMPS != 0,
        usec_timestamps: bits & USEC_TS != 0,
        sack: bits & TCPI_OPT_SACK != 0,
        window_scaling: bits & TCPI_OPT_WSCALE != 0,
        ecn: bits & TCPI_OPT_ECN != 0,
    }
}

/// `TCP_QUEUE_SEQ` of `queue` (repair mode): `write_seq` of the send queue, `rcv_nxt` of the
/// receive queue.
fn queue_seq(fd: BorrowedFd<'_>, queue: libc::c_int) -> io::Result<u32> {
    set_tcp_option(fd, libc::TCP_REPAIR_QUEUE, queue)?;
    get_tcp_u32(fd, libc::TCP_QUEUE_SEQ)
}

/// `TCP_REPAIR_WINDOW` (repair mode only: `EPERM` otherwise).
fn repair_window(fd: BorrowedFd<'_>) -> io::Result<RepairWindow> {
    let mut window = RepairWindow::default();
    // The kernel wants exactly the size of its struct (`EINVAL` otherwise).
    let mut len = std::mem::size_of::<RepairWindow>() as libc::socklen_t;
    // SAFETY: `window` is a repr(C) struct of five u32, the layout of `struct
    // tcp_repair_window`, valid for writes of `len` bytes; `len` is valid for writes.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            (&mut window as *mut RepairWindow).cast(),
            &mut len,
        )
    })?;
    Ok(window)
}

/// Whether the peer announced urgent data this socket has not read past: `recv(MSG_OOB |
/// MSG_PEEK)` answers the urgent byte (arrived), `EAGAIN` (announced, not arrived yet), 0 (not
/// arrived and never will: the peer closed) or `EINVAL` (none, or already read). It works in
/// repair mode too (the kernel handles `MSG_OOB` before it looks at repair mode).
fn urgent_pending(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut byte = 0u8;
    // SAFETY: `byte` is valid for writes of 1 byte for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_OOB | libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL) => Ok(false),
        _ if error.kind() == io::ErrorKind::WouldBlock => Ok(true),
        _ => Err(error),
    }
}

/// An ioctl that answers a byte count in an int.
fn ioctl_count(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<u32> {
    let mut count: libc::c_int = 0;
    // SAFETY: the requests used here write one int, and `count` is valid for that write.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut count as *mut libc::c_int) })?;
    u32::try_from(count).map_err(|_| io::Error::other(format!("negative byte count {count}")))
}

/// `setsockopt(IPPROTO_TCP, option, value)` with an int.
fn set_tcp_option(fd: BorrowedFd<'_>, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is valid for reads of an int for the duration of the call.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
}

/// `getsockopt(IPPROTO_TCP, option)` of an int option read as u32 (sequence numbers and
/// timestamps use all 32 bits).
fn get_tcp_u32(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<u32> {
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `value` is valid for writes of `len` bytes, `len` for writes.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&mut value as *mut u32).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// TCP_REPAIR needs CAP_NET_ADMIN; tests that use it skip without root.
    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A connected pair on loopback: (the connecting end, the accepted end).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let connecting =
            TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        (connecting, accepted)
    }

    /// Sends `bytes` from `from` and reads them at `to`.
    fn pass(from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]) {
        from.write_all(bytes).expect("write");
        let mut read = vec![0; bytes.len()];
        to.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        to.read_exact(&mut read).expect("read");
        assert_eq!(read, bytes);
    }

    /// Polls `pending` of `socket` until `done` holds (5 s at most).
    fn wait_pending(socket: &TcpStream, done: impl Fn(&Pending) -> bool) -> Pending {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = pending(socket.as_fd()).expect("pending");
            if done(&now) || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn tcp_state(socket: &TcpStream) -> u8 {
        sys::tcp_info(socket.as_fd()).expect("tcp_info").tcpi_state
    }

    #[test]
    fn a_fresh_connection_reads_consistently_and_works_after_repair() {
        if !root() {
            return;
        }
        let (mut a, mut b) = pair();
        pass(&mut a, &mut b, b"hello from a");
        pass(&mut b, &mut a, b"and hello from b");
        assert!(wait_pending(&a, Pending::is_quiet).is_quiet());
        assert!(wait_pending(&b, Pending::is_quiet).is_quiet());

        let state_a = read_in_repair(a.as_fd()).expect("repair a");
        let state_b = read_in_repair(b.as_fd()).expect("repair b");
        assert_eq!(state_a.send_next, state_b.receive_next);
        assert_eq!(state_a.receive_next, state_b.send_next);
        assert_eq!(state_a.local, state_b.peer);
        assert_eq!(state_a.peer, state_b.local);
        for state in [&state_a, &state_b] {
            assert_eq!(state.state, TCP_ESTABLISHED);
            assert!(state.options.timestamps && state.options.sack, "{state:?}");
            assert!(state.options.window_scaling, "{state:?}");
            assert!(state.send_scale <= 14 && state.receive_scale <= 14);
            assert!(
                state.send_mss >= 536 && state.advertised_mss >= 536,
                "{state:?}"
            );
            // Loopback: the MTU (65535 for IPv4) limits both ends alike.
            assert!(state.peer_mss > state.advertised_mss, "{state:?}");
            assert_eq!(state.accepted_payload(), state.advertised_mss, "{state:?}");
            assert!(!state.urgent);
            // Everything received was acknowledged: the announced window starts at or before
            // the next byte expected, and the window updates came from segments received.
            assert!(state.receive_next.wrapping_sub(state.window.rcv_wup) < 1 << 30);
            assert!(state.receive_next.wrapping_sub(state.window.snd_wl1) < 1 << 30);
            assert!(state.window.snd_wnd > 0 && state.window.rcv_wnd > 0);
            assert!(state.window.max_window >= state.window.snd_wnd);
        }
        assert_eq!(state_a.send_scale, state_b.receive_scale);
        assert_eq!(state_a.receive_scale, state_b.send_scale);
        assert_eq!(eligibility(&state_a, &state_b), Ok(()));
        // Reading again in repair mode gives the same state (the hand-off's second look).
        let again = read_in_repair(a.as_fd()).expect("repair a again");
        assert_eq!(
            (again.send_next, again.receive_next, again.state),
            (state_a.send_next, state_a.receive_next, state_a.state)
        );

        leave_repair(a.as_fd()).expect("leave a");
        leave_repair(b.as_fd()).expect("leave b");
        pass(&mut a, &mut b, b"still there");
        pass(&mut b, &mut a, b"still here");
    }

    #[test]
    fn unread_bytes_are_pending() {
        let (mut a, b) = pair();
        a.write_all(b"unread").expect("write");
        let now = wait_pending(&b, |pending| pending.unread == 6);
        assert_eq!(now.unread, 6);
        assert!(!now.is_quiet());
    }

    #[test]
    fn bytes_the_peer_has_no_room_for_are_unsent_and_unacknowledged() {
        let (a, b) = pair();
        SockRef::from(&b)
            .set_recv_buffer_size(4096)
            .expect("SO_RCVBUF");
        a.set_nonblocking(true).expect("nonblocking");
        let chunk = [7u8; 65536];
        let mut written = 0;
        while written < 64 << 20 {
            match (&a).write(&chunk) {
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => panic!("write: {error}"),
            }
        }
        let now = wait_pending(&a, |pending| pending.unsent > 0);
        assert!(now.unsent > 0, "{now:?}");
        assert!(now.unacknowledged >= now.unsent, "{now:?}");
        assert!(!now.is_quiet());
    }

    #[test]
    fn urgent_data_is_pending_until_read_past() {
        if !root() {
            return;
        }
        let (mut a, mut b) = pair();
        // SAFETY: the buffer is valid for reads of 3 bytes.
        let sent = unsafe { libc::send(a.as_raw_fd(), b"ab!".as_ptr().cast(), 3, libc::MSG_OOB) };
        assert_eq!(sent, 3);
        assert!(wait_pending(&b, |pending| pending.urgent).urgent);
        let state = read_in_repair(b.as_fd()).expect("repair");
        leave_repair(b.as_fd()).expect("leave");
        assert!(state.urgent);
        assert_eq!(
            eligibility(&state, &state),
            Err(Ineligible::Urgent(Side::Client))
        );
        // The urgent byte is out of band: the stream holds the two bytes before it, and once
        // they are read nothing is unread, yet the urgent byte still waits.
        let mut read = [0u8; 2];
        b.read_exact(&mut read).expect("read");
        assert_eq!(&read, b"ab");
        let now = pending(b.as_fd()).expect("pending");
        assert_eq!((now.unread, now.urgent), (0, true));
        // Reading past the mark forgets it.
        pass(&mut a, &mut b, b"cd");
        assert!(wait_pending(&b, Pending::is_quiet).is_quiet());
    }

    #[test]
    fn a_silent_close_sends_neither_fin_nor_reset() {
        if !root() {
            return;
        }
        let (a, mut b) = pair();
        // Bytes `a` never reads: a plain close would answer them with a RST.
        b.write_all(b"never read").expect("write");
        assert!(wait_pending(&b, Pending::is_quiet).is_quiet());
        close_silently(OwnedFd::from(a)).expect("close");
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let error = b.read(&mut [0u8; 16]).expect_err("neither data nor FIN");
        assert!(
            matches!(
                error.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{error}"
        );
        assert_eq!(tcp_state(&b), TCP_ESTABLISHED);

        // The same without repair mode: the unread bytes make the close a reset.
        let (a, mut b) = pair();
        b.write_all(b"never read").expect("write");
        assert!(wait_pending(&b, Pending::is_quiet).is_quiet());
        drop(a);
        b.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let error = b.read(&mut [0u8; 16]).expect_err("a reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
    }

    #[test]
    fn a_socket_in_repair_mode_still_takes_data_and_a_fin() {
        if !root() {
            return;
        }
        let (mut a, mut b) = pair();
        let before = read_in_repair(a.as_fd()).expect("repair");
        b.write_all(b"late").expect("write");
        b.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let deadline = Instant::now() + Duration::from_secs(5);
        while tcp_state(&a) == TCP_ESTABLISHED && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Acknowledged by `a` although it is in repair mode: the second look sees it.
        assert!(wait_pending(&b, Pending::is_quiet).is_quiet());
        let after = read_in_repair(a.as_fd()).expect("repair again");
        assert_eq!(after.receive_next, before.receive_next.wrapping_add(4 + 1));
        assert_ne!(after.state, TCP_ESTABLISHED);
        let reason = eligibility(&after, &before).expect_err("closing");
        assert_eq!(reason.label(), "not_established");
        leave_repair(a.as_fd()).expect("leave");
        let mut read = Vec::new();
        a.read_to_end(&mut read).expect("read");
        assert_eq!(read, b"late");
    }

    /// A state both checks accept: IPv4, everything negotiated, 1448-byte segments (an
    /// Ethernet path).
    fn eligible(local: &str, peer: &str) -> SocketState {
        SocketState {
            local: local.parse().expect("address"),
            peer: peer.parse().expect("address"),
            send_next: 1000,
            receive_next: 2000,
            timestamp: 3000,
            window: RepairWindow::default(),
            options: NegotiatedOptions {
                timestamps: true,
                usec_timestamps: false,
                sack: true,
                window_scaling: true,
                ecn: false,
            },
            send_scale: 7,
            receive_scale: 7,
            send_mss: 1448,
            receive_mss: 1448,
            advertised_mss: 1448,
            peer_mss: 1460,
            path_mtu: 1500,
            state: TCP_ESTABLISHED,
            urgent: false,
        }
    }

    fn client() -> SocketState {
        eligible("192.0.2.1:443", "198.51.100.7:50000")
    }

    fn upstream() -> SocketState {
        eligible("10.0.0.1:40000", "10.0.0.2:8080")
    }

    /// The reason `change` to one side's state gives.
    fn rejection(side: Side, change: impl FnOnce(&mut SocketState)) -> Ineligible {
        let (mut client, mut upstream) = (client(), upstream());
        change(match side {
            Side::Client => &mut client,
            Side::Upstream => &mut upstream,
        });
        eligibility(&client, &upstream).expect_err("ineligible")
    }

    #[test]
    fn eligibility_accepts_a_matching_pair() {
        assert_eq!(eligibility(&client(), &upstream()), Ok(()));
        // ECN on one side only, different scales: still eligible.
        let mut client = client();
        client.options.ecn = true;
        client.send_scale = 9;
        assert_eq!(eligibility(&client, &upstream()), Ok(()));
        // send_mss (half the peer's largest window at most) does not count.
        let mut upstream = upstream();
        upstream.send_mss = 500;
        assert_eq!(eligibility(&client, &upstream), Ok(()));
    }

    #[test]
    fn accepted_payload_takes_the_smaller_of_mss_and_mtu() {
        let mut state = client();
        assert_eq!(state.accepted_payload(), 1448);
        state.peer_mss = 1380;
        assert_eq!(state.accepted_payload(), 1368);
        state.local = "[2001:db8::1]:443".parse().expect("address");
        state.peer_mss = 1440;
        assert_eq!(state.accepted_payload(), 1428);
        state.options.timestamps = false;
        assert_eq!(state.accepted_payload(), 1440);
    }

    #[test]
    fn eligibility_rejects_each_reason() {
        let reason = rejection(Side::Upstream, |state| state.state = 7);
        assert_eq!(
            reason,
            Ineligible::NotEstablished {
                side: Side::Upstream,
                state: 7
            }
        );
        assert_eq!(reason.label(), "not_established");

        let reason = rejection(Side::Upstream, |state| {
            state.local = "[2001:db8::1]:40000".parse().expect("address");
            state.peer = "[2001:db8::2]:8080".parse().expect("address");
        });
        assert_eq!((reason, reason.label()), (Ineligible::Family, "family"));

        let reason = rejection(Side::Client, |state| state.options.timestamps = false);
        assert_eq!(reason, Ineligible::NoTimestamps(Side::Client));
        assert_eq!(reason.label(), "no_timestamps");

        let reason = rejection(Side::Upstream, |state| state.options.sack = false);
        assert_eq!(reason, Ineligible::NoSack(Side::Upstream));
        assert_eq!(reason.label(), "no_sack");

        let reason = rejection(Side::Client, |state| state.options.window_scaling = false);
        assert_eq!(reason, Ineligible::NoWindowScaling(Side::Client));
        assert_eq!(reason.label(), "no_window_scaling");

        let reason = rejection(Side::Upstream, |state| state.urgent = true);
        assert_eq!(reason, Ineligible::Urgent(Side::Upstream));
        assert_eq!(reason.label(), "urgent");

        // The upstream takes smaller segments than the client may send.
        let reason = rejection(Side::Upstream, |state| state.peer_mss = 1400);
        assert_eq!(
            reason,
            Ineligible::Mss {
                from: Side::Client,
                largest: 1448,
                accepted: 1388
            }
        );
        assert_eq!(reason.label(), "mss");
        // And the other way: the path to the client (a tunnel, say) takes smaller segments
        // than the upstream may send.
        let reason = rejection(Side::Client, |state| state.path_mtu = 1440);
        assert!(matches!(
            reason,
            Ineligible::Mss {
                from: Side::Upstream,
                ..
            }
        ));
        assert_eq!(
            reason.to_string(),
            "the upstream peer may send 1448-byte segments, the other connection takes 1388"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4_on_the_wire() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:443".parse().expect("address");
        assert_eq!(
            wire_address(Some(mapped)).expect("address"),
            "192.0.2.1:443".parse::<SocketAddr>().expect("address")
        );
        let v6: SocketAddr = "[2001:db8::1]:443".parse().expect("address");
        assert_eq!(wire_address(Some(v6)).expect("address"), v6);
    }
}
