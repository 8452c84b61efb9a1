//! `wrenn-bench telemetry`: what keeping sandboxes' metrics costs. On a real SQLite store in a
//! temporary directory, an hour of samples of `--sandboxes` sandboxes, one collection of all
//! of them every `--interval-secs` (as `wrenn_cp::telemetry` writes them): each collection's
//! write time, and the store's size per sandbox-hour in each retention tier, measured by
//! vacuuming the file after the control plane's own maintenance has moved the clock on (two
//! hours: the samples rolled up into minutes; two days: into ten minutes).

use std::path::Path;
use std::time::Instant;

use clap::Args;
use wrenn_cp::ControlPlane;
use wrenn_cp::store::{MetricRow, Store, TelemetryBatch};

use crate::report::{ms, quantile, table};

#[derive(Debug, Args)]
pub struct TelemetryBenchArgs {
    /// Sandboxes sampled at once.
    #[arg(long, default_value_t = 100)]
    sandboxes: usize,
    /// Seconds between samples (the agent's --sample-interval).
    #[arg(long, default_value_t = 5)]
    interval_secs: u64,
    /// Simulated hours of samples.
    #[arg(long, default_value_t = 1)]
    hours: u64,
    #[arg(long)]
    json: bool,
}

/// The database file's size once its log is folded in and its free pages dropped.
fn vacuumed_size(path: &Path) -> anyhow::Result<u64> {
    let connection = rusqlite::Connection::open(path)?;
    // VACUUM writes the smaller file into the log: the checkpoint after it shrinks the file.
    connection.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")?;
    drop(connection);
    Ok(std::fs::metadata(path)?.len())
}

pub async fn run(args: TelemetryBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.sandboxes > 0 && args.interval_secs > 0 && args.hours > 0);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cp.db");
    let store = Store::open(&path)?;
    let fleet = wrenn_cp::fleet::Fleet::load(
        &store,
        wrenn_cp::fleet::FleetConfig::default(),
        Box::new(wrenn_cp::fleet::LeastLoaded),
        None,
    )
    .await?;
    let (plane, _wake) = ControlPlane::new(store.clone(), fleet, None, true);
    let empty = vacuumed_size(&path)?;

    // On a ten-minute boundary, so that the tiers' buckets are whole.
    let start = (wrenn_core::now_ms() / 600_000) * 600_000 - 3 * 86_400_000;
    let interval_ms = (args.interval_secs * 1000) as i64;
    let ticks = (args.hours * 3600 / args.interval_secs) as i64;
    let mut writes = Vec::with_capacity(ticks as usize);
    for tick in 0..ticks {
        let at_ms = start + tick * interval_ms;
        let samples = (0..args.sandboxes)
            .map(|n| MetricRow {
                sandbox_id: format!("i{n:019}"),
                team_id: "bench".into(),
                tier: 0,
                at_ms,
                cpu_count: 2,
                cpu_used_pct: (tick % 100) as f64 + 0.25,
                mem_used: 300 << 20,
                mem_total: 512 << 20,
                mem_cache: 100 << 20,
                disk_used: 900 << 20,
                disk_total: 1792 << 20,
                net_rx_bytes: tick * 1500,
                net_tx_bytes: tick * 700,
            })
            .collect();
        let batch = TelemetryBatch {
            samples,
            ..TelemetryBatch::default()
        };
        let began = Instant::now();
        store.add_telemetry(batch).await?;
        writes.push(began.elapsed());
    }
    let taken = vacuumed_size(&path)?;
    // Two hours on: the hour's samples are minutes' averages (and ten minutes' already).
    plane
        .maintain_telemetry(start + (args.hours as i64 + 1) * 3_600_000)
        .await?;
    let minutes_and_tens = vacuumed_size(&path)?;
    // Two days on: ten minutes' averages alone.
    plane
        .maintain_telemetry(start + 2 * 86_400_000 + args.hours as i64 * 3_600_000)
        .await?;
    let tens = vacuumed_size(&path)?;

    let sandbox_hours = (args.sandboxes as u64 * args.hours) as f64;
    let per_hour = |bytes: u64| bytes as f64 / sandbox_hours;
    let tier0 = per_hour(taken.saturating_sub(empty));
    let tier2 = per_hour(tens.saturating_sub(empty));
    let tier1 = per_hour(minutes_and_tens.saturating_sub(tens));
    // A sandbox that runs all the time holds an hour of tier 0, a day of tier 1, 30 days of
    // tier 2.
    let steady = tier0 + 24.0 * tier1 + 720.0 * tier2;
    let mut sorted: Vec<f64> = writes.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    sorted.sort_by(f64::total_cmp);
    let samples_per_write = args.sandboxes;
    let (p50, p99) = (quantile(&sorted, 0.5), quantile(&sorted, 0.99));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "sandboxes": args.sandboxes,
                "interval_secs": args.interval_secs,
                "collection_write_ms": {"p50": p50, "p99": p99},
                "bytes_per_sandbox_hour": {"as_taken": tier0, "minutes": tier1, "ten_minutes": tier2},
                "steady_bytes_per_running_sandbox": steady,
            })
        );
        return Ok(());
    }
    let kib = |bytes: f64| format!("{:.1} KiB", bytes / 1024.0);
    let mut rows = table(vec!["figure", "value"]);
    rows.add_row(vec![
        format!("one collection's write ({samples_per_write} samples), p50"),
        ms(p50, 2),
    ]);
    rows.add_row(vec![
        format!("one collection's write ({samples_per_write} samples), p99"),
        ms(p99, 2),
    ]);
    rows.add_row(vec![
        format!(
            "a sandbox-hour as taken (every {} s, kept 1 h)",
            args.interval_secs
        ),
        kib(tier0),
    ]);
    rows.add_row(vec![
        "a sandbox-hour of minutes (kept 1 day)".to_string(),
        kib(tier1),
    ]);
    rows.add_row(vec![
        "a sandbox-hour of ten minutes (kept 30 days)".to_string(),
        kib(tier2),
    ]);
    rows.add_row(vec![
        "held for a sandbox that always runs (1 h + 1 day + 30 days)".to_string(),
        kib(steady),
    ]);
    println!("{rows}");
    Ok(())
}
