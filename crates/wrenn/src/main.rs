//! The `wrenn` command. Today it carries the benchmarks (`wrenn bench envd`); the control plane,
//! host agent and CLI subcommands join it as they are built.

mod bench;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Bench(command) => runtime.block_on(bench::run(command)),
    }
}
