//! nginx values turned into wsplice's: durations (`60s`, `1m`, `500ms`, a bare number of
//! seconds), sizes (`10m`, `64k`), OpenSSL cipher names into IANA ones, `listen` addresses.
//! Pure.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Longest duration a wsplice config takes.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// An nginx time value (`500ms`, `30s`, `5m`, `1h`, `1d`, `1w`, `1h 30m`, `90` seconds).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let seconds = |n: u64| Duration::from_secs(number.saturating_mul(n));
        total += match unit {
            "ms" => Duration::from_millis(number),
            "" | "s" => seconds(1),
            "m" => seconds(60),
            "h" => seconds(3600),
            "d" => seconds(86_400),
            "w" => seconds(7 * 86_400),
            "M" => seconds(30 * 86_400),
            "y" => seconds(365 * 86_400),
            _ => return None,
        };
    }
    Some(total)
}

/// A duration in wsplice's syntax, in the largest unit that keeps it exact (`"24h"`), or why
/// it cannot be written.
pub fn format_duration(duration: Duration) -> Result<String, String> {
    if duration > MAX_DURATION {
        return Err("wsplice durations are limited to 30 days".into());
    }
    let ms = duration.as_millis();
    Ok(if ms == 0 {
        "0s".to_owned()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    })
}

/// An nginx size (`10m`, `64k`, `1g`, bytes) in bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, multiplier) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 1 << 10),
        (i, 'm' | 'M') => (&text[..i], 1 << 20),
        (i, 'g' | 'G') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    number.parse::<u64>().ok()?.checked_mul(multiplier)
}

/// A size in wsplice's syntax (`"10MiB"`).
pub fn format_size(bytes: u64) -> String {
    if bytes != 0 && bytes.is_multiple_of(1 << 30) {
        format!("{}GiB", bytes >> 30)
    } else if bytes != 0 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes != 0 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

/// OpenSSL names of the suites rustls implements, with their IANA names.
const OPENSSL_SUITES: &[(&str, &str)] = &[
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    ("TLS_AES_256_GCM_SHA384", "TLS13_AES_256_GCM_SHA384"),
    ("TLS_AES_128_GCM_SHA256", "TLS13_AES_128_GCM_SHA256"),
    (
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS13_CHACHA20_POLY1305_SHA256",
    ),
];

/// The IANA name of an OpenSSL cipher name rustls implements (IANA names are taken as is).
pub fn iana_cipher(openssl: &str) -> Option<&'static str> {
    let upper = openssl.to_ascii_uppercase();
    OPENSSL_SUITES
        .iter()
        .find(|(name, iana)| *name == upper || *iana == upper)
        .map(|(_, iana)| *iana)
}

/// The TLS 1.3 suites, which nginx's `ssl_ciphers` does not restrict (OpenSSL's order).
pub const TLS13_SUITES: &[&str] = &[
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS13_AES_128_GCM_SHA256",
];

/// The address of a `listen` directive's first argument (`80`, `127.0.0.1:8080`, `*:80`,
/// `[::]:443`, `localhost:80`), or why it has none wsplice can bind.
pub fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    if text.starts_with("unix:") {
        return Err("wsplice listens on TCP addresses only".into());
    }
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    // `[::1]` or an address alone: port 80.
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 80));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("{port:?} is not a port"))?,
        ),
        None => (text, 80),
    };
    match host_ip(host) {
        Some(ip) => Ok(SocketAddr::new(ip, port)),
        None => Err(format!(
            "{host:?} is a host name; wsplice binds IP addresses (write the address)"
        )),
    }
}

/// `host` as an address: an IP literal, `*` (any IPv4) or `localhost` (127.0.0.1).
pub fn host_ip(host: &str) -> Option<IpAddr> {
    match host {
        "*" => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        "localhost" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        _ => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok(),
    }
}

/// `host[:port]` (port 80 when absent) as a socket address, when `host` is an address.
pub fn server_addr(text: &str) -> Result<SocketAddr, String> {
    if text.starts_with("unix:") {
        return Err("wsplice connects to upstreams over TCP only".into());
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.ends_with(']') => (
            host,
            port.parse::<u16>()
                .map_err(|_| format!("{port:?} is not a port"))?,
        ),
        _ => (text, 80),
    };
    match host_ip(host) {
        Some(ip) if host != "*" => Ok(SocketAddr::new(ip, port)),
        _ => Err(format!(
            "{host:?} is a host name: wsplice's upstream servers are IP:port addresses (resolve it and write the address)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let secs = Duration::from_secs;
        assert_eq!(parse_duration("60s"), Some(secs(60)));
        assert_eq!(parse_duration("86400"), Some(secs(86_400)));
        assert_eq!(parse_duration("1m"), Some(secs(60)));
        assert_eq!(parse_duration("1h 30m"), Some(secs(5400)));
        assert_eq!(parse_duration("1h30m"), Some(secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1d"), Some(secs(86_400)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(format_duration(secs(86_400)).unwrap(), "24h");
        assert_eq!(format_duration(secs(90)).unwrap(), "90s");
        assert_eq!(format_duration(secs(120)).unwrap(), "2m");
        assert_eq!(
            format_duration(Duration::from_millis(1500)).unwrap(),
            "1500ms"
        );
        assert!(format_duration(secs(365 * 86_400)).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10m"), Some(10 << 20));
        assert_eq!(parse_size("64k"), Some(64 << 10));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("big"), None);
        assert_eq!(format_size(10 << 20), "10MiB");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn ciphers() {
        assert_eq!(
            iana_cipher("ECDHE-RSA-AES128-GCM-SHA256"),
            Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")
        );
        assert_eq!(iana_cipher("DHE-RSA-AES128-GCM-SHA256"), None);
        assert_eq!(iana_cipher("HIGH"), None);
        for (_, iana) in OPENSSL_SUITES {
            assert!(crate::config::CIPHER_SUITES.contains(iana), "{iana}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(listen_addr("80").unwrap().to_string(), "0.0.0.0:80");
        assert_eq!(listen_addr("[::]:443").unwrap().to_string(), "[::]:443");
        assert_eq!(listen_addr("*:8080").unwrap().to_string(), "0.0.0.0:8080");
        assert_eq!(
            listen_addr("127.0.0.1").unwrap().to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(
            listen_addr("localhost:81").unwrap().to_string(),
            "127.0.0.1:81"
        );
        assert!(listen_addr("example.com:80").is_err());
        assert!(listen_addr("unix:/run/x.sock").is_err());
        assert_eq!(
            server_addr("localhost:3000").unwrap().to_string(),
            "127.0.0.1:3000"
        );
        assert_eq!(server_addr("10.0.0.1").unwrap().to_string(), "10.0.0.1:80");
        assert_eq!(server_addr("[::1]:9000").unwrap().to_string(), "[::1]:9000");
        assert!(server_addr("backend.internal:8080").is_err());
    }
}
