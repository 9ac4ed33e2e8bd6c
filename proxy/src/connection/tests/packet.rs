//! The packet path (`DataPath::Packet`): a relayed tunnel asks for the packet splice at its
//! first quiet moment; afterwards the connection is a socketless record that the flows'
//! reports retire (closed for the linger time, or idle).

use super::*;
use crate::connection::{FlowReport, PacketRefusal};

fn waiting(h: &mut Harness, source: Side) -> Vec<Action> {
    h.event(|c, now, s, out| c.on_source_waiting(source, now, s, out))
}

fn result(h: &mut Harness, result: Result<(), PacketRefusal>) -> Vec<Action> {
    h.event(|c, now, s, out| c.on_packet_splice_result(result, now, s, out))
}

fn report(h: &mut Harness, at: u64, report: Option<FlowReport>) -> Vec<Action> {
    h.now = at;
    h.event(|c, now, s, out| c.on_packet_deadline(now, report, s, out))
}

/// A tunnel on the relay with the packet path, both sources waiting: it asks for the splice.
fn asking() -> Harness {
    let mut h = Harness::relaying_on(DataPath::Packet, false, IDLE);
    assert_eq!(
        waiting(&mut h, Side::Client),
        vec![],
        "the upstream's read is pending"
    );
    assert_eq!(waiting(&mut h, Side::Upstream), vec![Action::PacketSplice]);
    h
}

fn spliced() -> Harness {
    let mut h = asking();
    let now = h.now;
    assert_eq!(
        result(&mut h, Ok(())),
        vec![Action::ArmDeadline(now + SECOND)],
        "looked at again within a second"
    );
    assert!(matches!(h.conn.stage(), Stage::PacketSpliced(_)));
    h
}

#[test]
fn the_first_quiet_moment_hands_the_tunnel_over_and_counts_it() {
    let h = spliced();
    let metrics = &h.services.metrics;
    assert_eq!(metrics.tunnels_packet_spliced.get(), 1);
    assert_eq!(metrics.tunnels_packet_open.get(), 1);
    assert_eq!(metrics.tunnels_open.get(), 1);
}

#[test]
fn closed_flows_are_retired_after_the_linger_time_with_the_bytes_they_carried() {
    let mut h = spliced();
    let closed = h.now + 5 * SECOND;
    let flows = FlowReport {
        last_ns: closed,
        closed_ns: closed,
        reset: false,
        bytes: (100, 2000),
    };
    // The test services have no packet path: linger 0, retired at the first look.
    let actions = report(&mut h, closed + 1, Some(flows));
    assert!(closes(&actions, false), "{actions:?}");
    assert_eq!(h.reason(), "both ends closed (packet path)");
    let record = h.finish();
    // Down: the 101 the relay delivered, then what the program translated.
    assert_eq!(
        (
            record.datapath,
            record.status,
            record.bytes_up,
            record.bytes_down
        ),
        ("packet", 101, 100, UPGRADED.len() as u64 + 2000)
    );
}

#[test]
fn a_reset_is_named_as_such() {
    let mut h = spliced();
    let at = h.now + SECOND;
    let flows = FlowReport {
        last_ns: at,
        closed_ns: at,
        reset: true,
        bytes: (0, 0),
    };
    assert!(closes(&report(&mut h, at, Some(flows)), false));
    assert_eq!(h.reason(), "reset (packet path)");
    let metrics = std::sync::Arc::clone(&h.services.metrics);
    h.finish();
    assert_eq!(metrics.tunnels_packet_open.get(), 0);
}

#[test]
fn traffic_moves_the_idle_deadline_and_silence_ends_the_tunnel() {
    let mut h = spliced();
    let start = h.now;
    let busy = FlowReport {
        last_ns: start + 30 * SECOND,
        ..FlowReport::default()
    };
    // Active 30 s ago... at 40 s: look again in a second (before the idle deadline at 90 s).
    let at = start + 40 * SECOND;
    assert_eq!(
        report(&mut h, at, Some(busy)),
        vec![Action::ArmDeadline(at + SECOND)]
    );
    // Idle since 30 s: at 90 s it is over.
    let actions = report(&mut h, start + 30 * SECOND + IDLE, Some(busy));
    assert!(closes(&actions, false), "{actions:?}");
    assert_eq!(h.reason(), "idle timeout (packet path)");
    assert_eq!(h.services.metrics.idle_timeouts.get(), 1);
}

#[test]
fn flows_that_vanished_end_the_record() {
    let mut h = spliced();
    let at = h.now + SECOND;
    assert!(closes(&report(&mut h, at, None), false));
    assert_eq!(h.reason(), "the packet splice's flows are gone");
}

#[test]
fn sockets_that_are_not_quiet_yet_are_tried_again_shortly_then_left_on_the_relay() {
    let mut h = asking();
    let now = h.now;
    let not_quiet = || PacketRefusal::NotQuiet("bytes in flight".into());
    assert_eq!(
        result(&mut h, Err(not_quiet())),
        vec![Action::ArmDeadline(now + 20_000_000)]
    );
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
    // The reminder fires: still quiet in userspace, so it asks again.
    assert_eq!(h.deadline(now + 20_000_000), vec![Action::PacketSplice]);
    for _ in 1..49 {
        result(&mut h, Err(not_quiet()));
    }
    // The fiftieth time: it stays on the relay, counted.
    assert_eq!(result(&mut h, Err(not_quiet())), vec![]);
    assert_eq!(h.services.metrics.packet_refusals.get("not_quiet"), 1);
    let later = h.deadline(h.now + SECOND);
    assert!(!later.contains(&Action::PacketSplice), "{later:?}");
}

#[test]
fn an_ineligible_tunnel_stays_on_the_relay_for_good_and_the_reason_is_counted() {
    let mut h = asking();
    let refusal = PacketRefusal::Ineligible {
        label: "no_sack",
        reason: "the client connection did not negotiate SACK".into(),
    };
    result(&mut h, Err(refusal));
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
    assert_eq!(h.services.metrics.packet_refusals.get("no_sack"), 1);
    // Quiet again later: no second attempt.
    assert_eq!(waiting(&mut h, Side::Upstream), vec![]);
    assert_eq!(h.services.metrics.tunnels_packet_spliced.get(), 0);
}

#[test]
fn spliced_tunnels_are_looked_at_a_third_of_the_linger_apart_within_one_to_ten_seconds() {
    use crate::connection::packet::check_ns;
    const S: u64 = 1_000_000_000;
    // The default linger (30 s): every 10 s, so 200,000 idle tunnels cost 40,000 map lookups a
    // second, not 400,000.
    assert_eq!(check_ns(30 * S), 10 * S);
    assert_eq!(check_ns(600 * S), 10 * S);
    assert_eq!(check_ns(6 * S), 2 * S);
    // A short linger still waits a second between looks.
    assert_eq!(check_ns(S), S);
    assert_eq!(check_ns(0), S);
}

#[test]
fn closed_flows_linger_unless_the_proxy_is_shutting_down() {
    use crate::connection::packet::retire_at;
    const S: u64 = 1_000_000_000;
    assert_eq!(retire_at(100 * S, 30 * S, false), 130 * S);
    assert_eq!(retire_at(100 * S, 30 * S, true), 100 * S);
}

#[test]
fn the_drain_looks_at_a_spliced_tunnel_at_once() {
    let mut h = spliced();
    // Its closed flows would otherwise linger and hold the process's exit up.
    let actions = h.event(|c, _, _, out| c.on_drain_start(out));
    assert_eq!(actions, vec![Action::ArmDeadline(0)]);
    let at = h.now + SECOND;
    let flows = FlowReport {
        last_ns: at,
        closed_ns: at,
        reset: false,
        bytes: (0, 0),
    };
    assert!(closes(&report(&mut h, at, Some(flows)), false));
    assert_eq!(h.reason(), "both ends closed (packet path)");
}
