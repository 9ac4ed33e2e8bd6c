//! The `tls` table of a listener (`wss://`): certificates, SNI, versions, suites, resumption.
//!
//! Only the shape and the names are checked here; reading the PEM files and matching keys to
//! certificates happens in [`crate::tls`], which `wsplice check` and `wsplice run` both call.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{spot, Spot};

/// A TLS listener's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The default certificate: served without SNI and for names no `sni` entry matches.
    pub default: TlsFiles,
    /// Certificates picked by the client's SNI name.
    pub sni: Vec<SniCertificate>,
    /// Refuse names no `sni` entry matches (alert `unrecognized_name`) instead of serving the
    /// default certificate.
    pub strict_sni: bool,
    /// Oldest protocol version accepted.
    pub min_version: TlsVersion,
    /// Cipher suites offered, by their IANA names; empty = the crypto provider's defaults.
    pub ciphers: Vec<String>,
    /// Server-side session cache size in sessions (TLS 1.2 session IDs); 0 = none.
    pub session_cache: usize,
    /// Stateless resumption with session tickets (keys rotated every 6 hours).
    pub session_tickets: bool,
    /// The rustls crypto provider.
    pub provider: CryptoProvider,
}

impl TlsConfig {
    /// The settings of a `tls` table that names only its certificate and key: every other
    /// key at its default.
    pub fn with_files(default: TlsFiles) -> TlsConfig {
        TlsConfig {
            default,
            sni: Vec::new(),
            strict_sni: false,
            min_version: TlsVersion::V1_2,
            ciphers: Vec::new(),
            session_cache: DEFAULT_SESSION_CACHE,
            session_tickets: true,
            provider: CryptoProvider::AwsLcRs,
        }
    }
}

/// Certificate chain and key of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1 RSA).
    pub key: PathBuf,
}

/// A certificate served for some SNI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCertificate {
    /// Lower-case DNS names; `*.example.com` matches one extra leading label.
    pub names: Vec<String>,
    /// Its files.
    pub files: TlsFiles,
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.2.
    V1_2,
    /// TLS 1.3.
    V1_3,
}

/// Which rustls crypto provider does the cryptography.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptoProvider {
    /// aws-lc-rs (the default: faster handshakes and bulk on x86-64, see the README).
    AwsLcRs,
    /// ring.
    Ring,
}

/// Cipher suites this build knows, by IANA name (both providers implement all of them).
pub const CIPHER_SUITES: &[&str] = &[
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

/// Default size of the server-side session cache.
const DEFAULT_SESSION_CACHE: usize = 20_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    #[serde(default)]
    sni: Vec<RawSni>,
    strict_sni: Option<bool>,
    min_version: Option<Spanned<String>>,
    ciphers: Option<Vec<Spanned<String>>>,
    session_cache: Option<Spanned<usize>>,
    session_tickets: Option<bool>,
    provider: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSni {
    names: Spanned<Vec<Spanned<String>>>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

impl RawTls {
    pub(super) fn to_config(&self, base: &Path) -> Result<TlsConfig, Spot> {
        let defaults = TlsConfig::with_files(files(base, &self.cert, &self.key));
        let min_version = match &self.min_version {
            None => defaults.min_version,
            Some(v) => match v.get_ref().as_str() {
                "1.2" => TlsVersion::V1_2,
                "1.3" => TlsVersion::V1_3,
                other => {
                    return Err(spot(
                        v,
                        format!("min_version {other:?} is not supported (\"1.2\" or \"1.3\")"),
                    ))
                }
            },
        };
        let ciphers = self.ciphers(min_version)?;
        let provider = match &self.provider {
            None => defaults.provider,
            Some(p) => match p.get_ref().as_str() {
                "aws-lc-rs" => CryptoProvider::AwsLcRs,
                "ring" => CryptoProvider::Ring,
                other => {
                    return Err(spot(
                        p,
                        format!("provider {other:?} is unknown (\"aws-lc-rs\" or \"ring\")"),
                    ))
                }
            },
        };
        let session_cache = match &self.session_cache {
            None => defaults.session_cache,
            Some(n) if *n.get_ref() > 10_000_000 => {
                return Err(spot(n, "session_cache is limited to 10,000,000 sessions"))
            }
            Some(n) => *n.get_ref(),
        };
        let mut sni: Vec<SniCertificate> = Vec::new();
        for entry in &self.sni {
            if entry.names.get_ref().is_empty() {
                return Err(spot(&entry.names, "an sni entry needs at least one name"));
            }
            let mut names = Vec::new();
            for name in entry.names.get_ref() {
                let normalized = name.get_ref().trim_end_matches('.').to_ascii_lowercase();
                if !is_sni_pattern(&normalized) {
                    return Err(spot(
                        name,
                        format!(
                            "{:?} is not a DNS name (e.g. \"chat.example.com\" or \"*.example.com\")",
                            name.get_ref()
                        ),
                    ));
                }
                let taken = sni.iter().flat_map(|s| &s.names).chain(&names);
                if taken.into_iter().any(|n| *n == normalized) {
                    return Err(spot(
                        name,
                        format!("sni name {normalized:?} is listed twice"),
                    ));
                }
                names.push(normalized);
            }
            sni.push(SniCertificate {
                names,
                files: files(base, &entry.cert, &entry.key),
            });
        }
        Ok(TlsConfig {
            sni,
            strict_sni: self.strict_sni.unwrap_or(defaults.strict_sni),
            min_version,
            ciphers,
            session_cache,
            session_tickets: self.session_tickets.unwrap_or(defaults.session_tickets),
            provider,
            ..defaults
        })
    }

    /// The configured suites, known by name and usable with the allowed versions.
    fn ciphers(&self, min_version: TlsVersion) -> Result<Vec<String>, Spot> {
        let Some(raw) = &self.ciphers else {
            return Ok(Vec::new());
        };
        let mut ciphers: Vec<String> = Vec::new();
        for name in raw {
            let upper = name.get_ref().to_ascii_uppercase();
            if !CIPHER_SUITES.contains(&upper.as_str()) {
                return Err(spot(
                    name,
                    format!(
                        "cipher suite {:?} is unknown; known: {}",
                        name.get_ref(),
                        CIPHER_SUITES.join(", ")
                    ),
                ));
            }
            if !ciphers.contains(&upper) {
                ciphers.push(upper);
            }
        }
        let usable = |version: TlsVersion| {
            ciphers
                .iter()
                .any(|c| c.starts_with("TLS13_") == (version == TlsVersion::V1_3))
        };
        if !usable(TlsVersion::V1_3)
            && (min_version == TlsVersion::V1_3 || !usable(TlsVersion::V1_2))
        {
            let version = if min_version == TlsVersion::V1_3 {
                "1.3"
            } else {
                "1.2 or 1.3"
            };
            let message = format!("ciphers has no suite for TLS {version}");
            return Err(match raw.first() {
                Some(first) => spot(first, message),
                None => Spot {
                    span: self.cert.span(),
                    message,
                },
            });
        }
        Ok(ciphers)
    }
}

fn files(base: &Path, cert: &Spanned<String>, key: &Spanned<String>) -> TlsFiles {
    TlsFiles {
        cert: base.join(cert.get_ref()),
        key: base.join(key.get_ref()),
    }
}

/// A lower-case DNS name, optionally with one leading `*.` wildcard label.
fn is_sni_pattern(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_patterns() {
        assert!(is_sni_pattern("chat.example.com"));
        assert!(is_sni_pattern("*.example.com"));
        assert!(is_sni_pattern("localhost"));
        assert!(!is_sni_pattern("*"));
        assert!(!is_sni_pattern("a..b"));
        assert!(!is_sni_pattern("a.*.b"));
        assert!(!is_sni_pattern("-a.b"));
        assert!(!is_sni_pattern("127.0.0.1:443"));
    }
}
