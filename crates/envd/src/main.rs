//! The `envd` binary: parses flags and serves envd's API.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use wrenn_envd::ports::PortConfig;
use wrenn_envd::poweroff::FinalAction;
use wrenn_envd::server::{self, ServerTimeouts};
use wrenn_envd::{DEFAULT_PORT, ENVD_VERSION, Envd, EnvdConfig};

/// The agent inside a wrenn sandbox (E2B envd compatible).
#[derive(Debug, Parser)]
#[command(name = "envd", version = concat!(env!("CARGO_PKG_VERSION"), " (E2B envd protocol ", wrenn_envd::envd_version!(), ")"))]
struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    listen: IpAddr,
    /// Never let `/init` set the system clock.
    #[arg(long)]
    no_clock_sync: bool,
    /// Seconds a client may take to send its request headers.
    #[arg(long, default_value_t = 30)]
    header_read_timeout_secs: u64,
    /// Seconds a connection may stay without a request in flight.
    #[arg(long, default_value_t = 640)]
    idle_timeout_secs: u64,
    /// Where loopback-only ports are made reachable. Default: the sandbox guest address
    /// 169.254.0.21 when this machine has it, otherwise forwarding is off.
    #[arg(long)]
    forward_address: Option<IpAddr>,
    /// Turn port forwarding off.
    #[arg(long)]
    no_port_forwarding: bool,
    /// Not in a sandbox VM: never look for the metadata service (E2B's flag; also the default
    /// when --mmds-address is not given).
    #[arg(long)]
    isnotfc: bool,
    /// The metadata service to read the sandbox identity and token hash from (host:port;
    /// Firecracker's is 169.254.169.254:80). Off when not given: on a host, that address may be a
    /// cloud provider's metadata service, which envd must not query.
    #[arg(long)]
    mmds_address: Option<String>,
    /// Directory for the sandbox identity files (`wrenn/`, `e2b/`).
    #[arg(long, default_value = "/run")]
    run_dir: std::path::PathBuf,
    /// envd's cgroup v2 root. Default: /sys/fs/cgroup/wrenn when envd is PID 1 (in a guest);
    /// otherwise no cgroups unless given (on a host, envd leaves the cgroup tree alone).
    #[arg(long)]
    cgroup_root: Option<std::path::PathBuf>,
    /// Run without cgroups.
    #[arg(long)]
    no_cgroups: bool,
    /// Where `/init`'s `caBundle` (the sandbox's certificate authority) is written alone...
    #[arg(
        long,
        default_value = "/usr/local/share/ca-certificates/wrenn-sandbox-ca.crt"
    )]
    trust_ca_file: std::path::PathBuf,
    /// ...and the system bundle it is added to.
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    trust_bundle: std::path::PathBuf,
    /// Reap the orphans of envd's descendants (always on when envd is PID 1).
    #[arg(long)]
    subreaper: bool,
    /// How often the port scanner looks for new listeners, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    port_scan_interval_ms: u64,
    /// Largest Connect message accepted, in bytes.
    #[arg(long, default_value_t = wrenn_connect::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Log more.
    #[arg(long)]
    verbose: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENVD_LOG").unwrap_or_else(|_| {
        if args.verbose {
            "debug".into()
        } else {
            "info".into()
        }
    });
    // In a guest (PID 1) envd's log is the console, which the host reads line by line into
    // the sandbox's log: one JSON object a line there keeps each line's level and fields.
    let json = std::process::id() == 1
        || std::env::var("ENVD_LOG_FORMAT").is_ok_and(|format| format == "json");
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().with_current_span(false).init();
    } else {
        logs.init();
    }
    // Two worker threads: envd shares a small VM with the user's work.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let address = SocketAddr::new(args.listen, args.port);
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    let external = match (args.no_port_forwarding, args.forward_address) {
        (true, _) => None,
        (false, Some(address)) => Some(address),
        (false, None) => guest_address_if_local(),
    };
    let config = EnvdConfig {
        max_message_bytes: args.max_message_bytes,
        sync_clock: !args.no_clock_sync,
        ports: PortConfig {
            external,
            scan_interval: Duration::from_millis(args.port_scan_interval_ms.max(10)),
        },
        mmds_address: args.mmds_address.clone().filter(|_| !args.isnotfc),
        run_dir: args.run_dir.clone(),
        trust_store: wrenn_envd::trust::TrustStore {
            ca_file: args.trust_ca_file.clone(),
            bundle: args.trust_bundle.clone(),
        },
        cgroup_root: match (args.no_cgroups, &args.cgroup_root) {
            (true, _) => None,
            (false, Some(root)) => Some(root.clone()),
            (false, None) => {
                (std::process::id() == 1).then(|| std::path::PathBuf::from("/sys/fs/cgroup/wrenn"))
            }
        },
    };
    let envd = Arc::new(Envd::new(config));
    if external.is_none() {
        tracing::info!("port forwarding is off");
    }
    envd.ports.start().await;
    if std::process::id() == 1 || args.subreaper {
        if std::process::id() != 1 {
            wrenn_envd::reaper::become_subreaper().context("becoming a child subreaper")?;
        }
        wrenn_envd::reaper::spawn(envd.clone());
    }
    if envd.mmds.is_some() {
        // Outside Firecracker nothing answers: say so once and go on without an identity.
        let envd = envd.clone();
        tokio::spawn(async move {
            if envd
                .refresh_identity(Duration::from_secs(2))
                .await
                .is_none()
            {
                tracing::info!(
                    "no metadata service answered: running without a sandbox identity (without it, /init trusts its caller as outside Firecracker)"
                );
            }
        });
    }
    tracing::info!(%address, version = ENVD_VERSION, "envd listening");
    let timeouts = ServerTimeouts {
        header_read: Duration::from_secs(args.header_read_timeout_secs),
        idle: Duration::from_secs(args.idle_timeout_secs.max(1)),
        ..ServerTimeouts::default()
    };
    let tracker = envd.connections.clone();
    let (final_action_tx, final_action_rx) = tokio::sync::oneshot::channel();
    server::serve(
        listener,
        wrenn_envd::app(envd.clone()),
        tracker,
        timeouts,
        async move {
            let _ = final_action_tx.send(shutdown_signal().await);
        },
    )
    .await;
    envd.ports.stop().await;
    tracing::info!("envd stopped");
    if std::process::id() == 1 {
        // As the guest's init, stopping means shutting the guest down cleanly.
        let action = final_action_rx.await.unwrap_or(FinalAction::PowerOff);
        tracing::info!(?action, "shutting the guest down");
        let error = wrenn_envd::poweroff::shut_down(action);
        anyhow::bail!("the kernel refused to power off: {error}");
    }
    Ok(())
}

/// The fixed address of every sandbox guest, if this machine has it.
fn guest_address_if_local() -> Option<IpAddr> {
    let guest = IpAddr::from(wrenn_envd::GUEST_ADDRESS);
    std::net::UdpSocket::bind(SocketAddr::new(guest, 0))
        .ok()
        .map(|_| guest)
}

/// Waits for SIGTERM (power off, when PID 1) or SIGINT (restart, when PID 1).
async fn shutdown_signal() -> FinalAction {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => FinalAction::PowerOff,
        _ = tokio::signal::ctrl_c() => FinalAction::Restart,
    }
}
