//! Tunnels: what happens to the bytes once the upgrade is done.
//!
//! `relay` is the userspace data path (TLS tunnels, hosts without eBPF). The kernel path
//! (`splice`) hands plain tunnels to the sockmap program instead. `frames` follows where a
//! relayed stream stands between WebSocket frames, for the drain's goodbye.

pub mod frames;
pub mod relay;
