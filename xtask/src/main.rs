//! `cargo xtask`: the project's tasks. `setup` installs what the build needs
//! (idempotent, seconds when already done); `demo` and `test` run it first.

mod bench;
mod bench_admission;
mod bench_agent;
mod bench_capture;
mod bench_interleaved;
mod bench_paced;
mod bench_pools;
mod bench_reuseport;
mod bpf_attach;
mod cgroup;
mod chart;
mod demo;
mod fault_probes;
mod fuzz;
mod image;
#[path = "../../build-support/probes_toolchain.rs"]
mod probes_toolchain;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Vigil project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and tools (LLVM 22, rust-src, bpf-linker, bpftool, nftables, ...).
    Setup,
    /// Set up, build, and run the agent on this node against the testbed with induced loss.
    Demo(demo::DemoArgs),
    /// Set up, build, and run every test: lints, unit tests, a short run of
    /// every fuzz target, then the real-kernel integration tests.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure the agent against bpftrace on the same traffic; `--write` updates BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Build the agent's OCI image archive (no registry, no container engine):
    /// the stripped release binary and the files it needs, tagged with the chart's appVersion.
    Image(image::ImageArgs),
    /// The Helm chart's checks: helm lint --strict, helm template (default and
    /// every optional feature on), kubernetes-validate, the schema, security and alert tests.
    Chart,
    /// Run the cargo-fuzz targets (fuzz/fuzz_targets), each for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (default: all).
        target: Option<String>,
    },
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command in the workspace root, inheriting stdio; fails on non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    if cmd.get_current_dir().is_none() {
        cmd.current_dir(workspace_root());
    }
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds every host binary (agent and testbed); the kernel programs are built by agent/build.rs.
pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "build",
        "--workspace",
        "--exclude",
        "vigil-probes",
        "--bins",
        "--examples",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// Formatting, clippy (host crates and the kernel programs, warnings as
/// errors), and the dashboards' queries against the metrics the agent defines.
fn lint() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    run(Command::new("python3").arg("dashboards/check_dashboards.py"))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "vigil-probes",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let toolchain = setup::pin()?.installed().map_err(anyhow::Error::msg)?;
    run(Command::new("cargo")
        .arg(format!("+{toolchain}"))
        .args([
            "clippy",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
        ])
        .args(["--", "-D", "warnings"])
        .current_dir(workspace_root().join("ebpf-probes")))
}

fn test(filter: Option<String>) -> anyhow::Result<()> {
    setup::ensure()?;
    lint()?;
    let bin_dir = build(false)?;
    // The chart's checks compare its schema with `vigil default-config`.
    chart::check(&bin_dir.join("vigil"))?;
    // The image's entrypoint is run from the archive by integration-tests/tests/image.rs.
    let image_archive = image::build(&image::ImageArgs {
        out: None,
        rootfs: None,
    })?;
    let filter_args: Vec<String> = filter.into_iter().collect();
    // Unit tests (pure logic; some read the running kernel's BTF and /proc).
    run(Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--exclude",
            "vigil-probes",
            "--exclude",
            "vigil-integration-tests",
        ])
        .arg("--")
        .args(&filter_args))?;
    fuzz::run_targets(CI_FUZZ_SECONDS, None)?;
    bench::run(&bench::BenchArgs::smoke())?;
    // The load test shows it fails on a program no verifier accepts.
    let fault_object = fault_probes::build()?;
    // Real-kernel integration tests: each builds its own namespaces, so two may
    // run at once; more would only fight over the machine's two cores.
    run(Command::new("cargo")
        .args(["test", "-p", "vigil-integration-tests", "--tests"])
        .env("VIGIL_BIN_DIR", &bin_dir)
        .env(fault_probes::ENV, &fault_object)
        .env(image::ARCHIVE_ENV, &image_archive)
        .arg("--")
        .args(["--test-threads", "2"])
        .args(&filter_args))
}

/// Seconds each fuzz target runs inside `cargo xtask test`: enough to catch
/// shallow panics on every commit; `cargo xtask fuzz` runs longer.
const CI_FUZZ_SECONDS: u64 = 15;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::ensure(),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Test { filter } => test(filter),
        Task::Image(args) => image::build(&args).map(|_| ()),
        Task::Chart => setup::ensure().and_then(|()| chart::build_and_check()),
        Task::Fuzz { seconds, target } => {
            setup::ensure().and_then(|()| fuzz::run_targets(seconds, target))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
