//! A blocking HTTP/1.1 keep-alive connection pool toward one upstream, sized
//! like Go's `http.Transport`: at most `max_idle` idle connections kept
//! (`MaxIdleConnsPerHost`) and at most `max_open` open (`MaxConnsPerHost`,
//! 0 = unlimited; beyond it callers wait for a connection to come back).
//! Both can be changed while requests run ([`Pool::resize`]), which is what
//! the control API's pool targets do.
//!
//! Per-period statistics ([`Pool::take_period`]) are what a service reports
//! to the agent. "Wait" is the time a request spent getting a connection:
//! queueing for a free one at `max_open` plus dialing a new one when no idle
//! connection was there; reusing an idle connection waits ~0. "Hold" is the
//! time from having a connection to giving it back (the request itself).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::http::{self, BodyLength, HttpError, ResponseHead, MAX_HEAD_BYTES};
use crate::samples::Samples;

/// Response bodies above this are refused (a bogus Content-Length must not
/// make the pool allocate without bound); segments are ~1 MiB.
pub const MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    pub max_idle: u32,
    /// 0: unlimited.
    pub max_open: u32,
    pub connect_timeout: Duration,
    /// Read and write timeout of each request.
    pub io_timeout: Duration,
    /// How long a request waits for a free connection at `max_open`.
    pub wait_timeout: Duration,
    /// Idle connections older than this are closed instead of reused; below
    /// the upstream origin's own idle timeout (30 s), so the pool closes first.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_idle: 4,
            max_open: 64,
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no connection to {upstream} came free within {waited:?} (max_open {max_open})")]
    WaitTimeout {
        upstream: SocketAddr,
        waited: Duration,
        max_open: u32,
    },
    #[error("cannot connect to {upstream}")]
    Dial {
        upstream: SocketAddr,
        #[source]
        io_error: io::Error,
    },
    #[error("request to {upstream} failed")]
    Io {
        upstream: SocketAddr,
        #[source]
        io_error: io::Error,
    },
    #[error("invalid response from {upstream}")]
    Response {
        upstream: SocketAddr,
        #[source]
        http_error: HttpError,
    },
    #[error("response body from {upstream} of {length} bytes exceeds {MAX_BODY_BYTES}")]
    BodyTooLarge { upstream: SocketAddr, length: u64 },
}

/// A complete response (the body read into memory).
#[derive(Debug, Clone)]
pub struct Response {
    pub head: ResponseHead,
    pub body: Vec<u8>,
}

/// One period's statistics, as [`crate::control_client`] reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolPeriod {
    /// Connections in use and idle when the period was taken.
    pub in_use: u32,
    pub idle: u32,
    pub wait_mean_ms: f64,
    pub wait_p99_ms: f64,
    /// Requests through the pool in the period, failed ones included;
    /// `errors` counts those that got no complete response.
    pub requests: u64,
    pub errors: u64,
    pub opened: u64,
    pub closed: u64,
    pub hold_mean_ms: f64,
}

pub struct Pool {
    upstream: SocketAddr,
    cfg: PoolConfig,
    state: Mutex<State>,
    /// Signalled when a connection is returned or closed, or the pool grows.
    freed: Condvar,
}

struct State {
    /// Most recently returned last: reuse takes the warmest connection.
    idle: Vec<Idle>,
    /// Connections counted against `max_open`: idle, in use and being dialed.
    open: u32,
    in_use: u32,
    max_idle: u32,
    max_open: u32,
    period: Period,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
struct Period {
    requests: u64,
    errors: u64,
    opened: u64,
    closed: u64,
    wait: Samples,
    hold: Samples,
}

struct Conn {
    reader: BufReader<TcpStream>,
}

/// A connection taken from the pool; give it back with [`Pool::checkin`].
struct Lease {
    conn: Conn,
    reused: bool,
    since: Instant,
}

impl Pool {
    pub fn new(upstream: SocketAddr, cfg: PoolConfig) -> Pool {
        Pool {
            upstream,
            cfg,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                in_use: 0,
                max_idle: cfg.max_idle,
                max_open: cfg.max_open,
                period: Period::default(),
            }),
            freed: Condvar::new(),
        }
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Current (max_idle, max_open).
    pub fn limits(&self) -> (u32, u32) {
        let st = self.lock();
        (st.max_idle, st.max_open)
    }

    /// Changes the limits at once: surplus idle connections are closed now,
    /// busy ones when they come back; waiters see a larger `max_open` at once.
    pub fn resize(&self, max_idle: u32, max_open: u32) {
        let mut st = self.lock();
        st.max_idle = max_idle;
        st.max_open = max_open;
        // Oldest first: they are the likeliest to be closed by the upstream anyway.
        while st.idle.len() > max_idle as usize || (st.over_max_open() && !st.idle.is_empty()) {
            st.idle.remove(0);
            st.close_one();
        }
        drop(st);
        self.freed.notify_all();
    }

    /// This period's statistics; the next period starts empty.
    pub fn take_period(&self) -> PoolPeriod {
        let mut st = self.lock();
        let p = std::mem::take(&mut st.period);
        PoolPeriod {
            in_use: st.in_use,
            idle: u32::try_from(st.idle.len()).unwrap_or(u32::MAX),
            wait_mean_ms: p.wait.mean_ms(),
            wait_p99_ms: p.wait.quantile_ms(0.99),
            requests: p.requests,
            errors: p.errors,
            opened: p.opened,
            closed: p.closed,
            hold_mean_ms: p.hold.mean_ms(),
        }
    }

    /// GET `path` with `headers` (Host is added). A reused connection the
    /// upstream closed meanwhile is retried once on a new one, as Go does for
    /// idempotent requests; any status is a response, not an error.
    pub fn get(&self, path: &str, headers: &[(&str, String)]) -> Result<Response, PoolError> {
        let result = self.get_once(path, headers).or_else(|(e, retry)| {
            if retry {
                self.get_once(path, headers).map_err(|(e, _)| e)
            } else {
                Err(e)
            }
        });
        let mut st = self.lock();
        st.period.requests += 1;
        if result.is_err() {
            st.period.errors += 1;
        }
        result
    }

    /// One attempt; on error also whether it failed on a reused connection
    /// before any response byte (safe and worth retrying).
    fn get_once(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<Response, (PoolError, bool)> {
        let mut lease = self.checkout().map_err(|e| (e, false))?;
        let mut got_bytes = false;
        let result = exchange(
            &mut lease.conn,
            self.upstream,
            path,
            headers,
            &mut got_bytes,
        );
        let reusable = matches!(&result, Ok((_, true)));
        let retry = result.is_err() && lease.reused && !got_bytes;
        self.checkin(lease, reusable);
        result.map(|(r, _)| r).map_err(|e| (e, retry))
    }

    /// An idle connection, else a new one if `max_open` allows, else waits.
    fn checkout(&self) -> Result<Lease, PoolError> {
        let started = Instant::now();
        let deadline = started + self.cfg.wait_timeout;
        let mut st = self.lock();
        loop {
            while let Some(idle) = st.idle.pop() {
                if idle.since.elapsed() < self.cfg.idle_timeout && idle.conn.is_open() {
                    st.in_use += 1;
                    st.period.wait.record(started.elapsed());
                    return Ok(Lease {
                        conn: idle.conn,
                        reused: true,
                        since: Instant::now(),
                    });
                }
                st.close_one();
            }
            if st.max_open == 0 || st.open < st.max_open {
                // Take the slot before dialing without the lock, so
                // concurrent callers cannot overshoot max_open.
                st.open += 1;
                drop(st);
                let dialed = self.dial();
                st = self.lock();
                return match dialed {
                    Ok(conn) => {
                        st.in_use += 1;
                        st.period.opened += 1;
                        st.period.wait.record(started.elapsed());
                        Ok(Lease {
                            conn,
                            reused: false,
                            since: Instant::now(),
                        })
                    }
                    Err(io_error) => {
                        st.open -= 1;
                        drop(st);
                        self.freed.notify_one();
                        Err(PoolError::Dial {
                            upstream: self.upstream,
                            io_error,
                        })
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PoolError::WaitTimeout {
                    upstream: self.upstream,
                    waited: started.elapsed(),
                    max_open: st.max_open,
                });
            }
            st = self
                .freed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Keeps the connection idle if it is reusable and the limits allow,
    /// else closes it; either way a waiter may proceed.
    fn checkin(&self, lease: Lease, reusable: bool) {
        let mut st = self.lock();
        st.in_use -= 1;
        st.period.hold.record(lease.since.elapsed());
        if reusable && st.idle.len() < st.max_idle as usize && !st.over_max_open() {
            st.idle.push(Idle {
                conn: lease.conn,
                since: Instant::now(),
            });
        } else {
            drop(lease.conn);
            st.close_one();
        }
        drop(st);
        self.freed.notify_one();
    }

    fn dial(&self) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&self.upstream, self.cfg.connect_timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.cfg.io_timeout))?;
        stream.set_write_timeout(Some(self.cfg.io_timeout))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock, so a panic elsewhere
        // holding the lock does not make it unusable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn over_max_open(&self) -> bool {
        self.max_open != 0 && self.open > self.max_open
    }

    /// Accounts for one connection closed (the caller drops it).
    fn close_one(&mut self) {
        self.open -= 1;
        self.period.closed += 1;
    }
}

impl Conn {
    /// False when the upstream closed (or reset) the idle connection: a
    /// non-blocking peek sees EOF or an error instead of "nothing yet".
    fn is_open(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            // Unsolicited bytes on an idle connection: the stream is out of sync.
            return false;
        }
        let stream = self.reader.get_ref();
        if stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let open =
            matches!(stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        open && stream.set_nonblocking(false).is_ok()
    }
}

/// Sends one GET and reads its whole response; also whether the connection
/// may carry another request. `got_bytes` tells whether any response byte came.
fn exchange(
    conn: &mut Conn,
    upstream: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    got_bytes: &mut bool,
) -> Result<(Response, bool), PoolError> {
    let io_err = |io_error| PoolError::Io { upstream, io_error };
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {upstream}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    conn.reader
        .get_mut()
        .write_all(request.as_bytes())
        .map_err(io_err)?;

    let raw = read_head(&mut conn.reader, got_bytes).map_err(io_err)?;
    let head = http::parse_response_head(&raw).map_err(|http_error| PoolError::Response {
        upstream,
        http_error,
    })?;
    let framing = head
        .body_length()
        .map_err(|http_error| PoolError::Response {
            upstream,
            http_error,
        })?;
    let (body, reusable) = match framing {
        BodyLength::Exactly(length) => {
            if length > MAX_BODY_BYTES {
                return Err(PoolError::BodyTooLarge { upstream, length });
            }
            let mut body = vec![0u8; usize::try_from(length).unwrap_or(0)];
            conn.reader.read_exact(&mut body).map_err(io_err)?;
            (body, head.keep_alive())
        }
        BodyLength::UntilClose => {
            let mut body = Vec::new();
            let limit = MAX_BODY_BYTES + 1;
            (&mut conn.reader)
                .take(limit)
                .read_to_end(&mut body)
                .map_err(io_err)?;
            if body.len() as u64 >= limit {
                return Err(PoolError::BodyTooLarge {
                    upstream,
                    length: body.len() as u64,
                });
            }
            (body, false)
        }
    };
    Ok((Response { head, body }, reusable))
}

/// Reads a response head through its blank line.
fn read_head(reader: &mut BufReader<TcpStream>, got_bytes: &mut bool) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    loop {
        let before = head.len();
        let n = reader
            .by_ref()
            .take((MAX_HEAD_BYTES + 1 - before) as u64)
            .read_until(b'\n', &mut head)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if head.is_empty() {
                    "upstream closed the connection"
                } else {
                    "upstream closed the connection in a response head"
                },
            ));
        }
        *got_bytes = true;
        if head.len() > MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            return Ok(head);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;
    use crate::origin::{segment_byte, Origin, OriginConfig, RunningOrigin};

    const SEGMENT_BYTES: usize = 10_000;

    /// An origin on loopback, stopped and joined on drop.
    fn upstream_on(listen: SocketAddr) -> RunningOrigin {
        Origin::bind(OriginConfig {
            listen,
            workers: 1,
            segment_bytes: SEGMENT_BYTES,
            segments: 4,
            ..OriginConfig::default()
        })
        .expect("bind upstream origin")
        .spawn()
    }

    fn upstream() -> RunningOrigin {
        upstream_on(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    fn pool(addr: SocketAddr, max_idle: u32, max_open: u32) -> Pool {
        Pool::new(
            addr,
            PoolConfig {
                max_idle,
                max_open,
                wait_timeout: Duration::from_millis(200),
                ..PoolConfig::default()
            },
        )
    }

    fn fetch_segment(pool: &Pool, index: u32) {
        let r = pool
            .get(&format!("/live/demo/seg{index}.ts"), &[])
            .expect("segment through the pool");
        assert_eq!(r.head.status, 200);
        assert_eq!(r.body.len(), SEGMENT_BYTES);
        assert!(r
            .body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == segment_byte(index, i as u64)));
    }

    #[test]
    fn reuses_idle_connections() {
        let up = upstream();
        let pool = pool(up.addr, 2, 0);
        for i in 0..5 {
            fetch_segment(&pool, i % 4);
        }
        let p = pool.take_period();
        assert_eq!((p.requests, p.errors, p.opened, p.closed), (5, 0, 1, 0));
        assert_eq!((p.in_use, p.idle), (0, 1));
        assert!(p.hold_mean_ms > 0.0);
    }

    #[test]
    fn max_open_makes_callers_wait_then_time_out() {
        let up = upstream();
        let pool = Arc::new(pool(up.addr, 4, 2));
        let a = pool.checkout().expect("first");
        let b = pool.checkout().expect("second");
        // At max_open: a third caller waits and gives up after wait_timeout.
        assert!(matches!(
            pool.checkout(),
            Err(PoolError::WaitTimeout { max_open: 2, .. })
        ));
        // A waiter gets the connection returned meanwhile.
        let waiter = {
            let pool = Arc::clone(&pool);
            thread::spawn(move || pool.checkout())
        };
        thread::sleep(Duration::from_millis(20));
        pool.checkin(a, true);
        let c = waiter.join().expect("waiter").expect("got a connection");
        assert!(c.reused);
        pool.checkin(c, true);
        pool.checkin(b, true);
        let p = pool.take_period();
        assert_eq!((p.opened, p.closed, p.idle, p.in_use), (2, 0, 2, 0));
    }

    #[test]
    fn max_open_respected_under_concurrent_callers() {
        let up = upstream();
        let pool = Arc::new(Pool::new(
            up.addr,
            PoolConfig {
                max_idle: 8,
                max_open: 3,
                ..PoolConfig::default()
            },
        ));
        let callers: Vec<_> = (0..8)
            .map(|i| {
                let pool = Arc::clone(&pool);
                thread::spawn(move || {
                    for n in 0..5 {
                        fetch_segment(&pool, (i + n) % 4);
                        let st = pool.lock();
                        assert!(st.open <= 3, "open {} above max_open", st.open);
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().expect("caller");
        }
        let p = pool.take_period();
        assert_eq!((p.requests, p.errors, p.closed), (40, 0, 0));
        assert!(p.opened <= 3, "opened {}", p.opened);
        assert_eq!(u64::from(p.idle), p.opened);
    }

    #[test]
    fn resize_closes_surplus_idle_at_once_and_busy_on_return() {
        let up = upstream();
        let pool = pool(up.addr, 4, 0);
        let leases: Vec<_> = (0..4).map(|_| pool.checkout().expect("lease")).collect();
        for l in leases {
            pool.checkin(l, true);
        }
        assert_eq!(pool.take_period().idle, 4);
        pool.resize(1, 0);
        let p = pool.take_period();
        assert_eq!((p.idle, p.closed), (1, 3));
        assert_eq!(pool.limits(), (1, 0));
        // Busy connections above the new max_idle close when returned.
        let a = pool.checkout().expect("a");
        let b = pool.checkout().expect("b");
        pool.resize(0, 0);
        pool.checkin(a, true);
        pool.checkin(b, true);
        let p = pool.take_period();
        assert_eq!((p.idle, p.in_use, p.opened, p.closed), (0, 0, 1, 2));
    }

    #[test]
    fn period_statistics_are_exact() {
        let up = upstream();
        let pool = pool(up.addr, 1, 0);
        fetch_segment(&pool, 0);
        fetch_segment(&pool, 1);
        // A 404 is a response: a request, not an error.
        let r = pool.get("/live/demo/seg99.ts", &[]).expect("404 response");
        assert_eq!(r.head.status, 404);
        pool.resize(0, 0);
        fetch_segment(&pool, 2);
        let p = pool.take_period();
        assert_eq!(
            (p.requests, p.errors, p.opened, p.closed, p.in_use, p.idle),
            (4, 0, 2, 2, 0, 0)
        );
        // Two of the four waited for a dial.
        assert!(p.wait_mean_ms > 0.0 && p.wait_p99_ms >= p.wait_mean_ms);
        assert_eq!(pool.take_period(), PoolPeriod::default());

        // Nothing listens on a port we just released: a dial error.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let dead = self::pool(closed, 1, 0);
        assert!(matches!(
            dead.get("/live/demo/seg0.ts", &[]),
            Err(PoolError::Dial { .. })
        ));
        let p = dead.take_period();
        assert_eq!((p.requests, p.errors, p.opened, p.closed), (1, 1, 0, 0));
    }

    #[test]
    fn idle_connection_closed_by_upstream_is_replaced() {
        let up = upstream();
        let addr = up.addr;
        let pool = pool(addr, 1, 0);
        fetch_segment(&pool, 0);
        // A restarted upstream: the idle connection to the old one is closed
        // and must be detected as such, not handed out.
        drop(up);
        let _up = upstream_on(addr);
        fetch_segment(&pool, 1);
        let p = pool.take_period();
        assert_eq!((p.requests, p.errors, p.opened, p.closed), (2, 0, 2, 1));
    }
}
