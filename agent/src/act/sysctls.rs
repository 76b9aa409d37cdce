//! The sysctl advisor: each pod network namespace's `net.core.somaxconn`,
//! `tcp_max_syn_backlog`, `ip_local_port_range` and `tcp_tw_reuse` against
//! what its sockets suffer (the rules: `sysctl_rules`).
//!
//! It always recommends (an audit record per advice, at most once per
//! `STEP_INTERVAL` per namespace and sysctl); it writes only in `enforce`
//! for selected workloads, remembers the value it found, and puts it back
//! when the agent stops or the workload asks (the control API's
//! RestoreSysctls).
//!
//! Services read somaxconn at `listen()` (Go: once per process, at its first
//! listen), so a raised value helps listeners created afterwards: the
//! listen-backlog target of the control API tells the service to listen
//! again. The port range and TIME_WAIT reuse apply to the next `connect()`;
//! tcp_max_syn_backlog to the next SYN. Kubernetes treats all four but the
//! port range as unsafe sysctls: a pod may set them in
//! `securityContext.sysctls` only on nodes whose kubelet allows it with
//! `--allowed-unsafe-sysctls`, which is why the agent can do it from outside.
//! Entering a namespace needs CAP_SYS_ADMIN; without it the advisor records
//! the refusal. The node's own namespace (hostNetwork pods) is only advised
//! on, never written.

use std::{
    collections::{HashMap, HashSet},
    os::fd::OwnedFd,
    sync::{mpsc, Arc, RwLock},
    time::{Duration, Instant},
};

use tracing::warn;
use vigil_control::v1::SysctlChange;

use super::{
    audit::{Action, AuditRecord},
    netns::{self, Reading},
    selector::{self, Selector},
    sysctl_rules::{self, Dropping, Observed},
    ActState, ActuationMode,
};
use crate::{kube_pods::PodDirectory, socket_health::SocketTable};

/// The shortest time between two pieces of advice on one sysctl of a
/// namespace: a change takes effect at the next listen or connect.
const STEP_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest time between two readings of a namespace (each one a thread
/// entering it).
const READ_INTERVAL: Duration = Duration::from_secs(2);

/// A value the advisor wrote, and what to put back.
struct Changed {
    /// Keeps the namespace alive and reachable after its processes are gone.
    ns: OwnedFd,
    old: String,
    new: String,
    /// The workload it was written for (`Workload::key`).
    workload: String,
}

/// A workload asking for its namespace's sysctls back.
pub struct RestoreRequest {
    pub workload: String,
    pub reply: tokio::sync::oneshot::Sender<Vec<SysctlChange>>,
}

/// One namespace's sockets in the latest sample.
#[derive(Default)]
struct Seen {
    observed: Observed,
    /// A process with a socket in it: the way in, and its workload.
    owner: Option<(u32, String)>,
}

#[derive(Default)]
struct NetnsState {
    /// Listener drops per listener at the previous tick.
    drops: HashMap<std::net::SocketAddr, u32>,
    reading: Option<(Instant, Reading)>,
    last_step: HashMap<&'static str, Instant>,
}

pub struct SysctlAdvisor {
    mode: ActuationMode,
    selectors: Vec<Selector>,
    pods: Option<Arc<RwLock<PodDirectory>>>,
    act: Arc<ActState>,
    netns: HashMap<u32, NetnsState>,
    changed: HashMap<(u32, &'static str), Changed>,
    /// Workloads that asked for their values back: advised, never written
    /// again until the agent restarts.
    held_back: HashSet<String>,
    /// The node's network namespace (init's, seen through hostPID) and the
    /// agent's own: only advised on.
    node_netns: Vec<u32>,
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
            netns: HashMap::new(),
            changed: HashMap::new(),
            held_back: HashSet::new(),
            node_netns: ["/proc/1/ns/net", "/proc/self/ns/net"]
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .filter_map(|m| u32::try_from(std::os::unix::fs::MetadataExt::ino(&m)).ok())
                .collect(),
        }
    }

    fn audit(
        &self,
        action: Action,
        netns: u32,
        name: &str,
        applied: bool,
        signal: String,
        (before, after): (&str, &str),
    ) {
        self.act.audit.record(AuditRecord {
            at_unix_ms: crate::clock::unix_now_ns() / 1_000_000,
            mode: self.mode.as_str().to_owned(),
            applied,
            action,
            group: format!("netns {netns}"),
            member: Some(name.to_owned()),
            signal,
            before: before.to_owned(),
            after: after.to_owned(),
        });
    }

    /// The latest sample's sockets, per namespace.
    fn seen(sockets: &SocketTable) -> HashMap<u32, Seen> {
        let mut by_netns: HashMap<u32, Seen> = HashMap::new();
        for l in &sockets.listeners {
            let seen = by_netns.entry(l.netns).or_default();
            seen.observed.listener_drops.push(Dropping {
                local: l.local,
                queue_cap: l.queue_cap,
                dropped: u64::from(l.drops),
            });
            if let (Some(pid), None) = (l.pid, &seen.owner) {
                seen.owner = Some((pid, l.process.clone().unwrap_or_default()));
            }
        }
        for c in &sockets.connections {
            if !matches!(c.state.as_str(), "ESTAB" | "SYN-SENT") {
                continue;
            }
            let seen = by_netns.entry(c.netns).or_default();
            seen.observed.connections.push((c.local.port(), c.remote));
            if let (Some(pid), None) = (c.pid, &seen.owner) {
                seen.owner = Some((pid, c.process.clone().unwrap_or_default()));
            }
        }
        by_netns
    }

    /// One period over the latest socket sample.
    pub fn tick(&mut self, sockets: &SocketTable) {
        let now = Instant::now();
        let seen = Self::seen(sockets);
        self.netns.retain(|n, _| seen.contains_key(n));
        for (netns, mut seen) in seen {
            let state = self.netns.entry(netns).or_default();
            // Drops since the previous tick, per listener.
            let mut grew = false;
            for d in &mut seen.observed.listener_drops {
                let total = u32::try_from(d.dropped).unwrap_or(u32::MAX);
                let then = state.drops.insert(d.local, total);
                d.dropped = then.map_or(0, |t| u64::from(total.saturating_sub(t)));
                grew |= d.dropped > 0;
            }
            let due = state
                .reading
                .is_none_or(|(at, _)| now.duration_since(at) >= READ_INTERVAL);
            if !(due || grew) {
                continue;
            }
            let Some((pid, process)) = seen.owner.clone() else {
                continue;
            };
            self.look(netns, pid, &process, &seen.observed, now);
        }
    }

    fn look(&mut self, netns: u32, pid: u32, process: &str, observed: &Observed, now: Instant) {
        let workload = selector::workload_of(pid, process, self.pods.as_deref());
        let Some(ns) = netns::netns_of(pid, netns) else {
            return warn!(
                pid,
                netns, "sysctl advisor: no thread of the process is in its network namespace"
            );
        };
        let reading = match Reading::of(&ns) {
            Ok(r) => r,
            Err(e) => {
                let state = self.netns.entry(netns).or_default();
                let logged = state
                    .last_step
                    .get("read")
                    .is_some_and(|t| now.duration_since(*t) < STEP_INTERVAL);
                state.last_step.insert("read", now);
                state.reading = None;
                if !logged {
                    let why = format!(
                        "cannot read the namespace of {} (entering it needs CAP_SYS_ADMIN): {e}",
                        workload.key()
                    );
                    self.audit(
                        Action::SetSysctl,
                        netns,
                        "read",
                        false,
                        why,
                        ("unknown", "untouched"),
                    );
                }
                return;
            }
        };
        let state = self.netns.entry(netns).or_default();
        let before = state.reading.replace((now, reading)).map(|(_, r)| r);
        let advice = sysctl_rules::advise(&reading, before.as_ref(), observed);
        let selected = self.mode == ActuationMode::Enforce
            && self.selectors.iter().any(|s| s.matches(&workload));
        let held_back = self.held_back.contains(&workload.key());
        // A write in the node's namespace (hostNetwork pods share it) would
        // change every host-network process.
        let node = self.node_netns.contains(&netns);
        let enforce = selected && !held_back && !node;
        for a in advice {
            let state = self.netns.entry(netns).or_default();
            if state
                .last_step
                .get(a.name)
                .is_some_and(|t| now.duration_since(*t) < STEP_INTERVAL)
            {
                continue;
            }
            state.last_step.insert(a.name, now);
            let mut signal = format!("{} ({})", a.signal, workload.key());
            if selected && held_back {
                signal.push_str("; not written: the workload asked for its values back");
            } else if selected && node {
                signal.push_str("; not written: the node's own network namespace");
            }
            if !enforce {
                self.audit(
                    Action::SetSysctl,
                    netns,
                    a.name,
                    false,
                    signal,
                    (&a.before, &a.after),
                );
                continue;
            }
            match netns::write_in(&ns, a.name, &a.after) {
                Ok(()) => {
                    self.audit(
                        Action::SetSysctl,
                        netns,
                        a.name,
                        true,
                        signal,
                        (&a.before, &a.after),
                    );
                    let old = self
                        .changed
                        .get(&(netns, a.name))
                        .map_or(a.before.clone(), |c| c.old.clone());
                    let ns = match ns.try_clone() {
                        Ok(ns) => ns,
                        Err(e) => {
                            warn!(netns, error = %e, "sysctl advisor: cannot keep the namespace to restore it");
                            continue;
                        }
                    };
                    self.changed.insert(
                        (netns, a.name),
                        Changed {
                            ns,
                            old,
                            new: a.after,
                            workload: workload.key(),
                        },
                    );
                }
                Err(e) => self.audit(
                    Action::SetSysctl,
                    netns,
                    a.name,
                    false,
                    format!("{signal}; writing it failed: {e}"),
                    (&a.before, &a.before),
                ),
            }
        }
    }

    /// Puts back the values changed for the workloads `which` accepts.
    fn restore(&mut self, which: impl Fn(&str) -> bool, why: &str) -> Vec<SysctlChange> {
        let keys: Vec<_> = self
            .changed
            .iter()
            .filter(|(_, c)| which(&c.workload))
            .map(|(k, _)| *k)
            .collect();
        let mut restored = Vec::new();
        for key @ (netns, name) in keys {
            let Some(c) = self.changed.remove(&key) else {
                continue;
            };
            let result = netns::write_in(&c.ns, name, &c.old);
            let applied = result.is_ok();
            let reason = match result {
                Ok(()) => format!("{why}: restoring the value found for {}", c.workload),
                Err(e) => format!(
                    "{why}: restoring the value found for {} failed: {e}",
                    c.workload
                ),
            };
            self.audit(
                Action::RestoreSysctl,
                netns,
                name,
                applied,
                reason.clone(),
                (&c.new, &c.old),
            );
            restored.push(SysctlChange {
                name: name.to_owned(),
                before: c.new,
                after: c.old,
                applied,
                reason,
            });
        }
        restored.sort_by(|a, b| a.name.cmp(&b.name));
        restored
    }

    /// Puts back every value the advisor changed (at exit).
    pub fn restore_all(&mut self) {
        self.restore(|_| true, "agent stopping");
    }

    /// Puts back what was changed for one workload, on its request, and
    /// writes nothing more for it until the agent restarts.
    pub fn restore_for(&mut self, workload: &str) -> Vec<SysctlChange> {
        self.held_back.insert(workload.to_owned());
        self.restore(|w| w == workload, "the workload asked")
    }
}

/// The advisor's thread: a tick per `period` until `stop`, answering restore
/// requests as they come, then restore everything.
pub fn spawn(
    mut advisor: SysctlAdvisor,
    view: tokio::sync::watch::Receiver<Arc<crate::view::View>>,
    period: Duration,
    requests: mpsc::Receiver<RestoreRequest>,
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
                    // Short waits: the stop token is not a channel.
                    if let Ok(r) = requests.recv_timeout(Duration::from_millis(50)) {
                        let _ = r.reply.send(advisor.restore_for(&r.workload));
                    }
                }
            }
            advisor.restore_all();
        })
}
