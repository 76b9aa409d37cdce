//! The control API's requests checked and turned into the controllers'
//! terms; a refusal names the field and changes nothing.

use vigil_control::v1;

use crate::act::pools::{Bounds, PoolLoad, PoolSpec};

/// At most this many pools per registration.
pub const MAX_POOLS: usize = 32;
/// Largest bound accepted for a pool, a listener count, a limit.
pub const MAX_POOL_SIZE: u32 = 100_000;
pub const MAX_LISTENERS: u32 = 64;
pub const MAX_CONCURRENCY: u32 = 1_000_000;
const MAX_UPSTREAM_LEN: usize = 256;

/// Why a request is refused, as a gRPC status (the API maps it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Invalid(String),
    Denied(String),
    Exhausted(String),
    NotFound(String),
    Precondition(String),
}

impl Refusal {
    /// The status code's name, for the refusal counter's label.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Invalid(_) => "invalid_argument",
            Refusal::Denied(_) => "permission_denied",
            Refusal::Exhausted(_) => "resource_exhausted",
            Refusal::NotFound(_) => "not_found",
            Refusal::Precondition(_) => "failed_precondition",
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid(m) => tonic::Status::invalid_argument(m),
            Refusal::Denied(m) => tonic::Status::permission_denied(m),
            Refusal::Exhausted(m) => tonic::Status::resource_exhausted(m),
            Refusal::NotFound(m) => tonic::Status::not_found(m),
            Refusal::Precondition(m) => tonic::Status::failed_precondition(m),
        }
    }
}

/// A pool as declared, with the service's current settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredPool {
    pub spec: PoolSpec,
    pub max_idle: u32,
    pub max_open: u32,
}

/// A registration request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    pub pools: Vec<DeclaredPool>,
    /// (current, bounds); None: no advice asked.
    pub listeners: Option<(u32, Bounds)>,
    pub concurrency: Option<(u32, Bounds)>,
    pub serving_port: u16,
    pub listen_backlog: u32,
}

fn invalid(m: String) -> Refusal {
    Refusal::Invalid(m)
}

fn bounds(field: &str, b: Option<&v1::Bounds>, cap: u32) -> Result<Option<Bounds>, Refusal> {
    let Some(b) = b.filter(|b| b.max > 0) else {
        return Ok(None);
    };
    if b.min > b.max {
        return Err(invalid(format!(
            "{field}: min {} is above max {}",
            b.min, b.max
        )));
    }
    if b.max > cap {
        return Err(invalid(format!("{field}: max {} is above {cap}", b.max)));
    }
    Ok(Some(Bounds {
        min: b.min,
        max: b.max,
    }))
}

/// Pool names as the proto says: `[A-Za-z0-9._-]{1,64}`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

pub fn declaration(req: &v1::RegisterRequest) -> Result<Declaration, Refusal> {
    if req.pools.len() > MAX_POOLS {
        return Err(Refusal::Exhausted(format!(
            "{} pools: at most {MAX_POOLS} per registration",
            req.pools.len()
        )));
    }
    let mut pools: Vec<DeclaredPool> = Vec::with_capacity(req.pools.len());
    for (i, p) in req.pools.iter().enumerate() {
        let field = |f: &str| format!("pools[{i}].{f}");
        if !valid_name(&p.name) {
            return Err(invalid(format!(
                "{}: {:?} is not [A-Za-z0-9._-]{{1,64}}",
                field("name"),
                p.name
            )));
        }
        if pools.iter().any(|q| q.spec.name == p.name) {
            return Err(invalid(format!(
                "{}: {:?} is declared twice",
                field("name"),
                p.name
            )));
        }
        if p.upstream.is_empty() || p.upstream.len() > MAX_UPSTREAM_LEN {
            return Err(invalid(format!(
                "{}: must be host:port, 1 to {MAX_UPSTREAM_LEN} bytes",
                field("upstream")
            )));
        }
        let idle = bounds(&field("idle_bounds"), p.idle_bounds.as_ref(), MAX_POOL_SIZE)?
            .ok_or_else(|| invalid(format!("{}: max must be at least 1", field("idle_bounds"))))?;
        let open = bounds(&field("open_bounds"), p.open_bounds.as_ref(), MAX_POOL_SIZE)?;
        if let Some(o) = open.filter(|o| o.max < idle.min) {
            return Err(invalid(format!(
                "{}: max {} is below idle_bounds.min {}",
                field("open_bounds"),
                o.max,
                idle.min
            )));
        }
        pools.push(DeclaredPool {
            spec: PoolSpec {
                name: p.name.clone(),
                upstream: p.upstream.clone(),
                idle,
                open,
            },
            max_idle: p.max_idle,
            max_open: p.max_open,
        });
    }
    let listeners = bounds(
        "listener_bounds",
        req.listener_bounds.as_ref(),
        MAX_LISTENERS,
    )?;
    if listeners.is_some_and(|b| b.min == 0) {
        return Err(invalid("listener_bounds: min must be at least 1".into()));
    }
    let concurrency = bounds(
        "concurrency_bounds",
        req.concurrency_bounds.as_ref(),
        MAX_CONCURRENCY,
    )?;
    if concurrency.is_some_and(|b| b.min == 0) {
        return Err(invalid("concurrency_bounds: min must be at least 1".into()));
    }
    let serving_port = u16::try_from(req.serving_port)
        .map_err(|_| invalid(format!("serving_port: {} is not a port", req.serving_port)))?;
    if listeners.is_some() && serving_port == 0 {
        return Err(invalid(
            "listener_bounds need serving_port: the agent finds the listeners by it".into(),
        ));
    }
    Ok(Declaration {
        pools,
        listeners: listeners.map(|b| (req.listeners, b)),
        concurrency: concurrency.map(|b| (req.concurrency_limit, b)),
        serving_port,
        listen_backlog: req.listen_backlog,
    })
}

fn measure(field: &str, v: f64) -> Result<f64, Refusal> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(invalid(format!(
            "{field}: {v} is not a finite, non-negative number"
        )))
    }
}

/// One report's pools, in the registration's order (None: not reported),
/// checked against the declared names.
pub fn pool_loads(
    report: &v1::LoadReport,
    declared: &[&str],
    period_s: f64,
) -> Result<Vec<Option<PoolLoad>>, Refusal> {
    let mut loads = vec![None; declared.len()];
    for (i, p) in report.pools.iter().enumerate() {
        let field = |f: &str| format!("pools[{i}].{f}");
        let Some(at) = declared.iter().position(|n| *n == p.pool) else {
            return Err(invalid(format!(
                "{}: {:?} is not a registered pool",
                field("pool"),
                p.pool
            )));
        };
        if loads[at].is_some() {
            return Err(invalid(format!(
                "{}: {:?} is reported twice",
                field("pool"),
                p.pool
            )));
        }
        loads[at] = Some(PoolLoad {
            period_s,
            in_use: p.in_use,
            idle: p.idle,
            wait_mean_ms: measure(&field("wait_mean_ms"), p.wait_mean_ms)?,
            wait_p99_ms: measure(&field("wait_p99_ms"), p.wait_p99_ms)?,
            requests: p.requests,
            errors: p.errors,
            hold_mean_ms: measure(&field("hold_mean_ms"), p.hold_mean_ms)?,
        });
    }
    measure("latency_p50_ms", report.latency_p50_ms)?;
    measure("latency_p99_ms", report.latency_p99_ms)?;
    Ok(loads)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn request() -> v1::RegisterRequest {
        v1::RegisterRequest {
            pools: vec![v1::Pool {
                name: "upstream".into(),
                upstream: "198.18.0.2:8080".into(),
                max_idle: 4,
                max_open: 8,
                idle_bounds: Some(v1::Bounds { min: 2, max: 64 }),
                open_bounds: Some(v1::Bounds { min: 4, max: 128 }),
            }],
            listeners: 2,
            listener_bounds: Some(v1::Bounds { min: 1, max: 8 }),
            concurrency_limit: 50,
            concurrency_bounds: Some(v1::Bounds { min: 4, max: 500 }),
            serving_port: 8080,
            listen_backlog: 128,
        }
    }

    #[test]
    fn a_good_request_is_declared_as_sent() {
        let d = declaration(&request()).expect("valid");
        assert_eq!(d.pools[0].spec.idle, Bounds { min: 2, max: 64 });
        assert_eq!(d.listeners, Some((2, Bounds { min: 1, max: 8 })));
        assert_eq!(d.serving_port, 8080);
        let mut none = request();
        none.listener_bounds = None;
        none.concurrency_bounds = Some(v1::Bounds { min: 0, max: 0 });
        let d = declaration(&none).expect("valid");
        assert_eq!((d.listeners, d.concurrency), (None, None));
    }

    #[test]
    fn every_bad_field_is_named() {
        type Edit = fn(&mut v1::RegisterRequest);
        let cases: [(Edit, &str); 9] = [
            (|r| r.pools[0].name = "a b".into(), "pools[0].name"),
            (|r| r.pools.push(r.pools[0].clone()), "declared twice"),
            (|r| r.pools[0].upstream.clear(), "pools[0].upstream"),
            (|r| r.pools[0].idle_bounds = None, "pools[0].idle_bounds"),
            (
                |r| r.pools[0].idle_bounds = Some(v1::Bounds { min: 9, max: 3 }),
                "min 9 is above max 3",
            ),
            (
                |r| r.pools[0].open_bounds = Some(v1::Bounds { min: 1, max: 1 }),
                "below idle_bounds.min",
            ),
            (
                |r| r.listener_bounds = Some(v1::Bounds { min: 1, max: 1000 }),
                "listener_bounds: max 1000",
            ),
            (|r| r.serving_port = 70_000, "serving_port"),
            (|r| r.serving_port = 0, "need serving_port"),
        ];
        for (edit, expect) in cases {
            let mut r = request();
            edit(&mut r);
            match declaration(&r) {
                Err(Refusal::Invalid(m)) => assert!(m.contains(expect), "{m} / {expect}"),
                other => panic!("{expect}: {other:?}"),
            }
        }
        let mut many = request();
        many.pools = (0..33)
            .map(|i| v1::Pool {
                name: format!("p{i}"),
                ..request().pools[0].clone()
            })
            .collect();
        assert!(matches!(declaration(&many), Err(Refusal::Exhausted(_))));
    }

    #[test]
    fn reports_name_known_pools_with_sane_numbers() {
        let pool = |name: &str, wait: f64| v1::PoolLoad {
            pool: name.into(),
            wait_mean_ms: wait,
            requests: 10,
            ..Default::default()
        };
        let report = |pools| v1::LoadReport {
            pools,
            ..Default::default()
        };
        let names = ["a", "b"];
        let loads = pool_loads(&report(vec![pool("b", 3.0)]), &names, 1.0).expect("ok");
        assert_eq!(loads[0], None);
        assert_eq!(loads[1].map(|l| l.requests), Some(10));
        for bad in [
            report(vec![pool("c", 1.0)]),
            report(vec![pool("a", 1.0), pool("a", 1.0)]),
            report(vec![pool("a", -1.0)]),
            report(vec![pool("a", f64::NAN)]),
            v1::LoadReport {
                latency_p99_ms: f64::INFINITY,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(pool_loads(&bad, &names, 1.0), Err(Refusal::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
