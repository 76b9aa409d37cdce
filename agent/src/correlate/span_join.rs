//! Joins a span received over OTLP with what the kernel saw on its
//! connection while the span ran: the connection is found from the span's
//! OpenTelemetry semantic-convention attributes, its ledger entries inside
//! [start, end] are summed into `vigil.tcp.*` attributes and listed as span
//! events. Pure: no I/O, no clock.

use std::net::{IpAddr, SocketAddr};

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::{Event, SpanKind};
use opentelemetry_proto::tonic::trace::v1::Span;

use super::ledger::{ConnHistory, ConnKey, ConnectionLedger, LedgerEvent, QueueFill, Timed};

/// true when a connection was found (every span gets it, so a forwarded
/// span always says whether it was joined).
pub const JOINED: &str = "vigil.tcp.joined";
pub const RETRANSMITTED_SEGMENTS: &str = "vigil.tcp.retransmitted_segments";
pub const DROPS: &str = "vigil.tcp.drops";
/// Smoothed RTT of the latest sample at or before the span's end, else the
/// first one after it.
pub const SRTT_US: &str = "vigil.tcp.srtt_us";
pub const LISTEN_QUEUE_LENGTH: &str = "vigil.tcp.listen_queue.length";
pub const LISTEN_QUEUE_CAPACITY: &str = "vigil.tcp.listen_queue.capacity";
/// The network namespace (inode) of the connection joined.
pub const NETNS: &str = "vigil.netns";
/// Kernel events in the window beyond the per-span cap of span events.
pub const EVENTS_OMITTED: &str = "vigil.tcp.events_omitted";
/// The connection had more events than the ledger keeps and the oldest kept
/// one is inside the window: the counts may be low.
pub const HISTORY_TRUNCATED: &str = "vigil.tcp.history_truncated";
pub const RETRANSMIT_EVENT: &str = "vigil.tcp.retransmit";
pub const DROP_EVENT: &str = "vigil.tcp.drop";
pub const DROP_REASON: &str = "vigil.drop.reason";

/// Where a span's connection is, as its attributes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnHint {
    /// The other end of the connection.
    pub peer: SocketAddr,
    /// This end's port, when the span says it.
    pub local_port: Option<u16>,
    /// false when `local_port` is a SERVER span's `server.port`: a proxy or
    /// a Service port may differ from the socket's, so it narrows the choice
    /// only when some connection matches it.
    pub local_port_exact: bool,
    /// A SERVER span: its listener's accept queue is reported too.
    pub server_side: bool,
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()
}

/// An IP literal (IPv6 with or without brackets); host names are not resolved.
fn ip_attr(attrs: &[KeyValue], key: &str) -> Option<IpAddr> {
    match attr(attrs, key)? {
        any_value::Value::StringValue(s) => {
            let s = s.trim();
            let s = s
                .strip_prefix('[')
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(s);
            s.parse().ok()
        }
        _ => None,
    }
}

/// Ports are ints by the conventions; some instrumentations send strings.
fn port_attr(attrs: &[KeyValue], key: &str) -> Option<u16> {
    let port = match attr(attrs, key)? {
        any_value::Value::IntValue(i) => u16::try_from(*i).ok(),
        any_value::Value::StringValue(s) => s.trim().parse().ok(),
        _ => None,
    };
    port.filter(|p| *p != 0)
}

/// The connection per the semantic conventions: `network.peer.*` (the
/// socket's own peer) first; else `client.*` for SERVER spans and
/// `server.*` (IP literals only) for CLIENT spans. Narrowed by
/// `network.local.port`, or a SERVER span's `server.port`.
pub fn hint(kind: SpanKind, attrs: &[KeyValue]) -> Option<ConnHint> {
    let pair = |address: &str, port: &str| {
        Some(SocketAddr::new(
            ip_attr(attrs, address)?,
            port_attr(attrs, port)?,
        ))
    };
    let peer = pair("network.peer.address", "network.peer.port").or_else(|| match kind {
        SpanKind::Server => pair("client.address", "client.port"),
        SpanKind::Client => pair("server.address", "server.port"),
        _ => None,
    })?;
    let server_side = kind == SpanKind::Server;
    let (local_port, local_port_exact) = match port_attr(attrs, "network.local.port") {
        Some(p) => (Some(p), true),
        None if server_side => (port_attr(attrs, "server.port"), false),
        None => (None, false),
    };
    Some(ConnHint {
        peer,
        local_port,
        local_port_exact,
        server_side,
    })
}

/// The same endpoint in the other address family's spelling: dual-stack
/// sockets see IPv4 peers as `::ffff:a.b.c.d`, the service may say `a.b.c.d`.
fn other_spelling(a: SocketAddr) -> Option<SocketAddr> {
    match a.ip() {
        IpAddr::V4(v4) => Some(SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port())),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
    }
}

/// What the kernel saw on a span's connection during the span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub key: ConnKey,
    pub retransmitted_segments: u64,
    pub drops: u64,
    pub srtt_us: Option<u32>,
    /// SERVER spans: the fullest sample of the listener in the window, else
    /// the one nearest its end (samples are `sampler.interval_ms` apart,
    /// most spans are shorter).
    pub listen_queue: Option<QueueFill>,
    /// Kernel events inside the window, oldest first.
    pub events: Vec<Timed<LedgerEvent>>,
    pub truncated: bool,
}

fn within(at: u64, start: u64, end: u64) -> bool {
    (start..=end).contains(&at)
}

/// The latest sample at or before `end`, else the first after it.
fn nearest<'a, T>(samples: impl Iterator<Item = &'a Timed<T>>, end: u64) -> Option<&'a Timed<T>>
where
    T: 'a,
{
    let (mut before, mut after): (Option<&Timed<T>>, Option<&Timed<T>>) = (None, None);
    for s in samples {
        if s.at_unix_ns <= end {
            if before.is_none_or(|b| s.at_unix_ns >= b.at_unix_ns) {
                before = Some(s);
            }
        } else if after.is_none_or(|a| s.at_unix_ns < a.at_unix_ns) {
            after = Some(s);
        }
    }
    before.or(after)
}

fn active(h: &ConnHistory, start: u64, end: u64) -> bool {
    h.events.iter().any(|e| within(e.at_unix_ns, start, end))
        || h.srtt_us.iter().any(|s| within(s.at_unix_ns, start, end))
}

/// The span's connection and its kernel events with `at_unix_ns` in
/// [start, end]; `None` when the ledger holds no such connection.
pub fn join(hint: &ConnHint, start: u64, end: u64, ledger: &ConnectionLedger) -> Option<Joined> {
    let end = end.max(start);
    let candidates: Vec<(&ConnKey, &ConnHistory)> = [Some(hint.peer), other_spelling(hint.peer)]
        .into_iter()
        .flatten()
        .flat_map(|peer| ledger.by_peer(peer))
        .collect();
    let on_port: Vec<(&ConnKey, &ConnHistory)> = candidates
        .iter()
        .filter(|(k, _)| hint.local_port.is_none_or(|p| k.local.port() == p))
        .copied()
        .collect();
    let pool = if on_port.is_empty() && !hint.local_port_exact {
        candidates
    } else {
        on_port
    };
    // The same peer address in several network namespaces (pods behind one
    // NAT'd address, reused test subnets): the connection the kernel saw
    // active during the span is this span's; failing that, the latest seen.
    let (key, h) = pool
        .into_iter()
        .max_by_key(|(_, h)| (active(h, start, end), h.last_seen_unix_ns))?;
    let mut events: Vec<Timed<LedgerEvent>> = h
        .events
        .iter()
        .filter(|e| within(e.at_unix_ns, start, end))
        .cloned()
        .collect();
    // Recorded in arrival order, which several CPUs' rings may interleave.
    events.sort_by_key(|e| e.at_unix_ns);
    let (mut retransmitted_segments, mut drops) = (0u64, 0u64);
    for e in &events {
        match e.what {
            LedgerEvent::Retransmit { segments } => {
                retransmitted_segments += u64::from(segments);
            }
            LedgerEvent::Drop { .. } => drops += 1,
        }
    }
    let listen_queue = if hint.server_side {
        let samples = || ledger.listener_samples(key.netns, key.local.port());
        samples()
            .filter(|s| within(s.at_unix_ns, start, end))
            .max_by_key(|s| (s.what.len, s.at_unix_ns))
            .or_else(|| nearest(samples(), end))
            .map(|s| s.what)
    } else {
        None
    };
    Some(Joined {
        key: *key,
        retransmitted_segments,
        drops,
        srtt_us: nearest(h.srtt_us.iter(), end).map(|s| s.what),
        listen_queue,
        truncated: h.events_evicted > 0 && h.events.front().is_some_and(|e| e.at_unix_ns > start),
        events,
    })
}

fn value(v: any_value::Value) -> Option<AnyValue> {
    Some(AnyValue { value: Some(v) })
}

fn int(n: u64) -> any_value::Value {
    any_value::Value::IntValue(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Sets `key`, replacing a value the span already had (no duplicate keys).
fn set(attrs: &mut Vec<KeyValue>, key: &str, v: any_value::Value) {
    match attrs.iter_mut().find(|kv| kv.key == key) {
        Some(kv) => kv.value = value(v),
        None => attrs.push(KeyValue {
            key: key.to_owned(),
            value: value(v),
            ..Default::default()
        }),
    }
}

fn span_event(e: &Timed<LedgerEvent>) -> Event {
    let (name, key, v) = match &e.what {
        LedgerEvent::Retransmit { segments } => (
            RETRANSMIT_EVENT,
            RETRANSMITTED_SEGMENTS,
            int(u64::from(*segments)),
        ),
        LedgerEvent::Drop { reason } => (
            DROP_EVENT,
            DROP_REASON,
            any_value::Value::StringValue(reason.clone()),
        ),
    };
    Event {
        time_unix_nano: e.at_unix_ns,
        name: name.to_owned(),
        attributes: vec![KeyValue {
            key: key.to_owned(),
            value: value(v),
            ..Default::default()
        }],
        dropped_attributes_count: 0,
    }
}

/// Adds what the join found to the span: `vigil.tcp.joined` always, the
/// `vigil.tcp.*` attributes and at most `max_events` span events when joined.
pub fn apply(span: &mut Span, joined: Option<&Joined>, max_events: usize) {
    set(
        &mut span.attributes,
        JOINED,
        any_value::Value::BoolValue(joined.is_some()),
    );
    let Some(j) = joined else {
        return;
    };
    let a = &mut span.attributes;
    set(a, NETNS, int(u64::from(j.key.netns)));
    set(a, RETRANSMITTED_SEGMENTS, int(j.retransmitted_segments));
    set(a, DROPS, int(j.drops));
    if let Some(srtt) = j.srtt_us {
        set(a, SRTT_US, int(u64::from(srtt)));
    }
    if let Some(q) = j.listen_queue {
        set(a, LISTEN_QUEUE_LENGTH, int(u64::from(q.len)));
        set(a, LISTEN_QUEUE_CAPACITY, int(u64::from(q.cap)));
    }
    if j.truncated {
        set(a, HISTORY_TRUNCATED, any_value::Value::BoolValue(true));
    }
    let omitted = j.events.len().saturating_sub(max_events);
    if omitted > 0 {
        set(a, EVENTS_OMITTED, int(omitted as u64));
    }
    span.events
        .extend(j.events.iter().take(max_events).map(span_event));
}

/// Finds the span's connection in `ledger` and adds what the kernel saw;
/// true when joined.
pub fn enrich(span: &mut Span, ledger: &ConnectionLedger, max_events: usize) -> bool {
    let kind = SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified);
    let joined = hint(kind, &span.attributes).and_then(|h| {
        join(
            &h,
            span.start_time_unix_nano,
            span.end_time_unix_nano,
            ledger,
        )
    });
    apply(span, joined.as_ref(), max_events);
    joined.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn s(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: value(any_value::Value::StringValue(v.into())),
            ..Default::default()
        }
    }

    fn i(k: &str, v: i64) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: value(any_value::Value::IntValue(v)),
            ..Default::default()
        }
    }

    fn get<'a>(span: &'a Span, key: &str) -> Option<&'a any_value::Value> {
        attr(&span.attributes, key)
    }

    fn get_int(span: &Span, key: &str) -> Option<i64> {
        match get(span, key)? {
            any_value::Value::IntValue(v) => Some(*v),
            _ => None,
        }
    }

    const SERVER: ([u8; 4], u16) = ([198, 18, 70, 1], 8080);
    const CLIENT: ([u8; 4], u16) = ([198, 18, 70, 2], 40_000);

    fn server_key(netns: u32) -> ConnKey {
        ConnKey {
            netns,
            local: SocketAddr::from(SERVER),
            remote: SocketAddr::from(CLIENT),
        }
    }

    fn retransmit(segments: u32) -> LedgerEvent {
        LedgerEvent::Retransmit { segments }
    }

    fn ledger() -> ConnectionLedger {
        ConnectionLedger::new(100, 100, Duration::from_secs(600))
    }

    fn server_span(start: u64, end: u64) -> Span {
        Span {
            kind: SpanKind::Server as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: end,
            attributes: vec![
                s("client.address", "198.18.70.2"),
                i("client.port", 40_000),
                i("server.port", 8080),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn hints_follow_the_semantic_conventions() {
        let peer = SocketAddr::from(CLIENT);
        let h = hint(SpanKind::Server, &server_span(0, 1).attributes).expect("client.*");
        assert_eq!(
            h,
            ConnHint {
                peer,
                local_port: Some(8080),
                local_port_exact: false,
                server_side: true
            }
        );
        // network.peer.* (the socket's own peer) beats client.* (maybe the
        // original client behind a proxy); network.local.port is exact.
        let attrs = [
            s("client.address", "203.0.113.9"),
            i("client.port", 1),
            s("network.peer.address", "198.18.70.2"),
            s("network.peer.port", "40000"),
            i("network.local.port", 8081),
        ];
        let h = hint(SpanKind::Server, &attrs).expect("network.peer.*");
        assert_eq!(
            (h.peer, h.local_port, h.local_port_exact),
            (peer, Some(8081), true)
        );
        // CLIENT spans: server.* when it is an IP literal, brackets allowed.
        let h = hint(
            SpanKind::Client,
            &[s("server.address", "[2001:2::1]"), i("server.port", 443)],
        )
        .expect("IPv6 literal");
        assert_eq!(h.peer, "[2001:2::1]:443".parse().expect("addr"));
        assert!(!h.server_side && h.local_port.is_none());
        for (kind, attrs) in [
            (
                SpanKind::Client,
                vec![s("server.address", "origin.video"), i("server.port", 443)],
            ),
            (
                SpanKind::Internal,
                vec![s("client.address", "198.18.70.2"), i("client.port", 1)],
            ),
            (
                SpanKind::Server,
                vec![s("client.address", "198.18.70.2"), i("client.port", 70_000)],
            ),
            (
                SpanKind::Server,
                vec![s("client.address", "198.18.70.2"), i("client.port", 0)],
            ),
            (
                SpanKind::Server,
                vec![i("client.address", 7), i("client.port", 1)],
            ),
        ] {
            assert_eq!(hint(kind, &attrs), None, "{kind:?} {attrs:?}");
        }
    }

    #[test]
    fn sums_exactly_the_events_inside_the_window() {
        let mut l = ledger();
        let k = server_key(1);
        for (at, segs) in [(99, 100), (100, 1), (150, 2), (200, 4), (201, 100)] {
            l.record(k, at, retransmit(segs));
        }
        l.record(
            k,
            160,
            LedgerEvent::Drop {
                reason: "SOCKET_RCVBUFF".into(),
            },
        );
        l.observe_connection(k, 50, 900);
        l.observe_connection(k, 190, 300);
        l.observe_connection(k, 250, 700);
        let mut span = server_span(100, 200);
        assert!(enrich(&mut span, &l, 32));
        assert_eq!(get(&span, JOINED), Some(&any_value::Value::BoolValue(true)));
        assert_eq!(
            get_int(&span, RETRANSMITTED_SEGMENTS),
            Some(7),
            "both ends inclusive"
        );
        assert_eq!(get_int(&span, DROPS), Some(1));
        assert_eq!(
            get_int(&span, SRTT_US),
            Some(300),
            "latest sample before the end"
        );
        assert_eq!(get_int(&span, NETNS), Some(1));
        let names: Vec<(&str, u64)> = span
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.time_unix_nano))
            .collect();
        assert_eq!(
            names,
            vec![
                (RETRANSMIT_EVENT, 100),
                (RETRANSMIT_EVENT, 150),
                (DROP_EVENT, 160),
                (RETRANSMIT_EVENT, 200)
            ]
        );
        assert_eq!(
            span.events[2].attributes,
            vec![s(DROP_REASON, "SOCKET_RCVBUFF")]
        );
        assert_eq!(get(&span, EVENTS_OMITTED), None);

        // No sample at or before the end: the first one after it.
        let mut span = server_span(10, 20);
        assert!(enrich(&mut span, &l, 32));
        assert_eq!(get_int(&span, SRTT_US), Some(900));
        assert_eq!(get_int(&span, RETRANSMITTED_SEGMENTS), Some(0));
        assert!(span.events.is_empty());
    }

    #[test]
    fn listener_fill_for_server_spans_only() {
        let mut l = ledger();
        let k = server_key(1);
        l.record(k, 100, retransmit(1));
        let wildcard = SocketAddr::from(([0, 0, 0, 0], 8080));
        for (at, len) in [(90, 7), (120, 3), (150, 5), (400, 9)] {
            l.observe_listener(1, wildcard, at, QueueFill { len, cap: 16 });
        }
        // Same port in another namespace: not this connection's listener.
        l.observe_listener(2, wildcard, 130, QueueFill { len: 99, cap: 128 });
        let mut span = server_span(100, 200);
        enrich(&mut span, &l, 32);
        assert_eq!(
            get_int(&span, LISTEN_QUEUE_LENGTH),
            Some(5),
            "fullest in window"
        );
        assert_eq!(get_int(&span, LISTEN_QUEUE_CAPACITY), Some(16));
        let mut span = server_span(95, 110);
        enrich(&mut span, &l, 32);
        assert_eq!(
            get_int(&span, LISTEN_QUEUE_LENGTH),
            Some(7),
            "none in window: the one nearest before the end"
        );
        let mut client = Span {
            kind: SpanKind::Client as i32,
            start_time_unix_nano: 100,
            end_time_unix_nano: 200,
            attributes: vec![
                s("network.peer.address", "198.18.70.2"),
                i("network.peer.port", 40_000),
            ],
            ..Default::default()
        };
        assert!(enrich(&mut client, &l, 32));
        assert_eq!(get(&client, LISTEN_QUEUE_LENGTH), None);
    }

    #[test]
    fn unmatched_spans_only_say_so() {
        let l = ledger();
        let mut span = server_span(100, 200);
        let before = span.attributes.len();
        assert!(!enrich(&mut span, &l, 32));
        assert_eq!(span.attributes.len(), before + 1);
        assert_eq!(
            get(&span, JOINED),
            Some(&any_value::Value::BoolValue(false))
        );
        // No usable attributes at all: the same.
        let mut span = Span::default();
        assert!(!enrich(&mut span, &l, 32));
        assert_eq!(
            get(&span, JOINED),
            Some(&any_value::Value::BoolValue(false))
        );
    }

    #[test]
    fn the_active_connection_wins_among_namespaces() {
        let mut l = ledger();
        l.record(server_key(1), 150, retransmit(3));
        l.observe_connection(server_key(2), 500, 100);
        let mut span = server_span(100, 200);
        enrich(&mut span, &l, 32);
        assert_eq!(get_int(&span, NETNS), Some(1), "events in the window");
        let mut span = server_span(300, 400);
        enrich(&mut span, &l, 32);
        assert_eq!(get_int(&span, NETNS), Some(2), "none active: latest seen");
    }

    #[test]
    fn local_ports_narrow_exactly_or_softly() {
        let mut l = ledger();
        let k = server_key(1);
        l.record(k, 150, retransmit(2));
        // server.port 80 (a Service port): nothing on 80, so it is ignored.
        let mut span = server_span(100, 200);
        set(&mut span.attributes, "server.port", int(80));
        assert!(enrich(&mut span, &l, 32));
        // network.local.port is the socket's own: no match, no join.
        let mut span = server_span(100, 200);
        span.attributes.push(i("network.local.port", 8081));
        assert!(!enrich(&mut span, &l, 32));
    }

    #[test]
    fn ipv4_mapped_peers_match_either_spelling() {
        let mut l = ledger();
        let mapped = ConnKey {
            netns: 1,
            local: "[::ffff:198.18.70.1]:8080".parse().expect("addr"),
            remote: "[::ffff:198.18.70.2]:40000".parse().expect("addr"),
        };
        l.record(mapped, 150, retransmit(2));
        let mut span = server_span(100, 200);
        assert!(enrich(&mut span, &l, 32));
        assert_eq!(get_int(&span, RETRANSMITTED_SEGMENTS), Some(2));
    }

    #[test]
    fn span_events_are_capped_and_attributes_replaced() {
        let mut l = ledger();
        let k = server_key(1);
        for at in 100..140 {
            l.record(k, at, retransmit(1));
        }
        let mut span = server_span(100, 200);
        span.attributes.push(i(RETRANSMITTED_SEGMENTS, -1));
        span.attributes.push(s(JOINED, "stale"));
        enrich(&mut span, &l, 32);
        assert_eq!(span.events.len(), 32);
        assert_eq!(get_int(&span, EVENTS_OMITTED), Some(8));
        assert_eq!(
            get_int(&span, RETRANSMITTED_SEGMENTS),
            Some(40),
            "all counted"
        );
        let keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(
            keys.iter()
                .filter(|k| **k == RETRANSMITTED_SEGMENTS)
                .count(),
            1
        );
        assert_eq!(keys.iter().filter(|k| **k == JOINED).count(), 1);
    }

    #[test]
    fn a_truncated_history_is_flagged() {
        let mut l = ConnectionLedger::new(10, 2, Duration::from_secs(600));
        let k = server_key(1);
        for at in [110, 120, 130] {
            l.record(k, at, retransmit(1));
        }
        let mut span = server_span(100, 200);
        enrich(&mut span, &l, 32);
        assert_eq!(
            get(&span, HISTORY_TRUNCATED),
            Some(&any_value::Value::BoolValue(true))
        );
        assert_eq!(get_int(&span, RETRANSMITTED_SEGMENTS), Some(2));
        let mut later = server_span(125, 200);
        enrich(&mut later, &l, 32);
        assert_eq!(
            get(&later, HISTORY_TRUNCATED),
            None,
            "what was forgotten precedes it"
        );
    }

    #[test]
    fn an_end_before_the_start_is_a_point() {
        let mut l = ledger();
        l.record(server_key(1), 150, retransmit(2));
        let mut span = server_span(150, 10);
        assert!(enrich(&mut span, &l, 32));
        assert_eq!(get_int(&span, RETRANSMITTED_SEGMENTS), Some(2));
    }
}
