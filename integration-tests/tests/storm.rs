//! More events than the ring buffer can hold: the agent keeps running, counts
//! what it lost, and its totals plus the losses still equal the kernel's.

use std::time::Duration;

use vigil_integration_tests::{bpf_available, metric_sum, tag, wait_for, Agent, Scenario};

/// A one-page ring that the agent drains only every 3 s (the kernel never
/// wakes it: the wake-up threshold is above what a page holds), under 20%
/// loss: almost every record finds the ring full.
///
/// Reconciliation, per namespace, tolerance zero: a lost retransmit record's
/// segments stay in the socket's counter delta and ride on its next record or
/// on the record sent when it closes; only records that nothing can follow
/// (the close record, SYN-ACKs, the first look at an older socket) are lost
/// for good, and the kernel counts their segments per namespace. So
/// `vigil_tcp_retransmitted_segments_total + vigil_tcp_retransmit_segments_lost_total`
/// must equal Tcp RetransSegs, on the server and on the client side.
#[test]
fn ring_overflow_is_counted_and_totals_reconcile() -> anyhow::Result<()> {
    if !bpf_available("ring_overflow_is_counted_and_totals_reconcile") {
        return Ok(());
    }
    let (agent, _config) = Agent::start_with_config(
        "storm.toml",
        "[probes]\nring_buffer_bytes = 4096\n[pipeline]\nwakeup_bytes = 4000\npoll_interval_ms = 3000\n",
        &[],
    )?;
    let mut scenario = Scenario::start(&tag("storm"), 60, false)?;
    let (server, client) = scenario.retransmits_under_loss(20, 8, 4.0)?;
    let kernel = [server, client];
    assert!(kernel[0] > 0, "20% loss causes retransmits");
    let namespaces = [
        scenario.link.server.inode()?.to_string(),
        scenario.link.client.inode()?.to_string(),
    ];

    // The agent drains every 3 s: wait until both sides reconcile.
    let text = wait_for(
        Duration::from_secs(15),
        "totals + losses = RetransSegs",
        || {
            let text = agent.scrape()?;
            let reconciled = namespaces.iter().zip(kernel).all(|(ns, k)| {
                let labels = [("netns", ns.as_str())];
                metric_sum(&text, "vigil_tcp_retransmitted_segments_total", &labels)
                    + metric_sum(&text, "vigil_tcp_retransmit_segments_lost_total", &labels)
                    == k
            });
            Ok(reconciled.then_some(text))
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}: kernel {kernel:?}\n{}",
            agent.scrape().unwrap_or_default()
        )
    })?;
    let ring_full = metric_sum(
        &text,
        "vigil_events_lost_total",
        &[("probe", "retransmit"), ("reason", "ring_full")],
    );
    assert!(ring_full > 0, "the storm overflowed the ring:\n{text}");
    assert_eq!(
        metric_sum(
            &text,
            "vigil_events_lost_total",
            &[("probe", "retransmit"), ("reason", "read_error")]
        ),
        0,
        "no kernel read failed"
    );
    let reported = metric_sum(
        &text,
        "vigil_tcp_retransmitted_segments_total",
        &[("netns", namespaces[0].as_str())],
    );
    eprintln!(
        "storm: {ring_full} records lost to a full ring; server {reported} reported + {} lost for good = RetransSegs {}",
        kernel[0] - reported,
        kernel[0]
    );
    Ok(())
}
