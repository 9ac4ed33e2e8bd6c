//! The `http` workload: N keep-alive connections, each sending sequential small GETs for a fixed
//! time. Raw tokio TCP and a minimal response reader (httparse for the head, `Content-Length`
//! bodies only), so the load side costs little per request.
//!
//! Only `200` answers within the measured window count as requests (and latency samples);
//! every other status is an error (counted by status, the first one quoted), as is a broken
//! connection, a timeout or a response without `Content-Length`. A connection the server closes
//! (`Connection: close`, or an end between two requests) is opened again; after an error a
//! connection waits 100 ms before it goes on, so a refusing target is not hammered.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

use crate::quantile;

/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause after an error before the connection goes on.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What the workload does.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// `http://host:port/path`.
    pub url: String,
    /// Connections.
    pub conns: usize,
    /// Measured seconds (after the warm-up).
    pub seconds: f64,
    /// Warm-up seconds, not counted.
    pub warmup: f64,
    /// Local address to bind before connecting.
    pub source: Option<IpAddr>,
}

/// The target and the request every connection repeats.
struct Target {
    addr: SocketAddr,
    source: Option<IpAddr>,
    request: Vec<u8>,
}

/// What one connection saw.
#[derive(Debug, Default)]
struct Tally {
    /// `200` answers completed in the window.
    ok: u64,
    /// Answers of the whole run, any status, warm-up included.
    answered: u64,
    /// Round trips of those, µs.
    samples: Vec<u64>,
    /// Non-200 answers (whole run, warm-up included).
    statuses: BTreeMap<u16, u64>,
    /// Broken connections, timeouts, unframed responses, failed connects (whole run).
    failures: u64,
    /// Connections opened again after the server closed one cleanly.
    reopened: u64,
    first_error: Option<String>,
    /// Distinct `X-Echo-Connection` values: upstream connections the answers came over.
    upstream: HashSet<u64>,
}

impl Tally {
    fn error(&mut self, error: String) {
        self.first_error.get_or_insert(error);
    }
}

/// One response as far as the workload cares.
struct Response {
    status: u16,
    reason: String,
    close: bool,
    upstream: Option<u64>,
}

/// Runs the workload and returns its JSON result.
pub async fn run(options: HttpOptions) -> anyhow::Result<serde_json::Value> {
    let rest = options
        .url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {}", options.url))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let addr = tokio::net::lookup_host(if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
    .await?
    .next()
    .with_context(|| format!("{authority} does not resolve"))?;
    let target = std::sync::Arc::new(Target {
        addr,
        source: options.source,
        request: format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: wsplice-load\r\n\r\n"
        )
        .into_bytes(),
    });
    let started = Instant::now();
    let window_start = started + Duration::from_secs_f64(options.warmup);
    let window_end = window_start + Duration::from_secs_f64(options.seconds);
    let mut tasks = Vec::with_capacity(options.conns);
    for _ in 0..options.conns {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            connection(&target, window_start, window_end).await
        }));
    }
    let mut total = Tally::default();
    let mut upstream = HashSet::new();
    for task in tasks {
        let tally = task.await?;
        total.ok += tally.ok;
        total.answered += tally.answered;
        total.samples.extend(tally.samples);
        for (status, n) in tally.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
        total.failures += tally.failures;
        total.reopened += tally.reopened;
        if let Some(error) = tally.first_error {
            total.error(error);
        }
        upstream.extend(tally.upstream);
    }
    total.samples.sort_unstable();
    let non_200: u64 = total.statuses.values().sum();
    let statuses: serde_json::Map<String, serde_json::Value> = total
        .statuses
        .iter()
        .map(|(status, n)| (status.to_string(), (*n).into()))
        .collect();
    Ok(serde_json::json!({
        "workload": "http", "conns": options.conns, "seconds": options.seconds,
        "requests": total.ok, "per_second": total.ok as f64 / options.seconds,
        "answered": total.answered,
        "p50_us": quantile(&total.samples, 0.50), "p99_us": quantile(&total.samples, 0.99),
        "max_us": total.samples.last().copied().unwrap_or(0),
        "errors": non_200 + total.failures, "non_200": non_200, "statuses": statuses,
        "failures": total.failures, "reopened": total.reopened,
        "first_error": total.first_error,
        "upstream_connections": upstream.len(),
    }))
}

/// One client connection's loop until `window_end`, reopening it when it ends.
async fn connection(target: &Target, window_start: Instant, window_end: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    while Instant::now() < window_end {
        let conn = match &mut stream {
            Some(conn) => conn,
            None => match open(target).await {
                Ok(conn) => {
                    buf.clear();
                    stream.insert(conn)
                }
                Err(error) => {
                    tally.failures += 1;
                    tally.error(format!("{error:#}"));
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let answer =
            tokio::time::timeout(REQUEST_TIMEOUT, round_trip(conn, &target.request, &mut buf))
                .await
                .unwrap_or_else(|_| bail!("no response within {REQUEST_TIMEOUT:?}"));
        let done = Instant::now();
        match answer {
            Ok(response) => {
                tally.answered += 1;
                if let Some(serial) = response.upstream {
                    tally.upstream.insert(serial);
                }
                if response.status == 200 {
                    if sent >= window_start && done <= window_end {
                        tally.ok += 1;
                        tally.samples.push((done - sent).as_micros() as u64);
                    }
                } else {
                    *tally.statuses.entry(response.status).or_default() += 1;
                    tally.error(format!("HTTP {} {}", response.status, response.reason));
                }
                if response.close {
                    stream = None;
                    tally.reopened += 1;
                    if response.status != 200 {
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            Err(error) => {
                tally.failures += 1;
                tally.error(format!("{error:#}"));
                stream = None;
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    tally
}

async fn open(target: &Target) -> anyhow::Result<TcpStream> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = target.source {
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("bind {source}"))?;
    }
    let stream = tokio::time::timeout(REQUEST_TIMEOUT, socket.connect(target.addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect {}", target.addr))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `request` and reads one `Content-Length` response; `buf` keeps what arrived past it.
async fn round_trip(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<Response> {
    stream.write_all(request).await.context("send")?;
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut slots);
        if let httparse::Status::Complete(head_len) =
            parsed.parse(buf).context("invalid response head")?
        {
            let status = parsed.code.unwrap_or(0);
            let mut length = None;
            let mut close = parsed.version == Some(0);
            let mut upstream = None;
            for header in parsed.headers.iter() {
                let value = std::str::from_utf8(header.value).unwrap_or("");
                if header.name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                } else if header.name.eq_ignore_ascii_case("connection") {
                    close |= value
                        .split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("close"));
                } else if header.name.eq_ignore_ascii_case("x-echo-connection") {
                    upstream = value.trim().parse().ok();
                }
            }
            let reason = parsed.reason.unwrap_or("").to_owned();
            let Some(length) = length else {
                bail!("HTTP {status} {reason} without Content-Length");
            };
            while buf.len() < head_len + length {
                fill(stream, buf).await?;
            }
            buf.drain(..head_len + length);
            return Ok(Response {
                status,
                reason,
                close,
                upstream,
            });
        }
        fill(stream, buf).await?;
    }
}

/// Reads what is there into `buf`; the end of the stream is an error (a request is pending).
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await.context("receive")?;
    if n == 0 {
        bail!("connection closed before a complete response");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server answering every request on a connection with `answer` (a complete response),
    /// closing after it when `close`.
    async fn server(answer: &'static [u8], close: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if stream.write_all(answer).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn options(addr: SocketAddr) -> HttpOptions {
        HttpOptions {
            url: format!("http://{addr}/bench"),
            conns: 4,
            seconds: 0.3,
            warmup: 0.1,
            source: None,
        }
    }

    #[tokio::test]
    async fn counts_keep_alive_answers_and_their_upstream_connections() {
        let addr = server(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Echo-Connection: 7\r\n\r\nok\n",
            false,
        )
        .await;
        let json = run(options(addr)).await.unwrap();
        assert!(json["requests"].as_u64().unwrap() > 0, "{json}");
        assert_eq!(json["errors"], 0, "{json}");
        assert_eq!(json["reopened"], 0, "{json}");
        assert_eq!(json["upstream_connections"], 1, "{json}");
    }

    #[tokio::test]
    async fn counts_refusals_as_errors_by_status() {
        let addr = server(
            b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            true,
        )
        .await;
        let json = run(options(addr)).await.unwrap();
        assert_eq!(json["requests"], 0, "{json}");
        assert!(json["statuses"]["426"].as_u64().unwrap() > 0, "{json}");
        assert_eq!(json["non_200"], json["errors"], "{json}");
        assert_eq!(json["first_error"], "HTTP 426 Upgrade Required");
    }

    #[tokio::test]
    async fn a_response_without_content_length_is_a_failure() {
        let addr = server(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            false,
        )
        .await;
        let json = run(options(addr)).await.unwrap();
        assert_eq!(json["requests"], 0, "{json}");
        assert!(json["failures"].as_u64().unwrap() > 0, "{json}");
    }
}
