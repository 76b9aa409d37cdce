//! The sysctl advisor: `net.core.somaxconn` of each pod's network namespace
//! against the connections its listeners drop at full accept queues.
//!
//! The kernel caps every listen backlog at the namespace's somaxconn, so a
//! listener whose queue capacity equals somaxconn and that drops connections
//! is held back by the sysctl, not by the service: the advisor recommends
//! doubling it (at most once per `STEP_INTERVAL` per namespace, up to
//! `MAX_SOMAXCONN`). It always recommends; it writes the sysctl only in
//! `enforce` for selected workloads, remembers the value it found, and puts
//! it back when the agent stops.
//!
//! Services read somaxconn at `listen()` (Go: once per process, at its first
//! listen), so a raised value helps listeners created afterwards: the
//! listen-backlog target of the control API tells the service to listen
//! again. Kubernetes treats `net.core.somaxconn` (like `tcp_max_syn_backlog`
//! and `tcp_tw_reuse`) as an unsafe sysctl: a pod may set it in
//! `securityContext.sysctls` only on nodes whose kubelet allows it with
//! `--allowed-unsafe-sysctls`, which is why the agent can do it from outside.
//!
//! A namespace is entered with setns(2) on a short-lived thread of its own
//! (never on a runtime thread: setns moves only the calling thread), which
//! needs CAP_SYS_ADMIN; without it the advisor recommends and records the
//! refusal.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tracing::warn;

use super::{
    audit::{Action, AuditRecord},
    selector::{self, Selector},
    ActState, ActuationMode,
};
use crate::{kube_pods::PodDirectory, socket_health::SocketTable};

pub const SOMAXCONN: &str = "net.core.somaxconn";
const MAX_SOMAXCONN: u32 = 65_535;
const STEP_INTERVAL: Duration = Duration::from_secs(10);

/// Runs `f` on a new thread inside the network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &OwnedFd,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = ns.try_clone()?;
    std::thread::Builder::new()
        .name("vigil-netns".into())
        .spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            f()
        })?
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

/// A sysctl's value in namespace `ns`.
pub fn read_in(ns: &OwnedFd, name: &str) -> std::io::Result<u32> {
    let path = sysctl_path(name);
    in_netns(ns, move || {
        std::fs::read_to_string(&path)?
            .trim()
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    })
}

/// Sets a sysctl in namespace `ns`.
pub fn write_in(ns: &OwnedFd, name: &str, value: u32) -> std::io::Result<()> {
    let path = sysctl_path(name);
    in_netns(ns, move || std::fs::write(&path, value.to_string()))
}

/// The network namespace `inode` through a thread of `pid` in it: usually
/// the process's own, but a thread may have entered another one (setns),
/// and sockets belong to the namespace they were made in.
fn netns_of(pid: u32, inode: u32) -> Option<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    let open = |path: String| {
        let f = File::open(path).ok()?;
        (f.metadata().ok()?.ino() == u64::from(inode)).then(|| OwnedFd::from(f))
    };
    open(format!("/proc/{pid}/ns/net")).or_else(|| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(Result::ok)
            .find_map(|t| open(format!("{}/ns/net", t.path().display())))
    })
}

/// A value the advisor wrote, and what to put back.
struct Changed {
    /// Keeps the namespace alive and reachable after its processes are gone.
    ns: OwnedFd,
    old: u32,
    new: u32,
    /// The workload it was written for.
    workload: String,
}

pub struct SysctlAdvisor {
    mode: ActuationMode,
    selectors: Vec<Selector>,
    pods: Option<Arc<RwLock<PodDirectory>>>,
    act: Arc<ActState>,
    /// Listener drops summed per namespace at the previous tick.
    drops: HashMap<u32, u64>,
    last_step: HashMap<u32, Instant>,
    changed: HashMap<u32, Changed>,
}

impl SysctlAdvisor {
    pub fn new(
        mode: ActuationMode,
        selectors: Vec<Selector>,
        pods: Option<Arc<RwLock<PodDirectory>>>,
        act: Arc<ActState>,
    ) -> SysctlAdvisor {
        SysctlAdvisor {
            mode,
            selectors,
            pods,
            act,
            drops: HashMap::new(),
            last_step: HashMap::new(),
            changed: HashMap::new(),
        }
    }

    fn record(&self, netns: u32, applied: bool, signal: String, before: String, after: String) {
        self.audit(Action::SetSysctl, netns, applied, signal, before, after);
    }

    fn audit(
        &self,
        action: Action,
        netns: u32,
        applied: bool,
        signal: String,
        before: String,
        after: String,
    ) {
        self.act.audit.record(AuditRecord {
            at_unix_ms: crate::clock::unix_now_ns() / 1_000_000,
            mode: self.mode.as_str().to_owned(),
            applied,
            action,
            group: format!("netns {netns}"),
            member: Some(SOMAXCONN.to_owned()),
            signal,
            before,
            after,
        });
    }

    /// One period over the latest socket sample.
    pub fn tick(&mut self, sockets: &SocketTable) {
        let mut by_netns: HashMap<u32, Vec<&crate::socket_health::ListenerRow>> = HashMap::new();
        for l in &sockets.listeners {
            by_netns.entry(l.netns).or_default().push(l);
        }
        let now = Instant::now();
        for (netns, rows) in by_netns {
            let total: u64 = rows.iter().map(|l| u64::from(l.drops)).sum();
            let dropped = self
                .drops
                .insert(netns, total)
                .map_or(0, |d| total.saturating_sub(d));
            if dropped == 0
                || self
                    .last_step
                    .get(&netns)
                    .is_some_and(|t| now.duration_since(*t) < STEP_INTERVAL)
            {
                continue;
            }
            let Some(owner) = rows
                .iter()
                .find(|l| l.drops > 0)
                .and_then(|l| Some((l.pid?, l)))
            else {
                continue;
            };
            self.last_step.insert(netns, now);
            self.advise(netns, owner.0, owner.1, dropped);
        }
    }

    fn advise(
        &mut self,
        netns: u32,
        pid: u32,
        row: &crate::socket_health::ListenerRow,
        dropped: u64,
    ) {
        let process = row.process.clone().unwrap_or_default();
        let workload = selector::workload_of(pid, &process, self.pods.as_deref());
        let Some(ns) = netns_of(pid, netns) else {
            return warn!(
                pid,
                netns,
                "sysctl advisor: no thread of the listener's process is in its network namespace"
            );
        };
        let current = match read_in(&ns, SOMAXCONN) {
            Ok(v) => v,
            Err(e) => {
                let why = format!(
                    "cannot read {SOMAXCONN} in the namespace (needs CAP_SYS_ADMIN for setns): {e}"
                );
                return self.record(netns, false, why, "unknown".into(), "untouched".into());
            }
        };
        // The service asked for less than somaxconn: its backlog, not the
        // sysctl, is the limit (the control API's listen-backlog target).
        if row.queue_cap < current || current >= MAX_SOMAXCONN {
            return;
        }
        let next = current.saturating_mul(2).min(MAX_SOMAXCONN);
        let signal = format!(
            "{dropped} connections dropped at full accept queues of {} on {} ({}), capped by {SOMAXCONN}",
            row.queue_cap,
            row.local,
            workload.key()
        );
        let enforce = self.mode == ActuationMode::Enforce
            && self.selectors.iter().any(|s| s.matches(&workload));
        if !enforce {
            return self.record(netns, false, signal, current.to_string(), next.to_string());
        }
        match write_in(&ns, SOMAXCONN, next) {
            Ok(()) => {
                self.record(netns, true, signal, current.to_string(), next.to_string());
                let old = self.changed.get(&netns).map_or(current, |c| c.old);
                self.changed.insert(
                    netns,
                    Changed {
                        ns,
                        old,
                        new: next,
                        workload: workload.key(),
                    },
                );
            }
            Err(e) => self.record(
                netns,
                false,
                format!("{signal}; writing it failed: {e}"),
                current.to_string(),
                current.to_string(),
            ),
        }
    }

    /// Puts back every value the advisor changed (at exit).
    pub fn restore_all(&mut self) {
        for (netns, c) in std::mem::take(&mut self.changed) {
            let result = write_in(&c.ns, SOMAXCONN, c.old);
            let applied = result.is_ok();
            let signal = match result {
                Ok(()) => format!(
                    "agent stopping: restoring the value found for {}",
                    c.workload
                ),
                Err(e) => format!(
                    "agent stopping: restoring the value found for {} failed: {e}",
                    c.workload
                ),
            };
            self.audit(
                Action::RestoreSysctl,
                netns,
                applied,
                signal,
                c.new.to_string(),
                c.old.to_string(),
            );
        }
    }
}

/// The advisor's thread: a tick per `period` until `stop`, then restore.
pub fn spawn(
    mut advisor: SysctlAdvisor,
    view: tokio::sync::watch::Receiver<Arc<crate::view::View>>,
    period: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vigil-sysctl".into())
        .spawn(move || {
            while !stop.is_cancelled() {
                let sockets = Arc::clone(&view.borrow().sockets);
                advisor.tick(&sockets);
                let until = Instant::now() + period;
                while !stop.is_cancelled() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            advisor.restore_all();
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_in_the_own_namespace() {
        // The agent's own namespace, entered through its own fd: reading
        // works unprivileged, and the value is the host's.
        let Ok(f) = File::open("/proc/self/ns/net") else {
            return;
        };
        let ns = OwnedFd::from(f);
        match read_in(&ns, SOMAXCONN) {
            Ok(v) => {
                let host: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
                    .expect("readable")
                    .trim()
                    .parse()
                    .expect("a number");
                assert_eq!(v, host);
            }
            // setns needs CAP_SYS_ADMIN even into one's own namespace.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}"),
        }
        assert_eq!(
            sysctl_path("net.core.somaxconn"),
            "/proc/sys/net/core/somaxconn"
        );
    }
}
