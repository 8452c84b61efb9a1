//! What hosts saw of their sandboxes, collected and kept: resource samples with retention tiers,
//! log lines, and each team's use per day.
//!
//! Each agent samples its running sandboxes (envd's `/metrics` and the host's traffic counters)
//! and reads their consoles into a bounded buffer (`wrenn_agent::telemetry`); [`run_telemetry`]
//! collects every up host's buffer each interval, following a cursor per host
//! ([`ControlPlane::collect_telemetry`]), and writes each collection in one transaction. A
//! sandbox's kill collects its host once more before its row goes, so its last lines are kept.
//!
//! Samples are kept at three resolutions ([`TIERS`]): as taken for an hour, a minute's averages
//! for a day, ten minutes' for a month; [`ControlPlane::maintain_telemetry`] makes each coarser
//! tier from the finer one as buckets complete and forgets what is past each tier's retention
//! (it takes the time as an argument, so tests move the clock). A history read
//! ([`ControlPlane::metrics_history`]) takes each part of its range from the finest tier that
//! still covers it. Log lines are capped per sandbox (its oldest go first) and forgotten a
//! retention after the sandbox ended. Use is counted from the samples: each sample stands for
//! the time since the sandbox's previous one (at most two intervals: a paused sandbox is not
//! sampled), times its memory for GiB-seconds.
//!
//! [`run_telemetry`]: ControlPlane::run_telemetry

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wrenn_proto::agent as pb;

use crate::fleet::Host;
use crate::service::{ControlPlane, Error};
use crate::store::{LogLinesQuery, MetricRow, SandboxLogRow, SandboxRow, TelemetryBatch, UsageRow};

/// One resolution samples are kept at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub tier: i64,
    /// The length of its buckets (0: samples as taken).
    pub bucket_ms: i64,
    /// How long its rows are kept.
    pub keep_ms: i64,
}

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// As taken for an hour; a minute's averages for a day; ten minutes' for 30 days.
pub const TIERS: [Tier; 3] = [
    Tier {
        tier: 0,
        bucket_ms: 0,
        keep_ms: HOUR_MS,
    },
    Tier {
        tier: 1,
        bucket_ms: MINUTE_MS,
        keep_ms: DAY_MS,
    },
    Tier {
        tier: 2,
        bucket_ms: 10 * MINUTE_MS,
        keep_ms: 30 * DAY_MS,
    },
];

/// How long after a bucket's end its samples may still arrive (a collection's interval and
/// its call): it is rolled up after that.
pub const ROLL_UP_LAG_MS: i64 = 30_000;
/// The most samples one history read returns from one tier.
pub const MAX_HISTORY_ROWS: usize = 10_000;
/// The most pages one host's collection reads at once (each up to the agent's `MAX_COLLECT`).
const MAX_PAGES: usize = 10;

/// What is kept, and how often collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// How often every up host is collected.
    pub collect_interval: Duration,
    /// The most characters of log a sandbox keeps (messages and fields).
    pub log_cap_chars: i64,
    /// How long a sandbox's log is kept after it ended.
    pub log_retention: Duration,
    /// How often tiers are made and old rows forgotten.
    pub maintain_interval: Duration,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            collect_interval: Duration::from_secs(5),
            log_cap_chars: 1 << 20,
            log_retention: Duration::from_secs(7 * 24 * 3600),
            maintain_interval: Duration::from_secs(60),
        }
    }
}

/// Where a host's buffer has been read to.
#[derive(Debug, Default)]
struct Cursor {
    epoch: String,
    after: u64,
}

/// What the collector knows of a sandbox it got entries of.
#[derive(Debug, Clone)]
struct Known {
    team_id: String,
    memory_mb: u32,
    /// Its newest sample's time (0: none yet).
    last_sample_ms: i64,
    /// When it was last seen in a collection (to forget it after a while).
    seen_ms: i64,
}

/// The collector's state: a cursor per host, and the sandboxes it has seen lately.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub settings: TelemetrySettings,
    cursors: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Cursor>>>>,
    known: Mutex<HashMap<String, Known>>,
}

impl Telemetry {
    /// A collector with these settings.
    pub fn new(settings: TelemetrySettings) -> Telemetry {
        Telemetry {
            settings,
            ..Telemetry::default()
        }
    }

    fn cursor(&self, host_id: &str) -> Arc<tokio::sync::Mutex<Cursor>> {
        self.cursors
            .lock()
            .expect("cursors lock")
            .entry(host_id.to_string())
            .or_default()
            .clone()
    }
}

/// How much one collection brought.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    pub samples: usize,
    pub lines: usize,
    /// The host had dropped entries this collector had not read.
    pub gap: bool,
}

impl ControlPlane {
    /// Collects every up host every interval, and makes the tiers and forgets old rows every
    /// maintenance interval, until `shutdown`.
    pub async fn run_telemetry(self: Arc<Self>, shutdown: CancellationToken) {
        let settings = self.telemetry.settings.clone();
        let mut maintained = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(settings.collect_interval) => {}
            }
            let hosts: Vec<Arc<Host>> = self
                .fleet
                .hosts()
                .into_iter()
                .filter(|host| host.is_up())
                .collect();
            let plane = &self;
            let collections = hosts.iter().map(|host| async move {
                if let Err(error) = plane.collect_telemetry(host).await {
                    tracing::warn!(host = %host.name(), %error, "collecting the host's telemetry failed");
                }
            });
            futures_util::future::join_all(collections).await;
            if maintained.elapsed() >= settings.maintain_interval {
                maintained = tokio::time::Instant::now();
                if let Err(error) = self.maintain_telemetry(wrenn_core::now_ms()).await {
                    tracing::warn!(%error, "keeping the sandboxes' metrics and logs failed");
                }
            }
        }
    }

    /// Reads what `host` saw since the last collection and stores it; the cursor moves only
    /// once the store has it (a failed write is read again next time).
    pub async fn collect_telemetry(&self, host: &Host) -> Result<Collected, Error> {
        let cursor = self.telemetry.cursor(&host.id());
        let mut cursor = cursor.lock().await;
        // Replicas take the collection over from one another: the store has where it stands.
        let replicated = self.replica.is_some();
        if replicated && let Some(stored) = self.store.telemetry_cursor(&host.id()).await? {
            cursor.epoch = stored.epoch;
            cursor.after = stored.after;
        }
        let mut collected = Collected::default();
        for _ in 0..MAX_PAGES {
            let response = host
                .telemetry(pb::CollectTelemetryRequest {
                    epoch: cursor.epoch.clone(),
                    after: cursor.after,
                    limit: 0,
                })
                .await?;
            if response.gap {
                collected.gap = true;
                tracing::warn!(host = %host.name(), "the host dropped sandbox samples or log lines before they were collected");
            }
            let entries = response.samples.len() + response.logs.len();
            let mut batch = self.telemetry_batch(&response).await?;
            collected.samples += batch.samples.len();
            collected.lines += batch.logs.len();
            let moved = response.epoch != cursor.epoch || response.next != cursor.after;
            if replicated && moved {
                batch.cursor = Some(crate::store::TelemetryCursor {
                    host_id: host.id(),
                    epoch: response.epoch.clone(),
                    after: response.next,
                });
            }
            if !batch.samples.is_empty() || !batch.logs.is_empty() || batch.cursor.is_some() {
                self.store.add_telemetry(batch).await?;
            }
            crate::metrics::count_telemetry(
                response.samples.len(),
                response.logs.len(),
                response.gap,
            );
            cursor.epoch = response.epoch;
            cursor.after = response.next;
            if !response.more || entries == 0 {
                break;
            }
        }
        Ok(collected)
    }

    /// A collection's entries as rows of the sandboxes' teams (those of sandboxes the store
    /// does not know are left out), with the use they stand for.
    async fn telemetry_batch(
        &self,
        response: &pb::CollectTelemetryResponse,
    ) -> Result<TelemetryBatch, Error> {
        let now = wrenn_core::now_ms();
        let mut ids: Vec<&str> = response
            .samples
            .iter()
            .map(|sample| sample.sandbox_id.as_str())
            .chain(response.logs.iter().map(|line| line.sandbox_id.as_str()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut known = HashMap::new();
        for id in ids {
            let cached = self
                .telemetry
                .known
                .lock()
                .expect("known lock")
                .get(id)
                .cloned();
            let entry = match cached {
                Some(entry) => Some(entry),
                None => self.store.sandbox(id).await?.map(|row| Known {
                    team_id: row.team_id,
                    memory_mb: row.memory_mb,
                    last_sample_ms: 0,
                    seen_ms: now,
                }),
            };
            if let Some(entry) = entry {
                known.insert(id.to_string(), entry);
            }
        }
        let interval_ms = i64::from(response.interval_ms.max(1));
        let mut batch = TelemetryBatch {
            log_cap_chars: self.telemetry.settings.log_cap_chars,
            ..TelemetryBatch::default()
        };
        let mut usage: HashMap<(String, String), (i64, i64)> = HashMap::new();
        for sample in &response.samples {
            let Some(sandbox) = known.get_mut(&sample.sandbox_id) else {
                continue;
            };
            let since = sample.at_ms - sandbox.last_sample_ms;
            let credit = if sandbox.last_sample_ms > 0 && since > 0 {
                since.min(2 * interval_ms)
            } else if sandbox.last_sample_ms == 0 {
                interval_ms
            } else {
                0
            };
            sandbox.last_sample_ms = sandbox.last_sample_ms.max(sample.at_ms);
            let day = day_of(sample.at_ms);
            let used = usage.entry((sandbox.team_id.clone(), day)).or_default();
            used.0 += credit;
            used.1 += credit * i64::from(sandbox.memory_mb);
            batch.samples.push(metric_row(sample, &sandbox.team_id));
        }
        for line in &response.logs {
            let Some(sandbox) = known.get(&line.sandbox_id) else {
                continue;
            };
            batch.logs.push(SandboxLogRow {
                seq: 0,
                sandbox_id: line.sandbox_id.clone(),
                team_id: sandbox.team_id.clone(),
                at_ms: line.at_ms,
                level: line.level.clone(),
                message: line.message.clone(),
                fields: line.fields_json.clone(),
            });
        }
        batch.usage = usage
            .into_iter()
            .filter(|(_, (sandbox_ms, _))| *sandbox_ms > 0)
            .map(|((team_id, day), (sandbox_ms, mib_ms))| UsageRow {
                team_id,
                day,
                sandbox_ms,
                mib_ms,
            })
            .collect();
        let mut cache = self.telemetry.known.lock().expect("known lock");
        for (id, mut entry) in known {
            entry.seen_ms = now;
            cache.insert(id, entry);
        }
        Ok(batch)
    }

    /// Keeps a sandbox's team known to the collector after its row goes (for an hour, as one
    /// seen in a collection), so what its host read at the kill still is its team's when a
    /// later collection brings it.
    pub(crate) fn remember_sandbox(&self, row: &SandboxRow) {
        self.telemetry
            .known
            .lock()
            .expect("known lock")
            .entry(row.id.clone())
            .or_insert_with(|| Known {
                team_id: row.team_id.clone(),
                memory_mb: row.memory_mb,
                last_sample_ms: 0,
                seen_ms: wrenn_core::now_ms(),
            });
    }

    /// Makes each coarser tier from the finer one up to the buckets complete at `now_ms`, then
    /// forgets the samples past each tier's retention and the logs of sandboxes gone longer
    /// than the log retention.
    pub async fn maintain_telemetry(&self, now_ms: i64) -> Result<(), Error> {
        let mut finer_until = now_ms - ROLL_UP_LAG_MS;
        for tier in &TIERS[1..] {
            let until = (finer_until / tier.bucket_ms) * tier.bucket_ms;
            let from = self.store.rolled_up_until(tier.tier).await?;
            if until > from {
                self.store
                    .roll_up_metrics(tier.tier, tier.bucket_ms, from, until)
                    .await?;
            }
            // The next tier's buckets are complete only as far as this one is made.
            finer_until = until.max(from);
        }
        for tier in &TIERS {
            self.store
                .prune_metrics(tier.tier, now_ms - tier.keep_ms)
                .await?;
        }
        let retention =
            i64::try_from(self.telemetry.settings.log_retention.as_millis()).unwrap_or(i64::MAX);
        self.store
            .prune_sandbox_logs(now_ms.saturating_sub(retention))
            .await?;
        self.telemetry
            .known
            .lock()
            .expect("known lock")
            .retain(|_, known| now_ms - known.seen_ms < HOUR_MS);
        Ok(())
    }

    /// A sandbox's samples from `from_ms` up to `until_ms` at `now_ms`, oldest first, each part
    /// of the range from the finest tier that still covers it; `None` when team `team_id` has
    /// no such sandbox and none of its samples are kept.
    pub async fn metrics_history(
        &self,
        team_id: &str,
        sandbox_id: &str,
        from_ms: i64,
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Option<Vec<MetricRow>>, Error> {
        let mut rows = Vec::new();
        // From the coarsest (oldest) to the finest (newest): tier k covers from its own
        // retention to the next finer tier's.
        for (index, tier) in TIERS.iter().enumerate().rev() {
            let covers_from = now_ms - tier.keep_ms;
            let covers_until = match index {
                0 => i64::MAX,
                _ => now_ms - TIERS[index - 1].keep_ms,
            };
            let from = from_ms.max(covers_from);
            let until = until_ms.min(covers_until);
            if from >= until {
                continue;
            }
            rows.extend(
                self.store
                    .metrics_between(
                        sandbox_id,
                        team_id,
                        tier.tier,
                        from,
                        until,
                        MAX_HISTORY_ROWS,
                    )
                    .await?,
            );
        }
        if rows.is_empty() {
            let exists = self
                .store
                .sandbox(sandbox_id)
                .await?
                .is_some_and(|row| row.team_id == team_id);
            let kept = self
                .store
                .latest_metric(sandbox_id, team_id)
                .await?
                .is_some()
                || !self
                    .store
                    .metrics_between(sandbox_id, team_id, 1, 0, i64::MAX, 1)
                    .await?
                    .is_empty()
                || !self
                    .store
                    .metrics_between(sandbox_id, team_id, 2, 0, i64::MAX, 1)
                    .await?
                    .is_empty();
            if !exists && !kept {
                return Ok(None);
            }
        }
        Ok(Some(rows))
    }

    /// A sandbox's log lines; `None` when team `team_id` has no such sandbox and none of its
    /// lines are kept.
    pub async fn sandbox_log(
        &self,
        query: LogLinesQuery,
    ) -> Result<Option<Vec<SandboxLogRow>>, Error> {
        let (team_id, sandbox_id) = (query.team_id.clone(), query.sandbox_id.clone());
        let lines = self.store.sandbox_logs(query).await?;
        if lines.is_empty() {
            let exists = self
                .store
                .sandbox(&sandbox_id)
                .await?
                .is_some_and(|row| row.team_id == team_id);
            let any = LogLinesQuery {
                sandbox_id,
                team_id,
                forward: true,
                limit: 1,
                ..LogLinesQuery::default()
            };
            if !exists && self.store.sandbox_logs(any).await?.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(lines))
    }
}

/// A sample as a tier-0 row of its team.
fn metric_row(sample: &pb::SandboxSample, team_id: &str) -> MetricRow {
    let signed = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
    MetricRow {
        sandbox_id: sample.sandbox_id.clone(),
        team_id: team_id.to_string(),
        tier: 0,
        at_ms: sample.at_ms,
        cpu_count: sample.cpu_count,
        cpu_used_pct: sample.cpu_used_pct,
        mem_used: signed(sample.mem_used),
        mem_total: signed(sample.mem_total),
        mem_cache: signed(sample.mem_cache),
        disk_used: signed(sample.disk_used),
        disk_total: signed(sample.disk_total),
        net_rx_bytes: signed(sample.net_rx_bytes),
        net_tx_bytes: signed(sample.net_tx_bytes),
    }
}

/// The UTC day of a time, `YYYY-MM-DD`.
pub fn day_of(at_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(at_ms)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}
