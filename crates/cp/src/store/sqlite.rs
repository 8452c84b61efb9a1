//! The SQLite store: a file of the data directory (WAL, no setup). Calls run on the blocking pool
//! over one connection, which SQLite's single writer needs anyway. The migrations are
//! `migrations/sqlite/`, recorded in `user_version`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use rusqlite::types::Value;

use super::{
    ApiKey, HostRow, HostState, ListQuery, SandboxRow, SandboxState, StoreBackend, StoreError,
    StoreResult, Team, private_dir, sandbox_state,
};

/// A statement's owned values: `values![a, b]` is `vec![Value::from(a), Value::from(b)]`.
macro_rules! values {
    ($($value:expr),* $(,)?) => {
        vec![$(Value::from($value)),*]
    };
}

pub const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_teams_keys_sandboxes.sql"),
    include_str!("../../migrations/sqlite/0002_hosts.sql"),
    include_str!("../../migrations/sqlite/0003_traffic_token_auto_resume.sql"),
    include_str!("../../migrations/sqlite/0004_admin_teams.sql"),
    include_str!("../../migrations/sqlite/0005_host_identity.sql"),
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating) the database file and applies the migrations it lacks.
    pub fn open(path: &Path) -> StoreResult<Self> {
        private_files(path).map_err(|error| {
            StoreError::Unavailable(format!("securing {}: {error}", path.display()))
        })?;
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            connection.execute_batch(migration)?;
            connection.pragma_update(None, "user_version", index as i64 + 1)?;
        }
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> StoreResult<T> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            work(&mut connection).map_err(StoreError::from)
        })
        .await
        .map_err(|error| StoreError::Unavailable(error.to_string()))?
    }

    /// Runs one statement with owned values: how many rows it changed.
    async fn execute(&self, sql: &'static str, values: Vec<Value>) -> StoreResult<usize> {
        self.with(move |db| db.execute(sql, rusqlite::params_from_iter(values)))
            .await
    }

    /// Every row one query finds, with owned values, each made by `row_of`.
    async fn rows<T: Send + 'static>(
        &self,
        sql: String,
        values: Vec<Value>,
        row_of: fn(&rusqlite::Row<'_>) -> Result<T, rusqlite::Error>,
    ) -> StoreResult<Vec<T>> {
        self.with(move |db| {
            let mut statement = db.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), row_of)?;
            rows.collect()
        })
        .await
    }

    /// The first row a query finds, if any.
    async fn row<T: Send + 'static>(
        &self,
        sql: String,
        values: Vec<Value>,
        row_of: fn(&rusqlite::Row<'_>) -> Result<T, rusqlite::Error>,
    ) -> StoreResult<Option<T>> {
        Ok(self.rows(sql, values, row_of).await?.into_iter().next())
    }

    /// The sandboxes `SELECT_SANDBOX … WHERE condition` finds, with owned values.
    async fn sandboxes_where(
        &self,
        condition: &'static str,
        values: Vec<Value>,
    ) -> StoreResult<Vec<SandboxRow>> {
        let sql = format!("{SELECT_SANDBOX} WHERE {condition}");
        self.rows(sql, values, sandbox_row).await
    }

    async fn team_where(&self, column: &'static str, value: &str) -> StoreResult<Option<Team>> {
        let sql = format!("SELECT id, name, created_at_ms, admin FROM teams WHERE {column} = ?1");
        self.row(sql, values![value.to_string()], |row| {
            Ok(Team {
                id: row.get(0)?,
                name: row.get(1)?,
                created_at_ms: row.get(2)?,
                admin: row.get(3)?,
            })
        })
        .await
    }
}

#[async_trait::async_trait]
impl StoreBackend for SqliteStore {
    async fn create_team(&self, team: Team) -> StoreResult<()> {
        self.execute(
            "INSERT INTO teams (id, name, created_at_ms, admin) VALUES (?1, ?2, ?3, ?4)",
            values![team.id, team.name, team.created_at_ms, team.admin],
        )
        .await
        .map(drop)
    }

    async fn team_by_name(&self, name: &str) -> StoreResult<Option<Team>> {
        self.team_where("name", name).await
    }

    async fn team_by_id(&self, id: &str) -> StoreResult<Option<Team>> {
        self.team_where("id", id).await
    }

    async fn add_key(&self, key: ApiKey, hash: String) -> StoreResult<()> {
        self.execute(
            "INSERT INTO api_keys (id, team_id, name, hash, prefix, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            values![key.id, key.team_id, key.name, hash, key.prefix, key.created_at_ms],
        )
        .await
        .map(drop)
    }

    /// The team of an unrevoked key with this hash.
    async fn team_of_key(&self, hash: &str) -> StoreResult<Option<String>> {
        let sql = "SELECT team_id FROM api_keys WHERE hash = ?1 AND revoked_at_ms IS NULL";
        self.row(sql.into(), values![hash.to_string()], |row| row.get(0))
            .await
    }

    async fn list_keys(&self, team_id: &str) -> StoreResult<Vec<ApiKey>> {
        let sql = "SELECT id, team_id, name, prefix, created_at_ms, revoked_at_ms IS NOT NULL
            FROM api_keys WHERE team_id = ?1 ORDER BY created_at_ms, id";
        self.rows(sql.into(), values![team_id.to_string()], |row| {
            Ok(ApiKey {
                id: row.get(0)?,
                team_id: row.get(1)?,
                name: row.get(2)?,
                prefix: row.get(3)?,
                created_at_ms: row.get(4)?,
                revoked: row.get(5)?,
            })
        })
        .await
    }

    /// Revokes a key; false if no such unrevoked key.
    async fn revoke_key(&self, key_id: &str, now_ms: i64) -> StoreResult<bool> {
        self.execute(
            "UPDATE api_keys SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
            values![key_id.to_string(), now_ms],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn put_sandbox(&self, sandbox: SandboxRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO sandboxes (id, team_id, template_id, alias, state, started_at_ms, end_at_ms, metadata,
                    envd_access_token, auto_pause, allow_internet, cpu_count, memory_mb, envd_version, host_id,
                    traffic_access_token, auto_resume)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, end_at_ms = excluded.end_at_ms,
                    started_at_ms = excluded.started_at_ms, envd_access_token = excluded.envd_access_token,
                    auto_pause = excluded.auto_pause, host_id = excluded.host_id",
            values![
                sandbox.id,
                sandbox.team_id,
                sandbox.template_id,
                sandbox.alias,
                sandbox.state.as_str().to_string(),
                sandbox.started_at_ms,
                sandbox.end_at_ms,
                serde_json::to_string(&sandbox.metadata).unwrap_or_default(),
                sandbox.envd_access_token,
                sandbox.auto_pause,
                sandbox.allow_internet,
                sandbox.cpu_count,
                sandbox.memory_mb,
                sandbox.envd_version,
                sandbox.host_id,
                sandbox.traffic_access_token,
                sandbox.auto_resume,
            ],
        )
        .await
        .map(drop)
    }

    async fn sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>> {
        let sql = format!("{SELECT_SANDBOX} WHERE id = ?1");
        self.row(sql, values![id.to_string()], sandbox_row).await
    }

    async fn delete_sandbox(&self, id: &str) -> StoreResult<bool> {
        self.execute(
            "DELETE FROM sandboxes WHERE id = ?1",
            values![id.to_string()],
        )
        .await
        .map(|n| n == 1)
    }

    async fn set_state(&self, id: &str, state: SandboxState, end_at_ms: i64) -> StoreResult<()> {
        self.execute(
            "UPDATE sandboxes SET state = ?2, end_at_ms = ?3 WHERE id = ?1",
            values![id.to_string(), state.as_str().to_string(), end_at_ms],
        )
        .await
        .map(drop)
    }

    /// Running sandboxes whose end time has passed.
    async fn expired(&self, now_ms: i64) -> StoreResult<Vec<SandboxRow>> {
        self.sandboxes_where("state = 'running' AND end_at_ms <= ?1", values![now_ms])
            .await
    }

    /// Every sandbox (any team), for reconciliation.
    async fn all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>> {
        self.rows(SELECT_SANDBOX.into(), values![], sandbox_row)
            .await
    }

    /// Sets a sandbox's state if it is still `from`: whether it was.
    async fn set_state_if(
        &self,
        id: &str,
        from: SandboxState,
        to: SandboxState,
    ) -> StoreResult<bool> {
        self.execute(
            "UPDATE sandboxes SET state = ?3 WHERE id = ?1 AND state = ?2",
            values![
                id.to_string(),
                from.as_str().to_string(),
                to.as_str().to_string()
            ],
        )
        .await
        .map(|n| n == 1)
    }

    /// Every sandbox of a host, whatever its state.
    async fn sandboxes_on_host(&self, host_id: &str) -> StoreResult<Vec<SandboxRow>> {
        self.sandboxes_where("host_id = ?1", values![host_id.to_string()])
            .await
    }

    /// Marks a host's running and paused sandboxes lost: how many there were.
    async fn mark_host_lost(&self, host_id: &str) -> StoreResult<u64> {
        self.execute(
            "UPDATE sandboxes SET state = 'lost' WHERE host_id = ?1 AND state IN ('running', 'paused')",
            values![host_id.to_string()],
        )
        .await
        .map(|n| n as u64)
    }

    /// Adds or replaces a host.
    async fn put_host(&self, host: HostRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO hosts (id, name, api_url, proxy_address, agent_token, heartbeat_hash, state,
                    report, last_heartbeat_ms, registered_at_ms, identity_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, api_url = excluded.api_url,
                    proxy_address = excluded.proxy_address, agent_token = excluded.agent_token,
                    heartbeat_hash = excluded.heartbeat_hash, state = excluded.state,
                    report = excluded.report, last_heartbeat_ms = excluded.last_heartbeat_ms,
                    registered_at_ms = excluded.registered_at_ms,
                    identity_hash = excluded.identity_hash",
            values![
                host.id,
                host.name,
                host.api_url,
                host.proxy_address,
                host.agent_token,
                host.heartbeat_hash,
                host.state.as_str().to_string(),
                serde_json::to_string(&host.report).unwrap_or_default(),
                host.last_heartbeat_ms,
                host.registered_at_ms,
                host.identity_hash,
            ],
        )
        .await
        .map(drop)
    }

    /// Removes a host and its sandboxes' rows (a host replaced for good): how many sandboxes
    /// it had.
    async fn forget_host(&self, host_id: &str) -> StoreResult<u64> {
        let host_id = host_id.to_string();
        self.with(move |db| {
            let transaction = db.transaction()?;
            let sandboxes =
                transaction.execute("DELETE FROM sandboxes WHERE host_id = ?1", [&host_id])?;
            transaction.execute("DELETE FROM hosts WHERE id = ?1", [&host_id])?;
            transaction.commit()?;
            Ok(sandboxes as u64)
        })
        .await
    }

    /// Every host, by name.
    async fn hosts(&self) -> StoreResult<Vec<HostRow>> {
        let sql =
            "SELECT id, name, api_url, proxy_address, agent_token, heartbeat_hash, state, report,
            last_heartbeat_ms, registered_at_ms, identity_hash FROM hosts ORDER BY name";
        self.rows(sql.into(), values![], |row| {
            let report: String = row.get(7)?;
            Ok(HostRow {
                id: row.get(0)?,
                name: row.get(1)?,
                api_url: row.get(2)?,
                proxy_address: row.get(3)?,
                agent_token: row.get(4)?,
                heartbeat_hash: row.get(5)?,
                state: HostState::from_stored(&row.get::<_, String>(6)?),
                report: serde_json::from_str(&report).unwrap_or_default(),
                last_heartbeat_ms: row.get(8)?,
                registered_at_ms: row.get(9)?,
                identity_hash: row.get(10)?,
            })
        })
        .await
    }

    /// One page of a team's sandboxes; metadata filters match every given pair.
    async fn list(&self, query: ListQuery) -> StoreResult<(Vec<SandboxRow>, usize)> {
        self.with(move |db| {
            let mut sql = format!("{SELECT_SANDBOX} WHERE team_id = ?1");
            let mut values: Vec<rusqlite::types::Value> = values![query.team_id.clone()];
            if !query.states.is_empty() {
                let marks: Vec<String> = query
                    .states
                    .iter()
                    .map(|state| {
                        values.push(state.as_str().to_string().into());
                        format!("?{}", values.len())
                    })
                    .collect();
                sql.push_str(&format!(" AND state IN ({})", marks.join(", ")));
            }
            if let Some(template) = &query.template_id {
                values.push(template.clone().into());
                let mark = values.len();
                sql.push_str(&format!(" AND (template_id = ?{mark} OR alias = ?{mark})"));
            }
            if let Some(after) = query.started_after_ms {
                values.push(after.into());
                sql.push_str(&format!(" AND started_at_ms >= ?{}", values.len()));
            }
            for (key, value) in &query.metadata {
                values.push(format!("$.\"{}\"", key.replace('"', "")).into());
                let path = values.len();
                values.push(value.clone().into());
                sql.push_str(&format!(
                    " AND json_extract(metadata, ?{path}) = ?{}",
                    values.len()
                ));
            }
            let running_sql = format!("SELECT COUNT(*) FROM ({sql}) WHERE state = 'running'");
            let total_running: i64 = db.query_row(
                &running_sql,
                rusqlite::params_from_iter(values.iter()),
                |row| row.get(0),
            )?;
            let order = if query.descending { "DESC" } else { "ASC" };
            if let Some((started, id)) = &query.after {
                values.push((*started).into());
                let started_mark = values.len();
                values.push(id.clone().into());
                let id_mark = values.len();
                let comparison = if query.descending { "<" } else { ">" };
                sql.push_str(&format!(
                    " AND (started_at_ms, id) {comparison} (?{started_mark}, ?{id_mark})"
                ));
            }
            sql.push_str(&format!(
                " ORDER BY started_at_ms {order}, id {order} LIMIT {}",
                query.limit
            ));
            let mut statement = db.prepare(&sql)?;
            let rows =
                statement.query_map(rusqlite::params_from_iter(values.iter()), sandbox_row)?;
            Ok((rows.collect::<Result<Vec<_>, _>>()?, total_running as usize))
        })
        .await
    }
}

/// The database's directory 0700, and the database, its WAL and its shared-memory file 0600
/// (they hold API-key hashes, agent tokens and envd access tokens). The database is created
/// 0600 before SQLite opens it, because SQLite gives the WAL and shared-memory files it creates
/// the database file's mode; files left by an older wrenn are tightened.
fn private_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        private_dir(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    Ok(())
}

const SELECT_SANDBOX: &str =
    "SELECT id, team_id, template_id, alias, state, started_at_ms, end_at_ms, metadata,
    envd_access_token, auto_pause, allow_internet, cpu_count, memory_mb, envd_version, host_id,
    traffic_access_token, auto_resume FROM sandboxes";

fn sandbox_row(row: &rusqlite::Row<'_>) -> Result<SandboxRow, rusqlite::Error> {
    let metadata: String = row.get(7)?;
    Ok(SandboxRow {
        id: row.get(0)?,
        team_id: row.get(1)?,
        template_id: row.get(2)?,
        alias: row.get(3)?,
        state: sandbox_state(&row.get::<_, String>(4)?),
        started_at_ms: row.get(5)?,
        end_at_ms: row.get(6)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        envd_access_token: row.get(8)?,
        auto_pause: row.get(9)?,
        allow_internet: row.get(10)?,
        cpu_count: row.get(11)?,
        memory_mb: row.get(12)?,
        envd_version: row.get(13)?,
        host_id: row.get(14)?,
        traffic_access_token: row.get(15)?,
        auto_resume: row.get(16)?,
    })
}
