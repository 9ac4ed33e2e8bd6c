//! Builds one rustls `ServerConfig` per TLS listener from its [`TlsConfig`].

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, ServerConfig, ServerSessionMemoryCache};

use super::certificates::{CertificateError, SniResolver};
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

/// Loads the certificates and builds the server configuration of one TLS listener.
pub fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = Arc::new(provider(config));
    let resolver = SniResolver::load(config, &provider)?;
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(TlsSetupError::Settings)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    server.ignore_client_order = !config.ciphers.is_empty();
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
    Ok(Arc::new(server))
}
