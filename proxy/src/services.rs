//! What every worker shares, built from the config: routes, upstream pools, limits, the TLS
//! configurations of the listeners.
//!
//! Read-mostly: workers hold an `Arc<Services>`; the only mutable parts are the pools' atomics.
//! A reload builds the next generation ([`Services::successor`]); each connection keeps the
//! generation it was accepted under, so its route and pool indices stay meaningful.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use crate::cidr::Cidr;
use crate::clock::duration_ns;
use crate::config::{Config, RouteConfig, Splicing};
use crate::handshake::HeadLimits;
use crate::headers::HeaderRules;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::splice::SpliceProgram;
use crate::tls::ServerConfigs;
use crate::upstream::Pool;

/// Limit on the upstream's response head: generous, it comes from a server we trust more.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Header count limit on the upstream's response head.
const MAX_RESPONSE_HEADERS: usize = 128;

/// A route ready for use: its pool, header rules and idle timeout.
#[derive(Debug)]
pub struct Route {
    /// What it matches (Host, path prefix): how a reload finds the same route in the next
    /// generation.
    pub matches: (Option<String>, Option<String>),
    /// Index into [`Services::pools`].
    pub pool: usize,
    /// Header set/remove rules applied after the default rewriting.
    pub rules: HeaderRules,
    /// Idle timeout of tunnels on this route, in ns.
    pub idle_ns: u64,
    /// Plain HTTP requests on this route are refused (426) instead of proxied.
    pub websocket_only: bool,
}

/// When a tunnel relayed in userspace has earned the kernel path (`[kernel]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promotion {
    /// It has been open this long (ns)...
    pub after_ns: u64,
    /// ...or has relayed this many bytes, both ways together.
    pub after_bytes: u64,
}

/// Routes, pools and limits shared by all workers.
#[derive(Debug)]
pub struct Services {
    /// Chooses a route from Host and path.
    pub router: Router,
    /// The routes, in config order (indices from `router`).
    pub routes: Vec<Route>,
    /// Upstream pools.
    pub pools: Vec<Pool>,
    /// How many connections are taken, in all and per client address (one count for every
    /// generation: connections of all of them are open at once).
    pub admission: Arc<Admission>,
    /// Peers whose forwarding headers are passed on (`trusted_proxies`).
    pub trusted_proxies: Vec<Cidr>,
    /// Limits on the client's request head.
    pub request_limits: HeadLimits,
    /// TLS handshakes a worker runs at once (beyond: new TLS connections are closed).
    pub max_tls_handshakes: Option<usize>,
    /// Plain HTTP: the largest request body passed on (beyond: 413).
    pub max_body: Option<u64>,
    /// Limits on the upstream's response head.
    pub response_limits: HeadLimits,
    /// Deadline for everything before the tunnel (request, connect, response), in ns.
    pub handshake_ns: u64,
    /// Plain HTTP: how long the upstream's answer head may take once the request is sent.
    pub response_ns: u64,
    /// Plain HTTP: how long a client connection may idle between requests.
    pub keepalive_ns: u64,
    /// Deadline for one connect attempt.
    pub connect_timeout: Duration,
    /// Size of one relay buffer (one per direction while bytes are in flight).
    pub relay_buffer: usize,
    /// After a termination signal, how long the listeners keep accepting while `/readyz`
    /// answers 503.
    pub grace: Duration,
    /// How long tunnels may run after shutdown began.
    pub drain: Duration,
    /// The window at the drain's end over which the tunnels still open are closed one by one.
    pub close_spread: Duration,
    /// Kernel path: backlog beyond which a tunnel is closed as a slow consumer.
    pub kernel_backlog: u64,
    /// Kernel path: the same, over all tunnels of the process.
    pub kernel_backlog_total: u64,
    /// Kernel path: when a relayed plain tunnel is promoted to the kernel; `None`: plain
    /// tunnels are spliced right after the 101.
    pub promotion: Option<Promotion>,
    /// Process-wide counters.
    pub metrics: Arc<Metrics>,
    /// Plain HTTP: give an access line per request (false when the log filter drops them).
    pub access_lines: bool,
    /// The loaded sockmap program when plain tunnels go to the kernel path (each worker opens
    /// its own handle on the maps).
    pub splice: Option<Arc<SpliceProgram>>,
    /// The packet splice when plain tunnels go to it (`--datapath packet`).
    pub packet: Option<crate::splice::packet::SharedPacketPath>,
    /// The listeners of this generation: where new connections are accepted, and how.
    pub listeners: Vec<ServedListener>,
    /// Mixed into each connection's id for its access lines (random per process, so lines of
    /// several processes and restarts do not share ids).
    pub log_ids: u64,
}

/// A listener as a generation serves it.
#[derive(Debug, Clone)]
pub struct ServedListener {
    /// Its address (each worker has its own socket bound to it).
    pub bind: std::net::SocketAddr,
    /// Its TLS configuration (`None`: `ws://`); a reload may change it.
    pub tls: Option<Arc<ServerConfigs>>,
    /// Connections begin with a PROXY protocol header (`proxy_protocol`).
    pub proxy_protocol: bool,
}

impl Services {
    /// The idle timeout this generation gives tunnels of `route` (a route of another
    /// generation): that of the route matching the same Host and path prefix, or, with none,
    /// `None`.
    pub fn idle_ns_like(&self, route: &Route) -> Option<u64> {
        self.routes
            .iter()
            .find(|candidate| candidate.matches == route.matches)
            .map(|candidate| candidate.idle_ns)
    }

    /// The listener at `bind` as this generation serves it (`None`: one it no longer serves).
    pub fn listener(&self, bind: std::net::SocketAddr) -> Option<&ServedListener> {
        self.listeners.iter().find(|listener| listener.bind == bind)
    }
}

impl Services {
    /// Builds the shared services from a validated config.
    pub fn new(config: &Config, splice: Option<Arc<SpliceProgram>>) -> Services {
        Services::with_metrics(config, splice, Arc::default())
    }

    /// The same, counting into `metrics`, whose registry keeps each upstream server's state
    /// from one generation to the next.
    fn with_metrics(
        config: &Config,
        splice: Option<Arc<SpliceProgram>>,
        metrics: Arc<Metrics>,
    ) -> Services {
        let pools: Vec<Pool> = config
            .upstreams
            .iter()
            .map(|(name, upstream)| Pool::new(name, upstream, &metrics.upstreams))
            .collect();
        metrics.upstreams.publish(&pools);
        let routes = config
            .routes
            .iter()
            .map(|route| Route::new(route, &pools, config.timeouts.idle))
            .collect();
        Services {
            router: Router::new(&config.routes),
            routes,
            pools,
            admission: Arc::new(Admission::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
            )),
            trusted_proxies: config.trusted_proxies.clone(),
            request_limits: HeadLimits {
                max_bytes: config.limits.max_request_head,
                max_headers: config.limits.max_headers,
            },
            max_body: config.limits.max_body,
            max_tls_handshakes: config.limits.max_tls_handshakes,
            response_limits: HeadLimits {
                max_bytes: MAX_RESPONSE_HEAD,
                max_headers: MAX_RESPONSE_HEADERS,
            },
            handshake_ns: duration_ns(config.timeouts.handshake),
            response_ns: duration_ns(config.timeouts.response),
            keepalive_ns: duration_ns(config.timeouts.keepalive),
            connect_timeout: config.timeouts.connect,
            relay_buffer: config.limits.relay_buffer,
            grace: config.timeouts.grace,
            drain: config.timeouts.drain,
            close_spread: config.timeouts.close_spread,
            kernel_backlog: config.limits.kernel_backlog as u64,
            kernel_backlog_total: config.limits.kernel_backlog_total as u64,
            promotion: match config.splicing {
                Splicing::AtOnce => None,
                Splicing::Promote { after, after_bytes } => Some(Promotion {
                    after_ns: duration_ns(after),
                    after_bytes,
                }),
            },
            metrics,
            access_lines: true,
            splice,
            packet: None,
            listeners: Vec::new(),
            log_ids: random_u64(),
        }
    }

    /// The next generation, from a reloaded config and the listeners it serves: what lives as
    /// long as the process (counters, admission counts, the kernel program) is carried over;
    /// routes, pools, header rules, timeouts, listeners and certificates are the new ones.
    /// Settings that size what is already running are kept (see `runtime::reload`).
    pub fn successor(&self, config: &Config, listeners: Vec<ServedListener>) -> Services {
        let mut next =
            Services::with_metrics(config, self.splice.clone(), Arc::clone(&self.metrics));
        next.admission = Arc::clone(&self.admission);
        next.access_lines = self.access_lines;
        next.relay_buffer = self.relay_buffer;
        next.promotion = self.promotion;
        next.packet = self.packet.clone();
        next.listeners = listeners;
        next.log_ids = self.log_ids;
        next
    }
}

/// A random number from the standard library's per-process hash keys (no other source of
/// randomness is needed for it: it only keeps ids of different processes apart).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(crate::clock::monotonic_ns());
    hasher.finish()
}

impl Route {
    fn new(route: &RouteConfig, pools: &[Pool], default_idle: Duration) -> Route {
        // The config loader rejects routes naming an undefined upstream, so the lookup succeeds;
        // position 0 is a harmless fallback that cannot be reached with a validated config.
        let pool = pools
            .iter()
            .position(|pool| pool.name() == route.upstream)
            .unwrap_or(0);
        Route {
            matches: (route.host.clone(), route.path_prefix.clone()),
            pool,
            rules: HeaderRules {
                set: route.headers.set.clone(),
                remove: route.headers.remove.clone(),
            },
            idle_ns: duration_ns(route.idle_timeout.unwrap_or(default_idle)),
            websocket_only: route.websocket_only,
        }
    }
}
