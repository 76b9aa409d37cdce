//! Who reaches what: the metrics port answers /metrics and /healthz to
//! anyone, and refuses the query endpoints (they list the node's
//! connections, traces and workloads), which the query socket serves to root
//! only (mode 0600 in a directory of 0700), removed at exit. The metrics port
//! keeps connections alive, compresses and writes OpenMetrics for clients
//! that ask, and a flood of idle connections from one address does not keep
//! the scrape out.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    time::Duration,
};

use vigil_integration_tests::{bpf_available, Agent};
use vigil_testbed::prom::{get, query};

/// Reads one response with a Content-Length body off `s`: (head, body).
fn read_response(s: &mut TcpStream) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut byte)? == 1, "closed before the head ended");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf)?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| anyhow::anyhow!("no Content-Length in {head}"))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok((head, body))
}

#[test]
fn query_endpoints_only_on_the_root_socket_and_the_scrape_port_holds_up() -> anyhow::Result<()> {
    if !bpf_available("query_endpoints_only_on_the_root_socket_and_the_scrape_port_holds_up") {
        return Ok(());
    }
    let mut agent = Agent::start(&[])?;
    let port = agent.metrics_addr;

    for path in [
        "/v1/sockets",
        "/v1/actuation",
        "/v1/traces/0af7651916cd43dd8448eb211c80319c",
    ] {
        let (status, body) = get(port, path)?;
        assert!(
            status.contains(" 404 "),
            "{path} on the metrics port: {status}"
        );
        assert!(body.contains("query socket"), "{path}: {body}");
        let (status, body) = query(&agent.query_socket, path)?;
        let expected = if path.starts_with("/v1/traces/") {
            " 404 "
        } else {
            " 200 "
        };
        assert!(
            status.contains(expected),
            "{path} on the query socket: {status} {body}"
        );
    }
    let (status, body) = get(port, "/metrics")?;
    assert!(status.contains(" 200 "), "{status}");
    assert!(body.contains("vigil_build_info"), "{body}");
    let (status, _) = get(port, "/healthz")?;
    assert!(
        status.contains(" 200 ") || status.contains(" 503 "),
        "{status}"
    );

    let mode = |p: &std::path::Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    let socket = agent.query_socket.clone();
    assert_eq!(mode(&socket)?, 0o600, "the query socket is root's");
    let dir = socket.parent().expect("a directory");
    assert_eq!(mode(dir)?, 0o700, "and so is its directory");

    // Keep-alive: two requests on one connection, the second compressed.
    let mut s = TcpStream::connect(port)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: vigil\r\n\r\n")?;
    let (head, plain) = read_response(&mut s)?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: vigil\r\nAccept-Encoding: gzip\r\n\r\n")?;
    let (head, zipped) = read_response(&mut s)?;
    assert!(
        head.to_ascii_lowercase().contains("content-encoding: gzip"),
        "{head}"
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(&zipped[..]).read_to_string(&mut text)?;
    assert!(text.contains("vigil_build_info"), "gunzipped: {text}");
    assert!(
        zipped.len() * 2 < plain.len(),
        "{} vs {} bytes",
        zipped.len(),
        plain.len()
    );

    // A flood of idle connections from 127.0.0.2: 16 are held (until the
    // 5 s head timeout), the rest closed at once; the scrape from
    // 127.0.0.1 is answered meanwhile.
    let flood_from: SocketAddr = "127.0.0.2:0".parse()?;
    let flood: Vec<TcpStream> = (0..80)
        .map(|_| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&flood_from.into())?;
            sock.connect(&port.into())?;
            anyhow::Ok(TcpStream::from(sock))
        })
        .collect::<anyhow::Result<_>>()?;
    let (status, body) = get(port, "/metrics")?;
    assert!(
        status.contains(" 200 "),
        "scrape during the flood: {status}"
    );
    assert!(body.contains("vigil_build_info"));
    let mut closed = 0;
    for mut s in flood {
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        // Closed by the agent: EOF at once. Held: no byte until the timeout.
        if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(
        closed,
        80 - 16,
        "all but the address's 16 are closed at once"
    );

    // `vigil status --json`: health and acting over the socket; over the
    // metrics port health only. The exit status follows health either way.
    for (endpoint, acting) in [
        (socket.to_string_lossy().into_owned(), true),
        (port.to_string(), false),
    ] {
        let out = std::process::Command::new(vigil_testbed::netns::bin_path("vigil")?)
            .args(["status", "--json", "--agent", &endpoint])
            .output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let degraded = status["health"]["status"] == "degraded";
        assert_eq!(
            out.status.code(),
            Some(if degraded { 3 } else { 0 }),
            "{status}"
        );
        assert_eq!(status["agent"], endpoint.as_str());
        assert_eq!(status["actuation"].is_object(), acting, "{status}");
    }

    assert!(agent.terminate()?.success());
    assert!(!socket.exists(), "the query socket is removed at exit");
    Ok(())
}
