//! Kernel timestamps (CLOCK_MONOTONIC, bpf_ktime_get_ns) to wall-clock time.

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The offset between the two clocks, sampled once; good to the accuracy of
/// NTP slews over the agent's lifetime, which is what log timestamps need.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicToWall {
    offset_ns: i128,
}

impl MonotonicToWall {
    pub fn now() -> MonotonicToWall {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let wall = clock_ns(libc::CLOCK_REALTIME);
        MonotonicToWall {
            offset_ns: i128::from(wall) - i128::from(mono),
        }
    }

    pub fn to_unix_ns(&self, monotonic_ns: u64) -> u64 {
        u64::try_from(i128::from(monotonic_ns) + self.offset_ns).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_now_to_now() {
        let c = MonotonicToWall::now();
        let wall = c.to_unix_ns(clock_ns(libc::CLOCK_MONOTONIC));
        let real = clock_ns(libc::CLOCK_REALTIME);
        assert!(
            real.abs_diff(wall) < 1_000_000_000,
            "within a second: {real} vs {wall}"
        );
    }
}
