//! `cargo xtask image`: the agent's container image as an OCI image archive,
//! built without a registry or a container engine. One layer, from scratch:
//! the stripped release `vigil`, the shared libraries `ldd` says it loads
//! (glibc's libc, libm, libgcc_s and the dynamic loader, copied from this
//! machine) and the CA bundle for OTLP over TLS. Tagged with the chart's
//! appVersion and named by the chart's `image.repository`, so the chart's
//! default image is this one. Deterministic: entries sorted, owners 0, mtime 0
//! (the same binary gives the same digests). docs/image.md says how to load
//! it into a node's runtime or push it.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context};
use sha2::{Digest, Sha256};

use crate::{run, workspace_root};

/// The variable that tells integration-tests/tests/image.rs which archive to run.
pub const ARCHIVE_ENV: &str = "VIGIL_IMAGE_ARCHIVE";
/// Where the agent binary sits in the image; the image's PATH holds its directory.
pub const BINARY_IN_IMAGE: &str = "usr/local/bin/vigil";
/// The root CA bundle (Debian's ca-certificates), where rustls' native-roots
/// lookup finds it.
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
const IMAGE_PATH_ENV: &str = "PATH=/usr/local/bin:/usr/bin:/bin";

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The archive to write (default: target/image/vigil-TAG.oci.tar).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the image's files as a directory tree here (the Dockerfile
    /// copies it into a scratch image, so both images hold the same files).
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
}

/// The image's name and tag, read from the chart so the two cannot disagree.
pub struct ImageRef {
    pub repository: String,
    pub tag: String,
}

impl ImageRef {
    pub fn from_chart() -> anyhow::Result<ImageRef> {
        let chart_dir = workspace_root().join("helm").join("vigil");
        let chart = fs::read_to_string(chart_dir.join("Chart.yaml"))?;
        let values = fs::read_to_string(chart_dir.join("values.yaml"))?;
        let tag = top_level_scalar(&chart, "appVersion")
            .context("helm/vigil/Chart.yaml has no appVersion")?;
        let repository = nested_scalar(&values, "image", "repository")
            .context("helm/vigil/values.yaml has no image.repository")?;
        Ok(ImageRef { repository, tag })
    }

    pub fn name(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

fn unquote(v: &str) -> String {
    let v = v.split(" #").next().unwrap_or(v).trim();
    v.trim_matches(|c| c == '"' || c == '\'').to_owned()
}

/// `key: value` at column 0 of a YAML file.
fn top_level_scalar(yaml: &str, key: &str) -> Option<String> {
    yaml.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(unquote))
        .filter(|v| !v.is_empty())
}

/// `child: value` in the block of the column-0 `parent:` mapping.
fn nested_scalar(yaml: &str, parent: &str, child: &str) -> Option<String> {
    let header = format!("{parent}:");
    yaml.lines()
        .skip_while(|l| l.trim_end() != header)
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' ') || l.starts_with('#'))
        .find_map(|l| {
            l.trim_start()
                .strip_prefix(child)?
                .strip_prefix(':')
                .map(unquote)
        })
        .filter(|v| !v.is_empty())
}

/// The default archive path for `tag`.
pub fn default_archive(tag: &str) -> PathBuf {
    workspace_root()
        .join("target")
        .join("image")
        .join(format!("vigil-{tag}.oci.tar"))
}

/// Builds the release binary (reusing target/release) and writes the archive.
pub fn build(args: &ImageArgs) -> anyhow::Result<PathBuf> {
    let image = ImageRef::from_chart()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_archive(&image.tag));
    run(Command::new("cargo").args(["build", "--release", "-p", "vigil", "--bin", "vigil"]))?;
    let release = workspace_root()
        .join("target")
        .join("release")
        .join("vigil");
    let work = out.with_extension("rootfs");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let stripped = work.join("vigil");
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&stripped)
        .arg(&release))?;
    let version = String::from_utf8(
        Command::new(&stripped)
            .arg("--version")
            .output()
            .context("running vigil --version")?
            .stdout,
    )?;
    ensure!(
        version.trim() == format!("vigil {}", image.tag),
        "the binary says {:?}, the chart's appVersion is {}: bump Chart.yaml's appVersion with the workspace version",
        version.trim(),
        image.tag
    );
    let mut files: BTreeMap<String, (PathBuf, u32)> = BTreeMap::new();
    files.insert(BINARY_IN_IMAGE.to_owned(), (stripped.clone(), 0o755));
    for lib in shared_libraries(&stripped)? {
        let in_image = lib
            .to_str()
            .context("library path is not UTF-8")?
            .trim_start_matches('/')
            .to_owned();
        files.insert(in_image, (lib, 0o755));
    }
    let ca = Path::new("/").join(CA_BUNDLE);
    ensure!(
        ca.is_file(),
        "{} is missing (Debian package ca-certificates; `cargo xtask setup` installs it)",
        ca.display()
    );
    files.insert(CA_BUNDLE.to_owned(), (ca, 0o644));

    if let Some(dir) = &args.rootfs {
        write_tree(dir, &files)?;
    }
    let layer_tar = layer(&files)?;
    let written = write_archive(&out, &image, &layer_tar)?;
    fs::remove_dir_all(&work)?;
    eprintln!(
        "image: {} ({} files, manifest {}) in {}",
        image.name(),
        files.len(),
        written.manifest_digest,
        out.display()
    );
    Ok(out)
}

/// The absolute paths of every shared object `binary` loads, the dynamic
/// loader included, as `ldd` resolves them on this machine.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("statically linked") || text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    ensure!(out.status.success(), "ldd {} failed", binary.display());
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        // `name => /path (0x..)`, `/lib64/ld-linux-x86-64.so.2 (0x..)`, or the vDSO (no file).
        let path = line.split_once("=>").map_or(line, |(_, p)| p.trim());
        let path = path.split(" (").next().unwrap_or(path).trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    ensure!(
        !libs.is_empty(),
        "ldd printed no libraries for a dynamic executable:\n{text}"
    );
    Ok(libs)
}

/// The image's files as a directory tree under `dir`.
fn write_tree(dir: &Path, files: &BTreeMap<String, (PathBuf, u32)>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (path, (source, mode)) in files {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(source, &target)
            .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

/// The layer as an uncompressed tar: every parent directory, then the files
/// (contents read through symlinks), sorted, owned by root, mtime 0.
fn layer(files: &BTreeMap<String, (PathBuf, u32)>) -> anyhow::Result<Vec<u8>> {
    let mut dirs = std::collections::BTreeSet::new();
    for path in files.keys() {
        let parts: Vec<&str> = path.split('/').collect();
        for depth in 1..parts.len() {
            dirs.insert(format!("{}/", parts[..depth].join("/")));
        }
    }
    let mut tar = tar::Builder::new(Vec::new());
    for dir in &dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, dir, std::io::empty())?;
    }
    for (path, (source, mode)) in files {
        let data = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(*mode);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, path, data.as_slice())?;
    }
    Ok(tar.into_inner()?)
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

struct Written {
    manifest_digest: String,
}

/// The OCI image layout (oci-layout, index.json, blobs/sha256/*) as one tar:
/// the `oci-archive` format of podman, skopeo and buildah; containerd's
/// `ctr images import` reads the name from `io.containerd.image.name`.
fn write_archive(out: &Path, image: &ImageRef, layer_tar: &[u8]) -> anyhow::Result<Written> {
    let diff_id = sha256(layer_tar);
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(layer_tar)?;
    let layer_gz = gz.finish()?;
    let layer_digest = sha256(&layer_gz);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let labels = serde_json::json!({
        "org.opencontainers.image.title": "vigil",
        "org.opencontainers.image.version": image.tag,
        "org.opencontainers.image.description": "Vigil eBPF node agent",
    });
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{BINARY_IN_IMAGE}")],
            "Cmd": ["agent"],
            "Env": [IMAGE_PATH_ENV],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "cargo xtask image", "comment": "vigil, its shared libraries, CA bundle" }],
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_gz.len() }],
        "annotations": labels,
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
            "annotations": {
                "org.opencontainers.image.ref.name": image.tag,
                "io.containerd.image.name": image.name(),
            },
        }],
    }))?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;

    let mut entries: Vec<(String, &[u8])> = vec![
        ("oci-layout".to_owned(), layout),
        ("index.json".to_owned(), &index),
    ];
    for (digest, data) in [
        (&config_digest, config.as_slice()),
        (&layer_digest, layer_gz.as_slice()),
        (&manifest_digest, manifest.as_slice()),
    ] {
        let hex = digest.trim_start_matches("sha256:");
        entries.push((format!("blobs/sha256/{hex}"), data));
    }
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        tar.append_data(&mut header, dir, std::io::empty())?;
    }
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        tar.append_data(&mut header, path, data)?;
    }
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(out, tar.into_inner()?).with_context(|| format!("writing {}", out.display()))?;
    Ok(Written { manifest_digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_chart_scalars() {
        let values = "# c\nimage:\n  # the name\n  repository: ghcr.io/x/vigil # where\n  tag: \"\"\nother:\n  repository: no\n";
        assert_eq!(
            nested_scalar(values, "image", "repository").as_deref(),
            Some("ghcr.io/x/vigil")
        );
        assert_eq!(nested_scalar(values, "image", "tag"), None);
        assert_eq!(
            top_level_scalar("name: v\nappVersion: \"0.3.1\"\n", "appVersion").as_deref(),
            Some("0.3.1")
        );
    }

    /// The Dockerfile's build arguments default to the kernel programs' pin.
    #[test]
    fn dockerfile_follows_the_probes_pin() {
        let pin = crate::setup::pin().expect("probes-toolchain.toml");
        let dockerfile =
            fs::read_to_string(workspace_root().join("Dockerfile")).expect("Dockerfile");
        let arg = |name: &str| {
            dockerfile
                .lines()
                .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
                .map(str::to_owned)
        };
        assert_eq!(arg("LLVM"), Some(pin.llvm.clone()));
        assert_eq!(arg("PROBES_CHANNEL"), Some(pin.rust_channel.clone()));
        assert_eq!(arg("BPF_LINKER"), Some(pin.bpf_linker.clone()));
        assert!(dockerfile.contains("cargo xtask image --rootfs /rootfs"));
        assert!(dockerfile.contains(&format!("ENTRYPOINT [\"/{BINARY_IN_IMAGE}\"]")));
    }

    #[test]
    fn the_chart_names_an_image() {
        let image = ImageRef::from_chart().expect("chart readable");
        assert!(!image.repository.is_empty() && !image.tag.is_empty());
        assert_eq!(image.tag, env!("CARGO_PKG_VERSION"));
    }
}
