//! The routes of what hosts saw of a team's sandboxes (`crate::telemetry`): E2B's metrics
//! (`/sandboxes/{id}/metrics?start&end`, history; `/sandboxes/metrics?sandbox_ids=`, the
//! latest), its logs (`/sandboxes/{id}/logs`, `/v2/sandboxes/{id}/logs`), and the team's use
//! by day (`/v1/usage`). A sandbox killed still answers while its rows are kept; another team's
//! is a 404 like one that never was.

use super::sandboxes::{live_metric, url_pairs};
use super::*;
use crate::store::{LogLinesQuery, MetricRow, SandboxLogRow};

/// The most sandboxes one `GET /sandboxes/metrics` may name.
const MAX_METRICS_SANDBOXES: usize = 100;
/// The most log lines one read returns.
const MAX_LOG_LINES: usize = 1000;

/// A query's integer parameter, if given: a 400 naming it when it is not an integer.
fn integer_parameter(pairs: &[(String, String)], name: &str) -> Result<Option<i64>, ApiError> {
    match pairs.iter().rev().find(|(key, _)| key == name) {
        None => Ok(None),
        Some((_, value)) if value.is_empty() => Ok(None),
        Some((_, value)) => value.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!("{name} must be an integer, not {value:?}"))
        }),
    }
}

/// A query's text parameter, if given.
fn text_parameter(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .rev()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
        .filter(|value| !value.is_empty())
}

/// A stored sample as E2B's `SandboxMetric`.
fn sandbox_metric(row: &MetricRow) -> wrenn_api::SandboxMetric {
    let at = chrono::DateTime::from_timestamp_millis(row.at_ms).unwrap_or_default();
    let unsigned = |value: i64| u64::try_from(value).unwrap_or(0);
    wrenn_api::SandboxMetric {
        timestamp: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        timestamp_unix: at.timestamp(),
        cpu_count: u64::from(row.cpu_count),
        cpu_used_pct: (row.cpu_used_pct * 100.0).round() / 100.0,
        mem_used: unsigned(row.mem_used),
        mem_total: unsigned(row.mem_total),
        mem_cache: unsigned(row.mem_cache),
        disk_used: unsigned(row.disk_used),
        disk_total: unsigned(row.disk_total),
        net_rx_bytes: Some(unsigned(row.net_rx_bytes)),
        net_tx_bytes: Some(unsigned(row.net_tx_bytes)),
    }
}

/// `GET /sandboxes/{id}/metrics?start=&end=` (Unix seconds): the sandbox's samples in that
/// range, oldest first: as taken within the last hour, a minute's averages within the last
/// day, ten minutes' within the last 30 days.
#[utoipa::path(get, path = "/sandboxes/{id}/metrics", tag = "sandboxes", security(("api_key" = [])),
    params(
        ("start" = Option<i64>, Query, description = "Unix seconds: samples from then (default: all kept)"),
        ("end" = Option<i64>, Query, description = "Unix seconds: samples before then (default: now)"),
    ),
    responses(
        (status = 200, description = "Its samples in the range, oldest first", body = Vec<wrenn_api::SandboxMetric>),
        (status = 400, description = "start or end is not an integer, or start is after end", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team, and no samples of one kept", body = wrenn_api::Error),
    ))]
pub(super) async fn metrics(
    SandboxCall { plane, team, id }: SandboxCall,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let pairs = url_pairs(query.as_deref().unwrap_or(""));
    let seconds = |value: Option<i64>| value.map(|s| s.saturating_mul(1000));
    let from_ms = seconds(integer_parameter(&pairs, "start")?).unwrap_or(0);
    let now = wrenn_core::now_ms();
    let until_ms = seconds(integer_parameter(&pairs, "end")?)
        .map(|end| end.saturating_add(1000))
        .unwrap_or(now + 1);
    if from_ms > until_ms {
        return Err(ApiError::bad_request("start is after end"));
    }
    let id = id.split('-').next().unwrap_or(&id).to_string();
    let rows = plane
        .metrics_history(&team.0, &id, from_ms, until_ms, now)
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    let mut samples: Vec<wrenn_api::SandboxMetric> = rows.iter().map(sandbox_metric).collect();
    // A sandbox just made or resumed has no sample stored yet: one read now, when the range
    // reaches the present.
    if samples.is_empty()
        && until_ms >= now
        && let Ok(row) = owned(&plane, &team, &id).await
        && let Some(live) = live_metric(&plane, &row).await
    {
        samples.push(live);
    }
    Ok(axum::Json(samples).into_response())
}

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each named sandbox of the
/// caller's team that runs (`{"sandboxes": {id: SandboxMetric}}`); the others are left out.
#[utoipa::path(get, path = "/sandboxes/metrics", tag = "sandboxes", security(("api_key" = [])),
    params(("sandbox_ids" = String, Query, description = "Comma-separated sandbox ids, at most 100")),
    responses(
        (status = 200, description = "The latest sample of each that runs", body = wrenn_api::SandboxesMetrics),
        (status = 400, description = "No ids, or too many", body = wrenn_api::Error),
    ))]
pub(super) async fn metrics_of_many(
    TeamCall { plane, team, .. }: TeamCall,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let mut ids: Vec<String> = Vec::new();
    for (key, value) in url_pairs(query.as_deref().unwrap_or("")) {
        if key == "sandbox_ids" || key == "sandboxIds" {
            ids.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(str::to_string),
            );
        }
    }
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Err(ApiError::bad_request(
            "sandbox_ids is required: a comma-separated list of sandbox IDs",
        ));
    }
    if ids.len() > MAX_METRICS_SANDBOXES {
        return Err(ApiError::bad_request(format!(
            "sandbox_ids names {} sandboxes; at most {MAX_METRICS_SANDBOXES} at once",
            ids.len()
        )));
    }
    let mut sandboxes = std::collections::BTreeMap::new();
    let mut unsampled = Vec::new();
    for id in &ids {
        let Ok(row) = owned(&plane, &team, id).await else {
            continue;
        };
        if row.state != SandboxState::Running {
            continue;
        }
        // Its newest stored sample, unless it is older than two collections (a sandbox just
        // made or resumed): then one read now.
        let fresh = plane.telemetry.settings.collect_interval.as_millis() as i64 * 2 + 10_000;
        match plane.store.latest_metric(&row.id, &team.0).await? {
            Some(latest) if wrenn_core::now_ms() - latest.at_ms <= fresh => {
                sandboxes.insert(row.id.clone(), sandbox_metric(&latest));
            }
            _ => unsampled.push(row),
        }
    }
    let live =
        futures_util::future::join_all(unsampled.iter().map(|row| live_metric(&plane, row))).await;
    for (row, sample) in unsampled.iter().zip(live) {
        if let Some(sample) = sample {
            sandboxes.insert(row.id.clone(), sample);
        }
    }
    Ok(axum::Json(wrenn_api::SandboxesMetrics { sandboxes }).into_response())
}

/// A stored line as E2B's `SandboxLogEntry`.
fn log_entry(row: &SandboxLogRow) -> wrenn_api::SandboxLogEntry {
    let at = chrono::DateTime::from_timestamp_millis(row.at_ms).unwrap_or_default();
    let fields: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&row.fields).unwrap_or_default();
    wrenn_api::SandboxLogEntry {
        timestamp: at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        message: row.message.clone(),
        level: row.level.clone(),
        fields: fields
            .into_iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(text) => (name, text),
                other => (name, other.to_string()),
            })
            .collect(),
    }
}

/// A sandbox's log lines as a query selects them, or a 404.
async fn log_lines(
    plane: &ControlPlane,
    team: &TeamId,
    id: &str,
    query: LogLinesQuery,
) -> Result<Vec<SandboxLogRow>, ApiError> {
    let id = id.split('-').next().unwrap_or(id).to_string();
    plane
        .sandbox_log(LogLinesQuery {
            sandbox_id: id.clone(),
            team_id: team.0.clone(),
            ..query
        })
        .await?
        .ok_or_else(|| ApiError::not_found(&id))
}

/// A `limit` from 1 to [`MAX_LOG_LINES`] (default: that).
fn log_limit(pairs: &[(String, String)]) -> Result<usize, ApiError> {
    match integer_parameter(pairs, "limit")? {
        None => Ok(MAX_LOG_LINES),
        Some(limit) if (0..=MAX_LOG_LINES as i64).contains(&limit) => Ok(limit.max(1) as usize),
        Some(limit) => Err(ApiError::bad_request(format!(
            "limit must be from 0 to {MAX_LOG_LINES}, not {limit}"
        ))),
    }
}

/// `GET /sandboxes/{id}/logs?start=&limit=`: the sandbox's log from `start` (Unix ms), oldest
/// first, as E2B's v1 gives it (each line as text, and as an entry with level and fields).
#[utoipa::path(get, path = "/sandboxes/{id}/logs", tag = "sandboxes", security(("api_key" = [])),
    params(
        ("start" = Option<i64>, Query, description = "Unix milliseconds: lines from then (default: the first kept)"),
        ("limit" = Option<i64>, Query, description = "At most this many lines (default and most: 1000)"),
    ),
    responses(
        (status = 200, description = "Its lines, oldest first", body = wrenn_api::SandboxLogs),
        (status = 400, description = "A bad start or limit", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team, and no log of one kept", body = wrenn_api::Error),
    ))]
pub(super) async fn logs_v1(
    SandboxCall { plane, team, id }: SandboxCall,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let pairs = url_pairs(query.as_deref().unwrap_or(""));
    let query = LogLinesQuery {
        cursor_ms: integer_parameter(&pairs, "start")?,
        forward: true,
        limit: log_limit(&pairs)?,
        ..LogLinesQuery::default()
    };
    let rows = log_lines(&plane, &team, &id, query).await?;
    let entries: Vec<wrenn_api::SandboxLogEntry> = rows.iter().map(log_entry).collect();
    let logs = entries
        .iter()
        .map(|entry| wrenn_api::SandboxLog {
            timestamp: entry.timestamp.clone(),
            line: entry.message.clone(),
        })
        .collect();
    Ok(axum::Json(wrenn_api::SandboxLogs {
        logs,
        log_entries: entries,
    })
    .into_response())
}

/// `GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=`: the sandbox's log
/// lines, `forward` from `cursor` (Unix ms) oldest first, or `backward` to it newest first; of
/// `level` or more severe; whose message holds `search` (any case).
#[utoipa::path(get, path = "/v2/sandboxes/{id}/logs", tag = "sandboxes", security(("api_key" = [])),
    params(
        ("cursor" = Option<i64>, Query, description = "Unix milliseconds: forward, lines from then (default: the first kept); backward, lines up to then (default: now)"),
        ("limit" = Option<i64>, Query, description = "At most this many lines (default and most: 1000)"),
        ("direction" = Option<String>, Query, description = "forward (default) or backward"),
        ("level" = Option<String>, Query, description = "debug, info, warn or error: lines of that level or more severe"),
        ("search" = Option<String>, Query, description = "Lines whose message holds this text (any case)"),
    ),
    responses(
        (status = 200, description = "Its lines", body = wrenn_api::SandboxLogsV2),
        (status = 400, description = "A bad cursor, limit, direction or level", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team, and no log of one kept", body = wrenn_api::Error),
    ))]
pub(super) async fn logs_v2(
    SandboxCall { plane, team, id }: SandboxCall,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let pairs = url_pairs(query.as_deref().unwrap_or(""));
    let forward = match text_parameter(&pairs, "direction").as_deref() {
        None | Some("forward") => true,
        Some("backward") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "direction must be forward or backward, not {other:?}"
            )));
        }
    };
    let min_level = match text_parameter(&pairs, "level") {
        None => None,
        Some(level) if crate::store::telemetry::LEVELS.contains(&level.as_str()) => Some(level),
        Some(level) => {
            return Err(ApiError::bad_request(format!(
                "level must be debug, info, warn or error, not {level:?}"
            )));
        }
    };
    let query = LogLinesQuery {
        cursor_ms: integer_parameter(&pairs, "cursor")?,
        forward,
        limit: log_limit(&pairs)?,
        min_level,
        search: text_parameter(&pairs, "search"),
        ..LogLinesQuery::default()
    };
    let rows = log_lines(&plane, &team, &id, query).await?;
    let logs = rows.iter().map(log_entry).collect();
    Ok(axum::Json(wrenn_api::SandboxLogsV2 { logs }).into_response())
}

/// `GET /v1/usage?start=&end=` (`YYYY-MM-DD`, UTC, both included; default: the last 30
/// days): the team's use by day.
#[utoipa::path(get, path = "/v1/usage", tag = "usage", security(("api_key" = [])),
    params(
        ("start" = Option<String>, Query, description = "The first day, YYYY-MM-DD (default: 29 days before end)"),
        ("end" = Option<String>, Query, description = "The last day, YYYY-MM-DD (default: today, UTC)"),
    ),
    responses(
        (status = 200, description = "Its use by day, oldest first", body = wrenn_api::TeamUsage),
        (status = 400, description = "A day that is not YYYY-MM-DD, or start after end", body = wrenn_api::Error),
    ))]
pub(super) async fn usage(
    TeamCall { plane, team, .. }: TeamCall,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let pairs = url_pairs(query.as_deref().unwrap_or(""));
    let day = |name: &str| -> Result<Option<chrono::NaiveDate>, ApiError> {
        text_parameter(&pairs, name)
            .map(|text| {
                chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d").map_err(|_| {
                    ApiError::bad_request(format!(
                        "{name} must be a day as YYYY-MM-DD, not {text:?}"
                    ))
                })
            })
            .transpose()
    };
    let end = day("end")?.unwrap_or_else(|| chrono::Utc::now().date_naive());
    let start = match day("start")? {
        Some(start) => start,
        None => end
            .checked_sub_days(chrono::Days::new(29))
            .ok_or_else(|| ApiError::bad_request("end is too early a day"))?,
    };
    if start > end {
        return Err(ApiError::bad_request("start is after end"));
    }
    let format = |date: chrono::NaiveDate| date.format("%Y-%m-%d").to_string();
    let rows = plane
        .store
        .usage_of(&team.0, &format(start), &format(end))
        .await
        .map_err(crate::Error::from)?;
    let days: Vec<wrenn_api::UsageDay> = rows
        .iter()
        .map(|row| wrenn_api::UsageDay {
            day: row.day.clone(),
            sandbox_seconds: row.sandbox_ms as f64 / 1000.0,
            gib_seconds: row.mib_ms as f64 / 1024.0 / 1000.0,
        })
        .collect();
    Ok(axum::Json(wrenn_api::TeamUsage {
        team_id: team.0.clone(),
        total_sandbox_seconds: days.iter().map(|day| day.sandbox_seconds).sum(),
        total_gib_seconds: days.iter().map(|day| day.gib_seconds).sum(),
        days,
    })
    .into_response())
}
