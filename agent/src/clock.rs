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

/// CLOCK_MONOTONIC now: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME now, in nanoseconds since the Unix epoch.
pub fn unix_now_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
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

/// `unix_ns` as RFC 3339 UTC with milliseconds (for people reading the CLI).
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let millis = unix_ns / 1_000_000 % 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod rfc3339_tests {
    #[test]
    fn formats_known_instants() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        // 2026-11-22T10:45:18.250Z
        assert_eq!(
            super::rfc3339(1_795_344_318_250_000_000),
            "2026-11-22T10:45:18.250Z"
        );
        assert_eq!(
            super::rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
