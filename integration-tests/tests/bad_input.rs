//! Bad input gives a clear message and a non-zero exit, never a panic.

use std::{net::TcpListener, process::Command};

use vigil_integration_tests::{bpf_available, TempPath};
use vigil_testbed::netns::bin_path;

/// Runs `vigil args...` to completion: (exit code, stderr).
fn vigil(args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(bin_path("vigil")?)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "no panic for {args:?}: {stderr}"
    );
    Ok((out.status.code().unwrap_or(-1), stderr))
}

#[test]
fn unknown_flag_is_named() -> anyhow::Result<()> {
    let (code, err) = vigil(&["agent", "--frobnicate"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--frobnicate"), "{err}");
    Ok(())
}

#[test]
fn unreadable_config_names_the_file() -> anyhow::Result<()> {
    let (code, err) = vigil(&["agent", "--config", "/nonexistent/vigil.toml"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot read config file /nonexistent/vigil.toml"),
        "{err}"
    );
    Ok(())
}

#[test]
fn invalid_config_names_the_field() -> anyhow::Result<()> {
    let file = TempPath::new("bad.toml");
    std::fs::write(&file.0, "[probes]\nring_buffer_bytes = 1000\n")?;
    let (code, err) = vigil(&["agent", "--config", &file.0.display().to_string()])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("probes.ring_buffer_bytes"), "{err}");
    std::fs::write(&file.0, "[agent]\nmetrics_adr = \"127.0.0.1:1\"\n")?;
    let (code, err) = vigil(&["agent", "--config", &file.0.display().to_string()])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("metrics_adr"), "{err}");
    Ok(())
}

#[test]
fn port_in_use_is_reported() -> anyhow::Result<()> {
    let taken = TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    let (code, err) = vigil(&["agent", "--metrics-addr", &addr])?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen for metrics on {addr}")) && err.contains("in use"),
        "{err}"
    );
    Ok(())
}

#[test]
fn unknown_hook_name_is_rejected() -> anyhow::Result<()> {
    let (code, err) = vigil(&["agent", "--disable-hook", "kprobe/tcp_retransmit_skb"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown hook `kprobe/tcp_retransmit_skb`")
            && err.contains("tp_btf/tcp_retransmit_skb"),
        "{err}"
    );
    Ok(())
}

/// A kernel without the retransmit hook, stood in for by disabling it: the
/// agent names the signal and the reason and exits non-zero.
#[test]
fn missing_retransmit_hook_is_fatal_and_explained() -> anyhow::Result<()> {
    if !bpf_available("missing_retransmit_hook_is_fatal_and_explained") {
        return Ok(());
    }
    let (code, err) = vigil(&[
        "agent",
        "--metrics-addr",
        "127.0.0.1:0",
        "--disable-hook",
        "tp_btf/tcp_retransmit_skb",
    ])?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no hook for signal `retransmit` could be attached: tp_btf/tcp_retransmit_skb disabled by config"),
        "{err}"
    );
    Ok(())
}

/// An auxiliary hook turned off costs its signal, not the agent: it runs,
/// reports the hook as inactive and says what is lost.
#[test]
fn missing_synack_hook_degrades_only_that_signal() -> anyhow::Result<()> {
    if !bpf_available("missing_synack_hook_degrades_only_that_signal") {
        return Ok(());
    }
    let mut agent =
        vigil_integration_tests::Agent::start(&["--disable-hook", "tp_btf/tcp_retransmit_synack"])?;
    let text = agent.scrape()?;
    assert!(
        text.contains(
            r#"vigil_hook_active{hook="tp_btf/tcp_retransmit_synack",signal="synack_retransmit"} 0"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"vigil_hook_active{hook="tp_btf/tcp_retransmit_skb",signal="retransmit"} 1"#
        ),
        "{text}"
    );
    // Turned off by the operator: said, but not degraded.
    assert!(
        agent.log_text().contains(
            "signal turned off by config: SYN-ACK retransmits of listeners are not counted"
        ),
        "{}",
        agent.log_text()
    );
    assert!(
        text.contains(r#"vigil_signal_degraded{signal="synack_retransmit"} 0"#),
        "{text}"
    );
    assert!(agent.terminate()?.success());
    Ok(())
}
