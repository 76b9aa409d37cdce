//! Minimal HTTP/1.x message-head parsing shared by the origin and the load
//! generator. Only what an HLS origin needs: no chunked bodies, no
//! absolute-form targets, no obsolete line folding.

use std::fmt;

/// Upper bound on a request or response head (start line + headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        })
    }
}

/// Why a message head was rejected. Each maps to the status the origin sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Syntax error; the detail is for logs, not for the peer.
    Malformed(&'static str),
    HeadTooLarge,
    UnsupportedVersion,
    /// A request body framing we do not implement (Transfer-Encoding).
    UnsupportedFraming,
}

impl HttpError {
    /// Status code and reason phrase the origin answers with.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            HttpError::Malformed(_) => (400, "Bad Request"),
            HttpError::HeadTooLarge => (431, "Request Header Fields Too Large"),
            HttpError::UnsupportedVersion => (505, "HTTP Version Not Supported"),
            HttpError::UnsupportedFraming => (501, "Not Implemented"),
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Malformed(why) => write!(f, "malformed HTTP message: {why}"),
            HttpError::HeadTooLarge => write!(f, "HTTP head exceeds {MAX_HEAD_BYTES} bytes"),
            HttpError::UnsupportedVersion => f.write_str("unsupported HTTP version"),
            HttpError::UnsupportedFraming => f.write_str("unsupported Transfer-Encoding"),
        }
    }
}

impl std::error::Error for HttpError {}

/// Header fields in arrival order; names keep their case, lookups ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// First value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (e.g. `Connection`) lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.all(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `Content-Length`, rejecting disagreeing duplicates (request smuggling).
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        let mut found: Option<u64> = None;
        for v in self.all("content-length").flat_map(|v| v.split(',')) {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
                return Err(HttpError::Malformed("invalid Content-Length"));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| HttpError::Malformed("Content-Length out of range"))?;
            if found.is_some_and(|prev| prev != n) {
                return Err(HttpError::Malformed("conflicting Content-Length"));
            }
            found = Some(n);
        }
        Ok(found)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The origin-form request target, query included.
    pub target: String,
    pub version: Version,
    pub headers: Headers,
}

impl RequestHead {
    /// Persistent-connection rule of RFC 9112 §9.3.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.headers.has_token("connection", "close"),
            Version::Http10 => self.headers.has_token("connection", "keep-alive"),
        }
    }

    /// Bytes of request body that follow the head.
    pub fn body_length(&self) -> Result<u64, HttpError> {
        if self.headers.get("transfer-encoding").is_some() {
            return Err(HttpError::UnsupportedFraming);
        }
        Ok(self.headers.content_length()?.unwrap_or(0))
    }

    /// The target without its query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub version: Version,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Exactly(u64),
    /// No Content-Length: the body runs until the server closes.
    UntilClose,
}

impl ResponseHead {
    /// Body framing of a response to a GET (RFC 9112 §6.3).
    pub fn body_length(&self) -> Result<BodyLength, HttpError> {
        if (100..200).contains(&self.status) || self.status == 204 || self.status == 304 {
            return Ok(BodyLength::Exactly(0));
        }
        if self.headers.get("transfer-encoding").is_some() {
            return Err(HttpError::UnsupportedFraming);
        }
        Ok(match self.headers.content_length()? {
            Some(n) => BodyLength::Exactly(n),
            None => BodyLength::UntilClose,
        })
    }

    /// Whether the server will keep the connection open after this response.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.headers.has_token("connection", "close"),
            Version::Http10 => self.headers.has_token("connection", "keep-alive"),
        }
    }
}

/// Number of empty lines (CRLF or LF) at the start of `buf`; RFC 9112 §2.2
/// asks servers to ignore them before a request line.
pub fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    loop {
        if buf[i..].starts_with(b"\r\n") {
            i += 2;
        } else if buf[i..].starts_with(b"\n") {
            i += 1;
        } else {
            return i;
        }
    }
}

/// Length of the head (through the blank line) if `buf` holds a complete one.
/// Bare LF line endings are accepted as RFC 9112 §2.2 allows.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(pos) = buf[i..].iter().position(|&c| c == b'\n') {
        let nl = i + pos;
        let rest = &buf[nl + 1..];
        if rest.starts_with(b"\n") {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

/// Parses a complete request head as delimited by [`find_head_end`].
pub fn parse_request_head(head: &[u8]) -> Result<RequestHead, HttpError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let mut lines = split_lines(head)?;
    let start = lines.next().ok_or(HttpError::Malformed("empty request"))?;
    let mut parts = start.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(
            "request line is not METHOD SP TARGET SP VERSION",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_token_char) {
        return Err(HttpError::Malformed("invalid method"));
    }
    if !target.starts_with('/') || !target.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(HttpError::Malformed("request target is not origin-form"));
    }
    let version = parse_version(version)?;
    let headers = parse_header_lines(lines)?;
    if version == Version::Http11 && headers.all("host").count() != 1 {
        // RFC 9112 §3.2: exactly one Host in HTTP/1.1 requests.
        return Err(HttpError::Malformed(
            "HTTP/1.1 request needs exactly one Host",
        ));
    }
    Ok(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        version,
        headers,
    })
}

/// Parses a complete response head as delimited by [`find_head_end`].
pub fn parse_response_head(head: &[u8]) -> Result<ResponseHead, HttpError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let mut lines = split_lines(head)?;
    let start = lines.next().ok_or(HttpError::Malformed("empty response"))?;
    let mut parts = start.splitn(3, ' ');
    let (Some(version), Some(status)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Malformed("status line is not VERSION SP STATUS"));
    };
    let version = parse_version(version)?;
    if status.len() != 3 || !status.bytes().all(|c| c.is_ascii_digit()) {
        return Err(HttpError::Malformed("status code is not three digits"));
    }
    let status: u16 = status
        .parse()
        .map_err(|_| HttpError::Malformed("status code"))?;
    let reason = parts.next().unwrap_or("").to_owned();
    let headers = parse_header_lines(lines)?;
    Ok(ResponseHead {
        version,
        status,
        reason,
        headers,
    })
}

fn parse_version(v: &str) -> Result<Version, HttpError> {
    match v {
        "HTTP/1.1" => Ok(Version::Http11),
        "HTTP/1.0" => Ok(Version::Http10),
        v if v.starts_with("HTTP/") => Err(HttpError::UnsupportedVersion),
        _ => Err(HttpError::Malformed("invalid HTTP version")),
    }
}

/// Splits a head into lines, dropping the terminating blank line.
fn split_lines(head: &[u8]) -> Result<impl Iterator<Item = &str>, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("head is not UTF-8"))?;
    let mut lines: Vec<&str> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    // A complete head ends with "\n\n" or "\n\r\n": two trailing empty pieces.
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.iter().any(|l| l.contains('\r')) {
        return Err(HttpError::Malformed("bare CR in head"));
    }
    Ok(lines.into_iter())
}

fn parse_header_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Headers, HttpError> {
    let mut headers = Vec::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::Malformed("obsolete header line folding"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header line without colon"))?;
        // No whitespace is allowed between name and colon (RFC 9112 §5.1).
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(HttpError::Malformed("invalid header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|c| c.is_ascii_control() && c != b'\t') {
            return Err(HttpError::Malformed("control character in header value"));
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(Headers(headers))
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<RequestHead, HttpError> {
        let bytes = text.as_bytes();
        let end = find_head_end(bytes).ok_or(HttpError::Malformed("incomplete (test)"))?;
        assert_eq!(end, bytes.len(), "test input must be exactly one head");
        parse_request_head(bytes)
    }

    #[test]
    fn finds_head_end_crlf_and_lf() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY"),
            Some(27)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\nHost: a\n\nBODY"), Some(24));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(find_head_end(b""), None);
        assert_eq!(find_head_end(b"\n"), None);
    }

    #[test]
    fn skips_leading_empty_lines() {
        assert_eq!(leading_empty_lines(b"\r\n\nGET"), 3);
        assert_eq!(leading_empty_lines(b"GET"), 0);
        assert_eq!(leading_empty_lines(b"\r"), 0);
        assert_eq!(leading_empty_lines(b""), 0);
    }

    #[test]
    fn parses_simple_get() {
        let r = req(
            "GET /live/demo/index.m3u8?x=1 HTTP/1.1\r\nHost: origin\r\nUser-Agent:  t \r\n\r\n",
        )
        .expect("valid");
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/live/demo/index.m3u8?x=1");
        assert_eq!(r.path(), "/live/demo/index.m3u8");
        assert_eq!(r.version, Version::Http11);
        assert_eq!(r.headers.get("user-agent"), Some("t"));
        assert_eq!(r.headers.get("HOST"), Some("origin"));
        assert!(r.keep_alive());
        assert_eq!(r.body_length(), Ok(0));
    }

    #[test]
    fn connection_semantics() {
        let close = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n")
            .expect("valid");
        assert!(!close.keep_alive());
        let old = req("GET / HTTP/1.0\r\n\r\n").expect("valid");
        assert!(!old.keep_alive());
        let old_ka = req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").expect("valid");
        assert!(old_ka.keep_alive());
    }

    #[test]
    fn rejects_malformed_requests() {
        let cases = [
            "\r\n\r\n",
            "GET\r\n\r\n",
            "GET /\r\nHost: a\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTX/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\x01\r\n\r\n",
        ];
        for c in cases {
            assert!(
                matches!(req(c), Err(HttpError::Malformed(_))),
                "{c:?} should be malformed, got {:?}",
                req(c)
            );
        }
        assert!(matches!(
            parse_request_head(b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_other_versions_and_framing() {
        assert_eq!(
            req("GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
            Err(HttpError::UnsupportedVersion)
        );
        let chunked = req("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .expect("head itself is valid");
        assert_eq!(chunked.body_length(), Err(HttpError::UnsupportedFraming));
    }

    #[test]
    fn content_length_rules() {
        let ok = req("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
            .expect("valid");
        assert_eq!(ok.body_length(), Ok(5));
        for bad in ["5, 6", "-1", "+5", "", "0x10", "99999999999999999999999"] {
            let r = req(&format!(
                "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: {bad}\r\n\r\n"
            ))
            .expect("head itself is valid");
            assert!(r.body_length().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn head_size_limit() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert_eq!(
            parse_request_head(big.as_bytes()),
            Err(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn parses_responses() {
        let r =
            parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\ntraceparent: x\r\n\r\n")
                .expect("valid");
        assert_eq!(r.status, 200);
        assert_eq!(r.reason, "OK");
        assert_eq!(r.body_length(), Ok(BodyLength::Exactly(12)));
        assert!(r.keep_alive());

        let r = parse_response_head(b"HTTP/1.1 404 \r\nConnection: close\r\n\r\n").expect("valid");
        assert_eq!(r.status, 404);
        assert_eq!(r.body_length(), Ok(BodyLength::UntilClose));
        assert!(!r.keep_alive());

        let r = parse_response_head(b"HTTP/1.0 304 Not Modified\r\n\r\n").expect("valid");
        assert_eq!(r.body_length(), Ok(BodyLength::Exactly(0)));

        for bad in [
            &b"HTTP/1.1 20 OK\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
        ] {
            assert!(parse_response_head(bad).is_err(), "{bad:?}");
        }
    }
}
