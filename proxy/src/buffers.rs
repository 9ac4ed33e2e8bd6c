//! Relay buffers, taken only while bytes are in flight and returned when a direction goes idle,
//! so an idle tunnel holds no userspace buffer.

/// A per-worker pool of equally sized byte buffers.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    free: Vec<Box<[u8]>>,
    /// Free buffers kept for reuse; beyond this they go back to the allocator.
    keep: usize,
}

impl BufferPool {
    /// A pool of `size`-byte buffers that keeps at most `keep` free ones.
    pub fn new(size: usize, keep: usize) -> BufferPool {
        BufferPool {
            size,
            free: Vec::new(),
            keep,
        }
    }

    /// A buffer of the pool's size (contents unspecified).
    pub fn take(&mut self) -> Box<[u8]> {
        self.free
            .pop()
            .unwrap_or_else(|| vec![0; self.size].into_boxed_slice())
    }

    /// Returns a buffer to the pool.
    pub fn give(&mut self, buffer: Box<[u8]>) {
        if self.free.len() < self.keep && buffer.len() == self.size {
            self.free.push(buffer);
        }
    }

    /// Free buffers held.
    pub fn idle(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_up_to_the_keep_limit() {
        let mut pool = BufferPool::new(16, 1);
        let a = pool.take();
        let b = pool.take();
        assert_eq!(a.len(), 16);
        pool.give(a);
        pool.give(b);
        assert_eq!(pool.idle(), 1);
    }
}
