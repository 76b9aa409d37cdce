//! Which `enum skb_drop_reason` values the drop probe reports, and their names.
//!
//! The enum is renumbered between kernels (reasons are inserted in the middle),
//! so names are matched against the running kernel's BTF, never hard-coded
//! numbers. Patterns are exact names (`SOCKET_RCVBUFF`) or prefixes ending in
//! `*` (`TCP_*`), without the `SKB_DROP_REASON_` prefix.

use std::collections::BTreeMap;

use vigil_abi::{DropReasonSet, DROP_REASON_WORDS};

use super::btf::{Btf, BtfError};

const ENUM: &str = "skb_drop_reason";
const PREFIX: &str = "SKB_DROP_REASON_";
/// Reasons the probe's set can hold (`DropReasonSet` bits).
const MAX_REASON: i64 = (DROP_REASON_WORDS * 64) as i64;

/// The resolved set and the names of its members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropReasons {
    pub set: DropReasonSet,
    /// value -> name (without prefix), for every reason in `set`.
    pub names: BTreeMap<u32, String>,
    /// Patterns that matched no reason of this kernel.
    pub unmatched: Vec<String>,
}

impl DropReasons {
    pub fn name(&self, reason: u32) -> Option<&str> {
        self.names.get(&reason).map(String::as_str)
    }

    /// The value of reason `name` on this kernel, if it is watched.
    pub fn value(&self, name: &str) -> Option<u32> {
        self.names
            .iter()
            .find_map(|(v, n)| (n == name).then_some(*v))
    }
}

/// Checks a pattern's shape (for config validation): upper-case name
/// characters, optionally ending in `*`.
pub fn valid_pattern(p: &str) -> bool {
    let body = p.strip_suffix('*').unwrap_or(p);
    !p.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

pub fn resolve(btf: &Btf, patterns: &[String]) -> Result<DropReasons, BtfError> {
    let mut out = DropReasons::default();
    let values = btf.enum_values(ENUM)?;
    let mut used = vec![false; patterns.len()];
    for (full, value) in values {
        let Some(name) = full.strip_prefix(PREFIX) else {
            continue;
        };
        // NOT_DROPPED_YET, CONSUMED and MAX are markers, not drops.
        if matches!(name, "NOT_DROPPED_YET" | "CONSUMED" | "MAX")
            || !(0..MAX_REASON).contains(&value)
        {
            continue;
        }
        let mut hit = false;
        for (i, p) in patterns.iter().enumerate() {
            if matches(p, name) {
                used[i] = true;
                hit = true;
            }
        }
        if hit {
            let v = value as u32;
            out.set[(v / 64) as usize] |= 1 << (v % 64);
            out.names.insert(v, name.to_owned());
        }
    }
    out.unmatched = patterns
        .iter()
        .zip(used)
        .filter(|(_, u)| !u)
        .map(|(p, _)| p.clone())
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_btf() -> Option<Btf> {
        match Btf::from_sys_fs() {
            Ok(data) => Some(Btf::parse(&data).expect("kernel BTF parses")),
            Err(_) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI requires /sys/kernel/btf/vmlinux"
                );
                None
            }
        }
    }

    #[test]
    fn pattern_shapes() {
        assert!(valid_pattern("TCP_*"));
        assert!(valid_pattern("SOCKET_RCVBUFF"));
        assert!(!valid_pattern(""));
        assert!(!valid_pattern("tcp_*"));
        assert!(!valid_pattern("TCP*_X"));
    }

    /// Against the running kernel: the names the issue lists resolve, and their
    /// numbers agree with the tracepoint's own symbol table in tracefs.
    #[test]
    fn running_kernel_reasons_match_tracefs() {
        let Some(btf) = kernel_btf() else { return };
        let patterns: Vec<String> = ["SOCKET_*", "TCP_*", "PROTO_MEM", "NO_SUCH_REASON"]
            .map(String::from)
            .to_vec();
        let r = resolve(&btf, &patterns).expect("enum present");
        assert_eq!(r.unmatched, vec!["NO_SUCH_REASON".to_owned()]);
        let format = std::fs::read_to_string("/sys/kernel/tracing/events/skb/kfree_skb/format")
            .or_else(|_| {
                std::fs::read_to_string("/sys/kernel/debug/tracing/events/skb/kfree_skb/format")
            });
        for name in [
            "TCP_LISTEN_OVERFLOW",
            "SOCKET_RCVBUFF",
            "SOCKET_BACKLOG",
            "PROTO_MEM",
            "TCP_OFO_QUEUE_PRUNE",
        ] {
            let v = r.value(name).unwrap_or_else(|| panic!("{name} resolved"));
            assert!(vigil_abi::drop_reason_watched(&r.set, v));
            if let Ok(format) = &format {
                assert!(
                    format.contains(&format!("{{ {v}, \"{name}\" }}")),
                    "tracefs numbers {name} as {v}"
                );
            }
        }
        assert!(r.value("NOT_SPECIFIED").is_none(), "not asked for");
    }
}
