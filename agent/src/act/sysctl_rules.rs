//! What the sysctl advisor recommends for one network namespace, from a
//! reading of it, the previous reading, and the sockets the sampler saw in
//! it. Pure: the advisor decides whether to write.
//!
//! - `net.core.somaxconn` caps every listen backlog: a listener whose queue
//!   capacity equals it and that drops connections is held back by the
//!   sysctl, not by the service. Doubled.
//! - `net.ipv4.tcp_max_syn_backlog` bounds half-open connections only when
//!   SYN cookies are off; its drops are the namespace's ListenDrops not
//!   explained by full accept queues (ListenOverflows) or full request
//!   queues (TCPReqQFullDrop). Doubled.
//! - `net.ipv4.ip_local_port_range`: `connect()` needs a local port unique
//!   for the destination, so the busiest destination's connections (plus,
//!   unless TIME_WAIT sockets may be reused, every TIME_WAIT socket: the
//!   kernel does not say whose they are, so this is an upper bound) are set
//!   against the range. Over half used: the range doubled downwards, never
//!   below 1024.
//! - `net.ipv4.tcp_tw_reuse`: an outbound-heavy namespace with more TIME_WAIT
//!   sockets than half its range is told to reuse them for new connections
//!   (1; the default 2 allows it on loopback only).

use std::net::SocketAddr;

use super::netns::{Reading, PORT_RANGE, SOMAXCONN, SYN_BACKLOG, TW_REUSE};

pub const MAX_SOMAXCONN: u32 = 65_535;
pub const MAX_SYN_BACKLOG: u32 = 65_536;
/// The lowest ephemeral port the advisor suggests: below are the
/// well-known and registered ports services listen on.
pub const LOWEST_EPHEMERAL: u16 = 1024;

/// What the sampler saw in the namespace since the previous look.
#[derive(Debug, Default)]
pub struct Observed {
    /// Connections dropped at full accept queues, per listener.
    pub listener_drops: Vec<Dropping>,
    /// (local port, remote) of every connected or connecting socket.
    pub connections: Vec<(u16, SocketAddr)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Dropping {
    pub local: SocketAddr,
    pub queue_cap: u32,
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advice {
    pub name: &'static str,
    pub before: String,
    pub after: String,
    pub signal: String,
}

fn advice(
    name: &'static str,
    before: impl ToString,
    after: impl ToString,
    signal: String,
) -> Advice {
    Advice {
        name,
        before: before.to_string(),
        after: after.to_string(),
        signal,
    }
}

/// The busiest destination and how many of its connections use a port of
/// the ephemeral range.
fn busiest(connections: &[(u16, SocketAddr)], (lo, hi): (u16, u16)) -> Option<(SocketAddr, u64)> {
    let mut by_remote = std::collections::HashMap::<SocketAddr, u64>::new();
    for (port, remote) in connections {
        if (lo..=hi).contains(port) {
            *by_remote.entry(*remote).or_default() += 1;
        }
    }
    by_remote.into_iter().max_by_key(|(r, n)| (*n, *r))
}

pub fn advise(now: &Reading, before: Option<&Reading>, seen: &Observed) -> Vec<Advice> {
    let mut out = Vec::new();
    let dropped: u64 = seen.listener_drops.iter().map(|d| d.dropped).sum();
    let capped = seen
        .listener_drops
        .iter()
        .filter(|d| d.dropped > 0 && d.queue_cap >= now.somaxconn)
        .max_by_key(|d| d.dropped);
    if let Some(d) = capped.filter(|_| now.somaxconn < MAX_SOMAXCONN) {
        out.push(advice(
            SOMAXCONN,
            now.somaxconn,
            now.somaxconn.saturating_mul(2).min(MAX_SOMAXCONN),
            format!(
                "{dropped} connections dropped at full accept queues of {} on {}, capped by {SOMAXCONN}",
                d.queue_cap, d.local
            ),
        ));
    }

    if let Some(b) = before.filter(|_| now.syncookies == 0 && now.max_syn_backlog < MAX_SYN_BACKLOG)
    {
        let delta = |now: u64, then: u64| now.saturating_sub(then);
        let half_open = delta(now.listen_drops, b.listen_drops)
            .saturating_sub(delta(now.listen_overflows, b.listen_overflows))
            .saturating_sub(delta(now.req_queue_full_drops, b.req_queue_full_drops));
        if half_open > 0 {
            out.push(advice(
                SYN_BACKLOG,
                now.max_syn_backlog,
                now.max_syn_backlog.saturating_mul(2).min(MAX_SYN_BACKLOG),
                format!(
                    "{half_open} SYNs dropped with SYN cookies off, not at full accept or request queues"
                ),
            ));
        }
    }

    let (lo, hi) = now.port_range;
    let size = u64::from(hi.saturating_sub(lo)) + 1;
    let Some((remote, open)) = busiest(&seen.connections, now.port_range) else {
        return out;
    };
    let time_wait = if now.tw_reuse == 1 { 0 } else { now.time_wait };
    if (open + time_wait) * 2 > size && lo > LOWEST_EPHEMERAL {
        let low = u64::from(hi).saturating_add(1).saturating_sub(2 * size);
        let low = low.max(u64::from(LOWEST_EPHEMERAL));
        out.push(advice(
            PORT_RANGE,
            format!("{lo}\t{hi}"),
            format!("{low}\t{hi}"),
            format!(
                "{open} connections to {remote} and {time_wait} TIME_WAIT sockets against {size} ephemeral ports"
            ),
        ));
    }
    if now.tw_reuse != 1 && now.time_wait * 2 > size {
        out.push(advice(
            TW_REUSE,
            now.tw_reuse,
            1,
            format!(
                "{} TIME_WAIT sockets against {size} ephemeral ports, with {open} connections out to {remote}",
                now.time_wait
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading() -> Reading {
        Reading {
            somaxconn: 16,
            port_range: (40_000, 40_015),
            tw_reuse: 2,
            syncookies: 1,
            max_syn_backlog: 128,
            ..Reading::default()
        }
    }

    fn to(n: usize) -> Vec<(u16, SocketAddr)> {
        let remote: SocketAddr = "198.18.0.2:80".parse().expect("an address");
        (0..n).map(|i| (40_000 + i as u16, remote)).collect()
    }

    fn names(a: &[Advice]) -> Vec<&str> {
        a.iter().map(|a| a.name).collect()
    }

    #[test]
    fn somaxconn_only_when_it_caps_a_dropping_listener() {
        let local = "198.18.0.1:8080".parse().expect("an address");
        let capped = Observed {
            listener_drops: vec![Dropping {
                local,
                queue_cap: 16,
                dropped: 5,
            }],
            ..Observed::default()
        };
        let a = advise(&reading(), None, &capped);
        assert_eq!(
            (a[0].name, a[0].before.as_str(), a[0].after.as_str()),
            (SOMAXCONN, "16", "32")
        );
        // The service asked for less than somaxconn: its backlog is the limit.
        let own_backlog = Observed {
            listener_drops: vec![Dropping {
                local,
                queue_cap: 8,
                dropped: 5,
            }],
            ..Observed::default()
        };
        assert!(advise(&reading(), None, &own_backlog).is_empty());
        let at_max = Reading {
            somaxconn: MAX_SOMAXCONN,
            ..reading()
        };
        let a = advise(&at_max, None, &capped);
        assert!(a.is_empty(), "{a:?}");
    }

    #[test]
    fn syn_backlog_only_for_unexplained_drops_with_cookies_off() {
        let before = Reading {
            syncookies: 0,
            listen_drops: 10,
            listen_overflows: 10,
            ..reading()
        };
        let overflow_only = Reading {
            listen_drops: 30,
            listen_overflows: 30,
            ..before
        };
        assert!(advise(&overflow_only, Some(&before), &Observed::default()).is_empty());
        let half_open = Reading {
            listen_drops: 40,
            listen_overflows: 30,
            req_queue_full_drops: 5,
            ..before
        };
        let a = advise(&half_open, Some(&before), &Observed::default());
        assert_eq!(names(&a), [SYN_BACKLOG]);
        assert_eq!((a[0].before.as_str(), a[0].after.as_str()), ("128", "256"));
        assert!(a[0].signal.starts_with("5 SYNs"), "{}", a[0].signal);
        // Cookies on: the backlog sysctl is not what drops them.
        let cookies = Reading {
            syncookies: 1,
            ..half_open
        };
        assert!(advise(&cookies, Some(&before), &Observed::default()).is_empty());
        // No earlier reading: no delta yet.
        assert!(advise(&half_open, None, &Observed::default()).is_empty());
    }

    #[test]
    fn port_range_and_tw_reuse_from_ephemeral_use() {
        // 16 ports; 4 open + 2 TIME_WAIT: not over half.
        let calm = Reading {
            time_wait: 2,
            ..reading()
        };
        let seen = Observed {
            connections: to(4),
            ..Observed::default()
        };
        assert!(advise(&calm, None, &seen).is_empty());
        // 4 open + 10 TIME_WAIT: both.
        let busy = Reading {
            time_wait: 10,
            ..reading()
        };
        let a = advise(&busy, None, &seen);
        assert_eq!(names(&a), [PORT_RANGE, TW_REUSE]);
        assert_eq!(
            (a[0].before.as_str(), a[0].after.as_str()),
            ("40000\t40015", "39984\t40015")
        );
        assert_eq!((a[1].before.as_str(), a[1].after.as_str()), ("2", "1"));
        // Reuse on: TIME_WAIT no longer holds ports, and nothing to advise.
        let reuse = Reading {
            tw_reuse: 1,
            ..busy
        };
        assert!(advise(&reuse, None, &seen).is_empty());
        // Connections outside the range (a server's accepted ones) are not
        // ephemeral use, and without outbound use TIME_WAIT is not advised on.
        let served = Observed {
            connections: vec![(8080, "198.18.0.2:5000".parse().expect("an address")); 12],
            ..Observed::default()
        };
        assert!(advise(&busy, None, &served).is_empty());
        // Never below 1024.
        let wide = Reading {
            port_range: (1500, 60_999),
            ..busy
        };
        let many = Observed {
            connections: (0..40_000u16)
                .map(|i| (1500 + i, "198.18.0.2:80".parse().expect("an address")))
                .collect(),
            ..Observed::default()
        };
        let a = advise(&wide, None, &many);
        assert_eq!(a[0].after, "1024\t60999");
        let floor = Reading {
            port_range: (1024, 60_999),
            ..busy
        };
        let a = advise(&floor, None, &many);
        assert!(a.is_empty(), "{a:?}");
    }
}
