//! The packet path's stages (`DataPath::Packet`): a tunnel starts on the userspace relay and,
//! at its first quiet moment after the 101, is handed to the packet splice
//! ([`Action::PacketSplice`]; `runtime/packet.rs` carries it out). Afterwards the proxy holds
//! no socket for it, only this record: at each deadline the I/O layer reads what the program
//! recorded for its flows, and the record ends when the flows have been closed for the linger
//! time, or idle for the idle timeout.
//!
//! A tunnel the packet splice cannot take (see [`Ineligible`](crate::splice::packet::Ineligible))
//! stays on the relay, with the reason logged and counted. One that is not quiet at the socket
//! level (bytes sent and not yet acknowledged) tries again a moment later.

use super::{Action, Actions, Connection, DataPath, Side, Stage};
use crate::services::Services;
use crate::tunnel::relay::SourceRead;

/// How long a tunnel waits before trying the hand-off again when its sockets were not quiet.
const RETRY_NS: u64 = 20_000_000;
/// Tries before a tunnel that never gets quiet stays on the relay.
const MAX_TRIES: u8 = 50;
/// How often a packet-spliced tunnel's flows are looked at, at most: a third of the linger
/// time, within these bounds (a closed tunnel is retired within the linger time plus that).
/// Each look is two map lookups (system calls): at one a second, 200,000 idle tunnels kept
/// both cores of a test machine busy; at the default linger (30 s), every 10 s.
const CHECK_MIN_NS: u64 = 1_000_000_000;
const CHECK_MAX_NS: u64 = 10_000_000_000;

/// How far apart a packet-spliced tunnel's flows are looked at, for a linger time.
pub(super) fn check_ns(linger_ns: u64) -> u64 {
    (linger_ns / 3).clamp(CHECK_MIN_NS, CHECK_MAX_NS)
}

/// When a tunnel whose flows closed (their last packet at `closed_ns`) is retired: after the
/// linger time, which keeps translating late retransmissions. Shutting down, the process (and,
/// unless pinned, the program) goes anyway, and a pinned record has already been left to the
/// next process: at once, rather than hold the exit up.
pub(super) fn retire_at(closed_ns: u64, linger_ns: u64, draining: bool) -> u64 {
    if draining {
        closed_ns
    } else {
        closed_ns.saturating_add(linger_ns)
    }
}

/// A tunnel whose packets the program rewrites into each other.
#[derive(Debug)]
pub struct PacketSplice {
    since_ns: u64,
    idle_ns: u64,
    linger_ns: u64,
    /// Bytes relayed in userspace before the hand-off (up, down).
    relayed: (u64, u64),
    /// Bytes the program translated (up, down), as last read.
    translated: (u64, u64),
}

impl PacketSplice {
    /// Payload bytes client → upstream, relayed and translated.
    pub fn bytes_up(&self) -> u64 {
        self.relayed.0 + self.translated.0
    }

    /// Payload bytes upstream → client, relayed and translated.
    pub fn bytes_down(&self) -> u64 {
        self.relayed.1 + self.translated.1
    }
}

/// What the program recorded for a tunnel's two flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowReport {
    /// The last packet either way (`bpf_ktime_get_ns`, CLOCK_MONOTONIC), 0 if none.
    pub last_ns: u64,
    /// Once the tunnel ended (both FINs acknowledged, or a reset): its last packet either way,
    /// from which the linger time runs (so late retransmissions keep it, as TIME_WAIT would);
    /// 0 while it is open.
    pub closed_ns: u64,
    /// The end was a reset.
    pub reset: bool,
    /// Payload bytes translated client → upstream and upstream → client.
    pub bytes: (u64, u64),
}

/// Why a hand-off to the packet splice did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PacketRefusal {
    /// Bytes still in flight or unread on a socket: try again shortly.
    NotQuiet(String),
    /// The tunnel cannot take the packet path (`label` for the metric): it stays relayed.
    Ineligible {
        /// A [`REFUSAL_LABELS`](crate::splice::packet::REFUSAL_LABELS) entry.
        label: &'static str,
        /// For the log.
        reason: String,
    },
}

impl Connection {
    /// A packet-spliced tunnel that a previous process left in the pinned flows map, as
    /// connection `id` of this one. What that process knew of its request is gone: the record
    /// has the addresses, and the longest idle timeout of this generation's routes (it may
    /// have been on any of them; ending it early would be worse than late).
    pub fn adopt_packet(
        id: u64,
        client: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) -> Connection {
        let metrics = &services.metrics;
        metrics.tunnels_adopted.inc();
        metrics.connections_open.inc();
        metrics.tunnels_open.inc();
        metrics.tunnels_packet_open.inc();
        let idle_ns = services
            .routes
            .iter()
            .map(|route| route.idle_ns)
            .max()
            .unwrap_or(u64::MAX);
        let linger_ns = services.packet.as_ref().map_or(0, |path| path.linger_ns);
        let stage = Stage::PacketSpliced(PacketSplice {
            since_ns: now_ns,
            idle_ns,
            linger_ns,
            relayed: (0, 0),
            translated: (0, 0),
        });
        out.push_back(Action::ArmDeadline(
            now_ns.saturating_add(idle_ns.min(check_ns(linger_ns))),
        ));
        let mut connection = Connection::new(id, id, client, now_ns, stage);
        connection.datapath = DataPath::Packet;
        connection.upstream_addr = Some(upstream);
        connection
    }

    /// Shutdown with pinned flows: the record ends; the tunnel goes on in the program for the
    /// next process to adopt.
    pub fn leave_pinned(&mut self, out: &mut Actions) {
        if matches!(self.stage, Stage::PacketSpliced(_)) {
            self.close(
                "shutting down: left to the next process (pinned flows)".into(),
                false,
                out,
            );
        }
    }

    /// Packet path: whether the upstream connection being opened is a tunnel's (it takes its
    /// local port from the packet splice's range, so its 4-tuple stays reserved while the
    /// spliced flow lives).
    pub fn wants_packet_port(&self) -> bool {
        self.datapath == DataPath::Packet
            && matches!(&self.stage, Stage::Connecting(h) if !h.is_plain())
    }

    /// Packet path: hands the relayed tunnel to the packet splice at a quiet moment (nothing
    /// held or pending in userspace either way); true when the hand-off was asked for.
    pub(super) fn try_packet_splice(&mut self, now_ns: u64, out: &mut Actions) -> bool {
        if self.datapath != DataPath::Packet || self.is_closing() {
            return false;
        }
        let Stage::Relaying(relay) = &self.stage else {
            return false;
        };
        if relay.status() != 101 || relay.goodbye.is_some() || !self.holds_nothing(relay) {
            return false;
        }
        if now_ns < relay.promote_at_ns() {
            return false;
        }
        out.push_back(Action::PacketSplice);
        true
    }

    /// The hand-off to the packet splice is done (`Ok`: the sockets are gone) or did not
    /// happen.
    pub fn on_packet_splice_result(
        &mut self,
        result: Result<(), PacketRefusal>,
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
        let metrics = &services.metrics;
        match result {
            Ok(()) => {
                let linger_ns = services.packet.as_ref().map_or(0, |path| path.linger_ns);
                let relayed = (relay.bytes_up(), relay.bytes_down());
                self.stage = Stage::PacketSpliced(PacketSplice {
                    since_ns: now_ns,
                    idle_ns: self.idle_ns(services),
                    linger_ns,
                    relayed,
                    translated: (0, 0),
                });
                metrics.tunnels_packet_spliced.inc();
                metrics.tunnels_packet_open.inc();
                tracing::debug!(client = %self.client_addr, "tunnel packet-spliced");
                let idle_ns = self.idle_ns(services);
                out.push_back(Action::ArmDeadline(
                    now_ns.saturating_add(idle_ns.min(check_ns(linger_ns))),
                ));
            }
            Err(PacketRefusal::NotQuiet(reason)) => {
                self.packet_tries += 1;
                if self.packet_tries >= MAX_TRIES {
                    metrics.packet_refusals.count("not_quiet");
                    tracing::info!(client = %self.client_addr, %reason, tries = MAX_TRIES,
                        "packet splice: the tunnel never got quiet; it stays on the userspace relay");
                    relay.stay_in_userspace();
                    self.datapath = DataPath::Relay;
                } else {
                    relay.promote_later(now_ns.saturating_add(RETRY_NS));
                    out.push_back(Action::ArmDeadline(relay.reminder(now_ns)));
                }
                self.resume_relay(services, out);
            }
            Err(PacketRefusal::Ineligible { label, reason }) => {
                metrics.packet_refusals.count(label);
                tracing::info!(client = %self.client_addr, %reason,
                    "packet splice: not eligible; the tunnel stays on the userspace relay");
                relay.stay_in_userspace();
                self.datapath = DataPath::Relay;
                self.resume_relay(services, out);
            }
        }
    }

    /// The relay goes on where the hand-off found it: directions whose source was not being
    /// waited for read again.
    fn resume_relay(&mut self, services: &Services, out: &mut Actions) {
        let Stage::Relaying(relay) = &self.stage else {
            return;
        };
        let resume: Vec<Side> = [Side::Client, Side::Upstream]
            .into_iter()
            .filter(|&source| relay.direction(source.peer()).source_read() != SourceRead::Waiting)
            .collect();
        for source in resume {
            self.pump(source, services, out);
        }
    }

    /// A packet-spliced tunnel's deadline, with what the program recorded for its flows
    /// (`None`: they are gone from the map).
    pub fn on_packet_deadline(
        &mut self,
        now_ns: u64,
        report: Option<FlowReport>,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.is_closing() {
            return;
        }
        let Stage::PacketSpliced(splice) = &mut self.stage else {
            return;
        };
        let Some(report) = report else {
            return self.close("the packet splice's flows are gone".into(), false, out);
        };
        splice.translated = report.bytes;
        if report.closed_ns != 0 {
            let retire_at = retire_at(report.closed_ns, splice.linger_ns, self.draining);
            if now_ns >= retire_at {
                let reason = if report.reset {
                    "reset (packet path)"
                } else {
                    "both ends closed (packet path)"
                };
                return self.close(reason.into(), false, out);
            }
            out.push_back(Action::ArmDeadline(retire_at));
            return;
        }
        let idle_at = report
            .last_ns
            .max(splice.since_ns)
            .saturating_add(splice.idle_ns);
        if now_ns >= idle_at {
            services.metrics.idle_timeouts.inc();
            return self.close("idle timeout (packet path)".into(), false, out);
        }
        out.push_back(Action::ArmDeadline(
            idle_at.min(now_ns.saturating_add(check_ns(splice.linger_ns))),
        ));
    }
}
