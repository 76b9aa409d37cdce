//! How big a service's connection pool toward one upstream should be.
//!
//! Two laws on the same inputs, so they can be compared on one episode
//! (BENCHMARKS.md, pool controllers):
//!
//! - `classic`: the rules video teams run today. Over a 10 s window, mean
//!   wait above 50 ms grows max idle by 20%; more than 70% of the pool idle
//!   shrinks it by 15%. Blind to why the wait grew.
//! - `kernel`: sizes the pool by Little's law (connections needed = request
//!   rate x time each request holds one, plus headroom) every period, and
//!   reads the kernel's view of the pool's connections toward that upstream
//!   (retransmits, smoothed RTT against its own baseline) to tell a sick
//!   network from a calm one: it grows at once when requests hold
//!   connections longer, and shrinks only after the network has been calm
//!   for a while, so a lossy link does not make the pool churn.
//!
//! Both are bounded: each step at most doubles or takes a quarter off, and
//! the result always lies within the pool's bounds.

use std::{collections::HashMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// `actuation.pool_controller`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PoolLaw {
    Classic,
    Kernel,
}

impl PoolLaw {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolLaw::Classic => "classic",
            PoolLaw::Kernel => "kernel",
        }
    }
}

/// Inclusive bounds (validated: min <= max).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

impl Bounds {
    pub fn clamp(self, v: u32) -> u32 {
        v.clamp(self.min, self.max)
    }
}

/// What the service declared about one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    /// The upstream as the service dials it.
    pub upstream: String,
    pub idle: Bounds,
    /// None: no advice on max open.
    pub open: Option<Bounds>,
}

/// The service's report for one period.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolLoad {
    pub period_s: f64,
    pub in_use: u32,
    pub idle: u32,
    pub wait_mean_ms: f64,
    pub wait_p99_ms: f64,
    pub requests: u64,
    pub errors: u64,
    pub hold_mean_ms: f64,
}

/// The kernel's view of the pool's connections toward its upstream, over
/// the same period (None when the upstream is not an address, or the
/// sampler sees no connection of the workload to it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Network {
    pub connections: usize,
    /// Median smoothed RTT of those connections.
    pub srtt_us: u32,
    /// Segments they retransmitted in the period.
    pub retransmits: u64,
}

/// A new setting and why.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolChange {
    pub max_idle: u32,
    pub max_open: u32,
    pub reason: String,
}

/// Classic rules: window and thresholds as teams write them.
const CLASSIC_WINDOW_S: f64 = 10.0;
const CLASSIC_WAIT_MS: f64 = 50.0;
const CLASSIC_IDLE_SHARE: f64 = 0.7;
/// Little's law headroom: 25% above the mean need absorbs its variance.
const HEADROOM: f64 = 1.25;
/// RTT this many times its baseline, or this many retransmitted segments per
/// request, is a sick network.
const RTT_INFLATION: f64 = 1.5;
const RETRANSMITS_PER_REQUEST: f64 = 0.005;
/// Calm periods before the kernel law shrinks a pool (hysteresis).
const CALM_PERIODS: u32 = 5;
/// Shrink only when the need is this far below the setting (dead band).
const SHRINK_BELOW: f64 = 0.7;

pub struct PoolController {
    law: PoolLaw,
    spec: PoolSpec,
    max_idle: u32,
    max_open: u32,
    /// Classic: the reports of the window so far.
    window: Vec<PoolLoad>,
    /// Kernel: the least RTT seen while calm, and calm periods in a row.
    baseline_srtt_us: Option<u32>,
    calm: u32,
}

impl PoolController {
    /// Starts from the service's current settings, clamped to its bounds.
    pub fn new(law: PoolLaw, spec: PoolSpec, max_idle: u32, max_open: u32) -> PoolController {
        PoolController {
            law,
            max_idle: spec.idle.clamp(max_idle),
            max_open: spec.open.map_or(max_open, |b| b.clamp(max_open)),
            spec,
            window: Vec::new(),
            baseline_srtt_us: None,
            calm: 0,
        }
    }

    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// (max idle, max open) in force.
    pub fn setting(&self) -> (u32, u32) {
        (self.max_idle, self.max_open)
    }

    /// One control period: a change, or None to keep the setting.
    pub fn step(&mut self, load: &PoolLoad, network: Option<&Network>) -> Option<PoolChange> {
        let (idle, reason) = match self.law {
            PoolLaw::Classic => self.classic(load)?,
            PoolLaw::Kernel => self.kernel(load, network)?,
        };
        let idle = self.bounded_step(idle);
        let open = self.open_for(idle);
        if (idle, open) == (self.max_idle, self.max_open) {
            return None;
        }
        self.max_idle = idle;
        self.max_open = open;
        Some(PoolChange {
            max_idle: idle,
            max_open: open,
            reason,
        })
    }

    /// At most double, at most a quarter off, at least one, within bounds.
    fn bounded_step(&self, wanted: u32) -> u32 {
        let now = self.max_idle.max(1);
        let lo = now - now / 4;
        let hi = now.saturating_mul(2);
        self.spec.idle.clamp(wanted.clamp(lo.min(now), hi))
    }

    /// Max open follows max idle with room for bursts (twice), within its
    /// bounds; unchanged when the service asked for no advice on it.
    fn open_for(&self, idle: u32) -> u32 {
        match self.spec.open {
            Some(b) => b.clamp(idle.saturating_mul(2)).max(idle.min(b.max)),
            None => self.max_open,
        }
    }

    fn classic(&mut self, load: &PoolLoad) -> Option<(u32, String)> {
        self.window.push(*load);
        let span: f64 = self.window.iter().map(|l| l.period_s).sum();
        if span + 1e-9 < CLASSIC_WINDOW_S {
            return None;
        }
        let n = self.window.len() as f64;
        let wait = self.window.iter().map(|l| l.wait_mean_ms).sum::<f64>() / n;
        let idle_share = self
            .window
            .iter()
            .map(|l| {
                let total = l.idle + l.in_use;
                if total == 0 {
                    0.0
                } else {
                    f64::from(l.idle) / f64::from(total)
                }
            })
            .sum::<f64>()
            / n;
        self.window.clear();
        let now = self.max_idle.max(1);
        if wait > CLASSIC_WAIT_MS {
            let up = (now.saturating_mul(6).div_ceil(5)).max(now + 1);
            Some((
                up,
                format!("mean wait {wait:.0} ms over 10 s is above 50 ms: +20%"),
            ))
        } else if idle_share > CLASSIC_IDLE_SHARE {
            let down = now.saturating_mul(17) / 20;
            Some((
                down,
                format!(
                    "{:.0}% of the pool idle over 10 s is above 70%: -15%",
                    idle_share * 100.0
                ),
            ))
        } else {
            None
        }
    }

    fn kernel(&mut self, load: &PoolLoad, network: Option<&Network>) -> Option<(u32, String)> {
        if load.period_s <= 0.0 {
            return None;
        }
        let rate = load.requests as f64 / load.period_s;
        let need = (rate * load.hold_mean_ms / 1000.0 * HEADROOM).ceil() as u32;
        let sick = network.and_then(|n| self.sickness(n, load.requests));
        match &sick {
            Some(_) => self.calm = 0,
            None => self.calm = self.calm.saturating_add(1),
        }
        let waiting = load.wait_p99_ms > 0.0 && load.in_use >= self.max_idle;
        let cause = match &sick {
            Some(why) => format!("; {why}"),
            None if network.is_some() => "; network toward the upstream calm".to_owned(),
            None => String::new(),
        };
        let now = self.max_idle;
        if need > now || (waiting && sick.is_some()) {
            let grow = need.max(now + u32::from(waiting));
            return Some((
                grow,
                format!(
                    "{rate:.0} requests/s holding a connection {:.0} ms each need {need}{cause}",
                    load.hold_mean_ms
                ),
            ));
        }
        let shrink = f64::from(need) < f64::from(now) * SHRINK_BELOW;
        if shrink && self.calm >= CALM_PERIODS {
            return Some((
                need,
                format!(
                    "{rate:.0} requests/s holding a connection {:.0} ms each need {need}, calm for {} periods",
                    load.hold_mean_ms, self.calm
                ),
            ));
        }
        None
    }

    /// Why the network toward the upstream is sick, if it is; learns its
    /// calm RTT baseline otherwise.
    fn sickness(&mut self, n: &Network, requests: u64) -> Option<String> {
        if n.connections == 0 {
            return None;
        }
        let per_request = n.retransmits as f64 / requests.max(1) as f64;
        let inflation = self
            .baseline_srtt_us
            .map(|b| f64::from(n.srtt_us) / f64::from(b.max(1)));
        if per_request > RETRANSMITS_PER_REQUEST {
            return Some(format!(
                "{} segments retransmitted toward the upstream ({per_request:.2} per request)",
                n.retransmits
            ));
        }
        if let Some(x) = inflation.filter(|x| *x > RTT_INFLATION) {
            return Some(format!(
                "upstream RTT {:.1} ms is {x:.1}x its baseline",
                f64::from(n.srtt_us) / 1000.0
            ));
        }
        // Calm: the baseline is the least RTT seen, drifting up slowly so a
        // moved upstream is learned within minutes.
        let b = self.baseline_srtt_us.unwrap_or(n.srtt_us);
        self.baseline_srtt_us = Some(if n.srtt_us <= b {
            n.srtt_us
        } else {
            b + (n.srtt_us - b) / 64
        });
        None
    }
}

/// A connection: (network namespace, local, remote).
pub type ConnectionKey = (u32, SocketAddr, SocketAddr);

/// Per-connection retransmit counts seen at the previous sample, so a
/// period's retransmits are a difference even as connections come and go.
#[derive(Default)]
pub struct RetransmitLedger {
    seen: HashMap<ConnectionKey, u32>,
}

impl RetransmitLedger {
    /// The retransmits since the previous call of the connections given as
    /// (connection, total_retrans); a connection seen for the first time
    /// counts whole (it opened in the period, as a fresh pool connection does).
    pub fn delta(&mut self, connections: impl Iterator<Item = (ConnectionKey, u32)>) -> u64 {
        let mut next = HashMap::new();
        let mut sum = 0u64;
        for (cookie, total) in connections {
            let before = self.seen.get(&cookie).copied().unwrap_or(0);
            sum += u64::from(total.saturating_sub(before));
            next.insert(cookie, total);
        }
        self.seen = next;
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(open: bool) -> PoolSpec {
        PoolSpec {
            name: "upstream".into(),
            upstream: "198.18.0.2:8080".into(),
            idle: Bounds { min: 2, max: 64 },
            open: open.then_some(Bounds { min: 4, max: 100 }),
        }
    }

    fn load(rate: u64, hold_ms: f64, in_use: u32, wait_ms: f64) -> PoolLoad {
        PoolLoad {
            period_s: 1.0,
            in_use,
            idle: 0,
            wait_mean_ms: wait_ms,
            wait_p99_ms: wait_ms * 2.0,
            requests: rate,
            errors: 0,
            hold_mean_ms: hold_ms,
        }
    }

    fn net(srtt_us: u32, retransmits: u64) -> Network {
        Network {
            connections: 4,
            srtt_us,
            retransmits,
        }
    }

    #[test]
    fn kernel_law_grows_at_once_and_shrinks_only_after_calm() {
        let mut c = PoolController::new(PoolLaw::Kernel, spec(true), 4, 8);
        // Calm: 100 req/s x 20 ms = 2 connections, 2.5 with headroom -> 3;
        // below 70% of 4, but the calm streak is too short yet.
        for _ in 0..3 {
            assert_eq!(c.step(&load(100, 20.0, 2, 0.0), Some(&net(1000, 0))), None);
        }
        // Onset: requests hold connections 250 ms (retransmits) -> need 32;
        // one step doubles at most: 8, then 16, then 32.
        let sick = load(100, 250.0, 4, 40.0);
        let first = c
            .step(&sick, Some(&net(1100, 30)))
            .expect("grows in the first period");
        assert_eq!((first.max_idle, first.max_open), (8, 16));
        assert!(first.reason.contains("retransmitted"), "{}", first.reason);
        let second = c.step(&sick, Some(&net(1100, 30))).expect("grows again");
        assert_eq!(second.max_idle, 16);
        assert_eq!(
            c.step(&sick, Some(&net(1100, 30))).map(|x| x.max_idle),
            Some(32)
        );
        // Recovery: the need is back to 3, but no shrink for CALM_PERIODS-1.
        let calm = load(100, 20.0, 3, 0.0);
        for _ in 1..CALM_PERIODS {
            assert_eq!(c.step(&calm, Some(&net(1000, 0))), None);
        }
        // Then a quarter off per period, down to the need.
        let mut sizes = vec![];
        while let Some(x) = c.step(&calm, Some(&net(1000, 0))) {
            assert!(x.reason.contains("calm"), "{}", x.reason);
            sizes.push(x.max_idle);
        }
        assert_eq!(sizes, vec![24, 18, 14, 11, 9, 7, 6, 5, 4]);
        // 3 is needed, but 4 x 0.7 < 3 is false: the dead band holds 4.
        assert_eq!(c.setting(), (4, 8));
    }

    #[test]
    fn rtt_inflation_is_measured_against_the_calm_baseline() {
        let mut c = PoolController::new(PoolLaw::Kernel, spec(false), 8, 0);
        for _ in 0..3 {
            c.step(&load(100, 40.0, 4, 0.0), Some(&net(2000, 0)));
        }
        let x = c
            .step(&load(100, 40.0, 8, 5.0), Some(&net(6000, 0)))
            .expect("waiting at the cap with a sick network grows");
        assert!(x.reason.contains("3.0x its baseline"), "{}", x.reason);
        assert_eq!(x.max_idle, 9);
        // No open bounds: max open is never advised, the service's stays.
        assert_eq!(x.max_open, 0);
    }

    #[test]
    fn classic_rules_need_a_full_window() {
        let mut c = PoolController::new(PoolLaw::Classic, spec(true), 10, 20);
        for _ in 0..9 {
            assert_eq!(c.step(&load(100, 250.0, 10, 80.0), None), None);
        }
        let x = c.step(&load(100, 250.0, 10, 80.0), None).expect("10 s");
        assert_eq!(x.max_idle, 12);
        assert!(x.reason.contains("+20%"), "{}", x.reason);
        let mut idle = load(10, 5.0, 1, 0.0);
        idle.idle = 11;
        for _ in 0..9 {
            assert_eq!(c.step(&idle, None), None);
        }
        assert_eq!(c.step(&idle, None).map(|x| x.max_idle), Some(10));
    }

    #[test]
    fn never_outside_the_bounds() {
        for law in [PoolLaw::Classic, PoolLaw::Kernel] {
            let mut c = PoolController::new(law, spec(true), 1000, 1000);
            assert_eq!(c.setting(), (64, 100));
            let loads = [
                load(100_000, 10_000.0, 64, 1e6),
                load(0, 0.0, 0, 0.0),
                load(u64::MAX / 2, f64::MAX, 64, f64::MAX),
            ];
            for i in 0..200 {
                let l = loads[i / 40 % loads.len()];
                c.step(&l, Some(&net(1000 + i as u32, (i % 3) as u64 * 50)));
                let (idle, open) = c.setting();
                assert!((2..=64).contains(&idle), "{law:?} idle {idle}");
                assert!(
                    (4..=100).contains(&open) && open >= idle,
                    "{law:?} open {open}"
                );
            }
        }
    }

    #[test]
    fn retransmits_are_differences_per_connection() {
        let c = |port: u16| -> ConnectionKey {
            (1, ([10, 0, 0, 1], port).into(), ([10, 0, 0, 2], 80).into())
        };
        let mut l = RetransmitLedger::default();
        assert_eq!(l.delta([(c(1), 5), (c(2), 0)].into_iter()), 5);
        assert_eq!(l.delta([(c(1), 7), (c(2), 1)].into_iter()), 3);
        // Connection 1 closed, 3 opened with 2 already.
        assert_eq!(l.delta([(c(2), 1), (c(3), 2)].into_iter()), 2);
    }
}
