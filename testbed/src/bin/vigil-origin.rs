//! `vigil-origin`: the HLS origin used by Vigil's tests and demo.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use vigil_testbed::origin::{Origin, OriginConfig};

/// Serves HLS over HTTP/1.1 for Vigil's tests, demo and benchmarks.
///
/// Routes: GET /live/{stream}/index.m3u8 (a media playlist of --segments
/// 4-second entries) and GET /live/{stream}/segN.ts (--segment-bytes of
/// deterministic bytes). Any stream name of [A-Za-z0-9_-] works. Requests
/// carrying a W3C `traceparent` get one back with the same trace id and a new
/// span id, so Vigil's per-connection findings can be joined with traces.
///
/// Each of --workers threads owns its own SO_REUSEPORT listener and accept
/// queue (--backlog deep), like a multi-worker nginx. Once every listener is
/// bound, one line is printed to stdout:
///
///   vigil-origin listening on ADDR workers=N pid=PID
///
/// The process stops cleanly (exit 0) on SIGTERM or SIGINT, when its parent
/// dies, or after --max-seconds.
///
/// Example: vigil-origin --listen 198.18.1.1:8080 --workers 4 --backlog 16
///
/// A fixed capacity for overload tests: --slots-per-worker 16 --service-ms
/// 100 serves at most 160 connections per second per worker.
#[derive(Debug, Parser)]
#[command(name = "vigil-origin", version, verbatim_doc_comment)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Accept threads, each with its own SO_REUSEPORT listening socket.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Size of every segN.ts response in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    segment_bytes: usize,
    /// Number of segments in the playlist (seg0.ts .. seg{N-1}.ts).
    #[arg(long, default_value_t = 10)]
    segments: u32,
    /// listen(2) backlog per worker; small values make accept-queue
    /// overflows (TcpExt ListenOverflows) easy to provoke.
    #[arg(long, default_value_t = 1024)]
    backlog: i32,
    /// Connections each worker serves at once; beyond them it stops
    /// accepting and its accept queue fills, as a server out of slots.
    #[arg(long, default_value_t = vigil_testbed::origin::MAX_CONNECTIONS_PER_WORKER)]
    slots_per_worker: usize,
    /// Milliseconds each request takes before its response (the origin's
    /// own work). With --slots-per-worker it fixes the capacity: workers x
    /// slots / service connections per second.
    #[arg(long, default_value_t = 0)]
    service_ms: u64,
    /// Exit by itself after this many seconds, so a forgotten origin does
    /// not run forever.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
}

fn main() -> ExitCode {
    vigil_testbed::init_logging();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-origin: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    vigil_testbed::die_with_parent()?;
    // Block the stop signals before any thread starts so every thread
    // inherits the mask and only the sigwait thread below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;

    let cfg = OriginConfig {
        listen: args.listen,
        workers: args.workers,
        segment_bytes: args.segment_bytes,
        segments: args.segments,
        backlog: args.backlog,
        slots_per_worker: args.slots_per_worker,
        service: Duration::from_millis(args.service_ms),
    };
    let origin = Origin::bind(cfg)?;
    let stop = Arc::new(AtomicBool::new(false));

    let signal_stop = Arc::clone(&stop);
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!(signal = %sig, "stopping");
            }
            signal_stop.store(true, Ordering::SeqCst);
        })
        .context("spawning signal thread")?;

    let timer_stop = Arc::clone(&stop);
    let max = Duration::from_secs(args.max_seconds);
    let deadline = Instant::now()
        .checked_add(max)
        .with_context(|| format!("--max-seconds {} is too large", args.max_seconds))?;
    thread::Builder::new()
        .name("max-seconds".into())
        .spawn(move || {
            while !timer_stop.load(Ordering::SeqCst) {
                if Instant::now() >= deadline {
                    tracing::info!(seconds = max.as_secs(), "--max-seconds reached, stopping");
                    timer_stop.store(true, Ordering::SeqCst);
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
        .context("spawning timer thread")?;

    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "vigil-origin listening on {} workers={} pid={}",
            origin.local_addr(),
            args.workers,
            std::process::id()
        )?;
        out.flush()?;
    }
    origin.run(stop)
}
