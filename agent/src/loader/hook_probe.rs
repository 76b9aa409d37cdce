//! Does the running kernel have a hook at all? A program that does nothing,
//! loaded for the same hook, tells "this kernel lacks the hook" apart from
//! "the kernel has it, but its verifier rejects Vigil's program": the second
//! is a Vigil bug on that kernel build, and must never pass for the first.

use std::os::fd::{FromRawFd, OwnedFd};

use aya::Btf;
use aya_obj::{
    btf::BtfKind,
    generated::{bpf_attach_type, bpf_cmd, bpf_prog_type},
};

use super::{sys::bpf, tracefs, Attach};

/// The `prog_load` part of `union bpf_attr`, up to `attach_btf_id`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
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
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

/// `r0 = ret; exit`.
fn returning(ret: u8) -> [u8; 16] {
    [0xb7, 0, 0, 0, ret, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0]
}

/// Ok when the kernel loads a program that does nothing for `attach`'s hook;
/// otherwise why not, in an operator's words.
pub(super) fn kernel_has(attach: &Attach, btf: &Btf) -> Result<(), String> {
    let btf_id = |name: &str, kind: BtfKind| {
        btf.id_by_type_name_kind(name, kind)
            .map_err(|_| format!("kernel BTF has no {name}"))
    };
    let mut attr = ProgLoadAttr::default();
    let mut insns = returning(0);
    match attach {
        Attach::BtfTracepoint { function } => {
            attr.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
            attr.expected_attach_type = bpf_attach_type::BPF_TRACE_RAW_TP as u32;
            attr.attach_btf_id = btf_id(&format!("btf_trace_{function}"), BtfKind::Typedef)?;
        }
        Attach::Iter { target } => {
            attr.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
            attr.expected_attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
            attr.attach_btf_id = btf_id(&format!("bpf_iter_{target}"), BtfKind::Func)?;
        }
        Attach::Tracepoint { category, name, .. } => {
            // A tracepoint exists where tracefs lists it.
            tracefs::check_fields(category, name, &[]).map_err(|e| e.to_string())?;
            attr.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT as u32;
        }
        Attach::CgroupSkb { attach_type } => {
            attr.prog_type = bpf_prog_type::BPF_PROG_TYPE_CGROUP_SKB as u32;
            attr.expected_attach_type = match attach_type {
                aya::programs::CgroupSkbAttachType::Ingress => {
                    bpf_attach_type::BPF_CGROUP_INET_INGRESS
                }
                aya::programs::CgroupSkbAttachType::Egress => {
                    bpf_attach_type::BPF_CGROUP_INET_EGRESS
                }
            } as u32;
            // cgroup_skb programs must return 0 or 1; 1 lets the packet pass.
            insns = returning(1);
        }
    }
    let license = c"GPL";
    attr.insn_cnt = 2;
    attr.insns = insns.as_ptr() as u64;
    attr.license = license.as_ptr() as u64;
    attr.prog_name[..11].copy_from_slice(b"vigil_probe");
    let fd = bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
        .map_err(|e| format!("the kernel refuses even an empty program there: {e}"))?;
    // SAFETY: bpf(2) returned a new descriptor that nothing else owns;
    // dropping it unloads the empty program at once.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_return_the_value_asked() {
        assert_eq!(returning(1)[4], 1);
        assert_eq!(&returning(0)[8..], &[0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 112);
    }
}
