//! TLS fixtures for the `wss://` tests: a throw-away CA issuing leaf certificates, and a
//! tokio-tungstenite client over tokio-rustls that trusts that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;

use crate::{bounded, scratch_dir, ws_config};

/// A wss:// client connection.
pub type TlsClient = WebSocketStream<TlsStream<TcpStream>>;

/// A certificate authority for tests, writing PEM files into its own scratch folder.
pub struct TestCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

/// A leaf certificate's files.
#[derive(Debug, Clone)]
pub struct LeafFiles {
    /// PEM chain (leaf, then the CA).
    pub cert: PathBuf,
    /// PEM PKCS#8 key.
    pub key: PathBuf,
    /// The leaf in DER, to compare with what a client was served.
    pub der: Vec<u8>,
}

impl TestCa {
    /// A new CA (ECDSA P-256).
    pub fn new() -> TestCa {
        let dir = scratch_dir("ca");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsplice test CA");
        let key = KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&key).expect("ca cert");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
        TestCa {
            ca_der: ca.der().clone(),
            issuer: Issuer::new(params, key),
            dir,
        }
    }

    /// The CA certificate file (for openssl and Python clients).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a leaf certificate for `names` (DNS names or IP addresses), files named `stem`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> LeafFiles {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        let key = KeyPair::generate().expect("leaf key");
        let leaf = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let files = LeafFiles {
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            der: leaf.der().to_vec(),
        };
        let ca = std::fs::read_to_string(self.ca_pem()).expect("read ca");
        std::fs::write(&files.cert, format!("{}{ca}", leaf.pem())).expect("write leaf");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }

    /// A rustls client configuration trusting this CA, offering TLS 1.2 and 1.3.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add CA root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

impl Default for TestCa {
    fn default() -> TestCa {
        TestCa::new()
    }
}

/// The `tls = { … }` value of a listener serving `leaf` (plus `extra` keys).
pub fn tls_table(leaf: &LeafFiles, extra: &str) -> String {
    files_table(&leaf.cert, &leaf.key, extra)
}

/// The `tls = { … }` value for any certificate and key files (plus `extra` keys).
pub fn files_table(cert: &Path, key: &Path, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    format!(
        "{{ cert = \"{}\", key = \"{}\"{extra} }}",
        cert.display(),
        key.display()
    )
}

/// Opens a TLS connection to `addr` presenting `server_name` as SNI.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = bounded(TcpStream::connect(addr)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    bounded(TlsConnector::from(config).connect(name, tcp)).await
}

/// Connects a tokio-tungstenite client to `wss://{server_name}{path}` at `addr`.
pub async fn connect_wss(
    addr: std::net::SocketAddr,
    server_name: &str,
    path: &str,
    config: Arc<ClientConfig>,
) -> TlsClient {
    let stream = tls_connect(addr, server_name, config)
        .await
        .unwrap_or_else(|e| panic!("TLS connect to {addr} as {server_name}: {e}"));
    let url = format!("wss://{server_name}:{}{path}", addr.port());
    let (ws, _) = bounded(tokio_tungstenite::client_async_with_config(
        url.as_str(),
        stream,
        Some(ws_config()),
    ))
    .await
    .unwrap_or_else(|e| panic!("ws handshake {url}: {e}"));
    ws
}

/// The leaf certificate a TLS connection was served.
pub fn served_leaf(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.to_vec())
        .unwrap_or_default()
}
