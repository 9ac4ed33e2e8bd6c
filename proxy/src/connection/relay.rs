//! The userspace relay stage: bytes move through one buffer per direction, a direction reads
//! only when its previous chunk is written (a slow reader throttles its own writer), and a FIN
//! is passed on once everything before it is written.

use super::{Action, Actions, Connection, DataPath, Side, Stage};
use crate::services::Services;
use crate::tunnel::relay::{AfterSource, Direction};

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
}

impl Relay {
    /// The direction whose bytes go to `destination`.
    fn towards(&mut self, destination: Side) -> &mut Direction {
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
        down: Direction,
        status: u16,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let idle_ns = self.idle_ns(services);
        let up = if status == 101 {
            Direction::unbounded()
        } else {
            Direction::closed()
        };
        let promote_at_ns = match (self.datapath, services.promotion) {
            (DataPath::Promote, Some(promotion)) if status == 101 => {
                now_ns.saturating_add(promotion.after_ns)
            }
            _ => u64::MAX,
        };
        let relay = Relay {
            up,
            down,
            last_activity_ns: now_ns,
            idle_ns,
            status,
            promote_at_ns,
        };
        let reminder = relay.reminder(now_ns);
        self.stage = Stage::Relaying(relay);
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
        to_upstream: Vec<u8>,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let down = Direction::unbounded();
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
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        let budget = relay
            .towards(destination)
            .read_budget(services.relay_buffer);
        if budget == 0 {
            return self.flush_direction(destination, out);
        }
        relay.towards(destination).on_read_asked();
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
        count: usize,
        drained: bool,
        now_ns: u64,
        services: &Services,
    ) {
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        let direction = relay.towards(source.peer());
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
