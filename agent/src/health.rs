//! Which signals this agent delivers on this kernel, said loudly: a signal
//! whose hooks could not be attached (and that no setting turned off) makes
//! the agent degraded, in its log, at `/healthz` (503), in `vigil status`
//! (non-zero exit) and in `vigil_signal_degraded`.

use serde::{Deserialize, Serialize};

use crate::loader::{HookReport, HookStatus, Signal};

/// GET /healthz: 200 with this when healthy, 503 when degraded.
pub const HEALTH_PATH: &str = "/healthz";

/// What `/healthz` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `degraded`.
    pub status: String,
    pub degraded: Vec<DegradedSignal>,
}

/// A signal the agent cannot deliver, though no setting turned it off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DegradedSignal {
    pub signal: String,
    /// What users lose.
    pub impact: String,
    /// What to do about it.
    pub remedy: String,
    /// Each hook of the signal that failed, with the kernel's reason.
    pub hooks: Vec<FailedHook>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedHook {
    pub hook: String,
    /// `unavailable` (the kernel lacks it) or `rejected` (the kernel has it
    /// and its verifier refused Vigil's program).
    pub status: String,
    pub reason: String,
}

/// What an operator loses without `signal`.
pub fn impact(signal: Signal) -> &'static str {
    match signal {
        Signal::Retransmit => "no retransmits are counted",
        Signal::SynAckRetransmit => "SYN-ACK retransmits of listeners are not counted: vigil_tcp_retransmitted_segments_total falls short of the kernel's RetransSegs",
        Signal::SocketOwnership => "new sockets are attributed from /proc only: short-lived ones may stay unattributed",
        Signal::SocketDrop => "no socket drops by reason (vigil_socket_drops_total)",
        Signal::SocketSampling => "no listen queues, overflows or RTT: vigil_tcp_listen_*, vigil_tcp_rtt_seconds and vigil_tcp_connections are absent and `vigil sockets` is empty",
        Signal::TraceContext => "kernel events carry no trace ids (spans received over OTLP are still joined)",
    }
}

const REMEDY_REJECTED: &str = "this kernel has the hook but its verifier refuses Vigil's program, a Vigil bug on this kernel build: report it with the output of `vigil hooks --check`; `--disable-hook HOOK` acknowledges the loss until a fixed Vigil is deployed";
const REMEDY_UNAVAILABLE: &str = "the kernel lacks the hook or refused it (see the reason): run on a kernel that has it, or give the agent the capabilities the reason names; `--disable-hook HOOK` acknowledges the loss";

impl Health {
    pub fn of(hooks: &[HookReport]) -> Health {
        let mut degraded: Vec<DegradedSignal> = Vec::new();
        for report in hooks {
            let (status, reason) = match &report.status {
                HookStatus::Unavailable(r) => ("unavailable", r),
                HookStatus::Rejected(r) => ("rejected", r),
                _ => continue,
            };
            let served = hooks
                .iter()
                .any(|h| h.signal == report.signal && h.status == HookStatus::Active);
            if served {
                continue;
            }
            let failed = FailedHook {
                hook: report.hook.to_owned(),
                status: status.to_owned(),
                reason: reason.clone(),
            };
            let name = report.signal.to_string();
            match degraded.iter_mut().find(|d| d.signal == name) {
                Some(d) => d.hooks.push(failed),
                None => degraded.push(DegradedSignal {
                    signal: name,
                    impact: impact(report.signal).to_owned(),
                    remedy: String::new(),
                    hooks: vec![failed],
                }),
            }
        }
        for d in &mut degraded {
            let rejected = d.hooks.iter().any(|h| h.status == "rejected");
            d.remedy = if rejected {
                REMEDY_REJECTED
            } else {
                REMEDY_UNAVAILABLE
            }
            .to_owned();
        }
        Health {
            status: if degraded.is_empty() {
                "ok"
            } else {
                "degraded"
            }
            .to_owned(),
            degraded,
        }
    }

    pub fn is_degraded(&self) -> bool {
        !self.degraded.is_empty()
    }

    /// One log line per degraded signal, saying what is lost and what to do.
    pub fn log(&self) {
        for d in &self.degraded {
            let hooks: Vec<String> = d
                .hooks
                .iter()
                .map(|h| format!("{} {}: {}", h.hook, h.status, h.reason))
                .collect();
            tracing::error!(
                signal = %d.signal,
                impact = %d.impact,
                remedy = %d.remedy,
                hooks = %hooks.join("; "),
                "signal degraded: {}",
                d.impact
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(hook: &'static str, signal: Signal, status: HookStatus) -> HookReport {
        HookReport {
            hook,
            signal,
            status,
        }
    }

    #[test]
    fn a_signal_without_an_active_hook_is_degraded_unless_turned_off() {
        let hooks = [
            report(
                "tp_btf/tcp_retransmit_skb",
                Signal::Retransmit,
                HookStatus::Active,
            ),
            report(
                "iter/task_file",
                Signal::SocketSampling,
                HookStatus::Rejected("R1 type=untrusted_ptr_".into()),
            ),
            report("tp_btf/kfree_skb", Signal::SocketDrop, HookStatus::Disabled),
            // A fallback that failed while the first choice serves the signal.
            report(
                "tp_btf/sock_recv_length",
                Signal::TraceContext,
                HookStatus::Active,
            ),
            report(
                "cgroup_skb/ingress",
                Signal::TraceContext,
                HookStatus::Unavailable("EPERM".into()),
            ),
            report(
                "tp_btf/tcp_retransmit_synack",
                Signal::SynAckRetransmit,
                HookStatus::Unavailable("kernel BTF has no btf_trace_tcp_retransmit_synack".into()),
            ),
        ];
        let health = Health::of(&hooks);
        assert!(health.is_degraded());
        assert_eq!(health.status, "degraded");
        let signals: Vec<&str> = health.degraded.iter().map(|d| d.signal.as_str()).collect();
        assert_eq!(signals, ["socket_sampling", "synack_retransmit"]);
        let sampling = &health.degraded[0];
        assert!(sampling
            .impact
            .contains("no listen queues, overflows or RTT"));
        assert_eq!(sampling.hooks[0].status, "rejected");
        assert!(sampling.remedy.contains("vigil hooks --check"));
        assert!(health.degraded[1].remedy.contains("lacks the hook"));
    }

    #[test]
    fn every_hook_attached_or_turned_off_is_ok() {
        let health = Health::of(&[
            report(
                "tp_btf/tcp_retransmit_skb",
                Signal::Retransmit,
                HookStatus::Active,
            ),
            report("tp_btf/kfree_skb", Signal::SocketDrop, HookStatus::Disabled),
            report(
                "cgroup_skb/egress",
                Signal::TraceContext,
                HookStatus::Superseded("tp_btf/tcp_sendmsg_locked"),
            ),
        ]);
        assert_eq!(health.status, "ok");
        assert!(!health.is_degraded());
    }
}
