use std::net::SocketAddr;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use super::{ChunkedDecoder, Fnv1a64};
use crate::echo::{open_record, serve, Buffers, Record};

/// An echo upstream on an ephemeral 127.0.0.1 port.
async fn start(record: Record) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, record, Buffers::Large));
    addr
}

/// One response as received.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn serial(&self) -> u64 {
        self.header("x-echo-connection").unwrap().parse().unwrap()
    }
}

/// A raw HTTP/1.1 client reading exactly one response at a time (nothing past it stays
/// buffered, so the stream can be handed to a WebSocket client afterwards).
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk).await.unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next response; `head_only` for the answer to a HEAD.
    async fn response(&mut self, head_only: bool) -> Response {
        let (status, headers, len) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(len) = response.parse(&self.buf).unwrap() {
                let headers = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (response.code.unwrap(), headers, len);
            }
            assert!(
                self.fill().await,
                "connection closed before a response head"
            );
        };
        self.buf.drain(..len);
        let mut response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 100 {
            return response;
        }
        if response.header("transfer-encoding") == Some("chunked") {
            let mut decoder = ChunkedDecoder::default();
            let mut body = Vec::new();
            loop {
                let used = decoder
                    .feed(&self.buf, &mut |data| {
                        body.extend_from_slice(data);
                        Ok(())
                    })
                    .unwrap();
                self.buf.drain(..used);
                if decoder.is_done() {
                    break;
                }
                assert!(self.fill().await, "connection closed in a chunked body");
            }
            response.body = body;
        } else {
            let len: usize = response.header("content-length").unwrap().parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await, "connection closed in a body");
            }
            response.body = self.buf.drain(..len).collect();
        }
        response
    }

    /// Whether the server closed the connection (nothing more arrives).
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: echo\r\n\r\n").into_bytes()
}

fn fnv(data: &[u8]) -> String {
    let mut hash = Fnv1a64::default();
    hash.update(data);
    format!("{:016x}", hash.0)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn fnv1a64_matches_the_reference_values() {
    assert_eq!(fnv(b""), "cbf29ce484222325");
    assert_eq!(fnv(b"a"), "af63dc4c8601ec8c");
    assert_eq!(fnv(b"foobar"), "85944171f73967e8");
}

#[test]
fn chunked_decoder_stops_at_the_end_of_the_body() {
    let wire = b"4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1";
    let mut decoder = ChunkedDecoder::default();
    let mut out = Vec::new();
    // Byte by byte: every split point works.
    let mut used = 0;
    for byte in wire.chunks(1) {
        if decoder.is_done() {
            break;
        }
        used += decoder
            .feed(byte, &mut |d| {
                out.extend_from_slice(d);
                Ok(())
            })
            .unwrap();
    }
    assert!(decoder.is_done());
    assert_eq!(out, b"Wikipedia");
    assert_eq!(&wire[used..], b"GET / HTTP/1.1");
    let mut bad = ChunkedDecoder::default();
    assert!(bad.feed(b"zz\r\n", &mut |_| Ok(())).is_err());
}

#[tokio::test]
async fn serves_several_requests_on_one_keep_alive_connection_and_records_them() {
    let dir = std::env::temp_dir().join(format!("wsplice-echo-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("record.jsonl");
    let _ = std::fs::remove_file(&path);
    let addr = start(open_record(Some(path.clone())).unwrap()).await;

    let mut client = Client::connect(addr).await;
    let mut serials = Vec::new();
    for target in ["/", "/a?b=1", "/c"] {
        client.send(&get(target)).await;
        let response = client.response(false).await;
        assert_eq!(response.status, 200);
        assert_eq!(response.header("content-type"), Some("text/plain"));
        assert_eq!(
            response.body,
            format!("wsplice echo: GET {target}\n").into_bytes()
        );
        serials.push(response.serial());
    }
    assert!(serials.iter().all(|&s| s == serials[0]), "{serials:?}");

    // Another connection has another serial; `Connection: close` ends it after the answer.
    let mut other = Client::connect(addr).await;
    other
        .send(b"DELETE /x HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        .await;
    let response = other.response(false).await;
    assert_eq!(response.body, b"wsplice echo: DELETE /x\n");
    assert_eq!(response.header("connection"), Some("close"));
    assert_ne!(response.serial(), serials[0]);
    assert!(other.closed().await);

    // HTTP/1.0 closes after the answer too.
    let mut old = Client::connect(addr).await;
    old.send(b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(old.response(false).await.status, 200);
    assert!(old.closed().await);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let line = lines.iter().find(|l| l["path"] == "/a?b=1").unwrap();
    assert_eq!(line["method"], "GET");
    assert_eq!(line["connection"], serials[0]);
    assert!(line["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h[0] == "Host" && h[1] == "echo"));
}

#[tokio::test]
async fn counts_and_hashes_a_chunked_upload_and_echoes_a_body() {
    let addr = start(None).await;
    let mut client = Client::connect(addr).await;
    let payload = pattern(300_000);
    let mut request =
        b"POST /upload HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for (i, chunk) in payload.chunks(70_001).enumerate() {
        // Sizes in either case, one with an extension.
        let size = if i % 2 == 0 {
            format!("{:x}", chunk.len())
        } else {
            format!("{:X};name=value", chunk.len())
        };
        request.extend_from_slice(size.as_bytes());
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
    // The next request right behind it: the body's end is found exactly.
    request.extend_from_slice(&get("/after"));
    client.send(&request).await;
    let response = client.response(false).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(json["bytes"], 300_000);
    assert_eq!(json["fnv1a64"], fnv(&payload));
    let after = client.response(false).await;
    assert_eq!(after.body, b"wsplice echo: GET /after\n");
    assert_eq!(after.serial(), response.serial());

    // /echo sends a Content-Length body back as it came.
    let body = pattern(100_000);
    let mut echo = format!(
        "PUT /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    echo.extend_from_slice(&body);
    client.send(&echo).await;
    let response = client.response(false).await;
    assert_eq!(response.header("content-length"), Some("100000"));
    assert_eq!(response.body, body);
}

#[tokio::test]
async fn streams_n_bytes_with_a_length_or_chunked() {
    let addr = start(None).await;
    let mut client = Client::connect(addr).await;
    let n = 200_000;
    client.send(&get(&format!("/bytes/{n}"))).await;
    let response = client.response(false).await;
    assert_eq!(response.header("content-length"), Some("200000"));
    assert_eq!(response.body, pattern(n));
    client.send(&get(&format!("/bytes/{n}?chunked=1"))).await;
    let response = client.response(false).await;
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.body, pattern(n));
    client.send(&get("/bytes/0")).await;
    assert!(client.response(false).await.body.is_empty());
}

#[tokio::test]
async fn answers_head_without_a_body() {
    let addr = start(None).await;
    let mut client = Client::connect(addr).await;
    client
        .send(b"HEAD /page HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let response = client.response(true).await;
    assert_eq!(response.status, 200);
    let text_len = "wsplice echo: HEAD /page\n".len().to_string();
    assert_eq!(response.header("content-length"), Some(text_len.as_str()));
    client
        .send(b"HEAD /bytes/1000000 HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await;
    let response = client.response(true).await;
    assert_eq!(response.header("content-length"), Some("1000000"));
    // Had a body followed either answer, this response would not parse.
    client.send(&get("/next")).await;
    assert_eq!(
        client.response(false).await.body,
        b"wsplice echo: GET /next\n"
    );
}

#[tokio::test]
async fn answers_100_continue_before_reading_the_body() {
    let addr = start(None).await;
    let mut client = Client::connect(addr).await;
    client
        .send(
            b"POST /up HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .await;
    let interim = client.response(false).await;
    assert_eq!(interim.status, 100);
    client.send(b"hello").await;
    let response = client.response(false).await;
    assert_eq!(response.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(json["bytes"], 5);
    assert_eq!(json["fnv1a64"], fnv(b"hello"));
}

#[tokio::test]
async fn upgrades_after_plain_requests_on_the_same_connection() {
    let addr = start(None).await;
    let mut client = Client::connect(addr).await;
    client.send(&get("/first")).await;
    let first = client.response(false).await;
    client.send(&get("/second")).await;
    assert_eq!(client.response(false).await.serial(), first.serial());
    assert!(client.buf.is_empty());
    let (mut ws, response) =
        tokio_tungstenite::client_async(format!("ws://{addr}/chat"), client.stream)
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    ws.close(None).await.unwrap();
}
