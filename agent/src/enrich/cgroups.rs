//! cgroup v2 id <-> path. The id the kernel reports (bpf_get_current_cgroup_id)
//! is the inode number of the cgroup's directory in the cgroup2 filesystem,
//! and also its kernfs file handle: `open_by_handle_at` on the cgroup2 mount
//! opens the directory straight from the id (needs CAP_DAC_READ_SEARCH), and
//! /proc/self/fd names it. Without that capability, the hierarchy is walked
//! (at most once per interval) and indexed.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const MAX_WALK_DEPTH: usize = 16;

/// The cgroup2 mount point from a mountinfo text (field 5 is the mount point,
/// the filesystem type follows the " - " separator).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// `FILEID_KERNFS` (include/linux/exportfs.h): a kernfs node id as file handle.
const FILEID_KERNFS: i32 = 0xfe;

/// `struct file_handle` with room for a kernfs id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: [u8; 8],
}

/// The path of cgroup `id` relative to the mount at `root`, from its file handle.
fn path_by_handle(mount: &std::fs::File, root: &Path, id: u64) -> Option<String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id: id.to_ne_bytes(),
    };
    // SAFETY: a correctly sized file_handle; the fd returned is new and ours.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut handle).cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: open_by_handle_at returned a new descriptor nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let target = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).ok()?;
    let rel = target.strip_prefix(root).ok()?;
    Some(format!("/{}", rel.display()))
}

pub struct CgroupResolver {
    root: Option<PathBuf>,
    /// The cgroup2 mount, opened once, for `open_by_handle_at`.
    mount: Option<std::fs::File>,
    cache: HashMap<u64, String>,
    /// The reverse, for paths read from /proc: a stat of a cgroupfs path is
    /// a path walk, and events of a socket attributed from /proc ask again
    /// for the same path at event rate.
    ids: HashMap<String, u64>,
    capacity: usize,
    last_walk: Option<Instant>,
    min_walk_interval: Duration,
}

impl CgroupResolver {
    pub fn new(capacity: usize, min_walk_interval: Duration) -> CgroupResolver {
        let root = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| cgroup2_mount(&m));
        let mount = root.as_ref().and_then(|r| std::fs::File::open(r).ok());
        CgroupResolver {
            root,
            mount,
            cache: HashMap::new(),
            ids: HashMap::new(),
            capacity,
            last_walk: None,
            min_walk_interval,
        }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The id of a cgroup path as /proc/PID/cgroup prints it ("/a/b"), and caches the pair.
    pub fn id_of(&mut self, path: &str) -> Option<u64> {
        if let Some(id) = self.ids.get(path) {
            return Some(*id);
        }
        let root = self.root.as_ref()?;
        let id = std::fs::metadata(root.join(path.trim_start_matches('/')))
            .ok()?
            .ino();
        self.remember(id, path.to_owned());
        self.ids.insert(path.to_owned(), id);
        Some(id)
    }

    /// The path of a cgroup id. On a miss the whole hierarchy is indexed (at
    /// most once per interval), so one walk answers for every cgroup that
    /// existed then, however many different ids miss in the meantime.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(p) = self.cache.get(&id) {
            return Some(p.clone());
        }
        if let (Some(mount), Some(root)) = (&self.mount, &self.root) {
            if let Some(p) = path_by_handle(mount, root, id) {
                self.remember(id, p.clone());
                return Some(p);
            }
        }
        let now = Instant::now();
        if self
            .last_walk
            .is_some_and(|t| now.duration_since(t) < self.min_walk_interval)
        {
            return None;
        }
        self.last_walk = Some(now);
        let root = self.root.clone()?;
        let mut all = Vec::new();
        walk(&root, &root, 0, &mut all);
        let found = all.iter().find(|(i, _)| *i == id).map(|(_, p)| p.clone());
        // The one asked for first, so a hierarchy larger than the cache still answers it.
        if let Some(p) = &found {
            self.remember(id, p.clone());
        }
        for (i, p) in all {
            if self.cache.len() >= self.capacity {
                break;
            }
            self.cache.entry(i).or_insert(p);
        }
        found
    }

    /// A pair learnt elsewhere: by a benchmark or test whose cgroups do not exist.
    pub fn learn(&mut self, id: u64, path: String) {
        self.remember(id, path);
    }

    fn remember(&mut self, id: u64, path: String) {
        if self.cache.len() >= self.capacity && !self.cache.contains_key(&id) {
            // Bounded: forget everything rather than track recency; refills are cheap.
            self.cache.clear();
            self.ids.clear();
        }
        self.cache.insert(id, path);
    }
}

/// Every cgroup under `dir` as (id, path relative to `root`), depth-bounded.
fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<(u64, String)>) {
    let (Ok(meta), Ok(rel)) = (std::fs::metadata(dir), dir.strip_prefix(root)) else {
        return;
    };
    out.push((meta.ino(), format!("/{}", rel.display())));
    if depth >= MAX_WALK_DEPTH {
        return;
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &entry.path(), depth + 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount_in_hybrid_layout() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("garbage\n - \n"), None);
    }

    #[test]
    fn own_cgroup_round_trips() {
        let mut r = CgroupResolver::new(16, Duration::ZERO);
        let Some(_) = r.root() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines have a cgroup2 mount"
            );
            return;
        };
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("v2 entry")
            .to_owned();
        let id = r.id_of(&path).expect("id of own cgroup");
        let mut fresh = CgroupResolver::new(16, Duration::ZERO);
        assert_eq!(fresh.path_of(id).as_deref(), Some(path.as_str()));
    }

    /// A cgroup made after the resolver's last walk resolves at once through
    /// its file handle (as root; CAP_DAC_READ_SEARCH in the chart).
    #[test]
    fn new_cgroup_resolves_by_handle_without_a_walk() {
        let mut r = CgroupResolver::new(16, Duration::from_secs(3600));
        let Some(root) = r.root().map(Path::to_owned) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines have a cgroup2 mount"
            );
            return;
        };
        if !nix_is_root() {
            return;
        }
        // Spend the walk allowance first.
        let _ = r.path_of(u64::MAX);
        let name = format!("vigil-ut-handle-{}", std::process::id());
        let dir = root.join(&name);
        std::fs::create_dir(&dir).expect("create test cgroup");
        let id = std::fs::metadata(&dir).expect("stat").ino();
        let found = r.path_of(id);
        let _ = std::fs::remove_dir(&dir);
        assert_eq!(found, Some(format!("/{name}")));
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// One walk answers for every cgroup: a second id resolves from the cache
    /// even while the walk interval forbids another walk.
    #[test]
    fn one_walk_indexes_the_hierarchy() {
        let mut r = CgroupResolver::new(1 << 16, Duration::from_secs(3600));
        r.mount = None; // the walk, not the file handle
        let Some(root) = r.root().map(Path::to_owned) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines have a cgroup2 mount"
            );
            return;
        };
        let root_id = std::fs::metadata(&root).expect("root").ino();
        assert_eq!(r.path_of(root_id).as_deref(), Some("/"));
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("v2 entry");
        let own_id = std::fs::metadata(root.join(path.trim_start_matches('/')))
            .expect("own cgroup dir")
            .ino();
        assert_eq!(
            r.path_of(own_id).as_deref(),
            Some(path),
            "from the first walk"
        );
        assert_eq!(r.path_of(u64::MAX), None, "unknown ids do not walk again");
    }
}
