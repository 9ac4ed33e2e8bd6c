//! The upgrade handshake's paths, without sockets.

use super::*;
use crate::config::Config;

const REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
const UPGRADED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

fn services(servers: &str, extra: &str) -> Services {
    let text = format!(
        "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]\nupstream = \"default\"\n{extra}\n\n\
         [upstream.default]\nservers = [{servers}]\n"
    );
    Services::new(&Config::parse(&text).expect("test config parses"), None)
}

fn client() -> SocketAddr {
    "10.1.2.3:5555".parse().unwrap()
}

fn addresses() -> Addresses {
    Addresses {
        source: client(),
        destination: "127.0.0.1:8080".parse().unwrap(),
    }
}

fn connected(services: &Services) -> Handshake {
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    assert!(matches!(
        h.on_client_data(REQUEST, services, 0),
        Step::Connect(_)
    ));
    assert!(matches!(h.on_connected(false), Step::SendRequest(_)));
    assert_eq!(h.on_request_sent(), Step::ReadUpstream);
    h
}

#[test]
fn a_valid_upgrade_goes_connect_send_read_then_tunnel_with_pipelined_bytes_in_order() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    assert_eq!(h.start(), Step::ReadClient);
    // The request arrives in two pieces, with a frame pipelined behind the head.
    let mut bytes = REQUEST.to_vec();
    bytes.extend_from_slice(b"\x81\x02hi");
    let (first, second) = bytes.split_at(20);
    assert_eq!(h.on_client_data(first, &services, 0), Step::ReadClient);
    assert_eq!(
        h.on_client_data(second, &services, 0),
        Step::Connect("127.0.0.1:9001".parse().unwrap())
    );
    let Step::SendRequest(request) = h.on_connected(false) else {
        panic!("expected the rewritten request");
    };
    let request = String::from_utf8(request).unwrap();
    assert!(request.starts_with("GET /chat HTTP/1.1\r\n"), "{request}");
    assert!(
        request.contains("X-Forwarded-For: 10.1.2.3\r\n"),
        "{request}"
    );
    assert!(
        !request.contains("hi"),
        "pipelined bytes must wait for the 101"
    );
    assert_eq!(h.on_request_sent(), Step::ReadUpstream);
    // The 101 arrives split, with a frame right behind it.
    assert_eq!(
        h.on_upstream_data(&UPGRADED[..30], &services),
        Step::ReadUpstream
    );
    let mut rest = UPGRADED[30..].to_vec();
    rest.extend_from_slice(b"\x81\x03abc");
    let mut to_client_expected = UPGRADED.to_vec();
    to_client_expected.extend_from_slice(b"\x81\x03abc");
    assert_eq!(
        h.on_upstream_data(&rest, &services),
        Step::Tunnel {
            to_client: to_client_expected,
            head_len: UPGRADED.len(),
            to_upstream: b"\x81\x02hi".to_vec(),
        }
    );
    assert_eq!(h.summary().host(), "example.com");
    assert_eq!(h.summary().path(), "/chat");
}

#[test]
fn an_invalid_request_is_rejected_with_its_status() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    let request = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
    let Step::Reject(rejection) = h.on_client_data(request, &services, 0) else {
        panic!("expected a rejection");
    };
    assert_eq!(rejection.status, 426);
    assert!(rejection.response.starts_with(b"HTTP/1.1 426 "));
}

#[test]
fn a_plain_request_is_426_only_on_a_websocket_only_route() {
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let services_ws_only = services("\"127.0.0.1:9001\"", "websocket_only = true");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    let Step::Reject(rejection) = h.on_client_data(request, &services_ws_only, 0) else {
        panic!("expected a rejection");
    };
    assert_eq!(rejection.status, 426);
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    assert!(matches!(
        h.on_client_data(request, &services, 0),
        Step::Connect(_)
    ));
    assert!(h.is_plain());
    let Step::Exchange(start) = h.on_connected(true) else {
        panic!("expected the exchange");
    };
    assert!(start.reused);
    let head = String::from_utf8(start.head).unwrap();
    assert!(head.starts_with("GET / HTTP/1.1\r\nHost: a\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection:"), "{head}");
}

#[test]
fn a_head_begun_and_not_finished_in_time_is_408() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    assert_eq!(
        h.on_client_data(b"GET / HTTP/1.1\r\nHo", &services, 0),
        Step::ReadClient
    );
    let Step::Reject(rejection) = h.on_deadline(false) else {
        panic!("expected 408");
    };
    assert_eq!(rejection.status, 408);
}

#[test]
fn no_matching_route_is_404() {
    let services = services("\"127.0.0.1:9001\"", "path_prefix = \"/other\"");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    let Step::Reject(rejection) = h.on_client_data(REQUEST, &services, 0) else {
        panic!("expected a rejection");
    };
    assert_eq!(rejection.status, 404);
}

#[test]
fn a_failed_connect_tries_the_next_server_then_answers_502() {
    let services = services("\"127.0.0.1:1\", \"127.0.0.1:2\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    let Step::Connect(first) = h.on_client_data(REQUEST, &services, 0) else {
        panic!("expected a connect");
    };
    let Step::Connect(second) = h.on_connect_failed(ConnectFailure::Error, &services, 0) else {
        panic!("expected the next server");
    };
    assert_ne!(first, second);
    let Step::Reject(rejection) = h.on_connect_failed(ConnectFailure::Error, &services, 0) else {
        panic!("expected 502");
    };
    assert_eq!(rejection.status, 502);
    // Both servers are now marked down, yet the next request still tries them (panic
    // routing): a mark orders the servers, it never refuses a client by itself.
    let mut next = Handshake::new(addresses(), Scheme::Ws, false);
    assert!(matches!(
        next.on_client_data(REQUEST, &services, 1),
        Step::Connect(_)
    ));
}

#[test]
fn running_out_of_local_sockets_is_503_and_marks_no_server_down() {
    let services = services("\"127.0.0.1:1\", \"127.0.0.1:2\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    h.on_client_data(REQUEST, &services, 0);
    let Step::Reject(rejection) = h.on_connect_failed(ConnectFailure::Local, &services, 0) else {
        panic!("expected 503");
    };
    assert_eq!(rejection.status, 503);
    for server in ["127.0.0.1:1", "127.0.0.1:2"] {
        assert!(!services.pools[0].is_marked_down(server.parse().unwrap(), 1));
    }
}

#[test]
fn a_connect_timeout_on_the_last_server_is_504() {
    let services = services("\"127.0.0.1:1\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    h.on_client_data(REQUEST, &services, 0);
    let Step::Reject(rejection) = h.on_connect_failed(ConnectFailure::TimedOut, &services, 0)
    else {
        panic!("expected 504");
    };
    assert_eq!(rejection.status, 504);
}

#[test]
fn a_refusal_is_relayed_with_the_rest_of_its_body_still_to_come() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = connected(&services);
    let answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nnope";
    assert_eq!(
        h.on_upstream_data(answer, &services),
        Step::Refused {
            status: 403,
            to_client: answer.to_vec(),
            remaining: BodyLength::Known(6),
        }
    );
}

#[test]
fn a_broken_101_is_502_and_an_early_close_is_502() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = connected(&services);
    let bad = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n";
    let Step::Reject(rejection) = h.on_upstream_data(bad, &services) else {
        panic!("expected 502");
    };
    assert_eq!(rejection.status, 502);

    let mut h = connected(&services);
    assert!(matches!(
        h.on_upstream_data(b"HTTP/1.1 1", &services),
        Step::ReadUpstream
    ));
    let Step::Reject(rejection) = h.on_upstream_eof(&services, 0) else {
        panic!("expected 502");
    };
    assert_eq!(rejection.status, 502);
}

#[test]
fn an_upstream_that_closes_before_answering_is_retried_on_the_next_server_then_502() {
    let services = services("\"127.0.0.1:1\", \"127.0.0.1:2\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    let Step::Connect(first) = h.on_client_data(REQUEST, &services, 0) else {
        panic!("expected a connect");
    };
    assert!(matches!(h.on_connected(false), Step::SendRequest(_)));
    let Step::Connect(second) = h.on_upstream_eof(&services, 0) else {
        panic!("expected the next server");
    };
    assert_ne!(first, second);
    let Step::SendRequest(again) = h.on_connected(false) else {
        panic!("expected the request again");
    };
    assert!(again.starts_with(b"GET "));
    let Step::Reject(rejection) = h.on_upstream_eof(&services, 0) else {
        panic!("expected 502 after the last server");
    };
    assert_eq!(rejection.status, 502);
}

#[test]
fn the_deadline_closes_a_silent_client_and_answers_504_while_waiting_for_the_upstream() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut silent = Handshake::new(addresses(), Scheme::Ws, false);
    assert!(matches!(silent.on_deadline(false), Step::Close(_)));
    let mut waiting = connected(&services);
    let Step::Reject(rejection) = waiting.on_deadline(true) else {
        panic!("expected 504");
    };
    assert_eq!(rejection.status, 504);
}

#[test]
fn a_head_trickled_byte_by_byte_is_parsed_once_per_line_not_once_per_byte() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    let mut head = REQUEST[..REQUEST.len() - 2].to_vec();
    // A long header line, sent one byte at a time.
    head.extend_from_slice(b"X-Padding: ");
    head.extend(std::iter::repeat_n(b'p', 8000));
    head.extend_from_slice(b"\r\n\r\n");
    let lines = head.iter().filter(|&&b| b == b'\n').count();
    let mut last = Step::ReadClient;
    for byte in &head {
        last = h.on_client_data(std::slice::from_ref(byte), &services, 0);
    }
    assert!(matches!(last, Step::Connect(_)), "{last:?}");
    assert!(h.parses <= lines, "{} parses for {lines} lines", h.parses);
}

#[test]
fn a_malformed_line_is_refused_as_soon_as_it_ends() {
    let services = services("\"127.0.0.1:9001\"", "");
    let mut h = Handshake::new(addresses(), Scheme::Ws, false);
    assert_eq!(
        h.on_client_data(b"GET /chat HTTP/1.1\r\nHost", &services, 0),
        Step::ReadClient
    );
    let step = h.on_client_data(b" x\r\n", &services, 0);
    assert!(
        matches!(step, Step::Reject(ref rejection) if rejection.status == 400),
        "{step:?}"
    );
}
