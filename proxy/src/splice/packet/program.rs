//! The loaded `wsplice_packet` tc program: loading it, attaching it to the ingress of the
//! proxy's interfaces (tcx links, detached when the proxy exits), handles on its flows map.

use std::os::fd::OwnedFd;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use wsplice_common::packet::{
    FlowEntry, FlowKey, FLOWS_MAP, FROM_CLIENT, PACKET_PROGRAM, PACKET_STATS_MAP, STAT_FAILED,
    STAT_HELD, STAT_TRANSLATED,
};
use wsplice_common::{ACTIVITY_MAP, BRIDGE_MAP, PAUSED_MAP, PEER_MAP, PRESSURE_MAP};

use crate::splice::{ebpf_object_built, SpliceError, EBPF_OBJECT};

/// The program, attached to every interface it was asked for.
pub struct PacketProgram {
    flows_fd: OwnedFd,
    stats: PerCpuArray<MapData, u64>,
    /// The interfaces it is attached to.
    interfaces: Vec<String>,
    /// Owns the program and its links: dropping it detaches the program.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for PacketProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketProgram")
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

/// The program's counters, summed over the CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketStats {
    /// Packets translated and sent on.
    pub translated: u64,
    /// Packets dropped while their flow was held at a hand-off.
    pub held: u64,
    /// Packets of a spliced flow the program could not translate (dropped; the sender
    /// resends).
    pub failed: u64,
}

impl PacketProgram {
    /// Loads the embedded object's tc program with a flows map for `max_tunnels` tunnels and
    /// attaches it to the ingress of each of `interfaces`. The object's sockmap maps are
    /// loaded at their smallest: this instance does not use them.
    ///
    /// With `pin` (a folder on a bpffs), the flows map and the links are pinned there, so the
    /// flows outlive the process; a map and links already pinned there (a previous process)
    /// are taken over: the map as it is, the links by putting this program in them (the old
    /// one translates until that moment, so no packet finds no program).
    pub fn load(
        max_tunnels: u32,
        interfaces: &[String],
        pin: Option<&std::path::Path>,
    ) -> Result<PacketProgram, SpliceError> {
        if !ebpf_object_built() {
            return Err(SpliceError::NotBuilt);
        }
        let flows = max_tunnels.max(1).saturating_mul(2);
        let mut loader = EbpfLoader::new();
        if let Some(pin) = pin {
            std::fs::create_dir_all(pin).map_err(|error| {
                SpliceError::Pin(format!(
                    "{}: {error} (it must be on a bpffs: mount -t bpf bpf /sys/fs/bpf)",
                    pin.display()
                ))
            })?;
            loader.map_pin_path(FLOWS_MAP, pin.join("flows"));
        }
        let mut ebpf = loader
            .map_max_entries(FLOWS_MAP, flows)
            .map_max_entries(PEER_MAP, 1)
            .map_max_entries(BRIDGE_MAP, 1)
            .map_max_entries(ACTIVITY_MAP, 1)
            .map_max_entries(PAUSED_MAP, 1)
            .map_max_entries(PRESSURE_MAP, page_size())
            .load(EBPF_OBJECT)?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PACKET_PROGRAM)
            .ok_or(SpliceError::Missing("packet program"))?
            .try_into()?;
        program.load()?;
        for interface in interfaces {
            let name = std::ffi::CString::new(interface.as_str())
                .map_err(|_| SpliceError::Missing("an interface name without NUL"))?;
            let Some(pin) = pin else {
                program.attach(name.as_c_str(), TcAttachType::Ingress)?;
                continue;
            };
            let path = pin.join(format!("link-{interface}"));
            match PinnedLink::from_pin(&path) {
                Ok(pinned) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                        .map_err(|error| SpliceError::Program(error.into()))?;
                    program.attach_to_link(link)?;
                }
                Err(_) => {
                    let id = program.attach(name.as_c_str(), TcAttachType::Ingress)?;
                    let link = FdLink::try_from(program.take_link(id)?)
                        .map_err(|error| SpliceError::Program(error.into()))?;
                    link.pin(&path).map_err(|error| {
                        SpliceError::Pin(format!(
                            "the link of {interface} at {}: {error}",
                            path.display()
                        ))
                    })?;
                }
            }
        }
        // The maps are taken only now: the program was loaded with references to them.
        let flows_map = ebpf
            .take_map(FLOWS_MAP)
            .ok_or(SpliceError::Missing("FLOWS map"))?;
        let flows_fd = duplicate(&flows_map)?;
        // Checks the map's types once, so `flows()` cannot fail on them later.
        let _: HashMap<MapData, FlowKey, FlowEntry> = HashMap::try_from(flows_map)?;
        let stats = PerCpuArray::try_from(
            ebpf.take_map(PACKET_STATS_MAP)
                .ok_or(SpliceError::Missing("PACKET_STATS map"))?,
        )?;
        Ok(PacketProgram {
            flows_fd,
            stats,
            interfaces: interfaces.to_vec(),
            _ebpf: ebpf,
        })
    }

    /// The flows in the map now, paired by tunnel: (packets from the client, packets from the
    /// upstream). A process that pinned its flows finds its predecessor's here.
    pub fn tunnels(&self) -> Vec<[(FlowKey, FlowEntry); 2]> {
        let Ok(flows) = self.flows() else {
            return Vec::new();
        };
        let mut tunnels = Vec::new();
        for key in flows.map.keys().flatten() {
            let Some(entry) = flows.get(&key) else {
                continue;
            };
            if entry.flags & FROM_CLIENT == 0 {
                continue;
            }
            let reverse_key = entry.reverse_key();
            if let Some(reverse) = flows.get(&reverse_key) {
                tunnels.push([(key, entry), (reverse_key, reverse)]);
            }
        }
        tunnels
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// A new handle on the flows map (one per worker).
    pub fn flows(&self) -> Result<PacketFlows, SpliceError> {
        let copy = self.flows_fd.try_clone().map_err(SpliceError::Duplicate)?;
        let map = HashMap::try_from(Map::HashMap(MapData::from_fd(copy)?))?;
        Ok(PacketFlows { map })
    }

    /// The program's counters now.
    pub fn stats(&self) -> PacketStats {
        let sum = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        PacketStats {
            translated: sum(STAT_TRANSLATED),
            held: sum(STAT_HELD),
            failed: sum(STAT_FAILED),
        }
    }
}

/// A handle on the flows map through its own descriptor.
pub struct PacketFlows {
    map: HashMap<MapData, FlowKey, FlowEntry>,
}

impl std::fmt::Debug for PacketFlows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketFlows").finish_non_exhaustive()
    }
}

impl PacketFlows {
    /// Inserts or replaces the entry of `key`.
    pub fn insert(&mut self, key: &FlowKey, entry: &FlowEntry) -> Result<(), SpliceError> {
        self.map.insert(key, entry, 0)?;
        Ok(())
    }

    /// The entry of `key`, if there is one.
    pub fn get(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.map.get(key, 0).ok()
    }

    /// Removes the entry of `key`; a missing one is fine.
    pub fn remove(&mut self, key: &FlowKey) {
        let _ = self.map.remove(key);
    }
}

/// A duplicate of a map's descriptor.
fn duplicate(map: &Map) -> Result<OwnedFd, SpliceError> {
    let data = match map {
        Map::HashMap(data) => data,
        _ => return Err(SpliceError::Missing("a hash map")),
    };
    use std::os::fd::AsFd as _;
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(SpliceError::Duplicate)
}

/// The page size (a ring buffer's smallest size).
fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network namespace of its own for the calling thread (so attaching to its loopback
    /// touches nothing of the host's), or `None` when that is not permitted.
    fn private_network() -> Option<()> {
        // SAFETY: unshare affects the calling thread only (CLONE_NEWNET on a thread).
        (unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0).then_some(())
    }

    #[test]
    fn the_program_passes_the_verifier_and_its_map_takes_entries() {
        if !ebpf_object_built() {
            println!("skipped: this test build has no eBPF object (run `cargo xtask test`)");
            return;
        }
        // A thread of its own: the namespace goes with it.
        std::thread::spawn(|| {
            if private_network().is_none() {
                println!("skipped: no permission to make a network namespace");
                return;
            }
            let program = match PacketProgram::load(16, &["lo".to_owned()], None) {
                Ok(program) => program,
                Err(SpliceError::PermissionDenied(reason)) if unsafe { libc::geteuid() } != 0 => {
                    // SAFETY (above): geteuid has no preconditions.
                    println!("skipped: loading eBPF needs root ({reason})");
                    return;
                }
                Err(error) => panic!("{error}"),
            };
            let mut flows = program.flows().expect("a handle");
            let key = FlowKey {
                family: 4,
                sport: 1,
                ..FlowKey::default()
            };
            let entry = FlowEntry {
                seq_next: 7,
                ..FlowEntry::default()
            };
            flows.insert(&key, &entry).expect("insert");
            assert_eq!(flows.get(&key).map(|e| e.seq_next), Some(7));
            flows.remove(&key);
            assert_eq!(flows.get(&key), None);
            assert_eq!(program.stats(), PacketStats::default());
        })
        .join()
        .expect("the test thread");
    }
}
