//! Origin and load generator in-process on loopback: byte counts, segment
//! contents and W3C trace-context propagation.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use vigil_testbed::http::{self, ResponseHead};
use vigil_testbed::loadgen::{self, LoadConfig};
use vigil_testbed::origin::{self, Origin, OriginConfig, RunningOrigin};
use vigil_testbed::tracecontext::TraceParent;

const SEGMENT_BYTES: usize = 200_000;
const SEGMENTS: u32 = 4;

/// Stops and joins the origin even when an assertion fails, and fails the
/// test if its run failed.
struct CheckedOrigin {
    addr: SocketAddr,
    origin: Option<RunningOrigin>,
}

impl CheckedOrigin {
    fn start() -> CheckedOrigin {
        let origin = Origin::bind(OriginConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            workers: 2,
            segment_bytes: SEGMENT_BYTES,
            segments: SEGMENTS,
            backlog: 64,
            ..OriginConfig::default()
        })
        .expect("bind origin on loopback");
        let origin = origin.spawn();
        CheckedOrigin {
            addr: origin.addr,
            origin: Some(origin),
        }
    }
}

impl Drop for CheckedOrigin {
    fn drop(&mut self) {
        if let Some(origin) = self.origin.take() {
            let result = origin.finish();
            if !thread::panicking() {
                result.expect("origin run failed");
            }
        }
    }
}

/// One GET on a fresh connection; returns the head and body.
fn get(addr: SocketAddr, path: &str, extra_headers: &str) -> (ResponseHead, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\n{extra_headers}Connection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let end = http::find_head_end(&raw).expect("complete head");
    let head = http::parse_response_head(&raw[..end]).expect("valid head");
    (head, raw[end..].to_vec())
}

#[test]
fn loadgen_fetches_playlist_and_segments() {
    let origin = CheckedOrigin::start();
    let cfg = LoadConfig {
        target: origin.addr,
        connections: 3,
        requests_per_connection: 6,
        stream: "itest".into(),
        max_duration: Duration::from_secs(30),
        with_traceparent: true,
        record_seq: false,
        rate: None,
    };
    let s = loadgen::run(&cfg).expect("valid config");
    assert_eq!(s.requests_ok, 18, "{s:?}");
    assert_eq!(s.requests_failed, 0);
    assert_eq!(s.requests_interrupted, 0);
    assert_eq!(s.connections_failed, 0);
    let playlist_len = origin::playlist(SEGMENTS).len() as u64;
    assert_eq!(s.bytes, 3 * (playlist_len + 5 * SEGMENT_BYTES as u64));

    assert_eq!(s.requests.len(), 18);
    assert_eq!(s.requests_unrecorded, 0);
    let mut traces: Vec<&str> = s.requests.iter().map(|r| r.trace_id.as_str()).collect();
    traces.sort_unstable();
    traces.dedup();
    assert_eq!(traces.len(), 18, "every request gets its own trace id");
    for r in &s.requests {
        assert_eq!(r.status, 200);
        assert_eq!(r.trace_id.len(), 32);
        assert!(r.end_unix_ns >= r.start_unix_ns);
        assert_ne!(r.local_port, 0);
    }
    let mut ports: Vec<u16> = s.requests.iter().map(|r| r.local_port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(
        ports.len(),
        3,
        "one keep-alive connection per loadgen connection"
    );
}

/// A paced run sends its rate, not as many as the origin can answer: 50
/// requests/s over 2 connections for 1 s is 25 per connection, due at 0,
/// 40 ms, ... 960 ms. Tolerance: up to 5 late ones cut by the time limit on
/// a busy machine; unpaced, the same run makes thousands.
#[test]
fn a_paced_run_keeps_its_rate() {
    let origin = CheckedOrigin::start();
    let cfg = LoadConfig {
        target: origin.addr,
        connections: 2,
        requests_per_connection: 1_000,
        stream: "paced".into(),
        max_duration: Duration::from_secs(1),
        with_traceparent: false,
        record_seq: false,
        rate: Some(50),
    };
    let s = loadgen::run(&cfg).expect("valid config");
    assert_eq!(s.requests_failed, 0, "{s:?}");
    assert!((45..=50).contains(&s.requests_ok), "{s:?}");
}

#[test]
fn origin_serves_deterministic_segments() {
    let origin = CheckedOrigin::start();
    let (head, body) = get(origin.addr, "/live/itest/seg3.ts", "");
    assert_eq!(head.status, 200);
    assert_eq!(head.headers.get("content-type"), Some("video/mp2t"));
    assert_eq!(body.len(), SEGMENT_BYTES);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, &b)| b == origin::segment_byte(3, i as u64)));

    let (head, body) = get(origin.addr, "/live/itest/index.m3u8", "");
    assert_eq!(
        head.headers.get("content-type"),
        Some("application/vnd.apple.mpegurl")
    );
    assert_eq!(body, origin::playlist(SEGMENTS).as_bytes());

    let (head, _) = get(origin.addr, &format!("/live/itest/seg{SEGMENTS}.ts"), "");
    assert_eq!(head.status, 404);
}

#[test]
fn origin_continues_the_callers_trace() {
    let origin = CheckedOrigin::start();
    let sent = TraceParent::new_random();
    let (head, _) = get(
        origin.addr,
        "/live/itest/index.m3u8",
        &format!("traceparent: {sent}\r\ntracestate: vigil=1,other=x\r\n"),
    );
    let got = TraceParent::parse(head.headers.get("traceparent").expect("traceparent echoed"))
        .expect("valid traceparent");
    assert_eq!(got.trace_id, sent.trace_id, "same trace");
    assert_ne!(got.span_id, sent.span_id, "origin's own span");
    assert_eq!(got.flags, sent.flags);
    assert_eq!(head.headers.get("tracestate"), Some("vigil=1,other=x"));

    // An invalid traceparent is ignored, and tracestate goes with it.
    let (head, _) = get(
        origin.addr,
        "/live/itest/index.m3u8",
        "traceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01\r\ntracestate: a=b\r\n",
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.headers.get("traceparent"), None);
    assert_eq!(head.headers.get("tracestate"), None);
}
