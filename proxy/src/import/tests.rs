//! The classic nginx configurations for WebSockets, imported and compared with the wsplice
//! configuration they should give (parsed back with [`Config::parse`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::config::{
    Balance, Config, CryptoProvider, HeaderRulesConfig, Limits, ListenerConfig, RouteConfig,
    ServerConfig, Splicing, Timeouts, TlsConfig, TlsFiles, TlsVersion, UpstreamConfig,
};

const FILE: &str = "/etc/nginx/nginx.conf";

/// Maps `text` as if it were /etc/nginx/nginx.conf; the TOML must parse.
fn import_text(text: &str) -> (Config, Vec<Warning>, String) {
    let tree = syntax::parse(text, Path::new(FILE)).expect("nginx syntax");
    let mapped = mapping::map(&tree, Path::new(FILE), Path::new("/etc/nginx"));
    let toml = mapped.toml.expect("a configuration");
    let config = Config::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    (config, mapped.warnings, toml)
}

/// Each warning as `line: directive (partly)`.
fn lines(warnings: &[Warning]) -> Vec<String> {
    warnings
        .iter()
        .map(|w| {
            let partly = if w.partly { " (partly)" } else { "" };
            format!("{}: {}{partly}", w.line, w.directive)
        })
        .collect()
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

fn plain(bind: &str) -> ListenerConfig {
    ListenerConfig {
        bind: addr(bind),
        tls: None,
        proxy_protocol: false,
    }
}

fn route(host: Option<&str>, prefix: Option<&str>, upstream: &str) -> RouteConfig {
    RouteConfig {
        host: host.map(str::to_owned),
        path_prefix: prefix.map(str::to_owned),
        upstream: upstream.to_owned(),
        headers: HeaderRulesConfig::default(),
        idle_timeout: None,
        websocket_only: false,
    }
}

fn pool(servers: &[&str]) -> UpstreamConfig {
    UpstreamConfig {
        servers: servers.iter().map(|s| ServerConfig::at(addr(s))).collect(),
        named: Vec::new(),
        balance: Balance::LeastConnections,
        slow_start: Duration::ZERO,
        send_proxy_protocol: false,
        health_check: None,
        rebalance: None,
        fail_timeout: Duration::from_secs(10),
        keepalive: 32,
        keepalive_timeout: Duration::from_secs(60),
    }
}

fn config_of(
    listeners: Vec<ListenerConfig>,
    routes: Vec<RouteConfig>,
    upstreams: Vec<(&str, UpstreamConfig)>,
) -> Config {
    Config {
        listeners,
        routes,
        upstreams: upstreams
            .into_iter()
            .map(|(name, pool)| (name.to_owned(), pool))
            .collect::<BTreeMap<_, _>>(),
        timeouts: Timeouts::default(),
        // nginx refuses bodies over 1 MiB unless a configuration says otherwise.
        limits: Limits {
            max_body: Some(1 << 20),
            ..Limits::default()
        },
        splicing: Splicing::default(),
        packet: Default::default(),
        admin: None,
        workers: None,
        pin_workers: false,
        trusted_proxies: Vec::new(),
        resolvers: Vec::new(),
        run_as: None,
    }
}

/// nginx's "WebSocket proxying" guide: the `map` for `Connection` and `location /chat/`.
#[test]
fn nginx_websocket_proxying_guide() {
    let (config, warnings, _) = import_text(
        r#"
http {
    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      close;
    }

    upstream backend {
        server 127.0.0.1:8080;
    }

    server {
        listen 80;

        location /chat/ {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }
    }
}
"#,
    );
    assert_eq!(lines(&warnings), Vec::<String>::new());
    let expected = config_of(
        vec![plain("0.0.0.0:80")],
        vec![route(None, Some("/chat/"), "backend")],
        vec![("backend", pool(&["127.0.0.1:8080"]))],
    );
    assert_eq!(config, expected);
}

/// The tutorial everyone copies: `upstream websocket`, `listen 8020`, `location /`.
#[test]
fn the_common_tutorial() {
    let (config, warnings, _) = import_text(
        r#"
upstream websocket {
    server 127.0.0.1:8010;
}

server {
    listen 8020;
    location / {
        proxy_pass http://websocket;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "Upgrade";
        proxy_set_header Host $host;
    }
}
"#,
    );
    assert_eq!(lines(&warnings), Vec::<String>::new());
    let expected = config_of(
        vec![plain("0.0.0.0:8020")],
        vec![route(None, None, "websocket")],
        vec![("websocket", pool(&["127.0.0.1:8010"]))],
    );
    assert_eq!(config, expected);
}

/// wss: redirect on 80, TLS on 443 (IPv4 and IPv6) with Mozilla's intermediate suites, the
/// forwarding headers, a day-long read timeout, a constant header.
#[test]
fn wss_with_tls_settings() {
    let (config, warnings, toml) = import_text(
        r#"
upstream chat {
    server 10.0.0.5:8080;
    server 10.0.0.6:8080 fail_timeout=30s;
    keepalive 16;
}
server {
    listen 80;
    server_name chat.example.com;
    return 301 https://$host$request_uri;
}
server {
    listen 443 ssl;
    listen [::]:443 ssl;
    server_name chat.example.com;
    ssl_certificate /etc/letsencrypt/live/chat.example.com/fullchain.pem;
    ssl_certificate_key /etc/letsencrypt/live/chat.example.com/privkey.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256;
    ssl_prefer_server_ciphers off;
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 1d;
    ssl_session_tickets off;

    location /ws/ {
        proxy_pass http://chat;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection "upgrade";
        proxy_set_header Host $host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-NginX-Proxy true;
        proxy_read_timeout 86400;
        proxy_connect_timeout 3s;
    }
}
"#,
    );
    assert_eq!(
        lines(&warnings),
        [
            "8: listen 80",
            "10: return 301 https://$host$request_uri",
            "19: ssl_ciphers ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES128-GCM-SHA256 (partly)",
            "20: ssl_prefer_server_ciphers off",
            "22: ssl_session_timeout 1d",
        ]
    );
    assert!(toml.contains("# nginx's proxy_read_timeout"), "{toml}");
    let tls = TlsConfig {
        default: TlsFiles {
            cert: PathBuf::from("/etc/letsencrypt/live/chat.example.com/fullchain.pem"),
            key: PathBuf::from("/etc/letsencrypt/live/chat.example.com/privkey.pem"),
        },
        sni: Vec::new(),
        strict_sni: false,
        min_version: TlsVersion::V1_2,
        ciphers: [
            "TLS13_AES_256_GCM_SHA384",
            "TLS13_CHACHA20_POLY1305_SHA256",
            "TLS13_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        ]
        .map(str::to_owned)
        .to_vec(),
        session_cache: 40_000,
        session_tickets: false,
        provider: CryptoProvider::AwsLcRs,
    };
    let mut chat = route(Some("chat.example.com"), Some("/ws/"), "chat");
    chat.idle_timeout = Some(Duration::from_secs(86_400));
    chat.headers.set = vec![("X-NginX-Proxy".into(), "true".into())];
    let mut expected = config_of(
        vec![
            ListenerConfig {
                bind: addr("0.0.0.0:443"),
                tls: Some(tls.clone()),
                proxy_protocol: false,
            },
            ListenerConfig {
                bind: addr("[::]:443"),
                tls: Some(tls),
                proxy_protocol: false,
            },
        ],
        vec![chat],
        vec![(
            "chat",
            UpstreamConfig {
                fail_timeout: Duration::from_secs(30),
                keepalive: 16,
                ..pool(&["10.0.0.5:8080", "10.0.0.6:8080"])
            },
        )],
    );
    expected.timeouts.connect = Duration::from_secs(3);
    assert_eq!(config, expected);
}

/// A scratch folder for files an import reads.
fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wsplice-import-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("conf.d")).expect("scratch folder");
    dir
}

/// `include conf.d/*.conf` (Debian's layout): each site file in name order, relative to the
/// including file (or nginx's folder), warnings naming the included file.
#[test]
fn include_of_conf_d() {
    let dir = scratch("include");
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        "worker_processes 2;\nevents {\n    worker_connections 768;\n}\nhttp {\n    include mime.types;\n    include conf.d/*.conf;\n}\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("conf.d/a-chat.conf"),
        "upstream chat { server 127.0.0.1:9001; }\nserver {\n    listen 8080;\n    server_name chat.example.com;\n    location / { proxy_pass http://chat; }\n}\n",
    )
    .expect("write");
    std::fs::write(
        dir.join("conf.d/b-api.conf"),
        "server {\n    listen 8080;\n    server_name api.example.com;\n    access_log /var/log/nginx/api.log;\n    include snippets/proxy.conf;\n}\n",
    )
    .expect("write");
    std::fs::write(dir.join("conf.d/notes.txt"), "not { a config").expect("write");
    // Relative to nginx's folder, as Debian's `include snippets/...` are.
    std::fs::create_dir_all(dir.join("snippets")).expect("snippets");
    std::fs::write(
        dir.join("snippets/proxy.conf"),
        "location /v1/ { proxy_pass http://127.0.0.1:9002; }\n",
    )
    .expect("write");
    let imported = import(&main).expect("import");
    let warnings: Vec<String> = imported.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        [format!(
            "{}:4: directive `access_log /var/log/nginx/api.log` not imported: wsplice logs to stderr: one JSON access line per tunnel or request (target wsplice::access)",
            dir.join("conf.d/b-api.conf").display()
        )]
    );
    let config = Config::parse(&imported.toml).expect("parses");
    let mut expected = config_of(
        vec![plain("0.0.0.0:8080")],
        vec![
            route(Some("chat.example.com"), None, "chat"),
            route(Some("api.example.com"), Some("/v1/"), "127_0_0_1_9002"),
        ],
        vec![
            ("chat", pool(&["127.0.0.1:9001"])),
            ("127_0_0_1_9002", pool(&["127.0.0.1:9002"])),
        ],
    );
    expected.workers = Some(2);
    // Longer prefixes first: /v1/ before the chat host's whole tree.
    expected.routes.swap(0, 1);
    assert_eq!(config, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A site that does more than proxy: each directive wsplice cannot take is named with its line.
#[test]
fn messy_site_warns_each_directive_on_its_line() {
    let (config, warnings, _) = import_text(
        r#"user www-data;
worker_processes auto;
pid /run/nginx.pid;
http {
    sendfile on;
    access_log /var/log/nginx/access.log;
    keepalive_timeout 65;
    client_max_body_size 10m;
    upstream app {
        ip_hash;
        server 127.0.0.1:3000 weight=2;
        server app2.internal:3000;
        server 127.0.0.1:3001 backup;
    }
    server {
        listen 80 default_server;
        server_name _;
        root /var/www/html;
        index index.html;
        rewrite ^/old/(.*)$ /new/$1 permanent;
        location / {
            try_files $uri $uri/ =404;
        }
        location /socket.io/ {
            proxy_pass http://app/socket.io/;
            proxy_set_header X-Client $remote_port;
            proxy_send_timeout 1h;
            allow 10.0.0.0/8;
            deny all;
        }
        location ~* \.(js|css)$ {
            expires 30d;
        }
    }
}
"#,
    );
    assert_eq!(
        lines(&warnings),
        [
            "1: user www-data",
            "6: access_log /var/log/nginx/access.log",
            "10: ip_hash",
            "11: server 127.0.0.1:3000 weight=2 (partly)",
            "12: server app2.internal:3000",
            "13: server 127.0.0.1:3001 backup",
            "18: root /var/www/html",
            "19: index index.html",
            "20: rewrite ^/old/(.*)$ /new/$1 permanent",
            "21: location /",
            "22: try_files $uri $uri/ =404",
            "26: proxy_set_header X-Client $remote_port",
            "27: proxy_send_timeout 1h",
            "28: allow 10.0.0.0/8",
            "29: deny all",
            "31: location ~* \\.(js|css)$",
        ]
    );
    let mut expected = config_of(
        vec![plain("0.0.0.0:80")],
        vec![route(None, Some("/socket.io/"), "app")],
        vec![("app", pool(&["127.0.0.1:3000"]))],
    );
    expected.timeouts.keepalive = Duration::from_secs(65);
    expected.limits.max_body = Some(10 << 20);
    assert_eq!(config, expected);
}

#[test]
fn a_file_that_is_not_nginx_syntax_names_its_line() {
    let dir = scratch("syntax");
    let main = dir.join("nginx.conf");
    std::fs::write(&main, "http {\n    server {\n        listen 80\n    }\n}\n").expect("write");
    let error = import(&main).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}:3: directive `listen` does not end with `;` or `{{`",
            main.display()
        )
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nothing_proxied_is_an_error_with_the_reasons() {
    let dir = scratch("static");
    let main = dir.join("nginx.conf");
    std::fs::write(
        &main,
        "http {\n    server {\n        listen 80;\n        root /srv;\n    }\n}\n",
    )
    .expect("write");
    match import(&main) {
        Err(ImportError::NothingProxied { warnings, .. }) => {
            assert_eq!(lines(&warnings), ["3: listen 80", "4: root /srv"]);
        }
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn wildcards() {
    assert!(wildcard_match("*.conf", "a.conf"));
    assert!(!wildcard_match("*.conf", "a.conf.bak"));
    assert!(wildcard_match("site-?.conf", "site-1.conf"));
    assert!(wildcard_match("*", "x"));
}

/// Two TLS servers on one port: the first (or `default_server`) gives the listener's
/// certificate, the other's is picked by SNI; the same host and path twice is reported.
#[test]
fn virtual_hosts_on_one_tls_port_become_sni_entries() {
    let (config, warnings, _) = import_text(
        r#"http {
    ssl_protocols TLSv1.3;
    server {
        listen 443 ssl;
        server_name a.example.com;
        ssl_certificate a.pem;
        ssl_certificate_key a.key;
        location / { proxy_pass http://127.0.0.1:9001; }
    }
    server {
        listen 443 ssl default_server;
        server_name b.example.com;
        ssl_certificate b-rsa.pem;
        ssl_certificate_key b-rsa.key;
        ssl_certificate b.pem;
        ssl_certificate_key b.key;
        location / { proxy_pass http://127.0.0.1:9002; }
        if ($host = x) { return 404; }
    }
    server {
        listen 8443 ssl;
        server_name b.example.com;
        ssl_certificate b.pem;
        ssl_certificate_key b.key;
        location / { proxy_pass http://127.0.0.1:9003; }
    }
}
"#,
    );
    assert_eq!(
        lines(&warnings),
        [
            "13: ssl_certificate b-rsa.pem",
            "14: ssl_certificate_key b-rsa.key",
            "18: if ($host = x)",
            "25: location /"
        ],
        "{warnings:#?}"
    );
    assert!(warnings[2].reason.ends_with("(with everything inside it)"));
    let listener = &config.listeners[0];
    assert_eq!(listener.bind, addr("0.0.0.0:443"));
    let tls = listener.tls.as_ref().expect("tls");
    assert_eq!(tls.default.cert, PathBuf::from("/etc/nginx/b.pem"));
    assert_eq!(tls.min_version, TlsVersion::V1_3);
    assert_eq!(tls.sni.len(), 1);
    assert_eq!(tls.sni[0].names, ["a.example.com"]);
    assert_eq!(tls.sni[0].files.key, PathBuf::from("/etc/nginx/a.key"));
    assert_eq!(config.listeners[1].bind, addr("0.0.0.0:8443"));
    assert_eq!(
        config.routes,
        [
            route(Some("a.example.com"), None, "127_0_0_1_9001"),
            route(Some("b.example.com"), None, "127_0_0_1_9002"),
        ]
    );
}

/// A server whose listens cannot be imported takes its locations along (they would be reached
/// through other servers' ports); an exact location is a prefix without the segment note;
/// an IPv6 upstream gets a readable name; an empty header value removes the header.
#[test]
fn locations_of_a_server_without_listener_are_left_out() {
    let (config, warnings, toml) = import_text(
        r#"
server {
    listen 443 ssl;
    server_name app.example.com;
    location /ws/ { proxy_pass http://127.0.0.1:9000; }
}
server {
    listen 127.0.0.1:8080;
    location = /health {
        proxy_pass http://[::1]:9000;
        proxy_set_header Authorization "";
    }
}
"#,
    );
    assert_eq!(
        lines(&warnings),
        [
            "2: server",
            "3: listen 443 ssl",
            "9: location = /health (partly)"
        ]
    );
    assert!(!toml.contains("also matched"), "{toml}");
    let mut health = route(None, Some("/health"), "ipv6_1_9000");
    health.headers.remove = vec!["Authorization".into()];
    assert_eq!(
        config,
        config_of(
            vec![plain("127.0.0.1:8080")],
            vec![health],
            vec![("ipv6_1_9000", pool(&["[::1]:9000"]))],
        )
    );
}

/// nginx's body limit carries over: its 1 MiB default when none is set (see `config_of`), none
/// for `client_max_body_size 0`.
#[test]
fn client_max_body_size_zero_is_no_limit() {
    let (config, _, _) = import_text(
        r#"
http {
    client_max_body_size 0;
    server {
        listen 8080;
        location / { proxy_pass http://127.0.0.1:9000; }
    }
}
"#,
    );
    assert_eq!(config.limits.max_body, None);
}

/// Found by the import fuzz target: an `upstream` without a block and a second `upstream` of
/// the same name each wrote an `[upstream.NAME]` table, and the TOML had a duplicate key.
#[test]
fn an_upstream_defined_twice_or_without_a_block_is_reported_once() {
    let (config, warnings, toml) = import_text(
        r#"
http {
    upstream backend pid /run/nginx.pid;
    upstream backend { server 10.0.0.2:8080; }
    upstream backend { server 10.0.0.3:8080; }
    server {
        listen 8080;
        location / { proxy_pass http://backend; }
    }
}
"#,
    );
    assert_eq!(toml.matches("[upstream.backend]").count(), 1, "{toml}");
    assert_eq!(
        config,
        config_of(
            vec![plain("0.0.0.0:8080")],
            vec![route(None, None, "backend")],
            vec![("backend", pool(&["10.0.0.2:8080"]))],
        )
    );
    assert_eq!(
        lines(&warnings),
        [
            "3: upstream backend pid /run/nginx.pid",
            "5: upstream backend"
        ]
    );
}

/// Found by the import fuzz target: names copied into comments (a server given by host name,
/// an unused upstream, a location's note) kept their control characters, and a NUL or a line
/// break there made the TOML invalid or let nginx text become TOML lines.
#[test]
fn control_characters_copied_into_comments_are_escaped() {
    let text = "http {\n\
        upstream app { server \"app\u{0}.internal:80\"; server 127.0.0.1:3000; }\n\
        upstream \"unused\n[admin]\" { server 127.0.0.1:1; }\n\
        server {\n\
            listen 8080;\n\
            location \"/a\rb\" { proxy_pass http://app; }\n\
        }\n\
    }\n";
    let tree = syntax::parse(text, Path::new(FILE)).expect("nginx syntax");
    let mapped = mapping::map(&tree, Path::new(FILE), Path::new("/etc/nginx"));
    let toml = mapped.toml.expect("a configuration");
    assert!(
        toml.contains("# TODO: nginx's server app\\u{0}.internal:80"),
        "{toml}"
    );
    assert!(toml.contains("# upstream unused\\u{a}[admin] ("), "{toml}");
    assert!(!toml.contains('\0') && !toml.contains('\r'), "{toml}");
    let table: toml::Table = toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert!(!table.contains_key("admin"), "{toml}");
}

/// Found by the import fuzz target: `location chat/ {…}` became `path_prefix = "chat/"`, which
/// `wsplice check` refuses; in nginx such a location matches no request path.
#[test]
fn a_location_not_starting_with_a_slash_is_left_out() {
    let (config, warnings, _) = import_text(
        r#"
http {
    server {
        listen 8080;
        location chat/ { proxy_pass http://127.0.0.1:9001; }
        location ^~ admin { proxy_pass http://127.0.0.1:9002; }
        location / { proxy_pass http://127.0.0.1:9000; }
    }
}
"#,
    );
    assert_eq!(
        lines(&warnings),
        ["5: location chat/", "6: location ^~ admin"]
    );
    assert_eq!(config.routes.len(), 1);
    assert_eq!(config.routes[0].path_prefix, None);
}

/// Found by the import fuzz target: an upstream none of whose servers could be imported (a
/// misspelt `server`, only `backup` ones) became `servers = []` with no word on what to do;
/// it gets the same TODO line as a server given by host name.
#[test]
fn an_upstream_without_an_imported_server_says_what_to_add() {
    let text = "http {\n\
        upstream app { sever 127.0.0.1:1; server 127.0.0.1:2 backup; }\n\
        server { listen 8080; location / { proxy_pass http://app; } }\n\
    }\n";
    let tree = syntax::parse(text, Path::new(FILE)).expect("nginx syntax");
    let mapped = mapping::map(&tree, Path::new(FILE), Path::new("/etc/nginx"));
    let toml = mapped.toml.expect("a configuration");
    assert!(
        toml.contains(
            "[upstream.app]  # /etc/nginx/nginx.conf:2\n# TODO: no server of nginx's upstream app \
             was imported (see the warnings): add its IP:port\nservers = []\n"
        ),
        "{toml}"
    );
    assert_eq!(
        lines(&mapped.warnings),
        ["2: sever 127.0.0.1:1", "2: server 127.0.0.1:2 backup"]
    );
}

/// Found by the import fuzz target: `proxy_set_header` with a name that is not a token went
/// into the route's rules, and `wsplice check` refused the result.
#[test]
fn a_header_name_that_is_not_a_token_is_reported() {
    let (config, warnings, _) = import_text(
        "http {\n    server {\n        listen 8080;\n        location / {\n            \
         proxy_pass http://127.0.0.1:9000;\n            \
         proxy_set_header X-A://b 1;\n            proxy_set_header X-Ok 1;\n        }\n    }\n}\n",
    );
    assert_eq!(lines(&warnings), ["6: proxy_set_header X-A://b 1"]);
    assert_eq!(
        config.routes[0].headers.set,
        [("X-Ok".to_owned(), "1".to_owned())]
    );
}

/// Found by the import fuzz target: a `proxy_set_header` value with a control character
/// went into the rules, which `wsplice check` refuses.
#[test]
fn a_header_value_with_a_control_character_is_reported() {
    let (config, warnings, _) = import_text(
        "http {\n    server {\n        listen 8080;\n        location / {\n            \
         proxy_pass http://127.0.0.1:9000;\n            \
         proxy_set_header X-A \"a\u{1}b\";\n        }\n    }\n}\n",
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].line, 6);
    assert!(config.routes[0].headers.set.is_empty());
}

/// `proxy_set_header Content-Length` (or another header the proxy writes itself) is reported,
/// not turned into a rule `wsplice check` refuses.
#[test]
fn a_header_the_proxy_writes_itself_is_reported() {
    let (config, warnings, _) = import_text(
        "http {\n    server {\n        listen 8080;\n        location / {\n            \
         proxy_pass http://127.0.0.1:9000;\n            \
         proxy_set_header Content-Length 0;\n            proxy_set_header X-Ok 1;\n        }\n    }\n}\n",
    );
    assert_eq!(lines(&warnings), ["6: proxy_set_header Content-Length 0"]);
    assert_eq!(
        config.routes[0].headers.set,
        [("X-Ok".to_owned(), "1".to_owned())]
    );
}

#[test]
fn a_server_listed_twice_in_an_upstream_is_listed_once_with_a_warning() {
    // Found by fuzzing: the import wrote both, and `wsplice check` refused the result.
    let (config, warnings, _) = import_text(
        "http { upstream backend { server 10.0.0.2:8080; server 10.0.0.2:8080 max_fails=3; }\n\
         server { listen 8080; location / { proxy_pass http://backend; } } }\n",
    );
    assert_eq!(
        config.upstreams["backend"].servers,
        vec![ServerConfig::at(addr("10.0.0.2:8080"))]
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.to_string().contains("listed before in this upstream")),
        "{warnings:?}"
    );
}
