//! Domain events, decoded once from the kernel's ring-buffer records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use vigil_abi::{
    DropRecord, EventKind, RetransmitRecord, SockOwner, SockTuple, TraceRecord, TraceSocketRecord,
    AF_INET, AF_INET6, COUNT_UNKNOWN, DIR_SENT, MSG_REQUEST,
};

use crate::{cookie_map::CookieMap, correlate::traceparent::Stamp};

/// A connection's endpoints, `local` being this node's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// The process that owned a socket when it connected, listened or was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// Shared: a traced socket's owner is copied into each of its messages.
    pub comm: std::sync::Arc<str>,
    /// cgroup v2 id (inode of the cgroup directory); 0 when unknown.
    pub cgroup_id: u64,
    /// How the owner was learnt; for diagnostics and tests.
    pub source: OwnerSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerSource {
    /// Recorded by the kernel programs at connect/listen/accept.
    Kernel,
    /// Found in /proc (sockets that existed before the agent, or were missed).
    Proc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetransmitKind {
    /// A data, FIN or SYN segment from the retransmit queue.
    Segment,
    /// A SYN-ACK for a connection still in the listener's request queue.
    SynAck,
    /// Segments the socket's own counter added after the last event Vigil saw,
    /// found when the socket closed (no tracepoint reported them).
    Unseen,
    /// SYN-ACKs the handshake's request counted that no SYN-ACK event
    /// reported, found when the child socket was accepted.
    SynAckUnseen,
}

/// Without a per-socket baseline (a socket older than the agent), which
/// attempts did the kernel count? Errnos with which `__tcp_retransmit_skb` gives up *before* it adds to
/// Tcp RetransSegs (Linux net/ipv4/tcp_output.c): host queue busy, window
/// closed, allocation failures, route rebuild failure, sequence sanity check.
/// Any other error comes from transmitting a segment already counted.
const NOT_COUNTED_ERRNOS: [i32; 5] = [
    libc::EBUSY,
    libc::EAGAIN,
    libc::ENOMEM,
    libc::EHOSTUNREACH,
    libc::EINVAL,
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetransmitEvent {
    pub kind: RetransmitKind,
    /// CLOCK_MONOTONIC nanoseconds of the kernel event.
    pub ts_ns: u64,
    pub cookie: u64,
    pub sk_addr: u64,
    pub netns: u32,
    pub tcp_state: u32,
    pub segs: u32,
    /// 0, or the negative errno of a failed attempt.
    pub err: i32,
    /// The socket's running total of retransmitted segments after this event.
    pub total_retrans: u32,
    /// Segments the kernel counted since Vigil's previous look at the socket,
    /// from `tcp_sock.total_retrans`; None when there was no baseline yet.
    pub counted: Option<u32>,
    /// TCP sequence number of the segment's first byte, and its payload
    /// bytes (0: a SYN or FIN only, or a record without a segment).
    pub seq: u32,
    pub bytes: u32,
    pub endpoints: Endpoints,
    pub owner: Option<Owner>,
    /// Trace context of the request whose bytes the segment carried.
    pub trace: Stamp,
}

impl RetransmitEvent {
    /// Segments the kernel added to Tcp RetransSegs with this event: the
    /// socket counter's delta when known (exact, and it includes segments no
    /// tracepoint reported), else the event's own segments by the errno rule.
    pub fn counted_segments(&self) -> u32 {
        match (self.kind, self.counted) {
            (RetransmitKind::SynAck, _) => 1,
            (_, Some(counted)) => counted,
            (_, None) if NOT_COUNTED_ERRNOS.iter().any(|&errno| -errno == self.err) => 0,
            (_, None) => self.segs,
        }
    }

    /// Counted segments that no tracepoint event carried.
    pub fn unreported_segments(&self) -> u32 {
        match self.kind {
            RetransmitKind::Unseen | RetransmitKind::SynAckUnseen => self.counted_segments(),
            RetransmitKind::Segment => self.counted_segments().saturating_sub(self.segs),
            RetransmitKind::SynAck => 0,
        }
    }

    /// Counted segments that were SYN-ACKs (the kernel's TCPSynRetrans, for
    /// a namespace that only listens).
    pub fn synack_segments(&self) -> u32 {
        match self.kind {
            RetransmitKind::SynAck | RetransmitKind::SynAckUnseen => self.counted_segments(),
            RetransmitKind::Segment | RetransmitKind::Unseen => 0,
        }
    }

    /// Whether a tracepoint reported this retransmission as it happened (not
    /// a count found later from a socket's own counter).
    pub fn reported(&self) -> bool {
        matches!(self.kind, RetransmitKind::Segment | RetransmitKind::SynAck)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes, expected {expected}")]
    Size { len: usize, expected: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("unknown address family {0}")]
    Family(u16),
}

/// Reads a kernel record of exactly `size_of::<T>()` bytes.
///
/// # Safety
/// `T` must be plain old data: every bit pattern a valid value.
unsafe fn record<T>(bytes: &[u8]) -> Result<T, DecodeError> {
    let expected = std::mem::size_of::<T>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: length checked; the caller guarantees T is plain old data.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// A socket's endpoints from a kernel tuple.
pub fn endpoints(t: &SockTuple) -> Result<Endpoints, DecodeError> {
    Ok(Endpoints {
        local: addr(t.family, t.local_addr, t.local_port)?,
        remote: addr(t.family, t.remote_addr, t.remote_port)?,
    })
}

fn addr(family: u16, bytes: [u8; 16], port: u16) -> Result<SocketAddr, DecodeError> {
    let ip = match family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        AF_INET6 => IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical(),
        other => return Err(DecodeError::Family(other)),
    };
    Ok(SocketAddr::new(ip, port))
}

fn comm(raw: &[u8; 16]) -> std::sync::Arc<str> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into()
}

impl Owner {
    pub fn from_kernel(o: &SockOwner) -> Option<Owner> {
        (o.known == 1).then(|| Owner {
            pid: o.tgid,
            comm: comm(&o.comm),
            cgroup_id: o.cgroup_id,
            source: OwnerSource::Kernel,
        })
    }
}

impl RetransmitEvent {
    /// Decodes one ring-buffer record; never panics on malformed bytes.
    pub fn decode(bytes: &[u8]) -> Result<RetransmitEvent, DecodeError> {
        // SAFETY: RetransmitRecord is plain old data, any bit pattern is valid.
        let r: RetransmitRecord = unsafe { record(bytes) }?;
        let kind = match r.kind {
            k if k == EventKind::Retransmit as u32 => RetransmitKind::Segment,
            k if k == EventKind::SynAckRetransmit as u32 => RetransmitKind::SynAck,
            k if k == EventKind::RetransmitUnseen as u32 => RetransmitKind::Unseen,
            k if k == EventKind::SynAckUnseen as u32 => RetransmitKind::SynAckUnseen,
            other => return Err(DecodeError::Kind(other)),
        };
        Ok(RetransmitEvent {
            kind,
            ts_ns: r.ts_ns,
            cookie: r.cookie,
            sk_addr: r.sk_addr,
            netns: r.netns,
            tcp_state: r.state,
            segs: r.segs,
            err: r.err,
            total_retrans: r.total_retrans,
            counted: (r.counted != COUNT_UNKNOWN).then_some(r.counted),
            seq: r.seq,
            bytes: r.bytes,
            endpoints: endpoints(&r.tuple)?,
            owner: Owner::from_kernel(&r.owner),
            trace: Stamp::from_kernel(&r.trace),
        })
    }
}

/// A packet the kernel dropped for one of the watched reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropEvent {
    /// CLOCK_MONOTONIC nanoseconds of the drop.
    pub ts_ns: u64,
    /// `enum skb_drop_reason` value of the running kernel.
    pub reason: u32,
    pub sk_addr: u64,
    /// 0 when the packet had no socket.
    pub netns: u32,
    pub tcp_state: u32,
    /// IP protocol of the socket (6 = TCP); 0 when unknown.
    pub protocol: u32,
    /// None when the packet had no socket.
    pub endpoints: Option<Endpoints>,
    pub owner: Option<Owner>,
    /// Trace context of the message the socket was receiving.
    pub trace: Stamp,
}

impl DropEvent {
    pub fn decode(bytes: &[u8]) -> Result<DropEvent, DecodeError> {
        // SAFETY: DropRecord is plain old data, any bit pattern is valid.
        let r: DropRecord = unsafe { record(bytes) }?;
        if r.kind != EventKind::SocketDrop as u32 {
            return Err(DecodeError::Kind(r.kind));
        }
        Ok(DropEvent {
            ts_ns: r.ts_ns,
            reason: r.reason,
            sk_addr: r.sk_addr,
            netns: r.netns,
            tcp_state: r.state,
            protocol: r.protocol,
            endpoints: if r.sk_addr == 0 {
                None
            } else {
                Some(endpoints(&r.tuple)?)
            },
            owner: Owner::from_kernel(&r.owner),
            trace: Stamp::from_kernel(&r.trace),
        })
    }

    /// A drop at a listener (accept-queue overflow and other handshake drops).
    pub fn at_listener(&self) -> bool {
        self.tcp_state == vigil_abi::TCP_LISTEN
    }
}

/// Whether an HTTP message was a request or a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Request,
    Response,
}

/// An HTTP/1.1 message with trace context crossed a socket of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    pub ts_ns: u64,
    pub cookie: u64,
    pub sk_addr: u64,
    pub netns: u32,
    /// This side sent the message (else it received it).
    pub sent: bool,
    pub message: Message,
    /// First sequence number of this side's send stream the message governs.
    pub boundary: u32,
    pub endpoints: Endpoints,
    pub trace: Stamp,
    /// The socket's owner as the kernel recorded it, or from /proc.
    pub owner: Option<Owner>,
}

/// A socket whose messages carry trace context: sent by the kernel once,
/// ahead of its first `TraceMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSocket {
    pub cookie: u64,
    pub sk_addr: u64,
    pub netns: u32,
    pub endpoints: Endpoints,
    /// The socket's owner as the kernel recorded it.
    pub owner: Option<Owner>,
}

impl TraceSocket {
    pub fn decode(bytes: &[u8]) -> Result<TraceSocket, DecodeError> {
        // SAFETY: TraceSocketRecord is plain old data, any bit pattern is valid.
        let r: TraceSocketRecord = unsafe { record(bytes) }?;
        if r.kind != EventKind::TraceSocket as u32 {
            return Err(DecodeError::Kind(r.kind));
        }
        Ok(TraceSocket {
            cookie: r.cookie,
            sk_addr: r.sk_addr,
            netns: r.netns,
            endpoints: endpoints(&r.tuple)?,
            owner: Owner::from_kernel(&r.owner),
        })
    }
}

/// A traced message as the kernel sends it: its socket only by cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceMessage {
    pub ts_ns: u64,
    pub cookie: u64,
    pub sent: bool,
    pub message: Message,
    pub boundary: u32,
    pub trace: Stamp,
}

impl TraceMessage {
    pub fn decode(bytes: &[u8]) -> Result<TraceMessage, DecodeError> {
        // SAFETY: TraceRecord is plain old data, any bit pattern is valid.
        let r: TraceRecord = unsafe { record(bytes) }?;
        if r.kind != EventKind::TraceContext as u32 {
            return Err(DecodeError::Kind(r.kind));
        }
        Ok(TraceMessage {
            ts_ns: r.ts_ns,
            cookie: r.cookie,
            sent: (r.role & 0x0f) as u8 == DIR_SENT,
            message: if (r.role >> 4 & 0x0f) as u8 == MSG_REQUEST {
                Message::Request
            } else {
                Message::Response
            },
            boundary: r.boundary,
            trace: Stamp::from_kernel(&r.stamp),
        })
    }
}

impl TraceEvent {
    /// A message with its socket.
    pub fn join(m: TraceMessage, socket: &TraceSocket) -> TraceEvent {
        TraceEvent {
            ts_ns: m.ts_ns,
            cookie: m.cookie,
            sk_addr: socket.sk_addr,
            netns: socket.netns,
            sent: m.sent,
            message: m.message,
            boundary: m.boundary,
            endpoints: socket.endpoints,
            trace: m.trace,
            owner: socket.owner.clone(),
        }
    }

    /// The socket served the request (it received it, or sent the response).
    pub fn server_side(&self) -> bool {
        self.sent == (self.message == Message::Response)
    }
}

/// Any record of the ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Retransmit(RetransmitEvent),
    Drop(DropEvent),
    Trace(TraceEvent),
}

/// Any record of the ring buffer, as decoded on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingRecord {
    Event(KernelEvent),
    TraceSocket(TraceSocket),
    TraceMessage(TraceMessage),
}

impl RingRecord {
    /// Decodes a ring-buffer record by the kind at its start; never panics.
    pub fn decode(bytes: &[u8]) -> Result<RingRecord, DecodeError> {
        let kind = bytes
            .get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(DecodeError::Size {
                len: bytes.len(),
                expected: 4,
            })?;
        if kind == EventKind::SocketDrop as u32 {
            DropEvent::decode(bytes).map(|e| RingRecord::Event(KernelEvent::Drop(e)))
        } else if kind == EventKind::TraceContext as u32 {
            TraceMessage::decode(bytes).map(RingRecord::TraceMessage)
        } else if kind == EventKind::TraceSocket as u32 {
            TraceSocket::decode(bytes).map(RingRecord::TraceSocket)
        } else {
            RetransmitEvent::decode(bytes).map(|e| RingRecord::Event(KernelEvent::Retransmit(e)))
        }
    }
}

/// Sockets announced by `TraceSocket` records, to join the `TraceMessage`s
/// that follow with. Bounded like every `CookieMap`: a socket that sent no
/// traced message for two generations' worth of new sockets is gone; its
/// next message cannot be placed (counted by the caller).
pub struct TraceSockets {
    sockets: CookieMap<TraceSocket>,
}

impl TraceSockets {
    /// Holds up to `capacity` sockets (at least 2).
    pub fn new(capacity: usize) -> Self {
        TraceSockets {
            sockets: CookieMap::new(capacity),
        }
    }

    pub fn insert(&mut self, socket: TraceSocket) {
        self.sockets.insert(socket.cookie, socket);
    }

    /// The message with its socket, or None when the socket is unknown.
    pub fn join(&mut self, m: TraceMessage) -> Option<TraceEvent> {
        let s = self.sockets.get(m.cookie)?;
        Some(TraceEvent::join(m, s))
    }
}

/// TCP state names as `ss` prints them.
pub fn tcp_state_name(state: u32) -> &'static str {
    match state {
        1 => "ESTAB",
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "CLOSE",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW-SYN-RECV",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
impl RetransmitEvent {
    /// A data-segment retransmit of `segs` segments on one IPv4 connection,
    /// without owner or trace, for tests to vary.
    pub fn example(segs: u32) -> RetransmitEvent {
        RetransmitEvent {
            kind: RetransmitKind::Segment,
            ts_ns: 1,
            cookie: 1,
            sk_addr: 1,
            netns: 7,
            tcp_state: 1,
            segs,
            err: 0,
            total_retrans: 0,
            counted: None,
            seq: 0,
            bytes: 1,
            trace: crate::correlate::traceparent::Stamp::None,
            endpoints: Endpoints {
                local: "198.18.1.1:80".parse().expect("addr"),
                remote: "198.18.1.2:5000".parse().expect("addr"),
            },
            owner: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_abi::SockTuple;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn stamp(value: &str) -> vigil_abi::TraceStamp {
        let mut s = vigil_abi::TraceStamp::NONE;
        let n = value.len().min(s.raw.len());
        s.raw[..n].copy_from_slice(&value.as_bytes()[..n]);
        s.present = 1;
        s
    }

    #[test]
    fn decodes_trace_stamps_and_validates_them() {
        let mut r = record(1, AF_INET);
        let e = decode(&r);
        assert_eq!(
            e.trace.context().map(|c| c.trace_id_hex()).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!((e.seq, e.bytes), (1000, 1448));
        r.trace = stamp("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g");
        assert_eq!(decode(&r).trace, Stamp::Invalid);
        r.trace.present = 0;
        assert_eq!(decode(&r).trace, Stamp::None);
    }

    fn decode(r: &RetransmitRecord) -> RetransmitEvent {
        // SAFETY: reading a repr(C) POD value as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (r as *const RetransmitRecord).cast::<u8>(),
                std::mem::size_of::<RetransmitRecord>(),
            )
        };
        RetransmitEvent::decode(bytes).expect("decodes")
    }

    fn record(kind: u32, family: u16) -> RetransmitRecord {
        let mut local_addr = [0u8; 16];
        local_addr[..4].copy_from_slice(&[198, 18, 1, 1]);
        let mut remote_addr = [0u8; 16];
        remote_addr[..4].copy_from_slice(&[198, 18, 1, 2]);
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"origin");
        RetransmitRecord {
            kind,
            state: 1,
            ts_ns: 42,
            cookie: 7,
            sk_addr: 0xffff_0000,
            netns: 4026531840,
            segs: 3,
            err: 0,
            total_retrans: 0,
            counted: COUNT_UNKNOWN,
            seq: 1000,
            bytes: 1448,
            _pad: 0,
            tuple: SockTuple {
                local_addr,
                remote_addr,
                local_port: 8080,
                remote_port: 40000,
                family,
                _pad: 0,
            },
            owner: SockOwner {
                tgid: 99,
                known: 1,
                cgroup_id: 5,
                comm,
            },
            trace: stamp(TRACEPARENT),
        }
    }

    fn bytes(r: &RetransmitRecord) -> Vec<u8> {
        // SAFETY: reading a repr(C) POD value as bytes.
        unsafe {
            std::slice::from_raw_parts(
                (r as *const RetransmitRecord).cast::<u8>(),
                std::mem::size_of_val(r),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_ipv4_record() {
        let e = RetransmitEvent::decode(&bytes(&record(1, AF_INET))).expect("decodes");
        assert_eq!(e.kind, RetransmitKind::Segment);
        assert_eq!(e.endpoints.local, "198.18.1.1:8080".parse().expect("addr"));
        assert_eq!(
            e.endpoints.remote,
            "198.18.1.2:40000".parse().expect("addr")
        );
        let owner = e.owner.clone().expect("owner known");
        assert_eq!(
            (owner.pid, &*owner.comm, owner.cgroup_id),
            (99, "origin", 5)
        );
        assert_eq!(e.counted_segments(), 3);
    }

    #[test]
    fn rejects_bad_records() {
        assert!(matches!(
            RetransmitEvent::decode(&[0u8; 3]),
            Err(DecodeError::Size { .. })
        ));
        assert_eq!(
            RetransmitEvent::decode(&bytes(&record(9, AF_INET))),
            Err(DecodeError::Kind(9))
        );
        assert_eq!(
            RetransmitEvent::decode(&bytes(&record(1, 77))),
            Err(DecodeError::Family(77))
        );
    }

    #[test]
    fn socket_counter_delta_wins_over_the_event() {
        let mut r = record(1, AF_INET);
        r.counted = 5;
        let e = RetransmitEvent::decode(&bytes(&r)).expect("decodes");
        assert_eq!(e.counted_segments(), 5, "delta of tcp_sock.total_retrans");
        assert_eq!(
            e.unreported_segments(),
            2,
            "3 in this event, 2 no tracepoint reported"
        );
        r.kind = 3;
        let unseen = RetransmitEvent::decode(&bytes(&r)).expect("decodes");
        assert_eq!(
            (unseen.kind, unseen.unreported_segments()),
            (RetransmitKind::Unseen, 5)
        );
    }

    #[test]
    fn decodes_drop_records_with_and_without_socket() {
        let r = record(1, AF_INET);
        let mut d = DropRecord {
            kind: EventKind::SocketDrop as u32,
            reason: 40,
            ts_ns: 5,
            sk_addr: 0xffff_1000,
            netns: 4026531840,
            state: vigil_abi::TCP_LISTEN,
            protocol: 6,
            _pad: 0,
            tuple: r.tuple,
            owner: r.owner,
            trace: vigil_abi::TraceStamp::NONE,
        };
        // SAFETY: reading a repr(C) POD value as bytes.
        let as_bytes = |d: &DropRecord| unsafe {
            std::slice::from_raw_parts(
                (d as *const DropRecord).cast::<u8>(),
                std::mem::size_of_val(d),
            )
            .to_vec()
        };
        let RingRecord::Event(KernelEvent::Drop(e)) =
            RingRecord::decode(&as_bytes(&d)).expect("decodes")
        else {
            panic!("a drop record decodes as a drop");
        };
        assert!(e.at_listener());
        assert_eq!(e.reason, 40);
        assert_eq!(&*e.owner.expect("owner").comm, "origin");
        assert_eq!(
            e.endpoints.expect("socket").local,
            "198.18.1.1:8080".parse().expect("addr")
        );
        d.sk_addr = 0;
        d.tuple = SockTuple::default();
        let e = DropEvent::decode(&as_bytes(&d)).expect("no socket still decodes");
        assert_eq!(e.endpoints, None);
        assert!(matches!(
            RingRecord::decode(&as_bytes(&d)[..50]),
            Err(DecodeError::Size { .. })
        ));
        assert!(matches!(
            RingRecord::decode(&[4, 0]),
            Err(DecodeError::Size { .. })
        ));
        assert!(matches!(
            RingRecord::decode(&bytes(&record(1, AF_INET))),
            Ok(RingRecord::Event(KernelEvent::Retransmit(_)))
        ));
    }

    fn trace_records(cookie: u64) -> (Vec<u8>, Vec<u8>) {
        let r = record(1, AF_INET);
        let socket = TraceSocketRecord {
            kind: EventKind::TraceSocket as u32,
            netns: 7,
            cookie,
            sk_addr: 0xffff_2000,
            tuple: r.tuple,
            owner: r.owner,
        };
        let mut stamp = vigil_abi::TraceStamp::NONE;
        stamp.present = 1;
        let message = TraceRecord {
            kind: EventKind::TraceContext as u32,
            role: u32::from(vigil_abi::DIR_RECEIVED) | u32::from(MSG_REQUEST) << 4,
            ts_ns: 11,
            cookie,
            boundary: 1234,
            _pad: 0,
            stamp,
        };
        // SAFETY: reading repr(C) POD values as bytes.
        unsafe {
            (
                std::slice::from_raw_parts(
                    (&socket as *const TraceSocketRecord).cast::<u8>(),
                    std::mem::size_of_val(&socket),
                )
                .to_vec(),
                std::slice::from_raw_parts(
                    (&message as *const TraceRecord).cast::<u8>(),
                    std::mem::size_of_val(&message),
                )
                .to_vec(),
            )
        }
    }

    #[test]
    fn trace_messages_join_their_announced_socket() {
        let (socket, message) = trace_records(42);
        let Ok(RingRecord::TraceSocket(s)) = RingRecord::decode(&socket) else {
            panic!("a socket record decodes as one");
        };
        let Ok(RingRecord::TraceMessage(m)) = RingRecord::decode(&message) else {
            panic!("a message record decodes as one");
        };
        let mut sockets = TraceSockets::new(4);
        assert_eq!(sockets.join(m.clone()), None, "unknown before its socket");
        sockets.insert(s);
        let e = sockets.join(m).expect("joined");
        assert_eq!(
            (e.cookie, e.sk_addr, e.netns, e.boundary),
            (42, 0xffff_2000, 7, 1234)
        );
        assert_eq!(e.endpoints.local, "198.18.1.1:8080".parse().expect("addr"));
        assert!(e.server_side(), "received a request");
        assert_eq!(&*e.owner.expect("owner").comm, "origin");
        assert!(matches!(
            RingRecord::decode(&message[..40]),
            Err(DecodeError::Size { .. })
        ));
    }

    #[test]
    fn trace_sockets_forget_the_least_recently_used_generation() {
        let mut sockets = TraceSockets::new(4);
        let socket = |cookie| {
            let Ok(RingRecord::TraceSocket(s)) = RingRecord::decode(&trace_records(cookie).0)
            else {
                panic!("decodes");
            };
            s
        };
        let message = |cookie| {
            let Ok(RingRecord::TraceMessage(m)) = RingRecord::decode(&trace_records(cookie).1)
            else {
                panic!("decodes");
            };
            m
        };
        for cookie in 1..=3 {
            sockets.insert(socket(cookie));
        }
        // Generations of 2: {1, 2} went to the previous one when 3 came.
        assert!(sockets.join(message(1)).is_some(), "promoted back");
        for cookie in 4..=5 {
            sockets.insert(socket(cookie));
        }
        assert!(
            sockets.join(message(2)).is_none(),
            "two generations without a message"
        );
        for cookie in [1, 4, 5] {
            assert!(sockets.join(message(cookie)).is_some(), "socket {cookie}");
        }
    }

    /// Found by the ring_record fuzz target: negating i32::MIN overflowed.
    #[test]
    fn extreme_errno_does_not_overflow() {
        let mut r = record(1, AF_INET);
        r.err = i32::MIN;
        let e = RetransmitEvent::decode(&bytes(&r)).expect("decodes");
        assert_eq!(e.counted_segments(), 3);
    }

    #[test]
    fn counts_like_the_kernel() {
        let mut e = RetransmitEvent::decode(&bytes(&record(1, AF_INET))).expect("decodes");
        e.err = -libc::EBUSY;
        assert_eq!(
            e.counted_segments(),
            0,
            "EBUSY returns before RetransSegs is updated"
        );
        e.err = -libc::EPERM;
        assert_eq!(
            e.counted_segments(),
            3,
            "a netfilter drop happens after counting"
        );
        e.kind = RetransmitKind::SynAck;
        assert_eq!(e.counted_segments(), 1);
    }
}
