//! A service's side of the control API: one registration, a report stream
//! fed by the service, and the latest targets in a `watch`.
//!
//! Fail-safe by design: when the agent is gone the session ends and the
//! service keeps whatever settings it last applied; nothing here blocks the
//! service (reports are dropped, not queued, when the agent is slow).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::{net::UnixStream, sync::mpsc, sync::watch, task::JoinHandle};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::v1::{
    control_client::ControlClient, LoadReport, RegisterRequest, RegisterResponse, Targets,
    WatchTargetsRequest,
};

/// Reports waiting to be sent; beyond them a report is dropped (the agent
/// only needs the latest periods).
const REPORT_QUEUE: usize = 4;

#[derive(Debug)]
pub enum SessionError {
    /// The agent's socket could not be reached.
    Connect(PathBuf, tonic::transport::Error),
    /// The agent refused a call; the status says why.
    Refused(tonic::Status),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Connect(path, e) => {
                write!(f, "cannot reach the Vigil agent at {}: {e}", path.display())
            }
            SessionError::Refused(s) => write!(
                f,
                "the Vigil agent refused the call: {:?}: {}",
                s.code(),
                s.message()
            ),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        SessionError::Refused(s)
    }
}

/// A gRPC channel to the agent over its Unix socket.
pub async fn connect(socket: impl AsRef<Path>) -> Result<ControlClient<Channel>, SessionError> {
    let path = socket.as_ref().to_path_buf();
    let dial = path.clone();
    // The URI is required by the API and ignored: the connector dials the socket.
    let channel = Endpoint::from_static("http://vigil.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let dial = dial.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(dial).await?)) }
        }))
        .await
        .map_err(|e| SessionError::Connect(path, e))?;
    Ok(ControlClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES))
}

/// One registration with the agent.
pub struct Session {
    pub registration: RegisterResponse,
    targets: watch::Receiver<Option<Targets>>,
    reports: mpsc::Sender<LoadReport>,
    tasks: [JoinHandle<()>; 2],
}

impl Session {
    /// Registers, then streams reports and follows targets in the
    /// background of the current tokio runtime.
    pub async fn start(
        socket: impl AsRef<Path>,
        request: RegisterRequest,
    ) -> Result<Session, SessionError> {
        let mut client = connect(socket).await?;
        let registration = client.register(request).await?.into_inner();
        let id = registration.registration.clone();
        let mut stream = client
            .watch_targets(WatchTargetsRequest {
                registration: id.clone(),
            })
            .await?
            .into_inner();
        let (targets_tx, targets) = watch::channel(None);
        let watcher = tokio::spawn(async move {
            while let Ok(Some(t)) = stream.message().await {
                if targets_tx.send(Some(t)).is_err() {
                    break;
                }
            }
        });
        let (reports, rx) = mpsc::channel::<LoadReport>(REPORT_QUEUE);
        let reporter = tokio::spawn(async move {
            let stream = stamped(rx, id);
            // The summary only matters to tests; errors end the session.
            let _ = client.report_load(stream).await;
        });
        Ok(Session {
            registration,
            targets,
            reports,
            tasks: [watcher, reporter],
        })
    }

    /// The latest targets (None until the first arrives); `changed()` on it
    /// wakes on each new generation, and errs once the agent is gone.
    pub fn targets(&self) -> watch::Receiver<Option<Targets>> {
        self.targets.clone()
    }

    /// Sends one period's report; false when it was dropped (the agent is
    /// slow or gone). The registration field is filled in.
    pub fn report(&self, report: LoadReport) -> bool {
        self.reports.try_send(report).is_ok()
    }

    /// True while both streams to the agent are open.
    pub fn is_alive(&self) -> bool {
        self.tasks.iter().all(|t| !t.is_finished())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Reports as a request stream, each stamped with the registration.
fn stamped(
    rx: mpsc::Receiver<LoadReport>,
    registration: String,
) -> impl tokio_stream::Stream<Item = LoadReport> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(move |mut r| {
        r.registration.clone_from(&registration);
        r
    })
}
