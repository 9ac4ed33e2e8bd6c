//! One worker: one thread, one io_uring, its own listener sockets, connections and timers.
//!
//! The worker only carries out I/O: each connection's [`Connection`] machine decides, the
//! worker turns its [`Action`]s into ring submissions (`execute.rs`) and feeds completions and
//! measurements back as events (here). Sockets stay in blocking mode (so io_uring waits for
//! connect and send completion itself); reads are readiness-driven (a oneshot `POLL_ADD`, then
//! `recv(MSG_DONTWAIT)`), so a connection waiting for bytes holds no buffer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use io_uring::types;
use socket2::SockRef;

use super::reload::Published;
use super::ring::{Op, Ring};
use super::splice;
use super::stream::ClientStream;
use super::support::RingSupport;
use super::table::{Entry, EntryIo, Intent, Payload, SideIo, Table};
use crate::admission::Refusal;
use crate::buffers::BufferPool;
use crate::clock::{duration_ns, monotonic_ns};
use crate::connection::{Accepted, Actions, ConnectFailure, Connection, DataPath, Side};
use crate::headers::Scheme;
use crate::listener::Listener;
use crate::services::Services;
use crate::splice::{SpliceError, SpliceMaps};
use crate::sys;
use crate::tag::Tag;
use crate::timeouts::{TimerKey, TimerWheel};
use crate::tls::ServerConfigs;
use crate::upstream::IdleConnections;

/// The worker wakes at least this often (timers, shutdown flag).
const TICK: Duration = Duration::from_millis(50);
/// Buckets of the timer wheel (50 ms × 8192 ≈ 7 min per turn).
const WHEEL_SLOTS: usize = 8192;
/// Size of the scratch buffer for request/response head reads.
const SCRATCH: usize = 64 * 1024;
/// Free relay buffers a worker keeps for reuse.
const KEEP_BUFFERS: usize = 256;
/// How often idle upstream connections are checked (expired, or closed by their server).
const SWEEP_NS: u64 = 1_000_000_000;

/// Whether an idle upstream connection can carry a request: nothing to read (a FIN, a reset or
/// bytes nobody asked for all mean it cannot).
fn is_idle_and_open(fd: &OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        sys::peek(fd.as_raw_fd(), &mut byte),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock
    )
}

/// A fatal worker error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating the io_uring failed (old kernel, `io_uring_disabled`, memlock limit).
    #[error("cannot create io_uring: {0}")]
    Ring(#[source] io::Error),
    /// Submitting to the ring failed.
    #[error("io_uring submit failed: {0}")]
    Submit(#[source] io::Error),
    /// The worker's handle on the splice maps could not be opened.
    #[error("cannot open the splice maps: {0}")]
    Splice(#[source] SpliceError),
}

/// The drain's spread window: the connections open when it began, closed one by one.
#[derive(Debug)]
struct SpreadClose {
    /// Not closed yet (slot, connection id), the next at the end.
    queue: Vec<(u32, u64)>,
    /// How many there were.
    total: usize,
    start: u64,
    window: u64,
}

#[derive(Debug)]
struct ListenerSlot {
    listener: Option<Listener>,
    accepting: bool,
    /// A reload removed the listener: it closes once its accept is cancelled.
    retired: bool,
}

/// Where a worker receives pressure reports (kernel path): a channel and the eventfd that
/// wakes its ring.
pub struct Inbox {
    /// Reports from the pressure watcher: the slot of a tunnel to check.
    pub receiver: std::sync::mpsc::Receiver<Tag>,
    /// Binary upgrade (successor): tunnels the predecessor handed over.
    pub adoptions: std::sync::mpsc::Receiver<super::handover::Moving>,
    /// Readable when reports are waiting.
    pub wake: Arc<OwnedFd>,
}

/// One worker thread's state.
pub struct Worker {
    pub(super) index: usize,
    inbox: Option<Inbox>,
    pub(super) ring: Ring,
    /// The services new connections get (a reload replaces them: see `published`).
    pub(super) services: Arc<Services>,
    /// Where reloads publish the next generation of the services, and the one `services` is.
    pub(super) published: Arc<Published>,
    generation: u64,
    /// This worker's handle on the splice maps (kernel path).
    pub(super) maps: Option<SpliceMaps>,
    /// This worker's handles for the packet splice (packet path).
    pub(super) packet: Option<super::packet::PacketWorker>,
    listeners: Vec<ListenerSlot>,
    pub(super) table: Table,
    pub(super) wheel: TimerWheel,
    pub(super) buffers: BufferPool,
    pub(super) scratch: Box<[u8]>,
    tick: Box<types::Timespec>,
    shutdown: Arc<AtomicBool>,
    pub(super) drain_deadline_ns: Option<u64>,
    /// Where the rebalancing walk over the table goes on from.
    pub(super) rebalance_cursor: u32,
    /// The connections the drain's spread window closes one by one, once it began.
    spread: Option<SpreadClose>,
    /// The periodic tick completed since the last loop turn.
    ticked: bool,
    /// Kernel-path backlogs to measure again at the next tick (slot, id, towards).
    pub(super) backlog_checks: Vec<(u32, u64, Side)>,
    /// Kernel-path tunnels with bytes still queued, measured again at the next tick (slot, id).
    pub(super) pressure_checks: Vec<(u32, u64)>,
    /// When the last "accept failed" warning was logged.
    last_accept_warning_ns: u64,
    /// When admission control last logged, and how many it refused since.
    last_refusal_log_ns: u64,
    refused_since_log: u64,
    /// Reused queue of actions.
    actions: Actions,
    /// Plain HTTP: upstream connections kept alive for the next requests.
    pub(super) idle_upstreams: IdleConnections<OwnedFd>,
    /// When the idle upstream connections were last swept.
    last_sweep_ns: u64,
    /// TLS handshakes in progress (for `limits.max_tls_handshakes`).
    pub(super) tls_handshakes: usize,
    /// Test hook (`ServeOptions::panic_after_accepts`): panic on accepting this many
    /// connections. Checked once per accepted connection, never on the data path.
    pub(super) panic_after_accepts: Option<std::num::NonZeroU64>,
    /// Connections accepted, counted only while the test hook is set.
    accepted: u64,
    /// The last request for copies of the listening sockets answered (binary upgrade).
    pub(super) listeners_offered: u64,
    /// Binary upgrade (old process): tunnels go to the successor.
    pub(super) leaving: Option<super::handover::Leaving>,
}

impl Worker {
    /// A worker serving `listeners` (its own `SO_REUSEPORT` sockets).
    pub fn new(
        index: usize,
        published: Arc<Published>,
        listeners: Vec<Listener>,
        shutdown: Arc<AtomicBool>,
        inbox: Option<Inbox>,
        support: RingSupport,
    ) -> Result<Worker, WorkerError> {
        let ring = Ring::new(support.deferred_task_run).map_err(WorkerError::Ring)?;
        let (generation, services) = published.current();
        let maps = services
            .splice
            .as_ref()
            .map(|program| program.maps())
            .transpose()
            .map_err(WorkerError::Splice)?;
        let packet = services
            .packet
            .as_ref()
            .map(|path| super::packet::PacketWorker::open(path))
            .transpose()
            .map_err(WorkerError::Splice)?;
        let relay_buffer = services.relay_buffer;
        Ok(Worker {
            index,
            inbox,
            ring,
            services,
            published,
            generation,
            maps,
            packet,
            listeners: listeners
                .into_iter()
                .map(|listener| ListenerSlot {
                    listener: Some(listener),
                    accepting: false,
                    retired: false,
                })
                .collect(),
            table: Table::for_worker(index),
            wheel: TimerWheel::new(TICK, WHEEL_SLOTS, monotonic_ns()),
            buffers: BufferPool::new(relay_buffer, KEEP_BUFFERS),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            tick: Box::new(types::Timespec::from(TICK)),
            shutdown,
            drain_deadline_ns: None,
            rebalance_cursor: 0,
            spread: None,
            ticked: false,
            backlog_checks: Vec::new(),
            pressure_checks: Vec::new(),
            last_accept_warning_ns: 0,
            last_refusal_log_ns: 0,
            refused_since_log: 0,
            actions: Actions::new(),
            idle_upstreams: IdleConnections::default(),
            last_sweep_ns: 0,
            tls_handshakes: 0,
            panic_after_accepts: None,
            accepted: 0,
            listeners_offered: 0,
            leaving: None,
        })
    }

    /// Runs until shutdown has been requested and every connection is gone.
    pub fn run(mut self) -> Result<(), WorkerError> {
        self.ring.start().map_err(WorkerError::Ring)?;
        for index in 0..self.listeners.len() {
            self.arm_accept(index);
        }
        self.arm_tick();
        self.adopt_pinned_packet_tunnels();
        if let Some(inbox) = self.inbox.as_ref() {
            self.ring
                .poll_multi(inbox.wake.as_raw_fd(), Op::Wake.user_data(0, 0));
        }
        let mut completions = Vec::with_capacity(1024);
        let mut fired = Vec::new();
        loop {
            self.ring.submit_and_wait().map_err(WorkerError::Submit)?;
            if self.published.generation() != self.generation {
                self.adopt_reload();
            }
            self.offer_listeners();
            completions.clear();
            self.ring.reap(&mut completions);
            for &(user_data, result, flags) in &completions {
                self.complete(user_data, result, flags);
            }
            let now = monotonic_ns();
            fired.clear();
            self.wheel.expire(now, &mut fired);
            for key in fired.drain(..) {
                self.on_timer(key, now);
            }
            if std::mem::take(&mut self.ticked) {
                // Once per tick, not per completion batch: a slow reader may stay listed long.
                self.check_backlogs_again();
                self.sweep_idle_upstreams(now);
                self.hand_over_tunnels();
                self.rebalance(now);
            }
            if self.manage_shutdown(now) {
                tracing::debug!(worker = self.index, "worker stopped");
                return Ok(());
            }
        }
    }

    /// Gives `event` to the connection in `slot`, then carries out the actions it asked for
    /// (and those that carrying them out asks for, in order).
    pub(super) fn drive(
        &mut self,
        slot: u32,
        event: impl FnOnce(&mut Connection, &Services, &mut Actions),
    ) {
        self.with_actions(slot, |worker, actions| {
            if let Some(entry) = worker.table.get(slot) {
                event(&mut entry.conn, &entry.services, actions);
            }
        });
    }

    /// Runs `work` (I/O that feeds events to the connection in `slot`), then carries out the
    /// actions those events asked for, in order, while the connection exists.
    pub(super) fn with_actions(&mut self, slot: u32, work: impl FnOnce(&mut Worker, &mut Actions)) {
        let mut actions = std::mem::take(&mut self.actions);
        let Some(id) = self.table.get(slot).map(|entry| entry.conn.id()) else {
            self.actions = actions;
            return;
        };
        work(self, &mut actions);
        while let Some(action) = actions.pop_front() {
            if self.table.get_if(slot, |current| current == id).is_none() {
                actions.clear();
                break;
            }
            self.execute(slot, action, &mut actions);
        }
        self.actions = actions;
    }

    /// Closes idle upstream connections whose keep-alive ran out or whose server closed them
    /// (at most once a second: a peek per idle connection).
    fn sweep_idle_upstreams(&mut self, now: u64) {
        if self.idle_upstreams.is_empty() || now.saturating_sub(self.last_sweep_ns) < SWEEP_NS {
            return;
        }
        self.last_sweep_ns = now;
        // Dropping them closes them.
        drop(self.idle_upstreams.sweep(now, |fd| !is_idle_and_open(fd)));
    }

    /// Plain HTTP: an idle kept-alive connection to `server` that is still open, if any.
    pub(super) fn take_idle_upstream(&mut self, server: std::net::SocketAddr) -> Option<OwnedFd> {
        while let Some(fd) = self.idle_upstreams.take(server) {
            if is_idle_and_open(&fd) {
                return Some(fd);
            }
        }
        None
    }

    // ---- shutdown -------------------------------------------------------------------------

    /// Starts the drain when asked, enforces its deadline; true when the worker may exit.
    fn manage_shutdown(&mut self, now: u64) -> bool {
        if !self.shutdown.load(Ordering::Relaxed) {
            return false;
        }
        let deadline = match self.drain_deadline_ns {
            Some(deadline) => deadline,
            None => {
                let deadline = now.saturating_add(duration_ns(self.services.drain));
                self.drain_deadline_ns = Some(deadline);
                tracing::info!(
                    worker = self.index,
                    tunnels = self.table.live(),
                    "shutting down: no new connections, draining open ones"
                );
                for index in 0..self.listeners.len() {
                    self.stop_accepting(index);
                }
                // No request will want them: close them now.
                drop(self.idle_upstreams.sweep(u64::MAX, |_| true));
                for slot in self.table.slots() {
                    self.drive(slot, |conn, _, out| conn.on_drain_start(out));
                }
                self.leave_pinned_packet_tunnels();
                self.join_handoff();
                self.hand_over_tunnels();
                deadline
            }
        };
        self.spread_closes(now, deadline);
        if now >= deadline {
            for slot in self.table.slots() {
                self.drive(slot, |conn, services, out| {
                    conn.on_drain_deadline(now, services, out)
                });
            }
        }
        self.table.live() == 0 && self.listeners.iter().all(|l| l.listener.is_none())
    }

    /// A reload published the next generation: connections accepted from now on get its
    /// services, open tunnels its idle timeouts; listeners it added start accepting, those it
    /// removed stop and close (their connections go on).
    fn adopt_reload(&mut self) {
        (self.generation, self.services) = self.published.current();
        // Open tunnels take their route's new idle timeout.
        let next = Arc::clone(&self.services);
        let now = monotonic_ns();
        for slot in self.table.slots() {
            self.drive(slot, |conn, services, out| {
                conn.on_reload(services, &next, now, out)
            });
        }
        let added = self.published.take_new_listeners(self.index);
        if self.drain_deadline_ns.is_some() {
            return; // Shutting down: the added sockets are dropped, closing them.
        }
        for index in 0..self.listeners.len() {
            let served = self.listeners[index]
                .listener
                .as_ref()
                .is_some_and(|l| self.services.listeners.iter().any(|s| s.bind == l.addr));
            if !served && !self.listeners[index].retired {
                self.listeners[index].retired = true;
                self.stop_accepting(index);
            }
        }
        for listener in added {
            self.listeners.push(ListenerSlot {
                listener: Some(listener),
                accepting: false,
                retired: false,
            });
            self.arm_accept(self.listeners.len() - 1);
        }
    }

    /// In the drain's last `close_spread`: closes the connections still open one by one, as
    /// many by now as the share of the window gone by (checked every loop turn, a tick at the
    /// latest), so their clients reconnect elsewhere over the window rather than at once.
    fn spread_closes(&mut self, now: u64, deadline: u64) {
        let window = duration_ns(self.services.close_spread);
        let start = deadline.saturating_sub(window);
        if now < start || window == 0 {
            return;
        }
        let table = &mut self.table;
        let spread = self.spread.get_or_insert_with(|| {
            let queue: Vec<(u32, u64)> = table
                .slots()
                .into_iter()
                .filter_map(|slot| table.get(slot).map(|entry| (slot, entry.conn.id())))
                .collect();
            SpreadClose {
                total: queue.len(),
                queue,
                start,
                window,
            }
        });
        let gone = now.saturating_sub(spread.start).min(spread.window);
        let due = (u128::from(gone) * spread.total as u128 / u128::from(spread.window)) as usize;
        let mut closing = Vec::new();
        while spread.total - spread.queue.len() < due {
            let Some(next) = spread.queue.pop() else {
                break;
            };
            closing.push(next);
        }
        for (slot, id) in closing {
            if self
                .table
                .get(slot)
                .is_some_and(|entry| entry.conn.id() == id)
            {
                self.drive(slot, |conn, services, out| {
                    conn.on_drain_spread(now, services, out)
                });
            }
        }
    }

    fn stop_accepting(&mut self, index: usize) {
        let slot = &mut self.listeners[index];
        let Some(listener) = slot.listener.as_ref() else {
            return;
        };
        if slot.accepting {
            let fd = listener.socket.as_raw_fd();
            self.ring
                .cancel_fd(fd, Op::CancelAccept.user_data(index as u32, 0));
            // The listener is closed when its accept completes without "more".
        } else {
            slot.listener = None;
        }
    }

    // ---- listeners and the tick -----------------------------------------------------------

    fn arm_tick(&mut self) {
        let tick: *const types::Timespec = &*self.tick;
        self.ring.timeout(tick, Op::Tick.user_data(0, 0));
    }

    fn arm_accept(&mut self, index: usize) {
        let Some(listener) = self.listeners[index].listener.as_ref() else {
            return;
        };
        let fd = listener.socket.as_raw_fd();
        self.listeners[index].accepting = true;
        self.ring
            .accept_multi(fd, Op::Accept.user_data(index as u32, 0));
    }

    /// Re-arms listeners whose accept stopped (it ran out of descriptors), unless draining.
    fn rearm_idle_listeners(&mut self) {
        if self.drain_deadline_ns.is_some() {
            return;
        }
        for index in 0..self.listeners.len() {
            let slot = &self.listeners[index];
            if slot.listener.is_some() && !slot.accepting {
                self.arm_accept(index);
            }
        }
    }

    fn on_accept(&mut self, index: usize, result: i32, flags: u32) {
        if !io_uring::cqueue::more(flags) {
            self.listeners[index].accepting = false;
            let out_of_descriptors = result == -libc::EMFILE || result == -libc::ENFILE;
            if self.drain_deadline_ns.is_some() || self.listeners[index].retired {
                self.listeners[index].listener = None;
            } else if !out_of_descriptors {
                self.arm_accept(index);
            }
            // Out of descriptors: accepting again at once would fail again at once; the next
            // tick re-arms it (`rearm_idle_listeners`), after closes may have freed some.
        }
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            let now = monotonic_ns();
            if result != -libc::ECANCELED
                && now.saturating_sub(self.last_accept_warning_ns) > 1_000_000_000
            {
                // At most one warning a second: a full descriptor table fails every accept.
                self.last_accept_warning_ns = now;
                tracing::warn!(worker = self.index, %error, "accept failed");
            }
            return;
        }
        // SAFETY: a non-negative accept result is a new file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(result) };
        if let Some(after) = self.panic_after_accepts {
            self.accepted += 1;
            assert!(
                self.accepted < after.get(),
                "test hook: worker {} accepted connection {} (--test-panic-after-accepts)",
                self.index,
                self.accepted
            );
        }
        let Some((scheme, addr)) = self.listeners[index]
            .listener
            .as_ref()
            .map(|l| (l.scheme, l.addr))
        else {
            return; // Not reached: an accept completes only on a listener still open.
        };
        let Some(listener) = self.services.listener(addr) else {
            // The listener was removed by a reload while this connection was accepted.
            return;
        };
        let (tls, proxy_protocol) = (listener.tls.clone(), listener.proxy_protocol);
        if scheme == Scheme::Wss && tls.is_none() {
            // Switched to ws by a reload: it keeps serving wss until a restart (not reached
            // while a reload keeps a listener's scheme).
            return;
        }
        self.open(fd, scheme, tls, proxy_protocol);
    }

    fn open(
        &mut self,
        fd: OwnedFd,
        scheme: Scheme,
        tls: Option<Arc<ServerConfigs>>,
        proxy_protocol: bool,
    ) {
        let socket = SockRef::from(&fd);
        let addresses = socket
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .zip(socket.local_addr().ok().and_then(|a| a.as_socket()));
        let Some((client_addr, local_addr)) = addresses else {
            tracing::debug!("accepted a connection that is already gone");
            return;
        };
        if let Err(error) = socket.set_tcp_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY on a client socket");
        }
        let stream = ClientStream::new(tls.as_ref());
        let tls_full = self
            .services
            .max_tls_handshakes
            .is_some_and(|max| self.tls_handshakes >= max);
        if stream.is_tls() && tls_full {
            // Closed before a byte is read, like the other limits.
            return self.refused(client_addr, Refusal::TlsHandshakes);
        }
        // Behind a PROXY header the client's address is counted once the header says it.
        let admitted = if proxy_protocol {
            self.services.admission.admit_connection()
        } else {
            self.services.admission.admit(client_addr.ip())
        };
        if let Err(refusal) = admitted {
            // Closed before a byte is read (dropping `fd` sends the FIN); released nowhere, as
            // it took no place.
            return self.refused(client_addr, refusal);
        }
        // Tunnels go to the kernel when it is loaded, at once or once they have earned it (the
        // connection keeps TLS tunnels in userspace).
        let datapath = self.datapath();
        let mut first = Actions::new();
        let id = self.table.next_id();
        let accepted = Accepted {
            peer: client_addr,
            local: local_addr,
            scheme,
            tls: stream.is_tls(),
            proxy_protocol,
        };
        let conn = Connection::accept(
            id,
            accepted,
            datapath,
            monotonic_ns(),
            &self.services,
            &mut first,
        );
        let counted_handshake = stream.is_tls();
        if counted_handshake {
            self.tls_handshakes += 1;
        }
        let io = EntryIo::new(SideIo::with(fd), SideIo::default(), stream);
        let slot = self.table.insert(Entry::new(
            conn,
            Arc::clone(&self.services),
            Some(io),
            None,
            counted_handshake,
        ));
        self.drive(slot, |_, _, out| out.append(&mut first));
    }

    /// How plain tunnels of this worker move: to the kernel when it is loaded, at once or once
    /// they have earned it (the connection keeps TLS tunnels in userspace).
    pub(super) fn datapath(&self) -> DataPath {
        if self.packet.is_some() {
            return DataPath::Packet;
        }
        match (&self.maps, self.services.promotion) {
            (None, _) => DataPath::Relay,
            (Some(_), None) => DataPath::Splice,
            (Some(_), Some(_)) => DataPath::Promote,
        }
    }

    /// The listening sockets this worker accepts on (not those a reload retired).
    pub(super) fn listening(
        &self,
    ) -> impl Iterator<Item = (std::net::SocketAddr, std::os::fd::BorrowedFd<'_>)> {
        self.listeners
            .iter()
            .filter(|slot| !slot.retired)
            .filter_map(|slot| slot.listener.as_ref())
            .map(|listener| (listener.addr, listener.socket.as_fd()))
    }

    /// Counts a connection closed by admission control, and says so in the log at most once a
    /// second per worker (a flood would otherwise flood the log too).
    fn refused(&mut self, client: std::net::SocketAddr, refusal: Refusal) {
        let metrics = &self.services.metrics;
        let limit = match refusal {
            Refusal::Total => {
                metrics.connections_refused_limit.inc();
                "limits.max_connections"
            }
            Refusal::PerAddress => {
                metrics.connections_refused_per_ip.inc();
                "limits.max_connections_per_ip"
            }
            Refusal::TlsHandshakes => {
                metrics.connections_refused_tls_handshakes.inc();
                "limits.max_tls_handshakes"
            }
        };
        self.refused_since_log += 1;
        let now = monotonic_ns();
        if now.saturating_sub(self.last_refusal_log_ns) > 1_000_000_000 {
            self.last_refusal_log_ns = now;
            tracing::warn!(
                %client,
                limit,
                refused = std::mem::take(&mut self.refused_since_log),
                "connections closed at once: over a connection limit"
            );
        }
    }

    // ---- completions ----------------------------------------------------------------------

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) {
        let tag = Tag::decode(user_data);
        let Some(op) = Op::of(tag) else {
            tracing::error!(user_data, "completion with an unknown tag");
            return;
        };
        match op {
            Op::Tick => {
                self.ticked = true;
                self.arm_tick();
                self.rearm_idle_listeners();
            }
            Op::Accept => self.on_accept(tag.slot as usize, result, flags),
            Op::CancelAccept => {}
            Op::Wake => self.on_inbox(flags),
            _ => self.complete_for_conn(tag, op, result),
        }
    }

    fn complete_for_conn(&mut self, tag: Tag, op: Op, result: i32) {
        let slot = tag.slot;
        let Some(entry) = self.table.get(slot) else {
            tracing::error!(?tag, "completion for a free connection slot");
            return;
        };
        if !tag.is_for(entry.conn.id()) {
            tracing::error!(?tag, "completion for a previous connection of this slot");
            return;
        }
        entry.inflight -= 1;
        if entry.packet_flows().is_some() {
            // A packet-spliced tunnel's only operations are those cancelled at the hand-off
            // (and their cancels): nothing to tell the connection. Once none is left, nothing
            // names the sockets any more: they are closed, silently, and the entry's I/O state
            // goes with them (the tunnel is its record from now on).
            if entry.inflight == 0 {
                self.close_handed_sockets(slot);
                if self.table.get(slot).is_some_and(|e| e.conn.is_closing()) {
                    self.finish(slot);
                }
            }
            return;
        }
        if let Some(io) = entry.io_mut() {
            match op {
                Op::PollClient => io.client.polling = false,
                Op::PollUpstream => io.upstream.polling = false,
                _ => {}
            }
        }
        if entry.handing_over && self.hand_over_completion(slot, op, result) {
            return;
        }
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        if !entry.conn.is_closing() {
            match op {
                Op::PollClient => self.on_poll(slot, Side::Client, result),
                Op::PollUpstream => self.on_poll(slot, Side::Upstream, result),
                Op::SendClient => self.on_send(slot, Side::Client, result),
                Op::SendUpstream => self.on_send(slot, Side::Upstream, result),
                Op::Connect => self.on_connect(slot, result),
                Op::RecvUpstream => self.on_recv_upstream(slot, result),
                _ => {}
            }
        } else if matches!(op, Op::SendClient | Op::SendUpstream) {
            self.release_send(slot, op);
        } else if op == Op::RecvUpstream {
            self.release_recv(slot);
        }
        let done = self
            .table
            .get(slot)
            .is_some_and(|entry| entry.conn.is_closing() && entry.inflight == 0);
        if done {
            self.finish(slot);
        }
    }

    /// A receive from the upstream completed: the bytes (or the end) go to the connection.
    fn on_recv_upstream(&mut self, slot: u32, result: i32) {
        let Some(buffer) = self
            .table
            .get(slot)
            .and_then(Entry::io_mut)
            .and_then(|io| io.receiving.take())
        else {
            return;
        };
        let now = monotonic_ns();
        match result {
            // Cancelled on purpose (the connection gave up on the upstream): nothing to tell.
            error if error == -libc::ECANCELED => {}
            n if n > 0 => {
                let len = (n as usize).min(buffer.len());
                self.drive(slot, |conn, services, out| {
                    conn.on_data(Side::Upstream, &buffer[..len], now, services, out)
                });
            }
            _ => self.drive(slot, |conn, services, out| {
                conn.on_read_end(Side::Upstream, now, services, out)
            }),
        }
        self.buffers.give(buffer);
    }

    /// A receive of a closing connection completed: its buffer goes back to the pool.
    fn release_recv(&mut self, slot: u32) {
        if let Some(buffer) = self
            .table
            .get(slot)
            .and_then(Entry::io_mut)
            .and_then(|io| io.receiving.take())
        {
            self.buffers.give(buffer);
        }
    }

    /// A send of a closing connection completed: its buffer goes back to the pool.
    fn release_send(&mut self, slot: u32, op: Op) {
        let side = if op == Op::SendClient {
            Side::Client
        } else {
            Side::Upstream
        };
        if let Some(out) = self
            .table
            .get(slot)
            .and_then(|entry| entry.side(side))
            .and_then(SideIo::end_send)
        {
            if let Payload::Pooled(buffer) = out.data {
                self.buffers.give(buffer);
            }
        }
    }

    /// Removes the readiness polls in flight on both sockets of the connection in `slot`; each
    /// completes with `ECANCELED`, which `on_poll` takes as removed on purpose (and arms again
    /// if an intent was set meanwhile).
    pub(super) fn remove_polls(&mut self, slot: u32) {
        let Some(entry) = self.table.get(slot) else {
            return;
        };
        let id = entry.conn.id();
        for (side, target) in [
            (Side::Client, Op::PollClient),
            (Side::Upstream, Op::PollUpstream),
        ] {
            let Some(io) = entry.side(side) else {
                return; // No sockets, no polls.
            };
            if io.polling {
                io.poll_removed = true;
                entry.inflight += 1;
                self.ring
                    .remove_poll(target.user_data(slot, id), Op::Cancel.user_data(slot, id));
            }
        }
    }

    /// A side became readable (or the poll failed): do what the poll was armed for.
    fn on_poll(&mut self, slot: u32, side: Side, result: i32) {
        let removed = self
            .table
            .get(slot)
            .and_then(|entry| entry.side(side))
            .map(|io| std::mem::take(&mut io.poll_removed));
        if result == -libc::ECANCELED && removed == Some(true) {
            // Removed on purpose (a tunnel leaving the kernel path): if something else was
            // asked for meanwhile, the arm found this poll still in flight; poll for it now.
            let intent = self
                .table
                .get(slot)
                .and_then(|entry| entry.side(side))
                .map(|io| io.intent);
            if let Some(intent) = intent.filter(|&intent| intent != Intent::None) {
                self.arm_poll(slot, side, intent);
            }
            return;
        }
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result).to_string();
            return self.drive(slot, |conn, _, out| conn.on_poll_failed(side, &error, out));
        }
        let Some(io) = self.table.get(slot).and_then(|entry| entry.side(side)) else {
            return;
        };
        match std::mem::take(&mut io.intent) {
            Intent::None => {}
            Intent::Read => {
                self.with_actions(slot, |worker, out| worker.read_side_into(slot, side, out))
            }
            Intent::Peek => self.with_actions(slot, |worker, out| worker.peek(slot, side, out)),
            Intent::Forward => self.drive(slot, |conn, services, out| {
                conn.on_readable(side, services, out)
            }),
            Intent::WatchSpliced => {
                self.with_actions(slot, |worker, out| worker.look_at_spliced(slot, side, out))
            }
        }
    }

    fn on_connect(&mut self, slot: u32, result: i32) {
        // A connect in flight keeps the I/O state (it is dropped only with nothing in flight).
        let Some(io) = self.table.get(slot).and_then(Entry::io_mut) else {
            return;
        };
        io.connect = None;
        let now = monotonic_ns();
        if result == 0 {
            if let Some(fd) = io.upstream.fd.as_ref() {
                if let Err(error) = SockRef::from(fd).set_tcp_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY on an upstream socket");
                }
            }
            return self.drive(slot, |conn, services, out| {
                conn.on_connected(false, now, services, out)
            });
        }
        let failure = if result == -libc::ECANCELED || result == -libc::ETIMEDOUT {
            ConnectFailure::TimedOut
        } else {
            ConnectFailure::Error
        };
        io.upstream.fd = None;
        let error = io::Error::from_raw_os_error(-result).to_string();
        self.drive(slot, |conn, services, out| {
            conn.on_connect_failed(failure, &error, now, services, out)
        });
    }

    // ---- timers, pressure, backlogs -------------------------------------------------------

    fn on_timer(&mut self, key: TimerKey, now: u64) {
        let maps = self.maps.as_ref();
        let Some(entry) = self.table.get_if(key.slot, |id| id == key.id) else {
            return;
        };
        if entry.conn.is_closing() {
            return;
        }
        entry.armed_ns = u64::MAX;
        if let Some(flows) = entry.packet_flows() {
            let report = self.packet_report(&flows);
            self.drive(key.slot, |conn, services, out| {
                conn.on_packet_deadline(now, report, services, out)
            });
            return;
        }
        let io = entry.io();
        let activity = io
            .and_then(|io| io.spliced.as_deref())
            .zip(maps)
            .and_then(|(sockets, maps)| splice::last_activity(maps, sockets));
        let handshaking = io.is_some_and(|io| io.stream.is_handshaking());
        self.drive(key.slot, |conn, services, out| {
            conn.on_deadline(now, activity, handshaking, services, out)
        });
    }

    /// Pressure reports arrived: check each reported tunnel that still exists.
    fn on_inbox(&mut self, flags: u32) {
        let Some(inbox) = self.inbox.as_ref() else {
            return;
        };
        sys::clear(inbox.wake.as_raw_fd());
        let reports: Vec<Tag> = inbox.receiver.try_iter().collect();
        let adopted: Vec<super::handover::Moving> = inbox.adoptions.try_iter().collect();
        if !io_uring::cqueue::more(flags) {
            let fd = inbox.wake.as_raw_fd();
            self.ring.poll_multi(fd, Op::Wake.user_data(0, 0));
        }
        for moving in adopted {
            self.adopt(moving);
        }
        for owner in reports {
            let current = self.table.get(owner.slot).map(|entry| entry.conn.id());
            if !current.is_some_and(|id| owner.is_for(id)) {
                continue;
            }
            self.measure_pressure(owner.slot);
            self.look_for_stray_bytes(owner.slot);
        }
    }

    /// Measures the backlog towards both sides of a spliced tunnel for the connection.
    fn measure_pressure(&mut self, slot: u32) {
        let to_client = self.measure_backlog(slot, Side::Client);
        let to_upstream = self.measure_backlog(slot, Side::Upstream);
        let (Some(to_client), Some(to_upstream)) = (to_client, to_upstream) else {
            return;
        };
        let now = monotonic_ns();
        self.drive(slot, |conn, services, out| {
            conn.on_pressure(to_client, to_upstream, now, services, out)
        });
    }

    /// What the kernel still has to deliver towards `towards` (spliced tunnels only).
    pub(super) fn measure_backlog(
        &mut self,
        slot: u32,
        towards: Side,
    ) -> Option<crate::connection::Backlog> {
        let maps = self.maps.as_ref()?;
        let io = self.table.get(slot)?.io_mut()?;
        let sockets = io.spliced.as_deref().copied()?;
        let fd = io.side(towards).fd.as_ref()?;
        Some(splice::backlog(maps, &sockets, towards, fd.as_fd()))
    }

    /// Measures again the backlogs a FIN waits for, and those of tunnels with bytes still
    /// queued (once per tick; usually none).
    fn check_backlogs_again(&mut self) {
        for (slot, id) in std::mem::take(&mut self.pressure_checks) {
            let alive = self
                .table
                .get_if(slot, |current| current == id)
                .is_some_and(|entry| !entry.conn.is_closing());
            if alive {
                self.measure_pressure(slot);
            }
        }
        for (slot, id, towards) in std::mem::take(&mut self.backlog_checks) {
            let alive = self
                .table
                .get_if(slot, |current| current == id)
                .is_some_and(|entry| !entry.conn.is_closing());
            if !alive {
                continue;
            }
            if let Some(backlog) = self.measure_backlog(slot, towards) {
                self.drive(slot, |conn, _, out| {
                    conn.on_kernel_backlog(towards, backlog, out)
                });
            }
        }
    }

    // ---- the end --------------------------------------------------------------------------

    /// Frees a closed connection's slot (its sockets close with it) and writes its access line.
    pub(super) fn finish(&mut self, slot: u32) {
        let Some(mut entry) = self.table.remove(slot) else {
            return;
        };
        if entry.counted_handshake {
            // Closed before its TLS handshake finished.
            self.tls_handshakes -= 1;
        }
        let mut io = entry.drop_io();
        if let Some(io) = io.as_deref_mut() {
            self.give_back_buffers(io);
        }
        self.services
            .admission
            .release(entry.conn.counted_address());
        let spliced = io.as_ref().and_then(|io| io.spliced.as_deref());
        if let (Some(sockets), Some(program)) = (spliced, &entry.services.splice) {
            let own = Tag::new(self.index as u8, slot, entry.conn.id()).encode();
            if sockets.owner() != own {
                // Adopted from a predecessor: its reports stop here.
                program
                    .adopted_owners
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&sockets.owner());
            }
        }
        let tls = io.as_ref().and_then(|io| io.stream.negotiated());
        let packet = entry.packet.take();
        if let Some(flows) = packet.as_ref().and_then(|state| state.flows) {
            // Its sockets, if their operations were still in flight: never a FIN or a reset.
            if let Some(io) = io.take() {
                self.close_handed_io(io);
            }
            self.forget_packet_flows(&flows);
        }
        let port = packet.and_then(|state| state.port);
        if let (Some(taken), Some(path)) = (port, &entry.services.packet) {
            let local = super::packet::unspecified_for(taken.remote);
            path.ports.release(local, taken.remote, taken.port);
        }
        let mut record = entry.conn.finish(monotonic_ns(), &entry.services);
        record.tls = tls;
        record.log();
        // Dropping the I/O state closes both sockets.
        drop(io);
    }

    /// Gives the buffers of a connection's finished operations back to the pool: those of its
    /// sends, and of a receive from the upstream (only with nothing in flight: an operation
    /// in flight owns its buffer).
    pub(super) fn give_back_buffers(&mut self, io: &mut EntryIo) {
        for side in [&mut io.client, &mut io.upstream] {
            if let Some(out) = side.end_send() {
                if let Payload::Pooled(buffer) = out.data {
                    self.buffers.give(buffer);
                }
            }
        }
        if let Some(buffer) = io.receiving.take() {
            self.buffers.give(buffer);
        }
    }
}
