//! One worker: one thread, one io_uring, its own listener sockets, connections and timers.
//!
//! The worker only carries out I/O. What to do next is decided by the sans-IO pieces:
//! [`Handshake`] before the tunnel, [`Direction`] while relaying, [`TimerWheel`] for deadlines.
//! Sockets stay in blocking mode (so io_uring waits for connect and send completion itself);
//! reads are readiness-driven (a oneshot `POLL_ADD`, then `recv(MSG_DONTWAIT)`), so a connection
//! waiting for bytes holds no buffer.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::buffers::BufferPool;
use crate::clock::{duration_ns, monotonic_ns};
use crate::connection::{Action, ConnectFailure, Handshake, Rejection, RequestSummary};
use crate::handshake::BodyLength;
use crate::headers::Scheme;
use crate::listener::Listener;
use crate::runtime::token::{Op, Token};
use crate::services::Services;
use crate::splice::Owner;
use crate::timeouts::{TimerKey, TimerWheel};
use crate::tls::TlsSession;
use crate::tunnel::relay::{AfterSource, Direction};

mod kernel;
mod tls;
use kernel::SplicedState;

/// Submission queue size of each worker's ring.
const RING_ENTRIES: u32 = 4096;
/// The worker wakes at least this often (timers, shutdown flag).
const TICK: Duration = Duration::from_millis(50);
/// Buckets of the timer wheel (50 ms × 8192 ≈ 7 min per turn).
const WHEEL_SLOTS: usize = 8192;
/// How long a rejected client may keep sending before its socket is closed (lingering close, so
/// the error answer is not destroyed by a reset).
const LINGER_NS: u64 = 2_000_000_000;
/// Size of the scratch buffer for request/response head reads.
const SCRATCH: usize = 64 * 1024;
/// Free relay buffers a worker keeps for reuse.
const KEEP_BUFFERS: usize = 256;

/// A fatal worker error (the ring could not be created or used).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating the io_uring failed (old kernel, `io_uring_disabled`, memlock limit).
    #[error("cannot create io_uring: {0}")]
    Ring(#[source] io::Error),
    /// Submitting to the ring failed.
    #[error("io_uring submit failed: {0}")]
    Submit(#[source] io::Error),
}

/// Bytes being written to one socket.
#[derive(Debug)]
enum Payload {
    Owned(Vec<u8>),
    Pooled(Box<[u8]>),
}

#[derive(Debug)]
struct Outgoing {
    data: Payload,
    pos: usize,
    len: usize,
}

impl Outgoing {
    fn owned(bytes: Vec<u8>) -> Outgoing {
        let len = bytes.len();
        Outgoing {
            data: Payload::Owned(bytes),
            pos: 0,
            len,
        }
    }

    fn remaining(&self) -> &[u8] {
        let bytes: &[u8] = match &self.data {
            Payload::Owned(v) => v,
            Payload::Pooled(b) => b,
        };
        &bytes[self.pos..self.len]
    }
}

/// One socket of a connection and the operations pending on it.
#[derive(Debug, Default)]
struct Side {
    fd: Option<OwnedFd>,
    /// A readiness poll is in flight.
    polling: bool,
    /// A send is in flight with these bytes.
    out: Option<Outgoing>,
}

impl Side {
    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Client,
    Upstream,
}

/// The relay's state once the upgrade is answered.
#[derive(Debug)]
struct TunnelState {
    /// Client → upstream.
    up: Direction,
    /// Upstream → client.
    down: Direction,
    last_activity_ns: u64,
    idle_ns: u64,
    status: u16,
}

#[derive(Debug)]
enum Stage {
    Handshake(Box<Handshake>),
    /// An error answer is being sent (in `client.out`), then the client is drained until EOF.
    Rejecting {
        status: u16,
        lingering: bool,
    },
    /// Userspace relay (or the relay of a refused upgrade's answer).
    Tunnel(TunnelState),
    /// Kernel path: the client's pipelined bytes are being sent upstream before the splice.
    Handoff,
    /// Kernel path: the sockmap program moves the bytes.
    Spliced(SplicedState),
}

/// Arguments of an in-flight connect; the kernel reads them at submission, they live until then.
#[derive(Debug)]
struct ConnectArgs {
    addr: SockAddr,
    timeout: types::Timespec,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    started_ns: u64,
    client_addr: SocketAddr,
    client: Side,
    upstream: Side,
    /// Operations submitted and not yet completed; the slot is freed only at zero.
    inflight: u32,
    deadline_ns: u64,
    /// The earliest reminder armed in the wheel for this connection.
    armed_ns: u64,
    stage: Stage,
    closing: Option<String>,
    summary: RequestSummary,
    upstream_addr: Option<SocketAddr>,
    connect: Option<Box<ConnectArgs>>,
    /// This tunnel goes to the kernel path once upgraded (plain listener, program loaded).
    kernel: bool,
    /// The client's TLS session (`wss://` listener): client bytes pass through it both ways.
    tls: Option<Box<TlsSession>>,
}

#[derive(Debug)]
struct ListenerSlot {
    listener: Option<Listener>,
    accepting: bool,
}

/// Where a worker receives pressure reports (kernel path): a channel and the eventfd that
/// wakes its ring.
pub struct Inbox {
    /// Reports from the pressure watcher.
    pub receiver: std::sync::mpsc::Receiver<Owner>,
    /// Readable when reports are waiting.
    pub wake: Arc<OwnedFd>,
}

/// One worker thread's state.
pub struct Worker {
    index: usize,
    inbox: Option<Inbox>,
    ring: IoUring,
    services: Arc<Services>,
    listeners: Vec<ListenerSlot>,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<u32>,
    live: usize,
    next_id: u64,
    wheel: TimerWheel,
    buffers: BufferPool,
    scratch: Box<[u8]>,
    tick: Box<types::Timespec>,
    shutdown: Arc<AtomicBool>,
    drain_deadline_ns: Option<u64>,
    /// The periodic tick completed since the last loop turn.
    ticked: bool,
    /// Kernel-path FINs waiting until the kernel has delivered what it redirected.
    fin_pending: Vec<(u32, u64, Which)>,
    /// When the last "accept failed" warning was logged.
    last_accept_warning_ns: u64,
}

impl Worker {
    /// A worker serving `listeners` (its own `SO_REUSEPORT` sockets).
    pub fn new(
        index: usize,
        services: Arc<Services>,
        listeners: Vec<Listener>,
        shutdown: Arc<AtomicBool>,
        inbox: Option<Inbox>,
    ) -> Result<Worker, WorkerError> {
        let ring = IoUring::new(RING_ENTRIES).map_err(WorkerError::Ring)?;
        let relay_buffer = services.relay_buffer;
        Ok(Worker {
            index,
            inbox,
            ring,
            services,
            listeners: listeners
                .into_iter()
                .map(|listener| ListenerSlot {
                    listener: Some(listener),
                    accepting: false,
                })
                .collect(),
            conns: Vec::new(),
            free_slots: Vec::new(),
            live: 0,
            next_id: 1,
            wheel: TimerWheel::new(TICK, WHEEL_SLOTS, monotonic_ns()),
            buffers: BufferPool::new(relay_buffer, KEEP_BUFFERS),
            scratch: vec![0; SCRATCH].into_boxed_slice(),
            tick: Box::new(types::Timespec::from(TICK)),
            shutdown,
            drain_deadline_ns: None,
            ticked: false,
            fin_pending: Vec::new(),
            last_accept_warning_ns: 0,
        })
    }

    /// Runs until shutdown has been requested and every connection is gone.
    pub fn run(mut self) -> Result<(), WorkerError> {
        for index in 0..self.listeners.len() {
            self.arm_accept(index);
        }
        self.arm_tick();
        self.arm_inbox();
        let mut completions = Vec::with_capacity(1024);
        let mut fired = Vec::new();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(WorkerError::Submit(e)),
            }
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
            );
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
                self.check_pending_fins();
            }
            if self.manage_shutdown(now) {
                tracing::debug!(worker = self.index, "worker stopped");
                return Ok(());
            }
        }
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
                    tunnels = self.live,
                    "shutting down: no new connections, draining open ones"
                );
                for index in 0..self.listeners.len() {
                    self.stop_accepting(index);
                }
                deadline
            }
        };
        if now >= deadline {
            for slot in 0..self.conns.len() {
                if self.conns[slot].is_some() {
                    self.begin_close(slot as u32, "drain deadline reached".into(), false);
                }
            }
        }
        self.live == 0 && self.listeners.iter().all(|l| l.listener.is_none())
    }

    fn stop_accepting(&mut self, index: usize) {
        let slot = &mut self.listeners[index];
        let Some(listener) = slot.listener.as_ref() else {
            return;
        };
        if slot.accepting {
            let cancel = opcode::AsyncCancel2::new(
                types::CancelBuilder::fd(types::Fd(listener.socket.as_raw_fd())).all(),
            )
            .build()
            .user_data(Token::new(Op::CancelAccept, index as u32, 0).encode());
            self.push(cancel);
            // The listener is closed when its accept completes without "more".
        } else {
            slot.listener = None;
        }
    }

    // ---- submission helpers ---------------------------------------------------------------

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer in the entries we build points into memory owned by a
            // `Conn` (its `Outgoing` buffers and boxed `ConnectArgs`) or by the worker (`tick`),
            // which stays allocated and unmoved until the operation's completion is reaped:
            // a connection slot is only freed when its `inflight` count is back to zero.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Submission queue full: hand what is queued to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed while the queue was full");
            }
        }
    }

    fn arm_tick(&mut self) {
        let entry = opcode::Timeout::new(&*self.tick as *const types::Timespec)
            .build()
            .user_data(Token::new(Op::Tick, 0, 0).encode());
        self.push(entry);
    }

    fn arm_inbox(&mut self) {
        let Some(inbox) = self.inbox.as_ref() else {
            return;
        };
        let entry = opcode::PollAdd::new(types::Fd(inbox.wake.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(Token::new(Op::Wake, 0, 0).encode());
        self.push(entry);
    }

    /// Pressure reports arrived: check each reported tunnel that still exists.
    fn on_inbox(&mut self, flags: u32) {
        let Some(inbox) = self.inbox.as_ref() else {
            return;
        };
        let mut counter = 0u64;
        // SAFETY: reading 8 bytes into a valid u64 from a non-blocking eventfd.
        unsafe { libc::read(inbox.wake.as_raw_fd(), (&mut counter as *mut u64).cast(), 8) };
        let reports: Vec<Owner> = inbox.receiver.try_iter().collect();
        if !io_uring::cqueue::more(flags) {
            self.arm_inbox();
        }
        for owner in reports {
            let current = self.conns.get(owner.slot as usize).and_then(Option::as_ref);
            if current.is_some_and(|conn| conn.id & 0xff_ffff == u64::from(owner.generation)) {
                self.check_pressure(owner.slot);
            }
        }
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

    fn arm_accept(&mut self, index: usize) {
        let Some(listener) = self.listeners[index].listener.as_ref() else {
            return;
        };
        let entry = opcode::AcceptMulti::new(types::Fd(listener.socket.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(Token::new(Op::Accept, index as u32, 0).encode());
        self.listeners[index].accepting = true;
        self.push(entry);
    }

    fn submit_for(&mut self, slot: u32, entry: squeue::Entry) {
        if let Some(conn) = self.conns[slot as usize].as_mut() {
            conn.inflight += 1;
        }
        self.push(entry);
    }

    fn conn(&mut self, slot: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).and_then(Option::as_mut)
    }

    fn arm_poll(&mut self, slot: u32, which: Which) {
        let Some(conn) = self.conn(slot) else { return };
        let id = conn.id;
        let side = conn.side_mut(which);
        if side.polling || side.fd.is_none() {
            return;
        }
        side.polling = true;
        let fd = side.raw();
        let op = match which {
            Which::Client => Op::PollClient,
            Which::Upstream => Op::PollUpstream,
        };
        let entry = opcode::PollAdd::new(types::Fd(fd), (libc::POLLIN | libc::POLLRDHUP) as u32)
            .build()
            .user_data(Token::new(op, slot, id).encode());
        self.submit_for(slot, entry);
    }

    /// Submits a send of `side.out`'s remaining bytes.
    fn submit_send(&mut self, slot: u32, which: Which) {
        let Some(conn) = self.conn(slot) else { return };
        let id = conn.id;
        let side = conn.side_mut(which);
        let fd = side.raw();
        let Some(out) = side.out.as_ref() else { return };
        let bytes = out.remaining();
        // Relay buffers and heads are far below 4 GiB; a larger send is split by the kernel anyway.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let op = match which {
            Which::Client => Op::SendClient,
            Which::Upstream => Op::SendUpstream,
        };
        let entry = opcode::Send::new(types::Fd(fd), bytes.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(Token::new(op, slot, id).encode());
        self.submit_for(slot, entry);
    }

    /// Sends `out` to one side. Bytes for a TLS client are encrypted first: they go into its
    /// session, and the ciphertext is sent in their place.
    fn send(&mut self, slot: u32, which: Which, out: Outgoing) {
        let Some(conn) = self.conn(slot) else { return };
        if let (Which::Client, Some(session)) = (which, conn.tls.as_deref_mut()) {
            session.write_plaintext(out.remaining());
            if let Payload::Pooled(buffer) = out.data {
                self.buffers.give(buffer);
            }
            self.flush_tls(slot);
            return;
        }
        conn.side_mut(which).out = Some(out);
        self.submit_send(slot, which);
    }

    fn set_deadline(&mut self, slot: u32, deadline_ns: u64) {
        let Some(conn) = self.conn(slot) else { return };
        conn.deadline_ns = deadline_ns;
        if deadline_ns < conn.armed_ns {
            conn.armed_ns = deadline_ns;
            let key = TimerKey { slot, id: conn.id };
            self.wheel.arm(key, deadline_ns);
        }
    }

    // ---- completions ----------------------------------------------------------------------

    fn complete(&mut self, user_data: u64, result: i32, flags: u32) {
        let Some(token) = Token::decode(user_data) else {
            tracing::error!(user_data, "completion with an unknown token");
            return;
        };
        match token.op {
            Op::Tick => {
                self.ticked = true;
                self.arm_tick();
                self.rearm_idle_listeners();
            }
            Op::Accept => self.on_accept(token.slot as usize, result, flags),
            Op::CancelAccept => {}
            Op::Wake => self.on_inbox(flags),
            _ => self.complete_for_conn(token, result),
        }
    }

    fn complete_for_conn(&mut self, token: Token, result: i32) {
        let slot = token.slot;
        let Some(conn) = self.conn(slot) else {
            tracing::error!(?token, "completion for a free connection slot");
            return;
        };
        if !token.is_for(conn.id) {
            tracing::error!(?token, "completion for a previous connection of this slot");
            return;
        }
        conn.inflight -= 1;
        match token.op {
            Op::PollClient => conn.client.polling = false,
            Op::PollUpstream => conn.upstream.polling = false,
            _ => {}
        }
        if conn.closing.is_some() {
            if conn.inflight == 0 {
                self.finish(slot);
            }
            return;
        }
        match token.op {
            Op::PollClient => self.on_readable(slot, Which::Client, result),
            Op::PollUpstream => self.on_readable(slot, Which::Upstream, result),
            Op::SendClient => self.on_sent(slot, Which::Client, result),
            Op::SendUpstream => self.on_sent(slot, Which::Upstream, result),
            Op::Connect => self.on_connect(slot, result),
            Op::ConnectTimeout | Op::Cancel => {}
            Op::Accept | Op::Tick | Op::CancelAccept | Op::Wake => {}
        }
        if let Some(conn) = self.conn(slot) {
            if conn.closing.is_some() && conn.inflight == 0 {
                self.finish(slot);
            }
        }
    }

    fn on_accept(&mut self, index: usize, result: i32, flags: u32) {
        if !io_uring::cqueue::more(flags) {
            self.listeners[index].accepting = false;
            let out_of_descriptors = result == -libc::EMFILE || result == -libc::ENFILE;
            if self.drain_deadline_ns.is_some() {
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
        let (scheme, tls) = self.listeners[index]
            .listener
            .as_ref()
            .map_or((Scheme::Ws, None), |l| (l.scheme, l.tls.clone()));
        self.open(fd, scheme, tls);
    }

    fn open(&mut self, fd: OwnedFd, scheme: Scheme, tls: Option<Arc<rustls::ServerConfig>>) {
        let socket = SockRef::from(&fd);
        let client_addr = match socket.peer_addr().map(|a| a.as_socket()) {
            Ok(Some(addr)) => addr,
            Ok(None) | Err(_) => {
                tracing::debug!("accepted a connection that is already gone");
                return;
            }
        };
        if let Err(error) = socket.set_tcp_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY on a client socket");
        }
        let tls = match tls.map(|config| TlsSession::new(&config)).transpose() {
            Ok(tls) => tls.map(Box::new),
            Err(error) => {
                tracing::warn!(client = %client_addr, %error, "cannot start a TLS session");
                return;
            }
        };
        let now = monotonic_ns();
        let id = self.next_id;
        self.next_id += 1;
        let handshake = Handshake::new(client_addr, scheme);
        let first = handshake.start();
        let conn = Conn {
            id,
            started_ns: now,
            client_addr,
            client: Side {
                fd: Some(fd),
                ..Side::default()
            },
            upstream: Side::default(),
            inflight: 0,
            deadline_ns: u64::MAX,
            armed_ns: u64::MAX,
            stage: Stage::Handshake(Box::new(handshake)),
            closing: None,
            summary: RequestSummary::default(),
            upstream_addr: None,
            connect: None,
            kernel: self.services.splice.is_some() && scheme == Scheme::Ws,
            tls,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.conns[slot as usize] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.live += 1;
        self.services.metrics.connections_accepted.inc();
        self.services.metrics.connections_open.inc();
        let handshake_ns = self.services.handshake_ns;
        self.set_deadline(slot, now.saturating_add(handshake_ns));
        self.apply(slot, first);
    }

    fn on_readable(&mut self, slot: u32, which: Which, result: i32) {
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            self.begin_close(slot, format!("poll on {which:?} failed: {error}"), false);
            return;
        }
        let Some(conn) = self.conn(slot) else { return };
        match &conn.stage {
            Stage::Handshake(_) => self.read_head(slot, which),
            Stage::Rejecting { .. } => self.discard_client(slot),
            Stage::Tunnel(_) => self.pump(slot, which),
            Stage::Spliced(_) => self.on_spliced_readable(slot, which),
            Stage::Handoff => {}
        }
    }

    /// Reads a head's bytes (request or response) into the scratch buffer and feeds the
    /// handshake machine.
    fn read_head(&mut self, slot: u32, which: Which) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let fd = conn.side_mut(which).raw();
        // Kernel path: the response head is only peeked, so it stays queued for the splice.
        let peek = which == Which::Upstream && conn.kernel;
        let flags = if peek { libc::MSG_PEEK } else { 0 };
        let read = match (which, conn.tls.as_deref_mut()) {
            (Which::Client, Some(session)) => tls::read(fd, session, &mut self.scratch),
            _ => recv_flags(fd, &mut self.scratch, flags),
        };
        if which == Which::Client && conn.tls.is_some() {
            if let Err(error) = &read {
                if error.kind() == io::ErrorKind::InvalidData {
                    return self.fail_tls(slot, error);
                }
            }
            self.after_tls_read(slot);
        }
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let services = Arc::clone(&self.services);
        let now = monotonic_ns();
        let Stage::Handshake(machine) = &mut conn.stage else {
            return;
        };
        let action = match (which, read) {
            (_, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                self.arm_poll(slot, which);
                return;
            }
            (Which::Client, Ok(0)) | (Which::Client, Err(_)) => machine.on_client_eof(),
            (Which::Client, Ok(n)) => machine.on_client_data(&self.scratch[..n], &services, now),
            (Which::Upstream, Ok(0)) | (Which::Upstream, Err(_)) => machine.on_upstream_eof(),
            (Which::Upstream, Ok(n)) if peek => {
                let action = machine.on_upstream_peek(&self.scratch[..n], &services);
                match &action {
                    // Wait until more than the `n` bytes already seen are queued.
                    Action::ReadUpstream => set_rcvlowat(fd, n + 1),
                    // Spliced: the kernel delivers the peeked head.
                    Action::Tunnel { .. } => {}
                    // Any other outcome consumes what was seen and goes on in userspace.
                    _ => {
                        set_rcvlowat(fd, 1);
                        let _ = recv_flags(fd, &mut self.scratch[..n], 0);
                    }
                }
                action
            }
            (Which::Upstream, Ok(n)) => machine.on_upstream_data(&self.scratch[..n], &services),
        };
        conn.summary = machine.summary().clone();
        self.apply(slot, action);
    }

    /// Lingering close of a rejected client: read and drop until EOF, error or deadline.
    fn discard_client(&mut self, slot: u32) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let fd = conn.client.raw();
        loop {
            match recv(fd, &mut self.scratch) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.arm_poll(slot, Which::Client);
                    return;
                }
                Err(_) => break,
            }
        }
        self.begin_close(slot, "rejected".into(), false);
    }

    fn on_sent(&mut self, slot: u32, which: Which, result: i32) {
        if result < 0 {
            let error = io::Error::from_raw_os_error(-result);
            let abortive = result == -libc::ECONNRESET || result == -libc::EPIPE;
            self.begin_close(slot, format!("send to {which:?} failed: {error}"), abortive);
            return;
        }
        let Some(conn) = self.conn(slot) else { return };
        let side = conn.side_mut(which);
        let Some(out) = side.out.as_mut() else { return };
        out.pos += result as usize;
        if out.pos < out.len {
            self.submit_send(slot, which);
            return;
        }
        if let Some(Outgoing {
            data: Payload::Pooled(buffer),
            ..
        }) = side.out.take()
        {
            self.buffers.give(buffer);
        }
        if which == Which::Client && self.conn(slot).is_some_and(|conn| conn.tls.is_some()) {
            // Everything the session queued goes out before the stage learns the send is done;
            // TLS handshake flights are not the stage's sends at all.
            if self.flush_tls(slot) {
                return;
            }
            if matches!(self.conn(slot).map(|c| &c.stage), Some(Stage::Handshake(_))) {
                return;
            }
        }
        let Some(conn) = self.conn(slot) else { return };
        match &mut conn.stage {
            Stage::Handshake(machine) => {
                let action = machine.on_request_sent();
                self.apply(slot, action);
            }
            Stage::Rejecting { lingering, .. } => {
                *lingering = true;
                shutdown_write(conn.client.raw());
                let now = monotonic_ns();
                self.set_deadline(slot, now + LINGER_NS);
                self.arm_poll(slot, Which::Client);
            }
            Stage::Tunnel(_) => {
                // The destination is free again: read the next chunk from its source.
                self.pump(slot, which.peer());
            }
            Stage::Handoff => self.splice_now(slot),
            Stage::Spliced(_) => {}
        }
    }

    fn on_connect(&mut self, slot: u32, result: i32) {
        let services = Arc::clone(&self.services);
        let now = monotonic_ns();
        let Some(conn) = self.conn(slot) else { return };
        conn.connect = None;
        let Stage::Handshake(machine) = &mut conn.stage else {
            return;
        };
        let action = if result == 0 {
            if let Some(fd) = conn.upstream.fd.as_ref() {
                if let Err(error) = SockRef::from(fd).set_tcp_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY on an upstream socket");
                }
            }
            machine.on_connected()
        } else {
            let failure = if result == -libc::ECANCELED || result == -libc::ETIMEDOUT {
                ConnectFailure::TimedOut
            } else {
                ConnectFailure::Error
            };
            tracing::info!(
                upstream = ?conn.upstream_addr,
                error = %io::Error::from_raw_os_error(-result),
                "upstream connect failed"
            );
            conn.upstream.fd = None;
            services.metrics.upstream_connect_failures.inc();
            machine.on_connect_failed(failure, &services, now)
        };
        self.apply(slot, action);
    }

    fn on_timer(&mut self, key: TimerKey, now: u64) {
        let Some(conn) = self
            .conns
            .get_mut(key.slot as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        if conn.id != key.id || conn.closing.is_some() {
            return;
        }
        conn.armed_ns = u64::MAX;
        let deadline = match &conn.stage {
            Stage::Tunnel(tunnel) => tunnel.last_activity_ns.saturating_add(tunnel.idle_ns),
            Stage::Spliced(state) => match self.services.splice.as_ref() {
                Some(program) => {
                    let program = program
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    kernel::last_activity(&program, state).saturating_add(state.idle_ns)
                }
                None => conn.deadline_ns,
            },
            _ => conn.deadline_ns,
        };
        if now < deadline {
            self.set_deadline(key.slot, deadline);
            return;
        }
        let tls_unfinished = conn.tls.as_ref().is_some_and(|s| s.is_handshaking());
        match &mut conn.stage {
            Stage::Handshake(_) if tls_unfinished => {
                self.services.metrics.tls_failures.inc();
                self.begin_close(key.slot, "TLS handshake timed out".into(), false);
            }
            Stage::Handshake(machine) => {
                let action = machine.on_deadline();
                self.apply(key.slot, action);
            }
            Stage::Rejecting { .. } => self.begin_close(key.slot, "rejected".into(), false),
            Stage::Tunnel(TunnelState { idle_ns, .. })
            | Stage::Spliced(SplicedState { idle_ns, .. }) => {
                self.services.metrics.idle_timeouts.inc();
                let reason = format!("idle timeout ({} ms without traffic)", *idle_ns / 1_000_000);
                self.begin_close(key.slot, reason, false);
            }
            Stage::Handoff => {}
        }
    }

    // ---- actions --------------------------------------------------------------------------

    fn apply(&mut self, slot: u32, action: Action) {
        match action {
            Action::ReadClient => {
                let buffered = self
                    .conn(slot)
                    .and_then(|conn| conn.tls.as_deref_mut())
                    .is_some_and(TlsSession::has_plaintext);
                if buffered {
                    // TLS: the rest of the head may already be decrypted; no poll would fire.
                    self.read_head(slot, Which::Client);
                } else {
                    self.arm_poll(slot, Which::Client);
                }
            }
            Action::ReadUpstream => self.arm_poll(slot, Which::Upstream),
            Action::Connect(addr) => self.connect(slot, addr),
            Action::SendRequest(bytes) => self.send(slot, Which::Upstream, Outgoing::owned(bytes)),
            Action::Reject(rejection) => self.reject(slot, rejection),
            Action::Tunnel {
                to_client,
                to_upstream,
            } => {
                if self.conn(slot).is_some_and(|conn| conn.kernel) {
                    self.hand_off_to_kernel(slot, to_upstream);
                } else {
                    self.start_relay(slot, to_client, to_upstream);
                }
            }
            Action::Refused {
                status,
                to_client,
                remaining,
            } => {
                let down = match remaining {
                    BodyLength::Known(n) => Direction::bounded(n as u64),
                    BodyLength::UntilClose => Direction::unbounded(),
                };
                self.start_tunnel(slot, to_client, Vec::new(), down, status);
            }
            Action::Close(reason) => self.begin_close(slot, reason, false),
        }
    }

    fn connect(&mut self, slot: u32, addr: SocketAddr) {
        let connect_timeout = self.services.connect_timeout;
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .and_then(|socket| socket.set_cloexec(true).map(|()| socket));
        let socket = match socket {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "cannot create an upstream socket");
                let services = Arc::clone(&self.services);
                let now = monotonic_ns();
                let Some(conn) = self.conn(slot) else { return };
                let Stage::Handshake(machine) = &mut conn.stage else {
                    return;
                };
                let action = machine.on_connect_failed(ConnectFailure::Local, &services, now);
                self.apply(slot, action);
                return;
            }
        };
        let Some(conn) = self.conn(slot) else { return };
        let id = conn.id;
        conn.upstream_addr = Some(addr);
        conn.upstream.fd = Some(socket.into());
        let args = conn.connect.insert(Box::new(ConnectArgs {
            addr: SockAddr::from(addr),
            timeout: types::Timespec::from(connect_timeout),
        }));
        let connect = opcode::Connect::new(
            types::Fd(conn.upstream.raw()),
            args.addr.as_ptr().cast(),
            args.addr.len(),
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(Token::new(Op::Connect, slot, id).encode());
        let timeout = opcode::LinkTimeout::new(&args.timeout as *const types::Timespec)
            .build()
            .user_data(Token::new(Op::ConnectTimeout, slot, id).encode());
        // The linked pair must sit in the queue together: make room for both first.
        let free = {
            let queue = self.ring.submission();
            queue.capacity() - queue.len()
        };
        if free < 2 {
            if let Err(error) = self.ring.submit() {
                tracing::error!(%error, "io_uring submit failed");
            }
        }
        self.submit_for(slot, connect);
        self.submit_for(slot, timeout);
    }

    fn reject(&mut self, slot: u32, rejection: Rejection) {
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        tracing::info!(
            client = %conn.client_addr,
            status = rejection.status,
            reason = %rejection.reason,
            "request rejected"
        );
        self.services.metrics.requests_rejected.inc();
        conn.stage = Stage::Rejecting {
            status: rejection.status,
            lingering: false,
        };
        // Anything still pending on the upstream (a connect, a response read) is abandoned.
        if conn.upstream.fd.is_some() {
            let fd = conn.upstream.raw();
            self.cancel_fd(slot, fd);
        }
        self.send(slot, Which::Client, Outgoing::owned(rejection.response));
        // TLS: the answer is followed by close_notify, then the FIN (once all is sent).
        if let Some(session) = self.conn(slot).and_then(|c| c.tls.as_deref_mut()) {
            session.close_notify();
            self.flush_tls(slot);
        }
    }

    /// Userspace relay of an upgraded tunnel.
    fn start_relay(&mut self, slot: u32, to_client: Vec<u8>, to_upstream: Vec<u8>) {
        self.start_tunnel(slot, to_client, to_upstream, Direction::unbounded(), 101);
    }

    /// The idle timeout of the connection's route, in ns.
    fn route_idle_ns(&self, slot: u32) -> u64 {
        self.conns[slot as usize]
            .as_ref()
            .and_then(|conn| conn.summary.route)
            .and_then(|route| self.services.routes.get(route))
            .map_or(u64::MAX, |route| route.idle_ns)
    }

    fn start_tunnel(
        &mut self,
        slot: u32,
        to_client: Vec<u8>,
        to_upstream: Vec<u8>,
        down: Direction,
        status: u16,
    ) {
        let now = monotonic_ns();
        let services = Arc::clone(&self.services);
        let idle_ns = self.route_idle_ns(slot);
        let Some(conn) = self.conn(slot) else { return };
        let up = if status == 101 {
            Direction::unbounded()
        } else {
            Direction::closed()
        };
        conn.stage = Stage::Tunnel(TunnelState {
            up,
            down,
            last_activity_ns: now,
            idle_ns,
            status,
        });
        conn.deadline_ns = now.saturating_add(idle_ns);
        if status == 101 {
            tracing::debug!(client = %conn.client_addr, upstream = ?conn.upstream_addr, "tunnel open");
            services.metrics.tunnels_opened.inc();
            services.metrics.tunnels_open.inc();
        } else {
            services.metrics.upgrades_refused.inc();
        }
        let deadline = now.saturating_add(idle_ns);
        self.set_deadline(slot, deadline);
        self.start_direction(slot, Which::Client, to_client);
        if status == 101 {
            self.start_direction(slot, Which::Upstream, to_upstream);
        }
    }

    /// Sends `first` to `destination` before anything else, or starts reading its source.
    fn start_direction(&mut self, slot: u32, destination: Which, first: Vec<u8>) {
        if first.is_empty() {
            self.pump(slot, destination.peer());
        } else {
            if let Some(Stage::Tunnel(tunnel)) = self.conn(slot).map(|c| &mut c.stage) {
                tunnel.direction_to(destination).bytes += first.len() as u64;
            }
            self.send(slot, destination, Outgoing::owned(first));
        }
    }

    /// Moves the next chunk from `source` towards its peer, if the peer is free to take it.
    fn pump(&mut self, slot: u32, source: Which) {
        let destination = source.peer();
        let capacity = self.services.relay_buffer;
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return;
        };
        if conn.side_mut(destination).out.is_some() {
            return; // backpressure: one chunk in flight per direction
        }
        let source_fd = conn.side_mut(source).raw();
        let destination_fd = conn.side_mut(destination).raw();
        let Some((direction, _)) = conn.stage.relay_mut(destination) else {
            return;
        };
        let budget = direction.read_budget(capacity);
        if budget == 0 {
            self.flush_direction(slot, destination, destination_fd);
            return;
        }
        let mut buffer = self.buffers.take();
        let read = match (source, conn.tls.as_deref_mut()) {
            (Which::Client, Some(session)) => tls::read(source_fd, session, &mut buffer[..budget]),
            _ => recv(source_fd, &mut buffer[..budget]),
        };
        if source == Which::Client && conn.tls.is_some() {
            if let Err(error) = &read {
                if error.kind() == io::ErrorKind::InvalidData {
                    self.buffers.give(buffer);
                    return self.fail_tls(slot, error);
                }
            }
            // A key update or alert from the client may need an answer.
            self.flush_tls(slot);
        }
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            self.buffers.give(buffer);
            return;
        };
        let Some((direction, last_activity_ns)) = conn.stage.relay_mut(destination) else {
            self.buffers.give(buffer);
            return;
        };
        match read {
            Ok(0) => {
                self.buffers.give(buffer);
                direction.on_source_eof();
                self.flush_direction(slot, destination, destination_fd);
            }
            Ok(n) => {
                direction.on_read(n);
                *last_activity_ns = monotonic_ns();
                self.services.metrics.relayed_bytes_userspace.add(n as u64);
                let out = Outgoing {
                    data: Payload::Pooled(buffer),
                    pos: 0,
                    len: n,
                };
                self.send(slot, destination, out);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.buffers.give(buffer);
                self.arm_poll(slot, source);
            }
            Err(error) => {
                self.buffers.give(buffer);
                let abortive = error.raw_os_error() == Some(libc::ECONNRESET);
                self.begin_close(
                    slot,
                    format!("read from {source:?} failed: {error}"),
                    abortive,
                );
            }
        }
    }

    /// The direction towards `destination` has nothing in flight and its source is exhausted:
    /// pass the FIN on, and close the connection once both directions are done.
    fn flush_direction(&mut self, slot: u32, destination: Which, destination_fd: RawFd) {
        let Some(conn) = self.conn(slot) else { return };
        if destination == Which::Client {
            if let Some(session) = conn.tls.as_deref_mut() {
                let source_done = conn
                    .stage
                    .relay_mut(destination)
                    .is_some_and(|(direction, _)| direction.source_done());
                if source_done && !session.closing() {
                    // close_notify goes before the FIN; its send completion brings us back.
                    session.close_notify();
                    self.flush_tls(slot);
                    return;
                }
            }
        }
        let Some(conn) = self.conn(slot) else { return };
        let Some((direction, _)) = conn.stage.relay_mut(destination) else {
            return;
        };
        if direction.after_flush() == AfterSource::ShutDownDestination {
            shutdown_write(destination_fd);
        }
        let reason = match &mut conn.stage {
            Stage::Tunnel(tunnel) if tunnel.up.finished() && tunnel.down.finished() => {
                if tunnel.status == 101 {
                    "both sides closed"
                } else {
                    "refused upgrade relayed"
                }
            }
            _ => return,
        };
        self.begin_close(slot, reason.into(), false);
    }

    // ---- close ----------------------------------------------------------------------------

    fn cancel_fd(&mut self, slot: u32, fd: RawFd) {
        let Some(conn) = self.conn(slot) else { return };
        let id = conn.id;
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(Token::new(Op::Cancel, slot, id).encode());
        self.submit_for(slot, entry);
    }

    /// Starts closing a connection: cancels its pending operations; the slot is freed (and the
    /// sockets closed) once every operation has completed.
    fn begin_close(&mut self, slot: u32, reason: String, abortive: bool) {
        let Some(conn) = self.conn(slot) else { return };
        if conn.closing.is_some() {
            return;
        }
        conn.closing = Some(reason);
        let spliced = matches!(conn.stage, Stage::Spliced(_));
        if spliced {
            self.unsplice(slot);
        }
        if !abortive {
            self.tls_goodbye(slot);
        }
        let Some(conn) = self.conn(slot) else { return };
        if abortive {
            // Propagate a reset: close with SO_LINGER 0 sends RST instead of FIN.
            for side in [&conn.client, &conn.upstream] {
                if let Some(fd) = side.fd.as_ref() {
                    let _ = SockRef::from(fd).set_linger(Some(Duration::ZERO));
                }
            }
        }
        if conn.inflight == 0 {
            self.finish(slot);
            return;
        }
        let fds = [conn.client.raw(), conn.upstream.raw()];
        for fd in fds.into_iter().filter(|&fd| fd >= 0) {
            self.cancel_fd(slot, fd);
        }
    }

    fn finish(&mut self, slot: u32) {
        let Some(mut conn) = self.conns[slot as usize].take() else {
            return;
        };
        self.free_slots.push(slot);
        self.live -= 1;
        let metrics = &self.services.metrics;
        metrics.connections_open.dec();
        if let Stage::Tunnel(TunnelState { status: 101, .. }) | Stage::Spliced(_) = conn.stage {
            metrics.tunnels_open.dec();
        }
        for side in [&mut conn.client, &mut conn.upstream] {
            if let Some(Outgoing {
                data: Payload::Pooled(buffer),
                ..
            }) = side.out.take()
            {
                self.buffers.give(buffer);
            }
        }
        log_access(&conn);
        // Dropping `conn` closes both sockets.
    }
}

impl Conn {
    fn side_mut(&mut self, which: Which) -> &mut Side {
        match which {
            Which::Client => &mut self.client,
            Which::Upstream => &mut self.upstream,
        }
    }
}

impl Which {
    fn peer(self) -> Which {
        match self {
            Which::Client => Which::Upstream,
            Which::Upstream => Which::Client,
        }
    }
}

impl Stage {
    /// The userspace-relayed direction towards `destination` and the activity stamp its
    /// traffic moves.
    fn relay_mut(&mut self, destination: Which) -> Option<(&mut Direction, &mut u64)> {
        match self {
            Stage::Tunnel(TunnelState {
                up,
                down,
                last_activity_ns,
                ..
            }) => {
                let direction = match destination {
                    Which::Upstream => up,
                    Which::Client => down,
                };
                Some((direction, last_activity_ns))
            }
            _ => None,
        }
    }
}

impl TunnelState {
    /// The direction whose bytes go to `destination`.
    fn direction_to(&mut self, destination: Which) -> &mut Direction {
        match destination {
            Which::Upstream => &mut self.up,
            Which::Client => &mut self.down,
        }
    }
}

/// One access line per request (DESIGN.md §7): JSON on the `wsplice::access` target.
/// Connections that never sent a request (port probes, scanners) log at debug only.
fn log_access(conn: &Conn) {
    if matches!(conn.stage, Stage::Handshake(_)) && conn.summary.host.is_empty() {
        tracing::debug!(
            client = %conn.client_addr,
            reason = conn.closing.as_deref().unwrap_or(""),
            "connection closed before a request"
        );
        return;
    }
    let (status, bytes_up, bytes_down, datapath) = match &conn.stage {
        Stage::Tunnel(t) => (t.status, t.up.bytes, t.down.bytes, "userspace"),
        Stage::Spliced(s) => (101, s.bytes_up, s.bytes_down, "kernel"),
        Stage::Rejecting { status, .. } => (*status, 0, 0, ""),
        Stage::Handshake(_) | Stage::Handoff => (0, 0, 0, ""),
    };
    let tls = conn.tls.as_ref().map(|session| match session.negotiated() {
        Some(done) => serde_json::json!({
            "version": done.version,
            "suite": done.suite,
            "sni": done.server_name,
            "resumed": done.resumed,
        }),
        None => serde_json::json!({ "handshake": "unfinished" }),
    });
    let line = serde_json::json!({
        "tls": tls,
        "client": conn.client_addr.to_string(),
        "upstream": conn.upstream_addr.map(|a| a.to_string()),
        "host": conn.summary.host,
        "path": conn.summary.path,
        "status": status,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "datapath": datapath,
        "duration_ms": (monotonic_ns().saturating_sub(conn.started_ns)) / 1_000_000,
        "reason": conn.closing.as_deref().unwrap_or(""),
    });
    tracing::info!(target: "wsplice::access", "{line}");
}

/// A non-blocking `recv` on a blocking socket.
pub(super) fn recv(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buffer, 0)
}

/// A non-blocking `recv` with extra flags (`MSG_PEEK`).
fn recv_flags(fd: RawFd, buffer: &mut [u8], flags: i32) -> io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of `buffer.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT | flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `SO_RCVLOWAT`: poll reports the socket readable only once `bytes` are queued.
fn set_rcvlowat(fd: RawFd, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: plain setsockopt with a valid int option value on a descriptor we own.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// `shutdown(fd, SHUT_WR)`: passes a FIN on. Errors (peer already gone) change nothing.
pub(super) fn shutdown_write(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: plain syscall on a descriptor this connection owns.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    }
}
