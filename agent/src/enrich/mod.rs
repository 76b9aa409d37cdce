//! Who an event happened to: socket -> owning process -> cgroup.
//!
//! Owned by the state task alone (no locks). The kernel's own record of the
//! owner wins; /proc answers for sockets that predate the agent, and is
//! rescanned on a miss, at most once per configured interval.

pub mod cgroups;
pub mod proc_sockets;
pub mod socket_identities;
pub mod workload;

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use std::net::SocketAddr;

use crate::{
    events::{DropEvent, Endpoints, Owner, RetransmitEvent, RetransmitKind},
    kube_pods::PodDirectory,
};
use cgroups::CgroupResolver;
use proc_sockets::ProcSocketTable;
use socket_identities::{SocketIdentities, SOCKET_IDENTITY_ENTRIES};

/// Scans /proc without stalling the async runtime: a node with thousands of
/// processes takes a while, and the other tasks move to another worker meanwhile.
fn scan_proc(proc_root: &std::path::Path) -> std::io::Result<ProcSocketTable> {
    let scan = || ProcSocketTable::scan(proc_root);
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(scan)
        }
        _ => scan(),
    }
}

/// How /proc finds the owner of a socket the kernel side did not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKey {
    Connection {
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
    },
    Listener {
        netns: u32,
        port: u16,
    },
    /// Nothing to look up (a packet without a socket).
    Unknown,
}

impl SocketKey {
    pub fn connection(netns: u32, ep: Endpoints) -> SocketKey {
        SocketKey::Connection {
            netns,
            local: ep.local,
            remote: ep.remote,
        }
    }

    pub fn of_retransmit(e: &RetransmitEvent) -> SocketKey {
        match e.kind {
            // Found at accept(): the child connection, owned by the acceptor.
            RetransmitKind::Segment | RetransmitKind::Unseen | RetransmitKind::SynAckUnseen => {
                SocketKey::connection(e.netns, e.endpoints)
            }
            // SYN-ACKs carry the request's tuple; the owner is the listener's.
            RetransmitKind::SynAck => SocketKey::Listener {
                netns: e.netns,
                port: e.endpoints.local.port(),
            },
        }
    }

    pub fn of_drop(e: &DropEvent) -> SocketKey {
        match e.endpoints {
            Some(ep) if e.at_listener() => SocketKey::Listener {
                netns: e.netns,
                port: ep.local.port(),
            },
            Some(ep) => SocketKey::connection(e.netns, ep),
            None => SocketKey::Unknown,
        }
    }
}

/// The identity of an event's owner as it appears in metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Identity {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    /// The Kubernetes pod (and container) the cgroup path names, if any.
    pub pod: Option<workload::PodRef>,
}

pub struct Enricher {
    /// Pods of this node from the Kubernetes API, when in a cluster.
    pub pods: Option<Arc<RwLock<PodDirectory>>>,
    proc_root: PathBuf,
    proc_table: ProcSocketTable,
    last_scan: Instant,
    rescan_interval: Duration,
    pub cgroups: CgroupResolver,
    identities: SocketIdentities,
}

impl Enricher {
    /// Bootstraps from /proc so sockets opened before the agent are attributed.
    pub fn bootstrap(rescan_interval: Duration, cgroup_cache_entries: usize) -> Enricher {
        let proc_root = PathBuf::from("/proc");
        let proc_table = scan_proc(&proc_root).unwrap_or_else(|e| {
            warn!(error = %e, "cannot scan /proc; pre-existing sockets stay unattributed");
            ProcSocketTable::default()
        });
        info!(
            processes = proc_table.processes_scanned,
            sockets = proc_table.len(),
            "bootstrapped socket owners from /proc"
        );
        let cgroups = CgroupResolver::new(cgroup_cache_entries, rescan_interval);
        if cgroups.root().is_none() {
            warn!("no cgroup2 mount found; events carry no cgroup");
        }
        Enricher {
            pods: None,
            proc_root,
            proc_table,
            last_scan: Instant::now(),
            rescan_interval,
            cgroups,
            identities: SocketIdentities::new(SOCKET_IDENTITY_ENTRIES),
        }
    }

    pub fn proc_sockets(&self) -> usize {
        self.proc_table.len()
    }

    fn owner_from_proc(&mut self, key: SocketKey) -> Option<Owner> {
        let found = match key {
            SocketKey::Connection {
                netns,
                local,
                remote,
            } => self.proc_table.connection_owner(netns, local, remote),
            SocketKey::Listener { netns, port } => self.proc_table.listener_owner(netns, port),
            SocketKey::Unknown => None,
        }
        .cloned()?;
        let cgroup_id = found
            .cgroup_path
            .as_deref()
            .and_then(|p| self.cgroups.id_of(p))
            .unwrap_or(0);
        Some(found.to_owner(cgroup_id))
    }

    /// The periodic reconcile with /proc: sockets whose owners changed hands
    /// (fork, fd passing, exit) since the last scan are learnt again. Runs at
    /// most once per `enrich.proc_rescan_min_interval_ms`, like miss-driven scans.
    pub fn reconcile(&mut self) {
        self.rescan_if_due();
    }

    fn rescan_if_due(&mut self) -> bool {
        if self.last_scan.elapsed() < self.rescan_interval {
            return false;
        }
        self.last_scan = Instant::now();
        match scan_proc(&self.proc_root) {
            Ok(t) => {
                debug!(sockets = t.len(), "rescanned /proc for socket owners");
                self.proc_table = t;
                true
            }
            Err(e) => {
                warn!(error = %e, "rescan of /proc failed");
                false
            }
        }
    }

    /// Adds the pod's namespace and name from the API's pod directory.
    fn name_pod(&self, mut pod: workload::PodRef) -> workload::PodRef {
        let known = self.pods.as_ref().and_then(|dir| {
            let dir = dir.read().ok()?;
            let meta = dir.by_uid(&pod.uid)?;
            Some((meta.namespace.clone(), meta.name.clone()))
        });
        if let Some((namespace, name)) = known {
            pod.namespace = Some(namespace);
            pod.name = Some(name);
        }
        pod
    }

    /// The pod behind a peer address, as "namespace/name", when the API's
    /// directory has a pod of this node with that IP (never a metric label).
    pub fn peer_pod(&self, ip: std::net::IpAddr) -> Option<String> {
        let dir = self.pods.as_ref()?.read().ok()?;
        dir.by_ip(ip.to_canonical())
            .map(|p| format!("{}/{}", p.namespace, p.name))
    }

    /// Fills `owner` when the kernel did not know it, and resolves the identity.
    pub fn attribute(&mut self, owner: &mut Option<Owner>, key: SocketKey) -> Identity {
        self.find_owner(owner, key);
        owner
            .as_ref()
            .map_or_else(Identity::default, |o| self.identify(o))
    }

    /// Fills `owner` from /proc when the kernel did not know it.
    pub fn find_owner(&mut self, owner: &mut Option<Owner>, key: SocketKey) {
        if owner.is_none() && key != SocketKey::Unknown {
            *owner = self.owner_from_proc(key);
            if owner.is_none() && self.rescan_if_due() {
                *owner = self.owner_from_proc(key);
            }
        }
    }

    /// The identity of socket `cookie`'s `owner`, resolved once per socket
    /// and owner (and again when the pod directory changes).
    pub fn identify_socket(&mut self, cookie: u64, owner: &Owner) -> Arc<Identity> {
        let generation = self.pods_generation();
        if let Some(who) = generation.and_then(|g| self.identities.get(cookie, owner, g)) {
            return who;
        }
        let who = Arc::new(self.identify(owner));
        // A cgroup not resolved yet may be later (after a walk): ask again then.
        let settled = who.cgroup.is_some() || owner.cgroup_id == 0;
        if let (Some(g), true) = (generation, settled) {
            self.identities
                .insert(cookie, owner.clone(), g, Arc::clone(&who));
        }
        who
    }

    /// The pod directory's generation, read before naming pods from it; 0
    /// without a directory, None when it cannot be read.
    fn pods_generation(&self) -> Option<u64> {
        match &self.pods {
            Some(dir) => dir.read().ok().map(|d| d.generation()),
            None => Some(0),
        }
    }

    fn identify(&mut self, o: &Owner) -> Identity {
        let cgroup = self.cgroups.path_of(o.cgroup_id);
        let pod = cgroup
            .as_deref()
            .and_then(workload::parse)
            .map(|p| self.name_pod(p));
        Identity {
            pid: Some(o.pid),
            comm: Some(o.comm.to_string()),
            pod,
            cgroup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube_pods::PodMeta;

    /// A pod of the directory, with its IPs.
    fn pod(uid: &str, namespace: &str, name: &str, ips: &[&str]) -> PodMeta {
        PodMeta {
            uid: uid.into(),
            name: name.into(),
            namespace: namespace.into(),
            labels: Default::default(),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            host_network: false,
        }
    }

    /// A pod found by its cgroup gets its namespace and name from the API's
    /// directory; one the directory does not know keeps only its uid.
    #[test]
    fn pods_are_named_from_the_directory() {
        let uid = "5f3a2b1c-9d8e-4f70-a1b2-c3d4e5f60718";
        let mut dir = PodDirectory::new(8);
        assert!(dir.apply(pod(uid, "video", "origin-7d9f", &[])));
        let mut enricher = Enricher::bootstrap(Duration::from_secs(1), 16);
        enricher.pods = Some(Arc::new(RwLock::new(dir)));
        let path = format!("/kubepods/burstable/pod{uid}");
        let pod = enricher.name_pod(workload::parse(&path).expect("a pod path"));
        assert_eq!(
            (pod.namespace.as_deref(), pod.name.as_deref()),
            (Some("video"), Some("origin-7d9f"))
        );
        let other = workload::parse("/kubepods/pod00000000-0000-4000-8000-000000000001")
            .expect("a pod path");
        let other = enricher.name_pod(other);
        assert_eq!((other.namespace, other.name), (None, None));
    }

    /// A socket's identity is resolved once, and again when the socket is
    /// announced with another owner or the pod directory learns its pod.
    #[test]
    fn socket_identities_follow_the_owner_and_the_directory() {
        let uid = "5f3a2b1c-9d8e-4f70-a1b2-c3d4e5f60718";
        let mut enricher = Enricher::bootstrap(Duration::from_secs(3600), 16);
        enricher
            .cgroups
            .learn(7, format!("/kubepods/burstable/pod{uid}"));
        enricher
            .cgroups
            .learn(8, "/system.slice/nginx.service".into());
        let dir = Arc::new(RwLock::new(PodDirectory::new(8)));
        enricher.pods = Some(Arc::clone(&dir));
        let owner = |pid, cgroup_id| Owner {
            pid,
            comm: "origin".into(),
            cgroup_id,
            source: crate::events::OwnerSource::Kernel,
        };
        let first = enricher.identify_socket(1, &owner(10, 7));
        assert!(
            Arc::ptr_eq(&first, &enricher.identify_socket(1, &owner(10, 7))),
            "cached"
        );
        let moved = enricher.identify_socket(1, &owner(11, 8));
        assert_eq!(
            (moved.pid, moved.cgroup.as_deref(), moved.pod.as_ref()),
            (Some(11), Some("/system.slice/nginx.service"), None),
            "re-announced with another owner"
        );
        assert_eq!(*enricher.identify_socket(2, &owner(10, 7)), *first);
        assert!(dir
            .write()
            .expect("lock")
            .apply(pod(uid, "video", "origin-7d9f", &[])));
        let named = enricher.identify_socket(2, &owner(10, 7));
        assert_eq!(
            named.pod.as_ref().and_then(|p| p.name.as_deref()),
            Some("origin-7d9f"),
            "named once the directory knows the pod"
        );
    }

    #[test]
    fn peers_on_this_node_are_named() {
        let mut dir = PodDirectory::new(8);
        assert!(dir.apply(pod("u1", "edge", "player-1", &["10.1.2.3"])));
        let mut enricher = Enricher::bootstrap(Duration::from_secs(1), 16);
        assert_eq!(
            enricher.peer_pod("10.1.2.3".parse().expect("ip")),
            None,
            "no directory"
        );
        enricher.pods = Some(Arc::new(RwLock::new(dir)));
        assert_eq!(
            enricher
                .peer_pod("::ffff:10.1.2.3".parse().expect("ip"))
                .as_deref(),
            Some("edge/player-1"),
            "IPv4-mapped addresses are the same peer"
        );
        assert_eq!(enricher.peer_pod("10.9.9.9".parse().expect("ip")), None);
    }
}
