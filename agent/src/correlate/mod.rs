//! Correlation of kernel events with traces: the W3C trace context the kernel
//! captured per socket, the trace index `vigil explain` reads, and the
//! per-connection ledger that spans received over OTLP are joined with.

pub mod ledger;
pub mod traceparent;
