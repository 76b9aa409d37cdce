//! `vigil agent`: wires loader, sources, state owner and exporters, and shuts
//! them down in order on SIGTERM/SIGINT.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use tokio::{
    signal::unix::SignalKind,
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    act::{
        self,
        services::{ServiceSettings, Services},
        ActState, ActuationMode,
    },
    api,
    cardinality::SeriesBudget,
    clock::MonotonicToWall,
    config::Config,
    correlate::{ledger::ConnectionLedger, traces::TraceIndex},
    enrich::Enricher,
    export::otlp::{self, OtlpStats},
    export::{http, prometheus::MetricsSource},
    kube_pods::{self, KubeStats, PodDirectory},
    loader::{sys::IterLink, LoadOptions, Probes, Signal},
    metrics::{PipelineStats, Registry},
    sampler::Sampler,
    socket_health::SocketHealth,
    sources::RingSource,
    state::{EventLog, StateOwner},
    telemetry::Telemetry,
    view,
};

/// Streams (load reports and target watches) one workload may hold open on
/// the control API: a service needs two.
const STREAMS_PER_WORKLOAD: usize = 8;

/// What the loader takes from the config.
pub fn load_options(config: &Config) -> LoadOptions {
    LoadOptions {
        ring_buffer_bytes: config.probes.ring_buffer_bytes,
        socket_table_entries: config.probes.socket_table_entries,
        wakeup_bytes: config.pipeline.wakeup_bytes,
        disable_hooks: config.probes.disable_hooks.clone(),
        capture_sent: config.correlate.capture_sent,
        kernel_debug_logs: config.probes.kernel_debug_logs,
        drop_reasons: config.probes.drop_reasons.clone(),
        cgroup_root: config.probes.cgroup_root.clone(),
        capture_cgroups: config.correlate.capture_cgroups.clone(),
        probes_object: config.probes.object.clone(),
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Bind first: a port in use must fail before any kernel object exists.
    let listener = http::bind(config.agent.metrics_addr).await?;
    let queries = http::bind_queries(&config.agent.query_socket)?;
    let event_log = match &config.agent.event_log {
        Some(path) => Some(
            EventLog::open(path)
                .map_err(|e| anyhow::anyhow!("cannot open event log {}: {e}", path.display()))?,
        ),
        None => None,
    };

    // Before any kernel object exists: a bad OTEL_* variable is a start-up error.
    let started = std::time::SystemTime::now();
    let otlp = otlp::OtlpSettings::from_env(&config.agent.resolved_node_name())
        .map_err(|e| anyhow::anyhow!("OpenTelemetry export settings: {e}"))?;
    // The span receiver binds now too: its port in use must fail the start.
    // It runs only with an upstream to forward to.
    let receiver_bind = match otlp.as_ref().and_then(|s| s.traces.clone()) {
        Some(upstream) if config.receiver.enabled => Some((
            crate::correlate::receiver::bind(config.receiver.listen).await?,
            upstream,
        )),
        None if config.receiver.enabled => {
            info!("OTLP span receiver off: no OTLP traces endpoint to forward to (OTEL_EXPORTER_OTLP_ENDPOINT)");
            None
        }
        _ => None,
    };

    let mut probes = Probes::load(&load_options(&config))?;
    let maps = probes.take_maps()?;
    // After the ownership hooks are attached, so no socket falls between the two.
    let mut enricher = Enricher::bootstrap(
        Duration::from_millis(config.enrich.proc_rescan_min_interval_ms),
        config.enrich.cgroup_cache_entries,
    );
    let node_name = config.agent.resolved_node_name();
    info!(node = %node_name, "node identity");
    let stop_watch = CancellationToken::new();
    let kube_stats = Arc::new(KubeStats::default());
    let pod_watch = match config.enrich.kubernetes_api {
        true => kube_pods::client_from_env().await.map(|client| {
            let dir = Arc::new(RwLock::new(PodDirectory::new(
                config.enrich.pod_directory_entries,
            )));
            enricher.pods = Some(dir.clone());
            kube_pods::spawn(
                client,
                node_name.clone(),
                dir,
                kube_stats.clone(),
                stop_watch.clone(),
            )
        }),
        false => None,
    };

    let stats = Arc::new(PipelineStats::default());
    let mut registry = Registry::new(
        SocketHealth::new(
            probes.drop_reasons.clone(),
            config.sampler.connection_table_entries,
        ),
        SeriesBudget::new(
            config.metrics.max_series,
            Duration::from_secs(config.metrics.series_idle_expiry_secs),
        ),
    );
    registry.traces = TraceIndex::new(config.correlate.trace_index_entries);
    let mut telemetry = Telemetry::new(
        probes.hooks.clone(),
        Some(maps.losses),
        probes.program_handles(),
        stats.clone(),
    );
    if pod_watch.is_some() {
        telemetry.kube = Some(kube_stats.clone());
    }
    let (view, view_rx) = view::channel();
    let (trace_queries, trace_queries_rx) = view::trace_queries();
    let (tx, rx) = mpsc::channel(config.pipeline.channel_capacity_batches);
    // One snapshot in flight is enough: a newer one replaces an older one anyway.
    let (snapshot_tx, snapshot_rx) = mpsc::channel(1);
    let stop_sources = CancellationToken::new();
    let stop_exporters = CancellationToken::new();

    let source = RingSource {
        ring: maps.events,
        tx,
        stats: stats.clone(),
        batch_max_events: config.pipeline.batch_max_events,
        poll_interval: Duration::from_millis(config.pipeline.poll_interval_ms),
        trace_sockets: config.probes.socket_table_entries as usize,
    };
    let source_task = tokio::spawn(source.run(stop_sources.clone()));
    if let Some(logger) = probes.kernel_logger.take() {
        tokio::spawn(crate::sources::forward_kernel_logs(
            logger,
            stop_exporters.clone(),
        ));
    }
    let stop_sampler = CancellationToken::new();
    let (listeners_tx, listeners_rx) = watch::channel(Arc::new(Vec::new()));
    let act_state = Arc::new(ActState::new(config.actuation.audit_records));
    let stop_act = CancellationToken::new();
    let act_thread = match config.actuation.mode {
        ActuationMode::Off => None,
        mode => {
            let settings = act::Settings {
                mode,
                selectors: config.actuation.selectors()?,
                heartbeat_timeout: Duration::from_millis(config.actuation.heartbeat_timeout_ms),
                poll_interval: Duration::from_millis(config.actuation.poll_interval_ms),
                stall_window: Duration::from_millis(config.actuation.stall_window_ms),
                admission: config.actuation.admission(),
            };
            if settings.selectors.is_empty() {
                info!(
                    mode = mode.as_str(),
                    "actuation: no workload selected (--act-on); nothing is acted on"
                );
            }
            if !probes.signal_active(Signal::SocketSampling) {
                warn!("actuation needs the socket sampler to find listeners; it sees none");
            }
            let pods = enricher.pods.clone();
            Some(
                act::Actuator::new(settings, maps.accepts, act_state.clone(), pods)
                    .spawn(listeners_rx, stop_act.clone())?,
            )
        }
    };
    telemetry.actuation = Some(act_state.clone());
    let stop_control = CancellationToken::new();
    let control = match config.actuation.mode {
        ActuationMode::Off => None,
        mode => {
            let services = Arc::new(Mutex::new(Services::new(
                ServiceSettings {
                    mode,
                    selectors: config.actuation.selectors()?,
                    pool_law: config.actuation.pool_controller,
                    period_ms: config.actuation.control_period_ms,
                    max_registrations: config.actuation.max_registrations,
                    max_streams_per_workload: STREAMS_PER_WORKLOAD,
                },
                act_state.clone(),
            )));
            telemetry.services = Some(services.clone());
            let (restore_tx, restore_rx) = std::sync::mpsc::channel();
            let api =
                api::control::ControlApi::new(services.clone(), enricher.pods.clone(), restore_tx);
            let serve = tokio::spawn(api::control::serve(
                config.agent.control_socket.clone(),
                api,
                stop_control.clone(),
            ));
            let control_loop = tokio::spawn(api::control::control_loop(
                services,
                view_rx.clone(),
                stop_control.clone(),
            ));
            let sysctls = act::sysctls::spawn(
                act::sysctls::SysctlAdvisor::new(
                    mode,
                    config.actuation.selectors()?,
                    enricher.pods.clone(),
                    act_state.clone(),
                ),
                view_rx.clone(),
                Duration::from_millis(u64::from(config.actuation.control_period_ms)),
                restore_rx,
                stop_control.clone(),
            )?;
            Some((serve, control_loop, sysctls))
        }
    };
    let sampler_thread = match probes.socket_iterator() {
        Some(program) => match IterLink::create(std::os::fd::AsFd::as_fd(&program)) {
            Ok(link) => {
                info!(
                    kind = "link",
                    id = link.id,
                    name = "vigil_sock_iter",
                    "kernel object created"
                );
                let sampler = Sampler {
                    link,
                    interval: Duration::from_millis(config.sampler.interval_ms),
                    tx: snapshot_tx,
                    listeners: listeners_tx,
                    stats: stats.clone(),
                };
                Some(sampler.spawn(stop_sampler.clone())?)
            }
            Err(e) => {
                warn!(error = %e, "cannot create the socket iterator link; listen queues and RTT are not sampled");
                None
            }
        },
        None => None,
    };
    let stop_export = CancellationToken::new();
    let otlp_stats = Arc::new(OtlpStats::default());
    if otlp.is_some() {
        telemetry.otlp = Some(otlp_stats.clone());
    }
    let receiver_bind = receiver_bind
        .and_then(|(listener, upstream)| Some((listener, otlp::TracesUpstream::new(upstream)?)));
    let receiver_stats = receiver_bind
        .as_ref()
        .map(|_| Arc::new(crate::correlate::receiver::ReceiverStats::default()));
    telemetry.receiver = receiver_stats.clone();
    // Complete from here on: shared by the exporters, read without a lock.
    let telemetry = Arc::new(telemetry);
    let (otlp_logs, export_task) = match otlp {
        Some(settings) => {
            info!(
                metrics = settings.metrics.is_some(),
                logs = settings.logs_enabled(),
                "exporting to OpenTelemetry (OTLP/gRPC)"
            );
            let logs_enabled = settings.logs_enabled();
            let (log_tx, log_rx) = mpsc::channel(otlp::LOG_BUFFER_RECORDS);
            let (telemetry, view) = (telemetry.clone(), view_rx.clone());
            // The view is cloned out first: a borrow held over the kernel
            // reads would hold off the owner's next publication.
            let snapshot = move || {
                let view = view.borrow().clone();
                telemetry.families(&view)
            };
            let task = otlp::spawn(
                settings.with_start_time(started),
                snapshot,
                log_rx,
                otlp_stats.clone(),
                stop_export.clone(),
            );
            if logs_enabled {
                act_state
                    .audit
                    .export_to(log_tx.clone(), otlp_stats.clone());
            }
            (logs_enabled.then_some(log_tx), Some(task))
        }
        None => (None, None),
    };
    let ledger = Arc::new(Mutex::new(ConnectionLedger::new(
        config.correlate.ledger_connections,
        config.correlate.ledger_events_per_connection,
        Duration::from_secs(config.correlate.ledger_retention_secs),
    )));
    let receiver_task = receiver_bind
        .zip(receiver_stats)
        .map(|((listener, upstream), stats)| {
            use crate::correlate::receiver::{self, ReceiverSettings};
            let flush = Duration::from_millis(config.agent.shutdown_timeout_ms);
            receiver::spawn(
                listener,
                ReceiverSettings::new(&config.receiver, flush),
                upstream,
                ledger.clone(),
                stats,
                // A source of spans: it stops accepting when the drain starts.
                stop_sources.clone(),
            )
        });
    let state_task = tokio::spawn(
        StateOwner {
            enricher,
            registry,
            view,
            event_log,
            otlp_logs,
            otlp_stats: otlp_stats.clone(),
            clock: MonotonicToWall::now(),
            reconcile_every: Duration::from_millis(config.enrich.proc_reconcile_interval_ms),
            ledger: ledger.clone(),
            events_applied: 0,
        }
        .run(rx, snapshot_rx, trace_queries_rx),
    );
    let source = MetricsSource {
        view: view_rx,
        telemetry,
        trace_queries,
        actuation: act_state,
    };
    let metrics_task = tokio::spawn(http::serve_metrics(
        listener,
        source.clone(),
        stop_exporters.clone(),
    ));
    let queries_task = tokio::spawn(http::serve_queries(
        queries,
        config.agent.query_socket.clone(),
        source,
        stop_exporters.clone(),
    ));
    info!("vigil agent running; SIGTERM or Ctrl-C stops it");

    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
    }

    // Acting first: every steering program is detached before anything else
    // stops, and services stop getting targets (their socket is removed).
    stop_act.cancel();
    stop_control.cancel();
    if let Some(thread) = act_thread {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    if let Some((serve, control_loop, sysctls)) = control {
        // Sysctls it changed are put back before the agent goes on stopping.
        let _ = tokio::task::spawn_blocking(move || sysctls.join()).await;
        match serve.await {
            Ok(Err(e)) => warn!(error = %e, "control API ended with an error"),
            Err(e) => warn!(error = %e, "control API task failed"),
            Ok(Ok(())) => {}
        }
        let _ = control_loop.await;
    }
    // Sources drain the ring and hang up; the state owner then drains its queue.
    let drain = async {
        stop_sources.cancel();
        stop_sampler.cancel();
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
    // The span receiver flushes by the same deadline, counted from the drain's start.
    if let Some(task) = receiver_task {
        if let Err(e) = task.await {
            warn!(error = %e, "span receiver task failed");
        }
    }
    // The state owner has hung up, so every log record is queued: final export.
    stop_export.cancel();
    if let Some(task) = export_task {
        let _ = task.await;
    }
    stop_exporters.cancel();
    stop_sampler.cancel();
    stop_watch.cancel();
    if let Some(watch) = pod_watch {
        let _ = watch.await;
    }
    let _ = metrics_task.await;
    let _ = queries_task.await;
    if let Some(thread) = sampler_thread {
        // It checks for the stop at least every 50 ms, and between namespaces.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    probes.detach();
    info!("vigil agent stopped cleanly");
    Ok(())
}
