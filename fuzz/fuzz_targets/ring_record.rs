//! Ring-buffer records: decoding must reject, never panic, on any bytes.
#![no_main]
use vigil::events::{tcp_state_name, KernelEvent};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match KernelEvent::decode(data) {
        Ok(KernelEvent::Retransmit(e)) => {
            let _ = (e.counted_segments(), e.unreported_segments());
            let _ = tcp_state_name(e.tcp_state);
        }
        Ok(KernelEvent::Drop(e)) => {
            let _ = (e.at_listener(), tcp_state_name(e.tcp_state));
        }
        Ok(KernelEvent::Trace(e)) => {
            let _ = (e.server_side(), e.trace.context());
        }
        Err(_) => {}
    }
    let _ = vigil::sampler::decode_samples(data);
});
