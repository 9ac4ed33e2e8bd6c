//! Provided buffers: a ring of relay buffers the kernel picks from when a receive completes
//! (`IORING_REGISTER_PBUF_RING`), so a relay receive can wait in the kernel without holding a
//! buffer: an idle tunnel still holds none, and a readable socket costs one completion instead
//! of a readiness poll and a `recv` call.
//!
//! A buffer the kernel filled belongs to the worker until [`ProvidedBuffers::recycle`] hands it
//! back (after the bytes were sent on); while it is out, the ring has one buffer less, and a
//! receive that finds the ring empty fails with `ENOBUFS` (the worker then reads the socket
//! itself into a pooled buffer).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// The buffer group id of the relay buffers (one group per ring).
pub const RELAY_GROUP: u16 = 0;

/// The worker's provided relay buffers: `count` buffers of `size` bytes, and the ring of
/// entries through which they are offered to the kernel.
pub struct ProvidedBuffers {
    /// The ring of `count` entries (page-aligned, shared with the kernel).
    ring: Mapping,
    /// The buffers, `size` bytes each, back to back (pages become resident as they are used).
    buffers: Mapping,
    count: u16,
    size: usize,
    /// The next tail to publish (the kernel reads the published one).
    tail: u16,
}

/// A buffer the kernel filled: its id and where its bytes are.
#[derive(Debug)]
pub struct FilledBuffer {
    /// The buffer id, to recycle it.
    pub bid: u16,
    /// The first byte.
    ptr: NonNull<u8>,
    /// Bytes filled.
    pub len: usize,
}

// SAFETY: a `FilledBuffer` is only a handle on memory of the worker's `ProvidedBuffers`, which
// lives as long as the worker; it is created and used by the worker's thread only (it moves
// with the worker when the worker is handed to its thread).
unsafe impl Send for FilledBuffer {}

impl FilledBuffer {
    /// The filled bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` bytes the kernel wrote into a buffer of the worker's
        // mapping, which stays mapped and is not offered to the kernel again before
        // `recycle` takes this handle.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl ProvidedBuffers {
    /// Maps `count` buffers of `size` bytes and registers them with the ring of `submitter`.
    /// `count` must be a power of two (at most 32768).
    pub fn register(submitter: &Submitter<'_>, count: u16, size: usize) -> io::Result<Self> {
        if !count.is_power_of_two() || count > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "provided buffer count must be a power of two up to 32768",
            ));
        }
        let ring = Mapping::new(usize::from(count) * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(usize::from(count) * size)?;
        let mut provided = ProvidedBuffers {
            ring,
            buffers,
            count,
            size,
            tail: 0,
        };
        // SAFETY: the ring mapping holds `count` entries and stays mapped until `self` drops,
        // which the worker does only after its ring is closed (`Ring` declares the io_uring
        // first, so it drops first).
        unsafe {
            submitter.register_buf_ring_with_flags(
                provided.ring.ptr.as_ptr() as u64,
                count,
                RELAY_GROUP,
                0,
            )?;
        }
        for bid in 0..count {
            provided.push(bid);
        }
        provided.publish();
        Ok(provided)
    }

    /// The size of each buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The buffer `bid` as filled with `len` bytes by a completed receive.
    pub fn filled(&self, bid: u16, len: usize) -> Option<FilledBuffer> {
        if bid >= self.count || len > self.size {
            return None;
        }
        // SAFETY: `bid < count`, so the offset stays inside the buffers' mapping.
        let ptr = unsafe { self.buffers.ptr.as_ptr().add(usize::from(bid) * self.size) };
        Some(FilledBuffer {
            bid,
            ptr: NonNull::new(ptr)?,
            len,
        })
    }

    /// Offers a buffer back to the kernel.
    pub fn recycle(&mut self, buffer: FilledBuffer) {
        self.push(buffer.bid);
        self.publish();
    }

    /// Writes the entry for `bid` at the private tail.
    fn push(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        let entries = self.ring.ptr.as_ptr().cast::<BufRingEntry>();
        // SAFETY: `index < count`: the entry is inside the ring mapping; the kernel does not
        // read entries past the published tail, and this one is past it until `publish`.
        let entry = unsafe { &mut *entries.add(index) };
        // SAFETY: as in `filled`.
        let addr = unsafe { self.buffers.ptr.as_ptr().add(usize::from(bid) * self.size) };
        entry.set_addr(addr as u64);
        // Relay buffers are far below 4 GiB.
        entry.set_len(u32::try_from(self.size).unwrap_or(u32::MAX));
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the entries written so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's last field, inside the mapping;
        // it is only ever written by this thread and read by the kernel.
        let tail = unsafe {
            &*BufRingEntry::tail(self.ring.ptr.as_ptr().cast::<BufRingEntry>()).cast::<AtomicU16>()
        };
        tail.store(self.tail, Ordering::Release);
    }
}

impl std::fmt::Debug for ProvidedBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvidedBuffers")
            .field("count", &self.count)
            .field("size", &self.size)
            .finish()
    }
}

/// An anonymous, private, page-aligned mapping.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by one worker; see `FilledBuffer`.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(ptr.cast::<u8>())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what `mmap` returned; nothing uses them afterwards.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{cqueue, opcode, squeue, types, IoUring};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// Submits a buffer-select receive on `fd` and waits for its completion.
    fn receive(ring: &mut IoUring, fd: i32, len: u32) -> (i32, u32) {
        let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), len)
            .buf_group(RELAY_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(7);
        // SAFETY: the entry carries no pointer of ours (the kernel picks a provided buffer).
        unsafe { ring.submission().push(&entry).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        (cqe.result(), cqe.flags())
    }

    #[test]
    fn the_kernel_fills_provided_buffers_and_runs_out_until_one_is_recycled() {
        let mut ring = IoUring::new(8).unwrap();
        let mut provided = ProvidedBuffers::register(&ring.submitter(), 2, 16).unwrap();
        assert_eq!(provided.size(), 16);
        let (mut writer, reader) = UnixStream::pair().unwrap();
        let fd = reader.as_raw_fd();

        writer.write_all(b"first chunk").unwrap();
        let (n, flags) = receive(&mut ring, fd, 16);
        let first = provided
            .filled(cqueue::buffer_select(flags).unwrap(), n as usize)
            .unwrap();
        assert_eq!(first.bytes(), b"first chunk");

        // A receive takes at most the buffer's size; the rest stays queued.
        writer.write_all(b"0123456789abcdefXYZ").unwrap();
        let (n, flags) = receive(&mut ring, fd, 16);
        let second = provided
            .filled(cqueue::buffer_select(flags).unwrap(), n as usize)
            .unwrap();
        assert_eq!(second.bytes(), b"0123456789abcdef");
        assert_ne!(first.bid, second.bid);

        // Both buffers are out: the next receive finds none.
        let (n, _) = receive(&mut ring, fd, 16);
        assert_eq!(n, -libc::ENOBUFS);

        provided.recycle(first);
        let (n, flags) = receive(&mut ring, fd, 16);
        let third = provided
            .filled(cqueue::buffer_select(flags).unwrap(), n as usize)
            .unwrap();
        assert_eq!(third.bytes(), b"XYZ");
        provided.recycle(second);
        provided.recycle(third);
    }

    #[test]
    fn counts_that_are_not_powers_of_two_are_refused() {
        let ring = IoUring::new(8).unwrap();
        let error = ProvidedBuffers::register(&ring.submitter(), 3, 16).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
