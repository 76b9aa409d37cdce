//! The kernel side of steering one SO_REUSEPORT group: copies of its
//! listeners (pidfd_getfd), their accept queues (TCP_INFO), and the
//! steering program, loaded from its own object once per group and attached
//! through one member (SO_ATTACH_REUSEPORT_EBPF applies to the whole group).
//!
//! The attachment has no link and no fd of its own: the group holds the
//! program until SO_DETACH_REUSEPORT_BPF or until its last listener closes.
//! So `GroupProgram::detach` runs on every exit path the agent controls,
//! and on SIGKILL the program fails open once the heartbeat is stale; an
//! agent that enforces the group again replaces it.
//!
//! Copies of listeners are held for one step only, never between polls: a
//! copy keeps its socket listening, so a worker that exits would leave a
//! listener in the group that nobody accepts from. The socket array holds
//! no reference: the kernel removes a socket from it when the socket closes.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya::{
    maps::{Array, MapData, PerCpuArray, ReusePortSockArray},
    programs::SkReuseport,
    Ebpf,
};
use vigil_abi::{ReuseportControl, REUSEPORT_MAX_MEMBERS, REUSEPORT_OUTCOMES};

/// The steering program's object, embedded at build time (agent/build.rs).
static REUSEPORT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vigil-reuseport"));

const PROGRAM: &str = "vigil_reuseport";

/// How long adding the members waits for a replaced program's socket array
/// to be freed: 20 tries, 50 ms apart.
const ADOPT_RETRIES: u32 = 20;
const ADOPT_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// A copy of descriptor `fd` of process `pid` (needs CAP_SYS_PTRACE over it).
pub fn copy_descriptor(pid: u32, fd: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; each returned descriptor is new and owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd as i32, 0);
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(copy as i32))
    }
}

fn getsockopt<T: Default>(fd: &OwnedFd, level: i32, name: i32) -> io::Result<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable T of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Whether the socket has SO_REUSEPORT set.
pub fn has_reuseport(fd: &OwnedFd) -> io::Result<bool> {
    getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT).map(|v| v != 0)
}

/// A listener's accept queue: (connections waiting, capacity). For a
/// listening socket the kernel reports them as tcpi_unacked and tcpi_sacked.
pub fn accept_queue(fd: &OwnedFd) -> io::Result<(u32, u32)> {
    const TCP_LISTEN: u8 = 10;
    // SAFETY: tcp_info is plain old data; zero is a valid value.
    let info: TcpInfo = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if info.state != TCP_LISTEN {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not listening"));
    }
    Ok((info.unacked, info.sacked))
}

/// The head of `struct tcp_info` (include/uapi/linux/tcp.h), up to tcpi_sacked.
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("this agent was built without its eBPF programs")]
    NoObject,
    #[error("{step}: {source}")]
    Aya {
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("a group has at most {REUSEPORT_MAX_MEMBERS} members Vigil steers among")]
    TooManyMembers,
    #[error("the group has no member left")]
    NoMembers,
}

fn aya_err<E: std::error::Error + Send + Sync + 'static>(
    step: &'static str,
) -> impl FnOnce(E) -> ProgramError {
    move |e| ProgramError::Aya {
        step,
        source: Box::new(e),
    }
}

/// The steering program attached to one group.
pub struct GroupProgram {
    ebpf: Ebpf,
    pub program_id: u32,
    heartbeat_timeout_ns: u64,
}

impl GroupProgram {
    /// Loads the program for `members` (all of one group), with every
    /// member healthy (the kernel's hash), and attaches it, replacing any
    /// program on the group (one a killed agent left behind).
    pub fn attach(
        members: &[&OwnedFd],
        heartbeat_timeout_ns: u64,
    ) -> Result<GroupProgram, ProgramError> {
        if REUSEPORT_OBJECT.is_empty() {
            return Err(ProgramError::NoObject);
        }
        let via = *members.first().ok_or(ProgramError::NoMembers)?;
        let ebpf = Ebpf::load(REUSEPORT_OBJECT).map_err(aya_err("loading the object"))?;
        let mut group = GroupProgram {
            ebpf,
            program_id: 0,
            heartbeat_timeout_ns,
        };
        group.control(None, 0)?;
        let program: &mut SkReuseport = group
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(ProgramError::NoObject)?
            .try_into()
            .map_err(aya_err("program type"))?;
        program.load().map_err(aya_err("loading the program"))?;
        program
            .attach(via.as_fd())
            .map_err(aya_err("attaching to the group"))?;
        group.program_id = program.info().map(|i| i.id()).unwrap_or(0);
        crate::loader::log_kernel_objects(&group.ebpf);
        // Members after attaching: a socket is in one socket array at a time,
        // so a program a killed agent left on the group (and its array) must
        // be replaced, and its array freed (deferred by the kernel), first.
        let mut tries = 0;
        loop {
            match group.set_members(members) {
                Ok(()) => return Ok(group),
                Err(_) if tries < ADOPT_RETRIES => {
                    tries += 1;
                    std::thread::sleep(ADOPT_RETRY_INTERVAL);
                }
                Err(e) => {
                    let _ = SkReuseport::detach(via.as_fd());
                    return Err(e);
                }
            }
        }
    }

    /// Puts member `i` of `members` at index `i` of the program's socket
    /// array and clears the rest.
    pub fn set_members(&mut self, members: &[&OwnedFd]) -> Result<(), ProgramError> {
        if members.len() > REUSEPORT_MAX_MEMBERS as usize {
            return Err(ProgramError::TooManyMembers);
        }
        let map = self
            .ebpf
            .map_mut("VIGIL_RP_MEMBERS")
            .ok_or(ProgramError::NoObject)?;
        let mut array: ReusePortSockArray<&mut MapData> =
            ReusePortSockArray::try_from(map).map_err(aya_err("socket array"))?;
        for i in 0..REUSEPORT_MAX_MEMBERS {
            match members.get(i as usize) {
                Some(fd) => array
                    .set(i, &fd.as_raw_fd(), 0)
                    .map_err(aya_err("adding a member"))?,
                // Clearing an empty index is ENOENT: nothing to clear.
                None => {
                    let _ = array.clear_index(&i);
                }
            }
        }
        Ok(())
    }

    /// The agent's word, with a fresh heartbeat: `healthy` members (indices
    /// set by `set_members`) take new connections; None: all (the kernel's
    /// hash). `refuse_ppm`: new connections to refuse per million.
    pub fn control(
        &mut self,
        healthy: Option<&[u32]>,
        refuse_ppm: u32,
    ) -> Result<(), ProgramError> {
        let mut word = ReuseportControl {
            heartbeat_ns: crate::clock::monotonic_ns(),
            heartbeat_timeout_ns: self.heartbeat_timeout_ns,
            refuse_ppm,
            ..ReuseportControl::default()
        };
        if let Some(healthy) = healthy {
            let n = healthy.len().min(REUSEPORT_MAX_MEMBERS as usize);
            word.healthy[..n].copy_from_slice(&healthy[..n]);
            word.healthy_count = n as u32;
        }
        let map = self
            .ebpf
            .map_mut("VIGIL_RP_CONTROL")
            .ok_or(ProgramError::NoObject)?;
        let mut array: Array<&mut MapData, ReuseportControl> =
            Array::try_from(map).map_err(aya_err("control map"))?;
        array
            .set(0, word, 0)
            .map_err(aya_err("writing the control word"))
    }

    /// New connections by `ReuseportOutcome`, summed over CPUs.
    pub fn outcomes(&self) -> [u64; REUSEPORT_OUTCOMES as usize] {
        let mut out = [0; REUSEPORT_OUTCOMES as usize];
        let Some(map) = self.ebpf.map("VIGIL_RP_COUNTS") else {
            return out;
        };
        let Ok(counts) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return out;
        };
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = counts.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// SO_DETACH_REUSEPORT_BPF through `member` (any member of the group);
    /// the program and maps are released with `self`.
    pub fn detach(self, member: &OwnedFd) -> Result<(), ProgramError> {
        SkReuseport::detach(member.as_fd()).map_err(aya_err("detaching from the group"))
    }
}
