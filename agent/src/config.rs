//! Typed configuration: a TOML file with a default for every field, validated
//! at start with errors that name the field; CLI flags override it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    pub probes: ProbesConfig,
    pub pipeline: PipelineConfig,
    pub enrich: EnrichConfig,
    pub sampler: SamplerConfig,
    pub metrics: MetricsConfig,
    pub correlate: CorrelateConfig,
    pub receiver: ReceiverConfig,
    pub actuation: ActuationConfig,
}

/// Acting on selected workloads (`agent/src/act`): opt-in per workload,
/// recommend-only unless `mode = "enforce"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ActuationConfig {
    /// `off`, `recommend` (decide and record, change nothing) or `enforce`.
    pub mode: crate::act::ActuationMode,
    /// Selectors of the workloads acting may touch (`--act-on`):
    /// `cgroup:PATH`, `process:NAME`, `pod:NAMESPACE/NAME`, `namespace:NAME`,
    /// `label:KEY=VALUE`. Empty: none.
    pub workloads: Vec<String>,
    /// A steering program whose heartbeat is older than this leaves new
    /// connections to the kernel's hash and refuses none (fail-open).
    pub heartbeat_timeout_ms: u64,
    /// How often the members' accept queues are read, decisions made and
    /// the heartbeat written.
    pub poll_interval_ms: u64,
    /// A member whose accept queue held connections and never shrank for
    /// this long is stalled, and steered away from.
    pub stall_window_ms: u64,
    /// Audit records kept for `vigil status` and `/v1/actuation`.
    pub audit_records: usize,
    /// How a group whose members are all saturated refuses new connections
    /// (`--admission-law`): `pie` (a PI controller on queue delay), `aimd`,
    /// or `off` (never refuse).
    pub admission_law: crate::act::admission::AdmissionLaw,
    /// Queue delay admission control holds a saturated group to: the time
    /// a new connection may wait in an accept queue.
    pub queue_delay_target_ms: u64,
    /// Least fraction of new connections always admitted, however
    /// overloaded the group (0.1: at least one in ten).
    pub admission_floor: f64,
    /// Largest change of the refused fraction per poll.
    pub max_shed_step: f64,
    /// How often the control API's services report their load and their
    /// targets are re-evaluated.
    pub control_period_ms: u32,
    /// How services' connection pools are sized (`--pool-controller`):
    /// `kernel` (Little's law with the kernel's view of the upstream) or
    /// `classic` (the wait/idle rules teams run today).
    pub pool_controller: crate::act::pools::PoolLaw,
    /// Services registered with the control API at once, on this node.
    pub max_registrations: usize,
}

impl Default for ActuationConfig {
    fn default() -> Self {
        ActuationConfig {
            mode: crate::act::ActuationMode::Recommend,
            workloads: Vec::new(),
            heartbeat_timeout_ms: 1000,
            poll_interval_ms: 100,
            stall_window_ms: 300,
            audit_records: 1024,
            admission_law: crate::act::admission::AdmissionLaw::Pie,
            queue_delay_target_ms: 10,
            admission_floor: 0.1,
            max_shed_step: 0.1,
            control_period_ms: 1000,
            pool_controller: crate::act::pools::PoolLaw::Kernel,
            max_registrations: 256,
        }
    }
}

impl ActuationConfig {
    /// Admission control's settings (validated by `Config::validate`).
    pub fn admission(&self) -> crate::act::admission::AdmissionSettings {
        crate::act::admission::AdmissionSettings {
            law: self.admission_law,
            delay_target: self.queue_delay_target_ms as f64 / 1000.0,
            floor: self.admission_floor,
            max_step: self.max_shed_step,
        }
    }

    /// The parsed selectors (validated by `Config::validate`).
    pub fn selectors(&self) -> Result<Vec<crate::act::selector::Selector>, ConfigError> {
        self.workloads
            .iter()
            .map(|w| {
                w.parse().map_err(
                    |e: crate::act::selector::SelectorError| ConfigError::Invalid {
                        field: "actuation.workloads",
                        reason: e.to_string(),
                    },
                )
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the Prometheus endpoint listens.
    pub metrics_addr: SocketAddr,
    /// When set, every decoded event is appended to this file as one JSON line.
    pub event_log: Option<PathBuf>,
    /// How long shutdown may take to drain and flush before the agent exits anyway.
    pub shutdown_timeout_ms: u64,
    /// This node's name (the pods watched are those bound to it). Unset: the
    /// NODE_NAME environment variable (the chart sets it from the downward
    /// API), else the kernel's hostname.
    pub node_name: Option<String>,
    /// The Unix socket of the control API (served unless actuation is off);
    /// the chart shares its directory with pods.
    pub control_socket: PathBuf,
    /// The Unix socket (mode 0600, root's) of the query endpoints that list
    /// the node's connections and traces: `vigil sockets`, `explain`,
    /// `status`. Never in a directory shared with pods.
    pub query_socket: PathBuf,
}

/// Where `agent.query_socket` is unless configured, and where the CLI looks.
pub const DEFAULT_QUERY_SOCKET: &str = "/run/vigil-agent/query.sock";

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            event_log: None,
            shutdown_timeout_ms: 5_000,
            node_name: None,
            control_socket: PathBuf::from(vigil_control::DEFAULT_SOCKET),
            query_socket: PathBuf::from(DEFAULT_QUERY_SOCKET),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    /// Kernel-to-agent ring buffer; a power of two, at least one page.
    pub ring_buffer_bytes: u32,
    /// Sockets the kernel tracks (owner, retransmit baseline); LRU beyond this.
    pub socket_table_entries: u32,
    /// Hooks not to attach, by name (see `vigil hooks`).
    pub disable_hooks: Vec<String>,
    /// Let the kernel programs' aya-log debug messages through (costly; for debugging).
    pub kernel_debug_logs: bool,
    /// Packet drop reasons to report (`enum skb_drop_reason` names without the
    /// `SKB_DROP_REASON_` prefix; a trailing `*` matches a prefix).
    pub drop_reasons: Vec<String>,
    /// Root of the node's cgroup v2 hierarchy, where the HTTP trace-context
    /// capture attaches to see every socket (unless
    /// `correlate.capture_cgroups` names other cgroups). Unset: this
    /// process's cgroup2 mount (in a pod, mount the host's /sys/fs/cgroup).
    pub cgroup_root: Option<PathBuf>,
    /// An eBPF object to load instead of the built-in one (`vigil agent
    /// --probes-object`, hidden: for testing a build of ebpf-probes). Not a
    /// config key.
    #[serde(skip)]
    pub object: Option<PathBuf>,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            ring_buffer_bytes: 4 << 20,
            socket_table_entries: 65_536,
            disable_hooks: Vec::new(),
            kernel_debug_logs: false,
            drop_reasons: ["SOCKET_*", "TCP_*", "PROTO_MEM"]
                .map(String::from)
                .to_vec(),
            cgroup_root: None,
            object: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Batches the source may queue for the state owner before it drops (and counts).
    pub channel_capacity_batches: usize,
    /// Events per batch handed from a source to the state owner.
    pub batch_max_events: usize,
    /// The kernel wakes the agent only once this many bytes wait in the ring
    /// (a wakeup per event costs an interrupt each); smaller backlogs are
    /// collected every `poll_interval_ms`.
    pub wakeup_bytes: u32,
    /// How often the agent drains the ring without being woken.
    pub poll_interval_ms: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            channel_capacity_batches: 1_024,
            batch_max_events: 256,
            wakeup_bytes: 64 << 10,
            poll_interval_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichConfig {
    /// Least time between two /proc rescans triggered by unattributed events.
    pub proc_rescan_min_interval_ms: u64,
    /// Socket owners are reconciled with /proc this often regardless of misses.
    pub proc_reconcile_interval_ms: u64,
    /// Cached cgroup id -> path entries.
    pub cgroup_cache_entries: usize,
    /// Watch this node's pods in the Kubernetes API for their names and
    /// namespaces, when running in a cluster (KUBERNETES_SERVICE_HOST or
    /// KUBECONFIG set). Off, or outside a cluster: pod uids from cgroups only.
    pub kubernetes_api: bool,
    /// Pods the directory holds; more are refused and counted.
    pub pod_directory_entries: usize,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        EnrichConfig {
            proc_rescan_min_interval_ms: 1_000,
            proc_reconcile_interval_ms: 60_000,
            cgroup_cache_entries: 4_096,
            kubernetes_api: true,
            pod_directory_entries: crate::kube_pods::DEFAULT_MAX_PODS,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// How often every TCP socket is sampled (listen queues, RTT, cwnd).
    pub interval_ms: u64,
    /// Connections kept with their latest sample for `vigil sockets`;
    /// beyond this the rest are aggregated but not listed.
    pub connection_table_entries: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            interval_ms: 1_000,
            connection_table_entries: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Most owner label sets (netns, cgroup, process) per-owner metrics may
    /// have; beyond it observations go to one overflow series (cgroup="_overflow").
    pub max_series: usize,
    /// Owner label sets without updates for this long are forgotten.
    pub series_idle_expiry_secs: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_series: 10_000,
            series_idle_expiry_secs: 900,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CorrelateConfig {
    /// Connections whose kernel events are kept for joining spans with.
    pub ledger_connections: usize,
    /// Events kept per connection (the oldest go first).
    pub ledger_events_per_connection: usize,
    /// How long a connection's events are kept after it was last seen.
    pub ledger_retention_secs: u64,
    /// Traces `vigil explain` can answer for (the least recently seen go first).
    pub trace_index_entries: usize,
    /// cgroup v2 directories the HTTP trace-context capture covers, each
    /// absolute (`/sys/fs/cgroup/kubepods.slice`) or relative to the cgroup
    /// v2 root (`kubepods.slice/kubepods-burstable.slice`). A cgroup's
    /// capture covers the processes (and, on kernels where it reads
    /// packets, the sockets) of every cgroup below it; reads and writes
    /// elsewhere pay only that check, and their kernel events carry no
    /// trace ids. No
    /// entry may be inside another (its packets would be captured twice);
    /// one that is missing, outside the hierarchy or not a cgroup v2
    /// directory stops the agent at start. Empty: the cgroup v2 root, every
    /// socket of the node.
    pub capture_cgroups: Vec<String>,
    /// Read the messages this node's sockets send too (requests of clients,
    /// responses of servers): where the application writes them
    /// (`tp_btf/tcp_sendmsg_locked`), or on kernels without that tracepoint
    /// from every packet sent (`cgroup_skb/egress`). false: only messages
    /// received are read (where the application reads them,
    /// `tp_btf/sock_recv_length`, or from the packets, `cgroup_skb/ingress`);
    /// servers keep the trace context of each request they receive, client
    /// sockets carry none.
    pub capture_sent: bool,
}

impl Default for CorrelateConfig {
    fn default() -> Self {
        CorrelateConfig {
            ledger_connections: 16_384,
            ledger_events_per_connection: 256,
            ledger_retention_secs: 300,
            trace_index_entries: 4_096,
            capture_cgroups: Vec::new(),
            capture_sent: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiverConfig {
    /// Run the OTLP/gRPC span receiver: services send it their spans, which
    /// are joined with their connection's kernel events (`vigil.tcp.*`
    /// attributes and span events) and forwarded to the OTLP traces endpoint
    /// (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT).
    /// Without such an endpoint there is nowhere to forward to, and the
    /// receiver does not run.
    pub enabled: bool,
    /// Where it listens. The default, OTLP/gRPC's port on loopback, serves
    /// processes in the host's network namespace; the Helm chart listens on
    /// 0.0.0.0:4317 and publishes it as a hostPort, so pods send to their
    /// node's IP.
    pub listen: SocketAddr,
    /// Spans held (waiting for their join delay or for the upstream) before
    /// new ones are shed and counted; about 1 KiB each.
    pub queue_spans: usize,
    /// Spans per export request to the upstream.
    pub max_batch_spans: usize,
    /// How long after its end a span is joined: its connection's kernel
    /// events reach the ledger within pipeline.poll_interval_ms, its RTT and
    /// accept-queue samples every sampler.interval_ms.
    pub join_delay_ms: u64,
    /// Span events (one per retransmit or drop) added to one span at most;
    /// the rest are counted in `vigil.tcp.events_omitted`.
    pub max_events_per_span: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 4317)),
            queue_spans: 8_192,
            max_batch_spans: 512,
            join_delay_ms: 1_500,
            max_events_per_span: 32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl AgentConfig {
    /// The node name: configured, else NODE_NAME, else the kernel's hostname.
    pub fn resolved_node_name(&self) -> String {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .unwrap_or_default()
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Checks every policy value; `hook_names` are the hooks this build knows.
    pub fn validate<'a>(
        &self,
        hook_names: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let ring = self.probes.ring_buffer_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            return invalid(
                "probes.ring_buffer_bytes",
                format!("{ring} is not a power of two >= 4096"),
            );
        }
        if self.probes.socket_table_entries == 0 {
            return invalid("probes.socket_table_entries", "must be at least 1".into());
        }
        for hook in &self.probes.disable_hooks {
            if !hook_names.clone().any(|h| h == hook) {
                let known: Vec<&str> = hook_names.clone().collect();
                return invalid(
                    "probes.disable_hooks",
                    format!("unknown hook `{hook}`; known hooks: {}", known.join(", ")),
                );
            }
        }
        if self.pipeline.channel_capacity_batches == 0 {
            return invalid(
                "pipeline.channel_capacity_batches",
                "must be at least 1".into(),
            );
        }
        if self.pipeline.wakeup_bytes >= ring {
            return invalid(
                "pipeline.wakeup_bytes",
                format!(
                    "{} must be below probes.ring_buffer_bytes ({ring})",
                    self.pipeline.wakeup_bytes
                ),
            );
        }
        if !(1..=10_000).contains(&self.pipeline.poll_interval_ms) {
            return invalid("pipeline.poll_interval_ms", "must be 1..=10000".into());
        }
        if self.pipeline.batch_max_events == 0 {
            return invalid("pipeline.batch_max_events", "must be at least 1".into());
        }
        if self.enrich.cgroup_cache_entries == 0 {
            return invalid("enrich.cgroup_cache_entries", "must be at least 1".into());
        }
        if let Some(bad) = self
            .probes
            .drop_reasons
            .iter()
            .find(|p| !crate::loader::drop_reasons::valid_pattern(p))
        {
            return invalid(
                "probes.drop_reasons",
                format!("`{bad}` is not a drop reason name (like SOCKET_RCVBUFF) or prefix (like TCP_*)"),
            );
        }
        if self.enrich.proc_reconcile_interval_ms < 1_000 {
            return invalid(
                "enrich.proc_reconcile_interval_ms",
                "must be at least 1000 (a /proc scan costs real time on a busy node)".into(),
            );
        }
        if self.metrics.max_series == 0 {
            return invalid("metrics.max_series", "must be at least 1".into());
        }
        for (field, value) in [
            (
                "correlate.ledger_connections",
                self.correlate.ledger_connections,
            ),
            (
                "correlate.ledger_events_per_connection",
                self.correlate.ledger_events_per_connection,
            ),
            (
                "correlate.trace_index_entries",
                self.correlate.trace_index_entries,
            ),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.correlate.capture_cgroups.iter().any(String::is_empty) {
            return invalid(
                "correlate.capture_cgroups",
                "an entry is empty; name a cgroup directory (the cgroup v2 root for every socket)"
                    .into(),
            );
        }
        let listed = self.correlate.capture_cgroups.len();
        if listed > vigil_abi::MAX_CAPTURE_CGROUPS as usize {
            return invalid(
                "correlate.capture_cgroups",
                format!(
                    "{listed} cgroups listed; at most {} are supported (list a common parent instead)",
                    vigil_abi::MAX_CAPTURE_CGROUPS
                ),
            );
        }
        if !(10..=3_600_000).contains(&self.sampler.interval_ms) {
            return invalid("sampler.interval_ms", "must be 10..=3600000".into());
        }
        for (field, value) in [
            ("receiver.queue_spans", self.receiver.queue_spans),
            ("receiver.max_batch_spans", self.receiver.max_batch_spans),
        ] {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.receiver.join_delay_ms > 60_000 {
            return invalid("receiver.join_delay_ms", "must be 0..=60000".into());
        }
        self.actuation.selectors()?;
        let a = &self.actuation;
        if !(10..=1000).contains(&a.poll_interval_ms) {
            return invalid("actuation.poll_interval_ms", "must be 10..=1000".into());
        }
        if a.heartbeat_timeout_ms < 3 * a.poll_interval_ms || a.heartbeat_timeout_ms > 2000 {
            return invalid(
                "actuation.heartbeat_timeout_ms",
                format!(
                    "must be at least three polls ({} ms) and at most 2000",
                    3 * a.poll_interval_ms
                ),
            );
        }
        if a.stall_window_ms < 2 * a.poll_interval_ms || a.stall_window_ms > 60_000 {
            return invalid(
                "actuation.stall_window_ms",
                format!(
                    "must be at least two polls ({} ms) and at most 60000",
                    2 * a.poll_interval_ms
                ),
            );
        }
        if a.audit_records == 0 || a.audit_records > 100_000 {
            return invalid("actuation.audit_records", "must be 1..=100000".into());
        }
        if !(1..=10_000).contains(&a.queue_delay_target_ms) {
            return invalid(
                "actuation.queue_delay_target_ms",
                "must be 1..=10000".into(),
            );
        }
        if !(0.01..=1.0).contains(&a.admission_floor) {
            return invalid(
                "actuation.admission_floor",
                "must be 0.01..=1 (the fraction always admitted)".into(),
            );
        }
        if !(0.01..=0.5).contains(&a.max_shed_step) {
            return invalid("actuation.max_shed_step", "must be 0.01..=0.5".into());
        }
        if !(100..=60_000).contains(&a.control_period_ms) {
            return invalid("actuation.control_period_ms", "must be 100..=60000".into());
        }
        if !(1..=10_000).contains(&a.max_registrations) {
            return invalid("actuation.max_registrations", "must be 1..=10000".into());
        }
        for (key, path) in [
            ("agent.control_socket", &self.agent.control_socket),
            ("agent.query_socket", &self.agent.query_socket),
        ] {
            if path.as_os_str().is_empty() || path.as_os_str().len() > 100 || !path.is_absolute() {
                return invalid(
                    key,
                    "must be an absolute path of at most 100 bytes (a Unix socket's limit is 108)"
                        .into(),
                );
            }
        }
        if self.agent.query_socket.parent() == self.agent.control_socket.parent() {
            return invalid(
                "agent.query_socket",
                "must not be in agent.control_socket's directory: that one is shared with pods"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOOKS: [&str; 1] = ["tp_btf/tcp_retransmit_skb"];

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::from_toml("").expect("parses"), Config::default());
        Config::default()
            .validate(HOOKS.iter().copied())
            .expect("defaults are valid");
    }

    #[test]
    fn default_config_round_trips() {
        let text = toml::to_string(&Config::default()).expect("serializes");
        assert_eq!(Config::from_toml(&text).expect("parses"), Config::default());
    }

    #[test]
    fn unknown_and_mistyped_fields_are_named() {
        let err =
            Config::from_toml("[probes]\nring_bufer_bytes = 4096\n").expect_err("typo rejected");
        assert!(err.contains("ring_bufer_bytes"), "{err}");
        let err = Config::from_toml("[agent]\nmetrics_addr = \"not an address\"\n")
            .expect_err("bad addr rejected");
        assert!(err.contains("metrics_addr"), "{err}");
    }

    /// The default config changed by `change` must fail validation with a
    /// message naming `field`; the message, for further checks.
    fn rejected(change: impl FnOnce(&mut Config), field: &str) -> String {
        let mut c = Config::default();
        change(&mut c);
        let err = match c.validate(HOOKS.iter().copied()) {
            Ok(()) => panic!("accepted, expected an error naming {field}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(field), "{err}");
        err
    }

    #[test]
    fn validation_names_the_field() {
        rejected(
            |c| c.probes.ring_buffer_bytes = 5000,
            "probes.ring_buffer_bytes",
        );
        let err = rejected(
            |c| c.probes.disable_hooks = vec!["kprobe/nope".into()],
            "probes.disable_hooks",
        );
        // The message lists the hooks that exist.
        assert!(err.contains("tp_btf/tcp_retransmit_skb"), "{err}");
    }

    #[test]
    fn actuation_is_recommend_only_by_default_and_checked() {
        let a = ActuationConfig::default();
        assert_eq!(a.mode, crate::act::ActuationMode::Recommend);
        assert!(a.workloads.is_empty() && a.heartbeat_timeout_ms <= 2000);
        let c = Config::from_toml(
            "[actuation]\nmode = \"enforce\"\nworkloads = [\"cgroup:/vigil/origin\", \"label:app=origin\"]\n",
        )
        .expect("parses");
        assert_eq!(c.actuation.selectors().expect("selectors").len(), 2);
        let err = Config::from_toml("[actuation]\nmode = \"always\"\n").expect_err("bad mode");
        assert!(err.contains("mode"), "{err}");
        let err = rejected(
            |c| c.actuation.workloads = vec!["origin".into()],
            "actuation.workloads",
        );
        assert!(err.contains("cgroup:PATH"), "{err}");
        rejected(
            |c| c.actuation.heartbeat_timeout_ms = 5000,
            "actuation.heartbeat_timeout_ms",
        );
        rejected(
            |c| c.actuation.heartbeat_timeout_ms = 200,
            "actuation.heartbeat_timeout_ms",
        );
        rejected(
            |c| c.actuation.poll_interval_ms = 0,
            "actuation.poll_interval_ms",
        );
        rejected(
            |c| c.actuation.stall_window_ms = 100,
            "actuation.stall_window_ms",
        );
        rejected(|c| c.actuation.audit_records = 0, "actuation.audit_records");
        rejected(
            |c| c.actuation.control_period_ms = 10,
            "actuation.control_period_ms",
        );
        rejected(
            |c| c.agent.control_socket = "control.sock".into(),
            "agent.control_socket",
        );
        rejected(|c| c.agent.query_socket = "".into(), "agent.query_socket");
        let err = rejected(
            |c| c.agent.query_socket = "/run/vigil/query.sock".into(),
            "agent.query_socket",
        );
        assert!(err.contains("shared with pods"), "{err}");
        rejected(
            |c| c.actuation.queue_delay_target_ms = 0,
            "actuation.queue_delay_target_ms",
        );
        rejected(
            |c| c.actuation.admission_floor = 0.0,
            "actuation.admission_floor",
        );
        rejected(
            |c| c.actuation.admission_floor = f64::NAN,
            "actuation.admission_floor",
        );
        rejected(
            |c| c.actuation.max_shed_step = 0.9,
            "actuation.max_shed_step",
        );
        let c = Config::from_toml("[actuation]\nadmission_law = \"aimd\"\n").expect("aimd");
        assert_eq!(
            c.actuation.admission().law,
            crate::act::admission::AdmissionLaw::Aimd
        );
    }

    #[test]
    fn drop_reasons_and_sampler_are_checked() {
        rejected(
            |c| c.probes.drop_reasons = vec!["tcp_listen_overflow".into()],
            "probes.drop_reasons",
        );
        rejected(|c| c.sampler.interval_ms = 0, "sampler.interval_ms");
        rejected(
            |c| c.correlate.capture_cgroups = vec!["kubepods.slice".into(), String::new()],
            "correlate.capture_cgroups",
        );
        let cgroups =
            |n: u32| -> Vec<String> { (0..n).map(|i| format!("kubepods.slice/pod{i}")).collect() };
        let max = vigil_abi::MAX_CAPTURE_CGROUPS;
        let err = rejected(
            |c| c.correlate.capture_cgroups = cgroups(max + 1),
            "correlate.capture_cgroups",
        );
        assert!(err.contains("at most 16"), "{err}");
        let mut c = Config::default();
        c.correlate.capture_cgroups = cgroups(max);
        assert!(c.validate(HOOKS.iter().copied()).is_ok(), "16 are fine");
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let err = Config::from_file(Path::new("/nonexistent/vigil.toml"))
            .expect_err("missing file")
            .to_string();
        assert!(err.contains("/nonexistent/vigil.toml"), "{err}");
    }
}
