//! The life of one client connection before its tunnel exists, as a sans-IO state machine.
//!
//! [`Handshake`] takes events (bytes read, connect results, deadlines) and answers with the next
//! [`Action`] for the I/O layer to carry out. It never touches a socket, so every path (each
//! rejection, retries over the pool, refusals, pipelined bytes) is unit-tested without one.
//!
//! Phases (DESIGN.md §3): read request head → route → connect (next server on failure) → send the
//! rewritten request → read the response head → tunnel, refusal relay, or error answer.

use std::net::SocketAddr;

use crate::handshake::{
    error_response, parse_request, parse_response, BodyLength, UpgradeRequest, UpstreamAnswer,
};
use crate::headers::{rewrite_request, ForwardContext, HeaderRules, Scheme};
use crate::services::Services;

/// What the I/O layer must do next for this connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Wait for more bytes from the client, then call [`Handshake::on_client_data`].
    ReadClient,
    /// Open a TCP connection to this upstream server (bounded by the connect timeout), then call
    /// [`Handshake::on_connected`] or [`Handshake::on_connect_failed`].
    Connect(SocketAddr),
    /// Send these bytes (the rewritten request) to the upstream, then call
    /// [`Handshake::on_request_sent`].
    SendRequest(Vec<u8>),
    /// Wait for more bytes from the upstream, then call [`Handshake::on_upstream_data`].
    ReadUpstream,
    /// Answer the client with `response` (an HTTP error), then close.
    Reject(Rejection),
    /// The upgrade succeeded: deliver these bytes first, in this order per direction, then move
    /// bytes both ways until a side closes.
    Tunnel {
        /// The upstream's 101 head and whatever it sent behind it.
        to_client: Vec<u8>,
        /// What the client pipelined behind its request head.
        to_upstream: Vec<u8>,
    },
    /// The upstream answered with a final non-101 status: relay its answer, then close.
    Refused {
        /// The status the upstream answered with.
        status: u16,
        /// The answer's bytes read so far (head and the part of the body already here).
        to_client: Vec<u8>,
        /// How much more of the upstream's body to relay after `to_client`.
        remaining: BodyLength,
    },
    /// Close without an answer (the client went away or never sent a request).
    Close(String),
}

/// An HTTP error answer to send before closing, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status of the answer.
    pub status: u16,
    /// The complete answer.
    pub response: Vec<u8>,
    /// The reason, for the log.
    pub reason: String,
}

/// Why a connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Refused, unreachable or another error.
    Error,
    /// No answer within the connect timeout.
    TimedOut,
    /// The proxy itself could not open a socket (out of descriptors or memory): not the
    /// upstream's fault, so no server is marked down and no other is tried.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ReadRequest,
    Connect,
    SendRequest,
    ReadResponse,
    Done,
}

/// What the request was, for routing decisions and the access log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestSummary {
    /// Host header as sent.
    pub host: String,
    /// Request target as sent.
    pub path: String,
    /// Index of the chosen route.
    pub route: Option<usize>,
}

/// The handshake state machine of one client connection.
#[derive(Debug)]
pub struct Handshake {
    phase: Phase,
    context: ForwardContext,
    /// Client bytes: the request head while it is read, then the pipelined bytes behind it.
    client_bytes: Vec<u8>,
    /// Upstream bytes read while waiting for its response head.
    upstream_bytes: Vec<u8>,
    request: Option<UpgradeRequest>,
    summary: RequestSummary,
    /// Servers still to try, in order; `current` is being tried.
    plan: std::vec::IntoIter<SocketAddr>,
    current: Option<SocketAddr>,
    pool: usize,
    rules: HeaderRules,
}

impl Handshake {
    /// A new connection from `client_addr` on a listener of `scheme`.
    pub fn new(client_addr: SocketAddr, scheme: Scheme) -> Handshake {
        Handshake {
            phase: Phase::ReadRequest,
            context: ForwardContext {
                client_addr: client_addr.ip(),
                scheme,
            },
            client_bytes: Vec::new(),
            upstream_bytes: Vec::new(),
            request: None,
            summary: RequestSummary::default(),
            plan: Vec::new().into_iter(),
            current: None,
            pool: 0,
            rules: HeaderRules::default(),
        }
    }

    /// The first action of a new connection.
    pub fn start(&self) -> Action {
        Action::ReadClient
    }

    /// The request as far as it is known, for logs.
    pub fn summary(&self) -> &RequestSummary {
        &self.summary
    }

    /// The upstream server being tried or used.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.current
    }

    /// The route's pool index, once routed.
    pub fn pool(&self) -> Option<usize> {
        self.summary.route.map(|_| self.pool)
    }

    /// Bytes read from the client.
    pub fn on_client_data(&mut self, data: &[u8], services: &Services, now_ns: u64) -> Action {
        if self.phase != Phase::ReadRequest {
            // The I/O layer only reads the client while the request head is incomplete.
            return self.fail_internal("client bytes outside the request phase");
        }
        self.client_bytes.extend_from_slice(data);
        match parse_request(&self.client_bytes, &services.request_limits) {
            Ok(None) => Action::ReadClient,
            Ok(Some((request, head_len))) => {
                self.client_bytes.drain(..head_len);
                self.route(request, services, now_ns)
            }
            Err(error) => self.reject_with(error.status(), error.response(), error.to_string()),
        }
    }

    /// The client closed (or reset) before its request head was complete.
    pub fn on_client_eof(&mut self) -> Action {
        self.phase = Phase::Done;
        if self.client_bytes.is_empty() {
            Action::Close("client closed before sending a request".into())
        } else {
            Action::Close("client closed in the middle of its request head".into())
        }
    }

    /// The connect attempt to [`Handshake::upstream`] succeeded.
    pub fn on_connected(&mut self) -> Action {
        let Some(request) = self.request.as_ref() else {
            return self.fail_internal("connected without a request");
        };
        self.phase = Phase::SendRequest;
        Action::SendRequest(rewrite_request(request, &self.context, &self.rules))
    }

    /// The connect attempt failed: try the next server of the plan, or answer 502/504.
    pub fn on_connect_failed(
        &mut self,
        failure: ConnectFailure,
        services: &Services,
        now_ns: u64,
    ) -> Action {
        if failure == ConnectFailure::Local {
            return self.reject(
                503,
                "cannot open an upstream socket: the proxy is out of descriptors or memory".into(),
            );
        }
        if let Some(addr) = self.current {
            services.pools[self.pool].report_failure(addr, now_ns);
        }
        match self.plan.next() {
            Some(next) => {
                self.current = Some(next);
                Action::Connect(next)
            }
            None => {
                let upstream = self.current.map(|a| a.to_string()).unwrap_or_default();
                match failure {
                    ConnectFailure::TimedOut => self.reject(
                        504,
                        format!(
                            "connect to upstream {upstream} timed out (last server of the pool)"
                        ),
                    ),
                    ConnectFailure::Error | ConnectFailure::Local => self.reject(
                        502,
                        format!("connect to upstream {upstream} failed (last server of the pool)"),
                    ),
                }
            }
        }
    }

    /// The rewritten request is fully written to the upstream.
    pub fn on_request_sent(&mut self) -> Action {
        self.phase = Phase::ReadResponse;
        Action::ReadUpstream
    }

    /// Bytes read from the upstream while waiting for its response head.
    pub fn on_upstream_data(&mut self, data: &[u8], services: &Services) -> Action {
        if self.phase != Phase::ReadResponse {
            return self.fail_internal("upstream bytes outside the response phase");
        }
        self.upstream_bytes.extend_from_slice(data);
        self.judge_response(services)
    }

    /// Everything the upstream has sent so far, read with `MSG_PEEK` (the kernel path leaves the
    /// response in the socket so the splice delivers it verbatim, DESIGN.md §4 step 3).
    /// `ReadUpstream` then means: wait until more than `peeked.len()` bytes are queued.
    pub fn on_upstream_peek(&mut self, peeked: &[u8], services: &Services) -> Action {
        if self.phase != Phase::ReadResponse {
            return self.fail_internal("upstream bytes outside the response phase");
        }
        self.upstream_bytes.clear();
        self.upstream_bytes.extend_from_slice(peeked);
        self.judge_response(services)
    }

    fn judge_response(&mut self, services: &Services) -> Action {
        let Some(key) = self.request.as_ref().map(|r| r.key.as_str()) else {
            return self.fail_internal("response without a request");
        };
        match parse_response(&self.upstream_bytes, key, &services.response_limits) {
            Ok(None) => Action::ReadUpstream,
            Ok(Some(UpstreamAnswer::Upgraded { .. })) => {
                self.phase = Phase::Done;
                Action::Tunnel {
                    to_client: std::mem::take(&mut self.upstream_bytes),
                    to_upstream: std::mem::take(&mut self.client_bytes),
                }
            }
            Ok(Some(UpstreamAnswer::Refused {
                status,
                head_len,
                body,
            })) => {
                self.phase = Phase::Done;
                let mut to_client = std::mem::take(&mut self.upstream_bytes);
                let remaining = match body {
                    BodyLength::Known(length) => {
                        let here = (to_client.len() - head_len).min(length);
                        to_client.truncate(head_len + here);
                        BodyLength::Known(length - here)
                    }
                    BodyLength::UntilClose => BodyLength::UntilClose,
                };
                Action::Refused {
                    status,
                    to_client,
                    remaining,
                }
            }
            Err(error) => {
                let upstream = self.current.map(|a| a.to_string()).unwrap_or_default();
                self.reject(502, format!("bad answer from upstream {upstream}: {error}"))
            }
        }
    }

    /// The upstream closed before its response head was complete.
    pub fn on_upstream_eof(&mut self) -> Action {
        let upstream = self.current.map(|a| a.to_string()).unwrap_or_default();
        self.reject(
            502,
            format!("upstream {upstream} closed the connection before answering"),
        )
    }

    /// The handshake deadline passed.
    pub fn on_deadline(&mut self) -> Action {
        match self.phase {
            Phase::ReadRequest => {
                self.phase = Phase::Done;
                Action::Close("no complete request head within the handshake timeout".into())
            }
            Phase::Connect | Phase::SendRequest | Phase::ReadResponse => {
                let upstream = self.current.map(|a| a.to_string()).unwrap_or_default();
                self.reject(
                    504,
                    format!("upstream {upstream} did not answer within the handshake timeout"),
                )
            }
            Phase::Done => Action::Close("handshake timeout".into()),
        }
    }

    fn route(&mut self, request: UpgradeRequest, services: &Services, now_ns: u64) -> Action {
        self.summary.host = request.host.clone();
        self.summary.path = request.path.clone();
        let Some(route_index) = services.router.select(&request.host, &request.path) else {
            let reason = format!(
                "no route for host {:?} path {:?}",
                request.host, request.path
            );
            return self.reject(404, reason);
        };
        self.summary.route = Some(route_index);
        let route = &services.routes[route_index];
        self.pool = route.pool;
        self.rules = route.rules.clone();
        self.request = Some(request);
        match services.pools[route.pool].plan(now_ns) {
            Ok(plan) => {
                let mut plan = plan.into_iter();
                self.current = plan.next();
                self.plan = plan;
                self.phase = Phase::Connect;
                match self.current {
                    Some(first) => Action::Connect(first),
                    None => self.reject(503, "upstream pool has no servers".into()),
                }
            }
            Err(error) => self.reject(503, error.to_string()),
        }
    }

    fn reject(&mut self, status: u16, reason: String) -> Action {
        let body = status_body(status);
        self.reject_with(status, error_response(status, body), reason)
    }

    fn reject_with(&mut self, status: u16, response: Vec<u8>, reason: String) -> Action {
        self.phase = Phase::Done;
        Action::Reject(Rejection {
            status,
            response,
            reason,
        })
    }

    fn fail_internal(&mut self, what: &str) -> Action {
        self.reject(500, format!("internal error: {what}"))
    }
}

/// The short text body of an error answer (the reason goes to the log, not to the client).
fn status_body(status: u16) -> &'static str {
    match status {
        404 => "no route for this host and path\n",
        500 => "internal proxy error\n",
        502 => "upstream unavailable\n",
        503 => "no healthy upstream\n",
        504 => "upstream timed out\n",
        _ => "request rejected\n",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    const UPGRADED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    fn services(servers: &str, extra: &str) -> Services {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]\nupstream = \"default\"\n{extra}\n\n\
             [upstream.default]\nservers = [{servers}]\n"
        );
        Services::new(&Config::parse(&text).expect("test config parses"), None)
    }

    fn client() -> SocketAddr {
        "10.1.2.3:5555".parse().unwrap()
    }

    fn connected(services: &Services) -> Handshake {
        let mut h = Handshake::new(client(), Scheme::Ws);
        assert!(matches!(
            h.on_client_data(REQUEST, services, 0),
            Action::Connect(_)
        ));
        assert!(matches!(h.on_connected(), Action::SendRequest(_)));
        assert_eq!(h.on_request_sent(), Action::ReadUpstream);
        h
    }

    #[test]
    fn a_valid_upgrade_goes_connect_send_read_then_tunnel_with_pipelined_bytes_in_order() {
        let services = services("\"127.0.0.1:9001\"", "");
        let mut h = Handshake::new(client(), Scheme::Ws);
        assert_eq!(h.start(), Action::ReadClient);
        // The request arrives in two pieces, with a frame pipelined behind the head.
        let mut bytes = REQUEST.to_vec();
        bytes.extend_from_slice(b"\x81\x02hi");
        let (first, second) = bytes.split_at(20);
        assert_eq!(h.on_client_data(first, &services, 0), Action::ReadClient);
        assert_eq!(
            h.on_client_data(second, &services, 0),
            Action::Connect("127.0.0.1:9001".parse().unwrap())
        );
        let Action::SendRequest(request) = h.on_connected() else {
            panic!("expected the rewritten request");
        };
        let request = String::from_utf8(request).unwrap();
        assert!(request.starts_with("GET /chat HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("X-Forwarded-For: 10.1.2.3\r\n"),
            "{request}"
        );
        assert!(
            !request.contains("hi"),
            "pipelined bytes must wait for the 101"
        );
        assert_eq!(h.on_request_sent(), Action::ReadUpstream);
        // The 101 arrives split, with a frame right behind it.
        assert_eq!(
            h.on_upstream_data(&UPGRADED[..30], &services),
            Action::ReadUpstream
        );
        let mut rest = UPGRADED[30..].to_vec();
        rest.extend_from_slice(b"\x81\x03abc");
        let mut to_client_expected = UPGRADED.to_vec();
        to_client_expected.extend_from_slice(b"\x81\x03abc");
        assert_eq!(
            h.on_upstream_data(&rest, &services),
            Action::Tunnel {
                to_client: to_client_expected,
                to_upstream: b"\x81\x02hi".to_vec(),
            }
        );
        assert_eq!(h.summary().host, "example.com");
        assert_eq!(h.summary().path, "/chat");
    }

    #[test]
    fn an_invalid_request_is_rejected_with_its_status() {
        let services = services("\"127.0.0.1:9001\"", "");
        let mut h = Handshake::new(client(), Scheme::Ws);
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let Action::Reject(rejection) = h.on_client_data(request, &services, 0) else {
            panic!("expected a rejection");
        };
        assert_eq!(rejection.status, 426);
        assert!(rejection.response.starts_with(b"HTTP/1.1 426 "));
    }

    #[test]
    fn no_matching_route_is_404() {
        let services = services("\"127.0.0.1:9001\"", "path_prefix = \"/other\"");
        let mut h = Handshake::new(client(), Scheme::Ws);
        let Action::Reject(rejection) = h.on_client_data(REQUEST, &services, 0) else {
            panic!("expected a rejection");
        };
        assert_eq!(rejection.status, 404);
    }

    #[test]
    fn a_failed_connect_tries_the_next_server_then_answers_502() {
        let services = services("\"127.0.0.1:1\", \"127.0.0.1:2\"", "");
        let mut h = Handshake::new(client(), Scheme::Ws);
        let Action::Connect(first) = h.on_client_data(REQUEST, &services, 0) else {
            panic!("expected a connect");
        };
        let Action::Connect(second) = h.on_connect_failed(ConnectFailure::Error, &services, 0)
        else {
            panic!("expected the next server");
        };
        assert_ne!(first, second);
        let Action::Reject(rejection) = h.on_connect_failed(ConnectFailure::Error, &services, 0)
        else {
            panic!("expected 502");
        };
        assert_eq!(rejection.status, 502);
        // Both servers are now marked down: the next request is answered 503 at once.
        let mut next = Handshake::new(client(), Scheme::Ws);
        let Action::Reject(rejection) = next.on_client_data(REQUEST, &services, 1) else {
            panic!("expected 503");
        };
        assert_eq!(rejection.status, 503);
    }

    #[test]
    fn running_out_of_local_sockets_is_503_and_marks_no_server_down() {
        let services = services("\"127.0.0.1:1\", \"127.0.0.1:2\"", "");
        let mut h = Handshake::new(client(), Scheme::Ws);
        h.on_client_data(REQUEST, &services, 0);
        let Action::Reject(rejection) = h.on_connect_failed(ConnectFailure::Local, &services, 0)
        else {
            panic!("expected 503");
        };
        assert_eq!(rejection.status, 503);
        assert_eq!(services.pools[0].plan(1).unwrap().len(), 2);
    }

    #[test]
    fn a_connect_timeout_on_the_last_server_is_504() {
        let services = services("\"127.0.0.1:1\"", "");
        let mut h = Handshake::new(client(), Scheme::Ws);
        h.on_client_data(REQUEST, &services, 0);
        let Action::Reject(rejection) = h.on_connect_failed(ConnectFailure::TimedOut, &services, 0)
        else {
            panic!("expected 504");
        };
        assert_eq!(rejection.status, 504);
    }

    #[test]
    fn a_refusal_is_relayed_with_the_rest_of_its_body_still_to_come() {
        let services = services("\"127.0.0.1:9001\"", "");
        let mut h = connected(&services);
        let answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nnope";
        assert_eq!(
            h.on_upstream_data(answer, &services),
            Action::Refused {
                status: 403,
                to_client: answer.to_vec(),
                remaining: BodyLength::Known(6),
            }
        );
    }

    #[test]
    fn a_broken_101_is_502_and_an_early_close_is_502() {
        let services = services("\"127.0.0.1:9001\"", "");
        let mut h = connected(&services);
        let bad =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n";
        let Action::Reject(rejection) = h.on_upstream_data(bad, &services) else {
            panic!("expected 502");
        };
        assert_eq!(rejection.status, 502);

        let mut h = connected(&services);
        let Action::Reject(rejection) = h.on_upstream_eof() else {
            panic!("expected 502");
        };
        assert_eq!(rejection.status, 502);
    }

    #[test]
    fn the_deadline_closes_a_silent_client_and_answers_504_while_waiting_for_the_upstream() {
        let services = services("\"127.0.0.1:9001\"", "");
        let mut silent = Handshake::new(client(), Scheme::Ws);
        assert!(matches!(silent.on_deadline(), Action::Close(_)));
        let mut waiting = connected(&services);
        let Action::Reject(rejection) = waiting.on_deadline() else {
            panic!("expected 504");
        };
        assert_eq!(rejection.status, 504);
    }
}
