//! The upgrade stages — reading the request, connecting (the next server on failure),
//! sending the rewritten request, reading the response — and what their outcome leads to: a
//! tunnel on either data path, a relayed refusal, or an error answer with a lingering close.

use super::{
    Action, Actions, ConnectFailure, Connection, DataPath, Handshake, Rejection, Side, Stage, Step,
};
use crate::handshake::BodyLength;
use crate::services::Services;
use crate::tunnel::frames::FrameTracker;
use crate::tunnel::relay::Direction;

impl Connection {
    /// Kernel path: everything queued on the upstream socket, looked at without consuming it.
    pub fn on_peeked(&mut self, bytes: &[u8], now_ns: u64, services: &Services, out: &mut Actions) {
        if self.is_closing() {
            return;
        }
        let Stage::ReadingResponse(h) = &mut self.stage else {
            return;
        };
        // The peek waits for more than `peeked` bytes; woken with no new byte, the upstream
        // closed (or failed) in the middle of its head: answering at once beats spinning on a
        // socket that stays readable until the handshake deadline.
        let closed_mid_head = !bytes.is_empty() && bytes.len() == h.peeked;
        let step = if closed_mid_head {
            h.on_upstream_eof(services, now_ns)
        } else {
            h.on_upstream_peek(bytes, services)
        };
        h.peeked = bytes.len();
        if !matches!(step, Step::ReadUpstream | Step::Tunnel { .. }) {
            // Any outcome but a splice goes on in userspace: what was seen is consumed.
            out.push_back(Action::ConsumeUpstream { len: bytes.len() });
        }
        self.after_step(step, now_ns, services, out);
    }

    /// The connect to [`Connection::upstream_addr`] succeeded (`reused`: an idle kept-alive
    /// connection to it was taken instead, see [`Action::ConnectReusing`]).
    pub fn on_connected(
        &mut self,
        reused: bool,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        match &mut self.stage {
            Stage::Connecting(h) => {
                let step = h.on_connected(reused);
                self.after_step(step, now_ns, services, out);
            }
            Stage::Exchanging(_) => self.on_exchange_reconnected(out),
            _ => {}
        }
    }

    /// The connect failed (`error` for the log).
    pub fn on_connect_failed(
        &mut self,
        failure: ConnectFailure,
        error: &str,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let upstream = self.upstream_addr;
        if matches!(self.stage, Stage::Exchanging(_)) {
            // The new connection that was to replace a closed kept-alive one.
            services.metrics.upstream_connect_failures.inc();
            let upstream = upstream.map(|a| a.to_string()).unwrap_or_default();
            let reason = format!("connect to upstream {upstream} failed: {error}");
            return self.fail_exchange(502, reason, services, out);
        }
        let Stage::Connecting(h) = &mut self.stage else {
            return;
        };
        if failure != ConnectFailure::Local {
            tracing::info!(upstream = ?upstream, %error, "upstream connect failed");
            services.metrics.upstream_connect_failures.inc();
        }
        let step = h.on_connect_failed(failure, services, now_ns);
        self.after_step(step, now_ns, services, out);
    }

    /// Carries out what the handshake decided.
    pub(super) fn after_step(
        &mut self,
        step: Step,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let leaves_handshake = !matches!(
            step,
            Step::ReadClient | Step::Connect(_) | Step::SendRequest(_) | Step::ReadUpstream
        );
        if leaves_handshake {
            // The handshake is done with: its summary and its count on the server are the
            // connection's from now on.
            if let Some(h) = self.handshake() {
                let summary = h.take_summary();
                let lease = h.take_lease();
                self.summary = summary;
                self.lease = lease;
            }
        }
        match step {
            Step::ReadClient => out.push_back(Action::Read(Side::Client)),
            Step::Connect(addr) => {
                self.upstream_addr = Some(addr);
                if let Some(h) = self.handshake() {
                    // A new upstream connection: nothing of its answer has been peeked at yet.
                    h.peeked = 0;
                }
                let plain = self.handshake().is_some_and(|h| h.is_plain());
                self.enter_handshake_stage(Stage::Connecting);
                out.push_back(if plain {
                    Action::ConnectReusing(addr)
                } else {
                    Action::Connect(addr)
                });
            }
            Step::SendRequest(bytes) => {
                self.enter_handshake_stage(Stage::SendingRequest);
                self.sending[Side::Upstream.index()] = true;
                out.push_back(Action::Send(Side::Upstream, bytes));
            }
            Step::ReadUpstream => {
                self.enter_handshake_stage(Stage::ReadingResponse);
                out.push_back(match self.datapath {
                    DataPath::Splice => Action::PeekUpstream {
                        seen: self.handshake().map_or(0, |h| h.peeked),
                    },
                    DataPath::Relay | DataPath::Promote | DataPath::Packet => {
                        Action::Read(Side::Upstream)
                    }
                });
            }
            Step::Reject(rejection) => self.reject(rejection, services, out),
            Step::Tunnel {
                to_client,
                head_len,
                to_upstream,
            } => match self.datapath {
                // The 101 (`to_client`) stays queued in the upstream socket: the kernel delivers it.
                DataPath::Splice => self.hand_off(to_upstream, head_len, now_ns, services, out),
                DataPath::Relay | DataPath::Promote | DataPath::Packet => {
                    let frames = FrameTracker::after(head_len as u64);
                    self.start_tunnel_relay(to_client, frames, to_upstream, now_ns, services, out)
                }
            },
            Step::Refused {
                status,
                to_client,
                remaining,
            } => {
                let down = match remaining {
                    BodyLength::Known(n) => Direction::bounded(n as u64),
                    BodyLength::UntilClose => Direction::unbounded(),
                };
                self.start_relay(to_client, Vec::new(), down, status, now_ns, services, out);
            }
            Step::Close(reason) => self.close(reason, false, out),
            Step::Exchange(start) => self.start_exchange(*start, now_ns, services, out),
        }
    }

    /// Moves the handshake into the stage `next` (one of the four upgrade stages).
    pub(super) fn enter_handshake_stage(&mut self, next: fn(Box<Handshake>) -> Stage) {
        let stage = std::mem::replace(
            &mut self.stage,
            Stage::HandingOff {
                early: Vec::new(),
                frames: [FrameTracker::unknown(); 2],
            },
        );
        self.stage = match stage {
            Stage::ReadingRequest(h)
            | Stage::Connecting(h)
            | Stage::SendingRequest(h)
            | Stage::ReadingResponse(h) => next(h),
            other => other,
        };
    }

    /// Answers the client with an HTTP error, then closes lingering.
    pub(super) fn reject(&mut self, rejection: Rejection, services: &Services, out: &mut Actions) {
        tracing::info!(
            client = %self.client_addr,
            status = rejection.status,
            reason = %rejection.reason,
            "request rejected"
        );
        services.metrics.requests_rejected.inc();
        if self.upstream_addr.is_some() {
            // Anything still pending on the upstream (a connect, a response read) is abandoned.
            out.push_back(Action::CancelUpstream);
        }
        self.stage = Stage::Rejecting {
            status: rejection.status,
            lingering: false,
        };
        self.sending[Side::Client.index()] = true;
        out.push_back(Action::Send(Side::Client, rejection.response));
        if self.tls {
            // The answer is followed by close_notify, then the FIN (once all is sent).
            self.close_notified = true;
            out.push_back(Action::CloseNotify);
        }
    }
}
