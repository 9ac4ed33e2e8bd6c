//! A nameserver's answer to the upstream resolver: `upstream::dns::parse_answer`.
//!
//! Input: a DNS message, parsed as the answer to the A and the AAAA query for
//! `app.example.com` with the id 0x1234, and again with the id its first two bytes hold (so the
//! fuzzer need not guess the id to reach the question, names and records).
//!
//! Properties: the same bytes give the same verdict; an answer holds no more addresses than its
//! bytes can (15 bytes a record at least, with the root as owner through a CNAME) and only of
//! the type asked; a complete answer has addresses and a TTL, a truncated one neither; bytes
//! after an answer change nothing (the sections after the answers are not read); a message of
//! another id is not ours.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsplice::upstream::dns::{parse_answer, Answer, DnsError, RecordType};

/// The name every query of this target asks for (the seeds answer it).
const NAME: &str = "app.example.com";

/// The id of the fixed-id parse (the seeds carry it too).
const ID: u16 = 0x1234;

fuzz_target!(|data: &[u8]| {
    let echoed = match data {
        [high, low, ..] => u16::from_be_bytes([*high, *low]),
        _ => ID,
    };
    for qtype in [RecordType::A, RecordType::Aaaa] {
        for id in [ID, echoed] {
            check(data, id, qtype);
        }
    }
});

fn check(data: &[u8], id: u16, qtype: RecordType) {
    let verdict = parse_answer(data, id, NAME, qtype);
    let again = parse_answer(data, id, NAME, qtype);
    assert_eq!(
        format!("{verdict:?}"),
        format!("{again:?}"),
        "not deterministic"
    );
    match &verdict {
        Ok(answer) => check_answer(data, id, qtype, answer),
        Err(error) => assert!(!error.to_string().is_empty()),
    }
    if data.len() >= 12 && id != u16::from_be_bytes([data[0], data[1]]) {
        assert!(matches!(verdict, Err(DnsError::Mismatch(_))), "{verdict:?}");
    }
}

fn check_answer(data: &[u8], id: u16, qtype: RecordType, answer: &Answer) {
    assert!(
        answer.addrs.len() * 15 <= data.len(),
        "{} addresses",
        answer.addrs.len()
    );
    assert_eq!(answer.truncated, answer.addrs.is_empty());
    assert_eq!(answer.truncated, answer.ttl.is_none());
    let v4 = qtype == RecordType::A;
    assert!(
        answer.addrs.iter().all(|addr| addr.is_ipv4() == v4),
        "{answer:?} for {qtype:?}"
    );
    let mut longer = data.to_vec();
    longer.extend_from_slice(&[0xc0, 0x0c, 0xff, 0x00]);
    let verdict = parse_answer(&longer, id, NAME, qtype);
    assert_eq!(
        verdict.ok().as_ref(),
        Some(answer),
        "trailing bytes changed the answer"
    );
}
