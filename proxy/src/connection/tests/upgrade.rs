//! From the first byte to the tunnel, or to an error answer and a lingering close.

use super::*;

fn sent_bytes(actions: &[Action], side: Side) -> String {
    actions
        .iter()
        .find_map(|action| match action {
            Action::Send(to, bytes) if *to == side => {
                Some(String::from_utf8_lossy(bytes).into_owned())
            }
            _ => None,
        })
        .unwrap_or_default()
}

#[test]
fn a_request_in_pieces_is_read_to_its_end_then_the_first_server_is_connected() {
    let mut h = Harness::accept(DataPath::Relay, false);
    assert_eq!(
        h.client_sends(&REQUEST[..20]),
        vec![Action::Read(Side::Client)]
    );
    assert_eq!(
        h.client_sends(&REQUEST[20..]),
        vec![Action::Connect(first_server())]
    );
    assert_eq!(h.conn.upstream_addr(), Some(first_server()));
    assert!(matches!(h.conn.stage(), Stage::Connecting(_)));
}

#[test]
fn once_connected_the_rewritten_request_goes_upstream() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.client_sends(REQUEST);
    let actions = h.connected();
    let request = sent_bytes(&actions, Side::Upstream);
    assert!(request.starts_with("GET /chat HTTP/1.1\r\n"), "{request}");
    assert!(request.contains("X-Real-IP: 10.1.2.3\r\n"), "{request}");
    assert!(
        request.contains("X-Forwarded-For: 10.1.2.3\r\n"),
        "{request}"
    );
    assert!(matches!(h.conn.stage(), Stage::SendingRequest(_)));
}

#[test]
fn after_the_request_the_relay_reads_the_response_and_the_kernel_path_peeks_at_it() {
    let mut relay = Harness::accept(DataPath::Relay, false);
    relay.client_sends(REQUEST);
    relay.connected();
    assert_eq!(
        relay.sent(Side::Upstream),
        vec![Action::Read(Side::Upstream)]
    );
    let mut kernel = Harness::accept(DataPath::Splice, false);
    kernel.client_sends(REQUEST);
    kernel.connected();
    assert_eq!(
        kernel.sent(Side::Upstream),
        vec![Action::PeekUpstream { seen: 0 }]
    );
}

#[test]
fn a_partial_response_head_is_peeked_at_again_once_more_bytes_are_queued() {
    let mut h = Harness::upstream_asked(DataPath::Splice, false);
    assert_eq!(
        h.peeked(&UPGRADED[..30]),
        vec![Action::PeekUpstream { seen: 30 }]
    );
    assert_eq!(
        h.peeked(UPGRADED),
        vec![
            Action::ArmDeadline(h.now + IDLE),
            Action::DrainClient {
                limit: MAX_UNREAD_BEFORE_SPLICE
            }
        ]
    );
}

#[test]
fn on_the_kernel_path_an_upstream_that_closes_mid_head_is_502_at_once() {
    let mut h = Harness::upstream_asked(DataPath::Splice, false);
    assert_eq!(
        h.peeked(&UPGRADED[..30]),
        vec![Action::PeekUpstream { seen: 30 }]
    );
    // Woken again with the same 30 bytes: a FIN (or an error), not more of the head.
    let actions = h.peeked(&UPGRADED[..30]);
    assert_eq!(actions[0], Action::ConsumeUpstream { len: 30 });
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 502 "));
}

#[test]
fn a_malformed_request_is_answered_400_without_touching_an_upstream() {
    let mut h = Harness::accept(DataPath::Relay, false);
    let actions = h.client_sends(b"GET /chat HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n");
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 400 "));
    assert_eq!(h.services.metrics.requests_rejected.get(), 1);
    assert!(matches!(
        h.conn.stage(),
        Stage::Rejecting { status: 400, .. }
    ));
}

#[test]
fn a_rejection_after_connecting_abandons_the_upstream_first() {
    let mut h = Harness::upstream_asked(DataPath::Relay, false);
    // An answer has begun: the upstream closing now is 502, not a retry.
    h.upstream_sends(b"HTTP/1.1 10");
    let actions = h.read_end(Side::Upstream);
    assert_eq!(actions[0], Action::CancelUpstream);
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 502 "));
}

#[test]
fn an_upstream_closing_before_any_answer_byte_sends_the_request_to_the_next_server() {
    let mut h = Harness::upstream_asked(DataPath::Relay, false);
    let first = h.conn.upstream_addr();
    let actions = h.read_end(Side::Upstream);
    let [Action::Connect(next)] = actions.as_slice() else {
        panic!("expected a connect to the next server: {actions:?}");
    };
    assert_ne!(Some(*next), first);
    assert!(sent_bytes(&h.connected(), Side::Upstream).starts_with("GET "));
}

#[test]
fn a_tls_client_gets_close_notify_right_behind_its_error_answer() {
    let mut h = Harness::accept(DataPath::Relay, true);
    let actions = h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n");
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 405 "));
    assert_eq!(actions.last(), Some(&Action::CloseNotify));
}

#[test]
fn once_the_answer_is_sent_the_client_gets_a_fin_and_is_drained_until_the_linger_deadline() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n");
    assert_eq!(
        h.sent(Side::Client),
        vec![
            Action::ShutdownWrite(Side::Client),
            Action::ArmDeadline(h.now + LINGER_NS),
            Action::Read(Side::Client),
        ]
    );
    // What the client still sends is dropped, and reading goes on.
    assert_eq!(
        h.client_sends(b"more junk"),
        vec![Action::Read(Side::Client)]
    );
    assert!(closes(&h.deadline(h.now + LINGER_NS), false));
    assert_eq!(h.reason(), "rejected");
}

#[test]
fn a_rejected_client_that_closes_ends_the_connection_gracefully() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n");
    h.sent(Side::Client);
    assert!(closes(&h.read_end(Side::Client), false));
    let record = h.finish();
    assert_eq!((record.status, record.reason.as_str()), (405, "rejected"));
}

#[test]
fn a_client_that_leaves_before_its_request_is_logged_only_at_debug() {
    let mut h = Harness::accept(DataPath::Relay, false);
    assert!(closes(&h.read_end(Side::Client), false));
    assert_eq!(h.reason(), "client closed before sending a request");
    assert!(h.finish().before_request);
}

#[test]
fn the_handshake_deadline_closes_a_silent_client_and_answers_504_while_the_upstream_is_silent() {
    let mut silent = Harness::accept(DataPath::Relay, false);
    // A reminder that fires early only re-arms.
    assert_eq!(
        silent.deadline(2 * SECOND),
        vec![Action::ArmDeadline(SECOND + HANDSHAKE)]
    );
    assert!(closes(&silent.deadline(SECOND + HANDSHAKE), false));
    assert!(silent.reason().contains("no request within the timeout"));

    let mut waiting = Harness::upstream_asked(DataPath::Relay, false);
    let actions = waiting.deadline(SECOND + HANDSHAKE);
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 504 "));
}

#[test]
fn a_tls_handshake_that_does_not_finish_in_time_is_closed_and_counted() {
    let mut h = Harness::accept(DataPath::Relay, true);
    h.now = SECOND + HANDSHAKE;
    let actions = h.event(|c, now, s, out| c.on_deadline(now, None, true, s, out));
    assert!(closes(&actions, false));
    assert_eq!(h.reason(), "TLS handshake timed out");
    assert_eq!(h.services.metrics.tls_failures.get(), 1);
}

#[test]
fn a_refused_connect_tries_the_next_server_and_the_last_one_fails_with_502() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.client_sends(REQUEST);
    assert_eq!(
        h.connect_failed(ConnectFailure::Error),
        vec![Action::Connect(second_server())]
    );
    let actions = h.connect_failed(ConnectFailure::Error);
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 502 "));
    assert_eq!(h.services.metrics.upstream_connect_failures.get(), 2);
}

#[test]
fn a_connect_timeout_on_the_last_server_answers_504() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.client_sends(REQUEST);
    h.connect_failed(ConnectFailure::TimedOut);
    let actions = h.connect_failed(ConnectFailure::TimedOut);
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 504 "));
}

#[test]
fn a_proxy_out_of_descriptors_answers_503_and_blames_no_server() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.client_sends(REQUEST);
    let actions = h.connect_failed(ConnectFailure::Local);
    assert!(sent_bytes(&actions, Side::Client).starts_with("HTTP/1.1 503 "));
    assert_eq!(h.services.metrics.upstream_connect_failures.get(), 0);
}

#[test]
fn a_refused_upgrade_is_relayed_with_its_body_then_closed() {
    let mut h = Harness::upstream_asked(DataPath::Relay, false);
    let answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nno";
    let actions = h.upstream_sends(answer);
    assert_eq!(actions[1], Action::Send(Side::Client, answer.to_vec()));
    assert_eq!(h.services.metrics.upgrades_refused.get(), 1);
    // Three body bytes are still to come; the client's side is not read at all.
    assert_eq!(
        h.sent(Side::Client),
        vec![Action::Forward {
            from: Side::Upstream,
            budget: 3
        }]
    );
    h.event(|c, now, s, _| c.on_forwarded(Side::Upstream, &[0; 3], true, now, s));
    let actions = h.sent(Side::Client);
    assert_eq!(actions[0], Action::ShutdownWrite(Side::Client));
    assert!(closes(&actions, false));
    let record = h.finish();
    assert_eq!(
        (record.status, record.reason.as_str()),
        (403, "refused upgrade relayed")
    );
    assert_eq!(record.bytes_down, answer.len() as u64 + 3);
}

#[test]
fn on_the_kernel_path_a_peeked_refusal_is_consumed_and_relayed_in_userspace() {
    let mut h = Harness::upstream_asked(DataPath::Splice, false);
    let answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
    let actions = h.peeked(answer);
    assert_eq!(actions[0], Action::ConsumeUpstream { len: answer.len() });
    assert!(actions.contains(&Action::Send(Side::Client, answer.to_vec())));
}
