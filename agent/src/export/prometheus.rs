//! What the agent answers over HTTP (served by `export::http`): /metrics
//! (Prometheus) and /healthz to anyone on the metrics port; on the query
//! socket also /v1/sockets, /v1/traces/ID and /v1/actuation, which list the
//! node's connections, traces and workloads.

use std::sync::Arc;

use crate::{
    correlate::{traceparent::TraceContext, traces::TraceRecordOut},
    socket_health::{ConnectionRow, ListenerRow},
    telemetry::Telemetry,
    view::{TraceQueries, ViewReceiver},
};

/// What the endpoint serves from: the state owner's latest view, the live
/// telemetry, and the owner's answers about one trace. No lock the event
/// path takes.
#[derive(Clone)]
pub struct MetricsSource {
    pub view: ViewReceiver,
    pub telemetry: Arc<Telemetry>,
    pub trace_queries: TraceQueries,
    pub actuation: Arc<crate::act::ActState>,
}

/// GET /v1/actuation: acting's groups and latest decisions (`vigil status`).
pub const ACTUATION_PATH: &str = "/v1/actuation";

/// GET /v1/traces/{trace_id}: what `vigil explain` shows.
pub const TRACES_PATH: &str = "/v1/traces/";

/// What the kernel saw for one trace, with the current sample of its
/// connections and of the listeners that accepted them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Explanation {
    pub trace: TraceRecordOut,
    /// Connections of the trace still open at the latest socket sample.
    pub connections: Vec<ConnectionRow>,
    /// Listeners on the local ports of the trace's server-side connections.
    pub listeners: Vec<ListenerRow>,
}

async fn explanation(source: &MetricsSource, id: &str) -> Result<String, (u16, String)> {
    let trace_id = TraceContext::parse_trace_id(id)
        .map_err(|e| (400, format!("not a trace id ({e}): {id:?}\n")))?;
    let trace = source
        .trace_queries
        .ask(trace_id)
        .await
        .map_err(|_| {
            (503, "the agent is shutting down\n".to_owned())
        })?
        .ok_or((
            404,
            format!(
                "no kernel record of trace {}: no HTTP/1.1 message carried it on this node, or it was evicted\n",
                hex::encode(trace_id)
            ),
        ))?;
    let table = source.view.borrow().sockets.clone();
    let connections = table
        .connections
        .iter()
        .filter(|c| trace.connections.iter().any(|t| t.cookie == c.cookie))
        .cloned()
        .collect();
    let listeners = table
        .listeners
        .iter()
        .filter(|l| {
            trace.connections.iter().any(|t| {
                t.role == "server" && t.netns == l.netns && t.local.port() == l.local.port()
            })
        })
        .cloned()
        .collect();
    serde_json::to_string(&Explanation {
        trace,
        connections,
        listeners,
    })
    .map_err(|e| (500, format!("{e}\n")))
}

/// Who asked: the metrics port answers anyone who can reach it (Prometheus,
/// probes, any pod); the query socket only root on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Anyone,
    Operator,
}

/// An answer: status, content type, body.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

fn reply(status: u16, content_type: &'static str, body: impl Into<String>) -> Reply {
    Reply {
        status,
        content_type,
        body: body.into(),
    }
}

fn json(body: Result<String, serde_json::Error>) -> Reply {
    match body {
        Ok(body) => reply(200, "application/json", body),
        Err(e) => reply(
            500,
            "text/plain",
            format!("cannot serialise the response: {e}\n"),
        ),
    }
}

/// How /metrics is written: what the scraper's Accept header prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    PrometheusText,
    OpenMetrics,
}

/// The answer to a GET of `path`.
pub async fn route(
    source: &MetricsSource,
    path: &str,
    audience: Audience,
    format: Format,
) -> Reply {
    let operator = audience == Audience::Operator;
    match path {
        "/metrics" => {
            let view = source.view.borrow().clone();
            match format {
                Format::PrometheusText => reply(200, PROMETHEUS_TEXT, source.telemetry.render(&view)),
                Format::OpenMetrics => reply(
                    200,
                    OPEN_METRICS_TEXT,
                    source.telemetry.render_open_metrics(&view),
                ),
            }
        }
        crate::health::HEALTH_PATH => {
            let health = source.telemetry.health_report();
            match serde_json::to_string(&health) {
                // 503 while degraded: a readiness probe shows it.
                Ok(body) => reply(
                    if health.is_degraded() { 503 } else { 200 },
                    "application/json",
                    body,
                ),
                Err(e) => json(Err(e)),
            }
        }
        "/v1/sockets" if operator => {
            let sockets = source.view.borrow().sockets.clone();
            json(serde_json::to_string(&*sockets))
        }
        ACTUATION_PATH if operator => json(serde_json::to_string(&source.actuation.view())),
        p if operator && p.starts_with(TRACES_PATH) => {
            match explanation(source, &p[TRACES_PATH.len()..]).await {
                Ok(body) => reply(200, "application/json", body),
                Err((status, why)) => reply(status, "text/plain", why),
            }
        }
        p if p.starts_with("/v1/") => reply(
            404,
            "text/plain",
            "not served on the metrics port: it lists the node's connections; ask the agent's query socket (agent.query_socket) on the node, e.g. `vigil sockets`\n",
        ),
        "/" if operator => reply(
            200,
            "text/plain",
            "Vigil agent. Metrics: /metrics; signals delivered: /healthz; acting: /v1/actuation; latest socket sample: /v1/sockets; one trace: /v1/traces/TRACE_ID\n",
        ),
        "/" => reply(
            200,
            "text/plain",
            "Vigil agent. Metrics: /metrics; signals delivered: /healthz (the rest is on the agent's query socket)\n",
        ),
        _ => reply(404, "text/plain", "not found; try /metrics\n"),
    }
}

/// The Prometheus text format, version 0.0.4.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// OpenMetrics 1.0 (exemplars: the trace of the latest traced retransmit).
pub const OPEN_METRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
