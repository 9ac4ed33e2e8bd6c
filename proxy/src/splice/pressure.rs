//! Slow readers on the kernel path: the program reports every socket that redirected another
//! `PRESSURE_STEP` bytes; a watcher thread hands each report to the worker owning the tunnel,
//! which compares what was redirected with what the destination socket has taken in.
//!
//! Why: redirected bytes wait in the destination's psock queue, which the kernel does not
//! charge to any socket buffer, so a reader that never reads would let its upstream pin memory
//! without bound (measured: 300 MB/s). The kernel offers no backpressure on that queue, so the
//! worker closes a tunnel whose backlog passes `limits.kernel_backlog` (a slow-consumer limit).
//! Reports cost nothing for small-message fleets: one per MiB moved.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{MapData, RingBuf};

use crate::sys;
use crate::tag::Tag;

/// A worker's mailbox: a channel plus an eventfd the worker polls in its ring.
#[derive(Debug, Clone)]
pub struct Mailbox {
    /// Where reports go: the slot (and generation) of the reported tunnel.
    pub sender: Sender<Tag>,
    /// Written to wake the worker.
    pub wake: Arc<OwnedFd>,
}

/// Owner tags of tunnels adopted from a predecessor process (binary upgrade): their activity
/// records keep the tag the predecessor wrote (the program updates those records in place, so
/// userspace does not rewrite them); reports carrying one go to the connection named here.
pub type AdoptedOwners = Arc<std::sync::Mutex<std::collections::HashMap<u64, Tag>>>;

/// The thread that reads the pressure ring and wakes the owning workers.
#[derive(Debug)]
pub struct PressureWatcher;

impl PressureWatcher {
    /// Reads `ring` until `stop` is set, forwarding each report to `mailboxes[owner.worker]`.
    pub fn spawn(
        mut ring: RingBuf<MapData>,
        mailboxes: Vec<Mailbox>,
        adopted: AdoptedOwners,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("wsplice-pressure".into())
            .spawn(move || {
                let fd = ring.as_raw_fd();
                while !stop.load(Ordering::Relaxed) {
                    if !sys::wait_readable(fd, Duration::from_millis(200)) {
                        continue;
                    }
                    let mut woken = vec![false; mailboxes.len()];
                    while let Some(item) = ring.next() {
                        let Ok(bytes) = <[u8; 8]>::try_from(&item[..item.len().min(8)]) else {
                            continue;
                        };
                        // The owner's kind is the index of the worker that owns the socket,
                        // unless the tunnel was adopted from a predecessor.
                        let written = u64::from_ne_bytes(bytes);
                        let adopted = adopted
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(&written)
                            .copied();
                        let owner = adopted.unwrap_or_else(|| Tag::decode(written));
                        let worker = usize::from(owner.kind);
                        if let Some(mailbox) = mailboxes.get(worker) {
                            if mailbox.sender.send(owner).is_ok() {
                                woken[worker] = true;
                            }
                        }
                    }
                    for (mailbox, _) in mailboxes.iter().zip(woken).filter(|(_, w)| *w) {
                        sys::wake(mailbox.wake.as_raw_fd());
                    }
                }
            })
    }
}
