//! A small HTTP/1.1 HLS origin: one playlist and `segments` fixed-size
//! segments per stream name, served from deterministic bytes.
//!
//! Each worker owns its own `SO_REUSEPORT` listener on its own OS thread, so the
//! kernel spreads connections over per-worker accept queues exactly as in a real
//! multi-worker origin (nginx `reuseport`). That is what lets tests stall or
//! overflow one worker's queue. Connections are served by blocking threads.
//!
//! While running, an [`OriginHandle`] changes the number of workers, the
//! concurrency limit and the backlog of new listeners, and takes each control
//! period's load ([`OriginHandle::take_period`]): what the control API needs.
//! With an upstream, `/upstream/{stream}/segN.ts` is fetched from another
//! origin's `/live/...` through a keep-alive [`Pool`].

use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use socket2::{Domain, Protocol, Socket, Type};

use crate::http::{self, HttpError, RequestHead, MAX_HEAD_BYTES};
use crate::pool::{Pool, PoolConfig};
use crate::samples::Samples;
use crate::tracecontext::TraceParent;

/// How often blocked accept()/read() calls wake to look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// A connection with no request bytes for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on concurrently served connections (threads) per worker;
/// beyond it the worker stops accepting until a connection ends.
pub const MAX_CONNECTIONS_PER_WORKER: usize = 512;
/// Longest artificial service time a request may be given.
const MAX_SERVICE: Duration = Duration::from_secs(10);
/// Request bodies (pointless on GET, but legal) larger than this get a 413.
const MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// Segments repeat every 251 bytes (a prime, so no alignment with MSS or pages).
const PATTERN_PERIOD: usize = 251;
/// Largest multiple of the period under 64 KiB: one write of segment bytes.
const SEGMENT_CHUNK: usize = PATTERN_PERIOD * 256;
/// Hard limits that keep a typo in a flag from allocating or spawning wildly.
pub const MAX_WORKERS: usize = 256;
const MAX_SEGMENTS: u32 = 1_000_000;

/// Byte `index` of segment `segment`: what a client should receive.
pub fn segment_byte(segment: u32, index: u64) -> u8 {
    ((index + u64::from(segment) * 7) % PATTERN_PERIOD as u64) as u8
}

/// HLS media playlist (RFC 8216) listing `seg0.ts` .. `seg{segments-1}.ts`.
pub fn playlist(segments: u32) -> String {
    let mut p = String::from(
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:4\n#EXT-X-MEDIA-SEQUENCE:0\n",
    );
    for n in 0..segments {
        p.push_str(&format!("#EXTINF:4.0,\nseg{n}.ts\n"));
    }
    p.push_str("#EXT-X-ENDLIST\n");
    p
}

/// The port the origin listens on unless told otherwise (tests, demo, bench).
pub const DEFAULT_PORT: u16 = 8080;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginConfig {
    pub listen: SocketAddr,
    /// Number of SO_REUSEPORT listeners, each with its own accept thread.
    pub workers: usize,
    pub segment_bytes: usize,
    pub segments: u32,
    /// listen(2) backlog of each worker's accept queue.
    pub backlog: i32,
    /// Connections a worker serves at once (its slots); with `service`, the
    /// worker's capacity is `slots / service` connections per second.
    pub slots_per_worker: usize,
    /// Time each request takes before its response (work the origin does,
    /// e.g. a packager or storage fetch); zero: answer at once.
    pub service: Duration,
    /// Another origin `/upstream/...` requests are relayed to, and its pool.
    pub upstream: Option<SocketAddr>,
    pub pool: PoolConfig,
    /// Requests in flight at most; beyond it a request gets 503 at once. 0: none.
    pub concurrency_limit: u32,
}

impl Default for OriginConfig {
    fn default() -> Self {
        OriginConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            workers: 2,
            segment_bytes: 1024 * 1024,
            segments: 10,
            backlog: 1024,
            slots_per_worker: MAX_CONNECTIONS_PER_WORKER,
            service: Duration::ZERO,
            upstream: None,
            pool: PoolConfig::default(),
            concurrency_limit: 0,
        }
    }
}

impl OriginConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.workers == 0 || self.workers > MAX_WORKERS {
            bail!("workers must be 1..={MAX_WORKERS}, got {}", self.workers);
        }
        if self.segments > MAX_SEGMENTS {
            bail!(
                "segments must be at most {MAX_SEGMENTS}, got {}",
                self.segments
            );
        }
        if self.backlog < 0 {
            bail!("backlog must not be negative, got {}", self.backlog);
        }
        if self.slots_per_worker == 0 || self.slots_per_worker > MAX_CONNECTIONS_PER_WORKER {
            bail!(
                "slots per worker must be 1..={MAX_CONNECTIONS_PER_WORKER}, got {}",
                self.slots_per_worker
            );
        }
        if self.service > MAX_SERVICE {
            bail!(
                "service time must be at most {} ms, got {} ms",
                MAX_SERVICE.as_millis(),
                self.service.as_millis()
            );
        }
        Ok(())
    }
}

/// What a request target resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Playlist {
        stream: &'a str,
    },
    Segment {
        stream: &'a str,
        index: u32,
    },
    /// A segment of the upstream origin; it bounds the index, not us.
    Upstream {
        stream: &'a str,
        index: u32,
    },
    NotFound,
}

/// Maps a request path to a resource; `segments` bounds valid segment indices.
pub fn route(path: &str, segments: u32) -> Route<'_> {
    let (upstream, rest) = match (path.strip_prefix("/live/"), path.strip_prefix("/upstream/")) {
        (Some(rest), _) => (false, rest),
        (None, Some(rest)) => (true, rest),
        (None, None) => return Route::NotFound,
    };
    let Some((stream, file)) = rest.split_once('/') else {
        return Route::NotFound;
    };
    if !valid_stream_name(stream) {
        return Route::NotFound;
    }
    if file == "index.m3u8" && !upstream {
        return Route::Playlist { stream };
    }
    let index = file
        .strip_prefix("seg")
        .and_then(|f| f.strip_suffix(".ts"))
        // Digits only: "+1" or "01" would alias another segment's URL.
        .filter(|d| d.bytes().all(|c| c.is_ascii_digit()) && (d == &"0" || !d.starts_with('0')))
        .and_then(|d| d.parse::<u32>().ok());
    match index {
        Some(index) if upstream => Route::Upstream { stream, index },
        Some(index) if index < segments => Route::Segment { stream, index },
        _ => Route::NotFound,
    }
}

/// Stream names are what the load generator and dashboards use as labels.
pub fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Listeners bound and ready; [`Origin::run`] serves them.
pub struct Origin {
    shared: Arc<Shared>,
}

impl Origin {
    /// Binds one SO_REUSEPORT listener per worker. With port 0 the first
    /// listener picks the port and the others join it.
    pub fn bind(cfg: OriginConfig) -> anyhow::Result<Origin> {
        cfg.validate()?;
        let mut listeners = Vec::with_capacity(cfg.workers);
        let mut addr = cfg.listen;
        for worker in 0..cfg.workers {
            let listener = bind_listener(addr, cfg.backlog)
                .with_context(|| format!("binding worker {worker} listener on {addr}"))?;
            if worker == 0 {
                addr = listener.local_addr().context("reading bound address")?;
            }
            listeners.push(listener);
        }
        Ok(Origin {
            shared: Arc::new(Shared::new(cfg, addr, listeners)),
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Changes and measures the origin while it runs (also before).
    pub fn handle(&self) -> OriginHandle {
        OriginHandle(Arc::clone(&self.shared))
    }

    /// Serves until `stop` is set, then waits up to 2 s for open connections.
    pub fn run(self, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let shared = self.shared;
        let started = {
            let mut workers = shared.lock_workers();
            let Workers::Bound(listeners) = std::mem::replace(&mut *workers, Workers::Stopped)
            else {
                bail!("origin already ran");
            };
            let mut running = Vec::with_capacity(listeners.len());
            let mut spawned = Ok(());
            for listener in listeners {
                match spawn_worker(listener, &shared) {
                    Ok(w) => running.push(w),
                    Err(e) => {
                        spawned = Err(e);
                        break;
                    }
                }
            }
            *workers = Workers::Running(running);
            spawned
        };
        if started.is_ok() {
            while !stop.load(Ordering::SeqCst) {
                thread::sleep(STOP_POLL);
            }
        }
        shared.stop.store(true, Ordering::SeqCst);
        let workers = std::mem::replace(&mut *shared.lock_workers(), Workers::Stopped);
        let mut panicked = 0;
        if let Workers::Running(workers) = workers {
            for w in workers {
                if w.thread.join().is_err() {
                    panicked += 1;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while shared.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        started?;
        if panicked > 0 {
            bail!("{panicked} origin worker thread(s) panicked");
        }
        Ok(())
    }
}

/// Binds and serves until `stop` is set (checked every 100 ms).
pub fn serve(cfg: OriginConfig, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    Origin::bind(cfg)?.run(stop)
}

/// One period of the origin's own load, as the control API reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OriginPeriod {
    /// Requests in flight when the period was taken.
    pub in_flight: u32,
    /// Requests answered in the period (those shed with 503 excluded) and
    /// their latency, from a complete request head to the response written.
    pub requests: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Requests answered 503 over the concurrency limit.
    pub shed: u64,
}

/// An origin serving on a thread of its own (in-process tests): stopped and
/// joined when dropped, or by `finish`, which also says whether it ran well.
pub struct RunningOrigin {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Origin {
    /// Runs the origin on a new thread.
    pub fn spawn(self) -> RunningOrigin {
        let addr = self.local_addr();
        let stop = Arc::new(AtomicBool::new(false));
        let run_stop = Arc::clone(&stop);
        let thread = Some(thread::spawn(move || self.run(run_stop)));
        RunningOrigin { addr, stop, thread }
    }
}

impl RunningOrigin {
    /// Stops it; the result of its run.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the origin thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningOrigin {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// The running origin's settings and load (cheap to clone).
#[derive(Clone)]
pub struct OriginHandle(Arc<Shared>);

impl OriginHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr
    }

    /// SO_REUSEPORT listeners (workers) now.
    pub fn listeners(&self) -> usize {
        match &*self.0.lock_workers() {
            Workers::Bound(l) => l.len(),
            Workers::Running(w) => w.len(),
            Workers::Stopped => 0,
        }
    }

    /// Adds workers (each binds the same address and joins the SO_REUSEPORT
    /// group) or removes the newest ones (each stops accepting, serves what
    /// its queue held and closes its listener; accepted connections go on).
    pub fn set_listeners(&self, n: usize) -> anyhow::Result<()> {
        if n == 0 || n > MAX_WORKERS {
            bail!("listeners must be 1..={MAX_WORKERS}, got {n}");
        }
        let shared = &self.0;
        let mut removed = Vec::new();
        {
            let mut workers = shared.lock_workers();
            let backlog = shared.backlog.load(Ordering::Relaxed);
            match &mut *workers {
                Workers::Bound(listeners) => {
                    while listeners.len() < n {
                        listeners.push(bind_listener(shared.local_addr, backlog)?);
                    }
                    listeners.truncate(n);
                }
                Workers::Running(running) => {
                    while running.len() < n {
                        let listener = bind_listener(shared.local_addr, backlog)?;
                        running.push(spawn_worker(listener, shared)?);
                    }
                    while running.len() > n {
                        if let Some(w) = running.pop() {
                            w.stop.store(true, Ordering::SeqCst);
                            removed.push(w);
                        }
                    }
                }
                Workers::Stopped => bail!("origin stopped"),
            }
        }
        // Joined without the lock: a worker takes up to STOP_POLL to notice.
        for w in removed {
            let _ = w.thread.join();
        }
        Ok(())
    }

    pub fn listen_backlog(&self) -> i32 {
        self.0.backlog.load(Ordering::Relaxed)
    }

    /// The backlog listeners created from now on pass to listen(2).
    pub fn set_listen_backlog(&self, backlog: i32) {
        self.0.backlog.store(backlog.max(0), Ordering::Relaxed);
    }

    pub fn concurrency_limit(&self) -> u32 {
        self.0.concurrency_limit.load(Ordering::Relaxed)
    }

    /// 0: no limit. Requests already in flight are never cut.
    pub fn set_concurrency_limit(&self, limit: u32) {
        self.0.concurrency_limit.store(limit, Ordering::Relaxed);
    }

    /// The pool toward `--upstream`, if any.
    pub fn pool(&self) -> Option<&Pool> {
        self.0.pool.as_ref()
    }

    /// This period's load; the next period starts empty.
    pub fn take_period(&self) -> OriginPeriod {
        let served = lock(&self.0.served).take();
        OriginPeriod {
            in_flight: self.0.in_flight.load(Ordering::SeqCst),
            requests: served.count(),
            latency_p50_ms: served.quantile_ms(0.5),
            latency_p99_ms: served.quantile_ms(0.99),
            shed: self.0.shed.swap(0, Ordering::SeqCst),
        }
    }
}

fn bind_listener(addr: SocketAddr, backlog: i32) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("socket()")?;
    socket.set_reuse_address(true).context("SO_REUSEADDR")?;
    socket.set_reuse_port(true).context("SO_REUSEPORT")?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).context("IPV6_V6ONLY")?;
    }
    // accept() honours SO_RCVTIMEO, which lets a blocking accept loop notice
    // the stop flag without a poller.
    socket
        .set_read_timeout(Some(STOP_POLL))
        .context("SO_RCVTIMEO")?;
    socket.bind(&addr.into()).context("bind()")?;
    socket.listen(backlog).context("listen()")?;
    Ok(socket.into())
}

struct Shared {
    cfg: OriginConfig,
    local_addr: SocketAddr,
    /// Set once `run`'s stop flag is seen: every worker and connection ends.
    stop: AtomicBool,
    active: AtomicUsize,
    workers: Mutex<Workers>,
    next_worker: AtomicUsize,
    backlog: AtomicI32,
    concurrency_limit: AtomicU32,
    in_flight: AtomicU32,
    shed: AtomicU64,
    served: Mutex<Samples>,
    pool: Option<Pool>,
    /// `SEGMENT_CHUNK + PATTERN_PERIOD` bytes; segment n's chunks are the
    /// window starting at `7n mod 251`, so no segment is ever materialised.
    pattern: Vec<u8>,
}

enum Workers {
    /// Bound by `Origin::bind`, not accepting until `run`.
    Bound(Vec<TcpListener>),
    Running(Vec<Worker>),
    Stopped,
}

struct Worker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Shared {
    fn new(cfg: OriginConfig, local_addr: SocketAddr, listeners: Vec<TcpListener>) -> Shared {
        let pattern = (0..SEGMENT_CHUNK + PATTERN_PERIOD)
            .map(|i| segment_byte(0, i as u64))
            .collect();
        Shared {
            local_addr,
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            workers: Mutex::new(Workers::Bound(listeners)),
            next_worker: AtomicUsize::new(0),
            backlog: AtomicI32::new(cfg.backlog),
            concurrency_limit: AtomicU32::new(cfg.concurrency_limit),
            in_flight: AtomicU32::new(0),
            shed: AtomicU64::new(0),
            served: Mutex::new(Samples::default()),
            pool: cfg.upstream.map(|up| Pool::new(up, cfg.pool)),
            cfg,
            pattern,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn lock_workers(&self) -> MutexGuard<'_, Workers> {
        lock(&self.workers)
    }
}

/// Locks through poisoning: every holder leaves the state consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Decrements the live-connection count however the connection thread ends.
struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn spawn_worker(listener: TcpListener, shared: &Arc<Shared>) -> anyhow::Result<Worker> {
    let id = shared.next_worker.fetch_add(1, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = Arc::clone(&stop);
    let worker_shared = Arc::clone(shared);
    let thread = thread::Builder::new()
        .name(format!("origin-w{id}"))
        .spawn(move || accept_loop(id, &listener, &worker_shared, &worker_stop))
        .context("spawning origin worker thread")?;
    Ok(Worker { stop, thread })
}

fn accept_loop(worker: usize, listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    let worker_active = Arc::new(AtomicUsize::new(0));
    while !shared.stopping() && !stop.load(Ordering::SeqCst) {
        if worker_active.load(Ordering::SeqCst) >= shared.cfg.slots_per_worker {
            // Like a real server out of worker slots: stop accepting and let
            // the kernel's accept queue fill (and overflow, ListenOverflows).
            thread::sleep(Duration::from_millis(10));
            continue;
        }
        let (stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE, ENOBUFS...: transient; back off instead of spinning.
                tracing::warn!(worker, error = %e, "accept failed");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        spawn_connection(worker, stream, peer, shared, &worker_active);
    }
    if shared.stopping() {
        return;
    }
    // Removed from the group: serve what the queue already holds, since
    // closing a listener resets the connections still queued on it.
    if listener.set_nonblocking(true).is_ok() {
        while let Ok((stream, peer)) = listener.accept() {
            spawn_connection(worker, stream, peer, shared, &worker_active);
        }
    }
}

fn spawn_connection(
    worker: usize,
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    worker_active: &Arc<AtomicUsize>,
) {
    worker_active.fetch_add(1, Ordering::SeqCst);
    shared.active.fetch_add(1, Ordering::SeqCst);
    let conn_shared = Arc::clone(shared);
    let conn_worker_active = Arc::clone(worker_active);
    let spawned = thread::Builder::new()
        .name(format!("origin-w{worker}-c"))
        .stack_size(256 * 1024)
        .spawn(move || {
            let _global = ActiveGuard(&conn_shared.active);
            let _worker = ActiveGuard(&conn_worker_active);
            if let Err(e) = serve_connection(&stream, &conn_shared) {
                tracing::debug!(%peer, error = %e, "connection ended with error");
            }
        });
    if let Err(e) = spawned {
        // The closure (and its guards) never ran: undo the counts here.
        worker_active.fetch_sub(1, Ordering::SeqCst);
        shared.active.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(worker, error = %e, "cannot spawn connection thread");
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Closes after the peer has seen our last bytes: closing with unread input
/// makes the kernel send RST, which could discard the response in flight and
/// would show up as a spurious reset in Vigil's statistics.
fn linger_close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    let mut reader = stream;
    while Instant::now() < deadline && drained < 256 * 1024 {
        match reader.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// Serves requests on one connection until close, error, idle timeout or stop.
fn serve_connection(stream: &TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(STOP_POLL))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    let mut out = BufWriter::with_capacity(SEGMENT_CHUNK + 1024, stream);
    let mut reader = stream;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut scratch = [0u8; 8192];
    let mut body_to_discard: u64 = 0;
    let mut last_input = Instant::now();
    loop {
        if body_to_discard > 0 {
            let n = buf
                .len()
                .min(usize::try_from(body_to_discard).unwrap_or(usize::MAX));
            buf.drain(..n);
            body_to_discard -= n as u64;
        }
        if body_to_discard == 0 {
            let skip = http::leading_empty_lines(&buf);
            buf.drain(..skip);
            if let Some(end) = http::find_head_end(&buf) {
                let outcome = respond(&buf[..end], shared, &mut out)?;
                buf.drain(..end);
                last_input = Instant::now();
                match outcome {
                    Outcome::KeepAlive { body } => {
                        out.flush()?;
                        body_to_discard = body;
                    }
                    Outcome::Close => {
                        out.flush()?;
                        let _ = stream.shutdown(Shutdown::Write);
                        return Ok(());
                    }
                    Outcome::Reject => {
                        out.flush()?;
                        linger_close(stream);
                        return Ok(());
                    }
                }
                continue;
            }
            if buf.len() > MAX_HEAD_BYTES {
                write_simple(&mut out, 431, "Request Header Fields Too Large")?;
                out.flush()?;
                linger_close(stream);
                return Ok(());
            }
        }
        if shared.stopping() || last_input.elapsed() >= IDLE_TIMEOUT {
            return Ok(());
        }
        match reader.read(&mut scratch) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                buf.extend_from_slice(&scratch[..n]);
                last_input = Instant::now();
            }
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

enum Outcome {
    /// Answered; skip `body` request-body bytes, then read the next request.
    KeepAlive { body: u64 },
    /// Answered with `Connection: close` on the client's request.
    Close,
    /// Answered an invalid request; close gracefully.
    Reject,
}

fn respond(head: &[u8], shared: &Shared, out: &mut impl Write) -> io::Result<Outcome> {
    let started = Instant::now();
    let req = match http::parse_request_head(head) {
        Ok(r) => r,
        Err(e) => return reject(out, &e),
    };
    let body = match req.body_length() {
        Ok(b) if b <= MAX_REQUEST_BODY => b,
        Ok(_) => {
            write_simple(out, 413, "Content Too Large")?;
            return Ok(Outcome::Reject);
        }
        Err(e) => return reject(out, &e),
    };
    let keep_alive = req.keep_alive();
    let head_only = match req.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let extra = [("Allow", "GET, HEAD".to_owned())];
            write_head(
                out,
                &req,
                405,
                "Method Not Allowed",
                "text/plain",
                0,
                &extra,
                keep_alive,
            )?;
            return Ok(finish(keep_alive, body));
        }
    };
    let extra = trace_headers(&req);
    let Some(_in_flight) = Admission::enter(shared) else {
        let status = (503, "Service Unavailable");
        write_text(
            out,
            &req,
            status,
            "overloaded\n",
            &extra,
            keep_alive,
            head_only,
        )?;
        return Ok(finish(keep_alive, body));
    };
    let cfg = &shared.cfg;
    if !cfg.service.is_zero() {
        // The slot stays taken meanwhile, as in a worker busy with the request.
        thread::sleep(cfg.service);
    }
    match route(req.path(), cfg.segments) {
        Route::Playlist { .. } => {
            let text = playlist(cfg.segments);
            let ct = "application/vnd.apple.mpegurl";
            write_head(
                out,
                &req,
                200,
                "OK",
                ct,
                text.len() as u64,
                &extra,
                keep_alive,
            )?;
            if !head_only {
                out.write_all(text.as_bytes())?;
            }
        }
        Route::Segment { index, .. } => {
            let len = cfg.segment_bytes as u64;
            write_head(out, &req, 200, "OK", "video/mp2t", len, &extra, keep_alive)?;
            if !head_only {
                write_segment(out, shared, index)?;
            }
        }
        Route::Upstream { stream, index } => {
            match fetch_upstream(shared.pool.as_ref(), stream, index, &extra) {
                Ok(segment) => {
                    let len = segment.len() as u64;
                    write_head(out, &req, 200, "OK", "video/mp2t", len, &extra, keep_alive)?;
                    if !head_only {
                        out.write_all(&segment)?;
                    }
                }
                Err((status, msg)) => {
                    write_text(out, &req, status, msg, &extra, keep_alive, head_only)?;
                }
            }
        }
        Route::NotFound => {
            let status = (404, "Not Found");
            write_text(
                out,
                &req,
                status,
                "not found\n",
                &extra,
                keep_alive,
                head_only,
            )?;
        }
    }
    lock(&shared.served).record(started.elapsed());
    Ok(finish(keep_alive, body))
}

/// A request counted in flight until dropped; `enter` refuses it over the
/// concurrency limit (and counts it shed).
struct Admission<'a>(&'a AtomicU32);

impl<'a> Admission<'a> {
    fn enter(shared: &'a Shared) -> Option<Admission<'a>> {
        let limit = shared.concurrency_limit.load(Ordering::Relaxed);
        // One atomic step, so concurrent requests never overshoot the limit.
        let admitted = shared
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            Some(Admission(&shared.in_flight))
        } else {
            shared.shed.fetch_add(1, Ordering::SeqCst);
            None
        }
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The upstream's segment through the pool, or the status and body to
/// answer instead: its 404 is relayed, any other failure is a 502.
fn fetch_upstream(
    pool: Option<&Pool>,
    stream: &str,
    index: u32,
    trace: &[(&'static str, String)],
) -> Result<Vec<u8>, ((u16, &'static str), &'static str)> {
    const NOT_FOUND: ((u16, &str), &str) = ((404, "Not Found"), "not found\n");
    const BAD_GATEWAY: ((u16, &str), &str) = ((502, "Bad Gateway"), "bad gateway\n");
    let Some(pool) = pool else {
        return Err(NOT_FOUND);
    };
    // Our span (the traceparent we answer with) is the upstream request's parent.
    match pool.get(&format!("/live/{stream}/seg{index}.ts"), trace) {
        Ok(r) if r.head.status == 200 => Ok(r.body),
        Ok(r) if r.head.status == 404 => Err(NOT_FOUND),
        Ok(r) => {
            tracing::debug!(status = r.head.status, "upstream answered an error");
            Err(BAD_GATEWAY)
        }
        Err(e) => {
            tracing::debug!(error = ?e, "upstream request failed");
            Err(BAD_GATEWAY)
        }
    }
}

/// A short text/plain response (errors and refusals).
fn write_text(
    out: &mut impl Write,
    req: &RequestHead,
    (status, reason): (u16, &str),
    msg: &str,
    extra: &[(&str, String)],
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let len = msg.len() as u64;
    write_head(
        out,
        req,
        status,
        reason,
        "text/plain",
        len,
        extra,
        keep_alive,
    )?;
    if !head_only {
        out.write_all(msg.as_bytes())?;
    }
    Ok(())
}

fn finish(keep_alive: bool, body: u64) -> Outcome {
    if keep_alive {
        Outcome::KeepAlive { body }
    } else {
        Outcome::Close
    }
}

fn reject(out: &mut impl Write, e: &HttpError) -> io::Result<Outcome> {
    tracing::debug!(error = %e, "rejecting request");
    let (status, reason) = e.status();
    write_simple(out, status, reason)?;
    Ok(Outcome::Reject)
}

/// Response headers for W3C trace context: continue the caller's trace with
/// our own span id, and pass `tracestate` through unchanged.
fn trace_headers(req: &RequestHead) -> Vec<(&'static str, String)> {
    let mut parents = req.headers.all("traceparent");
    // Several traceparent headers are ambiguous; the spec lets us ignore them.
    let parent = match (parents.next(), parents.next()) {
        (Some(v), None) => TraceParent::parse(v),
        _ => None,
    };
    let Some(parent) = parent else {
        return Vec::new();
    };
    let mut headers = vec![("traceparent", parent.child().to_string())];
    let state: Vec<&str> = req
        .headers
        .all("tracestate")
        .filter(|s| !s.is_empty())
        .collect();
    if !state.is_empty() {
        headers.push(("tracestate", state.join(",")));
    }
    headers
}

#[allow(clippy::too_many_arguments)]
fn write_head(
    out: &mut impl Write,
    req: &RequestHead,
    status: u16,
    reason: &str,
    content_type: &str,
    content_length: u64,
    extra: &[(&str, String)],
    keep_alive: bool,
) -> io::Result<()> {
    write!(
        out,
        "{} {status} {reason}\r\nServer: vigil-origin\r\nContent-Type: {content_type}\r\nContent-Length: {content_length}\r\n",
        req.version
    )?;
    if content_type != "text/plain" {
        out.write_all(b"Cache-Control: max-age=4\r\n")?;
    }
    for (name, value) in extra {
        write!(out, "{name}: {value}\r\n")?;
    }
    match (keep_alive, req.version) {
        (false, _) => out.write_all(b"Connection: close\r\n")?,
        (true, http::Version::Http10) => out.write_all(b"Connection: keep-alive\r\n")?,
        (true, http::Version::Http11) => {}
    }
    out.write_all(b"\r\n")
}

/// A body-less response that ends the connection (errors before routing).
fn write_simple(out: &mut impl Write, status: u16, reason: &str) -> io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nServer: vigil-origin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

fn write_segment(out: &mut impl Write, shared: &Shared, index: u32) -> io::Result<()> {
    let offset = (index as usize * 7) % PATTERN_PERIOD;
    let chunk = &shared.pattern[offset..offset + SEGMENT_CHUNK];
    let mut left = shared.cfg.segment_bytes;
    while left > 0 {
        if shared.stopping() {
            return Err(io::Error::other("origin stopping"));
        }
        let n = left.min(SEGMENT_CHUNK);
        out.write_all(&chunk[..n])?;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playlist_is_valid_hls() {
        let p = playlist(3);
        assert!(p.starts_with("#EXTM3U\n"));
        assert!(p.contains("#EXT-X-VERSION:3\n"));
        assert!(p.contains("#EXT-X-TARGETDURATION:4\n"));
        assert!(p.contains("#EXT-X-MEDIA-SEQUENCE:0\n"));
        assert_eq!(p.matches("#EXTINF:4.0,\n").count(), 3);
        assert!(p.contains("seg0.ts\n") && p.contains("seg2.ts\n") && !p.contains("seg3.ts"));
        assert!(p.ends_with("#EXT-X-ENDLIST\n"));
    }

    #[test]
    fn routes() {
        assert_eq!(
            route("/live/demo/index.m3u8", 10),
            Route::Playlist { stream: "demo" }
        );
        assert_eq!(
            route("/live/a-b_1/seg9.ts", 10),
            Route::Segment {
                stream: "a-b_1",
                index: 9
            }
        );
        for bad in [
            "/live/demo/seg10.ts",
            "/live/demo/seg01.ts",
            "/live/demo/seg+1.ts",
            "/live/demo/seg.ts",
            "/live/demo/seg99999999999999.ts",
            "/live/demo/other.ts",
            "/live/de.mo/index.m3u8",
            "/live//index.m3u8",
            "/live/demo/x/index.m3u8",
            "/live/demo",
            "/",
            "/vod/demo/index.m3u8",
        ] {
            assert_eq!(route(bad, 10), Route::NotFound, "{bad}");
        }
        assert_eq!(route("/live/demo/seg0.ts", 0), Route::NotFound);
        // Upstream segments are bounded by the upstream, not by our segments.
        assert_eq!(
            route("/upstream/demo/seg12.ts", 10),
            Route::Upstream {
                stream: "demo",
                index: 12
            }
        );
        for bad in [
            "/upstream/demo/index.m3u8",
            "/upstream/demo/seg01.ts",
            "/upstream/de.mo/seg1.ts",
            "/upstream/demo",
        ] {
            assert_eq!(route(bad, 10), Route::NotFound, "{bad}");
        }
    }

    #[test]
    fn segment_windows_match_segment_byte() {
        let cfg = OriginConfig {
            segment_bytes: SEGMENT_CHUNK * 2 + 17,
            ..OriginConfig::default()
        };
        let shared = Shared::new(cfg, SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new());
        for index in [0u32, 1, 250, 251, 1000] {
            let mut out = Vec::new();
            write_segment(&mut out, &shared, index).expect("write to Vec");
            assert_eq!(out.len(), shared.cfg.segment_bytes);
            for (i, b) in out.iter().enumerate() {
                assert_eq!(
                    *b,
                    segment_byte(index, i as u64),
                    "segment {index} byte {i}"
                );
            }
        }
    }

    #[test]
    fn rejects_bad_config() {
        let bad = [
            OriginConfig {
                workers: 0,
                ..OriginConfig::default()
            },
            OriginConfig {
                backlog: -1,
                ..OriginConfig::default()
            },
            OriginConfig {
                segments: MAX_SEGMENTS + 1,
                ..OriginConfig::default()
            },
            OriginConfig {
                slots_per_worker: 0,
                ..OriginConfig::default()
            },
            OriginConfig {
                service: MAX_SERVICE + Duration::from_millis(1),
                ..OriginConfig::default()
            },
        ];
        for cfg in bad {
            assert!(Origin::bind(cfg).is_err());
        }
    }
}
