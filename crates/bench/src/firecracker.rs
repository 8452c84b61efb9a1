//! `wrenn-bench firecracker`: the Firecracker backend's phases against a real Firecracker (built
//! from its public source; `--firecracker`) and a kernel (`--kernel`): boot (process, API,
//! configuration, `InstanceStart`), pause, a Full snapshot kept as a layered memory file, a
//! restore (a fresh process, then the load through the page server and the resume), the time
//! until the prefetcher has every page in, a Diff snapshot, and destroy. These are the VMM's
//! phases of `wrenn-bench sandbox`'s create, pause and resume; the guest's own part (envd's
//! readiness) needs a KVM host where the guest runs at speed. Needs root (a network namespace)
//! and `/dev/kvm`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use wrenn_vmm::firecracker::{Firecracker, FirecrackerOptions};
use wrenn_vmm::layers::LayerHeader;
use wrenn_vmm::{GuestMemory, MachineSpec, Vmm};

use super::report::{median, table};

#[derive(Debug, Args)]
pub struct FirecrackerBenchArgs {
    /// The firecracker binary.
    #[arg(long, env = "FIRECRACKER_BIN")]
    firecracker: PathBuf,
    /// An uncompressed x86_64 vmlinux.
    #[arg(long, env = "FIRECRACKER_KERNEL")]
    kernel: PathBuf,
    /// Guest memory, in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// How long the guest runs after its boot before the first pause, in milliseconds (what it
    /// touches is what the Full snapshot stores).
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Phases {
    boot_ms: Vec<f64>,
    pause_ms: Vec<f64>,
    full_snapshot_ms: Vec<f64>,
    start_restore_ms: Vec<f64>,
    finish_restore_ms: Vec<f64>,
    resident_ms: Vec<f64>,
    diff_snapshot_ms: Vec<f64>,
    destroy_ms: Vec<f64>,
    full_stored_mib: Vec<f64>,
    diff_layer_kib: Vec<f64>,
}

fn ms(took: Duration) -> f64 {
    took.as_secs_f64() * 1000.0
}

/// A namespace with a tap, removed when dropped.
struct Namespace(String);

impl Namespace {
    fn new() -> anyhow::Result<Self> {
        let name = format!("wrenn-fcb{}", std::process::id());
        let ip = |arguments: &[&str]| -> anyhow::Result<()> {
            let status = Command::new("ip").args(arguments).status()?;
            anyhow::ensure!(status.success(), "ip {arguments:?} failed");
            Ok(())
        };
        ip(&["netns", "add", &name])?;
        let namespace = Namespace(name.clone());
        ip(&[
            "-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr",
        ])?;
        ip(&["-n", &name, "link", "set", "tap0", "up"])?;
        Ok(namespace)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub async fn run(args: FirecrackerBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "wrenn-bench firecracker needs root (a network namespace and a tap)"
    );
    let namespace = Namespace::new()?;
    let root = tempfile::tempdir()?;
    let firecracker = Firecracker::new(&args.firecracker, FirecrackerOptions::default());
    let mut phases = Phases::default();
    for run in 0..args.runs {
        eprintln!("run {} of {} ...", run + 1, args.runs);
        let dir = root.path().join(format!("run-{run}"));
        std::fs::create_dir(&dir)?;
        let disk = dir.join("disk.raw");
        std::fs::File::create(&disk)?.set_len(64 << 20)?;
        let machine = MachineSpec {
            kernel: args.kernel.clone(),
            initrd: None,
            cmdline: "console=ttyS0 reboot=k panic=1 pci=off".into(),
            disk: disk.clone(),
            memory_mib: args.memory_mib,
            vcpus: 1,
            netns: Some(namespace.0.clone()),
            tap: "tap0".into(),
            mac: "02:fc:00:00:00:05".into(),
            vmm_user: None,
            memory: GuestMemory::Anonymous,
        };
        let started = Instant::now();
        let vm = firecracker.boot(&machine, &dir.join("boot")).await?;
        phases.boot_ms.push(ms(started.elapsed()));
        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        let started = Instant::now();
        firecracker.pause(&vm).await?;
        phases.pause_ms.push(ms(started.elapsed()));
        let started = Instant::now();
        let full = firecracker.snapshot(&vm, &dir.join("full.state")).await?;
        phases.full_snapshot_ms.push(ms(started.elapsed()));
        let header = LayerHeader::read(full.ram.as_ref().expect("a memory header"))?;
        phases.full_stored_mib.push(
            (header.stored_blocks() * u64::from(header.block_bytes)) as f64 / (1 << 20) as f64,
        );
        let started = Instant::now();
        firecracker.destroy(&vm).await?;
        phases.destroy_ms.push(ms(started.elapsed()));

        let restored = MachineSpec {
            disk: dir.join("disk-2.raw"),
            ..machine.clone()
        };
        std::fs::copy(&disk, &restored.disk)?;
        let workdir = dir.join("restore");
        let started = Instant::now();
        let vm = firecracker
            .start_restore(&restored, &full, &workdir)
            .await?;
        phases.start_restore_ms.push(ms(started.elapsed()));
        let started = Instant::now();
        firecracker.finish_restore(&vm, &full).await?;
        let loaded = started.elapsed();
        phases.finish_restore_ms.push(ms(loaded));
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let stats = firecracker.page_server_stats(&vm);
            if let Some(resident) = stats.and_then(|stats| stats.resident_after) {
                phases.resident_ms.push(ms(resident));
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the prefetch did not end: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        firecracker.pause(&vm).await?;
        let started = Instant::now();
        let diff = firecracker.snapshot(&vm, &dir.join("diff.state")).await?;
        phases.diff_snapshot_ms.push(ms(started.elapsed()));
        let diff_layer =
            std::fs::metadata(wrenn_vmm::layers::layer_path(&dir.join("diff.state"), 1))?.len();
        phases.diff_layer_kib.push(diff_layer as f64 / 1024.0);
        drop(diff);
        firecracker.destroy(&vm).await?;
        std::fs::remove_dir_all(&dir)?;
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&phases)?);
        return Ok(());
    }
    let mut out = table(vec!["phase", "runs", "median", "min", "max"]);
    let row = |name: &str, samples: &[f64], unit: &str| {
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(0.0, f64::max);
        vec![
            name.to_string(),
            samples.len().to_string(),
            format!("{:.1} {unit}", median(samples)),
            format!("{min:.1} {unit}"),
            format!("{max:.1} {unit}"),
        ]
    };
    out.add_row(row(
        "boot (process, API, configuration, start)",
        &phases.boot_ms,
        "ms",
    ));
    out.add_row(row("pause", &phases.pause_ms, "ms"));
    out.add_row(row(
        "Full snapshot, kept as layers",
        &phases.full_snapshot_ms,
        "ms",
    ));
    out.add_row(row("  memory stored", &phases.full_stored_mib, "MiB"));
    out.add_row(row(
        "restore: a fresh Firecracker",
        &phases.start_restore_ms,
        "ms",
    ));
    out.add_row(row(
        "restore: load through the page server, resume",
        &phases.finish_restore_ms,
        "ms",
    ));
    out.add_row(row(
        "  every page in (from the handshake)",
        &phases.resident_ms,
        "ms",
    ));
    out.add_row(row(
        "Diff snapshot, kept as a layer",
        &phases.diff_snapshot_ms,
        "ms",
    ));
    out.add_row(row("  the Diff's layer", &phases.diff_layer_kib, "KiB"));
    out.add_row(row("destroy", &phases.destroy_ms, "ms"));
    println!("{out}");
    println!(
        "guest: {} MiB, {} vCPU, ran {} ms before its pause",
        args.memory_mib, 1, args.settle_ms
    );
    Ok(())
}
