//! `wrenn-bench snapshot`: checkpoints of running sandboxes through a `wrenn agent serve` of its
//! own: a persistent snapshot's time (and how long the sandbox was stopped for it), a fork of 1
//! and of 10 (one checkpoint, then the creates, four at once as the control plane makes them),
//! the host memory of a fork against a fresh sandbox's (resident and proportional: pages shared
//! between VMs count once in the second), and a pause without memory and its resume (a boot)
//! against the memory pause and resume.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;

use super::report::table;
use super::sandbox::{BenchAgent, GuestArgs, Latency, latency, latency_table};

#[derive(Debug, Args)]
pub struct SnapshotBenchArgs {
    /// Persistent snapshots of one running sandbox measured.
    #[arg(long, default_value_t = 5)]
    snapshots: usize,
    /// Forks of 1 measured.
    #[arg(long, default_value_t = 3)]
    forks: usize,
    /// How many sandboxes the big fork makes.
    #[arg(long, default_value_t = 10)]
    fork_count: usize,
    /// Pause and resume cycles of each kind measured.
    #[arg(long, default_value_t = 3)]
    pauses: usize,
    #[command(flatten)]
    guest: GuestArgs,
}

/// A VMM's memory, in MiB: resident, and proportional (a page shared by n processes counts
/// 1/n).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Memory {
    rss_mib: f64,
    pss_mib: f64,
}

/// The memory of process `pid` from `/proc/<pid>/smaps_rollup`.
fn memory_of(pid: u32) -> anyhow::Result<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading the memory of process {pid}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(0.0)
    };
    Ok(Memory {
        rss_mib: field("Rss:"),
        pss_mib: field("Pss:"),
    })
}

/// The mean memory of the VMMs of `sandboxes`.
async fn mean_memory(agent: &BenchAgent, sandboxes: &[String]) -> anyhow::Result<Memory> {
    let mut total = Memory::default();
    for id in sandboxes {
        let got: pb::GetSandboxResponse = agent
            .call::<host_agent::GetSandbox>(&pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            })
            .await?;
        let pid = got.sandbox.context("no sandbox")?.pid;
        let memory = memory_of(pid)?;
        total.rss_mib += memory.rss_mib;
        total.pss_mib += memory.pss_mib;
    }
    let count = sandboxes.len().max(1) as f64;
    Ok(Memory {
        rss_mib: total.rss_mib / count,
        pss_mib: total.pss_mib / count,
    })
}

async fn checkpoint(
    agent: &BenchAgent,
    sandbox: &str,
    template: &str,
    ephemeral: bool,
) -> anyhow::Result<pb::CheckpointSandboxResponse> {
    agent
        .call::<host_agent::CheckpointSandbox>(&pb::CheckpointSandboxRequest {
            sandbox_id: sandbox.into(),
            template_id: template.into(),
            ephemeral,
        })
        .await
}

/// A fork of `count` sandboxes of `source` named `<name>-<n>`: one checkpoint, then the
/// creates, four at once: the wall time, and the forks' ids.
async fn fork(
    agent: &BenchAgent,
    source: &str,
    name: &str,
    count: usize,
) -> anyhow::Result<(Duration, Vec<String>)> {
    let started = Instant::now();
    let checkpoint_id = format!("{name}-checkpoint");
    checkpoint(agent, source, &checkpoint_id, true).await?;
    let ids: Vec<String> = (0..count).map(|n| format!("{name}-{n}")).collect();
    let creates = futures_util::stream::iter(ids.clone())
        .map(|id| agent.create_from(&checkpoint_id, id))
        .buffered(4)
        .collect::<Vec<_>>()
        .await;
    for created in creates {
        created?;
    }
    Ok((started.elapsed(), ids))
}

async fn pause(agent: &BenchAgent, id: &str, disk_only: bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let _: pb::PauseSandboxResponse = agent
        .call::<host_agent::PauseSandbox>(&pb::PauseSandboxRequest {
            sandbox_id: id.into(),
            disk_only,
        })
        .await?;
    Ok(started.elapsed())
}

async fn resume(agent: &BenchAgent, id: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let _: pb::ResumeSandboxResponse = agent
        .call::<host_agent::ResumeSandbox>(&pb::ResumeSandboxRequest {
            sandbox_id: id.into(),
            ..Default::default()
        })
        .await?;
    Ok(started.elapsed())
}

pub async fn run(args: SnapshotBenchArgs) -> anyhow::Result<()> {
    let agent = BenchAgent::start_with(&args.guest, "wbn", 1200, &[])?;
    agent.build_template(args.guest.memory_mib).await?;

    eprintln!("{} snapshots of a running sandbox ...", args.snapshots);
    agent.create_from("bench", "source".into()).await?;
    let (mut snapshots, mut stopped) = (Vec::new(), Vec::new());
    for n in 0..args.snapshots {
        let started = Instant::now();
        let made = checkpoint(&agent, "source", &format!("snap-{n}"), false).await?;
        snapshots.push(started.elapsed());
        stopped.push(Duration::from_millis(made.paused_ms));
    }
    let snapshot_bytes = checkpoint(&agent, "source", "snap-last", false)
        .await?
        .snapshot_bytes;

    eprintln!(
        "{} forks of 1, then a fork of {} ...",
        args.forks, args.fork_count
    );
    let mut forks_of_one = Vec::new();
    for n in 0..args.forks {
        let (took, ids) = fork(&agent, "source", &format!("one{n}"), 1).await?;
        forks_of_one.push(took);
        for id in ids {
            agent.destroy(id).await?;
        }
    }
    let (fork_of_many, many) = fork(&agent, "source", "many", args.fork_count).await?;
    // Settled: the forks' guests idle, as fresh sandboxes are measured idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fork_memory = mean_memory(&agent, &many).await?;
    for id in many {
        agent.destroy(id).await?;
    }
    let fresh: Vec<String> = (0..3).map(|n| format!("fresh-{n}")).collect();
    for id in &fresh {
        agent.create_from("bench", id.clone()).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fresh_memory = mean_memory(&agent, &fresh).await?;
    for id in fresh {
        agent.destroy(id).await?;
    }
    agent.destroy("source".into()).await?;

    eprintln!("pauses with and without memory, and their resumes ...");
    agent.create_from("bench", "pauser".into()).await?;
    let (mut memory_pauses, mut memory_resumes) = (Vec::new(), Vec::new());
    let (mut disk_pauses, mut disk_resumes) = (Vec::new(), Vec::new());
    for _ in 0..args.pauses {
        memory_pauses.push(pause(&agent, "pauser", false).await?);
        memory_resumes.push(resume(&agent, "pauser").await?);
        disk_pauses.push(pause(&agent, "pauser", true).await?);
        disk_resumes.push(resume(&agent, "pauser").await?);
    }
    agent.destroy("pauser".into()).await?;
    // Newest first: each snapshot's disk stands on the one before.
    let names = (0..args.snapshots)
        .map(|n| format!("snap-{n}"))
        .chain(["snap-last".to_string()]);
    for template_id in names.rev() {
        let _: pb::DeleteTemplateResponse = agent
            .call::<host_agent::DeleteTemplate>(&pb::DeleteTemplateRequest { template_id })
            .await?;
    }

    let figures: Vec<(String, Latency)> = vec![
        ("snapshot (whole)".into(), latency(&snapshots)),
        ("snapshot (sandbox stopped)".into(), latency(&stopped)),
        ("fork of 1 (wall)".into(), latency(&forks_of_one)),
        (
            format!("fork of {} (wall)", args.fork_count),
            latency(&[fork_of_many]),
        ),
        ("pause with memory".into(), latency(&memory_pauses)),
        ("resume with memory".into(), latency(&memory_resumes)),
        ("pause, disk only".into(), latency(&disk_pauses)),
        ("resume from disk (boot)".into(), latency(&disk_resumes)),
    ];
    if args.guest.json {
        let named: serde_json::Map<String, serde_json::Value> = figures
            .iter()
            .map(|(name, figures)| (name.clone(), serde_json::json!(figures)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "memory_mib": args.guest.memory_mib, "snapshot_bytes": snapshot_bytes,
                "latency": named, "fork_memory": fork_memory, "fresh_memory": fresh_memory,
            })
        );
    } else {
        println!(
            "{} MiB guests; a snapshot's memory file: {} MiB",
            args.guest.memory_mib,
            snapshot_bytes >> 20
        );
        let rows: Vec<(&str, &Latency)> = figures.iter().map(|(n, l)| (n.as_str(), l)).collect();
        println!("{}", latency_table(&rows));
        let mut memory = table(["VMM memory (mean)", "resident MiB", "proportional MiB"]);
        for (name, figures) in [("a fork", fork_memory), ("a fresh sandbox", fresh_memory)] {
            memory.add_row([
                name.to_string(),
                format!("{:.0}", figures.rss_mib),
                format!("{:.0}", figures.pss_mib),
            ]);
        }
        println!("{memory}");
    }
    Ok(())
}
