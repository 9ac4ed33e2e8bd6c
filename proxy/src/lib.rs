//! wsplice: a WebSocket edge proxy for Linux.
//!
//! One module per concept of the domain. The protocol logic is sans-IO and unit-tested:
//! `handshake` (parse and validate heads), `headers` (rewriting), `route`, `upstream` (pools),
//! `connection` (the state machine before the tunnel), `tunnel::relay` (per-direction
//! bookkeeping) and `timeouts` (the timer wheel). The I/O sits around them: `runtime` (the
//! io_uring workers) and `listener`.

pub mod access;
pub mod admin;
pub mod admission;
pub mod buffers;
pub mod cidr;
pub mod clock;
pub mod config;
pub mod connection;
pub mod echo;
pub mod error_chain;
pub mod handshake;
pub mod hash;
pub mod headers;
pub mod http;
pub mod import;
pub mod listener;
pub mod metrics;
pub mod privileges;
pub mod proxy_protocol;
pub mod route;
pub mod runtime;
pub mod services;
pub mod splice;
pub mod sys;
pub mod tag;
pub mod target;
pub mod timeouts;
pub mod tls;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;
