//! Ring-buffer records: decoding must reject, never panic, on any bytes.
#![no_main]
use vigil::events::{tcp_state_name, KernelEvent, RingRecord, TraceSockets};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut sockets = TraceSockets::new(2);
    match RingRecord::decode(data) {
        Ok(RingRecord::Event(KernelEvent::Retransmit(e))) => {
            let _ = (e.counted_segments(), e.unreported_segments());
            let _ = tcp_state_name(e.tcp_state);
        }
        Ok(RingRecord::Event(KernelEvent::Drop(e))) => {
            let _ = (e.at_listener(), tcp_state_name(e.tcp_state));
        }
        Ok(RingRecord::Event(KernelEvent::Trace(e))) => {
            let _ = (e.server_side(), e.trace.context());
        }
        Ok(RingRecord::TraceSocket(s)) => sockets.insert(s),
        Ok(RingRecord::TraceMessage(m)) => {
            let _ = m.trace.context();
            let _ = sockets.join(m);
        }
        Err(_) => {}
    }
    let _ = vigil::sampler::decode_samples(data);
});
