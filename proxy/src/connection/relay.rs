//! The userspace relay stage: bytes move through one buffer per direction, a direction reads
//! only when its previous chunk is written (a slow reader throttles its own writer), and a FIN
//! is passed on once everything before it is written.

use super::{Action, Actions, Connection, DataPath, Side, Stage};
use crate::services::Services;
use crate::tunnel::relay::{AfterSource, Direction, SourceRead};

/// A relayed tunnel (or a refused upgrade's answer being relayed).
#[derive(Debug)]
pub struct Relay {
    /// Client → upstream.
    up: Direction,
    /// Upstream → client.
    down: Direction,
    last_activity_ns: u64,
    idle_ns: u64,
    /// 101 for a tunnel; the upstream's status when relaying a refusal.
    status: u16,
    /// When the tunnel becomes due for the kernel path (`DataPath::Promote`; else never).
    promote_at_ns: u64,
    /// Set once the tunnel left the kernel path (boxed: rare, and idle tunnels should not
    /// carry it).
    left_kernel: Option<Box<KernelBacklog>>,
    /// Shutdown: the tunnel is saying goodbye (boxed: rare).
    pub(super) goodbye: Option<Box<super::goodbye::Goodbye>>,
}

/// A tunnel that left the kernel path because a reader fell behind: both its sockets are
/// paused in the splice maps (their bytes stay on them for the relay), and the kernel still
/// delivers what it redirected before the pause.
#[derive(Debug)]
struct KernelBacklog {
    /// Per destination ([`Side::index`]): bytes the kernel still has to deliver there, as last
    /// measured; `None` once delivered, and from then on the relay reads that direction's
    /// source (its bytes follow the kernel's, never overtake them).
    pending: [Option<u64>; 2],
    /// This tunnel's share of the process-wide `kernel_backlog_bytes` gauge.
    share: u64,
}

impl Relay {
    /// The direction whose bytes go to `destination`.
    pub(super) fn towards(&mut self, destination: Side) -> &mut Direction {
        match destination {
            Side::Upstream => &mut self.up,
            Side::Client => &mut self.down,
        }
    }

    /// When the tunnel becomes idle.
    pub fn deadline(&self) -> u64 {
        self.last_activity_ns.saturating_add(self.idle_ns)
    }

    /// The idle timeout.
    pub fn idle_ns(&self) -> u64 {
        self.idle_ns
    }

    /// A tunnel a predecessor process relayed (binary upgrade): both directions as given.
    pub(super) fn adopted(
        up: Direction,
        down: Direction,
        last_activity_ns: u64,
        idle_ns: u64,
        promote_at_ns: u64,
    ) -> Relay {
        Relay {
            up,
            down,
            last_activity_ns,
            idle_ns,
            status: 101,
            promote_at_ns,
            left_kernel: None,
            goodbye: None,
        }
    }

    /// When a byte last moved.
    pub(super) fn last_activity_ns(&self) -> u64 {
        self.last_activity_ns
    }

    /// When the tunnel becomes due for the kernel path (`u64::MAX`: never).
    pub(super) fn promote_at_ns(&self) -> u64 {
        self.promote_at_ns
    }

    /// A reload changed the route's idle timeout; returns the one it had.
    pub(super) fn replace_idle_ns(&mut self, idle_ns: u64) -> u64 {
        std::mem::replace(&mut self.idle_ns, idle_ns)
    }

    /// When the connection next needs a deadline event: the idle deadline, or the moment the
    /// tunnel becomes due for promotion if that is still ahead and comes first.
    pub fn reminder(&self, now_ns: u64) -> u64 {
        let idle = self.deadline();
        if self.promote_at_ns > now_ns {
            idle.min(self.promote_at_ns)
        } else {
            idle
        }
    }

    /// Whether the tunnel has earned the kernel path: open long enough, or enough bytes.
    pub(super) fn is_due(&self, now_ns: u64, after_bytes: u64) -> bool {
        now_ns >= self.promote_at_ns || self.up.bytes + self.down.bytes >= after_bytes
    }

    /// Never promote (the hand-off failed once).
    pub(super) fn stay_in_userspace(&mut self) {
        self.promote_at_ns = u64::MAX;
    }

    /// Try the hand-off again at `at_ns` (it could not happen now).
    pub(super) fn promote_later(&mut self, at_ns: u64) {
        self.promote_at_ns = at_ns;
    }

    /// The direction whose bytes go to `destination` (read-only).
    pub(super) fn direction(&self, destination: Side) -> &Direction {
        match destination {
            Side::Upstream => &self.up,
            Side::Client => &self.down,
        }
    }

    /// 101, or the refused upgrade's status.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Bytes relayed client → upstream.
    pub fn bytes_up(&self) -> u64 {
        self.up.bytes
    }

    /// Bytes relayed upstream → client.
    pub fn bytes_down(&self) -> u64 {
        self.down.bytes
    }

    fn finished(&self) -> bool {
        self.up.finished() && self.down.finished()
    }

    /// A tunnel that leaves the kernel path: `bytes` moved so far and whether a FIN was passed
    /// on, per destination ([`Side::index`]); `share` of the kernel backlog gauge. Every
    /// direction not finished yet is held until the kernel delivered its backlog.
    pub(super) fn left_kernel_path(
        bytes: [u64; 2],
        fin_passed: [bool; 2],
        frames: [crate::tunnel::frames::FrameTracker; 2],
        share: u64,
        now_ns: u64,
        idle_ns: u64,
    ) -> Relay {
        let direction = |destination: Side| {
            let index = destination.index();
            let mut direction = if fin_passed[index] {
                Direction::closed()
            } else {
                Direction::unbounded()
            };
            direction.bytes = bytes[index];
            // Where the program left the frames.
            direction.frames = frames[index];
            direction
        };
        // Held (with nothing known yet) until measured.
        let pending = fin_passed.map(|passed| (!passed).then_some(0));
        Relay {
            up: direction(Side::Upstream),
            down: direction(Side::Client),
            last_activity_ns: now_ns,
            idle_ns,
            status: 101,
            promote_at_ns: u64::MAX,
            left_kernel: Some(Box::new(KernelBacklog { pending, share })),
            goodbye: None,
        }
    }

    /// Whether the tunnel left the kernel path (its sockets are still in the splice maps).
    pub fn left_kernel(&self) -> bool {
        self.left_kernel.is_some()
    }

    /// This tunnel's share of the kernel backlog gauge (0 unless it left the kernel path).
    pub fn kernel_backlog(&self) -> u64 {
        self.left_kernel.as_ref().map_or(0, |left| left.share)
    }

    /// Whether the direction towards `destination` waits for the kernel to deliver.
    pub(super) fn is_held(&self, destination: Side) -> bool {
        self.left_kernel
            .as_ref()
            .is_some_and(|left| left.pending[destination.index()].is_some())
    }

    /// The kernel still has `bytes` to deliver towards `destination`. `None`: that direction
    /// is not held; `Some(true)`: delivered, released to the relay now; `Some(false)`: still
    /// held. Progress counts as activity for the idle timeout (a slow reader is reading).
    pub(super) fn kernel_delivered(
        &mut self,
        destination: Side,
        bytes: u64,
        now_ns: u64,
    ) -> Option<bool> {
        let left = self.left_kernel.as_mut()?;
        let pending = left.pending[destination.index()].as_mut()?;
        if bytes == 0 {
            left.pending[destination.index()] = None;
            self.last_activity_ns = now_ns;
            return Some(true);
        }
        if bytes < *pending {
            self.last_activity_ns = now_ns;
        }
        *pending = bytes;
        Some(false)
    }

    /// Sets the share of the kernel backlog gauge to what is still pending; returns the old
    /// and the new share.
    pub(super) fn update_kernel_backlog(&mut self) -> (u64, u64) {
        let Some(left) = self.left_kernel.as_mut() else {
            return (0, 0);
        };
        let now: u64 = left.pending.iter().flatten().sum();
        (std::mem::replace(&mut left.share, now), now)
    }
}

impl Connection {
    /// Starts relaying: `to_client` and `to_upstream` go first, then each direction reads its
    /// source. `status` 101 is a tunnel; anything else relays a refusal (upstream → client
    /// only, bounded by `down`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_relay(
        &mut self,
        to_client: Vec<u8>,
        to_upstream: Vec<u8>,
        mut down: Direction,
        status: u16,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let idle_ns = self.idle_ns(services);
        let mut up = if status == 101 {
            Direction::unbounded()
        } else {
            Direction::closed()
        };
        // What the client pipelined is frames already; the client's stream starts with the
        // 101's head (`down.frames` says how long it is).
        up.frames.feed(&to_upstream);
        down.frames.feed(&to_client);
        let promote_at_ns = match (self.datapath, services.promotion) {
            (DataPath::Promote, Some(promotion)) if status == 101 => {
                now_ns.saturating_add(promotion.after_ns)
            }
            // The packet splice pays from the first message: hand it over at once.
            (DataPath::Packet, _) if status == 101 => now_ns,
            _ => u64::MAX,
        };
        let relay = Relay {
            up,
            down,
            last_activity_ns: now_ns,
            idle_ns,
            status,
            promote_at_ns,
            left_kernel: None,
            goodbye: None,
        };
        let reminder = relay.reminder(now_ns);
        self.stage = Stage::Relaying(Box::new(relay));
        if status == 101 {
            tracing::debug!(client = %self.client_addr, upstream = ?self.upstream_addr, "tunnel open");
            services.metrics.tunnels_opened.inc();
            services.metrics.tunnels_open.inc();
        } else {
            services.metrics.upgrades_refused.inc();
        }
        out.push_back(Action::ArmDeadline(reminder));
        self.start_direction(Side::Client, to_client, services, out);
        if status == 101 {
            self.start_direction(Side::Upstream, to_upstream, services, out);
        }
    }

    /// Starts relaying a tunnel (the upgrade succeeded): both directions, unbounded.
    pub(super) fn start_tunnel_relay(
        &mut self,
        to_client: Vec<u8>,
        frames: crate::tunnel::frames::FrameTracker,
        to_upstream: Vec<u8>,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let mut down = Direction::unbounded();
        down.frames = frames;
        self.start_relay(to_client, to_upstream, down, 101, now_ns, services, out);
    }

    /// The idle timeout of the connection's route.
    pub(super) fn idle_ns(&self, services: &Services) -> u64 {
        self.summary
            .route
            .and_then(|route| services.routes.get(route))
            .map_or(u64::MAX, |route| route.idle_ns)
    }

    /// Sends `first` to `destination` before anything else, or starts reading its source.
    fn start_direction(
        &mut self,
        destination: Side,
        first: Vec<u8>,
        services: &Services,
        out: &mut Actions,
    ) {
        if first.is_empty() {
            return self.pump(destination.peer(), services, out);
        }
        if let Stage::Relaying(relay) = &mut self.stage {
            relay.towards(destination).bytes += first.len() as u64;
        }
        self.sending[destination.index()] = true;
        out.push_back(Action::Send(destination, first));
    }

    /// Moves the next chunk from `source` towards its peer, if the peer is free to take it.
    pub(super) fn pump(&mut self, source: Side, services: &Services, out: &mut Actions) {
        let destination = source.peer();
        if self.sending[destination.index()] {
            return; // backpressure: one chunk in flight per direction
        }
        if self.farewell_step(destination, services, out) {
            return; // shutting down: the goodbye decides
        }
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        if relay.is_held(destination) {
            return; // the kernel still delivers what it redirected there
        }
        let mut budget = relay
            .towards(destination)
            .read_budget(services.relay_buffer);
        if relay.goodbye.is_some() {
            // Saying goodbye: read no further than the end of the frame in flight.
            let to_boundary = relay.towards(destination).frames.to_boundary();
            if let Some(limit) = to_boundary {
                budget = budget.min(usize::try_from(limit).unwrap_or(usize::MAX));
            }
        }
        if budget == 0 {
            return self.flush_direction(destination, out);
        }
        let direction = relay.towards(destination);
        if direction.source_read() == SourceRead::Drained {
            // Saves the `recv` that would only find the socket empty; a readiness wait costs
            // no system call of its own (it goes out with the loop's next submission).
            direction.on_read_done(true, true);
            out.push_back(Action::AwaitReadable(source));
            return;
        }
        direction.on_read_asked();
        out.push_back(Action::Forward {
            from: source,
            budget,
        });
    }

    /// A [`Action::Forward`] found nothing to read on `source`; the I/O layer waits for it to
    /// become readable (then [`Connection::on_readable`]). A quiet moment: the tunnel may move
    /// to the kernel now.
    pub fn on_source_waiting(
        &mut self,
        source: Side,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        relay.towards(source.peer()).on_read_done(true, true);
        if relay.goodbye.is_some() {
            // A quiet moment: where the frames are unknown, the goodbye takes it as a boundary.
            self.farewell_step(source.peer(), services, out);
            return;
        }
        self.try_promote(now_ns, services, out);
    }

    /// A [`Action::Forward`]'s source became readable: try again.
    pub fn on_readable(&mut self, source: Side, services: &Services, out: &mut Actions) {
        if self.is_closing() {
            return;
        }
        if let Stage::Relaying(relay) = &mut self.stage {
            relay.towards(source.peer()).on_read_done(false, false);
        }
        self.pump(source, services, out);
    }

    /// `count` bytes were read from `source` and are being sent to its peer; `drained` when the
    /// read took everything queued (it returned less than it could take).
    pub fn on_forwarded(
        &mut self,
        source: Side,
        bytes: &[u8],
        drained: bool,
        now_ns: u64,
        services: &Services,
    ) {
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        let count = bytes.len();
        let direction = relay.towards(source.peer());
        direction.frames.feed(bytes);
        direction.on_read(count);
        direction.on_read_done(drained, false);
        relay.last_activity_ns = now_ns;
        services.metrics.relayed_bytes_userspace.add(count as u64);
        self.sending[source.peer().index()] = true;
    }

    /// `source` reached the end of its stream.
    pub fn on_source_eof(&mut self, source: Side, out: &mut Actions) {
        if self.is_closing() {
            return;
        }
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        relay.towards(source.peer()).on_source_eof();
        if let Some(goodbye) = relay.goodbye.as_mut() {
            goodbye.source_ended(source);
        }
        self.flush_direction(source.peer(), out);
    }

    /// Reading `source` failed (`reset` for a connection reset).
    pub fn on_source_failed(&mut self, source: Side, error: &str, reset: bool, out: &mut Actions) {
        self.close(format!("read from {source:?} failed: {error}"), reset, out);
    }

    /// The direction towards `destination` has nothing in flight and its source is exhausted:
    /// pass the FIN on (for a TLS client `close_notify` first), and close once both
    /// directions are done.
    fn flush_direction(&mut self, destination: Side, out: &mut Actions) {
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        let direction = relay.towards(destination);
        if destination == Side::Client
            && self.tls
            && direction.source_done()
            && !self.close_notified
        {
            // close_notify goes before the FIN; its completion brings us back here.
            self.close_notified = true;
            self.sending[Side::Client.index()] = true;
            out.push_back(Action::CloseNotify);
            return;
        }
        if direction.after_flush() == AfterSource::ShutDownDestination {
            out.push_back(Action::ShutdownWrite(destination));
        }
        if relay.finished() {
            let reason = if relay.status == 101 {
                "both sides closed"
            } else {
                "refused upgrade relayed"
            };
            self.close(reason.into(), false, out);
        }
    }
}
