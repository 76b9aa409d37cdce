//! `cargo xtask fuzz`: every parser of untrusted input under libFuzzer.

use std::process::Command;

use anyhow::{bail, Context};

use crate::{run, setup, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets in fuzz/Cargo.toml, one per parser family.
const TARGETS: &[&str] = &[
    "ring_record",
    "kernel_btf",
    "text_formats",
    "origin_request",
    "traceparent",
    "control_messages",
];

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}

pub fn run_targets(seconds: u64, only: Option<String>) -> anyhow::Result<()> {
    if !setup::has_nightly() {
        bail!("fuzzing needs a nightly toolchain (sanitizer flags); run `cargo xtask setup`");
    }
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = match &only {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("unknown fuzz target `{t}`; targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let dir = workspace_root().join("fuzz");
    for target in targets {
        eprintln!("fuzz: {target} for {seconds} s");
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            // One input may not take longer than this: a hang is a finding too.
            .arg("-timeout=10")
            // Fuzzing never loads the kernel programs.
            .env("VIGIL_SKIP_EBPF", "1")
            .current_dir(&dir))
        .with_context(|| {
            format!(
                "fuzz target {target} failed; the crashing input is under fuzz/artifacts/{target}/"
            )
        })?;
    }
    eprintln!("fuzz: all targets ran without a crash");
    Ok(())
}
