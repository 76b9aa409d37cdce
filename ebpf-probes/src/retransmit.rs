//! TCP retransmissions: data/SYN segments and SYN-ACKs.
//!
//! `tcp_retransmit_skb` fires once per call of `__tcp_retransmit_skb`, also for
//! attempts that failed (`err`), and one call can carry many segments (GSO), so
//! the record carries `tcp_skb_pcount(skb)` and `err`; the agent decides which
//! attempts the kernel counted in RetransSegs. `tcp_retransmit_synack` fires only
//! for SYN-ACKs the kernel counted, one segment each.

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::debug;
use vigil_abi::{EventKind, KernelLayout, LossSlot, RetransmitRecord, SockOwner, LOSS_SLOTS};

use crate::{
    kernel::{layout, netns_inode, read, tuple},
    owners::VIGIL_OWNERS,
};

/// Events to the agent; its size is set by the agent at load.
#[map]
pub static VIGIL_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Records that found the ring full, per `LossSlot`, per CPU.
#[map]
pub static VIGIL_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_SLOTS, 0);

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn vigil_retx(ctx: BtfTracePointContext) -> i32 {
    if let Err(e) = try_retx(&ctx) {
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
    emit(&l, EventKind::Retransmit, LossSlot::Retransmit, sk, sk, cookie, state, segs, err)
}

#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn vigil_synack(ctx: BtfTracePointContext) -> i32 {
    if let Err(e) = try_synack(&ctx) {
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
    emit(&l, EventKind::SynAckRetransmit, LossSlot::SynAckRetransmit, listener, req, 0, state, 1, 0)
}

/// Fills and submits one record; a full ring is counted, never waited on.
#[expect(clippy::too_many_arguments, reason = "one flat record, filled in one place")]
#[inline(always)]
fn emit(
    l: &KernelLayout,
    kind: EventKind,
    slot: LossSlot,
    owner_sk: u64,
    tuple_skc: u64,
    cookie: u64,
    state: u32,
    segs: u32,
    err: i32,
) -> Result<(), i64> {
    let record = RetransmitRecord {
        kind: kind as u32,
        state,
        // SAFETY: plain helper call without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
        sk_addr: owner_sk,
        netns: netns_inode(l, tuple_skc)?,
        segs,
        err,
        _pad: 0,
        tuple: tuple(l, tuple_skc)?,
        // SAFETY: the value is copied out before the map can change it.
        owner: unsafe { VIGIL_OWNERS.get(&owner_sk) }.copied().unwrap_or(SockOwner::default()),
    };
    match VIGIL_EVENTS.reserve::<RetransmitRecord>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(0);
        }
        None => {
            if let Some(lost) = VIGIL_LOST.get_ptr_mut(slot as u32) {
                // SAFETY: per-CPU slot, no concurrent writer on this CPU.
                unsafe { *lost += 1 };
            }
        }
    }
    Ok(())
}
