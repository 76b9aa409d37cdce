//! Acting on what the kernel shows: steering new connections of SO_REUSEPORT
//! groups away from stalled members, and refusing a fraction of them when
//! every member is saturated (admission control).
//!
//! Opt-in and dry-run first: only listeners of workloads an `--act-on`
//! selector names are looked at; `recommend` (the default) decides and
//! records exactly what `enforce` would do and changes nothing in the
//! kernel; `enforce` attaches one steering program per group. Every
//! decision and change is an audit record. Fail-open by construction: the
//! program needs a heartbeat written every poll, and every exit path the
//! agent controls detaches it.
//!
//! One thread owns every group: each poll it reads the members' accept
//! queues and the group's accept count, decides (`steering`, `admission`),
//! writes the program's control word (`reuseport`) and publishes an
//! immutable view for `/v1/actuation`, `vigil status` and the metrics.

pub mod admission;
pub mod audit;
pub mod concurrency;
pub mod listeners;
pub mod netns;
pub mod pools;
pub mod reuseport;
pub mod selector;
pub mod services;
pub mod steering;
pub mod sysctl_rules;
pub mod sysctls;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use vigil_abi::ReuseportOutcome;

use crate::{
    exposition::Exposition, kube_pods::PodDirectory, loader::AcceptCounts, sampler::ListenerSample,
};
use admission::{Admission, AdmissionLaw, AdmissionSettings, Change, Reading};
use audit::{Action, AuditLog, AuditRecord};
use reuseport::GroupProgram;
use selector::Selector;
use steering::MemberQueue;

/// `--actuation`, `actuation.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ActuationMode {
    /// Nothing is looked at or decided.
    Off,
    /// Decide and record, change nothing in the kernel.
    Recommend,
    /// Decide, record and apply, for selected workloads.
    Enforce,
}

impl ActuationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ActuationMode::Off => "off",
            ActuationMode::Recommend => "recommend",
            ActuationMode::Enforce => "enforce",
        }
    }
}

/// What acting takes from the config (`actuation.*`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: ActuationMode,
    pub selectors: Vec<Selector>,
    pub heartbeat_timeout: Duration,
    pub poll_interval: Duration,
    pub stall_window: Duration,
    pub admission: AdmissionSettings,
}

/// What `/v1/actuation` returns, and `vigil status` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActuationView {
    pub mode: String,
    pub selectors: Vec<String>,
    pub groups: Vec<GroupView>,
    /// Services registered with the control API and their targets.
    #[serde(default)]
    pub services: Vec<ServiceView>,
    /// The latest audit records, oldest first.
    pub decisions: Vec<AuditRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// `pod NAMESPACE/NAME` or `cgroup /PATH`.
    pub workload: String,
    /// `advisory` or `binding`.
    pub mode: String,
    pub reports: u64,
    pub generation: u64,
    /// Each target in force, e.g. `pool upstream max_idle=8 max_open=16`.
    pub targets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupView {
    /// `NETNS/ADDRESS:PORT`.
    pub group: String,
    /// `enforced`, `recommended` or `refused`.
    pub state: String,
    pub reason: Option<String>,
    /// The steering program's id, while attached.
    pub program_id: Option<u32>,
    pub members: Vec<MemberView>,
    /// Members that take new connections.
    pub healthy_members: usize,
    /// New connections by what the program did with them (enforced groups).
    pub connections: BTreeMap<String, u64>,
    /// `pie`, `aimd`, `off`, or `unavailable` (no accept counts: the accept
    /// hook is not attached).
    pub admission: String,
    /// Fraction of new connections refused (or that would be, in recommend).
    pub shed_fraction: f64,
    /// Connections waiting in the accept queues of members that take new
    /// connections, over the rate the members take them: milliseconds.
    pub queue_delay_ms: f64,
    /// The program left connections to the kernel's hash for a stale
    /// heartbeat since the previous poll.
    pub failing_open: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// `PROCESS/PID fd N`.
    pub member: String,
    pub queue_len: u32,
    pub queue_cap: u32,
    pub takes_new_connections: bool,
}

/// Shared with the HTTP endpoint and the metrics: the audit log and the
/// latest view; the acting thread is the only writer.
pub struct ActState {
    pub audit: AuditLog,
    view: Mutex<Arc<ActuationView>>,
    services: Mutex<Vec<ServiceView>>,
}

impl ActState {
    pub fn new(audit_records: usize) -> ActState {
        ActState {
            audit: AuditLog::new(audit_records),
            view: Mutex::new(Arc::new(ActuationView::default())),
            services: Mutex::new(Vec::new()),
        }
    }

    pub fn view(&self) -> ActuationView {
        let mut view = self.view.lock().map(|v| (**v).clone()).unwrap_or_default();
        view.services = self.services.lock().map(|s| s.clone()).unwrap_or_default();
        view.decisions = self.audit.latest();
        view
    }

    /// The control API's registrations, as the control loop last saw them.
    pub fn publish_services(&self, services: Vec<ServiceView>) {
        if let Ok(mut s) = self.services.lock() {
            *s = services;
        }
    }

    fn publish(&self, view: ActuationView) {
        if let Ok(mut v) = self.view.lock() {
            *v = Arc::new(view);
        }
    }

    /// Acting's metrics.
    pub fn describe(&self, x: &mut Exposition) {
        let view = self.view.lock().map(|v| Arc::clone(&v)).unwrap_or_default();
        let name = "vigil_actuation_mode";
        x.family(
            name,
            "gauge",
            "1 for the actuation mode in force (off, recommend, enforce).",
        );
        for mode in ["off", "recommend", "enforce"] {
            x.sample(
                name,
                &[("mode", mode.to_owned())],
                u8::from(view.mode == mode),
            );
        }
        let name = "vigil_reuseport_members";
        x.family(name, "gauge", "Listeners of each SO_REUSEPORT group of selected workloads, by the group's state (enforced, recommended, refused).");
        for g in &view.groups {
            let labels = [("group", g.group.clone()), ("state", g.state.clone())];
            x.sample(name, &labels, g.members.len() as u64);
        }
        let name = "vigil_reuseport_healthy_members";
        x.family(name, "gauge", "Members of each group that take new connections (the others are stalled and steered away from, or would be in recommend mode).");
        for g in &view.groups {
            x.sample(
                name,
                &[("group", g.group.clone())],
                g.healthy_members as u64,
            );
        }
        let name = "vigil_reuseport_shed_fraction";
        x.family(name, "gauge", "Fraction of new connections admission control refuses for each group (in recommend mode: would refuse).");
        for g in &view.groups {
            x.sample(name, &[("group", g.group.clone())], g.shed_fraction);
        }
        let name = "vigil_reuseport_queue_delay_seconds";
        x.family(name, "gauge", "Each group's queue delay: connections waiting in its members' accept queues over the rate the members accept them.");
        for g in &view.groups {
            x.sample(
                name,
                &[("group", g.group.clone())],
                g.queue_delay_ms / 1000.0,
            );
        }
        let name = "vigil_reuseport_failing_open";
        x.family(name, "gauge", "1 when a group's steering program left new connections to the kernel's hash since the previous poll because the agent's heartbeat was stale.");
        for g in &view.groups {
            x.sample(
                name,
                &[("group", g.group.clone())],
                u8::from(g.failing_open),
            );
        }
        let name = "vigil_reuseport_connections_total";
        x.family(name, "counter", "New connections the steering program of an enforced group handled, by outcome: hashed (every member healthy: the kernel's hash), steered (to a healthy member), refused, failed_open (stale agent heartbeat: the kernel's hash), select_failed.");
        for g in &view.groups {
            for (outcome, n) in &g.connections {
                x.sample(
                    name,
                    &[("group", g.group.clone()), ("outcome", outcome.clone())],
                    *n,
                );
            }
        }
    }
}

fn outcome_name(i: usize) -> &'static str {
    match i {
        i if i == ReuseportOutcome::Hashed as usize => "hashed",
        i if i == ReuseportOutcome::Steered as usize => "steered",
        i if i == ReuseportOutcome::Refused as usize => "refused",
        i if i == ReuseportOutcome::FailedOpen as usize => "failed_open",
        _ => "select_failed",
    }
}

/// (network namespace inode, listening address).
type GroupKey = (u32, SocketAddr);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Member {
    pid: u32,
    fd: u32,
    process: String,
}

impl Member {
    fn name(&self) -> String {
        format!("{}/{} fd {}", self.process, self.pid, self.fd)
    }
}

struct Group {
    key: GroupKey,
    members: Vec<Member>,
    queues: Vec<MemberQueue>,
    admission: Admission,
    /// The group's accept count and when it was read (ms), at the previous poll.
    accepted: Option<(u64, u64)>,
    /// The program's outcome counts at the previous poll.
    outcomes: [u64; vigil_abi::REUSEPORT_OUTCOMES as usize],
    failing_open: bool,
    /// Indices of the members that take new connections; None: all.
    healthy: Option<Vec<u32>>,
    program: Option<GroupProgram>,
    refused: Option<String>,
}

/// A kernel error for an audit record: its first line and, for a verifier
/// log, the verifier's last word (the whole log is in `vigil hooks --check`).
fn brief(error: &str) -> String {
    let mut lines = error.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_default();
    let first = first.split(". Verifier output").next().unwrap_or(first);
    match error.lines().rev().find(|l| {
        let l = l.trim();
        !l.is_empty()
            && !l.starts_with(':')
            && !l.starts_with("verification time")
            && !l.starts_with("stack depth")
            && !l.starts_with("processed ")
    }) {
        Some(last) if error.contains("Verifier output") => {
            format!("{first} (verifier: {})", last.trim())
        }
        _ => first.to_owned(),
    }
}

impl Group {
    /// A group as discovered: no readings yet, every member healthy.
    fn new(
        key: GroupKey,
        members: Vec<Member>,
        program: Option<GroupProgram>,
        refused: Option<String>,
        admission: AdmissionSettings,
    ) -> Group {
        Group {
            key,
            queues: vec![MemberQueue::default(); members.len()],
            admission: Admission::new(admission),
            accepted: None,
            outcomes: Default::default(),
            failing_open: false,
            members,
            healthy: None,
            program,
            refused,
        }
    }
}

fn shed_text(fraction: f64) -> String {
    if fraction == 0.0 {
        "admits every new connection".to_owned()
    } else {
        format!("refuses {:.0}% of new connections", fraction * 100.0)
    }
}

fn group_name(key: &GroupKey) -> String {
    format!("{}/{}", key.0, key.1)
}

/// The acting thread.
pub struct Actuator {
    settings: Settings,
    /// Accepted connections per (netns, port), from the accept hook; None:
    /// admission control has no drain rate and refuses nothing.
    accepts: Option<AcceptCounts>,
    state: Arc<ActState>,
    pods: Option<Arc<RwLock<PodDirectory>>>,
    groups: HashMap<GroupKey, Group>,
    /// Refusals already recorded, so each is recorded once.
    refusals: HashSet<String>,
    started: Instant,
}

impl Actuator {
    pub fn new(
        settings: Settings,
        accepts: Option<AcceptCounts>,
        state: Arc<ActState>,
        pods: Option<Arc<RwLock<PodDirectory>>>,
    ) -> Actuator {
        if accepts.is_none() && settings.admission.law != AdmissionLaw::Off {
            warn!(
                law = settings.admission.law.as_str(),
                "admission control needs the accept hook (tracepoint/syscalls/sys_exit_accept4) to know how fast workers take connections; without it no connection is refused"
            );
        }
        Actuator {
            accepts,
            settings,
            state,
            pods,
            groups: HashMap::new(),
            refusals: HashSet::new(),
            started: Instant::now(),
        }
    }

    /// Runs on its own thread until `stop`, then detaches everything.
    pub fn spawn(
        mut self,
        mut listeners: watch::Receiver<Arc<Vec<ListenerSample>>>,
        stop: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("vigil-act".into())
            .spawn(move || {
                info!(
                    mode = self.settings.mode.as_str(),
                    selectors = %self.selector_names().join(", "),
                    admission = self.admission_name(),
                    "actuation running"
                );
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    if listeners.has_changed().unwrap_or(false) {
                        let snapshot = Arc::clone(&listeners.borrow_and_update());
                        self.discover(&snapshot);
                    }
                    self.poll();
                    self.publish();
                    while !stop.is_cancelled() && started.elapsed() < self.settings.poll_interval {
                        let left = self
                            .settings
                            .poll_interval
                            .saturating_sub(started.elapsed());
                        std::thread::sleep(left.min(Duration::from_millis(20)));
                    }
                }
                self.shutdown();
            })
    }

    fn selector_names(&self) -> Vec<String> {
        self.settings
            .selectors
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// The admission law in force, or `unavailable` without accept counts.
    fn admission_name(&self) -> &'static str {
        match (&self.accepts, self.settings.admission.law) {
            (None, law) if law != AdmissionLaw::Off => "unavailable",
            (_, law) => law.as_str(),
        }
    }

    fn enforcing(&self) -> bool {
        self.settings.mode == ActuationMode::Enforce
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn record(
        &self,
        action: Action,
        key: &GroupKey,
        member: Option<String>,
        signal: String,
        before: String,
        after: String,
    ) {
        let applied = self.enforcing() && action != Action::Refuse;
        self.state.audit.record(AuditRecord {
            at_unix_ms: crate::clock::unix_now_ns() / 1_000_000,
            mode: self.settings.mode.as_str().to_owned(),
            applied,
            action,
            group: group_name(key),
            member,
            signal,
            before,
            after,
        });
    }

    /// Records a refusal once per group and kind of reason (a retry that
    /// fails the same way is not recorded again).
    fn refuse(&mut self, key: &GroupKey, reason: String) {
        let kind = reason
            .split([':', '('])
            .next()
            .unwrap_or_default()
            .to_owned();
        if self.refusals.insert(format!("{key:?} {kind}")) {
            self.record(
                Action::Refuse,
                key,
                None,
                reason,
                "untouched".into(),
                "untouched".into(),
            );
        }
    }

    /// Groups of selected workloads from the sampler's latest listeners.
    fn discover(&mut self, listeners: &[ListenerSample]) {
        let mut found: HashMap<GroupKey, Vec<(Member, bool)>> = HashMap::new();
        for l in listeners {
            let Some(owner) = &l.owner else { continue };
            let member = Member {
                pid: owner.pid,
                fd: l.fd,
                process: owner.comm.to_string(),
            };
            let w = selector::workload_of(owner.pid, &owner.comm, self.pods.as_deref());
            let selected = self.settings.selectors.iter().any(|s| s.matches(&w));
            found
                .entry((l.netns, l.local))
                .or_default()
                .push((member, selected));
        }
        // Groups whose listeners are gone.
        let gone: Vec<GroupKey> = self
            .groups
            .keys()
            .filter(|k| !found.get(k).is_some_and(|m| m.iter().any(|(_, s)| *s)))
            .copied()
            .collect();
        for key in gone {
            if let Some(group) = self.groups.remove(&key) {
                self.release(group, "its selected listeners are gone");
            }
        }
        for (key, mut members) in found {
            if !members.iter().any(|(_, selected)| *selected) {
                continue;
            }
            members.sort_by_key(|(m, _)| (m.pid, m.fd));
            let outside: Vec<String> = members
                .iter()
                .filter(|(_, s)| !s)
                .map(|(m, _)| m.name())
                .collect();
            let members: Vec<Member> = members.into_iter().map(|(m, _)| m).collect();
            if !outside.is_empty() {
                let reason = format!(
                    "the group has listeners of workloads outside the selection ({}): acting on it would change them too",
                    outside.join(", ")
                );
                self.refuse_group(key, members, reason);
                continue;
            }
            self.update_group(key, members);
        }
    }

    fn refuse_group(&mut self, key: GroupKey, members: Vec<Member>, reason: String) {
        if let Some(group) = self.groups.remove(&key) {
            self.release(group, &reason);
        }
        self.refuse(&key, reason.clone());
        self.groups.insert(
            key,
            Group::new(key, members, None, Some(reason), self.settings.admission),
        );
    }

    /// Copies of every member's listener, checked: Err says why not.
    fn copies(members: &[Member]) -> Result<Vec<OwnedFd>, String> {
        members
            .iter()
            .map(|m| {
                let fd = reuseport::copy_descriptor(m.pid, m.fd).map_err(|e| {
                    format!("cannot take a copy of the listener of {} (pidfd_getfd needs CAP_SYS_PTRACE over it): {e}", m.name())
                })?;
                match reuseport::has_reuseport(&fd) {
                    Ok(true) => Ok(fd),
                    Ok(false) => Err(format!("the listener of {} has no SO_REUSEPORT: there is no group to steer", m.name())),
                    Err(e) => Err(format!("cannot read SO_REUSEPORT of {}: {e}", m.name())),
                }
            })
            .collect()
    }

    fn update_group(&mut self, key: GroupKey, members: Vec<Member>) {
        if self
            .groups
            .get(&key)
            .is_some_and(|g| g.members == members && g.refused.is_none())
        {
            return;
        }
        let copies = match Self::copies(&members) {
            Ok(c) => c,
            Err(reason) => return self.refuse_group(key, members, reason),
        };
        if members.len() > vigil_abi::REUSEPORT_MAX_MEMBERS as usize {
            let reason = format!(
                "{} listeners: Vigil steers among at most {}",
                members.len(),
                vigil_abi::REUSEPORT_MAX_MEMBERS
            );
            return self.refuse_group(key, members, reason);
        }
        let previous = self.groups.remove(&key);
        // Admission carries over a change of members: a worker coming or
        // going during an overload must not reset the fraction to zero.
        let carried = previous
            .as_ref()
            .filter(|g| g.refused.is_none())
            .map(|g| (g.admission.clone(), g.accepted));
        let mut program = previous.and_then(|g| {
            if g.refused.is_some() {
                return None;
            }
            g.program
        });
        let refs: Vec<&OwnedFd> = copies.iter().collect();
        if self.enforcing() {
            let result = match program.as_mut() {
                Some(p) => p.set_members(&refs),
                None => {
                    // The ledger's lines for this group's objects name it.
                    let timeout = self.settings.heartbeat_timeout.as_nanos() as u64;
                    tracing::info_span!("steering", group = %group_name(&key))
                        .in_scope(|| GroupProgram::attach(&refs, timeout))
                        .map(|p| {
                            self.record(
                                Action::Attach,
                                &key,
                                None,
                                format!("{} listeners of selected workloads", members.len()),
                                "the kernel's hash".into(),
                                format!(
                                    "steering program {} (every member healthy: the kernel's hash)",
                                    p.program_id
                                ),
                            );
                            program = Some(p);
                        })
                }
            };
            if let Err(e) = result {
                if let Some(p) = program.take() {
                    let _ = p.detach(refs[0]);
                }
                return self.refuse_group(
                    key,
                    members,
                    format!(
                        "cannot attach the steering program: {}",
                        brief(&e.to_string())
                    ),
                );
            }
        }
        let mut group = Group::new(key, members, program, None, self.settings.admission);
        if let Some((admission, accepted)) = carried {
            group.admission = admission;
            group.accepted = accepted;
        }
        if let Some(p) = &group.program {
            group.outcomes = p.outcomes();
        }
        self.groups.insert(key, group);
    }

    /// Reads every acting group's accept queues and decides.
    fn poll(&mut self) {
        let now = self.now_ms();
        let window = self.settings.stall_window.as_millis() as u64;
        let keys: Vec<GroupKey> = self.groups.keys().copied().collect();
        for key in keys {
            let Some(mut group) = self.groups.remove(&key) else {
                continue;
            };
            if group.refused.is_none() {
                self.poll_group(&mut group, now, window);
            }
            self.groups.insert(key, group);
        }
    }

    fn poll_group(&mut self, group: &mut Group, now: u64, window: u64) {
        let accepted = self.accepted_by_process(group);
        for (m, q) in group.members.iter().zip(group.queues.iter_mut()) {
            // A process's count is this member's own only if it holds no other.
            let own = group.members.iter().filter(|o| o.pid == m.pid).count() == 1;
            let count = accepted
                .as_ref()
                .and_then(|a| a.get(&m.pid).copied())
                .filter(|_| own);
            // A copy for this reading only (see `reuseport`).
            if let Ok((len, cap)) =
                reuseport::copy_descriptor(m.pid, m.fd).and_then(|fd| reuseport::accept_queue(&fd))
            {
                q.observe(now, len, cap, count, window);
            }
        }
        let decision = steering::healthy_members(&group.queues, now, window);
        if decision != group.healthy {
            self.record_change(group, decision.as_deref(), window);
            group.healthy = decision;
        }
        let offered = group.program.as_ref().map(|program| {
            let outcomes = program.outcomes();
            let failed_open = ReuseportOutcome::FailedOpen as usize;
            group.failing_open = outcomes[failed_open] > group.outcomes[failed_open];
            let offered: u64 = outcomes
                .iter()
                .zip(&group.outcomes)
                .map(|(now, before)| now.saturating_sub(*before))
                .sum();
            group.outcomes = outcomes;
            offered
        });
        if let Some(accepted) = accepted {
            self.admit(group, now, accepted.values().sum(), offered);
        }
        if let Some(program) = group.program.as_mut() {
            // Every poll: the heartbeat keeps the program from failing open.
            let refuse_ppm = group.admission.refuse_ppm();
            if let Err(e) = program.control(group.healthy.as_deref(), refuse_ppm) {
                warn!(group = %group_name(&group.key), error = %e, "cannot write the steering program's control word; it fails open when the heartbeat goes stale");
            }
        }
    }

    /// Connections each member process accepted on the group's port since
    /// the agent started counting; None without the accept hook.
    fn accepted_by_process(&self, group: &Group) -> Option<HashMap<u32, u64>> {
        let accepts = self.accepts.as_ref()?;
        let mut counts = HashMap::new();
        for m in &group.members {
            let key = vigil_abi::AcceptKey {
                netns: group.key.0,
                pid: m.pid,
                port: group.key.1.port(),
                _pad: 0,
            };
            // No entry: nothing accepted since the agent started (or evicted
            // as the least recent of 4096, which such a worker would be).
            counts.insert(m.pid, accepts.get(&key, 0).unwrap_or(0));
        }
        Some(counts)
    }

    /// Reads the group's queue delay and moves its refused fraction.
    /// `accepted`: the group's accept count; `offered`: new connections
    /// the program saw since the previous poll.
    fn admit(&self, group: &mut Group, now: u64, accepted: u64, offered: Option<u64>) {
        let takes = |i: usize| {
            group
                .healthy
                .as_ref()
                .is_none_or(|h| h.contains(&(i as u32)))
        };
        let open: Vec<&MemberQueue> = group
            .queues
            .iter()
            .enumerate()
            .filter(|(i, _)| takes(*i))
            .map(|(_, q)| q)
            .collect();
        let interval = group
            .accepted
            .map_or(0.0, |(_, at)| now.saturating_sub(at) as f64 / 1000.0);
        let reading = Reading {
            interval,
            queued: open.iter().map(|q| u64::from(q.len())).sum(),
            saturated: !open.is_empty() && open.iter().all(|q| q.saturated()),
            drained: group
                .accepted
                .map_or(0, |(before, _)| accepted.saturating_sub(before)),
            offered: offered.filter(|_| group.accepted.is_some()),
        };
        group.accepted = Some((accepted, now));
        let law = self.settings.admission.law.as_str();
        let before = group.admission.fraction();
        let Some(change) = group.admission.observe(reading) else {
            return;
        };
        let delay_ms = group.admission.delay() * 1000.0;
        let target_ms = self.settings.admission.delay_target * 1000.0;
        let waiting = format!(
            "{} connections waiting in {} accept queues",
            reading.queued,
            open.len()
        );
        let (action, signal, from, to) = match change {
            Change::Start { fraction } => (
                Action::StartShedding,
                format!("queue delay {delay_ms:.0} ms over the {target_ms:.0} ms target with every member saturated ({waiting}; {law})"),
                before,
                fraction,
            ),
            Change::Fraction { from, to } => (
                Action::ShedFraction,
                format!("queue delay {delay_ms:.0} ms against the {target_ms:.0} ms target ({waiting}; {law})"),
                from,
                to,
            ),
            Change::Stop { from } => (
                Action::StopShedding,
                format!("queue delay {delay_ms:.0} ms, under half the {target_ms:.0} ms target, and nothing left to refuse ({law})"),
                from,
                0.0,
            ),
        };
        self.record(
            action,
            &group.key,
            None,
            signal,
            shed_text(from),
            shed_text(to),
        );
    }

    fn record_change(&self, group: &Group, after: Option<&[u32]>, window: u64) {
        let all = group.members.len();
        let takes = |set: Option<&[u32]>, i: usize| set.is_none_or(|s| s.contains(&(i as u32)));
        let count = |set: Option<&[u32]>| set.map_or(all, <[u32]>::len);
        let before_text = format!(
            "{} of {all} members take new connections",
            count(group.healthy.as_deref())
        );
        let after_text = format!("{} of {all} members take new connections", count(after));
        for (i, (m, q)) in group.members.iter().zip(&group.queues).enumerate() {
            let (was, is) = (takes(group.healthy.as_deref(), i), takes(after, i));
            let (action, signal) = match (was, is) {
                (true, false) => (
                    Action::SteerAway,
                    format!("accept queue {}/{} held connections and did not shrink for {window} ms: nobody accepts from it", q.len(), q.cap),
                ),
                (false, true) if after.is_none() && q.stalled(self.now_ms(), window) => (
                    Action::Restore,
                    "too many members look stalled to steer away from (overload, not a stuck worker): the kernel's hash".to_owned(),
                ),
                (false, true) => (
                    Action::Restore,
                    format!("accept queue {}/{} shrank: it accepts again", q.len(), q.cap),
                ),
                _ => continue,
            };
            self.record(
                action,
                &group.key,
                Some(m.name()),
                signal,
                before_text.clone(),
                after_text.clone(),
            );
        }
    }

    /// Detaches a group's program (when attached), recording it.
    fn release(&self, group: Group, why: &str) {
        let Some(program) = group.program else { return };
        let id = program.program_id;
        // Any member still open will do; none: the group is gone, and the
        // program with it.
        let copy = group
            .members
            .iter()
            .find_map(|m| reuseport::copy_descriptor(m.pid, m.fd).ok());
        let result = match &copy {
            Some(fd) => program.detach(fd).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        match result {
            Ok(()) => self.record(
                Action::Detach,
                &group.key,
                None,
                why.to_owned(),
                format!("steering program {id}"),
                "the kernel's hash".into(),
            ),
            Err(e) => {
                warn!(group = %group_name(&group.key), error = %e, "cannot detach the steering program; it fails open once the heartbeat is stale")
            }
        }
    }

    fn publish(&self) {
        let mut groups: Vec<GroupView> = self
            .groups
            .values()
            .map(|g| {
                let state = match (&g.refused, self.settings.mode) {
                    (Some(_), _) => "refused",
                    (None, ActuationMode::Enforce) => "enforced",
                    (None, _) => "recommended",
                };
                let takes = |i: usize| g.healthy.as_ref().is_none_or(|h| h.contains(&(i as u32)));
                let members = g
                    .members
                    .iter()
                    .zip(&g.queues)
                    .enumerate()
                    .map(|(i, (m, q))| MemberView {
                        member: m.name(),
                        queue_len: q.len(),
                        queue_cap: q.cap,
                        takes_new_connections: takes(i),
                    })
                    .collect();
                let connections = g
                    .program
                    .as_ref()
                    .map(|p| {
                        p.outcomes()
                            .iter()
                            .enumerate()
                            .map(|(i, n)| (outcome_name(i).to_owned(), *n))
                            .collect()
                    })
                    .unwrap_or_default();
                GroupView {
                    group: group_name(&g.key),
                    state: state.to_owned(),
                    reason: g.refused.clone(),
                    program_id: g.program.as_ref().map(|p| p.program_id),
                    members,
                    healthy_members: g.healthy.as_ref().map_or(g.members.len(), Vec::len),
                    connections,
                    admission: self.admission_name().to_owned(),
                    shed_fraction: g.admission.fraction(),
                    queue_delay_ms: g.admission.delay() * 1000.0,
                    failing_open: g.failing_open,
                }
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        self.state.publish(ActuationView {
            mode: self.settings.mode.as_str().to_owned(),
            selectors: self.selector_names(),
            groups,
            // Filled in by `view` from the control loop's latest.
            services: Vec::new(),
            decisions: Vec::new(),
        });
    }

    fn shutdown(&mut self) {
        let groups: Vec<Group> = self.groups.drain().map(|(_, g)| g).collect();
        let attached = groups.iter().filter(|g| g.program.is_some()).count();
        for group in groups {
            self.release(group, "the agent is stopping");
        }
        info!(
            detached = attached,
            "actuation stopped; every steering program detached"
        );
    }
}
