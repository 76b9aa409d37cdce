//! Resolves the offsets the kernel programs read (`vigil_abi::KernelLayout`)
//! from the running kernel's BTF, checking each field's size, so one object
//! runs on every kernel whose BTF names these fields.

use vigil_abi::KernelLayout;

use super::btf::{Btf, BtfError, Field};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read kernel BTF at /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF?)")]
    NoBtf(#[source] std::io::Error),
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("kernel field `{path}` is {actual} bytes, the probes expect {expected}")]
    Size {
        path: &'static str,
        expected: u32,
        actual: u32,
    },
    #[error("kernel field `{path}` is at offset {actual}, the probes expect {expected}")]
    Offset {
        path: &'static str,
        expected: u32,
        actual: u32,
    },
}

fn sized(btf: &Btf, path: &'static str, expected: u32) -> Result<u32, LayoutError> {
    let Field { offset, size } = btf.field(path)?;
    if size != expected {
        return Err(LayoutError::Size {
            path,
            expected,
            actual: size,
        });
    }
    Ok(offset)
}

/// Offset-only check for members the programs rely on being at a fixed place.
fn at(btf: &Btf, path: &'static str, expected: u32) -> Result<(), LayoutError> {
    let actual = btf.field(path)?.offset;
    if actual != expected {
        return Err(LayoutError::Offset {
            path,
            expected,
            actual,
        });
    }
    Ok(())
}

pub fn resolve(btf: &Btf) -> Result<KernelLayout, LayoutError> {
    // The programs read sock_common fields straight from `struct sock *` and
    // `struct request_sock *`, and the net pointer straight from possible_net_t.
    at(btf, "sock.__sk_common", 0)?;
    at(btf, "request_sock.__req_common", 0)?;
    at(
        btf,
        "sock_common.skc_net.net",
        btf.field("sock_common.skc_net")?.offset,
    )?;
    let core = KernelLayout {
        ready: 1,
        skc_daddr: sized(btf, "sock_common.skc_daddr", 4)?,
        skc_rcv_saddr: sized(btf, "sock_common.skc_rcv_saddr", 4)?,
        skc_dport: sized(btf, "sock_common.skc_dport", 2)?,
        skc_num: sized(btf, "sock_common.skc_num", 2)?,
        skc_family: sized(btf, "sock_common.skc_family", 2)?,
        skc_state: sized(btf, "sock_common.skc_state", 1)?,
        skc_net: sized(btf, "sock_common.skc_net.net", 8)?,
        skc_v6_daddr: sized(btf, "sock_common.skc_v6_daddr", 16)?,
        skc_v6_rcv_saddr: sized(btf, "sock_common.skc_v6_rcv_saddr", 16)?,
        sk_protocol: sized(btf, "sock.sk_protocol", 2)?,
        net_ns_inum: sized(btf, "net.ns.inum", 4)?,
        skb_cb: sized(btf, "sk_buff.cb", 48)?,
        tcp_skb_cb_gso_segs: sized(btf, "tcp_skb_cb.tcp_gso_segs", 2)?,
        task_files: sized(btf, "task_struct.files", 8)?,
        files_fdt: sized(btf, "files_struct.fdt", 8)?,
        fdtable_fd: sized(btf, "fdtable.fd", 8)?,
        fdtable_max_fds: sized(btf, "fdtable.max_fds", 4)?,
        file_private_data: sized(btf, "file.private_data", 8)?,
        socket_sk: sized(btf, "socket.sk", 8)?,
        task_group_leader: sized(btf, "task_struct.group_leader", 8)?,
        task_comm: sized(btf, "task_struct.comm", 16)?,
        tcp_total_retrans: sized(btf, "tcp_sock.total_retrans", 4)?,
        skc_cookie: sized(btf, "sock_common.skc_cookie", 8)?,
        sk_ack_backlog: sized(btf, "sock.sk_ack_backlog", 4)?,
        sk_max_ack_backlog: sized(btf, "sock.sk_max_ack_backlog", 4)?,
        skb_sk: sized(btf, "sk_buff.sk", 8)?,
        tcp_srtt_us: sized(btf, "tcp_sock.srtt_us", 4)?,
        tcp_mdev_us: sized(btf, "tcp_sock.mdev_us", 4)?,
        tcp_snd_cwnd: sized(btf, "tcp_sock.snd_cwnd", 4)?,
        sk_drops: sized(btf, "sock.sk_drops", 4)?,
        sk_type: sized(btf, "sock.sk_type", 2)?,
        task_tgid: sized(btf, "task_struct.tgid", 4)?,
        task_cgroups: sized(btf, "task_struct.cgroups", 8)?,
        css_set_dfl_cgrp: sized(btf, "css_set.dfl_cgrp", 8)?,
        cgroup_kn: sized(btf, "cgroup.kn", 8)?,
        kernfs_node_id: sized(btf, "kernfs_node.id", 8)?,
        tcp_skb_cb_seq: sized(btf, "tcp_skb_cb.seq", 4)?,
        tcp_skb_cb_end_seq: sized(btf, "tcp_skb_cb.end_seq", 4)?,
        // u8 before 6.x, u16 since; the programs read its low (first) byte.
        tcp_skb_cb_tcp_flags: sized(btf, "tcp_skb_cb.tcp_flags", 2)
            .or_else(|_| sized(btf, "tcp_skb_cb.tcp_flags", 1))?,
        ..KernelLayout::UNSET
    };
    // Each optional group adds its fields, or leaves them unset (0: its
    // program stays off).
    let with_send = send_fields(btf, core).unwrap_or(core);
    Ok(recv_fields(btf, with_send).unwrap_or(with_send))
}

/// What `vigil_http_recv` reads at `sock_recv_length`: the calling task's
/// syscall registers, whose names are per architecture (x86-64 only here;
/// elsewhere the program stays off and messages received are read on
/// cgroup_skb/ingress).
#[cfg(target_arch = "x86_64")]
fn recv_fields(btf: &Btf, base: KernelLayout) -> Result<KernelLayout, LayoutError> {
    let nr = |n: libc::c_long| n as u32;
    // The ULP pointer is read from the socket's address: a tcp_sock starts
    // with its inet_connection_sock.
    at(btf, "tcp_sock.inet_conn", 0)?;
    Ok(KernelLayout {
        recv_ready: 1,
        tcp_copied_seq: sized(btf, "tcp_sock.copied_seq", 4)?,
        icsk_ulp_ops: sized(btf, "inet_connection_sock.icsk_ulp_ops", 8)?,
        sk_socket: sized(btf, "sock.sk_socket", 8)?,
        socket_file: sized(btf, "socket.file", 8)?,
        pt_regs_nr: sized(btf, "pt_regs.orig_ax", 8)?,
        pt_regs_arg1: sized(btf, "pt_regs.di", 8)?,
        pt_regs_arg2: sized(btf, "pt_regs.si", 8)?,
        nr_read: nr(libc::SYS_read),
        nr_readv: nr(libc::SYS_readv),
        nr_recvfrom: nr(libc::SYS_recvfrom),
        nr_recvmsg: nr(libc::SYS_recvmsg),
        ..base
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn recv_fields(_btf: &Btf, base: KernelLayout) -> Result<KernelLayout, LayoutError> {
    Ok(base)
}

/// What `vigil_http_send` reads at `tcp_sendmsg_locked`. Optional: kernels
/// older than 6.0 have no ITER_UBUF, and the program then stays off
/// (`send_ready` 0; messages sent are read on cgroup_skb/egress).
fn send_fields(btf: &Btf, base: KernelLayout) -> Result<KernelLayout, LayoutError> {
    let iter_type = |name: &str| -> Result<u32, LayoutError> {
        btf.enum_values("iter_type")?
            .into_iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| u32::try_from(v).ok())
            .ok_or_else(|| {
                LayoutError::Btf(BtfError::NoSuchEnum {
                    name: format!("iter_type::{name}"),
                })
            })
    };
    // `ubuf` and `__iov` share their place in the union.
    let buf = sized(btf, "iov_iter.ubuf", 8)?;
    at(btf, "iov_iter.__iov", buf)?;
    Ok(KernelLayout {
        send_ready: 1,
        tcp_write_seq: sized(btf, "tcp_sock.write_seq", 4)?,
        msghdr_msg_iter: btf.field("msghdr.msg_iter")?.offset,
        iov_iter_type: sized(btf, "iov_iter.iter_type", 1)?,
        iov_iter_offset: sized(btf, "iov_iter.iov_offset", 8)?,
        iov_iter_buf: buf,
        iov_iter_count: sized(btf, "iov_iter.count", 8)?,
        iter_ubuf: iter_type("ITER_UBUF")?,
        iter_iovec: iter_type("ITER_IOVEC")?,
        ..base
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine with BTF, every field resolves and the well-known fixed
    /// offsets come out as the kernel headers define them.
    #[test]
    fn running_kernel_layout_resolves() {
        let Ok(data) = Btf::from_sys_fs() else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI requires /sys/kernel/btf/vmlinux"
            );
            return;
        };
        let layout =
            resolve(&Btf::parse(&data).expect("kernel BTF parses")).expect("layout resolves");
        assert_eq!(layout.ready, 1);
        // struct sock_common begins with the address pair: daddr then rcv_saddr.
        assert_eq!(layout.skc_daddr, 0);
        assert_eq!(layout.skc_rcv_saddr, 4);
        // tcp_skb_cb: seq, end_seq, then the gso_segs union.
        assert_eq!(layout.tcp_skb_cb_gso_segs, 8);
        assert_eq!((layout.tcp_skb_cb_seq, layout.tcp_skb_cb_end_seq), (0, 4));
        // This kernel (6.0 and later) has what messages sent are read with;
        // ITER_UBUF is the first iter_type since 6.0, and struct iov_iter
        // starts with its u8 type.
        assert_eq!(layout.send_ready, 1);
        assert_eq!((layout.iter_ubuf, layout.iov_iter_type), (0, 0));
        assert_ne!(layout.iter_iovec, layout.iter_ubuf);
        // x86-64 `struct pt_regs`: si, di and orig_ax are its 14th to 16th words.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(layout.recv_ready, 1);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            (layout.pt_regs_arg2, layout.pt_regs_arg1, layout.pt_regs_nr),
            (13 * 8, 14 * 8, 15 * 8)
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!((layout.nr_read, layout.nr_readv), (0, 19));
        #[cfg(target_arch = "x86_64")]
        assert_ne!(layout.tcp_copied_seq, layout.tcp_write_seq);
    }
}
