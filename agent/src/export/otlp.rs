//! OTLP/gRPC export of the agent's metrics and logs (findings as log records).
//!
//! Configured only by the standard OpenTelemetry environment variables
//! ([`OtlpSettings::from_env`]); off unless an OTLP endpoint variable is set.
//! Uses the protobuf types and tonic client stubs of `opentelemetry-proto`,
//! no OpenTelemetry SDK: [`metrics_request`] converts the same
//! [`Exposition`] the Prometheus endpoint writes, and [`spawn`] pushes it
//! every interval together with the log records received since the last
//! export.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
pub use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::exposition::{Exposition, Kind, Value};

/// Instrumentation scope of everything Vigil exports.
pub const SCOPE_NAME: &str = "vigil";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Log records kept between two exports; beyond, the oldest are dropped
/// (and counted in [`OtlpStats::log_records_dropped`]).
pub const LOG_BUFFER_RECORDS: usize = 10_000;
/// Log records per export request; a buffer this full is exported before
/// the interval ends (like the SDK's batch processor default).
pub const LOG_BATCH_RECORDS: usize = 512;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// At most one warning per signal this often while exports keep failing.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where and how one signal (metrics or logs) is exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSettings {
    /// `http://host:port` or `https://host:port` (TLS with the system roots).
    pub endpoint: String,
    /// gRPC metadata sent with every request (keys lowercase).
    pub headers: Vec<(String, String)>,
    /// Per export request, connecting included.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSettings {
    /// `None`: metrics are not exported.
    pub metrics: Option<SignalSettings>,
    /// `None`: log records are received and discarded (nothing counted).
    pub logs: Option<SignalSettings>,
    /// Where the span receiver forwards to; `None`: it does not run.
    pub traces: Option<SignalSettings>,
    /// `OTEL_METRIC_EXPORT_INTERVAL`: metrics and pending logs are exported
    /// this often.
    pub export_interval: Duration,
    /// Resource attributes, in order, keys unique.
    pub resource: Vec<(String, String)>,
    /// Start of the cumulative counters and histograms
    /// (`start_time_unix_nano`); [`spawn`] uses its own call time when unset.
    pub start_time: Option<SystemTime>,
}

impl OtlpSettings {
    /// From the standard env vars; `Ok(None)` when no OTLP endpoint
    /// variable is set (export off) or `OTEL_SDK_DISABLED=true`.
    ///
    /// Honours `OTEL_EXPORTER_OTLP_ENDPOINT` and the `_METRICS_`/`_LOGS_`/`_TRACES_`
    /// variants (a signal-specific variable wins; a signal whose endpoint is
    /// set by neither is off), `OTEL_EXPORTER_OTLP_HEADERS` and its variants
    /// (which replace the general list), `OTEL_EXPORTER_OTLP_TIMEOUT` and its
    /// variants (ms, default 10000), `OTEL_EXPORTER_OTLP_PROTOCOL` and its
    /// variants (only `grpc`), `OTEL_METRICS_EXPORTER`/`OTEL_LOGS_EXPORTER`
    /// and `OTEL_TRACES_EXPORTER` (`none` turns that signal off), `OTEL_METRIC_EXPORT_INTERVAL` (ms,
    /// default 60000), `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`.
    /// Empty variables count as unset. A bad value is an error naming the
    /// variable.
    pub fn from_env(node_name: &str) -> Result<Option<OtlpSettings>, String> {
        Self::from_vars(|k| std::env::var(k).ok(), node_name)
    }

    /// [`OtlpSettings::from_env`] with another variable lookup (tests).
    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
        node_name: &str,
    ) -> Result<Option<OtlpSettings>, String> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        for var in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ] {
            if let Some(p) = get(var) {
                if p != "grpc" {
                    return Err(format!(
                        "{var}={p:?} is not supported: Vigil exports OTLP over gRPC only \
                         (set it to \"grpc\" or unset it, and point the endpoint at the \
                         collector's gRPC port, usually 4317)"
                    ));
                }
            }
        }
        let signal = |name: &str, exporter_var: &str| -> Result<Option<SignalSettings>, String> {
            let specific = format!("OTEL_EXPORTER_OTLP_{name}_ENDPOINT");
            let (var, endpoint) = match (get(&specific), get("OTEL_EXPORTER_OTLP_ENDPOINT")) {
                (Some(e), _) => (specific, e),
                (None, Some(e)) => ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), e),
                (None, None) => return Ok(None),
            };
            if get(exporter_var).is_some_and(|v| v.eq_ignore_ascii_case("none")) {
                return Ok(None);
            }
            let endpoint = parse_endpoint(&var, &endpoint)?;
            let specific = format!("OTEL_EXPORTER_OTLP_{name}_HEADERS");
            let headers = match get(&specific) {
                Some(h) => parse_headers(&specific, &h)?,
                None => match get("OTEL_EXPORTER_OTLP_HEADERS") {
                    Some(h) => parse_headers("OTEL_EXPORTER_OTLP_HEADERS", &h)?,
                    None => Vec::new(),
                },
            };
            let specific = format!("OTEL_EXPORTER_OTLP_{name}_TIMEOUT");
            let timeout = match get(&specific) {
                Some(t) => parse_millis(&specific, &t)?,
                None => match get("OTEL_EXPORTER_OTLP_TIMEOUT") {
                    Some(t) => parse_millis("OTEL_EXPORTER_OTLP_TIMEOUT", &t)?,
                    None => DEFAULT_TIMEOUT,
                },
            };
            Ok(Some(SignalSettings {
                endpoint,
                headers,
                timeout,
            }))
        };
        let metrics = signal("METRICS", "OTEL_METRICS_EXPORTER")?;
        let logs = signal("LOGS", "OTEL_LOGS_EXPORTER")?;
        let traces = signal("TRACES", "OTEL_TRACES_EXPORTER")?;
        let any_endpoint = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|v| get(v).is_some());
        if !any_endpoint {
            return Ok(None);
        }
        let export_interval = match get("OTEL_METRIC_EXPORT_INTERVAL") {
            Some(v) => parse_millis("OTEL_METRIC_EXPORT_INTERVAL", &v)?,
            None => DEFAULT_INTERVAL,
        };

        let mut resource: Vec<(String, String)> = vec![
            ("service.name".into(), "vigil".into()),
            ("service.version".into(), VERSION.into()),
            ("host.name".into(), node_name.into()),
            ("k8s.node.name".into(), node_name.into()),
        ];
        if let Some(attrs) = get("OTEL_RESOURCE_ATTRIBUTES") {
            for (k, v) in parse_pairs("OTEL_RESOURCE_ATTRIBUTES", &attrs)? {
                set_attr(&mut resource, k, v);
            }
        }
        if let Some(name) = get("OTEL_SERVICE_NAME") {
            set_attr(&mut resource, "service.name".into(), name);
        }
        Ok(Some(OtlpSettings {
            metrics,
            logs,
            traces,
            export_interval,
            resource,
            start_time: None,
        }))
    }

    /// Sets the start of the cumulative metrics (the agent's start).
    pub fn with_start_time(mut self, start: SystemTime) -> Self {
        self.start_time = Some(start);
        self
    }

    /// Whether log records sent to [`spawn`] go anywhere.
    pub fn logs_enabled(&self) -> bool {
        self.logs.is_some()
    }
}

fn set_attr(attrs: &mut Vec<(String, String)>, k: String, v: String) {
    match attrs.iter_mut().find(|(key, _)| *key == k) {
        Some(slot) => slot.1 = v,
        None => attrs.push((k, v)),
    }
}

fn parse_endpoint(var: &str, v: &str) -> Result<String, String> {
    let scheme_ok = v.starts_with("http://") || v.starts_with("https://");
    if !scheme_ok {
        return Err(format!(
            "{var}={v:?}: expected an http:// or https:// URL such as http://localhost:4317"
        ));
    }
    let endpoint = v.trim_end_matches('/').to_owned();
    Endpoint::from_shared(endpoint.clone()).map_err(|e| format!("{var}={v:?}: {e}"))?;
    Ok(endpoint)
}

fn parse_millis(var: &str, v: &str) -> Result<Duration, String> {
    match v.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "{var}={v:?}: expected a positive number of milliseconds"
        )),
    }
}

/// `k=v,k2=v2` with percent-encoded keys and values (W3C Baggage syntax,
/// as OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS use).
fn parse_pairs(var: &str, v: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in v.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some((k, val)) = item.split_once('=') else {
            return Err(format!("{var}: {item:?} is not key=value"));
        };
        let k = percent_decode(k.trim()).map_err(|e| format!("{var}: key {k:?}: {e}"))?;
        let val = percent_decode(val.trim()).map_err(|e| format!("{var}: value {val:?}: {e}"))?;
        if k.is_empty() {
            return Err(format!("{var}: {item:?} has an empty key"));
        }
        out.push((k, val));
    }
    Ok(out)
}

fn parse_headers(var: &str, v: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (k, val) in parse_pairs(var, v)? {
        let k = k.to_ascii_lowercase();
        metadata_pair(&k, &val).map_err(|e| format!("{var}: header {k:?}: {e}"))?;
        out.push((k, val));
    }
    Ok(out)
}

fn metadata_pair(k: &str, v: &str) -> Result<(AsciiMetadataKey, AsciiMetadataValue), String> {
    let key = AsciiMetadataKey::from_bytes(k.as_bytes())
        .map_err(|_| "not a valid gRPC metadata name".to_owned())?;
    let value = AsciiMetadataValue::try_from(v)
        .map_err(|_| "not a valid gRPC metadata value".to_owned())?;
    Ok((key, value))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding at byte {i}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-decodes to invalid UTF-8".to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warn,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
}

/// One log record (a finding) for the logs signal.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecordOut {
    pub time_unix_nano: u64,
    pub severity: Severity,
    /// e.g. "tcp retransmit"
    pub body: String,
    pub attributes: Vec<(String, AttrValue)>,
    /// Sets the record's trace_id/span_id fields when present.
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<[u8; 8]>,
}

/// Export counters, for the agent's own metrics.
#[derive(Debug, Default)]
pub struct OtlpStats {
    /// Successful metrics export requests.
    pub metric_exports: AtomicU64,
    /// Failed metrics export requests (error status, transport error, timeout).
    pub metric_export_errors: AtomicU64,
    /// Log records a collector accepted.
    pub log_records_exported: AtomicU64,
    /// Failed logs export requests.
    pub log_export_errors: AtomicU64,
    /// Log records lost: buffer overflow, or in a failed export request
    /// (failed requests are not retried).
    pub log_records_dropped: AtomicU64,
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn string_attrs(pairs: &[(String, String)]) -> Vec<KeyValue> {
    pairs
        .iter()
        .map(|(k, v)| kv(k, any_value::Value::StringValue(v.clone())))
        .collect()
}

fn resource(attrs: &[(String, String)]) -> Resource {
    Resource {
        attributes: string_attrs(attrs),
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.to_owned(),
        version: VERSION.to_owned(),
        ..Default::default()
    }
}

/// OTLP unit (UCUM) from the Prometheus name's unit suffix.
fn unit(name: &str) -> &'static str {
    if name.ends_with("_seconds") {
        "s"
    } else if name.ends_with("_bytes") {
        "By"
    } else {
        "1"
    }
}

/// Pure conversion: families -> one ResourceMetrics with one ScopeMetrics.
///
/// Counters become monotonic cumulative sums named without `_total`, gauges
/// gauges, histograms cumulative explicit-bucket histograms; cumulative
/// points start at `start_unix_nano`. A histogram point whose counts do not
/// match its bounds (`bounds.len() + 1`) is skipped, as is a number in a
/// histogram family or a histogram in another.
/// A metric exemplar: the trace of a measurement behind a point.
fn exemplar(e: &crate::exposition::Exemplar) -> opentelemetry_proto::tonic::metrics::v1::Exemplar {
    opentelemetry_proto::tonic::metrics::v1::Exemplar {
        time_unix_nano: e.time_unix_nano,
        trace_id: e.trace_id.to_vec(),
        span_id: e.span_id.to_vec(),
        value: Some(opentelemetry_proto::tonic::metrics::v1::exemplar::Value::AsDouble(e.value)),
        ..Default::default()
    }
}

pub fn metrics_request(
    resource_attrs: &[(String, String)],
    families: &Exposition,
    start_unix_nano: u64,
    now_unix_nano: u64,
) -> ExportMetricsServiceRequest {
    let cumulative = AggregationTemporality::Cumulative as i32;
    let mut metrics = Vec::with_capacity(families.families.len());
    for f in &families.families {
        let attrs = |labels: &[(String, String)]| string_attrs(labels);
        let numbers = |start: u64| -> Vec<NumberDataPoint> {
            f.points
                .iter()
                .filter_map(|p| match p.value {
                    Value::Number(v) => Some(NumberDataPoint {
                        attributes: attrs(&p.labels),
                        start_time_unix_nano: start,
                        time_unix_nano: now_unix_nano,
                        value: Some(number_data_point::Value::AsDouble(v)),
                        exemplars: p.exemplar.iter().map(exemplar).collect(),
                        ..Default::default()
                    }),
                    Value::Histogram(_) => None,
                })
                .collect()
        };
        let (name, data) = match f.kind {
            Kind::Counter => (
                f.name.strip_suffix("_total").unwrap_or(&f.name),
                metric::Data::Sum(Sum {
                    data_points: numbers(start_unix_nano),
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
            ),
            Kind::Gauge => (
                f.name.as_str(),
                metric::Data::Gauge(Gauge {
                    data_points: numbers(0),
                }),
            ),
            Kind::Histogram => {
                let data_points = f
                    .points
                    .iter()
                    .filter_map(|p| match &p.value {
                        Value::Histogram(h) if h.counts.len() == h.bounds.len() + 1 => {
                            Some(HistogramDataPoint {
                                attributes: attrs(&p.labels),
                                start_time_unix_nano: start_unix_nano,
                                time_unix_nano: now_unix_nano,
                                count: h.count,
                                sum: Some(h.sum),
                                bucket_counts: h.counts.clone(),
                                explicit_bounds: h.bounds.clone(),
                                ..Default::default()
                            })
                        }
                        _ => None,
                    })
                    .collect();
                (
                    f.name.as_str(),
                    metric::Data::Histogram(Histogram {
                        data_points,
                        aggregation_temporality: cumulative,
                    }),
                )
            }
        };
        metrics.push(Metric {
            name: name.to_owned(),
            description: f.help.clone(),
            unit: unit(name).to_owned(),
            data: Some(data),
            ..Default::default()
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource(resource_attrs)),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// One OTLP log record; `observed_unix_nano` is when the exporter got it.
pub fn log_record(r: &LogRecordOut, observed_unix_nano: u64) -> LogRecord {
    let (number, text) = match r.severity {
        Severity::Info => (SeverityNumber::Info, "INFO"),
        Severity::Warn => (SeverityNumber::Warn, "WARN"),
    };
    LogRecord {
        time_unix_nano: r.time_unix_nano,
        observed_time_unix_nano: observed_unix_nano,
        severity_number: number as i32,
        severity_text: text.to_owned(),
        body: Some(AnyValue {
            value: Some(any_value::Value::StringValue(r.body.clone())),
        }),
        attributes: r
            .attributes
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    AttrValue::Str(s) => any_value::Value::StringValue(s.clone()),
                    AttrValue::Int(i) => any_value::Value::IntValue(*i),
                    AttrValue::Double(d) => any_value::Value::DoubleValue(*d),
                    AttrValue::Bool(b) => any_value::Value::BoolValue(*b),
                };
                kv(k, v)
            })
            .collect(),
        trace_id: r.trace_id.map(|t| t.to_vec()).unwrap_or_default(),
        span_id: r.span_id.map(|s| s.to_vec()).unwrap_or_default(),
        ..Default::default()
    }
}

/// Log records -> one ResourceLogs with one ScopeLogs.
pub fn logs_request(
    resource_attrs: &[(String, String)],
    records: Vec<LogRecord>,
) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource(resource_attrs)),
            scope_logs: vec![ScopeLogs {
                scope: Some(scope()),
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Warns on the first failure, then at most every [`WARN_EVERY`] with the
/// number of failures in between; says once when exports work again.
struct WarnLimiter {
    signal: &'static str,
    last_warn: Option<Instant>,
    suppressed: u64,
    failing: bool,
}

impl WarnLimiter {
    fn new(signal: &'static str) -> Self {
        WarnLimiter {
            signal,
            last_warn: None,
            suppressed: 0,
            failing: false,
        }
    }

    fn failed(&mut self, endpoint: &str, error: &str) {
        self.failing = true;
        let due = self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            tracing::warn!(
                signal = self.signal,
                endpoint,
                error,
                failures_since_last_warning = self.suppressed,
                "OTLP export failed (warning at most once a minute)"
            );
            self.last_warn = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
    }

    fn succeeded(&mut self, endpoint: &str) {
        if self.failing {
            tracing::info!(signal = self.signal, endpoint, "OTLP export works again");
            self.failing = false;
            self.last_warn = None;
            self.suppressed = 0;
        }
    }
}

struct Target {
    endpoint: String,
    timeout: Duration,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    channel: Channel,
    warn: WarnLimiter,
}

impl Target {
    fn new(s: SignalSettings, signal: &'static str) -> Option<Target> {
        let built = (|| -> Result<Channel, String> {
            let mut ep = Endpoint::from_shared(s.endpoint.clone())
                .map_err(|e| e.to_string())?
                .connect_timeout(s.timeout)
                .timeout(s.timeout);
            if s.endpoint.starts_with("https://") {
                ep = ep
                    .tls_config(ClientTlsConfig::new().with_native_roots())
                    .map_err(|e| e.to_string())?;
            }
            Ok(ep.connect_lazy())
        })();
        let channel = match built {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(signal, endpoint = %s.endpoint, error = %e, "OTLP export disabled: cannot set up the channel");
                return None;
            }
        };
        let headers = s
            .headers
            .iter()
            .filter_map(|(k, v)| metadata_pair(k, v).ok())
            .collect();
        Some(Target {
            endpoint: s.endpoint,
            timeout: s.timeout,
            headers,
            channel,
            warn: WarnLimiter::new(signal),
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let md: &mut MetadataMap = req.metadata_mut();
        for (k, v) in &self.headers {
            md.insert(k.clone(), v.clone());
        }
        req.set_timeout(self.timeout);
        req
    }

    async fn export_metrics(&mut self, msg: ExportMetricsServiceRequest) -> Result<(), String> {
        let req = self.request(msg);
        let mut client = MetricsServiceClient::new(self.channel.clone());
        let res = tokio::time::timeout(self.timeout, client.export(req)).await;
        self.outcome(res.map(|r| r.map(|_| ())))
    }

    async fn export_logs(&mut self, msg: ExportLogsServiceRequest) -> Result<(), String> {
        let req = self.request(msg);
        let mut client = LogsServiceClient::new(self.channel.clone());
        let res = tokio::time::timeout(self.timeout, client.export(req)).await;
        self.outcome(res.map(|r| r.map(|_| ())))
    }

    fn outcome(
        &mut self,
        res: Result<Result<(), tonic::Status>, tokio::time::error::Elapsed>,
    ) -> Result<(), String> {
        let err = match res {
            Ok(Ok(())) => {
                self.warn.succeeded(&self.endpoint);
                return Ok(());
            }
            Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
            Err(_) => format!("timed out after {:?}", self.timeout),
        };
        self.warn.failed(&self.endpoint, &err);
        Err(err)
    }
}

/// The span receiver's upstream (`correlate::receiver`): the same channel,
/// TLS, headers, timeout and rate-limited warnings as metrics and logs.
pub struct TracesUpstream(Target);

impl TracesUpstream {
    /// `None` (and a warning) when the channel cannot be set up.
    pub fn new(s: SignalSettings) -> Option<TracesUpstream> {
        Target::new(s, "traces").map(TracesUpstream)
    }

    pub fn endpoint(&self) -> &str {
        &self.0.endpoint
    }

    /// Exports one request; Ok(spans the collector rejected in a partial success).
    pub async fn export(
        &mut self,
        msg: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    ) -> Result<u64, String> {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        let req = self.0.request(msg);
        let mut client = TraceServiceClient::new(self.0.channel.clone());
        let res = tokio::time::timeout(self.0.timeout, client.export(req)).await;
        let rejected = match &res {
            Ok(Ok(r)) => r
                .get_ref()
                .partial_success
                .as_ref()
                .map_or(0, |p| p.rejected_spans),
            _ => 0,
        };
        let rejected = u64::try_from(rejected).unwrap_or(0);
        self.0
            .outcome(res.map(|r| r.map(|_| ())))
            .map(|()| rejected)
    }
}

struct MetricsSide<F> {
    target: Option<Target>,
    snapshot: F,
    resource: Arc<[(String, String)]>,
    start_unix_nano: u64,
    stats: Arc<OtlpStats>,
}

impl<F: Fn() -> Exposition> MetricsSide<F> {
    async fn export(&mut self) {
        let Some(target) = self.target.as_mut() else {
            return;
        };
        let families = (self.snapshot)();
        let req = metrics_request(
            &self.resource,
            &families,
            self.start_unix_nano,
            unix_nanos(SystemTime::now()),
        );
        let counter = match target.export_metrics(req).await {
            Ok(()) => &self.stats.metric_exports,
            Err(_) => &self.stats.metric_export_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct LogsSide {
    target: Option<Target>,
    buffer: VecDeque<LogRecord>,
    resource: Arc<[(String, String)]>,
    stats: Arc<OtlpStats>,
}

impl LogsSide {
    fn push(&mut self, r: LogRecordOut) {
        if self.target.is_none() {
            return;
        }
        if self.buffer.len() >= LOG_BUFFER_RECORDS {
            self.buffer.pop_front();
            self.stats
                .log_records_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        self.buffer
            .push_back(log_record(&r, unix_nanos(SystemTime::now())));
    }

    /// Exports batches while at least `min` records are buffered. A failed
    /// batch is dropped and ends this round; with `drop_rest` the records
    /// still buffered then are dropped too.
    async fn export(&mut self, min: usize, drop_rest: bool) {
        let Some(target) = self.target.as_mut() else {
            return;
        };
        while !self.buffer.is_empty() && self.buffer.len() >= min {
            let n = self.buffer.len().min(LOG_BATCH_RECORDS);
            let batch: Vec<LogRecord> = self.buffer.drain(..n).collect();
            let req = logs_request(&self.resource, batch);
            let n = n as u64;
            match target.export_logs(req).await {
                Ok(()) => {
                    self.stats
                        .log_records_exported
                        .fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => {
                    self.stats.log_export_errors.fetch_add(1, Ordering::Relaxed);
                    let mut lost = n;
                    if drop_rest {
                        lost += self.buffer.len() as u64;
                        self.buffer.clear();
                    }
                    self.stats
                        .log_records_dropped
                        .fetch_add(lost, Ordering::Relaxed);
                    return;
                }
            }
        }
    }
}

/// Exports every `settings.export_interval` (first one an interval after
/// the call): the families `snapshot()` returns, and the log records
/// received since the last export (at most [`LOG_BUFFER_RECORDS`] kept: the
/// oldest are dropped beyond; [`LOG_BATCH_RECORDS`] buffered records are
/// exported without waiting for the interval). On `stop`: one final export
/// of both, then the task ends. Errors are counted in `stats` and logged
/// (at most once a minute per signal), never fatal. Every request is bounded
/// by the signal's timeout and the two signals are exported concurrently, so
/// an unreachable or stalled collector delays the end by about two timeouts
/// (the export in flight, then the final one). Senders are never blocked
/// beyond the channel's own capacity. Must be called within a tokio runtime.
pub fn spawn(
    settings: OtlpSettings,
    snapshot: impl Fn() -> Exposition + Send + 'static,
    mut logs: mpsc::Receiver<LogRecordOut>,
    stats: Arc<OtlpStats>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let start = settings.start_time.unwrap_or_else(SystemTime::now);
    tokio::spawn(async move {
        let resource: Arc<[(String, String)]> = settings.resource.into();
        let mut metrics = MetricsSide {
            target: settings.metrics.and_then(|s| Target::new(s, "metrics")),
            snapshot,
            resource: Arc::clone(&resource),
            start_unix_nano: unix_nanos(start),
            stats: Arc::clone(&stats),
        };
        let mut out = LogsSide {
            target: settings.logs.and_then(|s| Target::new(s, "logs")),
            buffer: VecDeque::new(),
            resource,
            stats,
        };
        let interval = settings.export_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut logs_open = true;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {
                    tokio::join!(metrics.export(), out.export(1, false));
                }
                r = logs.recv(), if logs_open => match r {
                    Some(r) => {
                        out.push(r);
                        if out.buffer.len() >= LOG_BATCH_RECORDS {
                            out.export(LOG_BATCH_RECORDS, false).await;
                        }
                    }
                    None => logs_open = false,
                },
            }
        }
        // Final export: what is already queued, then both signals once.
        while let Ok(r) = logs.try_recv() {
            out.push(r);
        }
        tokio::join!(metrics.export(), out.export(1, true));
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::HistogramPoint;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn settings(pairs: &[(&str, &str)]) -> Result<Option<OtlpSettings>, String> {
        OtlpSettings::from_vars(vars(pairs), "node-1")
    }

    fn attr<'a>(attrs: &'a [(String, String)], k: &str) -> Option<&'a str> {
        attrs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn off_without_endpoint() {
        assert_eq!(settings(&[]), Ok(None));
        assert_eq!(
            settings(&[
                ("OTEL_SERVICE_NAME", "x"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "")
            ]),
            Ok(None)
        );
        assert_eq!(
            settings(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_SDK_DISABLED", "true")
            ]),
            Ok(None)
        );
    }

    #[test]
    fn defaults_and_resource() {
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317/")])
            .expect("ok")
            .expect("on");
        let m = s.metrics.as_ref().expect("metrics");
        assert_eq!(m.endpoint, "http://collector:4317");
        assert_eq!(m.timeout, Duration::from_secs(10));
        assert!(m.headers.is_empty());
        assert_eq!(s.logs.as_ref(), Some(m));
        assert_eq!(s.export_interval, Duration::from_secs(60));
        assert_eq!(
            s.resource,
            vec![
                ("service.name".to_owned(), "vigil".to_owned()),
                ("service.version".to_owned(), VERSION.to_owned()),
                ("host.name".to_owned(), "node-1".to_owned()),
                ("k8s.node.name".to_owned(), "node-1".to_owned()),
            ]
        );
    }

    #[test]
    fn signal_specific_wins() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "https://logs:4317"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "700"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,b=2"),
            ("OTEL_EXPORTER_OTLP_LOGS_HEADERS", "c=3"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "15000"),
        ])
        .expect("ok")
        .expect("on");
        let m = s.metrics.expect("metrics");
        let l = s.logs.expect("logs");
        assert_eq!(m.endpoint, "http://general:4317");
        assert_eq!(l.endpoint, "https://logs:4317");
        assert_eq!(m.timeout, Duration::from_millis(700));
        assert_eq!(l.timeout, Duration::from_millis(2500));
        assert_eq!(
            m.headers,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(l.headers, vec![("c".into(), "3".into())]);
        assert_eq!(s.export_interval, Duration::from_secs(15));

        // Only one signal configured: the other is off.
        let s = settings(&[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://m:4317")])
            .expect("ok")
            .expect("on");
        assert!(s.metrics.is_some());
        assert!(!s.logs_enabled());
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ])
        .expect("ok")
        .expect("on");
        assert!(s.metrics.is_none());
        assert!(s.logs.is_some());
    }

    #[test]
    fn protocol_must_be_grpc() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
        assert!(settings(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .expect("ok")
            .is_some());
        for var in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
            "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
        ] {
            let e = settings(&[ep, (var, "http/protobuf")]).expect_err("http/protobuf");
            assert!(e.contains(var) && e.contains("gRPC"), "{e}");
        }
    }

    #[test]
    fn bad_values_name_the_variable() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", "http://bad host")],
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
            ),
            (
                &[ep, ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                &[ep, ("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "0")],
                "OTEL_EXPORTER_OTLP_LOGS_TIMEOUT",
            ),
            (
                &[ep, ("OTEL_METRIC_EXPORT_INTERVAL", "-1")],
                "OTEL_METRIC_EXPORT_INTERVAL",
            ),
            (
                &[ep, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                &[ep, ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "bad key=1")],
                "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            ),
            (
                &[ep, ("OTEL_RESOURCE_ATTRIBUTES", "a=%zz")],
                "OTEL_RESOURCE_ATTRIBUTES",
            ),
            (
                &[ep, ("OTEL_RESOURCE_ATTRIBUTES", "=v")],
                "OTEL_RESOURCE_ATTRIBUTES",
            ),
        ];
        for (vars, var) in cases {
            let e = settings(vars).expect_err(var);
            assert!(e.contains(var), "{var}: {e}");
        }
    }

    #[test]
    fn headers_and_resource_attributes_are_percent_decoded() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                " Authorization = Bearer%20abc%3D%3D , x-tenant=t1,",
            ),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod%2Ceu,service.name=overridden,host.name=h%C3%A9,k8s.cluster.name=c1",
            ),
        ])
        .expect("ok")
        .expect("on");
        let m = s.metrics.expect("metrics");
        assert_eq!(
            m.headers,
            vec![
                ("authorization".into(), "Bearer abc==".into()),
                ("x-tenant".into(), "t1".into())
            ]
        );
        let r = &s.resource;
        assert_eq!(attr(r, "deployment.environment"), Some("prod,eu"));
        assert_eq!(attr(r, "service.name"), Some("overridden"));
        assert_eq!(attr(r, "host.name"), Some("hé"));
        assert_eq!(attr(r, "k8s.node.name"), Some("node-1"));
        assert_eq!(attr(r, "service.version"), Some(VERSION));
        // Built-ins first, in order, no duplicates.
        assert_eq!(r[0].0, "service.name");
        assert_eq!(r.len(), 6);

        // OTEL_SERVICE_NAME beats service.name in OTEL_RESOURCE_ATTRIBUTES.
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=a"),
            ("OTEL_SERVICE_NAME", "b"),
        ])
        .expect("ok")
        .expect("on");
        assert_eq!(attr(&s.resource, "service.name"), Some("b"));
    }

    fn sample() -> Exposition {
        let mut x = Exposition::default();
        x.family("vigil_retransmits_total", "counter", "Retransmits.");
        x.sample("vigil_retransmits_total", &[("pod", "a".into())], 7u64);
        x.sample("vigil_retransmits_total", &[("pod", "b".into())], 1u64);
        x.exemplar(
            "vigil_retransmits_total",
            crate::exposition::Exemplar {
                trace_id: [0xab; 16],
                span_id: [0xcd; 8],
                time_unix_nano: 150,
                value: 1.0,
            },
        );
        x.family("vigil_sent_bytes_total", "counter", "Sent.");
        x.sample("vigil_sent_bytes_total", &[], 1024u64);
        x.family("vigil_sockets", "gauge", "Sockets.");
        x.sample("vigil_sockets", &[], 3u64);
        x.family("vigil_rtt_seconds", "histogram", "RTT.");
        x.histogram(
            "vigil_rtt_seconds",
            &[("pod", "a".into())],
            HistogramPoint {
                bounds: vec![0.01, 0.1],
                counts: vec![1, 2, 3],
                sum: 1.5,
                count: 6,
            },
        );
        // Inconsistent point: skipped.
        x.histogram(
            "vigil_rtt_seconds",
            &[("pod", "bad".into())],
            HistogramPoint {
                bounds: vec![0.01],
                counts: vec![1],
                sum: 0.0,
                count: 1,
            },
        );
        x
    }

    #[test]
    fn converts_families() {
        let res = vec![("service.name".to_owned(), "vigil".to_owned())];
        let req = metrics_request(&res, &sample(), 100, 200);
        assert_eq!(req.resource_metrics.len(), 1);
        let rm = &req.resource_metrics[0];
        let r = rm.resource.as_ref().expect("resource");
        assert_eq!(r.attributes, string_attrs(&res));
        assert_eq!(rm.scope_metrics.len(), 1);
        let sm = &rm.scope_metrics[0];
        let sc = sm.scope.as_ref().expect("scope");
        assert_eq!((sc.name.as_str(), sc.version.as_str()), ("vigil", VERSION));
        let m = &sm.metrics;
        assert_eq!(m.len(), 4);

        assert_eq!(m[0].name, "vigil_retransmits");
        assert_eq!(m[0].unit, "1");
        assert_eq!(m[0].description, "Retransmits.");
        let Some(metric::Data::Sum(sum)) = &m[0].data else {
            panic!("sum: {:?}", m[0].data)
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(sum.data_points.len(), 2);
        let p = &sum.data_points[1];
        assert_eq!(p.attributes, string_attrs(&[("pod".into(), "b".into())]));
        assert_eq!(p.value, Some(number_data_point::Value::AsDouble(1.0)));
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (100, 200));
        // The traced measurement behind the point, as an exemplar.
        assert_eq!(p.exemplars.len(), 1);
        let e = &p.exemplars[0];
        assert_eq!(
            (e.trace_id.as_slice(), e.span_id.as_slice()),
            (&[0xab; 16][..], &[0xcd; 8][..])
        );
        assert_eq!(e.time_unix_nano, 150);
        assert!(sum.data_points[0].exemplars.is_empty());

        assert_eq!(m[1].name, "vigil_sent_bytes");
        assert_eq!(m[1].unit, "By");

        assert_eq!(m[2].name, "vigil_sockets");
        assert_eq!(m[2].unit, "1");
        let Some(metric::Data::Gauge(g)) = &m[2].data else {
            panic!("gauge: {:?}", m[2].data)
        };
        assert_eq!(g.data_points.len(), 1);
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsDouble(3.0))
        );
        assert_eq!(g.data_points[0].time_unix_nano, 200);
        assert_eq!(g.data_points[0].start_time_unix_nano, 0);

        assert_eq!(m[3].name, "vigil_rtt_seconds");
        assert_eq!(m[3].unit, "s");
        let Some(metric::Data::Histogram(h)) = &m[3].data else {
            panic!("histogram: {:?}", m[3].data)
        };
        assert_eq!(
            h.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(h.data_points.len(), 1);
        let p = &h.data_points[0];
        assert_eq!(p.explicit_bounds, vec![0.01, 0.1]);
        assert_eq!(p.bucket_counts, vec![1, 2, 3]);
        assert_eq!((p.sum, p.count), (Some(1.5), 6));
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (100, 200));
        assert_eq!(p.attributes, string_attrs(&[("pod".into(), "a".into())]));
    }

    #[test]
    fn converts_log_records() {
        let r = LogRecordOut {
            time_unix_nano: 5,
            severity: Severity::Warn,
            body: "tcp retransmit".into(),
            attributes: vec![
                ("pod".into(), AttrValue::Str("a".into())),
                ("n".into(), AttrValue::Int(-2)),
                ("rtt".into(), AttrValue::Double(0.5)),
                ("syn".into(), AttrValue::Bool(true)),
            ],
            trace_id: Some([1; 16]),
            span_id: Some([2; 8]),
        };
        let l = log_record(&r, 9);
        assert_eq!((l.time_unix_nano, l.observed_time_unix_nano), (5, 9));
        assert_eq!(l.severity_number, 13);
        assert_eq!(l.severity_text, "WARN");
        assert_eq!(
            l.body.as_ref().and_then(|b| b.value.clone()),
            Some(any_value::Value::StringValue("tcp retransmit".into()))
        );
        assert_eq!(
            l.attributes,
            vec![
                kv("pod", any_value::Value::StringValue("a".into())),
                kv("n", any_value::Value::IntValue(-2)),
                kv("rtt", any_value::Value::DoubleValue(0.5)),
                kv("syn", any_value::Value::BoolValue(true)),
            ]
        );
        assert_eq!(l.trace_id, vec![1; 16]);
        assert_eq!(l.span_id, vec![2; 8]);

        let info = log_record(
            &LogRecordOut {
                severity: Severity::Info,
                trace_id: None,
                span_id: None,
                ..r
            },
            9,
        );
        assert_eq!(
            (info.severity_number, info.severity_text.as_str()),
            (9, "INFO")
        );
        assert!(info.trace_id.is_empty() && info.span_id.is_empty());

        let req = logs_request(&[("service.name".into(), "vigil".into())], vec![l, info]);
        let rl = &req.resource_logs[0];
        assert_eq!(rl.scope_logs.len(), 1);
        assert_eq!(
            rl.scope_logs[0].scope.as_ref().map(|s| s.name.as_str()),
            Some("vigil")
        );
        assert_eq!(rl.scope_logs[0].log_records.len(), 2);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2c%C3%A9"), Ok("a b,é".into()));
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err());
    }
}
