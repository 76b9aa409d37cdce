//! Ring-buffer sources: one task per ring drains it when the kernel signals
//! data, decodes each record once, and hands batches to the state owner over a
//! bounded channel. A full channel drops the batch and counts it: the kernel
//! must never wait for userspace.

use std::sync::{atomic::Ordering, Arc};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    events::{KernelEvent, RetransmitKind, RingRecord, TraceSockets},
    metrics::PipelineStats,
};

pub type Batch = Vec<KernelEvent>;

pub struct RingSource {
    pub ring: RingBuf<MapData>,
    pub tx: mpsc::Sender<Batch>,
    pub stats: Arc<PipelineStats>,
    pub batch_max_events: usize,
    /// Drain this often even without a wakeup (the kernel wakes the agent only
    /// for large backlogs).
    pub poll_interval: std::time::Duration,
    /// Sockets of traced messages remembered for joining (see `TraceSockets`).
    pub trace_sockets: usize,
}

impl RingSource {
    /// Runs until `stop`, then drains what the ring still holds and returns.
    pub async fn run(self, stop: CancellationToken) -> std::io::Result<()> {
        let RingSource {
            ring,
            tx,
            stats,
            batch_max_events,
            poll_interval,
            trace_sockets,
        } = self;
        let mut drain = Drain {
            tx,
            records: RecordDecoder::new(Arc::clone(&stats), trace_sockets),
            stats,
            batch_max: batch_max_events,
        };
        let mut tick = tokio::time::interval(poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fd = readable(ring)?;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    drain.run(guard.get_inner_mut());
                    // A wakeup that raced the drain above is erased by clear_ready;
                    // drain once more after it so those records do not wait a tick.
                    guard.clear_ready();
                    drain.run(guard.get_inner_mut());
                }
                _ = tick.tick() => drain.run(fd.get_mut()),
            }
        }
        drain.run(fd.get_mut());
        debug!("ring source stopped");
        Ok(())
    }
}

/// Drains the ring into batches for the state owner.
struct Drain {
    tx: mpsc::Sender<Batch>,
    stats: Arc<PipelineStats>,
    batch_max: usize,
    records: RecordDecoder,
}

/// Turns ring records into events: decodes each, joins traced messages with
/// their announced sockets, and counts what it received and could not place.
pub struct RecordDecoder {
    stats: Arc<PipelineStats>,
    sockets: TraceSockets,
}

impl RecordDecoder {
    /// `trace_sockets`: sockets of traced messages remembered for joining.
    pub fn new(stats: Arc<PipelineStats>, trace_sockets: usize) -> RecordDecoder {
        RecordDecoder {
            stats,
            sockets: TraceSockets::new(trace_sockets),
        }
    }

    /// The event a record makes, if any (socket announcements and records
    /// that do not decode make none).
    pub fn decode(&mut self, bytes: &[u8]) -> Option<KernelEvent> {
        let stats = &self.stats;
        let event = match RingRecord::decode(bytes) {
            Ok(RingRecord::Event(e)) => e,
            Ok(RingRecord::TraceSocket(s)) => {
                self.sockets.insert(s);
                return None;
            }
            Ok(RingRecord::TraceMessage(m)) => {
                let Some(joined) = self.sockets.join(m) else {
                    stats.trace_unplaced.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                KernelEvent::Trace(joined)
            }
            Err(err) => {
                stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                debug!(error = %err, "undecodable ring record");
                return None;
            }
        };
        let counter = match &event {
            KernelEvent::Retransmit(r) => match r.kind {
                RetransmitKind::Segment | RetransmitKind::Unseen => &stats.received_retransmit,
                RetransmitKind::SynAck | RetransmitKind::SynAckUnseen => &stats.received_synack,
            },
            KernelEvent::Drop(_) => &stats.received_drop,
            KernelEvent::Trace(_) => &stats.received_trace,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Some(event)
    }
}

impl Drain {
    fn send(&self, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        if let Err(e) = self.tx.try_send(batch) {
            self.stats.channel_dropped.fetch_add(n, Ordering::Relaxed);
            if matches!(e, mpsc::error::TrySendError::Full(_)) {
                warn!(events = n, "state owner is behind; dropped a batch of events (counted in vigil_events_dropped_total)");
            }
        }
    }

    fn run(&mut self, ring: &mut RingBuf<MapData>) {
        let mut batch = Vec::with_capacity(self.batch_max);
        while let Some(item) = ring.next() {
            let Some(e) = self.records.decode(&item) else {
                continue;
            };
            batch.push(e);
            if batch.len() >= self.batch_max {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_max));
                self.send(full);
            }
        }
        self.send(batch);
    }
}

/// Registers a ring buffer (or what wraps one) with the runtime for readiness.
fn readable<T: std::os::fd::AsRawFd>(ring: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `ring` owns its map fd, and the AsyncFd owns `ring` until dropped.
    unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Forwards the kernel programs' aya-log records into the agent's log until `stop`.
pub async fn forward_kernel_logs(
    logger: crate::loader::KernelLogger,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut fd = readable(logger)?;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
                guard.get_inner_mut().flush();
            }
        }
    }
    fd.get_mut().flush();
    Ok(())
}
