//! `cargo xtask demo`: the agent on this node, with its embedded defaults,
//! watching a testbed video origin that serves players through a lossy link.
//! Every 10 s it prints the agent's retransmit total for the origin's network
//! namespace next to the kernel's own counter. Stops by itself after
//! `--duration-secs`, or on Ctrl-C; everything it created is removed.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use vigil_testbed::{
    netns::{loadgen_command, spawn_origin, ChildGuard, LinkPair},
    prom::{metric_sum, scrape},
};

use vigil_testbed::origin::DEFAULT_PORT as ORIGIN_PORT;
/// Subnet index of the demo's link pair (198.18.201.0/24), apart from the tests' indices.
const DEMO_LINK_INDEX: u8 = 201;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How long the demo runs before stopping by itself.
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// Packet loss from the origin to the players, in percent.
    #[arg(long, default_value_t = 2)]
    loss_percent: u8,
    /// Where the agent serves Prometheus metrics.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Concurrent player connections.
    #[arg(long, default_value_t = 8)]
    players: u32,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    let bin = crate::build(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let flag = stop.clone();
        // Both the demo and its children see Ctrl-C; the demo only has to stop waiting.
        ctrlc_flag(signal, flag)?;
    }

    let link = LinkPair::create("demo", DEMO_LINK_INDEX)?;
    link.set_loss(ORIGIN_PORT, args.loss_percent)?;
    let origin_addr = SocketAddr::new(link.server_addr(false), ORIGIN_PORT);
    let (_origin, _) = spawn_origin(
        &mut link.server.command(bin.join("vigil-origin")),
        origin_addr,
        4,
        args.duration_secs + 30,
    )?;

    // Embedded defaults; only the metrics address is the demo's to choose.
    let agent = ChildGuard::spawn(Command::new(bin.join("vigil")).args([
        "agent",
        "--metrics-addr",
        &args.metrics_addr.to_string(),
    ]))?;
    // The comparison starts once the agent is attached, and the players after it.
    let ready_by = Instant::now() + Duration::from_secs(30);
    while scrape(args.metrics_addr).is_err() {
        if Instant::now() > ready_by || stop.load(Ordering::Relaxed) {
            anyhow::bail!("the agent did not come up within 30 s (see its log above)");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let netns = link.server.inode()?.to_string();
    let baseline = retrans_segs(&link)?;
    let _players = ChildGuard::spawn(
        loadgen_command(
            &link.client,
            &bin.join("vigil-loadgen"),
            origin_addr,
            args.players,
            30,
            30.0,
        )
        .args([
            "--repeat-until-secs",
            &args.duration_secs.to_string(),
            "--pause-ms",
            "500",
        ])
        .stdout(Stdio::null()),
    )?;

    eprintln!(
        "\ndemo: origin {origin_addr} (netns {netns}) serving {} players through {}% loss; agent pid {}",
        args.players,
        args.loss_percent,
        agent.pid()
    );
    eprintln!(
        "demo: metrics at http://{}/metrics — Ctrl-C stops the demo\n",
        args.metrics_addr
    );
    let started = Instant::now();
    let mut next_report = Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed)
        && started.elapsed() < Duration::from_secs(args.duration_secs)
    {
        thread::sleep(Duration::from_millis(200));
        if started.elapsed() >= next_report {
            next_report += Duration::from_secs(10);
            let kernel = retrans_segs(&link)?.saturating_sub(baseline);
            match scrape(args.metrics_addr) {
                Ok(text) => eprintln!(
                    "demo: retransmitted segments in the origin's namespace: vigil {} / kernel RetransSegs {kernel}",
                    metric_sum(&text, "vigil_tcp_retransmitted_segments_total", &[("netns", &netns)])
                ),
                Err(e) => eprintln!("demo: agent not answering yet: {e}"),
            }
        }
    }
    eprintln!("demo: stopping (agent, players, origin, namespaces)");
    Ok(())
}

fn retrans_segs(link: &LinkPair) -> anyhow::Result<u64> {
    link.server
        .mib()?
        .get("Tcp", "RetransSegs")
        .context("Tcp RetransSegs missing")
}

/// Sets `flag` when `signal` arrives (a minimal handler: one atomic store).
fn ctrlc_flag(signal: libc::c_int, flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let _ = FLAG.set(flag);
    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::Relaxed);
        }
    }
    // SAFETY: the handler only performs an atomic store, which is async-signal-safe.
    let previous = unsafe {
        libc::signal(
            signal,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    if previous == libc::SIG_ERR {
        anyhow::bail!("cannot install handler for signal {signal}");
    }
    Ok(())
}
