//! Tunnels: what happens to the bytes once the upgrade is done.
//!
//! `relay` is the userspace data path (TLS tunnels, hosts without eBPF). The kernel path
//! (`splice`) hands plain tunnels to the sockmap program instead.

pub mod relay;
