//! Acting through the services: the registrations of the control API and
//! the control loop that turns their reports and the kernel's view into
//! targets (pool sizes, listener count, concurrency limit, listen backlog).
//!
//! A registration belongs to the workload that made it (pod, else cgroup);
//! only that workload may report to it or watch it. Targets go out through
//! a `watch` per registration: a slow or dead watcher only ever misses
//! intermediate generations and never holds up the loop. Each change is an
//! audit record; targets are binding only in `enforce` for selected
//! workloads, advisory otherwise.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::sync::watch;
use vigil_control::v1;

use super::{
    audit::{Action, AuditRecord},
    concurrency::ConcurrencyLimit,
    listeners::{ListenerAdvisor, ListenerReading},
    pools::{Network, PoolController, PoolLaw, PoolLoad, RetransmitLedger},
    selector::{Selector, Workload},
    ActState, ActuationMode,
};
use crate::{
    api::validate::{self, Declaration, Refusal},
    exposition::Exposition,
    socket_health::SocketTable,
};

#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub mode: ActuationMode,
    pub selectors: Vec<Selector>,
    pub pool_law: PoolLaw,
    pub period_ms: u32,
    pub max_registrations: usize,
    /// Streams (reports and watches together) one workload may hold open.
    pub max_streams_per_workload: usize,
}

struct Pool {
    controller: PoolController,
    /// The upstream as an address, when it is one (a name is not resolved:
    /// the pool is then sized without the kernel's view).
    upstream: Option<SocketAddr>,
    retransmits: RetransmitLedger,
    load: Option<PoolLoad>,
}

struct Registration {
    workload: Workload,
    key: String,
    mode: v1::Mode,
    serving_port: u16,
    pools: Vec<Pool>,
    listeners: Option<ListenerAdvisor>,
    /// Drops summed over the listeners at the previous period.
    listener_drops: Option<u64>,
    concurrency: Option<ConcurrencyLimit>,
    /// The latest report's in-flight count and median latency, until used.
    latest: Option<(u32, f64)>,
    reports: u64,
    targets: watch::Sender<v1::Targets>,
}

/// What a registered workload's registration says of it, for tests and
/// `vigil status`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistrationView {
    pub registration: String,
    pub workload: String,
    pub mode: v1::Mode,
    pub reports: u64,
    pub targets: v1::Targets,
}

/// Streams one workload holds open; the count drops with the guard.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Services {
    settings: ServiceSettings,
    act: Arc<ActState>,
    registrations: HashMap<String, Registration>,
    streams: HashMap<String, Arc<AtomicUsize>>,
    refusals: BTreeMap<&'static str, u64>,
    changes: BTreeMap<&'static str, u64>,
}

fn mode_name(m: v1::Mode) -> &'static str {
    match m {
        v1::Mode::Binding => "binding",
        _ => "advisory",
    }
}

impl Services {
    pub fn new(settings: ServiceSettings, act: Arc<ActState>) -> Services {
        Services {
            settings,
            act,
            registrations: HashMap::new(),
            streams: HashMap::new(),
            refusals: BTreeMap::new(),
            changes: BTreeMap::new(),
        }
    }

    pub fn period_ms(&self) -> u32 {
        self.settings.period_ms
    }

    /// Counts a refusal for the metrics and hands it back.
    pub fn refused(&mut self, r: Refusal) -> Refusal {
        *self.refusals.entry(r.code()).or_default() += 1;
        r
    }

    fn binding(&self, w: &Workload) -> bool {
        self.settings.mode == ActuationMode::Enforce
            && self.settings.selectors.iter().any(|s| s.matches(w))
    }

    /// A new registration for the caller's workload, replacing its earlier
    /// one (whose watchers then end).
    pub fn register(
        &mut self,
        caller: Workload,
        req: &v1::RegisterRequest,
    ) -> Result<v1::RegisterResponse, Refusal> {
        let d = validate::declaration(req).map_err(|r| self.refused(r))?;
        let key = caller.key();
        let earlier = self
            .registrations
            .iter()
            .find(|(_, r)| r.key == key)
            .map(|(id, _)| id.clone());
        if earlier.is_none() && self.registrations.len() >= self.settings.max_registrations {
            return Err(self.refused(Refusal::Exhausted(format!(
                "{} registrations on this node: at most {}",
                self.registrations.len(),
                self.settings.max_registrations
            ))));
        }
        if let Some(id) = earlier {
            self.registrations.remove(&id);
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let mode = if self.binding(&caller) {
            v1::Mode::Binding
        } else {
            v1::Mode::Advisory
        };
        let reg = self.registration(caller, key.clone(), mode, d);
        self.registrations.insert(id.clone(), reg);
        tracing::info!(registration = %id, workload = %key, mode = mode_name(mode), "control API: registered");
        Ok(v1::RegisterResponse {
            registration: id,
            workload: key,
            mode: mode as i32,
            control_period_ms: self.settings.period_ms,
        })
    }

    fn registration(
        &self,
        workload: Workload,
        key: String,
        mode: v1::Mode,
        d: Declaration,
    ) -> Registration {
        let pools = d
            .pools
            .into_iter()
            .map(|p| Pool {
                upstream: p.spec.upstream.parse().ok(),
                controller: PoolController::new(
                    self.settings.pool_law,
                    p.spec,
                    p.max_idle,
                    p.max_open,
                ),
                retransmits: RetransmitLedger::default(),
                load: None,
            })
            .collect();
        let (targets, _) = watch::channel(v1::Targets {
            generation: 0,
            mode: mode as i32,
            ..Default::default()
        });
        Registration {
            workload,
            key,
            mode,
            serving_port: d.serving_port,
            pools,
            listeners: d.listeners.map(|(n, b)| ListenerAdvisor::new(b, n)),
            listener_drops: None,
            concurrency: d.concurrency.map(|(n, b)| ConcurrencyLimit::new(b, n)),
            latest: None,
            reports: 0,
            targets,
        }
    }

    /// The caller's own registration, or why not.
    fn owned(&mut self, caller: &str, id: &str) -> Result<&mut Registration, Refusal> {
        let refusal = match self.registrations.get(id) {
            None => Refusal::NotFound(format!("no registration {id:?} (register first)")),
            Some(r) if r.key != caller => Refusal::Denied(format!(
                "registration {id:?} belongs to another workload; the caller is {caller}"
            )),
            Some(_) => {
                return self
                    .registrations
                    .get_mut(id)
                    .ok_or_else(|| Refusal::NotFound(format!("no registration {id:?}")))
            }
        };
        Err(self.refused(refusal))
    }

    /// Opens one more stream for the caller's workload, within its bound.
    pub fn open_stream(&mut self, caller: &str) -> Result<StreamGuard, Refusal> {
        let open = self.streams.entry(caller.to_owned()).or_default().clone();
        if open.fetch_add(1, Ordering::SeqCst) >= self.settings.max_streams_per_workload {
            open.fetch_sub(1, Ordering::SeqCst);
            return Err(self.refused(Refusal::Exhausted(format!(
                "{caller} holds {} streams open: at most {}",
                self.settings.max_streams_per_workload, self.settings.max_streams_per_workload
            ))));
        }
        Ok(StreamGuard(open))
    }

    /// One period's report; nothing of it is kept when any part is refused.
    pub fn report(&mut self, caller: &str, r: &v1::LoadReport) -> Result<(), Refusal> {
        let period_s = f64::from(self.settings.period_ms) / 1000.0;
        let reg = self.owned(caller, &r.registration)?;
        let names: Vec<&str> = reg
            .pools
            .iter()
            .map(|p| p.controller.spec().name.as_str())
            .collect();
        let checked = validate::pool_loads(r, &names, period_s).map(|loads| {
            for (pool, load) in reg.pools.iter_mut().zip(loads) {
                if load.is_some() {
                    pool.load = load;
                }
            }
            reg.latest = Some((r.in_flight, r.latency_p50_ms));
            reg.reports += 1;
        });
        checked.map_err(|e| self.refused(e))
    }

    /// The caller's registration's targets.
    pub fn watch(
        &mut self,
        caller: &str,
        id: &str,
    ) -> Result<watch::Receiver<v1::Targets>, Refusal> {
        Ok(self.owned(caller, id)?.targets.subscribe())
    }

    pub fn registrations(&self) -> Vec<RegistrationView> {
        let mut v: Vec<_> = self
            .registrations
            .iter()
            .map(|(id, r)| RegistrationView {
                registration: id.clone(),
                workload: r.key.clone(),
                mode: r.mode,
                reports: r.reports,
                targets: r.targets.borrow().clone(),
            })
            .collect();
        v.sort_by(|a, b| a.workload.cmp(&b.workload));
        v
    }

    /// What `/v1/actuation` and `vigil status` show of the registrations.
    fn publish_views(&self) {
        let views = self
            .registrations()
            .into_iter()
            .map(|r| {
                let t = &r.targets;
                let mut targets: Vec<String> = t
                    .pools
                    .iter()
                    .map(|p| {
                        format!(
                            "pool {} max_idle={} max_open={}",
                            p.pool, p.max_idle, p.max_open
                        )
                    })
                    .collect();
                let counts = [
                    ("listeners", &t.listeners),
                    ("concurrency_limit", &t.concurrency_limit),
                    ("listen_backlog", &t.listen_backlog),
                ];
                for (name, c) in counts {
                    if let Some(c) = c {
                        targets.push(format!("{name} {}", c.value));
                    }
                }
                super::ServiceView {
                    workload: r.workload,
                    mode: mode_name(r.mode).to_owned(),
                    reports: r.reports,
                    generation: t.generation,
                    targets,
                }
            })
            .collect();
        self.act.publish_services(views);
    }

    /// One control period over the latest reports and socket sample.
    pub fn tick(&mut self, sockets: &SocketTable) {
        let ids: Vec<String> = self.registrations.keys().cloned().collect();
        for id in ids {
            let Some(mut reg) = self.registrations.remove(&id) else {
                continue;
            };
            let changes = decide(&mut reg, sockets);
            if !changes.is_empty() {
                self.publish(&reg, &changes);
            }
            self.registrations.insert(id, reg);
        }
        self.publish_views();
    }

    fn publish(&mut self, reg: &Registration, changes: &[Change]) {
        let mut targets = reg.targets.borrow().clone();
        targets.generation += 1;
        let applied = reg.mode == v1::Mode::Binding;
        for c in changes {
            *self.changes.entry(c.setting).or_default() += 1;
            self.act.audit.record(AuditRecord {
                at_unix_ms: crate::clock::unix_now_ns() / 1_000_000,
                mode: self.settings.mode.as_str().to_owned(),
                applied,
                action: Action::SetTarget,
                group: reg.key.clone(),
                member: Some(c.member.clone()),
                signal: c.reason.clone(),
                before: c.before.clone(),
                after: c.after.clone(),
            });
            match &c.target {
                Target::Pool(t) => {
                    targets.pools.retain(|p| p.pool != t.pool);
                    targets.pools.push(t.clone());
                }
                Target::Listeners(t) => targets.listeners = Some(t.clone()),
                Target::Concurrency(t) => targets.concurrency_limit = Some(t.clone()),
                Target::Backlog(t) => targets.listen_backlog = Some(t.clone()),
            }
        }
        reg.targets.send_replace(targets);
    }

    /// The control API's metrics.
    pub fn describe(&self, x: &mut Exposition) {
        let name = "vigil_control_registrations";
        x.family(name, "gauge", "Services registered with the control API, by the mode of their targets (advisory, binding).");
        for mode in [v1::Mode::Advisory, v1::Mode::Binding] {
            let n = self
                .registrations
                .values()
                .filter(|r| r.mode == mode)
                .count();
            x.sample(name, &[("mode", mode_name(mode).to_owned())], n as u64);
        }
        let name = "vigil_control_refusals_total";
        x.family(name, "counter", "Control API calls refused, by gRPC status (invalid_argument, permission_denied, resource_exhausted, not_found, failed_precondition); a refused call changes nothing.");
        for (code, n) in &self.refusals {
            x.sample(name, &[("code", (*code).to_owned())], *n);
        }
        let name = "vigil_control_target_changes_total";
        x.family(name, "counter", "Targets the control loop changed, by setting (pool, listeners, concurrency_limit, listen_backlog).");
        for (setting, n) in &self.changes {
            x.sample(name, &[("setting", (*setting).to_owned())], *n);
        }
    }
}

enum Target {
    Pool(v1::PoolTarget),
    Listeners(v1::CountTarget),
    Concurrency(v1::CountTarget),
    Backlog(v1::CountTarget),
}

struct Change {
    setting: &'static str,
    member: String,
    reason: String,
    before: String,
    after: String,
    target: Target,
}

fn count(
    setting: &'static str,
    before: u32,
    (value, reason): (u32, String),
    wrap: fn(v1::CountTarget) -> Target,
) -> Change {
    Change {
        setting,
        member: setting.to_owned(),
        before: before.to_string(),
        after: value.to_string(),
        target: wrap(v1::CountTarget {
            value,
            reason: reason.clone(),
        }),
        reason,
    }
}

/// Whether a socket of the table is the registration's workload's.
fn owned_by(reg: &Registration, cgroup: Option<&str>, pid: Option<u32>) -> bool {
    match (&reg.workload.cgroup, cgroup) {
        (Some(mine), Some(theirs)) => mine.trim_matches('/') == theirs.trim_matches('/'),
        _ => pid == Some(reg.workload.pid),
    }
}

fn decide(reg: &mut Registration, sockets: &SocketTable) -> Vec<Change> {
    let mut changes = Vec::new();
    for i in 0..reg.pools.len() {
        let network = network_of(reg, i, sockets);
        let pool = &mut reg.pools[i];
        let Some(load) = pool.load.take() else {
            continue;
        };
        let before = pool.controller.setting();
        if let Some(c) = pool.controller.step(&load, network.as_ref()) {
            let name = pool.controller.spec().name.clone();
            changes.push(Change {
                setting: "pool",
                member: format!("pool {name}"),
                reason: c.reason.clone(),
                before: format!("max_idle={} max_open={}", before.0, before.1),
                after: format!("max_idle={} max_open={}", c.max_idle, c.max_open),
                target: Target::Pool(v1::PoolTarget {
                    pool: name,
                    max_idle: c.max_idle,
                    max_open: c.max_open,
                    reason: c.reason,
                }),
            });
        }
    }
    if let Some(reading) = listeners_of(reg, sockets) {
        if let Some(advisor) = reg.listeners.as_mut() {
            let before = reading.members;
            if let Some(x) = advisor.step_listeners(&reading) {
                changes.push(count("listeners", before, x, Target::Listeners));
            }
            if let Some(x) = advisor.step_backlog(&reading) {
                changes.push(count(
                    "listen_backlog",
                    reading.queue_cap,
                    x,
                    Target::Backlog,
                ));
            }
        }
    }
    if let (Some(limit), Some((in_flight, p50))) = (reg.concurrency.as_mut(), reg.latest.take()) {
        let before = limit.limit();
        if let Some(x) = limit.step(p50, in_flight) {
            changes.push(count("concurrency_limit", before, x, Target::Concurrency));
        }
    }
    changes
}

/// The kernel's view of pool `i`'s connections: the workload's connections
/// whose remote is the pool's upstream.
fn network_of(reg: &mut Registration, i: usize, sockets: &SocketTable) -> Option<Network> {
    let upstream = reg.pools[i].upstream?;
    let rows: Vec<_> = sockets
        .connections
        .iter()
        .filter(|c| c.remote == upstream && owned_by(reg, c.cgroup.as_deref(), c.pid))
        .collect();
    let retransmits = reg.pools[i].retransmits.delta(
        rows.iter()
            .map(|c| ((c.netns, c.local, c.remote), c.total_retrans)),
    );
    if rows.is_empty() {
        return None;
    }
    let mut rtts: Vec<u32> = rows.iter().map(|c| c.srtt_us).collect();
    rtts.sort_unstable();
    Some(Network {
        connections: rows.len(),
        srtt_us: rtts[rtts.len() / 2],
        retransmits,
    })
}

fn listeners_of(reg: &mut Registration, sockets: &SocketTable) -> Option<ListenerReading> {
    if reg.serving_port == 0 {
        return None;
    }
    let rows: Vec<_> = sockets
        .listeners
        .iter()
        .filter(|l| l.local.port() == reg.serving_port && owned_by(reg, l.cgroup.as_deref(), l.pid))
        .collect();
    let drops: u64 = rows.iter().map(|l| u64::from(l.drops)).sum();
    let dropped = reg.listener_drops.map_or(0, |d| drops.saturating_sub(d));
    reg.listener_drops = Some(drops);
    if rows.is_empty() {
        return None;
    }
    let fill = rows
        .iter()
        .map(|l| f64::from(l.queue_len) / f64::from(l.queue_cap.max(1)))
        .sum::<f64>()
        / rows.len() as f64;
    Some(ListenerReading {
        members: rows.len() as u32,
        fill,
        dropped,
        queue_cap: rows.iter().map(|l| l.queue_cap).max().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validate::tests::request;
    use crate::socket_health::{ConnectionRow, ListenerRow};

    fn services() -> Services {
        Services::new(
            ServiceSettings {
                mode: ActuationMode::Enforce,
                selectors: vec!["cgroup:vigil/origin".parse().expect("selector")],
                pool_law: PoolLaw::Kernel,
                period_ms: 1000,
                max_registrations: 3,
                max_streams_per_workload: 2,
            },
            Arc::new(ActState::new(64)),
        )
    }

    fn workload(cgroup: &str, pid: u32) -> Workload {
        Workload {
            pid,
            process: "vigil-origin".into(),
            cgroup: Some(cgroup.into()),
            pod: None,
        }
    }

    fn report(id: &str, hold_ms: f64) -> v1::LoadReport {
        v1::LoadReport {
            registration: id.into(),
            pools: vec![v1::PoolLoad {
                pool: "upstream".into(),
                in_use: 4,
                requests: 100,
                hold_mean_ms: hold_ms,
                wait_mean_ms: 30.0,
                wait_p99_ms: 80.0,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn sockets(cgroup: &str, retrans: u32, queue_len: u32) -> SocketTable {
        let connection = |port: u16| ConnectionRow {
            netns: 1,
            state: "ESTABLISHED".into(),
            local: ([198, 18, 0, 1], port).into(),
            remote: ([198, 18, 0, 2], 8080).into(),
            srtt_us: 1000,
            rttvar_us: 100,
            cwnd: 10,
            total_retrans: retrans,
            pid: Some(7),
            process: Some("vigil-origin".into()),
            cgroup: Some(format!("/{cgroup}")),
            pod_uid: None,
            cookie: 0,
        };
        let listener = ListenerRow {
            netns: 1,
            local: ([0, 0, 0, 0], 8080).into(),
            queue_len,
            queue_cap: 16,
            drops: 0,
            pid: Some(7),
            process: Some("vigil-origin".into()),
            cgroup: Some(cgroup.into()),
            pod_uid: None,
            cookie: 0,
        };
        SocketTable {
            listeners: vec![listener.clone(), listener],
            connections: vec![connection(40000), connection(40001)],
            connections_sampled: 2,
        }
    }

    #[test]
    fn a_workload_controls_only_its_own_registration() {
        let mut s = services();
        let mine = workload("vigil/origin", 7);
        let resp = s.register(mine.clone(), &request()).expect("register");
        assert_eq!(resp.workload, "cgroup /vigil/origin");
        assert_eq!(resp.mode, v1::Mode::Binding as i32);
        let id = resp.registration;
        let other = workload("vigil/intruder", 9).key();
        assert!(matches!(s.watch(&other, &id), Err(Refusal::Denied(_))));
        assert!(matches!(
            s.report(&other, &report(&id, 20.0)),
            Err(Refusal::Denied(_))
        ));
        assert!(matches!(
            s.watch(&mine.key(), "nope"),
            Err(Refusal::NotFound(_))
        ));
        // A refused report changes nothing.
        let mut bad = report(&id, 20.0);
        bad.pools[0].pool = "unknown".into();
        assert!(matches!(
            s.report(&mine.key(), &bad),
            Err(Refusal::Invalid(_))
        ));
        assert_eq!(s.registrations()[0].reports, 0);
        // Not selected: advisory, even in enforce.
        let theirs = s
            .register(workload("vigil/other", 8), &request())
            .expect("other");
        assert_eq!(theirs.mode, v1::Mode::Advisory as i32);
        // Registering again replaces: the old id is gone.
        let again = s.register(mine.clone(), &request()).expect("again");
        assert!(matches!(
            s.watch(&mine.key(), &id),
            Err(Refusal::NotFound(_))
        ));
        assert!(s.watch(&mine.key(), &again.registration).is_ok());
        assert_eq!(s.registrations().len(), 2);
        s.register(workload("vigil/third", 10), &request())
            .expect("third");
        assert!(matches!(
            s.register(workload("vigil/fourth", 11), &request()),
            Err(Refusal::Exhausted(_))
        ));
        let mut x = Exposition::default();
        s.describe(&mut x);
        let text = x.text();
        assert!(
            text.contains("vigil_control_refusals_total{code=\"permission_denied\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("vigil_control_registrations{mode=\"binding\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn streams_are_bounded_per_workload() {
        let mut s = services();
        let key = workload("vigil/origin", 7).key();
        let a = s.open_stream(&key).expect("first");
        let _b = s.open_stream(&key).expect("second");
        assert!(matches!(s.open_stream(&key), Err(Refusal::Exhausted(_))));
        assert!(s.open_stream("cgroup /other").is_ok());
        drop(a);
        assert!(s.open_stream(&key).is_ok());
    }

    #[test]
    fn reports_and_the_kernel_view_become_audited_targets() {
        let mut s = services();
        let me = workload("vigil/origin", 7);
        let id = s
            .register(me.clone(), &request())
            .expect("register")
            .registration;
        let mut targets = s.watch(&me.key(), &id).expect("watch");
        assert_eq!(targets.borrow_and_update().generation, 0);
        // A calm period: the need (100/s x 20 ms) fits; nothing changes.
        s.report(&me.key(), &report(&id, 20.0)).expect("report");
        s.tick(&sockets("vigil/origin", 0, 0));
        assert!(!targets.has_changed().expect("open"));
        // Onset: requests hold connections 250 ms, the connections retransmit.
        s.report(&me.key(), &report(&id, 250.0)).expect("report");
        s.tick(&sockets("vigil/origin", 15, 0));
        let t = targets.borrow_and_update().clone();
        assert_eq!(t.generation, 1);
        assert_eq!(t.mode, v1::Mode::Binding as i32);
        assert_eq!((t.pools[0].max_idle, t.pools[0].max_open), (8, 16));
        assert!(
            t.pools[0].reason.contains("30 segments retransmitted"),
            "{}",
            t.pools[0].reason
        );
        let audit = s.act.audit.latest();
        let last = audit.last().expect("an audit record");
        assert_eq!(last.action, Action::SetTarget);
        assert!(last.applied);
        assert_eq!(last.member.as_deref(), Some("pool upstream"));
        assert_eq!(
            (last.before.as_str(), last.after.as_str()),
            ("max_idle=4 max_open=8", "max_idle=8 max_open=16")
        );
        // No report in a period: no evidence, no change. Sockets of another
        // workload are not this one's.
        s.tick(&sockets("vigil/other", 99, 0));
        assert!(!targets.has_changed().expect("open"));
        // Full accept queues for three periods: one more listener.
        for _ in 0..3 {
            s.tick(&sockets("vigil/origin", 15, 12));
        }
        let t = targets.borrow_and_update().clone();
        assert_eq!(t.listeners.map(|l| l.value), Some(3));
        assert_eq!(
            t.pools[0].max_idle, 8,
            "earlier targets stay in the message"
        );
    }
}
