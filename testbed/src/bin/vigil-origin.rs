//! `vigil-origin`: the HLS origin used by Vigil's tests and demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use vigil_control::v1::Bounds;
use vigil_testbed::control_client::{self, parse_bounds, ControlConfig};
use vigil_testbed::origin::{Origin, OriginConfig};
use vigil_testbed::pool::PoolConfig;

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
/// With --upstream ADDR (another vigil-origin), GET /upstream/{stream}/segN.ts
/// is fetched from ADDR's /live/{stream}/segN.ts through a keep-alive pool
/// (--pool-max-idle, --pool-max-open) and relayed with the same body; the
/// upstream's 404 is relayed, any other failure is a 502. The traceparent we
/// answer with is sent upstream as the parent. With --concurrency-limit N,
/// requests in flight beyond N are answered 503 at once.
///
/// With --control-socket PATH the origin is a client of Vigil's control API:
/// it registers its pool (--pool-name), listeners and concurrency limit with
/// their bounds, reports its load every control period and applies targets:
/// BINDING ones always, ADVISORY ones only with --apply-advice, each clamped
/// to the origin's bounds. Each target field received prints one line:
///
///   vigil-origin target generation=G mode=MODE applied=BOOL FIELDS reason="R"
///
/// MODE is binding, advisory or unspecified; BOOL is true or false; FIELDS is
/// one of
///   pool=NAME max_idle=N max_open=M
///   listeners=N
///   concurrency_limit=N
///   listen_backlog=N      (applies to listeners created afterwards)
/// and R is the agent's reason, quoted with \" \\ \n escapes. With
/// applied=true the numbers are those now in force (the target's, clamped);
/// with applied=false, the target's as sent. When the agent is unreachable
/// the origin serves with its current settings and registers again every
/// few seconds.
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
    /// Another origin (ip:port) that /upstream/... requests are relayed to.
    #[arg(long)]
    upstream: Option<SocketAddr>,
    /// Idle connections the upstream pool keeps (Go: MaxIdleConnsPerHost).
    #[arg(long, default_value_t = PoolConfig::default().max_idle)]
    pool_max_idle: u32,
    /// Connections the upstream pool opens at most, 0: unlimited (Go:
    /// MaxConnsPerHost); beyond them requests wait up to 5 s.
    #[arg(long, default_value_t = PoolConfig::default().max_open)]
    pool_max_open: u32,
    /// Requests in flight at most; beyond them 503 at once. 0: no limit.
    #[arg(long, default_value_t = 0)]
    concurrency_limit: u32,
    /// The Vigil agent's control API socket; unset: no control client.
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// The upstream pool's name in the control API ([A-Za-z0-9._-]{1,64}).
    #[arg(long, default_value = "upstream", value_parser = parse_pool_name)]
    pool_name: String,
    /// Where a target may put the pool's max_idle (MIN:MAX; MAX 0: no advice).
    #[arg(long, default_value = "0:64", value_parser = parse_bounds)]
    pool_idle_bounds: Bounds,
    /// Where a target may put the pool's max_open (MIN:MAX; MAX 0: no advice).
    #[arg(long, default_value = "1:256", value_parser = parse_bounds)]
    pool_open_bounds: Bounds,
    /// Where a target may put the number of listeners (MIN:MAX, MAX 0: no
    /// advice; at most 256 are ever run).
    #[arg(long, default_value = "1:16", value_parser = parse_bounds)]
    listener_bounds: Bounds,
    /// Where a target may put the concurrency limit (MIN:MAX; MAX 0: no advice).
    #[arg(long, default_value = "1:4096", value_parser = parse_bounds)]
    concurrency_bounds: Bounds,
    /// Apply ADVISORY targets too, not only BINDING ones.
    #[arg(long)]
    apply_advice: bool,
}

fn parse_pool_name(s: &str) -> Result<String, String> {
    if control_client::valid_pool_name(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not [A-Za-z0-9._-]{{1,64}}"))
    }
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
        upstream: args.upstream,
        pool: PoolConfig {
            max_idle: args.pool_max_idle,
            max_open: args.pool_max_open,
            ..PoolConfig::default()
        },
        concurrency_limit: args.concurrency_limit,
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
    // After the line above, so target lines always follow it.
    if let Some(socket) = args.control_socket {
        let cfg = ControlConfig {
            socket,
            pool_name: args.pool_name,
            idle_bounds: args.pool_idle_bounds,
            open_bounds: args.pool_open_bounds,
            listener_bounds: args.listener_bounds,
            concurrency_bounds: args.concurrency_bounds,
            apply_advice: args.apply_advice,
        };
        // Not joined: it ends with the process, whatever it is waiting on.
        control_client::spawn(cfg, origin.handle(), Arc::clone(&stop))?;
    }
    origin.run(stop)
}
