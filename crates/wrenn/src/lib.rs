//! The `wrenn` command: wrenn on one machine (`wrenn up`), the control plane alone (`wrenn
//! server`), the host agent (`wrenn agent`), the CLI over a control plane (`wrenn sandbox`,
//! `wrenn snapshot`, `wrenn template`, `wrenn host`, `wrenn audit`, `wrenn events`), API keys (`wrenn key`), users (`wrenn user`) and guest images (`wrenn image`): one
//! module a command group under `commands/`. The benchmarks are the `wrenn-bench` binary.
//!
//! A library too: [`main_with`] is the whole command with extensions added to the control
//! plane it serves (`wrenn server`, `wrenn up`); `main.rs` is it with none.

mod commands;
mod config;
mod connection;
mod dockerfile;
mod flags;
mod output;
mod paths;
mod secrets;

use commands::{agent, audit, host, image, key, sandbox, server, snapshot, template, up, user};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn",
    version,
    about = "wrenn: microVM sandboxes, E2B compatible"
)]
struct Cli {
    /// The configuration file (TOML; sections by command, keys by flag) [default:
    /// /etc/wrenn/wrenn.toml when it exists]; the environment and flags are above it.
    #[arg(long, global = true, env = "WRENN_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host agent, or talk to one.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Start wrenn on this machine: image, template, host agent, control plane, proxy.
    Up(Box<up::UpArgs>),
    /// Run the control plane alone, for host agents that join it (`wrenn agent serve --join`).
    Server(Box<server::ServerArgs>),
    /// Manage API keys: over the API, or with --local in this machine's store.
    Key(key::KeyArgs),
    /// Users in this machine's store (the first operator; the rest come by invitation).
    User(user::UserArgs),
    /// Sandboxes of a control plane: create, list, info, exec, shell, cp, pause, resume,
    /// snapshot, fork, kill, timeout.
    Sandbox(sandbox::SandboxArgs),
    /// Snapshots of a control plane's team: list, delete.
    Snapshot(snapshot::SnapshotArgs),
    /// Templates of a control plane.
    Template(template::TemplateArgs),
    /// Hosts of a control plane's fleet.
    Host(host::HostArgs),
    /// Build and check guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The audit log: every call that changed (or tried to change) state, oldest first
    /// (a team's admins and owners; operators with --team).
    Audit(audit::LogArgs),
    /// Lifecycle events: sandboxes, snapshots, hosts, templates, keys, oldest first.
    Events(audit::LogArgs),
    /// The team's use by day (UTC): sandbox-seconds and GiB-seconds.
    Usage(UsageArgs),
    /// The configuration: `wrenn config show COMMAND…` prints a command's effective settings
    /// (file, environment, flags) and where each came from, secrets masked.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// The effective settings of a command as it would run (`wrenn config show server`,
    /// `wrenn config show agent serve --listen 0.0.0.0:49990`).
    Show {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The command, its words and flags.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

/// `wrenn usage`'s days.
#[derive(Debug, clap::Args)]
struct UsageArgs {
    #[command(flatten)]
    connection: connection::Connection,
    /// The first day, YYYY-MM-DD [default: 29 days before --end].
    #[arg(long)]
    start: Option<String>,
    /// The last day, YYYY-MM-DD [default: today].
    #[arg(long)]
    end: Option<String>,
}

/// What `wrenn server` and `wrenn up` add to the control plane they serve.
pub type Extensions = Vec<std::sync::Arc<dyn wrenn_cp::server::Extension>>;

/// The `wrenn` command, its control plane serving `extensions` too: a program's whole `main`.
pub fn main_with(extensions: Extensions) {
    if let Err(error) = run(extensions) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(extensions: Extensions) -> anyhow::Result<()> {
    let env = |name: &str| std::env::var(name).ok();
    let layered = config::layer(std::env::args_os().collect(), &env)?;
    let config_file = layered.file.clone();
    let cli = Cli::parse_from(layered.args);
    wrenn_core::logging::log_to_stderr("WRENN_LOG", "info");
    if let Command::Image(command) = cli.command {
        return image::run(command);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Image(_) => unreachable!("handled above"),
        Command::Agent(command) => runtime.block_on(agent::run(command)),
        Command::Up(args) => runtime.block_on(up::run(*args, extensions)),
        Command::Server(args) => runtime.block_on(server::run(*args, extensions)),
        Command::Sandbox(args) => runtime.block_on(sandbox::run(args)),
        Command::Template(args) => runtime.block_on(template::run(args)),
        Command::Snapshot(args) => runtime.block_on(snapshot::run(args)),
        Command::Host(args) => runtime.block_on(host::run(args)),
        Command::Key(command) => runtime.block_on(key::run(command)),
        Command::User(args) => runtime.block_on(user::run(args)),
        Command::Audit(args) => runtime.block_on(audit::audit(args)),
        Command::Events(args) => runtime.block_on(audit::events(args)),
        Command::Config(ConfigCommand::Show { json, command }) => {
            config::show(&command, config_file.as_deref(), json)
        }
        Command::Usage(args) => runtime.block_on(sandbox::telemetry::usage(
            &args.connection,
            args.start,
            args.end,
        )),
    }
}

/// Resolves at the first SIGTERM or SIGINT (Ctrl-C): the long-running commands (`wrenn up`,
/// `wrenn server`, `wrenn agent serve`) then stop cleanly.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A TCP listener bound to `address`, for the long-running commands' servers; a failure names
/// the address.
async fn listen(address: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn up_and_agent_serve_take_the_same_host_flags() {
        let host = [
            "--vmm",
            "qemu",
            "--accel",
            "tcg",
            "--slot-prefix",
            "wup",
            "--first-slot",
            "600",
            "--slots",
            "32",
            "--mmds-port",
            "4999",
            "--guest-open-range",
            "10.9.0.0/16",
            "--vmm-uid-base",
            "7",
        ];
        let up = Cli::try_parse_from(["wrenn", "up"].iter().chain(&host)).unwrap();
        let serve = Cli::try_parse_from(["wrenn", "agent", "serve"].iter().chain(&host)).unwrap();
        let Command::Up(up) = up.command else {
            panic!("not up")
        };
        let Command::Agent(super::agent::AgentCommand::Serve(serve)) = serve.command else {
            panic!("not agent serve")
        };
        for flags in [&up.host, &serve.host] {
            let slots = flags.slot_config();
            assert_eq!(
                (slots.prefix.as_str(), slots.first_index, slots.capacity),
                ("wup", 600, 32)
            );
            assert_eq!((slots.mmds_port, flags.vmm_uid_base), (4999, 7));
            assert_eq!(slots.opened_ranges.len(), 1);
            assert!(matches!(flags.accel, wrenn_vmm::accel::AccelSetting::Tcg));
            assert_eq!(flags.vmm, wrenn_vmm::VmmKind::Qemu);
        }
    }
}
