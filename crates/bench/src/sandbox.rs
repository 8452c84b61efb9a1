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
    pub(super) image_dir: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub(super) accel: AccelSetting,
    #[arg(long, default_value_t = 512)]
    pub(super) memory_mib: u32,
    #[arg(long)]
    pub(super) json: bool,
}

impl GuestArgs {
    /// `--accel` as `wrenn agent serve` takes it.
    pub(super) fn accel_name(&self) -> &'static str {
        match self.accel {
            AccelSetting::Auto => "auto",
            AccelSetting::Kvm => "kvm",
            AccelSetting::Tcg => "tcg",
        }
    }
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
    /// The agent's warm pool (VMMs waiting per template; 0: every create starts its VMM).
    #[arg(long, default_value_t = 2)]
    warm_pool: u32,
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
            memory: Default::default(),
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

/// The host memory of idle sandboxes' VMMs (from `/proc/<pid>/smaps_rollup`), in MiB.
#[derive(Debug, Default, Serialize)]
struct IdleMemory {
    vmms: usize,
    /// Resident memory, summed: pages shared between VMMs counted in each.
    rss_mib: f64,
    /// Proportional: a page shared by n VMMs counts 1/n in each; the sum is what they take.
    pss_mib: f64,
    /// Of the resident memory, pages mapped by more than one process (a template's memory).
    shared_mib: f64,
    /// Pages of each VMM's own (its writes, its device memory).
    private_mib: f64,
}

impl IdleMemory {
    fn of(pids: impl Iterator<Item = u32>) -> IdleMemory {
        let mut memory = IdleMemory::default();
        for pid in pids {
            let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
                continue;
            };
            memory.vmms += 1;
            for line in rollup.lines() {
                let mut words = line.split_whitespace();
                let (Some(key), Some(kib)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(kib) = kib.parse::<f64>() else {
                    continue;
                };
                let mib = kib / 1024.0;
                match key {
                    "Rss:" => memory.rss_mib += mib,
                    "Pss:" => memory.pss_mib += mib,
                    "Shared_Clean:" | "Shared_Dirty:" => memory.shared_mib += mib,
                    "Private_Clean:" | "Private_Dirty:" => memory.private_mib += mib,
                    _ => {}
                }
            }
        }
        memory
    }
}

/// QEMU restores started by hand, without an agent: the floor creates are measured against.
struct BareRestores<'a> {
    qemu: &'a Qemu,
    slot: &'a wrenn_agent::network::Slot,
    work: &'a std::path::Path,
}

impl BareRestores<'_> {
    fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.slot.address.into(), wrenn_image::ENVD_PORT)
    }

    /// A restore of `snapshot` into `machine` (on a new overlay of its disk) until envd
    /// answers: how long it took.
    async fn restore(
        &self,
        machine: &MachineSpec,
        snapshot: &wrenn_vmm::SnapshotFiles,
        run: &str,
    ) -> anyhow::Result<Duration> {
        let disk = self.work.join(format!("disk-{run}.qcow2"));
        overlay(&machine.disk, "qcow2", &disk)?;
        let machine = MachineSpec {
            disk: disk.clone(),
            netns: Some(self.slot.netns.clone()),
            ..machine.clone()
        };
        let started = Instant::now();
        let vm = self
            .qemu
            .restore(&machine, snapshot, &self.work.join(format!("vm-{run}")))
            .await?;
        let ready =
            wrenn_agent::envd_client::wait_ready(self.address(), Duration::from_secs(60), || {
                vm.is_alive()
            })
            .await;
        let took = started.elapsed();
        self.qemu.destroy(&vm).await?;
        ready?;
        let _ = std::fs::remove_file(&disk);
        self.reset_tap();
        Ok(took)
    }

    /// The next restore gets a clean tap, as an agent's recycled slot does.
    fn reset_tap(&self) {
        for state in ["down", "up"] {
            let _ = std::process::Command::new("ip")
                .args(["-n", &self.slot.netns, "link", "set", "tap0", state])
                .status();
        }
    }

    /// The template's guest as a classic snapshot (its memory in the stream), with the disk it
    /// goes with: a restore of it, paused and written whole.
    async fn classic_snapshot(
        &self,
        machine: &MachineSpec,
        snapshot: &wrenn_vmm::SnapshotFiles,
    ) -> anyhow::Result<(MachineSpec, wrenn_vmm::SnapshotFiles)> {
        let disk = self.work.join("classic.qcow2");
        overlay(&machine.disk, "qcow2", &disk)?;
        let restored = MachineSpec {
            disk: disk.clone(),
            netns: Some(self.slot.netns.clone()),
            ..machine.clone()
        };
        let vm = self
            .qemu
            .restore(&restored, snapshot, &self.work.join("vm-classic"))
            .await?;
        let written = async {
            wrenn_agent::envd_client::wait_ready(self.address(), Duration::from_secs(60), || {
                vm.is_alive()
            })
            .await?;
            self.qemu.pause(&vm).await?;
            anyhow::Ok(
                self.qemu
                    .snapshot(&vm, &self.work.join("classic.snap"))
                    .await?,
            )
        }
        .await;
        self.qemu.destroy(&vm).await?;
        self.reset_tap();
        let classic = MachineSpec {
            disk,
            memory: wrenn_vmm::GuestMemory::Anonymous,
            ..machine.clone()
        };
        Ok((classic, written?))
    }
}

/// How one start of the agent ended.
enum Spawned {
    /// Its API takes connections.
    Ready {
        child: std::process::Child,
        data: tempfile::TempDir,
        port: u16,
        token: &'static str,
    },
    /// It exited before that.
    Exited(std::process::ExitStatus),
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

    /// An agent on its own slots (`slot_prefix`, from `first_slot`), its sandbox proxy on a
    /// port of its own, with `extra` arguments.
    pub(super) fn start_with(
        guest: &GuestArgs,
        slot_prefix: &str,
        first_slot: u32,
        extra: &[String],
    ) -> anyhow::Result<BenchAgent> {
        // Ports are picked by binding and letting go, so another process can take one before
        // the agent binds it: an agent that exits while starting is started again on others.
        const ATTEMPTS: u32 = 4;
        let mut attempt = 1;
        let (child, data, port, token) = loop {
            match Self::spawn_once(guest, slot_prefix, first_slot, extra)? {
                Spawned::Ready {
                    child,
                    data,
                    port,
                    token,
                } => break (child, data, port, token),
                Spawned::Exited(status) if attempt < ATTEMPTS => {
                    eprintln!(
                        "the agent exited while starting ({status}), likely on a port taken \
                         meanwhile; starting it again on other ports"
                    );
                    attempt += 1;
                }
                Spawned::Exited(status) => {
                    anyhow::bail!("the agent exited while starting, {ATTEMPTS} times: {status}")
                }
            }
        };
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

    /// Starts the agent once on freshly picked ports and waits until its API takes connections
    /// or it exits.
    fn spawn_once(
        guest: &GuestArgs,
        slot_prefix: &str,
        first_slot: u32,
        extra: &[String],
    ) -> anyhow::Result<Spawned> {
        let proxy_port = super::free_port()?;
        let port = super::free_port()?;
        let mmds_port = super::free_port()?;
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
            // The other benches measure without warm VMMs, whose refills would land in them.
            .args(if extra.iter().any(|arg| arg == "--warm-pool") {
                &[][..]
            } else {
                &["--warm-pool", "0"][..]
            })
            .arg("--accel")
            .arg(guest.accel_name())
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
        let mut child = command.spawn().context("starting the agent")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait()? {
                return Ok(Spawned::Exited(status));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the agent did not start within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Spawned::Ready {
            child,
            data,
            port,
            token,
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
        Ok(self.create_phased(template, id).await?.0)
    }

    /// A sandbox `id` of `template`: how long the create took, and the agent's answer (the
    /// time of each of its phases).
    async fn create_phased(
        &self,
        template: &str,
        id: String,
    ) -> anyhow::Result<(Duration, pb::CreateSandboxResponse)> {
        let started = Instant::now();
        let created: pb::CreateSandboxResponse = self
            .call::<host_agent::CreateSandbox>(&pb::CreateSandboxRequest {
                template_id: template.into(),
                sandbox_id: id,
                ..Default::default()
            })
            .await?;
        Ok((started.elapsed(), created))
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
    let agent = BenchAgent::start_with(
        &args.guest,
        "wbs",
        1000,
        &["--warm-pool".to_string(), args.warm_pool.to_string()],
    )?;
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
    let bare = BareRestores {
        qemu: &qemu,
        slot: &slot,
        work: work.path(),
    };
    // The template's memory, mapped as the agent maps it (when it is a file).
    let memory = match &record.snapshot.ram {
        Some(ram) => wrenn_vmm::GuestMemory::Private(std::sync::Arc::new(wrenn_vmm::memory::load(
            ram, "bench",
        )?)),
        None => wrenn_vmm::GuestMemory::Anonymous,
    };
    let template_machine = MachineSpec {
        memory,
        ..record.machine.clone()
    };
    // The same guest as a classic snapshot, its memory in the stream: a restore of the
    // template, paused and written whole.
    let classic = match &record.snapshot.ram {
        Some(_) => Some(
            bare.classic_snapshot(&template_machine, &record.snapshot)
                .await?,
        ),
        None => None,
    };
    let mut raw = Vec::new();
    let mut raw_classic = Vec::new();
    let mut sequential = Vec::new();
    // prepare (disk, slot), restore, envd ready, /init, the rest (records, the API).
    let mut phase_samples: [Vec<Duration>; 5] = Default::default();
    let mut warm_creates = 0;
    for run in 0..args.sequential {
        raw.push(
            bare.restore(&template_machine, &record.snapshot, &format!("{run}"))
                .await?,
        );
        if let Some((machine, snapshot)) = &classic {
            raw_classic.push(
                bare.restore(machine, snapshot, &format!("classic-{run}"))
                    .await?,
            );
        }
        let id = format!("seq-{run}");
        let (took, created) = agent.create_phased("bench", id.clone()).await?;
        sequential.push(took);
        let phases = [
            created.prepare_ms,
            created.restore_ms,
            created.ready_ms,
            created.init_ms,
        ];
        let rest = took.saturating_sub(Duration::from_millis(phases.iter().sum()));
        for (samples, ms) in phase_samples.iter_mut().zip(phases) {
            samples.push(Duration::from_millis(ms));
        }
        phase_samples[4].push(rest);
        if created.warm {
            warm_creates += 1;
        }
        agent.destroy(id).await?;
        // The pool refills in the background: not during the next bare restore.
        if args.warm_pool > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    pool.delete_all().await;

    eprintln!("{} concurrent creates ...", args.concurrent);
    let creates = (0..args.concurrent).map(|run| agent.create(format!("con-{run}")));
    let mut concurrent = Vec::new();
    let mut concurrent_errors = Vec::new();
    for (run, created) in futures_util::future::join_all(creates)
        .await
        .into_iter()
        .enumerate()
    {
        match created {
            Ok(took) => {
                concurrent.push(took);
                agent.destroy(format!("con-{run}")).await?;
            }
            Err(error) => concurrent_errors.push(error.to_string()),
        }
    }
    for error in &concurrent_errors {
        eprintln!("a concurrent create failed: {error}");
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
    let listed = agent
        .call::<host_agent::ListSandboxes>(&pb::ListSandboxesRequest {})
        .await?;
    let idle_memory = IdleMemory::of(listed.sandboxes.iter().map(|sandbox| sandbox.pid));
    for run in 0..args.idle {
        agent.destroy(format!("idle-{run}")).await?;
    }

    let phases: Vec<Latency> = phase_samples
        .iter()
        .map(|samples| latency(samples))
        .collect();
    let raw = latency(&raw);
    let raw_classic = (!raw_classic.is_empty()).then(|| latency(&raw_classic));
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
                "bare_qemu_restore": raw, "bare_qemu_restore_classic": raw_classic, "create_sequential": sequential, "create_concurrent": concurrent, "create_concurrent_errors": concurrent_errors.len(),
                "agent_overhead_p50_percent": overhead_percent, "pause": pauses, "resume": resumes,
                "idle_sandboxes": info.sandboxes_running, "agent_rss_mib": agent_rss_mib,
                "idle_vmm_memory": idle_memory,
                "warm_pool": args.warm_pool, "warm_creates": warm_creates,
                "create_phases": {
                    "prepare": phases[0], "restore": phases[1], "ready": phases[2],
                    "init": phases[3], "rest": phases[4],
                },
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
        let at_once = format!("create via agent ({} at once)", args.concurrent);
        let mut rows = vec![("bare QEMU restore → /health", &raw)];
        if let Some(classic) = &raw_classic {
            rows.push(("bare QEMU restore, memory read whole", classic));
        }
        rows.extend([
            ("create via agent (sequential)", &sequential),
            ("  its disk and slot", &phases[0]),
            ("  its restore", &phases[1]),
            ("  envd ready after it", &phases[2]),
            ("  envd /init", &phases[3]),
            ("  the rest (records, API)", &phases[4]),
            (at_once.as_str(), &concurrent),
            ("pause", &pauses),
            ("resume", &resumes),
        ]);
        println!("{}", latency_table(&rows));
        println!(
            "warm pool of {}: {warm_creates} of the {} sequential creates took a warm VMM",
            args.warm_pool, args.sequential
        );
        println!(
            "{} of the {} concurrent creates failed",
            concurrent_errors.len(),
            args.concurrent
        );
        println!("agent overhead over the bare restore at p50: {overhead_percent:+.1} %");
        println!(
            "agent resident memory with {} sandboxes: {agent_rss_mib:.1} MiB",
            info.sandboxes_running
        );
        println!(
            "their {} VMMs: {:.0} MiB proportional (Pss), {:.0} MiB resident of which {:.0} MiB \
             shared between them and {:.0} MiB their own",
            idle_memory.vmms,
            idle_memory.pss_mib,
            idle_memory.rss_mib,
            idle_memory.shared_mib,
            idle_memory.private_mib
        );
    }
    Ok(())
}
