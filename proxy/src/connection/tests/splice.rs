//! The kernel path: each hand-off outcome, FINs that wait for the kernel, resets, stray bytes,
//! slow consumers, idleness from the program's activity, and the counts for the access line.

use super::*;

fn backlog(bytes: u64, destination_gone: bool) -> Backlog {
    Backlog {
        bytes,
        destination_gone,
    }
}

fn spliced_event(h: &mut Harness, side: Side, event: SplicedEvent) -> Vec<Action> {
    h.event(|c, _, s, out| c.on_spliced_event(side, event, s, out))
}

fn kernel_backlog(h: &mut Harness, towards: Side, backlog: Backlog) -> Vec<Action> {
    h.event(|c, _, _, out| c.on_kernel_backlog(towards, backlog, out))
}

#[test]
fn a_hand_off_with_nothing_early_splices_at_once_and_counts_the_tunnel() {
    let h = Harness::spliced();
    assert!(matches!(h.conn.stage(), Stage::Spliced(_)));
    let metrics = &h.services.metrics;
    assert_eq!(
        (
            metrics.tunnels_opened.get(),
            metrics.tunnels_open.get(),
            metrics.tunnels_spliced.get()
        ),
        (1, 1, 1)
    );
}

#[test]
fn early_client_bytes_go_upstream_in_userspace_before_the_splice() {
    let (mut h, _) = Harness::upgraded_with_early(b"\x81\x01a");
    // The drain found more: it joins the pipelined frame, in order.
    let actions = h.event(|c, now, s, out| c.on_client_drained(b"\x81\x01b", true, now, s, out));
    assert_eq!(
        actions,
        vec![Action::Send(Side::Upstream, b"\x81\x01a\x81\x01b".to_vec())]
    );
    assert_eq!(
        h.sent(Side::Upstream),
        vec![Action::Splice { bridged: false }]
    );
}

#[test]
fn a_hand_off_whose_upstream_never_takes_the_early_bytes_ends_at_the_idle_timeout() {
    let (mut h, actions) = Harness::upgraded_with_early(b"\x81\x01a");
    let upgraded_at = h.now;
    assert!(actions.contains(&Action::ArmDeadline(upgraded_at + IDLE)));
    let actions = h.event(|c, now, s, out| c.on_client_drained(b"", true, now, s, out));
    assert_eq!(
        actions,
        vec![Action::Send(Side::Upstream, b"\x81\x01a".to_vec())]
    );
    // The send never completes. The handshake's own deadline passes first: not yet.
    let actions = h.deadline(upgraded_at + HANDSHAKE);
    assert_eq!(actions, vec![Action::ArmDeadline(upgraded_at + IDLE)]);
    let actions = h.deadline(upgraded_at + IDLE);
    assert!(closes(&actions, false), "{actions:?}");
    assert!(h.reason().starts_with("idle timeout"), "{}", h.reason());
    assert_eq!(h.services.metrics.idle_timeouts.get(), 1);
}

#[test]
fn a_client_that_sent_too_much_before_the_101_is_relayed_in_userspace() {
    let mut h = Harness::upstream_asked(DataPath::Splice, false);
    h.peeked(UPGRADED);
    let early = vec![b'x'; 100];
    let actions = h.event(|c, now, s, out| c.on_client_drained(&early, false, now, s, out));
    assert_eq!(actions[0], Action::UndoPeekMark);
    // The 101 stays queued in the upstream socket: the relay reads it like any byte.
    assert!(actions.contains(&Action::Send(Side::Upstream, early.clone())));
    assert!(actions.contains(&Action::Forward {
        from: Side::Upstream,
        budget: RELAY_BUFFER
    }));
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
}

#[test]
fn a_failed_hand_off_falls_back_to_the_userspace_relay() {
    let mut h = Harness::upstream_asked(DataPath::Splice, false);
    h.peeked(UPGRADED);
    h.event(|c, now, s, out| c.on_client_drained(&[], true, now, s, out));
    let actions =
        h.event(|c, now, s, out| c.on_splice_result(Err("sockmap: full".into()), now, s, out));
    assert_eq!(actions[0], Action::UndoPeekMark);
    assert!(actions.contains(&Action::Forward {
        from: Side::Client,
        budget: RELAY_BUFFER
    }));
    assert_eq!(h.services.metrics.tunnels_spliced.get(), 0);
    assert_eq!(h.services.metrics.tunnels_opened.get(), 1);
}

#[test]
fn a_spurious_wake_up_watches_the_socket_again() {
    let mut h = Harness::spliced();
    assert_eq!(
        spliced_event(&mut h, Side::Client, SplicedEvent::Nothing),
        vec![Action::WatchSpliced(Side::Client)]
    );
}

#[test]
fn a_fin_is_passed_on_once_the_kernel_has_delivered_everything_before_it() {
    let mut h = Harness::spliced();
    assert_eq!(
        spliced_event(&mut h, Side::Client, SplicedEvent::Eof),
        vec![Action::CheckKernelBacklog {
            towards: Side::Upstream,
            next_tick: false
        }]
    );
    // Still bytes on their way: measured again at the next tick, no FIN yet.
    assert_eq!(
        kernel_backlog(&mut h, Side::Upstream, backlog(4096, false)),
        vec![Action::CheckKernelBacklog {
            towards: Side::Upstream,
            next_tick: true
        }]
    );
    assert_eq!(
        kernel_backlog(&mut h, Side::Upstream, backlog(0, false)),
        vec![Action::ShutdownWrite(Side::Upstream)]
    );
    assert!(!h.conn.is_closing(), "the other direction keeps flowing");
}

#[test]
fn a_fin_waiting_for_bytes_towards_a_socket_that_is_gone_resets_the_tunnel() {
    let mut h = Harness::spliced();
    spliced_event(&mut h, Side::Upstream, SplicedEvent::Eof);
    let actions = kernel_backlog(&mut h, Side::Client, backlog(100, true));
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: true }]
    );
    assert_eq!(
        h.reason(),
        "Client connection is gone (reset) with bytes queued"
    );
}

#[test]
fn both_fins_passed_on_close_the_tunnel_after_taking_it_out_of_the_kernel() {
    let mut h = Harness::spliced();
    kernel_backlog(&mut h, Side::Upstream, backlog(0, false));
    let actions = kernel_backlog(&mut h, Side::Client, backlog(0, false));
    assert_eq!(
        actions,
        vec![
            Action::ShutdownWrite(Side::Client),
            Action::Unsplice,
            Action::Close { abortive: false }
        ]
    );
    assert_eq!(h.reason(), "both sides closed");
}

#[test]
fn a_reset_is_passed_on_as_a_reset_and_other_socket_errors_close_gracefully() {
    let mut reset = Harness::spliced();
    let failed = SplicedEvent::Failed {
        reset: true,
        error: "Connection reset by peer".into(),
    };
    let actions = spliced_event(&mut reset, Side::Upstream, failed);
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: true }]
    );
    let mut other = Harness::spliced();
    let failed = SplicedEvent::Failed {
        reset: false,
        error: "Connection timed out".into(),
    };
    assert!(closes(
        &spliced_event(&mut other, Side::Client, failed),
        false
    ));
    assert_eq!(other.reason(), "Client socket failed: Connection timed out");
}

#[test]
fn stray_bytes_on_a_spliced_socket_reset_the_tunnel() {
    let mut h = Harness::spliced();
    let actions = spliced_event(
        &mut h,
        Side::Client,
        SplicedEvent::Stray { diverted: false },
    );
    assert!(closes(&actions, true));
    assert_eq!(
        h.reason(),
        "bytes from Client bypassed the splice (no peer entry)"
    );
}

#[test]
fn bytes_the_program_held_back_reset_the_tunnel_and_are_counted() {
    let mut h = Harness::spliced();
    let actions = spliced_event(
        &mut h,
        Side::Upstream,
        SplicedEvent::Stray { diverted: true },
    );
    assert!(closes(&actions, true));
    assert!(
        h.reason().contains("could not be cut off"),
        "{}",
        h.reason()
    );
    assert_eq!(h.services.metrics.kernel_diverted.get(), 1);
}

#[test]
fn a_reader_too_far_behind_closes_the_tunnel_as_a_slow_consumer() {
    let mut h = Harness::spliced();
    let limit = h.services.kernel_backlog;
    assert_eq!(
        h.event(|c, _, s, out| c.on_pressure(limit, 0, s, out)),
        vec![Action::MeasurePressure]
    );
    let actions = h.event(|c, _, s, out| c.on_pressure(0, limit + 1, s, out));
    assert!(closes(&actions, true));
    assert!(
        h.reason().starts_with("slow consumer: Upstream is"),
        "{}",
        h.reason()
    );
    assert_eq!(h.services.metrics.kernel_slow_consumers.get(), 1);
}

#[test]
fn a_tunnel_with_bytes_queued_is_measured_until_its_reader_caught_up() {
    let mut h = Harness::spliced();
    let gauge = |h: &Harness| h.services.metrics.kernel_backlog_bytes.get();
    let actions = h.event(|c, _, s, out| c.on_pressure(500, 200, s, out));
    assert_eq!(actions, vec![Action::MeasurePressure]);
    assert_eq!(gauge(&h), 700);
    let actions = h.event(|c, _, s, out| c.on_pressure(100, 0, s, out));
    assert_eq!(actions, vec![Action::MeasurePressure]);
    assert_eq!(gauge(&h), 100);
    assert_eq!(h.event(|c, _, s, out| c.on_pressure(0, 0, s, out)), vec![]);
    assert_eq!(gauge(&h), 0);
}

#[test]
fn a_reader_that_adds_to_a_total_backlog_over_the_process_limit_is_closed() {
    let mut h = Harness::spliced();
    let metrics = std::sync::Arc::clone(&h.services.metrics);
    // Other tunnels' readers are already nearly at the process-wide limit.
    let others = h.services.kernel_backlog_total - 1000;
    metrics.kernel_backlog_bytes.replace_share(0, others);
    // Far below the per-tunnel limit, but over the total.
    let actions = h.event(|c, _, s, out| c.on_pressure(0, 4000, s, out));
    assert!(closes(&actions, true), "{actions:?}");
    assert!(
        h.reason().contains("limits.kernel_backlog_total"),
        "{}",
        h.reason()
    );
    assert_eq!(metrics.kernel_slow_consumers.get(), 1);
    h.event(|c, _, s, _| c.on_unspliced(Counted::default(), s));
    h.finish();
    assert_eq!(
        metrics.kernel_backlog_bytes.get(),
        others,
        "its share left the total with it"
    );
}

#[test]
fn a_spliced_tunnel_is_idle_only_if_the_program_moved_nothing_for_the_idle_timeout() {
    let mut h = Harness::spliced();
    let opened = h.now;
    h.now = opened + IDLE;
    let recent = opened + 20 * SECOND;
    let actions = h.event(|c, now, s, out| c.on_deadline(now, Some(recent), false, s, out));
    assert_eq!(actions, vec![Action::ArmDeadline(recent + IDLE)]);
    h.now = recent + IDLE;
    let actions = h.event(|c, now, s, out| c.on_deadline(now, Some(recent), false, s, out));
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: false }]
    );
    assert_eq!(h.reason(), "idle timeout (60000 ms without traffic)");
}

#[test]
fn what_the_program_counted_reaches_the_access_line_and_the_metrics() {
    let mut h = Harness::spliced();
    h.event(|c, _, _, out| c.on_drain_deadline(out));
    let counted = Counted {
        up: 10,
        down: 20,
        repeated: 7,
    };
    h.event(|c, _, s, _| c.on_unspliced(counted, s));
    assert_eq!(h.services.metrics.spliced_bytes_kernel.get(), 30);
    assert_eq!(h.services.metrics.kernel_repeated_bytes_cut.get(), 7);
    let record = h.finish();
    assert_eq!(
        (
            record.bytes_up,
            record.bytes_down,
            record.datapath,
            record.status
        ),
        (10, 20, "kernel", 101)
    );
}
