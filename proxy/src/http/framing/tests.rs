//! Framing decisions: every accepted and refused head, with the status of each refusal.

use super::*;

fn headers(list: &[(&str, &[u8])]) -> Vec<Header> {
    list.iter()
        .map(|(name, value)| Header {
            name: (*name).to_owned(),
            value: value.to_vec(),
        })
        .collect()
}

fn request(list: &[(&str, &[u8])]) -> Result<Framing, RequestFramingError> {
    request_framing(&headers(list), 1)
}

fn response(status: u16, list: &[(&str, &[u8])]) -> Result<Framing, ResponseFramingError> {
    response_framing(status, "GET", &headers(list), 1)
}

/// Header lines as `(name, value)`.
type Lines<'a> = &'a [(&'a str, &'a [u8])];

const CL: &str = "Content-Length";
const TE: &str = "Transfer-Encoding";

#[test]
fn requests_accepted() {
    let cases: &[(Lines, Framing)] = &[
        (&[], Framing::None),
        (&[("Host", b"a"), ("X-Other", b"5")], Framing::None),
        (&[(CL, b"0")], Framing::Length(0)),
        (&[(CL, b"5")], Framing::Length(5)),
        (&[("content-length", b" \t42\t ")], Framing::Length(42)),
        (&[(CL, b"007")], Framing::Length(7)),
        (&[(CL, b"18446744073709551615")], Framing::Length(u64::MAX)),
        (&[(TE, b"chunked")], Framing::Chunked),
        (&[("transfer-encoding", b"ChUnKeD")], Framing::Chunked),
        (&[(TE, b"gzip, chunked")], Framing::Chunked),
        (&[(TE, b"gzip"), (TE, b"chunked")], Framing::Chunked),
        (
            &[(TE, b"x-gzip,deflate ,\tcompress, x-compress, chunked")],
            Framing::Chunked,
        ),
    ];
    for (list, expected) in cases {
        assert_eq!(request(list), Ok(*expected), "{list:?}");
    }
}

#[test]
fn requests_refused_with_their_status() {
    use RequestFramingError as E;
    let cases: &[(Lines, RequestFramingError, u16)] = &[
        (&[(CL, b"5"), (TE, b"chunked")], E::LengthAndEncoding, 400),
        (&[(TE, b"chunked"), (CL, b"0")], E::LengthAndEncoding, 400),
        (&[(CL, b"5"), (CL, b"5")], E::RepeatedLength(2), 400),
        (&[(CL, b"5"), (CL, b"6")], E::RepeatedLength(2), 400),
        (&[(CL, b"5, 5")], E::RepeatedLength(2), 400),
        (&[(CL, b"5,5"), (CL, b"5")], E::RepeatedLength(3), 400),
        (&[(CL, b"+5")], E::InvalidLength("+5".into()), 400),
        (&[(CL, b"-1")], E::InvalidLength("-1".into()), 400),
        (&[(CL, b"0x5")], E::InvalidLength("0x5".into()), 400),
        (&[(CL, b"5 5")], E::InvalidLength("5 5".into()), 400),
        (&[(CL, b"5.0")], E::InvalidLength("5.0".into()), 400),
        (&[(CL, b"")], E::InvalidLength(String::new()), 400),
        (&[(CL, b"  ")], E::InvalidLength(String::new()), 400),
        (&[(CL, b"5,")], E::InvalidLength(String::new()), 400),
        (&[(CL, b"\x0b5")], E::InvalidLength("\x0b5".into()), 400),
        (&[(CL, b"5\r")], E::InvalidLength("5\r".into()), 400),
        (
            &[(CL, b"\xd9\xa5")],
            E::InvalidLength("\u{665}".into()),
            400,
        ),
        (
            &[(CL, b"18446744073709551616")],
            E::InvalidLength("18446744073709551616".into()),
            400,
        ),
        (
            &[(CL, b"99999999999999999999999")],
            E::InvalidLength("99999999999999999999999".into()),
            400,
        ),
        (&[(TE, b"gzip")], E::ChunkedNotFinal("gzip".into()), 400),
        (
            &[(TE, b"chunked, gzip")],
            E::ChunkedNotFinal("chunked, gzip".into()),
            400,
        ),
        (
            &[(TE, b"chunked"), (TE, b"gzip")],
            E::ChunkedNotFinal("chunked, gzip".into()),
            400,
        ),
        (
            &[(TE, b"chunked, chunked")],
            E::ChunkedRepeated("chunked, chunked".into()),
            400,
        ),
        (
            &[(TE, b"chunked"), (TE, b"chunked")],
            E::ChunkedRepeated("chunked, chunked".into()),
            400,
        ),
        (&[(TE, b"")], E::MalformedEncoding(String::new()), 400),
        (
            &[(TE, b"chunked,")],
            E::MalformedEncoding("chunked,".into()),
            400,
        ),
        (
            &[(TE, b", chunked")],
            E::MalformedEncoding(", chunked".into()),
            400,
        ),
        (
            &[(TE, b"gzip,,chunked")],
            E::MalformedEncoding("gzip,,chunked".into()),
            400,
        ),
        (
            &[(TE, b""), (TE, b"chunked")],
            E::MalformedEncoding(", chunked".into()),
            400,
        ),
        (
            &[(TE, b"chu nked")],
            E::MalformedEncoding("chu nked".into()),
            400,
        ),
        (
            &[(TE, b"\"chunked\"")],
            E::MalformedEncoding("\"chunked\"".into()),
            400,
        ),
        (
            &[(TE, b"chunked\x0b")],
            E::MalformedEncoding("chunked\x0b".into()),
            400,
        ),
        (
            &[(TE, b"identity")],
            E::UnsupportedCoding("identity".into()),
            501,
        ),
        (&[(TE, b"foo")], E::UnsupportedCoding("foo".into()), 501),
        (
            &[(TE, b"foo, chunked")],
            E::UnsupportedCoding("foo".into()),
            501,
        ),
        (
            &[(TE, b"identity, chunked")],
            E::UnsupportedCoding("identity".into()),
            501,
        ),
        (
            &[(TE, b"gzip;q=1, chunked")],
            E::UnsupportedCoding("gzip;q=1".into()),
            501,
        ),
        (
            &[(TE, b"chunked;x=1")],
            E::UnsupportedCoding("chunked;x=1".into()),
            501,
        ),
        (
            &[(TE, b"chunked\xff")],
            E::MalformedEncoding("chunked\u{fffd}".into()),
            400,
        ),
    ];
    for (list, error, status) in cases {
        let refused = request(list).expect_err(&format!("{list:?} must be refused"));
        assert_eq!(&refused, error, "{list:?}");
        assert_eq!(refused.status(), *status, "{list:?}");
    }
}

#[test]
fn transfer_encoding_is_refused_on_http10_requests() {
    let list = headers(&[(TE, b"chunked")]);
    let refused = request_framing(&list, 0).expect_err("HTTP/1.0 cannot carry TE");
    assert_eq!(refused, RequestFramingError::EncodingOnHttp10);
    assert_eq!(refused.status(), 400);
    // Even an unknown coding: the version alone decides.
    let list = headers(&[(TE, b"foo")]);
    assert_eq!(
        request_framing(&list, 0),
        Err(RequestFramingError::EncodingOnHttp10)
    );
    // Content-Length is fine on HTTP/1.0, and no header means no body.
    assert_eq!(
        request_framing(&headers(&[(CL, b"3")]), 0),
        Ok(Framing::Length(3))
    );
    assert_eq!(request_framing(&[], 0), Ok(Framing::None));
}

#[test]
fn every_request_error_has_a_message_and_a_4xx_or_501() {
    use RequestFramingError as E;
    let all = [
        E::LengthAndEncoding,
        E::RepeatedLength(2),
        E::InvalidLength("x".into()),
        E::EncodingOnHttp10,
        E::MalformedEncoding("x".into()),
        E::UnsupportedCoding("x".into()),
        E::ChunkedNotFinal("x".into()),
        E::ChunkedRepeated("x".into()),
    ];
    for error in all {
        assert!(!error.to_string().is_empty());
        assert!(matches!(error.status(), 400 | 501), "{error}");
    }
}

#[test]
fn bodiless_responses_ignore_their_headers() {
    let framed: &[(&str, &[u8])] = &[(CL, b"10"), (TE, b"chunked")];
    for status in [100, 101, 103, 199, 204, 304] {
        assert_eq!(response(status, framed), Ok(Framing::None), "{status}");
        assert_eq!(response(status, &[]), Ok(Framing::None), "{status}");
    }
    for status in [200, 404, 500] {
        let list = headers(framed);
        assert_eq!(
            response_framing(status, "HEAD", &list, 1),
            Ok(Framing::None),
            "{status}"
        );
    }
    // Methods are case-sensitive: `head` is an extension method with a body.
    let list = headers(&[(CL, b"3")]);
    assert_eq!(
        response_framing(200, "head", &list, 1),
        Ok(Framing::Length(3))
    );
}

#[test]
fn responses_accepted() {
    let cases: &[(Lines, Framing)] = &[
        (&[], Framing::UntilClose),
        (&[(CL, b"0")], Framing::Length(0)),
        (&[(CL, b" 12 ")], Framing::Length(12)),
        (&[(CL, b"5"), (CL, b"5")], Framing::Length(5)),
        (&[(CL, b"5, 5,5")], Framing::Length(5)),
        (&[(TE, b"chunked")], Framing::Chunked),
        (&[(TE, b"gzip, CHUNKED")], Framing::Chunked),
        (&[(TE, b"gzip"), (TE, b"chunked")], Framing::Chunked),
        (&[(TE, b"gzip")], Framing::UntilClose),
        (&[(TE, b"chunked, gzip")], Framing::UntilClose),
        (&[(TE, b"chunked, chunked")], Framing::UntilClose),
        (&[(TE, b"identity")], Framing::UntilClose),
        (&[(TE, b"")], Framing::UntilClose),
    ];
    for (list, expected) in cases {
        assert_eq!(response(200, list), Ok(*expected), "{list:?}");
    }
}

#[test]
fn responses_refused() {
    use ResponseFramingError as E;
    let cases: &[(Lines, ResponseFramingError)] = &[
        (&[(CL, b"5"), (TE, b"chunked")], E::LengthAndEncoding),
        (&[(TE, b"gzip"), (CL, b"5")], E::LengthAndEncoding),
        (
            &[(CL, b"5"), (CL, b"6")],
            E::ConflictingLengths("5, 6".into()),
        ),
        (&[(CL, b"5, 6")], E::ConflictingLengths("5, 6".into())),
        (&[(CL, b"+5")], E::InvalidLength("+5".into())),
        (&[(CL, b"-1")], E::InvalidLength("-1".into())),
        (&[(CL, b"0x5")], E::InvalidLength("0x5".into())),
        (&[(CL, b"5 5")], E::InvalidLength("5 5".into())),
        (&[(CL, b"")], E::InvalidLength(String::new())),
        (&[(CL, b"5,")], E::InvalidLength(String::new())),
        (
            &[(CL, b"18446744073709551616")],
            E::InvalidLength("18446744073709551616".into()),
        ),
        (&[(CL, b"5"), (CL, b"x")], E::InvalidLength("x".into())),
    ];
    for (list, error) in cases {
        assert_eq!(response(200, list).as_ref(), Err(error), "{list:?}");
        assert!(!error.to_string().is_empty());
    }
}

#[test]
fn http10_responses_with_transfer_encoding_run_until_close() {
    let list = headers(&[(TE, b"chunked")]);
    assert_eq!(
        response_framing(200, "GET", &list, 0),
        Ok(Framing::UntilClose)
    );
    // Both framing headers stay an error whatever the version.
    let list = headers(&[(TE, b"chunked"), (CL, b"1")]);
    assert_eq!(
        response_framing(200, "GET", &list, 0),
        Err(ResponseFramingError::LengthAndEncoding)
    );
    let list = headers(&[(CL, b"4")]);
    assert_eq!(
        response_framing(200, "GET", &list, 0),
        Ok(Framing::Length(4))
    );
}
