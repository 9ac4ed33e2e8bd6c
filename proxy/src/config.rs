//! The TOML configuration, parsed into typed values with line-precise errors.
//!
//! Parsing happens in two steps: serde reads the raw shape (keeping the source span of every
//! value checked later), then each value is turned into its typed form. Any error, syntactic or
//! semantic, says `file:line:column: what is wrong`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

mod tls;
mod values;

use crate::cidr::Cidr;
use crate::tag::MAX_WORKERS;
use crate::upstream::health::{HealthCheck, ProbeKind};
pub use tls::{CryptoProvider, SniCertificate, TlsConfig, TlsFiles, TlsVersion, CIPHER_SUITES};
use values::{
    is_token, parse_account, parse_addr, parse_duration, parse_nonzero_duration, parse_size,
};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[[listener]]`: where clients connect (at least one).
    pub listeners: Vec<ListenerConfig>,
    /// `[[route]]`: Host/path → upstream, first match wins (at least one).
    pub routes: Vec<RouteConfig>,
    /// `[upstream.NAME]`: server pools.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// `[timeouts]`.
    pub timeouts: Timeouts,
    /// `[limits]`.
    pub limits: Limits,
    /// `[kernel]`: when plain tunnels move to the kernel path (if the program is loaded).
    pub splicing: Splicing,
    /// `[packet]`: the packet splice (used with `--datapath packet`).
    pub packet: PacketConfig,
    /// `[admin]`: the metrics/health listener, if any.
    pub admin: Option<AdminConfig>,
    /// `workers = N`: worker threads (default: one per CPU).
    pub workers: Option<usize>,
    /// `pin_workers = true`: worker `i` runs on CPU `i` only (default: the scheduler places
    /// them). Pays on a host whose cores serve the proxy alone; where other processes share
    /// the cores, a pinned worker waits for its core while another sits idle.
    pub pin_workers: bool,
    /// `trusted_proxies = ["10.0.0.0/8"]`: peers whose forwarding headers (`X-Forwarded-For`,
    /// `Forwarded`, `X-Forwarded-Host`, `X-Forwarded-Port`) are passed on; from anyone else
    /// they are replaced (default: nobody).
    pub trusted_proxies: Vec<Cidr>,
    /// `resolvers = ["10.0.0.2:53"]`: the DNS servers asked for the upstream servers given by
    /// name (default: those of `/etc/resolv.conf`).
    pub resolvers: Vec<SocketAddr>,
    /// `user = "wsplice"` (and optionally `group`): the account the proxy switches to once the
    /// eBPF program is loaded and every listener is bound (default: it keeps running as it
    /// was started, with a warning when that is root).
    pub run_as: Option<RunAs>,
}

/// `user` and `group`: whom the proxy runs as after its privileged start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// `user`: a name or a numeric id.
    pub user: Account,
    /// `group`: a name or a numeric id (default: the user's primary group).
    pub group: Option<Account>,
}

/// A user or group as the config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Account {
    /// A name, looked up in the system's user or group database at start.
    Name(String),
    /// A numeric id, taken as it is.
    Id(u32),
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Name(name) => write!(f, "{name:?}"),
            Account::Id(id) => write!(f, "{id}"),
        }
    }
}

/// When a plain tunnel moves from the userspace relay to the kernel path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splicing {
    /// Right after the 101 (`wsplice run --datapath kernel`, used by tests and benchmarks).
    AtOnce,
    /// On the userspace relay first, then promoted at the first quiet moment (nothing held in
    /// userspace either way) once it has lived `after` or relayed `after_bytes` (both ways),
    /// whichever comes first: a hand-off costs about as much as relaying a few hundred small
    /// messages, so short tunnels are cheaper in userspace.
    Promote {
        /// `kernel.promote_after` (default 1 s).
        after: Duration,
        /// `kernel.promote_after_bytes` (default 1 MiB).
        after_bytes: u64,
    },
}

/// `[packet]`: where the packet splice's program attaches and what it reserves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketConfig {
    /// `interfaces = ["eth0"]`: the interfaces whose ingress the program rewrites packets on:
    /// those the tunnels' packets arrive by, client side and upstream side (default: every
    /// interface that is up, loopback included).
    pub interfaces: Vec<String>,
    /// `ports = "40000-59999"`: local ports for upstream connections that may be spliced,
    /// reserved from the kernel's ephemeral allocator (`ip_local_reserved_ports`) so no
    /// other connection takes one while a spliced flow uses it.
    pub ports: crate::splice::packet::ports::PortRange,
    /// `linger = "30s"`: how long a flow stays after both ends closed (or a reset), so late
    /// retransmissions are still translated, as TIME_WAIT would absorb them.
    pub linger: Duration,
    /// `pin = "/sys/fs/bpf/wsplice"`: a folder on a bpffs where the flows map and the
    /// program's links are pinned, so packet-spliced tunnels outlive the process (a restart,
    /// an upgrade) and the next process adopts them (default: not pinned; they end with the
    /// process).
    pub pin: Option<PathBuf>,
}

impl Default for PacketConfig {
    fn default() -> Self {
        PacketConfig {
            interfaces: Vec::new(),
            ports: crate::splice::packet::ports::PortRange {
                first: 40000,
                last: 59999,
            },
            linger: Duration::from_secs(30),
            pin: None,
        }
    }
}

/// `kernel.promote_after` by default.
const DEFAULT_PROMOTE_AFTER: Duration = Duration::from_secs(1);
/// `kernel.promote_after_bytes` by default.
const DEFAULT_PROMOTE_AFTER_BYTES: u64 = 1 << 20;
/// Idle upstream connections kept per server and worker when `keepalive` is not set (nginx's
/// examples use 16–64).
const DEFAULT_IDLE_UPSTREAMS: usize = 32;
/// Most idle upstream connections per server and worker.
const MAX_IDLE_UPSTREAMS: usize = 4096;

impl Default for Splicing {
    fn default() -> Splicing {
        Splicing::Promote {
            after: DEFAULT_PROMOTE_AFTER,
            after_bytes: DEFAULT_PROMOTE_AFTER_BYTES,
        }
    }
}

/// One listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// TLS settings (`wss://`), when set.
    pub tls: Option<TlsConfig>,
    /// `proxy_protocol = true`: every connection starts with a PROXY protocol header (v1 or
    /// v2) from one of `trusted_proxies` (an L4 load balancer); the client address it carries
    /// is the client's. A connection from anyone else, or without a header, is closed.
    pub proxy_protocol: bool,
}

/// Header rules of a route, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRulesConfig {
    /// Headers to set (replace or add).
    pub set: Vec<(String, String)>,
    /// Headers to remove.
    pub remove: Vec<String>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Host to match (case-insensitive, port ignored); `None` matches any.
    pub host: Option<String>,
    /// Path prefix to match on segment boundaries; `None` matches any.
    pub path_prefix: Option<String>,
    /// Name of the upstream pool.
    pub upstream: String,
    /// Header rules applied after the defaults.
    pub headers: HeaderRulesConfig,
    /// Idle timeout of this route's tunnels (default: `timeouts.idle`).
    pub idle_timeout: Option<Duration>,
    /// Plain HTTP requests are refused with 426 instead of proxied (default false).
    pub websocket_only: bool,
}

/// How a pool picks its server (`balance`). Whatever it picks first, the other servers follow
/// as fallbacks when a connect fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// `round_robin`: in turn, each server as often as its weight says.
    RoundRobin,
    /// `least_connections` (the default): the server with the fewest open connections for its
    /// weight. Tunnels live for hours, so what counts is how many each server holds now, not
    /// how many it was given.
    LeastConnections,
    /// `consistent_hash`: the same key goes to the same server while the pool's servers stay
    /// the same (a server added or removed moves only its share of keys), with bounded loads:
    /// a server holding more than `load_factor` × its fair share passes a key on to the next.
    ConsistentHash {
        /// What is hashed (`hash_key`).
        key: HashKey,
        /// `hash_load_factor` in hundredths (125 = 1.25: a server takes at most 25% more than
        /// its share of the open connections before keys spill over).
        load_factor: u32,
    },
    /// `random_two`: the less loaded of two servers picked at random (power of two choices:
    /// nearly as even as least connections, without every worker converging on the same one).
    RandomTwo,
}

/// What `consistent_hash` hashes (`hash_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// `client_ip` (the default): the client's address (from the PROXY header when there is one).
    ClientIp,
    /// `path`: the request's path, without its query.
    Path,
    /// `header:NAME`: the value of a request header (absent: the client's address).
    Header(String),
    /// `cookie:NAME`: the value of a cookie (absent: the client's address).
    Cookie(String),
}

/// One server of a pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ServerConfig {
    /// Its address.
    pub addr: SocketAddr,
    /// `weight` (1–256, default 1): its share relative to the others'.
    pub weight: u32,
    /// `max_tunnels`: most connections it is given at once (default: no limit); a pool whose
    /// servers are all full answers 503.
    pub max_tunnels: Option<usize>,
}

/// A server given by DNS name: its addresses are resolved at start and again on their
/// records' TTL; each address is a server of the pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct NamedServer {
    /// The name (lower case, no trailing dot).
    pub host: String,
    /// The port of each of its addresses.
    pub port: u16,
    /// `weight` of each of its addresses.
    pub weight: u32,
    /// `max_tunnels` of each of its addresses.
    pub max_tunnels: Option<usize>,
}

impl NamedServer {
    /// The server at one of its addresses.
    pub fn at(&self, ip: std::net::IpAddr) -> ServerConfig {
        ServerConfig {
            addr: SocketAddr::new(ip, self.port),
            weight: self.weight,
            max_tunnels: self.max_tunnels,
        }
    }
}

/// One entry of a pool's `servers`: an address, or a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEntry {
    /// `IP:port`.
    Addr(ServerConfig),
    /// `name:port`.
    Named(NamedServer),
}

/// A pool's entries split into addresses and names, refusing an address or a name listed
/// twice (a pool must have at least one entry).
pub fn split_servers(
    entries: Vec<ServerEntry>,
) -> Result<(Vec<ServerConfig>, Vec<NamedServer>), String> {
    if entries.is_empty() {
        return Err("no servers".into());
    }
    let (mut addrs, mut names) = (Vec::<ServerConfig>::new(), Vec::<NamedServer>::new());
    for entry in entries {
        match entry {
            ServerEntry::Addr(server) if addrs.iter().any(|s| s.addr == server.addr) => {
                return Err(format!("server {} is listed twice", server.addr));
            }
            ServerEntry::Named(named)
                if names
                    .iter()
                    .any(|n| n.host == named.host && n.port == named.port) =>
            {
                return Err(format!(
                    "server {}:{} is listed twice",
                    named.host, named.port
                ));
            }
            ServerEntry::Addr(server) => addrs.push(server),
            ServerEntry::Named(named) => names.push(named),
        }
    }
    Ok((addrs, names))
}

impl ServerConfig {
    /// A server at `addr` with the defaults (weight 1, no limit).
    pub fn at(addr: SocketAddr) -> ServerConfig {
        ServerConfig {
            addr,
            weight: 1,
            max_tunnels: None,
        }
    }
}

/// One upstream pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Servers by address (with `named`, at least one entry).
    pub servers: Vec<ServerConfig>,
    /// Servers by DNS name: each resolved address is a server (the running pool's servers
    /// are `servers` and those addresses, see `upstream::membership`).
    pub named: Vec<NamedServer>,
    /// Balancing.
    pub balance: Balance,
    /// `slow_start`: a server that comes back (its health check passes again, or its passive
    /// mark expires) gets a growing share of new connections over this long (default 0: its
    /// full share at once), so a fleet's reconnects do not all land on it in a second.
    pub slow_start: Duration,
    /// `send_proxy_protocol = true`: each upstream connection starts with a PROXY v2 header
    /// carrying the client's address (upstream connections are then not kept alive: each
    /// carries one client).
    pub send_proxy_protocol: bool,
    /// `[upstream.NAME.health_check]`: active checks (default: none, passive marking only).
    pub health_check: Option<crate::upstream::health::HealthCheck>,
    /// `[upstream.NAME.rebalance]`: long-lived tunnels move off servers above their share
    /// (default: none; a tunnel stays where it was placed).
    pub rebalance: Option<Rebalance>,
    /// How long a failed server is tried after the healthy ones (0 = never marked; a pool of
    /// one server is never marked).
    pub fail_timeout: Duration,
    /// Idle upstream connections kept for plain HTTP requests, per server and worker
    /// (default 32; 0 = a new connection per request).
    pub keepalive: usize,
    /// How long an idle upstream connection is kept (default 60 s).
    pub keepalive_timeout: Duration,
}

/// `[upstream.NAME.rebalance]`: when a server holds more than its share of a pool's tunnels
/// (servers were added, or one came back), tunnels on it are closed politely (WebSocket Close
/// 1012 "service restart" at a frame boundary) at a bounded rate; their clients reconnect and
/// the balancer places them on the emptier servers. Without it, a server added to a pool of
/// hours-long tunnels stays nearly idle for hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebalance {
    /// `rate`: most tunnels closed per second by this process (default 10), so clients
    /// reconnect as a trickle, never a storm.
    pub per_second: u32,
    /// `tolerance`: a server is over its share when it holds more than `1 + tolerance` times
    /// it (default 0.1), in hundredths (10).
    pub tolerance: u32,
}

/// `[timeouts]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A tunnel without traffic either way for this long is closed (default 60 s).
    pub idle: Duration,
    /// Everything before the tunnel: request head, connect, response head (default 10 s).
    pub handshake: Duration,
    /// One connect attempt (default 5 s).
    pub connect: Duration,
    /// After SIGTERM, how long the proxy goes on accepting while `/readyz` answers 503, so
    /// that load balancers checking it take the host out before its listeners close (default
    /// 0: they close at once); the drain starts after it. Like HAProxy's `grace`.
    pub grace: Duration,
    /// How long tunnels may run after SIGTERM (default 30 s).
    pub drain: Duration,
    /// Tunnels still open this long before the drain's end are closed one by one, evenly over
    /// that window, so a fleet reconnects over seconds rather than in one (default: half of
    /// `drain`; 0: all at the end; at most `drain`).
    pub close_spread: Duration,
    /// Plain HTTP: waiting for the upstream's response head once the request is sent
    /// (default 60 s, like nginx's `proxy_read_timeout`; then 504).
    pub response: Duration,
    /// Plain HTTP: a client connection idle between requests (default 75 s, like nginx's
    /// `keepalive_timeout`; then closed).
    pub keepalive: Duration,
}

/// `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head in bytes (default 16 KiB; beyond → 431).
    pub max_request_head: usize,
    /// Most request headers (default 100; beyond → 431).
    pub max_headers: usize,
    /// Size of one userspace relay buffer (default 64 KiB).
    pub relay_buffer: usize,
    /// Tunnels the kernel splice maps are sized for (default 1,048,576).
    pub max_tunnels: usize,
    /// Kernel path: bytes a tunnel may have redirected but not yet taken in by the reader's
    /// socket before the tunnel leaves the kernel path for the userspace relay, where TCP
    /// throttles its writer (default 16 MiB).
    pub kernel_backlog: usize,
    /// Kernel path: the same, summed over all tunnels of the process; a tunnel that adds to
    /// the backlog beyond it leaves the kernel path too (default 1 GiB).
    pub kernel_backlog_total: usize,
    /// Client connections held at once, any stage (default: no limit); more are closed at once.
    pub max_connections: Option<usize>,
    /// The same per client address (default: no limit).
    pub max_connections_per_ip: Option<usize>,
    /// Largest plain HTTP request body (default: no limit; beyond → 413), like nginx's
    /// `client_max_body_size`.
    pub max_body: Option<u64>,
    /// TLS handshakes in progress per worker (default: no limit); more TLS connections are
    /// closed at once.
    pub max_tls_handshakes: Option<usize>,
}

/// `[admin]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub bind: SocketAddr,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            idle: Duration::from_secs(60),
            handshake: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            grace: Duration::ZERO,
            drain: Duration::from_secs(30),
            close_spread: Duration::from_secs(15),
            response: Duration::from_secs(60),
            keepalive: Duration::from_secs(75),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_request_head: 16 * 1024,
            max_headers: 100,
            relay_buffer: 64 * 1024,
            max_tunnels: 1 << 20,
            kernel_backlog: 16 << 20,
            kernel_backlog_total: 1 << 30,
            max_connections: None,
            max_connections_per_ip: None,
            max_body: None,
            max_tls_handshakes: None,
        }
    }
}

/// A configuration error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when loaded from one.
    pub path: Option<PathBuf>,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}:", path.display())?;
        }
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// An error before its position is turned into line and column.
struct Spot {
    span: Range<usize>,
    message: String,
}

fn spot<T>(value: &Spanned<T>, message: impl Into<String>) -> Spot {
    Spot {
        span: value.span(),
        message: message.into(),
    }
}

impl Config {
    /// Parses configuration text; errors carry line and column.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_in(text, None)
    }

    /// Reads and parses a file; errors carry the path, line and column. Relative paths in the
    /// file are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: Some(path.to_owned()),
            line: 0,
            column: 0,
            message: format!("cannot read the file: {e}"),
        })?;
        Self::parse_in(&text, Some(path)).map_err(|mut e| {
            e.path = Some(path.to_owned());
            e
        })
    }

    fn parse_in(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let locate = |span: Option<Range<usize>>, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_column(text, s.start));
            ConfigError {
                path: None,
                line,
                column,
                message,
            }
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| locate(e.span(), e.message().trim().to_owned()))?;
        let base = path.and_then(Path::parent).unwrap_or(Path::new("."));
        raw.into_config(base)
            .map_err(|s| locate(Some(s.span), s.message))
    }
}

/// Why a header rule may not name `name`.
fn managed_header(name: &str) -> String {
    format!(
        "{name:?} is written by the proxy itself (hop-by-hop, body framing or the Upgrade \
         handshake): a header rule cannot set or remove it"
    )
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workers: Option<Spanned<usize>>,
    #[serde(default)]
    pin_workers: bool,
    user: Option<Spanned<RawAccount>>,
    group: Option<Spanned<RawAccount>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    resolvers: Vec<Spanned<String>>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    upstream: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    kernel: RawKernel,
    #[serde(default)]
    packet: RawPacket,
    admin: Option<RawAdmin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    bind: Spanned<String>,
    tls: Option<Spanned<tls::RawTls>>,
    proxy_protocol: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    upstream: Spanned<String>,
    headers: Option<RawHeaders>,
    idle_timeout: Option<Spanned<String>>,
    websocket_only: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaders {
    #[serde(default)]
    set: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    remove: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    servers: Spanned<Vec<Spanned<RawServer>>>,
    balance: Option<Spanned<String>>,
    hash_key: Option<Spanned<String>>,
    hash_load_factor: Option<Spanned<f64>>,
    slow_start: Option<Spanned<String>>,
    send_proxy_protocol: Option<bool>,
    fail_timeout: Option<Spanned<String>>,
    keepalive: Option<Spanned<usize>>,
    keepalive_timeout: Option<Spanned<String>>,
    health_check: Option<Spanned<RawHealthCheck>>,
    rebalance: Option<Spanned<RawRebalance>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRebalance {
    rate: Option<Spanned<u32>>,
    tolerance: Option<Spanned<f64>>,
}

/// A server: `"10.0.0.1:8080"`, or `{ addr = "10.0.0.1:8080", weight = 2, max_tunnels = 5000 }`
/// (read as a TOML value and picked apart by hand: serde's untagged enums lose the spans and
/// say only that nothing matched).
type RawServer = toml::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    idle: Option<Spanned<String>>,
    handshake: Option<Spanned<String>>,
    connect: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
    drain: Option<Spanned<String>>,
    close_spread: Option<Spanned<String>>,
    response: Option<Spanned<String>>,
    keepalive: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_head: Option<Spanned<RawSize>>,
    max_headers: Option<Spanned<usize>>,
    relay_buffer: Option<Spanned<RawSize>>,
    max_tunnels: Option<Spanned<usize>>,
    kernel_backlog: Option<Spanned<RawSize>>,
    kernel_backlog_total: Option<Spanned<RawSize>>,
    max_connections: Option<Spanned<usize>>,
    max_connections_per_ip: Option<Spanned<usize>>,
    max_body: Option<Spanned<RawSize>>,
    max_tls_handshakes: Option<Spanned<usize>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPacket {
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    ports: Option<Spanned<String>>,
    linger: Option<Spanned<String>>,
    pin: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKernel {
    promote_after: Option<Spanned<String>>,
    promote_after_bytes: Option<Spanned<RawSize>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

/// `user` / `group`: a name or a numeric id.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAccount {
    Id(i64),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Spanned<String>,
}

impl RawConfig {
    fn into_config(self, base: &Path) -> Result<Config, Spot> {
        if self.listener.is_empty() {
            return Err(Spot {
                span: 0..0,
                message: "no [[listener]]: at least one is needed".into(),
            });
        }
        if self.route.is_empty() {
            return Err(Spot {
                span: 0..0,
                message: "no [[route]]: at least one is needed".into(),
            });
        }
        let mut listeners: Vec<ListenerConfig> = Vec::new();
        for raw in &self.listener {
            let listener = raw.get_ref().to_config(base)?;
            if listeners.iter().any(|l| l.bind == listener.bind) {
                return Err(spot(
                    &raw.get_ref().bind,
                    format!("listener {} is defined twice", listener.bind),
                ));
            }
            listeners.push(listener);
        }
        let mut upstreams = BTreeMap::new();
        for (name, raw) in &self.upstream {
            upstreams.insert(name.clone(), raw.get_ref().to_config(name)?);
        }
        let routes = self
            .route
            .iter()
            .map(|raw| raw.get_ref().to_config(&upstreams))
            .collect::<Result<Vec<_>, _>>()?;
        let workers = match self.workers {
            Some(w) if *w.get_ref() == 0 || *w.get_ref() > MAX_WORKERS => {
                return Err(spot(
                    &w,
                    format!("workers must be between 1 and {MAX_WORKERS}"),
                ))
            }
            other => other.map(Spanned::into_inner),
        };
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .map(|range| {
                range
                    .get_ref()
                    .parse::<Cidr>()
                    .map_err(|error| spot(range, format!("trusted_proxies: {error}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if trusted_proxies.is_empty() {
            let expecting = self.listener.iter().find_map(|raw| {
                raw.get_ref()
                    .proxy_protocol
                    .as_ref()
                    .filter(|on| *on.get_ref())
            });
            if let Some(on) = expecting {
                return Err(spot(
                    on,
                    "proxy_protocol needs trusted_proxies: the addresses of the load balancers \
                     that may send the header (from anyone else it would be a forged client address)",
                ));
            }
        }
        let resolvers = self
            .resolvers
            .iter()
            .map(parse_addr)
            .collect::<Result<Vec<_>, _>>()?;
        let run_as = match (&self.user, &self.group) {
            (None, None) => None,
            (None, Some(group)) => {
                return Err(spot(
                    group,
                    "group without user: set `user` too (the group alone is not switched)",
                ))
            }
            (Some(user), group) => Some(RunAs {
                user: parse_account(user, "user")?,
                group: group
                    .as_ref()
                    .map(|group| parse_account(group, "group"))
                    .transpose()?,
            }),
        };
        Ok(Config {
            listeners,
            routes,
            upstreams,
            timeouts: self.timeouts.to_config()?,
            limits: self.limits.to_config()?,
            splicing: self.kernel.to_config()?,
            packet: self.packet.to_config()?,
            admin: self
                .admin
                .map(|admin| parse_addr(&admin.bind).map(|bind| AdminConfig { bind }))
                .transpose()?,
            workers,
            pin_workers: self.pin_workers,
            trusted_proxies,
            resolvers,
            run_as,
        })
    }
}

impl RawListener {
    fn to_config(&self, base: &Path) -> Result<ListenerConfig, Spot> {
        let bind = parse_addr(&self.bind)?;
        let tls = self
            .tls
            .as_ref()
            .map(|tls| tls.get_ref().to_config(base))
            .transpose()?;
        Ok(ListenerConfig {
            bind,
            tls,
            proxy_protocol: self.proxy_protocol.as_ref().is_some_and(|on| *on.get_ref()),
        })
    }
}

impl RawRoute {
    fn to_config(&self, upstreams: &BTreeMap<String, UpstreamConfig>) -> Result<RouteConfig, Spot> {
        let upstream = self.upstream.get_ref();
        if !upstreams.contains_key(upstream) {
            return Err(spot(
                &self.upstream,
                format!("route upstream {upstream:?} is not defined in [upstream]"),
            ));
        }
        if let Some(prefix) = &self.path_prefix {
            if !prefix.get_ref().starts_with('/') {
                return Err(spot(prefix, "path_prefix must start with '/'"));
            }
        }
        let mut headers = HeaderRulesConfig::default();
        if let Some(raw) = &self.headers {
            for (name, value) in &raw.set {
                if !is_token(name) {
                    return Err(spot(value, format!("{name:?} is not a valid header name")));
                }
                if crate::headers::managed_by_the_proxy(name) {
                    return Err(spot(value, managed_header(name)));
                }
                // A field value is visible characters, SP and HTAB (RFC 9110 §5.5): a NUL or
                // another control character would make the upstream refuse every request.
                if value.get_ref().chars().any(|c| c.is_control() && c != '\t') {
                    return Err(spot(
                        value,
                        "header values cannot contain CR or LF, nor other control characters but tab",
                    ));
                }
                headers.set.push((name.clone(), value.get_ref().clone()));
            }
            for name in &raw.remove {
                if !is_token(name.get_ref()) {
                    return Err(spot(
                        name,
                        format!("{:?} is not a valid header name", name.get_ref()),
                    ));
                }
                if crate::headers::managed_by_the_proxy(name.get_ref()) {
                    return Err(spot(name, managed_header(name.get_ref())));
                }
                headers.remove.push(name.get_ref().clone());
            }
        }
        Ok(RouteConfig {
            host: self.host.as_ref().map(|h| h.get_ref().clone()),
            path_prefix: self.path_prefix.as_ref().map(|p| p.get_ref().clone()),
            upstream: upstream.clone(),
            headers,
            idle_timeout: self
                .idle_timeout
                .as_ref()
                .map(parse_nonzero_duration)
                .transpose()?,
            websocket_only: self.websocket_only.unwrap_or(false),
        })
    }
}

impl RawUpstream {
    fn to_config(&self, name: &str) -> Result<UpstreamConfig, Spot> {
        if self.servers.get_ref().is_empty() {
            return Err(spot(
                &self.servers,
                format!("upstream {name:?} has no servers"),
            ));
        }
        let entries = self
            .servers
            .get_ref()
            .iter()
            .map(raw_server)
            .collect::<Result<Vec<_>, _>>()?;
        let (servers, named) = split_servers(entries)
            .map_err(|why| spot(&self.servers, format!("upstream {name:?}: {why}")))?;
        let balance = self.balance()?;
        let rebalance = self.rebalance(&balance)?;
        let fail_timeout = match &self.fail_timeout {
            Some(d) => parse_duration(d)?,
            None => Duration::from_secs(10),
        };
        let keepalive = match &self.keepalive {
            Some(count) if *count.get_ref() > MAX_IDLE_UPSTREAMS => {
                return Err(spot(
                    count,
                    format!("keepalive must be at most {MAX_IDLE_UPSTREAMS}"),
                ))
            }
            Some(count) => *count.get_ref(),
            None => DEFAULT_IDLE_UPSTREAMS,
        };
        let keepalive_timeout = match &self.keepalive_timeout {
            Some(d) => parse_nonzero_duration(d)?,
            None => Duration::from_secs(60),
        };
        Ok(UpstreamConfig {
            servers,
            named,
            balance,
            slow_start: self
                .slow_start
                .as_ref()
                .map_or(Ok(Duration::ZERO), parse_duration)?,
            send_proxy_protocol: self.send_proxy_protocol.unwrap_or(false),
            health_check: self
                .health_check
                .as_ref()
                .map(|check| check.get_ref().to_config())
                .transpose()?
                .map(|check| HealthCheck {
                    send_proxy_header: self.send_proxy_protocol.unwrap_or(false),
                    ..check
                }),
            rebalance,
            fail_timeout,
            keepalive,
            keepalive_timeout,
        })
    }

    /// `[upstream.NAME.rebalance]`, which hashing pools cannot take (a client that reconnects
    /// hashes to the server it left).
    fn rebalance(&self, balance: &Balance) -> Result<Option<Rebalance>, Spot> {
        let Some(raw) = &self.rebalance else {
            return Ok(None);
        };
        if matches!(balance, Balance::ConsistentHash { .. }) {
            return Err(spot(
                raw,
                "rebalance does not go with consistent_hash: a client that reconnects hashes \
                 to the server it left",
            ));
        }
        let raw = raw.get_ref();
        let per_second = match &raw.rate {
            None => 10,
            Some(rate) if (1..=100_000).contains(rate.get_ref()) => *rate.get_ref(),
            Some(rate) => {
                return Err(spot(
                    rate,
                    "rate must be between 1 and 100000 tunnels a second",
                ))
            }
        };
        let tolerance = match &raw.tolerance {
            None => 10,
            Some(t) if (0.0..=10.0).contains(t.get_ref()) => (t.get_ref() * 100.0).round() as u32,
            Some(t) => return Err(spot(t, "tolerance must be between 0.0 and 10.0")),
        };
        Ok(Some(Rebalance {
            per_second,
            tolerance,
        }))
    }

    /// `balance`, with `hash_key` and `hash_load_factor` (which only `consistent_hash` takes).
    fn balance(&self) -> Result<Balance, Spot> {
        let name = self.balance.as_ref().map(|b| b.get_ref().as_str());
        let hashing = name == Some("consistent_hash");
        if !hashing {
            if let Some(key) = &self.hash_key {
                return Err(spot(key, "hash_key is for balance = \"consistent_hash\""));
            }
            if let Some(factor) = &self.hash_load_factor {
                return Err(spot(
                    factor,
                    "hash_load_factor is for balance = \"consistent_hash\"",
                ));
            }
        }
        Ok(match name {
            None | Some("least_connections") => Balance::LeastConnections,
            Some("round_robin") => Balance::RoundRobin,
            Some("random_two") => Balance::RandomTwo,
            Some("consistent_hash") => Balance::ConsistentHash {
                key: self
                    .hash_key
                    .as_ref()
                    .map_or(Ok(HashKey::ClientIp), parse_hash_key)?,
                load_factor: match &self.hash_load_factor {
                    None => DEFAULT_HASH_LOAD_FACTOR,
                    Some(factor) if (1.0..=100.0).contains(factor.get_ref()) => {
                        (factor.get_ref() * 100.0).round() as u32
                    }
                    Some(factor) => {
                        return Err(spot(
                            factor,
                            "hash_load_factor must be between 1.0 (no server above its share) and 100.0",
                        ))
                    }
                },
            },
            Some(other) => {
                let span = self.balance.as_ref().map_or(0..0, |b| b.span());
                return Err(Spot {
                    span,
                    message: format!(
                        "balance {other:?} is not known: \"least_connections\" (the default), \
                         \"round_robin\", \"consistent_hash\" or \"random_two\""
                    ),
                });
            }
        })
    }
}

/// `hash_load_factor` by default (1.25, in hundredths): the bound of the bounded-load
/// consistent hashing paper's examples.
const DEFAULT_HASH_LOAD_FACTOR: u32 = 125;
/// Largest server `weight`.
const MAX_WEIGHT: u32 = 256;

/// One entry of `servers`.
fn raw_server(raw: &Spanned<RawServer>) -> Result<ServerEntry, Spot> {
    server_from_value(raw.get_ref()).map_err(|why| spot(raw, why))
}

/// A server entry as TOML (or JSON turned into TOML) gives it: `"IP:port"`, `"name:port"`, or
/// a table of `addr`, `weight` and `max_tunnels`. The config file and `PUT /upstreams/NAME`
/// read entries through this one function.
pub fn server_from_value(value: &toml::Value) -> Result<ServerEntry, String> {
    match value {
        toml::Value::String(text) => server_entry(text, None, None),
        toml::Value::Table(table) => {
            if let Some(key) = table
                .keys()
                .find(|key| !["addr", "weight", "max_tunnels"].contains(&key.as_str()))
            {
                return Err(format!(
                    "unknown key {key:?} in a server (addr, weight, max_tunnels)"
                ));
            }
            let addr = table
                .get("addr")
                .and_then(toml::Value::as_str)
                .ok_or("a server table needs addr = \"IP:port\"")?;
            let number = |key: &str| -> Result<Option<u64>, String> {
                match table.get(key) {
                    None => Ok(None),
                    Some(value) => value
                        .as_integer()
                        .and_then(|n| u64::try_from(n).ok())
                        .map(Some)
                        .ok_or_else(|| format!("{key} must be a positive integer")),
                }
            };
            let weight = number("weight")?.map(|w| u32::try_from(w).unwrap_or(u32::MAX));
            let max_tunnels =
                number("max_tunnels")?.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
            server_entry(addr, weight, max_tunnels)
        }
        _ => Err(
            "a server is \"IP:port\", \"name:port\" or { addr = …, weight = …, max_tunnels = … }"
                .into(),
        ),
    }
}

/// A server entry from its parts, as the config file and the admin endpoint give them: `at`
/// is `IP:port` or `name:port`, `weight` 1–256 (default 1), `max_tunnels` at least 1 (default:
/// no limit).
pub fn server_entry(
    at: &str,
    weight: Option<u32>,
    max_tunnels: Option<usize>,
) -> Result<ServerEntry, String> {
    let weight = weight.map_or(Ok(1), check_weight)?;
    if let Some(max) = max_tunnels {
        check_max_tunnels(max)?;
    }
    if let Ok(addr) = at.parse::<SocketAddr>() {
        return Ok(ServerEntry::Addr(ServerConfig {
            addr,
            weight,
            max_tunnels,
        }));
    }
    let wrong = || {
        format!(
            "{at:?} is neither IP:port nor name:port (e.g. \"127.0.0.1:8080\", \"app.internal:8080\")"
        )
    };
    let (host, port) = at.rsplit_once(':').ok_or_else(wrong)?;
    let port: u16 = port.parse().ok().filter(|&p| p != 0).ok_or_else(wrong)?;
    if !is_host_name(host) {
        return Err(wrong());
    }
    Ok(ServerEntry::Named(NamedServer {
        host: host.trim_end_matches('.').to_ascii_lowercase(),
        port,
        weight,
        max_tunnels,
    }))
}

/// A DNS name: dot-separated labels of letters, digits, `-` and `_`, each 1–63 bytes, at most
/// 253 in all (a trailing dot allowed), the last one starting with a letter (top-level domains
/// do, RFC 3696 §2: so a mistyped address such as `10.0.0.300` or `513.0.0x1` is refused, not
/// looked up).
fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && host
            .rsplit('.')
            .next()
            .and_then(|last| last.bytes().next())
            .is_some_and(|first| first.is_ascii_alphabetic())
}

fn check_weight(weight: u32) -> Result<u32, String> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(weight)
    } else {
        Err(format!("weight must be between 1 and {MAX_WEIGHT}"))
    }
}

fn check_max_tunnels(max: usize) -> Result<(), String> {
    if max == 0 {
        return Err("max_tunnels must be at least 1 (leave it out: no limit)".into());
    }
    Ok(())
}

/// `hash_key`: `client_ip`, `path`, `header:NAME` or `cookie:NAME`.
fn parse_hash_key(value: &Spanned<String>) -> Result<HashKey, Spot> {
    let text = value.get_ref();
    let named = |prefix: &str| {
        text.strip_prefix(prefix)
            .filter(|name| is_token(name))
            .map(str::to_owned)
    };
    match text.as_str() {
        "client_ip" => Ok(HashKey::ClientIp),
        "path" => Ok(HashKey::Path),
        _ => {
            if let Some(name) = named("header:") {
                Ok(HashKey::Header(name))
            } else if let Some(name) = named("cookie:") {
                Ok(HashKey::Cookie(name))
            } else {
                Err(spot(
                    value,
                    format!(
                        "hash_key {text:?} is not known: \"client_ip\", \"path\", \
                         \"header:NAME\" or \"cookie:NAME\""
                    ),
                ))
            }
        }
    }
}

impl RawHealthCheck {
    fn to_config(&self) -> Result<HealthCheck, Spot> {
        let text = |value: &Option<Spanned<String>>, default: &str| {
            value
                .as_ref()
                .map_or_else(|| default.to_owned(), |v| v.get_ref().clone())
        };
        let path = text(&self.path, "/");
        if let Some(raw) = &self.path {
            if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                return Err(spot(
                    raw,
                    "path must start with '/' and have no spaces or control characters",
                ));
            }
        }
        let host = text(&self.host, "localhost");
        if let Some(raw) = &self.host {
            if host.is_empty() || host.chars().any(|c| c.is_control() || c == ' ') {
                return Err(spot(
                    raw,
                    "host must be a Host header value: no spaces or control characters",
                ));
            }
        }
        let kind = match self.kind.as_ref().map(|k| k.get_ref().as_str()) {
            None | Some("tcp") => ProbeKind::Tcp,
            Some("http") => ProbeKind::Http { path, host },
            Some("websocket") => ProbeKind::WebSocket { path, host },
            Some(other) => {
                let span = self.kind.as_ref().map_or(0..0, |k| k.span());
                return Err(Spot {
                    span,
                    message: format!(
                        "health_check kind {other:?} is not known: \"tcp\", \"http\" or \"websocket\""
                    ),
                });
            }
        };
        let count = |value: &Option<Spanned<u32>>, default: u32| match value {
            None => Ok(default),
            Some(v) if (1..=100).contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(spot(v, "must be between 1 and 100")),
        };
        let interval = self
            .interval
            .as_ref()
            .map_or(Ok(Duration::from_secs(2)), parse_nonzero_duration)?;
        // Left out, the timeout is 1 s, or the interval if that is shorter.
        let timeout = self.timeout.as_ref().map_or(
            Ok(Duration::from_secs(1).min(interval)),
            parse_nonzero_duration,
        )?;
        if let Some(raw) = &self.timeout {
            if timeout > interval {
                return Err(spot(raw, "timeout must be at most the interval"));
            }
        }
        Ok(HealthCheck {
            kind,
            interval,
            timeout,
            rise: count(&self.rise, 2)?,
            fall: count(&self.fall, 3)?,
            send_proxy_header: false,
        })
    }
}

impl RawTimeouts {
    fn to_config(&self) -> Result<Timeouts, Spot> {
        let defaults = Timeouts::default();
        let or = |value: &Option<Spanned<String>>, default: Duration| {
            value.as_ref().map_or(Ok(default), parse_nonzero_duration)
        };
        let drain = self
            .drain
            .as_ref()
            .map_or(Ok(defaults.drain), parse_duration)?;
        let close_spread = match &self.close_spread {
            None => drain / 2,
            Some(value) => {
                let spread = parse_duration(value)?;
                if spread > drain {
                    return Err(spot(
                        value,
                        "close_spread is a window at the end of the drain: at most `drain`",
                    ));
                }
                spread
            }
        };
        Ok(Timeouts {
            idle: or(&self.idle, defaults.idle)?,
            handshake: or(&self.handshake, defaults.handshake)?,
            connect: or(&self.connect, defaults.connect)?,
            grace: self
                .grace
                .as_ref()
                .map_or(Ok(defaults.grace), parse_duration)?,
            drain,
            close_spread,
            response: or(&self.response, defaults.response)?,
            keepalive: or(&self.keepalive, defaults.keepalive)?,
        })
    }
}

impl RawLimits {
    fn to_config(&self) -> Result<Limits, Spot> {
        let defaults = Limits::default();
        let size = |value: &Option<Spanned<RawSize>>, default: usize, min: usize, max: usize| {
            let Some(value) = value else {
                return Ok(default);
            };
            let bytes = parse_size(value)?;
            if bytes < min || bytes > max {
                return Err(spot(
                    value,
                    format!("must be between {min} and {max} bytes"),
                ));
            }
            Ok(bytes)
        };
        let count =
            |value: &Option<Spanned<usize>>, default: usize, min: usize, max: usize| match value {
                None => Ok(default),
                Some(v) if *v.get_ref() < min || *v.get_ref() > max => {
                    Err(spot(v, format!("must be between {min} and {max}")))
                }
                Some(v) => Ok(*v.get_ref()),
            };
        Ok(Limits {
            max_request_head: size(
                &self.max_request_head,
                defaults.max_request_head,
                256,
                1 << 20,
            )?,
            max_headers: count(&self.max_headers, defaults.max_headers, 8, 1000)?,
            relay_buffer: size(&self.relay_buffer, defaults.relay_buffer, 1024, 16 << 20)?,
            max_tunnels: count(&self.max_tunnels, defaults.max_tunnels, 1, 1 << 30)?,
            kernel_backlog: size(
                &self.kernel_backlog,
                defaults.kernel_backlog,
                1 << 20,
                1 << 30,
            )?,
            kernel_backlog_total: size(
                &self.kernel_backlog_total,
                defaults.kernel_backlog_total,
                1 << 20,
                1 << 40,
            )?,
            // Left out: no limit.
            max_connections: self
                .max_connections
                .as_ref()
                .map(|_| count(&self.max_connections, 0, 1, usize::MAX))
                .transpose()?,
            max_connections_per_ip: self
                .max_connections_per_ip
                .as_ref()
                .map(|_| count(&self.max_connections_per_ip, 0, 1, usize::MAX))
                .transpose()?,
            max_body: self
                .max_body
                .as_ref()
                .map(parse_size)
                .transpose()?
                .map(|bytes| bytes as u64),
            max_tls_handshakes: self
                .max_tls_handshakes
                .as_ref()
                .map(|_| count(&self.max_tls_handshakes, 0, 1, usize::MAX))
                .transpose()?,
        })
    }
}

impl RawPacket {
    fn to_config(&self) -> Result<PacketConfig, Spot> {
        let mut config = PacketConfig::default();
        for name in &self.interfaces {
            let valid = !name.get_ref().is_empty()
                && name.get_ref().len() < 16
                && !name.get_ref().contains(['/', ' ', '\0']);
            if !valid {
                return Err(spot(name, "not an interface name"));
            }
            config.interfaces.push(name.get_ref().clone());
        }
        if let Some(ports) = &self.ports {
            config.ports = ports.get_ref().parse().map_err(
                |error: crate::splice::packet::ports::PortRangeError| {
                    spot(ports, error.to_string())
                },
            )?;
        }
        if let Some(linger) = &self.linger {
            config.linger = parse_duration(linger)?;
        }
        if let Some(pin) = &self.pin {
            if !pin.get_ref().starts_with('/') {
                return Err(spot(
                    pin,
                    "an absolute path on a bpffs, e.g. /sys/fs/bpf/wsplice",
                ));
            }
            config.pin = Some(PathBuf::from(pin.get_ref()));
        }
        Ok(config)
    }
}

impl RawKernel {
    fn to_config(&self) -> Result<Splicing, Spot> {
        let after = match &self.promote_after {
            Some(value) => parse_duration(value)?,
            None => DEFAULT_PROMOTE_AFTER,
        };
        let after_bytes = match &self.promote_after_bytes {
            Some(value) => parse_size(value)? as u64,
            None => DEFAULT_PROMOTE_AFTER_BYTES,
        };
        Ok(Splicing::Promote { after, after_bytes })
    }
}

#[cfg(test)]
mod tests;
