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
    helpers::bpf_get_current_task,
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use vigil_abi::{
    tp_offsets, EventKind, KernelLayout, LossSlot, SockState, AF_INET, AF_INET6, IPPROTO_TCP,
    TCP_CLOSE, TCP_LISTEN, TCP_SYN_SENT,
};

use crate::{
    kernel::{current_owner, family, layout, read},
    retransmit::{emit, Sample},
};

/// Socket address -> state. LRU so a missed CLOSE can never fill it; size set by the agent.
#[map]
pub static VIGIL_SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(65_536, 0);

/// Starts tracking a socket now owned by the current process.
#[inline(always)]
fn remember(l: &KernelLayout, sk: u64) -> Result<(), i64> {
    let state = SockState {
        owner: current_owner(l),
        // A child socket starts with the SYN-ACK retransmits of its handshake,
        // which the SYN-ACK probe already reported.
        retrans_seen: read(sk, l.tcp_total_retrans)?,
        baseline_known: 1,
    };
    VIGIL_SOCKS.insert(sk, state, 0).map_err(i64::from)
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
        remember(&l, sk)
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
    emit(
        l,
        &Sample {
            kind: EventKind::RetransmitUnseen,
            slot: LossSlot::Retransmit,
            owner_sk: sk,
            tuple_skc: sk,
            cookie: 0,
            state: oldstate,
            segs: unseen,
            err: 0,
            total_retrans: total,
            counted: unseen,
            owner: state.owner,
        },
    )
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
    // current->files->fdt->fd[fd]->private_data is the struct socket.
    // SAFETY: plain helper call without pointer arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, l.task_files)?;
    let fdt: u64 = read(files, l.files_fdt)?;
    let max_fds: u32 = read(fdt, l.fdtable_max_fds)?;
    if fd as u64 >= u64::from(max_fds) {
        return Ok(());
    }
    let fd_array: u64 = read(fdt, l.fdtable_fd)?;
    let file: u64 = read(fd_array + (fd as u64) * 8, 0)?;
    let socket: u64 = read(file, l.file_private_data)?;
    let sk: u64 = read(socket, l.socket_sk)?;
    let fam = family(&l, sk)?;
    let protocol: u16 = read(sk, l.sk_protocol)?;
    if (fam == AF_INET || fam == AF_INET6) && protocol == IPPROTO_TCP {
        remember(&l, sk)?;
    }
    Ok(())
}
