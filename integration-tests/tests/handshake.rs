//! SYN and SYN-ACK retransmits against the kernel's counters. A binary of its
//! own: cargo runs test binaries one after another, so the heavy-loss tests
//! of retransmit.rs never share the CPUs with it.
//!
//! The kernel does not always run tracepoint programs: on these machines a
//! softirq served on one foreign thread reached ftrace's handler for
//! tcp_retransmit_synack but neither Vigil's programs nor bpftrace's (no
//! recursion miss recorded) in some runs of this test. Vigil finds
//! such SYN-ACKs when the connection is accepted (the child socket's
//! `total_retrans` starts at its request's SYN-ACK count), and such SYN
//! retransmits when the client socket closes.

use std::time::Duration;

use vigil_integration_tests::{bpf_available, metric_sum, tag, wait_for_segments, Agent, Scenario};

const SEGMENTS: &str = "vigil_tcp_retransmitted_segments_total";

/// Handshakes through a link that loses everything the server sends: the
/// server retransmits SYN-ACKs and the client its SYN. Each side's total must
/// equal its RetransSegs, and the SYN-ACK count the server's TCPSynRetrans
/// (which counts exactly SYN-ACK retransmits on a namespace that only listens).
#[test]
fn handshake_retransmits_equal_kernel_counters() -> anyhow::Result<()> {
    if !bpf_available("handshake_retransmits_equal_kernel_counters") {
        return Ok(());
    }
    handshake_retransmits(false, 32, 0)?;
    handshake_retransmits(true, 33, 0)
}

/// The same with the probe made blind to every second SYN-ACK of each
/// handshake (`VIGIL_FAULTS`), as the kernel sometimes leaves it: the counts
/// still equal the kernel's, the hidden ones found when each connection is
/// accepted and reported as unreported segments.
#[test]
fn synacks_no_probe_saw_are_found_at_accept() -> anyhow::Result<()> {
    if !bpf_available("synacks_no_probe_saw_are_found_at_accept") {
        return Ok(());
    }
    handshake_retransmits(false, 34, 2)
}

/// `hide_every`: the SYN-ACK probe acts as if it never ran for every Nth
/// SYN-ACK of a handshake (0: never).
fn handshake_retransmits(v6: bool, index: u8, hide_every: u32) -> anyhow::Result<()> {
    let agent = Agent::start(&[])?;
    if hide_every != 0 {
        agent.set_map_u32("VIGIL_FAULTS", hide_every)?;
    }
    let mut scenario = Scenario::start(&format!("{}{index}", tag("hs")), index, v6)?;
    let segs_before = scenario.mib("Tcp", "RetransSegs")?;
    let syn_before = scenario.mib("TcpExt", "TCPSynRetrans")?;
    scenario.link.set_loss(scenario.port, 100)?;
    let mut load = scenario.spawn_load(v6, 2, 1, 10.0)?;
    std::thread::sleep(Duration::from_millis(3500));
    scenario.link.set_loss(scenario.port, 0)?;
    load.terminate(Duration::from_secs(10))?;
    scenario.quiesce()?;
    let segs_after = scenario.mib("Tcp", "RetransSegs")?;
    let syn_after = scenario.mib("TcpExt", "TCPSynRetrans")?;
    let server_synack = syn_after.0 - syn_before.0;
    let client_syn = syn_after.1 - syn_before.1;
    assert!(
        server_synack > 0 && client_syn > 0,
        "handshake retransmits happened: {server_synack} SYN-ACK, {client_syn} SYN"
    );

    let server_ns = scenario.link.server.inode()?.to_string();
    let client_ns = scenario.link.client.inode()?.to_string();
    let text = wait_for_segments(&agent, &server_ns, segs_after.0 - segs_before.0)?;
    // Both kernel counters of the server in every message: RetransSegs and
    // TCPSynRetrans move together in tcp_rtx_synack, so a mismatch between
    // them would be the kernel's, one with Vigil's count would be Vigil's.
    let kernel = format!(
        "kernel, server: RetransSegs +{}, TCPSynRetrans +{server_synack}; client: \
         RetransSegs +{}, TCPSynRetrans +{client_syn}",
        segs_after.0 - segs_before.0,
        segs_after.1 - segs_before.1
    );
    assert_eq!(
        metric_sum(
            &text,
            "vigil_tcp_synack_retransmits_total",
            &[("netns", &server_ns)]
        ),
        server_synack,
        "{kernel}\n{text}"
    );
    assert_eq!(
        metric_sum(&text, SEGMENTS, &[("netns", &server_ns)]),
        segs_after.0 - segs_before.0,
        "{kernel}\n{text}"
    );
    assert_eq!(
        metric_sum(&text, SEGMENTS, &[("netns", &client_ns)]),
        segs_after.1 - segs_before.1,
        "{kernel}\n{text}"
    );
    // Every SYN-ACK either reported as it happened or found at accept (the
    // kernel's own misses are rare, so only the fault makes sure of both).
    let unreported = metric_sum(
        &text,
        "vigil_tcp_retransmit_unreported_segments_total",
        &[("netns", &server_ns)],
    );
    let reported = metric_sum(
        &text,
        "vigil_tcp_retransmit_events_total",
        &[("netns", &server_ns)],
    );
    assert_eq!(reported + unreported, server_synack, "{kernel}\n{text}");
    if hide_every != 0 {
        assert!(
            unreported > 0 && reported > 0,
            "some SYN-ACKs hidden and found, some seen: {kernel}\n{text}"
        );
    }
    // The SYN-ACKs belong to the listener's owner; the SYNs to the load generator.
    assert!(
        text.contains(&format!(
            "vigil_tcp_synack_retransmits_total{{netns=\"{server_ns}\",cgroup=\""
        )),
        "{text}"
    );
    assert!(
        !text.contains(&format!(
            "{SEGMENTS}{{netns=\"{server_ns}\",cgroup=\"unknown\""
        )),
        "server side attributed: {text}"
    );
    assert!(
        !text.contains(&format!(
            "{SEGMENTS}{{netns=\"{client_ns}\",cgroup=\"unknown\""
        )),
        "client side attributed: {text}"
    );
    eprintln!(
        "{server_synack} SYN-ACK ({unreported} found at accept) and {client_syn} SYN \
         retransmits, equal to the kernel's counters"
    );
    Ok(())
}
