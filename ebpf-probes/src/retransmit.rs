//! TCP retransmissions: data/SYN segments and SYN-ACKs.
//!
//! `tcp_retransmit_skb` fires once per call of `__tcp_retransmit_skb`, also for
//! attempts that failed (`err`), and one call can carry many segments (GSO), so
//! the record carries `tcp_skb_pcount(skb)` and `err`; the agent decides which
//! attempts the kernel counted in RetransSegs. `tcp_retransmit_synack` fires only
//! for SYN-ACKs the kernel counted, one segment each.

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, generated::bpf_skc_to_tcp_sock},
    macros::{btf_tracepoint, map},
    maps::LruPerCpuHashMap,
    programs::BtfTracePointContext,
};
use aya_log_ebpf::debug;
use core::ffi::c_void;

use vigil_abi::{
    EventKind, LossReason, LossSlot, RetransmitRecord, SockOwner, SockState, TraceStamp,
    COUNT_UNKNOWN,
};

/// TCP header flags as `tcp_skb_cb.tcp_flags` holds them.
const TCPHDR_FIN: u8 = 0x01;
const TCPHDR_SYN: u8 = 0x02;

use crate::{
    handshakes::synack_seen,
    http_capture::stamp_for,
    kernel::{field, netns_inode, tuple, Object, Probed, Typed},
    owners::VIGIL_SOCKS,
    ring::{count_loss, submit},
};

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn vigil_retx(ctx: BtfTracePointContext) -> i32 {
    if let Err(e) = try_retx(&ctx) {
        count_loss(LossSlot::Retransmit, LossReason::ReadError);
        debug!(&ctx, "vigil_retx: kernel read failed: {}", e);
    }
    0
}

fn try_retx(ctx: &BtfTracePointContext) -> Result<(), i64> {
    if field!(ready) != 1 {
        return Ok(());
    }
    let sk_ptr = ctx.arg::<*mut c_void>(0);
    let sk_addr = sk_ptr as u64;
    let err: i32 = ctx.arg(2);
    // SAFETY: the tracepoint's own trusted `struct sock *` and `struct
    // sk_buff *` arguments: their fields are loaded directly.
    let (sk, skb) = unsafe { (Typed::new(sk_ptr), Typed::new(ctx.arg(1))) };
    // SAFETY: as above; the helper checks what it is given.
    let (cookie, tp) = unsafe { (bpf_get_socket_cookie(sk_ptr), bpf_skc_to_tcp_sock(sk_ptr)) };
    if tp.is_null() {
        // Never for this tracepoint (a full TCP socket); counted if it were.
        return Err(-22);
    }
    // SAFETY: a typed TCP socket (NULL for anything else, handled above).
    let tcp = unsafe { Typed::new(tp.cast_const().cast()) };
    let cb = field!(skb_cb);
    let segs = u32::from(skb.get::<u16>(cb + field!(tcp_skb_cb_gso_segs))?);
    let state = u32::from(sk.get::<u8>(field!(skc_state))?);
    let total_retrans: u32 = tcp.get(field!(tcp_total_retrans))?;
    let (counted, owner) = look(sk_addr, total_retrans);
    // The request whose bytes the segment carries (SYN and FIN carry none).
    let seq: u32 = skb.get(cb + field!(tcp_skb_cb_seq))?;
    let end_seq: u32 = skb.get(cb + field!(tcp_skb_cb_end_seq))?;
    let flags: u8 = skb.get(cb + field!(tcp_skb_cb_tcp_flags))?;
    let control = u32::from(flags & TCPHDR_FIN != 0) + u32::from(flags & TCPHDR_SYN != 0);
    let bytes = end_seq.wrapping_sub(seq).saturating_sub(control);
    let trace = stamp_for(sk_ptr, seq, bytes > 0);
    let sample = Sample {
        kind: EventKind::Retransmit,
        slot: LossSlot::Retransmit,
        owner_sk: sk_addr,
        tuple_skc: sk,
        cookie,
        state,
        segs,
        err,
        total_retrans,
        counted,
        owner,
        // Lost at the first look at an older socket, its own segments (sent,
        // so counted) ride on no later delta; otherwise the next record has them.
        lost_for_good: if counted == COUNT_UNKNOWN && err == 0 {
            segs
        } else {
            0
        },
        seq,
        bytes,
        trace,
    };
    if emit(&sample)? {
        // Only a delivered record moves the baseline: the segments of a lost
        // one stay in the delta the socket's next record (or its close) carries.
        advance(sk_addr, total_retrans);
    }
    Ok(())
}

/// Segments the kernel counted on `sk` since the last delivered record (its
/// `total_retrans` delta, or `COUNT_UNKNOWN` at the first look at a socket
/// older than the agent), and the socket's owner.
#[inline(always)]
fn look(sk: u64, total_retrans: u32) -> (u32, SockOwner) {
    // SAFETY: the value is copied out before the map can change it.
    match unsafe { VIGIL_SOCKS.get(sk) } {
        Some(state) if state.baseline_known == 1 => {
            (total_retrans.wrapping_sub(state.retrans_seen), state.owner)
        }
        Some(state) => (COUNT_UNKNOWN, state.owner),
        None => {
            // A socket older than the agent: from now on this is its baseline.
            let state = SockState {
                owner: SockOwner::default(),
                retrans_seen: total_retrans,
                baseline_known: 1,
            };
            let _ = VIGIL_SOCKS.insert(sk, state, 0);
            (COUNT_UNKNOWN, SockOwner::default())
        }
    }
}

/// Records that the agent has now been told about `total_retrans` segments.
#[inline(always)]
fn advance(sk: u64, total_retrans: u32) {
    if let Some(state) = VIGIL_SOCKS.get_ptr_mut(sk) {
        // SAFETY: a valid map value; the socket's lock serialises its retransmits.
        unsafe {
            (*state).retrans_seen = total_retrans;
            (*state).baseline_known = 1;
        }
    }
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn vigil_synack(ctx: BtfTracePointContext) -> i32 {
    if let Err(e) = try_synack(&ctx) {
        count_loss(LossSlot::SynAckRetransmit, LossReason::ReadError);
        debug!(&ctx, "vigil_synack: kernel read failed: {}", e);
    }
    0
}

fn try_synack(ctx: &BtfTracePointContext) -> Result<(), i64> {
    if field!(ready) != 1 {
        return Ok(());
    }
    let listener_ptr = ctx.arg::<*const c_void>(0);
    let req_ptr = ctx.arg::<*mut c_void>(1);
    // SAFETY: the tracepoint's trusted request socket (it starts with a
    // sock_common); the helper checks what it is given.
    let cookie = unsafe { bpf_get_socket_cookie(req_ptr) };
    // Before anything can fail: a run that fails is counted as lost, not as
    // one no probe saw.
    if !synack_seen(cookie) {
        return Ok(());
    }
    // SAFETY: the tracepoint's own trusted arguments, the listener and the
    // request socket (which holds the connection's tuple).
    let (listener, req) = unsafe { (Typed::new(listener_ptr), Typed::new(req_ptr.cast_const())) };
    let state = u32::from(listener.get::<u8>(field!(skc_state))?);
    debug!(ctx, "SYN-ACK retransmit by a listener in state {}", state);
    let listener_addr = listener_ptr as u64;
    // SAFETY: the value is copied out before the map can change it.
    let owner = unsafe { VIGIL_SOCKS.get(listener_addr) }.map_or(SockOwner::default(), |s| s.owner);
    emit(&Sample {
        kind: EventKind::SynAckRetransmit,
        slot: LossSlot::SynAckRetransmit,
        owner_sk: listener_addr,
        tuple_skc: req,
        cookie,
        state,
        segs: 1,
        err: 0,
        total_retrans: 0,
        counted: 1,
        owner,
        lost_for_good: 1,
        seq: 0,
        bytes: 0,
        trace: TraceStamp::NONE,
    })?;
    Ok(())
}

/// What a hook learnt, before the common fields are added.
pub struct Sample<O> {
    pub kind: EventKind,
    pub slot: LossSlot,
    /// The socket the event is about (for SYN-ACKs: the listener).
    pub owner_sk: u64,
    /// Where the tuple and netns are read (for SYN-ACKs: the request socket).
    pub tuple_skc: O,
    pub cookie: u64,
    pub state: u32,
    pub segs: u32,
    pub err: i32,
    pub total_retrans: u32,
    pub counted: u32,
    pub owner: SockOwner,
    /// Segments no later record can carry if this one is lost.
    pub lost_for_good: u32,
    /// The segment's first sequence number and payload bytes (0 when none).
    pub seq: u32,
    pub bytes: u32,
    pub trace: TraceStamp,
}

impl Sample<Probed> {
    /// Segments a socket's own counter shows that no event carried, found at
    /// its close (`RetransmitUnseen`) or its accept (`SynAckUnseen`): the
    /// socket's last word on them, so nothing later can carry them if lost.
    #[inline(always)]
    pub fn found_unseen(
        kind: EventKind,
        sk: u64,
        cookie: u64,
        state: u32,
        total_retrans: u32,
        unseen: u32,
        owner: SockOwner,
    ) -> Self {
        Sample {
            kind,
            slot: if kind == EventKind::SynAckUnseen {
                LossSlot::SynAckRetransmit
            } else {
                LossSlot::Retransmit
            },
            owner_sk: sk,
            tuple_skc: Probed(sk),
            cookie,
            state,
            segs: unseen,
            err: 0,
            total_retrans,
            counted: unseen,
            owner,
            lost_for_good: unseen,
            seq: 0,
            bytes: 0,
            trace: TraceStamp::NONE,
        }
    }
}

/// Fills and submits one retransmit record; whether it reached the ring.
#[inline(always)]
pub fn emit<O: Object>(s: &Sample<O>) -> Result<bool, i64> {
    let record = RetransmitRecord {
        kind: s.kind as u32,
        state: s.state,
        // SAFETY: plain helper call without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie: s.cookie,
        sk_addr: s.owner_sk,
        netns: netns_inode(s.tuple_skc)?,
        segs: s.segs,
        err: s.err,
        total_retrans: s.total_retrans,
        counted: s.counted,
        seq: s.seq,
        bytes: s.bytes,
        _pad: 0,
        tuple: tuple(s.tuple_skc)?,
        owner: s.owner,
        trace: s.trace,
    };
    let delivered = submit(&record, s.slot);
    if !delivered && s.lost_for_good > 0 {
        count_lost_segments(record.netns, s.lost_for_good);
    }
    Ok(delivered)
}

/// Retransmitted segments the kernel counted whose record was lost for good,
/// per network namespace (LRU: a namespace's count outlives it only so long).
/// Reported segments plus these equal the namespace's Tcp RetransSegs.
#[map]
pub static VIGIL_LOST_SEGMENTS: LruPerCpuHashMap<u32, u64> =
    LruPerCpuHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn count_lost_segments(netns: u32, n: u32) {
    match VIGIL_LOST_SEGMENTS.get_ptr_mut(netns) {
        // SAFETY: this CPU's slot of the value; nothing else writes it meanwhile.
        Some(v) => unsafe { *v += u64::from(n) },
        None => {
            let _ = VIGIL_LOST_SEGMENTS.insert(netns, u64::from(n), 0);
        }
    }
}
