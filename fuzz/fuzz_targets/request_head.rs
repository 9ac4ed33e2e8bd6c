//! The client's request head: `handshake::parse_request`, at once and as the connection reads
//! it (`connection::handshake`: the accumulated bytes are parsed again whenever a read brought
//! a line end or the head reached its size limit).
//!
//! Properties: a complete head is within the limits and every shorter prefix of it is only
//! "read more"; the same head split into any reads gives the same request, or the same answer;
//! a parsed request's target is in normal form (normalising it again changes nothing), its Host
//! is valid, an upgrade's key is base64 of 16 bytes; every refusal is one of the statuses the
//! README lists.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsplice::handshake::{parse_request, HeadLimits, Request, RequestError};
use wsplice::target::{is_valid_host, normalize};
use wsplice_fuzz::{head_limits, pieces, prefix_lengths, Input};

type Verdict = Result<Option<(Request, usize)>, RequestError>;

/// What the connection concludes when the head arrives in `reads`: the first parse that is not
/// "read more", or `None` when it is still waiting after the last read.
fn read_in_pieces(buf: &[u8], reads: &[std::ops::Range<usize>], limits: &HeadLimits) -> Verdict {
    let mut got: Vec<u8> = Vec::new();
    for read in reads {
        let data = &buf[read.clone()];
        got.extend_from_slice(data);
        if !data.contains(&b'\n') && got.len() < limits.max_bytes {
            continue;
        }
        match parse_request(&got, limits) {
            Ok(None) => {}
            verdict => return verdict,
        }
    }
    Ok(None)
}

fn check_request(request: &Request) {
    let path = request.path();
    assert!(path.starts_with('/'), "target not in origin form: {path:?}");
    assert_eq!(
        normalize(path, request.host()).as_deref(),
        Ok(path),
        "the normal form is not stable"
    );
    match request {
        Request::Upgrade(upgrade) => {
            assert!(is_valid_host(&upgrade.host), "host {:?}", upgrade.host);
            use base64::Engine as _;
            let key = base64::engine::general_purpose::STANDARD
                .decode(&upgrade.key)
                .expect("an accepted key is base64");
            assert_eq!(key.len(), 16);
        }
        Request::Plain(plain) => {
            assert!(plain.http_minor <= 1);
            assert!(plain.host.is_empty() && plain.http_minor == 0 || is_valid_host(&plain.host));
            assert!(!plain.method.eq_ignore_ascii_case("CONNECT"));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let limits = head_limits(input.byte());
    let seed = input.take(2).to_vec();
    let buf = input.rest();

    let at_once = parse_request(buf, &limits);
    match &at_once {
        Ok(Some((request, head_len))) => {
            assert!(*head_len <= buf.len() && *head_len <= limits.max_bytes);
            assert!(buf[..*head_len].ends_with(b"\r\n\r\n"));
            check_request(request);
            // What follows the head does not change it.
            assert_eq!(
                parse_request(&buf[..*head_len], &limits),
                Ok(Some((request.clone(), *head_len)))
            );
            for k in prefix_lengths(*head_len) {
                assert_eq!(
                    parse_request(&buf[..k], &limits),
                    Ok(None),
                    "prefix of {k} bytes of a complete head"
                );
            }
        }
        Ok(None) => assert!(buf.len() < limits.max_bytes),
        Err(error) => {
            assert!(
                [400, 405, 426, 431, 501].contains(&error.status()),
                "{error:?} answered {}",
                error.status()
            );
            // The answer is a well-formed HTTP response that closes.
            let answer = error.response();
            assert!(answer.starts_with(format!("HTTP/1.1 {} ", error.status()).as_bytes()));
            assert!(answer
                .windows(b"Connection: close\r\n".len())
                .any(|w| w == b"Connection: close\r\n"));
        }
    }

    let in_pieces = read_in_pieces(buf, &pieces(&seed, buf.len()), &limits);
    match (&at_once, &in_pieces) {
        (Ok(Some(whole)), piecewise) => {
            assert_eq!(piecewise, &Ok(Some(whole.clone())), "split reads differ")
        }
        // Still waiting for a line end, or refused: the same way, except that a head that
        // reached the size limit in one read may be judged on its bytes past the limit.
        (Err(_), Ok(None)) | (Ok(None), Ok(None)) => {}
        (Err(whole), Err(piecewise)) => {
            if whole.status() != piecewise.status() {
                assert!(
                    whole.status() == 431 || piecewise.status() == 431,
                    "at once {whole:?}, in pieces {piecewise:?}"
                );
            }
        }
        (whole, piecewise) => panic!("at once {whole:?}, in pieces {piecewise:?}"),
    }
});
