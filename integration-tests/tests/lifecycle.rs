//! What the agent leaves in the kernel when it exits: nothing. Checked with
//! bpftool against the ids of every program, map and link the agent said it created.

use std::{process::Command, time::Duration};

use vigil_integration_tests::{bpf_available, bpftool_shows, tag, wait_for, Agent, TestCgroup};

/// Program ids some BPF link still points at. bpftool fails the whole
/// listing when a link it is reading goes away meanwhile (another test's
/// agent exiting, as CI runs two test binaries at once): tried again then.
fn linked_program_ids() -> anyhow::Result<Vec<u64>> {
    let mut failure = String::new();
    for _ in 0..5 {
        let out = Command::new("bpftool")
            .args(["-j", "link", "show"])
            .output()?;
        if !out.status.success() {
            // In JSON mode bpftool writes its error to stdout.
            failure = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        return Ok(links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["prog_id"].as_u64())
            .collect());
    }
    anyhow::bail!("bpftool link show failed 5 times; last: {failure}")
}

/// All created objects exist while the agent runs (so the check below can fail).
fn objects_of(agent: &Agent) -> anyhow::Result<Vec<(String, u64, String)>> {
    let objects = agent.kernel_objects();
    let programs = objects.iter().filter(|(k, ..)| k == "program").count();
    anyhow::ensure!(
        programs >= 5,
        "agent reported {programs} programs: {objects:?}"
    );
    anyhow::ensure!(
        objects
            .iter()
            .any(|(k, _, n)| k == "map" && n == "VIGIL_EVENTS"),
        "ring buffer reported"
    );
    anyhow::ensure!(
        objects
            .iter()
            .any(|(k, _, n)| k == "link" && n == "vigil_sock_iter"),
        "the socket sampler's iterator link reported"
    );
    for (kind, id, name) in &objects {
        anyhow::ensure!(
            bpftool_shows(kind, *id),
            "{kind} {name} (id {id}) not visible while the agent runs"
        );
    }
    let linked = linked_program_ids()?;
    for (_, id, name) in objects.iter().filter(|(k, ..)| k == "program") {
        anyhow::ensure!(
            linked.contains(id),
            "program {name} (id {id}) has no link while the agent runs"
        );
    }
    Ok(objects)
}

/// The kernel frees objects when their last reference goes; allow it a moment.
fn assert_all_gone(objects: &[(String, u64, String)]) -> anyhow::Result<()> {
    wait_for(
        Duration::from_secs(10),
        "every kernel object of the agent to be released",
        || {
            let linked = linked_program_ids()?;
            let left: Vec<_> = objects
                .iter()
                .filter(|(kind, id, _)| {
                    bpftool_shows(kind, *id) || (kind == "program" && linked.contains(id))
                })
                .collect();
            if !left.is_empty() {
                eprintln!("still present: {left:?}");
            }
            Ok(left.is_empty().then_some(()))
        },
    )
}

/// Waits for the agent to exit (SIGTERM if still running): status 0, detach logged.
fn assert_clean_exit(agent: &mut Agent) -> anyhow::Result<()> {
    let status = agent.terminate()?;
    let log = agent.log_text();
    assert!(status.success(), "exit status {status}\n{log}");
    assert!(
        log.contains("detached all hooks"),
        "shutdown logged:\n{log}"
    );
    Ok(())
}

#[test]
fn sigterm_detaches_and_releases_everything() -> anyhow::Result<()> {
    if !bpf_available("sigterm_detaches_and_releases_everything") {
        return Ok(());
    }
    let mut agent = Agent::start(&[])?;
    let objects = objects_of(&agent)?;
    assert_clean_exit(&mut agent)?;
    assert_all_gone(&objects)
}

#[test]
fn sigkill_leaves_nothing_and_restart_works() -> anyhow::Result<()> {
    if !bpf_available("sigkill_leaves_nothing_and_restart_works") {
        return Ok(());
    }
    let mut agent = Agent::start(&[])?;
    let objects = objects_of(&agent)?;
    agent.kill()?;
    // Nothing is pinned or attached without a file descriptor, so process death releases all.
    assert_all_gone(&objects)?;
    let mut again = Agent::start(&[])?;
    let second = objects_of(&again)?;
    assert!(again
        .scrape()?
        .contains("vigil_hook_active{hook=\"tp_btf/tcp_retransmit_skb\",signal=\"retransmit\"} 1"));
    assert_clean_exit(&mut again)?;
    assert_all_gone(&second)
}

/// An impatient operator (SIGTERM, then Ctrl-C at once): the second signal may
/// cut the drain short, and either way the agent exits 0 and releases everything.
#[test]
fn two_signals_in_a_row_still_exit_cleanly() -> anyhow::Result<()> {
    if !bpf_available("two_signals_in_a_row_still_exit_cleanly") {
        return Ok(());
    }
    let mut agent = Agent::start(&[])?;
    let objects = objects_of(&agent)?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.pid())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
    assert_clean_exit(&mut agent)?;
    assert_all_gone(&objects)
}

/// Capture on two cgroups (`correlate.capture_cgroups`, one entry relative,
/// one absolute), messages received read from the packets (as on kernels
/// without `sock_recv_length`): one link per packet program and cgroup,
/// each reported, and every one gone after exit.
#[test]
fn capture_links_on_every_listed_cgroup_are_released() -> anyhow::Result<()> {
    if !bpf_available("capture_links_on_every_listed_cgroup_are_released") {
        return Ok(());
    }
    let base = format!("vigil-it-{}", tag("lccap"));
    let a = TestCgroup::create(&format!("{base}/a"))?;
    let b = TestCgroup::create(&format!("{base}/b"))?;
    let config = format!(
        "[correlate]\ncapture_cgroups = [{:?}, {:?}]\n",
        a.rel.trim_start_matches('/'),
        b.dir.display().to_string()
    );
    let (mut agent, _config) = Agent::start_with_config(
        "lifecycle-capture.toml",
        &config,
        &["--disable-hook", "tp_btf/sock_recv_length"],
    )?;
    let objects = objects_of(&agent)?;
    let links = objects
        .iter()
        .filter(|(kind, _, name)| kind == "link" && name == "vigil_http_in")
        .count();
    assert_eq!(
        links, 2,
        "vigil_http_in: a link per listed cgroup: {objects:?}"
    );
    // Messages sent are read at one tracepoint for the node, which checks
    // the writer against both cgroups (and so does the one for reads) (a cgroup array, accounted for below).
    assert!(
        objects
            .iter()
            .any(|(kind, _, name)| kind == "map" && name == "VIGIL_CAPTURE_CGROUPS"),
        "{objects:?}"
    );
    assert_clean_exit(&mut agent)?;
    assert_all_gone(&objects)
}
