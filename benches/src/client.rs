//! Opening ws:// and wss:// connections: optional loopback source address (bound before
//! connect), TLS trusting the bench's own CA, a server name other than the address, and how
//! the client resumes TLS sessions.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// The connection options every workload takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// ws:// or wss:// URL (the host is where to connect).
    #[arg(long)]
    pub url: String,
    /// Speak wss:// even if the URL says ws://.
    #[arg(long)]
    pub tls: bool,
    /// PEM file of the CA to trust for wss:// (required with TLS).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Name to send (SNI, Host) and verify instead of the URL's host.
    #[arg(long)]
    pub server_name: Option<String>,
    /// Local address to bind before connecting (e.g. 127.0.0.2).
    #[arg(long)]
    pub source: Option<IpAddr>,
    /// TLS session resumption on the client side (wss:// only).
    #[arg(long, value_enum, default_value_t = Resumption::Shared)]
    pub resumption: Resumption,
}

/// How the client resumes TLS sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Resumption {
    /// rustls' default: one session store for every connection of the process, holding at most
    /// 8 TLS 1.3 tickets per server, so parallel connections resume only as far as the tickets
    /// last and the rest are full handshakes.
    Shared,
    /// No resumption: every handshake is a full one.
    Full,
    /// Every connection resumes if the server allows: each storm loop has its own session store
    /// (`Client::for_loop`), so its next connection resumes from a ticket of its previous one;
    /// the first connection of each loop is a full handshake. Sequential workloads keep one
    /// store, as with `shared`.
    Resumed,
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Everything needed to open one more connection, cheap to clone.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    request_url: Arc<str>,
    source: Option<IpAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
    resumption: Resumption,
    buffers: Buffers,
}

/// Per-connection buffers: large for throughput, small for many mostly idle connections (the
/// 128 KiB defaults would make the load side, not the proxy, the cost of a large fleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    Large,
    Small,
}

fn ws_config(buffers: Buffers) -> WebSocketConfig {
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    match buffers {
        Buffers::Large => config,
        Buffers::Small => config.read_buffer_size(4096).write_buffer_size(0),
    }
}

impl Client {
    pub async fn new(args: &ConnArgs, buffers: Buffers) -> anyhow::Result<Self> {
        let (scheme, rest) = args
            .url
            .split_once("://")
            .with_context(|| format!("not a URL: {}", args.url))?;
        let tls = match scheme {
            "ws" => args.tls,
            "wss" => true,
            other => bail!("unsupported scheme {other}"),
        };
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().context("bad port")?),
            None => (authority, default_port),
        };
        let addr = tokio::net::lookup_host((host, port))
            .await?
            .next()
            .with_context(|| format!("{host} does not resolve"))?;
        let name = args.server_name.as_deref().unwrap_or(host);
        let request_url = format!("{}://{name}:{port}{path}", if tls { "wss" } else { "ws" });
        let tls = if tls {
            Some(Arc::new(tls_config(args.ca.as_deref(), args.resumption)?))
        } else {
            None
        };
        Ok(Self {
            addr,
            request_url: request_url.into(),
            source: args.source,
            tls,
            resumption: args.resumption,
            buffers,
        })
    }

    /// The client one of several parallel loops uses: with `--resumption resumed`, one with a
    /// session store of its own (so the loop's tickets are not taken by the other loops); else
    /// the same client.
    pub fn for_loop(&self) -> Client {
        let mut client = self.clone();
        if let (Resumption::Resumed, Some(shared)) = (self.resumption, &self.tls) {
            let mut config = (**shared).clone();
            config.resumption = rustls::client::Resumption::in_memory_sessions(16);
            client.tls = Some(Arc::new(config));
        }
        client
    }

    /// Opens one connection (TCP, TLS if asked, upgrade) within 10 s.
    pub async fn open(&self) -> anyhow::Result<Ws> {
        tokio::time::timeout(Duration::from_secs(10), self.open_now())
            .await
            .context("connect timed out")?
    }

    async fn open_now(&self) -> anyhow::Result<Ws> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = self.source {
            // The port is chosen at connect, for the 4-tuple: a bind with port 0 would pick
            // one unused by every socket on the address, a search that grows with the
            // connections already there (tens of thousands: the kernel's time, quadratic).
            bind_address_no_port(&socket)?;
            socket
                .bind(SocketAddr::new(source, 0))
                .with_context(|| format!("bind {source}"))?;
        }
        let stream = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connect {}", self.addr))?;
        stream.set_nodelay(true)?;
        let connector = match &self.tls {
            Some(config) => Connector::Rustls(config.clone()),
            None => Connector::Plain,
        };
        let (ws, _) = tokio_tungstenite::client_async_tls_with_config(
            &*self.request_url,
            stream,
            Some(ws_config(self.buffers)),
            Some(connector),
        )
        .await
        .with_context(|| format!("upgrade {}", self.request_url))?;
        Ok(ws)
    }
}

/// What the TLS handshake of a connection was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// A session was resumed.
    pub resumed: bool,
    /// TLS 1.3 was negotiated (else 1.2): proxies are compared on the same version.
    pub tls13: bool,
}

/// The TLS handshake of `ws` (`None`: not TLS, or the handshake is not done).
pub fn handshake(ws: &Ws) -> Option<Handshake> {
    match ws.get_ref() {
        MaybeTlsStream::Rustls(stream) => {
            let conn = stream.get_ref().1;
            Some(Handshake {
                resumed: conn.handshake_kind()? == rustls::HandshakeKind::Resumed,
                tls13: conn.protocol_version()? == rustls::ProtocolVersion::TLSv1_3,
            })
        }
        _ => None,
    }
}

/// A rustls client (aws-lc-rs provider) trusting only `ca`.
fn tls_config(
    ca: Option<&std::path::Path>,
    resumption: Resumption,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("cannot read {}", path.display()))?
            {
                roots.add(cert?)?;
            }
        }
        None => bail!("wss:// needs --ca FILE (the CA that signed the server's certificate)"),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if resumption == Resumption::Full {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(config)
}

/// `IP_BIND_ADDRESS_NO_PORT` on `socket`: a later bind to port 0 leaves the port to connect.
fn bind_address_no_port(socket: &TcpSocket) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid c_int; the descriptor
    // belongs to `socket`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
    }
    Ok(())
}
