//! The CLI's view of a running agent, over its query socket: `vigil status`
//! (hooks, event flow, losses, caches, series budget) and `vigil sockets`
//! (the latest socket sample as tables an SRE reads during an incident:
//! fullest accept queues, slowest connections).

use crate::{
    act::ActuationView,
    correlate::traceparent::TraceContext,
    export::prometheus::ACTUATION_PATH,
    export::prometheus::{Explanation, TRACES_PATH},
    health::{Health, HEALTH_PATH},
    query::{Endpoint, QueryError},
    socket_health::{ConnectionRow, ListenerRow, SocketTable},
};

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("the agent's answer is not what this CLI expects: {0}")]
    Body(#[from] serde_json::Error),
    #[error("`{0}` is not a trace id: give the 32 hex characters of the trace-id field of a traceparent")]
    TraceId(String),
}

/// GETs what the agent's kernel probes saw of one trace.
pub fn explain(agent: &Endpoint, trace_id: &str) -> Result<Explanation, TriageError> {
    let id = TraceContext::parse_trace_id(trace_id)
        .map_err(|_| TriageError::TraceId(trace_id.trim().to_owned()))?;
    let path = format!("{TRACES_PATH}{}", hex::encode(id));
    Ok(serde_json::from_slice(&agent.get_ok(&path)?)?)
}

fn ms_since(t: u64, origin: u64) -> String {
    let d = t as i128 - origin as i128;
    format!("{:+.3} ms", d as f64 / 1e6)
}

/// `vigil explain` as text: connections, then retransmits and drops with
/// times relative to the trace's first message on this node, then RTT and
/// queue fill from the latest socket sample.
pub fn render_explanation(e: &Explanation) -> String {
    let t = &e.trace;
    let origin = t.first_seen_unix_ns;
    let mut out = format!(
        "trace {}: first HTTP message on this node at {} (t=0)\n",
        t.trace_id,
        crate::clock::rfc3339(origin)
    );
    out.push_str(&format!("\nconnections ({}):\n", t.connections.len()));
    for c in &t.connections {
        let now = e.connections.iter().find(|r| r.cookie == c.cookie);
        out.push_str(&format!(
            "  {:<6} {} -> {}  {}{}  span {}  first message {}  {}\n",
            c.role,
            c.local,
            c.remote,
            c.process.as_deref().unwrap_or("?"),
            c.pid.map(|p| format!("[{p}]")).unwrap_or_default(),
            c.span_id,
            ms_since(c.first_seen_unix_ns, origin),
            match now {
                Some(r) => format!(
                    "now: srtt {:.1} ms, cwnd {}, {} segments retransmitted in its life",
                    f64::from(r.srtt_us) / 1e3,
                    r.cwnd,
                    r.total_retrans
                ),
                None => "now: closed (not in the latest sample)".into(),
            }
        ));
    }
    let retransmits: Vec<_> = t
        .events
        .iter()
        .filter(|ev| ev.kind == "retransmit")
        .collect();
    let segments: u64 = retransmits.iter().map(|ev| u64::from(ev.segments)).sum();
    out.push_str(&format!(
        "\nretransmits ({segments} segments in {} events):\n",
        retransmits.len()
    ));
    for ev in &retransmits {
        out.push_str(&format!(
            "  {}  {} -> {}  {} segment(s)  span {}\n",
            ms_since(ev.at_unix_ns, origin),
            ev.local.map(|a| a.to_string()).unwrap_or_default(),
            ev.remote.map(|a| a.to_string()).unwrap_or_default(),
            ev.segments,
            ev.span_id
        ));
    }
    let drops: Vec<_> = t.events.iter().filter(|ev| ev.kind == "drop").collect();
    out.push_str(&format!("\ndrops ({}):\n", drops.len()));
    for ev in &drops {
        out.push_str(&format!(
            "  {}  {} -> {}  {}\n",
            ms_since(ev.at_unix_ns, origin),
            ev.local.map(|a| a.to_string()).unwrap_or_default(),
            ev.remote.map(|a| a.to_string()).unwrap_or_default(),
            ev.reason.as_deref().unwrap_or("?")
        ));
    }
    if !e.listeners.is_empty() {
        out.push_str("\naccept queues of the serving listeners (latest sample):\n");
        for l in &e.listeners {
            out.push_str(&format!(
                "  {}  {}/{} queued  {} handshakes dropped in its life\n",
                l.local, l.queue_len, l.queue_cap, l.drops
            ));
        }
    }
    if t.omitted > 0 {
        out.push_str(&format!(
            "\n({} connections/events beyond the per-trace bounds were not kept)\n",
            t.omitted
        ));
    }
    out
}

/// GETs /v1/sockets from the agent.
pub fn fetch(agent: &Endpoint) -> Result<SocketTable, TriageError> {
    Ok(serde_json::from_slice(&agent.get_ok("/v1/sockets")?)?)
}

/// One sample of the exposition text: labels and value.
struct Sample<'a> {
    labels: Vec<(&'a str, &'a str)>,
    value: f64,
}

/// The samples of metric `name` in Prometheus text (Vigil's own output:
/// label values never contain `",` or `}`).
fn samples<'a>(text: &'a str, name: &str) -> Vec<Sample<'a>> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            (metric == name).then_some(())?;
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            Some(Sample {
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

fn total(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .iter()
        .filter(|s| filter.iter().all(|f| s.labels.contains(f)))
        .fold(0.0, |sum, s| sum + s.value) // `sum()` of nothing is -0 for floats
}

/// `vigil status`: the agent's hooks and self-telemetry, from its /metrics,
/// and the signals it cannot deliver, from /healthz (200 or 503, both JSON).
/// What `vigil status` reads of a running agent.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub agent: String,
    pub health: Health,
    /// Acting's view: None over HOST:PORT (it is on the query socket only).
    pub actuation: Option<ActuationView>,
    /// The agent's /metrics, rendered as the status text.
    #[serde(skip)]
    metrics: String,
}

pub fn status(agent: &Endpoint) -> Result<Status, TriageError> {
    let metrics = String::from_utf8_lossy(&agent.get_ok("/metrics")?).into_owned();
    let (line, body) = agent.get(HEALTH_PATH)?;
    if !(line.contains(" 200 ") || line.contains(" 503 ")) {
        return Err(QueryError::Status {
            endpoint: agent.clone(),
            status: line,
        }
        .into());
    }
    let health: Health = serde_json::from_slice(&body)?;
    let actuation = match agent {
        Endpoint::Socket(_) => Some(serde_json::from_slice(&agent.get_ok(ACTUATION_PATH)?)?),
        Endpoint::Http(_) => None,
    };
    Ok(Status {
        agent: agent.to_string(),
        health,
        actuation,
        metrics,
    })
}

impl Status {
    /// The tables an SRE reads.
    pub fn render(&self) -> String {
        let acting = match &self.actuation {
            Some(view) => render_actuation(view),
            None => {
                "\nacting: shown on the node only (vigil status there reads the query socket)\n"
                    .to_owned()
            }
        };
        render_status(&self.agent, &self.metrics) + &render_health(&self.health) + &acting
    }
}

/// Decisions `vigil status` shows, newest last.
const STATUS_DECISIONS: usize = 10;

/// Acting: mode, groups of selected workloads, the latest decisions.
pub fn render_actuation(a: &ActuationView) -> String {
    let mut out = format!(
        "\nactuation       {} ({})\n",
        a.mode,
        if a.selectors.is_empty() {
            "no workload selected: --act-on".to_owned()
        } else {
            a.selectors.join(", ")
        }
    );
    for g in &a.groups {
        out.push_str(&format!(
            "  {:<11} {}  {} of {} members take new connections{}\n",
            g.state,
            g.group,
            g.healthy_members,
            g.members.len(),
            g.program_id
                .map(|id| format!(", program {id}"))
                .unwrap_or_default()
        ));
        if let Some(reason) = &g.reason {
            out.push_str(&format!("              {reason}\n"));
        }
        if g.reason.is_none() {
            out.push_str(&format!(
                "              admission {}: queue delay {:.0} ms, {}{}\n",
                g.admission,
                g.queue_delay_ms,
                if g.shed_fraction > 0.0 {
                    format!(
                        "refusing {:.0}% of new connections",
                        g.shed_fraction * 100.0
                    )
                } else {
                    "admitting every new connection".to_owned()
                },
                if g.failing_open {
                    "  FAILING OPEN (stale heartbeat)"
                } else {
                    ""
                }
            ));
        }
        for m in &g.members {
            out.push_str(&format!(
                "              {:<32} queue {}/{}{}\n",
                m.member,
                m.queue_len,
                m.queue_cap,
                if m.takes_new_connections {
                    ""
                } else {
                    "  STEERED AWAY"
                }
            ));
        }
    }
    for s in &a.services {
        out.push_str(&format!(
            "  service     {}  {}, {} reports, generation {}{}
",
            s.workload,
            s.mode,
            s.reports,
            s.generation,
            if s.targets.is_empty() {
                String::new()
            } else {
                format!(": {}", s.targets.join("; "))
            }
        ));
    }
    let skip = a.decisions.len().saturating_sub(STATUS_DECISIONS);
    for d in &a.decisions[skip..] {
        out.push_str(&format!(
            "  {} {}{} {}{}: {} ({} -> {})\n",
            crate::clock::rfc3339(d.at_unix_ms * 1_000_000),
            d.action.as_str(),
            if d.applied { "" } else { " (not applied)" },
            d.group,
            d.member
                .as_deref()
                .map(|m| format!(" {m}"))
                .unwrap_or_default(),
            d.signal,
            d.before,
            d.after
        ));
    }
    out
}

/// The degraded signals, each with what is lost, why, and what to do.
pub fn render_health(health: &Health) -> String {
    if !health.is_degraded() {
        return "\nsignals         all delivered\n".to_owned();
    }
    let mut out = format!(
        "\nDEGRADED        {} signal(s) missing\n",
        health.degraded.len()
    );
    for d in &health.degraded {
        out.push_str(&format!("  {}: {}\n", d.signal, d.impact));
        for h in &d.hooks {
            // The first line of a reason; the verifier's log is in the agent's.
            let reason = h.reason.lines().next().unwrap_or_default();
            out.push_str(&format!("    {} {}: {reason}\n", h.hook, h.status));
        }
        out.push_str(&format!("    what to do: {}\n", d.remedy));
    }
    out
}

pub fn render_status(agent: &str, text: &str) -> String {
    let label = |s: &Sample, k: &str| {
        s.labels
            .iter()
            .find(|(key, _)| *key == k)
            .map_or("", |(_, v)| *v)
            .to_owned()
    };
    let version = samples(text, "vigil_build_info")
        .first()
        .map_or_else(|| "?".to_owned(), |s| label(s, "version"));
    let mut out = format!("vigil agent {version} at {agent}\n\nhooks\n");
    for s in samples(text, "vigil_hook_active") {
        let state = if s.value == 1.0 { "active" } else { "INACTIVE" };
        out.push_str(&format!(
            "  {:<8} {:<44} {}\n",
            state,
            label(&s, "hook"),
            label(&s, "signal")
        ));
    }
    out.push_str("\nevents          received       lost (ring full / read error / recursion)\n");
    for probe in ["retransmit", "synack_retransmit", "socket_drop"] {
        let received = total(text, "vigil_events_received_total", &[("probe", probe)]);
        let lost = |reason| {
            total(
                text,
                "vigil_events_lost_total",
                &[("probe", probe), ("reason", reason)],
            )
        };
        out.push_str(&format!(
            "  {probe:<18} {received:>10}   {} / {} / {}\n",
            lost("ring_full"),
            lost("read_error"),
            lost("recursion")
        ));
    }
    out.push_str(&format!(
        "  dropped in the agent: {} (source channel), {} (sampler channel); undecodable: {}\n",
        total(
            text,
            "vigil_events_dropped_total",
            &[("stage", "source_channel")]
        ),
        total(
            text,
            "vigil_events_dropped_total",
            &[("stage", "sampler_channel")]
        ),
        total(text, "vigil_event_decode_errors_total", &[])
    ));
    out.push_str(&format!(
        "\nsocket sampler  {} passes, {} failed, last pass {:.1} ms\n",
        total(text, "vigil_sampler_passes_total", &[]),
        total(text, "vigil_sampler_errors_total", &[]),
        total(text, "vigil_sampler_last_pass_seconds", &[]) * 1e3
    ));
    out.push_str(&format!(
        "series          {} of {} in use, {} observations in the overflow series, {} expired\n",
        total(text, "vigil_series_active", &[]),
        total(text, "vigil_series_limit", &[]),
        total(text, "vigil_series_overflow_total", &[]),
        total(text, "vigil_series_expired_total", &[])
    ));
    if !samples(text, "vigil_kube_synced").is_empty() {
        out.push_str(&format!(
            "kubernetes      {} pods of this node{}, {} watch errors, {} relists, {} refused\n",
            total(text, "vigil_kube_pods", &[]),
            if total(text, "vigil_kube_synced", &[]) == 1.0 {
                ""
            } else {
                " (first list pending)"
            },
            total(text, "vigil_kube_watch_errors_total", &[]),
            total(text, "vigil_kube_relists_total", &[]),
            total(text, "vigil_kube_pods_refused_total", &[])
        ));
    }
    let caches: Vec<String> = samples(text, "vigil_cache_entries")
        .iter()
        .map(|s| format!("{} {}", label(s, "cache"), s.value))
        .collect();
    out.push_str(&format!("caches          {}\n", caches.join(", ")));
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    /// Highest smoothed RTT first.
    Rtt,
    /// Most retransmitted segments first.
    Retrans,
}

fn who(pid: Option<u32>, process: &Option<String>) -> String {
    match (pid, process) {
        (Some(pid), Some(p)) => format!("{p}/{pid}"),
        _ => "-".into(),
    }
}

/// Listeners, fullest accept queue (relative to capacity) first.
pub fn listeners_table(rows: &[ListenerRow], limit: usize) -> String {
    let mut rows: Vec<&ListenerRow> = rows.iter().collect();
    rows.sort_by(|a, b| {
        let fill = |r: &ListenerRow| f64::from(r.queue_len) / f64::from(r.queue_cap.max(1));
        fill(b).total_cmp(&fill(a))
    });
    let mut out = format!(
        "{:<12} {:<40} {:>7} {:>7}  {:<24} {}\n",
        "NETNS", "LISTEN", "QUEUE", "CAP", "PROCESS", "CGROUP"
    );
    for r in rows.into_iter().take(limit) {
        out.push_str(&format!(
            "{:<12} {:<40} {:>7} {:>7}  {:<24} {}\n",
            r.netns,
            r.local.to_string(),
            r.queue_len,
            r.queue_cap,
            who(r.pid, &r.process),
            r.cgroup.as_deref().unwrap_or("-")
        ));
    }
    out
}

pub fn connections_table(table: &SocketTable, sort: SortBy, limit: usize) -> String {
    let mut rows: Vec<&ConnectionRow> = table.connections.iter().collect();
    match sort {
        SortBy::Rtt => rows.sort_by_key(|r| std::cmp::Reverse(r.srtt_us)),
        SortBy::Retrans => rows.sort_by_key(|r| std::cmp::Reverse(r.total_retrans)),
    }
    let mut out = format!(
        "{:<12} {:<11} {:<40} {:<40} {:>9} {:>9} {:>5} {:>7}  {}\n",
        "NETNS", "STATE", "LOCAL", "REMOTE", "RTT_MS", "RTTVAR", "CWND", "RETRANS", "PROCESS"
    );
    for r in rows.into_iter().take(limit) {
        out.push_str(&format!(
            "{:<12} {:<11} {:<40} {:<40} {:>9.3} {:>9.3} {:>5} {:>7}  {}\n",
            r.netns,
            r.state,
            r.local.to_string(),
            r.remote.to_string(),
            f64::from(r.srtt_us) / 1e3,
            f64::from(r.rttvar_us) / 1e3,
            r.cwnd,
            r.total_retrans,
            who(r.pid, &r.process)
        ));
    }
    let listed = table.connections.len();
    if table.connections_sampled > listed {
        out.push_str(&format!(
            "({} more connections sampled beyond the agent's table of {listed}; raise sampler.connection_table_entries to list them)\n",
            table.connections_sampled - listed
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(srtt_us: u32, total_retrans: u32) -> ConnectionRow {
        ConnectionRow {
            netns: 1,
            state: "ESTAB".into(),
            local: "198.18.0.1:8080".parse().expect("addr"),
            remote: "198.18.0.2:40000".parse().expect("addr"),
            srtt_us,
            rttvar_us: 10,
            cwnd: 10,
            total_retrans,
            pid: Some(7),
            process: Some("origin".into()),
            cgroup: None,
            pod_uid: None,
            cookie: 1,
        }
    }

    #[test]
    fn sorts_and_reports_truncation() {
        let table = SocketTable {
            listeners: vec![],
            connections: vec![conn(1000, 5), conn(90_000, 0)],
            connections_sampled: 5,
        };
        let by_rtt = connections_table(&table, SortBy::Rtt, 10);
        let first = by_rtt.lines().nth(1).expect("a row");
        assert!(first.contains("90.000"), "{by_rtt}");
        assert!(by_rtt.contains("3 more connections"), "{by_rtt}");
        let by_retrans = connections_table(&table, SortBy::Retrans, 1);
        assert_eq!(
            by_retrans.lines().count(),
            3,
            "header, one row, truncation note"
        );
        assert!(
            by_retrans.lines().nth(1).expect("row").contains("  5  "),
            "{by_retrans}"
        );
    }

    #[test]
    fn status_summarises_the_exposition() {
        let text = "\
# HELP vigil_hook_active x
vigil_hook_active{hook=\"tp_btf/kfree_skb\",signal=\"socket_drop\"} 1
vigil_hook_active{hook=\"iter/task_file\",signal=\"socket_sampling\"} 0
vigil_events_received_total{probe=\"socket_drop\"} 42
vigil_events_lost_total{probe=\"socket_drop\",reason=\"ring_full\"} 7
vigil_series_active 3
vigil_series_limit 10
vigil_cache_entries{cache=\"cgroup_paths\"} 5
vigil_build_info{version=\"0.1.0\"} 1
";
        let out = render_status("127.0.0.1:9464", text);
        assert!(out.contains("vigil agent 0.1.0"), "{out}");
        assert!(out.contains("active   tp_btf/kfree_skb"), "{out}");
        assert!(out.contains("INACTIVE iter/task_file"), "{out}");
        assert!(
            out.contains("socket_drop                42   7 / 0 / 0"),
            "{out}"
        );
        assert!(out.contains("3 of 10 in use"), "{out}");
        assert!(out.contains("cgroup_paths 5"), "{out}");
    }
}
