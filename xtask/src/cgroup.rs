//! Cgroups of the benchmarks' and the demo's own, below the cgroup v2 root,
//! for the processes Vigil is to act on or capture from.

use std::{path::PathBuf, process::Command, thread, time::Duration};

use anyhow::Context;

/// Mount point of the cgroup v2 hierarchy, as the agent finds it.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next()? == "cgroup2")
                .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup v2 hierarchy is mounted")
}

/// A cgroup directly below the root, removed on drop (once its processes
/// are gone).
pub struct OwnCgroup {
    pub dir: PathBuf,
    /// Its path relative to the root, `/NAME` (what `cgroup:` selects).
    pub rel: String,
}

impl OwnCgroup {
    pub fn create(name: &str) -> anyhow::Result<OwnCgroup> {
        let dir = cgroup2_root()?.join(name);
        match std::fs::create_dir(&dir) {
            // Left by an interrupted run: empty, or its processes would still run.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => r.with_context(|| format!("creating cgroup {}", dir.display()))?,
        }
        Ok(OwnCgroup {
            dir,
            rel: format!("/{name}"),
        })
    }

    /// `cmd`, run in this cgroup.
    pub fn command(&self, cmd: &Command) -> Command {
        vigil_testbed::netns::in_cgroup(&self.dir.join("cgroup.procs"), cmd)
    }

    /// The `--act-on` selector of this cgroup.
    pub fn selector(&self) -> String {
        format!("cgroup:{}", self.rel)
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        // The kernel empties a cgroup a moment after its last process exits.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot remove cgroup {}", self.dir.display());
    }
}
