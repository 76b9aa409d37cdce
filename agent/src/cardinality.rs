//! The hard cap on owner label sets (`Series`). Every per-owner metric asks
//! the budget before creating a series: known series and new ones below the
//! limit pass; beyond it the observation is folded into one overflow series,
//! and counted. Series nobody updated for the idle expiry are forgotten, so a
//! node that churns through pods keeps room for the live ones.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::metrics::Series;

pub struct SeriesBudget {
    last_seen: HashMap<Series, Instant>,
    limit: usize,
    idle_expiry: Duration,
    /// Observations folded into the overflow series.
    pub overflowed: u64,
    /// Series forgotten after being idle.
    pub expired: u64,
}

impl SeriesBudget {
    pub fn new(limit: usize, idle_expiry: Duration) -> SeriesBudget {
        SeriesBudget {
            last_seen: HashMap::new(),
            limit,
            idle_expiry,
            overflowed: 0,
            expired: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Series currently admitted (the overflow series not included).
    pub fn active(&self) -> usize {
        self.last_seen.len()
    }

    /// The series to record `s` under: itself, or the overflow series.
    pub fn admit(&mut self, s: Series, now: Instant) -> Series {
        if let Some(seen) = self.last_seen.get_mut(&s) {
            *seen = now;
            return s;
        }
        if self.last_seen.len() < self.limit {
            self.last_seen.insert(s.clone(), now);
            return s;
        }
        self.overflowed += 1;
        Series::overflow()
    }

    /// Forgets series idle for longer than the expiry; returns them so their
    /// samples can be dropped too.
    pub fn expire(&mut self, now: Instant) -> Vec<Series> {
        let expiry = self.idle_expiry;
        let idle: Vec<Series> = self
            .last_seen
            .iter()
            .filter(|(_, &seen)| now.saturating_duration_since(seen) > expiry)
            .map(|(s, _)| s.clone())
            .collect();
        for s in &idle {
            self.last_seen.remove(s);
        }
        self.expired += idle.len() as u64;
        idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::Identity;

    fn series(i: u32) -> Series {
        Series::of(
            i,
            &Identity {
                pid: None,
                comm: Some(format!("p{i}")),
                cgroup: None,
                pod: None,
            },
        )
    }

    #[test]
    fn caps_then_overflows_then_expires() {
        let t0 = Instant::now();
        let mut b = SeriesBudget::new(2, Duration::from_secs(60));
        assert_eq!(b.admit(series(1), t0), series(1));
        assert_eq!(b.admit(series(2), t0), series(2));
        assert_eq!(b.admit(series(3), t0), Series::overflow());
        assert_eq!(b.admit(series(1), t0), series(1), "known series pass");
        assert_eq!((b.active(), b.overflowed), (2, 1));
        // Series 2 stays busy; series 1 goes idle and is forgotten.
        let t1 = t0 + Duration::from_secs(50);
        b.admit(series(2), t1);
        let t2 = t0 + Duration::from_secs(90);
        assert_eq!(b.expire(t2), vec![series(1)]);
        assert_eq!(b.admit(series(3), t2), series(3), "room again");
        assert_eq!((b.active(), b.expired), (2, 1));
    }
}
