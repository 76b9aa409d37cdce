//! Durations observed over one control period, summarised as mean and
//! quantiles (the pool's wait times, the origin's request latencies).

use std::time::Duration;

use rand::Rng;

/// Samples kept per period for quantiles; beyond them a uniform random
/// subset is kept (reservoir sampling), so memory stays bounded under any
/// load while the mean stays exact.
pub const MAX_SAMPLES_PER_PERIOD: usize = 16 * 1024;

#[derive(Debug, Clone, Default)]
pub struct Samples {
    /// Milliseconds, a uniform subset of everything recorded.
    kept: Vec<f64>,
    count: u64,
    sum_ms: f64,
}

impl Samples {
    pub fn record(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        self.count += 1;
        self.sum_ms += ms;
        if self.kept.len() < MAX_SAMPLES_PER_PERIOD {
            self.kept.push(ms);
        } else {
            // Algorithm R: the new sample replaces a kept one with probability kept/count.
            let slot = rand::rng().random_range(0..self.count);
            if let Ok(slot) = usize::try_from(slot) {
                if let Some(s) = self.kept.get_mut(slot) {
                    *s = ms;
                }
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean in milliseconds; 0 without samples.
    pub fn mean_ms(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ms / self.count as f64
        }
    }

    /// Nearest-rank quantile `q` (0..=1) in milliseconds; 0 without samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.kept.is_empty() {
            return 0.0;
        }
        let mut sorted = self.kept.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    /// The period's samples, leaving an empty set for the next period.
    pub fn take(&mut self) -> Samples {
        std::mem::take(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_nearest_rank_quantiles() {
        let mut s = Samples::default();
        assert_eq!((s.mean_ms(), s.quantile_ms(0.99)), (0.0, 0.0));
        for ms in 1..=100 {
            s.record(Duration::from_millis(ms));
        }
        assert_eq!(s.count(), 100);
        assert!((s.mean_ms() - 50.5).abs() < 1e-9);
        assert!((s.quantile_ms(0.5) - 50.0).abs() < 1e-9);
        assert!((s.quantile_ms(0.99) - 99.0).abs() < 1e-9);
        assert!((s.quantile_ms(1.0) - 100.0).abs() < 1e-9);
        let taken = s.take();
        assert_eq!((taken.count(), s.count()), (100, 0));
    }

    #[test]
    fn memory_stays_bounded_and_mean_exact() {
        let mut s = Samples::default();
        let n = MAX_SAMPLES_PER_PERIOD as u64 * 3;
        for _ in 0..n {
            s.record(Duration::from_millis(2));
        }
        assert_eq!(s.kept.len(), MAX_SAMPLES_PER_PERIOD);
        assert_eq!(s.count(), n);
        assert!((s.mean_ms() - 2.0).abs() < 1e-9);
        assert!((s.quantile_ms(0.99) - 2.0).abs() < 1e-9);
    }
}
