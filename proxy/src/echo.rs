//! `wsplice echo`: a WebSocket echo upstream for demos and tests.
//!
//! Echoes every text and binary message back unchanged, answers pings, echoes a Close. With a
//! record file it appends one JSON line per handshake — the path and every request header in the
//! order received — so tests can check exactly what the proxy forwarded.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Messages and frames up to this size are accepted.
const MAX_MESSAGE: usize = 64 << 20;

/// Options of the echo upstream.
#[derive(Debug, Clone)]
pub struct EchoOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Append one JSON line per handshake to this file.
    pub record: Option<PathBuf>,
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
        tokio::select! {
            () = serve(listener, record) => {}
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

/// Accepts and serves connections forever; a failed connection never stops the server.
pub async fn serve(listener: TcpListener, record: Record) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(echo(stream, peer, record.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "echo accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn echo(stream: TcpStream, peer: SocketAddr, record: Record) {
    let _ = stream.set_nodelay(true);
    // Record the head as it is on the wire (names in their original spelling) before the
    // WebSocket library parses it; peeking leaves the bytes for the handshake.
    let head = match peek_head(&stream).await {
        Ok(head) => head,
        Err(error) => {
            tracing::info!(%peer, %error, "echo: no request head");
            return;
        }
    };
    if let Some(file) = &record {
        write_record(file, &head);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
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

/// A request head as received: target and headers with original names.
struct RawHead {
    path: String,
    headers: Vec<(String, String)>,
}

/// Peeks at the stream until a complete request head is there (at most 64 KiB, 10 s).
async fn peek_head(stream: &TcpStream) -> std::io::Result<RawHead> {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "head timeout"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut request = httparse::Request::new(&mut slots);
        match request.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {
                return Ok(RawHead {
                    path: request.path.unwrap_or_default().to_owned(),
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

fn write_record(file: &Mutex<std::fs::File>, head: &RawHead) {
    let line = serde_json::json!({ "path": head.path, "headers": head.headers });
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
        tokio::spawn(serve(listener, record));

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
}
