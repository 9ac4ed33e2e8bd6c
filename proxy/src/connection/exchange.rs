//! Plain HTTP through the proxy: one request and its answer (the `Exchanging` stage), then the
//! next request on the same connection or a close.
//!
//! The request head goes upstream rewritten; its body follows as the client sends it, each
//! piece validated by its framing before it is passed on (a body that breaks its framing is
//! answered 400 and never reaches the upstream as something it could read as a second
//! request). The upstream's head is read (interim `1xx` answers are passed on as they come),
//! rewritten for the client, and its body relayed by its framing. One piece is in flight per
//! direction: a slow reader throttles its writer, whatever the body's size.
//!
//! When both messages are complete, the upstream connection goes back to the worker's idle
//! connections if it can carry another request, and the client's connection reads its next
//! request (keep-alive), or closes when either side asked for it or the answer was delimited by
//! the upstream closing.

use super::handshake::ExchangeStart;
use super::{Action, Actions, Connection, Side, Stage};
use crate::access::AccessRecord;
use crate::handshake::{error_response, HeadLimits};
use crate::headers::rewrite_response;
use crate::http::{parse_response_head, response_framing, BodyLimits, BodyReader, Framing};
use crate::services::Services;

/// Where the upstream's answer stands.
#[derive(Debug)]
enum Answer {
    /// Its head is being read (bytes so far; interim answers are passed on from here).
    Head(Vec<u8>),
    /// Its body is being relayed.
    Body(BodyReader),
    /// Complete.
    Done,
}

/// One plain request and its answer.
#[derive(Debug)]
pub struct Exchange {
    /// The request's method (HEAD answers have no body).
    method: String,
    /// The address the client connected to: the next request's handshake needs it.
    local: std::net::SocketAddr,
    /// The request's body, as it is read from the client.
    request: BodyReader,
    /// The rewritten head, kept until the answer starts when the upstream connection was kept
    /// alive: one that turns out closed gets it again on a new connection.
    resend: Option<Vec<u8>>,
    /// What the client sent behind this request (the next one, pipelined).
    next: Vec<u8>,
    answer: Answer,
    /// A read of the client's body is pending.
    reading_client: bool,
    /// A read of the upstream is pending.
    reading_upstream: bool,
    /// The client's connection closes after this answer.
    close_client: bool,
    /// The upstream connection can carry another request afterwards.
    upstream_reusable: bool,
    /// The upstream connection was kept alive from an earlier request.
    reused: bool,
    /// The answer's status (0 until its head arrived).
    status: u16,
    bytes_up: u64,
    bytes_down: u64,
    /// When the request was completely sent (the answer's timeout runs from there).
    request_sent_ns: Option<u64>,
    last_activity_ns: u64,
    idle_ns: u64,
    response_ns: u64,
}

impl Exchange {
    /// When the exchange times out: the answer's head is awaited `timeouts.response` after
    /// the request is complete; bodies may be idle `timeouts.idle`.
    pub fn deadline(&self) -> u64 {
        match (&self.answer, self.request_sent_ns) {
            (Answer::Head(_), Some(sent)) => sent.saturating_add(self.response_ns),
            _ => self.last_activity_ns.saturating_add(self.idle_ns),
        }
    }

    /// A reload changed the route's idle timeout; returns the one it had.
    pub(super) fn replace_idle_ns(&mut self, idle_ns: u64) -> u64 {
        std::mem::replace(&mut self.idle_ns, idle_ns)
    }

    /// The answer's status (0 before its head).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Body and head bytes sent upstream.
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up
    }

    /// Bytes sent to the client.
    pub fn bytes_down(&self) -> u64 {
        self.bytes_down
    }

    /// The request body's size so far when it passed `max` (a chunked body's size shows only
    /// as it comes; a Content-Length one was checked with the head).
    fn body_over(&self, max: Option<u64>) -> Option<u64> {
        let payload = self.request.payload_bytes();
        max.filter(|&max| payload > max).map(|_| payload)
    }

    fn answer_started(&self) -> bool {
        !matches!(self.answer, Answer::Head(_))
    }
}

/// Limits of a body's framing lines.
fn body_limits() -> BodyLimits {
    BodyLimits::default()
}

impl Connection {
    /// Connected for a plain request: send its head (with what of its body is already here)
    /// and read the answer.
    pub(super) fn start_exchange(
        &mut self,
        start: ExchangeStart,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let ExchangeStart {
            request,
            head,
            behind,
            reused,
            local,
        } = start;
        if reused {
            services.metrics.upstream_keepalive_reused.inc();
        }
        services.metrics.http_requests.inc();
        let mut exchange = Exchange {
            close_client: request.wants_close() || self.draining,
            upstream_reusable: request.http_minor == 1,
            method: request.method,
            local,
            request: BodyReader::new(request.framing, body_limits()),
            // Only a kept-alive connection can turn out closed before answering.
            resend: reused.then(|| head.clone()),
            next: Vec::new(),
            answer: Answer::Head(Vec::new()),
            reading_client: false,
            reading_upstream: false,
            reused,
            status: 0,
            bytes_up: 0,
            bytes_down: 0,
            request_sent_ns: None,
            last_activity_ns: now_ns,
            idle_ns: self.idle_ns(services),
            response_ns: services.response_ns,
        };
        let mut first = head;
        let sent_before = first.len();
        match exchange.request.feed(&behind, &mut first) {
            Ok(fed) => {
                exchange.next = behind[fed.consumed..].to_vec();
                exchange.bytes_up += (first.len() - sent_before) as u64;
            }
            Err(error) => {
                self.stage = Stage::Exchanging(Box::new(exchange));
                let reason = format!("bad request body: {error}");
                return self.refuse_request(400, reason, services, out);
            }
        }
        if let Some(payload) = exchange.body_over(services.max_body) {
            self.stage = Stage::Exchanging(Box::new(exchange));
            let reason = format!("request body over limits.max_body ({payload} bytes so far)");
            return self.refuse_request(413, reason, services, out);
        }
        if exchange.request.is_done() {
            exchange.request_sent_ns = Some(now_ns);
        }
        let deadline = exchange.deadline();
        exchange.reading_upstream = true;
        let watch = exchange.request.is_done() && exchange.next.is_empty();
        exchange.reading_client = watch;
        self.stage = Stage::Exchanging(Box::new(exchange));
        self.sending[Side::Upstream.index()] = true;
        out.push_back(Action::Send(Side::Upstream, first));
        out.push_back(Action::Read(Side::Upstream));
        out.push_back(Action::ArmDeadline(deadline));
        if watch {
            // Watch the client while it waits for its answer: one that goes away (a long poll
            // given up) ends the request upstream too, as with nginx.
            out.push_back(Action::Read(Side::Client));
        }
    }

    fn exchange(&mut self) -> Option<&mut Exchange> {
        match &mut self.stage {
            Stage::Exchanging(exchange) => Some(exchange),
            _ => None,
        }
    }

    /// Bytes read from `side` during an exchange.
    pub(super) fn on_exchange_data(
        &mut self,
        side: Side,
        bytes: &[u8],
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        match side {
            Side::Client => self.on_request_body(bytes, now_ns, services, out),
            Side::Upstream => self.on_answer_bytes(bytes, now_ns, services, out),
        }
        self.finish_exchange_if_done(now_ns, services, out);
    }

    fn on_request_body(
        &mut self,
        bytes: &[u8],
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let pipelined_limit = services.request_limits.max_bytes;
        let Some(exchange) = self.exchange() else {
            return;
        };
        exchange.reading_client = false;
        if exchange.request.is_done() {
            // The client is watched while it waits: what it sends now is its next request.
            exchange.next.extend_from_slice(bytes);
            if exchange.next.len() < pipelined_limit && !matches!(exchange.answer, Answer::Done) {
                exchange.reading_client = true;
                out.push_back(Action::Read(Side::Client));
            }
            return;
        }
        exchange.last_activity_ns = now_ns;
        let mut body = Vec::with_capacity(bytes.len());
        let fed = match exchange.request.feed(bytes, &mut body) {
            Ok(fed) => fed,
            Err(error) => {
                let reason = format!("bad request body: {error}");
                return self.refuse_request(400, reason, services, out);
            }
        };
        exchange.next.extend_from_slice(&bytes[fed.consumed..]);
        exchange.bytes_up += body.len() as u64;
        if let Some(payload) = exchange.body_over(services.max_body) {
            let reason = format!("request body over limits.max_body ({payload} bytes so far)");
            return self.refuse_request(413, reason, services, out);
        }
        if exchange.request.is_done() && exchange.request_sent_ns.is_none() {
            exchange.request_sent_ns = Some(now_ns);
        }
        let done = exchange.request.is_done();
        if !body.is_empty() {
            self.sending[Side::Upstream.index()] = true;
            out.push_back(Action::Send(Side::Upstream, body));
        } else if !done {
            exchange.reading_client = true;
            out.push_back(Action::Read(Side::Client));
        }
    }

    fn on_answer_bytes(
        &mut self,
        bytes: &[u8],
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let Some(exchange) = self.exchange() else {
            return;
        };
        exchange.reading_upstream = false;
        exchange.last_activity_ns = now_ns;
        match &mut exchange.answer {
            Answer::Head(head) => {
                head.extend_from_slice(bytes);
                self.judge_answer_head(services, out);
            }
            Answer::Body(reader) => {
                let mut body = Vec::with_capacity(bytes.len());
                match reader.feed(bytes, &mut body) {
                    Ok(fed) => {
                        if fed.consumed < bytes.len() {
                            // Bytes behind the answer's end: this upstream cannot be trusted
                            // with another request.
                            exchange.upstream_reusable = false;
                        }
                        if reader.is_done() {
                            exchange.answer = Answer::Done;
                        }
                    }
                    Err(error) => {
                        let reason = format!("bad response body from upstream: {error}");
                        return self.close(reason, true, out);
                    }
                }
                self.send_answer_piece(body, out);
            }
            Answer::Done => exchange.upstream_reusable = false,
        }
    }

    /// The answer's head so far: wait, pass on an interim answer, refuse a broken one, or
    /// start relaying the final one.
    fn judge_answer_head(&mut self, services: &Services, out: &mut Actions) {
        let limits: HeadLimits = services.response_limits;
        let draining = self.draining;
        let Some(exchange) = self.exchange() else {
            return;
        };
        let Answer::Head(bytes) = &mut exchange.answer else {
            return;
        };
        let head = match parse_response_head(bytes, &limits) {
            Ok(None) => {
                exchange.reading_upstream = true;
                out.push_back(Action::Read(Side::Upstream));
                return;
            }
            Ok(Some(head)) => head,
            Err(error) => return self.bad_answer(&error, services, out),
        };
        if head.status == 101 {
            let reason = "upstream switched protocols on a plain request".into();
            return self.fail_exchange(502, reason, services, out);
        }
        if head.is_interim() {
            // `100 Continue` and the like go to the client as they came; the final answer
            // follows.
            let interim: Vec<u8> = bytes.drain(..head.head_len).collect();
            exchange.bytes_down += interim.len() as u64;
            self.sending[Side::Client.index()] = true;
            out.push_back(Action::Send(Side::Client, interim));
            return;
        }
        let framing = match response_framing(
            head.status,
            &exchange.method,
            &head.headers,
            head.http_minor,
        ) {
            Ok(framing) => framing,
            Err(error) => return self.bad_answer(&error, services, out),
        };
        let rest = bytes.split_off(head.head_len);
        exchange.status = head.status;
        // Shutting down: this is the connection's last answer.
        exchange.close_client |= draining;
        exchange.resend = None;
        if framing == Framing::UntilClose {
            // The answer ends when the upstream closes: so must the client's connection.
            exchange.close_client = true;
            exchange.upstream_reusable = false;
        }
        if !head.keeps_alive() {
            exchange.upstream_reusable = false;
        }
        if !exchange.request.is_done() {
            // An answer before the whole request (a refusal of an upload): the rest of the
            // request can neither be relayed nor skipped safely.
            exchange.close_client = true;
            exchange.upstream_reusable = false;
        }
        let mut piece = rewrite_response(
            head.status,
            &head.reason,
            &head.headers,
            exchange.close_client,
        );
        let mut reader = BodyReader::new(framing, body_limits());
        match reader.feed(&rest, &mut piece) {
            Ok(fed) => {
                if fed.consumed < rest.len() {
                    exchange.upstream_reusable = false;
                }
            }
            Err(error) => {
                let reason = format!("bad response body from upstream: {error}");
                return self.fail_exchange(502, reason, services, out);
            }
        }
        exchange.answer = if reader.is_done() {
            Answer::Done
        } else {
            Answer::Body(reader)
        };
        self.send_answer_piece(piece, out);
    }

    /// The upstream's answer head cannot be used: 502.
    fn bad_answer(
        &mut self,
        error: &dyn std::fmt::Display,
        services: &Services,
        out: &mut Actions,
    ) {
        let upstream = self
            .upstream_addr
            .map(|a| a.to_string())
            .unwrap_or_default();
        let reason = format!("bad answer from upstream {upstream}: {error}");
        self.fail_exchange(502, reason, services, out);
    }

    /// Sends a piece of the answer to the client, or reads on when there is nothing to send.
    fn send_answer_piece(&mut self, piece: Vec<u8>, out: &mut Actions) {
        let Some(exchange) = self.exchange() else {
            return;
        };
        if !piece.is_empty() {
            exchange.bytes_down += piece.len() as u64;
            self.sending[Side::Client.index()] = true;
            out.push_back(Action::Send(Side::Client, piece));
        } else if matches!(exchange.answer, Answer::Body(_)) {
            exchange.reading_upstream = true;
            out.push_back(Action::Read(Side::Upstream));
        }
    }

    /// A send to `side` completed during an exchange: the next piece of that direction.
    pub(super) fn on_exchange_sent(
        &mut self,
        side: Side,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let Some(exchange) = self.exchange() else {
            return;
        };
        exchange.last_activity_ns = now_ns;
        match side {
            Side::Upstream => {
                // Once the answer started, the rest of the body is not wanted (the connection
                // closes after the answer).
                let wants_body = !exchange.request.is_done() && !exchange.answer_started();
                // Once the request is complete, the client is watched until its answer is
                // done (see `start_exchange`).
                let watch = exchange.request.is_done()
                    && exchange.next.is_empty()
                    && !matches!(exchange.answer, Answer::Done);
                if (wants_body || watch) && !exchange.reading_client {
                    exchange.reading_client = true;
                    out.push_back(Action::Read(Side::Client));
                }
            }
            Side::Client => match &exchange.answer {
                // An interim answer was sent: the final one may already be here.
                Answer::Head(_) => self.judge_answer_head(services, out),
                Answer::Body(_) if !exchange.reading_upstream => {
                    exchange.reading_upstream = true;
                    out.push_back(Action::Read(Side::Upstream));
                }
                _ => {}
            },
        }
        self.finish_exchange_if_done(now_ns, services, out);
    }

    /// A read of `side` ended (end of stream or an error) during an exchange.
    pub(super) fn on_exchange_read_end(
        &mut self,
        side: Side,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let upstream = self.upstream_addr;
        let sending_upstream = self.sending[Side::Upstream.index()];
        let Some(exchange) = self.exchange() else {
            return;
        };
        match side {
            Side::Client => {
                exchange.reading_client = false;
                let reason = if exchange.request.is_done() {
                    "client closed before its answer was complete"
                } else {
                    "client closed in the middle of its request body"
                };
                self.close(reason.into(), false, out);
            }
            Side::Upstream => {
                exchange.reading_upstream = false;
                match &mut exchange.answer {
                    Answer::Head(bytes) => {
                        let stale = exchange.reused && bytes.is_empty();
                        let can_resend = exchange.request.is_done()
                            && exchange.bytes_up == 0
                            && !sending_upstream;
                        if stale && can_resend {
                            // A kept-alive connection the server had closed: the request goes
                            // again, once, on a new connection.
                            exchange.reused = false;
                            if let Some(server) = upstream {
                                out.push_back(Action::Connect(server));
                                return;
                            }
                        }
                        let upstream = upstream.map(|a| a.to_string()).unwrap_or_default();
                        self.fail_exchange(
                            502,
                            format!("upstream {upstream} closed the connection before answering"),
                            services,
                            out,
                        );
                    }
                    Answer::Body(reader) => match reader.on_eof() {
                        Ok(()) => {
                            exchange.answer = Answer::Done;
                            exchange.close_client = true;
                            exchange.upstream_reusable = false;
                            self.finish_exchange_if_done(now_ns, services, out);
                        }
                        Err(error) => self.close(
                            format!("upstream closed in the middle of its answer: {error}"),
                            true,
                            out,
                        ),
                    },
                    Answer::Done => {
                        exchange.upstream_reusable = false;
                        self.finish_exchange_if_done(now_ns, services, out);
                    }
                }
            }
        }
    }

    /// A new connection replaced a kept-alive one that was closed: send the request again.
    pub(super) fn on_exchange_reconnected(&mut self, out: &mut Actions) {
        let Some(exchange) = self.exchange() else {
            return;
        };
        let Some(head) = exchange.resend.clone() else {
            return;
        };
        exchange.reading_upstream = true;
        self.sending[Side::Upstream.index()] = true;
        out.push_back(Action::Send(Side::Upstream, head));
        out.push_back(Action::Read(Side::Upstream));
    }

    /// The exchange's deadline passed: 504 while the answer's head is awaited, else a close.
    pub(super) fn on_exchange_deadline(&mut self, services: &Services, out: &mut Actions) {
        let Some(exchange) = self.exchange() else {
            return;
        };
        if exchange.answer_started() || exchange.request_sent_ns.is_none() {
            let reason = if exchange.answer_started() {
                "idle timeout in the answer's body"
            } else {
                "idle timeout in the request's body"
            };
            return self.close(reason.into(), false, out);
        }
        let upstream = self
            .upstream_addr
            .map(|a| a.to_string())
            .unwrap_or_default();
        self.fail_exchange(
            504,
            format!("upstream {upstream} did not answer within timeouts.response"),
            services,
            out,
        );
    }

    /// The upstream's answer cannot be relayed: an error answer for the client if nothing of
    /// the answer was sent yet, else a reset.
    pub(super) fn fail_exchange(
        &mut self,
        status: u16,
        reason: String,
        services: &Services,
        out: &mut Actions,
    ) {
        let started = self.exchange().is_some_and(|e| e.answer_started());
        if started || self.sending[Side::Client.index()] {
            return self.close(reason, true, out);
        }
        self.answer_error(status, reason, services, out);
    }

    /// The client's request cannot be passed on (its body broke its framing): 400, and the
    /// upstream connection, which holds a partial request, is dropped with the client's.
    fn refuse_request(
        &mut self,
        status: u16,
        reason: String,
        services: &Services,
        out: &mut Actions,
    ) {
        if self.sending[Side::Client.index()] {
            return self.close(reason, true, out);
        }
        self.answer_error(status, reason, services, out);
    }

    fn answer_error(
        &mut self,
        status: u16,
        reason: String,
        services: &Services,
        out: &mut Actions,
    ) {
        let body = match status {
            400 => "bad request\n",
            413 => "request body too large\n",
            502 => "upstream unavailable\n",
            504 => "upstream timed out\n",
            _ => "request failed\n",
        };
        let rejection = super::Rejection {
            status,
            response: error_response(status, body),
            reason,
        };
        self.reject(rejection, services, out);
    }

    /// Both messages are complete and written: log the request, keep or drop the upstream
    /// connection, and read the next request or close.
    fn finish_exchange_if_done(&mut self, now_ns: u64, services: &Services, out: &mut Actions) {
        let idle = !self.sending[0] && !self.sending[1];
        let Some(exchange) = self.exchange() else {
            return;
        };
        let request_over = exchange.request.is_done() || exchange.close_client;
        if !matches!(exchange.answer, Answer::Done) || !request_over || !idle {
            return;
        }
        let reusable = exchange.upstream_reusable && exchange.request.is_done();
        let close_client = exchange.close_client;
        let local = exchange.local;
        let next = std::mem::take(&mut exchange.next);
        // The last request of a connection that closes after it gets the connection's own
        // access line (the same fields, with the reason): one line per request either way.
        if services.access_lines && !close_client {
            let record = self.exchange_record(now_ns);
            out.push_back(Action::AccessLine(Box::new(record)));
        }
        // The request is over: it no longer counts on its server.
        self.lease = None;
        match (reusable, self.upstream_addr, self.summary.route) {
            (true, Some(server), Some(route)) => {
                let keepalive = services.pools[services.routes[route].pool].keepalive();
                out.push_back(Action::ReleaseUpstream { server, keepalive });
            }
            _ => out.push_back(Action::CloseUpstream),
        }
        if close_client {
            return self.close("answered; the connection closes".into(), false, out);
        }
        self.read_next_request(next, local, now_ns, services, out);
    }

    /// Keep-alive: back to reading a request (to `local`), starting with what the client
    /// already sent.
    fn read_next_request(
        &mut self,
        next: Vec<u8>,
        local: std::net::SocketAddr,
        now_ns: u64,
        services: &Services,
        out: &mut Actions,
    ) {
        let handshake = self.new_handshake(local, services);
        self.stage = Stage::ReadingRequest(Box::new(handshake));
        self.summary = Default::default();
        self.upstream_addr = None;
        self.started_ns = now_ns;
        self.waiting_for_request = true;
        self.deadline_ns = now_ns.saturating_add(services.keepalive_ns);
        out.push_back(Action::ArmDeadline(self.deadline_ns));
        if next.is_empty() {
            out.push_back(Action::Read(Side::Client));
        } else {
            self.on_data(Side::Client, &next, now_ns, services, out);
        }
    }

    /// The access line of the exchange that just ended.
    fn exchange_record(&self, now_ns: u64) -> AccessRecord {
        let (status, bytes_up, bytes_down) = match &self.stage {
            Stage::Exchanging(e) => (e.status(), e.bytes_up(), e.bytes_down()),
            _ => (0, 0, 0),
        };
        AccessRecord {
            id: self.log_id,
            client: self.client_addr,
            upstream: self.upstream_addr,
            host: self.summary.host().to_owned(),
            path: self.summary.path().to_owned(),
            method: self.summary.method().to_owned(),
            status,
            bytes_up,
            bytes_down,
            datapath: "http",
            duration_ms: now_ns.saturating_sub(self.started_ns) / 1_000_000,
            reason: String::new(),
            before_request: false,
            tls: None,
        }
    }
}
