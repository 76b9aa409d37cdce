//! A TCP socket iterator (`iter/tcp`): the agent reads it once per sample
//! interval and gets one `SocketSample` per socket — accept-queue fill of
//! listeners, RTT/cwnd/retransmits of connections — without walking /proc.
//!
//! The kernel visits the sockets of the network namespace the reading process
//! was in when it created the iterator, so the agent creates one per namespace.

use core::ffi::c_void;

use aya_ebpf::helpers::{bpf_get_socket_cookie, bpf_seq_write};
use vigil_abi::{SampleKind, SocketSample, TCP_LISTEN, TCP_NEW_SYN_RECV, TCP_TIME_WAIT};

use crate::{
    kernel::{layout, netns_inode, read, tuple},
    owners::VIGIL_SOCKS,
};

/// `struct bpf_iter_meta` (include/linux/bpf.h); only `seq` is used.
#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__tcp`: the program's context.
#[repr(C)]
pub struct IterTcp {
    meta: *mut IterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn vigil_tcp_iter(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel passes a valid context; both loads are checked by the
    // verifier against the BTF of `struct bpf_iter__tcp`.
    let (meta, skc) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    // The last call of an iteration has no socket.
    if skc.is_null() {
        return 0;
    }
    if let Ok(sample) = sample(skc) {
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

#[inline(always)]
fn sample(skc: *mut c_void) -> Result<SocketSample, i64> {
    let Some(l) = layout() else { return Err(0) };
    let sk = skc as u64;
    let state = u32::from(read::<u8>(sk, l.skc_state)?);
    // Time-wait and request sockets are not full sockets: nothing to sample.
    if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV {
        return Err(0);
    }
    let mut s = SocketSample {
        state,
        sk_addr: sk,
        // SAFETY: `skc` is a socket the kernel handed the iterator.
        cookie: unsafe { bpf_get_socket_cookie(skc) },
        netns: netns_inode(&l, sk)?,
        tuple: tuple(&l, sk)?,
        drops: read(sk, l.sk_drops)?,
        ..SocketSample::default()
    };
    // SAFETY: the value is copied out before the map can change it.
    if let Some(known) = unsafe { VIGIL_SOCKS.get(sk) } {
        s.owner = known.owner;
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
    Ok(s)
}
