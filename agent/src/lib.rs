//! The Vigil node agent as a library; `main.rs` is a thin CLI over it.

pub mod act;
pub mod agent;
pub mod api;
pub mod cardinality;
pub mod clock;
pub mod config;
pub mod cookie_map;
pub mod correlate;
pub mod enrich;
pub mod events;
pub mod export;
pub mod exposition;
pub mod health;
pub mod kube_pods;
pub mod loader;
pub mod metrics;
pub mod query;
pub mod sampler;
pub mod socket_health;
pub mod sources;
pub mod state;
pub mod telemetry;
pub mod triage;
pub mod unix_socket;
pub mod view;
