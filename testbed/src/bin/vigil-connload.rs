//! `vigil-connload`: an open-loop load of new connections.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use vigil_testbed::connload::{self, ConnLoadConfig, ConnSummary};

/// Opens new connections at a fixed rate, whatever the server does (open
/// loop: viewers arrive whether or not the origin keeps up), each asking
/// for one response with `Connection: close`.
///
/// Prints one JSON line: the summary of the connections scheduled after
/// --warmup-secs (offered, answered, refused, timed_out, latency
/// percentiles, and within_slo with --slo-ms). Latency counts from each
/// connection's scheduled start.
///
/// Outcomes: answered (a 200 read to its end), refused (connect() failed
/// at once: an RST to the SYN), timed_out (not answered within
/// --timeout-ms), failed, skipped (more than 30000 in flight).
///
/// Example: vigil-connload --target 127.0.0.1:8080 --rate 2000 --duration-secs 10 --slo-ms 200
#[derive(Debug, Parser)]
#[command(name = "vigil-connload", version, verbatim_doc_comment)]
struct Args {
    /// Server address (IP:PORT).
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// New connections per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Length of the schedule, seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Give up on a connection this long after its scheduled start.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,
    /// Request path.
    #[arg(long, default_value = "/live/demo/seg0.ts")]
    path: String,
    /// Count answered connections within this latency (goodput).
    #[arg(long)]
    slo_ms: Option<u64>,
    /// Leave the connections scheduled in the first seconds out of the summary.
    #[arg(long, default_value_t = 0.0)]
    warmup_secs: f64,
    /// Measure the server's capacity instead: this many clients, each
    /// opening one connection after another for --duration-secs; prints
    /// {"capacity_per_sec": N}. --rate is ignored.
    #[arg(long, value_name = "CLIENTS")]
    capacity: Option<usize>,
}

fn main() -> ExitCode {
    vigil_testbed::init_logging();
    let args = Args::parse();
    let Ok(duration) = Duration::try_from_secs_f64(args.duration_secs) else {
        eprintln!("vigil-connload: error: --duration-secs must be a positive number of seconds");
        return ExitCode::FAILURE;
    };
    if let Some(clients) = args.capacity {
        return match connload::capacity(args.target, clients, duration, &args.path) {
            Ok(c) => {
                println!("{{\"capacity_per_sec\":{c:.1}}}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vigil-connload: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = ConnLoadConfig {
        target: args.target,
        rate: args.rate,
        duration,
        timeout: Duration::from_millis(args.timeout_ms),
        path: args.path,
    };
    match connload::run(&cfg) {
        Ok(records) => {
            let summary = ConnSummary::of(
                &records,
                args.warmup_secs,
                duration.as_secs_f64(),
                args.slo_ms.map(Duration::from_millis),
            );
            match serde_json::to_string(&summary) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vigil-connload: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("vigil-connload: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
