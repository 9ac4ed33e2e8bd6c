//! Least privilege after start: the proxy needs root (or CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON
//! and CAP_NET_BIND_SERVICE, see deploy/systemd/wsplice.service) only to load the eBPF program,
//! create its maps and bind its ports.
//! Once that is done, and before any thread starts, [`drop_privileges`] switches to the
//! configured `user`/`group`, leaves no supplementary groups, keeps only the capabilities the
//! kernel path still needs, empties the bounding and ambient sets and sets no-new-privs.
//!
//! **Which capabilities are kept, and why.** What the running proxy does with the kernel:
//! `bpf(BPF_MAP_UPDATE_ELEM / LOOKUP_ELEM / DELETE_ELEM)` and `BPF_OBJ_GET_INFO_BY_FD` on map
//! descriptors opened at start, `SO_RCVLOWAT` and other socket options, io_uring. Measured on
//! Linux 6.18 with `kernel.unprivileged_bpf_disabled = 2`: none of these needs a capability
//! (since Linux 6.5 only creating maps and programs checks CAP_BPF; commands on a descriptor
//! the process already holds do not). So nothing is kept. On older kernels every bpf() command
//! checked CAP_BPF when unprivileged BPF is disabled: [`drop_privileges`] does not guess, it
//! tries one map lookup without CAP_BPF and keeps CAP_BPF (in the permitted and effective sets,
//! nothing else) only if the kernel refused it.
//!
//! Capabilities and no-new-privs are per thread in Linux (a new thread copies its creator's),
//! and glibc's `setresuid` is broadcast to every thread: that is why this runs on the main
//! thread before the admin listener, the pressure watcher and the workers start, and refuses
//! to run when another thread already exists.

use std::io;

use crate::config::{Account, RunAs};
use crate::sys::{self, CapabilitySets};

/// `CAP_SETPCAP`: needed to empty the bounding set.
const CAP_SETPCAP: u32 = 8;
/// `CAP_BPF` (Linux 5.8+).
const CAP_BPF: u32 = 39;

fn bit(cap: u32) -> u64 {
    1 << cap
}

/// The account the proxy switches to, resolved from the config's `user` and `group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// As configured (for messages).
    pub user: String,
    /// The user id.
    pub uid: u32,
    /// The group id (`group`, else the user's primary group).
    pub gid: u32,
}

/// Why privileges could not be resolved or dropped. Each stops the start: a proxy that was
/// asked to drop root must not serve as root.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// `user` names no user of this system.
    #[error("user {0} does not exist (config key `user`)")]
    UnknownUser(String),
    /// `group` names no group of this system.
    #[error("group {0} does not exist (config key `group`)")]
    UnknownGroup(String),
    /// A numeric `user` has no entry to take the primary group from.
    #[error("user {0} has no entry in the user database: set `group` as well")]
    NoPrimaryGroup(u32),
    /// `user` is root: nothing would be dropped.
    #[error("user {0} is uid 0: name an unprivileged user, or leave `user` out")]
    Root(String),
    /// The user or group database could not be read.
    #[error("cannot look up {what}: {source}")]
    Lookup {
        /// What was looked up.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Threads already run: they would keep the old credentials.
    #[error("privileges must be dropped before any thread starts, but {0} threads run")]
    Threads(usize),
    /// The process may not switch to the configured user (not started as root, nor as it).
    #[error("cannot switch to user {user} (uid {uid}): {call} refused ({source}); start wsplice as root or as that user")]
    NotPermitted {
        /// As configured.
        user: String,
        /// Its id.
        uid: u32,
        /// The call that failed.
        call: &'static str,
        /// The error (EPERM).
        #[source]
        source: io::Error,
    },
    /// A credential or capability call failed.
    #[error("{call} failed: {source}")]
    Call {
        /// The call.
        call: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The kernel path does not work without root, even with CAP_BPF.
    #[error("the kernel path does not work after dropping privileges: {0}")]
    KernelPath(String),
    /// The drop did not take (a check after it found a privilege left).
    #[error("privileges are not dropped as intended: {0}")]
    NotDropped(String),
}

fn call(call: &'static str) -> impl FnOnce(io::Error) -> PrivilegeError {
    move |source| PrivilegeError::Call { call, source }
}

/// Looks up the configured user and group (names through the system's databases, ids as
/// they are).
pub fn resolve(run_as: &RunAs) -> Result<Identity, PrivilegeError> {
    fn lookup(what: &Account) -> impl FnOnce(io::Error) -> PrivilegeError {
        let what = what.to_string();
        move |source| PrivilegeError::Lookup { what, source }
    }
    let (uid, primary) = match &run_as.user {
        Account::Name(name) => {
            let entry = sys::user_by_name(name)
                .map_err(lookup(&run_as.user))?
                .ok_or_else(|| PrivilegeError::UnknownUser(run_as.user.to_string()))?;
            (entry.uid, Some(entry.gid))
        }
        Account::Id(uid) => {
            let entry = sys::user_by_id(*uid).map_err(lookup(&run_as.user))?;
            (*uid, entry.map(|entry| entry.gid))
        }
    };
    let gid = match &run_as.group {
        Some(group @ Account::Name(name)) => sys::group_by_name(name)
            .map_err(lookup(group))?
            .ok_or_else(|| PrivilegeError::UnknownGroup(group.to_string()))?,
        Some(Account::Id(gid)) => *gid,
        None => primary.ok_or(PrivilegeError::NoPrimaryGroup(uid))?,
    };
    if uid == 0 {
        return Err(PrivilegeError::Root(run_as.user.to_string()));
    }
    Ok(Identity {
        user: run_as.user.to_string(),
        uid,
        gid,
    })
}

/// What [`drop_privileges`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Root without `user`: nothing changed (a warning was logged).
    StillRoot,
    /// Running as `uid`/`gid` with only `kept` (capability bits; 0 on current kernels).
    Dropped {
        /// The user id now.
        uid: u32,
        /// The group id now.
        gid: u32,
        /// The capabilities left, one bit per capability number.
        kept: u64,
    },
}

/// A check that the kernel path works with the capabilities in effect: one harmless bpf()
/// command on a map the process holds (`Err` with `true` when the kernel refused it for lack of
/// privilege).
pub type KernelProbe<'a> = &'a dyn Fn() -> Result<(), (bool, String)>;

/// Drops what the start needed: switches to `identity` (if any), keeps only the capabilities
/// `kernel_path` turns out to need (see the module comment), empties the bounding and ambient
/// sets, sets no-new-privs and checks that root cannot be regained. Without `identity` a
/// process started as root stays root, with a warning; one started as another user (systemd's
/// `User=` with ambient capabilities) drops its capabilities all the same. Must run before
/// any other thread exists.
pub fn drop_privileges(
    identity: Option<&Identity>,
    kernel_path: Option<KernelProbe<'_>>,
) -> Result<Outcome, PrivilegeError> {
    let threads = thread_count().map_err(call("reading /proc/self/status"))?;
    if threads != 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    let (uids, _) = sys::ids();
    match identity {
        None if uids.contains(&0) => {
            tracing::warn!(
                "running as root for the whole life of the process: set `user` (and `group`) \
                 in the config so the proxy drops root once the program is loaded and the \
                 ports are bound"
            );
            return Ok(Outcome::StillRoot);
        }
        // Started unprivileged (e.g. systemd's User= with ambient capabilities).
        None => {}
        // Already that account: a successor started by a proxy that dropped root (binary
        // upgrade) has nothing to switch, and could not (no CAP_SETUID).
        Some(identity) if uids == [identity.uid; 3] && sys::ids().1 == [identity.gid; 3] => {}
        Some(identity) => switch_user(identity)?,
    }
    let kept = drop_capabilities(kernel_path)?;
    sys::set_no_new_privileges().map_err(call("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    verify(identity, kept)?;
    let (uids, gids) = sys::ids();
    Ok(Outcome::Dropped {
        uid: uids[1],
        gid: gids[1],
        kept,
    })
}

/// The capability names of `set` (`"none"` when empty), for logs.
pub fn capability_names(set: u64) -> String {
    let names: Vec<String> = (0..64)
        .filter(|cap| set & bit(*cap) != 0)
        .map(|cap| match cap {
            CAP_BPF => "CAP_BPF".to_owned(),
            CAP_SETPCAP => "CAP_SETPCAP".to_owned(),
            other => format!("capability {other}"),
        })
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// setgroups([]), setresgid, setresuid, with the permitted capabilities kept across the
/// switch (PR_SET_KEEPCAPS) so that [`drop_capabilities`] can still choose what to keep.
fn switch_user(identity: &Identity) -> Result<(), PrivilegeError> {
    let (uids, gids) = sys::ids();
    let groups = sys::supplementary_groups().map_err(call("getgroups"))?;
    if uids == [identity.uid; 3] && gids == [identity.gid; 3] && groups.is_empty() {
        // Already that user (started so by the supervisor).
        return Ok(());
    }
    let refused = |call: &'static str| {
        move |source| PrivilegeError::NotPermitted {
            user: identity.user.clone(),
            uid: identity.uid,
            call,
            source,
        }
    };
    sys::set_keep_capabilities(true).map_err(call("prctl(PR_SET_KEEPCAPS)"))?;
    sys::clear_supplementary_groups().map_err(refused("setgroups"))?;
    sys::set_gid(identity.gid).map_err(refused("setresgid"))?;
    sys::set_uid(identity.uid).map_err(refused("setresuid"))?;
    sys::set_keep_capabilities(false).map_err(call("prctl(PR_SET_KEEPCAPS)"))?;
    Ok(())
}

/// Keeps CAP_BPF only if the kernel path needs it; empties the bounding set (when
/// CAP_SETPCAP allows) and the ambient set. Returns what is kept.
fn drop_capabilities(kernel_path: Option<KernelProbe<'_>>) -> Result<u64, PrivilegeError> {
    let have = sys::capabilities().map_err(call("capget"))?;
    // For now: CAP_BPF permitted but not effective (for the probe), CAP_SETPCAP effective
    // (for the bounding set); everything else goes.
    let interim = have.permitted & (bit(CAP_BPF) | bit(CAP_SETPCAP));
    let set = |effective: u64, permitted: u64| {
        sys::set_capabilities(CapabilitySets {
            effective,
            permitted,
            inheritable: 0,
        })
        .map_err(call("capset"))
    };
    set(interim & bit(CAP_SETPCAP), interim)?;
    let mut keep = 0;
    if let Some(probe) = kernel_path {
        match probe() {
            Ok(()) => {}
            Err((true, _)) if interim & bit(CAP_BPF) != 0 => {
                set(interim, interim)?;
                probe().map_err(|(_, error)| {
                    PrivilegeError::KernelPath(format!("refused even with CAP_BPF: {error}"))
                })?;
                keep = bit(CAP_BPF);
            }
            Err((_, error)) => return Err(PrivilegeError::KernelPath(error)),
        }
    }
    if interim & bit(CAP_SETPCAP) != 0 {
        let last = sys::last_capability().map_err(call("reading cap_last_cap"))?;
        for cap in (0..=last).filter(|cap| keep & bit(*cap) == 0) {
            sys::drop_bounding_capability(cap).map_err(call("prctl(PR_CAPBSET_DROP)"))?;
        }
    }
    sys::clear_ambient_capabilities().map_err(call("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"))?;
    set(keep, keep)?;
    Ok(keep)
}

/// Checks the result from the kernel's side: the ids, the capability sets, and that uid 0
/// cannot be taken back.
fn verify(identity: Option<&Identity>, kept: u64) -> Result<(), PrivilegeError> {
    let (uids, gids) = sys::ids();
    if let Some(identity) = identity {
        if uids != [identity.uid; 3] || gids != [identity.gid; 3] {
            return Err(PrivilegeError::NotDropped(format!(
                "uids {uids:?}, gids {gids:?}"
            )));
        }
    }
    let now = sys::capabilities().map_err(call("capget"))?;
    let wanted = CapabilitySets {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    };
    if now != wanted {
        return Err(PrivilegeError::NotDropped(format!("capabilities {now:?}")));
    }
    if uids.contains(&0) || sys::set_uid(0).is_ok() {
        return Err(PrivilegeError::NotDropped("uid 0 can be taken back".into()));
    }
    Ok(())
}

/// Threads of this process (`Threads:` in `/proc/self/status`).
fn thread_count() -> io::Result<usize> {
    std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_are_readable() {
        assert_eq!(capability_names(0), "none");
        assert_eq!(capability_names(bit(CAP_BPF)), "CAP_BPF");
        assert_eq!(
            capability_names(bit(CAP_SETPCAP) | bit(12)),
            "CAP_SETPCAP, capability 12"
        );
    }

    #[test]
    fn a_missing_user_or_group_is_named() {
        let run_as = |user: Account, group: Option<Account>| RunAs { user, group };
        let error = resolve(&run_as(Account::Name("wsplice-no-such-user".into()), None));
        assert_eq!(
            error.unwrap_err().to_string(),
            "user \"wsplice-no-such-user\" does not exist (config key `user`)"
        );
        let error = resolve(&run_as(
            Account::Id(65534),
            Some(Account::Name("wsplice-no-such-group".into())),
        ));
        assert_eq!(
            error.unwrap_err().to_string(),
            "group \"wsplice-no-such-group\" does not exist (config key `group`)"
        );
        let error = resolve(&run_as(Account::Name("root".into()), None));
        assert!(matches!(error, Err(PrivilegeError::Root(_))), "{error:?}");
    }

    #[test]
    fn numeric_ids_need_no_database_when_the_group_is_given() {
        let identity = resolve(&RunAs {
            user: Account::Id(4_000_000),
            group: Some(Account::Id(4_000_001)),
        })
        .unwrap();
        assert_eq!((identity.uid, identity.gid), (4_000_000, 4_000_001));
        let error = resolve(&RunAs {
            user: Account::Id(4_000_000),
            group: None,
        });
        assert!(
            matches!(error, Err(PrivilegeError::NoPrimaryGroup(4_000_000))),
            "{error:?}"
        );
    }
}
