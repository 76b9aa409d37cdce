//! Steering and admission on one SO_REUSEPORT group: the agent loads this
//! object once per group it enforces and attaches the program through one of
//! the group's listeners (SO_ATTACH_REUSEPORT_EBPF), so every map here is
//! that group's own.
//!
//! Fail-open by construction: unless the agent's heartbeat is fresh, the
//! program returns SK_PASS without selecting (the kernel's hash) and never
//! refuses; any error takes the same path.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{map, sk_reuseport},
    maps::{Array, PerCpuArray, ReusePortSockArray},
    programs::SkReuseportContext,
};
use vigil_abi::{ReuseportControl, ReuseportOutcome, REUSEPORT_MAX_MEMBERS, REUSEPORT_OUTCOMES};

/// The group's members, at the indices the agent chose.
#[map]
static VIGIL_RP_MEMBERS: ReusePortSockArray =
    ReusePortSockArray::with_max_entries(REUSEPORT_MAX_MEMBERS, 0);

/// The agent's word: heartbeat, healthy members, refusal rate.
#[map]
static VIGIL_RP_CONTROL: Array<ReuseportControl> = Array::with_max_entries(1, 0);

/// New connections by `ReuseportOutcome`.
#[map]
static VIGIL_RP_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REUSEPORT_OUTCOMES, 0);

const PPM: u32 = 1_000_000;

#[sk_reuseport]
pub fn vigil_reuseport(ctx: SkReuseportContext) -> u32 {
    let (action, outcome) = decide(&ctx);
    if let Some(n) = VIGIL_RP_COUNTS.get_ptr_mut(outcome as u32) {
        // SAFETY: a per-CPU slot of this map; no other writer on this CPU.
        unsafe { *n += 1 };
    }
    action
}

#[inline(always)]
fn decide(ctx: &SkReuseportContext) -> (u32, ReuseportOutcome) {
    let Some(control) = VIGIL_RP_CONTROL.get(0) else {
        return (SK_PASS, ReuseportOutcome::FailedOpen);
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(control.heartbeat_ns) > control.heartbeat_timeout_ns {
        return (SK_PASS, ReuseportOutcome::FailedOpen);
    }
    // SAFETY: plain helper call.
    if control.refuse_ppm > 0 && unsafe { bpf_get_prandom_u32() } % PPM < control.refuse_ppm {
        return (SK_DROP, ReuseportOutcome::Refused);
    }
    let count = control.healthy_count;
    if count == 0 || count > REUSEPORT_MAX_MEMBERS {
        return (SK_PASS, ReuseportOutcome::Hashed);
    }
    // The connection's own hash scaled to [0, count) by multiply and shift
    // (not `%`, whose result the verifier cannot bound), so the spread over
    // healthy members is even and the index provably below 64.
    let slot = ((u64::from(ctx.hash()) * u64::from(count)) >> 32) as usize;
    let Some(&member) = control.healthy.get(slot) else {
        return (SK_PASS, ReuseportOutcome::SelectFailed);
    };
    match VIGIL_RP_MEMBERS.select_reuseport(ctx, member) {
        Ok(()) => (SK_PASS, ReuseportOutcome::Steered),
        Err(_) => (SK_PASS, ReuseportOutcome::SelectFailed),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists for the linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
