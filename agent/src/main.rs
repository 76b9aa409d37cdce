//! `vigil`: the node agent and its CLI.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use vigil::{config::Config, loader};

/// Vigil: TCP health of video services, seen from the kernel.
///
/// The agent attaches eBPF programs to the kernel's TCP tracepoints, attributes
/// every retransmission to the process and cgroup that own the socket, and
/// serves the totals to Prometheus. It needs CAP_BPF and CAP_PERFMON for the
/// probes, and CAP_SYS_PTRACE plus CAP_DAC_READ_SEARCH to read other
/// processes' /proc entries (socket owners that predate the agent).
#[derive(Parser, Debug)]
#[command(name = "vigil", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent in the foreground until SIGTERM or Ctrl-C.
    ///
    /// Example: vigil agent --metrics-addr 127.0.0.1:9464 --event-log /tmp/vigil-events.jsonl
    Agent(AgentArgs),
    /// List the kernel hooks this build can attach, by the names
    /// `--disable-hook` and `probes.disable_hooks` accept; with `--check`,
    /// load every program against the running kernel and say which it
    /// verifies, which hooks the kernel lacks, and which programs it rejects.
    ///
    /// Example: sudo vigil hooks --check
    Hooks(HooksArgs),
    /// Print the configuration with every default filled in, as TOML.
    DefaultConfig,
    /// Show a running agent's hooks and self-telemetry: events received and
    /// lost per probe, queue drops, sampler passes, series budget, caches,
    /// and every signal it cannot deliver on this kernel, with why and what
    /// to do.
    ///
    /// Exit status: 0 healthy; 3 degraded (a signal is missing: usable as a
    /// readiness check); 1 the agent could not be asked.
    ///
    /// Examples: vigil status (on the node, as root);
    /// kubectl exec -n vigil ds/vigil -- vigil status;
    /// vigil status --agent node-7:9464 (hooks and health, no acting)
    Status(StatusArgs),
    /// Show the running agent's latest socket sample: listeners by accept-queue
    /// fill, then connections by RTT (or retransmits).
    ///
    /// Example: vigil sockets --sort retrans --limit 20
    Sockets(SocketsArgs),
    /// Everything the kernel saw on this node for one trace: the connections
    /// that carried its HTTP/1.1 messages, retransmits and drops with times
    /// relative to its first message, RTT and accept-queue fill.
    ///
    /// Example: vigil explain 4bf92f3577b34da6a3ce929d0e0e4736
    Explain(ExplainArgs),
}

#[derive(clap::Args, Debug)]
struct ExplainArgs {
    /// The trace id: 32 hex characters (the second field of a traceparent).
    trace_id: String,
    #[command(flatten)]
    agent: AgentAddr,
    /// Print the agent's JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct HooksArgs {
    /// Load (and so verify) every program against the running kernel, the
    /// fallbacks this kernel would not need included, without attaching
    /// any. Needs root (CAP_BPF, CAP_PERFMON). Exit status 1 when the kernel
    /// has a hook but its verifier rejects Vigil's program (a hook the
    /// kernel lacks is reported, not failed); the verifier's last lines are
    /// printed.
    #[arg(long)]
    check: bool,
    /// With --check: print JSON, with each rejected program's whole verifier log.
    #[arg(long, requires = "check")]
    json: bool,
    /// With --check: this eBPF object instead of the built-in one (a build of
    /// ebpf-probes under test).
    #[arg(long, value_name = "FILE", requires = "check")]
    probes_object: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct AgentAddr {
    /// The agent's query socket (its agent.query_socket: root's, on the node
    /// or through `kubectl exec`), or HOST:PORT of its metrics endpoint,
    /// which answers /metrics and /healthz only.
    #[arg(long, env = "VIGIL_AGENT", default_value = vigil::config::DEFAULT_QUERY_SOCKET)]
    agent: vigil::query::Endpoint,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    agent: AgentAddr,
    /// Print health and acting as JSON (the exit status is the same).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct SocketsArgs {
    #[command(flatten)]
    agent: AgentAddr,
    /// Order of the connection table.
    #[arg(long, value_enum, default_value_t = vigil::triage::SortBy::Rtt)]
    sort: vigil::triage::SortBy,
    /// Rows per table.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Print the agent's JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// TOML config file; every field has a default (see `vigil default-config`).
    #[arg(long, short, env = "VIGIL_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the Prometheus endpoint [default: 127.0.0.1:9464].
    #[arg(long, env = "VIGIL_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Append every kernel event, attributed, to this file as JSON lines.
    #[arg(long)]
    event_log: Option<PathBuf>,
    /// Do not attach this hook (repeatable); see `vigil hooks` for names.
    #[arg(long = "disable-hook", value_name = "HOOK")]
    disable_hooks: Vec<String>,
    /// Limit the HTTP trace-context capture to this cgroup v2 directory and
    /// those below it (repeatable; absolute, or relative to the cgroup v2
    /// root) instead of the whole node; added to correlate.capture_cgroups.
    #[arg(long = "capture-cgroup", value_name = "PATH")]
    capture_cgroups: Vec<String>,
    /// Capture trace context from received messages only (requests arriving
    /// at servers); messages sent are not read, so client sockets carry no
    /// trace ids. Sets correlate.capture_sent = false.
    #[arg(long)]
    capture_received_only: bool,
    /// Let the kernel programs' debug messages through to the log (slow).
    #[arg(long)]
    kernel_debug_logs: bool,
    /// This node's name, for the Kubernetes pod watch [default: agent.node_name,
    /// else $NODE_NAME, else the hostname].
    #[arg(long)]
    node_name: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// What acting may do: `off`; `recommend` (decide and record in the
    /// audit, change nothing in the kernel); `enforce` (apply, for the
    /// workloads --act-on selects). Sets actuation.mode [default: recommend].
    #[arg(long, value_enum, value_name = "MODE")]
    actuation: Option<vigil::act::ActuationMode>,
    /// A workload acting may touch (repeatable): cgroup:PATH (that cgroup v2
    /// directory and below), process:NAME, pod:NAMESPACE/NAME,
    /// namespace:NAME or label:KEY=VALUE. Added to actuation.workloads.
    ///
    /// Example: --actuation enforce --act-on cgroup:/kubepods.slice/kubepods-burstable.slice
    #[arg(long = "act-on", value_name = "SELECTOR")]
    act_on: Vec<String>,
    /// How a SO_REUSEPORT group whose members are all saturated refuses new
    /// connections: `pie` (a PI controller on queue delay), `aimd`, or `off`.
    /// Sets actuation.admission_law [default: pie].
    #[arg(long, value_enum, value_name = "LAW")]
    admission_law: Option<vigil::act::admission::AdmissionLaw>,
    /// How services registered with the control API get their pool sizes:
    /// `kernel` (Little's law, with retransmits and RTT toward the upstream
    /// from the kernel) or `classic` (wait and idle-share rules).
    /// Sets actuation.pool_controller [default: kernel].
    #[arg(long, value_enum, value_name = "LAW")]
    pool_controller: Option<vigil::act::pools::PoolLaw>,
    /// The control API's Unix socket. Sets agent.control_socket
    /// [default: /run/vigil/control.sock].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// The query socket (mode 0600) of `vigil sockets`, `explain` and
    /// `status`. Sets agent.query_socket [default: /run/vigil-agent/query.sock].
    #[arg(long, value_name = "PATH")]
    query_socket: Option<PathBuf>,
    /// Load the kernel programs from this eBPF object instead of the
    /// built-in one (tests of a probes build only).
    #[arg(long, value_name = "FILE", hide = true)]
    probes_object: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat, kernel_debug_logs: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if kernel_debug_logs {
        // The probes log at debug level under their crate's name.
        if let Ok(directive) = "vigil_probes=debug".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The whole error chain on one line, as operators read it in a pod log.
fn report(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn load_config(args: &AgentArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(addr) = args.metrics_addr {
        config.agent.metrics_addr = addr;
    }
    if let Some(path) = &args.event_log {
        config.agent.event_log = Some(path.clone());
    }
    config
        .probes
        .disable_hooks
        .extend(args.disable_hooks.iter().cloned());
    config
        .correlate
        .capture_cgroups
        .extend(args.capture_cgroups.iter().cloned());
    config.probes.kernel_debug_logs |= args.kernel_debug_logs;
    if args.capture_received_only {
        config.correlate.capture_sent = false;
    }
    config.probes.object.clone_from(&args.probes_object);
    if let Some(mode) = args.actuation {
        config.actuation.mode = mode;
    }
    if let Some(law) = args.pool_controller {
        config.actuation.pool_controller = law;
    }
    if let Some(path) = args.control_socket.clone() {
        config.agent.control_socket = path;
    }
    if let Some(path) = args.query_socket.clone() {
        config.agent.query_socket = path;
    }
    if let Some(law) = args.admission_law {
        config.actuation.admission_law = law;
    }
    config
        .actuation
        .workloads
        .extend(args.act_on.iter().cloned());
    if let Some(node) = &args.node_name {
        config.agent.node_name = Some(node.clone());
    }
    config.validate(loader::hook_names())?;
    Ok(config)
}

/// `vigil status`'s exit status when a signal is missing.
const STATUS_DEGRADED: u8 = 3;

/// Prints a command's output, or its error (exit status 1).
fn print_or_fail<E: std::fmt::Display>(result: Result<String, E>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vigil: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Verifier lines `vigil hooks --check` prints for a rejected program.
const VERIFIER_TAIL_LINES: usize = 12;

/// `vigil hooks --check`.
fn check_hooks(args: &HooksArgs) -> ExitCode {
    let mut config = Config::default();
    config.probes.object.clone_from(&args.probes_object);
    let check = match loader::check_object(&vigil::agent::load_options(&config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vigil: {}", report(&anyhow::Error::new(e)));
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&check) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("vigil: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render_check(&check));
    }
    if check.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn render_check(check: &loader::ObjectCheck) -> String {
    use loader::CheckOutcome;
    let mut out = format!("kernel {}\n", check.kernel);
    for p in &check.programs {
        let (word, reason) = match &p.outcome {
            CheckOutcome::Verified => ("verified", None),
            CheckOutcome::KernelLacks(r) => ("missing", Some(r)),
            CheckOutcome::Rejected(r) => ("REJECTED", Some(r)),
        };
        out.push_str(&format!("{word:<9} {:<38} {}\n", p.hook, p.program));
        match (&p.outcome, reason) {
            (CheckOutcome::Rejected(r), _) => {
                out.push_str("          the kernel has this hook; its verifier said:\n");
                for line in loader::verifier_tail(r, VERIFIER_TAIL_LINES) {
                    out.push_str(&format!("          | {line}\n"));
                }
            }
            (_, Some(r)) => {
                let first = r.lines().next().unwrap_or_default();
                out.push_str(&format!("          this kernel lacks the hook: {first}\n"));
            }
            _ => {}
        }
    }
    for name in &check.unlisted {
        out.push_str(&format!(
            "UNLISTED  {name}: in the object, but no hook loads it\n"
        ));
    }
    let rejected = check
        .programs
        .iter()
        .filter(|p| matches!(p.outcome, CheckOutcome::Rejected(_)))
        .count();
    out.push_str(&format!(
        "{} programs: {} verified, {} hooks missing from this kernel, {rejected} rejected\n",
        check.programs.len(),
        check
            .programs
            .iter()
            .filter(|p| p.outcome == CheckOutcome::Verified)
            .count(),
        check
            .programs
            .iter()
            .filter(|p| matches!(p.outcome, CheckOutcome::KernelLacks(_)))
            .count(),
    ));
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Hooks(args) if args.check => check_hooks(&args),
        Command::Hooks(_) => {
            for name in loader::hook_names() {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        Command::DefaultConfig => print_or_fail(toml::to_string(&Config::default())),
        Command::Status(args) => match vigil::triage::status(&args.agent.agent) {
            Ok(status) => {
                if args.json {
                    match serde_json::to_string_pretty(&status) {
                        Ok(json) => println!("{json}"),
                        Err(e) => {
                            eprintln!("vigil: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    print!("{}", status.render());
                }
                if status.health.is_degraded() {
                    ExitCode::from(STATUS_DEGRADED)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("vigil: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Sockets(args) => {
            print_or_fail(vigil::triage::fetch(&args.agent.agent).and_then(|table| {
                if args.json {
                    Ok(serde_json::to_string_pretty(&table)? + "\n")
                } else {
                    Ok(format!(
                        "{}\n{}",
                        vigil::triage::listeners_table(&table.listeners, args.limit),
                        vigil::triage::connections_table(&table, args.sort, args.limit)
                    ))
                }
            }))
        }
        Command::Explain(args) => print_or_fail(
            vigil::triage::explain(&args.agent.agent, &args.trace_id).and_then(|e| {
                if args.json {
                    Ok(serde_json::to_string_pretty(&e)? + "\n")
                } else {
                    Ok(vigil::triage::render_explanation(&e))
                }
            }),
        ),
        Command::Agent(args) => {
            init_logging(args.log_format, args.kernel_debug_logs);
            let config = match load_config(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("vigil: invalid configuration: {}", report(&e));
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("vigil: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(vigil::agent::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vigil: {}", report(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
