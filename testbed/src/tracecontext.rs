//! W3C Trace Context `traceparent` header (<https://www.w3.org/TR/trace-context/>).
//!
//! Only version `00` is accepted: it is the only version the origin and load
//! generator ever emit, and Vigil correlates on exactly that form.

use std::fmt;

/// A parsed `traceparent`: `00-{trace_id}-{span_id}-{flags}` in lowercase hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The `parent-id` field: the span id of whoever sent the header.
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// The `sampled` bit of the trace flags.
pub const FLAG_SAMPLED: u8 = 0x01;

impl TraceParent {
    /// Parses a header value; `None` for anything the W3C spec calls invalid
    /// (callers then behave as if no header was sent).
    pub fn parse(value: &str) -> Option<TraceParent> {
        // Optional whitespace around a header value is not part of it.
        let b = value.trim_matches([' ', '\t']).as_bytes();
        if b.len() != 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        if &b[0..2] != b"00" {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flags = [0u8; 1];
        decode_lower_hex(&b[3..35], &mut trace_id)?;
        decode_lower_hex(&b[36..52], &mut span_id)?;
        decode_lower_hex(&b[53..55], &mut flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            flags: flags[0],
        })
    }

    /// A new sampled trace with random, non-zero ids (a root span).
    pub fn new_random() -> TraceParent {
        TraceParent {
            trace_id: random_nonzero(),
            span_id: random_nonzero(),
            flags: FLAG_SAMPLED,
        }
    }

    /// The header a callee sends onwards: same trace and flags, its own span id.
    pub fn child(&self) -> TraceParent {
        let mut span_id: [u8; 8] = random_nonzero();
        // A child whose span id equals its parent's would be indistinguishable.
        while span_id == self.span_id {
            span_id = random_nonzero();
        }
        TraceParent {
            trace_id: self.trace_id,
            span_id,
            flags: self.flags,
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex::encode(self.span_id)
    }

    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

fn decode_lower_hex(src: &[u8], dst: &mut [u8]) -> Option<()> {
    // The spec requires lowercase; `hex::decode` would also accept uppercase.
    if src.iter().any(|c| !matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    hex::decode_to_slice(src, dst).ok()
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let v: [u8; N] = rand::random();
        if v.iter().any(|&b| b != 0) {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_spec_example() {
        let tp = TraceParent::parse(VALID).expect("valid");
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), VALID);
    }

    #[test]
    fn tolerates_surrounding_whitespace() {
        assert!(TraceParent::parse(&format!(" \t{VALID} ")).is_some());
    }

    #[test]
    fn keeps_unsampled_and_unknown_flags() {
        let tp = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-fe")
            .expect("valid");
        assert_eq!(tp.flags, 0xfe);
        assert!(!tp.sampled());
    }

    #[test]
    fn rejects_invalid() {
        let cases = [
            "",
            "00",
            // all-zero trace id / parent id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // other versions, including the forbidden ff
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // wrong lengths and separators
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bx-01",
            // multi-byte characters must not cause slicing panics
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ];
        for c in cases {
            assert_eq!(TraceParent::parse(c), None, "{c:?} should be invalid");
        }
    }

    #[test]
    fn child_keeps_trace_and_flags_with_new_span() {
        let parent = TraceParent::parse(VALID).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_ne!(child.span_id, parent.span_id);
        assert_ne!(child.span_id, [0; 8]);
    }

    #[test]
    fn random_round_trips() {
        for _ in 0..100 {
            let tp = TraceParent::new_random();
            assert_eq!(TraceParent::parse(&tp.to_string()), Some(tp));
        }
    }
}
