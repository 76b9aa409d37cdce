//! The control API (`proto/vigil/control/v1`) over the agent's Unix socket.
//!
//! Authorization is by the socket's peer credentials: the caller's pid (from
//! SO_PEERCRED, taken by the kernel at connect) -> its cgroup -> its pod, the
//! same resolution acting's selectors use. A registration belongs to that
//! workload; every other caller gets PERMISSION_DENIED. Bounded where a
//! client could make the agent hold memory: message size, streams per
//! connection and per workload, registrations.

use std::{
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::Duration,
};

use tokio::sync::watch;
use tokio_stream::{wrappers::WatchStream, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{transport::server::UdsConnectInfo, Request, Response, Status, Streaming};
use tracing::info;
use vigil_control::v1::{
    self,
    control_server::{Control, ControlServer},
};

use crate::{
    act::{selector, services::Services, sysctls::RestoreRequest},
    kube_pods::PodDirectory,
    view::View,
};

/// HTTP/2 streams one connection may hold at once.
const STREAMS_PER_CONNECTION: u32 = 8;
/// What tonic decodes at most; messages above the API's own limit but below
/// this get RESOURCE_EXHAUSTED from the handlers (tonic itself would answer
/// OUT_OF_RANGE, where gRPC's convention for a message too large is
/// RESOURCE_EXHAUSTED).
const DECODE_LIMIT: usize = 4 * 1024 * 1024;

/// Refuses a message larger than the API's limit.
fn sized<M: prost::Message>(m: &M) -> Result<(), Status> {
    let len = m.encoded_len();
    if len > vigil_control::MAX_MESSAGE_BYTES {
        return Err(Status::resource_exhausted(format!(
            "message of {len} bytes: at most {} (vigil_control::MAX_MESSAGE_BYTES)",
            vigil_control::MAX_MESSAGE_BYTES
        )));
    }
    Ok(())
}

/// How long RestoreSysctls waits for the advisor (it enters namespaces).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct ControlApi {
    services: Arc<Mutex<Services>>,
    pods: Option<Arc<RwLock<PodDirectory>>>,
    sysctls: std::sync::mpsc::Sender<RestoreRequest>,
}

impl ControlApi {
    pub fn new(
        services: Arc<Mutex<Services>>,
        pods: Option<Arc<RwLock<PodDirectory>>>,
        sysctls: std::sync::mpsc::Sender<RestoreRequest>,
    ) -> Self {
        ControlApi {
            services,
            pods,
            sysctls,
        }
    }

    fn services(&self) -> Result<MutexGuard<'_, Services>, Status> {
        self.services
            .lock()
            .map_err(|_| Status::internal("the control loop failed; restart the agent"))
    }

    /// The caller's workload, from the connection's peer credentials.
    fn caller<T>(&self, req: &Request<T>) -> Result<selector::Workload, Status> {
        let pid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0);
        let refuse = |why: String| {
            let mut s = self.services.lock().ok();
            if let Some(s) = s.as_mut() {
                s.refused(crate::api::validate::Refusal::Denied(why.clone()));
            }
            Status::permission_denied(why)
        };
        let Some(pid) = pid else {
            return Err(refuse(
                "no peer credentials on the connection: call over the agent's Unix socket".into(),
            ));
        };
        let process = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default();
        let w = selector::workload_of(pid, &process, self.pods.as_deref());
        if w.cgroup.is_none() {
            return Err(refuse(format!(
                "the caller (pid {pid}) has no cgroup the agent can read: it cannot be told apart from other workloads"
            )));
        }
        Ok(w)
    }
}

type TargetStream = Pin<Box<dyn Stream<Item = Result<v1::Targets, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let caller = self.caller(&req)?;
        sized(req.get_ref())?;
        let resp = self.services()?.register(caller, req.get_ref())?;
        Ok(Response::new(resp))
    }

    async fn report_load(
        &self,
        req: Request<Streaming<v1::LoadReport>>,
    ) -> Result<Response<v1::ReportSummary>, Status> {
        let key = self.caller(&req)?.key();
        let _open = self.services()?.open_stream(&key)?;
        let mut stream = req.into_inner();
        let mut reports = 0;
        while let Some(report) = stream.message().await? {
            // A refused report ends the stream with its status; the ones
            // before it stand.
            sized(&report)?;
            self.services()?.report(&key, &report)?;
            reports += 1;
        }
        Ok(Response::new(v1::ReportSummary { reports }))
    }

    type WatchTargetsStream = TargetStream;

    async fn watch_targets(
        &self,
        req: Request<v1::WatchTargetsRequest>,
    ) -> Result<Response<TargetStream>, Status> {
        let key = self.caller(&req)?.key();
        let (targets, open) = {
            let mut services = self.services()?;
            let targets = services.watch(&key, &req.get_ref().registration)?;
            (targets, services.open_stream(&key)?)
        };
        // The stream holds the guard: the workload's stream count drops when
        // the client goes away.
        let stream = WatchStream::new(targets).map(move |t| {
            let _open = &open;
            Ok(t)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn restore_sysctls(
        &self,
        req: Request<v1::RestoreSysctlsRequest>,
    ) -> Result<Response<v1::RestoreSysctlsResponse>, Status> {
        let workload = self.caller(&req)?.key();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || Status::unavailable("the sysctl advisor is not running");
        self.sysctls
            .send(RestoreRequest { workload, reply })
            .map_err(|_| gone())?;
        let restored = tokio::time::timeout(RESTORE_TIMEOUT, answer)
            .await
            .map_err(|_| Status::unavailable("the sysctl advisor did not answer in time"))?
            .map_err(|_| gone())?;
        Ok(Response::new(v1::RestoreSysctlsResponse { restored }))
    }
}

/// Serves the API on `path` until `stop`, then removes the socket.
pub async fn serve(path: PathBuf, api: ControlApi, stop: CancellationToken) -> std::io::Result<()> {
    // Mode 0666: pods run as any uid, and authorization is by peer
    // credentials, not by who may connect.
    let listener = crate::unix_socket::bind(&path, 0o666, 0o755)?;
    info!(socket = %path.display(), "control API listening");
    let service = ControlServer::new(api)
        .max_decoding_message_size(DECODE_LIMIT)
        .max_encoding_message_size(vigil_control::MAX_MESSAGE_BYTES);
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(STREAMS_PER_CONNECTION as usize)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop.cancelled(),
        )
        .await;
    crate::unix_socket::remove(&path, "control API");
    result.map_err(std::io::Error::other)
}

/// The control loop: every period, the latest reports and socket sample
/// become targets.
pub async fn control_loop(
    services: Arc<Mutex<Services>>,
    view: watch::Receiver<Arc<View>>,
    stop: CancellationToken,
) {
    let period = match services.lock() {
        Ok(s) => Duration::from_millis(u64::from(s.period_ms())),
        Err(_) => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            () = stop.cancelled() => return,
        }
        let sockets = Arc::clone(&view.borrow().sockets);
        match services.lock() {
            Ok(mut s) => s.tick(&sockets),
            Err(_) => return,
        }
    }
}
