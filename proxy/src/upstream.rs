//! Upstream pools: which server a new tunnel connects to, and passive health.
//!
//! A pool is shared by all workers (read-mostly): the round-robin cursor and each server's
//! "down until" mark are atomics, so choosing a server takes no lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::clock::duration_ns;
use crate::config::UpstreamConfig;

/// One upstream server and its passive-health state.
#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    /// Monotonic ns until which the server is skipped after a failure; 0 = healthy.
    down_until_ns: AtomicU64,
}

/// A named set of upstream servers balanced round-robin.
#[derive(Debug)]
pub struct Pool {
    name: String,
    servers: Vec<Server>,
    cursor: AtomicUsize,
    fail_timeout_ns: u64,
}

/// Every server of the pool failed recently: the proxy answers 503 without trying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no healthy server in upstream pool {pool:?} (all failed within fail_timeout)")]
pub struct NoHealthyServer {
    /// The pool's name in the config.
    pub pool: String,
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
        }
    }

    /// The pool's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The servers to try for one new tunnel, in order: round-robin from the cursor, skipping
    /// servers marked down at `now_ns`.
    pub fn plan(&self, now_ns: u64) -> Result<Vec<SocketAddr>, NoHealthyServer> {
        let count = self.servers.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let plan: Vec<SocketAddr> = (0..count)
            .map(|i| &self.servers[(start + i) % count])
            .filter(|server| server.down_until_ns.load(Ordering::Relaxed) <= now_ns)
            .map(|server| server.addr)
            .collect();
        if plan.is_empty() {
            return Err(NoHealthyServer {
                pool: self.name.clone(),
            });
        }
        Ok(plan)
    }

    /// Marks `addr` down for `fail_timeout` after a failed connect or a broken answer.
    pub fn report_failure(&self, addr: SocketAddr, now_ns: u64) {
        if self.fail_timeout_ns == 0 {
            return;
        }
        for server in self.servers.iter().filter(|s| s.addr == addr) {
            server.down_until_ns.store(
                now_ns.saturating_add(self.fail_timeout_ns),
                Ordering::Relaxed,
            );
        }
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
        };
        Pool::new("p", &config)
    }

    #[test]
    fn round_robin_rotates_the_first_choice_and_keeps_the_others_as_fallbacks() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::from_secs(10));
        let a = p.plan(0).unwrap();
        let b = p.plan(0).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0], b[1]);
        assert_eq!(a[1], b[0]);
    }

    #[test]
    fn a_failed_server_is_skipped_until_fail_timeout_passes() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::from_secs(10));
        let dead: SocketAddr = "127.0.0.1:1".parse().unwrap();
        p.report_failure(dead, 1_000);
        for _ in 0..3 {
            assert_eq!(p.plan(2_000).unwrap(), vec!["127.0.0.1:2".parse().unwrap()]);
        }
        assert_eq!(p.plan(1_000 + 10_000_000_000).unwrap().len(), 2);
    }

    #[test]
    fn all_servers_down_is_no_healthy_server() {
        let p = pool(&["127.0.0.1:1"], Duration::from_secs(10));
        p.report_failure("127.0.0.1:1".parse().unwrap(), 0);
        assert!(p.plan(5).is_err());
    }

    #[test]
    fn zero_fail_timeout_never_marks_down() {
        let p = pool(&["127.0.0.1:1"], Duration::ZERO);
        p.report_failure("127.0.0.1:1".parse().unwrap(), 0);
        assert_eq!(p.plan(1).unwrap().len(), 1);
    }
}
