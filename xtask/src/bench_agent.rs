//! The agent's own cost per traced HTTP message, apart from the kernel and
//! the testbed: `examples/trace_path` pushes trace records through the code
//! the agent runs on them (decode, join, owner and identity, trace index), in
//! wall time (median of a few runs) and, where valgrind is installed, in
//! instructions counted by callgrind (the same on every run of the same
//! binary, whatever else the machine does).

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{bail, Context};

/// Records per run: enough that start-up is noise, small enough for callgrind.
const RECORDS: u64 = 200_000;
const RUNS: usize = 3;

pub struct AgentCost {
    /// Built with optimizations (not so in smoke runs).
    release: bool,
    records: u64,
    ns_per_record: Vec<f64>,
    /// None: valgrind is not installed.
    instructions_per_record: Option<f64>,
}

/// Runs the harness; `bin` is the build's target directory (release or debug).
pub fn measure(bin: &Path, smoke: bool) -> anyhow::Result<AgentCost> {
    let harness = bin.join("examples").join("trace_path");
    let records = if smoke { RECORDS / 20 } else { RECORDS };
    let mut ns_per_record = Vec::new();
    for _ in 0..RUNS {
        let out = Command::new(&harness)
            .arg(records.to_string())
            .output()
            .with_context(|| format!("cannot run {}", harness.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                harness.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("trace_path JSON")?;
        ns_per_record.push(line["ns_per_record"].as_f64().context("ns_per_record")?);
    }
    let instructions_per_record = callgrind(&harness, records)?.map(|i| i as f64 / records as f64);
    Ok(AgentCost {
        release: !smoke,
        records,
        ns_per_record,
        instructions_per_record,
    })
}

/// Instructions executed inside the harness's measured function.
fn callgrind(harness: &Path, records: u64) -> anyhow::Result<Option<u64>> {
    if Command::new("valgrind").arg("--version").output().is_err() {
        return Ok(None);
    }
    let out_file = std::env::temp_dir().join(format!("vigil-callgrind-{}.out", std::process::id()));
    let status = Command::new("valgrind")
        .args(["--tool=callgrind", "--toggle-collect=trace_path::run"])
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(harness)
        .arg(records.to_string())
        .output()
        .context("cannot run valgrind")?;
    let text = std::fs::read_to_string(&out_file);
    let _ = std::fs::remove_file(&out_file);
    if !status.status.success() {
        bail!(
            "callgrind of {} failed: {}",
            harness.display(),
            String::from_utf8_lossy(&status.stderr)
        );
    }
    let text = text.context("callgrind wrote no profile")?;
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no instruction total in the callgrind profile")?;
    Ok(Some(total))
}

/// The section's part on the agent.
pub fn render(out: &mut String, cost: &AgentCost, requests_per_second: &[(&str, f64)]) {
    let _ = writeln!(out, "\n### Agent cost per traced message\n");
    let _ = writeln!(
        out,
        "`cargo run{} -p vigil --example trace_path -- {}`: {} trace records (a new \
         trace each, on 8 keep-alive sockets whose owner the kernel knows, in a Kubernetes \
         pod's cgroup) through the agent's code for them: decode, join with the socket, \
         identity, trace index. Wall time is the median of {} runs; instructions are callgrind's \
         count for the same run (deterministic). At capture on, each request is one record at \
         the origin and one at the client.\n",
        if cost.release { " --release" } else { "" },
        cost.records,
        cost.records,
        cost.ns_per_record.len()
    );
    let ns = crate::bench_capture::median(&cost.ns_per_record);
    let (lo, hi) = crate::bench_capture::min_max(&cost.ns_per_record);
    let instructions = cost
        .instructions_per_record
        .map_or("valgrind not installed".to_owned(), |i| format!("{i:.0}"));
    let _ = writeln!(
        out,
        "| records | ns per record | instructions per record |\n| ---: | ---: | ---: |\n| {} | {ns:.0} ({lo:.0}–{hi:.0}) | {instructions} |\n",
        cost.records
    );
    for (workload, rps) in requests_per_second {
        let _ = writeln!(
            out,
            "At the {workload} rate with capture on ({rps:.0} requests/s, 2 records each), that \
             is {:.1}% of one core.",
            100.0 * rps * 2.0 * ns * 1e-9
        );
    }
}
