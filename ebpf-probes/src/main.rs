//! Vigil's kernel programs. One module per hook; each entry point is a thin
//! wrapper over a `try_` function so no path can panic.
#![no_std]
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![no_main]

mod drops;
mod handshakes;
mod http_capture;
mod kernel;
mod owners;
mod retransmit;
mod ring;
mod sampler;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists for the linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
