//! What the kernel saw per trace on this node, for `vigil explain TRACE_ID`:
//! the connections that carried its HTTP messages, and the retransmits and
//! drops stamped with it. Bounded in traces (the oldest go first) and in
//! connections and events per trace.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{correlate::traceparent::TraceContext, enrich::Identity, events::TraceEvent};

/// Connections and events kept per trace.
const CONNECTIONS_PER_TRACE: usize = 64;
const EVENTS_PER_TRACE: usize = 512;

/// A connection that carried a message of the trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceConnection {
    pub cookie: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// "server" (this side received the request) or "client".
    pub role: String,
    /// Span id of the first message of the trace seen on it.
    pub span_id: String,
    pub first_seen_unix_ns: u64,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub pod_uid: Option<String>,
}

/// A kernel event stamped with the trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceKernelEvent {
    pub at_unix_ns: u64,
    /// "retransmit" or "drop".
    pub kind: String,
    pub cookie: u64,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub span_id: String,
    /// Retransmits: segments the kernel counted.
    pub segments: u32,
    /// Drops: the kernel's reason.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecordOut {
    pub trace_id: String,
    pub first_seen_unix_ns: u64,
    pub connections: Vec<TraceConnection>,
    pub events: Vec<TraceKernelEvent>,
    /// Connections and events not kept (per-trace bounds).
    pub omitted: u64,
}

/// A trace as kept: fixed-size ids and flags, made into strings only when
/// asked for (one trace is indexed per HTTP request: this runs at request
/// rate).
#[derive(Debug)]
struct Trace {
    first_seen_unix_ns: u64,
    connections: Vec<Connection>,
    events: Vec<TraceKernelEvent>,
    omitted: u64,
}

#[derive(Debug)]
struct Connection {
    cookie: u64,
    netns: u32,
    local: SocketAddr,
    remote: SocketAddr,
    server: bool,
    span_id: [u8; 8],
    first_seen_unix_ns: u64,
    /// Shared with every other message of the socket.
    who: Arc<Identity>,
}

impl Trace {
    fn out(&self, id: &[u8; 16]) -> TraceRecordOut {
        TraceRecordOut {
            trace_id: hex::encode(id),
            first_seen_unix_ns: self.first_seen_unix_ns,
            connections: self
                .connections
                .iter()
                .map(|c| TraceConnection {
                    cookie: c.cookie,
                    netns: c.netns,
                    local: c.local,
                    remote: c.remote,
                    role: if c.server { "server" } else { "client" }.into(),
                    span_id: hex::encode(c.span_id),
                    first_seen_unix_ns: c.first_seen_unix_ns,
                    pid: c.who.pid,
                    process: c.who.comm.clone(),
                    pod_uid: c.who.pod.as_ref().map(|p| p.uid.clone()),
                })
                .collect(),
            events: self.events.clone(),
            omitted: self.omitted,
        }
    }
}

#[derive(Debug)]
pub struct TraceIndex {
    /// Trace id -> its slot in `slots`.
    traces: HashMap<[u8; 16], usize>,
    /// Up to `capacity` traces in the order they were first seen, a ring:
    /// the oldest's slot (and its allocations) goes to the next new trace.
    slots: Vec<([u8; 16], Trace)>,
    /// The slot of the oldest trace once `slots` is full.
    oldest: usize,
    capacity: usize,
    /// Traces forgotten to make room.
    pub evicted: u64,
    /// Kernel stamps whose `traceparent` value was not valid W3C.
    pub invalid_stamps: u64,
}

impl TraceIndex {
    pub fn new(capacity: usize) -> TraceIndex {
        TraceIndex {
            traces: HashMap::new(),
            slots: Vec::new(),
            oldest: 0,
            capacity: capacity.max(1),
            evicted: 0,
            invalid_stamps: 0,
        }
    }

    fn entry(&mut self, id: [u8; 16], at_unix_ns: u64) -> &mut Trace {
        let slot = match self.traces.entry(id) {
            std::collections::hash_map::Entry::Occupied(o) => *o.get(),
            std::collections::hash_map::Entry::Vacant(v) if self.slots.len() < self.capacity => {
                v.insert(self.slots.len());
                self.slots.push((
                    id,
                    Trace {
                        first_seen_unix_ns: at_unix_ns,
                        connections: Vec::new(),
                        events: Vec::new(),
                        omitted: 0,
                    },
                ));
                self.slots.len() - 1
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                let slot = self.oldest;
                v.insert(slot);
                self.oldest = (slot + 1) % self.capacity;
                let (old_id, t) = &mut self.slots[slot];
                self.traces.remove(old_id);
                self.evicted += 1;
                *old_id = id;
                t.first_seen_unix_ns = at_unix_ns;
                t.connections.clear();
                t.events.clear();
                t.omitted = 0;
                slot
            }
        };
        &mut self.slots[slot].1
    }

    /// A message of a trace crossed a connection.
    pub fn message(
        &mut self,
        e: &TraceEvent,
        ctx: &TraceContext,
        at_unix_ns: u64,
        who: &Arc<Identity>,
    ) {
        let t = self.entry(ctx.trace_id, at_unix_ns);
        t.first_seen_unix_ns = t.first_seen_unix_ns.min(at_unix_ns);
        if t.connections.iter().any(|c| c.cookie == e.cookie) {
            return;
        }
        if t.connections.len() >= CONNECTIONS_PER_TRACE {
            t.omitted += 1;
            return;
        }
        t.connections.push(Connection {
            cookie: e.cookie,
            netns: e.netns,
            local: e.endpoints.local,
            remote: e.endpoints.remote,
            server: e.server_side(),
            span_id: ctx.span_id,
            first_seen_unix_ns: at_unix_ns,
            who: Arc::clone(who),
        });
    }

    /// A kernel event stamped with a trace.
    pub fn event(&mut self, ctx: &TraceContext, event: TraceKernelEvent) {
        let t = self.entry(ctx.trace_id, event.at_unix_ns);
        if t.events.len() >= EVENTS_PER_TRACE {
            t.omitted += 1;
            return;
        }
        t.events.push(event);
    }

    /// What the index holds of a trace, for `vigil explain`.
    pub fn get(&self, trace_id: &[u8; 16]) -> Option<TraceRecordOut> {
        self.traces
            .get(trace_id)
            .map(|&slot| self.slots[slot].1.out(trace_id))
    }

    pub fn len(&self) -> usize {
        self.traces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::traceparent::Stamp;
    use crate::events::{Endpoints, Message};

    fn ctx(n: u8) -> TraceContext {
        TraceContext {
            trace_id: [n; 16],
            span_id: [n; 8],
            flags: 1,
        }
    }

    fn message(cookie: u64, n: u8) -> TraceEvent {
        TraceEvent {
            ts_ns: 0,
            cookie,
            sk_addr: 0,
            netns: 1,
            sent: false,
            message: Message::Request,
            boundary: 0,
            endpoints: Endpoints {
                local: SocketAddr::from(([198, 18, 0, 1], 8080)),
                remote: SocketAddr::from(([198, 18, 0, 2], 40000)),
            },
            trace: Stamp::Context(ctx(n)),
            owner: None,
        }
    }

    #[test]
    fn bounded_and_oldest_first() {
        let mut ix = TraceIndex::new(2);
        for n in 1..=3 {
            ix.message(&message(u64::from(n), n), &ctx(n), 10, &Arc::default());
        }
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.evicted, 1);
        assert!(ix.get(&[1; 16]).is_none());
        let t = ix.get(&[3; 16]).expect("kept");
        assert_eq!(t.connections.len(), 1);
        assert_eq!(t.connections[0].role, "server");
        // The same connection again is not a second connection.
        ix.message(&message(3, 3), &ctx(3), 20, &Arc::default());
        assert_eq!(ix.get(&[3; 16]).map(|t| t.connections.len()), Some(1));
    }

    /// A slot handed from the oldest trace to a new one keeps nothing of it.
    #[test]
    fn reused_slots_start_empty() {
        let mut ix = TraceIndex::new(2);
        ix.message(&message(1, 1), &ctx(1), 10, &Arc::default());
        ix.event(
            &ctx(1),
            TraceKernelEvent {
                at_unix_ns: 11,
                kind: "drop".into(),
                cookie: 1,
                local: None,
                remote: None,
                span_id: String::new(),
                segments: 0,
                reason: Some("x".into()),
            },
        );
        for n in 2..=5 {
            ix.message(
                &message(u64::from(n), n),
                &ctx(n),
                u64::from(n) * 100,
                &Arc::default(),
            );
        }
        assert_eq!((ix.len(), ix.evicted), (2, 3));
        for n in [4u8, 5] {
            let t = ix.get(&[n; 16]).expect("kept");
            assert_eq!(t.first_seen_unix_ns, u64::from(n) * 100);
            assert_eq!(t.connections.len(), 1);
            assert_eq!(t.connections[0].cookie, u64::from(n));
            assert!(t.events.is_empty());
        }
        assert!(ix.get(&[1; 16]).is_none() && ix.get(&[3; 16]).is_none());
    }

    #[test]
    fn events_per_trace_are_bounded() {
        let mut ix = TraceIndex::new(4);
        for i in 0..(EVENTS_PER_TRACE + 3) {
            ix.event(
                &ctx(7),
                TraceKernelEvent {
                    at_unix_ns: i as u64,
                    kind: "retransmit".into(),
                    cookie: 1,
                    local: None,
                    remote: None,
                    span_id: String::new(),
                    segments: 1,
                    reason: None,
                },
            );
        }
        let t = ix.get(&[7; 16]).expect("kept");
        assert_eq!(t.events.len(), EVENTS_PER_TRACE);
        assert_eq!(t.omitted, 3);
    }
}
