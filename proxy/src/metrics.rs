//! Process-wide counters, cheap to bump from any worker (relaxed atomics), rendered in the
//! Prometheus text format by the admin listener.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Moves the value from `old` (this caller's earlier share) to `new`.
    pub fn replace_share(&self, old: u64, new: u64) {
        if new >= old {
            self.0.fetch_add(new - old, Ordering::Relaxed);
        } else {
            self.0.fetch_sub(old - new, Ordering::Relaxed);
        }
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every counter the proxy keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Client connections accepted.
    pub connections_accepted: Counter,
    /// Client connections closed at once because `limits.max_connections` were open.
    pub connections_refused_limit: Counter,
    /// Client connections closed at once because `limits.max_connections_per_ip` were open
    /// from their address.
    pub connections_refused_per_ip: Counter,
    /// TLS connections closed at once because their worker had `limits.max_tls_handshakes`
    /// handshakes in progress.
    pub connections_refused_tls_handshakes: Counter,
    /// Connections open now (any phase).
    pub connections_open: Gauge,
    /// Tunnels established (101 relayed).
    pub tunnels_opened: Counter,
    /// Tunnels open now.
    pub tunnels_open: Gauge,
    /// Tunnels the kernel carries now (their two sockets are in the splice maps). Kept by the
    /// workers: nothing walks the maps to count them.
    pub tunnels_spliced_open: Gauge,
    /// Bytes the program redirected that their readers have not taken in yet, over all spliced
    /// tunnels, as last measured (kernel memory no socket buffer accounts for).
    pub kernel_backlog_bytes: Gauge,
    /// Tunnels carried by the kernel splice path.
    pub tunnels_spliced: Counter,
    /// Of those, tunnels that started on the userspace relay and were promoted.
    pub tunnels_promoted: Counter,
    /// Hand-offs to the kernel that failed (the tunnel stayed on the userspace relay).
    pub kernel_handoff_failures: Counter,
    /// Tunnels handed to the packet splice (the proxy keeps no socket for them).
    pub tunnels_packet_spliced: Counter,
    /// Packet-spliced tunnels whose flows live now.
    pub tunnels_packet_open: Gauge,
    /// Tunnels the packet splice refused (not eligible, or the hand-off failed), by reason:
    /// they stay on the userspace relay.
    pub packet_refusals: crate::splice::packet::Refusals,
    /// Requests answered with an HTTP error by the proxy.
    pub requests_rejected: Counter,
    /// Non-101 upstream answers relayed.
    pub upgrades_refused: Counter,
    /// Failed upstream connect attempts.
    pub upstream_connect_failures: Counter,
    /// Plain HTTP requests passed to an upstream.
    pub http_requests: Counter,
    /// Plain HTTP requests sent on a kept-alive upstream connection.
    pub upstream_keepalive_reused: Counter,
    /// Tunnels closed by the idle timeout.
    pub idle_timeouts: Counter,
    /// Kernel-path tunnels taken off the kernel path (relayed in userspace from then on)
    /// because a reader fell `limits.kernel_backlog` behind, or the kernel backlog of all
    /// tunnels passed `limits.kernel_backlog_total`.
    pub tunnels_demoted: Counter,
    /// Kernel-path tunnels closed because a reader fell behind and the tunnel could not be
    /// taken off the kernel path (a last resort).
    pub kernel_slow_consumers: Counter,
    /// Tunnel payload bytes copied through userspace (the relay), both directions.
    pub relayed_bytes_userspace: Counter,
    /// Tunnel payload bytes moved by the kernel splice path, both directions.
    pub spliced_bytes_kernel: Counter,
    /// Bytes the kernel handed to the splice program a second time (TCP segments overlapping
    /// bytes already passed on), cut off instead of being forwarded twice.
    pub kernel_repeated_bytes_cut: Counter,
    /// Kernel-path tunnels closed because repeated bytes could not be cut off.
    pub kernel_diverted: Counter,
    /// TLS handshakes completed (`wss://`).
    pub tls_handshakes: Counter,
    /// TLS handshakes that resumed a session (ticket or cache).
    pub tls_resumed: Counter,
    /// TLS handshakes that failed (bad input, no certificate, timeout, plain HTTP).
    pub tls_failures: Counter,
    /// Configuration reloads applied (SIGHUP, `wsplice reload`).
    pub config_reloads: Counter,
    /// Reloads refused, of the file or of changed certificate files (the running
    /// configuration stayed).
    pub config_reload_failures: Counter,
    /// Changed certificate files loaded without a reload.
    pub certificate_reloads: Counter,
    /// Tunnels handed over to a successor process (binary upgrade).
    pub tunnels_handed_over: Counter,
    /// Tunnels taken over from a predecessor process (binary upgrade).
    pub tunnels_adopted: Counter,
    /// Upgrades that did not happen (the successor failed; this process kept serving).
    pub upgrade_failures: Counter,
    /// Tunnels that shutdown closed with a Close 1001 to both sides (the drain's goodbye).
    pub drain_goodbyes: Counter,
    /// Tunnels closed with a Close 1012 to move them to a less loaded server (rebalancing).
    pub tunnels_rebalanced: Counter,
    /// Connections to a `proxy_protocol` listener closed for their PROXY header: from a peer
    /// not in `trusted_proxies`, missing, malformed, or not complete in time.
    pub proxy_headers_refused: Counter,
    /// Every upstream server's state (open connections, health): per-server gauges.
    pub upstreams: crate::upstream::Registry,
}

impl Metrics {
    /// Renders every metric in the Prometheus text exposition format. Only atomics are read,
    /// and the list of upstream servers (a lock no worker takes while it serves).
    pub fn render(&self) -> String {
        let counters: [(&str, &str, u64); 33] = [
            (
                "tls_handshakes_total",
                "TLS handshakes completed.",
                self.tls_handshakes.get(),
            ),
            (
                "tls_resumed_total",
                "TLS handshakes that resumed a session.",
                self.tls_resumed.get(),
            ),
            (
                "tls_failures_total",
                "TLS handshakes that failed.",
                self.tls_failures.get(),
            ),
            (
                "connections_accepted_total",
                "Client connections accepted.",
                self.connections_accepted.get(),
            ),
            (
                "connections_refused_limit_total",
                "Client connections closed at once: limits.max_connections were open.",
                self.connections_refused_limit.get(),
            ),
            (
                "connections_refused_per_ip_total",
                "Client connections closed at once: limits.max_connections_per_ip were open from their address.",
                self.connections_refused_per_ip.get(),
            ),
            (
                "connections_refused_tls_handshakes_total",
                "TLS connections closed at once: their worker had limits.max_tls_handshakes handshakes in progress.",
                self.connections_refused_tls_handshakes.get(),
            ),
            (
                "tunnels_opened_total",
                "Tunnels established (101 relayed).",
                self.tunnels_opened.get(),
            ),
            (
                "tunnels_spliced_total",
                "Tunnels carried by the kernel splice path.",
                self.tunnels_spliced.get(),
            ),
            (
                "tunnels_promoted_total",
                "Tunnels moved from the userspace relay to the kernel splice path.",
                self.tunnels_promoted.get(),
            ),
            (
                "kernel_handoff_failures_total",
                "Hand-offs to the kernel that failed (the tunnel stayed in userspace).",
                self.kernel_handoff_failures.get(),
            ),
            (
                "tunnels_packet_spliced_total",
                "Tunnels handed to the packet splice (no proxy socket left for them).",
                self.tunnels_packet_spliced.get(),
            ),
            (
                "requests_rejected_total",
                "Requests answered with an HTTP error by the proxy.",
                self.requests_rejected.get(),
            ),
            (
                "upgrades_refused_total",
                "Non-101 upstream answers relayed.",
                self.upgrades_refused.get(),
            ),
            (
                "upstream_connect_failures_total",
                "Failed upstream connect attempts.",
                self.upstream_connect_failures.get(),
            ),
            (
                "http_requests_total",
                "Plain HTTP requests passed to an upstream.",
                self.http_requests.get(),
            ),
            (
                "upstream_keepalive_reused_total",
                "Plain HTTP requests sent on a kept-alive upstream connection.",
                self.upstream_keepalive_reused.get(),
            ),
            (
                "tunnels_demoted_total",
                "Tunnels moved from the kernel splice path to the userspace relay because a \
                 reader fell behind.",
                self.tunnels_demoted.get(),
            ),
            (
                "kernel_slow_consumers_total",
                "Kernel-path tunnels closed because a reader fell behind and the tunnel could \
                 not leave the kernel path.",
                self.kernel_slow_consumers.get(),
            ),
            (
                "idle_timeouts_total",
                "Tunnels closed by the idle timeout.",
                self.idle_timeouts.get(),
            ),
            (
                "relayed_bytes_userspace_total",
                "Tunnel bytes copied through userspace.",
                self.relayed_bytes_userspace.get(),
            ),
            (
                "spliced_bytes_kernel_total",
                "Tunnel bytes moved by the kernel splice path.",
                self.spliced_bytes_kernel.get(),
            ),
            (
                "kernel_repeated_bytes_cut_total",
                "Bytes the kernel handed to the splice program twice, cut off instead of forwarded again.",
                self.kernel_repeated_bytes_cut.get(),
            ),
            (
                "kernel_diverted_total",
                "Kernel-path tunnels closed because repeated bytes could not be cut off.",
                self.kernel_diverted.get(),
            ),
            (
                "config_reloads_total",
                "Configuration reloads applied (SIGHUP, wsplice reload).",
                self.config_reloads.get(),
            ),
            (
                "config_reload_failures_total",
                "Reloads refused, of the file or of changed certificate files (the running configuration stayed).",
                self.config_reload_failures.get(),
            ),
            (
                "certificate_reloads_total",
                "Changed certificate files loaded without a reload.",
                self.certificate_reloads.get(),
            ),
            (
                "tunnels_handed_over_total",
                "Tunnels handed over to a successor process (binary upgrade).",
                self.tunnels_handed_over.get(),
            ),
            (
                "tunnels_adopted_total",
                "Tunnels taken over from a predecessor process (binary upgrade).",
                self.tunnels_adopted.get(),
            ),
            (
                "upgrade_failures_total",
                "Upgrades that did not happen (the successor failed; this process kept serving).",
                self.upgrade_failures.get(),
            ),
            (
                "drain_goodbyes_total",
                "Tunnels that shutdown closed with a WebSocket Close 1001 to both sides.",
                self.drain_goodbyes.get(),
            ),
            (
                "tunnels_rebalanced_total",
                "Tunnels closed with a WebSocket Close 1012 so that their clients reconnect to a less loaded server (rebalancing).",
                self.tunnels_rebalanced.get(),
            ),
            (
                "proxy_headers_refused_total",
                "Connections to a proxy_protocol listener closed for their PROXY header (untrusted peer, missing, malformed or late).",
                self.proxy_headers_refused.get(),
            ),
        ];
        let gauges: [(&str, &str, u64); 5] = [
            (
                "connections_open",
                "Connections open now.",
                self.connections_open.get(),
            ),
            ("tunnels_open", "Tunnels open now.", self.tunnels_open.get()),
            (
                "tunnels_spliced_open",
                "Tunnels the kernel carries now (two sockets each in the splice maps).",
                self.tunnels_spliced_open.get(),
            ),
            (
                "tunnels_packet_open",
                "Packet-spliced tunnels whose flows live now.",
                self.tunnels_packet_open.get(),
            ),
            (
                "kernel_backlog_bytes",
                "Bytes redirected by the kernel path that their readers have not taken in yet \
                 (all tunnels, as last measured; bounded by limits.kernel_backlog_total).",
                self.kernel_backlog_bytes.get(),
            ),
        ];
        let mut out = String::new();
        for (kind, list) in [("counter", &counters[..]), ("gauge", &gauges[..])] {
            for (name, help, value) in list {
                // Writing to a String cannot fail.
                let _ = writeln!(out, "# HELP wsplice_{name} {help}");
                let _ = writeln!(out, "# TYPE wsplice_{name} {kind}");
                let _ = writeln!(out, "wsplice_{name} {value}");
            }
        }
        self.packet_refusals.render(&mut out);
        self.upstreams.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_counter_values_in_prometheus_format() {
        let metrics = Metrics::default();
        metrics.tunnels_opened.add(3);
        metrics.tunnels_open.inc();
        metrics.tunnels_spliced_open.inc();
        let text = metrics.render();
        assert!(text.contains(
            "# TYPE wsplice_tunnels_opened_total counter\nwsplice_tunnels_opened_total 3\n"
        ));
        assert!(text.contains("wsplice_tunnels_open 1\n"));
        assert!(text.contains(
            "# TYPE wsplice_tunnels_spliced_open gauge\nwsplice_tunnels_spliced_open 1\n"
        ));
    }
}
