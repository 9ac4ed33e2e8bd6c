//! The request target and routing: `target::normalize`, `target::is_valid_host` /
//! `host_name` and `route::Router::select`.
//!
//! Input: route lines (`host path_prefix`, `*` for any) up to an empty line, the Host value up
//! to the next line end, then the request target.
//!
//! Properties: a normal form is an origin-form path (`/…`) with no `.`/`..` segment, no empty
//! segment (`//`), no backslash, no encoded slash and no fragment, and normalising it again
//! changes nothing;
//! the query is passed on as sent. The route chosen for the normal form is the first one whose
//! host and prefix match, and a route for a prefix never takes a path outside it (the segment
//! after the prefix starts with `/` or `?`, or the path is the prefix).

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsplice::config::{HeaderRulesConfig, RouteConfig};
use wsplice::route::Router;
use wsplice::target::{host_name, is_valid_host, normalize};
use wsplice_fuzz::Input;

fn routes(text: &str) -> Vec<RouteConfig> {
    text.lines()
        .take(16)
        .filter_map(|line| {
            let (host, prefix) = line.split_once(' ').unwrap_or((line, "*"));
            let prefix = (prefix != "*").then(|| prefix.to_owned());
            // The config loader refuses other prefixes.
            if prefix.as_deref().is_some_and(|p| !p.starts_with('/')) {
                return None;
            }
            Some(RouteConfig {
                host: (host != "*").then(|| host.to_owned()),
                path_prefix: prefix,
                upstream: "u".into(),
                headers: HeaderRulesConfig::default(),
                idle_timeout: None,
                websocket_only: false,
            })
        })
        .collect()
}

fn matches(route: &RouteConfig, host: &str, path: &str) -> bool {
    let host_ok = route
        .host
        .as_deref()
        .is_none_or(|h| host_name(h).eq_ignore_ascii_case(host_name(host)));
    let prefix_ok = route.path_prefix.as_deref().is_none_or(|prefix| {
        path.strip_prefix(prefix).is_some_and(|rest| {
            prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?'])
        })
    });
    host_ok && prefix_ok
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let Ok(routes_text) = std::str::from_utf8(input.until(b"\n\n")) else {
        return;
    };
    let Ok(host) = std::str::from_utf8(input.until(b"\n")) else {
        return;
    };
    let Ok(raw) = std::str::from_utf8(input.rest()) else {
        return;
    };
    // What the parser lets through as a target: no whitespace or control characters.
    if raw.is_empty() || raw.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return;
    }
    if is_valid_host(host) {
        let name = host_name(host);
        assert!(host.starts_with(name));
        assert!(!name.is_empty());
    }
    let Ok(normal) = normalize(raw, host) else {
        return;
    };
    let (path, query) = normal.split_at(normal.find('?').unwrap_or(normal.len()));
    assert!(path.starts_with('/'), "{raw:?} -> {normal:?}");
    assert!(!path.contains("//"), "{raw:?} -> {normal:?}");
    assert!(!path.contains('\\'), "{raw:?} -> {normal:?}");
    for segment in path.split('/') {
        assert!(segment != "." && segment != "..", "{raw:?} -> {normal:?}");
    }
    let lower = path.to_ascii_lowercase();
    assert!(
        !lower.contains("%2f") && !lower.contains("%5c"),
        "{raw:?} -> {normal:?}"
    );
    assert!(!lower.contains("%2e"), "encoded dot left in {normal:?}");
    assert!(
        raw.ends_with(query),
        "the query changed: {raw:?} -> {normal:?}"
    );
    assert!(
        !normal.contains('#'),
        "a fragment passed: {raw:?} -> {normal:?}"
    );
    assert_eq!(
        normalize(&normal, host).as_deref(),
        Ok(normal.as_str()),
        "{raw:?}"
    );

    let routes = routes(routes_text);
    let router = Router::new(&routes);
    let chosen = router.select(host, &normal);
    let expected = routes.iter().position(|r| matches(r, host, &normal));
    assert_eq!(chosen, expected, "host {host:?}, path {normal:?}");
    // The same request sent in absolute form reaches the same route.
    if is_valid_host(host) {
        let absolute = format!("http://{host}{normal}");
        assert_eq!(normalize(&absolute, host).as_deref(), Ok(normal.as_str()));
    }
});
