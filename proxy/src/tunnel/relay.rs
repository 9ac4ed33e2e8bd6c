//! The userspace relay's bookkeeping for one direction of a tunnel (sans-IO).
//!
//! One direction moves bytes from a source socket to a destination socket through at most one
//! buffer: it reads only when the previous chunk is fully written (backpressure: a slow reader
//! stops its peer's reads, memory stays bounded by one buffer per direction).

use super::frames::FrameTracker;

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
    /// Where reading the source stands.
    read: SourceRead,
    /// Where the bytes passed on stand between WebSocket frames.
    pub frames: FrameTracker,
}

/// Where reading a direction's source stands. The kernel path can take a relayed tunnel over
/// only when no read is pending and no segment is left half-read on either socket (the
/// sockmap hands the program whole segments, so a half-read one would be forwarded again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRead {
    /// Nothing known yet, or the last read filled its buffer: more may be queued, and the
    /// segment at the head may be half-read.
    Partial,
    /// A read was asked for and has not reported back.
    Asked,
    /// The last read took everything queued (it returned less than it could take).
    Drained,
    /// The last read found nothing: a readiness wait on the source is armed.
    Waiting,
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
            read: SourceRead::Partial,
            frames: FrameTracker::at_boundary(),
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

    /// A read of the source was asked for.
    pub fn on_read_asked(&mut self) {
        self.read = SourceRead::Asked;
    }

    /// The read asked for reported back: `drained` when it took everything queued, `waiting`
    /// when it found nothing (and a readiness wait is armed).
    pub fn on_read_done(&mut self, drained: bool, waiting: bool) {
        self.read = match (waiting, drained) {
            (true, _) => SourceRead::Waiting,
            (false, true) => SourceRead::Drained,
            (false, false) => SourceRead::Partial,
        };
    }

    /// Where reading the source stands.
    pub fn source_read(&self) -> SourceRead {
        self.read
    }

    /// Nothing of this direction is held or pending in userspace, given that nothing is being
    /// written to its destination: no read pending, nothing half-read, the source still open.
    pub fn is_quiet(&self) -> bool {
        !self.source_done && matches!(self.read, SourceRead::Drained | SourceRead::Waiting)
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

    /// The FIN has been passed on to the destination.
    pub fn is_shut_down(&self) -> bool {
        self.shut_down
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

    #[test]
    fn a_direction_is_quiet_only_when_its_last_read_took_everything() {
        let mut d = Direction::unbounded();
        assert!(!d.is_quiet(), "nothing is known before the first read");
        d.on_read_asked();
        assert!(!d.is_quiet(), "a read is pending");
        d.on_read(4096);
        d.on_read_done(false, false);
        assert_eq!(d.source_read(), SourceRead::Partial);
        assert!(
            !d.is_quiet(),
            "a full buffer may have left a segment half-read"
        );
        d.on_read_asked();
        d.on_read(100);
        d.on_read_done(true, false);
        assert!(d.is_quiet());
        d.on_read_asked();
        d.on_read_done(true, true);
        assert_eq!(d.source_read(), SourceRead::Waiting);
        assert!(d.is_quiet());
        d.on_source_eof();
        assert!(!d.is_quiet(), "a finished source is not taken over");
    }
}
