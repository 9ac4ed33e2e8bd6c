//! The kernel data path's userspace half: loading the sockmap program, per-worker handles on
//! its maps, and the pressure reports.
//!
//! The connection lifecycle decides *when* to hand a tunnel over (`connection`); the worker
//! carries it out (`runtime/splice.rs`); this module knows the program and its maps.

mod maps;
pub mod packet;
mod pressure;
mod program;
#[cfg(test)]
mod tests;

pub use maps::SpliceMaps;
pub use pressure::{AdoptedOwners, Mailbox, PressureWatcher};
pub use program::{ebpf_object_built, object_hash, SpliceError, SpliceProgram, EBPF_OBJECT};
