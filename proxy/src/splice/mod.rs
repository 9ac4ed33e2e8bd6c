//! The kernel data path's userspace half: loading the sockmap program and driving its maps.
//!
//! The worker decides *when* to hand a tunnel over (see `runtime`); this module knows *how*:
//! the embedded object, the maps, socket cookies and the receive kick.

mod pressure;
mod program;
#[cfg(test)]
mod tests;

pub use pressure::{eventfd, wake, Mailbox, Owner, PressureWatcher};
pub use program::{
    is_closed, kick, queued_bytes, socket_cookie, SpliceError, SpliceProgram, EBPF_OBJECT,
};
