//! Throughput with and without something, switched every half second inside
//! one saturated run. Runs made one after the other (agent restarted
//! between them) differ by more than capture costs on two shared vCPUs: the
//! machine's pace drifts over seconds, so two runs of the same mode differ
//! by 10%. Here the load generator runs throughout (held only around a slow
//! switch, see `Switching`), the thing measured is switched on and off in
//! ABBA blocks (drift within a block cancels), and each interval's
//! throughput is the bytes the origin's veth sent in it.
//! Every block gives one drop; their mean, with a 95% interval, is the result.

use std::{
    fmt::Write as _,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// Length of one interval, and the part of it that is not measured: what
/// was queued before the switch drains in it.
pub const INTERVAL: Duration = Duration::from_millis(500);
const SETTLE: Duration = Duration::from_millis(100);

/// Bytes sent so far by interface `dev` in process `pid`'s network namespace.
fn sent_bytes(pid: u32, dev: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/net/dev");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| {
            let (name, counters) = l.split_once(':')?;
            // Receive: 8 fields, then transmit bytes.
            (name.trim() == dev).then(|| counters.split_whitespace().nth(8)?.parse().ok())?
        })
        .with_context(|| format!("no transmit counter for {dev} in {path}"))
}

/// Per-block drops (fractions) of throughput with the thing on against off.
pub struct Drops {
    pub blocks: Vec<f64>,
}

impl Drops {
    pub fn mean(&self) -> f64 {
        self.blocks.iter().sum::<f64>() / self.blocks.len().max(1) as f64
    }

    /// Half-width of the 95% interval of the mean (normal approximation;
    /// NaN below two blocks).
    pub fn half_width(&self) -> f64 {
        let n = self.blocks.len() as f64;
        if n < 2.0 {
            return f64::NAN;
        }
        let m = self.mean();
        let var = self.blocks.iter().map(|d| (d - m) * (d - m)).sum::<f64>() / (n - 1.0);
        1.96 * (var / n).sqrt()
    }
}

/// Where the throughput is read, and what keeps the load flowing.
pub struct Traffic<'a> {
    /// A process in the server namespace (the origin), and that namespace's
    /// end of the veth pair.
    pub server_pid: u32,
    pub server_if: &'a str,
    /// The load generator, not yet started; it must run longer than
    /// `blocks` blocks and the warm-up with their switching (it is told to
    /// stop after the last block).
    pub loadgen: std::process::Command,
}

/// How the measured thing is switched.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Switching {
    /// Under load: for a switch that takes no time (a map write).
    UnderLoad,
    /// With the load generator stopped (SIGSTOP) around every switch, whether
    /// or not the state changes, so every interval starts the same way: for a
    /// switch the load would slow by seconds (restarting the agent: removing
    /// a tracepoint program waits for RCU grace periods, 17 s seen under the
    /// 1 MiB load, 0.3 s without).
    LoadHeld,
}

/// Runs `blocks` ABBA blocks of `INTERVAL`s, calling `switch(true)` /
/// `switch(false)` before each; leaves the switch off. Fails if the load
/// generator stops early or any request failed.
pub fn measure(
    mut traffic: Traffic<'_>,
    blocks: u32,
    switching: Switching,
    mut switch: impl FnMut(bool) -> anyhow::Result<()>,
) -> anyhow::Result<Drops> {
    switch(false)?;
    let mut loadgen = traffic
        .loadgen
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start vigil-loadgen")?;
    let loadgen_pid = i32::try_from(loadgen.id()).context("vigil-loadgen pid")?;
    // SAFETY: plain signals to our own child, not yet waited for.
    let signal = |sig: i32| unsafe { libc::kill(loadgen_pid, sig) };
    let held = switching == Switching::LoadHeld;
    // Resumes the load even when the switch fails, so it can stop cleanly.
    let mut switch_held = |state: bool| -> anyhow::Result<()> {
        if !held {
            return switch(state);
        }
        signal(libc::SIGSTOP);
        let r = switch(state);
        signal(libc::SIGCONT);
        r
    };
    let result = (|| {
        thread::sleep(INTERVAL * 2);
        let mut drops = Vec::with_capacity(blocks as usize);
        for b in 0..blocks {
            // ABBA, then BAAB: which state goes first alternates too.
            let order = if b % 2 == 0 {
                [true, false, false, true]
            } else {
                [false, true, true, false]
            };
            let (mut on, mut off) = (0.0, 0.0);
            for state in order {
                switch_held(state)?;
                thread::sleep(SETTLE);
                let (t0, b0) = (
                    Instant::now(),
                    sent_bytes(traffic.server_pid, traffic.server_if)?,
                );
                thread::sleep(INTERVAL - SETTLE);
                let b1 = sent_bytes(traffic.server_pid, traffic.server_if)?;
                let rate = b1.saturating_sub(b0) as f64 / t0.elapsed().as_secs_f64();
                if state {
                    on += rate;
                } else {
                    off += rate;
                }
            }
            if off <= 0.0 {
                bail!("no traffic in block {} with the switch off", b + 1);
            }
            if let Ok(Some(status)) = loadgen.try_wait() {
                bail!("vigil-loadgen ended during block {} ({status})", b + 1);
            }
            drops.push(1.0 - on / off);
        }
        Ok(Drops { blocks: drops })
    })();
    let switched_off = switch_held(false);
    // Done (or failed): the load generator stops at its next request and
    // prints its summary.
    signal(libc::SIGTERM);
    let out = loadgen
        .wait_with_output()
        .context("waiting for vigil-loadgen")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: anyhow::Result<serde_json::Value> = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("vigil-loadgen printed no JSON summary")
        .and_then(|l| serde_json::from_str(l).context("vigil-loadgen JSON"));
    // What the load generator saw explains a stall (an early end, failures).
    let tally = |s: &serde_json::Value| {
        format!(
            "vigil-loadgen: {} ok, {} failed, {} interrupted, {} connections failed, ran {} ms",
            s["requests_ok"],
            s["requests_failed"],
            s["requests_interrupted"],
            s["connections_failed"],
            s["elapsed_ms"]
        )
    };
    let drops = match (result, &summary) {
        (Ok(d), _) => d,
        (Err(e), Ok(s)) => return Err(e.context(tally(s))),
        (Err(e), Err(_)) => return Err(e),
    };
    switched_off?;
    let summary = summary?;
    match summary["requests_failed"].as_u64() {
        Some(0) => Ok(drops),
        Some(n) => bail!("{n} requests failed during the interleaved run"),
        None => bail!("vigil-loadgen JSON has no requests_failed"),
    }
}

/// One workload's interleaved result in one capture mode.
pub struct Row {
    pub workload: &'static str,
    pub capture: &'static str,
    pub blocks: u32,
    pub on_vs_off: Drops,
}

fn cell(d: &Drops) -> String {
    format!("{:.1}% ± {:.1}", 100.0 * d.mean(), 100.0 * d.half_width())
}

/// `paused`: the agent's capture programs running against paused;
/// `restarted`: the agent with capture on against the agent with capture
/// off, no capture program loaded.
pub fn render(out: &mut String, paused: &[Row], restarted: &[Row]) {
    let _ = writeln!(out, "\n### Throughput, capture on vs off, interleaved\n");
    let _ = writeln!(
        out,
        "One saturated run per workload and measure, its state switched every {} ms in ABBA \
         blocks (alternating which state leads). An interval's throughput is the bytes the \
         origin's veth sent in it after the first {} ms (what was queued before the switch \
         drains there). Each block gives one drop, 1 − (on + on) / (off + off); the tables \
         have their mean ± the half-width of its 95% interval.\n",
        INTERVAL.as_millis(),
        SETTLE.as_millis()
    );
    let _ = writeln!(
        out,
        "**Capture on vs off**, as an operator has them: off is the agent running with both \
         capture hooks disabled, no capture program loaded. The agent is restarted at each \
         switch, with the load generator stopped (SIGSTOP) around every switch, in both \
         states alike: removing a tracepoint program waits for RCU grace periods, seconds \
         under load. Each new agent gets 500 ms, load stopped, for its start-up work before \
         the load resumes. Workloads other than the testbed's default get a quarter of the \
         blocks.\n"
    );
    table(out, restarted, "capture on vs off");
    let _ = writeln!(
        out,
        "\n**Where it goes: capture on vs paused.** One agent in that capture mode \
         throughout, its capture programs paused and resumed through `VIGIL_PAUSE` under \
         load (paused, a program returns at its first instructions): the work the programs \
         and the agent do, without what the kernel spends calling a program on the hooks. \
         The difference between the two tables is that call's cost.\n"
    );
    table(out, paused, "capture on vs paused");
    let _ = writeln!(
        out,
        "\nTarget for capture on vs off: under 3%. A negative drop means the runs with it \
         were faster: noise."
    );
}

fn table(out: &mut String, rows: &[Row], measure: &str) {
    let _ = writeln!(out, "| workload | capture | blocks | {measure} |");
    let _ = writeln!(out, "| --- | --- | ---: | ---: |");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            r.workload,
            r.capture,
            r.blocks,
            cell(&r.on_vs_off)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_of_the_mean_narrows_with_blocks_and_is_zero_without_spread() {
        let flat = Drops {
            blocks: vec![0.02; 10],
        };
        assert!((flat.mean() - 0.02).abs() < 1e-12);
        assert!(flat.half_width().abs() < 1e-12);
        let few = Drops {
            blocks: vec![0.0, 0.04],
        };
        let many = Drops {
            blocks: [0.0, 0.04].repeat(8),
        };
        assert!((few.mean() - 0.02).abs() < 1e-12);
        assert!(many.half_width() < few.half_width() / 2.0);
        assert!(Drops { blocks: vec![0.1] }.half_width().is_nan());
    }

    #[test]
    fn reads_the_transmit_bytes_of_one_interface() -> anyhow::Result<()> {
        // This process's own namespace always has lo.
        let sent = sent_bytes(std::process::id(), "lo")?;
        let again = sent_bytes(std::process::id(), "lo")?;
        assert!(again >= sent);
        assert!(sent_bytes(std::process::id(), "no-such-if").is_err());
        Ok(())
    }
}
