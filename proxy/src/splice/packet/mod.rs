//! The packet splice's userspace half: a tunnel handed to the `wsplice_packet` tc program
//! keeps no socket in the proxy. At a quiet point the proxy reads where both of its sockets
//! stand (`TCP_REPAIR`), fills one flow entry per direction, and closes both sockets without a
//! FIN or a reset; from then on the program rewrites each end's packets into the other
//! connection's. See ARCHITECTURE.md, "Packet splice".

pub mod ports;
pub mod program;
pub mod reset;
pub mod route;
pub mod socket_state;
pub mod translation;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use socket_state::Ineligible;
use wsplice_common::packet::{FlowEntry, FlowKey};

/// Why tunnels did not take the packet splice, counted by reason
/// (`wsplice_packet_refusals_total{reason}`).
#[derive(Debug, Default)]
pub struct Refusals {
    counts: [AtomicU64; REFUSAL_LABELS.len()],
}

/// The reasons, as metric labels: those of [`Ineligible::label`], then the hand-off's own.
pub const REFUSAL_LABELS: [&str; 10] = [
    "no_timestamps",
    "no_sack",
    "no_window_scaling",
    "mss",
    "family",
    "not_established",
    "urgent",
    "not_quiet",
    "busy",
    "failed",
];

impl Refusals {
    /// Counts one refusal for `label` (an unknown label counts as "failed").
    pub fn count(&self, label: &str) {
        let index = REFUSAL_LABELS
            .iter()
            .position(|known| *known == label)
            .unwrap_or(REFUSAL_LABELS.len() - 1);
        self.counts[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals counted for `label`.
    pub fn get(&self, label: &str) -> u64 {
        REFUSAL_LABELS
            .iter()
            .position(|known| *known == label)
            .map_or(0, |index| self.counts[index].load(Ordering::Relaxed))
    }

    /// Appends the counter in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let name = "wsplice_packet_refusals_total";
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP {name} Tunnels the packet splice refused, by reason (they stay on the userspace relay)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (label, count) in REFUSAL_LABELS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{label}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
    }
}

/// The packet splice as the workers share it: the program, the local ports upstream
/// connections take, and how long a finished flow lingers.
#[derive(Debug)]
pub struct PacketPath {
    /// The loaded and attached program.
    pub program: program::PacketProgram,
    /// Local ports for upstream connections that may be packet-spliced.
    pub ports: ports::SharedPorts,
    /// How long a flow stays after both FINs were acknowledged or a reset passed (late
    /// retransmissions still find it, as TIME_WAIT would), in nanoseconds.
    pub linger_ns: u64,
    /// The flows outlive the process (`[packet] pin`): the drain leaves them to the next one.
    pub pinned: bool,
    /// Tunnels a previous process left in the pinned map, for the first worker to adopt.
    pub adopted: std::sync::Mutex<Vec<[(FlowKey, FlowEntry); 2]>>,
}

/// Shared by the workers.
pub type SharedPacketPath = Arc<PacketPath>;
