//! Plain HTTP/1.1 on the echo upstream: keep-alive, request bodies framed by `Content-Length`
//! or chunked, `Expect: 100-continue`, `HEAD`, `Connection: close` and HTTP/1.0 (closed after
//! the answer).
//!
//! - `GET`/`HEAD` (and any method but `POST`/`PUT`): `200 text/plain`,
//!   `wsplice echo: <METHOD> <target>\n`.
//! - `GET /bytes/<N>`: N bytes, byte i being `i % 251`, written 64 KiB at a time; chunked with
//!   `?chunked=1`.
//! - `POST`/`PUT`: the body is read as it streams and answered with
//!   `{"bytes": <n>, "fnv1a64": "<16 hex digits>"}` (of the decoded payload); on `/echo` the body
//!   itself comes back (at most [`MAX_ECHO_BODY`]).
//!
//! Every response carries `X-Echo-Connection: <serial>`, the connection's number in this
//! process, so a test sees which requests shared a connection. The echo reads its input less
//! strictly than the proxy does (a bare LF ends a line, chunk extensions are skipped).

use std::future::Future;
use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::RawHead;

/// Bytes written at a time by `/bytes/<N>`, and read at a time from a request body.
const IO_CHUNK: usize = 64 * 1024;

/// The largest body `/echo` sends back.
pub const MAX_ECHO_BODY: u64 = 16 << 20;

/// How long one read or write may make no progress.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The period of the `/bytes/<N>` pattern.
const PATTERN_PERIOD: usize = 251;

/// What the connection does after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Wait for the next request.
    KeepAlive,
    /// Close the connection.
    Close,
}

/// How a request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` (no header: 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl Framing {
    fn of(head: &RawHead) -> Result<Framing, &'static str> {
        let mut codings = head.values("transfer-encoding").peekable();
        if codings.peek().is_some() {
            let last = codings
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .last();
            return match last {
                Some(coding) if coding.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
                _ => Err("unsupported Transfer-Encoding"),
            };
        }
        let mut length = None;
        for value in head.values("content-length") {
            let n = value
                .trim()
                .parse::<u64>()
                .map_err(|_| "invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length");
            }
            length = Some(n);
        }
        Ok(Framing::Length(length.unwrap_or(0)))
    }

    fn has_body(self) -> bool {
        self != Framing::Length(0)
    }
}

/// Answers the plain request `head`, still unread in `stream`: consumes its head and body and
/// writes the response.
pub(super) async fn answer(
    stream: &mut TcpStream,
    head: &RawHead,
    serial: u64,
) -> io::Result<Next> {
    skip(stream, head.len).await?;
    let close = head.version == 0 || head.lists("connection", "close");
    let reply = Reply { serial, close };
    let framing = match Framing::of(head) {
        Ok(framing) => framing,
        Err(reason) => return reply.error(stream, "400 Bad Request", reason).await,
    };
    let (path, query) = head.path.split_once('?').unwrap_or((&head.path, ""));
    let method = head.method.as_str();
    let echo = matches!(method, "POST" | "PUT") && path == "/echo";
    if echo && matches!(framing, Framing::Length(n) if n > MAX_ECHO_BODY) {
        return reply
            .error(
                stream,
                "413 Content Too Large",
                "/echo sends back 16 MiB at most",
            )
            .await;
    }
    if head.version == 1 && head.lists("expect", "100-continue") && framing.has_body() {
        timed(stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")).await?;
    }
    let mut body = Body {
        kept: echo.then(Vec::new),
        ..Body::default()
    };
    if let Err(error) = read_body(stream, framing, &mut body).await {
        return match error.kind() {
            _ if body.too_large => {
                reply
                    .error(
                        stream,
                        "413 Content Too Large",
                        "/echo sends back 16 MiB at most",
                    )
                    .await
            }
            io::ErrorKind::InvalidData => {
                reply
                    .error(stream, "400 Bad Request", "invalid chunked body")
                    .await
            }
            _ => Err(error),
        };
    }
    match (method, body.kept) {
        (_, Some(kept)) => {
            reply
                .send(stream, "application/octet-stream", &kept, false)
                .await
        }
        ("POST" | "PUT", None) => {
            let json = format!(
                "{{\"bytes\": {}, \"fnv1a64\": \"{:016x}\"}}\n",
                body.bytes, body.hash.0
            );
            reply
                .send(stream, "application/json", json.as_bytes(), false)
                .await
        }
        _ => {
            let head_only = method == "HEAD";
            match path.strip_prefix("/bytes/").map(str::parse::<u64>) {
                Some(Ok(n)) => {
                    let chunked =
                        head.version == 1 && query.split('&').any(|pair| pair == "chunked=1");
                    reply.bytes(stream, n, chunked, head_only).await
                }
                Some(Err(_)) => {
                    reply
                        .error(stream, "400 Bad Request", "/bytes/<N>: N is a count")
                        .await
                }
                None => {
                    let text = format!("wsplice echo: {method} {}\n", head.path);
                    reply
                        .send(stream, "text/plain", text.as_bytes(), head_only)
                        .await
                }
            }
        }
    }
}

/// How to answer: the connection's serial and whether it closes afterwards.
#[derive(Debug, Clone, Copy)]
struct Reply {
    serial: u64,
    close: bool,
}

impl Reply {
    fn next(self) -> Next {
        if self.close {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// The response head; `length` `None` means chunked.
    fn head(self, status: &str, content_type: &str, length: Option<u64>) -> Vec<u8> {
        let framing = match length {
            Some(n) => format!("Content-Length: {n}"),
            None => "Transfer-Encoding: chunked".to_owned(),
        };
        let connection = if self.close {
            "Connection: close\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{framing}\r\n\
             X-Echo-Connection: {}\r\n{connection}\r\n",
            self.serial
        )
        .into_bytes()
    }

    /// A complete response with `body` (its length only, for `HEAD`), in one write.
    async fn send(
        self,
        stream: &mut TcpStream,
        content_type: &str,
        body: &[u8],
        head_only: bool,
    ) -> io::Result<Next> {
        self.send_status(stream, "200 OK", content_type, body, head_only)
            .await
    }

    async fn send_status(
        self,
        stream: &mut TcpStream,
        status: &str,
        content_type: &str,
        body: &[u8],
        head_only: bool,
    ) -> io::Result<Next> {
        let mut out = self.head(status, content_type, Some(body.len() as u64));
        if !head_only {
            out.extend_from_slice(body);
        }
        timed(stream.write_all(&out)).await?;
        Ok(self.next())
    }

    /// An error answer; the connection closes after it (the rest of the request is unread).
    async fn error(self, stream: &mut TcpStream, status: &str, reason: &str) -> io::Result<Next> {
        let reply = Reply {
            close: true,
            ..self
        };
        reply
            .send_status(
                stream,
                status,
                "text/plain",
                format!("{reason}\n").as_bytes(),
                false,
            )
            .await
    }

    /// `n` pattern bytes, 64 KiB per write, never all in memory.
    async fn bytes(
        self,
        stream: &mut TcpStream,
        n: u64,
        chunked: bool,
        head_only: bool,
    ) -> io::Result<Next> {
        let length = (!chunked).then_some(n);
        timed(stream.write_all(&self.head("200 OK", "application/octet-stream", length))).await?;
        if head_only {
            return Ok(self.next());
        }
        let pattern = pattern();
        let mut sent = 0u64;
        while sent < n {
            let len = (n - sent).min(IO_CHUNK as u64) as usize;
            let start = (sent % PATTERN_PERIOD as u64) as usize;
            let data = &pattern[start..start + len];
            if chunked {
                timed(stream.write_all(format!("{len:x}\r\n").as_bytes())).await?;
                timed(stream.write_all(data)).await?;
                timed(stream.write_all(b"\r\n")).await?;
            } else {
                timed(stream.write_all(data)).await?;
            }
            sent += len as u64;
        }
        if chunked {
            timed(stream.write_all(b"0\r\n\r\n")).await?;
        }
        Ok(self.next())
    }
}

/// One write's worth of the `/bytes` pattern from any phase: byte j is `j % 251`, and
/// `pattern[p..p + 64 KiB]` continues a stream at any offset ≡ p (mod 251).
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..IO_CHUNK + PATTERN_PERIOD)
            .map(|j| (j % PATTERN_PERIOD) as u8)
            .collect()
    })
}

/// FNV-1a, 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a64(pub u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    /// Hashes `data` after what came before.
    pub fn update(&mut self, data: &[u8]) {
        for &byte in data {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// What a request body was: its length, hash, and the bytes themselves for `/echo`.
#[derive(Debug, Default)]
struct Body {
    bytes: u64,
    hash: Fnv1a64,
    kept: Option<Vec<u8>>,
    too_large: bool,
}

impl Body {
    fn take(&mut self, data: &[u8]) -> io::Result<()> {
        self.bytes += data.len() as u64;
        self.hash.update(data);
        if let Some(kept) = &mut self.kept {
            if (kept.len() + data.len()) as u64 > MAX_ECHO_BODY {
                self.too_large = true;
                return Err(invalid("body too large for /echo"));
            }
            kept.extend_from_slice(data);
        }
        Ok(())
    }
}

/// Reads the body as `framing` says, exactly: the next request stays in the socket.
async fn read_body(stream: &mut TcpStream, framing: Framing, body: &mut Body) -> io::Result<()> {
    if !framing.has_body() {
        return Ok(());
    }
    let mut buf = vec![0u8; IO_CHUNK];
    match framing {
        Framing::Length(mut left) => {
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                let n = timed(stream.read(&mut buf[..want])).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                body.take(&buf[..n])?;
                left -= n as u64;
            }
        }
        Framing::Chunked => {
            // Peek, decode up to the body's end, then consume exactly what was decoded.
            let mut decoder = ChunkedDecoder::default();
            while !decoder.is_done() {
                let n = timed(stream.peek(&mut buf)).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let used = decoder.feed(&buf[..n], &mut |data| body.take(data))?;
                timed(stream.read_exact(&mut buf[..used])).await?;
            }
        }
    }
    Ok(())
}

/// Reads and drops `len` bytes (a head already peeked and parsed).
async fn skip(stream: &mut TcpStream, mut len: usize) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while len > 0 {
        let want = len.min(buf.len());
        timed(stream.read_exact(&mut buf[..want])).await?;
        len -= want;
    }
    Ok(())
}

/// `io` within [`IO_TIMEOUT`].
async fn timed<T>(io: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, io)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no progress in 30 s"))?
}

fn invalid(reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// Where a chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In a size line: the value so far, its digits, and whether an extension began.
    Size {
        value: u64,
        digits: u8,
        extension: bool,
    },
    /// In a chunk's data: bytes left.
    Data(u64),
    /// After a chunk's data, before its line end.
    DataEnd,
    /// In the trailer: bytes of the current line so far.
    Trailer(usize),
    /// After the trailer's empty line.
    Done,
}

/// An incremental decoder of a chunked body (RFC 9112 §7.1), lenient: bare LF line ends,
/// extensions and trailer fields are skipped.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

impl ChunkState {
    /// The start of a chunk's size line.
    const SIZE_LINE: ChunkState = ChunkState::Size {
        value: 0,
        digits: 0,
        extension: false,
    };
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::SIZE_LINE,
        }
    }
}

impl ChunkedDecoder {
    /// Whether the body is complete (its last chunk and trailer were read).
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input`, giving the payload to `sink`; returns the bytes of `input` used:
    /// all of it, unless the body ended before (what follows belongs to the next message).
    pub fn feed(
        &mut self,
        input: &[u8],
        sink: &mut impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<usize> {
        let mut at = 0;
        while at < input.len() {
            match &mut self.state {
                ChunkState::Done => break,
                ChunkState::Data(left) => {
                    let take = (input.len() - at).min(usize::try_from(*left).unwrap_or(usize::MAX));
                    sink(&input[at..at + take])?;
                    at += take;
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                    continue;
                }
                ChunkState::Size {
                    value,
                    digits,
                    extension,
                } => match input[at] {
                    b'\n' if *digits == 0 => return Err(invalid("chunk size missing")),
                    b'\n' if *value == 0 => self.state = ChunkState::Trailer(0),
                    b'\n' => self.state = ChunkState::Data(*value),
                    b'\r' => {}
                    _ if *extension => {}
                    b';' | b' ' | b'\t' => *extension = true,
                    byte => {
                        let digit = (byte as char)
                            .to_digit(16)
                            .ok_or_else(|| invalid("invalid chunk size"))?;
                        if *digits >= 16 {
                            return Err(invalid("chunk size too large"));
                        }
                        *value = *value << 4 | u64::from(digit);
                        *digits += 1;
                    }
                },
                ChunkState::DataEnd => match input[at] {
                    b'\r' => {}
                    b'\n' => self.state = ChunkState::SIZE_LINE,
                    _ => return Err(invalid("chunk data longer than its size")),
                },
                ChunkState::Trailer(line) => match input[at] {
                    b'\r' => {}
                    b'\n' if *line == 0 => self.state = ChunkState::Done,
                    b'\n' => *line = 0,
                    _ => *line += 1,
                },
            }
            at += 1;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests;
