//! A fault build of the kernel programs: the sampler made unverifiable on
//! purpose (feature `fault-unverifiable-sampler`), for the load test to show
//! it fails, naming the hook and the verifier's words. Built with the pinned
//! toolchain and aya-build's flags, into a target directory of its own, so
//! the agent's embedded object is never this one.

use std::{path::PathBuf, process::Command};

use crate::{run, setup, workspace_root};

/// Where the integration tests find the fault object.
pub const ENV: &str = "VIGIL_FAULT_PROBES_OBJECT";

pub fn build() -> anyhow::Result<PathBuf> {
    let toolchain = setup::pin()?.installed().map_err(anyhow::Error::msg)?;
    let target_dir = workspace_root().join("target").join("fault-probes");
    // As aya-build passes them (BTF for the loader, the arch cfg aya-ebpf reads).
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ];
    run(Command::new("rustup")
        .args([
            "run",
            &toolchain,
            "cargo",
            "build",
            "--package",
            "vigil-probes",
            "--bins",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--features", "fault-unverifiable-sampler", "--target-dir"])
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .current_dir(workspace_root().join("ebpf-probes")))?;
    Ok(target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join("vigil-probes"))
}
