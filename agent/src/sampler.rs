//! Samples every TCP socket a process holds, once per interval, through the
//! kernel's task-file iterator: accept-queue length and capacity of listeners,
//! RTT, RTT variance, cwnd and retransmits of connections, each with the
//! process holding it. One pass covers every network namespace (pods
//! included) without entering them and without walking /proc.
//!
//! The pass runs on its own thread: reading the iterator is a blocking
//! syscall whose length grows with the number of open files on the node.

use std::{
    collections::{HashMap, HashSet},
    io::Read,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
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
    /// The owner's file descriptor of the listener (the first holder's).
    pub fd: u32,
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

impl Sample {
    pub fn cookie(&self) -> u64 {
        match self {
            Sample::Listener(l) => l.cookie,
            Sample::Connection(c) => c.cookie,
        }
    }
}

/// One pass over every socket held by a process.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub samples: Vec<Sample>,
    /// TcpExt ListenOverflows of every network namespace with a listener,
    /// read through /proc/PID/net/netstat of a listener's process (the kernel
    /// keeps no per-socket count of overflows).
    pub listen_overflows: HashMap<u32, u64>,
}

/// /proc/.../net/netstat of network namespace `netns`, through process `pid`
/// or, when only one of its threads is in that namespace, that thread
/// (/proc/PID/net follows the main thread).
fn netstat_in(pid: u32, netns: u32) -> Option<String> {
    let in_netns = |dir: &str| {
        std::fs::read_link(format!("{dir}/ns/net"))
            .ok()
            .and_then(|l| {
                l.to_str()?
                    .strip_prefix("net:[")?
                    .strip_suffix(']')?
                    .parse::<u32>()
                    .ok()
            })
            == Some(netns)
    };
    let process = format!("/proc/{pid}");
    if in_netns(&process) {
        return std::fs::read_to_string(format!("{process}/net/netstat")).ok();
    }
    std::fs::read_dir(format!("{process}/task"))
        .ok()?
        .flatten()
        .map(|t| t.path().display().to_string())
        .find(|dir| in_netns(dir))
        .and_then(|dir| std::fs::read_to_string(format!("{dir}/net/netstat")).ok())
}

/// A TcpExt counter from the text of /proc/.../net/netstat (a header line of
/// names, then a line of values, per section).
pub fn netstat_counter(text: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Decodes the output of one iterator pass: back-to-back `SocketSample`s.
/// A socket held by several processes (inherited across fork, passed over
/// a unix socket) is kept once, for the first holder the kernel visited. It
/// is told apart by its kernel address, not its cookie: a socket nothing
/// asked a cookie for has none yet (0).
pub fn decode_samples(bytes: &[u8]) -> Result<Vec<Sample>, DecodeError> {
    let size = std::mem::size_of::<SocketSample>();
    if !bytes.len().is_multiple_of(size) {
        return Err(DecodeError::Size {
            len: bytes.len(),
            expected: size,
        });
    }
    let mut seen = HashSet::new();
    bytes
        .chunks_exact(size)
        // SAFETY: exact size; SocketSample is plain old data.
        .map(|chunk| unsafe { std::ptr::read_unaligned::<SocketSample>(chunk.as_ptr().cast()) })
        .filter(|s| seen.insert(s.sk_addr))
        .map(|s| {
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
                    fd: s.fd,
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

pub struct Sampler {
    pub link: IterLink,
    pub interval: Duration,
    pub tx: mpsc::Sender<Snapshot>,
    /// Every pass's listeners, for acting (`act`): the latest replaces the last.
    pub listeners: watch::Sender<Arc<Vec<ListenerSample>>>,
    pub stats: Arc<PipelineStats>,
}

impl Sampler {
    /// Runs on its own thread until `stop`.
    pub fn spawn(self, stop: CancellationToken) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("vigil-sampler".into())
            .spawn(move || self.run(&stop))
    }

    fn run(self, stop: &CancellationToken) {
        info!(
            interval_ms = self.interval.as_millis() as u64,
            "socket sampler running"
        );
        while !stop.is_cancelled() {
            let started = Instant::now();
            let snapshot = self.pass();
            self.stats.sampler_passes.fetch_add(1, Ordering::Relaxed);
            self.stats
                .sampler_pass_micros
                .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            match snapshot {
                Ok(snapshot) => {
                    let listeners: Vec<ListenerSample> = snapshot
                        .samples
                        .iter()
                        .filter_map(|s| match s {
                            Sample::Listener(l) => Some(l.clone()),
                            Sample::Connection(_) => None,
                        })
                        .collect();
                    self.listeners.send_replace(Arc::new(listeners));
                    if self.tx.try_send(snapshot).is_err() {
                        self.stats.snapshots_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    self.stats.sampler_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "socket sample failed; trying again next interval");
                }
            }
            // Sleep out the interval in short steps so a stop is seen quickly.
            while !stop.is_cancelled() && started.elapsed() < self.interval {
                let left = self.interval.saturating_sub(started.elapsed());
                std::thread::sleep(left.min(Duration::from_millis(50)));
            }
        }
        debug!("socket sampler stopped");
    }

    /// One iterator pass.
    fn pass(&self) -> Result<Snapshot, String> {
        let mut bytes = Vec::new();
        self.link
            .open()
            .and_then(|mut pass| pass.read_to_end(&mut bytes))
            .map_err(|e| format!("reading the socket iterator: {e}"))?;
        let samples =
            decode_samples(&bytes).map_err(|e| format!("decoding the socket iterator: {e}"))?;
        let mut listen_overflows = HashMap::new();
        for s in &samples {
            let Sample::Listener(l) = s else { continue };
            let Some(owner) = &l.owner else { continue };
            if listen_overflows.contains_key(&l.netns) {
                continue;
            }
            // The process may be gone already; its namespace is then read next time.
            if let Some(n) =
                netstat_in(owner.pid, l.netns).and_then(|t| netstat_counter(&t, "ListenOverflows"))
            {
                listen_overflows.insert(l.netns, n);
            }
        }
        Ok(Snapshot {
            samples,
            listen_overflows,
        })
    }
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
            sk_addr: 0xffff_8881_0000_0000 + u64::from(kind) * 0x1000,
            cookie: 9,
            netns: 4026531840,
            queue_len: 5,
            queue_cap: 4,
            srtt_us: 1500,
            rttvar_us: 300,
            cwnd: 10,
            total_retrans: 2,
            drops: 3,
            fd: 7,
            _pad: 0,
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
    fn keeps_a_socket_held_twice_once_whatever_its_cookie() {
        let mut shared = raw(2);
        shared.cookie = 0;
        shared.owner.known = 1;
        shared.owner.tgid = 40;
        let mut held_again = shared;
        held_again.owner.tgid += 1;
        let mut other = raw(2);
        other.cookie = 0;
        other.sk_addr += 0x800;
        let out = decode_samples(&bytes(&[shared, held_again, other])).expect("decodes");
        assert_eq!(
            out.len(),
            2,
            "the second holder of one socket is dropped: {out:?}"
        );
        let Sample::Connection(first) = &out[0] else {
            panic!("a connection: {out:?}");
        };
        assert_eq!(
            first.owner.as_ref().map(|o| o.pid),
            Some(shared.owner.tgid),
            "the first holder is kept"
        );
    }

    #[test]
    fn reads_tcpext_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 20 21\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(netstat_counter(text, "ListenOverflows"), Some(20));
        assert_eq!(netstat_counter(text, "ListenDrops"), Some(21));
        assert_eq!(netstat_counter(text, "Nope"), None);
        assert_eq!(netstat_counter("garbage", "ListenOverflows"), None);
        let own = std::fs::read_to_string("/proc/self/net/netstat").expect("netstat");
        assert!(netstat_counter(&own, "ListenOverflows").is_some());
    }

    #[test]
    fn rejects_torn_and_unknown_records() {
        let good = bytes(&[raw(1)]);
        assert!(decode_samples(&good[..good.len() - 1]).is_err());
        assert_eq!(decode_samples(&bytes(&[raw(7)])), Err(DecodeError::Kind(7)));
        assert_eq!(decode_samples(&[]), Ok(vec![]));
    }
}
