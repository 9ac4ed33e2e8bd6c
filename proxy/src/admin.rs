//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` and `/readyz`,
//! `POST /reload` (what `wsplice reload` sends: the config file is read again, as on `SIGHUP`,
//! and the answer says whether it was applied), `POST /upgrade` (a binary upgrade),
//! `GET /upstreams` (every pool's servers with their state, JSON) and `PUT /upstreams/NAME`
//! (a pool's servers set at run time: where service discovery plugs in).
//!
//! Off the hot path: an accept thread and a short-lived thread per request (at most
//! [`MAX_CONCURRENT`] at once), one request per connection, short timeouts. A slow client
//! holds only its own thread, so a probe of `/healthz` is never stuck behind it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{server_from_value, split_servers, NamedServer, ServerConfig};
use crate::metrics::Metrics;

/// The admin listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the admin listener on {addr}: {source}")]
pub struct AdminError {
    /// The configured address.
    pub addr: SocketAddr,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Requests the admin listener answers at once; a connection beyond them is closed unanswered.
pub const MAX_CONCURRENT: usize = 16;

/// How long `POST /reload` waits for the main thread's outcome.
const RELOAD_WAIT: Duration = Duration::from_secs(30);

/// A reload asked for through the admin listener: where the main thread sends its outcome (the
/// new generation, or why the file was refused).
pub type ReloadRequest = Sender<Result<u64, String>>;

/// A binary upgrade asked for through the admin listener: where the main thread sends its
/// outcome (the successor's process id, or why there is none).
pub type UpgradeRequest = Sender<Result<u32, String>>;

/// How long `POST /upgrade` waits for the main thread's outcome (the successor has 30 s to
/// start).
const UPGRADE_WAIT: Duration = Duration::from_secs(45);

/// `PUT /upstreams/NAME`: a pool's servers to set at run time, and where the main thread
/// sends its outcome (the generation that serves them, or why not).
pub type ServersRequest = (ServersChange, Sender<Result<u64, String>>);

/// A pool's servers as `PUT /upstreams/NAME` gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServersChange {
    /// The pool.
    pub pool: String,
    /// Its servers: by address, and by name.
    pub servers: (Vec<ServerConfig>, Vec<NamedServer>),
}

/// Largest body `PUT /upstreams/NAME` takes (thousands of servers).
const MAX_BODY: usize = 256 * 1024;

/// What the admin listener may ask of the main thread, and when it must stop.
#[derive(Debug, Default)]
pub struct Controls {
    /// Where `POST /reload` sends its requests (`None`: not possible).
    pub reload: Option<Sender<ReloadRequest>>,
    /// Where `PUT /upstreams/NAME` sends its requests (`None`: not possible).
    pub servers: Option<Sender<ServersRequest>>,
    /// Where `POST /upgrade` sends its requests (`None`: not possible).
    pub upgrade: Option<Sender<UpgradeRequest>>,
    /// Set when a successor took the admin socket over: this process stops accepting on it.
    pub retired: Arc<AtomicBool>,
}

/// A request to the main thread: where it sends its outcome.
type Request<T> = Sender<Result<T, String>>;

/// What the admin endpoints read.
struct State {
    metrics: Arc<Metrics>,
    /// Set when the drain starts: `/readyz` then answers 503 so load balancers stop sending.
    draining: Arc<AtomicBool>,
    /// Where `POST /reload` asks the main thread to reload (`None`: not possible).
    reload: Option<std::sync::Mutex<Sender<ReloadRequest>>>,
    /// Where `POST /upgrade` asks the main thread to upgrade (`None`: not possible).
    upgrade: Option<std::sync::Mutex<Sender<UpgradeRequest>>>,
    /// Where `PUT /upstreams/NAME` asks the main thread to change a pool (`None`: not possible).
    servers: Option<std::sync::Mutex<Sender<ServersRequest>>>,
    retired: Arc<AtomicBool>,
    in_flight: AtomicUsize,
}

/// Binds `addr` and serves the admin endpoints from background threads. `draining` is the
/// proxy's shutdown flag.
pub fn spawn(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
) -> Result<(), AdminError> {
    bind(addr)?.serve(metrics, draining, Controls::default())
}

/// A bound admin listener that serves nothing yet: the proxy binds it with its other ports,
/// before it drops privileges, and starts its thread after.
#[derive(Debug)]
pub struct AdminListener {
    addr: SocketAddr,
    listener: TcpListener,
}

/// Binds the admin listener on `addr` (warning when it is reachable beyond this host).
pub fn bind(addr: SocketAddr) -> Result<AdminListener, AdminError> {
    let listener = TcpListener::bind(addr).map_err(|source| AdminError { addr, source })?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the admin listener is reachable beyond this host: /metrics tells anyone who can \
             connect how busy the proxy is; bind it to 127.0.0.1 unless a firewall guards it"
        );
    }
    Ok(AdminListener { addr, listener })
}

impl AdminListener {
    /// The admin socket a predecessor process handed over (binary upgrade).
    pub fn adopt(addr: SocketAddr, socket: std::os::fd::OwnedFd) -> AdminListener {
        AdminListener {
            addr,
            listener: TcpListener::from(socket),
        }
    }

    /// Its address and a copy of its socket (for a successor).
    pub fn socket_copy(&self) -> std::io::Result<(SocketAddr, std::os::fd::OwnedFd)> {
        use std::os::fd::AsFd as _;
        Ok((self.addr, self.listener.as_fd().try_clone_to_owned()?))
    }

    /// Serves the admin endpoints from background threads. `draining` is the proxy's
    /// shutdown flag; `controls`, where `POST /reload` and `POST /upgrade` go.
    pub fn serve(
        self,
        metrics: Arc<Metrics>,
        draining: Arc<AtomicBool>,
        controls: Controls,
    ) -> Result<(), AdminError> {
        let AdminListener { addr, listener } = self;
        // Accepts wait in `poll` so the thread can stop when retired; the socket may be
        // shared with a successor, which may take a connection first.
        listener
            .set_nonblocking(true)
            .map_err(|source| AdminError { addr, source })?;
        let state = Arc::new(State {
            metrics,
            draining,
            reload: controls.reload.map(std::sync::Mutex::new),
            upgrade: controls.upgrade.map(std::sync::Mutex::new),
            servers: controls.servers.map(std::sync::Mutex::new),
            retired: controls.retired,
            in_flight: AtomicUsize::new(0),
        });
        std::thread::Builder::new()
            .name("wsplice-admin".into())
            .spawn(move || accept_loop(&listener, &state))
            .map_err(|source| AdminError { addr, source })?;
        tracing::info!(
            %addr,
            "admin listener: /metrics /healthz /readyz, POST /reload, POST /upgrade, GET /upstreams, PUT /upstreams/NAME"
        );
        Ok(())
    }
}

fn accept_loop(listener: &TcpListener, state: &Arc<State>) {
    use std::os::fd::AsRawFd as _;
    while !state.retired.load(Ordering::Relaxed) {
        let readable = crate::sys::wait_readable(listener.as_raw_fd(), Duration::from_millis(200));
        if !readable || state.retired.load(Ordering::Relaxed) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                // Out of descriptors (EMFILE/ENFILE) or memory: the error repeats until some
                // are freed, so wait instead of spinning.
                tracing::warn!(%error, "admin listener cannot accept");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if state.in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_CONCURRENT {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            tracing::debug!("admin listener busy: closing a connection unanswered");
            continue;
        }
        let request_state = Arc::clone(state);
        let spawned = std::thread::Builder::new()
            .name("wsplice-admin-req".into())
            .spawn(move || {
                if let Err(error) = answer(stream, &request_state) {
                    tracing::debug!(%error, "admin request failed");
                }
                request_state.in_flight.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(error) = spawned {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%error, "admin listener cannot start a request thread");
        }
    }
}

fn answer(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut head = [0u8; 2048];
    let mut len = 0;
    while len < head.len() && !head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut head[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let draining = state.draining.load(Ordering::Relaxed);
    let request = &head[..len];
    let (status, body) = if request.starts_with(b"POST /reload ") {
        reload(state)
    } else if request.starts_with(b"POST /upgrade ") {
        upgrade(state)
    } else if let Some(pool) = upstream_path(request, b"PUT ") {
        let body = read_body(&mut stream, request)?;
        set_servers(state, pool, &body)
    } else if request.starts_with(b"GET /upstreams ") {
        ("200 OK", state.metrics.upstreams.to_json())
    } else {
        route(request, &state.metrics, draining)
    };
    let kind = if body.starts_with('{') {
        "application/json"
    } else if request.starts_with(b"GET /metrics ") {
        "text/plain; version=0.0.4"
    } else {
        "text/plain; charset=utf-8"
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// The pool named by `METHOD /upstreams/NAME `, if the request is that.
fn upstream_path(request: &[u8], method: &[u8]) -> Option<String> {
    let rest = request.strip_prefix(method)?.strip_prefix(b"/upstreams/")?;
    let end = rest.iter().position(|&b| b == b' ')?;
    std::str::from_utf8(&rest[..end])
        .ok()
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .map(str::to_owned)
}

/// The request's body: what follows the head already read (`request`), and the rest of its
/// `Content-Length` (at most [`MAX_BODY`]).
fn read_body(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let Some(head_end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(Vec::new());
    };
    let head = String::from_utf8_lossy(&request[..head_end]);
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_BODY);
    let mut body = request[head_end + 4..].to_vec();
    body.truncate(length);
    let mut chunk = [0u8; 8192];
    while body.len() < length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        let take = n.min(length - body.len());
        body.extend_from_slice(&chunk[..take]);
    }
    Ok(body)
}

/// `PUT /upstreams/NAME` with `{"servers": ["10.0.0.1:8080", {"addr": "app.internal:8080",
/// "weight": 2, "max_tunnels": 5000}]}`: asks the main thread to serve the pool with these
/// servers from now on (new connections; open tunnels stay where they are unless the pool
/// rebalances) and waits for the outcome.
fn set_servers(state: &State, pool: String, body: &[u8]) -> (&'static str, String) {
    let servers = match parse_servers(body) {
        Ok(servers) => servers,
        Err(why) => return ("400 Bad Request", format!("{why}\n")),
    };
    let change = ServersChange { pool, servers };
    let unable = "this process cannot change its pools (no config file)";
    match ask_main_thread(
        state.servers.as_ref(),
        |reply| (change, reply),
        RELOAD_WAIT,
        unable,
    ) {
        Ok(Ok(generation)) => ("200 OK", format!("servers set: generation {generation}\n")),
        Ok(Err(error)) => ("409 Conflict", format!("refused: {error}\n")),
        Err(unanswered) => unanswered,
    }
}

/// The servers of a `PUT /upstreams/NAME` body, checked as the config file's are (each entry
/// read by the same function, turned from JSON into TOML).
fn parse_servers(body: &[u8]) -> Result<(Vec<ServerConfig>, Vec<NamedServer>), String> {
    const SHAPE: &str = "the body must be {\"servers\": [\"IP:port\" | \"name:port\" | \
                         {\"addr\": …, \"weight\": …, \"max_tunnels\": …}]}";
    let body: serde_json::Value =
        serde_json::from_slice(body).map_err(|error| format!("{SHAPE}: {error}"))?;
    let Some(object) = body.as_object() else {
        return Err(SHAPE.into());
    };
    if let Some(key) = object.keys().find(|key| *key != "servers") {
        return Err(format!("unknown field {key:?}: {SHAPE}"));
    }
    let Some(entries) = object.get("servers").and_then(serde_json::Value::as_array) else {
        return Err(SHAPE.into());
    };
    let entries = entries
        .iter()
        .map(|entry| {
            let value: toml::Value = serde_json::from_value(entry.clone())
                .map_err(|error| format!("{SHAPE}: {error}"))?;
            server_from_value(&value)
        })
        .collect::<Result<Vec<_>, _>>()?;
    split_servers(entries)
}

/// `POST /reload`: asks the main thread to read the config file again and waits for the
/// outcome.
fn reload(state: &State) -> (&'static str, String) {
    let unable = "this process cannot reload (no config file)";
    match ask_main_thread(state.reload.as_ref(), |reply| reply, RELOAD_WAIT, unable) {
        Ok(Ok(generation)) => ("200 OK", format!("reloaded: generation {generation}\n")),
        Ok(Err(error)) => ("409 Conflict", format!("refused: {error}\n")),
        Err(unanswered) => unanswered,
    }
}

/// `POST /upgrade`: asks the main thread to start a successor and waits until it serves or
/// failed.
fn upgrade(state: &State) -> (&'static str, String) {
    let unable = "this process cannot upgrade";
    match ask_main_thread(state.upgrade.as_ref(), |reply| reply, UPGRADE_WAIT, unable) {
        Ok(Ok(pid)) => ("200 OK", format!("upgraded: successor pid {pid}\n")),
        Ok(Err(error)) => (
            "500 Internal Server Error",
            format!("upgrade failed: {error}\n"),
        ),
        Err(unanswered) => unanswered,
    }
}

/// Sends a request to the main thread through `requests` (the message `message` makes of
/// where to answer) and waits at most `wait` for its outcome; a 503 answer when it cannot be
/// asked (`unable`), is stopping or does not answer.
fn ask_main_thread<T, M>(
    requests: Option<&std::sync::Mutex<Sender<M>>>,
    message: impl FnOnce(Request<T>) -> M,
    wait: Duration,
    unable: &str,
) -> Result<Result<T, String>, (&'static str, String)> {
    let unavailable = |why: &str| ("503 Service Unavailable", format!("{why}\n"));
    let Some(requests) = requests else {
        return Err(unavailable(unable));
    };
    let (reply, outcome) = mpsc::channel();
    let sent = requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(message(reply));
    if sent.is_err() {
        return Err(unavailable("the proxy is stopping"));
    }
    outcome
        .recv_timeout(wait)
        .map_err(|_| unavailable("the proxy did not answer"))
}

/// `wsplice reload`: asks the proxy whose admin listener is at `addr` to reload; its status
/// code and answer. An unspecified address (`0.0.0.0`, `::`) is asked on loopback.
pub fn request_reload(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    post(addr, "/reload", RELOAD_WAIT)
}

/// `wsplice upgrade`: asks the proxy whose admin listener is at `addr` to upgrade itself; its
/// status code and answer.
pub fn request_upgrade(addr: SocketAddr) -> std::io::Result<(u16, String)> {
    post(addr, "/upgrade", UPGRADE_WAIT)
}

/// `POST path` to the admin listener at `addr`, waiting `wait` for the answer.
fn post(addr: SocketAddr, path: &str, wait: Duration) -> std::io::Result<(u16, String)> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(wait + Duration::from_secs(5)))?;
    stream.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: wsplice\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .trim_end()
        .to_owned();
    Ok((status, body))
}

/// The answer to a request head: `/healthz` says the process serves, `/readyz` whether it
/// takes new connections (not while `draining`).
fn route(head: &[u8], metrics: &Metrics, draining: bool) -> (&'static str, String) {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", metrics.render()),
        (Some(b"GET"), Some(b"/healthz")) => ("200 OK", "ok\n".into()),
        (Some(b"GET"), Some(b"/readyz")) if draining => {
            ("503 Service Unavailable", "draining\n".into())
        }
        (Some(b"GET"), Some(b"/readyz")) => ("200 OK", "ok\n".into()),
        (Some(b"GET"), Some(_)) => ("404 Not Found", "not found\n".into()),
        _ => ("405 Method Not Allowed", "GET only\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(head: &[u8], metrics: &Metrics, draining: bool) -> &'static str {
        route(head, metrics, draining).0
    }

    #[test]
    fn routes_metrics_health_and_unknown_paths() {
        let metrics = Metrics::default();
        metrics.tunnels_opened.inc();
        let (status, body) = route(b"GET /metrics HTTP/1.1\r\n\r\n", &metrics, false);
        assert_eq!(status, "200 OK");
        assert!(body.contains("wsplice_tunnels_opened_total 1"));
        let healthz = b"GET /healthz HTTP/1.1\r\n\r\n";
        assert_eq!(status_of(healthz, &metrics, false), "200 OK");
        let unknown = b"GET /x HTTP/1.1\r\n\r\n";
        assert_eq!(status_of(unknown, &metrics, false), "404 Not Found");
        let post = b"POST /metrics HTTP/1.1\r\n\r\n";
        assert_eq!(status_of(post, &metrics, false), "405 Method Not Allowed");
    }

    #[test]
    fn post_reload_reports_what_the_main_thread_answered() {
        let (requests, inbox) = mpsc::channel::<ReloadRequest>();
        let state = State {
            metrics: Arc::default(),
            draining: Arc::default(),
            reload: Some(std::sync::Mutex::new(requests)),
            upgrade: None,
            servers: None,
            retired: Arc::default(),
            in_flight: AtomicUsize::new(0),
        };
        let main = std::thread::spawn(move || {
            inbox.recv().unwrap().send(Ok(3)).unwrap();
            inbox
                .recv()
                .unwrap()
                .send(Err("line 2: bad".into()))
                .unwrap();
        });
        assert_eq!(
            reload(&state),
            ("200 OK", "reloaded: generation 3\n".into())
        );
        assert_eq!(
            reload(&state),
            ("409 Conflict", "refused: line 2: bad\n".into())
        );
        main.join().unwrap();
        // The main thread is gone (stopping): said at once, not waited for.
        assert_eq!(reload(&state).0, "503 Service Unavailable");
        let without = State {
            reload: None,
            ..state
        };
        assert_eq!(reload(&without).0, "503 Service Unavailable");
    }

    #[test]
    fn post_upgrade_reports_the_successor_or_why_there_is_none() {
        let (requests, inbox) = mpsc::channel::<UpgradeRequest>();
        let state = State {
            metrics: Arc::default(),
            draining: Arc::default(),
            reload: None,
            upgrade: Some(std::sync::Mutex::new(requests)),
            servers: None,
            retired: Arc::default(),
            in_flight: AtomicUsize::new(0),
        };
        let main = std::thread::spawn(move || {
            inbox.recv().unwrap().send(Ok(4242)).unwrap();
            let failed = "the successor exited before it was ready (exit status: 1)";
            inbox.recv().unwrap().send(Err(failed.into())).unwrap();
        });
        assert_eq!(
            upgrade(&state),
            ("200 OK", "upgraded: successor pid 4242\n".into())
        );
        let (status, body) = upgrade(&state);
        assert_eq!(status, "500 Internal Server Error");
        assert!(body.contains("exited before it was ready"), "{body}");
        main.join().unwrap();
        assert_eq!(upgrade(&state).0, "503 Service Unavailable");
        let without = State {
            upgrade: None,
            ..state
        };
        assert_eq!(upgrade(&without).0, "503 Service Unavailable");
    }

    #[test]
    fn a_draining_proxy_is_alive_but_not_ready() {
        let metrics = Metrics::default();
        let readyz = b"GET /readyz HTTP/1.1\r\n\r\n";
        let healthz = b"GET /healthz HTTP/1.1\r\n\r\n";
        assert_eq!(status_of(readyz, &metrics, false), "200 OK");
        assert_eq!(status_of(readyz, &metrics, true), "503 Service Unavailable");
        assert_eq!(status_of(healthz, &metrics, true), "200 OK");
    }

    #[test]
    fn put_upstreams_checks_the_servers_then_asks_the_main_thread() {
        let (requests, inbox) = mpsc::channel::<ServersRequest>();
        let state = State {
            metrics: Arc::default(),
            draining: Arc::default(),
            reload: None,
            upgrade: None,
            servers: Some(std::sync::Mutex::new(requests)),
            retired: Arc::default(),
            in_flight: AtomicUsize::new(0),
        };
        let main = std::thread::spawn(move || {
            let (change, reply) = inbox.recv().unwrap();
            reply.send(Ok(7)).unwrap();
            change
        });
        let body = br#"{"servers": ["10.0.0.1:80", {"addr": "app.internal:8080", "weight": 2}]}"#;
        assert_eq!(
            set_servers(&state, "app".into(), body),
            ("200 OK", "servers set: generation 7\n".into())
        );
        let change = main.join().unwrap();
        assert_eq!(change.pool, "app");
        assert_eq!(
            change.servers.0,
            vec![ServerConfig::at("10.0.0.1:80".parse().unwrap())]
        );
        assert_eq!(
            (
                change.servers.1[0].host.as_str(),
                change.servers.1[0].weight
            ),
            ("app.internal", 2)
        );
        for bad in [
            &br#"{"servers": []}"#[..],
            br#"{"servers": ["10.0.0.1:80", "10.0.0.1:80"]}"#,
            br#"{"servers": [{"addr": "10.0.0.1:80", "weight": 0}]}"#,
            br#"{"hosts": []}"#,
            br#"{"servers": [{"addr": "10.0.0.1:80", "wieght": 2}]}"#,
            br#"{"servers": [], "extra": 1}"#,
            b"10.0.0.1:80",
        ] {
            assert_eq!(set_servers(&state, "app".into(), bad).0, "400 Bad Request");
        }
        assert_eq!(
            upstream_path(b"PUT /upstreams/app HTTP/1.1", b"PUT "),
            Some("app".into())
        );
        assert_eq!(upstream_path(b"PUT /upstreams/ HTTP/1.1", b"PUT "), None);
        assert_eq!(upstream_path(b"PUT /upstreams/a/b HTTP/1.1", b"PUT "), None);
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn a_client_that_trickles_its_request_does_not_hold_up_health_checks() {
        let addr = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let draining = Arc::new(AtomicBool::new(false));
        spawn(addr, Arc::new(Metrics::default()), Arc::clone(&draining)).unwrap();
        // One byte, then silence: the old single-threaded loop waited 2 s on it.
        let mut slow = TcpStream::connect(addr).unwrap();
        slow.write_all(b"G").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let answer = get(addr, "/healthz");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("ok\n"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered after {:?}, behind the slow client",
            started.elapsed()
        );
        draining.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503 "));
        drop(slow);
    }
}
