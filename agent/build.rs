//! Builds the kernel programs (ebpf-probes) for bpfel-unknown-none and leaves
//! the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! Without bpf-linker (a machine where `cargo xtask setup` has not run) the
//! build still succeeds with an empty object, so `cargo check` and unit tests
//! work everywhere; the agent then refuses to start with a message saying how
//! to fix it.

use std::{env, fs, path::PathBuf, process::Command};

fn main() -> anyhow::Result<()> {
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("vigil-probes");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=VIGIL_SKIP_EBPF");
    // Builds that never load the probes (fuzzing, docs) can skip the kernel object.
    if env::var_os("VIGIL_SKIP_EBPF").is_some_and(|v| v == "1") {
        fs::write(&object, [])?;
        return Ok(());
    }
    let have_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_linker {
        println!("cargo:warning=bpf-linker not found: building the agent WITHOUT its eBPF programs; run `cargo xtask setup`");
        fs::write(&object, [])?;
        // Rebuild once the linker appears.
        println!("cargo:rerun-if-changed=../ebpf-probes/src");
        return Ok(());
    }
    let probes = aya_build::Package {
        name: "vigil-probes",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf-probes"),
        ..Default::default()
    };
    // Nightly when installed; otherwise stable with unstable features unlocked
    // (verified on these machines, see shared/TOOLCHAIN.md).
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let toolchain = if has_nightly {
        aya_build::Toolchain::Nightly
    } else {
        // Read by the child cargo that aya-build spawns.
        env::set_var("RUSTC_BOOTSTRAP", "1");
        aya_build::Toolchain::Custom("stable")
    };
    aya_build::build_ebpf([probes], toolchain)?;
    println!("cargo:rerun-if-changed=../ebpf-probes/abi/src");
    Ok(())
}
