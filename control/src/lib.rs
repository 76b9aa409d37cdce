//! Vigil's control API, v1 (`proto/vigil/control/v1/control.proto`): the
//! generated types and gRPC stubs, and [`Session`], the small client a
//! service uses to register, report its load and follow its targets.

pub mod v1 {
    tonic::include_proto!("vigil.control.v1");
}

mod session;

pub use session::{connect, Session, SessionError};

/// Where the agent serves the API unless configured otherwise (the chart
/// shares `/run/vigil` with pods through a hostPath).
pub const DEFAULT_SOCKET: &str = "/run/vigil/control.sock";

/// The largest message either side sends or accepts (requests above it get
/// RESOURCE_EXHAUSTED from the agent).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
