//! Where a WebSocket byte stream stands between frames (RFC 6455 §5.2), so a relay can stop
//! at a frame boundary and say goodbye with a Close frame of its own without cutting one.
//!
//! The tracker follows the headers only (2 to 14 bytes, read one byte at a time across any
//! chunking) and skips the payloads by their length: it holds 16 bytes, never a frame.

use serde::{Deserialize, Serialize};

/// What a tracker is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Step {
    /// Skipping `left` bytes of payload; at a boundary when `left` is 0.
    Payload,
    /// The header's second byte (mask bit, 7-bit length) comes next.
    Length,
    /// `bytes` bytes of the extended length still to come.
    Extended { bytes: u8, masked: bool },
    /// `bytes` bytes of the masking key still to come.
    Mask { bytes: u8 },
    /// Nobody saw where this stream's frames start (it was moved by the kernel): boundaries
    /// are unknown.
    Unknown,
}

/// The frame position of one direction of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameTracker {
    /// Payload (or other non-frame) bytes still to skip.
    left: u64,
    step: Step,
}

impl Default for FrameTracker {
    fn default() -> FrameTracker {
        FrameTracker::at_boundary()
    }
}

impl FrameTracker {
    /// A stream at a frame boundary (the first byte after the 101).
    pub const fn at_boundary() -> FrameTracker {
        FrameTracker {
            left: 0,
            step: Step::Payload,
        }
    }

    /// A stream whose next `bytes` bytes are not frames (the 101 still queued ahead of them),
    /// then frames.
    pub fn after(bytes: u64) -> FrameTracker {
        FrameTracker {
            left: bytes,
            step: Step::Payload,
        }
    }

    /// A stream whose frame boundaries nobody knows.
    pub const fn unknown() -> FrameTracker {
        FrameTracker {
            left: 0,
            step: Step::Unknown,
        }
    }

    /// Whether the boundaries are known.
    pub fn is_known(&self) -> bool {
        self.step != Step::Unknown
    }

    /// Whether everything fed so far ends exactly between two frames.
    pub fn is_at_boundary(&self) -> bool {
        self.step == Step::Payload && self.left == 0
    }

    /// The most bytes that can be passed on without going past the end of the current frame:
    /// the payload left, 1 inside a header (it is read byte by byte), `None` at a boundary or
    /// when the boundaries are unknown.
    pub fn to_boundary(&self) -> Option<u64> {
        match self.step {
            Step::Payload if self.left == 0 => None,
            Step::Payload => Some(self.left),
            Step::Unknown => None,
            _ => Some(1),
        }
    }

    /// Follows `bytes`, the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&first, rest)) = bytes.split_first() {
            match self.step {
                Step::Unknown => return,
                Step::Payload if self.left == 0 => {
                    // The first header byte (FIN, RSV, opcode): nothing in it sizes the frame.
                    self.step = Step::Length;
                    bytes = rest;
                }
                Step::Payload => {
                    let skip = usize::try_from(self.left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    self.left -= skip as u64;
                    bytes = &bytes[skip..];
                }
                Step::Length => {
                    let masked = first & 0x80 != 0;
                    self.left = 0;
                    self.step = match first & 0x7f {
                        126 => Step::Extended { bytes: 2, masked },
                        127 => Step::Extended { bytes: 8, masked },
                        length => {
                            self.left = u64::from(length);
                            Self::after_length(masked)
                        }
                    };
                    bytes = rest;
                }
                Step::Extended {
                    bytes: left,
                    masked,
                } => {
                    self.left = self.left << 8 | u64::from(first);
                    self.step = if left == 1 {
                        Self::after_length(masked)
                    } else {
                        Step::Extended {
                            bytes: left - 1,
                            masked,
                        }
                    };
                    bytes = rest;
                }
                Step::Mask { bytes: left } => {
                    self.step = if left == 1 {
                        Step::Payload
                    } else {
                        Step::Mask { bytes: left - 1 }
                    };
                    bytes = rest;
                }
            }
        }
    }

    /// The tracker as the splice program keeps it in a socket's `Activity` record
    /// (`frame_left`, `frame_state`), so it goes on where this one stopped.
    pub fn to_kernel(&self) -> (u64, u32) {
        use wsplice_common::{
            FRAME_EXTENDED, FRAME_LENGTH, FRAME_MASK, FRAME_PAYLOAD, FRAME_UNKNOWN,
        };
        let state = match self.step {
            Step::Payload => FRAME_PAYLOAD,
            Step::Length => FRAME_LENGTH,
            Step::Extended { bytes, masked } => {
                FRAME_EXTENDED | u32::from(bytes) << 8 | u32::from(masked) << 16
            }
            Step::Mask { bytes } => FRAME_MASK | u32::from(bytes) << 8 | 1 << 16,
            Step::Unknown => FRAME_UNKNOWN,
        };
        (self.left, state)
    }

    /// Where the splice program's record says the frames stand (the inverse of
    /// [`FrameTracker::to_kernel`]; anything it does not know is unknown).
    pub fn from_kernel(left: u64, state: u32) -> FrameTracker {
        use wsplice_common::{FRAME_EXTENDED, FRAME_LENGTH, FRAME_MASK, FRAME_PAYLOAD};
        let bytes = ((state >> 8) & 0xff) as u8;
        let masked = (state >> 16) & 1 == 1;
        let step = match state & 0xff {
            FRAME_PAYLOAD => Step::Payload,
            FRAME_LENGTH => Step::Length,
            FRAME_EXTENDED if (1..=8).contains(&bytes) => Step::Extended { bytes, masked },
            FRAME_MASK if (1..=4).contains(&bytes) => Step::Mask { bytes },
            _ => return FrameTracker::unknown(),
        };
        FrameTracker { left, step }
    }

    fn after_length(masked: bool) -> Step {
        if masked {
            Step::Mask { bytes: 4 }
        } else {
            Step::Payload
        }
    }
}

/// The status of a Close frame the proxy sends of its own (RFC 6455 §7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1001 "going away": the proxy shuts down.
    GoingAway,
    /// 1012 "service restart": the tunnel moves to another server (rebalancing); clients
    /// reconnect, and the balancer places them anew.
    ServiceRestart,
}

impl CloseCode {
    /// Its number on the wire.
    pub fn value(self) -> u16 {
        match self {
            CloseCode::GoingAway => 1001,
            CloseCode::ServiceRestart => 1012,
        }
    }
}

/// The Close frame (RFC 6455 §5.5.1) with status `code`: unmasked towards a client, masked
/// with `mask` towards a server (frames from a client must be masked).
pub fn close_frame(code: CloseCode, mask: Option<[u8; 4]>) -> Vec<u8> {
    let code = code.value().to_be_bytes();
    match mask {
        None => vec![0x88, 0x02, code[0], code[1]],
        Some(key) => vec![
            0x88,
            0x82,
            key[0],
            key[1],
            key[2],
            key[3],
            code[0] ^ key[0],
            code[1] ^ key[1],
        ],
    }
}

/// A frame for tests: FIN + text, `payload`, masked with `mask` if given.
#[cfg(test)]
pub(crate) fn frame(payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x81];
    let bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(bit | n as u8),
        n if n <= 0xffff => {
            out.push(bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask.map_or(0, |key| key[i % 4])),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every position of `stream` at which the tracker, fed in chunks of `chunk`, says it is at
    /// a boundary.
    fn boundaries(stream: &[u8], chunk: usize) -> Vec<usize> {
        let mut tracker = FrameTracker::at_boundary();
        let mut found = Vec::new();
        for (index, piece) in stream.chunks(chunk).enumerate() {
            tracker.feed(piece);
            if tracker.is_at_boundary() {
                found.push(index * chunk + piece.len());
            }
        }
        found
    }

    #[test]
    fn boundaries_are_found_whatever_the_chunking_and_the_length_encoding() {
        let frames = [
            frame(b"", None),
            frame(b"hello", Some([1, 2, 3, 4])),
            frame(&[7; 126], None),
            frame(&[8; 70_000], Some([9, 9, 9, 9])),
            frame(&[1; 125], None),
        ];
        let mut stream = Vec::new();
        let mut ends = Vec::new();
        for frame in &frames {
            stream.extend_from_slice(frame);
            ends.push(stream.len());
        }
        assert_eq!(boundaries(&stream, 1), ends, "byte by byte");
        for chunk in [2, 3, 7, 13, 1000, 65_536] {
            let found = boundaries(&stream, chunk);
            let expected: Vec<usize> = ends
                .iter()
                .copied()
                .filter(|end| end % chunk == 0 || *end == stream.len())
                .collect();
            assert_eq!(found, expected, "chunks of {chunk}");
        }
    }

    #[test]
    fn the_way_to_the_next_boundary_is_never_overshot() {
        let mut stream = frame(&[5; 300], Some([1, 1, 1, 1]));
        stream.extend(frame(b"x", None));
        let mut tracker = FrameTracker::at_boundary();
        let mut position = 0;
        let mut stops = Vec::new();
        while position < stream.len() {
            let step = tracker.to_boundary().map_or(1, |n| n as usize).min(64);
            tracker.feed(&stream[position..position + step]);
            position += step;
            if tracker.is_at_boundary() {
                stops.push(position);
            }
        }
        assert_eq!(stops, vec![2 + 2 + 4 + 300, stream.len()]);
    }

    #[test]
    fn a_head_ahead_of_the_frames_is_skipped_and_unknown_streams_stay_unknown() {
        let mut tracker = FrameTracker::after(10);
        tracker.feed(b"HTTP/1.1 1");
        assert!(tracker.is_at_boundary());
        tracker.feed(&frame(b"ok", None));
        assert!(tracker.is_at_boundary());
        let mut lost = FrameTracker::unknown();
        lost.feed(&frame(b"ok", None));
        assert!(!lost.is_known() && !lost.is_at_boundary());
        assert_eq!(lost.to_boundary(), None);
    }

    #[test]
    fn the_kernel_record_form_round_trips_at_every_byte_of_a_stream() {
        let mut stream = frame(&[3; 300], Some([1, 2, 3, 4]));
        stream.extend(frame(&[4; 70_000], None));
        let mut tracker = FrameTracker::at_boundary();
        for byte in stream.chunks(1) {
            tracker.feed(byte);
            let (left, state) = tracker.to_kernel();
            assert_eq!(FrameTracker::from_kernel(left, state), tracker);
        }
        let (left, state) = FrameTracker::unknown().to_kernel();
        assert!(!FrameTracker::from_kernel(left, state).is_known());
        assert!(
            !FrameTracker::from_kernel(0, 0x99).is_known(),
            "a state it does not know"
        );
    }

    #[test]
    fn close_frames_parse_as_one_close_frame_with_their_code() {
        let plain = close_frame(CloseCode::GoingAway, None);
        assert_eq!(plain, [0x88, 0x02, 0x03, 0xe9]);
        let masked = close_frame(CloseCode::GoingAway, Some([0xa, 0xb, 0xc, 0xd]));
        assert_eq!(masked[1], 0x82);
        assert_eq!([masked[6] ^ 0xa, masked[7] ^ 0xb], [0x03, 0xe9]);
        let restart = close_frame(CloseCode::ServiceRestart, None);
        assert_eq!(restart, [0x88, 0x02, 0x03, 0xf4]);
        for bytes in [plain, masked, restart] {
            let mut tracker = FrameTracker::at_boundary();
            tracker.feed(&bytes[..bytes.len() - 1]);
            assert!(!tracker.is_at_boundary());
            tracker.feed(&bytes[bytes.len() - 1..]);
            assert!(tracker.is_at_boundary());
        }
    }
}
