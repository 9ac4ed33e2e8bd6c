//! The userspace relay's bookkeeping for one direction of a tunnel (sans-IO).
//!
//! One direction moves bytes from a source socket to a destination socket through at most one
//! buffer: it reads only when the previous chunk is fully written (backpressure: a slow reader
//! stops its peer's reads, memory stays bounded by one buffer per direction).

/// The state of one direction (client → upstream or upstream → client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Direction {
    /// Bytes moved so far.
    pub bytes: u64,
    /// Bytes still allowed (for relaying a refused upgrade's body); `None` = unbounded.
    limit: Option<u64>,
    /// The source sent its FIN (or the limit was reached).
    source_done: bool,
    /// The FIN has been passed on (`shutdown(destination, SHUT_WR)`).
    shut_down: bool,
}

/// What to do after the source had nothing more to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSource {
    /// Pass the FIN on: `shutdown(destination, SHUT_WR)`.
    ShutDownDestination,
    /// Nothing to do (already passed on).
    Nothing,
}

impl Direction {
    /// A direction with no byte limit.
    pub fn unbounded() -> Direction {
        Direction {
            bytes: 0,
            limit: None,
            source_done: false,
            shut_down: false,
        }
    }

    /// A direction that ends after `limit` more bytes.
    pub fn bounded(limit: u64) -> Direction {
        Direction {
            limit: Some(limit),
            source_done: limit == 0,
            ..Direction::unbounded()
        }
    }

    /// A direction that carries nothing (its source is not read).
    pub fn closed() -> Direction {
        Direction {
            source_done: true,
            shut_down: true,
            ..Direction::unbounded()
        }
    }

    /// How many bytes the next read may take, given a buffer of `capacity`; 0 = do not read.
    pub fn read_budget(&self, capacity: usize) -> usize {
        if self.source_done {
            return 0;
        }
        match self.limit {
            Some(limit) => capacity.min(usize::try_from(limit).unwrap_or(usize::MAX)),
            None => capacity,
        }
    }

    /// `count` bytes were read from the source (they are now on their way to the destination).
    pub fn on_read(&mut self, count: usize) {
        self.bytes += count as u64;
        if let Some(limit) = self.limit.as_mut() {
            *limit = limit.saturating_sub(count as u64);
            if *limit == 0 {
                self.source_done = true;
            }
        }
    }

    /// The source reached end of stream.
    pub fn on_source_eof(&mut self) {
        self.source_done = true;
    }

    /// Whether the source is exhausted (FIN seen or limit reached).
    pub fn source_done(&self) -> bool {
        self.source_done
    }

    /// Called when the destination has nothing left to write: passes a pending FIN on once.
    pub fn after_flush(&mut self) -> AfterSource {
        if self.source_done && !self.shut_down {
            self.shut_down = true;
            AfterSource::ShutDownDestination
        } else {
            AfterSource::Nothing
        }
    }

    /// Done: the source is exhausted and its FIN passed on.
    pub fn finished(&self) -> bool {
        self.source_done && self.shut_down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbounded_direction_reads_full_buffers_until_eof() {
        let mut d = Direction::unbounded();
        assert_eq!(d.read_budget(4096), 4096);
        d.on_read(4096);
        assert_eq!(d.after_flush(), AfterSource::Nothing);
        d.on_source_eof();
        assert_eq!(d.read_budget(4096), 0);
        assert!(!d.finished());
        assert_eq!(d.after_flush(), AfterSource::ShutDownDestination);
        assert_eq!(d.after_flush(), AfterSource::Nothing);
        assert!(d.finished());
        assert_eq!(d.bytes, 4096);
    }

    #[test]
    fn bounded_direction_stops_at_its_limit() {
        let mut d = Direction::bounded(10);
        assert_eq!(d.read_budget(4096), 10);
        d.on_read(4);
        assert_eq!(d.read_budget(4096), 6);
        d.on_read(6);
        assert!(d.source_done());
        assert_eq!(d.read_budget(4096), 0);
        assert_eq!(d.after_flush(), AfterSource::ShutDownDestination);
        assert!(d.finished());
    }

    #[test]
    fn a_zero_limit_is_done_at_once_and_a_closed_direction_is_finished() {
        assert_eq!(Direction::bounded(0).read_budget(10), 0);
        assert!(Direction::closed().finished());
    }
}
