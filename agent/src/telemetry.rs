//! The agent's own telemetry, read live by whoever exports: the kernel's
//! counters (bpf(2) reads of Vigil's maps and program statistics), the
//! pipeline's and exporters' atomic counters, and the hooks' states. Nothing
//! here is the state owner's, so exporting takes no lock the event path
//! waits on; the aggregates come from the published `View`.

use std::sync::{atomic::Ordering, Arc};

use vigil_abi::{loss_index, CaptureOutcome, LossReason, LossSlot};

use crate::{
    export::otlp::OtlpStats,
    exposition::Exposition,
    kube_pods::KubeStats,
    loader::{
        prog_stats::{ProgramHandle, ProgramStats},
        HookReport, HookStatus, LossMaps,
    },
    metrics::{Family, PipelineStats},
    view::View,
};

pub struct Telemetry {
    pub hooks: Vec<HookReport>,
    pub lost: Option<LossMaps>,
    pub programs: Vec<ProgramHandle>,
    pub stats: Arc<PipelineStats>,
    /// The pod watch's telemetry, when the agent watches the Kubernetes API.
    pub kube: Option<Arc<KubeStats>>,
    /// The OTLP exporter's telemetry, when it runs.
    pub otlp: Option<Arc<OtlpStats>>,
    /// The OTLP span receiver's telemetry, when it runs.
    pub receiver: Option<Arc<crate::correlate::receiver::ReceiverStats>>,
    /// Acting's groups and decisions.
    pub actuation: Option<Arc<crate::act::ActState>>,
    /// The control API's registrations, refusals and target changes.
    pub services: Option<Arc<std::sync::Mutex<crate::act::services::Services>>>,
}

impl Telemetry {
    pub fn new(
        hooks: Vec<HookReport>,
        lost: Option<LossMaps>,
        programs: Vec<ProgramHandle>,
        stats: Arc<PipelineStats>,
    ) -> Telemetry {
        Telemetry {
            hooks,
            lost,
            programs,
            stats,
            kube: None,
            otlp: None,
            receiver: None,
            actuation: None,
            services: None,
        }
    }

    /// Which signals the agent delivers on this kernel (`/healthz`).
    pub fn health_report(&self) -> crate::health::Health {
        crate::health::Health::of(&self.hooks)
    }

    /// Every metric family of this moment: the view's aggregates, then the
    /// agent's own (for Prometheus and OTLP alike).
    pub fn families(&self, view: &View) -> Exposition {
        let mut x = view.families.clone();
        self.append(&mut x);
        x
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, view: &View) -> String {
        self.families(view).text()
    }

    /// OpenMetrics 1.0 text, with exemplars.
    pub fn render_open_metrics(&self, view: &View) -> String {
        self.families(view).open_metrics()
    }

    /// Kernel-side losses, summed over CPUs: [probe][reason] as in `loss_index`.
    fn lost_events(&self, slot: LossSlot, reason: LossReason) -> u64 {
        self.lost
            .as_ref()
            .and_then(|lost| lost.events.get(&loss_index(slot, reason), 0).ok())
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    fn append(&self, x: &mut Exposition) {
        let programs: Vec<(&str, ProgramStats)> = self
            .programs
            .iter()
            .filter_map(|p| Some((p.name.as_str(), p.stats().ok()?)))
            .collect();
        let misses = |program: &str| {
            programs
                .iter()
                .find(|(n, _)| *n == program)
                .map_or(0, |(_, s)| s.recursion_misses)
        };
        let name = "vigil_events_lost_total";
        x.family(name, "counter", "Kernel events Vigil never received: the ring buffer was full, a kernel read failed, or the kernel skipped the probe because it was already running on that CPU (recursion).");
        let probes = [
            ("retransmit", LossSlot::Retransmit, "vigil_retx"),
            (
                "synack_retransmit",
                LossSlot::SynAckRetransmit,
                "vigil_synack",
            ),
            ("socket_drop", LossSlot::SocketDrop, "vigil_drop"),
        ];
        for (probe, slot, program) in probes {
            let counts = [
                ("ring_full", self.lost_events(slot, LossReason::RingFull)),
                ("read_error", self.lost_events(slot, LossReason::ReadError)),
                ("recursion", misses(program)),
            ];
            for (reason, n) in counts {
                x.sample(
                    name,
                    &[("probe", probe.into()), ("reason", reason.into())],
                    n,
                );
            }
        }
        let name = "vigil_http_capture_messages_total";
        x.family(name, "counter", "HTTP/1.1 message headers the trace-context capture hooks read, by outcome: traced (a traceparent), untraced (none), repeated (a retransmitted header), abandoned (header too long or continued out of order), answered (a response to a request with a traceparent: not read, the request's context governs the exchange).");
        if let Some(lost) = &self.lost {
            let outcomes = [
                (CaptureOutcome::Traced, "traced"),
                (CaptureOutcome::Untraced, "untraced"),
                (CaptureOutcome::Repeated, "repeated"),
                (CaptureOutcome::Abandoned, "abandoned"),
                (CaptureOutcome::Answered, "answered"),
            ];
            for (outcome, label) in outcomes {
                let n: u64 = lost
                    .capture
                    .get(&(outcome as u32), 0)
                    .map_or(0, |per_cpu| per_cpu.iter().sum());
                x.sample(name, &[("outcome", label.into())], n);
            }
        }
        let name = "vigil_tcp_retransmit_segments_lost_total";
        x.family(name, "counter", "Retransmitted segments the kernel counted whose record never reached the agent, for good (a lost record's segments otherwise ride on the socket's next record); per netns, vigil_tcp_retransmitted_segments_total plus this equals Tcp RetransSegs.");
        if let Some(lost) = &self.lost {
            for (netns, per_cpu) in lost.segments.iter().flatten() {
                let n: u64 = per_cpu.iter().sum();
                x.sample(name, &[("netns", netns.to_string())], n);
            }
        }
        let per_program: [Family<ProgramStats, f64>; 3] = [
            (
                "vigil_probe_recursion_misses_total",
                "Invocations of a kernel program skipped because it was already running on that CPU.",
                |s| s.recursion_misses as f64,
            ),
            (
                "vigil_probe_runs_total",
                "Invocations of a kernel program (counted only while sysctl kernel.bpf_stats_enabled=1).",
                |s| s.run_cnt as f64,
            ),
            (
                "vigil_probe_run_seconds_total",
                "Time spent in a kernel program (counted only while sysctl kernel.bpf_stats_enabled=1).",
                |s| s.run_time_ns as f64 / 1e9,
            ),
        ];
        for (name, help, value) in per_program {
            x.family(name, "counter", help);
            for (program, st) in &programs {
                x.sample(name, &[("program", (*program).to_owned())], value(st));
            }
        }

        let name = "vigil_events_received_total";
        x.family(name, "counter", "Kernel events read from the ring buffer.");
        x.sample(
            name,
            &[("probe", "retransmit".into())],
            self.stats.received_retransmit.load(Ordering::Relaxed),
        );
        x.sample(
            name,
            &[("probe", "synack_retransmit".into())],
            self.stats.received_synack.load(Ordering::Relaxed),
        );
        x.sample(
            name,
            &[("probe", "socket_drop".into())],
            self.stats.received_drop.load(Ordering::Relaxed),
        );
        x.sample(
            name,
            &[("probe", "trace_context".into())],
            self.stats.received_trace.load(Ordering::Relaxed),
        );
        let name = "vigil_events_dropped_total";
        x.family(
            name,
            "counter",
            "Events dropped inside the agent because a queue was full.",
        );
        x.sample(
            name,
            &[("stage", "source_channel".into())],
            self.stats.channel_dropped.load(Ordering::Relaxed),
        );
        x.sample(
            name,
            &[("stage", "sampler_channel".into())],
            self.stats.snapshots_dropped.load(Ordering::Relaxed),
        );
        let name = "vigil_sampler_passes_total";
        x.family(
            name,
            "counter",
            "Passes of the socket sampler over every TCP socket a process holds.",
        );
        x.sample(name, &[], self.stats.sampler_passes.load(Ordering::Relaxed));
        let name = "vigil_sampler_errors_total";
        x.family(
            name,
            "counter",
            "Socket sampler passes that failed (the log says why).",
        );
        x.sample(name, &[], self.stats.sampler_errors.load(Ordering::Relaxed));
        let name = "vigil_sampler_last_pass_seconds";
        x.family(name, "gauge", "Duration of the last sampler pass.");
        x.sample(
            name,
            &[],
            self.stats.sampler_pass_micros.load(Ordering::Relaxed) as f64 / 1e6,
        );
        let name = "vigil_event_decode_errors_total";
        x.family(
            name,
            "counter",
            "Ring-buffer records that could not be decoded.",
        );
        x.sample(name, &[], self.stats.decode_errors.load(Ordering::Relaxed));
        let name = "vigil_trace_messages_unplaced_total";
        x.family(
            name,
            "counter",
            "Traced messages dropped because the agent did not know their socket: its announcement was lost (ring full) or forgotten (more traced sockets than probes.socket_table_entries).",
        );
        x.sample(name, &[], self.stats.trace_unplaced.load(Ordering::Relaxed));
        let name = "vigil_hook_active";
        x.family(
            name,
            "gauge",
            "1 when the hook is attached, 0 when disabled or unavailable.",
        );
        for h in &self.hooks {
            let labels = [
                ("hook", h.hook.to_owned()),
                ("signal", h.signal.to_string()),
            ];
            x.sample(name, &labels, u8::from(h.status == HookStatus::Active));
        }
        if let Some(act) = &self.actuation {
            act.describe(x);
        }
        if let Some(services) = self.services.as_ref().and_then(|s| s.lock().ok()) {
            services.describe(x);
        }
        let name = "vigil_signal_degraded";
        x.family(
            name,
            "gauge",
            "1 when a signal has no attached hook though no setting turned it off (see /healthz for why), else 0.",
        );
        let health = self.health_report();
        let mut signals: Vec<String> = Vec::new();
        for h in &self.hooks {
            let signal = h.signal.to_string();
            if !signals.contains(&signal) {
                let degraded = health.degraded.iter().any(|d| d.signal == signal);
                x.sample(name, &[("signal", signal.clone())], u8::from(degraded));
                signals.push(signal);
            }
        }
        if let Some(k) = &self.kube {
            let counters = [
                ("vigil_kube_watch_events_total", "Pod watch events applied (and completed lists)."),
                ("vigil_kube_watch_errors_total", "Errors listing or watching pods (each followed by a backoff and a resume or relist)."),
                ("vigil_kube_relists_total", "Pod lists after the first: the watch could not be resumed."),
                ("vigil_kube_pods_refused_total", "Pods not kept because the directory was full (enrich.pod_directory_entries)."),
            ];
            let values = [
                &k.events_applied,
                &k.watch_errors,
                &k.relists,
                &k.pods_refused,
            ];
            for ((name, help), v) in counters.into_iter().zip(values) {
                x.family(name, "counter", help);
                x.sample(name, &[], v.load(Ordering::Relaxed));
            }
            let name = "vigil_kube_pods";
            x.family(name, "gauge", "Pods of this node in the directory.");
            x.sample(name, &[], k.pods.load(Ordering::Relaxed));
            let name = "vigil_kube_synced";
            x.family(
                name,
                "gauge",
                "1 once the first list of this node's pods completed.",
            );
            x.sample(name, &[], u8::from(k.synced.load(Ordering::Relaxed)));
        }
        if let Some(o) = &self.otlp {
            let counters = [
                ("vigil_otlp_metric_exports_total", "OTLP metric exports that succeeded.", &o.metric_exports),
                ("vigil_otlp_metric_export_errors_total", "OTLP metric exports that failed (collector unreachable, timeout, refused).", &o.metric_export_errors),
                ("vigil_otlp_log_records_exported_total", "Log records the collector accepted.", &o.log_records_exported),
                ("vigil_otlp_log_export_errors_total", "OTLP log exports that failed.", &o.log_export_errors),
                ("vigil_otlp_log_records_dropped_total", "Log records dropped: the export queue was full, or their export failed (not retried).", &o.log_records_dropped),
            ];
            for (name, help, v) in counters {
                x.family(name, "counter", help);
                x.sample(name, &[], v.load(Ordering::Relaxed));
            }
        }
        if let Some(r) = &self.receiver {
            r.render(x);
        }
        let name = "vigil_build_info";
        x.family(name, "gauge", "Build of the running agent.");
        x.sample(name, &[("version", env!("CARGO_PKG_VERSION").into())], 1u8);
    }
}
