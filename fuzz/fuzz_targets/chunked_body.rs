//! Body framing: `http::BodyReader` (chunked bodies above all, `Content-Length` and
//! until-close too).
//!
//! Input: a byte choosing the framing and limits, two bytes seeding how the stream is cut into
//! reads, then the stream.
//!
//! Properties: the same bytes in any split give the same output, the same number of bytes
//! consumed and the same verdict (done, waiting, or the same error) as in one read; what the
//! reader passes on is always a prefix of its input, and once done exactly the body's bytes
//! (wire form); bytes after the body are never consumed; a `Content-Length` body is exactly its
//! length; after an error every later call repeats it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsplice::http::{BodyError, BodyLimits, BodyReader, Framing};
use wsplice_fuzz::{pieces, Input};

#[derive(Debug, PartialEq)]
struct Outcome {
    out: Vec<u8>,
    consumed: usize,
    done: bool,
    error: Option<BodyError>,
    eof: Result<(), BodyError>,
}

/// Reads `stream` in the given reads (consecutive ranges covering it).
fn read(
    framing: Framing,
    limits: BodyLimits,
    stream: &[u8],
    reads: &[std::ops::Range<usize>],
) -> Outcome {
    let mut reader = BodyReader::new(framing, limits);
    let mut out = Vec::new();
    let mut consumed = 0;
    let mut error = None;
    for read in reads {
        if reader.is_done() {
            break;
        }
        let piece = &stream[read.start.max(consumed)..read.end];
        if piece.is_empty() {
            continue;
        }
        match reader.feed(piece, &mut out) {
            Ok(fed) => {
                assert!(fed.consumed <= piece.len());
                assert_eq!(fed.done, reader.is_done());
                if !fed.done {
                    assert_eq!(fed.consumed, piece.len(), "bytes left over before the end");
                }
                consumed += fed.consumed;
            }
            Err(e) => {
                // Spent: every later call repeats the error.
                assert_eq!(reader.feed(b"0\r\n\r\n", &mut out), Err(e.clone()));
                assert_eq!(reader.on_eof(), Err(e.clone()));
                error = Some(e);
                break;
            }
        }
        assert!(
            stream.starts_with(&out),
            "output is not a prefix of the input"
        );
    }
    let done = reader.is_done();
    let eof = reader.on_eof();
    Outcome {
        out,
        consumed,
        done,
        error,
        eof,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let choice = input.byte();
    let seed = input.take(2).to_vec();
    let stream = input.rest();
    let framing = match choice % 8 {
        0..=4 => Framing::Chunked,
        5 => Framing::Length(u64::from(choice / 8)),
        6 => Framing::UntilClose,
        _ => Framing::None,
    };
    let limits = if choice & 0x80 != 0 {
        BodyLimits {
            max_line: 8,
            max_trailers: 32,
        }
    } else {
        BodyLimits::default()
    };

    let whole = read(framing, limits, stream, &pieces(&[], stream.len()));
    let split = read(framing, limits, stream, &pieces(&seed, stream.len()));
    // Bytes past an error are not read in one piece but may be in another: compare what was
    // passed on and the verdict.
    assert_eq!(whole.error, split.error, "verdicts differ");
    assert_eq!(whole.out, split.out, "outputs differ");
    assert_eq!(whole.done, split.done);
    assert_eq!(whole.eof, split.eof);
    if whole.error.is_none() {
        assert_eq!(whole.consumed, split.consumed);
    }
    if whole.done {
        assert_eq!(
            whole.out,
            &stream[..whole.consumed],
            "a done body is its wire bytes"
        );
        if let Framing::Length(length) = framing {
            assert_eq!(whole.consumed as u64, length);
        }
        // Feeding the body alone also completes it, consuming all of it.
        let alone = read(
            framing,
            limits,
            &stream[..whole.consumed],
            &pieces(&[], whole.consumed),
        );
        assert!(alone.done || whole.consumed == 0);
    }
    if let Framing::UntilClose = framing {
        assert_eq!(whole.out, stream);
        assert!(whole.eof.is_ok());
    }
});
