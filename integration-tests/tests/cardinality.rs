//! 10,000 short-lived connections from 500 fake pods against a series limit
//! of 100: the series count stays under the limit, the overflow series takes
//! the rest, totals stay exact, and the agent's memory stays bounded.

use std::{process::Command, time::Duration};

use anyhow::Context;
use vigil_integration_tests::{bpf_available, metric_sum, tag, wait_for, Agent, TestCgroup};
use vigil_testbed::netns::LinkPair;

const PODS: usize = 500;
const CONNECTIONS_PER_POD: usize = 20;
const MAX_SERIES: u64 = 100;

/// Runs in the client namespace: joins each pod's cgroup in turn and opens
/// its connections there (the kernel records the owner, cgroup included, at
/// connect), 50 pods at a time. Every SYN-ACK is dropped, so each connection
/// retransmits its SYN once after 1 s; then the batch is closed.
const CLIENT: &str = r#"
import socket, sys, time
target, port, per_pod = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
procs = sys.argv[4:]
for start in range(0, len(procs), 50):
    held = []
    for path in procs[start:start + 50]:
        with open(path, "w") as f:
            f.write("0")  # "0": the writing process itself
        for _ in range(per_pod):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((target, port))
            held.append(s)
    time.sleep(1.4)
    for s in held:
        s.close()
"#;

fn vm_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

/// Memory ceiling: the agent's peak RSS may grow by at most 64 MiB over its
/// idle RSS. What can grow is bounded by configuration: ≤ 100 owner series
/// (a few KiB each with the RTT histogram), the cgroup cache (4096 paths),
/// the socket table the sampler lists (≤ 10,000 rows of ~200 bytes) and the
/// queue to the state owner (events are small, and batches drain as they
/// come). Without the limit, 500 owners times every per-owner family would
/// still fit; the ceiling is there to catch unbounded growth, and the series
/// assertions are what shows the limit works.
const RSS_GROWTH_CEILING_KIB: u64 = 64 * 1024;

#[test]
fn series_stay_under_the_limit_with_many_pods() -> anyhow::Result<()> {
    if !bpf_available("series_stay_under_the_limit_with_many_pods") {
        return Ok(());
    }
    let (agent, _config) = Agent::start_with_config(
        "cardinality.toml",
        &format!("[metrics]\nmax_series = {MAX_SERIES}\n[sampler]\ninterval_ms = 200\n"),
        &[],
    )?;
    let idle_rss = vm_kib(agent.pid(), "VmRSS:")?;

    let link = LinkPair::create(&tag("card"), 61)?;
    let port = 7061;
    // Drop every answer from the server: no SYN-ACK, no RST reaches the clients.
    link.set_loss(port, 100)?;
    let root = format!("vigil-it-{}", tag("card"));
    let mut cgroups = DeepestFirst(Vec::with_capacity(PODS));
    for i in 0..PODS {
        let uid = format!("00000000-0000-4000-8000-{i:012x}");
        cgroups.0.push(TestCgroup::create(&format!(
            "{root}/kubepods/burstable/pod{uid}"
        ))?);
    }
    let host_retrans = || -> anyhow::Result<u64> {
        vigil_testbed::netns::MibSnapshot::of_current_thread()?
            .get("Tcp", "RetransSegs")
            .context("host RetransSegs")
    };
    let host_before = host_retrans()?;
    let before = link.client.mib()?.get("Tcp", "RetransSegs").unwrap_or(0);
    // nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup tree.
    let status = Command::new("nsenter")
        .arg(format!("--net={}", link.client.path().display()))
        .args(["python3", "-c", CLIENT])
        .arg(link.server_addr(false).to_string())
        .arg(port.to_string())
        .arg(CONNECTIONS_PER_POD.to_string())
        .args(cgroups.0.iter().map(|c| c.procs()))
        .status()
        .context("running the fake pods")?;
    anyhow::ensure!(status.success(), "fake pods failed: {status}");
    let kernel = link.client.mib()?.get("Tcp", "RetransSegs").unwrap_or(0) - before;
    assert!(
        kernel >= (PODS * CONNECTIONS_PER_POD) as u64,
        "every connection retransmitted its SYN: {kernel}"
    );

    let ns = link.client.inode()?.to_string();
    let text = wait_for(Duration::from_secs(10), "every retransmit counted", || {
        let text = agent.scrape()?;
        let n = metric_sum(
            &text,
            "vigil_tcp_retransmitted_segments_total",
            &[("netns", &ns)],
        ) + metric_sum(
            &text,
            "vigil_tcp_retransmitted_segments_total",
            &[("cgroup", "_overflow")],
        );
        Ok((n >= kernel).then_some(text))
    })?;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("vigil_tcp_retransmitted_segments_total{"))
        .collect();
    assert!(
        series.len() as u64 <= MAX_SERIES + 1,
        "{} series for {PODS} pods with a limit of {MAX_SERIES} (+1 overflow)",
        series.len()
    );
    assert!(
        metric_sum(&text, "vigil_series_active", &[]) <= MAX_SERIES,
        "reported active series within the limit"
    );
    let overflowed = metric_sum(
        &text,
        "vigil_tcp_retransmitted_segments_total",
        &[("cgroup", "_overflow")],
    );
    assert!(
        overflowed > 0,
        "the overflow series took the pods beyond the limit"
    );
    assert!(metric_sum(&text, "vigil_series_overflow_total", &[]) > 0);
    // Folding into the overflow series loses nothing: this namespace's own
    // series plus the overflow series add up to its RetransSegs. The overflow
    // series is shared by every namespace, so whatever the host itself
    // retransmitted meanwhile may be in it too: that is the tolerance (no
    // other test runs while this binary does).
    let host_noise = host_retrans()? - host_before;
    let own = metric_sum(
        &text,
        "vigil_tcp_retransmitted_segments_total",
        &[("netns", &ns)],
    );
    assert!(
        own + overflowed >= kernel && own + overflowed - kernel <= host_noise,
        "totals stay exact: {own} + {overflowed} vs RetransSegs {kernel} (host noise {host_noise})\n{}",
        series.join("\n")
    );

    let peak = vm_kib(agent.pid(), "VmHWM:")?;
    assert!(
        peak <= idle_rss + RSS_GROWTH_CEILING_KIB,
        "agent peak RSS {peak} KiB vs idle {idle_rss} KiB"
    );
    eprintln!(
        "cardinality: {PODS} pods, {kernel} SYN retransmits, {} series (limit {MAX_SERIES}), {overflowed} segments in the overflow series; RSS idle {idle_rss} KiB, peak {peak} KiB",
        series.len()
    );
    Ok(())
}

/// The pods' cgroups, removed last-made first on every exit path: the first
/// one also made the parents, which must go after every pod.
struct DeepestFirst(Vec<TestCgroup>);

impl Drop for DeepestFirst {
    fn drop(&mut self) {
        while let Some(c) = self.0.pop() {
            drop(c);
        }
    }
}
