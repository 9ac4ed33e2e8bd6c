//! The request target, parsed into the one form routing and forwarding use (pure).
//!
//! Routing compares path prefixes, and the upstream resolves the path again its own way: if the
//! two could disagree, a client could reach `/admin` through a route for `/chat`
//! (`/chat/../admin`, `/chat/%2e%2e/admin`, `//admin`, backslashes). So the target is brought to
//! one normal form first (RFC 3986: percent-encoded unreserved characters decoded, dot segments
//! removed, repeated slashes merged) and that form is both matched and forwarded; whatever could
//! still be read two ways is refused with 400.

use std::fmt::Write as _;

/// Why a request target is refused (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not origin-form (`/path`) nor absolute-form (`http://host/path`).
    #[error("the request target is neither a path nor an absolute URI")]
    Form,
    /// An absolute-form target names another authority than the Host header.
    #[error("the absolute URI's authority differs from the Host header")]
    AuthorityMismatch,
    /// A backslash, or an encoded slash or backslash: servers disagree on what they mean.
    #[error("the path contains a backslash or an encoded slash")]
    AmbiguousSeparator,
    /// `%` not followed by two hex digits, or a byte that must be percent-encoded (`#`, bytes
    /// beyond ASCII).
    #[error("the path has a malformed percent-encoding or a byte that must be encoded")]
    BadEncoding,
    /// Dot segments would climb above the root.
    #[error("the path climbs above the root")]
    AboveRoot,
}

/// Normalises `raw` (the request line's target; `host` is the Host header's value) into
/// origin form: `/normal/path` plus `?query` as sent.
pub fn normalize(raw: &str, host: &str) -> Result<String, TargetError> {
    // A fragment is never part of a request target (RFC 9112 §3.2): an upstream that cuts the
    // path at `#` would see another path than the one routed (`/admin#x` is not under a
    // route for `/admin`, `/admin` is).
    if raw.contains('#') {
        return Err(TargetError::BadEncoding);
    }
    let origin = origin_form(raw, host)?;
    let (path, query) = match origin.find('?') {
        Some(at) => origin.split_at(at),
        None => (origin, ""),
    };
    let decoded = decode_unreserved(path)?;
    let mut normal = remove_dot_segments(&decoded)?;
    normal.push_str(query);
    Ok(normal)
}

/// The origin-form part of `raw`: itself, or the path of an absolute URI whose authority is the
/// Host header's.
fn origin_form<'a>(raw: &'a str, host: &str) -> Result<&'a str, TargetError> {
    if raw.starts_with('/') {
        return Ok(raw);
    }
    let rest = ["http://", "https://", "ws://", "wss://"]
        .iter()
        .find_map(|scheme| {
            raw.get(..scheme.len())
                .filter(|prefix| prefix.eq_ignore_ascii_case(scheme))
                .map(|_| &raw[scheme.len()..])
        })
        .ok_or(TargetError::Form)?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if !authority.eq_ignore_ascii_case(host) {
        return Err(TargetError::AuthorityMismatch);
    }
    match path {
        "" => Ok("/"),
        // `http://host?q`: rare enough to refuse rather than rebuild.
        query if query.starts_with('?') => Err(TargetError::Form),
        path => Ok(path),
    }
}

/// Decodes `%XX` where it stands for an unreserved character (letters, digits, `-._~`); keeps
/// every other encoding as sent, upper-cased, and refuses encoded slashes and backslashes.
fn decode_unreserved(path: &str) -> Result<String, TargetError> {
    if path.contains('\\') {
        return Err(TargetError::AmbiguousSeparator);
    }
    if !path.is_ascii() {
        return Err(TargetError::BadEncoding);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != b'%' {
            out.push(char::from(bytes[at]));
            at += 1;
            continue;
        }
        let hex = bytes.get(at + 1..at + 3).ok_or(TargetError::BadEncoding)?;
        let value = std::str::from_utf8(hex)
            .ok()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .ok_or(TargetError::BadEncoding)?;
        match value {
            b'/' | b'\\' => return Err(TargetError::AmbiguousSeparator),
            v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => out.push(char::from(v)),
            v => {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{v:02X}");
            }
        }
        at += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path, with repeated slashes merged first; refuses a path
/// whose `..` would climb above the root.
fn remove_dot_segments(path: &str) -> Result<String, TargetError> {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (index, part) in parts.iter().enumerate() {
        match *part {
            "" if index == last => trailing_slash = true,
            "" | "." => trailing_slash = index == last,
            ".." => {
                if segments.pop().is_none() {
                    return Err(TargetError::AboveRoot);
                }
                trailing_slash = index == last;
            }
            segment => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Whether `host` is a valid Host header value: a registered name or IPv4 address (letters,
/// digits, `-._~`, sub-delimiters, percent-encodings) or a bracketed IPv6 literal, with an
/// optional numeric port.
pub fn is_valid_host(host: &str) -> bool {
    let name = host_name(host);
    // What `host_name` split off is a port; a malformed one (`x:`, `x:8o`) stays in the name,
    // whose `:` then fails it.
    let port = &host[name.len()..];
    let port_ok = port.is_empty()
        || (port.len() > 1
            && port.starts_with(':')
            && port[1..].bytes().all(|b| b.is_ascii_digit()));
    let name_ok = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(literal) => {
            !literal.is_empty()
                && literal
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b))
        }
        None => {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
        }
    };
    port_ok && name_ok
}

/// The host of a Host value without its port: `example.com:8080` → `example.com`,
/// `[::1]:80` → `[::1]`; a port that is not all digits is left on.
pub fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(raw: &str) -> Result<String, TargetError> {
        normalize(raw, "chat.test")
    }

    #[test]
    fn plain_paths_and_queries_pass_unchanged() {
        for path in [
            "/",
            "/chat",
            "/chat/",
            "/chat/room?x=1&y=/../z",
            "/a%20b",
            "/%E2%82%AC",
        ] {
            assert_eq!(normal(path).as_deref(), Ok(path), "{path}");
        }
    }

    #[test]
    fn dot_segments_slashes_and_encoded_unreserved_characters_are_normalised() {
        let cases = [
            ("/chat/../admin", "/admin"),
            ("/chat/./room", "/chat/room"),
            ("/chat/%2e%2e/admin", "/admin"),
            ("/chat/%2E%2e/admin?q", "/admin?q"),
            ("//admin", "/admin"),
            ("/chat//room///", "/chat/room/"),
            ("/c%68at", "/chat"),
            ("/chat/..", "/"),
            ("/chat/.", "/chat/"),
            ("/a%3fb", "/a%3Fb"),
        ];
        for (raw, expected) in cases {
            assert_eq!(normal(raw).as_deref(), Ok(expected), "{raw}");
        }
    }

    #[test]
    fn ambiguous_targets_are_refused() {
        let cases = [
            ("/chat\\..\\admin", TargetError::AmbiguousSeparator),
            ("/chat%2f..%2fadmin", TargetError::AmbiguousSeparator),
            ("/chat%5Cadmin", TargetError::AmbiguousSeparator),
            ("/../admin", TargetError::AboveRoot),
            ("/chat/%2e%2e/%2e%2e/admin", TargetError::AboveRoot),
            ("/bad%zz", TargetError::BadEncoding),
            ("/bad%4", TargetError::BadEncoding),
            // Found by the malformed-input corpus: forwarded as sent, read as `/admin` by an
            // upstream that drops the fragment.
            ("/admin#x", TargetError::BadEncoding),
            ("/chat?q=#", TargetError::BadEncoding),
            ("*", TargetError::Form),
            ("chat.test:80", TargetError::Form),
        ];
        for (raw, error) in cases {
            assert_eq!(normal(raw), Err(error), "{raw}");
        }
    }

    #[test]
    fn an_absolute_target_must_name_the_host_it_is_sent_to() {
        assert_eq!(normal("http://chat.test/room?x").as_deref(), Ok("/room?x"));
        assert_eq!(normal("WS://CHAT.test").as_deref(), Ok("/"));
        assert_eq!(
            normal("http://admin.internal/room"),
            Err(TargetError::AuthorityMismatch)
        );
        assert_eq!(
            normalize("http://chat.test:8080/a", "chat.test:8080").as_deref(),
            Ok("/a")
        );
    }

    #[test]
    fn host_values_are_names_addresses_or_literals_with_a_port() {
        for host in [
            "chat.test",
            "chat.test:8080",
            "127.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:443",
            "xn--bcher-kva.example",
        ] {
            assert!(is_valid_host(host), "{host}");
        }
        for host in [
            "",
            "chat test",
            "chat.test/x",
            "user@chat.test",
            "chat.test:",
            "chat.test:8o",
            "[::1",
            "[zz]:80",
            "ch\u{e4}t.test",
        ] {
            assert!(!is_valid_host(host), "{host}");
        }
    }
}
