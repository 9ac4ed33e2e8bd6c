//! Active health checks of upstream servers.
//!
//! One thread ("wsplice-health") probes every server of every pool that has a
//! `[upstream.NAME.health_check]`: a TCP connect, an HTTP `GET`, or a full WebSocket upgrade.
//! After `fall` failed probes in a row a server is taken out of balancing, after `rise` passed
//! probes in a row it is back. Passive marking (see [`super`]) stays as it is.
//!
//! A server's state is a few atomics ([`ActiveHealth`]) written by the checker alone and read
//! lock-free by every worker on each new connection.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::handshake::{self, HeadLimits, ResponseError, UpstreamAnswer};
use crate::http::parse_response_head;

/// Limits on a probe's answer head: a health endpoint answers with a few headers, and a probe
/// must not buffer whatever a broken server sends.
const HEAD_LIMITS: HeadLimits = HeadLimits {
    max_bytes: 16 * 1024,
    max_headers: 64,
};

/// How often the checker looks for new, removed and due targets, and for the stop flag.
const ROUND: Duration = Duration::from_millis(100);

/// Longest wait after the WebSocket probe's Close frame for the server to close in turn.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Longest interval honoured: `Instant + Duration` panics on overflow, and a year between probes
/// is as good as never.
const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// `User-Agent` of every HTTP and WebSocket probe, so upstream logs can tell them apart.
const USER_AGENT: &str = "wsplice-health";

/// What a probe does (config: `kind = "tcp" | "http" | "websocket"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeKind {
    /// A TCP connect succeeds.
    Tcp,
    /// `GET path HTTP/1.1` with `Host: host`, `Connection: close`, `User-Agent: wsplice-health`;
    /// a 2xx status line passes.
    Http {
        /// Request target, origin form (`/healthz`).
        path: String,
        /// `Host` header value.
        host: String,
    },
    /// A full WebSocket upgrade of `path` (`Host: host`, a random `Sec-WebSocket-Key`); a 101
    /// whose `Sec-WebSocket-Accept` matches passes; the probe then sends a Close frame (masked,
    /// code 1000) and closes.
    WebSocket {
        /// Request target, origin form (`/ws`).
        path: String,
        /// `Host` header value.
        host: String,
    },
}

/// One pool's health-check settings (`[upstream.NAME.health_check]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// What a probe does.
    pub kind: ProbeKind,
    /// Time from the end of one probe to the start of the next.
    pub interval: Duration,
    /// Bound on a whole probe: connect, request and answer.
    pub timeout: Duration,
    /// Passed probes in a row that bring a down server back (at least 1).
    pub rise: u32,
    /// Failed probes in a row that take an up server out (at least 1).
    pub fall: u32,
    /// The pool's servers expect a PROXY header (`send_proxy_protocol`): each probe sends a
    /// v2 LOCAL one first (the header for a balancer's own connections), as HAProxy's
    /// `check-send-proxy` does.
    pub send_proxy_header: bool,
}

/// Why a probe failed (for the state-change log line).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    /// Sending the request or reading the answer failed after connecting (e.g. a reset).
    #[error("i/o error: {0}")]
    Io(#[source] std::io::Error),
    /// The probe did not finish within the check's timeout.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// An HTTP probe's answer was not 2xx.
    #[error("status {0}, not 2xx")]
    Status(u16),
    /// A WebSocket probe's answer was not 101.
    #[error("status {0}, not 101")]
    NotSwitching(u16),
    /// A 101 that is not a valid WebSocket switch: a missing or wrong `Sec-WebSocket-Accept`,
    /// or no `Upgrade: websocket` / `Connection: upgrade`.
    #[error("invalid 101 answer: {0}")]
    BadUpgrade(&'static str),
    /// The answer is not HTTP, or its head is larger than 16 KiB.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// The server closed the connection before a complete answer head.
    #[error("connection closed before a complete answer")]
    Closed,
}

impl From<ResponseError> for ProbeError {
    fn from(error: ResponseError) -> ProbeError {
        match error {
            ResponseError::Malformed(why) => ProbeError::Malformed(why),
            ResponseError::TooLarge(limit) => {
                ProbeError::Malformed(format!("head larger than {limit} bytes"))
            }
            ResponseError::BadUpgrade(why) => ProbeError::BadUpgrade(why),
            ResponseError::Interim(status) => ProbeError::NotSwitching(status),
        }
    }
}

/// Runs one probe of `addr`, bounded by `check.timeout` (a timeout around everything).
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), ProbeError> {
    let started = Instant::now();
    tokio::time::timeout(check.timeout, run_probe(addr, check, started))
        .await
        .unwrap_or(Err(ProbeError::TimedOut(check.timeout)))
}

/// The probe itself; `started` lets the WebSocket close stay within the timeout.
async fn run_probe(
    addr: SocketAddr,
    check: &HealthCheck,
    started: Instant,
) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    if check.send_proxy_header {
        stream
            .write_all(&crate::proxy_protocol::encode_v2(None))
            .await
            .map_err(ProbeError::Io)?;
    }
    match &check.kind {
        ProbeKind::Tcp => Ok(()),
        ProbeKind::Http { path, host } => http_exchange(&mut stream, path, host).await,
        ProbeKind::WebSocket { path, host } => {
            websocket_exchange(&mut stream, path, host).await?;
            // The close is a courtesy to the server, not part of the verdict: give it at most
            // half of what is left, so it can never turn a passed probe into a timeout.
            let left = check.timeout.saturating_sub(started.elapsed()) / 2;
            let grace = left.min(CLOSE_GRACE);
            if tokio::time::timeout(grace, close_websocket(&mut stream))
                .await
                .is_err()
            {
                tracing::debug!(server = %addr, "health probe: no close from the server in time");
            }
            Ok(())
        }
    }
}

/// Sends `GET path` and passes on a 2xx answer.
async fn http_exchange(stream: &mut TcpStream, path: &str, host: &str) -> Result<(), ProbeError> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         User-Agent: {USER_AGENT}\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut buf = Vec::new();
    loop {
        let head = read_head(stream, &mut buf, |b| parse_response_head(b, &HEAD_LIMITS)).await?;
        match head.status {
            200..=299 => return Ok(()),
            // Interim answers (100 Continue, 103 Early Hints) precede the final one. 101 is not
            // among them: a switch nobody asked for is a broken server.
            100 | 102 | 103 => {
                buf.drain(..head.head_len);
            }
            status => return Err(ProbeError::Status(status)),
        }
    }
}

/// Sends an upgrade request for `path` and passes on a valid 101 for its key.
async fn websocket_exchange(
    stream: &mut TcpStream,
    path: &str,
    host: &str,
) -> Result<(), ProbeError> {
    let key = random_key();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: {USER_AGENT}\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut buf = Vec::new();
    // The proxy's own judgement of an upstream's 101, so a server passes the probe exactly when
    // it would pass a real client's upgrade.
    let answer = read_head(stream, &mut buf, |b| {
        handshake::parse_response(b, &key, &HEAD_LIMITS)
    })
    .await?;
    match answer {
        UpstreamAnswer::Upgraded { .. } => Ok(()),
        UpstreamAnswer::Refused { status, .. } => Err(ProbeError::NotSwitching(status)),
    }
}

/// Ends an upgraded probe connection: a Close frame, then reading until the server closes, so
/// neither side is left with unread data (which would turn the close into a reset).
async fn close_websocket(stream: &mut TcpStream) {
    let frame = close_frame(random_mask());
    if let Err(error) = stream.write_all(&frame).await {
        tracing::debug!(%error, "health probe: cannot send the close frame");
        return;
    }
    let mut sink = [0u8; 1024];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// A masked Close frame with status 1000 (RFC 6455 §5.5.1); a client must mask every frame it
/// sends (§5.3).
fn close_frame(mask: [u8; 4]) -> [u8; 8] {
    let [high, low] = 1000u16.to_be_bytes();
    [
        0x88, // FIN, opcode 8 (Close)
        0x82, // MASK, payload length 2
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        high ^ mask[0],
        low ^ mask[1],
    ]
}

/// Reads into `buf` until `parse` finds a complete head (at most [`HEAD_LIMITS`] bytes: `parse`
/// reports an incomplete head of that size as too large).
async fn read_head<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, ResponseError>,
) -> Result<T, ProbeError> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse(buf)? {
            return Ok(head);
        }
        let room = HEAD_LIMITS.max_bytes.saturating_sub(buf.len());
        if room == 0 {
            return Err(ResponseError::TooLarge(HEAD_LIMITS.max_bytes).into());
        }
        let want = room.min(chunk.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(ProbeError::Io)?;
        if n == 0 {
            return Err(ProbeError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A `Sec-WebSocket-Key`: base64 of 16 random bytes.
fn random_key() -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&random_u64().to_ne_bytes());
    bytes[8..].copy_from_slice(&random_u64().to_ne_bytes());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A frame's masking key.
fn random_mask() -> [u8; 4] {
    let [a, b, c, d, ..] = random_u64().to_ne_bytes();
    [a, b, c, d]
}

/// 64 unpredictable-enough bits without a dependency: std's `RandomState` is randomly keyed per
/// thread and re-keyed on every call, and hashing the clock varies it further. The key and mask
/// only need to differ between probes, not to resist an attacker.
fn random_u64() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(crate::clock::monotonic_ns());
    hasher.finish()
}

/// A server's active-health state, shared by the checker (writes) and every worker (reads,
/// lock-free).
#[derive(Debug)]
pub struct ActiveHealth {
    /// In balancing.
    up: AtomicBool,
    /// Results in a row against the current state: failures while up, successes while down.
    streak: AtomicU32,
    /// Monotonic ns when the server last came back up; 0 if it never went down.
    up_since_ns: AtomicU64,
}

impl ActiveHealth {
    /// Starts up (a server is presumed up until `fall` probes fail: a restart of the proxy must
    /// not refuse everything while the first probes run), up since 0 (no slow start at start).
    pub fn new() -> ActiveHealth {
        ActiveHealth {
            up: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            up_since_ns: AtomicU64::new(0),
        }
    }

    /// Whether the server is in balancing.
    pub fn is_up(&self) -> bool {
        // Acquire pairs with the Release in `record`: a worker that sees the server back up
        // also sees the `up_since_ns` of that return.
        self.up.load(Ordering::Acquire)
    }

    /// Monotonic ns when it last came back up (0 if it never went down): slow start ramps from
    /// here.
    pub fn up_since_ns(&self) -> u64 {
        self.up_since_ns.load(Ordering::Relaxed)
    }

    /// Records a probe's result at `now_ns`; returns `Some(new_state)` when this result changed
    /// the state (`Some(false)`: taken out after `fall` failures in a row; `Some(true)`: back
    /// after `rise` successes in a row), `None` otherwise. `rise` and `fall` of 0 count as 1.
    pub fn record(&self, passed: bool, rise: u32, fall: u32, now_ns: u64) -> Option<bool> {
        // Only the checker calls this (one writer): nothing can change the atomics between a
        // load and the store that follows it, so plain loads and stores suffice, no
        // read-modify-write. Workers only read `up` and `up_since_ns`.
        let up = self.up.load(Ordering::Relaxed);
        if passed == up {
            // A result that agrees with the state breaks any streak against it.
            self.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.streak.load(Ordering::Relaxed).saturating_add(1);
        let needed = if up { fall } else { rise }.max(1);
        if streak < needed {
            self.streak.store(streak, Ordering::Relaxed);
            return None;
        }
        self.streak.store(0, Ordering::Relaxed);
        if passed {
            // 0 means "never went down"; a return at clock 0 is still a return.
            self.up_since_ns.store(now_ns.max(1), Ordering::Relaxed);
        }
        self.up.store(passed, Ordering::Release);
        Some(passed)
    }
}

impl Default for ActiveHealth {
    fn default() -> ActiveHealth {
        ActiveHealth::new()
    }
}

/// One server to check.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name of the pool the server belongs to.
    pub pool: String,
    /// The server.
    pub addr: SocketAddr,
    /// The pool's health-check settings.
    pub check: HealthCheck,
    /// Where the results go; the balancer reads the same state.
    pub health: Arc<ActiveHealth>,
}

/// The running checker thread; dropping it or calling [`Checker::stop`] stops the thread.
#[derive(Debug)]
pub struct Checker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checker {
    /// Stops the checker and waits for its thread to end (about one round, 100 ms); probes in
    /// flight are abandoned.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the health checker thread panicked");
            }
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        // No join here: a drop must not block its caller; the thread ends within a round.
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts the checker thread ("wsplice-health") running a tokio current-thread runtime.
///
/// Every 100 ms it calls `targets()` (the set can change: a config reload adds and removes
/// servers and pools) and starts a probe for each target whose next check is due: at once for a
/// new target, then `check.interval` after the previous probe ended; at most one probe is in
/// flight per (pool, address), and targets that disappeared are forgotten. Each result goes to
/// `target.health.record`; a state change is logged once and passed to `on_change(&target, up)`.
pub fn spawn_checker(
    targets: impl Fn() -> Vec<Target> + Send + 'static,
    on_change: impl Fn(&Target, bool) + Send + 'static,
) -> std::io::Result<Checker> {
    // Built here rather than in the thread so that a failure reaches the caller.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::Builder::new()
        .name("wsplice-health".into())
        .spawn(move || runtime.block_on(check_until_stopped(&targets, &on_change, &stopped)))?;
    Ok(Checker {
        stop,
        thread: Some(thread),
    })
}

/// The checker's loop: rounds every [`ROUND`], results as they come.
async fn check_until_stopped(
    targets: &dyn Fn() -> Vec<Target>,
    on_change: &dyn Fn(&Target, bool),
    stop: &AtomicBool,
) {
    let (results, mut outcomes) = mpsc::unbounded_channel();
    let mut schedule = Schedule::new(results);
    let mut rounds = tokio::time::interval(ROUND);
    rounds.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rounds.tick() => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                schedule.refresh(targets());
                schedule.start_due(Instant::now());
            }
            // Never `None`: the schedule holds a sender.
            Some(outcome) = outcomes.recv() => schedule.finish(outcome, on_change),
        }
    }
    schedule.abort_all();
}

/// A target's identity across calls of `targets()`.
type Key = (String, SocketAddr);

/// Where a target is in its cycle.
#[derive(Debug)]
enum Phase {
    /// The next probe starts at this instant.
    Due(Instant),
    /// A probe runs.
    Probing(AbortHandle),
}

/// The checker's view of one target.
#[derive(Debug)]
struct Slot {
    /// The target as last returned by `targets()`: a reload may change its settings or state.
    target: Target,
    phase: Phase,
    /// Tells this slot's results from a forgotten earlier slot's of the same key.
    generation: u64,
}

/// A finished probe.
#[derive(Debug)]
struct Outcome {
    key: Key,
    generation: u64,
    result: Result<(), ProbeError>,
}

/// Which target is probed when.
struct Schedule {
    slots: HashMap<Key, Slot>,
    next_generation: u64,
    results: mpsc::UnboundedSender<Outcome>,
}

impl Schedule {
    fn new(results: mpsc::UnboundedSender<Outcome>) -> Schedule {
        Schedule {
            slots: HashMap::new(),
            next_generation: 0,
            results,
        }
    }

    /// Takes in the current targets: new ones are due at once, gone ones are forgotten (their
    /// probe, if any, abandoned).
    fn refresh(&mut self, targets: Vec<Target>) {
        let now = Instant::now();
        let mut current = HashSet::with_capacity(targets.len());
        for target in targets {
            let key = (target.pool.clone(), target.addr);
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.target = target;
            } else {
                self.next_generation += 1;
                let slot = Slot {
                    target,
                    phase: Phase::Due(now),
                    generation: self.next_generation,
                };
                self.slots.insert(key.clone(), slot);
            }
            current.insert(key);
        }
        self.slots.retain(|key, slot| {
            let keep = current.contains(key);
            if !keep {
                abort(slot);
            }
            keep
        });
    }

    /// Starts a probe of every target due at `now`.
    fn start_due(&mut self, now: Instant) {
        for (key, slot) in &mut self.slots {
            if matches!(slot.phase, Phase::Due(due) if due <= now) {
                let task = spawn_probe(key.clone(), slot, self.results.clone());
                slot.phase = Phase::Probing(task);
            }
        }
    }

    /// Records a finished probe and schedules the next one.
    fn finish(&mut self, outcome: Outcome, on_change: &dyn Fn(&Target, bool)) {
        let Some(slot) = self.slots.get_mut(&outcome.key) else {
            return;
        };
        if slot.generation != outcome.generation {
            return;
        }
        let interval = slot.target.check.interval.min(MAX_INTERVAL);
        slot.phase = Phase::Due(Instant::now() + interval);
        report(&slot.target, &outcome.result, on_change);
    }

    /// Abandons every probe in flight (the checker stops).
    fn abort_all(&mut self) {
        self.slots.values_mut().for_each(abort);
    }
}

/// Abandons the slot's probe, if one runs.
fn abort(slot: &mut Slot) {
    if let Phase::Probing(task) = &slot.phase {
        task.abort();
    }
}

/// Starts a probe of the slot's target that sends its outcome to `results`.
fn spawn_probe(key: Key, slot: &Slot, results: mpsc::UnboundedSender<Outcome>) -> AbortHandle {
    let addr = slot.target.addr;
    let check = slot.target.check.clone();
    let generation = slot.generation;
    tokio::spawn(async move {
        let result = probe(addr, &check).await;
        // The receiver lives as long as the checker loop; a failed send means it stopped.
        let _ = results.send(Outcome {
            key,
            generation,
            result,
        });
    })
    .abort_handle()
}

/// Records a result in the target's state; logs and passes on a change.
fn report(target: &Target, result: &Result<(), ProbeError>, on_change: &dyn Fn(&Target, bool)) {
    if let Err(error) = result {
        tracing::debug!(pool = %target.pool, server = %target.addr, %error, "health probe failed");
    }
    let check = &target.check;
    let now_ns = crate::clock::monotonic_ns();
    let Some(up) = target
        .health
        .record(result.is_ok(), check.rise, check.fall, now_ns)
    else {
        return;
    };
    if up {
        tracing::info!(
            pool = %target.pool,
            server = %target.addr,
            "upstream server passed {} health checks in a row: back in balancing",
            check.rise
        );
    } else {
        let reason = match result {
            Err(error) => crate::error_chain::describe(error),
            Ok(()) => String::new(),
        };
        tracing::warn!(
            pool = %target.pool,
            server = %target.addr,
            %reason,
            "upstream server failed {} health checks in a row: out of balancing",
            check.fall
        );
    }
    on_change(target, up);
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;

    fn check(kind: ProbeKind, timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            kind,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(timeout_ms),
            rise: 2,
            fall: 2,
            send_proxy_header: false,
        }
    }

    fn http() -> ProbeKind {
        ProbeKind::Http {
            path: "/healthz".into(),
            host: "app.example".into(),
        }
    }

    fn websocket() -> ProbeKind {
        ProbeKind::WebSocket {
            path: "/ws".into(),
            host: "app.example".into(),
        }
    }

    /// A port nothing listens on.
    fn closed_port() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    }

    /// A server answering every request head with `answer`; each request head goes to the
    /// returned channel.
    async fn http_server(
        answer: &'static [u8],
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (heads, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap() == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
                stream.write_all(answer).await.unwrap();
            }
        });
        (addr, received)
    }

    /// A server that accepts and never answers.
    async fn silent_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(listener.accept().await.unwrap());
            }
        });
        addr
    }

    /// A tokio-tungstenite server; the first message of each connection goes to the channel.
    async fn websocket_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Message>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (messages, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let messages = messages.clone();
                tokio::spawn(async move {
                    let mut socket = tokio_tungstenite::accept_async(stream).await.unwrap();
                    if let Some(Ok(message)) = socket.next().await {
                        let _ = messages.send(message);
                    }
                    // Drive the close handshake to its end.
                    while socket.next().await.is_some() {}
                });
            }
        });
        (addr, received)
    }

    #[test]
    fn active_health_starts_up_and_goes_down_after_fall_failures_in_a_row() {
        let health = ActiveHealth::new();
        assert!(health.is_up());
        assert_eq!(health.up_since_ns(), 0);
        assert_eq!(health.record(false, 2, 3, 10), None);
        assert_eq!(health.record(false, 2, 3, 20), None);
        // A success in between resets the count.
        assert_eq!(health.record(true, 2, 3, 30), None);
        assert_eq!(health.record(false, 2, 3, 40), None);
        assert_eq!(health.record(false, 2, 3, 50), None);
        assert!(health.is_up());
        assert_eq!(health.record(false, 2, 3, 60), Some(false));
        assert!(!health.is_up());
        // Further failures change nothing and report nothing.
        assert_eq!(health.record(false, 2, 3, 70), None);
        assert_eq!(health.record(false, 2, 3, 80), None);
        assert_eq!(health.up_since_ns(), 0);
    }

    #[test]
    fn active_health_comes_back_after_rise_successes_in_a_row() {
        let health = ActiveHealth::default();
        assert_eq!(health.record(false, 2, 1, 10), Some(false));
        assert_eq!(health.record(true, 2, 1, 20), None);
        // A failure in between resets the count.
        assert_eq!(health.record(false, 2, 1, 30), None);
        assert_eq!(health.record(true, 2, 1, 40), None);
        assert!(!health.is_up());
        assert_eq!(health.record(true, 2, 1, 50), Some(true));
        assert!(health.is_up());
        assert_eq!(health.up_since_ns(), 50);
        assert_eq!(health.record(true, 2, 1, 60), None);
        assert_eq!(health.up_since_ns(), 50);
    }

    #[test]
    fn active_health_treats_zero_rise_and_fall_as_one() {
        let health = ActiveHealth::new();
        assert_eq!(health.record(false, 0, 0, 10), Some(false));
        assert_eq!(health.record(true, 0, 0, 20), Some(true));
    }

    #[tokio::test]
    async fn tcp_probe_passes_against_a_listener_and_fails_against_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        probe(addr, &check(ProbeKind::Tcp, 1000)).await.unwrap();
        let error = probe(closed_port(), &check(ProbeKind::Tcp, 1000))
            .await
            .unwrap_err();
        assert!(matches!(error, ProbeError::Connect(_)), "{error}");
    }

    #[tokio::test]
    async fn a_probe_to_a_proxy_protocol_server_sends_a_local_header_first() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 1024];
            // The header's own signature holds a blank line: read on to the request's end.
            while !(seen.len() > 16 && seen.ends_with(b"\r\n\r\n")) {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed early: {seen:?}");
                seen.extend_from_slice(&chunk[..n]);
            }
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
            stream.write_all(answer).await.unwrap();
            seen
        });
        let mut with_header = check(http(), 1000);
        with_header.send_proxy_header = true;
        probe(addr, &with_header).await.unwrap();
        let seen = server.await.unwrap();
        let local = crate::proxy_protocol::encode_v2(None);
        assert!(seen.starts_with(&local), "{seen:?}");
        assert!(
            seen[local.len()..].starts_with(b"GET /healthz HTTP/1.1\r\n"),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn http_probe_passes_on_200_and_sends_the_expected_request() {
        let (addr, mut heads) =
            http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        probe(addr, &check(http(), 1000)).await.unwrap();
        let head = heads.recv().await.unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nHost: app.example\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
        assert!(
            head.contains("\r\nUser-Agent: wsplice-health\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn http_probe_skips_an_interim_answer() {
        let (addr, _heads) =
            http_server(b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").await;
        probe(addr, &check(http(), 1000)).await.unwrap();
    }

    #[tokio::test]
    async fn http_probe_fails_on_503_with_the_status() {
        let (addr, _heads) =
            http_server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let error = probe(addr, &check(http(), 1000)).await.unwrap_err();
        assert!(matches!(error, ProbeError::Status(503)), "{error}");
        assert!(error.to_string().contains("503"), "{error}");
    }

    #[tokio::test]
    async fn http_probe_fails_on_garbage_and_on_an_early_close() {
        let (addr, _heads) = http_server(b"SSH-2.0-OpenSSH\r\n\r\n").await;
        let error = probe(addr, &check(http(), 1000)).await.unwrap_err();
        assert!(matches!(error, ProbeError::Malformed(_)), "{error}");

        let (addr, _heads) = http_server(b"HTTP/1.1 200").await;
        let error = probe(addr, &check(http(), 1000)).await.unwrap_err();
        assert!(matches!(error, ProbeError::Closed), "{error}");
    }

    #[tokio::test]
    async fn http_probe_fails_on_a_head_larger_than_16_kib() {
        let answer = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n",
            "a".repeat(17 * 1024)
        );
        let (addr, _heads) = http_server(answer.leak().as_bytes()).await;
        let error = probe(addr, &check(http(), 1000)).await.unwrap_err();
        assert!(matches!(error, ProbeError::Malformed(_)), "{error}");
    }

    #[tokio::test]
    async fn http_probe_times_out_against_a_silent_server() {
        let addr = silent_server().await;
        let started = std::time::Instant::now();
        let error = probe(addr, &check(http(), 200)).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(error, ProbeError::TimedOut(_)), "{error}");
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    #[tokio::test]
    async fn websocket_probe_passes_and_closes_with_1000() {
        let (addr, mut messages) = websocket_server().await;
        probe(addr, &check(websocket(), 2000)).await.unwrap();
        let message = tokio::time::timeout(Duration::from_secs(2), messages.recv())
            .await
            .unwrap()
            .unwrap();
        match message {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn websocket_probe_fails_against_an_http_server() {
        let (addr, _heads) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let error = probe(addr, &check(websocket(), 1000)).await.unwrap_err();
        assert!(matches!(error, ProbeError::NotSwitching(200)), "{error}");
    }

    #[tokio::test]
    async fn websocket_probe_fails_on_a_wrong_accept_key() {
        let (addr, _heads) = http_server(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        )
        .await;
        let error = probe(addr, &check(websocket(), 1000)).await.unwrap_err();
        assert!(matches!(error, ProbeError::BadUpgrade(_)), "{error}");
    }

    #[test]
    fn keys_are_16_random_bytes_and_the_close_frame_is_masked_1000() {
        let decode = |key: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(key)
                .unwrap()
        };
        let (a, b) = (random_key(), random_key());
        assert_ne!(a, b);
        assert_eq!(decode(&a).len(), 16);
        let mask = [1, 2, 3, 4];
        let frame = close_frame(mask);
        assert_eq!(&frame[..6], &[0x88, 0x82, 1, 2, 3, 4]);
        let code = u16::from_be_bytes([frame[6] ^ mask[0], frame[7] ^ mask[1]]);
        assert_eq!(code, 1000);
    }

    fn tcp_target(addr: SocketAddr) -> Target {
        Target {
            pool: "app".into(),
            addr,
            check: check(ProbeKind::Tcp, 200),
            health: Arc::new(ActiveHealth::new()),
        }
    }

    #[test]
    fn checker_takes_a_gone_server_out_and_brings_it_back() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = tcp_target(addr);
        let health = Arc::clone(&target.health);
        let (changes, changed) = std::sync::mpsc::channel();
        let checker = spawn_checker(
            move || vec![target.clone()],
            move |target, up| {
                let _ = changes.send((target.addr, up));
            },
        )
        .unwrap();
        let wait = Duration::from_secs(3);

        // While the server listens, nothing changes.
        assert!(changed.recv_timeout(Duration::from_millis(400)).is_err());
        assert!(health.is_up());

        drop(listener);
        assert_eq!(changed.recv_timeout(wait), Ok((addr, false)));
        assert!(!health.is_up());

        let _listener = std::net::TcpListener::bind(addr).unwrap();
        assert_eq!(changed.recv_timeout(wait), Ok((addr, true)));
        assert!(health.is_up());
        assert!(health.up_since_ns() > 0);

        let started = std::time::Instant::now();
        checker.stop();
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn checker_forgets_a_removed_target() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let counter = {
            let (connects, done) = (Arc::clone(&connects), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok(_) => {
                            connects.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let targets = Arc::new(Mutex::new(vec![tcp_target(addr)]));
        let shared = Arc::clone(&targets);
        let checker = spawn_checker(move || shared.lock().unwrap().clone(), |_, _| {}).unwrap();

        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while connects.load(Ordering::Relaxed) < 2 {
            assert!(std::time::Instant::now() < deadline, "no probes");
            std::thread::sleep(Duration::from_millis(10));
        }
        targets.lock().unwrap().clear();
        // One round to notice, and any probe in flight ends.
        std::thread::sleep(Duration::from_millis(300));
        let after_removal = connects.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(connects.load(Ordering::Relaxed), after_removal);

        checker.stop();
        done.store(true, Ordering::Relaxed);
        counter.join().unwrap();
    }
}
