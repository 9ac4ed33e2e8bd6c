//! The messages between a running process and its successor, over a `SOCK_SEQPACKET` Unix
//! socket pair: one JSON message per packet, the descriptors it names attached
//! (`SCM_RIGHTS`). A packet keeps its boundaries and its descriptors together, and a peer that
//! dies reads as the end of the stream, so neither side can wait forever on the other.
//!
//! The order: the old process sends [`Message::Offer`] (with the admin socket and the kernel
//! maps), then [`Message::Listeners`] until every listening socket is sent; the successor
//! answers [`Message::Ready`] once it serves; the old process then sends
//! [`Message::Tunnels`] as its workers let tunnels go, and [`Message::Done`] last.

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::connection::HandedTunnel;
use crate::sys;

/// Largest message (a batch of tunnels is far smaller).
const MAX_MESSAGE: usize = 1 << 20;

/// Most tunnels in one [`Message::Tunnels`] (two descriptors each, under the kernel's limit
/// per message).
pub const TUNNELS_PER_MESSAGE: usize = 100;

/// Most listening sockets in one [`Message::Listeners`].
pub const LISTENERS_PER_MESSAGE: usize = 200;

/// What the old process offers first. Descriptors attached, in order: the admin socket (if
/// `admin`), then the kernel maps (if `kernel`: `PEER`, `BRIDGE`, `ACTIVITY`, `PAUSED`,
/// `PRESSURE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The old process's id (for the log).
    pub pid: u32,
    /// Listening sockets that follow in [`Message::Listeners`].
    pub listeners: usize,
    /// The admin listener's address.
    pub admin: Option<SocketAddr>,
    /// The kernel program, identified by a hash of its object: a successor with the same
    /// object adopts its maps (and the spliced tunnels in them).
    pub kernel: Option<u64>,
    /// The pools' servers set at run time (`PUT /upstreams/NAME`), so they outlive the
    /// process (empty from a predecessor that had none, or did not say).
    #[serde(default)]
    pub pools: crate::upstream::membership::RunTimeServers,
}

/// A handed tunnel's kernel-path state (its sockets are in the maps the successor adopted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSockets {
    /// Socket cookies.
    pub client_cookie: u64,
    /// The upstream socket's cookie.
    pub upstream_cookie: u64,
    /// Bytes userspace queued on each before the splice.
    pub client_baseline: u64,
    /// The same for the upstream socket.
    pub upstream_baseline: u64,
    /// The owner tag in the sockets' activity records (written by the process that spliced
    /// them; pressure reports carry it).
    pub owner: u64,
}

/// A tunnel and its kernel-path state; its two descriptors (client, upstream) are attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handed {
    /// The connection's record.
    pub tunnel: HandedTunnel,
    /// Spliced tunnels: where they are in the maps.
    pub kernel: Option<KernelSockets>,
}

/// One packet's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Old → successor, first.
    Offer(Offer),
    /// Old → successor: listening sockets, one descriptor per address, in order.
    Listeners(Vec<SocketAddr>),
    /// Successor → old: it serves (its listeners accept).
    Ready {
        /// The successor's process id.
        pid: u32,
        /// It adopted the kernel maps: spliced tunnels may come.
        kernel: bool,
    },
    /// Old → successor: tunnels, two descriptors each (client, upstream), in order.
    Tunnels(Vec<Handed>),
    /// Old → successor: nothing more comes.
    Done {
        /// Tunnels handed over in all.
        handed: u64,
    },
}

/// Why the exchange with the other process failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed.
    #[error("upgrade socket: {0}")]
    Io(#[from] std::io::Error),
    /// A message did not parse.
    #[error("upgrade socket: a message does not parse: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A message came with another number of descriptors than it names.
    #[error("upgrade socket: {got} descriptors with a message that names {expected}")]
    Descriptors {
        /// Named by the message.
        expected: usize,
        /// Attached.
        got: usize,
    },
    /// The other process closed its end (it exited).
    #[error("the other process closed the upgrade socket")]
    Closed,
    /// Nothing came in time.
    #[error("the other process did not answer within {0:?}")]
    TimedOut(Duration),
}

/// One end of the upgrade socket.
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
}

impl Channel {
    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn new(socket: OwnedFd) -> Channel {
        Channel { socket }
    }

    /// Sends `message` with `fds` attached.
    pub fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        let bytes = serde_json::to_vec(message)?;
        sys::send_with_fds(self.socket.as_fd(), &bytes, fds)?;
        Ok(())
    }

    /// The next message and its descriptors, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<(Message, Vec<OwnedFd>), WireError> {
        use std::os::fd::AsRawFd as _;
        if !sys::wait_readable(self.socket.as_raw_fd(), timeout) {
            return Err(WireError::TimedOut(timeout));
        }
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let (len, fds) = sys::recv_with_fds(self.socket.as_fd(), &mut buffer)?;
        if len == 0 && fds.is_empty() {
            return Err(WireError::Closed);
        }
        let message = serde_json::from_slice(&buffer[..len])?;
        let expected = descriptors_named(&message);
        if let Some(expected) = expected.filter(|&expected| expected != fds.len()) {
            return Err(WireError::Descriptors {
                expected,
                got: fds.len(),
            });
        }
        Ok((message, fds))
    }
}

/// How many descriptors `message` comes with (`None`: it depends on the offer, checked by
/// the receiver).
fn descriptors_named(message: &Message) -> Option<usize> {
    match message {
        Message::Offer(_) => None,
        Message::Listeners(addrs) => Some(addrs.len()),
        Message::Tunnels(tunnels) => Some(tunnels.len() * 2),
        Message::Ready { .. } | Message::Done { .. } => Some(0),
    }
}

/// The descriptors an offer comes with.
pub fn offer_descriptors(offer: &Offer) -> usize {
    usize::from(offer.admin.is_some()) + if offer.kernel.is_some() { 5 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::HandedPath;

    fn pair() -> (Channel, Channel) {
        let (a, b) = sys::seqpacket_pair().expect("socketpair");
        (Channel::new(a), Channel::new(b))
    }

    fn tunnel(index: u64) -> Handed {
        Handed {
            tunnel: HandedTunnel {
                log_id: index,
                client: "127.0.0.1:4000".parse().expect("addr"),
                upstream: Some("127.0.0.1:9001".parse().expect("addr")),
                started_ns: 5,
                host: "example.com".into(),
                path: "/chat".into(),
                method: "GET".into(),
                route: Some((None, Some("/chat".into()))),
                idle_ns: 60_000_000_000,
                path_state: HandedPath::Relayed {
                    bytes_up: 1,
                    bytes_down: 2,
                    last_activity_ns: 3,
                    promote_at_ns: u64::MAX,
                    frames: Default::default(),
                },
            },
            kernel: None,
        }
    }

    #[test]
    fn tunnels_arrive_with_their_sockets_in_order() {
        let (old, new) = pair();
        let sockets: Vec<OwnedFd> = (0..4).map(|_| sys::eventfd().expect("eventfd")).collect();
        let message = Message::Tunnels(vec![tunnel(1), tunnel(2)]);
        let borrowed: Vec<BorrowedFd<'_>> = sockets.iter().map(|fd| fd.as_fd()).collect();
        old.send(&message, &borrowed).expect("send");
        let (got, fds) = new.recv(Duration::from_secs(1)).expect("recv");
        assert_eq!(got, message);
        assert_eq!(fds.len(), 4);
        // The received descriptors are the same open files: a write to one reads on the other.
        use std::os::fd::AsRawFd as _;
        sys::wake(sockets[2].as_raw_fd());
        assert!(sys::wait_readable(
            fds[2].as_raw_fd(),
            Duration::from_secs(1)
        ));
        assert!(!sys::wait_readable(fds[1].as_raw_fd(), Duration::ZERO));
    }

    #[test]
    fn a_message_with_the_wrong_descriptors_is_refused() {
        let (old, new) = pair();
        let socket = sys::eventfd().expect("eventfd");
        old.send(&Message::Tunnels(vec![tunnel(1)]), &[socket.as_fd()])
            .expect("send");
        assert!(matches!(
            new.recv(Duration::from_secs(1)),
            Err(WireError::Descriptors {
                expected: 2,
                got: 1
            })
        ));
    }

    #[test]
    fn a_peer_that_goes_away_ends_the_wait_at_once() {
        let (old, new) = pair();
        drop(old);
        assert!(matches!(
            new.recv(Duration::from_secs(5)),
            Err(WireError::Closed)
        ));
        let (_old, new) = pair();
        assert!(matches!(
            new.recv(Duration::from_millis(10)),
            Err(WireError::TimedOut(_))
        ));
    }
}
