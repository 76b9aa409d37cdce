//! CPU per request at a fixed request rate, beside the interleaved
//! throughput runs: the same traffic paced at half of what the testbed can carry, and
//! the whole machine's busy CPU time over it. Saturated throughput on two
//! shared vCPUs swings with scheduling luck; below saturation the work per
//! request is what changes, and /proc/stat counts all of it (programs, hook
//! machinery, agent, softirq). When the CPU is what limits an origin, its
//! throughput falls by 1 - (CPU per request off) / (CPU per request on).

use std::fmt::Write as _;

use anyhow::Context;

/// Busy CPU seconds of the whole machine so far: user, nice, system, irq and
/// softirq (idle, iowait and steal are not this machine's work).
pub fn machine_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().context("/proc/stat value"))
        .collect::<anyhow::Result<_>>()?;
    let field = |i: usize| ticks.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    anyhow::ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(busy as f64 / hz as f64)
}

/// One paced run: requests completed, the machine's busy CPU seconds and
/// the agent's share of them.
#[derive(Clone, Copy)]
pub struct PacedRun {
    pub requests: u64,
    pub busy_secs: f64,
    pub agent_secs: f64,
}

impl PacedRun {
    pub fn us_per_request(&self) -> f64 {
        1e6 * self.busy_secs / self.requests.max(1) as f64
    }

    pub fn agent_us_per_request(&self) -> f64 {
        1e6 * self.agent_secs / self.requests.max(1) as f64
    }
}

/// One workload's paced runs: its rate, and the runs per mode (labels and
/// runs in the same order, off among them).
pub struct PacedWorkload<'a> {
    pub label: &'a str,
    pub rate: u32,
    pub modes: Vec<(&'a str, Vec<PacedRun>)>,
}

pub fn render(out: &mut String, secs: f64, workloads: &[PacedWorkload<'_>], off: &str) {
    let _ = writeln!(out, "\n### CPU per request at a fixed rate\n");
    let _ = writeln!(
        out,
        "In each round and mode, the same traffic paced at half the \
         rate the testbed carried with capture on (`vigil-loadgen --rate`, {secs:.0} s), and the \
         machine's busy CPU time over it (/proc/stat: user, system, irq, softirq of both CPUs), \
         per completed request. Below saturation, scheduling luck does not change how much \
         gets done, only what each request costs: programs, hook machinery, agent, everything. \
         Increase against off: of the medians, and per round (median, min … max); for a \
         CPU-bound origin the throughput drop is increase / (1 + increase). Each mode runs \
         with its own agent, seconds to minutes apart from the others: drift of the machine's \
         pace between them shows here as it does not in the interleaved runs above.\n"
    );
    let _ = writeln!(
        out,
        "| workload | rate, requests/s | capture | CPU µs per request | increase of medians | increase per round | agent µs per request |"
    );
    let _ = writeln!(out, "| --- | ---: | --- | ---: | ---: | ---: | ---: |");
    for w in workloads {
        let Some((_, off_runs)) = w.modes.iter().find(|(m, _)| *m == off) else {
            continue;
        };
        let off_us: Vec<f64> = off_runs.iter().map(PacedRun::us_per_request).collect();
        for (mode, runs) in &w.modes {
            let us: Vec<f64> = runs.iter().map(PacedRun::us_per_request).collect();
            let (lo, hi) = crate::bench_capture::min_max(&us);
            let m = crate::bench_capture::median(&us);
            // Two cells: of the medians, per round (empty for off itself).
            let increase = if *mode == off {
                " | ".to_owned()
            } else {
                let per_round: Vec<f64> = us
                    .iter()
                    .zip(&off_us)
                    .map(|(a, b)| 100.0 * (a / b - 1.0))
                    .collect();
                let (plo, phi) = crate::bench_capture::min_max(&per_round);
                format!(
                    "{:.1}% | {:.1}% ({plo:.1}% … {phi:.1}%)",
                    100.0 * (m / crate::bench_capture::median(&off_us) - 1.0),
                    crate::bench_capture::median(&per_round)
                )
            };
            let agent: Vec<f64> = runs.iter().map(PacedRun::agent_us_per_request).collect();
            let _ = writeln!(
                out,
                "| {} | {} | {mode} | {m:.1} ({lo:.1}–{hi:.1}) | {increase} | {:.2} |",
                w.label,
                w.rate,
                crate::bench_capture::median(&agent)
            );
        }
    }
}
