//! The kernel path: each hand-off outcome, FINs that wait for the kernel, resets, stray bytes,
//! readers that fall behind (the tunnel leaves the kernel path), idleness from the program's
//! activity, and the counts for the access line.

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

fn pressure(h: &mut Harness, to_client: u64, to_upstream: u64) -> Vec<Action> {
    h.event(|c, now, s, out| {
        c.on_pressure(
            backlog(to_client, false),
            backlog(to_upstream, false),
            now,
            s,
            out,
        )
    })
}

fn paused(h: &mut Harness, result: Result<Paused, String>) -> Vec<Action> {
    h.event(|c, now, s, out| c.on_paused(result, now, s, out))
}

const COUNTED: Counted = Counted {
    up: 10,
    down: 20,
    repeated: 0,
    frames: [FrameTracker::at_boundary(); 2],
};

/// What the pause found still queued in the kernel towards each side.
fn still_queued(to_client: u64, to_upstream: u64) -> Paused {
    Paused {
        counted: COUNTED,
        to_client: backlog(to_client, false),
        to_upstream: backlog(to_upstream, false),
    }
}

fn forward(from: Side) -> Action {
    Action::Forward {
        from,
        budget: RELAY_BUFFER,
    }
}

/// A spliced tunnel whose upstream floods a client that stopped reading: it leaves the kernel
/// path with `to_client` bytes still queued towards the client.
fn demoted(to_client: u64) -> Harness {
    let mut h = Harness::spliced();
    let limit = h.services.kernel_backlog;
    assert_eq!(pressure(&mut h, limit + 1, 0), vec![Action::PauseSplice]);
    let actions = paused(&mut h, Ok(still_queued(to_client, 0)));
    let mut expected = vec![Action::ArmDeadline(h.now + IDLE)];
    if to_client > 0 {
        expected.push(Action::MeasurePressure);
    } else {
        expected.push(forward(Side::Upstream));
    }
    // The upstream is the destination of nothing queued: the client's bytes are relayed now.
    expected.push(forward(Side::Client));
    assert_eq!(actions, expected);
    h
}

#[test]
fn a_reader_too_far_behind_takes_the_tunnel_off_the_kernel_path_instead_of_closing_it() {
    let mut h = Harness::spliced();
    let limit = h.services.kernel_backlog;
    assert_eq!(pressure(&mut h, limit, 0), vec![Action::MeasurePressure]);
    assert_eq!(pressure(&mut h, 0, limit + 1), vec![Action::PauseSplice]);
    // Measured again before the pause was carried out: asked once only.
    assert_eq!(pressure(&mut h, 0, limit + 2), vec![]);
    let actions = paused(&mut h, Ok(still_queued(0, 3000)));
    assert_eq!(
        actions,
        vec![
            Action::ArmDeadline(h.now + IDLE),
            Action::MeasurePressure,
            // Towards the client nothing is queued: the upstream's bytes are relayed now.
            forward(Side::Upstream),
        ]
    );
    assert!(matches!(h.conn.stage(), Stage::Relaying(_)));
    let metrics = std::sync::Arc::clone(&h.services.metrics);
    assert_eq!(metrics.tunnels_demoted.get(), 1);
    assert_eq!(metrics.tunnels_spliced_open.get(), 0);
    assert_eq!(metrics.kernel_slow_consumers.get(), 0);
    assert_eq!(metrics.kernel_backlog_bytes.get(), 3000);
    assert_eq!(metrics.spliced_bytes_kernel.get(), 30);
    // The client's bytes wait until the kernel delivered what it queued for the upstream.
    assert_eq!(pressure(&mut h, 0, 1000), vec![Action::MeasurePressure]);
    assert_eq!(metrics.kernel_backlog_bytes.get(), 1000);
    assert_eq!(pressure(&mut h, 0, 0), vec![forward(Side::Client)]);
    assert_eq!(metrics.kernel_backlog_bytes.get(), 0);
    // Relayed like any tunnel from here on, never promoted again; the access line has
    // every byte, the kernel's included.
    h.event(|c, now, s, _| c.on_forwarded(Side::Upstream, &[0; 5], true, now, s));
    let actions = h.sent(Side::Client);
    assert_eq!(actions, vec![Action::AwaitReadable(Side::Upstream)]);
    let actions = h.deadline(h.now + IDLE);
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: false }],
        "its sockets leave the splice maps at the close"
    );
    let record = h.finish();
    assert_eq!(
        (record.bytes_up, record.bytes_down, record.datapath),
        (10, 25, "userspace")
    );
    assert_eq!(metrics.tunnels_open.get(), 0);
}

#[test]
fn a_direction_is_relayed_only_once_the_kernel_delivered_what_it_queued() {
    let mut h = demoted(5000);
    // The stuck client reads nothing: the upstream's bytes stay held, however long.
    for _ in 0..3 {
        assert_eq!(pressure(&mut h, 5000, 0), vec![Action::MeasurePressure]);
    }
    // It reads again.
    assert_eq!(pressure(&mut h, 0, 0), vec![forward(Side::Upstream)]);
}

#[test]
fn a_reader_working_through_its_backlog_is_not_idle() {
    let mut h = demoted(5000);
    let demoted_at = h.now;
    h.now = demoted_at + IDLE - SECOND;
    assert_eq!(pressure(&mut h, 4000, 0), vec![Action::MeasurePressure]);
    h.now = demoted_at + IDLE;
    let actions = h.event(|c, now, s, out| c.on_deadline(now, None, false, s, out));
    assert_eq!(
        actions,
        vec![Action::ArmDeadline(demoted_at + 2 * IDLE - SECOND)]
    );
    // No progress for the idle timeout: idle, like a relayed tunnel whose reader is stuck.
    h.now = demoted_at + 2 * IDLE;
    assert_eq!(pressure(&mut h, 4000, 0), vec![Action::MeasurePressure]);
    let actions = h.event(|c, now, s, out| c.on_deadline(now, None, false, s, out));
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: false }]
    );
}

#[test]
fn a_held_direction_whose_reader_is_gone_resets_the_tunnel() {
    let mut h = demoted(5000);
    let actions = h
        .event(|c, now, s, out| c.on_pressure(backlog(5000, true), backlog(0, false), now, s, out));
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: true }]
    );
    assert_eq!(
        h.reason(),
        "Client connection is gone (reset) with bytes queued"
    );
    h.finish();
}

#[test]
fn a_pause_that_fails_closes_the_tunnel_as_a_slow_consumer() {
    let mut h = Harness::spliced();
    let limit = h.services.kernel_backlog;
    pressure(&mut h, limit + 1, 0);
    let actions = paused(&mut h, Err("map full".into()));
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: true }]
    );
    assert!(h.reason().starts_with("slow consumer"), "{}", h.reason());
    assert!(h.reason().ends_with("map full"), "{}", h.reason());
    assert_eq!(h.services.metrics.kernel_slow_consumers.get(), 1);
    assert_eq!(h.services.metrics.tunnels_demoted.get(), 0);
}

#[test]
fn a_fin_passed_on_before_the_pause_is_not_passed_again() {
    let mut h = Harness::spliced();
    // The upstream closed and the kernel delivered everything before its FIN.
    spliced_event(&mut h, Side::Upstream, SplicedEvent::Eof);
    assert_eq!(
        kernel_backlog(&mut h, Side::Client, backlog(0, false)),
        vec![Action::ShutdownWrite(Side::Client)]
    );
    let limit = h.services.kernel_backlog;
    pressure(&mut h, 0, limit + 1);
    let actions = paused(&mut h, Ok(still_queued(0, 0)));
    // Only the client's direction is left: its bytes are relayed.
    assert_eq!(
        actions,
        vec![Action::ArmDeadline(h.now + IDLE), forward(Side::Client)]
    );
    // The client's FIN ends the tunnel: both sides closed.
    h.event(|c, _, _, out| c.on_source_eof(Side::Client, out));
    assert_eq!(h.reason(), "both sides closed");
}

#[test]
fn a_diverted_socket_resets_a_tunnel_that_left_the_kernel_path() {
    let mut h = demoted(0);
    // Bytes on a paused socket are the relay's, not stray.
    let actions = spliced_event(
        &mut h,
        Side::Client,
        SplicedEvent::Stray { diverted: false },
    );
    assert_eq!(actions, vec![]);
    let actions = spliced_event(&mut h, Side::Client, SplicedEvent::Stray { diverted: true });
    assert_eq!(
        actions,
        vec![Action::Unsplice, Action::Close { abortive: true }]
    );
    assert!(
        h.reason().contains("could not be cut off"),
        "{}",
        h.reason()
    );
}

#[test]
fn a_reader_that_adds_to_a_total_backlog_over_the_process_limit_leaves_the_kernel_path() {
    let mut h = Harness::spliced();
    let metrics = std::sync::Arc::clone(&h.services.metrics);
    // Other tunnels' readers are already nearly at the process-wide limit.
    let others = h.services.kernel_backlog_total - 1000;
    metrics.kernel_backlog_bytes.replace_share(0, others);
    // Far below the per-tunnel limit, but over the total.
    assert_eq!(pressure(&mut h, 0, 4000), vec![Action::PauseSplice]);
    paused(&mut h, Ok(still_queued(0, 4000)));
    assert_eq!(metrics.kernel_backlog_bytes.get(), others + 4000);
    h.event(|c, now, s, out| c.on_drain_deadline(now, s, out));
    h.finish();
    assert_eq!(
        metrics.kernel_backlog_bytes.get(),
        others,
        "its share left the total with it"
    );
}

#[test]
fn a_tunnel_with_bytes_queued_is_measured_until_its_reader_caught_up() {
    let mut h = Harness::spliced();
    let gauge = |h: &Harness| h.services.metrics.kernel_backlog_bytes.get();
    assert_eq!(pressure(&mut h, 500, 200), vec![Action::MeasurePressure]);
    assert_eq!(gauge(&h), 700);
    assert_eq!(pressure(&mut h, 100, 0), vec![Action::MeasurePressure]);
    assert_eq!(gauge(&h), 100);
    assert_eq!(pressure(&mut h, 0, 0), vec![]);
    assert_eq!(gauge(&h), 0);
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
    h.event(|c, _, _, out| c.close("test".into(), false, out));
    let counted = Counted {
        up: 10,
        down: 20,
        repeated: 7,
        frames: [FrameTracker::at_boundary(); 2],
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
