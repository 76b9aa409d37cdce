//! SYN-ACK retransmits per handshake, to find those no probe run saw.
//!
//! The kernel counts a request socket's SYN-ACK retransmits in
//! `request_sock.num_retrans`, and the child socket it becomes starts with
//! `tcp_sock.total_retrans` equal to it (tcp_create_openreq_child). The child
//! also inherits the request's cookie (inet_csk_clone_lock). So the SYN-ACK
//! probe tallies its runs by the request's cookie, and accept() compares the
//! child's count with that tally: the difference is SYN-ACKs the kernel
//! counted in TCPSynRetrans while no tracepoint program ran (measured on this
//! machine: softirqs served on one foreign thread reached ftrace but neither
//! Vigil's nor bpftrace's programs, with no recursion miss recorded).
//!
//! A handshake is reconciled only when the probe saw at least one of its
//! SYN-ACKs, so one that began before the agent started is never counted
//! twice. A request that never becomes an accepted child is not reconciled.

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use core::intrinsics::{atomic_xadd, AtomicOrdering};
use vigil_abi::{EventKind, KernelLayout, SockOwner};

use crate::{
    kernel::read,
    retransmit::{emit, Sample},
};

/// SYN-ACK probe runs per handshake, by the request's cookie (each run's
/// record was then delivered or counted as lost).
#[map]
static VIGIL_SYNACKS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16_384, 0);

/// Fault injection for tests, set with bpftool; 0 (off) unless set.
/// Index 0: the probe acts as if it never ran for every Nth SYN-ACK of a
/// handshake (its 2nd, 4th, ... for N = 2), as the kernel sometimes does.
#[map]
static VIGIL_FAULTS: Array<u32> = Array::with_max_entries(1, 0);

/// Every SYN-ACK probe run per handshake, for that fault.
#[map]
static VIGIL_HS_RUNS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1_024, 0);

/// Called first by every SYN-ACK probe run. Returns false when a test fault
/// hides this run; otherwise the run is tallied for its handshake.
#[inline(always)]
pub fn synack_seen(cookie: u64) -> bool {
    if hidden_by_fault(cookie) {
        return false;
    }
    let seen = VIGIL_SYNACKS.get_ptr_mut(cookie).or_else(|| {
        // BPF_NOEXIST: two CPUs retransmitting the same request's SYN-ACK at
        // once must not both start the tally. Only when missing: a failed
        // insert into an LRU map can still evict another entry.
        let _ = VIGIL_SYNACKS.insert(cookie, 0, 1);
        VIGIL_SYNACKS.get_ptr_mut(cookie)
    });
    if let Some(seen) = seen {
        // SAFETY: a valid, aligned map value. Atomic (BPF XADD): core's
        // atomic types have no read-modify-write on this target.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(seen, 1) };
    }
    true
}

/// The `VIGIL_FAULTS` test switch: whether this is a run to hide. One array
/// lookup when the switch is off.
#[inline(always)]
fn hidden_by_fault(cookie: u64) -> bool {
    let every = VIGIL_FAULTS.get(0).copied().unwrap_or(0);
    if every == 0 {
        return false;
    }
    let runs = match VIGIL_HS_RUNS.get_ptr_mut(cookie) {
        // SAFETY: a valid map value; a test knob, so a race only moves which
        // run is hidden.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => {
            let _ = VIGIL_HS_RUNS.insert(cookie, 1, 0);
            1
        }
    };
    runs % every == 0
}

/// At accept(): reports the child's SYN-ACK retransmits no probe run saw.
#[inline(always)]
pub fn reconcile_on_accept(
    l: &KernelLayout,
    sk: u64,
    owner: SockOwner,
    total_retrans: u32,
) -> Result<(), i64> {
    if total_retrans == 0 {
        return Ok(());
    }
    let cookie: u64 = read(sk, l.skc_cookie)?;
    // SAFETY: the value is copied out before the map can change it.
    let Some(seen) = (unsafe { VIGIL_SYNACKS.get(cookie) }).copied() else {
        return Ok(());
    };
    let _ = VIGIL_SYNACKS.remove(cookie);
    let Some(unseen) = u64::from(total_retrans)
        .checked_sub(seen)
        .filter(|&n| n > 0)
    else {
        return Ok(());
    };
    emit(&Sample::found_unseen(
        EventKind::SynAckUnseen,
        sk,
        cookie,
        u32::from(read::<u8>(sk, l.skc_state)?),
        total_retrans,
        unseen as u32,
        owner,
    ))?;
    Ok(())
}
