//! W3C trace context of plaintext HTTP/1.1, captured per socket.
//!
//! Messages are read where applications read and write them, from their own
//! buffers: `vigil_http_recv` at the end of every read-family call on a
//! socket (`sock_recv_length`), `vigil_http_send` where a write is queued
//! (`tcp_sendmsg_locked`). No program runs on any packet. On kernels
//! without those tracepoints, cgroup_skb programs on the cgroup v2 root (or
//! the cgroups the agent is told to capture) read every TCP segment instead:
//! `vigil_http_in` received, `vigil_http_out` sent. Bytes that start a
//! request (`GET `, `POST`, ...) or a response (`HTTP/1.x`) have their
//! header lines scanned for `traceparent:`; the 55-character value is copied
//! (never interpreted: the agent validates it) into the socket's local storage
//! with the first sequence number of this side's send stream it governs. A
//! response to a request that carried one is not read (its start is still
//! noted, so its body is skipped): the request's context governs both. The
//! retransmit probe reads that storage, so a retransmitted segment carries
//! the trace context of the request whose bytes it holds.
//!
//! What is supported, and what is not:
//! - A message start must begin a read, a write or a segment (true for
//!   HTTP/1.1 without pipelining: each message follows the other side's).
//!   Messages must alternate direction: once a socket carried a message, its
//!   bytes in the same direction are that message's (not even read) until
//!   the other side speaks, so a request body that looks like a request
//!   cannot forge a trace context, and body bytes cost no copy. Pipelined
//!   requests share the first one's context.
//! - After a request whose trace context is known, the other side's next
//!   bytes are taken as its response without being read (HTTP/1.1 answers
//!   each request): their start is noted, so what follows is their body.
//! - A header may span reads (writes, segments) that follow each other, up
//!   to `MAX_HEADER` bytes, `WINDOW` bytes each; a `traceparent` line split
//!   across two is joined (the partial line, up to `TRACE_CARRY` bytes, is
//!   carried). A gap (a segment out of order) abandons the header (counted).
//! - Only the bytes before the end of the header are read; nothing is stored
//!   but the value.
//! - Reads: read, recv/recvfrom, readv and recvmsg (their first iovec), found
//!   through the calling task's system call registers (x86-64), the file
//!   descriptor checked to name the socket before a byte is read. A
//!   `MSG_PEEK` is not read (the bytes come again). io_uring and in-kernel
//!   readers are not read; nor are kTLS sockets' (their sequence numbers
//!   count records, not the bytes read).
//! - A write is read from its first chunk (its first iovec for writev), as
//!   far as the header goes; bytes in kernel memory (sendfile, splice) are
//!   not an application's message and are not read.
//! - With `correlate.capture_sent = false` only messages received are read
//!   and a socket's own messages go unseen: bytes received may start a new
//!   message once this side has written anything since the last one started
//!   (`TraceSlot::recv_mark`), and responses received are not read (the
//!   request they answer went out unseen).
//! - Read from packets, a request in the segment that completes a handshake
//!   (its final ACK lost, or TCP_DEFER_ACCEPT, or TCP Fast Open) is
//!   filtered against the listener: the connection's socket does not exist
//!   yet. It is read into a slot kept by the connection's 4-tuple
//!   (`VIGIL_HANDSHAKES`), which `vigil_http_handoff` moves to the socket
//!   when it becomes established, telling the agent of its trace then. (A
//!   read needs none of this: it is on the connection's socket.)
//! - `VIGIL_PAUSE` set: the programs return at once (capture paused).
//!
//! The packet programs return 1 (pass): capture never affects traffic.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, BPF_F_CURRENT_NETNS,
        BPF_SK_STORAGE_GET_F_CREATE,
    },
    btf_maps::{CgroupArray, SkStorage},
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_get_current_task_btf, bpf_get_socket_cookie, bpf_loop, bpf_probe_read_user,
            bpf_sk_fullsock, bpf_sk_release, bpf_sk_storage_get, bpf_skb_load_bytes,
            bpf_skc_lookup_tcp, bpf_skc_to_tcp_sock, bpf_task_pt_regs, bpf_tcp_sock,
        },
    },
    macros::{btf_map, btf_tracepoint, cgroup_skb, map},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, SkBuffContext},
    Global,
};
use vigil_abi::{
    CaptureOutcome, EventKind, LossSlot, SockOwner, TraceRecord, TraceSlot, TraceSocketRecord,
    TraceStamp, AF_INET6, CAPTURE_OUTCOMES, DIR_RECEIVED, DIR_SENT, IPPROTO_TCP, MSG_REQUEST,
    MSG_RESPONSE, SOCKET_ANNOUNCED, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, TRACEPARENT_LEN,
    TRACE_CARRY, TRACE_PENDING,
};

use crate::{
    kernel::{current_owner, fd_is_socket, field, layout, load, netns_inode, read, tuple, Probed},
    owners::VIGIL_SOCKS,
    ring::{copy_words, submit_in_place, zero},
};

/// Payload bytes scanned per segment.
const WINDOW: usize = 2048;
/// Bytes read first; the rest of the window only if the header goes on.
const FIRST_READ: usize = 512;
/// Scratch size: a power of two above `TRACE_CARRY + WINDOW`, so every index
/// can be masked into bounds (what the verifier checks).
const BUF: usize = 8192;
const MASK: usize = BUF - 1;
/// Masks a word's offset so its 8 bytes stay in the buffer.
const WORD_MASK: usize = BUF / 2 - 1;
/// Header bytes read per message before giving up on it.
const MAX_HEADER: u32 = 8192;
/// `traceparent:` (matched case-insensitively; the name is ASCII letters).
const NAME: &[u8; 12] = b"traceparent:";

/// Per-socket capture state; freed by the kernel with the socket.
#[btf_map]
pub static VIGIL_TRACE_SLOTS: SkStorage<TraceSlot> = SkStorage::new();

#[repr(C)]
pub struct Scratch {
    /// 1 while a program on this CPU uses the buffer.
    busy: u32,
    _pad: u32,
    /// The scan's state lives here, in map memory, not on the stack: the
    /// verifier does not track map contents, so every bpf_loop step looks
    /// the same to it and one check of the step suffices.
    scan: ScanState,
    buf: [u8; BUF],
}

/// Where segments are copied for scanning (too big for the 512-byte stack).
/// Two per CPU: a program sending from process context can be interrupted
/// by one receiving in softirq on the same CPU, and each needs its own.
#[map]
static VIGIL_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(SCRATCH_SLOTS, 0);
const SCRATCH_SLOTS: u32 = 2;

/// A scratch buffer no program on this CPU is using, marked busy.
#[inline(always)]
fn acquire_scratch() -> Option<*mut Scratch> {
    let mut i = 0;
    while i < SCRATCH_SLOTS {
        if let Some(s) = VIGIL_SCRATCH.get_ptr_mut(i) {
            // SAFETY: this CPU's value; an interrupting program runs to its
            // end before this one resumes, so a flag seen clear is free.
            unsafe {
                if ptr::read_volatile(ptr::addr_of!((*s).busy)) == 0 {
                    ptr::write_volatile(ptr::addr_of_mut!((*s).busy), 1);
                    return Some(s);
                }
            }
        }
        i += 1;
    }
    None
}

#[inline(always)]
fn release_scratch(s: *mut Scratch) {
    // SAFETY: acquired by this program above.
    unsafe { ptr::write_volatile(ptr::addr_of_mut!((*s).busy), 0) };
}

/// Per-CPU counts by `CaptureOutcome`.
#[map]
pub static VIGIL_CAPTURE: PerCpuArray<u64> = PerCpuArray::with_max_entries(CAPTURE_OUTCOMES, 0);

/// Non-zero pauses capture: both programs pass every packet untouched, at
/// the price of an attached program that does nothing. Nothing in the agent
/// writes it; `cargo xtask bench` flips it (with bpftool) to set capture
/// against that floor second by second in one run, and an operator can do
/// the same on a node in trouble without restarting the agent.
#[map]
static VIGIL_PAUSE: Array<u32> = Array::with_max_entries(1, 0);

/// 0 when only received messages are captured (`correlate.capture_sent =
/// false`, or both hooks for messages sent disabled): a message sent is
/// never seen. Set by the agent at load.
#[unsafe(no_mangle)]
static VIGIL_CAPTURE_SENT: Global<u8> = Global::new(1);

/// The cgroups capture covers, for `vigil_http_send` (which runs for every
/// socket of the node): the first `VIGIL_CAPTURE_SCOPE` entries, set by the
/// agent; 0 entries: every cgroup (capture at the root).
#[btf_map]
static VIGIL_CAPTURE_CGROUPS: CgroupArray<{ CAPTURE_CGROUPS as usize }> = CgroupArray::new();
const CAPTURE_CGROUPS: u32 = vigil_abi::MAX_CAPTURE_CGROUPS;
#[unsafe(no_mangle)]
static VIGIL_CAPTURE_SCOPE: Global<u32> = Global::new(0);

/// A connection's 4-tuple and network namespace, IPv4 (also when its
/// socket is IPv6 with v4-mapped addresses) in the first 4 bytes of each
/// address: what a packet at the listener and the socket made for it share.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HandshakeKey {
    netns: u32,
    /// 4 or 6.
    ip: u16,
    local_port: u16,
    remote_port: u16,
    _pad: u16,
    local: [u8; 16],
    remote: [u8; 16],
}

/// A request read at a listener, until its connection's socket exists.
#[repr(C)]
pub struct Handoff {
    slot: TraceSlot,
    /// The listener's owner: the process about to accept the connection.
    owner: SockOwner,
    /// Where the entry goes (built here, off the stack).
    key: HandshakeKey,
    _pad: u32,
}

/// Handshake-completing requests in flight; an entry lives from the packet
/// at the listener to the child socket's TCP_ESTABLISHED, microseconds
/// later (LRU: one whose connection never completes is pushed out).
#[map]
static VIGIL_HANDSHAKES: LruHashMap<HandshakeKey, Handoff> = LruHashMap::with_max_entries(1024, 0);

/// Where a `Handoff` is built (too big for the stack). Only the ingress
/// program uses it, in softirq context, which does not nest on a CPU.
#[map]
static VIGIL_HANDOFF_SCRATCH: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn paused() -> bool {
    // An array lookup the verifier inlines: a few instructions per packet.
    VIGIL_PAUSE.get(0).is_some_and(|p| *p != 0)
}

#[cgroup_skb(ingress)]
pub fn vigil_http_in(ctx: SkBuffContext) -> i32 {
    let _ = capture(&ctx, DIR_RECEIVED);
    1
}

#[cgroup_skb(egress)]
pub fn vigil_http_out(ctx: SkBuffContext) -> i32 {
    let _ = capture(&ctx, DIR_SENT);
    1
}

/// One TCP segment with payload, and what is known of its message.
#[derive(Clone, Copy)]
struct Segment {
    /// Sequence number of the first payload byte, and the payload's length.
    seq: u32,
    payload: u32,
    dir: u8,
    /// `MSG_*` of the message the header belongs to.
    kind: u8,
    /// The message's `TraceSpan::boundary`.
    boundary: u32,
    /// The segment (after the carried partial line) begins a header line.
    at_line: bool,
    /// Read at a listener into a `Handoff`: `boundary` is given (the
    /// packet's ACK number, the child socket's first sequence number), and
    /// the agent hears of the trace when the socket exists.
    handoff: bool,
}

#[inline(always)]
fn count(outcome: CaptureOutcome) {
    if let Some(n) = VIGIL_CAPTURE.get_ptr_mut(outcome as u32) {
        // SAFETY: this CPU's slot; nothing else writes it meanwhile.
        unsafe { *n += 1 };
    }
}

/// `a` is at or after `b` in sequence space.
#[inline(always)]
pub fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

/// The message a payload starts, from its first 8 bytes.
#[inline(always)]
fn message_start(head: [u8; 8]) -> Option<u8> {
    let word = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    const METHODS: [&[u8; 4]; 7] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI",
    ];
    let mut i = 0;
    while i < METHODS.len() {
        if word == u32::from_le_bytes(*METHODS[i]) {
            return Some(MSG_REQUEST);
        }
        i += 1;
    }
    if &head == b"HTTP/1.1" || &head == b"HTTP/1.0" {
        return Some(MSG_RESPONSE);
    }
    None
}

/// Where a TCP segment's payload starts in the packet, its sequence number,
/// and whether it is TCP at all: read straight from the packet's linear part
/// (IP and TCP headers always are, both ways), else through the helper.
#[inline(always)]
fn tcp_header(ctx: &SkBuffContext) -> Result<Option<(u32, u32)>, i64> {
    let skb = ctx.skb.skb;
    // SAFETY: the context's packet bounds, as the verifier hands them out.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    // 40 bytes: the smallest IPv4 + TCP header pair (a bound the verifier reads).
    if data + 40 <= end {
        // SAFETY: in bounds, checked just above.
        let vihl = unsafe { *(data as *const u8) };
        let (ip_len, proto) = match vihl >> 4 {
            // SAFETY: offsets 9 and 6 are inside the 40 checked bytes.
            4 => (usize::from(vihl & 0x0f) * 4, unsafe {
                *((data + 9) as *const u8)
            }),
            6 => (40, unsafe { *((data + 6) as *const u8) }),
            _ => return Ok(None),
        };
        if proto != 6 {
            return Ok(None);
        }
        let tcp = data + (ip_len & 0x3c);
        if tcp + 20 <= end {
            // SAFETY: in bounds, checked just above.
            let (seq, doff) = unsafe {
                (
                    ptr::read_unaligned((tcp + 4) as *const u32),
                    *((tcp + 12) as *const u8),
                )
            };
            let payload_at = (tcp - data) as u32 + u32::from(doff >> 4) * 4;
            return Ok(Some((u32::from_be(seq), payload_at)));
        }
    }
    let vihl: u8 = ctx.load(0)?;
    let (ip_len, proto_at) = match vihl >> 4 {
        4 => (u32::from(vihl & 0x0f) * 4, 9),
        6 => (40, 6),
        _ => return Ok(None),
    };
    if ctx.load::<u8>(proto_at)? != 6 {
        return Ok(None);
    }
    let seq = u32::from_be(ctx.load::<u32>(ip_len as usize + 4)?);
    let doff: u8 = ctx.load(ip_len as usize + 12)?;
    Ok(Some((seq, ip_len + u32::from(doff >> 4) * 4)))
}

#[inline(always)]
fn capture(ctx: &SkBuffContext, dir: u8) -> Result<(), i64> {
    if paused() {
        return Ok(());
    }
    // SAFETY: the context pointer the kernel passed in.
    let len = unsafe { (*ctx.skb.skb).len };
    let Some((seq, payload_at)) = tcp_header(ctx)? else {
        return Ok(());
    };
    // Pure ACKs and handshakes: the common case ends here.
    if len <= payload_at {
        return Ok(());
    }
    let payload = len - payload_at;
    let skb = ctx.skb.skb;
    // SAFETY: reading the context's socket field, which the verifier allows.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(());
    }
    // SAFETY: helper on the context's socket; returns NULL for non-full sockets.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return Ok(());
    }
    // A segment that completes a handshake (its final ACK lost, or
    // TCP_DEFER_ACCEPT) is filtered against the listener: the connection's
    // own socket does not exist yet. Its request is not the listener's: it
    // is read for the connection (`at_listener`).
    let src = Packet {
        ctx,
        at: payload_at,
    };
    // SAFETY: a field of the full socket the helper returned.
    if unsafe { (*sk).state } == TCP_LISTEN {
        if payload >= 8 {
            match message_start(src.head()?) {
                Some(MSG_REQUEST) => {
                    let seg = Segment {
                        seq,
                        payload,
                        dir,
                        kind: MSG_REQUEST,
                        boundary: 0,
                        at_line: false,
                        handoff: true,
                    };
                    return at_listener(&src, sk, seg);
                }
                Some(_) => count(CaptureOutcome::Abandoned),
                None => {}
            }
        }
        return Ok(());
    }
    let mut seg = Segment {
        seq,
        payload,
        dir,
        kind: 0,
        boundary: 0,
        at_line: false,
        handoff: false,
    };
    let next = next_bytes(sk, dir, || src.snd_nxt(sk));
    on_segment(&src, sk, &mut seg, next)
}

/// What a socket's capture state makes of its next bytes in one direction.
enum Next {
    /// More of this side's current message (its body, or a look-alike in
    /// it, or pipelining): HTTP/1.1 messages alternate, so no new one
    /// starts here, and its bytes are not even read.
    Body,
    /// More of a header being read.
    Header(&'static mut TraceSlot),
    /// The answer to a request whose context governs the exchange: a
    /// response, noted where it starts and not read (see `start_message`).
    Answer(&'static mut TraceSlot),
    /// The other side spoke last, or nobody yet: perhaps a new message.
    Start(Option<&'static mut TraceSlot>),
}

/// Decided before the bytes are located (a body costs no more than this);
/// `snd_nxt` as `Payload::snd_nxt`.
#[inline(always)]
fn next_bytes(sk: *mut bpf_sock, dir: u8, snd_nxt: impl FnOnce() -> Option<u32>) -> Next {
    match slot_of(sk, false) {
        Some(slot) if slot.open_dir == dir => Next::Header(slot),
        Some(slot) if slot.last_dir == dir && !answered_unseen(slot, dir, snd_nxt) => Next::Body,
        // HTTP/1.1 answers a request with a response: after a request (of
        // either side) whose context is known, the other side's bytes are
        // that response, and reading them would tell nothing new.
        Some(slot)
            if slot.last_kind == MSG_REQUEST && slot.last_dir != dir && context_known(slot) =>
        {
            Next::Answer(slot)
        }
        found => Next::Start(found),
    }
}

/// The exchange's trace context is settled: its request carried one, or
/// (capturing received messages only) the answer goes unseen anyway.
#[inline(always)]
fn context_known(slot: &TraceSlot) -> bool {
    (slot.cur.valid == 1 && slot.cur.stamp.present == 1) || VIGIL_CAPTURE_SENT.load() == 0
}

/// Notes the start of the answer to a traced request at `seq`, unread.
/// `boundary`: as in `start_message`, for a message received.
#[inline(always)]
fn note_answer(slot: &mut TraceSlot, dir: u8, seq: u32, boundary: u32) {
    note_start(slot, dir, seq, MSG_RESPONSE, boundary);
    count(CaptureOutcome::Answered);
}

/// Payload of a socket's stream in `seg.dir`, as `next` found it.
#[inline(always)]
fn on_segment<P: Payload>(
    src: &P,
    sk: *mut bpf_sock,
    seg: &mut Segment,
    next: Next,
) -> Result<(), i64> {
    match next {
        Next::Body => Ok(()),
        Next::Answer(slot) => {
            let boundary = if seg.dir == DIR_RECEIVED {
                match src.snd_nxt(sk) {
                    Some(n) => n,
                    None => return Ok(()),
                }
            } else {
                seg.seq
            };
            note_answer(slot, seg.dir, seg.seq, boundary);
            Ok(())
        }
        Next::Header(slot) if src.ours(sk) => continue_header(src, sk, slot, seg),
        // The first bytes are looked at before the descriptor check, which
        // only a message start (what most reads and writes are not) pays.
        Next::Start(found) if seg.payload >= 8 => match message_start(src.head()?) {
            Some(kind) if src.ours(sk) => {
                seg.kind = kind;
                start_message(src, sk, found, seg)
            }
            _ => Ok(()),
        },
        Next::Header(_) | Next::Start(_) => Ok(()),
    }
}

/// Where a message's bytes are read: a packet (`cgroup_skb`), or the buffer
/// an application writes (`tcp_sendmsg_locked`). Each program instantiates
/// the capture for its own source, so no program holds a helper its type
/// may not call.
trait Payload {
    /// Copies the first `len` bytes into `to`; 0 or a negative error.
    fn copy(&self, to: *mut u8, len: u32) -> i64;
    fn head(&self) -> Result<[u8; 8], i64>;
    /// Whether the bytes are `sk`'s, checked before the first is read.
    fn ours(&self, sk: *mut bpf_sock) -> bool;
    /// The socket's cookie (`sk`: the socket this source belongs to).
    fn cookie(&self, sk: *mut bpf_sock) -> u64;
    /// `snd_nxt` of the socket, where a message received is read.
    fn snd_nxt(&self, sk: *mut bpf_sock) -> Option<u32>;
    /// The owner of the listener a received request came through.
    fn listener_owner(&self) -> SockOwner;
}

/// A TCP segment's payload, from offset `at` of the packet.
struct Packet<'a> {
    ctx: &'a SkBuffContext,
    at: u32,
}

impl Payload for Packet<'_> {
    #[inline(always)]
    fn copy(&self, to: *mut u8, len: u32) -> i64 {
        // SAFETY: the caller's buffer holds `len` bytes.
        unsafe { bpf_skb_load_bytes(self.ctx.skb.skb as *const c_void, self.at, to.cast(), len) }
    }

    #[inline(always)]
    fn head(&self) -> Result<[u8; 8], i64> {
        self.ctx.load::<[u8; 8]>(self.at as usize)
    }

    #[inline(always)]
    fn ours(&self, _sk: *mut bpf_sock) -> bool {
        true
    }

    #[inline(always)]
    fn cookie(&self, _sk: *mut bpf_sock) -> u64 {
        // SAFETY: the skb context, whose socket the helper reads.
        unsafe { bpf_get_socket_cookie(self.ctx.skb.skb.cast()) }
    }

    #[inline(always)]
    fn snd_nxt(&self, sk: *mut bpf_sock) -> Option<u32> {
        // SAFETY: helper on a full socket; NULL when it is not TCP.
        unsafe { bpf_tcp_sock(sk).as_ref() }.map(|tp| tp.snd_nxt)
    }

    #[inline(always)]
    fn listener_owner(&self) -> SockOwner {
        listener_owner(self.ctx)
    }
}

/// Bytes in an application's own (user) buffer: what it writes to a
/// socket, or what a read just copied there from one.
struct AppBuffer {
    buf: u64,
    /// For bytes read: the read's file descriptor, which must name the
    /// socket before a byte is taken as the socket's (an in-kernel reader
    /// may run inside some task's read of another file). None for a write.
    read_fd: Option<u64>,
}

impl Payload for AppBuffer {
    #[inline(always)]
    fn copy(&self, to: *mut u8, len: u32) -> i64 {
        // SAFETY: the caller's buffer holds `len` bytes; a fault is an error.
        unsafe { bpf_probe_read_user(to.cast(), len, self.buf as *const c_void) }
    }

    #[inline(always)]
    fn head(&self) -> Result<[u8; 8], i64> {
        let mut head = [0u8; 8];
        match self.copy(head.as_mut_ptr(), 8) {
            0 => Ok(head),
            e => Err(e),
        }
    }

    #[inline(always)]
    fn ours(&self, sk: *mut bpf_sock) -> bool {
        // `sk`: the tracepoint's typed socket.
        self.read_fd
            .is_none_or(|fd| fd_is_socket(fd, sk.cast_const().cast()))
    }

    #[inline(always)]
    fn cookie(&self, sk: *mut bpf_sock) -> u64 {
        // SAFETY: the tracepoint's socket, which the helper reads.
        unsafe { bpf_get_socket_cookie(sk.cast()) }
    }

    /// For bytes read, the next byte the application writes: all it writes
    /// from here on answers them (a write is never asked).
    #[inline(always)]
    fn snd_nxt(&self, sk: *mut bpf_sock) -> Option<u32> {
        read(sk as u64, field!(tcp_write_seq)).ok()
    }

    /// The reading process: a socket is read only once accepted, so its
    /// reader owns it.
    #[inline(always)]
    fn listener_owner(&self) -> SockOwner {
        layout().map_or(SockOwner::default(), |l| current_owner(&l))
    }
}

/// Messages sent, read where the application hands them to TCP
/// (`tcp_sendmsg_locked`, once per chunk it queues): from the
/// application's buffer, once per write, never again for a retransmission,
/// and with no program on any packet. Where this kernel lacks the
/// tracepoint, `vigil_http_out` reads them from the packets instead.
#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn vigil_http_send(ctx: BtfTracePointContext) -> i32 {
    let _ = try_send(&ctx);
    0
}

fn try_send(ctx: &BtfTracePointContext) -> Result<(), i64> {
    if paused() || field!(send_ready) != 1 {
        return Ok(());
    }
    // The tracepoint's own trusted arguments: the socket and the message,
    // whose fields are read without a helper call.
    let (sk, msg) = (ctx.arg::<*mut bpf_sock>(0), ctx.arg::<*const c_void>(1));
    let iter = field!(msghdr_msg_iter);
    // A call's later chunks continue its first, which was read as far as a
    // header goes: only a call's first chunk can start or continue a header.
    // SAFETY: a field of the typed message (its iov_iter).
    if unsafe { load::<u64>(msg, iter + field!(iov_iter_offset)) } != 0 {
        return Ok(());
    }
    let next = next_bytes(sk, DIR_SENT, || None);
    if matches!(next, Next::Body) || !in_capture_cgroups() {
        return Ok(());
    }
    // The first byte of this call goes out at `write_seq`.
    let seq: u32 = read(sk as u64, field!(tcp_write_seq))?;
    if let Next::Answer(slot) = next {
        note_answer(slot, DIR_SENT, seq, seq);
        return Ok(());
    }
    let Some((buf, len)) = written(msg, iter)? else {
        return Ok(());
    };
    let mut seg = Segment {
        seq,
        payload: len.min(u64::from(u32::MAX >> 1)) as u32,
        dir: DIR_SENT,
        kind: 0,
        boundary: 0,
        at_line: false,
        handoff: false,
    };
    on_segment(&AppBuffer { buf, read_fd: None }, sk, &mut seg, next)
}

/// Where the bytes of a write start in the application's memory, and how
/// many there are in one piece; None for kernel memory (sendfile, splice,
/// in-kernel senders: no application's message).
#[inline(always)]
fn written(msg: *const c_void, iter: u32) -> Result<Option<(u64, u64)>, i64> {
    // SAFETY: fields of the typed message's iov_iter.
    let (kind, count): (u8, u64) = unsafe {
        (
            load(msg, iter + field!(iov_iter_type)),
            load(msg, iter + field!(iov_iter_count)),
        )
    };
    let base: u64 = read(msg as u64, iter + field!(iov_iter_buf))?;
    if u32::from(kind) == field!(iter_ubuf) {
        return Ok(Some((base, count)));
    }
    if u32::from(kind) == field!(iter_iovec) {
        // The current `struct iovec` (copied into the kernel): base, length.
        let (start, n): (u64, u64) = (read(base, 0)?, read(base, 8)?);
        return Ok(Some((start, n.min(count))));
    }
    Ok(None)
}

/// Messages received, read where the application reads them
/// (`sock_recv_length`, at the end of every read-family call on a socket):
/// from the buffer the bytes were just copied to, in order, once each,
/// never a duplicate or dropped segment, and with no program on any packet.
/// The call's buffer comes from the task's system call registers: read,
/// recvfrom (recv), readv and recvmsg, their first iovec. Other readers
/// (io_uring, in-kernel users) are not read. A kernel without the
/// tracepoint (before 6.3) or this architecture's registers in its BTF
/// reads them from the packets instead (`vigil_http_in`).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn vigil_http_recv(ctx: BtfTracePointContext) -> i32 {
    let _ = try_recv(&ctx);
    0
}

/// `recvmsg` flags whose bytes are not (or not yet) the stream's next.
const MSG_PEEK: i32 = 2;
const MSG_TRUNC: i32 = 0x20;

fn try_recv(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let (ret, flags): (i32, i32) = (ctx.arg(1), ctx.arg(2));
    if ret <= 0 || flags & (MSG_PEEK | MSG_TRUNC) != 0 || paused() || field!(recv_ready) != 1 {
        return Ok(());
    }
    // `sk` is the tracepoint's own trusted socket argument; as a TCP socket
    // (NULL for any other) its fields are read without a helper call.
    let sk = ctx.arg::<*mut c_void>(0);
    // SAFETY: the helper checks what `sk` is.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) }
        .cast::<c_void>()
        .cast_const();
    if tp.is_null() {
        return Ok(());
    }
    // A kTLS socket's reads are plaintext, but its sequence numbers count
    // TLS records: its bytes could not be placed.
    // SAFETY: a field of the typed TCP socket.
    if unsafe { load::<u64>(tp, field!(icsk_ulp_ops)) } != 0 {
        return Ok(());
    }
    let sk = sk.cast::<bpf_sock>();
    // SAFETY: as above.
    let next = next_bytes(sk, DIR_RECEIVED, || {
        Some(unsafe { load::<u32>(tp, field!(tcp_write_seq)) })
    });
    if matches!(next, Next::Body) || !in_capture_cgroups() {
        return Ok(());
    }
    // The read's bytes end at `copied_seq`, which it advanced.
    // SAFETY: as above.
    let seq = unsafe { load::<u32>(tp, field!(tcp_copied_seq)) }.wrapping_sub(ret as u32);
    if let Next::Answer(slot) = next {
        // SAFETY: as above.
        note_answer(slot, DIR_RECEIVED, seq, unsafe {
            load(tp, field!(tcp_write_seq))
        });
        return Ok(());
    }
    let Some((fd, buf, len)) = read_call() else {
        return Ok(());
    };
    let mut seg = Segment {
        seq,
        payload: len.min(ret as u64) as u32,
        dir: DIR_RECEIVED,
        kind: 0,
        boundary: 0,
        at_line: false,
        handoff: false,
    };
    let src = AppBuffer {
        buf,
        read_fd: Some(fd),
    };
    on_segment(&src, sk, &mut seg, next)
}

/// The file descriptor and first buffer (address, length) of the current
/// task's read-family system call; None inside any other.
#[inline(always)]
fn read_call() -> Option<(u64, u64, u64)> {
    // SAFETY: helpers on the current task, valid for the program's run; the
    // registers are a typed object, read directly.
    let (nr, fd, arg) = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const c_void;
        (
            load::<u64>(regs, field!(pt_regs_nr)),
            load::<u64>(regs, field!(pt_regs_arg1)),
            load::<u64>(regs, field!(pt_regs_arg2)),
        )
    };
    let (buf, len) = if nr == u64::from(field!(nr_read)) || nr == u64::from(field!(nr_recvfrom)) {
        (arg, u64::MAX)
    } else if nr == u64::from(field!(nr_readv)) {
        first_iovec(arg).ok()?
    } else if nr == u64::from(field!(nr_recvmsg)) {
        // struct user_msghdr: msg_name, msg_namelen (padded), msg_iov.
        first_iovec(user(arg + 16).ok()?).ok()?
    } else {
        return None;
    };
    Some((fd, buf, len))
}

/// A user `struct iovec`: base, length.
#[inline(always)]
fn first_iovec(at: u64) -> Result<(u64, u64), i64> {
    Ok((user(at)?, user(at + 8)?))
}

/// A `u64` of the current task's memory; a fault is an error.
#[inline(always)]
fn user(at: u64) -> Result<u64, i64> {
    // SAFETY: the helper checks the address and fails on a fault.
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(at as *const u64) }.map_err(i64::from)
}

/// Whether the reading or writing task is in a cgroup capture covers (the
/// agent sets `VIGIL_CAPTURE_CGROUPS` when `correlate.capture_cgroups` is
/// not the root; the cgroup_skb programs are attached to those cgroups
/// instead).
#[inline(always)]
fn in_capture_cgroups() -> bool {
    let n = VIGIL_CAPTURE_SCOPE.load();
    if n == 0 {
        return true;
    }
    let mut i = 0;
    while i < CAPTURE_CGROUPS {
        if i >= n {
            break;
        }
        if VIGIL_CAPTURE_CGROUPS.current_task_under_cgroup(i) == Ok(true) {
            return true;
        }
        i += 1;
    }
    false
}

/// Capturing received messages only, the answer to the last one is never
/// seen; that this side sent anything since (`snd_nxt` moved) says the other
/// side may speak again.
#[inline(always)]
fn answered_unseen(slot: &TraceSlot, dir: u8, snd_nxt: impl FnOnce() -> Option<u32>) -> bool {
    if dir != DIR_RECEIVED || VIGIL_CAPTURE_SENT.load() != 0 {
        return false;
    }
    snd_nxt().is_some_and(|n| n != slot.recv_mark)
}

#[inline(always)]
fn slot_of(sk: *mut bpf_sock, create: bool) -> Option<&'static mut TraceSlot> {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    storage(sk.cast(), flags)
}

/// A socket's capture state. `sk`: a full socket the verifier knows as one
/// (from bpf_sk_fullsock, or a tracepoint's typed argument); a created slot
/// is zero-filled by the kernel.
#[inline(always)]
fn storage(sk: *mut c_void, flags: u64) -> Option<&'static mut TraceSlot> {
    // SAFETY: as above; the helper returns NULL for anything else.
    let p = unsafe {
        bpf_sk_storage_get(
            ptr::addr_of!(VIGIL_TRACE_SLOTS).cast_mut().cast(),
            sk,
            ptr::null_mut(),
            flags,
        )
    }
    .cast::<TraceSlot>();
    // SAFETY: non-null storage values live as long as the socket.
    unsafe { p.as_mut() }
}

#[inline(never)]
fn start_message<P: Payload>(
    src: &P,
    sk: *mut bpf_sock,
    found: Option<&'static mut TraceSlot>,
    seg: &mut Segment,
) -> Result<(), i64> {
    let (dir, seq) = (seg.dir, seg.seq);
    let Some(slot) = found.or_else(|| slot_of(sk, true)) else {
        return Ok(());
    };
    let d = usize::from(dir - 1) & 1;
    let bit = 1u8 << d;
    if slot.msg_seen & bit != 0 && !seq_ge(seq.wrapping_sub(1), slot.msg_seq[d]) {
        count(CaptureOutcome::Repeated);
        return Ok(());
    }
    if slot.open_dir != 0 {
        count(CaptureOutcome::Abandoned);
    }
    // What this side sends from here on belongs to this message: a message
    // sent starts at its own first byte; one received is answered by
    // whatever this side sends next.
    let boundary = if dir == DIR_SENT {
        seq
    } else if seg.handoff {
        seg.boundary
    } else {
        match src.snd_nxt(sk) {
            Some(n) => n,
            None => return Ok(()),
        }
    };
    note_start(slot, dir, seq, seg.kind, boundary);
    // A response to a request with trace context is not read: the exchange
    // already has its context, and a response rarely carries one (reading a
    // header that has none means scanning all of it). A response to a
    // request without one is read: it may be where the trace starts. A
    // response received while sent messages go unseen is not read either:
    // its context would govern the next request, which this side sends unseen.
    if seg.kind == MSG_RESPONSE && context_known(slot) {
        count(CaptureOutcome::Answered);
        return Ok(());
    }
    if seg.kind == MSG_REQUEST {
        // A request without trace context ends the previous one's.
        push(slot, boundary);
    }
    seg.boundary = boundary;
    scan_segment(src, sk, slot, seg)
}

#[inline(always)]
fn continue_header<P: Payload>(
    src: &P,
    sk: *mut bpf_sock,
    slot: &mut TraceSlot,
    seg: &mut Segment,
) -> Result<(), i64> {
    let seq = seg.seq;
    if seq != slot.open_next_seq {
        // Before: a retransmission of what was read. After: a gap.
        if !seq_ge(seq, slot.open_next_seq) {
            return Ok(());
        }
        slot.open_dir = 0;
        count(CaptureOutcome::Abandoned);
        return Ok(());
    }
    seg.kind = slot.open_kind;
    seg.boundary = slot.open_boundary;
    seg.at_line = slot.at_line_start != 0;
    scan_segment(src, sk, slot, seg)
}

/// A message starts at `seq` in `dir`: its bytes are read from here, and
/// those after it in the same direction are its body.
#[inline(always)]
fn note_start(slot: &mut TraceSlot, dir: u8, seq: u32, kind: u8, boundary: u32) {
    let d = usize::from(dir - 1) & 1;
    slot.msg_seen |= 1u8 << d;
    slot.msg_seq[d] = seq;
    slot.last_dir = dir;
    slot.last_kind = kind;
    if dir == DIR_RECEIVED {
        slot.recv_mark = boundary;
    }
    slot.open_dir = 0;
    slot.open_scanned = 0;
    slot.carry_len = 0;
}

/// A new message governs what this side sends from `boundary` on.
#[inline(always)]
fn push(slot: &mut TraceSlot, boundary: u32) {
    if slot.cur.valid == 0 || slot.cur.boundary != boundary {
        slot.prev = slot.cur;
    }
    // No trace context yet. The old value's bytes stay behind `present = 0`
    // (nothing reads them): zeroing 55 bytes is a memset call per message.
    slot.cur.stamp.present = 0;
    slot.cur.boundary = boundary;
    slot.cur.valid = 1;
}

/// Copies the segment (after any carried partial line) into scratch, scans
/// it, and records the result in the slot.
#[inline(never)]
fn scan_segment<P: Payload>(
    src: &P,
    sk: *mut bpf_sock,
    slot: &mut TraceSlot,
    seg: &Segment,
) -> Result<(), i64> {
    // Header bytes read so far: a segment counts up to its scan window (a
    // big segment holds the header and then body).
    let scanned = u32::from(slot.open_scanned) + seg.payload.min(WINDOW as u32);
    if scanned > MAX_HEADER {
        slot.open_dir = 0;
        count(CaptureOutcome::Abandoned);
        return Ok(());
    }
    let Some(scratch) = acquire_scratch() else {
        count(CaptureOutcome::Abandoned);
        return Ok(());
    };
    // SAFETY: acquired for this program alone until released below.
    let r = scan_into(src, sk, slot, scratch, seg, scanned);
    release_scratch(scratch);
    if r.is_err() {
        // The bytes could not be copied (e.g. a write's page not resident).
        slot.open_dir = 0;
        count(CaptureOutcome::Abandoned);
    }
    r
}

#[inline(always)]
fn scan_into<P: Payload>(
    src: &P,
    sk: *mut bpf_sock,
    slot: &mut TraceSlot,
    scratch: *mut Scratch,
    seg: &Segment,
    scanned: u32,
) -> Result<(), i64> {
    // SAFETY: acquired for this program alone.
    let buf = unsafe { &mut (*scratch).buf };
    let Segment {
        seq,
        payload,
        dir,
        kind,
        boundary,
        at_line,
        handoff: _,
    } = *seg;
    let carry = if at_line {
        usize::from(slot.carry_len) % (TRACE_CARRY + 1)
    } else {
        0
    };
    // Fixed-length copies, a word at a time: a data-dependent loop end
    // would split the verifier's walk into one path per length.
    if carry > 0 {
        let mut k = 0;
        while k < TRACE_CARRY {
            // SAFETY: k + 8 <= TRACE_CARRY: inside both arrays.
            unsafe {
                ptr::write_unaligned(
                    buf.as_mut_ptr().add(k).cast::<u64>(),
                    ptr::read_unaligned(slot.carry.as_ptr().add(k).cast::<u64>()),
                )
            };
            k += 8;
        }
    }
    // Most headers fit in the first FIRST_READ bytes: read those, and the
    // rest of the window only when the header goes on (copying is the cost).
    let mut take = 0;
    let mut result = Scan::More { line_start: None };
    let mut stage = 0;
    while stage < 2 {
        let want = if stage == 0 { FIRST_READ } else { WINDOW };
        stage += 1;
        let next = if payload as usize > want {
            want
        } else {
            payload as usize
        };
        if next <= take {
            break;
        }
        take = next;
        // The verifier wants the length provably 1..: (take - 1) masked,
        // plus 1, and the offset masked; both stay far inside the buffer.
        let len = ((take.wrapping_sub(1) & (WINDOW * 2 - 1)) + 1) as u32;
        // SAFETY: at most 127 + 4096 bytes into a BUF-byte buffer.
        let r = src.copy(unsafe { buf.as_mut_ptr().add(carry & 0x7f) }, len);
        if r != 0 {
            return Err(r);
        }
        // SAFETY: as above.
        result = scan(unsafe { &mut *scratch }, carry + take, at_line);
        if !matches!(result, Scan::More { .. }) {
            break;
        }
    }
    let n = carry + take;
    match result {
        Scan::Found(v) => {
            slot.open_dir = 0;
            // The agent hears of a socket's trace once, not once per message
            // of it (a response usually repeats its request's trace id).
            // A word at a time: `v` is below n <= 2144, so the masked offset
            // is `v` itself and 56 bytes from it stay inside the buffer.
            // SAFETY: as just said; the stamp is 56 bytes (raw, present).
            let value = unsafe { buf.as_ptr().add(v & WORD_MASK) };
            let stamp = ptr::addr_of_mut!(slot.cur.stamp).cast::<u8>();
            // SAFETY: every caller below reads at most 56 bytes from the
            // value or the stamp.
            let word =
                |p: *const u8, at: usize| unsafe { ptr::read_unaligned(p.add(at).cast::<u64>()) };
            // The trace id: bytes 3..35 of the value.
            let same = slot.cur.valid == 1
                && slot.cur.stamp.present == 1
                && word(stamp, 3) == word(value, 3)
                && word(stamp, 11) == word(value, 11)
                && word(stamp, 19) == word(value, 19)
                && word(stamp, 27) == word(value, 27);
            if slot.cur.valid == 0 || slot.cur.boundary != boundary {
                push(slot, boundary);
            }
            let stamp = ptr::addr_of_mut!(slot.cur.stamp).cast::<u8>();
            let mut k = 0;
            while k < TRACEPARENT_LEN + 1 {
                // SAFETY: k + 8 <= 56, inside the stamp and the buffer.
                unsafe { ptr::write_unaligned(stamp.add(k).cast::<u64>(), word(value, k)) };
                k += 8;
            }
            slot.cur.stamp.present = 1;
            count(CaptureOutcome::Traced);
            if !same {
                if seg.handoff {
                    slot.msg_seen |= TRACE_PENDING;
                } else {
                    let cookie = src.cookie(sk);
                    emit(cookie, sk.cast(), slot, dir, kind, boundary, || {
                        src.listener_owner()
                    });
                }
            }
        }
        Scan::End => {
            slot.open_dir = 0;
            count(CaptureOutcome::Untraced);
        }
        Scan::More { line_start } => {
            if payload as usize > WINDOW {
                // The rest of this segment was not read; a resume would misparse.
                slot.open_dir = 0;
                count(CaptureOutcome::Abandoned);
                return Ok(());
            }
            slot.open_dir = dir;
            slot.open_kind = kind;
            slot.open_next_seq = seq.wrapping_add(payload);
            slot.open_boundary = boundary;
            slot.open_scanned = scanned as u16;
            match line_start {
                Some(s) => {
                    let mut j = 0;
                    while j < TRACE_CARRY {
                        slot.carry[j] = buf[(s + j) & MASK];
                        j += 1;
                    }
                    slot.carry_len = ((n - s) % (TRACE_CARRY + 1)) as u8;
                    slot.at_line_start = 1;
                }
                None => {
                    slot.carry_len = 0;
                    slot.at_line_start = 0;
                }
            }
        }
    }
    Ok(())
}

enum Scan {
    /// The `traceparent` value starts here and is complete.
    Found(usize),
    /// The blank line ending the header.
    End,
    /// The header goes on in the next segment; the unfinished last line
    /// starts at `line_start` when it is short enough to carry.
    More { line_start: Option<usize> },
}

enum Line {
    Found(usize),
    End,
    /// Not finished in this segment and may still be `traceparent` (or the
    /// segment ends where a line starts).
    Open,
    Other,
}

/// What `scan` shares with `scan_step` across bpf_loop iterations.
#[repr(C)]
struct ScanState {
    n: u64,
    /// Where the search for the next newline resumes.
    at: u64,
    outcome: u64,
    value_at: u64,
    /// 1 + start of a line that ended with the data, unfinished (0: none).
    open_line: u64,
}
const STEP_MORE: u64 = 0;
const STEP_FOUND: u64 = 1;
const STEP_END: u64 = 2;

/// 8-byte words a scan step searches for the next newline: a typical
/// header line fits, so a step is about a line.
const STEP_WORDS: usize = 8;
/// Steps that surely cover `TRACE_CARRY + WINDOW` bytes: a step either
/// passes a newline that ends a line of at least two bytes (a shorter one
/// is the blank line that ends the scan) or searches `STEP_WORDS` words.
const SCAN_STEPS: u32 = ((TRACE_CARRY + WINDOW) / 2 + 2) as u32;

/// One header line of the scan: finds the next newline from `at`, a word
/// at a time, and checks the line after it. Returns 1 to stop the loop.
extern "C" fn scan_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `scan` gave it: the scratch
    // value this program holds for the whole loop.
    let scratch = unsafe { &mut **ctx.cast::<*mut Scratch>() };
    let (state, buf) = (&mut scratch.scan, &scratch.buf);
    let (n, at) = (state.n as usize, state.at as usize);
    if n > TRACE_CARRY + WINDOW || at >= n {
        return 1;
    }
    let mut newline = BUF;
    let mut w = 0;
    while w < STEP_WORDS {
        let base = at + w * 8;
        // SAFETY: `base & WORD_MASK` + 8 stays inside the BUF-byte buffer
        // (`base` stays below BUF / 2 anyway: n is at most 2144).
        let x = unsafe { ptr::read_unaligned(buf.as_ptr().add(base & WORD_MASK).cast::<u64>()) };
        let m = newline_mask(x);
        if m != 0 {
            newline = base + first_flagged(m);
            break;
        }
        w += 1;
    }
    if newline == BUF {
        state.at = (at + STEP_WORDS * 8) as u64;
        return 0;
    }
    // Bytes from `n` on are stale: a newline there is past the data.
    if newline >= n {
        state.at = n as u64;
        return 1;
    }
    state.at = (newline + 1) as u64;
    match check_line(buf, newline + 1, n) {
        Line::Found(v) => {
            state.outcome = STEP_FOUND;
            state.value_at = v as u64;
            1
        }
        Line::End => {
            state.outcome = STEP_END;
            1
        }
        Line::Open => {
            state.open_line = (newline + 2) as u64;
            0
        }
        Line::Other => 0,
    }
}

/// High bit of each byte of `x` that is `\n`, and possibly of bytes above
/// one that is (a borrow runs upwards): the lowest flagged byte is exact.
#[inline(always)]
fn newline_mask(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let v = x ^ (ONES * u64::from(b'\n'));
    v.wrapping_sub(ONES) & !v & (ONES << 7)
}

/// Index (0..8, lowest address first) of the lowest byte flagged in `m`:
/// its bit is 8k + 7; shifting a byte ladder by 8k brings k to the top.
#[inline(always)]
fn first_flagged(m: u64) -> usize {
    let low = m & m.wrapping_neg();
    ((low >> 7).wrapping_mul(0x0001_0203_0405_0607) >> 56) as usize
}

/// Looks at the header line starting at `s` (just after a newline).
#[inline(always)]
fn check_line(buf: &[u8; BUF], s: usize, n: usize) -> Line {
    if s >= n {
        return Line::Open;
    }
    let c = buf[s & MASK];
    if c == b'\r' || c == b'\n' {
        return Line::End;
    }
    if c | 0x20 != b't' {
        return Line::Other;
    }
    if s + NAME.len() > n {
        return Line::Open;
    }
    let mut i = 1;
    while i < NAME.len() {
        let b = buf[(s + i) & MASK];
        let b = if NAME[i] == b':' { b } else { b | 0x20 };
        if b != NAME[i] {
            return Line::Other;
        }
        i += 1;
    }
    // Optional whitespace before the value.
    let mut v = s + NAME.len();
    if v < n && (buf[v & MASK] == b' ' || buf[v & MASK] == b'\t') {
        v += 1;
    }
    if v < n && (buf[v & MASK] == b' ' || buf[v & MASK] == b'\t') {
        v += 1;
    }
    if v + TRACEPARENT_LEN > n {
        return Line::Open;
    }
    Line::Found(v)
}

/// Scans `buf[..n]` for the `traceparent` line or the end of the header.
/// `at_line`: `buf[0]` starts a header line (else the first line is the
/// request or status line, or the unfinished line before this segment).
#[inline(always)]
fn scan(scratch: &mut Scratch, n: usize, at_line: bool) -> Scan {
    let buf = &scratch.buf;
    let mut first_open = 0;
    if at_line {
        match check_line(buf, 0, n) {
            Line::Found(v) => return Scan::Found(v),
            Line::End => return Scan::End,
            Line::Open => first_open = 1,
            Line::Other => {}
        }
    }
    // A step per line: the verifier checks one step, not every iteration.
    // Field by field, volatile: LLVM turns adjacent zero stores into a call
    // to a byte-by-byte memset subprogram, once per scan.
    let state = ptr::addr_of_mut!(scratch.scan);
    // SAFETY: the scratch value this program holds.
    unsafe {
        ptr::write_volatile(ptr::addr_of_mut!((*state).n), n as u64);
        ptr::write_volatile(ptr::addr_of_mut!((*state).at), 0);
        ptr::write_volatile(ptr::addr_of_mut!((*state).outcome), STEP_MORE);
        ptr::write_volatile(ptr::addr_of_mut!((*state).value_at), 0);
        ptr::write_volatile(ptr::addr_of_mut!((*state).open_line), first_open);
    }
    let mut handle: *mut Scratch = scratch;
    // SAFETY: `scan_step` is a BPF function; `handle` outlives the call.
    unsafe {
        bpf_loop(
            SCAN_STEPS,
            scan_step as *mut c_void,
            ptr::addr_of_mut!(handle).cast(),
            0,
        )
    };
    let state = &scratch.scan;
    match state.outcome {
        STEP_FOUND => return Scan::Found(state.value_at as usize & MASK),
        STEP_END => return Scan::End,
        _ => {}
    }
    // The unfinished last line, when it may still be `traceparent`.
    Scan::More {
        line_start: match state.open_line {
            0 => None,
            s => Some((s - 1) as usize & MASK),
        },
    }
}

/// Tells the agent which trace a socket's message belonged to; the first
/// time, who and where the socket is. `sk`: a full socket the verifier
/// knows as one. `listener`: the owner of the listener a received request
/// came through, for a socket not yet accepted.
#[inline(always)]
fn emit(
    cookie: u64,
    sk: *mut c_void,
    slot: &mut TraceSlot,
    dir: u8,
    kind: u8,
    boundary: u32,
    listener: impl FnOnce() -> SockOwner,
) {
    if slot.msg_seen & SOCKET_ANNOUNCED == 0 {
        // A request can arrive before accept(), while the connection has no
        // owner yet: its listener's process is about to take it.
        let at_listener = dir == DIR_RECEIVED && kind == MSG_REQUEST;
        match announce(sk, cookie, at_listener, listener) {
            Ok(Announced::WithOwner) => slot.msg_seen |= SOCKET_ANNOUNCED,
            // Announced again with the next trace: by then accept() has
            // usually recorded the owner (the agent keeps the newest).
            Ok(Announced::WithoutOwner) => {}
            // The agent could not place the message without its socket.
            Ok(Announced::Lost) | Err(_) => return,
        }
    }
    let stamp = &slot.cur.stamp;
    let _ = submit_in_place(LossSlot::TraceContext, |r: &mut TraceRecord| {
        r.kind = EventKind::TraceContext as u32;
        r.role = u32::from(dir) | u32::from(kind) << 4;
        // SAFETY: plain helper call without arguments.
        r.ts_ns = unsafe { bpf_ktime_get_ns() };
        r.cookie = cookie;
        r.boundary = boundary;
        r.stamp = *stamp;
        Ok(())
    });
}

enum Announced {
    WithOwner,
    WithoutOwner,
    Lost,
}

/// The socket's endpoints and owner, once per socket (until its owner is known).
#[inline(always)]
fn announce(
    sk: *mut c_void,
    cookie: u64,
    at_listener: bool,
    listener: impl FnOnce() -> SockOwner,
) -> Result<Announced, i64> {
    if field!(ready) != 1 {
        return Ok(Announced::Lost);
    }
    // The verifier forbids arithmetic on a socket pointer but allows field
    // reads through the same socket as a BTF-typed `tcp_sock`.
    // SAFETY: helper on a full socket; NULL when it is not TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk) };
    if tp.is_null() {
        return Ok(Announced::Lost);
    }
    let addr = tp as u64;
    let mut known = false;
    let delivered = submit_in_place(LossSlot::TraceContext, |r: &mut TraceSocketRecord| {
        r.kind = EventKind::TraceSocket as u32;
        r.cookie = cookie;
        r.sk_addr = addr;
        r.netns = netns_inode(Probed(addr))?;
        r.tuple = tuple(Probed(addr))?;
        // Recorded in process context at connect/listen/accept.
        // SAFETY: the value is copied out before the map can change it.
        match unsafe { VIGIL_SOCKS.get(addr) } {
            Some(state) => r.owner = state.owner,
            None if at_listener => r.owner = listener(),
            None => {}
        }
        known = r.owner.known != 0;
        Ok(())
    })?;
    Ok(match (delivered, known) {
        (false, _) => Announced::Lost,
        (true, true) => Announced::WithOwner,
        (true, false) => Announced::WithoutOwner,
    })
}

/// A request in the segment that completes a handshake, filtered against
/// the listener: read into a slot of its own, kept by the connection's
/// 4-tuple until `vigil_http_handoff` moves it to the connection's socket.
// Inlined, like `capture`: its own frame would put the call chain down to
// the header scan over the verifier's 512-byte stack.
#[inline(always)]
fn at_listener(src: &Packet<'_>, listener: *mut bpf_sock, mut seg: Segment) -> Result<(), i64> {
    let Some(h) = VIGIL_HANDOFF_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's value, used by this program alone (see the map),
    // and 8-byte aligned like every map value.
    let h = unsafe {
        zero(h);
        &mut *h
    };
    // What this side sends on the connection starts at the acknowledged number.
    let Some(ack) = packet_key(src.ctx, listener, &mut h.key)? else {
        return Ok(());
    };
    seg.boundary = ack;
    // SAFETY: a per-CPU map value outlives the program.
    let slot: &'static mut TraceSlot = unsafe { &mut *ptr::addr_of_mut!(h.slot) };
    start_message(src, listener, Some(slot), &mut seg)?;
    // SAFETY: as in `listener_owner`: copied out before the map can change it.
    let tp = unsafe { bpf_skc_to_tcp_sock(listener.cast()) };
    if !tp.is_null() {
        if let Some(state) = unsafe { VIGIL_SOCKS.get(tp as u64) } {
            h.owner = state.owner;
        }
    }
    let key = ptr::addr_of!(h.key);
    // SAFETY: a copy of the key, which lives in the same map value.
    if VIGIL_HANDSHAKES.insert(unsafe { *key }, h, 0).is_err() {
        count(CaptureOutcome::Abandoned);
    }
    Ok(())
}

/// Writes the key of a packet's connection, as its socket will have it, to
/// `key` (zeroed); returns the packet's acknowledgment number. Not inlined:
/// its frame is gone before the header is read.
#[inline(never)]
fn packet_key(
    ctx: &SkBuffContext,
    listener: *mut bpf_sock,
    key: &mut HandshakeKey,
) -> Result<Option<u32>, i64> {
    if field!(ready) != 1 {
        return Ok(None);
    }
    // SAFETY: helper on a full socket; NULL when it is not TCP.
    let tp = unsafe { bpf_skc_to_tcp_sock(listener.cast()) };
    if tp.is_null() {
        return Ok(None);
    }
    key.netns = netns_inode(Probed(tp as u64))?;
    key.ip = 4;
    let vihl: u8 = ctx.load(0)?;
    let tcp = match vihl >> 4 {
        4 => {
            let (src, dst): ([u8; 4], [u8; 4]) = (ctx.load(12)?, ctx.load(16)?);
            key.remote[..4].copy_from_slice(&src);
            key.local[..4].copy_from_slice(&dst);
            usize::from(vihl & 0x0f) * 4
        }
        6 => {
            key.ip = 6;
            key.remote = ctx.load(8)?;
            key.local = ctx.load(24)?;
            40
        }
        _ => return Ok(None),
    };
    key.remote_port = u16::from_be(ctx.load(tcp)?);
    key.local_port = u16::from_be(ctx.load(tcp + 2)?);
    Ok(Some(u32::from_be(ctx.load(tcp + 8)?)))
}

/// The key of an established socket's connection (see `HandshakeKey`).
#[inline(always)]
fn socket_key(sk: u64) -> Result<HandshakeKey, i64> {
    let t = tuple(Probed(sk))?;
    let mut key = HandshakeKey {
        netns: netns_inode(Probed(sk))?,
        ip: 4,
        local_port: t.local_port,
        remote_port: t.remote_port,
        _pad: 0,
        local: t.local_addr,
        remote: t.remote_addr,
    };
    if t.family == AF_INET6 {
        const MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        if t.remote_addr[..12] == MAPPED {
            key.local = [0; 16];
            key.remote = [0; 16];
            key.local[..4].copy_from_slice(&t.local_addr[12..]);
            key.remote[..4].copy_from_slice(&t.remote_addr[12..]);
        } else {
            key.ip = 6;
        }
    }
    Ok(key)
}

/// A passively opened connection becomes established: a request read at
/// its listener (`at_listener`) becomes its socket's capture state, and the
/// agent hears of its trace.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn vigil_http_handoff(ctx: BtfTracePointContext) -> i32 {
    let _ = try_handoff(&ctx);
    0
}

fn try_handoff(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let sk: u64 = ctx.arg(0);
    let (oldstate, newstate): (i32, i32) = (ctx.arg(1), ctx.arg(2));
    if newstate as u32 != TCP_ESTABLISHED || oldstate as u32 != TCP_SYN_RECV || paused() {
        return Ok(());
    }
    let Some(l) = layout() else {
        return Ok(());
    };
    if read::<u16>(sk, l.sk_protocol)? != IPPROTO_TCP {
        return Ok(());
    }
    let key = socket_key(sk)?;
    let Some(h) = VIGIL_HANDSHAKES.get_ptr_mut(key) else {
        return Ok(());
    };
    // `sk` is the tracepoint's own trusted socket argument.
    if let Some(slot) = storage(sk as *mut c_void, u64::from(BPF_SK_STORAGE_GET_F_CREATE)) {
        // SAFETY: an entry of the map, and a fresh slot: both 8-byte aligned
        // values of this type.
        let owner = unsafe {
            copy_words(ptr::addr_of!((*h).slot), slot);
            (*h).owner
        };
        if slot.msg_seen & TRACE_PENDING != 0 {
            slot.msg_seen &= !TRACE_PENDING;
            // SAFETY: the tracepoint's socket, which the helper reads.
            let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
            let boundary = slot.cur.boundary;
            emit(
                cookie,
                sk as *mut c_void,
                slot,
                DIR_RECEIVED,
                MSG_REQUEST,
                boundary,
                || owner,
            );
        }
    }
    let _ = VIGIL_HANDSHAKES.remove(key);
    Ok(())
}

/// The trace context of the message `sk` is receiving or answering.
#[inline(always)]
pub fn current_stamp(sk: *mut c_void) -> TraceStamp {
    match storage(sk, 0) {
        Some(slot) if slot.cur.valid == 1 => slot.cur.stamp,
        _ => TraceStamp::NONE,
    }
}

/// The owner of the listener a received packet's connection came through,
/// found with a listener lookup on the packet's destination (a zero source
/// misses every established socket).
#[inline(never)]
fn listener_owner(ctx: &SkBuffContext) -> SockOwner {
    // SAFETY: plain old data; all-zero is the wildcard source.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let Ok(vihl) = ctx.load::<u8>(0) else {
        return SockOwner::default();
    };
    let size = match vihl >> 4 {
        4 => {
            let ihl = usize::from(vihl & 0x0f) * 4;
            let (Ok(daddr), Ok(dport)) = (ctx.load::<u32>(16), ctx.load::<u16>(ihl + 2)) else {
                return SockOwner::default();
            };
            // Writing a union member is safe; the lookup reads this one.
            t.__bindgen_anon_1.ipv4.daddr = daddr;
            t.__bindgen_anon_1.ipv4.dport = dport;
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
        }
        6 => {
            let (Ok(daddr), Ok(dport)) = (ctx.load::<[u32; 4]>(24), ctx.load::<u16>(42)) else {
                return SockOwner::default();
            };
            t.__bindgen_anon_1.ipv6.daddr = daddr;
            t.__bindgen_anon_1.ipv6.dport = dport;
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
        }
        _ => return SockOwner::default(),
    };
    // SAFETY: a stack tuple of `size` bytes; the reference is released below.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut t,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return SockOwner::default();
    }
    // SAFETY: a socket reference from the lookup.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    let owner = if tp.is_null() {
        SockOwner::default()
    } else {
        // SAFETY: the value is copied out before the map can change it.
        unsafe { VIGIL_SOCKS.get(tp as u64) }.map_or(SockOwner::default(), |s| s.owner)
    };
    // SAFETY: releasing the lookup's reference, once.
    unsafe { bpf_sk_release(sk.cast()) };
    owner
}

/// The trace context of a retransmitted segment of `sk` starting at `seq`:
/// the newest message whose boundary it does not precede; none for segments
/// without payload.
#[inline(always)]
pub fn stamp_for(sk: *mut c_void, seq: u32, has_payload: bool) -> TraceStamp {
    if !has_payload {
        return TraceStamp::NONE;
    }
    let Some(slot) = storage(sk, 0) else {
        return TraceStamp::NONE;
    };
    if slot.cur.valid == 1 && seq_ge(seq, slot.cur.boundary) {
        return slot.cur.stamp;
    }
    if slot.prev.valid == 1 && seq_ge(seq, slot.prev.boundary) {
        return slot.prev.stamp;
    }
    TraceStamp::NONE
}
