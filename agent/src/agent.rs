//! `vigil agent`: wires loader, sources, state owner and exporters, and shuts
//! them down in order on SIGTERM/SIGINT.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{signal::unix::SignalKind, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::Config,
    enrich::Enricher,
    export::prometheus::{self, MetricsSource},
    loader::{LoadOptions, Probes},
    metrics::{PipelineStats, Registry},
    sources::RingSource,
    state::{EventLog, StateOwner},
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Bind first: a port in use must fail before any kernel object exists.
    let listener = prometheus::bind(config.agent.metrics_addr).await?;
    let event_log = match &config.agent.event_log {
        Some(path) => Some(
            EventLog::open(path)
                .map_err(|e| anyhow::anyhow!("cannot open event log {}: {e}", path.display()))?,
        ),
        None => None,
    };

    let mut probes = Probes::load(&LoadOptions {
        ring_buffer_bytes: config.probes.ring_buffer_bytes,
        socket_table_entries: config.probes.socket_table_entries,
        wakeup_bytes: config.pipeline.wakeup_bytes,
        disable_hooks: config.probes.disable_hooks.clone(),
        kernel_debug_logs: config.probes.kernel_debug_logs,
    })?;
    let maps = probes.take_maps()?;
    // After the ownership hooks are attached, so no socket falls between the two.
    let enricher = Enricher::bootstrap(
        Duration::from_millis(config.enrich.proc_rescan_min_interval_ms),
        config.enrich.cgroup_cache_entries,
    );

    let stats = Arc::new(PipelineStats::default());
    let registry = Arc::new(Mutex::new(Registry::new(
        probes.hooks.clone(),
        Some(maps.lost),
        probes.program_handles(),
    )));
    let (tx, rx) = mpsc::channel(config.pipeline.channel_capacity_batches);
    let stop_sources = CancellationToken::new();
    let stop_exporters = CancellationToken::new();

    let source = RingSource {
        ring: maps.events,
        tx,
        stats: stats.clone(),
        batch_max_events: config.pipeline.batch_max_events,
        poll_interval: Duration::from_millis(config.pipeline.poll_interval_ms),
    };
    let source_task = tokio::spawn(source.run(stop_sources.clone()));
    if let Some(logger) = probes.kernel_logger.take() {
        tokio::spawn(crate::sources::forward_kernel_logs(
            logger,
            stop_exporters.clone(),
        ));
    }
    let state_task = tokio::spawn(
        StateOwner {
            enricher,
            registry: registry.clone(),
            event_log,
        }
        .run(rx),
    );
    let metrics_task = tokio::spawn(prometheus::serve(
        listener,
        MetricsSource { registry, stats },
        stop_exporters.clone(),
    ));
    info!("vigil agent running; SIGTERM or Ctrl-C stops it");

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }

    // Sources drain the ring and hang up; the state owner then drains its queue.
    let drain = async {
        stop_sources.cancel();
        match source_task.await {
            Ok(Err(e)) => warn!(error = %e, "source ended with an error"),
            Err(e) => warn!(error = %e, "source task failed"),
            Ok(Ok(())) => {}
        }
        if let Err(e) = state_task.await {
            warn!(error = %e, "state task failed");
        }
    };
    let deadline = Duration::from_millis(config.agent.shutdown_timeout_ms);
    let second_signal = async {
        tokio::select! {
            _ = sigterm.recv() => {},
            _ = sigint.recv() => {},
        }
    };
    tokio::select! {
        res = tokio::time::timeout(deadline, drain) => if res.is_err() {
            warn!(timeout_ms = config.agent.shutdown_timeout_ms, "drain timed out; exiting without it");
        },
        () = second_signal => warn!("second signal: skipping the drain"),
    }
    stop_exporters.cancel();
    let _ = metrics_task.await;
    probes.detach();
    info!("vigil agent stopped cleanly");
    Ok(())
}
