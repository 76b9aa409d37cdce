//! What a cgroup v2 path says about a Kubernetes workload: the pod's uid, its
//! QoS class, and the container's runtime and id. Real nodes name them two
//! ways, depending on the kubelet's cgroup driver:
//!
//! - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope` for CRI-O, `docker-<id>.scope` for Docker; the
//!   Guaranteed class has no QoS slice: `kubepods-pod<uid>.slice`)
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<id>` (CRI-O: `crio-<id>`;
//!   Guaranteed: `/kubepods/pod<uid>/<id>`)
//!
//! Both may sit under a prefix (kind and other nested nodes put the kubelet
//! in its own slice), so the pod level is found by its shape, anywhere.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    Crio,
    Docker,
    /// cgroupfs driver: the directory is the bare id, the runtime unnamed.
    Unknown,
}

/// A pod (and maybe container) named by a cgroup path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PodRef {
    /// metadata.uid, with dashes (as the API has it).
    pub uid: String,
    /// Namespace and name, when the Kubernetes API told us (see `kube_pods`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub qos: QosClass,
    /// The container's id (64 hex digits), when the path reaches a container.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pod uid in one path segment, and the QoS class the segment implies.
fn pod_segment(seg: &str) -> Option<(String, Option<QosClass>)> {
    // systemd: [parent-]kubepods[-burstable|-besteffort]-pod<uid_with_underscores>.slice;
    // a slice's name repeats its parents' ("kubelet-kubepods-..." under kubelet.slice).
    if let Some(rest) = seg
        .find("kubepods-")
        .map(|i| &seg[i + "kubepods-".len()..])
        .and_then(|r| r.strip_suffix(".slice"))
    {
        let (qos, pod) = match rest.split_once("-pod") {
            Some(("burstable", pod)) => (Some(QosClass::Burstable), pod),
            Some(("besteffort", pod)) => (Some(QosClass::BestEffort), pod),
            _ => (Some(QosClass::Guaranteed), rest.strip_prefix("pod")?),
        };
        let uid = pod.replace('_', "-");
        return is_uid(&uid).then_some((uid, qos));
    }
    // cgroupfs: pod<uid>; the class comes from the parent directory.
    let uid = seg.strip_prefix("pod")?;
    is_uid(uid).then(|| (uid.to_owned(), None))
}

fn container_segment(seg: &str) -> Option<(String, Runtime)> {
    let (runtime, rest) = if let Some(r) = seg.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, r)
    } else if let Some(r) = seg.strip_prefix("crio-") {
        (Runtime::Crio, r)
    } else if let Some(r) = seg.strip_prefix("docker-") {
        (Runtime::Docker, r)
    } else {
        (Runtime::Unknown, seg)
    };
    let id = rest.strip_suffix(".scope").unwrap_or(rest);
    is_container_id(id).then(|| (id.to_owned(), runtime))
}

/// Parses a cgroup v2 path as `/proc/PID/cgroup` prints it (or as the agent
/// resolved it from a cgroup id). None for anything that is not a pod.
pub fn parse(path: &str) -> Option<PodRef> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let at = segments.iter().position(|s| pod_segment(s).is_some())?;
    // A pod directory only counts inside the kubelet's hierarchy.
    if !segments[..at].iter().any(|s| s.contains("kubepods")) {
        return None;
    }
    let (uid, qos) = pod_segment(segments[at])?;
    let qos = qos.unwrap_or(match segments[at - 1] {
        "burstable" => QosClass::Burstable,
        "besteffort" => QosClass::BestEffort,
        _ => QosClass::Guaranteed,
    });
    let container = segments.get(at + 1).and_then(|s| container_segment(s));
    Some(PodRef {
        uid,
        namespace: None,
        name: None,
        qos,
        container_id: container.as_ref().map(|(id, _)| id.clone()),
        runtime: container.map(|(_, r)| r),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f3a2b1c-9d8e-4f70-a1b2-c3d4e5f60718";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn pod(qos: QosClass, container: Option<Runtime>) -> Option<PodRef> {
        Some(PodRef {
            uid: UID.into(),
            namespace: None,
            name: None,
            qos,
            container_id: container.map(|_| CID.into()),
            runtime: container,
        })
    }

    #[test]
    fn systemd_driver_paths() {
        let u = UID.replace('-', "_");
        assert_eq!(
            parse(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope")),
            pod(QosClass::Burstable, Some(Runtime::Containerd))
        );
        assert_eq!(
            parse(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{CID}.scope")),
            pod(QosClass::BestEffort, Some(Runtime::Crio))
        );
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-pod{u}.slice/docker-{CID}.scope"
            )),
            pod(QosClass::Guaranteed, Some(Runtime::Docker))
        );
        // The pod slice itself (the pause process, or a path cut short).
        assert_eq!(
            parse(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"
            )),
            pod(QosClass::Burstable, None)
        );
        // Nested under the kubelet's own slice (kind, some managed nodes).
        assert_eq!(
            parse(&format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope")),
            pod(QosClass::BestEffort, Some(Runtime::Containerd))
        );
    }

    #[test]
    fn cgroupfs_driver_paths() {
        assert_eq!(
            parse(&format!("/kubepods/burstable/pod{UID}/{CID}")),
            pod(QosClass::Burstable, Some(Runtime::Unknown))
        );
        assert_eq!(
            parse(&format!("/kubepods/besteffort/pod{UID}/crio-{CID}")),
            pod(QosClass::BestEffort, Some(Runtime::Crio))
        );
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}/{CID}")),
            pod(QosClass::Guaranteed, Some(Runtime::Unknown))
        );
    }

    #[test]
    fn not_pods() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-0.slice/session-1.scope",
            &format!("/system.slice/pod{UID}"), // pod-shaped, outside kubepods
            "/kubepods/burstable/podnot-a-uid/abc",
            "/kubepods.slice/kubepods-burstable.slice",
            "",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
        // A container directory that is not an id is just not a container.
        assert_eq!(
            parse(&format!("/kubepods/pod{UID}/sidecar")).and_then(|p| p.container_id),
            None
        );
    }
}
