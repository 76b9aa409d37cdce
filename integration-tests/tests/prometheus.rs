//! The agent as Prometheus itself sees it: Debian's prometheus scrapes a
//! running agent, PromQL returns the kernel's retransmit total for the origin's
//! namespace, and every query of the shipped Grafana dashboard evaluates.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use vigil_integration_tests::{bpf_available, tag, wait_for, Agent, Scenario};
use vigil_testbed::netns::ChildGuard;

const SCRAPE_INTERVAL: &str = "1s";

/// A Prometheus server with its own config and storage, removed on drop.
struct PrometheusServer {
    _child: ChildGuard,
    dir: PathBuf,
    addr: SocketAddr,
}

impl PrometheusServer {
    fn start(target: SocketAddr) -> anyhow::Result<PrometheusServer> {
        let dir = std::env::temp_dir().join(format!("vigil-it-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
             scrape_configs:\n  - job_name: vigil\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        // A free port: bind, read it, release it for Prometheus.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = ChildGuard::spawn(
            Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
        let server = PrometheusServer {
            _child: child,
            dir,
            addr,
        };
        wait_for(Duration::from_secs(30), "prometheus to be ready", || {
            Ok(http_get(server.addr, "/-/ready")
                .is_ok_and(|(code, _)| code == 200)
                .then_some(()))
        })?;
        Ok(server)
    }

    /// Evaluates an instant PromQL query; fails on any query error.
    fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let (code, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )?;
        let reply: Value =
            serde_json::from_str(&body).with_context(|| format!("reply to {promql}: {body}"))?;
        if code != 200 || reply["status"] != "success" {
            bail!("query {promql} failed ({code}): {body}");
        }
        Ok(reply["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Prometheus answers small replies unchunked, larger ones chunked.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Every PromQL expression of a dashboard, with Grafana's variables filled in
/// the way "All" and a short range would fill them.
fn dashboard_queries(path: &str) -> anyhow::Result<Vec<String>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&root)?)?;
    fn collect(panels: &[Value], out: &mut Vec<String>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(expr.to_owned());
                }
            }
            collect(p["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let mut exprs = Vec::new();
    collect(
        dashboard["panels"].as_array().map_or(&[], Vec::as_slice),
        &mut exprs,
    );
    Ok(exprs
        .into_iter()
        .map(|e| {
            e.replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$instance", ".*")
                .replace("$netns", ".*")
                .replace("$cgroup", ".*")
                .replace("$process", ".*")
        })
        .collect())
}

#[test]
fn prometheus_sees_the_kernel_total_and_dashboards_evaluate() -> anyhow::Result<()> {
    if !bpf_available("prometheus_sees_the_kernel_total_and_dashboards_evaluate") {
        return Ok(());
    }
    let agent = Agent::start(&[])?;
    let prometheus = PrometheusServer::start(agent.metrics_addr)?;
    let mut scenario = Scenario::start(&tag("prom"), 35, false)?;
    let before = scenario.mib("Tcp", "RetransSegs")?.0;
    scenario.link.set_loss(scenario.port, 10)?;
    scenario.run_load(false, 4, 8, 6.0)?;
    scenario.quiesce()?;
    let kernel = scenario.mib("Tcp", "RetransSegs")?.0 - before;
    assert!(kernel > 0, "10% loss causes retransmits");

    let netns = scenario.link.server.inode()?;
    let promql = format!("sum(vigil_tcp_retransmitted_segments_total{{netns=\"{netns}\"}})");
    let total = wait_for(
        Duration::from_secs(30),
        "Prometheus to scrape the final total",
        || {
            let result = prometheus.query(&promql)?;
            let value = result
                .first()
                .and_then(|r| r["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0, |v| v as u64);
            Ok((value >= kernel).then_some(value))
        },
    )?;
    assert_eq!(
        total, kernel,
        "PromQL {promql} vs the namespace's RetransSegs delta"
    );

    // rate() needs two samples of a series; give the scraper time for them.
    wait_for(
        Duration::from_secs(20),
        "two samples of the retransmit series",
        || {
            let samples = prometheus.query(&format!(
                "count_over_time(vigil_tcp_retransmitted_segments_total{{netns=\"{netns}\"}}[1m])"
            ))?;
            Ok(samples
                .iter()
                .all(|r| {
                    r["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                        >= 2.0
                })
                .then_some(()))
        },
    )?;
    let queries = dashboard_queries("dashboards/vigil-retransmits.json")?;
    assert!(queries.len() >= 10, "dashboard has its panels: {queries:?}");
    for q in &queries {
        let result = prometheus.query(q)?;
        // Every panel that draws retransmits or agent health has data by now.
        if !q.contains("failed_attempts") && !q.contains("synack") {
            assert!(!result.is_empty(), "dashboard query returned no data: {q}");
        }
    }
    eprintln!(
        "PromQL total {total} == RetransSegs delta {kernel}; {} dashboard queries evaluated",
        queries.len()
    );
    Ok(())
}
