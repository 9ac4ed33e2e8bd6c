//! Keep-alive to upstreams: the idle connections a worker keeps for its next plain HTTP
//! requests, per server, newest first.
//!
//! Sans-IO: it holds whatever the worker hands it (a socket) with the moment it stops being
//! useful, and gives back what must be closed; the worker checks that a connection is still
//! alive when it takes one, and closes what expired at its ticks. One per worker, so it needs
//! no lock.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

/// How idle connections to one pool's servers are kept (`keepalive`, `keepalive_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Most idle connections per server (0: none is kept).
    pub per_server: usize,
    /// How long one may stay idle, in ns.
    pub timeout_ns: u64,
}

/// One idle connection and when it expires.
#[derive(Debug)]
struct Idle<T> {
    connection: T,
    expires_ns: u64,
}

/// A worker's idle upstream connections.
#[derive(Debug)]
pub struct IdleConnections<T> {
    by_server: HashMap<SocketAddr, VecDeque<Idle<T>>>,
    count: usize,
}

impl<T> Default for IdleConnections<T> {
    fn default() -> Self {
        IdleConnections {
            by_server: HashMap::new(),
            count: 0,
        }
    }
}

impl<T> IdleConnections<T> {
    /// Keeps `connection` to `server` for a later request. Gives back what must be closed
    /// instead: the server's oldest idle connection when it already has `per_server`, or
    /// `connection` itself when none is kept.
    pub fn put(
        &mut self,
        server: SocketAddr,
        connection: T,
        now_ns: u64,
        policy: Keepalive,
    ) -> Option<T> {
        if policy.per_server == 0 {
            return Some(connection);
        }
        let idle = self.by_server.entry(server).or_default();
        idle.push_back(Idle {
            connection,
            expires_ns: now_ns.saturating_add(policy.timeout_ns),
        });
        self.count += 1;
        if idle.len() > policy.per_server {
            self.count -= 1;
            return idle.pop_front().map(|oldest| oldest.connection);
        }
        None
    }

    /// The connection to `server` that went idle last (the warmest; the oldest expire first).
    pub fn take(&mut self, server: SocketAddr) -> Option<T> {
        let idle = self.by_server.get_mut(&server)?;
        let newest = idle.pop_back()?;
        self.count -= 1;
        if idle.is_empty() {
            self.by_server.remove(&server);
        }
        Some(newest.connection)
    }

    /// Removes the connections whose idle time ran out by `now_ns`, or for which `dead` says
    /// so (the server closed them), and gives them back to be closed.
    pub fn sweep(&mut self, now_ns: u64, mut dead: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut gone = Vec::new();
        for idle in self.by_server.values_mut() {
            let mut kept = VecDeque::with_capacity(idle.len());
            for entry in idle.drain(..) {
                if entry.expires_ns <= now_ns || dead(&entry.connection) {
                    gone.push(entry.connection);
                } else {
                    kept.push_back(entry);
                }
            }
            *idle = kept;
        }
        self.by_server.retain(|_, idle| !idle.is_empty());
        self.count -= gone.len();
        gone
    }

    /// Idle connections kept, to all servers.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when none is kept.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn server(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn policy(per_server: usize) -> Keepalive {
        Keepalive {
            per_server,
            timeout_ns: 60 * SECOND,
        }
    }

    #[test]
    fn the_newest_idle_connection_of_the_server_is_taken_first() {
        let mut idle = IdleConnections::default();
        assert_eq!(idle.put(server(1), "a", 0, policy(4)), None);
        assert_eq!(idle.put(server(1), "b", 1, policy(4)), None);
        assert_eq!(idle.put(server(2), "c", 2, policy(4)), None);
        assert_eq!(idle.len(), 3);
        assert_eq!(idle.take(server(1)), Some("b"));
        assert_eq!(idle.take(server(1)), Some("a"));
        assert_eq!(idle.take(server(1)), None);
        assert_eq!(idle.take(server(2)), Some("c"));
        assert!(idle.is_empty());
    }

    #[test]
    fn a_full_server_gives_back_its_oldest_connection() {
        let mut idle = IdleConnections::default();
        idle.put(server(1), "a", 0, policy(2));
        idle.put(server(1), "b", 0, policy(2));
        assert_eq!(idle.put(server(1), "c", 0, policy(2)), Some("a"));
        assert_eq!(idle.len(), 2);
    }

    #[test]
    fn nothing_is_kept_without_keepalive() {
        let mut idle = IdleConnections::default();
        assert_eq!(idle.put(server(1), "a", 0, policy(0)), Some("a"));
        assert!(idle.is_empty());
    }

    #[test]
    fn a_sweep_gives_back_expired_and_dead_connections() {
        let mut idle = IdleConnections::default();
        idle.put(server(1), "old", 0, policy(8));
        idle.put(server(1), "closed by server", 30 * SECOND, policy(8));
        idle.put(server(2), "fresh", 30 * SECOND, policy(8));
        let mut gone = idle.sweep(61 * SECOND, |c| *c == "closed by server");
        gone.sort();
        assert_eq!(gone, vec!["closed by server", "old"]);
        assert_eq!(idle.len(), 1);
        assert_eq!(idle.take(server(2)), Some("fresh"));
    }
}
