//! Builds the rustls server configurations of one TLS listener from its [`TlsConfig`]: one per
//! cipher-suite preference, chosen per client from its ClientHello.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{
    NoServerSessionStorage, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache,
};

use super::certificates::{CertificateError, SniResolver};
use super::client_hello::SuitePreference;
use crate::config::{self, TlsConfig, TlsVersion};

/// The only application protocol spoken over TLS: the Upgrade handshake is HTTP/1.1.
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// A TLS listener cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A certificate or key is unusable.
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    /// rustls refused the combination of versions and suites.
    #[error("TLS settings refused by rustls: {0}")]
    Settings(#[source] rustls::Error),
    /// The session ticket key generator could not start.
    #[error("cannot create the session ticket keys: {0}")]
    Tickets(#[source] rustls::Error),
}

/// The crypto provider named in the config, narrowed to the configured cipher suites.
fn provider(config: &TlsConfig) -> CryptoProvider {
    let mut provider = match config.provider {
        config::CryptoProvider::AwsLcRs => rustls::crypto::aws_lc_rs::default_provider(),
        config::CryptoProvider::Ring => rustls::crypto::ring::default_provider(),
    };
    if !config.ciphers.is_empty() {
        // Config order is preference order: the server picks (`ignore_client_order`).
        let available = std::mem::take(&mut provider.cipher_suites);
        provider.cipher_suites = config
            .ciphers
            .iter()
            .filter_map(|name| {
                available
                    .iter()
                    .find(|suite| suite.suite().as_str() == Some(name.as_str()))
                    .copied()
            })
            .collect();
    }
    provider
}

/// The rustls configurations of one TLS listener. They share certificates, the session cache
/// and the ticket keys, so a session started under one resumes under the other.
#[derive(Debug)]
pub struct ServerConfigs {
    /// For clients that list AES-GCM first: AES-128-GCM is chosen before AES-256-GCM. Its
    /// SHA-256 runs on the CPU's SHA extensions where SHA-384 (AES-256's hash) often runs
    /// generic code, for the handshake's transcript and key schedule at both ends.
    aes_first: Arc<ServerConfig>,
    /// The client's own order: for clients without AES hardware (they list ChaCha20 first),
    /// and for servers without it.
    client_order: Arc<ServerConfig>,
    /// Whose crypto the configurations use (and TLS 1.3 records after the handshake).
    provider: config::CryptoProvider,
    /// The settings the ticket keys and the session cache were made for.
    resumption: ResumptionSettings,
}

/// What decides how sessions resume: a reload that keeps them keeps the ticket keys and the
/// session cache, so clients resume across it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResumptionSettings {
    tickets: bool,
    cache: usize,
    provider: config::CryptoProvider,
}

impl ResumptionSettings {
    fn of(config: &TlsConfig) -> ResumptionSettings {
        ResumptionSettings {
            tickets: config.session_tickets,
            cache: config.session_cache,
            provider: config.provider,
        }
    }
}

/// The ticket keys and session cache a listener's configurations share.
struct Resumption {
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    storage: Arc<dyn rustls::server::StoresServerSessions>,
}

impl ServerConfigs {
    /// The configuration for a client with this preference (read from its ClientHello).
    pub fn for_client(&self, preference: SuitePreference) -> &Arc<ServerConfig> {
        match preference {
            SuitePreference::Other => &self.aes_first,
            SuitePreference::ChaCha20 | SuitePreference::Unknown | SuitePreference::NeedMore => {
                &self.client_order
            }
        }
    }

    /// Whose crypto protects records after the handshake: the listener's provider.
    pub fn provider(&self) -> config::CryptoProvider {
        self.provider
    }

    /// The configurations of this listener after a reload (`config`: its new settings, files
    /// read again). When its resumption settings did not change, the ticket keys and the
    /// session cache carry over: clients resume across the reload.
    pub fn reloaded(&self, config: &TlsConfig) -> Result<Arc<ServerConfigs>, TlsSetupError> {
        let carried = (self.resumption == ResumptionSettings::of(config)).then(|| Resumption {
            ticketer: Arc::clone(&self.client_order.ticketer),
            storage: Arc::clone(&self.client_order.session_storage),
        });
        build(config, carried)
    }
}

/// Loads the certificates and builds the server configurations of one TLS listener.
pub fn server_configs(config: &TlsConfig) -> Result<Arc<ServerConfigs>, TlsSetupError> {
    build(config, None)
}

/// [`server_configs`], with the ticket keys and session cache of `carried` if given.
fn build(
    config: &TlsConfig,
    carried: Option<Resumption>,
) -> Result<Arc<ServerConfigs>, TlsSetupError> {
    let provider = provider(config);
    let resolver: Arc<dyn ResolvesServerCert> = Arc::new(SniResolver::load(config, &provider)?);
    let chosen_by_operator = !config.ciphers.is_empty();
    let mut base = server_config(config, provider.clone(), Arc::clone(&resolver))?;
    if let Some(carried) = carried {
        base.ticketer = carried.ticketer;
        base.session_storage = carried.storage;
    }
    let resumption = ResumptionSettings::of(config);
    if chosen_by_operator || !has_aes_hardware() {
        // Config order is preference order: the server picks.
        let mut only = base;
        only.ignore_client_order = chosen_by_operator;
        let only = Arc::new(only);
        return Ok(Arc::new(ServerConfigs {
            aes_first: Arc::clone(&only),
            client_order: only,
            provider: config.provider,
            resumption,
        }));
    }
    let mut aes_first = server_config(config, aes_128_first(provider), resolver)?;
    aes_first.ignore_client_order = true;
    aes_first.session_storage = Arc::clone(&base.session_storage);
    aes_first.ticketer = Arc::clone(&base.ticketer);
    Ok(Arc::new(ServerConfigs {
        aes_first: Arc::new(aes_first),
        client_order: Arc::new(base),
        provider: config.provider,
        resumption,
    }))
}

/// `provider` with the AES-128-GCM suites first, then AES-256-GCM, then the rest, each version's
/// suites keeping their order otherwise.
fn aes_128_first(mut provider: CryptoProvider) -> CryptoProvider {
    let rank = |suite: &rustls::SupportedCipherSuite| {
        let name = suite.suite().as_str().unwrap_or_default();
        if name.contains("AES_128_GCM") {
            0
        } else if name.contains("AES_256_GCM") {
            1
        } else {
            2
        }
    };
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// Whether this CPU runs AES-GCM in hardware (else ChaCha20 is as fast for us, and the client
/// decides).
pub(super) fn has_aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// One rustls configuration (the client's suite order): certificates, versions, ALPN, session
/// cache and tickets.
fn server_config(
    config: &TlsConfig,
    provider: CryptoProvider,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, TlsSetupError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let mut server = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .map_err(TlsSetupError::Settings)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    server.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // A TLS 1.3 session takes its traffic keys over once the handshake is done (`Traffic`).
    server.enable_secret_extraction = true;
    server.session_storage = if config.session_cache > 0 {
        ServerSessionMemoryCache::new(config.session_cache)
    } else {
        Arc::new(NoServerSessionStorage {})
    };
    if config.session_tickets {
        // Rotates its key every 6 hours and still accepts tickets of the previous key.
        server.ticketer = match config.provider {
            config::CryptoProvider::AwsLcRs => rustls::crypto::aws_lc_rs::Ticketer::new(),
            config::CryptoProvider::Ring => rustls::crypto::ring::Ticketer::new(),
        }
        .map_err(TlsSetupError::Tickets)?;
    }
    Ok(server)
}
