//! What the fuzz targets share: reading a few control bytes off the input, cutting the rest
//! into pieces, and the checks on heads that several targets make. No parsing of its own: every
//! target drives the proxy's code (`wsplice::…`) and checks properties of what it returns.

use wsplice::handshake::{HeadLimits, Header};

/// The input as a few control bytes followed by the bytes under test.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps the fuzzer's input.
    pub fn new(bytes: &'a [u8]) -> Input<'a> {
        Input { bytes }
    }

    /// The next control byte (0 once the input is exhausted).
    pub fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&first, rest)) => {
                self.bytes = rest;
                first
            }
            None => 0,
        }
    }

    /// Up to `len` bytes.
    pub fn take(&mut self, len: usize) -> &'a [u8] {
        let (head, rest) = self.bytes.split_at(len.min(self.bytes.len()));
        self.bytes = rest;
        head
    }

    /// The bytes up to the first `separator` (excluded; all of them when there is none).
    pub fn until(&mut self, separator: &[u8]) -> &'a [u8] {
        match self
            .bytes
            .windows(separator.len())
            .position(|window| window == separator)
        {
            Some(at) => {
                let head = &self.bytes[..at];
                self.bytes = &self.bytes[at + separator.len()..];
                head
            }
            None => std::mem::take(&mut self.bytes),
        }
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// Head limits picked by a control byte: small ones reach the limit checks, large ones let
/// big heads through.
pub fn head_limits(selector: u8) -> HeadLimits {
    const BYTES: [usize; 4] = [64, 512, 4096, 16384];
    const HEADERS: [usize; 4] = [1, 4, 32, 100];
    HeadLimits {
        max_bytes: BYTES[usize::from(selector & 3)],
        max_headers: HEADERS[usize::from((selector >> 2) & 3)],
    }
}

/// Limits no re-serialised head of the fuzzer's size reaches.
pub const GENEROUS: HeadLimits = HeadLimits {
    max_bytes: 1 << 20,
    max_headers: 4096,
};

/// Cuts `len` bytes into consecutive pieces whose lengths come from `seed` (cycled; a zero
/// byte means a piece of one byte; an empty seed, one piece). The pieces cover `0..len`
/// exactly.
pub fn pieces(seed: &[u8], len: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut index = 0;
    while at < len {
        let size = seed
            .get(index % seed.len().max(1))
            .map_or(len, |&b| usize::from(b).max(1));
        let end = (at + size).min(len);
        out.push(at..end);
        at = end;
        index += 1;
    }
    out
}

/// Whether `part` appears in `whole` in the same order (not necessarily contiguous).
pub fn is_subsequence(part: &[Header], whole: &[Header]) -> bool {
    let mut rest = whole.iter();
    part.iter().all(|wanted| rest.any(|h| h == wanted))
}

/// The values of every header called `name` (case-insensitive).
pub fn values<'h>(headers: &'h [Header], name: &str) -> Vec<&'h [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_slice())
        .collect()
}

/// The prefix lengths worth checking below `len`: all of them for short heads, a sample
/// (every 7th and the last 16) beyond, so long heads do not make a run quadratic.
pub fn prefix_lengths(len: usize) -> Vec<usize> {
    if len <= 256 {
        return (0..len).collect();
    }
    (0..len).filter(|&k| k % 7 == 0 || k + 16 >= len).collect()
}
