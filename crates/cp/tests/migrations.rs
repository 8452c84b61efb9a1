//! The store's migrations on both backends: a database made by an older wrenn, with rows in it,
//! is upgraded when the store opens it and every row reads back through the store with its
//! values (and the new columns' defaults); and several control planes opening one fresh
//! database at once all succeed, the schema applied once. SQLite always; PostgreSQL when
//! `WRENN_TEST_DATABASE_URL` names a server (scripts/postgres.sh), each database a schema of
//! its own; without it the PostgreSQL half is skipped with a message, or fails where
//! `WRENN_REQUIRE_PREREQUISITES=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wrenn_cp::store::{
    ApiKey, HostRow, ListQuery, SandboxRow, SandboxState, Store, StoreResult, Team, postgres,
    sqlite,
};

/// The rows an older wrenn kept at the first schema (migration 0001), the same SQL on both
/// backends: the `default` team and another, a live key and a revoked one, a running sandbox
/// with metadata and a paused one without.
const ROWS_AT_0001: &str = r#"
INSERT INTO teams (id, name, created_at_ms) VALUES
    ('t-default', 'default', 1000), ('t-ci', 'ci', 2000);
INSERT INTO api_keys (id, team_id, name, hash, prefix, created_at_ms, revoked_at_ms) VALUES
    ('k-live', 't-ci', 'deploy', 'sha256:live', 'e2b_1a', 3000, NULL),
    ('k-old', 't-ci', 'old', 'sha256:revoked', 'e2b_2b', 3500, 4000);
INSERT INTO sandboxes (id, team_id, template_id, alias, state, started_at_ms, end_at_ms,
        metadata, envd_access_token, auto_pause, allow_internet, cpu_count, memory_mb,
        envd_version) VALUES
    ('sb-run', 't-ci', 'tpl-base', 'base', 'running', 5000, 65000,
        '{"owner": "ci", "job": "42"}', 'envd-token', FALSE, TRUE, 2, 1024, '0.6.4'),
    ('sb-paused', 't-default', 'tpl-py', NULL, 'paused', 6000, 66000,
        '{}', NULL, TRUE, FALSE, 1, 512, '0.6.3');
"#;

/// A host an older wrenn registered at the second schema (migration 0002), before host
/// identities (0005).
const HOST_AT_0002: &str = r#"
INSERT INTO hosts (id, name, api_url, proxy_address, agent_token, heartbeat_hash, state, report,
        last_heartbeat_ms, registered_at_ms) VALUES
    ('h-1', 'alpha', 'http://127.0.0.1:49990', '127.0.0.1:49992', 'agent-token',
        'sha256:beat', 'up', '{"cpus": 8, "slots_total": 16}', 7000, 6500);
"#;

/// Where a store opens: an SQLite file, or a PostgreSQL URL scoped to one schema.
#[derive(Debug, Clone)]
enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Target {
    fn backend(&self) -> &'static str {
        match self {
            Target::Sqlite(_) => "sqlite",
            Target::Postgres(_) => "postgres",
        }
    }

    /// Opens the store as the control plane does, migrations and all.
    async fn open(&self) -> StoreResult<Store> {
        match self.clone() {
            Target::Sqlite(path) => tokio::task::spawn_blocking(move || Store::open(&path))
                .await
                .unwrap(),
            Target::Postgres(url) => {
                Store::open_configured(Path::new("/nonexistent"), Some(&url)).await
            }
        }
    }
}

/// A fresh, empty database of one backend, for one test.
struct Fresh {
    target: Target,
    /// The SQLite file's directory, removed when dropped.
    _dir: Option<tempfile::TempDir>,
    /// A connection to the PostgreSQL schema, to write and read it behind the store's back.
    client: Option<tokio_postgres::Client>,
}

impl Fresh {
    /// One fresh database of each backend this machine can test.
    async fn each() -> Vec<Fresh> {
        let dir = tempfile::tempdir().unwrap();
        let mut databases = vec![Fresh {
            target: Target::Sqlite(dir.path().join("wrenn.sqlite")),
            _dir: Some(dir),
            client: None,
        }];
        match std::env::var("WRENN_TEST_DATABASE_URL") {
            Ok(url) => databases.push(Fresh::postgres(&url).await),
            Err(_) => wrenn_testkit::missing_prerequisite(
                "the migration tests on PostgreSQL",
                "WRENN_TEST_DATABASE_URL is not set (scripts/postgres.sh starts the server)",
            ),
        }
        databases
    }

    /// A new schema of the server at `url`, and a client whose tables are in it.
    async fn postgres(url: &str) -> Fresh {
        let schema = format!("migrations_{}", wrenn_cp::auth::random_id(12).unwrap());
        connect(url)
            .await
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let scoped = format!("{url}?options=-csearch_path%3D{schema}");
        Fresh {
            client: Some(connect(&scoped).await),
            target: Target::Postgres(scoped),
            _dir: None,
        }
    }

    fn backend(&self) -> &'static str {
        self.target.backend()
    }

    /// Runs SQL statements on the database directly, as an older wrenn would have.
    async fn batch(&self, sql: &str) {
        match (&self.target, &self.client) {
            (_, Some(client)) => client.batch_execute(sql).await.unwrap(),
            (Target::Sqlite(path), None) => rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            (Target::Postgres(_), None) => unreachable!("a PostgreSQL database has a client"),
        }
    }

    /// Applies migration number `version` (1 for the first) alone and records it where the
    /// store's migrator does: SQLite's `user_version`, PostgreSQL's `wrenn_schema` table.
    async fn apply(&self, version: usize) {
        match &self.target {
            Target::Sqlite(path) => {
                let db = rusqlite::Connection::open(path).unwrap();
                db.execute_batch(sqlite::MIGRATIONS[version - 1]).unwrap();
                db.pragma_update(None, "user_version", version as i64)
                    .unwrap();
            }
            Target::Postgres(_) => {
                self.batch(postgres::MIGRATIONS[version - 1]).await;
                self.batch(&format!(
                    "CREATE TABLE IF NOT EXISTS wrenn_schema (version INTEGER NOT NULL);
                     INSERT INTO wrenn_schema (version) VALUES ({version})"
                ))
                .await;
            }
        }
    }

    /// The migrations the database records as applied, one entry per record: SQLite keeps
    /// only how many (`user_version`), PostgreSQL a row per migration.
    async fn recorded_versions(&self) -> Vec<i64> {
        match (&self.target, &self.client) {
            (_, Some(client)) => client
                .query(
                    "SELECT version::BIGINT FROM wrenn_schema ORDER BY version",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect(),
            (Target::Sqlite(path), None) => {
                let db = rusqlite::Connection::open(path).unwrap();
                let applied: i64 = db
                    .pragma_query_value(None, "user_version", |row| row.get(0))
                    .unwrap();
                (1..=applied).collect()
            }
            (Target::Postgres(_), None) => unreachable!("a PostgreSQL database has a client"),
        }
    }
}

/// A client of the PostgreSQL server at `url`, its connection driven in the background.
async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// Every migration, once each, in order.
fn every_version() -> Vec<i64> {
    (1..=sqlite::MIGRATIONS.len() as i64).collect()
}

/// Each backend's database made by an older wrenn: for each `(version, rows)` of `history`, in
/// order, that migration alone is applied and then the rows are written; then the store opens
/// it, applying the rest.
async fn upgraded(history: &[(usize, &str)]) -> Vec<(Fresh, Store)> {
    let mut upgraded = Vec::new();
    for fresh in Fresh::each().await {
        for (version, rows) in history {
            fresh.apply(*version).await;
            fresh.batch(rows).await;
        }
        let store = fresh.target.open().await.unwrap_or_else(|error| {
            panic!(
                "{}: the old database did not open: {error}",
                fresh.backend()
            )
        });
        assert_eq!(
            fresh.recorded_versions().await,
            every_version(),
            "{}: every migration applied once after the upgrade",
            fresh.backend()
        );
        upgraded.push((fresh, store));
    }
    upgraded
}

/// The sandbox `ROWS_AT_0001` has running, as the upgraded store must read it: the columns
/// later migrations added have their defaults (`host_id` `local`, no traffic token, no resume).
fn running_sandbox() -> SandboxRow {
    SandboxRow {
        id: "sb-run".into(),
        team_id: "t-ci".into(),
        template_id: "tpl-base".into(),
        alias: Some("base".into()),
        state: SandboxState::Running,
        started_at_ms: 5000,
        end_at_ms: 65000,
        metadata: BTreeMap::from([
            ("job".to_string(), "42".to_string()),
            ("owner".to_string(), "ci".to_string()),
        ]),
        envd_access_token: Some("envd-token".into()),
        auto_pause: false,
        allow_internet: true,
        cpu_count: 2,
        memory_mb: 1024,
        envd_version: "0.6.4".into(),
        host_id: "local".into(),
        traffic_access_token: None,
        auto_resume: false,
        auto_pause_memory: true,
        paused_disk_only: false,
        network: Default::default(),
    }
}

/// The paused sandbox of `ROWS_AT_0001`, upgraded.
fn paused_sandbox() -> SandboxRow {
    SandboxRow {
        id: "sb-paused".into(),
        team_id: "t-default".into(),
        template_id: "tpl-py".into(),
        alias: None,
        state: SandboxState::Paused,
        started_at_ms: 6000,
        end_at_ms: 66000,
        metadata: BTreeMap::new(),
        envd_access_token: None,
        auto_pause: true,
        allow_internet: false,
        cpu_count: 1,
        memory_mb: 512,
        envd_version: "0.6.3".into(),
        host_id: "local".into(),
        traffic_access_token: None,
        auto_resume: false,
        auto_pause_memory: true,
        paused_disk_only: false,
        network: Default::default(),
    }
}

/// `ROWS_AT_0001` read back through the upgraded `store` of `backend`: teams (`default` made
/// an admin by migration 0004), keys, sandboxes, and listings over them.
async fn assert_first_schemas_rows(backend: &str, store: &Store) {
    let team = |id: &str, name: &str, created_at_ms, admin| Team {
        id: id.into(),
        name: name.into(),
        created_at_ms,
        admin,
    };
    assert_eq!(
        store.team_by_name("default").await.unwrap(),
        Some(team("t-default", "default", 1000, true)),
        "{backend}: the default team, an admin since 0004"
    );
    assert_eq!(
        store.team_by_id("t-ci").await.unwrap(),
        Some(team("t-ci", "ci", 2000, false)),
        "{backend}: another team, not an admin"
    );
    assert_eq!(
        store.team_of_key("sha256:live").await.unwrap().as_deref(),
        Some("t-ci"),
        "{backend}: a live key still resolves"
    );
    assert_eq!(
        store.team_of_key("sha256:revoked").await.unwrap(),
        None,
        "{backend}: a revoked key stays revoked"
    );
    let key = |id: &str, name: &str, prefix: &str, created_at_ms, revoked| ApiKey {
        id: id.into(),
        team_id: "t-ci".into(),
        name: name.into(),
        prefix: prefix.into(),
        created_at_ms,
        revoked,
        // Keys from before roles are owners; their last characters were not kept.
        role: wrenn_cp::store::Role::Owner,
        mask_suffix: String::new(),
    };
    assert_eq!(
        store.list_keys("t-ci").await.unwrap(),
        [
            key("k-live", "deploy", "e2b_1a", 3000, false),
            key("k-old", "old", "e2b_2b", 3500, true)
        ],
        "{backend}: the keys"
    );
    assert_eq!(
        store.sandbox("sb-run").await.unwrap(),
        Some(running_sandbox()),
        "{backend}: the running sandbox, new columns at their defaults"
    );
    assert_eq!(
        store.sandbox("sb-paused").await.unwrap(),
        Some(paused_sandbox()),
        "{backend}: the paused sandbox"
    );
    let by_owner = ListQuery {
        team_id: "t-ci".into(),
        metadata: BTreeMap::from([("owner".to_string(), "ci".to_string())]),
        limit: 10,
        ..ListQuery::default()
    };
    let (page, running) = store.list(by_owner).await.unwrap();
    assert_eq!(
        (page, running),
        (vec![running_sandbox()], 1),
        "{backend}: an old row's metadata still filters a listing"
    );
    assert_eq!(
        store.sandboxes_on_host("local").await.unwrap().len(),
        2,
        "{backend}: the old sandboxes are on the host the migration named"
    );
    assert_eq!(
        store.expired(70000).await.unwrap(),
        [running_sandbox()],
        "{backend}: the running sandbox expires"
    );
}

#[tokio::test]
async fn an_upgrade_from_the_first_schema_keeps_every_row_readable() {
    for (fresh, store) in upgraded(&[(1, ROWS_AT_0001)]).await {
        let backend = fresh.backend();
        assert_first_schemas_rows(backend, &store).await;
        assert!(store.hosts().await.unwrap().is_empty(), "{backend}");
        // The upgraded store writes the new columns too.
        let guarded = SandboxRow {
            id: "sb-new".into(),
            traffic_access_token: Some("traffic".into()),
            auto_resume: true,
            host_id: "h-2".into(),
            ..running_sandbox()
        };
        store.put_sandbox(guarded.clone()).await.unwrap();
        assert_eq!(
            store.sandbox("sb-new").await.unwrap(),
            Some(guarded),
            "{backend}"
        );
    }
}

#[tokio::test]
async fn an_upgrade_from_the_second_schema_keeps_its_hosts() {
    for (fresh, store) in upgraded(&[(1, ROWS_AT_0001), (2, HOST_AT_0002)]).await {
        let backend = fresh.backend();
        assert_first_schemas_rows(backend, &store).await;
        // The host as the old wrenn wrote it (the values of `HOST_AT_0002`, the report the same
        // JSON), its identity (0005) empty until it registers again.
        let host: HostRow = serde_json::from_value(serde_json::json!({
            "id": "h-1",
            "name": "alpha",
            "api_url": "http://127.0.0.1:49990",
            "proxy_address": "127.0.0.1:49992",
            "agent_token": "agent-token",
            "heartbeat_hash": "sha256:beat",
            "state": "up",
            "report": {"cpus": 8, "slots_total": 16},
            "last_heartbeat_ms": 7000,
            "registered_at_ms": 6500,
            "identity_hash": ""
        }))
        .unwrap();
        assert_eq!(
            store.hosts().await.unwrap(),
            std::slice::from_ref(&host),
            "{backend}: the host, with no identity until it registers again"
        );
        let registered = HostRow {
            identity_hash: "sha256:identity".into(),
            last_heartbeat_ms: 8000,
            ..host
        };
        store.put_host(registered.clone()).await.unwrap();
        assert_eq!(
            store.hosts().await.unwrap(),
            [registered],
            "{backend}: registered again, with an identity"
        );
    }
}

/// How many control planes open one fresh database at once.
const MIGRATORS: usize = 8;
/// How many fresh databases each backend gets (a race may need a few tries to show).
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrators_all_succeed_and_apply_the_schema_once() {
    for round in 0..ROUNDS {
        for fresh in Fresh::each().await {
            let backend = fresh.backend();
            let start = Arc::new(tokio::sync::Barrier::new(MIGRATORS));
            let migrators: Vec<_> = (0..MIGRATORS)
                .map(|_| {
                    let (target, start) = (fresh.target.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        target.open().await
                    })
                })
                .collect();
            let mut stores = Vec::new();
            for (migrator, opened) in migrators.into_iter().enumerate() {
                stores.push(opened.await.unwrap().unwrap_or_else(|error| {
                    panic!("{backend}, round {round}: migrator {migrator} failed: {error}")
                }));
            }
            assert_eq!(
                fresh.recorded_versions().await,
                every_version(),
                "{backend}, round {round}: every migration recorded once"
            );
            // Every store works on the one schema: what one writes, the others read.
            let team = Team {
                id: format!("t-{round}"),
                name: "concurrent".into(),
                created_at_ms: 1,
                admin: false,
            };
            stores[0].create_team(team.clone()).await.unwrap();
            for (migrator, store) in stores.iter().enumerate() {
                assert_eq!(
                    store.team_by_name("concurrent").await.unwrap().as_ref(),
                    Some(&team),
                    "{backend}, round {round}: migrator {migrator}'s store"
                );
            }
        }
    }
}
