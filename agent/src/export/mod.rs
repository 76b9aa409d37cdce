pub mod http;
pub mod otlp;
pub mod prometheus;
