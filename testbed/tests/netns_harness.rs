//! Test hosts for real: namespaces, veth, nftables loss and the binaries.
//! Needs root; without it the tests skip, except under CI=true where they fail.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use vigil_testbed::loadgen::{self, LoadConfig, LoadSummary};
use vigil_testbed::netns::{bin_path, ChildGuard, LinkPair, MibSnapshot, Netns};
use vigil_testbed::origin::{Origin, OriginConfig};

fn have_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root (network namespaces) and CI=true forbids skipping"
    );
    eprintln!("skipping: needs root");
    false
}

fn netns_listed(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

#[test]
fn netns_inode_matches_thread_namespace() {
    if !have_root() {
        return;
    }
    let name = format!("vigil-tb-ns{}", std::process::id());
    let ns = Netns::create(&name).expect("create namespace");
    let inode = ns.inode().expect("inode");
    let (seen, thread_mib) = ns
        .spawn_thread(|| {
            let link = std::fs::read_link("/proc/thread-self/ns/net")?;
            Ok((link, MibSnapshot::of_current_thread()?))
        })
        .expect("spawn")
        .join()
        .expect("thread panicked")
        .expect("readlink");
    assert_eq!(seen.to_string_lossy(), format!("net:[{inode}]"));
    assert_eq!(
        thread_mib.get("Tcp", "ActiveOpens"),
        Some(0),
        "fresh namespace"
    );

    let links = ns
        .run(&["ip", "-o", "link", "show", "up"])
        .expect("ip link");
    assert!(links.contains(": lo:"), "lo is up: {links}");
    assert!(ns.run(&["false"]).is_err());
    let mib = ns.mib().expect("MIB");
    assert_eq!(mib.get("Tcp", "RetransSegs"), Some(0), "fresh namespace");
    assert!(mib.get("TcpExt", "ListenOverflows").is_some());

    // A leftover from a crashed run is replaced, not an error.
    let again = Netns::create(&name).expect("recreate over leftover");
    std::mem::forget(ns); // `again` owns the name now
    drop(again);
    assert!(!netns_listed(&name));
}

/// 5% loss from server to client must show up as retransmissions in the
/// server namespace's own MIB, and every drop in the nft counter.
#[test]
fn loss_on_link_causes_server_retransmissions() {
    if !have_root() {
        return;
    }
    let tag = format!("loss{}", std::process::id());
    let pair = LinkPair::create(&tag, 201).expect("create link pair");
    let listen = std::net::SocketAddr::new(pair.server_addr(false), 8080);

    let stop = Arc::new(AtomicBool::new(false));
    let (bound_tx, bound_rx) = mpsc::channel();
    let origin_stop = Arc::clone(&stop);
    let origin = pair
        .server
        .spawn_thread(move || {
            let origin = Origin::bind(OriginConfig {
                listen,
                workers: 2,
                segment_bytes: 1024 * 1024,
                segments: 4,
                backlog: 64,
                ..OriginConfig::default()
            })?;
            let _ = bound_tx.send(origin.local_addr());
            origin.run(origin_stop)
        })
        .expect("spawn origin thread");
    // Make sure the origin is stopped whatever happens below.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop_guard = StopOnDrop(Arc::clone(&stop));
    let target = bound_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("origin bound in the server namespace");

    pair.set_loss(8080, 5).expect("set loss");
    let before = pair.server.mib().expect("MIB before");
    let summary: LoadSummary = pair
        .client
        .spawn_thread(move || {
            loadgen::run(&LoadConfig {
                target,
                connections: 2,
                requests_per_connection: 8,
                stream: "loss".into(),
                max_duration: Duration::from_secs(60),
                with_traceparent: true,
                record_seq: false,
                rate: None,
            })
        })
        .expect("spawn loadgen thread")
        .join()
        .expect("loadgen thread panicked")
        .expect("loadgen run");
    let after = pair.server.mib().expect("MIB after");
    let drops = pair.loss_drops().expect("read nft counter");

    eprintln!(
        "loss test: {drops} packets dropped, {} retransmitted, {} ms",
        after.delta(&before, "Tcp", "RetransSegs").unwrap_or(0),
        summary.elapsed_ms
    );
    assert_eq!(
        summary.requests_ok, 16,
        "TCP recovers from 5% loss: {summary:?}"
    );
    assert!(drops > 0, "nft dropped nothing at 5% over ~15 MB");
    let retrans = after
        .delta(&before, "Tcp", "RetransSegs")
        .expect("RetransSegs present");
    // Each drop is a server segment (or GSO burst) that never arrived, so
    // the server must have retransmitted at least once.
    assert!(retrans > 0, "no retransmissions despite {drops} drops");

    pair.set_loss(8080, 0).expect("remove loss");
    assert_eq!(pair.loss_drops().expect("no table"), 0);
    let tables = pair
        .client
        .run(&["nft", "list", "tables"])
        .expect("nft list");
    assert!(!tables.contains("vigil_loss"), "{tables}");

    stop.store(true, Ordering::SeqCst);
    origin
        .join()
        .expect("origin thread panicked")
        .expect("origin run");
    let (srv, cli) = (pair.server.name().to_owned(), pair.client.name().to_owned());
    drop(pair);
    assert!(!netns_listed(&srv) && !netns_listed(&cli));
}

/// The binaries over IPv6 between two namespaces, as the demo runs them.
#[test]
fn binaries_run_across_namespaces_over_ipv6() {
    if !have_root() {
        return;
    }
    let tag = format!("bins{}", std::process::id());
    let pair = LinkPair::create(&tag, 202).expect("create link pair");
    let listen = format!("[{}]:8080", pair.server_addr(true));
    assert_eq!(listen, "[2001:2:0:ca::1]:8080");

    let origin_bin = bin_path("vigil-origin").expect("built origin");
    let mut origin = ChildGuard::spawn(
        pair.server
            .command(&origin_bin)
            .args([
                "--listen",
                &listen,
                "--workers",
                "3",
                "--segment-bytes",
                "50000",
            ])
            .args(["--max-seconds", "60"])
            .stdout(Stdio::piped()),
    )
    .expect("spawn origin");
    let line = origin
        .wait_for_stdout_line("listening on", Duration::from_secs(10))
        .expect("origin ready");
    assert_eq!(
        line,
        format!(
            "vigil-origin listening on {listen} workers=3 pid={}",
            origin.pid()
        ),
        "ip netns exec must exec the origin itself"
    );

    let out = pair
        .client
        .command(bin_path("vigil-loadgen").expect("built loadgen"))
        .args(["--target", &listen, "--connections", "2"])
        .args(["--requests-per-connection", "5", "--json"])
        .stdin(Stdio::null())
        .output()
        .expect("run loadgen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON summary line");
    assert_eq!(summary["requests_ok"], 10, "{summary}");
    assert_eq!(summary["requests"].as_array().map(Vec::len), Some(10));

    let status = origin
        .terminate(Duration::from_secs(5))
        .expect("terminate origin");
    assert!(status.success(), "SIGTERM is a clean stop: {status}");

    // Nothing listens any more: the loadgen must report total failure.
    let out = pair
        .client
        .command(bin_path("vigil-loadgen").expect("built loadgen"))
        .args(["--target", &listen, "--max-duration-secs", "5"])
        .stdin(Stdio::null())
        .output()
        .expect("run loadgen");
    assert!(!out.status.success());
}
