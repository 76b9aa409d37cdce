//! The steering program's kernel cost per new connection (bpf_stats), next
//! to an empty sk_reuseport program on a twin group in the same run.
//!
//! Two SO_REUSEPORT groups of four `vigil-origin` processes on 127.0.0.1:
//! group A in a cgroup the agent enforces (`--actuation enforce --act-on
//! cgroup:...`), group B with a program that only returns SK_PASS (the
//! floor: what bpf_stats reports for a run that does nothing, and the
//! kernel's hash). New connections alternate between the groups. Then one
//! worker of A is stopped, so A's program steers every connection (the
//! selection helper's path).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use vigil_testbed::{
    netns::{in_cgroup, spawn_origin, ChildGuard},
    prom::query,
};

use crate::{
    bench::{all_programs, uname, wait_until, write_section, BenchArgs, QUERY_SOCKET},
    bpf_attach::{load_empty, PROG_TYPE_SK_REUSEPORT},
};

const SECTION: &str = "## SO_REUSEPORT steering: cost per new connection";
const METRICS_ADDR: &str = "127.0.0.1:19467";
const PORT_STEERED: u16 = 19411;
const PORT_EMPTY: u16 = 19412;
const WORKERS: usize = 4;
const CLIENT_THREADS: usize = 8;
const BENCH_CGROUP: &str = "vigil-bench-reuseport";

fn start_group(
    bin: &Path,
    port: u16,
    cgroup: Option<&Path>,
) -> anyhow::Result<Vec<(ChildGuard, u32)>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    (0..WORKERS)
        .map(|_| {
            let mut cmd = Command::new(bin.join("vigil-origin"));
            cmd.args(["--segment-bytes", "1000"]);
            let mut cmd = match cgroup {
                Some(c) => in_cgroup(&c.join("cgroup.procs"), &cmd),
                None => cmd,
            };
            spawn_origin(&mut cmd, addr, 1, 600)
        })
        .collect()
}

/// An sk_reuseport program that returns SK_PASS (r0 = 1), attached to the
/// group on `port` through a listener of the bench's own that then closes
/// (the group keeps the program). Returns the program's fd (kept loaded).
fn attach_empty(port: u16) -> anyhow::Result<(OwnedFd, u64)> {
    const SO_ATTACH_REUSEPORT_EBPF: i32 = 52;
    // SK_PASS without a selection: the kernel's hash.
    let prog = load_empty(PROG_TYPE_SK_REUSEPORT, 1, "vigil_empty")
        .context("loading an empty sk_reuseport program")?;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(8)?;
    let raw = prog.as_raw_fd();
    // SAFETY: setsockopt with a live socket and an int-sized value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            (&raw as *const i32).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc < 0 {
        bail!(
            "attaching the empty program: {}",
            std::io::Error::last_os_error()
        );
    }
    drop(socket);
    let id = all_programs()?
        .into_iter()
        .filter(|(_, p)| p.name == "vigil_empty")
        .map(|(id, _)| id)
        .max()
        .context("the empty program's id")?;
    Ok((prog, id))
}

/// `connections` new connections spread over `ports`, each fetching one
/// segment; returns how many were answered.
fn connect_many(ports: &[u16], connections: u32) -> u32 {
    let per_thread = connections / CLIENT_THREADS as u32;
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let ports = ports.to_vec();
            thread::spawn(move || {
                let mut answered = 0;
                for i in 0..per_thread {
                    let port = ports[(i as usize + t) % ports.len()];
                    if fetch(SocketAddr::from(([127, 0, 0, 1], port))) {
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    threads.into_iter().filter_map(|h| h.join().ok()).sum()
}

fn fetch(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    if s.write_all(b"GET /live/b/seg0.ts HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 2048];
    matches!(s.read(&mut buf), Ok(n) if n > 0)
}

fn costs(ids: &[u64]) -> anyhow::Result<Vec<(u64, u64)>> {
    let all = all_programs()?;
    Ok(ids
        .iter()
        .map(|id| {
            all.iter()
                .find(|(i, _)| i == id)
                .map_or((0, 0), |(_, p)| (p.runs, p.run_time_ns))
        })
        .collect())
}

pub fn run(args: &BenchArgs, bin: &Path) -> anyhow::Result<()> {
    let connections = if args.smoke {
        400
    } else {
        args.reuseport_connections
    };
    let cgroup = crate::cgroup::OwnCgroup::create(BENCH_CGROUP)?;
    let steered_group = start_group(bin, PORT_STEERED, Some(&cgroup.dir))?;
    let _empty_group = start_group(bin, PORT_EMPTY, None)?;
    let (_empty_prog, empty_id) = attach_empty(PORT_EMPTY)?;
    let _agent = ChildGuard::spawn(
        Command::new(bin.join("vigil"))
            .args([
                "agent",
                "--metrics-addr",
                METRICS_ADDR,
                "--actuation",
                "enforce",
                "--query-socket",
                QUERY_SOCKET,
            ])
            .args(["--act-on", &cgroup.selector()])
            .stderr(Stdio::null()),
    )?;
    let mut vigil_id = 0;
    wait_until("the agent's steering program", || {
        let Ok((_, body)) = query(Path::new(QUERY_SOCKET), "/v1/actuation") else {
            return false;
        };
        let view: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let id = view["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| {
                g["group"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(&format!(":{PORT_STEERED}")))
            })
            .and_then(|g| g["program_id"].as_u64());
        vigil_id = id.unwrap_or(0);
        id.is_some()
    })?;
    let ids = [vigil_id, empty_id];

    // Every member healthy: both programs leave the choice to the kernel's hash.
    let before = costs(&ids)?;
    let started = Instant::now();
    let answered = connect_many(&[PORT_STEERED, PORT_EMPTY], connections);
    let healthy_secs = started.elapsed().as_secs_f64();
    let after = costs(&ids)?;
    let delta = |i: usize, a: &[(u64, u64)], b: &[(u64, u64)]| {
        (a[i].0.saturating_sub(b[i].0), a[i].1.saturating_sub(b[i].1))
    };
    let (vigil_hashed, empty_hashed) = (delta(0, &after, &before), delta(1, &after, &before));

    // One worker of the enforced group stopped: every connection is steered.
    let stopped = nix::unistd::Pid::from_raw(steered_group[0].1 as i32);
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGSTOP)?;
    let steering = (|| -> anyhow::Result<_> {
        wait_until("steering away from the stopped worker", || {
            let _ = connect_many(&[PORT_STEERED], CLIENT_THREADS as u32 * 4);
            query(Path::new(QUERY_SOCKET), "/v1/actuation")
                .is_ok_and(|(_, body)| body.contains("\"takes_new_connections\":false"))
        })?;
        let before = costs(&ids)?;
        let answered = connect_many(&[PORT_STEERED], connections / 2);
        let after = costs(&ids)?;
        Ok((delta(0, &after, &before), answered))
    })();
    nix::sys::signal::kill(stopped, nix::sys::signal::Signal::SIGCONT)?;
    let (vigil_steered, steered_answered) = steering?;

    let per_run = |(runs, ns): (u64, u64)| ns.checked_div(runs).unwrap_or(0);
    let mut report = format!(
        "Command: `cargo xtask bench --reuseport-only --reuseport-connections {connections}`\n\
         Kernel: {}; {} CPUs.\n\n\
         Two SO_REUSEPORT groups of {WORKERS} vigil-origin processes on 127.0.0.1, new connections (each fetching a 1000-byte segment) alternating between them from {CLIENT_THREADS} threads: one group enforced by the agent (`vigil_reuseport`), the other with a program that only returns SK_PASS (`empty`: the floor, and the kernel's hash). A run is one new connection's SYN. Then one worker of the enforced group is stopped (SIGSTOP), so its program chooses a member for every connection (`bpf_sk_select_reuseport`).\n\n\
         Healthy phase: {connections} connections, {answered} answered, {healthy_secs:.1} s. Steering phase: {} connections to the enforced group, {steered_answered} answered.\n\n\
         | program | path | runs | ns per run |\n| --- | --- | ---: | ---: |\n",
        uname(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        connections / 2,
    );
    for (name, path, cost) in [
        (
            "vigil_reuseport",
            "every member healthy: kernel's hash",
            vigil_hashed,
        ),
        ("empty", "SK_PASS: kernel's hash", empty_hashed),
        (
            "vigil_reuseport",
            "one member stalled: steered",
            vigil_steered,
        ),
    ] {
        report.push_str(&format!(
            "| {name} | {path} | {} | {} |\n",
            cost.0,
            per_run(cost)
        ));
    }
    report.push_str(&format!(
        "\nvigil_reuseport above the empty program on the hashed path: {} ns per new connection.\n",
        per_run(vigil_hashed).saturating_sub(per_run(empty_hashed))
    ));
    print!("{SECTION}\n\n{report}");
    if args.write {
        write_section(SECTION, &report)?;
    }
    Ok(())
}
