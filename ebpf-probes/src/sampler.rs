//! A socket sampler on the task-file iterator (`iter/task_file`): the agent
//! reads it once per sample interval and gets one `SocketSample` per TCP
//! socket a process holds — accept-queue fill of listeners, RTT/cwnd/
//! retransmits of connections — with the holding process as owner.
//!
//! Why task files and not `iter/tcp`: the TCP iterator only walks the network
//! namespace its reader is in, so covering every pod would mean entering each
//! namespace (setns needs CAP_SYS_ADMIN). Processes' files span all network
//! namespaces and name the owner directly. Sockets no process holds (not yet
//! accepted, or closed and finishing) are not sampled; the accept queue's
//! length on the listener counts the former.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_seq_write, bpf_sock_from_file};
use vigil_abi::{
    KernelLayout, SampleKind, SockOwner, SocketSample, AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN,
    TCP_NEW_SYN_RECV, TCP_TIME_WAIT,
};

use crate::kernel::{family, layout, netns_inode, read, tuple, Probed};

/// `struct bpf_iter_meta` (include/linux/bpf.h); only `seq` is used.
#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__task_file`: the program's context.
#[repr(C)]
pub struct IterTaskFile {
    meta: *mut IterMeta,
    task: *mut c_void,
    fd: u32,
    file: *mut c_void,
}

const SOCK_STREAM: u16 = 1;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
pub extern "C" fn vigil_sock_iter(ctx: *mut IterTaskFile) -> i32 {
    // SAFETY: the kernel passes a valid context; the loads are checked by the
    // verifier against the BTF of `struct bpf_iter__task_file`.
    let (meta, task, file, fd) = unsafe { ((*ctx).meta, (*ctx).task, (*ctx).file, (*ctx).fd) };
    // The last call of an iteration has no task and no file.
    if task.is_null() || file.is_null() {
        return 0;
    }
    if let Ok(Some(sample)) = sample(task as u64, file, fd) {
        // SAFETY: `meta` is the iterator's own, `seq` its seq_file; the sample
        // is a plain struct on the stack.
        unsafe {
            bpf_seq_write(
                (*meta).seq.cast(),
                (&sample as *const SocketSample).cast(),
                core::mem::size_of::<SocketSample>() as u32,
            );
        }
    }
    0
}

/// The `struct sock` behind `file`, if it is a TCP socket.
///
/// No helper that takes a socket may be called on it: `bpf_sock_from_file`
/// returns a pointer the verifier does not trust, and on some kernel builds
/// (6.18.44-fc-v1272 and -v1300) every pointer loaded from it is untrusted
/// too, which `bpf_get_socket_cookie` and `bpf_skc_to_*` refuse. So every
/// field is read, the cookie included (`cookie`).
#[inline(always)]
fn tcp_socket(l: &KernelLayout, file: *mut c_void) -> Result<Option<u64>, i64> {
    // SAFETY: `file` is the iterator's own; the helper checks it is a socket.
    let socket = unsafe { bpf_sock_from_file(file.cast()) };
    if socket.is_null() {
        return Ok(None);
    }
    let sk: u64 = read(socket as u64, l.socket_sk)?;
    if sk == 0 {
        return Ok(None);
    }
    let fam = family(Probed(sk))?;
    let is_tcp = (fam == AF_INET || fam == AF_INET6)
        && read::<u16>(sk, l.sk_protocol)? == IPPROTO_TCP
        && read::<u16>(sk, l.sk_type)? == SOCK_STREAM;
    Ok(is_tcp.then_some(sk))
}

/// The task as a socket owner: its process, process name and cgroup v2 id.
#[inline(always)]
fn owner(l: &KernelLayout, task: u64) -> Result<SockOwner, i64> {
    let leader: u64 = read(task, l.task_group_leader)?;
    let css_set: u64 = read(task, l.task_cgroups)?;
    let cgroup: u64 = read(css_set, l.css_set_dfl_cgrp)?;
    let kn: u64 = read(cgroup, l.cgroup_kn)?;
    Ok(SockOwner {
        tgid: read::<i32>(task, l.task_tgid)? as u32,
        known: 1,
        cgroup_id: read(kn, l.kernfs_node_id)?,
        comm: read(leader, l.task_comm)?,
    })
}

#[inline(always)]
fn sample(task: u64, file: *mut c_void, fd: u32) -> Result<Option<SocketSample>, i64> {
    let Some(l) = layout() else { return Ok(None) };
    let Some(sk) = tcp_socket(&l, file)? else {
        return Ok(None);
    };
    let state = u32::from(read::<u8>(sk, l.skc_state)?);
    // Held sockets are full sockets; these states never are.
    if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV {
        return Ok(None);
    }
    let mut s = SocketSample {
        state,
        sk_addr: sk,
        // The cookie as the kernel keeps it: the one `bpf_get_socket_cookie`
        // returns, once anything asked for one (Vigil's probes do at every
        // event and traced message; `ss` does); 0 before. The agent tells
        // sockets apart by `sk_addr`, never by a cookie that may be 0.
        cookie: read(sk, l.skc_cookie)?,
        netns: netns_inode(Probed(sk))?,
        tuple: tuple(Probed(sk))?,
        drops: read(sk, l.sk_drops)?,
        fd,
        owner: owner(&l, task)?,
        ..SocketSample::default()
    };
    // The fault build (see Cargo.toml): a load through a plain number.
    #[cfg(feature = "fault-unverifiable-sampler")]
    {
        let not_a_pointer: u64 = read(sk, l.sk_drops)?;
        // SAFETY: none, on purpose: the verifier must refuse this program.
        s.drops = unsafe { core::ptr::read_volatile(not_a_pointer as *const u32) };
    }
    if state == TCP_LISTEN {
        s.kind = SampleKind::Listener as u32;
        s.queue_len = read(sk, l.sk_ack_backlog)?;
        s.queue_cap = read(sk, l.sk_max_ack_backlog)?;
    } else {
        s.kind = SampleKind::Connection as u32;
        // The kernel keeps srtt scaled by 8 and mdev by 4 (tcp_get_info unscales them the same way).
        s.srtt_us = read::<u32>(sk, l.tcp_srtt_us)? >> 3;
        s.rttvar_us = read::<u32>(sk, l.tcp_mdev_us)? >> 2;
        s.cwnd = read(sk, l.tcp_snd_cwnd)?;
        s.total_retrans = read(sk, l.tcp_total_retrans)?;
    }
    Ok(Some(s))
}
