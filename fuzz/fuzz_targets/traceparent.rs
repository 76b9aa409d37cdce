//! W3C `traceparent` values as the kernel copies them off the wire, and trace
//! ids typed by people: rejected or parsed, never a panic; a parsed value
//! survives a round trip through its canonical form.
#![no_main]
use vigil::correlate::traceparent::{Stamp, TraceContext};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(ctx) = TraceContext::parse(data) {
        let again = TraceContext::parse(ctx.to_string().as_bytes());
        assert_eq!(again, Ok(ctx), "canonical form of {ctx} parses back");
    }
    // The kernel's fixed-size stamp: whatever 55 bytes it copied.
    let mut stamp = vigil_abi::TraceStamp::NONE;
    let n = data.len().min(stamp.raw.len());
    stamp.raw[..n].copy_from_slice(&data[..n]);
    stamp.present = 1;
    match Stamp::from_kernel(&stamp) {
        Stamp::Context(ctx) => assert!(ctx.trace_id != [0; 16] && ctx.span_id != [0; 8]),
        Stamp::Invalid | Stamp::None => {}
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = TraceContext::parse_trace_id(text);
    }
});
