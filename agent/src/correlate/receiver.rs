//! The OTLP/gRPC span receiver. Services on the node send their spans here
//! (what the kernel cannot read: TLS, HTTP/2, gRPC); each span is joined
//! with its connection's kernel events ([`span_join`]) and forwarded to the
//! OTLP traces endpoint.
//!
//! The handler never waits on the upstream: it queues what fits in a
//! bounded queue, answers at once, and sheds the rest (counted, reported to
//! the sender as a partial success, and warned about at most once a
//! minute). A span is joined `join_delay` after its end, once the kernel's
//! events and the next socket sample have reached the ledger.
//!
//! Accounting: received = forwarded + shed + failed + queued.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ledger::ConnectionLedger;
use super::span_join;
use crate::config::ReceiverConfig;
use crate::export::otlp::TracesUpstream;
use crate::exposition::Exposition;

/// At most one shedding warning this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Binds the receiver's port; the agent does it before any kernel object
/// exists, so a port in use fails the start cleanly.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for OTLP spans on {addr} (choose another receiver.listen, or set receiver.enabled = false)")
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverSettings {
    pub queue_spans: usize,
    pub max_batch_spans: usize,
    pub join_delay: Duration,
    pub max_events_per_span: usize,
    /// From the stop signal: draining the queue to the upstream takes at
    /// most this long; what is left is shed.
    pub flush_timeout: Duration,
}

impl ReceiverSettings {
    pub fn new(c: &ReceiverConfig, flush_timeout: Duration) -> ReceiverSettings {
        ReceiverSettings {
            queue_spans: c.queue_spans.max(1),
            max_batch_spans: c.max_batch_spans.max(1),
            join_delay: Duration::from_millis(c.join_delay_ms),
            max_events_per_span: c.max_events_per_span,
            flush_timeout,
        }
    }
}

/// Span counters, for the agent's own metrics.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    pub received: AtomicU64,
    /// Accepted by the upstream.
    pub forwarded: AtomicU64,
    /// Shed because the queue was full.
    pub shed_queue_full: AtomicU64,
    /// Still queued when the shutdown deadline passed.
    pub shed_shutdown: AtomicU64,
    /// In a request the upstream failed or rejected (not retried).
    pub failed: AtomicU64,
    /// Forwarded or failed with a connection found (`vigil.tcp.joined=true`).
    pub joined: AtomicU64,
    /// Held now: queued, or in the export request in flight (gauge).
    pub queued: AtomicU64,
}

impl ReceiverStats {
    /// The receiver's metric families, appended to the agent's.
    pub fn render(&self, x: &mut Exposition) {
        let get = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let counters = [
            (
                "vigil_receiver_spans_received_total",
                "Spans services sent to the OTLP span receiver.",
                &self.received,
            ),
            (
                "vigil_receiver_spans_forwarded_total",
                "Spans the upstream OTLP endpoint accepted.",
                &self.forwarded,
            ),
            (
                "vigil_receiver_spans_failed_total",
                "Spans in export requests the upstream failed or rejected (not retried).",
                &self.failed,
            ),
            (
                "vigil_receiver_spans_joined_total",
                "Spans joined with their connection's kernel events (vigil.tcp.joined=true).",
                &self.joined,
            ),
        ];
        for (name, help, v) in counters {
            x.family(name, "counter", help);
            x.sample(name, &[], get(v));
        }
        let name = "vigil_receiver_spans_shed_total";
        x.family(
            name,
            "counter",
            "Spans dropped unforwarded: the queue was full (the upstream is slow or down), or still queued at the shutdown deadline.",
        );
        x.sample(
            name,
            &[("reason", "queue_full".into())],
            get(&self.shed_queue_full),
        );
        x.sample(
            name,
            &[("reason", "shutdown".into())],
            get(&self.shed_shutdown),
        );
        let name = "vigil_receiver_queue_spans";
        x.family(
            name,
            "gauge",
            "Spans the receiver holds: waiting to be joined, or in the export request in flight.",
        );
        x.sample(name, &[], get(&self.queued));
    }
}

/// Resource or scope of the spans a request carried, shared by its spans
/// so the forwarded request keeps their grouping.
#[derive(Debug, PartialEq)]
struct Origin<T> {
    value: Option<T>,
    schema_url: String,
}

#[derive(Debug)]
struct Pending {
    resource: Arc<Origin<Resource>>,
    scope: Arc<Origin<InstrumentationScope>>,
    span: Span,
    ready_at: Instant,
}

/// The bounded queue between the handler and the forwarder.
struct SpanQueue {
    items: Mutex<VecDeque<Pending>>,
    capacity: usize,
    wake: Notify,
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl SpanQueue {
    fn new(capacity: usize) -> SpanQueue {
        SpanQueue {
            items: Mutex::new(VecDeque::new()),
            capacity,
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        // Nothing panics while holding it; if something did, the queue is still a queue.
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues the spans that fit, adding them to `held` before the
    /// forwarder can see them; returns (received, shed). A span is due
    /// `join_delay` after its end, but never later than `join_delay` from
    /// now (an end in the future is a clock problem, not a reason to hold it).
    fn offer(
        &self,
        req: ExportTraceServiceRequest,
        join_delay: Duration,
        now: Instant,
        now_unix_ns: u64,
        held: &AtomicU64,
    ) -> (u64, u64) {
        let delay_ns = u64::try_from(join_delay.as_nanos()).unwrap_or(u64::MAX);
        let (mut received, mut shed) = (0u64, 0u64);
        let mut items = self.lock();
        for rs in req.resource_spans {
            let resource = Arc::new(Origin {
                value: rs.resource,
                schema_url: rs.schema_url,
            });
            for ss in rs.scope_spans {
                let scope = Arc::new(Origin {
                    value: ss.scope,
                    schema_url: ss.schema_url,
                });
                for span in ss.spans {
                    received += 1;
                    if items.len() >= self.capacity {
                        shed += 1;
                        continue;
                    }
                    let wait_ns = span
                        .end_time_unix_nano
                        .saturating_add(delay_ns)
                        .saturating_sub(now_unix_ns)
                        .min(delay_ns);
                    items.push_back(Pending {
                        resource: Arc::clone(&resource),
                        scope: Arc::clone(&scope),
                        span,
                        ready_at: now + Duration::from_nanos(wait_ns),
                    });
                }
            }
        }
        held.fetch_add(received - shed, Ordering::Relaxed);
        drop(items);
        self.wake.notify_one();
        (received, shed)
    }

    /// Up to `max` spans from the front that are due at `now` (all of them
    /// when `now` is None), and when the next one is due. First in, first
    /// out: a span is held at most `join_delay` behind an earlier one.
    fn take(&self, max: usize, now: Option<Instant>) -> (Vec<Pending>, Option<Instant>) {
        let mut items = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            match items.front() {
                Some(p) if now.is_none_or(|t| p.ready_at <= t) => {
                    if let Some(p) = items.pop_front() {
                        out.push(p);
                    }
                }
                _ => break,
            }
        }
        let next = items.front().map(|p| p.ready_at);
        (out, next)
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Spans back into OTLP's nesting, consecutive spans of one request's
/// resource and scope together.
fn request(batch: Vec<Pending>) -> ExportTraceServiceRequest {
    let mut out: Vec<ResourceSpans> = Vec::new();
    let mut resource: Option<Arc<Origin<Resource>>> = None;
    let mut scope: Option<Arc<Origin<InstrumentationScope>>> = None;
    for p in batch {
        if !resource
            .as_ref()
            .is_some_and(|r| Arc::ptr_eq(r, &p.resource))
        {
            out.push(ResourceSpans {
                resource: p.resource.value.clone(),
                schema_url: p.resource.schema_url.clone(),
                scope_spans: Vec::new(),
            });
            resource = Some(Arc::clone(&p.resource));
            scope = None;
        }
        let Some(rs) = out.last_mut() else {
            continue;
        };
        if !scope.as_ref().is_some_and(|s| Arc::ptr_eq(s, &p.scope)) {
            rs.scope_spans.push(ScopeSpans {
                scope: p.scope.value.clone(),
                schema_url: p.scope.schema_url.clone(),
                spans: Vec::new(),
            });
            scope = Some(Arc::clone(&p.scope));
        }
        if let Some(ss) = rs.scope_spans.last_mut() {
            ss.spans.push(p.span);
        }
    }
    ExportTraceServiceRequest {
        resource_spans: out,
    }
}

/// Warns on the first shed span, then at most every [`WARN_EVERY`] with
/// the number shed in between.
#[derive(Default)]
struct ShedWarning {
    state: Mutex<(Option<std::time::Instant>, u64)>,
}

impl ShedWarning {
    fn shed(&self, n: u64, capacity: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.1 += n;
        if state.0.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        warn!(
            spans_shed = state.1,
            queue_spans = capacity,
            "span receiver queue full: shedding spans (the upstream is slow or down; warning at most once a minute)"
        );
        *state = (Some(std::time::Instant::now()), 0);
    }
}

struct Handler {
    queue: Arc<SpanQueue>,
    stats: Arc<ReceiverStats>,
    join_delay: Duration,
    warning: ShedWarning,
}

#[tonic::async_trait]
impl TraceService for Handler {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let (received, shed) = self.queue.offer(
            req.into_inner(),
            self.join_delay,
            Instant::now(),
            unix_now_ns(),
            &self.stats.queued,
        );
        self.stats.received.fetch_add(received, Ordering::Relaxed);
        let partial_success = (shed > 0).then(|| {
            self.stats
                .shed_queue_full
                .fetch_add(shed, Ordering::Relaxed);
            self.warning.shed(shed, self.queue.capacity);
            ExportTracePartialSuccess {
                rejected_spans: i64::try_from(shed).unwrap_or(i64::MAX),
                error_message: "vigil span receiver queue full: spans shed".into(),
            }
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success,
        }))
    }
}

struct Forwarder {
    queue: Arc<SpanQueue>,
    upstream: TracesUpstream,
    ledger: Arc<Mutex<ConnectionLedger>>,
    stats: Arc<ReceiverStats>,
    settings: ReceiverSettings,
    /// Set at the stop signal: the flush ends by then.
    deadline: Option<Instant>,
}

impl Forwarder {
    fn deadline(&mut self) -> Instant {
        *self
            .deadline
            .get_or_insert_with(|| Instant::now() + self.settings.flush_timeout)
    }

    /// Joins and exports one batch; once `stop` fires, the export in flight
    /// gets until the flush deadline.
    async fn forward(&mut self, mut batch: Vec<Pending>, stop: &CancellationToken) {
        let n = batch.len() as u64;
        let mut joined = 0u64;
        {
            let ledger = self.ledger.lock().unwrap_or_else(PoisonError::into_inner);
            for p in &mut batch {
                if span_join::enrich(&mut p.span, &ledger, self.settings.max_events_per_span) {
                    joined += 1;
                }
            }
        }
        self.stats.joined.fetch_add(joined, Ordering::Relaxed);
        let flush_timeout = self.settings.flush_timeout;
        let export = self.upstream.export(request(batch));
        tokio::pin!(export);
        let outcome = tokio::select! {
            biased;
            r = &mut export => r,
            () = stop.cancelled() => {
                let until = *self
                    .deadline
                    .get_or_insert_with(|| Instant::now() + flush_timeout);
                tokio::time::timeout_at(until, &mut export)
                    .await
                    .unwrap_or_else(|_| Err("shutdown deadline".into()))
            }
        };
        let (forwarded, failed) = match outcome {
            Ok(rejected) => (n.saturating_sub(rejected), rejected.min(n)),
            Err(_) => (0, n),
        };
        self.stats.forwarded.fetch_add(forwarded, Ordering::Relaxed);
        self.stats.failed.fetch_add(failed, Ordering::Relaxed);
        self.stats.queued.fetch_sub(n, Ordering::Relaxed);
    }

    async fn run(mut self, server: JoinHandle<()>, stop: CancellationToken) {
        let max = self.settings.max_batch_spans;
        loop {
            let (batch, next) = self.queue.take(max, Some(Instant::now()));
            if !batch.is_empty() {
                self.forward(batch, &stop).await;
                continue;
            }
            // Far enough to mean "until woken"; a sleep needs some deadline.
            let until = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.queue.wake.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
        // Stopped: no new spans once the server is down, then everything
        // queued is joined now and forwarded until the deadline.
        let deadline = self.deadline();
        let mut server = server;
        if tokio::time::timeout_at(deadline, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        loop {
            let (batch, _) = self.queue.take(max, None);
            if batch.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let n = batch.len() + self.queue.len();
                self.stats
                    .shed_shutdown
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.stats.queued.fetch_sub(n as u64, Ordering::Relaxed);
                warn!(
                    spans = n,
                    "span receiver: shutdown deadline passed; spans shed"
                );
                let _ = self.queue.take(usize::MAX, None);
                break;
            }
            self.forward(batch, &stop).await;
        }
        info!("span receiver stopped");
    }
}

/// Serves OTLP/gRPC traces on `listener` and forwards to `upstream` until
/// `stop`; the task ends once the queue is flushed (bounded by
/// `settings.flush_timeout`). Must be called within a tokio runtime.
pub fn spawn(
    listener: TcpListener,
    settings: ReceiverSettings,
    upstream: TracesUpstream,
    ledger: Arc<Mutex<ConnectionLedger>>,
    stats: Arc<ReceiverStats>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let queue = Arc::new(SpanQueue::new(settings.queue_spans));
    if let Ok(addr) = listener.local_addr() {
        info!(
            %addr,
            upstream = upstream.endpoint(),
            queue_spans = settings.queue_spans,
            "OTLP span receiver listening"
        );
    }
    let handler = Handler {
        queue: Arc::clone(&queue),
        stats: Arc::clone(&stats),
        join_delay: settings.join_delay,
        warning: ShedWarning::default(),
    };
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(handler))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                server_stop.cancelled_owned(),
            )
            .await;
        if let Err(e) = served {
            warn!(error = %e, "OTLP span receiver failed");
        }
    });
    let forwarder = Forwarder {
        queue,
        upstream,
        ledger,
        stats,
        settings,
        deadline: None,
    };
    tokio::spawn(forwarder.run(server, stop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::ledger::{ConnKey, LedgerEvent};
    use crate::export::otlp::OtlpSettings;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

    fn span(name: &str, end: u64) -> Span {
        Span {
            name: name.into(),
            kind: SpanKind::Server as i32,
            start_time_unix_nano: end.saturating_sub(1_000),
            end_time_unix_nano: end,
            attributes: vec![
                KeyValue {
                    key: "client.address".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("198.18.70.2".into())),
                    }),
                    ..Default::default()
                },
                KeyValue {
                    key: "client.port".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(40_000)),
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn resource(name: &str) -> Option<Resource> {
        Some(Resource {
            attributes: vec![KeyValue {
                key: "service.name".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(name.into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    /// Two resources; the first with two scopes.
    fn export_request(end: u64) -> ExportTraceServiceRequest {
        let scope = |name: &str, spans: Vec<Span>| ScopeSpans {
            scope: Some(InstrumentationScope {
                name: name.into(),
                ..Default::default()
            }),
            spans,
            schema_url: String::new(),
        };
        ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: resource("a"),
                    scope_spans: vec![
                        scope("s1", vec![span("a1", end), span("a2", end)]),
                        scope("s2", vec![span("a3", end)]),
                    ],
                    schema_url: "https://opentelemetry.io/schemas/1.26.0".into(),
                },
                ResourceSpans {
                    resource: resource("b"),
                    scope_spans: vec![scope("s1", vec![span("b1", end), span("b2", end)])],
                    schema_url: String::new(),
                },
            ],
        }
    }

    fn names(req: &ExportTraceServiceRequest) -> Vec<Vec<Vec<String>>> {
        req.resource_spans
            .iter()
            .map(|rs| {
                rs.scope_spans
                    .iter()
                    .map(|ss| ss.spans.iter().map(|s| s.name.clone()).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_queue_is_bounded_and_keeps_the_nesting() {
        let q = SpanQueue::new(4);
        let held = AtomicU64::new(0);
        let now = Instant::now();
        let (received, shed) = q.offer(export_request(0), Duration::ZERO, now, 10, &held);
        assert_eq!((received, shed), (5, 1), "one over the bound is shed");
        assert_eq!(held.load(Ordering::Relaxed), 4);
        assert_eq!(q.len(), 4);
        let (batch, next) = q.take(3, Some(now));
        assert_eq!(batch.len(), 3, "max batch");
        assert_eq!(next, Some(now));
        let req = request(batch);
        assert_eq!(
            names(&req),
            vec![vec![
                vec!["a1".to_owned(), "a2".to_owned()],
                vec!["a3".to_owned()]
            ]]
        );
        assert_eq!(
            req.resource_spans[0].schema_url,
            "https://opentelemetry.io/schemas/1.26.0"
        );
        let (rest, next) = q.take(10, Some(now));
        assert_eq!(names(&request(rest)), vec![vec![vec!["b1".to_owned()]]]);
        assert_eq!(next, None);
        assert_eq!(
            request(Vec::new()).resource_spans.len(),
            0,
            "nothing to send"
        );
    }

    #[test]
    fn spans_wait_for_the_join_delay_after_their_end() {
        let q = SpanQueue::new(100);
        let held = AtomicU64::new(0);
        let now = Instant::now();
        let delay = Duration::from_millis(500);
        let now_unix = 10_000_000_000;
        // Ended 200 ms ago: due in 300 ms. Ended long ago: due now. Ends
        // in the future: due no later than the delay.
        for end in [now_unix - 200_000_000, 0, u64::MAX] {
            let req = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span("x", end)],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            };
            q.offer(req, delay, now, now_unix, &held);
        }
        let due: Vec<Duration> = q
            .take(10, None)
            .0
            .iter()
            .map(|p| p.ready_at - now)
            .collect();
        assert_eq!(due, vec![Duration::from_millis(300), Duration::ZERO, delay]);
        q.offer(
            export_request(now_unix - 200_000_000),
            delay,
            now,
            now_unix,
            &held,
        );
        assert!(q.take(10, Some(now)).0.is_empty(), "none due yet");
        assert_eq!(q.take(10, Some(now + delay)).0.len(), 5);
    }

    #[test]
    fn settings_come_from_validated_config() {
        use crate::config::Config;
        let c = Config::default();
        c.validate(std::iter::empty()).expect("defaults valid");
        let s = ReceiverSettings::new(&c.receiver, Duration::from_secs(5));
        assert_eq!(
            (s.queue_spans, s.max_batch_spans, s.join_delay),
            (8_192, 512, Duration::from_millis(1_500))
        );
        let mut bad = Config::default();
        bad.receiver.queue_spans = 0;
        let e = bad
            .validate(std::iter::empty())
            .expect_err("no queue")
            .to_string();
        assert!(e.contains("receiver.queue_spans"), "{e}");
        let mut bad = Config::default();
        bad.receiver.join_delay_ms = 60_001;
        let e = bad
            .validate(std::iter::empty())
            .expect_err("too long")
            .to_string();
        assert!(e.contains("receiver.join_delay_ms"), "{e}");
        let parsed = Config::from_toml("[receiver]\nlisten = \"0.0.0.0:4318\"\nenabled = false\n")
            .expect("parses");
        assert!(!parsed.receiver.enabled);
        assert_eq!(parsed.receiver.listen.port(), 4318);
    }

    /// An upstream that accepts TCP connections (the kernel completes the
    /// handshake) but never answers: every export to it hangs.
    fn silent_upstream() -> (std::net::TcpListener, String) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        (l, format!("http://{addr}"))
    }

    fn upstream(endpoint: &str, timeout_ms: &str) -> TracesUpstream {
        let settings = OtlpSettings::from_vars(
            |k| match k {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" => Some(endpoint.to_owned()),
                "OTEL_EXPORTER_OTLP_TIMEOUT" => Some(timeout_ms.to_owned()),
                _ => None,
            },
            "node",
        )
        .expect("valid")
        .expect("on");
        assert!(settings.metrics.is_none() && settings.logs.is_none());
        TracesUpstream::new(settings.traces.expect("traces")).expect("channel")
    }

    fn settings(queue_spans: usize) -> ReceiverSettings {
        ReceiverSettings {
            queue_spans,
            max_batch_spans: 2,
            join_delay: Duration::ZERO,
            max_events_per_span: 32,
            flush_timeout: Duration::from_millis(300),
        }
    }

    async fn start(
        settings: ReceiverSettings,
        up: TracesUpstream,
        ledger: Arc<Mutex<ConnectionLedger>>,
    ) -> (
        TraceServiceClient<tonic::transport::Channel>,
        Arc<ReceiverStats>,
        CancellationToken,
        JoinHandle<()>,
    ) {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stats = Arc::new(ReceiverStats::default());
        let stop = CancellationToken::new();
        let task = spawn(listener, settings, up, ledger, stats.clone(), stop.clone());
        let client = TraceServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        (client, stats, stop, task)
    }

    fn load(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_upstream_never_delays_the_sender() {
        let (_silent, endpoint) = silent_upstream();
        let ledger = Arc::new(Mutex::new(ConnectionLedger::new(
            10,
            10,
            Duration::from_secs(60),
        )));
        // The upstream would hold each export for 30 s.
        let (mut client, stats, stop, task) =
            start(settings(3), upstream(&endpoint, "30000"), ledger).await;
        let mut rejected = 0;
        for _ in 0..4 {
            let sent = std::time::Instant::now();
            let res = client
                .export(export_request(0))
                .await
                .expect("answered")
                .into_inner();
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "answered without waiting for the upstream"
            );
            rejected += res.partial_success.map_or(0, |p| p.rejected_spans);
        }
        assert_eq!(load(&stats.received), 20);
        assert!(load(&stats.shed_queue_full) >= 14, "{stats:?}");
        assert_eq!(
            load(&stats.shed_queue_full),
            rejected as u64,
            "told to the sender"
        );
        // Shutdown: the export in flight and the rest give up at the deadline.
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("flush bounded by its deadline")
            .expect("task");
        let accounted = load(&stats.forwarded)
            + load(&stats.failed)
            + load(&stats.shed_queue_full)
            + load(&stats.shed_shutdown);
        assert_eq!(accounted, 20, "every span accounted for: {stats:?}");
        assert_eq!(load(&stats.forwarded), 0);
        assert_eq!(load(&stats.queued), 0);
    }

    /// A collector that records what it receives.
    #[derive(Default, Clone)]
    struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            if let Ok(mut r) = self.0.lock() {
                r.push(req.into_inner());
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves `collector` on a free port; its endpoint.
    async fn serve_collector(collector: Collector) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        endpoint
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_flushes_spans_still_waiting_for_their_join() {
        let collector = Collector::default();
        let endpoint = serve_collector(collector.clone()).await;
        let ledger = Arc::new(Mutex::new(ConnectionLedger::new(
            10,
            10,
            Duration::from_secs(60),
        )));
        let held = ReceiverSettings {
            join_delay: Duration::from_secs(60),
            flush_timeout: Duration::from_secs(5),
            ..settings(100)
        };
        let (mut client, stats, stop, task) =
            start(held, upstream(&endpoint, "5000"), ledger).await;
        client
            .export(export_request(u64::MAX))
            .await
            .expect("answered");
        assert_eq!(load(&stats.forwarded), 0, "held for the join delay");
        stop.cancel();
        task.await.expect("task");
        assert_eq!(load(&stats.forwarded), 5, "{stats:?}");
        assert_eq!((load(&stats.joined), load(&stats.queued)), (0, 0));
        let got = collector.0.lock().expect("lock").clone();
        assert_eq!(got.iter().flat_map(names).flatten().flatten().count(), 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_are_joined_and_forwarded() {
        let collector = Collector::default();
        let endpoint = serve_collector(collector.clone()).await;
        let mut ledger = ConnectionLedger::new(10, 10, Duration::from_secs(60));
        let key = ConnKey {
            netns: 7,
            local: "198.18.70.1:8080".parse().expect("addr"),
            remote: "198.18.70.2:40000".parse().expect("addr"),
        };
        ledger.record(key, 500, LedgerEvent::Retransmit { segments: 3 });
        let ledger = Arc::new(Mutex::new(ledger));
        let (mut client, stats, stop, task) =
            start(settings(100), upstream(&endpoint, "5000"), ledger).await;
        client
            .export(export_request(1_000))
            .await
            .expect("answered");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while load(&stats.forwarded) < 5 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.expect("task");
        assert_eq!(load(&stats.forwarded), 5, "{stats:?}");
        assert_eq!(load(&stats.joined), 5);
        let got = collector.0.lock().expect("lock").clone();
        let spans: Vec<&Span> = got
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .collect();
        assert_eq!(spans.len(), 5);
        for s in spans {
            let segs = s
                .attributes
                .iter()
                .find(|kv| kv.key == span_join::RETRANSMITTED_SEGMENTS)
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value);
            assert_eq!(segs, Some(any_value::Value::IntValue(3)), "{s:?}");
            assert_eq!(s.events.len(), 1);
        }
        // Resources survive the trip.
        assert!(got
            .iter()
            .flat_map(|r| &r.resource_spans)
            .all(|rs| rs.resource.is_some()));
    }
}
