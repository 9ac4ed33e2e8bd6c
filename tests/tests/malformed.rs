//! The malformed-input corpus (`tests/corpus/malformed/*.toml`, described in its README): every
//! request head in it is sent to the running binary on a fresh connection, on each data path,
//! and must get its expected status (or a close without an answer) and close the connection
//! when expected, while a live WebSocket tunnel beside it keeps echoing messages in order and
//! unchanged, the proxy stays up, and no descriptor is left behind.
//!
//! Framing of plain request bodies (request smuggling) has its own table in `smuggling.rs`, and
//! the basic refusals of `handshake.rs` are not repeated here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsplice_tests::http::HttpConn;
use wsplice_tests::*;

/// The proxy under test: WebSocket routes under `/ws`, plain HTTP under `/http`, and nothing
/// else (404). The limits are the ones the corpus's size cases are written against.
const ROUTES: &str = "path_prefix = \"/ws\"\nwebsocket_only = true\n\n\
                      [[route]]\nupstream = \"default\"\npath_prefix = \"/http\"";
const LIMITS: &str = "max_request_head = 4096\nmax_headers = 32\nmax_body = \"1KiB\"";

/// How often (in cases) the live tunnel is checked.
const TUNNEL_EVERY: usize = 16;

/// How long a connection expected to stay open is watched for a close.
const STAYS_OPEN: Duration = Duration::from_millis(150);

/// One file of the corpus.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorpusFile {
    case: Vec<Case>,
}

/// One case, as written in the corpus (see its README).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    /// Head lines; each is sent with CRLF, then an empty line ends the head.
    head: Option<String>,
    /// Exact bytes instead of `head`: nothing is added.
    raw: Option<String>,
    /// Bytes sent after the head (a body).
    body: Option<String>,
    /// The expected status; 0: the connection is closed without an answer.
    status: u16,
    /// Whether the proxy closes the connection after the answer (default: for every status
    /// but 101 and 2xx).
    close: Option<bool>,
    /// Half-close the connection after sending (the client's FIN).
    fin: Option<bool>,
    /// Why this is the right answer (for readers; not checked).
    #[allow(dead_code)]
    why: Option<String>,
}

impl Case {
    fn closes(&self) -> bool {
        self.close
            .unwrap_or(!(self.status == 101 || (200..300).contains(&self.status)))
    }

    /// The bytes to send.
    fn bytes(&self) -> Vec<u8> {
        let mut bytes = match (&self.head, &self.raw) {
            (Some(head), None) => {
                let mut bytes = Vec::new();
                for line in head.strip_suffix('\n').unwrap_or(head).split('\n') {
                    bytes.extend(expand(line));
                    bytes.extend_from_slice(b"\r\n");
                }
                bytes.extend_from_slice(b"\r\n");
                bytes
            }
            (None, Some(raw)) => expand(raw),
            _ => panic!("case {:?}: give exactly one of head and raw", self.name),
        };
        if let Some(body) = &self.body {
            bytes.extend(expand(body));
        }
        bytes
    }
}

/// The corpus's escapes: `${N*text}` is `text` N times, then `\r`, `\n`, `\t`, `\\` and `\xHH`
/// (any byte).
fn expand(text: &str) -> Vec<u8> {
    let mut repeated = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        repeated.push_str(&rest[..start]);
        let inner = &rest[start + 2..];
        let end = inner.find('}').expect("an unclosed ${N*text}");
        let (count, piece) = inner[..end]
            .split_once('*')
            .expect("${N*text} needs a count and a text");
        let count: usize = count.parse().expect("${N*text}: N is a number");
        repeated.push_str(&piece.repeat(count));
        rest = &inner[end + 1..];
    }
    repeated.push_str(rest);
    let bytes = repeated.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != b'\\' {
            out.push(bytes[at]);
            at += 1;
            continue;
        }
        match bytes.get(at + 1) {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = std::str::from_utf8(&bytes[at + 2..at + 4]).expect("\\xHH");
                out.push(u8::from_str_radix(hex, 16).expect("\\xHH"));
                at += 2;
            }
            other => panic!("unknown escape \\{other:?} in {text:?}"),
        }
        at += 2;
    }
    out
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/malformed")
}

/// Every case of every file, named `file: case`.
fn load_corpus() -> Vec<(String, Case)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("tests/corpus/malformed")
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut cases = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a corpus file");
        let parsed: CorpusFile =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        cases.extend(
            parsed
                .case
                .into_iter()
                .map(|case| (format!("{stem}: {}", case.name), case)),
        );
    }
    cases
}

/// What the proxy did with one case.
#[derive(Debug)]
struct Observed {
    /// The status of the answer; 0 when the connection closed without one.
    status: u16,
    /// The answer's head, for failure messages.
    head: String,
    /// Whether the connection closed after the answer.
    closed: bool,
}

/// Sends one case on a fresh connection and watches what comes back.
async fn replay(addr: SocketAddr, case: &Case) -> Observed {
    let stream = bounded(TcpStream::connect(addr)).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let mut conn = HttpConn::new(stream);
    // The proxy may refuse (and close) before it has read everything: a failed write is fine.
    let _ = bounded(conn.stream().write_all(&case.bytes())).await;
    if case.fin == Some(true) {
        let _ = conn.stream().shutdown().await;
    }
    let head_request = case
        .head
        .as_deref()
        .or(case.raw.as_deref())
        .is_some_and(|text| text.starts_with("HEAD "));
    match conn.try_response(head_request).await {
        Ok(response) => {
            let within = if case.closes() { WAIT } else { STAYS_OPEN };
            let closed = conn.closed_within(within).await.is_some();
            Observed {
                status: response.status,
                head: response.head,
                closed,
            }
        }
        Err(error) => Observed {
            status: 0,
            head: error,
            closed: true,
        },
    }
}

/// The live tunnel: `count` messages sent back to back must come back in order, unchanged.
async fn check_tunnel(ws: &mut Client, round: usize) {
    let sent: Vec<Message> = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                Message::text(format!(
                    "round {round} message {i} {}",
                    "x".repeat(round % 97)
                ))
            } else {
                Message::binary(
                    (0..(round * 7 + i) % 300)
                        .map(|b| b as u8)
                        .collect::<Vec<u8>>(),
                )
            }
        })
        .collect();
    for message in &sent {
        bounded(ws.feed(message.clone()))
            .await
            .expect("send on the live tunnel");
    }
    bounded(ws.flush()).await.expect("flush the live tunnel");
    for message in &sent {
        let echoed = bounded(ws.next())
            .await
            .expect("the live tunnel closed")
            .expect("a frame on the live tunnel");
        assert_eq!(
            &echoed, message,
            "the live tunnel changed a message (round {round})"
        );
    }
}

#[test]
fn the_corpus_has_enough_cases_and_every_one_is_well_formed() {
    let cases = load_corpus();
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    let mut names = std::collections::BTreeSet::new();
    for (name, case) in &cases {
        assert!(names.insert(name.clone()), "two cases are called {name:?}");
        assert!(
            !case.bytes().is_empty() || case.fin == Some(true),
            "{name}: sends nothing"
        );
        assert!(
            case.status == 0 || (100..600).contains(&case.status),
            "{name}: status {}",
            case.status
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_head_gets_its_answer_and_the_live_tunnel_is_undisturbed() {
    let cases = load_corpus();
    let echo = Echo::start();
    for datapath in datapaths() {
        let mut config = ProxyConfig::new(&[echo.addr()]);
        config.route_extra = ROUTES;
        config.limits = LIMITS;
        config.handshake = "1s";
        // No idle upstream connections kept: every descriptor the cases open must close.
        config.upstream_keepalive = Some(0);
        let proxy = Proxy::start(datapath, &config);
        let mut ws = connect(&proxy.url("/ws/live")).await;
        check_tunnel(&mut ws, 0).await;
        let fds_before = proxy.fd_count();

        let mut failures = Vec::new();
        for (index, (name, case)) in cases.iter().enumerate() {
            let observed = replay(proxy.addr(), case).await;
            let closes = case.closes();
            if observed.status != case.status || observed.closed != closes {
                failures.push(format!(
                    "{name}: expected {} ({}), got {} ({}): {:?}",
                    case.status,
                    if closes { "closed" } else { "kept open" },
                    observed.status,
                    if observed.closed {
                        "closed"
                    } else {
                        "kept open"
                    },
                    observed.head.lines().next().unwrap_or_default(),
                ));
            }
            if index % TUNNEL_EVERY == TUNNEL_EVERY - 1 {
                check_tunnel(&mut ws, index).await;
            }
        }
        check_tunnel(&mut ws, cases.len()).await;
        assert!(
            failures.is_empty(),
            "{datapath:?}: {} of {} cases answered otherwise:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );

        // Still up, nothing leaked: every case's connection (and its upstream one) is gone.
        assert!(
            Path::new(&format!("/proc/{}", proxy.pid())).exists(),
            "{datapath:?}: the proxy exited"
        );
        assert!(
            eventually(|| proxy.fd_count() == fds_before),
            "{datapath:?}: {} descriptors open after the corpus, {fds_before} before: {:?}",
            proxy.fd_count(),
            proxy.fd_targets()
        );
        let log = proxy.log();
        assert!(!log.contains("panicked"), "{datapath:?}: {log}");
        bounded(ws.close(None))
            .await
            .expect("close the live tunnel");
    }
}
