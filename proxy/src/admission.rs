//! Admission control: how many client connections the proxy holds, in all and per client
//! address (`limits.max_connections`, `limits.max_connections_per_ip`). A connection over a
//! limit is closed at once, before a byte of it is read.
//!
//! Shared by all workers (a client's connections land on any worker): the total is one atomic,
//! the per-address counts are sharded maps locked once when a connection opens and once when
//! it closes, never per message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Shards of the per-address counts (a power of two).
const SHARDS: usize = 16;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `limits.max_connections` are open.
    Total,
    /// `limits.max_connections_per_ip` are open from this address.
    PerAddress,
    /// The worker has `limits.max_tls_handshakes` TLS handshakes in progress (a handshake
    /// costs far more CPU than a connection: this caps what a flood of them can take).
    TlsHandshakes,
}

/// The limits and the counts they apply to.
#[derive(Debug)]
pub struct Admission {
    max_total: Option<usize>,
    max_per_address: Option<usize>,
    open: AtomicUsize,
    per_address: [Mutex<HashMap<IpAddr, usize>>; SHARDS],
}

impl Admission {
    /// Admission with these limits (`None`: no limit).
    pub fn new(max_total: Option<usize>, max_per_address: Option<usize>) -> Admission {
        Admission {
            max_total,
            max_per_address,
            open: AtomicUsize::new(0),
            per_address: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    /// Takes a place for a connection from `ip`, or says which limit refuses it. Every admitted
    /// connection must be [`Admission::release`]d once, with its address.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.admit_connection()?;
        self.admit_address(ip).inspect_err(|_| self.release(None))
    }

    /// Takes a place for a connection whose client address is not known yet (a PROXY header
    /// will say it): only the total limit applies. Its address is counted later by
    /// [`Admission::admit_address`] (a load balancer's own address must not count against
    /// `max_connections_per_ip`).
    pub fn admit_connection(&self) -> Result<(), Refusal> {
        if self.unlimited() {
            return Ok(());
        }
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        if self.max_total.is_some_and(|max| before >= max) {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        }
        Ok(())
    }

    /// Counts `ip` for a connection already holding its place (see
    /// [`Admission::admit_connection`]), or refuses it; refused, the connection still holds
    /// its place until it is released without an address.
    pub fn admit_address(&self, ip: IpAddr) -> Result<(), Refusal> {
        let Some(max) = self.max_per_address else {
            return Ok(());
        };
        let ip = ip.to_canonical();
        let mut shard = self.shard(ip);
        let count = shard.entry(ip).or_insert(0);
        if *count >= max {
            return Err(Refusal::PerAddress);
        }
        *count += 1;
        Ok(())
    }

    /// Counts a connection from `ip` that is already open whatever the limits say (one a
    /// predecessor handed over in a binary upgrade): it takes its place, and later admissions
    /// see it.
    pub fn count(&self, ip: IpAddr) {
        if self.unlimited() {
            return;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        if self.max_per_address.is_some() {
            *self
                .shard(ip.to_canonical())
                .entry(ip.to_canonical())
                .or_insert(0) += 1;
        }
    }

    /// Gives back the place of an admitted connection, and the count of its address when it
    /// holds one (`None`: admitted without, see [`Admission::admit_connection`]).
    pub fn release(&self, ip: Option<IpAddr>) {
        if self.unlimited() {
            return;
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
        let (Some(ip), Some(_)) = (ip, self.max_per_address) else {
            return;
        };
        let ip = ip.to_canonical();
        let mut shard = self.shard(ip);
        if let Some(count) = shard.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                shard.remove(&ip);
            }
        }
    }

    /// No limit is set: nothing is counted (the default costs nothing per connection).
    fn unlimited(&self) -> bool {
        self.max_total.is_none() && self.max_per_address.is_none()
    }

    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        use std::hash::{BuildHasher as _, RandomState};
        // A fixed hasher per process would do; RandomState keeps an attacker from picking
        // addresses that all land in one shard.
        static STATE: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let hash = STATE.get_or_init(RandomState::new).hash_one(ip);
        let shard = &self.per_address[hash as usize & (SHARDS - 1)];
        // A panic while holding the lock cannot leave a count half-updated (plain integers):
        // the data is usable after poisoning.
        shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_total_limit_refuses_until_a_place_is_released() {
        let admission = Admission::new(Some(2), None);
        assert_eq!(admission.admit(ip("10.0.0.1")), Ok(()));
        assert_eq!(admission.admit(ip("10.0.0.2")), Ok(()));
        assert_eq!(admission.admit(ip("10.0.0.3")), Err(Refusal::Total));
        admission.release(Some(ip("10.0.0.1")));
        assert_eq!(admission.admit(ip("10.0.0.3")), Ok(()));
    }

    #[test]
    fn the_per_address_limit_counts_each_address_alone() {
        let admission = Admission::new(None, Some(2));
        for _ in 0..2 {
            assert_eq!(admission.admit(ip("10.0.0.1")), Ok(()));
        }
        assert_eq!(admission.admit(ip("10.0.0.1")), Err(Refusal::PerAddress));
        // The same address through an IPv6 socket is the same client.
        assert_eq!(
            admission.admit(ip("::ffff:10.0.0.1")),
            Err(Refusal::PerAddress)
        );
        assert_eq!(admission.admit(ip("10.0.0.2")), Ok(()));
        admission.release(Some(ip("10.0.0.1")));
        assert_eq!(admission.admit(ip("10.0.0.1")), Ok(()));
        // A refusal took no place: two admitted from .1, one from .2.
        assert_eq!(admission.open.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn an_address_known_later_counts_only_once_it_is_known() {
        let admission = Admission::new(Some(3), Some(1));
        // Two connections from a load balancer: its address is not counted.
        assert_eq!(admission.admit_connection(), Ok(()));
        assert_eq!(admission.admit_connection(), Ok(()));
        assert_eq!(admission.admit_address(ip("10.0.0.1")), Ok(()));
        assert_eq!(
            admission.admit_address(ip("10.0.0.1")),
            Err(Refusal::PerAddress)
        );
        // The refused one still holds its place until released without an address.
        assert_eq!(admission.admit_connection(), Ok(()));
        assert_eq!(admission.admit_connection(), Err(Refusal::Total));
        admission.release(None);
        admission.release(Some(ip("10.0.0.1")));
        assert_eq!(admission.admit(ip("10.0.0.1")), Ok(()));
        assert_eq!(admission.open.load(Ordering::Relaxed), 2);
    }
}
