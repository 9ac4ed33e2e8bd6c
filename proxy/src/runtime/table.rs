//! A worker's connections: slots with generations, each holding the lifecycle machine and,
//! while it has sockets, the boxed I/O state of its two sockets.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::packet::{HandedFlows, PacketState};
use super::ring::ConnectArgs;
use super::splice::SplicedSockets;
use super::stream::ClientStream;
use crate::connection::{Connection, Side};
use crate::services::Services;
use crate::sys;

/// Bytes being written to one socket.
#[derive(Debug)]
pub enum Payload {
    /// Bytes the connection produced (an answer, a request, early bytes).
    Owned(Vec<u8>),
    /// A relay buffer from the worker's pool.
    Pooled(Box<[u8]>),
}

/// A send in flight: its bytes and how far the kernel has taken them.
///
/// The offsets are `u32` so that each side of every connection carries 8 bytes less: a send
/// is a relay buffer (`limits.relay_buffer`, at most 16 MiB), a request or answer head, or the
/// bytes a client sent early (about `MAX_UNREAD_BEFORE_SPLICE`, 1 MiB), all far below 4 GiB.
#[derive(Debug)]
pub struct Outgoing {
    /// The bytes.
    pub data: Payload,
    /// Bytes already sent.
    pos: u32,
    /// Bytes to send in all.
    len: u32,
}

impl Outgoing {
    /// Sends all of `bytes`.
    pub fn owned(bytes: Vec<u8>) -> Outgoing {
        let len = send_len(bytes.len());
        Outgoing {
            data: Payload::Owned(bytes),
            pos: 0,
            len,
        }
    }

    /// Sends the first `len` bytes of a pooled buffer.
    pub fn pooled(buffer: Box<[u8]>, len: usize) -> Outgoing {
        Outgoing {
            data: Payload::Pooled(buffer),
            pos: 0,
            len: send_len(len),
        }
    }

    /// What is left to send.
    pub fn remaining(&self) -> &[u8] {
        let bytes: &[u8] = match &self.data {
            Payload::Owned(v) => v,
            Payload::Pooled(b) => b,
        };
        &bytes[self.pos as usize..self.len as usize]
    }

    /// The kernel took `sent` more bytes; true once everything is sent.
    pub fn advance(&mut self, sent: usize) -> bool {
        // Never more than `remaining()`, which fits: the kernel sends at most what it is given.
        let sent = u32::try_from(sent).unwrap_or(u32::MAX);
        self.pos = self.pos.saturating_add(sent).min(self.len);
        self.pos == self.len
    }
}

/// A send's length as an [`Outgoing`] keeps it. Sends are far below 4 GiB (see [`Outgoing`]),
/// so the saturation is never reached; were it reached, the send would be cut short rather
/// than reading out of bounds.
fn send_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// What a side's readiness means now (set by the action that armed the poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Intent {
    /// Nothing is waited for.
    #[default]
    None,
    /// Read and hand the bytes to the connection.
    Read,
    /// Kernel path: peek at the upstream's response.
    Peek,
    /// Relay: the connection wants the next chunk from this side.
    Forward,
    /// Kernel path: look at a spliced socket.
    WatchSpliced,
}

impl Intent {
    /// What a poll for this intent waits for. A spliced socket is watched for a FIN or an
    /// error only: the kernel wakes its readers for every skb the splice program moves, and a
    /// poll for bytes would complete on each (bytes that stay on it are reported by the
    /// program instead).
    pub fn poll_events(self) -> libc::c_short {
        match self {
            Intent::WatchSpliced => libc::POLLRDHUP,
            _ => libc::POLLIN | libc::POLLRDHUP,
        }
    }
}

/// One socket of a connection and the operations pending on it.
#[derive(Debug, Default)]
pub struct SideIo {
    /// The socket (the upstream's only once a connect started).
    pub fd: Option<OwnedFd>,
    /// A readiness poll is in flight.
    pub polling: bool,
    /// What the poll is for.
    pub intent: Intent,
    /// The poll in flight was removed on purpose (it waited for the wrong events): its
    /// `ECANCELED` is not a failure.
    pub poll_removed: bool,
    /// The send in flight: it owns its bytes until its completion arrives.
    out: Option<Outgoing>,
    /// The connection waits for `on_sent` of this side.
    pub owes_sent: bool,
}

impl SideIo {
    /// A side with this socket and nothing in flight.
    pub fn with(fd: OwnedFd) -> SideIo {
        SideIo {
            fd: Some(fd),
            ..SideIo::default()
        }
    }

    /// The raw descriptor, or -1.
    pub fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// Whether a send is in flight.
    pub fn sending(&self) -> bool {
        self.out.is_some()
    }

    /// Takes `out` as the side's send; refused (given back) while another is in flight.
    pub fn begin_send(&mut self, out: Outgoing) -> Result<&Outgoing, Outgoing> {
        if self.out.is_some() {
            return Err(out);
        }
        Ok(self.out.insert(out))
    }

    /// The send in flight.
    pub fn in_flight(&mut self) -> Option<&mut Outgoing> {
        self.out.as_mut()
    }

    /// Ends the send in flight, giving back its bytes.
    pub fn end_send(&mut self) -> Option<Outgoing> {
        self.out.take()
    }
}

/// What only a connection with sockets needs: the two sockets, the operations pending on them
/// and the client's stream. Boxed in its [`Entry`], so that a record without sockets (a
/// packet-spliced tunnel once its sockets are closed, or one adopted from a previous process)
/// carries none of it: see [`Entry::drop_io`].
#[derive(Debug)]
pub struct EntryIo {
    /// The accepted socket.
    pub client: SideIo,
    /// The upstream socket.
    pub upstream: SideIo,
    /// Plain or TLS bytes to and from the client.
    pub stream: ClientStream,
    /// An in-flight connect's arguments (read by the kernel at submission).
    pub connect: Option<Box<ConnectArgs>>,
    /// A receive from the upstream in flight: it owns its buffer until its completion
    /// arrives. Here rather than in [`SideIo`]: the client side never has one.
    pub receiving: Option<Box<[u8]>>,
    /// Kernel path: the spliced sockets' cookies and baselines. Boxed: set on one data path
    /// only.
    pub spliced: Option<Box<SplicedSockets>>,
}

impl EntryIo {
    /// The I/O state of a connection with these two sides and nothing in flight.
    pub fn new(client: SideIo, upstream: SideIo, stream: ClientStream) -> Box<EntryIo> {
        Box::new(EntryIo {
            client,
            upstream,
            stream,
            connect: None,
            receiving: None,
            spliced: None,
        })
    }

    /// One side's I/O state.
    pub fn side(&mut self, side: Side) -> &mut SideIo {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }

    /// Both sockets' raw descriptors, -1 for a missing one.
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.client.raw(), self.upstream.raw()]
    }

    /// Reads what `side` has: the client's plaintext (through its stream), the upstream's
    /// bytes as they are.
    pub fn read(&mut self, side: Side, buffer: &mut [u8]) -> io::Result<usize> {
        let fd = self.side(side).raw();
        match side {
            Side::Client => self.stream.read(fd, buffer),
            Side::Upstream => sys::recv(fd, buffer),
        }
    }
}

/// A connection: its lifecycle record, and the I/O state of its sockets while it has them.
#[derive(Debug)]
pub struct Entry {
    /// The lifecycle machine.
    pub conn: Connection,
    /// The generation of the services the connection was accepted under (a reload publishes
    /// the next one for new connections): its route and pool indices point into these.
    pub services: Arc<Services>,
    /// The sockets and their operations; `None` once the connection has no socket left (see
    /// [`Entry::drop_io`]). Code that expects sockets treats a missing one as a socket gone,
    /// as it treats a side without a descriptor.
    io: Option<Box<EntryIo>>,
    /// Operations submitted and not yet completed; the entry is freed only at zero.
    pub inflight: u32,
    /// The earliest reminder armed in the wheel for this connection.
    pub armed_ns: u64,
    /// Packet path: the reserved port the upstream connection took and, once handed over,
    /// the tunnel's flows (one allocation for both; `None` on the other data paths).
    pub packet: Option<Box<PacketState>>,
    /// TLS: the handshake is counted in the worker's handshakes in progress.
    pub counted_handshake: bool,
    /// Binary upgrade: the tunnel is being let go to the successor (its waits are being
    /// removed).
    pub handing_over: bool,
}

impl Entry {
    /// A new connection's entry: nothing in flight, no reminder armed. `io` is `None` for a
    /// record without sockets.
    pub fn new(
        conn: Connection,
        services: Arc<Services>,
        io: Option<Box<EntryIo>>,
        packet: Option<Box<PacketState>>,
        counted_handshake: bool,
    ) -> Entry {
        Entry {
            conn,
            services,
            io,
            inflight: 0,
            armed_ns: u64::MAX,
            packet,
            counted_handshake,
            handing_over: false,
        }
    }

    /// The sockets' I/O state (`None`: the connection has no socket left).
    pub fn io(&self) -> Option<&EntryIo> {
        self.io.as_deref()
    }

    /// The sockets' I/O state, to change (`None`: the connection has no socket left).
    pub fn io_mut(&mut self) -> Option<&mut EntryIo> {
        self.io.as_deref_mut()
    }

    /// One side's I/O state (`None`: the connection has no socket left).
    pub fn side(&mut self, side: Side) -> Option<&mut SideIo> {
        self.io_mut().map(|io| io.side(side))
    }

    /// Both sockets' raw descriptors, -1 for a missing one.
    pub fn raw_fds(&self) -> [RawFd; 2] {
        self.io().map_or([-1, -1], EntryIo::raw_fds)
    }

    /// Reads what `side` has (see [`EntryIo::read`]). Without sockets it fails as a read of a
    /// side without a descriptor does.
    pub fn read(&mut self, side: Side, buffer: &mut [u8]) -> io::Result<usize> {
        match self.io_mut() {
            Some(io) => io.read(side, buffer),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Whether the client's stream is TLS (false without sockets).
    pub fn is_tls(&self) -> bool {
        self.io().is_some_and(|io| io.stream.is_tls())
    }

    /// Takes the sockets' I/O state out: from now on the entry is a record without sockets.
    /// Only with nothing in flight (an operation in flight points into this state: a send's
    /// bytes, a receive's buffer, a connect's arguments); the caller closes the sockets and
    /// gives the buffers back.
    pub fn drop_io(&mut self) -> Option<Box<EntryIo>> {
        debug_assert_eq!(
            self.inflight, 0,
            "the I/O state of a connection with operations in flight"
        );
        self.io.take()
    }

    /// Packet path: the keys of the tunnel's flows, once it is handed over to the packet
    /// splice (`None` before, and on the other data paths).
    pub fn packet_flows(&self) -> Option<HandedFlows> {
        self.packet.as_ref().and_then(|state| state.flows)
    }
}

/// The worker's connections by slot.
#[derive(Debug, Default)]
pub struct Table {
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    live: usize,
    next_id: u64,
}

impl Table {
    /// The table of worker `worker`: its ids start at `worker << 48`, so ids are unique in
    /// the process (the low bits, which tags carry, count from 1 in every worker).
    pub fn for_worker(worker: usize) -> Table {
        Table {
            next_id: (worker as u64) << 48,
            ..Table::default()
        }
    }

    /// The id the next connection gets.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stores an entry; returns its slot.
    pub fn insert(&mut self, entry: Entry) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(slot) => {
                self.entries[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.entries.push(Some(entry));
                (self.entries.len() - 1) as u32
            }
        }
    }

    /// The entry in `slot`.
    pub fn get(&mut self, slot: u32) -> Option<&mut Entry> {
        self.entries.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// The entry in `slot` if it is still connection `id` (slots are reused).
    pub fn get_if(&mut self, slot: u32, matches: impl FnOnce(u64) -> bool) -> Option<&mut Entry> {
        self.get(slot).filter(|entry| matches(entry.conn.id()))
    }

    /// Frees `slot`, returning its entry.
    pub fn remove(&mut self, slot: u32) -> Option<Entry> {
        let entry = self.entries.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.live -= 1;
        Some(entry)
    }

    /// Connections alive.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Up to `max` occupied slots from slot `start` on, and where the next call starts (0
    /// once the end is reached: a walk in steps over the table).
    pub fn slots_from(&self, start: u32, max: usize) -> (Vec<u32>, u32) {
        let end = self.entries.len() as u32;
        let mut slots = Vec::new();
        let mut slot = start.min(end);
        while slot < end && slots.len() < max {
            if self.entries[slot as usize].is_some() {
                slots.push(slot);
            }
            slot += 1;
        }
        (slots, if slot >= end { 0 } else { slot })
    }

    /// Every occupied slot.
    pub fn slots(&self) -> Vec<u32> {
        (0..self.entries.len() as u32)
            .filter(|&slot| self.entries[slot as usize].is_some())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;
    use std::sync::Arc;

    use super::{Entry, EntryIo, SideIo};
    use crate::config::Config;
    use crate::connection::{Actions, Connection, Side};
    use crate::runtime::packet::{HandedFlows, PacketState, TakenPort};
    use crate::runtime::stream::ClientStream;
    use crate::services::Services;

    /// Every tunnel's record is an `Option<Entry>` in the table, inline: its size is the
    /// proxy's memory per idle tunnel (a packet-spliced one keeps little else: its
    /// `PacketState` and no `EntryIo`). 272 bytes when this bound was set: the 232-byte
    /// `Connection`, the services, the two boxes (sockets, packet state), the counters and
    /// flags; the bound leaves 8 bytes. A regression guard: a field added inline to `Entry`,
    /// `Connection` or a long-lived `Stage` shows here; put what only a connection with sockets
    /// needs in `EntryIo`, and box what only some connections, or only some moments, need.
    #[test]
    fn an_idle_tunnel_record_stays_small() {
        let size = size_of::<Option<Entry>>();
        assert!(size <= 280, "Option<Entry> is {size} bytes");
    }

    /// What a packet-spliced tunnel keeps on the heap: one allocation, its port and its flows'
    /// keys (120 bytes: a 128-byte chunk of glibc's malloc).
    #[test]
    fn a_packet_tunnel_keeps_one_small_allocation() {
        let size = size_of::<PacketState>();
        assert!(size <= 120, "PacketState is {size} bytes");
    }

    fn services() -> Services {
        let text = "[[listener]]\nbind = \"127.0.0.1:1\"\n[[route]]\nupstream = \"u\"\n\
                    [upstream.u]\nservers = [\"127.0.0.1:2\"]\n";
        Services::new(&Config::parse(text).expect("test config parses"), None)
    }

    /// Once its I/O state is dropped, an entry is a record without sockets: every side reads
    /// as a socket gone.
    #[test]
    fn an_entry_without_io_has_no_sockets() {
        let services = Arc::new(services());
        let conn = Connection::adopt_packet(
            1,
            "127.0.0.1:1000".parse().expect("address"),
            "127.0.0.1:2000".parse().expect("address"),
            0,
            &services,
            &mut Actions::new(),
        );
        let io = EntryIo::new(
            SideIo::default(),
            SideIo::default(),
            ClientStream::new(None),
        );
        let mut entry = Entry::new(conn, services, Some(io), None, false);
        assert!(entry.side(Side::Client).is_some());
        assert!(entry.drop_io().is_some());
        assert!(entry.io().is_none());
        assert!(entry.side(Side::Upstream).is_none());
        assert_eq!(entry.raw_fds(), [-1, -1]);
        assert!(!entry.is_tls());
        let error = entry
            .read(Side::Client, &mut [0; 8])
            .expect_err("no socket to read");
        assert_eq!(error.raw_os_error(), Some(libc::EBADF));
        assert!(entry.packet_flows().is_none());
    }

    /// The packet state holds the port until it is given back, and outlives it once the
    /// tunnel's flows are recorded (the port of a tunnel left to the next process goes with
    /// the whole state, not given back).
    #[test]
    fn the_packet_state_holds_the_port_and_the_flows() {
        let port = TakenPort {
            remote: "127.0.0.1:2000".parse().expect("address"),
            port: 40_000,
        };
        let mut state = None;
        assert!(!PacketState::has_port(&state));
        PacketState::set_port(&mut state, port);
        assert!(PacketState::has_port(&state));
        // A retry gives the port back: nothing else is recorded, so the state goes.
        assert_eq!(PacketState::take_port(&mut state), Some(port));
        assert!(state.is_none());
        assert_eq!(PacketState::take_port(&mut state), None);

        PacketState::set_port(&mut state, port);
        let flows = HandedFlows {
            keys: [Default::default(); 2],
        };
        if let Some(state) = state.as_deref_mut() {
            state.flows = Some(flows);
        }
        assert_eq!(PacketState::take_port(&mut state), Some(port));
        assert_eq!(state.and_then(|state| state.flows), Some(flows));
    }
}
