//! The agent's HTTP server (hyper, HTTP/1.1 with keep-alive) on its two
//! listeners: the metrics port (TCP, anyone who reaches it) and the query
//! socket (Unix, mode 0600: root on the node). What each path answers is
//! `export::prometheus::route`.
//!
//! Bounded so that clients cannot starve the scrape: a request head of at
//! most 8 KiB, read within 5 s (idle keep-alive connections included); at
//! most `MAX_PER_PEER` connections per client address and `MAX_CONNECTIONS`
//! in all, beyond which a new connection is closed at once: a flood of idle
//! clients from one pod holds 16 slots, and Prometheus, from its own
//! address, still gets in. Bodies are gzip-compressed for clients that
//! accept it.

use std::{
    collections::HashMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::prometheus::{route, Audience, Format, MetricsSource};

const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's smallest read buffer: a head that does not fit gets 431.
const MAX_HEAD_BYTES: usize = 8 * 1024;
pub const MAX_CONNECTIONS: usize = 256;
pub const MAX_PER_PEER: usize = 16;
/// Bodies shorter than this are sent as they are.
const GZIP_MIN_BYTES: usize = 1024;
/// Keep-alive or not, a connection is closed after this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

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

/// Open connections, in all and per client address.
#[derive(Default)]
struct Slots {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// A connection's slot, given back when it closes.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    peer: Option<IpAddr>,
}

impl Slot {
    fn take(slots: &Arc<Mutex<Slots>>, peer: Option<IpAddr>) -> Option<Slot> {
        let mut s = slots.lock().ok()?;
        let mine = peer.map_or(0, |p| s.per_peer.get(&p).copied().unwrap_or(0));
        if s.total >= MAX_CONNECTIONS || mine >= MAX_PER_PEER {
            return None;
        }
        s.total += 1;
        if let Some(p) = peer {
            *s.per_peer.entry(p).or_default() += 1;
        }
        Some(Slot {
            slots: slots.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(p) = self.peer {
                if let Some(n) = s.per_peer.get_mut(&p) {
                    *n -= 1;
                    if *n == 0 {
                        s.per_peer.remove(&p);
                    }
                }
            }
        }
    }
}

fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body).ok()?;
    enc.finish().ok()
}

/// Whether a comma-separated `header` lists `wanted` without `q=0`.
fn lists<B>(req: &Request<B>, header: header::HeaderName, wanted: &str) -> bool {
    req.headers()
        .get_all(header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or_default().trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
                    == Some(0.0)
            });
            name.eq_ignore_ascii_case(wanted) && !refused
        })
}

fn accepts_gzip<B>(req: &Request<B>) -> bool {
    lists(req, header::ACCEPT_ENCODING, "gzip")
}

/// OpenMetrics when the scraper lists it (Prometheus does first, for
/// exemplars); else the 0.0.4 text format.
fn format_for<B>(req: &Request<B>) -> Format {
    if lists(req, header::ACCEPT, "application/openmetrics-text") {
        Format::OpenMetrics
    } else {
        Format::PrometheusText
    }
}

async fn answer(
    req: Request<Incoming>,
    source: MetricsSource,
    audience: Audience,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let head_only = req.method() == Method::HEAD;
    let mut builder = Response::builder().header(header::VARY, "accept-encoding");
    let (status, content_type, body) = if req.method() == Method::GET || head_only {
        let r = route(&source, req.uri().path(), audience, format_for(&req)).await;
        (r.status, r.content_type, r.body.into_bytes())
    } else {
        builder = builder.header(header::ALLOW, "GET, HEAD");
        (405, "text/plain", b"only GET and HEAD\n".to_vec())
    };
    let body = match (body.len() >= GZIP_MIN_BYTES && accepts_gzip(&req))
        .then(|| gzip(&body))
        .flatten()
    {
        Some(zipped) => {
            builder = builder.header(header::CONTENT_ENCODING, "gzip");
            zipped
        }
        None => body,
    };
    let len = body.len();
    let body = if head_only { Vec::new() } else { body };
    let response = builder
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, len)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"internal error\n"))));
    Ok(response)
}

fn spawn_connection<S>(stream: S, slot: Slot, source: MetricsSource, audience: Audience)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let _slot = slot;
        let service = hyper::service::service_fn(move |req| answer(req, source.clone(), audience));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(TokioIo::new(stream), service);
        match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
            Ok(Err(e)) => debug!(error = %e, "HTTP connection ended with an error"),
            Err(_) => debug!("HTTP connection closed after its lifetime"),
            Ok(Ok(())) => {}
        }
    });
}

/// Serves the metrics port until `stop`.
pub async fn serve_metrics(listener: TcpListener, source: MetricsSource, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving Prometheus metrics at /metrics and health at /healthz");
    }
    let slots = Arc::new(Mutex::new(Slots::default()));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match Slot::take(&slots, Some(peer.ip())) {
                    Some(slot) => spawn_connection(stream, slot, source.clone(), Audience::Anyone),
                    None => debug!(%peer, "HTTP connection refused: too many open"),
                },
                Err(e) => debug!(error = %e, "accept failed"),
            },
        }
    }
}

/// Binds the query socket: mode 0600 in a directory of mode 0700.
pub fn bind_queries(path: &Path) -> std::io::Result<UnixListener> {
    crate::unix_socket::bind(path, 0o600, 0o700).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot serve the query socket {}: {e} (choose another path with --query-socket or agent.query_socket)",
                path.display()
            ),
        )
    })
}

/// Serves the query socket until `stop`, then removes it.
pub async fn serve_queries(
    listener: UnixListener,
    path: PathBuf,
    source: MetricsSource,
    stop: CancellationToken,
) {
    info!(socket = %path.display(), "serving queries (vigil sockets, explain, status) on the query socket");
    let slots = Arc::new(Mutex::new(Slots::default()));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match Slot::take(&slots, None) {
                    Some(slot) => spawn_connection(stream, slot, source.clone(), Audience::Operator),
                    None => debug!("query connection refused: too many open"),
                },
                Err(e) => debug!(error = %e, "accept failed"),
            },
        }
    }
    crate::unix_socket::remove(&path, "query");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_bound_each_peer_and_the_total() {
        let slots = Arc::new(Mutex::new(Slots::default()));
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let mut held: Vec<Slot> = (0..MAX_PER_PEER)
            .map(|_| Slot::take(&slots, Some(a)).expect("within the peer's share"))
            .collect();
        assert!(
            Slot::take(&slots, Some(a)).is_none(),
            "the peer is at its bound"
        );
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(
            Slot::take(&slots, Some(b)).is_some(),
            "another peer gets in"
        );
        held.pop();
        assert!(
            Slot::take(&slots, Some(a)).is_some(),
            "a closed one frees a slot"
        );
        drop(held);
        let all: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| Slot::take(&slots, None).expect("within the total"))
            .collect();
        assert!(
            Slot::take(&slots, Some(b)).is_none(),
            "the total is bounded"
        );
        drop(all);
        let s = slots.lock().expect("lock");
        assert_eq!((s.total, s.per_peer.len()), (0, 0), "every slot came back");
    }

    #[test]
    fn open_metrics_when_listed() {
        let req = |v: &str| {
            Request::builder()
                .header(header::ACCEPT, v)
                .body(())
                .expect("request")
        };
        // What Prometheus sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(format_for(&req(prometheus)), Format::OpenMetrics);
        assert_eq!(format_for(&req("text/plain")), Format::PrometheusText);
        assert_eq!(
            format_for(&req("application/openmetrics-text;q=0")),
            Format::PrometheusText
        );
        let none = Request::builder().body(()).expect("request");
        assert_eq!(format_for(&none), Format::PrometheusText);
    }

    #[test]
    fn gzip_only_when_accepted() {
        let req = |v: &str| {
            Request::builder()
                .header(header::ACCEPT_ENCODING, v)
                .body(())
                .expect("request")
        };
        assert!(accepts_gzip(&req("gzip")));
        assert!(!accepts_gzip(&req("gzip; q=0.0")));
        assert!(accepts_gzip(&req("deflate, GZIP;q=0.5")));
        assert!(!accepts_gzip(&req("gzip;q=0")));
        assert!(!accepts_gzip(&req("identity")));
        let text = "vigil_tcp_retransmitted_segments_total 1\n".repeat(100);
        let zipped = gzip(text.as_bytes()).expect("gzip");
        let mut back = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut back)
            .expect("gunzip");
        assert_eq!(back, text);
    }
}
