//! Admission control on the real kernel: four `vigil-origin` processes of
//! fixed capacity (4 slots each, 100 ms per request: 160 connections/s in
//! all) sharing one SO_REUSEPORT group, offered three times that by an
//! open-loop stream of new connections.
//!
//! What is asserted are counts, not timings (goodput and latency are in
//! BENCHMARKS.md, `cargo xtask bench --admission-only`):
//! - the steering program's refusals against the clients' and the
//!   kernel's: each connection a client saw refused is a SYN the program
//!   refused (an SK_DROP answers the SYN with a reset), and the program may
//!   refuse more SYNs than that only by as many as the kernel retransmitted
//!   (TcpExt TCPSynRetrans over the run: a retransmitted SYN, or the SYN of
//!   a handshake whose first was dropped on a full queue, runs the program
//!   again; measured here: the difference equals TCPSynRetrans);
//! - the floor: the refused share of a run stays under 1 - floor (0.9)
//!   plus four standard deviations of its binomial count;
//! - after SIGKILL, once the heartbeat is stale, no connection is refused;
//! - recommend mode refuses nothing and loads no program.

use serde_json::Value;
use std::{
    thread,
    time::{Duration, Instant},
};

use vigil_integration_tests::{
    acting::{
        actuation, group_of, serial, steering_programs, wait_for_decision, wait_for_group, Fleet,
    },
    bpf_available, vigil_status, Agent, OtlpSink,
};
use vigil_testbed::{
    connload::{self, ConnLoadConfig, ConnOutcome, ConnRecord},
    netns::MibSnapshot,
};

/// 4 slots x 4 workers / 100 ms: 160 connections/s.
const ORIGIN: [&str; 6] = [
    "--slots-per-worker",
    "4",
    "--service-ms",
    "100",
    "--backlog",
    "64",
];
/// Three times the origin's capacity.
const OVERLOAD_PER_SEC: u32 = 480;
const FLOOR: f64 = 0.1;

fn overload(fleet: &Fleet, seconds: f64) -> anyhow::Result<Vec<ConnRecord>> {
    connload::run(&ConnLoadConfig {
        target: fleet.addr,
        rate: OVERLOAD_PER_SEC,
        duration: Duration::from_secs_f64(seconds),
        timeout: Duration::from_secs(3),
        path: "/live/demo/seg0.ts".into(),
    })
}

fn count(records: &[ConnRecord], outcome: ConnOutcome) -> u64 {
    records.iter().filter(|r| r.outcome == outcome).count() as u64
}

/// The most the refused share of `n` connections may be when at most
/// 1 - FLOOR of them is refused: the mean plus four standard deviations.
fn refused_share_bound(n: u64) -> f64 {
    let p = 1.0 - FLOOR;
    p + 4.0 * (p * (1.0 - p) / n.max(1) as f64).sqrt()
}

#[test]
fn an_overload_is_shed_in_the_kernel_and_every_refusal_is_counted() -> anyhow::Result<()> {
    if !bpf_available("an_overload_is_shed_in_the_kernel_and_every_refusal_is_counted") {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start_with("adshed", 19311, &ORIGIN)?;
    let mut agent = Agent::start(&[
        "--actuation",
        "enforce",
        "--act-on",
        &fleet.selector(),
        "--admission-law",
        "pie",
    ])?;
    wait_for_group(&agent, fleet.addr, "enforced")?;

    let mib_before = MibSnapshot::of_current_thread()?;
    let records = overload(&fleet, 6.0)?;
    // Connections still in flight are over: overload() waits for every one.
    let syn_retransmits = MibSnapshot::of_current_thread()?
        .delta(&mib_before, "TcpExt", "TCPSynRetrans")
        .unwrap_or(0);
    let (refused, answered, offered) = (
        count(&records, ConnOutcome::Refused),
        count(&records, ConnOutcome::Answered),
        records.len() as u64,
    );
    eprintln!(
        "{offered} offered: {answered} answered, {refused} refused, {} timed out",
        count(&records, ConnOutcome::TimedOut)
    );
    assert!(refused > 0, "a threefold overload is shed");
    assert!(answered > 0);
    let share = refused as f64 / offered as f64;
    assert!(
        share <= refused_share_bound(offered),
        "the floor admits at least {FLOOR} of new connections: {share}"
    );
    let start = wait_for_decision(&agent, fleet.addr, "start_shedding", true)?;
    assert!(
        start["signal"]
            .as_str()
            .is_some_and(|s| s.contains("queue delay") && s.contains("saturated")),
        "{start:#}"
    );
    assert_eq!(start["before"], "admits every new connection", "{start:#}");
    // Load over, queues empty: shedding stops, with a record.
    let stop = wait_for_decision(&agent, fleet.addr, "stop_shedding", true)?;
    assert_eq!(stop["after"], "admits every new connection", "{stop:#}");

    let group = group_of(&actuation(&agent)?, fleet.addr).expect("the group is listed");
    assert_eq!(group["admission"], "pie", "{group:#}");
    assert_eq!(group["shed_fraction"], 0.0, "{group:#}");
    let program_refused = group["connections"]["refused"].as_u64().unwrap_or(0);
    eprintln!("the program refused {program_refused} SYNs; {syn_retransmits} SYNs retransmitted");
    assert!(
        (refused..=refused + syn_retransmits).contains(&program_refused),
        "refused: clients {refused}, program {program_refused}, TCPSynRetrans {syn_retransmits}: {group:#}"
    );
    let metrics = agent.scrape()?;
    let scraped = metrics
        .lines()
        .find(|l| {
            l.starts_with("vigil_reuseport_connections_total{")
                && l.contains(r#"outcome="refused""#)
        })
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok());
    assert_eq!(scraped, Some(program_refused as f64), "{metrics}");
    for gauge in [
        "vigil_reuseport_shed_fraction{",
        "vigil_reuseport_queue_delay_seconds{",
        "vigil_reuseport_failing_open{",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(gauge)),
            "{gauge}: {metrics}"
        );
    }
    let (code, out) = vigil_status(&agent)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("admission pie"), "{out}");
    assert!(out.contains("stop_shedding"), "{out}");

    assert!(agent.terminate()?.success());
    assert_eq!(steering_programs()?, 0, "SIGTERM detaches the program");
    Ok(())
}

#[test]
fn a_killed_agent_refuses_nothing_once_its_heartbeat_is_stale() -> anyhow::Result<()> {
    if !bpf_available("a_killed_agent_refuses_nothing_once_its_heartbeat_is_stale") {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start_with("adkill", 19312, &ORIGIN)?;
    let selector = fleet.selector();
    let args = ["--actuation", "enforce", "--act-on", selector.as_str()];
    let mut agent = Agent::start(&args)?;
    wait_for_group(&agent, fleet.addr, "enforced")?;

    let started = Instant::now();
    let load = {
        let fleet_addr = fleet.addr;
        thread::spawn(move || {
            connload::run(&ConnLoadConfig {
                target: fleet_addr,
                rate: OVERLOAD_PER_SEC,
                duration: Duration::from_secs(8),
                timeout: Duration::from_secs(3),
                path: "/live/demo/seg0.ts".into(),
            })
        })
    };
    // Shedding in earnest before the kill.
    let deadline = Instant::now() + Duration::from_secs(5);
    while group_of(&actuation(&agent)?, fleet.addr)
        .and_then(|g| g["shed_fraction"].as_f64())
        .unwrap_or(0.0)
        < 0.3
    {
        assert!(
            Instant::now() < deadline,
            "no shedding: {}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    agent.kill()?;
    let killed = started.elapsed().as_secs_f64();
    let records = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    assert_eq!(steering_programs()?, 1, "a killed agent cannot detach");

    // The default heartbeat timeout is 1 s; 0.2 s more for the poll that
    // wrote the last heartbeat and the clock between the two processes.
    let stale = killed + 1.2;
    let before = records.iter().filter(|r| r.at_secs < killed);
    let after: Vec<&ConnRecord> = records.iter().filter(|r| r.at_secs >= stale).collect();
    let refused_before = before.filter(|r| r.outcome == ConnOutcome::Refused).count();
    let refused_after = after
        .iter()
        .filter(|r| r.outcome == ConnOutcome::Refused)
        .count();
    eprintln!(
        "killed at {killed:.1} s: {refused_before} refused before; {} connections from {stale:.1} s, {refused_after} refused",
        after.len()
    );
    assert!(refused_before > 0);
    assert!(after.len() >= 1000, "enough connections after the timeout");
    assert_eq!(refused_after, 0, "fail-open never refuses");

    // A restart replaces the orphan; SIGTERM leaves nothing behind.
    let mut agent = Agent::start(&args)?;
    wait_for_group(&agent, fleet.addr, "enforced")?;
    assert!(agent.terminate()?.success());
    assert_eq!(steering_programs()?, 0, "nothing left behind");
    Ok(())
}

#[test]
fn recommend_mode_decides_to_shed_and_refuses_nothing() -> anyhow::Result<()> {
    if !bpf_available("recommend_mode_decides_to_shed_and_refuses_nothing") {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start_with("adrec", 19313, &ORIGIN)?;
    let sink = OtlpSink::start("adrec-otlp")?;
    let endpoint = sink.endpoint();
    let mut agent = Agent::start_with_env(
        &["--act-on", &fleet.selector()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRICS_EXPORTER", "none"),
        ],
    )?;
    wait_for_group(&agent, fleet.addr, "recommended")?;
    let records = overload(&fleet, 5.0)?;
    assert_eq!(count(&records, ConnOutcome::Refused), 0, "nothing refused");
    let start = wait_for_decision(&agent, fleet.addr, "start_shedding", false)?;
    assert_eq!(start["mode"], "recommend", "{start:#}");
    assert_eq!(steering_programs()?, 0, "recommend loads no program");
    let (code, out) = vigil_status(&agent)?;
    assert_eq!(code, Some(0), "{out}");
    // The latest ten decisions: the fraction's moves after the start.
    assert!(out.contains("shed_fraction (not applied)"), "{out}");
    assert!(out.contains("admission pie"), "{out}");
    assert!(agent.terminate()?.success());

    // Every decision is an OTLP log record too (flushed at exit).
    let decisions: Vec<Value> = sink
        .requests("logs")?
        .iter()
        .filter_map(|r| r["records"].as_array())
        .flatten()
        .filter(|r| r["body"] == "actuation decision")
        .cloned()
        .collect();
    let started = decisions
        .iter()
        .find(|r| r["attributes"]["vigil.actuation.action"] == "start_shedding")
        .unwrap_or_else(|| panic!("no start_shedding log record: {decisions:#?}"));
    assert_eq!(started["attributes"]["vigil.actuation.mode"], "recommend");
    assert_eq!(started["attributes"]["vigil.actuation.applied"], 0);
    assert!(started["attributes"]["vigil.actuation.group"]
        .as_str()
        .is_some_and(|g| g.ends_with(&fleet.addr.to_string())));
    assert!(started["attributes"]["vigil.actuation.signal"]
        .as_str()
        .is_some_and(|s| s.contains("queue delay")));
    Ok(())
}
