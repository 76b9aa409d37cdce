//! One episode of an upstream going lossy and recovering, with a
//! `vigil-origin` sizing its upstream pool from the agent's targets: the
//! test of the pool controllers (integration-tests/tests/control_targets.rs)
//! and their benchmark (`cargo xtask bench --pools-only`) run the same one.
//!
//! Topology: the upstream origin in a link pair's server namespace; the
//! fronting origin, a client of the control API in the cgroup the agent
//! enforces, in the client namespace, relaying `/upstream/...` through its
//! pool; an open loop of viewers (new connections at a fixed rate) in the
//! client namespace too. Loss is dropped on arrival in both directions (the
//! client's input from the upstream port, the server's input to it), so
//! each side sees genuine loss and retransmits.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};

use crate::{
    connload::{self, ConnLoadConfig, ConnRecord},
    netns::{in_cgroup, spawn_origin, ChildGuard, LinkPair},
};

const UPSTREAM_PORT: u16 = 8090;
const ORIGIN_PORT: u16 = 8081;
const SERVER_LOSS_TABLE: &str = "vigil_episode_loss";
/// The agent's default `actuation.control_period_ms`, which the episode uses.
pub const CONTROL_PERIOD: Duration = Duration::from_secs(1);
/// The fronting origin's pool before any target, and the bounds it declares.
pub const INITIAL_IDLE: u32 = 4;
pub const IDLE_BOUNDS: (u32, u32) = (2, 64);
pub const OPEN_BOUNDS: (u32, u32) = (4, 128);

pub struct EpisodeConfig {
    pub agent_bin: PathBuf,
    pub origin_bin: PathBuf,
    /// `--pool-controller`: `kernel` or `classic`.
    pub law: String,
    /// The cgroup the fronting origin runs in, and the selector naming it.
    pub cgroup_procs: PathBuf,
    pub selector: String,
    pub link_tag: String,
    pub link_index: u8,
    pub socket: PathBuf,
    /// Viewers per second.
    pub rate: u32,
    pub loss_percent: u8,
    pub baseline: Duration,
    pub lossy: Duration,
    pub recovery: Duration,
}

/// A pool target the fronting origin applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// Since the load began.
    pub at: Duration,
    pub max_idle: u32,
    pub max_open: u32,
    pub reason: String,
}

#[derive(Debug)]
pub struct Episode {
    pub onset: Duration,
    pub recovery: Duration,
    pub applied: Vec<Applied>,
    pub records: Vec<ConnRecord>,
    /// Connections the upstream accepted during the load (its namespace's
    /// Tcp PassiveOpens): the pool's churn.
    pub upstream_opens: u64,
    pub control_period: Duration,
}

impl Episode {
    /// The pool's max idle in force at `t`.
    pub fn idle_at(&self, t: Duration) -> u32 {
        self.applied
            .iter()
            .take_while(|a| a.at <= t)
            .last()
            .map_or(INITIAL_IDLE, |a| a.max_idle)
    }

    /// The first change after `t` that moved max idle in the given direction
    /// from its value at `t`.
    pub fn first_change_after(&self, t: Duration, grow: bool) -> Option<&Applied> {
        let before = self.idle_at(t);
        self.applied.iter().find(|a| {
            a.at > t
                && if grow {
                    a.max_idle > before
                } else {
                    a.max_idle < before
                }
        })
    }

    /// The viewers that started in [from, to).
    pub fn summary(&self, from: Duration, to: Duration) -> connload::ConnSummary {
        connload::ConnSummary::of(&self.records, from.as_secs_f64(), to.as_secs_f64(), None)
    }

    /// Changes of the pool's setting (each one closes or opens connections).
    pub fn changes(&self) -> usize {
        self.applied.len()
    }
}

/// `vigil-origin target ... applied=true pool=NAME max_idle=N max_open=M reason="R"`.
pub fn parse_applied_pool(line: &str) -> Option<(u32, u32, String)> {
    let rest = line.strip_prefix("vigil-origin target ")?;
    let (fields, reason) = rest.split_once(" reason=").unwrap_or((rest, ""));
    let get = |key: &str| {
        fields
            .split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
    };
    if get("applied") != Some("true") {
        return None;
    }
    get("pool")?;
    Some((
        get("max_idle")?.parse().ok()?,
        get("max_open")?.parse().ok()?,
        reason.trim_matches('"').to_owned(),
    ))
}

/// Drops `percent`% of TCP packets to the upstream port as they arrive in
/// the server namespace (0 removes the rule): the other half of the loss.
fn set_server_loss(link: &LinkPair, percent: u8) -> anyhow::Result<()> {
    let mut script =
        format!("table inet {SERVER_LOSS_TABLE}\ndelete table inet {SERVER_LOSS_TABLE}\n");
    if percent > 0 {
        script.push_str(&format!(
            "table inet {SERVER_LOSS_TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp dport {UPSTREAM_PORT} numgen random mod 100 < {percent} drop\n  }}\n}}\n"
        ));
    }
    let file = std::env::temp_dir().join(format!("{SERVER_LOSS_TABLE}-{}.nft", std::process::id()));
    std::fs::write(&file, script)?;
    let path = file.display().to_string();
    let result = link.server.run(&["nft", "-f", &path]);
    let _ = std::fs::remove_file(&file);
    result.map(|_| ())
}

fn set_loss(link: &LinkPair, percent: u8) -> anyhow::Result<()> {
    link.set_loss(UPSTREAM_PORT, percent)?;
    set_server_loss(link, percent)
}

fn passive_opens(link: &LinkPair) -> anyhow::Result<u64> {
    link.server
        .mib()?
        .get("Tcp", "PassiveOpens")
        .ok_or_else(|| anyhow!("no Tcp PassiveOpens in the server namespace"))
}

pub fn run(cfg: &EpisodeConfig) -> anyhow::Result<Episode> {
    if cfg.loss_percent == 0 || cfg.loss_percent >= 100 {
        bail!("loss must be 1..=99%, got {}", cfg.loss_percent);
    }
    let link = LinkPair::create(&cfg.link_tag, cfg.link_index)?;
    let upstream = SocketAddr::new(link.server_addr(false), UPSTREAM_PORT);
    let front_addr = SocketAddr::new(link.client_addr(false), ORIGIN_PORT);
    let seconds = (cfg.baseline + cfg.lossy + cfg.recovery).as_secs() + 60;

    let mut up = link.server.command(&cfg.origin_bin);
    up.args(["--segment-bytes", "65536", "--service-ms", "20"])
        .stderr(Stdio::null());
    let (_upstream, _) = spawn_origin(&mut up, upstream, 2, seconds)?;

    let mut agent = Command::new(&cfg.agent_bin);
    agent
        .args([
            "agent",
            "--metrics-addr",
            "127.0.0.1:0",
            "--actuation",
            "enforce",
        ])
        .args(["--act-on", &cfg.selector, "--pool-controller", &cfg.law])
        .arg("--control-socket")
        .arg(&cfg.socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = ChildGuard::spawn(&mut agent)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cfg.socket.exists() {
        if Instant::now() > deadline {
            bail!(
                "the agent did not create {} within 30 s",
                cfg.socket.display()
            );
        }
        if agent.try_wait()?.is_some() {
            bail!("the agent exited before serving the control API");
        }
        thread::sleep(Duration::from_millis(100));
    }

    let idle = format!("{}:{}", IDLE_BOUNDS.0, IDLE_BOUNDS.1);
    let open = format!("{}:{}", OPEN_BOUNDS.0, OPEN_BOUNDS.1);
    let mut front_cmd = link.client.command(&cfg.origin_bin);
    front_cmd
        .arg("--upstream")
        .arg(upstream.to_string())
        .args(["--pool-max-idle", &INITIAL_IDLE.to_string()])
        .args(["--pool-max-open", &(2 * INITIAL_IDLE).to_string()])
        .args(["--pool-idle-bounds", &idle, "--pool-open-bounds", &open])
        .args(["--listener-bounds", "0:0", "--concurrency-bounds", "0:0"])
        .arg("--control-socket")
        .arg(&cfg.socket);
    let mut front_cmd = in_cgroup(&cfg.cgroup_procs, &front_cmd);
    front_cmd.stderr(Stdio::null());
    let (mut front, _) = spawn_origin(&mut front_cmd, front_addr, 2, seconds)?;
    let stdout = front
        .child_mut()
        .stdout
        .take()
        .context("the origin's stdout")?;
    let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(mut l) = sink.lock() {
                l.push((Instant::now(), line));
            }
        }
    });
    // Registration, and the first report period, before the load.
    thread::sleep(Duration::from_millis(1500));

    let opens_before = passive_opens(&link)?;
    let started = Instant::now();
    let load_cfg = ConnLoadConfig {
        target: front_addr,
        rate: cfg.rate,
        duration: cfg.baseline + cfg.lossy + cfg.recovery,
        timeout: Duration::from_secs(5),
        path: "/upstream/episode/seg0.ts".into(),
    };
    let load = link.client.spawn_thread(move || connload::run(&load_cfg))?;
    thread::sleep(cfg.baseline);
    let onset = started.elapsed();
    let lossy = set_loss(&link, cfg.loss_percent);
    if lossy.is_ok() {
        thread::sleep(cfg.lossy);
    }
    let recovery = started.elapsed();
    let cleared = set_loss(&link, 0);
    lossy?;
    cleared?;
    let records = load
        .join()
        .map_err(|_| anyhow!("the load thread panicked"))??;
    let upstream_opens = passive_opens(&link)?.saturating_sub(opens_before);
    let _ = front.terminate(Duration::from_secs(5));
    let _ = agent.terminate(Duration::from_secs(10));
    let applied = lines
        .lock()
        .map_err(|_| anyhow!("origin output lock poisoned"))?
        .iter()
        .filter_map(|(t, l)| {
            let (max_idle, max_open, reason) = parse_applied_pool(l)?;
            Some(Applied {
                at: t.saturating_duration_since(started),
                max_idle,
                max_open,
                reason,
            })
        })
        .collect();
    Ok(Episode {
        onset,
        recovery,
        applied,
        records,
        upstream_opens,
        control_period: CONTROL_PERIOD,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_origins_applied_pool_lines() {
        let line = r#"vigil-origin target generation=3 mode=binding applied=true pool=upstream max_idle=8 max_open=16 reason="100 requests/s need 13""#;
        assert_eq!(
            parse_applied_pool(line),
            Some((8, 16, "100 requests/s need 13".into()))
        );
        let advisory = line.replace("applied=true", "applied=false");
        assert_eq!(parse_applied_pool(&advisory), None);
        let listeners =
            r#"vigil-origin target generation=3 mode=binding applied=true listeners=3 reason="x""#;
        assert_eq!(parse_applied_pool(listeners), None);
    }
}
