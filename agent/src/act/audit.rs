//! Every decision and change acting makes, as a record with the signal that
//! caused it and the values before and after: logged as it happens, and the
//! latest kept for `vigil status` and `GET /v1/actuation`.

use std::{collections::VecDeque, sync::Mutex};

use serde::{Deserialize, Serialize};

/// What was decided or done; its name is the JSON's (`steer_away`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The steering program was attached to a group.
    Attach,
    /// The steering program was detached from a group.
    Detach,
    /// A member stopped taking new connections.
    SteerAway,
    /// A member takes new connections again.
    Restore,
    /// Admission control began refusing new connections.
    StartShedding,
    /// The refused fraction moved (by 5 points or more since the last record).
    ShedFraction,
    /// Admission control admits every new connection again.
    StopShedding,
    /// A group or listener Vigil will not act on, and why.
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at_unix_ms: u64,
    /// `recommend` (nothing changed in the kernel) or `enforce`.
    pub mode: String,
    /// Whether the kernel was changed (only in enforce).
    pub applied: bool,
    pub action: Action,
    /// `NETNS/ADDRESS:PORT` of the SO_REUSEPORT group.
    pub group: String,
    /// `PROCESS/PID fd N` of the member, when the record is about one.
    pub member: Option<String>,
    /// The observation that caused it.
    pub signal: String,
    pub before: String,
    pub after: String,
}

/// The latest records, bounded.
pub struct AuditLog {
    records: Mutex<VecDeque<AuditRecord>>,
    capacity: usize,
}

impl Action {
    /// The snake_case name, as in the JSON and `vigil status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Attach => "attach",
            Action::Detach => "detach",
            Action::SteerAway => "steer_away",
            Action::Restore => "restore",
            Action::StartShedding => "start_shedding",
            Action::ShedFraction => "shed_fraction",
            Action::StopShedding => "stop_shedding",
            Action::Refuse => "refuse",
        }
    }
}

impl AuditLog {
    pub fn new(capacity: usize) -> AuditLog {
        AuditLog {
            records: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
        }
    }

    /// Logs `record` and keeps it, forgetting the oldest beyond the capacity.
    pub fn record(&self, record: AuditRecord) {
        let level_warn = record.action == Action::Refuse;
        let member = record.member.as_deref().unwrap_or("-");
        if level_warn {
            tracing::warn!(
                action = record.action.as_str(), mode = %record.mode, applied = record.applied,
                group = %record.group, member, signal = %record.signal,
                before = %record.before, after = %record.after, "actuation refused"
            );
        } else {
            tracing::info!(
                action = record.action.as_str(), mode = %record.mode, applied = record.applied,
                group = %record.group, member, signal = %record.signal,
                before = %record.before, after = %record.after, "actuation decision"
            );
        }
        if let Ok(mut records) = self.records.lock() {
            if records.len() == self.capacity {
                records.pop_front();
            }
            records.push_back(record);
        }
    }

    pub fn latest(&self) -> Vec<AuditRecord> {
        self.records
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> AuditRecord {
        AuditRecord {
            at_unix_ms: n,
            mode: "enforce".into(),
            applied: true,
            action: Action::SteerAway,
            group: "1/198.18.0.1:80".into(),
            member: None,
            signal: "s".into(),
            before: "4 healthy".into(),
            after: "3 healthy".into(),
        }
    }

    #[test]
    fn keeps_the_latest_records_only() {
        let log = AuditLog::new(2);
        for n in 0..3 {
            log.record(record(n));
        }
        let kept: Vec<u64> = log.latest().iter().map(|r| r.at_unix_ms).collect();
        assert_eq!(kept, [1, 2]);
    }
}
