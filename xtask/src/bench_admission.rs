//! Admission control under a threefold overload: goodput and admitted
//! latency without it and with each control law, in one run.
//!
//! The origin: four `vigil-origin` processes (one SO_REUSEPORT listener
//! each, 128 deep) in a cgroup the agent enforces, each serving 16
//! connections at once for 100 ms per request: a fixed capacity, measured
//! first with a closed loop. The unloaded p99 comes from an open loop at a
//! third of capacity; the SLO is twice it. Then, for each arm in turn and
//! for every round, an open loop of new connections at three times the
//! capacity, with the agent enforcing that arm's `--admission-law`
//! (`off`: steering only, nothing refused).

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use vigil_testbed::{
    connload::{self, ConnLoadConfig, ConnSummary},
    netns::{spawn_origin, ChildGuard},
    prom::query,
};

use crate::{
    bench::{uname, wait_until, write_section, BenchArgs, QUERY_SOCKET},
    cgroup::OwnCgroup,
};

const SECTION: &str = "## Admission control: a threefold overload of new connections";
const METRICS_ADDR: &str = "127.0.0.1:19468";
const PORT: u16 = 19421;
const WORKERS: usize = 4;
const SLOTS: &str = "16";
const SERVICE_MS: &str = "100";
const BACKLOG: &str = "128";
const BENCH_CGROUP: &str = "vigil-bench-admission";
const PATH: &str = "/live/bench/seg0.ts";
/// Clients of the capacity run: twice the origin's slots, so every slot is
/// busy and the queues hold at most as many again.
const CAPACITY_CLIENTS: usize = 128;
/// A connection not answered by then counts as timed out (a viewer gives up).
const TIMEOUT: Duration = Duration::from_secs(3);
const ARMS: [&str; 3] = ["off", "pie", "aimd"];

fn load(addr: SocketAddr, rate: u32, secs: f64) -> anyhow::Result<Vec<connload::ConnRecord>> {
    connload::run(&ConnLoadConfig {
        target: addr,
        rate,
        duration: Duration::from_secs_f64(secs),
        timeout: TIMEOUT,
        path: PATH.into(),
    })
}

/// One arm's overload run, summarised after the warm-up.
fn overload_arm(
    bin: &std::path::Path,
    cgroup: &OwnCgroup,
    law: &str,
    addr: SocketAddr,
    rate: u32,
    (secs, warmup): (f64, f64),
    slo: Duration,
) -> anyhow::Result<ConnSummary> {
    let agent = ChildGuard::spawn(
        Command::new(bin.join("vigil"))
            .args(["agent", "--metrics-addr", METRICS_ADDR])
            .args(["--query-socket", QUERY_SOCKET])
            .args(["--actuation", "enforce", "--act-on", &cgroup.selector()])
            .args(["--admission-law", law])
            .stderr(Stdio::null()),
    )?;
    wait_until("the agent's steering program", || {
        query(Path::new(QUERY_SOCKET), "/v1/actuation")
            .is_ok_and(|(_, body)| body.contains("\"enforced\""))
    })?;
    let records = load(addr, rate, secs)?;
    drop(agent);
    // Connections the origin still holds (up to its full queues, abandoned
    // by their clients) are done with before the next arm.
    thread::sleep(Duration::from_secs(3));
    Ok(ConnSummary::of(&records, warmup, secs, Some(slo)))
}

pub fn run(args: &BenchArgs, bin: &std::path::Path) -> anyhow::Result<()> {
    let (secs, warmup, rounds) = if args.smoke {
        (3.0, 1.0, 1)
    } else {
        (
            args.admission_secs.max(4) as f64,
            3.0,
            args.admission_rounds.max(1),
        )
    };
    let cgroup = OwnCgroup::create(BENCH_CGROUP)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let _workers: Vec<(ChildGuard, u32)> = (0..WORKERS)
        .map(|_| {
            let mut cmd = Command::new(bin.join("vigil-origin"));
            cmd.args(["--segment-bytes", "2000", "--slots-per-worker", SLOTS])
                .args(["--service-ms", SERVICE_MS, "--backlog", BACKLOG]);
            spawn_origin(&mut cgroup.command(&cmd), addr, 1, 3600)
        })
        .collect::<anyhow::Result<_>>()?;

    let capacity = connload::capacity(
        addr,
        CAPACITY_CLIENTS,
        Duration::from_secs_f64(secs.min(5.0)),
        PATH,
    )?;
    let unloaded_rate = (capacity / 3.0).round().max(1.0) as u32;
    let unloaded = ConnSummary::of(&load(addr, unloaded_rate, secs)?, warmup, secs, None);
    let unloaded_p99 = unloaded.answered_p99_ms.unwrap_or(0.0);
    let slo = Duration::from_secs_f64(2.0 * unloaded_p99 / 1000.0);
    let overload_rate = (3.0 * capacity).round() as u32;

    let mut rows = Vec::new();
    for round in 1..=rounds {
        // Each round starts with another arm: none always follows another.
        let start = (round as usize - 1) % ARMS.len();
        for law in ARMS.iter().cycle().skip(start).take(ARMS.len()) {
            let s = overload_arm(bin, &cgroup, law, addr, overload_rate, (secs, warmup), slo)?;
            eprintln!("bench: admission round {round} {law}: {s:?}");
            rows.push((round, *law, s));
        }
    }

    let mut report = format!(
        "Command: `cargo xtask bench --admission-only --admission-secs {secs:.0} --admission-rounds {rounds}`\n\
         Kernel: {}; {} CPUs.\n\n\
         {WORKERS} vigil-origin processes (one SO_REUSEPORT listener each, backlog {BACKLOG}) in a cgroup the agent enforces; each serves {SLOTS} connections at once, {SERVICE_MS} ms per request (`Connection: close`, a 2000-byte segment). Load: vigil-connload, an open loop of new connections on 127.0.0.1 on a fixed schedule; latency counts from each connection's scheduled start; a connection not answered within {} s is abandoned.\n\n\
         Capacity (closed loop, {CAPACITY_CLIENTS} clients): {capacity:.0} connections/s. Unloaded ({unloaded_rate}/s): p50 {:.1} ms, p99 {unloaded_p99:.1} ms, so the SLO is {:.0} ms (2x the unloaded p99).\n\n\
         Overload: {overload_rate} new connections/s (3x capacity) for {secs:.0} s per run, the agent (defaults: queue-delay target 10 ms, poll 100 ms, floor 0.1, step 0.1) enforcing each `--admission-law` in turn (`off`: steering only, nothing refused), {rounds} round(s), each starting with another arm; the table summarises each run after its first {warmup:.0} s (the onset). Goodput: answered within the SLO, per second, and as a share of capacity. Admitted latency: of the answered connections.\n\n\
         | round | law | offered/s | answered/s | refused | timed out | goodput/s | goodput / capacity | admitted p50 ms | admitted p99 ms | p99 / unloaded p99 |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        uname(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        TIMEOUT.as_secs(),
        unloaded.answered_p50_ms.unwrap_or(0.0),
        slo.as_secs_f64() * 1000.0,
    );
    for (round, law, s) in &rows {
        let per_sec = |n: u64| n as f64 / s.seconds;
        let share = |n: u64| 100.0 * n as f64 / s.offered.max(1) as f64;
        let goodput = s.goodput().unwrap_or(0.0);
        let p99 = s.answered_p99_ms.unwrap_or(0.0);
        report.push_str(&format!(
            "| {round} | {law} | {:.0} | {:.0} | {:.1}% | {:.1}% | {goodput:.0} | {:.0}% | {:.0} | {p99:.0} | {:.2} |\n",
            per_sec(s.offered),
            per_sec(s.answered),
            share(s.refused),
            share(s.timed_out),
            100.0 * goodput / capacity.max(f64::EPSILON),
            s.answered_p50_ms.unwrap_or(0.0),
            p99 / unloaded_p99.max(f64::EPSILON),
        ));
    }
    print!("{SECTION}\n\n{report}");
    if args.write {
        write_section(SECTION, &report)?;
    }
    Ok(())
}
