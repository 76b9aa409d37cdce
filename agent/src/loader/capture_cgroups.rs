//! Where the HTTP trace-context capture attaches: `correlate.capture_cgroups`
//! resolved against the cgroup v2 hierarchy. A cgroup's programs also run for
//! every cgroup below it, so an entry inside another one (or listed twice)
//! would capture the same packets twice: rejected, as is anything that is not
//! a cgroup v2 directory under the hierarchy's root.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h): statfs type of cgroup2.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// One cgroup the capture programs attach to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureCgroup {
    /// As configured: absolute, or relative to the hierarchy's root.
    pub entry: String,
    /// The directory it names, canonical (no symlinks, `..` or `.`).
    pub dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureCgroupError {
    #[error("no cgroup v2 hierarchy is mounted (probes.cgroup_root is unset)")]
    NoHierarchy,
    #[error("cannot open the cgroup v2 root {}", root.display())]
    Root {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{entry}`: cannot open {}", path.display())]
    Missing {
        entry: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{entry}`: {} is outside the cgroup v2 hierarchy at {}", dir.display(), root.display())]
    Outside {
        entry: String,
        dir: PathBuf,
        root: PathBuf,
    },
    #[error("`{entry}`: {} is not a directory", dir.display())]
    NotADirectory { entry: String, dir: PathBuf },
    #[error("`{entry}`: {} is not a cgroup v2 directory", dir.display())]
    NotCgroup2 { entry: String, dir: PathBuf },
    #[error("`{entry}`: cannot inspect {}", dir.display())]
    Inspect {
        entry: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{again}` is `{first}` again ({}): its packets would be captured twice; list it once", dir.display())]
    Duplicate {
        first: String,
        again: String,
        dir: PathBuf,
    },
    #[error("`{inner}` is below `{outer}`, whose capture already sees its sockets: their packets would be captured twice; list only `{outer}`")]
    Nested { outer: String, inner: String },
}

/// The cgroup v2 hierarchy's root: `configured` (probes.cgroup_root), else
/// this process's cgroup2 mount.
pub fn hierarchy_root(configured: Option<&Path>) -> Result<PathBuf, CaptureCgroupError> {
    match configured {
        Some(root) => Ok(root.to_owned()),
        None => std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| crate::enrich::cgroups::cgroup2_mount(&m))
            .ok_or(CaptureCgroupError::NoHierarchy),
    }
}

/// Resolves every entry against `root` and checks that no two overlap.
pub fn resolve(root: &Path, entries: &[String]) -> Result<Vec<CaptureCgroup>, CaptureCgroupError> {
    let root = root
        .canonicalize()
        .map_err(|source| CaptureCgroupError::Root {
            root: root.to_owned(),
            source,
        })?;
    let mut cgroups = Vec::with_capacity(entries.len());
    for entry in entries {
        // An absolute entry replaces the root.
        let path = root.join(entry);
        let dir = path
            .canonicalize()
            .map_err(|source| CaptureCgroupError::Missing {
                entry: entry.clone(),
                path,
                source,
            })?;
        let named = |dir: &Path| (entry.clone(), dir.to_owned());
        if !dir.starts_with(&root) {
            let (entry, dir) = named(&dir);
            return Err(CaptureCgroupError::Outside {
                entry,
                dir,
                root: root.clone(),
            });
        }
        let inspect = |source| {
            let (entry, dir) = named(&dir);
            CaptureCgroupError::Inspect { entry, dir, source }
        };
        if !std::fs::metadata(&dir).map_err(inspect)?.is_dir() {
            let (entry, dir) = named(&dir);
            return Err(CaptureCgroupError::NotADirectory { entry, dir });
        }
        if filesystem_magic(&dir).map_err(inspect)? != CGROUP2_SUPER_MAGIC {
            let (entry, dir) = named(&dir);
            return Err(CaptureCgroupError::NotCgroup2 { entry, dir });
        }
        cgroups.push(CaptureCgroup {
            entry: entry.clone(),
            dir,
        });
    }
    check_overlap(&cgroups)?;
    Ok(cgroups)
}

/// No cgroup twice, none below another (whose programs already run for it).
fn check_overlap(cgroups: &[CaptureCgroup]) -> Result<(), CaptureCgroupError> {
    for (i, a) in cgroups.iter().enumerate() {
        for b in &cgroups[i + 1..] {
            let nested = |outer: &CaptureCgroup, inner: &CaptureCgroup| {
                Err(CaptureCgroupError::Nested {
                    outer: outer.entry.clone(),
                    inner: inner.entry.clone(),
                })
            };
            if a.dir == b.dir {
                return Err(CaptureCgroupError::Duplicate {
                    first: a.entry.clone(),
                    again: b.entry.clone(),
                    dir: a.dir.clone(),
                });
            } else if b.dir.starts_with(&a.dir) {
                return nested(a, b);
            } else if a.dir.starts_with(&b.dir) {
                return nested(b, a);
            }
        }
    }
    Ok(())
}

/// The statfs filesystem type of `dir`.
fn filesystem_magic(dir: &Path) -> io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a NUL-terminated path and a writable struct statfs.
    if unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    // f_type's integer type differs between architectures; no magic is negative.
    Ok(u64::try_from(stat.f_type).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cg(entry: &str, dir: &str) -> CaptureCgroup {
        CaptureCgroup {
            entry: entry.into(),
            dir: dir.into(),
        }
    }

    #[test]
    fn overlap_is_a_duplicate_or_a_nesting_in_either_order() {
        let a = cg("kubepods.slice", "/cg/kubepods.slice");
        let a_abs = cg("/cg/kubepods.slice", "/cg/kubepods.slice");
        let below = cg("kubepods.slice/burstable", "/cg/kubepods.slice/burstable");
        let sibling = cg("kubepods.slice-other", "/cg/kubepods.slice-other");
        assert!(check_overlap(&[a.clone(), sibling.clone()]).is_ok());
        let err = check_overlap(&[a.clone(), sibling.clone(), a_abs])
            .expect_err("the same directory twice")
            .to_string();
        assert!(
            err.contains("`/cg/kubepods.slice` is `kubepods.slice` again"),
            "{err}"
        );
        for list in [[a.clone(), below.clone()], [below, a]] {
            let err = check_overlap(&list).expect_err("nested").to_string();
            assert!(
                err.contains("`kubepods.slice/burstable` is below `kubepods.slice`"),
                "{err}"
            );
        }
    }

    /// A scratch directory (not a cgroup2 filesystem) removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "vigil-capture-cgroups-{}-{name}",
                std::process::id()
            ));
            std::fs::create_dir_all(dir.join("plain")).expect("scratch dir");
            std::fs::write(dir.join("file"), b"").expect("scratch file");
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn entries_must_exist_inside_the_root_and_be_cgroup2_directories() {
        let scratch = Scratch::new("resolve");
        let root = &scratch.0;
        let err = |entry: &str| {
            resolve(root, &[entry.to_owned()])
                .expect_err(entry)
                .to_string()
        };
        let e = err("nope/deeper");
        assert!(e.contains("`nope/deeper`: cannot open"), "{e}");
        let e = err("/");
        assert!(e.contains("`/`: / is outside"), "{e}");
        let e = err("plain/../..");
        assert!(e.contains("is outside the cgroup v2 hierarchy"), "{e}");
        let e = err("file");
        assert!(
            e.contains("`file`:") && e.contains("is not a directory"),
            "{e}"
        );
        let e = err("plain");
        assert!(e.contains("is not a cgroup v2 directory"), "{e}");
        let absolute = root.join("plain").display().to_string();
        let e = err(&absolute);
        assert!(e.contains("is not a cgroup v2 directory"), "{e}");
        let e = resolve(&root.join("absent"), &["x".to_owned()])
            .expect_err("missing root")
            .to_string();
        assert!(e.contains("cgroup v2 root"), "{e}");
    }

    #[test]
    fn the_hierarchy_root_resolves_in_either_form() {
        let Ok(root) = hierarchy_root(None) else {
            eprintln!("no cgroup v2 hierarchy mounted here; skipped");
            return;
        };
        let got = resolve(&root, &[".".to_owned()]).expect("the root is a cgroup");
        assert_eq!(got[0].dir, root.canonicalize().expect("root"));
        let absolute = root.display().to_string();
        let e = resolve(&root, &[".".to_owned(), absolute])
            .expect_err("the root twice")
            .to_string();
        assert!(e.contains("again"), "{e}");
    }
}
