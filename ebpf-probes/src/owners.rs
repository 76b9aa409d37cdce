//! Per-socket state: owner and retransmit baseline, recorded in process context.
//!
//! Retransmits run in timer/softirq context where the on-CPU task is unrelated
//! to the socket, so the owner is captured earlier: when a socket connects or
//! starts listening (inet_sock_set_state leaving CLOSE, raised by the syscall)
//! and when accept() hands a child socket to a process. Entries are keyed by the
//! socket's kernel address and removed when the socket reaches CLOSE, so an
//! address reused by a later socket never inherits a stale owner.
//!
//! The entry also holds the socket's `tcp_sock.total_retrans` as last seen. The
//! kernel adds to that counter exactly what it adds to Tcp RetransSegs, so the
//! retransmit probe reports deltas of it, and at CLOSE any segments counted
//! after the last event (which no tracepoint reported) are sent as one record.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use vigil_abi::{
    tp_offsets, AcceptKey, EventKind, KernelLayout, SockState, ACCEPT_PORTS, AF_INET, AF_INET6,
    IPPROTO_TCP, TCP_CLOSE, TCP_LISTEN, TCP_SYN_SENT,
};

use crate::{
    handshakes::reconcile_on_accept,
    kernel::{current_owner, family, layout, netns_inode, read, socket_of_fd, Probed},
    retransmit::{emit, Sample},
};

/// Socket address -> state. LRU so a missed CLOSE can never fill it; size set by the agent.
#[map]
pub static VIGIL_SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(65_536, 0);

/// Connections accept() handed out per (netns, port, process): how fast
/// each worker of a SO_REUSEPORT group takes connections off its queue,
/// for acting (a stalled worker accepts none; admission control needs the
/// group's drain rate).
#[map]
pub static VIGIL_ACCEPTS: LruHashMap<AcceptKey, u64> =
    LruHashMap::with_max_entries(ACCEPT_PORTS, 0);

/// Counts one accepted connection of socket `sk`.
#[inline(always)]
fn count_accept(l: &KernelLayout, sk: u64) -> Result<(), i64> {
    // The upper half is the process (tgid).
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = AcceptKey {
        netns: netns_inode(Probed(sk))?,
        pid,
        port: read(sk, l.skc_num)?,
        _pad: 0,
    };
    let n = VIGIL_ACCEPTS.get_ptr_mut(key).or_else(|| {
        // BPF_NOEXIST: two CPUs accepting the first connections of a port at
        // once must not both start the count. Key and value by value, from
        // the stack: with `&0` (a reference to a constant) every count
        // started at 65536 on this toolchain, a wrong initial value.
        let _ = VIGIL_ACCEPTS.insert(key, 0u64, 1);
        VIGIL_ACCEPTS.get_ptr_mut(key)
    });
    if let Some(n) = n {
        // SAFETY: a valid, aligned map value; atomic (BPF XADD).
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
    Ok(())
}

/// Starts tracking a socket now owned by the current process.
#[inline(always)]
fn remember(l: &KernelLayout, sk: u64) -> Result<SockState, i64> {
    let state = SockState {
        owner: current_owner(l),
        // A child socket starts with the SYN-ACK retransmits of its handshake,
        // which the SYN-ACK probe reported (or accept() reconciles).
        retrans_seen: read(sk, l.tcp_total_retrans)?,
        baseline_known: 1,
    };
    VIGIL_SOCKS.insert(sk, state, 0).map_err(i64::from)?;
    Ok(state)
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn vigil_sk_state(ctx: TracePointContext) -> u32 {
    let _ = try_sk_state(&ctx);
    0
}

fn try_sk_state(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: offsets checked against the tracepoint's format file by the agent.
    let (protocol, oldstate, newstate, sk) = unsafe {
        (
            ctx.read_at::<u16>(tp_offsets::SET_STATE_PROTOCOL)?,
            ctx.read_at::<i32>(tp_offsets::SET_STATE_OLDSTATE)? as u32,
            ctx.read_at::<i32>(tp_offsets::SET_STATE_NEWSTATE)? as u32,
            ctx.read_at::<u64>(tp_offsets::SET_STATE_SKADDR)?,
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let Some(l) = layout() else { return Ok(()) };
    if newstate == TCP_CLOSE {
        let result = reconcile_on_close(&l, sk, oldstate);
        let _ = VIGIL_SOCKS.remove(sk);
        result
    } else if oldstate == TCP_CLOSE && (newstate == TCP_SYN_SENT || newstate == TCP_LISTEN) {
        // connect() and listen() run this transition in the calling process.
        remember(&l, sk).map(|_| ())
    } else {
        Ok(())
    }
}

/// Reports segments the kernel counted on this socket after Vigil's last look.
#[inline(always)]
fn reconcile_on_close(l: &KernelLayout, sk: u64, oldstate: u32) -> Result<(), i64> {
    // SAFETY: the value is copied out before the map can change it.
    let Some(state) = (unsafe { VIGIL_SOCKS.get(sk) }).copied() else {
        return Ok(());
    };
    if state.baseline_known != 1 {
        return Ok(());
    }
    let total: u32 = read(sk, l.tcp_total_retrans)?;
    let unseen = total.wrapping_sub(state.retrans_seen);
    if unseen == 0 || unseen > total {
        return Ok(());
    }
    emit(&Sample::found_unseen(
        EventKind::RetransmitUnseen,
        sk,
        // Generated by the retransmit probe's bpf_get_socket_cookie, if it ever ran.
        read(sk, l.skc_cookie).unwrap_or(0),
        oldstate,
        total,
        unseen,
        state.owner,
    ))?;
    Ok(())
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn vigil_accept4(ctx: TracePointContext) -> u32 {
    let _ = try_accept(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn vigil_accept(ctx: TracePointContext) -> u32 {
    let _ = try_accept(&ctx);
    0
}

fn try_accept(ctx: &TracePointContext) -> Result<(), i64> {
    let Some(l) = layout() else { return Ok(()) };
    // SAFETY: offset checked against the tracepoint's format file by the agent.
    let fd = unsafe { ctx.read_at::<i64>(tp_offsets::SYS_EXIT_RET)? };
    if fd < 0 {
        return Ok(());
    }
    let Some(sk) = socket_of_fd(&l, fd as u64)? else {
        return Ok(());
    };
    let fam = family(Probed(sk))?;
    let protocol: u16 = read(sk, l.sk_protocol)?;
    if (fam == AF_INET || fam == AF_INET6) && protocol == IPPROTO_TCP {
        let _ = count_accept(&l, sk);
        let state = remember(&l, sk)?;
        reconcile_on_accept(&l, sk, state.owner, state.retrans_seen)?;
    }
    Ok(())
}
