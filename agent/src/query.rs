//! Where the CLI finds a running agent (`--agent`): its query socket (a
//! path), or an HTTP address (host name or IP, and port), and one GET over
//! either. The query endpoints (`/v1/sockets`, `/v1/traces/…`,
//! `/v1/actuation`) are served on the socket only; an address reaches
//! `/metrics` and `/healthz`.

use std::{
    fmt,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    os::unix::net::UnixStream,
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The agent's query socket (`agent.query_socket`).
    Socket(PathBuf),
    /// `HOST:PORT` of its metrics endpoint, as given.
    Http(String),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        let s = s.trim();
        if s.starts_with('/') || s.starts_with('.') {
            return Ok(Endpoint::Socket(PathBuf::from(s)));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Endpoint::Http(s.to_owned()))
            }
            _ => Err(format!(
                "`{s}`: give the agent's query socket (a path, e.g. /run/vigil-agent/query.sock) or HOST:PORT of its metrics endpoint"
            )),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Socket(p) => write!(f, "{}", p.display()),
            Endpoint::Http(a) => f.write_str(a),
        }
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Endpoint {
    fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        match self {
            Endpoint::Socket(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                s.set_write_timeout(Some(TIMEOUT))?;
                Ok(Box::new(s))
            }
            Endpoint::Http(host_port) => {
                let addrs: Vec<SocketAddr> = host_port.to_socket_addrs()?.collect();
                let mut last = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host_port} resolves to no address"),
                );
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, TIMEOUT) {
                        Ok(s) => {
                            s.set_read_timeout(Some(TIMEOUT))?;
                            s.set_write_timeout(Some(TIMEOUT))?;
                            return Ok(Box::new(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// One GET: the status line and the body, whatever the status.
    pub fn get(&self, path: &str) -> Result<(String, Vec<u8>), QueryError> {
        let mut stream = self.connect().map_err(|source| QueryError::Connect {
            endpoint: self.clone(),
            source,
        })?;
        let io = |source| QueryError::Io {
            endpoint: self.clone(),
            source,
        };
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: vigil\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .map_err(io)?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE_BYTES)
            .read_to_end(&mut response)
            .map_err(io)?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| QueryError::Status {
                endpoint: self.clone(),
                status: "no HTTP header".into(),
            })?;
        let head = String::from_utf8_lossy(&response[..split]);
        let status = head.lines().next().unwrap_or_default().to_owned();
        response.drain(..split + 4);
        Ok((status, response))
    }

    /// The body of a 200 answer to a GET of `path`.
    pub fn get_ok(&self, path: &str) -> Result<Vec<u8>, QueryError> {
        let (status, body) = self.get(path)?;
        if !status.contains(" 200 ") {
            // The agent says why in the body (e.g. which trace it never saw).
            let why = String::from_utf8_lossy(&body);
            let status = match why.trim() {
                "" => status,
                why => format!("{status}: {why}"),
            };
            return Err(QueryError::Status {
                endpoint: self.clone(),
                status,
            });
        }
        Ok(body)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "cannot reach the agent at {endpoint} (is `vigil agent` running there, and are you root? see --agent): {source}"
    )]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: std::io::Error,
    },
    #[error("reading from the agent at {endpoint}: {source}")]
    Io {
        endpoint: Endpoint,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {endpoint} answered `{status}`")]
    Status { endpoint: Endpoint, status: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            "/run/vigil-agent/query.sock".parse(),
            Ok(Endpoint::Socket("/run/vigil-agent/query.sock".into()))
        );
        assert_eq!(
            "node-7.example:9464".parse(),
            Ok(Endpoint::Http("node-7.example:9464".into()))
        );
        assert_eq!(
            "[::1]:9464".parse(),
            Ok(Endpoint::Http("[::1]:9464".into()))
        );
        for bad in ["", "node-7", ":9464", "host:http", "host:70000"] {
            let err = bad.parse::<Endpoint>().expect_err(bad);
            assert!(err.contains("query socket"), "{err}");
        }
    }

    #[test]
    fn unreachable_agent_is_explained() {
        let err = Endpoint::Socket("/nonexistent/query.sock".into())
            .get("/metrics")
            .expect_err("no socket");
        assert!(
            err.to_string().contains("is `vigil agent` running"),
            "{err}"
        );
        // Port 9 (discard) on loopback: nothing listens in the test environment.
        let err = Endpoint::Http("127.0.0.1:9".into())
            .get("/metrics")
            .expect_err("refused");
        assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
    }
}
