//! The control API against the real agent, through a Python client generated
//! from the proto alone (grpcio-tools): a service registers and its pool is
//! grown within the periods it reports slow fetches; a process in another
//! cgroup cannot read or change that registration; malformed and
//! out-of-range requests get the right status and change nothing; a flood
//! of streams is refused past the workload's bound, and a client that holds
//! streams without reading, then dies, blocks neither the control loop nor
//! other clients.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::Value;
use vigil_integration_tests::{bpf_available, tag, Agent, TempPath, TestCgroup};
use vigil_testbed::netns::{in_cgroup, ChildGuard};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The venv `cargo xtask setup` makes (grpcio-tools), or $VIGIL_PYTHON.
fn python() -> anyhow::Result<PathBuf> {
    let python = std::env::var_os("VIGIL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/control-python/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "{} cannot import grpc_tools: run `cargo xtask setup` (it installs grpcio-tools)",
            python.display()
        );
    }
    Ok(python)
}

/// The Python client in `cgroup`, running `scenario`.
fn client(cgroup: &TestCgroup, socket: &Path, scenario: &[&str]) -> anyhow::Result<ChildGuard> {
    let mut cmd = Command::new(python()?);
    cmd.arg(workspace().join("integration-tests/python/control_client.py"))
        .arg("--socket")
        .arg(socket)
        .arg("--proto-root")
        .arg(workspace().join("proto"))
        .args(scenario);
    let mut cmd = in_cgroup(&cgroup.procs(), &cmd);
    cmd.stdout(Stdio::piped());
    ChildGuard::spawn(&mut cmd)
}

/// The next JSON line the client prints that has `key`.
fn line_with(c: &mut ChildGuard, key: &str, timeout: Duration) -> anyhow::Result<Value> {
    let line = c.wait_for_stdout_line(&format!("\"{key}\""), timeout)?;
    serde_json::from_str(&line).with_context(|| format!("client printed {line:?}"))
}

#[test]
fn the_control_api_serves_only_each_workload_its_own_targets() -> anyhow::Result<()> {
    if !bpf_available("the_control_api_serves_only_each_workload_its_own_targets") {
        return Ok(());
    }
    let t = tag("ctl");
    let service = TestCgroup::create(&format!("vigil-it-{t}/service"))?;
    let intruder = TestCgroup::create(&format!("vigil-it-{t}/intruder"))?;
    let dir = TempPath::new("control-api");
    std::fs::create_dir_all(&dir.0)?;
    let socket = dir.0.join("control.sock");
    let selector = format!("cgroup:{}", service.rel);
    let socket_arg = socket.to_string_lossy().into_owned();
    let mut agent = Agent::start(&[
        "--actuation",
        "enforce",
        "--act-on",
        &selector,
        "--control-socket",
        &socket_arg,
    ])?;

    // A selected service: binding targets; its pool grows within the three
    // one-second periods it reports requests holding connections 250 ms.
    let started = Instant::now();
    let mut svc = client(&service, &socket, &["register"])?;
    let reg = line_with(&mut svc, "registration", Duration::from_secs(20))?;
    assert_eq!(reg["workload"], format!("cgroup {}", service.rel), "{reg}");
    assert_eq!(reg["mode"], "MODE_BINDING", "{reg}");
    assert_eq!(reg["control_period_ms"], 1000, "{reg}");
    let id = reg["registration"]
        .as_str()
        .context("registration id")?
        .to_owned();
    let grown = line_with(&mut svc, "target", Duration::from_secs(20))?;
    let target = &grown["target"];
    assert_eq!(target["mode"], "MODE_BINDING", "{grown}");
    // Little's law: 100/s x 250 ms x 1.25 = 32 connections; one step at most
    // doubles: 4 -> 8, max open twice that.
    assert_eq!(
        (target["max_idle"].as_u64(), target["max_open"].as_u64()),
        (Some(8), Some(16)),
        "{grown}"
    );
    assert!(
        target["reason"]
            .as_str()
            .is_some_and(|r| r.contains("need 32")),
        "{grown}"
    );
    assert_eq!(grown["reports"], 3, "{grown}");
    eprintln!("pool grown after {:?}", started.elapsed());
    // `vigil status` and /v1/actuation show the registration and its target.
    let view = vigil_integration_tests::acting::actuation(&agent)?;
    let shown = view["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["workload"] == reg["workload"]).cloned())
        .with_context(|| format!("no service in {view:#}"))?;
    assert_eq!(shown["mode"], "binding", "{shown}");
    // The status is a moment later: by then the pool may have grown again
    // (8, 16, 32: one doubling per period).
    assert!(shown["generation"].as_u64() >= Some(1), "{shown}");
    assert!(
        shown["targets"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t
                .as_str()
                .is_some_and(|t| t.starts_with("pool upstream max_idle=")))),
        "{shown}"
    );

    // Another cgroup cannot watch or report to it.
    let mut other = client(&intruder, &socket, &["intrude", &id])?;
    let denied = line_with(&mut other, "watch", Duration::from_secs(20))?;
    assert_eq!(denied["watch"], "PERMISSION_DENIED", "{denied}");
    assert_eq!(denied["report"], "PERMISSION_DENIED", "{denied}");

    // Malformed requests: each refused with its status.
    let mut bad = client(&intruder, &socket, &["malformed"])?;
    let codes = line_with(&mut bad, "min_above_max", Duration::from_secs(30))?;
    for (case, code) in [
        ("min_above_max", "INVALID_ARGUMENT"),
        ("negative_size", "INVALID_ARGUMENT"),
        ("pool_twice", "INVALID_ARGUMENT"),
        ("oversized", "RESOURCE_EXHAUSTED"),
        ("no_registration", "NOT_FOUND"),
        ("unknown_pool_report", "INVALID_ARGUMENT"),
        ("nan_report", "INVALID_ARGUMENT"),
        ("good_after_bad", "OK"),
    ] {
        assert_eq!(codes[case], code, "{case}: {codes}");
    }

    // A flood of watches from one workload: 8 held, the rest refused. The
    // holder never reads; the control loop and other clients go on.
    let mut flood = client(&intruder, &socket, &["flood", "12"])?;
    let held = line_with(&mut flood, "held", Duration::from_secs(30))?;
    assert_eq!(
        (held["held"].as_u64(), held["refused"].as_u64()),
        (Some(8), Some(4)),
        "{held}"
    );
    let mut again = client(&service, &socket, &["register"])?;
    let regrown = line_with(&mut again, "target", Duration::from_secs(30))?;
    assert_eq!(regrown["target"]["max_idle"], 8, "{regrown}");
    // The holder dies: its streams are released, its workload may open more.
    flood.child_mut().kill()?;
    flood.child_mut().wait()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut next = client(&intruder, &socket, &["flood", "8"])?;
        let held = line_with(&mut next, "held", Duration::from_secs(30))?;
        if held["held"] == 8 {
            break;
        }
        if Instant::now() > deadline {
            bail!("a dead client's streams were not released: {held}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    let metrics = agent.scrape()?;
    let refused = |code: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("vigil_control_refusals_total{{code=\"{code}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(refused("permission_denied") >= 2, "{metrics}");
    assert!(refused("invalid_argument") >= 5, "{metrics}");
    assert!(refused("resource_exhausted") >= 4, "{metrics}");
    let audit = agent.log_text();
    assert!(
        audit.contains("set_target"),
        "no audit record of the target change"
    );

    assert!(agent.terminate()?.success());
    assert!(!socket.exists(), "the agent left its control socket behind");
    Ok(())
}
