//! The sysctl advisor in a test namespace whose net.core.somaxconn (16) caps
//! a listener asking for a backlog of 1024: under induced overflow it
//! recommends 32 and changes nothing in `recommend`; in `enforce` for the
//! selected workload it writes 32, and it puts 16 back when the agent stops.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::bail;
use vigil_integration_tests::{abort, bpf_available, start_connect, tag, wait_for, Agent};
use vigil_testbed::netns::{LinkPair, Netns};

const SAMPLING: &str = "[sampler]\ninterval_ms = 200\n[actuation]\ncontrol_period_ms = 200\n";

fn somaxconn(ns: &Netns) -> anyhow::Result<u32> {
    Ok(ns
        .read_to_string("/proc/sys/net/core/somaxconn")?
        .trim()
        .parse()?)
}

/// The audit record of the advisor's decision on somaxconn, from the log.
fn sysctl_record(agent: &Agent, action: &str) -> Option<serde_json::Value> {
    agent
        .logs()
        .into_iter()
        .find(|l| l["action"] == action && l["member"] == "net.core.somaxconn")
}

#[test]
fn somaxconn_is_raised_under_overflow_only_when_enforcing_and_restored() -> anyhow::Result<()> {
    let _serial = vigil_integration_tests::one_namespace_test_at_a_time();
    if !bpf_available("somaxconn_is_raised_under_overflow_only_when_enforcing_and_restored") {
        return Ok(());
    }
    let link = LinkPair::create(&tag("sysctl"), 80)?;
    link.server
        .run(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=0"])?;
    link.server
        .run(&["sysctl", "-qw", "net.core.somaxconn=16"])?;
    let port = 7080;
    let addr = SocketAddr::new(link.server_addr(false), port);

    // A listener (this process: the selected workload) that never accepts.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server = link.server.spawn_thread(move || {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn,
        };
        let s = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        let SocketAddr::V4(v4) = addr else {
            bail!("IPv4 only");
        };
        bind(s.as_raw_fd(), &SockaddrIn::from(v4))?;
        listen(&s, Backlog::new(1024)?)?;
        let listener = TcpListener::from(s);
        ready_tx.send(())?;
        let _ = stop_rx.recv_timeout(Duration::from_secs(90));
        drop(listener);
        Ok(())
    })?;
    ready_rx.recv_timeout(Duration::from_secs(10))?;

    // Overflow for as long as the test runs: a new handshake every 20 ms
    // into a queue of 16 that is never drained (bounded: 1500 at most).
    let flooding = Arc::new(AtomicBool::new(true));
    let go_on = flooding.clone();
    let clients = link.client.spawn_thread(move || {
        let mut streams = Vec::new();
        while go_on.load(Ordering::SeqCst) && streams.len() < 1500 {
            streams.push(start_connect(addr)?);
            std::thread::sleep(Duration::from_millis(20));
        }
        for s in streams {
            abort(s);
        }
        Ok(())
    })?;

    let comm = std::fs::read_to_string("/proc/self/comm")?
        .trim()
        .to_owned();
    let selector = format!("process:{comm}");
    let result = (|| -> anyhow::Result<()> {
        // Recommend: the decision is recorded, the namespace untouched.
        let (mut agent, _config) =
            Agent::start_with_config("sysctl-recommend.toml", SAMPLING, &["--act-on", &selector])?;
        let r = wait_for(
            Duration::from_secs(15),
            "a somaxconn recommendation",
            || Ok(sysctl_record(&agent, "set_sysctl")),
        )
        .map_err(|e| {
            let rows = agent
                .sockets()
                .map(|s| s["listeners"].clone())
                .unwrap_or_default();
            e.context(format!("listeners: {rows:#}; log: {}", agent.log_text()))
        })?;
        assert_eq!(r["applied"], false, "{r}");
        assert_eq!(
            (r["before"].as_str(), r["after"].as_str()),
            (Some("16"), Some("32")),
            "{r}"
        );
        assert_eq!(
            somaxconn(&link.server)?,
            16,
            "recommend changed the namespace"
        );
        assert!(agent.terminate()?.success());

        // Enforce: written, then restored at exit.
        let (mut agent, _config) = Agent::start_with_config(
            "sysctl-enforce.toml",
            SAMPLING,
            &["--actuation", "enforce", "--act-on", &selector],
        )?;
        let r = wait_for(Duration::from_secs(15), "somaxconn raised", || {
            Ok(sysctl_record(&agent, "set_sysctl"))
        })?;
        assert_eq!(r["applied"], true, "{r}");
        assert_eq!(somaxconn(&link.server)?, 32, "{r}");
        assert!(agent.terminate()?.success());
        assert_eq!(
            somaxconn(&link.server)?,
            16,
            "the old value is back after exit"
        );
        let restored = sysctl_record(&agent, "restore_sysctl");
        assert!(
            restored.is_some_and(|r| r["applied"] == true),
            "no restore record"
        );
        Ok(())
    })();
    flooding.store(false, Ordering::SeqCst);
    let _ = clients.join();
    let _ = stop_tx.send(());
    let _ = server.join();
    result
}
