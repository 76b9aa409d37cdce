//! The image `cargo xtask image` builds runs: its archive (VIGIL_IMAGE_ARCHIVE,
//! set by `cargo xtask test`) is unpacked by umoci, an OCI implementation
//! independent of the writer (it checks every blob's digest and size on the
//! way), into a runtime bundle; the bundle's entrypoint then runs in a chroot of
//! its root filesystem with the image's environment and nothing of the host:
//! `vigil --version` (by name, through the image's PATH, as the chart's
//! `command: ["vigil"]` runs it) and `vigil hooks`. The root filesystem holds
//! the stripped binary, exactly the shared objects it loads, and the CA bundle.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use vigil_integration_tests::vigil_cli;

const CHART_YAML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/vigil/Chart.yaml");
const VALUES_YAML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/vigil/values.yaml");
const ARCHIVE_ENV: &str = "VIGIL_IMAGE_ARCHIVE";
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

/// The archive to test, or None (a skip) outside CI; in CI its absence fails.
fn archive() -> Option<PathBuf> {
    let root = nix::unistd::Uid::effective().is_root();
    let archive = std::env::var_os(ARCHIVE_ENV).map(PathBuf::from);
    let why = match (&archive, root) {
        (Some(_), true) => return archive,
        (None, _) => {
            format!("{ARCHIVE_ENV} is not set (`cargo xtask test` builds the image and sets it)")
        }
        (Some(_), false) => "chroot needs root".to_owned(),
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {why}"
    );
    eprintln!("SKIPPED (not in CI): {why}");
    None
}

/// `key: "value"` at column 0 of a YAML file.
fn yaml_scalar(path: &str, key: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .with_context(|| format!("{path} has no {key}"))
}

/// `image.repository` of values.yaml (the first `repository:` under `image:`).
fn chart_repository() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(VALUES_YAML)?;
    text.lines()
        .skip_while(|l| l.trim_end() != "image:")
        .find_map(|l| l.trim_start().strip_prefix("repository:"))
        .map(|v| v.trim().to_owned())
        .context("values.yaml has no image.repository")
}

fn command_output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A program on this process's PATH (the child's environment is the image's).
fn host_program(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found"))
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every regular file under `root`, as paths relative to it.
fn regular_files(root: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else {
                ensure!(
                    kind.is_file(),
                    "{} is neither a file nor a directory",
                    path.display()
                );
                out.insert(path.strip_prefix(root)?.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

/// What `ldd` says `binary` loads: the absolute paths, vDSO excluded.
fn loaded_objects(binary: &Path) -> anyhow::Result<BTreeSet<String>> {
    let text = command_output(Command::new("ldd").arg(binary))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let path = l.split_once("=>").map_or(l, |(_, p)| p).trim();
            let path = path.split(" (").next()?.trim();
            path.strip_prefix('/').map(str::to_owned)
        })
        .collect())
}

#[test]
fn image_entrypoint_runs_from_the_archive() -> anyhow::Result<()> {
    let Some(archive) = archive() else {
        return Ok(());
    };
    let tag = yaml_scalar(CHART_YAML, "appVersion")?;
    let work = TempDir(std::env::temp_dir().join(format!("vigil-image-{}", std::process::id())));
    let layout = work.0.join("layout");
    let bundle = work.0.join("bundle");
    std::fs::create_dir_all(&layout)?;
    command_output(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
    )?;

    // The index names the image the chart deploys by default.
    let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(
        annotations["org.opencontainers.image.ref.name"],
        tag.as_str()
    );
    assert_eq!(
        annotations["io.containerd.image.name"],
        format!("{}:{tag}", chart_repository()?).as_str()
    );

    command_output(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle),
    )?;
    let runtime: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    let args: Vec<&str> = runtime["process"]["args"]
        .as_array()
        .context("no process.args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        ["/usr/local/bin/vigil", "agent"],
        "entrypoint and command"
    );
    let env: Vec<&str> = runtime["process"]["env"]
        .as_array()
        .context("no process.env")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let rootfs = bundle.join("rootfs");
    let entrypoint = args[0].trim_start_matches('/');

    // Only what the binary needs: itself, what it loads, the CA bundle.
    let binary = rootfs.join(entrypoint);
    let mut expected = loaded_objects(&binary)?;
    ensure!(
        expected.iter().any(|p| p.contains("ld-linux")),
        "ldd names no dynamic loader: {expected:?}"
    );
    expected.insert(entrypoint.to_owned());
    expected.insert(CA_BUNDLE.to_owned());
    assert_eq!(regular_files(&rootfs)?, expected, "files in the image");
    let sections = command_output(Command::new("readelf").args(["-S", "-W"]).arg(&binary))?;
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "the binary is not stripped:\n{sections}"
    );

    // Run it with the image's environment only: nothing from the host leaks in.
    let chroot = host_program("chroot")?;
    let in_image = |cmd: &[&str]| -> anyhow::Result<String> {
        let mut c = Command::new(&chroot);
        c.env_clear().arg(&rootfs).args(cmd);
        for kv in &env {
            if let Some((k, v)) = kv.split_once('=') {
                c.env(k, v);
            }
        }
        command_output(&mut c)
    };
    assert_eq!(
        in_image(&["vigil", "--version"])?.trim(),
        format!("vigil {tag}")
    );
    assert_eq!(
        in_image(&[args[0], "--version"])?.trim(),
        format!("vigil {tag}")
    );
    let hooks = in_image(&["vigil", "hooks"])?;
    assert!(
        hooks
            .lines()
            .any(|l| l.trim() == "tp_btf/tcp_retransmit_skb"),
        "{hooks}"
    );
    assert_eq!(
        hooks,
        String::from_utf8(vigil_cli(&["hooks"])?)?,
        "the image's `vigil hooks` and the workspace's"
    );
    Ok(())
}
