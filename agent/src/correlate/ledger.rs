//! What the kernel saw per connection, kept for a while so spans that arrive
//! later over OTLP (TLS, HTTP/2, gRPC: the kernel cannot read their headers)
//! can be joined with the events of their connection inside their time window.
//! Bounded in connections, in events per connection and in age.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
};

/// One connection as the kernel names it: this node's side first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl ConnKey {
    pub fn new(netns: u32, ep: crate::events::Endpoints) -> ConnKey {
        ConnKey {
            netns,
            local: ep.local,
            remote: ep.remote,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerEvent {
    /// Segments the kernel counted in RetransSegs.
    Retransmit { segments: u32 },
    /// A packet dropped for this socket, with the drop reason's name.
    Drop { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timed<T> {
    pub at_unix_ns: u64,
    pub what: T,
}

#[derive(Debug, Default)]
pub struct ConnHistory {
    /// Oldest first; at most `events_per_connection`.
    pub events: VecDeque<Timed<LedgerEvent>>,
    /// Smoothed RTT samples (µs) from the socket sampler, oldest first.
    pub srtt_us: VecDeque<Timed<u32>>,
    /// Events forgotten because the connection had too many.
    pub events_evicted: u64,
    pub last_seen_unix_ns: u64,
}

/// Accept-queue fill of one listener at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFill {
    pub len: u32,
    pub cap: u32,
}

#[derive(Debug)]
pub struct ConnectionLedger {
    connections: HashMap<ConnKey, ConnHistory>,
    /// Keys in the order they were first seen, to evict the oldest first.
    order: VecDeque<ConnKey>,
    /// Keys by remote side: a span names its peer, so joining one must not
    /// scan every connection of the node.
    by_remote: HashMap<SocketAddr, Vec<ConnKey>>,
    listeners: HashMap<(u32, SocketAddr), VecDeque<Timed<QueueFill>>>,
    max_connections: usize,
    events_per_connection: usize,
    retention_ns: u64,
    /// Connections forgotten before their retention ran out (ledger full).
    pub connections_evicted: u64,
}

/// RTT and queue samples kept per connection/listener: enough to cover a
/// span at the sampler's pace without growing with the connection's age.
const SAMPLES_KEPT: usize = 64;

impl ConnectionLedger {
    pub fn new(
        max_connections: usize,
        events_per_connection: usize,
        retention: std::time::Duration,
    ) -> ConnectionLedger {
        ConnectionLedger {
            connections: HashMap::new(),
            order: VecDeque::new(),
            by_remote: HashMap::new(),
            listeners: HashMap::new(),
            max_connections: max_connections.max(1),
            events_per_connection: events_per_connection.max(1),
            retention_ns: u64::try_from(retention.as_nanos()).unwrap_or(u64::MAX),
            connections_evicted: 0,
        }
    }

    fn history(&mut self, key: ConnKey, now: u64) -> &mut ConnHistory {
        if !self.connections.contains_key(&key) {
            while self.connections.len() >= self.max_connections {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                if self.connections.remove(&oldest).is_some() {
                    self.connections_evicted += 1;
                    self.unindex(&oldest);
                }
            }
            self.order.push_back(key);
            self.by_remote.entry(key.remote).or_default().push(key);
        }
        let h = self.connections.entry(key).or_default();
        h.last_seen_unix_ns = h.last_seen_unix_ns.max(now);
        h
    }

    /// Forgets connections and listeners not seen within the retention; one
    /// pass over the ledger, so the state owner calls it once per socket sample.
    pub fn expire(&mut self, now: u64) {
        let horizon = now.saturating_sub(self.retention_ns);
        self.connections
            .retain(|_, h| h.last_seen_unix_ns >= horizon);
        let connections = &self.connections;
        self.order.retain(|k| connections.contains_key(k));
        self.by_remote.retain(|_, keys| {
            keys.retain(|k| connections.contains_key(k));
            !keys.is_empty()
        });
        self.listeners
            .retain(|_, samples| samples.back().is_some_and(|s| s.at_unix_ns >= horizon));
    }

    fn unindex(&mut self, key: &ConnKey) {
        if let Some(keys) = self.by_remote.get_mut(&key.remote) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_remote.remove(&key.remote);
            }
        }
    }

    pub fn record(&mut self, key: ConnKey, at_unix_ns: u64, what: LedgerEvent) {
        let cap = self.events_per_connection;
        let h = self.history(key, at_unix_ns);
        if h.events.len() >= cap {
            h.events.pop_front();
            h.events_evicted += 1;
        }
        h.events.push_back(Timed { at_unix_ns, what });
    }

    pub fn observe_connection(&mut self, key: ConnKey, at_unix_ns: u64, srtt_us: u32) {
        let h = self.history(key, at_unix_ns);
        if h.srtt_us.len() >= SAMPLES_KEPT {
            h.srtt_us.pop_front();
        }
        h.srtt_us.push_back(Timed {
            at_unix_ns,
            what: srtt_us,
        });
    }

    pub fn observe_listener(
        &mut self,
        netns: u32,
        local: SocketAddr,
        at_unix_ns: u64,
        fill: QueueFill,
    ) {
        let samples = self.listeners.entry((netns, local)).or_default();
        if samples.len() >= SAMPLES_KEPT {
            samples.pop_front();
        }
        samples.push_back(Timed {
            at_unix_ns,
            what: fill,
        });
    }

    pub fn connection(&self, key: &ConnKey) -> Option<&ConnHistory> {
        self.connections.get(key)
    }

    /// Connections whose remote side is `peer` (any netns, any local side).
    pub fn by_peer(&self, peer: SocketAddr) -> impl Iterator<Item = (&ConnKey, &ConnHistory)> {
        self.by_remote
            .get(&peer)
            .into_iter()
            .flatten()
            .filter_map(|k| self.connections.get(k).map(|h| (k, h)))
    }

    /// Samples of the listeners on `port` (any address, any netns).
    pub fn listener_fill(&self, port: u16) -> impl Iterator<Item = &Timed<QueueFill>> {
        self.listeners
            .iter()
            .filter(move |((_, local), _)| local.port() == port)
            .flat_map(|(_, samples)| samples.iter())
    }

    /// Samples of the listeners on `port` in network namespace `netns` (any
    /// address: a wildcard listener and specific ones alike).
    pub fn listener_samples(
        &self,
        netns: u32,
        port: u16,
    ) -> impl Iterator<Item = &Timed<QueueFill>> {
        self.listeners
            .iter()
            .filter(move |((ns, local), _)| *ns == netns && local.port() == port)
            .flat_map(|(_, samples)| samples.iter())
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(port: u16) -> ConnKey {
        ConnKey {
            netns: 1,
            local: SocketAddr::from(([198, 18, 0, 1], 8080)),
            remote: SocketAddr::from(([198, 18, 0, 2], port)),
        }
    }

    #[test]
    fn bounded_in_connections_events_and_age() {
        let mut l = ConnectionLedger::new(2, 3, Duration::from_secs(10));
        for i in 0..5 {
            l.record(key(1), i, LedgerEvent::Retransmit { segments: 1 });
        }
        let h = l.connection(&key(1)).expect("kept");
        assert_eq!(h.events.len(), 3);
        assert_eq!(h.events_evicted, 2);
        assert_eq!(h.events.front().map(|e| e.at_unix_ns), Some(2));
        l.record(key(2), 5, LedgerEvent::Retransmit { segments: 1 });
        l.record(key(3), 6, LedgerEvent::Retransmit { segments: 1 });
        assert_eq!(l.len(), 2);
        assert_eq!(l.connections_evicted, 1);
        assert!(l.connection(&key(1)).is_none(), "the oldest goes first");
        // Eleven seconds later key(2) and key(3) are past retention.
        l.expire(11_000_000_000 + 6);
        assert!(l.is_empty());
        assert_eq!(l.connections_evicted, 1, "expiry is not eviction");
    }

    #[test]
    fn a_connection_seen_again_outlives_older_ones() {
        let mut l = ConnectionLedger::new(10, 3, Duration::from_secs(10));
        l.record(key(1), 0, LedgerEvent::Retransmit { segments: 1 });
        l.record(key(2), 1, LedgerEvent::Retransmit { segments: 1 });
        l.observe_connection(key(1), 9_000_000_000, 250);
        l.expire(10_500_000_000);
        assert!(l.connection(&key(1)).is_some());
        assert!(l.connection(&key(2)).is_none());
        assert_eq!(l.by_peer(key(1).remote).count(), 1);
        assert_eq!(
            l.by_peer(key(2).remote).count(),
            0,
            "expired from the index too"
        );
    }

    #[test]
    fn the_peer_index_follows_eviction() {
        let mut l = ConnectionLedger::new(2, 3, Duration::from_secs(10));
        let other_ns = ConnKey { netns: 2, ..key(1) };
        l.record(key(1), 0, LedgerEvent::Retransmit { segments: 1 });
        l.record(other_ns, 1, LedgerEvent::Retransmit { segments: 1 });
        assert_eq!(l.by_peer(key(1).remote).count(), 2, "same peer, two netns");
        l.record(key(2), 2, LedgerEvent::Retransmit { segments: 1 });
        let left: Vec<&ConnKey> = l.by_peer(key(1).remote).map(|(k, _)| k).collect();
        assert_eq!(left, vec![&other_ns], "the evicted one left the index");
        l.observe_listener(
            1,
            SocketAddr::from(([0, 0, 0, 0], 8080)),
            3,
            QueueFill { len: 1, cap: 8 },
        );
        l.observe_listener(
            2,
            SocketAddr::from(([0, 0, 0, 0], 8080)),
            3,
            QueueFill { len: 2, cap: 8 },
        );
        assert_eq!(l.listener_samples(1, 8080).count(), 1);
        assert_eq!(l.listener_fill(8080).count(), 2);
    }
}
