//! A node stand-in built from real kernel objects: two "pods", each a process
//! in its own network namespace and in a cgroup laid out as the kubelet does —
//! one with the systemd cgroup driver (containerd), one with cgroupfs — under
//! a test-owned root. Retransmits and accept-queue drops in each pod must be
//! attributed to that pod: pod uid, QoS class, container id and runtime in the
//! event log, the pod (and its cgroup) in the metrics' labels, and the pod uid
//! in `vigil sockets`.

use serde_json::Value;
use vigil_integration_tests::{
    abort, bpf_available, metric_sum, read_event_log, start_connect, tag, wait_for, Agent,
    Scenario, TempPath, TestCgroup,
};

/// Stops the origin (SIGSTOP: a stalled worker), sends 30 connections at its
/// queues of 4, lets it go again; returns the pod namespace's ListenOverflows
/// and ListenDrops before, to compare with once the counts settle.
fn overflow_stalled_origin(scenario: &Scenario) -> anyhow::Result<(u64, u64)> {
    use nix::{sys::signal, unistd::Pid};
    let before = (
        scenario.mib("TcpExt", "ListenOverflows")?.0,
        scenario.mib("TcpExt", "ListenDrops")?.0,
    );
    let origin = Pid::from_raw(scenario.origin_pid as i32);
    signal::kill(origin, signal::Signal::SIGSTOP)?;
    let target = std::net::SocketAddr::new(scenario.link.server_addr(false), scenario.port);
    let clients = scenario.link.client.spawn_thread(move || {
        let streams = (0..30)
            .map(|_| start_connect(target))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Under a second: before the first SYN retransmit.
        std::thread::sleep(std::time::Duration::from_millis(500));
        streams.into_iter().for_each(abort);
        Ok(())
    })?;
    let joined = clients.join();
    signal::kill(origin, signal::Signal::SIGCONT)?;
    joined.map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    Ok(before)
}

struct FakePod {
    uid: &'static str,
    container: &'static str,
    /// cgroup path below the test root.
    path: String,
    qos: &'static str,
    runtime: &'static str,
}

fn pods() -> [FakePod; 2] {
    let systemd_uid = "0b6a3f41-8f2c-4a5e-9b7d-1c2d3e4f5a6b";
    let systemd_cid = "aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233";
    let cgroupfs_uid = "7e8d9c0b-1a2b-4c3d-8e9f-a0b1c2d3e4f5";
    let cgroupfs_cid = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    [
        FakePod {
            uid: systemd_uid,
            container: systemd_cid,
            path: format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{systemd_cid}.scope",
                systemd_uid.replace('-', "_")
            ),
            qos: "burstable",
            runtime: "containerd",
        },
        FakePod {
            uid: cgroupfs_uid,
            container: cgroupfs_cid,
            path: format!("kubepods/besteffort/pod{cgroupfs_uid}/{cgroupfs_cid}"),
            qos: "besteffort",
            runtime: "unknown",
        },
    ]
}

/// Per pod: origin in the pod's cgroup and namespace, lossy load, then every
/// server-side event names the pod, and the metrics carry the pod's cgroup
/// with a total equal to that namespace's RetransSegs (tolerance zero, as in
/// retransmit.rs).
#[test]
fn retransmits_are_attributed_to_their_pod() -> anyhow::Result<()> {
    if !bpf_available("retransmits_are_attributed_to_their_pod") {
        return Ok(());
    }
    let root = format!("vigil-it-{}", tag("pods"));
    let log = TempPath::new("pods.jsonl");
    let mut agent = Agent::start(&["--event-log", &log.0.display().to_string()])?;
    let mut checks = Vec::new();
    for (i, pod) in pods().iter().enumerate() {
        let cgroup = TestCgroup::create(&format!("{root}/{}", pod.path))?;
        let mut scenario = Scenario::start_with(
            &format!("{}{i}", tag("pod")),
            50 + i as u8,
            false,
            Some(&cgroup.procs()),
            &["--backlog", "4"],
        )?;
        // Every accept-queue drop a plain overflow (as in socket_health.rs).
        scenario
            .link
            .server
            .run(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=0"])?;
        let netns = scenario.server_netns()?;
        let before = scenario.mib("Tcp", "RetransSegs")?.0;
        scenario.link.set_loss(scenario.port, 10)?;
        scenario.run_load(false, 3, 6, 4.0)?;
        // While the origin runs: its listener in the socket sample names the pod.
        let row = wait_for(
            std::time::Duration::from_secs(5),
            "the origin's listener in vigil sockets",
            || {
                let sockets = agent.sockets()?;
                Ok(sockets["listeners"].as_array().and_then(|rows| {
                    rows.iter()
                        .find(|r| r["netns"].as_u64() == Some(netns))
                        .cloned()
                }))
            },
        )?;
        assert_eq!(row["pod_uid"].as_str(), Some(pod.uid), "listener row {row}");
        scenario.link.set_loss(scenario.port, 0)?;
        let before_overflow = overflow_stalled_origin(&scenario)?;
        let ns = netns.to_string();
        let labels = [
            ("netns", ns.as_str()),
            ("cgroup", cgroup.rel.as_str()),
            ("pod", pod.uid),
        ];
        // Handshakes in flight when the origin resumed may still overflow:
        // compare with the kernel's counters as they are at each look.
        let mut kernel_now = (0, 0);
        wait_for(
            std::time::Duration::from_secs(5),
            "the pod's listen overflows = ListenOverflows",
            || {
                kernel_now = (
                    scenario.mib("TcpExt", "ListenOverflows")?.0 - before_overflow.0,
                    scenario.mib("TcpExt", "ListenDrops")?.0 - before_overflow.1,
                );
                let n = metric_sum(
                    &agent.scrape()?,
                    "vigil_tcp_listen_overflows_total",
                    &labels,
                );
                Ok((n == kernel_now.0).then_some(()))
            },
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "pod {}: {e}; kernel ListenOverflows +{}\n{}",
                pod.uid,
                kernel_now.0,
                agent.scrape().unwrap_or_default()
            )
        })?;
        let (overflows, drops) = kernel_now;
        assert!(
            overflows > 0,
            "30 connections into stalled queues of 4 overflow"
        );
        assert_eq!(
            drops, overflows,
            "precondition: every listen drop was an overflow"
        );
        // Overflows are read from the listener while it lives (each sample):
        // only now may the origin go.
        scenario.quiesce()?;
        let kernel = scenario.mib("Tcp", "RetransSegs")?.0 - before;
        assert!(kernel > 0, "10% loss causes retransmits in pod {}", pod.uid);
        checks.push((netns, kernel, cgroup.rel.clone(), overflows));
        drop(scenario);
        drop(cgroup);
    }

    for ((netns, kernel, cgroup, _), pod) in checks.iter().zip(pods().iter()) {
        let ns = netns.to_string();
        // Labelled with the pod (its uid: no Kubernetes API here) and its cgroup.
        let labels = [
            ("netns", ns.as_str()),
            ("cgroup", cgroup.as_str()),
            ("pod", pod.uid),
        ];
        // The last records (sent when sockets close) reach the agent within a poll interval.
        wait_for(
            std::time::Duration::from_secs(5),
            "segments under the pod's cgroup = RetransSegs",
            || {
                let n = metric_sum(
                    &agent.scrape()?,
                    "vigil_tcp_retransmitted_segments_total",
                    &labels,
                );
                Ok((n == *kernel).then_some(()))
            },
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "pod {}: {e}; kernel {kernel}\n{}",
                pod.uid,
                agent.scrape().unwrap_or_default()
            )
        })?;
    }
    agent.terminate()?;

    let events = read_event_log(&log.0)?;
    for ((netns, _, _, overflows), pod) in checks.iter().zip(pods().iter()) {
        let server: Vec<&Value> = events
            .iter()
            .filter(|e| e["netns"].as_u64() == Some(*netns))
            .collect();
        assert!(!server.is_empty(), "events in pod {}", pod.uid);
        // Drops are logged too: each listen-overflow line counts what one
        // listener dropped since the last sample; together, ListenOverflows.
        let logged: u64 = server
            .iter()
            .filter(|e| e["kind"] == "listen_overflow")
            .filter_map(|e| e["dropped"].as_u64())
            .sum();
        assert_eq!(logged, *overflows, "overflow lines of pod {}", pod.uid);
        for e in server {
            let p = &e["pod"];
            assert_eq!(p["uid"].as_str(), Some(pod.uid), "pod of {e}");
            assert_eq!(
                p["container_id"].as_str(),
                Some(pod.container),
                "container of {e}"
            );
            assert_eq!(p["qos"].as_str(), Some(pod.qos), "QoS of {e}");
            assert_eq!(p["runtime"].as_str(), Some(pod.runtime), "runtime of {e}");
        }
    }
    Ok(())
}
