//! Test bed for Vigil: an HLS origin ([`origin`]), load generators
//! ([`loadgen`]: players; [`connload`]: an open-loop stream of new
//! connections) and test hosts built from network namespaces ([`netns`]).
//! The origin relays to an upstream through a keep-alive [`pool`].
//!
//! The binaries `vigil-origin` and `vigil-loadgen` are thin wrappers around
//! these modules; tests may also run them in-process.

pub mod connload;
pub mod control_client;
pub mod http;
pub mod loadgen;
pub mod netns;
pub mod origin;
pub mod pool;
pub mod pool_episode;
pub mod prom;
pub mod samples;
pub mod tracecontext;

/// Asks the kernel to send SIGTERM when the parent dies, so servers and load
/// started by a test or demo never outlive it. Note the "parent" is the
/// spawning *thread*: spawn from a thread that lives as long as the child.
pub fn die_with_parent() -> anyhow::Result<()> {
    use anyhow::Context;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .context("prctl(PR_SET_PDEATHSIG)")
}

/// Logs to stderr (stdout carries the binaries' machine-readable output),
/// filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
