//! Binary upgrade, sans-IO: which tunnels can move to a successor process, what of a tunnel
//! moves (a small record; its two sockets go beside it), and the tunnel rebuilt from it.
//!
//! A tunnel moves only when the record says everything: a plain tunnel, open both ways, with
//! none of its bytes in userspace. A spliced one qualifies as soon as it is not leaving the
//! kernel path (the kernel moves its bytes whoever holds the sockets); a relayed one at a
//! quiet moment, when both directions wait for their source with nothing read and nothing
//! being written (the successor then waits for the same readiness). Everything else (TLS
//! tunnels, whose record layer holds keys and sequence numbers; requests; half-closed or
//! busy tunnels) stays and ends in the old process.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{Action, Actions, Connection, DataPath, RequestSummary, Side, Splice, Stage};
use crate::access::AccessRecord;
use crate::headers::Scheme;
use crate::services::Services;
use crate::tunnel::frames::FrameTracker;
use crate::tunnel::relay::{Direction, SourceRead};

/// The access-line reason of a tunnel that moved to a successor.
pub const HANDED_OVER: &str = "handed over to the successor";

/// What a successor needs to carry a tunnel on (its two sockets travel beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandedTunnel {
    /// The id its access lines carry, in every process that held it.
    pub log_id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The upstream server.
    pub upstream: Option<SocketAddr>,
    /// When it was accepted (CLOCK_MONOTONIC ns: the same clock in every process).
    pub started_ns: u64,
    /// The request, for the access line.
    pub host: String,
    /// The request target.
    pub path: String,
    /// The request method.
    pub method: String,
    /// What its route matched (Host, path prefix): the successor's route with the same
    /// match gives the idle timeout; with none, `idle_ns` stays.
    pub route: Option<(Option<String>, Option<String>)>,
    /// The idle timeout it had.
    pub idle_ns: u64,
    /// How its bytes move.
    pub path_state: HandedPath,
}

/// How a handed tunnel's bytes move, and where it stood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandedPath {
    /// The userspace relay, both directions waiting for their source.
    Relayed {
        /// Bytes relayed client → upstream so far.
        bytes_up: u64,
        /// Bytes relayed upstream → client so far.
        bytes_down: u64,
        /// When a byte last moved.
        last_activity_ns: u64,
        /// When it becomes due for the kernel path (`u64::MAX`: never).
        promote_at_ns: u64,
        /// Where each direction stands between frames (client → upstream, upstream →
        /// client): a quiet moment may fall inside a frame.
        frames: [FrameTracker; 2],
    },
    /// The kernel path.
    Spliced {
        /// When it entered the kernel path.
        since_ns: u64,
        /// A FIN was passed on to this side ([`Side::index`]).
        fin_passed: [bool; 2],
        /// Bytes relayed in userspace before a promotion, client → upstream.
        bytes_up: u64,
        /// The same, upstream → client.
        bytes_down: u64,
    },
}

impl Connection {
    /// Whether the tunnel can move to a successor now (see the module docs). `spliced_ok`:
    /// the successor adopted the kernel program's maps (else spliced tunnels stay).
    pub fn can_hand_over(&self, spliced_ok: bool) -> bool {
        if self.is_closing() || self.tls || self.scheme != Scheme::Ws {
            return false;
        }
        match &self.stage {
            Stage::Spliced(splice) => spliced_ok && !splice.is_leaving(),
            Stage::Relaying(relay) => {
                relay.status() == 101
                    && !relay.left_kernel()
                    && self.sending == [false; 2]
                    && [Side::Client, Side::Upstream]
                        .into_iter()
                        .all(|destination| {
                            let direction = relay.direction(destination);
                            direction.source_read() == SourceRead::Waiting && direction.is_quiet()
                        })
            }
            _ => false,
        }
    }

    /// The record a successor rebuilds the tunnel from; `None` unless
    /// [`Connection::can_hand_over`] said so.
    pub fn hand_over(&self, services: &Services) -> Option<HandedTunnel> {
        let path_state = match &self.stage {
            Stage::Spliced(splice) => HandedPath::Spliced {
                since_ns: splice.since_ns(),
                fin_passed: splice.fin_passed(),
                bytes_up: splice.bytes_up(),
                bytes_down: splice.bytes_down(),
            },
            Stage::Relaying(relay) => HandedPath::Relayed {
                bytes_up: relay.bytes_up(),
                bytes_down: relay.bytes_down(),
                last_activity_ns: relay.last_activity_ns(),
                promote_at_ns: relay.promote_at_ns(),
                frames: [
                    relay.direction(Side::Upstream).frames,
                    relay.direction(Side::Client).frames,
                ],
            },
            _ => return None,
        };
        let idle_ns = match &self.stage {
            Stage::Spliced(splice) => splice.idle_ns(),
            Stage::Relaying(relay) => relay.idle_ns(),
            _ => return None,
        };
        let route = self
            .summary
            .route
            .and_then(|route| services.routes.get(route))
            .map(|route| route.matches.clone());
        Some(HandedTunnel {
            log_id: self.log_id,
            client: self.client_addr,
            upstream: self.upstream_addr,
            started_ns: self.started_ns,
            host: self.summary.host().to_owned(),
            path: self.summary.path().to_owned(),
            method: self.summary.method().to_owned(),
            route,
            idle_ns,
            path_state,
        })
    }

    /// The tunnel left for the successor: its access line in this process (the gauges count
    /// it out here; the successor counts it in).
    pub fn handed_over(mut self, now_ns: u64, services: &Services) -> AccessRecord {
        services.metrics.tunnels_handed_over.inc();
        self.ending = Some(Box::new(super::Ending {
            reason: HANDED_OVER.into(),
            abortive: false,
        }));
        self.finish(now_ns, services)
    }

    /// A tunnel a predecessor handed over, as connection `id` of this process. The actions
    /// arm its deadline and wait on both sockets as the predecessor did.
    pub fn adopt(
        id: u64,
        tunnel: &HandedTunnel,
        datapath: DataPath,
        services: &Services,
        out: &mut Actions,
    ) -> Connection {
        let metrics = &services.metrics;
        metrics.tunnels_adopted.inc();
        metrics.connections_open.inc();
        metrics.tunnels_open.inc();
        let route = tunnel.route.as_ref().and_then(|matches| {
            services
                .routes
                .iter()
                .position(|route| &route.matches == matches)
        });
        let idle_ns = route
            .and_then(|route| services.routes.get(route))
            .map_or(tunnel.idle_ns, |route| route.idle_ns);
        let stage = match tunnel.path_state {
            HandedPath::Spliced {
                since_ns,
                fin_passed,
                bytes_up,
                bytes_down,
            } => {
                metrics.tunnels_spliced_open.inc();
                out.push_back(Action::ArmDeadline(since_ns.saturating_add(idle_ns)));
                for side in [Side::Client, Side::Upstream] {
                    out.push_back(Action::WatchSpliced(side));
                }
                Stage::Spliced(Splice::adopted(
                    since_ns, idle_ns, fin_passed, bytes_up, bytes_down,
                ))
            }
            HandedPath::Relayed {
                bytes_up,
                bytes_down,
                last_activity_ns,
                promote_at_ns,
                frames: [up_frames, down_frames],
            } => {
                let waiting = |bytes, frames| {
                    let mut direction = Direction::unbounded();
                    direction.bytes = bytes;
                    direction.frames = frames;
                    direction.on_read_done(true, true);
                    direction
                };
                let promote_at_ns = if datapath == DataPath::Promote {
                    promote_at_ns
                } else {
                    u64::MAX
                };
                let relay = super::Relay::adopted(
                    waiting(bytes_up, up_frames),
                    waiting(bytes_down, down_frames),
                    last_activity_ns,
                    idle_ns,
                    promote_at_ns,
                );
                out.push_back(Action::ArmDeadline(relay.reminder(last_activity_ns)));
                for side in [Side::Client, Side::Upstream] {
                    out.push_back(Action::AwaitReadable(side));
                }
                Stage::Relaying(Box::new(relay))
            }
        };
        let mut connection =
            Connection::new(id, tunnel.log_id, tunnel.client, tunnel.started_ns, stage);
        connection.datapath = datapath;
        connection.summary = RequestSummary::new(&tunnel.host, &tunnel.path, &tunnel.method);
        connection.summary.route = route;
        connection.upstream_addr = tunnel.upstream;
        // It counts on its server here from now on (the predecessor's count ended with it).
        connection.lease = route
            .and_then(|route| services.routes.get(route))
            .zip(tunnel.upstream)
            .and_then(|(route, addr)| services.pools[route.pool].lease_open(addr));
        connection
    }
}
