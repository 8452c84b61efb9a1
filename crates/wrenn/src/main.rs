//! The `wrenn` command: guest images (`wrenn image`), benchmarks (`wrenn bench`); the control
//! plane, host agent and CLI subcommands join it as they are built.

mod bench;
mod image;

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
    /// Build and check guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Image(command) = cli.command {
        return image::run(command);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Bench(command) => runtime.block_on(bench::run(command)),
        Command::Image(_) => unreachable!("handled above"),
    }
}
