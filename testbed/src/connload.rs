//! Open-loop load of new connections: one new connection every `1/rate`
//! seconds on a fixed schedule, whether or not earlier ones were answered,
//! as viewers arriving at an origin do. (A closed loop, where each client
//! waits for its answer before the next, slows down with the server and
//! hides overload.) Each connection asks for one response with
//! `Connection: close` and reads it to the end.
//!
//! Latency is measured from the connection's scheduled start, not from when
//! it was sent, so a generator that falls behind is not mistaken for a fast
//! server (coordinated omission).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

/// At most this many connections in flight: a bound on descriptors when the
/// server stops answering.
pub const MAX_IN_FLIGHT: usize = 30_000;
const MAX_RATE: u32 = 100_000;

#[derive(Debug, Clone)]
pub struct ConnLoadConfig {
    pub target: SocketAddr,
    /// New connections per second.
    pub rate: u32,
    pub duration: Duration,
    /// A connection not answered in full by then (from its scheduled start)
    /// is abandoned (reset) and counted as timed out.
    pub timeout: Duration,
    /// Request path.
    pub path: String,
}

impl ConnLoadConfig {
    fn validate(&self) -> anyhow::Result<()> {
        if self.rate == 0 || self.rate > MAX_RATE {
            bail!(
                "rate must be 1..={MAX_RATE} connections/s, got {}",
                self.rate
            );
        }
        if self.duration.is_zero() {
            bail!("duration must be positive");
        }
        if self.timeout.is_zero() {
            bail!("timeout must be positive");
        }
        if !self.path.starts_with('/') || self.path.contains(char::is_whitespace) {
            bail!(
                "path must start with / and have no spaces, got {:?}",
                self.path
            );
        }
        Ok(())
    }
}

/// What happened to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnOutcome {
    /// A 200 response, read to its end.
    Answered,
    /// connect() failed at once (RST to the SYN: refused by admission
    /// control, or no listener).
    Refused,
    /// Not answered in full within the timeout.
    TimedOut,
    /// Any other failure (reset mid-response, a non-200 status, ...).
    Failed,
    /// Never started: too many connections in flight.
    Skipped,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ConnRecord {
    /// Scheduled start, in seconds since the run began.
    pub at_secs: f64,
    pub outcome: ConnOutcome,
    /// From the scheduled start to the end of the response (or the failure).
    pub latency_ms: f64,
}

/// Counts and latency over a set of connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnSummary {
    /// Seconds the records span.
    pub seconds: f64,
    pub offered: u64,
    pub answered: u64,
    pub refused: u64,
    pub timed_out: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Answered within the SLO, when one was given.
    pub within_slo: Option<u64>,
    /// Latency of answered connections, milliseconds.
    pub answered_p50_ms: Option<f64>,
    pub answered_p99_ms: Option<f64>,
    pub answered_max_ms: Option<f64>,
}

impl ConnSummary {
    /// Summary of the records scheduled in `[from, to)` seconds.
    pub fn of(records: &[ConnRecord], from: f64, to: f64, slo: Option<Duration>) -> ConnSummary {
        let picked: Vec<&ConnRecord> = records
            .iter()
            .filter(|r| r.at_secs >= from && r.at_secs < to)
            .collect();
        let count = |o: ConnOutcome| picked.iter().filter(|r| r.outcome == o).count() as u64;
        let mut answered: Vec<f64> = picked
            .iter()
            .filter(|r| r.outcome == ConnOutcome::Answered)
            .map(|r| r.latency_ms)
            .collect();
        answered.sort_by(f64::total_cmp);
        let slo_ms = slo.map(|s| s.as_secs_f64() * 1000.0);
        ConnSummary {
            seconds: to - from,
            offered: picked.len() as u64,
            answered: answered.len() as u64,
            refused: count(ConnOutcome::Refused),
            timed_out: count(ConnOutcome::TimedOut),
            failed: count(ConnOutcome::Failed),
            skipped: count(ConnOutcome::Skipped),
            within_slo: slo_ms.map(|s| answered.iter().filter(|&&l| l <= s).count() as u64),
            answered_p50_ms: quantile(&answered, 0.50),
            answered_p99_ms: quantile(&answered, 0.99),
            answered_max_ms: answered.last().copied(),
        }
    }

    /// Connections answered within the SLO per second.
    pub fn goodput(&self) -> Option<f64> {
        self.within_slo
            .map(|n| n as f64 / self.seconds.max(f64::EPSILON))
    }
}

/// The `q` quantile of sorted `values` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Runs the schedule and returns one record per scheduled connection, in
/// schedule order.
pub fn run(cfg: &ConnLoadConfig) -> anyhow::Result<Vec<ConnRecord>> {
    cfg.validate()?;
    raise_descriptor_limit(MAX_IN_FLIGHT as u64 + 1024);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the load's runtime")?;
    runtime.block_on(schedule(cfg.clone()))
}

async fn schedule(cfg: ConnLoadConfig) -> anyhow::Result<Vec<ConnRecord>> {
    let request = Arc::new(format!(
        "GET {} HTTP/1.1\r\nHost: vigil\r\nConnection: close\r\n\r\n",
        cfg.path
    ));
    let total = (cfg.duration.as_secs_f64() * f64::from(cfg.rate)).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(cfg.rate));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let at = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(at.into()).await;
        let at_secs = at.duration_since(start).as_secs_f64();
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            tasks.push(tokio::spawn(async move {
                ConnRecord {
                    at_secs,
                    outcome: ConnOutcome::Skipped,
                    latency_ms: 0.0,
                }
            }));
            continue;
        };
        let (request, target, timeout) = (Arc::clone(&request), cfg.target, cfg.timeout);
        tasks.push(tokio::spawn(async move {
            let outcome = one(target, &request, at + timeout).await;
            drop(permit);
            ConnRecord {
                at_secs,
                outcome,
                latency_ms: at.elapsed().as_secs_f64() * 1000.0,
            }
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.context("a connection task failed")?);
    }
    Ok(records)
}

async fn one(target: SocketAddr, request: &str, deadline: Instant) -> ConnOutcome {
    let connect = tokio::time::timeout_at(deadline.into(), TcpStream::connect(target)).await;
    let stream = match connect {
        Err(_) => return ConnOutcome::TimedOut,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return ConnOutcome::Refused
        }
        Ok(Err(_)) => return ConnOutcome::Failed,
        Ok(Ok(s)) => s,
    };
    let mut stream = stream;
    let exchange = tokio::time::timeout_at(deadline.into(), exchange(&mut stream, request)).await;
    match exchange {
        Ok(Ok(true)) => ConnOutcome::Answered,
        Ok(Ok(false) | Err(_)) => ConnOutcome::Failed,
        Err(_) => {
            // Reset instead of a FIN: an abandoned connection must not hold
            // its port in FIN_WAIT for a minute. (A zero linger never blocks.)
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            ConnOutcome::TimedOut
        }
    }
}

/// The server's capacity in connections per second: `clients` clients each
/// opening one connection after another (a closed loop, so the server's
/// queues never hold more than `clients`) for `duration`; answered
/// connections over the time taken.
pub fn capacity(
    target: SocketAddr,
    clients: usize,
    duration: Duration,
    path: &str,
) -> anyhow::Result<f64> {
    if clients == 0 || clients > MAX_IN_FLIGHT {
        bail!("clients must be 1..={MAX_IN_FLIGHT}, got {clients}");
    }
    raise_descriptor_limit(clients as u64 + 1024);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the load's runtime")?;
    let request = Arc::new(format!(
        "GET {path} HTTP/1.1\r\nHost: vigil\r\nConnection: close\r\n\r\n"
    ));
    runtime.block_on(async move {
        let start = Instant::now();
        let end = start + duration;
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let request = Arc::clone(&request);
                tokio::spawn(async move {
                    let mut answered = 0u64;
                    while Instant::now() < end {
                        let deadline = Instant::now() + Duration::from_secs(5);
                        if one(target, &request, deadline).await == ConnOutcome::Answered {
                            answered += 1;
                        }
                    }
                    answered
                })
            })
            .collect();
        let mut answered = 0;
        for t in tasks {
            answered += t.await.context("a client task failed")?;
        }
        Ok(answered as f64 / start.elapsed().as_secs_f64())
    })
}

/// Raises this process's open-file limit towards `want` (up to the hard
/// limit): a connection in flight is a descriptor.
fn raise_descriptor_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Sends the request and reads the response to EOF: whether it was a 200.
async fn exchange(stream: &mut TcpStream, request: &str) -> std::io::Result<bool> {
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 12];
    let mut got = 0;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let take = n.min(head.len() - got);
        head[got..got + take].copy_from_slice(&buf[..take]);
        got += take;
    }
    Ok(got == head.len() && head.starts_with(b"HTTP/1.1 200"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at_secs: f64, outcome: ConnOutcome, latency_ms: f64) -> ConnRecord {
        ConnRecord {
            at_secs,
            outcome,
            latency_ms,
        }
    }

    #[test]
    fn summarises_a_window_with_goodput_against_the_slo() {
        let records = [
            record(0.5, ConnOutcome::Answered, 10.0),
            record(1.0, ConnOutcome::Answered, 30.0),
            record(1.2, ConnOutcome::Answered, 90.0),
            record(1.5, ConnOutcome::Refused, 0.1),
            record(2.5, ConnOutcome::TimedOut, 3000.0),
            record(3.0, ConnOutcome::Answered, 1.0),
        ];
        let s = ConnSummary::of(&records, 1.0, 3.0, Some(Duration::from_millis(50)));
        assert_eq!(
            (s.offered, s.answered, s.refused, s.timed_out),
            (4, 2, 1, 1)
        );
        assert_eq!(s.within_slo, Some(1));
        assert_eq!(s.goodput(), Some(0.5));
        assert_eq!(s.answered_p50_ms, Some(30.0));
        assert_eq!(s.answered_p99_ms, Some(90.0));
        assert_eq!(
            ConnSummary::of(&records, 9.0, 10.0, None).answered_p99_ms,
            None
        );
    }

    #[test]
    fn rejects_a_bad_schedule() {
        let good = ConnLoadConfig {
            target: "127.0.0.1:1".parse().expect("addr"),
            rate: 10,
            duration: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            path: "/live/demo/seg0.ts".into(),
        };
        assert!(good.validate().is_ok());
        for bad in [
            ConnLoadConfig {
                rate: 0,
                ..good.clone()
            },
            ConnLoadConfig {
                duration: Duration::ZERO,
                ..good.clone()
            },
            ConnLoadConfig {
                path: "no-slash".into(),
                ..good.clone()
            },
        ] {
            assert!(run(&bad).is_err());
        }
    }

    #[test]
    fn a_closed_port_is_refused_at_once() {
        // Port 1 on loopback: nothing listens there on a test machine.
        let records = run(&ConnLoadConfig {
            target: "127.0.0.1:1".parse().expect("addr"),
            rate: 50,
            duration: Duration::from_millis(200),
            timeout: Duration::from_secs(1),
            path: "/".into(),
        })
        .expect("run");
        assert_eq!(records.len(), 10);
        assert!(records.iter().all(|r| r.outcome == ConnOutcome::Refused));
    }
}
