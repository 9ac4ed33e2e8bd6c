//! The connection lifecycle without sockets: each test plays the I/O layer's part (events in,
//! actions out) and checks what a user would see the effect of — what is sent, shut down and
//! closed, in which order, and why.

mod close;
mod exchange;
mod goodbye;
mod handover;
mod packet;
mod promote;
mod proxy_header;
mod relay;
mod splice;
mod upgrade;

use std::net::SocketAddr;

use super::*;
use crate::access::AccessRecord;
use crate::config::Config;
use crate::tunnel::frames::FrameTracker;

pub(super) const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
pub(super) const UPGRADED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// One second in ns.
pub(super) const SECOND: u64 = 1_000_000_000;
/// The test config's handshake timeout, idle timeout and relay buffer.
pub(super) const HANDSHAKE: u64 = 10 * SECOND;
pub(super) const IDLE: u64 = 60 * SECOND;
pub(super) const RELAY_BUFFER: usize = 64 * 1024;

pub(super) fn first_server() -> SocketAddr {
    "127.0.0.1:9001".parse().unwrap()
}

pub(super) fn second_server() -> SocketAddr {
    "127.0.0.1:9002".parse().unwrap()
}

fn services() -> Services {
    let text = "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]\nupstream = \"default\"\n\n\
                [upstream.default]\nservers = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n\
                fail_timeout = \"0s\"\n\n[limits]\nkernel_backlog = \"1MiB\"\n";
    Services::new(&Config::parse(text).expect("test config parses"), None)
}

/// The I/O layer's part, played by hand: a connection, the time, and what it asked for.
pub(super) struct Harness {
    pub conn: Connection,
    pub services: Services,
    pub now: u64,
    out: Actions,
}

impl Harness {
    /// A connection accepted at t = 1 s from 10.1.2.3 on a plain (or TLS) listener.
    pub fn accept(datapath: DataPath, tls: bool) -> Harness {
        let services = services();
        let mut out = Actions::new();
        let now = SECOND;
        let accepted = Accepted {
            peer: "10.1.2.3:5555".parse().unwrap(),
            local: "127.0.0.1:8080".parse().unwrap(),
            scheme: Scheme::Ws,
            tls,
            proxy_protocol: false,
        };
        let conn = Connection::accept(7, accepted, datapath, now, &services, &mut out);
        let mut harness = Harness {
            conn,
            services,
            now,
            out,
        };
        assert_eq!(
            harness.take(),
            vec![
                Action::ArmDeadline(now + HANDSHAKE),
                Action::Read(Side::Client)
            ]
        );
        harness
    }

    /// The actions asked for since the last call.
    pub fn take(&mut self) -> Vec<Action> {
        self.out.drain(..).collect()
    }

    /// Runs an event with the harness's services, time and action queue; returns the actions.
    pub fn event(
        &mut self,
        event: impl FnOnce(&mut Connection, u64, &Services, &mut Actions),
    ) -> Vec<Action> {
        event(&mut self.conn, self.now, &self.services, &mut self.out);
        self.take()
    }

    pub fn client_sends(&mut self, bytes: &[u8]) -> Vec<Action> {
        self.event(|c, now, s, out| c.on_data(Side::Client, bytes, now, s, out))
    }

    pub fn upstream_sends(&mut self, bytes: &[u8]) -> Vec<Action> {
        self.event(|c, now, s, out| c.on_data(Side::Upstream, bytes, now, s, out))
    }

    pub fn peeked(&mut self, bytes: &[u8]) -> Vec<Action> {
        self.event(|c, now, s, out| c.on_peeked(bytes, now, s, out))
    }

    pub fn read_end(&mut self, side: Side) -> Vec<Action> {
        self.event(|c, now, s, out| c.on_read_end(side, now, s, out))
    }

    pub fn connected(&mut self) -> Vec<Action> {
        self.event(|c, now, s, out| c.on_connected(false, now, s, out))
    }

    pub fn connect_failed(&mut self, failure: ConnectFailure) -> Vec<Action> {
        self.event(|c, now, s, out| c.on_connect_failed(failure, "refused", now, s, out))
    }

    pub fn sent(&mut self, side: Side) -> Vec<Action> {
        self.event(|c, now, s, out| c.on_sent(side, now, s, out))
    }

    pub fn deadline(&mut self, at: u64) -> Vec<Action> {
        self.now = at;
        self.event(|c, now, s, out| c.on_deadline(now, None, false, s, out))
    }

    /// Request read, connected, request sent: waiting for the response.
    pub fn upstream_asked(datapath: DataPath, tls: bool) -> Harness {
        let mut h = Harness::accept(datapath, tls);
        assert_eq!(
            h.client_sends(REQUEST),
            vec![Action::Connect(first_server())]
        );
        let actions = h.connected();
        assert!(
            matches!(&actions[..], [Action::Send(Side::Upstream, _)]),
            "{actions:?}"
        );
        h.sent(Side::Upstream);
        h
    }

    /// A userspace-relayed tunnel, 101 sent to the client and its send completed.
    pub fn relaying(tls: bool) -> Harness {
        Harness::relaying_on(DataPath::Relay, tls, IDLE)
    }

    /// [`Harness::relaying`] on `datapath`, whose first reminder comes `reminder_in` after the
    /// 101 (the idle timeout, or the moment a `Promote` tunnel becomes due).
    pub fn relaying_on(datapath: DataPath, tls: bool, reminder_in: u64) -> Harness {
        let mut h = Harness::upstream_asked(datapath, tls);
        let actions = h.upstream_sends(UPGRADED);
        assert_eq!(
            actions,
            vec![
                Action::ArmDeadline(h.now + reminder_in),
                Action::Send(Side::Client, UPGRADED.to_vec()),
                Action::Forward {
                    from: Side::Client,
                    budget: RELAY_BUFFER
                },
            ]
        );
        assert_eq!(
            h.sent(Side::Client),
            vec![Action::Forward {
                from: Side::Upstream,
                budget: RELAY_BUFFER
            }]
        );
        h
    }

    /// Kernel path: the client pipelined `early` behind its request, the upstream's 101 was
    /// peeked at; returns the harness and what the peek led to (the hand-off's first actions).
    pub fn upgraded_with_early(early: &[u8]) -> (Harness, Vec<Action>) {
        let mut h = Harness::accept(DataPath::Splice, false);
        let mut bytes = REQUEST.to_vec();
        bytes.extend_from_slice(early);
        h.client_sends(&bytes);
        h.connected();
        h.sent(Side::Upstream);
        let actions = h.peeked(UPGRADED);
        (h, actions)
    }

    /// A spliced tunnel at t = now.
    pub fn spliced() -> Harness {
        let mut h = Harness::upstream_asked(DataPath::Splice, false);
        assert_eq!(
            h.peeked(UPGRADED),
            vec![
                Action::ArmDeadline(h.now + IDLE),
                Action::DrainClient {
                    limit: MAX_UNREAD_BEFORE_SPLICE
                }
            ]
        );
        assert_eq!(
            h.event(|c, now, s, out| c.on_client_drained(&[], true, now, s, out)),
            vec![Action::Splice { bridged: false }]
        );
        let actions = h.event(|c, now, s, out| c.on_splice_result(Ok(()), now, s, out));
        assert_eq!(
            actions,
            vec![
                Action::ArmDeadline(h.now + IDLE),
                Action::WatchSpliced(Side::Client),
                Action::WatchSpliced(Side::Upstream),
            ]
        );
        h
    }

    /// The reason the connection is closing for.
    pub fn reason(&self) -> String {
        self.conn
            .ending()
            .map(|e| e.reason.clone())
            .unwrap_or_default()
    }

    /// Closes the books: the access line.
    pub fn finish(self) -> AccessRecord {
        let now = self.now;
        self.conn.finish(now, &self.services)
    }
}

/// The one close action, graceful or abortive, at the end of `actions`.
pub(super) fn closes(actions: &[Action], abortive: bool) -> bool {
    actions.last() == Some(&Action::Close { abortive })
}
