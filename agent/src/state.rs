//! The one owner of agent state: attributes each event, aggregates it, and
//! appends it to the event log. Runs until every source has hung up.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
    sync::{Arc, Mutex},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    clock::MonotonicToWall,
    enrich::{Enricher, Identity},
    events::{tcp_state_name, OwnerSource, RetransmitEvent, RetransmitKind},
    metrics::Registry,
    sources::Batch,
};

/// One line of the event log (JSON Lines).
#[derive(Serialize)]
struct EventLine<'a> {
    ts_unix_ns: u64,
    kind: RetransmitKind,
    netns: u32,
    cookie: u64,
    tcp_state: &'static str,
    segs: u32,
    err: i32,
    total_retrans: u32,
    counted_segments: u32,
    local: String,
    remote: String,
    pid: Option<u32>,
    comm: Option<&'a str>,
    cgroup: Option<&'a str>,
    owner_source: Option<OwnerSource>,
}

pub struct EventLog {
    out: BufWriter<File>,
    clock: MonotonicToWall,
}

impl EventLog {
    pub fn open(path: &Path) -> std::io::Result<EventLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(EventLog {
            out: BufWriter::new(file),
            clock: MonotonicToWall::now(),
        })
    }

    fn write(&mut self, e: &RetransmitEvent, who: &Identity) -> std::io::Result<()> {
        let line = EventLine {
            ts_unix_ns: self.clock.to_unix_ns(e.ts_ns),
            kind: e.kind,
            netns: e.netns,
            cookie: e.cookie,
            tcp_state: tcp_state_name(e.tcp_state),
            segs: e.segs,
            err: e.err,
            total_retrans: e.total_retrans,
            counted_segments: e.counted_segments(),
            local: e.endpoints.local.to_string(),
            remote: e.endpoints.remote.to_string(),
            pid: who.pid,
            comm: who.comm.as_deref(),
            cgroup: who.cgroup.as_deref(),
            owner_source: e.owner.as_ref().map(|o| o.source),
        };
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }
}

pub struct StateOwner {
    pub enricher: Enricher,
    pub registry: Arc<Mutex<Registry>>,
    pub event_log: Option<EventLog>,
}

impl StateOwner {
    pub async fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        let mut processed: u64 = 0;
        while let Some(mut batch) = rx.recv().await {
            let identities: Vec<Identity> = batch
                .iter_mut()
                .map(|e| self.enricher.attribute(e))
                .collect();
            if let Ok(mut registry) = self.registry.lock() {
                for (e, who) in batch.iter().zip(&identities) {
                    registry.record_retransmit(e, who);
                }
                registry.cgroup_cache_entries = self.enricher.cgroups.cached();
                registry.proc_socket_entries = self.enricher.proc_sockets();
            }
            if let Some(log) = &mut self.event_log {
                let written = batch
                    .iter()
                    .zip(&identities)
                    .try_for_each(|(e, who)| log.write(e, who))
                    .and_then(|()| log.out.flush());
                if let Err(e) = written {
                    warn!(error = %e, "event log write failed; disabling the event log");
                    self.event_log = None;
                }
            }
            processed += batch.len() as u64;
        }
        info!(events = processed, "state owner drained all events");
    }
}
