//! The BTF reader behind kernel field offsets: malformed BTF must be an error.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = vigil::loader::btf::Btf::parse(data) {
        for path in ["sock_common.skc_daddr", "sk_buff.cb", "net.ns.inum", "a.b.c.d"] {
            let _ = btf.field(path);
        }
        let _ = vigil::loader::kernel_layout::resolve(&btf);
    }
});
