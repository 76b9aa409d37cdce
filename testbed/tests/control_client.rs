//! The real `vigil-origin` binary as a client of the control API, against an
//! in-process mock agent on a Unix socket: what it registers, what it
//! reports while requests go through its upstream pool, and which targets it
//! applies (checked from outside: its stdout lines, its LISTEN sockets in
//! /proc, its 503s). Loopback only; a few seconds.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use vigil_control::v1::control_server::{Control, ControlServer};
use vigil_control::v1::{
    Bounds, CountTarget, LoadReport, Mode, PoolTarget, RegisterRequest, RegisterResponse,
    ReportSummary, Targets, WatchTargetsRequest,
};
use vigil_testbed::http;
use vigil_testbed::netns::ChildGuard;
use vigil_testbed::origin::{segment_byte, Origin, OriginConfig, RunningOrigin};

const SEGMENT_BYTES: usize = 50_000;
const CONTROL_PERIOD_MS: u32 = 200;
/// Every upstream request takes this long, so concurrent requests overlap.
const UPSTREAM_SERVICE: Duration = Duration::from_millis(400);
const REGISTRATION: &str = "reg-1";

/// What the mock agent saw, in order.
#[derive(Debug)]
enum Seen {
    Registered(RegisterRequest),
    Report(LoadReport),
}

struct MockAgent {
    seen: Mutex<mpsc::Sender<Seen>>,
    /// Targets the test sends; the first WatchTargets call takes them.
    targets: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Targets>>>,
}

#[tonic::async_trait]
impl Control for MockAgent {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let _ = self
            .seen
            .lock()
            .expect("seen")
            .send(Seen::Registered(request.into_inner()));
        Ok(Response::new(RegisterResponse {
            registration: REGISTRATION.into(),
            workload: "process vigil-origin".into(),
            mode: Mode::Binding as i32,
            control_period_ms: CONTROL_PERIOD_MS,
        }))
    }

    async fn report_load(
        &self,
        request: Request<Streaming<LoadReport>>,
    ) -> Result<Response<ReportSummary>, Status> {
        let mut stream = request.into_inner();
        let mut reports = 0;
        while let Some(r) = stream.message().await? {
            reports += 1;
            let _ = self.seen.lock().expect("seen").send(Seen::Report(r));
        }
        Ok(Response::new(ReportSummary { reports }))
    }

    type WatchTargetsStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<Targets, Status>> + Send>>;

    async fn watch_targets(
        &self,
        _request: Request<WatchTargetsRequest>,
    ) -> Result<Response<Self::WatchTargetsStream>, Status> {
        let rx = self
            .targets
            .lock()
            .expect("targets")
            .take()
            .ok_or_else(|| Status::failed_precondition("the mock serves one watch"))?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn restore_sysctls(
        &self,
        _request: Request<vigil_control::v1::RestoreSysctlsRequest>,
    ) -> Result<Response<vigil_control::v1::RestoreSysctlsResponse>, Status> {
        Err(Status::unimplemented(
            "the origin never asks for sysctls back",
        ))
    }
}

/// The mock agent served on its own thread; the server ends with the test.
struct Agent {
    seen: mpsc::Receiver<Seen>,
    targets: tokio::sync::mpsc::UnboundedSender<Targets>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Agent {
    fn start(socket: &Path) -> Agent {
        let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let (seen_tx, seen) = mpsc::channel();
        let (targets, targets_rx) = tokio::sync::mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let mock = MockAgent {
            seen: Mutex::new(seen_tx),
            targets: Mutex::new(Some(targets_rx)),
        };
        thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).expect("listener");
                tonic::transport::Server::builder()
                    .add_service(ControlServer::new(mock))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = shutdown_rx.await;
                        },
                    )
                    .await
                    .expect("mock agent serves");
            });
        });
        Agent {
            seen,
            targets,
            _shutdown: shutdown,
        }
    }

    fn next(&self, deadline: Instant) -> Seen {
        let left = deadline.saturating_duration_since(Instant::now());
        self.seen
            .recv_timeout(left)
            .expect("the origin talks to the agent in time")
    }

    fn send(&self, t: Targets) {
        self.targets.send(t).expect("watch open");
    }
}

/// The upstream the origin's pool fetches from: every request takes
/// `UPSTREAM_SERVICE`.
fn upstream() -> RunningOrigin {
    Origin::bind(OriginConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        workers: 1,
        segment_bytes: SEGMENT_BYTES,
        segments: 4,
        service: UPSTREAM_SERVICE,
        ..OriginConfig::default()
    })
    .expect("bind upstream")
    .spawn()
}

/// One GET on a fresh connection: status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let end = http::find_head_end(&raw).expect("complete head");
    let head = http::parse_response_head(&raw[..end]).expect("valid head");
    (head.status, raw[end..].to_vec())
}

/// Fetches segment `index` through the origin's upstream route and checks it
/// is the upstream's, byte for byte.
fn fetch_relayed(origin: SocketAddr, index: u32) {
    let (status, body) = get(origin, &format!("/upstream/demo/seg{index}.ts"));
    assert_eq!(status, 200);
    assert_eq!(body.len(), SEGMENT_BYTES);
    assert!(body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == segment_byte(index, i as u64)));
}

/// LISTEN sockets of process `pid` on `port`: its socket inodes joined with
/// its network namespace's /proc/net/tcp.
fn listeners_of(pid: u32, port: u16) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("net/tcp");
    tcp.lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            f.get(3) == Some(&"0A")
                && local_port == Some(port)
                && f.get(9).is_some_and(|i| inodes.contains(*i))
        })
        .count()
}

fn wait_listeners(pid: u32, port: u16, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let n = listeners_of(pid, port);
        if n == want || Instant::now() >= deadline {
            return n;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn count(value: u32, reason: &str) -> Option<CountTarget> {
    Some(CountTarget {
        value,
        reason: reason.into(),
    })
}

#[test]
fn origin_registers_reports_and_applies_targets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("control.sock");
    let upstream = upstream();
    let agent = Agent::start(&socket);

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigil-origin"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--backlog",
        "128",
    ])
    .args(["--upstream", &upstream.addr.to_string()])
    .args(["--pool-max-idle", "2", "--pool-max-open", "8"])
    .args(["--pool-idle-bounds", "1:32", "--pool-open-bounds", "2:64"])
    .args(["--listener-bounds", "1:4", "--concurrency-bounds", "2:100"])
    .args(["--control-socket", socket.to_str().expect("utf-8 path")])
    .args(["--max-seconds", "30"])
    .stdout(Stdio::piped());
    let mut origin = ChildGuard::spawn(&mut cmd).expect("start vigil-origin");
    let line = origin
        .wait_for_stdout_line("listening on", Duration::from_secs(5))
        .expect("listening line");
    let addr: SocketAddr = line
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .expect("address in the listening line");
    assert!(
        line.ends_with(&format!("workers=2 pid={}", origin.pid())),
        "{line}"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    let Seen::Registered(reg) = agent.next(deadline) else {
        panic!("first call is not Register");
    };
    assert_eq!(reg.pools.len(), 1, "{reg:?}");
    let pool = &reg.pools[0];
    assert_eq!(pool.name, "upstream");
    assert_eq!(pool.upstream, upstream.addr.to_string());
    assert_eq!((pool.max_idle, pool.max_open), (2, 8));
    assert_eq!(pool.idle_bounds, Some(Bounds { min: 1, max: 32 }));
    assert_eq!(pool.open_bounds, Some(Bounds { min: 2, max: 64 }));
    assert_eq!(reg.listeners, 2);
    assert_eq!(reg.listener_bounds, Some(Bounds { min: 1, max: 4 }));
    assert_eq!(reg.concurrency_limit, 0);
    assert_eq!(reg.concurrency_bounds, Some(Bounds { min: 2, max: 100 }));
    assert_eq!(reg.serving_port, u32::from(addr.port()));
    assert_eq!(reg.listen_backlog, 128);

    // The first report starts the periods the fetches below fall into.
    let Seen::Report(first) = agent.next(deadline) else {
        panic!("registered twice");
    };
    assert_eq!(first.registration, REGISTRATION);
    let fetches: Vec<_> = (0..6)
        .map(|i| thread::spawn(move || fetch_relayed(addr, i % 4)))
        .collect();
    for f in fetches {
        f.join().expect("fetch");
    }
    // Every request is in exactly one period's report.
    let (mut requests, mut pool_requests, mut opened) = (0, 0, 0);
    let mut hold_seen = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while pool_requests < 6 || requests < 6 {
        let Seen::Report(r) = agent.next(deadline) else {
            panic!("registered twice");
        };
        assert_eq!(r.registration, REGISTRATION);
        let p = &r.pools[0];
        assert_eq!((p.pool.as_str(), p.errors), ("upstream", 0), "{r:?}");
        assert!(p.in_use + p.idle <= 8, "{r:?}");
        requests += r.requests;
        pool_requests += p.requests;
        opened += p.opened;
        if p.requests > 0 {
            assert!(p.hold_mean_ms > 0.0 && r.latency_p50_ms > 0.0, "{r:?}");
            assert!(r.latency_p99_ms >= r.latency_p50_ms, "{r:?}");
            hold_seen = true;
        }
    }
    assert_eq!((requests, pool_requests), (6, 6));
    assert!(hold_seen && (1..=6).contains(&opened), "opened {opened}");

    assert_eq!(listeners_of(origin.pid(), addr.port()), 2);
    agent.send(Targets {
        generation: 1,
        mode: Mode::Binding as i32,
        // max_open 0: no advice, the origin keeps its 8.
        pools: vec![PoolTarget {
            pool: "upstream".into(),
            max_idle: 7,
            reason: "hold time 40 ms at 150 req/s".into(),
            max_open: 0,
        }],
        listeners: count(3, "accept queue \"full\" on 2 of 2"),
        concurrency_limit: count(5, "latency p99 above target"),
        listen_backlog: None,
    });
    let timeout = Duration::from_secs(5);
    let pool_line = origin
        .wait_for_stdout_line("generation=1 mode=binding applied=true pool=", timeout)
        .expect("pool target line");
    assert_eq!(
        pool_line,
        "vigil-origin target generation=1 mode=binding applied=true pool=upstream max_idle=7 max_open=8 reason=\"hold time 40 ms at 150 req/s\""
    );
    let listeners_line = origin
        .wait_for_stdout_line("generation=1 mode=binding applied=true listeners=", timeout)
        .expect("listeners target line");
    assert_eq!(
        listeners_line,
        r#"vigil-origin target generation=1 mode=binding applied=true listeners=3 reason="accept queue \"full\" on 2 of 2""#
    );
    origin
        .wait_for_stdout_line(
            "generation=1 mode=binding applied=true concurrency_limit=5 reason=\"latency p99 above target\"",
            timeout,
        )
        .expect("concurrency target line");
    assert_eq!(wait_listeners(origin.pid(), addr.port(), 3), 3);

    // 8 requests at once against a limit of 5, each held UPSTREAM_SERVICE
    // upstream: the surplus is shed with 503.
    let start = Arc::new(Barrier::new(8));
    let statuses: Vec<u16> = (0..8)
        .map(|_| {
            let start = Arc::clone(&start);
            thread::spawn(move || {
                start.wait();
                get(addr, "/upstream/demo/seg1.ts").0
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("request"))
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let shed = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + shed, 8, "{statuses:?}");
    assert!(ok >= 5 && shed >= 1, "{statuses:?}");

    // Advice without --apply-advice is printed, not applied.
    agent.send(Targets {
        generation: 2,
        mode: Mode::Advisory as i32,
        pools: Vec::new(),
        listeners: count(1, "idle workers"),
        concurrency_limit: None,
        listen_backlog: None,
    });
    let advice = origin
        .wait_for_stdout_line("generation=2", timeout)
        .expect("advisory line");
    assert_eq!(
        advice,
        "vigil-origin target generation=2 mode=advisory applied=false listeners=1 reason=\"idle workers\""
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(listeners_of(origin.pid(), addr.port()), 3);
    fetch_relayed(addr, 2);

    let status = origin
        .terminate(Duration::from_secs(5))
        .expect("stop origin");
    assert!(status.success(), "{status:?}");
}
