//! The few bpf(2) commands aya 0.14 does not expose in the form Vigil needs.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_link_info};

/// Issues bpf(2) with `attr` as the (prefix of the) `union bpf_attr` for `cmd`.
pub fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a live, correctly laid-out bpf_attr prefix for `cmd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Wraps a file descriptor the kernel just returned.
fn owned(fd: i64) -> OwnedFd {
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// The `info` part of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
pub struct InfoAttr {
    pub bpf_fd: u32,
    pub info_len: u32,
    pub info: u64,
}

/// Fills `info` (a kernel `bpf_*_info`) for the object behind `fd`.
pub fn object_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> std::io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: (info as *mut T) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// `link_create` part of `union bpf_attr`, up to the fields an iterator uses.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `iter_create` part of `union bpf_attr`.
#[repr(C)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// An iterator link. Each `open` starts a new pass over the sockets of the
/// network namespace the calling thread is in at that moment.
#[derive(Debug)]
pub struct IterLink {
    fd: OwnedFd,
    pub id: u32,
}

impl IterLink {
    pub fn create(prog: BorrowedFd<'_>) -> std::io::Result<IterLink> {
        let mut attr = LinkCreateAttr {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: 0,
            attach_type: bpf_attach_type::BPF_TRACE_ITER as u32,
            flags: 0,
            iter_info: 0,
            iter_info_len: 0,
            _pad: 0,
        };
        let fd = owned(bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?);
        // SAFETY: bpf_link_info is plain old data; zero is a valid value.
        let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
        object_info(fd.as_fd(), &mut info)?;
        Ok(IterLink { fd, id: info.id })
    }

    pub fn open(&self) -> std::io::Result<std::fs::File> {
        let mut attr = IterCreateAttr {
            link_fd: self.fd.as_raw_fd() as u32,
            flags: 0,
        };
        Ok(owned(bpf(bpf_cmd::BPF_ITER_CREATE, &mut attr)?).into())
    }
}
