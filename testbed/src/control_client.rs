//! The origin as a client of Vigil's control API: registers its pool,
//! listeners and concurrency limit, reports each control period's load, and
//! applies the targets it is given, printing one line per target to stdout.
//!
//! Fail-safe like any service should be: while the agent is unreachable the
//! origin serves with its current settings and registers again later.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::Context;
use vigil_control::v1::{
    Bounds, LoadReport, Mode, Pool, PoolLoad, PoolTarget, RegisterRequest, Targets,
};
use vigil_control::Session;

use crate::origin::{OriginHandle, MAX_WORKERS};

/// Registration attempts back off from the first to the second, doubling.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// A registration that takes longer (agent hung) counts as failed.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Control periods outside these are clamped (a zero period would spin).
const MIN_PERIOD: Duration = Duration::from_millis(50);
const MAX_PERIOD: Duration = Duration::from_secs(60);
/// How often the session looks at the origin's stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// listen(2) backlogs a target may set (the kernel caps it at somaxconn).
const MAX_BACKLOG: u32 = 65_535;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// The pool's name in the registration, its reports and its targets.
    pub pool_name: String,
    pub idle_bounds: Bounds,
    pub open_bounds: Bounds,
    pub listener_bounds: Bounds,
    pub concurrency_bounds: Bounds,
    /// Apply ADVISORY targets too (BINDING ones always are).
    pub apply_advice: bool,
}

/// Parses `MIN:MAX` (inclusive, MIN <= MAX), as the `--*-bounds` flags take it.
pub fn parse_bounds(s: &str) -> Result<Bounds, String> {
    let (min, max) = s
        .split_once(':')
        .ok_or_else(|| format!("expected MIN:MAX, got {s:?}"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|e| format!("{v:?} in {s:?}: {e}"))
    };
    let (min, max) = (parse(min)?, parse(max)?);
    if min > max {
        return Err(format!("MIN {min} above MAX {max}"));
    }
    Ok(Bounds { min, max })
}

/// Pool names the API accepts: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_pool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Runs the session on its own thread (a current-thread tokio runtime) until
/// `stop` is set.
pub fn spawn(
    cfg: ControlConfig,
    origin: OriginHandle,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the control client's runtime")?;
    thread::Builder::new()
        .name("control".into())
        .spawn(move || runtime.block_on(run(&cfg, &origin, &stop)))
        .context("spawning the control client thread")
}

async fn run(cfg: &ControlConfig, origin: &OriginHandle, stop: &AtomicBool) {
    let mut backoff = RETRY_MIN;
    while !stop.load(Ordering::SeqCst) {
        let start = Session::start(&cfg.socket, register_request(cfg, origin));
        match tokio::time::timeout(REGISTER_TIMEOUT, start).await {
            Ok(Ok(session)) => {
                backoff = RETRY_MIN;
                tracing::info!(
                    registration = %session.registration.registration,
                    workload = %session.registration.workload,
                    control_period_ms = session.registration.control_period_ms,
                    "registered with the Vigil agent"
                );
                follow(cfg, origin, &session, stop).await;
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(
                    retry_in_ms = backoff.as_millis(),
                    "session with the Vigil agent ended; keeping the current settings"
                );
            }
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                retry_in_ms = backoff.as_millis(),
                "cannot register with the Vigil agent; serving with the current settings"
            ),
            Err(_) => tracing::warn!(
                timeout_ms = REGISTER_TIMEOUT.as_millis(),
                retry_in_ms = backoff.as_millis(),
                "the Vigil agent did not answer the registration; serving with the current settings"
            ),
        }
        sleep_unless_stopped(backoff, stop).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

async fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let deadline = tokio::time::Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(STOP_POLL.min(deadline - tokio::time::Instant::now())).await;
    }
}

/// Reports every period and applies targets until the session or the origin ends.
async fn follow(cfg: &ControlConfig, origin: &OriginHandle, session: &Session, stop: &AtomicBool) {
    let period = Duration::from_millis(u64::from(session.registration.control_period_ms))
        .clamp(MIN_PERIOD, MAX_PERIOD);
    // The first report covers one period, not the time before registering.
    let _ = load_report(cfg, origin);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(STOP_POLL);
    let mut targets = session.targets();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !session.report(load_report(cfg, origin)) {
                    tracing::debug!("load report dropped (agent slow or gone)");
                }
            }
            changed = targets.changed() => {
                if changed.is_err() {
                    return;
                }
                let latest = targets.borrow_and_update().clone();
                if let Some(t) = latest {
                    apply(cfg, origin, &t, session.registration.mode);
                }
            }
            _ = poll.tick() => {
                if stop.load(Ordering::SeqCst) || !session.is_alive() {
                    return;
                }
            }
        }
    }
}

fn register_request(cfg: &ControlConfig, origin: &OriginHandle) -> RegisterRequest {
    let pools = origin
        .pool()
        .map(|p| {
            let (max_idle, max_open) = p.limits();
            Pool {
                name: cfg.pool_name.clone(),
                upstream: p.upstream().to_string(),
                max_idle,
                max_open,
                idle_bounds: Some(cfg.idle_bounds),
                open_bounds: Some(cfg.open_bounds),
            }
        })
        .into_iter()
        .collect();
    RegisterRequest {
        pools,
        listeners: u32::try_from(origin.listeners()).unwrap_or(u32::MAX),
        listener_bounds: Some(cfg.listener_bounds),
        concurrency_limit: origin.concurrency_limit(),
        concurrency_bounds: Some(cfg.concurrency_bounds),
        serving_port: u32::from(origin.local_addr().port()),
        listen_backlog: u32::try_from(origin.listen_backlog()).unwrap_or(0),
    }
}

/// The period's report; taking it starts the next period.
fn load_report(cfg: &ControlConfig, origin: &OriginHandle) -> LoadReport {
    let load = origin.take_period();
    let pools = origin
        .pool()
        .map(|p| {
            let s = p.take_period();
            PoolLoad {
                pool: cfg.pool_name.clone(),
                in_use: s.in_use,
                idle: s.idle,
                wait_mean_ms: s.wait_mean_ms,
                wait_p99_ms: s.wait_p99_ms,
                requests: s.requests,
                errors: s.errors,
                opened: s.opened,
                closed: s.closed,
                hold_mean_ms: s.hold_mean_ms,
            }
        })
        .into_iter()
        .collect();
    LoadReport {
        // Session stamps the registration.
        registration: String::new(),
        pools,
        in_flight: load.in_flight,
        latency_p50_ms: load.latency_p50_ms,
        latency_p99_ms: load.latency_p99_ms,
        requests: load.requests,
    }
}

/// Applies what `targets` asks (BINDING, or ADVISORY with `apply_advice`)
/// and prints one line per target field.
fn apply(cfg: &ControlConfig, origin: &OriginHandle, targets: &Targets, registered_mode: i32) {
    let mode = match Mode::try_from(targets.mode) {
        Ok(Mode::Unspecified) | Err(_) => {
            Mode::try_from(registered_mode).unwrap_or(Mode::Unspecified)
        }
        Ok(m) => m,
    };
    let follow = mode == Mode::Binding || cfg.apply_advice;
    let print = |applied: bool, fields: String, reason: &str| {
        let mode = match mode {
            Mode::Binding => "binding",
            Mode::Advisory => "advisory",
            Mode::Unspecified => "unspecified",
        };
        print_line(&format!(
            "vigil-origin target generation={} mode={mode} applied={applied} {fields} reason={reason:?}",
            targets.generation
        ));
    };
    for p in &targets.pools {
        let (applied, idle, open) = apply_pool(cfg, origin, follow, p);
        let fields = format!("pool={} max_idle={idle} max_open={open}", p.pool);
        print(applied, fields, &p.reason);
    }
    if let Some(t) = &targets.listeners {
        let n = clamp(t.value, cfg.listener_bounds).clamp(1, MAX_WORKERS as u32);
        let applied = follow
            && cfg.listener_bounds.max > 0
            && match origin.set_listeners(n as usize) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, listeners = n, "cannot apply the listener target");
                    false
                }
            };
        let shown = if applied { n } else { t.value };
        print(applied, format!("listeners={shown}"), &t.reason);
    }
    if let Some(t) = &targets.concurrency_limit {
        let applied = follow && cfg.concurrency_bounds.max > 0;
        let limit = clamp(t.value, cfg.concurrency_bounds);
        if applied {
            origin.set_concurrency_limit(limit);
        }
        let shown = if applied { limit } else { t.value };
        print(applied, format!("concurrency_limit={shown}"), &t.reason);
    }
    if let Some(t) = &targets.listen_backlog {
        let backlog = t.value.clamp(1, MAX_BACKLOG);
        if follow {
            origin.set_listen_backlog(i32::try_from(backlog).unwrap_or(i32::MAX));
        }
        let shown = if follow { backlog } else { t.value };
        print(follow, format!("listen_backlog={shown}"), &t.reason);
    }
}

/// Resizes our pool if the target names it; returns whether it was applied
/// and the limits to print (those now in force when applied, else the target's).
fn apply_pool(
    cfg: &ControlConfig,
    origin: &OriginHandle,
    follow: bool,
    target: &PoolTarget,
) -> (bool, u32, u32) {
    let ours = origin.pool().filter(|_| target.pool == cfg.pool_name);
    let Some(pool) = ours.filter(|_| follow) else {
        if ours.is_none() {
            tracing::warn!(pool = %target.pool, "target for a pool this origin does not have");
        }
        return (false, target.max_idle, target.max_open);
    };
    let (idle_now, open_now) = pool.limits();
    // Bounds with max 0 and a max_open of 0 mean "no advice": keep ours.
    let idle = if cfg.idle_bounds.max == 0 {
        idle_now
    } else {
        clamp(target.max_idle, cfg.idle_bounds)
    };
    let open = if target.max_open == 0 || cfg.open_bounds.max == 0 {
        open_now
    } else {
        clamp(target.max_open, cfg.open_bounds)
    };
    pool.resize(idle, open);
    (true, idle, open)
}

/// Never panics, even on bounds with min above max (max wins).
fn clamp(v: u32, b: Bounds) -> u32 {
    v.max(b.min).min(b.max)
}

/// One line to stdout, flushed at once (tests read it from a pipe); a
/// closed stdout must not take the origin down.
fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bounds() {
        assert_eq!(parse_bounds("1:16"), Ok(Bounds { min: 1, max: 16 }));
        assert_eq!(parse_bounds("0:0"), Ok(Bounds { min: 0, max: 0 }));
        for bad in ["", "3", "4:3", "-1:2", "1:x", "1:2:3"] {
            assert!(parse_bounds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_names() {
        assert!(valid_pool_name("upstream") && valid_pool_name("cdn-1.edge_a"));
        assert!(
            !valid_pool_name("") && !valid_pool_name("a b") && !valid_pool_name(&"x".repeat(65))
        );
    }

    #[test]
    fn clamp_never_panics() {
        assert_eq!(clamp(7, Bounds { min: 1, max: 16 }), 7);
        assert_eq!(clamp(0, Bounds { min: 1, max: 16 }), 1);
        assert_eq!(clamp(99, Bounds { min: 1, max: 16 }), 16);
        assert_eq!(clamp(5, Bounds { min: 9, max: 2 }), 2);
    }
}
