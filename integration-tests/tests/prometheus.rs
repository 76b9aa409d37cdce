//! The agent as Prometheus itself sees it: Debian's prometheus scrapes a
//! running agent, PromQL returns the kernel's retransmit total for the origin's
//! namespace, and every query of the shipped Grafana dashboards evaluates and
//! draws data.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context};
use nix::sys::socket::{
    bind, connect, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn,
};
use serde_json::Value;
use vigil_integration_tests::{bpf_available, tag, wait_for, Agent, Scenario, TestCgroup};
use vigil_testbed::netns::{ChildGuard, Netns};

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
        // Service discovery hands Prometheus its first targets only after a
        // few seconds; until the first scrape, nothing the test does is seen.
        wait_for(
            Duration::from_secs(30),
            "Prometheus's first scrape of the agent",
            || Ok((!server.query("up{job=\"vigil\"} == 1")?.is_empty()).then_some(())),
        )?;
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

    /// Evaluates `promql` as a Grafana panel does, from `start` (Unix seconds)
    /// to now at a 1 s step; true when some point of some series is a number
    /// (not NaN or ±Inf, as 0/0 and histogram_quantile of no observations give).
    fn has_data_since(&self, promql: &str, start: f64) -> anyhow::Result<bool> {
        let end = unix_now();
        let (code, body) = http_get(
            self.addr,
            &format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
                percent_encode(promql)
            ),
        )?;
        let reply: Value =
            serde_json::from_str(&body).with_context(|| format!("reply to {promql}: {body}"))?;
        if code != 200 || reply["status"] != "success" {
            bail!("range query {promql} failed ({code}): {body}");
        }
        Ok(reply["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|series| series["values"].as_array().into_iter().flatten())
            .filter_map(|point| point[1].as_str()?.parse::<f64>().ok())
            .any(f64::is_finite))
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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

/// Fills in Grafana's variables the way "All" and a short range would.
fn fill_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$instance", ".*")
        .replace("$netns", ".*")
        .replace("$cgroup", ".*")
        .replace("$process", ".*")
}

/// Every PromQL expression of a dashboard's panels, variables filled in.
fn dashboard_queries(path: &str) -> anyhow::Result<Vec<String>> {
    Ok(dashboard_json(path)?
        .0
        .iter()
        .map(|e| fill_variables(e))
        .collect())
}

/// (panel expressions, template variable queries) of a dashboard. A
/// variable's `label_values(selector, label)` becomes the PromQL
/// `group by (label) (selector)`, which has data exactly when the drop-down does.
fn dashboard_json(path: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
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
    let mut variables = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(query) = var["definition"]
            .as_str()
            .filter(|_| var["type"] == "query")
        else {
            continue;
        };
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .with_context(|| {
                format!("{path}: variable query {query:?} is not label_values(selector, label)")
            })?;
        variables.push(format!("group by ({}) ({selector})", label.trim()));
    }
    Ok((exprs, variables))
}

/// Starts a non-blocking connect (the handshake completes in the kernel).
fn start_connect(to: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let s = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match connect(s.as_raw_fd(), &SockaddrIn::from(to)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(s)),
        Err(e) => bail!("connect {to}: {e}"),
    }
}

/// Sockets of the socket-health panels, kept open while they are sampled.
/// The thread holding the overflowing listener and the full UDP socket, in
/// their namespace; it lets them go when told (or when this is dropped). It
/// stays in the namespace because the agent reads a namespace's counters
/// through /proc of a thread inside it.
struct HealthSockets {
    release: std::sync::mpsc::Sender<()>,
    holder: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for HealthSockets {
    fn drop(&mut self) {
        let _ = self.release.send(());
        if let Some(h) = self.holder.take() {
            let _ = h.join();
        }
    }
}

/// On loopback in `ns`: a listener with backlog 4 that never accepts, hit by
/// 20 connects (accept-queue overflows, a full queue, connections with an
/// RTT), and a UDP socket with the smallest receive buffer that is never read,
/// sent 64 datagrams (socket drops, reason SOCKET_RCVBUFF).
fn overflow_and_drop(ns: &Netns) -> anyhow::Result<HealthSockets> {
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
    let holder = ns.spawn_thread(move || {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7036);
        let s = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        bind(s.as_raw_fd(), &SockaddrIn::from(addr))?;
        listen(&s, Backlog::new(4)?)?;
        let mut streams = Vec::new();
        for _ in 0..20 {
            streams.push(start_connect(addr)?);
            std::thread::sleep(Duration::from_millis(2));
        }
        let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        setsockopt(&rx, sockopt::RcvBuf, &1)?;
        let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        for _ in 0..64 {
            tx.send_to(&[0x56; 1000], rx.local_addr()?)?;
        }
        let _ = ready_tx.send(());
        // Bounded: the test ends well within this.
        let _ = released.recv_timeout(Duration::from_secs(120));
        drop((TcpListener::from(s), streams, rx));
        Ok(())
    })?;
    ready
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("sockets in {} not ready", ns.name()))?;
    Ok(HealthSockets {
        release,
        holder: Some(holder),
    })
}

#[test]
fn prometheus_sees_the_kernel_total_and_dashboards_evaluate() -> anyhow::Result<()> {
    if !bpf_available("prometheus_sees_the_kernel_total_and_dashboards_evaluate") {
        return Ok(());
    }
    // Sample sockets every 200 ms, so listener gauges, connection counts and
    // RTT observations cover the few seconds of the scenario.
    let (agent, _config) =
        Agent::start_with_config("prom.toml", "[sampler]\ninterval_ms = 200\n", &[])?;
    let start = unix_now();
    let prometheus = PrometheusServer::start(agent.metrics_addr)?;
    // The origin runs as a pod would under the kubelet (cgroupfs driver), so
    // its series carry a `pod` label (the uid: no Kubernetes API here).
    let pod_uid = "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
    let pod_cgroup = TestCgroup::create(&format!(
        "vigil-it-{}/kubepods/burstable/pod{pod_uid}",
        tag("prom")
    ))?;
    let mut scenario =
        Scenario::start_with(&tag("prom"), 35, false, Some(&pod_cgroup.procs()), &[])?;
    // Overflows and drops in a namespace of their own: the origin's namespace
    // keeps only the load's retransmits, which are compared exactly below.
    let health_ns = Netns::create(&format!("vigil-{}-q", tag("prom")))?;
    let health_sockets = overflow_and_drop(&health_ns)?;
    // 3 s of load: retransmits and connections span several scrapes, so
    // rates and ratios of rates have points.
    let (kernel, _) = scenario.retransmits_under_loss(10, 4, 3.0)?;
    assert!(kernel > 0, "10% loss causes retransmits");

    let netns = scenario.link.server.inode()?;
    // The per-pod total, as a dashboard or an alert would ask for it.
    let promql =
        format!("sum by (pod) (vigil_tcp_retransmitted_segments_total{{pod=\"{pod_uid}\"}})");
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
        "PromQL {promql} vs the pod's namespace's RetransSegs delta"
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

    // Every panel and drop-down of both dashboards draws data over the test's
    // time range, as Grafana would show it (gauges of closed sockets included).
    let mut checked = 0;
    for path in [
        "dashboards/vigil-retransmits.json",
        "dashboards/vigil-socket-health.json",
    ] {
        let (exprs, variables) = dashboard_json(path)?;
        assert!(exprs.len() >= 10, "{path} has its panels: {exprs:?}");
        let all: Vec<String> = exprs
            .iter()
            .chain(&variables)
            .map(|e| fill_variables(e))
            .collect();
        let mut empty = Vec::new();
        let drew = wait_for(
            Duration::from_secs(20),
            "dashboard queries to draw data",
            || {
                empty.clear();
                for q in &all {
                    // Only the two retransmit panels exempted above may be empty.
                    let may_be_empty = q.contains("failed_attempts") || q.contains("synack");
                    if !prometheus.has_data_since(q, start)? && !may_be_empty {
                        empty.push(q.clone());
                    }
                }
                Ok(empty.is_empty().then_some(()))
            },
        );
        if let Err(e) = drew {
            bail!(
                "{path}: {e}; queries without data: {empty:#?}\nagent:\n{}",
                agent.scrape()?
            );
        }
        checked += all.len();
    }
    drop(health_sockets);
    eprintln!(
        "PromQL total {total} == RetransSegs delta {kernel}; {} dashboard queries evaluated; \
         {checked} panel and variable queries of both dashboards drew data",
        queries.len()
    );
    Ok(())
}
