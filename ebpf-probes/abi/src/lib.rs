//! Types shared by Vigil's kernel programs and its agent.
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, so the
//! kernel writes exactly the bytes the agent reads. `u32` stands in for `bool`.
//! With the `user` feature the types implement `aya::Pod` for map access.
#![no_std]

/// Address families, as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// TCP states (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_SYN_RECV: u32 = 3;
pub const TCP_TIME_WAIT: u32 = 6;
pub const TCP_CLOSE: u32 = 7;
pub const TCP_LISTEN: u32 = 10;
pub const TCP_NEW_SYN_RECV: u32 = 12;

/// Discriminant at the start of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A data or SYN segment went through `__tcp_retransmit_skb`.
    Retransmit = 1,
    /// A SYN-ACK of a pending (request) socket was retransmitted.
    SynAckRetransmit = 2,
    /// Found when a socket closed: segments its `tcp_sock.total_retrans`
    /// counted after the last retransmit event Vigil saw on it.
    RetransmitUnseen = 3,
    /// The kernel dropped a packet of a socket for a reason Vigil watches.
    SocketDrop = 4,
    /// An HTTP/1.1 message carrying a `traceparent` header crossed a socket.
    TraceContext = 5,
    /// The socket of the `TraceContext` records with its cookie that follow.
    TraceSocket = 6,
    /// Found when a child socket was accepted: SYN-ACK retransmits its
    /// handshake counted (`request_sock.num_retrans`, inherited as the
    /// child's `total_retrans`) that no SYN-ACK probe run saw.
    SynAckUnseen = 7,
}

/// `RetransmitRecord::counted` when the kernel side had no baseline for the socket.
pub const COUNT_UNKNOWN: u32 = u32::MAX;

/// Which probe lost an event (with `LossReason`, an index into `VIGIL_LOST`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossSlot {
    Retransmit = 0,
    SynAckRetransmit = 1,
    SocketDrop = 2,
    TraceContext = 3,
}

/// Why an event never reached the agent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The ring buffer to the agent was full.
    RingFull = 0,
    /// A kernel read failed, so no record could be built.
    ReadError = 1,
}

const LOSS_REASONS: u32 = 2;
/// Entries of the per-CPU `VIGIL_LOST` array.
pub const LOSS_SLOTS: u32 = 4 * LOSS_REASONS;

/// Index of a (probe, reason) counter in `VIGIL_LOST`.
pub const fn loss_index(slot: LossSlot, reason: LossReason) -> u32 {
    slot as u32 * LOSS_REASONS + reason as u32
}

/// Connection endpoints. Addresses in network byte order (IPv4 in the first 4
/// bytes), ports in host byte order; `local` is this host's side of the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// Who owned a socket, captured in process context when the socket was
/// connected, put into listen, or accepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    /// Thread-group id (the process id as userspace sees it, in the initial pid namespace).
    pub tgid: u32,
    /// 1 when the fields below were recorded; 0 when the owner is unknown.
    pub known: u32,
    /// cgroup v2 id (the inode of the cgroup's directory).
    pub cgroup_id: u64,
    /// Name of the process (its thread-group leader), not of the calling thread.
    pub comm: [u8; 16],
}

/// Key of `VIGIL_ACCEPTS`: connections accept() handed out, by the network
/// namespace and local port of the accepted socket (its listener's port)
/// and the process that accepted it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AcceptKey {
    pub netns: u32,
    pub pid: u32,
    pub port: u16,
    pub _pad: u16,
}

/// (port, process) pairs `VIGIL_ACCEPTS` counts at once (LRU: the least
/// recently accepting go first).
pub const ACCEPT_PORTS: u32 = 4096;

/// Per-socket state kept in the kernel, keyed by the socket's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub owner: SockOwner,
    /// `tcp_sock.total_retrans` when Vigil last looked at this socket.
    pub retrans_seen: u32,
    /// 1 when `retrans_seen` is a valid baseline.
    pub baseline_known: u32,
}

/// One retransmission, data or SYN-ACK. Written by the kernel, read once by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RetransmitRecord {
    /// `EventKind` as u32.
    pub kind: u32,
    /// TCP state of the socket (for SYN-ACK: of the listener).
    pub state: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
    /// Socket cookie (bpf_get_socket_cookie); 0 for SYN-ACKs (no full socket yet).
    pub cookie: u64,
    /// Kernel address of the socket, the key of the owner table.
    pub sk_addr: u64,
    /// Network namespace inode number (same as `readlink /proc/PID/ns/net`).
    pub netns: u32,
    /// Segments in this event (`tcp_skb_pcount` after any fragmentation).
    pub segs: u32,
    /// `err` of the tracepoint: 0 sent; negative errno otherwise.
    pub err: i32,
    /// `tcp_sock.total_retrans` after this event: the socket's own running
    /// count of segments added to RetransSegs (0 for SYN-ACKs).
    pub total_retrans: u32,
    /// Segments the kernel counted since the previous look at this socket
    /// (`total_retrans` delta), or `COUNT_UNKNOWN` without a baseline.
    pub counted: u32,
    /// TCP sequence number of the retransmitted segment's first byte.
    pub seq: u32,
    /// Payload bytes it carries (SYN and FIN not counted).
    pub bytes: u32,
    pub _pad: u32,
    pub tuple: SockTuple,
    pub owner: SockOwner,
    /// Trace context of the request whose bytes this segment carries.
    pub trace: TraceStamp,
}

/// Characters of a version-00 W3C `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// A `traceparent` value as it crossed the wire: copied, never interpreted, in
/// the kernel; the agent validates it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceStamp {
    pub raw: [u8; TRACEPARENT_LEN],
    /// 1 when `raw` holds a value; 0: no trace context.
    pub present: u8,
}

impl TraceStamp {
    pub const NONE: TraceStamp = TraceStamp {
        raw: [0; TRACEPARENT_LEN],
        present: 0,
    };
}

impl Default for TraceStamp {
    fn default() -> Self {
        Self::NONE
    }
}

/// Directions of `TraceSlot` and `TraceRecord::role`.
pub const DIR_RECEIVED: u8 = 1;
pub const DIR_SENT: u8 = 2;
/// Message kinds of `TraceRecord::role` (bits 4..8).
pub const MSG_REQUEST: u8 = 1;
pub const MSG_RESPONSE: u8 = 2;

/// The trace context of one HTTP message and the first byte of this socket's
/// send stream it governs: what this side sends from `boundary` on answers
/// (or is) that message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceSpan {
    pub stamp: TraceStamp,
    /// TCP sequence number in this socket's send direction.
    pub boundary: u32,
    /// 1 once set (a message with or without trace context was seen).
    pub valid: u32,
}

/// Bytes of an incomplete header line kept for the next segment.
pub const TRACE_CARRY: usize = 96;

/// Per-socket capture state (socket-local storage: freed with the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TraceSlot {
    /// The latest message and the one before it: a retransmitted segment
    /// belongs to the newest one whose boundary it does not precede.
    pub cur: TraceSpan,
    pub prev: TraceSpan,
    /// Sequence number of the last message start accepted, per direction
    /// (index `dir - 1`): a header seen again (retransmitted) is not a new message.
    pub msg_seq: [u32; 2],
    /// Where a header still being read continues, and the boundary of its message.
    pub open_next_seq: u32,
    pub open_boundary: u32,
    /// This side's `snd_nxt` when the last message it received started: once
    /// it moves, this side has answered, and what it receives next may be a
    /// new message even though no message sent was seen (capture of received
    /// messages only).
    pub recv_mark: u32,
    /// `MSG_*` of the last accepted message start (0: none yet).
    pub last_kind: u8,
    pub _pad: [u8; 3],
    /// Header bytes read so far of the open message.
    pub open_scanned: u16,
    /// Bit `dir - 1` set once a message start was accepted in that direction;
    /// `SOCKET_ANNOUNCED` once the agent was told of the socket.
    pub msg_seen: u8,
    /// Direction of the last accepted message start (0: none yet).
    pub last_dir: u8,
    /// Direction of the message whose header is still open (0: none).
    pub open_dir: u8,
    /// 1 when the next segment starts a header line (after `carry`).
    pub at_line_start: u8,
    pub carry_len: u8,
    /// `MSG_*` of the open message.
    pub open_kind: u8,
    pub carry: [u8; TRACE_CARRY],
}

/// Outcomes of the capture hook, indexes of its per-CPU counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureOutcome {
    /// A message header with a `traceparent`.
    Traced = 0,
    /// A complete message header without one.
    Untraced = 1,
    /// A message start seen again (retransmitted) or older than the last one.
    Repeated = 2,
    /// A header given up on: longer than the capture limit, its next
    /// segment arrived out of order, or its bytes could not be read.
    Abandoned = 3,
    /// A response to a request that carried trace context: not read, the
    /// request's context governs the exchange. Capturing received messages
    /// only, any response received (its request went out unseen).
    Answered = 4,
}
pub const CAPTURE_OUTCOMES: u32 = 5;

/// A message with trace context crossed a socket. Kept small (one
/// record per traced message, each a fresh stretch of ring memory to write):
/// the socket's endpoints and owner come once, in a `TraceSocketRecord`
/// ahead of its first `TraceRecord`, and the agent joins them by cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TraceRecord {
    /// `EventKind::TraceContext` as u32.
    pub kind: u32,
    /// Direction (`DIR_*`) in bits 0..4, message kind (`MSG_*`) in bits 4..8.
    pub role: u32,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cookie: u64,
    /// `TraceSpan::boundary` of the message.
    pub boundary: u32,
    pub _pad: u32,
    pub stamp: TraceStamp,
}

/// A socket's first message with trace context: who and where it is (sent
/// again with later traces while its owner is unknown).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TraceSocketRecord {
    /// `EventKind::TraceSocket` as u32.
    pub kind: u32,
    pub netns: u32,
    pub cookie: u64,
    /// Kernel address of the socket.
    pub sk_addr: u64,
    pub tuple: SockTuple,
    pub owner: SockOwner,
}

/// `TraceSlot::msg_seen` bit: the socket's `TraceSocketRecord` reached the
/// ring with its owner (until then each new trace announces it again).
pub const SOCKET_ANNOUNCED: u8 = 1 << 2;
/// `TraceSlot::msg_seen` bit of a slot read at a listener: its message's
/// trace is told to the agent once the connection's socket exists.
pub const TRACE_PENDING: u8 = 1 << 3;

/// Drop reasons are `enum skb_drop_reason` values of the running kernel (the
/// agent maps them to names from BTF); the probe keeps those whose bit is set.
pub const DROP_REASON_WORDS: usize = 4;
/// A 256-bit set of drop reasons, written by the agent before load.
pub type DropReasonSet = [u64; DROP_REASON_WORDS];

/// Whether `reason` is in the set; reasons beyond the set are never watched.
#[inline(always)]
pub fn drop_reason_watched(set: &DropReasonSet, reason: u32) -> bool {
    let word = (reason / 64) as usize;
    word < DROP_REASON_WORDS && set[word] & (1u64 << (reason % 64)) != 0
}

/// One packet the kernel dropped, attributed to the socket it was for.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DropRecord {
    /// `EventKind::SocketDrop` as u32.
    pub kind: u32,
    /// `enum skb_drop_reason` value.
    pub reason: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
    /// Kernel address of the socket (key of the owner table); 0 when none.
    pub sk_addr: u64,
    /// Network namespace inode number of the socket.
    pub netns: u32,
    /// TCP state of the socket (`TCP_LISTEN` for accept-queue overflows).
    pub state: u32,
    /// `sk_protocol` of the socket (TCP, UDP, ...).
    pub protocol: u32,
    pub _pad: u32,
    pub tuple: SockTuple,
    pub owner: SockOwner,
    /// Trace context of the message the socket was receiving.
    pub trace: TraceStamp,
}

/// What an iterator sample describes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleKind {
    /// A TCP listener and its accept queue.
    Listener = 1,
    /// A TCP connection (any full socket that is not listening).
    Connection = 2,
}

/// One socket as the TCP iterator saw it, written with bpf_seq_write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketSample {
    /// `SampleKind` as u32.
    pub kind: u32,
    pub state: u32,
    pub sk_addr: u64,
    /// Socket cookie (the kernel makes one on first use).
    pub cookie: u64,
    pub netns: u32,
    /// Listener: connections waiting in the accept queue (`sk_ack_backlog`,
    /// Recv-Q in `ss -lnt`).
    pub queue_len: u32,
    /// Listener: accept-queue capacity (`sk_max_ack_backlog`, Send-Q in `ss -lnt`).
    pub queue_cap: u32,
    /// Connection: smoothed RTT in microseconds (`srtt_us >> 3`, `rtt` in `ss -ti`).
    pub srtt_us: u32,
    /// Connection: RTT mean deviation in microseconds (`mdev_us >> 2`, as `ss -ti`).
    pub rttvar_us: u32,
    /// Connection: congestion window in segments.
    pub cwnd: u32,
    /// Connection: segments retransmitted over its lifetime.
    pub total_retrans: u32,
    /// Packets the kernel dropped for this socket over its lifetime
    /// (`sk_drops`). For a listener: every TcpExt ListenDrops on it.
    pub drops: u32,
    /// The file descriptor the owner holds the socket by (acting takes a
    /// copy of a listener with pidfd_getfd).
    pub fd: u32,
    pub _pad: u32,
    pub tuple: SockTuple,
    pub owner: SockOwner,
}

/// Members of one SO_REUSEPORT group the steering program chooses among.
pub const REUSEPORT_MAX_MEMBERS: u32 = 64;

/// What the agent tells the steering program of one SO_REUSEPORT group
/// (`VIGIL_RP_CONTROL[0]` of that group's program).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReuseportControl {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the agent's latest word.
    /// Older than `heartbeat_timeout_ns`: the program leaves the choice to
    /// the kernel's hash and never refuses (fail-open).
    pub heartbeat_ns: u64,
    pub heartbeat_timeout_ns: u64,
    /// New connections to refuse, per million (admission control; 0: none).
    pub refuse_ppm: u32,
    /// How many of `healthy` to choose among; 0: the kernel's hash.
    pub healthy_count: u32,
    /// Indices in `VIGIL_RP_MEMBERS` of the members that take new connections.
    pub healthy: [u32; REUSEPORT_MAX_MEMBERS as usize],
}

impl Default for ReuseportControl {
    fn default() -> Self {
        ReuseportControl {
            heartbeat_ns: 0,
            heartbeat_timeout_ns: 0,
            refuse_ppm: 0,
            healthy_count: 0,
            healthy: [0; REUSEPORT_MAX_MEMBERS as usize],
        }
    }
}

/// What the steering program did with a new connection (`VIGIL_RP_COUNTS`, per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReuseportOutcome {
    /// Left to the kernel's hash: every member healthy.
    Hashed = 0,
    /// Given to a healthy member the program chose.
    Steered = 1,
    /// Refused (SK_DROP): admission control.
    Refused = 2,
    /// Left to the kernel's hash because the agent's heartbeat is stale.
    FailedOpen = 3,
    /// The chosen member could not be selected (gone): the kernel's hash.
    SelectFailed = 4,
}

/// Slots of `VIGIL_RP_COUNTS`.
pub const REUSEPORT_OUTCOMES: u32 = 5;

/// Byte offsets of the kernel fields the programs read, resolved by the agent from
/// the running kernel's BTF (/sys/kernel/btf/vmlinux) and written into the
/// programs' read-only data before load. This is how one object runs on many
/// kernels without compile-time CO-RE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// 1 once the agent filled the struct; the programs do nothing while 0.
    pub ready: u32,
    // struct sock_common
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    // struct sock
    pub sk_protocol: u32,
    // struct net -> ns.inum
    pub net_ns_inum: u32,
    // struct sk_buff -> cb, and struct tcp_skb_cb -> tcp_gso_segs
    pub skb_cb: u32,
    pub tcp_skb_cb_gso_segs: u32,
    // current task -> files -> fdt -> fd[] -> file -> private_data (socket) -> sk
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    // current task -> group_leader -> comm: the process name, not the thread's
    pub task_group_leader: u32,
    pub task_comm: u32,
    // struct tcp_sock
    pub tcp_total_retrans: u32,
    /// struct sock_common: the cookie once generated (0 before).
    pub skc_cookie: u32,
    // struct sock: accept queue of a listener
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    // struct sk_buff -> sk
    pub skb_sk: u32,
    // struct tcp_sock: RTT estimator and window
    pub tcp_srtt_us: u32,
    pub tcp_mdev_us: u32,
    pub tcp_snd_cwnd: u32,
    // struct sock: drop counter (atomic_t), and socket type
    pub sk_drops: u32,
    pub sk_type: u32,
    // task -> tgid, and task -> cgroups (css_set) -> dfl_cgrp -> kn -> id
    pub task_tgid: u32,
    pub task_cgroups: u32,
    pub css_set_dfl_cgrp: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,
    // struct tcp_skb_cb: the segment's sequence range and flags
    pub tcp_skb_cb_seq: u32,
    pub tcp_skb_cb_end_seq: u32,
    pub tcp_skb_cb_tcp_flags: u32,
    /// 1 when every field below resolved: messages sent can be read at
    /// `tcp_sendmsg_locked` (else on cgroup_skb/egress).
    pub send_ready: u32,
    // struct tcp_sock: the next byte an application write queues
    pub tcp_write_seq: u32,
    // struct msghdr -> msg_iter (struct iov_iter): type, progress, buffer
    pub msghdr_msg_iter: u32,
    pub iov_iter_type: u32,
    pub iov_iter_offset: u32,
    /// The union of `ubuf` (ITER_UBUF) and `__iov` (ITER_IOVEC).
    pub iov_iter_buf: u32,
    pub iov_iter_count: u32,
    // enum iter_type
    pub iter_ubuf: u32,
    pub iter_iovec: u32,
    /// 1 when every field below resolved: messages received can be read at
    /// `sock_recv_length`, from the buffer the application read them into
    /// (else on cgroup_skb/ingress).
    pub recv_ready: u32,
    // struct tcp_sock: the next byte a read copies to the application
    pub tcp_copied_seq: u32,
    // struct inet_connection_sock: upper-layer protocol (kTLS) when set
    pub icsk_ulp_ops: u32,
    // struct sock -> sk_socket (struct socket) -> file: the socket's open file
    pub sk_socket: u32,
    pub socket_file: u32,
    // struct pt_regs of the calling task: syscall number, first and second argument
    pub pt_regs_nr: u32,
    pub pt_regs_arg1: u32,
    pub pt_regs_arg2: u32,
    // this architecture's numbers of the read-family system calls
    pub nr_read: u32,
    pub nr_readv: u32,
    pub nr_recvfrom: u32,
    pub nr_recvmsg: u32,
}

/// Cgroups `correlate.capture_cgroups` may list (the size of the kernel's
/// cgroup array for the capture of messages sent).
pub const MAX_CAPTURE_CGROUPS: u32 = 16;

impl KernelLayout {
    /// The value compiled into the object; the agent overrides it before load.
    pub const UNSET: Self = Self {
        ready: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_state: 0,
        skc_net: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        sk_protocol: 0,
        net_ns_inum: 0,
        skb_cb: 0,
        tcp_skb_cb_gso_segs: 0,
        task_files: 0,
        files_fdt: 0,
        fdtable_fd: 0,
        fdtable_max_fds: 0,
        file_private_data: 0,
        socket_sk: 0,
        task_group_leader: 0,
        task_comm: 0,
        tcp_total_retrans: 0,
        skc_cookie: 0,
        sk_ack_backlog: 0,
        sk_max_ack_backlog: 0,
        skb_sk: 0,
        tcp_srtt_us: 0,
        tcp_mdev_us: 0,
        tcp_snd_cwnd: 0,
        sk_drops: 0,
        sk_type: 0,
        task_tgid: 0,
        task_cgroups: 0,
        css_set_dfl_cgrp: 0,
        cgroup_kn: 0,
        kernfs_node_id: 0,
        tcp_skb_cb_seq: 0,
        tcp_skb_cb_end_seq: 0,
        tcp_skb_cb_tcp_flags: 0,
        send_ready: 0,
        tcp_write_seq: 0,
        msghdr_msg_iter: 0,
        iov_iter_type: 0,
        iov_iter_offset: 0,
        iov_iter_buf: 0,
        iov_iter_count: 0,
        iter_ubuf: 0,
        iter_iovec: 0,
        recv_ready: 0,
        tcp_copied_seq: 0,
        icsk_ulp_ops: 0,
        sk_socket: 0,
        socket_file: 0,
        pt_regs_nr: 0,
        pt_regs_arg1: 0,
        pt_regs_arg2: 0,
        nr_read: 0,
        nr_readv: 0,
        nr_recvfrom: 0,
        nr_recvmsg: 0,
    };
}

/// Offsets inside tracepoint records that the classic tracepoint programs read.
/// The agent checks them against /sys/kernel/tracing/events/*/format before
/// attaching, and refuses the hook on a kernel where they differ.
pub mod tp_offsets {
    pub const SET_STATE_SKADDR: usize = 8;
    pub const SET_STATE_OLDSTATE: usize = 16;
    pub const SET_STATE_NEWSTATE: usize = 20;
    pub const SET_STATE_PROTOCOL: usize = 30;
    pub const SYS_EXIT_RET: usize = 16;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no padding or invalid bit patterns.
    unsafe impl aya::Pod for super::SockOwner {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::AcceptKey {}
    unsafe impl aya::Pod for super::RetransmitRecord {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::SockTuple {}
    unsafe impl aya::Pod for super::DropRecord {}
    unsafe impl aya::Pod for super::SocketSample {}
    unsafe impl aya::Pod for super::TraceRecord {}
    unsafe impl aya::Pod for super::TraceSlot {}
    unsafe impl aya::Pod for super::ReuseportControl {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The kernel and the agent are compiled separately; fixed sizes catch a field
    // added on one side only, and multiples of 8 rule out tail padding.
    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<SockTuple>(), 16 + 16 + 2 + 2 + 2 + 2);
        assert_eq!(size_of::<SockOwner>(), 4 + 4 + 8 + 16);
        assert_eq!(
            size_of::<RetransmitRecord>(),
            4 * 2
                + 8 * 3
                + 4 * 8
                + size_of::<SockTuple>()
                + size_of::<SockOwner>()
                + size_of::<TraceStamp>()
        );
        assert_eq!(size_of::<TraceStamp>(), 56);
        assert_eq!(size_of::<TraceSpan>(), 64);
        assert_eq!(size_of::<TraceSlot>(), 2 * 64 + 6 * 4 + 8 + TRACE_CARRY);
        assert_eq!(
            size_of::<TraceRecord>(),
            4 * 2 + 8 * 2 + 4 * 2 + size_of::<TraceStamp>()
        );
        assert_eq!(
            size_of::<TraceSocketRecord>(),
            4 * 2 + 8 * 2 + size_of::<SockTuple>() + size_of::<SockOwner>()
        );
        assert_eq!(size_of::<SockState>(), size_of::<SockOwner>() + 8);
        assert_eq!(size_of::<KernelLayout>(), 4 * 61);
        assert_eq!(
            size_of::<DropRecord>(),
            4 * 2
                + 8 * 2
                + 4 * 4
                + size_of::<SockTuple>()
                + size_of::<SockOwner>()
                + size_of::<TraceStamp>()
        );
        assert_eq!(
            size_of::<SocketSample>(),
            4 * 2 + 8 * 2 + 4 * 10 + size_of::<SockTuple>() + size_of::<SockOwner>()
        );
        assert_eq!(
            size_of::<ReuseportControl>(),
            8 * 2 + 4 * 2 + 4 * REUSEPORT_MAX_MEMBERS as usize
        );
    }

    #[test]
    fn drop_reason_set_bounds() {
        let mut set = [0u64; DROP_REASON_WORDS];
        set[0] = 1 << 6;
        set[3] = 1 << 63;
        assert!(drop_reason_watched(&set, 6));
        assert!(drop_reason_watched(&set, 255));
        assert!(!drop_reason_watched(&set, 7));
        assert!(!drop_reason_watched(&set, 256));
        assert!(!drop_reason_watched(&set, u32::MAX));
    }
}
