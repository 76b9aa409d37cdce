//! Every decision and change acting makes, as a record with the signal that
//! caused it and the values before and after: logged as it happens, sent as
//! an OTLP log record when logs are exported, and the latest kept for
//! `vigil status` and `GET /v1/actuation`.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc, Mutex, OnceLock},
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::export::otlp::{AttrValue, LogRecordOut, OtlpStats, Severity};

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
    /// A target of a service registered with the control API changed (the
    /// member names the setting: `pool NAME`, `listeners`, ...).
    SetTarget,
    /// A sysctl of a pod's network namespace was (or would be) changed.
    SetSysctl,
    /// A changed sysctl was put back to the value found.
    RestoreSysctl,
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

impl AuditRecord {
    /// The OTLP log record of this decision (`vigil.actuation.*` attributes).
    pub fn log_record(&self) -> LogRecordOut {
        let text =
            |k: &str, v: &str| (format!("vigil.actuation.{k}"), AttrValue::Str(v.to_owned()));
        let mut attributes = vec![
            text("action", self.action.as_str()),
            text("mode", &self.mode),
            (
                "vigil.actuation.applied".into(),
                AttrValue::Int(i64::from(self.applied)),
            ),
            text("group", &self.group),
            text("signal", &self.signal),
            text("before", &self.before),
            text("after", &self.after),
        ];
        if let Some(member) = &self.member {
            attributes.push(text("member", member));
        }
        let refused = self.action == Action::Refuse;
        LogRecordOut {
            time_unix_nano: self.at_unix_ms * 1_000_000,
            severity: if refused {
                Severity::Warn
            } else {
                Severity::Info
            },
            body: if refused {
                "actuation refused"
            } else {
                "actuation decision"
            }
            .into(),
            attributes,
            trace_id: None,
            span_id: None,
        }
    }
}

/// Where records go as OTLP log records, once the exporter runs.
struct Export {
    tx: mpsc::Sender<LogRecordOut>,
    stats: Arc<OtlpStats>,
}

/// The latest records, bounded.
pub struct AuditLog {
    records: Mutex<VecDeque<AuditRecord>>,
    capacity: usize,
    export: OnceLock<Export>,
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
            Action::SetTarget => "set_target",
            Action::SetSysctl => "set_sysctl",
            Action::RestoreSysctl => "restore_sysctl",
        }
    }
}

impl AuditLog {
    pub fn new(capacity: usize) -> AuditLog {
        AuditLog {
            records: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            export: OnceLock::new(),
        }
    }

    /// Sends every later record to the OTLP log exporter too; a full queue
    /// drops the record there (counted, as the exporter's own) and keeps it here.
    pub fn export_to(&self, tx: mpsc::Sender<LogRecordOut>, stats: Arc<OtlpStats>) {
        let _ = self.export.set(Export { tx, stats });
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
        if let Some(export) = self.export.get() {
            if export.tx.try_send(record.log_record()).is_err() {
                export
                    .stats
                    .log_records_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
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

    #[test]
    fn records_go_to_the_otlp_exporter_once_it_runs() {
        let log = AuditLog::new(4);
        log.record(record(1));
        let (tx, mut rx) = mpsc::channel(1);
        let stats = Arc::new(OtlpStats::default());
        log.export_to(tx, stats.clone());
        log.record(record(2));
        log.record(record(3));
        let sent = rx.try_recv().expect("one record queued");
        assert_eq!(sent.time_unix_nano, 2_000_000);
        assert_eq!(sent.body, "actuation decision");
        assert!(sent.attributes.contains(&(
            "vigil.actuation.action".into(),
            AttrValue::Str("steer_away".into())
        )));
        assert!(
            rx.try_recv().is_err(),
            "the record before the export is not sent"
        );
        assert_eq!(
            stats.log_records_dropped.load(Ordering::Relaxed),
            1,
            "a full queue drops and counts"
        );
        assert_eq!(
            log.latest().len(),
            3,
            "every record is kept for the endpoint"
        );
    }
}
