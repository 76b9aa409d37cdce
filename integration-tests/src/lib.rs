//! Fixtures for the real-kernel tests: the agent as a child process whose JSON
//! log is collected, a Prometheus scraper, and the BPF precondition check.

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use vigil_testbed::netns::{bin_path, loadgen_command, spawn_origin, ChildGuard};
pub use vigil_testbed::prom::{metric_sum, scrape};

pub mod acting;

/// HTTP message headers the capture counted with `outcome` (`traced`,
/// `abandoned`, ...) in a scrape of the agent's metrics.
pub fn capture_outcome(metrics: &str, outcome: &str) -> u64 {
    metric_sum(
        metrics,
        "vigil_http_capture_messages_total",
        &[("outcome", outcome)],
    )
}

/// True when this machine can run the real-kernel tests. In CI (CI=true) a
/// missing prerequisite is a failure, never a skip.
pub fn bpf_available(test: &str) -> bool {
    let root = nix::unistd::Uid::effective().is_root();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let tracefs = Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir();
    if root && btf && tracefs {
        return true;
    }
    let why = format!("{test}: needs root, /sys/kernel/btf/vmlinux and tracefs (root={root} btf={btf} tracefs={tracefs})");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {why}"
    );
    eprintln!("SKIPPED (not in CI): {why}");
    false
}

/// A unique short tag for namespaces and cgroups of one test.
pub fn tag(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 100_000)
}

/// A running `vigil agent` with its JSON log lines collected.
pub struct Agent {
    child: ChildGuard,
    log: Arc<Mutex<Vec<Value>>>,
    pub metrics_addr: SocketAddr,
    /// Its query socket (`vigil sockets`, `explain`, `status`), one per agent.
    pub query_socket: PathBuf,
    _query_dir: TempPath,
}

impl Agent {
    /// Starts the agent with `args` (plus JSON logging and an ephemeral metrics
    /// port) and waits until it reports it is running.
    pub fn start(args: &[&str]) -> anyhow::Result<Agent> {
        Agent::start_with_env(args, &[])
    }

    /// Like `start`, with extra environment variables (e.g. OTEL_*).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        let mut cmd = Command::new(bin_path("vigil")?);
        cmd.envs(env.iter().copied());
        Agent::spawn(cmd, args)
    }

    /// Like `start`, with exactly `capabilities` (names as in a pod's
    /// securityContext, e.g. "NET_ADMIN") left in the capability bounding set
    /// through setpriv(1). For uid 0 without file capabilities the permitted
    /// and effective sets after execve equal the bounding set, as in a
    /// container that drops ALL and adds `capabilities`.
    pub fn start_with_capabilities(capabilities: &[&str], args: &[&str]) -> anyhow::Result<Agent> {
        let bounding: String = std::iter::once("-all".to_owned())
            .chain(capabilities.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let setpriv = Command::new("setpriv").arg("--version").output();
        if !setpriv.is_ok_and(|o| o.status.success()) {
            bail!("setpriv not found on PATH: install util-linux (`cargo xtask setup` does)");
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--bounding-set", &bounding, "--"])
            .arg(bin_path("vigil")?);
        Agent::spawn(cmd, args)
    }

    /// Runs `cmd` (the agent binary, or a wrapper that execs it) with the
    /// agent's arguments and waits until it reports it is running.
    fn spawn(mut cmd: Command, args: &[&str]) -> anyhow::Result<Agent> {
        static AGENTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let query_dir = TempPath::new(&format!("query{n}"));
        let query_socket = query_dir.0.join("query.sock");
        cmd.args([
            "agent",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--query-socket")
        .arg(&query_socket)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut cmd)?;
        let stderr = child.child_mut().stderr.take().context("agent stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if let Ok(mut l) = sink.lock() {
                    l.push(value);
                }
            }
        });
        let mut agent = Agent {
            child,
            log,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            query_socket,
            _query_dir: query_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addr) = agent
                .find_log("serving Prometheus metrics at /metrics")
                .and_then(|v| v["addr"].as_str().map(str::to_owned))
            {
                if agent.find_log("vigil agent running").is_some() {
                    agent.metrics_addr = addr.parse().context("metrics addr in log")?;
                    return Ok(agent);
                }
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!(
                    "agent exited during start with {status}; log:\n{}",
                    agent.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!("agent not running after 30 s; log:\n{}", agent.log_text());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the agent with `toml` as its config file (plus `args`); the
    /// file lives as long as the returned path.
    pub fn start_with_config(
        name: &str,
        toml: &str,
        args: &[&str],
    ) -> anyhow::Result<(Agent, TempPath)> {
        let config = TempPath::new(name);
        std::fs::write(&config.0, toml)?;
        let path = config.0.display().to_string();
        let mut all = vec!["--config", path.as_str()];
        all.extend_from_slice(args);
        Ok((Agent::start(&all)?, config))
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn logs(&self) -> Vec<Value> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        self.logs()
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn find_log(&self, message: &str) -> Option<Value> {
        self.logs().into_iter().find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
    }

    /// (kind, id, name) of every kernel object the agent said it created.
    pub fn kernel_objects(&self) -> Vec<(String, u64, String)> {
        self.logs()
            .iter()
            .filter(|v| v["message"].as_str() == Some("kernel object created"))
            .filter_map(|v| {
                Some((
                    v["kind"].as_str()?.to_owned(),
                    v["id"].as_u64()?,
                    v["name"].as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    /// Sets entry 0 of the agent's array map `name` (a u32) with bpftool, as
    /// an operator would.
    pub fn set_map_u32(&self, name: &str, value: u32) -> anyhow::Result<()> {
        let id = self
            .kernel_objects()
            .into_iter()
            .find(|(kind, _, n)| kind == "map" && n == name)
            .map(|(_, id, _)| id.to_string())
            .ok_or_else(|| anyhow::anyhow!("the agent reported no {name} map"))?;
        let bytes = value.to_ne_bytes().map(|b| b.to_string());
        let out = Command::new("bpftool")
            .args([
                "map", "update", "id", &id, "key", "0", "0", "0", "0", "value",
            ])
            .args(&bytes)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "bpftool map update {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn scrape(&self) -> anyhow::Result<String> {
        scrape(self.metrics_addr)
    }

    /// `vigil explain TRACE_ID --json` against this agent: Some(explanation),
    /// or None when the agent has no record of the trace (404).
    pub fn explain(&self, trace_id: &str) -> anyhow::Result<Option<Value>> {
        let out = Command::new(bin_path("vigil")?)
            .args([
                "explain",
                trace_id,
                "--json",
                "--agent",
                &self.query_socket.to_string_lossy(),
            ])
            .output()
            .context("running vigil explain")?;
        if out.status.success() {
            return Ok(Some(
                serde_json::from_slice(&out.stdout).context("vigil explain --json output")?,
            ));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(stderr.contains("404"), "vigil explain {trace_id}: {stderr}");
        Ok(None)
    }

    /// The agent's latest socket sample, through the CLI (`vigil sockets --json`).
    pub fn sockets(&self) -> anyhow::Result<Value> {
        let socket = self.query_socket.to_string_lossy();
        let out = vigil_cli(&["sockets", "--json", "--agent", &socket])?;
        serde_json::from_slice(&out).context("vigil sockets --json output")
    }

    /// SIGTERM and wait for exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.child.terminate(Duration::from_secs(15))
    }

    /// SIGKILL and wait.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.child_mut().kill().context("SIGKILL agent")?;
        self.child
            .child_mut()
            .wait()
            .context("wait for killed agent")?;
        Ok(())
    }
}

/// Scrapes until the agent's total for `netns` reaches `kernel` (the ring is
/// drained asynchronously), or 10 s pass; returns the last scrape either way.
pub fn wait_for_segments(agent: &Agent, netns: &str, kernel: u64) -> anyhow::Result<String> {
    let reached = wait_for(
        Duration::from_secs(10),
        "agent total to reach the kernel's",
        || {
            let text = agent.scrape()?;
            Ok((metric_sum(
                &text,
                "vigil_tcp_retransmitted_segments_total",
                &[("netns", netns)],
            ) >= kernel)
                .then_some(text))
        },
    );
    match reached {
        Ok(text) => Ok(text),
        Err(_) => agent.scrape(),
    }
}

/// Whether bpftool still finds the object the agent logged as `kind`.
pub fn bpftool_shows(kind: &str, id: u64) -> bool {
    let tool_kind = match kind {
        "program" => "prog",
        other => other, // "map", "link"
    };
    Command::new("bpftool")
        .args([tool_kind, "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Polls `f` until it returns Some, or fails after `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Reads an event log (JSON lines) written by `vigil agent --event-log`.
pub fn read_event_log(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad event line {l:?}")))
        .collect()
}

/// A cgroup v2 directory (and any parents it needed) created for a test and
/// removed on drop, deepest first.
pub struct TestCgroup {
    /// Absolute directory under the cgroup2 mount.
    pub dir: PathBuf,
    /// Path as /proc/PID/cgroup prints it ("/a/b").
    pub rel: String,
    created: Vec<PathBuf>,
}

impl TestCgroup {
    /// Creates `rel` (e.g. "vigil-it-x/kubepods/pod<uid>") under the cgroup2 mount.
    pub fn create(rel: &str) -> anyhow::Result<TestCgroup> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = mountinfo
            .lines()
            .find_map(|l| {
                let (pre, post) = l.split_once(" - ")?;
                (post.split_whitespace().next()? == "cgroup2")
                    .then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
            })
            .ok_or_else(|| anyhow!("no cgroup2 mount"))?;
        let mut dir = PathBuf::from(root);
        let mut created = Vec::new();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
                created.push(dir.clone());
            }
        }
        Ok(TestCgroup {
            dir,
            rel: format!("/{}", rel.trim_matches('/')),
            created,
        })
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty by now (its processes were the test's); retry briefly while they exit.
        for dir in self.created.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Closes with RST (SO_LINGER 0) so no FIN handshake outlives the test phase.
pub fn abort(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a live fd and a struct linger value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    drop(stream);
}

/// Starts a non-blocking connect (the handshake completes in the kernel).
pub fn start_connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = nix::sys::socket::SockaddrIn::from(match to {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => bail!("IPv4 only"),
    });
    match nix::sys::socket::connect(socket.as_raw_fd(), &addr) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
        Err(e) => bail!("connect {to}: {e}"),
    }
    Ok(TcpStream::from(socket))
}

/// A temporary file path removed on drop.
pub struct TempPath(pub PathBuf);

impl TempPath {
    pub fn new(name: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(format!("vigil-it-{}-{name}", std::process::id())))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if std::fs::remove_file(&self.0).is_err() {
            // A directory (of sockets).
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Serialises the tests of one binary that create network namespaces. Every
/// agent sees every namespace of the node and labels counts with the
/// namespace's inode number, which the kernel reuses once a namespace is gone:
/// a namespace a concurrent test creates could take the number an agent is
/// already counting under, and mix another test's traffic into its totals.
pub fn one_namespace_test_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for a `vigil-loadgen --json` run to end and returns its summary.
pub fn loadgen_summary(mut load: ChildGuard) -> anyhow::Result<Value> {
    let mut out = String::new();
    if let Some(mut stdout) = load.child_mut().stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    load.terminate(Duration::from_secs(5))?;
    let line = out
        .lines()
        .last()
        .ok_or_else(|| anyhow!("loadgen printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("loadgen summary {line:?}"))
}

/// An origin in the server namespace of a fresh link pair, reached from the
/// client namespace. Dropping it stops the origin and removes both namespaces.
pub struct Scenario {
    pub link: vigil_testbed::netns::LinkPair,
    pub origin: Option<ChildGuard>,
    pub origin_pid: u32,
    pub port: u16,
}

pub use vigil_testbed::origin::DEFAULT_PORT as ORIGIN_PORT;

impl Scenario {
    /// An origin (2 SO_REUSEPORT workers) on link pair `index`, reached from its client namespace.
    pub fn start(tag: &str, index: u8, v6: bool) -> anyhow::Result<Scenario> {
        Scenario::start_with(tag, index, v6, None, &[])
    }

    /// `cgroup_procs`: the origin joins that cgroup; `origin_args`: extra
    /// `vigil-origin` flags (e.g. `--backlog 4`).
    pub fn start_with(
        tag: &str,
        index: u8,
        v6: bool,
        cgroup_procs: Option<&Path>,
        origin_args: &[&str],
    ) -> anyhow::Result<Scenario> {
        let link = vigil_testbed::netns::LinkPair::create(tag, index)?;
        let listen = SocketAddr::new(link.server_addr(v6), ORIGIN_PORT);
        let origin_bin = bin_path("vigil-origin")?;
        let in_netns = link.server.command(&origin_bin);
        let mut cmd = match cgroup_procs {
            Some(procs) => vigil_testbed::netns::in_cgroup(procs, &in_netns),
            None => in_netns,
        };
        cmd.args(origin_args).stderr(Stdio::inherit());
        let (origin, origin_pid) = spawn_origin(&mut cmd, listen, 2, 300)?;
        Ok(Scenario {
            link,
            origin: Some(origin),
            origin_pid,
            port: ORIGIN_PORT,
        })
    }

    pub fn server_netns(&self) -> anyhow::Result<u64> {
        self.link.server.inode()
    }

    /// (server, client) value of a MIB counter, e.g. ("Tcp", "RetransSegs").
    pub fn mib(&self, section: &str, name: &str) -> anyhow::Result<(u64, u64)> {
        let get = |ns: &vigil_testbed::netns::Netns| {
            ns.mib()?
                .get(section, name)
                .ok_or_else(|| anyhow!("no {section} {name} in {}", ns.name()))
        };
        Ok((get(&self.link.server)?, get(&self.link.client)?))
    }

    /// Starts the load generator in the client namespace (not waited for).
    pub fn spawn_load(
        &self,
        v6: bool,
        connections: u32,
        requests: u32,
        max_secs: f64,
    ) -> anyhow::Result<ChildGuard> {
        let target = SocketAddr::new(self.link.server_addr(v6), self.port);
        let loadgen = bin_path("vigil-loadgen")?;
        let mut cmd = loadgen_command(
            &self.link.client,
            &loadgen,
            target,
            connections,
            requests,
            max_secs,
        );
        cmd.arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        ChildGuard::spawn(&mut cmd)
    }

    /// Runs the load generator to completion and returns its JSON summary.
    pub fn run_load(
        &self,
        v6: bool,
        connections: u32,
        requests: u32,
        max_secs: f64,
    ) -> anyhow::Result<Value> {
        loadgen_summary(self.spawn_load(v6, connections, requests, max_secs)?)
    }

    /// Load through `loss_percent` loss for `secs` (requests without end, so
    /// connections span the whole time), then `quiesce`; returns the
    /// (server, client) Tcp RetransSegs deltas, which are then final.
    pub fn retransmits_under_loss(
        &mut self,
        loss_percent: u8,
        connections: u32,
        secs: f64,
    ) -> anyhow::Result<(u64, u64)> {
        let before = self.mib("Tcp", "RetransSegs")?;
        self.link.set_loss(self.port, loss_percent)?;
        self.run_load(false, connections, 1_000_000, secs)?;
        self.quiesce()?;
        let after = self.mib("Tcp", "RetransSegs")?;
        Ok((after.0 - before.0, after.1 - before.1))
    }

    /// Ends all traffic: loss off, origin stopped, and waits until neither
    /// namespace holds a TCP socket that could still send, so counters are final.
    pub fn quiesce(&mut self) -> anyhow::Result<()> {
        self.link.set_loss(self.port, 0)?;
        if let Some(mut origin) = self.origin.take() {
            origin.terminate(Duration::from_secs(5))?;
        }
        for ns in [&self.link.server, &self.link.client] {
            wait_for(
                Duration::from_secs(30),
                "namespace without live TCP sockets",
                || {
                    // TIME-WAIT sockets never retransmit; everything else must be gone.
                    let out = ns.run(&["ss", "-Htan", "exclude", "time-wait"])?;
                    Ok(out.trim().is_empty().then_some(()))
                },
            )?;
        }
        Ok(())
    }
}

// --- OTLP span join (tests/span_join.rs) ---------------------------------

/// `vigil-otlp-sink` with its stdout (one JSON line per export request) in
/// a file, read on demand.
pub struct OtlpSink {
    child: ChildGuard,
    out: TempPath,
    pub addr: SocketAddr,
}

impl OtlpSink {
    pub fn start(name: &str) -> anyhow::Result<OtlpSink> {
        let out = TempPath::new(name);
        let file = std::fs::File::create(&out.0)?;
        let child = ChildGuard::spawn(
            Command::new(bin_path("vigil-otlp-sink")?)
                .args(["--listen", "127.0.0.1:0", "--max-seconds", "300"])
                .stdout(file)
                .stderr(Stdio::inherit()),
        )?;
        let addr = wait_for(Duration::from_secs(10), "the sink's address", || {
            let text = std::fs::read_to_string(&out.0)?;
            Ok(text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("vigil-otlp-sink listening on "))
                .and_then(|a| a.trim().parse().ok()))
        })?;
        Ok(OtlpSink { child, out, addr })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request of `signal` ("metrics", "logs", "traces") so far.
    pub fn requests(&self, signal: &str) -> anyhow::Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.out.0)?;
        Ok(text
            .lines()
            .skip(1)
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["signal"] == signal)
            .collect())
    }

    /// Every span received so far, each with its resource under "resource".
    pub fn spans(&self) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        for r in self.requests("traces")? {
            for s in r["spans"].as_array().into_iter().flatten() {
                let mut s = s.clone();
                s["resource"] = r["resource"].clone();
                out.push(s);
            }
        }
        Ok(out)
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// The Python of the venv `cargo xtask setup` fills with the official
/// OpenTelemetry SDK (VIGIL_OTEL_PYTHON overrides). Missing: a failure in CI
/// (CI=true), a skip elsewhere.
pub fn otel_python(test: &str) -> Option<PathBuf> {
    let python = std::env::var_os("VIGIL_OTEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/otel-python/bin/python")
        });
    if python.is_file() {
        return Some(python);
    }
    let why = format!(
        "{test}: no OpenTelemetry Python SDK at {} (run `cargo xtask setup`)",
        python.display()
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {why}"
    );
    eprintln!("SKIPPED (not in CI): {why}");
    None
}

/// A Python script of integration-tests/py.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Drops `percent`% of the data segments from server port `port` on their
/// arrival in the client namespace (as [`vigil_testbed::netns::LinkPair::set_loss`]),
/// never a SYN, FIN or RST: handshakes and closes are then never retransmitted,
/// so every retransmit is of data sent while a request was served.
pub fn set_data_loss(
    link: &vigil_testbed::netns::LinkPair,
    port: u16,
    percent: u8,
) -> anyhow::Result<()> {
    let script = TempPath::new(&format!("{}-loss.nft", link.client.name()));
    std::fs::write(
        &script.0,
        format!(
            "table inet vigil_data_loss {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp sport {port} tcp flags & (syn | fin | rst) == 0 numgen random mod 100 < {percent} counter drop\n  }}\n}}\n"
        ),
    )?;
    link.client
        .run(&["nft", "-f", &script.0.display().to_string()])
        .map(drop)
}

/// `vigil ARGS...` (the CLI, not the agent): its standard output, or an
/// error with its standard error when it fails.
pub fn vigil_cli(args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(bin_path("vigil")?)
        .args(args)
        .output()
        .with_context(|| format!("running vigil {}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "vigil {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// `vigil status` against `agent`: its exit code and standard output.
pub fn vigil_status(agent: &Agent) -> anyhow::Result<(Option<i32>, String)> {
    let out = Command::new(bin_path("vigil")?)
        .args(["status", "--agent", &agent.query_socket.to_string_lossy()])
        .output()
        .context("running vigil status")?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}
