//! Slow readers on the kernel path: the program reports every socket that redirected another
//! `PRESSURE_STEP` bytes; a watcher thread hands each report to the worker owning the tunnel,
//! which compares what was redirected with what the destination socket has taken in.
//!
//! Why: redirected bytes wait in the destination's psock queue, which the kernel does not
//! charge to any socket buffer, so a reader that never reads would let its upstream pin memory
//! without bound (measured: 300 MB/s). The kernel offers no backpressure on that queue, so the
//! worker closes a tunnel whose backlog passes `limits.kernel_backlog` (a slow-consumer limit).
//! Reports cost nothing for small-message fleets: one per MiB moved.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};

/// Who owns a spliced socket: worker index, connection slot, low 24 bits of the connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Worker index.
    pub worker: u8,
    /// Connection slot in that worker.
    pub slot: u32,
    /// Low 24 bits of the connection id.
    pub generation: u32,
}

impl Owner {
    /// Packs into the `owner` field of the activity record.
    pub fn encode(self) -> u64 {
        u64::from(self.worker) << 56
            | u64::from(self.slot) << 24
            | u64::from(self.generation & 0xff_ffff)
    }

    /// Unpacks an `owner` field.
    pub fn decode(value: u64) -> Owner {
        Owner {
            worker: (value >> 56) as u8,
            slot: ((value >> 24) & 0xffff_ffff) as u32,
            generation: (value & 0xff_ffff) as u32,
        }
    }
}

/// A worker's mailbox: a channel plus an eventfd the worker polls in its ring.
#[derive(Debug, Clone)]
pub struct Mailbox {
    /// Where reports go.
    pub sender: Sender<Owner>,
    /// Written to wake the worker.
    pub wake: Arc<OwnedFd>,
}

/// The thread that reads the pressure ring and wakes the owning workers.
#[derive(Debug)]
pub struct PressureWatcher;

impl PressureWatcher {
    /// Reads `ring` until `stop` is set, forwarding each report to `mailboxes[owner.worker]`.
    pub fn spawn(
        mut ring: RingBuf<MapData>,
        mailboxes: Vec<Mailbox>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("wsplice-pressure".into())
            .spawn(move || {
                let fd = ring.as_raw_fd();
                while !stop.load(Ordering::Relaxed) {
                    if !wait_readable(fd, 200) {
                        continue;
                    }
                    let mut woken = vec![false; mailboxes.len()];
                    while let Some(item) = ring.next() {
                        let Ok(bytes) = <[u8; 8]>::try_from(&item[..item.len().min(8)]) else {
                            continue;
                        };
                        let owner = Owner::decode(u64::from_ne_bytes(bytes));
                        if let Some(mailbox) = mailboxes.get(usize::from(owner.worker)) {
                            if mailbox.sender.send(owner).is_ok() {
                                woken[usize::from(owner.worker)] = true;
                            }
                        }
                    }
                    for (mailbox, _) in mailboxes.iter().zip(woken).filter(|(_, w)| *w) {
                        wake(mailbox.wake.as_raw_fd());
                    }
                }
            })
    }
}

fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut poll, 1, timeout_ms) > 0 }
}

/// Adds one to an eventfd (wakes a worker polling it).
pub fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip() {
        let owner = Owner {
            worker: 3,
            slot: 123_456,
            generation: 0xab_cdef,
        };
        assert_eq!(Owner::decode(owner.encode()), owner);
    }
}
