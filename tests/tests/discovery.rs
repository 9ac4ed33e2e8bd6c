//! Pools whose servers change while the proxy runs, as a user sees them: servers given by DNS
//! name, servers set through the admin endpoint, and rebalancing.
//!
//! The names are answered by a small authoritative DNS server of this file ([`Dns`], UDP on
//! 127.0.0.1) whose records a test changes at run time, and which can also answer SERVFAIL or
//! stop answering; the proxy asks it through `resolvers = ["127.0.0.1:PORT"]`. The upstreams
//! are `wsplice echo` processes on several loopback addresses with one port (127.0.0.2:P,
//! 127.0.0.3:P, …: all of 127.0.0.0/8 is loopback on Linux), so a name with several addresses
//! is several servers, and each echo's record of handshakes says which server a tunnel reached.
//!
//! Covered:
//! - a name with two addresses is two servers: `GET /upstreams` lists both and least
//!   connections spreads tunnels over them;
//! - a name is resolved again when its TTL runs out: the pool follows the new records within
//!   seconds, new tunnels reach the new server, and tunnels open on a removed one go on;
//! - a failed resolution (SERVFAIL) keeps the last addresses; a name that no longer exists
//!   (NXDOMAIN) leaves its pool, whose upgrades then get 503 while open tunnels go on;
//! - a DNS outage (queries dropped until the resolver times out) keeps the last addresses and
//!   tunnels keep connecting; once DNS answers again the new records apply;
//! - a name that does not resolve at start: the proxy starts all the same, answers 503, and
//!   serves once the name appears;
//! - `PUT /upstreams/default`: bad bodies get 400 with the reason, an unknown pool 409, a good
//!   body (addresses, a table with a weight, a name) moves new connections to those servers, a
//!   reload of the same file keeps them, a file with another list wins;
//! - rebalancing on both data paths: a second server added to a pool of 20 held tunnels gets
//!   half of them within seconds, moved by Close 1012 at the configured rate, each move counted
//!   in `wsplice_tunnels_rebalanced_total` and each reconnected tunnel echoing.
//!
//! Two tests are ignored: they show what the proxy does not do yet (see their reasons).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use wsplice_tests::*;

/// The name most tests resolve.
const NAME: &str = "app.wsplice.test";

// ---- a tiny authoritative DNS server ----

/// How the test DNS server treats queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers from its records: A records of a known name, NOERROR without records for its
    /// other types, NXDOMAIN for an unknown name.
    Answer,
    /// Answers SERVFAIL to everything (a broken resolver).
    ServFail,
    /// Drops every query (an outage): the proxy's resolver times out.
    Drop,
}

/// The records and counters the server thread and the test share.
#[derive(Debug)]
struct Zone {
    /// Name (lower case, no trailing dot) → its IPv4 addresses and their TTL in seconds.
    records: HashMap<String, (Vec<Ipv4Addr>, u32)>,
    mode: Mode,
    /// Queries received per name (answered or not).
    queries: HashMap<String, usize>,
}

/// An authoritative DNS server on 127.0.0.1 (UDP), served by a thread until dropped.
struct Dns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Dns {
    /// Starts one with no records, answering.
    fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the DNS socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("addr");
        let zone = Arc::new(Mutex::new(Zone {
            records: HashMap::new(),
            mode: Mode::Answer,
            queries: HashMap::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (served, stopped) = (Arc::clone(&zone), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("test-dns".into())
            .spawn(move || serve_dns(&socket, &served, &stopped))
            .expect("spawn the DNS thread");
        Dns {
            addr,
            zone,
            stop,
            thread: Some(thread),
        }
    }

    /// The config's top-level key that points the proxy at it.
    fn resolvers(&self) -> String {
        format!("resolvers = [\"{}\"]", self.addr)
    }

    fn zone(&self) -> std::sync::MutexGuard<'_, Zone> {
        self.zone
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `name` has the A records `ips` with `ttl` seconds from now on.
    fn set(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        self.zone()
            .records
            .insert(name.to_ascii_lowercase(), (ips.to_vec(), ttl));
    }

    /// `name` no longer exists (NXDOMAIN).
    fn remove(&self, name: &str) {
        self.zone().records.remove(&name.to_ascii_lowercase());
    }

    fn set_mode(&self, mode: Mode) {
        self.zone().mode = mode;
    }

    /// Queries received for `name` so far.
    fn queries(&self, name: &str) -> usize {
        self.zone().queries.get(name).copied().unwrap_or(0)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The server thread: one datagram at a time until `stop`.
fn serve_dns(socket: &UdpSocket, zone: &Mutex<Zone>, stop: &AtomicBool) {
    let mut buffer = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, from)) = socket.recv_from(&mut buffer) else {
            continue; // the read timeout: look at `stop` again
        };
        let Some(question) = Question::parse(&buffer[..len]) else {
            continue;
        };
        let answer = {
            let mut zone = zone
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *zone.queries.entry(question.name.clone()).or_default() += 1;
            match zone.mode {
                Mode::Drop => None,
                Mode::ServFail => Some(question.answer(RCODE_SERVFAIL, &[], 0)),
                Mode::Answer => Some(match zone.records.get(&question.name) {
                    None => question.answer(RCODE_NXDOMAIN, &[], 0),
                    Some((ips, ttl)) if question.qtype == TYPE_A => {
                        question.answer(RCODE_NOERROR, ips, *ttl)
                    }
                    // The name exists, without records of this type (AAAA): NOERROR, no data.
                    Some(_) => question.answer(RCODE_NOERROR, &[], 0),
                }),
            }
        };
        if let Some(answer) = answer {
            let _ = socket.send_to(&answer, from);
        }
    }
}

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_NOERROR: u16 = 0;
const RCODE_SERVFAIL: u16 = 2;
const RCODE_NXDOMAIN: u16 = 3;
/// QR: the message is an answer.
const FLAG_QR: u16 = 0x8000;
/// The opcode bits.
const OPCODE_BITS: u16 = 0x7800;
/// AA: this server is the authority for its names.
const FLAG_AA: u16 = 0x0400;
/// RD: recursion desired (copied from the query).
const FLAG_RD: u16 = 0x0100;
/// RA: recursion available.
const FLAG_RA: u16 = 0x0080;

/// The question of a query, parsed by hand.
struct Question {
    id: u16,
    flags: u16,
    /// QNAME as text, lower case, without a trailing dot.
    name: String,
    qtype: u16,
    /// The question section as it came (QNAME, QTYPE, QCLASS): echoed in the answer.
    wire: Vec<u8>,
}

impl Question {
    /// The 12-byte header, then one question of uncompressed labels; `None` for anything else
    /// (an answer, several questions, a pointer, a truncated message). What follows the
    /// question (the resolver's EDNS0 OPT record) is ignored.
    fn parse(packet: &[u8]) -> Option<Question> {
        let field = |at: usize| -> Option<u16> {
            Some(u16::from_be_bytes(packet.get(at..at + 2)?.try_into().ok()?))
        };
        let (id, flags, questions) = (field(0)?, field(2)?, field(4)?);
        if flags & FLAG_QR != 0 || questions != 1 {
            return None;
        }
        let mut at = 12;
        let mut labels = Vec::new();
        loop {
            let len = usize::from(*packet.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None; // a pointer or a reserved label type
            }
            let label = std::str::from_utf8(packet.get(at..at + len)?).ok()?;
            labels.push(label.to_ascii_lowercase());
            at += len;
        }
        let qtype = field(at)?;
        if field(at + 2)? != CLASS_IN {
            return None;
        }
        Some(Question {
            id,
            flags,
            name: labels.join("."),
            qtype,
            wire: packet[12..at + 4].to_vec(),
        })
    }

    /// The answer with `rcode` and an A record of `ttl` per address of `ips` (owner: the
    /// question's name, by the pointer 0xC00C).
    fn answer(&self, rcode: u16, ips: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
        let flags = FLAG_QR
            | (self.flags & OPCODE_BITS)
            | FLAG_AA
            | (self.flags & FLAG_RD)
            | FLAG_RA
            | rcode;
        let count = u16::try_from(ips.len()).expect("a few records");
        let mut out = Vec::with_capacity(12 + self.wire.len() + 16 * ips.len());
        for field in [self.id, flags, 1, count, 0, 0] {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out.extend_from_slice(&self.wire);
        for ip in ips {
            out.extend_from_slice(&[0xC0, 0x0C]);
            out.extend_from_slice(&TYPE_A.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        out
    }
}

// ---- upstreams, the admin endpoints, clients ----

/// 127.0.0.`2 + index`: the address of the `index`th echo of [`echoes`].
fn ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + index)
}

/// `count` echo upstreams on 127.0.0.2, 127.0.0.3, … with one port, free on all of them.
fn echoes(count: u8) -> Vec<Echo> {
    for _ in 0..1000 {
        let port: u16 = rand::random_range(10_000..20_000);
        let free = (0..count).all(|i| std::net::TcpListener::bind((ip(i), port)).is_ok());
        if free {
            return (0..count)
                .map(|i| Echo::start_on(SocketAddr::new(IpAddr::V4(ip(i)), port)))
                .collect();
        }
    }
    panic!("no port free on 127.0.0.2..{}", 2 + count);
}

/// The config of a proxy asking `dns`, whose default pool lists `entries` (the items of its
/// `servers` array as written).
fn named_config(dns: &Dns, entries: &str) -> ProxyConfig {
    let mut config = ProxyConfig::new(&[]);
    config.top_level = dns.resolvers();
    config.server_entries = Some(entries.to_owned());
    config
}

/// `METHOD path` with `body` on the proxy's admin listener: the status and the body
/// (`POST /reload` may wait 30 s for the main thread).
fn admin(proxy: &Proxy, method: &str, path: &str, body: &str) -> (u16, String) {
    admin_request(
        proxy.admin_addr(),
        method,
        path,
        body,
        Duration::from_secs(35),
    )
}

/// `GET /upstreams`: the default pool's running servers and the tunnels each holds (every one
/// must say it is up: these pools have no health checks).
fn servers_of(proxy: &Proxy) -> BTreeMap<SocketAddr, u64> {
    let (status, body) = admin(proxy, "GET", "/upstreams", "");
    assert_eq!(status, 200, "GET /upstreams: {body}");
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /upstreams: {e}: {body}"));
    assert!(json["pools"].is_object(), "GET /upstreams: {body}");
    let Some(servers) = json["pools"]["default"].as_array() else {
        return BTreeMap::new(); // a pool without servers lists none
    };
    servers
        .iter()
        .map(|server| {
            assert_eq!(server["up"], true, "{body}");
            let addr = server["server"].as_str().expect("server").parse();
            let tunnels = server["tunnels"].as_u64().expect("tunnels");
            (addr.expect("an address"), tunnels)
        })
        .collect()
}

/// The set of the default pool's running servers.
fn server_set(proxy: &Proxy) -> BTreeSet<SocketAddr> {
    servers_of(proxy).into_keys().collect()
}

/// The addresses of `echoes`.
fn set_of<'a>(echoes: impl IntoIterator<Item = &'a Echo>) -> BTreeSet<SocketAddr> {
    echoes.into_iter().map(Echo::addr).collect()
}

/// A tunnel to `path` that echoed one message.
async fn echoing(proxy: &Proxy, path: &str) -> Client {
    let mut ws = connect(&proxy.url(path)).await;
    echo_text(&mut ws, path).await;
    ws
}

/// The handshakes `echo` recorded whose path starts with `prefix`.
fn recorded(echo: &Echo, prefix: &str) -> usize {
    echo.records()
        .iter()
        .filter(|record| record.path.starts_with(prefix))
        .count()
}

/// An upgrade of `path` that must be refused with `status`.
async fn refused_with(proxy: &Proxy, path: &str, status: u16) {
    let url = proxy.url(path);
    match bounded(tokio_tungstenite::connect_async(url.as_str())).await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status().as_u16(), status, "{path}: {response:?}")
        }
        Err(other) => panic!("{path}: {other}"),
        Ok(_) => panic!("{path}: upgraded, where {status} was expected"),
    }
}

/// The proxy's log lines that contain every one of `words`.
fn log_lines_with(proxy: &Proxy, words: &[&str]) -> usize {
    proxy
        .log()
        .lines()
        .filter(|line| words.iter().all(|word| line.contains(word)))
        .count()
}

/// The access line of the request for `path`, once it is logged.
fn access_line_of(proxy: &Proxy, path: &str) -> serde_json::Value {
    let mut found = None;
    let logged = eventually(|| {
        found = proxy
            .access_lines()
            .into_iter()
            .find(|line| line["path"] == path);
        found.is_some()
    });
    assert!(logged, "no access line for {path}: {}", proxy.log_tail(20));
    found.unwrap_or_default()
}

// ---- servers by DNS name ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_two_addresses_is_two_servers_of_its_pool() {
    let dns = Dns::start();
    let servers = echoes(2);
    let port = servers[0].addr().port();
    dns.set(NAME, &[ip(0), ip(1)], 300);
    let proxy = Proxy::start(
        DataPath::Userspace,
        &named_config(&dns, &format!("\"{NAME}:{port}\"")),
    );
    assert_eq!(server_set(&proxy), set_of(&servers), "GET /upstreams");
    assert!(
        dns.queries(NAME) >= 2,
        "the proxy asked the configured resolver (A and AAAA)"
    );
    let mut held = Vec::new();
    for index in 0..4 {
        held.push(echoing(&proxy, &format!("/two-{index}")).await);
    }
    // Least connections: ties rotate, so held tunnels alternate between the two.
    for echo in &servers {
        assert_eq!(recorded(echo, "/two-"), 2, "{}", echo.addr());
    }
    let counts = servers_of(&proxy);
    assert!(counts.values().all(|&n| n == 2), "{counts:?}");
    for (index, ws) in held.iter_mut().enumerate() {
        echo_text(ws, &format!("still {index}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_resolved_again_when_its_ttl_runs_out_and_open_tunnels_stay() {
    let dns = Dns::start();
    let servers = echoes(3);
    let (a, b, c) = (&servers[0], &servers[1], &servers[2]);
    let port = a.addr().port();
    dns.set(NAME, &[ip(0), ip(1)], 1);
    let proxy = Proxy::start(
        DataPath::Userspace,
        &named_config(&dns, &format!("\"{NAME}:{port}\"")),
    );
    assert_eq!(server_set(&proxy), set_of([a, b]));
    let mut held = Vec::new();
    for index in 0..4 {
        held.push(echoing(&proxy, &format!("/before-{index}")).await);
    }
    assert_eq!((recorded(a, "/before-"), recorded(b, "/before-")), (2, 2));

    // A leaves the name, C joins it: the pool follows within a few seconds of the TTL.
    let asked = dns.queries(NAME);
    dns.set(NAME, &[ip(1), ip(2)], 1);
    let changed = Instant::now();
    let followed = settles_within(Duration::from_secs(4), || {
        server_set(&proxy) == set_of([b, c])
    })
    .await;
    assert!(
        followed,
        "not re-resolved within 4 s of the change: {:?}\n{}",
        servers_of(&proxy),
        proxy.log_tail(20)
    );
    println!(
        "the pool followed the new records after {:?}",
        changed.elapsed()
    );
    assert!(dns.queries(NAME) > asked, "asked again");
    assert!(
        log_lines_with(&proxy, &["upstream name resolved anew", NAME]) >= 1,
        "{}",
        proxy.log_tail(20)
    );
    // Workers take the new generation at their next tick.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut after = Vec::new();
    for index in 0..4 {
        after.push(echoing(&proxy, &format!("/after-{index}")).await);
    }
    // B holds two tunnels, C none: C gets the first two, then they alternate.
    assert_eq!(recorded(a, "/after-"), 0, "A left the pool");
    assert_eq!(
        (recorded(b, "/after-"), recorded(c, "/after-")),
        (1, 3),
        "least connections over B (holding 2) and C (new)"
    );
    // The tunnels on A were not closed by the change.
    for (index, ws) in held.iter_mut().enumerate() {
        echo_text(ws, &format!("still open {index}")).await;
    }
    for ws in &mut after {
        echo_text(ws, "after").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_resolution_keeps_the_servers_and_a_name_gone_leaves_its_pool() {
    let dns = Dns::start();
    let servers = echoes(2);
    let port = servers[0].addr().port();
    dns.set(NAME, &[ip(0), ip(1)], 1);
    let proxy = Proxy::start(
        DataPath::Userspace,
        &named_config(&dns, &format!("\"{NAME}:{port}\"")),
    );
    let mut held = echoing(&proxy, "/held").await;

    // SERVFAIL: a failure, not an answer; the last addresses stay.
    dns.set_mode(Mode::ServFail);
    let failed = settles_within(Duration::from_secs(5), || {
        log_lines_with(&proxy, &["upstream name not resolved", NAME, "rcode 2"]) >= 1
    })
    .await;
    assert!(failed, "no SERVFAIL seen: {}", proxy.log_tail(20));
    assert_eq!(server_set(&proxy), set_of(&servers), "kept after SERVFAIL");
    echoing(&proxy, "/during-servfail").await;

    // NXDOMAIN: the name no longer exists; its servers leave the pool (the next try comes
    // 5 s after the failure).
    dns.remove(NAME);
    dns.set_mode(Mode::Answer);
    let gone = settles_within(Duration::from_secs(10), || server_set(&proxy).is_empty()).await;
    assert!(
        gone,
        "still {:?} after NXDOMAIN\n{}",
        servers_of(&proxy),
        proxy.log_tail(20)
    );
    assert!(
        log_lines_with(&proxy, &["upstream name has no addresses", NAME]) >= 1,
        "{}",
        proxy.log_tail(20)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    refused_with(&proxy, "/nothing-left", 503).await;
    let refusal = access_line_of(&proxy, "/nothing-left");
    assert_eq!(refusal["status"], 503, "{refusal}");
    // The access line says "rejected"; the log line of the refusal says why.
    assert!(
        log_lines_with(
            &proxy,
            &[
                "request rejected",
                "status=503",
                "has no servers (its names are not resolved yet)"
            ]
        ) >= 1,
        "{}",
        proxy.log_tail(20)
    );
    // The tunnel open on a server that left goes on.
    echo_text(&mut held, "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_outage_keeps_the_last_servers_and_tunnels_keep_connecting() {
    let dns = Dns::start();
    let servers = echoes(3);
    let port = servers[0].addr().port();
    dns.set(NAME, &[ip(0), ip(1)], 1);
    let proxy = Proxy::start(
        DataPath::Userspace,
        &named_config(&dns, &format!("\"{NAME}:{port}\"")),
    );
    let before = set_of(&servers[..2]);
    assert_eq!(server_set(&proxy), before);

    // Queries are dropped: each resolution waits out the resolver's timeouts (2 tries of 5 s).
    dns.set_mode(Mode::Drop);
    let dropped_from = dns.queries(NAME);
    let outage = Instant::now();
    let mut connects = 0;
    loop {
        let timed_out = log_lines_with(
            &proxy,
            &["upstream name not resolved", NAME, "no nameserver answered"],
        ) >= 1;
        assert_eq!(
            server_set(&proxy),
            before,
            "{:?} into the outage",
            outage.elapsed()
        );
        echoing(&proxy, &format!("/outage-{connects}")).await;
        connects += 1;
        if timed_out {
            break;
        }
        assert!(
            outage.elapsed() < Duration::from_secs(20),
            "the resolution did not time out in 20 s: {}",
            proxy.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "the resolution timed out {:?} into the outage; {connects} tunnels connected meanwhile",
        outage.elapsed()
    );
    assert!(
        dns.queries(NAME) > dropped_from,
        "the proxy asked during the outage"
    );

    // DNS is back with other records: they apply at the next try (5 s after the failure).
    dns.set(NAME, &[ip(2)], 1);
    dns.set_mode(Mode::Answer);
    let back = settles_within(Duration::from_secs(10), || {
        server_set(&proxy) == set_of(&servers[2..])
    })
    .await;
    assert!(
        back,
        "{:?} after DNS came back\n{}",
        servers_of(&proxy),
        proxy.log_tail(20)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    echoing(&proxy, "/back").await;
    assert_eq!(recorded(&servers[2], "/back"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_unresolved_at_start_answers_503_until_it_appears() {
    let dns = Dns::start();
    let servers = echoes(1);
    let port = servers[0].addr().port();
    let proxy = Proxy::start(
        DataPath::Userspace,
        &named_config(&dns, &format!("\"{NAME}:{port}\"")),
    );
    assert!(server_set(&proxy).is_empty());
    assert!(
        log_lines_with(&proxy, &["upstream name has no addresses", NAME]) >= 1,
        "{}",
        proxy.log_tail(20)
    );
    refused_with(&proxy, "/too-early", 503).await;
    // The name appears: it is tried again 5 s after each failure.
    dns.set(NAME, &[ip(0)], 60);
    let appeared = Instant::now();
    let resolved = settles_within(Duration::from_secs(8), || {
        server_set(&proxy) == set_of(&servers)
    })
    .await;
    assert!(resolved, "{}", proxy.log_tail(20));
    println!("served {:?} after the name appeared", appeared.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    echoing(&proxy, "/in-time").await;
    assert_eq!(recorded(&servers[0], "/in-time"), 1);
}

// ---- servers set at run time ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_upstreams_sets_the_servers_until_the_files_list_changes() {
    let dns = Dns::start();
    let servers = echoes(4);
    let (a, b, c, d) = (&servers[0], &servers[1], &servers[2], &servers[3]);
    let port = a.addr().port();
    let extra = "extra.wsplice.test";
    dns.set(extra, &[ip(3)], 300);
    let mut config = ProxyConfig::new(&[a.addr()]);
    config.top_level = dns.resolvers();
    let proxy = Proxy::start(DataPath::Userspace, &config);
    assert_eq!(server_set(&proxy), set_of([a]));

    // Bad bodies: 400, with the reason; nothing changes.
    let (a_addr, b_addr, c_addr) = (a.addr(), b.addr(), c.addr());
    let bad = [
        (r#"{"servers": []}"#.to_owned(), "no servers"),
        (
            format!(r#"{{"servers": ["{b_addr}", "{b_addr}"]}}"#),
            "listed twice",
        ),
        (
            r#"{"servers": ["not an address"]}"#.to_owned(),
            "neither IP:port nor name:port",
        ),
        (
            format!(r#"{{"servers": [{{"addr": "{b_addr}", "weight": 0}}]}}"#),
            "weight must be between 1 and 256",
        ),
        (
            format!(r#"{{"servers": [{{"addr": "{b_addr}", "max_tunnels": 0}}]}}"#),
            "max_tunnels must be at least 1",
        ),
        (
            format!(r#"{{"servers": ["{b_addr}"], "drain": true}}"#),
            "unknown field",
        ),
        ("servers = [1]".to_owned(), "the body must be"),
    ];
    for (body, reason) in &bad {
        let (status, answer) = admin(&proxy, "PUT", "/upstreams/default", body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer.contains(reason),
            "{body}: {answer:?} lacks {reason:?}"
        );
    }
    let good = format!(
        r#"{{"servers": ["{b_addr}", {{"addr": "{c_addr}", "weight": 2, "max_tunnels": 100}}, "{extra}:{port}"]}}"#
    );
    let (status, answer) = admin(&proxy, "PUT", "/upstreams/nope", &good);
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer.trim(), r#"refused: no upstream pool named "nope""#);
    assert_eq!(server_set(&proxy), set_of([a]), "unchanged by refusals");

    // A good body: new connections go to B, C (weight 2) and the name's address D.
    let (status, answer) = admin(&proxy, "PUT", "/upstreams/default", &good);
    assert_eq!(status, 200, "{answer}");
    assert!(answer.starts_with("servers set: generation "), "{answer}");
    let named_resolved = settles_within(Duration::from_secs(5), || {
        server_set(&proxy) == set_of([b, c, d])
    })
    .await;
    assert!(
        named_resolved,
        "{:?}\n{}",
        servers_of(&proxy),
        proxy.log_tail(20)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for index in 0..8 {
        held.push(echoing(&proxy, &format!("/set-{index}")).await);
    }
    let placed = [a, b, c, d].map(|echo| recorded(echo, "/set-"));
    assert_eq!(placed, [0, 2, 4, 2], "A, B, C (weight 2), D");
    let counts = servers_of(&proxy);
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [2, 4, 2],
        "{counts:?}"
    );

    // A reload of the same file keeps them.
    let (status, answer) = admin(&proxy, "POST", "/reload", "");
    assert_eq!(status, 200, "{answer}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server_set(&proxy), set_of([b, c, d]), "after POST /reload");
    held.push(echoing(&proxy, "/reloaded").await);
    assert_eq!(recorded(a, "/reloaded"), 0, "A is still out");

    // A file with another list wins.
    let mut edited = config.clone();
    edited.servers = vec![a_addr, c_addr];
    assert!(proxy.reload(&edited), "{}", proxy.log_tail(20));
    assert_eq!(server_set(&proxy), set_of([a, c]), "the file's list");
    assert!(
        log_lines_with(
            &proxy,
            &["the file's servers of this pool changed", "default"]
        ) >= 1,
        "{}",
        proxy.log_tail(20)
    );
    for index in 0..2 {
        held.push(echoing(&proxy, &format!("/file-{index}")).await);
    }
    // C holds four (and maybe the reloaded one), A none: both go to A.
    assert_eq!(recorded(a, "/file-"), 2);
    for ws in &mut held {
        echo_text(ws, "all still open").await;
    }
}

/// A server table's keys are checked as the config file checks them: a misspelt key is refused,
/// not ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_upstreams_refuses_an_unknown_key_in_a_server_table() {
    let servers = echoes(2);
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[servers[0].addr()]));
    let body = format!(
        r#"{{"servers": [{{"addr": "{}", "wieght": 2}}]}}"#,
        servers[1].addr()
    );
    let (status, answer) = admin(&proxy, "PUT", "/upstreams/default", &body);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("wieght"), "{answer}");
}

/// A binary upgrade is invisible to clients; the pools should be too: the successor serves the
/// servers set at run time, and the tunnels it adopts on them count there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_set_at_run_time_survive_a_binary_upgrade() {
    let servers = echoes(2);
    let (a, b) = (&servers[0], &servers[1]);
    let proxy = Proxy::start(DataPath::Userspace, &ProxyConfig::new(&[a.addr()]));
    let body = format!(r#"{{"servers": ["{}"]}}"#, b.addr());
    let (status, answer) = admin(&proxy, "PUT", "/upstreams/default", &body);
    assert_eq!(status, 200, "{answer}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = echoing(&proxy, "/before-upgrade").await;
    assert_eq!(recorded(b, "/before-upgrade"), 1);
    let (proxy, upgraded) = tokio::task::spawn_blocking(move || {
        let mut proxy = proxy;
        let upgraded = proxy.upgrade();
        (proxy, upgraded)
    })
    .await
    .expect("the upgrading thread");
    upgraded.unwrap_or_else(|e| panic!("upgrade: {e}"));
    echo_text(&mut held, "adopted").await;
    let running = servers_of(&proxy);
    assert_eq!(
        running.keys().copied().collect::<BTreeSet<_>>(),
        set_of([b]),
        "the successor's servers: {running:?}"
    );
    assert_eq!(
        running.get(&b.addr()),
        Some(&1),
        "the adopted tunnel counts"
    );
}

// ---- rebalancing ----

/// Tunnels the rebalancing test holds.
const HELD: usize = 20;
/// Its pool's `rebalance.rate`.
const RATE: usize = 5;

/// What the rebalancing clients saw.
#[derive(Debug, Default)]
struct Seen {
    /// When each got a Close 1012.
    moves: Vec<Instant>,
    /// Tunnels that echoed after a reconnect.
    echoed_after_move: usize,
    /// Anything else that happened to a client.
    errors: Vec<String>,
}

/// One client: holds a tunnel to `url`, and when it gets a Close 1012 answers it and
/// reconnects (each new tunnel must echo), until `stop`.
async fn follow_moves(
    url: String,
    index: usize,
    seen: Arc<Mutex<Seen>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let failed = |seen: &Mutex<Seen>, what: String| {
        seen.lock()
            .expect("seen")
            .errors
            .push(format!("client {index}: {what}"));
    };
    let mut reconnect = false;
    loop {
        let opened = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(ws_config()), true),
        )
        .await;
        let mut ws = match opened {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(error)) => return failed(&seen, format!("connect: {error}")),
            Err(_) => return failed(&seen, "connect timed out".into()),
        };
        let text = format!("{index}:{reconnect}");
        let echoed = tokio::time::timeout(WAIT, async {
            ws.send(Message::text(text.clone()))
                .await
                .map_err(|e| e.to_string())?;
            match ws.next().await {
                Some(Ok(Message::Text(reply))) if reply.as_str() == text => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        match echoed {
            Ok(Ok(())) if reconnect => seen.lock().expect("seen").echoed_after_move += 1,
            Ok(Ok(())) => {}
            Ok(Err(error)) => return failed(&seen, format!("echo: {error}")),
            Err(_) => return failed(&seen, "no echo in time".into()),
        }
        tokio::select! {
            _ = stop.changed() => {
                let _ = ws.close(None).await;
                return;
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(Some(close)))) if close.code == CloseCode::Restart => {
                    seen.lock().expect("seen").moves.push(Instant::now());
                    // Answer the Close; the proxy ends the stream after its own.
                    let _ = ws.close(None).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    reconnect = true;
                }
                other => return failed(&seen, format!("unexpected {other:?}")),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_moves_tunnels_to_an_added_server_at_its_rate() {
    for datapath in datapaths() {
        let servers = echoes(2);
        let (a, b) = (servers[0].addr(), servers[1].addr());
        let mut config = ProxyConfig::new(&[a]);
        config.upstream_extra = format!("rebalance = {{ rate = {RATE}, tolerance = 0.0 }}");
        let proxy = Proxy::start(datapath, &config);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let clients: Vec<_> = (0..HELD)
            .map(|index| {
                let url = proxy.url(&format!("/rebalance-{index}"));
                tokio::spawn(follow_moves(url, index, Arc::clone(&seen), stopped.clone()))
            })
            .collect();
        let all_on_a = settles_within(Duration::from_secs(10), || {
            servers_of(&proxy).get(&a) == Some(&(HELD as u64))
        })
        .await;
        assert!(
            all_on_a,
            "{datapath:?}: {:?} {:?}",
            servers_of(&proxy),
            seen.lock().expect("seen").errors
        );
        if datapath == DataPath::Kernel {
            // Spliced right after the 101: the moves take them out of the kernel first.
            let spliced = settles_within(Duration::from_secs(5), || {
                proxy.metrics().get("tunnels_spliced_open") >= Some(&(HELD as u64))
            })
            .await;
            assert!(spliced, "{datapath:?}: {:?}", proxy.metrics());
        }

        let body = format!(r#"{{"servers": ["{a}", "{b}"]}}"#);
        let (status, answer) = admin(&proxy, "PUT", "/upstreams/default", &body);
        assert_eq!(status, 200, "{datapath:?}: {answer}");
        let added = Instant::now();
        let even = |counts: &BTreeMap<SocketAddr, u64>| {
            let (on_a, on_b) = (counts.get(&a).copied(), counts.get(&b).copied());
            let half = HELD as u64 / 2;
            on_a.is_some_and(|n| n.abs_diff(half) <= 1)
                && on_b.is_some_and(|n| n.abs_diff(half) <= 1)
                && on_a.unwrap_or(0) + on_b.unwrap_or(0) == HELD as u64
        };
        let evened = settles_within(Duration::from_secs(10), || even(&servers_of(&proxy))).await;
        assert!(
            evened,
            "{datapath:?}: not evened out in 10 s: {:?}\n{}",
            servers_of(&proxy),
            proxy.log_tail(20)
        );
        println!(
            "{datapath:?}: evened out {:?} after the PUT",
            added.elapsed()
        );
        // No more moves once even: the counts stay.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let counts = servers_of(&proxy);
        assert!(even(&counts), "{datapath:?}: {counts:?}");
        let moved = seen.lock().expect("seen").moves.len();
        let counted = settles_within(Duration::from_secs(5), || {
            proxy.metrics().get("tunnels_rebalanced_total") == Some(&(moved as u64))
        })
        .await;

        stop.send(true).expect("clients listen");
        for client in clients {
            let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
        }
        let seen = std::mem::take(&mut *seen.lock().expect("seen"));
        assert!(seen.errors.is_empty(), "{datapath:?}: {:?}", seen.errors);
        assert!(
            (8..=14).contains(&seen.moves.len()),
            "{datapath:?}: {} moves to even out {HELD} tunnels: {counts:?}",
            seen.moves.len()
        );
        let busiest = busiest_second(&seen.moves);
        // A second's worth at once, then the rate (and a little for the clients' clocks).
        assert!(
            busiest <= RATE + RATE + 2,
            "{datapath:?}: {busiest} moves within one second"
        );
        assert_eq!(
            seen.echoed_after_move,
            seen.moves.len(),
            "{datapath:?}: every reconnected tunnel echoes"
        );
        assert!(
            counted,
            "{datapath:?}: wsplice_tunnels_rebalanced_total {:?}, the clients saw {moved}",
            proxy.metrics().get("tunnels_rebalanced_total")
        );
        let said = proxy
            .access_lines()
            .iter()
            .filter(|line| {
                line["reason"].as_str()
                    == Some(
                        "rebalancing: its server held more than its share; said goodbye \
                         (Close 1012) to both sides",
                    )
            })
            .count();
        assert_eq!(said, moved, "{datapath:?}: access lines of the moves");
        println!(
            "{datapath:?}: {moved} moves, at most {busiest} in a second, over {:?}",
            seen.moves[seen.moves.len() - 1].duration_since(seen.moves[0])
        );
    }
}
