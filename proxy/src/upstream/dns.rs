//! A small stub resolver for upstream servers given by DNS name (`servers = ["app.internal:8080"]`).
//!
//! getaddrinfo does not say how long its answer holds, and the proxy must re-resolve each name
//! when its records expire (like nginx's `resolver`), so it asks the nameservers of
//! `/etc/resolv.conf` itself: one A and one AAAA query over UDP (EDNS0, 1232 bytes), TCP when
//! an answer is truncated. [`resolve`] blocks (each try bounded by the configured timeout) and is
//! meant for one background thread.
//!
//! The parts that read bytes are pure and fuzzed ([`parse_answer`], [`encode_query`],
//! [`hosts_lookup`], [`ResolverConfig::parse`]). An answer comes from whoever can send a
//! datagram to our port, so [`parse_answer`] checks every offset and length, follows
//! compression pointers only backwards and a bounded number of times, bounds names and the
//! CNAME chain, and keeps no more than a small multiple of its input.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// TTL of an address found in `/etc/hosts`: the file may change, and re-reading it is cheap.
pub const HOSTS_TTL: Duration = Duration::from_secs(30);

/// TTL of an IP literal: it never changes, but an hour keeps the refresh loop uniform.
pub const LITERAL_TTL: Duration = Duration::from_secs(3600);

/// Shortest TTL used: a TTL of 0 would make the refresher spin on one name.
pub const MIN_TTL: Duration = Duration::from_secs(1);

/// Longest TTL used: a server moved behind a long-lived record is still found within the hour.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// Most nameservers used from resolv.conf (glibc's `MAXNS`).
pub const MAX_NAMESERVERS: usize = 3;

/// The UDP payload size advertised in EDNS0: the DNS Flag Day 2020 value, which avoids IP
/// fragmentation on practically every path.
pub const EDNS_UDP_SIZE: u16 = 1232;

/// Most CNAME records followed from the queried name.
pub const MAX_CNAME_HOPS: usize = 8;

/// Most compression pointers followed while reading one name.
const MAX_POINTER_JUMPS: u32 = 64;

/// Longest name on the wire, length bytes and the root label included (RFC 1035 §2.3.4).
const MAX_WIRE_NAME_LEN: usize = 255;

/// Longest name as text, without a trailing dot (255 on the wire minus the length bytes).
const MAX_TEXT_NAME_LEN: usize = 253;

/// Longest label (RFC 1035 §2.3.4); the two high bits of a length byte mark pointers.
const MAX_LABEL_LEN: usize = 63;

/// The DNS header: id, flags and four counts.
const HEADER_LEN: usize = 12;

/// Type, class, TTL and rdlength of a resource record, after its owner name.
const RECORD_FIXED_LEN: usize = 10;

/// Class IN.
const CLASS_IN: u16 = 1;

/// Record type CNAME.
const TYPE_CNAME: u16 = 5;

/// Record type OPT (EDNS0, RFC 6891).
const TYPE_OPT: u16 = 41;

/// Flags of a query: RD (recursion desired), everything else 0 (a standard query).
const FLAGS_QUERY: u16 = 0x0100;

/// The QR bit: set in answers.
const FLAG_QR: u16 = 0x8000;

/// The TC bit: the answer did not fit the datagram.
const FLAG_TC: u16 = 0x0200;

/// The rcode of NXDOMAIN.
const RCODE_NAME_ERROR: u8 = 3;

/// Where a DNS server listens.
const DNS_PORT: u16 = 53;

/// glibc's default timeout per try (`RES_TIMEOUT`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// glibc's default number of rounds over the nameservers (`RES_DFLRETRY`).
const DEFAULT_ATTEMPTS: u32 = 2;

/// Longest timeout honoured from `options timeout:N` (glibc's `RES_MAXRETRANS`).
const MAX_TIMEOUT_SECS: u64 = 30;

/// Most rounds honoured from `options attempts:N` (glibc's `RES_MAXRETRY`).
const MAX_ATTEMPTS: u32 = 5;

/// Receive buffer for UDP answers: room beyond what we advertise, so a server that ignores
/// EDNS is not cut off needlessly.
const UDP_BUFFER_LEN: usize = 4096;

/// Why a name could not be resolved, or an answer was refused.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Sending to or receiving from a nameserver failed.
    #[error("talking to the nameserver failed: {0}")]
    Io(#[from] io::Error),
    /// No nameserver answered within the timeouts.
    #[error("no nameserver answered in time")]
    TimedOut,
    /// The name does not exist (NXDOMAIN).
    #[error("no such name (NXDOMAIN)")]
    NameError,
    /// The server answered with an error rcode other than NXDOMAIN (SERVFAIL, REFUSED, …).
    #[error("the nameserver failed (rcode {0})")]
    ServerFailure(u8),
    /// The answer is not a well-formed DNS message.
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    /// The message is not the answer to our query (another id, a query, another question):
    /// stale or forged, so [`resolve`] keeps waiting for the real one.
    #[error("not the answer to our query: {0}")]
    Mismatch(&'static str),
    /// The name exists but has no address of the type asked.
    #[error("the name has no addresses")]
    NoAddresses,
    /// The name cannot be sent in a query.
    #[error("invalid name {0:?}")]
    InvalidName(String),
}

/// The record types [`resolve`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    /// An IPv4 address.
    A,
    /// An IPv6 address.
    Aaaa,
}

impl RecordType {
    /// Its code on the wire.
    pub fn code(self) -> u16 {
        match self {
            RecordType::A => 1,
            RecordType::Aaaa => 28,
        }
    }
}

/// Where queries go and how long to wait, as `/etc/resolv.conf` says.
///
/// `nameserver` lines give the servers (IPv4 or IPv6, port 53, the first
/// [`MAX_NAMESERVERS`]); `search` and `ndots` are ignored because upstream names are used as
/// written (a trailing dot allowed); `options timeout:N attempts:N` are honoured within glibc's
/// bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Servers tried in turn; never empty from [`ResolverConfig::parse`].
    pub nameservers: Vec<SocketAddr>,
    /// Wait for an answer per try.
    pub timeout: Duration,
    /// Rounds over all the nameservers.
    pub attempts: u32,
}

impl Default for ResolverConfig {
    /// What glibc uses without a resolv.conf: 127.0.0.1:53, 5 s, 2 attempts.
    fn default() -> ResolverConfig {
        ResolverConfig {
            nameservers: vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), DNS_PORT)],
            timeout: DEFAULT_TIMEOUT,
            attempts: DEFAULT_ATTEMPTS,
        }
    }
}

impl ResolverConfig {
    /// Parses resolv.conf text. Unknown lines and unparsable values are ignored, as glibc does;
    /// no `nameserver` line means 127.0.0.1:53.
    pub fn parse(text: &str) -> ResolverConfig {
        let mut config = ResolverConfig {
            nameservers: Vec::new(),
            ..ResolverConfig::default()
        };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => config.add_nameserver(words.next()),
                Some("options") => words.for_each(|option| config.apply_option(option)),
                _ => {}
            }
        }
        if config.nameservers.is_empty() {
            config.nameservers = ResolverConfig::default().nameservers;
        }
        config
    }

    /// Reads `/etc/resolv.conf`; a missing or unreadable file gives the default.
    pub fn system() -> ResolverConfig {
        match std::fs::read_to_string("/etc/resolv.conf") {
            Ok(text) => ResolverConfig::parse(&text),
            Err(error) => {
                if error.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(%error, "cannot read /etc/resolv.conf; using 127.0.0.1:53");
                }
                ResolverConfig::default()
            }
        }
    }

    /// One `nameserver` value. Scoped IPv6 addresses (`fe80::1%eth0`) are skipped: naming an
    /// interface needs a lookup this resolver does not make.
    fn add_nameserver(&mut self, value: Option<&str>) {
        if self.nameservers.len() >= MAX_NAMESERVERS {
            return;
        }
        match value.map(str::parse::<IpAddr>) {
            Some(Ok(ip)) => self.nameservers.push(SocketAddr::new(ip, DNS_PORT)),
            _ => tracing::debug!(?value, "resolv.conf: nameserver ignored"),
        }
    }

    /// One word of an `options` line.
    fn apply_option(&mut self, option: &str) {
        if let Some(secs) = option_value(option, "timeout:") {
            self.timeout = Duration::from_secs(u64::from(secs).clamp(1, MAX_TIMEOUT_SECS));
        } else if let Some(attempts) = option_value(option, "attempts:") {
            self.attempts = attempts.clamp(1, MAX_ATTEMPTS);
        }
    }
}

/// The number after `prefix` in an option word (`timeout:3`); huge numbers saturate, since they
/// are clamped anyway.
fn option_value(option: &str, prefix: &str) -> Option<u32> {
    let digits = option.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u32::MAX))
}

/// What a name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Its addresses, sorted and without duplicates (so two resolutions compare equal when the
    /// set is the same, whatever order the server chose).
    pub addrs: Vec<IpAddr>,
    /// How long they hold: between [`MIN_TTL`] and [`MAX_TTL`].
    pub ttl: Duration,
}

impl Resolved {
    /// Sorts and deduplicates `addrs`, clamps `ttl`.
    fn new(mut addrs: Vec<IpAddr>, ttl: Duration) -> Resolved {
        addrs.sort_unstable();
        addrs.dedup();
        Resolved {
            addrs,
            ttl: ttl.clamp(MIN_TTL, MAX_TTL),
        }
    }
}

/// What one answer said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The addresses of the queried name (through its CNAME chain), in the answer's order.
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of the records used, CNAMEs included, unclamped; `None` when truncated.
    pub ttl: Option<Duration>,
    /// The TC bit: the answer did not fit, ask again over TCP (`addrs` is then empty).
    pub truncated: bool,
}

/// Resolves `name` to its A and AAAA records.
///
/// An IP literal is itself (TTL [`LITERAL_TTL`]); a name in `/etc/hosts` takes its addresses
/// there (TTL [`HOSTS_TTL`]); otherwise the nameservers are asked (see the module docs). The TTL
/// is the smallest of the records used, clamped between [`MIN_TTL`] and [`MAX_TTL`]. When one
/// of the two queries finds addresses, a failure of the other is logged and the addresses
/// returned.
pub fn resolve(name: &str, config: &ResolverConfig) -> Result<Resolved, DnsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(Resolved::new(vec![ip], LITERAL_TTL));
    }
    resolve_with_hosts(name, &read_hosts(), config)
}

/// [`resolve`] for a name, with the hosts file's text given.
fn resolve_with_hosts(
    name: &str,
    hosts_text: &str,
    config: &ResolverConfig,
) -> Result<Resolved, DnsError> {
    validate_name(name)?;
    let from_hosts = hosts_lookup(hosts_text, name);
    if !from_hosts.is_empty() {
        return Ok(Resolved::new(from_hosts, HOSTS_TTL));
    }
    let mut queries = [
        Query::new(name, RecordType::A)?,
        Query::new(name, RecordType::Aaaa)?,
    ];
    // Two equal ids would let one answer stand for the other query.
    while queries[1].id == queries[0].id {
        queries[1] = Query::new(name, RecordType::Aaaa)?;
    }
    ask_nameservers(name, &mut queries, config);
    combine(name, queries)
}

/// `/etc/hosts`, or nothing when it cannot be read.
fn read_hosts() -> String {
    match std::fs::read_to_string("/etc/hosts") {
        Ok(text) => text,
        Err(error) => {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(%error, "cannot read /etc/hosts");
            }
            String::new()
        }
    }
}

/// The addresses `/etc/hosts` text gives `name`, in file order, without duplicates. Names
/// compare case-insensitively and without a trailing dot; `#` starts a comment; lines whose
/// address does not parse are skipped.
pub fn hosts_lookup(hosts_text: &str, name: &str) -> Vec<IpAddr> {
    let wanted = name.strip_suffix('.').unwrap_or(name);
    let mut found = Vec::new();
    for line in hosts_text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let listed = words.any(|host| {
            let host = host.strip_suffix('.').unwrap_or(host);
            host.eq_ignore_ascii_case(wanted)
        });
        if listed && !found.contains(&ip) {
            found.push(ip);
        }
    }
    found
}

/// The labels of a name as text, checked: labels of 1 to 63 letters, digits, hyphens or
/// underscores (service names use them), at most 253 bytes in all; one trailing dot allowed.
fn validate_name(name: &str) -> Result<Vec<&str>, DnsError> {
    let invalid = || DnsError::InvalidName(name.to_owned());
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() || bare.len() > MAX_TEXT_NAME_LEN {
        return Err(invalid());
    }
    let labels: Vec<&str> = bare.split('.').collect();
    let valid_label = |label: &&str| {
        (1..=MAX_LABEL_LEN).contains(&label.len())
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    };
    if labels.iter().all(valid_label) {
        Ok(labels)
    } else {
        Err(invalid())
    }
}

/// A standard query for `name`'s `qtype` records: RD set, one question, and an EDNS0 OPT
/// record advertising [`EDNS_UDP_SIZE`] bytes.
pub fn encode_query(id: u16, name: &str, qtype: RecordType) -> Result<Vec<u8>, DnsError> {
    let labels = validate_name(name)?;
    let mut out = Vec::with_capacity(HEADER_LEN + name.len() + 2 + 4 + 11);
    for field in [id, FLAGS_QUERY, 1, 0, 0, 1] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    for label in labels {
        // validate_name bounds each label to 63 bytes.
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.code().to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    push_opt_record(&mut out);
    Ok(out)
}

/// The EDNS0 OPT pseudo-record: root owner, the payload size in the class field, extended rcode,
/// version and flags 0, no options.
fn push_opt_record(out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&EDNS_UDP_SIZE.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// The fixed header of a message.
struct Header {
    id: u16,
    flags: u16,
    qdcount: u16,
    ancount: u16,
}

impl Header {
    /// The first 12 bytes.
    fn read(bytes: &[u8]) -> Result<Header, DnsError> {
        if bytes.len() < HEADER_LEN {
            return Err(DnsError::Malformed("shorter than a header"));
        }
        Ok(Header {
            id: read_u16(bytes, 0)?,
            flags: read_u16(bytes, 2)?,
            qdcount: read_u16(bytes, 4)?,
            ancount: read_u16(bytes, 6)?,
        })
    }

    /// Bits 11..=14 of the flags.
    fn opcode(&self) -> u16 {
        (self.flags >> 11) & 0xf
    }

    /// The low 4 bits of the flags.
    fn rcode(&self) -> u8 {
        (self.flags & 0xf) as u8
    }
}

/// Parses the answer to the query `id` for `name`'s `qtype` records.
///
/// Checks that it answers that query (id, QR, opcode 0, the question echoed, case-insensitively),
/// maps the rcode (3: [`DnsError::NameError`], others: [`DnsError::ServerFailure`]), then follows
/// the CNAME chain from `name` (at most [`MAX_CNAME_HOPS`]) and takes the records of `qtype`,
/// class IN, of each name in the chain; other records are ignored. A complete answer without
/// such records is [`DnsError::NoAddresses`]. Never panics, whatever the bytes.
pub fn parse_answer(
    bytes: &[u8],
    id: u16,
    name: &str,
    qtype: RecordType,
) -> Result<Answer, DnsError> {
    let header = Header::read(bytes)?;
    check_header(&header, id)?;
    let records_at = check_question(bytes, &header, name, qtype)?;
    rcode_result(header.rcode())?;
    if header.flags & FLAG_TC != 0 {
        return Ok(Answer {
            addrs: Vec::new(),
            ttl: None,
            truncated: true,
        });
    }
    let records = read_records(bytes, records_at, header.ancount)?;
    follow_chain(bytes, &records, qtype)
}

/// The id, QR and opcode: anything else is not the answer to our query.
fn check_header(header: &Header, id: u16) -> Result<(), DnsError> {
    if header.id != id {
        return Err(DnsError::Mismatch("another id"));
    }
    if header.flags & FLAG_QR == 0 {
        return Err(DnsError::Mismatch("a query, not an answer"));
    }
    if header.opcode() != 0 {
        return Err(DnsError::Mismatch("not a standard query"));
    }
    Ok(())
}

/// The question section must echo ours; returns where the answer records start. Some servers
/// answer errors (FORMERR, REFUSED) without the question, so an empty question section is let
/// through to the rcode when the rcode is an error.
fn check_question(
    bytes: &[u8],
    header: &Header,
    name: &str,
    qtype: RecordType,
) -> Result<usize, DnsError> {
    match header.qdcount {
        0 if header.rcode() != 0 => return Err(rcode_error(header.rcode())),
        0 => return Err(DnsError::Malformed("no question")),
        1 => {}
        _ => return Err(DnsError::Malformed("more than one question")),
    }
    let end = skip_name(bytes, HEADER_LEN)?;
    if !name_matches_text(bytes, HEADER_LEN, name)? {
        return Err(DnsError::Mismatch("another name in the question"));
    }
    if read_u16(bytes, end)? != qtype.code() || read_u16(bytes, end + 2)? != CLASS_IN {
        return Err(DnsError::Mismatch("another type or class in the question"));
    }
    Ok(end + 4)
}

/// Ok for NOERROR, the error an rcode stands for otherwise.
fn rcode_result(rcode: u8) -> Result<(), DnsError> {
    match rcode {
        0 => Ok(()),
        rcode => Err(rcode_error(rcode)),
    }
}

/// The error of a non-zero rcode.
fn rcode_error(rcode: u8) -> DnsError {
    if rcode == RCODE_NAME_ERROR {
        DnsError::NameError
    } else {
        DnsError::ServerFailure(rcode)
    }
}

/// One answer record, by offsets into the message (names stay where they are, compressed).
struct Record {
    /// Where its owner name starts.
    owner: usize,
    rtype: u16,
    class: u16,
    ttl: u32,
    rdata: Range<usize>,
}

/// The `count` answer records from `at`. The list is bounded by the input: each record takes
/// at least 11 bytes of it.
fn read_records(bytes: &[u8], mut at: usize, count: u16) -> Result<Vec<Record>, DnsError> {
    let mut records = Vec::new();
    for _ in 0..count {
        let owner = at;
        let fixed = skip_name(bytes, owner)?;
        let rdlength = usize::from(read_u16(bytes, fixed + 8)?);
        let start = fixed + RECORD_FIXED_LEN;
        let end = start + rdlength;
        if end > bytes.len() {
            return Err(DnsError::Malformed("rdata past the end"));
        }
        records.push(Record {
            owner,
            rtype: read_u16(bytes, fixed)?,
            class: read_u16(bytes, fixed + 2)?,
            ttl: read_u32(bytes, fixed + 4)?,
            rdata: start..end,
        });
        at = end;
    }
    Ok(records)
}

/// Walks the chain from the question's name: the address records of each name in it, and its
/// CNAME (the first one, if several) to the next.
fn follow_chain(bytes: &[u8], records: &[Record], qtype: RecordType) -> Result<Answer, DnsError> {
    let mut current = HEADER_LEN;
    let mut addrs = Vec::new();
    let mut ttl: Option<u32> = None;
    for hop in 0..=MAX_CNAME_HOPS {
        let mut next = None;
        for record in records {
            if record.class != CLASS_IN || !names_equal(bytes, record.owner, current)? {
                continue;
            }
            if record.rtype == qtype.code() {
                addrs.push(address(bytes, &record.rdata, qtype)?);
            } else if record.rtype == TYPE_CNAME && next.is_none() {
                next = Some(cname_target(bytes, &record.rdata)?);
            } else {
                continue;
            }
            ttl = Some(ttl.map_or(record.ttl, |ttl| ttl.min(record.ttl)));
        }
        match next {
            None => break,
            Some(_) if hop == MAX_CNAME_HOPS => {
                return Err(DnsError::Malformed("CNAME chain too long"))
            }
            Some(target) => current = target,
        }
    }
    if addrs.is_empty() {
        return Err(DnsError::NoAddresses);
    }
    Ok(Answer {
        addrs,
        ttl: ttl.map(ttl_duration),
        truncated: false,
    })
}

/// A TTL on the wire as a duration: RFC 2181 §8 reads values with the top bit set as 0.
fn ttl_duration(ttl: u32) -> Duration {
    let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
    Duration::from_secs(u64::from(ttl))
}

/// The address in an A or AAAA record's rdata, whose length must be exact.
fn address(bytes: &[u8], rdata: &Range<usize>, qtype: RecordType) -> Result<IpAddr, DnsError> {
    let data = bytes
        .get(rdata.clone())
        .ok_or(DnsError::Malformed("rdata past the end"))?;
    match qtype {
        RecordType::A => <[u8; 4]>::try_from(data)
            .map(|octets| IpAddr::V4(Ipv4Addr::from(octets)))
            .map_err(|_| DnsError::Malformed("A record not 4 bytes")),
        RecordType::Aaaa => <[u8; 16]>::try_from(data)
            .map(|octets| IpAddr::V6(Ipv6Addr::from(octets)))
            .map_err(|_| DnsError::Malformed("AAAA record not 16 bytes")),
    }
}

/// Where a CNAME's target name starts, checked to be a valid name that stays inside the rdata
/// (its pointers may lead anywhere before).
fn cname_target(bytes: &[u8], rdata: &Range<usize>) -> Result<usize, DnsError> {
    if skip_name(bytes, rdata.start)? > rdata.end {
        return Err(DnsError::Malformed("CNAME target past its rdata"));
    }
    Ok(rdata.start)
}

/// Reads a (possibly compressed) name's labels one by one, checking each step: every label
/// within the message and at most 63 bytes, pointers only backwards and at most
/// [`MAX_POINTER_JUMPS`] of them, at most [`MAX_WIRE_NAME_LEN`] bytes in all. Backward pointers
/// alone do not exclude loops (a pointer may land before the labels that lead back to it); the
/// jump bound does.
struct Labels<'a> {
    bytes: &'a [u8],
    at: usize,
    jumps: u32,
    len: usize,
    /// Where the name ends in place: after its root label or its first pointer.
    end: Option<usize>,
    done: bool,
}

impl<'a> Labels<'a> {
    /// The name starting at `at`.
    fn new(bytes: &'a [u8], at: usize) -> Labels<'a> {
        Labels {
            bytes,
            at,
            jumps: 0,
            len: 0,
            end: None,
            done: false,
        }
    }

    /// The next label, `None` after the root label.
    fn next_label(&mut self) -> Result<Option<&'a [u8]>, DnsError> {
        if self.done {
            return Ok(None);
        }
        loop {
            let length = *self
                .bytes
                .get(self.at)
                .ok_or(DnsError::Malformed("name past the end"))?;
            match length >> 6 {
                0 => return self.label(usize::from(length)),
                3 => self.jump(length)?,
                _ => return Err(DnsError::Malformed("unknown label type")),
            }
        }
    }

    /// The label of `length` bytes at `self.at` (the root label when 0).
    fn label(&mut self, length: usize) -> Result<Option<&'a [u8]>, DnsError> {
        self.len += 1 + length;
        if self.len > MAX_WIRE_NAME_LEN {
            return Err(DnsError::Malformed("name too long"));
        }
        let start = self.at + 1;
        let label = self
            .bytes
            .get(start..start + length)
            .ok_or(DnsError::Malformed("label past the end"))?;
        self.at = start + length;
        if length == 0 {
            self.end.get_or_insert(self.at);
            self.done = true;
            return Ok(None);
        }
        Ok(Some(label))
    }

    /// Follows the pointer whose first byte is `high` at `self.at`.
    fn jump(&mut self, high: u8) -> Result<(), DnsError> {
        let low = *self
            .bytes
            .get(self.at + 1)
            .ok_or(DnsError::Malformed("pointer past the end"))?;
        let target = usize::from(u16::from_be_bytes([high & 0x3f, low]));
        if target >= self.at {
            return Err(DnsError::Malformed("pointer not backwards"));
        }
        self.jumps += 1;
        if self.jumps > MAX_POINTER_JUMPS {
            return Err(DnsError::Malformed("too many pointers"));
        }
        self.end.get_or_insert(self.at + 2);
        self.at = target;
        Ok(())
    }
}

/// Checks the whole name at `at`; returns where what follows it starts.
fn skip_name(bytes: &[u8], at: usize) -> Result<usize, DnsError> {
    let mut labels = Labels::new(bytes, at);
    while labels.next_label()?.is_some() {}
    labels.end.ok_or(DnsError::Malformed("name without an end"))
}

/// Whether the names at `a` and `b` are the same, ignoring ASCII case.
fn names_equal(bytes: &[u8], a: usize, b: usize) -> Result<bool, DnsError> {
    let (mut left, mut right) = (Labels::new(bytes, a), Labels::new(bytes, b));
    loop {
        match (left.next_label()?, right.next_label()?) {
            (None, None) => return Ok(true),
            (Some(x), Some(y)) if x.eq_ignore_ascii_case(y) => {}
            _ => return Ok(false),
        }
    }
}

/// Whether the name at `at` is `text` (a trailing dot allowed), ignoring ASCII case.
fn name_matches_text(bytes: &[u8], at: usize, text: &str) -> Result<bool, DnsError> {
    let text = text.strip_suffix('.').unwrap_or(text);
    let mut labels = Labels::new(bytes, at);
    for wanted in text.split('.').filter(|label| !label.is_empty()) {
        match labels.next_label()? {
            Some(label) if label.eq_ignore_ascii_case(wanted.as_bytes()) => {}
            _ => return Ok(false),
        }
    }
    Ok(labels.next_label()?.is_none())
}

/// The big-endian u16 at `at`.
fn read_u16(bytes: &[u8], at: usize) -> Result<u16, DnsError> {
    bytes
        .get(at..at + 2)
        .and_then(|field| <[u8; 2]>::try_from(field).ok())
        .map(u16::from_be_bytes)
        .ok_or(DnsError::Malformed("field past the end"))
}

/// The big-endian u32 at `at`.
fn read_u32(bytes: &[u8], at: usize) -> Result<u32, DnsError> {
    bytes
        .get(at..at + 4)
        .and_then(|field| <[u8; 4]>::try_from(field).ok())
        .map(u32::from_be_bytes)
        .ok_or(DnsError::Malformed("field past the end"))
}

/// A random 16-bit query id without a dependency: std's `RandomState` is keyed from the OS's
/// randomness and re-keyed on every call, so SipHash over a counter gives ids an off-path
/// attacker cannot predict (with the kernel's random source port, what makes forging an
/// answer hard).
fn random_id() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish() as u16
}

/// One of the two queries of a resolution and what became of it.
struct Query {
    qtype: RecordType,
    id: u16,
    packet: Vec<u8>,
    /// Final: an answer, NXDOMAIN or NoAddresses.
    outcome: Option<Result<Answer, DnsError>>,
    /// The latest failure worth reporting if nothing final comes (a timeout is the default).
    last_error: Option<DnsError>,
}

impl Query {
    /// A query with a fresh random id.
    fn new(name: &str, qtype: RecordType) -> Result<Query, DnsError> {
        let id = random_id();
        Ok(Query {
            qtype,
            id,
            packet: encode_query(id, name, qtype)?,
            outcome: None,
            last_error: None,
        })
    }

    /// Still waiting for a final outcome.
    fn pending(&self) -> bool {
        self.outcome.is_none()
    }

    /// Takes an answer's verdict: final ones end the query, failures are remembered and the
    /// next server is asked.
    fn settle(&mut self, result: Result<Answer, DnsError>) {
        match result {
            Ok(answer) => self.outcome = Some(Ok(answer)),
            Err(error @ (DnsError::NameError | DnsError::NoAddresses)) => {
                self.outcome = Some(Err(error));
            }
            Err(error) => self.last_error = Some(error),
        }
    }

    /// What it ended with.
    fn result(self) -> Result<Answer, DnsError> {
        self.outcome
            .or_else(|| self.last_error.map(Err))
            .unwrap_or(Err(DnsError::TimedOut))
    }
}

/// Asks each nameserver in turn, `attempts` rounds, until both queries have a final outcome
/// (or the name is found not to exist).
fn ask_nameservers(name: &str, queries: &mut [Query], config: &ResolverConfig) {
    // A zero timeout is refused by the socket calls and a huge one overflows `Instant`.
    let timeout = config.timeout.clamp(
        Duration::from_millis(1),
        Duration::from_secs(MAX_TIMEOUT_SECS),
    );
    for _ in 0..config.attempts.clamp(1, MAX_ATTEMPTS) {
        for &server in &config.nameservers {
            if let Err(error) = try_server(server, name, queries, timeout) {
                tracing::debug!(%server, name, %error, "nameserver failed");
                for query in queries.iter_mut().filter(|query| query.pending()) {
                    query.last_error = Some(DnsError::Io(copy_io_error(&error)));
                }
            }
            if queries.iter().all(|query| !query.pending()) || name_error(queries) {
                return;
            }
        }
    }
}

/// The same error again, for each query it ended (`io::Error` is not `Clone`).
fn copy_io_error(error: &io::Error) -> io::Error {
    io::Error::new(error.kind(), error.to_string())
}

/// NXDOMAIN for one type is NXDOMAIN for the name: the other query need not wait.
fn name_error(queries: &[Query]) -> bool {
    queries
        .iter()
        .any(|query| matches!(query.outcome, Some(Err(DnsError::NameError))))
}

/// One try on one server: the pending queries over UDP from a fresh socket (a new random source
/// port each time), answers awaited for `timeout`. A socket error ends the try (an ICMP
/// unreachable shows as a refused receive on the connected socket: next server at once).
fn try_server(
    server: SocketAddr,
    name: &str,
    queries: &mut [Query],
    timeout: Duration,
) -> io::Result<()> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    // Connected: the kernel drops datagrams from other sources and reports ICMP errors.
    socket.connect(server)?;
    let mut waiting: Vec<usize> = (0..queries.len())
        .filter(|&index| queries[index].pending())
        .collect();
    for &index in &waiting {
        socket.send(&queries[index].packet)?;
    }
    let deadline = Instant::now() + timeout;
    let mut buffer = vec![0u8; UDP_BUFFER_LEN];
    while !waiting.is_empty() {
        let Some(len) = receive(&socket, server, &mut buffer, deadline)? else {
            return Ok(());
        };
        let datagram = &buffer[..len];
        let Some(slot) = waiting
            .iter()
            .position(|&index| answer_id(datagram) == Some(queries[index].id))
        else {
            continue;
        };
        let query = &mut queries[waiting[slot]];
        match parse_answer(datagram, query.id, name, query.qtype) {
            Err(DnsError::Mismatch(why)) => {
                tracing::debug!(%server, name, why, "answer ignored");
                continue;
            }
            Ok(answer) if answer.truncated => {
                query.settle(exchange_tcp(server, name, query, timeout));
            }
            result => query.settle(result),
        }
        waiting.swap_remove(slot);
    }
    Ok(())
}

/// The id of a datagram.
fn answer_id(datagram: &[u8]) -> Option<u16> {
    read_u16(datagram, 0).ok()
}

/// The next datagram from `server` before `deadline`; `None` at the deadline.
fn receive(
    socket: &UdpSocket,
    server: SocketAddr,
    buffer: &mut [u8],
    deadline: Instant,
) -> io::Result<Option<usize>> {
    loop {
        let Some(left) = remaining(deadline) else {
            return Ok(None);
        };
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(buffer) {
            // The connected socket filters already; checking again costs nothing.
            Ok((len, from)) if from == server => return Ok(Some(len)),
            Ok((_, from)) => tracing::debug!(%server, %from, "datagram from elsewhere ignored"),
            Err(error) if timed_out(&error) => return Ok(None),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
}

/// Time left before `deadline`, `None` when none (a zero read timeout is an error for std).
fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then_some(left)
}

/// A blocking read's timeout shows as either kind, depending on the platform.
fn timed_out(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The query over TCP to the same server (its answer was truncated over UDP), all of it within
/// `timeout`: the 2-byte length prefix of RFC 1035 §4.2.2 each way.
fn exchange_tcp(
    server: SocketAddr,
    name: &str,
    query: &Query,
    timeout: Duration,
) -> Result<Answer, DnsError> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&server, timeout).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout))?;
    // encode_query's names keep a query far below 64 KiB.
    let length =
        u16::try_from(query.packet.len()).map_err(|_| DnsError::InvalidName(name.to_owned()))?;
    let mut framed = length.to_be_bytes().to_vec();
    framed.extend_from_slice(&query.packet);
    stream.write_all(&framed).map_err(io_error)?;
    let mut prefix = [0u8; 2];
    read_exact_by(&mut stream, &mut prefix, deadline)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    read_exact_by(&mut stream, &mut answer, deadline)?;
    match parse_answer(&answer, query.id, name, query.qtype)? {
        answer if answer.truncated => Err(DnsError::Malformed("truncated over TCP")),
        answer => Ok(answer),
    }
}

/// Fills `buffer` from `stream` by `deadline` (a per-read timeout alone would let a server
/// that sends a byte at a time hold us for much longer).
fn read_exact_by(
    stream: &mut TcpStream,
    buffer: &mut [u8],
    deadline: Instant,
) -> Result<(), DnsError> {
    let mut filled = 0;
    while filled < buffer.len() {
        let left = remaining(deadline).ok_or(DnsError::TimedOut)?;
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buffer[filled..]) {
            Ok(0) => return Err(DnsError::Malformed("TCP answer cut short")),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_error(error)),
        }
    }
    Ok(())
}

/// An I/O error, a timeout shown as [`DnsError::TimedOut`].
fn io_error(error: io::Error) -> DnsError {
    if timed_out(&error) {
        DnsError::TimedOut
    } else {
        DnsError::Io(error)
    }
}

/// The result of both queries: their addresses if any (the smallest TTL), else the most
/// telling error: NXDOMAIN, then a failure (it may hide addresses), then no addresses.
fn combine(name: &str, queries: [Query; 2]) -> Result<Resolved, DnsError> {
    let mut addrs = Vec::new();
    let mut ttl: Option<Duration> = None;
    let mut errors = Vec::new();
    for query in queries {
        match query.result() {
            Ok(answer) => {
                addrs.extend(answer.addrs);
                let answer_ttl = answer.ttl.unwrap_or(MIN_TTL);
                ttl = Some(ttl.map_or(answer_ttl, |ttl| ttl.min(answer_ttl)));
            }
            Err(error) => errors.push(error),
        }
    }
    if let Some(ttl) = ttl.filter(|_| !addrs.is_empty()) {
        for error in errors
            .iter()
            .filter(|error| !matches!(error, DnsError::NoAddresses))
        {
            tracing::debug!(name, %error, "one query failed; using the other's addresses");
        }
        return Ok(Resolved::new(addrs, ttl));
    }
    Err(most_telling(errors))
}

/// NXDOMAIN first, then any failure, then [`DnsError::NoAddresses`].
fn most_telling(errors: Vec<DnsError>) -> DnsError {
    if errors
        .iter()
        .any(|error| matches!(error, DnsError::NameError))
    {
        return DnsError::NameError;
    }
    errors
        .into_iter()
        .find(|error| !matches!(error, DnsError::NoAddresses))
        .unwrap_or(DnsError::NoAddresses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    const ID: u16 = 0x1234;
    const TYPE_A: u16 = 1;
    const TYPE_AAAA: u16 = 28;
    /// Flags of an answer: QR, RD, RA.
    const FLAGS_ANSWER: u16 = 0x8180;
    /// The question's name, as a compression pointer.
    const QNAME: [u8; 2] = [0xc0, 12];

    /// `name` uncompressed on the wire.
    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|label| !label.is_empty()) {
            out.push(u8::try_from(label.len()).unwrap());
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// An answer record of class IN.
    fn record(owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut out = owner.to_vec();
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&u16::try_from(rdata.len()).unwrap().to_be_bytes());
        out.extend_from_slice(rdata);
        out
    }

    /// The answer to our query for `name`: its question, `flags`, and `answers` (whose
    /// pointers must count on the question starting at 12).
    fn response(
        id: u16,
        name: &str,
        qtype: RecordType,
        flags: u16,
        answers: &[Vec<u8>],
    ) -> Vec<u8> {
        let mut out = encode_query(id, name, qtype).unwrap();
        out.truncate(out.len() - 11); // the OPT record
        out[2..4].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&u16::try_from(answers.len()).unwrap().to_be_bytes());
        out[10..12].copy_from_slice(&0u16.to_be_bytes());
        for answer in answers {
            out.extend_from_slice(answer);
        }
        out
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn ips(texts: &[&str]) -> Vec<IpAddr> {
        texts.iter().map(|text| ip(text)).collect()
    }

    fn parse_a(bytes: &[u8], name: &str) -> Result<Answer, DnsError> {
        parse_answer(bytes, ID, name, RecordType::A)
    }

    #[test]
    fn encode_query_writes_header_question_and_opt_record() {
        let query = encode_query(0xbeef, "app.Example.com", RecordType::A).unwrap();
        let mut expected = vec![
            0xbe, 0xef, // id
            0x01, 0x00, // QR 0, opcode 0, RD 1
            0, 1, // one question
            0, 0, 0, 0, // no answers, no authority
            0, 1, // one additional: the OPT record
        ];
        expected.extend_from_slice(b"\x03app\x07Example\x03com\x00");
        expected.extend_from_slice(&[0, 1, 0, 1]); // type A, class IN
        expected.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]); // OPT, 1232
        assert_eq!(query, expected);

        let aaaa = encode_query(0xbeef, "app.Example.com.", RecordType::Aaaa).unwrap();
        assert_eq!(aaaa.len(), expected.len());
        assert_eq!(&aaaa[29..31], &[0, 28], "type AAAA");
        assert_eq!(aaaa[..29], expected[..29], "a trailing dot changes nothing");
    }

    #[test]
    fn encode_query_refuses_invalid_names() {
        let long_label = "a".repeat(64);
        let too_long = ["a".repeat(63).as_str(); 4].join("."); // 255 bytes
        let longest = format!(
            "{}.{}",
            ["a".repeat(63).as_str(); 3].join("."),
            "b".repeat(61)
        ); // 253
        for name in [
            "",
            ".",
            "a..b",
            ".a",
            "a b",
            "é.com",
            "a/b",
            "x.",
            &long_label,
            &too_long,
        ] {
            let verdict = encode_query(1, name, RecordType::A);
            if name == "x." {
                assert!(verdict.is_ok());
                continue;
            }
            assert!(matches!(verdict, Err(DnsError::InvalidName(_))), "{name:?}");
        }
        for name in ["_http._tcp.example", "-x-.y", "1.2.3", longest.as_str()] {
            assert!(encode_query(1, name, RecordType::A).is_ok(), "{name:?}");
        }
    }

    #[test]
    fn parse_answer_takes_every_a_record_and_the_smallest_ttl() {
        let answer = response(
            ID,
            "app.example.com",
            RecordType::A,
            FLAGS_ANSWER,
            &[
                record(&QNAME, TYPE_A, 300, &[192, 0, 2, 1]),
                record(&QNAME, TYPE_A, 60, &[192, 0, 2, 2]),
            ],
        );
        let parsed = parse_a(&answer, "app.example.com").unwrap();
        assert_eq!(parsed.addrs, ips(&["192.0.2.1", "192.0.2.2"]));
        assert_eq!(parsed.ttl, Some(Duration::from_secs(60)));
        assert!(!parsed.truncated);
        // Names compare without regard to case or a trailing dot.
        assert_eq!(parse_a(&answer, "APP.example.COM.").unwrap(), parsed);
    }

    #[test]
    fn parse_answer_takes_aaaa_records_only_for_an_aaaa_query() {
        let v6 = ip("2001:db8::7");
        let IpAddr::V6(octets) = v6 else {
            unreachable!()
        };
        let answer = response(
            ID,
            "app.example.com",
            RecordType::Aaaa,
            FLAGS_ANSWER,
            &[
                record(&QNAME, TYPE_A, 30, &[192, 0, 2, 1]),
                record(&QNAME, TYPE_AAAA, 120, &octets.octets()),
            ],
        );
        let parsed = parse_answer(&answer, ID, "app.example.com", RecordType::Aaaa).unwrap();
        assert_eq!(parsed.addrs, vec![v6]);
        assert_eq!(
            parsed.ttl,
            Some(Duration::from_secs(120)),
            "the A record is not used"
        );
    }

    /// www.example.com → CNAME app.example.com (compressed: `app` + a pointer into the
    /// question) → A, the A record's owner a pointer to the CNAME's rdata.
    fn cname_chain_answer() -> Vec<u8> {
        let question_end = 12 + wire("www.example.com").len() + 4;
        let cname_rdata_at = question_end + 2 + RECORD_FIXED_LEN;
        let cname = record(&QNAME, TYPE_CNAME, 20, b"\x03app\xc0\x10"); // 0x10: "example.com"
        let a_owner = [0xc0, u8::try_from(cname_rdata_at).unwrap()];
        let a = record(&a_owner, TYPE_A, 300, &[198, 51, 100, 9]);
        response(
            ID,
            "www.example.com",
            RecordType::A,
            FLAGS_ANSWER,
            &[cname, a],
        )
    }

    #[test]
    fn parse_answer_follows_a_cname_chain_through_compression_pointers() {
        let parsed = parse_a(&cname_chain_answer(), "www.example.com").unwrap();
        assert_eq!(parsed.addrs, ips(&["198.51.100.9"]));
        assert_eq!(
            parsed.ttl,
            Some(Duration::from_secs(20)),
            "the CNAME's TTL counts"
        );
    }

    #[test]
    fn parse_answer_follows_a_chain_whatever_the_record_order() {
        let app = wire("app.example.com");
        let answer = response(
            ID,
            "www.example.com",
            RecordType::A,
            FLAGS_ANSWER,
            &[
                record(&app, TYPE_A, 50, &[203, 0, 113, 5]),
                record(&wire("edge.example.com"), TYPE_A, 5, &[203, 0, 113, 6]),
                record(&QNAME, TYPE_CNAME, 100, &app),
            ],
        );
        let parsed = parse_a(&answer, "www.example.com").unwrap();
        assert_eq!(
            parsed.addrs,
            ips(&["203.0.113.5"]),
            "not the record of another name"
        );
        assert_eq!(parsed.ttl, Some(Duration::from_secs(50)));
    }

    #[test]
    fn parse_answer_follows_pointers_to_pointers() {
        // The first record's owner is a pointer to the question; the second's a pointer to
        // that pointer.
        let first_owner_at = 12 + wire("app.example.com").len() + 4;
        let answer = response(
            ID,
            "app.example.com",
            RecordType::A,
            FLAGS_ANSWER,
            &[
                record(&QNAME, TYPE_A, 10, &[10, 0, 0, 1]),
                record(
                    &[0xc0, u8::try_from(first_owner_at).unwrap()],
                    TYPE_A,
                    10,
                    &[10, 0, 0, 2],
                ),
            ],
        );
        assert_eq!(
            parse_a(&answer, "app.example.com").unwrap().addrs,
            ips(&["10.0.0.1", "10.0.0.2"])
        );
    }

    #[test]
    fn parse_answer_maps_error_rcodes() {
        let nxdomain = response(ID, "gone.example", RecordType::A, FLAGS_ANSWER | 3, &[]);
        assert!(matches!(
            parse_a(&nxdomain, "gone.example"),
            Err(DnsError::NameError)
        ));
        let servfail = response(ID, "app.example", RecordType::A, FLAGS_ANSWER | 2, &[]);
        assert!(matches!(
            parse_a(&servfail, "app.example"),
            Err(DnsError::ServerFailure(2))
        ));
        // REFUSED without the question, as some servers answer.
        let mut refused = servfail[..12].to_vec();
        refused[3] = (refused[3] & 0xf0) | 5;
        refused[4..6].copy_from_slice(&[0, 0]);
        assert!(matches!(
            parse_a(&refused, "app.example"),
            Err(DnsError::ServerFailure(5))
        ));
    }

    #[test]
    fn parse_answer_refuses_what_does_not_answer_our_query() {
        let good = response(
            ID,
            "app.example",
            RecordType::A,
            FLAGS_ANSWER,
            &[record(&QNAME, TYPE_A, 10, &[10, 0, 0, 1])],
        );
        assert!(parse_a(&good, "app.example").is_ok());
        let wrong_id = parse_answer(&good, ID + 1, "app.example", RecordType::A);
        assert!(matches!(wrong_id, Err(DnsError::Mismatch(_))));
        let other_name = parse_a(&good, "app.example.org");
        assert!(matches!(other_name, Err(DnsError::Mismatch(_))));
        let prefix_name = parse_a(&good, "app");
        assert!(matches!(prefix_name, Err(DnsError::Mismatch(_))));
        let other_type = parse_answer(&good, ID, "app.example", RecordType::Aaaa);
        assert!(matches!(other_type, Err(DnsError::Mismatch(_))));
        let mut query = good.clone();
        query[2] &= 0x7f;
        assert!(matches!(
            parse_a(&query, "app.example"),
            Err(DnsError::Mismatch(_))
        ));
        let mut notify = good.clone();
        notify[2] |= 4 << 3;
        assert!(matches!(
            parse_a(&notify, "app.example"),
            Err(DnsError::Mismatch(_))
        ));
    }

    #[test]
    fn parse_answer_ignores_records_of_other_names_types_and_classes() {
        let mut chaos = record(&QNAME, TYPE_A, 10, &[10, 0, 0, 3]);
        chaos[4..6].copy_from_slice(&3u16.to_be_bytes()); // class CH
        let answer = response(
            ID,
            "app.example",
            RecordType::A,
            FLAGS_ANSWER,
            &[
                record(&wire("other.example"), TYPE_A, 10, &[10, 0, 0, 1]),
                record(&QNAME, 16, 10, b"\x04text"), // TXT
                chaos,
            ],
        );
        assert!(matches!(
            parse_a(&answer, "app.example"),
            Err(DnsError::NoAddresses)
        ));
        let empty = response(ID, "app.example", RecordType::Aaaa, FLAGS_ANSWER, &[]);
        let verdict = parse_answer(&empty, ID, "app.example", RecordType::Aaaa);
        assert!(matches!(verdict, Err(DnsError::NoAddresses)));
    }

    #[test]
    fn parse_answer_ignores_the_sections_after_the_answers() {
        let mut answer = response(
            ID,
            "app.example",
            RecordType::A,
            FLAGS_ANSWER,
            &[record(&QNAME, TYPE_A, 10, &[10, 0, 0, 1])],
        );
        answer[11] = 1;
        push_opt_record(&mut answer);
        assert_eq!(
            parse_a(&answer, "app.example").unwrap().addrs,
            ips(&["10.0.0.1"])
        );
    }

    #[test]
    fn parse_answer_reports_a_truncated_answer() {
        let mut answer = response(
            ID,
            "app.example",
            RecordType::A,
            FLAGS_ANSWER | FLAG_TC,
            &[],
        );
        answer[7] = 5; // claims records it does not hold
        let parsed = parse_a(&answer, "app.example").unwrap();
        assert_eq!(
            parsed,
            Answer {
                addrs: Vec::new(),
                ttl: None,
                truncated: true
            }
        );
    }

    fn assert_malformed(bytes: &[u8], name: &str, what: &str) {
        let verdict = parse_a(bytes, name);
        assert!(
            matches!(verdict, Err(DnsError::Malformed(_))),
            "{what}: {verdict:?}"
        );
    }

    #[test]
    fn parse_answer_refuses_malformed_answers() {
        let name = "app.example";
        let question_end = 12 + wire(name).len() + 4;
        let a = |owner: &[u8], rdata: &[u8]| {
            response(
                ID,
                name,
                RecordType::A,
                FLAGS_ANSWER,
                &[record(owner, TYPE_A, 1, rdata)],
            )
        };
        let at = u8::try_from(question_end).unwrap();
        // A label that leads back to a pointer before it: backwards, and a loop.
        let mut looping = a(&[0x01, b'x', 0xc0, at], &[10, 0, 0, 1]);
        assert_malformed(&looping, name, "pointer loop");
        looping[question_end + 3] = at + 2; // the pointer to itself
        assert_malformed(&looping, name, "pointer to itself");
        assert_malformed(&a(&[0xc0, 0xff], &[10, 0, 0, 1]), name, "pointer forward");
        assert_malformed(&a(&[0x40, b'x', 0], &[10, 0, 0, 1]), name, "label type 01");
        assert_malformed(&a(&[0x80, b'x', 0], &[10, 0, 0, 1]), name, "label type 10");
        let mut long_label = vec![63];
        long_label.extend_from_slice(&[b'x'; 64]);
        long_label.push(0);
        assert_malformed(&a(&long_label, &[10, 0, 0, 1]), name, "label of 64 bytes");
        let mut long_name = Vec::new();
        for _ in 0..5 {
            long_name.push(60);
            long_name.extend_from_slice(&[b'x'; 60]);
        }
        long_name.push(0);
        assert_malformed(&a(&long_name, &[10, 0, 0, 1]), name, "name of 306 bytes");
        assert_malformed(&a(&QNAME, &[10, 0, 0]), name, "A of 3 bytes");
        assert_malformed(&a(&QNAME, &[10, 0, 0, 1, 2]), name, "A of 5 bytes");
        let mut past_end = a(&QNAME, &[10, 0, 0, 1]);
        past_end[question_end + 2 + 8..question_end + 2 + 10].copy_from_slice(&[0, 5]);
        assert_malformed(&past_end, name, "rdlength past the end");
        let mut missing = a(&QNAME, &[10, 0, 0, 1]);
        missing[7] = 2;
        assert_malformed(&missing, name, "fewer records than counted");
        let good = a(&QNAME, &[10, 0, 0, 1]);
        for len in 0..good.len() {
            assert!(parse_a(&good[..len], name).is_err(), "cut at {len}");
        }
    }

    #[test]
    fn parse_answer_bounds_the_cname_chain() {
        let name = "n0.example";
        let chain = |links: usize| {
            let mut answers: Vec<Vec<u8>> = (0..links)
                .map(|k| {
                    let owner = wire(&format!("n{k}.example"));
                    let target = wire(&format!("n{}.example", k + 1));
                    record(&owner, TYPE_CNAME, 60, &target)
                })
                .collect();
            let last = wire(&format!("n{links}.example"));
            answers.push(record(&last, TYPE_A, 60, &[10, 0, 0, 1]));
            response(ID, name, RecordType::A, FLAGS_ANSWER, &answers)
        };
        assert_eq!(
            parse_a(&chain(MAX_CNAME_HOPS), name).unwrap().addrs.len(),
            1
        );
        assert_malformed(&chain(MAX_CNAME_HOPS + 1), name, "9 CNAMEs");
        let looping = response(
            ID,
            name,
            RecordType::A,
            FLAGS_ANSWER,
            &[
                record(&QNAME, TYPE_CNAME, 60, &wire("n1.example")),
                record(&wire("n1.example"), TYPE_CNAME, 60, &QNAME),
            ],
        );
        assert_malformed(&looping, name, "CNAME loop");
        let outside = response(
            ID,
            name,
            RecordType::A,
            FLAGS_ANSWER,
            &[record(&QNAME, TYPE_CNAME, 60, b"\x03abc")],
        );
        assert_malformed(&outside, name, "CNAME target past its rdata");
    }

    #[test]
    fn parse_answer_reads_a_ttl_with_the_top_bit_as_zero() {
        let answer = response(
            ID,
            "app.example",
            RecordType::A,
            FLAGS_ANSWER,
            &[record(&QNAME, TYPE_A, 0x8000_0000, &[10, 0, 0, 1])],
        );
        assert_eq!(
            parse_a(&answer, "app.example").unwrap().ttl,
            Some(Duration::ZERO)
        );
    }

    /// Marsaglia's xorshift64: reproducible noise without a dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }
    }

    /// What must hold of any verdict: it is the same the second time, and an answer never
    /// holds more addresses than its bytes can (15 bytes a record at least, with the root as
    /// owner through a CNAME).
    fn check_verdict(bytes: &[u8], id: u16, name: &str, qtype: RecordType) {
        let verdict = parse_answer(bytes, id, name, qtype);
        let again = parse_answer(bytes, id, name, qtype);
        assert_eq!(format!("{verdict:?}"), format!("{again:?}"));
        if let Ok(answer) = verdict {
            assert!(answer.addrs.len() * 15 <= bytes.len());
            assert_eq!(answer.truncated, answer.ttl.is_none());
            assert_eq!(answer.truncated, answer.addrs.is_empty());
        }
    }

    #[test]
    fn parse_answer_never_panics_on_random_bytes() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for round in 0..4000 {
            let len = rng.below(300);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half of them pass the header checks, to reach the names and records.
            if round % 2 == 0 && len >= 12 {
                bytes[..4].copy_from_slice(&[0x12, 0x34, 0x81, 0x80]);
                bytes[4..6].copy_from_slice(&[0, 1]);
                bytes[6] = 0;
            }
            check_verdict(&bytes, ID, "app.example", RecordType::A);
            check_verdict(&bytes, ID, "app.example", RecordType::Aaaa);
        }
    }

    #[test]
    fn parse_answer_never_panics_on_mutated_answers() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let seeds = [
            cname_chain_answer(),
            response(
                ID,
                "www.example.com",
                RecordType::A,
                FLAGS_ANSWER,
                &[
                    record(&QNAME, TYPE_A, 300, &[192, 0, 2, 1]),
                    record(&QNAME, TYPE_A, 60, &[192, 0, 2, 2]),
                ],
            ),
        ];
        for round in 0..4000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(4) {
                    0 => bytes[at] = rng.next() as u8,
                    1 => bytes[at] ^= 1 << rng.below(8),
                    2 => bytes.truncate(at),
                    _ => bytes.insert(at, rng.next() as u8),
                }
                if bytes.is_empty() {
                    bytes.push(0);
                }
            }
            check_verdict(&bytes, ID, "www.example.com", RecordType::A);
        }
    }

    #[test]
    fn hosts_lookup_reads_names_and_aliases() {
        let hosts = "\
# comment 10.0.0.9 app.internal
127.0.0.1\tlocalhost
10.0.0.1 app.internal app # the application
10.0.0.2   APP.Internal.
::1 localhost ip6-localhost
fd00::5 app.internal
10.0.0.1 app.internal
not-an-ip app.internal
fe80::1%eth0 app.internal
    10.0.0.3 other.internal
";
        assert_eq!(
            hosts_lookup(hosts, "app.internal"),
            ips(&["10.0.0.1", "10.0.0.2", "fd00::5"])
        );
        assert_eq!(
            hosts_lookup(hosts, "App.Internal."),
            hosts_lookup(hosts, "app.internal")
        );
        assert_eq!(hosts_lookup(hosts, "app"), ips(&["10.0.0.1"]));
        assert_eq!(hosts_lookup(hosts, "localhost"), ips(&["127.0.0.1", "::1"]));
        assert_eq!(hosts_lookup(hosts, "other.internal"), ips(&["10.0.0.3"]));
        assert!(hosts_lookup(hosts, "comment").is_empty());
        assert!(hosts_lookup(hosts, "internal").is_empty());
        assert!(hosts_lookup("", "app").is_empty());
    }

    fn server(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn resolver_config_parse_reads_nameservers_and_options() {
        let config = ResolverConfig::parse(
            "# generated\n\
             ; also a comment\n\
             search corp.example\n\
             nameserver 10.0.0.53\n\
             nameserver\t2001:db8::53\n\
             nameserver fe80::1%eth0\n\
             nameserver not-an-address\n\
             options ndots:2 rotate timeout:3 attempts:4\n\
             sortlist 10.0.0.0/8\n",
        );
        assert_eq!(
            config,
            ResolverConfig {
                nameservers: vec![server("10.0.0.53:53"), server("[2001:db8::53]:53")],
                timeout: Duration::from_secs(3),
                attempts: 4,
            }
        );
    }

    #[test]
    fn resolver_config_parse_keeps_three_nameservers_and_bounds_options() {
        let config = ResolverConfig::parse(
            "nameserver 10.0.0.1\nnameserver 10.0.0.2\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n\
             options timeout:0 attempts:99\noptions timeout:x attempts:\n",
        );
        assert_eq!(
            config.nameservers,
            vec![
                server("10.0.0.1:53"),
                server("10.0.0.2:53"),
                server("10.0.0.3:53")
            ]
        );
        assert_eq!(
            (config.timeout, config.attempts),
            (Duration::from_secs(1), 5)
        );
        let long = ResolverConfig::parse("options timeout:99999999999 attempts:0");
        assert_eq!((long.timeout, long.attempts), (Duration::from_secs(30), 1));
    }

    #[test]
    fn resolver_config_parse_without_nameservers_uses_localhost() {
        for text in [
            "",
            "search example\n",
            "nameserver\n",
            "# nameserver 10.0.0.1\n",
        ] {
            let config = ResolverConfig::parse(text);
            assert_eq!(config, ResolverConfig::default(), "{text:?}");
            assert_eq!(config.nameservers, vec![server("127.0.0.1:53")]);
        }
        assert_eq!(
            (
                ResolverConfig::default().timeout,
                ResolverConfig::default().attempts
            ),
            (Duration::from_secs(5), 2)
        );
    }

    #[test]
    fn resolve_takes_ip_literals_and_hosts_entries_without_asking() {
        // No nameserver listens on port 9 of TEST-NET: asking would fail.
        let nowhere = ResolverConfig {
            nameservers: vec![server("192.0.2.1:9")],
            timeout: Duration::from_millis(1),
            attempts: 1,
        };
        let literal = resolve("2001:db8::1", &nowhere).unwrap();
        assert_eq!(
            (literal.addrs, literal.ttl),
            (ips(&["2001:db8::1"]), LITERAL_TTL)
        );
        let hosts = "10.0.0.2 app.internal\n10.0.0.1 app.internal\n";
        let found = resolve_with_hosts("app.internal.", hosts, &nowhere).unwrap();
        assert_eq!(
            found,
            Resolved::new(ips(&["10.0.0.1", "10.0.0.2"]), HOSTS_TTL)
        );
        assert_eq!(found.ttl, Duration::from_secs(30));
        assert!(matches!(
            resolve("bad name", &nowhere),
            Err(DnsError::InvalidName(_))
        ));
    }

    #[test]
    fn resolved_sorts_deduplicates_and_clamps() {
        let resolved = Resolved::new(
            ips(&["10.0.0.2", "::1", "10.0.0.1", "10.0.0.2"]),
            Duration::ZERO,
        );
        assert_eq!(resolved.addrs, ips(&["10.0.0.1", "10.0.0.2", "::1"]));
        assert_eq!(resolved.ttl, MIN_TTL);
        assert_eq!(
            Resolved::new(Vec::new(), Duration::from_secs(86400)).ttl,
            MAX_TTL
        );
    }

    /// What the test server does with a query.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Behaviour {
        /// Answers as a server of `app.test.` would.
        Answer,
        /// Sets TC over UDP and answers in full over TCP on the same port.
        Truncate,
        /// SERVFAIL to everything.
        Fail,
        /// Answers from another port first (with another address), then as `Answer`.
        SpoofFirst,
    }

    /// A DNS server on 127.0.0.1 for `app.test.`: A 127.0.0.1 and 127.0.0.2 (TTL 5), no AAAA,
    /// NXDOMAIN for other names. Stops when dropped.
    struct TestServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl TestServer {
        fn start(behaviour: Behaviour) -> TestServer {
            let stop = Arc::new(AtomicBool::new(false));
            // The TCP port of the same number may be taken: try other ports.
            for _ in 0..20 {
                let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
                let addr = udp.local_addr().unwrap();
                let tcp = match behaviour {
                    Behaviour::Truncate => match TcpListener::bind(addr) {
                        Ok(listener) => Some(listener),
                        Err(_) => continue,
                    },
                    _ => None,
                };
                let mut threads = vec![serve_udp(udp, behaviour, Arc::clone(&stop))];
                threads.extend(tcp.map(|listener| serve_tcp(listener, Arc::clone(&stop))));
                return TestServer {
                    addr,
                    stop,
                    threads,
                };
            }
            panic!("no port free for both UDP and TCP");
        }

        fn config(&self) -> ResolverConfig {
            ResolverConfig {
                nameservers: vec![self.addr],
                timeout: Duration::from_millis(500),
                attempts: 2,
            }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for thread in self.threads.drain(..) {
                let _ = thread.join();
            }
        }
    }

    fn serve_udp(socket: UdpSocket, behaviour: Behaviour, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let Ok((len, from)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                let query = &buffer[..len];
                if behaviour == Behaviour::SpoofFirst {
                    let forger = UdpSocket::bind("127.0.0.1:0").unwrap();
                    forger
                        .send_to(&server_answer(query, false, Some([10, 9, 9, 9])), from)
                        .unwrap();
                }
                let answer = match behaviour {
                    Behaviour::Fail => server_failure(query),
                    _ => server_answer(query, behaviour == Behaviour::Truncate, None),
                };
                socket.send_to(&answer, from).unwrap();
            }
        })
    }

    fn serve_tcp(listener: TcpListener, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                stream.set_nonblocking(false).unwrap();
                let mut prefix = [0u8; 2];
                stream.read_exact(&mut prefix).unwrap();
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
                stream.read_exact(&mut query).unwrap();
                let answer = server_answer(&query, false, None);
                let mut framed = u16::try_from(answer.len()).unwrap().to_be_bytes().to_vec();
                framed.extend_from_slice(&answer);
                stream.write_all(&framed).unwrap();
            }
        })
    }

    /// The question of a query (uncompressed, as ours are): the name in lower case, its type,
    /// and where the question ends.
    fn server_question(query: &[u8]) -> (String, u16, usize) {
        let mut at = 12;
        let mut labels = Vec::new();
        while query[at] != 0 {
            let len = usize::from(query[at]);
            labels.push(String::from_utf8_lossy(&query[at + 1..at + 1 + len]).to_lowercase());
            at += 1 + len;
        }
        let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
        (labels.join("."), qtype, at + 5)
    }

    /// The test server's answer: `spoofed` replaces its A records with one of that address.
    fn server_answer(query: &[u8], truncate: bool, spoofed: Option<[u8; 4]>) -> Vec<u8> {
        let (name, qtype, question_end) = server_question(query);
        let mut records = Vec::new();
        let mut flags = FLAGS_ANSWER;
        if name != "app.test" {
            flags |= u16::from(RCODE_NAME_ERROR);
        } else if truncate {
            flags |= FLAG_TC;
        } else if qtype == TYPE_A {
            let addresses = match spoofed {
                Some(address) => vec![address],
                None => vec![[127, 0, 0, 1], [127, 0, 0, 2]],
            };
            records = addresses
                .iter()
                .map(|address| record(&QNAME, TYPE_A, 5, address))
                .collect();
        }
        let mut out = query[..question_end].to_vec();
        out[2..4].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&u16::try_from(records.len()).unwrap().to_be_bytes());
        out[10..12].copy_from_slice(&[0, 0]);
        records
            .iter()
            .for_each(|record| out.extend_from_slice(record));
        out
    }

    fn server_failure(query: &[u8]) -> Vec<u8> {
        let (_, _, question_end) = server_question(query);
        let mut out = query[..question_end].to_vec();
        out[2..4].copy_from_slice(&(FLAGS_ANSWER | 2).to_be_bytes());
        out[10..12].copy_from_slice(&[0, 0]);
        out
    }

    fn app_test() -> Resolved {
        Resolved {
            addrs: ips(&["127.0.0.1", "127.0.0.2"]),
            ttl: Duration::from_secs(5),
        }
    }

    #[test]
    fn resolve_asks_the_nameserver() {
        let server = TestServer::start(Behaviour::Answer);
        assert_eq!(resolve("app.test", &server.config()).unwrap(), app_test());
        assert_eq!(resolve("APP.test.", &server.config()).unwrap(), app_test());
    }

    #[test]
    fn resolve_reports_a_name_that_does_not_exist() {
        let server = TestServer::start(Behaviour::Answer);
        let verdict = resolve("nothing.test", &server.config());
        assert!(matches!(verdict, Err(DnsError::NameError)), "{verdict:?}");
    }

    #[test]
    fn resolve_times_out_after_every_try() {
        // Bound but never read: the queries are swallowed.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = ResolverConfig {
            nameservers: vec![silent.local_addr().unwrap()],
            timeout: Duration::from_millis(500),
            attempts: 2,
        };
        let started = Instant::now();
        let verdict = resolve("app.test", &config);
        let took = started.elapsed();
        assert!(matches!(verdict, Err(DnsError::TimedOut)), "{verdict:?}");
        assert!(
            (Duration::from_millis(950)..Duration::from_secs(3)).contains(&took),
            "took {took:?}"
        );
    }

    #[test]
    fn resolve_asks_over_tcp_when_the_answer_is_truncated() {
        let server = TestServer::start(Behaviour::Truncate);
        assert_eq!(resolve("app.test", &server.config()).unwrap(), app_test());
    }

    #[test]
    fn resolve_moves_on_from_a_silent_or_failing_nameserver() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let failing = TestServer::start(Behaviour::Fail);
        let good = TestServer::start(Behaviour::Answer);
        let config = ResolverConfig {
            nameservers: vec![silent.local_addr().unwrap(), failing.addr, good.addr],
            timeout: Duration::from_millis(200),
            attempts: 1,
        };
        assert_eq!(resolve("app.test", &config).unwrap(), app_test());
        let verdict = resolve("app.test", &failing.config());
        assert!(
            matches!(verdict, Err(DnsError::ServerFailure(2))),
            "{verdict:?}"
        );
    }

    #[test]
    fn resolve_ignores_answers_from_another_port() {
        let server = TestServer::start(Behaviour::SpoofFirst);
        assert_eq!(resolve("app.test", &server.config()).unwrap(), app_test());
    }
}
