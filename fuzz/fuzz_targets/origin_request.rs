//! The testbed origin's HTTP request parser (it faces load generators and curl).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(head) = vigil_testbed::http::parse_request_head(data) {
        let _ = (head.keep_alive(), head.body_length(), head.path());
    }
});
