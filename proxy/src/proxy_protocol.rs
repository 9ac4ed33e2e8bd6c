//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2): the header an L4 load
//! balancer (HAProxy `send-proxy-v2`, AWS NLB, IPVS tools) writes before a TCP stream's own
//! bytes to say who the client was, and the v2 header wsplice writes towards upstreams.
//!
//! Sans-IO: [`parse`] takes the bytes read so far and answers "read more", a header and its
//! length, or why the stream is refused; [`encode_v2`] returns bytes. Every length read off the
//! wire is checked against what is there and what a header may hold is bounded
//! ([`MAX_HEADER_LEN`], [`MAX_TLVS`]), because the bytes come from whoever reaches the port:
//! no input makes it index out of bounds, allocate more than about a header, or loop long.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Longest v2 payload (after the 16-byte fixed part) accepted; HAProxy itself rejects larger
/// ones in practice.
pub const MAX_V2_PAYLOAD: usize = 4096;

/// Longest complete header: v2's 16 + [`MAX_V2_PAYLOAD`] (v1 is at most [`MAX_V1_LEN`] bytes).
pub const MAX_HEADER_LEN: usize = V2_FIXED_LEN + MAX_V2_PAYLOAD;

/// Longest v1 line, CRLF included (the spec's worst case, so a receiver can read it in one go).
pub const MAX_V1_LEN: usize = 107;

/// Most TLVs one v2 header may carry (and sub-TLVs one SSL TLV): real senders use a handful, and
/// the bound keeps what a hostile header makes us keep small.
pub const MAX_TLVS: usize = 128;

/// TLV kind: the ALPN the client negotiated with the balancer.
pub const PP2_TYPE_ALPN: u8 = 0x01;
/// TLV kind: the host name the client asked for (its TLS SNI), UTF-8.
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// TLV kind: a CRC32c of the whole header, verified by [`parse`].
pub const PP2_TYPE_CRC32C: u8 = 0x03;
/// TLV kind: padding, skipped by [`parse`].
pub const PP2_TYPE_NOOP: u8 = 0x04;
/// TLV kind: an opaque connection identifier (at most 128 bytes by the spec).
pub const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
/// TLV kind: what the client's TLS was (client flags, verify result, then sub-TLVs).
pub const PP2_TYPE_SSL: u8 = 0x20;

/// How every v1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";
/// How every v2 header starts: chosen so that it cannot begin an HTTP, TLS or SSH stream.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v2 signature, version/command, family/protocol and payload length.
const V2_FIXED_LEN: usize = 16;
/// Where the version/command byte sits.
const V2_VERSION_COMMAND_AT: usize = 12;
/// Where the family/protocol byte sits.
const V2_FAMILY_AT: usize = 13;
/// The version nibble of every v2 header (high half of byte 12).
const V2_VERSION: u8 = 0x20;
/// The command nibble of a LOCAL header (the balancer's own connection, e.g. a health check).
const V2_COMMAND_LOCAL: u8 = 0x0;
/// The command nibble of a PROXY header (a relayed client connection).
const V2_COMMAND_PROXY: u8 = 0x1;
/// The family/protocol byte of TCP over IPv4.
const V2_TCP4: u8 = 0x11;
/// The family/protocol byte of TCP over IPv6.
const V2_TCP6: u8 = 0x21;
/// The SSL TLV's fixed fields before its sub-TLVs: client (1 byte) and verify (4 bytes).
const SSL_FIXED_LEN: usize = 5;

/// The two ends of the client's connection as the balancer saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client.
    pub source: SocketAddr,
    /// The address the client connected to (the balancer's listener).
    pub destination: SocketAddr,
}

/// Which version of the protocol the header was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text line (`PROXY TCP4 …\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// What the header says the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Relayed for a client: the header's addresses are the client's (v1 is always this).
    Proxy,
    /// The balancer's own connection (a health check): no client addresses.
    Local,
}

/// One v2 type-length-value extension, kept as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    /// The type byte (`PP2_TYPE_*`).
    pub kind: u8,
    /// The value bytes.
    pub value: Vec<u8>,
}

/// A parsed PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which version it was written in.
    pub version: Version,
    /// PROXY or LOCAL.
    pub command: Command,
    /// None for LOCAL, v1 UNKNOWN, v2 AF_UNSPEC / UNIX / UDP (the connection's own addresses
    /// are then used by the caller). v2 TCP6 addresses are kept as sent, IPv4-mapped ones
    /// included (`IpAddr::to_canonical` turns those back into IPv4).
    pub addresses: Option<Addresses>,
    /// The v2 TLVs in the order sent, without NOOPs (empty for v1 and LOCAL).
    pub tlvs: Vec<Tlv>,
}

impl Header {
    /// The address the caller should take as the client's: `addresses.source` when the header
    /// carries TCP addresses.
    pub fn source(&self) -> Option<SocketAddr> {
        self.addresses.map(|addresses| addresses.source)
    }

    /// The v2 AUTHORITY TLV (0x02) as text when present and valid UTF-8 (the SNI the balancer
    /// saw).
    pub fn authority(&self) -> Option<&str> {
        self.tlv(PP2_TYPE_AUTHORITY)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The v2 UNIQUE_ID TLV (0x05).
    pub fn unique_id(&self) -> Option<&[u8]> {
        self.tlv(PP2_TYPE_UNIQUE_ID)
    }

    /// The value of the first TLV of `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|tlv| tlv.kind == kind)
            .map(|tlv| tlv.value.as_slice())
    }
}

/// The part of a v1 line that is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Part {
    /// Not five fields separated by single spaces.
    Fields,
    /// Neither `TCP4`, `TCP6` nor `UNKNOWN`.
    Protocol,
    /// The source address is not an address of the protocol's family.
    SourceAddress,
    /// The destination address is not an address of the protocol's family.
    DestinationAddress,
    /// The source port is not a decimal 0-65535 without sign or leading zero.
    SourcePort,
    /// The destination port is not a decimal 0-65535 without sign or leading zero.
    DestinationPort,
}

impl fmt::Display for V1Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            V1Part::Fields => "fields (five, separated by single spaces)",
            V1Part::Protocol => "protocol (TCP4, TCP6 or UNKNOWN)",
            V1Part::SourceAddress => "source address",
            V1Part::DestinationAddress => "destination address",
            V1Part::SourcePort => "source port",
            V1Part::DestinationPort => "destination port",
        })
    }
}

/// Why the bytes before a stream are not an acceptable PROXY header (logged as the reason the
/// connection was closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The stream starts with neither `PROXY ` nor the v2 signature.
    #[error("not a PROXY protocol header (neither \"PROXY \" nor the v2 signature)")]
    NotProxyProtocol,
    /// A v1 line with a wrong part.
    #[error("malformed PROXY v1 line: bad {0}")]
    V1Malformed(V1Part),
    /// A v1 line with a CR not followed by LF, or an LF without CR.
    #[error("malformed PROXY v1 line: it must end in CRLF and hold no other CR or LF")]
    V1LineEnd,
    /// No CRLF within the longest a v1 line may be.
    #[error("PROXY v1 line longer than {MAX_V1_LEN} bytes (no CRLF)")]
    V1TooLong,
    /// The v2 version nibble is not 2.
    #[error("PROXY v2 header with version {0} (only 2)")]
    V2BadVersion(u8),
    /// The v2 command nibble is neither LOCAL (0) nor PROXY (1).
    #[error("PROXY v2 header with command {0} (only 0 LOCAL or 1 PROXY)")]
    V2BadCommand(u8),
    /// The v2 family/protocol byte is not one the spec defines.
    #[error("PROXY v2 header with unsupported family/protocol 0x{0:02x}")]
    V2BadFamily(u8),
    /// The v2 payload cannot hold the addresses of its family.
    #[error(
        "PROXY v2 payload of {len} bytes is too short for {family} addresses ({needed} bytes)"
    )]
    V2AddressesTruncated {
        /// The family, as the spec names it.
        family: &'static str,
        /// The payload length the header declares.
        len: usize,
        /// How many bytes the family's addresses take.
        needed: usize,
    },
    /// The v2 payload length is over [`MAX_V2_PAYLOAD`].
    #[error("PROXY v2 payload of {0} bytes (at most {MAX_V2_PAYLOAD})")]
    V2PayloadTooLong(usize),
    /// A TLV's header or value runs past the payload.
    #[error("PROXY v2 TLV runs past the end of the header")]
    TlvTruncated,
    /// More TLVs than [`MAX_TLVS`].
    #[error("PROXY v2 header with more than {MAX_TLVS} TLVs")]
    TooManyTlvs,
    /// The SSL TLV (0x20) is not client, verify and well-framed sub-TLVs.
    #[error("malformed PROXY v2 SSL TLV: {0}")]
    SslTlvMalformed(&'static str),
    /// The CRC32C TLV (0x03) is not 4 bytes.
    #[error("PROXY v2 CRC32C TLV of {0} bytes (must be 4)")]
    Crc32cLength(usize),
    /// The header's CRC32c is not the one its CRC32C TLV carries.
    #[error("PROXY v2 CRC32C mismatch: header says {sent:08x}, bytes give {computed:08x}")]
    Crc32cMismatch {
        /// The value of the TLV.
        sent: u32,
        /// The CRC32c of the header as received.
        computed: u32,
    },
}

/// Parses the header at the start of `bytes`.
///
/// Ok(None): `bytes` is a prefix of a header that may still be valid — read more (and the
/// caller gives up at [`MAX_HEADER_LEN`] or its timeout).
/// Ok(Some((header, len))): the header and how many bytes it took (the stream's own bytes
/// start at `len`).
/// Err: not a PROXY header, or a malformed one. Bytes that cannot begin either header are
/// refused on the first one that differs, and v2's fixed fields as soon as they arrive, so a
/// client speaking HTTP or TLS straight to the port is not left waiting for a timeout.
pub fn parse(bytes: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    if begins_like(bytes, V2_SIGNATURE) {
        if bytes.len() < V2_SIGNATURE.len() {
            return Ok(None);
        }
        parse_v2(bytes)
    } else if begins_like(bytes, V1_PREFIX) {
        if bytes.len() < V1_PREFIX.len() {
            return Ok(None);
        }
        parse_v1(bytes)
    } else {
        Err(ProxyHeaderError::NotProxyProtocol)
    }
}

/// A v2 PROXY header for a connection from `addresses.source` to `addresses.destination` (TCP
/// over IPv4, or IPv6 when either is IPv6, the IPv4 one mapped to `::ffff:a.b.c.d`), or a LOCAL
/// header when `None`. No TLVs. IPv6 flow information and scope ids are not carried.
pub fn encode_v2(addresses: Option<&Addresses>) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LEN + Family::Tcp6.address_len());
    out.extend_from_slice(V2_SIGNATURE);
    let Some(addresses) = addresses else {
        // AF_UNSPEC, as the spec asks of LOCAL headers.
        out.extend_from_slice(&[V2_VERSION | V2_COMMAND_LOCAL, 0x00, 0, 0]);
        return out;
    };
    out.push(V2_VERSION | V2_COMMAND_PROXY);
    match (addresses.source, addresses.destination) {
        (SocketAddr::V4(source), SocketAddr::V4(destination)) => {
            out.push(V2_TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&source.ip().octets());
            out.extend_from_slice(&destination.ip().octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
        (source, destination) => {
            let (source, destination) = (as_v6(source), as_v6(destination));
            out.push(V2_TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&source.ip().octets());
            out.extend_from_slice(&destination.ip().octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&destination.port().to_be_bytes());
        }
    }
    out
}

/// `addr` as IPv6, an IPv4 address mapped (one header family holds both ends).
fn as_v6(addr: SocketAddr) -> SocketAddrV6 {
    match addr {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
        SocketAddr::V6(v6) => v6,
    }
}

/// Whether `bytes` and `start` agree on their common length (`bytes` may still become a header
/// beginning with `start`, or already does).
fn begins_like(bytes: &[u8], start: &[u8]) -> bool {
    let common = bytes.len().min(start.len());
    bytes.get(..common) == start.get(..common)
}

/// A v1 line; `bytes` starts with [`V1_PREFIX`].
fn parse_v1(bytes: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    let Some(cr_at) = v1_line_end(bytes)? else {
        return Ok(None);
    };
    let line = bytes.get(V1_PREFIX.len()..cr_at).unwrap_or_default();
    let header = Header {
        version: Version::V1,
        command: Command::Proxy,
        addresses: v1_addresses(line)?,
        tlvs: Vec::new(),
    };
    Ok(Some((header, cr_at + 2)))
}

/// Where the v1 line's CR is, once its CRLF has arrived; an error for a lone CR or LF or when
/// no CRLF fits in [`MAX_V1_LEN`].
fn v1_line_end(bytes: &[u8]) -> Result<Option<usize>, ProxyHeaderError> {
    let window = bytes.get(..MAX_V1_LEN).unwrap_or(bytes);
    let Some(at) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if bytes.len() >= MAX_V1_LEN {
            Err(ProxyHeaderError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    if window.get(at) == Some(&b'\n') {
        return Err(ProxyHeaderError::V1LineEnd);
    }
    if at + 2 > MAX_V1_LEN {
        return Err(ProxyHeaderError::V1TooLong);
    }
    match bytes.get(at + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some(at)),
        Some(_) => Err(ProxyHeaderError::V1LineEnd),
    }
}

/// The addresses of a v1 line between `PROXY ` and CRLF (None for UNKNOWN, whose rest the spec
/// says to ignore).
fn v1_addresses(line: &[u8]) -> Result<Option<Addresses>, ProxyHeaderError> {
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return Ok(None);
    }
    let malformed = ProxyHeaderError::V1Malformed;
    // At most MAX_V1_LEN fields: the line is that short.
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    if fields.iter().any(|field| field.is_empty()) {
        return Err(malformed(V1Part::Fields));
    }
    let v6 = match fields.first().copied() {
        Some(b"TCP4") => false,
        Some(b"TCP6") => true,
        _ => return Err(malformed(V1Part::Protocol)),
    };
    let &[_, source, destination, source_port, destination_port] = fields.as_slice() else {
        return Err(malformed(V1Part::Fields));
    };
    let source_ip = v1_ip(source, v6).ok_or(malformed(V1Part::SourceAddress))?;
    let destination_ip = v1_ip(destination, v6).ok_or(malformed(V1Part::DestinationAddress))?;
    let source_port = v1_port(source_port).ok_or(malformed(V1Part::SourcePort))?;
    let destination_port = v1_port(destination_port).ok_or(malformed(V1Part::DestinationPort))?;
    Ok(Some(Addresses {
        source: SocketAddr::new(source_ip, source_port),
        destination: SocketAddr::new(destination_ip, destination_port),
    }))
}

/// An address of the line's family as std reads it (so `1.2.3.4` under TCP6 is refused).
fn v1_ip(text: &[u8], v6: bool) -> Option<IpAddr> {
    let text = std::str::from_utf8(text).ok()?;
    if v6 {
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// A port as the spec writes it: decimal digits only, no leading zero but for `0` itself.
fn v1_port(text: &[u8]) -> Option<u16> {
    let digits_only = !text.is_empty() && text.len() <= 5 && text.iter().all(u8::is_ascii_digit);
    let leading_zero = text.len() > 1 && text.first() == Some(&b'0');
    if !digits_only || leading_zero {
        return None;
    }
    let value = text
        .iter()
        .fold(0u32, |value, &digit| value * 10 + u32::from(digit - b'0'));
    u16::try_from(value).ok()
}

/// The v2 address families (with their transport protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// AF_UNSPEC: no addresses.
    Unspec,
    /// TCP over IPv4.
    Tcp4,
    /// UDP over IPv4.
    Udp4,
    /// TCP over IPv6.
    Tcp6,
    /// UDP over IPv6.
    Udp6,
    /// AF_UNIX, stream or datagram.
    Unix,
}

impl Family {
    /// The family of a family/protocol byte.
    fn from_byte(byte: u8) -> Result<Family, ProxyHeaderError> {
        match byte {
            0x00 => Ok(Family::Unspec),
            V2_TCP4 => Ok(Family::Tcp4),
            0x12 => Ok(Family::Udp4),
            V2_TCP6 => Ok(Family::Tcp6),
            0x22 => Ok(Family::Udp6),
            0x31 | 0x32 => Ok(Family::Unix),
            other => Err(ProxyHeaderError::V2BadFamily(other)),
        }
    }

    /// How many payload bytes the family's addresses take.
    fn address_len(self) -> usize {
        match self {
            Family::Unspec => 0,
            Family::Tcp4 | Family::Udp4 => 12,
            Family::Tcp6 | Family::Udp6 => 36,
            Family::Unix => 216,
        }
    }

    /// The family as the spec names it.
    fn name(self) -> &'static str {
        match self {
            Family::Unspec => "AF_UNSPEC",
            Family::Tcp4 => "TCP over IPv4",
            Family::Udp4 => "UDP over IPv4",
            Family::Tcp6 => "TCP over IPv6",
            Family::Udp6 => "UDP over IPv6",
            Family::Unix => "AF_UNIX",
        }
    }

    /// The error for a payload of `len` bytes too short for the family's addresses.
    fn too_short(self, len: usize) -> ProxyHeaderError {
        ProxyHeaderError::V2AddressesTruncated {
            family: self.name(),
            len,
            needed: self.address_len(),
        }
    }
}

/// A v2 header; `bytes` starts with [`V2_SIGNATURE`]. Each fixed field is judged as soon as it
/// has arrived, and the declared length before the payload does.
fn parse_v2(bytes: &[u8]) -> Result<Option<(Header, usize)>, ProxyHeaderError> {
    let command = bytes
        .get(V2_VERSION_COMMAND_AT)
        .map(|&byte| v2_command(byte))
        .transpose()?;
    let family = bytes
        .get(V2_FAMILY_AT)
        .map(|&byte| Family::from_byte(byte))
        .transpose()?;
    let (Some(command), Some(family), Some(&[high, low])) =
        (command, family, bytes.get(V2_FAMILY_AT + 1..V2_FIXED_LEN))
    else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([high, low]));
    if len > MAX_V2_PAYLOAD {
        return Err(ProxyHeaderError::V2PayloadTooLong(len));
    }
    if command == Command::Proxy && len < family.address_len() {
        return Err(family.too_short(len));
    }
    let Some(whole) = bytes.get(..V2_FIXED_LEN + len) else {
        return Ok(None);
    };
    let header = match command {
        // The spec says to discard a LOCAL header's block, family included.
        Command::Local => Header {
            version: Version::V2,
            command,
            addresses: None,
            tlvs: Vec::new(),
        },
        Command::Proxy => v2_proxy(whole, family)?,
    };
    Ok(Some((header, whole.len())))
}

/// The command of a version/command byte, which must say version 2.
fn v2_command(byte: u8) -> Result<Command, ProxyHeaderError> {
    if byte & 0xf0 != V2_VERSION {
        return Err(ProxyHeaderError::V2BadVersion(byte >> 4));
    }
    match byte & 0x0f {
        V2_COMMAND_LOCAL => Ok(Command::Local),
        V2_COMMAND_PROXY => Ok(Command::Proxy),
        other => Err(ProxyHeaderError::V2BadCommand(other)),
    }
}

/// A complete v2 PROXY header (`whole`: fixed part and payload) of `family`.
fn v2_proxy(whole: &[u8], family: Family) -> Result<Header, ProxyHeaderError> {
    let payload = whole.get(V2_FIXED_LEN..).unwrap_or_default();
    let addresses = match family {
        Family::Tcp4 => Some(v2_tcp4(payload).ok_or(family.too_short(payload.len()))?),
        Family::Tcp6 => Some(v2_tcp6(payload).ok_or(family.too_short(payload.len()))?),
        // UDP and UNIX are not what wsplice relays, and AF_UNSPEC says nothing: the caller
        // keeps the connection's own addresses.
        Family::Unspec | Family::Udp4 | Family::Udp6 | Family::Unix => None,
    };
    let tlvs = v2_tlvs(whole, V2_FIXED_LEN + family.address_len())?;
    Ok(Header {
        version: Version::V2,
        command: Command::Proxy,
        addresses,
        tlvs,
    })
}

/// `N` bytes of `bytes` from `at`, if there are.
fn array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The big-endian u16 at `at`.
fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    array(bytes, at).map(u16::from_be_bytes)
}

/// TCP4 addresses: source and destination IPv4, then source and destination ports.
fn v2_tcp4(block: &[u8]) -> Option<Addresses> {
    let source = Ipv4Addr::from(array::<4>(block, 0)?);
    let destination = Ipv4Addr::from(array::<4>(block, 4)?);
    Some(Addresses {
        source: SocketAddr::V4(SocketAddrV4::new(source, be_u16(block, 8)?)),
        destination: SocketAddr::V4(SocketAddrV4::new(destination, be_u16(block, 10)?)),
    })
}

/// TCP6 addresses: source and destination IPv6, then source and destination ports.
fn v2_tcp6(block: &[u8]) -> Option<Addresses> {
    let source = Ipv6Addr::from(array::<16>(block, 0)?);
    let destination = Ipv6Addr::from(array::<16>(block, 16)?);
    Some(Addresses {
        source: SocketAddr::V6(SocketAddrV6::new(source, be_u16(block, 32)?, 0, 0)),
        destination: SocketAddr::V6(SocketAddrV6::new(destination, be_u16(block, 34)?, 0, 0)),
    })
}

/// The TLVs of a complete header (`whole`) from `start` to its end: NOOPs dropped, SSL checked,
/// CRC32C verified against `whole`.
fn v2_tlvs(whole: &[u8], start: usize) -> Result<Vec<Tlv>, ProxyHeaderError> {
    let mut tlvs = Vec::new();
    for (count, raw) in RawTlvs::new(whole, start).enumerate() {
        if count == MAX_TLVS {
            return Err(ProxyHeaderError::TooManyTlvs);
        }
        let raw = raw.map_err(|Truncated| ProxyHeaderError::TlvTruncated)?;
        match raw.kind {
            PP2_TYPE_NOOP => continue,
            PP2_TYPE_CRC32C => verify_crc32c(whole, &raw)?,
            PP2_TYPE_SSL => check_ssl(raw.value)?,
            _ => {}
        }
        tlvs.push(Tlv {
            kind: raw.kind,
            value: raw.value.to_vec(),
        });
    }
    Ok(tlvs)
}

/// The SSL TLV's value: client flags and verify result, then sub-TLVs framed like TLVs (their
/// contents are the balancer's business; only their framing is checked).
fn check_ssl(value: &[u8]) -> Result<(), ProxyHeaderError> {
    let malformed = ProxyHeaderError::SslTlvMalformed;
    if value.len() < SSL_FIXED_LEN {
        return Err(malformed(
            "shorter than its client and verify fields (5 bytes)",
        ));
    }
    for (count, sub) in RawTlvs::new(value, SSL_FIXED_LEN).enumerate() {
        if count == MAX_TLVS {
            return Err(malformed("more than 128 sub-TLVs"));
        }
        sub.map_err(|Truncated| malformed("a sub-TLV runs past its end"))?;
    }
    Ok(())
}

/// The CRC32C TLV `raw` of `whole`: the CRC32c of `whole` with the TLV's value zeroed.
fn verify_crc32c(whole: &[u8], raw: &RawTlv<'_>) -> Result<(), ProxyHeaderError> {
    let sent: [u8; 4] = raw
        .value
        .try_into()
        .map_err(|_| ProxyHeaderError::Crc32cLength(raw.value.len()))?;
    let sent = u32::from_be_bytes(sent);
    let before = whole.get(..raw.value_at).unwrap_or_default();
    let after = whole.get(raw.value_at + 4..).unwrap_or_default();
    let computed = Crc32c::new()
        .update(before)
        .update(&[0; 4])
        .update(after)
        .finish();
    if computed != sent {
        return Err(ProxyHeaderError::Crc32cMismatch { sent, computed });
    }
    Ok(())
}

/// A TLV's framing overran its container.
#[derive(Debug)]
struct Truncated;

/// One TLV as framed in its container.
struct RawTlv<'a> {
    /// The type byte.
    kind: u8,
    /// Where the value starts in the container (the CRC check zeroes it there).
    value_at: usize,
    /// The value.
    value: &'a [u8],
}

/// The TLVs of `bytes` from `at` to its end: type (1), big-endian length (2), value. Stops after
/// the first truncated one, since nothing after it can be framed.
struct RawTlvs<'a> {
    /// The container (a header or an SSL TLV's value).
    bytes: &'a [u8],
    /// Where the next TLV starts.
    at: usize,
}

impl<'a> RawTlvs<'a> {
    /// The TLVs of `bytes` from `at`.
    fn new(bytes: &'a [u8], at: usize) -> RawTlvs<'a> {
        RawTlvs { bytes, at }
    }

    /// The TLV at `self.at`.
    fn read(&self) -> Result<RawTlv<'a>, Truncated> {
        let Some(&[kind, high, low]) = self.bytes.get(self.at..self.at + 3) else {
            return Err(Truncated);
        };
        let value_at = self.at + 3;
        let len = usize::from(u16::from_be_bytes([high, low]));
        let value = self.bytes.get(value_at..value_at + len).ok_or(Truncated)?;
        Ok(RawTlv {
            kind,
            value_at,
            value,
        })
    }
}

impl<'a> Iterator for RawTlvs<'a> {
    type Item = Result<RawTlv<'a>, Truncated>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.bytes.len() {
            return None;
        }
        let item = self.read();
        self.at = match &item {
            Ok(tlv) => tlv.value_at + tlv.value.len(),
            Err(Truncated) => self.bytes.len(),
        };
        Some(item)
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), fed piece by piece so the header's
/// CRC field can be read as zeros without copying the header.
struct Crc32c {
    /// The running register (inverted, as the algorithm starts and ends).
    state: u32,
}

/// The byte-at-a-time table of CRC-32C, built at compile time.
const CRC32C_TABLE: [u32; 256] = crc32c_table();

/// Each byte's CRC-32C remainder.
const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
}

impl Crc32c {
    /// The CRC of nothing yet.
    fn new() -> Crc32c {
        Crc32c { state: !0 }
    }

    /// Feeds `bytes`.
    fn update(mut self, bytes: &[u8]) -> Crc32c {
        for &byte in bytes {
            let index = usize::from((self.state as u8) ^ byte);
            self.state = (self.state >> 8) ^ CRC32C_TABLE[index];
        }
        self
    }

    /// The CRC of everything fed.
    fn finish(self) -> u32 {
        !self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parsed = Result<Option<(Header, usize)>, ProxyHeaderError>;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn addresses(source: &str, destination: &str) -> Addresses {
        Addresses {
            source: addr(source),
            destination: addr(destination),
        }
    }

    /// A v2 header with these fixed fields and payload.
    fn v2(version_command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    /// A TCP4 address block.
    fn tcp4_block(source: [u8; 4], destination: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut out = source.to_vec();
        out.extend_from_slice(&destination);
        out.extend_from_slice(&sport.to_be_bytes());
        out.extend_from_slice(&dport.to_be_bytes());
        out
    }

    /// `header` with a CRC32C TLV appended and filled in, as HAProxy's `crc32c` option does.
    fn with_crc32c(header: &[u8]) -> Vec<u8> {
        let payload = header.get(V2_FIXED_LEN..).unwrap();
        let mut payload = payload.to_vec();
        payload.extend_from_slice(&tlv(PP2_TYPE_CRC32C, &[0; 4]));
        let mut out = v2(header[12], header[13], &payload);
        let crc = Crc32c::new().update(&out).finish();
        let at = out.len() - 4;
        out[at..].copy_from_slice(&crc.to_be_bytes());
        out
    }

    fn v1(line: &str) -> Parsed {
        parse(line.as_bytes())
    }

    fn proxy_v1(source: &str, destination: &str) -> Header {
        Header {
            version: Version::V1,
            command: Command::Proxy,
            addresses: Some(addresses(source, destination)),
            tlvs: Vec::new(),
        }
    }

    #[test]
    fn v1_tcp4_parses_with_its_exact_length() {
        let line = "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n";
        assert_eq!(
            v1(line),
            Ok(Some((
                proxy_v1("192.0.2.1:56324", "198.51.100.7:443"),
                line.len()
            )))
        );
    }

    #[test]
    fn v1_tcp6_parses_with_its_exact_length() {
        let line = "PROXY TCP6 2001:db8::1 ::ffff:192.0.2.9 0 65535\r\n";
        let (header, len) = v1(line).unwrap().unwrap();
        assert_eq!(
            header,
            proxy_v1("[2001:db8::1]:0", "[::ffff:192.0.2.9]:65535")
        );
        assert_eq!(len, line.len());
        assert_eq!(header.source(), Some(addr("[2001:db8::1]:0")));
    }

    #[test]
    fn v1_unknown_has_no_addresses() {
        for line in [
            "PROXY UNKNOWN\r\n",
            "PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 65535 whatever\r\n",
        ] {
            let (header, len) = v1(line).unwrap().unwrap();
            assert_eq!(len, line.len(), "{line:?}");
            assert_eq!(header.addresses, None);
            assert_eq!(header.source(), None);
            assert_eq!(header.command, Command::Proxy);
        }
    }

    #[test]
    fn v1_longest_line_is_accepted_and_one_more_byte_is_not() {
        let longest = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1_LEN - 16));
        assert_eq!(longest.len(), MAX_V1_LEN);
        assert_eq!(v1(&longest).unwrap().unwrap().1, MAX_V1_LEN);
        let over = format!("PROXY UNKNOWN {}\r\n", "x".repeat(MAX_V1_LEN - 15));
        assert_eq!(v1(&over), Err(ProxyHeaderError::V1TooLong));
        // Its CR already is at the limit: refused without waiting for the LF.
        assert_eq!(v1(&over[..MAX_V1_LEN]), Err(ProxyHeaderError::V1TooLong));
    }

    #[test]
    fn v1_too_long_without_crlf_is_refused() {
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        assert_eq!(v1(&long[..MAX_V1_LEN - 1]), Ok(None));
        assert_eq!(v1(&long[..MAX_V1_LEN]), Err(ProxyHeaderError::V1TooLong));
        assert_eq!(v1(&long), Err(ProxyHeaderError::V1TooLong));
    }

    #[test]
    fn the_streams_own_bytes_are_not_consumed() {
        let line = "PROXY TCP4 10.0.0.1 10.0.0.2 1000 80\r\n";
        let stream = format!("{line}GET / HTTP/1.1\r\n");
        let (_, len) = v1(&stream).unwrap().unwrap();
        assert_eq!(&stream.as_bytes()[len..], b"GET / HTTP/1.1\r\n");

        let mut binary = encode_v2(Some(&addresses("10.0.0.1:1000", "10.0.0.2:80")));
        let header_len = binary.len();
        binary.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&binary).unwrap().unwrap().1, header_len);
    }

    #[test]
    fn every_prefix_of_a_v1_header_reads_more() {
        for line in [
            "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n",
            "PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
            "PROXY UNKNOWN\r\n",
        ] {
            for k in 0..line.len() {
                assert_eq!(v1(&line[..k]), Ok(None), "{:?}", &line[..k]);
            }
        }
    }

    #[test]
    fn every_prefix_of_a_v2_header_reads_more() {
        let mut payload = tcp4_block([192, 0, 2, 1], [198, 51, 100, 7], 56324, 443);
        payload.extend_from_slice(&tlv(PP2_TYPE_AUTHORITY, b"example.com"));
        payload.extend_from_slice(&tlv(PP2_TYPE_NOOP, &[0; 3]));
        let header = with_crc32c(&v2(0x21, V2_TCP4, &payload));
        assert!(parse(&header).unwrap().is_some());
        for k in 0..header.len() {
            assert_eq!(parse(&header[..k]), Ok(None), "prefix of {k} bytes");
        }
    }

    #[test]
    fn non_proxy_input_fails_at_once() {
        let refused: [&[u8]; 7] = [
            b"G",
            b"GET / HTTP/1.1\r\n",
            &[0x16],
            &[0x16, 0x03, 0x01],
            b"PROXY\t",
            b"proxy ",
            b"\r\n\r\n\0\r\nQUIX",
        ];
        for bytes in refused {
            assert_eq!(
                parse(bytes),
                Err(ProxyHeaderError::NotProxyProtocol),
                "{bytes:?}"
            );
        }
        // Still a prefix of one of the two: read more.
        for waiting in [&b""[..], b"PRO", b"\r\n", b"\r\n\r\n\0\r\nQUI"] {
            assert_eq!(parse(waiting), Ok(None), "{waiting:?}");
        }
    }

    #[test]
    fn malformed_v1_lines_are_refused() {
        use ProxyHeaderError::{V1LineEnd, V1Malformed};
        let cases = [
            (
                "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
                V1Malformed(V1Part::Fields),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
                V1Malformed(V1Part::Fields),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
                V1Malformed(V1Part::Fields),
            ),
            (
                "PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
                V1Malformed(V1Part::Fields),
            ),
            (
                "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
                V1Malformed(V1Part::Protocol),
            ),
            ("PROXY UNKNOWNX\r\n", V1Malformed(V1Part::Protocol)),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
                V1Malformed(V1Part::SourcePort),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n",
                V1Malformed(V1Part::DestinationPort),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
                V1Malformed(V1Part::SourcePort),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
                V1Malformed(V1Part::SourcePort),
            ),
            (
                "PROXY TCP4 1.2.3.4 5.6.7.8 1 99999999\r\n",
                V1Malformed(V1Part::DestinationPort),
            ),
            (
                "PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
                V1Malformed(V1Part::SourceAddress),
            ),
            (
                "PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
                V1Malformed(V1Part::DestinationAddress),
            ),
            (
                "PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
                V1Malformed(V1Part::SourceAddress),
            ),
            (
                "PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
                V1Malformed(V1Part::SourceAddress),
            ),
            (
                "PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
                V1Malformed(V1Part::SourceAddress),
            ),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n", V1LineEnd),
            ("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1LineEnd),
            ("PROXY UNKNOWN\n\r\n", V1LineEnd),
        ];
        for (line, error) in cases {
            assert_eq!(v1(line), Err(error.clone()), "{line:?}");
            assert!(!error.to_string().is_empty());
        }
        // Non-UTF-8 in an address field is a bad address, not a panic.
        let mut bytes = b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n".to_vec();
        assert_eq!(parse(&bytes), Err(V1Malformed(V1Part::SourceAddress)));
        bytes.truncate(20);
        assert_eq!(parse(&bytes), Ok(None));
    }

    #[test]
    fn v2_tcp4_as_haproxy_sends_it_with_tlvs() {
        let mut ssl = vec![0x07, 0, 0, 0, 0]; // client: SSL, cert on connection and session
        ssl.extend_from_slice(&tlv(0x21, b"TLSv1.3")); // SSL_VERSION
        ssl.extend_from_slice(&tlv(0x22, b"client.example")); // SSL_CN
        ssl.extend_from_slice(&tlv(0x23, b"TLS_AES_128_GCM_SHA256")); // SSL_CIPHER
        let mut payload = tcp4_block([203, 0, 113, 5], [10, 0, 0, 1], 51000, 443);
        payload.extend_from_slice(&tlv(PP2_TYPE_ALPN, b"http/1.1"));
        payload.extend_from_slice(&tlv(PP2_TYPE_AUTHORITY, b"ws.example.com"));
        payload.extend_from_slice(&tlv(PP2_TYPE_UNIQUE_ID, &[0xab; 16]));
        payload.extend_from_slice(&tlv(PP2_TYPE_SSL, &ssl));
        let header = v2(0x21, V2_TCP4, &payload);

        let (parsed, len) = parse(&header).unwrap().unwrap();
        assert_eq!(len, header.len());
        assert_eq!(parsed.version, Version::V2);
        assert_eq!(parsed.command, Command::Proxy);
        assert_eq!(
            parsed.addresses,
            Some(addresses("203.0.113.5:51000", "10.0.0.1:443"))
        );
        assert_eq!(parsed.source(), Some(addr("203.0.113.5:51000")));
        assert_eq!(parsed.authority(), Some("ws.example.com"));
        assert_eq!(parsed.unique_id(), Some(&[0xab; 16][..]));
        assert_eq!(parsed.tlv(PP2_TYPE_SSL), Some(ssl.as_slice()));
        let kinds: Vec<u8> = parsed.tlvs.iter().map(|tlv| tlv.kind).collect();
        assert_eq!(
            kinds,
            [
                PP2_TYPE_ALPN,
                PP2_TYPE_AUTHORITY,
                PP2_TYPE_UNIQUE_ID,
                PP2_TYPE_SSL
            ]
        );
    }

    #[test]
    fn authority_that_is_not_utf8_is_absent() {
        let mut payload = tcp4_block([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        payload.extend_from_slice(&tlv(PP2_TYPE_AUTHORITY, b"\xff\xfe"));
        let (parsed, _) = parse(&v2(0x21, V2_TCP4, &payload)).unwrap().unwrap();
        assert_eq!(parsed.authority(), None);
        assert_eq!(parsed.unique_id(), None);
    }

    #[test]
    fn v2_tcp6_parses() {
        let mut payload = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)
            .octets()
            .to_vec();
        payload.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        payload.extend_from_slice(&[0x12, 0x34, 0x01, 0xbb]);
        let (parsed, len) = parse(&v2(0x21, V2_TCP6, &payload)).unwrap().unwrap();
        assert_eq!(len, 16 + 36);
        assert_eq!(
            parsed.addresses,
            Some(addresses("[2001:db8::1]:4660", "[::1]:443"))
        );
        assert!(parsed.tlvs.is_empty());
    }

    #[test]
    fn v2_local_has_no_addresses_and_skips_its_payload() {
        let (parsed, len) = parse(&encode_v2(None)).unwrap().unwrap();
        assert_eq!(
            (parsed.command, parsed.addresses, len),
            (Command::Local, None, 16)
        );
        // A LOCAL block is discarded whole, whatever it holds.
        let mut stream = v2(0x20, V2_TCP4, &[0xee; 7]);
        stream.extend_from_slice(b"rest");
        let (parsed, len) = parse(&stream).unwrap().unwrap();
        assert_eq!(parsed.command, Command::Local);
        assert_eq!(parsed.addresses, None);
        assert!(parsed.tlvs.is_empty());
        assert_eq!(&stream[len..], b"rest");
    }

    #[test]
    fn v2_unspec_udp_and_unix_have_no_addresses() {
        let cases: [(u8, usize); 5] = [(0x00, 0), (0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)];
        for (family, address_len) in cases {
            let mut payload = vec![0x5a; address_len];
            payload.extend_from_slice(&tlv(PP2_TYPE_UNIQUE_ID, b"id"));
            let header = v2(0x21, family, &payload);
            let (parsed, len) = parse(&header).unwrap().unwrap();
            assert_eq!(len, header.len());
            assert_eq!(parsed.addresses, None, "family {family:#x}");
            assert_eq!(parsed.unique_id(), Some(&b"id"[..]));
        }
    }

    #[test]
    fn v2_bad_fixed_fields_fail_on_their_byte() {
        let cases = [
            (0x11, V2_TCP4, ProxyHeaderError::V2BadVersion(1)),
            (0x31, V2_TCP4, ProxyHeaderError::V2BadVersion(3)),
            (0x22, V2_TCP4, ProxyHeaderError::V2BadCommand(2)),
            (0x2f, V2_TCP4, ProxyHeaderError::V2BadCommand(15)),
            (0x21, 0x13, ProxyHeaderError::V2BadFamily(0x13)),
            (0x21, 0x41, ProxyHeaderError::V2BadFamily(0x41)),
            (0x21, 0x01, ProxyHeaderError::V2BadFamily(0x01)),
        ];
        for (version_command, family, error) in cases {
            let header = v2(version_command, family, &[0; 12]);
            let decided_at = if matches!(error, ProxyHeaderError::V2BadFamily(_)) {
                14
            } else {
                13
            };
            assert_eq!(parse(&header[..decided_at]), Err(error.clone()));
            assert_eq!(parse(&header), Err(error));
        }
    }

    #[test]
    fn v2_payload_over_the_max_fails_on_the_fixed_part() {
        let mut fixed = V2_SIGNATURE.to_vec();
        fixed.extend_from_slice(&[0x21, V2_TCP4]);
        fixed.extend_from_slice(&u16::try_from(MAX_V2_PAYLOAD + 1).unwrap().to_be_bytes());
        assert_eq!(
            parse(&fixed),
            Err(ProxyHeaderError::V2PayloadTooLong(MAX_V2_PAYLOAD + 1))
        );
        // The largest allowed one waits for its payload, then parses.
        let header = v2(0x21, 0x00, &tlv(PP2_TYPE_NOOP, &[0; MAX_V2_PAYLOAD - 3]));
        assert_eq!(header.len(), MAX_HEADER_LEN);
        assert_eq!(parse(&header[..MAX_HEADER_LEN - 1]), Ok(None));
        assert_eq!(parse(&header).unwrap().unwrap().1, MAX_HEADER_LEN);
    }

    #[test]
    fn v2_payload_too_short_for_its_family_fails_on_the_fixed_part() {
        for (family, short) in [(V2_TCP4, 11), (V2_TCP6, 35), (0x31, 215), (0x12, 0)] {
            let header = v2(0x21, family, &vec![0; short]);
            let error = parse(&header[..16]).unwrap_err();
            assert!(
                matches!(error, ProxyHeaderError::V2AddressesTruncated { len, .. } if len == short),
                "{error:?}"
            );
        }
    }

    #[test]
    fn truncated_tlvs_are_refused() {
        let block = tcp4_block([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        let mut value_too_long = block.clone();
        value_too_long.extend_from_slice(&[PP2_TYPE_AUTHORITY, 0, 5, b'a', b'b']);
        let mut half_a_tlv = block.clone();
        half_a_tlv.extend_from_slice(&tlv(PP2_TYPE_NOOP, &[]));
        half_a_tlv.extend_from_slice(&[PP2_TYPE_AUTHORITY, 0]);
        for payload in [value_too_long, half_a_tlv] {
            assert_eq!(
                parse(&v2(0x21, V2_TCP4, &payload)),
                Err(ProxyHeaderError::TlvTruncated)
            );
        }
    }

    #[test]
    fn more_than_max_tlvs_are_refused() {
        let many = |count: usize| v2(0x21, 0x00, &tlv(PP2_TYPE_NOOP, &[]).repeat(count));
        assert!(parse(&many(MAX_TLVS)).unwrap().unwrap().0.tlvs.is_empty());
        assert_eq!(
            parse(&many(MAX_TLVS + 1)),
            Err(ProxyHeaderError::TooManyTlvs)
        );
    }

    #[test]
    fn malformed_ssl_tlvs_are_refused() {
        let mut bad_sub = vec![0x01, 0, 0, 0, 0];
        bad_sub.extend_from_slice(&[0x21, 0, 9, b'T', b'L', b'S']);
        let many_subs = [vec![0x01, 0, 0, 0, 0], tlv(0x21, &[]).repeat(MAX_TLVS + 1)].concat();
        for ssl in [vec![0x01, 0, 0, 0], bad_sub, many_subs] {
            let payload = tlv(PP2_TYPE_SSL, &ssl);
            let error = parse(&v2(0x21, 0x00, &payload)).unwrap_err();
            assert!(
                matches!(error, ProxyHeaderError::SslTlvMalformed(_)),
                "{error:?}"
            );
        }
        // Client and verify alone are fine.
        let payload = tlv(PP2_TYPE_SSL, &[0, 0, 0, 0, 0]);
        assert!(parse(&v2(0x21, 0x00, &payload)).unwrap().is_some());
    }

    #[test]
    fn crc32c_matches_the_known_vector() {
        assert_eq!(Crc32c::new().update(b"123456789").finish(), 0xE306_9283);
        // Fed in pieces, the same.
        let pieces = Crc32c::new().update(b"1234").update(b"").update(b"56789");
        assert_eq!(pieces.finish(), 0xE306_9283);
        assert_eq!(Crc32c::new().finish(), 0);
    }

    #[test]
    fn crc32c_tlv_is_verified() {
        let mut payload = tcp4_block([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        payload.extend_from_slice(&tlv(PP2_TYPE_AUTHORITY, b"a.example"));
        let good = with_crc32c(&v2(0x21, V2_TCP4, &payload));
        let (parsed, len) = parse(&good).unwrap().unwrap();
        assert_eq!(len, good.len());
        assert_eq!(parsed.authority(), Some("a.example"));
        assert!(parsed.tlv(PP2_TYPE_CRC32C).is_some());

        // One flipped address bit, or a wrong CRC, is caught.
        let mut flipped = good.clone();
        flipped[V2_FIXED_LEN] ^= 1;
        let mut wrong_crc = good.clone();
        *wrong_crc.last_mut().unwrap() ^= 0x80;
        for bad in [flipped, wrong_crc] {
            let error = parse(&bad).unwrap_err();
            assert!(
                matches!(error, ProxyHeaderError::Crc32cMismatch { .. }),
                "{error:?}"
            );
        }

        let short = v2(0x21, 0x00, &tlv(PP2_TYPE_CRC32C, &[0; 3]));
        assert_eq!(parse(&short), Err(ProxyHeaderError::Crc32cLength(3)));
    }

    #[test]
    fn noop_tlvs_are_skipped() {
        let mut payload = tlv(PP2_TYPE_NOOP, b"pad");
        payload.extend_from_slice(&tlv(PP2_TYPE_UNIQUE_ID, b"u"));
        payload.extend_from_slice(&tlv(PP2_TYPE_NOOP, b""));
        let (parsed, _) = parse(&v2(0x21, 0x00, &payload)).unwrap().unwrap();
        assert_eq!(
            parsed.tlvs,
            [Tlv {
                kind: PP2_TYPE_UNIQUE_ID,
                value: b"u".to_vec()
            }]
        );
    }

    #[test]
    fn encode_v2_parses_back() {
        let cases = [
            (
                addresses("192.0.2.1:56324", "198.51.100.7:443"),
                addresses("192.0.2.1:56324", "198.51.100.7:443"),
                28,
            ),
            (
                addresses("[2001:db8::1]:1", "[2001:db8::2]:65535"),
                addresses("[2001:db8::1]:1", "[2001:db8::2]:65535"),
                52,
            ),
            (
                addresses("192.0.2.1:80", "[2001:db8::2]:443"),
                addresses("[::ffff:192.0.2.1]:80", "[2001:db8::2]:443"),
                52,
            ),
            (
                addresses("[2001:db8::1]:0", "10.1.2.3:8080"),
                addresses("[2001:db8::1]:0", "[::ffff:10.1.2.3]:8080"),
                52,
            ),
        ];
        for (sent, seen, encoded_len) in cases {
            let bytes = encode_v2(Some(&sent));
            assert_eq!(bytes.len(), encoded_len);
            let (header, len) = parse(&bytes).unwrap().unwrap();
            assert_eq!(len, bytes.len());
            assert_eq!(header.version, Version::V2);
            assert_eq!(header.command, Command::Proxy);
            assert_eq!(header.addresses, Some(seen));
            assert!(header.tlvs.is_empty());
        }
        let local = encode_v2(None);
        assert_eq!(
            parse(&local),
            Ok(Some((
                Header {
                    version: Version::V2,
                    command: Command::Local,
                    addresses: None,
                    tlvs: Vec::new(),
                },
                16
            )))
        );
    }

    /// Arbitrary bytes, and mutations of real headers, never panic, and what they parse to is
    /// consistent.
    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut rich = tcp4_block([1, 2, 3, 4], [5, 6, 7, 8], 1, 2);
        rich.extend_from_slice(&tlv(PP2_TYPE_SSL, &[1, 0, 0, 0, 0, 0x21, 0, 1, b'x']));
        rich.extend_from_slice(&tlv(PP2_TYPE_AUTHORITY, b"h"));
        let seeds: [Vec<u8>; 4] = [
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            b"PROXY TCP6 ::1 ::2 1 2\r\n".to_vec(),
            with_crc32c(&v2(0x21, V2_TCP4, &rich)),
            encode_v2(None),
        ];
        for round in 0..5000 {
            let mut bytes = match round % 3 {
                0 => {
                    let len = (next() % 200) as usize;
                    (0..len).map(|_| next() as u8).collect()
                }
                _ => seeds[(next() % 4) as usize].clone(),
            };
            // A few mutations: flipped bytes, a cut, a random tail.
            for _ in 0..(next() % 4) {
                if !bytes.is_empty() {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            if next() % 4 == 0 {
                bytes.truncate((next() as usize) % (bytes.len() + 1));
            }
            for _ in 0..(next() % 8) {
                bytes.push(next() as u8);
            }
            match parse(&bytes) {
                Ok(Some((header, len))) => {
                    assert!(len <= bytes.len() && len <= MAX_HEADER_LEN, "{bytes:?}");
                    assert_eq!(parse(&bytes[..len]), Ok(Some((header, len))));
                }
                Ok(None) => assert!(bytes.len() < MAX_HEADER_LEN),
                Err(error) => assert!(!error.to_string().is_empty()),
            }
        }
    }
}
