//! The one owner of agent state: attributes each event and socket sample,
//! aggregates them, and appends events to the event log. Runs until every
//! source has hung up.

use std::{
    fs::File,
    io::{BufWriter, Write},
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    clock::MonotonicToWall,
    correlate::{
        ledger::{ConnKey, ConnectionLedger, LedgerEvent, QueueFill},
        traceparent::Stamp,
        traces::TraceKernelEvent,
    },
    enrich::{workload::PodRef, Enricher, Identity, SocketKey},
    events::{
        tcp_state_name, DropEvent, KernelEvent, Message, OwnerSource, RetransmitEvent,
        RetransmitKind, TraceEvent,
    },
    export::otlp::{AttrValue, LogRecordOut, OtlpStats, Severity},
    metrics::Registry,
    sampler::{Sample, Snapshot},
    socket_health::{Overflow, SocketHealth},
    sources::Batch,
    view::{Publisher, TraceQuery, View, PUBLISH_INTERVAL},
};

/// Who, in the event log.
#[derive(Serialize)]
struct Who<'a> {
    pid: Option<u32>,
    comm: Option<&'a str>,
    cgroup: Option<&'a str>,
    /// Pod uid, QoS class, container id and runtime, when the cgroup is a pod's.
    pod: Option<&'a PodRef>,
    owner_source: Option<OwnerSource>,
}

/// A retransmit line of the event log (JSON Lines).
#[derive(Serialize)]
struct RetransmitLine<'a> {
    ts_unix_ns: u64,
    kind: RetransmitKind,
    netns: u32,
    cookie: u64,
    tcp_state: &'static str,
    segs: u32,
    err: i32,
    total_retrans: u32,
    counted_segments: u32,
    /// First sequence number and payload bytes of the retransmitted segment.
    seq: u32,
    bytes: u32,
    local: String,
    remote: String,
    #[serde(flatten)]
    trace: TraceFields,
    /// "namespace/name" of the peer when it is a pod of this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_pod: Option<String>,
    #[serde(flatten)]
    who: Who<'a>,
}

/// A drop line of the event log.
#[derive(Serialize)]
struct DropLine<'a> {
    ts_unix_ns: u64,
    kind: &'static str,
    reason: &'a str,
    netns: u32,
    tcp_state: &'static str,
    protocol: u32,
    local: Option<String>,
    remote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_pod: Option<String>,
    #[serde(flatten)]
    trace: TraceFields,
    #[serde(flatten)]
    who: Who<'a>,
}

/// Trace context of an event-log line: ids, or `trace_invalid` when the
/// captured value was not W3C, or nothing.
#[derive(Serialize)]
struct TraceFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    span_id: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    trace_invalid: bool,
}

impl TraceFields {
    fn of(stamp: &Stamp) -> TraceFields {
        TraceFields {
            trace_id: stamp.context().map(|c| c.trace_id_hex()),
            span_id: stamp.context().map(|c| c.span_id_hex()),
            trace_invalid: *stamp == Stamp::Invalid,
        }
    }
}

/// An HTTP message with trace context, in the event log.
#[derive(Serialize)]
struct TraceLine<'a> {
    ts_unix_ns: u64,
    kind: &'static str,
    netns: u32,
    cookie: u64,
    local: String,
    remote: String,
    /// "sent" or "received" by this socket.
    direction: &'static str,
    message: Message,
    /// First sequence number of this socket's send stream the message governs.
    boundary: u32,
    #[serde(flatten)]
    trace: TraceFields,
    #[serde(flatten)]
    who: Who<'a>,
}

/// A listen-overflow line of the event log: handshakes one listener dropped
/// since the previous socket sample.
#[derive(Serialize)]
struct OverflowLine<'a> {
    ts_unix_ns: u64,
    kind: &'static str,
    netns: u32,
    local: String,
    dropped: u32,
    #[serde(flatten)]
    who: Who<'a>,
}

pub struct EventLog {
    out: BufWriter<File>,
    clock: MonotonicToWall,
}

impl EventLog {
    pub fn open(path: &Path) -> std::io::Result<EventLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(EventLog {
            out: BufWriter::new(file),
            clock: MonotonicToWall::now(),
        })
    }

    fn write_retransmit(
        &mut self,
        e: &RetransmitEvent,
        remote_pod: Option<String>,
        who: Who<'_>,
    ) -> std::io::Result<()> {
        let line = RetransmitLine {
            ts_unix_ns: self.clock.to_unix_ns(e.ts_ns),
            kind: e.kind,
            netns: e.netns,
            cookie: e.cookie,
            tcp_state: tcp_state_name(e.tcp_state),
            segs: e.segs,
            err: e.err,
            total_retrans: e.total_retrans,
            counted_segments: e.counted_segments(),
            seq: e.seq,
            bytes: e.bytes,
            local: e.endpoints.local.to_string(),
            remote: e.endpoints.remote.to_string(),
            trace: TraceFields::of(&e.trace),
            remote_pod,
            who,
        };
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }

    fn write_drop(
        &mut self,
        e: &DropEvent,
        reason: &str,
        remote_pod: Option<String>,
        who: Who<'_>,
    ) -> std::io::Result<()> {
        let line = DropLine {
            ts_unix_ns: self.clock.to_unix_ns(e.ts_ns),
            kind: "drop",
            reason,
            netns: e.netns,
            tcp_state: tcp_state_name(e.tcp_state),
            protocol: e.protocol,
            local: e.endpoints.map(|ep| ep.local.to_string()),
            remote: e.endpoints.map(|ep| ep.remote.to_string()),
            remote_pod,
            trace: TraceFields::of(&e.trace),
            who,
        };
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }
}

impl EventLog {
    fn write_trace(&mut self, e: &TraceEvent, who: Who<'_>) -> std::io::Result<()> {
        let line = TraceLine {
            ts_unix_ns: self.clock.to_unix_ns(e.ts_ns),
            kind: "trace_context",
            netns: e.netns,
            cookie: e.cookie,
            local: e.endpoints.local.to_string(),
            remote: e.endpoints.remote.to_string(),
            direction: if e.sent { "sent" } else { "received" },
            message: e.message,
            boundary: e.boundary,
            trace: TraceFields::of(&e.trace),
            who,
        };
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }
}

pub struct StateOwner {
    pub enricher: Enricher,
    /// The aggregates: this task's alone; readers see them through `view`.
    pub registry: Registry,
    pub view: Publisher,
    pub event_log: Option<EventLog>,
    /// OTLP log records, one per event worth a record, when logs are exported.
    pub otlp_logs: Option<mpsc::Sender<LogRecordOut>>,
    pub otlp_stats: Arc<OtlpStats>,
    pub clock: MonotonicToWall,
    /// How often socket owners are reconciled with /proc.
    pub reconcile_every: std::time::Duration,
    /// Per-connection history that received spans are joined with.
    pub ledger: Arc<Mutex<ConnectionLedger>>,
    /// Kernel events applied so far (0 at the start).
    pub events_applied: u64,
}

/// Attributes every record about a socket carries: OpenTelemetry semantic
/// conventions where one exists (network.*, process.*, k8s.*, container.id),
/// `vigil.*` otherwise.
fn socket_attributes(
    netns: u32,
    local: Option<SocketAddr>,
    remote: Option<SocketAddr>,
    tcp_state: u32,
    who: &Identity,
    peer_pod: Option<String>,
) -> Vec<(String, AttrValue)> {
    let mut a: Vec<(String, AttrValue)> = vec![
        ("network.transport".into(), AttrValue::Str("tcp".into())),
        ("vigil.netns".into(), AttrValue::Int(i64::from(netns))),
        (
            "vigil.tcp.state".into(),
            AttrValue::Str(tcp_state_name(tcp_state).into()),
        ),
    ];
    for (side, addr) in [("local", local), ("peer", remote)] {
        if let Some(addr) = addr {
            a.push((
                format!("network.{side}.address"),
                AttrValue::Str(addr.ip().to_string()),
            ));
            a.push((
                format!("network.{side}.port"),
                AttrValue::Int(i64::from(addr.port())),
            ));
        }
    }
    if let Some(pid) = who.pid {
        a.push(("process.pid".into(), AttrValue::Int(i64::from(pid))));
    }
    if let Some(comm) = &who.comm {
        a.push((
            "process.executable.name".into(),
            AttrValue::Str(comm.clone()),
        ));
    }
    if let Some(cgroup) = &who.cgroup {
        a.push(("vigil.cgroup".into(), AttrValue::Str(cgroup.clone())));
    }
    if let Some(pod) = &who.pod {
        a.push(("k8s.pod.uid".into(), AttrValue::Str(pod.uid.clone())));
        if let Some(name) = &pod.name {
            a.push(("k8s.pod.name".into(), AttrValue::Str(name.clone())));
        }
        if let Some(ns) = &pod.namespace {
            a.push(("k8s.namespace.name".into(), AttrValue::Str(ns.clone())));
        }
        if let Some(id) = &pod.container_id {
            a.push(("container.id".into(), AttrValue::Str(id.clone())));
        }
    }
    if let Some(peer) = peer_pod {
        a.push(("vigil.peer.pod".into(), AttrValue::Str(peer)));
    }
    a
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl StateOwner {
    /// Runs until the event sources hang up; snapshots are taken while they
    /// last. Publishes a view of the aggregates at most every
    /// `PUBLISH_INTERVAL` while events change them, at once after a socket
    /// sample, and a last one when the sources have hung up.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Batch>,
        mut snapshots: mpsc::Receiver<Snapshot>,
        mut trace_queries: mpsc::Receiver<TraceQuery>,
    ) {
        let mut reconcile = tokio::time::interval(self.reconcile_every);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        reconcile.tick().await; // the first tick is immediate; bootstrap just scanned
        let mut publish = tokio::time::interval(PUBLISH_INTERVAL);
        publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.publish();
        loop {
            tokio::select! {
                _ = reconcile.tick() => self.enricher.reconcile(),
                _ = publish.tick() => if self.view.due() {
                    self.publish();
                },
                batch = events.recv() => match batch {
                    Some(batch) => {
                        self.apply_events(batch);
                        if self.view.due() {
                            self.publish();
                        }
                    }
                    None => break,
                },
                Some(snapshot) = snapshots.recv() => {
                    self.apply_snapshot(snapshot);
                    self.publish();
                }
                Some(query) = trace_queries.recv() => {
                    // The asker may have given up (timeout): nothing to do then.
                    let _ = query.reply.send(self.registry.traces.get(&query.trace_id));
                }
            }
        }
        self.publish();
        info!(
            events = self.events_applied,
            "state owner drained all events"
        );
    }

    /// Publishes a view of the aggregates as they are now.
    pub fn publish(&mut self) {
        self.view.publish(View {
            families: self.registry.families(),
            sockets: self.registry.health.table().clone(),
            events_applied: self.events_applied,
        });
    }

    /// Attributes, aggregates and logs one batch of kernel events.
    pub fn apply_events(&mut self, mut batch: Batch) {
        let identities: Vec<Arc<Identity>> = batch
            .iter_mut()
            .map(|e| match e {
                KernelEvent::Retransmit(r) => {
                    let key = SocketKey::of_retransmit(r);
                    Arc::new(self.enricher.attribute(&mut r.owner, key))
                }
                KernelEvent::Drop(d) => {
                    let key = SocketKey::of_drop(d);
                    Arc::new(self.enricher.attribute(&mut d.owner, key))
                }
                KernelEvent::Trace(t) => {
                    let key = SocketKey::connection(t.netns, t.endpoints);
                    self.enricher.find_owner(&mut t.owner, key);
                    if t.owner.is_none() && t.server_side() {
                        // A request that arrived before accept(): the socket
                        // has no owner yet; its listener's process takes it.
                        // The kernel already does this for listeners it saw
                        // open; this covers those older than the agent.
                        let key = SocketKey::Listener {
                            netns: t.netns,
                            port: t.endpoints.local.port(),
                        };
                        self.enricher.find_owner(&mut t.owner, key);
                    }
                    match &t.owner {
                        // One message per request: the identity is the socket's.
                        Some(o) => self.enricher.identify_socket(t.cookie, o),
                        None => Arc::default(),
                    }
                }
            })
            .collect();
        self.events_applied += batch.len() as u64;
        self.view.mark_changed();
        let registry = &mut self.registry;
        for (e, who) in batch.iter().zip(&identities) {
            match e {
                KernelEvent::Retransmit(r) => {
                    registry.record_retransmit(r, who, self.clock.to_unix_ns(r.ts_ns))
                }
                KernelEvent::Drop(d) => registry.record_drop(d, who),
                KernelEvent::Trace(_) => {}
            }
        }
        index_traces(&self.clock, &batch, &identities, registry);
        registry.cgroup_cache_entries = self.enricher.cgroups.cached();
        registry.proc_socket_entries = self.enricher.proc_sockets();
        self.export_logs(&batch, &identities, &self.registry.health);
        self.remember(&batch, &self.registry.health);
        let Some(log) = &mut self.event_log else {
            return;
        };
        let enricher = &self.enricher;
        let health = &self.registry.health;
        let written = batch
            .iter()
            .zip(&identities)
            .try_for_each(|(e, who)| {
                let owner = |o: &Option<crate::events::Owner>| Who {
                    pid: who.pid,
                    comm: who.comm.as_deref(),
                    cgroup: who.cgroup.as_deref(),
                    pod: who.pod.as_ref(),
                    owner_source: o.as_ref().map(|o| o.source),
                };
                match e {
                    KernelEvent::Retransmit(r) => {
                        let peer = enricher.peer_pod(r.endpoints.remote.ip());
                        log.write_retransmit(r, peer, owner(&r.owner))
                    }
                    KernelEvent::Drop(d) => {
                        let peer = d.endpoints.and_then(|ep| enricher.peer_pod(ep.remote.ip()));
                        let reason = health.reason_name(d.reason);
                        log.write_drop(d, &reason, peer, owner(&d.owner))
                    }
                    KernelEvent::Trace(t) => log.write_trace(t, owner(&t.owner)),
                }
            })
            .and_then(|()| log.out.flush());
        if let Err(e) = written {
            warn!(error = %e, "event log write failed; disabling the event log");
            self.event_log = None;
        }
    }

    /// Keeps each counted retransmit and each drop in the connection ledger.
    fn remember(&self, batch: &Batch, health: &SocketHealth) {
        let Ok(mut ledger) = self.ledger.lock() else {
            return;
        };
        for e in batch {
            let (key, at, what) = match e {
                KernelEvent::Retransmit(r) if r.counted_segments() > 0 => (
                    ConnKey::new(r.netns, r.endpoints),
                    r.ts_ns,
                    LedgerEvent::Retransmit {
                        segments: r.counted_segments(),
                    },
                ),
                KernelEvent::Drop(d) => match d.endpoints {
                    Some(ep) if !d.at_listener() => (
                        ConnKey::new(d.netns, ep),
                        d.ts_ns,
                        LedgerEvent::Drop {
                            reason: health.reason_name(d.reason),
                        },
                    ),
                    _ => continue,
                },
                KernelEvent::Retransmit(_) | KernelEvent::Trace(_) => continue,
            };
            ledger.record(key, self.clock.to_unix_ns(at), what);
        }
    }

    /// Queues an OTLP log record; a full queue drops it and counts it.
    fn send_log(&self, tx: &mpsc::Sender<LogRecordOut>, record: LogRecordOut) {
        if tx.try_send(record).is_err() {
            self.otlp_stats
                .log_records_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Overflows as event-log lines and OTLP log records (one per listener
    /// that dropped handshakes since the last sample).
    fn record_overflows(&mut self, overflows: &[Overflow]) {
        if overflows.is_empty() {
            return;
        }
        let now = unix_now_ns();
        if let Some(log) = &mut self.event_log {
            let written = overflows
                .iter()
                .try_for_each(|o| {
                    let line = OverflowLine {
                        ts_unix_ns: now,
                        kind: "listen_overflow",
                        netns: o.netns,
                        local: o.local.to_string(),
                        dropped: o.dropped,
                        who: Who {
                            pid: o.who.pid,
                            comm: o.who.comm.as_deref(),
                            cgroup: o.who.cgroup.as_deref(),
                            pod: o.who.pod.as_ref(),
                            owner_source: None,
                        },
                    };
                    serde_json::to_writer(&mut log.out, &line)?;
                    log.out.write_all(b"\n")
                })
                .and_then(|()| log.out.flush());
            if let Err(e) = written {
                warn!(error = %e, "event log write failed; disabling the event log");
                self.event_log = None;
            }
        }
        let Some(tx) = &self.otlp_logs else { return };
        for o in overflows {
            let mut attributes = socket_attributes(
                o.netns,
                Some(o.local),
                None,
                vigil_abi::TCP_LISTEN,
                &o.who,
                None,
            );
            attributes.push((
                "vigil.event".into(),
                AttrValue::Str("listen_overflow".into()),
            ));
            attributes.push((
                "vigil.tcp.listen_overflows".into(),
                AttrValue::Int(i64::from(o.dropped)),
            ));
            let record = LogRecordOut {
                time_unix_nano: now,
                severity: Severity::Warn,
                body: "listen overflow".into(),
                attributes,
                trace_id: None,
                span_id: None,
            };
            self.send_log(tx, record);
        }
    }

    /// One OTLP log record per retransmit that the kernel counted and per
    /// drop; a full queue drops the record and counts it.
    fn export_logs(&self, batch: &Batch, identities: &[Arc<Identity>], health: &SocketHealth) {
        let Some(tx) = &self.otlp_logs else { return };
        for (e, who) in batch.iter().zip(identities) {
            let record = match e {
                KernelEvent::Retransmit(r) if r.counted_segments() > 0 => {
                    let peer = self.enricher.peer_pod(r.endpoints.remote.ip());
                    let mut attributes = socket_attributes(
                        r.netns,
                        Some(r.endpoints.local),
                        Some(r.endpoints.remote),
                        r.tcp_state,
                        who,
                        peer,
                    );
                    attributes.push((
                        "vigil.event".into(),
                        AttrValue::Str(
                            match r.kind {
                                RetransmitKind::Segment => "retransmit",
                                RetransmitKind::SynAck => "synack_retransmit",
                                RetransmitKind::Unseen => "retransmit_unseen",
                                RetransmitKind::SynAckUnseen => "synack_retransmit_unseen",
                            }
                            .into(),
                        ),
                    ));
                    attributes.push((
                        "vigil.tcp.retransmitted_segments".into(),
                        AttrValue::Int(i64::from(r.counted_segments())),
                    ));
                    LogRecordOut {
                        time_unix_nano: self.clock.to_unix_ns(r.ts_ns),
                        severity: Severity::Info,
                        body: "tcp retransmit".into(),
                        attributes,
                        trace_id: r.trace.context().map(|c| c.trace_id),
                        span_id: r.trace.context().map(|c| c.span_id),
                    }
                }
                KernelEvent::Retransmit(_) | KernelEvent::Trace(_) => continue,
                KernelEvent::Drop(d) => {
                    let peer = d
                        .endpoints
                        .and_then(|ep| self.enricher.peer_pod(ep.remote.ip()));
                    let mut attributes = socket_attributes(
                        d.netns,
                        d.endpoints.map(|ep| ep.local),
                        d.endpoints.map(|ep| ep.remote),
                        d.tcp_state,
                        who,
                        peer,
                    );
                    let reason = health.reason_name(d.reason);
                    attributes.push(("vigil.event".into(), AttrValue::Str("socket_drop".into())));
                    attributes.push(("vigil.drop.reason".into(), AttrValue::Str(reason)));
                    LogRecordOut {
                        time_unix_nano: self.clock.to_unix_ns(d.ts_ns),
                        severity: Severity::Warn,
                        body: "socket drop".into(),
                        attributes,
                        trace_id: d.trace.context().map(|c| c.trace_id),
                        span_id: d.trace.context().map(|c| c.span_id),
                    }
                }
            };
            self.send_log(tx, record);
        }
    }

    fn apply_snapshot(&mut self, mut snapshot: Snapshot) {
        let mut listeners = Vec::new();
        let mut connections = Vec::new();
        for sample in &mut snapshot.samples {
            match sample {
                Sample::Listener(l) => {
                    let key = SocketKey::Listener {
                        netns: l.netns,
                        port: l.local.port(),
                    };
                    let who = self.enricher.attribute(&mut l.owner, key);
                    listeners.push(who);
                }
                Sample::Connection(c) => {
                    let key = SocketKey::connection(c.netns, c.endpoints);
                    let who = self.enricher.attribute(&mut c.owner, key);
                    connections.push(who);
                }
            }
        }
        self.view.mark_changed();
        let registry = &mut self.registry;
        let ls = snapshot.samples.iter().filter_map(|s| match s {
            Sample::Listener(l) => Some(l),
            Sample::Connection(_) => None,
        });
        let cs = snapshot.samples.iter().filter_map(|s| match s {
            Sample::Connection(c) => Some(c),
            Sample::Listener(_) => None,
        });
        let overflows = registry.apply_snapshot(
            ls.zip(listeners),
            cs.zip(connections),
            &snapshot.listen_overflows,
        );
        registry.cgroup_cache_entries = self.enricher.cgroups.cached();
        registry.proc_socket_entries = self.enricher.proc_sockets();
        self.record_overflows(&overflows);
        self.remember_samples(&snapshot);
    }

    /// RTT of every connection and accept-queue fill of every listener, for
    /// joining spans with.
    fn remember_samples(&self, snapshot: &Snapshot) {
        let Ok(mut ledger) = self.ledger.lock() else {
            return;
        };
        let now = unix_now_ns();
        for sample in &snapshot.samples {
            match sample {
                Sample::Listener(l) => ledger.observe_listener(
                    l.netns,
                    l.local,
                    now,
                    QueueFill {
                        len: l.queue_len,
                        cap: l.queue_cap,
                    },
                ),
                Sample::Connection(c) => {
                    ledger.observe_connection(ConnKey::new(c.netns, c.endpoints), now, c.srtt_us)
                }
            }
        }
        ledger.expire(now);
    }
}

/// Which connections carried each trace, and the kernel events stamped
/// with it, for `vigil explain`.
fn index_traces(
    clock: &MonotonicToWall,
    batch: &Batch,
    identities: &[Arc<Identity>],
    registry: &mut Registry,
) {
    for (e, who) in batch.iter().zip(identities) {
        let (stamp, event) = match e {
            KernelEvent::Trace(t) => {
                if let Some(ctx) = t.trace.context() {
                    let at = clock.to_unix_ns(t.ts_ns);
                    registry.traces.message(t, ctx, at, who);
                }
                (t.trace, None)
            }
            KernelEvent::Retransmit(r) => (
                r.trace,
                (r.counted_segments() > 0).then(|| TraceKernelEvent {
                    at_unix_ns: clock.to_unix_ns(r.ts_ns),
                    kind: "retransmit".into(),
                    cookie: r.cookie,
                    local: Some(r.endpoints.local),
                    remote: Some(r.endpoints.remote),
                    span_id: String::new(),
                    segments: r.counted_segments(),
                    reason: None,
                }),
            ),
            KernelEvent::Drop(d) => (
                d.trace,
                Some(TraceKernelEvent {
                    at_unix_ns: clock.to_unix_ns(d.ts_ns),
                    kind: "drop".into(),
                    cookie: 0,
                    local: d.endpoints.map(|ep| ep.local),
                    remote: d.endpoints.map(|ep| ep.remote),
                    span_id: String::new(),
                    segments: 0,
                    reason: Some(registry.health.reason_name(d.reason)),
                }),
            ),
        };
        match (stamp, event) {
            (Stamp::Invalid, _) => registry.traces.invalid_stamps += 1,
            (Stamp::Context(ctx), Some(mut event)) => {
                event.span_id = ctx.span_id_hex();
                registry.traces.event(&ctx, event);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{cardinality::SeriesBudget, view};

    fn retransmit(segs: u32) -> KernelEvent {
        KernelEvent::Retransmit(RetransmitEvent::example(segs))
    }

    fn segments(view: &View) -> f64 {
        view.families
            .families
            .iter()
            .find(|f| f.name == "vigil_tcp_retransmitted_segments_total")
            .map_or(0.0, |f| {
                f.points
                    .iter()
                    .map(|p| match p.value {
                        crate::exposition::Value::Number(n) => n,
                        crate::exposition::Value::Histogram(_) => 0.0,
                    })
                    .sum()
            })
    }

    /// The seam: readers see the owner's aggregates only through published
    /// views, a view a reader still holds is never changed under it, a new
    /// one follows events within the publication interval, and questions
    /// about a trace are answered by the owner between batches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_owner_publishes_views_and_answers_trace_questions() {
        let (publisher, mut views) = view::channel();
        let owner = StateOwner {
            enricher: Enricher::bootstrap(Duration::from_secs(3600), 64),
            registry: Registry::new(
                SocketHealth::new(Default::default(), 16),
                SeriesBudget::new(16, Duration::from_secs(600)),
            ),
            view: publisher,
            event_log: None,
            otlp_logs: None,
            otlp_stats: Arc::new(OtlpStats::default()),
            clock: MonotonicToWall::now(),
            reconcile_every: Duration::from_secs(3600),
            ledger: Arc::new(Mutex::new(ConnectionLedger::new(
                16,
                4,
                Duration::from_secs(60),
            ))),
            events_applied: 0,
        };
        let (events, events_rx) = mpsc::channel(4);
        let (_snapshots, snapshots_rx) = mpsc::channel(1);
        let (queries, queries_rx) = view::trace_queries();
        let task = tokio::spawn(owner.run(events_rx, snapshots_rx, queries_rx));

        let held = views.borrow_and_update().clone();
        let sent = std::time::Instant::now();
        events
            .send(vec![retransmit(3), retransmit(2)])
            .await
            .expect("owner running");
        let fresh = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                views.changed().await.expect("owner running");
                let v = views.borrow_and_update().clone();
                if v.events_applied == 2 {
                    return v;
                }
            }
        })
        .await
        .expect("a view with the batch");
        assert!(
            sent.elapsed() < PUBLISH_INTERVAL * 3,
            "published {:?} after the batch",
            sent.elapsed()
        );
        assert_eq!(segments(&fresh), 5.0);
        assert_eq!((held.events_applied, segments(&held)), (0, 0.0));

        assert!(matches!(queries.ask([9; 16]).await, Ok(None)));
        drop(events);
        task.await.expect("owner drained");
        assert!(queries.ask([9; 16]).await.is_err(), "the owner has stopped");
        assert_eq!(views.borrow().events_applied, 2, "the last view");
    }
}
