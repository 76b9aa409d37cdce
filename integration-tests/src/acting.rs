//! Fixtures for the acting tests: an origin of several worker processes
//! sharing one SO_REUSEPORT group in a cgroup of its own, the agent's
//! `/v1/actuation` view, and the node's steering programs as bpftool lists
//! them.

use std::{
    net::SocketAddr,
    process::Command,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde_json::Value;
use vigil_testbed::netns::{bin_path, in_cgroup, spawn_origin, ChildGuard};

use crate::{tag, Agent, TestCgroup};

/// Worker processes of a `Fleet`, one listener each.
pub const WORKERS: usize = 4;

/// One acting test at a time: each counts every sk_reuseport program of
/// the node.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// `WORKERS` origin processes, one listener each, sharing `addr`.
pub struct Fleet {
    pub addr: SocketAddr,
    /// (process, pid, segment size it serves: a response names its worker)
    pub workers: Vec<(ChildGuard, u32, u64)>,
    pub cgroup: TestCgroup,
}

impl Fleet {
    pub fn start(name: &str, port: u16) -> anyhow::Result<Fleet> {
        Fleet::start_with(name, port, &[])
    }

    /// With `origin_args` for every worker (e.g. its slots and service time).
    pub fn start_with(name: &str, port: u16, origin_args: &[&str]) -> anyhow::Result<Fleet> {
        let cgroup = TestCgroup::create(&format!("vigil-it-{}/origin", tag(name)))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut workers = Vec::new();
        for i in 0..WORKERS {
            let bytes = 1000 + i as u64;
            let mut cmd = Command::new(bin_path("vigil-origin")?);
            cmd.args(["--segment-bytes", &bytes.to_string()])
                .args(origin_args);
            let (child, pid) = spawn_origin(&mut in_cgroup(&cgroup.procs(), &cmd), addr, 1, 120)?;
            workers.push((child, pid, bytes));
        }
        Ok(Fleet {
            addr,
            workers,
            cgroup,
        })
    }

    pub fn selector(&self) -> String {
        format!("cgroup:{}", self.cgroup.rel)
    }

    pub fn signal(&self, worker: usize, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.workers[worker].1 as i32);
        nix::sys::signal::kill(pid, signal).context("signalling a worker")
    }

    pub fn stop(&self, worker: usize) -> anyhow::Result<()> {
        self.signal(worker, nix::sys::signal::Signal::SIGSTOP)
    }

    pub fn resume(&self, worker: usize) -> anyhow::Result<()> {
        self.signal(worker, nix::sys::signal::Signal::SIGCONT)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // A stopped worker would ignore the guard's SIGTERM.
        for i in 0..self.workers.len() {
            let _ = self.resume(i);
        }
    }
}

/// sk_reuseport programs named `vigil_reuseport` on the node (bpftool).
pub fn steering_programs() -> anyhow::Result<usize> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool")?;
    let list: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    Ok(list
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["type"] == "sk_reuseport" && p["name"] == "vigil_reuseport")
                .count()
        })
        .unwrap_or(0))
}

/// The kernel objects of acting the agent's ledger lists ("kernel object
/// created"): each steering program and its maps.
pub fn acting_objects(agent: &Agent) -> Vec<(String, u64, String)> {
    agent
        .kernel_objects()
        .into_iter()
        .filter(|(_, _, name)| name == "vigil_reuseport" || name.starts_with("VIGIL_RP_"))
        .collect()
}

/// Waits until bpftool finds none of `objects` (the kernel frees a replaced
/// or detached program, and then its maps, after an RCU grace period).
pub fn wait_until_released(objects: &[(String, u64, String)], what: &str) -> anyhow::Result<()> {
    crate::wait_for(Duration::from_secs(10), what, || {
        let left: Vec<_> = objects
            .iter()
            .filter(|(kind, id, _)| crate::bpftool_shows(kind, *id))
            .collect();
        Ok(left.is_empty().then_some(()))
    })
}

/// `GET /v1/actuation`.
pub fn actuation(agent: &Agent) -> anyhow::Result<Value> {
    let (status, body) = vigil_testbed::prom::query(&agent.query_socket, "/v1/actuation")?;
    anyhow::ensure!(status.contains(" 200 "), "{status}: {body}");
    Ok(serde_json::from_str(&body)?)
}

/// The group of `addr` in `view`, if listed.
pub fn group_of(view: &Value, addr: SocketAddr) -> Option<Value> {
    view["groups"].as_array().and_then(|groups| {
        groups
            .iter()
            .find(|g| {
                g["group"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(&format!("/{addr}")))
            })
            .cloned()
    })
}

/// Waits until the agent shows the group of `addr` in `state` with every member.
pub fn wait_for_group(agent: &Agent, addr: SocketAddr, state: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let view = actuation(agent)?;
        if let Some(g) = group_of(&view, addr) {
            if g["state"] == state && g["members"].as_array().map(Vec::len) == Some(WORKERS) {
                return Ok(g);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "group {addr} not {state} after 15 s: {view:#}\n{}",
                agent.log_text()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for an audit record with `action` (and `applied`) about `addr`.
pub fn wait_for_decision(
    agent: &Agent,
    addr: SocketAddr,
    action: &str,
    applied: bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = actuation(agent)?;
        let found = view["decisions"].as_array().and_then(|d| {
            d.iter()
                .find(|r| {
                    r["action"] == action
                        && r["applied"] == applied
                        && r["group"]
                            .as_str()
                            .is_some_and(|g| g.ends_with(&format!("/{addr}")))
                })
                .cloned()
        });
        if let Some(r) = found {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("no {action} decision (applied={applied}) for {addr}: {view:#}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}
