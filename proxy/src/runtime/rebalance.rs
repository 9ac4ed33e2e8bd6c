//! The workers' part of rebalancing (`[upstream.NAME.rebalance]`): once per tick, while a pool
//! of the current generation has a server above its share, a worker walks a stretch of its
//! table and closes tunnels on such servers (a Close 1012 each, `Connection::rebalance`), as
//! the pool's rate allows. Which server is above its share, and the rate, are the pool's
//! (`upstream.rs`); this is only the walk.

use std::sync::Arc;

use super::worker::Worker;

/// Connections looked at per tick while a pool needs rebalancing: the walk over a large table
/// is spread over ticks, and a tick stays short.
const SLOTS_PER_TICK: usize = 4096;

impl Worker {
    /// Closes tunnels on servers above their share, within the pools' rates.
    pub(super) fn rebalance(&mut self, now: u64) {
        if self.drain_deadline_ns.is_some() {
            return; // shutting down: the drain closes everything anyway
        }
        let current = Arc::clone(&self.services);
        let needing: Vec<&crate::upstream::Pool> = current
            .pools
            .iter()
            .filter(|pool| pool.needs_rebalancing(now))
            .collect();
        if needing.is_empty() {
            return;
        }
        let (slots, next) = self.table.slots_from(self.rebalance_cursor, SLOTS_PER_TICK);
        self.rebalance_cursor = next;
        for slot in slots {
            let Some(entry) = self.table.get(slot).filter(|e| e.conn.is_open_tunnel()) else {
                continue;
            };
            // The tunnel's pool in its own generation, found by name in the current one.
            let (Some(route), Some(server)) = (entry.conn.route(), entry.conn.upstream_addr())
            else {
                continue;
            };
            let Some(name) = entry
                .services
                .routes
                .get(route)
                .and_then(|route| entry.services.pools.get(route.pool))
                .map(|pool| pool.name())
            else {
                continue;
            };
            let Some(pool) = needing.iter().find(|pool| pool.name() == name) else {
                continue;
            };
            if !pool.is_over_share(server, now) || !pool.take_move(now) {
                continue;
            }
            self.drive(slot, |conn, services, out| {
                conn.rebalance(now, services, out);
            });
        }
    }
}
