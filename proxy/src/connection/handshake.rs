//! The upgrade handshake of one client connection, before its tunnel exists: the first phase of
//! the [`Connection`](super::Connection) lifecycle.
//!
//! [`Handshake`] takes events (bytes read, connect results, deadlines) and answers with the next
//! [`Step`] for its connection to carry out. It never touches a socket, so every path (each
//! rejection, retries over the pool, refusals, pipelined bytes) is unit-tested without one.
//!
//! Steps: read the request head → route → connect (next server on failure) → send the rewritten
//! request → read the response head → tunnel, refusal relay, or error answer. A plain HTTP
//! request leaves it once connected: the exchange (`exchange.rs`) sends it and relays the
//! answer.

use std::net::{IpAddr, SocketAddr};

use crate::config::HashKey;
use crate::handshake::{
    error_response, parse_request, parse_response, BodyLength, PlainRequest, Request, RequestError,
    UpstreamAnswer,
};
use crate::headers::{rewrite_plain_request, rewrite_request, ForwardContext, HeaderRules, Scheme};
use crate::http::Framing;
use crate::proxy_protocol::Addresses;
use crate::services::Services;
use crate::upstream::Lease;

/// What the I/O layer must do next for this connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
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
        /// How much of `to_client` is the head (the frames follow it).
        head_len: usize,
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
    /// A plain request, connected: send `head` and relay the request's body and the answer.
    Exchange(Box<ExchangeStart>),
}

/// What a plain request's exchange starts from.
#[derive(Debug, PartialEq, Eq)]
pub struct ExchangeStart {
    /// The request as parsed.
    pub request: PlainRequest,
    /// The rewritten head for the upstream.
    pub head: Vec<u8>,
    /// What the client sent behind its head so far (the body's start, perhaps the next
    /// request).
    pub behind: Vec<u8>,
    /// The upstream connection was kept alive from an earlier request (it may have been
    /// closed by the server meanwhile).
    pub reused: bool,
    /// The address the client connected to (for the connection's next request).
    pub local: SocketAddr,
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

/// What the request was, for routing decisions and the access log.
///
/// Every connection keeps one for its whole life (a tunnel's access line is written when it
/// ends), so the three texts share one exact-size allocation rather than three `String`s
/// (each with its own capacity and allocator overhead).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestSummary {
    /// Host, path and method, one after the other.
    text: Box<str>,
    /// Where the host ends (and the path starts) in `text`. `u32`: both come from a request
    /// head, at most 1 MiB (`limits.max_request_head`).
    host_end: u32,
    /// Where the path ends (and the method starts) in `text`.
    path_end: u32,
    /// Index of the chosen route.
    pub route: Option<usize>,
}

impl RequestSummary {
    /// A request with this host header, target and method (not routed yet).
    pub fn new(host: &str, path: &str, method: &str) -> RequestSummary {
        let ends = u32::try_from(host.len())
            .ok()
            .zip(u32::try_from(host.len() + path.len()).ok());
        let Some((host_end, path_end)) = ends else {
            // Not from a request head (see `host_end`): logged without host and path rather
            // than with offsets that do not fit.
            return RequestSummary::new("", "", method);
        };
        RequestSummary {
            text: [host, path, method].concat().into_boxed_str(),
            host_end,
            path_end,
            route: None,
        }
    }

    /// Host header as sent.
    pub fn host(&self) -> &str {
        &self.text[..self.host_end as usize]
    }

    /// Request target as sent.
    pub fn path(&self) -> &str {
        &self.text[self.host_end as usize..self.path_end as usize]
    }

    /// The request's method.
    pub fn method(&self) -> &str {
        &self.text[self.path_end as usize..]
    }
}

/// The handshake state machine of one client connection.
#[derive(Debug)]
pub struct Handshake {
    context: ForwardContext,
    /// Client bytes: the request head while it is read, then the pipelined bytes behind it.
    client_bytes: Vec<u8>,
    /// Times the request head was parsed (tests check that a trickled head is not re-parsed
    /// for every byte).
    #[cfg(test)]
    pub(crate) parses: usize,
    /// Upstream bytes read while waiting for its response head.
    upstream_bytes: Vec<u8>,
    request: Option<Request>,
    summary: RequestSummary,
    /// Servers still to try, in order; `current` is being tried.
    plan: std::vec::IntoIter<SocketAddr>,
    current: Option<SocketAddr>,
    /// `current`'s count of this connection (its pool's balancing and `max_tunnels`).
    lease: Option<Lease>,
    pool: usize,
    rules: HeaderRules,
    /// Where the client connected from and to (the PROXY header's addresses behind a load
    /// balancer).
    addresses: Addresses,
    /// The pool's upstream connections begin with a PROXY v2 header.
    send_proxy_header: bool,
    /// Kernel path: bytes of the current upstream's response seen by peeking (here rather than
    /// in the connection: it matters only until the response head is known).
    pub(super) peeked: usize,
}

impl Handshake {
    /// A new connection between `addresses` (`source`: the client) on a listener of `scheme`;
    /// `trusted_peer` when the client is one of `trusted_proxies`.
    pub fn new(addresses: Addresses, scheme: Scheme, trusted_peer: bool) -> Handshake {
        Handshake {
            context: ForwardContext {
                client_addr: addresses.source.ip(),
                scheme,
                trusted_peer,
            },
            client_bytes: Vec::new(),
            #[cfg(test)]
            parses: 0,
            upstream_bytes: Vec::new(),
            request: None,
            summary: RequestSummary::default(),
            plan: Vec::new().into_iter(),
            current: None,
            lease: None,
            pool: 0,
            rules: HeaderRules::default(),
            addresses,
            send_proxy_header: false,
            peeked: 0,
        }
    }

    /// Takes the count of this connection on its server (the handshake is over; the
    /// connection holds it while it uses the server).
    pub fn take_lease(&mut self) -> Option<Lease> {
        self.lease.take()
    }

    /// The first action of a new connection.
    pub fn start(&self) -> Step {
        Step::ReadClient
    }

    /// The request as far as it is known, for logs.
    pub fn summary(&self) -> &RequestSummary {
        &self.summary
    }

    /// Takes the summary (the handshake is over).
    pub fn take_summary(&mut self) -> RequestSummary {
        std::mem::take(&mut self.summary)
    }

    /// The upstream server being tried or used.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.current
    }

    /// The route's pool index, once routed.
    pub fn pool(&self) -> Option<usize> {
        self.summary.route.map(|_| self.pool)
    }

    /// True for a plain request (its exchange may use a kept-alive upstream connection).
    pub fn is_plain(&self) -> bool {
        matches!(self.request, Some(Request::Plain(_)))
    }

    /// Bytes read from the client while its request head is incomplete.
    pub fn on_client_data(&mut self, data: &[u8], services: &Services, now_ns: u64) -> Step {
        self.client_bytes.extend_from_slice(data);
        // Parsing is worth it only when a line was completed (the head may be complete, or a
        // line may be malformed) or the head reached its size limit: a head trickled byte by
        // byte is then parsed once per line, not once per byte.
        let limit = services.request_limits.max_bytes;
        if !data.contains(&b'\n') && self.client_bytes.len() < limit {
            return Step::ReadClient;
        }
        #[cfg(test)]
        {
            self.parses += 1;
        }
        match parse_request(&self.client_bytes, &services.request_limits) {
            Ok(None) => Step::ReadClient,
            Ok(Some((request, head_len))) => {
                self.client_bytes.drain(..head_len);
                self.route(request, services, now_ns)
            }
            Err(error) => self.reject_with(error.status(), error.response(), error.to_string()),
        }
    }

    /// The client closed (or reset) before its request head was complete.
    pub fn on_client_eof(&mut self) -> Step {
        if self.client_bytes.is_empty() {
            Step::Close("client closed before sending a request".into())
        } else {
            Step::Close("client closed in the middle of its request head".into())
        }
    }

    /// The connect attempt to [`Handshake::upstream`] succeeded (`reused`: a kept-alive
    /// connection was taken instead).
    pub fn on_connected(&mut self, reused: bool) -> Step {
        match self.request.take() {
            None => self.fail_internal("connected without a request"),
            Some(Request::Upgrade(request)) => {
                let head = rewrite_request(&request, &self.context, &self.rules);
                self.request = Some(Request::Upgrade(request));
                Step::SendRequest(self.proxy_header_before(head, false))
            }
            Some(Request::Plain(request)) => {
                let head = rewrite_plain_request(&request, &self.context, &self.rules);
                let head = self.proxy_header_before(head, reused);
                Step::Exchange(Box::new(ExchangeStart {
                    request,
                    head,
                    behind: std::mem::take(&mut self.client_bytes),
                    reused,
                    local: self.addresses.destination,
                }))
            }
        }
    }

    /// `head` for a new upstream connection of a `send_proxy_protocol` pool: a PROXY v2
    /// header with the client's addresses first. A kept-alive connection (`reused`) had its
    /// header already (such pools keep none alive, but the rule holds either way).
    fn proxy_header_before(&self, head: Vec<u8>, reused: bool) -> Vec<u8> {
        if !self.send_proxy_header || reused {
            return head;
        }
        let mut bytes = crate::proxy_protocol::encode_v2(Some(&self.addresses));
        bytes.extend_from_slice(&head);
        bytes
    }

    /// The connect attempt failed: try the next server of the plan, or answer 502/504.
    pub fn on_connect_failed(
        &mut self,
        failure: ConnectFailure,
        services: &Services,
        now_ns: u64,
    ) -> Step {
        if failure == ConnectFailure::Local {
            return self.reject(
                503,
                "cannot open an upstream socket: the proxy is out of descriptors or memory".into(),
            );
        }
        if let Some(addr) = self.current {
            services.pools[self.pool].report_failure(addr, now_ns);
        }
        match self.next_server(services) {
            Some(next) => Step::Connect(next),
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
    pub fn on_request_sent(&mut self) -> Step {
        Step::ReadUpstream
    }

    /// Bytes read from the upstream while waiting for its response head.
    pub fn on_upstream_data(&mut self, data: &[u8], services: &Services) -> Step {
        self.upstream_bytes.extend_from_slice(data);
        self.judge_response(services)
    }

    /// Everything the upstream has sent so far, read with `MSG_PEEK` (the kernel path leaves the
    /// response in the socket so the splice delivers it verbatim: hand-off step 1).
    /// `ReadUpstream` then means: wait until more than `peeked.len()` bytes are queued.
    pub fn on_upstream_peek(&mut self, peeked: &[u8], services: &Services) -> Step {
        self.upstream_bytes.clear();
        self.upstream_bytes.extend_from_slice(peeked);
        self.judge_response(services)
    }

    fn judge_response(&mut self, services: &Services) -> Step {
        let Some(Request::Upgrade(request)) = self.request.as_ref() else {
            return self.fail_internal("response without an upgrade request");
        };
        let key = request.key.as_str();
        match parse_response(&self.upstream_bytes, key, &services.response_limits) {
            Ok(None) => Step::ReadUpstream,
            Ok(Some(UpstreamAnswer::Upgraded { head_len })) => Step::Tunnel {
                to_client: std::mem::take(&mut self.upstream_bytes),
                head_len,
                to_upstream: std::mem::take(&mut self.client_bytes),
            },
            Ok(Some(UpstreamAnswer::Refused {
                status,
                head_len,
                body,
            })) => {
                let mut to_client = std::mem::take(&mut self.upstream_bytes);
                let remaining = match body {
                    BodyLength::Known(length) => {
                        let here = (to_client.len() - head_len).min(length);
                        to_client.truncate(head_len + here);
                        BodyLength::Known(length - here)
                    }
                    BodyLength::UntilClose => BodyLength::UntilClose,
                };
                Step::Refused {
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

    /// The upstream closed (or reset) before its response head was complete.
    ///
    /// Before the first byte of an answer, the next server of the plan gets the request: the
    /// Upgrade is a GET, safe to send again, and a server that dies between accepting and
    /// answering (killed, or its listener closed in a restart) should not cost the client an
    /// error while others are up (nginx's `proxy_next_upstream error` does the same). Once an
    /// answer has begun, it is 502.
    pub fn on_upstream_eof(&mut self, services: &Services, now_ns: u64) -> Step {
        let upstream = self.current.map(|a| a.to_string()).unwrap_or_default();
        if self.upstream_bytes.is_empty() {
            if let Some(addr) = self.current {
                services.pools[self.pool].report_failure(addr, now_ns);
            }
            if let Some(next) = self.next_server(services) {
                tracing::info!(%upstream, "upstream closed before answering: trying the next server");
                return Step::Connect(next);
            }
        }
        self.reject(
            502,
            format!("upstream {upstream} closed the connection before answering"),
        )
    }

    /// The handshake deadline passed; `request_read` tells whether the request head was
    /// complete by then. A head begun and not finished is answered 408; a connection that
    /// sent nothing is closed without a word.
    pub fn on_deadline(&mut self, request_read: bool) -> Step {
        if !request_read && self.client_bytes.is_empty() {
            return Step::Close("no request within the timeout".into());
        }
        if !request_read {
            return self.reject(
                408,
                "no complete request head within the handshake timeout".into(),
            );
        }
        let upstream = self.current.map(|a| a.to_string()).unwrap_or_default();
        self.reject(
            504,
            format!("upstream {upstream} did not answer within the handshake timeout"),
        )
    }

    fn route(&mut self, request: Request, services: &Services, now_ns: u64) -> Step {
        let method = match &request {
            Request::Upgrade(_) => "GET",
            Request::Plain(plain) => plain.method.as_str(),
        };
        self.summary = RequestSummary::new(request.host(), request.path(), method);
        let Some(route_index) = services.router.select(request.host(), request.path()) else {
            let reason = format!(
                "no route for host {:?} path {:?}",
                request.host(),
                request.path()
            );
            return self.reject(404, reason);
        };
        self.summary.route = Some(route_index);
        let route = &services.routes[route_index];
        if route.websocket_only && matches!(request, Request::Plain(_)) {
            let error = RequestError::NotWebSocket;
            return self.reject_with(error.status(), error.response(), error.to_string());
        }
        if let (Request::Plain(plain), Some(max)) = (&request, services.max_body) {
            if let Framing::Length(length) = plain.framing {
                if length > max {
                    let reason = format!("request body of {length} bytes over limits.max_body");
                    return self.reject(413, reason);
                }
            }
        }
        self.pool = route.pool;
        self.rules = route.rules.clone();
        let pool = &services.pools[route.pool];
        self.send_proxy_header = pool.sends_proxy_protocol();
        let key = pool.hash_key().map_or(0, |key| {
            balance_key(key, &request, self.context.client_addr)
        });
        self.request = Some(request);
        self.plan = pool.plan(now_ns, key).into_iter();
        match self.next_server(services) {
            Some(first) => Step::Connect(first),
            None if pool.is_empty() => {
                let reason = format!(
                    "upstream {:?} has no servers (its names are not resolved yet)",
                    pool.name()
                );
                self.reject(503, reason)
            }
            None => {
                let reason = format!(
                    "every server of upstream {:?} holds its max_tunnels",
                    pool.name()
                );
                self.reject(503, reason)
            }
        }
    }

    /// The next server of the plan that takes this connection (one that filled up since the
    /// plan was made is passed over), counted on it.
    fn next_server(&mut self, services: &Services) -> Option<SocketAddr> {
        let pool = &services.pools[self.pool];
        self.lease = None;
        for addr in self.plan.by_ref() {
            if let Some(lease) = pool.lease(addr) {
                self.lease = Some(lease);
                self.current = Some(addr);
                return Some(addr);
            }
        }
        None
    }

    fn reject(&mut self, status: u16, reason: String) -> Step {
        let body = status_body(status);
        self.reject_with(status, error_response(status, body), reason)
    }

    fn reject_with(&mut self, status: u16, response: Vec<u8>, reason: String) -> Step {
        Step::Reject(Rejection {
            status,
            response,
            reason,
        })
    }

    fn fail_internal(&mut self, what: &str) -> Step {
        self.reject(500, format!("internal error: {what}"))
    }
}

/// The stable hash of what `key` names in `request` (the client's address when the header or
/// cookie is absent), for `consistent_hash`.
fn balance_key(key: &HashKey, request: &Request, client: IpAddr) -> u64 {
    let header = |name: &str| {
        request
            .headers()
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    };
    let found = match key {
        HashKey::ClientIp => None,
        HashKey::Path => {
            let path = request.path();
            Some(
                path.split_once('?')
                    .map_or(path, |(path, _)| path)
                    .as_bytes(),
            )
        }
        HashKey::Header(name) => header(name),
        HashKey::Cookie(name) => request
            .headers()
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
            .find_map(|h| cookie_value(&h.value, name)),
    };
    match found {
        Some(bytes) => crate::hash::spread(bytes),
        None => match client.to_canonical() {
            IpAddr::V4(ip) => crate::hash::spread(&ip.octets()),
            IpAddr::V6(ip) => crate::hash::spread(&ip.octets()),
        },
    }
}

/// The value of cookie `name` in one `Cookie` header (`a=1; b=2`, RFC 6265 §4.2.1).
fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
    })
}

/// The short text body of an error answer (the reason goes to the log, not to the client).
fn status_body(status: u16) -> &'static str {
    match status {
        404 => "no route for this host and path\n",
        408 => "request head not received in time\n",
        413 => "request body too large\n",
        500 => "internal proxy error\n",
        502 => "upstream unavailable\n",
        503 => "no healthy upstream\n",
        504 => "upstream timed out\n",
        _ => "request rejected\n",
    }
}

#[cfg(test)]
mod tests;
