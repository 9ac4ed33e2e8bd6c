//! Local ports for upstream connections that may be packet-spliced.
//!
//! A packet-spliced tunnel lives on in the tc program after the proxy has closed its sockets
//! silently (TCP_REPAIR): the kernel thinks the proxy↔upstream connection's local port is free,
//! but a new connection on the same 4-tuple would collide with the flow the program still
//! translates. So the proxy chooses those local ports itself, from a range the kernel's
//! ephemeral allocator never hands out (`net.ipv4.ip_local_reserved_ports`), and keeps a port
//! taken until the spliced flow is retired.
//!
//! - [`PortRange`]: the range, as written in the config (`40000-59999`).
//! - [`PortAllocator`]: which ports are taken, per (local address, remote address); no I/O.
//! - [`SharedPorts`]: one allocator behind a mutex for several workers; or
//!   [`PortRange::split`] gives each worker its own disjoint sub-range and allocator.
//! - [`reserve`]: adds the range to `ip_local_reserved_ports`.
//! - [`bind_local_port`]: binds a socket to the chosen port, shareable across upstreams.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Where the kernel keeps the ports its ephemeral allocator must not hand out. One sysctl for
/// IPv4 and IPv6 alike (the IPv6 stack reads the same per-namespace bitmap).
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// A range of local ports, both ends included, e.g. 40000..=59999 (written `40000-59999`).
///
/// The fields are public for plain construction; a range with `last < first` is empty
/// ([`PortRange::len`] is 0, an allocator over it never hands out a port). [`PortRange::new`]
/// and parsing reject such ranges, and port 0 (it means "any port" to `bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// The lowest port of the range.
    pub first: u16,
    /// The highest port of the range (included).
    pub last: u16,
}

/// Why a port range (or the kernel's reserved-ports list) could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// An end of the range is not a number from 0 to 65535.
    #[error("{0:?} is not a port number")]
    Port(String),
    /// Port 0 means "any port" to `bind`: a range to allocate from cannot include it.
    #[error("port 0 cannot be in a port range (it means \"any port\")")]
    Zero,
    /// The range ends before it starts.
    #[error("port range {first}-{last} ends before it starts")]
    Reversed {
        /// The first end as written.
        first: u16,
        /// The last end as written, lower than `first`.
        last: u16,
    },
}

impl PortRange {
    /// The range `first..=last`, checked: not reversed, no port 0.
    pub fn new(first: u16, last: u16) -> Result<PortRange, PortRangeError> {
        if first == 0 {
            return Err(PortRangeError::Zero);
        }
        if last < first {
            return Err(PortRangeError::Reversed { first, last });
        }
        Ok(PortRange { first, last })
    }

    /// How many ports the range holds (0 if `last < first`).
    pub fn len(&self) -> usize {
        if self.last < self.first {
            0
        } else {
            usize::from(self.last - self.first) + 1
        }
    }

    /// Whether the range holds no port (only when built with `last < first`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    /// Whether every port of `other` is in this range (an empty `other` is).
    pub fn covers(&self, other: &PortRange) -> bool {
        other.is_empty() || (self.first <= other.first && other.last <= self.last)
    }

    /// The range cut into `n` disjoint consecutive sub-ranges whose sizes differ by at most one,
    /// for one [`PortAllocator`] per worker without a shared lock. Fewer than `n` when the range
    /// has fewer than `n` ports (each then holds one); none when `n` is 0 or the range is empty.
    pub fn split(&self, n: usize) -> Vec<PortRange> {
        let len = self.len();
        let n = n.min(len);
        if n == 0 {
            return Vec::new();
        }
        let (base, extra) = (len / n, len % n);
        let mut parts = Vec::with_capacity(n);
        let mut first = usize::from(self.first);
        for i in 0..n {
            let size = base + usize::from(i < extra);
            let last = first + size - 1;
            // Both ends lie within `self.first..=self.last`, so they fit in a u16.
            parts.push(PortRange {
                first: u16::try_from(first).unwrap_or(u16::MAX),
                last: u16::try_from(last).unwrap_or(u16::MAX),
            });
            first = last + 1;
        }
        parts
    }
}

/// `first-last` or `first`, each end a number from 0 to 65535, `first <= last`. Port 0 is
/// allowed here: the kernel's reserved-ports list may name it.
fn parse_bounds(text: &str) -> Result<PortRange, PortRangeError> {
    let port = |text: &str| {
        text.trim()
            .parse::<u16>()
            .map_err(|_| PortRangeError::Port(text.trim().to_owned()))
    };
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (port(first)?, port(last)?),
        None => {
            let only = port(text)?;
            (only, only)
        }
    };
    if last < first {
        return Err(PortRangeError::Reversed { first, last });
    }
    Ok(PortRange { first, last })
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    /// `40000-59999`, or one port (`40000`); spaces around the numbers are ignored.
    fn from_str(text: &str) -> Result<PortRange, PortRangeError> {
        let range = parse_bounds(text)?;
        PortRange::new(range.first, range.last)
    }
}

impl fmt::Display for PortRange {
    /// `first-last`, or `first` for a one-port range: the kernel's own list format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One bit per port of the range, set when taken. Padding bits past the range's end are set
/// too, so a scan never finds them free.
#[derive(Debug)]
struct Bitmap {
    words: Box<[u64]>,
    /// How many ports of the range are taken (padding not counted).
    taken: usize,
}

impl Bitmap {
    fn new(len: usize) -> Bitmap {
        let mut words = vec![0u64; len.div_ceil(64)].into_boxed_slice();
        if !len.is_multiple_of(64) {
            if let Some(last) = words.last_mut() {
                *last = !0u64 << (len % 64);
            }
        }
        Bitmap { words, taken: 0 }
    }

    fn is_set(&self, index: usize) -> bool {
        self.words[index / 64] & (1 << (index % 64)) != 0
    }

    fn set(&mut self, index: usize) {
        self.words[index / 64] |= 1 << (index % 64);
        self.taken += 1;
    }

    fn clear(&mut self, index: usize) {
        self.words[index / 64] &= !(1 << (index % 64));
        self.taken -= 1;
    }

    /// The first clear bit at or after `start`, wrapping around to the bits before it.
    fn first_clear_from(&self, start: usize) -> Option<usize> {
        let count = self.words.len();
        if count == 0 {
            return None;
        }
        let (home, offset) = (start / 64, start % 64);
        // `count + 1` steps: the home word's bits from `offset` on, every other word, then the
        // home word's bits below `offset`.
        for step in 0..=count {
            let w = (home + step) % count;
            let mut free = !self.words[w];
            if step == 0 {
                free &= !0u64 << offset;
            } else if step == count {
                free &= (1u64 << offset).wrapping_sub(1);
            }
            if free != 0 {
                return Some(w * 64 + free.trailing_zeros() as usize);
            }
        }
        None
    }
}

/// The key the kernel tells connections apart by (with the local port): IPv4-mapped IPv6
/// addresses are folded into IPv4 so both spellings of one flow share a bitmap.
type Pair = (IpAddr, SocketAddr);

fn pair(local: IpAddr, remote: SocketAddr) -> Pair {
    (
        local.to_canonical(),
        SocketAddr::new(remote.ip().to_canonical(), remote.port()),
    )
}

/// Which ports of a [`PortRange`] are in use, per (local address, remote address).
///
/// A port may serve several upstreams at once (their 4-tuples differ), never one upstream
/// twice. Memory: one bitmap of `range.len() / 8` bytes (2.5 KB for 20,000 ports) per pair
/// with a port taken, dropped when its last port is released; a handful of upstreams cost a
/// few KB however many tunnels they carry.
///
/// Sans-IO: the kernel side is [`reserve`] and [`bind_local_port`].
#[derive(Debug)]
pub struct PortAllocator {
    range: PortRange,
    pairs: HashMap<Pair, Bitmap>,
    /// Where the next search starts (an index into the range): one past the last port handed
    /// out, for every pair, so a just-released port comes back only after the rest of the
    /// range has been offered — even when its pair's bitmap was dropped meanwhile.
    cursor: usize,
    in_use: usize,
}

impl PortAllocator {
    /// An allocator with every port of `range` free.
    pub fn new(range: PortRange) -> Self {
        PortAllocator {
            range,
            pairs: HashMap::new(),
            cursor: 0,
            in_use: 0,
        }
    }

    /// The range the ports come from.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// A free port for a connection from `local` to `remote`, taken until [`release`]; `None`
    /// when every port of the range is taken for that pair.
    ///
    /// The search starts at a cursor that moves past each port handed out, not at the first
    /// free port, so a port released a moment ago is not handed out again at once (a late
    /// packet of the old flow would land in the new one). Worst case O(range / 64).
    ///
    /// [`release`]: PortAllocator::release
    pub fn take(&mut self, local: IpAddr, remote: SocketAddr) -> Option<u16> {
        let len = self.range.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor % len;
        let key = pair(local, remote);
        let index = match self.pairs.get(&key) {
            Some(bitmap) => bitmap.first_clear_from(start)?,
            // A pair with nothing taken: the cursor's port is free.
            None => start,
        };
        self.pairs
            .entry(key)
            .or_insert_with(|| Bitmap::new(len))
            .set(index);
        self.in_use += 1;
        self.cursor = (index + 1) % len;
        // `index < len`, so `first + index <= last`, a u16.
        Some(self.range.first + index as u16)
    }

    /// Takes `port` for the pair if it is in the range and free (a flow adopted from a
    /// previous process holds it); false otherwise.
    pub fn claim(&mut self, local: IpAddr, remote: SocketAddr, port: u16) -> bool {
        let len = self.range.len();
        if len == 0 || !self.range.contains(port) {
            return false;
        }
        let index = usize::from(port - self.range.first);
        let bitmap = self
            .pairs
            .entry(pair(local, remote))
            .or_insert_with(|| Bitmap::new(len));
        if bitmap.is_set(index) {
            return false;
        }
        bitmap.set(index);
        self.in_use += 1;
        true
    }

    /// Gives `port` back for the pair it was taken for. A port outside the range or not taken
    /// for that pair (a double release) is ignored: the count stays right.
    pub fn release(&mut self, local: IpAddr, remote: SocketAddr, port: u16) {
        if !self.range.contains(port) {
            return;
        }
        let index = usize::from(port - self.range.first);
        let key = pair(local, remote);
        let Some(bitmap) = self.pairs.get_mut(&key) else {
            return;
        };
        if !bitmap.is_set(index) {
            return;
        }
        bitmap.clear(index);
        self.in_use -= 1;
        if bitmap.taken == 0 {
            self.pairs.remove(&key);
        }
    }

    /// How many ports are taken, over all pairs (a port used for two upstreams counts twice).
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// How many (local, remote) pairs have a port taken, i.e. how many bitmaps are held.
    pub fn pairs(&self) -> usize {
        self.pairs.len()
    }
}

/// One [`PortAllocator`] shared by several worker threads (cheap to clone: a handle).
///
/// The alternative without a lock: [`PortRange::split`] the range and give each worker its own
/// allocator over its sub-range.
#[derive(Debug, Clone)]
pub struct SharedPorts(Arc<Mutex<PortAllocator>>);

impl SharedPorts {
    /// A shared allocator with every port of `range` free.
    pub fn new(range: PortRange) -> Self {
        SharedPorts(Arc::new(Mutex::new(PortAllocator::new(range))))
    }

    fn lock(&self) -> MutexGuard<'_, PortAllocator> {
        // The lock is held only inside `take`, `release` and `in_use`, whose updates cannot
        // panic half way (the only panic possible is an allocation failure, which aborts), so
        // a poisoned allocator is still consistent and can be used as is.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`PortAllocator::take`] under the lock.
    pub fn take(&self, local: IpAddr, remote: SocketAddr) -> Option<u16> {
        self.lock().take(local, remote)
    }

    /// [`PortAllocator::claim`] under the lock.
    pub fn claim(&self, local: IpAddr, remote: SocketAddr, port: u16) -> bool {
        self.lock().claim(local, remote, port)
    }

    /// [`PortAllocator::release`] under the lock.
    pub fn release(&self, local: IpAddr, remote: SocketAddr, port: u16) {
        self.lock().release(local, remote, port);
    }

    /// [`PortAllocator::in_use`] under the lock.
    pub fn in_use(&self) -> usize {
        self.lock().in_use()
    }
}

/// What [`reserve`] found and did, for the caller's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// The reserved-ports list as it was before (trimmed; empty when nothing was reserved).
    pub previous: String,
    /// Whether the list was written (the range was not fully covered yet).
    pub changed: bool,
}

/// Makes sure `net.ipv4.ip_local_reserved_ports` includes `range`, so the kernel's ephemeral
/// allocator (`connect` without `bind`, `bind` to port 0) never hands out a port the proxy
/// allocates itself. Ports in the list can still be bound explicitly ([`bind_local_port`]).
///
/// One sysctl covers IPv4 and IPv6: despite its `ipv4` path, IPv6 sockets consult the same
/// list. It is per network namespace, and writing it needs `CAP_NET_ADMIN` (over the
/// namespace) and a writable `/proc/sys`.
///
/// The list is read; when it does not cover the range yet, the union is written back (other
/// entries are never removed; adjacent and overlapping ones come back merged, as the kernel
/// itself prints them). Not atomic against another writer between the read and the write.
pub fn reserve(range: PortRange) -> io::Result<Reserved> {
    reserve_in(Path::new(RESERVED_PORTS), range)
}

/// [`reserve`] on a file given by path (tests use a plain file).
fn reserve_in(path: &Path, range: PortRange) -> io::Result<Reserved> {
    let previous = std::fs::read_to_string(path)?.trim().to_owned();
    let merged = with_range(&previous, range)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    let changed = match merged {
        Some(list) => {
            // One write: the kernel replaces its bitmap with what the first write of an open
            // file says.
            std::fs::write(path, format!("{list}\n"))?;
            true
        }
        None => false,
    };
    Ok(Reserved { previous, changed })
}

/// A reserved-ports list (`8080,40000-59999`; empty for none) as ranges, in the order written.
fn parse_port_list(list: &str) -> Result<Vec<PortRange>, PortRangeError> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(parse_bounds)
        .collect()
}

/// `ranges` sorted, overlapping and adjacent ones joined.
fn merge_ranges(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.retain(|range| !range.is_empty());
    ranges.sort_by_key(|range| range.first);
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(previous) if u32::from(range.first) <= u32::from(previous.last) + 1 => {
                previous.last = previous.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Ranges in the kernel's list format.
fn format_port_list(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(PortRange::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The reserved-ports list `list` with `range` added: `None` when it already covers the range
/// (nothing to write), else the union.
fn with_range(list: &str, range: PortRange) -> Result<Option<String>, PortRangeError> {
    let existing = merge_ranges(parse_port_list(list)?);
    if existing.iter().any(|reserved| reserved.covers(&range)) {
        return Ok(None);
    }
    let mut all = existing;
    all.push(range);
    Ok(Some(format_port_list(&merge_ranges(all))))
}

/// Binds `socket` (not yet connected) to `(local, port)` with `SO_REUSEADDR`, so one local port
/// can serve connections to different upstreams: Linux lets two sockets that both set
/// `SO_REUSEADDR` and are not listening bind the same address and port; `connect` then fails
/// with `EADDRNOTAVAIL` only if the full 4-tuple is already in use.
pub fn bind_local_port(socket: &socket2::Socket, local: IpAddr, port: u16) -> io::Result<()> {
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(local, port).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

    fn remote(last: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, last)), 8080)
    }

    fn range(first: u16, last: u16) -> PortRange {
        PortRange::new(first, last).unwrap()
    }

    #[test]
    fn takes_until_exhausted_then_none() {
        let mut ports = PortAllocator::new(range(40000, 40099));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let port = ports.take(LOCAL, remote(1)).unwrap();
            assert!((40000..=40099).contains(&port));
            assert!(seen.insert(port), "{port} handed out twice");
        }
        assert_eq!(ports.take(LOCAL, remote(1)), None);
        assert_eq!(ports.in_use(), 100);
    }

    #[test]
    fn a_released_port_is_available_again() {
        let mut ports = PortAllocator::new(range(40000, 40009));
        for _ in 0..10 {
            ports.take(LOCAL, remote(1)).unwrap();
        }
        assert_eq!(ports.take(LOCAL, remote(1)), None);
        ports.release(LOCAL, remote(1), 40004);
        assert_eq!(ports.take(LOCAL, remote(1)), Some(40004));
        assert_eq!(ports.take(LOCAL, remote(1)), None);
    }

    #[test]
    fn a_claimed_port_is_never_handed_out_until_released() {
        let mut ports = PortAllocator::new(range(40000, 40009));
        assert!(ports.claim(LOCAL, remote(1), 40003));
        assert!(!ports.claim(LOCAL, remote(1), 40003), "claimed twice");
        assert!(!ports.claim(LOCAL, remote(1), 39999), "outside the range");
        assert!(ports.claim(LOCAL, remote(2), 40003), "another upstream");
        let taken: Vec<u16> = (0..9)
            .map(|_| ports.take(LOCAL, remote(1)).unwrap())
            .collect();
        assert!(!taken.contains(&40003), "{taken:?}");
        assert_eq!(ports.take(LOCAL, remote(1)), None);
        ports.release(LOCAL, remote(1), 40003);
        assert_eq!(ports.take(LOCAL, remote(1)), Some(40003));
    }

    #[test]
    fn different_remotes_and_locals_share_a_port() {
        let mut ports = PortAllocator::new(range(50000, 50000));
        assert_eq!(ports.take(LOCAL, remote(1)), Some(50000));
        assert_eq!(ports.take(LOCAL, remote(1)), None);
        assert_eq!(ports.take(LOCAL, remote(2)), Some(50000));
        let other_port = SocketAddr::new(remote(1).ip(), 9090);
        assert_eq!(ports.take(LOCAL, other_port), Some(50000));
        let other_local = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(ports.take(other_local, remote(1)), Some(50000));
        assert_eq!(ports.in_use(), 4);
        assert_eq!(ports.pairs(), 4);
    }

    #[test]
    fn mapped_ipv6_addresses_are_the_same_pair() {
        let mut ports = PortAllocator::new(range(50000, 50000));
        assert_eq!(ports.take(LOCAL, remote(1)), Some(50000));
        let IpAddr::V4(local) = LOCAL else {
            unreachable!()
        };
        let IpAddr::V4(far) = remote(1).ip() else {
            unreachable!()
        };
        let mapped_local = IpAddr::V6(local.to_ipv6_mapped());
        let mapped_remote = SocketAddr::new(IpAddr::V6(far.to_ipv6_mapped()), 8080);
        assert_eq!(ports.take(mapped_local, mapped_remote), None);
        ports.release(mapped_local, mapped_remote, 50000);
        assert_eq!(ports.in_use(), 0);
    }

    #[test]
    fn the_cursor_spreads_choices() {
        let mut ports = PortAllocator::new(range(40000, 40999));
        let first = ports.take(LOCAL, remote(1)).unwrap();
        ports.release(LOCAL, remote(1), first);
        assert_eq!(ports.pairs(), 0);
        let second = ports.take(LOCAL, remote(1)).unwrap();
        assert_ne!(first, second, "a just-released port came back at once");
        // The released port comes back only after the rest of the range has been offered.
        ports.release(LOCAL, remote(1), second);
        let mut order = vec![first, second];
        for _ in 0..998 {
            let port = ports.take(LOCAL, remote(1)).unwrap();
            ports.release(LOCAL, remote(1), port);
            order.push(port);
        }
        let distinct: std::collections::HashSet<_> = order.iter().collect();
        assert_eq!(distinct.len(), 1000);
        // Another pair's takes move the cursor too.
        let mut ports = PortAllocator::new(range(40000, 40999));
        let a = ports.take(LOCAL, remote(1)).unwrap();
        let b = ports.take(LOCAL, remote(2)).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn the_search_wraps_around_the_cursor() {
        // 130 ports: three words, the last one partial.
        let mut ports = PortAllocator::new(range(1000, 1129));
        let taken: Vec<u16> = (0..130)
            .map(|_| ports.take(LOCAL, remote(1)).unwrap())
            .collect();
        assert_eq!(taken, (1000..1130).collect::<Vec<_>>());
        // Cursor back at 0; free one port below and one above where the cursor will be.
        ports.release(LOCAL, remote(1), 1005);
        ports.release(LOCAL, remote(1), 1070);
        assert_eq!(ports.take(LOCAL, remote(1)), Some(1005));
        assert_eq!(ports.take(LOCAL, remote(1)), Some(1070));
        ports.release(LOCAL, remote(1), 1003);
        // Cursor at 71: the search goes to the end, wraps, and finds 1003.
        assert_eq!(ports.take(LOCAL, remote(1)), Some(1003));
        assert_eq!(ports.take(LOCAL, remote(1)), None);
    }

    #[test]
    fn in_use_counts_and_empty_pairs_are_dropped() {
        let mut ports = PortAllocator::new(range(40000, 59999));
        let a = ports.take(LOCAL, remote(1)).unwrap();
        let b = ports.take(LOCAL, remote(1)).unwrap();
        let c = ports.take(LOCAL, remote(2)).unwrap();
        assert_eq!((ports.in_use(), ports.pairs()), (3, 2));
        ports.release(LOCAL, remote(2), c);
        assert_eq!((ports.in_use(), ports.pairs()), (2, 1));
        // A double release, a port out of range, an unknown pair: ignored.
        ports.release(LOCAL, remote(2), c);
        ports.release(LOCAL, remote(1), 39999);
        ports.release(LOCAL, remote(3), a);
        assert_eq!((ports.in_use(), ports.pairs()), (2, 1));
        ports.release(LOCAL, remote(1), a);
        ports.release(LOCAL, remote(1), b);
        assert_eq!((ports.in_use(), ports.pairs()), (0, 0));
    }

    #[test]
    fn an_empty_range_hands_out_nothing() {
        let mut ports = PortAllocator::new(PortRange { first: 5, last: 4 });
        assert_eq!(ports.take(LOCAL, remote(1)), None);
        assert_eq!(ports.in_use(), 0);
    }

    #[test]
    fn shared_ports_serve_several_threads() {
        let shared = SharedPorts::new(range(40000, 40999));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    (0..250)
                        .map(|_| shared.take(LOCAL, remote(1)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u16> = handles
            .into_iter()
            .flat_map(|handle| handle.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 1000);
        assert_eq!(shared.take(LOCAL, remote(1)), None);
        shared.release(LOCAL, remote(1), 40500);
        assert_eq!(shared.in_use(), 999);
        assert_eq!(shared.take(LOCAL, remote(1)), Some(40500));
    }

    #[test]
    fn ranges_parse_and_print() {
        assert_eq!("40000-59999".parse(), Ok(range(40000, 59999)));
        assert_eq!(" 40000 - 59999 ".parse(), Ok(range(40000, 59999)));
        assert_eq!("8080".parse(), Ok(range(8080, 8080)));
        assert_eq!("1-65535".parse::<PortRange>().unwrap().len(), 65535);
        assert_eq!(range(40000, 59999).len(), 20000);
        assert_eq!(range(40000, 59999).to_string(), "40000-59999");
        assert_eq!(range(8080, 8080).to_string(), "8080");
    }

    #[test]
    fn bad_ranges_are_rejected() {
        let port = |text: &str| Err(PortRangeError::Port(text.to_owned()));
        assert_eq!("".parse::<PortRange>(), port(""));
        assert_eq!("40000-".parse::<PortRange>(), port(""));
        assert_eq!("-40000".parse::<PortRange>(), port(""));
        assert_eq!("40000-65536".parse::<PortRange>(), port("65536"));
        assert_eq!("abc".parse::<PortRange>(), port("abc"));
        assert_eq!("1-2-3".parse::<PortRange>(), port("2-3"));
        assert_eq!("40000:50000".parse::<PortRange>(), port("40000:50000"));
        assert_eq!(
            "50000-40000".parse::<PortRange>(),
            Err(PortRangeError::Reversed {
                first: 50000,
                last: 40000
            })
        );
        assert_eq!("0-100".parse::<PortRange>(), Err(PortRangeError::Zero));
        assert_eq!(PortRange::new(0, 0), Err(PortRangeError::Zero));
    }

    #[test]
    fn split_gives_disjoint_even_parts() {
        let parts = range(40000, 59999).split(3);
        assert_eq!(
            parts,
            vec![
                range(40000, 46666),
                range(46667, 53333),
                range(53334, 59999)
            ]
        );
        assert_eq!(parts.iter().map(PortRange::len).sum::<usize>(), 20000);
        assert_eq!(range(1, 65535).split(1), vec![range(1, 65535)]);
        assert_eq!(range(10, 11).split(4), vec![range(10, 10), range(11, 11)]);
        assert_eq!(range(10, 11).split(0), Vec::new());
        let parts = range(65530, 65535).split(4);
        assert_eq!(parts.last(), Some(&range(65535, 65535)));
        assert_eq!(parts.first(), Some(&range(65530, 65531)));
    }

    #[test]
    fn reserved_lists_merge() {
        let r = range(40000, 40009);
        assert_eq!(with_range("", r), Ok(Some("40000-40009".to_owned())));
        assert_eq!(
            with_range("8080,40005-40020", r),
            Ok(Some("8080,40000-40020".to_owned()))
        );
        // Already covered, by one entry or by adjacent entries together.
        assert_eq!(with_range("8080,39000-41000", r), Ok(None));
        assert_eq!(with_range("40000-40004,40005-40009", r), Ok(None));
        assert_eq!(with_range("40000,40001-40009", r), Ok(None));
        // Other entries stay; the new range joins its neighbours.
        assert_eq!(
            with_range("22,39990-39999,40010,50000-50010", r),
            Ok(Some("22,39990-40010,50000-50010".to_owned()))
        );
        assert_eq!(
            with_range("60000, 1024\n", r),
            Ok(Some("1024,40000-40009,60000".to_owned()))
        );
        assert_eq!(with_range("0-65535", r), Ok(None));
        assert_eq!(
            with_range("80,x", r),
            Err(PortRangeError::Port("x".to_owned()))
        );
    }

    #[test]
    fn reserve_writes_the_union_only_when_needed() {
        let path = std::env::temp_dir().join(format!(
            "wsplice-reserved-ports-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, "8080\n").unwrap();
        let reserved = reserve_in(&path, range(40000, 40009)).unwrap();
        assert_eq!(
            reserved,
            Reserved {
                previous: "8080".to_owned(),
                changed: true
            }
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "8080,40000-40009\n"
        );
        let reserved = reserve_in(&path, range(40002, 40003)).unwrap();
        assert!(!reserved.changed);
        std::fs::write(&path, "80,nonsense\n").unwrap();
        let error = reserve_in(&path, range(40000, 40009)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        std::fs::remove_file(&path).unwrap();
    }

    /// Two sockets share a local port towards two upstreams; a third on the same port towards
    /// the first upstream again (the same 4-tuple) is refused by `connect` with
    /// `EADDRNOTAVAIL` (binding itself succeeds: `SO_REUSEADDR`, nobody listening).
    #[test]
    fn one_local_port_serves_two_upstreams_not_one_twice() {
        use socket2::{Domain, Protocol, Socket, Type};
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let upstream_a = TcpListener::bind((loopback, 0)).unwrap();
        let upstream_b = TcpListener::bind((loopback, 0)).unwrap();
        let socket = || Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();

        let first = socket();
        bind_local_port(&first, loopback, 0).unwrap();
        let port = first.local_addr().unwrap().as_socket().unwrap().port();
        let second = socket();
        bind_local_port(&second, loopback, port).unwrap();
        first
            .connect(&upstream_a.local_addr().unwrap().into())
            .unwrap();
        second
            .connect(&upstream_b.local_addr().unwrap().into())
            .unwrap();
        for connected in [&first, &second] {
            let local = connected.local_addr().unwrap().as_socket().unwrap();
            assert_eq!(local, SocketAddr::new(loopback, port));
        }

        let third = socket();
        bind_local_port(&third, loopback, port).unwrap();
        let error = third
            .connect(&upstream_a.local_addr().unwrap().into())
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{error}");
    }
}
