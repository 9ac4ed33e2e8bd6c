//! What the kernel holds for a process, seen from outside it: the eBPF maps it has open
//! (`/proc/PID/fdinfo`), their names and how many entries each holds right now, walked with the
//! `bpf` syscall (root only). The proxy's own metrics never walk its maps; tests check them
//! against this.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};

/// One map the process holds (several descriptors of one map count once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldMap {
    /// `bpf_map_info.name`.
    pub name: String,
    /// `BPF_MAP_TYPE_*`.
    pub kind: u32,
    /// `memlock` from fdinfo: kernel memory charged to the map.
    pub memlock: u64,
    /// Entries now (`None` for maps without keys, such as ring buffers).
    pub entries: Option<usize>,
}

/// `BPF_MAP_GET_NEXT_KEY`, `BPF_MAP_GET_FD_BY_ID`, `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Bytes of `union bpf_attr` passed (zero beyond the fields used, as the kernel requires).
const ATTR_SIZE: usize = 128;

/// The maps `pid` holds, by id.
pub fn held_maps(pid: u32) -> BTreeMap<u32, HeldMap> {
    let mut maps = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return maps;
    };
    for entry in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(kind), Some(memlock)) =
            (field("map_id:"), field("map_type:"), field("memlock:"))
        else {
            continue;
        };
        let id = id as u32;
        if maps.contains_key(&id) {
            continue;
        }
        let (name, entries) = match open_map(id) {
            Ok(fd) => (map_name(&fd).unwrap_or_default(), count_keys(&fd).ok()),
            Err(_) => (String::new(), None),
        };
        maps.insert(
            id,
            HeldMap {
                name,
                kind: kind as u32,
                memlock,
                entries,
            },
        );
    }
    maps
}

/// Entries of each named map `pid` holds (maps of the same name are summed).
pub fn map_entries(pid: u32) -> BTreeMap<String, usize> {
    let mut by_name = BTreeMap::new();
    for map in held_maps(pid).into_values() {
        if let Some(entries) = map.entries {
            *by_name.entry(map.name).or_insert(0) += entries;
        }
    }
    by_name
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr of ATTR_SIZE bytes with the command's fields set; the
    // pointers inside it (if any) point at live buffers of the sizes the kernel expects.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            ATTR_SIZE as libc::c_uint,
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn open_map(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr)? as RawFd;
    // SAFETY: a fresh descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `bpf_map_info`: type, id, key_size, value_size, max_entries, map_flags (u32 each), name[16].
fn map_info(fd: &OwnedFd) -> io::Result<[u8; 256]> {
    use std::os::fd::AsRawFd as _;
    let mut info = [0u8; 256];
    let mut attr = [0u8; ATTR_SIZE];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

fn map_name(fd: &OwnedFd) -> io::Result<String> {
    let info = map_info(fd)?;
    let name = &info[24..40];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// Walks the map's keys (`BPF_MAP_GET_NEXT_KEY` from no key until `ENOENT`).
fn count_keys(fd: &OwnedFd) -> io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let info = map_info(fd)?;
    let key_size = u32::from_ne_bytes([info[8], info[9], info[10], info[11]]) as usize;
    if key_size == 0 {
        return Err(io::Error::other("a map without keys"));
    }
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut count = 0;
    loop {
        let mut attr = [0u8; ATTR_SIZE];
        attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
        // The first call passes no key: the walk starts at the first entry.
        let key_pointer = if count == 0 { 0 } else { key.as_ptr() as u64 };
        attr[8..16].copy_from_slice(&key_pointer.to_ne_bytes());
        attr[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                count += 1;
                key.copy_from_slice(&next);
            }
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(count),
            Err(error) => return Err(error),
        }
    }
}
