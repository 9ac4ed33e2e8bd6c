//! The config loader: defaults, every key, and errors with their positions.

use super::*;

const MINIMAL: &str = r#"
[[listener]]
bind = "127.0.0.1:8080"

[[route]]
upstream = "default"

[upstream.default]
servers = ["127.0.0.1:9001"]
"#;

fn error(text: &str) -> ConfigError {
    Config::parse(text).expect_err("must fail")
}

#[test]
fn the_sample_config_at_the_repository_root_loads() {
    let config = Config::parse(include_str!("../../../wsplice.toml")).unwrap();
    assert_eq!(config.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        config.upstreams["default"].servers,
        vec![ServerConfig::at("127.0.0.1:9001".parse().unwrap())]
    );
    assert!(config.admin.is_some());
}

#[test]
fn defaults_apply() {
    let config = Config::parse(MINIMAL).unwrap();
    assert_eq!(config.timeouts, Timeouts::default());
    assert_eq!(config.limits, Limits::default());
    assert_eq!(
        config.upstreams["default"].fail_timeout,
        Duration::from_secs(10)
    );
    assert_eq!(config.workers, None);
    assert_eq!(config.admin, None);
}

#[test]
fn header_rules_cannot_touch_framing_hop_by_hop_or_handshake_headers() {
    for rule in [
        "set = { \"Content-Length\" = \"0\" }",
        "set = { \"transfer-encoding\" = \"chunked\" }",
        "set = { \"Connection\" = \"close\" }",
        "remove = [\"Upgrade\"]",
        "remove = [\"Sec-WebSocket-Key\"]",
    ] {
        let text =
            format!("{MINIMAL}\n[[route]]\nupstream = \"default\"\nheaders = {{ {rule} }}\n");
        let error = Config::parse(&text).unwrap_err();
        assert!(
            error.to_string().contains("written by the proxy itself"),
            "{rule}: {error}"
        );
    }
    let allowed = format!(
        "{MINIMAL}\n[[route]]\nupstream = \"default\"\n\
         headers = {{ set = {{ \"Host\" = \"app.internal\" }}, remove = [\"Cookie\"] }}\n"
    );
    assert!(Config::parse(&allowed).is_ok());
}

#[test]
fn close_spread_defaults_to_half_the_drain_and_cannot_exceed_it() {
    let with = |timeouts: &str| Config::parse(&format!("{MINIMAL}\n[timeouts]\n{timeouts}\n"));
    let timeouts = with("drain = \"20s\"").unwrap().timeouts;
    assert_eq!(timeouts.close_spread, Duration::from_secs(10));
    let timeouts = with("drain = \"20s\"\nclose_spread = \"0s\"")
        .unwrap()
        .timeouts;
    assert_eq!(timeouts.close_spread, Duration::ZERO);
    let error = with("drain = \"20s\"\nclose_spread = \"30s\"").unwrap_err();
    assert!(error.to_string().contains("at most `drain`"), "{error}");
}

#[test]
fn everything_optional_parses() {
    let text = format!(
        "workers = 3\ntrusted_proxies = [\"10.0.0.0/8\", \"2001:db8::1\"]\n{MINIMAL}\n[[route]]\nhost = \"chat.example\"\npath_prefix = \"/chat\"\n\
         upstream = \"default\"\nidle_timeout = \"5m\"\n\
         headers = {{ set = {{ \"X-A\" = \"1\" }}, remove = [\"Cookie\"] }}\n\
         [timeouts]\nidle = \"90s\"\nhandshake = \"250ms\"\nconnect = \"1s\"\ndrain = \"0s\"\n\
         [limits]\nmax_request_head = \"8KiB\"\nmax_headers = 50\nrelay_buffer = 16384\n\
         kernel_backlog_total = \"2GiB\"\n\
         [kernel]\npromote_after = \"250ms\"\npromote_after_bytes = \"64KiB\"\n\
         [admin]\nbind = \"127.0.0.1:9901\"\n"
    );
    let config = Config::parse(&text).unwrap();
    assert_eq!(config.workers, Some(3));
    let route = &config.routes[1];
    assert_eq!(route.host.as_deref(), Some("chat.example"));
    assert_eq!(route.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(route.headers.set, vec![("X-A".to_owned(), "1".to_owned())]);
    assert_eq!(route.headers.remove, vec!["Cookie".to_owned()]);
    assert_eq!(config.timeouts.handshake, Duration::from_millis(250));
    assert_eq!(config.timeouts.drain, Duration::ZERO);
    assert_eq!(config.limits.max_request_head, 8192);
    assert_eq!(config.limits.relay_buffer, 16384);
    assert_eq!(config.limits.kernel_backlog_total, 2 << 30);
    let trusted: Vec<String> = config
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(trusted, ["10.0.0.0/8", "2001:db8::1/128"]);
    assert_eq!(
        config.splicing,
        Splicing::Promote {
            after: Duration::from_millis(250),
            after_bytes: 64 << 10
        }
    );
}

#[test]
fn an_unknown_upstream_is_reported_at_its_line_and_column() {
    let text = MINIMAL.replace("upstream = \"default\"", "upstream = \"chat\"");
    let e = error(&text);
    assert_eq!((e.line, e.column), (6, 12), "{e}");
    assert_eq!(
        e.to_string(),
        "6:12: route upstream \"chat\" is not defined in [upstream]"
    );
}

#[test]
fn syntax_and_type_errors_have_positions() {
    let e = error("[[listener]]\nbind = 8080\n");
    assert_eq!(e.line, 2, "{e}");
    let e = error("[[listener]]\nbind = \"127.0.0.1:1\"\nbogus = 1\n");
    assert_eq!(e.line, 3, "{e}");
    assert!(e.message.contains("bogus"), "{e}");
    let e = error("[[listener]\n");
    assert_eq!(e.line, 1, "{e}");
}

#[test]
fn servers_are_addresses_names_or_tables_with_weights_and_limits() {
    let config = Config::parse(&MINIMAL.replace(
        "\"127.0.0.1:9001\"",
        "\"127.0.0.1:9001\", \"App.Internal.:8080\", { addr = \"127.0.0.1:9002\", weight = 3, max_tunnels = 50 }",
    ))
    .unwrap();
    let pool = &config.upstreams["default"];
    assert_eq!(pool.servers.len(), 2);
    assert_eq!(pool.servers[1].weight, 3);
    assert_eq!(pool.servers[1].max_tunnels, Some(50));
    assert_eq!(pool.named.len(), 1);
    assert_eq!(
        (pool.named[0].host.as_str(), pool.named[0].port),
        ("app.internal", 8080)
    );
    assert_eq!(pool.balance, Balance::LeastConnections, "the default");
    for (entry, wanted) in [
        (
            "{ addr = \"127.0.0.1:1\", weight = 0 }",
            "weight must be between 1 and 256",
        ),
        (
            "{ addr = \"127.0.0.1:1\", max_tunnels = 0 }",
            "max_tunnels must be at least 1",
        ),
        (
            "{ addr = \"127.0.0.1:1\", wieght = 2 }",
            "unknown key \"wieght\"",
        ),
        ("{ weight = 2 }", "needs addr"),
        ("\"127.0.0.1:9001\"", "listed twice"),
        ("\"1.2.3:80\"", "neither IP:port nor name:port"),
        ("\"app.internal\"", "neither IP:port nor name:port"),
        ("\"513.0.0x1:1\"", "neither IP:port nor name:port"),
        ("\"10.0.0.300:80\"", "neither IP:port nor name:port"),
        ("7", "a server is"),
    ] {
        let text = MINIMAL.replace(
            "\"127.0.0.1:9001\"",
            &format!("\"127.0.0.1:9001\", {entry}"),
        );
        let e = error(&text);
        assert!(e.message.contains(wanted), "{entry}: {e}");
        assert_eq!(e.line, 9, "{e}");
    }
}

#[test]
fn balancing_health_checks_and_rebalancing_are_checked() {
    let with = |extra: &str| {
        MINIMAL.replace(
            "[upstream.default]\n",
            &format!("[upstream.default]\n{extra}\n"),
        )
    };
    let config = Config::parse(&with(
        "balance = \"consistent_hash\"\nhash_key = \"header:X-User\"\nhash_load_factor = 1.5",
    ))
    .unwrap();
    assert_eq!(
        config.upstreams["default"].balance,
        Balance::ConsistentHash {
            key: HashKey::Header("X-User".into()),
            load_factor: 150
        }
    );
    for (extra, wanted) in [
        ("balance = \"fastest\"", "is not known"),
        (
            "hash_key = \"path\"",
            "hash_key is for balance = \"consistent_hash\"",
        ),
        (
            "balance = \"consistent_hash\"\nhash_key = \"header:\"",
            "is not known",
        ),
        (
            "balance = \"consistent_hash\"\nhash_load_factor = 0.5",
            "between 1.0",
        ),
        (
            "balance = \"consistent_hash\"\nrebalance = { rate = 5 }",
            "does not go with consistent_hash",
        ),
        ("rebalance = { rate = 0 }", "rate must be between"),
        (
            "health_check = { kind = \"icmp\" }",
            "kind \"icmp\" is not known",
        ),
        (
            "health_check = { interval = \"1s\", timeout = \"2s\" }",
            "at most the interval",
        ),
        (
            "health_check = { kind = \"http\", path = \"healthz\" }",
            "must start with '/'",
        ),
        ("health_check = { rise = 0 }", "between 1 and 100"),
    ] {
        let e = error(&with(extra));
        assert!(e.message.contains(wanted), "{extra}: {e}");
    }
    let config = Config::parse(&with("rebalance = { rate = 20, tolerance = 0.25 }\nhealth_check = { kind = \"websocket\", path = \"/ws\" }")).unwrap();
    let pool = &config.upstreams["default"];
    assert_eq!(
        pool.rebalance,
        Some(crate::config::Rebalance {
            per_second: 20,
            tolerance: 25
        })
    );
    assert_eq!(
        pool.health_check
            .as_ref()
            .map(|c| (c.kind.clone(), c.rise, c.fall)),
        Some((
            crate::upstream::health::ProbeKind::WebSocket {
                path: "/ws".into(),
                host: "localhost".into()
            },
            2,
            3
        ))
    );
}

#[test]
fn proxy_protocol_needs_trusted_proxies() {
    let listener = MINIMAL.replace(
        "bind = \"127.0.0.1:8080\"",
        "bind = \"127.0.0.1:8080\"\nproxy_protocol = true",
    );
    let e = error(&listener);
    assert!(
        e.message.contains("proxy_protocol needs trusted_proxies"),
        "{e}"
    );
    let config = Config::parse(&format!("trusted_proxies = [\"10.0.0.0/8\"]\n{listener}")).unwrap();
    assert!(config.listeners[0].proxy_protocol);
}

#[test]
fn bad_values_are_reported_where_they_stand() {
    let e = error(&MINIMAL.replace("127.0.0.1:9001", "localhost"));
    assert_eq!(e.line, 9, "{e}");
    assert!(e.message.contains("neither IP:port nor name:port"), "{e}");
    let e = error(&format!("{MINIMAL}[timeouts]\nidle = \"ten seconds\"\n"));
    assert_eq!(e.line, 11, "{e}");
    let e = error(&format!("{MINIMAL}[timeouts]\nidle = \"0s\"\n"));
    assert!(e.message.contains("longer than zero"), "{e}");
    let e = error(&MINIMAL.replace("servers = [\"127.0.0.1:9001\"]", "servers = []"));
    assert!(e.message.contains("no servers"), "{e}");
    let e = error(&format!("{MINIMAL}[limits]\nmax_request_head = \"3GB\"\n"));
    assert!(e.message.contains("not a size"), "{e}");
}

#[test]
fn duplicate_listeners_are_refused_clearly() {
    let text = MINIMAL.replace(
        "[[route]]",
        "[[listener]]\nbind = \"127.0.0.1:8080\"\n\n[[route]]",
    );
    assert!(error(&text).message.contains("defined twice"));
}

fn with_tls(tls: &str) -> String {
    MINIMAL.replace(
        "bind = \"127.0.0.1:8080\"",
        &format!("bind = \"127.0.0.1:8080\"\n{tls}"),
    )
}

#[test]
fn tls_listener_defaults_and_relative_paths() {
    let text = with_tls("tls = { cert = \"c.pem\", key = \"k.pem\" }");
    let config = Config::parse_in(&text, Some(Path::new("/etc/wsplice/wsplice.toml"))).unwrap();
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.default.cert, Path::new("/etc/wsplice/c.pem"));
    assert_eq!(tls.default.key, Path::new("/etc/wsplice/k.pem"));
    assert_eq!(tls.min_version, TlsVersion::V1_2);
    assert!(tls.ciphers.is_empty() && tls.sni.is_empty() && !tls.strict_sni);
    assert!(tls.session_tickets && tls.session_cache > 0);
    assert_eq!(tls.provider, CryptoProvider::AwsLcRs);
}

#[test]
fn tls_table_with_sni_versions_and_suites() {
    let text = with_tls(
        "[listener.tls]\ncert = \"d.pem\"\nkey = \"d.key\"\nmin_version = \"1.3\"\n\
         ciphers = [\"tls13_aes_128_gcm_sha256\"]\nsession_cache = 0\nprovider = \"ring\"\n\
         strict_sni = true\n[[listener.tls.sni]]\nnames = [\"Chat.Example.com.\", \"*.example.org\"]\n\
         cert = \"c.pem\"\nkey = \"c.key\"\n",
    );
    let config = Config::parse(&text).unwrap();
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.min_version, TlsVersion::V1_3);
    assert_eq!(tls.ciphers, ["TLS13_AES_128_GCM_SHA256"]);
    assert_eq!(tls.sni[0].names, ["chat.example.com", "*.example.org"]);
    assert_eq!(tls.provider, CryptoProvider::Ring);
    assert!(tls.strict_sni && tls.session_cache == 0);
}

#[test]
fn bad_tls_settings_are_refused_with_their_position() {
    let e = error(&with_tls(
        "tls = { cert = \"c\", key = \"k\", min_version = \"1.1\" }",
    ));
    assert_eq!(e.line, 4, "{e}");
    assert!(e.message.contains("min_version \"1.1\""), "{e}");
    let e = error(&with_tls(
        "tls = { cert = \"c\", key = \"k\", ciphers = [\"RC4_MD5\"] }",
    ));
    assert!(
        e.message.contains("RC4_MD5") && e.message.contains("known:"),
        "{e}"
    );
    let e = error(&with_tls(
        "tls = { cert = \"c\", key = \"k\", min_version = \"1.3\", \
         ciphers = [\"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"] }",
    ));
    assert!(e.message.contains("no suite for TLS 1.3"), "{e}");
    let e = error(&with_tls(
        "tls = { cert = \"c\", key = \"k\", sni = [{ names = [\"a.b\"], cert = \"x\", key = \"y\" }, \
         { names = [\"A.b\"], cert = \"x\", key = \"y\" }] }",
    ));
    assert!(e.message.contains("listed twice"), "{e}");
    let e = error(&with_tls(
        "tls = { cert = \"c\", key = \"k\", sni = [{ names = [\"a b\"], cert = \"x\", key = \"y\" }] }",
    ));
    assert!(e.message.contains("not a DNS name"), "{e}");
    let e = error(&with_tls("tls = { cert = \"c\" }"));
    assert!(e.message.contains("key"), "{e}");
    let e = error(&with_tls(
        "tls = { cert = \"c\", key = \"k\", provider = \"openssl\" }",
    ));
    assert!(e.message.contains("openssl"), "{e}");
}

#[test]
fn header_rules_with_cr_lf_are_refused() {
    let text = MINIMAL.replace(
        "upstream = \"default\"",
        "upstream = \"default\"\nheaders = { set = { \"X-A\" = \"a\\r\\nInjected: 1\" } }",
    );
    assert!(error(&text).message.contains("CR or LF"));
}

/// Found by the header_rewrite fuzz target (rules taken as the loader takes them): a NUL or
/// another control character in a set value passed, and the upstream got a head it refuses.
#[test]
fn header_rules_with_control_characters_are_refused() {
    for value in ["a\\u0000b", "a\\u0001", "\\u007f", "a\\u0085"] {
        let text = MINIMAL.replace(
            "upstream = \"default\"",
            &format!("upstream = \"default\"\nheaders = {{ set = {{ \"X-A\" = \"{value}\" }} }}"),
        );
        let e = error(&text);
        assert!(e.message.contains("control characters"), "{value}: {e}");
    }
    let text = MINIMAL.replace(
        "upstream = \"default\"",
        "upstream = \"default\"\nheaders = { set = { \"X-A\" = \"a\\tb caf\u{e9}\" } }",
    );
    let config = Config::parse(&text).expect("tab and non-ASCII text are allowed");
    assert_eq!(
        config.routes[0].headers.set,
        [("X-A".to_owned(), "a\tb caf\u{e9}".to_owned())]
    );
}

#[test]
fn load_names_the_file() {
    let e = Config::load(Path::new("/nonexistent/wsplice.toml")).unwrap_err();
    assert!(
        e.to_string().starts_with("/nonexistent/wsplice.toml:"),
        "{e}"
    );
}

#[test]
fn workers_run_where_the_scheduler_puts_them_unless_pinned() {
    assert!(!Config::parse(MINIMAL).unwrap().pin_workers);
    let pinned = Config::parse(&format!("pin_workers = true\n{MINIMAL}")).unwrap();
    assert!(pinned.pin_workers);
    let e = error(&format!("pin_workers = 2\n{MINIMAL}"));
    assert_eq!(e.line, 1, "{e}");
}

#[test]
fn workers_beyond_what_a_socket_tag_can_name_are_refused() {
    assert_eq!(
        Config::parse(&format!("workers = 256\n{MINIMAL}"))
            .unwrap()
            .workers,
        Some(256)
    );
    let e = error(&format!("workers = 257\n{MINIMAL}"));
    assert_eq!(e.line, 1, "{e}");
    assert!(e.message.contains("between 1 and 256"), "{e}");
}

#[test]
fn a_bad_trusted_proxy_range_is_reported_at_its_position() {
    let text = format!("trusted_proxies = [\"10.0.0.0/8\", \"10.1/40\"]\n{MINIMAL}");
    let e = error(&text);
    assert_eq!((e.line, e.column), (1, 34), "{e}");
    assert!(e.message.contains("trusted_proxies"), "{e}");
}

#[test]
fn user_and_group_are_names_or_ids() {
    assert_eq!(Config::parse(MINIMAL).unwrap().run_as, None);
    let config = Config::parse(&format!("user = \"wsplice\"\ngroup = 65534\n{MINIMAL}")).unwrap();
    assert_eq!(
        config.run_as,
        Some(RunAs {
            user: Account::Name("wsplice".into()),
            group: Some(Account::Id(65534)),
        })
    );
    let config = Config::parse(&format!("user = 1000\n{MINIMAL}")).unwrap();
    assert_eq!(
        config.run_as,
        Some(RunAs {
            user: Account::Id(1000),
            group: None,
        })
    );
    let e = error(&format!("group = \"nogroup\"\n{MINIMAL}"));
    assert_eq!((e.line, e.column), (1, 9), "{e}");
    assert!(e.message.contains("group without user"), "{e}");
    let e = error(&format!("user = \"no body\"\n{MINIMAL}"));
    assert_eq!((e.line, e.column), (1, 8), "{e}");
    assert!(e.message.contains("not a user or group name"), "{e}");
    let e = error(&format!("user = \"wsplice\"\ngroup = -1\n{MINIMAL}"));
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("not a valid id"), "{e}");
}

#[test]
fn the_packet_table_has_defaults_and_checks_its_values() {
    let config = Config::parse(MINIMAL).unwrap();
    assert_eq!(config.packet, PacketConfig::default());
    assert_eq!(config.packet.ports.to_string(), "40000-59999");
    assert_eq!(config.packet.linger, Duration::from_secs(30));
    let text = format!(
        "{MINIMAL}\n[packet]\ninterfaces = [\"eth0\", \"lo\"]\nports = \"41000-41999\"\nlinger = \"5s\"\n"
    );
    let config = Config::parse(&text).unwrap();
    assert_eq!(config.packet.interfaces, vec!["eth0", "lo"]);
    assert_eq!(config.packet.ports.to_string(), "41000-41999");
    assert_eq!(config.packet.linger, Duration::from_secs(5));
    for bad in [
        "ports = \"59999-40000\"",
        "ports = \"0-10\"",
        "ports = \"many\"",
        "interfaces = [\"a/b\"]",
        "interfaces = [\"\"]",
        "interfaces = [\"a-name-far-too-long\"]",
        "linger = \"soon\"",
        "unknown = 1",
    ] {
        // Refused, pointing at the line of the bad value.
        let error = error(&format!("{MINIMAL}\n[packet]\n{bad}\n"));
        assert!(error.to_string().starts_with("12:"), "{bad}: {error}");
    }
}
