//! Upstream pools: which server a new connection goes to, and passive health.
//!
//! A pool is shared by all workers (read-mostly): the round-robin cursor and each server's
//! "down until" mark are atomics, so choosing a server takes no lock.
//!
//! Passive health only *orders* the servers: a server that failed within `fail_timeout` is
//! tried after the healthy ones, never skipped. So a pool whose servers all failed a moment ago
//! still gets a connect attempt (panic routing, like Envoy's), and a pool of one server is never
//! marked down at all (like nginx): one refused connect during a restart cannot turn into
//! `fail_timeout` of refusals for everyone.

mod keepalive;

pub use keepalive::{IdleConnections, Keepalive};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::clock::duration_ns;
use crate::config::UpstreamConfig;

/// One upstream server and its passive-health state.
#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    /// Monotonic ns until which the server is tried last after a failure; 0 = healthy.
    down_until_ns: AtomicU64,
}

/// A named set of upstream servers balanced round-robin.
#[derive(Debug)]
pub struct Pool {
    name: String,
    servers: Vec<Server>,
    cursor: AtomicUsize,
    fail_timeout_ns: u64,
    keepalive: Keepalive,
}

impl Pool {
    /// Builds the pool named `name` from its configuration.
    pub fn new(name: &str, config: &UpstreamConfig) -> Pool {
        Pool {
            name: name.to_owned(),
            servers: config
                .servers
                .iter()
                .map(|&addr| Server {
                    addr,
                    down_until_ns: AtomicU64::new(0),
                })
                .collect(),
            cursor: AtomicUsize::new(0),
            fail_timeout_ns: duration_ns(config.fail_timeout),
            keepalive: Keepalive {
                per_server: config.keepalive,
                timeout_ns: duration_ns(config.keepalive_timeout),
            },
        }
    }

    /// How idle connections to this pool's servers are kept for plain HTTP requests.
    pub fn keepalive(&self) -> Keepalive {
        self.keepalive
    }

    /// The pool's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The servers to try for one new connection, in order: round-robin from the cursor,
    /// servers marked down at `now_ns` after all healthy ones. Every server is in the plan
    /// (empty only for a pool without servers).
    pub fn plan(&self, now_ns: u64) -> Vec<SocketAddr> {
        let count = self.servers.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let rotated = (0..count).map(|i| &self.servers[(start + i) % count]);
        let (healthy, down): (Vec<&Server>, Vec<&Server>) =
            rotated.partition(|server| server.down_until_ns.load(Ordering::Relaxed) <= now_ns);
        healthy
            .into_iter()
            .chain(down)
            .map(|server| server.addr)
            .collect()
    }

    /// Marks `addr` as failed for `fail_timeout` (tried after the healthy servers), after a
    /// failed connect or a broken answer. The only server of a pool is never marked: there is
    /// nothing to prefer over it.
    pub fn report_failure(&self, addr: SocketAddr, now_ns: u64) {
        if self.fail_timeout_ns == 0 || self.servers.len() < 2 {
            return;
        }
        for server in self.servers.iter().filter(|s| s.addr == addr) {
            server.down_until_ns.store(
                now_ns.saturating_add(self.fail_timeout_ns),
                Ordering::Relaxed,
            );
        }
    }

    /// Whether `addr` is marked as failed at `now_ns` (for tests and logs).
    pub fn is_marked_down(&self, addr: SocketAddr, now_ns: u64) -> bool {
        self.servers
            .iter()
            .any(|s| s.addr == addr && s.down_until_ns.load(Ordering::Relaxed) > now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;
    use std::time::Duration;

    fn pool(servers: &[&str], fail_timeout: Duration) -> Pool {
        let config = UpstreamConfig {
            servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            balance: Balance::RoundRobin,
            fail_timeout,
            keepalive: 0,
            keepalive_timeout: Duration::from_secs(60),
        };
        Pool::new("p", &config)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_rotates_the_first_choice_and_keeps_the_others_as_fallbacks() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::from_secs(10));
        let a = p.plan(0);
        let b = p.plan(0);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], b[1]);
        assert_eq!(a[1], b[0]);
    }

    #[test]
    fn a_failed_server_is_tried_last_until_fail_timeout_passes() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::from_secs(10));
        let dead = addr("127.0.0.1:1");
        p.report_failure(dead, 1_000);
        assert!(p.is_marked_down(dead, 2_000));
        for _ in 0..3 {
            assert_eq!(p.plan(2_000), vec![addr("127.0.0.1:2"), dead]);
        }
        let later = 1_000 + 10_000_000_000;
        assert!(!p.is_marked_down(dead, later));
        let firsts: Vec<SocketAddr> = (0..2).map(|_| p.plan(later)[0]).collect();
        assert!(
            firsts.contains(&dead),
            "healthy again, it leads in its turn"
        );
    }

    #[test]
    fn when_every_server_failed_all_are_still_tried() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::from_secs(10));
        p.report_failure(addr("127.0.0.1:1"), 0);
        p.report_failure(addr("127.0.0.1:2"), 0);
        assert_eq!(p.plan(5).len(), 2);
    }

    #[test]
    fn the_only_server_of_a_pool_is_never_marked_down() {
        let p = pool(&["127.0.0.1:1"], Duration::from_secs(10));
        p.report_failure(addr("127.0.0.1:1"), 0);
        assert!(!p.is_marked_down(addr("127.0.0.1:1"), 5));
        assert_eq!(p.plan(5), vec![addr("127.0.0.1:1")]);
    }

    #[test]
    fn zero_fail_timeout_never_marks_down() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO);
        p.report_failure(addr("127.0.0.1:1"), 0);
        assert!(!p.is_marked_down(addr("127.0.0.1:1"), 1));
    }
}
