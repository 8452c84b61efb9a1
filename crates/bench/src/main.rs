//! `wrenn-bench`: the measurements reported in docs/benchmarks.md, in a binary of their own so
//! that the product binary (`wrenn`) carries none of them. Each prints a table, or JSON with
//! `--json`. Build with `cargo build --release -p wrenn -p wrenn-bench -p wrenn-envd`.

mod api;
mod build;
mod egress;
mod envd;
mod events;
mod firecracker;
mod replicas;
mod report;
mod sandbox;
mod slots;
mod snapshot;
mod telemetry;
mod tls;
mod uffd;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(version, about = "wrenn's benchmarks (docs/benchmarks.md)")]
enum BenchCommand {
    /// envd on loopback: start time, idle memory, process round trips, file transfer rates.
    Envd(envd::EnvdBenchArgs),
    /// Events: what recording one costs, and notification channels' delivery to a local
    /// webhook (a steady rate in order, the lag, the ceiling).
    Events(events::EventsBenchArgs),
    /// Sandbox metrics kept: a collection's write, and the store's size per sandbox-hour in
    /// each retention tier.
    Telemetry(telemetry::TelemetryBenchArgs),
    /// The base image booted cold under QEMU, to envd's /health.
    Boot(sandbox::BootBenchArgs),
    /// The control plane: REST create vs the agent, listings of 10,000 sandboxes, the proxy.
    Api(api::ApiBenchArgs),
    /// TLS against plain HTTP in one run of a real fleet (a control plane and a joined
    /// agent): creates, small proxied requests, downloads; and the fleet hop's handshakes.
    Tls(tls::TlsBenchArgs),
    /// Control plane replicas on PostgreSQL: the lifecycle's handover after its replica is
    /// SIGKILLed.
    Replicas(replicas::ReplicasBenchArgs),
    /// Sandboxes through a host agent: create, pause, resume, the agent's memory.
    Sandbox(sandbox::SandboxBenchArgs),
    /// Snapshots and forks of running sandboxes, and pauses with and without memory.
    Snapshot(snapshot::SnapshotBenchArgs),
    /// Network slots: making one and opening its egress, with the firewall before and after #11.
    Slots(slots::SlotsBenchArgs),
    /// Egress through the agent's proxy (domain rules) against direct: download throughput and
    /// connection setup.
    Egress(egress::EgressBenchArgs),
    /// Template builds: three steps from a template, the first create from the result, and
    /// (with --store) its pull by a second host.
    Build(build::BuildBenchArgs),
    /// The userfaultfd page server of Firecracker restores: faults answered a second, and the
    /// prefetcher's rate against a plain copy (needs root).
    Uffd(uffd::UffdBenchArgs),
    /// The Firecracker backend's phases against a real Firecracker: boot, pause, Full and Diff
    /// snapshots kept as layers, restore through the page server, destroy (needs root, KVM).
    Firecracker(firecracker::FirecrackerBenchArgs),
}

fn main() {
    let command = BenchCommand::parse();
    wrenn_core::logging::log_to_stderr("WRENN_LOG", "info");
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(command)));
    if let Err(error) = outcome {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

/// A port free now on every address, for a child the benchmark starts soon after. Chosen below
/// the kernel's ephemeral range (32768 and up by default) from a place that differs per process
/// and per call: a port the OS hands out from that range can be taken by any outgoing connection
/// in between (as one was, on a tap's address, under an agent's metadata listener).
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const PORTS: std::ops::Range<u16> = 20_000..32_000;
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORTS.end - PORTS.start);
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(613));
    (0..span)
        .map(|step| PORTS.start + (start.wrapping_add(step) % span) as u16)
        .find(|port| std::net::TcpListener::bind(("0.0.0.0", *port)).is_ok())
        .ok_or_else(|| anyhow::anyhow!("no free port in {PORTS:?}"))
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
        BenchCommand::Events(args) => events::run(args).await,
        BenchCommand::Telemetry(args) => telemetry::run(args).await,
        BenchCommand::Boot(args) => sandbox::boot(args).await,
        BenchCommand::Api(args) => api::run(args).await,
        BenchCommand::Sandbox(args) => sandbox::sandbox(args).await,
        BenchCommand::Tls(args) => tls::run(args).await,
        BenchCommand::Replicas(args) => replicas::run(args).await,
        BenchCommand::Slots(args) => slots::run(args).await,
        BenchCommand::Snapshot(args) => snapshot::run(args).await,
        BenchCommand::Build(args) => build::run(args).await,
        BenchCommand::Egress(args) => egress::run_bench(args).await,
        BenchCommand::Uffd(args) => uffd::run(args).await,
        BenchCommand::Firecracker(args) => firecracker::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        BenchCommand::command().debug_assert();
    }
}
