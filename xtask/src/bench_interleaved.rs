//! Throughput with and without something, switched every half second inside
//! one saturated run. Runs made one after the other (agent restarted
//! between them) differ by more than capture costs on two shared vCPUs: the
//! machine's pace drifts over seconds, so two runs of the same mode differ
//! by 10%. Here the load generator runs without a pause, the thing measured
//! is switched on and off in ABBA blocks (drift within a block cancels), and
//! each interval's throughput is the bytes the origin's veth sent in it.
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

/// Runs `blocks` ABBA blocks of `INTERVAL`s, calling `switch(true)` /
/// `switch(false)` before each; leaves the switch off. Fails if the load
/// generator stops early or any request failed.
pub fn measure(
    mut traffic: Traffic<'_>,
    blocks: u32,
    mut switch: impl FnMut(bool) -> anyhow::Result<()>,
) -> anyhow::Result<Drops> {
    switch(false)?;
    let mut loadgen = traffic
        .loadgen
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start vigil-loadgen")?;
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
                switch(state)?;
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
    let switched_off = switch(false);
    // Done (or failed): the load generator stops at its next request and
    // prints its summary.
    if let Ok(pid) = i32::try_from(loadgen.id()) {
        // SAFETY: a plain signal to our own child, not yet waited for.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
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
    pub on_vs_off: Drops,
}

/// What the off state still costs, per workload: empty programs where the
/// capture programs run (paused), against none.
pub struct Floor {
    pub workload: &'static str,
    pub blocks: u32,
    pub empty_vs_none: Drops,
}

fn cell(mean: f64, half: f64) -> String {
    format!("{:.1}% ± {:.1}", 100.0 * mean, 100.0 * half)
}

pub fn render(out: &mut String, rows: &[Row], floors: &[Floor], blocks: u32) {
    let _ = writeln!(out, "\n### Throughput, capture on vs off, interleaved\n");
    let _ = writeln!(
        out,
        "One saturated run per workload and measure; the load generator never pauses while \
         the measured thing is switched every {} ms in ABBA blocks ({blocks} blocks, \
         alternating which state leads). An interval's throughput is the bytes the origin's \
         veth sent in it after the first {} ms (what was queued before the switch drains \
         there). Each block gives one drop, 1 − (on + on) / (off + off); the table has their \
         mean ± the half-width of its 95% interval. Capture on vs off: the agent runs in that \
         capture mode throughout, and its capture programs are paused and resumed through \
         `VIGIL_PAUSE` (tracepoint links can be detached only by their owner; paused, a \
         program returns at its first instructions).\n",
        INTERVAL.as_millis(),
        SETTLE.as_millis()
    );
    let _ = writeln!(out, "| workload | capture | capture on vs off (paused) |");
    let _ = writeln!(out, "| --- | --- | ---: |");
    for r in rows {
        let c = &r.on_vs_off;
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            r.workload,
            r.capture,
            cell(c.mean(), c.half_width())
        );
    }
    let _ = writeln!(
        out,
        "\nWhat the off state still costs: the agent with capture off, and programs that do \
         nothing attached to both tracepoints and detached again (each attach waits for the \
         kernel to patch and synchronize every CPU, seconds under load, so workloads other \
         than the testbed's default get fewer blocks; the same in every capture mode, as a \
         tracepoint program runs for every socket of the node). Capture against no capture \
         at all is about the sum of the two.\n"
    );
    let _ = writeln!(out, "| workload | blocks | empty programs vs none |");
    let _ = writeln!(out, "| --- | ---: | ---: |");
    for f in floors {
        let d = &f.empty_vs_none;
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            f.workload,
            f.blocks,
            cell(d.mean(), d.half_width())
        );
    }
    let _ = writeln!(
        out,
        "\nTarget for capture on vs off: under 3%. A negative drop means the runs with it \
         were faster: noise."
    );
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
