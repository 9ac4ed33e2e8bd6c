//! Upstream pools: which server a new connection goes to, what each server holds, and its
//! health.
//!
//! A pool is shared by all workers (read-mostly): every server's state is atomics, so choosing
//! a server takes no lock. A server's state ([`ServerState`]: its open connections, its passive
//! mark, its active health) outlives a reload: the [`Registry`] hands the next generation's
//! pool the same state for the same pool and address, so counts stay true while connections of
//! both generations are open, and the health checker keeps its verdicts.
//!
//! Order of the servers tried for one connection ([`Pool::plan`]): the balancer's choice among
//! the servers that may take it (`balance.rs`), then the others that may, then those a failed
//! connect marked (passive health only *orders*: a server that failed within `fail_timeout` is
//! tried after the others, never skipped, and a pool of one server is never marked, like nginx:
//! one refused connect during a restart cannot turn into `fail_timeout` of refusals). A server
//! the active check took out is left out while any other is in (all out: all are tried, the
//! checks may be what is wrong). A server at its `max_tunnels` is left out: when every server
//! is full the pool answers 503.

mod balance;
pub mod dns;
pub mod health;
mod keepalive;
pub mod membership;

pub use balance::{Balancer, Load, FULL_RAMP};
pub use keepalive::{IdleConnections, Keepalive};

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::duration_ns;
use crate::config::{HashKey, UpstreamConfig};
use health::{ActiveHealth, HealthCheck, Target};

/// One upstream server's state, shared by every generation's pool that lists it.
#[derive(Debug)]
pub struct ServerState {
    addr: SocketAddr,
    /// Connections it holds: each a [`Lease`].
    open: AtomicUsize,
    /// Monotonic ns until which it is tried last after a failure; 0 = never marked.
    down_until_ns: AtomicU64,
    /// What the active checks say (up when the pool has none).
    health: Arc<ActiveHealth>,
}

impl ServerState {
    fn new(addr: SocketAddr) -> ServerState {
        ServerState {
            addr,
            open: AtomicUsize::new(0),
            down_until_ns: AtomicU64::new(0),
            health: Arc::new(ActiveHealth::new()),
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections it holds now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// What its active checks say (up without checks).
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Marked by a failed connect at `now_ns`.
    fn is_marked(&self, now_ns: u64) -> bool {
        self.down_until_ns.load(Ordering::Relaxed) > now_ns
    }

    /// When it last came back (its active check passed again, or its passive mark ran out): 0
    /// if it never went away.
    fn back_since_ns(&self, now_ns: u64) -> u64 {
        let mark = self.down_until_ns.load(Ordering::Relaxed);
        let unmarked = if mark <= now_ns { mark } else { 0 };
        unmarked.max(self.health.up_since_ns())
    }
}

/// A connection's place on a server: counted in the server's open connections until dropped.
#[derive(Debug)]
pub struct Lease {
    server: Arc<ServerState>,
}

impl Lease {
    /// The server it counts on.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.server.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One server of a pool as configured.
#[derive(Debug)]
struct Member {
    state: Arc<ServerState>,
    weight: u32,
    /// `max_tunnels`, `usize::MAX` without one.
    max_open: usize,
}

/// A named set of upstream servers and how it balances them.
#[derive(Debug)]
pub struct Pool {
    name: String,
    members: Vec<Member>,
    balancer: Balancer,
    /// Choices made so far: round robin's position, where least connections starts looking.
    turns: AtomicUsize,
    fail_timeout_ns: u64,
    slow_start_ns: u64,
    keepalive: Keepalive,
    send_proxy_protocol: bool,
    health_check: Option<HealthCheck>,
    rebalancing: Option<Rebalancing>,
}

/// A pool's rebalancing: its rate as a schedule of moves, and when a server is over its share.
#[derive(Debug)]
struct Rebalancing {
    /// One move per this many ns at most.
    interval_ns: u64,
    /// Over its share: above `1 + tolerance/100` times it.
    tolerance: u32,
    /// When the next move may happen (a move takes the slot and pushes it on by `interval_ns`;
    /// a slot unused for long does not save up a burst beyond one second's worth). The pool's
    /// for as long as the process lives: a new generation does not grant a new burst.
    next_ns: Arc<AtomicU64>,
}

impl Rebalancing {
    /// `member` holds more than `1 + tolerance` times its share of `total` open connections
    /// (its share: its weight of `weights`, those of the servers that may take connections),
    /// and at least one whole connection over it.
    fn over_share(&self, member: &Member, total: u128, weights: u128) -> bool {
        if weights == 0 {
            return false;
        }
        let open = member.state.open() as u128;
        let weight = u128::from(member.weight);
        let above = open * weights * 100 > total * weight * (100 + u128::from(self.tolerance));
        let whole = open.saturating_sub(1) * weights >= total * weight;
        above && whole
    }
}

impl Pool {
    /// Builds the pool named `name` from its configuration, with the servers' states from
    /// `registry` (the same as the previous generation's for the servers it kept).
    pub fn new(name: &str, config: &UpstreamConfig, registry: &Registry) -> Pool {
        let members: Vec<Member> = config
            .servers
            .iter()
            .map(|server| Member {
                state: registry.server(name, server.addr),
                weight: server.weight,
                max_open: server.max_tunnels.unwrap_or(usize::MAX),
            })
            .collect();
        let addrs: Vec<SocketAddr> = config.servers.iter().map(|s| s.addr).collect();
        let weights: Vec<u32> = config.servers.iter().map(|s| s.weight).collect();
        Pool {
            name: name.to_owned(),
            members,
            balancer: Balancer::new(&config.balance, &addrs, &weights),
            turns: AtomicUsize::new(0),
            fail_timeout_ns: duration_ns(config.fail_timeout),
            slow_start_ns: duration_ns(config.slow_start),
            keepalive: Keepalive {
                // An upstream connection that began with one client's PROXY header cannot
                // carry another client's request.
                per_server: if config.send_proxy_protocol {
                    0
                } else {
                    config.keepalive
                },
                timeout_ns: duration_ns(config.keepalive_timeout),
            },
            send_proxy_protocol: config.send_proxy_protocol,
            health_check: config.health_check.clone(),
            rebalancing: config.rebalance.map(|rebalance| Rebalancing {
                interval_ns: 1_000_000_000 / u64::from(rebalance.per_second.max(1)),
                tolerance: rebalance.tolerance,
                next_ns: registry.rebalance_slot(name),
            }),
        }
    }

    /// Rebalancing is on and some server holds more than its share while another that may
    /// take connections holds less: tunnels on the former should move (see
    /// [`Pool::is_over_share`]).
    pub fn needs_rebalancing(&self, now_ns: u64) -> bool {
        let Some(rebalancing) = &self.rebalancing else {
            return false;
        };
        let (total, weights) = self.open_and_weights(now_ns);
        let below = |m: &Member| {
            self.takes_more(m, now_ns)
                && (m.state.open() as u128) * weights < total * u128::from(m.weight)
        };
        self.members.iter().any(below)
            && self
                .members
                .iter()
                .any(|m| rebalancing.over_share(m, total, weights))
    }

    /// Whether `addr` holds at least one tunnel more than its share of the pool's open
    /// connections and more than `1 + tolerance` times it (its share: by weight, among the
    /// servers that may take connections). False without rebalancing. Read live: each tunnel
    /// moved changes the answer for the next.
    pub fn is_over_share(&self, addr: SocketAddr, now_ns: u64) -> bool {
        let (Some(rebalancing), Some(member)) = (
            &self.rebalancing,
            self.members.iter().find(|m| m.state.addr == addr),
        ) else {
            return false;
        };
        let (total, weights) = self.open_and_weights(now_ns);
        rebalancing.over_share(member, total, weights)
    }

    /// Takes the next slot of the rebalancing rate at `now_ns`: true when a tunnel may move
    /// now (the pool's moves, over every worker, stay within `rate` a second).
    pub fn take_move(&self, now_ns: u64) -> bool {
        let Some(rebalancing) = &self.rebalancing else {
            return false;
        };
        let burst = 1_000_000_000u64.max(rebalancing.interval_ns);
        rebalancing
            .next_ns
            .try_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
                let earliest = now_ns.saturating_sub(burst) + rebalancing.interval_ns;
                (next <= now_ns).then(|| next.max(earliest) + rebalancing.interval_ns)
            })
            .is_ok()
    }

    /// Open connections on every server, and the weights of those that may take connections.
    fn open_and_weights(&self, now_ns: u64) -> (u128, u128) {
        let total = self.members.iter().map(|m| m.state.open() as u128).sum();
        let weights = self
            .members
            .iter()
            .filter(|m| self.takes_more(m, now_ns))
            .map(|m| u128::from(m.weight))
            .sum();
        (total, weights)
    }

    /// A server that may take new connections: up, not marked by a failure, under its
    /// `max_tunnels`.
    fn takes_more(&self, member: &Member, now_ns: u64) -> bool {
        member.state.is_up()
            && !member.state.is_marked(now_ns)
            && member.state.open() < member.max_open
    }

    /// How idle connections to this pool's servers are kept for plain HTTP requests.
    pub fn keepalive(&self) -> Keepalive {
        self.keepalive
    }

    /// The pool's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// No servers at all (its servers are all names not resolved yet, or none resolved).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Upstream connections begin with a PROXY v2 header (`send_proxy_protocol`).
    pub fn sends_proxy_protocol(&self) -> bool {
        self.send_proxy_protocol
    }

    /// What `consistent_hash` hashes, when the pool hashes.
    pub fn hash_key(&self) -> Option<&HashKey> {
        self.balancer.hash_key()
    }

    /// The servers to try for one new connection, in order (see the module docs): the
    /// balancer's choice at `now_ns` for `key` (the hashed key, when the pool hashes), then the
    /// fallbacks. Empty when no server may take a connection (every one at `max_tunnels`).
    pub fn plan(&self, now_ns: u64, key: u64) -> Vec<SocketAddr> {
        let turn = self.turns.fetch_add(1, Ordering::Relaxed);
        // One look at each server's atomics: the choice and the fallbacks agree.
        let any_up = self.members.iter().any(|m| m.state.is_up());
        let (takes, marked): (Vec<bool>, Vec<bool>) = self
            .members
            .iter()
            .map(|m| {
                let up = m.state.is_up() || !any_up;
                (up && m.state.open() < m.max_open, m.state.is_marked(now_ns))
            })
            .unzip();
        let mut loads: Vec<Load> = self
            .members
            .iter()
            .zip(takes.iter().zip(&marked))
            .map(|(m, (&takes, &marked))| Load {
                open: m.state.open(),
                weight: m.weight,
                ramp: self.ramp(&m.state, now_ns),
                eligible: takes && !marked,
            })
            .collect();
        let mut random = thread_random;
        let first = self
            .balancer
            .choose(&loads, turn, key, &mut random)
            .or_else(|| {
                // None unmarked may take it: choose among the marked ones.
                for (load, (&takes, &marked)) in loads.iter_mut().zip(takes.iter().zip(&marked)) {
                    load.eligible = takes && marked;
                }
                self.balancer.choose(&loads, turn, key, &mut random)
            });
        let Some(first) = first else {
            return Vec::new();
        };
        let count = self.members.len();
        let (unmarked, marked): (Vec<usize>, Vec<usize>) = (0..count)
            .map(|i| (turn + i) % count)
            .filter(|&i| i != first && takes[i])
            .partition(|&i| !marked[i]);
        std::iter::once(first)
            .chain(unmarked)
            .chain(marked)
            .map(|i| self.members[i].state.addr)
            .collect()
    }

    /// A server's share of new connections while it comes back (`slow_start`), in thousandths:
    /// from a tenth to all of it, linearly.
    fn ramp(&self, state: &ServerState, now_ns: u64) -> u32 {
        let since = state.back_since_ns(now_ns);
        if self.slow_start_ns == 0 || since == 0 {
            return FULL_RAMP;
        }
        let elapsed = now_ns.saturating_sub(since);
        if elapsed >= self.slow_start_ns {
            return FULL_RAMP;
        }
        let share =
            (u128::from(elapsed) * u128::from(FULL_RAMP) / u128::from(self.slow_start_ns)) as u32;
        share.max(FULL_RAMP / 10)
    }

    /// Counts a connection on `addr` if it is under its `max_tunnels` (`None`: full, or not a
    /// server of this pool). The count ends when the lease is dropped.
    pub fn lease(&self, addr: SocketAddr) -> Option<Lease> {
        let member = self.members.iter().find(|m| m.state.addr == addr)?;
        let open = &member.state.open;
        open.try_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < member.max_open).then_some(n + 1)
        })
        .ok()?;
        Some(Lease {
            server: Arc::clone(&member.state),
        })
    }

    /// Counts a connection on `addr` whatever its limit (a tunnel a predecessor handed over:
    /// it is open already). `None` when `addr` is not a server of this pool.
    pub fn lease_open(&self, addr: SocketAddr) -> Option<Lease> {
        let member = self.members.iter().find(|m| m.state.addr == addr)?;
        member.state.open.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            server: Arc::clone(&member.state),
        })
    }

    /// Marks `addr` as failed for `fail_timeout` (tried after the others), after a failed
    /// connect or a broken answer. The only server of a pool is never marked: there is
    /// nothing to prefer over it.
    pub fn report_failure(&self, addr: SocketAddr, now_ns: u64) {
        if self.fail_timeout_ns == 0 || self.members.len() < 2 {
            return;
        }
        for member in self.members.iter().filter(|m| m.state.addr == addr) {
            member.state.down_until_ns.store(
                now_ns.saturating_add(self.fail_timeout_ns),
                Ordering::Relaxed,
            );
        }
    }

    /// Whether `addr` is marked as failed at `now_ns` (for tests and logs).
    pub fn is_marked_down(&self, addr: SocketAddr, now_ns: u64) -> bool {
        self.members
            .iter()
            .any(|m| m.state.addr == addr && m.state.is_marked(now_ns))
    }
}

/// A random number for the balancer: a per-thread xorshift seeded from the standard
/// library's per-process keys (spreading choices needs no more).
fn thread_random() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(crate::clock::monotonic_ns());
            hasher.finish() | 1
        });
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

/// A per-server gauge: its name, its help text, and how to read it.
type Gauge = (&'static str, &'static str, fn(&ServerState) -> usize);

/// `text` as a Prometheus label value: backslash, double quote and newline escaped (a pool
/// name is any TOML key).
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Every server's state by pool and address, for as long as the process lives: each
/// generation's pools take their servers' states from here, the health checker finds what to
/// probe here, and `/metrics` reads it.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Servers>,
}

#[derive(Debug, Default)]
struct Servers {
    /// By (pool, address): the states of the current generation's servers, and of older ones'
    /// that still hold connections.
    by_key: HashMap<(String, SocketAddr), Arc<ServerState>>,
    /// The current generation's servers, in config order, with their pool's checks.
    current: Vec<Published>,
    /// Each pool's rebalancing slot (see `Rebalancing::next_ns`).
    rebalance_slots: HashMap<String, Arc<AtomicU64>>,
}

#[derive(Debug, Clone)]
struct Published {
    pool: String,
    state: Arc<ServerState>,
    check: Option<HealthCheck>,
}

impl Registry {
    /// The state of `addr` in `pool`: the one it had, or a new one.
    fn server(&self, pool: &str, addr: SocketAddr) -> Arc<ServerState> {
        let mut servers = self.lock();
        let state = servers
            .by_key
            .entry((pool.to_owned(), addr))
            .or_insert_with(|| Arc::new(ServerState::new(addr)));
        Arc::clone(state)
    }

    /// The rebalancing slot of `pool`: the one it had, or a new one.
    fn rebalance_slot(&self, pool: &str) -> Arc<AtomicU64> {
        Arc::clone(
            self.lock()
                .rebalance_slots
                .entry(pool.to_owned())
                .or_default(),
        )
    }

    /// `pools` are the current generation: their servers are what is checked and exported;
    /// states no pool lists any more are forgotten once their last connection is gone.
    pub fn publish(&self, pools: &[Pool]) {
        let current: Vec<Published> = pools
            .iter()
            .flat_map(|pool| {
                pool.members.iter().map(|member| Published {
                    pool: pool.name.clone(),
                    state: Arc::clone(&member.state),
                    check: pool.health_check.clone(),
                })
            })
            .collect();
        let mut servers = self.lock();
        servers.by_key.retain(|(pool, addr), state| {
            state.open() > 0
                || current
                    .iter()
                    .any(|p| &p.pool == pool && p.state.addr == *addr)
        });
        servers.current = current;
    }

    /// The servers the health checker probes now.
    pub fn targets(&self) -> Vec<Target> {
        self.lock()
            .current
            .iter()
            .filter_map(|published| {
                published.check.as_ref().map(|check| Target {
                    pool: published.pool.clone(),
                    addr: published.state.addr,
                    check: check.clone(),
                    health: Arc::clone(&published.state.health),
                })
            })
            .collect()
    }

    /// Appends the per-server gauges in the Prometheus text format: whether each server is up
    /// (its active checks; 1 without checks) and the connections it holds.
    pub fn render(&self, out: &mut String) {
        let current = self.lock().current.clone();
        let gauges: [Gauge; 2] = [
            (
                "upstream_server_up",
                "1 while the server's active health checks pass (or it has none), 0 once they took it out.",
                |state| usize::from(state.is_up()),
            ),
            (
                "upstream_server_tunnels",
                "Connections (tunnels and plain requests) the server holds.",
                ServerState::open,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP wsplice_{name} {help}");
            let _ = writeln!(out, "# TYPE wsplice_{name} gauge");
            for published in &current {
                let _ = writeln!(
                    out,
                    "wsplice_{name}{{pool=\"{}\",server=\"{}\"}} {}",
                    label_value(&published.pool),
                    published.state.addr,
                    value(&published.state)
                );
            }
        }
    }

    /// Every pool's servers with their state, as JSON (`GET /upstreams`): `{"pools": {NAME:
    /// [{"server": "IP:port", "up": true, "tunnels": N}, …]}}`.
    pub fn to_json(&self) -> String {
        let mut pools = serde_json::Map::new();
        for published in &self.lock().current {
            let servers = pools
                .entry(published.pool.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            if let serde_json::Value::Array(servers) = servers {
                servers.push(serde_json::json!({
                    "server": published.state.addr.to_string(),
                    "up": published.state.is_up(),
                    "tunnels": published.state.open(),
                }));
            }
        }
        let mut text = serde_json::json!({ "pools": pools }).to_string();
        text.push('\n');
        text
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Servers> {
        // Plain maps and vectors: usable after a panic elsewhere poisoned the lock.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Balance, ServerConfig};
    use std::time::Duration;

    fn config(servers: &[&str], fail_timeout: Duration) -> UpstreamConfig {
        UpstreamConfig {
            servers: servers
                .iter()
                .map(|s| ServerConfig::at(s.parse().unwrap()))
                .collect(),
            named: Vec::new(),
            balance: Balance::RoundRobin,
            slow_start: Duration::ZERO,
            send_proxy_protocol: false,
            health_check: None,
            rebalance: None,
            fail_timeout,
            keepalive: 0,
            keepalive_timeout: Duration::from_secs(60),
        }
    }

    fn pool(servers: &[&str], fail_timeout: Duration) -> Pool {
        Pool::new("p", &config(servers, fail_timeout), &Registry::default())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_rotates_the_first_choice_and_keeps_the_others_as_fallbacks() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::from_secs(10));
        let a = p.plan(0, 0);
        let b = p.plan(0, 0);
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
            assert_eq!(p.plan(2_000, 0), vec![addr("127.0.0.1:2"), dead]);
        }
        let later = 1_000 + 10_000_000_000;
        assert!(!p.is_marked_down(dead, later));
        let firsts: Vec<SocketAddr> = (0..2).map(|_| p.plan(later, 0)[0]).collect();
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
        assert_eq!(p.plan(5, 0).len(), 2);
    }

    #[test]
    fn the_only_server_of_a_pool_is_never_marked_down() {
        let p = pool(&["127.0.0.1:1"], Duration::from_secs(10));
        p.report_failure(addr("127.0.0.1:1"), 0);
        assert!(!p.is_marked_down(addr("127.0.0.1:1"), 5));
        assert_eq!(p.plan(5, 0), vec![addr("127.0.0.1:1")]);
    }

    #[test]
    fn zero_fail_timeout_never_marks_down() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO);
        p.report_failure(addr("127.0.0.1:1"), 0);
        assert!(!p.is_marked_down(addr("127.0.0.1:1"), 1));
    }

    #[test]
    fn leases_count_open_connections_and_least_connections_follows_them() {
        let mut c = config(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO);
        c.balance = Balance::LeastConnections;
        let p = Pool::new("p", &c, &Registry::default());
        let first = p.lease(addr("127.0.0.1:1")).unwrap();
        let _second = p.lease(addr("127.0.0.1:1")).unwrap();
        for _ in 0..3 {
            assert_eq!(p.plan(0, 0)[0], addr("127.0.0.1:2"));
        }
        let _third = p.lease(addr("127.0.0.1:2")).unwrap();
        drop(first);
        let firsts: Vec<SocketAddr> = (0..2).map(|_| p.plan(0, 0)[0]).collect();
        assert!(
            firsts.contains(&addr("127.0.0.1:1")),
            "one each: ties rotate"
        );
    }

    #[test]
    fn a_full_server_is_left_out_and_a_full_pool_has_no_plan() {
        let mut c = config(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO);
        c.servers[0].max_tunnels = Some(1);
        c.servers[1].max_tunnels = Some(1);
        let p = Pool::new("p", &c, &Registry::default());
        let _one = p.lease(addr("127.0.0.1:1")).unwrap();
        assert!(p.lease(addr("127.0.0.1:1")).is_none(), "a hard cap");
        assert_eq!(p.plan(0, 0), vec![addr("127.0.0.1:2")]);
        let _two = p.lease(addr("127.0.0.1:2")).unwrap();
        assert!(p.plan(0, 0).is_empty());
        assert!(
            p.lease_open(addr("127.0.0.1:2")).is_some(),
            "adopted tunnels count anyway"
        );
    }

    #[test]
    fn a_server_the_active_check_took_out_is_left_out_unless_all_are() {
        let registry = Registry::default();
        let p = Pool::new(
            "p",
            &config(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO),
            &registry,
        );
        let down = &p.members[0].state.health;
        for _ in 0..3 {
            down.record(false, 2, 3, 10);
        }
        for _ in 0..4 {
            assert_eq!(p.plan(20, 0), vec![addr("127.0.0.1:2")]);
        }
        let other = &p.members[1].state.health;
        for _ in 0..3 {
            other.record(false, 2, 3, 10);
        }
        assert_eq!(p.plan(20, 0).len(), 2, "all out: all are tried");
    }

    #[test]
    fn a_reload_keeps_each_servers_state_and_forgets_idle_removed_ones() {
        let registry = Registry::default();
        let old = Pool::new(
            "p",
            &config(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO),
            &registry,
        );
        registry.publish(std::slice::from_ref(&old));
        let lease = old.lease(addr("127.0.0.1:1")).unwrap();
        let next = Pool::new(
            "p",
            &config(&["127.0.0.1:1", "127.0.0.1:3"], Duration::ZERO),
            &registry,
        );
        registry.publish(std::slice::from_ref(&next));
        assert_eq!(
            next.members[0].state.open(),
            1,
            "the old generation's tunnel counts"
        );
        assert_eq!(
            registry.lock().by_key.len(),
            2,
            "the removed idle server is forgotten"
        );
        drop(lease);
        assert_eq!(next.members[0].state.open(), 0);
        let mut text = String::new();
        registry.render(&mut text);
        assert!(
            text.contains("wsplice_upstream_server_up{pool=\"p\",server=\"127.0.0.1:3\"} 1"),
            "{text}"
        );
        assert!(!text.contains("127.0.0.1:2"), "{text}");
    }

    #[test]
    fn rebalancing_moves_tunnels_off_servers_above_their_share_at_its_rate() {
        let mut c = config(
            &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
            Duration::ZERO,
        );
        c.rebalance = Some(crate::config::Rebalance {
            per_second: 10,
            tolerance: 10,
        });
        let p = Pool::new("p", &c, &Registry::default());
        let (one, two, three) = (
            addr("127.0.0.1:1"),
            addr("127.0.0.1:2"),
            addr("127.0.0.1:3"),
        );
        // 30 tunnels on two servers, the third just added: 15 each against a share of 10.
        let mut leases: Vec<Lease> = (0..15).map(|_| p.lease(one).unwrap()).collect();
        leases.extend((0..15).map(|_| p.lease(two).unwrap()));
        assert!(p.needs_rebalancing(0));
        assert!(p.is_over_share(one, 0) && p.is_over_share(two, 0));
        assert!(!p.is_over_share(three, 0));
        // Ten a second: one now, the next 100 ms later (a second's burst at most).
        let now = 5_000_000_000;
        let taken = (0..20).filter(|_| p.take_move(now)).count();
        assert_eq!(taken, 10, "a second's worth saved up, no more");
        assert!(!p.take_move(now + 50_000_000));
        assert!(p.take_move(now + 100_000_000));
        // Evened out: 10, 10, 10 (moved tunnels reconnected to the third).
        leases.drain(..5);
        leases.drain(10..15);
        leases.extend((0..10).map(|_| p.lease(three).unwrap()));
        assert!(!p.needs_rebalancing(0));
        // Within the tolerance: 11, 10, 9 is left alone.
        let _extra = p.lease(one).unwrap();
        drop(leases.pop()); // one of the third's
        assert!(
            !p.is_over_share(one, 0),
            "11 against a share of 10 is within 10%"
        );
    }

    #[test]
    fn a_new_generation_of_a_pool_grants_no_new_burst_of_moves() {
        let mut c = config(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO);
        c.rebalance = Some(crate::config::Rebalance {
            per_second: 10,
            tolerance: 10,
        });
        let registry = Registry::default();
        let first = Pool::new("p", &c, &registry);
        let now = 5_000_000_000;
        assert_eq!((0..20).filter(|_| first.take_move(now)).count(), 10);
        let reloaded = Pool::new("p", &c, &registry);
        assert!(!reloaded.take_move(now), "the burst was spent");
        assert!(reloaded.take_move(now + 100_000_000));
    }

    #[test]
    fn without_rebalancing_nothing_is_over_its_share() {
        let p = pool(&["127.0.0.1:1", "127.0.0.1:2"], Duration::ZERO);
        let _leases: Vec<Lease> = (0..5)
            .map(|_| p.lease(addr("127.0.0.1:1")).unwrap())
            .collect();
        assert!(!p.needs_rebalancing(0));
        assert!(!p.take_move(0));
    }

    #[test]
    fn slow_start_ramps_a_server_back_from_a_tenth_of_its_share() {
        let mut c = config(&["127.0.0.1:1", "127.0.0.1:2"], Duration::from_secs(1));
        c.slow_start = Duration::from_secs(10);
        let p = Pool::new("p", &c, &Registry::default());
        p.report_failure(addr("127.0.0.1:1"), 0);
        let back = 1_000_000_000;
        let state = &p.members[0].state;
        assert_eq!(p.ramp(state, back), FULL_RAMP / 10);
        assert_eq!(p.ramp(state, back + 5_000_000_000), FULL_RAMP / 2);
        assert_eq!(p.ramp(state, back + 10_000_000_000), FULL_RAMP);
        assert_eq!(
            p.ramp(&p.members[1].state, back),
            FULL_RAMP,
            "never went away"
        );
    }
}
