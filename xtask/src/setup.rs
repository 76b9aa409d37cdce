//! Installs what building and testing Vigil needs, per shared/TOOLCHAIN.md.
//! Every step checks first, so a machine that is already set up takes seconds.

use std::{path::Path, process::Command};

use anyhow::{bail, Context};

use crate::run;

/// Debian packages: LLVM for bpf-linker, and the real peers the tests use.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "bpftrace",
    "nftables",
    "iproute2",
    "wrk",
    "prometheus",
    "curl",
    // setpriv, for the least-privilege test (present on most systems; listed to be explicit).
    "util-linux",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn ensure_apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn has_nightly() -> bool {
    output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")))
}

/// rust-src for the toolchain that builds the kernel programs (nightly, or
/// stable with RUSTC_BOOTSTRAP=1 where no nightly can be had; agent/build.rs
/// picks the same one).
fn ensure_rust_src() -> anyhow::Result<()> {
    if !has_nightly() {
        eprintln!("setup: no nightly toolchain; trying to install one");
        let installed = Command::new("rustup")
            .args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ])
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            eprintln!("setup: nightly unavailable; the kernel programs will build with stable and RUSTC_BOOTSTRAP=1");
        }
    }
    let toolchain = if has_nightly() { "nightly" } else { "stable" };
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to {toolchain}");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain,
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let current = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if current.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about two minutes)"
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker installed but not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// tracefs is where tracepoints are found; some minimal images do not mount it.
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").is_dir()
        || Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        return Ok(());
    }
    eprintln!("setup: mounting tracefs at /sys/kernel/tracing");
    run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
        .context("tracefs is needed to attach tracepoints")
}

/// The official OpenTelemetry Python SDK from PyPI, the independent OTLP
/// sender of the span-join test, in a venv of its own (pinned versions).
const OTEL_PYTHON_PACKAGES: &[&str] = &[
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-exporter-otlp-proto-grpc==1.45.2",
];

/// The venv the integration tests run the SDK from (`target/otel-python`).
fn otel_python_venv() -> std::path::PathBuf {
    crate::workspace_root().join("target").join("otel-python")
}

fn ensure_otel_python() -> anyhow::Result<()> {
    let venv = otel_python_venv();
    let python = venv.join("bin").join("python");
    // The stamp names the pinned set, so a version bump reinstalls.
    let stamp = venv.join("vigil-packages.txt");
    let wanted = OTEL_PYTHON_PACKAGES.join("\n");
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    eprintln!(
        "setup: installing the OpenTelemetry Python SDK into {}",
        venv.display()
    );
    run(Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg("--clear")
        .arg(&venv))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(OTEL_PYTHON_PACKAGES))?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))
}

pub fn ensure() -> anyhow::Result<()> {
    ensure_apt()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_tracefs()?;
    ensure_otel_python()?;
    eprintln!("setup: toolchain and tools ready");
    Ok(())
}
