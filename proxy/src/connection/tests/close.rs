//! Closing: decided once, with the first reason; nothing happens after it; the gauges and the
//! access line come out right.

use super::*;

#[test]
fn a_close_is_decided_once_and_keeps_its_first_reason() {
    let mut h = Harness::relaying(false);
    let actions = h.deadline(h.now + IDLE);
    assert_eq!(actions, vec![Action::Close { abortive: false }]);
    // A reset seen afterwards changes nothing.
    let later = h.event(|c, _, _, out| c.on_source_failed(Side::Client, "reset", true, out));
    assert_eq!(later, vec![]);
    assert!(h.reason().starts_with("idle timeout"), "{}", h.reason());
    assert!(!h.conn.ending().is_some_and(|e| e.abortive));
}

#[test]
fn events_after_the_close_ask_for_nothing() {
    let mut h = Harness::relaying(false);
    h.deadline(h.now + IDLE);
    assert_eq!(h.client_sends(b"late"), vec![]);
    assert_eq!(h.sent(Side::Client), vec![]);
    assert_eq!(
        h.event(|c, _, s, out| c.on_readable(Side::Upstream, s, out)),
        vec![]
    );
    assert_eq!(h.deadline(h.now + IDLE), vec![]);
}

#[test]
fn closing_a_spliced_tunnel_takes_it_out_of_the_kernel_first() {
    let mut h = Harness::spliced();
    assert_eq!(
        h.event(|c, _, s, out| c.on_spliced_event(
            Side::Client,
            SplicedEvent::Failed {
                reset: false,
                error: "broken pipe".into()
            },
            s,
            out
        )),
        vec![Action::Unsplice, Action::Close { abortive: false }]
    );
}

#[test]
fn finishing_a_tunnel_updates_the_gauges() {
    let mut h = Harness::relaying(false);
    h.event(|c, now, s, out| c.on_drain_deadline(now, s, out));
    let metrics = std::sync::Arc::clone(&h.services.metrics);
    assert_eq!(
        (metrics.connections_open.get(), metrics.tunnels_open.get()),
        (1, 1)
    );
    h.finish();
    assert_eq!(
        (metrics.connections_open.get(), metrics.tunnels_open.get()),
        (0, 0)
    );
    assert_eq!(metrics.connections_accepted.get(), 1);
}

#[test]
fn finishing_a_rejected_connection_leaves_the_tunnel_gauge_alone() {
    let mut h = Harness::accept(DataPath::Relay, false);
    h.client_sends(b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n");
    h.event(|c, now, s, out| c.on_drain_deadline(now, s, out));
    let metrics = std::sync::Arc::clone(&h.services.metrics);
    let record = h.finish();
    assert_eq!((record.status, record.datapath), (405, ""));
    assert_eq!(
        (metrics.connections_open.get(), metrics.tunnels_open.get()),
        (0, 0)
    );
}

#[test]
fn the_access_line_names_the_request_the_upstream_and_the_time_taken() {
    let mut h = Harness::relaying(false);
    h.now += 2 * SECOND;
    h.event(|c, now, s, out| c.on_drain_deadline(now, s, out));
    let record = h.finish();
    assert_eq!(record.host, "example.com");
    assert_eq!(record.path, "/chat");
    assert_eq!(record.upstream, Some(first_server()));
    assert_eq!(record.duration_ms, 2000);
    assert!(!record.before_request);
}

#[test]
fn a_poll_failure_closes_gracefully_with_its_reason() {
    let mut h = Harness::relaying(false);
    let actions =
        h.event(|c, _, _, out| c.on_poll_failed(Side::Upstream, "Bad file descriptor", out));
    assert!(closes(&actions, false));
    assert_eq!(h.reason(), "poll on Upstream failed: Bad file descriptor");
}
