//! OTLP span join end to end: spans sent by the official OpenTelemetry
//! Python SDK (PyPI) to the agent's OTLP receiver come out at a test OTLP
//! receiver (`vigil-otlp-sink`) enriched with the `vigil.tcp.*` values of
//! their own connection, and every span is accounted for, also when the
//! upstream does not answer.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context};
use serde_json::Value;
use vigil_integration_tests::{
    bpf_available, metric_sum, otel_python, py_script, set_data_loss, tag, wait_for, Agent,
    OtlpSink, TempPath,
};
use vigil_testbed::netns::{ChildGuard, LinkPair};

const PORT: u16 = 8080;

/// The receiver's address, from the agent's log.
fn receiver_addr(agent: &Agent) -> anyhow::Result<SocketAddr> {
    agent
        .logs()
        .iter()
        .find(|v| v["message"] == "OTLP span receiver listening")
        .and_then(|v| v["addr"].as_str()?.parse().ok())
        .with_context(|| format!("no receiver address in the log:\n{}", agent.log_text()))
}

/// Starts the agent with `toml` (VIGIL_CONFIG) and `env`.
fn start_agent(name: &str, toml: &str, env: &[(&str, &str)]) -> anyhow::Result<(Agent, TempPath)> {
    let config = TempPath::new(name);
    std::fs::write(&config.0, toml)?;
    let path = config.0.display().to_string();
    let mut all = vec![("VIGIL_CONFIG", path.as_str())];
    all.extend_from_slice(env);
    Ok((Agent::start_with_env(&[], &all)?, config))
}

/// The receiver's counters on /metrics: (received, forwarded, shed, failed, queued).
fn receiver_counts(agent: &Agent) -> anyhow::Result<[u64; 5]> {
    let text = agent.scrape()?;
    let get = |name: &str| metric_sum(&text, name, &[]);
    Ok([
        get("vigil_receiver_spans_received_total"),
        get("vigil_receiver_spans_forwarded_total"),
        get("vigil_receiver_spans_shed_total"),
        get("vigil_receiver_spans_failed_total"),
        get("vigil_receiver_queue_spans"),
    ])
}

/// Runs `cmd` to its end and returns the last line it printed as JSON.
fn json_summary(cmd: &mut Command) -> anyhow::Result<Value> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {text}", out.status);
    }
    let line = text.lines().last().context("no summary printed")?;
    serde_json::from_str(line).with_context(|| format!("summary {line:?}"))
}

fn int(span: &Value, key: &str) -> Option<i64> {
    span["attributes"][key].as_i64()
}

/// A Python HTTP server in the server namespace of a link with 5% loss of
/// data segments, traced with the OpenTelemetry SDK (one SERVER span per
/// request, semantic-convention attributes) and exporting to the agent's
/// receiver, which forwards to the sink.
///
/// Asserted, per span, with tolerance zero: `vigil.tcp.retransmitted_segments`
/// equals the growth of the socket's own tcpi_total_retrans from the span's
/// start to its end. Exact because nothing can be retransmitted near the
/// window's edges: at the start nothing is unacknowledged and the response
/// is sent 20 ms later; the end comes 20 ms after every byte of it was
/// acknowledged (SIOCOUTQ == 0), so no retransmit of it can follow; 20 ms
/// dwarfs the error of converting kernel timestamps to wall-clock time; and
/// the loss spares SYN, FIN and RST, so handshakes and closes never
/// retransmit. Also: every span the SDK exported reaches the sink joined
/// (`vigil.tcp.joined`), with `vigil.tcp.drops`, a listen-queue capacity and
/// an srtt of the same order as TCP_INFO's; the totals are > 0; and the
/// receiver's counters say received == forwarded == spans, nothing shed or
/// failed.
#[test]
fn spans_are_enriched_with_their_connections_kernel_events() -> anyhow::Result<()> {
    if !bpf_available("spans_are_enriched_with_their_connections_kernel_events") {
        return Ok(());
    }
    let Some(python) = otel_python("spans_are_enriched_with_their_connections_kernel_events")
    else {
        return Ok(());
    };
    let sink = OtlpSink::start("spj-sink.jsonl")?;
    let endpoint = sink.endpoint();
    let (mut agent, _config) = start_agent(
        "spj.toml",
        "[sampler]\ninterval_ms = 100\n[receiver]\nlisten = \"127.0.0.1:0\"\n",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    )?;
    let receiver = format!("http://{}", receiver_addr(&agent)?);
    let link = LinkPair::create(&tag("spj"), 70)?;
    set_data_loss(&link, PORT, 5)?;
    let results = TempPath::new("spj-results.jsonl");
    let listen = SocketAddr::new(link.server_addr(false), PORT);
    let script = py_script("span_join.py");
    let mut server = ChildGuard::spawn(
        Command::new(&python)
            .arg(&script)
            .args(["server", "--netns-path"])
            .arg(link.server.path())
            .args(["--listen", &listen.to_string()])
            .args(["--otlp-endpoint", &receiver])
            .arg("--results")
            .arg(&results.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )?;
    let mut stdout = BufReader::new(server.child_mut().stdout.take().context("stdout")?);
    let mut first = String::new();
    stdout.read_line(&mut first)?;
    if !first.starts_with("listening on") {
        bail!("python server did not start: {first:?}");
    }
    let (connections, requests) = (4, 6);
    let client = json_summary(
        link.client
            .command(&python)
            .arg(&script)
            .args(["client", "--target", &listen.to_string()])
            .args(["--connections", &connections.to_string()])
            .args(["--requests", &requests.to_string()]),
    )?;
    assert_eq!(
        client["requests"].as_u64(),
        Some(connections * requests),
        "{client}"
    );
    // SIGTERM: the server flushes the SDK and prints what it exported.
    server.terminate(Duration::from_secs(30))?;
    let mut rest = String::new();
    stdout.read_to_string(&mut rest)?;
    let sent: Value = serde_json::from_str(rest.lines().last().context("server summary")?)?;
    let expected: Vec<Value> = std::fs::read_to_string(&results.0)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let n = expected.len() as u64;
    assert_eq!(n, connections * requests, "one span per request");
    assert_eq!(
        sent["exported"].as_u64(),
        Some(n),
        "the SDK exported all: {sent}"
    );
    assert_eq!(sent["export_failed"].as_u64(), Some(0), "{sent}");

    let spans = wait_for(Duration::from_secs(20), "every span at the sink", || {
        let spans: Vec<Value> = sink
            .spans()?
            .into_iter()
            .filter(|s| s["resource"]["service.name"] == "vigil-span-join-test")
            .collect();
        Ok((spans.len() as u64 >= n).then_some(spans))
    })?;
    assert_eq!(spans.len() as u64, n, "no span twice");
    let by_id: HashMap<(&str, &str), &Value> = spans
        .iter()
        .filter_map(|s| Some(((s["trace_id"].as_str()?, s["span_id"].as_str()?), s)))
        .collect();
    let (mut kernel_total, mut vigil_total) = (0, 0);
    let mut rtts = Vec::new();
    for e in &expected {
        let id = (
            e["trace_id"].as_str().context("trace_id")?,
            e["span_id"].as_str().context("span_id")?,
        );
        let span = by_id
            .get(&id)
            .with_context(|| format!("span {id:?} at the sink"))?;
        assert_eq!(span["kind"], "server", "{span}");
        assert_eq!(span["attributes"]["vigil.tcp.joined"], true, "{span}");
        let delta = e["retrans_delta"].as_i64().context("delta")?;
        let segs = int(span, "vigil.tcp.retransmitted_segments").context("segments")?;
        assert_eq!(segs, delta, "TCP_INFO delta {e}; span {span}");
        let events: i64 = span["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|ev| ev["name"] == "vigil.tcp.retransmit")
            .filter_map(|ev| ev["attributes"]["vigil.tcp.retransmitted_segments"].as_i64())
            .sum();
        if int(span, "vigil.tcp.events_omitted").is_none() {
            assert_eq!(events, segs, "one span event per retransmit: {span}");
        }
        assert!(int(span, "vigil.tcp.drops").is_some(), "{span}");
        assert!(
            int(span, "vigil.tcp.listen_queue.capacity").is_some_and(|c| c > 0),
            "the listener's backlog: {span}"
        );
        let srtt = int(span, "vigil.tcp.srtt_us").context("srtt")?;
        let tcpi = [&e["rtt_us_start"], &e["rtt_us_end"]]
            .iter()
            .filter_map(|v| v.as_i64())
            .max()
            .unwrap_or(0);
        // Sampled at another moment than TCP_INFO's reads (seen: within
        // a factor of 10 either way, tens to hundreds of µs on veth).
        assert!(
            srtt > 0 && srtt <= 10 * tcpi + 1_000,
            "srtt {srtt} µs vs tcpi_rtt {tcpi} µs: {span}"
        );
        let (start, end) = (
            span["start_time_unix_nano"].as_u64().context("start")?,
            span["end_time_unix_nano"].as_u64().context("end")?,
        );
        for ev in span["events"].as_array().into_iter().flatten() {
            let at = ev["time_unix_nano"].as_u64().context("event time")?;
            assert!(
                (start..=end).contains(&at),
                "event outside the span: {span}"
            );
        }
        rtts.push((srtt, tcpi));
        kernel_total += delta;
        vigil_total += segs;
    }
    assert!(kernel_total > 0, "5% loss caused retransmits");
    let counts = wait_for(Duration::from_secs(5), "receiver counters", || {
        let c = receiver_counts(&agent)?;
        Ok((c[1] == c[0]).then_some(c))
    })
    .with_context(|| format!("last counts: {:?}", receiver_counts(&agent)))?;
    assert_eq!(
        counts,
        [n, n, 0, 0, 0],
        "received, forwarded, shed, failed, queued"
    );
    eprintln!(
        "span_join: {n} spans; retransmitted segments: TCP_INFO {kernel_total} = vigil {vigil_total}; (vigil srtt, tcpi_rtt) µs: {rtts:?}"
    );
    agent.terminate()?;
    Ok(())
}

/// The upstream never answers (a listener whose connections are never
/// accepted) and the receiver holds 4 spans: the SDK's exports of 200 spans
/// all succeed, each answered long before the upstream's 20 s timeout could
/// have passed, and /metrics accounts for every span: received ==
/// forwarded + shed + failed + queued, with spans shed. No kernel events
/// needed, but the agent needs BPF to start.
#[test]
fn a_silent_upstream_sheds_without_delaying_the_sdk() -> anyhow::Result<()> {
    if !bpf_available("a_silent_upstream_sheds_without_delaying_the_sdk") {
        return Ok(());
    }
    let Some(python) = otel_python("a_silent_upstream_sheds_without_delaying_the_sdk") else {
        return Ok(());
    };
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let upstream = format!("http://{}", silent.local_addr()?);
    let (mut agent, _config) = start_agent(
        "spj-silent.toml",
        "[receiver]\nlisten = \"127.0.0.1:0\"\nqueue_spans = 4\nmax_batch_spans = 2\njoin_delay_ms = 0\n",
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &upstream),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "20000"),
        ],
    )?;
    let receiver = format!("http://{}", receiver_addr(&agent)?);
    let spans = 200;
    let sent = json_summary(
        Command::new(&python)
            .arg(py_script("span_join.py"))
            .args(["burst", "--otlp-endpoint", &receiver])
            .args(["--spans", &spans.to_string(), "--batch-size", "20"]),
    )?;
    assert_eq!(sent["exported"].as_u64(), Some(spans), "{sent}");
    assert_eq!(sent["export_failed"].as_u64(), Some(0), "{sent}");
    for export in sent["exports"].as_array().context("exports")? {
        let took = export["seconds"].as_f64().context("seconds")?;
        assert!(
            took < 5.0,
            "an export waited on the upstream ({took} s): {sent}"
        );
    }
    let [received, forwarded, shed, failed, queued] =
        wait_for(Duration::from_secs(10), "every span accounted for", || {
            let c = receiver_counts(&agent)?;
            Ok((c[0] == spans && c[0] == c[1] + c[2] + c[3] + c[4]).then_some(c))
        })
        .with_context(|| format!("last counts: {:?}", receiver_counts(&agent)))?;
    assert!(shed > 0, "a 4-span queue sheds");
    assert_eq!(forwarded, 0, "nothing reaches a silent upstream");
    assert!(
        agent.logs().iter().any(|v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("span receiver queue full"))),
        "shedding is logged"
    );
    eprintln!(
        "span_join silent upstream: received {received} = forwarded {forwarded} + shed {shed} + failed {failed} + queued {queued}"
    );
    // The flush gives up at the shutdown deadline, well inside terminate()'s wait.
    agent.terminate()?;
    drop(silent);
    Ok(())
}
