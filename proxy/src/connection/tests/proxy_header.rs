//! A `proxy_protocol` listener's first phase: the PROXY header is peeked at until complete,
//! consumed, and its source becomes the client's address; anything else is refused, counted
//! and logged.

use super::*;
use crate::access::AccessRecord;

/// A connection from `peer` accepted on a `proxy_protocol` listener of a proxy trusting
/// 10.0.0.0/8, with `max_connections_per_ip` 1.
fn behind_balancer(peer: &str) -> Harness {
    let text = "trusted_proxies = [\"10.0.0.0/8\"]\n[[listener]]\nbind = \"127.0.0.1:8080\"\n\
                proxy_protocol = true\n\n[[route]]\nupstream = \"default\"\n\n\
                [upstream.default]\nservers = [\"127.0.0.1:9001\"]\n\n\
                [limits]\nmax_connections_per_ip = 1\n";
    let services = Services::new(&Config::parse(text).expect("config"), None);
    let mut out = Actions::new();
    let accepted = Accepted {
        peer: peer.parse().unwrap(),
        local: "127.0.0.1:8080".parse().unwrap(),
        scheme: Scheme::Ws,
        tls: false,
        proxy_protocol: true,
    };
    services.admission.admit_connection().unwrap();
    let conn = Connection::accept(7, accepted, DataPath::Relay, SECOND, &services, &mut out);
    Harness {
        conn,
        services,
        now: SECOND,
        out,
    }
}

fn peeked(h: &mut Harness, bytes: &[u8]) -> Vec<Action> {
    h.event(|c, _, s, out| c.on_proxy_header_peeked(bytes, s, out))
}

fn finish(h: Harness) -> AccessRecord {
    let Harness {
        conn,
        services,
        now,
        ..
    } = h;
    conn.finish(now, &services)
}

const V1: &[u8] = b"PROXY TCP4 203.0.113.9 10.1.1.1 4444 80\r\n";

#[test]
fn the_header_is_peeked_until_complete_then_consumed_and_its_source_is_the_client() {
    let mut h = behind_balancer("10.0.0.2:5000");
    assert_eq!(
        h.take(),
        vec![
            Action::ArmDeadline(SECOND + HANDSHAKE),
            Action::PeekClient { seen: 0 }
        ]
    );
    assert_eq!(
        h.conn.counted_address(),
        None,
        "the balancer's address is not counted"
    );
    assert_eq!(
        peeked(&mut h, &V1[..10]),
        vec![Action::PeekClient { seen: 10 }]
    );
    let mut with_request = V1.to_vec();
    with_request.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_eq!(
        peeked(&mut h, &with_request),
        vec![
            Action::ConsumeClient { len: V1.len() },
            Action::Read(Side::Client)
        ]
    );
    assert_eq!(h.conn.client_addr(), "203.0.113.9:4444".parse().unwrap());
    assert_eq!(
        h.conn.counted_address(),
        Some("203.0.113.9".parse().unwrap())
    );
    // The request that follows is forwarded with the header's address.
    assert_eq!(
        h.client_sends(REQUEST),
        vec![Action::Connect(first_server())]
    );
    let sent = h.connected();
    let Some(Action::Send(Side::Upstream, head)) = sent.first() else {
        panic!("{sent:?}");
    };
    let head = String::from_utf8_lossy(head);
    assert!(head.contains("X-Real-IP: 203.0.113.9\r\n"), "{head}");
}

#[test]
fn a_peer_outside_trusted_proxies_is_refused_without_reading() {
    let mut h = behind_balancer("192.0.2.1:5000");
    let actions = h.take();
    assert!(closes(&actions, false), "{actions:?}");
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::PeekClient { .. })));
    assert!(
        h.reason().contains("not in trusted_proxies"),
        "{}",
        h.reason()
    );
    assert_eq!(h.services.metrics.proxy_headers_refused.get(), 1);
    let record = finish(h);
    assert!(!record.before_request, "a refusal is logged at info level");
}

#[test]
fn a_malformed_header_is_refused_at_once() {
    let mut h = behind_balancer("10.0.0.2:5000");
    h.take();
    assert!(closes(&peeked(&mut h, b"GET / HTTP/1.1\r\n"), false));
    assert!(h.reason().starts_with("bad PROXY header"), "{}", h.reason());
    assert_eq!(h.services.metrics.proxy_headers_refused.get(), 1);
}

#[test]
fn a_client_that_ends_in_the_middle_of_its_header_is_refused_not_spun_on() {
    let mut h = behind_balancer("10.0.0.2:5000");
    h.take();
    assert_eq!(
        peeked(&mut h, &V1[..10]),
        vec![Action::PeekClient { seen: 10 }]
    );
    // Woken with the same bytes: only the end of the stream does that.
    assert!(closes(&peeked(&mut h, &V1[..10]), false));
    assert!(
        h.reason().contains("in the middle of its PROXY header"),
        "{}",
        h.reason()
    );
    assert_eq!(h.services.metrics.proxy_headers_refused.get(), 1);
}

#[test]
fn a_balancers_tcp_check_is_not_a_refusal() {
    let mut h = behind_balancer("10.0.0.2:5000");
    h.take();
    assert!(closes(&h.read_end(Side::Client), false));
    assert_eq!(h.services.metrics.proxy_headers_refused.get(), 0);
    let record = finish(h);
    assert!(record.before_request, "logged at debug level only");
}

#[test]
fn no_header_in_time_is_refused_at_the_handshake_deadline() {
    let mut h = behind_balancer("10.0.0.2:5000");
    h.take();
    assert!(closes(&h.deadline(SECOND + HANDSHAKE), false));
    assert!(
        h.reason().contains("within the handshake timeout"),
        "{}",
        h.reason()
    );
    assert_eq!(h.services.metrics.proxy_headers_refused.get(), 1);
}

#[test]
fn an_ipv4_client_in_a_tcp6_header_is_the_same_client() {
    let mut h = behind_balancer("10.0.0.2:5000");
    h.take();
    let header = b"PROXY TCP6 ::ffff:203.0.113.9 ::ffff:10.1.1.1 4444 80\r\n";
    peeked(&mut h, header);
    assert_eq!(h.conn.client_addr(), "203.0.113.9:4444".parse().unwrap());
}

#[test]
fn the_header_address_counts_against_max_connections_per_ip() {
    let mut first = behind_balancer("10.0.0.2:5000");
    first.take();
    peeked(&mut first, V1);
    // A second connection from the same client through the same services.
    let services = std::mem::replace(
        &mut first.services,
        Services::new(&Config::parse("[[listener]]\nbind = \"127.0.0.1:1\"\n[[route]]\nupstream = \"u\"\n[upstream.u]\nservers = [\"127.0.0.1:2\"]\n").unwrap(), None),
    );
    let mut out = Actions::new();
    services.admission.admit_connection().unwrap();
    let accepted = Accepted {
        peer: "10.0.0.3:6000".parse().unwrap(),
        local: "127.0.0.1:8080".parse().unwrap(),
        scheme: Scheme::Ws,
        tls: false,
        proxy_protocol: true,
    };
    let mut second = Harness {
        conn: Connection::accept(8, accepted, DataPath::Relay, SECOND, &services, &mut out),
        services,
        now: SECOND,
        out,
    };
    second.take();
    assert!(closes(&peeked(&mut second, V1), false));
    assert!(
        second.reason().contains("max_connections_per_ip"),
        "{}",
        second.reason()
    );
    assert_eq!(
        second.conn.counted_address(),
        None,
        "its address holds no count"
    );
}
