//! OTLP/gRPC export against an in-process collector on loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Metric};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vigil::export::otlp::{self, AttrValue, LogRecordOut, OtlpSettings, OtlpStats, Severity};
use vigil::exposition::{Exposition, HistogramPoint};

#[derive(Clone, Default)]
struct Collector {
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    logs: Arc<Mutex<Vec<ExportLogsServiceRequest>>>,
    /// Value of the `x-tenant` metadata of every request.
    tenants: Arc<Mutex<Vec<Option<String>>>>,
}

impl Collector {
    fn tenant<T>(&self, req: &tonic::Request<T>) {
        let t = req
            .metadata()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.tenants.lock().expect("lock").push(t);
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.tenant(&req);
        self.metrics.lock().expect("lock").push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        self.tenant(&req);
        self.logs.lock().expect("lock").push(req.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

async fn start_collector(stop: CancellationToken) -> (SocketAddr, Collector) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let c = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(MetricsServiceServer::new(c.clone()))
        .add_service(LogsServiceServer::new(c.clone()));
    tokio::spawn(async move {
        server
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            )
            .await
            .expect("serve");
    });
    (addr, c)
}

fn exposition(retransmits: u64) -> Exposition {
    let mut x = Exposition::default();
    x.family("vigil_retransmits_total", "counter", "TCP retransmits.");
    x.sample(
        "vigil_retransmits_total",
        &[("pod", "web-1".into())],
        retransmits,
    );
    x.family("vigil_tracked_sockets", "gauge", "Sockets tracked.");
    x.sample("vigil_tracked_sockets", &[], 12u64);
    x.family("vigil_rtt_seconds", "histogram", "Smoothed RTT.");
    x.histogram(
        "vigil_rtt_seconds",
        &[("pod", "web-1".into())],
        HistogramPoint {
            bounds: vec![0.001, 0.01, 0.1],
            counts: vec![4, 3, 2, 1],
            sum: 0.75,
            count: 10,
        },
    );
    x
}

fn vars(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<&str, String> = pairs.into_iter().collect();
    move |k| m.get(k).cloned()
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, any_value::Value> {
    kvs.iter()
        .filter_map(|kv| {
            let v = kv.value.as_ref()?.value.clone()?;
            Some((kv.key.clone(), v))
        })
        .collect()
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.to_owned())
}

fn find<'a>(metrics: &'a [Metric], name: &str) -> &'a Metric {
    metrics
        .iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("no metric {name} in {metrics:?}"))
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log(body: &str, severity: Severity, trace: bool) -> LogRecordOut {
    LogRecordOut {
        time_unix_nano: 1_700_000_000_000_000_000,
        severity,
        body: body.to_owned(),
        attributes: vec![
            ("k8s.pod.name".into(), AttrValue::Str("web-1".into())),
            ("vigil.retransmits".into(), AttrValue::Int(3)),
            ("vigil.rtt_ms".into(), AttrValue::Double(12.5)),
            ("vigil.syn".into(), AttrValue::Bool(false)),
        ],
        trace_id: trace.then_some([0xab; 16]),
        span_id: trace.then_some([0xcd; 8]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_metrics_and_logs_to_a_collector() {
    let server_stop = CancellationToken::new();
    let (addr, collector) = start_collector(server_stop.clone()).await;

    let settings = OtlpSettings::from_vars(
        vars(vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=team%20a".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "200".into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000".into()),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.cluster.name=edge-1,deployment.environment=test".into(),
            ),
        ]),
        "node-7",
    )
    .expect("settings")
    .expect("export on");

    let retransmits = Arc::new(std::sync::atomic::AtomicU64::new(5));
    let snapshot = {
        let r = Arc::clone(&retransmits);
        move || exposition(r.load(Ordering::SeqCst))
    };
    let (tx, rx) = mpsc::channel(64);
    let stats = Arc::new(OtlpStats::default());
    let stop = CancellationToken::new();
    let task = otlp::spawn(settings, snapshot, rx, Arc::clone(&stats), stop.clone());

    tx.send(log("tcp retransmit", Severity::Warn, true))
        .await
        .expect("send");
    tx.send(log("socket healthy", Severity::Info, false))
        .await
        .expect("send");
    tx.send(log("rtt spike", Severity::Warn, false))
        .await
        .expect("send");

    wait_for("a metrics export", || {
        !collector.metrics.lock().expect("lock").is_empty()
    })
    .await;
    wait_for("3 log records", || {
        stats.log_records_exported.load(Ordering::SeqCst) == 3
    })
    .await;

    // Metrics.
    let req = collector.metrics.lock().expect("lock")[0].clone();
    assert_eq!(req.resource_metrics.len(), 1);
    let rm = &req.resource_metrics[0];
    let res = attrs(&rm.resource.as_ref().expect("resource").attributes);
    assert_eq!(res.get("service.name"), Some(&s("vigil")));
    assert_eq!(
        res.get("service.version"),
        Some(&s(env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(res.get("host.name"), Some(&s("node-7")));
    assert_eq!(res.get("k8s.node.name"), Some(&s("node-7")));
    assert_eq!(res.get("k8s.cluster.name"), Some(&s("edge-1")));
    assert_eq!(res.get("deployment.environment"), Some(&s("test")));
    assert_eq!(rm.scope_metrics.len(), 1);
    let sm = &rm.scope_metrics[0];
    assert_eq!(sm.scope.as_ref().map(|s| s.name.as_str()), Some("vigil"));
    let metrics = &sm.metrics;
    assert_eq!(metrics.len(), 3, "{metrics:?}");

    let m = find(metrics, "vigil_retransmits");
    assert_eq!(m.unit, "1");
    assert_eq!(m.description, "TCP retransmits.");
    let Some(metric::Data::Sum(sum)) = &m.data else {
        panic!("not a sum: {m:?}")
    };
    assert!(sum.is_monotonic);
    assert_eq!(sum.aggregation_temporality, 2, "cumulative");
    assert_eq!(sum.data_points.len(), 1);
    let p = &sum.data_points[0];
    assert_eq!(p.value, Some(number_data_point::Value::AsDouble(5.0)));
    assert_eq!(attrs(&p.attributes).get("pod"), Some(&s("web-1")));
    assert!(p.start_time_unix_nano > 0 && p.start_time_unix_nano <= p.time_unix_nano);

    let m = find(metrics, "vigil_tracked_sockets");
    let Some(metric::Data::Gauge(g)) = &m.data else {
        panic!("not a gauge: {m:?}")
    };
    assert_eq!(
        g.data_points[0].value,
        Some(number_data_point::Value::AsDouble(12.0))
    );

    let m = find(metrics, "vigil_rtt_seconds");
    assert_eq!(m.unit, "s");
    let Some(metric::Data::Histogram(h)) = &m.data else {
        panic!("not a histogram: {m:?}")
    };
    assert_eq!(h.aggregation_temporality, 2, "cumulative");
    let p = &h.data_points[0];
    assert_eq!(p.explicit_bounds, vec![0.001, 0.01, 0.1]);
    assert_eq!(p.bucket_counts, vec![4, 3, 2, 1]);
    assert_eq!((p.sum, p.count), (Some(0.75), 10));

    // Logs.
    let records: Vec<_> = {
        let logs = collector.logs.lock().expect("lock");
        let res = attrs(
            &logs[0].resource_logs[0]
                .resource
                .as_ref()
                .expect("resource")
                .attributes,
        );
        assert_eq!(res.get("service.name"), Some(&s("vigil")));
        assert_eq!(res.get("k8s.node.name"), Some(&s("node-7")));
        logs.iter()
            .flat_map(|r| &r.resource_logs)
            .flat_map(|r| &r.scope_logs)
            .inspect(|sl| assert_eq!(sl.scope.as_ref().map(|s| s.name.as_str()), Some("vigil")))
            .flat_map(|sl| sl.log_records.clone())
            .collect()
    };
    assert_eq!(records.len(), 3);
    let body = |r: &opentelemetry_proto::tonic::logs::v1::LogRecord| {
        r.body.as_ref().and_then(|b| b.value.clone())
    };
    assert_eq!(body(&records[0]), Some(s("tcp retransmit")));
    assert_eq!(records[0].severity_number, 13);
    assert_eq!(records[0].severity_text, "WARN");
    assert_eq!(records[0].trace_id, vec![0xab; 16]);
    assert_eq!(records[0].span_id, vec![0xcd; 8]);
    assert_eq!(records[0].time_unix_nano, 1_700_000_000_000_000_000);
    let a = attrs(&records[0].attributes);
    assert_eq!(a.get("k8s.pod.name"), Some(&s("web-1")));
    assert_eq!(
        a.get("vigil.retransmits"),
        Some(&any_value::Value::IntValue(3))
    );
    assert_eq!(
        a.get("vigil.rtt_ms"),
        Some(&any_value::Value::DoubleValue(12.5))
    );
    assert_eq!(
        a.get("vigil.syn"),
        Some(&any_value::Value::BoolValue(false))
    );
    assert_eq!(body(&records[1]), Some(s("socket healthy")));
    assert_eq!(records[1].severity_number, 9);
    assert_eq!(records[1].severity_text, "INFO");
    assert!(records[1].trace_id.is_empty() && records[1].span_id.is_empty());
    assert_eq!(body(&records[2]), Some(s("rtt spike")));

    // Headers reach the collector on every request.
    assert!(collector
        .tenants
        .lock()
        .expect("lock")
        .iter()
        .all(|t| t.as_deref() == Some("team a")));

    // Stop: one final export of both signals, with the latest values and
    // the record sent just before.
    retransmits.store(42, Ordering::SeqCst);
    tx.send(log("last words", Severity::Info, false))
        .await
        .expect("send");
    let before = collector.metrics.lock().expect("lock").len();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("export task ends promptly")
        .expect("no panic");
    let metrics = collector.metrics.lock().expect("lock").clone();
    assert!(metrics.len() > before, "final metrics export");
    let last = metrics.last().expect("last");
    let m = find(
        &last.resource_metrics[0].scope_metrics[0].metrics,
        "vigil_retransmits",
    );
    let Some(metric::Data::Sum(sum)) = &m.data else {
        panic!("not a sum: {m:?}")
    };
    assert_eq!(
        sum.data_points[0].value,
        Some(number_data_point::Value::AsDouble(42.0))
    );
    let last_log = collector
        .logs
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("logs");
    let last_record = last_log.resource_logs[0].scope_logs[0]
        .log_records
        .last()
        .cloned()
        .expect("record");
    assert_eq!(body(&last_record), Some(s("last words")));
    assert_eq!(stats.log_records_exported.load(Ordering::SeqCst), 4);
    assert_eq!(stats.log_records_dropped.load(Ordering::SeqCst), 0);
    assert_eq!(stats.log_export_errors.load(Ordering::SeqCst), 0);
    assert_eq!(stats.metric_export_errors.load(Ordering::SeqCst), 0);
    assert_eq!(
        stats.metric_exports.load(Ordering::SeqCst),
        metrics.len() as u64
    );
    server_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_collector_counts_errors_and_stops_promptly() {
    // A port that was just free: connections are refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let settings = OtlpSettings::from_vars(
        vars(vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            ),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100".into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000".into()),
        ]),
        "node-7",
    )
    .expect("settings")
    .expect("export on");
    let (tx, rx) = mpsc::channel(8);
    let stats = Arc::new(OtlpStats::default());
    let stop = CancellationToken::new();
    let task = otlp::spawn(
        settings,
        || exposition(1),
        rx,
        Arc::clone(&stats),
        stop.clone(),
    );
    tx.send(log("tcp retransmit", Severity::Warn, true))
        .await
        .expect("send");
    wait_for("metric export errors", || {
        stats.metric_export_errors.load(Ordering::SeqCst) >= 2
    })
    .await;
    wait_for("the log record counted as dropped", || {
        stats.log_records_dropped.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(stats.log_export_errors.load(Ordering::SeqCst) >= 1);

    let t = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("export task ends promptly")
        .expect("no panic");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(stats.metric_exports.load(Ordering::SeqCst), 0);
    assert_eq!(stats.log_records_exported.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_collector_is_bounded_by_the_timeout() {
    // Accepts TCP but never answers HTTP/2: every export times out.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            conns.push(c);
        }
    });
    let settings = OtlpSettings::from_vars(
        vars(vec![
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                format!("http://{addr}"),
            ),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100".into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "300".into()),
        ]),
        "node-7",
    )
    .expect("settings")
    .expect("export on");
    assert!(!settings.logs_enabled());
    let (tx, rx) = mpsc::channel(8);
    let stats = Arc::new(OtlpStats::default());
    let stop = CancellationToken::new();
    let task = otlp::spawn(
        settings,
        || exposition(1),
        rx,
        Arc::clone(&stats),
        stop.clone(),
    );
    // Logs are off: records are taken and discarded, never block the sender.
    for _ in 0..32 {
        tokio::time::timeout(
            Duration::from_secs(2),
            tx.send(log("x", Severity::Info, false)),
        )
        .await
        .expect("send does not block")
        .expect("send");
    }
    wait_for("a timed-out export", || {
        stats.metric_export_errors.load(Ordering::SeqCst) >= 1
    })
    .await;
    let t = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("export task ends")
        .expect("no panic");
    // At most the export in flight plus the final one.
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(stats.log_records_dropped.load(Ordering::SeqCst), 0);
    hold.abort();
}
