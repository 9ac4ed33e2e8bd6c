//! How a pool picks the first server for a new connection (`balance`): pure functions over the
//! servers' loads, so each policy is unit-tested without a socket or a clock.
//!
//! The pool ([`super::Pool`]) decides which servers may take a connection at all (health,
//! `max_tunnels`) and passes their loads; the balancer only chooses among them. Loads are
//! *open* connections: a WebSocket tunnel lives for hours, so what a server holds now matters,
//! not how many it was given.

use std::net::SocketAddr;

use crate::config::{Balance, HashKey};
use crate::hash::spread;

/// Points a server of weight 1 puts on the consistent-hash ring: enough for shares within a
/// few percent of their weights with a handful of servers.
const POINTS_PER_WEIGHT: usize = 64;
/// A slow-start share in thousandths: a server's full share.
pub const FULL_RAMP: u32 = 1000;

/// A server as the balancer sees it when it chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Connections it holds now.
    pub open: usize,
    /// Its configured weight (1–256).
    pub weight: u32,
    /// Its slow-start share in thousandths ([`FULL_RAMP`] once it has fully come back).
    pub ramp: u32,
    /// It may take a connection (healthy, under `max_tunnels`).
    pub eligible: bool,
}

impl Load {
    /// Its weight as it counts now: the configured one scaled by its slow-start share.
    fn share(&self) -> u64 {
        u64::from(self.weight) * u64::from(self.ramp.clamp(1, FULL_RAMP))
    }

    /// True when it is less loaded than `other` for its share: `(open + 1) / share` compared by
    /// cross-multiplying (the `+ 1` counts the connection being placed, so a share of zero
    /// open connections still tells weights apart).
    fn lighter_than(&self, other: &Load) -> bool {
        let mine = (self.open as u128 + 1) * u128::from(other.share());
        let theirs = (other.open as u128 + 1) * u128::from(self.share());
        mine < theirs
    }
}

/// A pool's balancing policy with what it precomputes from the servers.
#[derive(Debug)]
pub enum Balancer {
    /// In turn along a weighted schedule.
    RoundRobin {
        /// Server indices, each as often as its weight, interleaved (smooth weighted round
        /// robin, as nginx spreads them).
        schedule: Vec<u16>,
    },
    /// The lightest for its weight.
    LeastConnections,
    /// The key's place on a ring of server points, with bounded loads.
    ConsistentHash {
        /// What is hashed.
        key: HashKey,
        /// A server takes at most this many hundredths of its fair share.
        load_factor: u32,
        /// (point, server index), sorted by point.
        ring: Vec<(u64, u16)>,
    },
    /// The lighter of two picked at random.
    RandomTwo,
}

impl Balancer {
    /// The balancer of `balance` over servers at `addrs` with `weights` (same order; at most
    /// `u16::MAX` servers, which the config's sizes keep far from).
    pub fn new(balance: &Balance, addrs: &[SocketAddr], weights: &[u32]) -> Balancer {
        match balance {
            Balance::RoundRobin => Balancer::RoundRobin {
                schedule: smooth_schedule(weights),
            },
            Balance::LeastConnections => Balancer::LeastConnections,
            Balance::ConsistentHash { key, load_factor } => Balancer::ConsistentHash {
                key: key.clone(),
                load_factor: *load_factor,
                ring: ring(addrs, weights),
            },
            Balance::RandomTwo => Balancer::RandomTwo,
        }
    }

    /// The key this balancer hashes, if it hashes one.
    pub fn hash_key(&self) -> Option<&HashKey> {
        match self {
            Balancer::ConsistentHash { key, .. } => Some(key),
            _ => None,
        }
    }

    /// Picks the server for a new connection among the eligible `loads`: `turn` is the pool's
    /// counter of choices (round robin's position, where least connections starts looking so
    /// ties rotate), `key` the hashed key (consistent hashing), `random` a source of random
    /// numbers (random two, and round robin's slow start). `None` when none is eligible.
    pub fn choose(
        &self,
        loads: &[Load],
        turn: usize,
        key: u64,
        random: &mut impl FnMut() -> u64,
    ) -> Option<usize> {
        if !loads.iter().any(|load| load.eligible) {
            return None;
        }
        match self {
            Balancer::RoundRobin { schedule } => Some(round_robin(schedule, loads, turn, random)),
            Balancer::LeastConnections => least_loaded(loads, turn),
            Balancer::ConsistentHash {
                load_factor, ring, ..
            } => bounded_hash(ring, loads, key, *load_factor).or_else(|| least_loaded(loads, turn)),
            Balancer::RandomTwo => random_two(loads, random),
        }
    }
}

/// Smooth weighted round robin: each step adds every server's weight to its credit and picks
/// the one with the most, which then pays the total. Over `sum(weights)` steps each server is
/// picked as often as its weight, spread out rather than in runs.
fn smooth_schedule(weights: &[u32]) -> Vec<u16> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut credit = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (credit, weight) in credit.iter_mut().zip(&weights) {
            *credit += weight;
        }
        let best = (0..credit.len())
            .max_by_key(|&i| (credit[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        credit[best] -= total;
        schedule.push(best as u16);
    }
    schedule
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The schedule's next eligible server from `turn` on. A server in slow start is passed over
/// with the probability of the share it has not regained yet.
fn round_robin(
    schedule: &[u16],
    loads: &[Load],
    turn: usize,
    random: &mut impl FnMut() -> u64,
) -> usize {
    let len = schedule.len().max(1);
    let mut fallback = None;
    for step in 0..len {
        let index = usize::from(schedule[(turn + step) % len]);
        let Some(load) = loads.get(index).filter(|load| load.eligible) else {
            continue;
        };
        fallback.get_or_insert(index);
        if load.ramp >= FULL_RAMP || (random() % u64::from(FULL_RAMP)) < u64::from(load.ramp) {
            return index;
        }
    }
    // Every eligible server is ramping and each said no this time: the first still takes it.
    fallback.unwrap_or(0)
}

/// The eligible server with the fewest open connections for its share, looking from `start`
/// on so that ties rotate.
fn least_loaded(loads: &[Load], start: usize) -> Option<usize> {
    let count = loads.len();
    let mut best: Option<usize> = None;
    for step in 0..count {
        let index = (start + step) % count;
        let load = &loads[index];
        if !load.eligible {
            continue;
        }
        if best.is_none_or(|b| load.lighter_than(&loads[b])) {
            best = Some(index);
        }
    }
    best
}

/// The lighter of two distinct eligible servers picked at random (the only one if one).
fn random_two(loads: &[Load], random: &mut impl FnMut() -> u64) -> Option<usize> {
    let eligible: Vec<usize> = (0..loads.len()).filter(|&i| loads[i].eligible).collect();
    match eligible.len() {
        0 => None,
        1 => Some(eligible[0]),
        count => {
            let first = (random() % count as u64) as usize;
            // A second pick among the others: distinct without retrying.
            let second = (first + 1 + (random() % (count as u64 - 1)) as usize) % count;
            let (a, b) = (eligible[first], eligible[second]);
            Some(if loads[b].lighter_than(&loads[a]) {
                b
            } else {
                a
            })
        }
    }
}

/// Every server's points on the ring: `POINTS_PER_WEIGHT × weight` points each, placed by a
/// stable hash of its address, so proxies with the same servers build the same ring whatever
/// the order they list them in.
fn ring(addrs: &[SocketAddr], weights: &[u32]) -> Vec<(u64, u16)> {
    let mut ring = Vec::new();
    for (index, (addr, weight)) in addrs.iter().zip(weights).enumerate() {
        for point in 0..POINTS_PER_WEIGHT * *weight as usize {
            let name = format!("{addr}#{point}");
            ring.push((spread(name.as_bytes()), index as u16));
        }
    }
    ring.sort_unstable();
    ring
}

/// Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): the first
/// server clockwise from the key whose open connections are under its cap, the cap being
/// `load_factor` hundredths of its share of all open connections plus this one (and one more,
/// see below). A hot key
/// spills to the next server instead of overloading its own. `None` only when every eligible
/// server is at its cap (rounding can do that with tiny loads).
fn bounded_hash(ring: &[(u64, u16)], loads: &[Load], key: u64, load_factor: u32) -> Option<usize> {
    if ring.is_empty() {
        return None;
    }
    let eligible = || loads.iter().filter(|load| load.eligible);
    let total_open: u128 = eligible().map(|load| load.open as u128).sum::<u128>() + 1;
    let total_share: u128 = eligible().map(|load| u128::from(load.share())).sum();
    let under_cap = |load: &Load| {
        // open < ceil(factor/100 × total × share / total_share) + 1, in integers. The one
        // over the paper's bound keeps keys on their server at low loads, where the bound is
        // a single connection and a client reconnecting before its old connection is closed
        // would otherwise be sent elsewhere; at the loads the bound is for, one is nothing.
        let cap_times = u128::from(load_factor) * total_open * u128::from(load.share());
        let denominator = 100 * total_share;
        let cap = cap_times.div_ceil(denominator.max(1)) + 1;
        (load.open as u128) < cap
    };
    let start = ring.partition_point(|&(point, _)| point < key);
    let mut seen = vec![false; loads.len()];
    let mut left = loads.len();
    for step in 0..ring.len() {
        let index = usize::from(ring[(start + step) % ring.len()].1);
        if std::mem::replace(&mut seen[index], true) {
            continue;
        }
        let load = &loads[index];
        if load.eligible && under_cap(load) {
            return Some(index);
        }
        left -= 1;
        if left == 0 {
            break;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(open: &[usize]) -> Vec<Load> {
        open.iter()
            .map(|&open| Load {
                open,
                weight: 1,
                ramp: FULL_RAMP,
                eligible: true,
            })
            .collect()
    }

    fn addrs(count: usize) -> Vec<SocketAddr> {
        (0..count)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)))
            .collect()
    }

    /// A deterministic xorshift for the tests.
    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed | 1;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    #[test]
    fn the_weighted_schedule_gives_each_server_its_weight_spread_out() {
        let schedule = smooth_schedule(&[5, 1, 1]);
        assert_eq!(schedule.len(), 7);
        assert_eq!(schedule.iter().filter(|&&i| i == 0).count(), 5);
        // nginx's example: a a b a c a a (b and c are not next to each other).
        assert_eq!(schedule, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(
            smooth_schedule(&[2, 2]),
            vec![0, 1],
            "weights are reduced by their gcd"
        );
    }

    #[test]
    fn round_robin_skips_servers_that_cannot_take_a_connection() {
        let balancer = Balancer::new(&Balance::RoundRobin, &addrs(3), &[1, 1, 1]);
        let mut l = loads(&[0, 0, 0]);
        l[1].eligible = false;
        let mut random = rng(1);
        let picks: Vec<usize> = (0..6)
            .map(|turn| balancer.choose(&l, turn, 0, &mut random).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 2, 2, 0, 2, 2]);
        l[0].eligible = false;
        l[2].eligible = false;
        assert_eq!(balancer.choose(&l, 0, 0, &mut random), None);
    }

    #[test]
    fn least_connections_picks_the_lightest_for_its_weight_and_rotates_ties() {
        let balancer = Balancer::new(&Balance::LeastConnections, &addrs(3), &[1, 1, 1]);
        let mut random = rng(1);
        assert_eq!(
            balancer.choose(&loads(&[3, 1, 2]), 0, 0, &mut random),
            Some(1)
        );
        let ties: Vec<usize> = (0..3)
            .map(|turn| {
                balancer
                    .choose(&loads(&[1, 1, 1]), turn, 0, &mut random)
                    .unwrap()
            })
            .collect();
        assert_eq!(ties, vec![0, 1, 2]);
        let mut weighted = loads(&[3, 2]);
        weighted[0].weight = 2;
        // 4/2 against 3/1: the heavier server is the lighter loaded.
        assert_eq!(balancer.choose(&weighted, 1, 0, &mut random), Some(0));
    }

    #[test]
    fn least_connections_keeps_open_connections_even_under_random_lifetimes() {
        let balancer = Balancer::new(&Balance::LeastConnections, &addrs(4), &[1, 1, 1, 1]);
        let mut random = rng(7);
        let mut open: Vec<Vec<u64>> = vec![Vec::new(); 4];
        for now in 0..10_000u64 {
            for ends in open.iter_mut() {
                ends.retain(|&end| end > now);
            }
            let l = loads(&open.iter().map(Vec::len).collect::<Vec<_>>());
            let pick = balancer.choose(&l, now as usize, 0, &mut random).unwrap();
            open[pick].push(now + 1 + random() % 500);
        }
        let counts: Vec<usize> = open.iter().map(Vec::len).collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "{counts:?}");
    }

    #[test]
    fn a_ramping_server_gets_a_smaller_share() {
        let balancer = Balancer::new(&Balance::LeastConnections, &addrs(2), &[1, 1]);
        let mut l = loads(&[10, 2]);
        l[1].ramp = 100; // a tenth of its share: 3/0.1 is heavier than 11/1
        assert_eq!(balancer.choose(&l, 0, 0, &mut rng(1)), Some(0));

        let rr = Balancer::new(&Balance::RoundRobin, &addrs(2), &[1, 1]);
        let mut random = rng(3);
        let to_ramping = (0..2000)
            .filter(|&turn| rr.choose(&l, turn, 0, &mut random) == Some(1))
            .count();
        assert!((50..250).contains(&to_ramping), "{to_ramping} of 2000");
    }

    #[test]
    fn random_two_prefers_the_lighter_and_spreads_evenly() {
        let balancer = Balancer::new(&Balance::RandomTwo, &addrs(2), &[1, 1]);
        let mut random = rng(5);
        for _ in 0..50 {
            assert_eq!(balancer.choose(&loads(&[5, 1]), 0, 0, &mut random), Some(1));
        }
        let balancer = Balancer::new(&Balance::RandomTwo, &addrs(4), &[1, 1, 1, 1]);
        let mut counts = vec![0usize; 4];
        for _ in 0..4000 {
            let pick = balancer.choose(&loads(&counts), 0, 0, &mut random).unwrap();
            counts[pick] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 10, "{counts:?}");
    }

    fn hashing(load_factor: u32, servers: &[SocketAddr]) -> Balancer {
        let weights = vec![1; servers.len()];
        let balance = Balance::ConsistentHash {
            key: HashKey::ClientIp,
            load_factor,
        };
        Balancer::new(&balance, servers, &weights)
    }

    #[test]
    fn a_key_goes_to_the_same_server_whatever_the_order_servers_are_listed_in() {
        let servers = addrs(4);
        let mut reversed = servers.clone();
        reversed.reverse();
        let (a, b) = (hashing(125, &servers), hashing(125, &reversed));
        let mut random = rng(1);
        for key in 0..200u64 {
            let key = spread(&key.to_le_bytes());
            let first = a.choose(&loads(&[0; 4]), 0, key, &mut random).unwrap();
            let second = b.choose(&loads(&[0; 4]), 9, key, &mut random).unwrap();
            assert_eq!(servers[first], reversed[second]);
        }
    }

    #[test]
    fn adding_a_server_moves_only_its_share_of_keys() {
        let four = hashing(10_000, &addrs(4));
        let five = hashing(10_000, &addrs(5));
        let mut random = rng(1);
        let keys: Vec<u64> = (0..4000u64).map(|k| spread(&k.to_le_bytes())).collect();
        let moved = keys
            .iter()
            .filter(|&&key| {
                four.choose(&loads(&[0; 4]), 0, key, &mut random)
                    != five.choose(&loads(&[0; 5]), 0, key, &mut random)
            })
            .count();
        // A fifth of the keys belongs to the new server; a few percent either way.
        assert!((600..1000).contains(&moved), "{moved} of 4000 moved");
    }

    #[test]
    fn a_hot_key_spills_over_instead_of_overloading_its_server() {
        let balancer = hashing(125, &addrs(4));
        let mut random = rng(1);
        let key = spread(b"hot");
        let mut open = vec![0usize; 4];
        for _ in 0..400 {
            let pick = balancer.choose(&loads(&open), 0, key, &mut random).unwrap();
            open[pick] += 1;
        }
        // Each server holds at most 1.25 × its share (100) of the 400, rounded up, and one.
        assert!(open.iter().all(|&n| n <= 127), "{open:?}");
        assert!(open.iter().filter(|&&n| n > 0).count() >= 4, "{open:?}");
    }

    #[test]
    fn hashing_skips_servers_that_cannot_take_a_connection() {
        let balancer = hashing(125, &addrs(3));
        let mut random = rng(1);
        let key = spread(b"user-42");
        let first = balancer
            .choose(&loads(&[0; 3]), 0, key, &mut random)
            .unwrap();
        let mut l = loads(&[0; 3]);
        l[first].eligible = false;
        let second = balancer.choose(&l, 0, key, &mut random).unwrap();
        assert_ne!(first, second);
    }
}
