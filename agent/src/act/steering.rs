//! Which members of a SO_REUSEPORT group take new connections, from each
//! member's accept queue read every poll (TCP_INFO of the listener: its
//! queue length and capacity) and, where the kernel counts them for that
//! member alone, the connections its process accepted (`VIGIL_ACCEPTS`).
//!
//! A member is stalled when its queue held connections for the whole stall
//! window, never got shorter, and its process accepted none meanwhile:
//! nobody accepts from it (a stopped, blocked or deadlocked worker). A busy
//! but working member accepts, even when an overload keeps its queue full.
//! Where the accept count is unknown (the accept hook is missing, or one
//! process holds several members of the group), the queue alone decides: a
//! working member's length falls between some two readings. Once a stalled
//! member is steered away from, its queue stops growing but does not
//! shrink, so it stays stalled until it accepts again; then it is restored
//! at the next reading.

use std::collections::VecDeque;

/// One reading of a member.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    len: u32,
    /// Connections its process accepted so far, when known for this member alone.
    accepted: Option<u64>,
}

/// A member's accept-queue readings, oldest first.
#[derive(Debug, Clone, Default)]
pub struct MemberQueue {
    readings: VecDeque<Sample>,
    /// Accept-queue capacity at the latest reading.
    pub cap: u32,
}

impl MemberQueue {
    /// Adds a reading taken at `at_ms` (monotonic), keeping two windows.
    pub fn observe(
        &mut self,
        at_ms: u64,
        len: u32,
        cap: u32,
        accepted: Option<u64>,
        window_ms: u64,
    ) {
        self.cap = cap;
        self.readings.push_back(Sample {
            at_ms,
            len,
            accepted,
        });
        let horizon = at_ms.saturating_sub(2 * window_ms);
        while self.readings.front().is_some_and(|r| r.at_ms < horizon) {
            self.readings.pop_front();
        }
    }

    pub fn len(&self) -> u32 {
        self.readings.back().map_or(0, |r| r.len)
    }

    /// Whether connections waited at this reading or the one before: the
    /// member has more than it takes (saturated), allowing for the moment
    /// a busy queue is caught empty.
    pub fn saturated(&self) -> bool {
        self.readings.iter().rev().take(2).any(|r| r.len > 0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the queue held connections over all of the last `window_ms`,
    /// never got shorter, and (where known) nothing was accepted from it.
    pub fn stalled(&self, now_ms: u64, window_ms: u64) -> bool {
        let start = now_ms.saturating_sub(window_ms);
        // The readings must cover the window: one at or before its start.
        let Some(first) = self.readings.iter().rposition(|r| r.at_ms <= start) else {
            return false;
        };
        let window: Vec<Sample> = self.readings.iter().skip(first).copied().collect();
        let held = window.iter().all(|r| r.len > 0);
        let never_shorter = window.windows(2).all(|p| p[1].len >= p[0].len);
        let accepted_none = window
            .windows(2)
            .all(|p| match (p[0].accepted, p[1].accepted) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            });
        held && never_shorter && accepted_none
    }
}

/// At most this fraction of a group's members is steered away from: when
/// more look stalled, the group is overloaded rather than one worker stuck,
/// and steering would only pile everything onto the rest.
pub const MAX_STEERED_AWAY_FRACTION: f64 = 0.5;

/// The members (indices into `queues`) that take new connections: None when
/// every member should (the kernel's hash decides, no worse than today).
pub fn healthy_members(queues: &[MemberQueue], now_ms: u64, window_ms: u64) -> Option<Vec<u32>> {
    let stalled: Vec<bool> = queues
        .iter()
        .map(|q| q.stalled(now_ms, window_ms))
        .collect();
    let away = stalled.iter().filter(|&&s| s).count();
    let allowed = (queues.len() as f64 * MAX_STEERED_AWAY_FRACTION).floor() as usize;
    if away == 0 || away > allowed {
        return None;
    }
    Some(
        stalled
            .iter()
            .enumerate()
            .filter(|(_, &s)| !s)
            .map(|(i, _)| i as u32)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: u64 = 300;

    fn queue(readings: &[(u64, u32)]) -> MemberQueue {
        let mut q = MemberQueue::default();
        for &(t, l) in readings {
            q.observe(t, l, 16, None, WINDOW);
        }
        q
    }

    #[test]
    fn a_full_queue_that_is_accepted_from_is_not_stalled() {
        // An overload keeps the queue at its capacity while the worker accepts.
        let mut busy = MemberQueue::default();
        let mut stuck = MemberQueue::default();
        for (i, t) in (0..=400).step_by(100).enumerate() {
            busy.observe(t, 16, 16, Some(100 * i as u64), WINDOW);
            stuck.observe(t, 16, 16, Some(7), WINDOW);
        }
        assert!(!busy.stalled(400, WINDOW));
        assert!(stuck.stalled(400, WINDOW));
        assert!(busy.saturated() && stuck.saturated());
    }

    #[test]
    fn a_queue_that_never_shrinks_over_the_window_is_stalled() {
        let stuck = queue(&[(0, 1), (100, 3), (200, 3), (300, 5), (400, 6)]);
        assert!(stuck.stalled(400, WINDOW));
        // A busy worker: long queue, but it took some off between readings.
        let busy = queue(&[(0, 9), (100, 12), (200, 8), (300, 11), (400, 12)]);
        assert!(!busy.stalled(400, WINDOW));
        // Empty at some reading: not stalled.
        let idle = queue(&[(100, 0), (200, 2), (300, 2), (400, 3)]);
        assert!(!idle.stalled(400, WINDOW));
        // Too young to tell.
        assert!(!queue(&[(200, 4), (300, 5), (400, 6)]).stalled(400, WINDOW));
    }

    #[test]
    fn a_stalled_member_is_restored_once_it_accepts() {
        let mut q = queue(&[(0, 4), (100, 4), (200, 4), (300, 4)]);
        assert!(q.stalled(300, WINDOW));
        q.observe(400, 1, 16, None, WINDOW);
        assert!(!q.stalled(400, WINDOW));
    }

    #[test]
    fn steers_away_from_stalled_members_but_never_from_most() {
        let ok = queue(&[(0, 0), (100, 1), (200, 0), (300, 0)]);
        let stuck = queue(&[(0, 2), (100, 3), (200, 3), (300, 4)]);
        let four = [ok.clone(), stuck.clone(), ok.clone(), ok.clone()];
        assert_eq!(healthy_members(&four, 300, WINDOW), Some(vec![0, 2, 3]));
        // Every member healthy: the kernel's hash.
        let healthy = [ok.clone(), ok.clone(), ok.clone(), ok.clone()];
        assert_eq!(healthy_members(&healthy, 300, WINDOW), None);
        // Three of four "stalled" is overload: the kernel's hash.
        let overloaded = [stuck.clone(), stuck.clone(), stuck.clone(), ok.clone()];
        assert_eq!(healthy_members(&overloaded, 300, WINDOW), None);
        // Two of four is still allowed; a lone member never.
        let two = [stuck.clone(), stuck.clone(), ok.clone(), ok];
        assert_eq!(healthy_members(&two, 300, WINDOW), Some(vec![2, 3]));
        assert_eq!(healthy_members(&[stuck], 300, WINDOW), None);
    }
}
