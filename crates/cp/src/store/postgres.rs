//! The PostgreSQL store: the same calls as SQLite's, over `tokio-postgres` connections from a
//! pool (`deadpool-postgres`), with its own migrations (recorded in `wrenn_schema`) applied at
//! connect. A connection is checked before each use and replaced when PostgreSQL closed it, so a
//! restarted server costs only the calls that were in flight. Metadata is `jsonb`; listing pages
//! on `(started_at_ms, id)` like SQLite's.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::TagRow;
use super::channels::{PENDING_HEADS, count_delivery_sql};
use super::rows::{BUILD_UPSERT, HOST_UPSERT, SANDBOX_UPSERT, Stored, TEMPLATE_UPSERT, first};
use super::telemetry::{self as telemetry_sql, QueryValue};
use super::{
    AUDIT_LOG, ApiKey, AuditRow, BuildLogRow, BuildRow, ChannelRow, DeliveryRow, EVENT_LOG,
    EventRow, HostRow, HostState, IdempotencyClaim, ListQuery, LogQuery, LogTable, LogValue,
    SandboxRow, SandboxState, StateChange, StoreBackend, StoreResult, Team, TemplateRow,
};
use super::{InvitationRow, MemberRow, UserRow, UserTokenRow};
use super::{LogLinesQuery, MetricRow, SandboxLogRow, TelemetryBatch, TelemetryCursor, UsageRow};

/// A statement's parameters, as `tokio-postgres` takes them.
type Parameters<'a> = [&'a (dyn ToSql + Sync)];

/// The schema's migrations, in order (`migrations/postgres/`); a database records how many it has
/// applied and gets the rest at its next open.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_teams_keys_sandboxes.sql"),
    include_str!("../../migrations/postgres/0002_hosts.sql"),
    include_str!("../../migrations/postgres/0003_traffic_token_auto_resume.sql"),
    include_str!("../../migrations/postgres/0004_admin_teams.sql"),
    include_str!("../../migrations/postgres/0005_host_identity.sql"),
    include_str!("../../migrations/postgres/0006_templates.sql"),
    include_str!("../../migrations/postgres/0007_snapshots.sql"),
    include_str!("../../migrations/postgres/0008_network.sql"),
    include_str!("../../migrations/postgres/0009_events_audit_key_roles.sql"),
    include_str!("../../migrations/postgres/0010_channels.sql"),
    include_str!("../../migrations/postgres/0011_users.sql"),
    include_str!("../../migrations/postgres/0012_telemetry.sql"),
    include_str!("../../migrations/postgres/0013_leases.sql"),
    include_str!("../../migrations/postgres/0014_replicas.sql"),
];

/// Connections to one PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PgStore")
            .field("connections", &status.size)
            .field("idle", &status.available)
            .finish()
    }
}

/// Connections kept at most (each serves one call at a time).
const POOL_SIZE: usize = 16;
/// How long a call waits for a free connection, or for a new one to be made.
const CONNECTION_WAIT: Duration = Duration::from_secs(10);

impl PgStore {
    /// Connects and applies the migrations the database lacks (under an advisory lock, so
    /// replicas starting together migrate once).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let config: tokio_postgres::Config = url.parse()?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // A connection PostgreSQL closed (a restart, a failover) may not know it yet:
                // each is tried with an empty query before it is handed out.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECTION_WAIT))
            .create_timeout(Some(CONNECTION_WAIT))
            .recycle_timeout(Some(CONNECTION_WAIT))
            .build()
            .map_err(|error| super::StoreError::Unavailable(format!("PostgreSQL: {error}")))?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// A connection from the pool, made anew if the last one was closed.
    async fn client(&self) -> StoreResult<Object> {
        self.pool.get().await.map_err(|error| match error {
            deadpool_postgres::PoolError::Backend(error) => error.into(),
            other => super::StoreError::Unavailable(format!("PostgreSQL: {other}")),
        })
    }

    /// Applies the migrations the database lacks, on one connection under an advisory lock, so
    /// replicas starting together migrate once.
    async fn migrate(&self) -> StoreResult<()> {
        let client = self.client().await?;
        client.batch_execute("SELECT pg_advisory_lock(727365); CREATE TABLE IF NOT EXISTS wrenn_schema (version INTEGER NOT NULL)").await?;
        let version: i64 = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM wrenn_schema",
                &[],
            )
            .await?
            .get(0);
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            client.batch_execute(migration).await?;
            client
                .execute(
                    "INSERT INTO wrenn_schema (version) VALUES ($1)",
                    &[&(index as i32 + 1)],
                )
                .await?;
        }
        client
            .batch_execute("SELECT pg_advisory_unlock(727365)")
            .await?;
        Ok(())
    }

    /// Runs one statement: how many rows it changed.
    async fn execute(&self, sql: &str, parameters: &Parameters<'_>) -> StoreResult<u64> {
        let started = std::time::Instant::now();
        let changed = self.client().await?.execute(sql, parameters).await?;
        crate::metrics::observe_store_call("postgres", started.elapsed());
        Ok(changed)
    }

    /// Every row one query finds, each made by `row_of`.
    async fn rows<T>(
        &self,
        sql: &str,
        parameters: &Parameters<'_>,
        row_of: impl Fn(&Row) -> Result<T, tokio_postgres::Error>,
    ) -> StoreResult<Vec<T>> {
        let started = std::time::Instant::now();
        let rows = self.client().await?.query(sql, parameters).await?;
        crate::metrics::observe_store_call("postgres", started.elapsed());
        Ok(rows.iter().map(row_of).collect::<Result<_, _>>()?)
    }

    /// The rows of a log `table` (events, audit) a [`LogQuery`] selects.
    async fn select_log<T: Stored>(&self, query: LogQuery, table: LogTable) -> StoreResult<Vec<T>> {
        let (clause, values) = query.clause(table, |n| format!("${n}"));
        let values: Vec<Box<dyn ToSql + Sync + Send>> = values
            .into_iter()
            .map(|value| -> Box<dyn ToSql + Sync + Send> {
                match value {
                    LogValue::Text(text) => Box::new(text),
                    LogValue::Int(int) => Box::new(int),
                }
            })
            .collect();
        let parameters: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|value| value.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.select(&clause, &parameters).await
    }

    /// The `T`s its [`Stored::select`] with `clause` finds.
    async fn select<T: Stored>(
        &self,
        clause: &str,
        parameters: &Parameters<'_>,
    ) -> StoreResult<Vec<T>> {
        self.rows(&T::select(clause), parameters, T::read).await
    }
}

#[async_trait::async_trait]
impl StoreBackend for PgStore {
    async fn create_team(&self, team: Team) -> StoreResult<()> {
        self.execute(
            "INSERT INTO teams (id, name, created_at_ms, admin) VALUES ($1, $2, $3, $4)",
            &[&team.id, &team.name, &team.created_at_ms, &team.admin],
        )
        .await
        .map(drop)
    }

    async fn team_where(&self, column: &'static str, value: &str) -> StoreResult<Option<Team>> {
        let clause = format!("WHERE {column} = $1");
        self.select(&clause, &[&value]).await.map(first)
    }

    async fn add_key(&self, key: ApiKey, hash: String) -> StoreResult<()> {
        self.execute(
            "INSERT INTO api_keys (id, team_id, name, hash, prefix, created_at_ms, role, mask_suffix)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &key.id,
                &key.team_id,
                &key.name,
                &hash,
                &key.prefix,
                &key.created_at_ms,
                &key.role.as_str(),
                &key.mask_suffix,
            ],
        )
        .await
        .map(drop)
    }

    async fn key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKey>> {
        let clause = "WHERE hash = $1 AND revoked_at_ms IS NULL";
        self.select(clause, &[&hash]).await.map(first)
    }

    async fn key(&self, key_id: &str) -> StoreResult<Option<ApiKey>> {
        self.select("WHERE id = $1", &[&key_id]).await.map(first)
    }

    async fn list_keys(&self, team_id: &str) -> StoreResult<Vec<ApiKey>> {
        let clause = "WHERE team_id = $1 ORDER BY created_at_ms, id";
        self.select(clause, &[&team_id]).await
    }

    async fn revoke_key(&self, key_id: &str, now_ms: i64) -> StoreResult<bool> {
        let sql = "UPDATE api_keys SET revoked_at_ms = $2 WHERE id = $1 AND revoked_at_ms IS NULL";
        Ok(self.execute(sql, &[&key_id, &now_ms]).await? == 1)
    }

    async fn rename_key(&self, key_id: &str, name: &str) -> StoreResult<bool> {
        let sql = "UPDATE api_keys SET name = $2 WHERE id = $1 AND revoked_at_ms IS NULL";
        Ok(self.execute(sql, &[&key_id, &name]).await? == 1)
    }

    async fn teams(&self) -> StoreResult<Vec<Team>> {
        self.select("ORDER BY created_at_ms, id", &[]).await
    }

    async fn create_user(&self, user: UserRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO users (id, email, password_hash, operator, created_at_ms)
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &user.id,
                &user.email,
                &user.password_hash,
                &user.operator,
                &user.created_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn user_where(&self, column: &'static str, value: &str) -> StoreResult<Option<UserRow>> {
        let clause = format!("WHERE {column} = $1");
        self.select(&clause, &[&value]).await.map(first)
    }

    async fn users(&self) -> StoreResult<Vec<UserRow>> {
        self.select("ORDER BY created_at_ms, id", &[]).await
    }

    async fn put_member(&self, member: MemberRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO memberships (team_id, user_id, role, created_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (team_id, user_id) DO UPDATE SET role = excluded.role",
            &[
                &member.team_id,
                &member.user_id,
                &member.role.as_str(),
                &member.created_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn delete_member(&self, team_id: &str, user_id: &str) -> StoreResult<bool> {
        self.execute(
            "DELETE FROM memberships WHERE team_id = $1 AND user_id = $2",
            &[&team_id, &user_id],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn members_where(
        &self,
        column: &'static str,
        value: &str,
    ) -> StoreResult<Vec<MemberRow>> {
        let clause = format!("WHERE {column} = $1 ORDER BY created_at_ms, team_id, user_id");
        self.select(&clause, &[&value]).await
    }

    async fn add_user_token(&self, token: UserTokenRow, hash: String) -> StoreResult<()> {
        self.execute(
            "INSERT INTO user_tokens (id, user_id, kind, name, hash, prefix, mask_suffix,
                 created_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &token.id,
                &token.user_id,
                &token.kind,
                &token.name,
                &hash,
                &token.prefix,
                &token.mask_suffix,
                &token.created_at_ms,
                &token.expires_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn user_token_by_hash(&self, hash: &str) -> StoreResult<Option<UserTokenRow>> {
        let clause = "WHERE hash = $1 AND revoked_at_ms IS NULL";
        self.select(clause, &[&hash]).await.map(first)
    }

    async fn user_tokens(&self, user_id: &str, kind: &str) -> StoreResult<Vec<UserTokenRow>> {
        let clause =
            "WHERE user_id = $1 AND kind = $2 AND revoked_at_ms IS NULL ORDER BY created_at_ms, id";
        self.select(clause, &[&user_id, &kind]).await
    }

    async fn revoke_user_token(
        &self,
        user_id: &str,
        token_id: &str,
        now_ms: i64,
    ) -> StoreResult<bool> {
        self.execute(
            "UPDATE user_tokens SET revoked_at_ms = $3
             WHERE user_id = $1 AND id = $2 AND revoked_at_ms IS NULL",
            &[&user_id, &token_id, &now_ms],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn add_invitation(&self, invitation: InvitationRow, hash: String) -> StoreResult<()> {
        self.execute(
            "INSERT INTO invitations (id, team_id, email, role, hash, created_by, created_at_ms,
                 expires_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &invitation.id,
                &invitation.team_id,
                &invitation.email,
                &invitation.role.as_str(),
                &hash,
                &invitation.created_by,
                &invitation.created_at_ms,
                &invitation.expires_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn invitation_by_hash(&self, hash: &str) -> StoreResult<Option<InvitationRow>> {
        self.select("WHERE hash = $1", &[&hash]).await.map(first)
    }

    async fn take_invitation(&self, hash: &str, now_ms: i64) -> StoreResult<Option<InvitationRow>> {
        let taken = self
            .execute(
                "UPDATE invitations SET accepted_at_ms = $2
                 WHERE hash = $1 AND accepted_at_ms IS NULL AND expires_at_ms > $2",
                &[&hash, &now_ms],
            )
            .await?;
        if taken != 1 {
            return Ok(None);
        }
        self.select("WHERE hash = $1", &[&hash]).await.map(first)
    }

    async fn delete_team(&self, team_id: &str) -> StoreResult<bool> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        for table in ["invitations", "memberships", "api_keys", "channels"] {
            let sql = format!("DELETE FROM {table} WHERE team_id = $1");
            transaction.execute(&sql, &[&team_id]).await?;
        }
        let deleted = transaction
            .execute("DELETE FROM teams WHERE id = $1", &[&team_id])
            .await?;
        transaction.commit().await?;
        Ok(deleted == 1)
    }

    async fn add_event(&self, event: EventRow) -> StoreResult<i64> {
        let data = event.data.to_string();
        let rows = self
            .rows(
                "INSERT INTO events (id, at_ms, team_id, actor, kind, subject, data)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb) RETURNING seq",
                &[
                    &event.id,
                    &event.at_ms,
                    &event.team_id,
                    &event.actor,
                    &event.kind,
                    &event.subject,
                    &data,
                ],
                |row| row.try_get::<_, i64>(0),
            )
            .await?;
        Ok(first(rows).unwrap_or(0))
    }

    async fn events(&self, query: LogQuery) -> StoreResult<Vec<EventRow>> {
        self.select_log(query, EVENT_LOG).await
    }

    async fn last_event_seq(&self) -> StoreResult<i64> {
        let sql = "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM events";
        let rows = self.rows(sql, &[], |row| row.try_get::<_, i64>(0)).await?;
        Ok(first(rows).unwrap_or(0))
    }

    async fn add_audit(&self, row: AuditRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO audit_log (id, at_ms, team_id, actor, action, resource, outcome, client)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &row.id,
                &row.at_ms,
                &row.team_id,
                &row.actor,
                &row.action,
                &row.resource,
                &row.outcome,
                &row.client,
            ],
        )
        .await
        .map(drop)
    }

    async fn audit(&self, query: LogQuery) -> StoreResult<Vec<AuditRow>> {
        self.select_log(query, AUDIT_LOG).await
    }

    async fn put_sandbox(&self, sandbox: SandboxRow) -> StoreResult<()> {
        let metadata = serde_json::to_string(&sandbox.metadata).unwrap_or_else(|_| "{}".into());
        let network = serde_json::to_string(&sandbox.network).unwrap_or_else(|_| "{}".into());
        let (cpu, memory) = (sandbox.cpu_count as i32, sandbox.memory_mb as i32);
        self.execute(
                &format!(
                "INSERT INTO sandboxes (id, team_id, template_id, alias, state, started_at_ms, end_at_ms, metadata,
                    envd_access_token, auto_pause, allow_internet, cpu_count, memory_mb, envd_version, host_id,
                    traffic_access_token, auto_resume, auto_pause_memory, paused_disk_only, network)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20::text::jsonb)
                 {SANDBOX_UPSERT}"
            ),
                &[
                    &sandbox.id,
                    &sandbox.team_id,
                    &sandbox.template_id,
                    &sandbox.alias,
                    &sandbox.state.as_str(),
                    &sandbox.started_at_ms,
                    &sandbox.end_at_ms,
                    &metadata,
                    &sandbox.envd_access_token,
                    &sandbox.auto_pause,
                    &sandbox.allow_internet,
                    &cpu,
                    &memory,
                    &sandbox.envd_version,
                    &sandbox.host_id,
                    &sandbox.traffic_access_token,
                    &sandbox.auto_resume,
                    &sandbox.auto_pause_memory,
                    &sandbox.paused_disk_only,
                    &network,
                ],
            )
            .await
            .map(drop)
    }

    async fn sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>> {
        self.select("WHERE id = $1", &[&id]).await.map(first)
    }

    async fn delete_sandbox(&self, id: &str) -> StoreResult<bool> {
        Ok(self
            .execute("DELETE FROM sandboxes WHERE id = $1", &[&id])
            .await?
            == 1)
    }

    async fn set_state(&self, id: &str, state: SandboxState, end_at_ms: i64) -> StoreResult<()> {
        let sql = "UPDATE sandboxes SET state = $2, end_at_ms = $3 WHERE id = $1";
        self.execute(sql, &[&id, &state.as_str(), &end_at_ms])
            .await
            .map(drop)
    }

    async fn expired(&self, now_ms: i64) -> StoreResult<Vec<SandboxRow>> {
        let clause = "WHERE state = 'running' AND end_at_ms <= $1";
        self.select(clause, &[&now_ms]).await
    }

    async fn all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>> {
        self.select("", &[]).await
    }

    async fn change_states(&self, change: StateChange<'_>) -> StoreResult<u64> {
        let sql = format!(
            "UPDATE sandboxes SET state = $2 WHERE {} = $1 AND state = ANY($3)",
            change.column
        );
        let from = state_names(change.from);
        self.execute(&sql, &[&change.value, &change.to.as_str(), &from])
            .await
    }

    async fn sandboxes_on_host(&self, host_id: &str) -> StoreResult<Vec<SandboxRow>> {
        self.select("WHERE host_id = $1", &[&host_id]).await
    }

    async fn take_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> StoreResult<Option<i64>> {
        // The server's clock, the one every replica shares; the conflicting row is locked, so
        // of two replicas taking an expired lease at once one wins and the other sees it held.
        let sql = "INSERT INTO leases (name, holder, token, expires_at_ms)
                SELECT $1, $2, 1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT + $3
            ON CONFLICT (name) DO UPDATE SET
                token = leases.token + CASE
                    WHEN leases.holder = EXCLUDED.holder
                        AND leases.expires_at_ms >= EXCLUDED.expires_at_ms - $3 THEN 0
                    ELSE 1 END,
                holder = EXCLUDED.holder,
                expires_at_ms = EXCLUDED.expires_at_ms
            WHERE leases.holder = EXCLUDED.holder
                OR leases.expires_at_ms < EXCLUDED.expires_at_ms - $3
            RETURNING token";
        let started = std::time::Instant::now();
        let row = self
            .client()
            .await?
            .query_opt(sql, &[&name, &holder, &ttl_ms])
            .await?;
        crate::metrics::observe_store_call("postgres", started.elapsed());
        Ok(row.map(|row| row.get::<_, i64>(0)))
    }

    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        // Expired at once, kept for its token (the next holder's is higher).
        let sql = "UPDATE leases SET expires_at_ms = 0 WHERE name = $1 AND holder = $2";
        Ok(self.execute(sql, &[&name, &holder]).await? == 1)
    }

    async fn drop_lease(&self, name: &str, holder: &str) -> StoreResult<bool> {
        self.execute(
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            &[&name, &holder],
        )
        .await
        .map(|changed| changed == 1)
    }

    fn shared(&self) -> bool {
        true
    }

    async fn lease_held(&self, name: &str) -> StoreResult<bool> {
        let sql = "SELECT EXISTS (SELECT 1 FROM leases WHERE name = $1
            AND expires_at_ms >= (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT)";
        let row = self.client().await?.query_one(sql, &[&name]).await?;
        Ok(row.get(0))
    }

    async fn claim_idempotency(
        &self,
        team_id: &str,
        key: &str,
        claimant: &str,
        now_ms: i64,
        stale_ms: i64,
    ) -> StoreResult<IdempotencyClaim> {
        // The conflicting row is locked: of two claims at once, one takes the key and the
        // other reads it taken. The row's `claimant` then says whose it is.
        let sql = "INSERT INTO idempotency_keys (team_id, key, claimant, claimed_at_ms)
                VALUES ($1, $2, $3, $4)
            ON CONFLICT (team_id, key) DO UPDATE SET
                claimant = EXCLUDED.claimant, claimed_at_ms = EXCLUDED.claimed_at_ms
            WHERE idempotency_keys.sandbox_id = ''
                AND idempotency_keys.claimed_at_ms < $4 - $5
            RETURNING claimant";
        let client = self.client().await?;
        let started = std::time::Instant::now();
        let claimed = client
            .query_opt(sql, &[&team_id, &key, &claimant, &now_ms, &stale_ms])
            .await?
            .is_some();
        let answer = if claimed {
            IdempotencyClaim::Claimed
        } else {
            let made = client
                .query_opt(
                    "SELECT sandbox_id FROM idempotency_keys WHERE team_id = $1 AND key = $2",
                    &[&team_id, &key],
                )
                .await?
                .map(|row| row.get::<_, String>(0));
            match made {
                Some(id) if !id.is_empty() => IdempotencyClaim::Made(id),
                _ => IdempotencyClaim::Pending,
            }
        };
        crate::metrics::observe_store_call("postgres", started.elapsed());
        Ok(answer)
    }

    async fn settle_idempotency(
        &self,
        team_id: &str,
        key: &str,
        claimant: &str,
        sandbox_id: &str,
    ) -> StoreResult<()> {
        self.execute(
            "UPDATE idempotency_keys SET sandbox_id = $4
             WHERE team_id = $1 AND key = $2 AND claimant = $3",
            &[&team_id, &key, &claimant, &sandbox_id],
        )
        .await
        .map(drop)
    }

    async fn drop_idempotency(&self, team_id: &str, key: &str, claimant: &str) -> StoreResult<()> {
        self.execute(
            "DELETE FROM idempotency_keys
             WHERE team_id = $1 AND key = $2 AND claimant = $3 AND sandbox_id = ''",
            &[&team_id, &key, &claimant],
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
            "DELETE FROM idempotency_keys WHERE team_id = $1 AND key = $2 AND sandbox_id = $3",
            &[&team_id, &key, &sandbox_id],
        )
        .await
        .map(drop)
    }

    async fn prune_idempotency(&self, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            "DELETE FROM idempotency_keys WHERE claimed_at_ms < $1",
            &[&before_ms],
        )
        .await
    }

    async fn host_heartbeat(
        &self,
        host_id: &str,
        heartbeat_hash: &str,
        report: &wrenn_agent_api::join::HostReport,
        at_ms: i64,
    ) -> StoreResult<Option<HostState>> {
        let report = serde_json::to_string(report).unwrap_or_else(|_| "{}".into());
        // The row is locked as it is read, so its state before is the one this heartbeat
        // replaces: a replica marking the host down at once waits, then finds it heard from.
        let sql = "WITH before AS (
                SELECT id, state FROM hosts WHERE id = $1 AND heartbeat_hash = $2 FOR UPDATE)
            UPDATE hosts SET state = 'up', report = $3::text::jsonb, last_heartbeat_ms = $4
            FROM before WHERE hosts.id = before.id
            RETURNING before.state";
        let started = std::time::Instant::now();
        let row = self
            .client()
            .await?
            .query_opt(sql, &[&host_id, &heartbeat_hash, &report, &at_ms])
            .await?;
        crate::metrics::observe_store_call("postgres", started.elapsed());
        Ok(row.map(|row| HostState::from_stored(&row.get::<_, String>(0))))
    }

    async fn mark_host_down_if_silent(
        &self,
        host_id: &str,
        last_heartbeat_ms: i64,
    ) -> StoreResult<Option<u64>> {
        // One statement: the host and its sandboxes change together or not at all.
        let sql = "WITH down AS (
                UPDATE hosts SET state = 'down'
                WHERE id = $1 AND state = 'up' AND last_heartbeat_ms = $2 RETURNING id),
            lost AS (
                UPDATE sandboxes SET state = 'lost'
                WHERE host_id IN (SELECT id FROM down) AND state IN ('running', 'paused')
                RETURNING 1)
            SELECT (SELECT COUNT(*) FROM down), (SELECT COUNT(*) FROM lost)";
        let started = std::time::Instant::now();
        let row = self
            .client()
            .await?
            .query_one(sql, &[&host_id, &last_heartbeat_ms])
            .await?;
        crate::metrics::observe_store_call("postgres", started.elapsed());
        let (down, lost): (i64, i64) = (row.get(0), row.get(1));
        Ok((down == 1).then_some(lost as u64))
    }

    async fn put_host(&self, host: HostRow) -> StoreResult<()> {
        let report = serde_json::to_string(&host.report).unwrap_or_else(|_| "{}".into());
        self.execute(
                &format!(
                "INSERT INTO hosts (id, name, api_url, proxy_address, agent_token, heartbeat_hash, state,
                    report, last_heartbeat_ms, registered_at_ms, identity_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9, $10, $11)
                 {HOST_UPSERT}"
            ),
                &[
                    &host.id,
                    &host.name,
                    &host.api_url,
                    &host.proxy_address,
                    &host.agent_token,
                    &host.heartbeat_hash,
                    &host.state.as_str(),
                    &report,
                    &host.last_heartbeat_ms,
                    &host.registered_at_ms,
                    &host.identity_hash,
                ],
            )
            .await
            .map(drop)
    }

    async fn forget_host(&self, host_id: &str) -> StoreResult<u64> {
        // One statement, so the host and its sandboxes go together.
        let sql = "WITH gone AS (DELETE FROM sandboxes WHERE host_id = $1 RETURNING 1),
                host AS (DELETE FROM hosts WHERE id = $1)
            SELECT COUNT(*) FROM gone";
        let row = self.client().await?.query_one(sql, &[&host_id]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn hosts(&self) -> StoreResult<Vec<HostRow>> {
        self.select("ORDER BY name", &[]).await
    }

    async fn put_template(&self, template: TemplateRow) -> StoreResult<()> {
        let (cpu, memory) = (template.cpu_count as i32, template.memory_mb as i32);
        let network = serde_json::to_string(&template.network).unwrap_or_else(|_| "{}".into());
        self.execute(
            &format!(
                "INSERT INTO templates (id, team_id, alias, public, cpu_count, memory_mb,
                    created_at_ms, updated_at_ms, ready_build_id, source_sandbox_id, network)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::text::jsonb) {TEMPLATE_UPSERT}"
            ),
            &[
                &template.id,
                &template.team_id,
                &template.alias,
                &template.public,
                &cpu,
                &memory,
                &template.created_at_ms,
                &template.updated_at_ms,
                &template.ready_build_id,
                &template.source_sandbox_id,
                &network,
            ],
        )
        .await
        .map(drop)
    }

    async fn template(&self, id: &str) -> StoreResult<Option<TemplateRow>> {
        self.select("WHERE id = $1", &[&id]).await.map(first)
    }

    async fn template_by_alias(&self, alias: &str) -> StoreResult<Option<TemplateRow>> {
        self.select("WHERE alias = $1", &[&alias]).await.map(first)
    }

    async fn templates_for(&self, team_id: &str) -> StoreResult<Vec<TemplateRow>> {
        let clause = "WHERE team_id = $1 OR public ORDER BY created_at_ms, id";
        self.select(clause, &[&team_id]).await
    }

    async fn delete_template(&self, id: &str) -> StoreResult<bool> {
        Ok(self
            .execute("DELETE FROM templates WHERE id = $1", &[&id])
            .await?
            == 1)
    }

    async fn put_build(&self, build: BuildRow) -> StoreResult<()> {
        let (cpu, memory, disk) = (
            build.cpu_count as i32,
            build.memory_mb as i32,
            build.disk_size_mb as i32,
        );
        let tags = serde_json::to_string(&build.tags).unwrap_or_else(|_| "[]".into());
        self.execute(
            &format!(
                "INSERT INTO template_builds (id, template_id, status, reason, reason_step,
                    from_template, host_id, host_template_id, cpu_count, memory_mb, disk_size_mb,
                    envd_version, created_at_ms, finished_at_ms, tags)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                 {BUILD_UPSERT}"
            ),
            &[
                &build.id,
                &build.template_id,
                &build.status.as_str(),
                &build.reason,
                &build.reason_step,
                &build.from_template,
                &build.host_id,
                &build.host_template_id,
                &cpu,
                &memory,
                &disk,
                &build.envd_version,
                &build.created_at_ms,
                &build.finished_at_ms,
                &tags,
            ],
        )
        .await
        .map(drop)
    }

    async fn build(&self, id: &str) -> StoreResult<Option<BuildRow>> {
        self.select("WHERE id = $1", &[&id]).await.map(first)
    }

    async fn builds_of(&self, template_id: &str) -> StoreResult<Vec<BuildRow>> {
        let clause = "WHERE template_id = $1 ORDER BY created_at_ms, id";
        self.select(clause, &[&template_id]).await
    }

    async fn builds_in(&self, status: super::BuildStatus) -> StoreResult<Vec<BuildRow>> {
        let clause = "WHERE status = $1 ORDER BY created_at_ms, id";
        self.select(clause, &[&status.as_str()]).await
    }

    async fn add_build_logs(&self, build_id: &str, lines: Vec<BuildLogRow>) -> StoreResult<()> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        // One writer of a build's log at a time: the next numbers are this one's.
        transaction
            .execute(
                "SELECT 1 FROM template_builds WHERE id = $1 FOR UPDATE",
                &[&build_id],
            )
            .await?;
        let next: i64 = transaction
            .query_one(
                "SELECT COALESCE(MAX(seq) + 1, 0)::BIGINT FROM template_build_logs WHERE build_id = $1",
                &[&build_id],
            )
            .await?
            .get(0);
        for (offset, line) in lines.iter().enumerate() {
            let seq = next + offset as i64;
            transaction
                .execute(
                    "INSERT INTO template_build_logs (build_id, seq, timestamp_ms, level, message, step)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&build_id, &seq, &line.timestamp_ms, &line.level, &line.message, &line.step],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn put_tag(&self, tag: TagRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO template_tags (template_id, tag, build_id, created_at_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (template_id, tag) DO UPDATE SET build_id = excluded.build_id,
                created_at_ms = excluded.created_at_ms",
            &[
                &tag.template_id,
                &tag.tag,
                &tag.build_id,
                &tag.created_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn delete_tags(&self, template_id: &str, tags: Vec<String>) -> StoreResult<u64> {
        self.execute(
            "DELETE FROM template_tags WHERE template_id = $1 AND tag = ANY($2)",
            &[&template_id, &tags],
        )
        .await
    }

    async fn tags_of(&self, template_id: &str) -> StoreResult<Vec<TagRow>> {
        self.select("WHERE template_id = $1 ORDER BY tag", &[&template_id])
            .await
    }

    async fn build_logs(
        &self,
        build_id: &str,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<BuildLogRow>> {
        let clause = "WHERE build_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3";
        self.select(clause, &[&build_id, &offset, &limit]).await
    }

    async fn add_channel(&self, channel: ChannelRow) -> StoreResult<()> {
        self.execute(
            "INSERT INTO channels (id, team_id, name, kind, url_sealed, secret_sealed, events,
                enabled, consecutive_failures, disabled_reason, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &channel.id,
                &channel.team_id,
                &channel.name,
                &channel.kind,
                &channel.url_sealed,
                &channel.secret_sealed,
                &channel.events,
                &channel.enabled,
                &channel.consecutive_failures,
                &channel.disabled_reason,
                &channel.created_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn channel(&self, id: &str) -> StoreResult<Option<ChannelRow>> {
        self.select("WHERE id = $1", &[&id]).await.map(first)
    }

    async fn channels_of(&self, team_id: &str) -> StoreResult<Vec<ChannelRow>> {
        let clause = "WHERE team_id = $1 ORDER BY created_at_ms, id";
        self.select(clause, &[&team_id]).await
    }

    async fn update_channel(&self, channel: ChannelRow) -> StoreResult<bool> {
        self.execute(
            "UPDATE channels SET name = $2, url_sealed = $3, events = $4, enabled = $5,
                consecutive_failures = $6, disabled_reason = $7 WHERE id = $1",
            &[
                &channel.id,
                &channel.name,
                &channel.url_sealed,
                &channel.events,
                &channel.enabled,
                &channel.consecutive_failures,
                &channel.disabled_reason,
            ],
        )
        .await
        .map(|changed| changed == 1)
    }

    async fn delete_channel(&self, id: &str) -> StoreResult<bool> {
        self.execute("DELETE FROM channels WHERE id = $1", &[&id])
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
        let sql = count_delivery_sql(|n| format!("${n}"));
        self.execute(&sql, &[&channel_id, &delivered, &disable_after, &reason])
            .await
            .map(drop)
    }

    async fn pending_heads(&self) -> StoreResult<Vec<DeliveryRow>> {
        self.select(PENDING_HEADS, &[]).await
    }

    async fn update_delivery(&self, delivery: DeliveryRow) -> StoreResult<()> {
        self.execute(
            "UPDATE channel_deliveries SET state = $2, attempts = $3, next_attempt_at_ms = $4,
                last_status = $5, last_error = $6, updated_at_ms = $7 WHERE id = $1",
            &[
                &delivery.id,
                &delivery.state,
                &delivery.attempts,
                &delivery.next_attempt_at_ms,
                &delivery.last_status,
                &delivery.last_error,
                &delivery.updated_at_ms,
            ],
        )
        .await
        .map(drop)
    }

    async fn deliveries_of(&self, channel_id: &str, limit: usize) -> StoreResult<Vec<DeliveryRow>> {
        let clause = "WHERE channel_id = $1 ORDER BY event_seq DESC, id DESC LIMIT $2";
        let limit = limit.min(10_000) as i64;
        self.select(clause, &[&channel_id, &limit]).await
    }

    async fn prune_deliveries(&self, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            "DELETE FROM channel_deliveries WHERE state <> 'pending' AND updated_at_ms < $1",
            &[&before_ms],
        )
        .await
    }

    async fn sandbox_counts(&self) -> StoreResult<Vec<(String, i64)>> {
        self.rows(
            "SELECT state, COUNT(*)::BIGINT FROM sandboxes GROUP BY state",
            &[],
            |row| Ok((row.try_get(0)?, row.try_get(1)?)),
        )
        .await
    }

    async fn add_telemetry(&self, batch: TelemetryBatch) -> StoreResult<()> {
        let mark = |n: usize| format!("${n}");
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let insert = transaction
            .prepare(&telemetry_sql::insert_metric_sql(mark))
            .await?;
        for s in &batch.samples {
            let cpus = i32::try_from(s.cpu_count).unwrap_or(i32::MAX);
            transaction
                .execute(
                    &insert,
                    &[
                        &s.sandbox_id,
                        &s.team_id,
                        &s.tier,
                        &s.at_ms,
                        &cpus,
                        &s.cpu_used_pct,
                        &s.mem_used,
                        &s.mem_total,
                        &s.mem_cache,
                        &s.disk_used,
                        &s.disk_total,
                        &s.net_rx_bytes,
                        &s.net_tx_bytes,
                    ],
                )
                .await?;
        }
        let insert = transaction
            .prepare(&telemetry_sql::insert_log_sql(mark))
            .await?;
        for line in &batch.logs {
            transaction
                .execute(
                    &insert,
                    &[
                        &line.sandbox_id,
                        &line.team_id,
                        &line.at_ms,
                        &line.level,
                        &line.message,
                        &line.fields,
                    ],
                )
                .await?;
        }
        let add = transaction
            .prepare(&telemetry_sql::add_usage_sql(mark))
            .await?;
        for usage in &batch.usage {
            transaction
                .execute(
                    &add,
                    &[&usage.team_id, &usage.day, &usage.sandbox_ms, &usage.mib_ms],
                )
                .await?;
        }
        let cap = transaction
            .prepare(&telemetry_sql::cap_logs_sql(mark))
            .await?;
        let mut capped: Vec<&str> = batch
            .logs
            .iter()
            .map(|line| line.sandbox_id.as_str())
            .collect();
        capped.sort_unstable();
        capped.dedup();
        for sandbox in capped {
            transaction
                .execute(&cap, &[&sandbox, &batch.log_cap_chars])
                .await?;
        }
        if let Some(cursor) = &batch.cursor {
            let after = i64::try_from(cursor.after).unwrap_or(i64::MAX);
            transaction
                .execute(
                    "INSERT INTO telemetry_cursors (host_id, epoch, after) VALUES ($1, $2, $3)
                     ON CONFLICT (host_id) DO UPDATE SET epoch = EXCLUDED.epoch, after = EXCLUDED.after",
                    &[&cursor.host_id, &cursor.epoch, &after],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn telemetry_cursor(&self, host_id: &str) -> StoreResult<Option<TelemetryCursor>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT epoch, after FROM telemetry_cursors WHERE host_id = $1",
                &[&host_id],
            )
            .await?;
        Ok(row.map(|row| TelemetryCursor {
            host_id: host_id.to_string(),
            epoch: row.get(0),
            after: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        }))
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
        let clause = "WHERE sandbox_id = $1 AND team_id = $2 AND tier = $3 AND at_ms >= $4
            AND at_ms < $5 ORDER BY at_ms LIMIT $6";
        let limit = limit.min(100_000) as i64;
        self.select(
            clause,
            &[&sandbox_id, &team_id, &tier, &from_ms, &until_ms, &limit],
        )
        .await
    }

    async fn latest_metric(
        &self,
        sandbox_id: &str,
        team_id: &str,
    ) -> StoreResult<Option<MetricRow>> {
        let clause = "WHERE sandbox_id = $1 AND team_id = $2 AND tier = 0
            ORDER BY at_ms DESC LIMIT 1";
        self.select(clause, &[&sandbox_id, &team_id])
            .await
            .map(first)
    }

    async fn rolled_up_until(&self, tier: i64) -> StoreResult<i64> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT COALESCE(MAX(done_until_ms), 0)::BIGINT FROM metrics_rollups WHERE tier = $1",
                &[&tier],
            )
            .await?;
        Ok(row.get(0))
    }

    async fn roll_up_metrics(
        &self,
        tier: i64,
        bucket_ms: i64,
        from_ms: i64,
        until_ms: i64,
    ) -> StoreResult<u64> {
        let mark = |n: usize| format!("${n}");
        let mut client = self.client().await?;
        let transaction = client.transaction().await?;
        let made = transaction
            .execute(
                &telemetry_sql::roll_up_sql(mark),
                &[&tier, &bucket_ms, &from_ms, &until_ms],
            )
            .await?;
        transaction
            .execute(&telemetry_sql::rolled_up_sql(mark), &[&tier, &until_ms])
            .await?;
        transaction.commit().await?;
        Ok(made)
    }

    async fn prune_metrics(&self, tier: i64, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            "DELETE FROM sandbox_metrics WHERE tier = $1 AND at_ms < $2",
            &[&tier, &before_ms],
        )
        .await
    }

    async fn sandbox_logs(&self, query: LogLinesQuery) -> StoreResult<Vec<SandboxLogRow>> {
        let (clause, values) = query.clause(|n| format!("${n}"));
        let values: Vec<Box<dyn ToSql + Sync + Send>> = values
            .into_iter()
            .map(|value| -> Box<dyn ToSql + Sync + Send> {
                match value {
                    QueryValue::Text(text) => Box::new(text),
                    QueryValue::Int(int) => Box::new(int),
                }
            })
            .collect();
        let parameters: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|value| value.as_ref() as &(dyn ToSql + Sync))
            .collect();
        self.select(&clause, &parameters).await
    }

    async fn prune_sandbox_logs(&self, before_ms: i64) -> StoreResult<u64> {
        self.execute(
            &telemetry_sql::prune_logs_sql(|n| format!("${n}")),
            &[&before_ms],
        )
        .await
    }

    async fn usage_of(
        &self,
        team_id: &str,
        first_day: &str,
        last_day: &str,
    ) -> StoreResult<Vec<UsageRow>> {
        let clause = "WHERE team_id = $1 AND day >= $2 AND day <= $3 ORDER BY day";
        self.select(clause, &[&team_id, &first_day, &last_day])
            .await
    }

    async fn list(&self, query: ListQuery) -> StoreResult<(Vec<SandboxRow>, usize)> {
        let mut values: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(query.team_id.clone())];
        let mut sql = SandboxRow::select("WHERE team_id = $1");
        if !query.states.is_empty() {
            values.push(Box::new(state_names(&query.states)));
            sql.push_str(&format!(" AND state = ANY(${})", values.len()));
        }
        if let Some(template) = &query.template_id {
            values.push(Box::new(template.clone()));
            let mark = values.len();
            sql.push_str(&format!(" AND (template_id = ${mark} OR alias = ${mark})"));
        }
        if let Some(after) = query.started_after_ms {
            values.push(Box::new(after));
            sql.push_str(&format!(" AND started_at_ms >= ${}", values.len()));
        }
        for (key, value) in &query.metadata {
            values.push(Box::new(key.clone()));
            let key_mark = values.len();
            values.push(Box::new(value.clone()));
            sql.push_str(&format!(
                " AND metadata ->> ${key_mark} = ${}",
                values.len()
            ));
        }
        let count_sql = format!("SELECT COUNT(*) FROM ({sql}) AS page WHERE state = 'running'");
        let parameters: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let running: i64 = self
            .client()
            .await?
            .query_one(&count_sql, &parameters)
            .await?
            .get(0);
        let order = if query.descending { "DESC" } else { "ASC" };
        if let Some((started, id)) = &query.after {
            values.push(Box::new(*started));
            let started_mark = values.len();
            values.push(Box::new(id.clone()));
            let comparison = if query.descending { "<" } else { ">" };
            sql.push_str(&format!(
                " AND (started_at_ms, id) {comparison} (${started_mark}, ${})",
                values.len()
            ));
        }
        sql.push_str(&format!(
            " ORDER BY started_at_ms {order}, id {order} LIMIT {}",
            query.limit
        ));
        let parameters: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let page = self.rows(&sql, &parameters, SandboxRow::read).await?;
        Ok((page, running as usize))
    }
}

/// The names of `states`, a `TEXT[]` parameter.
fn state_names(states: &[SandboxState]) -> Vec<String> {
    states.iter().map(|s| s.as_str().to_string()).collect()
}
