//! An adaptive concurrency limit for a service, gradient style (as Netflix's
//! concurrency-limits Gradient2): the limit follows the ratio of the
//! service's long-run latency to its latency now. When requests slow down
//! because too many run at once, the ratio falls below one and the limit
//! shrinks; when latency is at its usual level the limit grows by about its
//! square root (the queue the service may hold) — unlike Gradient2, no
//! headroom is added while latency is beyond tolerance, so an inflated
//! service sheds concurrency sooner. A service using far less
//! than its limit gives no evidence for a larger one, so the limit then
//! holds.

use super::pools::Bounds;

/// Latency up to this multiple of the long-run latency is tolerated.
const TOLERANCE: f64 = 1.5;
/// Weight of the newest period in the long-run latency, and in the limit.
const LONG_ALPHA: f64 = 0.05;
const SMOOTHING: f64 = 0.2;

pub struct ConcurrencyLimit {
    bounds: Bounds,
    limit: f64,
    long_ms: Option<f64>,
}

impl ConcurrencyLimit {
    pub fn new(bounds: Bounds, current: u32) -> ConcurrencyLimit {
        ConcurrencyLimit {
            bounds,
            limit: f64::from(bounds.clamp(current)),
            long_ms: None,
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit.round() as u32
    }

    /// One period's median latency and requests in flight: the new limit and
    /// why, when it moved by at least one.
    pub fn step(&mut self, latency_p50_ms: f64, in_flight: u32) -> Option<(u32, String)> {
        if !latency_p50_ms.is_finite() || latency_p50_ms <= 0.0 {
            return None;
        }
        let long = self.long_ms.map_or(latency_p50_ms, |l| {
            let l = l * (1.0 - LONG_ALPHA) + latency_p50_ms * LONG_ALPHA;
            // After a lasting change the long run follows faster.
            if l / latency_p50_ms > 2.0 {
                l * 0.95
            } else {
                l
            }
        });
        self.long_ms = Some(long);
        let before = self.limit();
        let gradient = (TOLERANCE * long / latency_p50_ms).clamp(0.5, 1.0);
        // Headroom (a queue of about the limit's square root) only while
        // latency is within tolerance: an inflated service gets none.
        let queue = if gradient >= 1.0 {
            self.limit.sqrt()
        } else {
            0.0
        };
        let mut next = self.limit * gradient + queue;
        if f64::from(in_flight) < self.limit / 2.0 && next > self.limit {
            next = self.limit;
        }
        let next = self.limit * (1.0 - SMOOTHING) + next * SMOOTHING;
        self.limit = next.clamp(f64::from(self.bounds.min), f64::from(self.bounds.max));
        let after = self.limit();
        (after != before).then(|| {
            (
                after,
                format!(
                    "median latency {latency_p50_ms:.1} ms against {long:.1} ms long-run (gradient {gradient:.2}), {in_flight} in flight"
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_latency_holds_and_shrinks_when_it_climbs() {
        let mut c = ConcurrencyLimit::new(Bounds { min: 4, max: 200 }, 20);
        for _ in 0..30 {
            c.step(10.0, c.limit());
        }
        let grown = c.limit();
        assert!(grown > 40, "{grown}");
        // Latency triples: the gradient is 0.5 and the limit falls, by a
        // third within ten periods (smoothed), each period lower.
        let mut last = grown;
        for _ in 0..10 {
            c.step(30.0, c.limit());
            assert!(c.limit() < last, "{} after {last}", c.limit());
            last = c.limit();
        }
        assert!(c.limit() * 3 <= grown * 2, "{} vs {grown}", c.limit());
        assert!(c.limit() >= 4);
    }

    #[test]
    fn holds_when_the_service_uses_little_of_it_and_stays_in_bounds() {
        let mut c = ConcurrencyLimit::new(Bounds { min: 4, max: 50 }, 20);
        for _ in 0..20 {
            assert_eq!(c.step(10.0, 3), None);
        }
        for _ in 0..200 {
            c.step(1.0, 1000);
            assert!((4..=50).contains(&c.limit()));
        }
        assert_eq!(c.limit(), 50);
        assert_eq!(c.step(f64::NAN, 10), None);
        assert_eq!(c.step(-1.0, 10), None);
    }
}
