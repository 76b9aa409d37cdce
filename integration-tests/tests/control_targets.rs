//! Targets of the control API acted on by the testbed origin, against the
//! real kernel: its upstream pool grows within two control periods of loss
//! on the link to the upstream and shrinks after recovery, never outside
//! its bounds; under sustained accept-queue fill it is told to add a
//! listener, does, and the new listener joins the SO_REUSEPORT group that
//! steering enforces and takes new connections.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use vigil_integration_tests::{
    acting::{actuation, group_of},
    bpf_available, tag, Agent, TempPath, TestCgroup,
};
use vigil_testbed::{
    connload::{self, ConnLoadConfig},
    netns::{bin_path, in_cgroup, spawn_origin},
    pool_episode::{self, EpisodeConfig, IDLE_BOUNDS, OPEN_BOUNDS},
};

#[test]
fn the_pool_grows_within_two_periods_of_loss_and_shrinks_after_recovery() -> anyhow::Result<()> {
    let _serial = vigil_integration_tests::one_namespace_test_at_a_time();
    if !bpf_available("the_pool_grows_within_two_periods_of_loss_and_shrinks_after_recovery") {
        return Ok(());
    }
    let cgroup = TestCgroup::create(&format!("vigil-it-{}/front", tag("pool")))?;
    let dir = TempPath::new("pool-episode");
    std::fs::create_dir_all(&dir.0)?;
    let episode = pool_episode::run(&EpisodeConfig {
        agent_bin: bin_path("vigil")?,
        origin_bin: bin_path("vigil-origin")?,
        law: "kernel".into(),
        cgroup_procs: cgroup.procs(),
        selector: format!("cgroup:{}", cgroup.rel),
        link_tag: tag("pool"),
        link_index: 81,
        socket: dir.0.join("control.sock"),
        rate: 100,
        loss_percent: 10,
        baseline: Duration::from_secs(5),
        lossy: Duration::from_secs(6),
        recovery: Duration::from_secs(12),
    })?;
    let shown = format!("{:#?}", episode.applied);
    let period = episode.control_period;
    let grown = episode
        .first_change_after(episode.onset, true)
        .with_context(|| format!("the pool never grew after the onset: {shown}"))?;
    // Two periods: the service's report of the first lossy period, then the
    // agent's next tick. 250 ms more for scheduling on a loaded 2-core CI.
    let delay = grown.at - episode.onset;
    eprintln!("grown {delay:?} after the onset: {grown:?}");
    assert!(
        delay <= 2 * period + Duration::from_millis(250),
        "grew {delay:?} after the onset: {shown}"
    );
    let shrunk = episode
        .first_change_after(episode.recovery, false)
        .with_context(|| format!("the pool never shrank after recovery: {shown}"))?;
    eprintln!(
        "shrunk {:?} after recovery: {shrunk:?}",
        shrunk.at - episode.recovery
    );
    for a in &episode.applied {
        assert!(
            (IDLE_BOUNDS.0..=IDLE_BOUNDS.1).contains(&a.max_idle),
            "{a:?}"
        );
        assert!(
            (OPEN_BOUNDS.0..=OPEN_BOUNDS.1).contains(&a.max_open),
            "{a:?}"
        );
        assert!(a.max_open >= a.max_idle, "{a:?}");
    }
    let answered = episode.summary(Duration::ZERO, episode.recovery + Duration::from_secs(12));
    assert!(
        answered.answered * 10 >= answered.offered * 9,
        "viewers answered: {answered:?}"
    );
    Ok(())
}

#[test]
fn listeners_are_added_under_sustained_fill_and_join_the_steered_group() -> anyhow::Result<()> {
    if !bpf_available("listeners_are_added_under_sustained_fill_and_join_the_steered_group") {
        return Ok(());
    }
    let cgroup = TestCgroup::create(&format!("vigil-it-{}/origin", tag("lsn")))?;
    let dir = TempPath::new("listeners");
    std::fs::create_dir_all(&dir.0)?;
    let socket = dir.0.join("control.sock");
    let socket_arg = socket.to_string_lossy().into_owned();
    let selector = format!("cgroup:{}", cgroup.rel);
    let agent = Agent::start(&[
        "--actuation",
        "enforce",
        "--act-on",
        &selector,
        "--control-socket",
        &socket_arg,
        "--admission-law",
        "off",
    ])?;
    // Capacity 2 workers x 2 slots / 100 ms = 40 connections/s; offered 80.
    let addr = SocketAddr::from(([127, 0, 0, 1], 19433));
    let mut cmd = Command::new(bin_path("vigil-origin")?);
    cmd.args([
        "--slots-per-worker",
        "2",
        "--service-ms",
        "100",
        "--backlog",
        "8",
    ])
    .args(["--listener-bounds", "1:3", "--concurrency-bounds", "0:0"])
    .arg("--control-socket")
    .arg(&socket)
    .stderr(Stdio::null());
    let (mut origin, _) = spawn_origin(&mut in_cgroup(&cgroup.procs(), &cmd), addr, 2, 120)?;
    let load = std::thread::spawn(move || {
        connload::run(&ConnLoadConfig {
            target: addr,
            rate: 80,
            duration: Duration::from_secs(15),
            timeout: Duration::from_secs(2),
            path: "/live/lsn/seg0.ts".into(),
        })
    });
    let line = origin.wait_for_stdout_line("listeners=3", Duration::from_secs(15))?;
    assert!(line.contains("mode=binding applied=true"), "{line}");
    // Steering's group has the new member, and every member holds new
    // connections in its queue: the kernel hashes to the new listener too.
    let deadline = Instant::now() + Duration::from_secs(8);
    let group = loop {
        let view = actuation(&agent)?;
        if let Some(g) = group_of(&view, addr) {
            let members = g["members"].as_array().cloned().unwrap_or_default();
            if g["state"] == "enforced"
                && members.len() == 3
                && members.iter().all(|m| m["queue_len"].as_u64() > Some(0))
            {
                break g;
            }
        }
        if Instant::now() > deadline {
            bail!("no enforced group of 3 busy members: {view:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{group:#}");
    let records = load
        .join()
        .map_err(|_| anyhow::anyhow!("load panicked"))??;
    assert!(!records.is_empty());
    Ok(())
}
