//! wsplice: a WebSocket edge proxy for Linux.
//!
//! One module per concept of the domain; the protocol logic (`handshake`, `headers`, `route`,
//! `connection`) is sans-IO and unit-tested, while `runtime` (io_uring), `listener` and `tunnel`
//! hold the I/O.

pub mod config;
pub mod echo;
pub mod handshake;
pub mod headers;
pub mod route;
