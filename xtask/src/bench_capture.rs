//! `cargo xtask bench`, capture phase: what the HTTP trace-context capture
//! hooks (`vigil_http_recv` on `tp_btf/sock_recv_length`, `vigil_http_send`
//! on `tp_btf/tcp_sendmsg_locked`) cost.
//!
//! - Kernel cost per run from bpf_stats (`kernel.bpf_stats_enabled`, turned
//!   on by `bench::run`), next to an empty program on the same
//!   hooks at the same time (what bpf_stats reports for doing nothing):
//!   (a) on non-HTTP traffic, a bulk TCP transfer of zeros between the two
//!   namespaces of a link pair: every data packet is checked for a message
//!   start and its socket for capture state, and left alone;
//!   (b) on HTTP traffic, vigil-loadgen against vigil-origin with a
//!   `traceparent` on every request: per run, and per HTTP request (both
//!   programs' time over the requests completed).
//! - Throughput drop of the same HTTP traffic, saturated, with capture
//!   switched on and off every half second inside one run
//!   (`bench_interleaved`): the agent's capture programs running against
//!   paused, and the empty programs against none.
//! - CPU per request at a fixed rate (`bench_paced`) with the agent running
//!   with capture on, with capture on the origin's cgroup only
//!   (`--capture-cgroup`: the load generator's sockets are not captured),
//!   with `--disable-hook` for both hooks (off), and off with the empty
//!   programs on both hooks (the hooks' own price), in rotating order.
//!
//! The origins run in a cgroup of their own below the cgroup v2 root in
//! every mode (created here, removed at the end); the load generator stays in
//! this process's cgroup.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use vigil_testbed::{
    netns::{loadgen_command, spawn_origin, ChildGuard, LinkPair},
    prom::{metric_sum, scrape},
};

use crate::{
    bench::{all_programs, proc_usage, uname, wait_until, BenchArgs},
    bench_interleaved::{self, Drops, Switching, Traffic},
    bench_paced::{machine_busy_secs, PacedRun, PacedWorkload},
    bpf_attach::Attached,
    cgroup::{cgroup2_root, OwnCgroup},
};

pub const SECTION: &str = "## HTTP trace-context capture: cost and throughput";

/// Link pair of this phase: 198.18.90.0/24.
const LINK_INDEX: u8 = 90;
const METRICS_ADDR: &str = "127.0.0.1:19040";
/// In the server namespace: the bulk (non-HTTP) receiver.
const BULK_PORT: u16 = 19082;
/// Keep-alive connections of the load generator.
const CONNECTIONS: u32 = 8;
/// The origins' cgroup, below the cgroup v2 root.
const ORIGIN_CGROUP: &str = "vigil-bench-origin";
const HOOK_IN: &str = "tp_btf/sock_recv_length";
const HOOK_OUT: &str = "tp_btf/tcp_sendmsg_locked";
/// Where messages are read on kernels without `HOOK_IN` and `HOOK_OUT`:
/// disabled with the others when capture is off.
const FALLBACK_HOOKS: [&str; 2] = ["cgroup_skb/ingress", "cgroup_skb/egress"];
const PROG_IN: &str = "vigil_http_recv";
const PROG_OUT: &str = "vigil_http_send";

/// HTTP traffic shapes, each served by its own origin in the server namespace.
struct Workload {
    label: &'static str,
    segment_bytes: usize,
    port: u16,
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        label: "HLS, 1 MiB segments",
        segment_bytes: 1024 * 1024,
        port: 19080,
    },
    Workload {
        label: "small responses, 16 KiB",
        segment_bytes: 16 * 1024,
        port: 19081,
    },
];

/// How the node runs during a throughput run (in `MODES` order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// The agent with every hook.
    On,
    /// The agent with every hook, capture attached to the origins' cgroup
    /// only: each request is read where it is served, not where it is sent.
    OriginOnly,
    /// As `OriginOnly`, reading received messages only
    /// (`--capture-received-only`): the origin's responses are not read.
    OriginReceived,
    /// The agent with both capture hooks disabled.
    Off,
    /// As `Off`, plus empty programs where capture attaches: what the hooks
    /// cost before the capture programs do anything.
    Empty,
}

const MODES: [Capture; 5] = [
    Capture::On,
    Capture::OriginOnly,
    Capture::OriginReceived,
    Capture::Off,
    Capture::Empty,
];

impl Capture {
    fn label(self) -> &'static str {
        match self {
            Capture::On => "on",
            Capture::OriginOnly => "on, origin's cgroup only",
            Capture::OriginReceived => "on, origin's cgroup, received only",
            Capture::Off => "off",
            Capture::Empty => "off + empty programs",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The capture programs this mode loads.
    fn programs(self) -> &'static [&'static str] {
        match self {
            Capture::On | Capture::OriginOnly => &[PROG_IN, PROG_OUT],
            Capture::OriginReceived => &[PROG_IN],
            Capture::Off | Capture::Empty => &[],
        }
    }
}

/// A running agent; its stderr goes to `log`.
struct Agent {
    guard: ChildGuard,
    log: PathBuf,
}

impl Agent {
    /// `origin_cgroup`: where capture attaches in the origin-only modes.
    fn start(bin: &Path, capture: Capture, origin_cgroup: &Path) -> anyhow::Result<Agent> {
        let log = std::env::temp_dir().join("vigil-bench-capture-agent.log");
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin.join("vigil"));
        cmd.args(["agent", "--metrics-addr", METRICS_ADDR])
            .stdout(Stdio::null())
            .stderr(stderr);
        match capture {
            Capture::On => {}
            Capture::OriginOnly => {
                cmd.arg("--capture-cgroup").arg(origin_cgroup);
            }
            Capture::OriginReceived => {
                cmd.arg("--capture-cgroup").arg(origin_cgroup);
                cmd.arg("--capture-received-only");
            }
            Capture::Off | Capture::Empty => {
                for hook in [HOOK_IN, HOOK_OUT].into_iter().chain(FALLBACK_HOOKS) {
                    cmd.args(["--disable-hook", hook]);
                }
            }
        }
        // No OTLP export or span receiver: the agent under test only measures.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(key);
            }
        }
        let mut agent = Agent {
            guard: ChildGuard::spawn(&mut cmd)?,
            log,
        };
        let metrics: SocketAddr = METRICS_ADDR.parse()?;
        // The socket iterator is the last program the agent loads.
        let wanted: Vec<&str> = capture
            .programs()
            .iter()
            .copied()
            .chain(["vigil_sock_iter"])
            .collect();
        let mut exited = None;
        let ready = wait_until("the agent", || {
            if let Ok(Some(status)) = agent.guard.try_wait() {
                exited = Some(status);
                return true;
            }
            let names: Vec<String> = agent
                .programs()
                .unwrap_or_default()
                .into_iter()
                .map(|(_, name)| name)
                .collect();
            wanted.iter().all(|w| names.iter().any(|n| n == w)) && scrape(metrics).is_ok()
        });
        if let Some(status) = exited {
            bail!(
                "the agent exited ({status}) while starting; its log: {}",
                agent.log.display()
            );
        }
        ready.with_context(|| {
            format!(
                "agent with capture {} (expected programs {wanted:?}); its log: {}",
                capture.label(),
                agent.log.display()
            )
        })?;
        let names: Vec<String> = agent.programs()?.into_iter().map(|p| p.1).collect();
        let extra: Vec<&String> = names
            .iter()
            .filter(|n| {
                (*n == PROG_IN || *n == PROG_OUT) && !capture.programs().contains(&n.as_str())
            })
            .collect();
        if !extra.is_empty() {
            bail!(
                "capture {} left a capture program loaded: {extra:?}",
                capture.label()
            );
        }
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// SIGTERM, and the agent must exit cleanly: every kernel object it
    /// made goes with it.
    fn stop(mut self) -> anyhow::Result<()> {
        let status = self.guard.terminate(Duration::from_secs(60))?;
        if !status.success() {
            bail!(
                "the agent exited with {status} when stopped; its log: {}",
                self.log.display()
            );
        }
        Ok(())
    }

    /// The agent's own programs (id, name), found through its file
    /// descriptors, so another agent on the node is never mistaken for it.
    fn programs(&self) -> anyhow::Result<Vec<(u64, String)>> {
        let ids = prog_ids_of(self.pid())?;
        Ok(all_programs()?
            .into_iter()
            .filter(|(id, _)| ids.contains(id))
            .map(|(id, p)| (id, p.name))
            .collect())
    }

    fn program_id(&self, name: &str) -> anyhow::Result<u64> {
        self.programs()?
            .into_iter()
            .find(|p| p.1 == name)
            .map(|p| p.0)
            .with_context(|| format!("the agent has no program {name}"))
    }

    /// The agent's capture switch (`VIGIL_PAUSE`), found among its own maps.
    fn pause_switch(&self) -> anyhow::Result<PauseSwitch> {
        let ours = bpf_ids_of(self.pid(), "map")?;
        let out = Command::new("bpftool")
            .args(["-j", "map", "show"])
            .output()
            .context("cannot start bpftool")?;
        let maps: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("bpftool map show json")?;
        maps.as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["name"] == "VIGIL_PAUSE")
            .find_map(|m| m["id"].as_u64().filter(|id| ours.contains(id)))
            .map(|id| PauseSwitch { id })
            .context("the agent holds no VIGIL_PAUSE map")
    }
}

/// The capture programs' pause map, written with bpftool as an operator would.
struct PauseSwitch {
    id: u64,
}

impl PauseSwitch {
    fn set(&self, paused: bool) -> anyhow::Result<()> {
        let id = self.id.to_string();
        let value = if paused { "1" } else { "0" };
        let status = Command::new("bpftool")
            .args(["map", "update", "id", &id, "key", "0", "0", "0", "0"])
            .args(["value", value, "0", "0", "0"])
            .status()
            .context("cannot start bpftool")?;
        if !status.success() {
            bail!("bpftool map update id {id} failed: {status}");
        }
        Ok(())
    }
}

/// Ids of the BPF programs process `pid` holds a file descriptor of.
fn prog_ids_of(pid: u32) -> anyhow::Result<Vec<u64>> {
    bpf_ids_of(pid, "prog")
}

/// Ids of the BPF objects of `kind` ("prog", "map") process `pid` holds a
/// file descriptor of.
fn bpf_ids_of(pid: u32, kind: &str) -> anyhow::Result<Vec<u64>> {
    let field = format!("{kind}_id:");
    Ok(bpf_fdinfo(pid, &format!("anon_inode:bpf-{kind}"))?
        .iter()
        .filter_map(|info| fdinfo_field(info, &field))
        .collect())
}

/// The fdinfo text of every file descriptor of process `pid` that is the
/// anonymous inode `inode` (e.g. `anon_inode:bpf_link`).
fn bpf_fdinfo(pid: u32, inode: &str) -> anyhow::Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fd");
    let mut infos = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let entry = entry?;
        // Descriptors close while we look; skip those.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.as_os_str() != inode {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        if let Ok(text) = std::fs::read_to_string(&info) {
            infos.push(text);
        }
    }
    Ok(infos)
}

/// A numeric `name` field (`prog_id:`, ...) of an fdinfo text.
fn fdinfo_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

#[derive(Debug, Default, Clone, Copy)]
struct Cost {
    runs: u64,
    ns: u64,
}

impl Cost {
    fn since(self, earlier: Cost) -> Cost {
        Cost {
            runs: self.runs.saturating_sub(earlier.runs),
            ns: self.ns.saturating_sub(earlier.ns),
        }
    }

    fn per_run(self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.ns as f64 / self.runs as f64
        }
    }
}

/// bpf_stats of the programs `ids`, in that order.
fn costs(ids: &[u64]) -> anyhow::Result<Vec<Cost>> {
    let all = all_programs()?;
    ids.iter()
        .map(|id| {
            all.iter()
                .find(|(i, _)| i == id)
                .map(|(_, p)| Cost {
                    runs: p.runs,
                    ns: p.run_time_ns,
                })
                .with_context(|| format!("BPF program {id} is gone"))
        })
        .collect()
}

/// The four programs measured side by side: capture in/out, empty in/out.
struct Measured {
    ids: [u64; 4],
}

impl Measured {
    fn snapshot(&self) -> anyhow::Result<Vec<Cost>> {
        costs(&self.ids)
    }

    fn delta(&self, before: &[Cost]) -> anyhow::Result<Vec<Cost>> {
        Ok(self
            .snapshot()?
            .into_iter()
            .zip(before)
            .map(|(after, before)| after.since(*before))
            .collect())
    }
}

/// Programs on the cgroup v2 root's inet hooks that are not ours (another
/// agent's capture, say): they run on this traffic too.
fn foreign_cgroup_programs(root: &Path, ours: &[u64]) -> anyhow::Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(root)
        .output()
        .context("cannot start bpftool")?;
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let list: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool cgroup show json")?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_u64().is_some_and(|id| !ours.contains(&id)))
        .map(|p| {
            format!(
                "{} ({})",
                p["name"].as_str().unwrap_or("?"),
                p["attach_type"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

/// A program that does nothing on `sock_recv_length`, where
/// `vigil_http_recv` runs: the floor bpf_stats reports there.
fn empty_recv() -> anyhow::Result<Attached> {
    Attached::empty("vigil_empty_recv", "sock_recv_length")
}

/// A program that does nothing on `tcp_sendmsg_locked`, where
/// `vigil_http_send` runs.
fn empty_send() -> anyhow::Result<Attached> {
    Attached::empty("vigil_empty_send", "tcp_sendmsg_locked")
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns `kernel.bpf_stats_enabled` off (the production setting) until
/// dropped, then on again (`bench::run` restores the setting it found).
struct StatsPaused;

impl StatsPaused {
    fn pause() -> anyhow::Result<StatsPaused> {
        std::fs::write(BPF_STATS, "0").context("disabling bpf_stats")?;
        Ok(StatsPaused)
    }
}

impl Drop for StatsPaused {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, "1");
    }
}

fn join<T>(handle: JoinHandle<anyhow::Result<T>>, what: &str) -> anyhow::Result<T> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("{what} panicked"))?
}

/// Sends zeros from the client namespace to the server's for `secs` over one
/// TCP connection; returns the bytes received. No segment starts with an
/// HTTP method or status line.
fn bulk_transfer(link: &LinkPair, secs: f64) -> anyhow::Result<u64> {
    let addr = SocketAddr::new(link.server_addr(false), BULK_PORT);
    // A socket belongs to the namespace it was created in, whichever thread uses it.
    let listener = join(
        link.server
            .spawn_thread(move || Ok(TcpListener::bind(addr)?))?,
        "bind",
    )
    .with_context(|| format!("listening on {addr} in the server namespace"))?;
    let mut client = join(
        link.client
            .spawn_thread(move || Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?))?,
        "connect",
    )
    .with_context(|| format!("connecting to {addr} from the client namespace"))?;
    let (mut server, _) = listener.accept().context("accepting the bulk connection")?;
    server.set_read_timeout(Some(Duration::from_secs(10)))?;
    let reader = thread::spawn(move || -> anyhow::Result<u64> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            match server.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let chunk = vec![0u8; 64 * 1024];
    let until = Instant::now() + Duration::from_secs_f64(secs);
    client.set_write_timeout(Some(Duration::from_secs(10)))?;
    while Instant::now() < until {
        client.write_all(&chunk).context("bulk send")?;
    }
    client.shutdown(Shutdown::Write)?;
    join(reader, "bulk receiver").context("bulk receive")
}

/// One vigil-loadgen run's summary.
#[derive(Debug, Clone, Copy)]
struct LoadRun {
    ok: u64,
    failed: u64,
    secs: f64,
}

impl LoadRun {
    fn requests_per_sec(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

/// vigil-loadgen against `workload`'s origin for `secs`, with requests
/// enough to outlast that and a traceparent on every one (the default),
/// printing its JSON summary.
fn loadgen(link: &LinkPair, bin: &Path, workload: &Workload, secs: f64) -> Command {
    let target = SocketAddr::new(link.server_addr(false), workload.port);
    let mut cmd = loadgen_command(
        &link.client,
        &bin.join("vigil-loadgen"),
        target,
        CONNECTIONS,
        100_000_000,
        secs,
    );
    cmd.arg("--json");
    cmd
}

/// `rate`: requests per second to pace at; None: as fast as answered.
fn run_loadgen(
    link: &LinkPair,
    bin: &Path,
    workload: &Workload,
    secs: f64,
    rate: Option<u32>,
) -> anyhow::Result<LoadRun> {
    let target = SocketAddr::new(link.server_addr(false), workload.port);
    let mut cmd = loadgen(link, bin, workload, secs);
    if let Some(rate) = rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start vigil-loadgen")?;
    if !out.status.success() {
        bail!("vigil-loadgen against {target} failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("vigil-loadgen printed no JSON summary")?;
    let s: serde_json::Value = serde_json::from_str(line).context("vigil-loadgen JSON")?;
    let field = |name: &str| {
        s[name]
            .as_u64()
            .with_context(|| format!("vigil-loadgen JSON has no {name}"))
    };
    let run = LoadRun {
        ok: field("requests_ok")?,
        failed: field("requests_failed")?,
        secs: field("elapsed_ms")? as f64 / 1000.0,
    };
    if run.ok == 0 || run.secs <= 0.0 {
        bail!("vigil-loadgen completed no request against {target}");
    }
    Ok(run)
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// The 1-minute load average (other work on the machine skews everything here).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Message headers the agent's capture read with a `traceparent` so far.
fn traced(metrics: &str) -> u64 {
    metric_sum(
        metrics,
        "vigil_http_capture_messages_total",
        &[("outcome", "traced")],
    )
}

/// Kernel cost of one kind of traffic: capture and empty programs, both hooks.
struct CostRow {
    traffic: String,
    /// vigil_http_recv, vigil_http_send, empty recv, empty send.
    costs: Vec<Cost>,
}

/// Runs the phase, prints its report and with `--write` puts it in BENCHMARKS.md.
pub fn run(args: &BenchArgs, bin: &Path) -> anyhow::Result<()> {
    let (rounds, secs) = if args.smoke {
        (1, 1.0)
    } else {
        (args.capture_rounds.max(1), args.capture_secs.max(1) as f64)
    };
    let root = cgroup2_root()?;
    let load_at_start = load_average();
    let origin_cgroup = OwnCgroup::create(ORIGIN_CGROUP)?;
    let link = LinkPair::create("benchcap", LINK_INDEX)?;
    let mut origins = Vec::new();
    for w in &WORKLOADS {
        let addr = SocketAddr::new(link.server_addr(false), w.port);
        let mut origin = link.server.command(bin.join("vigil-origin"));
        origin.args(["--segment-bytes", &w.segment_bytes.to_string()]);
        origins.push(spawn_origin(
            &mut origin_cgroup.command(&origin),
            addr,
            2,
            3600,
        )?);
    }
    let mut foreign: Vec<String> = Vec::new();
    let mut note_foreign = |ours: &[u64]| -> anyhow::Result<()> {
        for p in foreign_cgroup_programs(&root, ours)? {
            if !foreign.contains(&p) {
                eprintln!("bench: another program on the cgroup root meanwhile: {p}");
                foreign.push(p);
            }
        }
        Ok(())
    };

    // Kernel cost, capture on, next to the empty programs.
    let agent = Agent::start(bin, Capture::On, &origin_cgroup.dir)?;
    let empty_in = empty_recv().context("empty receive program")?;
    let empty_out = empty_send().context("empty send program")?;
    let measured = Measured {
        ids: [
            agent.program_id(PROG_IN)?,
            agent.program_id(PROG_OUT)?,
            empty_in.id,
            empty_out.id,
        ],
    };
    note_foreign(&measured.ids)?;
    let metrics: SocketAddr = METRICS_ADDR.parse()?;
    let mut rows = Vec::new();
    let before = measured.snapshot()?;
    let bulk_bytes = bulk_transfer(&link, secs)?;
    let bulk = measured.delta(&before)?;
    if bulk[0].runs == 0 || bulk[1].runs == 0 {
        bail!("the capture programs never ran on the bulk transfer; the phase measured nothing");
    }
    rows.push(CostRow {
        traffic: format!(
            "non-HTTP bulk TCP, {:.0} MiB in {secs:.0} s",
            bulk_bytes as f64 / (1024.0 * 1024.0)
        ),
        costs: bulk,
    });
    let mut per_request = Vec::new();
    for w in &WORKLOADS {
        let traced_before = traced(&scrape(metrics)?);
        let before = measured.snapshot()?;
        let load = run_loadgen(&link, bin, w, secs, None)?;
        let delta = measured.delta(&before)?;
        // The counters are read from per-CPU maps when scraped.
        let traced = traced(&scrape(metrics)?).saturating_sub(traced_before);
        if traced == 0 {
            bail!(
                "the capture hooks saw no traceparent in {} requests ({}); capture is broken",
                load.ok,
                w.label
            );
        }
        per_request.push((w.label, load, traced, delta.clone()));
        rows.push(CostRow {
            traffic: format!("HTTP, {}", w.label),
            costs: delta,
        });
    }
    drop(empty_in);
    drop(empty_out);
    drop(agent);
    // Without bpf_stats from here, whose clock reads would add to every run
    // of a program.
    let stats_paused = StatsPaused::pause()?;
    let blocks = if args.smoke {
        2
    } else {
        args.capture_blocks.max(2)
    };
    let (restarted, paused_rows) = interleaved(bin, &link, &origin_cgroup.dir, &origins, blocks)?;

    // Half of what capture on carried: far enough below saturation in every mode.
    let paced_rates: Vec<u32> = per_request
        .iter()
        .map(|(_, load, _, _)| ((load.requests_per_sec() / 2.0) as u32).max(1))
        .collect();
    let mut paced: Vec<[Vec<PacedRun>; MODES.len()]> = WORKLOADS
        .iter()
        .map(|_| std::array::from_fn(|_| Vec::new()))
        .collect();
    // Each mode with its own agent, rotating which goes first.
    for round in 0..rounds as usize {
        for k in 0..MODES.len() {
            let mode = MODES[(round + k) % MODES.len()];
            let agent = Agent::start(bin, mode, &origin_cgroup.dir)?;
            let mut ours: Vec<u64> = agent.programs()?.into_iter().map(|p| p.0).collect();
            let empty = match mode {
                Capture::Empty => Some((empty_recv()?, empty_send()?)),
                Capture::On | Capture::OriginOnly | Capture::OriginReceived | Capture::Off => None,
            };
            if let Some((i, o)) = &empty {
                ours.extend([i.id, o.id]);
            }
            note_foreign(&ours)?;
            // Let the agent's first /proc scan and socket sample pass.
            thread::sleep(Duration::from_secs(1));
            for (i, w) in WORKLOADS.iter().enumerate() {
                let traced_before = traced(&scrape(metrics)?);
                let busy_before = machine_busy_secs()?;
                let cpu_before = proc_usage(agent.pid())?.cpu_seconds;
                let at_rate = run_loadgen(&link, bin, w, secs, Some(paced_rates[i]))?;
                let run = PacedRun {
                    requests: at_rate.ok,
                    busy_secs: machine_busy_secs()? - busy_before,
                    agent_secs: proc_usage(agent.pid())?.cpu_seconds - cpu_before,
                };
                if matches!(mode, Capture::OriginOnly | Capture::OriginReceived) {
                    // The request received at the origin (its response is
                    // answered, unread); none of the client's. In flight at
                    // the time limit: one per connection.
                    let traced = traced(&scrape(metrics)?).saturating_sub(traced_before);
                    let most = at_rate.ok + at_rate.failed + u64::from(CONNECTIONS);
                    if traced == 0 || traced > most {
                        bail!(
                            "capture on the origin's cgroup read {traced} traced headers for {} \
                             requests ({}): expected 1 per request",
                            at_rate.ok,
                            w.label
                        );
                    }
                }
                if at_rate.failed > 0 {
                    bail!(
                        "{} requests failed at {} req/s with capture {} ({})",
                        at_rate.failed,
                        paced_rates[i],
                        mode.label(),
                        w.label
                    );
                }
                eprintln!(
                    "bench: round {} capture {} {} at {} req/s: {:.1} µs CPU per request",
                    round + 1,
                    mode.label(),
                    w.label,
                    paced_rates[i],
                    run.us_per_request()
                );
                paced[i][mode.index()].push(run);
            }
        }
    }
    drop(stats_paused);
    drop(origins);
    drop(link);
    drop(origin_cgroup);
    let load = [load_at_start, load_average()];

    let mut report = render(args, &rows, &per_request, &foreign, &root, load);
    bench_interleaved::render(&mut report, &paused_rows, &restarted);
    let agent_cost = crate::bench_agent::measure(bin, args.smoke)?;
    // What the testbed carried with capture on (in the bpf_stats runs).
    let rates: Vec<(&str, f64)> = per_request
        .iter()
        .map(|(label, load, _, _)| (*label, load.requests_per_sec()))
        .collect();
    let paced: Vec<PacedWorkload> = WORKLOADS
        .iter()
        .zip(paced_rates)
        .zip(paced)
        .map(|((w, rate), modes)| PacedWorkload {
            label: w.label,
            rate,
            modes: MODES
                .iter()
                .map(|m| (m.label(), modes[m.index()].clone()))
                .collect(),
        })
        .collect();
    crate::bench_paced::render(&mut report, secs, &paced, Capture::Off.label());
    crate::bench_agent::render(&mut report, &agent_cost, &rates);
    println!("{SECTION}\n\n{report}");
    if args.write {
        crate::bench::write_section(SECTION, &report)?;
    }
    Ok(())
}

/// Blocks of the measure with the agent restarted at each switch, for
/// workload `i`: all of them for the testbed's default (the first), a
/// quarter for the others (a switch takes about a second).
fn restarted_blocks(i: usize, blocks: u32) -> u32 {
    if i == 0 {
        blocks
    } else {
        (blocks / 4).max(2)
    }
}

/// How capture is measured interleaved: everywhere (both ends of the
/// testbed), and as an origin would run it economically (its cgroup,
/// received messages only).
const INTERLEAVED: [Capture; 2] = [Capture::On, Capture::OriginReceived];

/// Start-up work of a new agent (its first /proc scan and socket sample)
/// happens in this time, with the load held, before the load resumes.
const AGENT_WARM_UP: Duration = Duration::from_millis(500);

/// The interleaved throughput runs (`bench_interleaved`), per capture mode
/// and workload: the agent with capture on against the agent with capture
/// off (restarted at each switch), and one agent's capture programs running
/// against paused.
fn interleaved(
    bin: &Path,
    link: &LinkPair,
    origin_cgroup: &Path,
    origins: &[(ChildGuard, u32)],
    blocks: u32,
) -> anyhow::Result<(Vec<bench_interleaved::Row>, Vec<bench_interleaved::Row>)> {
    // Far longer than the warm-up and the blocks, whatever their switching
    // takes: the run is stopped after the last block, or at a failure.
    let run_secs = (bench_interleaved::INTERVAL * 4 * (blocks + 2)).as_secs_f64() + 3600.0;
    let traffic = |i: usize| -> Traffic<'_> {
        Traffic {
            server_pid: origins[i].1,
            server_if: link.server_if(),
            loadgen: loadgen(link, bin, &WORKLOADS[i], run_secs),
        }
    };
    // Prints a result as it comes (the runs take minutes) and makes its row.
    let row = |w: &Workload,
               mode: Capture,
               measure: &str,
               blocks: u32,
               drops: Drops,
               started: Instant| {
        eprintln!(
            "bench: {} capture {}: {measure} {:.1}% ± {:.1} ({:.0} s)",
            w.label,
            mode.label(),
            100.0 * drops.mean(),
            100.0 * drops.half_width(),
            started.elapsed().as_secs_f64()
        );
        bench_interleaved::Row {
            workload: w.label,
            capture: mode.label(),
            blocks,
            on_vs_off: drops,
        }
    };
    let mut restarted = Vec::new();
    for mode in INTERLEAVED {
        for (i, w) in WORKLOADS.iter().enumerate() {
            let started = Instant::now();
            let n = restarted_blocks(i, blocks);
            let mut running: Option<(bool, Agent)> = None;
            let drops = bench_interleaved::measure(traffic(i), n, Switching::LoadHeld, |on| {
                if running.as_ref().is_some_and(|(state, _)| *state == on) {
                    return Ok(());
                }
                if let Some((_, agent)) = running.take() {
                    agent.stop()?;
                }
                let agent = Agent::start(bin, if on { mode } else { Capture::Off }, origin_cgroup)?;
                thread::sleep(AGENT_WARM_UP);
                running = Some((on, agent));
                Ok(())
            })
            .with_context(|| format!("capture {} on vs off, {}", mode.label(), w.label))?;
            if let Some((_, agent)) = running {
                agent.stop()?;
            }
            restarted.push(row(w, mode, "on vs off", n, drops, started));
        }
    }
    let mut paused = Vec::new();
    for mode in INTERLEAVED {
        let agent = Agent::start(bin, mode, origin_cgroup)?;
        thread::sleep(Duration::from_secs(1));
        let pause = agent.pause_switch()?;
        for (i, w) in WORKLOADS.iter().enumerate() {
            let started = Instant::now();
            let drops =
                bench_interleaved::measure(traffic(i), blocks, Switching::UnderLoad, |on| {
                    pause.set(!on)
                })
                .with_context(|| format!("capture {} on vs paused, {}", mode.label(), w.label))?;
            paused.push(row(w, mode, "on vs paused", blocks, drops, started));
        }
        agent.stop()?;
    }
    Ok((restarted, paused))
}

fn render(
    args: &BenchArgs,
    rows: &[CostRow],
    per_request: &[(&str, LoadRun, u64, Vec<Cost>)],
    foreign: &[String],
    root: &Path,
    load: [String; 2],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "`{PROG_IN}` ({HOOK_IN}) runs at the end of every read-family call (read, recv, \
         readv, recvmsg) on any socket of the node, and `{PROG_OUT}` ({HOOK_OUT}) where an \
         application's write is queued, once per chunk of up to 64 KB (it reads only a \
         write's first chunk: later ones continue it). Both leave at once for what is not a \
         TCP socket in a capture cgroup (the whole node here: {}). Otherwise the socket's \
         capture state is looked up: bytes in the direction of the socket's last HTTP \
         message are that message's body and are not read; else their first 8 bytes, read \
         from the application's buffer, tell whether they start a message. A message start \
         (or a header being continued; a read's file descriptor is checked to name its \
         socket first) has 512 bytes copied and scanned for `traceparent` (a `bpf_loop` step \
         per header line), up to 2 KiB if the header goes on, except a response to a request \
         that carried one: its start is noted and its header left unread; the first message \
         of a trace on a socket is sent to the agent (88 bytes; the socket's endpoints and \
         owner go once per socket). No program runs on any packet. Both ends of the testbed \
         run on this node, so each request is seen written by the client and read by the \
         origin, and each response written by the origin and read by the client. `empty` is \
         a program that does nothing on the same tracepoint at the same time: what bpf_stats \
         reports for doing nothing, the floor under every number. Received only \
         (`--capture-received-only`, `correlate.capture_sent = false`) attaches the read \
         program alone: requests read by servers are read, and a new one is told from the \
         last one's body by the server having written something since.\n",
        root.display()
    );
    let _ = writeln!(
        out,
        "Command: `cargo xtask bench --capture-only --capture-rounds {} --capture-secs {} \
         --capture-blocks {} --write`{}",
        args.capture_rounds,
        args.capture_secs,
        args.capture_blocks,
        if args.smoke {
            " (this was a --smoke run: 1 round of 1 s runs, debug build)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "Kernel: {}; {} CPUs ({}). Traffic crosses a veth pair between two network \
         namespaces, no loss; vigil-loadgen, {CONNECTIONS} keep-alive connections, a \
         `traceparent` on every request; vigil-origin answers with one. Load average \
         (1 min) at start and end: {} and {}.\n",
        uname(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        load[0],
        load[1]
    );
    if !foreign.is_empty() {
        let _ = writeln!(
            out,
            "Other programs were attached to the cgroup root during the run and ran on the \
             same packets: {}. Treat the throughput numbers with care.\n",
            foreign.join(", ")
        );
    }

    let _ = writeln!(out, "### Kernel cost per run (bpf_stats, capture on)\n");
    let _ = writeln!(
        out,
        "A run of {PROG_IN} is one read-family call on a socket (of any kind; one that \
         returned nothing too). A run of {PROG_OUT} is one chunk of a write being queued. \
         Runs include everything else the node did meanwhile.\n"
    );
    let _ = writeln!(
        out,
        "| traffic | program | hook | runs | ns per run | empty, ns per run | capture above empty, ns per run |"
    );
    let _ = writeln!(out, "| --- | --- | --- | ---: | ---: | ---: | ---: |");
    for row in rows {
        for (k, (prog, hook)) in [(PROG_IN, HOOK_IN), (PROG_OUT, HOOK_OUT)]
            .into_iter()
            .enumerate()
        {
            let (cap, empty) = (row.costs[k], row.costs[k + 2]);
            let _ = writeln!(
                out,
                "| {} | {prog} | {hook} | {} | {:.0} | {:.0} | {:.0} |",
                row.traffic,
                cap.runs,
                cap.per_run(),
                empty.per_run(),
                cap.per_run() - empty.per_run()
            );
        }
    }

    let _ = writeln!(out, "\n### Kernel cost per HTTP request (capture on)\n");
    let _ = writeln!(
        out,
        "Both programs' run time over the requests completed meanwhile: the request and \
         response seen at both ends, plus every read and every chunk written of the \
         exchange. Traced headers: what the hooks read with a `traceparent` (2 per request: \
         the request seen sent and received; the responses are counted as answered, unread).\n"
    );
    let _ = writeln!(
        out,
        "| traffic | requests | traced headers | runs per request | capture ns per request | empty ns per request | capture above empty, ns per request |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (label, load, traced, c) in per_request {
        let n = load.ok.max(1) as f64;
        let cap_ns = (c[0].ns + c[1].ns) as f64;
        let empty_ns = (c[2].ns + c[3].ns) as f64;
        let _ = writeln!(
            out,
            "| HTTP, {label} | {} | {traced} | {:.1} | {:.0} | {:.0} | {:.0} |",
            load.ok,
            (c[0].runs + c[1].runs) as f64 / n,
            cap_ns / n,
            empty_ns / n,
            (cap_ns - empty_ns) / n
        );
    }

    out
}
