//! The kernel path's stages: the hand-off (what the client sent early goes upstream first, then
//! both sockets go to the splice program) and the spliced tunnel, which userspace only watches
//! for FINs, resets, stray bytes, idleness and slow readers.
//!
//! Hand-off steps (numbered as in ARCHITECTURE.md):
//! 1. the upstream's response head was only peeked at: it stays queued for the kernel;
//! 2. everything the client sent so far is read ([`Action::DrainClient`]) and sent upstream,
//!    so no skb is left half-read (the program takes each socket's place in its TCP stream
//!    from the first skb it sees);
//! 3. [`Action::Splice`]: the I/O layer inserts `PEER[cookie(upstream)] = client` (for a
//!    promotion, `BRIDGE[cookie(client)] = upstream` first: the client may be sending),
//! 4. then `PEER[cookie(client)] = upstream`,
//! 5. and kicks both sockets (`runtime/splice.rs`).
//!
//! Promotion (`DataPath::Promote`) hands over a tunnel that the userspace relay carries, once
//! it has lived `kernel.promote_after` or relayed `kernel.promote_after_bytes`, at a quiet
//! moment: no read pending, nothing being written, and each socket's last read took everything
//! queued (so no segment is half-read: the program would get it whole and pass its head on a
//! second time). Bytes that arrive afterwards wait whole in the socket until step 5's kick.

use super::{Action, Actions, Connection, DataPath, Relay, Side, Stage, MAX_UNREAD_BEFORE_SPLICE};
use crate::services::Services;
use crate::tunnel::frames::{CloseCode, FrameTracker};
use crate::tunnel::relay::SourceRead;

/// A tunnel carried by the kernel; userspace holds only this.
#[derive(Debug)]
pub struct Splice {
    since_ns: u64,
    idle_ns: u64,
    /// A FIN was passed on to this side (indexed by [`Side::index`]).
    fin_passed: [bool; 2],
    /// Bytes each way, read from the program's counters when the tunnel left the kernel.
    bytes_up: u64,
    bytes_down: u64,
    /// Bytes the kernel still had to deliver (both ways) when last measured: this tunnel's
    /// share of `kernel_backlog_bytes`.
    backlog: u64,
    /// A reader fell behind: the tunnel is leaving the kernel path ([`Action::PauseSplice`]).
    leaving: bool,
    /// Shutdown: it leaves the kernel path to say goodbye (`connection::goodbye`), for this
    /// reason. Boxed: set only in a drain, and every idle spliced tunnel would carry it.
    farewell: Option<Box<(&'static str, CloseCode)>>,
}

impl Splice {
    /// When the tunnel becomes idle, given when the program last moved one of its bytes.
    pub fn deadline(&self, kernel_activity_ns: Option<u64>) -> u64 {
        kernel_activity_ns
            .unwrap_or(0)
            .max(self.since_ns)
            .saturating_add(self.idle_ns)
    }

    /// The idle timeout.
    pub fn idle_ns(&self) -> u64 {
        self.idle_ns
    }

    /// A tunnel a predecessor process spliced (binary upgrade).
    pub(super) fn adopted(
        since_ns: u64,
        idle_ns: u64,
        fin_passed: [bool; 2],
        bytes_up: u64,
        bytes_down: u64,
    ) -> Splice {
        Splice {
            since_ns,
            idle_ns,
            fin_passed,
            bytes_up,
            bytes_down,
            backlog: 0,
            leaving: false,
            farewell: None,
        }
    }

    /// When it entered the kernel path.
    pub(super) fn since_ns(&self) -> u64 {
        self.since_ns
    }

    /// Whether a FIN was passed on to each side ([`Side::index`]).
    pub(super) fn fin_passed(&self) -> [bool; 2] {
        self.fin_passed
    }

    /// A reader fell behind and the tunnel is leaving the kernel path.
    pub(super) fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// Shutdown: the tunnel leaves the kernel path to say goodbye; true when that takes a
    /// [`Action::PauseSplice`] (it is not leaving already).
    pub(super) fn bid_farewell(&mut self, reason: &'static str, code: CloseCode) -> bool {
        self.farewell = Some(Box::new((reason, code)));
        !std::mem::replace(&mut self.leaving, true)
    }

    /// A reload changed the route's idle timeout; returns the one it had.
    pub(super) fn replace_idle_ns(&mut self, idle_ns: u64) -> u64 {
        std::mem::replace(&mut self.idle_ns, idle_ns)
    }

    /// Bytes client → upstream (known once unspliced).
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up
    }

    /// Bytes upstream → client (known once unspliced).
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down
    }

    /// This tunnel's share of the process-wide kernel backlog, as last measured.
    pub fn backlog(&self) -> u64 {
        self.backlog
    }
}

/// What the kernel still has to deliver towards one socket of a spliced tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Bytes the program redirected there that the socket has not taken in yet.
    pub bytes: u64,
    /// The socket is gone (reset, or closed both ways): those bytes can never be delivered.
    pub destination_gone: bool,
}

/// What a readiness event on a spliced socket turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplicedEvent {
    /// A spurious wake-up.
    Nothing,
    /// The side sent its FIN.
    Eof,
    /// Bytes wait on the socket: the program did not redirect them. `diverted`: it stopped on
    /// purpose (repeated bytes it could not cut off); else the socket had no peer entry.
    Stray {
        /// The program stopped redirecting this socket.
        diverted: bool,
    },
    /// The socket failed.
    Failed {
        /// A connection reset.
        reset: bool,
        /// The error, for the log.
        error: String,
    },
}

/// A tunnel's sockets were paused ([`Action::PauseSplice`]): what the program had counted, and
/// what the kernel still has to deliver towards each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paused {
    /// Bytes the program moved, final now.
    pub counted: Counted,
    /// Still to deliver towards the client.
    pub to_client: Backlog,
    /// Still to deliver towards the upstream.
    pub to_upstream: Backlog,
}

/// What the program counted for a tunnel, read when it left the kernel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Bytes client → upstream.
    pub up: u64,
    /// Bytes upstream → client.
    pub down: u64,
    /// Bytes the kernel handed over twice that the program cut off (both sockets).
    pub repeated: u64,
    /// Where each way's frames stood (client → upstream, upstream → client).
    pub frames: [FrameTracker; 2],
}

impl Connection {
    /// The upgrade succeeded on the kernel path: hand-off step 2. The hand-off gets the tunnel's
    /// idle timeout: an upstream that answers 101 and never reads the client's early bytes holds
    /// both sockets no longer than an idle tunnel would.
    pub(super) fn hand_off(
        &mut self,
        early: Vec<u8>,
        head_len: usize,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        // The client's early bytes are frames; the upstream's stream starts with the 101's
        // head, which the kernel delivers too.
        let mut from_client = FrameTracker::at_boundary();
        from_client.feed(&early);
        let frames = [from_client, FrameTracker::after(head_len as u64)];
        self.stage = Stage::HandingOff { early, frames };
        self.deadline_ns = now_ns.saturating_add(self.idle_ns(services));
        out.push_back(Action::ArmDeadline(self.deadline_ns));
        out.push_back(Action::DrainClient {
            limit: MAX_UNREAD_BEFORE_SPLICE,
        });
    }

    /// What the client had sent beyond its request; `complete` is false when it sent more than
    /// the drain's limit (then the tunnel is relayed in userspace).
    pub fn on_client_drained(
        &mut self,
        bytes: &[u8],
        complete: bool,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let Stage::HandingOff { early, frames } = &mut self.stage else {
            return;
        };
        frames[0].feed(bytes);
        early.extend_from_slice(bytes);
        let early = std::mem::take(early);
        if !complete {
            let reason = format!(
                "the client sent more than {MAX_UNREAD_BEFORE_SPLICE} bytes before the 101"
            );
            return self.fall_back_to_relay(reason, early, now_ns, services, out);
        }
        if early.is_empty() {
            out.push_back(Action::Splice { bridged: false });
        } else {
            self.sending[Side::Upstream.index()] = true;
            out.push_back(Action::Send(Side::Upstream, early));
        }
    }

    /// Where each way's frames stand as the tunnel enters the kernel path (client → upstream,
    /// upstream → client), for the program to follow them from there.
    pub fn splice_frames(&self) -> [FrameTracker; 2] {
        match &self.stage {
            Stage::HandingOff { frames, .. } => *frames,
            Stage::Promoting(relay) => [
                relay.direction(Side::Upstream).frames,
                relay.direction(Side::Client).frames,
            ],
            _ => [FrameTracker::unknown(); 2],
        }
    }

    /// Promotion: moves a relayed tunnel to the kernel if it is due and userspace holds none
    /// of its bytes (see the module docs); true when the hand-off was asked for.
    pub(super) fn try_promote(
        &mut self,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) -> bool {
        if self.datapath == DataPath::Packet {
            return self.try_packet_splice(now_ns, out);
        }
        if self.datapath != DataPath::Promote || self.is_closing() {
            return false;
        }
        let (Some(promotion), Stage::Relaying(relay)) = (services.promotion, &self.stage) else {
            return false;
        };
        if relay.status() != 101
            || !self.holds_nothing(relay)
            || !relay.is_due(now_ns, promotion.after_bytes)
        {
            return false;
        }
        let stage = std::mem::replace(
            &mut self.stage,
            Stage::HandingOff {
                early: Vec::new(),
                frames: [FrameTracker::unknown(); 2],
            },
        );
        if let Stage::Relaying(relay) = stage {
            self.stage = Stage::Promoting(relay);
        }
        out.push_back(Action::Splice { bridged: true });
        true
    }

    /// A quiet moment of the relay, the one both hand-offs wait for: nothing being written
    /// either way, and each direction's source quiet (see `Direction::is_quiet`).
    pub(super) fn holds_nothing(&self, relay: &Relay) -> bool {
        [Side::Client, Side::Upstream]
            .into_iter()
            .all(|destination| {
                !self.sending[destination.index()] && relay.direction(destination).is_quiet()
            })
    }

    /// The hand-off to the kernel succeeded (`Ok`) or not (`Err` with the reason, and the
    /// tunnel goes to, or stays on, the userspace relay).
    pub fn on_splice_result(
        &mut self,
        result: Result<(), String>,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let metrics = &services.metrics;
        let (bytes_up, bytes_down) = match (&self.stage, &result) {
            (Stage::HandingOff { .. }, Err(reason)) => {
                let reason = reason.clone();
                return self.fall_back_to_relay(reason, Vec::new(), now_ns, services, out);
            }
            (Stage::Promoting(_), Err(reason)) => {
                let reason = reason.clone();
                return self.stay_in_userspace(&reason, services, out);
            }
            (Stage::HandingOff { .. }, Ok(())) => {
                metrics.tunnels_opened.inc();
                metrics.tunnels_open.inc();
                (0, 0)
            }
            (Stage::Promoting(relay), Ok(())) => {
                metrics.tunnels_promoted.inc();
                (relay.bytes_up(), relay.bytes_down())
            }
            _ => return,
        };
        let idle_ns = self.idle_ns(services);
        self.stage = Stage::Spliced(Splice {
            since_ns: now_ns,
            idle_ns,
            fin_passed: [false; 2],
            bytes_up,
            bytes_down,
            backlog: 0,
            leaving: false,
            farewell: None,
        });
        metrics.tunnels_spliced.inc();
        metrics.tunnels_spliced_open.inc();
        out.push_back(Action::ArmDeadline(now_ns.saturating_add(idle_ns)));
        out.push_back(Action::WatchSpliced(Side::Client));
        out.push_back(Action::WatchSpliced(Side::Upstream));
    }

    /// A promotion failed: the relay goes on where it stopped, for good. A direction waiting
    /// for its source still has its readiness wait armed; the others read again.
    fn stay_in_userspace(&mut self, reason: &str, services: &Services, out: &mut Actions) {
        services.metrics.kernel_handoff_failures.inc();
        tracing::warn!(%reason, "kernel hand-off failed; this tunnel stays on the userspace relay");
        self.datapath = DataPath::Relay;
        let stage = std::mem::replace(
            &mut self.stage,
            Stage::HandingOff {
                early: Vec::new(),
                frames: [FrameTracker::unknown(); 2],
            },
        );
        let Stage::Promoting(mut relay) = stage else {
            self.stage = stage;
            return;
        };
        relay.stay_in_userspace();
        let resume: Vec<Side> = [Side::Client, Side::Upstream]
            .into_iter()
            .filter(|&source| relay.direction(source.peer()).source_read() != SourceRead::Waiting)
            .collect();
        self.stage = Stage::Relaying(relay);
        for source in resume {
            self.pump(source, services, out);
        }
    }

    /// The kernel cannot take the tunnel: relay it in userspace, starting with `to_upstream`.
    /// The upstream's 101 is still queued in its socket, so the relay delivers it like any
    /// other byte.
    fn fall_back_to_relay(
        &mut self,
        reason: String,
        to_upstream: Vec<u8>,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        services.metrics.kernel_handoff_failures.inc();
        tracing::warn!(%reason, "kernel hand-off failed; relaying this tunnel in userspace");
        self.datapath = DataPath::Relay;
        out.push_back(Action::UndoPeekMark);
        // The 101 is relayed as stream bytes ahead of the frames; its length was not kept, so
        // the frames' boundaries towards the client are unknown.
        let frames = crate::tunnel::frames::FrameTracker::unknown();
        self.start_tunnel_relay(Vec::new(), frames, to_upstream, now_ns, services, out);
    }

    /// A spliced socket woke up, or a report made the I/O layer look at it. Once the tunnel
    /// left the kernel path only a diverted socket matters (the relay reads everything else):
    /// its program dropped the copy it could not cut, and what follows, so the tunnel is
    /// reset.
    pub fn on_spliced_event(
        &mut self,
        side: Side,
        event: SplicedEvent,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let left_kernel = matches!(&self.stage, Stage::Relaying(relay) if relay.left_kernel());
        if left_kernel && event == (SplicedEvent::Stray { diverted: true }) {
            services.metrics.kernel_diverted.inc();
            let reason = format!(
                "the kernel handed over bytes from {side:?} twice and the copy could not be cut \
                 off; the bytes were dropped"
            );
            tracing::warn!(%reason, "resetting a tunnel that left the kernel path");
            return self.close(reason, true, out);
        }
        if !matches!(self.stage, Stage::Spliced(_)) {
            return;
        }
        match event {
            SplicedEvent::Nothing => out.push_back(Action::WatchSpliced(side)),
            // Passed on only once the kernel delivered what it redirected there: the redirect
            // is asynchronous, and a FIN sent at once could overtake queued bytes.
            SplicedEvent::Eof => out.push_back(Action::CheckKernelBacklog {
                towards: side.peer(),
                next_tick: false,
            }),
            SplicedEvent::Stray { diverted } => {
                let reason = if diverted {
                    services.metrics.kernel_diverted.inc();
                    format!(
                        "the kernel handed over bytes from {side:?} twice and the copy could not be \
                         cut off; the bytes were held back"
                    )
                } else {
                    format!("bytes from {side:?} bypassed the splice (no peer entry)")
                };
                tracing::warn!(%reason, "resetting a kernel-path tunnel");
                // The peer will never get those bytes: the tunnel cannot go on without a gap.
                self.close(reason, true, out);
            }
            SplicedEvent::Failed { reset, error } => {
                self.close(format!("{side:?} socket failed: {error}"), reset, out);
            }
        }
    }

    /// What the kernel still has to deliver towards `towards`, measured after its source sent
    /// a FIN: pass the FIN on once it is zero.
    pub fn on_kernel_backlog(&mut self, towards: Side, backlog: Backlog, out: &mut Actions) {
        if self.is_closing() {
            return;
        }
        let Stage::Spliced(splice) = &mut self.stage else {
            return;
        };
        if backlog.bytes > 0 && backlog.destination_gone {
            // What the program redirected there can never be delivered (the psock drops it
            // once the socket failed): waiting for it would keep the tunnel open forever.
            let reason = format!("{towards:?} connection is gone (reset) with bytes queued");
            return self.close(reason, true, out);
        }
        if backlog.bytes > 0 {
            out.push_back(Action::CheckKernelBacklog {
                towards,
                next_tick: true,
            });
            return;
        }
        splice.fin_passed[towards.index()] = true;
        out.push_back(Action::ShutdownWrite(towards));
        if splice.fin_passed.iter().all(|&passed| passed) {
            self.close("both sides closed".into(), false, out);
        }
    }

    /// The program reported that this tunnel moved another `PRESSURE_STEP` bytes, or a
    /// measurement asked for at the last tick is due; the I/O layer measured the backlog
    /// towards each side. A reader more than `limits.kernel_backlog` behind, or one that adds
    /// to a process-wide backlog beyond `limits.kernel_backlog_total`, takes its tunnel off the
    /// kernel path ([`Action::PauseSplice`]): the writer is throttled by TCP from then on, and
    /// the userspace relay takes over each direction once the kernel delivered what it had
    /// queued there. While anything is queued the tunnel is measured again at every tick, so
    /// its share of the total follows its reader catching up.
    ///
    /// Why the kernel path itself cannot slow the writer down: see the README, "Slow readers".
    pub fn on_pressure(
        &mut self,
        to_client: Backlog,
        to_upstream: Backlog,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        if matches!(&self.stage, Stage::Relaying(relay) if relay.left_kernel()) {
            return self.on_kernel_delivering(to_client, to_upstream, now_ns, services, out);
        }
        let Stage::Spliced(splice) = &mut self.stage else {
            return;
        };
        if splice.leaving {
            return;
        }
        let metrics = &services.metrics;
        let measured = to_client.bytes.saturating_add(to_upstream.bytes);
        metrics
            .kernel_backlog_bytes
            .replace_share(splice.backlog, measured);
        splice.backlog = measured;
        let slowest = to_client.bytes.max(to_upstream.bytes);
        let total = metrics.kernel_backlog_bytes.get();
        let over = if slowest > services.kernel_backlog {
            Some("a reader fell behind (limits.kernel_backlog)")
        } else if measured > 0 && total > services.kernel_backlog_total {
            Some("the kernel backlog of all tunnels is over limits.kernel_backlog_total")
        } else {
            None
        };
        if let Some(why) = over {
            tracing::info!(
                client = %self.client_addr,
                backlog = measured,
                total,
                "{why}: this tunnel leaves the kernel path for the userspace relay"
            );
            splice.leaving = true;
            out.push_back(Action::PauseSplice);
            return;
        }
        if measured > 0 {
            out.push_back(Action::MeasurePressure);
        }
    }

    /// Both sockets are paused ([`Action::PauseSplice`]): the tunnel goes to the userspace
    /// relay, each direction held until the kernel delivered what it had queued towards its
    /// destination (so the relay's bytes follow the kernel's, never overtake them). If the
    /// pause failed, closing is the last resort: the kernel would go on queueing for a reader
    /// that does not read.
    pub fn on_paused(
        &mut self,
        result: Result<Paused, String>,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let Stage::Spliced(splice) = &self.stage else {
            return;
        };
        let metrics = &services.metrics;
        let farewell = splice.farewell.as_deref().copied();
        let paused = match result {
            Ok(paused) => paused,
            Err(error) if farewell.is_some() => {
                let why = farewell.map_or("", |(why, _)| why);
                let reason = format!(
                    "{why} (the tunnel could not leave the kernel path to say goodbye: {error})"
                );
                return self.close(reason, false, out);
            }
            Err(error) => {
                metrics.kernel_slow_consumers.inc();
                let reason = format!(
                    "slow consumer: a reader fell behind on the kernel path and the tunnel could \
                     not leave it: {error}"
                );
                return self.close(reason, true, out);
            }
        };
        let counted = paused.counted;
        let (up, down) = (
            splice.bytes_up + counted.up,
            splice.bytes_down + counted.down,
        );
        let fin_passed = splice.fin_passed;
        let backlog = splice.backlog;
        metrics.tunnels_spliced_open.dec();
        metrics.tunnels_demoted.inc();
        metrics.spliced_bytes_kernel.add(counted.up + counted.down);
        if counted.repeated > 0 {
            metrics.kernel_repeated_bytes_cut.add(counted.repeated);
        }
        // Never promoted again: un-pausing cannot be made safe (bytes that stay on a socket
        // between the relay's last read and the un-pause would be overtaken by later ones).
        self.datapath = DataPath::Relay;
        let relay = Relay::left_kernel_path(
            [down, up],
            fin_passed,
            [counted.frames[1], counted.frames[0]],
            backlog,
            now_ns,
            self.idle_ns(services),
        );
        let deadline = relay.deadline();
        self.stage = Stage::Relaying(Box::new(relay));
        out.push_back(Action::ArmDeadline(deadline));
        self.on_kernel_delivering(paused.to_client, paused.to_upstream, now_ns, services, out);
        if let Some((reason, code)) = farewell {
            self.say_goodbye(reason, code, now_ns, services, out);
        }
    }

    /// A tunnel that left the kernel path: what the kernel still has to deliver towards each
    /// side. A direction whose backlog is gone is released to the relay; one whose destination
    /// is gone with bytes queued can never be delivered (the tunnel is reset).
    fn on_kernel_delivering(
        &mut self,
        to_client: Backlog,
        to_upstream: Backlog,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        let mut released = Vec::new();
        let mut gone = None;
        for (destination, backlog) in [(Side::Client, to_client), (Side::Upstream, to_upstream)] {
            match relay.kernel_delivered(destination, backlog.bytes, now_ns) {
                Some(true) => released.push(destination),
                Some(false) if backlog.destination_gone => gone = Some(destination),
                _ => {}
            }
        }
        let (before, after) = relay.update_kernel_backlog();
        services
            .metrics
            .kernel_backlog_bytes
            .replace_share(before, after);
        if let Some(destination) = gone {
            let reason = format!("{destination:?} connection is gone (reset) with bytes queued");
            return self.close(reason, true, out);
        }
        if after > 0 {
            out.push_back(Action::MeasurePressure);
        }
        for destination in released {
            self.pump(destination.peer(), services, out);
        }
    }

    /// The tunnel left the kernel; `counted` is what the program counted.
    pub fn on_unspliced(&mut self, counted: Counted, services: &Services) {
        let Stage::Spliced(splice) = &mut self.stage else {
            return;
        };
        // A promoted tunnel counted its relayed bytes already.
        splice.bytes_up += counted.up;
        splice.bytes_down += counted.down;
        let metrics = &services.metrics;
        metrics.spliced_bytes_kernel.add(counted.up + counted.down);
        if counted.repeated > 0 {
            metrics.kernel_repeated_bytes_cut.add(counted.repeated);
            tracing::debug!(
                client = %self.client_addr,
                bytes = counted.repeated,
                "the kernel handed this tunnel's bytes over twice; the copies were cut off"
            );
        }
    }
}
