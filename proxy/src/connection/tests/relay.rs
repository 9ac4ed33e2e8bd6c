//! The userspace relay: backpressure, FINs each way, TLS close ordering, errors, idleness.

use super::*;

fn forward(from: Side) -> Action {
    Action::Forward {
        from,
        budget: RELAY_BUFFER,
    }
}

#[test]
fn a_relayed_tunnel_sends_the_101_first_then_reads_both_sides() {
    let h = Harness::relaying(false);
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
    assert_eq!(h.services.metrics.tunnels_opened.get(), 1);
    assert_eq!(h.services.metrics.tunnels_open.get(), 1);
}

#[test]
fn bytes_the_client_pipelined_go_upstream_before_anything_it_sends_later() {
    let mut h = Harness::accept(DataPath::Relay, false);
    let mut bytes = REQUEST.to_vec();
    bytes.extend_from_slice(b"\x81\x02hi");
    h.client_sends(&bytes);
    h.connected();
    h.sent(Side::Upstream);
    let actions = h.upstream_sends(UPGRADED);
    assert_eq!(actions[1], Action::Send(Side::Client, UPGRADED.to_vec()));
    assert_eq!(
        actions[2],
        Action::Send(Side::Upstream, b"\x81\x02hi".to_vec())
    );
    assert_eq!(
        actions.len(),
        3,
        "nothing is read while both sides are being written"
    );
}

#[test]
fn a_direction_reads_its_next_chunk_only_once_the_previous_one_is_written() {
    let mut h = Harness::relaying(false);
    h.event(|c, now, s, _| c.on_forwarded(Side::Client, &[0; 1000], true, now, s));
    // The source is readable again, but its destination is busy: nothing is read.
    assert_eq!(
        h.event(|c, _, s, out| c.on_readable(Side::Client, s, out)),
        vec![]
    );
    assert_eq!(h.sent(Side::Upstream), vec![forward(Side::Client)]);
}

#[test]
fn a_source_with_nothing_to_read_is_read_again_when_it_becomes_readable() {
    let mut h = Harness::relaying(false);
    assert_eq!(
        h.event(|c, _, s, out| c.on_readable(Side::Upstream, s, out)),
        vec![forward(Side::Upstream)]
    );
}

#[test]
fn a_fin_from_the_client_is_passed_upstream_and_the_other_direction_keeps_flowing() {
    let mut h = Harness::relaying(false);
    let actions = h.event(|c, _, _, out| c.on_source_eof(Side::Client, out));
    assert_eq!(actions, vec![Action::ShutdownWrite(Side::Upstream)]);
    assert!(!h.conn.is_closing());
    h.event(|c, now, s, _| c.on_forwarded(Side::Upstream, &[0; 10], false, now, s));
    assert_eq!(h.sent(Side::Client), vec![forward(Side::Upstream)]);
}

#[test]
fn a_source_drained_by_its_last_read_is_not_read_again_until_it_is_readable() {
    let mut h = Harness::relaying(false);
    // The read took less than it could: the socket had nothing more.
    h.event(|c, now, s, _| c.on_forwarded(Side::Upstream, &[0; 10], true, now, s));
    assert_eq!(
        h.sent(Side::Client),
        vec![Action::AwaitReadable(Side::Upstream)]
    );
    assert_eq!(
        h.event(|c, _, s, out| c.on_readable(Side::Upstream, s, out)),
        vec![forward(Side::Upstream)]
    );
    // A full read may have left more: read again at once.
    h.event(|c, now, s, _| c.on_forwarded(Side::Upstream, &[0; RELAY_BUFFER], false, now, s));
    assert_eq!(h.sent(Side::Client), vec![forward(Side::Upstream)]);
}

#[test]
fn a_fin_from_the_upstream_is_passed_to_the_client_and_both_fins_close_gracefully() {
    let mut h = Harness::relaying(false);
    assert_eq!(
        h.event(|c, _, _, out| c.on_source_eof(Side::Upstream, out)),
        vec![Action::ShutdownWrite(Side::Client)]
    );
    let actions = h.event(|c, _, _, out| c.on_source_eof(Side::Client, out));
    assert_eq!(actions[0], Action::ShutdownWrite(Side::Upstream));
    assert!(closes(&actions, false));
    assert_eq!(h.reason(), "both sides closed");
}

#[test]
fn a_tls_client_gets_close_notify_before_its_fin() {
    let mut h = Harness::relaying(true);
    assert_eq!(
        h.event(|c, _, _, out| c.on_source_eof(Side::Upstream, out)),
        vec![Action::CloseNotify]
    );
    // Once close_notify is out, the FIN follows.
    assert_eq!(
        h.sent(Side::Client),
        vec![Action::ShutdownWrite(Side::Client)]
    );
}

#[test]
fn a_read_reset_closes_abortively_and_other_read_errors_gracefully() {
    let mut reset = Harness::relaying(false);
    let actions = reset.event(|c, _, _, out| {
        c.on_source_failed(Side::Client, "Connection reset by peer", true, out)
    });
    assert!(closes(&actions, true));
    assert!(reset.reason().starts_with("read from Client failed"));
    let mut other = Harness::relaying(false);
    let actions =
        other.event(|c, _, _, out| c.on_source_failed(Side::Upstream, "I/O error", false, out));
    assert!(closes(&actions, false));
}

#[test]
fn a_send_that_fails_with_a_reset_resets_the_other_side_too() {
    let mut h = Harness::relaying(false);
    h.event(|c, now, s, _| c.on_forwarded(Side::Upstream, &[0; 10], true, now, s));
    let actions = h.event(|c, _, _, out| c.on_send_failed(Side::Client, "Broken pipe", true, out));
    assert!(closes(&actions, true));
    assert_eq!(h.reason(), "send to Client failed: Broken pipe");
}

#[test]
fn an_idle_tunnel_is_closed_at_its_idle_timeout_and_counted() {
    let mut h = Harness::relaying(false);
    let opened = h.now;
    assert!(closes(&h.deadline(opened + IDLE), false));
    assert_eq!(h.reason(), "idle timeout (60000 ms without traffic)");
    assert_eq!(h.services.metrics.idle_timeouts.get(), 1);
}

#[test]
fn a_reload_gives_an_open_tunnel_its_routes_new_idle_timeout() {
    let reloaded = |idle: &str| {
        let text = format!(
            "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]\nupstream = \"default\"\n\n\
             [upstream.default]\nservers = [\"127.0.0.1:9001\"]\n[timeouts]\nidle = \"{idle}\"\n"
        );
        Services::new(&Config::parse(&text).unwrap(), None)
    };
    // Shorter: checked at once, and the tunnel is idle by the new measure.
    let mut h = Harness::relaying(false);
    let opened = h.now;
    h.now = opened + 20 * SECOND;
    let next = reloaded("10s");
    let actions = h.event(|c, now, s, out| c.on_reload(s, &next, now, out));
    assert_eq!(actions, vec![Action::ArmDeadline(opened + 20 * SECOND)]);
    assert!(closes(&h.deadline(opened + 20 * SECOND), false));
    assert_eq!(h.reason(), "idle timeout (10000 ms without traffic)");

    // Longer: nothing at once; the old deadline finds the tunnel not idle yet and re-arms.
    let mut h = Harness::relaying(false);
    let opened = h.now;
    let next = reloaded("5m");
    assert!(h
        .event(|c, now, s, out| c.on_reload(s, &next, now, out))
        .is_empty());
    assert_eq!(
        h.deadline(opened + IDLE),
        vec![Action::ArmDeadline(opened + 300 * SECOND)]
    );
    assert!(!h.conn.is_closing());
}

#[test]
fn traffic_moves_the_idle_deadline() {
    let mut h = Harness::relaying(false);
    let opened = h.now;
    h.now = opened + 30 * SECOND;
    h.event(|c, now, s, _| c.on_forwarded(Side::Client, &[0; 5], true, now, s));
    assert_eq!(
        h.deadline(opened + IDLE),
        vec![Action::ArmDeadline(opened + 30 * SECOND + IDLE)]
    );
    assert!(!h.conn.is_closing());
}

#[test]
fn relayed_bytes_are_counted_each_way_for_the_access_line() {
    let mut h = Harness::relaying(false);
    h.event(|c, now, s, _| c.on_forwarded(Side::Client, &[0; 100], true, now, s));
    h.event(|c, now, s, _| c.on_forwarded(Side::Upstream, &[0; 250], true, now, s));
    assert_eq!(h.services.metrics.relayed_bytes_userspace.get(), 350);
    h.event(|c, now, s, out| c.on_drain_deadline(now, s, out));
    let record = h.finish();
    assert_eq!(
        (record.bytes_up, record.bytes_down),
        (100, UPGRADED.len() as u64 + 250)
    );
    assert_eq!((record.status, record.datapath), (101, "userspace"));
}

#[test]
fn a_broken_tls_stream_mid_tunnel_is_passed_on_as_a_reset() {
    let mut h = Harness::relaying(true);
    let actions = h.event(|c, _, s, out| {
        c.on_tls_failed(false, "TLS stream failed: bad record".into(), s, out)
    });
    assert!(closes(&actions, true));
    assert_eq!(
        h.services.metrics.tls_failures.get(),
        0,
        "counted only during handshakes"
    );
}

#[test]
fn a_broken_tls_handshake_closes_gracefully_and_is_counted() {
    let mut h = Harness::accept(DataPath::Relay, true);
    let actions = h.event(|c, _, s, out| {
        c.on_tls_failed(
            true,
            "plain HTTP sent to a TLS port (answered 400)".into(),
            s,
            out,
        )
    });
    assert!(closes(&actions, false));
    assert_eq!(h.services.metrics.tls_failures.get(), 1);
}
