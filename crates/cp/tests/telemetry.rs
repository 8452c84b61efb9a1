//! What hosts saw of their sandboxes, through the REST API: metrics history with its tiers,
//! the multi-sandbox route, logs (v1 and v2), a team's use by day, and the Prometheus metrics;
//! over an in-memory host agent whose samples and log lines the tests write, and a real SQLite
//! store. The real agent's sampling and console reading are the platform suite's (QEMU).

use std::sync::Arc;

use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use wrenn_agent_api::fake::{FakeAgent, template};
use wrenn_cp::ControlPlane;
use wrenn_cp::fleet::{EMBEDDED_HOST_ID, Fleet, FleetConfig, LeastLoaded};
use wrenn_cp::store::{ApiKey, Store, Team};
use wrenn_cp::telemetry::TelemetrySettings;
use wrenn_proto::agent::{SandboxLogLine, SandboxSample};

const METRICS_TOKEN: &str = "scrape-secret";

struct Kit {
    plane: Arc<ControlPlane>,
    agent: Arc<FakeAgent>,
    key_a: String,
    key_b: String,
    _dir: tempfile::TempDir,
}

async fn add_team(store: &Store, name: &str) -> String {
    store
        .create_team(Team {
            id: format!("team-{name}"),
            name: name.into(),
            created_at_ms: 0,
            admin: false,
        })
        .await
        .unwrap();
    let (key, hash) = wrenn_cp::auth::new_key().unwrap();
    store
        .add_key(
            ApiKey {
                id: format!("key-{name}"),
                team_id: format!("team-{name}"),
                name: name.into(),
                prefix: key[..10].into(),
                created_at_ms: 0,
                revoked: false,
                role: wrenn_cp::store::Role::Owner,
                mask_suffix: key[40..].into(),
            },
            hash,
        )
        .await
        .unwrap();
    key
}

impl Kit {
    async fn new(settings: TelemetrySettings) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cp.db")).unwrap();
        let key_a = add_team(&store, "a").await;
        let key_b = add_team(&store, "b").await;
        let agent = Arc::new(FakeAgent::new(8, vec![template("base", 512)]));
        let fleet = Fleet::load(
            &store,
            FleetConfig::default(),
            Box::new(LeastLoaded),
            Some(agent.clone()),
        )
        .await
        .unwrap();
        let (plane, _wake) = ControlPlane::new(store, fleet, None, true);
        let plane = plane
            .with_telemetry(settings)
            .with_metrics_token(Some(METRICS_TOKEN.into()));
        Kit {
            plane: Arc::new(plane),
            agent,
            key_a,
            key_b,
            _dir: dir,
        }
    }

    /// A request through the router: status and body (JSON, or the text when it is not),
    /// checked against the OpenAPI document when it is JSON.
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let body = if body.is_null() {
            axum::body::Body::empty()
        } else {
            request = request.header("content-type", "application/json");
            axum::body::Body::from(body.to_string())
        };
        let response = wrenn_cp::http::router(self.plane.clone())
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if !value.is_string() {
            let document = serde_json::to_value(wrenn_cp::http::openapi::document()).unwrap();
            let route = path.split('?').next().unwrap_or(path);
            if let Err(problem) =
                wrenn_api::conformance::check(&document, method, route, status.as_u16(), &value)
            {
                panic!(
                    "{method} {path} -> {status}: breaks the OpenAPI document: {problem}\n{value}"
                );
            }
        }
        (status, value)
    }

    async fn get(&self, path: &str, key: &str) -> (StatusCode, Value) {
        self.call("GET", path, Some(key), Value::Null).await
    }

    async fn create(&self) -> String {
        let (status, created) = self
            .call(
                "POST",
                "/sandboxes",
                Some(&self.key_a),
                json!({"templateID": "base"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["sandboxID"].as_str().unwrap().to_string()
    }

    /// The in-process host's buffer collected into the store now.
    async fn collect(&self) -> wrenn_cp::telemetry::Collected {
        let host = self.plane.fleet.host(EMBEDDED_HOST_ID).unwrap();
        self.plane.collect_telemetry(&host).await.unwrap()
    }

    fn sample(&self, sandbox: &str, at_ms: i64, cpu: f64, mem_used: u64) {
        self.agent.telemetry_buffer().record_sample(SandboxSample {
            sandbox_id: sandbox.into(),
            at_ms,
            cpu_count: 2,
            cpu_used_pct: cpu,
            mem_used,
            mem_total: 512 << 20,
            disk_used: 1 << 30,
            disk_total: 2 << 30,
            net_rx_bytes: 1000,
            net_tx_bytes: 2000,
            ..SandboxSample::default()
        });
    }

    fn log(&self, sandbox: &str, at_ms: i64, level: &str, message: &str, source: &str) {
        self.agent.telemetry_buffer().record_log(SandboxLogLine {
            sandbox_id: sandbox.into(),
            at_ms,
            level: level.into(),
            message: message.into(),
            fields_json: json!({"source": source}).to_string(),
            ..SandboxLogLine::default()
        });
    }
}

/// `field` of each entry of the array at `key`.
fn messages(body: &Value, key: &str, field: &str) -> Vec<String> {
    body[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry[field].as_str().unwrap().to_string())
        .collect()
}

fn cpu_series(samples: &Value) -> Vec<f64> {
    samples
        .as_array()
        .unwrap()
        .iter()
        .map(|sample| sample["cpuUsedPct"].as_f64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_sandboxs_samples_are_its_history_by_range_and_no_other_teams() {
    let kit = Kit::new(TelemetrySettings::default()).await;
    let id = kit.create().await;
    let now = wrenn_core::now_ms();
    // Busy for three samples, then idle.
    for (n, cpu) in [95.0, 97.0, 96.0, 1.0, 0.5].into_iter().enumerate() {
        kit.sample(&id, now - 25_000 + 5_000 * n as i64, cpu, 100 << 20);
    }
    let collected = kit.collect().await;
    assert_eq!(collected.samples, 5);

    let (status, all) = kit
        .get(&format!("/sandboxes/{id}/metrics"), &kit.key_a)
        .await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(cpu_series(&all), [95.0, 97.0, 96.0, 1.0, 0.5]);
    assert_eq!(all[0]["memUsed"], 100 << 20);
    assert_eq!(all[0]["cpuCount"], 2);
    assert_eq!(all[0]["netRxBytes"], 1000);
    let first_second = (now - 25_000) / 1000;
    assert_eq!(all[0]["timestampUnix"], first_second);

    // The busy part alone: from the first sample's second to the third's.
    let busy = format!(
        "/sandboxes/{id}/metrics?start={}&end={}",
        first_second,
        (now - 15_000) / 1000
    );
    let (_, ranged) = kit.get(&busy, &kit.key_a).await;
    assert_eq!(cpu_series(&ranged), [95.0, 97.0, 96.0]);
    // The idle part alone.
    let idle = format!("/sandboxes/{id}/metrics?start={}", (now - 10_000) / 1000);
    let (_, idle) = kit.get(&idle, &kit.key_a).await;
    assert_eq!(cpu_series(&idle), [1.0, 0.5]);

    let (status, _) = kit
        .get(&format!("/sandboxes/{id}/metrics"), &kit.key_b)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another team's sandbox");
    let (status, _) = kit.get("/sandboxes/nosuch/metrics", &kit.key_a).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, bad) = kit
        .get(&format!("/sandboxes/{id}/metrics?start=soon"), &kit.key_a)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad["message"].as_str().unwrap().contains("start"), "{bad}");
    let (status, _) = kit
        .get(
            &format!("/sandboxes/{id}/metrics?start=10&end=5"),
            &kit.key_a,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The multi-sandbox route: the newest stored sample of each of the team's.
    let other = kit.create().await;
    kit.sample(&other, now, 42.0, 1);
    kit.collect().await;
    let (status, many) = kit
        .get(
            &format!("/sandboxes/metrics?sandbox_ids={id},{other},nosuch"),
            &kit.key_a,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{many}");
    let sandboxes = many["sandboxes"].as_object().unwrap();
    assert_eq!(sandboxes.len(), 2, "{many}");
    assert_eq!(sandboxes[&id]["cpuUsedPct"], 0.5);
    assert_eq!(sandboxes[&other]["cpuUsedPct"], 42.0);
    let (_, theirs) = kit
        .get(&format!("/sandboxes/metrics?sandbox_ids={id}"), &kit.key_b)
        .await;
    assert!(theirs["sandboxes"].as_object().unwrap().is_empty());

    // Killed, its history stays its team's.
    let (status, _) = kit
        .call(
            "DELETE",
            &format!("/sandboxes/{id}"),
            Some(&kit.key_a),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, kept) = kit
        .get(&format!("/sandboxes/{id}/metrics"), &kit.key_a)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cpu_series(&kept).len(), 5);
    let (status, _) = kit
        .get(&format!("/sandboxes/{id}/metrics"), &kit.key_b)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn history_is_downsampled_into_minutes_then_ten_minutes_as_the_clock_moves() {
    let kit = Kit::new(TelemetrySettings::default()).await;
    let id = kit.create().await;
    // An hour's worth of samples every 5 s, an hour and a half ago... measured from a
    // start on a ten-minute boundary, by a clock the test moves.
    let start = 1_800_000_000_000_i64; // 2027-01-15, on a ten-minute boundary
    for n in 0..720_i64 {
        // Minute m: CPU m % 10 * 10 (its twelve samples alike); memory rising.
        let minute = n / 12;
        kit.sample(
            &id,
            start + n * 5_000,
            (minute % 10) as f64 * 10.0,
            n as u64,
        );
    }
    kit.collect().await;
    let plane = &kit.plane;
    let rows = |now: i64| {
        let plane = plane.clone();
        let id = id.clone();
        async move {
            plane
                .metrics_history("team-a", &id, 0, i64::MAX, now)
                .await
                .unwrap()
                .unwrap()
        }
    };
    // Within the hour: every sample as taken.
    assert_eq!(rows(start + 3_600_000).await.len(), 720);

    // Two hours on, maintained: the samples are minutes' averages.
    let later = start + 2 * 3_600_000;
    plane.maintain_telemetry(later).await.unwrap();
    let minutes = rows(later).await;
    assert_eq!(minutes.len(), 60, "one row a minute");
    assert_eq!(minutes[0].at_ms, start);
    assert_eq!(minutes[3].cpu_used_pct, 30.0);
    assert_eq!(minutes[0].mem_used, 6, "the average of 0..=11, rounded");
    let taken = plane
        .store
        .metrics_between(&id, "team-a", 0, 0, i64::MAX, 10_000)
        .await
        .unwrap();
    assert!(
        taken.is_empty(),
        "samples past the hour are forgotten once rolled up"
    );

    // Two days on: ten minutes' averages, the minutes forgotten.
    let days = start + 2 * 86_400_000;
    plane.maintain_telemetry(days).await.unwrap();
    let tens = rows(days).await;
    assert_eq!(tens.len(), 6, "one row per ten minutes");
    assert_eq!(tens[0].cpu_used_pct, 45.0, "the average of 0, 10, … 90");
    // A range picks its part of them.
    let ranged = plane
        .metrics_history("team-a", &id, start + 600_000, start + 1_800_000, days)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ranged.len(), 2);

    // Past the month, nothing is left (the sandbox is still known: an empty history).
    let month = start + 31 * 86_400_000;
    plane.maintain_telemetry(month).await.unwrap();
    assert!(rows(month).await.is_empty());
}

#[tokio::test]
async fn logs_are_read_forward_backward_by_level_and_text_and_outlive_the_sandbox() {
    let kit = Kit::new(TelemetrySettings::default()).await;
    let id = kit.create().await;
    let now = wrenn_core::now_ms();
    kit.log(
        &id,
        now - 3_000,
        "info",
        "hello from the console",
        "console",
    );
    kit.log(&id, now - 2_000, "info", "process started", "envd");
    kit.log(&id, now - 1_000, "warn", "disk almost full", "envd");
    let collected = kit.collect().await;
    assert_eq!(collected.lines, 3);

    let (status, v2) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_a)
        .await;
    assert_eq!(status, StatusCode::OK, "{v2}");
    assert_eq!(
        messages(&v2, "logs", "message"),
        [
            "hello from the console",
            "process started",
            "disk almost full"
        ]
    );
    assert_eq!(v2["logs"][1]["fields"]["source"], "envd");
    assert_eq!(v2["logs"][2]["level"], "warn");

    let back = format!("/v2/sandboxes/{id}/logs?direction=backward&limit=2");
    let (_, back) = kit.get(&back, &kit.key_a).await;
    assert_eq!(
        messages(&back, "logs", "message"),
        ["disk almost full", "process started"]
    );
    let from = format!("/v2/sandboxes/{id}/logs?cursor={}", now - 2_000);
    let (_, from) = kit.get(&from, &kit.key_a).await;
    assert_eq!(messages(&from, "logs", "message").len(), 2);
    let (_, warned) = kit
        .get(&format!("/v2/sandboxes/{id}/logs?level=warn"), &kit.key_a)
        .await;
    assert_eq!(messages(&warned, "logs", "message"), ["disk almost full"]);
    let (_, found) = kit
        .get(
            &format!("/v2/sandboxes/{id}/logs?search=CONSOLE"),
            &kit.key_a,
        )
        .await;
    assert_eq!(
        messages(&found, "logs", "message"),
        ["hello from the console"]
    );
    for bad in ["direction=sideways", "level=loud", "limit=5000", "cursor=x"] {
        let (status, _) = kit
            .get(&format!("/v2/sandboxes/{id}/logs?{bad}"), &kit.key_a)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }

    let (status, v1) = kit.get(&format!("/sandboxes/{id}/logs"), &kit.key_a).await;
    assert_eq!(status, StatusCode::OK, "{v1}");
    assert_eq!(messages(&v1, "logs", "line").len(), 3);
    assert_eq!(
        messages(&v1, "logEntries", "level"),
        ["info", "info", "warn"]
    );

    let (status, _) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_b)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another team's sandbox");

    // A line the host reads at the destroy is collected by the kill, and kept after it.
    kit.log(
        &id,
        wrenn_core::now_ms(),
        "info",
        "the last words",
        "console",
    );
    let (status, _) = kit
        .call(
            "DELETE",
            &format!("/sandboxes/{id}"),
            Some(&kit.key_a),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, after) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_a)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        messages(&after, "logs", "message").last().unwrap(),
        "the last words"
    );
    let (status, _) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_b)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A week on, the log of a sandbox gone is forgotten.
    kit.plane
        .maintain_telemetry(wrenn_core::now_ms() + 8 * 86_400_000)
        .await
        .unwrap();
    let (status, _) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_a)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn lines_a_later_collection_brings_after_the_kill_are_still_the_teams() {
    let kit = Kit::new(TelemetrySettings::default()).await;
    let id = kit.create().await;
    let (status, _) = kit
        .call(
            "DELETE",
            &format!("/sandboxes/{id}"),
            Some(&kit.key_a),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The host's last read of the console reaches the control plane after the kill's own
    // collection (it timed out, say): the next collection still knows whose lines they are.
    kit.log(&id, wrenn_core::now_ms(), "info", "late words", "console");
    kit.collect().await;
    let (status, after) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_a)
        .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(messages(&after, "logs", "message"), ["late words"]);
    let (status, _) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_b)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_sandboxs_log_keeps_its_newest_lines_within_the_cap() {
    let kit = Kit::new(TelemetrySettings {
        log_cap_chars: 2_000,
        ..TelemetrySettings::default()
    })
    .await;
    let id = kit.create().await;
    let now = wrenn_core::now_ms();
    // 500 lines of 100 characters and their fields: 50,000 characters against 2,000.
    for n in 0..500 {
        let message = format!("{n:04} {}", "x".repeat(95));
        kit.log(&id, now - 500 + n, "info", &message, "console");
    }
    kit.collect().await;
    let (_, body) = kit
        .get(&format!("/v2/sandboxes/{id}/logs"), &kit.key_a)
        .await;
    let lines = body["logs"].as_array().unwrap();
    let kept: usize = lines
        .iter()
        .map(|line| line["message"].as_str().unwrap().len() + r#"{"source":"console"}"#.len())
        .sum();
    assert!(kept <= 2_000, "{kept} characters kept");
    assert!(lines.len() >= 10, "{} lines", lines.len());
    assert!(
        lines.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .starts_with("0499"),
        "the newest line stays"
    );
}

#[tokio::test]
async fn a_teams_use_is_counted_by_day_from_its_samples() {
    let kit = Kit::new(TelemetrySettings::default()).await;
    let id = kit.create().await;
    let now = wrenn_core::now_ms();
    // Twelve samples 5 s apart: the first stands for one interval, each later one for the
    // 5 s since the one before: 60 s at 512 MiB.
    for n in 0..12 {
        kit.sample(&id, now - 60_000 + n * 5_000, 10.0, 1);
    }
    kit.collect().await;
    let (status, usage) = kit.get("/v1/usage", &kit.key_a).await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["teamID"], "team-a");
    let total = usage["totalSandboxSeconds"].as_f64().unwrap();
    assert!((total - 60.0).abs() < 0.001, "{usage}");
    let gib = usage["totalGibSeconds"].as_f64().unwrap();
    assert!((gib - 30.0).abs() < 0.001, "{usage}");
    // A gap (a pause) is not counted whole: at most two intervals.
    kit.sample(&id, now + 3_600_000, 10.0, 1);
    kit.collect().await;
    let (_, usage) = kit
        .get("/v1/usage?start=2020-01-01&end=2100-12-31", &kit.key_a)
        .await;
    let total = usage["totalSandboxSeconds"].as_f64().unwrap();
    assert!((total - 70.0).abs() < 0.001, "{usage}");
    let (_, theirs) = kit.get("/v1/usage", &kit.key_b).await;
    assert_eq!(theirs["totalSandboxSeconds"], 0.0);
    for bad in ["start=yesterday", "start=2026-12-02&end=2026-12-01"] {
        let (status, _) = kit.get(&format!("/v1/usage?{bad}"), &kit.key_a).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// The value of the sample `name` (with its labels, as written) in an OpenMetrics text.
fn sample_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(kit: &Kit, token: Option<&str>) -> (StatusCode, String) {
    let mut request = Request::builder().uri("/metrics");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = wrenn_cp::http::router(kit.plane.clone())
        .oneshot(request.body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn the_prometheus_metrics_need_the_token_and_move_with_creates() {
    let kit = Kit::new(TelemetrySettings::default()).await;
    wrenn_cp::metrics::register_all();
    let (status, _) = scrape(&kit, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = scrape(&kit, Some("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, before) = scrape(&kit, Some(METRICS_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    let created = r#"wrenn_sandbox_creates_total{outcome="created"}"#;
    let count_before = sample_value(&before, created).unwrap();
    kit.create().await;
    kit.create().await;
    let (_, after) = scrape(&kit, Some(METRICS_TOKEN)).await;
    // Other tests of this process may create too: at least these two.
    assert!(sample_value(&after, created).unwrap() >= count_before + 2.0);
    assert!(sample_value(&after, r#"wrenn_sandboxes{state="running"}"#).unwrap() >= 2.0);
    assert!(after.contains("# TYPE wrenn_http_request_duration_seconds histogram"));
    assert!(
        after.contains(r#"route="/sandboxes""#),
        "request metrics are labelled by route"
    );
    assert!(after.contains("wrenn_store_call_duration_seconds_count{backend=\"sqlite\"}"));
    assert!(after.ends_with("# EOF\n"));
}
