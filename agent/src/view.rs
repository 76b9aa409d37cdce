//! The seam between the state owner and its readers. The state owner alone
//! holds the aggregates (no lock); it publishes an immutable `View` of them
//! through a `watch`, which exporters and controllers read without waiting on
//! the event path and without making it wait. Questions about one trace, too
//! big to copy into every view, are asked of the owner through `TraceQueries`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    correlate::traces::TraceRecordOut, exposition::Exposition, socket_health::SocketTable,
};

/// How stale a view may be while events arrive: the owner publishes at most
/// this often, and at least this often while something changed. A socket
/// sample is published at once.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

/// The aggregates at one moment.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Per-owner counters and gauges, socket health, the trace index's and the
    /// series budget's own counters: what `Registry::families` gives.
    pub families: Exposition,
    /// The latest socket sample's listeners and connections (`/v1/sockets`).
    pub sockets: Arc<SocketTable>,
    /// Events the owner has applied since it started.
    pub events_applied: u64,
}

pub type ViewReceiver = watch::Receiver<Arc<View>>;

/// A new channel with an empty view: readers see no aggregates until the
/// owner's first publication.
pub fn channel() -> (Publisher, ViewReceiver) {
    let (tx, rx) = watch::channel(Arc::new(View::default()));
    (
        Publisher {
            tx,
            published_at: Instant::now(),
            changed: false,
        },
        rx,
    )
}

/// The owner's end: remembers whether anything changed since the last view.
pub struct Publisher {
    tx: watch::Sender<Arc<View>>,
    published_at: Instant,
    changed: bool,
}

impl Publisher {
    /// Something the next view will show has changed.
    pub fn mark_changed(&mut self) {
        self.changed = true;
    }

    /// Whether a view is due: something changed and the last one is at least
    /// `PUBLISH_INTERVAL` old.
    pub fn due(&self) -> bool {
        self.changed && self.published_at.elapsed() >= PUBLISH_INTERVAL
    }

    pub fn publish(&mut self, view: View) {
        // No reader left (shutting down) is not an error for the owner.
        self.tx.send_replace(Arc::new(view));
        self.published_at = Instant::now();
        self.changed = false;
    }
}

/// One question about a trace: its kernel record, if the index has it.
pub struct TraceQuery {
    pub trace_id: [u8; 16],
    pub reply: oneshot::Sender<Option<TraceRecordOut>>,
}

/// The readers' end of the owner's trace questions. Bounded: a flood of
/// `vigil explain` requests waits here, never grows the owner's queue.
#[derive(Clone)]
pub struct TraceQueries(mpsc::Sender<TraceQuery>);

/// Questions in flight at most.
const TRACE_QUERIES: usize = 16;

pub fn trace_queries() -> (TraceQueries, mpsc::Receiver<TraceQuery>) {
    let (tx, rx) = mpsc::channel(TRACE_QUERIES);
    (TraceQueries(tx), rx)
}

/// The state owner has stopped (the agent is shutting down).
#[derive(Debug)]
pub struct OwnerStopped;

impl TraceQueries {
    /// The owner's answer: the trace's record, None if the index has none.
    pub async fn ask(&self, trace_id: [u8; 16]) -> Result<Option<TraceRecordOut>, OwnerStopped> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(TraceQuery { trace_id, reply })
            .await
            .map_err(|_| OwnerStopped)?;
        answer.await.map_err(|_| OwnerStopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_is_due_only_after_a_change_and_the_interval() {
        let (mut publisher, rx) = channel();
        assert!(!publisher.due(), "nothing changed");
        publisher.mark_changed();
        publisher.published_at = Instant::now();
        assert!(!publisher.due(), "published just now");
        publisher.published_at = Instant::now() - PUBLISH_INTERVAL;
        assert!(publisher.due());
        publisher.publish(View {
            events_applied: 3,
            ..View::default()
        });
        assert!(!publisher.due());
        assert_eq!(rx.borrow().events_applied, 3);
    }
}
