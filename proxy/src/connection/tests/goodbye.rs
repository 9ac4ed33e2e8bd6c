//! The drain's goodbye: each side gets a Close 1001 at a frame boundary, then a FIN; a frame
//! in flight is passed on whole first; what comes after the boundary is read and dropped; the
//! tunnel closes once both sides ended (or the goodbye's deadline passed).

use super::*;
use crate::connection::goodbye::GOODBYE_NS;

fn forwarded(h: &mut Harness, source: Side, bytes: &[u8]) {
    h.event(|c, now, s, _| c.on_forwarded(source, bytes, true, now, s));
}

fn drain_deadline(h: &mut Harness) -> Vec<Action> {
    h.event(|c, now, s, out| c.on_drain_deadline(now, s, out))
}

/// The status code of a Close frame (unmasking it if masked).
fn close_code(frame: &[u8]) -> u16 {
    assert_eq!(frame[0], 0x88, "a final Close frame: {frame:?}");
    let (key, payload) = if frame[1] & 0x80 != 0 {
        (Some(&frame[2..6]), &frame[6..])
    } else {
        (None, &frame[2..])
    };
    assert_eq!(usize::from(frame[1] & 0x7f), payload.len());
    let byte = |i: usize| payload[i] ^ key.map_or(0, |key| key[i % 4]);
    u16::from_be_bytes([byte(0), byte(1)])
}

/// The Close frame sent to `side` among `actions`.
fn close_to(actions: &[Action], side: Side) -> Option<u16> {
    actions.iter().find_map(|action| match action {
        Action::Send(to, bytes) if *to == side => Some(close_code(bytes)),
        _ => None,
    })
}

/// A relayed tunnel whose sources both wait, between frames.
fn quiet() -> Harness {
    let mut h = Harness::relaying(false);
    forwarded(&mut h, Side::Client, b"\x81\x82abcd\x01\x02");
    h.sent(Side::Upstream);
    forwarded(&mut h, Side::Upstream, b"\x81\x02hi");
    h.sent(Side::Client);
    h
}

#[test]
fn both_sides_get_a_close_1001_then_a_fin_and_the_tunnel_closes_once_both_ended() {
    let mut h = quiet();
    let actions = drain_deadline(&mut h);
    assert_eq!(actions[0], Action::ArmDeadline(h.now + GOODBYE_NS));
    assert_eq!(close_to(&actions, Side::Client), Some(1001));
    assert_eq!(close_to(&actions, Side::Upstream), Some(1001));
    let Some(Action::Send(_, to_upstream)) = actions.last() else {
        panic!("{actions:?}");
    };
    assert_eq!(to_upstream[1] & 0x80, 0x80, "masked towards the server");
    // Each Close is followed by a FIN, and what its peer sends is read to its end.
    assert_eq!(
        h.sent(Side::Client),
        vec![
            Action::ShutdownWrite(Side::Client),
            Action::Read(Side::Upstream)
        ]
    );
    assert_eq!(
        h.sent(Side::Upstream),
        vec![
            Action::ShutdownWrite(Side::Upstream),
            Action::Read(Side::Client)
        ]
    );
    // The client's own Close in reply is dropped, not relayed.
    assert_eq!(
        h.client_sends(b"\x88\x82abcd\x62\xeb"),
        vec![Action::Read(Side::Client)]
    );
    assert_eq!(h.read_end(Side::Client), vec![]);
    assert!(closes(&h.read_end(Side::Upstream), false));
    assert_eq!(
        h.reason(),
        "drain deadline reached; said goodbye (Close 1001) to both sides"
    );
}

#[test]
fn a_frame_in_flight_is_passed_on_whole_before_the_close() {
    let mut h = quiet();
    // The client sent 3 bytes of a frame of 10; the rest is still on its way.
    forwarded(&mut h, Side::Client, b"\x82\x0aabc");
    let actions = drain_deadline(&mut h);
    assert_eq!(
        close_to(&actions, Side::Client),
        Some(1001),
        "the other way is between frames"
    );
    assert_eq!(
        close_to(&actions, Side::Upstream),
        None,
        "not in the middle of a frame"
    );
    // Once those 3 bytes are written, the relay reads no more than the frame's last 7.
    assert_eq!(
        h.sent(Side::Upstream),
        vec![Action::AwaitReadable(Side::Client)]
    );
    assert_eq!(
        h.event(|c, _, s, out| c.on_readable(Side::Client, s, out)),
        vec![Action::Forward {
            from: Side::Client,
            budget: 7
        }]
    );
    forwarded(&mut h, Side::Client, b"defghij");
    let actions = h.sent(Side::Upstream);
    assert_eq!(close_to(&actions, Side::Upstream), Some(1001));
}

#[test]
fn a_tls_client_gets_close_notify_between_the_close_frame_and_the_fin() {
    let mut h = Harness::relaying(true);
    forwarded(&mut h, Side::Upstream, b"\x81\x00");
    h.sent(Side::Client);
    forwarded(&mut h, Side::Client, b"\x81\x80abcd");
    h.sent(Side::Upstream);
    let actions = drain_deadline(&mut h);
    assert_eq!(close_to(&actions, Side::Client), Some(1001));
    assert_eq!(h.sent(Side::Client), vec![Action::CloseNotify]);
    assert_eq!(
        h.sent(Side::Client),
        vec![
            Action::ShutdownWrite(Side::Client),
            Action::Read(Side::Upstream)
        ]
    );
}

#[test]
fn a_goodbye_that_takes_too_long_ends_in_a_plain_close() {
    let mut h = quiet();
    forwarded(&mut h, Side::Client, b"\x82\x7e\x10\x00");
    let start = h.now;
    drain_deadline(&mut h);
    assert!(closes(&h.deadline(start + GOODBYE_NS), false));
    assert_eq!(
        h.reason(),
        "drain deadline reached; the goodbye took too long"
    );
    assert_eq!(
        h.services.metrics.drain_goodbyes.get(),
        0,
        "not a goodbye that went through"
    );
}

#[test]
fn a_spliced_tunnel_leaves_the_kernel_to_say_goodbye() {
    let mut h = Harness::spliced();
    assert_eq!(drain_deadline(&mut h), vec![Action::PauseSplice]);
    assert!(!h.conn.is_closing());
}

#[test]
fn rebalancing_says_goodbye_with_1012_and_counts_the_tunnel_moved() {
    let mut h = quiet();
    assert!(h.conn.is_open_tunnel());
    let actions = h.event(|c, now, s, out| {
        assert!(c.rebalance(now, s, out));
    });
    assert_eq!(close_to(&actions, Side::Client), Some(1012));
    assert_eq!(close_to(&actions, Side::Upstream), Some(1012));
    assert!(!h.conn.is_open_tunnel(), "saying goodbye: not moved twice");
    assert!(!h
        .event(|c, now, s, out| assert!(!c.rebalance(now, s, out)))
        .iter()
        .any(|a| matches!(a, Action::Send(..))));
    h.sent(Side::Client);
    h.sent(Side::Upstream);
    h.read_end(Side::Client);
    assert!(closes(&h.read_end(Side::Upstream), false));
    assert!(h.reason().contains("rebalancing"), "{}", h.reason());
    assert!(h.reason().contains("Close 1012"), "{}", h.reason());
    assert_eq!(h.services.metrics.tunnels_rebalanced.get(), 1);
    assert_eq!(h.services.metrics.drain_goodbyes.get(), 0);
}

#[test]
fn a_request_is_not_rebalanced() {
    let mut h = Harness::accept(DataPath::Relay, false);
    assert!(!h.conn.is_open_tunnel());
    assert_eq!(
        h.event(|c, now, s, out| assert!(!c.rebalance(now, s, out))),
        vec![]
    );
}
