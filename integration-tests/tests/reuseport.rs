//! Steering new connections of a SO_REUSEPORT group around a stalled
//! worker, on the real kernel: four `vigil-origin` processes (one listener
//! each, one group) in a cgroup of their own, one stopped with SIGSTOP.
//!
//! Traffic is new connections to 127.0.0.1 only, each asking for one small
//! segment and waiting at most `ANSWER_TIMEOUT` for the response head. Each
//! worker serves a different segment size, so a response names its worker.
//! The kernel's hash gives a stopped worker about a quarter of them, which
//! then wait in its accept queue unanswered.
//!
//! Tolerances: counts of new connections are binomial. Where a quarter is
//! expected to hang, at least `HASH_SHARE_FLOOR` must (n >= 100 makes a
//! share below 0.10 four standard deviations away); where steering must
//! answer, 99% (the issue's bound) over at least 200 connections.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use vigil_integration_tests::{
    abort,
    acting::{
        acting_objects, actuation, serial, steering_programs, wait_for_decision, wait_for_group,
        wait_until_released, Fleet,
    },
    bpf_available, bpftool_shows, tag, vigil_status, Agent, TestCgroup,
};
use vigil_testbed::netns::{bin_path, in_cgroup, spawn_origin, ChildGuard};

/// How long a connection waits for its response head: loopback answers in
/// about a millisecond; a stopped worker never does.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(500);
/// New connections opened at once in each round.
const PER_ROUND: usize = 40;
/// Least share of connections the kernel's hash leaves to a stopped worker
/// of four (expected: a quarter).
const HASH_SHARE_FLOOR: f64 = 0.10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Answered by the worker serving segments of this many bytes.
    Answered(u64),
    Unanswered,
    /// connect() failed at once (an SK_DROP).
    Refused,
}

fn one_connection(addr: SocketAddr) -> Outcome {
    let stream = match TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(_) => return Outcome::Unanswered,
    };
    let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    let mut s = &stream;
    if s.write_all(b"GET /live/demo/seg0.ts HTTP/1.1\r\nHost: vigil\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        abort(stream);
        return Outcome::Unanswered;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    abort(stream);
    text.lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .map_or(Outcome::Unanswered, Outcome::Answered)
}

/// New connections in rounds of `PER_ROUND` for `length`: each with the
/// time it started, measured from `since`.
fn traffic(addr: SocketAddr, since: Instant, length: Duration) -> Vec<(Duration, Outcome)> {
    let mut out = Vec::new();
    let end = Instant::now() + length;
    while Instant::now() < end {
        let round: Vec<_> = (0..PER_ROUND)
            .map(|_| {
                thread::spawn(move || {
                    let at = since.elapsed();
                    (at, one_connection(addr))
                })
            })
            .collect();
        out.extend(round.into_iter().filter_map(|h| h.join().ok()));
    }
    out
}

fn share(results: &[(Duration, Outcome)], pick: impl Fn(Outcome) -> bool) -> f64 {
    let n = results.iter().filter(|(_, o)| pick(*o)).count();
    n as f64 / results.len().max(1) as f64
}

fn between(
    results: &[(Duration, Outcome)],
    from: Duration,
    to: Duration,
) -> Vec<(Duration, Outcome)> {
    results
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .copied()
        .collect()
}

/// Share of `results` answered by worker `worker` of `fleet`.
fn answered_by(fleet: &Fleet, results: &[(Duration, Outcome)], worker: usize) -> f64 {
    let bytes = fleet.workers[worker].2;
    share(results, |o| o == Outcome::Answered(bytes))
}

#[test]
fn a_stalled_worker_is_steered_around_and_gets_its_share_back() -> anyhow::Result<()> {
    if !bpf_available("a_stalled_worker_is_steered_around_and_gets_its_share_back") {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start("rpstall", 19301)?;

    // Without Vigil: the kernel's hash keeps giving the stopped worker its share.
    let t0 = Instant::now();
    fleet.stop(0)?;
    let without = traffic(fleet.addr, t0, Duration::from_secs(3));
    fleet.resume(0)?;
    let hung = share(&without, |o| o == Outcome::Unanswered);
    eprintln!(
        "without Vigil: {} connections, {:.1}% unanswered",
        without.len(),
        hung * 100.0
    );
    assert!(
        hung >= HASH_SHARE_FLOOR,
        "a stopped worker of four should leave about a quarter unanswered: {hung}"
    );
    thread::sleep(Duration::from_secs(1));

    let mut agent = Agent::start(&["--actuation", "enforce", "--act-on", &fleet.selector()])?;
    let group = wait_for_group(&agent, fleet.addr, "enforced")?;
    assert!(group["program_id"].as_u64().is_some(), "{group:#}");
    assert_eq!(steering_programs()?, 1);

    let t0 = Instant::now();
    fleet.stop(0)?;
    let stalled = traffic(fleet.addr, t0, Duration::from_millis(4500));
    let settled = between(
        &stalled,
        Duration::from_millis(1500),
        Duration::from_secs(10),
    );
    let answered = share(&settled, |o| matches!(o, Outcome::Answered(_)));
    eprintln!(
        "with Vigil, from 1.5 s after the stall: {} connections, {:.2}% answered",
        settled.len(),
        answered * 100.0
    );
    assert!(
        settled.len() >= 200,
        "enough connections to tell 99%: {}",
        settled.len()
    );
    assert!(answered >= 0.99, "{answered}: {:?}", agent.log_text());
    let away = wait_for_decision(&agent, fleet.addr, "steer_away", true)?;
    assert!(
        away["member"]
            .as_str()
            .unwrap_or_default()
            .contains(&fleet.workers[0].1.to_string()),
        "{away:#}"
    );

    let t1 = Instant::now();
    fleet.resume(0)?;
    let resumed = traffic(fleet.addr, t1, Duration::from_secs(4));
    let later = between(&resumed, Duration::from_secs(2), Duration::from_secs(10));
    let back = answered_by(&fleet, &later, 0);
    eprintln!(
        "from 2 s after SIGCONT: worker 0 answered {:.1}%",
        back * 100.0
    );
    assert!(
        back >= HASH_SHARE_FLOOR,
        "the resumed worker gets its share again: {back}"
    );
    assert!(share(&later, |o| matches!(o, Outcome::Answered(_))) >= 0.99);
    wait_for_decision(&agent, fleet.addr, "restore", true)?;

    let metrics = agent.scrape()?;
    let steered = metrics
        .lines()
        .find(|l| {
            l.starts_with("vigil_reuseport_connections_total{")
                && l.contains(r#"outcome="steered""#)
        })
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(steered > 0.0, "{metrics}");

    assert!(agent.terminate()?.success());
    assert_eq!(steering_programs()?, 0, "SIGTERM detaches the program");
    let text = agent.log_text();
    assert!(text.contains("every steering program detached"), "{text}");
    Ok(())
}

#[test]
fn a_killed_agent_fails_open_and_a_restart_leaves_nothing_behind() -> anyhow::Result<()> {
    if !bpf_available("a_killed_agent_fails_open_and_a_restart_leaves_nothing_behind") {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start("rpkill", 19302)?;
    let selector = fleet.selector();
    let args = ["--actuation", "enforce", "--act-on", selector.as_str()];
    let mut agent = Agent::start(&args)?;
    wait_for_group(&agent, fleet.addr, "enforced")?;
    let killed = ledger_of_acting(&agent)?;
    let t0 = Instant::now();
    fleet.stop(0)?;
    let steering = traffic(fleet.addr, t0, Duration::from_secs(2));
    let settled = between(
        &steering,
        Duration::from_millis(1500),
        Duration::from_secs(10),
    );
    assert!(share(&settled, |o| o == Outcome::Unanswered) < HASH_SHARE_FLOOR);

    agent.kill()?;
    // The heartbeat (1 s by default) goes stale; the program stays attached.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(steering_programs()?, 1, "a killed agent cannot detach");
    let t1 = Instant::now();
    let open = traffic(fleet.addr, t1, Duration::from_secs(3));
    let refused = share(&open, |o| o == Outcome::Refused);
    let hung = share(&open, |o| o == Outcome::Unanswered);
    eprintln!(
        "after SIGKILL: {} connections, {:.1}% unanswered, {refused} refused",
        open.len(),
        hung * 100.0
    );
    assert_eq!(refused, 0.0, "fail-open never refuses");
    assert!(
        hung >= HASH_SHARE_FLOOR,
        "the kernel's hash selects again, the stopped worker included: {hung}"
    );
    fleet.resume(0)?;

    // A restart enforcing the group replaces the orphan; SIGTERM removes its own.
    let mut agent = Agent::start(&args)?;
    wait_for_group(&agent, fleet.addr, "enforced")?;
    let restarted = ledger_of_acting(&agent)?;
    wait_until_released(
        &killed,
        "the killed agent's program and maps to be released",
    )?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while steering_programs()? != 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        steering_programs()?,
        1,
        "the predecessor's program was replaced, not added to"
    );
    assert!(agent.terminate()?.success());
    assert_eq!(steering_programs()?, 0, "nothing left behind");
    wait_until_released(
        &restarted,
        "every object of acting to be released after SIGTERM",
    )?;
    Ok(())
}

/// Acting's kernel objects in the agent's ledger: one steering program and
/// its three maps for the one group, each visible to bpftool (so the checks
/// that they go away can fail).
fn ledger_of_acting(agent: &Agent) -> anyhow::Result<Vec<(String, u64, String)>> {
    let objects = acting_objects(agent);
    let mut names: Vec<&str> = objects.iter().map(|(_, _, n)| n.as_str()).collect();
    names.sort_unstable();
    anyhow::ensure!(
        names
            == [
                "VIGIL_RP_CONTROL",
                "VIGIL_RP_COUNTS",
                "VIGIL_RP_MEMBERS",
                "vigil_reuseport"
            ],
        "acting's objects in the ledger: {objects:?}"
    );
    for (kind, id, name) in &objects {
        anyhow::ensure!(
            bpftool_shows(kind, *id),
            "{kind} {name} (id {id}) not visible while enforcing"
        );
    }
    Ok(objects)
}

#[test]
fn recommend_mode_decides_the_same_and_changes_nothing() -> anyhow::Result<()> {
    if !bpf_available("recommend_mode_decides_the_same_and_changes_nothing") {
        return Ok(());
    }
    let _serial = serial();
    let fleet = Fleet::start("rprec", 19303)?;
    // recommend is the default mode.
    let mut agent = Agent::start(&["--act-on", &fleet.selector()])?;
    wait_for_group(&agent, fleet.addr, "recommended")?;
    let t0 = Instant::now();
    fleet.stop(0)?;
    let results = traffic(fleet.addr, t0, Duration::from_secs(3));
    let away = wait_for_decision(&agent, fleet.addr, "steer_away", false)?;
    assert_eq!(away["mode"], "recommend", "{away:#}");
    assert_eq!(steering_programs()?, 0, "recommend loads no program");
    let hung = share(&results, |o| o == Outcome::Unanswered);
    assert!(
        hung >= HASH_SHARE_FLOOR,
        "nothing changed in the kernel: {hung}"
    );
    fleet.resume(0)?;
    wait_for_decision(&agent, fleet.addr, "restore", false)?;
    let (code, out) = vigil_status(&agent)?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("actuation       recommend"), "{out}");
    assert!(out.contains("steer_away (not applied)"), "{out}");
    assert!(agent.terminate()?.success());
    Ok(())
}

#[test]
fn listeners_it_may_not_touch_are_refused_and_left_alone() -> anyhow::Result<()> {
    if !bpf_available("listeners_it_may_not_touch_are_refused_and_left_alone") {
        return Ok(());
    }
    let _serial = serial();
    let selected = TestCgroup::create(&format!("vigil-it-{}/selected", tag("rpref")))?;
    let origin = bin_path("vigil-origin")?;
    // A group one of whose members is outside the selection.
    let mixed = SocketAddr::from(([127, 0, 0, 1], 19304));
    let inside = std::process::Command::new(&origin);
    let (_a, _) = spawn_origin(&mut in_cgroup(&selected.procs(), &inside), mixed, 1, 60)?;
    let (_b, _) = spawn_origin(&mut std::process::Command::new(&origin), mixed, 1, 60)?;
    // A listener without SO_REUSEPORT in the selection.
    let plain_port = 19305;
    let script = format!(
        "import socket,sys,time\ns=socket.socket()\ns.bind(('127.0.0.1',{plain_port}))\ns.listen(8)\nprint('listening',flush=True)\ntime.sleep(60)\n"
    );
    let mut python = std::process::Command::new("python3");
    python.args(["-c", &script]);
    let mut plain = in_cgroup(&selected.procs(), &python);
    plain.stdout(std::process::Stdio::piped());
    let mut plain = ChildGuard::spawn(&mut plain)?;
    plain.wait_for_stdout_line("listening", Duration::from_secs(10))?;
    // A group nobody selected.
    let other = SocketAddr::from(([127, 0, 0, 1], 19306));
    let (_c, _) = spawn_origin(&mut std::process::Command::new(&origin), other, 2, 60)?;

    let selector = format!("cgroup:{}", selected.rel);
    let mut agent = Agent::start(&["--actuation", "enforce", "--act-on", &selector])?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let reasons: HashMap<String, String> = loop {
        let view = actuation(&agent)?;
        let refused: HashMap<String, String> = view["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|g| g["state"] == "refused")
            .map(|g| {
                (
                    g["group"].as_str().unwrap_or_default().to_owned(),
                    g["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        if refused.len() >= 2 || Instant::now() > deadline {
            break refused;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let reason_of = |addr: &str| {
        reasons
            .iter()
            .find(|(g, _)| g.ends_with(&format!("/{addr}")))
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    };
    assert!(
        reason_of(&mixed.to_string()).contains("outside the selection"),
        "{reasons:#?}"
    );
    assert!(
        reason_of(&format!("127.0.0.1:{plain_port}")).contains("no SO_REUSEPORT"),
        "{reasons:#?}"
    );
    let view = actuation(&agent)?;
    let listed = view["groups"].to_string();
    assert!(
        !listed.contains(&other.to_string()),
        "a group nobody selected is not acted on: {listed}"
    );
    let refusals = view["decisions"]
        .as_array()
        .map(|d| d.iter().filter(|r| r["action"] == "refuse").count())
        .unwrap_or(0);
    assert!(refusals >= 2, "each refusal is an audit record: {view:#}");
    assert!(agent.log_text().contains("actuation refused"));
    assert_eq!(steering_programs()?, 0, "a refusal changes nothing");
    assert!(agent.terminate()?.success());
    Ok(())
}
