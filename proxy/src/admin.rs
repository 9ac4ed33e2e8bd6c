//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` and `/readyz`, and
//! `POST /reload` (what `wsplice reload` sends: the config file is read again, as on `SIGHUP`,
//! and the answer says whether it was applied).
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

/// What the admin listener may ask of the main thread, and when it must stop.
#[derive(Debug, Default)]
pub struct Controls {
    /// Where `POST /reload` sends its requests (`None`: not possible).
    pub reload: Option<Sender<ReloadRequest>>,
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
            retired: controls.retired,
            in_flight: AtomicUsize::new(0),
        });
        std::thread::Builder::new()
            .name("wsplice-admin".into())
            .spawn(move || accept_loop(&listener, &state))
            .map_err(|source| AdminError { addr, source })?;
        tracing::info!(
            %addr,
            "admin listener: /metrics /healthz /readyz, POST /reload, POST /upgrade"
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
    let (status, body) = if head[..len].starts_with(b"POST /reload ") {
        reload(state)
    } else if head[..len].starts_with(b"POST /upgrade ") {
        upgrade(state)
    } else {
        route(&head[..len], &state.metrics, draining)
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// `POST /reload`: asks the main thread to read the config file again and waits for the
/// outcome.
fn reload(state: &State) -> (&'static str, String) {
    let unable = "this process cannot reload (no config file)";
    match ask_main_thread(state.reload.as_ref(), RELOAD_WAIT, unable) {
        Ok(Ok(generation)) => ("200 OK", format!("reloaded: generation {generation}\n")),
        Ok(Err(error)) => ("409 Conflict", format!("refused: {error}\n")),
        Err(unanswered) => unanswered,
    }
}

/// `POST /upgrade`: asks the main thread to start a successor and waits until it serves or
/// failed.
fn upgrade(state: &State) -> (&'static str, String) {
    let unable = "this process cannot upgrade";
    match ask_main_thread(state.upgrade.as_ref(), UPGRADE_WAIT, unable) {
        Ok(Ok(pid)) => ("200 OK", format!("upgraded: successor pid {pid}\n")),
        Ok(Err(error)) => (
            "500 Internal Server Error",
            format!("upgrade failed: {error}\n"),
        ),
        Err(unanswered) => unanswered,
    }
}

/// Sends a request to the main thread through `requests` and waits at most `wait` for its
/// outcome; a 503 answer when it cannot be asked (`unable`), is stopping or does not answer.
fn ask_main_thread<T>(
    requests: Option<&std::sync::Mutex<Sender<Request<T>>>>,
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
        .send(reply);
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
