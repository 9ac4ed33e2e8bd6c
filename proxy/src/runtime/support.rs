//! What this kernel's io_uring offers the workers, checked once at start: the operations they
//! cannot do without (an error naming what is missing), and the features they use when present
//! (one log line naming what is not).

use io_uring::{opcode, IoUring, Probe};

/// The oldest kernel the workers run on: multishot accept (`IORING_ACCEPT_MULTISHOT`) and
/// cancelling every request on a file (`IORING_ASYNC_CANCEL_FD | _ALL`) came in Linux 5.19.
pub const MINIMUM_KERNEL: KernelVersion = KernelVersion {
    major: 5,
    minor: 19,
};

/// The kernel that brought `DEFER_TASKRUN` and `SINGLE_ISSUER`.
const DEFERRED_TASK_RUN_KERNEL: KernelVersion = KernelVersion { major: 6, minor: 1 };

/// A Linux version, as far as features go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    /// The major number.
    pub major: u32,
    /// The minor number.
    pub minor: u32,
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What the workers may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSupport {
    /// Rings may be single-issuer with deferred task work (else plain rings).
    pub deferred_task_run: bool,
}

/// The kernel cannot run the workers.
#[derive(Debug, thiserror::Error)]
pub enum SupportError {
    /// Older than [`MINIMUM_KERNEL`].
    #[error("Linux {found} is too old: wsplice needs {MINIMUM_KERNEL} or later (io_uring multishot accept, cancel by file)")]
    TooOld {
        /// The running kernel.
        found: KernelVersion,
    },
    /// io_uring is missing or disabled (`kernel.io_uring_disabled`, a seccomp filter).
    #[error("io_uring is not available: {0} (is kernel.io_uring_disabled set?)")]
    NoRing(#[source] std::io::Error),
    /// Operations the workers need are not offered.
    #[error("this kernel's io_uring lacks {0}: wsplice needs Linux {MINIMUM_KERNEL} or later")]
    Missing(String),
}

/// The operations every worker submits.
const REQUIRED: [(u8, &str); 9] = [
    (opcode::Accept::CODE, "accept"),
    (opcode::PollAdd::CODE, "poll"),
    (opcode::PollRemove::CODE, "poll remove"),
    (opcode::Send::CODE, "send"),
    (opcode::Recv::CODE, "recv"),
    (opcode::Connect::CODE, "connect"),
    (opcode::Timeout::CODE, "timeout"),
    (opcode::LinkTimeout::CODE, "linked timeout"),
    (opcode::AsyncCancel::CODE, "cancel"),
];

/// Checks the running kernel; logs once what the workers will do without.
pub fn check() -> Result<RingSupport, SupportError> {
    let found = running_kernel();
    if let Some(found) = found.filter(|found| *found < MINIMUM_KERNEL) {
        return Err(SupportError::TooOld { found });
    }
    let ring = IoUring::new(8).map_err(SupportError::NoRing)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(SupportError::NoRing)?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(SupportError::Missing(missing.join(", ")));
    }
    let deferred_task_run = IoUring::<io_uring::squeue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(8)
        .is_ok();
    if !deferred_task_run {
        tracing::info!(
            kernel = %found.map_or_else(|| "unknown".to_owned(), |v| v.to_string()),
            "io_uring without DEFER_TASKRUN and SINGLE_ISSUER (Linux {DEFERRED_TASK_RUN_KERNEL}): \
             completions interrupt the workers as they happen, which costs more CPU under load"
        );
    }
    Ok(RingSupport { deferred_task_run })
}

/// The running kernel's version (`None` if `uname` says something unexpected: then the probe
/// alone decides).
fn running_kernel() -> Option<KernelVersion> {
    // SAFETY: `utsname` is plain old data; `uname` fills it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable `utsname`.
    if unsafe { libc::uname(&mut name) } != 0 {
        return None;
    }
    // SAFETY: `uname` NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) };
    parse_release(release.to_str().ok()?)
}

/// `6.18.44-fc-v1272` → 6.18.
fn parse_release(release: &str) -> Option<KernelVersion> {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit());
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some(KernelVersion { major, minor })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_to_major_and_minor() {
        let v = |major, minor| Some(KernelVersion { major, minor });
        assert_eq!(parse_release("6.18.44-fc-v1272"), v(6, 18));
        assert_eq!(parse_release("5.19.0"), v(5, 19));
        assert_eq!(parse_release("6.1-rc3"), v(6, 1));
        assert_eq!(parse_release("4.9.337-generic"), v(4, 9));
        assert_eq!(parse_release("linux"), None);
        assert_eq!(parse_release("6"), None);
    }

    #[test]
    fn versions_order_numerically() {
        let v = |major, minor| KernelVersion { major, minor };
        assert!(v(5, 18) < MINIMUM_KERNEL);
        assert!(v(5, 19) >= MINIMUM_KERNEL);
        assert!(v(6, 0) > v(5, 19));
        assert!(v(5, 100) < v(6, 0));
    }

    #[test]
    fn an_old_kernel_is_refused_with_what_it_lacks() {
        let error = SupportError::TooOld {
            found: KernelVersion {
                major: 5,
                minor: 15,
            },
        };
        assert_eq!(
            error.to_string(),
            "Linux 5.15 is too old: wsplice needs 5.19 or later (io_uring multishot accept, \
             cancel by file)"
        );
    }

    #[test]
    fn this_kernel_runs_the_workers() {
        // The machines the tests run on are newer than the minimum: the check must say so.
        let support = check().expect("the test machine's kernel runs the workers");
        let found = running_kernel().expect("uname gives a version");
        assert_eq!(support.deferred_task_run, found >= DEFERRED_TASK_RUN_KERNEL);
    }
}
