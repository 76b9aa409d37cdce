//! The pool controllers side by side on one episode: an upstream whose link
//! turns lossy, then recovers, with the testbed origin sizing its pool from
//! the agent's targets under `--pool-controller classic` and `kernel`
//! (vigil_testbed::pool_episode, the episode the integration test runs).

use std::{path::Path, thread, time::Duration};

use vigil_testbed::pool_episode::{self, Episode, EpisodeConfig};

use crate::{
    bench::{uname, write_section, BenchArgs},
    cgroup::OwnCgroup,
};

const SECTION: &str = "## Pool controllers: classic rules vs kernel-informed on a lossy upstream";
const BENCH_CGROUP: &str = "vigil-bench-pools";
const LINK_INDEX: u8 = 91;
const RATE: u32 = 100;
const LAWS: [&str; 2] = ["classic", "kernel"];

fn ms(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn p99(e: &Episode, from: Duration, to: Duration) -> String {
    e.summary(from, to)
        .answered_p99_ms
        .map_or("-".into(), |p| format!("{p:.0}"))
}

pub fn run(args: &BenchArgs, bin: &Path) -> anyhow::Result<()> {
    let cgroup = OwnCgroup::create(BENCH_CGROUP)?;
    let (baseline, lossy, recovery) = if args.smoke {
        (2, 3, 4)
    } else {
        (10, args.pool_lossy_secs, 30)
    };
    let socket =
        std::env::temp_dir().join(format!("vigil-bench-pools-{}.sock", std::process::id()));
    let mut rows = Vec::new();
    for round in 1..=args.pool_rounds {
        for law in LAWS {
            let e = pool_episode::run(&EpisodeConfig {
                agent_bin: bin.join("vigil"),
                origin_bin: bin.join("vigil-origin"),
                law: law.into(),
                cgroup_procs: cgroup.dir.join("cgroup.procs"),
                selector: cgroup.selector(),
                link_tag: "benchpool".into(),
                link_index: LINK_INDEX,
                socket: socket.clone(),
                rate: RATE,
                loss_percent: args.loss_percent,
                baseline: Duration::from_secs(baseline),
                lossy: Duration::from_secs(lossy),
                recovery: Duration::from_secs(recovery),
            })?;
            eprintln!(
                "bench: pools round {round} {law}: {} changes, {} upstream opens",
                e.changes(),
                e.upstream_opens
            );
            rows.push((round, law, e));
        }
    }
    let mut report = format!(
        "Command: `cargo xtask bench --pools-only --pool-rounds {} --pool-lossy-secs {lossy} --loss-percent {}`\n\
         Kernel: {}; {} CPUs.\n\n\
         An upstream vigil-origin (64 KiB segments, 20 ms of work per request) in one network namespace; in the other, the fronting vigil-origin relaying `/upstream/...` through a keep-alive pool (initially max idle 4, max open 8; bounds 2..64 and 4..128), registered with the agent's control API and applying its binding targets; viewers: an open loop of {RATE} new connections/s to the fronting origin. Episode: {baseline} s calm, {lossy} s with {}% of packets dropped in each direction on the upstream link, {recovery} s recovered. Control period 1 s. Growth and shrink: from the onset (recovery) to the first applied target that moved max idle. Upstream connections opened: the upstream namespace's Tcp PassiveOpens over the episode (the pool's churn).\n\n\
         | round | controller | grew after onset | shrank after recovery | peak max idle | target changes | upstream connections opened | viewer p99 ms calm | lossy | recovered |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        args.pool_rounds,
        args.loss_percent,
        uname(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        args.loss_percent,
    );
    for (round, law, e) in &rows {
        let grew = e.first_change_after(e.onset, true).map(|a| a.at - e.onset);
        let shrank = e
            .first_change_after(e.recovery, false)
            .map(|a| a.at - e.recovery);
        let peak = e
            .applied
            .iter()
            .map(|a| a.max_idle)
            .max()
            .unwrap_or(pool_episode::INITIAL_IDLE);
        let end = e.recovery + Duration::from_secs(recovery);
        report.push_str(&format!(
            "| {round} | {law} | {} | {} | {peak} | {} | {} | {} | {} | {} |\n",
            ms(grew),
            ms(shrank),
            e.changes(),
            e.upstream_opens,
            p99(e, Duration::ZERO, e.onset),
            p99(e, e.onset, e.recovery),
            p99(e, e.recovery, end),
        ));
    }
    print!("{SECTION}\n\n{report}");
    if args.write {
        write_section(SECTION, &report)?;
    }
    Ok(())
}
