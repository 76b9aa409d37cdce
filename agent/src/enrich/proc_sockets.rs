//! Socket owners read from /proc: the bootstrap for sockets that existed before
//! the agent started (the kernel programs never saw them connect or be
//! accepted), and the fallback for any the kernel side missed.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process},
};

use crate::events::{Owner, OwnerSource};

/// An owner as /proc shows it; the cgroup is a path under the cgroup v2 root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcOwner {
    pub pid: u32,
    pub comm: String,
    pub cgroup_path: Option<String>,
}

impl ProcOwner {
    pub fn to_owner(&self, cgroup_id: u64) -> Owner {
        Owner {
            pid: self.pid,
            comm: self.comm.as_str().into(),
            cgroup_id,
            source: OwnerSource::Proc,
        }
    }
}

#[derive(Debug, Default)]
pub struct ProcSocketTable {
    /// (netns inode, local, remote) -> owner, for connected sockets.
    connections: HashMap<(u32, SocketAddr, SocketAddr), ProcOwner>,
    /// (netns inode, local port) -> owner, for listeners (SYN-ACKs carry the request's tuple).
    listeners: HashMap<(u32, u16), ProcOwner>,
    pub processes_scanned: usize,
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The cgroup v2 path of a process ("0::/path" in /proc/PID/cgroup).
fn cgroup_v2_path(proc_root: &std::path::Path, pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

fn netns_inode(proc_root: &std::path::Path, pid: i32) -> Option<u32> {
    let link = std::fs::read_link(proc_root.join(pid.to_string()).join("ns/net")).ok()?;
    // "net:[4026531840]"
    link.to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

impl ProcSocketTable {
    /// Scans every process under `proc_root` (normally /proc). Processes that
    /// vanish or deny access mid-scan are skipped: this is best effort by nature.
    pub fn scan(proc_root: &std::path::Path) -> std::io::Result<ProcSocketTable> {
        let mut table = ProcSocketTable::default();
        // socket inode -> owner; then per network namespace, inode -> tuple.
        let mut inode_owner: HashMap<u64, ProcOwner> = HashMap::new();
        let mut netns_reader: HashMap<u32, i32> = HashMap::new();
        let entries = std::fs::read_dir(proc_root)?;
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(process) =
                Process::new_with_root(PathBuf::from(proc_root).join(pid.to_string()))
            else {
                continue;
            };
            let Ok(fds) = process.fd() else { continue };
            table.processes_scanned += 1;
            let mut owner: Option<ProcOwner> = None;
            for fd in fds.flatten() {
                if let FDTarget::Socket(inode) = fd.target {
                    let o = owner.get_or_insert_with(|| ProcOwner {
                        pid: pid as u32,
                        comm: process.stat().map(|s| s.comm).unwrap_or_default(),
                        cgroup_path: cgroup_v2_path(proc_root, pid),
                    });
                    // The first process seen keeps a shared socket (e.g. a listener inherited by workers).
                    inode_owner.entry(inode).or_insert_with(|| o.clone());
                }
            }
            if owner.is_some() {
                if let Some(ns) = netns_inode(proc_root, pid) {
                    netns_reader.entry(ns).or_insert(pid);
                }
            }
        }
        for (netns, pid) in netns_reader {
            let Ok(process) =
                Process::new_with_root(PathBuf::from(proc_root).join(pid.to_string()))
            else {
                continue;
            };
            let entries = process
                .tcp()
                .unwrap_or_default()
                .into_iter()
                .chain(process.tcp6().unwrap_or_default());
            for e in entries {
                let Some(owner) = inode_owner.get(&e.inode) else {
                    continue;
                };
                let local = canonical(e.local_address);
                if e.state == TcpState::Listen {
                    table.listeners.insert((netns, local.port()), owner.clone());
                } else {
                    table
                        .connections
                        .insert((netns, local, canonical(e.remote_address)), owner.clone());
                }
            }
        }
        Ok(table)
    }

    pub fn connection_owner(
        &self,
        netns: u32,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Option<&ProcOwner> {
        self.connections
            .get(&(netns, canonical(local), canonical(remote)))
    }

    pub fn listener_owner(&self, netns: u32, port: u16) -> Option<&ProcOwner> {
        self.listeners.get(&(netns, port))
    }

    pub fn len(&self) -> usize {
        self.connections.len() + self.listeners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// This test process's own sockets must be found, with its pid and netns.
    #[test]
    fn finds_own_sockets() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        let table = ProcSocketTable::scan(std::path::Path::new("/proc")).expect("scan");
        let pid = std::process::id();
        let netns = netns_inode(std::path::Path::new("/proc"), pid as i32).expect("own netns");
        let owner = table
            .connection_owner(netns, client.local_addr().expect("local"), addr)
            .expect("client socket found");
        assert_eq!(owner.pid, pid);
        assert_eq!(
            table.listener_owner(netns, addr.port()).map(|o| o.pid),
            Some(pid)
        );
    }
}
