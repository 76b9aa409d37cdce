//! Metric families as the agent builds them for every scrape or export: one
//! structure, written as Prometheus text and converted to OTLP.

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn prometheus(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A histogram observation set: `counts[i]` observations in bucket `i` (not
/// cumulative), the last bucket being above every bound.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPoint {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Histogram(HistogramPoint),
}

/// A measurement that contributed to a point, with the trace it belonged
/// to (OTLP exemplars; Prometheus text 0.0.4 has no place for them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub time_unix_nano: u64,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub labels: Vec<(String, String)>,
    pub value: Value,
    pub exemplar: Option<Exemplar>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Prometheus name (counters end in `_total`).
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub points: Vec<Point>,
}

/// Numbers a sample can carry.
pub trait SampleValue {
    fn as_f64(&self) -> f64;
}

macro_rules! sample_value {
    ($($t:ty),*) => {$(
        impl SampleValue for $t {
            fn as_f64(&self) -> f64 {
                *self as f64
            }
        }
    )*};
}
sample_value!(u8, u32, u64, usize, f64);

impl<T: SampleValue> SampleValue for &T {
    fn as_f64(&self) -> f64 {
        (*self).as_f64()
    }
}

/// The families of one snapshot, in the order they were declared.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub families: Vec<Family>,
}

impl Exposition {
    /// Starts a family; `kind` is "counter", "gauge" or "histogram".
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let kind = match kind {
            "counter" => Kind::Counter,
            "histogram" => Kind::Histogram,
            _ => Kind::Gauge,
        };
        self.families.push(Family {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            points: Vec::new(),
        });
    }

    fn point(&mut self, name: &str, labels: &[(&str, String)], value: Value) {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        match self.families.iter_mut().rev().find(|f| f.name == name) {
            Some(f) => f.points.push(Point {
                labels,
                value,
                exemplar: None,
            }),
            // A sample without its family is a bug in the agent: never panic
            // on the scrape path, make it visible instead.
            None => {
                debug_assert!(false, "sample of undeclared family {name}");
            }
        }
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, String)], value: impl SampleValue) {
        self.point(name, labels, Value::Number(value.as_f64()));
    }

    /// Attaches an exemplar to the sample just added to family `name`.
    pub fn exemplar(&mut self, name: &str, exemplar: Exemplar) {
        if let Some(p) = self
            .families
            .iter_mut()
            .rev()
            .find(|f| f.name == name)
            .and_then(|f| f.points.last_mut())
        {
            p.exemplar = Some(exemplar);
        }
    }

    pub fn histogram(&mut self, name: &str, labels: &[(&str, String)], h: HistogramPoint) {
        self.point(name, labels, Value::Histogram(h));
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn text(&self) -> String {
        self.write(false)
    }

    /// OpenMetrics 1.0 text: counter families named without `_total` (their
    /// samples keep it), exemplars on counter samples, `# EOF` at the end.
    pub fn open_metrics(&self) -> String {
        self.write(true)
    }

    fn write(&self, open_metrics: bool) -> String {
        let mut out = String::new();
        for f in &self.families {
            let counter = f.kind == Kind::Counter;
            let family = match f.name.strip_suffix("_total") {
                Some(stem) if open_metrics && counter => stem,
                _ => &f.name,
            };
            let _ = writeln!(
                out,
                "# HELP {family} {}\n# TYPE {family} {}",
                f.help.replace('\\', "\\\\").replace('\n', "\\n"),
                f.kind.prometheus()
            );
            for p in &f.points {
                match &p.value {
                    Value::Number(v) => {
                        let name = if open_metrics && counter {
                            format!("{family}_total")
                        } else {
                            f.name.clone()
                        };
                        line(&mut out, &name, &p.labels, None, *v);
                        if let Some(e) = p.exemplar.as_ref().filter(|_| open_metrics && counter) {
                            exemplar(&mut out, e);
                        }
                        out.push('\n');
                    }
                    Value::Histogram(h) => {
                        let bucket = format!("{family}_bucket");
                        let mut cumulative = 0;
                        // OpenMetrics wants `le` with a fraction ("1.0").
                        let le = |b: &f64| match open_metrics && b.fract() == 0.0 {
                            true => format!("{b:.1}"),
                            false => b.to_string(),
                        };
                        let les = h
                            .bounds
                            .iter()
                            .map(le)
                            .chain(std::iter::once("+Inf".into()));
                        for (le, n) in les.zip(&h.counts) {
                            cumulative += n;
                            line(&mut out, &bucket, &p.labels, Some(&le), cumulative as f64);
                            out.push('\n');
                        }
                        for (suffix, v) in [("_count", h.count as f64), ("_sum", h.sum)] {
                            line(&mut out, &format!("{family}{suffix}"), &p.labels, None, v);
                            out.push('\n');
                        }
                    }
                }
            }
        }
        if open_metrics {
            out.push_str("# EOF\n");
        }
        out
    }
}

/// ` # {trace_id="…",span_id="…"} VALUE TIMESTAMP`.
fn exemplar(out: &mut String, e: &Exemplar) {
    let _ = write!(
        out,
        " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {:.3}",
        hex::encode(e.trace_id),
        hex::encode(e.span_id),
        e.value,
        e.time_unix_nano as f64 / 1e9
    );
}

/// A sample line without its newline (an exemplar may follow).
fn line(out: &mut String, name: &str, labels: &[(String, String)], le: Option<&str>, v: f64) {
    out.push_str(name);
    let mut pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if !pairs.is_empty() {
        let _ = write!(out, "{{{}}}", pairs.join(","));
    }
    let _ = write!(out, " {v}");
}

/// Label value escaping per the exposition format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_counters_gauges_and_histograms() {
        let mut x = Exposition::default();
        x.family("a_total", "counter", "A.");
        x.sample("a_total", &[("k", "v\"1".into())], 7u64);
        x.family("g", "gauge", "G.");
        x.sample("g", &[], 0.25);
        x.family("h_seconds", "histogram", "H.");
        x.histogram(
            "h_seconds",
            &[("p", "x".into())],
            HistogramPoint {
                bounds: vec![0.1, 1.0],
                counts: vec![1, 2, 3],
                sum: 9.5,
                count: 6,
            },
        );
        let text = x.text();
        assert!(
            text.contains("# TYPE a_total counter\na_total{k=\"v\\\"1\"} 7\n"),
            "{text}"
        );
        assert!(text.contains("g 0.25\n"), "{text}");
        assert!(
            text.contains("h_seconds_bucket{p=\"x\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{p=\"x\",le=\"1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{p=\"x\",le=\"+Inf\"} 6\n"),
            "{text}"
        );
        assert!(text.contains("h_seconds_count{p=\"x\"} 6\n"), "{text}");
    }

    #[test]
    fn writes_open_metrics_with_exemplars() {
        let mut x = Exposition::default();
        x.family("a_total", "counter", "A.");
        x.sample("a_total", &[("k", "v".into())], 7u64);
        x.exemplar(
            "a_total",
            Exemplar {
                trace_id: [0xab; 16],
                span_id: [0x01; 8],
                time_unix_nano: 1_700_000_000_500_000_000,
                value: 3.0,
            },
        );
        x.family("g", "gauge", "G.");
        x.sample("g", &[], 0.25);
        x.family("h_seconds", "histogram", "H.");
        x.histogram(
            "h_seconds",
            &[],
            HistogramPoint {
                bounds: vec![0.1, 1.0],
                counts: vec![1, 2, 3],
                sum: 9.5,
                count: 6,
            },
        );
        let text = x.open_metrics();
        let trace = "ab".repeat(16);
        assert!(
            text.contains(&format!(
                "# TYPE a counter\na_total{{k=\"v\"}} 7 # {{trace_id=\"{trace}\",span_id=\"0101010101010101\"}} 3 1700000000.500\n"
            )),
            "{text}"
        );
        assert!(text.contains("# TYPE g gauge\ng 0.25\n"), "{text}");
        assert!(text.contains("h_seconds_bucket{le=\"1.0\"} 3\n"), "{text}");
        assert!(text.contains("h_seconds_bucket{le=\"+Inf\"} 6\n"), "{text}");
        assert!(text.ends_with("h_seconds_sum 9.5\n# EOF\n"), "{text}");
    }
}
