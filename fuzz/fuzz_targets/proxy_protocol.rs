//! The PROXY protocol header a load balancer puts before a stream: `proxy_protocol::parse` (v1
//! and v2), and `proxy_protocol::encode_v2` for what it found.
//!
//! Input: the stream's first bytes.
//!
//! Properties: a header takes at most the input and `MAX_HEADER_LEN` bytes, parses the same
//! without what follows it, and every shorter prefix of it is only "read more"; "read more" is
//! only answered below `MAX_HEADER_LEN` bytes; a refusal stays one when more bytes arrive; a
//! header's addresses, encoded as v2, parse back to the same addresses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsplice::proxy_protocol::{encode_v2, parse, Command, Version, MAX_HEADER_LEN};
use wsplice_fuzz::prefix_lengths;

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data);
    match &verdict {
        Ok(Some((header, len))) => {
            assert!(*len <= data.len() && *len <= MAX_HEADER_LEN, "{len} bytes");
            assert_eq!(
                parse(&data[..*len]),
                verdict,
                "the stream's bytes changed the header"
            );
            for k in prefix_lengths(*len) {
                assert_eq!(
                    parse(&data[..k]),
                    Ok(None),
                    "prefix of {k} bytes of a header"
                );
            }
            if header.version == Version::V1 {
                assert!(header.tlvs.is_empty());
            }
            if header.command == Command::Local {
                assert!(header.addresses.is_none() && header.tlvs.is_empty());
            }
            let _ = (header.authority(), header.unique_id());
            if let Some(addresses) = &header.addresses {
                assert_eq!(header.source(), Some(addresses.source));
                let encoded = encode_v2(Some(addresses));
                let (again, again_len) = parse(&encoded)
                    .expect("an encoded header parses")
                    .expect("an encoded header is complete");
                assert_eq!(again_len, encoded.len());
                assert_eq!(
                    (again.version, again.command),
                    (Version::V2, Command::Proxy)
                );
                assert_eq!(again.addresses.as_ref(), Some(addresses));
            }
        }
        Ok(None) => assert!(
            data.len() < MAX_HEADER_LEN,
            "waiting at {} bytes",
            data.len()
        ),
        Err(error) => {
            assert!(!error.to_string().is_empty());
            let mut more = data.to_vec();
            more.extend_from_slice(b"\r\n\0");
            assert_eq!(parse(&more), verdict, "more bytes changed a refusal");
        }
    }
});
