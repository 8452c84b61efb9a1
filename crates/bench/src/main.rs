//! `wrenn-bench`: the measurements reported in docs/benchmarks.md, in a binary of their own so
//! that the product binary (`wrenn`) carries none of them. Each prints a table, or JSON with
//! `--json`. Build with `cargo build --release -p wrenn -p wrenn-bench -p wrenn-envd`.

mod api;
mod envd;
mod sandbox;
mod slots;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wrenn-bench",
    version,
    about = "wrenn's benchmarks (docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// envd on loopback: start time, idle memory, process round trips, file transfer rates.
    Envd(envd::EnvdBenchArgs),
    /// The base image booted cold under QEMU, to envd's /health.
    Boot(sandbox::BootBenchArgs),
    /// The control plane: REST create vs the agent, listings of 10,000 sandboxes, the proxy.
    Api(api::ApiBenchArgs),
    /// Sandboxes through a host agent: create, pause, resume, the agent's memory.
    Sandbox(sandbox::SandboxBenchArgs),
    /// Network slots: making one and opening its egress, with the firewall before and after #11.
    Slots(slots::SlotsBenchArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WRENN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    if let Err(error) = outcome {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// The `wrenn` binary beside this one (the benchmarks run `wrenn agent serve`).
pub fn wrenn_binary() -> anyhow::Result<std::path::PathBuf> {
    let own = std::env::current_exe()?;
    let wrenn = own.with_file_name("wrenn");
    anyhow::ensure!(
        wrenn.exists(),
        "no wrenn binary beside {}: build it too (cargo build --release -p wrenn -p wrenn-bench)",
        own.display()
    );
    Ok(wrenn)
}

async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Envd(args) => envd::run(args).await,
        BenchCommand::Boot(args) => sandbox::boot(args).await,
        BenchCommand::Api(args) => api::run(args).await,
        BenchCommand::Sandbox(args) => sandbox::sandbox(args).await,
        BenchCommand::Slots(args) => slots::run(args).await,
    }
}

/// The value at quantile `q` (0..=1) of sorted samples.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// The median of unsorted samples.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile(&sorted, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn quantiles() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.5), 51.0);
        assert_eq!(quantile(&sorted, 0.99), 99.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
