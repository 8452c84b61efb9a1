//! `wrenn sandbox logs` (a sandbox's log, `-f` to follow it) and `wrenn sandbox metrics` (its
//! resource samples), over the REST API; a table by default, JSON with `--json`.

use std::time::Duration;

use crate::connection::Connection;
use crate::output::{print_json, table};

/// How often `logs -f` asks for new lines.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// What `wrenn sandbox logs` shows.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub level: Option<String>,
    pub search: Option<String>,
    /// Lines from this Unix time in milliseconds.
    pub since_ms: Option<i64>,
    pub limit: usize,
}

fn line_text(entry: &wrenn_api::SandboxLogEntry) -> String {
    let source = entry.fields.get("source").map_or("", String::as_str);
    format!(
        "{}  {:<5}  {:<7}  {}",
        entry.timestamp, entry.level, source, entry.message
    )
}

/// Milliseconds of an entry's RFC 3339 time.
fn entry_ms(entry: &wrenn_api::SandboxLogEntry) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&entry.timestamp)
        .map(|at| at.timestamp_millis())
        .unwrap_or(0)
}

/// `wrenn sandbox logs ID [-f]`: its lines oldest first; following, new ones as they come
/// until Ctrl-C (or the sandbox and its log are gone).
pub async fn logs(
    connection: &Connection,
    id: &str,
    filter: LogFilter,
    follow: bool,
) -> anyhow::Result<()> {
    let api = connection.api()?;
    let query = |cursor: Option<i64>| {
        wrenn_api::client::query(&[
            ("cursor", cursor.map(|ms| ms.to_string())),
            ("limit", Some(filter.limit.to_string())),
            ("direction", Some("forward".into())),
            ("level", filter.level.clone()),
            ("search", filter.search.clone()),
        ])
    };
    let first = api.sandbox_logs(id, &query(filter.since_ms)).await?;
    if connection.json && !follow {
        return print_json(&first);
    }
    let print = |entry: &wrenn_api::SandboxLogEntry| {
        if connection.json {
            println!("{}", serde_json::to_string(entry).unwrap_or_default());
        } else {
            println!("{}", line_text(entry));
        }
    };
    if !follow && first.logs.is_empty() {
        eprintln!("no log lines");
    }
    let mut shown = Shown {
        last_ms: filter.since_ms.unwrap_or(0),
        at_last: Vec::new(),
    };
    shown.take(first.logs, print);
    if !follow {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
        }
        let page = api.sandbox_logs(id, &query(Some(shown.last_ms))).await?;
        shown.take(page.logs, print);
    }
}

/// What `logs -f` printed last: the cursor is a time, so the lines at the last one's
/// millisecond come again and are skipped.
struct Shown {
    last_ms: i64,
    at_last: Vec<wrenn_api::SandboxLogEntry>,
}

impl Shown {
    fn take(
        &mut self,
        entries: Vec<wrenn_api::SandboxLogEntry>,
        print: impl Fn(&wrenn_api::SandboxLogEntry),
    ) {
        for entry in entries {
            let at = entry_ms(&entry);
            if at == self.last_ms && self.at_last.contains(&entry) {
                continue;
            }
            if at != self.last_ms {
                self.last_ms = at;
                self.at_last.clear();
            }
            print(&entry);
            self.at_last.push(entry);
        }
    }
}

/// `wrenn sandbox metrics ID [--since SECONDS]`: its samples over the last `since`.
pub async fn metrics(connection: &Connection, id: &str, since: Duration) -> anyhow::Result<()> {
    let start = chrono::Utc::now() - chrono::Duration::from_std(since)?;
    let query = wrenn_api::client::query(&[("start", Some(start.timestamp().to_string()))]);
    let samples = connection.api()?.sandbox_metrics(id, &query).await?;
    if connection.json {
        return print_json(&samples);
    }
    let mib = |bytes: u64| format!("{} MiB", bytes >> 20);
    let rows = samples
        .iter()
        .map(|sample| {
            vec![
                sample.timestamp.clone(),
                format!("{:.1}% of {}", sample.cpu_used_pct, sample.cpu_count),
                format!("{} / {}", mib(sample.mem_used), mib(sample.mem_total)),
                format!("{} / {}", mib(sample.disk_used), mib(sample.disk_total)),
                match (sample.net_rx_bytes, sample.net_tx_bytes) {
                    (Some(rx), Some(tx)) => format!("{rx} / {tx}"),
                    _ => String::new(),
                },
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["time", "cpu", "memory", "disk", "net bytes in / out"],
            rows
        )
    );
    Ok(())
}

/// `wrenn usage`: the team's use by day.
pub async fn usage(
    connection: &Connection,
    start: Option<String>,
    end: Option<String>,
) -> anyhow::Result<()> {
    let query = wrenn_api::client::query(&[("start", start), ("end", end)]);
    let usage = connection.api()?.usage(&query).await?;
    if connection.json {
        return print_json(&usage);
    }
    let mut rows: Vec<Vec<String>> = usage
        .days
        .iter()
        .map(|day| {
            vec![
                day.day.clone(),
                format!("{:.0}", day.sandbox_seconds),
                format!("{:.0}", day.gib_seconds),
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        format!("{:.0}", usage.total_sandbox_seconds),
        format!("{:.0}", usage.total_gib_seconds),
    ]);
    println!(
        "{}",
        table(&["day (UTC)", "sandbox-seconds", "GiB-seconds"], rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(timestamp: &str, message: &str) -> wrenn_api::SandboxLogEntry {
        wrenn_api::SandboxLogEntry {
            timestamp: timestamp.into(),
            message: message.into(),
            level: "info".into(),
            fields: Default::default(),
        }
    }

    #[test]
    fn following_skips_the_lines_it_showed_at_the_cursors_millisecond() {
        let printed = std::cell::RefCell::new(Vec::new());
        let print = |e: &wrenn_api::SandboxLogEntry| printed.borrow_mut().push(e.message.clone());
        let mut shown = Shown {
            last_ms: 0,
            at_last: Vec::new(),
        };
        shown.take(
            vec![
                entry("2026-12-03T10:00:00.000Z", "a"),
                entry("2026-12-03T10:00:00.001Z", "b"),
            ],
            print,
        );
        // The next page starts at b's millisecond: b again, then c, and a new line there.
        shown.take(
            vec![
                entry("2026-12-03T10:00:00.001Z", "b"),
                entry("2026-12-03T10:00:00.001Z", "b2"),
                entry("2026-12-03T10:00:00.002Z", "c"),
            ],
            print,
        );
        assert_eq!(*printed.borrow(), ["a", "b", "b2", "c"]);
    }
}
