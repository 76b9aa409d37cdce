//! The HTTP trace-context capture attached to a chosen cgroup
//! (`correlate.capture_cgroups`) instead of the cgroup v2 root: requests a
//! process in that cgroup sends are captured, the same requests from a
//! process in a sibling cgroup (and the origin answering both, in neither)
//! are not. A bad entry stops the agent at start, naming the entry.

use std::{
    collections::HashMap,
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use serde_json::Value;
use vigil_integration_tests::{
    bpf_available, capture_outcome, loadgen_summary, one_namespace_test_at_a_time, tag, wait_for,
    Agent, Scenario, TempPath, TestCgroup,
};
use vigil_testbed::netns::{bin_path, in_cgroup, loadgen_command, ChildGuard};

/// Link pair of this file (198.18.95.0/24).
const LINK_INDEX: u8 = 95;
const CONNECTIONS: u32 = 2;
const REQUESTS_PER_CONNECTION: u32 = 25;
const OUTCOMES: [&str; 5] = ["traced", "untraced", "repeated", "abandoned", "answered"];

/// The capture's counters, by outcome, in `OUTCOMES` order.
fn outcomes(agent: &Agent) -> anyhow::Result<[u64; 5]> {
    let text = agent.scrape()?;
    Ok(OUTCOMES.map(|outcome| capture_outcome(&text, outcome)))
}

/// Traced keep-alive requests from the client namespace, sent by a process
/// in `cgroup`; returns the load generator's summary once every one is done.
fn load_from(scenario: &Scenario, cgroup: &TestCgroup) -> anyhow::Result<Value> {
    let target = std::net::SocketAddr::new(scenario.link.server_addr(false), scenario.port);
    let load = loadgen_command(
        &scenario.link.client,
        &bin_path("vigil-loadgen")?,
        target,
        CONNECTIONS,
        REQUESTS_PER_CONNECTION,
        60.0,
    );
    let mut cmd = in_cgroup(&cgroup.procs(), &load);
    cmd.arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let summary = loadgen_summary(ChildGuard::spawn(&mut cmd)?)?;
    let requests = u64::from(CONNECTIONS * REQUESTS_PER_CONNECTION);
    anyhow::ensure!(
        summary["requests_ok"] == requests
            && summary["requests_failed"] == 0
            && summary["requests_interrupted"] == 0,
        "every request completed: {summary}"
    );
    Ok(summary)
}

fn trace_ids(summary: &Value) -> Vec<String> {
    summary["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["trace_id"].as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn capture_sees_only_the_listed_cgroup() -> anyhow::Result<()> {
    if !bpf_available("capture_sees_only_the_listed_cgroup") {
        return Ok(());
    }
    let _serial = one_namespace_test_at_a_time();
    let base = format!("vigil-it-{}", tag("capcg"));
    let captured = TestCgroup::create(&format!("{base}/captured"))?;
    let other = TestCgroup::create(&format!("{base}/other"))?;
    // The relative form: under the cgroup v2 root.
    let config = format!(
        "[correlate]\ncapture_cgroups = [{:?}]\n",
        captured.rel.trim_start_matches('/')
    );
    let (agent, _config) = Agent::start_with_config("capture-cgroups.toml", &config, &[])?;
    let attached_to: Vec<String> = agent
        .logs()
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("trace-context capture attached"))
        })
        .filter_map(|v| v["cgroups"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        attached_to,
        [captured.dir.display().to_string()],
        "capture attached to the listed cgroup only:\n{}",
        agent.log_text()
    );
    // The origin runs in this test's own cgroup: neither listed nor below one.
    let scenario = Scenario::start(&tag("capcg"), LINK_INDEX, false)?;

    let before = outcomes(&agent)?;
    let inside = load_from(&scenario, &captured)?;
    // The programs ran in the packets' path, so the counters are final now.
    let after_inside = outcomes(&agent)?;
    let outside = load_from(&scenario, &other)?;
    let after_outside = outcomes(&agent)?;
    let delta = |a: [u64; 5], b: [u64; 5]| -> [u64; 5] { [0, 1, 2, 3, 4].map(|i| b[i] - a[i]) };
    let (d_in, d_out) = (
        delta(before, after_inside),
        delta(after_inside, after_outside),
    );
    eprintln!("capture outcomes {OUTCOMES:?}: inside {d_in:?}, outside {d_out:?}");

    // Inside: each request's header seen leaving the client, and the
    // origin's answer seen arriving: the request read (traced), the response
    // answered unread (its request carried the context), or read when the
    // request's header was abandoned. Tolerance: one message in a hundred may
    // be abandoned instead (the per-CPU scratch buffer is busy when a
    // softirq's ingress run interrupts an egress run on the same CPU), as in
    // trace_capture.rs; none may go missing.
    let requests = u64::from(CONNECTIONS * REQUESTS_PER_CONNECTION);
    let messages = 2 * requests;
    let [traced, untraced, _repeated, abandoned, answered] = d_in;
    assert_eq!(
        traced + abandoned + answered,
        messages,
        "every header of the captured client accounted for once: {d_in:?}"
    );
    assert!(
        abandoned * 100 <= messages,
        "at most 1% abandoned: {d_in:?}"
    );
    assert!(
        answered <= requests && answered + abandoned >= requests,
        "the response of every traced request answered unread: {d_in:?}"
    );
    assert_eq!(untraced, 0, "every header carried a traceparent: {d_in:?}");
    // Outside: no capture program runs for that cgroup's sockets at all,
    // so every counter stays exactly where it was (tolerance 0).
    assert_eq!(d_out, [0; 5], "nothing captured outside the cgroup");

    // The agent answers for the captured client's traces, client side only
    // (the origin is outside the cgroup), and knows none of the others.
    let inside_ids = trace_ids(&inside);
    assert_eq!(inside_ids.len() as u64, requests, "{inside}");
    // Events reach the index within a poll interval. A trace whose request
    // and response headers were both abandoned would be unknown: allowed
    // up to the abandoned count.
    let mut known: HashMap<&str, Value> = HashMap::new();
    wait_for(
        Duration::from_secs(10),
        "the captured traces in the agent's index",
        || {
            for id in &inside_ids {
                if !known.contains_key(id.as_str()) {
                    if let Some(e) = agent.explain(id)? {
                        known.insert(id, e);
                    }
                }
            }
            Ok((known.len() as u64 + abandoned >= requests).then_some(()))
        },
    )?;
    for e in known.values() {
        let roles: Vec<&str> = e["trace"]["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["role"].as_str())
            .collect();
        assert!(
            !roles.is_empty() && roles.iter().all(|r| *r == "client"),
            "only the captured client's socket carried it: {e}"
        );
    }
    let outside_ids = trace_ids(&outside);
    assert_eq!(outside_ids.len() as u64, requests, "{outside}");
    for id in &outside_ids {
        assert!(
            agent.explain(id)?.is_none(),
            "trace {id} of the uncaptured client is unknown to the agent"
        );
    }
    drop(scenario);
    drop(agent);
    Ok(())
}

/// Starts the agent with `toml` (plus `args`), which must make it exit at
/// start: returns its exit status and its stderr.
fn start_rejected(name: &str, toml: &str, args: &[&str]) -> anyhow::Result<(ExitStatus, String)> {
    let config = TempPath::new(name);
    std::fs::write(&config.0, toml)?;
    let stderr = TempPath::new(&format!("{name}.stderr"));
    let mut child = ChildGuard::spawn(
        Command::new(bin_path("vigil")?)
            .args(["agent", "--metrics-addr", "127.0.0.1:0", "--config"])
            .arg(&config.0)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr.0)?),
    )?;
    let status = wait_for(Duration::from_secs(20), "the agent to give up", || {
        child.try_wait()
    })?;
    Ok((status, std::fs::read_to_string(&stderr.0)?))
}

#[test]
fn a_bad_entry_stops_the_agent_naming_it() -> anyhow::Result<()> {
    if !bpf_available("a_bad_entry_stops_the_agent_naming_it") {
        return Ok(());
    }
    let base = format!("vigil-it-{}", tag("capbad"));
    let child = TestCgroup::create(&format!("{base}/child"))?;
    let (rel_child, abs_child) = (
        child.rel.trim_start_matches('/').to_owned(),
        child.dir.display().to_string(),
    );
    let list = |entries: &[&str]| format!("[correlate]\ncapture_cgroups = {entries:?}\n");
    let missing = format!("{base}/absent");
    let file = format!("{rel_child}/cgroup.procs");
    // (case, config, flags, what the message must name)
    let cases: Vec<(&str, String, Vec<&str>, Vec<String>)> = vec![
        (
            "missing",
            list(&[&missing]),
            vec![],
            vec![format!("`{missing}`"), "cannot open".into()],
        ),
        (
            "nested",
            list(&[&base, &abs_child]),
            vec![],
            vec![format!("`{abs_child}` is below `{base}`")],
        ),
        (
            "duplicate through the flag",
            list(&[&rel_child]),
            vec!["--capture-cgroup", &abs_child],
            vec![format!("`{abs_child}` is `{rel_child}` again")],
        ),
        (
            "outside the hierarchy",
            list(&["/tmp"]),
            vec![],
            vec!["`/tmp`".into(), "outside the cgroup v2 hierarchy".into()],
        ),
        (
            "not a directory",
            list(&[&file]),
            vec![],
            vec![format!("`{file}`"), "is not a directory".into()],
        ),
    ];
    for (case, toml, flags, want) in &cases {
        let (status, stderr) = start_rejected("capture-bad.toml", toml, flags)?;
        assert!(!status.success(), "{case}: exit status {status}\n{stderr}");
        for w in want.iter().chain([&"correlate.capture_cgroups".to_owned()]) {
            assert!(stderr.contains(w.as_str()), "{case}: names {w}:\n{stderr}");
        }
        assert!(
            !stderr.contains("kernel object created"),
            "{case}: rejected before any kernel object exists:\n{stderr}"
        );
    }
    // An empty entry is a configuration error (exit 2), found before anything runs.
    let (status, stderr) = start_rejected("capture-empty.toml", &list(&[""]), &[])?;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("correlate.capture_cgroups"), "{stderr}");
    Ok(())
}
