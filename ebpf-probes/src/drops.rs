//! Packets the kernel dropped on the way into a socket, with the kernel's reason.
//!
//! `kfree_skb` fires for every dropped packet on the node (`consume_skb`, the
//! normal free, has its own tracepoint), so the first thing the program does is
//! test the reason against the set the agent asked for: on a node without
//! socket drops that test is all it costs. The socket is the tracepoint's
//! `rx_sk` (set by the receive path) or else the packet's own `skb->sk`.
//!
//! `sock:sock_rcvqueue_full` and `sock:sock_exceed_buf_limit` are not hooked:
//! TCP's receive path uses neither (both stayed at 0 while TCPRcvQDrop rose,
//! measured on 6.18), and the datagram drops the first one reports also reach
//! `kfree_skb` with reason SOCKET_RCVBUFF.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns, macros::btf_tracepoint, programs::BtfTracePointContext, Global,
};
use vigil_abi::{
    DropReasonSet, DropRecord, EventKind, LossReason, LossSlot, DROP_REASON_WORDS,
    TCP_NEW_SYN_RECV, TCP_TIME_WAIT,
};

use crate::{
    http_capture::current_stamp,
    kernel::{layout, netns_inode, read, tuple, Probed},
    owners::VIGIL_SOCKS,
    ring::{count_loss, submit_in_place},
};

/// Drop reasons to report (bits by `enum skb_drop_reason` value); set by the agent.
#[unsafe(no_mangle)]
static VIGIL_DROP_REASONS: Global<DropReasonSet> = Global::new([0; DROP_REASON_WORDS]);

/// `vigil_abi::drop_reason_watched`, reading only the one word of the set it
/// needs (this runs for every dropped packet on the node).
#[inline(always)]
fn watched(reason: u32) -> bool {
    let word = (reason / 64) as usize;
    if word >= DROP_REASON_WORDS {
        return false;
    }
    let words = (&VIGIL_DROP_REASONS as *const Global<DropReasonSet>).cast::<u64>();
    // SAFETY: Global is repr(transparent) over the [u64; DROP_REASON_WORDS] the
    // agent wrote, and `word` is in bounds.
    let bits = unsafe { core::ptr::read_volatile(words.add(word)) };
    bits & (1 << (reason % 64)) != 0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn vigil_drop(ctx: BtfTracePointContext) -> i32 {
    // (skb, location, reason, rx_sk)
    let reason: u32 = ctx.arg(2);
    if !watched(reason) {
        return 0;
    }
    if try_drop(&ctx, reason).is_err() {
        count_loss(LossSlot::SocketDrop, LossReason::ReadError);
    }
    0
}

// Not inlined: the filter above then runs in a program with a small stack frame.
#[inline(never)]
fn try_drop(ctx: &BtfTracePointContext, reason: u32) -> Result<(), i64> {
    let Some(l) = layout() else { return Ok(()) };
    let skb: u64 = ctx.arg(0);
    let rx_sk: u64 = ctx.arg(3);
    let sk = if rx_sk != 0 {
        rx_sk
    } else {
        read::<u64>(skb, l.skb_sk)?
    };
    submit_in_place(LossSlot::SocketDrop, |record: &mut DropRecord| {
        record.kind = EventKind::SocketDrop as u32;
        record.reason = reason;
        // SAFETY: plain helper call without arguments.
        record.ts_ns = unsafe { bpf_ktime_get_ns() };
        record.sk_addr = sk;
        if sk == 0 {
            return Ok(());
        }
        record.state = u32::from(read::<u8>(sk, l.skc_state)?);
        record.netns = netns_inode(Probed(sk))?;
        record.tuple = tuple(Probed(sk))?;
        // Request and time-wait sockets end with sock_common: no protocol field.
        if record.state != TCP_NEW_SYN_RECV && record.state != TCP_TIME_WAIT {
            record.protocol = u32::from(read::<u16>(sk, l.sk_protocol)?);
        }
        // SAFETY: the value is copied out before the map can change it.
        if let Some(state) = unsafe { VIGIL_SOCKS.get(sk) } {
            record.owner = state.owner;
        }
        // The receive path names the socket as a typed pointer: its capture
        // state says which message it was receiving.
        if rx_sk != 0 {
            record.trace = current_stamp(ctx.arg::<*mut c_void>(3));
        }
        Ok(())
    })?;
    Ok(())
}
