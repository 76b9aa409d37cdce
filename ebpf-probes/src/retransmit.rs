//! TCP retransmissions: data/SYN segments and SYN-ACKs.
//!
//! `tcp_retransmit_skb` fires once per call of `__tcp_retransmit_skb`, also for
//! attempts that failed (`err`), and one call can carry many segments (GSO), so
//! the record carries `tcp_skb_pcount(skb)` and `err`; the agent decides which
//! attempts the kernel counted in RetransSegs. `tcp_retransmit_synack` fires only
//! for SYN-ACKs the kernel counted, one segment each.

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use aya_log_ebpf::debug;
use vigil_abi::{
    EventKind, KernelLayout, LossReason, LossSlot, RetransmitRecord, SockOwner, SockState,
    COUNT_UNKNOWN,
};

use crate::{
    kernel::{layout, netns_inode, read, tuple},
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
    let Some(l) = layout() else { return Ok(()) };
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let err: i32 = ctx.arg(2);
    // SAFETY: `sk` is the tracepoint's own trusted `struct sock *` argument.
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut _) };
    let segs = u32::from(read::<u16>(skb, l.skb_cb + l.tcp_skb_cb_gso_segs)?);
    let state = u32::from(read::<u8>(sk, l.skc_state)?);
    let total_retrans: u32 = read(sk, l.tcp_total_retrans)?;
    let (counted, owner) = account(sk, total_retrans);
    emit(
        &l,
        &Sample {
            kind: EventKind::Retransmit,
            slot: LossSlot::Retransmit,
            owner_sk: sk,
            tuple_skc: sk,
            cookie,
            state,
            segs,
            err,
            total_retrans,
            counted,
            owner,
        },
    )
}

/// Segments the kernel counted on `sk` since the last look (its `total_retrans`
/// delta), and the socket's owner; moves the baseline to `total_retrans`.
#[inline(always)]
fn account(sk: u64, total_retrans: u32) -> (u32, SockOwner) {
    match VIGIL_SOCKS.get_ptr_mut(sk) {
        Some(state) => {
            // SAFETY: a valid map value; the socket's lock serialises its retransmits.
            let state = unsafe { &mut *state };
            let counted = if state.baseline_known == 1 {
                total_retrans.wrapping_sub(state.retrans_seen)
            } else {
                COUNT_UNKNOWN
            };
            state.retrans_seen = total_retrans;
            state.baseline_known = 1;
            (counted, state.owner)
        }
        None => {
            // A socket older than the agent: no baseline until now.
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

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn vigil_synack(ctx: BtfTracePointContext) -> i32 {
    if let Err(e) = try_synack(&ctx) {
        count_loss(LossSlot::SynAckRetransmit, LossReason::ReadError);
        debug!(&ctx, "vigil_synack: kernel read failed: {}", e);
    }
    0
}

fn try_synack(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let Some(l) = layout() else { return Ok(()) };
    let listener: u64 = ctx.arg(0);
    // A request_sock starts with a sock_common holding the connection's tuple.
    let req: u64 = ctx.arg(1);
    let state = u32::from(read::<u8>(listener, l.skc_state)?);
    debug!(ctx, "SYN-ACK retransmit by a listener in state {}", state);
    // SAFETY: the value is copied out before the map can change it.
    let owner = unsafe { VIGIL_SOCKS.get(listener) }.map_or(SockOwner::default(), |s| s.owner);
    emit(
        &l,
        &Sample {
            kind: EventKind::SynAckRetransmit,
            slot: LossSlot::SynAckRetransmit,
            owner_sk: listener,
            tuple_skc: req,
            cookie: 0,
            state,
            segs: 1,
            err: 0,
            total_retrans: 0,
            counted: 1,
            owner,
        },
    )
}

/// What a hook learnt, before the common fields are added.
pub struct Sample {
    pub kind: EventKind,
    pub slot: LossSlot,
    /// The socket the event is about (for SYN-ACKs: the listener).
    pub owner_sk: u64,
    /// Where the tuple and netns are read (for SYN-ACKs: the request socket).
    pub tuple_skc: u64,
    pub cookie: u64,
    pub state: u32,
    pub segs: u32,
    pub err: i32,
    pub total_retrans: u32,
    pub counted: u32,
    pub owner: SockOwner,
}

/// Fills and submits one retransmit record.
#[inline(always)]
pub fn emit(l: &KernelLayout, s: &Sample) -> Result<(), i64> {
    let record = RetransmitRecord {
        kind: s.kind as u32,
        state: s.state,
        // SAFETY: plain helper call without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie: s.cookie,
        sk_addr: s.owner_sk,
        netns: netns_inode(l, s.tuple_skc)?,
        segs: s.segs,
        err: s.err,
        total_retrans: s.total_retrans,
        counted: s.counted,
        _pad: 0,
        tuple: tuple(l, s.tuple_skc)?,
        owner: s.owner,
    };
    submit(&record, s.slot);
    Ok(())
}
