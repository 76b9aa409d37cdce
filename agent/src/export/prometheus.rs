//! The agent's HTTP endpoint: GET /metrics (Prometheus) and GET /v1/sockets
//! (the latest socket sample as JSON, for `vigil sockets`), plain HTTP/1.1.
//!
//! Hand-rolled on purpose: one route, bounded request size and time, no
//! keep-alive; a full HTTP stack would be most of the agent's dependencies.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{
    correlate::{traceparent::TraceContext, traces::TraceRecordOut},
    socket_health::{ConnectionRow, ListenerRow},
    telemetry::Telemetry,
    view::{TraceQueries, ViewReceiver},
};

const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source} (choose another address with --metrics-addr or agent.metrics_addr)")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

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

pub async fn serve(listener: TcpListener, source: MetricsSource, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving Prometheus metrics at /metrics");
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let source = source.clone();
                    tokio::spawn(async move {
                        if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, handle(stream, &source)).await.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
                            debug!(error = %e, "metrics request failed");
                        }
                    });
                }
                Err(e) => debug!(error = %e, "accept failed"),
            },
        }
    }
}

/// Parses the request line; returns the path of a GET.
pub fn request_path(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("GET"), Some(path), Some(v)) if v.starts_with("HTTP/1.") => Some(path),
        _ => None,
    }
}

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

async fn explanation(source: &MetricsSource, id: &str) -> Result<String, (&'static str, String)> {
    let trace_id = TraceContext::parse_trace_id(id)
        .map_err(|e| ("400 Bad Request", format!("not a trace id ({e}): {id:?}\n")))?;
    let trace = source
        .trace_queries
        .ask(trace_id)
        .await
        .map_err(|_| {
            (
                "503 Service Unavailable",
                "the agent is shutting down\n".to_owned(),
            )
        })?
        .ok_or((
            "404 Not Found",
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
    .map_err(|e| ("500 Internal Server Error", format!("{e}\n")))
}

async fn handle(mut stream: TcpStream, source: &MetricsSource) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD_BYTES {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await;
        }
    }
    match request_path(&head) {
        Some("/metrics") => {
            let view = source.view.borrow().clone();
            let body = Some(source.telemetry.render(&view));
            respond_with(
                &mut stream,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            )
            .await
        }
        Some("/v1/sockets") => {
            let sockets = source.view.borrow().sockets.clone();
            let body = serde_json::to_string(&*sockets).ok();
            respond_with(&mut stream, "application/json", body).await
        }
        Some(path) if path.starts_with(TRACES_PATH) => {
            let body = explanation(source, &path[TRACES_PATH.len()..]).await;
            match body {
                Ok(body) => respond(&mut stream, "200 OK", "application/json", &body).await,
                Err((status, why)) => respond(&mut stream, status, "text/plain", &why).await,
            }
        }
        Some(ACTUATION_PATH) => {
            let body = serde_json::to_string(&source.actuation.view()).ok();
            respond_with(&mut stream, "application/json", body).await
        }
        Some(crate::health::HEALTH_PATH) => {
            let health = source.telemetry.health_report();
            match serde_json::to_string(&health).ok().map(|body| (health, body)) {
                Some((h, body)) => {
                    // 503 while degraded: a readiness probe shows it.
                    let status = if h.is_degraded() {
                        "503 Service Unavailable"
                    } else {
                        "200 OK"
                    };
                    respond(&mut stream, status, "application/json", &body).await
                }
                None => respond_with(&mut stream, "application/json", None).await,
            }
        }
        Some("/") => {
            respond(
                &mut stream,
                "200 OK",
                "text/plain",
                "Vigil agent. Metrics: /metrics; signals delivered: /healthz; acting: /v1/actuation; latest socket sample: /v1/sockets; one trace: /v1/traces/TRACE_ID\n",
            )
            .await
        }
        Some(_) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "not found; try /metrics\n",
            )
            .await
        }
        None => {
            respond(
                &mut stream,
                "400 Bad Request",
                "text/plain",
                "bad request\n",
            )
            .await
        }
    }
}

/// 200 with `body`, or 500 when it could not be serialised.
async fn respond_with(
    stream: &mut TcpStream,
    content_type: &str,
    body: Option<String>,
) -> std::io::Result<()> {
    match body {
        Some(body) => respond(stream, "200 OK", content_type, &body).await,
        None => {
            respond(
                stream,
                "500 Internal Server Error",
                "text/plain",
                "cannot serialise the response\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_line() {
        assert_eq!(
            request_path(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(request_path(b"POST /metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_path(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_path(b"\xff\xfe\r\n\r\n"), None);
    }
}
