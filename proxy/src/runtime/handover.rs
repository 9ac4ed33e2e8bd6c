//! Binary upgrade, the workers' part: copies of their listening sockets for the successor,
//! tunnels let go to it (old process) and tunnels taken from it (successor). What may move
//! is decided by the connection (`connection::handover`); here its sockets are freed of
//! every operation in flight first, so the successor is the only one waiting on them.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use super::ring::Op;
use super::splice::SplicedSockets;
use super::stream::ClientStream;
use super::table::{Entry, EntryIo, SideIo};
use super::worker::Worker;
use crate::clock::monotonic_ns;
use crate::connection::{Actions, Connection};
use crate::tag::Tag;
use crate::upgrade::Handed;

/// A tunnel on its way between processes: its record and its two sockets.
#[derive(Debug)]
pub struct Moving {
    /// What the successor rebuilds it from.
    pub handed: Handed,
    /// The client socket.
    pub client: OwnedFd,
    /// The upstream socket.
    pub upstream: OwnedFd,
}

/// What the main thread and the workers share for an upgrade.
#[derive(Debug, Default)]
pub struct Handoff {
    /// Bumped by the main thread to ask every worker for copies of its listening sockets.
    listener_request: AtomicU64,
    /// The copies, per worker that answered.
    listener_copies: Mutex<Vec<Vec<(SocketAddr, OwnedFd)>>>,
    /// Once a successor serves: where the workers send the tunnels they let go.
    sink: Mutex<Option<Sender<Moving>>>,
    /// The successor adopted the kernel maps (spliced tunnels may go too).
    kernel: AtomicBool,
    /// The successor stopped taking tunnels (its socket failed): the rest stay here.
    failed: AtomicBool,
    /// This process is a successor still taking its predecessor's tunnels.
    adopting: AtomicBool,
}

impl Handoff {
    /// Asks the workers for copies of their listening sockets; returns the request's number.
    pub fn request_listeners(&self) -> u64 {
        self.copies().clear();
        self.listener_request.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The copies the workers gave since the last request: one list per worker.
    pub fn take_listener_copies(&self) -> Vec<Vec<(SocketAddr, OwnedFd)>> {
        std::mem::take(&mut *self.copies())
    }

    /// How many workers answered the last request.
    pub fn answered(&self) -> usize {
        self.copies().len()
    }

    fn copies(&self) -> std::sync::MutexGuard<'_, Vec<Vec<(SocketAddr, OwnedFd)>>> {
        // Held for a push or a take: a panic cannot leave it half done.
        self.listener_copies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A successor serves: tunnels go to `sink` from the drain on.
    pub fn open(&self, sink: Sender<Moving>, kernel: bool) {
        self.kernel.store(kernel, Ordering::Release);
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
    }

    /// Every worker is done: the last sender goes, so the forwarding thread ends.
    pub fn close(&self) {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// The successor stopped taking tunnels: the workers keep the rest.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Whether the successor stopped taking tunnels.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// This process takes (true) or took (false) its predecessor's tunnels.
    pub fn set_adopting(&self, adopting: bool) {
        self.adopting.store(adopting, Ordering::Release);
    }

    /// Whether this process still takes its predecessor's tunnels (it cannot hand them on
    /// before it has them all).
    pub fn is_adopting(&self) -> bool {
        self.adopting.load(Ordering::Acquire)
    }

    fn sink(&self) -> Option<Sender<Moving>> {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A worker's part in an upgrade of the old process.
#[derive(Debug)]
pub struct Leaving {
    sink: Sender<Moving>,
    kernel: bool,
}

impl Worker {
    /// Answers the main thread's request for copies of the listening sockets, once per
    /// request.
    pub(super) fn offer_listeners(&mut self) {
        let handoff = &self.published.handoff;
        let request = handoff.listener_request.load(Ordering::Acquire);
        if request == self.listeners_offered {
            return;
        }
        self.listeners_offered = request;
        let copies = self
            .listening()
            .filter_map(|(addr, socket)| match socket.try_clone_to_owned() {
                Ok(copy) => Some((addr, copy)),
                Err(error) => {
                    tracing::warn!(%error, %addr, "cannot copy a listening socket for the successor");
                    None
                }
            })
            .collect();
        handoff.copies().push(copies);
    }

    /// At the start of a drain: whether a successor takes the tunnels.
    pub(super) fn join_handoff(&mut self) {
        let handoff = &self.published.handoff;
        if let Some(sink) = handoff.sink() {
            self.leaving = Some(Leaving {
                sink,
                kernel: handoff.kernel.load(Ordering::Acquire),
            });
        }
    }

    /// Starts letting go every tunnel that can move now (run at each tick of the drain).
    pub(super) fn hand_over_tunnels(&mut self) {
        if self.leaving.is_some() && self.published.handoff.has_failed() {
            // The successor is gone: what is left drains here (tunnels whose waits are being
            // removed get them back as their removals complete).
            self.leaving = None;
        }
        let Some(kernel) = self.leaving.as_ref().map(|leaving| leaving.kernel) else {
            return;
        };
        for slot in self.table.slots() {
            self.begin_hand_over(slot, kernel);
        }
    }

    /// Removes the tunnel's readiness waits; it moves once nothing is in flight on it.
    fn begin_hand_over(&mut self, slot: u32, kernel: bool) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        // A record without sockets has nothing to hand over.
        let idle_io = entry.io().is_some_and(|io| {
            io.connect.is_none()
                && !io.client.sending()
                && !io.upstream.sending()
                && io.receiving.is_none()
                && !io.stream.is_tls()
        });
        if entry.handing_over || !idle_io || !entry.conn.can_hand_over(kernel) {
            return;
        }
        entry.handing_over = true;
        // If something happens meanwhile, the tunnel stays and its waits are armed again
        // (`on_poll` of a removed poll).
        self.remove_polls(slot);
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        if entry.inflight == 0 {
            self.let_go(slot);
        }
    }

    /// A completion for a tunnel being let go: true when it was the removal of a wait (and
    /// the tunnel moves once the last one came back); false when something happened on a
    /// socket, so the tunnel stays for now and the completion is handled as usual.
    pub(super) fn hand_over_completion(&mut self, slot: u32, op: Op, result: i32) -> bool {
        let still_leaving = self.leaving.is_some();
        let Some(entry) = self.table.get(slot) else {
            return true;
        };
        let removed = op == Op::Cancel
            || (matches!(op, Op::PollClient | Op::PollUpstream) && result == -libc::ECANCELED);
        if !removed || !still_leaving {
            // It stays: handled as usual (a removed poll is armed again for its intent).
            entry.handing_over = false;
            return false;
        }
        if entry.inflight == 0 {
            self.let_go(slot);
        }
        true
    }

    /// Sends a tunnel with nothing in flight to the successor; its access line here says so.
    fn let_go(&mut self, slot: u32) {
        let Some(leaving) = self.leaving.as_ref() else {
            return;
        };
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let Some(tunnel) = entry.conn.hand_over(&entry.services) else {
            entry.handing_over = false;
            return;
        };
        let sink = leaving.sink.clone();
        let Some(mut entry) = self.table.remove(slot) else {
            return;
        };
        // Not reached without: a tunnel that can be handed over has both sockets.
        let Some(mut io) = entry.drop_io() else {
            return;
        };
        let (Some(client), Some(upstream)) = (io.client.fd.take(), io.upstream.fd.take()) else {
            return;
        };
        let kernel = io.spliced.as_deref().map(SplicedSockets::handed);
        if let (Some(sockets), Some(program)) = (&io.spliced, &entry.services.splice) {
            // Adopted here from a predecessor: the successor registers it again.
            program
                .adopted_owners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&sockets.owner());
        }
        self.services
            .admission
            .release(entry.conn.counted_address());
        let record = entry.conn.handed_over(monotonic_ns(), &entry.services);
        record.log();
        let moving = Moving {
            handed: Handed { tunnel, kernel },
            client,
            upstream,
        };
        if sink.send(moving).is_err() {
            // The forwarding thread is gone (the successor's socket failed): dropping the
            // sockets closes the tunnel.
            tracing::warn!("upgrade: the successor is gone; a tunnel closes");
        }
    }

    /// Takes a tunnel the predecessor handed over: a connection of this worker from now on.
    pub(super) fn adopt(&mut self, moving: Moving) {
        let Moving {
            handed,
            client,
            upstream,
        } = moving;
        let datapath = self.datapath();
        let mut first = Actions::new();
        let id = self.table.next_id();
        let conn = Connection::adopt(id, &handed.tunnel, datapath, &self.services, &mut first);
        self.services.admission.count(handed.tunnel.client.ip());
        let spliced = handed.kernel.as_ref().map(SplicedSockets::adopted);
        let mut io = EntryIo::new(
            SideIo::with(client),
            SideIo::with(upstream),
            ClientStream::new(None),
        );
        io.spliced = spliced.map(Box::new);
        let slot = self.table.insert(Entry::new(
            conn,
            Arc::clone(&self.services),
            Some(io),
            None,
            false,
        ));
        if let (Some(kernel), Some(program)) = (&handed.kernel, &self.services.splice) {
            let tag = Tag::new(self.index as u8, slot, id);
            program
                .adopted_owners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(kernel.owner, tag);
        }
        self.drive(slot, |_, _, out| out.append(&mut first));
    }
}

/// Where the successor's adoption thread delivers a worker's tunnels: its inbox's channel and
/// the eventfd that wakes its ring.
#[derive(Debug, Clone)]
pub struct Deliveries {
    /// The worker's adoption channel.
    pub sender: Sender<Moving>,
    /// Written to wake the worker.
    pub wake: Arc<OwnedFd>,
}

impl Deliveries {
    /// Gives the worker a tunnel and wakes it.
    pub fn deliver(&self, moving: Moving) {
        if self.sender.send(moving).is_ok() {
            use std::os::fd::AsRawFd as _;
            crate::sys::wake(self.wake.as_raw_fd());
        }
    }
}
