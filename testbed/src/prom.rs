//! A Prometheus scrape client for tests and the demo: GET /metrics and sum
//! samples; GET from the agent's query socket.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail};

/// GET `path` over plain HTTP: the status line and the body, whatever the status.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(String, String)> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(s, path)
}

/// GET `path` from the agent's query socket (`agent.query_socket`).
pub fn query(socket: &Path, path: &str) -> anyhow::Result<(String, String)> {
    let s = UnixStream::connect(socket)
        .map_err(|e| anyhow!("connecting to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    exchange(s, path)
}

fn exchange(mut s: impl Read + Write, path: &str) -> anyhow::Result<(String, String)> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: vigil\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head in {text:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

/// GET /metrics over plain HTTP.
pub fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = get(addr, "/metrics")?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("scrape failed: {status}");
    }
    Ok(body)
}

/// Sum of a metric's samples whose labels include every `(name, value)` given.
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
            if name != metric {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}
