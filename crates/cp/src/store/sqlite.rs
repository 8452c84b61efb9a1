//! The SQLite store: a file of the data directory (WAL, no setup). Calls run on the blocking pool
//! over one connection, which SQLite's single writer needs anyway. The migrations are
//! `migrations/sqlite/`, recorded in `user_version`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::types::Value;
use rusqlite::{Connection, TransactionBehavior};

use super::TagRow;
use super::channels::{PENDING_HEADS, count_delivery_sql};
use super::rows::{BUILD_UPSERT, HOST_UPSERT, SANDBOX_UPSERT, Stored, TEMPLATE_UPSERT, first};
use super::telemetry::{self as telemetry_sql, QueryValue};
use super::{
    AUDIT_LOG, ApiKey, AuditRow, BuildLogRow, BuildRow, ChannelRow, DeliveryRow, EVENT_LOG,
    EventRow, HostRow, HostState, IdempotencyClaim, ListQuery, LogQuery, LogValue, SandboxRow,
    SandboxState, StateChange, StoreBackend, StoreError, StoreResult, Team, TemplateRow,
    private_dir,
};
use super::{InvitationRow, MemberRow, UserRow, UserTokenRow};
use super::{LogLinesQuery, MetricRow, SandboxLogRow, TelemetryBatch, TelemetryCursor, UsageRow};

/// A statement's owned values: `values![a, b]` is `vec![Value::from(a), Value::from(b)]`.
macro_rules! values {
    ($($value:expr),* $(,)?) => {
        vec![$(Value::from($value)),*]
    };
}

/// The schema's migrations, in order (`migrations/sqlite/`); a database records how many it has
/// applied (`user_version`) and gets the rest at its next open.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_teams_keys_sandboxes.sql"),
    include_str!("../../migrations/sqlite/0002_hosts.sql"),
    include_str!("../../migrations/sqlite/0003_traffic_token_auto_resume.sql"),
    include_str!("../../migrations/sqlite/0004_admin_teams.sql"),
    include_str!("../../migrations/sqlite/0005_host_identity.sql"),
    include_str!("../../migrations/sqlite/0006_templates.sql"),
    include_str!("../../migrations/sqlite/0007_snapshots.sql"),
    include_str!("../../migrations/sqlite/0008_network.sql"),
    include_str!("../../migrations/sqlite/0009_events_audit_key_roles.sql"),
    include_str!("../../migrations/sqlite/0010_channels.sql"),
    include_str!("../../migrations/sqlite/0011_users.sql"),
    include_str!("../../migrations/sqlite/0012_telemetry.sql"),
    include_str!("../../migrations/sqlite/0013_leases.sql"),
    include_str!("../../migrations/sqlite/0014_replicas.sql"),
];

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating) the database file and applies the migrations it lacks. Stores opening
    /// one database at once (control planes starting together) take turns ([`opening_lock`]).
    pub fn open(path: &Path) -> StoreResult<Self> {
        let unavailable = |doing: &str, error: std::io::Error| {
            StoreError::Unavailable(format!("{doing} {}: {error}", path.display()))
        };
        let _turn = opening_lock(path).map_err(|error| unavailable("waiting to open", error))?;
        private_files(path).map_err(|error| unavailable("securing", error))?;
        let mut connection = Connection::open(path)?;
        connection.busy_timeout(LOCK_WAIT)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut connection)?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> StoreResult<T> {
        let connection = self.connection.clone();
        let started = Instant::now();
        let done = tokio::task::spawn_blocking(move || {
            let mut connection = connection
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            work(&mut connection).map_err(StoreError::from)
        })
        .await
        .map_err(|error| StoreError::Unavailable(error.to_string()))?;
        crate::metrics::observe_store_call("sqlite", started.elapsed());
        done
    }

    /// Runs one statement with owned values: how many rows it changed.
    async fn execute(&self, sql: impl Into<String>, values: Vec<Value>) -> StoreResult<usize> {
        let sql = sql.into();
        self.with(move |db| db.execute(&sql, rusqlite::params_from_iter(values)))
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

    /// The `T`s its [`Stored::select`] with `clause` finds, with owned values.
    async fn select<T: Stored + Send + 'static>(
        &self,
        clause: &str,
        values: Vec<Value>,
    ) -> StoreResult<Vec<T>> {
        self.rows(T::select(clause), values, |row| T::read(row))
            .await
    }
}

/// A [`LogQuery`]'s values as SQLite's.
fn sqlite_values(values: Vec<LogValue>) -> Vec<Value> {
    values
        .into_iter()
        .map(|value| match value {
            LogValue::Text(text) => Value::from(text),
            LogValue::Int(int) => Value::from(int),
        })
        .collect()
}

/// How long an open waits for another store's turn ([`opening_lock`]), and a call for SQLite's
/// locks (the busy timeout).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// An exclusive lock (`flock`) on the database's directory, created private if missing, held
/// while the database is opened, switched to WAL and migrated: stores opening one database at
/// once, in one process or several, take turns. SQLite's own locks cannot order that: the
/// switch to WAL does not wait on its busy timeout (two at once fail `database is locked`),
/// and a migrator that read `user_version` before another's migrations applied them again
/// (`duplicate column name`). The lock is on the directory, not the database file, because
/// closing a descriptor of the database would drop the process's SQLite locks on it.
fn opening_lock(path: &Path) -> std::io::Result<std::fs::File> {
    let dir = match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) => {
            private_dir(dir)?;
            dir
        }
        None => Path::new("."),
    };
    let dir = std::fs::File::open(dir)?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match dir.try_lock() {
            Ok(()) => return Ok(dir),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("another store held the database for {LOCK_WAIT:?}"),
                ));
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(error),
        }
    }
}

/// Applies the migrations the database lacks, in one `BEGIN IMMEDIATE` transaction (the write
/// lock taken before `user_version` is read): all of them or, if one fails, none.
fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = transaction.pragma_query_value(None, "user_version", |row| row.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", index as i64 + 1)?;
    }
    transaction.commit()
}

/// Placeholders for `states`, added to `values`: `?3, ?4` for two states after two values.
fn state_marks(states: &[SandboxState], values: &mut Vec<Value>) -> String {
    let marks: Vec<String> = states
        .iter()
        .map(|state| {
            values.push(state.as_str().to_string().into());
            format!("?{}", values.len())
        })
        .collect();
    marks.join(", ")
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

    async fn team_where(&self, column: &'static str, value: &str) -> StoreResult<Option<Team>> {
        let clause = format!("WHERE {column} = ?1");
        self.select(&clause, values![value.to_string()])
            .await
            .map(first)
    }

    async fn add_key(&self, key: ApiKey, hash: String) -> StoreResult<()> {
        self.execute(
            "INSERT INTO api_keys (id, team_id, name, hash, prefix, created_at_ms, role, mask_suffix)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            values![
                key.id,
                key.team_id,
                key.name,
                hash,
                key.prefix,
                key.created_at_ms,
                key.role.as_str().to_string(),
                key.mask_suffix
            ],
        )
        .await
        .map(drop)
    }

    async fn key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKey>> {
        let clause = "WHERE hash = ?1 AND revoked_at_ms IS NULL";
        self.select(clause, values![hash.to_string()])
            .await
            .map(first)
    }

    async fn key(&self, key_id: &str) -> StoreResult<Option<ApiKey>> {
        self.select("WHERE id = ?1", values![key_id.to_string()])
            .await
            .map(first)
    }

    async fn list_keys(&self, team_id: &str) -> StoreResult<Vec<ApiKey>> {
        let clause = "WHERE team_id = ?1 ORDER BY created_at_ms, id";
        self.select(clause, values![team_id.to_string()]).await
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

    async fn rename_key(&self, key_id: &str, name: &str) -> StoreResult<bool> {
        self.execute(
            "UPDATE api_keys SET name = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
            values![key_id.to_string(), name.to_string()],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn teams(&self) -> StoreResult<Vec<Team>> {
        self.select("ORDER BY created_at_ms, id", values![]).await
    }

    async fn create_user(&self, user: UserRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO users (id, email, password_hash, operator, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            values![
                user.id,
                user.email,
                user.password_hash,
                user.operator,
                user.created_at_ms
            ],
        )
        .await
        .map(drop)
    }

    async fn user_where(&self, column: &'static str, value: &str) -> StoreResult<Option<UserRow>> {
        let clause = format!("WHERE {column} = ?1");
        self.select(&clause, values![value.to_string()])
            .await
            .map(first)
    }

    async fn users(&self) -> StoreResult<Vec<UserRow>> {
        self.select("ORDER BY created_at_ms, id", values![]).await
    }

    async fn put_member(&self, member: MemberRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO memberships (team_id, user_id, role, created_at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (team_id, user_id) DO UPDATE SET role = excluded.role",
            values![
                member.team_id,
                member.user_id,
                member.role.as_str().to_string(),
                member.created_at_ms
            ],
        )
        .await
        .map(drop)
    }

    async fn delete_member(&self, team_id: &str, user_id: &str) -> StoreResult<bool> {
        self.execute(
            "DELETE FROM memberships WHERE team_id = ?1 AND user_id = ?2",
            values![team_id.to_string(), user_id.to_string()],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn members_where(
        &self,
        column: &'static str,
        value: &str,
    ) -> StoreResult<Vec<MemberRow>> {
        let clause = format!("WHERE {column} = ?1 ORDER BY created_at_ms, team_id, user_id");
        self.select(&clause, values![value.to_string()]).await
    }

    async fn add_user_token(&self, token: UserTokenRow, hash: String) -> StoreResult<()> {
        self.execute(
            "INSERT INTO user_tokens (id, user_id, kind, name, hash, prefix, mask_suffix,
                 created_at_ms, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            values![
                token.id,
                token.user_id,
                token.kind,
                token.name,
                hash,
                token.prefix,
                token.mask_suffix,
                token.created_at_ms,
                token.expires_at_ms
            ],
        )
        .await
        .map(drop)
    }

    async fn user_token_by_hash(&self, hash: &str) -> StoreResult<Option<UserTokenRow>> {
        let clause = "WHERE hash = ?1 AND revoked_at_ms IS NULL";
        self.select(clause, values![hash.to_string()])
            .await
            .map(first)
    }

    async fn user_tokens(&self, user_id: &str, kind: &str) -> StoreResult<Vec<UserTokenRow>> {
        let clause =
            "WHERE user_id = ?1 AND kind = ?2 AND revoked_at_ms IS NULL ORDER BY created_at_ms, id";
        self.select(clause, values![user_id.to_string(), kind.to_string()])
            .await
    }

    async fn revoke_user_token(
        &self,
        user_id: &str,
        token_id: &str,
        now_ms: i64,
    ) -> StoreResult<bool> {
        self.execute(
            "UPDATE user_tokens SET revoked_at_ms = ?3
             WHERE user_id = ?1 AND id = ?2 AND revoked_at_ms IS NULL",
            values![user_id.to_string(), token_id.to_string(), now_ms],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn add_invitation(&self, invitation: InvitationRow, hash: String) -> StoreResult<()> {
        self.execute(
            "INSERT INTO invitations (id, team_id, email, role, hash, created_by, created_at_ms,
                 expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            values![
                invitation.id,
                invitation.team_id,
                invitation.email,
                invitation.role.as_str().to_string(),
                hash,
                invitation.created_by,
                invitation.created_at_ms,
                invitation.expires_at_ms
            ],
        )
        .await
        .map(drop)
    }

    async fn invitation_by_hash(&self, hash: &str) -> StoreResult<Option<InvitationRow>> {
        self.select("WHERE hash = ?1", values![hash.to_string()])
            .await
            .map(first)
    }

    async fn take_invitation(&self, hash: &str, now_ms: i64) -> StoreResult<Option<InvitationRow>> {
        let taken = self
            .execute(
                "UPDATE invitations SET accepted_at_ms = ?2
                 WHERE hash = ?1 AND accepted_at_ms IS NULL AND expires_at_ms > ?2",
                values![hash.to_string(), now_ms],
            )
            .await?;
        if taken != 1 {
            return Ok(None);
        }
        self.select("WHERE hash = ?1", values![hash.to_string()])
            .await
            .map(first)
    }

    async fn delete_team(&self, team_id: &str) -> StoreResult<bool> {
        let team_id = team_id.to_string();
        self.with(move |db| {
            let transaction = db.transaction()?;
            for table in ["invitations", "memberships", "api_keys", "channels"] {
                transaction.execute(
                    &format!("DELETE FROM {table} WHERE team_id = ?1"),
                    [&team_id],
                )?;
            }
            let deleted = transaction.execute("DELETE FROM teams WHERE id = ?1", [&team_id])?;
            transaction.commit()?;
            Ok(deleted == 1)
        })
        .await
    }

    async fn add_event(&self, event: EventRow) -> StoreResult<i64> {
        let data = event.data.to_string();
        self.with(move |db| {
            db.execute(
                "INSERT INTO events (id, at_ms, team_id, actor, kind, subject, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                rusqlite::params![
                    event.id,
                    event.at_ms,
                    event.team_id,
                    event.actor,
                    event.kind,
                    event.subject,
                    data
                ],
            )?;
            Ok(db.last_insert_rowid())
        })
        .await
    }

    async fn events(&self, query: LogQuery) -> StoreResult<Vec<EventRow>> {
        let (clause, values) = query.clause(EVENT_LOG, |n| format!("?{n}"));
        self.select(&clause, sqlite_values(values)).await
    }

    async fn last_event_seq(&self) -> StoreResult<i64> {
        let sql = "SELECT COALESCE(MAX(seq), 0) FROM events";
        self.rows(sql.into(), values![], |row| row.get(0))
            .await
            .map(|rows| first(rows).unwrap_or(0))
    }

    async fn add_audit(&self, row: AuditRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO audit_log (id, at_ms, team_id, actor, action, resource, outcome, client)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            values![
                row.id,
                row.at_ms,
                row.team_id,
                row.actor,
                row.action,
                row.resource,
                row.outcome,
                row.client
            ],
        )
        .await
        .map(drop)
    }

    async fn audit(&self, query: LogQuery) -> StoreResult<Vec<AuditRow>> {
        let (clause, values) = query.clause(AUDIT_LOG, |n| format!("?{n}"));
        self.select(&clause, sqlite_values(values)).await
    }

    async fn put_sandbox(&self, sandbox: SandboxRow) -> StoreResult<()> {
        self.execute(
            format!(
                "INSERT INTO sandboxes (id, team_id, template_id, alias, state, started_at_ms, end_at_ms, metadata,
                    envd_access_token, auto_pause, allow_internet, cpu_count, memory_mb, envd_version, host_id,
                    traffic_access_token, auto_resume, auto_pause_memory, paused_disk_only, network)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)
                 {SANDBOX_UPSERT}"
            ),
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
                sandbox.auto_pause_memory,
                sandbox.paused_disk_only,
                serde_json::to_string(&sandbox.network).unwrap_or_else(|_| "{}".into()),
            ],
        )
        .await
        .map(drop)
    }

    async fn sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>> {
        self.select("WHERE id = ?1", values![id.to_string()])
            .await
            .map(first)
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
        self.select(
            "WHERE state = 'running' AND end_at_ms <= ?1",
            values![now_ms],
        )
        .await
    }

    /// Every sandbox (any team), for reconciliation.
    async fn all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>> {
        self.select("", values![]).await
    }

    async fn change_states(&self, change: StateChange<'_>) -> StoreResult<u64> {
        let mut values = values![change.value.to_string(), change.to.as_str().to_string()];
        let from = state_marks(change.from, &mut values);
        let sql = format!(
            "UPDATE sandboxes SET state = ?2 WHERE {} = ?1 AND state IN ({from})",
            change.column
        );
        self.execute(sql, values).await.map(|n| n as u64)
    }

    /// Every sandbox of a host, whatever its state.
    async fn sandboxes_on_host(&self, host_id: &str) -> StoreResult<Vec<SandboxRow>> {
        self.select("WHERE host_id = ?1", values![host_id.to_string()])
            .await
    }

    async fn take_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> StoreResult<Option<i64>> {
        // One process holds a SQLite store: its own clock is the store's.
        let now_ms = wrenn_core::now_ms();
        let (name, holder) = (name.to_string(), holder.to_string());
        self.with(move |db| {
            use rusqlite::OptionalExtension;
            db.query_row(
                "INSERT INTO leases (name, holder, token, expires_at_ms) VALUES (?1, ?2, 1, ?3 + ?4)
                 ON CONFLICT (name) DO UPDATE SET
                     token = token + CASE WHEN holder = excluded.holder AND expires_at_ms >= ?3
                         THEN 0 ELSE 1 END,
                     holder = excluded.holder,
                     expires_at_ms = excluded.expires_at_ms
                 WHERE holder = excluded.holder OR expires_at_ms < ?3
                 RETURNING token",
                rusqlite::params![name, holder, now_ms, ttl_ms],
                |row| row.get(0),
            )
            .optional()
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        // Expired at once, kept for its token (the next holder's is higher).
        self.execute(
            "UPDATE leases SET expires_at_ms = 0 WHERE name = ?1 AND holder = ?2",
            values![name.to_string(), holder.to_string()],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn drop_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        self.execute(
            "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
            values![name.to_string(), holder.to_string()],
        )
        .await
        .map(|changed| changed == 1)
    }

    fn shared(&self) -> bool {
        false
    }

    async fn lease_held(&self, name: &str) -> StoreResult<bool> {
        let (name, now_ms) = (name.to_string(), wrenn_core::now_ms());
        self.with(move |db| {
            db.query_row(
                "SELECT EXISTS (SELECT 1 FROM leases WHERE name = ?1 AND expires_at_ms >= ?2)",
                rusqlite::params![name, now_ms],
                |row| row.get(0),
            )
        })
        .await
    }

    async fn claim_idempotency(
        &self,
        team_id: &str,
        key: &str,
        claimant: &str,
        now_ms: i64,
        stale_ms: i64,
    ) -> StoreResult<IdempotencyClaim> {
        let (team_id, key, claimant) = (team_id.to_string(), key.to_string(), claimant.to_string());
        self.with(move |db| {
            use rusqlite::OptionalExtension;
            let transaction = db.transaction()?;
            // A new key, or an unsettled claim gone stale, becomes the claimant's.
            let claimed = transaction.execute(
                "INSERT INTO idempotency_keys (team_id, key, claimant, claimed_at_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (team_id, key) DO UPDATE SET
                     claimant = excluded.claimant, claimed_at_ms = excluded.claimed_at_ms
                 WHERE sandbox_id = '' AND claimed_at_ms < ?4 - ?5",
                rusqlite::params![team_id, key, claimant, now_ms, stale_ms],
            )?;
            let answer = if claimed == 1 {
                IdempotencyClaim::Claimed
            } else {
                let made: Option<String> = transaction
                    .query_row(
                        "SELECT sandbox_id FROM idempotency_keys WHERE team_id = ?1 AND key = ?2",
                        rusqlite::params![team_id, key],
                        |row| row.get(0),
                    )
                    .optional()?;
                match made {
                    Some(id) if !id.is_empty() => IdempotencyClaim::Made(id),
                    _ => IdempotencyClaim::Pending,
                }
            };
            transaction.commit()?;
            Ok(answer)
        })
        .await
    }

    async fn settle_idempotency(
        &self,
        team_id: &str,
        key: &str,
        claimant: &str,
        sandbox_id: &str,
    ) -> StoreResult<()> {
        self.execute(
            "UPDATE idempotency_keys SET sandbox_id = ?4
             WHERE team_id = ?1 AND key = ?2 AND claimant = ?3",
            values![
                team_id.to_string(),
                key.to_string(),
                claimant.to_string(),
                sandbox_id.to_string()
            ],
        )
        .await
        .map(drop)
    }

    async fn drop_idempotency(&self, team_id: &str, key: &str, claimant: &str) -> StoreResult<()> {
        self.execute(
            "DELETE FROM idempotency_keys
             WHERE team_id = ?1 AND key = ?2 AND claimant = ?3 AND sandbox_id = ''",
            values![team_id.to_string(), key.to_string(), claimant.to_string()],
        )
        .await
        .map(drop)
    }

    async fn forget_idempotency(
        &self,
        team_id: &str,
        key: &str,
        sandbox_id: &str,
    ) -> StoreResult<()> {
        self.execute(
            "DELETE FROM idempotency_keys WHERE team_id = ?1 AND key = ?2 AND sandbox_id = ?3",
            values![team_id.to_string(), key.to_string(), sandbox_id.to_string()],
        )
        .await
        .map(drop)
    }

    async fn prune_idempotency(&self, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            "DELETE FROM idempotency_keys WHERE claimed_at_ms < ?1",
            values![before_ms],
        )
        .await
        .map(|changed| changed as u64)
    }

    async fn host_heartbeat(
        &self,
        host_id: &str,
        heartbeat_hash: &str,
        report: &wrenn_agent_api::join::HostReport,
        at_ms: i64,
    ) -> StoreResult<Option<HostState>> {
        let (host_id, heartbeat_hash) = (host_id.to_string(), heartbeat_hash.to_string());
        let report = serde_json::to_string(report).unwrap_or_default();
        self.with(move |db| {
            use rusqlite::OptionalExtension;
            let transaction = db.transaction()?;
            let before: Option<String> = transaction
                .query_row(
                    "SELECT state FROM hosts WHERE id = ?1 AND heartbeat_hash = ?2",
                    rusqlite::params![host_id, heartbeat_hash],
                    |row| row.get(0),
                )
                .optional()?;
            if before.is_some() {
                transaction.execute(
                    "UPDATE hosts SET state = 'up', report = ?2, last_heartbeat_ms = ?3
                     WHERE id = ?1",
                    rusqlite::params![host_id, report, at_ms],
                )?;
            }
            transaction.commit()?;
            Ok(before.map(|state| HostState::from_stored(&state)))
        })
        .await
    }

    async fn mark_host_down_if_silent(
        &self,
        host_id: &str,
        last_heartbeat_ms: i64,
    ) -> StoreResult<Option<u64>> {
        let host_id = host_id.to_string();
        self.with(move |db| {
            let transaction = db.transaction()?;
            let down = transaction.execute(
                "UPDATE hosts SET state = 'down'
                 WHERE id = ?1 AND state = 'up' AND last_heartbeat_ms = ?2",
                rusqlite::params![host_id, last_heartbeat_ms],
            )?;
            let lost = if down == 1 {
                Some(transaction.execute(
                    "UPDATE sandboxes SET state = 'lost'
                     WHERE host_id = ?1 AND state IN ('running', 'paused')",
                    [&host_id],
                )? as u64)
            } else {
                None
            };
            transaction.commit()?;
            Ok(lost)
        })
        .await
    }

    /// Adds or replaces a host.
    async fn put_host(&self, host: HostRow) -> StoreResult<()> {
        self.execute(
            format!(
                "INSERT INTO hosts (id, name, api_url, proxy_address, agent_token, heartbeat_hash, state,
                    report, last_heartbeat_ms, registered_at_ms, identity_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 {HOST_UPSERT}"
            ),
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
        self.select("ORDER BY name", values![]).await
    }

    async fn put_template(&self, template: TemplateRow) -> StoreResult<()> {
        self.execute(
            format!(
                "INSERT INTO templates (id, team_id, alias, public, cpu_count, memory_mb,
                    created_at_ms, updated_at_ms, ready_build_id, source_sandbox_id, network)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) {TEMPLATE_UPSERT}"
            ),
            values![
                template.id,
                template.team_id,
                template.alias,
                template.public,
                template.cpu_count,
                template.memory_mb,
                template.created_at_ms,
                template.updated_at_ms,
                template.ready_build_id,
                template.source_sandbox_id,
                serde_json::to_string(&template.network).unwrap_or_else(|_| "{}".into()),
            ],
        )
        .await
        .map(drop)
    }

    async fn template(&self, id: &str) -> StoreResult<Option<TemplateRow>> {
        self.select("WHERE id = ?1", values![id.to_string()])
            .await
            .map(first)
    }

    async fn template_by_alias(&self, alias: &str) -> StoreResult<Option<TemplateRow>> {
        self.select("WHERE alias = ?1", values![alias.to_string()])
            .await
            .map(first)
    }

    async fn templates_for(&self, team_id: &str) -> StoreResult<Vec<TemplateRow>> {
        let clause = "WHERE team_id = ?1 OR public ORDER BY created_at_ms, id";
        self.select(clause, values![team_id.to_string()]).await
    }

    async fn delete_template(&self, id: &str) -> StoreResult<bool> {
        self.execute(
            "DELETE FROM templates WHERE id = ?1",
            values![id.to_string()],
        )
        .await
        .map(|n| n == 1)
    }

    async fn put_build(&self, build: BuildRow) -> StoreResult<()> {
        self.execute(
            format!(
                "INSERT INTO template_builds (id, template_id, status, reason, reason_step,
                    from_template, host_id, host_template_id, cpu_count, memory_mb, disk_size_mb,
                    envd_version, created_at_ms, finished_at_ms, tags)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                 {BUILD_UPSERT}"
            ),
            values![
                build.id,
                build.template_id,
                build.status.as_str().to_string(),
                build.reason,
                build.reason_step,
                build.from_template,
                build.host_id,
                build.host_template_id,
                build.cpu_count,
                build.memory_mb,
                build.disk_size_mb,
                build.envd_version,
                build.created_at_ms,
                build.finished_at_ms,
                serde_json::to_string(&build.tags).unwrap_or_else(|_| "[]".into()),
            ],
        )
        .await
        .map(drop)
    }

    async fn build(&self, id: &str) -> StoreResult<Option<BuildRow>> {
        self.select("WHERE id = ?1", values![id.to_string()])
            .await
            .map(first)
    }

    async fn builds_of(&self, template_id: &str) -> StoreResult<Vec<BuildRow>> {
        let clause = "WHERE template_id = ?1 ORDER BY created_at_ms, id";
        self.select(clause, values![template_id.to_string()]).await
    }

    async fn builds_in(&self, status: super::BuildStatus) -> StoreResult<Vec<BuildRow>> {
        let clause = "WHERE status = ?1 ORDER BY created_at_ms, id";
        self.select(clause, values![status.as_str().to_string()])
            .await
    }

    async fn add_build_logs(&self, build_id: &str, lines: Vec<BuildLogRow>) -> StoreResult<()> {
        let build_id = build_id.to_string();
        self.with(move |db| {
            let transaction = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let next: i64 = transaction.query_row(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM template_build_logs WHERE build_id = ?1",
                [&build_id],
                |row| row.get(0),
            )?;
            for (offset, line) in lines.into_iter().enumerate() {
                transaction.execute(
                    "INSERT INTO template_build_logs (build_id, seq, timestamp_ms, level, message, step)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![
                        build_id,
                        next + offset as i64,
                        line.timestamp_ms,
                        line.level,
                        line.message,
                        line.step
                    ],
                )?;
            }
            transaction.commit()
        })
        .await
    }

    async fn put_tag(&self, tag: TagRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO template_tags (template_id, tag, build_id, created_at_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id,
                created_at_ms = excluded.created_at_ms",
            values![tag.template_id, tag.tag, tag.build_id, tag.created_at_ms],
        )
        .await
        .map(drop)
    }

    async fn delete_tags(&self, template_id: &str, tags: Vec<String>) -> StoreResult<u64> {
        let template_id = template_id.to_string();
        self.with(move |db| {
            let transaction = db.transaction()?;
            let mut removed = 0;
            for tag in tags {
                removed += transaction.execute(
                    "DELETE FROM template_tags WHERE template_id = ?1 AND tag = ?2",
                    rusqlite::params![template_id, tag],
                )? as u64;
            }
            transaction.commit()?;
            Ok(removed)
        })
        .await
    }

    async fn tags_of(&self, template_id: &str) -> StoreResult<Vec<TagRow>> {
        let clause = "WHERE template_id = ?1 ORDER BY tag";
        self.select(clause, values![template_id.to_string()]).await
    }

    async fn build_logs(
        &self,
        build_id: &str,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<BuildLogRow>> {
        let clause = "WHERE build_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3";
        self.select(clause, values![build_id.to_string(), offset, limit])
            .await
    }

    async fn add_channel(&self, channel: ChannelRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO channels (id, team_id, name, kind, url_sealed, secret_sealed, events,
                enabled, consecutive_failures, disabled_reason, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            values![
                channel.id,
                channel.team_id,
                channel.name,
                channel.kind,
                channel.url_sealed,
                channel.secret_sealed,
                channel.events,
                channel.enabled,
                channel.consecutive_failures,
                channel.disabled_reason,
                channel.created_at_ms
            ],
        )
        .await
        .map(drop)
    }

    async fn channel(&self, id: &str) -> StoreResult<Option<ChannelRow>> {
        self.select("WHERE id = ?1", values![id.to_string()])
            .await
            .map(first)
    }

    async fn channels_of(&self, team_id: &str) -> StoreResult<Vec<ChannelRow>> {
        let clause = "WHERE team_id = ?1 ORDER BY created_at_ms, id";
        self.select(clause, values![team_id.to_string()]).await
    }

    async fn update_channel(&self, channel: ChannelRow) -> StoreResult<bool> {
        self.execute(
            "UPDATE channels SET name = ?2, url_sealed = ?3, events = ?4, enabled = ?5,
                consecutive_failures = ?6, disabled_reason = ?7 WHERE id = ?1",
            values![
                channel.id,
                channel.name,
                channel.url_sealed,
                channel.events,
                channel.enabled,
                channel.consecutive_failures,
                channel.disabled_reason
            ],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn delete_channel(&self, id: &str) -> StoreResult<bool> {
        self.execute(
            "DELETE FROM channels WHERE id = ?1",
            values![id.to_string()],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn count_delivery(
        &self,
        channel_id: &str,
        delivered: bool,
        disable_after: i64,
        reason: &str,
    ) -> StoreResult<()> {
        self.execute(
            count_delivery_sql(|n| format!("?{n}")),
            values![
                channel_id.to_string(),
                delivered,
                disable_after,
                reason.to_string()
            ],
        )
        .await
        .map(drop)
    }

    async fn pending_heads(&self) -> StoreResult<Vec<DeliveryRow>> {
        self.select(PENDING_HEADS, values![]).await
    }

    async fn update_delivery(&self, delivery: DeliveryRow) -> StoreResult<()> {
        self.execute(
            "UPDATE channel_deliveries SET state = ?2, attempts = ?3, next_attempt_at_ms = ?4,
                last_status = ?5, last_error = ?6, updated_at_ms = ?7 WHERE id = ?1",
            values![
                delivery.id,
                delivery.state,
                delivery.attempts,
                delivery.next_attempt_at_ms,
                delivery.last_status,
                delivery.last_error,
                delivery.updated_at_ms
            ],
        )
        .await
        .map(drop)
    }

    async fn deliveries_of(&self, channel_id: &str, limit: usize) -> StoreResult<Vec<DeliveryRow>> {
        let clause = "WHERE channel_id = ?1 ORDER BY event_seq DESC, id DESC LIMIT ?2";
        let limit = limit.min(10_000) as i64;
        self.select(clause, values![channel_id.to_string(), limit])
            .await
    }

    async fn prune_deliveries(&self, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            "DELETE FROM channel_deliveries WHERE state <> 'pending' AND updated_at_ms < ?1",
            values![before_ms],
        )
        .await
        .map(|deleted| deleted as u64)
    }

    async fn sandbox_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        self.rows(
            "SELECT state, COUNT(*) FROM sandboxes GROUP BY state".into(),
            values![],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .await
    }

    async fn add_telemetry(&self, batch: TelemetryBatch) -> StoreResult<()> {
        let mark = |n: usize| format!("?{n}");
        self.with(move |db| {
            let transaction = db.transaction()?;
            {
                let mut insert = transaction.prepare(&telemetry_sql::insert_metric_sql(mark))?;
                for s in &batch.samples {
                    insert.execute(rusqlite::params![
                        s.sandbox_id,
                        s.team_id,
                        s.tier,
                        s.at_ms,
                        s.cpu_count,
                        s.cpu_used_pct,
                        s.mem_used,
                        s.mem_total,
                        s.mem_cache,
                        s.disk_used,
                        s.disk_total,
                        s.net_rx_bytes,
                        s.net_tx_bytes
                    ])?;
                }
                let mut insert = transaction.prepare(&telemetry_sql::insert_log_sql(mark))?;
                for line in &batch.logs {
                    insert.execute(rusqlite::params![
                        line.sandbox_id,
                        line.team_id,
                        line.at_ms,
                        line.level,
                        line.message,
                        line.fields
                    ])?;
                }
                let mut add = transaction.prepare(&telemetry_sql::add_usage_sql(mark))?;
                for usage in &batch.usage {
                    add.execute(rusqlite::params![
                        usage.team_id,
                        usage.day,
                        usage.sandbox_ms,
                        usage.mib_ms
                    ])?;
                }
                let mut cap = transaction.prepare(&telemetry_sql::cap_logs_sql(mark))?;
                let mut capped: Vec<&str> = batch
                    .logs
                    .iter()
                    .map(|line| line.sandbox_id.as_str())
                    .collect();
                capped.sort_unstable();
                capped.dedup();
                for sandbox in capped {
                    cap.execute(rusqlite::params![sandbox, batch.log_cap_chars])?;
                }
            }
            if let Some(cursor) = &batch.cursor {
                transaction.execute(
                    "INSERT INTO telemetry_cursors (host_id, epoch, after) VALUES (?1, ?2, ?3)
                     ON CONFLICT (host_id) DO UPDATE SET epoch = excluded.epoch, after = excluded.after",
                    rusqlite::params![
                        cursor.host_id,
                        cursor.epoch,
                        i64::try_from(cursor.after).unwrap_or(i64::MAX)
                    ],
                )?;
            }
            transaction.commit()
        })
        .await
    }

    async fn telemetry_cursor(&self, host_id: &str) -> StoreResult<Option<TelemetryCursor>> {
        let host_id = host_id.to_string();
        self.with(move |db| {
            use rusqlite::OptionalExtension;
            db.query_row(
                "SELECT epoch, after FROM telemetry_cursors WHERE host_id = ?1",
                [&host_id],
                |row| {
                    Ok(TelemetryCursor {
                        host_id: host_id.clone(),
                        epoch: row.get(0)?,
                        after: u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn metrics_between(
        &self,
        sandbox_id: &str,
        team_id: &str,
        tier: i64,
        from_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<MetricRow>> {
        let clause = "WHERE sandbox_id = ?1 AND team_id = ?2 AND tier = ?3 AND at_ms >= ?4
            AND at_ms < ?5 ORDER BY at_ms LIMIT ?6";
        self.select(
            clause,
            values![
                sandbox_id.to_string(),
                team_id.to_string(),
                tier,
                from_ms,
                until_ms,
                limit.min(100_000) as i64
            ],
        )
        .await
    }

    async fn latest_metric(
        &self,
        sandbox_id: &str,
        team_id: &str,
    ) -> StoreResult<Option<MetricRow>> {
        let clause = "WHERE sandbox_id = ?1 AND team_id = ?2 AND tier = 0
            ORDER BY at_ms DESC LIMIT 1";
        self.select(clause, values![sandbox_id.to_string(), team_id.to_string()])
            .await
            .map(first)
    }

    async fn rolled_up_until(&self, tier: i64) -> StoreResult<i64> {
        self.with(move |db| {
            db.query_row(
                "SELECT COALESCE(MAX(done_until_ms), 0) FROM metrics_rollups WHERE tier = ?1",
                [tier],
                |row| row.get(0),
            )
        })
        .await
    }

    async fn roll_up_metrics(
        &self,
        tier: i64,
        bucket_ms: i64,
        from_ms: i64,
        until_ms: i64,
    ) -> StoreResult<u64> {
        let mark = |n: usize| format!("?{n}");
        self.with(move |db| {
            let transaction = db.transaction()?;
            let made = transaction.execute(
                &telemetry_sql::roll_up_sql(mark),
                rusqlite::params![tier, bucket_ms, from_ms, until_ms],
            )?;
            transaction.execute(
                &telemetry_sql::rolled_up_sql(mark),
                rusqlite::params![tier, until_ms],
            )?;
            transaction.commit()?;
            Ok(made as u64)
        })
        .await
    }

    async fn prune_metrics(&self, tier: i64, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            "DELETE FROM sandbox_metrics WHERE tier = ?1 AND at_ms < ?2",
            values![tier, before_ms],
        )
        .await
        .map(|deleted| deleted as u64)
    }

    async fn sandbox_logs(&self, query: LogLinesQuery) -> StoreResult<Vec<SandboxLogRow>> {
        let (clause, values) = query.clause(|n| format!("?{n}"));
        let values = values
            .into_iter()
            .map(|value| match value {
                QueryValue::Text(text) => Value::from(text),
                QueryValue::Int(int) => Value::from(int),
            })
            .collect();
        self.select(&clause, values).await
    }

    async fn prune_sandbox_logs(&self, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            telemetry_sql::prune_logs_sql(|n| format!("?{n}")),
            values![before_ms],
        )
        .await
        .map(|deleted| deleted as u64)
    }

    async fn usage_of(
        &self,
        team_id: &str,
        first_day: &str,
        last_day: &str,
    ) -> StoreResult<Vec<UsageRow>> {
        let clause = "WHERE team_id = ?1 AND day >= ?2 AND day <= ?3 ORDER BY day";
        self.select(
            clause,
            values![
                team_id.to_string(),
                first_day.to_string(),
                last_day.to_string()
            ],
        )
        .await
    }

    /// One page of a team's sandboxes; metadata filters match every given pair.
    async fn list(&self, query: ListQuery) -> StoreResult<(Vec<SandboxRow>, usize)> {
        self.with(move |db| {
            let mut sql = SandboxRow::select("WHERE team_id = ?1");
            let mut values: Vec<rusqlite::types::Value> = values![query.team_id.clone()];
            if !query.states.is_empty() {
                let marks = state_marks(&query.states, &mut values);
                sql.push_str(&format!(" AND state IN ({marks})"));
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
            let rows = statement.query_map(rusqlite::params_from_iter(values.iter()), |row| {
                SandboxRow::read(row)
            })?;
            Ok((rows.collect::<Result<Vec<_>, _>>()?, total_running as usize))
        })
        .await
    }
}

/// The database, its WAL and its shared-memory file 0600 (they hold API-key hashes, agent
/// tokens and envd access tokens; [`opening_lock`] made the directory 0700). The database is
/// created 0600 before SQLite opens it, because SQLite gives the WAL and shared-memory files it
/// creates the database file's mode; files left by an older wrenn are tightened.
fn private_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
