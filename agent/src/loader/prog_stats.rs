//! Per-program kernel statistics (BPF_OBJ_GET_INFO_BY_FD): invocations and
//! run time (both only while `kernel.bpf_stats_enabled=1`), and recursion
//! misses — invocations the kernel skipped because the same program was
//! already running on that CPU (a softirq interrupting it). Those are events
//! Vigil never saw, so they are reported as losses.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use aya_obj::generated::{bpf_cmd, bpf_prog_info};

use super::sys::{bpf, object_info};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
}

/// The `prog_id` part of `union bpf_attr` for BPF_PROG_GET_FD_BY_ID.
#[repr(C)]
struct GetFdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// A loaded program, named by id: holding no fd, it never keeps the program alive.
#[derive(Debug, Clone)]
pub struct ProgramHandle {
    pub name: String,
    pub id: u32,
}

impl ProgramHandle {
    fn open(&self) -> std::io::Result<OwnedFd> {
        let mut attr = GetFdAttr {
            prog_id: self.id,
            next_id: 0,
            open_flags: 0,
        };
        let fd = bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut attr)?;
        // SAFETY: the kernel just returned this new file descriptor to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn stats(&self) -> std::io::Result<ProgramStats> {
        let fd = self.open()?;
        // SAFETY: bpf_prog_info is plain old data; zero is a valid value.
        let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
        object_info(fd.as_fd(), &mut info)?;
        Ok(ProgramStats {
            run_time_ns: info.run_time_ns,
            run_cnt: info.run_cnt,
            recursion_misses: info.recursion_misses,
        })
    }
}
