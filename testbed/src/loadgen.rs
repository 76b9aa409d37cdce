//! Closed-loop HLS load generator: each connection is one keep-alive TCP
//! connection that fetches the playlist and then its segments round-robin,
//! one request at a time, like a video player.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use serde::Serialize;

use crate::http::{self, BodyLength, MAX_HEAD_BYTES};
use crate::origin::valid_stream_name;
use crate::tracecontext::TraceParent;

/// At most this many [`RequestRecord`]s are kept per run.
pub const MAX_RECORDS: usize = 100_000;
/// Upper bound on `connections` (one thread each).
pub const MAX_CONNECTIONS: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A single request that takes longer than this counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Playlists larger than this are not parsed (the origin's are ~20 B/entry).
const MAX_PLAYLIST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub connections: usize,
    pub requests_per_connection: usize,
    pub stream: String,
    /// Hard stop for the run; requests still in flight then are abandoned
    /// and counted in `requests_interrupted`.
    pub max_duration: Duration,
    /// Send a fresh random W3C `traceparent` with every request.
    pub with_traceparent: bool,
    /// Record each connection's initial sequence numbers (TCP_REPAIR, needs
    /// CAP_NET_ADMIN), so tests can place retransmitted segments in requests.
    pub record_seq: bool,
    /// Requests per second over all connections, each connection pacing
    /// its share on a fixed schedule (so a late answer is made up for, not
    /// repeated); None: each request as soon as the last one is answered.
    pub rate: Option<u32>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            target: SocketAddr::from(([127, 0, 0, 1], 8080)),
            connections: 4,
            requests_per_connection: 20,
            stream: "demo".to_owned(),
            max_duration: Duration::from_secs(60),
            with_traceparent: true,
            record_seq: false,
            rate: None,
        }
    }
}

/// One request as the client saw it, for correlation with Vigil's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// Hex trace id sent in `traceparent` ("" without trace context).
    pub trace_id: String,
    /// Client port of the connection (with the target, identifies the flow).
    pub local_port: u16,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// HTTP status, or 0 if no response head arrived.
    pub status: u16,
    /// Response body bytes received.
    pub bytes: u64,
    /// Bytes of this request and of its whole response (head and body) on
    /// the wire: the request's share of each direction of the stream.
    pub request_wire_bytes: u64,
    pub response_wire_bytes: u64,
    /// With `record_seq`: sequence numbers of the first data byte this client
    /// sent and received on the connection (0 otherwise).
    pub send_seq0: u32,
    pub recv_seq0: u32,
}

/// Sequence numbers of the next byte to send and to receive on a connected
/// socket, read in TCP repair mode (before any data has flowed, these are
/// each side's ISN + 1). Leaving repair mode sends a window probe; nothing is lost.
pub fn initial_sequences(stream: &TcpStream) -> io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd;
    const TCP_REPAIR: libc::c_int = 19;
    const TCP_REPAIR_QUEUE: libc::c_int = 20;
    const TCP_QUEUE_SEQ: libc::c_int = 21;
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let fd = stream.as_raw_fd();
    let set = |opt: libc::c_int, v: libc::c_int| -> io::Result<()> {
        // SAFETY: a valid socket fd and a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let queue_seq = || -> io::Result<u32> {
        let mut v: u32 = 0;
        let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
        // SAFETY: a valid socket fd and a u32 out-parameter of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_QUEUE_SEQ,
                (&mut v as *mut u32).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    set(TCP_REPAIR, 1)?;
    let read = (|| {
        set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        let send = queue_seq()?;
        set(TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
        let recv = queue_seq()?;
        Ok((send, recv))
    })();
    set(TCP_REPAIR, 0)?;
    read
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoadSummary {
    /// Requests answered with a complete 2xx response.
    pub requests_ok: u64,
    /// Requests answered with another status, or broken by an error or a
    /// per-request timeout (30 s). A failed connect counts one failed request.
    pub requests_failed: u64,
    /// Requests cut off by `max_duration`; neither ok nor failed.
    pub requests_interrupted: u64,
    /// Response body bytes received.
    pub bytes: u64,
    /// Connections that could not be opened or broke with an error.
    pub connections_failed: u64,
    pub elapsed_ms: u64,
    /// Per-request records sorted by start time, at most [`MAX_RECORDS`].
    pub requests: Vec<RequestRecord>,
    /// Requests beyond [`MAX_RECORDS`] that were counted but not recorded.
    pub requests_unrecorded: u64,
}

impl LoadSummary {
    /// Adds another run's counters (records are appended within the bound).
    pub fn absorb(&mut self, other: LoadSummary) {
        self.requests_ok += other.requests_ok;
        self.requests_failed += other.requests_failed;
        self.requests_interrupted += other.requests_interrupted;
        self.bytes += other.bytes;
        self.connections_failed += other.connections_failed;
        self.elapsed_ms += other.elapsed_ms;
        self.requests_unrecorded += other.requests_unrecorded;
        let room = MAX_RECORDS.saturating_sub(self.requests.len());
        let extra = other.requests.len().saturating_sub(room) as u64;
        self.requests.extend(other.requests.into_iter().take(room));
        self.requests_unrecorded += extra;
    }
}

impl LoadConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            bail!(
                "connections must be 1..={MAX_CONNECTIONS}, got {}",
                self.connections
            );
        }
        if !valid_stream_name(&self.stream) {
            bail!(
                "invalid stream name {:?}: use 1-64 of [A-Za-z0-9_-]",
                self.stream
            );
        }
        if self.max_duration.is_zero() {
            bail!("max_duration must be positive");
        }
        if self.rate == Some(0) {
            bail!("rate must be positive (or none, for as fast as answered)");
        }
        Ok(())
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    interrupted: AtomicU64,
    bytes: AtomicU64,
    connections_failed: AtomicU64,
    /// Record slots handed out so far, to bound memory across threads.
    recorded: AtomicUsize,
    unrecorded: AtomicU64,
}

/// Runs one load round and returns what happened. Connection and request
/// errors are counted, not returned; `Err` is only for invalid config.
/// Set by [`finish_early`]: connections send no new request, and runs end.
static FINISH: AtomicBool = AtomicBool::new(false);

/// Ends the runs of this process as if their time were up, except that the
/// requests in flight complete: what a signal asks of `vigil-loadgen`.
pub fn finish_early() {
    FINISH.store(true, Ordering::SeqCst);
}

/// Whether [`finish_early`] was called.
pub fn finishing() -> bool {
    FINISH.load(Ordering::SeqCst)
}

pub fn run(cfg: &LoadConfig) -> anyhow::Result<LoadSummary> {
    cfg.validate()?;
    let started = Instant::now();
    let deadline = started
        .checked_add(cfg.max_duration)
        .ok_or_else(|| anyhow::anyhow!("max_duration {:?} is too large", cfg.max_duration))?;
    let tally = Arc::new(Tally::default());
    let cfg = Arc::new(cfg.clone());
    let mut handles = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        let (conn_cfg, conn_tally) = (Arc::clone(&cfg), Arc::clone(&tally));
        let spawned = thread::Builder::new()
            .name(format!("loadgen-c{i}"))
            .stack_size(256 * 1024)
            .spawn(move || run_connection(&conn_cfg, deadline, &conn_tally));
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                tracing::warn!(error = %e, "cannot spawn connection thread");
                tally.connections_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let mut requests = Vec::new();
    for h in handles {
        match h.join() {
            Ok(records) => requests.extend(records),
            Err(_) => {
                tracing::warn!("connection thread panicked");
                tally.connections_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    requests.sort_by_key(|r| r.start_unix_ns);
    Ok(LoadSummary {
        requests_ok: tally.ok.load(Ordering::Relaxed),
        requests_failed: tally.failed.load(Ordering::Relaxed),
        requests_interrupted: tally.interrupted.load(Ordering::Relaxed),
        bytes: tally.bytes.load(Ordering::Relaxed),
        connections_failed: tally.connections_failed.load(Ordering::Relaxed),
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        requests,
        requests_unrecorded: tally.unrecorded.load(Ordering::Relaxed),
    })
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why an exchange did not complete.
enum ExchangeError {
    /// The run's `max_duration` ran out mid-request.
    Deadline,
    Io(io::Error),
    Protocol(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Deadline => f.write_str("run deadline reached"),
            ExchangeError::Io(e) => write!(f, "{e}"),
            ExchangeError::Protocol(why) => f.write_str(why),
        }
    }
}

impl From<io::Error> for ExchangeError {
    fn from(e: io::Error) -> Self {
        ExchangeError::Io(e)
    }
}

struct Response {
    status: u16,
    /// Bytes of the response head, blank line included.
    head_bytes: u64,
    body_bytes: u64,
    /// Kept only for the playlist, which names the segments.
    body: Option<Vec<u8>>,
    keep_alive: bool,
}

fn run_connection(cfg: &LoadConfig, deadline: Instant, tally: &Tally) -> Vec<RequestRecord> {
    let mut records = Vec::new();
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() || cfg.requests_per_connection == 0 {
        return records;
    }
    let start_ns = unix_ns();
    let mut stream = match TcpStream::connect_timeout(&cfg.target, left.min(CONNECT_TIMEOUT)) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(target = %cfg.target, error = %e, "connect failed");
            let interrupted = Instant::now() >= deadline;
            let counter = if interrupted {
                &tally.interrupted
            } else {
                &tally.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if !interrupted {
                tally.connections_failed.fetch_add(1, Ordering::Relaxed);
            }
            return records;
        }
    };
    let _ = stream.set_nodelay(true);
    let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(0);
    let (send_seq0, recv_seq0) = if cfg.record_seq {
        initial_sequences(&stream).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read initial sequence numbers (needs CAP_NET_ADMIN)");
            (0, 0)
        })
    } else {
        (0, 0)
    };
    let playlist_path = format!("/live/{}/index.m3u8", cfg.stream);
    let mut segments: Vec<String> = Vec::new();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut next_segment = 0usize;
    // This connection's share of the rate: one request per `interval`.
    let interval = cfg
        .rate
        .map(|r| Duration::from_secs_f64(cfg.connections as f64 / f64::from(r)));
    let paced_from = Instant::now();
    for i in 0..cfg.requests_per_connection {
        if let Some(interval) = interval {
            let due = paced_from + interval.mul_f64(i as f64);
            if due >= deadline {
                break;
            }
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        if Instant::now() >= deadline || finishing() {
            break;
        }
        let path = if i == 0 || segments.is_empty() {
            playlist_path.clone()
        } else {
            let s = format!(
                "/live/{}/{}",
                cfg.stream,
                segments[next_segment % segments.len()]
            );
            next_segment += 1;
            s
        };
        let trace = cfg.with_traceparent.then(TraceParent::new_random);
        let start_unix_ns = if i == 0 { start_ns } else { unix_ns() };
        let is_playlist = path == playlist_path;
        let result = exchange(
            &mut stream,
            &mut buf,
            cfg,
            &path,
            trace.as_ref(),
            deadline,
            is_playlist,
        );
        let end_unix_ns = unix_ns();
        let mut record = RequestRecord {
            trace_id: trace.map(|t| t.trace_id_hex()).unwrap_or_default(),
            local_port,
            start_unix_ns,
            end_unix_ns,
            status: 0,
            bytes: 0,
            request_wire_bytes: request_head(&cfg.target, &path, trace.as_ref()).len() as u64,
            response_wire_bytes: 0,
            send_seq0,
            recv_seq0,
        };
        let keep_going = match result {
            Ok(resp) => {
                record.status = resp.status;
                record.bytes = resp.body_bytes;
                record.response_wire_bytes = resp.head_bytes + resp.body_bytes;
                tally.bytes.fetch_add(resp.body_bytes, Ordering::Relaxed);
                if (200..300).contains(&resp.status) {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                }
                if let (Some(body), true) = (resp.body, resp.status == 200) {
                    segments = playlist_entries(&String::from_utf8_lossy(&body));
                }
                resp.keep_alive
            }
            Err(ExchangeError::Deadline) => {
                tally.interrupted.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(e) => {
                tracing::debug!(target = %cfg.target, %path, error = %e, "request failed");
                tally.failed.fetch_add(1, Ordering::Relaxed);
                tally.connections_failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        };
        if tally.recorded.fetch_add(1, Ordering::Relaxed) < MAX_RECORDS {
            records.push(record);
        } else {
            tally.unrecorded.fetch_add(1, Ordering::Relaxed);
        }
        if !keep_going {
            break;
        }
    }
    records
}

/// Segment URIs of an HLS media playlist, in order.
pub fn playlist_entries(playlist: &str) -> Vec<String> {
    playlist
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        // Only relative names: the generator must never leave its target.
        .filter(|l| !l.contains("://") && !l.starts_with('/') && !l.contains(".."))
        .map(str::to_owned)
        .collect()
}

/// The request head the generator sends.
pub fn request_head(host: &SocketAddr, path: &str, trace: Option<&TraceParent>) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vigil-loadgen\r\n");
    if let Some(t) = trace {
        req.push_str(&format!("traceparent: {t}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Sends one request and reads its whole response. `buf` carries bytes read
/// past a response into the next one.
fn exchange(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    cfg: &LoadConfig,
    path: &str,
    trace: Option<&TraceParent>,
    deadline: Instant,
    keep_body: bool,
) -> Result<Response, ExchangeError> {
    let request_deadline = deadline.min(Instant::now() + REQUEST_TIMEOUT);
    let timed_out = || {
        if Instant::now() >= deadline {
            ExchangeError::Deadline
        } else {
            ExchangeError::Protocol(format!("no complete response within {REQUEST_TIMEOUT:?}"))
        }
    };
    set_timeouts(stream, request_deadline).map_err(|_| timed_out())?;
    match stream.write_all(request_head(&cfg.target, path, trace).as_bytes()) {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Err(timed_out()),
        Err(e) => return Err(e.into()),
    }

    let mut scratch = vec![0u8; 64 * 1024];
    let head_end = loop {
        if let Some(end) = http::find_head_end(buf) {
            break end;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(ExchangeError::Protocol("response head too large".into()));
        }
        let n = read_some(stream, &mut scratch, request_deadline).map_err(|e| match e {
            None => timed_out(),
            Some(e) => e.into(),
        })?;
        if n == 0 {
            return Err(ExchangeError::Protocol(
                "connection closed before response".into(),
            ));
        }
        buf.extend_from_slice(&scratch[..n]);
    };
    let head = http::parse_response_head(&buf[..head_end])
        .map_err(|e| ExchangeError::Protocol(e.to_string()))?;
    buf.drain(..head_end);
    let length = head
        .body_length()
        .map_err(|e| ExchangeError::Protocol(e.to_string()))?;

    let mut body = keep_body.then(Vec::new);
    let mut received: u64 = 0;
    let mut keep = |chunk: &[u8], received: &mut u64| {
        *received += chunk.len() as u64;
        if let Some(b) = body.as_mut() {
            if b.len() + chunk.len() <= MAX_PLAYLIST_BYTES {
                b.extend_from_slice(chunk);
            }
        }
    };
    let want = match length {
        BodyLength::Exactly(n) => Some(n),
        BodyLength::UntilClose => None,
    };
    // Body bytes that arrived together with the head.
    let take = want.map_or(buf.len(), |n| {
        buf.len().min(usize::try_from(n).unwrap_or(usize::MAX))
    });
    keep(&buf[..take], &mut received);
    buf.drain(..take);
    while want.is_none_or(|n| received < n) {
        let n = read_some(stream, &mut scratch, request_deadline).map_err(|e| match e {
            None => timed_out(),
            Some(e) => e.into(),
        })?;
        if n == 0 {
            if want.is_none() {
                break;
            }
            return Err(ExchangeError::Protocol(format!(
                "connection closed after {received} of {} body bytes",
                want.unwrap_or(0)
            )));
        }
        let n_body = want.map_or(n, |w| {
            n.min(usize::try_from(w - received).unwrap_or(usize::MAX))
        });
        keep(&scratch[..n_body], &mut received);
        // Anything past the body belongs to a (unexpected) next response.
        buf.extend_from_slice(&scratch[n_body..n]);
    }
    Ok(Response {
        status: head.status,
        head_bytes: head_end as u64,
        body_bytes: received,
        body,
        keep_alive: head.keep_alive() && want.is_some(),
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn set_timeouts(stream: &TcpStream, until: Instant) -> io::Result<()> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

/// One read bounded by `until`; `Err(None)` means the time ran out.
fn read_some(
    stream: &mut TcpStream,
    scratch: &mut [u8],
    until: Instant,
) -> Result<usize, Option<io::Error>> {
    loop {
        set_timeouts(stream, until).map_err(|_| None)?;
        match stream.read(scratch) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(None),
            Err(e) => return Err(Some(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_playlist_entries() {
        let p = "#EXTM3U\n#EXT-X-VERSION:3\n#EXTINF:4.0,\nseg0.ts\n\n#EXTINF:4.0,\r\nseg1.ts\r\n\
                 http://elsewhere/x.ts\n/abs.ts\n../up.ts\n#EXT-X-ENDLIST\n";
        assert_eq!(playlist_entries(p), ["seg0.ts", "seg1.ts"]);
        assert!(playlist_entries(&crate::origin::playlist(0)).is_empty());
        assert_eq!(playlist_entries(&crate::origin::playlist(10)).len(), 10);
    }

    #[test]
    fn request_head_is_parseable() {
        let tp = TraceParent::new_random();
        let target: SocketAddr = "[2001:2::1]:8080".parse().expect("addr");
        let head = request_head(&target, "/live/demo/seg1.ts", Some(&tp));
        let parsed = http::parse_request_head(head.as_bytes()).expect("valid");
        assert_eq!(parsed.target, "/live/demo/seg1.ts");
        assert_eq!(parsed.headers.get("host"), Some("[2001:2::1]:8080"));
        assert_eq!(
            parsed.headers.get("traceparent"),
            Some(tp.to_string().as_str())
        );
        assert!(parsed.keep_alive());
    }

    #[test]
    fn rejects_bad_config() {
        for cfg in [
            LoadConfig {
                connections: 0,
                ..LoadConfig::default()
            },
            LoadConfig {
                stream: "a/b".into(),
                ..LoadConfig::default()
            },
            LoadConfig {
                max_duration: Duration::ZERO,
                ..LoadConfig::default()
            },
            LoadConfig {
                rate: Some(0),
                ..LoadConfig::default()
            },
        ] {
            assert!(run(&cfg).is_err());
        }
    }

    #[test]
    fn absorb_bounds_records() {
        let rec = RequestRecord {
            trace_id: String::new(),
            local_port: 1,
            start_unix_ns: 0,
            end_unix_ns: 0,
            status: 200,
            bytes: 0,
            request_wire_bytes: 0,
            response_wire_bytes: 0,
            send_seq0: 0,
            recv_seq0: 0,
        };
        let mut total = LoadSummary {
            requests: vec![rec.clone(); MAX_RECORDS - 1],
            ..LoadSummary::default()
        };
        total.absorb(LoadSummary {
            requests_ok: 3,
            requests: vec![rec; 3],
            requests_unrecorded: 5,
            ..LoadSummary::default()
        });
        assert_eq!(total.requests.len(), MAX_RECORDS);
        assert_eq!(total.requests_unrecorded, 7);
        assert_eq!(total.requests_ok, 3);
    }

    #[test]
    fn unreachable_target_counts_failures() {
        // Port 1 on loopback: nothing listens, connect is refused at once.
        let cfg = LoadConfig {
            target: SocketAddr::from(([127, 0, 0, 1], 1)),
            connections: 2,
            requests_per_connection: 3,
            max_duration: Duration::from_secs(5),
            ..LoadConfig::default()
        };
        let s = run(&cfg).expect("valid config");
        assert_eq!(s.requests_ok, 0);
        assert_eq!(s.requests_failed, 2);
        assert_eq!(s.connections_failed, 2);
    }
}
