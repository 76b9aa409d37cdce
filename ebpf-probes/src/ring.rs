//! The one ring buffer to the agent, and the per-CPU count of what never got in.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{PerCpuArray, RingBuf},
    Global,
};
use vigil_abi::{loss_index, LossReason, LossSlot, LOSS_SLOTS};

/// Events to the agent; its size is set by the agent at load.
#[map]
pub static VIGIL_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Bytes waiting in the ring before a submit wakes the agent. Waking it costs
/// an interrupt per event (several microseconds inside a VM); below this the
/// agent's own poll tick collects the events. Set by the agent.
#[unsafe(no_mangle)]
static VIGIL_WAKEUP_BYTES: Global<u64> = Global::new(0);

/// Events lost in the kernel, per `loss_index(probe, reason)`, per CPU.
#[map]
pub static VIGIL_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_SLOTS, 0);

/// Copies `record` into the ring; a full ring is counted, never waited on.
/// Returns whether the record got in.
#[inline(always)]
pub fn submit<T: Copy + 'static>(record: &T, slot: LossSlot) -> bool {
    match VIGIL_EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(*record);
            entry.submit(wakeup_flags());
            true
        }
        None => {
            count_loss(slot, LossReason::RingFull);
            false
        }
    }
}

/// Builds a record in place in the ring, from zero: for records too big to
/// sit on the 512-byte BPF stack next to what builds them. A failed `fill`
/// discards the entry. Returns whether the record got in.
#[inline(always)]
pub fn submit_in_place<T: 'static>(
    slot: LossSlot,
    fill: impl FnOnce(&mut T) -> Result<(), i64>,
) -> Result<bool, i64> {
    let Some(mut entry) = VIGIL_EVENTS.reserve::<T>(0) else {
        count_loss(slot, LossReason::RingFull);
        return Ok(false);
    };
    let record = entry.as_mut_ptr();
    // SAFETY: the reservation holds one T; records are plain old data, so
    // all-zero bytes are a valid value to fill in.
    let filled = unsafe {
        zero(record);
        fill(&mut *record)
    };
    match filled {
        Ok(()) => {
            entry.submit(wakeup_flags());
            Ok(true)
        }
        Err(e) => {
            entry.discard(0);
            Err(e)
        }
    }
}

/// Zeroes `*record` a word at a time (volatile, so LLVM does not turn the
/// loop back into a memset). `write_bytes` becomes a call to a
/// byte-by-byte memset subprogram for records this size; ring entries are
/// 8-byte aligned and the loop bound is a constant, so this unrolls into
/// plain stores.
///
/// # Safety
/// `record` points to a writable, 8-byte aligned `T`.
#[inline(always)]
pub unsafe fn zero<T>(record: *mut T) {
    let words = core::mem::size_of::<T>() / 8;
    let bytes = record.cast::<u8>();
    let mut i = 0;
    while i < words {
        // SAFETY: inside the record, aligned (the caller's promise).
        unsafe { bytes.add(i * 8).cast::<u64>().write_volatile(0) };
        i += 1;
    }
    let mut j = words * 8;
    while j < core::mem::size_of::<T>() {
        // SAFETY: inside the record.
        unsafe { bytes.add(j).write_volatile(0) };
        j += 1;
    }
}

/// Copies `*from` to `*to` a word at a time, for the same reason as `zero`.
///
/// # Safety
/// Both point to 8-byte aligned `T`s, `to` writable; `T` is a multiple of
/// 8 bytes.
#[inline(always)]
pub unsafe fn copy_words<T>(from: *const T, to: *mut T) {
    let (from, to) = (from.cast::<u64>(), to.cast::<u64>());
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: inside both values, aligned (the caller's promise).
        unsafe { to.add(i).write_volatile(from.add(i).read_volatile()) };
        i += 1;
    }
}

/// Wake the agent only once enough bytes wait (see `VIGIL_WAKEUP_BYTES`).
#[inline(always)]
fn wakeup_flags() -> u64 {
    let pending = VIGIL_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    u64::from(if pending >= VIGIL_WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    })
}

#[inline(always)]
pub fn count_loss(slot: LossSlot, reason: LossReason) {
    if let Some(lost) = VIGIL_LOST.get_ptr_mut(loss_index(slot, reason)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *lost += 1 };
    }
}
