//! Reading and writing a pod's network namespace from the agent: sysctls and
//! the namespace's own TCP counters, through setns(2) on a short-lived
//! thread of its own (never on a runtime thread: setns moves only the
//! calling thread). Entering a namespace needs CAP_SYS_ADMIN.

use std::{
    fs::File,
    os::fd::{AsFd, OwnedFd},
};

pub const SOMAXCONN: &str = "net.core.somaxconn";
pub const PORT_RANGE: &str = "net.ipv4.ip_local_port_range";
pub const TW_REUSE: &str = "net.ipv4.tcp_tw_reuse";
pub const SYN_BACKLOG: &str = "net.ipv4.tcp_max_syn_backlog";
pub const SYNCOOKIES: &str = "net.ipv4.tcp_syncookies";

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

fn read_sysctl(name: &str) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(name))?
        .trim()
        .to_owned())
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn number(name: &str) -> std::io::Result<u32> {
    let v = read_sysctl(name)?;
    v.parse()
        .map_err(|e| invalid(format!("{name} = {v:?}: {e}")))
}

/// Sets a sysctl in namespace `ns` (the value as /proc/sys takes it).
pub fn write_in(ns: &OwnedFd, name: &str, value: &str) -> std::io::Result<()> {
    let (path, value) = (sysctl_path(name), value.to_owned());
    in_netns(ns, move || std::fs::write(&path, value))
}

/// TIME_WAIT sockets in /proc/net/sockstat ("TCP: inuse 5 orphan 0 tw 2 ...").
fn time_wait(sockstat: &str) -> Option<u64> {
    let tcp = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = tcp.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

/// What the sysctl advisor reads of one namespace per look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    pub somaxconn: u32,
    /// The ephemeral ports `connect()` picks from, inclusive.
    pub port_range: (u16, u16),
    pub tw_reuse: u32,
    pub syncookies: u32,
    pub max_syn_backlog: u32,
    /// TCP sockets in TIME_WAIT now.
    pub time_wait: u64,
    /// TcpExt counters since the namespace was made.
    pub listen_drops: u64,
    pub listen_overflows: u64,
    pub req_queue_full_drops: u64,
}

impl Reading {
    /// Everything at once, on one thread in the namespace (/proc/thread-self
    /// shows the calling thread's namespace).
    pub fn of(ns: &OwnedFd) -> std::io::Result<Reading> {
        in_netns(ns, || {
            let range = read_sysctl(PORT_RANGE)?;
            let mut bounds = range.split_whitespace().map(str::parse::<u16>);
            let port_range = match (bounds.next(), bounds.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) => (lo, hi),
                _ => return Err(invalid(format!("{PORT_RANGE} = {range:?}"))),
            };
            let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
            let sockstat = std::fs::read_to_string("/proc/thread-self/net/sockstat")?;
            let ext = |name| crate::sampler::netstat_counter(&netstat, name).unwrap_or(0);
            Ok(Reading {
                somaxconn: number(SOMAXCONN)?,
                port_range,
                tw_reuse: number(TW_REUSE)?,
                syncookies: number(SYNCOOKIES)?,
                max_syn_backlog: number(SYN_BACKLOG)?,
                time_wait: time_wait(&sockstat).unwrap_or(0),
                listen_drops: ext("ListenDrops"),
                listen_overflows: ext("ListenOverflows"),
                req_queue_full_drops: ext("TCPReqQFullDrop"),
            })
        })
    }
}

/// The network namespace `inode` through a thread of `pid` in it: usually
/// the process's own, but a thread may have entered another one (setns),
/// and sockets belong to the namespace they were made in.
pub fn netns_of(pid: u32, inode: u32) -> Option<OwnedFd> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_own_namespace() {
        // The agent's own namespace, entered through its own fd: the values
        // are the host's.
        let Ok(f) = File::open("/proc/self/ns/net") else {
            return;
        };
        match Reading::of(&OwnedFd::from(f)) {
            Ok(r) => {
                assert_eq!(r.somaxconn, number(SOMAXCONN).expect("readable"));
                assert!(r.port_range.0 < r.port_range.1, "{r:?}");
            }
            // setns needs CAP_SYS_ADMIN even into one's own namespace.
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}"),
        }
        assert_eq!(sysctl_path(SOMAXCONN), "/proc/sys/net/core/somaxconn");
    }

    #[test]
    fn parses_sockstat() {
        let sockstat = "sockets: used 12\nTCP: inuse 3 orphan 0 tw 42 alloc 5 mem 1\n";
        assert_eq!(time_wait(sockstat), Some(42));
        assert_eq!(time_wait("TCP: inuse 3\n"), None);
    }
}
