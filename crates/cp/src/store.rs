//! The control plane's store: teams, API keys (hashed), host agents and sandboxes. SQLite in a file of the
//! data directory by default (WAL, no setup; calls run on the blocking pool over one connection,
//! which SQLite's single writer needs anyway), or PostgreSQL when a `DATABASE_URL` names one
//! ([`crate::store_pg`]). Both apply their migrations when opened and answer the same calls.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
pub use wrenn_api::SandboxState;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store failed: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("the store failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// A team: the owner of keys and sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Team {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
    /// An admin team's keys may also read the fleet (`GET /hosts`). `wrenn up` and
    /// `wrenn server` make the first team, `default`, an admin.
    pub admin: bool,
}

/// An API key as stored (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub team_id: String,
    pub name: String,
    /// The key's first characters, to tell keys apart in lists.
    pub prefix: String,
    pub created_at_ms: i64,
    pub revoked: bool,
}

/// A sandbox as the control plane knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRow {
    pub id: String,
    pub team_id: String,
    pub template_id: String,
    pub alias: Option<String>,
    pub state: SandboxState,
    pub started_at_ms: i64,
    pub end_at_ms: i64,
    pub metadata: BTreeMap<String, String>,
    pub envd_access_token: Option<String>,
    pub auto_pause: bool,
    pub allow_internet: bool,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub envd_version: String,
    /// The host agent the sandbox lives on.
    pub host_id: String,
    /// Required on the sandbox's ports other than envd's when public traffic is not allowed.
    pub traffic_access_token: Option<String>,
    /// Whether traffic to the sandbox through the proxy resumes it when paused.
    pub auto_resume: bool,
}

/// A host agent of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRow {
    pub id: String,
    /// Unique in the fleet: an agent registering again under it replaces the entry.
    pub name: String,
    /// The agent's Connect API (`http://host:port`), or [`EMBEDDED_API_URL`].
    pub api_url: String,
    /// The agent's sandbox proxy (`host:port`).
    pub proxy_address: String,
    /// The bearer token of the agent's API and proxy.
    pub agent_token: String,
    /// SHA-256 of the token the agent's heartbeats carry.
    pub heartbeat_hash: String,
    pub state: HostState,
    pub report: wrenn_agent_api::join::HostReport,
    pub last_heartbeat_ms: i64,
    pub registered_at_ms: i64,
    /// SHA-256 of the host's identity secret, given to its agent at its first registration and
    /// required at every later one (empty for the embedded host, and for a host registered
    /// before identities existed, until its next registration).
    pub identity_hash: String,
}

/// Whether a host answers: `up` while it heartbeats, `down` when it fell silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    #[default]
    Up,
    Down,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Up => "up",
            HostState::Down => "down",
        }
    }

    /// A stored name as a state; anything but `up` is down (a host must prove it is up).
    pub fn from_name(name: &str) -> HostState {
        if name == "up" {
            HostState::Up
        } else {
            HostState::Down
        }
    }
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `api_url` of the agent embedded in the control plane's own process (`wrenn up`).
pub const EMBEDDED_API_URL: &str = "embedded:";

/// One page of a sandbox listing.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub team_id: String,
    pub states: Vec<SandboxState>,
    pub metadata: BTreeMap<String, String>,
    pub template_id: Option<String>,
    pub started_after_ms: Option<i64>,
    pub descending: bool,
    pub limit: usize,
    /// Continue after this (started_at, id).
    pub after: Option<(i64, String)>,
}

/// The schema's migrations, in order (`migrations/sqlite/`); a database records how many it has
/// applied and gets the rest at its next open.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_teams_keys_sandboxes.sql"),
    include_str!("../migrations/sqlite/0002_hosts.sql"),
    include_str!("../migrations/sqlite/0003_traffic_token_auto_resume.sql"),
    include_str!("../migrations/sqlite/0004_admin_teams.sql"),
    include_str!("../migrations/sqlite/0005_host_identity.sql"),
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating) the database file and applies the migrations it lacks.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
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
    ) -> Result<T, StoreError> {
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

    pub async fn create_team(&self, team: Team) -> Result<(), StoreError> {
        self.with(move |db| {
            db.execute(
                "INSERT INTO teams (id, name, created_at_ms, admin) VALUES (?1, ?2, ?3, ?4)",
                params![team.id, team.name, team.created_at_ms, team.admin],
            )
            .map(drop)
        })
        .await
    }

    pub async fn team_by_name(&self, name: &str) -> Result<Option<Team>, StoreError> {
        self.team_where("name", name).await
    }

    pub async fn team_by_id(&self, id: &str) -> Result<Option<Team>, StoreError> {
        self.team_where("id", id).await
    }

    async fn team_where(
        &self,
        column: &'static str,
        value: &str,
    ) -> Result<Option<Team>, StoreError> {
        let value = value.to_string();
        self.with(move |db| {
            db.query_row(
                &format!("SELECT id, name, created_at_ms, admin FROM teams WHERE {column} = ?1"),
                [value],
                |row| {
                    Ok(Team {
                        id: row.get(0)?,
                        name: row.get(1)?,
                        created_at_ms: row.get(2)?,
                        admin: row.get(3)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    pub async fn add_key(&self, key: ApiKey, hash: String) -> Result<(), StoreError> {
        self.with(move |db| {
            db.execute(
                "INSERT INTO api_keys (id, team_id, name, hash, prefix, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![key.id, key.team_id, key.name, hash, key.prefix, key.created_at_ms],
            )
            .map(drop)
        })
        .await
    }

    /// The team of an unrevoked key with this hash.
    pub async fn team_of_key(&self, hash: &str) -> Result<Option<String>, StoreError> {
        let hash = hash.to_string();
        self.with(move |db| {
            db.query_row(
                "SELECT team_id FROM api_keys WHERE hash = ?1 AND revoked_at_ms IS NULL",
                [hash],
                |row| row.get(0),
            )
            .optional()
        })
        .await
    }

    pub async fn list_keys(&self, team_id: &str) -> Result<Vec<ApiKey>, StoreError> {
        let team_id = team_id.to_string();
        self.with(move |db| {
            let mut statement = db.prepare(
                "SELECT id, team_id, name, prefix, created_at_ms, revoked_at_ms IS NOT NULL FROM api_keys WHERE team_id = ?1 ORDER BY created_at_ms, id",
            )?;
            let rows = statement.query_map([team_id], |row| {
                Ok(ApiKey {
                    id: row.get(0)?,
                    team_id: row.get(1)?,
                    name: row.get(2)?,
                    prefix: row.get(3)?,
                    created_at_ms: row.get(4)?,
                    revoked: row.get(5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// Revokes a key; false if no such unrevoked key.
    pub async fn revoke_key(&self, key_id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let key_id = key_id.to_string();
        self.with(move |db| {
            db.execute(
                "UPDATE api_keys SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![key_id, now_ms],
            )
            .map(|changed| changed == 1)
        })
        .await
    }

    pub async fn put_sandbox(&self, sandbox: SandboxRow) -> Result<(), StoreError> {
        self.with(move |db| {
            db.execute(
                "INSERT INTO sandboxes (id, team_id, template_id, alias, state, started_at_ms, end_at_ms, metadata,
                    envd_access_token, auto_pause, allow_internet, cpu_count, memory_mb, envd_version, host_id,
                    traffic_access_token, auto_resume)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, end_at_ms = excluded.end_at_ms,
                    started_at_ms = excluded.started_at_ms, envd_access_token = excluded.envd_access_token,
                    auto_pause = excluded.auto_pause, host_id = excluded.host_id",
                params![
                    sandbox.id,
                    sandbox.team_id,
                    sandbox.template_id,
                    sandbox.alias,
                    sandbox.state.as_str(),
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
                    sandbox.auto_resume
                ],
            )
            .map(drop)
        })
        .await
    }

    pub async fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        let id = id.to_string();
        self.with(move |db| {
            db.query_row(
                &format!("{SELECT_SANDBOX} WHERE id = ?1"),
                [id],
                sandbox_row,
            )
            .optional()
        })
        .await
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.with(move |db| {
            db.execute("DELETE FROM sandboxes WHERE id = ?1", [id])
                .map(|n| n == 1)
        })
        .await
    }

    pub async fn set_state(
        &self,
        id: &str,
        state: SandboxState,
        end_at_ms: i64,
    ) -> Result<(), StoreError> {
        let (id, state) = (id.to_string(), state.as_str());
        self.with(move |db| {
            db.execute(
                "UPDATE sandboxes SET state = ?2, end_at_ms = ?3 WHERE id = ?1",
                params![id, state, end_at_ms],
            )
            .map(drop)
        })
        .await
    }

    /// Running sandboxes whose end time has passed.
    pub async fn expired(&self, now_ms: i64) -> Result<Vec<SandboxRow>, StoreError> {
        self.with(move |db| {
            let mut statement = db.prepare(&format!(
                "{SELECT_SANDBOX} WHERE state = 'running' AND end_at_ms <= ?1"
            ))?;
            let rows = statement.query_map([now_ms], sandbox_row)?;
            rows.collect()
        })
        .await
    }

    /// Every sandbox (any team), for reconciliation.
    pub async fn all_sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError> {
        self.with(move |db| {
            let mut statement = db.prepare(SELECT_SANDBOX)?;
            let rows = statement.query_map([], sandbox_row)?;
            rows.collect()
        })
        .await
    }

    /// Sets a sandbox's state if it is still `from`: whether it was.
    pub async fn set_state_if(
        &self,
        id: &str,
        from: SandboxState,
        to: SandboxState,
    ) -> Result<bool, StoreError> {
        let (from, to) = (from.as_str(), to.as_str());
        let (id, from, to) = (id.to_string(), from.to_string(), to.to_string());
        self.with(move |db| {
            db.execute(
                "UPDATE sandboxes SET state = ?3 WHERE id = ?1 AND state = ?2",
                params![id, from, to],
            )
            .map(|n| n == 1)
        })
        .await
    }

    /// Every sandbox of a host, whatever its state.
    pub async fn sandboxes_on_host(&self, host_id: &str) -> Result<Vec<SandboxRow>, StoreError> {
        let host_id = host_id.to_string();
        self.with(move |db| {
            let mut statement = db.prepare(&format!("{SELECT_SANDBOX} WHERE host_id = ?1"))?;
            let rows = statement.query_map([host_id], sandbox_row)?;
            rows.collect()
        })
        .await
    }

    /// Marks a host's running and paused sandboxes lost: how many there were.
    pub async fn mark_host_lost(&self, host_id: &str) -> Result<u64, StoreError> {
        let host_id = host_id.to_string();
        self.with(move |db| {
            db.execute(
                "UPDATE sandboxes SET state = 'lost' WHERE host_id = ?1 AND state IN ('running', 'paused')",
                [host_id],
            )
            .map(|n| n as u64)
        })
        .await
    }

    /// Adds or replaces a host.
    pub async fn put_host(&self, host: HostRow) -> Result<(), StoreError> {
        self.with(move |db| {
            db.execute(
                "INSERT INTO hosts (id, name, api_url, proxy_address, agent_token, heartbeat_hash, state,
                    report, last_heartbeat_ms, registered_at_ms, identity_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, api_url = excluded.api_url,
                    proxy_address = excluded.proxy_address, agent_token = excluded.agent_token,
                    heartbeat_hash = excluded.heartbeat_hash, state = excluded.state,
                    report = excluded.report, last_heartbeat_ms = excluded.last_heartbeat_ms,
                    registered_at_ms = excluded.registered_at_ms,
                    identity_hash = excluded.identity_hash",
                params![
                    host.id,
                    host.name,
                    host.api_url,
                    host.proxy_address,
                    host.agent_token,
                    host.heartbeat_hash,
                    host.state.as_str(),
                    serde_json::to_string(&host.report).unwrap_or_default(),
                    host.last_heartbeat_ms,
                    host.registered_at_ms,
                    host.identity_hash
                ],
            )
            .map(drop)
        })
        .await
    }

    /// Removes a host and its sandboxes' rows (a host replaced for good): how many sandboxes
    /// it had.
    pub async fn forget_host(&self, host_id: &str) -> Result<u64, StoreError> {
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
    pub async fn hosts(&self) -> Result<Vec<HostRow>, StoreError> {
        self.with(move |db| {
            let mut statement = db.prepare(
                "SELECT id, name, api_url, proxy_address, agent_token, heartbeat_hash, state, report,
                    last_heartbeat_ms, registered_at_ms, identity_hash FROM hosts ORDER BY name",
            )?;
            let rows = statement.query_map([], |row| {
                let report: String = row.get(7)?;
                Ok(HostRow {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    api_url: row.get(2)?,
                    proxy_address: row.get(3)?,
                    agent_token: row.get(4)?,
                    heartbeat_hash: row.get(5)?,
                    state: HostState::from_name(&row.get::<_, String>(6)?),
                    report: serde_json::from_str(&report).unwrap_or_default(),
                    last_heartbeat_ms: row.get(8)?,
                    registered_at_ms: row.get(9)?,
                    identity_hash: row.get(10)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    /// One page of a team's sandboxes; metadata filters match every given pair.
    pub async fn list(&self, query: ListQuery) -> Result<(Vec<SandboxRow>, usize), StoreError> {
        self.with(move |db| {
            let mut sql = format!("{SELECT_SANDBOX} WHERE team_id = ?1");
            let mut values: Vec<rusqlite::types::Value> = vec![query.team_id.clone().into()];
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

/// Writes `bytes` to `path` through a temporary file beside it: created with `mode`, synced,
/// renamed over `path`, and the directory synced, so a crash leaves the old file or the new.
pub fn write_file_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Makes `dir` (and any parent it creates) a private directory: created 0700, and an existing
/// one tightened to 0700.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
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

/// The store the control plane uses: SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(crate::store_pg::PgStore),
}

macro_rules! delegate {
    ($(fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl Store {
            $(pub async fn $name(&self $(, $arg: $ty)*) -> Result<$ret, StoreError> {
                match self {
                    Store::Sqlite(store) => store.$name($($arg),*).await,
                    Store::Postgres(store) => store.$name($($arg),*).await,
                }
            })*
        }
    };
}

delegate! {
    fn create_team(&self, team: Team) -> ();
    fn team_by_name(&self, name: &str) -> Option<Team>;
    fn team_by_id(&self, id: &str) -> Option<Team>;
    fn add_key(&self, key: ApiKey, hash: String) -> ();
    fn team_of_key(&self, hash: &str) -> Option<String>;
    fn list_keys(&self, team_id: &str) -> Vec<ApiKey>;
    fn revoke_key(&self, key_id: &str, now_ms: i64) -> bool;
    fn put_sandbox(&self, sandbox: SandboxRow) -> ();
    fn sandbox(&self, id: &str) -> Option<SandboxRow>;
    fn delete_sandbox(&self, id: &str) -> bool;
    fn set_state(&self, id: &str, state: SandboxState, end_at_ms: i64) -> ();
    fn expired(&self, now_ms: i64) -> Vec<SandboxRow>;
    fn all_sandboxes(&self) -> Vec<SandboxRow>;
    fn list(&self, query: ListQuery) -> (Vec<SandboxRow>, usize);
    fn set_state_if(&self, id: &str, from: SandboxState, to: SandboxState) -> bool;
    fn sandboxes_on_host(&self, host_id: &str) -> Vec<SandboxRow>;
    fn mark_host_lost(&self, host_id: &str) -> u64;
    fn put_host(&self, host: HostRow) -> ();
    fn forget_host(&self, host_id: &str) -> u64;
    fn hosts(&self) -> Vec<HostRow>;
}

impl Store {
    /// SQLite in a file (created if missing).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Store::Sqlite(SqliteStore::open(path)?))
    }

    /// SQLite at `path`, or PostgreSQL when `database_url` is a `postgres://` URL.
    pub async fn open_configured(
        path: &Path,
        database_url: Option<&str>,
    ) -> Result<Self, StoreError> {
        match database_url
            .filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            Some(url) => Ok(Store::Postgres(
                crate::store_pg::PgStore::connect(url).await?,
            )),
            None => Self::open(path),
        }
    }
}

const SELECT_SANDBOX: &str =
    "SELECT id, team_id, template_id, alias, state, started_at_ms, end_at_ms, metadata,
    envd_access_token, auto_pause, allow_internet, cpu_count, memory_mb, envd_version, host_id,
    traffic_access_token, auto_resume FROM sandboxes";

/// A stored state's name as a state. A name this version does not know (a newer version's
/// row) reads as `lost`: the sandbox is listed and can be killed, nothing else is assumed.
pub fn sandbox_state(name: &str) -> SandboxState {
    SandboxState::from_name(name).unwrap_or_else(|| {
        tracing::warn!(
            state = name,
            "a sandbox row has a state this version does not know: read as lost"
        );
        SandboxState::Lost
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_have_the_same_migrations_in_the_same_order() {
        let names = |backend: &str| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(backend);
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let sqlite = names("sqlite");
        assert_eq!(
            sqlite,
            names("postgres"),
            "a migration of one backend has none in the other"
        );
        assert_eq!(
            sqlite.len(),
            MIGRATIONS.len(),
            "a migration file is not in MIGRATIONS"
        );
        assert_eq!(sqlite.len(), crate::store_pg::MIGRATIONS.len());
    }

    fn row(
        id: &str,
        team: &str,
        started: i64,
        state: &str,
        metadata: &[(&str, &str)],
    ) -> SandboxRow {
        SandboxRow {
            id: id.into(),
            team_id: team.into(),
            template_id: "base".into(),
            alias: Some("base".into()),
            state: sandbox_state(state),
            started_at_ms: started,
            end_at_ms: started + 1000,
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cpu_count: 1,
            memory_mb: 512,
            envd_version: "0.6.4".into(),
            host_id: "h1".into(),
            ..SandboxRow::default()
        }
    }

    /// Every backend to test: SQLite always; PostgreSQL when `WRENN_TEST_DATABASE_URL` names
    /// one (scripts/test.sh starts it), each test in a fresh schema of its own.
    async fn backends() -> Vec<(&'static str, Store, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let mut backends = vec![("sqlite", sqlite, Some(dir))];
        match std::env::var("WRENN_TEST_DATABASE_URL") {
            Ok(url) => {
                let schema = format!("test_{}", crate::auth::random_id(12).unwrap());
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("CREATE SCHEMA {schema}"))
                    .await
                    .unwrap();
                let scoped = format!("{url}?options=-csearch_path%3D{schema}");
                backends.push((
                    "postgres",
                    Store::open_configured(Path::new("/nonexistent"), Some(&scoped))
                        .await
                        .unwrap(),
                    None,
                ));
            }
            Err(_) if std::env::var("WRENN_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
                panic!("WRENN_TEST_DATABASE_URL is not set (scripts/postgres.sh starts the server)")
            }
            Err(_) => eprintln!("SKIPPED on PostgreSQL: WRENN_TEST_DATABASE_URL is not set"),
        }
        backends
    }

    async fn fill(store: &Store) {
        for team in ["a", "b"] {
            store
                .create_team(Team {
                    id: team.into(),
                    name: format!("team {team}"),
                    created_at_ms: 0,
                    admin: team == "a",
                })
                .await
                .unwrap();
        }
        for i in 0..5 {
            let state = if i == 4 { "paused" } else { "running" };
            let group = if i % 2 == 0 { "even" } else { "odd" };
            store
                .put_sandbox(row(
                    &format!("s{i}"),
                    "a",
                    100 + i,
                    state,
                    &[("group", group)],
                ))
                .await
                .unwrap();
        }
        store
            .put_sandbox(row("other", "b", 50, "running", &[("group", "even")]))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn lists_are_per_team_filtered_and_paged() {
        for (backend, store, _dir) in backends().await {
            fill(&store).await;
            let query = ListQuery {
                team_id: "a".into(),
                limit: 2,
                ..ListQuery::default()
            };
            let (page, running) = store.list(query.clone()).await.unwrap();
            assert_eq!(
                page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                ["s0", "s1"],
                "{backend}"
            );
            assert_eq!(running, 4, "{backend}");
            let last = page.last().unwrap();
            let next = ListQuery {
                after: Some((last.started_at_ms, last.id.clone())),
                ..query.clone()
            };
            let (page, _) = store.list(next).await.unwrap();
            assert_eq!(
                page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                ["s2", "s3"],
                "{backend}"
            );

            let even = ListQuery {
                metadata: [("group".to_string(), "even".to_string())].into(),
                states: vec![SandboxState::Running],
                descending: true,
                limit: 10,
                ..query.clone()
            };
            let (page, _) = store.list(even).await.unwrap();
            assert_eq!(
                page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                ["s2", "s0"],
                "{backend}: team b's row never shows"
            );
            let paused = ListQuery {
                states: vec![SandboxState::Paused],
                limit: 10,
                ..query
            };
            let (page, _) = store.list(paused).await.unwrap();
            assert_eq!(
                page.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                ["s4"],
                "{backend}"
            );
        }
    }

    #[tokio::test]
    async fn keys_resolve_to_teams_until_revoked_and_rows_change_in_place() {
        for (backend, store, _dir) in backends().await {
            fill(&store).await;
            let key = ApiKey {
                id: "k1".into(),
                team_id: "a".into(),
                name: "n".into(),
                prefix: "e2b_12".into(),
                created_at_ms: 1,
                revoked: false,
            };
            store.add_key(key, "hash".into()).await.unwrap();
            assert_eq!(
                store.team_of_key("hash").await.unwrap().as_deref(),
                Some("a"),
                "{backend}"
            );
            assert_eq!(store.list_keys("a").await.unwrap().len(), 1);
            assert!(store.revoke_key("k1", 2).await.unwrap());
            assert_eq!(store.team_of_key("hash").await.unwrap(), None, "{backend}");
            assert!(!store.revoke_key("k1", 3).await.unwrap());
            assert!(store.list_keys("a").await.unwrap()[0].revoked);
            store
                .set_state("s0", SandboxState::Paused, 5)
                .await
                .unwrap();
            assert!(store.expired(1000).await.unwrap().is_empty(), "{backend}");
            assert_eq!(
                store.expired(2000).await.unwrap().len(),
                4,
                "{backend}: running rows of every team past their end"
            );
            let s0 = store.sandbox("s0").await.unwrap().unwrap();
            assert_eq!((s0.state.as_str(), s0.end_at_ms), ("paused", 5));
            assert_eq!(s0.metadata.get("group").map(String::as_str), Some("even"));
            assert_eq!(store.team_by_name("team a").await.unwrap().unwrap().id, "a");
            assert!(
                store.team_by_id("a").await.unwrap().unwrap().admin,
                "{backend}"
            );
            assert!(
                !store.team_by_id("b").await.unwrap().unwrap().admin,
                "{backend}"
            );
            assert!(store.team_by_id("zz").await.unwrap().is_none());
            assert!(store.delete_sandbox("s0").await.unwrap());
            assert!(store.sandbox("s0").await.unwrap().is_none(), "{backend}");
            assert_eq!(store.all_sandboxes().await.unwrap().len(), 5);
            assert!(
                store
                    .create_team(Team {
                        id: "c".into(),
                        name: "team a".into(),
                        created_at_ms: 0,
                        admin: false,
                    })
                    .await
                    .is_err(),
                "team names are unique"
            );
        }
    }

    #[tokio::test]
    async fn hosts_are_kept_and_a_down_hosts_sandboxes_are_lost() {
        for (backend, store, _dir) in backends().await {
            fill(&store).await;
            let mut host = HostRow {
                id: "h1".into(),
                name: "alpha".into(),
                api_url: "http://10.0.0.1:49990".into(),
                proxy_address: "10.0.0.1:49992".into(),
                agent_token: "t".into(),
                heartbeat_hash: "sha256:x".into(),
                state: HostState::Up,
                report: wrenn_agent_api::join::HostReport {
                    cpus: 8,
                    slots_total: 16,
                    ..Default::default()
                },
                last_heartbeat_ms: 10,
                registered_at_ms: 5,
                identity_hash: "sha256:id".into(),
            };
            store.put_host(host.clone()).await.unwrap();
            host.state = HostState::Down;
            host.last_heartbeat_ms = 20;
            store.put_host(host.clone()).await.unwrap();
            assert_eq!(store.hosts().await.unwrap(), vec![host], "{backend}");
            assert_eq!(store.sandboxes_on_host("h1").await.unwrap().len(), 6);
            assert_eq!(
                store.mark_host_lost("h1").await.unwrap(),
                6,
                "{backend}: running and paused rows are lost"
            );
            assert_eq!(store.mark_host_lost("h1").await.unwrap(), 0, "{backend}");
            assert!(
                store.expired(i64::MAX).await.unwrap().is_empty(),
                "{backend}"
            );
            assert!(
                store
                    .set_state_if("s1", SandboxState::Lost, SandboxState::Running)
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .set_state_if("s1", SandboxState::Lost, SandboxState::Paused)
                    .await
                    .unwrap(),
                "{backend}: a changed state is not overwritten"
            );
            assert_eq!(
                store.sandbox("s1").await.unwrap().unwrap().state,
                SandboxState::Running
            );
            let mut guarded = row("g1", "a", 1, "running", &[]);
            guarded.traffic_access_token = Some("traffic".into());
            guarded.auto_resume = true;
            store.put_sandbox(guarded.clone()).await.unwrap();
            assert_eq!(
                store.sandbox("g1").await.unwrap(),
                Some(guarded),
                "{backend}"
            );
            // Forgetting a host removes it and its sandboxes' rows, nothing else.
            assert_eq!(store.forget_host("nope").await.unwrap(), 0, "{backend}");
            assert_eq!(store.forget_host("h1").await.unwrap(), 7, "{backend}");
            assert!(store.hosts().await.unwrap().is_empty(), "{backend}");
            assert_eq!(store.all_sandboxes().await.unwrap().len(), 0, "{backend}");
            assert!(store.team_by_id("a").await.unwrap().is_some());
        }
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn sqlite_files_are_private_and_old_ones_are_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cp = dir.path().join("data/cp");
        let path = cp.join("wrenn.sqlite");
        let store = Store::open(&path).unwrap();
        fill(&store).await;
        for file in ["wrenn.sqlite", "wrenn.sqlite-wal", "wrenn.sqlite-shm"] {
            assert_eq!(mode(&cp.join(file)), 0o600, "{file}");
        }
        assert_eq!(mode(&cp), 0o700);
        assert_eq!(
            mode(&dir.path().join("data")),
            0o700,
            "a created parent too"
        );
        drop(store);
        // An older wrenn's files, readable by all: tightened at the next open.
        std::fs::set_permissions(&cp, std::fs::Permissions::from_mode(0o755)).unwrap();
        for file in ["wrenn.sqlite", "wrenn.sqlite-wal", "wrenn.sqlite-shm"] {
            let _ = std::fs::set_permissions(cp.join(file), std::fs::Permissions::from_mode(0o644));
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.all_sandboxes().await.unwrap().len(), 6);
        assert_eq!(mode(&cp), 0o700);
        for file in ["wrenn.sqlite", "wrenn.sqlite-wal", "wrenn.sqlite-shm"] {
            assert_eq!(mode(&cp.join(file)), 0o600, "{file}");
        }
    }

    #[tokio::test]
    async fn sqlite_state_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        fill(&store).await;
        drop(store);
        let reopened = Store::open(&dir.path().join("db.sqlite")).unwrap();
        assert_eq!(reopened.all_sandboxes().await.unwrap().len(), 6);
    }
}
