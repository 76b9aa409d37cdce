//! `cargo xtask bench`: the agent's cost measured side by side with bpftrace
//! doing comparable work on the same tracepoint, in one run, under the same
//! lossy traffic. Writes BENCHMARKS.md.
//!
//! - Kernel cost per event: run_time_ns / run_cnt of each program, from
//!   `kernel.bpf_stats_enabled=1` (restored afterwards).
//! - Userspace: CPU time and peak RSS of the agent and of bpftrace, from /proc.
//! - Events per second through the agent's pipeline.
//! - The drop probe's filter: its cost per packet when packets are dropped for
//!   reasons it does not report (UDP to a closed port), next to bpftrace
//!   filtering the same tracepoint for the same reasons.
//! - The HTTP trace-context capture hooks: see `bench_capture`.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use vigil_testbed::{
    netns::{loadgen_command, spawn_origin, ChildGuard, LinkPair},
    prom::{metric_sum, scrape},
};

use crate::{bpf_attach::Attached, workspace_root};

use vigil_testbed::origin::DEFAULT_PORT as ORIGIN_PORT;
/// Subnet index of the benchmark's link pair (198.18.202.0/24).
/// The query socket of the agents the benchmarks run (one at a time).
pub(crate) const QUERY_SOCKET: &str = "/run/vigil-bench/query.sock";
const BENCH_LINK_INDEX: u8 = 202;
const METRICS_ADDR: &str = "127.0.0.1:19466";

/// The peer: per retransmit event, the same reads Vigil's probe does (socket
/// netns, segments from the skb's control block, error) into a map keyed by
/// netns. Its offsets are this kernel's (`sk_buff.cb` + 8), as bpftrace 0.17
/// cannot cast the cb array.
const BPFTRACE_PEER: &str = r#"
tracepoint:tcp:tcp_retransmit_skb {
  $sk = (struct sock *)args->skaddr;
  $ns = $sk->__sk_common.skc_net.net->ns.inum;
  @segs[$ns, args->err] = sum(*(uint16 *)((uint64)args->skbaddr + SKB_CB + 8));
  @events[$ns] = count();
}
"#;

/// Socket-level reasons both drop probes report (numbered per kernel: looked up in tracefs).
const WATCHED_DROP_REASONS: [&str; 5] = [
    "SOCKET_RCVBUFF",
    "SOCKET_BACKLOG",
    "PROTO_MEM",
    "TCP_LISTEN_OVERFLOW",
    "TCP_OFO_QUEUE_PRUNE",
];
/// A UDP port nothing listens on in the server namespace.
const CLOSED_UDP_PORT: u16 = 9;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seconds of traffic.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Loss in percent: origin to players (retransmit phase), each
    /// direction of the upstream link (pool phase).
    #[arg(long, default_value_t = 10)]
    pub loss_percent: u8,
    /// Concurrent player connections.
    #[arg(long, default_value_t = 16)]
    players: u32,
    /// Write the results into BENCHMARKS.md (default: print only).
    #[arg(long)]
    pub write: bool,
    /// A quick run on the debug build that only checks the benchmark works (CI).
    #[arg(long, conflicts_with = "write")]
    pub smoke: bool,
    /// Only the HTTP trace-context capture phase (cost and throughput on vs
    /// off; with other --*-only flags: those phases).
    #[arg(long)]
    pub capture_only: bool,
    /// Capture phase: rounds of CPU-per-request runs at a fixed rate
    /// (capture on, on for the origin's cgroup only, off, and off with empty
    /// programs on the hooks).
    #[arg(long, default_value_t = 5)]
    pub capture_rounds: u32,
    /// Capture phase: seconds of each run.
    #[arg(long, default_value_t = 5)]
    pub capture_secs: u64,
    /// Capture phase: ABBA blocks of the interleaved throughput runs (four
    /// 500 ms intervals; about 6 s where the agent is restarted at each
    /// switch). The 95% interval narrows with the square root of this.
    #[arg(long, default_value_t = 30)]
    pub capture_blocks: u32,
    /// Only the SO_REUSEPORT steering program's cost per new connection
    /// (with other --*-only flags: those phases).
    #[arg(long)]
    pub reuseport_only: bool,
    /// Steering phase: new connections of the healthy run (half as many steered).
    #[arg(long, default_value_t = 20_000)]
    pub reuseport_connections: u32,
    /// Only admission control under a threefold overload (goodput and
    /// admitted latency without it and with each law; with other --*-only
    /// flags: those phases).
    #[arg(long)]
    pub admission_only: bool,
    /// Admission phase: seconds of each overload run.
    #[arg(long, default_value_t = 15)]
    pub admission_secs: u64,
    /// Admission phase: rounds of the three runs (off, pie, aimd).
    #[arg(long, default_value_t = 2)]
    pub admission_rounds: u32,
    /// Only the pool controllers (classic vs kernel-informed) on a lossy
    /// upstream episode (with other --*-only flags: those phases).
    #[arg(long)]
    pub pools_only: bool,
    /// Pool phase: rounds of the two episodes.
    #[arg(long, default_value_t = 2)]
    pub pool_rounds: u32,
    /// Pool phase: seconds the upstream link is lossy (--loss-percent).
    #[arg(long, default_value_t = 20)]
    pub pool_lossy_secs: u64,
}

impl BenchArgs {
    /// What `cargo xtask test` runs: the whole benchmark, briefly.
    pub fn smoke() -> BenchArgs {
        BenchArgs {
            seconds: 5,
            loss_percent: 10,
            players: 8,
            write: false,
            smoke: true,
            capture_only: false,
            capture_rounds: 1,
            capture_secs: 1,
            capture_blocks: 2,
            reuseport_only: false,
            reuseport_connections: 400,
            admission_only: false,
            admission_secs: 3,
            admission_rounds: 1,
            pools_only: false,
            pool_rounds: 1,
            pool_lossy_secs: 3,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ProcUsage {
    pub(crate) cpu_seconds: f64,
    rss_kib: u64,
}

/// CPU time (user+system) and peak RSS of a process, from /proc.
pub(crate) fn proc_usage(pid: u32) -> anyhow::Result<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" that ends the command name; utime and stime are 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(ProcUsage {
        cpu_seconds: (ticks(14) + ticks(15)) / hz,
        rss_kib,
    })
}

#[derive(Debug, Clone)]
pub(crate) struct ProgCost {
    pub(crate) name: String,
    pub(crate) runs: u64,
    pub(crate) run_time_ns: u64,
}

/// Every loaded program with its bpf_stats, from bpftool, by id.
pub(crate) fn all_programs() -> anyhow::Result<Vec<(u64, ProgCost)>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool json")?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let cost = ProgCost {
                name: p["name"].as_str().unwrap_or("?").to_owned(),
                runs: p["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
            };
            Some((p["id"].as_u64()?, cost))
        })
        .collect())
}

/// The programs among `ids`, as they are now.
fn programs_with_ids(ids: &[u64]) -> anyhow::Result<Vec<ProgCost>> {
    Ok(all_programs()?
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .map(|(_, p)| p)
        .collect())
}

/// Restores `kernel.bpf_stats_enabled` when dropped.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> anyhow::Result<BpfStats> {
        let previous = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")?
            .trim()
            .to_owned();
        std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enable bpf_stats")?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.previous);
    }
}

fn skb_cb_offset() -> anyhow::Result<u64> {
    // `bpftool btf dump` prints member offsets in bits.
    let out = Command::new("bpftool")
        .args(["-j", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"])
        .output()?;
    let btf: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool btf json")?;
    btf["types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["kind"] == "STRUCT" && t["name"] == "sk_buff")
        .flat_map(|t| t["members"].as_array().cloned().unwrap_or_default())
        .find(|m| m["name"] == "cb")
        .and_then(|m| m["bits_offset"].as_u64())
        .map(|bits| bits / 8)
        .context("sk_buff.cb not in kernel BTF")
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if !args.smoke {
        crate::setup::ensure()?;
    }
    let bin = crate::build(!args.smoke)?;
    let _stats = BpfStats::enable()?;
    let every =
        !(args.capture_only || args.reuseport_only || args.admission_only || args.pools_only);
    if every {
        retransmit_phase(args, &bin)?;
    }
    if every || args.capture_only {
        crate::bench_capture::run(args, &bin)?;
    }
    if every || args.reuseport_only {
        crate::bench_reuseport::run(args, &bin)?;
    }
    if every || args.admission_only {
        crate::bench_admission::run(args, &bin)?;
    }
    if every || args.pools_only {
        crate::bench_pools::run(args, &bin)?;
    }
    Ok(())
}

fn retransmit_phase(args: &BenchArgs, bin: &Path) -> anyhow::Result<()> {
    let link = LinkPair::create("bench", BENCH_LINK_INDEX)?;
    let origin_addr = SocketAddr::new(link.server_addr(false), ORIGIN_PORT);
    let (_origin, _) = spawn_origin(
        &mut link.server.command(bin.join("vigil-origin")),
        origin_addr,
        2,
        600,
    )?;

    let before_tools: Vec<u64> = all_programs()?.into_iter().map(|(id, _)| id).collect();
    let agent = ChildGuard::spawn(
        Command::new(bin.join("vigil"))
            .args(["agent", "--metrics-addr", METRICS_ADDR])
            .stderr(Stdio::null()),
    )?;
    let metrics: SocketAddr = METRICS_ADDR.parse()?;
    wait_until("the agent", || scrape(metrics).is_ok())?;
    let with_agent: Vec<u64> = all_programs()?.into_iter().map(|(id, _)| id).collect();
    let agent_ids: Vec<u64> = with_agent
        .iter()
        .copied()
        .filter(|id| !before_tools.contains(id))
        .collect();
    let peer_script = BPFTRACE_PEER.replace("SKB_CB", &skb_cb_offset()?.to_string());
    let (peer, peer_ids) = start_bpftrace(&peer_script, &with_agent)?;
    let agent_before = proc_usage(agent.pid())?;
    let peer_before = proc_usage(peer.pid())?;
    let kernel_before = link.server.mib()?.get("Tcp", "RetransSegs").unwrap_or(0);

    link.set_loss(ORIGIN_PORT, args.loss_percent)?;
    let started = Instant::now();
    let loadgen = bin.join("vigil-loadgen");
    // Requests enough to outlast the time limit.
    let requests = 1_000_000;
    let status = loadgen_command(
        &link.client,
        &loadgen,
        origin_addr,
        args.players,
        requests,
        args.seconds as f64,
    )
    .stdout(Stdio::null())
    .status()?;
    let elapsed = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("load generator failed: {status}");
    }

    link.set_loss(ORIGIN_PORT, 0)?;
    thread::sleep(Duration::from_secs(2));

    let agent_after = proc_usage(agent.pid())?;
    let peer_after = proc_usage(peer.pid())?;
    let kernel_segs = link.server.mib()?.get("Tcp", "RetransSegs").unwrap_or(0) - kernel_before;
    let text = scrape(metrics)?;
    let events = metric_sum(&text, "vigil_events_received_total", &[]);
    if events == 0 {
        bail!("the agent read no events; the benchmark measured nothing");
    }
    let mut lost = Vec::new();
    for probe in ["retransmit", "synack_retransmit", "socket_drop"] {
        for reason in ["ring_full", "read_error", "recursion"] {
            let n = metric_sum(
                &text,
                "vigil_events_lost_total",
                &[("probe", probe), ("reason", reason)],
            );
            if n > 0 {
                lost.push(format!("{n} {probe}/{reason}"));
            }
        }
    }
    if lost.is_empty() {
        lost.push("none".into());
    }
    let lost = lost.join(", ");
    let agent_progs = programs_with_ids(&agent_ids)?;
    let peer_progs = programs_with_ids(&peer_ids)?;
    drop(peer);
    let drops = drop_filter_phase(&link, &agent_ids, &with_agent, args.seconds.min(10))?;
    drop(agent);

    let mut report = String::from(
        "Both tools watch the same retransmits of one lossy origin at once. Per event, bpftrace \
         reads the socket's netns and the skb's segment count into an in-kernel map; Vigil's \
         probe also reads the 4-tuple, state, cookie and the socket's retransmit counter, \
         updates its socket table and sends a record to the agent through the ring buffer. \
         Vigil's other programs run on socket state changes and accept(), not per packet. \
         ns per run is bpf_stats' run_time_ns / run_cnt (a VM here, so absolute numbers are \
         high for both; compare the ratio).\n\n",
    );
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench --seconds {} --loss-percent {} --players {}`",
        args.seconds, args.loss_percent, args.players
    );
    let _ = writeln!(
        report,
        "Kernel: {}; {} CPUs.\n",
        uname(),
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(report, "Traffic: {elapsed:.0} s, {kernel_segs} retransmitted segments (Tcp RetransSegs of the origin's namespace), {events} events read by the agent ({:.0}/s); lost: {lost}.\n", events as f64 / elapsed);
    let _ = writeln!(report, "| tool | program | hook | runs | ns per run |");
    let _ = writeln!(report, "| --- | --- | --- | ---: | ---: |");
    for (tool, progs) in [("vigil", &agent_progs), ("bpftrace", &peer_progs)] {
        for p in progs.iter().filter(|p| p.runs > 0) {
            let hook = hook_of(&p.name);
            let _ = writeln!(
                report,
                "| {tool} | {} | {hook} | {} | {:.0} |",
                p.name,
                p.runs,
                p.run_time_ns as f64 / p.runs as f64
            );
        }
    }
    let _ = writeln!(
        report,
        "\n| process | CPU seconds | CPU % of one core | peak RSS (MiB) |"
    );
    let _ = writeln!(report, "| --- | ---: | ---: | ---: |");
    for (name, before, after) in [
        ("vigil agent", agent_before, agent_after),
        ("bpftrace", peer_before, peer_after),
    ] {
        let cpu = after.cpu_seconds - before.cpu_seconds;
        let _ = writeln!(
            report,
            "| {name} | {cpu:.2} | {:.2} | {:.1} |",
            100.0 * cpu / elapsed,
            after.rss_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(report, "\n{drops}");
    println!("{report}");
    if args.write {
        write_benchmarks(&report)?;
    }
    Ok(())
}

/// `enum skb_drop_reason` values by name, from the kfree_skb tracepoint's format.
fn drop_reason_numbers() -> anyhow::Result<Vec<(String, u64)>> {
    let format = std::fs::read_to_string("/sys/kernel/tracing/events/skb/kfree_skb/format")
        .context("reading the kfree_skb tracepoint format (tracefs mounted?)")?;
    // ... __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, ...
    Ok(format
        .split('{')
        .filter_map(|part| {
            let (num, rest) = part.split_once(',')?;
            let name = rest.split('"').nth(1)?;
            Some((name.to_owned(), num.trim().parse().ok()?))
        })
        .collect())
}

/// Sends UDP datagrams from the client namespace to a closed port of the
/// server for `seconds`: every one is freed through kfree_skb with reason
/// NO_SOCKET, which neither probe reports. Measures what filtering costs.
fn drop_filter_phase(
    link: &LinkPair,
    agent_ids: &[u64],
    not_peer: &[u64],
    seconds: u64,
) -> anyhow::Result<String> {
    let numbers = drop_reason_numbers()?;
    let predicate: Vec<String> = WATCHED_DROP_REASONS
        .iter()
        .map(|name| {
            numbers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| format!("args->reason == {v}"))
                .with_context(|| format!("drop reason {name} not in this kernel's tracepoint"))
        })
        .collect::<anyhow::Result<_>>()?;
    let script = format!(
        "tracepoint:skb:kfree_skb /{}/ {{ @drops[args->reason] = count(); }}",
        predicate.join(" || ")
    );
    let (peer, mut peer_ids) = start_bpftrace(&script, not_peer)?;
    let floor = Attached::empty(EMPTY_PROBE, "kfree_skb")?;
    peer_ids.push(floor.id);
    let vigil_drop = |progs: Vec<ProgCost>| progs.into_iter().find(|p| p.name == "vigil_drop");
    let before = (
        vigil_drop(programs_with_ids(agent_ids)?).context("vigil_drop not loaded")?,
        programs_with_ids(&peer_ids)?,
    );
    let no_ports = || -> anyhow::Result<u64> {
        link.server
            .mib()?
            .get("Udp", "NoPorts")
            .context("Udp NoPorts in the server namespace")
    };
    let no_ports_before = no_ports()?;
    let target = SocketAddr::new(link.server_addr(false), CLOSED_UDP_PORT);
    let sender = link.client.spawn_thread(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let until = Instant::now() + Duration::from_secs(seconds);
        let payload = [0u8; 64];
        let mut sent = 0u64;
        // Bounded by time; an error (e.g. ICMP unreachable reported back) is not fatal.
        while Instant::now() < until {
            for _ in 0..256 {
                if socket.send_to(&payload, target).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent)
    })?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("UDP sender panicked"))??;
    thread::sleep(Duration::from_millis(500));
    let dropped = no_ports()? - no_ports_before;
    let after = (
        vigil_drop(programs_with_ids(agent_ids)?).context("vigil_drop not loaded")?,
        programs_with_ids(&peer_ids)?,
    );
    drop(peer);
    drop(floor);
    if dropped == 0 {
        bail!("no UDP datagram reached the closed port ({sent} sent); the drop phase measured nothing");
    }
    let per_run = |runs: u64, ns: u64| {
        if runs == 0 {
            0.0
        } else {
            ns as f64 / runs as f64
        }
    };
    let mut out = String::from(
        "### Drop probe: cost of the filter on drops it does not report\n\n\
         UDP datagrams to a closed port of the origin's namespace: each is freed through \
         `skb:kfree_skb` with reason NO_SOCKET, which is not a socket-level reason, so the \
         programs only test the reason and return. Vigil tests a 256-bit set written at load; \
         bpftrace a predicate over the same reasons (",
    );
    let _ = write!(
        out,
        "{}). `empty` is a program that only returns 0, on the same hook at the same time: \
         what bpf_stats reports for doing nothing (its own clock reads around the call), the \
         floor under every number here; the filter's own cost is the difference.\n\n\
         Datagrams dropped: {dropped} (Udp NoPorts of the namespace; {sent} sent); runs \
         include every other kfree_skb on the node meanwhile.\n\n",
        WATCHED_DROP_REASONS.join(", ")
    );
    let _ = writeln!(out, "| tool | program | hook | runs | ns per run |");
    let _ = writeln!(out, "| --- | --- | --- | ---: | ---: |");
    let vigil_runs = after.0.runs - before.0.runs;
    let vigil_ns = per_run(vigil_runs, after.0.run_time_ns - before.0.run_time_ns);
    let _ = writeln!(
        out,
        "| vigil | vigil_drop | tp_btf/kfree_skb | {vigil_runs} | {vigil_ns:.0} |"
    );
    let mut floor_ns = None;
    for p in &after.1 {
        let empty = p.name == EMPTY_PROBE;
        let (tool, hook) = if empty {
            ("empty", "raw_tp/kfree_skb")
        } else {
            ("bpftrace", "tracepoint/skb/kfree_skb")
        };
        let (r0, t0) = before
            .1
            .iter()
            .find(|b| b.name == p.name)
            .map_or((0, 0), |b| (b.runs, b.run_time_ns));
        let runs = p.runs - r0;
        let ns = per_run(runs, p.run_time_ns - t0);
        if empty {
            floor_ns = Some(ns);
        }
        let _ = writeln!(out, "| {tool} | {} | {hook} | {runs} | {ns:.0} |", p.name);
    }
    if let Some(floor) = floor_ns {
        let _ = writeln!(
            out,
            "\nvigil_drop above the empty program: {:.0} ns per packet.",
            vigil_ns - floor
        );
    }
    Ok(out)
}

/// Name of the empty program the drop phase compares against.
const EMPTY_PROBE: &str = "vigil_empty";

/// Starts bpftrace with `script` and returns it with the ids of the programs
/// it loaded (those not among `existing`), once they are attached.
fn start_bpftrace(script: &str, existing: &[u64]) -> anyhow::Result<(ChildGuard, Vec<u64>)> {
    let peer = ChildGuard::spawn(
        Command::new("bpftrace")
            .args(["-e", script])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let mut ids = Vec::new();
    wait_until("bpftrace", || {
        ids = all_programs()
            .unwrap_or_default()
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !existing.contains(id))
            .collect();
        !ids.is_empty()
    })?;
    Ok((peer, ids))
}

pub(crate) fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not start within 30 s");
        }
        thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn hook_of(program: &str) -> &'static str {
    match program {
        "vigil_retx" => "tp_btf/tcp_retransmit_skb",
        "vigil_synack" => "tp_btf/tcp_retransmit_synack",
        "vigil_sk_state" => "tracepoint/sock/inet_sock_set_state",
        "vigil_accept4" | "vigil_accept" => "tracepoint/syscalls/sys_exit_accept*",
        "vigil_drop" => "tp_btf/kfree_skb",
        "vigil_sock_iter" => "iter/task_file (per open file)",
        "vigil_http_recv" => "tp_btf/sock_recv_length",
        "vigil_http_in" => "cgroup_skb/ingress",
        "vigil_http_out" => "cgroup_skb/egress",
        "vigil_http_send" => "tp_btf/tcp_sendmsg_locked",
        "vigil_http_handoff" => "tp_btf/inet_sock_set_state",
        // bpftrace's probe
        _ => "tracepoint/tcp/tcp_retransmit_skb",
    }
}

pub(crate) fn uname() -> String {
    Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

const SECTION: &str = "## Retransmit probe: vigil vs bpftrace";

/// Replaces this benchmark's section of BENCHMARKS.md, keeping the others.
fn write_benchmarks(report: &str) -> anyhow::Result<()> {
    write_section(SECTION, report)
}

/// Replaces the section headed `heading` (a `## ` line) of BENCHMARKS.md
/// with `report`, keeping the others; a new section goes at the end.
pub(crate) fn write_section(heading: &str, report: &str) -> anyhow::Result<()> {
    let path = workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n\nEvery table below was written by the command above it; rerun it to refresh.\n".into());
    let section = format!("{heading}\n\n{report}");
    let new = match old.find(heading) {
        Some(start) => {
            let end = old[start + heading.len()..]
                .find("\n## ")
                .map_or(old.len(), |i| start + heading.len() + i + 1);
            format!("{}{section}{}", &old[..start], &old[end..])
        }
        None => format!("{}\n\n{section}", old.trim_end()),
    };
    std::fs::write(&path, new).context("writing BENCHMARKS.md")
}
