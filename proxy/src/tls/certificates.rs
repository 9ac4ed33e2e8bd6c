//! Certificates: reading PEM chains and keys, and picking one by the client's SNI name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{TlsConfig, TlsFiles};

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The certificate file could not be read or holds no PEM certificate.
    #[error("certificate {path}: {reason}")]
    Chain {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key file could not be read or holds no supported PEM key.
    #[error("key {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the certificate (or is of an unsupported type).
    #[error("key {key} does not match certificate {cert}: {reason}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// rustls' reason.
        reason: String,
    },
}

/// Reads a certificate chain and its key and checks that they belong together.
pub fn load_certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertificateError> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;
    let mismatch = |reason: String| CertificateError::Mismatch {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
        reason,
    };
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| mismatch(format!("unsupported key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Err(
            mismatch("the certificate's public key is not this key's".into()),
        ),
        Err(e) => Err(mismatch(e.to_string())),
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertificateError> {
    let error = |reason: String| CertificateError::Chain {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not valid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(error("no \"BEGIN CERTIFICATE\" block".into()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertificateError> {
    let error = |reason: String| CertificateError::Key {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        error(format!(
            "no PKCS#8, SEC1 (EC) or PKCS#1 (RSA) private key in PEM form ({e})"
        ))
    })
}

/// Picks the certificate for a ClientHello: exact SNI name, then `*.` wildcard of its parent,
/// then the default (unless strict).
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
    strict: bool,
}

impl SniResolver {
    /// Loads every certificate of a listener.
    pub fn load(config: &TlsConfig, provider: &CryptoProvider) -> Result<Self, CertificateError> {
        let default = load_certified_key(&config.default, provider)?;
        let mut by_name = HashMap::new();
        for entry in &config.sni {
            let key = load_certified_key(&entry.files, provider)?;
            for name in &entry.names {
                by_name.insert(name.clone(), Arc::clone(&key));
            }
        }
        Ok(SniResolver {
            default,
            by_name,
            strict: config.strict_sni,
        })
    }

    /// The certificate for `server_name` (the SNI name, already lower case), if any.
    pub fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return Some(Arc::clone(&self.default));
        };
        let name = name.trim_end_matches('.');
        if let Some(key) = self.by_name.get(name) {
            return Some(Arc::clone(key));
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.by_name.get(&format!("*.{parent}")) {
                return Some(Arc::clone(key));
            }
        }
        if self.strict {
            tracing::info!(
                sni = name,
                "TLS handshake refused: no certificate for this name"
            );
            return None;
        }
        Some(Arc::clone(&self.default))
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(client_hello.server_name())
    }
}
