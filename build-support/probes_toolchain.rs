// The pinned toolchain of the kernel programs (`probes-toolchain.toml` at
// the workspace root), read by agent/build.rs and xtask alike: one file,
// `include!`d / `#[path]`-included by both, std only.

/// What `probes-toolchain.toml` pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbesToolchain {
    pub rust_channel: String,
    pub rustc_version: String,
    pub bpf_linker: String,
    pub llvm: String,
}

impl ProbesToolchain {
    /// Parses the pin file: `key = "value"` lines, `#` comments.
    pub fn parse(text: &str) -> Result<ProbesToolchain, String> {
        let value = |key: &str| -> Result<String, String> {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once('=')?;
                    (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
                })
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("probes-toolchain.toml has no `{key} = \"...\"`"))
        };
        Ok(ProbesToolchain {
            rust_channel: value("rust_channel")?,
            rustc_version: value("rustc_version")?,
            bpf_linker: value("bpf_linker")?,
            llvm: value("llvm")?,
        })
    }

    pub fn read(workspace_root: &std::path::Path) -> Result<ProbesToolchain, String> {
        let path = workspace_root.join("probes-toolchain.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        ProbesToolchain::parse(&text)
    }

    /// The installed rustup toolchain that is the pinned rustc: the pinned
    /// channel, or `nightly` when it prints the pinned version.
    pub fn installed(&self) -> Result<String, String> {
        let version = |toolchain: &str| {
            std::process::Command::new("rustup")
                .args(["run", toolchain, "rustc", "--version"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let mut found = Vec::new();
        for toolchain in [self.rust_channel.as_str(), "nightly"] {
            match version(toolchain) {
                Some(v) if v == self.rustc_version => return Ok(toolchain.to_owned()),
                Some(v) => found.push(format!("{toolchain}: {v}")),
                None => {}
            }
        }
        Err(format!(
            "the kernel programs are pinned to `{}` (probes-toolchain.toml), which is not installed{}; run `cargo xtask setup` (it installs {}), or move the pin (docs/toolchain.md)",
            self.rustc_version,
            if found.is_empty() {
                String::new()
            } else {
                format!(" (found {})", found.join(", "))
            },
            self.rust_channel
        ))
    }
}
