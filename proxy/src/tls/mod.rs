//! TLS termination (`wss://`) with rustls: certificates and SNI, the per-listener server
//! configuration, and the sans-IO session of one client, whose TLS 1.3 records are protected
//! by the session itself once rustls finished the handshake. The io_uring worker feeds sessions
//! socket bytes; TLS tunnels are always relayed in userspace (no kTLS here).

mod certificates;
mod client_hello;
mod record;
mod server_config;
mod session;
mod traffic;

pub use certificates::{load_certified_key, CertificateError, SniResolver};
pub use client_hello::{suite_preference, SuitePreference};
pub use server_config::{server_configs, ServerConfigs, TlsSetupError};
pub use session::{Negotiated, SessionError, TlsSession};
pub use traffic::TrafficError;
