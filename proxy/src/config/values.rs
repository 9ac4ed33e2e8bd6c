//! Values inside the config: addresses, durations ("10s", "5m"), sizes ("64KiB"), header
//! names; each parser points at the value it refuses.

use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use super::{spot, Account, RawAccount, RawSize, Spot};

/// An `IP:port` address.
pub(super) fn parse_addr(value: &Spanned<String>) -> Result<SocketAddr, Spot> {
    value.get_ref().parse().map_err(|_| {
        spot(
            value,
            format!(
                "{:?} is not an IP:port address (e.g. \"127.0.0.1:8080\")",
                value.get_ref()
            ),
        )
    })
}

/// `user` or `group` (`what`): a name as the system's databases spell it, or a numeric id.
pub(super) fn parse_account(value: &Spanned<RawAccount>, what: &str) -> Result<Account, Spot> {
    match value.get_ref() {
        RawAccount::Id(id) => u32::try_from(*id)
            .ok()
            .filter(|id| *id != u32::MAX)
            .map(Account::Id)
            .ok_or_else(|| spot(value, format!("{what}: {id} is not a valid id"))),
        RawAccount::Name(name) => {
            // What useradd/groupadd accept, loosely: no separators of /etc/passwd, no spaces.
            let valid = !name.is_empty()
                && name.len() <= 256
                && !name.starts_with('-')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-$".contains(c));
            if valid {
                Ok(Account::Name(name.clone()))
            } else {
                Err(spot(
                    value,
                    format!("{what}: {name:?} is not a user or group name (letters, digits, '.', '_', '-')"),
                ))
            }
        }
    }
}

/// A duration that must not be zero.
pub(super) fn parse_nonzero_duration(value: &Spanned<String>) -> Result<Duration, Spot> {
    let duration = parse_duration(value)?;
    if duration.is_zero() {
        return Err(spot(value, "must be longer than zero"));
    }
    Ok(duration)
}

/// A duration: a number with `ms`, `s`, `m` or `h` (`"250ms"`, `"10s"`, `"5m"`); at most 30 days.
pub(super) fn parse_duration(value: &Spanned<String>) -> Result<Duration, Spot> {
    let text = value.get_ref().trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        spot(
            value,
            format!("{text:?} is not a duration (use e.g. \"250ms\", \"10s\", \"5m\", \"1h\")"),
        )
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    let duration = match unit.trim() {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        _ => return Err(bad()),
    };
    if duration > Duration::from_secs(30 * 24 * 3600) {
        return Err(spot(value, "durations are limited to 30 days"));
    }
    Ok(duration)
}

/// A size in bytes: an integer, or a number with `B`, `KiB`, `MiB` or `GiB` (`"16KiB"`).
pub(super) fn parse_size(value: &Spanned<RawSize>) -> Result<usize, Spot> {
    let bytes = match value.get_ref() {
        RawSize::Bytes(n) => *n,
        RawSize::Text(text) => {
            let text = text.trim();
            let split = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let multiplier = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                _ => {
                    return Err(spot(
                        value,
                        format!(
                        "{text:?} is not a size (use bytes, or e.g. \"16KiB\", \"1MiB\", \"2GiB\")"
                    ),
                    ))
                }
            };
            let number: u64 = number
                .parse()
                .map_err(|_| spot(value, format!("{text:?} is not a size")))?;
            number.saturating_mul(multiplier)
        }
    };
    usize::try_from(bytes).map_err(|_| spot(value, "size too large"))
}

/// An HTTP header name (RFC 9110 token).
/// Whether `name` is a valid HTTP header name (an RFC 9110 token).
pub(super) fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
