//! `vigil-loadgen`: HLS client load for Vigil's tests, demo and benchmarks.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use vigil_testbed::loadgen::{self, LoadConfig, LoadSummary};

/// Plays HLS against a vigil-origin (or any HLS origin) like a set of players.
///
/// Each of --connections opens one keep-alive TCP connection and sends
/// --requests-per-connection requests one after another: the playlist
/// /live/{stream}/index.m3u8 first, then the segments it lists, round-robin.
/// Every request carries a fresh random W3C `traceparent` (unless
/// --no-traceparent); its trace id and the connection's local port are in
/// the --json output, to match against what Vigil reports.
///
/// A run ends when all requests are done or after --max-duration-secs.
/// With --repeat-until-secs, runs repeat (pausing --pause-ms between them)
/// so load keeps flowing during a demo; each run prints its own summary.
///
/// SIGTERM or SIGINT ends the run early: no new request is sent, those in
/// flight complete, and the summary is printed as at the end of a run.
///
/// Exit status: 0 if at least one request succeeded, 1 otherwise.
///
/// Example: vigil-loadgen --target 198.18.1.1:8080 --connections 8 --json
#[derive(Debug, Parser)]
#[command(name = "vigil-loadgen", version, verbatim_doc_comment)]
struct Args {
    /// Origin address (IP:PORT; IPv6 as [ADDR]:PORT).
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// Concurrent keep-alive connections (one thread each).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Sequential requests per connection: 1 playlist, then segments.
    #[arg(long, default_value_t = 20)]
    requests_per_connection: usize,
    /// Stream name in the URL path ([A-Za-z0-9_-]).
    #[arg(long, default_value = "demo")]
    stream: String,
    /// Hard time limit of one run, in seconds (fractions allowed); requests
    /// still in flight then are counted as interrupted.
    #[arg(long, default_value_t = 60.0)]
    max_duration_secs: f64,
    /// Do not send `traceparent` headers.
    #[arg(long)]
    no_traceparent: bool,
    /// Record each connection's initial sequence numbers in the JSON records
    /// (send_seq0/recv_seq0; TCP repair mode, needs CAP_NET_ADMIN).
    #[arg(long)]
    record_seq: bool,
    /// Print each run's summary as one JSON line (with per-request records).
    #[arg(long)]
    json: bool,
    /// Keep starting new runs until this many seconds have passed since
    /// start (0: a single run). The last run is cut to fit.
    #[arg(long, default_value_t = 0.0)]
    repeat_until_secs: f64,
    /// Requests per second over all connections, paced on a fixed schedule
    /// (each connection sends its share); default: each request as soon as
    /// the last one is answered (as fast as the origin goes).
    #[arg(long)]
    rate: Option<u32>,
    /// Pause between repeated runs, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pause_ms: u64,
}

fn main() -> ExitCode {
    vigil_testbed::init_logging();
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vigil-loadgen: every request failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vigil-loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| {
        format!("--{flag} must be a non-negative number of seconds, got {value:?}")
    })
}

/// Returns whether any request succeeded.
fn run(args: Args) -> anyhow::Result<bool> {
    vigil_testbed::die_with_parent()?;
    // Blocked before any thread starts, so only the sigwait thread below
    // receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.wait().is_ok() {
                loadgen::finish_early();
            }
        })
        .context("spawning signal thread")?;
    let max_duration = seconds("max-duration-secs", args.max_duration_secs)?;
    let repeat_until = seconds("repeat-until-secs", args.repeat_until_secs)?;
    if max_duration.is_zero() {
        bail!("--max-duration-secs must be positive");
    }
    let mut cfg = LoadConfig {
        target: args.target,
        connections: args.connections,
        requests_per_connection: args.requests_per_connection,
        stream: args.stream,
        max_duration,
        with_traceparent: !args.no_traceparent,
        record_seq: args.record_seq,
        rate: args.rate,
    };
    let started = Instant::now();
    let mut total = LoadSummary::default();
    let mut run_no = 0u64;
    loop {
        run_no += 1;
        if !repeat_until.is_zero() {
            let left = repeat_until.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            cfg.max_duration = max_duration.min(left);
        }
        let summary = loadgen::run(&cfg)?;
        report(run_no, &summary, args.json)?;
        total.absorb(summary);
        let pause = Duration::from_millis(args.pause_ms);
        if repeat_until.is_zero()
            || started.elapsed().saturating_add(pause) >= repeat_until
            || loadgen::finishing()
        {
            break;
        }
        thread::sleep(pause);
    }
    if run_no > 1 && !args.json {
        println!(
            "total: {} runs, {} ok, {} failed, {} interrupted, {} body bytes",
            run_no,
            total.requests_ok,
            total.requests_failed,
            total.requests_interrupted,
            total.bytes
        );
    }
    Ok(total.requests_ok > 0)
}

fn report(run_no: u64, s: &LoadSummary, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, s).context("writing JSON summary")?;
        writeln!(out)?;
    } else {
        let secs = s.elapsed_ms as f64 / 1000.0;
        let mbit = if secs > 0.0 {
            s.bytes as f64 * 8.0 / secs / 1e6
        } else {
            0.0
        };
        writeln!(
            out,
            "run {run_no}: {} ok, {} failed, {} interrupted, {} connections failed, \
             {} body bytes in {:.2} s ({mbit:.1} Mbit/s)",
            s.requests_ok,
            s.requests_failed,
            s.requests_interrupted,
            s.connections_failed,
            s.bytes,
            secs
        )?;
    }
    out.flush()?;
    Ok(())
}
