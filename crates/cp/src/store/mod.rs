//! The control plane's store: teams, API keys (hashed), host agents and sandboxes, as rows
//! ([`Team`], [`ApiKey`], [`HostRow`], [`SandboxRow`]) behind one trait ([`StoreBackend`]) with
//! two implementations: SQLite in a file of the data directory by default ([`sqlite`]), or
//! PostgreSQL when a `DATABASE_URL` names one ([`postgres`]). Both apply their migrations
//! (`migrations/{sqlite,postgres}/`) when opened, answer the same calls and read their rows
//! alike ([`rows`]). [`Store`] is the handle the control plane holds.

pub mod channels;
pub mod postgres;
pub mod rows;
pub mod sqlite;
pub mod telemetry;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use channels::{ChannelRow, DeliveryRow, DeliveryState};
use serde::{Deserialize, Serialize};
pub use telemetry::{
    LogLinesQuery, MetricRow, SandboxLogRow, TelemetryBatch, TelemetryCursor, UsageRow,
};
pub use wrenn_api::SandboxState;

/// What a store call gives: its answer, or why the store failed.
pub type StoreResult<T> = Result<T, StoreError>;

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub team_id: String,
    pub name: String,
    /// The key's first characters, to tell keys apart in lists.
    pub prefix: String,
    pub created_at_ms: i64,
    pub revoked: bool,
    /// What the key may do in its team (keys made before roles existed are owners).
    pub role: Role,
    /// The key's last four characters (empty for a key made before they were kept).
    pub mask_suffix: String,
}

/// A person who signs in (the dashboard, `/access-tokens`), with their password's hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    /// The argon2id hash (PHC string); never leaves the control plane.
    #[serde(skip_serializing)]
    pub password_hash: String,
    /// An operator sees and may act in every team.
    pub operator: bool,
    pub created_at_ms: i64,
}

/// A user's place in a team.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRow {
    pub team_id: String,
    pub user_id: String,
    pub role: Role,
    pub created_at_ms: i64,
}

/// A user's session (the dashboard's sign-in) or access token (E2B's `/access-tokens`), as
/// stored (never the token itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTokenRow {
    pub id: String,
    pub user_id: String,
    /// `session` or `access`.
    pub kind: String,
    pub name: String,
    pub prefix: String,
    pub mask_suffix: String,
    pub created_at_ms: i64,
    /// When it stops working (0: never).
    pub expires_at_ms: i64,
    pub revoked: bool,
}

/// An invitation to a team, taken once by following its link.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvitationRow {
    pub id: String,
    pub team_id: String,
    pub email: String,
    pub role: Role,
    /// Who made it (`key:<id>`, `user:<id>`).
    pub created_by: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub accepted: bool,
}

wrenn_core::named_enum! {
    /// A key's (or a member's) role in its team: an owner may do everything, an admin all but
    /// what changes the team itself, a member uses sandboxes and templates.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Role {
        Owner = "owner",
        Admin = "admin",
        #[default]
        Member = "member",
    }
}

impl Role {
    /// Whether this role may do what `needed` may (owner > admin > member).
    pub fn at_least(self, needed: Role) -> bool {
        let rank = |role: Role| match role {
            Role::Owner => 2,
            Role::Admin => 1,
            Role::Member => 0,
        };
        rank(self) >= rank(needed)
    }

    /// A stored name as a role; one this version does not know reads as the least.
    pub fn from_stored(name: &str) -> Role {
        Role::from_name(name).unwrap_or(Role::Member)
    }
}

/// One event: a lifecycle change (a sandbox created, paused, …; a host up or down; a template
/// built; a key made or revoked), recorded once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRow {
    /// Its place in the store's order: the cursor of listings and streams.
    pub seq: i64,
    pub id: String,
    pub at_ms: i64,
    /// The team it concerns; empty for the fleet's own (hosts), which operators alone see.
    pub team_id: String,
    /// Who caused it: `key:<id>`, `system` (a timeout, the fleet's watch), `host:<name>`.
    pub actor: String,
    /// What happened: `sandbox.created`, `host.down`, … (see `crate::events::EventKind`).
    pub kind: String,
    /// What it happened to: a sandbox's, host's, template's or key's id.
    pub subject: String,
    /// Details of the kind (a JSON object).
    pub data: serde_json::Value,
}

/// One authenticated API action that changed (or tried to change) state: append-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub seq: i64,
    pub id: String,
    pub at_ms: i64,
    pub team_id: String,
    /// `key:<id>`.
    pub actor: String,
    /// The method and route: `POST /sandboxes/{id}/pause`.
    pub action: String,
    /// The resource it named: the path's ids, or what it made (a new sandbox's id).
    pub resource: String,
    /// The answer's HTTP status.
    pub outcome: i64,
    /// The caller's address.
    pub client: String,
}

/// Which events (or audit rows) a listing reads: those after `after` (a `seq`), oldest first,
/// at most `limit`.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// One team's, or (None) every team's and the fleet's (operators).
    pub team_id: Option<String>,
    pub after: i64,
    pub limit: usize,
    /// Events: their kinds; audit rows: their actions' methods (`POST`, `DELETE`, …).
    pub kinds: Vec<String>,
    /// Events: their subject; audit rows: their resource.
    pub subject: Option<String>,
    /// Only rows of this actor.
    pub actor: Option<String>,
    /// Only rows at or after this time.
    pub since_ms: Option<i64>,
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
    /// Whether a pause on timeout keeps the memory (E2B's `autoPauseMemory`).
    pub auto_pause_memory: bool,
    /// Paused without its memory: its resume boots it from its disk.
    pub paused_disk_only: bool,
    /// Its egress rules and host mask.
    pub network: StoredNetwork,
}

/// A sandbox's network settings beyond `allow_internet`, as stored (JSON): its egress rules
/// and its host mask; for a snapshot's template, its sandbox's at the snapshot, internet
/// access included.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredNetwork {
    #[serde(flatten)]
    pub egress: wrenn_agent_api::network::EgressSettings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
    /// A snapshot's only (a sandbox's is its row's `allow_internet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_internet: Option<bool>,
}

/// A host agent of the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

wrenn_core::named_enum! {
    /// Whether a host answers: `up` while it heartbeats, `down` when it fell silent.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum HostState {
        #[default]
        Up = "up",
        Down = "down",
    }
}

impl HostState {
    /// A stored name as a state; anything but `up` is down (a host must prove it is up).
    pub fn from_stored(name: &str) -> HostState {
        HostState::from_name(name).unwrap_or(HostState::Down)
    }
}

/// A team's template: made by `POST /v3/templates`, runnable once a build of it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRow {
    pub id: String,
    pub team_id: String,
    /// Its name (E2B's alias), unique in the store.
    pub alias: Option<String>,
    /// Readable (and runnable) by every team.
    pub public: bool,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The build its sandboxes start from: its last ready one.
    pub ready_build_id: Option<String>,
    /// For a snapshot (E2B's snapshot template): the sandbox it was taken of.
    pub source_sandbox_id: Option<String>,
    /// For a snapshot: its sandbox's network settings then, which sandboxes made from it
    /// start with unless their create sets their own.
    pub network: StoredNetwork,
}

wrenn_core::named_enum! {
    /// Where a template build is, as E2B names it.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum BuildStatus {
        /// Made by `POST /v3/templates`, not started yet.
        #[default]
        Waiting = "waiting",
        Building = "building",
        Ready = "ready",
        Error = "error",
    }
}

/// One build of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRow {
    /// A UUID (the SDKs parse it as one).
    pub id: String,
    pub template_id: String,
    pub status: BuildStatus,
    /// Why it failed.
    pub reason: Option<String>,
    /// The step it failed at: 1-based, `base` or `finalize`.
    pub reason_step: Option<String>,
    /// The host template it starts from (as the hosts name it).
    pub from_template: String,
    /// The host it runs (ran) on.
    pub host_id: Option<String>,
    /// The template it makes, as the hosts name it.
    pub host_template_id: String,
    pub cpu_count: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub envd_version: String,
    pub created_at_ms: i64,
    /// 0 until it ends.
    pub finished_at_ms: i64,
    /// The tags it takes once it is ready.
    pub tags: Vec<String>,
}

/// A tag of a template: the build it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRow {
    pub template_id: String,
    pub tag: String,
    pub build_id: String,
    pub created_at_ms: i64,
}

/// One line of a build's log; `seq` counts from 0 in each build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogRow {
    pub seq: i64,
    pub timestamp_ms: i64,
    /// debug, info, warn or error.
    pub level: String,
    pub message: String,
    pub step: Option<String>,
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

/// A value of a [`LogQuery`]'s clause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogValue {
    Text(String),
    Int(i64),
}

/// A log table's columns a [`LogQuery`] filters: the events' or the audit log's.
#[derive(Debug, Clone, Copy)]
pub struct LogTable {
    /// The column `kinds` match.
    pub kind: &'static str,
    /// Whether a kind is a method its column starts with (the audit log's `POST /…`), or the
    /// whole value (an event's type).
    pub kind_is_method: bool,
    /// The column `subject` matches.
    pub subject: &'static str,
}

/// The events' columns.
pub const EVENT_LOG: LogTable = LogTable {
    kind: "kind",
    kind_is_method: false,
    subject: "subject",
};

/// The audit log's columns.
pub const AUDIT_LOG: LogTable = LogTable {
    kind: "action",
    kind_is_method: true,
    subject: "resource",
};

impl LogQuery {
    /// Its `WHERE … ORDER BY seq LIMIT …` clause over `table`, each value's placeholder made by
    /// `placeholder` (1-based), and the values in their order.
    pub fn clause(
        &self,
        table: LogTable,
        placeholder: fn(usize) -> String,
    ) -> (String, Vec<LogValue>) {
        let LogTable {
            kind,
            kind_is_method,
            subject,
        } = table;
        let mut conditions = Vec::new();
        let mut values = Vec::new();
        let bind = |values: &mut Vec<LogValue>, value: LogValue| {
            values.push(value);
            placeholder(values.len())
        };
        conditions.push(format!(
            "seq > {}",
            bind(&mut values, LogValue::Int(self.after))
        ));
        if let Some(team) = &self.team_id {
            conditions.push(format!(
                "team_id = {}",
                bind(&mut values, LogValue::Text(team.clone()))
            ));
        }
        if !self.kinds.is_empty() {
            let alternatives: Vec<String> = self
                .kinds
                .iter()
                .map(|name| {
                    if kind_is_method {
                        let pattern = format!("{name} %");
                        format!("{kind} LIKE {}", bind(&mut values, LogValue::Text(pattern)))
                    } else {
                        format!(
                            "{kind} = {}",
                            bind(&mut values, LogValue::Text(name.clone()))
                        )
                    }
                })
                .collect();
            conditions.push(format!("({})", alternatives.join(" OR ")));
        }
        if let Some(value) = &self.subject {
            conditions.push(format!(
                "{subject} = {}",
                bind(&mut values, LogValue::Text(value.clone()))
            ));
        }
        if let Some(actor) = &self.actor {
            conditions.push(format!(
                "actor = {}",
                bind(&mut values, LogValue::Text(actor.clone()))
            ));
        }
        if let Some(since) = self.since_ms {
            conditions.push(format!(
                "at_ms >= {}",
                bind(&mut values, LogValue::Int(since))
            ));
        }
        let limit = bind(&mut values, LogValue::Int(self.limit.min(10_000) as i64));
        (
            format!(
                "WHERE {} ORDER BY seq LIMIT {limit}",
                conditions.join(" AND ")
            ),
            values,
        )
    }
}

/// A change of state for the sandboxes whose `column` is `value` and whose state is one of
/// `from`: theirs becomes `to`.
#[derive(Debug, Clone, Copy)]
pub struct StateChange<'a> {
    /// `id` (one sandbox) or `host_id` (a host's sandboxes).
    pub column: &'static str,
    pub value: &'a str,
    pub from: &'a [SandboxState],
    pub to: SandboxState,
}

/// What a store answers. Every call is one transaction; a failure is a [`StoreError`].
#[async_trait::async_trait]
pub trait StoreBackend: Send + Sync + std::fmt::Debug {
    async fn create_team(&self, team: Team) -> StoreResult<()>;
    /// The team whose `column` (`id` or `name`, both unique) is `value`.
    async fn team_where(&self, column: &'static str, value: &str) -> StoreResult<Option<Team>>;

    async fn team_by_name(&self, name: &str) -> StoreResult<Option<Team>> {
        self.team_where("name", name).await
    }

    async fn team_by_id(&self, id: &str) -> StoreResult<Option<Team>> {
        self.team_where("id", id).await
    }

    async fn add_key(&self, key: ApiKey, hash: String) -> StoreResult<()>;
    /// The unrevoked key with this hash.
    async fn key_by_hash(&self, hash: &str) -> StoreResult<Option<ApiKey>>;

    /// The team of the unrevoked key with this hash.
    async fn team_of_key(&self, hash: &str) -> StoreResult<Option<String>> {
        Ok(self.key_by_hash(hash).await?.map(|key| key.team_id))
    }

    /// A key by its id, revoked or not.
    async fn key(&self, key_id: &str) -> StoreResult<Option<ApiKey>>;
    async fn list_keys(&self, team_id: &str) -> StoreResult<Vec<ApiKey>>;
    async fn revoke_key(&self, key_id: &str, now_ms: i64) -> StoreResult<bool>;
    /// Renames an unrevoked key: whether there was one.
    async fn rename_key(&self, key_id: &str, name: &str) -> StoreResult<bool>;
    /// Every team, oldest first.
    async fn teams(&self) -> StoreResult<Vec<Team>>;

    async fn create_user(&self, user: UserRow) -> StoreResult<()>;
    /// The user whose `column` (`id` or `email`, both unique) is `value`.
    async fn user_where(&self, column: &'static str, value: &str) -> StoreResult<Option<UserRow>>;
    /// Every user, oldest first.
    async fn users(&self) -> StoreResult<Vec<UserRow>>;
    /// Adds a member, or changes a member's role.
    async fn put_member(&self, member: MemberRow) -> StoreResult<()>;
    /// Removes a member: whether they were one.
    async fn delete_member(&self, team_id: &str, user_id: &str) -> StoreResult<bool>;
    /// The members whose `column` (`team_id` or `user_id`) is `value`, oldest first.
    async fn members_where(&self, column: &'static str, value: &str)
    -> StoreResult<Vec<MemberRow>>;
    async fn add_user_token(&self, token: UserTokenRow, hash: String) -> StoreResult<()>;
    /// The unrevoked token with this hash (expired or not).
    async fn user_token_by_hash(&self, hash: &str) -> StoreResult<Option<UserTokenRow>>;
    /// A user's unrevoked tokens of `kind`, oldest first.
    async fn user_tokens(&self, user_id: &str, kind: &str) -> StoreResult<Vec<UserTokenRow>>;
    /// Revokes a user's token: whether there was such an unrevoked one.
    async fn revoke_user_token(
        &self,
        user_id: &str,
        token_id: &str,
        now_ms: i64,
    ) -> StoreResult<bool>;
    async fn add_invitation(&self, invitation: InvitationRow, hash: String) -> StoreResult<()>;
    /// The invitation with this hash, taken or not.
    async fn invitation_by_hash(&self, hash: &str) -> StoreResult<Option<InvitationRow>>;
    /// Takes the invitation with this hash if it is neither taken nor expired: it, taken.
    async fn take_invitation(&self, hash: &str, now_ms: i64) -> StoreResult<Option<InvitationRow>>;
    /// Deletes a team with its keys, members, invitations and channels (its sandboxes and templates
    /// must be gone): whether it was there.
    async fn delete_team(&self, team_id: &str) -> StoreResult<bool>;

    /// Records an event (its `seq` is the store's to give): the `seq` it got.
    async fn add_event(&self, event: EventRow) -> StoreResult<i64>;
    /// Events after a cursor (`kinds` and `subject` filter them).
    async fn events(&self, query: LogQuery) -> StoreResult<Vec<EventRow>>;
    /// The last event's `seq` (0 when there is none): where a live stream starts.
    async fn last_event_seq(&self) -> StoreResult<i64>;
    /// Appends a row to the audit log.
    async fn add_audit(&self, row: AuditRow) -> StoreResult<()>;
    /// Audit rows after a cursor (`kinds` filter their methods, `subject` their resource).
    async fn audit(&self, query: LogQuery) -> StoreResult<Vec<AuditRow>>;
    async fn put_sandbox(&self, sandbox: SandboxRow) -> StoreResult<()>;
    async fn sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>>;
    async fn delete_sandbox(&self, id: &str) -> StoreResult<bool>;
    async fn set_state(&self, id: &str, state: SandboxState, end_at_ms: i64) -> StoreResult<()>;
    async fn expired(&self, now_ms: i64) -> StoreResult<Vec<SandboxRow>>;
    async fn all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>>;
    async fn list(&self, query: ListQuery) -> StoreResult<(Vec<SandboxRow>, usize)>;
    /// Gives the sandboxes `change` selects its new state: how many changed.
    async fn change_states(&self, change: StateChange<'_>) -> StoreResult<u64>;

    /// Sets a sandbox's state if it is still `from`: whether it was.
    async fn set_state_if(
        &self,
        id: &str,
        from: SandboxState,
        to: SandboxState,
    ) -> StoreResult<bool> {
        let change = StateChange {
            column: "id",
            value: id,
            from: &[from],
            to,
        };
        Ok(self.change_states(change).await? == 1)
    }

    async fn sandboxes_on_host(&self, host_id: &str) -> StoreResult<Vec<SandboxRow>>;

    /// Marks a host's running and paused sandboxes lost: how many there were.
    async fn mark_host_lost(&self, host_id: &str) -> StoreResult<u64> {
        let change = StateChange {
            column: "host_id",
            value: host_id,
            from: &[SandboxState::Running, SandboxState::Paused],
            to: SandboxState::Lost,
        };
        self.change_states(change).await
    }

    /// Takes or renews lease `name` for `holder`, to expire `ttl_ms` from now by the store's
    /// clock (PostgreSQL's own, shared by every replica): the lease's fencing token, the same
    /// for a renewal and raised whenever the lease is taken anew (another holder, or the same
    /// one after it lapsed), or `None` while another holder's lease has not expired. Holders
    /// name one run of one process (a restarted replica is a new holder).
    async fn take_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> StoreResult<Option<i64>>;
    /// Gives lease `name` up if `holder` has it (another may take it at once): whether it had.
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<bool>;
    /// Removes lease `name` if `holder` has it (a short-lived lease, such as a sandbox's turn,
    /// whose token nobody needs afterwards): whether it had.
    async fn drop_lease(&self, name: &str, holder: &str) -> StoreResult<bool>;

    /// Whether lease `name` is held now (taken and not expired).
    async fn lease_held(&self, name: &str) -> StoreResult<bool>;

    /// Whether other processes may share this store (PostgreSQL), so that control plane
    /// replicas can run on it; SQLite is one process's.
    fn shared(&self) -> bool;

    /// Claims Idempotency-Key `key` of `team_id` for `claimant` (one create call): what the
    /// key is now ([`IdempotencyClaim`]). A claim still unsettled `stale_ms` after it was made
    /// (its replica died in the create) is taken over.
    async fn claim_idempotency(
        &self,
        team_id: &str,
        key: &str,
        claimant: &str,
        now_ms: i64,
        stale_ms: i64,
    ) -> StoreResult<IdempotencyClaim>;
    /// Settles `claimant`'s claim of a key with the sandbox its create made.
    async fn settle_idempotency(
        &self,
        team_id: &str,
        key: &str,
        claimant: &str,
        sandbox_id: &str,
    ) -> StoreResult<()>;
    /// Gives up `claimant`'s unsettled claim of a key (its create failed: a retry creates).
    async fn drop_idempotency(&self, team_id: &str, key: &str, claimant: &str) -> StoreResult<()>;
    /// Forgets a key settled with `sandbox_id` (the sandbox is gone: the key creates anew).
    async fn forget_idempotency(
        &self,
        team_id: &str,
        key: &str,
        sandbox_id: &str,
    ) -> StoreResult<()>;
    /// Forgets keys claimed before `before_ms`: how many.
    async fn prune_idempotency(&self, before_ms: i64) -> StoreResult<u64>;

    /// Takes a host's heartbeat, if `heartbeat_hash` is still the host's: it is up, with
    /// `report`, heard from at `at_ms`. The state it was in before (`None`: no such host, or
    /// another heartbeat token), read and changed at once, so that of a heartbeat and a
    /// replica marking the host down, either the heartbeat comes after and sees it down, or
    /// the marking sees the heartbeat and does not happen.
    async fn host_heartbeat(
        &self,
        host_id: &str,
        heartbeat_hash: &str,
        report: &wrenn_agent_api::join::HostReport,
        at_ms: i64,
    ) -> StoreResult<Option<HostState>>;
    /// Marks a host down, and its running and paused sandboxes lost, at once, if it is up and
    /// was last heard from at `last_heartbeat_ms` (no heartbeat came since it was found
    /// silent): how many sandboxes were lost, or `None` when it was not marked down.
    async fn mark_host_down_if_silent(
        &self,
        host_id: &str,
        last_heartbeat_ms: i64,
    ) -> StoreResult<Option<u64>>;

    async fn put_host(&self, host: HostRow) -> StoreResult<()>;
    async fn forget_host(&self, host_id: &str) -> StoreResult<u64>;
    async fn hosts(&self) -> StoreResult<Vec<HostRow>>;

    /// Stores a template, or changes one stored already (all but its id, team and birth).
    async fn put_template(&self, template: TemplateRow) -> StoreResult<()>;
    async fn template(&self, id: &str) -> StoreResult<Option<TemplateRow>>;
    async fn template_by_alias(&self, alias: &str) -> StoreResult<Option<TemplateRow>>;
    /// A team's templates and the public ones, oldest first.
    async fn templates_for(&self, team_id: &str) -> StoreResult<Vec<TemplateRow>>;
    /// Deletes a template with its builds and their logs: whether it was there.
    async fn delete_template(&self, id: &str) -> StoreResult<bool>;
    /// Stores a build, or changes one stored already (its outcome and where it ran).
    async fn put_build(&self, build: BuildRow) -> StoreResult<()>;
    async fn build(&self, id: &str) -> StoreResult<Option<BuildRow>>;
    /// A template's builds, oldest first.
    async fn builds_of(&self, template_id: &str) -> StoreResult<Vec<BuildRow>>;
    /// Every build in `status`, oldest first.
    async fn builds_in(&self, status: BuildStatus) -> StoreResult<Vec<BuildRow>>;
    /// Appends lines to a build's log (their `seq` numbers follow the last one's).
    async fn add_build_logs(&self, build_id: &str, lines: Vec<BuildLogRow>) -> StoreResult<()>;
    /// Points `tag` of a template at a build (moving it if it named another).
    async fn put_tag(&self, tag: TagRow) -> StoreResult<()>;
    /// Removes tags of a template: how many there were.
    async fn delete_tags(&self, template_id: &str, tags: Vec<String>) -> StoreResult<u64>;
    /// A template's tags, by name.
    async fn tags_of(&self, template_id: &str) -> StoreResult<Vec<TagRow>>;
    /// At most `limit` lines of a build's log from the `offset`th on.
    async fn build_logs(
        &self,
        build_id: &str,
        offset: i64,
        limit: i64,
    ) -> StoreResult<Vec<BuildLogRow>>;

    // Notification channels and their outbox (`crate::channels`). The outbox's rows are made
    // by `add_event` itself, in the event's transaction (migration 0010's trigger).
    async fn add_channel(&self, channel: ChannelRow) -> StoreResult<()>;
    async fn channel(&self, id: &str) -> StoreResult<Option<ChannelRow>>;
    /// A team's channels, oldest first.
    async fn channels_of(&self, team_id: &str) -> StoreResult<Vec<ChannelRow>>;
    /// Changes a channel's name, URL, filter, state and failure count: whether it was there.
    async fn update_channel(&self, channel: ChannelRow) -> StoreResult<bool>;
    /// Deletes a channel with its deliveries: whether it was there.
    async fn delete_channel(&self, id: &str) -> StoreResult<bool>;
    /// Counts a channel's delivery: one delivered resets its failures, one given up adds one,
    /// and the `disable_after`th in a row disables the channel with `reason`.
    async fn count_delivery(
        &self,
        channel_id: &str,
        delivered: bool,
        disable_after: i64,
        reason: &str,
    ) -> StoreResult<()>;
    /// Every enabled channel's oldest pending delivery: the next each is to get.
    async fn pending_heads(&self) -> StoreResult<Vec<DeliveryRow>>;
    /// Records a delivery's attempt (its state, attempts, next attempt and last answer).
    async fn update_delivery(&self, delivery: DeliveryRow) -> StoreResult<()>;
    /// A channel's deliveries, newest first.
    async fn deliveries_of(&self, channel_id: &str, limit: usize) -> StoreResult<Vec<DeliveryRow>>;
    /// Forgets delivered and given-up deliveries last changed before `before_ms` (the delivery
    /// log's retention; pending ones stay): how many.
    async fn prune_deliveries(&self, before_ms: i64) -> StoreResult<u64>;

    /// How many sandboxes of every team are in each state (by the state's stored name).
    async fn sandbox_counts(&self) -> StoreResult<Vec<(String, i64)>>;

    // What hosts saw of their sandboxes (`crate::telemetry`, migration 0012).
    /// Adds a collection's samples, log lines and use in one transaction, then trims the log
    /// of each sandbox that got lines to its cap.
    async fn add_telemetry(&self, batch: TelemetryBatch) -> StoreResult<()>;
    /// Where the collection of `host_id`'s telemetry stands, as the last batch with a cursor
    /// left it.
    async fn telemetry_cursor(&self, host_id: &str) -> StoreResult<Option<TelemetryCursor>>;
    /// A sandbox's samples of one tier from `from_ms` up to (not including) `until_ms`, of
    /// team `team_id` only, oldest first, at most `limit`.
    async fn metrics_between(
        &self,
        sandbox_id: &str,
        team_id: &str,
        tier: i64,
        from_ms: i64,
        until_ms: i64,
        limit: usize,
    ) -> StoreResult<Vec<MetricRow>>;
    /// A sandbox's newest sample as taken (tier 0), of team `team_id` only.
    async fn latest_metric(
        &self,
        sandbox_id: &str,
        team_id: &str,
    ) -> StoreResult<Option<MetricRow>>;
    /// Where tier `tier` has been made up to (0: nothing yet).
    async fn rolled_up_until(&self, tier: i64) -> StoreResult<i64>;
    /// Makes tier `tier` (buckets of `bucket_ms`) from the samples of the tier below from
    /// `from_ms` to `until_ms`, and records that it is made up to `until_ms`: how many rows.
    async fn roll_up_metrics(
        &self,
        tier: i64,
        bucket_ms: i64,
        from_ms: i64,
        until_ms: i64,
    ) -> StoreResult<u64>;
    /// Forgets the samples of tier `tier` taken before `before_ms`: how many.
    async fn prune_metrics(&self, tier: i64, before_ms: i64) -> StoreResult<u64>;
    /// The log lines a query selects.
    async fn sandbox_logs(&self, query: LogLinesQuery) -> StoreResult<Vec<SandboxLogRow>>;
    /// Forgets the logs of sandboxes gone that logged nothing since `before_ms`: how many lines.
    async fn prune_sandbox_logs(&self, before_ms: i64) -> StoreResult<u64>;
    /// A team's use on the days from `first_day` to `last_day` (`YYYY-MM-DD`, both included),
    /// by day.
    async fn usage_of(
        &self,
        team_id: &str,
        first_day: &str,
        last_day: &str,
    ) -> StoreResult<Vec<UsageRow>>;
}

/// What an Idempotency-Key is when a create claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// The caller's now: it creates, then settles or drops the claim.
    Claimed,
    /// An earlier create made this sandbox.
    Made(String),
    /// An earlier create has it and has not finished: ask again shortly.
    Pending,
}

/// The store the control plane uses: SQLite or PostgreSQL, behind [`StoreBackend`], with the
/// bus its events are published on (`crate::events`).
#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
    bus: tokio::sync::broadcast::Sender<EventRow>,
}

impl std::ops::Deref for Store {
    type Target = dyn StoreBackend;

    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl Store {
    fn over(backend: Arc<dyn StoreBackend>) -> Self {
        let (bus, _) = tokio::sync::broadcast::channel(crate::events::BUS_CAPACITY);
        Store { backend, bus }
    }

    /// The bus every event this process records is published on.
    pub fn bus(&self) -> &tokio::sync::broadcast::Sender<EventRow> {
        &self.bus
    }

    /// SQLite in a file (created if missing).
    pub fn open(path: &Path) -> StoreResult<Self> {
        Ok(Store::over(Arc::new(sqlite::SqliteStore::open(path)?)))
    }

    /// SQLite at `path`, or PostgreSQL when `database_url` is a `postgres://` URL.
    pub async fn open_configured(path: &Path, database_url: Option<&str>) -> StoreResult<Self> {
        match database_url
            .filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            Some(url) => Ok(Store::over(Arc::new(
                postgres::PgStore::connect(url).await?,
            ))),
            // Opening may wait for another opener's turn and migrates: not on a runtime thread.
            None => {
                let path = path.to_owned();
                tokio::task::spawn_blocking(move || Self::open(&path))
                    .await
                    .map_err(|error| StoreError::Unavailable(error.to_string()))?
            }
        }
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
            sqlite::MIGRATIONS.len(),
            "a migration file is not in MIGRATIONS"
        );
        assert_eq!(sqlite.len(), postgres::MIGRATIONS.len());
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

    /// The ids of a listing's page.
    fn ids(listed: StoreResult<(Vec<SandboxRow>, usize)>) -> Vec<String> {
        let (page, _) = listed.unwrap();
        page.into_iter().map(|row| row.id).collect()
    }

    /// Every backend to test: SQLite always; PostgreSQL when `WRENN_TEST_DATABASE_URL` names
    /// one (scripts/test.sh starts it), each test in a fresh schema of its own. Without it the
    /// PostgreSQL half is skipped with a message, or fails where `WRENN_REQUIRE_PREREQUISITES=1`.
    /// Each store starts with [`fill`]'s rows.
    pub(super) async fn backends() -> Vec<(&'static str, Store, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let mut backends = vec![("sqlite", sqlite, Some(dir))];
        match postgres_store().await {
            Some((store, _)) => backends.push(("postgres", store, None)),
            None => wrenn_testkit::missing_prerequisite(
                "the store tests on PostgreSQL",
                "WRENN_TEST_DATABASE_URL is not set (scripts/postgres.sh starts the server)",
            ),
        }
        for (_, store, _) in &backends {
            fill(store).await;
        }
        backends
    }

    /// A PostgreSQL store in a fresh schema of its own, and its URL, when
    /// `WRENN_TEST_DATABASE_URL` names a server.
    async fn postgres_store() -> Option<(Store, String)> {
        let url = std::env::var("WRENN_TEST_DATABASE_URL").ok()?;
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
        let store = Store::open_configured(Path::new("/nonexistent"), Some(&scoped))
            .await
            .unwrap();
        Some((store, scoped))
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
            assert_eq!(ids(store.list(next).await), ["s2", "s3"], "{backend}");

            let even = ListQuery {
                metadata: [("group".to_string(), "even".to_string())].into(),
                states: vec![SandboxState::Running],
                descending: true,
                limit: 10,
                ..query.clone()
            };
            assert_eq!(
                ids(store.list(even).await),
                ["s2", "s0"],
                "{backend}: team b's row never shows"
            );
            let paused = ListQuery {
                states: vec![SandboxState::Paused],
                limit: 10,
                ..query
            };
            assert_eq!(ids(store.list(paused).await), ["s4"], "{backend}");
        }
    }

    #[tokio::test]
    async fn keys_resolve_to_teams_until_revoked_and_rows_change_in_place() {
        for (backend, store, _dir) in backends().await {
            let key = ApiKey {
                id: "k1".into(),
                team_id: "a".into(),
                name: "n".into(),
                prefix: "e2b_12".into(),
                created_at_ms: 1,
                revoked: false,
                role: Role::Admin,
                mask_suffix: "wxyz".into(),
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
    async fn events_and_audit_rows_are_kept_in_order_filtered_and_audit_rows_never_change() {
        for (backend, store, _dir) in backends().await {
            for (i, (team, kind, subject)) in [
                ("a", "sandbox.created", "s1"),
                ("b", "sandbox.created", "s2"),
                ("", "host.down", "h1"),
                ("a", "sandbox.killed", "s1"),
            ]
            .into_iter()
            .enumerate()
            {
                let seq = store
                    .add_event(EventRow {
                        id: format!("e{i}"),
                        at_ms: 100 + i as i64,
                        team_id: team.into(),
                        actor: "key:k1".into(),
                        kind: kind.into(),
                        subject: subject.into(),
                        data: serde_json::json!({ "i": i }),
                        ..EventRow::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(seq, i as i64 + 1, "{backend}");
            }
            let ids = |rows: Vec<EventRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
            let team_a = LogQuery {
                team_id: Some("a".into()),
                limit: 10,
                ..LogQuery::default()
            };
            assert_eq!(
                ids(store.events(team_a.clone()).await.unwrap()),
                ["e0", "e3"],
                "{backend}"
            );
            let page = LogQuery {
                team_id: None,
                after: 1,
                limit: 2,
                ..LogQuery::default()
            };
            assert_eq!(
                ids(store.events(page).await.unwrap()),
                ["e1", "e2"],
                "{backend}"
            );
            let killed = LogQuery {
                kinds: vec!["sandbox.killed".into(), "host.down".into()],
                since_ms: Some(103),
                ..team_a.clone()
            };
            let rows = store.events(killed).await.unwrap();
            assert_eq!(rows[0].data, serde_json::json!({ "i": 3 }), "{backend}");
            assert_eq!(ids(rows), ["e3"], "{backend}");
            assert_eq!(store.last_event_seq().await.unwrap(), 4, "{backend}");

            for (i, action) in ["POST /sandboxes", "DELETE /sandboxes/{id}"]
                .iter()
                .enumerate()
            {
                store
                    .add_audit(AuditRow {
                        id: format!("a{i}"),
                        at_ms: 10,
                        team_id: "a".into(),
                        actor: "key:k1".into(),
                        action: action.to_string(),
                        resource: format!("/sandboxes/s{i}"),
                        outcome: 201,
                        client: "127.0.0.1".into(),
                        ..AuditRow::default()
                    })
                    .await
                    .unwrap();
            }
            let deletes = LogQuery {
                kinds: vec!["DELETE".into()],
                ..team_a.clone()
            };
            let rows = store.audit(deletes).await.unwrap();
            assert_eq!(rows.len(), 1, "{backend}");
            assert_eq!(rows[0].resource, "/sandboxes/s1");
            assert_eq!(
                store
                    .audit(LogQuery {
                        team_id: Some("b".into()),
                        ..team_a.clone()
                    })
                    .await
                    .unwrap(),
                vec![]
            );
            // Append-only: the store itself refuses to change or remove a row (PostgreSQL's
            // trigger: `audit_rows_never_change_on_postgres`).
            if let Some(dir) = &_dir {
                let db = rusqlite::Connection::open(dir.path().join("db.sqlite")).unwrap();
                for statement in [
                    "UPDATE audit_log SET outcome = 200",
                    "DELETE FROM audit_log",
                ] {
                    let error = db.execute(statement, []).unwrap_err();
                    assert!(error.to_string().contains("append-only"), "{error}");
                }
            }
            assert_eq!(store.audit(team_a).await.unwrap().len(), 2, "{backend}");
        }
    }

    #[tokio::test]
    async fn audit_rows_never_change_on_postgres() {
        let Some((store, url)) = postgres_store().await else {
            return wrenn_testkit::missing_prerequisite(
                "the audit log's PostgreSQL trigger",
                "WRENN_TEST_DATABASE_URL is not set (scripts/postgres.sh starts the server)",
            );
        };
        store
            .add_audit(AuditRow {
                id: "a1".into(),
                action: "POST /sandboxes".into(),
                ..AuditRow::default()
            })
            .await
            .unwrap();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        for statement in [
            "UPDATE audit_log SET outcome = 200",
            "DELETE FROM audit_log",
        ] {
            let error = client.batch_execute(statement).await.unwrap_err();
            let message = format!("{error:?}");
            assert!(message.contains("append-only"), "{statement}: {message}");
        }
        assert_eq!(
            store
                .audit(LogQuery {
                    limit: 10,
                    ..LogQuery::default()
                })
                .await
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_heartbeat_and_a_silent_hosts_marking_down_are_one_after_the_other() {
        for (backend, store, _dir) in backends().await {
            let host = HostRow {
                id: "h9".into(),
                name: "beat".into(),
                heartbeat_hash: "sha256:token".into(),
                state: HostState::Up,
                last_heartbeat_ms: 10,
                ..HostRow::default()
            };
            store.put_host(host).await.unwrap();
            let report = wrenn_agent_api::join::HostReport {
                slots_total: 7,
                ..Default::default()
            };
            // Another token, or no such host: nothing changes.
            for (id, hash) in [("h9", "sha256:other"), ("nope", "sha256:token")] {
                let beat = store.host_heartbeat(id, hash, &report, 20).await.unwrap();
                assert_eq!(beat, None, "{backend}: {id} {hash}");
            }
            // Found silent at 10, but a heartbeat came at 20 (at another replica): not down.
            let beat = store.host_heartbeat("h9", "sha256:token", &report, 20);
            assert_eq!(beat.await.unwrap(), Some(HostState::Up), "{backend}");
            assert_eq!(
                store.mark_host_down_if_silent("h9", 10).await.unwrap(),
                None
            );
            // Silent since 20: down, once, its sandboxes lost with it; the next heartbeat finds
            // it down and brings it up.
            let team = Team {
                id: "t9".into(),
                name: "team t9".into(),
                created_at_ms: 0,
                admin: false,
            };
            store.create_team(team).await.unwrap();
            let mut sandbox = row("on-h9", "t9", 1, "running", &[]);
            sandbox.host_id = "h9".into();
            store.put_sandbox(sandbox).await.unwrap();
            let down = store.mark_host_down_if_silent("h9", 20).await.unwrap();
            assert_eq!(down, Some(1), "{backend}");
            assert_eq!(
                store.mark_host_down_if_silent("h9", 20).await.unwrap(),
                None
            );
            let lost = store.sandbox("on-h9").await.unwrap().unwrap();
            assert_eq!(lost.state, SandboxState::Lost, "{backend}");
            let beat = store.host_heartbeat("h9", "sha256:token", &report, 30);
            assert_eq!(beat.await.unwrap(), Some(HostState::Down), "{backend}");
            let stored = store.hosts().await.unwrap();
            let stored = stored.iter().find(|h| h.id == "h9").unwrap();
            assert_eq!(stored.state, HostState::Up, "{backend}");
            assert_eq!(stored.last_heartbeat_ms, 30, "{backend}");
            assert_eq!(stored.report.slots_total, 7, "{backend}");
        }
    }

    #[tokio::test]
    async fn an_idempotency_key_is_claimed_once_settled_or_given_up_and_taken_over_when_stale() {
        for (backend, store, _dir) in backends().await {
            let claim = |claimant: &'static str, now: i64| {
                let store = store.clone();
                async move {
                    store
                        .claim_idempotency("team", "key", claimant, now, 1000)
                        .await
                        .unwrap()
                }
            };
            assert_eq!(claim("a", 0).await, IdempotencyClaim::Claimed, "{backend}");
            assert_eq!(claim("b", 10).await, IdempotencyClaim::Pending, "{backend}");
            // Another team's key of the same name is its own.
            let other = store.claim_idempotency("other", "key", "c", 10, 1000);
            assert_eq!(other.await.unwrap(), IdempotencyClaim::Claimed);
            // Settled only by its claimant.
            store
                .settle_idempotency("team", "key", "b", "sbx-b")
                .await
                .unwrap();
            assert_eq!(claim("b", 20).await, IdempotencyClaim::Pending, "{backend}");
            store
                .settle_idempotency("team", "key", "a", "sbx-a")
                .await
                .unwrap();
            let made = IdempotencyClaim::Made("sbx-a".into());
            assert_eq!(
                claim("b", 5000).await,
                made,
                "{backend}: never stale once settled"
            );
            // The sandbox is gone: forgotten, the key creates anew.
            store
                .forget_idempotency("team", "key", "sbx-a")
                .await
                .unwrap();
            assert_eq!(
                claim("d", 6000).await,
                IdempotencyClaim::Claimed,
                "{backend}"
            );
            // A failed create gives its claim up; a dead one's is taken over once stale.
            store.drop_idempotency("team", "key", "d").await.unwrap();
            assert_eq!(
                claim("e", 6001).await,
                IdempotencyClaim::Claimed,
                "{backend}"
            );
            assert_eq!(
                claim("f", 6500).await,
                IdempotencyClaim::Pending,
                "{backend}"
            );
            assert_eq!(
                claim("f", 7002).await,
                IdempotencyClaim::Claimed,
                "{backend}"
            );
            // Old keys go.
            assert_eq!(store.prune_idempotency(7000).await.unwrap(), 1, "{backend}");
            assert_eq!(store.prune_idempotency(8000).await.unwrap(), 1, "{backend}");
        }
    }

    #[tokio::test]
    async fn a_turn_lease_is_seen_held_and_dropped_and_a_telemetry_cursor_is_kept_with_its_rows() {
        for (backend, store, _dir) in backends().await {
            assert!(!store.lease_held("turn:x").await.unwrap(), "{backend}");
            store.take_lease("turn:x", "a/1", 60_000).await.unwrap();
            assert!(store.lease_held("turn:x").await.unwrap(), "{backend}");
            assert!(
                !store.drop_lease("turn:x", "b/1").await.unwrap(),
                "{backend}"
            );
            assert!(
                store.drop_lease("turn:x", "a/1").await.unwrap(),
                "{backend}"
            );
            assert!(!store.lease_held("turn:x").await.unwrap(), "{backend}");

            assert_eq!(store.telemetry_cursor("h1").await.unwrap(), None);
            for after in [5, 9] {
                let cursor = TelemetryCursor {
                    host_id: "h1".into(),
                    epoch: "e1".into(),
                    after,
                };
                let batch = TelemetryBatch {
                    cursor: Some(cursor.clone()),
                    ..TelemetryBatch::default()
                };
                store.add_telemetry(batch).await.unwrap();
                let kept = store.telemetry_cursor("h1").await.unwrap();
                assert_eq!(kept, Some(cursor), "{backend}");
            }
        }
    }

    #[tokio::test]
    async fn hosts_are_kept_and_a_down_hosts_sandboxes_are_lost() {
        for (backend, store, _dir) in backends().await {
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

    #[tokio::test]
    async fn a_lease_has_one_holder_until_it_expires_and_a_new_holder_raises_its_token() {
        for (backend, store, _dir) in backends().await {
            let minute = 60_000;
            let first = store.take_lease("lifecycle", "a", minute).await.unwrap();
            let token = first.unwrap_or_else(|| panic!("{backend}: a free lease is taken"));
            assert_eq!(
                store.take_lease("lifecycle", "b", minute).await.unwrap(),
                None,
                "{backend}: held"
            );
            assert_eq!(
                store.take_lease("lifecycle", "a", minute).await.unwrap(),
                Some(token),
                "{backend}: a renewal keeps the token"
            );
            assert!(
                store
                    .take_lease("reconcile", "b", minute)
                    .await
                    .unwrap()
                    .is_some(),
                "{backend}: leases are apart"
            );

            // Renewed for a millisecond and left to lapse: the next holder's token is higher,
            // and the old holder is fenced out.
            store.take_lease("lifecycle", "a", 1).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert_eq!(
                store.take_lease("lifecycle", "b", minute).await.unwrap(),
                Some(token + 1),
                "{backend}"
            );
            assert_eq!(
                store.take_lease("lifecycle", "a", minute).await.unwrap(),
                None,
                "{backend}: the lapsed holder is out"
            );

            // A holder taking its own lapsed lease again is a new hold: a new token.
            store.take_lease("lifecycle", "b", 1).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert_eq!(
                store.take_lease("lifecycle", "b", minute).await.unwrap(),
                Some(token + 2),
                "{backend}"
            );

            // Given up, it is free at once; only its holder gives it up.
            assert!(!store.release_lease("lifecycle", "a").await.unwrap());
            assert!(store.release_lease("lifecycle", "b").await.unwrap());
            assert_eq!(
                store.take_lease("lifecycle", "a", minute).await.unwrap(),
                Some(token + 3),
                "{backend}"
            );

            // Taken by many at once (a lapsed lease): one of them has it.
            store.release_lease("lifecycle", "a").await.unwrap();
            let takers = (0..8).map(|n| {
                let store = store.clone();
                async move {
                    store
                        .take_lease("lifecycle", &format!("r{n}"), minute)
                        .await
                }
            });
            let taken = futures_util::future::join_all(takers).await;
            let winners = taken
                .into_iter()
                .map(|answer| answer.unwrap())
                .filter(Option::is_some)
                .count();
            assert_eq!(winners, 1, "{backend}");
        }
    }

    #[tokio::test]
    async fn users_members_tokens_and_invitations_on_both_backends() {
        for (backend, store, _dir) in backends().await {
            let user = UserRow {
                id: "u1".into(),
                email: "u@example.com".into(),
                password_hash: "$argon2id$x".into(),
                operator: false,
                created_at_ms: 1,
            };
            store.create_user(user.clone()).await.unwrap();
            assert!(
                store.create_user(user.clone()).await.is_err(),
                "{backend}: one id"
            );
            assert_eq!(
                store.user_where("email", "u@example.com").await.unwrap(),
                Some(user.clone())
            );
            assert_eq!(
                store.users().await.unwrap(),
                vec![user.clone()],
                "{backend}"
            );

            let member = MemberRow {
                team_id: "b".into(),
                user_id: "u1".into(),
                role: Role::Member,
                created_at_ms: 2,
            };
            store.put_member(member.clone()).await.unwrap();
            store
                .put_member(MemberRow {
                    role: Role::Admin,
                    ..member.clone()
                })
                .await
                .unwrap();
            let of_user = store.members_where("user_id", "u1").await.unwrap();
            assert_eq!(
                of_user.len(),
                1,
                "{backend}: a role change is no second membership"
            );
            assert_eq!(of_user[0].role, Role::Admin, "{backend}");

            let token = UserTokenRow {
                id: "t1".into(),
                user_id: "u1".into(),
                kind: "access".into(),
                name: "laptop".into(),
                prefix: "sk_e2b_abcd".into(),
                mask_suffix: "wxyz".into(),
                created_at_ms: 3,
                expires_at_ms: 0,
                revoked: false,
            };
            store
                .add_user_token(token.clone(), "h1".into())
                .await
                .unwrap();
            assert_eq!(
                store.user_token_by_hash("h1").await.unwrap(),
                Some(token.clone()),
                "{backend}"
            );
            assert_eq!(store.user_tokens("u1", "access").await.unwrap().len(), 1);
            assert!(
                !store.revoke_user_token("other", "t1", 4).await.unwrap(),
                "{backend}: not theirs"
            );
            assert!(store.revoke_user_token("u1", "t1", 4).await.unwrap());
            assert_eq!(
                store.user_token_by_hash("h1").await.unwrap(),
                None,
                "{backend}"
            );

            let invitation = InvitationRow {
                id: "i1".into(),
                team_id: "b".into(),
                email: "new@example.com".into(),
                role: Role::Member,
                created_by: "user:u1".into(),
                created_at_ms: 5,
                expires_at_ms: 100,
                accepted: false,
            };
            store
                .add_invitation(invitation.clone(), "ih".into())
                .await
                .unwrap();
            assert_eq!(
                store.take_invitation("ih", 100).await.unwrap(),
                None,
                "{backend}: expired"
            );
            let taken = store.take_invitation("ih", 50).await.unwrap().unwrap();
            assert!(taken.accepted, "{backend}");
            assert_eq!(
                store.take_invitation("ih", 50).await.unwrap(),
                None,
                "{backend}: once"
            );
            assert!(
                store
                    .invitation_by_hash("ih")
                    .await
                    .unwrap()
                    .unwrap()
                    .accepted
            );

            // A team goes with its members, invitations and keys (its sandboxes first).
            store.delete_sandbox("other").await.unwrap();
            assert!(store.delete_team("b").await.unwrap(), "{backend}");
            assert!(store.team_by_id("b").await.unwrap().is_none());
            assert!(
                store
                    .members_where("team_id", "b")
                    .await
                    .unwrap()
                    .is_empty(),
                "{backend}"
            );
            assert!(!store.delete_team("b").await.unwrap(), "{backend}: gone");
            assert!(
                store.user_where("id", "u1").await.unwrap().is_some(),
                "{backend}: users stay"
            );
        }
    }
}
