//! Reading kernel structures through offsets the agent resolved from BTF.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_probe_read_kernel,
    },
    Global,
};
use vigil_abi::{KernelLayout, SockOwner, SockTuple, AF_INET, AF_INET6};

/// Field offsets of the running kernel, written by the agent before load.
#[unsafe(no_mangle)]
pub static VIGIL_LAYOUT: Global<KernelLayout> = Global::new(KernelLayout::UNSET);

#[inline(always)]
pub fn layout() -> Option<KernelLayout> {
    let l = VIGIL_LAYOUT.load();
    (l.ready == 1).then_some(l)
}

/// One field of the layout, without copying the whole struct (a hot path's
/// stack and time): `field!(tcp_write_seq)`; 0 while the layout is unset.
macro_rules! field {
    ($name:ident) => {{
        let l =
            ::core::ptr::addr_of!($crate::kernel::VIGIL_LAYOUT).cast::<::vigil_abi::KernelLayout>();
        // SAFETY: `Global` is a transparent wrapper of the initialized value;
        // volatile, so the compiled-in UNSET value is never assumed.
        #[allow(unused_unsafe)]
        let value = unsafe { ::core::ptr::read_volatile(::core::ptr::addr_of!((*l).$name)) };
        value
    }};
}
pub(crate) use field;

/// A `T` at `base + offset` of a kernel object the verifier knows by its
/// BTF type (a tracepoint's argument, a typed helper result), loaded
/// directly, without a helper call: `offset` comes from the frozen layout,
/// so the verifier sees a constant and checks the access against the
/// kernel's BTF (a fault reads as 0).
///
/// # Safety
/// `base` must be such a typed pointer, and `offset` a `field!` of it.
#[inline(always)]
pub unsafe fn load<T>(base: *const core::ffi::c_void, offset: u32) -> T {
    // SAFETY: as the caller promised; the verifier checks it again.
    unsafe { core::ptr::read_volatile(base.cast::<u8>().add(offset as usize).cast::<T>()) }
}

/// Reads a `T` at `base + offset` in kernel memory; faults become `Err`.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Result<T, i64> {
    if base == 0 {
        return Err(-14); // EFAULT: never dereference NULL, even through probe_read.
    }
    // SAFETY: bpf_probe_read_kernel validates the address and returns an error on fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }.map_err(i64::from)
}

/// A kernel object whose fields a program reads at `field!` offsets.
pub trait Object: Copy {
    /// The `T` at `offset` of the object.
    fn get<T>(self, offset: u32) -> Result<T, i64>;
    /// The object the pointer at `offset` names, read the same way.
    fn follow(self, offset: u32) -> Result<Self, i64>;
}

/// Any kernel address: each field through bpf_probe_read_kernel.
#[derive(Clone, Copy)]
pub struct Probed(pub u64);

impl Object for Probed {
    #[inline(always)]
    fn get<T>(self, offset: u32) -> Result<T, i64> {
        read(self.0, offset)
    }

    #[inline(always)]
    fn follow(self, offset: u32) -> Result<Probed, i64> {
        read::<u64>(self.0, offset).map(Probed)
    }
}

/// A pointer the verifier knows by its BTF type (see `load`): each field a
/// direct load, without a helper call (~70 ns each on this VM); a field
/// that faults reads as 0.
#[derive(Clone, Copy)]
pub struct Typed(*const core::ffi::c_void);

impl Typed {
    /// # Safety
    /// `p` must be a pointer the verifier knows by its BTF type, as `load`.
    #[inline(always)]
    pub unsafe fn new(p: *const core::ffi::c_void) -> Typed {
        Typed(p)
    }
}

impl Object for Typed {
    #[inline(always)]
    fn get<T>(self, offset: u32) -> Result<T, i64> {
        // SAFETY: a typed pointer (`new`), at a `field!` offset.
        Ok(unsafe { load(self.0, offset) })
    }

    #[inline(always)]
    fn follow(self, offset: u32) -> Result<Typed, i64> {
        // SAFETY: as above; a pointer field loaded from a typed object is
        // typed by the field's BTF type.
        let p: *const core::ffi::c_void = unsafe { load(self.0, offset) };
        if p.is_null() {
            return Err(-14); // EFAULT, as `read` of NULL.
        }
        Ok(Typed(p))
    }
}

/// Address family of a `struct sock_common` (also the head of a request socket).
#[inline(always)]
pub fn family<O: Object>(skc: O) -> Result<u16, i64> {
    skc.get::<u16>(field!(skc_family))
}

/// 4-tuple of a `struct sock_common`; `local` is this host's side.
#[inline(always)]
pub fn tuple<O: Object>(skc: O) -> Result<SockTuple, i64> {
    let family = family(skc)?;
    let mut t = SockTuple {
        family,
        local_port: skc.get::<u16>(field!(skc_num))?,
        remote_port: u16::from_be(skc.get::<u16>(field!(skc_dport))?),
        ..SockTuple::default()
    };
    if family == AF_INET {
        let local: [u8; 4] = skc.get(field!(skc_rcv_saddr))?;
        let remote: [u8; 4] = skc.get(field!(skc_daddr))?;
        t.local_addr[..4].copy_from_slice(&local);
        t.remote_addr[..4].copy_from_slice(&remote);
    } else if family == AF_INET6 {
        t.local_addr = skc.get(field!(skc_v6_rcv_saddr))?;
        t.remote_addr = skc.get(field!(skc_v6_daddr))?;
    }
    Ok(t)
}

/// Inode number of the network namespace a socket lives in.
#[inline(always)]
pub fn netns_inode<O: Object>(skc: O) -> Result<u32, i64> {
    // possible_net_t is a struct holding one `struct net *`.
    skc.follow(field!(skc_net))?.get::<u32>(field!(net_ns_inum))
}

/// The current process as a socket owner. Only meaningful in process context.
#[inline(always)]
pub fn current_owner(l: &KernelLayout) -> SockOwner {
    // SAFETY: plain helper call without pointer arguments.
    let task = unsafe { bpf_get_current_task() };
    // Threads often carry their own names ("worker-3"); the leader's is the process's.
    let process_comm = read::<u64>(task, l.task_group_leader)
        .and_then(|leader| read::<[u8; 16]>(leader, l.task_comm));
    SockOwner {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        known: 1,
        // SAFETY: plain helper call without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: process_comm
            .or_else(|_| bpf_get_current_comm().map_err(i64::from))
            .unwrap_or([0; 16]),
    }
}

/// The socket an open file descriptor of the current task names
/// (`current->files->fdt->fd[fd]->private_data->sk`); meaningful only for
/// a descriptor known to be a socket, or compared with one.
#[inline(always)]
pub fn socket_of_fd(l: &KernelLayout, fd: u64) -> Result<Option<u64>, i64> {
    // SAFETY: plain helper call without pointer arguments.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, l.task_files)?;
    let fdt: u64 = read(files, l.files_fdt)?;
    let max_fds: u32 = read(fdt, l.fdtable_max_fds)?;
    if fd >= u64::from(max_fds) {
        return Ok(None);
    }
    let fd_array: u64 = read(fdt, l.fdtable_fd)?;
    let file: u64 = read(fd_array + fd * 8, 0)?;
    let socket: u64 = read(file, l.file_private_data)?;
    read(socket, l.socket_sk).map(Some)
}

/// Whether file descriptor `fd` of the current task is the open file of
/// socket `sk` (a typed `struct sock`): what a read's registers name is the
/// socket read. Typed loads all the way but the descriptor table's slot.
#[inline(always)]
pub fn fd_is_socket(fd: u64, sk: *const core::ffi::c_void) -> bool {
    // SAFETY: the current task and the socket are typed objects, and each
    // pointer loaded from them is one of the kernel's typed fields (a NULL
    // one reads as 0); the table slot is read through the helper.
    unsafe {
        let task = aya_ebpf::helpers::generated::bpf_get_current_task_btf().cast_const();
        let files: *const core::ffi::c_void = load(task.cast(), field!(task_files));
        let fdt: *const core::ffi::c_void = load(files, field!(files_fdt));
        if fd >= u64::from(load::<u32>(fdt, field!(fdtable_max_fds))) {
            return false;
        }
        let table: u64 = load(fdt, field!(fdtable_fd));
        let socket: *const core::ffi::c_void = load(sk, field!(sk_socket));
        let file: u64 = load(socket, field!(socket_file));
        file != 0 && read::<u64>(table + fd * 8, 0) == Ok(file)
    }
}
