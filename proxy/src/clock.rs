//! The one clock of the proxy: `CLOCK_MONOTONIC` in nanoseconds.
//!
//! It is the clock the eBPF program stamps activity with (`bpf_ktime_get_ns`), so deadlines computed
//! in userspace and activity recorded in the kernel compare directly.

/// Nanoseconds since an arbitrary fixed point (boot), from `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux, so the
    // call cannot fail (it only fails for an invalid clock id or pointer).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // tv_sec and tv_nsec are never negative for CLOCK_MONOTONIC.
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A `Duration` in nanoseconds, saturating at `u64::MAX` (about 584 years).
pub fn duration_ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} then {b}");
    }
}
