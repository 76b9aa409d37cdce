//! Samples every TCP socket of the node once per interval through the kernel's
//! TCP iterator: accept-queue length and capacity of listeners, RTT, RTT
//! variance, cwnd and retransmits of connections. No /proc walk per sample.
//!
//! The iterator sees the sockets of the network namespace its reader was in
//! when it opened it, so a dedicated thread enters each namespace in turn
//! (setns(2) affects only the calling thread), opens a pass there and comes
//! back. Namespaces are found through /proc/PID/ns/net and never held open
//! between passes: holding one would keep a deleted namespace alive.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use vigil_abi::{SampleKind, SocketSample};

use crate::{
    events::{endpoints, tcp_state_name, DecodeError, Endpoints, Owner},
    loader::sys::IterLink,
    metrics::PipelineStats,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSample {
    pub cookie: u64,
    pub netns: u32,
    pub local: SocketAddr,
    /// Connections waiting in the accept queue (Recv-Q of `ss -lnt`).
    pub queue_len: u32,
    /// Accept-queue capacity (Send-Q of `ss -lnt`).
    pub queue_cap: u32,
    /// Handshakes dropped on this listener since it was created (`sk_drops`,
    /// which the kernel bumps with every TcpExt ListenDrops).
    pub drops: u32,
    pub owner: Option<Owner>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionSample {
    pub cookie: u64,
    pub netns: u32,
    pub tcp_state: u32,
    pub endpoints: Endpoints,
    pub srtt_us: u32,
    pub rttvar_us: u32,
    pub cwnd: u32,
    pub total_retrans: u32,
    /// Packets dropped for this socket since it was created (`sk_drops`).
    pub drops: u32,
    pub owner: Option<Owner>,
}

impl ConnectionSample {
    pub fn state_name(&self) -> &'static str {
        tcp_state_name(self.tcp_state)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    Listener(ListenerSample),
    Connection(ConnectionSample),
}

/// One pass over every namespace.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub samples: Vec<Sample>,
    /// Namespaces read in this pass, and those that could not be entered or read.
    pub namespaces: usize,
    pub namespace_errors: usize,
}

/// Decodes the output of one iterator pass: back-to-back `SocketSample`s.
pub fn decode_samples(bytes: &[u8]) -> Result<Vec<Sample>, DecodeError> {
    let size = std::mem::size_of::<SocketSample>();
    if !bytes.len().is_multiple_of(size) {
        return Err(DecodeError::Size {
            len: bytes.len(),
            expected: size,
        });
    }
    bytes
        .chunks_exact(size)
        .map(|chunk| {
            // SAFETY: exact size; SocketSample is plain old data.
            let s: SocketSample = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
            let ep = endpoints(&s.tuple)?;
            let owner = Owner::from_kernel(&s.owner);
            match s.kind {
                k if k == SampleKind::Listener as u32 => Ok(Sample::Listener(ListenerSample {
                    cookie: s.cookie,
                    netns: s.netns,
                    local: ep.local,
                    queue_len: s.queue_len,
                    queue_cap: s.queue_cap,
                    drops: s.drops,
                    owner,
                })),
                k if k == SampleKind::Connection as u32 => {
                    Ok(Sample::Connection(ConnectionSample {
                        cookie: s.cookie,
                        netns: s.netns,
                        tcp_state: s.state,
                        endpoints: ep,
                        srtt_us: s.srtt_us,
                        rttvar_us: s.rttvar_us,
                        cwnd: s.cwnd,
                        total_retrans: s.total_retrans,
                        drops: s.drops,
                        owner,
                    }))
                }
                other => Err(DecodeError::Kind(other)),
            }
        })
        .collect()
}

fn netns_inode_of(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    target
        .to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Where `ip netns` and container runtimes (CNI) keep named namespaces.
const NAMED_NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// One path per network namespace: named ones (bind mounts, which exist even
/// with no process inside) and /proc/PID/ns/net of every process.
fn discover_namespaces(proc_root: &Path) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    for dir in NAMED_NETNS_DIRS {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            // A bind-mounted nsfs file; its inode is the namespace's.
            if let Ok(meta) = std::fs::metadata(&path) {
                use std::os::unix::fs::MetadataExt;
                found.entry(meta.ino()).or_insert(path);
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let path = entry.path().join("ns/net");
        if let Some(inode) = netns_inode_of(&path) {
            found.entry(inode).or_insert(path);
        }
    }
    found
}

fn setns(ns: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a namespace fd we hold; affects this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub struct Sampler {
    pub link: IterLink,
    pub interval: Duration,
    pub all_namespaces: bool,
    pub tx: mpsc::Sender<Snapshot>,
    pub stats: Arc<PipelineStats>,
}

impl Sampler {
    /// Runs on its own thread (it changes its network namespace) until `stop`.
    pub fn spawn(self, stop: CancellationToken) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("vigil-sampler".into())
            .spawn(move || self.run(&stop))
    }

    fn run(self, stop: &CancellationToken) {
        // The thread's own namespace, to come back to after each visit.
        let home = match File::open("/proc/thread-self/ns/net") {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "cannot open this thread's network namespace; socket sampling stopped");
                return;
            }
        };
        let home_inode = netns_inode_of(Path::new("/proc/thread-self/ns/net"));
        let mut all_namespaces = self.all_namespaces;
        info!(
            interval_ms = self.interval.as_millis() as u64,
            all_namespaces, "socket sampler running"
        );
        while !stop.is_cancelled() {
            let started = Instant::now();
            let mut snapshot = Snapshot::default();
            self.pass_here(&mut snapshot);
            if all_namespaces {
                let targets = discover_namespaces(Path::new("/proc"));
                for (inode, path) in targets {
                    if Some(inode) == home_inode || stop.is_cancelled() {
                        continue;
                    }
                    match self.visit(&path, &home, &mut snapshot) {
                        Ok(()) => {}
                        Err(Visit::Skipped(e)) => {
                            snapshot.namespace_errors += 1;
                            debug!(netns = inode, error = %e, "namespace not sampled");
                            if e.kind() == std::io::ErrorKind::PermissionDenied {
                                warn!("no permission to enter other network namespaces (CAP_SYS_ADMIN); sampling only the agent's own from now on");
                                all_namespaces = false;
                                break;
                            }
                        }
                        Err(Visit::Stranded(e)) => {
                            warn!(error = %e, "cannot return to the agent's network namespace; socket sampling stopped");
                            return;
                        }
                    }
                }
            }
            self.stats.sampler_passes.fetch_add(1, Ordering::Relaxed);
            self.stats
                .sampler_namespace_errors
                .fetch_add(snapshot.namespace_errors as u64, Ordering::Relaxed);
            self.stats
                .sampler_pass_micros
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            if self.tx.try_send(snapshot).is_err() {
                self.stats.snapshots_dropped.fetch_add(1, Ordering::Relaxed);
            }
            // Sleep out the interval in short steps so a stop is seen quickly.
            while !stop.is_cancelled() && started.elapsed() < self.interval {
                let left = self.interval.saturating_sub(started.elapsed());
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
        }
        debug!("socket sampler stopped");
    }

    /// One iterator pass in the thread's current namespace.
    fn pass_here(&self, snapshot: &mut Snapshot) {
        let mut bytes = Vec::new();
        let read = self
            .link
            .open()
            .and_then(|mut pass| pass.read_to_end(&mut bytes));
        match read
            .map_err(|e| e.to_string())
            .and_then(|_| decode_samples(&bytes).map_err(|e| e.to_string()))
        {
            Ok(samples) => {
                snapshot.samples.extend(samples);
                snapshot.namespaces += 1;
            }
            Err(e) => {
                snapshot.namespace_errors += 1;
                debug!(error = %e, "iterator pass failed");
            }
        }
    }

    fn visit(&self, ns_path: &Path, home: &File, snapshot: &mut Snapshot) -> Result<(), Visit> {
        // The process may have exited since discovery: then there is nothing to sample.
        let ns = File::open(ns_path).map_err(Visit::Skipped)?;
        setns(&ns).map_err(Visit::Skipped)?;
        self.pass_here(snapshot);
        setns(home).map_err(Visit::Stranded)
    }
}

enum Visit {
    /// This namespace could not be entered; the thread is still at home.
    Skipped(std::io::Error),
    /// The thread could not return home; it must not sample any further.
    Stranded(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_abi::{SockOwner, SockTuple, AF_INET};

    fn raw(kind: u32) -> SocketSample {
        let mut local_addr = [0u8; 16];
        local_addr[..4].copy_from_slice(&[198, 18, 3, 1]);
        SocketSample {
            kind,
            state: if kind == 1 { 10 } else { 1 },
            sk_addr: 1,
            cookie: 9,
            netns: 4026531840,
            queue_len: 5,
            queue_cap: 4,
            srtt_us: 1500,
            rttvar_us: 300,
            cwnd: 10,
            total_retrans: 2,
            drops: 3,
            tuple: SockTuple {
                local_addr,
                remote_addr: [0; 16],
                local_port: 8080,
                remote_port: 0,
                family: AF_INET,
                _pad: 0,
            },
            owner: SockOwner::default(),
        }
    }

    fn bytes(samples: &[SocketSample]) -> Vec<u8> {
        samples
            .iter()
            .flat_map(|s| {
                // SAFETY: reading a repr(C) POD value as bytes.
                unsafe {
                    std::slice::from_raw_parts(
                        (s as *const SocketSample).cast::<u8>(),
                        std::mem::size_of::<SocketSample>(),
                    )
                }
                .to_vec()
            })
            .collect()
    }

    #[test]
    fn decodes_listeners_and_connections() {
        let out = decode_samples(&bytes(&[raw(1), raw(2)])).expect("decodes");
        let [Sample::Listener(l), Sample::Connection(c)] = out.as_slice() else {
            panic!("one of each: {out:?}");
        };
        assert_eq!((l.queue_len, l.queue_cap, l.drops), (5, 4, 3));
        assert_eq!(l.local, "198.18.3.1:8080".parse().expect("addr"));
        assert_eq!((c.srtt_us, c.rttvar_us, c.cwnd), (1500, 300, 10));
        assert_eq!(c.state_name(), "ESTAB");
        assert!(l.owner.is_none(), "owner unknown to the kernel");
    }

    #[test]
    fn rejects_torn_and_unknown_records() {
        let good = bytes(&[raw(1)]);
        assert!(decode_samples(&good[..good.len() - 1]).is_err());
        assert_eq!(decode_samples(&bytes(&[raw(7)])), Err(DecodeError::Kind(7)));
        assert_eq!(decode_samples(&[]), Ok(vec![]));
    }

    #[test]
    fn finds_this_process_namespace() {
        let found = discover_namespaces(Path::new("/proc"));
        let mine = netns_inode_of(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(found.contains_key(&mine), "{found:?}");
    }
}
