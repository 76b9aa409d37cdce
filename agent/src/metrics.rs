//! Aggregates events into counters with bounded label sets (network namespace
//! and owner identity — never pids, ports or addresses) and describes them as
//! metric families. The state owner holds the `Registry`; readers get its
//! families through the published view (`view.rs`).

use std::{collections::BTreeMap, sync::atomic::AtomicU64, time::Instant};

pub use crate::exposition::Exposition;
use crate::{
    cardinality::SeriesBudget,
    correlate::traces::TraceIndex,
    enrich::Identity,
    events::{DropEvent, OwnerSource, RetransmitEvent},
    exposition::Exemplar,
    sampler::{ConnectionSample, ListenerSample},
    socket_health::{Overflow, SocketHealth},
};

/// Counters the source tasks bump (atomics: no task waits on another).
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub received_retransmit: AtomicU64,
    pub received_synack: AtomicU64,
    pub received_drop: AtomicU64,
    pub received_trace: AtomicU64,
    pub decode_errors: AtomicU64,
    /// Traced messages whose socket record the agent never got or forgot.
    pub trace_unplaced: AtomicU64,
    pub channel_dropped: AtomicU64,
    pub sampler_passes: AtomicU64,
    pub sampler_errors: AtomicU64,
    pub sampler_pass_micros: AtomicU64,
    pub snapshots_dropped: AtomicU64,
}

/// The identity labels every per-owner metric carries: network namespace,
/// cgroup and process, and for pods their namespace and name (the pod uid
/// while the Kubernetes API has not named it). Never pids, ports or addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Series {
    netns: u32,
    cgroup: String,
    process: String,
    /// Kubernetes namespace and pod; empty for processes outside pods.
    namespace: String,
    pod: String,
}

impl Series {
    pub fn of(netns: u32, who: &Identity) -> Series {
        let (namespace, pod) = match &who.pod {
            Some(p) => (
                p.namespace.clone().unwrap_or_default(),
                p.name.clone().unwrap_or_else(|| p.uid.clone()),
            ),
            None => (String::new(), String::new()),
        };
        Series {
            netns,
            cgroup: who.cgroup.clone().unwrap_or_else(|| UNKNOWN.into()),
            process: who.comm.clone().unwrap_or_else(|| UNKNOWN.into()),
            namespace,
            pod,
        }
    }

    /// Where observations go once the series budget is spent.
    pub fn overflow() -> Series {
        Series {
            netns: 0,
            cgroup: OVERFLOW.into(),
            process: OVERFLOW.into(),
            namespace: String::new(),
            pod: String::new(),
        }
    }

    pub fn labels(&self) -> Vec<(&'static str, String)> {
        let mut labels = vec![
            ("netns", self.netns.to_string()),
            ("cgroup", self.cgroup.clone()),
            ("process", self.process.clone()),
        ];
        // Only pods carry these; an empty label would be the same as none.
        if !self.pod.is_empty() {
            if !self.namespace.is_empty() {
                labels.push(("namespace", self.namespace.clone()));
            }
            labels.push(("pod", self.pod.clone()));
        }
        labels
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct RetransmitCounts {
    events: u64,
    segments: u64,
    synack: u64,
    unreported: u64,
    /// The latest retransmit of the series that carried a trace context.
    exemplar: Option<Exemplar>,
}

pub struct Registry {
    retransmits: BTreeMap<Series, RetransmitCounts>,
    failed_attempts: BTreeMap<(u32, &'static str), u64>,
    attributed: BTreeMap<&'static str, u64>,
    pub cgroup_cache_entries: usize,
    pub proc_socket_entries: usize,
    pub health: SocketHealth,
    pub budget: SeriesBudget,
    /// Per-trace record of what the kernel saw, for `vigil explain`.
    pub traces: TraceIndex,
}

fn errno_name(err: i32) -> &'static str {
    match err.checked_neg().unwrap_or(0) {
        libc::EBUSY => "EBUSY",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EINVAL => "EINVAL",
        libc::ENOBUFS => "ENOBUFS",
        libc::EPERM => "EPERM",
        _ => "other",
    }
}

const UNKNOWN: &str = "unknown";
/// Until the agent sizes it from `correlate.trace_index_entries`.
const DEFAULT_TRACE_INDEX_ENTRIES: usize = 4096;
/// Label value of the overflow series (not a cgroup path or process name).
const OVERFLOW: &str = "_overflow";

impl Registry {
    pub fn new(health: SocketHealth, budget: SeriesBudget) -> Registry {
        Registry {
            health,
            budget,
            retransmits: BTreeMap::new(),
            failed_attempts: BTreeMap::new(),
            attributed: BTreeMap::new(),
            traces: TraceIndex::new(DEFAULT_TRACE_INDEX_ENTRIES),
            cgroup_cache_entries: 0,
            proc_socket_entries: 0,
        }
    }

    /// `at_unix_ns`: the event's time, for its exemplar.
    pub fn record_retransmit(&mut self, e: &RetransmitEvent, who: &Identity, at_unix_ns: u64) {
        let source = match e.owner.as_ref().map(|o| o.source) {
            Some(OwnerSource::Kernel) => "kernel",
            Some(OwnerSource::Proc) => "proc",
            None => "none",
        };
        *self.attributed.entry(source).or_default() += 1;
        if e.err != 0 {
            *self
                .failed_attempts
                .entry((e.netns, errno_name(e.err)))
                .or_default() += 1;
        }
        let counted = e.counted_segments();
        if counted == 0 {
            return;
        }
        let series = self.budget.admit(Series::of(e.netns, who), Instant::now());
        let c = self.retransmits.entry(series).or_default();
        if e.reported() {
            c.events += 1;
        }
        c.segments += u64::from(counted);
        c.unreported += u64::from(e.unreported_segments());
        if let Some(ctx) = e.trace.context() {
            c.exemplar = Some(Exemplar {
                trace_id: ctx.trace_id,
                span_id: ctx.span_id,
                time_unix_nano: at_unix_ns,
                value: f64::from(counted),
            });
        }
        c.synack += u64::from(e.synack_segments());
    }

    pub fn record_drop(&mut self, e: &DropEvent, who: &Identity) {
        let series = self.budget.admit(Series::of(e.netns, who), Instant::now());
        self.health.record_drop(e, series);
    }

    /// Applies a socket sample, and forgets series idle past the expiry.
    /// Returns the listeners that dropped handshakes since the last sample.
    pub fn apply_snapshot<'a>(
        &mut self,
        listeners: impl Iterator<Item = (&'a ListenerSample, Identity)>,
        connections: impl Iterator<Item = (&'a ConnectionSample, Identity)>,
        listen_overflows: &std::collections::HashMap<u32, u64>,
    ) -> Vec<Overflow> {
        let now = Instant::now();
        let listeners: Vec<_> = listeners
            .map(|(l, who)| (l, self.budget.admit(Series::of(l.netns, &who), now), who))
            .collect();
        let connections: Vec<_> = connections
            .map(|(c, who)| (c, self.budget.admit(Series::of(c.netns, &who), now), who))
            .collect();
        let overflows = self.health.apply_snapshot(
            listeners.into_iter(),
            connections.into_iter(),
            listen_overflows,
        );
        let expired = self.budget.expire(now);
        if !expired.is_empty() {
            for s in &expired {
                self.retransmits.remove(s);
            }
            self.health.forget(&expired);
        }
        overflows
    }

    /// The aggregates' families in the Prometheus text format (tests).
    pub fn render(&self) -> String {
        self.families().text()
    }

    /// The families of the aggregates this moment; the agent's own telemetry
    /// (`Telemetry`) is added to them by whoever exports.
    pub fn families(&self) -> Exposition {
        let mut x = Exposition::default();
        let per_series: [Family<RetransmitCounts, u64>; 4] = [
            (
                "vigil_tcp_retransmitted_segments_total",
                "TCP segments retransmitted, as the kernel counts them in Tcp RetransSegs (data, SYN and SYN-ACK).",
                |c| c.segments,
            ),
            (
                "vigil_tcp_retransmit_events_total",
                "Retransmissions (one event can carry several GSO segments).",
                |c| c.events,
            ),
            (
                "vigil_tcp_synack_retransmits_total",
                "SYN-ACKs retransmitted by listeners (included in the segment total).",
                |c| c.synack,
            ),
            (
                "vigil_tcp_retransmit_unreported_segments_total",
                "Retransmitted segments no tracepoint event carried, found from the socket's own counter (included in the segment total).",
                |c| c.unreported,
            ),
        ];
        for (name, help, value) in per_series {
            x.family(name, "counter", help);
            for (s, c) in &self.retransmits {
                x.sample(name, &s.labels(), value(c));
                if let (Some(e), "vigil_tcp_retransmitted_segments_total") = (c.exemplar, name) {
                    x.exemplar(name, e);
                }
            }
        }
        let name = "vigil_tcp_retransmit_failed_attempts_total";
        x.family(name, "counter", "Retransmit attempts that returned an error, by errno (EBUSY, EAGAIN, ENOMEM, EHOSTUNREACH, EINVAL: abandoned before sending).");
        for ((netns, errno), n) in &self.failed_attempts {
            x.sample(
                name,
                &[("netns", netns.to_string()), ("errno", (*errno).to_owned())],
                n,
            );
        }

        let name = "vigil_trace_stamps_invalid_total";
        x.family(name, "counter", "Kernel events whose captured traceparent value was not valid W3C Trace Context (treated as no trace).");
        x.sample(name, &[], self.traces.invalid_stamps);
        let name = "vigil_trace_index_traces";
        x.family(name, "gauge", "Traces `vigil explain` can answer for now.");
        x.sample(name, &[], self.traces.len());
        let name = "vigil_trace_index_evicted_total";
        x.family(
            name,
            "counter",
            "Traces forgotten to keep the index within correlate.trace_index_entries.",
        );
        x.sample(name, &[], self.traces.evicted);
        let name = "vigil_event_attributions_total";
        x.family(
            name,
            "counter",
            "Events by where their socket owner came from (kernel, proc, none).",
        );
        for (source, n) in &self.attributed {
            x.sample(name, &[("source", (*source).to_owned())], n);
        }

        let name = "vigil_cache_entries";
        x.family(name, "gauge", "Entries in the agent's bounded caches.");
        x.sample(
            name,
            &[("cache", "cgroup_paths".into())],
            self.cgroup_cache_entries,
        );
        x.sample(
            name,
            &[("cache", "proc_sockets".into())],
            self.proc_socket_entries,
        );
        self.health.render(&mut x);
        let name = "vigil_series_limit";
        x.family(name, "gauge", "Most owner label sets (netns, cgroup, process) per-owner metrics may have (metrics.max_series).");
        x.sample(name, &[], self.budget.limit());
        let name = "vigil_series_active";
        x.family(
            name,
            "gauge",
            "Owner label sets in use, the overflow series not included.",
        );
        x.sample(name, &[], self.budget.active());
        let name = "vigil_series_overflow_total";
        x.family(name, "counter", "Observations recorded under the overflow series (cgroup=\"_overflow\") because the limit was reached.");
        x.sample(name, &[], self.budget.overflowed);
        let name = "vigil_series_expired_total";
        x.family(
            name,
            "counter",
            "Owner label sets forgotten after metrics.series_idle_expiry_secs without updates.",
        );
        x.sample(name, &[], self.budget.expired);
        x
    }
}

/// A metric family drawn from one aggregate: (name, help, value of a sample).
pub type Family<T, V> = (&'static str, &'static str, fn(&T) -> V);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Owner, RetransmitKind};
    use std::time::Duration;

    fn event(segs: u32, err: i32, kind: RetransmitKind) -> RetransmitEvent {
        RetransmitEvent {
            err,
            kind,
            owner: Some(Owner {
                pid: 3,
                comm: "origin".into(),
                cgroup_id: 9,
                source: OwnerSource::Kernel,
            }),
            ..RetransmitEvent::example(segs)
        }
    }

    fn registry(max_series: usize) -> Registry {
        Registry::new(
            SocketHealth::new(Default::default(), 10),
            SeriesBudget::new(max_series, Duration::from_secs(600)),
        )
    }

    #[test]
    fn traced_retransmits_become_exemplars() {
        let mut r = registry(10);
        let ctx = crate::correlate::traceparent::TraceContext {
            trace_id: [7; 16],
            span_id: [8; 8],
            flags: 1,
        };
        let mut e = event(3, 0, RetransmitKind::Segment);
        e.trace = crate::correlate::traceparent::Stamp::Context(ctx);
        r.record_retransmit(&e, &Identity::default(), 123);
        // A later untraced retransmit keeps the last traced one as exemplar.
        r.record_retransmit(
            &event(1, 0, RetransmitKind::Segment),
            &Identity::default(),
            456,
        );
        let x = r.families();
        let f = x
            .families
            .iter()
            .find(|f| f.name == "vigil_tcp_retransmitted_segments_total")
            .expect("family");
        let exemplar = f.points[0].exemplar.expect("exemplar");
        assert_eq!((exemplar.trace_id, exemplar.span_id), ([7; 16], [8; 8]));
        assert_eq!((exemplar.time_unix_nano, exemplar.value), (123, 3.0));
        // Prometheus text 0.0.4 has no exemplars: the line is unchanged.
        assert!(
            r.render()
                .lines()
                .any(|l| l.starts_with("vigil_tcp_retransmitted_segments_total{")
                    && l.ends_with(" 4"))
        );
    }

    #[test]
    fn owners_beyond_the_limit_share_the_overflow_series() {
        let mut r = registry(2);
        for i in 0..5 {
            let who = Identity {
                pid: Some(i),
                comm: Some(format!("pod{i}")),
                cgroup: Some(format!("/kubepods/pod{i}")),
                pod: None,
            };
            r.record_retransmit(&event(1, 0, RetransmitKind::Segment), &who, 0);
        }
        let text = r.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("vigil_tcp_retransmitted_segments_total{"))
            .count();
        assert_eq!(series, 3, "two owners and the overflow series:\n{text}");
        assert!(
            text.contains(r#"vigil_tcp_retransmitted_segments_total{netns="0",cgroup="_overflow",process="_overflow"} 3"#),
            "{text}"
        );
        assert!(text.contains("vigil_series_overflow_total 3"), "{text}");
        assert!(text.contains("vigil_series_active 2"), "{text}");
        assert!(text.contains("vigil_series_limit 2"), "{text}");
    }

    #[test]
    fn pods_are_labelled_by_namespace_and_name_or_uid() {
        let mut r = registry(10);
        let path = "/kubepods/pod5f3a2b1c-9d8e-4f70-a1b2-c3d4e5f60718";
        let mut pod = crate::enrich::workload::parse(path).expect("pod path");
        let unnamed = Identity {
            pid: Some(1),
            comm: Some("origin".into()),
            cgroup: Some(path.into()),
            pod: Some(pod.clone()),
        };
        r.record_retransmit(&event(1, 0, RetransmitKind::Segment), &unnamed, 0);
        pod.namespace = Some("video".into());
        pod.name = Some("origin-0".into());
        let named = Identity {
            pod: Some(pod),
            ..unnamed.clone()
        };
        let mut e = event(2, 0, RetransmitKind::Segment);
        e.netns = 8;
        r.record_retransmit(&e, &named, 0);
        let text = r.render();
        assert!(
            text.contains(&format!(r#"vigil_tcp_retransmitted_segments_total{{netns="7",cgroup="{path}",process="origin",pod="5f3a2b1c-9d8e-4f70-a1b2-c3d4e5f60718"}} 1"#)),
            "{text}"
        );
        assert!(
            text.contains(&format!(r#"vigil_tcp_retransmitted_segments_total{{netns="8",cgroup="{path}",process="origin",namespace="video",pod="origin-0"}} 2"#)),
            "{text}"
        );
    }

    #[test]
    fn sums_segments_and_separates_failures() {
        let mut r = registry(100);
        let who = Identity {
            pid: Some(3),
            comm: Some("origin".into()),
            cgroup: Some("/pods/a\"b".into()),
            pod: None,
        };
        r.record_retransmit(&event(4, 0, RetransmitKind::Segment), &who, 0);
        r.record_retransmit(&event(2, 0, RetransmitKind::Segment), &who, 0);
        r.record_retransmit(&event(1, 0, RetransmitKind::SynAck), &who, 0);
        r.record_retransmit(&event(5, -libc::EBUSY, RetransmitKind::Segment), &who, 0);
        // Two SYN-ACKs no event reported, found at accept().
        let mut found = event(2, 0, RetransmitKind::SynAckUnseen);
        found.counted = Some(2);
        r.record_retransmit(&found, &who, 0);
        let text = r.render();
        let labels = r#"netns="7",cgroup="/pods/a\"b",process="origin""#;
        assert!(
            text.contains(&format!(
                "vigil_tcp_retransmitted_segments_total{{{labels}}} 9"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("vigil_tcp_retransmit_events_total{{{labels}}} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!("vigil_tcp_synack_retransmits_total{{{labels}}} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "vigil_tcp_retransmit_unreported_segments_total{{{labels}}} 2"
            )),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vigil_tcp_retransmit_failed_attempts_total{netns="7",errno="EBUSY"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("pid"), "pids never become labels");
    }
}
