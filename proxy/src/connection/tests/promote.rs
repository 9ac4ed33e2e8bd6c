//! Promotion (`DataPath::Promote`): a relayed tunnel moves to the kernel once it is due (open
//! `kernel.promote_after`, 1 s in the test config, or 1 MiB relayed) and only at a quiet moment;
//! a failed hand-off leaves it relaying where it stopped.

use super::*;

const PROMOTE_AFTER: u64 = SECOND;

fn waiting(h: &mut Harness, source: Side) -> Vec<Action> {
    h.event(|c, now, s, out| c.on_source_waiting(source, now, s, out))
}

fn forwarded(h: &mut Harness, source: Side, count: usize, drained: bool) -> Vec<Action> {
    h.event(|c, now, s, _| c.on_forwarded(source, &vec![0; count], drained, now, s))
}

fn splice_result(h: &mut Harness, result: Result<(), String>) -> Vec<Action> {
    h.event(|c, now, s, out| c.on_splice_result(result, now, s, out))
}

fn forward(from: Side) -> Action {
    Action::Forward {
        from,
        budget: RELAY_BUFFER,
    }
}

/// A plain tunnel on the relay with promotion on: 101 delivered, both sources being read, the
/// first reminder at the moment it becomes due.
fn relaying() -> Harness {
    Harness::relaying_on(DataPath::Promote, false, PROMOTE_AFTER)
}

fn spliced_actions(now: u64) -> Vec<Action> {
    vec![
        Action::ArmDeadline(now + IDLE),
        Action::WatchSpliced(Side::Client),
        Action::WatchSpliced(Side::Upstream),
    ]
}

#[test]
fn an_idle_tunnel_is_promoted_when_it_becomes_due_and_counted_once() {
    let mut h = relaying();
    let opened = h.now;
    assert_eq!(waiting(&mut h, Side::Client), vec![]);
    assert_eq!(waiting(&mut h, Side::Upstream), vec![], "not due yet");
    assert_eq!(
        h.deadline(opened + PROMOTE_AFTER),
        vec![Action::Splice { bridged: true }]
    );
    assert!(matches!(h.conn.stage(), Stage::Promoting(_)));
    assert_eq!(splice_result(&mut h, Ok(())), spliced_actions(h.now));
    assert!(matches!(h.conn.stage(), Stage::Spliced(_)));
    let metrics = &h.services.metrics;
    assert_eq!(
        (
            metrics.tunnels_opened.get(),
            metrics.tunnels_open.get(),
            metrics.tunnels_spliced.get(),
            metrics.tunnels_promoted.get()
        ),
        (1, 1, 1, 1)
    );
    assert_eq!(metrics.tunnels_spliced_open.get(), 1);
}

#[test]
fn a_busy_tunnel_waits_for_a_moment_with_nothing_half_read_or_in_flight() {
    let mut h = relaying();
    assert_eq!(waiting(&mut h, Side::Client), vec![]);
    // The upstream streams: a full buffer may have left a segment half-read.
    forwarded(&mut h, Side::Upstream, RELAY_BUFFER, false);
    // Due now, but a chunk is in flight to the client: the reminder re-arms for idleness.
    let due = h.now + PROMOTE_AFTER;
    assert_eq!(
        h.deadline(due),
        vec![Action::ArmDeadline(due + IDLE - SECOND)]
    );
    // Written; the last read filled its buffer, so read again rather than hand over.
    assert_eq!(h.sent(Side::Client), vec![forward(Side::Upstream)]);
    // A short read took everything queued; once it is written, nothing is held anywhere.
    forwarded(&mut h, Side::Upstream, 100, true);
    assert_eq!(h.sent(Side::Client), vec![Action::Splice { bridged: true }]);
    assert_eq!(splice_result(&mut h, Ok(())), spliced_actions(h.now));
}

#[test]
fn a_read_pending_on_the_other_side_holds_the_promotion_back() {
    let mut h = relaying();
    h.now += PROMOTE_AFTER;
    // The client's source was asked for (Forward queued) and has not reported back.
    assert_eq!(waiting(&mut h, Side::Upstream), vec![]);
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
    // It reports: nothing to read. Now both sides wait, and the tunnel goes.
    assert_eq!(
        waiting(&mut h, Side::Client),
        vec![Action::Splice { bridged: true }]
    );
}

#[test]
fn a_tunnel_that_moved_enough_bytes_is_promoted_before_its_time() {
    let mut h = relaying();
    assert_eq!(waiting(&mut h, Side::Client), vec![]);
    for _ in 0..16 {
        forwarded(&mut h, Side::Upstream, RELAY_BUFFER, false);
        assert_eq!(h.sent(Side::Client), vec![forward(Side::Upstream)]);
    }
    // 1 MiB relayed, well before 1 s: the next quiet moment hands it over.
    assert_eq!(
        waiting(&mut h, Side::Upstream),
        vec![Action::Splice { bridged: true }]
    );
}

#[test]
fn a_failed_promotion_relays_on_from_where_it_stopped_and_is_not_retried() {
    let mut h = relaying();
    assert_eq!(waiting(&mut h, Side::Client), vec![]);
    forwarded(&mut h, Side::Upstream, 100, true);
    h.now += PROMOTE_AFTER;
    assert_eq!(h.sent(Side::Client), vec![Action::Splice { bridged: true }]);
    // The client side still has its readiness wait armed; the upstream side, drained by its
    // last read, waits for readiness again.
    assert_eq!(
        splice_result(&mut h, Err("sockmap: full".into())),
        vec![Action::AwaitReadable(Side::Upstream)]
    );
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
    assert_eq!(h.services.metrics.kernel_handoff_failures.get(), 1);
    assert_eq!(waiting(&mut h, Side::Upstream), vec![], "never again");
    let record = h.finish();
    assert_eq!((record.status, record.datapath), (101, "userspace"));
}

#[test]
fn a_half_closed_tunnel_stays_in_userspace() {
    let mut h = relaying();
    assert_eq!(waiting(&mut h, Side::Client), vec![]);
    h.event(|c, _, _, out| c.on_source_eof(Side::Upstream, out));
    h.now += PROMOTE_AFTER;
    assert_eq!(waiting(&mut h, Side::Client), vec![]);
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
}

#[test]
fn the_access_line_counts_the_relayed_bytes_and_the_kernel_ones() {
    let mut h = relaying();
    forwarded(&mut h, Side::Client, 10, true);
    h.sent(Side::Upstream);
    forwarded(&mut h, Side::Upstream, 20, true);
    h.now += PROMOTE_AFTER;
    waiting(&mut h, Side::Client);
    let Stage::Relaying(relay) = h.conn.stage() else {
        panic!("still relaying");
    };
    let relayed = (relay.bytes_up(), relay.bytes_down());
    assert_eq!(relayed.0, 10);
    assert_eq!(h.sent(Side::Client), vec![Action::Splice { bridged: true }]);
    splice_result(&mut h, Ok(()));
    let actions = h.event(|c, _, _, out| c.close("test".into(), false, out));
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: false }]
    );
    let counted = Counted {
        up: 1000,
        down: 2000,
        repeated: 0,
        frames: [FrameTracker::at_boundary(); 2],
    };
    h.event(|c, _, s, _| c.on_unspliced(counted, s));
    let metrics = std::sync::Arc::clone(&h.services.metrics);
    let record = h.finish();
    assert_eq!(metrics.tunnels_spliced_open.get(), 0);
    assert_eq!(
        (record.bytes_up, record.bytes_down, record.datapath),
        (1010, relayed.1 + 2000, "kernel")
    );
}

#[test]
fn a_tls_tunnel_is_never_promoted() {
    // Relayed like any TLS tunnel: its reminder is the idle deadline, not a promotion.
    let mut h = Harness::relaying_on(DataPath::Promote, true, IDLE);
    h.now += PROMOTE_AFTER;
    assert_eq!(waiting(&mut h, Side::Client), vec![]);
    assert_eq!(waiting(&mut h, Side::Upstream), vec![]);
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
}
