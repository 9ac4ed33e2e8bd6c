//! Header rewriting on the way to the upstream: `headers::rewrite_request` (upgrades) and
//! `headers::rewrite_plain_request`, after `handshake::parse_request`, with route rules.
//!
//! Input: a flags byte (trusted peer, TLS listener, IPv6 client), rule lines up to an empty line
//! (`+Name: value` sets, `-Name` removes; kept only when the config loader accepts them), then
//! the client's head.
//!
//! Properties: what the upstream gets parses back (same parser) to the same method, target,
//! version and Host, with Host first; an upgrade is still a valid upgrade with the same key, a
//! plain request has the same body framing (a length the upstream does not see would let the
//! body be read as a second request); the client's end-to-end headers keep their order, no
//! hop-by-hop header and no client-sent forwarding header passes from an untrusted peer, the
//! proxy's `X-Real-IP`/`X-Forwarded-For`/`X-Forwarded-Proto` are there once, and route rules
//! hold (a set header has its one value, a removed one is gone).

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use wsplice::config::Config;
use wsplice::handshake::{parse_request, Header, Request};
use wsplice::headers::{
    rewrite_plain_request, rewrite_request, ForwardContext, HeaderRules, Scheme,
};
use wsplice::http::request_framing;
use wsplice_fuzz::{is_subsequence, values, Input, GENEROUS};

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];
const FORWARDING: [&str; 3] = ["forwarded", "x-forwarded-host", "x-forwarded-port"];
const SET_BY_PROXY: [&str; 3] = ["x-real-ip", "x-forwarded-for", "x-forwarded-proto"];
/// Framing, routing and handshake headers: a rule touching them changes what the request is
/// (the operator's choice), which is not what this target checks.
const NOT_IN_RULES: [&str; 7] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
];

/// Route rules from the rule lines, taken as the config loader takes them: written into a
/// configuration and read back with `Config::parse` (no rules when it refuses them).
fn rules(text: &[u8]) -> HeaderRules {
    let mut set = toml::Table::new();
    let mut remove = Vec::new();
    for line in text.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let (name, value) = match line.strip_prefix('+') {
            Some(rest) => match rest.split_once(':') {
                Some((name, value)) => (name, Some(value.trim())),
                None => continue,
            },
            None => match line.strip_prefix('-') {
                Some(name) => (name, None),
                None => continue,
            },
        };
        if NOT_IN_RULES.contains(&name.to_ascii_lowercase().as_str()) {
            continue;
        }
        match value {
            Some(value) => {
                set.insert(name.to_owned(), toml::Value::String(value.to_owned()));
            }
            None => remove.push(toml::Value::String(name.to_owned())),
        }
    }
    let mut headers = toml::Table::new();
    headers.insert("set".into(), toml::Value::Table(set));
    headers.insert("remove".into(), toml::Value::Array(remove));
    let mut route = toml::Table::new();
    route.insert("upstream".into(), "u".into());
    route.insert("headers".into(), toml::Value::Table(headers));
    let text = format!(
        "[[listener]]\nbind = \"127.0.0.1:1\"\n\n[upstream.u]\nservers = [\"127.0.0.1:2\"]\n\n\
         [[route]]\n{}",
        toml::to_string(&route).unwrap_or_default()
    );
    match Config::parse(&text) {
        Ok(config) => HeaderRules {
            set: config.routes[0].headers.set.clone(),
            remove: config.routes[0].headers.remove.clone(),
        },
        Err(_) => HeaderRules::default(),
    }
}

/// The checks common to both kinds of request: `sent` is the head as received, `got` the head
/// the upstream parsed; `added` the header names the proxy adds after the client's.
fn check_headers(
    sent: &[Header],
    got: &[Header],
    ctx: &ForwardContext,
    rules: &HeaderRules,
    added: &[&str],
) {
    // Host first, as sent (an HTTP/1.0 request may have none).
    assert_eq!(values(got, "host"), values(sent, "host"));
    if !values(sent, "host").is_empty() {
        let first = got.first().map(|h| h.name.to_ascii_lowercase());
        assert_eq!(first.as_deref(), Some("host"));
    }
    let set_by_rules = |name: &str| rules.set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    for (name, value) in &rules.set {
        // The last rule for a name wins.
        let last = rules
            .set
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        if last.is_some_and(|(_, v)| v == value) {
            assert_eq!(values(got, name), [value.as_bytes()], "rule set {name}");
        }
    }
    for name in &rules.remove {
        if !set_by_rules(name) {
            assert!(values(got, name).is_empty(), "rule removed {name}");
        }
    }
    let client = ctx.client_addr.to_string();
    if !set_by_rules("x-real-ip")
        && !rules
            .remove
            .iter()
            .any(|n| n.eq_ignore_ascii_case("x-real-ip"))
    {
        assert_eq!(values(got, "x-real-ip"), [client.as_bytes()]);
    }
    if !set_by_rules("x-forwarded-for")
        && !rules
            .remove
            .iter()
            .any(|n| n.eq_ignore_ascii_case("x-forwarded-for"))
    {
        let xff = values(got, "x-forwarded-for");
        assert_eq!(xff.len(), 1);
        assert!(xff[0].ends_with(client.as_bytes()));
        if !ctx.trusted_peer {
            assert_eq!(
                xff[0],
                client.as_bytes(),
                "a client's own X-Forwarded-For believed"
            );
        }
    }
    // Everything else came from the client, in its order (Host aside: it goes first), and is
    // end to end.
    let from_client: Vec<Header> = got
        .iter()
        .filter(|h| {
            let name = h.name.to_ascii_lowercase();
            name != "host"
                && !SET_BY_PROXY.contains(&name.as_str())
                && !added.contains(&name.as_str())
                && !set_by_rules(&name)
        })
        .cloned()
        .collect();
    let sent_but_host: Vec<Header> = sent
        .iter()
        .filter(|h| !h.name.eq_ignore_ascii_case("host"))
        .cloned()
        .collect();
    assert!(
        is_subsequence(&from_client, &sent_but_host),
        "{from_client:?} not from {sent:?}"
    );
    for h in &from_client {
        let name = h.name.to_ascii_lowercase();
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "{name} passed on");
        if !ctx.trusted_peer {
            assert!(
                !FORWARDING.contains(&name.as_str()),
                "{name} from an untrusted peer"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.byte();
    let client_addr = if flags & 4 != 0 {
        IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            u16::from(flags),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, flags))
    };
    let ctx = ForwardContext {
        client_addr,
        scheme: if flags & 2 != 0 {
            Scheme::Wss
        } else {
            Scheme::Ws
        },
        trusted_peer: flags & 1 != 0,
    };
    let rules = rules(input.until(b"\n\n"));
    let buf = input.rest();
    let Ok(Some((request, _))) = parse_request(buf, &GENEROUS) else {
        return;
    };
    match &request {
        Request::Upgrade(upgrade) => {
            let head = rewrite_request(upgrade, &ctx, &rules);
            let parsed = parse_request(&head, &GENEROUS)
                .unwrap_or_else(|e| panic!("rewritten upgrade refused: {e}"));
            let Some((Request::Upgrade(again), len)) = parsed else {
                panic!("rewritten upgrade is not an upgrade: {parsed:?}");
            };
            assert_eq!(len, head.len());
            assert_eq!(again.path, upgrade.path);
            assert_eq!(again.host, upgrade.host);
            assert_eq!(again.key, upgrade.key);
            check_headers(
                &upgrade.headers,
                &again.headers,
                &ctx,
                &rules,
                &["upgrade", "connection"],
            );
        }
        Request::Plain(plain) => {
            let head = rewrite_plain_request(plain, &ctx, &rules);
            let parsed = parse_request(&head, &GENEROUS)
                .unwrap_or_else(|e| panic!("rewritten request refused: {e}"));
            let Some((Request::Plain(again), len)) = parsed else {
                panic!("rewritten plain request is not one: {parsed:?}");
            };
            assert_eq!(len, head.len());
            assert_eq!(again.method, plain.method);
            assert_eq!(again.path, plain.path);
            assert_eq!(again.host, plain.host);
            assert_eq!(again.http_minor, plain.http_minor);
            assert_eq!(
                again.framing, plain.framing,
                "the upstream frames the body differently"
            );
            assert_eq!(
                request_framing(&again.headers, again.http_minor),
                Ok(plain.framing)
            );
            let added: &[&str] = if plain.http_minor == 0 {
                &["connection", "transfer-encoding"]
            } else {
                &["transfer-encoding"]
            };
            check_headers(&plain.headers, &again.headers, &ctx, &rules, added);
        }
    }
});
