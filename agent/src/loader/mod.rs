//! Sole owner of the eBPF object: load, feature-probe, attach, report, detach.
//!
//! Every kernel object is tied to a file descriptor this process holds (no
//! pinning, no legacy cgroup attachment), so exit — clean or SIGKILL — removes
//! all of them; `Probes::detach` does it explicitly and logs what went away.

pub mod btf;
pub mod capture_cgroups;
pub mod drop_reasons;
mod hook_probe;
pub mod kernel_layout;
pub mod prog_stats;
pub mod sys;
pub mod tracefs;

use std::{fmt, path::PathBuf};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        links::{CgroupAttachMode, FdLink},
        BtfTracePoint, CgroupSkb, CgroupSkbAttachType, Iter, ProgramFd, TracePoint,
    },
    Btf, Ebpf, EbpfLoader,
};
use tracing::{error, info, warn};
use vigil_abi::{tp_offsets, MAX_CAPTURE_CGROUPS};

/// The compiled kernel programs, embedded at build time (agent/build.rs).
static PROBES_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vigil-probes"));

/// What the agent observes; each is served by one or more hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    Retransmit,
    SynAckRetransmit,
    SocketOwnership,
    SocketDrop,
    SocketSampling,
    TraceContext,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Retransmit => "retransmit",
            Signal::SynAckRetransmit => "synack_retransmit",
            Signal::SocketOwnership => "socket_ownership",
            Signal::SocketDrop => "socket_drop",
            Signal::SocketSampling => "socket_sampling",
            Signal::TraceContext => "trace_context",
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Attach {
    /// BTF-typed raw tracepoint on a kernel function's tracepoint.
    BtfTracepoint { function: &'static str },
    /// Classic tracepoint; `fields` are the record offsets the program reads.
    Tracepoint {
        category: &'static str,
        name: &'static str,
        fields: &'static [(&'static str, usize)],
    },
    /// BPF iterator; loaded here, read once per sample by the sampler.
    Iter { target: &'static str },
    /// cgroup_skb program on each capture cgroup (`correlate.capture_cgroups`,
    /// default the cgroup v2 root: every socket of the node); one link each.
    CgroupSkb { attach_type: CgroupSkbAttachType },
}

#[derive(Debug, Clone, Copy)]
struct HookSpec {
    /// Name operators use (`probes.disable_hooks`), e.g. `tp_btf/tcp_retransmit_skb`.
    name: &'static str,
    signal: Signal,
    program: &'static str,
    attach: Attach,
}

const SET_STATE_FIELDS: &[(&str, usize)] = &[
    ("skaddr", tp_offsets::SET_STATE_SKADDR),
    ("oldstate", tp_offsets::SET_STATE_OLDSTATE),
    ("newstate", tp_offsets::SET_STATE_NEWSTATE),
    ("protocol", tp_offsets::SET_STATE_PROTOCOL),
];
const SYS_EXIT_FIELDS: &[(&str, usize)] = &[("ret", tp_offsets::SYS_EXIT_RET)];

const HOOKS: &[HookSpec] = &[
    HookSpec {
        name: "tp_btf/tcp_retransmit_skb",
        signal: Signal::Retransmit,
        program: "vigil_retx",
        attach: Attach::BtfTracepoint {
            function: "tcp_retransmit_skb",
        },
    },
    HookSpec {
        name: "tp_btf/tcp_retransmit_synack",
        signal: Signal::SynAckRetransmit,
        program: "vigil_synack",
        attach: Attach::BtfTracepoint {
            function: "tcp_retransmit_synack",
        },
    },
    HookSpec {
        name: "tracepoint/sock/inet_sock_set_state",
        signal: Signal::SocketOwnership,
        program: "vigil_sk_state",
        attach: Attach::Tracepoint {
            category: "sock",
            name: "inet_sock_set_state",
            fields: SET_STATE_FIELDS,
        },
    },
    HookSpec {
        name: "tracepoint/syscalls/sys_exit_accept4",
        signal: Signal::SocketOwnership,
        program: "vigil_accept4",
        attach: Attach::Tracepoint {
            category: "syscalls",
            name: "sys_exit_accept4",
            fields: SYS_EXIT_FIELDS,
        },
    },
    HookSpec {
        name: "tracepoint/syscalls/sys_exit_accept",
        signal: Signal::SocketOwnership,
        program: "vigil_accept",
        attach: Attach::Tracepoint {
            category: "syscalls",
            name: "sys_exit_accept",
            fields: SYS_EXIT_FIELDS,
        },
    },
    HookSpec {
        name: "tp_btf/kfree_skb",
        signal: Signal::SocketDrop,
        program: "vigil_drop",
        attach: Attach::BtfTracepoint {
            function: "kfree_skb",
        },
    },
    HookSpec {
        name: CAPTURE_RECV,
        signal: Signal::TraceContext,
        program: "vigil_http_recv",
        attach: Attach::BtfTracepoint {
            function: "sock_recv_length",
        },
    },
    HookSpec {
        name: CAPTURE_INGRESS,
        signal: Signal::TraceContext,
        program: "vigil_http_in",
        attach: Attach::CgroupSkb {
            attach_type: CgroupSkbAttachType::Ingress,
        },
    },
    HookSpec {
        name: CAPTURE_SEND,
        signal: Signal::TraceContext,
        program: "vigil_http_send",
        attach: Attach::BtfTracepoint {
            function: "tcp_sendmsg_locked",
        },
    },
    HookSpec {
        name: CAPTURE_EGRESS,
        signal: Signal::TraceContext,
        program: "vigil_http_out",
        attach: Attach::CgroupSkb {
            attach_type: CgroupSkbAttachType::Egress,
        },
    },
    HookSpec {
        name: CAPTURE_HANDOFF,
        signal: Signal::TraceContext,
        program: "vigil_http_handoff",
        attach: Attach::BtfTracepoint {
            function: "inet_sock_set_state",
        },
    },
    HookSpec {
        name: "iter/task_file",
        signal: Signal::SocketSampling,
        program: "vigil_sock_iter",
        attach: Attach::Iter {
            target: "task_file",
        },
    },
];

/// Where messages received are read: the buffer an application reads them
/// into, once per read, no program on any packet.
const CAPTURE_RECV: &str = "tp_btf/sock_recv_length";
/// Where messages received are read on kernels without `CAPTURE_RECV`
/// (before 6.3, or registers not in BTF): every packet received (listed
/// after it).
const CAPTURE_INGRESS: &str = "cgroup_skb/ingress";
/// Where messages sent are read (`correlate.capture_sent`): the buffer an
/// application writes, once per write, no program on any packet.
const CAPTURE_SEND: &str = "tp_btf/tcp_sendmsg_locked";
/// Where messages sent are read on kernels without `CAPTURE_SEND` (before
/// 6.16): every packet sent (listed after it).
const CAPTURE_EGRESS: &str = "cgroup_skb/egress";
/// Where a request read at a listener (it completed the handshake) moves to
/// its connection's socket: of use only behind the ingress hook (listed
/// after it); a read needs no handoff.
const CAPTURE_HANDOFF: &str = "tp_btf/inet_sock_set_state";

/// The program the socket sampler instantiates.
const SOCKET_ITERATOR: &str = "vigil_sock_iter";

/// Names accepted in `probes.disable_hooks`.
pub fn hook_names() -> impl Iterator<Item = &'static str> + Clone {
    HOOKS.iter().map(|h| h.name)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum HookStatus {
    Active,
    Disabled,
    /// This kernel lacks the hook (or refuses any program on it).
    Unavailable(String),
    /// The kernel has the hook, but its verifier rejected Vigil's program:
    /// a Vigil bug on this kernel build (`vigil hooks --check` shows it).
    Rejected(String),
    /// Not attached: the named hook does its work on this kernel.
    Superseded(&'static str),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HookReport {
    pub hook: &'static str,
    pub signal: Signal,
    pub status: HookStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this agent was built without its eBPF programs (bpf-linker was missing at build time); run `cargo xtask setup` and rebuild")]
    NoObject,
    #[error("cannot read the eBPF object {path}")]
    ReadObject {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resolve kernel structure layout")]
    Layout(#[from] kernel_layout::LayoutError),
    #[error("kernel BTF has no `enum skb_drop_reason`")]
    DropReasons(#[source] btf::BtfError),
    #[error("cannot read kernel BTF for BTF tracepoints")]
    KernelBtf(#[source] aya::BtfError),
    #[error(
        "the kernel refused to load the eBPF object (are you root, with CAP_BPF and CAP_PERFMON?)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("eBPF map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("correlate.capture_cgroups")]
    CaptureCgroups(#[from] capture_cgroups::CaptureCgroupError),
    #[error("correlate.capture_cgroups lists {0} cgroups; at most {MAX_CAPTURE_CGROUPS} are supported (list a common parent instead)")]
    TooManyCaptureCgroups(usize),
    #[error("no hook for signal `{signal}` could be attached: {}", .reasons.join("; "))]
    SignalUnavailable {
        signal: Signal,
        reasons: Vec<String>,
    },
}

/// Sizes and switches the loader takes from the config.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub ring_buffer_bytes: u32,
    pub socket_table_entries: u32,
    pub wakeup_bytes: u32,
    pub disable_hooks: Vec<String>,
    /// `correlate.capture_sent`: false leaves the egress capture hook off.
    pub capture_sent: bool,
    pub kernel_debug_logs: bool,
    /// Drop-reason patterns (`probes.drop_reasons`).
    pub drop_reasons: Vec<String>,
    /// The cgroup v2 hierarchy's root directory (None: the cgroup2 mount of
    /// this process).
    pub cgroup_root: Option<PathBuf>,
    /// Where the trace-context capture attaches, absolute or relative to the
    /// root (`correlate.capture_cgroups`); empty: the root.
    pub capture_cgroups: Vec<String>,
    /// Load this object instead of the built-in one (testing a probes build).
    pub probes_object: Option<PathBuf>,
}

/// The loaded, attached programs. Dropping detaches everything.
pub struct Probes {
    ebpf: Ebpf,
    pub hooks: Vec<HookReport>,
    /// The kernel programs' aya-log ring, when debug logs were asked for.
    pub kernel_logger: Option<KernelLogger>,
    /// The drop reasons the drop probe reports, with their names on this kernel.
    pub drop_reasons: drop_reasons::DropReasons,
    /// The capture hooks' links, one per hook and cgroup, owned here (not by
    /// aya) so each is counted, logged by id and released with the agent.
    cgroup_links: Vec<FdLink>,
    /// Links of the active hooks: one per hook, one per cgroup for capture.
    links: usize,
}

pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Maps handed to the pipeline.
pub struct ProbeMaps {
    pub events: RingBuf<MapData>,
    pub losses: LossMaps,
    /// Connections accept() handed out per (netns, port), for admission
    /// control; None unless the accept hook is attached.
    pub accepts: Option<AcceptCounts>,
}

/// `VIGIL_ACCEPTS`: accepted connections per (netns, listening port).
pub type AcceptCounts = aya::maps::HashMap<MapData, vigil_abi::AcceptKey, u64>;

/// What the kernel side counts of what never reached the agent.
pub struct LossMaps {
    /// Events, per `loss_index(probe, reason)`, per CPU.
    pub events: PerCpuArray<MapData, u64>,
    /// Retransmitted segments whose record was lost for good, per netns, per CPU.
    pub segments: PerCpuHashMap<MapData, u32, u64>,
    /// HTTP messages the capture hooks saw, per `CaptureOutcome`, per CPU.
    pub capture: PerCpuArray<MapData, u64>,
}

impl Probes {
    pub fn load(opts: &LoadOptions) -> Result<Probes, LoadError> {
        let object = object_bytes(opts)?;
        if object.is_empty() {
            return Err(LoadError::NoObject);
        }
        // Before any kernel object exists: a wrong entry fails the start. No
        // entries: the root, as far as it can be found (else capture is
        // unavailable, and the agent runs without it).
        let capture_at: Result<Vec<PathBuf>, String> = if opts.capture_cgroups.is_empty() {
            capture_cgroups::hierarchy_root(opts.cgroup_root.as_deref())
                .map(|root| vec![root])
                .map_err(|e| e.to_string())
        } else {
            let root = capture_cgroups::hierarchy_root(opts.cgroup_root.as_deref())?;
            Ok(capture_cgroups::resolve(&root, &opts.capture_cgroups)?
                .into_iter()
                .map(|c| c.dir)
                .collect())
        };
        let disabled = |hook: &str| opts.disable_hooks.iter().any(|d| d == hook);
        // Without a hook for messages sent none is seen, whichever setting
        // took them away; the capture programs then read received requests only.
        let capture_sent =
            opts.capture_sent && !(disabled(CAPTURE_SEND) && disabled(CAPTURE_EGRESS));
        // Messages sent are read where they are written, for every socket of
        // the node: the capture cgroups (when not the root) are checked there.
        let scope = match &capture_at {
            Ok(dirs) if !opts.capture_cgroups.is_empty() => dirs.clone(),
            _ => Vec::new(),
        };
        // The config refuses more (exit status 2); this guards other callers.
        if scope.len() > MAX_CAPTURE_CGROUPS as usize {
            return Err(LoadError::TooManyCaptureCgroups(scope.len()));
        }
        let Opened {
            mut ebpf,
            kernel_btf,
            layout,
            drop_reasons,
        } = open_object(&object, opts, capture_sent, scope.len())?;
        if !drop_reasons.unmatched.is_empty() {
            warn!(patterns = ?drop_reasons.unmatched, "probes.drop_reasons entries match no drop reason of this kernel");
        }

        let kernel_logger = if opts.kernel_debug_logs {
            aya_log::EbpfLogger::init(&mut ebpf)
                .map_err(|e| warn!(error = %e, "kernel-side debug logs unavailable"))
                .ok()
        } else {
            None
        };

        set_capture_cgroups(&mut ebpf, &scope)?;

        let mut hooks = Vec::with_capacity(HOOKS.len());
        let mut cgroup_links = Vec::new();
        let mut links = 0;
        for spec in HOOKS {
            // Capture hooks that depend on one listed before them.
            let earlier = |name: &str| {
                hooks
                    .iter()
                    .find(|h: &&HookReport| h.hook == name)
                    .map(|h| h.status.clone())
            };
            let sent_hook = spec.name == CAPTURE_SEND || spec.name == CAPTURE_EGRESS;
            let status = if disabled(spec.name)
                || (sent_hook && !capture_sent)
                || (spec.name == CAPTURE_HANDOFF
                    && earlier(CAPTURE_INGRESS) == Some(HookStatus::Disabled))
            {
                HookStatus::Disabled
            } else if spec.name == CAPTURE_SEND && layout.send_ready != 1 {
                HookStatus::Unavailable(
                    "kernel BTF lacks iov_iter.ubuf or tcp_sock.write_seq (kernel older than 6.0)"
                        .to_owned(),
                )
            } else if spec.name == CAPTURE_RECV && layout.recv_ready != 1 {
                HookStatus::Unavailable(
                    "kernel BTF lacks tcp_sock.copied_seq or this architecture's syscall registers (pt_regs; x86-64 only)"
                        .to_owned(),
                )
            } else if spec.name == CAPTURE_EGRESS
                && earlier(CAPTURE_SEND) == Some(HookStatus::Active)
            {
                HookStatus::Superseded(CAPTURE_SEND)
            } else if (spec.name == CAPTURE_INGRESS || spec.name == CAPTURE_HANDOFF)
                && earlier(CAPTURE_RECV) == Some(HookStatus::Active)
            {
                HookStatus::Superseded(CAPTURE_RECV)
            } else if spec.name == CAPTURE_HANDOFF
                && earlier(CAPTURE_INGRESS) != Some(HookStatus::Active)
            {
                HookStatus::Unavailable(format!("needs {CAPTURE_INGRESS}, which is not attached"))
            } else {
                match attach(&mut ebpf, spec, &kernel_btf, &capture_at) {
                    Ok(made) => {
                        links += made.len().max(1);
                        cgroup_links.extend(made);
                        HookStatus::Active
                    }
                    Err(AttachError::Load(reason)) => load_failure(spec, &kernel_btf, reason),
                    Err(AttachError::Attach(reason)) => HookStatus::Unavailable(reason),
                }
            };
            match &status {
                HookStatus::Active => {
                    info!(hook = spec.name, signal = %spec.signal, "hook attached")
                }
                HookStatus::Disabled => {
                    info!(hook = spec.name, signal = %spec.signal, "hook disabled by config")
                }
                HookStatus::Unavailable(reason) => {
                    warn!(hook = spec.name, signal = %spec.signal, %reason, "hook unavailable")
                }
                HookStatus::Rejected(reason) => {
                    error!(hook = spec.name, signal = %spec.signal, %reason, "hook rejected: this kernel has the hook, but its verifier refused Vigil's program (a Vigil bug on this kernel build; report it with the output of `vigil hooks --check`)")
                }
                HookStatus::Superseded(by) => {
                    info!(hook = spec.name, signal = %spec.signal, by, "hook not needed: another does its work")
                }
            }
            hooks.push(HookReport {
                hook: spec.name,
                signal: spec.signal,
                status,
            });
        }
        let probes = Probes {
            ebpf,
            hooks,
            kernel_logger,
            drop_reasons,
            cgroup_links,
            links,
        };
        probes.require(Signal::Retransmit)?;
        let health = crate::health::Health::of(&probes.hooks);
        health.log();
        for signal in probes.signals_turned_off() {
            info!(%signal, "signal turned off by config: {}", crate::health::impact(signal));
        }
        if probes.signal_active(Signal::TraceContext) {
            if let Ok(dirs) = &capture_at {
                let cgroups: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                info!(
                    cgroups = %cgroups.join(", "),
                    "trace-context capture attached to these cgroups (and every cgroup below them)"
                );
            }
        }
        probes.log_kernel_objects();
        Ok(probes)
    }

    pub fn signal_active(&self, signal: Signal) -> bool {
        self.hooks
            .iter()
            .any(|h| h.signal == signal && h.status == HookStatus::Active)
    }

    /// Signals every hook of which the config turned off (not degraded:
    /// the operator chose it).
    fn signals_turned_off(&self) -> Vec<Signal> {
        let mut off: Vec<Signal> = Vec::new();
        for h in &self.hooks {
            let all_off = self
                .hooks
                .iter()
                .filter(|o| o.signal == h.signal)
                .all(|o| matches!(o.status, HookStatus::Disabled | HookStatus::Superseded(_)));
            if all_off && !off.contains(&h.signal) {
                off.push(h.signal);
            }
        }
        off
    }

    fn require(&self, signal: Signal) -> Result<(), LoadError> {
        if self.signal_active(signal) {
            return Ok(());
        }
        let reasons = self
            .hooks
            .iter()
            .filter(|h| h.signal == signal)
            .map(|h| match &h.status {
                HookStatus::Disabled => format!("{} disabled by config", h.hook),
                HookStatus::Unavailable(r) | HookStatus::Rejected(r) => format!("{}: {r}", h.hook),
                HookStatus::Superseded(by) => format!("{} superseded by {by}", h.hook),
                HookStatus::Active => String::new(),
            })
            .collect();
        Err(LoadError::SignalUnavailable { signal, reasons })
    }

    fn log_kernel_objects(&self) {
        log_kernel_objects(&self.ebpf);
    }

    /// The attached programs, for reading their kernel statistics.
    pub fn program_handles(&self) -> Vec<prog_stats::ProgramHandle> {
        let active: Vec<&str> = HOOKS
            .iter()
            .filter(|spec| {
                self.hooks
                    .iter()
                    .any(|h| h.hook == spec.name && h.status == HookStatus::Active)
            })
            .map(|spec| spec.program)
            .collect();
        self.ebpf
            .programs()
            .filter(|(name, _)| active.contains(name))
            .filter_map(|(name, p)| {
                Some(prog_stats::ProgramHandle {
                    name: name.to_owned(),
                    id: p.info().ok()?.id(),
                })
            })
            .collect()
    }

    /// A handle on the loaded socket iterator program, when its hook is active.
    pub fn socket_iterator(&self) -> Option<ProgramFd> {
        if !self.signal_active(Signal::SocketSampling) {
            return None;
        }
        let program: &Iter = self.ebpf.program(SOCKET_ITERATOR)?.try_into().ok()?;
        program.fd().ok()?.try_clone().ok()
    }

    /// Takes the maps the pipeline reads. Call once, before `detach`.
    pub fn take_maps(&mut self) -> Result<ProbeMaps, LoadError> {
        let mut take =
            |name: &'static str| self.ebpf.take_map(name).ok_or(LoadError::MissingMap(name));
        let events = RingBuf::try_from(take("VIGIL_EVENTS")?).map_err(|source| LoadError::Map {
            name: "VIGIL_EVENTS",
            source,
        })?;
        let lost = PerCpuArray::try_from(take("VIGIL_LOST")?).map_err(|source| LoadError::Map {
            name: "VIGIL_LOST",
            source,
        })?;
        let segments = PerCpuHashMap::try_from(take("VIGIL_LOST_SEGMENTS")?).map_err(|source| {
            LoadError::Map {
                name: "VIGIL_LOST_SEGMENTS",
                source,
            }
        })?;
        let capture =
            PerCpuArray::try_from(take("VIGIL_CAPTURE")?).map_err(|source| LoadError::Map {
                name: "VIGIL_CAPTURE",
                source,
            })?;
        let accepts = aya::maps::HashMap::try_from(take("VIGIL_ACCEPTS")?).map_err(|source| {
            LoadError::Map {
                name: "VIGIL_ACCEPTS",
                source,
            }
        })?;
        let accept_hook = self.hooks.iter().any(|h| {
            h.hook == "tracepoint/syscalls/sys_exit_accept4" && h.status == HookStatus::Active
        });
        Ok(ProbeMaps {
            events,
            accepts: accept_hook.then_some(accepts),
            losses: LossMaps {
                events: lost,
                segments,
                capture,
            },
        })
    }

    /// Detaches every hook and releases every program and map.
    pub fn detach(self) {
        let Probes {
            ebpf,
            cgroup_links,
            links,
            ..
        } = self;
        drop(cgroup_links);
        drop(ebpf);
        info!(links, "detached all hooks and released programs and maps");
    }
}

/// An eBPF object with its maps created and globals set for this kernel;
/// no program loaded yet.
struct Opened {
    ebpf: Ebpf,
    kernel_btf: Btf,
    layout: vigil_abi::KernelLayout,
    drop_reasons: drop_reasons::DropReasons,
}

fn open_object(
    object: &[u8],
    opts: &LoadOptions,
    capture_sent: bool,
    capture_scope: usize,
) -> Result<Opened, LoadError> {
    let btf_data = btf::Btf::from_sys_fs()
        .map_err(|e| LoadError::Layout(kernel_layout::LayoutError::NoBtf(e)))?;
    let vigil_btf = btf::Btf::parse(&btf_data)
        .map_err(|e| LoadError::Layout(kernel_layout::LayoutError::Btf(e)))?;
    let layout = kernel_layout::resolve(&vigil_btf)?;
    let drop_reasons =
        drop_reasons::resolve(&vigil_btf, &opts.drop_reasons).map_err(LoadError::DropReasons)?;
    drop(vigil_btf);
    let kernel_btf = Btf::from_sys_fs().map_err(LoadError::KernelBtf)?;
    // aya-log: 0 silences the kernel side entirely; 0xff lets debug! through.
    let log_level: u8 = if opts.kernel_debug_logs { 0xff } else { 0 };
    let ebpf = EbpfLoader::new()
        .btf(Some(&kernel_btf))
        .override_global("VIGIL_LAYOUT", &layout, true)
        .override_global("AYA_LOG_LEVEL", &log_level, false)
        .override_global("VIGIL_WAKEUP_BYTES", &u64::from(opts.wakeup_bytes), true)
        .override_global("VIGIL_DROP_REASONS", &drop_reasons.set, true)
        .override_global("VIGIL_CAPTURE_SENT", &u8::from(capture_sent), true)
        .override_global("VIGIL_CAPTURE_SCOPE", &(capture_scope as u32), true)
        .map_max_entries("VIGIL_EVENTS", opts.ring_buffer_bytes)
        .map_max_entries("VIGIL_SOCKS", opts.socket_table_entries)
        .load(object)
        .map_err(LoadError::Load)?;
    Ok(Opened {
        ebpf,
        kernel_btf,
        layout,
        drop_reasons,
    })
}

/// What loading one hook's program found on the running kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramCheck {
    pub hook: &'static str,
    pub program: &'static str,
    pub signal: Signal,
    #[serde(flatten)]
    pub outcome: CheckOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "reason")]
pub enum CheckOutcome {
    /// The verifier accepted the program.
    Verified,
    /// This kernel lacks the hook (an empty program there fails too).
    KernelLacks(String),
    /// The kernel has the hook, and its verifier rejected the program.
    Rejected(String),
}

/// `vigil hooks --check`: every program of the object, loaded (so verified)
/// against the running kernel, none attached; fallbacks the agent would not
/// load here are loaded too.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectCheck {
    pub kernel: String,
    pub programs: Vec<ProgramCheck>,
    /// Programs in the object that no hook names: never loaded by the agent.
    pub unlisted: Vec<String>,
}

impl ObjectCheck {
    /// True when nothing was rejected and nothing is unlisted.
    pub fn passed(&self) -> bool {
        self.unlisted.is_empty()
            && !self
                .programs
                .iter()
                .any(|p| matches!(p.outcome, CheckOutcome::Rejected(_)))
    }
}

/// The object to load: the built-in one, or `opts.probes_object`.
fn object_bytes(opts: &LoadOptions) -> Result<std::borrow::Cow<'static, [u8]>, LoadError> {
    match &opts.probes_object {
        None => Ok(std::borrow::Cow::Borrowed(PROBES_OBJECT)),
        Some(path) => std::fs::read(path)
            .map(std::borrow::Cow::Owned)
            .map_err(|source| LoadError::ReadObject {
                path: path.clone(),
                source,
            }),
    }
}

/// Loads every program of the object `opts` names (the built-in one unless
/// `probes_object` is set).
pub fn check_object(opts: &LoadOptions) -> Result<ObjectCheck, LoadError> {
    let object = object_bytes(opts)?;
    if object.is_empty() {
        return Err(LoadError::NoObject);
    }
    let Opened {
        mut ebpf,
        kernel_btf,
        ..
    } = open_object(&object, opts, true, 0)?;
    let programs = HOOKS
        .iter()
        .map(|spec| {
            let outcome = match load_program(&mut ebpf, spec, &kernel_btf) {
                Ok(()) => CheckOutcome::Verified,
                Err(reason) => match load_failure(spec, &kernel_btf, reason) {
                    HookStatus::Rejected(r) => CheckOutcome::Rejected(r),
                    HookStatus::Unavailable(r) => CheckOutcome::KernelLacks(r),
                    other => CheckOutcome::KernelLacks(format!("{other:?}")),
                },
            };
            ProgramCheck {
                hook: spec.name,
                program: spec.program,
                signal: spec.signal,
                outcome,
            }
        })
        .collect();
    let unlisted = ebpf
        .programs()
        .map(|(name, _)| name)
        .filter(|name| !HOOKS.iter().any(|h| h.program == *name))
        .map(str::to_owned)
        .collect();
    Ok(ObjectCheck {
        kernel: kernel_release(),
        programs,
        unlisted,
    })
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The verifier's last `lines` lines in a load failure's reason (aya puts
/// its whole log there): where it stopped, and why.
pub fn verifier_tail(reason: &str, lines: usize) -> Vec<&str> {
    let all: Vec<&str> = reason.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].to_vec()
}

/// Why a hook could not be attached.
enum AttachError {
    /// Loading (verifying) the program failed.
    Load(String),
    /// The program loaded; attaching it failed.
    Attach(String),
}

/// Loads (and so verifies) one hook's program without attaching it.
fn load_program(ebpf: &mut Ebpf, spec: &HookSpec, btf: &Btf) -> Result<(), String> {
    let program = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| format!("program {} missing from the object", spec.program))?;
    match spec.attach {
        Attach::BtfTracepoint { function } => {
            let p: &mut BtfTracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            p.load(function, btf).map_err(|e| describe("load", &e))
        }
        Attach::Tracepoint {
            category,
            name,
            fields,
        } => {
            tracefs::check_fields(category, name, fields).map_err(|e| e.to_string())?;
            let p: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            p.load().map_err(|e| describe("load", &e))
        }
        Attach::Iter { target } => {
            let p: &mut Iter = program.try_into().map_err(|e| format!("{e}"))?;
            p.load(target, btf).map_err(|e| describe("load", &e))
        }
        Attach::CgroupSkb { .. } => {
            let p: &mut CgroupSkb = program.try_into().map_err(|e| format!("{e}"))?;
            p.load().map_err(|e| describe("load", &e))
        }
    }
}

/// Loads and attaches one hook; returns the capture links it made (none for
/// other hooks, whose links aya keeps with their program).
fn attach(
    ebpf: &mut Ebpf,
    spec: &HookSpec,
    btf: &Btf,
    capture_at: &Result<Vec<PathBuf>, String>,
) -> Result<Vec<FdLink>, AttachError> {
    load_program(ebpf, spec, btf).map_err(AttachError::Load)?;
    let program = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| AttachError::Attach(format!("program {} missing", spec.program)))?;
    let attached = match spec.attach {
        Attach::BtfTracepoint { .. } => <&mut BtfTracePoint>::try_from(program)
            .map_err(|e| format!("{e}"))
            .and_then(|p| p.attach().map_err(|e| describe("attach", &e)))
            .map(|_| Vec::new()),
        Attach::Tracepoint { category, name, .. } => <&mut TracePoint>::try_from(program)
            .map_err(|e| format!("{e}"))
            .and_then(|p| p.attach(category, name).map_err(|e| describe("attach", &e)))
            .map(|_| Vec::new()),
        // Read once per sample by the sampler, which makes its link.
        Attach::Iter { .. } => Ok(Vec::new()),
        Attach::CgroupSkb { attach_type } => capture_at
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|dirs| attach_cgroup_skb(program, spec.program, attach_type, dirs)),
    };
    attached.map_err(AttachError::Attach)
}

/// The status of a hook whose program failed to load: rejected when the
/// kernel takes an empty program on the same hook, else unavailable.
fn load_failure(spec: &HookSpec, btf: &Btf, reason: String) -> HookStatus {
    match hook_probe::kernel_has(&spec.attach, btf) {
        Ok(()) => HookStatus::Rejected(reason),
        Err(lacks) => HookStatus::Unavailable(format!("{lacks}; {reason}")),
    }
}

/// Tells `vigil_http_send` which cgroups capture covers (none listed: all).
fn set_capture_cgroups(ebpf: &mut Ebpf, dirs: &[PathBuf]) -> Result<(), LoadError> {
    const NAME: &str = "VIGIL_CAPTURE_CGROUPS";
    let map = ebpf.map_mut(NAME).ok_or(LoadError::MissingMap(NAME))?;
    let mut cgroups = aya::maps::CgroupArray::try_from(map)
        .map_err(|source| LoadError::Map { name: NAME, source })?;
    for (i, dir) in dirs.iter().enumerate() {
        let cgroup = std::fs::File::open(dir).map_err(|source| {
            LoadError::CaptureCgroups(capture_cgroups::CaptureCgroupError::Missing {
                entry: dir.display().to_string(),
                path: dir.clone(),
                source,
            })
        })?;
        cgroups
            .set(i as u32, std::os::fd::AsFd::as_fd(&cgroup), 0)
            .map_err(|source| LoadError::Map { name: NAME, source })?;
    }
    Ok(())
}

/// Loads a capture program once and links it to every cgroup of `dirs`, all
/// or nothing (the links made before a failure are dropped: detached).
fn attach_cgroup_skb(
    program: &mut aya::programs::Program,
    name: &str,
    attach_type: CgroupSkbAttachType,
    dirs: &[PathBuf],
) -> Result<Vec<FdLink>, String> {
    let p: &mut CgroupSkb = program.try_into().map_err(|e| format!("{e}"))?;
    let mut links = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let cgroup = std::fs::File::open(dir)
            .map_err(|e| format!("cannot open cgroup {}: {e}", dir.display()))?;
        // A link (fd-bound, gone with the agent). Links always run next
        // to other programs on the cgroup; the kernel wants no mode flag.
        let id = p
            .attach(&cgroup, attach_type, CgroupAttachMode::Single)
            .map_err(|e| describe(&format!("attach to {}", dir.display()), &e))?;
        let link = p
            .take_link(id)
            .map_err(|e| describe("take link", &e))
            .and_then(|l| FdLink::try_from(l).map_err(|e| describe("take link", &e)))?;
        let id = link.info().map_err(|e| describe("link info", &e))?.id();
        info!(
            kind = "link",
            id,
            name,
            cgroup = %dir.display(),
            "kernel object created"
        );
        links.push(link);
    }
    Ok(links)
}

/// An error with its whole source chain (aya nests the errno several levels deep).
fn describe(step: &str, e: &dyn std::error::Error) -> String {
    let mut s = format!("{step}: {e}");
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(&format!(": {inner}"));
        cur = inner.source();
    }
    s
}

/// One log line per program and map of `ebpf`: the ledger of kernel objects
/// the agent created, so operators (and tests) can account for them. The
/// loader's objects and each acting group's go through it alike.
pub fn log_kernel_objects(ebpf: &Ebpf) {
    for (name, program) in ebpf.programs() {
        if let Ok(info) = program.info() {
            info!(
                kind = "program",
                id = info.id(),
                name,
                "kernel object created"
            );
        }
    }
    for (name, map) in ebpf.maps() {
        let id = match map {
            aya::maps::Map::RingBuf(m)
            | aya::maps::Map::PerCpuArray(m)
            | aya::maps::Map::LruHashMap(m)
            | aya::maps::Map::PerCpuLruHashMap(m)
            | aya::maps::Map::Array(m)
            | aya::maps::Map::SkStorage(m)
            | aya::maps::Map::CgroupArray(m)
            | aya::maps::Map::HashMap(m)
            | aya::maps::Map::PerCpuHashMap(m)
            | aya::maps::Map::ReusePortSockArray(m) => m.info().map(|i| i.id()).ok(),
            _ => None,
        };
        if let Some(id) = id {
            info!(kind = "map", id, name, "kernel object created");
        }
    }
}
