//! Correlation of kernel events with traces: the W3C trace context the kernel
//! captured per socket, the trace index `vigil explain` reads, and the
//! per-connection ledger that spans received over OTLP are joined with, the
//! join itself, and the OTLP span receiver that does it.

pub mod ledger;
pub mod receiver;
pub mod span_join;
pub mod traceparent;
pub mod traces;
