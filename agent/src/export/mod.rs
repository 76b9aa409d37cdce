pub mod otlp;
pub mod prometheus;
