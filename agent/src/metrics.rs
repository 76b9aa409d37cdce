//! Aggregates events into counters with bounded label sets (network namespace
//! and owner identity — never pids, ports or addresses) and renders them in the
//! Prometheus text format, together with the agent's self-telemetry.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, PerCpuArray};
use vigil_abi::LossSlot;

use crate::{
    enrich::Identity,
    events::{OwnerSource, RetransmitEvent, RetransmitKind},
    loader::{HookReport, HookStatus},
};

/// Counters the source tasks bump without taking the registry lock.
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub received_retransmit: AtomicU64,
    pub received_synack: AtomicU64,
    pub decode_errors: AtomicU64,
    pub channel_dropped: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    netns: u32,
    cgroup: String,
    process: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct RetransmitCounts {
    events: u64,
    segments: u64,
    synack: u64,
}

pub struct Registry {
    retransmits: BTreeMap<Series, RetransmitCounts>,
    failed_attempts: BTreeMap<(u32, &'static str), u64>,
    attributed: BTreeMap<&'static str, u64>,
    hooks: Vec<HookReport>,
    lost: Option<PerCpuArray<MapData, u64>>,
    pub cgroup_cache_entries: usize,
    pub proc_socket_entries: usize,
}

fn errno_name(err: i32) -> &'static str {
    match -err {
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

impl Registry {
    pub fn new(hooks: Vec<HookReport>, lost: Option<PerCpuArray<MapData, u64>>) -> Registry {
        Registry {
            retransmits: BTreeMap::new(),
            failed_attempts: BTreeMap::new(),
            attributed: BTreeMap::new(),
            hooks,
            lost,
            cgroup_cache_entries: 0,
            proc_socket_entries: 0,
        }
    }

    pub fn record_retransmit(&mut self, e: &RetransmitEvent, who: &Identity) {
        let source = match e.owner.as_ref().map(|o| o.source) {
            Some(OwnerSource::Kernel) => "kernel",
            Some(OwnerSource::Proc) => "proc",
            None => "none",
        };
        *self.attributed.entry(source).or_default() += 1;
        let counted = e.counted_segments();
        if counted == 0 {
            *self.failed_attempts.entry((e.netns, errno_name(e.err))).or_default() += 1;
            return;
        }
        let series = Series {
            netns: e.netns,
            cgroup: who.cgroup.clone().unwrap_or_else(|| UNKNOWN.into()),
            process: who.comm.clone().unwrap_or_else(|| UNKNOWN.into()),
        };
        let c = self.retransmits.entry(series).or_default();
        c.events += 1;
        c.segments += u64::from(counted);
        if e.kind == RetransmitKind::SynAck {
            c.synack += 1;
        }
    }

    fn lost_events(&self) -> [u64; 2] {
        let mut out = [0u64; 2];
        if let Some(lost) = &self.lost {
            for (i, slot) in [LossSlot::Retransmit, LossSlot::SynAckRetransmit].into_iter().enumerate() {
                if let Ok(per_cpu) = lost.get(&(slot as u32), 0) {
                    out[i] = per_cpu.iter().sum();
                }
            }
        }
        out
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, stats: &PipelineStats) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        };
        let labels = |s: &Series| {
            format!("netns=\"{}\",cgroup=\"{}\",process=\"{}\"", s.netns, escape(&s.cgroup), escape(&s.process))
        };

        counter(&mut out, "vigil_tcp_retransmitted_segments_total", "TCP segments retransmitted, as the kernel counts them in Tcp RetransSegs (data, SYN and SYN-ACK).");
        for (s, c) in &self.retransmits {
            let _ = writeln!(out, "vigil_tcp_retransmitted_segments_total{{{}}} {}", labels(s), c.segments);
        }
        counter(&mut out, "vigil_tcp_retransmit_events_total", "Retransmissions (one event can carry several GSO segments).");
        for (s, c) in &self.retransmits {
            let _ = writeln!(out, "vigil_tcp_retransmit_events_total{{{}}} {}", labels(s), c.events);
        }
        counter(&mut out, "vigil_tcp_synack_retransmits_total", "SYN-ACKs retransmitted by listeners (included in the segment total).");
        for (s, c) in &self.retransmits {
            let _ = writeln!(out, "vigil_tcp_synack_retransmits_total{{{}}} {}", labels(s), c.synack);
        }
        counter(&mut out, "vigil_tcp_retransmit_failed_attempts_total", "Retransmit attempts the kernel abandoned before sending (not in RetransSegs), by errno.");
        for ((netns, errno), n) in &self.failed_attempts {
            let _ = writeln!(out, "vigil_tcp_retransmit_failed_attempts_total{{netns=\"{netns}\",errno=\"{errno}\"}} {n}");
        }

        let lost = self.lost_events();
        counter(&mut out, "vigil_events_lost_total", "Kernel events dropped because the ring buffer to the agent was full.");
        let _ = writeln!(out, "vigil_events_lost_total{{probe=\"retransmit\"}} {}", lost[0]);
        let _ = writeln!(out, "vigil_events_lost_total{{probe=\"synack_retransmit\"}} {}", lost[1]);
        counter(&mut out, "vigil_events_received_total", "Kernel events read from the ring buffer.");
        let _ = writeln!(out, "vigil_events_received_total{{probe=\"retransmit\"}} {}", stats.received_retransmit.load(Ordering::Relaxed));
        let _ = writeln!(out, "vigil_events_received_total{{probe=\"synack_retransmit\"}} {}", stats.received_synack.load(Ordering::Relaxed));
        counter(&mut out, "vigil_events_dropped_total", "Events dropped inside the agent because a queue was full.");
        let _ = writeln!(out, "vigil_events_dropped_total{{stage=\"source_channel\"}} {}", stats.channel_dropped.load(Ordering::Relaxed));
        counter(&mut out, "vigil_event_decode_errors_total", "Ring-buffer records that could not be decoded.");
        let _ = writeln!(out, "vigil_event_decode_errors_total {}", stats.decode_errors.load(Ordering::Relaxed));
        counter(&mut out, "vigil_event_attributions_total", "Events by where their socket owner came from (kernel, proc, none).");
        for (source, n) in &self.attributed {
            let _ = writeln!(out, "vigil_event_attributions_total{{source=\"{source}\"}} {n}");
        }

        let _ = writeln!(out, "# HELP vigil_hook_active 1 when the hook is attached, 0 when disabled or unavailable.\n# TYPE vigil_hook_active gauge");
        for h in &self.hooks {
            let active = u8::from(h.status == HookStatus::Active);
            let _ = writeln!(out, "vigil_hook_active{{hook=\"{}\",signal=\"{}\"}} {active}", h.hook, h.signal);
        }
        let _ = writeln!(out, "# HELP vigil_cache_entries Entries in the agent's bounded caches.\n# TYPE vigil_cache_entries gauge");
        let _ = writeln!(out, "vigil_cache_entries{{cache=\"cgroup_paths\"}} {}", self.cgroup_cache_entries);
        let _ = writeln!(out, "vigil_cache_entries{{cache=\"proc_sockets\"}} {}", self.proc_socket_entries);
        let _ = writeln!(out, "# HELP vigil_build_info Build of the running agent.\n# TYPE vigil_build_info gauge");
        let _ = writeln!(out, "vigil_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        out
    }
}

/// Label value escaping per the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Endpoints, Owner};

    fn event(segs: u32, err: i32, kind: RetransmitKind) -> RetransmitEvent {
        RetransmitEvent {
            kind,
            ts_ns: 1,
            cookie: 1,
            sk_addr: 1,
            netns: 7,
            tcp_state: 1,
            segs,
            err,
            endpoints: Endpoints { local: "198.18.1.1:80".parse().expect("addr"), remote: "198.18.1.2:5000".parse().expect("addr") },
            owner: Some(Owner { pid: 3, comm: "origin".into(), cgroup_id: 9, source: OwnerSource::Kernel }),
        }
    }

    #[test]
    fn sums_segments_and_separates_failures() {
        let mut r = Registry::new(vec![], None);
        let who = Identity { pid: Some(3), comm: Some("origin".into()), cgroup: Some("/pods/a\"b".into()) };
        r.record_retransmit(&event(4, 0, RetransmitKind::Segment), &who);
        r.record_retransmit(&event(2, 0, RetransmitKind::Segment), &who);
        r.record_retransmit(&event(1, 0, RetransmitKind::SynAck), &who);
        r.record_retransmit(&event(5, -libc::EBUSY, RetransmitKind::Segment), &who);
        let text = r.render(&PipelineStats::default());
        let labels = r#"netns="7",cgroup="/pods/a\"b",process="origin""#;
        assert!(text.contains(&format!("vigil_tcp_retransmitted_segments_total{{{labels}}} 7")), "{text}");
        assert!(text.contains(&format!("vigil_tcp_retransmit_events_total{{{labels}}} 3")), "{text}");
        assert!(text.contains(&format!("vigil_tcp_synack_retransmits_total{{{labels}}} 1")), "{text}");
        assert!(text.contains(r#"vigil_tcp_retransmit_failed_attempts_total{netns="7",errno="EBUSY"} 1"#), "{text}");
        assert!(!text.contains("pid"), "pids never become labels");
    }
}
