//! The nginx directive tree → wsplice's TOML. Pure: it takes the tree [`super::load`] read and
//! returns text and warnings.
//!
//! nginx's inheritance is followed: `proxy_*` and `ssl_*` settings of `http` and `server` apply
//! to the `location`s inside that do not set them (for `proxy_set_header`, a level with any
//! replaces all those above, as in nginx). Each directive that does not map is reported once,
//! where it is written. One `[[route]]` is written per server name and `location` with a
//! `proxy_pass`; routes with a longer path prefix come first, because wsplice takes the first
//! match where nginx takes the longest prefix. A `server` that proxies nothing gets no listener
//! (its `listen` lines are reported), so a port nginx only redirected does not start proxying.
//! `[admin]` (`127.0.0.1:9901`) is written only when the configuration had a `stub_status`:
//! wsplice's `/metrics` takes its place, and no port nginx did not open is opened otherwise.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use super::syntax::Directive;
use super::values::{
    format_duration, format_size, iana_cipher, listen_addr, parse_duration, parse_size,
    server_addr, TLS13_SUITES,
};
use super::Warning;

/// Directives left out without a warning: they change nothing a proxy does (`events` with
/// everything inside, since wsplice's workers are io_uring loops; `pid`; file serving's
/// `sendfile`, `tcp_nopush`, MIME types; hash table sizes; `worker_rlimit_nofile`, as wsplice
/// raises its descriptor limit itself; an upstream's shared-memory `zone`; `proxy_cache_bypass`
/// and `proxy_no_cache` without a cache).
pub const SILENT: &[&str] = &[
    "events",
    "pid",
    "worker_rlimit_nofile",
    "sendfile",
    "tcp_nopush",
    "types",
    "default_type",
    "include",
    "types_hash_max_size",
    "types_hash_bucket_size",
    "server_names_hash_bucket_size",
    "server_names_hash_max_size",
    "variables_hash_max_size",
    "variables_hash_bucket_size",
    "proxy_headers_hash_max_size",
    "proxy_headers_hash_bucket_size",
    "zone",
    "proxy_cache_bypass",
    "proxy_no_cache",
];

/// nginx's `client_max_body_size` when a configuration does not set it.
const NGINX_DEFAULT_MAX_BODY: u64 = 1 << 20;

/// Where the admin listener goes when `stub_status` was used.
const ADMIN_BIND: &str = "127.0.0.1:9901";

/// What [`map`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// The wsplice TOML; `None` when nothing was proxied (wsplice needs a route).
    pub toml: Option<String>,
    /// What was not imported.
    pub warnings: Vec<Warning>,
}

/// Maps the directives of `source` (includes expanded) to wsplice TOML; relative certificate
/// paths are taken from `conf_dir` (nginx's configuration folder).
pub fn map(tree: &[Directive], source: &Path, conf_dir: &Path) -> Mapped {
    let mut mapper = Mapper {
        conf_dir,
        warnings: Vec::new(),
        workers: None,
        pools: Vec::new(),
        pool_names: BTreeSet::new(),
        routes: Vec::new(),
        binds: Vec::new(),
        connect: None,
        keepalive: None,
        max_body: None,
        admin: false,
        upgrade_variables: Vec::new(),
    };
    if tree
        .iter()
        .any(|d| d.name == "server" || d.name == "upstream")
    {
        // A site file (conf.d/, sites-enabled/) imported on its own: its top level is `http`.
        mapper.http(tree, vec![tree]);
    } else {
        for d in tree {
            mapper.main(d);
        }
    }
    let toml = mapper.render(source);
    mapper
        .warnings
        .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    Mapped {
        toml,
        warnings: mapper.warnings,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Http,
    Server,
    Location,
}

#[derive(Debug, Default)]
struct Pool {
    name: String,
    servers: Vec<SocketAddr>,
    /// Servers given by name (reported): the pool is written with a note.
    unresolved: Vec<String>,
    fail_timeout: Option<String>,
    keepalive: Option<usize>,
    keepalive_timeout: Option<String>,
    source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    host: Option<String>,
    prefix: Option<String>,
    upstream: String,
    set: Vec<(String, String)>,
    remove: Vec<String>,
    idle: Option<(String, String)>,
    source: String,
    /// The `location` it comes from, for warnings.
    file: std::path::PathBuf,
    line: usize,
    location: String,
    note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tls {
    cert: String,
    key: String,
    min_version: Option<&'static str>,
    ciphers: Vec<String>,
    session_cache: Option<usize>,
    session_tickets: Option<bool>,
}

#[derive(Debug)]
struct Bind<'a> {
    addr: SocketAddr,
    tls: Option<Tls>,
    default: bool,
    names: Vec<String>,
    listen: &'a Directive,
}

struct Mapper<'a> {
    conf_dir: &'a Path,
    warnings: Vec<Warning>,
    workers: Option<usize>,
    pools: Vec<Pool>,
    pool_names: BTreeSet<String>,
    routes: Vec<Route>,
    binds: Vec<Bind<'a>>,
    connect: Option<(String, &'a Directive)>,
    keepalive: Option<(String, &'a Directive)>,
    max_body: Option<(u64, &'a Directive)>,
    admin: bool,
    upgrade_variables: Vec<String>,
}

/// Why some common directives are not imported.
fn reason(name: &str) -> String {
    let text = match name {
        "root" | "alias" | "index" | "try_files" | "autoindex" | "error_page" | "expires" => {
            "wsplice does not serve files: only what a location proxies is imported"
        }
        "rewrite" | "return" | "if" | "set" => {
            "wsplice does not rewrite or answer requests itself (requests reach the upstream unchanged)"
        }
        "access_log" | "error_log" | "log_format" | "open_log_file_cache" => {
            "wsplice logs to stderr: one JSON access line per tunnel or request (target wsplice::access)"
        }
        "user" => "wsplice runs as the user that starts it",
        "allow" | "deny" | "auth_basic" | "auth_basic_user_file" | "auth_request" | "satisfy" => {
            "wsplice has no access control: enforce it in front of wsplice or in the upstream"
        }
        "add_header" | "proxy_hide_header" | "proxy_pass_header" | "more_set_headers" => {
            "wsplice sets request headers only (route `headers`); response headers pass as the upstream sent them"
        }
        "gzip" | "gzip_types" | "gzip_vary" | "gzip_proxied" | "gzip_comp_level" => {
            "wsplice does not compress"
        }
        "limit_req" | "limit_req_zone" | "limit_conn" | "limit_conn_zone" | "limit_rate" => {
            "wsplice has no rate limits (`[limits]` max_connections and max_connections_per_ip cap open connections)"
        }
        "http2" => "wsplice speaks HTTP/1.1 (its ALPN offers http/1.1; clients fall back to it)",
        "proxy_send_timeout" => {
            "wsplice has no send timeout: a tunnel is closed after `idle_timeout` without traffic either way"
        }
        "proxy_next_upstream" | "proxy_next_upstream_tries" | "proxy_next_upstream_timeout" => {
            "wsplice tries the next server when a connect fails, and never after a request was sent"
        }
        "least_conn" => "wsplice balances by least connections unless `balance` says otherwise",
        "ip_hash" | "hash" | "random" | "sticky" => {
            "set the pool's `balance` by hand: least_connections (the default), round_robin, consistent_hash (`hash_key` client_ip, path, header:NAME, cookie:NAME) or random_two"
        }
        "stream" | "mail" => "wsplice proxies HTTP and WebSocket only",
        _ if name.starts_with("proxy_cache") => "wsplice does not cache",
        _ if name.starts_with("proxy_ssl") => "wsplice connects to upstreams in plain text",
        _ if name.starts_with("ssl_stapling") => "wsplice does not staple OCSP answers",
        _ if name.starts_with("proxy_buffer") || name.starts_with("proxy_temp") => {
            "wsplice streams bodies through bounded buffers (`[limits] relay_buffer`)"
        }
        _ => "wsplice has no equivalent",
    };
    text.to_owned()
}

impl<'a> Mapper<'a> {
    fn warn(&mut self, d: &Directive, why: impl Into<String>) {
        self.warnings.push(Warning::dropped(d, why));
    }

    fn partly(&mut self, d: &Directive, why: impl Into<String>) {
        self.warnings.push(Warning::partly(d, why));
    }

    fn unknown(&mut self, d: &Directive) {
        if !SILENT.contains(&d.name.as_str()) {
            let mut why = reason(&d.name);
            if !d.children().is_empty() {
                why.push_str(" (with everything inside it)");
            }
            self.warn(d, why);
        }
    }

    fn main(&mut self, d: &'a Directive) {
        match d.name.as_str() {
            "http" => {
                let stack = vec![d.children()];
                self.http(d.children(), stack);
            }
            "worker_processes" => match d.args.first().map(String::as_str) {
                Some("auto") => {}
                Some(n) => match n.parse::<usize>() {
                    Ok(n) if (1..=crate::tag::MAX_WORKERS).contains(&n) => self.workers = Some(n),
                    _ => self.warn(
                        d,
                        format!("workers must be between 1 and {}", crate::tag::MAX_WORKERS),
                    ),
                },
                None => self.unknown(d),
            },
            _ => self.unknown(d),
        }
    }

    fn http(&mut self, children: &'a [Directive], mut stack: Vec<&'a [Directive]>) {
        // Upstreams may be defined after the proxy_pass naming them.
        self.extra_certificates(children);
        // So may maps, before the proxy_set_header using them.
        for d in children {
            if d.name == "upstream" && d.block.is_some() {
                if let Some(name) = d.args.first() {
                    self.pool_names.insert(name.clone());
                }
            }
            if let ("map", [from, to]) = (d.name.as_str(), d.args.as_slice()) {
                if from == "$http_upgrade" {
                    self.upgrade_variables.push(to.clone());
                }
            }
        }
        for d in children {
            match d.name.as_str() {
                "upstream" => self.upstream(d),
                "map" => self.map_block(d),
                "server" => self.server(d, &mut stack),
                "worker_processes" | "http" => self.main(d),
                _ => self.setting(d, Level::Http),
            }
        }
    }

    /// nginx serves several certificates per server (RSA and ECDSA); wsplice one per name:
    /// the last of a level is used, the others are reported.
    fn extra_certificates(&mut self, level: &[Directive]) {
        for name in ["ssl_certificate", "ssl_certificate_key"] {
            let all: Vec<&Directive> = level.iter().filter(|d| d.name == name).collect();
            if let Some((last, others)) = all.split_last() {
                for d in others {
                    let why = format!(
                        "wsplice serves one certificate per server name: the one at line {} is used",
                        last.line
                    );
                    self.warn(d, why);
                }
            }
        }
    }

    fn map_block(&mut self, d: &Directive) {
        match d.args.as_slice() {
            // Taken by `http` before the servers.
            [from, _] if from == "$http_upgrade" => {}
            _ => self.warn(d, "wsplice has no variables: only `map $http_upgrade $connection_upgrade` (the WebSocket idiom) is understood"),
        }
    }

    fn upstream(&mut self, d: &'a Directive) {
        // `upstream NAME { … }` only: without a block it defines nothing.
        let (Some(name), Some(_)) = (d.args.first(), &d.block) else {
            return self.warn(d, "an upstream is a block: `upstream NAME { server …; }`");
        };
        if let Some(first) = self.pools.iter().find(|p| &p.name == name) {
            let why = format!(
                "upstream {name} is already defined at {} (nginx refuses this): that one is used",
                first.source
            );
            return self.warn(d, why);
        }
        let mut pool = Pool {
            name: name.clone(),
            source: format!("{}:{}", d.file.display(), d.line),
            ..Pool::default()
        };
        for c in d.children() {
            match c.name.as_str() {
                "server" => self.upstream_server(c, &mut pool),
                "keepalive" => match c.args.first().and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) if n <= 4096 => pool.keepalive = Some(n),
                    Some(_) => {
                        pool.keepalive = Some(4096);
                        self.partly(
                            c,
                            "wsplice keeps at most 4096 idle connections per server and worker",
                        );
                    }
                    None => self.warn(c, "not a number"),
                },
                "keepalive_timeout" => match self.duration(c) {
                    Some(t) if t != "0s" => pool.keepalive_timeout = Some(t),
                    Some(_) => self.warn(c, "must be longer than zero in wsplice"),
                    None => {}
                },
                _ => self.unknown(c),
            }
        }
        self.pools.push(pool);
    }

    fn upstream_server(&mut self, d: &Directive, pool: &mut Pool) {
        let Some(address) = d.args.first() else {
            return self.unknown(d);
        };
        let mut reasons = Vec::new();
        let mut skip = None;
        let mut never_mark = false;
        for param in &d.args[1..] {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "max_fails" if value == "0" => never_mark = true,
                "max_fails" if value == "1" => {}
                "max_fails" => reasons.push(format!(
                    "{param}: wsplice marks a server failed after one failure"
                )),
                "fail_timeout" => match parse_duration(value).map(format_duration) {
                    Some(Ok(t)) => match &pool.fail_timeout {
                        Some(old) if *old != t => reasons.push(format!(
                            "{param}: wsplice has one fail_timeout per pool, {old} is kept"
                        )),
                        _ => pool.fail_timeout = Some(t),
                    },
                    _ => reasons.push(format!("{param}: not a duration")),
                },
                "weight" => reasons.push(format!("{param}: set it by hand as `{{ addr = \"…\", weight = N }}` in `servers`")),
                "backup" => skip = Some("backup servers are not supported (every server of a pool takes its turn), so it is left out"),
                "down" => skip = Some("the server is marked down, so it is left out"),
                _ => reasons.push(format!("{param}: wsplice has no equivalent")),
            }
        }
        if never_mark {
            pool.fail_timeout = Some("0s".into());
        }
        if let Some(why) = skip {
            return self.warn(d, why);
        }
        match server_addr(address) {
            // nginx takes a server listed twice as two (twice its share); wsplice lists each
            // once (`weight` says the share).
            Ok(addr) if pool.servers.contains(&addr) => {
                return self.warn(
                    d,
                    "the server is listed before in this upstream: listed once (give it a \
                     `weight` for a larger share)",
                );
            }
            Ok(addr) => pool.servers.push(addr),
            Err(why) => {
                if !pool.unresolved.contains(address) {
                    pool.unresolved.push(address.clone());
                }
                return self.warn(d, why);
            }
        }
        if !reasons.is_empty() {
            self.partly(d, reasons.join("; "));
        }
    }

    /// A directive of `http`, `server` or `location` that is not a block of its own.
    fn setting(&mut self, d: &'a Directive, level: Level) {
        let arg = d.args.first().map(String::as_str).unwrap_or_default();
        match d.name.as_str() {
            "proxy_set_header" => {
                if let Some(why) = self.header_problem(d) {
                    self.warn(d, why);
                }
            }
            "proxy_read_timeout" => {
                self.duration(d);
            }
            "proxy_connect_timeout" => {
                if let Some(t) = self.duration(d) {
                    match &self.connect {
                        Some((old, _)) if *old != t => {
                            let why = format!("wsplice has one connect timeout (`[timeouts] connect`), {old} is kept");
                            self.warn(d, why);
                        }
                        Some(_) => {}
                        None if t == "0s" => self.warn(d, "must be longer than zero"),
                        None => self.connect = Some((t, d)),
                    }
                }
            }
            "proxy_http_version" if arg == "1.1" => {}
            "proxy_http_version" => self.warn(d, "wsplice speaks HTTP/1.1 to upstreams"),
            "proxy_buffering" | "proxy_request_buffering" if arg == "off" => {}
            "keepalive_timeout" if level != Level::Location => {
                let Some(t) = self.duration(d) else { return };
                if t == "0s" {
                    return self.warn(d, "wsplice always keeps client connections alive (`[timeouts] keepalive` must be longer than zero)");
                }
                if d.args.len() > 1 {
                    self.partly(d, "the Keep-Alive header timeout is not sent");
                }
                match &self.keepalive {
                    Some((old, _)) if *old != t => {
                        let why = format!("wsplice has one client keep-alive timeout (`[timeouts] keepalive`), {old} is kept");
                        self.warn(d, why);
                    }
                    Some(_) => {}
                    None => self.keepalive = Some((t, d)),
                }
            }
            "client_max_body_size" => match parse_size(arg) {
                Some(bytes) => match &self.max_body {
                    Some((old, _)) if *old != bytes => {
                        let why = format!(
                            "wsplice has one body limit (`[limits] max_body`), {} is kept",
                            if *old == 0 {
                                "none".into()
                            } else {
                                format_size(*old)
                            }
                        );
                        self.warn(d, why);
                    }
                    Some(_) => {}
                    None => self.max_body = Some((bytes, d)),
                },
                None => self.warn(d, "not a size"),
            },
            "ssl_certificate" | "ssl_certificate_key" if level != Level::Location => {
                if arg.contains('$') {
                    self.warn(d, "wsplice has no variables: name the file");
                }
            }
            "ssl_protocols" if level != Level::Location => {
                let (_, dropped) = protocols(d);
                if !dropped.is_empty() {
                    let why = format!(
                        "{} not supported (wsplice speaks TLS 1.2 and 1.3)",
                        dropped.join(", ")
                    );
                    self.partly(d, why);
                }
            }
            "ssl_ciphers" if level != Level::Location => {
                let (kept, dropped) = ciphers(d);
                if !dropped.is_empty() {
                    let fallback = if kept.is_empty() {
                        "; wsplice offers all the suites rustls implements"
                    } else {
                        ""
                    };
                    let why = format!(
                        "{} cannot be used by wsplice (it takes the names of suites rustls implements: ECDHE with AES-GCM or ChaCha20-Poly1305){fallback}",
                        dropped.join(", ")
                    );
                    if kept.is_empty() {
                        self.warn(d, why);
                    } else {
                        self.partly(d, why);
                    }
                }
            }
            "ssl_session_cache" if level != Level::Location => {
                if session_cache(d).is_none() {
                    self.warn(d, "expected off, none, builtin[:N] or shared:NAME:SIZE");
                }
            }
            "ssl_session_tickets" if level != Level::Location => {}
            // wsplice prefers the order of `ciphers` when one is given.
            "ssl_prefer_server_ciphers" if arg == "on" && level != Level::Location => {}
            "ssl_prefer_server_ciphers" if level != Level::Location => {
                self.warn(d, "wsplice follows the order of `ciphers` when it is given")
            }
            "ssl_dhparam" => self.warn(d, "rustls has no DHE suites: the file is not needed"),
            "ssl" if arg == "on" && level != Level::Location => {}
            _ => self.unknown(d),
        }
    }

    /// Why a `proxy_set_header` cannot be imported, if it cannot.
    fn header_problem(&self, d: &Directive) -> Option<String> {
        match header_rule(d, &self.upgrade_variables) {
            HeaderRule::Default | HeaderRule::Set(..) | HeaderRule::Remove(_) => None,
            HeaderRule::Bad(why) => Some(why),
        }
    }

    /// A duration argument in wsplice's syntax; a warning when it has none.
    fn duration(&mut self, d: &Directive) -> Option<String> {
        let arg = d.args.first().map(String::as_str).unwrap_or_default();
        match parse_duration(arg).map(format_duration) {
            Some(Ok(t)) => Some(t),
            Some(Err(why)) => {
                self.warn(d, why);
                None
            }
            None => {
                self.warn(d, format!("{arg:?} is not a duration"));
                None
            }
        }
    }

    fn server(&mut self, d: &'a Directive, stack: &mut Vec<&'a [Directive]>) {
        stack.push(d.children());
        self.extra_certificates(d.children());
        let mut hosts: Vec<Option<String>> = Vec::new();
        let mut named = false;
        for c in d.children().iter().filter(|c| c.name == "server_name") {
            named = true;
            for name in &c.args {
                if name.is_empty() || name == "_" {
                    if !hosts.contains(&None) {
                        hosts.push(None);
                    }
                } else if name.starts_with('~')
                    || name.contains('*')
                    || name.starts_with('.')
                    || name.contains('$')
                {
                    self.partly(
                        c,
                        format!("{name}: wsplice routes match exact host names only"),
                    );
                } else {
                    let host = Some(name.to_ascii_lowercase());
                    if !hosts.contains(&host) {
                        hosts.push(host);
                    }
                }
            }
        }
        if !named {
            hosts.push(None);
        }
        let routes_before = self.routes.len();
        let admin_before = self.admin;
        let mut listens = Vec::new();
        for c in d.children() {
            match c.name.as_str() {
                "listen" => listens.push(c),
                "server_name" => {}
                "location" => self.location(c, stack, &hosts),
                _ => self.setting(c, Level::Server),
            }
        }
        let proxies = self.routes.len() > routes_before;
        let names: Vec<String> = hosts.iter().flatten().cloned().collect();
        let binds_before = self.binds.len();
        if listens.is_empty() && proxies {
            // nginx's default: *:80.
            self.bind_listen(d, None, names.clone(), stack);
        }
        for listen in listens {
            if proxies {
                self.bind_listen(listen, Some(listen), names.clone(), stack);
            } else if !(self.admin && !admin_before) {
                self.warn(listen, "this server proxies nothing (no location with a proxy_pass wsplice can take), so it gets no listener");
            }
        }
        if proxies && self.binds.len() == binds_before {
            // Its routes would be reached through other servers' listeners only.
            self.routes.truncate(routes_before);
            self.warn(
                d,
                "none of its listens could be imported, so its locations are left out too",
            );
        }
        stack.pop();
    }

    /// A listener for a `listen` (or nginx's default `*:80` when `listen` is `None`).
    fn bind_listen(
        &mut self,
        at: &'a Directive,
        listen: Option<&'a Directive>,
        names: Vec<String>,
        stack: &[&'a [Directive]],
    ) {
        let mut ssl =
            effective(stack, "ssl").is_some_and(|d| d.args.first().is_some_and(|a| a == "on"));
        let mut default = false;
        let addr = match listen {
            None => SocketAddr::from(([0, 0, 0, 0], 80)),
            Some(listen) => {
                let Some(first) = listen.args.first() else {
                    return self.unknown(listen);
                };
                let addr = match listen_addr(first) {
                    Ok(addr) => addr,
                    Err(why) => return self.warn(listen, why),
                };
                let mut reasons = Vec::new();
                for param in &listen.args[1..] {
                    match param.as_str() {
                        "ssl" => ssl = true,
                        "default_server" | "default" => default = true,
                        // wsplice always binds with SO_REUSEPORT; IPv6 sockets as the system sets them.
                        "reuseport" | "ipv6only=on" => {}
                        "http2" => reasons.push(format!("{param}: {}", reason("http2"))),
                        _ => reasons.push(format!("{param}: wsplice has no equivalent")),
                    }
                }
                if !reasons.is_empty() {
                    self.partly(listen, reasons.join("; "));
                }
                addr
            }
        };
        let tls = if ssl {
            match self.tls(stack) {
                Ok(tls) => Some(tls),
                Err(why) => return self.warn(at, why),
            }
        } else {
            None
        };
        if let Some(other) = self.binds.iter().find(|b| b.addr == addr) {
            if other.tls.is_some() != tls.is_some() {
                let why = format!(
                    "{addr} is already a {} listener ({}:{})",
                    if other.tls.is_some() { "TLS" } else { "plain" },
                    other.listen.file.display(),
                    other.listen.line
                );
                return self.warn(at, why);
            }
        }
        self.binds.push(Bind {
            addr,
            tls,
            default,
            names,
            listen: at,
        });
    }

    /// The TLS settings in effect for a server.
    fn tls(&self, stack: &[&'a [Directive]]) -> Result<Tls, String> {
        let file = |name: &str| -> Result<String, String> {
            let d = effective(stack, name)
                .ok_or_else(|| format!("`listen ... ssl` without `{name}`"))?;
            let path = d.args.first().cloned().unwrap_or_default();
            if path.contains('$') {
                return Err(format!("`{name}` names its file with a variable"));
            }
            Ok(self.conf_dir.join(path).display().to_string())
        };
        let cert = file("ssl_certificate")?;
        let key = file("ssl_certificate_key")?;
        let min_version = effective(stack, "ssl_protocols").and_then(|d| protocols(d).0);
        let mut ciphers = effective(stack, "ssl_ciphers")
            .map(|d| ciphers(d).0)
            .unwrap_or_default();
        if !ciphers.is_empty() && !ciphers.iter().any(|c| c.starts_with("TLS13_")) {
            // nginx's ssl_ciphers leaves TLS 1.3 suites alone; wsplice's list covers both.
            let mut all: Vec<String> = TLS13_SUITES.iter().map(|s| s.to_string()).collect();
            all.append(&mut ciphers);
            ciphers = all;
        }
        Ok(Tls {
            cert,
            key,
            min_version,
            ciphers,
            session_cache: effective(stack, "ssl_session_cache").and_then(session_cache),
            session_tickets: effective(stack, "ssl_session_tickets")
                .map(|d| d.args.first().is_none_or(|a| a != "off")),
        })
    }

    fn location(
        &mut self,
        d: &'a Directive,
        stack: &mut Vec<&'a [Directive]>,
        hosts: &[Option<String>],
    ) {
        let prefix = match d.args.as_slice() {
            [path] if path.starts_with('@') => {
                return self.warn(d, "named locations are reached by internal redirects, which wsplice does not make (with everything inside it)");
            }
            [path] => path.clone(),
            [m, path] if m == "^~" => path.clone(),
            [m, path] if m == "=" => {
                self.partly(
                    d,
                    format!("wsplice matches path prefixes: {path} and what is below it"),
                );
                path.clone()
            }
            [m, _] if m == "~" || m == "~*" => {
                return self.warn(d, "wsplice matches path prefixes, not regular expressions (with everything inside it)");
            }
            _ => return self.unknown(d),
        };
        if !prefix.starts_with('/') {
            // wsplice refuses such a path_prefix; in nginx it matches no request path.
            return self.warn(d, "a location that does not start with `/` matches no request path (with everything inside it)");
        }
        stack.push(d.children());
        let mut proxy_pass = None;
        let mut status = false;
        for c in d.children() {
            match c.name.as_str() {
                "location" => self.location(c, stack, hosts),
                "proxy_pass" => proxy_pass = Some(c),
                "stub_status" => {
                    status = true;
                    self.admin = true;
                    self.partly(c, format!("wsplice's admin listener ({ADMIN_BIND}) serves /metrics (Prometheus), /healthz and /readyz instead"));
                }
                _ => self.setting(c, Level::Location),
            }
        }
        match proxy_pass {
            Some(pass) => self.routes_for(d, &prefix, pass, stack, hosts),
            None if status => {}
            None => self.warn(d, "this location proxies nothing (no proxy_pass)"),
        }
        stack.pop();
    }

    fn routes_for(
        &mut self,
        location: &Directive,
        prefix: &str,
        pass: &'a Directive,
        stack: &[&'a [Directive]],
        hosts: &[Option<String>],
    ) {
        let target = pass.args.first().map(String::as_str).unwrap_or_default();
        let Some(rest) = target.strip_prefix("http://") else {
            let why = if target.starts_with("https://") {
                "wsplice connects to upstreams in plain text only (no upstream TLS), so this location is left out"
            } else {
                "expected http://UPSTREAM or http://IP:PORT, so this location is left out"
            };
            return self.warn(pass, why);
        };
        if rest.contains('$') {
            return self.warn(
                pass,
                "wsplice has no variables: name the upstream, so this location is left out",
            );
        }
        let (authority, uri) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let upstream = if self.pool_names.contains(authority) {
            authority.to_owned()
        } else {
            match server_addr(authority) {
                Ok(addr) => {
                    let name = pool_name(authority);
                    if !self.pools.iter().any(|p| p.name == name) {
                        self.pool_names.insert(name.clone());
                        self.pools.push(Pool {
                            name: name.clone(),
                            servers: vec![addr],
                            source: format!("{}:{}", pass.file.display(), pass.line),
                            ..Pool::default()
                        });
                    }
                    name
                }
                Err(why) => return self.warn(pass, format!("{why}, so this location is left out")),
            }
        };
        if let Some(uri) = uri {
            if uri != prefix {
                self.partly(pass, format!("the URI part {uri:?} would replace the location's {prefix:?} in nginx; wsplice passes the path unchanged"));
            }
        }
        let mut set = Vec::new();
        let mut remove = Vec::new();
        for d in effective_all(stack, "proxy_set_header") {
            match header_rule(d, &self.upgrade_variables) {
                HeaderRule::Set(name, value) => {
                    // One value per name in wsplice's rules (a TOML table): the last one wins.
                    set.retain(|(n, _): &(String, String)| !n.eq_ignore_ascii_case(&name));
                    set.push((name, value));
                }
                HeaderRule::Remove(name) => remove.push(name),
                HeaderRule::Default | HeaderRule::Bad(_) => {}
            }
        }
        let idle = effective(stack, "proxy_read_timeout").and_then(|d| {
            let arg = d.args.first()?;
            let t = format_duration(parse_duration(arg)?).ok()?;
            (t != "0s").then(|| (t, format!("{}:{}", d.file.display(), d.line)))
        });
        let exact = location.args.first().is_some_and(|m| m == "=");
        let note = (!exact && prefix != "/" && !prefix.ends_with('/')).then(|| {
            format!("nginx's `location {prefix}` also matched {prefix}x...; wsplice matches whole path segments")
        });
        let source = format!("{}:{}", location.file.display(), location.line);
        for host in hosts {
            self.routes.push(Route {
                host: host.clone(),
                prefix: (prefix != "/").then(|| prefix.to_owned()),
                upstream: upstream.clone(),
                set: set.clone(),
                remove: remove.clone(),
                idle: idle.clone(),
                source: source.clone(),
                file: location.file.clone(),
                line: location.line,
                location: location.text(),
                note: note.clone(),
            });
        }
    }

    fn render(&mut self, source: &Path) -> Option<String> {
        // Routes: host-specific first, then longer prefixes first (wsplice: first match wins).
        let mut routes: Vec<Route> = Vec::new();
        for route in std::mem::take(&mut self.routes) {
            match routes
                .iter()
                .find(|r| r.host == route.host && r.prefix == route.prefix)
            {
                Some(kept)
                    if kept.upstream == route.upstream
                        && kept.set == route.set
                        && kept.remove == route.remove
                        && kept.idle == route.idle => {}
                Some(kept) => {
                    let host = route.host.as_deref().unwrap_or("any host");
                    self.warnings.push(Warning {
                        file: route.file.clone(),
                        line: route.line,
                        directive: route.location.clone(),
                        partly: false,
                        reason: format!("{host} with this path is already routed elsewhere by {} (wsplice's routes are shared by all listeners)", kept.source),
                    });
                }
                None => routes.push(route),
            }
        }
        routes.sort_by_key(|r| {
            (
                r.host.is_none(),
                std::cmp::Reverse(r.prefix.as_ref().map_or(0, String::len)),
            )
        });
        if routes.is_empty() {
            return None;
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# wsplice configuration imported from {} by `wsplice import`.",
            comment(&source.display().to_string())
        );
        out.push_str("# Every nginx directive that did not carry over was reported on stderr with its line.\n");
        out.push_str(
            "# Check this file with `wsplice check FILE`, run it with `wsplice run -c FILE`.\n",
        );
        if let Some(workers) = self.workers {
            let _ = writeln!(out, "\nworkers = {workers}");
        }
        self.render_listeners(&mut out);
        for route in &routes {
            let _ = writeln!(out, "\n[[route]]  # {}", comment(&route.source));
            if let Some(note) = &route.note {
                let _ = writeln!(out, "# {}", comment(note));
            }
            if let Some(host) = &route.host {
                let _ = writeln!(out, "host = {}", quote(host));
            }
            if let Some(prefix) = &route.prefix {
                let _ = writeln!(out, "path_prefix = {}", quote(prefix));
            }
            let _ = writeln!(out, "upstream = {}", quote(&route.upstream));
            if let Some((idle, from)) = &route.idle {
                let _ = writeln!(
                    out,
                    "# nginx's proxy_read_timeout ({}): what closes a quiet tunnel there is wsplice's idle timeout",
                    comment(from)
                );
                let _ = writeln!(out, "idle_timeout = {}", quote(idle));
            }
            if !route.set.is_empty() || !route.remove.is_empty() {
                let mut parts = Vec::new();
                if !route.set.is_empty() {
                    let set: Vec<String> = route
                        .set
                        .iter()
                        .map(|(n, v)| format!("{} = {}", quote(n), quote(v)))
                        .collect();
                    parts.push(format!("set = {{ {} }}", set.join(", ")));
                }
                if !route.remove.is_empty() {
                    let remove: Vec<String> = route.remove.iter().map(|n| quote(n)).collect();
                    parts.push(format!("remove = [{}]", remove.join(", ")));
                }
                let _ = writeln!(out, "headers = {{ {} }}", parts.join(", "));
            }
        }
        let used: BTreeSet<&str> = routes.iter().map(|r| r.upstream.as_str()).collect();
        for pool in &self.pools {
            if !used.contains(pool.name.as_str()) {
                continue;
            }
            let _ = writeln!(
                out,
                "\n[upstream.{}]  # {}",
                key(&pool.name),
                comment(&pool.source)
            );
            if pool.servers.is_empty() && pool.unresolved.is_empty() {
                // `wsplice check` refuses an empty pool: say what to do rather than guess.
                let _ = writeln!(
                    out,
                    "# TODO: no server of nginx's upstream {} was imported (see the warnings): add its IP:port",
                    comment(&pool.name)
                );
            }
            for name in &pool.unresolved {
                let _ = writeln!(
                    out,
                    "# TODO: nginx's server {} is a host name: add its IP:port",
                    comment(name)
                );
            }
            let servers: Vec<String> = pool.servers.iter().map(|s| quote(&s.to_string())).collect();
            let _ = writeln!(out, "servers = [{}]", servers.join(", "));
            if let Some(t) = &pool.fail_timeout {
                let _ = writeln!(out, "fail_timeout = {}", quote(t));
            }
            if let Some(n) = pool.keepalive {
                let _ = writeln!(out, "keepalive = {n}");
            }
            if let Some(t) = &pool.keepalive_timeout {
                let _ = writeln!(out, "keepalive_timeout = {}", quote(t));
            }
        }
        for pool in &self.pools {
            if !used.contains(pool.name.as_str()) {
                let _ = writeln!(
                    out,
                    "\n# upstream {} ({}) is not used by any imported location",
                    comment(&pool.name),
                    comment(&pool.source)
                );
            }
        }
        if self.connect.is_some() || self.keepalive.is_some() {
            out.push_str("\n[timeouts]\n");
            if let Some((t, d)) = &self.connect {
                let _ = writeln!(
                    out,
                    "connect = {}  # proxy_connect_timeout, {}:{}",
                    quote(t),
                    comment(&d.file.display().to_string()),
                    d.line
                );
            }
            if let Some((t, d)) = &self.keepalive {
                let _ = writeln!(
                    out,
                    "keepalive = {}  # keepalive_timeout, {}:{}",
                    quote(t),
                    comment(&d.file.display().to_string()),
                    d.line
                );
            }
        }
        match &self.max_body {
            // `client_max_body_size 0`: no limit, as wsplice's default.
            Some((0, _)) => {}
            Some((bytes, d)) => {
                let _ = writeln!(
                    out,
                    "\n[limits]\nmax_body = {}  # client_max_body_size, {}:{}",
                    quote(&format_size(*bytes)),
                    comment(&d.file.display().to_string()),
                    d.line
                );
            }
            // nginx refuses bodies over 1 MiB unless told otherwise; wsplice has no limit
            // unless told: say nginx's default, so clients see the same 413s.
            None => {
                let _ = writeln!(
                    out,
                    "\n[limits]\nmax_body = {}  # nginx's default client_max_body_size (none was set)",
                    quote(&format_size(NGINX_DEFAULT_MAX_BODY))
                );
            }
        }
        if self.admin {
            let _ = writeln!(
                out,
                "\n[admin]  # in place of stub_status\nbind = {}",
                quote(ADMIN_BIND)
            );
        }
        Some(out)
    }

    fn render_listeners(&mut self, out: &mut String) {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for bind in &self.binds {
            if !addrs.contains(&bind.addr) {
                addrs.push(bind.addr);
            }
        }
        for addr in addrs {
            let binds: Vec<&Bind> = self.binds.iter().filter(|b| b.addr == addr).collect();
            let Some(first) = binds.iter().find(|b| b.default).or(binds.first()) else {
                continue;
            };
            let _ = writeln!(
                out,
                "\n[[listener]]  # {}:{}",
                comment(&first.listen.file.display().to_string()),
                first.listen.line
            );
            let _ = writeln!(out, "bind = {}", quote(&addr.to_string()));
            let Some(tls) = &first.tls else { continue };
            out.push_str("[listener.tls]\n");
            let _ = writeln!(out, "cert = {}", quote(&tls.cert));
            let _ = writeln!(out, "key = {}", quote(&tls.key));
            if let Some(v) = tls.min_version {
                let _ = writeln!(out, "min_version = {}", quote(v));
            }
            if !tls.ciphers.is_empty() {
                let c: Vec<String> = tls.ciphers.iter().map(|c| quote(c)).collect();
                let _ = writeln!(out, "ciphers = [{}]", c.join(", "));
            }
            if let Some(n) = tls.session_cache {
                let _ = writeln!(out, "session_cache = {n}");
            }
            if let Some(on) = tls.session_tickets {
                let _ = writeln!(out, "session_tickets = {on}");
            }
            // Other servers on this address with their own certificate: SNI entries.
            let mut taken: Vec<String> = Vec::new();
            let mut warnings = Vec::new();
            for bind in &binds {
                let Some(other) = &bind.tls else { continue };
                if std::ptr::eq(*bind, *first) || (other.cert == tls.cert && other.key == tls.key) {
                    continue;
                }
                let names: Vec<String> = bind
                    .names
                    .iter()
                    .filter(|n| !taken.contains(n))
                    .cloned()
                    .collect();
                if names.is_empty() {
                    warnings.push(Warning::partly(bind.listen, "its certificate is for a server without names wsplice can pick by SNI; the default certificate is served"));
                    continue;
                }
                taken.extend(names.iter().cloned());
                let list: Vec<String> = names.iter().map(|n| quote(n)).collect();
                let _ = writeln!(
                    out,
                    "[[listener.tls.sni]]  # {}:{}",
                    comment(&bind.listen.file.display().to_string()),
                    bind.listen.line
                );
                let _ = writeln!(out, "names = [{}]", list.join(", "));
                let _ = writeln!(out, "cert = {}", quote(&other.cert));
                let _ = writeln!(out, "key = {}", quote(&other.key));
                if (
                    other.min_version,
                    &other.ciphers,
                    other.session_cache,
                    other.session_tickets,
                ) != (
                    tls.min_version,
                    &tls.ciphers,
                    tls.session_cache,
                    tls.session_tickets,
                ) {
                    warnings.push(Warning::partly(bind.listen, "its TLS versions, ciphers and sessions differ from the listener's first server, whose settings apply to all"));
                }
            }
            self.warnings.extend(warnings);
        }
    }
}

/// What a `proxy_set_header` becomes.
enum HeaderRule {
    /// What wsplice does anyway.
    Default,
    /// A constant value.
    Set(String, String),
    /// An empty value: nginx does not send the header.
    Remove(String),
    /// Not importable, and why.
    Bad(String),
}

fn header_rule(d: &Directive, upgrade_variables: &[String]) -> HeaderRule {
    let [name, value] = d.args.as_slice() else {
        return HeaderRule::Bad("expected a name and a value".into());
    };
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        // `wsplice check` refuses it, and no upstream would read it as a header.
        return HeaderRule::Bad(format!("{name:?} is not a valid header name"));
    }
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return HeaderRule::Bad("the value holds a control character".into());
    }
    let lower = name.to_ascii_lowercase();
    let default = match lower.as_str() {
        "upgrade" => value == "$http_upgrade",
        "connection" => {
            value.eq_ignore_ascii_case("upgrade")
                || value.is_empty()
                || upgrade_variables.contains(value)
        }
        "host" => value == "$host" || value == "$http_host",
        "x-real-ip" => value == "$remote_addr",
        "x-forwarded-for" => value == "$proxy_add_x_forwarded_for" || value == "$remote_addr",
        "x-forwarded-proto" => value == "$scheme",
        _ => false,
    };
    if default {
        HeaderRule::Default
    } else if value.contains('$') {
        HeaderRule::Bad(
            "wsplice has no variables; it sets Host, X-Real-IP, X-Forwarded-For, X-Forwarded-Proto, Upgrade and Connection itself, and other headers only to constants"
        .into())
    } else if crate::headers::managed_by_the_proxy(&lower) {
        HeaderRule::Bad(
            "wsplice writes hop-by-hop, body framing and handshake headers itself".into(),
        )
    } else if value.is_empty() {
        HeaderRule::Remove(name.clone())
    } else if value.contains(['\r', '\n']) {
        HeaderRule::Bad("a header value cannot span lines".into())
    } else {
        HeaderRule::Set(name.clone(), value.clone())
    }
}

/// The lowest version `ssl_protocols` allows ("1.2" or "1.3"), and the versions dropped.
fn protocols(d: &Directive) -> (Option<&'static str>, Vec<String>) {
    let mut lowest = None;
    let mut dropped = Vec::new();
    for arg in &d.args {
        match arg.as_str() {
            "TLSv1.2" => lowest = Some("1.2"),
            "TLSv1.3" if lowest.is_none() => lowest = Some("1.3"),
            "TLSv1.3" => {}
            _ => dropped.push(arg.clone()),
        }
    }
    (lowest, dropped)
}

/// The IANA names of `ssl_ciphers`' suites that rustls implements, and the rest.
fn ciphers(d: &Directive) -> (Vec<String>, Vec<String>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for arg in &d.args {
        for name in arg.split([':', ',', ' ']).filter(|n| !n.is_empty()) {
            match iana_cipher(name) {
                Some(iana) if !kept.iter().any(|k| k == iana) => kept.push(iana.to_owned()),
                Some(_) => {}
                // Exclusions (`!aNULL`) change nothing once the suites are named.
                None if name.starts_with('!') || name.starts_with('-') => {}
                None => dropped.push(name.to_owned()),
            }
        }
    }
    (kept, dropped)
}

/// Sessions `ssl_session_cache` keeps (nginx: about 4000 per megabyte of shared cache).
fn session_cache(d: &Directive) -> Option<usize> {
    let mut total = None;
    for arg in &d.args {
        let n = match arg.as_str() {
            "off" | "none" => 0,
            "builtin" => 20_480,
            _ => {
                if let Some(n) = arg.strip_prefix("builtin:") {
                    n.parse().ok()?
                } else {
                    let size = arg.strip_prefix("shared:")?.rsplit_once(':')?.1;
                    let bytes = parse_size(size)?;
                    usize::try_from(
                        bytes / (1 << 20) * 4000 + (bytes % (1 << 20)) * 4000 / (1 << 20),
                    )
                    .ok()?
                }
            }
        };
        total = Some(total.unwrap_or(0usize).saturating_add(n).min(10_000_000));
    }
    total
}

/// The innermost directive named `name` in `stack` (the last one at its level).
fn effective<'a>(stack: &[&'a [Directive]], name: &str) -> Option<&'a Directive> {
    stack
        .iter()
        .rev()
        .find_map(|level| level.iter().rev().find(|d| d.name == name))
}

/// All directives named `name` of the innermost level that has any (nginx's array inheritance).
fn effective_all<'a>(stack: &[&'a [Directive]], name: &str) -> Vec<&'a Directive> {
    for level in stack.iter().rev() {
        let found: Vec<&Directive> = level.iter().filter(|d| d.name == name).collect();
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// The name of a pool made for `proxy_pass http://IP:PORT`: `127_0_0_1_8010`,
/// `ipv6_1_9000`.
fn pool_name(authority: &str) -> String {
    let mut name = String::new();
    if authority.starts_with('[') {
        name.push_str("ipv6_");
    }
    for c in authority.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            name.push(c);
        } else if !name.is_empty() && !name.ends_with('_') {
            name.push('_');
        }
    }
    name.trim_end_matches('_').to_owned()
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `text` for a TOML comment: a comment ends at the line's end and may hold no other control
/// character, so those are written as escapes (`\u{a}`); names, paths and values copied from
/// an nginx file may hold any.
fn comment(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A TOML key: bare when it can be.
fn key(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        text.to_owned()
    } else {
        quote(text)
    }
}
