//! `cargo xtask demo`: the agent on this node, with its embedded defaults,
//! watching a testbed video origin that serves players through a lossy link.
//! Every 10 s it prints the agent's retransmit total for the origin's network
//! namespace next to the kernel's own counter. The origin runs as four
//! worker processes sharing one SO_REUSEPORT port in a cgroup of the demo's,
//! which the agent may act on (`--actuation enforce --act-on cgroup:...`):
//! every minute one worker is stopped for 20 s, and the demo prints what
//! the agent decided (steer away, restore) and how many workers take new
//! connections. Stops by itself after `--duration-secs`, or on Ctrl-C;
//! everything it created is removed.

use std::{
    net::SocketAddr,
    path::Path,
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
    prom::{metric_sum, query, scrape},
};

use vigil_testbed::origin::DEFAULT_PORT as ORIGIN_PORT;
/// The agent's default agent.query_socket (the demo runs it with its
/// embedded defaults).
const AGENT_QUERY_SOCKET: &str = "/run/vigil-agent/query.sock";
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
    let cgroup = crate::cgroup::OwnCgroup::create(DEMO_CGROUP)?;
    let workers: Vec<(ChildGuard, u32)> = (0..DEMO_WORKERS)
        .map(|_| {
            let cmd = link.server.command(bin.join("vigil-origin"));
            spawn_origin(
                &mut cgroup.command(&cmd),
                origin_addr,
                1,
                args.duration_secs + 30,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let _resume = ResumeOnDrop(workers.iter().map(|(_, pid)| *pid).collect());

    // Embedded defaults; the demo chooses the metrics address and lets the
    // agent act on the origin's workers (acting is opt-in).
    let agent = ChildGuard::spawn(Command::new(bin.join("vigil")).args([
        "agent",
        "--metrics-addr",
        &args.metrics_addr.to_string(),
        "--actuation",
        "enforce",
        "--act-on",
        &cgroup.selector(),
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
    let joins = Arc::new(Joins::default());
    let _joiner = {
        let (joins, stop) = (joins.clone(), stop.clone());
        link.client.spawn_thread(move || {
            viewers_joining(origin_addr, &joins, &stop);
            Ok(())
        })?
    };
    let started = Instant::now();
    let mut next_report = Duration::from_secs(10);
    let mut stall = Stall::new(workers[0].1);
    let mut decisions_shown = 0;
    while !stop.load(Ordering::Relaxed)
        && started.elapsed() < Duration::from_secs(args.duration_secs)
    {
        thread::sleep(Duration::from_millis(200));
        stall.tick(started.elapsed());
        decisions_shown = show_decisions(decisions_shown);
        if started.elapsed() >= next_report {
            next_report += Duration::from_secs(10);
            let kernel = retrans_segs(&link)?.saturating_sub(baseline);
            match scrape(args.metrics_addr) {
                Ok(text) => eprintln!(
                    "demo: retransmitted segments in the origin's namespace: vigil {} / kernel RetransSegs {kernel}; new viewers in the last 10 s: {}",
                    metric_sum(&text, "vigil_tcp_retransmitted_segments_total", &[("netns", &netns)]),
                    joins.take()
                ),
                Err(e) => eprintln!("demo: agent not answering yet: {e}"),
            }
        }
    }
    eprintln!("demo: stopping (agent, players, origin, namespaces)");
    Ok(())
}

/// Worker processes of the demo's origin (one SO_REUSEPORT listener each).
const DEMO_WORKERS: usize = 4;
const DEMO_CGROUP: &str = "vigil-demo-origin";
/// Every minute, from 30 s in, one worker is stopped for this long.
const STALL_EVERY: Duration = Duration::from_secs(60);
const STALL_FOR: Duration = Duration::from_secs(20);

/// SIGCONT to every worker, so none is left stopped (its guard's SIGTERM
/// would wait).
struct ResumeOnDrop(Vec<u32>);

impl Drop for ResumeOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
}

/// Stops one worker for `STALL_FOR` every `STALL_EVERY`, saying so.
struct Stall {
    pid: u32,
    stopped: bool,
}

impl Stall {
    fn new(pid: u32) -> Stall {
        Stall {
            pid,
            stopped: false,
        }
    }

    fn tick(&mut self, elapsed: Duration) {
        let phase = (elapsed + STALL_EVERY / 2).as_secs() % STALL_EVERY.as_secs();
        let want_stopped = elapsed > STALL_EVERY / 2 && phase < STALL_FOR.as_secs();
        if want_stopped == self.stopped {
            return;
        }
        let (signal, what) = if want_stopped {
            (
                nix::sys::signal::Signal::SIGSTOP,
                "stopped (SIGSTOP): it no longer accepts",
            )
        } else {
            (nix::sys::signal::Signal::SIGCONT, "resumed (SIGCONT)")
        };
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal).is_ok() {
            self.stopped = want_stopped;
            eprintln!("demo: origin worker {} {what}", self.pid);
        }
    }
}

/// New viewers joining, counted per report: answered within `JOIN_TIMEOUT`
/// or stuck (a stopped worker's accept queue, unless Vigil steers).
#[derive(Default)]
struct Joins {
    answered: std::sync::atomic::AtomicU64,
    stuck: std::sync::atomic::AtomicU64,
}

impl Joins {
    /// "N joined, M stuck" since the last call.
    fn take(&self) -> String {
        let answered = self.answered.swap(0, Ordering::Relaxed);
        let stuck = self.stuck.swap(0, Ordering::Relaxed);
        format!("{} joined, {stuck} stuck", answered + stuck)
    }
}

const JOIN_EVERY: Duration = Duration::from_millis(50);
const JOIN_TIMEOUT: Duration = Duration::from_millis(500);

/// A new connection every `JOIN_EVERY` asking for the playlist (run in the
/// players' namespace), until `stop`.
fn viewers_joining(origin: SocketAddr, joins: &Joins, stop: &AtomicBool) {
    use std::io::{Read, Write};
    while !stop.load(Ordering::Relaxed) {
        let answered = std::net::TcpStream::connect_timeout(&origin, JOIN_TIMEOUT)
            .and_then(|mut s| {
                s.set_read_timeout(Some(JOIN_TIMEOUT))?;
                s.write_all(b"GET /live/demo/index.m3u8 HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")?;
                let mut head = [0u8; 64];
                s.read(&mut head).map(|n| n > 0)
            })
            .unwrap_or(false);
        let counter = if answered {
            &joins.answered
        } else {
            &joins.stuck
        };
        counter.fetch_add(1, Ordering::Relaxed);
        thread::sleep(JOIN_EVERY);
    }
}

/// Prints the agent's acting decisions after the first `shown`; returns how
/// many it has shown.
fn show_decisions(shown: usize) -> usize {
    let Ok((_, body)) = query(Path::new(AGENT_QUERY_SOCKET), "/v1/actuation") else {
        return shown;
    };
    let view: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let decisions = view["decisions"].as_array().cloned().unwrap_or_default();
    for d in decisions.iter().skip(shown) {
        eprintln!(
            "demo: vigil {} {}: {} ({} -> {})",
            d["action"].as_str().unwrap_or("?"),
            d["member"].as_str().unwrap_or(""),
            d["signal"].as_str().unwrap_or(""),
            d["before"].as_str().unwrap_or(""),
            d["after"].as_str().unwrap_or("")
        );
    }
    decisions.len().max(shown)
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
