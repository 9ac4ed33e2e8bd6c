//! A worker's connections: slots with generations, each holding the lifecycle machine and the
//! I/O state of its two sockets.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::ring::ConnectArgs;
use super::splice::SplicedSockets;
use super::stream::ClientStream;
use crate::connection::{Connection, Side};
use crate::services::Services;

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

/// A connection and its I/O state.
#[derive(Debug)]
pub struct Entry {
    /// The lifecycle machine.
    pub conn: Connection,
    /// The generation of the services the connection was accepted under (a reload publishes
    /// the next one for new connections): its route and pool indices point into these.
    pub services: Arc<Services>,
    /// The accepted socket.
    pub client: SideIo,
    /// The upstream socket.
    pub upstream: SideIo,
    /// Plain or TLS bytes to and from the client.
    pub stream: ClientStream,
    /// Operations submitted and not yet completed; the entry is freed only at zero.
    pub inflight: u32,
    /// The earliest reminder armed in the wheel for this connection.
    pub armed_ns: u64,
    /// An in-flight connect's arguments (read by the kernel at submission).
    pub connect: Option<Box<ConnectArgs>>,
    /// A receive from the upstream in flight: it owns its buffer until its completion
    /// arrives. Here rather than in [`SideIo`]: the client side never has one.
    pub receiving: Option<Box<[u8]>>,
    /// Kernel path: the spliced sockets' cookies and baselines. Boxed, like the two below:
    /// each is set on one data path only, and every entry would carry it inline.
    pub spliced: Option<Box<SplicedSockets>>,
    /// Packet path: the tunnel's flows, once handed over.
    pub packet: Option<Box<super::packet::PacketRecord>>,
    /// Packet path: the local port the upstream connection took from the reserved range.
    pub packet_port: Option<Box<super::packet::TakenPort>>,
    /// TLS: the handshake is counted in the worker's handshakes in progress.
    pub counted_handshake: bool,
    /// Binary upgrade: the tunnel is being let go to the successor (its waits are being
    /// removed).
    pub handing_over: bool,
}

impl Entry {
    /// One side's I/O state.
    pub fn side(&mut self, side: Side) -> &mut SideIo {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
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

    use super::Entry;

    /// Every tunnel's record is an `Option<Entry>` in the table, inline: its size is the
    /// proxy's memory per idle tunnel (a packet-spliced one keeps little else). A regression
    /// guard: a field added inline to `Entry`, `Connection` or a long-lived `Stage` shows here;
    /// box what only some connections, or only some moments, need.
    #[test]
    fn an_idle_tunnel_record_stays_small() {
        let size = size_of::<Option<Entry>>();
        assert!(size <= 400, "Option<Entry> is {size} bytes");
    }
}
