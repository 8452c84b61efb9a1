//! `wrenn-bench boot` and `wrenn bench sandbox`: real QEMU VMs from the built image.
//! - boot: the image booted cold, QEMU start to envd's `/health` (the floor of template builds);
//! - sandbox: a `wrenn agent serve` process of its own; create-from-template latency through its
//!   API (request to envd answering after `/init`), sequential and concurrent, beside a bare QEMU
//!   restore of the same template snapshot measured in the same run (QEMU start to `/health`);
//!   pause and resume latency; the agent's resident memory with many sandboxes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use http::HeaderMap;
use serde::Serialize;
use wrenn_agent::network::{GUEST_MAC, SlotConfig, SlotPool};
use wrenn_agent::store::TemplateRecord;
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;
use wrenn_vmm::accel::AccelSetting;
use wrenn_vmm::qemu::Qemu;
use wrenn_vmm::{MachineSpec, Vmm};

use super::report::{ms, quantile, table};

/// The guests both benchmarks boot, and how they report.
#[derive(Debug, Args)]
pub struct GuestArgs {
    #[arg(long, env = "WRENN_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    accel: AccelSetting,
    #[arg(long, default_value_t = 512)]
    pub(super) memory_mib: u32,
    #[arg(long)]
    pub(super) json: bool,
}

#[derive(Debug, Args)]
pub struct BootBenchArgs {
    /// Boots to measure.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[command(flatten)]
    guest: GuestArgs,
}

#[derive(Debug, Args)]
pub struct SandboxBenchArgs {
    /// Sequential creates measured.
    #[arg(long, default_value_t = 20)]
    sequential: usize,
    /// Creates started at once.
    #[arg(long, default_value_t = 10)]
    concurrent: usize,
    /// Sandboxes kept running to measure the agent's memory.
    #[arg(long, default_value_t = 20)]
    idle: usize,
    /// Pause + resume cycles measured.
    #[arg(long, default_value_t = 5)]
    pauses: usize,
    #[command(flatten)]
    guest: GuestArgs,
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Latency {
    pub(super) runs: usize,
    pub(super) p50_ms: f64,
    pub(super) p95_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

pub(super) fn latency(samples: &[Duration]) -> Latency {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Latency {
        runs: ms.len(),
        p50_ms: quantile(&ms, 0.5),
        p95_ms: quantile(&ms, 0.95),
        min_ms: ms.first().copied().unwrap_or(f64::NAN),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
    }
}

/// A table of latencies: a row of each measure's figures.
pub(super) fn latency_table(rows: &[(&str, &Latency)]) -> comfy_table::Table {
    let mut table = table(["measure", "runs", "p50", "p95", "min", "max"]);
    for (name, figures) in rows {
        let quantiles = [
            figures.p50_ms,
            figures.p95_ms,
            figures.min_ms,
            figures.max_ms,
        ];
        let head = [name.to_string(), figures.runs.to_string()];
        table.add_row(head.into_iter().chain(quantiles.map(|q| ms(q, 0))));
    }
    table
}

fn overlay(
    backing: &std::path::Path,
    format: &str,
    target: &std::path::Path,
) -> anyhow::Result<()> {
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(target)
        .status()?;
    anyhow::ensure!(status.success(), "qemu-img create failed");
    Ok(())
}

pub async fn boot(args: BootBenchArgs) -> anyhow::Result<()> {
    let image = args
        .guest
        .image_dir
        .unwrap_or_else(wrenn_image::default_image_dir);
    let manifest = wrenn_image::Manifest::read(&image)
        .context("reading the image (run `wrenn image build`)")?;
    let work = tempfile::tempdir()?;
    let accel = wrenn_vmm::accel::resolve(
        args.guest.accel,
        "qemu-system-x86_64".as_ref(),
        &image.join("vmlinuz"),
        None,
    )
    .await;
    let qemu = Qemu::new("qemu-system-x86_64", accel);
    let pool = SlotPool::new(SlotConfig {
        prefix: "wbboot".into(),
        first_index: 900,
        capacity: 1,
        mmds_port: 9,
        opened_ranges: Vec::new(),
        upstream_dns: None,
        egress_authorities: None,
    })?;
    let slot = pool.lease(&wrenn_agent::firewall::Egress::Closed).await?;
    let mut samples = Vec::new();
    for run in 0..args.runs {
        let disk = work.path().join(format!("disk-{run}.qcow2"));
        overlay(&image.join("rootfs.ext4"), "raw", &disk)?;
        let machine = MachineSpec {
            kernel: image.join("vmlinuz"),
            initrd: Some(image.join("initrd.img")),
            cmdline: manifest.kernel.cmdline.clone(),
            disk: disk.clone(),
            memory_mib: args.guest.memory_mib,
            vcpus: 1,
            netns: Some(slot.netns.clone()),
            tap: "tap0".into(),
            mac: GUEST_MAC.into(),
            vmm_user: None,
        };
        let started = Instant::now();
        let vm = qemu
            .boot(&machine, &work.path().join(format!("vm-{run}")))
            .await?;
        let address = std::net::SocketAddr::new(slot.address.into(), wrenn_image::ENVD_PORT);
        let ready = wrenn_agent::envd_client::wait_ready(address, Duration::from_secs(300), || {
            vm.is_alive()
        })
        .await;
        let elapsed = started.elapsed();
        qemu.destroy(&vm).await?;
        ready?;
        eprintln!("boot {}: {:.2} s", run + 1, elapsed.as_secs_f64());
        samples.push(elapsed);
        let _ = std::fs::remove_file(&disk);
    }
    pool.delete_all().await;
    let figures = latency(&samples);
    if args.guest.json {
        println!(
            "{}",
            serde_json::json!({ "accel": accel.as_str(), "memory_mib": args.guest.memory_mib, "boot_to_health": figures })
        );
    } else {
        println!(
            "accel {}, {} MiB guest",
            accel.as_str(),
            args.guest.memory_mib
        );
        println!("{}", latency_table(&[("boot → envd /health", &figures)]));
    }
    Ok(())
}

/// A `wrenn agent serve` child process for the benchmark.
pub(super) struct BenchAgent {
    child: std::process::Child,
    data: tempfile::TempDir,
    client: ConnectClient,
}

impl BenchAgent {
    /// Builds the benchmarks' template `bench` (one cold boot) with `memory_mib` and one vCPU.
    pub(super) async fn build_template(
        &self,
        memory_mib: u32,
    ) -> anyhow::Result<pb::BuildTemplateResponse> {
        eprintln!("building the template (one cold boot) ...");
        self.call::<host_agent::BuildTemplate>(&pb::BuildTemplateRequest {
            template_id: "bench".into(),
            memory_mib,
            vcpus: 1,
            ..Default::default()
        })
        .await
    }

    pub(super) fn start(guest: &GuestArgs) -> anyhow::Result<BenchAgent> {
        Self::start_with(guest, "wbs", 1000, &[])
    }

    /// An agent on its own slots (`slot_prefix`, from `first_slot`), its sandbox proxy on a
    /// port of its own, with `extra` arguments.
    pub(super) fn start_with(
        guest: &GuestArgs,
        slot_prefix: &str,
        first_slot: u32,
        extra: &[String],
    ) -> anyhow::Result<BenchAgent> {
        let proxy_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mmds_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data = tempfile::tempdir()?;
        let token = "bench-token";
        let mut command = std::process::Command::new(super::wrenn_binary()?);
        command
            .args([
                "agent",
                "serve",
                "--no-internet",
                "--cleanup-on-exit",
                "--slot-prefix",
                slot_prefix,
            ])
            .args([
                "--first-slot",
                &first_slot.to_string(),
                "--slots",
                "64",
                "--slots-ahead",
                "12",
                "--proxy-listen",
                &format!("127.0.0.1:{proxy_port}"),
            ])
            .args(extra)
            .arg("--accel")
            .arg(match guest.accel {
                AccelSetting::Auto => "auto",
                AccelSetting::Kvm => "kvm",
                AccelSetting::Tcg => "tcg",
            })
            .arg("--data-dir")
            .arg(data.path())
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--mmds-port",
                &mmds_port.to_string(),
            ])
            .env("WRENN_AGENT_TOKEN", token)
            .env("WRENN_LOG", "warn")
            .stdin(std::process::Stdio::null());
        if let Some(image) = &guest.image_dir {
            command.arg("--image-dir").arg(image);
        }
        let child = command.spawn().context("starting the agent")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the agent did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let client = ConnectClient::new(
            format!("http://127.0.0.1:{port}"),
            HttpVersion::Http1,
            Codec::Proto,
        )
        .with_header("authorization", &format!("Bearer {token}"));
        Ok(BenchAgent {
            child,
            data,
            client,
        })
    }

    pub(super) async fn call<M>(&self, request: &M::Request) -> anyhow::Result<M::Response>
    where
        M: wrenn_proto::Rpc,
        M::Request: wrenn_connect::Message,
        M::Response: wrenn_connect::Message,
    {
        self.client
            .call::<M>(request, &HeaderMap::new())
            .await
            .map_err(|error| anyhow::anyhow!("{}: {error}", M::PATH))
    }

    async fn create(&self, id: String) -> anyhow::Result<Duration> {
        self.create_from("bench", id).await
    }

    /// A sandbox `id` of `template`: how long the create took.
    pub(super) async fn create_from(&self, template: &str, id: String) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let _: pb::CreateSandboxResponse = self
            .call::<host_agent::CreateSandbox>(&pb::CreateSandboxRequest {
                template_id: template.into(),
                sandbox_id: id,
                ..Default::default()
            })
            .await?;
        Ok(started.elapsed())
    }

    /// The agent's Connect client.
    pub(super) fn client(&self) -> &ConnectClient {
        &self.client
    }

    pub(super) async fn destroy(&self, id: String) -> anyhow::Result<()> {
        let _: pb::DestroySandboxResponse = self
            .call::<host_agent::DestroySandbox>(&pb::DestroySandboxRequest { sandbox_id: id })
            .await?;
        Ok(())
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

pub async fn sandbox(args: SandboxBenchArgs) -> anyhow::Result<()> {
    let agent = BenchAgent::start(&args.guest)?;
    let built = agent.build_template(args.guest.memory_mib).await?;
    let template = built.template.context("no template")?;
    let record: TemplateRecord = serde_json::from_slice(&std::fs::read(
        agent.data.path().join("templates/bench/template.json"),
    )?)?;

    // The floor: QEMU restoring the same snapshot, started by hand, until envd answers. Bare
    // restores and creates through the agent alternate, so both see the same machine load.
    eprintln!("bare QEMU restores and sequential creates through the agent, alternating ...");
    let qemu = Qemu::new("qemu-system-x86_64", record.accel);
    let pool = SlotPool::new(SlotConfig {
        prefix: "wbraw".into(),
        first_index: 1100,
        capacity: 1,
        mmds_port: 9,
        opened_ranges: Vec::new(),
        upstream_dns: None,
        egress_authorities: None,
    })?;
    let slot = pool.lease(&wrenn_agent::firewall::Egress::Closed).await?;
    let work = tempfile::tempdir()?;
    let mut raw = Vec::new();
    let mut sequential = Vec::new();
    for run in 0..args.sequential {
        let disk = work.path().join(format!("disk-{run}.qcow2"));
        overlay(&record.machine.disk, "qcow2", &disk)?;
        let machine = MachineSpec {
            disk: disk.clone(),
            netns: Some(slot.netns.clone()),
            ..record.machine.clone()
        };
        let started = Instant::now();
        let vm = qemu
            .restore(
                &machine,
                &record.snapshot,
                &work.path().join(format!("vm-{run}")),
            )
            .await?;
        let address = std::net::SocketAddr::new(slot.address.into(), wrenn_image::ENVD_PORT);
        let ready = wrenn_agent::envd_client::wait_ready(address, Duration::from_secs(60), || {
            vm.is_alive()
        })
        .await;
        raw.push(started.elapsed());
        qemu.destroy(&vm).await?;
        ready?;
        let _ = std::fs::remove_file(&disk);
        // The next restore gets a clean tap, as an agent's recycled slot does.
        let _ = std::process::Command::new("ip")
            .args(["-n", &slot.netns, "link", "set", "tap0", "down"])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["-n", &slot.netns, "link", "set", "tap0", "up"])
            .status();

        let id = format!("seq-{run}");
        sequential.push(agent.create(id.clone()).await?);
        agent.destroy(id).await?;
    }
    pool.delete_all().await;

    eprintln!("{} concurrent creates ...", args.concurrent);
    let creates = (0..args.concurrent).map(|run| agent.create(format!("con-{run}")));
    let concurrent: Vec<Duration> = futures_util::future::try_join_all(creates).await?;
    for run in 0..args.concurrent {
        agent.destroy(format!("con-{run}")).await?;
    }

    eprintln!("pause and resume ...");
    agent.create("pauser".into()).await?;
    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..args.pauses {
        let started = Instant::now();
        let _: pb::PauseSandboxResponse = agent
            .call::<host_agent::PauseSandbox>(&pb::PauseSandboxRequest {
                sandbox_id: "pauser".into(),
                ..Default::default()
            })
            .await?;
        pauses.push(started.elapsed());
        let started = Instant::now();
        let _: pb::ResumeSandboxResponse = agent
            .call::<host_agent::ResumeSandbox>(&pb::ResumeSandboxRequest {
                sandbox_id: "pauser".into(),
                ..Default::default()
            })
            .await?;
        resumes.push(started.elapsed());
    }
    agent.destroy("pauser".into()).await?;

    eprintln!("{} idle sandboxes ...", args.idle);
    for batch in (0..args.idle).collect::<Vec<_>>().chunks(5) {
        let creates = batch.iter().map(|run| agent.create(format!("idle-{run}")));
        futures_util::future::try_join_all(creates).await?;
    }
    let info = agent
        .call::<host_agent::HostInfo>(&pb::HostInfoRequest {})
        .await?
        .report
        .context("the agent's HostInfo carries no report")?;
    for run in 0..args.idle {
        agent.destroy(format!("idle-{run}")).await?;
    }

    let raw = latency(&raw);
    let sequential = latency(&sequential);
    let concurrent = latency(&concurrent);
    let pauses = latency(&pauses);
    let resumes = latency(&resumes);
    let overhead_percent = (sequential.p50_ms - raw.p50_ms) / raw.p50_ms * 100.0;
    let agent_rss_mib = info.agent_rss_bytes as f64 / f64::from(1u32 << 20);
    if args.guest.json {
        println!(
            "{}",
            serde_json::json!({
                "accel": template.accel, "memory_mib": template.memory_mib, "template_build_ms": template.build_ms,
                "snapshot_bytes": template.snapshot_bytes,
                "bare_qemu_restore": raw, "create_sequential": sequential, "create_concurrent": concurrent,
                "agent_overhead_p50_percent": overhead_percent, "pause": pauses, "resume": resumes,
                "idle_sandboxes": info.sandboxes_running, "agent_rss_mib": agent_rss_mib,
            })
        );
    } else {
        println!(
            "accel {}, {} MiB guests, template built in {:.1} s, snapshot {} MiB",
            template.accel,
            template.memory_mib,
            template.build_ms as f64 / 1000.0,
            template.snapshot_bytes >> 20
        );
        println!(
            "{}",
            latency_table(&[
                ("bare QEMU restore → /health", &raw),
                ("create via agent (sequential)", &sequential),
                (
                    &format!("create via agent ({} at once)", args.concurrent),
                    &concurrent
                ),
                ("pause", &pauses),
                ("resume", &resumes),
            ])
        );
        println!("agent overhead over the bare restore at p50: {overhead_percent:+.1} %");
        println!(
            "agent resident memory with {} sandboxes: {agent_rss_mib:.1} MiB",
            info.sandboxes_running
        );
    }
    Ok(())
}
