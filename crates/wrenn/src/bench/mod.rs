//! `wrenn bench`: measurements reported in docs/benchmarks.md. Each prints a table, or JSON with
//! `--json`.

mod api;
mod envd;
mod sandbox;
mod slots;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
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

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
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
    fn quantiles() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.5), 51.0);
        assert_eq!(quantile(&sorted, 0.99), 99.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
