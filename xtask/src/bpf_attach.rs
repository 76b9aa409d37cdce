//! Programs that do nothing, attached by the benchmarks to a raw tracepoint
//! where Vigil's programs run, through links they own, with bpf(2)
//! directly: what bpf_stats reports for an empty run on this machine, and
//! the hook's own price. Dropping one closes its fds, which detaches it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Context};

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
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_RAW_TRACEPOINT_OPEN: i64 = 17;
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

/// A program of `prog_type` that only returns `ret` (`r0 = ret; exit`),
/// loaded (not attached) under `name`.
pub fn load_empty(prog_type: u32, ret: u8, name: &str) -> anyhow::Result<OwnedFd> {
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
        ..ProgLoad::default()
    };
    bpf_fd(BPF_PROG_LOAD, &mut load)
}

/// BPF_PROG_TYPE_SK_REUSEPORT.
pub const PROG_TYPE_SK_REUSEPORT: u32 = 21;

impl Attached {
    /// A program that does nothing (`r0 = 0; exit`), loaded and attached to
    /// the raw tracepoint `tracepoint` (e.g. `kfree_skb`).
    pub fn empty(name: &str, tracepoint: &str) -> anyhow::Result<Attached> {
        let prog = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT, 0, name)?;
        let tp = std::ffi::CString::new(tracepoint)?;
        let mut open = RawTpOpen {
            name: tp.as_ptr() as u64,
            prog_fd: prog.as_raw_fd() as u32,
            _pad: 0,
        };
        let link = bpf_fd(BPF_RAW_TRACEPOINT_OPEN, &mut open)?;
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
