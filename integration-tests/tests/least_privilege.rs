//! The Helm chart's capabilities are enough, and each is there for a reason:
//! the agent runs with exactly the set helm/vigil/values.yaml adds (read from
//! the chart, so the two cannot drift) and attaches every hook; without
//! NET_ADMIN the kernel refuses to attach the trace-context capture's
//! packet programs, which kernels without its tracepoints fall back to;
//! acting works with the same set, and says which capability it lacks.

use anyhow::{ensure, Context};
use vigil_integration_tests::{
    acting::{serial, steering_programs, wait_for_group, Fleet},
    bpf_available, metric_sum, vigil_cli, Agent,
};

const VALUES_YAML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/vigil/values.yaml");

/// The hooks of the HTTP trace-context capture.
const CAPTURE_HOOKS: [&str; 5] = [RECV, SEND, INGRESS, EGRESS, BEHIND_INGRESS];
/// Where this kernel reads messages: the applications' reads and writes.
const RECV: &str = "tp_btf/sock_recv_length";
const SEND: &str = "tp_btf/tcp_sendmsg_locked";
/// The fallbacks on kernels without `RECV` and `SEND`: every packet, with
/// cgroup_skb programs, which the kernel links only with CAP_NET_ADMIN.
const INGRESS: &str = "cgroup_skb/ingress";
const EGRESS: &str = "cgroup_skb/egress";
/// Of use only behind `INGRESS`, so not attached without it.
const BEHIND_INGRESS: &str = "tp_btf/inet_sock_set_state";
/// Not attached on this kernel: `RECV` and `SEND` do their work.
const SUPERSEDED: [&str; 3] = [INGRESS, EGRESS, BEHIND_INGRESS];

/// The one-line `add: [...]` list under `capabilities:` in the top-level
/// `securityContext:` of a values file.
fn security_context_capabilities(values: &str) -> anyhow::Result<Vec<String>> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_content = |l: &&str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let mut block = values
        .lines()
        .skip_while(|l| !l.starts_with("securityContext:"))
        .skip(1)
        .filter(is_content)
        .take_while(|l| indent(l) > 0);
    let capabilities = block
        .find(|l| l.trim_start().starts_with("capabilities:"))
        .context("no `capabilities:` under the top-level `securityContext:`")?;
    let depth = indent(capabilities);
    let add = block
        .take_while(|l| indent(l) > depth)
        .find_map(|l| l.trim_start().strip_prefix("add:"))
        .context("no `add:` under `securityContext.capabilities`")?;
    let list = add
        .trim()
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .with_context(|| format!("`add:{add}` is not a one-line [\"A\", \"B\"] list"))?;
    let capabilities: Vec<String> = list
        .split(',')
        .map(|c| c.trim().trim_matches(|q| q == '"' || q == '\'').to_owned())
        .filter(|c| !c.is_empty())
        .collect();
    ensure!(
        !capabilities.is_empty(),
        "securityContext.capabilities.add is empty"
    );
    Ok(capabilities)
}

fn chart_capabilities() -> anyhow::Result<Vec<String>> {
    let values =
        std::fs::read_to_string(VALUES_YAML).with_context(|| format!("reading {VALUES_YAML}"))?;
    security_context_capabilities(&values).with_context(|| format!("parsing {VALUES_YAML}"))
}

/// Every hook the agent knows, as `vigil hooks` lists them.
fn agent_hooks() -> anyhow::Result<Vec<String>> {
    let hooks: Vec<String> = String::from_utf8(vigil_cli(&["hooks"])?)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    for hook in CAPTURE_HOOKS {
        ensure!(
            hooks.iter().any(|h| h == hook),
            "`vigil hooks` no longer lists {hook}: {hooks:?}"
        );
    }
    Ok(hooks)
}

/// The `hook` field of every log line with `message` ("hook attached", ...).
fn hooks_logged(agent: &Agent, message: &str) -> Vec<String> {
    agent
        .logs()
        .iter()
        .filter(|v| v["message"].as_str() == Some(message))
        .filter_map(|v| v["hook"].as_str().map(str::to_owned))
        .collect()
}

/// SIGTERM ends the agent with exit status 0 (every hook released).
fn stops_cleanly(agent: &mut Agent) -> anyhow::Result<()> {
    let status = agent.terminate()?;
    assert!(
        status.success(),
        "exit status {status}\n{}",
        agent.log_text()
    );
    Ok(())
}

fn hook_active(metrics: &str, hook: &str) -> u64 {
    metric_sum(metrics, "vigil_hook_active", &[("hook", hook)])
}

#[test]
fn capability_list_is_read_from_the_security_context() -> anyhow::Result<()> {
    let values = "\
podSecurityContext:
  capabilities:
    add: [\"DECOY\"]
securityContext:
  runAsUser: 0
  capabilities:
    # comment
    drop: [\"ALL\"]
    add: [\"BPF\", 'PERFMON']
  seccompProfile:
    type: RuntimeDefault
";
    assert_eq!(security_context_capabilities(values)?, ["BPF", "PERFMON"]);
    let block_list = "securityContext:\n  capabilities:\n    add:\n      - BPF\n";
    let err = security_context_capabilities(block_list).expect_err("block list");
    assert!(format!("{err:#}").contains("one-line"), "{err:#}");
    let missing = "securityContext:\n  runAsUser: 0\nresources: {}\n";
    let err = security_context_capabilities(missing).expect_err("no capabilities");
    assert!(format!("{err:#}").contains("no `capabilities:`"), "{err:#}");
    Ok(())
}

#[test]
fn chart_capabilities_attach_every_hook() -> anyhow::Result<()> {
    if !bpf_available("chart_capabilities_attach_every_hook") {
        return Ok(());
    }
    let capabilities = chart_capabilities()?;
    let hooks = agent_hooks()?;
    let granted: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    let mut agent = Agent::start_with_capabilities(&granted, &[])?;
    let log = agent.log_text();

    let unavailable = hooks_logged(&agent, "hook unavailable");
    assert!(
        unavailable.is_empty(),
        "with the chart's capabilities {granted:?}, unavailable: {unavailable:?}\n{log}"
    );
    let mut superseded = hooks_logged(&agent, "hook not needed: another does its work");
    superseded.sort();
    let mut want = SUPERSEDED.map(str::to_owned).to_vec();
    want.sort();
    assert_eq!(superseded, want, "{log}");
    let attached = hooks_logged(&agent, "hook attached");
    let metrics = agent.scrape()?;
    for hook in hooks.iter().filter(|h| !superseded.contains(h)) {
        assert!(
            attached.contains(hook),
            "{hook} not attached with {granted:?}\n{log}"
        );
        assert_eq!(
            hook_active(&metrics, hook),
            1,
            "vigil_hook_active of {hook}"
        );
    }

    stops_cleanly(&mut agent)
}

/// Why the chart adds NET_ADMIN: CAP_BPF loads a cgroup_skb program, but the
/// kernel checks CAP_NET_ADMIN when one is attached. On this kernel the
/// capture needs none (it reads at `sock_recv_length` and
/// `tcp_sendmsg_locked`): without NET_ADMIN every hook attaches. Where the
/// capture falls back to the packets (forced here with `--disable-hook`, as
/// on kernels without those tracepoints), exactly the packet programs fail
/// (and the hand-off from listeners behind them).
#[test]
fn without_net_admin_only_the_packet_capture_is_unavailable() -> anyhow::Result<()> {
    if !bpf_available("without_net_admin_only_the_packet_capture_is_unavailable") {
        return Ok(());
    }
    let capabilities = chart_capabilities()?;
    assert!(
        capabilities.iter().any(|c| c == "NET_ADMIN"),
        "the chart must add NET_ADMIN (the packet capture hooks need it): {capabilities:?}"
    );
    let hooks = agent_hooks()?;
    let granted: Vec<&str> = capabilities
        .iter()
        .map(String::as_str)
        .filter(|c| *c != "NET_ADMIN")
        .collect();

    let mut agent = Agent::start_with_capabilities(&granted, &[])?;
    let unavailable = hooks_logged(&agent, "hook unavailable");
    assert!(
        unavailable.is_empty(),
        "without NET_ADMIN ({granted:?}) the tracepoint capture needs nothing more: {unavailable:?}\n{}",
        agent.log_text()
    );
    let metrics = agent.scrape()?;
    for hook in [RECV, SEND] {
        assert_eq!(
            hook_active(&metrics, hook),
            1,
            "vigil_hook_active of {hook}"
        );
    }
    stops_cleanly(&mut agent)?;

    let mut agent = Agent::start_with_capabilities(
        &granted,
        &["--disable-hook", RECV, "--disable-hook", SEND],
    )?;
    let log = agent.log_text();
    let mut unavailable = hooks_logged(&agent, "hook unavailable");
    unavailable.sort();
    let mut want = vec![
        INGRESS.to_owned(),
        EGRESS.to_owned(),
        BEHIND_INGRESS.to_owned(),
    ];
    want.sort();
    assert_eq!(
        unavailable, want,
        "without NET_ADMIN ({granted:?}) exactly the packet capture fails\n{log}"
    );
    let reason = |hook: &str| -> String {
        agent
            .logs()
            .iter()
            .find(|v| v["message"].as_str() == Some("hook unavailable") && v["hook"] == hook)
            .and_then(|v| v["reason"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    for hook in [INGRESS, EGRESS] {
        assert!(
            reason(hook).contains("Operation not permitted"),
            "the kernel refused {hook} with EPERM\n{log}"
        );
    }
    assert!(
        reason(BEHIND_INGRESS).contains(INGRESS),
        "{BEHIND_INGRESS} names what it needs\n{log}"
    );
    let attached = hooks_logged(&agent, "hook attached");
    let metrics = agent.scrape()?;
    for hook in &hooks {
        let off = CAPTURE_HOOKS.contains(&hook.as_str());
        assert_eq!(attached.contains(hook), !off, "{hook} attached?\n{log}");
        assert_eq!(
            hook_active(&metrics, hook),
            u64::from(!off),
            "vigil_hook_active of {hook}"
        );
    }

    stops_cleanly(&mut agent)
}

/// Acting needs nothing beyond the chart's set, and of it exactly
/// SYS_PTRACE: with the chart's set the agent enforces a group (its steering
/// program attached); without SYS_PTRACE it cannot take a copy of a worker's
/// listener (pidfd_getfd), so the group is refused with that reason and
/// nothing is attached. NET_ADMIN is not needed: the kernel loads
/// sk_reuseport programs with CAP_BPF alone, and attaching one is a
/// setsockopt on the listener copy, so an operator who drops NET_ADMIN
/// (the packet capture's reason for it) still acts.
#[test]
fn acting_needs_sys_ptrace_of_the_chart_and_not_net_admin() -> anyhow::Result<()> {
    if !bpf_available("acting_needs_sys_ptrace_of_the_chart_and_not_net_admin") {
        return Ok(());
    }
    let _serial = serial();
    let capabilities = chart_capabilities()?;
    let fleet = Fleet::start("lpact", 19321)?;
    let selector = fleet.selector();
    let args = ["--actuation", "enforce", "--act-on", selector.as_str()];
    let granted: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    for missing in ["SYS_PTRACE", "NET_ADMIN"] {
        assert!(
            granted.contains(&missing),
            "the chart must add {missing}: {granted:?}"
        );
    }
    let without = |missing: &str| -> Vec<&str> {
        granted.iter().copied().filter(|c| *c != missing).collect()
    };

    for (set, name) in [
        (granted.clone(), "the chart's set"),
        (without("NET_ADMIN"), "the chart's set without NET_ADMIN"),
    ] {
        let mut agent = Agent::start_with_capabilities(&set, &args)?;
        let group = wait_for_group(&agent, fleet.addr, "enforced")
            .with_context(|| format!("with {name} {set:?}"))?;
        assert!(group["program_id"].as_u64().is_some(), "{name}: {group:#}");
        assert_eq!(steering_programs()?, 1, "{name}");
        stops_cleanly(&mut agent)?;
        assert_eq!(steering_programs()?, 0, "{name}: detached on exit");
    }

    let fewer = without("SYS_PTRACE");
    let mut agent = Agent::start_with_capabilities(&fewer, &args)?;
    let group = wait_for_group(&agent, fleet.addr, "refused")?;
    assert!(
        group["reason"]
            .as_str()
            .is_some_and(|r| r.contains("pidfd_getfd")),
        "without SYS_PTRACE: {group:#}"
    );
    assert_eq!(
        steering_programs()?,
        0,
        "without SYS_PTRACE nothing is attached"
    );
    stops_cleanly(&mut agent)?;
    Ok(())
}
