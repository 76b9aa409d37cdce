//! The Prometheus endpoint's request parser: bytes from any client that can connect.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(path) = vigil::export::prometheus::request_path(data) {
        assert!(!path.contains(' '), "a path never spans a separator");
    }
});
