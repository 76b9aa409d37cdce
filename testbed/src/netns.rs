//! Test hosts as network namespaces (iproute2 `ip netns`), veth links between
//! them, nftables loss, kernel MIB snapshots and process guards.
//!
//! Everything here needs root. Each type cleans up in `Drop` so a failing
//! test leaves no namespace or nft table behind.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where iproute2 bind-mounts named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Runs `cmd`, returning stdout; the error names the command and its stderr.
fn run_command(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{shown} printed non-UTF-8"))
}

/// A named network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME` with `lo` up. A namespace of the same name left by
    /// a crashed run is deleted first.
    pub fn create(name: &str) -> anyhow::Result<Netns> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
            && !name.starts_with('.');
        if !valid {
            bail!("invalid namespace name {name:?}: use 1-64 of [A-Za-z0-9._-]");
        }
        if Path::new(NETNS_DIR).join(name).exists() {
            tracing::info!(name, "deleting stale network namespace");
            run_command(Command::new("ip").args(["netns", "del", name]))
                .with_context(|| format!("deleting stale namespace {name}"))?;
        }
        run_command(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("creating namespace {name} (needs root)"))?;
        // From here on Drop removes the namespace if setup fails.
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace's bind mount.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// The namespace's inode number, as in `readlink /proc/PID/ns/net` and
    /// as eBPF programs see it (`net->ns.inum`).
    pub fn inode(&self) -> anyhow::Result<u64> {
        let path = self.path();
        Ok(std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino())
    }

    /// `ip netns exec NAME program`; add arguments to the returned Command.
    /// `ip` execs the program, so its pid is the program's pid.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` (program first) in the namespace and returns its stdout.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("Netns::run needs a program"))?;
        run_command(self.command(program).args(rest))
    }

    /// Reads a file as seen from inside the namespace (e.g. /proc/net/snmp).
    pub fn read_to_string(&self, path: &str) -> anyhow::Result<String> {
        self.run(&["cat", path])
    }

    /// Kernel SNMP/netstat counters of this namespace right now.
    pub fn mib(&self) -> anyhow::Result<MibSnapshot> {
        let snmp = self.read_to_string("/proc/net/snmp")?;
        let netstat = self.read_to_string("/proc/net/netstat")?;
        MibSnapshot::parse(&snmp, &netstat)
            .with_context(|| format!("parsing MIB counters of namespace {}", self.name))
    }

    /// `ip -n NAME args...`
    fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_command(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Moves the calling thread into this namespace. The network namespace
    /// is per thread, and threads spawned afterwards inherit it.
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        setns(&file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into namespace {}", self.name))
    }

    /// Runs `f` on a new thread inside this namespace, so in-process servers
    /// and clients can be placed in test hosts without helper binaries.
    /// Inside, read `/proc/thread-self/net/...`: `/proc/net` follows the
    /// process's main thread, which stays in its own namespace.
    pub fn spawn_thread<T, F>(&self, f: F) -> anyhow::Result<JoinHandle<anyhow::Result<T>>>
    where
        T: Send + 'static,
        F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    {
        // Opened here so a missing namespace is reported to the caller.
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into namespace {name}"))?;
                drop(file);
                f()
            })
            .context("spawning thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive but nameless; they
        // are not ours to kill (ChildGuard does that).
        if let Err(e) = run_command(Command::new("ip").args(["netns", "del", &self.name])) {
            tracing::warn!(name = %self.name, error = %e, "cannot delete namespace");
        }
    }
}

/// Counters from /proc/net/snmp and /proc/net/netstat, keyed by section
/// ("Tcp", "TcpExt", "Ip", ...) and counter name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MibSnapshot {
    // Signed because a few entries are (Tcp MaxConn is -1).
    values: HashMap<String, HashMap<String, i64>>,
}

impl MibSnapshot {
    /// Parses the two files' text. Both use pairs of lines, a header naming
    /// the counters and a line of values, each prefixed by "Section:".
    pub fn parse(snmp: &str, netstat: &str) -> anyhow::Result<MibSnapshot> {
        let mut snap = MibSnapshot::default();
        snap.parse_pairs(snmp).context("/proc/net/snmp")?;
        snap.parse_pairs(netstat).context("/proc/net/netstat")?;
        Ok(snap)
    }

    /// Counters of the calling thread's network namespace, without spawning
    /// a process (pairs with [`Netns::spawn_thread`]).
    pub fn of_current_thread() -> anyhow::Result<MibSnapshot> {
        let read = |p: &str| std::fs::read_to_string(p).with_context(|| format!("reading {p}"));
        MibSnapshot::parse(
            &read("/proc/thread-self/net/snmp")?,
            &read("/proc/thread-self/net/netstat")?,
        )
    }

    fn parse_pairs(&mut self, text: &str) -> anyhow::Result<()> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        while let Some(header) = lines.next() {
            let values = lines
                .next()
                .ok_or_else(|| anyhow!("header line without values: {header:?}"))?;
            let (section, names) = split_section(header)?;
            let (value_section, numbers) = split_section(values)?;
            if section != value_section {
                bail!("section {section:?} header followed by {value_section:?} values");
            }
            let names: Vec<&str> = names.split_whitespace().collect();
            let numbers: Vec<&str> = numbers.split_whitespace().collect();
            if names.len() != numbers.len() {
                bail!(
                    "section {section}: {} names but {} values",
                    names.len(),
                    numbers.len()
                );
            }
            let entry = self.values.entry(section.to_owned()).or_default();
            for (name, number) in names.into_iter().zip(numbers) {
                let v: i64 = number
                    .parse()
                    .with_context(|| format!("{section} {name}: not a number: {number:?}"))?;
                entry.insert(name.to_owned(), v);
            }
        }
        Ok(())
    }

    /// A counter's value; `None` if absent or negative.
    pub fn get(&self, section: &str, name: &str) -> Option<u64> {
        let section = section.strip_suffix(':').unwrap_or(section);
        let v = *self.values.get(section)?.get(name)?;
        u64::try_from(v).ok()
    }

    /// How much a counter grew since `earlier` (0 if it shrank, which a
    /// counter only does when the namespace was recreated).
    pub fn delta(&self, earlier: &MibSnapshot, section: &str, name: &str) -> Option<u64> {
        Some(
            self.get(section, name)?
                .saturating_sub(earlier.get(section, name)?),
        )
    }

    /// Section names present, for diagnostics.
    pub fn sections(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

fn split_section(line: &str) -> anyhow::Result<(&str, &str)> {
    let (section, rest) = line
        .split_once(':')
        .ok_or_else(|| anyhow!("line without section prefix: {line:?}"))?;
    if section.is_empty() || section.contains(char::is_whitespace) {
        bail!("invalid section name in line {line:?}");
    }
    Ok((section, rest))
}

/// Two namespaces, server and client, joined by a veth pair.
///
/// Interface names: `vs{index}{tag}` on the server side and `vc{index}{tag}`
/// on the client side, cut to the kernel's 15-byte limit. The pair is created
/// directly inside the namespaces (never in the root namespace), so names
/// cannot collide with other pairs or host interfaces even when cut; the tag
/// only helps a human reading `ip link`.
#[derive(Debug)]
pub struct LinkPair {
    pub server: Netns,
    pub client: Netns,
    index: u8,
    server_if: String,
    client_if: String,
}

/// Name of the nftables table `set_loss` manages in the client namespace.
pub const LOSS_TABLE: &str = "vigil_loss";

impl LinkPair {
    /// Namespaces `vigil-{tag}-srv` and `vigil-{tag}-cli`; addresses
    /// 198.18.{index}.1 / .2 (/24) and 2001:2:0:{index:x}::1 / ::2 (/64).
    pub fn create(tag: &str, index: u8) -> anyhow::Result<LinkPair> {
        if tag.is_empty() || tag.len() > 32 || !tag.bytes().all(|c| c.is_ascii_alphanumeric()) {
            bail!("invalid LinkPair tag {tag:?}: use 1-32 ASCII letters or digits");
        }
        if !(1..=250).contains(&index) {
            bail!("LinkPair index must be 1..=250, got {index}");
        }
        let server = Netns::create(&format!("vigil-{tag}-srv"))?;
        let client = Netns::create(&format!("vigil-{tag}-cli"))?;
        let mut server_if = format!("vs{index}{tag}");
        let mut client_if = format!("vc{index}{tag}");
        server_if.truncate(15);
        client_if.truncate(15);
        let pair = LinkPair {
            server,
            client,
            index,
            server_if,
            client_if,
        };
        pair.setup()
            .with_context(|| format!("setting up veth pair for LinkPair {tag}/{index}"))?;
        Ok(pair)
    }

    fn setup(&self) -> anyhow::Result<()> {
        self.server.ip(&[
            "link",
            "add",
            &self.server_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.client_if,
            "netns",
            self.client.name(),
        ])?;
        for (ns, ifname, host) in [
            (&self.server, &self.server_if, 1u8),
            (&self.client, &self.client_if, 2u8),
        ] {
            let v4 = format!("198.18.{}.{host}/24", self.index);
            let v6 = format!("2001:2:0:{:x}::{host}/64", self.index);
            ns.ip(&["addr", "add", &v4, "dev", ifname])?;
            // nodad: usable at once instead of "tentative" for ~1 s.
            ns.ip(&["-6", "addr", "add", &v6, "dev", ifname, "nodad"])?;
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// The veth end inside the server namespace.
    pub fn server_if(&self) -> &str {
        &self.server_if
    }

    /// The veth end inside the client namespace.
    pub fn client_if(&self) -> &str {
        &self.client_if
    }

    pub fn server_addr(&self, v6: bool) -> IpAddr {
        self.addr(v6, 1)
    }

    pub fn client_addr(&self, v6: bool) -> IpAddr {
        self.addr(v6, 2)
    }

    fn addr(&self, v6: bool, host: u8) -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::new(
                0x2001,
                2,
                0,
                self.index.into(),
                0,
                0,
                0,
                host.into(),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 18, self.index, host))
        }
    }

    /// Drops `percent`% of TCP packets from server port `port` as they arrive
    /// in the client namespace; 0 removes the rule. Replaces earlier settings.
    ///
    /// The drop is on the client's input hook on purpose: a drop in the
    /// server's own output chain makes the sender's transmit fail with EPERM,
    /// which TCP handles locally instead of as loss on the wire. Dropped on
    /// arrival, the segments were really sent, so the server sees genuine
    /// loss: missing ACKs, RTO and fast retransmits, counted in its MIB.
    pub fn set_loss(&self, port: u16, percent: u8) -> anyhow::Result<()> {
        if percent > 100 {
            bail!("loss percent must be 0..=100, got {percent}");
        }
        // Declaring the table before deleting it makes the delete succeed
        // whether or not it existed; nft applies the file atomically.
        let mut script = format!("table inet {LOSS_TABLE}\ndelete table inet {LOSS_TABLE}\n");
        if percent > 0 {
            // numgen's range is 0..=99, so "< 100" is rejected: total loss needs no sampling.
            let sample = if percent >= 100 {
                String::new()
            } else {
                format!("numgen random mod 100 < {percent} ")
            };
            script.push_str(&format!(
                "table inet {LOSS_TABLE} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    tcp sport {port} {sample}counter drop\n  }}\n}}\n"
            ));
        }
        self.nft_script(&script).with_context(|| {
            format!(
                "setting {percent}% loss on port {port} in {}",
                self.client.name()
            )
        })
    }

    fn nft_script(&self, script: &str) -> anyhow::Result<()> {
        let mut child = self
            .client
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start nft")?;
        let write_result = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("nft stdin not captured"))
            .and_then(|mut stdin| {
                stdin
                    .write_all(script.as_bytes())
                    .context("writing nft script")
            });
        let out = child.wait_with_output().context("waiting for nft")?;
        if !out.status.success() {
            bail!(
                "nft -f - failed ({}): {}\nscript:\n{script}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        write_result
    }

    /// Packets dropped by the loss rule since the last [`LinkPair::set_loss`]
    /// (0 when no loss is set).
    pub fn loss_drops(&self) -> anyhow::Result<u64> {
        let listing = self
            .client
            .command("nft")
            .args(["-j", "list", "table", "inet", LOSS_TABLE])
            .stdin(Stdio::null())
            .output()
            .context("cannot start nft")?;
        if !listing.status.success() {
            let stderr = String::from_utf8_lossy(&listing.stderr);
            if stderr.contains("No such file or directory") {
                return Ok(0);
            }
            bail!(
                "nft -j list table inet {LOSS_TABLE} failed: {}",
                stderr.trim()
            );
        }
        let json = std::str::from_utf8(&listing.stdout).context("nft printed non-UTF-8")?;
        counter_packets(json)
    }
}

/// Sums `counter.packets` over all rules of an `nft -j list` document.
pub fn counter_packets(nft_json: &str) -> anyhow::Result<u64> {
    let doc: serde_json::Value = serde_json::from_str(nft_json).context("parsing nft JSON")?;
    let items = doc
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| anyhow!("nft JSON has no \"nftables\" array"))?;
    let mut total = 0u64;
    for rule in items.iter().filter_map(|i| i.get("rule")) {
        let exprs = rule.get("expr").and_then(|e| e.as_array());
        for expr in exprs.into_iter().flatten() {
            if let Some(counter) = expr.get("counter") {
                total += counter
                    .get("packets")
                    .and_then(|p| p.as_u64())
                    .ok_or_else(|| anyhow!("nft counter without packets: {counter}"))?;
            }
        }
    }
    Ok(total)
}

/// A child process that is terminated (SIGTERM, then SIGKILL after 2 s) when
/// dropped, so a failing test cannot leak servers.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            status: None,
        }
    }

    /// Spawns `cmd` and guards the process.
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        Ok(ChildGuard::new(child))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status
    /// (also if the process had already exited).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.reap()? {
            return Ok(status);
        }
        let pid =
            Pid::from_raw(i32::try_from(self.child.id()).context("child pid does not fit pid_t")?);
        // ESRCH only means it exited meanwhile; reaping below tells.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = deadline_after(timeout);
        while Instant::now() < deadline {
            if let Some(status) = self.reap()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.child.kill().context("SIGKILL")?;
        let status = self.child.wait().context("waiting after SIGKILL")?;
        self.status = Some(status);
        Ok(status)
    }

    /// Exit status if the process has ended (non-blocking).
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.reap()
    }

    fn reap(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("waitpid")?;
        }
        Ok(self.status)
    }

    /// Reads the child's piped stdout until a line containing `needle`
    /// (e.g. "listening on") and returns that line. Fails on EOF, on exit,
    /// or after `timeout`. Reads byte by byte so nothing after the line is
    /// consumed.
    pub fn wait_for_stdout_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        use std::os::fd::AsFd;
        let stdout = self
            .child
            .stdout
            .as_mut()
            .ok_or_else(|| anyhow!("child stdout is not piped (use Stdio::piped())"))?;
        let deadline = deadline_after(timeout);
        let mut line = Vec::new();
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no stdout line containing {needle:?} within {timeout:?}; got:\n{seen}");
            }
            let ms = u16::try_from(left.as_millis().min(1000)).unwrap_or(1000);
            let mut fds = [nix::poll::PollFd::new(
                stdout.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("poll on child stdout"),
            }
            let mut byte = [0u8; 1];
            match stdout.read(&mut byte) {
                Ok(0) => bail!("child closed stdout before printing {needle:?}; got:\n{seen}"),
                Ok(_) if byte[0] == b'\n' => {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    if text.contains(needle) {
                        return Ok(text);
                    }
                    seen.push_str(&text);
                    seen.push('\n');
                    line.clear();
                }
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading child stdout"),
            }
        }
    }
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        ChildGuard::new(child)
    }
}

/// `now + d`, saturating instead of panicking on absurd durations.
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        match self.terminate(Duration::from_secs(2)) {
            Ok(status) if status.signal() == Some(libc::SIGKILL) => {
                tracing::warn!(pid = self.child.id(), "child ignored SIGTERM, killed");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(pid = self.child.id(), error = %e, "cannot stop child"),
        }
    }
}

/// Locates a workspace binary (`vigil-origin`, `vigil-loadgen`, `vigil`):
/// `$VIGIL_BIN_DIR` if set, else next to the running executable and one
/// directory up (tests run from target/<profile>/deps/).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("VIGIL_BIN_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    } else {
        let exe = std::env::current_exe().context("locating the running executable")?;
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(name));
            if let Some(up) = dir.parent() {
                candidates.push(up.join(name));
            }
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "binary {name:?} not found (looked at {}); run `cargo build --workspace --bins` \
                 (or `cargo xtask test`) first, or set VIGIL_BIN_DIR",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// `vigil-loadgen` in `ns` against `target`: `connections` keep-alive players
/// making `requests` requests each, for at most `max_secs` per run.
pub fn loadgen_command(
    ns: &Netns,
    loadgen: &Path,
    target: std::net::SocketAddr,
    connections: u32,
    requests: u32,
    max_secs: f64,
) -> Command {
    let mut cmd = ns.command(loadgen);
    cmd.args(["--target", &target.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(["--requests-per-connection", &requests.to_string()])
        .args(["--max-duration-secs", &max_secs.to_string()]);
    cmd
}

/// Starts `vigil-origin` through `cmd` (the binary itself, or wrapped in
/// `ip netns exec` or a shell that execs it), waits until every listener is
/// bound, and returns the guarded process with the origin's own pid.
pub fn spawn_origin(
    cmd: &mut Command,
    listen: std::net::SocketAddr,
    workers: u32,
    max_seconds: u64,
) -> anyhow::Result<(ChildGuard, u32)> {
    cmd.args(["--listen", &listen.to_string()])
        .args(["--workers", &workers.to_string()])
        .args(["--max-seconds", &max_seconds.to_string()])
        .stdout(Stdio::piped());
    let mut origin = ChildGuard::spawn(cmd)?;
    let line = origin.wait_for_stdout_line("listening on", Duration::from_secs(10))?;
    let pid = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("no pid in the origin's ready line {line:?}"))?;
    Ok((origin, pid))
}

/// `cmd` behind a shell that first moves itself into the cgroup whose
/// `cgroup.procs` file is `procs`, then execs `cmd` (same pid), so every
/// socket the program opens belongs to that cgroup. Only the program and
/// its arguments are carried over: set environment and stdio on the result.
pub fn in_cgroup(procs: &Path, cmd: &Command) -> Command {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!("echo $$ > {} && exec \"$@\"", procs.display()))
        .arg("sh")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    sh
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "\
Ip: Forwarding DefaultTTL InReceives InHdrErrors
Ip: 2 64 1234 0
Icmp: InMsgs InErrors
Icmp: 3 0
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens RetransSegs InErrs
Tcp: 1 200 120000 -1 42 17 905 0
Udp: InDatagrams NoPorts
Udp: 10 1
";

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPSynRetrans TCPRcvQDrop
TcpExt: 0 7 9 3 0
IpExt: InNoRoutes InOctets
IpExt: 0 987654321987
";

    #[test]
    fn parses_mib_sample() {
        let m = MibSnapshot::parse(SNMP, NETSTAT).expect("valid sample");
        assert_eq!(m.get("Tcp", "RetransSegs"), Some(905));
        assert_eq!(m.get("Tcp:", "ActiveOpens"), Some(42));
        assert_eq!(
            m.get("Tcp", "MaxConn"),
            None,
            "negative values are not counters"
        );
        assert_eq!(m.get("TcpExt", "TCPSynRetrans"), Some(3));
        assert_eq!(m.get("TcpExt", "ListenOverflows"), Some(7));
        assert_eq!(m.get("IpExt", "InOctets"), Some(987_654_321_987));
        assert_eq!(m.get("Ip", "InReceives"), Some(1234));
        assert_eq!(m.get("Tcp", "NoSuchCounter"), None);
        assert_eq!(m.get("Sctp", "RetransSegs"), None);
        let mut sections: Vec<&str> = m.sections().collect();
        sections.sort_unstable();
        assert_eq!(sections, ["Icmp", "Ip", "IpExt", "Tcp", "TcpExt", "Udp"]);
    }

    #[test]
    fn mib_delta() {
        let before = MibSnapshot::parse(SNMP, NETSTAT).expect("valid");
        let after = MibSnapshot::parse(&SNMP.replace(" 905 ", " 1000 "), NETSTAT).expect("valid");
        assert_eq!(after.delta(&before, "Tcp", "RetransSegs"), Some(95));
        assert_eq!(before.delta(&after, "Tcp", "RetransSegs"), Some(0));
        assert_eq!(after.delta(&before, "Tcp", "Nope"), None);
    }

    #[test]
    fn rejects_malformed_mib() {
        for (snmp, why) in [
            ("Tcp: A B\n", "header without values"),
            ("Tcp: A B\nTcp: 1\n", "count mismatch"),
            ("Tcp: A B\nUdp: 1 2\n", "section mismatch"),
            ("Tcp: A B\nTcp: 1 x\n", "non-number"),
            ("Tcp A B\nTcp 1 2\n", "no colon"),
        ] {
            assert!(MibSnapshot::parse(snmp, "").is_err(), "{why}");
        }
        assert!(MibSnapshot::parse("", "").is_ok());
    }

    #[test]
    fn sums_nft_counters() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.1.1", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "vigil_loss", "handle": 1}},
            {"chain": {"family": "inet", "table": "vigil_loss", "name": "input", "handle": 1,
                       "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
            {"rule": {"family": "inet", "table": "vigil_loss", "chain": "input", "handle": 2,
              "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "sport"}}, "right": 8080}},
                {"match": {"op": "<", "left": {"numgen": {"mode": "random", "mod": 100, "offset": 0}}, "right": 5}},
                {"counter": {"packets": 17, "bytes": 25000}},
                {"drop": null}]}}]}"#;
        assert_eq!(counter_packets(json).expect("valid"), 17);
        assert_eq!(counter_packets(r#"{"nftables": []}"#).expect("valid"), 0);
        assert!(counter_packets("not json").is_err());
        assert!(counter_packets(r#"{"other": 1}"#).is_err());
    }

    #[test]
    fn bin_path_explains_missing_binary() {
        let err = bin_path("vigil-no-such-binary").expect_err("must be missing");
        assert!(format!("{err}").contains("cargo build --workspace --bins"));
    }
}
