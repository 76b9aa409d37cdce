//! `vigil-otlp-sink`: a tiny OTLP/gRPC receiver for Vigil's tests and demo.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
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
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, NumberDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde_json::{json, Map, Value};

/// Receives OTLP metrics, logs and traces over gRPC (plain HTTP/2, no TLS) and
/// prints every export request as one JSON line on stdout.
///
/// Once listening, the first stdout line is:
///
///   vigil-otlp-sink listening on ADDR
///
/// Then one line per request, either
///
///   {"signal":"metrics","resource":{..},"metrics":[{"name","description",
///    "unit","kind":"sum"|"gauge"|"histogram"|..,"monotonic","temporality":
///    "cumulative"|"delta"|"unspecified","points":[{"attributes":{..},
///    "start_time_unix_nano","time_unix_nano","value"} or
///    {..,"bounds","counts","sum","count"}]}]}
///
/// or
///
///   {"signal":"logs","resource":{..},"records":[{"time_unix_nano",
///    "severity_number","severity_text","body","attributes":{..},
///    "trace_id":"hex","span_id":"hex"}]}
///
/// or
///
///   {"signal":"traces","resource":{..},"spans":[{"trace_id":"hex",
///    "span_id":"hex","parent_span_id":"hex","name","kind":"server"|"client"|
///    "internal"|"producer"|"consumer"|"unspecified","scope",
///    "start_time_unix_nano","end_time_unix_nano","attributes":{..},
///    "events":[{"name","time_unix_nano","attributes":{..}}]}]}
///
/// (one line per resource in the request).
///
/// Attribute values are JSON strings, numbers or booleans. The process exits
/// 0 on SIGTERM or SIGINT, when its parent dies, or after --max-seconds.
///
/// Example: vigil-otlp-sink --listen 127.0.0.1:0
#[derive(Debug, Parser)]
#[command(name = "vigil-otlp-sink", version, verbatim_doc_comment)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: SocketAddr,
    /// Exit by itself after this many seconds, so a forgotten sink does not
    /// run forever.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

fn main() -> ExitCode {
    vigil_testbed::init_logging();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-otlp-sink: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    vigil_testbed::die_with_parent()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let max = Duration::from_secs(args.max_seconds);
    let stop = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "stopping"),
            _ = tokio::time::sleep(max) => {
                tracing::info!(seconds = max.as_secs(), "--max-seconds reached, stopping");
            }
        }
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "vigil-otlp-sink listening on {addr}")?;
        out.flush()?;
    }
    tonic::transport::Server::builder()
        .add_service(MetricsServiceServer::new(Sink))
        .add_service(LogsServiceServer::new(Sink))
        .add_service(TraceServiceServer::new(Sink))
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), stop)
        .await
        .context("serving OTLP/gRPC")
}

struct Sink;

fn print(line: &Value) -> Result<(), tonic::Status> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| tonic::Status::internal(format!("writing stdout: {e}")))
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        for rm in req.into_inner().resource_metrics {
            let metrics: Vec<Value> = rm
                .scope_metrics
                .iter()
                .flat_map(|sm| &sm.metrics)
                .map(|m| {
                    let (kind, monotonic, temporality, points) = match &m.data {
                        Some(metric::Data::Sum(s)) => (
                            "sum",
                            Some(s.is_monotonic),
                            Some(s.aggregation_temporality),
                            s.data_points.iter().map(number_point).collect(),
                        ),
                        Some(metric::Data::Gauge(g)) => (
                            "gauge",
                            None,
                            None,
                            g.data_points.iter().map(number_point).collect(),
                        ),
                        Some(metric::Data::Histogram(h)) => (
                            "histogram",
                            None,
                            Some(h.aggregation_temporality),
                            h.data_points
                                .iter()
                                .map(|p| {
                                    json!({
                                        "attributes": attributes(&p.attributes),
                                        "start_time_unix_nano": p.start_time_unix_nano,
                                        "time_unix_nano": p.time_unix_nano,
                                        "bounds": p.explicit_bounds,
                                        "counts": p.bucket_counts,
                                        "sum": p.sum,
                                        "count": p.count,
                                    })
                                })
                                .collect(),
                        ),
                        Some(metric::Data::ExponentialHistogram(_)) => {
                            ("exponential_histogram", None, None, Vec::new())
                        }
                        Some(metric::Data::Summary(_)) => ("summary", None, None, Vec::new()),
                        None => ("none", None, None, Vec::new()),
                    };
                    json!({
                        "name": m.name,
                        "description": m.description,
                        "unit": m.unit,
                        "kind": kind,
                        "monotonic": monotonic,
                        "temporality": temporality.map(temporality_name),
                        "points": points,
                    })
                })
                .collect();
            print(&json!({
                "signal": "metrics",
                "resource": resource(rm.resource.as_ref()),
                "metrics": metrics,
            }))?;
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        for rl in req.into_inner().resource_logs {
            let records: Vec<Value> = rl
                .scope_logs
                .iter()
                .flat_map(|sl| &sl.log_records)
                .map(|r| {
                    json!({
                        "time_unix_nano": r.time_unix_nano,
                        "severity_number": r.severity_number,
                        "severity_text": r.severity_text,
                        "body": r.body.as_ref().map(any_value),
                        "attributes": attributes(&r.attributes),
                        "trace_id": hex::encode(&r.trace_id),
                        "span_id": hex::encode(&r.span_id),
                    })
                })
                .collect();
            print(&json!({
                "signal": "logs",
                "resource": resource(rl.resource.as_ref()),
                "records": records,
            }))?;
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
        for rs in req.into_inner().resource_spans {
            let spans: Vec<Value> = rs
                .scope_spans
                .iter()
                .flat_map(|ss| {
                    let scope = ss.scope.as_ref().map(|s| s.name.as_str()).unwrap_or("");
                    ss.spans.iter().map(move |s| (scope, s))
                })
                .map(|(scope, s)| {
                    let kind = match SpanKind::try_from(s.kind) {
                        Ok(SpanKind::Server) => "server",
                        Ok(SpanKind::Client) => "client",
                        Ok(SpanKind::Internal) => "internal",
                        Ok(SpanKind::Producer) => "producer",
                        Ok(SpanKind::Consumer) => "consumer",
                        _ => "unspecified",
                    };
                    let events: Vec<Value> = s
                        .events
                        .iter()
                        .map(|e| {
                            json!({
                                "name": e.name,
                                "time_unix_nano": e.time_unix_nano,
                                "attributes": attributes(&e.attributes),
                            })
                        })
                        .collect();
                    json!({
                        "trace_id": hex::encode(&s.trace_id),
                        "span_id": hex::encode(&s.span_id),
                        "parent_span_id": hex::encode(&s.parent_span_id),
                        "name": s.name,
                        "kind": kind,
                        "scope": scope,
                        "start_time_unix_nano": s.start_time_unix_nano,
                        "end_time_unix_nano": s.end_time_unix_nano,
                        "attributes": attributes(&s.attributes),
                        "events": events,
                    })
                })
                .collect();
            print(&json!({
                "signal": "traces",
                "resource": resource(rs.resource.as_ref()),
                "spans": spans,
            }))?;
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn temporality_name(t: i32) -> &'static str {
    match AggregationTemporality::try_from(t) {
        Ok(AggregationTemporality::Cumulative) => "cumulative",
        Ok(AggregationTemporality::Delta) => "delta",
        _ => "unspecified",
    }
}

fn number_point(p: &NumberDataPoint) -> Value {
    let value = match p.value {
        Some(number_data_point::Value::AsDouble(v)) => json!(v),
        Some(number_data_point::Value::AsInt(v)) => json!(v as f64),
        None => Value::Null,
    };
    json!({
        "attributes": attributes(&p.attributes),
        "start_time_unix_nano": p.start_time_unix_nano,
        "time_unix_nano": p.time_unix_nano,
        "value": value,
    })
}

fn resource(r: Option<&Resource>) -> Value {
    r.map(|r| attributes(&r.attributes))
        .unwrap_or_else(|| Value::Object(Map::new()))
}

fn attributes(kvs: &[KeyValue]) -> Value {
    let m: BTreeMap<&str, Value> = kvs
        .iter()
        .map(|kv| {
            (
                kv.key.as_str(),
                kv.value.as_ref().map(any_value).unwrap_or(Value::Null),
            )
        })
        .collect();
    json!(m)
}

fn any_value(v: &AnyValue) -> Value {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(any_value).collect())
        }
        Some(any_value::Value::KvlistValue(l)) => attributes(&l.values),
        Some(any_value::Value::BytesValue(b)) => json!(hex::encode(b)),
        Some(any_value::Value::StringValueStrindex(i)) => json!({ "strindex": i }),
        None => Value::Null,
    }
}
