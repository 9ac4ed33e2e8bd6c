//! Plain HTTP/1.1 on raw sockets for the reverse-proxying tests: a client connection that reads
//! one response at a time and keeps what follows (keep-alive, pipelining), a parser for the
//! requests an upstream received, and a recording upstream that logs every byte it gets.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::bounded;

/// One response as the client read it.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The head as text (status line and header lines).
    pub head: String,
    /// Headers in received order.
    pub headers: Vec<(String, String)>,
    /// The body, decoded (chunked framing removed).
    pub body: Vec<u8>,
    /// The body as it was on the wire (chunk sizes, extensions and trailers included).
    pub raw_body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::header_values(&self.headers, name).first().copied()
    }

    /// Whether it says `Connection: close`.
    pub fn says_close(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("connection")
                && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
        })
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How a response body is delimited.
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A client connection speaking HTTP/1.1 over any stream (TCP or TLS).
pub struct HttpConn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl HttpConn<TcpStream> {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> HttpConn<TcpStream> {
        let stream = bounded(TcpStream::connect(addr)).await.expect("connect");
        let _ = stream.set_nodelay(true);
        HttpConn::new(stream)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HttpConn<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> HttpConn<S> {
        HttpConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// The stream, and the bytes read past the last response.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// The stream.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Writes `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) {
        bounded(self.stream.write_all(bytes))
            .await
            .expect("write to the proxy");
        let _ = bounded(self.stream.flush()).await;
    }

    /// Reads more bytes; `Ok(0)` at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = bounded(self.stream.read(&mut chunk)).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads one response to a request (`head_request`: the request was HEAD, so no body),
    /// panicking on anything else (the failure names what came instead).
    pub async fn response(&mut self, head_request: bool) -> Response {
        match self.try_response(head_request).await {
            Ok(response) => response,
            Err(error) => panic!("no complete response: {error}"),
        }
    }

    /// Reads one response; the error says what came instead (closed early, bad framing).
    pub async fn try_response(&mut self, head_request: bool) -> Result<Response, String> {
        let head_end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end + 4;
            }
            match self.fill().await {
                Ok(0) => {
                    return Err(format!(
                        "closed before a complete head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(_) => {}
                Err(error) => {
                    return Err(format!(
                        "read failed ({error}) before a complete head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        };
        let head_bytes: Vec<u8> = self.buf.drain(..head_end).collect();
        let head = String::from_utf8_lossy(&head_bytes).into_owned();
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut slots);
        parsed
            .parse(&head_bytes)
            .map_err(|e| format!("unparsable response head ({e}): {head:?}"))?;
        let status = parsed.code.unwrap_or(0);
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let value = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
        };
        let framing = if head_request || status < 200 || status == 204 || status == 304 {
            Framing::None
        } else if value("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
            Framing::Chunked
        } else if let Some(length) = value("content-length") {
            Framing::Length(
                length
                    .parse()
                    .map_err(|_| format!("bad Content-Length in {head:?}"))?,
            )
        } else {
            Framing::UntilClose
        };
        let mut response = Response {
            status,
            head,
            headers,
            body: Vec::new(),
            raw_body: Vec::new(),
        };
        match framing {
            Framing::None => {}
            Framing::Length(length) => {
                let length = length as usize;
                while self.buf.len() < length {
                    match self.fill().await {
                        Ok(0) | Err(_) => {
                            return Err(format!(
                                "closed after {} of {length} body bytes: {:?}",
                                self.buf.len(),
                                response.head
                            ))
                        }
                        Ok(_) => {}
                    }
                }
                response.body = self.buf.drain(..length).collect();
                response.raw_body = response.body.clone();
            }
            Framing::UntilClose => {
                while let Ok(n) = self.fill().await {
                    if n == 0 {
                        break;
                    }
                }
                response.body = std::mem::take(&mut self.buf);
                response.raw_body = response.body.clone();
            }
            Framing::Chunked => loop {
                match parse_chunked(&self.buf) {
                    Chunked::Complete { body, used } => {
                        response.body = body;
                        response.raw_body = self.buf.drain(..used).collect();
                        break;
                    }
                    Chunked::Invalid(why) => {
                        return Err(format!("bad chunked body ({why}): {:?}", response.head))
                    }
                    Chunked::Partial => match self.fill().await {
                        Ok(0) | Err(_) => {
                            return Err(format!(
                                "closed inside a chunked body: {:?}",
                                response.head
                            ))
                        }
                        Ok(_) => {}
                    },
                }
            },
        }
        Ok(response)
    }

    /// Reads only a response head (for bodies too large to hold: read them with
    /// [`HttpConn::body_chunk`]); the returned body is empty.
    pub async fn response_head(&mut self) -> Response {
        let head_end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end + 4;
            }
            let n = self.fill().await.expect("read a response head");
            assert!(
                n > 0,
                "closed before a complete head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head_bytes: Vec<u8> = self.buf.drain(..head_end).collect();
        let mut slots = [httparse::EMPTY_HEADER; 128];
        let mut parsed = httparse::Response::new(&mut slots);
        parsed.parse(&head_bytes).expect("a response head");
        Response {
            status: parsed.code.unwrap_or(0),
            head: String::from_utf8_lossy(&head_bytes).into_owned(),
            headers: parsed
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            body: Vec::new(),
            raw_body: Vec::new(),
        }
    }

    /// The next bytes of the stream (what is buffered first); empty at its end.
    pub async fn body_chunk(&mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            let _ = self.fill().await.expect("read a body");
        }
        std::mem::take(&mut self.buf)
    }

    /// Waits (bounded) for the end of the stream; returns whatever bytes came before it
    /// (empty: the proxy closed without another byte). A reset counts as the end.
    pub async fn until_closed(&mut self) -> Vec<u8> {
        loop {
            match self.fill().await {
                Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                Ok(_) => {}
            }
        }
    }

    /// Whether the peer closed within `within` without sending anything more (`None`: still
    /// open at the deadline; `Some(bytes)`: closed after those bytes).
    pub async fn closed_within(&mut self, within: std::time::Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + within;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(std::mem::take(&mut self.buf)),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The result of parsing a chunked body at the start of a buffer.
#[derive(Debug)]
pub enum Chunked {
    /// The whole body: decoded data, and how many buffer bytes it used (trailers included).
    Complete { body: Vec<u8>, used: usize },
    /// Not all there yet.
    Partial,
    /// Not a valid chunked body.
    Invalid(String),
}

/// Parses a chunked body (RFC 9112 §7.1) at the start of `buf`, strictly: hex sizes of at most
/// 16 digits, extensions `;name[=value]`, CRLF line ends, a trailer section.
pub fn parse_chunked(buf: &[u8]) -> Chunked {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let Some(line_len) = find(&buf[pos..], b"\r\n") else {
            return if buf[pos..].contains(&b'\n') {
                Chunked::Invalid("bare LF in a chunk line".into())
            } else {
                Chunked::Partial
            };
        };
        let line = &buf[pos..pos + line_len];
        if line.contains(&b'\n') || line.contains(&b'\r') {
            return Chunked::Invalid("bare CR or LF in a chunk line".into());
        }
        let (size_text, ext) = match line.iter().position(|&b| b == b';') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        if size_text.is_empty()
            || size_text.len() > 16
            || !size_text.iter().all(u8::is_ascii_hexdigit)
        {
            return Chunked::Invalid(format!(
                "chunk size {:?}",
                String::from_utf8_lossy(size_text)
            ));
        }
        if let Some(ext) = ext {
            if ext.is_empty() || ext.iter().any(|&b| b == b' ' || b == b'\t' || b < 0x20) {
                return Chunked::Invalid("chunk extension".into());
            }
        }
        let size = u64::from_str_radix(std::str::from_utf8(size_text).unwrap_or("x"), 16)
            .unwrap_or(u64::MAX) as usize;
        pos += line_len + 2;
        if size == 0 {
            // Trailer section: header lines up to an empty line.
            loop {
                let Some(len) = find(&buf[pos..], b"\r\n") else {
                    return Chunked::Partial;
                };
                let line = &buf[pos..pos + len];
                pos += len + 2;
                if line.is_empty() {
                    return Chunked::Complete { body, used: pos };
                }
                if line.contains(&b'\n') || !line.contains(&b':') {
                    return Chunked::Invalid("trailer line".into());
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Chunked::Partial;
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size;
        if &buf[pos..pos + 2] != b"\r\n" {
            return Chunked::Invalid("no CRLF after chunk data".into());
        }
        pos += 2;
    }
}

/// One request as an upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method as sent.
    pub method: String,
    /// Request target as sent.
    pub target: String,
    /// Headers in received order.
    pub headers: Vec<(String, String)>,
    /// Decoded body.
    pub body: Vec<u8>,
    /// The whole request as received.
    pub raw: Vec<u8>,
}

impl Request {
    /// The values of header `name` (any case).
    pub fn values(&self, name: &str) -> Vec<&str> {
        crate::header_values(&self.headers, name)
    }

    /// `METHOD target`, the target in origin form (`http://host/x` → `/x`).
    pub fn line(&self) -> String {
        let target = match self.target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => self.target.as_str(),
        };
        format!("{} {target}", self.method)
    }
}

/// Parses the complete requests at the start of `bytes` (one upstream connection's input);
/// returns them and what is left (an incomplete or unparsable tail).
pub fn parse_requests(bytes: &[u8]) -> (Vec<Request>, Vec<u8>) {
    let mut requests = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        match parse_request(&bytes[pos..]) {
            Some((request, used)) => {
                requests.push(request);
                pos += used;
            }
            None => break,
        }
    }
    (requests, bytes[pos..].to_vec())
}

/// One complete request at the start of `bytes` and its length, or `None` (incomplete or
/// unparsable).
fn parse_request(bytes: &[u8]) -> Option<(Request, usize)> {
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(head_len) = parsed.parse(bytes).ok()? else {
        return None;
    };
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut request = Request {
        method: parsed.method?.to_owned(),
        target: parsed.path?.to_owned(),
        headers,
        body: Vec::new(),
        raw: Vec::new(),
    };
    let te = request.values("transfer-encoding").join(",");
    let cl = request.values("content-length");
    let used = if te.to_ascii_lowercase().trim_end().ends_with("chunked") {
        match parse_chunked(&bytes[head_len..]) {
            Chunked::Complete { body, used } => {
                request.body = body;
                head_len + used
            }
            _ => return None,
        }
    } else if let Some(length) = cl.first() {
        let length: usize = length.trim().parse().ok()?;
        if bytes.len() < head_len + length {
            return None;
        }
        request.body = bytes[head_len..head_len + length].to_vec();
        head_len + length
    } else {
        head_len
    };
    request.raw = bytes[..used].to_vec();
    Some((request, used))
}

/// What a [`Recorder`] answers to a complete request: the raw response bytes.
pub type Answer = Arc<dyn Fn(&Request) -> Vec<u8> + Send + Sync>;

/// An upstream on 127.0.0.1 that logs every byte each connection sends it and answers each
/// complete request it can parse (keep-alive) with what its answer function returns; an
/// unparsable request is never answered (the bytes are still logged).
pub struct Recorder {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    /// Answers every request `200 OK` with the body `ok`.
    pub async fn start() -> Recorder {
        Recorder::answering(Arc::new(|_: &Request| {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()
        }))
        .await
    }

    /// Answers with `answer`.
    pub async fn answering(answer: Answer) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recording upstream");
        let addr = listener.local_addr().expect("addr");
        let log: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let connections = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let index = {
                    let mut log = connections.lock().unwrap();
                    log.push(Vec::new());
                    log.len() - 1
                };
                let log = connections.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut chunk = vec![0u8; 64 * 1024];
                    loop {
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        log.lock().unwrap()[index].extend_from_slice(&chunk[..n]);
                        pending.extend_from_slice(&chunk[..n]);
                        while let Some((request, used)) = parse_request(&pending) {
                            pending.drain(..used);
                            if stream.write_all(&answer(&request)).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Recorder { addr, log, task }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections it accepted so far.
    pub fn connections(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Each connection's bytes received since the last `take` (connections that got nothing
    /// since then left out), in accept order; the log is cleared.
    pub fn take(&self) -> Vec<Vec<u8>> {
        let mut log = self.log.lock().unwrap();
        log.iter_mut()
            .map(std::mem::take)
            .filter(|bytes| !bytes.is_empty())
            .collect()
    }

    /// Every connection's bytes so far (not cleared), in accept order.
    pub fn bytes(&self) -> Vec<Vec<u8>> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// FNV-1a 64 of `bytes` continuing from `hash` (start with [`FNV_OFFSET`]).
pub fn fnv1a64(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The FNV-1a 64 offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The echo's `/bytes/N` pattern: byte `i` is `i % 251`; fills `buf` for offset `start`.
pub fn pattern_at(start: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = ((start + i as u64) % 251) as u8;
    }
}

/// The echo's JSON answer to a POST/PUT of `body`: `{"bytes": n, "fnv1a64": "<16 hex>"}`.
pub fn echo_digest(body: &[u8]) -> (u64, String) {
    (
        body.len() as u64,
        format!("{:016x}", fnv1a64(FNV_OFFSET, body)),
    )
}

/// Reads the echo's JSON digest answer: `(bytes, fnv1a64)`.
pub fn parse_digest(body: &[u8]) -> (u64, String) {
    let value: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("echo digest {:?}: {e}", String::from_utf8_lossy(body)));
    (
        value["bytes"].as_u64().expect("bytes"),
        value["fnv1a64"].as_str().expect("fnv1a64").to_owned(),
    )
}
