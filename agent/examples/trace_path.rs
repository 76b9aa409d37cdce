//! The agent's per-record cost for traced HTTP messages, deterministic enough
//! for callgrind: N `TraceRecord`s on a few keep-alive sockets go through the
//! code the agent runs (decode, join, the state owner's batch handling: owner,
//! identity, trace index), in the agent's batches, with a new trace per record.
//!
//! ```text
//! cargo build --release -p vigil --example trace_path
//! valgrind --tool=callgrind --toggle-collect='trace_path::run' \
//!     target/release/examples/trace_path 200000
//! ```
//!
//! It prints one JSON line: records, wall time per record, traces indexed.
//! `cargo xtask bench` runs it (both ways) for BENCHMARKS.md.

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use vigil::{
    cardinality::SeriesBudget,
    clock::MonotonicToWall,
    correlate::ledger::ConnectionLedger,
    enrich::Enricher,
    export::otlp::OtlpStats,
    kube_pods::{PodDirectory, PodMeta},
    metrics::{PipelineStats, Registry},
    socket_health::SocketHealth,
    sources::{Batch, RecordDecoder},
    state::StateOwner,
};
use vigil_abi::{
    EventKind, SockOwner, SockTuple, TraceRecord, TraceSocketRecord, TraceStamp, AF_INET,
    DIR_RECEIVED, MSG_REQUEST,
};

/// Keep-alive connections carrying the requests, as in the throughput benchmark.
const SOCKETS: u64 = 8;
/// The agent's defaults (`pipeline.batch_max_events`, `correlate.trace_index_entries`).
const BATCH: usize = 256;
const TRACE_INDEX_ENTRIES: usize = 4096;
const CGROUP_ID: u64 = 4242;
const POD_UID: &str = "5f3a2b1c-9d8e-4f70-a1b2-c3d4e5f60718";

/// A repr(C) record as the bytes the ring would hold.
fn bytes_of<T: Copy>(record: &T) -> Vec<u8> {
    // SAFETY: the vigil_abi records are repr(C) plain old data.
    unsafe {
        std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()).to_vec()
    }
}

fn socket(cookie: u64) -> Vec<u8> {
    let mut local_addr = [0u8; 16];
    local_addr[..4].copy_from_slice(&[198, 18, 201, 1]);
    let mut remote_addr = [0u8; 16];
    remote_addr[..4].copy_from_slice(&[198, 18, 201, 2]);
    let mut comm = [0u8; 16];
    comm[..6].copy_from_slice(b"origin");
    bytes_of(&TraceSocketRecord {
        kind: EventKind::TraceSocket as u32,
        netns: 4_026_531_840,
        cookie,
        sk_addr: 0xffff_0000 + cookie,
        tuple: SockTuple {
            local_addr,
            remote_addr,
            local_port: 8080,
            remote_port: 40_000 + cookie as u16,
            family: AF_INET,
            _pad: 0,
        },
        owner: SockOwner {
            tgid: 1234,
            known: 1,
            cgroup_id: CGROUP_ID,
            comm,
        },
    })
}

/// Request `n`, received on socket `cookie`, opening trace `n`.
fn request(n: u64, cookie: u64) -> Vec<u8> {
    let mut stamp = TraceStamp::NONE;
    let value = format!("00-{:032x}-{:016x}-01", n + 1, n + 1);
    stamp.raw[..value.len()].copy_from_slice(value.as_bytes());
    stamp.present = 1;
    bytes_of(&TraceRecord {
        kind: EventKind::TraceContext as u32,
        role: u32::from(DIR_RECEIVED) | u32::from(MSG_REQUEST) << 4,
        ts_ns: 1_000_000 + n * 15_000,
        cookie,
        boundary: n as u32,
        _pad: 0,
        stamp,
    })
}

fn state_owner() -> StateOwner {
    let mut enricher = Enricher::bootstrap(Duration::from_secs(3600), 4096);
    let path = format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        POD_UID.replace('-', "_"),
        "0123456789abcdef".repeat(4)
    );
    enricher.cgroups.learn(CGROUP_ID, path);
    let mut pods = PodDirectory::new(64);
    pods.apply(PodMeta {
        uid: POD_UID.into(),
        name: "origin-7d9f".into(),
        namespace: "video".into(),
        labels: Default::default(),
        ips: vec![],
        host_network: false,
    });
    enricher.pods = Some(Arc::new(RwLock::new(pods)));
    let mut registry = Registry::new(
        SocketHealth::new(Default::default(), 1024),
        SeriesBudget::new(1024, Duration::from_secs(600)),
    );
    registry.traces = vigil::correlate::traces::TraceIndex::new(TRACE_INDEX_ENTRIES);
    StateOwner {
        enricher,
        registry,
        view: vigil::view::channel().0,
        event_log: None,
        otlp_logs: None,
        otlp_stats: Arc::new(OtlpStats::default()),
        clock: MonotonicToWall::now(),
        reconcile_every: Duration::from_secs(3600),
        ledger: Arc::new(Mutex::new(ConnectionLedger::new(
            4096,
            64,
            Duration::from_secs(60),
        ))),
        events_applied: 0,
    }
}

/// What the agent does with `records`: the measured part.
#[inline(never)]
fn run(records: &[Vec<u8>], decoder: &mut RecordDecoder, state: &mut StateOwner) -> usize {
    let mut batch: Batch = Vec::with_capacity(BATCH);
    let mut events = 0;
    for record in records {
        if let Some(e) = decoder.decode(record) {
            batch.push(e);
            if batch.len() >= BATCH {
                events += batch.len();
                state.apply_events(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
            }
        }
    }
    events += batch.len();
    state.apply_events(batch);
    events
}

fn main() -> std::process::ExitCode {
    let n: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 200_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: trace_path [RECORDS]   (a positive number; default 200000)");
            return std::process::ExitCode::from(2);
        }
    };
    let mut records: Vec<Vec<u8>> = (1..=SOCKETS).map(socket).collect();
    records.extend((0..n).map(|i| request(i, 1 + i % SOCKETS)));
    let stats = Arc::new(PipelineStats::default());
    let mut decoder = RecordDecoder::new(Arc::clone(&stats), 65_536);
    let mut state = state_owner();
    let start = Instant::now();
    let events = run(&records, &mut decoder, &mut state);
    let elapsed = start.elapsed();
    if events as u64 != n {
        eprintln!("only {events} of {n} records joined their socket: the harness is broken");
        return std::process::ExitCode::FAILURE;
    }
    let traces = state.registry.traces.len();
    // One JSON line, for `cargo xtask bench`.
    println!(
        "{{\"records\":{n},\"ns_per_record\":{:.1},\"traces_indexed\":{traces}}}",
        elapsed.as_nanos() as f64 / n as f64
    );
    std::process::ExitCode::SUCCESS
}
