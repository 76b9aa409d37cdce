//! Programs attached by the benchmarks through links they own, with bpf(2)
//! directly: programs that do nothing, where Vigil's programs run (what
//! bpf_stats reports for an empty run on this machine, and the hook's own
//! price), and the agent's own programs once more (to switch capture on and
//! off without the agent). Dropping one closes its fds, which detaches it.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context};

/// Where a program goes.
#[derive(Clone, Copy)]
pub enum Hook<'a> {
    /// A BTF-less raw tracepoint, e.g. `kfree_skb` (`r0 = 0; exit`).
    RawTracepoint(&'a str),
    /// A cgroup_skb hook on a cgroup (`r0 = 1; exit`: pass the packet).
    CgroupSkb { cgroup: &'a Path, egress: bool },
}

pub struct Attached {
    _prog: OwnedFd,
    _link: OwnedFd,
    pub id: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct RawTpOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
struct GetFdById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
struct LinkDetach {
    link_fd: u32,
}

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_LINK_GET_FD_BY_ID: i64 = 30;
const BPF_LINK_DETACH: i64 = 34;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;

/// bpf(2) with `attr`, a bpf_attr prefix laid out for `cmd`.
fn bpf<T>(cmd: i64, attr: &mut T) -> anyhow::Result<i64> {
    // SAFETY: attr is a live, correctly laid out bpf_attr prefix for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// bpf(2) for a command that returns a new fd.
fn bpf_fd<T>(cmd: i64, attr: &mut T) -> anyhow::Result<OwnedFd> {
    let fd = i32::try_from(bpf(cmd, attr)?).context("bpf(2) returned an out-of-range fd")?;
    // SAFETY: the kernel just returned this new fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Attached {
    /// A program that does nothing (`r0 = 0` on tracepoints, `r0 = 1`,
    /// pass, on cgroup_skb), loaded and attached at `hook`.
    pub fn empty(name: &str, hook: Hook<'_>) -> anyhow::Result<Attached> {
        let (prog_type, ret, attach_type) = match hook {
            Hook::RawTracepoint(_) => (BPF_PROG_TYPE_RAW_TRACEPOINT, 0, 0),
            Hook::CgroupSkb { .. } => (BPF_PROG_TYPE_CGROUP_SKB, 1, attach_type(&hook)),
        };
        // BPF_MOV64_IMM(R0, ret); BPF_EXIT_INSN()
        let insns: [u8; 16] = [0xb7, 0, 0, 0, ret, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        let n = name.len().min(15);
        prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut load = ProgLoad {
            prog_type,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: attach_type,
            ..ProgLoad::default()
        };
        let prog = bpf_fd(BPF_PROG_LOAD, &mut load)?;
        Attached::link(prog, hook)
    }

    /// The loaded program `prog_id` (another process's, e.g. the agent's)
    /// attached once more at `hook`, through a link this process owns.
    pub fn existing(prog_id: u64, hook: Hook<'_>) -> anyhow::Result<Attached> {
        let prog = fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id)
            .with_context(|| format!("no program with id {prog_id}"))?;
        Attached::link(prog, hook)
    }

    fn link(prog: OwnedFd, hook: Hook<'_>) -> anyhow::Result<Attached> {
        let link = match hook {
            Hook::RawTracepoint(tracepoint) => {
                let tp = std::ffi::CString::new(tracepoint)?;
                let mut open = RawTpOpen {
                    name: tp.as_ptr() as u64,
                    prog_fd: prog.as_raw_fd() as u32,
                    _pad: 0,
                };
                bpf_fd(BPF_RAW_TRACEPOINT_OPEN, &mut open)?
            }
            Hook::CgroupSkb { cgroup, .. } => {
                let dir = std::fs::File::open(cgroup)
                    .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
                let mut create = LinkCreate {
                    prog_fd: prog.as_raw_fd() as u32,
                    target_fd: dir.as_raw_fd() as u32,
                    attach_type: attach_type(&hook),
                    flags: 0,
                };
                bpf_fd(BPF_LINK_CREATE, &mut create)?
            }
        };
        let mut info = [0u32; 2]; // bpf_prog_info starts with type, id
        let mut get = InfoByFd {
            bpf_fd: prog.as_raw_fd() as u32,
            info_len: 8,
            info: info.as_mut_ptr() as u64,
        };
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get)?;
        Ok(Attached {
            _prog: prog,
            _link: link,
            id: u64::from(info[1]),
        })
    }
}

/// A new fd for the object `id` (a `*_GET_FD_BY_ID` command).
fn fd_by_id(cmd: i64, id: u64) -> anyhow::Result<OwnedFd> {
    let mut get = GetFdById {
        id: u32::try_from(id).context("id out of range")?,
        next_id: 0,
        open_flags: 0,
    };
    bpf_fd(cmd, &mut get)
}

/// BPF_CGROUP_INET_INGRESS = 0, BPF_CGROUP_INET_EGRESS = 1 (0 for tracepoints).
fn attach_type(hook: &Hook<'_>) -> u32 {
    match hook {
        Hook::RawTracepoint(_) => 0,
        Hook::CgroupSkb { egress, .. } => u32::from(*egress),
    }
}

/// Detaches link `link_id` (another process's, e.g. the agent's) for good:
/// its owner keeps a defunct link, released when it closes it.
pub fn detach_link(link_id: u64) -> anyhow::Result<()> {
    let link = fd_by_id(BPF_LINK_GET_FD_BY_ID, link_id)
        .with_context(|| format!("no link with id {link_id}"))?;
    let mut detach = LinkDetach {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut detach).with_context(|| format!("detaching link {link_id}"))?;
    Ok(())
}
