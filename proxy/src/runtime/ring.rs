//! A worker's io_uring: the operations it submits, each named by a [`Tag`] whose kind is an
//! [`Op`], and the rule that keeps their memory valid.
//!
//! Every pointer an operation carries points into memory owned by a connection's entry (a send's
//! buffer, a boxed connect address) or by the worker (the tick's timespec). That memory stays
//! allocated and unmoved until the operation's completion is reaped: an entry is only freed once
//! its count of operations in flight is back to zero, and a side holds at most one send (see
//! `table::SideIo`).

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};
use socket2::SockAddr;

use crate::tag::Tag;

/// Submission queue size of each worker's ring.
const RING_ENTRIES: u32 = 4096;

/// The kind of an operation, so its completion is routed to the right handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Multishot accept on listener `slot`.
    Accept = 1,
    /// The worker's periodic wake-up.
    Tick = 2,
    /// Cancellation of listener `slot`'s accept (drain).
    CancelAccept = 3,
    /// The worker's mailbox eventfd is readable (pressure reports).
    Wake = 4,
    /// Readiness of the client socket.
    PollClient = 10,
    /// Readiness of the upstream socket.
    PollUpstream = 11,
    /// A send to the client.
    SendClient = 12,
    /// A send to the upstream.
    SendUpstream = 13,
    /// Connect to the upstream.
    Connect = 14,
    /// The timeout linked to a connect.
    ConnectTimeout = 15,
    /// Cancellation of a connection's operations (close).
    Cancel = 16,
    /// A receive from the upstream into a buffer the side owns until it completes.
    RecvUpstream = 17,
}

impl Op {
    /// The operation a tag's kind names; `None` for values this worker never submitted.
    pub fn of(tag: Tag) -> Option<Op> {
        Some(match tag.kind {
            1 => Op::Accept,
            2 => Op::Tick,
            3 => Op::CancelAccept,
            4 => Op::Wake,
            10 => Op::PollClient,
            11 => Op::PollUpstream,
            12 => Op::SendClient,
            13 => Op::SendUpstream,
            14 => Op::Connect,
            15 => Op::ConnectTimeout,
            16 => Op::Cancel,
            17 => Op::RecvUpstream,
            _ => return None,
        })
    }

    /// The `user_data` of this operation for `slot` of connection `id`.
    pub fn user_data(self, slot: u32, id: u64) -> u64 {
        Tag::new(self as u8, slot, id).encode()
    }
}

/// Arguments of an in-flight connect; the kernel reads them at submission, they live until then.
#[derive(Debug)]
pub struct ConnectArgs {
    /// The server.
    pub addr: SockAddr,
    /// The connect timeout.
    pub timeout: types::Timespec,
}

/// One worker's io_uring.
pub struct Ring {
    ring: IoUring,
    /// Created disabled: [`Ring::start`] enables it.
    disabled: bool,
}

impl Ring {
    /// A new ring, to be used by one thread only. With `deferred` (see
    /// [`super::support::check`]) completions are processed when that thread waits for them
    /// (`DEFER_TASKRUN`) rather than by interrupting it as they happen, and the ring is created
    /// disabled, so that the worker thread that [`Ring::start`]s it becomes its one submitter.
    pub fn new(deferred: bool) -> io::Result<Ring> {
        if !deferred {
            return Ok(Ring {
                ring: IoUring::new(RING_ENTRIES)?,
                disabled: false,
            });
        }
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(RING_ENTRIES)?;
        Ok(Ring {
            ring,
            disabled: true,
        })
    }

    /// Enables the ring from the thread that will use it (its only submitter from now on).
    pub fn start(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.disabled) {
            self.ring.submitter().register_enable_rings()?;
        }
        Ok(())
    }

    /// Submits what is queued and waits for at least one completion.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Appends the completions reaped so far to `into` (user data, result, flags).
    pub fn reap(&mut self, into: &mut Vec<(u64, i32, u32)>) {
        into.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: see the module docs: every pointer in the entries built here stays valid
            // until the operation's completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // Submission queue full: hand what is queued to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                tracing::error!(error = %e, "io_uring submit failed while the queue was full");
            }
        }
    }

    /// A oneshot timeout of `*tick` (the worker owns the timespec for its whole life).
    pub fn timeout(&mut self, tick: *const types::Timespec, user_data: u64) {
        self.push(opcode::Timeout::new(tick).build().user_data(user_data));
    }

    /// A multishot readiness poll (the worker's eventfd).
    pub fn poll_multi(&mut self, fd: RawFd, user_data: u64) {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data);
        self.push(entry);
    }

    /// A oneshot readiness poll for `events` (errors and hang-ups always report).
    pub fn poll_once(&mut self, fd: RawFd, events: libc::c_short, user_data: u64) {
        let entry = opcode::PollAdd::new(types::Fd(fd), events as u32)
            .build()
            .user_data(user_data);
        self.push(entry);
    }

    /// A multishot accept.
    pub fn accept_multi(&mut self, fd: RawFd, user_data: u64) {
        let entry = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        self.push(entry);
    }

    /// A send of `len` bytes at `bytes` (owned by the side's in-flight send).
    pub fn send(&mut self, fd: RawFd, bytes: *const u8, len: u32, user_data: u64) {
        let entry = opcode::Send::new(types::Fd(fd), bytes, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
        self.push(entry);
    }

    /// A receive of at most `len` bytes into `buffer` (owned by the side's in-flight receive):
    /// it completes when bytes arrive, at end of stream, or on an error.
    pub fn recv(&mut self, fd: RawFd, buffer: *mut u8, len: u32, user_data: u64) {
        let entry = opcode::Recv::new(types::Fd(fd), buffer, len)
            .build()
            .user_data(user_data);
        self.push(entry);
    }

    /// A connect linked to a timeout; both entries go in together.
    pub fn connect(&mut self, fd: RawFd, args: &ConnectArgs, connect: u64, timeout: u64) {
        let entry = opcode::Connect::new(types::Fd(fd), args.addr.as_ptr().cast(), args.addr.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(connect);
        let limit = opcode::LinkTimeout::new(&args.timeout as *const types::Timespec)
            .build()
            .user_data(timeout);
        // The linked pair must sit in the queue together: make room for both first.
        let free = {
            let queue = self.ring.submission();
            queue.capacity() - queue.len()
        };
        if free < 2 {
            if let Err(error) = self.ring.submit() {
                tracing::error!(%error, "io_uring submit failed");
            }
        }
        self.push(entry);
        self.push(limit);
    }

    /// Removes the poll submitted with `target` (its completion then reports `ECANCELED`; a
    /// poll that completed already is not affected).
    pub fn remove_poll(&mut self, target: u64, user_data: u64) {
        let entry = opcode::PollRemove::new(target).build().user_data(user_data);
        self.push(entry);
    }

    /// Cancels every operation on `fd`.
    pub fn cancel_fd(&mut self, fd: RawFd, user_data: u64) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data);
        self.push(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_round_trip_through_user_data() {
        for op in [Op::Accept, Op::PollClient, Op::Cancel, Op::ConnectTimeout] {
            let tag = Tag::decode(op.user_data(0xdead_beef, 0x1234_5678_9abc));
            assert_eq!(Op::of(tag), Some(op));
            assert!(tag.is_for(0x1234_5678_9abc));
        }
        assert_eq!(Op::of(Tag::decode(0)), None);
    }
}
