//! TLS termination (`wss://`) with rustls: certificates and SNI, the per-listener server
//! configuration, and the sans-IO session of one client. The io_uring worker feeds sessions
//! socket bytes; TLS tunnels are always relayed in userspace (no kTLS here).

mod certificates;
mod client_hello;
mod server_config;
mod session;

pub use certificates::{load_certified_key, CertificateError, SniResolver};
pub use client_hello::{suite_preference, SuitePreference};
pub use server_config::{server_configs, ServerConfigs, TlsSetupError};
pub use session::{Negotiated, SessionError, TlsSession};
