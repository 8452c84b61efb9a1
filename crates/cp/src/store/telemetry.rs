//! The store's rows of what hosts saw of their sandboxes (migration 0012): resource samples at
//! three resolutions ([`MetricRow`]), log lines ([`SandboxLogRow`]) and each team's use per
//! day ([`UsageRow`]). How they are collected, rolled up and kept is `crate::telemetry`'s;
//! this holds what is kept and the statements both backends share (their placeholders made
//! by a `mark` function: `?n` for SQLite, `$n` for PostgreSQL).

use serde::{Deserialize, Serialize};

/// One resource sample of a sandbox at one resolution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub sandbox_id: String,
    pub team_id: String,
    /// 0: as sampled; 1 and 2: averages over the tiers' buckets (`crate::telemetry::TIERS`).
    pub tier: i64,
    /// When it was sampled, or its bucket's start.
    pub at_ms: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: i64,
    pub mem_total: i64,
    pub mem_cache: i64,
    pub disk_used: i64,
    pub disk_total: i64,
    /// Bytes the guest received and sent since its VM started (the bucket's last).
    pub net_rx_bytes: i64,
    pub net_tx_bytes: i64,
}

/// One line of a sandbox's log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLogRow {
    pub seq: i64,
    pub sandbox_id: String,
    pub team_id: String,
    pub at_ms: i64,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
    /// A JSON object of strings.
    pub fields: String,
}

/// A team's use on one UTC day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub team_id: String,
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Milliseconds its sandboxes ran.
    pub sandbox_ms: i64,
    /// The same, each weighted by its sandbox's memory in MiB.
    pub mib_ms: i64,
}

/// What one collection from a host adds, written in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryBatch {
    /// Samples as taken (tier 0).
    pub samples: Vec<MetricRow>,
    pub logs: Vec<SandboxLogRow>,
    /// Use to add to each team's day.
    pub usage: Vec<UsageRow>,
    /// The most characters of log (messages and fields) a sandbox keeps: its oldest lines go.
    pub log_cap_chars: i64,
    /// Where the host's collection stands after these rows (kept with them, for a replica
    /// taking the collection over).
    pub cursor: Option<TelemetryCursor>,
}

/// Where the collection of one host's telemetry stands: the host's buffer's epoch, and the
/// last entry collected of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryCursor {
    pub host_id: String,
    pub epoch: String,
    pub after: u64,
}

/// The log levels from the least severe.
pub const LEVELS: [&str; 4] = ["debug", "info", "warn", "error"];

/// Which of a sandbox's log lines to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogLinesQuery {
    pub sandbox_id: String,
    pub team_id: String,
    /// Forward: lines at or after this time, oldest first; backward: at or before it, newest
    /// first.
    pub cursor_ms: Option<i64>,
    pub forward: bool,
    pub limit: usize,
    /// Lines of this level or more severe only.
    pub min_level: Option<String>,
    /// Lines whose message holds this text (any case).
    pub search: Option<String>,
}

/// A value of a [`LogLinesQuery`]'s statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryValue {
    Text(String),
    Int(i64),
}

impl LogLinesQuery {
    /// `WHERE … ORDER BY … LIMIT …` of [`SandboxLogRow`]s, and its values.
    pub fn clause(&self, mark: fn(usize) -> String) -> (String, Vec<QueryValue>) {
        let mut values = vec![
            QueryValue::Text(self.sandbox_id.clone()),
            QueryValue::Text(self.team_id.clone()),
        ];
        let mut clause = format!("WHERE sandbox_id = {} AND team_id = {}", mark(1), mark(2));
        if let Some(cursor) = self.cursor_ms {
            values.push(QueryValue::Int(cursor));
            let op = if self.forward { ">=" } else { "<=" };
            clause.push_str(&format!(" AND at_ms {op} {}", mark(values.len())));
        }
        if let Some(level) = &self.min_level {
            let from = LEVELS.iter().position(|known| known == level).unwrap_or(0);
            let names: Vec<String> = LEVELS[from..]
                .iter()
                .map(|name| format!("'{name}'"))
                .collect();
            clause.push_str(&format!(" AND level IN ({})", names.join(", ")));
        }
        if let Some(search) = self.search.as_deref().filter(|text| !text.is_empty()) {
            let escaped = search
                .to_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            values.push(QueryValue::Text(format!("%{escaped}%")));
            clause.push_str(&format!(
                " AND LOWER(message) LIKE {} ESCAPE '\\'",
                mark(values.len())
            ));
        }
        let order = if self.forward { "ASC" } else { "DESC" };
        values.push(QueryValue::Int(self.limit.clamp(1, 10_000) as i64));
        clause.push_str(&format!(
            " ORDER BY at_ms {order}, seq {order} LIMIT {}",
            mark(values.len())
        ));
        (clause, values)
    }
}

/// Makes tier `tier` (buckets of `bucket_ms`) from tier `tier - 1`'s samples from
/// `from_ms` (the tier's `done_until_ms`) to `until_ms` (a bucket's start): each bucket's
/// average CPU and memory, its most disk and traffic. Placeholders: tier, bucket, from, until.
pub fn roll_up_sql(mark: fn(usize) -> String) -> String {
    let tier = format!("CAST({} AS BIGINT)", mark(1));
    let (bucket, from, until) = (mark(2), mark(3), mark(4));
    format!(
        "INSERT INTO sandbox_metrics (sandbox_id, team_id, tier, at_ms, cpu_count, cpu_used_pct,
            mem_used, mem_total, mem_cache, disk_used, disk_total, net_rx_bytes, net_tx_bytes)
         SELECT sandbox_id, MIN(team_id), {tier}, (at_ms / {bucket}) * {bucket}, MAX(cpu_count),
            AVG(cpu_used_pct), CAST(ROUND(AVG(mem_used)) AS BIGINT), MAX(mem_total),
            CAST(ROUND(AVG(mem_cache)) AS BIGINT), MAX(disk_used), MAX(disk_total), MAX(net_rx_bytes),
            MAX(net_tx_bytes)
         FROM sandbox_metrics
         WHERE tier = {tier} - 1 AND at_ms >= {from} AND at_ms < {until}
         GROUP BY sandbox_id, at_ms / {bucket}
         ON CONFLICT DO NOTHING"
    )
}

/// Removes a sandbox's oldest log lines beyond its cap in characters. Placeholders: the
/// sandbox's id, the cap.
pub fn cap_logs_sql(mark: fn(usize) -> String) -> String {
    let (sandbox, cap) = (mark(1), mark(2));
    format!(
        "DELETE FROM sandbox_logs WHERE sandbox_id = {sandbox} AND seq <= (
            SELECT MAX(seq) FROM (
                SELECT seq, SUM(LENGTH(message) + LENGTH(fields)) OVER (ORDER BY seq DESC) AS kept
                FROM sandbox_logs WHERE sandbox_id = {sandbox}
            ) AS newest WHERE kept > {cap})"
    )
}

/// Removes the log lines of sandboxes that no longer exist and logged nothing since a time.
/// Placeholder: that time.
pub fn prune_logs_sql(mark: fn(usize) -> String) -> String {
    let before = mark(1);
    format!(
        "DELETE FROM sandbox_logs WHERE sandbox_id IN (
            SELECT sandbox_id FROM sandbox_logs GROUP BY sandbox_id HAVING MAX(at_ms) < {before})
         AND sandbox_id NOT IN (SELECT id FROM sandboxes)"
    )
}

/// Adds to a team's day. Placeholders: team, day, sandbox ms, MiB ms.
pub fn add_usage_sql(mark: fn(usize) -> String) -> String {
    format!(
        "INSERT INTO team_usage (team_id, day, sandbox_ms, mib_ms) VALUES ({}, {}, {}, {})
         ON CONFLICT (team_id, day) DO UPDATE SET
            sandbox_ms = team_usage.sandbox_ms + excluded.sandbox_ms,
            mib_ms = team_usage.mib_ms + excluded.mib_ms",
        mark(1),
        mark(2),
        mark(3),
        mark(4)
    )
}

/// Inserts a sample. Placeholders: its thirteen columns in [`MetricRow`]'s order.
pub fn insert_metric_sql(mark: fn(usize) -> String) -> String {
    let marks: Vec<String> = (1..=13).map(mark).collect();
    format!(
        "INSERT INTO sandbox_metrics (sandbox_id, team_id, tier, at_ms, cpu_count, cpu_used_pct,
            mem_used, mem_total, mem_cache, disk_used, disk_total, net_rx_bytes, net_tx_bytes)
         VALUES ({}) ON CONFLICT DO NOTHING",
        marks.join(", ")
    )
}

/// Inserts a log line. Placeholders: sandbox, team, at, level, message, fields.
pub fn insert_log_sql(mark: fn(usize) -> String) -> String {
    let marks: Vec<String> = (1..=6).map(mark).collect();
    format!(
        "INSERT INTO sandbox_logs (sandbox_id, team_id, at_ms, level, message, fields)
         VALUES ({})",
        marks.join(", ")
    )
}

/// Records that tier `tier` is made up to a time. Placeholders: tier, time.
pub fn rolled_up_sql(mark: fn(usize) -> String) -> String {
    format!(
        "INSERT INTO metrics_rollups (tier, done_until_ms) VALUES ({}, {})
         ON CONFLICT (tier) DO UPDATE SET done_until_ms = excluded.done_until_ms",
        mark(1),
        mark(2)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_query_filters_by_team_time_level_and_escaped_text() {
        let query = LogLinesQuery {
            sandbox_id: "s".into(),
            team_id: "t".into(),
            cursor_ms: Some(5),
            forward: false,
            limit: 50,
            min_level: Some("warn".into()),
            search: Some("100%_A".into()),
        };
        let (clause, values) = query.clause(|n| format!("?{n}"));
        assert_eq!(
            clause,
            "WHERE sandbox_id = ?1 AND team_id = ?2 AND at_ms <= ?3 AND level IN ('warn', 'error') \
             AND LOWER(message) LIKE ?4 ESCAPE '\\' ORDER BY at_ms DESC, seq DESC LIMIT ?5"
        );
        assert_eq!(values[3], QueryValue::Text("%100\\%\\_a%".into()));
        assert_eq!(values[4], QueryValue::Int(50));
    }

    fn sample(sandbox: &str, team: &str, at_ms: i64, cpu: f64, mem: i64) -> MetricRow {
        MetricRow {
            sandbox_id: sandbox.into(),
            team_id: team.into(),
            tier: 0,
            at_ms,
            cpu_count: 2,
            cpu_used_pct: cpu,
            mem_used: mem,
            mem_total: 1000,
            net_rx_bytes: at_ms,
            ..MetricRow::default()
        }
    }

    fn line(sandbox: &str, at_ms: i64, level: &str, message: &str) -> SandboxLogRow {
        SandboxLogRow {
            sandbox_id: sandbox.into(),
            team_id: "a".into(),
            at_ms,
            level: level.into(),
            message: message.into(),
            fields: "{}".into(),
            ..SandboxLogRow::default()
        }
    }

    #[tokio::test]
    async fn samples_are_kept_read_by_team_and_range_rolled_up_and_pruned() {
        for (backend, store, _dir) in crate::store::tests::backends().await {
            let batch = TelemetryBatch {
                samples: vec![
                    sample("s1", "a", 60_000, 10.0, 100),
                    sample("s1", "a", 65_000, 30.0, 300),
                    sample("s1", "a", 125_000, 50.0, 500),
                    sample("s2", "b", 60_000, 90.0, 900),
                ],
                ..TelemetryBatch::default()
            };
            store.add_telemetry(batch.clone()).await.unwrap();
            // A collection read again (a retry after a failed write) adds nothing twice.
            store.add_telemetry(batch).await.unwrap();
            let read = store
                .metrics_between("s1", "a", 0, 0, i64::MAX, 100)
                .await
                .unwrap();
            let times: Vec<i64> = read.iter().map(|row| row.at_ms).collect();
            assert_eq!(times, [60_000, 65_000, 125_000], "{backend}");
            assert_eq!(read[0].cpu_used_pct, 10.0, "{backend}");
            let ranged = store
                .metrics_between("s1", "a", 0, 61_000, 125_000, 100)
                .await
                .unwrap();
            assert_eq!(ranged.len(), 1, "{backend}: the end is not included");
            assert!(
                store
                    .metrics_between("s2", "a", 0, 0, i64::MAX, 100)
                    .await
                    .unwrap()
                    .is_empty(),
                "{backend}: another team's sandbox has no samples for this one"
            );
            let latest = store.latest_metric("s1", "a").await.unwrap().unwrap();
            assert_eq!(latest.at_ms, 125_000, "{backend}");

            // Minutes 1 and 2 rolled up: each bucket's averages, its most traffic.
            assert_eq!(store.rolled_up_until(1).await.unwrap(), 0, "{backend}");
            let made = store.roll_up_metrics(1, 60_000, 0, 180_000).await.unwrap();
            assert_eq!(made, 3, "{backend}: two buckets of s1, one of s2");
            assert_eq!(
                store.rolled_up_until(1).await.unwrap(),
                180_000,
                "{backend}"
            );
            let minutes = store
                .metrics_between("s1", "a", 1, 0, i64::MAX, 100)
                .await
                .unwrap();
            assert_eq!(minutes.len(), 2, "{backend}");
            assert_eq!(minutes[0].at_ms, 60_000, "{backend}");
            assert_eq!(minutes[0].cpu_used_pct, 20.0, "{backend}");
            assert_eq!(minutes[0].mem_used, 200, "{backend}");
            assert_eq!(minutes[0].net_rx_bytes, 65_000, "{backend}");
            assert_eq!(minutes[1].cpu_used_pct, 50.0, "{backend}");
            // Rolling the same range up again makes nothing twice.
            assert_eq!(
                store.roll_up_metrics(1, 60_000, 0, 180_000).await.unwrap(),
                0,
                "{backend}"
            );

            assert_eq!(
                store.prune_metrics(0, 100_000).await.unwrap(),
                3,
                "{backend}"
            );
            let left = store
                .metrics_between("s1", "a", 0, 0, i64::MAX, 100)
                .await
                .unwrap();
            assert_eq!(left.len(), 1, "{backend}");
        }
    }

    #[tokio::test]
    async fn log_lines_are_filtered_capped_per_sandbox_and_pruned_once_gone() {
        for (backend, store, _dir) in crate::store::tests::backends().await {
            let lines = vec![
                line("s1", 1_000, "info", "booted"),
                line("s1", 2_000, "debug", "a detail"),
                line("s1", 3_000, "warn", "disk 100% full"),
                line("s1", 4_000, "error", "Disk failed"),
                line("gone", 1_000, "info", "bye"),
            ];
            store
                .add_telemetry(TelemetryBatch {
                    logs: lines,
                    log_cap_chars: 1 << 20,
                    ..TelemetryBatch::default()
                })
                .await
                .unwrap();
            let query =
                |cursor_ms, forward, min_level: Option<&str>, search: Option<&str>| LogLinesQuery {
                    sandbox_id: "s1".into(),
                    team_id: "a".into(),
                    cursor_ms,
                    forward,
                    limit: 100,
                    min_level: min_level.map(str::to_string),
                    search: search.map(str::to_string),
                };
            let messages = |rows: Vec<SandboxLogRow>| -> Vec<String> {
                rows.into_iter().map(|row| row.message).collect()
            };
            let all = store
                .sandbox_logs(query(None, true, None, None))
                .await
                .unwrap();
            assert_eq!(
                messages(all),
                ["booted", "a detail", "disk 100% full", "Disk failed"],
                "{backend}"
            );
            let back = store
                .sandbox_logs(query(Some(3_000), false, None, None))
                .await
                .unwrap();
            assert_eq!(
                messages(back),
                ["disk 100% full", "a detail", "booted"],
                "{backend}"
            );
            let severe = store
                .sandbox_logs(query(None, true, Some("warn"), None))
                .await
                .unwrap();
            assert_eq!(messages(severe).len(), 2, "{backend}");
            let found = store
                .sandbox_logs(query(None, true, None, Some("DISK")))
                .await
                .unwrap();
            assert_eq!(messages(found).len(), 2, "{backend}: any case");
            let percent = store
                .sandbox_logs(query(None, true, None, Some("0%")))
                .await
                .unwrap();
            assert_eq!(
                messages(percent),
                ["disk 100% full"],
                "{backend}: % is text, not a wildcard"
            );
            let other_team = LogLinesQuery {
                team_id: "b".into(),
                ..query(None, true, None, None)
            };
            assert!(store.sandbox_logs(other_team).await.unwrap().is_empty());

            // A cap of 60 characters (each line's message and its "{}"): the newest lines
            // that fit stay.
            let many: Vec<SandboxLogRow> = (0..20)
                .map(|n| line("s3", 10_000 + n, "info", &format!("line number {n:02}")))
                .collect();
            store
                .add_telemetry(TelemetryBatch {
                    logs: many,
                    log_cap_chars: 60,
                    ..TelemetryBatch::default()
                })
                .await
                .unwrap();
            let kept = store
                .sandbox_logs(LogLinesQuery {
                    sandbox_id: "s3".into(),
                    ..query(None, true, None, None)
                })
                .await
                .unwrap();
            let kept = messages(kept);
            assert_eq!(
                kept,
                ["line number 17", "line number 18", "line number 19"],
                "{backend}"
            );

            // The lines of a sandbox that is gone and quiet go; a live sandbox's stay.
            let pruned = store.prune_sandbox_logs(5_000).await.unwrap();
            assert_eq!(pruned, 1, "{backend}: gone's line; s1 is still a sandbox");
        }
    }

    #[tokio::test]
    async fn a_teams_use_adds_up_by_day() {
        for (backend, store, _dir) in crate::store::tests::backends().await {
            for (day, ms) in [
                ("2026-12-01", 5_000),
                ("2026-12-01", 2_500),
                ("2026-12-02", 1_000),
            ] {
                store
                    .add_telemetry(TelemetryBatch {
                        usage: vec![UsageRow {
                            team_id: "a".into(),
                            day: day.into(),
                            sandbox_ms: ms,
                            mib_ms: ms * 512,
                        }],
                        ..TelemetryBatch::default()
                    })
                    .await
                    .unwrap();
            }
            let days = store
                .usage_of("a", "2026-11-01", "2026-12-01")
                .await
                .unwrap();
            assert_eq!(days.len(), 1, "{backend}");
            assert_eq!((days[0].sandbox_ms, days[0].mib_ms), (7_500, 7_500 * 512));
            assert!(
                store
                    .usage_of("b", "2026-01-01", "2026-12-31")
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    }
}
