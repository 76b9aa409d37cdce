//! The sysctl advisor in test namespaces. One whose net.core.somaxconn (16)
//! caps a listener asking for a backlog of 1024: under induced overflow it
//! recommends 32 and changes nothing in `recommend`; in `enforce` for the
//! selected workload it writes 32, and it puts 16 back when the agent stops.
//! One whose 16 ephemeral ports are mostly held by connections and TIME_WAIT
//! sockets to one destination: in `enforce` it widens the port range and
//! turns on TIME_WAIT reuse, and puts both back when the workload asks over
//! the control API.

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
use vigil_integration_tests::{
    abort, bpf_available, start_connect, tag, wait_for, Agent, TempPath,
};
use vigil_testbed::netns::{LinkPair, Netns};

const SAMPLING: &str = "[sampler]\ninterval_ms = 200\n[actuation]\ncontrol_period_ms = 200\n";

fn somaxconn(ns: &Netns) -> anyhow::Result<u32> {
    Ok(ns
        .read_to_string("/proc/sys/net/core/somaxconn")?
        .trim()
        .parse()?)
}

/// The audit record of the advisor's decision on `name`, from the log.
fn record_for(agent: &Agent, action: &str, name: &str) -> Option<serde_json::Value> {
    agent
        .logs()
        .into_iter()
        .find(|l| l["action"] == action && l["member"] == name)
}

fn sysctl_record(agent: &Agent, action: &str) -> Option<serde_json::Value> {
    record_for(agent, action, "net.core.somaxconn")
}

/// This process's name: the selector of the workload the tests act on.
fn own_process_selector() -> anyhow::Result<String> {
    let comm = std::fs::read_to_string("/proc/self/comm")?;
    Ok(format!("process:{}", comm.trim()))
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

    let selector = own_process_selector()?;
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

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
/// Connections the client closes first (each leaves a TIME_WAIT socket) and
/// connections it holds open: 14 of the 16 ports.
const CLOSED: usize = 10;
const HELD: usize = 4;

fn read_trimmed(ns: &Netns, path: &str) -> anyhow::Result<String> {
    Ok(ns.read_to_string(path)?.trim().to_owned())
}

#[test]
fn ephemeral_port_advice_is_enforced_and_restored_on_request() -> anyhow::Result<()> {
    let _serial = vigil_integration_tests::one_namespace_test_at_a_time();
    if !bpf_available("ephemeral_port_advice_is_enforced_and_restored_on_request") {
        return Ok(());
    }
    let link = LinkPair::create(&tag("sysports"), 83)?;
    link.client.run(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=40000 40015",
        "net.ipv4.tcp_tw_reuse=2",
    ])?;
    let addr = SocketAddr::new(link.server_addr(false), 7081);

    // The server: reads the closing connections to their end and closes
    // them too (so the client's side goes to TIME_WAIT), keeps the rest.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server = link.server.spawn_thread(move || {
        use std::io::Read;
        let listener = TcpListener::bind(addr)?;
        ready_tx.send(())?;
        let mut kept = Vec::new();
        for i in 0..CLOSED + HELD {
            let (mut s, _) = listener.accept()?;
            if i < CLOSED {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let _ = s.read_to_end(&mut Vec::new());
            } else {
                kept.push(s);
            }
        }
        let _ = stop_rx.recv_timeout(Duration::from_secs(90));
        Ok(())
    })?;
    ready_rx.recv_timeout(Duration::from_secs(10))?;

    // The client (this process, the selected workload, in its namespace).
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let client = link.client.spawn_thread(move || {
        use std::io::Read;
        for _ in 0..CLOSED {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.shutdown(std::net::Shutdown::Write)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            // The server's FIN: this side closed first and waits in TIME_WAIT.
            let _ = s.read_to_end(&mut Vec::new());
        }
        let held = (0..HELD)
            .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
            .collect::<Result<Vec<_>, _>>()?;
        held_tx.send(())?;
        let _ = release_rx.recv_timeout(Duration::from_secs(90));
        for s in held {
            abort(s);
        }
        Ok(())
    })?;
    held_rx.recv_timeout(Duration::from_secs(20))?;

    let result = (|| -> anyhow::Result<()> {
        let dir = TempPath::new("sysports");
        std::fs::create_dir_all(&dir.0)?;
        let socket = dir.0.join("control.sock");
        let (mut agent, _config) = Agent::start_with_config(
            "sysctl-ports.toml",
            SAMPLING,
            &[
                "--actuation",
                "enforce",
                "--act-on",
                &own_process_selector()?,
                "--control-socket",
                &socket.to_string_lossy(),
            ],
        )?;
        let written = |name: &str| {
            let r = record_for(&agent, "set_sysctl", name);
            Ok(r.filter(|r| r["applied"] == true))
        };
        let range = wait_for(Duration::from_secs(15), "the port range widened", || {
            written("net.ipv4.ip_local_port_range")
        })
        .map_err(|e| e.context(agent.log_text()))?;
        assert_eq!(
            (range["before"].as_str(), range["after"].as_str()),
            (Some("40000\t40015"), Some("39984\t40015")),
            "{range}"
        );
        let reuse = wait_for(Duration::from_secs(5), "TIME_WAIT reuse on", || {
            written("net.ipv4.tcp_tw_reuse")
        })?;
        assert_eq!(
            (reuse["before"].as_str(), reuse["after"].as_str()),
            (Some("2"), Some("1")),
            "{reuse}"
        );
        assert_eq!(read_trimmed(&link.client, PORT_RANGE)?, "39984\t40015");
        assert_eq!(read_trimmed(&link.client, TW_REUSE)?, "1");

        // The workload asks for its values back.
        let restored = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let mut client = vigil_control::connect(&socket).await?;
                let r = client
                    .restore_sysctls(vigil_control::v1::RestoreSysctlsRequest {})
                    .await?;
                anyhow::Ok(r.into_inner().restored)
            })?;
        let names: Vec<_> = restored
            .iter()
            .map(|c| (c.name.as_str(), c.after.as_str(), c.applied))
            .collect();
        assert_eq!(
            names,
            [
                ("net.ipv4.ip_local_port_range", "40000\t40015", true),
                ("net.ipv4.tcp_tw_reuse", "2", true)
            ],
            "{restored:?}"
        );
        assert_eq!(read_trimmed(&link.client, PORT_RANGE)?, "40000\t40015");
        assert_eq!(read_trimmed(&link.client, TW_REUSE)?, "2");
        assert!(agent.terminate()?.success());
        let restores: Vec<_> = agent
            .logs()
            .into_iter()
            .filter(|l| l["action"] == "restore_sysctl")
            .collect();
        assert_eq!(
            restores.len(),
            2,
            "one restore each, on request: {restores:?}"
        );
        Ok(())
    })();
    let _ = release_tx.send(());
    let _ = client.join();
    let _ = stop_tx.send(());
    let _ = server.join();
    result
}
