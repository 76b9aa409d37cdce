//! In-kernel trace-context capture against the bytes each request put on the
//! wire: every retransmitted segment is placed in the request whose bytes it
//! carries, using the connection's initial sequence numbers (read by the load
//! generator through TCP repair mode) and the request and response sizes.
//! That placement is the oracle; the agent's stamp must match it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::anyhow;
use serde_json::Value;
use vigil_integration_tests::{
    bpf_available, loadgen_summary, one_namespace_test_at_a_time, read_event_log, tag, wait_for,
    Agent, OtlpSink, Scenario, TempPath,
};
use vigil_testbed::netns::{bin_path, loadgen_command, ChildGuard};

// `Scenario` re-exports what it needs; the loader command builder is shared.

/// One request's share of each direction of its connection, in stream
/// offsets from the first data byte.
struct Placed {
    trace_id: String,
    request: std::ops::Range<u64>,
    response: std::ops::Range<u64>,
}

/// A connection of the load generator: its requests in order and the
/// sequence numbers of the first byte each side sent.
struct Conn {
    client_seq0: u32,
    server_seq0: u32,
    requests: Vec<Placed>,
}

fn connections(summary: &Value) -> anyhow::Result<HashMap<u16, Conn>> {
    let mut records: Vec<&Value> = summary["requests"]
        .as_array()
        .ok_or_else(|| anyhow!("no request records: {summary}"))?
        .iter()
        .collect();
    records.sort_by_key(|r| r["start_unix_ns"].as_u64());
    let mut conns: HashMap<u16, Conn> = HashMap::new();
    for r in records {
        let port = r["local_port"].as_u64().unwrap_or(0) as u16;
        let conn = conns.entry(port).or_insert_with(|| Conn {
            client_seq0: r["send_seq0"].as_u64().unwrap_or(0) as u32,
            server_seq0: r["recv_seq0"].as_u64().unwrap_or(0) as u32,
            requests: Vec::new(),
        });
        let (req_at, resp_at) = conn
            .requests
            .last()
            .map_or((0, 0), |p| (p.request.end, p.response.end));
        let req = r["request_wire_bytes"].as_u64().unwrap_or(0);
        let resp = r["response_wire_bytes"].as_u64().unwrap_or(0);
        conn.requests.push(Placed {
            trace_id: r["trace_id"].as_str().unwrap_or_default().to_owned(),
            request: req_at..req_at + req,
            response: resp_at..resp_at + resp,
        });
    }
    anyhow::ensure!(
        conns
            .values()
            .all(|c| c.client_seq0 != 0 || c.server_seq0 != 0),
        "the load generator recorded no initial sequence numbers (TCP repair needs CAP_NET_ADMIN)"
    );
    Ok(conns)
}

fn run_loadgen(
    scenario: &Scenario,
    traced: bool,
    connections: u32,
    requests: u32,
) -> anyhow::Result<ChildGuard> {
    let target = SocketAddr::new(scenario.link.server_addr(false), scenario.port);
    let mut cmd: Command = loadgen_command(
        &scenario.link.client,
        &bin_path("vigil-loadgen")?,
        target,
        connections,
        requests,
        60.0,
    );
    cmd.args(["--json", "--record-seq"]);
    if !traced {
        cmd.arg("--no-traceparent");
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    ChildGuard::spawn(&mut cmd)
}

/// Tallies of the comparison, in retransmitted segments.
#[derive(Debug, Default)]
struct Tally {
    /// In a traced request's bytes, stamped with its trace id.
    right: u64,
    /// In a traced request's bytes, stamped with another trace id.
    wrong: u64,
    /// In a traced request's bytes, without a stamp.
    unstamped: u64,
    /// Outside any traced request (untraced requests, SYN/FIN, handshakes)
    /// and stamped anyway.
    stamped_outside: u64,
    /// Outside any traced request and unstamped, as they must be.
    outside: u64,
    /// Of the in-request segments, those retransmitted by client sockets
    /// (request bytes).
    client_side: u64,
}

#[test]
fn retransmitted_segments_carry_their_requests_trace() -> anyhow::Result<()> {
    if !bpf_available("retransmitted_segments_carry_their_requests_trace") {
        return Ok(());
    }
    attribution(Capture::Both, "tc", 80)
}

/// Both directions read from the packets (`cgroup_skb/ingress` and
/// `egress`), as on kernels without the `sock_recv_length` and
/// `tcp_sendmsg_locked` tracepoints.
#[test]
fn retransmitted_segments_carry_their_requests_trace_read_from_packets() -> anyhow::Result<()> {
    if !bpf_available("retransmitted_segments_carry_their_requests_trace_read_from_packets") {
        return Ok(());
    }
    attribution(Capture::BothFromPackets, "tcp", 82)
}

/// `--capture-received-only`: messages sent are not read, so only requests
/// arriving at servers are read. Response bytes still carry their request's
/// trace; request bytes the client retransmits carry none.
#[test]
fn received_only_capture_stamps_server_sockets_only() -> anyhow::Result<()> {
    if !bpf_available("received_only_capture_stamps_server_sockets_only") {
        return Ok(());
    }
    attribution(Capture::ReceivedOnly, "tcr", 81)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Capture {
    /// Messages read where the applications read and write them
    /// (`sock_recv_length`, `tcp_sendmsg_locked`).
    Both,
    /// Both directions read from the packets (`cgroup_skb/ingress`, `egress`).
    BothFromPackets,
    ReceivedOnly,
}

fn attribution(capture: Capture, scenario_tag: &str, index: u8) -> anyhow::Result<()> {
    let _serial = one_namespace_test_at_a_time();
    let received_only = capture == Capture::ReceivedOnly;
    let log = TempPath::new(&format!("trace-capture-{scenario_tag}-events.jsonl"));
    let sink = OtlpSink::start(&format!("trace-capture-{scenario_tag}"))?;
    let log_arg = log.0.display().to_string();
    let mut args = vec!["--event-log", log_arg.as_str()];
    match capture {
        Capture::Both => {}
        Capture::BothFromPackets => args.extend([
            "--disable-hook",
            "tp_btf/tcp_sendmsg_locked",
            "--disable-hook",
            "tp_btf/sock_recv_length",
        ]),
        Capture::ReceivedOnly => args.push("--capture-received-only"),
    }
    let agent = Agent::start_with_env(
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &sink.endpoint()),
            // No span receiver: this test does not send spans (and port 4317 stays free).
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "1000"),
        ],
    )?;

    // The capture programs passed the verifier and are attached where this
    // mode reads.
    let metrics = agent.scrape()?;
    let by_packets = capture == Capture::BothFromPackets;
    for (hook, attached) in [
        ("tp_btf/sock_recv_length", !by_packets),
        ("cgroup_skb/ingress", by_packets),
        ("tp_btf/inet_sock_set_state", by_packets),
        ("tp_btf/tcp_sendmsg_locked", capture == Capture::Both),
        ("cgroup_skb/egress", by_packets),
    ] {
        assert_eq!(
            vigil_integration_tests::metric_sum(&metrics, "vigil_hook_active", &[("hook", hook)]),
            u64::from(attached),
            "{hook} attached: {attached}\n{metrics}"
        );
    }
    let mut scenario = Scenario::start(&tag(scenario_tag), index, false)?;
    let before = scenario.mib("Tcp", "RetransSegs")?;
    // Loss both ways: responses (and SYN-ACKs) are retransmitted by the
    // server sockets, requests (and SYNs) by the client sockets.
    scenario.link.set_loss(scenario.port, 3)?;
    let port = scenario.port.to_string();
    let server_netns = &scenario.link.server;
    server_netns.run(&["nft", "add", "table", "inet", "vigil_tc_loss"])?;
    server_netns.run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "vigil_tc_loss",
        "input",
        "{ type filter hook input priority 0; policy accept; }",
    ])?;
    server_netns.run(&[
        "nft",
        "add",
        "rule",
        "inet",
        "vigil_tc_loss",
        "input",
        "tcp",
        "dport",
        &port,
        "numgen",
        "random",
        "mod",
        "100",
        "<",
        "5",
        "drop",
    ])?;
    // Traced and untraced keep-alive connections side by side, 40 requests each.
    let traced = run_loadgen(&scenario, true, 4, 40)?;
    let untraced = run_loadgen(&scenario, false, 2, 40)?;
    let (traced, untraced) = (loadgen_summary(traced)?, loadgen_summary(untraced)?);
    for s in [&traced, &untraced] {
        assert_eq!(s["requests_interrupted"], 0, "every request completed: {s}");
        assert_eq!(s["requests_failed"], 0, "every request completed: {s}");
    }
    server_netns.run(&["nft", "delete", "table", "inet", "vigil_tc_loss"])?;
    scenario.quiesce()?;
    let mut conns = connections(&traced)?;
    let traced_ports: Vec<u16> = conns.keys().copied().collect();
    conns.extend(connections(&untraced)?);
    let server = SocketAddr::new(scenario.link.server_addr(false), scenario.port);

    // Wait until the agent has logged every retransmit the kernel counted
    // (the events are complete: a comparison over part of them proves less).
    let (server_ns, client_ns) = (scenario.link.server.inode()?, scenario.link.client.inode()?);
    let after = scenario.mib("Tcp", "RetransSegs")?;
    let kernel = (after.0 - before.0, after.1 - before.1);
    let logged_in = |events: &[Value], ns: u64| -> u64 {
        events
            .iter()
            .filter(|e| e["netns"] == ns)
            .filter_map(|e| e["counted_segments"].as_u64())
            .sum()
    };
    let events = wait_for(Duration::from_secs(20), "every retransmit logged", || {
        let events = read_event_log(&log.0)?;
        let logged = (logged_in(&events, server_ns), logged_in(&events, client_ns));
        Ok((logged == kernel).then_some(events))
    })?;

    let mut tally = Tally::default();
    for e in events
        .iter()
        .filter(|e| e["counted_segments"].as_u64().unwrap_or(0) > 0)
        .filter(|e| e["netns"] == server_ns || e["netns"] == client_ns)
    {
        let segments = e["counted_segments"].as_u64().unwrap_or(0);
        let stamped = e["trace_id"].as_str();
        let local: SocketAddr = e["local"].as_str().unwrap_or_default().parse()?;
        let remote: SocketAddr = e["remote"].as_str().unwrap_or_default().parse()?;
        let (server_side, client_port) = if local == server {
            (true, remote.port())
        } else {
            (false, local.port())
        };
        let seq = e["seq"].as_u64().unwrap_or(0) as u32;
        let bytes = e["bytes"].as_u64().unwrap_or(0);
        // Where the segment's first byte sits, and in which request.
        let placed = conns.get(&client_port).and_then(|c| {
            if bytes == 0 || e["kind"] != "segment" {
                return None;
            }
            let (seq0, range): (u32, fn(&Placed) -> &std::ops::Range<u64>) = if server_side {
                (c.server_seq0, |p| &p.response)
            } else {
                (c.client_seq0, |p| &p.request)
            };
            let offset = u64::from(seq.wrapping_sub(seq0));
            c.requests
                .iter()
                .find(|p| range(p).contains(&offset))
                .map(|p| p.trace_id.as_str())
                .filter(|t| !t.is_empty())
        });
        if placed.is_some() && !server_side {
            tally.client_side += segments;
        }
        // Capturing received messages only, a client never learns the trace
        // of the request it sends: its segments must stay unstamped.
        let expected = placed.filter(|_| server_side || !received_only);
        match (expected, stamped) {
            (Some(want), Some(got)) if want == got => tally.right += segments,
            (Some(_), Some(_)) => tally.wrong += segments,
            (Some(_), None) => tally.unstamped += segments,
            (None, Some(_)) => tally.stamped_outside += segments,
            (None, None) => tally.outside += segments,
        }
    }
    eprintln!("{tally:?}");
    let in_requests = tally.right + tally.wrong + tally.unstamped;
    assert!(
        in_requests >= 20,
        "the lossy link retransmitted segments of traced requests: {tally:?}"
    );
    // Tolerance 1%: a segment of a request whose header the capture never read
    // (e.g. the ring or a scratch buffer was busy) goes unstamped; it must never
    // carry another request's trace.
    assert_eq!(
        tally.wrong, 0,
        "no segment stamped with another request's trace: {tally:?}"
    );
    assert_eq!(
        tally.stamped_outside, 0,
        "segments outside traced requests carry no trace: {tally:?}"
    );
    assert!(
        tally.right * 100 >= in_requests * 99,
        "at least 99% of in-request segments carry their trace: {tally:?}"
    );
    assert!(
        tally.client_side > 0,
        "client sockets retransmitted request bytes too: {tally:?}"
    );
    assert!(
        tally.outside > 0,
        "untraced requests and handshakes were retransmitted too: {tally:?}"
    );

    // Every traced request crossed two sockets (client and server) with its
    // trace, each seen once: also a connection's first request whose segment
    // completed the handshake (its final ACK dropped), which the kernel
    // filters against the listener and the capture hands to the connection.
    let messages: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "trace_context" && e["message"] == "request")
        .collect();
    for c in traced_ports.iter().filter_map(|p| conns.get(p)) {
        for p in &c.requests {
            let seen: Vec<&&Value> = messages
                .iter()
                .filter(|m| m["trace_id"] == p.trace_id.as_str())
                .collect();
            let received = seen.iter().filter(|m| m["direction"] == "received").count();
            let sent = seen.iter().filter(|m| m["direction"] == "sent").count();
            let want_sent = usize::from(!received_only);
            assert_eq!(
                (received, sent),
                (1, want_sent),
                "request {} seen received once (and sent, unless received only): {seen:?}",
                p.trace_id
            );
        }
    }

    // Both ends opened their sockets after the agent started, so the kernel
    // recorded their owners (connect, listen, accept) and the trace records
    // carry them: no message needs the agent's /proc fallback.
    let from_proc: Vec<&&Value> = messages
        .iter()
        .filter(|m| m["owner_source"] != "kernel")
        .collect();
    assert!(
        from_proc.is_empty(),
        "{} of {} trace records without the kernel's owner, e.g. {:?}",
        from_proc.len(),
        messages.len(),
        from_proc.first()
    );

    // The same stamps reach OTLP: log records carry trace_id/span_id fields.
    let stamped_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "segment" && e["trace_id"].is_string())
        .collect();
    let want: std::collections::HashSet<&str> = stamped_events
        .iter()
        .filter_map(|e| e["trace_id"].as_str())
        .collect();
    let got = wait_for(
        Duration::from_secs(15),
        "OTLP log records with trace ids",
        || {
            let ids: std::collections::HashSet<String> = sink
                .requests("logs")?
                .iter()
                .flat_map(|r| r["records"].as_array().cloned().unwrap_or_default())
                .filter(|r| r["body"] == "tcp retransmit")
                .filter_map(|r| r["trace_id"].as_str().map(str::to_owned))
                .filter(|t| !t.is_empty() && t.chars().any(|c| c != '0'))
                .collect();
            Ok(want.iter().all(|t| ids.contains(*t)).then_some(ids))
        },
    )?;
    assert!(!got.is_empty());

    // `vigil explain` lists a stamped retransmit of one trace.
    let sample = stamped_events[0];
    let trace_id = sample["trace_id"].as_str().unwrap_or_default();
    let explained = agent
        .explain(trace_id)?
        .ok_or_else(|| anyhow::anyhow!("the agent has no record of trace {trace_id}"))?;
    let retransmits: u64 = explained["trace"]["events"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter(|e| e["kind"] == "retransmit")
                .filter_map(|e| e["segments"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    let logged: u64 = stamped_events
        .iter()
        .filter(|e| e["trace_id"] == trace_id)
        .filter_map(|e| e["counted_segments"].as_u64())
        .sum();
    assert_eq!(
        retransmits, logged,
        "explain shows the trace's retransmits: {explained}"
    );
    let roles: Vec<&str> = explained["trace"]["connections"]
        .as_array()
        .map(|v| v.iter().filter_map(|c| c["role"].as_str()).collect())
        .unwrap_or_default();
    assert!(roles.contains(&"server"), "{explained}");
    assert_eq!(
        roles.contains(&"client"),
        !received_only,
        "client sockets carry the trace unless received only: {explained}"
    );
    drop(agent);
    Ok(())
}
