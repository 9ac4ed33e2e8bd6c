//! Binary upgrade: which tunnels may move to a successor, and the tunnel the successor
//! rebuilds from the record behaves as the one that left (same access-line id, counts, idle
//! deadline, and it waits on both sockets as the old one did).

use super::*;

fn waiting(h: &mut Harness, source: Side) -> Vec<Action> {
    h.event(|c, now, s, out| c.on_source_waiting(source, now, s, out))
}

fn forwarded(h: &mut Harness, source: Side, count: usize) {
    h.event(|c, now, s, _| c.on_forwarded(source, &vec![0; count], true, now, s));
}

#[test]
fn where_the_frames_stand_moves_with_the_tunnel() {
    let mut old = Harness::relaying(false);
    // 3 bytes of a 10-byte frame from the client, then a quiet moment.
    old.event(|c, now, s, _| c.on_forwarded(Side::Client, b"\x82\x0aabc", true, now, s));
    old.sent(Side::Upstream);
    forwarded(&mut old, Side::Upstream, 2);
    old.sent(Side::Client);
    waiting(&mut old, Side::Client);
    waiting(&mut old, Side::Upstream);
    let tunnel = old.conn.hand_over(&old.services).expect("a record");
    let (mut new, _) = adopt(&tunnel, DataPath::Relay);
    // Saying goodbye in the successor: the client's frame is finished first.
    let actions = new.event(|c, now, s, out| c.on_drain_deadline(now, s, out));
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Send(Side::Upstream, _))),
        "{actions:?}"
    );
    assert_eq!(
        new.event(|c, _, s, out| c.on_readable(Side::Client, s, out)),
        vec![Action::Forward {
            from: Side::Client,
            budget: 7
        }]
    );
}

/// A relayed tunnel that moved 5 bytes each way and now waits for both sources.
fn quiet_relay() -> Harness {
    let mut h = Harness::relaying(false);
    forwarded(&mut h, Side::Client, 5);
    h.sent(Side::Upstream);
    forwarded(&mut h, Side::Upstream, 7);
    h.sent(Side::Client);
    waiting(&mut h, Side::Client);
    waiting(&mut h, Side::Upstream);
    h
}

/// The successor's side: the record rebuilt into a connection with id 99.
fn adopt(tunnel: &HandedTunnel, datapath: DataPath) -> (Harness, Vec<Action>) {
    let mut h = Harness::accept(datapath, false);
    let mut out = Actions::new();
    h.conn = Connection::adopt(99, tunnel, datapath, &h.services, &mut out);
    (h, out.into_iter().collect())
}

#[test]
fn a_relayed_tunnel_moves_only_when_both_directions_wait_with_nothing_held() {
    let mut h = Harness::relaying(false);
    assert!(!h.conn.can_hand_over(true), "reads are pending");
    forwarded(&mut h, Side::Client, 5);
    h.sent(Side::Upstream);
    waiting(&mut h, Side::Client);
    assert!(
        !h.conn.can_hand_over(true),
        "the upstream is still being read"
    );
    forwarded(&mut h, Side::Upstream, 7);
    assert!(
        !h.conn.can_hand_over(true),
        "bytes are being written to the client"
    );
    h.sent(Side::Client);
    waiting(&mut h, Side::Upstream);
    assert!(h.conn.can_hand_over(true));
    assert!(
        h.conn.can_hand_over(false),
        "relayed tunnels need no kernel maps"
    );
}

#[test]
fn tls_half_closed_and_unfinished_connections_stay() {
    assert!(!Harness::relaying(true).conn.can_hand_over(true), "TLS");
    assert!(!Harness::upstream_asked(DataPath::Relay, false)
        .conn
        .can_hand_over(true));
    let mut h = quiet_relay();
    h.event(|c, _, _, out| c.on_source_eof(Side::Client, out));
    assert!(!h.conn.can_hand_over(true), "the client sent its FIN");
}

#[test]
fn a_spliced_tunnel_moves_when_the_successor_adopted_the_maps() {
    let h = Harness::spliced();
    assert!(h.conn.can_hand_over(true));
    assert!(!h.conn.can_hand_over(false));
}

#[test]
fn the_successor_rebuilds_a_relayed_tunnel_that_waits_on_both_sockets() {
    let mut old = quiet_relay();
    old.now += 3 * SECOND;
    let tunnel = old.conn.hand_over(&old.services).expect("a record");
    let (log_id, moved_at) = (old.conn.log_id, old.now);
    let left = old.conn.handed_over(old.now, &old.services);
    assert_eq!(left.reason, HANDED_OVER);
    // Down: the 101, then 7 bytes.
    let down = UPGRADED.len() as u64 + 7;
    assert_eq!(
        (left.bytes_up, left.bytes_down, left.status),
        (5, down, 101)
    );
    assert_eq!(left.id, log_id);
    assert_eq!(
        old.services.metrics.tunnels_open.get(),
        0,
        "counted out here"
    );
    assert_eq!(old.services.metrics.tunnels_handed_over.get(), 1);

    let (mut new, actions) = adopt(&tunnel, DataPath::Relay);
    let last_activity = SECOND; // the harness's clock did not move while relaying
    assert_eq!(
        actions,
        vec![
            Action::ArmDeadline(last_activity + IDLE),
            Action::AwaitReadable(Side::Client),
            Action::AwaitReadable(Side::Upstream),
        ]
    );
    assert_eq!(
        new.services.metrics.tunnels_open.get(),
        1,
        "counted in there"
    );
    assert_eq!(new.services.metrics.tunnels_adopted.get(), 1);
    assert!(
        new.conn.can_hand_over(true),
        "it can move on again at the next upgrade"
    );
    // It relays on: the client's next bytes go to the upstream.
    assert_eq!(
        new.event(|c, _, s, out| c.on_readable(Side::Client, s, out)),
        vec![Action::Forward {
            from: Side::Client,
            budget: RELAY_BUFFER
        }]
    );
    forwarded(&mut new, Side::Client, 3);
    new.now = moved_at + SECOND;
    let record = new.finish();
    assert_eq!(record.id, log_id, "the same id in both processes");
    assert_eq!((record.bytes_up, record.bytes_down), (8, down));
    assert_eq!(
        (record.host.as_str(), record.path.as_str()),
        ("example.com", "/chat")
    );
    // Accepted at 1 s, moved at 4 s, closed at 5 s.
    assert_eq!(record.duration_ms, 4_000, "from the first accept");
}

#[test]
fn the_successor_rebuilds_a_spliced_tunnel_with_its_idle_deadline() {
    let old = Harness::spliced();
    let since = old.now;
    let tunnel = old.conn.hand_over(&old.services).expect("a record");
    let (mut new, actions) = adopt(&tunnel, DataPath::Splice);
    assert_eq!(
        actions,
        vec![
            Action::ArmDeadline(since + IDLE),
            Action::WatchSpliced(Side::Client),
            Action::WatchSpliced(Side::Upstream),
        ]
    );
    assert_eq!(new.services.metrics.tunnels_spliced_open.get(), 1);
    // The program moved a byte 10 s in: the deadline follows it, as before the move.
    new.now = since + IDLE;
    let later =
        new.event(|c, now, s, out| c.on_deadline(now, Some(since + 10 * SECOND), false, s, out));
    assert_eq!(later, vec![Action::ArmDeadline(since + 10 * SECOND + IDLE)]);
    let closed = new.event(|c, _, s, out| {
        c.on_deadline(
            since + 11 * SECOND + IDLE,
            Some(since + 10 * SECOND),
            false,
            s,
            out,
        )
    });
    assert!(closes(&closed, false), "{closed:?}");
    assert!(new.reason().starts_with("idle timeout"), "{}", new.reason());
}

#[test]
fn a_record_survives_the_wire_and_keeps_its_route_by_what_it_matched() {
    let old = quiet_relay();
    let tunnel = old.conn.hand_over(&old.services).expect("a record");
    let text = serde_json::to_string(&tunnel).expect("serializes");
    let back: HandedTunnel = serde_json::from_str(&text).expect("parses");
    assert_eq!(back, tunnel);
    assert_eq!(back.route, Some((None, None)));
    let (new, _) = adopt(&back, DataPath::Relay);
    assert_eq!(new.conn.summary.route, Some(0));
}
