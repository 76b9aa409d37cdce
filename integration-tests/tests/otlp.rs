//! OTLP export end to end: the agent exports to a real OTLP/gRPC receiver
//! (`vigil-otlp-sink`, built on the official opentelemetry-proto definitions)
//! configured only through the standard OTEL_* variables. Names, units,
//! resource attributes and values are checked against the kernel counters of
//! a lossy scenario.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;
use vigil_integration_tests::{bpf_available, tag, wait_for, Agent, Scenario};
use vigil_testbed::netns::{bin_path, ChildGuard};

/// The sink as a child process, its JSON lines collected as they come.
struct Sink {
    _child: ChildGuard,
    lines: Arc<Mutex<Vec<Value>>>,
    addr: String,
}

impl Sink {
    fn start() -> anyhow::Result<Sink> {
        let mut child = ChildGuard::spawn(
            Command::new(bin_path("vigil-otlp-sink")?)
                .args(["--listen", "127.0.0.1:0", "--max-seconds", "120"])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        )?;
        let stdout = child.child_mut().stdout.take().context("sink stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = addr_tx.send(line.split_whitespace().last().unwrap_or("").to_owned());
                } else if let Ok(v) = serde_json::from_str(&line) {
                    if let Ok(mut l) = sink.lock() {
                        l.push(v);
                    }
                }
            }
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .context("sink did not start")?;
        Ok(Sink {
            _child: child,
            lines,
            addr,
        })
    }

    fn requests(&self, signal: &str) -> Vec<Value> {
        self.lines
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|v| v["signal"] == signal)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The value of `metric` for `netns` in the latest metrics request, with the metric itself.
fn latest_point(sink: &Sink, metric: &str, netns: &str) -> Option<(Value, f64)> {
    let requests = sink.requests("metrics");
    let last = requests.last()?;
    let m = last["metrics"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == metric)?
        .clone();
    let total = m["points"]
        .as_array()?
        .iter()
        .filter(|p| p["attributes"]["netns"].as_str() == Some(netns))
        .filter_map(|p| p["value"].as_f64())
        .sum();
    Some((m, total))
}

/// Lossy transfers; then the latest exported
/// `vigil_tcp_retransmitted_segments` (a monotonic cumulative sum, unit "1")
/// for the server namespace equals its RetransSegs delta, the resource carries
/// service.name, service.version, host.name and k8s.node.name plus what
/// OTEL_RESOURCE_ATTRIBUTES adds, and the log records ("tcp retransmit", one
/// per counted retransmit event) add up to the same total with no record
/// dropped. Tolerance zero, as in retransmit.rs.
#[test]
fn otlp_export_matches_the_kernel() -> anyhow::Result<()> {
    if !bpf_available("otlp_export_matches_the_kernel") {
        return Ok(());
    }
    let sink = Sink::start()?;
    let endpoint = format!("http://{}", sink.addr);
    let node = "vigil-test-node";
    let mut agent = Agent::start_with_env(
        &["--node-name", node],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // No span receiver: this test does not send spans (and port 4317 stays free).
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=ci,team=video%20edge",
            ),
        ],
    )?;
    let mut scenario = Scenario::start(&tag("otlp"), 62, false)?;
    let (kernel, _) = scenario.retransmits_under_loss(10, 4, 3.0)?;
    assert!(kernel > 0, "10% loss causes retransmits");
    let netns = scenario.server_netns()?.to_string();

    let (metric, exported) = wait_for(
        Duration::from_secs(10),
        "exported segment total = RetransSegs",
        || {
            Ok(
                latest_point(&sink, "vigil_tcp_retransmitted_segments", &netns)
                    .filter(|(_, total)| *total as u64 == kernel),
            )
        },
    )
    .with_context(|| {
        format!(
            "kernel {kernel}; last export: {:?}",
            latest_point(&sink, "vigil_tcp_retransmitted_segments", &netns).map(|(_, t)| t)
        )
    })?;
    assert_eq!(metric["unit"], "1", "{metric}");
    assert_eq!(metric["kind"], "sum", "{metric}");
    assert_eq!(metric["monotonic"], true, "{metric}");
    assert_eq!(metric["temporality"], "cumulative", "{metric}");
    let requests = sink.requests("metrics");
    let resource = &requests.last().context("a metrics request")?["resource"];
    for (key, value) in [
        ("service.name", "vigil"),
        ("service.version", "0.1.0"),
        ("host.name", node),
        ("k8s.node.name", node),
        ("deployment.environment", "ci"),
        ("team", "video edge"),
    ] {
        assert_eq!(
            resource[key].as_str(),
            Some(value),
            "resource {key}: {resource}"
        );
    }
    // The origin's connections lived across samples: their RTT is a histogram in seconds.
    let rtt = requests
        .last()
        .and_then(|r| {
            r["metrics"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == "vigil_tcp_rtt_seconds")
                .cloned()
        })
        .context("vigil_tcp_rtt_seconds exported")?;
    assert_eq!(rtt["kind"], "histogram", "{rtt}");
    assert_eq!(rtt["unit"], "s", "{rtt}");
    assert_eq!(rtt["temporality"], "cumulative", "{rtt}");

    // Stop the agent: its last export flushes every queued log record.
    agent.terminate()?;
    let logs = sink.requests("logs");
    let records: Vec<&Value> = logs
        .iter()
        .filter_map(|r| r["records"].as_array())
        .flatten()
        .filter(|r| {
            r["body"] == "tcp retransmit"
                && r["attributes"]["vigil.netns"]
                    .as_i64()
                    .map(|n| n.to_string())
                    == Some(netns.clone())
        })
        .collect();
    let in_logs: i64 = records
        .iter()
        .filter_map(|r| r["attributes"]["vigil.tcp.retransmitted_segments"].as_i64())
        .sum();
    assert_eq!(
        in_logs as u64, kernel,
        "log records carry every counted segment"
    );
    let first = records.first().context("retransmit records")?;
    assert_eq!(first["severity_text"], "INFO", "{first}");
    assert_eq!(
        first["attributes"]["process.executable.name"], "vigil-origin",
        "{first}"
    );
    assert_eq!(
        first["attributes"]["network.local.port"].as_i64(),
        Some(i64::from(scenario.port)),
        "{first}"
    );
    eprintln!(
        "otlp: RetransSegs {kernel} = exported sum {exported} = {} log records' segments",
        in_logs
    );
    Ok(())
}
