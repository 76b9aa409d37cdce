//! Pod metadata for the pods on this node, learned from the Kubernetes API.
//!
//! Inside a cluster the agent lists and watches the `Pod`s bound to its own
//! node (field selector `spec.nodeName=<node>`) and keeps a [`PodDirectory`]:
//! pod uid -> name, namespace, labels and IPs, and pod IP -> pod. Attribution
//! uses it to name the pod behind a cgroup (by uid) or a peer address (by IP).
//! Outside a cluster [`client_from_env`] returns `None` and nothing here runs:
//! the agent then works from cgroups alone.
//!
//! The watch is `kube_runtime::watcher`: it lists, then watches from the
//! list's resourceVersion, resumes a broken or timed-out watch from the last
//! resourceVersion it saw, and lists again when the apiserver answers that
//! version is gone (410). A list is buffered and replaces the directory whole
//! when it completes, so pods deleted while the watch was broken disappear and
//! readers never see a half-listed directory.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    pin::pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, PoisonError, RwLock,
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    config::KubeConfigOptions,
    runtime::{watcher, WatchStreamExt},
    Api, Client, Config,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Pods a directory holds by default. The kubelet's own default is 110 pods a
/// node and few clusters raise it past 250.
pub const DEFAULT_MAX_PODS: usize = 1024;

/// IPs kept for one pod (dual stack needs two); the rest are ignored.
pub const MAX_IPS_PER_POD: usize = 4;

/// What attribution needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// The pod's IPs (`status.podIPs`, else `status.podIP`), at most
    /// [`MAX_IPS_PER_POD`]. Empty until the pod has a sandbox, and empty again
    /// once it has Succeeded or Failed: the node has then released its IPs and
    /// may give them to another pod.
    pub ips: Vec<IpAddr>,
    /// The pod uses the node's network namespace, so its IPs are the node's
    /// and never identify it.
    pub host_network: bool,
}

impl PodMeta {
    /// The parts of `pod` the directory keeps; `None` for a pod without uid
    /// (the apiserver always sets one).
    pub fn from_pod(pod: &Pod) -> Option<PodMeta> {
        let md = &pod.metadata;
        let uid = md.uid.clone().filter(|u| !u.is_empty())?;
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let mut ips = Vec::new();
        if let Some(status) = &pod.status {
            let terminal = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            if !terminal {
                let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
                for ip in listed.chain(status.pod_ip.as_deref()) {
                    if ips.len() == MAX_IPS_PER_POD {
                        break;
                    }
                    if let Ok(ip) = ip.parse::<IpAddr>() {
                        let ip = ip.to_canonical();
                        if !ips.contains(&ip) {
                            ips.push(ip);
                        }
                    }
                }
            }
        }
        Some(PodMeta {
            uid,
            name: md.name.clone().unwrap_or_default(),
            namespace: md.namespace.clone().unwrap_or_default(),
            labels: md.labels.clone().unwrap_or_default(),
            ips,
            host_network,
        })
    }
}

/// The pods on this node by uid and by IP, holding at most `max_entries` pods.
///
/// Past the bound a pod not yet known is refused (not stored) and counted in
/// [`PodDirectory::refused`]; pods already held still get their updates and
/// deletions, so room frees up as pods go. A refused pod is attributed from
/// cgroups alone. IP lookups skip hostNetwork pods; when two pods claim one
/// IP, the one applied last has it.
#[derive(Debug)]
pub struct PodDirectory {
    max_entries: usize,
    pods: HashMap<String, PodMeta>,
    by_ip: HashMap<IpAddr, String>,
    refused: u64,
    /// Bumped on every change, so what was looked up here can be cached.
    generation: u64,
}

impl Default for PodDirectory {
    fn default() -> Self {
        PodDirectory::new(DEFAULT_MAX_PODS)
    }
}

impl PodDirectory {
    pub fn new(max_entries: usize) -> PodDirectory {
        PodDirectory {
            max_entries,
            pods: HashMap::new(),
            by_ip: HashMap::new(),
            refused: 0,
            generation: 0,
        }
    }

    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    pub fn by_uid(&self, uid: &str) -> Option<&PodMeta> {
        self.pods.get(uid)
    }

    /// The pod holding `ip`; an IPv4-mapped IPv6 address finds the IPv4 pod.
    pub fn by_ip(&self, ip: IpAddr) -> Option<&PodMeta> {
        self.by_ip
            .get(&ip.to_canonical())
            .and_then(|uid| self.pods.get(uid))
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Changes whenever the directory does: answers read from it at the same
    /// generation are still its answers.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Pods turned away because the directory was full, since it was made.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Adds a pod or replaces what is known of it (ADDED or MODIFIED). Returns
    /// false, and counts the refusal, for a new pod when the directory is full.
    pub fn apply(&mut self, pod: PodMeta) -> bool {
        if let Some(old) = self.pods.remove(&pod.uid) {
            self.unmap_ips(&old);
        } else if self.pods.len() >= self.max_entries {
            self.refused += 1;
            return false;
        }
        self.map_ips(&pod);
        self.pods.insert(pod.uid.clone(), pod);
        self.generation += 1;
        true
    }

    /// Forgets a pod (DELETED). Returns whether it was known.
    pub fn delete(&mut self, uid: &str) -> bool {
        match self.pods.remove(uid) {
            Some(old) => {
                self.unmap_ips(&old);
                self.generation += 1;
                true
            }
            None => false,
        }
    }

    /// Replaces everything with the result of a full list: pods not in it are
    /// gone. Past the bound the remaining pods are refused and counted.
    pub fn replace_all(&mut self, pods: impl IntoIterator<Item = PodMeta>) {
        self.pods.clear();
        self.by_ip.clear();
        self.generation += 1;
        for pod in pods {
            self.apply(pod);
        }
    }

    fn map_ips(&mut self, pod: &PodMeta) {
        if pod.host_network {
            return;
        }
        for ip in &pod.ips {
            self.by_ip.insert(ip.to_canonical(), pod.uid.clone());
        }
    }

    /// Drops the IP entries that still point at `pod` (another pod may have
    /// taken an IP over since).
    fn unmap_ips(&mut self, pod: &PodMeta) {
        for ip in &pod.ips {
            let ip = ip.to_canonical();
            if self.by_ip.get(&ip) == Some(&pod.uid) {
                self.by_ip.remove(&ip);
            }
        }
    }
}

/// The watcher's self-telemetry.
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Watch events applied to the directory: each ADDED/MODIFIED/DELETED,
    /// and each completed list (which replaces the directory).
    pub events_applied: AtomicU64,
    /// Errors from listing or watching (apiserver unreachable, watch broken,
    /// 410 Gone, ...); each is followed by a backoff and a resume or relist.
    pub watch_errors: AtomicU64,
    /// Lists completed after the first one: the watch could not be resumed
    /// and the directory was rebuilt from a fresh list.
    pub relists: AtomicU64,
    /// Pods in the directory now.
    pub pods: AtomicU64,
    /// Pods refused because the directory was full.
    pub pods_refused: AtomicU64,
    /// The first list has completed.
    pub synced: AtomicBool,
}

/// A Kubernetes client from the environment: the in-cluster service account
/// when `KUBERNETES_SERVICE_HOST` is set, else the kubeconfig named by
/// `KUBECONFIG`, else `None` (not in a cluster; nothing is logged above debug).
pub async fn client_from_env() -> Option<Client> {
    let config = if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        match Config::incluster() {
            Ok(config) => config,
            Err(err) => {
                warn!(error = %err, "KUBERNETES_SERVICE_HOST is set but the in-cluster config is unusable; pod attribution is off");
                return None;
            }
        }
    } else if std::env::var_os("KUBECONFIG").is_some() {
        match Config::from_kubeconfig(&KubeConfigOptions::default()).await {
            Ok(config) => config,
            Err(err) => {
                warn!(error = %err, "KUBECONFIG is set but unusable; pod attribution is off");
                return None;
            }
        }
    } else {
        debug!("neither KUBERNETES_SERVICE_HOST nor KUBECONFIG is set: not watching pods");
        return None;
    };
    match Client::try_from(config) {
        Ok(client) => Some(client),
        Err(err) => {
            warn!(error = %err, "cannot build a Kubernetes client; pod attribution is off");
            None
        }
    }
}

/// Lists and watches the pods bound to `node_name` in all namespaces and
/// keeps `dir` in step until `stop`. Returns at once, having logged why, for
/// an empty `node_name`. Needs RBAC `list` and `watch` on `pods` cluster-wide
/// (a field selector does not narrow RBAC).
pub fn spawn(
    client: Client,
    node_name: String,
    dir: Arc<RwLock<PodDirectory>>,
    stats: Arc<KubeStats>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut watch = PodWatch {
            node_name,
            dir,
            stats,
            relist: None,
            warned_full: false,
        };
        watch.run(client, stop).await;
    })
}

/// Waits before starting over with a fresh watcher: doubling from the first
/// to the last, back to the first once restarts are this far apart.
const RESTART_DELAY_FIRST: Duration = Duration::from_secs(1);
const RESTART_DELAY_LAST: Duration = Duration::from_secs(30);
const RESTART_DELAY_RESET: Duration = Duration::from_secs(120);

struct PodWatch {
    node_name: String,
    dir: Arc<RwLock<PodDirectory>>,
    stats: Arc<KubeStats>,
    /// Pods of a list under way (between `Init` and `InitDone`).
    relist: Option<Vec<PodMeta>>,
    warned_full: bool,
}

impl PodWatch {
    async fn run(&mut self, client: Client, stop: CancellationToken) {
        if self.node_name.is_empty() {
            // `spec.nodeName=` would select every unscheduled pod of the cluster.
            warn!("no node name: not watching pods (set it from the downward API, spec.nodeName)");
            return;
        }
        let api: Api<Pod> = Api::all(client);
        let config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name));
        info!(node = %self.node_name, "watching this node's pods in the Kubernetes API");
        let mut restart_delay = RESTART_DELAY_FIRST;
        let mut last_restart: Option<Instant> = None;
        loop {
            // The watcher resumes and relists by itself; errors come out of
            // the stream and the backoff spaces the retries. A new watcher
            // (which starts with a full list) is made only when this one
            // cannot recover by itself.
            let mut events = pin!(watcher(api.clone(), config.clone()).default_backoff());
            self.relist = None;
            loop {
                let item = tokio::select! {
                    () = stop.cancelled() => return,
                    item = events.next() => item,
                };
                match item {
                    Some(Ok(event)) => self.on_event(event),
                    Some(Err(err)) => {
                        self.stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                        warn!(node = %self.node_name, error = %err, "pod watch failed; retrying after a backoff");
                        if needs_fresh_watcher(&err) {
                            break;
                        }
                    }
                    None => {
                        warn!(node = %self.node_name, "pod watch ended; starting over");
                        break;
                    }
                }
            }
            if last_restart.is_some_and(|at| at.elapsed() > RESTART_DELAY_RESET) {
                restart_delay = RESTART_DELAY_FIRST;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(restart_delay) => {}
            }
            restart_delay = (restart_delay * 2).min(RESTART_DELAY_LAST);
            last_restart = Some(Instant::now());
        }
    }

    fn on_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => {
                debug!(node = %self.node_name, "listing pods");
                self.relist = Some(Vec::new());
            }
            // The buffer holds what one node runs (the field selector); the
            // directory's bound applies when it replaces the directory.
            watcher::Event::InitApply(pod) => match self.relist.as_mut() {
                Some(buffer) => buffer.extend(PodMeta::from_pod(&pod)),
                // The watcher always sends Init first; apply rather than lose it.
                None => self.apply(&pod),
            },
            watcher::Event::InitDone => {
                let pods = self.relist.take().unwrap_or_default();
                let (len, refused) = {
                    let mut dir = self.dir.write().unwrap_or_else(PoisonError::into_inner);
                    dir.replace_all(pods);
                    (dir.len(), dir.refused())
                };
                self.after_change(len, refused);
                if self.stats.synced.swap(true, Ordering::Relaxed) {
                    self.stats.relists.fetch_add(1, Ordering::Relaxed);
                    info!(node = %self.node_name, pods = len, "pod directory relisted");
                } else {
                    info!(node = %self.node_name, pods = len, "pod directory synced with the Kubernetes API");
                }
            }
            watcher::Event::Apply(pod) => self.apply(&pod),
            watcher::Event::Delete(pod) => {
                let (len, refused) = {
                    let mut dir = self.dir.write().unwrap_or_else(PoisonError::into_inner);
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        dir.delete(uid);
                    }
                    (dir.len(), dir.refused())
                };
                self.after_change(len, refused);
            }
        }
    }

    fn apply(&mut self, pod: &Pod) {
        let Some(meta) = PodMeta::from_pod(pod) else {
            debug!("pod without uid ignored");
            return;
        };
        let (len, refused) = {
            let mut dir = self.dir.write().unwrap_or_else(PoisonError::into_inner);
            dir.apply(meta);
            (dir.len(), dir.refused())
        };
        self.after_change(len, refused);
    }

    fn after_change(&mut self, len: usize, refused: u64) {
        self.stats.events_applied.fetch_add(1, Ordering::Relaxed);
        self.stats.pods.store(len as u64, Ordering::Relaxed);
        self.stats.pods_refused.store(refused, Ordering::Relaxed);
        if refused > 0 && !self.warned_full {
            self.warned_full = true;
            warn!(node = %self.node_name, pods = len, "pod directory full: further pods are refused and attributed from cgroups alone");
        }
    }
}

/// The watcher retries a failed watch start from the same resourceVersion
/// forever; when the apiserver answers that version is gone (HTTP 410 rather
/// than a 410 event on the watch), only a new list helps.
fn needs_fresh_watcher(err: &watcher::Error) -> bool {
    matches!(err, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if status.code == 410)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use k8s_openapi::{
        api::core::v1::{PodIP, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("bad ip {s}"))
    }

    fn meta(uid: &str, ips: &[&str]) -> PodMeta {
        PodMeta {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "default".into(),
            labels: BTreeMap::from([("app".to_string(), uid.to_string())]),
            ips: ips.iter().map(|s| ip(s)).collect(),
            host_network: false,
        }
    }

    #[test]
    fn add_modify_delete() {
        let mut dir = PodDirectory::new(8);
        assert!(dir.is_empty());
        assert!(dir.apply(meta("a", &["10.0.0.1"])));
        assert!(dir.apply(meta("b", &["10.0.0.2"])));
        assert_eq!(dir.len(), 2);
        assert_eq!(dir.by_uid("a").map(|p| p.name.as_str()), Some("pod-a"));

        // MODIFIED: new labels and a new IP; the old IP no longer finds it.
        let mut a2 = meta("a", &["10.0.0.3"]);
        a2.labels.insert("version".into(), "2".into());
        assert!(dir.apply(a2.clone()));
        assert_eq!(dir.len(), 2);
        assert_eq!(dir.by_uid("a"), Some(&a2));
        assert_eq!(dir.by_ip(ip("10.0.0.3")).map(|p| p.uid.as_str()), Some("a"));
        assert!(dir.by_ip(ip("10.0.0.1")).is_none());

        assert!(dir.delete("a"));
        assert!(!dir.delete("a"));
        assert!(dir.by_uid("a").is_none());
        assert!(dir.by_ip(ip("10.0.0.3")).is_none());
        assert_eq!(dir.len(), 1);
        assert_eq!(dir.by_ip(ip("10.0.0.2")).map(|p| p.uid.as_str()), Some("b"));
    }

    #[test]
    fn relist_replaces_everything() {
        let mut dir = PodDirectory::new(8);
        dir.apply(meta("a", &["10.0.0.1"]));
        dir.apply(meta("b", &["10.0.0.2"]));
        dir.replace_all([meta("b", &["10.0.0.2"]), meta("c", &["10.0.0.9"])]);
        assert_eq!(dir.len(), 2);
        assert!(
            dir.by_uid("a").is_none(),
            "a pod missing from the relist is gone"
        );
        assert!(dir.by_ip(ip("10.0.0.1")).is_none());
        assert_eq!(dir.by_ip(ip("10.0.0.9")).map(|p| p.uid.as_str()), Some("c"));
        dir.replace_all(Vec::new());
        assert!(dir.is_empty());
        assert!(dir.by_ip(ip("10.0.0.2")).is_none());
    }

    #[test]
    fn ip_mapping_dual_stack_mapped_and_reused() {
        let mut dir = PodDirectory::new(8);
        dir.apply(meta("a", &["10.0.0.1", "fd00::1"]));
        assert_eq!(dir.by_ip(ip("fd00::1")).map(|p| p.uid.as_str()), Some("a"));
        // An IPv4-mapped IPv6 peer (dual-stack socket) finds the IPv4 pod.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(dir.by_ip(mapped).map(|p| p.uid.as_str()), Some("a"));
        assert!(dir.by_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)).is_none());

        // A new pod takes the IP over; deleting the old one leaves it alone.
        dir.apply(meta("b", &["10.0.0.1"]));
        assert_eq!(dir.by_ip(ip("10.0.0.1")).map(|p| p.uid.as_str()), Some("b"));
        dir.delete("a");
        assert_eq!(dir.by_ip(ip("10.0.0.1")).map(|p| p.uid.as_str()), Some("b"));
        assert!(dir.by_ip(ip("fd00::1")).is_none());
    }

    #[test]
    fn host_network_pods_are_not_found_by_ip() {
        let mut dir = PodDirectory::new(8);
        let mut h = meta("h", &["192.168.1.10"]);
        h.host_network = true;
        dir.apply(h);
        assert!(dir.by_uid("h").is_some());
        assert!(dir.by_ip(ip("192.168.1.10")).is_none());
        // Another hostNetwork pod on the same node IP, then one deleted:
        // nothing ever maps the node IP.
        let mut h2 = meta("h2", &["192.168.1.10"]);
        h2.host_network = true;
        dir.apply(h2);
        dir.delete("h");
        assert!(dir.by_ip(ip("192.168.1.10")).is_none());
        assert_eq!(dir.len(), 1);
    }

    #[test]
    fn bound_refuses_new_pods_but_updates_known_ones() {
        let mut dir = PodDirectory::new(2);
        assert!(dir.apply(meta("a", &["10.0.0.1"])));
        assert!(dir.apply(meta("b", &["10.0.0.2"])));
        assert!(!dir.apply(meta("c", &["10.0.0.3"])));
        assert_eq!(dir.len(), 2);
        assert_eq!(dir.refused(), 1);
        assert!(dir.by_uid("c").is_none());
        assert!(dir.by_ip(ip("10.0.0.3")).is_none());
        // A known pod still gets its update when full.
        assert!(dir.apply(meta("b", &["10.0.0.4"])));
        assert_eq!(dir.by_ip(ip("10.0.0.4")).map(|p| p.uid.as_str()), Some("b"));
        // Room frees up when a pod goes.
        dir.delete("a");
        assert!(dir.apply(meta("c", &["10.0.0.3"])));
        // A relist past the bound keeps the first pods and counts the rest.
        dir.replace_all([meta("x", &[]), meta("y", &[]), meta("z", &[])]);
        assert_eq!(dir.len(), 2);
        assert_eq!(dir.refused(), 2);
        assert!(dir.by_uid("z").is_none());
    }

    fn pod(uid: Option<&str>, phase: &str, ips: &[&str], host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("shop".into()),
                uid: uid.map(Into::into),
                labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                host_network: Some(host_network),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ips.first().map(|s| s.to_string()),
                pod_ips: Some(ips.iter().map(|s| PodIP { ip: s.to_string() }).collect()),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn from_pod_takes_what_attribution_needs() {
        let m = PodMeta::from_pod(&pod(
            Some("u1"),
            "Running",
            &["10.1.0.5", "fd00::5", "junk"],
            false,
        ))
        .unwrap_or_else(|| panic!("pod with uid"));
        assert_eq!(m.uid, "u1");
        assert_eq!(m.name, "web-0");
        assert_eq!(m.namespace, "shop");
        assert_eq!(m.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(m.ips, vec![ip("10.1.0.5"), ip("fd00::5")]);
        assert!(!m.host_network);

        let h = PodMeta::from_pod(&pod(Some("u2"), "Running", &["192.168.1.10"], true));
        assert_eq!(h.map(|h| h.host_network), Some(true));

        // A finished pod's IP is released to the node and may be reused.
        let done = PodMeta::from_pod(&pod(Some("u3"), "Succeeded", &["10.1.0.6"], false));
        assert_eq!(done.map(|d| d.ips), Some(vec![]));

        assert!(PodMeta::from_pod(&pod(None, "Running", &[], false)).is_none());
        assert!(PodMeta::from_pod(&Pod::default()).is_none());
    }
}
