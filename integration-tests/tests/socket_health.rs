//! Socket-queue signals end to end: accept-queue overflows and fill, receive
//! buffer drops, and RTT, each against the kernel's own view (TcpExt counters,
//! `ss`) of the same namespace.

use std::{
    io::{ErrorKind, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::Value;
use vigil_integration_tests::{
    abort, bpf_available, metric_sum, start_connect, tag, wait_for, Agent, Scenario, TempPath,
};
use vigil_testbed::netns::{LinkPair, Netns};

/// An agent that samples sockets often, so states that last about a second
/// (a full accept queue) are seen. The config file lives as long as the agent.
fn fast_sampling_agent(name: &str) -> anyhow::Result<(Agent, TempPath)> {
    Agent::start_with_config(name, "[sampler]\ninterval_ms = 200\n", &[])
}

/// The name the kernel gives this test process (what the agent labels it with).
fn own_comm() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/self/comm")?
        .trim()
        .to_owned())
}

fn tcp_ext(ns: &Netns, name: &str) -> anyhow::Result<u64> {
    ns.mib()?
        .get("TcpExt", name)
        .with_context(|| format!("TcpExt {name} in {}", ns.name()))
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> anyhow::Result<()> {
    // SAFETY: plain setsockopt with a live fd and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {name}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `ss -Hlnt` Recv-Q and Send-Q of the listener on `port`.
fn ss_listen_queue(ns: &Netns, port: u16) -> anyhow::Result<Option<(u64, u64)>> {
    let out = ns.run(&["ss", "-Hlnt", "sport", &format!("= :{port}")])?;
    let Some(line) = out.lines().next() else {
        return Ok(None);
    };
    let cols: Vec<&str> = line.split_whitespace().collect();
    match cols.as_slice() {
        [_, recv_q, send_q, ..] => Ok(Some((recv_q.parse()?, send_q.parse()?))),
        _ => bail!("unexpected ss line {line:?}"),
    }
}

fn listener_row(sockets: &Value, netns: u64, port: u16) -> Option<&Value> {
    sockets["listeners"].as_array()?.iter().find(|l| {
        l["netns"].as_u64() == Some(netns)
            && l["local"]
                .as_str()
                .is_some_and(|a| a.ends_with(&format!(":{port}")))
    })
}

/// A listener with backlog 4 that never accepts, hit by 40 connections.
///
/// Oracle: TcpExt ListenOverflows of the server namespace, tolerance zero.
/// The agent reads that same counter for the listener's namespace each sample
/// (through /proc of the listener's thread, here a thread of this test in
/// the namespace) and attributes the increase to the listener's owner, so the
/// test also checks the attribution. Syncookies are off in the namespace so
/// every overflow is a plain drop, as on a busy origin.
/// While the queue is full, the agent's queue length and capacity must equal
/// `ss -lnt` Recv-Q and Send-Q (both stable then: nothing is accepted).
#[test]
fn listen_overflows_equal_kernel_counter() -> anyhow::Result<()> {
    let _serial = vigil_integration_tests::one_namespace_test_at_a_time();
    if !bpf_available("listen_overflows_equal_kernel_counter") {
        return Ok(());
    }
    let (agent, _config) = fast_sampling_agent("overflow.toml")?;
    let link = LinkPair::create(&tag("ovf"), 40)?;
    link.server
        .run(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=0"])?;
    let port = 7040;
    let addr = SocketAddr::new(link.server_addr(false), port);
    let netns = link.server.inode()?;
    let before = tcp_ext(&link.server, "ListenOverflows")?;

    // The listener lives on a thread inside the server namespace; it never accepts.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server = link.server.spawn_thread(move || {
        let socket = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )?;
        let sin = nix::sys::socket::SockaddrIn::from(match addr {
            SocketAddr::V4(v4) => v4,
            SocketAddr::V6(_) => bail!("IPv4 only"),
        });
        nix::sys::socket::bind(socket.as_raw_fd(), &sin)?;
        nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::new(4)?)?;
        let listener = TcpListener::from(socket);
        ready_tx.send(())?;
        let _ = stop_rx.recv_timeout(Duration::from_secs(60));
        drop(listener);
        Ok(())
    })?;
    ready_rx.recv_timeout(Duration::from_secs(10))?;

    let clients = link.client.spawn_thread(move || {
        let mut streams = Vec::new();
        for _ in 0..40 {
            streams.push(start_connect(addr)?);
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(streams)
    })?;
    let streams = clients
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;

    // Queue full: agent sample vs ss, both read while nothing changes.
    let (ss_len, ss_cap) = wait_for(Duration::from_secs(5), "full accept queue in ss", || {
        Ok(ss_listen_queue(&link.server, port)?.filter(|(len, cap)| len > cap))
    })?;
    let row = wait_for(
        Duration::from_secs(5),
        "the agent's sample of the listener",
        || {
            let sockets = agent.sockets()?;
            Ok(listener_row(&sockets, netns, port)
                .filter(|r| r["queue_len"].as_u64() == Some(ss_len))
                .cloned())
        },
    )?;
    assert_eq!(
        row["queue_cap"].as_u64(),
        Some(ss_cap),
        "capacity = ss Send-Q: {row}"
    );
    assert_eq!(
        row["process"].as_str(),
        Some(own_comm()?.as_str()),
        "owner: {row}"
    );
    let text = agent.scrape()?;
    let labels = [("netns", netns.to_string()), ("port", port.to_string())];
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        metric_sum(&text, "vigil_tcp_listen_queue_length", &labels),
        ss_len,
        "gauge = ss Recv-Q"
    );
    assert_eq!(
        metric_sum(&text, "vigil_tcp_listen_queue_capacity", &labels),
        ss_cap,
        "gauge = ss Send-Q"
    );

    // End all handshakes, then compare totals once the counters are final.
    for s in streams {
        abort(s);
    }
    stop_tx.send(())?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    wait_for(Duration::from_secs(10), "no TCP sockets left", || {
        let out = link.server.run(&["ss", "-Htan", "exclude", "time-wait"])?;
        Ok(out.trim().is_empty().then_some(()))
    })?;
    let overflows = tcp_ext(&link.server, "ListenOverflows")? - before;
    assert!(overflows > 0, "40 connections into backlog 4 overflow");
    let ns = netns.to_string();
    let reported = wait_for(Duration::from_secs(5), "agent overflow total", || {
        let n = metric_sum(
            &agent.scrape()?,
            "vigil_tcp_listen_overflows_total",
            &[("netns", &ns)],
        );
        Ok((n == overflows).then_some(n))
    })
    .with_context(|| {
        format!(
            "kernel ListenOverflows +{overflows}; agent:\n{}",
            agent.scrape().unwrap_or_default()
        )
    })?;
    let comm = own_comm()?;
    assert_eq!(
        metric_sum(
            &agent.scrape()?,
            "vigil_tcp_listen_overflows_total",
            &[("netns", &ns), ("process", &comm)]
        ),
        reported,
        "attributed to the listener's process"
    );
    eprintln!("listen overflows: agent {reported} = ListenOverflows +{overflows}; queue {ss_len}/{ss_cap} = ss");
    Ok(())
}

/// Receivers whose buffer shrinks after the handshake, then never read, while
/// senders push small segments.
///
/// Oracle: TcpExt TCPRcvQDrop. When a segment does not fit the receive
/// memory, tcp_data_queue bumps TCPRcvQDrop and frees it with drop reason
/// PROTO_MEM. The out-of-order path uses PROTO_MEM too (with TCPOFODrop), so
/// the test asserts TCPOFODrop stayed 0 (no loss, no reordering on a veth) and
/// then requires PROTO_MEM drops == TCPRcvQDrop exactly. A small SO_RCVBUF set
/// before the handshake makes no drops at all (the advertised window honours
/// it), hence the shrink on the accepted socket. One drop per connection is
/// what the kernel does (the window then closes), so there are 12 connections.
#[test]
fn receive_buffer_drops_equal_kernel_counter() -> anyhow::Result<()> {
    let _serial = vigil_integration_tests::one_namespace_test_at_a_time();
    if !bpf_available("receive_buffer_drops_equal_kernel_counter") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    let link = LinkPair::create(&tag("rcvq"), 41)?;
    let port = 7041;
    let addr = SocketAddr::new(link.server_addr(false), port);
    let before = (
        tcp_ext(&link.server, "TCPRcvQDrop")?,
        tcp_ext(&link.server, "TCPOFODrop")?,
    );
    const CONNECTIONS: usize = 12;

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server = link.server.spawn_thread(move || {
        let listener = TcpListener::bind(addr)?;
        ready_tx.send(())?;
        let mut held = Vec::new();
        for _ in 0..CONNECTIONS {
            let (stream, _) = listener.accept()?;
            setsockopt_int(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 4096)?;
            held.push(stream);
        }
        let _ = stop_rx.recv_timeout(Duration::from_secs(60));
        held.into_iter().for_each(abort);
        Ok(())
    })?;
    ready_rx.recv_timeout(Duration::from_secs(10))?;
    let senders = link.client.spawn_thread(move || {
        let mut streams = Vec::new();
        for _ in 0..CONNECTIONS {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            streams.push(s);
        }
        // Give the server a moment to shrink every buffer before data flows.
        std::thread::sleep(Duration::from_millis(300));
        let chunk = [0x56u8; 100];
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            for s in &mut streams {
                match s.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for s in &streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        streams.into_iter().for_each(abort);
        Ok(())
    })?;
    senders
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    stop_tx.send(())?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;

    let rcvq = tcp_ext(&link.server, "TCPRcvQDrop")? - before.0;
    let ofo = tcp_ext(&link.server, "TCPOFODrop")? - before.1;
    assert_eq!(
        ofo, 0,
        "precondition: no out-of-order drops share the PROTO_MEM reason"
    );
    assert!(rcvq > 0, "shrunk receive buffers must drop");
    let ns = link.server.inode()?.to_string();
    let labels = [("netns", ns.as_str()), ("reason", "PROTO_MEM")];
    wait_for(
        Duration::from_secs(5),
        "agent PROTO_MEM drops = TCPRcvQDrop",
        || {
            let n = metric_sum(&agent.scrape()?, "vigil_socket_drops_total", &labels);
            Ok((n == rcvq).then_some(()))
        },
    )
    .with_context(|| {
        format!(
            "kernel TCPRcvQDrop +{rcvq}; agent:\n{}",
            agent.scrape().unwrap_or_default()
        )
    })?;
    let comm = own_comm()?;
    let text = agent.scrape()?;
    assert_eq!(
        metric_sum(
            &text,
            "vigil_events_lost_total",
            &[("probe", "socket_drop")]
        ),
        0,
        "no drop event lost (ring full, read error, recursion)"
    );
    let mine = metric_sum(
        &text,
        "vigil_socket_drops_total",
        &[("netns", &ns), ("reason", "PROTO_MEM"), ("process", &comm)],
    );
    assert_eq!(mine, rcvq, "attributed to the receiving process:\n{text}");
    eprintln!("receive-buffer drops: agent PROTO_MEM {mine} = TCPRcvQDrop +{rcvq}");
    Ok(())
}

/// Histogram observations of the origin's RTT: (count, count at or below `le`).
fn rtt_counts(text: &str, netns: &str, le: &str) -> (u64, u64) {
    let owner = [("netns", netns), ("process", "vigil-origin")];
    let total = metric_sum(text, "vigil_tcp_rtt_seconds_count", &owner);
    let mut below = owner.to_vec();
    below.push(("le", le));
    (
        total,
        metric_sum(text, "vigil_tcp_rtt_seconds_bucket", &below),
    )
}

/// `ss -tin` rtt (ms) and congestion control of the origin's connections, by (local, remote).
fn ss_rtts(ns: &Netns, port: u16) -> anyhow::Result<Vec<(String, String, f64, String)>> {
    let out = ns.run(&[
        "ss",
        "-Htin",
        "state",
        "established",
        "sport",
        &format!("= :{port}"),
    ])?;
    let mut rows = Vec::new();
    let mut lines = out.lines();
    while let Some(head) = lines.next() {
        let cols: Vec<&str> = head.split_whitespace().collect();
        let info = lines.next().unwrap_or_default();
        let rtt = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("rtt:"))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.parse::<f64>().ok());
        let cc = info
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        if let ([_, _, local, remote, ..], Some(rtt)) = (cols.as_slice(), rtt) {
            rows.push((local.to_string(), remote.to_string(), rtt, cc));
        }
    }
    Ok(rows)
}

/// The origin streams 1 MiB segments to a client; then a token bucket of
/// 10 Mbit/s with up to 100 ms of queue is put on the server's side of the
/// link. With a loss-based congestion control (reno, per namespace) the
/// sender fills that queue, so its RTT grows from well under a millisecond to
/// tens of milliseconds.
///
/// Checks: (1) without the qdisc, ≥ 95% of the origin's RTT observations are
/// ≤ 5 ms; (2) with it, ≥ 80% of the new observations are > 25 ms; (3) each
/// connection's RTT in `vigil sockets` agrees with `ss -ti` for the same
/// connection read over the agent's last sample interval and right after:
/// the agent's and ss right before and after its table > 20 ms, and the
/// agent's within a factor of two of the span of all the ss readings (the
/// queue oscillates).
#[test]
fn rtt_follows_tbf_queueing() -> anyhow::Result<()> {
    let _serial = vigil_integration_tests::one_namespace_test_at_a_time();
    if !bpf_available("rtt_follows_tbf_queueing") {
        return Ok(());
    }
    let (agent, _config) = fast_sampling_agent("rtt.toml")?;
    let scenario = Scenario::start(&tag("rtt"), 42, false)?;
    let server = &scenario.link.server;
    server.run(&["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"])?;
    let ns = scenario.server_netns()?.to_string();

    // Phase 1: no queue. Requests without end, cut at 2 s: connections must
    // live across several samples.
    let load = scenario.run_load(false, 2, 1_000_000, 2.0)?;
    assert!(load["requests_ok"].as_u64().unwrap_or(0) > 0, "{load}");
    let text = agent.scrape()?;
    let (base_n, base_fast) = rtt_counts(&text, &ns, "0.005");
    let (_, base_le25) = rtt_counts(&text, &ns, "0.025");
    assert!(
        base_n >= 5,
        "baseline observations of the origin: {base_n}\n{text}"
    );
    assert!(
        base_fast * 100 >= base_n * 95,
        "baseline RTT: {base_fast} of {base_n} ≤ 5 ms"
    );

    // Phase 2: a standing queue on the server's egress.
    server.run(&[
        "tc",
        "qdisc",
        "add",
        "dev",
        scenario.link.server_if(),
        "root",
        "tbf",
        "rate",
        "10mbit",
        "burst",
        "32kbit",
        "latency",
        "100ms",
    ])?;
    let mut load = scenario.spawn_load(false, 2, 1_000_000, 8.0)?;
    std::thread::sleep(Duration::from_secs(3));
    // ss every 50 ms over more than the agent's last sample interval (200 ms)
    // before its table, and once after: the agent's sample, taken in that
    // window, must sit within the span ss saw, give or take a factor of two
    // (the sawtooth of a loss-based sender moves the queue: srtt halves
    // within 200 ms after a loss).
    let mut ss_window = Vec::new();
    let window = std::time::Instant::now();
    let mut ss_before = Vec::new();
    while window.elapsed() < Duration::from_millis(300) {
        ss_before = ss_rtts(server, scenario.port)?;
        ss_window.extend(ss_before.iter().cloned());
        std::thread::sleep(Duration::from_millis(50));
    }
    let sockets = agent.sockets()?;
    let ss = ss_rtts(server, scenario.port)?;
    ss_window.extend(ss.iter().cloned());
    let mut compared = 0;
    for (local, remote, ss_after_ms, cc) in &ss {
        assert_eq!(cc, "reno", "the namespace's congestion control applies");
        let same = |(l, r, _, _): &&(String, String, f64, String)| l == local && r == remote;
        // The queue is there: ss right before and right after the table.
        let ss_before_ms = ss_before.iter().find(same).map_or(*ss_after_ms, |s| s.2);
        let (lo, hi) = ss_window
            .iter()
            .filter(same)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), s| {
                (lo.min(s.2), hi.max(s.2))
            });
        let Some(row) = sockets["connections"].as_array().and_then(|rows| {
            rows.iter().find(|r| {
                r["local"].as_str() == Some(local) && r["remote"].as_str() == Some(remote)
            })
        }) else {
            continue;
        };
        let agent_ms = row["srtt_us"].as_f64().unwrap_or(0.0) / 1000.0;
        assert_eq!(row["process"].as_str(), Some("vigil-origin"), "{row}");
        assert!(
            agent_ms > 20.0 && ss_before_ms.min(*ss_after_ms) > 20.0,
            "{local}->{remote}: agent {agent_ms} ms, ss {ss_before_ms} then {ss_after_ms} ms"
        );
        assert!(
            agent_ms <= hi * 2.0 && lo <= agent_ms * 2.0,
            "{local}->{remote}: agent {agent_ms} ms vs ss {lo}..{hi} ms"
        );
        compared += 1;
    }
    assert!(
        compared > 0,
        "no connection in both ss ({ss:?}) and the agent ({sockets})"
    );
    load.terminate(Duration::from_secs(10))?;
    let text = agent.scrape()?;
    let (n, le25) = rtt_counts(&text, &ns, "0.025");
    let new_n = n - base_n;
    let slow = new_n - (le25 - base_le25);
    assert!(new_n >= 5, "queued-phase observations: {new_n}");
    assert!(
        slow * 100 >= new_n * 80,
        "queued RTT: {slow} of {new_n} new observations > 25 ms\n{text}"
    );
    eprintln!("rtt: baseline {base_fast}/{base_n} ≤ 5 ms; with tbf {slow}/{new_n} > 25 ms; {compared} connections agree with ss");
    Ok(())
}
