//! Plain HTTP exchanges: bodies by their framing, keep-alive, pipelining, kept-alive upstream
//! connections, interim answers, broken bodies and answers, timeouts.

use super::*;

const GET: &[u8] = b"GET /page HTTP/1.1\r\nHost: example.com\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";

/// The bytes of every send to `side` in `actions`, joined.
fn sent_to(actions: &[Action], side: Side) -> Vec<u8> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send(s, bytes) if *s == side => Some(bytes.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

/// A plain request read and connected (on a new upstream connection): returns the harness and
/// the actions of the exchange's start.
fn exchanging(request: &[u8], reused: bool) -> (Harness, Vec<Action>) {
    let mut h = Harness::accept(DataPath::Splice, false);
    assert_eq!(
        h.client_sends(request),
        vec![Action::ConnectReusing(first_server())]
    );
    let actions = h.event(|c, now, s, out| c.on_connected(reused, now, s, out));
    (h, actions)
}

/// What ends an exchange whose upstream connection is kept: the access line, the release,
/// then the next request's keep-alive deadline and read.
fn kept_alive(h: &Harness, actions: &[Action]) {
    assert!(
        matches!(actions.first(), Some(Action::AccessLine(_))),
        "{actions:?}"
    );
    assert!(matches!(
        actions.get(1),
        Some(Action::ReleaseUpstream { server, .. }) if *server == first_server()
    ));
    assert_eq!(
        &actions[2..],
        &[
            Action::ArmDeadline(h.now + 75 * SECOND),
            Action::Read(Side::Client)
        ]
    );
}

#[test]
fn a_get_is_rewritten_answered_and_the_connection_kept_for_the_next_request() {
    let (mut h, actions) = exchanging(GET, false);
    let head = text(sent_to(&actions, Side::Upstream));
    assert!(
        head.starts_with("GET /page HTTP/1.1\r\nHost: example.com\r\n"),
        "{head}"
    );
    assert!(head.contains("X-Forwarded-For: 10.1.2.3\r\n"), "{head}");
    assert!(actions.contains(&Action::Read(Side::Upstream)));
    assert_eq!(h.sent(Side::Upstream), vec![]);
    let actions = h
        .upstream_sends(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!(
        text(sent_to(&actions, Side::Client)),
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    );
    let actions = h.sent(Side::Client);
    kept_alive(&h, &actions);
    let Action::AccessLine(record) = &actions[0] else {
        unreachable!()
    };
    assert_eq!((record.status, record.method.as_str()), (200, "GET"));
    assert_eq!(record.datapath, "http");
    // The next request on the same connection asks for a kept-alive upstream connection
    // (to the pool's next server: round robin).
    let actions = h.client_sends(GET);
    assert_eq!(actions[0], Action::ArmDeadline(h.now + HANDSHAKE));
    assert!(matches!(actions[1], Action::ConnectReusing(_)));
}

#[test]
fn a_body_goes_up_piece_by_piece_and_a_pipelined_request_waits_its_turn() {
    let mut request = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n01234".to_vec();
    let (mut h, actions) = exchanging(&request, false);
    assert!(text(sent_to(&actions, Side::Upstream)).ends_with("\r\n\r\n01234"));
    // The head and the body's start are written: the rest of the body is read.
    assert_eq!(h.sent(Side::Upstream), vec![Action::Read(Side::Client)]);
    request.clear();
    request.extend_from_slice(b"56789");
    request.extend_from_slice(GET);
    let actions = h.client_sends(&request);
    assert_eq!(
        actions,
        vec![Action::Send(Side::Upstream, b"56789".to_vec())]
    );
    assert_eq!(h.sent(Side::Upstream), vec![]);
    h.upstream_sends(OK);
    let actions = h.sent(Side::Client);
    // The pipelined GET is read at once, from what the client already sent.
    assert!(matches!(actions[0], Action::AccessLine(_)));
    assert!(
        matches!(actions.last(), Some(Action::ConnectReusing(_))),
        "{actions:?}"
    );
}

#[test]
fn a_chunked_body_passes_verbatim_and_a_broken_one_is_400_without_reaching_the_upstream() {
    let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (mut h, actions) = exchanging(head, false);
    let sent = text(sent_to(&actions, Side::Upstream));
    assert!(sent.contains("Transfer-Encoding: chunked\r\n"), "{sent}");
    h.sent(Side::Upstream);
    let actions = h.client_sends(b"5\r\nhello\r\n0\r\n\r\n");
    assert_eq!(
        actions,
        vec![Action::Send(
            Side::Upstream,
            b"5\r\nhello\r\n0\r\n\r\n".to_vec()
        )]
    );

    let (mut h, _) = exchanging(head, false);
    h.sent(Side::Upstream);
    let actions = h.client_sends(b"5\r\nhelloXX0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n");
    assert!(!text(sent_to(&actions, Side::Upstream)).contains("admin"));
    assert!(text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 400 "));
    assert!(actions.contains(&Action::CancelUpstream));
}

#[test]
fn interim_answers_are_passed_on_before_the_final_one() {
    let request =
        b"PUT /f HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
    let (mut h, actions) = exchanging(request, false);
    assert!(text(sent_to(&actions, Side::Upstream)).contains("Expect: 100-continue\r\n"));
    assert_eq!(h.sent(Side::Upstream), vec![Action::Read(Side::Client)]);
    let actions = h.upstream_sends(b"HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(
        text(sent_to(&actions, Side::Client)),
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    assert_eq!(h.sent(Side::Client), vec![Action::Read(Side::Upstream)]);
    assert_eq!(
        h.client_sends(b"abc"),
        vec![Action::Send(Side::Upstream, b"abc".to_vec())]
    );
    h.sent(Side::Upstream);
    let actions = h.upstream_sends(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
    assert!(text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 201 Created\r\n"));
    let actions = h.sent(Side::Client);
    kept_alive(&h, &actions);
}

#[test]
fn an_answer_delimited_by_close_closes_the_client_too() {
    let (mut h, _) = exchanging(GET, false);
    h.sent(Side::Upstream);
    let actions = h.upstream_sends(b"HTTP/1.1 200 OK\r\n\r\nsome");
    assert_eq!(
        text(sent_to(&actions, Side::Client)),
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nsome"
    );
    assert_eq!(h.sent(Side::Client), vec![Action::Read(Side::Upstream)]);
    h.upstream_sends(b" more");
    h.sent(Side::Client);
    let actions = h.read_end(Side::Upstream);
    // The connection's own access line is the request's: no second one.
    assert_eq!(
        actions,
        vec![Action::CloseUpstream, Action::Close { abortive: false }]
    );
    assert_eq!(h.finish().status, 200);
}

#[test]
fn a_kept_alive_connection_closed_by_its_server_is_replaced_once() {
    let (mut h, _) = exchanging(GET, true);
    h.sent(Side::Upstream);
    assert_eq!(
        h.read_end(Side::Upstream),
        vec![Action::Connect(first_server())]
    );
    let actions = h.connected();
    assert!(text(sent_to(&actions, Side::Upstream)).starts_with("GET /page HTTP/1.1\r\n"));
    h.sent(Side::Upstream);
    // The new connection fails too: that is the upstream's answer.
    let actions = h.read_end(Side::Upstream);
    assert!(text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 502 "));
}

#[test]
fn malformed_answers_are_502_and_the_upstream_connection_is_not_kept() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/9 nonsense\r\n\r\n",
    ] {
        let (mut h, _) = exchanging(GET, false);
        h.sent(Side::Upstream);
        let actions = h.upstream_sends(answer);
        assert!(
            text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 502 "),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::CancelUpstream));
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::ReleaseUpstream { .. })));
    }
}

#[test]
fn a_silent_upstream_is_504_after_the_response_timeout() {
    let (mut h, _) = exchanging(GET, false);
    h.sent(Side::Upstream);
    let sent_at = h.now;
    // A reminder before the response timeout only re-arms.
    assert_eq!(
        h.deadline(sent_at + 30 * SECOND),
        vec![Action::ArmDeadline(sent_at + 60 * SECOND)]
    );
    let actions = h.deadline(sent_at + 60 * SECOND);
    assert!(text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 504 "));
}

#[test]
fn an_idle_keep_alive_connection_closes_silently_and_a_half_request_is_408() {
    let (mut h, _) = exchanging(GET, false);
    h.sent(Side::Upstream);
    h.upstream_sends(OK);
    h.sent(Side::Client);
    let idle_until = h.now + 75 * SECOND;
    assert!(closes(&h.deadline(idle_until), false));
    assert_eq!(h.reason(), "no request within the timeout");
    assert!(h.finish().before_request);

    let (mut h, _) = exchanging(GET, false);
    h.sent(Side::Upstream);
    h.upstream_sends(OK);
    h.sent(Side::Client);
    h.client_sends(b"GET / HT");
    let actions = h.deadline(h.now + HANDSHAKE);
    assert!(text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 408 "));
}

#[test]
fn an_early_answer_to_an_upload_closes_the_connection_after_it() {
    let request = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n";
    let (mut h, _) = exchanging(request, false);
    h.sent(Side::Upstream);
    let actions = h.upstream_sends(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n");
    assert!(text(sent_to(&actions, Side::Client)).contains("Connection: close\r\n"));
    let actions = h.sent(Side::Client);
    assert_eq!(
        actions,
        vec![Action::CloseUpstream, Action::Close { abortive: false }]
    );
}

#[test]
fn a_drain_closes_idle_keep_alive_connections_and_ends_requests_with_close() {
    let (mut h, _) = exchanging(GET, false);
    h.event(|c, _, _, out| c.on_drain_start(out));
    h.sent(Side::Upstream);
    // The answer in flight is completed, with `Connection: close`.
    let actions = h.upstream_sends(OK);
    assert!(text(sent_to(&actions, Side::Client)).contains("Connection: close\r\n"));
    assert!(closes(&h.sent(Side::Client), false));

    let (mut h, _) = exchanging(GET, false);
    h.sent(Side::Upstream);
    h.upstream_sends(OK);
    h.sent(Side::Client);
    assert!(closes(
        &h.event(|c, _, _, out| c.on_drain_start(out)),
        false
    ));
}

#[test]
fn a_closing_client_still_sends_its_whole_body() {
    let request =
        b"POST /f HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 6\r\n\r\nabc";
    let (mut h, _) = exchanging(request, false);
    assert_eq!(h.sent(Side::Upstream), vec![Action::Read(Side::Client)]);
    assert_eq!(
        h.client_sends(b"def"),
        vec![Action::Send(Side::Upstream, b"def".to_vec())]
    );
    h.sent(Side::Upstream);
    let actions = h.upstream_sends(OK);
    assert!(text(sent_to(&actions, Side::Client)).contains("Connection: close\r\n"));
    let actions = h.sent(Side::Client);
    assert!(
        matches!(actions[0], Action::ReleaseUpstream { .. }),
        "the upstream connection is still good: {actions:?}"
    );
    assert!(closes(&actions, false));
}

#[test]
fn a_waiting_client_is_watched_its_departure_ends_the_request_and_its_next_request_waits() {
    let (mut h, actions) = exchanging(GET, false);
    assert!(actions.contains(&Action::Read(Side::Client)), "{actions:?}");
    h.sent(Side::Upstream);
    // A request pipelined while the first is answered is kept for its turn.
    assert_eq!(
        h.client_sends(b"GET /second HTTP/1.1\r\n"),
        vec![Action::Read(Side::Client)]
    );
    h.upstream_sends(OK);
    let actions = h.sent(Side::Client);
    assert!(matches!(actions[0], Action::AccessLine(_)));
    h.client_sends(b"Host: a\r\n\r\n");
    let Stage::Connecting(next) = h.conn.stage() else {
        panic!("the second request goes upstream");
    };
    assert_eq!(next.summary().path(), "/second");

    let (mut h, _) = exchanging(GET, false);
    h.sent(Side::Upstream);
    let actions = h.read_end(Side::Client);
    assert!(closes(&actions, false));
    assert_eq!(h.reason(), "client closed before its answer was complete");
}

#[test]
fn a_body_over_limits_max_body_is_413_whether_announced_or_chunked() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.services.max_body = Some(8);
    let actions = h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n");
    assert!(text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 413 "));

    let mut h = Harness::accept(DataPath::Relay, false);
    h.services.max_body = Some(8);
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    h.event(|c, now, s, out| c.on_connected(false, now, s, out));
    h.sent(Side::Upstream);
    assert_eq!(
        h.client_sends(b"5\r\nhello\r\n"),
        vec![Action::Send(Side::Upstream, b"5\r\nhello\r\n".to_vec())]
    );
    h.sent(Side::Upstream);
    let actions = h.client_sends(b"5\r\nworld\r\n");
    assert!(!text(sent_to(&actions, Side::Upstream)).contains("world"));
    assert!(text(sent_to(&actions, Side::Client)).starts_with("HTTP/1.1 413 "));
}
