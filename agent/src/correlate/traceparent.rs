//! W3C Trace Context `traceparent` values (https://www.w3.org/TR/trace-context/),
//! as the kernel copies them out of HTTP/1.1 headers: raw bytes, unchecked.
//! This is the only place they are validated.

use std::fmt;

/// A trace context: which trace and which span a request belonged to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

/// Why a value is not a usable `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("shorter than the 55 characters of version 00")]
    Short,
    #[error("not lowercase hex where the format wants it")]
    NotHex,
    #[error("a `-` is missing between the fields")]
    Separator,
    #[error("version ff is forbidden")]
    Version,
    #[error("version 00 must end after the flags")]
    Trailing,
    #[error("an all-zero trace id or span id is invalid")]
    Zero,
}

/// Length of a version-00 value: `vv-<32 hex>-<16 hex>-ff`.
pub const VERSION_00_LEN: usize = 55;

/// Value of each lowercase hex digit; `NOT_HEX` for every other byte.
const NOT_HEX: u8 = 0xff;
const HEX_VALUE: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Lowercase hex into `out`; `text` is exactly twice as long. Checked once
/// at the end, not per digit: every record the kernel sends comes here.
fn hex_into(text: &[u8], out: &mut [u8]) -> Result<(), ParseError> {
    let mut seen = 0u8;
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (hi, lo) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        seen |= hi | lo;
        *byte = hi << 4 | lo;
    }
    // A digit's value fits 4 bits; NOT_HEX does not.
    if seen > 0x0f {
        return Err(ParseError::NotHex);
    }
    Ok(())
}

impl TraceContext {
    /// Parses a `traceparent` value. Versions above 00 are read as far as
    /// version 00 defines them, as the specification asks; anything after the
    /// flags must then start with `-`.
    pub fn parse(value: &[u8]) -> Result<TraceContext, ParseError> {
        let value = value.trim_ascii();
        if value.len() < VERSION_00_LEN {
            return Err(ParseError::Short);
        }
        let mut version = [0u8; 1];
        hex_into(&value[0..2], &mut version)?;
        if version[0] == 0xff {
            return Err(ParseError::Version);
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return Err(ParseError::Separator);
        }
        let mut ctx = TraceContext {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        hex_into(&value[3..35], &mut ctx.trace_id)?;
        hex_into(&value[36..52], &mut ctx.span_id)?;
        let mut flags = [0u8; 1];
        hex_into(&value[53..55], &mut flags)?;
        ctx.flags = flags[0];
        match (version[0], value.get(VERSION_00_LEN)) {
            (_, None) => {}
            (0, Some(_)) => return Err(ParseError::Trailing),
            (_, Some(b'-')) => {}
            (_, Some(_)) => return Err(ParseError::Separator),
        }
        if ctx.trace_id == [0; 16] || ctx.span_id == [0; 8] {
            return Err(ParseError::Zero);
        }
        Ok(ctx)
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex::encode(self.span_id)
    }

    /// A trace id given by a person (`vigil explain`): 32 hex characters,
    /// either case, surrounding whitespace ignored.
    pub fn parse_trace_id(text: &str) -> Result<[u8; 16], ParseError> {
        let text = text.trim().to_ascii_lowercase();
        if text.len() != 32 {
            return Err(ParseError::Short);
        }
        let mut id = [0u8; 16];
        hex_into(text.as_bytes(), &mut id)?;
        if id == [0; 16] {
            return Err(ParseError::Zero);
        }
        Ok(id)
    }
}

/// What the kernel stamped on an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stamp {
    /// No trace context: outside any traced request.
    #[default]
    None,
    Context(TraceContext),
    /// A `traceparent` value was there but is not valid W3C.
    Invalid,
}

impl Stamp {
    pub fn from_kernel(s: &vigil_abi::TraceStamp) -> Stamp {
        if s.present != 1 {
            return Stamp::None;
        }
        match TraceContext::parse(&s.raw) {
            Ok(ctx) => Stamp::Context(ctx),
            Err(_) => Stamp::Invalid,
        }
    }

    pub fn context(&self) -> Option<&TraceContext> {
        match self {
            Stamp::Context(ctx) => Some(ctx),
            Stamp::None | Stamp::Invalid => None,
        }
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specification_example() {
        let ctx = TraceContext::parse(GOOD.as_bytes()).expect("valid");
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(ctx.flags, 1);
        assert_eq!(ctx.to_string(), GOOD);
        // Optional whitespace around the value (OWS) is not part of it.
        assert_eq!(
            TraceContext::parse(format!(" {GOOD}\t").as_bytes()),
            Ok(ctx)
        );
    }

    #[test]
    fn rejects_what_the_specification_rejects() {
        let cases: [(&str, ParseError); 9] = [
            ("", ParseError::Short),
            (&GOOD[..54], ParseError::Short),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ParseError::Version,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                ParseError::NotHex,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ParseError::Separator,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ParseError::Zero,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ParseError::Zero,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                ParseError::Trailing,
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                ParseError::Separator,
            ),
        ];
        for (text, want) in cases {
            assert_eq!(TraceContext::parse(text.as_bytes()), Err(want), "{text:?}");
        }
    }

    #[test]
    fn later_versions_are_read_as_version_00() {
        let ctx = TraceContext::parse(
            b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        )
        .expect("a future version with more fields");
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn trace_ids_typed_by_people() {
        assert_eq!(
            TraceContext::parse_trace_id(" 4BF92F3577B34DA6A3CE929D0E0E4736\n")
                .map(hex::encode)
                .as_deref(),
            Ok("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            TraceContext::parse_trace_id("4bf92f"),
            Err(ParseError::Short)
        );
        assert_eq!(
            TraceContext::parse_trace_id("4bf92f3577b34da6a3ce929d0e0e473g"),
            Err(ParseError::NotHex)
        );
    }
}
