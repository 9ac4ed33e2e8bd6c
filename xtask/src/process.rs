//! Child processes the tasks start: stopped by PID, politely first.

use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How long a child gets between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);

/// How often waiting loops look at their children and the signal flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Sends SIGTERM to `child`, waits up to `grace` for it to exit, then SIGKILLs it. Returns how
/// it ended (`None` if even waiting failed, e.g. it was already reaped).
pub fn stop(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet (try_wait
        // above returned None), so the PID cannot belong to another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(POLL_INTERVAL),
            Err(_) => return None,
        }
    }
    eprintln!(
        "xtask: process {} ignored SIGTERM for {} s, killing it",
        child.id(),
        grace.as_secs()
    );
    // Child::kill sends SIGKILL to this child's PID.
    let _ = child.kill();
    child.wait().ok()
}

/// The termination signal received since `catch_termination`, or 0.
static TERMINATION: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember_signal(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    TERMINATION.store(signal, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM no longer kill this process: they are recorded, and
/// `termination_requested` reports them, so the caller can stop its children first.
pub fn catch_termination() -> std::io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic, which is
        // async-signal-safe; `sigaction` gets valid pointers.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = remember_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal (SIGINT or SIGTERM) received since `catch_termination`, if any.
pub fn termination_requested() -> Option<libc::c_int> {
    match TERMINATION.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// The exit code a shell would report for `status`: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt as _;
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    // Exit codes are 0..=255; anything else (impossible on Linux) reads as a failure.
    u8::try_from(code).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn stop_ends_a_child_with_sigterm() {
        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let started = Instant::now();
        let status = stop(&mut child, GRACE).expect("status");
        assert!(started.elapsed() < GRACE, "it waited for SIGKILL");
        assert_eq!(exit_code(status), 128 + libc::SIGTERM as u8);
    }

    #[test]
    fn stop_kills_a_child_that_ignores_sigterm() {
        let mut child = Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; sleep 30"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        // Wait until the trap is installed before signalling.
        let mut ready = [0u8; 6];
        std::io::Read::read_exact(child.stdout.as_mut().expect("piped stdout"), &mut ready)
            .expect("read ready");
        let status = stop(&mut child, Duration::from_millis(300)).expect("status");
        assert_eq!(exit_code(status), 128 + libc::SIGKILL as u8);
    }

    #[test]
    fn stop_reports_a_child_that_already_exited() {
        let mut child = Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .expect("spawn sh");
        child.wait().expect("wait for sh");
        // Already reaped: no signal goes to a PID that may have been reused.
        let status = stop(&mut child, GRACE).expect("status");
        assert_eq!(exit_code(status), 3);
    }
}
