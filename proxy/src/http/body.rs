//! Reading one message body off a byte stream, sans-IO.
//!
//! The proxy forwards bodies in wire form, so [`BodyReader`] does not decode anything: it
//! finds where the body ends and refuses malformed chunked framing before any of it reaches
//! the other side. Chunk data is opaque and passed on as it arrives; a chunk-size line or a
//! trailer line is held back until its CRLF arrives and it validates, so the peer never sees
//! a line the proxy would have refused. The output is the same however the input is split.
//!
//! The chunked grammar is RFC 9112 §7.1, strictly:
//!
//! ```text
//! chunk-line   = 1*16HEXDIG *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] ) CRLF
//! chunk        = chunk-line chunk-data CRLF          ; size > 0
//! last-chunk   = chunk-line                          ; size 0, then:
//! trailers     = *( token ":" field-value CRLF ) CRLF
//! ```
//!
//! Whitespace (SP/HTAB, the RFC's BWS) is accepted only around `;` and `=` inside extensions:
//! never before the size, never between the size and CRLF, never before CRLF. Every line ends
//! in CRLF exactly; a bare CR or LF anywhere is an error, and so is obs-fold in trailers.

use super::framing::Framing;
use super::syntax::{excerpt, is_field_value_byte, is_ows, is_tchar, is_token};

/// Bounds on the parts of a body the reader must hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Longest chunk-size line, extensions included, CRLF excluded.
    pub max_line: usize,
    /// Largest trailer section: every trailer line with its CRLF, the final empty line
    /// excluded.
    pub max_trailers: usize,
}

impl Default for BodyLimits {
    /// 4 KiB lines and 16 KiB of trailers: far above what real clients send, small enough
    /// that a held-back line costs little per connection.
    fn default() -> Self {
        BodyLimits {
            max_line: 4096,
            max_trailers: 16 * 1024,
        }
    }
}

/// The result of one [`BodyReader::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Input bytes that belong to this body. Less than the input only when `done`: the rest
    /// is the next message.
    pub consumed: usize,
    /// The body is complete.
    pub done: bool,
}

/// Why a body cannot be read; each variant says what was wrong, for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The stream ended before a `Content-Length` body was complete.
    #[error("stream ended after {received} of {expected} body bytes")]
    Truncated {
        /// Body bytes read.
        received: u64,
        /// Body bytes announced.
        expected: u64,
    },
    /// The stream ended before the end of a chunked body.
    #[error("stream ended {0} of a chunked body")]
    ChunkedTruncated(&'static str),
    /// A chunk-size line longer than [`BodyLimits::max_line`].
    #[error("chunk-size line longer than {0} bytes")]
    LineTooLong(usize),
    /// A trailer section larger than [`BodyLimits::max_trailers`].
    #[error("chunked trailer section larger than {0} bytes")]
    TrailersTooLarge(usize),
    /// A CR not followed by LF.
    #[error("bare CR {0} (lines end in CRLF)")]
    BareCr(&'static str),
    /// An LF not preceded by CR.
    #[error("bare LF {0} (lines end in CRLF)")]
    BareLf(&'static str),
    /// A chunk-size line that is not `1*16HEXDIG [chunk-ext]`.
    #[error("invalid chunk-size line {line:?}: {reason}")]
    InvalidChunkLine {
        /// The start of the line.
        line: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The bytes after a chunk's data are not CRLF (the size was wrong, or the data longer).
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    /// A trailer line that is not a field line.
    #[error("invalid trailer line {line:?}: {reason}")]
    InvalidTrailer {
        /// The start of the line.
        line: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Where the reader is in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// `Content-Length` framing with this many bytes still to come (never 0).
    Length { remaining: u64 },
    /// Everything until EOF.
    UntilClose,
    /// Reading a chunk-size line (held back in `line`).
    SizeLine,
    /// Passing this many bytes of chunk data (never 0).
    Data { remaining: u64 },
    /// Expecting the CRLF after chunk data; `cr` when the CR was seen (and held back).
    DataEnd { cr: bool },
    /// Reading trailer lines (each held back in `line`) up to the empty line.
    Trailers,
    /// The body is complete.
    Done,
    /// The body was refused; every later call repeats the error.
    Failed(BodyError),
}

/// Reads one body off a byte stream, validating its framing, and gives back its bytes
/// verbatim (wire form: chunk-size lines, extensions and trailers included) only once
/// validated.
#[derive(Debug, Clone)]
pub struct BodyReader {
    state: State,
    limits: BodyLimits,
    /// The partial line being held back (chunk-size or trailer line), CRLF included.
    line: Vec<u8>,
    /// Trailer bytes passed so far, against [`BodyLimits::max_trailers`].
    trailer_bytes: usize,
    /// Payload (`Content-Length` body or chunk data) bytes seen.
    payload: u64,
}

impl BodyReader {
    /// A reader for one body framed as `framing`. [`Framing::None`] and `Length(0)` are
    /// complete from the start.
    pub fn new(framing: Framing, limits: BodyLimits) -> BodyReader {
        let state = match framing {
            Framing::None | Framing::Length(0) => State::Done,
            Framing::Length(remaining) => State::Length { remaining },
            Framing::Chunked => State::SizeLine,
            Framing::UntilClose => State::UntilClose,
        };
        BodyReader {
            state,
            limits,
            line: Vec::new(),
            trailer_bytes: 0,
            payload: 0,
        }
    }

    /// Consumes a prefix of `input` and appends to `out` the body bytes validated so far.
    ///
    /// A partial chunk-size or trailer line is held back inside the reader (bounded by the
    /// limits) and appended once complete and valid. `consumed < input.len()` only when the
    /// body is done: the rest is the next message (a pipelined request), not this body.
    /// After an error the reader is spent and every call returns that error again.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<Fed, BodyError> {
        if let State::Failed(error) = &self.state {
            return Err(error.clone());
        }
        let mut consumed = 0;
        while consumed < input.len() && !self.is_done() {
            match self.step(&input[consumed..], out) {
                Ok(used) => consumed += used,
                Err(error) => {
                    self.state = State::Failed(error.clone());
                    return Err(error);
                }
            }
        }
        Ok(Fed {
            consumed,
            done: self.is_done(),
        })
    }

    /// The stream ended. Completes an [`Framing::UntilClose`] body; any other body must
    /// already be complete, or it was truncated.
    pub fn on_eof(&mut self) -> Result<(), BodyError> {
        let error = match &self.state {
            State::Done => return Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                return Ok(());
            }
            State::Failed(error) => return Err(error.clone()),
            State::Length { remaining } => BodyError::Truncated {
                received: self.payload,
                expected: self.payload.saturating_add(*remaining),
            },
            State::SizeLine => BodyError::ChunkedTruncated("in a chunk-size line"),
            State::Data { .. } => BodyError::ChunkedTruncated("in chunk data"),
            State::DataEnd { .. } => {
                BodyError::ChunkedTruncated("before the CRLF after chunk data")
            }
            State::Trailers => BodyError::ChunkedTruncated("in the trailer section"),
        };
        self.state = State::Failed(error.clone());
        Err(error)
    }

    /// The body is complete: nothing more belongs to it.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Payload bytes seen so far (chunk data only, for chunked bodies), for logs.
    pub fn payload_bytes(&self) -> u64 {
        self.payload
    }

    /// Makes progress on non-empty `input`; returns how many bytes it used.
    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, BodyError> {
        match self.state {
            State::Length { remaining } => Ok(self.pass_length(remaining, input, out)),
            State::UntilClose => {
                out.extend_from_slice(input);
                self.payload = self.payload.saturating_add(len_u64(input.len()));
                Ok(input.len())
            }
            State::SizeLine => self.read_size_line(input, out),
            State::Data { remaining } => Ok(self.pass_data(remaining, input, out)),
            State::DataEnd { cr } => self.read_data_end(cr, input[0], out),
            State::Trailers => self.read_trailer_line(input, out),
            // `feed` stops before these.
            State::Done | State::Failed(_) => Ok(0),
        }
    }

    fn pass_length(&mut self, remaining: u64, input: &[u8], out: &mut Vec<u8>) -> usize {
        let take = take_up_to(remaining, input.len());
        out.extend_from_slice(&input[..take]);
        self.payload = self.payload.saturating_add(len_u64(take));
        let left = remaining - len_u64(take);
        self.state = if left == 0 {
            State::Done
        } else {
            State::Length { remaining: left }
        };
        take
    }

    fn pass_data(&mut self, remaining: u64, input: &[u8], out: &mut Vec<u8>) -> usize {
        let take = take_up_to(remaining, input.len());
        out.extend_from_slice(&input[..take]);
        // Saturating: several chunks of up to u64::MAX bytes each could overflow a sum.
        self.payload = self.payload.saturating_add(len_u64(take));
        let left = remaining - len_u64(take);
        self.state = if left == 0 {
            State::DataEnd { cr: false }
        } else {
            State::Data { remaining: left }
        };
        take
    }

    /// One byte of the CRLF after chunk data; the CR is held back until the LF validates it.
    fn read_data_end(&mut self, cr: bool, byte: u8, out: &mut Vec<u8>) -> Result<usize, BodyError> {
        match (cr, byte) {
            (false, b'\r') => self.state = State::DataEnd { cr: true },
            (true, b'\n') => {
                out.extend_from_slice(b"\r\n");
                self.state = State::SizeLine;
            }
            (true, _) => return Err(BodyError::BareCr("after chunk data")),
            (false, b'\n') => return Err(BodyError::BareLf("after chunk data")),
            (false, _) => return Err(BodyError::MissingCrlf),
        }
        Ok(1)
    }

    fn read_size_line(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, BodyError> {
        let max = self.limits.max_line;
        let too_long = BodyError::LineTooLong(max);
        let (used, complete) =
            gather_line(&mut self.line, input, max, "in a chunk-size line", too_long)?;
        if complete {
            let size = parse_size_line(&self.line[..self.line.len() - 2])?;
            out.extend_from_slice(&self.line);
            self.line.clear();
            self.state = match size {
                0 => State::Trailers,
                remaining => State::Data { remaining },
            };
        }
        Ok(used)
    }

    fn read_trailer_line(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, BodyError> {
        let max = self.limits.max_trailers;
        // A field line needs its CRLF inside the budget; the empty line is always allowed.
        let room = max.saturating_sub(self.trailer_bytes).saturating_sub(2);
        let too_long = BodyError::TrailersTooLarge(max);
        let (used, complete) =
            gather_line(&mut self.line, input, room, "in a trailer line", too_long)?;
        if complete {
            let content = &self.line[..self.line.len() - 2];
            if content.is_empty() {
                self.state = State::Done;
            } else {
                check_trailer_line(content)?;
                self.trailer_bytes += self.line.len();
            }
            out.extend_from_slice(&self.line);
            self.line.clear();
        }
        Ok(used)
    }
}

/// How many of `available` bytes to take when `remaining` are wanted.
fn take_up_to(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |remaining| remaining.min(available))
}

/// A byte count as u64; lossless on every platform Rust supports (usize is at most 64 bits).
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Appends to `line` the bytes of `input` up to and including the first LF, checking the
/// line's end as it grows. Returns the bytes used and whether the line is complete (then
/// `line` ends in CRLF).
///
/// `max` bounds the line's content (CRLF excluded); going past it is `too_long`. A CR anywhere but right before the LF is a bare CR, found as soon as the
/// byte after it arrives, so the same error is reported however the input is split.
fn gather_line(
    line: &mut Vec<u8>,
    input: &[u8],
    max: usize,
    place: &'static str,
    too_long: BodyError,
) -> Result<(usize, bool), BodyError> {
    // Never hold more than content + CRLF.
    let room = max.saturating_add(2).saturating_sub(line.len());
    let window = &input[..input.len().min(room)];
    let (used, complete) = match window.iter().position(|&b| b == b'\n') {
        Some(lf) => (lf + 1, true),
        None => (window.len(), false),
    };
    let start = line.len();
    line.extend_from_slice(&window[..used]);
    // Only the new bytes, and the byte before them (a CR waiting for its LF), need a look.
    let from = start.saturating_sub(1);
    let bare_cr = line[from..]
        .windows(2)
        .any(|pair| pair[0] == b'\r' && pair[1] != b'\n');
    if bare_cr {
        return Err(BodyError::BareCr(place));
    }
    if complete && !line.ends_with(b"\r\n") {
        return Err(BodyError::BareLf(place));
    }
    if !complete && line.len() >= max.saturating_add(2) {
        return Err(too_long);
    }
    Ok((used, complete))
}

/// Validates a chunk-size line (CRLF removed) and returns the chunk size.
fn parse_size_line(line: &[u8]) -> Result<u64, BodyError> {
    let invalid = |reason| BodyError::InvalidChunkLine {
        line: excerpt(line),
        reason,
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(invalid("the size is not a hex number"));
    }
    if digits > 16 {
        return Err(invalid("the size has more than 16 hex digits"));
    }
    let size = line[..digits].iter().fold(0u64, |size, &b| {
        // At most 16 digits: the shift never loses a bit.
        (size << 4) | u64::from(hex_value(b))
    });
    check_extensions(&line[digits..]).map_err(invalid)?;
    Ok(size)
}

fn hex_value(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

/// `*( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )` and nothing else, with no
/// whitespace at the end of the line.
fn check_extensions(rest: &[u8]) -> Result<(), &'static str> {
    let mut pos = 0;
    loop {
        let before = pos;
        pos = skip_bws(rest, pos);
        match rest.get(pos) {
            None if pos > before => return Err("whitespace before the line end"),
            None => return Ok(()),
            Some(b';') => {}
            Some(_) => return Err("unexpected byte (expected \";\" or the line end)"),
        }
        pos = skip_bws(rest, pos + 1);
        pos = skip_token(rest, pos).ok_or("extension without a valid name")?;
        let value_at = skip_bws(rest, pos);
        if rest.get(value_at) == Some(&b'=') {
            let value = skip_bws(rest, value_at + 1);
            pos = match rest.get(value) {
                Some(b'"') => skip_quoted(rest, value)?,
                _ => skip_token(rest, value).ok_or("extension value is not a token")?,
            };
        }
    }
}

fn skip_bws(bytes: &[u8], pos: usize) -> usize {
    pos + bytes[pos.min(bytes.len())..]
        .iter()
        .take_while(|&&b| is_ows(b))
        .count()
}

/// The end of the token starting at `pos`, if there is one.
fn skip_token(bytes: &[u8], pos: usize) -> Option<usize> {
    let len = bytes[pos.min(bytes.len())..]
        .iter()
        .take_while(|&&b| is_tchar(b))
        .count();
    (len > 0).then_some(pos + len)
}

/// The end of the quoted-string whose opening quote is at `pos` (RFC 9110 §5.6.4).
fn skip_quoted(bytes: &[u8], pos: usize) -> Result<usize, &'static str> {
    let mut at = pos + 1;
    while let Some(&b) = bytes.get(at) {
        match b {
            b'"' => return Ok(at + 1),
            b'\\' => match bytes.get(at + 1) {
                Some(&escaped) if is_field_value_byte(escaped) => at += 2,
                Some(_) => return Err("control character in a quoted string"),
                None => return Err("unterminated quoted string"),
            },
            b if is_field_value_byte(b) => at += 1,
            _ => return Err("control character in a quoted string"),
        }
    }
    Err("unterminated quoted string")
}

/// `field-name ":" OWS field-value OWS` with no obs-fold (CRLF removed).
fn check_trailer_line(line: &[u8]) -> Result<(), BodyError> {
    let invalid = |reason| BodyError::InvalidTrailer {
        line: excerpt(line),
        reason,
    };
    if line.first().is_some_and(|&b| is_ows(b)) {
        return Err(invalid("obs-fold (a line starting with whitespace)"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| invalid("no colon"))?;
    if !is_token(&line[..colon]) {
        return Err(invalid("the name is not a token"));
    }
    if !line[colon + 1..].iter().all(|&b| is_field_value_byte(b)) {
        return Err(invalid("control character in the value"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
