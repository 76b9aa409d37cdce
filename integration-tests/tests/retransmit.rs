//! Retransmits end to end: the agent's totals against the kernel's Tcp
//! RetransSegs, and attribution of each event to the socket's owner.

use std::time::Duration;

use vigil_integration_tests::{bpf_available, metric_sum, read_event_log, tag, wait_for, Agent, Scenario, TempPath};

/// Transfers through a lossy veth link, then compares the agent's segment total
/// for the server namespace with that namespace's RetransSegs delta.
///
/// Tolerance: none. Both numbers come from the same kernel code path: the probe
/// reads `tcp_skb_pcount()` of each retransmitted skb and the agent applies the
/// kernel's rule for which failed attempts were counted. Nothing else touches
/// the fresh namespace, and the test waits until its last socket is gone
/// before reading the counter. Ring-buffer losses would break equality, so
/// they are asserted to be zero as well.
fn counts_match_kernel(v6: bool, loss_percent: u8, index: u8) -> anyhow::Result<()> {
    let name = format!("{}{}{loss_percent}", tag("rx"), if v6 { "six" } else { "four" });
    let agent = Agent::start(&[])?;
    let mut scenario = Scenario::start(&name, index, v6)?;
    let netns = scenario.server_netns()?.to_string();
    let before = scenario.retrans_segs()?;
    scenario.link.set_loss(scenario.port, loss_percent)?;
    let summary = scenario.run_load(v6, 4, 8, 8.0)?;
    assert!(summary["requests_ok"].as_u64().unwrap_or(0) > 0, "load made progress: {summary}");
    scenario.quiesce()?;
    let kernel = scenario.retrans_segs()? - before;
    assert!(kernel > 0, "{loss_percent}% loss must cause retransmits (nft dropped {:?})", scenario.link.loss_drops());

    let labels = [("netns", netns.as_str())];
    let reported = wait_for(Duration::from_secs(10), "agent total to reach the kernel's", || {
        let n = metric_sum(&agent.scrape()?, "vigil_tcp_retransmitted_segments_total", &labels);
        Ok((n >= kernel).then_some(n))
    })
    .unwrap_or_else(|_| metric_sum(&agent.scrape().unwrap_or_default(), "vigil_tcp_retransmitted_segments_total", &labels));
    let text = agent.scrape()?;
    assert_eq!(metric_sum(&text, "vigil_events_lost_total", &[]), 0, "no ring-buffer loss");
    assert_eq!(
        reported, kernel,
        "v6={v6} loss={loss_percent}%: agent {reported} vs kernel RetransSegs delta {kernel}\n{text}"
    );
    let events = metric_sum(&text, "vigil_tcp_retransmit_events_total", &labels);
    assert!(events > 0 && events <= reported, "events {events} <= segments {reported}");
    eprintln!("v6={v6} loss={loss_percent}%: {reported} segments in {events} events, equal to RetransSegs");
    Ok(())
}

#[test]
fn ipv4_retransmits_equal_kernel_counter() -> anyhow::Result<()> {
    if !bpf_available("ipv4_retransmits_equal_kernel_counter") {
        return Ok(());
    }
    for (i, loss) in [1u8, 5, 20].into_iter().enumerate() {
        counts_match_kernel(false, loss, 10 + i as u8)?;
    }
    Ok(())
}

#[test]
fn ipv6_retransmits_equal_kernel_counter() -> anyhow::Result<()> {
    if !bpf_available("ipv6_retransmits_equal_kernel_counter") {
        return Ok(());
    }
    for (i, loss) in [1u8, 5, 20].into_iter().enumerate() {
        counts_match_kernel(true, loss, 20 + i as u8)?;
    }
    Ok(())
}

/// The cgroup the origin runs in, created for the test and removed after.
struct TestCgroup {
    dir: std::path::PathBuf,
    rel: String,
}

impl TestCgroup {
    fn create(name: &str) -> anyhow::Result<TestCgroup> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = mountinfo
            .lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                (post.split_whitespace().next()? == "cgroup2").then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
            })
            .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount"))?;
        let dir = std::path::Path::new(&root).join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(TestCgroup { dir, rel: format!("/{name}") })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty by now (its only process was the origin); retry briefly while it exits.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Every retransmit on a socket created after the agent started carries the
/// origin's pid, process name, cgroup and network namespace, learnt in the kernel.
#[test]
fn new_sockets_are_attributed_in_kernel() -> anyhow::Result<()> {
    if !bpf_available("new_sockets_are_attributed_in_kernel") {
        return Ok(());
    }
    let name = tag("attrnew");
    let cgroup = TestCgroup::create(&format!("vigil-it-{name}"))?;
    let log = TempPath::new("attr-new.jsonl");
    let log_arg = log.0.display().to_string();
    let mut agent = Agent::start(&["--event-log", &log_arg])?;
    let mut scenario = Scenario::start_with(&name, 30, false, Some(&cgroup.dir.join("cgroup.procs")))?;
    let netns = scenario.server_netns()?;
    scenario.link.set_loss(scenario.port, 10)?;
    scenario.run_load(false, 3, 6, 6.0)?;
    scenario.quiesce()?;
    agent.terminate()?;

    let events = read_event_log(&log.0)?;
    let server: Vec<_> = events.iter().filter(|e| e["netns"].as_u64() == Some(netns)).collect();
    assert!(!server.is_empty(), "retransmits seen in the server namespace");
    for e in &server {
        assert_eq!(e["pid"].as_u64(), Some(u64::from(scenario.origin_pid)), "pid of {e}");
        assert_eq!(e["comm"].as_str(), Some("vigil-origin"), "process name of {e}");
        assert_eq!(e["cgroup"].as_str(), Some(cgroup.rel.as_str()), "cgroup of {e}");
        assert_eq!(e["owner_source"].as_str(), Some("kernel"), "learnt at accept: {e}");
        assert_eq!(e["local"].as_str().map(|l| l.ends_with(":8080")), Some(true), "server side of {e}");
    }
    eprintln!("{} server-side events, all attributed to pid {}", server.len(), scenario.origin_pid);
    Ok(())
}

/// Connections accepted before the agent started are attributed through the
/// /proc bootstrap.
#[test]
fn preexisting_sockets_are_attributed_from_proc() -> anyhow::Result<()> {
    if !bpf_available("preexisting_sockets_are_attributed_from_proc") {
        return Ok(());
    }
    let name = tag("attrold");
    let mut scenario = Scenario::start(&name, 31, false)?;
    let netns = scenario.server_netns()?;
    // Slow transfers: connected now, still retransmitting once the agent is up.
    scenario.link.set_loss(scenario.port, 25)?;
    let mut load = scenario.spawn_load(false, 3, 40, 20.0)?;
    let mut last = String::new();
    wait_for(Duration::from_secs(30), "established connections", || {
        last = scenario.link.server.run(&["ss", "-Htan"])?;
        Ok((last.lines().filter(|l| l.starts_with("ESTAB")).count() >= 3).then_some(()))
    })
    .map_err(|e| e.context(format!("server sockets: {last}")))?;
    let log = TempPath::new("attr-old.jsonl");
    let log_arg = log.0.display().to_string();
    let mut agent = Agent::start(&["--event-log", &log_arg])?;
    let metrics_labels = [("netns", netns.to_string())];
    let labels: Vec<(&str, &str)> = metrics_labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    wait_for(Duration::from_secs(20), "retransmits after the agent started", || {
        Ok((metric_sum(&agent.scrape()?, "vigil_tcp_retransmit_events_total", &labels) >= 5).then_some(()))
    })?;
    load.terminate(Duration::from_secs(5))?;
    scenario.quiesce()?;
    agent.terminate()?;

    let events = read_event_log(&log.0)?;
    let server: Vec<_> = events.iter().filter(|e| e["netns"].as_u64() == Some(netns)).collect();
    let from_proc = server.iter().filter(|e| e["owner_source"].as_str() == Some("proc")).count();
    assert!(from_proc > 0, "some events on pre-existing sockets: {server:?}");
    for e in &server {
        assert_eq!(e["pid"].as_u64(), Some(u64::from(scenario.origin_pid)), "pid of {e}");
        assert_eq!(e["comm"].as_str(), Some("vigil-origin"), "process name of {e}");
    }
    eprintln!("{} server-side events, {from_proc} attributed from /proc", server.len());
    Ok(())
}
