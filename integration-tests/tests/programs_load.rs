//! Every program of the build loads, so verifies, on the running kernel
//! (`vigil hooks --check`), and a signal the agent cannot deliver is loud:
//! its log, `/healthz`, `vigil status` and `vigil_signal_degraded` say so.
//!
//! Kernel builds differ in what their verifiers accept (6.18.44-fc-v657
//! took a sampler that -v1272 and -v1300 reject), so this runs on whatever
//! kernel CI has. A program rejected on a hook the kernel has fails; a hook
//! the kernel lacks is reported. The fault build (`cargo xtask test` makes
//! it: the sampler reads through a plain number) shows that the check and
//! the agent catch a program no verifier accepts.

use std::{path::PathBuf, process::Command};

use anyhow::Context;
use serde_json::Value;
use vigil_integration_tests::{bpf_available, vigil_status, Agent};
use vigil_testbed::{netns::bin_path, prom::get};

/// Set by `cargo xtask test` to the fault build's object.
const FAULT_OBJECT_ENV: &str = "VIGIL_FAULT_PROBES_OBJECT";

fn check(args: &[&str]) -> anyhow::Result<(Option<i32>, String)> {
    let out = Command::new(bin_path("vigil")?)
        .args(["hooks", "--check"])
        .args(args)
        .output()
        .context("running vigil hooks --check")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code(), text))
}

/// The fault build's object: required in CI, a skip elsewhere.
fn fault_object(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os(FAULT_OBJECT_ENV).map(PathBuf::from);
    match path {
        Some(p) if p.is_file() => Some(p),
        other => {
            let why = format!("{test}: no fault build at {FAULT_OBJECT_ENV} ({other:?}); `cargo xtask test` builds it");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: {why}"
            );
            eprintln!("SKIPPED (not in CI): {why}");
            None
        }
    }
}

#[test]
fn every_program_verifies_on_this_kernel() -> anyhow::Result<()> {
    if !bpf_available("every_program_verifies_on_this_kernel") {
        return Ok(());
    }
    let (code, text) = check(&["--json"])?;
    let report: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
    let programs = report["programs"].as_array().context("programs")?;
    eprintln!("kernel {}", report["kernel"]);
    let mut rejected = Vec::new();
    for p in programs {
        let (hook, outcome) = (p["hook"].as_str().unwrap_or("?"), p["outcome"].as_str());
        eprintln!("{:<12} {hook}", outcome.unwrap_or("?"));
        match outcome {
            Some("verified") => {}
            Some("kernel_lacks") => eprintln!("  this kernel lacks it: {}", p["reason"]),
            _ => {
                let reason = p["reason"].as_str().unwrap_or_default();
                let tail: Vec<&str> = reason.lines().rev().take(12).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                rejected.push(format!("{hook}:\n  {}", tail.join("\n  ")));
            }
        }
    }
    assert!(
        rejected.is_empty(),
        "the kernel has these hooks but rejected Vigil's programs:\n{}",
        rejected.join("\n")
    );
    // Every hook the agent knows is checked, and nothing in the object escapes.
    let names = String::from_utf8(vigil_integration_tests::vigil_cli(&["hooks"])?)?;
    assert_eq!(programs.len(), names.lines().count(), "{text}");
    assert_eq!(report["unlisted"], serde_json::json!([]), "{text}");
    assert_eq!(code, Some(0), "{text}");

    // The agent on this kernel: every hook the kernel has is attached (or
    // superseded by one that is), nothing degraded, and it says so.
    let mut agent = Agent::start(&[])?;
    let (line, body) = get(agent.metrics_addr, "/healthz")?;
    assert!(line.contains(" 200 "), "{line}\n{body}");
    let health: Value = serde_json::from_str(&body)?;
    assert_eq!(health["status"], "ok", "{body}");
    let (code, out) = vigil_status(&agent)?;
    assert_eq!(code, Some(0), "vigil status on a healthy agent:\n{out}");
    assert!(out.contains("all delivered"), "{out}");
    let metrics = agent.scrape()?;
    assert!(
        metrics.contains(r#"vigil_signal_degraded{signal="socket_sampling"} 0"#),
        "{metrics}"
    );
    for p in programs.iter().filter(|p| p["outcome"] == "verified") {
        let hook = p["hook"].as_str().unwrap_or_default();
        let superseded = agent
            .logs()
            .iter()
            .any(|l| l["hook"] == hook && l["message"] == "hook not needed: another does its work");
        let active = metrics.lines().any(|l| {
            l.starts_with(&format!(r#"vigil_hook_active{{hook="{hook}""#)) && l.ends_with(" 1")
        });
        assert!(
            superseded || active,
            "{hook} verifies but the agent did not attach it:\n{}",
            agent.log_text()
        );
    }
    assert!(agent.terminate()?.success());
    Ok(())
}

#[test]
fn a_program_no_verifier_accepts_fails_the_check_naming_its_hook() -> anyhow::Result<()> {
    let test = "a_program_no_verifier_accepts_fails_the_check_naming_its_hook";
    if !bpf_available(test) {
        return Ok(());
    }
    let Some(object) = fault_object(test) else {
        return Ok(());
    };
    let object = object.display().to_string();
    let (code, text) = check(&["--probes-object", &object])?;
    assert_eq!(
        code,
        Some(1),
        "the fault build must fail the check:\n{text}"
    );
    let rejected: Vec<&str> = text.lines().filter(|l| l.starts_with("REJECTED")).collect();
    assert_eq!(rejected.len(), 1, "only the sampler is broken:\n{text}");
    assert!(rejected[0].contains("iter/task_file"), "{text}");
    assert!(rejected[0].contains("vigil_sock_iter"), "{text}");
    // The verifier's own words: a load through a scalar.
    assert!(text.contains("invalid mem access 'scalar'"), "{text}");
    assert!(
        text.contains("0 hooks missing from this kernel, 1 rejected"),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_degraded_agent_says_what_is_missing_everywhere() -> anyhow::Result<()> {
    let test = "a_degraded_agent_says_what_is_missing_everywhere";
    if !bpf_available(test) {
        return Ok(());
    }
    let Some(object) = fault_object(test) else {
        return Ok(());
    };
    let object = object.display().to_string();
    let mut agent = Agent::start(&["--probes-object", &object])?;
    // The log: what is lost and what to do, at error level.
    let line = agent
        .logs()
        .into_iter()
        .find(|l| {
            l["signal"] == "socket_sampling"
                && l["level"] == "ERROR"
                && l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("signal degraded"))
        })
        .with_context(|| agent.log_text())?;
    let message = line["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no listen queues, overflows or RTT"),
        "{line}"
    );
    assert!(
        line["remedy"]
            .as_str()
            .unwrap_or_default()
            .contains("vigil hooks --check"),
        "{line}"
    );
    assert!(
        line["hooks"]
            .as_str()
            .unwrap_or_default()
            .contains("iter/task_file rejected"),
        "{line}"
    );

    // /healthz: 503 with the same, as JSON.
    let (status_line, body) = get(agent.metrics_addr, "/healthz")?;
    assert!(status_line.contains(" 503 "), "{status_line}\n{body}");
    let health: Value = serde_json::from_str(&body)?;
    assert_eq!(health["status"], "degraded", "{body}");
    let degraded = health["degraded"].as_array().context("degraded")?;
    assert_eq!(degraded.len(), 1, "{body}");
    assert_eq!(degraded[0]["signal"], "socket_sampling", "{body}");
    assert_eq!(degraded[0]["hooks"][0]["hook"], "iter/task_file", "{body}");
    assert_eq!(degraded[0]["hooks"][0]["status"], "rejected", "{body}");

    // vigil status: exit 3 and the reason.
    let (code, out) = vigil_status(&agent)?;
    assert_eq!(code, Some(3), "vigil status on a degraded agent:\n{out}");
    assert!(out.contains("DEGRADED"), "{out}");
    assert!(
        out.contains("socket_sampling: no listen queues, overflows or RTT"),
        "{out}"
    );
    assert!(out.contains("iter/task_file rejected"), "{out}");

    let metrics = agent.scrape()?;
    assert!(
        metrics.contains(r#"vigil_signal_degraded{signal="socket_sampling"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vigil_signal_degraded{signal="retransmit"} 0"#),
        "{metrics}"
    );
    assert!(agent.terminate()?.success());

    // An agent that cannot be asked: exit 1, not 3.
    let out = Command::new(bin_path("vigil")?)
        .args(["status", "--agent", "127.0.0.1:1"])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    Ok(())
}
