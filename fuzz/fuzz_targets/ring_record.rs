//! Ring-buffer records: decoding must reject, never panic, on any bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(e) = vigil::events::RetransmitEvent::decode(data) {
        let _ = (e.counted_segments(), e.unreported_segments());
        let _ = vigil::events::tcp_state_name(e.tcp_state);
    }
});
