//! The life of one client connection, from accept to its access line, as a sans-IO state
//! machine.
//!
//! A [`Connection`] takes events — bytes read, operations completed, facts the I/O layer
//! measured, deadlines — and answers with [`Action`]s for the I/O layer to carry out. It never
//! touches a socket, a clock or the kernel program: time is passed in, and so is everything the
//! I/O layer measured (how far behind the kernel is, when it last moved a byte). So every path
//! of a connection (each rejection, both data paths, FINs and resets in every stage, idle
//! expiry, drain, TLS close ordering) is unit-tested without a socket (`connection/tests/`).
//!
//! The stages, in order (see ARCHITECTURE.md):
//!
//! ```text
//! ReadingRequest ─▶ Connecting ─▶ SendingRequest ─▶ ReadingResponse ─┬─▶ Relaying (userspace)
//!        │               │ (next server)                   │          │     └─▶ Promoting ─▶ Spliced
//!        │               │                                 │          ├─▶ HandingOff ─▶ Spliced
//!        │               │                                 │          │   (a reader falls behind:
//!        │               │                                 │          │    Spliced ─▶ Relaying)
//!        └───────────────┴──────────▶ Rejecting ◀──────────┘          └─▶ Relaying (refusal)
//!
//! ReadingRequest ─▶ Connecting (or a kept-alive upstream) ─▶ Exchanging ─▶ ReadingRequest …
//!   (a plain HTTP request: its answer, then the next request on the same connection)
//! ```
//!
//! Any stage ends in a close with a reason (graceful, or abortive: a reset both ways).

mod exchange;
mod goodbye;
mod handover;
mod handshake;
mod packet;
mod proxy_header;
mod relay;
mod splice;
#[cfg(test)]
mod tests;
mod upgrade;

use std::net::SocketAddr;

pub use exchange::Exchange;
pub use handover::{HandedPath, HandedTunnel, HANDED_OVER};
pub use handshake::{ConnectFailure, ExchangeStart, Handshake, Rejection, RequestSummary, Step};
pub use packet::{FlowReport, PacketRefusal, PacketSplice};
pub use relay::Relay;
pub use splice::{Backlog, Counted, Paused, Splice, SplicedEvent};

use crate::access::AccessRecord;
use crate::headers::Scheme;
use crate::services::Services;
use crate::tunnel::frames::CloseCode;
use crate::upstream::{Keepalive, Lease};

/// How long a rejected client may keep sending before its socket is closed (lingering close, so
/// the error answer is not destroyed by a reset).
pub const LINGER_NS: u64 = 2_000_000_000;
/// Most bytes a client may send behind its request before it has seen the 101 and still get a
/// kernel-path tunnel (they are read and sent upstream in userspace first); beyond this the
/// tunnel is relayed in userspace.
pub const MAX_UNREAD_BEFORE_SPLICE: usize = 1 << 20;

/// One of the two sockets of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The accepted client socket.
    Client,
    /// The socket to the upstream server.
    Upstream,
}

impl Side {
    /// The other side.
    pub fn peer(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    /// 0 for the client, 1 for the upstream (for per-side arrays).
    pub fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Upstream => 1,
        }
    }
}

/// How a tunnel's bytes move once the upgrade succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// Userspace: read into a buffer, write out (TLS tunnels, hosts without the program).
    Relay,
    /// The kernel's sockmap program moves them from the 101 on; userspace only watches
    /// (`--datapath kernel`).
    Splice,
    /// The userspace relay first; the kernel once the tunnel has earned it
    /// ([`Services::promotion`](crate::services::Services::promotion)), at a moment when
    /// userspace holds none of its bytes.
    Promote,
    /// The userspace relay first; the packet splice at the first quiet moment after the 101
    /// (`--datapath packet`): the proxy then keeps no socket for the tunnel.
    Packet,
}

/// The actions an event asks for, in order (the I/O layer carries them out front to back).
pub type Actions = std::collections::VecDeque<Action>;

/// What the I/O layer must do for a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Call [`Connection::on_deadline`] at this time (monotonic ns), or later.
    ArmDeadline(u64),
    /// When the side is readable, read it (the client's plaintext for TLS) and call
    /// [`Connection::on_data`], or [`Connection::on_read_end`] at end of stream or on an error.
    Read(Side),
    /// Kernel path: once more than `seen` bytes are queued on the upstream socket, look at them
    /// without consuming them and call [`Connection::on_peeked`] (so the splice later delivers
    /// them verbatim).
    PeekUpstream {
        /// Bytes already seen.
        seen: usize,
    },
    /// Kernel path: consume `len` bytes that were only peeked at (the tunnel will not be
    /// spliced) and undo the peek's receive mark.
    ConsumeUpstream {
        /// Bytes to read and drop.
        len: usize,
    },
    /// PROXY protocol: once more than `seen` bytes are queued on the client socket, look at
    /// them without consuming them and call [`Connection::on_proxy_header_peeked`] (or
    /// [`Connection::on_read_end`] at the end of the stream).
    PeekClient {
        /// Bytes already seen.
        seen: usize,
    },
    /// PROXY protocol: consume the header's `len` bytes, seen by peeking (they are queued),
    /// and undo the peek's receive mark: the client's own bytes come next.
    ConsumeClient {
        /// The header's length.
        len: usize,
    },
    /// Open a TCP connection to this server (bounded by the connect timeout), then call
    /// [`Connection::on_connected`] or [`Connection::on_connect_failed`].
    Connect(SocketAddr),
    /// Plain HTTP: take an idle kept-alive connection to this server if one is alive (and
    /// call [`Connection::on_connected`] with `reused`), else as [`Action::Connect`].
    ConnectReusing(SocketAddr),
    /// Plain HTTP: the upstream connection can carry another request: keep it idle for the
    /// worker's next request to `server` (or close it if `keepalive` keeps no more). Nothing
    /// is pending on it.
    ReleaseUpstream {
        /// The server it is connected to.
        server: SocketAddr,
        /// How its pool keeps idle connections.
        keepalive: Keepalive,
    },
    /// Plain HTTP: close the upstream connection now (the client's stays). Nothing is pending
    /// on it.
    CloseUpstream,
    /// Write this access line (a plain request ended; the connection goes on).
    AccessLine(Box<AccessRecord>),
    /// Abandon whatever is pending on the upstream socket (connect, response read).
    CancelUpstream,
    /// Send these bytes to the side (encrypted first for a TLS client), then call
    /// [`Connection::on_sent`].
    Send(Side, Vec<u8>),
    /// Relay: read up to `budget` bytes from `from` and send them to its peer. Call
    /// [`Connection::on_forwarded`] once read, then [`Connection::on_sent`] for the peer once
    /// written; [`Connection::on_source_eof`] / [`Connection::on_source_failed`] when the read
    /// ends; if nothing is readable, call [`Connection::on_source_waiting`], then
    /// [`Connection::on_readable`] when it is.
    Forward {
        /// The source side.
        from: Side,
        /// Most bytes to read.
        budget: usize,
    },
    /// Relay: the source's last read took everything queued, so a read now would most likely
    /// find nothing: wait until it is readable (no read first), then call
    /// [`Connection::on_readable`].
    AwaitReadable(Side),
    /// `shutdown(side, SHUT_WR)`: pass a FIN on.
    ShutdownWrite(Side),
    /// TLS: queue `close_notify` to the client and send it, then call [`Connection::on_sent`]
    /// for the client.
    CloseNotify,
    /// Kernel path: read everything the client has sent so far, at most `limit` bytes plus one
    /// read, and call [`Connection::on_client_drained`].
    DrainClient {
        /// Bytes beyond which the drain stops.
        limit: usize,
    },
    /// Packet path: hand the tunnel to the packet splice (at a quiet moment of the relay),
    /// then call [`Connection::on_packet_splice_result`] before anything else happens to it.
    PacketSplice,
    /// Kernel path: hand both sockets to the splice program, then call
    /// [`Connection::on_splice_result`].
    Splice {
        /// Both sides may be sending (a promotion): bridge the client's bytes to the upstream
        /// while the `PEER` entries go in. Right after the 101 the client is silent (it has
        /// not seen the 101 yet), so the bridge is not needed.
        bridged: bool,
    },
    /// Kernel path: the tunnel goes to the userspace relay after all; reset the upstream
    /// socket's receive mark set while peeking.
    UndoPeekMark,
    /// Kernel path: watch the spliced socket for a FIN, a reset or stray bytes and call
    /// [`Connection::on_spliced_event`].
    WatchSpliced(Side),
    /// Kernel path: measure what the kernel still has to deliver towards `towards` and call
    /// [`Connection::on_kernel_backlog`] (at the next tick if `next_tick`).
    CheckKernelBacklog {
        /// The destination socket.
        towards: Side,
        /// Measure at the next tick rather than now.
        next_tick: bool,
    },
    /// Kernel path: at the next tick, measure what the kernel still has to deliver towards
    /// each side and call [`Connection::on_pressure`].
    MeasurePressure,
    /// Kernel path: a reader fell behind; pause both sockets in the splice maps (their bytes
    /// then stay on them for the userspace relay), wait until no verdict still redirects,
    /// stop watching them, measure what the kernel still has to deliver towards each side and
    /// call [`Connection::on_paused`].
    PauseSplice,
    /// Kernel path: remove the tunnel from the splice maps and call
    /// [`Connection::on_unspliced`] with what the program counted.
    Unsplice,
    /// Close both sockets once their operations completed, then call
    /// [`Connection::finish`]. Abortive: reset both ways (`SO_LINGER` 0); graceful: say
    /// `close_notify` first to a TLS client if nothing else is being sent to it.
    Close {
        /// Reset instead of FIN.
        abortive: bool,
    },
}

/// Why and how a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// For the access line.
    pub reason: String,
    /// Reset both ways.
    pub abortive: bool,
}

/// Where a connection is in its lifecycle, with what that stage needs.
#[derive(Debug)]
pub enum Stage {
    /// A `proxy_protocol` listener: reading (by peeking) the PROXY header before anything else.
    ReadingProxyHeader {
        /// Bytes of it peeked at so far.
        seen: usize,
        /// The header was refused (its access line is written at info level).
        refused: bool,
        /// The address the client connected to (the header may say another).
        local: SocketAddr,
    },
    /// Reading the client's request head.
    ReadingRequest(Box<Handshake>),
    /// Connecting to an upstream server.
    Connecting(Box<Handshake>),
    /// Sending the rewritten request upstream.
    SendingRequest(Box<Handshake>),
    /// Reading (or, on the kernel path, peeking at) the upstream's response head.
    ReadingResponse(Box<Handshake>),
    /// Sending an error answer, then discarding what the client still sends (lingering).
    Rejecting {
        /// The answer's status.
        status: u16,
        /// The answer is sent; the client is being drained until EOF or the linger deadline.
        lingering: bool,
    },
    /// Kernel path: what the client sent early goes upstream before the splice.
    HandingOff {
        /// Bytes for the upstream, sent in userspace before the splice.
        early: Vec<u8>,
        /// Where each way's frames stand (client → upstream, upstream → client): the program
        /// follows them from there.
        frames: [crate::tunnel::frames::FrameTracker; 2],
    },
    /// The userspace relay (of a tunnel, or of a refused upgrade's answer). Boxed: the relay
    /// is the largest stage by far, and inline it would size every connection's record,
    /// kernel- and packet-spliced tunnels included (`runtime::table` keeps them inline).
    Relaying(Box<Relay>),
    /// A relayed tunnel being handed to the kernel at a quiet moment (nothing held in
    /// userspace); back to `Relaying` if the hand-off fails.
    Promoting(Box<Relay>),
    /// The kernel moves the bytes.
    Spliced(Splice),
    /// The packet splice rewrites the tunnel's packets; the proxy holds no socket for it.
    PacketSpliced(PacketSplice),
    /// A plain HTTP request and its answer.
    Exchanging(Box<Exchange>),
}

/// A connection as accepted: its addresses and its listener's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The peer's address (a load balancer's, on a `proxy_protocol` listener).
    pub peer: SocketAddr,
    /// The address it connected to.
    pub local: SocketAddr,
    /// `ws` or `wss`.
    pub scheme: Scheme,
    /// The listener terminates TLS.
    pub tls: bool,
    /// The listener expects a PROXY protocol header first.
    pub proxy_protocol: bool,
}

/// One client connection's lifecycle state (see the module docs).
#[derive(Debug)]
pub struct Connection {
    id: u64,
    /// The id its access lines carry (kept when a binary upgrade moves the tunnel).
    log_id: u64,
    /// The client's address: the peer's, or the one its PROXY header carried.
    client_addr: SocketAddr,
    /// The connection's count on its upstream server, while it uses one.
    lease: Option<Lease>,
    started_ns: u64,
    scheme: Scheme,
    tls: bool,
    datapath: DataPath,
    stage: Stage,
    /// Deadline of the handshake or the lingering close.
    deadline_ns: u64,
    summary: RequestSummary,
    upstream_addr: Option<SocketAddr>,
    /// Packet path: hand-offs tried while the sockets were not quiet.
    packet_tries: u8,
    /// Something is being sent to this side (indexed by [`Side::index`]).
    sending: [bool; 2],
    /// TLS: `close_notify` was queued.
    close_notified: bool,
    /// Boxed: set only once the connection closes, so idle connections do not carry it.
    ending: Option<Box<Ending>>,
    /// Keep-alive: waiting for the first byte of the next request (then the handshake
    /// deadline replaces the keep-alive one).
    waiting_for_request: bool,
    /// Shutdown began: plain HTTP answers say `Connection: close`.
    draining: bool,
}

impl Connection {
    /// A connection `accepted` (its admission counted: the connection, and its peer's address
    /// unless the listener expects a PROXY header); `datapath` for its tunnel once upgraded (a
    /// TLS tunnel is always relayed: the kernel path would move ciphertext, there is no kTLS
    /// here).
    pub fn accept(
        id: u64,
        accepted: Accepted,
        datapath: DataPath,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) -> Connection {
        services.metrics.connections_accepted.inc();
        services.metrics.connections_open.inc();
        let deadline_ns = now_ns.saturating_add(services.handshake_ns);
        let datapath = if accepted.tls {
            DataPath::Relay
        } else {
            datapath
        };
        let stage = Stage::ReadingProxyHeader {
            seen: 0,
            refused: false,
            local: accepted.local,
        };
        let mut connection =
            Connection::new(id, services.log_ids ^ id, accepted.peer, now_ns, stage);
        connection.scheme = accepted.scheme;
        connection.tls = accepted.tls;
        connection.datapath = datapath;
        connection.deadline_ns = deadline_ns;
        out.push_back(Action::ArmDeadline(deadline_ns));
        if accepted.proxy_protocol {
            connection.expect_proxy_header(services, out);
        } else {
            let handshake = connection.new_handshake(accepted.local, services);
            connection.stage = Stage::ReadingRequest(Box::new(handshake));
            out.push_back(Action::Read(Side::Client));
        }
        connection
    }

    /// A handshake for the connection's next request, to `local`: its addresses, and whether
    /// the client is one of `trusted_proxies` (its forwarding headers are then passed on).
    fn new_handshake(&self, local: SocketAddr, services: &Services) -> Handshake {
        let trusted_peer = services
            .trusted_proxies
            .iter()
            .any(|range| range.contains(self.client_addr.ip()));
        let addresses = crate::proxy_protocol::Addresses {
            source: self.client_addr,
            destination: local,
        };
        Handshake::new(addresses, self.scheme, trusted_peer)
    }

    /// Connection `id` (access-line id `log_id`) from `client_addr` since `started_ns`, in
    /// `stage`: a plain `ws` connection relayed in userspace, nothing sent, read or decided
    /// yet (the callers set what differs).
    fn new(
        id: u64,
        log_id: u64,
        client_addr: SocketAddr,
        started_ns: u64,
        stage: Stage,
    ) -> Connection {
        Connection {
            id,
            log_id,
            client_addr,
            lease: None,
            started_ns,
            scheme: Scheme::Ws,
            tls: false,
            datapath: DataPath::Relay,
            stage,
            deadline_ns: 0,
            summary: RequestSummary::default(),
            upstream_addr: None,
            packet_tries: 0,
            sending: [false; 2],
            close_notified: false,
            ending: None,
            waiting_for_request: false,
            draining: false,
        }
    }

    /// The connection's unique id (in this worker).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client's address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The address whose admission count this connection holds, if any (see
    /// [`Admission::release`](crate::admission::Admission::release)).
    pub fn counted_address(&self) -> Option<std::net::IpAddr> {
        // Until its PROXY header says it (or when its address was refused), a connection holds
        // only its place.
        let known = !matches!(self.stage, Stage::ReadingProxyHeader { .. });
        known.then_some(self.client_addr.ip())
    }

    /// The current stage.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// The route it took (an index into its generation's routes), once routed.
    pub fn route(&self) -> Option<usize> {
        self.summary.route
    }

    /// The upstream server connected to (or being tried).
    pub fn upstream_addr(&self) -> Option<SocketAddr> {
        self.upstream_addr
    }

    /// Why it ended, once it is closing.
    pub fn ending(&self) -> Option<&Ending> {
        self.ending.as_deref()
    }

    /// True once a close was decided: later events are ignored.
    pub fn is_closing(&self) -> bool {
        self.ending.is_some()
    }

    /// True while the upstream's answer is read by peeking (kernel path).
    pub fn peeks_upstream(&self) -> bool {
        self.datapath == DataPath::Splice
    }

    fn handshake(&mut self) -> Option<&mut Handshake> {
        match &mut self.stage {
            Stage::ReadingRequest(h)
            | Stage::Connecting(h)
            | Stage::SendingRequest(h)
            | Stage::ReadingResponse(h) => Some(h),
            _ => None,
        }
    }

    /// Bytes read from `side` (the client's plaintext for TLS).
    pub fn on_data(
        &mut self,
        side: Side,
        bytes: &[u8],
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        if self.waiting_for_request {
            // Keep-alive: a request begins; its head has the handshake timeout.
            self.waiting_for_request = false;
            self.started_ns = now_ns;
            self.deadline_ns = now_ns.saturating_add(services.handshake_ns);
            out.push_back(Action::ArmDeadline(self.deadline_ns));
        }
        match (&mut self.stage, side) {
            (Stage::ReadingRequest(h), Side::Client) => {
                let step = h.on_client_data(bytes, services, now_ns);
                self.after_step(step, now_ns, services, out);
            }
            (Stage::Exchanging(_), side) => {
                self.on_exchange_data(side, bytes, now_ns, services, out)
            }
            (Stage::ReadingResponse(h), Side::Upstream) => {
                let step = h.on_upstream_data(bytes, services);
                self.after_step(step, now_ns, services, out);
            }
            // Lingering close: what the client still sends is dropped.
            (Stage::Rejecting { .. }, Side::Client) => out.push_back(Action::Read(Side::Client)),
            // Shutdown said goodbye: what comes after the boundary is dropped.
            (Stage::Relaying(_), side) => self.on_goodbye_data(side, out),
            _ => {}
        }
    }

    /// A [`Action::Read`] (or peek) of `side` found the end of the stream, or failed.
    pub fn on_read_end(&mut self, side: Side, now_ns: u64, services: &Services, out: &mut Actions) {
        if self.is_closing() {
            return;
        }
        match (&mut self.stage, side) {
            (Stage::ReadingProxyHeader { seen: 0, .. }, Side::Client) => {
                // A balancer's TCP check, a port probe: not a refusal.
                self.close("client closed before sending anything".into(), false, out)
            }
            (Stage::ReadingProxyHeader { seen, .. }, Side::Client) => {
                let reason =
                    format!("client closed in the middle of its PROXY header ({seen} bytes)");
                self.refuse_proxy_header(reason, services, out)
            }
            (Stage::ReadingRequest(h), Side::Client) => {
                let step = h.on_client_eof();
                self.after_step(step, now_ns, services, out);
            }
            (Stage::ReadingResponse(h), Side::Upstream) => {
                let step = h.on_upstream_eof(services, now_ns);
                self.after_step(step, now_ns, services, out);
            }
            (Stage::Rejecting { .. }, Side::Client) => self.close("rejected".into(), false, out),
            (Stage::Exchanging(_), side) => self.on_exchange_read_end(side, now_ns, services, out),
            (Stage::Relaying(_), side) => self.on_goodbye_read_end(side, services, out),
            _ => {}
        }
    }

    /// Everything sent to `side` (by [`Action::Send`], a forwarded chunk or
    /// [`Action::CloseNotify`]) is written.
    pub fn on_sent(&mut self, side: Side, now_ns: u64, services: &Services, out: &mut Actions) {
        self.sending[side.index()] = false;
        if self.is_closing() {
            return;
        }
        if matches!(self.stage, Stage::Relaying(_)) {
            // The destination is free again: a quiet moment to move to the kernel, or read the
            // next chunk from its source.
            if !self.try_promote(now_ns, services, out) {
                self.pump(side.peer(), services, out);
            }
            return;
        }
        if matches!(self.stage, Stage::Exchanging(_)) {
            return self.on_exchange_sent(side, now_ns, services, out);
        }
        match &mut self.stage {
            Stage::SendingRequest(h) if side == Side::Upstream => {
                let step = h.on_request_sent();
                self.after_step(step, now_ns, services, out);
            }
            Stage::Rejecting { lingering, .. } if side == Side::Client && !*lingering => {
                *lingering = true;
                self.deadline_ns = now_ns.saturating_add(LINGER_NS);
                out.push_back(Action::ShutdownWrite(Side::Client));
                out.push_back(Action::ArmDeadline(self.deadline_ns));
                out.push_back(Action::Read(Side::Client));
            }
            Stage::HandingOff { .. } if side == Side::Upstream => {
                out.push_back(Action::Splice { bridged: false })
            }
            _ => {}
        }
    }

    /// A send to `side` failed.
    pub fn on_send_failed(&mut self, side: Side, error: &str, reset: bool, out: &mut Actions) {
        self.sending[side.index()] = false;
        self.close(format!("send to {side:?} failed: {error}"), reset, out);
    }

    /// Waiting for `side` to become readable failed.
    pub fn on_poll_failed(&mut self, side: Side, error: &str, out: &mut Actions) {
        self.close(format!("poll on {side:?} failed: {error}"), false, out);
    }

    /// The client's TLS stream broke (bad handshake, garbage, plain HTTP on a TLS port); the I/O
    /// layer already sent what it could (an alert, or a 400 for plain HTTP).
    pub fn on_tls_failed(
        &mut self,
        during_handshake: bool,
        reason: String,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        if during_handshake {
            services.metrics.tls_failures.inc();
        }
        tracing::info!(client = %self.client_addr, %reason, "TLS connection closed");
        // A broken stream mid-tunnel is passed on as a reset, like a client that vanished.
        let in_tunnel = matches!(self.stage, Stage::Relaying(_) | Stage::Promoting(_));
        self.close(reason, in_tunnel, out);
    }

    /// The deadline armed last has passed (or a reminder for an older one fired). Kernel path:
    /// `kernel_activity_ns` is when the program last moved a byte of this tunnel;
    /// `tls_handshaking` is true while a TLS client has not finished its handshake.
    pub fn on_deadline(
        &mut self,
        now_ns: u64,
        kernel_activity_ns: Option<u64>,
        tls_handshaking: bool,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let deadline = match &self.stage {
            Stage::Relaying(relay) | Stage::Promoting(relay) => match &relay.goodbye {
                Some(goodbye) => goodbye.deadline(),
                None => relay.deadline(),
            },
            Stage::Spliced(splice) => splice.deadline(kernel_activity_ns),
            Stage::Exchanging(exchange) => exchange.deadline(),
            _ => self.deadline_ns,
        };
        if now_ns < deadline {
            if let Stage::Relaying(relay) = &self.stage {
                if relay.goodbye.is_none() {
                    // Perhaps the moment the tunnel became due for the kernel path.
                    let reminder = relay.reminder(now_ns);
                    if self.try_promote(now_ns, services, out) {
                        return;
                    }
                    out.push_back(Action::ArmDeadline(reminder));
                    return;
                }
            }
            out.push_back(Action::ArmDeadline(deadline));
            return;
        }
        match &mut self.stage {
            Stage::ReadingProxyHeader { .. } => {
                let reason = "no complete PROXY header within the handshake timeout";
                self.refuse_proxy_header(reason.into(), services, out);
            }
            Stage::ReadingRequest(_) if tls_handshaking => {
                services.metrics.tls_failures.inc();
                self.close("TLS handshake timed out".into(), false, out);
            }
            Stage::ReadingRequest(h) => {
                let step = h.on_deadline(false);
                self.after_step(step, now_ns, services, out);
            }
            Stage::Connecting(h) | Stage::SendingRequest(h) | Stage::ReadingResponse(h) => {
                let step = h.on_deadline(true);
                self.after_step(step, now_ns, services, out);
            }
            Stage::Rejecting { .. } => self.close("rejected".into(), false, out),
            Stage::Exchanging(_) => self.on_exchange_deadline(services, out),
            Stage::Relaying(relay) if relay.goodbye.is_some() => {
                let reason = relay
                    .goodbye
                    .as_ref()
                    .map(|goodbye| goodbye.timeout_reason())
                    .unwrap_or_default();
                self.close(reason, false, out);
            }
            Stage::Relaying(relay) | Stage::Promoting(relay) => {
                let idle_ms = relay.idle_ns() / 1_000_000;
                services.metrics.idle_timeouts.inc();
                let reason = format!("idle timeout ({idle_ms} ms without traffic)");
                self.close(reason, false, out);
            }
            Stage::Spliced(splice) => {
                let idle_ms = splice.idle_ns() / 1_000_000;
                services.metrics.idle_timeouts.inc();
                let reason = format!("idle timeout ({idle_ms} ms without traffic)");
                self.close(reason, false, out);
            }
            // The I/O layer reads its flows and calls `on_packet_deadline` instead.
            Stage::PacketSpliced(_) => out.push_back(Action::ArmDeadline(now_ns)),
            // Only the send of the client's early bytes can keep a hand-off waiting.
            Stage::HandingOff { .. } => {
                let idle_ms = self.idle_ns(services) / 1_000_000;
                services.metrics.idle_timeouts.inc();
                let reason = format!(
                    "idle timeout ({idle_ms} ms) in the hand-off: the upstream did not take \
                     the client's early bytes"
                );
                self.close(reason, false, out);
            }
        }
    }

    /// Shutdown began: a keep-alive connection waiting for its next request closes now, and
    /// one in a plain request closes after its answer (tunnels run on until the deadline).
    pub fn on_drain_start(&mut self, out: &mut Actions) {
        self.draining = true;
        if matches!(self.stage, Stage::PacketSpliced(_)) {
            // Look at its flows now: a closed one need not linger (see `on_packet_deadline`).
            out.push_back(Action::ArmDeadline(0));
        }
        if self.waiting_for_request {
            self.close(
                "shutting down: idle keep-alive connection".into(),
                false,
                out,
            );
        }
    }

    /// A reload published `next` (this connection keeps `services`, the generation it was
    /// accepted under): a tunnel or exchange takes the idle timeout `next` gives its route. A
    /// shorter one is checked at once (the deadline armed for the old one would come late); a
    /// longer one at the old deadline, which then re-arms.
    pub fn on_reload(
        &mut self,
        services: &Services,
        next: &Services,
        now_ns: u64,
        out: &mut Actions,
    ) {
        let Some(route) = self
            .summary
            .route
            .and_then(|route| services.routes.get(route))
        else {
            return;
        };
        let Some(idle_ns) = next.idle_ns_like(route) else {
            return; // The route is gone: its tunnels keep the timeout they had.
        };
        let before = match &mut self.stage {
            Stage::Relaying(relay) | Stage::Promoting(relay) => relay.replace_idle_ns(idle_ns),
            Stage::Spliced(splice) => splice.replace_idle_ns(idle_ns),
            Stage::Exchanging(exchange) => exchange.replace_idle_ns(idle_ns),
            // Before the tunnel, the handshake's deadline applies; the tunnel starts with the
            // idle timeout of the generation the connection was accepted under.
            _ => return,
        };
        if idle_ns < before && !self.is_closing() {
            out.push_back(Action::ArmDeadline(now_ns));
        }
    }

    /// Shutdown: this connection's turn in the drain's spread window (closes are spread so
    /// that clients do not all reconnect at once).
    pub fn on_drain_spread(&mut self, now_ns: u64, services: &Services, out: &mut Actions) {
        self.say_goodbye(
            "shutting down: closed in the drain's spread window",
            CloseCode::GoingAway,
            now_ns,
            services,
            out,
        );
    }

    /// Shutdown: the drain deadline passed (a tunnel says goodbye, bounded by
    /// `goodbye::GOODBYE_NS`).
    pub fn on_drain_deadline(&mut self, now_ns: u64, services: &Services, out: &mut Actions) {
        self.say_goodbye(
            "drain deadline reached",
            CloseCode::GoingAway,
            now_ns,
            services,
            out,
        );
    }

    /// Decides to close (once; later calls keep the first reason).
    pub(super) fn close(&mut self, reason: String, abortive: bool, out: &mut Actions) {
        if self.is_closing() {
            return;
        }
        self.ending = Some(Box::new(Ending { reason, abortive }));
        let in_maps = match &self.stage {
            Stage::Spliced(_) => true,
            Stage::Relaying(relay) => relay.left_kernel(),
            _ => false,
        };
        if in_maps {
            out.push_back(Action::Unsplice);
        }
        out.push_back(Action::Close { abortive });
    }

    /// The connection's sockets are closed: update the gauges and give its access line.
    pub fn finish(self, now_ns: u64, services: &Services) -> AccessRecord {
        let metrics = &services.metrics;
        metrics.connections_open.dec();
        let (status, bytes_up, bytes_down, datapath) = match &self.stage {
            Stage::Relaying(relay) | Stage::Promoting(relay) => (
                relay.status(),
                relay.bytes_up(),
                relay.bytes_down(),
                "userspace",
            ),
            Stage::Spliced(splice) => (101, splice.bytes_up(), splice.bytes_down(), "kernel"),
            Stage::PacketSpliced(splice) => {
                metrics.tunnels_packet_open.dec();
                (101, splice.bytes_up(), splice.bytes_down(), "packet")
            }
            Stage::Exchanging(exchange) => (
                exchange.status(),
                exchange.bytes_up(),
                exchange.bytes_down(),
                "http",
            ),
            Stage::Rejecting { status, .. } => (*status, 0, 0, ""),
            _ => (0, 0, 0, ""),
        };
        if status == 101 {
            metrics.tunnels_open.dec();
        }
        match &self.stage {
            Stage::Spliced(splice) => {
                metrics.tunnels_spliced_open.dec();
                metrics
                    .kernel_backlog_bytes
                    .replace_share(splice.backlog(), 0);
            }
            Stage::Relaying(relay) => metrics
                .kernel_backlog_bytes
                .replace_share(relay.kernel_backlog(), 0),
            _ => {}
        }
        let mut summary = self.summary;
        let mut stage = self.stage;
        if let Stage::ReadingRequest(h)
        | Stage::Connecting(h)
        | Stage::SendingRequest(h)
        | Stage::ReadingResponse(h) = &mut stage
        {
            // Closed in the middle of a handshake: the request as far as it was read.
            summary = h.take_summary();
        }
        // Port probes and load balancers' TCP checks only log at debug level.
        let before_request = match &stage {
            Stage::ReadingRequest(_) => summary.host().is_empty(),
            Stage::ReadingProxyHeader { refused, .. } => !refused,
            _ => false,
        };
        AccessRecord {
            id: self.log_id,
            client: self.client_addr,
            upstream: self.upstream_addr,
            host: summary.host().to_owned(),
            path: summary.path().to_owned(),
            method: summary.method().to_owned(),
            status,
            bytes_up,
            bytes_down,
            datapath,
            duration_ms: now_ns.saturating_sub(self.started_ns) / 1_000_000,
            reason: self.ending.map(|ending| ending.reason).unwrap_or_default(),
            before_request,
            tls: None,
        }
    }
}
