//! The drain's goodbye: when shutdown closes a tunnel (its turn in the spread window, or the
//! drain deadline), each side gets a WebSocket Close frame with status 1001 "going away" at a
//! frame boundary, then a FIN, instead of a bare close. Clients then reconnect politely.
//!
//! Each direction goes on relaying up to the end of the frame in flight (the relay reads no
//! further than that: `FrameTracker::to_boundary`), then the destination gets the Close
//! (masked towards the upstream, as a client's frames must be) and a FIN; what its peer sends
//! after that boundary (its own Close in reply, typically) is read and dropped until its end,
//! so no socket is closed with unread bytes (which would send a reset). A spliced tunnel
//! leaves the kernel first; the program followed the frames it moved (`Activity::frame_state`),
//! so the relay goes on from there. Where nobody knows the position (more frames in one skb
//! than the program follows, or a failed hand-off that relayed the 101 as stream bytes), a
//! quiet moment (the source drained, nothing in flight) is taken as the boundary. The whole
//! goodbye is bounded by [`GOODBYE_NS`]; then the tunnel closes as before.

use super::{Action, Actions, Connection, Side, Stage, LINGER_NS};
use crate::services::Services;
use crate::tunnel::frames::{close_frame, CloseCode};

/// How long a goodbye may take (then the tunnel closes anyway).
pub const GOODBYE_NS: u64 = LINGER_NS;

/// Where the Close towards one side stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Farewell {
    /// The frame in flight towards it is not over yet.
    #[default]
    Pending,
    /// The Close is being sent.
    Sending,
    /// TLS: `close_notify` is being sent after it.
    Notifying,
    /// Close (and FIN) sent, or a FIN was passed on before: nothing more goes to it.
    Done,
}

/// A tunnel saying goodbye.
#[derive(Debug)]
pub struct Goodbye {
    /// Why the tunnel is closed (its access line says it, with the goodbye).
    why: &'static str,
    /// The Close frame's status.
    code: CloseCode,
    /// When it closes anyway.
    deadline_ns: u64,
    /// Per destination ([`Side::index`]).
    farewell: [Farewell; 2],
    /// Per source ([`Side::index`]): read to its end.
    ended: [bool; 2],
}

impl Goodbye {
    /// When the goodbye gives up and the tunnel closes.
    pub fn deadline(&self) -> u64 {
        self.deadline_ns
    }

    /// `source` reached the end of its stream.
    pub(super) fn source_ended(&mut self, source: Side) {
        self.ended[source.index()] = true;
    }

    /// The access-line reason of a goodbye that went through.
    fn farewell_reason(&self) -> String {
        format!(
            "{}; said goodbye (Close {}) to both sides",
            self.why,
            self.code.value()
        )
    }

    /// The access-line reason of a goodbye that ran out of time.
    pub(super) fn timeout_reason(&self) -> String {
        format!("{}; the goodbye took too long", self.why)
    }

    fn is_over(&self) -> bool {
        self.farewell == [Farewell::Done; 2] && self.ended == [true; 2]
    }
}

impl Connection {
    /// Closes this connection politely (`reason` if it is not a tunnel): a tunnel says
    /// goodbye first with a Close frame of status `code` (see the module docs).
    pub(super) fn say_goodbye(
        &mut self,
        reason: &'static str,
        code: CloseCode,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        match &mut self.stage {
            Stage::Relaying(relay) if relay.status() == 101 => {
                if relay.goodbye.is_some() {
                    return;
                }
                let deadline_ns = now_ns.saturating_add(GOODBYE_NS);
                relay.goodbye = Some(Box::new(Goodbye {
                    why: reason,
                    code,
                    deadline_ns,
                    farewell: [Farewell::Pending; 2],
                    ended: [false; 2],
                }));
                out.push_back(Action::ArmDeadline(deadline_ns));
                for destination in [Side::Client, Side::Upstream] {
                    self.farewell_step(destination, services, out);
                }
            }
            Stage::Spliced(splice) => {
                // Back to userspace first (the relay can send a frame of its own); the goodbye
                // starts once the tunnel is paused (`on_paused`).
                if splice.bid_farewell(reason, code) {
                    out.push_back(Action::PauseSplice);
                }
            }
            _ => self.close(reason.into(), false, out),
        }
    }

    /// A tunnel that is open and going on: not closing, not saying goodbye, not leaving the
    /// kernel path.
    pub fn is_open_tunnel(&self) -> bool {
        let going_on = match &self.stage {
            Stage::Relaying(relay) => relay.status() == 101 && relay.goodbye.is_none(),
            Stage::Spliced(splice) => !splice.is_leaving(),
            _ => false,
        };
        going_on && !self.is_closing()
    }

    /// Rebalancing: a tunnel on a server above its share closes with a Close 1012 "service
    /// restart", so that its client reconnects and is placed anew. Its count on the server
    /// ends now (the balancer sees the room at once, not after the goodbye). False when it is
    /// not an open tunnel (a request, a tunnel closing or leaving the kernel path already).
    pub fn rebalance(&mut self, now_ns: u64, services: &Services, out: &mut Actions) -> bool {
        if !self.is_open_tunnel() {
            return false;
        }
        self.lease = None;
        self.say_goodbye(
            "rebalancing: its server held more than its share",
            CloseCode::ServiceRestart,
            now_ns,
            services,
            out,
        );
        true
    }

    /// The goodbye's next step towards `destination`, if one is under way: true when it took
    /// the direction over (nothing is to be relayed there now).
    pub(super) fn farewell_step(
        &mut self,
        destination: Side,
        services: &Services,
        out: &mut Actions,
    ) -> bool {
        let index = destination.index();
        // The relay's hot path asks on every chunk: nothing more is looked at without a
        // goodbye under way.
        let Stage::Relaying(relay) = &mut self.stage else {
            return false;
        };
        if relay.goodbye.is_none() {
            return false;
        }
        let held = relay.is_held(destination);
        let direction = relay.direction(destination);
        let (shut_down, quiet, frames) = (
            direction.is_shut_down(),
            direction.is_quiet(),
            direction.frames,
        );
        let Some(goodbye) = relay.goodbye.as_mut() else {
            return false;
        };
        if self.sending[index] {
            return true; // its completion comes back here
        }
        match goodbye.farewell[index] {
            Farewell::Pending if shut_down => goodbye.farewell[index] = Farewell::Done,
            Farewell::Pending => {
                let at_boundary = if frames.is_known() {
                    frames.is_at_boundary()
                } else {
                    !held && quiet
                };
                if !at_boundary {
                    return false; // the frame in flight goes on
                }
                goodbye.farewell[index] = Farewell::Sending;
                self.sending[index] = true;
                let mask = (destination == Side::Upstream).then(|| {
                    let key = self.log_id.rotate_left(17) ^ self.started_ns;
                    (key as u32).to_ne_bytes()
                });
                out.push_back(Action::Send(destination, close_frame(goodbye.code, mask)));
                return true;
            }
            Farewell::Sending if destination == Side::Client && self.tls => {
                goodbye.farewell[index] = Farewell::Notifying;
                self.close_notified = true;
                self.sending[index] = true;
                out.push_back(Action::CloseNotify);
                return true;
            }
            Farewell::Sending | Farewell::Notifying => {
                goodbye.farewell[index] = Farewell::Done;
                out.push_back(Action::ShutdownWrite(destination));
                // What its peer sends from now on is dropped: read it to its end.
                if !goodbye.ended[destination.peer().index()] {
                    out.push_back(Action::Read(destination.peer()));
                }
            }
            Farewell::Done => {}
        }
        if goodbye.is_over() {
            let reason = goodbye.farewell_reason();
            count_goodbye(goodbye.code, services);
            self.close(reason, false, out);
        }
        true
    }

    /// Bytes read from `side` after the goodbye's boundary: dropped, and read on to the end.
    pub(super) fn on_goodbye_data(&mut self, side: Side, out: &mut Actions) {
        if let Stage::Relaying(relay) = &self.stage {
            if relay.goodbye.is_some() {
                out.push_back(Action::Read(side));
            }
        }
    }

    /// `side` ended (or failed) while its bytes were being dropped.
    pub(super) fn on_goodbye_read_end(
        &mut self,
        side: Side,
        services: &Services,
        out: &mut Actions,
    ) {
        let Stage::Relaying(relay) = &mut self.stage else {
            return;
        };
        let Some(goodbye) = relay.goodbye.as_mut() else {
            return;
        };
        goodbye.source_ended(side);
        if goodbye.is_over() {
            let reason = goodbye.farewell_reason();
            count_goodbye(goodbye.code, services);
            self.close(reason, false, out);
        }
    }
}

/// Counts a goodbye that went through: the drain's, or a rebalancing's.
fn count_goodbye(code: CloseCode, services: &Services) {
    match code {
        CloseCode::GoingAway => services.metrics.drain_goodbyes.inc(),
        CloseCode::ServiceRestart => services.metrics.tunnels_rebalanced.inc(),
    }
}
