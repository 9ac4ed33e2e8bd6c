//! Soak: many tunnels at once move large, sequenced WebSocket messages through the proxy, and
//! both ends check every byte, in order.
//!
//! Every payload is made of 32-byte blocks that name themselves (stream tag, message number,
//! block number, in hex, then a two-byte UTF-8 character), so when bytes are lost, duplicated or
//! reordered the report says exactly which bytes arrived where. Message kinds and sizes come
//! from a seed both ends share, so each end knows the whole sequence it must receive.
//!
//! The client speaks raw RFC 6455 frames (to count stream offsets exactly); the upstream is
//! tokio-tungstenite, which validates framing and the UTF-8 of text messages on its own.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use rand::{Rng as _, SeedableRng as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::{read_head, server_socket, switching_protocols, upgrade_request, Scripted};

/// Bytes per self-describing block of a payload.
pub const BLOCK: usize = 32;
/// The fixed tail of every block: a two-byte UTF-8 character, filler, newline.
const BLOCK_TAIL: &[u8; 20] = b"\xc3\xa9--wsplice-soak---\n";

/// What the upstream does after the 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// The scenario: the upstream answers the upgrade with a 700-byte greeting in the
    /// same write, waits, sends two more, and only then starts reading and echoing (so at
    /// first the client→upstream direction backs up).
    DelayedEcho,
    /// Both ends send their own sequence as fast as they can while reading the other's.
    Flood,
}

impl Scenario {
    /// The name used in request paths and reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::DelayedEcho => "delayed-echo",
            Scenario::Flood => "flood",
        }
    }

    fn from_name(name: &str) -> Option<Scenario> {
        match name {
            "delayed-echo" => Some(Scenario::DelayedEcho),
            "flood" => Some(Scenario::Flood),
            _ => None,
        }
    }
}

/// How much traffic one run moves.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Tunnels opened at once.
    pub tunnels: u32,
    /// Messages each side sends per tunnel.
    pub messages: u32,
    /// Largest message (sizes are uniform in `0..=max_size`).
    pub max_size: usize,
    /// Messages the client may have sent and not yet seen echoed (delayed echo).
    pub in_flight: usize,
    /// Share of text messages.
    pub text_share: f64,
    /// How long the delayed-echo upstream waits after the 101 before it greets and reads.
    pub greeting_delay: Duration,
}

impl Shape {
    /// The scenario at full size: 16 tunnels × 300 messages up to 1 MiB, 8 in flight.
    pub fn full() -> Shape {
        Shape {
            tunnels: 16,
            messages: 300,
            max_size: 1 << 20,
            in_flight: 8,
            text_share: 0.2,
            greeting_delay: Duration::from_millis(50),
        }
    }

    fn encode(&self) -> String {
        format!(
            "{}-{}-{}-{}-{}-{}",
            self.tunnels,
            self.messages,
            self.max_size,
            self.in_flight,
            (self.text_share * 1000.0) as u32,
            self.greeting_delay.as_millis()
        )
    }

    fn decode(text: &str) -> Option<Shape> {
        let mut parts = text.split('-').map(|p| p.parse::<u64>().ok());
        let mut next = || parts.next().flatten();
        Some(Shape {
            tunnels: next()? as u32,
            messages: next()? as u32,
            max_size: next()? as usize,
            in_flight: next()? as usize,
            text_share: next()? as f64 / 1000.0,
            greeting_delay: Duration::from_millis(next()?),
        })
    }
}

/// Who sends a stream of messages (part of every block, so misplaced bytes show their origin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The client's messages (echoed back unchanged in the delayed-echo scenario).
    Client = 0,
    /// The upstream's own messages (flood).
    Upstream = 1,
    /// The upstream's greetings (delayed echo).
    Greeting = 2,
}

/// One message of a sequence: its number, kind and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Planned {
    tag: u8,
    number: u32,
    text: bool,
    len: usize,
}

impl Planned {
    /// The payload: blocks `tag·number·block` in hex, each followed by [`BLOCK_TAIL`].
    fn payload(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.len];
        fill(&mut bytes, self.tag, self.number);
        if self.text {
            keep_utf8(&mut bytes);
        }
        bytes
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut [u8], value: u32) {
    let digits = out.len();
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = HEX[((value >> (4 * (digits - 1 - i))) & 0xf) as usize];
    }
}

fn fill(bytes: &mut [u8], tag: u8, number: u32) {
    let mut block = [0u8; BLOCK];
    put_hex(&mut block[0..2], u32::from(tag));
    put_hex(&mut block[2..6], number);
    block[12..].copy_from_slice(BLOCK_TAIL);
    for (index, chunk) in bytes.chunks_mut(BLOCK).enumerate() {
        put_hex(&mut block[6..12], index as u32);
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
}

/// A text payload cut in the middle of the two-byte character ends in a lone lead byte:
/// replace it, so every text message is valid UTF-8.
fn keep_utf8(bytes: &mut [u8]) {
    if bytes.len() % BLOCK == 13 {
        let last = bytes.len() - 1;
        bytes[last] = b'*';
    }
}

/// Reads the header of the block that starts at `at`, if it looks like one.
fn block_at(bytes: &[u8], at: usize) -> Option<(u8, u32, u32)> {
    let header = bytes.get(at..at + 12)?;
    if !header.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let text = std::str::from_utf8(header).ok()?;
    Some((
        u8::from_str_radix(&text[0..2], 16).ok()?,
        u32::from_str_radix(&text[2..6], 16).ok()?,
        u32::from_str_radix(&text[6..12], 16).ok()?,
    ))
}

/// The stream tag of `origin` on tunnel `tunnel`.
fn tag(tunnel: u32, origin: Origin) -> u8 {
    (tunnel as u8) << 2 | origin as u8
}

/// The messages `origin` sends on `tunnel` (a seeded plan both ends compute).
fn plan(seed: u64, shape: &Shape, tunnel: u32, origin: Origin) -> Vec<Planned> {
    if origin == Origin::Greeting {
        return (0..3)
            .map(|number| Planned {
                tag: tag(tunnel, origin),
                number,
                text: false,
                len: 700,
            })
            .collect();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (u64::from(tunnel) << 40) ^ ((origin as u64) << 56),
    );
    (0..shape.messages)
        .map(|number| Planned {
            tag: tag(tunnel, origin),
            number,
            text: rng.random_bool(shape.text_share),
            len: rng.random_range(0..=shape.max_size),
        })
        .collect()
}

/// A message that arrived different from what was sent.
#[derive(Debug, Clone)]
pub struct Corruption {
    /// Tunnel number in the run.
    pub tunnel: u32,
    /// `upstream→client` or `client→upstream`.
    pub direction: &'static str,
    /// What went wrong, with the offsets and what the bytes there were.
    pub detail: String,
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tunnel {} {}: {}",
            self.tunnel, self.direction, self.detail
        )
    }
}

/// Describes how `got` differs from `want` (same sequence position): the first differing
/// offset and which block of which message the bytes there belong to.
fn describe_difference(want: &Planned, got: &[u8], got_text: bool) -> String {
    let expected = want.payload();
    if got_text != want.text {
        return format!(
            "message #{} arrived as {} but was sent as {} ({} bytes, expected {})",
            want.number,
            kind(got_text),
            kind(want.text),
            got.len(),
            want.len
        );
    }
    let first = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    let aligned = first - first % BLOCK;
    let found = block_at(got, aligned)
        .map(|(tag, number, block)| {
            format!(
                "the bytes there are block {block} (offset {}) of message #{number} of stream tag {tag:#x}",
                block as usize * BLOCK
            )
        })
        .unwrap_or_else(|| {
            let end = (aligned + 24).min(got.len());
            format!(
                "the bytes there are not a block header: {:?}",
                String::from_utf8_lossy(&got[aligned..end])
            )
        });
    format!(
        "{} message #{} of {} bytes (received {} bytes) differs from offset {first}: {found}; \
         where the received bytes come from: {}",
        kind(want.text),
        want.number,
        want.len,
        got.len(),
        origins(got, aligned.saturating_sub(BLOCK)).join(", ")
    )
}

/// Maps the received bytes from `from` on to where they were sent: runs of blocks that come
/// from the same message with the same displacement, e.g. `[1000..5000) = #3[1010..5010)`
/// (ten bytes lost before offset 1000). At most eight runs.
fn origins(got: &[u8], from: usize) -> Vec<String> {
    let mut runs: Vec<(usize, usize, u8, u32, i64)> = Vec::new();
    let mut at = from;
    while at + 14 <= got.len() && runs.len() <= 8 {
        let header = block_at(got, at).filter(|_| got[at + 12..at + 14] == BLOCK_TAIL[..2]);
        let Some((tag, number, block)) = header else {
            at += 1;
            continue;
        };
        let displacement = (block as usize * BLOCK) as i64 - at as i64;
        match runs.last_mut() {
            Some(run) if (run.2, run.3, run.4) == (tag, number, displacement) => run.1 = at + BLOCK,
            _ => runs.push((at, at + BLOCK, tag, number, displacement)),
        }
        at += BLOCK;
    }
    runs.iter()
        .take(8)
        .map(|&(start, end, tag, number, displacement)| {
            let end = end.min(got.len());
            format!(
                "[{start}..{end}) = tag {tag:#x} #{number}[{}..{})",
                start as i64 + displacement,
                end as i64 + displacement
            )
        })
        .collect()
}

fn kind(text: bool) -> &'static str {
    if text {
        "text"
    } else {
        "binary"
    }
}

/// What a completed run moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    /// Payload bytes the client sent.
    pub bytes_up: u64,
    /// Payload bytes the client received.
    pub bytes_down: u64,
}

/// Why a run failed.
#[derive(Debug)]
pub enum RunError {
    /// Bytes differed: corruption, loss, duplication or reordering.
    Corrupted(Vec<Corruption>),
    /// A tunnel broke or stalled without a byte being wrong (each with its reason).
    Broken(Vec<String>),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Corrupted(list) => {
                writeln!(f, "{} corrupted stream(s):", list.len())?;
                for corruption in list {
                    writeln!(f, "  {corruption}")?;
                }
                Ok(())
            }
            RunError::Broken(list) => {
                writeln!(f, "{} broken tunnel(s):", list.len())?;
                for reason in list {
                    writeln!(f, "  {reason}")?;
                }
                Ok(())
            }
        }
    }
}

/// The upstream of a soak: serves every scenario (the request path names it, with the seed,
/// the shape and the tunnel number) and records what it found wrong.
pub struct SoakUpstream {
    scripted: Scripted,
    findings: Arc<Mutex<Vec<Corruption>>>,
}

impl SoakUpstream {
    /// Starts listening on 127.0.0.1.
    pub async fn start() -> SoakUpstream {
        let findings = Arc::new(Mutex::new(Vec::new()));
        let recorded = findings.clone();
        let scripted = Scripted::start(move |stream, head, rest| {
            let recorded = recorded.clone();
            async move {
                if let Err(corruption) = serve(stream, &head, rest).await {
                    recorded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(corruption);
                }
            }
        })
        .await;
        SoakUpstream { scripted, findings }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.scripted.addr()
    }

    /// What the upstream found wrong since the last call.
    pub fn take_findings(&self) -> Vec<Corruption> {
        std::mem::take(&mut *self.findings.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The request path of one tunnel.
fn tunnel_path(scenario: Scenario, seed: u64, shape: &Shape, tunnel: u32) -> String {
    format!(
        "/soak/{}/{seed}/{}/{tunnel}",
        scenario.name(),
        shape.encode()
    )
}

fn parse_path(head: &str) -> Option<(Scenario, u64, Shape, u32)> {
    let path = head.split_whitespace().nth(1)?;
    let mut parts = path.trim_start_matches("/soak/").split('/');
    let scenario = Scenario::from_name(parts.next()?)?;
    let seed = parts.next()?.parse().ok()?;
    let shape = Shape::decode(parts.next()?)?;
    let tunnel = parts.next()?.parse().ok()?;
    Some((scenario, seed, shape, tunnel))
}

/// One upstream connection.
async fn serve(mut stream: TcpStream, head: &str, rest: Vec<u8>) -> Result<(), Corruption> {
    let Some((scenario, seed, shape, tunnel)) = parse_path(head) else {
        return Ok(());
    };
    let broken = |detail: String| Corruption {
        tunnel,
        direction: "client→upstream",
        detail,
    };
    if !rest.is_empty() {
        return Err(broken(format!(
            "{} bytes arrived with the request head",
            rest.len()
        )));
    }
    let greetings = plan(seed, &shape, tunnel, Origin::Greeting);
    let mut answer = switching_protocols(head);
    if scenario == Scenario::DelayedEcho {
        // The first greeting goes in the same write as the 101: the proxy must pass on the
        // bytes behind the head it read (or peeked at), in order, on every data path.
        answer.extend_from_slice(&frame(false, &greetings[0].payload(), false));
    }
    if stream.write_all(&answer).await.is_err() {
        return Ok(());
    }
    let mut ws = server_socket(stream).await;
    let expected = plan(seed, &shape, tunnel, Origin::Client);
    match scenario {
        Scenario::DelayedEcho => {
            tokio::time::sleep(shape.greeting_delay).await;
            for greeting in greetings.into_iter().skip(1) {
                if ws.send(Message::binary(greeting.payload())).await.is_err() {
                    return Ok(());
                }
            }
            for want in &expected {
                let message = match ws.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => return failed(error, want, broken),
                    None => return Ok(()),
                };
                check_message(want, &message).map_err(broken)?;
                if ws.send(message).await.is_err() {
                    return Ok(());
                }
            }
        }
        Scenario::Flood => {
            let (mut sink, mut source) = ws.split();
            let pushed = plan(seed, &shape, tunnel, Origin::Upstream);
            let pusher = tokio::spawn(async move {
                for message in pushed {
                    let payload = message.payload();
                    let frame = if message.text {
                        Message::text(String::from_utf8(payload).unwrap_or_default())
                    } else {
                        Message::binary(payload)
                    };
                    if sink.send(frame).await.is_err() {
                        break;
                    }
                }
                sink
            });
            for want in &expected {
                match source.next().await {
                    Some(Ok(message)) => check_message(want, &message).map_err(broken)?,
                    Some(Err(error)) => return failed(error, want, broken),
                    None => return Ok(()),
                }
            }
            let Ok(sink) = pusher.await else {
                return Ok(());
            };
            let Ok(mut ws) = sink.reunite(source) else {
                return Ok(());
            };
            // The client closes once it has everything; answer and end.
            while let Some(Ok(message)) = ws.next().await {
                if message.is_close() {
                    break;
                }
            }
            return Ok(());
        }
    }
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() {
            break;
        }
    }
    Ok(())
}

/// The upstream's WebSocket failed: a protocol error (bad framing, invalid UTF-8) means the
/// bytes were changed on the way; a reset or close is a broken tunnel, which the client reports.
fn failed(
    error: tokio_tungstenite::tungstenite::Error,
    want: &Planned,
    broken: impl Fn(String) -> Corruption,
) -> Result<(), Corruption> {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
    match error {
        Error::Io(_)
        | Error::ConnectionClosed
        | Error::AlreadyClosed
        | Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Ok(()),
        error => Err(broken(format!(
            "the upstream's WebSocket failed before message #{}: {error}",
            want.number
        ))),
    }
}

fn check_message(want: &Planned, got: &Message) -> Result<(), String> {
    let (bytes, text): (&[u8], bool) = match got {
        Message::Text(text) => (text.as_bytes(), true),
        Message::Binary(bytes) => (bytes, false),
        other => {
            return Err(format!(
                "expected message #{}, got a control frame {other:?}",
                want.number
            ))
        }
    };
    if text == want.text && bytes.len() == want.len && bytes == want.payload().as_slice() {
        Ok(())
    } else {
        Err(describe_difference(want, bytes, text))
    }
}

/// A masked client frame (mask key 0: the payload stays readable in a packet capture).
fn client_frame(text: bool, payload: &[u8]) -> Vec<u8> {
    frame(text, payload, true)
}

/// One whole frame; a client's is masked (key 0), a server's is not.
fn frame(text: bool, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(if text { 0x81 } else { 0x82 });
    match payload.len() {
        len if len < 126 => frame.push(mask_bit | len as u8),
        len if len <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        frame.extend_from_slice(&[0, 0, 0, 0]);
    }
    frame.extend_from_slice(payload);
    frame
}

/// A frame the client read: opcode, payload, and where it started in the byte stream.
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
    stream_offset: u64,
}

/// Reads server frames off a raw stream, counting stream offsets.
struct FrameReader {
    stream: tokio::net::tcp::OwnedReadHalf,
    buffer: Vec<u8>,
    /// Stream offset of `buffer[0]` (after the 101 head).
    offset: u64,
}

impl FrameReader {
    async fn fill(&mut self, want: usize) -> Result<(), String> {
        let mut chunk = vec![0u8; 256 * 1024];
        while self.buffer.len() < want {
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read failed at stream offset {}: {e}", self.end()))?;
            if n == 0 {
                return Err(format!("closed at stream offset {}", self.end()));
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }

    fn end(&self) -> u64 {
        self.offset + self.buffer.len() as u64
    }

    fn consume(&mut self, n: usize) -> Vec<u8> {
        let rest = self.buffer.split_off(n);
        self.offset += n as u64;
        std::mem::replace(&mut self.buffer, rest)
    }

    /// The next frame; a header that cannot be a server frame is an error naming the offset.
    async fn next(&mut self, max_len: usize) -> Result<Frame, String> {
        self.fill(2).await?;
        let stream_offset = self.offset;
        let (b0, b1) = (self.buffer[0], self.buffer[1]);
        let opcode = b0 & 0x0f;
        if b0 & 0x70 != 0 || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) || b1 & 0x80 != 0 {
            return Err(format!(
                "invalid frame header {b0:#04x} {b1:#04x} at stream offset {stream_offset}; \
                 the bytes there: {:?}",
                String::from_utf8_lossy(&self.buffer[..self.buffer.len().min(40)])
            ));
        }
        let (header, len) = match b1 & 0x7f {
            126 => {
                self.fill(4).await?;
                (
                    4,
                    u64::from(u16::from_be_bytes([self.buffer[2], self.buffer[3]])),
                )
            }
            127 => {
                self.fill(10).await?;
                let mut len = [0u8; 8];
                len.copy_from_slice(&self.buffer[2..10]);
                (10, u64::from_be_bytes(len))
            }
            len => (2, u64::from(len)),
        };
        if len > max_len as u64 {
            return Err(format!(
                "frame of {len} bytes (more than any message of the run) at stream offset \
                 {stream_offset}"
            ));
        }
        let total = header + len as usize;
        self.fill(total).await?;
        let mut frame = self.consume(total);
        let payload = frame.split_off(header);
        Ok(Frame {
            fin: b0 & 0x80 != 0,
            opcode,
            payload,
            stream_offset,
        })
    }

    /// The next data message (continuations joined), skipping pings and pongs.
    async fn message(&mut self, max_len: usize) -> Result<(bool, Vec<u8>, u64), String> {
        loop {
            let first = self.next(max_len).await?;
            match first.opcode {
                9 | 10 => continue,
                8 => {
                    return Err(format!(
                        "close frame at stream offset {}",
                        first.stream_offset
                    ))
                }
                1 | 2 => {}
                _ => {
                    return Err(format!(
                        "continuation without a message at stream offset {}",
                        first.stream_offset
                    ))
                }
            }
            let text = first.opcode == 1;
            let mut payload = first.payload;
            let mut fin = first.fin;
            while !fin {
                let next = self.next(max_len).await?;
                if next.opcode != 0 {
                    return Err(format!(
                        "opcode {} inside a fragmented message at stream offset {}",
                        next.opcode, next.stream_offset
                    ));
                }
                payload.extend_from_slice(&next.payload);
                fin = next.fin;
            }
            return Ok((text, payload, first.stream_offset));
        }
    }
}

/// One tunnel's client: upgrade, then the scenario; every received message is checked.
async fn run_tunnel(
    proxy: SocketAddr,
    scenario: Scenario,
    seed: u64,
    shape: Shape,
    tunnel: u32,
) -> Result<RunStats, TunnelFailure> {
    let broken = |reason: String| TunnelFailure::Broken(format!("tunnel {tunnel}: {reason}"));
    let mut stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| broken(format!("connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    let path = tunnel_path(scenario, seed, &shape, tunnel);
    stream
        .write_all(&upgrade_request(&path, &[]))
        .await
        .map_err(|e| broken(format!("request: {e}")))?;
    let (head, rest) = read_head(&mut stream).await;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(broken(format!("upgrade refused: {head}")));
    }
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader {
        stream: read,
        buffer: rest,
        offset: 0,
    };
    let sent = plan(seed, &shape, tunnel, Origin::Client);
    let mut expected: Vec<Planned> = match scenario {
        Scenario::DelayedEcho => {
            let mut list = plan(seed, &shape, tunnel, Origin::Greeting);
            list.extend(sent.iter().copied());
            list
        }
        Scenario::Flood => plan(seed, &shape, tunnel, Origin::Upstream),
    };
    let window = match scenario {
        Scenario::DelayedEcho => shape.in_flight,
        Scenario::Flood => Semaphore::MAX_PERMITS,
    };
    let permits = Arc::new(Semaphore::new(window));
    let writer_permits = permits.clone();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        let mut bytes = 0u64;
        for message in to_send {
            let Ok(permit) = writer_permits.acquire().await else {
                return Err("stopped".to_owned());
            };
            permit.forget();
            write
                .write_all(&client_frame(message.text, &message.payload()))
                .await
                .map_err(|e| format!("send of message #{} failed: {e}", message.number))?;
            bytes += message.len as u64;
        }
        Ok::<_, String>((write, bytes))
    });
    let mut stats = RunStats::default();
    let greetings = if scenario == Scenario::DelayedEcho {
        3
    } else {
        0
    };
    for (index, want) in expected.drain(..).enumerate() {
        let (text, payload, offset) = match reader.message(shape.max_size.max(700)).await {
            Ok(message) => message,
            Err(reason) => {
                writer.abort();
                let progress = format!(
                    "{reason} (waiting for message {index} of {}: {} {} #{})",
                    sent.len() + greetings,
                    if index < greetings {
                        "greeting"
                    } else {
                        "message"
                    },
                    kind(want.text),
                    want.number
                );
                return Err(
                    if reason.contains("invalid frame") || reason.contains("frame of") {
                        TunnelFailure::Corrupted(Corruption {
                            tunnel,
                            direction: "upstream→client",
                            detail: progress,
                        })
                    } else {
                        broken(progress)
                    },
                );
            }
        };
        if text != want.text || payload.len() != want.len || payload != want.payload() {
            writer.abort();
            return Err(TunnelFailure::Corrupted(Corruption {
                tunnel,
                direction: "upstream→client",
                detail: format!(
                    "{} (frame at stream offset {offset})",
                    describe_difference(&want, &payload, text)
                ),
            }));
        }
        stats.bytes_down += payload.len() as u64;
        if scenario == Scenario::DelayedEcho && index >= greetings {
            permits.add_permits(1);
        }
    }
    let (mut write, bytes_up) = match writer.await {
        Ok(Ok(done)) => done,
        Ok(Err(reason)) => return Err(broken(reason)),
        Err(error) => return Err(broken(format!("writer task: {error}"))),
    };
    stats.bytes_up = bytes_up;
    // Close handshake: our close frame, the upstream's answer, then the end of the stream.
    let _ = write.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut sink = [0u8; 1024];
        while let Ok(n) = reader.stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(stats)
}

enum TunnelFailure {
    Corrupted(Corruption),
    Broken(String),
}

/// Runs one soak round: `shape.tunnels` tunnels at once through the proxy at `proxy`, in front
/// of `upstream`, for at most `limit`.
pub async fn run_once(
    proxy: SocketAddr,
    upstream: &SoakUpstream,
    scenario: Scenario,
    shape: Shape,
    seed: u64,
    limit: Duration,
) -> Result<RunStats, RunError> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..shape.tunnels)
        .map(|tunnel| tokio::spawn(run_tunnel(proxy, scenario, seed, shape, tunnel)))
        .collect();
    let mut corrupted = Vec::new();
    let mut broken = Vec::new();
    let mut stats = RunStats::default();
    for (tunnel, task) in tasks.into_iter().enumerate() {
        let remaining = limit.saturating_sub(started.elapsed());
        let abort = task.abort_handle();
        match tokio::time::timeout(remaining, task).await {
            Ok(Ok(Ok(tunnel_stats))) => {
                stats.bytes_up += tunnel_stats.bytes_up;
                stats.bytes_down += tunnel_stats.bytes_down;
            }
            Ok(Ok(Err(TunnelFailure::Corrupted(corruption)))) => corrupted.push(corruption),
            Ok(Ok(Err(TunnelFailure::Broken(reason)))) => broken.push(reason),
            Ok(Err(error)) => broken.push(format!("tunnel {tunnel}: task failed: {error}")),
            Err(_) => {
                abort.abort();
                broken.push(format!("tunnel {tunnel}: not done within {limit:?}"));
            }
        }
    }
    // Give the upstream a moment to record what it saw after the client gave up.
    tokio::time::sleep(Duration::from_millis(50)).await;
    corrupted.extend(upstream.take_findings());
    if !corrupted.is_empty() {
        return Err(RunError::Corrupted(corrupted));
    }
    if !broken.is_empty() {
        return Err(RunError::Broken(broken));
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_name_their_blocks_and_text_stays_utf8() {
        for len in 0..200 {
            let message = Planned {
                tag: 0x41,
                number: 7,
                text: true,
                len,
            };
            let payload = message.payload();
            assert_eq!(payload.len(), len);
            assert!(std::str::from_utf8(&payload).is_ok(), "len {len}");
        }
        let message = Planned {
            tag: 0x41,
            number: 7,
            text: false,
            len: 100_000,
        };
        let payload = message.payload();
        assert_eq!(block_at(&payload, 64 * BLOCK), Some((0x41, 7, 64)));
    }

    #[test]
    fn a_lost_chunk_is_reported_with_where_its_bytes_came_from() {
        let want = Planned {
            tag: 0x05,
            number: 3,
            text: false,
            len: 4096,
        };
        let mut got = want.payload();
        got.drain(1024..1024 + 320);
        got.extend_from_slice(&[0; 320]);
        let detail = describe_difference(&want, &got, false);
        assert!(detail.contains("differs from offset 10"), "{detail}");
        assert!(
            detail.contains("block 42 (offset 1344) of message #3"),
            "{detail}"
        );
        assert!(
            detail.contains(
                "[992..1024) = tag 0x5 #3[992..1024), [1024..3776) = tag 0x5 #3[1344..4096)"
            ),
            "{detail}"
        );
    }

    #[test]
    fn shapes_and_paths_round_trip() {
        let shape = Shape::full();
        let path = tunnel_path(Scenario::Flood, 99, &shape, 5);
        let head = format!("GET {path} HTTP/1.1\r\n");
        let (scenario, seed, parsed, tunnel) = parse_path(&head).expect("parses");
        assert_eq!((scenario, seed, tunnel), (Scenario::Flood, 99, 5));
        assert_eq!(parsed.encode(), shape.encode());
    }
}
