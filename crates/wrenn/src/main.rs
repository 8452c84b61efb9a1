//! The `wrenn` command: wrenn on one machine (`wrenn up`), the control plane alone (`wrenn
//! server`), the host agent (`wrenn agent`), the CLI over a control plane (`wrenn sandbox`,
//! `wrenn template`, `wrenn host`), API keys (`wrenn key`), guest images (`wrenn image`) and
//! benchmarks (`wrenn bench`).

mod agent;
mod bench;
mod cli;
mod image;
mod secrets;
mod up;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn",
    version,
    about = "wrenn: microVM sandboxes, E2B compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure wrenn's components.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the host agent, or talk to one.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Start wrenn on this machine: image, template, host agent, control plane, proxy.
    Up(up::UpArgs),
    /// Run the control plane alone, for host agents that join it (`wrenn agent serve --join`).
    Server(up::ServerArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Key(up::KeyCommand),
    /// Sandboxes of a control plane: create, list, info, exec, shell, cp, pause, resume, kill,
    /// timeout.
    Sandbox(cli::SandboxArgs),
    /// Templates of a control plane.
    Template(cli::TemplateArgs),
    /// Hosts of a control plane's fleet.
    Host(cli::HostArgs),
    /// Build and check guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

fn main() {
    if let Err(error) = run() {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WRENN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Command::Image(command) = cli.command {
        return image::run(command);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Bench(command) => runtime.block_on(bench::run(command)),
        Command::Image(_) => unreachable!("handled above"),
        Command::Agent(command) => runtime.block_on(agent::run(command)),
        Command::Up(args) => runtime.block_on(up::up(args)),
        Command::Server(args) => runtime.block_on(up::server(args)),
        Command::Sandbox(args) => runtime.block_on(cli::sandbox(args)),
        Command::Template(args) => runtime.block_on(cli::templates(args)),
        Command::Host(args) => runtime.block_on(cli::hosts(args)),
        Command::Key(command) => runtime.block_on(up::key(command)),
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
