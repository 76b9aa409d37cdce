//! What the kernel saw per trace on this node, for `vigil explain TRACE_ID`:
//! the connections that carried its HTTP messages, and the retransmits and
//! drops stamped with it. Bounded in traces (the oldest go first) and in
//! connections and events per trace.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
};

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
    pid: Option<u32>,
    process: Option<String>,
    pod_uid: Option<String>,
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
                    pid: c.pid,
                    process: c.process.clone(),
                    pod_uid: c.pod_uid.clone(),
                })
                .collect(),
            events: self.events.clone(),
            omitted: self.omitted,
        }
    }
}

#[derive(Debug)]
pub struct TraceIndex {
    traces: HashMap<[u8; 16], Trace>,
    order: VecDeque<[u8; 16]>,
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
            order: VecDeque::new(),
            capacity: capacity.max(1),
            evicted: 0,
            invalid_stamps: 0,
        }
    }

    fn entry(&mut self, id: [u8; 16], at_unix_ns: u64) -> &mut Trace {
        if !self.traces.contains_key(&id) {
            while self.traces.len() >= self.capacity {
                let Some(oldest) = self.order.pop_front() else {
                    break;
                };
                self.traces.remove(&oldest);
                self.evicted += 1;
            }
            self.order.push_back(id);
        }
        self.traces.entry(id).or_insert_with(|| Trace {
            first_seen_unix_ns: at_unix_ns,
            connections: Vec::new(),
            events: Vec::new(),
            omitted: 0,
        })
    }

    /// A message of a trace crossed a connection.
    pub fn message(&mut self, e: &TraceEvent, ctx: &TraceContext, at_unix_ns: u64, who: &Identity) {
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
            pid: who.pid,
            process: who.comm.clone(),
            pod_uid: who.pod.as_ref().map(|p| p.uid.clone()),
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
        self.traces.get(trace_id).map(|t| t.out(trace_id))
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
            ix.message(&message(u64::from(n), n), &ctx(n), 10, &Identity::default());
        }
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.evicted, 1);
        assert!(ix.get(&[1; 16]).is_none());
        let t = ix.get(&[3; 16]).expect("kept");
        assert_eq!(t.connections.len(), 1);
        assert_eq!(t.connections[0].role, "server");
        // The same connection again is not a second connection.
        ix.message(&message(3, 3), &ctx(3), 20, &Identity::default());
        assert_eq!(ix.get(&[3; 16]).map(|t| t.connections.len()), Some(1));
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
