//! Vigil's control API, v1 (`proto/vigil/control/v1/control.proto`).

pub mod v1 {
    tonic::include_proto!("vigil.control.v1");
}
