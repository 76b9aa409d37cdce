//! How many SO_REUSEPORT listeners a service should run, and how deep their
//! accept queues should be, from what the kernel shows of them: the fill
//! of their accept queues and the connections dropped at a full one.
//!
//! A listener is added when the members' queues stay more than half full
//! for three periods (every worker is behind, not one stalled worker: that
//! one is steering's job), and removed after thirty periods of empty
//! queues. The backlog doubles when connections are dropped at full queues.

use super::pools::Bounds;

const FULL: f64 = 0.5;
const EMPTY: f64 = 0.05;
const FULL_PERIODS: u32 = 3;
const EMPTY_PERIODS: u32 = 30;
/// The largest backlog advised: the kernel's own cap on somaxconn's default
/// type (u16 before 4.x kernels; services often store it so).
const MAX_BACKLOG: u32 = 65_535;

/// The service's listeners on its serving port, over one period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ListenerReading {
    /// Listening sockets of the workload on the port.
    pub members: u32,
    /// Mean of queue length over queue capacity across them.
    pub fill: f64,
    /// Connections dropped at their full queues in the period.
    pub dropped: u64,
    /// Their accept queue capacity (the effective backlog).
    pub queue_cap: u32,
}

pub struct ListenerAdvisor {
    bounds: Bounds,
    target: u32,
    full: u32,
    empty: u32,
    backlog: Option<u32>,
}

impl ListenerAdvisor {
    pub fn new(bounds: Bounds, current: u32) -> ListenerAdvisor {
        ListenerAdvisor {
            bounds,
            target: bounds.clamp(current),
            full: 0,
            empty: 0,
            backlog: None,
        }
    }

    /// A new listener count and why, when it changes.
    pub fn step_listeners(&mut self, r: &ListenerReading) -> Option<(u32, String)> {
        if r.members == 0 {
            return None;
        }
        let behind = r.fill > FULL || r.dropped > 0;
        self.full = if behind { self.full + 1 } else { 0 };
        self.empty = if r.fill < EMPTY && r.dropped == 0 {
            self.empty + 1
        } else {
            0
        };
        let next = if self.full >= FULL_PERIODS {
            self.bounds.clamp(self.target + 1)
        } else if self.empty >= EMPTY_PERIODS {
            self.bounds.clamp(self.target.saturating_sub(1))
        } else {
            self.target
        };
        if next == self.target {
            return None;
        }
        let why = if next > self.target {
            format!(
                "accept queues of {} listeners {:.0}% full on average for {} periods, {} dropped",
                r.members,
                r.fill * 100.0,
                self.full,
                r.dropped
            )
        } else {
            format!(
                "accept queues of {} listeners empty for {} periods",
                r.members, self.empty
            )
        };
        self.target = next;
        self.full = 0;
        self.empty = 0;
        Some((next, why))
    }

    /// A deeper backlog and why, when connections were dropped at full
    /// queues; at most one doubling per period.
    pub fn step_backlog(&mut self, r: &ListenerReading) -> Option<(u32, String)> {
        if r.dropped == 0 || r.queue_cap == 0 {
            return None;
        }
        let next = r.queue_cap.saturating_mul(2).min(MAX_BACKLOG);
        if self.backlog.is_some_and(|b| b >= next) || next <= r.queue_cap {
            return None;
        }
        self.backlog = Some(next);
        Some((
            next,
            format!(
                "{} connections dropped at full accept queues of {}; the kernel caps the backlog at net.core.somaxconn",
                r.dropped, r.queue_cap
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(fill: f64, dropped: u64) -> ListenerReading {
        ListenerReading {
            members: 2,
            fill,
            dropped,
            queue_cap: 16,
        }
    }

    #[test]
    fn adds_after_sustained_fill_and_removes_after_long_quiet() {
        let mut a = ListenerAdvisor::new(Bounds { min: 1, max: 3 }, 2);
        assert_eq!(a.step_listeners(&reading(0.9, 0)), None);
        assert_eq!(a.step_listeners(&reading(0.9, 0)), None);
        let (n, why) = a.step_listeners(&reading(0.9, 0)).expect("third period");
        assert_eq!(n, 3);
        assert!(why.contains("90% full"), "{why}");
        // A period below half resets the streak; the cap holds at 3.
        for _ in 0..10 {
            assert_eq!(a.step_listeners(&reading(0.9, 4)), None);
        }
        for _ in 0..29 {
            assert_eq!(a.step_listeners(&reading(0.0, 0)), None);
        }
        assert_eq!(a.step_listeners(&reading(0.0, 0)).map(|x| x.0), Some(2));
        assert_eq!(
            a.step_listeners(&ListenerReading {
                members: 0,
                ..reading(1.0, 9)
            }),
            None
        );
    }

    #[test]
    fn backlog_doubles_on_overflow_once_per_depth() {
        let mut a = ListenerAdvisor::new(Bounds { min: 1, max: 3 }, 2);
        assert_eq!(a.step_backlog(&reading(1.0, 0)), None);
        assert_eq!(a.step_backlog(&reading(1.0, 5)).map(|x| x.0), Some(32));
        assert_eq!(a.step_backlog(&reading(1.0, 5)), None);
        let deeper = ListenerReading {
            queue_cap: 32,
            ..reading(1.0, 5)
        };
        assert_eq!(a.step_backlog(&deeper).map(|x| x.0), Some(64));
        let top = ListenerReading {
            queue_cap: 65_535,
            ..reading(1.0, 5)
        };
        assert_eq!(a.step_backlog(&top), None);
    }
}
