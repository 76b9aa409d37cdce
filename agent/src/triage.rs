//! `vigil sockets`: what the running agent's latest sample shows, as tables an
//! SRE reads during an incident (fullest accept queues, slowest connections).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::socket_health::{ConnectionRow, ListenerRow, SocketTable};

const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error(
        "cannot reach the agent at {addr} (is `vigil agent` running there? see --agent): {source}"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading from the agent at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {addr} answered `{status}`")]
    Status { addr: SocketAddr, status: String },
    #[error("the agent's answer is not a socket table: {0}")]
    Body(#[from] serde_json::Error),
}

/// GETs /v1/sockets from the agent.
pub fn fetch(addr: SocketAddr) -> Result<SocketTable, TriageError> {
    let io = |source| TriageError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|source| TriageError::Connect { addr, source })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream
        .write_all(b"GET /v1/sockets HTTP/1.1\r\nHost: vigil\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut response)
        .map_err(io)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| TriageError::Status {
            addr,
            status: "no HTTP header".into(),
        })?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.lines().next().unwrap_or_default().to_owned();
    if !status.contains(" 200 ") {
        return Err(TriageError::Status { addr, status });
    }
    Ok(serde_json::from_slice(&response[split + 4..])?)
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
    fn unreachable_agent_is_explained() {
        // Port 9 (discard) on loopback: nothing listens in the test environment.
        let err = fetch("127.0.0.1:9".parse().expect("addr")).expect_err("refused");
        assert!(
            err.to_string().contains("is `vigil agent` running"),
            "{err}"
        );
    }
}
