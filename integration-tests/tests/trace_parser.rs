//! The kernel's `traceparent` parser against hand-made HTTP/1.1 traffic on
//! loopback: headers split across segments at every awkward place, names in
//! other cases, malformed, truncated, oversized and adversarial headers, and
//! keep-alive connections switching trace context request by request. What
//! the server socket's capture reported (the agent's event log) must be
//! exactly what each case expects, and the agent must stay healthy.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use serde_json::Value;
use vigil_integration_tests::{
    bpf_available, capture_outcome, metric_sum, read_event_log, wait_for, Agent, TempPath,
};

const SPAN: &str = "00f067aa0ba902b7";

fn trace(n: u32) -> String {
    format!("4bf92f3577b34da6a3ce929d{n:08x}")
}

fn tp(n: u32) -> String {
    format!("00-{}-{SPAN}-01", trace(n))
}

/// A minimal HTTP/1.1 server: answers every request (head, then a body of
/// Content-Length bytes) with an empty 200, until the client closes.
fn serve(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { return };
        thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let body: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + body {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                buf.drain(..end + 4 + body);
                if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Reads from `s` until a blank line ends a message head; false if the peer
/// closed first. (The heads here carry no body and nothing follows them.)
fn read_head(s: &mut TcpStream) -> std::io::Result<bool> {
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut b)?;
        if k == 0 {
            return Ok(false);
        }
        got.extend_from_slice(&b[..k]);
    }
    Ok(true)
}

/// Sends a GET carrying trace `n` and reads the answer's head.
fn send_traced(client: &mut TcpStream, n: u32) -> anyhow::Result<()> {
    let text = format!(
        "GET /{n} HTTP/1.1\r\nHost: vigil\r\ntraceparent: {}\r\n\r\n",
        tp(n)
    );
    client.write_all(text.as_bytes())?;
    anyhow::ensure!(read_head(client)?, "server closed");
    Ok(())
}

/// One request as segments: each part is written on its own (TCP_NODELAY,
/// with a pause, so each is one segment on loopback).
struct Request(Vec<Vec<u8>>);

impl Request {
    fn whole(text: &str) -> Request {
        Request(vec![text.as_bytes().to_vec()])
    }
    fn split(parts: &[&str]) -> Request {
        Request(parts.iter().map(|p| p.as_bytes().to_vec()).collect())
    }
}

struct Case {
    name: &'static str,
    requests: Vec<Request>,
    /// Whether the server answers (false: the client stops mid-header).
    complete: bool,
    /// What the server socket's capture reports, in order: a trace id, or
    /// "invalid" for a value that is not W3C.
    expect: Vec<String>,
}

/// Sends the case's requests on one connection; returns the client port.
fn run_case(server: SocketAddr, case: &Case) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect(server)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let port = s.local_addr()?.port();
    for req in &case.requests {
        for part in &req.0 {
            s.write_all(part)?;
            thread::sleep(Duration::from_millis(30));
        }
        if case.complete {
            anyhow::ensure!(read_head(&mut s)?, "{}: server closed", case.name);
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    Ok(port)
}

fn cases() -> Vec<Case> {
    let get = |n: u32| {
        format!(
            "GET /{n} HTTP/1.1\r\nHost: vigil\r\ntraceparent: {}\r\n\r\n",
            tp(n)
        )
    };
    let cookie = |len: usize| format!("Cookie: {}\r\n", "c".repeat(len));
    let evil = format!("GET /x HTTP/1.1\r\ntraceparent: {}\r\n\r\n", tp(666));
    vec![
        Case {
            name: "whole header",
            requests: vec![Request::whole(&get(1))],
            complete: true,
            expect: vec![trace(1)],
        },
        Case {
            name: "name in other cases, tab before the value",
            requests: vec![Request::whole(&format!(
                "GET / HTTP/1.1\r\nHost: vigil\r\nTraceParent:\t{}\r\n\r\n",
                tp(2)
            ))],
            complete: true,
            expect: vec![trace(2)],
        },
        Case {
            name: "split before the traceparent line",
            requests: vec![Request::split(&[
                "GET / HTTP/1.1\r\nHost: vigil\r\n",
                &format!("traceparent: {}\r\n\r\n", tp(3)),
            ])],
            complete: true,
            expect: vec![trace(3)],
        },
        Case {
            name: "split inside the value",
            requests: vec![Request::split(&[
                &format!("GET / HTTP/1.1\r\ntraceparent: {}", &tp(4)[..20]),
                &format!("{}\r\nHost: vigil\r\n\r\n", &tp(4)[20..]),
            ])],
            complete: true,
            expect: vec![trace(4)],
        },
        Case {
            name: "split inside the name, and inside the request line",
            requests: vec![Request::split(&[
                "GET / HT",
                "TP/1.1\r\nHost: vigil\r\ntrace",
                &format!("parent: {}\r\n\r\n", tp(5)),
            ])],
            complete: true,
            expect: vec![trace(5)],
        },
        Case {
            name: "keep-alive: traced, untraced, traced",
            requests: vec![
                Request::whole(&get(6)),
                Request::whole("GET /none HTTP/1.1\r\nHost: vigil\r\n\r\n"),
                Request::whole(&get(7)),
            ],
            complete: true,
            expect: vec![trace(6), trace(7)],
        },
        Case {
            name: "malformed value (not hex)",
            requests: vec![Request::whole(&format!(
                "GET / HTTP/1.1\r\ntraceparent: 00-{}-{SPAN}-01\r\n\r\n",
                "z".repeat(32)
            ))],
            complete: true,
            expect: vec!["invalid".into()],
        },
        Case {
            name: "value cut short by the end of the header",
            requests: vec![Request::whole(
                "GET / HTTP/1.1\r\ntraceparent: 00-4bf9\r\nHost: vigil\r\nAccept: */*\r\nUser-Agent: a-long-enough-agent-string\r\n\r\n",
            )],
            complete: true,
            expect: vec!["invalid".into()],
        },
        Case {
            name: "header over the 8 KiB limit, then a normal request",
            requests: vec![
                Request::split(&[
                    "GET / HTTP/1.1\r\n",
                    &cookie(1500),
                    &cookie(1500),
                    &cookie(1500),
                    &cookie(1500),
                    &cookie(1500),
                    &cookie(1500),
                    &format!("traceparent: {}\r\n\r\n", tp(8)),
                ]),
                Request::whole(&get(9)),
            ],
            complete: true,
            expect: vec![trace(9)],
        },
        Case {
            name: "one segment longer than the scan window, then a normal request",
            requests: vec![
                Request::whole(&format!(
                    "GET / HTTP/1.1\r\n{}traceparent: {}\r\n\r\n",
                    cookie(3000),
                    tp(10)
                )),
                Request::whole(&get(11)),
            ],
            complete: true,
            expect: vec![trace(11)],
        },
        Case {
            name: "a request body that looks like a request with a trace",
            requests: vec![Request::split(&[
                &format!(
                    "POST /upload HTTP/1.1\r\nHost: vigil\r\ntraceparent: {}\r\nContent-Length: {}\r\n\r\n",
                    tp(12),
                    evil.len()
                ),
                &evil,
            ])],
            complete: true,
            expect: vec![trace(12)],
        },
        Case {
            name: "binary garbage after a method, connection dropped",
            requests: vec![Request(vec![{
                let mut g = b"GET ".to_vec();
                g.extend((0..2000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
                g
            }])],
            complete: false,
            expect: vec![],
        },
        Case {
            name: "truncated inside the value, connection dropped",
            requests: vec![Request::whole("GET / HTTP/1.1\r\ntraceparent: 00-4bf92f35")],
            complete: false,
            expect: vec![],
        },
    ]
}

#[test]
fn kernel_parser_reports_exactly_what_each_header_carries() -> anyhow::Result<()> {
    if !bpf_available("kernel_parser_reports_exactly_what_each_header_carries") {
        return Ok(());
    }
    parser_cases(Via::Calls, Some(Via::Calls))
}

/// The same cases with both directions read from the packets
/// (`cgroup_skb/ingress` and `egress`), as on kernels without the
/// `sock_recv_length` and `tcp_sendmsg_locked` tracepoints: the reports
/// must not change.
#[test]
fn capture_from_packets_reports_the_same() -> anyhow::Result<()> {
    if !bpf_available("capture_from_packets_reports_the_same") {
        return Ok(());
    }
    parser_cases(Via::Packets, Some(Via::Packets))
}

/// The same cases with messages sent not read (`--capture-received-only`):
/// the server never sees its own responses, so a new request is told from
/// the last one's body by the server having written something since. The
/// reports must not change, whether requests are read from the server's
/// reads or from the packets.
#[test]
fn received_only_capture_reports_the_same() -> anyhow::Result<()> {
    if !bpf_available("received_only_capture_reports_the_same") {
        return Ok(());
    }
    parser_cases(Via::Calls, None)?;
    parser_cases(Via::Packets, None)
}

/// Where the capture reads a direction's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The application's own calls: its reads (`tp_btf/sock_recv_length`)
    /// and writes (`tp_btf/tcp_sendmsg_locked`).
    Calls,
    /// The packets (`cgroup_skb/ingress`, `cgroup_skb/egress`), the
    /// tracepoint disabled.
    Packets,
}

/// `sent`: None for `--capture-received-only`.
fn parser_cases(received: Via, sent: Option<Via>) -> anyhow::Result<()> {
    let log = TempPath::new(&format!("trace-parser-{received:?}-{sent:?}-events.jsonl"));
    let log_arg = log.0.display().to_string();
    let mut args = vec!["--event-log", log_arg.as_str()];
    if received == Via::Packets {
        args.extend(["--disable-hook", "tp_btf/sock_recv_length"]);
    }
    match sent {
        Some(Via::Calls) => {}
        Some(Via::Packets) => args.extend(["--disable-hook", "tp_btf/tcp_sendmsg_locked"]),
        None => args.push("--capture-received-only"),
    }
    let agent = Agent::start(&args)?;
    let before = agent.scrape()?;
    // The capture programs passed the verifier and are attached where this
    // mode reads.
    let metrics = agent.scrape()?;
    let by_packets = received == Via::Packets;
    for (hook, attached) in [
        ("tp_btf/sock_recv_length", !by_packets),
        ("cgroup_skb/ingress", by_packets),
        ("tp_btf/inet_sock_set_state", by_packets),
        ("tp_btf/tcp_sendmsg_locked", sent == Some(Via::Calls)),
        ("cgroup_skb/egress", sent == Some(Via::Packets)),
    ] {
        assert_eq!(
            vigil_integration_tests::metric_sum(&metrics, "vigil_hook_active", &[("hook", hook)]),
            u64::from(attached),
            "{hook} attached: {attached}\n{metrics}"
        );
    }

    let mut results = Vec::new();
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let listener = TcpListener::bind(addr)?;
        let server = listener.local_addr()?;
        thread::spawn(move || serve(listener));
        for case in cases() {
            let port = run_case(server, &case)?;
            results.push((server, port, case));
        }
    }

    // Every case's reports, from the server socket (it received the requests).
    let received = |events: &[Value], server: SocketAddr, port: u16| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["kind"] == "trace_context" && e["direction"] == "received")
            .filter(|e| e["local"] == server.to_string())
            .filter(|e| {
                e["remote"]
                    .as_str()
                    .and_then(|r| r.parse::<SocketAddr>().ok())
                    .is_some_and(|r| r.port() == port)
            })
            .map(|e| match e["trace_id"].as_str() {
                Some(t) => t.to_owned(),
                None if e["trace_invalid"] == true => "invalid".to_owned(),
                None => "none".to_owned(),
            })
            .collect()
    };
    let expected_reports: usize = results.iter().map(|(_, _, c)| c.expect.len()).sum();
    let events = wait_for(Duration::from_secs(10), "every expected report", || {
        let events = read_event_log(&log.0)?;
        let n: usize = results
            .iter()
            .map(|(s, p, _)| received(&events, *s, *p).len())
            .sum();
        Ok((n >= expected_reports).then_some(events))
    })?;
    for (server, port, case) in &results {
        assert_eq!(
            received(&events, *server, *port),
            case.expect,
            "{} ({server})",
            case.name
        );
    }
    // The adversarial ones were seen and set aside, not misread.
    let after = agent.scrape()?;
    let delta =
        |outcome: &str| capture_outcome(&after, outcome) - capture_outcome(&before, outcome);
    assert!(
        delta("abandoned") >= 4,
        "oversized headers abandoned:\n{after}"
    );
    assert!(
        metric_sum(&after, "vigil_trace_stamps_invalid_total", &[]) >= 4,
        "malformed values counted:\n{after}"
    );
    assert!(agent.sockets().is_ok(), "the agent still answers");
    Ok(())
}

/// A server that listened before the agent started: the kernel never saw
/// its listener open, so the first request, which arrives before accept(),
/// is announced without an owner (the agent falls back to /proc). accept()
/// records the owner, and the socket is announced again with its next
/// trace: every later record carries the kernel's owner, so the agent does
/// no /proc lookup per message.
#[test]
fn a_server_older_than_the_agent_gets_its_owner_from_the_kernel() -> anyhow::Result<()> {
    if !bpf_available("a_server_older_than_the_agent_gets_its_owner_from_the_kernel") {
        return Ok(());
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    let log = TempPath::new("trace-parser-old-server.jsonl");
    let agent = Agent::start(&["--event-log", &log.0.display().to_string()])?;
    const REQUESTS: u32 = 5;
    let mut client = TcpStream::connect(server)?;
    let port = client.local_addr()?.port();
    let request = |n: u32| {
        format!(
            "GET /{n} HTTP/1.1\r\nHost: vigil\r\ntraceparent: {}\r\n\r\n",
            tp(100 + n)
        )
    };
    // In the accept queue: nobody has called accept() yet.
    client.write_all(request(0).as_bytes())?;
    thread::sleep(Duration::from_millis(100));
    thread::spawn(move || serve(listener));
    let mut response = [0u8; 64];
    for n in 0..REQUESTS {
        if n > 0 {
            client.write_all(request(n).as_bytes())?;
        }
        let got = client.read(&mut response)?;
        anyhow::ensure!(got > 0, "response to request {n}");
    }
    let records = wait_for(Duration::from_secs(10), "every request's record", || {
        let lines: Vec<Value> = read_event_log(&log.0)?
            .into_iter()
            .filter(|e| e["kind"] == "trace_context" && e["direction"] == "received")
            .filter(|e| e["local"] == server.to_string())
            .filter(|e| e["remote"] == format!("127.0.0.1:{port}"))
            .collect();
        Ok((lines.len() >= REQUESTS as usize).then_some(lines))
    })?;
    let sources: Vec<&str> = records
        .iter()
        .map(|r| r["owner_source"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(
        sources[1..],
        ["kernel"; REQUESTS as usize - 1],
        "after accept(), every record carries the kernel's owner: {sources:?}"
    );
    assert!(
        records.iter().all(|r| r["comm"] == records[0]["comm"]),
        "one owner throughout: {records:?}"
    );
    drop(agent);
    Ok(())
}

/// Responses: one to a request that carried trace context is not read (the
/// request's context governs the exchange, even if the response names
/// another trace); one to a request without it is read, and its
/// `traceparent` is where the trace starts, at both ends.
#[test]
fn a_response_is_read_only_when_its_request_had_no_trace() -> anyhow::Result<()> {
    if !bpf_available("a_response_is_read_only_when_its_request_had_no_trace") {
        return Ok(());
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    let log = TempPath::new("trace-parser-responses.jsonl");
    let agent = Agent::start(&["--event-log", &log.0.display().to_string()])?;
    let before = agent.scrape()?;
    // Each response names its own trace: 201 answers the traced request,
    // 202 the untraced one.
    thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        for n in [201, 202] {
            if !read_head(&mut s)? {
                return Ok(());
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\ntraceparent: {}\r\n\r\n",
                tp(n)
            );
            s.write_all(answer.as_bytes())?;
        }
        Ok(())
    });
    let mut client = TcpStream::connect(server)?;
    let local = client.local_addr()?;
    let traced = format!(
        "GET /a HTTP/1.1\r\nHost: vigil\r\ntraceparent: {}\r\n\r\n",
        tp(200)
    );
    for request in [traced.as_str(), "GET /b HTTP/1.1\r\nHost: vigil\r\n\r\n"] {
        client.write_all(request.as_bytes())?;
        anyhow::ensure!(read_head(&mut client)?, "server closed");
    }
    // (local end, direction, message, trace id) of this connection's records.
    let ours = |events: &[Value]| -> Vec<(String, String, String, String)> {
        let field = |e: &Value, k: &str| e[k].as_str().unwrap_or("none").to_owned();
        events
            .iter()
            .filter(|e| e["kind"] == "trace_context")
            .filter(|e| {
                (e["local"] == server.to_string() && e["remote"] == local.to_string())
                    || (e["local"] == local.to_string() && e["remote"] == server.to_string())
            })
            .map(|e| {
                let end = if e["local"] == server.to_string() {
                    "server"
                } else {
                    "client"
                };
                (
                    end.into(),
                    field(e, "direction"),
                    field(e, "message"),
                    field(e, "trace_id"),
                )
            })
            .collect()
    };
    let records = wait_for(Duration::from_secs(10), "the connection's records", || {
        let r = ours(&read_event_log(&log.0)?);
        Ok((r.len() >= 4).then_some(r))
    })?;
    let mut records = records;
    records.sort();
    let rec = |end: &str, dir: &str, msg: &str, n: u32| {
        (end.to_owned(), dir.to_owned(), msg.to_owned(), trace(n))
    };
    let mut want = vec![
        rec("client", "sent", "request", 200),
        rec("server", "received", "request", 200),
        rec("client", "received", "response", 202),
        rec("server", "sent", "response", 202),
    ];
    want.sort();
    assert_eq!(
        records, want,
        "trace 201 (the traced request's answer) is never read"
    );
    let answered =
        capture_outcome(&agent.scrape()?, "answered") - capture_outcome(&before, "answered");
    assert!(
        answered >= 2,
        "the traced request's response answered at both ends: {answered}"
    );
    Ok(())
}

/// `VIGIL_PAUSE`, set with bpftool as an operator would: the capture programs
/// read nothing while it is set, and read again once it is cleared, on the
/// same keep-alive connection.
#[test]
fn a_paused_capture_reads_nothing_until_resumed() -> anyhow::Result<()> {
    if !bpf_available("a_paused_capture_reads_nothing_until_resumed") {
        return Ok(());
    }
    let log = TempPath::new("trace-parser-pause.jsonl");
    let agent = Agent::start(&["--event-log", &log.0.display().to_string()])?;
    let set = |value: u32| agent.set_map_u32("VIGIL_PAUSE", value);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    thread::spawn(move || serve(listener));
    let mut client = TcpStream::connect(server)?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let local = client.local_addr()?;
    let mut request = |n: u32| send_traced(&mut client, n);
    set(1)?;
    request(301)?;
    request(302)?;
    set(0)?;
    request(303)?;
    // Records of this connection reach the log in order: once 303's are
    // there (sent and received), 301's and 302's would be too.
    let ours = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["kind"] == "trace_context")
            .filter(|e| e["local"] == local.to_string() || e["remote"] == local.to_string())
            .filter_map(|e| e["trace_id"].as_str().map(str::to_owned))
            .collect()
    };
    let seen = wait_for(
        Duration::from_secs(10),
        "the resumed request's records",
        || {
            let seen = ours(&read_event_log(&log.0)?);
            Ok((seen.len() >= 2).then_some(seen))
        },
    )?;
    assert_eq!(
        seen,
        [trace(303), trace(303)],
        "only the request after resuming, seen sent and received"
    );
    drop(agent);
    Ok(())
}

/// A request in the segment that completes a handshake (`TCP_DEFER_ACCEPT`,
/// as nginx's `deferred` sets; also a lost final ACK, or TCP Fast Open) is
/// recorded once, on the connection (never on the listener, a bogus
/// connection of its trace), also when its header goes on in the
/// connection's next segment. Read from the server's reads, it is like any
/// other; read from the packets, it is filtered against the listener before
/// the connection's own socket exists, and handed to the socket once that
/// is established (`tp_btf/inet_sock_set_state`).
#[test]
fn a_request_that_completes_the_handshake_is_read_for_its_connection() -> anyhow::Result<()> {
    if !bpf_available("a_request_that_completes_the_handshake_is_read_for_its_connection") {
        return Ok(());
    }
    handshake_case(Via::Calls)?;
    handshake_case(Via::Packets)
}

fn handshake_case(received: Via) -> anyhow::Result<()> {
    let log = TempPath::new(&format!("trace-parser-deferred-{received:?}.jsonl"));
    let log_arg = log.0.display().to_string();
    let mut args = vec!["--event-log", log_arg.as_str()];
    if received == Via::Packets {
        args.extend(["--disable-hook", "tp_btf/sock_recv_length"]);
    }
    let agent = Agent::start(&args)?;
    let metrics = agent.scrape()?;
    assert_eq!(
        metric_sum(
            &metrics,
            "vigil_hook_active",
            &[("hook", "tp_btf/inet_sock_set_state")]
        ),
        u64::from(received == Via::Packets),
        "the handoff is attached behind the ingress hook only\n{metrics}"
    );
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let server = listener.local_addr()?;
    let secs: libc::c_int = 5;
    // SAFETY: a valid socket and option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::addr_of!(secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "TCP_DEFER_ACCEPT: {}",
        std::io::Error::last_os_error()
    );
    thread::spawn(move || serve(listener));
    // Two requests on one connection, the first in the handshake-completing segment.
    let mut client = TcpStream::connect(server)?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    let first = client.local_addr()?;
    send_traced(&mut client, 401)?;
    send_traced(&mut client, 402)?;
    // A header that starts in the handshake-completing segment and ends,
    // `traceparent` included, in the connection's next one.
    let mut split = TcpStream::connect(server)?;
    split.set_nodelay(true)?;
    split.set_read_timeout(Some(Duration::from_secs(5)))?;
    let second = split.local_addr()?;
    split.write_all(b"GET /403 HTTP/1.1\r\nHost: vigil\r\n")?;
    thread::sleep(Duration::from_millis(100));
    split.write_all(format!("traceparent: {}\r\n\r\n", tp(403)).as_bytes())?;
    anyhow::ensure!(read_head(&mut split)?, "server closed");
    let traces = [trace(401), trace(402), trace(403)];
    // (end, trace id) of every record of these traces, wherever it was.
    let ours = |events: &[Value]| -> Vec<(String, String)> {
        events
            .iter()
            .filter(|e| e["kind"] == "trace_context")
            .filter(|e| traces.iter().any(|t| e["trace_id"] == t.as_str()))
            .map(|e| {
                let end = if e["local"] == first.to_string() || e["local"] == second.to_string() {
                    format!("client {}", e["local"])
                } else {
                    format!("{} from {}", e["local"], e["remote"])
                };
                (end, e["trace_id"].as_str().unwrap_or_default().to_owned())
            })
            .collect()
    };
    wait_for(
        Duration::from_secs(10),
        "the three requests' records",
        || Ok((ours(&read_event_log(&log.0)?).len() >= 6).then_some(())),
    )?;
    // A record put on the listener, or read twice, would come with these.
    thread::sleep(Duration::from_millis(500));
    let mut seen = ours(&read_event_log(&log.0)?);
    seen.sort();
    let at_server = |client: SocketAddr| format!("\"{server}\" from \"{client}\"");
    let at_client = |client: SocketAddr| format!("client \"{client}\"");
    let mut want = vec![
        (at_client(first), trace(401)),
        (at_client(first), trace(402)),
        (at_client(second), trace(403)),
        (at_server(first), trace(401)),
        (at_server(first), trace(402)),
        (at_server(second), trace(403)),
    ];
    want.sort();
    assert_eq!(
        seen, want,
        "every request once at each end, on its own connection (received: {received:?})"
    );
    drop(agent);
    Ok(())
}

/// How the server of `every_read_call_is_read` reads a request.
#[derive(Debug, Clone, Copy)]
enum ReadCall {
    Read,
    Recv,
    Readv,
    Recvmsg,
    /// A `MSG_PEEK` look at the bytes first (not the stream's next bytes
    /// yet: not taken as read), then `recv`.
    PeekThenRecv,
}

impl ReadCall {
    const ALL: [ReadCall; 5] = [
        ReadCall::Read,
        ReadCall::Recv,
        ReadCall::Readv,
        ReadCall::Recvmsg,
        ReadCall::PeekThenRecv,
    ];

    /// One call into `buf`; the bytes read (0: closed).
    fn call(self, fd: libc::c_int, buf: &mut [u8]) -> std::io::Result<usize> {
        let (p, n) = (buf.as_mut_ptr().cast::<libc::c_void>(), buf.len());
        let mut iov = libc::iovec {
            iov_base: p,
            iov_len: n,
        };
        // SAFETY: `buf` (and `iov`, the message header pointing at it) live
        // through each call, which writes at most `n` bytes.
        let rc = unsafe {
            match self {
                ReadCall::Read => libc::read(fd, p, n),
                ReadCall::Recv => libc::recv(fd, p, n, 0),
                ReadCall::Readv => libc::readv(fd, &iov, 1),
                ReadCall::Recvmsg => {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = &mut iov;
                    msg.msg_iovlen = 1;
                    libc::recvmsg(fd, &mut msg, 0)
                }
                ReadCall::PeekThenRecv => match libc::recv(fd, p, n, libc::MSG_PEEK) {
                    rc if rc <= 0 => rc,
                    _ => libc::recv(fd, p, n, 0),
                },
            }
        };
        usize::try_from(rc).map_err(|_| std::io::Error::last_os_error())
    }
}

/// Messages received are read where the application reads them: whichever
/// read-family call it uses, the request's trace is recorded at the server
/// socket, once.
#[test]
fn every_read_call_is_read() -> anyhow::Result<()> {
    if !bpf_available("every_read_call_is_read") {
        return Ok(());
    }
    let log = TempPath::new("trace-parser-read-calls.jsonl");
    let agent = Agent::start(&["--event-log", &log.0.display().to_string()])?;
    let metrics = agent.scrape()?;
    assert_eq!(
        metric_sum(
            &metrics,
            "vigil_hook_active",
            &[("hook", "tp_btf/sock_recv_length")]
        ),
        1,
        "{metrics}"
    );
    let mut clients = Vec::new();
    for (i, call) in ReadCall::ALL.into_iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let server = listener.local_addr()?;
        let answer = thread::spawn(move || -> std::io::Result<()> {
            let (mut s, _) = listener.accept()?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match call.call(fd, &mut buf)? {
                    0 => return Ok(()),
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        });
        let mut client = TcpStream::connect(server)?;
        client.set_read_timeout(Some(Duration::from_secs(5)))?;
        send_traced(&mut client, 500 + i as u32)?;
        answer
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        clients.push((call, server, client.local_addr()?, trace(500 + i as u32)));
    }
    // The server end's records of each connection.
    let at_server = |events: &[Value], server: SocketAddr, client: SocketAddr| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["kind"] == "trace_context" && e["direction"] == "received")
            .filter(|e| e["local"] == server.to_string() && e["remote"] == client.to_string())
            .filter_map(|e| e["trace_id"].as_str().map(str::to_owned))
            .collect()
    };
    let events = wait_for(Duration::from_secs(10), "a record per call", || {
        let events = read_event_log(&log.0)?;
        let all = clients
            .iter()
            .all(|(_, s, c, _)| !at_server(&events, *s, *c).is_empty());
        Ok(all.then_some(events))
    })?;
    for (call, server, client, trace) in &clients {
        assert_eq!(
            at_server(&events, *server, *client),
            std::slice::from_ref(trace),
            "read with {call:?}"
        );
    }
    Ok(())
}
