//! Aggregates of socket health: drops by reason, accept-queue overflows,
//! listen-queue fill, RTT distribution per owner, and a bounded table of the
//! latest sample of each connection for the CLI. Label sets are the retransmit
//! metrics' (network namespace and owner) plus, for listeners, the listening
//! address and port, which are stable and few (never ephemeral ports).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use serde::Serialize;

use crate::{
    enrich::Identity,
    events::DropEvent,
    exposition::HistogramPoint,
    loader::drop_reasons::DropReasons,
    metrics::{Exposition, Family, Series},
    sampler::{ConnectionSample, ListenerSample},
};

/// Upper bounds of the RTT histogram, in seconds: 100 µs (same host) to 5 s.
const RTT_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is +Inf.
    counts: [u64; RTT_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        let slot = RTT_BUCKETS
            .iter()
            .position(|&le| v <= le)
            .unwrap_or(RTT_BUCKETS.len());
        self.counts[slot] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, x: &mut Exposition, name: &str, labels: &[(&str, String)]) {
        x.histogram(
            name,
            labels,
            HistogramPoint {
                bounds: RTT_BUCKETS.to_vec(),
                counts: self.counts.to_vec(),
                sum: self.sum,
                count: self.count,
            },
        );
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ListenerSeries {
    owner: Series,
    address: String,
    port: u16,
}

#[derive(Debug, Clone, Copy, Default)]
struct QueueFill {
    len: u64,
    cap: u64,
    sockets: u64,
}

/// Handshakes a listener dropped since the previous pass: an event worth a
/// log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow {
    pub netns: u32,
    pub local: SocketAddr,
    pub dropped: u32,
    pub who: Identity,
}

/// One row of `vigil connections`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ConnectionRow {
    pub netns: u32,
    pub state: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub srtt_us: u32,
    pub rttvar_us: u32,
    pub cwnd: u32,
    pub total_retrans: u32,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub cgroup: Option<String>,
    /// Kubernetes pod uid, when the cgroup is a pod's.
    pub pod_uid: Option<String>,
    /// The socket's cookie; 0 while nothing has asked the kernel for one
    /// (Vigil's probes do at a socket's first event or traced message).
    pub cookie: u64,
}

/// One row of `vigil listeners`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ListenerRow {
    pub netns: u32,
    pub local: SocketAddr,
    pub queue_len: u32,
    pub queue_cap: u32,
    /// Handshakes the listener dropped since it was created.
    pub drops: u32,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub cgroup: Option<String>,
    /// Kubernetes pod uid, when the cgroup is a pod's.
    pub pod_uid: Option<String>,
    /// The socket's cookie; 0 while nothing has asked the kernel for one
    /// (Vigil's probes do at a socket's first event or traced message).
    pub cookie: u64,
}

/// What `/v1/sockets` returns.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct SocketTable {
    pub listeners: Vec<ListenerRow>,
    pub connections: Vec<ConnectionRow>,
    /// Connections in the last sample, including those beyond the table's cap.
    pub connections_sampled: usize,
}

pub struct SocketHealth {
    reasons: DropReasons,
    drops: BTreeMap<(Series, String), u64>,
    overflows: BTreeMap<Series, u64>,
    listeners: BTreeMap<ListenerSeries, QueueFill>,
    rtt: BTreeMap<Series, Histogram>,
    connections: BTreeMap<Series, u64>,
    table: Arc<SocketTable>,
    table_cap: usize,
    /// Network namespace -> its TcpExt ListenOverflows at the last look.
    netns_overflows: HashMap<u32, u64>,
    /// Namespaces of the first pass predate the agent: their past overflows
    /// are not counted; a namespace first seen later is counted from zero.
    first_pass_done: bool,
}

/// Namespaces whose last ListenOverflows reading is kept (netns come and go
/// with pods; forgetting all past this bound costs at most one sample's delta).
const MAX_TRACKED_NAMESPACES: usize = 65_536;

impl SocketHealth {
    pub fn new(reasons: DropReasons, table_cap: usize) -> SocketHealth {
        SocketHealth {
            reasons,
            drops: BTreeMap::new(),
            overflows: BTreeMap::new(),
            listeners: BTreeMap::new(),
            rtt: BTreeMap::new(),
            connections: BTreeMap::new(),
            table: Arc::default(),
            table_cap,
            netns_overflows: HashMap::new(),
            first_pass_done: false,
        }
    }

    pub fn reason_name(&self, reason: u32) -> String {
        self.reasons
            .name(reason)
            .map_or_else(|| format!("reason_{reason}"), str::to_owned)
    }

    /// Counts a drop for `series` (the owner, as the series budget admitted it).
    pub fn record_drop(&mut self, e: &DropEvent, series: Series) {
        let reason = self.reason_name(e.reason);
        *self.drops.entry((series, reason)).or_default() += 1;
    }

    /// Replaces the listener gauges and the connection table with a new pass,
    /// adds each connection's RTT to its owner's histogram, and counts each
    /// namespace's new accept-queue overflows for the owner of its listeners.
    ///
    /// Overflows come from the namespace's own TcpExt ListenOverflows (read by
    /// the sampler), because nothing finer is exact: the kernel keeps no
    /// per-socket overflow count, a listener's `sk_drops` also counts other
    /// packets it discards during handshakes (retried SYNs and ACKs, a
    /// client's reset), and drop events miss most overflows (a SYN that finds
    /// the queue full is freed through `consume_skb`; 85 ListenOverflows, 0
    /// kfree_skb measured on 6.18). A namespace is a pod, so per namespace is
    /// per pod; with listeners of several owners in one namespace, the first
    /// listener's owner gets them.
    pub fn apply_snapshot<'a>(
        &mut self,
        listeners: impl Iterator<Item = (&'a ListenerSample, Series, Identity)>,
        connections: impl Iterator<Item = (&'a ConnectionSample, Series, Identity)>,
        listen_overflows: &HashMap<u32, u64>,
    ) -> Vec<Overflow> {
        let mut overflows = Vec::new();
        let mut netns_owner: HashMap<u32, (Series, Identity, SocketAddr)> = HashMap::new();
        self.listeners.clear();
        self.connections.clear();
        let mut table = SocketTable::default();
        for (l, owner, who) in listeners {
            netns_owner
                .entry(l.netns)
                .or_insert_with(|| (owner.clone(), who.clone(), l.local));
            let key = ListenerSeries {
                owner,
                address: l.local.ip().to_string(),
                port: l.local.port(),
            };
            let fill = self.listeners.entry(key).or_default();
            fill.len += u64::from(l.queue_len);
            fill.cap += u64::from(l.queue_cap);
            fill.sockets += 1;
            table.listeners.push(ListenerRow {
                netns: l.netns,
                local: l.local,
                queue_len: l.queue_len,
                queue_cap: l.queue_cap,
                drops: l.drops,
                pid: who.pid,
                process: who.comm,
                cgroup: who.cgroup,
                pod_uid: who.pod.map(|p| p.uid),
                cookie: l.cookie,
            });
        }
        if self.netns_overflows.len() > MAX_TRACKED_NAMESPACES {
            self.netns_overflows.clear();
        }
        for (netns, &now) in listen_overflows {
            let before = match self.netns_overflows.get(netns) {
                Some(&seen) => seen,
                None if !self.first_pass_done => now,
                // A namespace with its first listener since the last pass: all new.
                None => 0,
            };
            self.netns_overflows.insert(*netns, now);
            let added = now.saturating_sub(before);
            let Some((owner, who, local)) = netns_owner.get(netns) else {
                continue;
            };
            if added > 0 {
                *self.overflows.entry(owner.clone()).or_default() += added;
                overflows.push(Overflow {
                    netns: *netns,
                    local: *local,
                    dropped: added.min(u64::from(u32::MAX)) as u32,
                    who: who.clone(),
                });
            }
        }
        self.first_pass_done = true;
        for (c, series, who) in connections {
            *self.connections.entry(series.clone()).or_default() += 1;
            // A connection without an RTT sample yet (still connecting) has srtt 0.
            if c.srtt_us > 0 {
                self.rtt
                    .entry(series)
                    .or_default()
                    .observe(f64::from(c.srtt_us) / 1e6);
            }
            table.connections_sampled += 1;
            if table.connections.len() < self.table_cap {
                table.connections.push(ConnectionRow {
                    netns: c.netns,
                    state: c.state_name().to_owned(),
                    local: c.endpoints.local,
                    remote: c.endpoints.remote,
                    srtt_us: c.srtt_us,
                    rttvar_us: c.rttvar_us,
                    cwnd: c.cwnd,
                    total_retrans: c.total_retrans,
                    pid: who.pid,
                    process: who.comm,
                    cgroup: who.cgroup,
                    pod_uid: who.pod.map(|p| p.uid),
                    cookie: c.cookie,
                });
            }
        }
        self.table = Arc::new(table);
        overflows
    }

    /// Drops every counter of series the budget forgot.
    pub fn forget(&mut self, gone: &[Series]) {
        self.drops.retain(|(s, _), _| !gone.contains(s));
        self.overflows.retain(|s, _| !gone.contains(s));
        self.rtt.retain(|s, _| !gone.contains(s));
    }

    /// The latest sample's table, shared with the views that show it.
    pub fn table(&self) -> &Arc<SocketTable> {
        &self.table
    }

    pub fn render(&self, x: &mut Exposition) {
        let name = "vigil_socket_drops_total";
        x.family(
            name,
            "counter",
            "Packets the kernel dropped for a socket, by the kernel's drop reason (skb:kfree_skb).",
        );
        for ((s, reason), n) in &self.drops {
            let mut l = s.labels();
            l.push(("reason", reason.clone()));
            x.sample(name, &l, n);
        }
        let name = "vigil_tcp_listen_overflows_total";
        x.family(name, "counter", "Handshakes dropped because an accept queue was full: the TcpExt ListenOverflows of the owner's network namespace, read every sampler.interval_ms.");
        for (s, n) in &self.overflows {
            x.sample(name, &s.labels(), n);
        }
        let gauges: [Family<QueueFill, u64>; 3] = [
            ("vigil_tcp_listen_queue_length", "Connections waiting in the accept queue, summed over the listening sockets of the address (Recv-Q of ss -lnt).", |f| f.len),
            ("vigil_tcp_listen_queue_capacity", "Accept-queue capacity, summed over the listening sockets of the address (Send-Q of ss -lnt).", |f| f.cap),
            ("vigil_tcp_listen_sockets", "Listening sockets on the address (several with SO_REUSEPORT).", |f| f.sockets),
        ];
        for (name, help, value) in gauges {
            x.family(name, "gauge", help);
            for (k, fill) in &self.listeners {
                let mut l = k.owner.labels();
                l.push(("address", k.address.clone()));
                l.push(("port", k.port.to_string()));
                x.sample(name, &l, value(fill));
            }
        }
        let name = "vigil_tcp_connections";
        x.family(
            name,
            "gauge",
            "TCP connections (not listening) in the last sample.",
        );
        for (s, n) in &self.connections {
            x.sample(name, &s.labels(), n);
        }
        let name = "vigil_tcp_rtt_seconds";
        x.family(
            name,
            "histogram",
            "Smoothed RTT of each connection, one observation per connection per sample.",
        );
        for (s, h) in &self.rtt {
            h.render(x, name, &s.labels());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(cookie: u64, drops: u32) -> ListenerSample {
        ListenerSample {
            cookie,
            netns: 1,
            local: "198.18.0.1:8080".parse().expect("addr"),
            queue_len: 2,
            queue_cap: 2,
            drops,
            fd: 3,
            owner: None,
        }
    }

    fn overflows(h: &SocketHealth) -> u64 {
        h.overflows.values().sum()
    }

    fn pass(h: &mut SocketHealth, ls: &[ListenerSample], netstat: &[(u32, u64)]) -> Vec<Overflow> {
        h.apply_snapshot(
            ls.iter().map(|l| {
                let who = Identity::default();
                (l, Series::of(l.netns, &who), who)
            }),
            std::iter::empty(),
            &netstat.iter().copied().collect(),
        )
    }

    #[test]
    fn overflows_count_only_what_happened_since_the_agent_started() {
        let mut h = SocketHealth::new(DropReasons::default(), 10);
        // First pass: 40 overflows from before the agent started are history.
        assert!(pass(&mut h, &[listener(1, 0)], &[(1, 40)]).is_empty());
        assert_eq!(overflows(&h), 0);
        let new = pass(&mut h, &[listener(1, 0)], &[(1, 45)]);
        assert_eq!(overflows(&h), 5);
        assert_eq!(
            new.iter().map(|o| o.dropped).sum::<u32>(),
            5,
            "logged as one record"
        );
        // A namespace first seen later is new: all of its overflows count.
        let mut other = listener(2, 0);
        other.netns = 2;
        pass(&mut h, &[listener(1, 0), other.clone()], &[(1, 45), (2, 3)]);
        assert_eq!(overflows(&h), 8);
        // A namespace whose process could not be read this pass keeps its baseline.
        pass(&mut h, &[listener(1, 0), other.clone()], &[(2, 3)]);
        pass(&mut h, &[listener(1, 0), other], &[(1, 46), (2, 3)]);
        assert_eq!(overflows(&h), 9);
        let mut x = Exposition::default();
        h.render(&mut x);
        let out = x.text();
        assert!(out.contains("vigil_tcp_listen_queue_length{netns=\"1\",cgroup=\"unknown\",process=\"unknown\",address=\"198.18.0.1\",port=\"8080\"} 2"), "{out}");
    }

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let mut h = Histogram::default();
        for v in [0.00005, 0.0003, 0.0003, 0.05, 9.0] {
            h.observe(v);
        }
        let mut x = Exposition::default();
        x.family("rtt", "histogram", "RTT.");
        h.render(&mut x, "rtt", &[("netns", "1".into())]);
        let out = x.text();
        assert!(
            out.contains("rtt_bucket{netns=\"1\",le=\"0.0001\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("rtt_bucket{netns=\"1\",le=\"0.0005\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("rtt_bucket{netns=\"1\",le=\"0.05\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("rtt_bucket{netns=\"1\",le=\"5\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("rtt_bucket{netns=\"1\",le=\"+Inf\"} 5\n"),
            "{out}"
        );
        assert!(out.contains("rtt_count{netns=\"1\"} 5\n"), "{out}");
    }
}
