//! `wsplice echo`: a WebSocket and plain HTTP/1.1 echo upstream for demos, tests and benchmarks.
//!
//! A request with `Upgrade: websocket` is handed to the WebSocket library: every text and binary
//! message is echoed back unchanged, pings answered, a Close echoed. Any other request is served
//! as plain HTTP/1.1 on a keep-alive connection ([`http`]), and a later upgrade request on that
//! connection still becomes a WebSocket. With a record file the echo appends one JSON line per
//! request — the path and every request header in the order received (plain requests also
//! name their method and connection serial) — so tests can check exactly what the proxy
//! forwarded.

mod http;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Messages and frames up to this size are accepted.
const MAX_MESSAGE: usize = 64 << 20;

/// How long the first request head of a connection may take to arrive.
const FIRST_HEAD: Duration = Duration::from_secs(10);

/// How long a keep-alive connection may wait for its next request head: longer than the idle
/// timeouts of the proxies' upstream pools, so a pool closes an idle connection first (the echo
/// closing it under a request in flight would read as a proxy error).
const KEEP_ALIVE: Duration = Duration::from_secs(75);

/// The serial of the last accepted connection (`X-Echo-Connection`), per process.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Options of the echo upstream.
#[derive(Debug, Clone)]
pub struct EchoOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Append one JSON line per handshake to this file.
    pub record: Option<PathBuf>,
    /// Small per-connection WebSocket buffers (a 4 KiB read buffer, writes unbuffered) instead
    /// of tungstenite's 128 KiB: for benchmarks that hold very many idle tunnels, where the
    /// echo's buffers would otherwise be most of the machine's memory.
    pub small_buffers: bool,
}

/// Why the echo upstream stopped.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    /// The runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The record file could not be opened.
    #[error("cannot open the record file {path}: {source}")]
    Record {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Runs the echo upstream until SIGINT or SIGTERM.
pub fn run(options: EchoOptions) -> Result<(), EchoError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(EchoError::Runtime)?;
    runtime.block_on(async {
        let listener = bind_shared(options.listen).map_err(|source| EchoError::Bind {
            addr: options.listen,
            source,
        })?;
        tracing::info!(addr = %options.listen, "echo upstream listening");
        let record = open_record(options.record)?;
        let buffers = if options.small_buffers {
            Buffers::Small
        } else {
            Buffers::Large
        };
        tokio::select! {
            () = serve(listener, record, buffers) => {}
            () = termination() => tracing::info!("echo upstream stopping"),
        }
        Ok(())
    })
}

/// Binds `addr` with `SO_REUSEPORT`, so several echo processes can share one port (one
/// process holds at most its descriptor limit's worth of connections).
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Where handshakes are recorded.
pub type Record = Option<Arc<Mutex<std::fs::File>>>;

/// Opens (appends to) the record file.
pub fn open_record(path: Option<PathBuf>) -> Result<Record, EchoError> {
    path.map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map(|file| Arc::new(Mutex::new(file)))
            .map_err(|source| EchoError::Record { path, source })
    })
    .transpose()
}

/// The WebSocket buffers of each echoed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    /// tungstenite's defaults (128 KiB read buffer): for throughput.
    Large,
    /// A 4 KiB read buffer and unbuffered writes: for many mostly idle connections.
    Small,
}

/// Accepts and serves connections forever; a failed connection never stops the server.
pub async fn serve(listener: TcpListener, record: Record, buffers: Buffers) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(echo(stream, peer, record.clone(), buffers));
            }
            Err(error) => {
                tracing::warn!(%error, "echo accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn echo(mut stream: TcpStream, peer: SocketAddr, record: Record, buffers: Buffers) {
    let _ = stream.set_nodelay(true);
    let serial = CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1;
    let mut wait = FIRST_HEAD;
    let mut buf = Vec::new();
    loop {
        // The head as it is on the wire (names in their original spelling), peeked: it stays
        // in the socket for the WebSocket handshake or is consumed by the plain HTTP answer.
        let head = match peek_head(&stream, &mut buf, wait).await {
            Ok(head) => head,
            Err(error) if wait == FIRST_HEAD => {
                tracing::info!(%peer, %error, "echo: no request head");
                return;
            }
            Err(error) => {
                tracing::debug!(%peer, %error, serial, "echo: keep-alive connection done");
                return;
            }
        };
        if head.is_upgrade() {
            if let Some(file) = &record {
                write_record(file, &head, None);
            }
            // A held tunnel keeps no head buffer.
            drop(buf);
            return websocket(stream, peer, buffers).await;
        }
        if let Some(file) = &record {
            write_record(file, &head, Some(serial));
        }
        match http::answer(&mut stream, &head, serial).await {
            Ok(http::Next::KeepAlive) => wait = KEEP_ALIVE,
            Ok(http::Next::Close) => {
                let _ = stream.shutdown().await;
                return;
            }
            Err(error) => {
                tracing::debug!(%peer, %error, serial, "echo: plain HTTP connection failed");
                return;
            }
        }
    }
}

/// Serves a WebSocket on `stream`, whose upgrade request is still unread in the socket.
async fn websocket(stream: TcpStream, peer: SocketAddr, buffers: Buffers) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let config = match buffers {
        Buffers::Large => config,
        Buffers::Small => config.read_buffer_size(4096).write_buffer_size(0),
    };
    let mut ws = match tokio_tungstenite::accept_async_with_config(stream, Some(config)).await {
        Ok(ws) => ws,
        Err(error) => {
            tracing::info!(%peer, %error, "echo handshake failed");
            return;
        }
    };
    let reason = loop {
        match ws.next().await {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                if let Err(error) = ws.send(message).await {
                    break format!("send failed: {error}");
                }
            }
            Some(Ok(Message::Close(_))) => {
                // tungstenite queued the answering Close: drive the stream until it is sent
                // and the connection ends.
                let _ = ws.flush().await;
                while let Some(Ok(_)) = ws.next().await {}
                break "client closed".to_owned();
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => break format!("read failed: {error}"),
            None => break "connection ended".to_owned(),
        }
    };
    tracing::debug!(%peer, %reason, "echo connection done");
}

/// A request head as received: method, target, version and headers with original names.
struct RawHead {
    method: String,
    path: String,
    /// The minor version: `1` for HTTP/1.1, `0` for HTTP/1.0.
    version: u8,
    headers: Vec<(String, String)>,
    /// Bytes of the head on the wire, final empty line included.
    len: usize,
}

impl RawHead {
    /// The values of every header named `name` (any case), in received order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header `name` lists `token` (any case).
    fn lists(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `Upgrade: websocket`: the request goes to the WebSocket library.
    fn is_upgrade(&self) -> bool {
        self.lists("upgrade", "websocket")
    }
}

/// Peeks at the stream until a complete request head is there (at most 64 KiB, within `wait`),
/// into `buf` (the connection's, kept across its requests).
async fn peek_head(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    wait: Duration,
) -> std::io::Result<RawHead> {
    buf.resize(64 * 1024, 0);
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "head timeout"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut request = httparse::Request::new(&mut slots);
        match request.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(len)) => {
                return Ok(RawHead {
                    method: request.method.unwrap_or_default().to_owned(),
                    path: request.path.unwrap_or_default().to_owned(),
                    version: request.version.unwrap_or(1),
                    headers: request
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    len,
                });
            }
            Ok(httparse::Status::Partial) if n < buf.len() => {}
            Ok(httparse::Status::Partial) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "head too large",
                ))
            }
            Err(error) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    error.to_string(),
                ))
            }
        }
        if n == last {
            // Peek returns at once while the queued bytes do not change: wait a little.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        last = n;
    }
}

/// Appends `head` to the record file; a plain request (with its connection's serial) also
/// names its method and connection.
fn write_record(file: &Mutex<std::fs::File>, head: &RawHead, plain: Option<u64>) {
    let line = match plain {
        None => serde_json::json!({ "path": head.path, "headers": head.headers }),
        Some(serial) => serde_json::json!({
            "path": head.path,
            "headers": head.headers,
            "method": head.method,
            "connection": serial,
        }),
    };
    let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(error) = writeln!(file, "{line}").and_then(|()| file.flush()) {
        tracing::warn!(%error, "cannot write the record file");
    }
}

async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_messages_and_records_the_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = std::env::temp_dir().join(format!("wsplice-echo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("record.jsonl");
        let _ = std::fs::remove_file(&path);
        let record = open_record(Some(path.clone())).unwrap();
        tokio::spawn(serve(listener, record, Buffers::Large));

        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{addr}/room?x=1"),
            )
            .unwrap();
        let mut request = request;
        request
            .headers_mut()
            .insert("X-Forwarded-For", "10.0.0.1".parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        let big = vec![7u8; 1 << 20];
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
        ws.close(None).await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(line["path"], "/room?x=1");
        let headers = line["headers"].as_array().unwrap();
        assert!(headers
            .iter()
            .any(|h| h[0] == "x-forwarded-for" && h[1] == "10.0.0.1"));
        assert!(headers.iter().any(|h| h[0] == "Sec-WebSocket-Key"));
    }

    #[tokio::test]
    async fn small_buffers_still_echo_messages_larger_than_the_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, None, Buffers::Small));
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        for len in [1, 4095, 4096, 4097, 100_000, 1 << 20] {
            let sent: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            ws.send(Message::binary(sent.clone())).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(sent));
        }
        ws.close(None).await.unwrap();
    }
}
