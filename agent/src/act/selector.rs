//! Which workloads Vigil may act on (`--act-on`, `actuation.workloads`):
//! `cgroup:PATH` (that cgroup v2 directory and below, absolute or relative
//! to the root), `process:NAME`, `pod:NAMESPACE/NAME`, `namespace:NAME`,
//! `label:KEY=VALUE`. A workload is selected when any selector matches it.

use std::{collections::BTreeMap, fmt, str::FromStr, sync::RwLock};

use crate::kube_pods::PodDirectory;

/// One `--act-on` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// A cgroup v2 path relative to the root, without leading or trailing
    /// `/`; empty: the root (every workload).
    Cgroup(String),
    Process(String),
    Pod {
        namespace: String,
        name: String,
    },
    Namespace(String),
    Label {
        key: String,
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}`: {reason} (selectors: cgroup:PATH, process:NAME, pod:NAMESPACE/NAME, namespace:NAME, label:KEY=VALUE)")]
pub struct SelectorError {
    pub input: String,
    pub reason: &'static str,
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(input: &str) -> Result<Selector, SelectorError> {
        let err = |reason| SelectorError {
            input: input.to_owned(),
            reason,
        };
        let (kind, value) = input.split_once(':').ok_or_else(|| err("no `KIND:`"))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(err("empty value"));
        }
        match kind {
            "cgroup" => {
                // Absolute paths are taken under the cgroup v2 root too.
                let path = value.trim_start_matches("/sys/fs/cgroup/unified");
                let path = path.trim_start_matches("/sys/fs/cgroup");
                if path.split('/').any(|c| c == "..") {
                    return Err(err("`..` in a cgroup path"));
                }
                Ok(Selector::Cgroup(path.trim_matches('/').to_owned()))
            }
            "process" => {
                if value.len() > 15 {
                    // The kernel keeps 15 bytes of a process name (comm).
                    return Err(err("a process name has at most 15 bytes"));
                }
                Ok(Selector::Process(value.to_owned()))
            }
            "pod" => {
                let (namespace, name) = value
                    .split_once('/')
                    .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
                    .ok_or_else(|| err("pod selectors are pod:NAMESPACE/NAME"))?;
                Ok(Selector::Pod {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            "namespace" => Ok(Selector::Namespace(value.to_owned())),
            "label" => {
                let (key, value) = value
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| err("label selectors are label:KEY=VALUE"))?;
                Ok(Selector::Label {
                    key: key.to_owned(),
                    value: value.to_owned(),
                })
            }
            _ => Err(err("unknown kind")),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Cgroup(p) => write!(f, "cgroup:/{p}"),
            Selector::Process(n) => write!(f, "process:{n}"),
            Selector::Pod { namespace, name } => write!(f, "pod:{namespace}/{name}"),
            Selector::Namespace(n) => write!(f, "namespace:{n}"),
            Selector::Label { key, value } => write!(f, "label:{key}={value}"),
        }
    }
}

/// What a selector is matched against: the process holding a listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    pub pid: u32,
    pub process: String,
    /// Its cgroup v2 path relative to the root, without leading `/`.
    pub cgroup: Option<String>,
    /// Its pod, when the Kubernetes API told us.
    pub pod: Option<PodIdentity>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, w: &Workload) -> bool {
        match self {
            Selector::Cgroup(dir) => w.cgroup.as_deref().is_some_and(|c| {
                let c = c.trim_matches('/');
                dir.is_empty()
                    || c == dir
                    || c.strip_prefix(dir.as_str())
                        .is_some_and(|r| r.starts_with('/'))
            }),
            Selector::Process(name) => w.process == *name,
            Selector::Pod { namespace, name } => w
                .pod
                .as_ref()
                .is_some_and(|p| p.namespace == *namespace && p.name == *name),
            Selector::Namespace(ns) => w.pod.as_ref().is_some_and(|p| p.namespace == *ns),
            Selector::Label { key, value } => w
                .pod
                .as_ref()
                .is_some_and(|p| p.labels.get(key) == Some(value)),
        }
    }

    /// Whether matching needs the Kubernetes API's pod metadata.
    pub fn needs_pods(&self) -> bool {
        matches!(
            self,
            Selector::Pod { .. } | Selector::Namespace(_) | Selector::Label { .. }
        )
    }
}

impl Workload {
    /// The identity the control API authorizes by: the pod when known, else
    /// the cgroup (processes of one cgroup are one workload), else the pid.
    pub fn key(&self) -> String {
        match (&self.pod, &self.cgroup) {
            (Some(p), _) => format!("pod {}/{}", p.namespace, p.name),
            (None, Some(c)) => format!("cgroup /{c}"),
            (None, None) => format!("pid {}", self.pid),
        }
    }
}

/// What a selector is matched against for process `pid`: its cgroup, and
/// its pod when the Kubernetes API told us about it.
pub fn workload_of(pid: u32, process: &str, pods: Option<&RwLock<PodDirectory>>) -> Workload {
    let cgroup = cgroup_of(pid);
    let pod = match (pods, &cgroup) {
        (Some(pods), Some(path)) => crate::enrich::workload::parse(path).and_then(|r| {
            let dir = pods.read().ok()?;
            let meta = dir.by_uid(&r.uid)?;
            Some(PodIdentity {
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                labels: meta.labels.clone(),
            })
        }),
        _ => None,
    };
    Workload {
        pid,
        process: process.to_owned(),
        cgroup,
        pod,
    }
}

/// The cgroup v2 path of a process relative to the root (`0::/a/b` in
/// /proc/PID/cgroup), without leading `/`.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(cgroup: &str, process: &str) -> Workload {
        Workload {
            pid: 1,
            process: process.into(),
            cgroup: Some(cgroup.into()),
            pod: Some(PodIdentity {
                namespace: "video".into(),
                name: "origin-0".into(),
                labels: [("app".to_owned(), "origin".to_owned())].into(),
            }),
        }
    }

    #[test]
    fn parses_every_kind_and_refuses_the_rest() {
        let ok = [
            (
                "cgroup:/sys/fs/cgroup/unified/vigil/origin/",
                "cgroup:/vigil/origin",
            ),
            ("cgroup:vigil/origin", "cgroup:/vigil/origin"),
            ("process:vigil-origin", "process:vigil-origin"),
            ("pod:video/origin-0", "pod:video/origin-0"),
            ("namespace:video", "namespace:video"),
            ("label:app=origin", "label:app=origin"),
        ];
        for (input, shown) in ok {
            let s: Selector = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(s.to_string(), shown);
        }
        for bad in [
            "origin",
            "cgroup:",
            "cgroup:a/../b",
            "pod:origin-0",
            "pod:/x",
            "label:=x",
            "host:a",
            "process:a-name-longer-than-15",
        ] {
            let e = bad.parse::<Selector>().expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn cgroup_selects_the_directory_and_below_only() {
        let s: Selector = "cgroup:vigil/origin".parse().expect("selector");
        assert!(s.matches(&workload("vigil/origin", "x")));
        assert!(s.matches(&workload("vigil/origin/worker-1", "x")));
        assert!(!s.matches(&workload("vigil/origin-2", "x")));
        assert!(!s.matches(&workload("vigil", "x")));
        let root: Selector = "cgroup:/".parse().expect("root");
        assert!(root.matches(&workload("anything", "x")));
    }

    #[test]
    fn pod_selectors_need_pod_metadata() {
        let w = workload("kubepods.slice/x", "origin");
        for s in ["pod:video/origin-0", "namespace:video", "label:app=origin"] {
            let s: Selector = s.parse().expect("selector");
            assert!(s.needs_pods());
            assert!(s.matches(&w), "{s}");
            assert!(
                !s.matches(&Workload {
                    pod: None,
                    ..w.clone()
                }),
                "{s}"
            );
        }
        let other: Selector = "label:app=packager".parse().expect("selector");
        assert!(!other.matches(&w));
        assert!("process:origin".parse::<Selector>().expect("p").matches(&w));
    }
}
