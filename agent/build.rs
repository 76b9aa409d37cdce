//! Builds the kernel programs (ebpf-probes) for bpfel-unknown-none and leaves
//! the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! Without bpf-linker (a machine where `cargo xtask setup` has not run) the
//! build still succeeds with an empty object, so `cargo check` and unit tests
//! work everywhere; the agent then refuses to start with a message saying how
//! to fix it. With it, the programs are built with exactly the toolchain
//! `probes-toolchain.toml` pins (rustc and bpf-linker), or not at all.

use std::{env, fs, path::PathBuf, process::Command};

include!("../build-support/probes_toolchain.rs");

fn main() -> anyhow::Result<()> {
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("vigil-probes");
    // The steering program's object (one per SO_REUSEPORT group acted on).
    let reuseport_object = out_dir.join("vigil-reuseport");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=VIGIL_SKIP_EBPF");
    // Builds that never load the probes (fuzzing, docs) can skip the kernel object.
    if env::var_os("VIGIL_SKIP_EBPF").is_some_and(|v| v == "1") {
        fs::write(&object, [])?;
        fs::write(&reuseport_object, [])?;
        return Ok(());
    }
    let linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let Some(linker) = linker else {
        println!("cargo:warning=bpf-linker not found: building the agent WITHOUT its eBPF programs; run `cargo xtask setup`");
        fs::write(&object, [])?;
        fs::write(&reuseport_object, [])?;
        // Rebuild once the linker appears.
        println!("cargo:rerun-if-changed=../ebpf-probes/src");
        return Ok(());
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    println!("cargo:rerun-if-changed=../probes-toolchain.toml");
    let pin = ProbesToolchain::read(&root).map_err(anyhow::Error::msg)?;
    // Exactly the pinned rustc, so the object is the one CI tested.
    let toolchain = pin.installed().map_err(anyhow::Error::msg)?;
    if !linker.contains(&pin.bpf_linker) {
        anyhow::bail!(
            "bpf-linker {} is pinned (probes-toolchain.toml), but `bpf-linker --version` says {}; run `cargo xtask setup`",
            pin.bpf_linker,
            linker.trim()
        );
    }
    let probes = aya_build::Package {
        name: "vigil-probes",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf-probes"),
        ..Default::default()
    };
    aya_build::build_ebpf([probes], aya_build::Toolchain::Custom(&toolchain))?;
    println!("cargo:rerun-if-changed=../ebpf-probes/abi/src");
    Ok(())
}
