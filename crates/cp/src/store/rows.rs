//! The store's rows as both backends read and write them. Each row type ([`Team`], [`ApiKey`],
//! [`SandboxRow`], [`HostRow`]) is declared once with the columns it is read from and how each
//! reads ([`Stored`]), and read by name from either backend's row ([`Columns`]), so one query
//! text and one mapper serve SQLite and PostgreSQL alike.

use serde::de::DeserializeOwned;

use super::telemetry::{MetricRow, SandboxLogRow, UsageRow};
use super::{
    ApiKey, AuditRow, BuildLogRow, BuildRow, BuildStatus, ChannelRow, DeliveryRow, EventRow,
    HostRow, HostState, InvitationRow, MemberRow, Role, SandboxRow, SandboxState, TagRow, Team,
    TemplateRow, UserRow, UserTokenRow, sandbox_state,
};

/// A row a backend read: its columns by name, as the few kinds of value the store keeps.
pub trait Columns {
    /// Why a column could not be read (the backend's own error).
    type Error;
    fn text(&self, column: &str) -> Result<String, Self::Error>;
    fn optional_text(&self, column: &str) -> Result<Option<String>, Self::Error>;
    fn int(&self, column: &str) -> Result<i64, Self::Error>;
    fn flag(&self, column: &str) -> Result<bool, Self::Error>;
    fn real(&self, column: &str) -> Result<f64, Self::Error>;
    /// A count kept in an `INTEGER` column (CPUs, MiB).
    fn count(&self, column: &str) -> Result<u32, Self::Error>;

    /// A sandbox's state, by [`sandbox_state`].
    fn sandbox_state(&self, column: &str) -> Result<SandboxState, Self::Error> {
        Ok(sandbox_state(&self.text(column)?))
    }

    /// A build's status; one this version does not know reads as an error.
    fn build_status(&self, column: &str) -> Result<BuildStatus, Self::Error> {
        Ok(BuildStatus::from_name(&self.text(column)?).unwrap_or(BuildStatus::Error))
    }

    /// A key's role, by [`Role::from_stored`].
    fn role(&self, column: &str) -> Result<Role, Self::Error> {
        Ok(Role::from_stored(&self.text(column)?))
    }

    /// A host's state, by [`HostState::from_stored`].
    fn host_state(&self, column: &str) -> Result<HostState, Self::Error> {
        Ok(HostState::from_stored(&self.text(column)?))
    }

    /// A JSON document kept as text; unreadable JSON reads as the default.
    fn json<T: DeserializeOwned + Default>(&self, column: &str) -> Result<T, Self::Error> {
        Ok(serde_json::from_str(&self.text(column)?).unwrap_or_default())
    }
}

/// [`Columns`] for a backend's row type: each kind read by the row's `$get` (its `FromSql`
/// conversion), a count from a `$stored` integer made a `u32` by `$count`.
macro_rules! columns {
    ($row:ty, $error:ty, $get:ident, $stored:ty, $count:expr) => {
        impl Columns for $row {
            type Error = $error;

            fn text(&self, column: &str) -> Result<String, $error> {
                self.$get(column)
            }

            fn optional_text(&self, column: &str) -> Result<Option<String>, $error> {
                self.$get(column)
            }

            fn int(&self, column: &str) -> Result<i64, $error> {
                self.$get(column)
            }

            fn flag(&self, column: &str) -> Result<bool, $error> {
                self.$get(column)
            }

            fn real(&self, column: &str) -> Result<f64, $error> {
                self.$get(column)
            }

            fn count(&self, column: &str) -> Result<u32, $error> {
                self.$get::<_, $stored>(column).map($count)
            }
        }
    };
}

columns!(rusqlite::Row<'_>, rusqlite::Error, get, u32, |count| count);
// PostgreSQL has no unsigned integers: counts are `INTEGER`, a negative one reads as 0.
columns!(
    tokio_postgres::Row,
    tokio_postgres::Error,
    try_get,
    i32,
    |count: i32| count.max(0) as u32
);

/// A row type of the store: the one query that reads it and the one mapper of its rows.
pub trait Stored: Sized {
    /// `SELECT` its columns `FROM` its table, then `clause` (`WHERE …`, `ORDER BY …`).
    fn select(clause: &str) -> String;
    /// The row type from a row that [`Stored::select`] read.
    fn read<R: Columns>(row: &R) -> Result<Self, R::Error>;
}

/// Declares a row type's table and fields: each field is its table's column of the same name,
/// or the SQL expression given after `=` (named after the field), read by the [`Columns`]
/// method named after `:`.
macro_rules! stored {
    ($type:ident from $table:ident { $($field:ident: $kind:ident $(= $sql:literal)?),* $(,)? }) => {
        impl Stored for $type {
            fn select(clause: &str) -> String {
                let columns: &[&str] = &[$(column!($field $(, $sql)?)),*];
                format!("SELECT {} FROM {} {clause}", columns.join(", "), stringify!($table))
            }

            fn read<R: Columns>(row: &R) -> Result<Self, R::Error> {
                Ok($type { $($field: row.$kind(stringify!($field))?),* })
            }
        }
    };
}

/// A field's column in a `SELECT`: its own name, or an expression named after it.
macro_rules! column {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident, $sql:literal) => {
        concat!($sql, " AS ", stringify!($field))
    };
}

stored!(Team from teams { id: text, name: text, created_at_ms: int, admin: flag });

stored!(ApiKey from api_keys {
    id: text, team_id: text, name: text, prefix: text, created_at_ms: int,
    revoked: flag = "revoked_at_ms IS NOT NULL", role: role, mask_suffix: text,
});

stored!(UserRow from users {
    id: text, email: text, password_hash: text, operator: flag, created_at_ms: int,
});

stored!(MemberRow from memberships { team_id: text, user_id: text, role: role, created_at_ms: int });

stored!(UserTokenRow from user_tokens {
    id: text, user_id: text, kind: text, name: text, prefix: text, mask_suffix: text,
    created_at_ms: int, expires_at_ms: int, revoked: flag = "revoked_at_ms IS NOT NULL",
});

stored!(InvitationRow from invitations {
    id: text, team_id: text, email: text, role: role, created_by: text, created_at_ms: int,
    expires_at_ms: int, accepted: flag = "accepted_at_ms IS NOT NULL",
});

stored!(EventRow from events {
    seq: int, id: text, at_ms: int, team_id: text, actor: text, kind: text, subject: text,
    data: json = "CAST(data AS TEXT)",
});

stored!(AuditRow from audit_log {
    seq: int, id: text, at_ms: int, team_id: text, actor: text, action: text, resource: text,
    outcome: int, client: text,
});

// JSON columns are read as text: `jsonb` on PostgreSQL, already text on SQLite.
stored!(SandboxRow from sandboxes {
    id: text, team_id: text, template_id: text, alias: optional_text,
    state: sandbox_state, started_at_ms: int, end_at_ms: int,
    metadata: json = "CAST(metadata AS TEXT)",
    envd_access_token: optional_text, auto_pause: flag, allow_internet: flag,
    cpu_count: count, memory_mb: count, envd_version: text, host_id: text,
    traffic_access_token: optional_text, auto_resume: flag, auto_pause_memory: flag,
    paused_disk_only: flag,
    network: json = "CAST(network AS TEXT)",
});

stored!(HostRow from hosts {
    id: text, name: text, api_url: text, proxy_address: text, agent_token: text,
    heartbeat_hash: text, state: host_state,
    report: json = "CAST(report AS TEXT)",
    last_heartbeat_ms: int, registered_at_ms: int, identity_hash: text,
});

stored!(TemplateRow from templates {
    id: text, team_id: text, alias: optional_text, public: flag, cpu_count: count,
    memory_mb: count, created_at_ms: int, updated_at_ms: int, ready_build_id: optional_text,
    source_sandbox_id: optional_text,
    network: json = "CAST(network AS TEXT)",
});

stored!(BuildRow from template_builds {
    id: text, template_id: text, status: build_status, reason: optional_text,
    reason_step: optional_text, from_template: text, host_id: optional_text,
    host_template_id: text, cpu_count: count, memory_mb: count, disk_size_mb: count,
    envd_version: text, created_at_ms: int, finished_at_ms: int, tags: json,
});

stored!(TagRow from template_tags { template_id: text, tag: text, build_id: text, created_at_ms: int });

stored!(BuildLogRow from template_build_logs {
    seq: int, timestamp_ms: int, level: text, message: text, step: optional_text,
});

stored!(ChannelRow from channels {
    id: text, team_id: text, name: text, kind: text, url_sealed: text, secret_sealed: text,
    events: text, enabled: flag, consecutive_failures: int, disabled_reason: text,
    created_at_ms: int,
});

stored!(DeliveryRow from channel_deliveries {
    id: int, channel_id: text, event_seq: int, state: text, attempts: int,
    next_attempt_at_ms: int, last_status: int, last_error: text, updated_at_ms: int,
});

stored!(MetricRow from sandbox_metrics {
    sandbox_id: text, team_id: text, tier: int, at_ms: int, cpu_count: count, cpu_used_pct: real,
    mem_used: int, mem_total: int, mem_cache: int, disk_used: int, disk_total: int,
    net_rx_bytes: int, net_tx_bytes: int,
});

stored!(SandboxLogRow from sandbox_logs {
    seq: int, sandbox_id: text, team_id: text, at_ms: int, level: text, message: text, fields: text,
});

stored!(UsageRow from team_usage { team_id: text, day: text, sandbox_ms: int, mib_ms: int });

/// How `put_template` changes a template stored already.
pub const TEMPLATE_UPSERT: &str = "ON CONFLICT (id) DO UPDATE SET alias = excluded.alias,
    public = excluded.public, cpu_count = excluded.cpu_count, memory_mb = excluded.memory_mb,
    updated_at_ms = excluded.updated_at_ms, ready_build_id = excluded.ready_build_id,
    source_sandbox_id = excluded.source_sandbox_id, network = excluded.network";

/// How `put_build` changes a build stored already.
pub const BUILD_UPSERT: &str = "ON CONFLICT (id) DO UPDATE SET status = excluded.status,
    reason = excluded.reason, reason_step = excluded.reason_step, host_id = excluded.host_id,
    from_template = excluded.from_template, cpu_count = excluded.cpu_count,
    memory_mb = excluded.memory_mb, disk_size_mb = excluded.disk_size_mb,
    envd_version = excluded.envd_version, finished_at_ms = excluded.finished_at_ms";

/// How `put_sandbox` updates a sandbox stored already: its lifecycle's columns.
pub const SANDBOX_UPSERT: &str = "ON CONFLICT (id) DO UPDATE SET state = excluded.state,
    end_at_ms = excluded.end_at_ms, started_at_ms = excluded.started_at_ms,
    envd_access_token = excluded.envd_access_token, auto_pause = excluded.auto_pause,
    host_id = excluded.host_id, auto_pause_memory = excluded.auto_pause_memory,
    paused_disk_only = excluded.paused_disk_only, allow_internet = excluded.allow_internet,
    network = excluded.network";

/// How `put_host` updates a host stored already (registered again): every column but its id.
pub const HOST_UPSERT: &str = "ON CONFLICT (id) DO UPDATE SET name = excluded.name,
    api_url = excluded.api_url, proxy_address = excluded.proxy_address,
    agent_token = excluded.agent_token, heartbeat_hash = excluded.heartbeat_hash,
    state = excluded.state, report = excluded.report,
    last_heartbeat_ms = excluded.last_heartbeat_ms, registered_at_ms = excluded.registered_at_ms,
    identity_hash = excluded.identity_hash";

/// The first of a query's rows, if any.
pub fn first<T>(rows: Vec<T>) -> Option<T> {
    rows.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_types_select_names_every_field_and_aliases_expressions() {
        assert_eq!(
            Team::select("WHERE id = ?1"),
            "SELECT id, name, created_at_ms, admin FROM teams WHERE id = ?1"
        );
        assert_eq!(
            ApiKey::select("ORDER BY id"),
            "SELECT id, team_id, name, prefix, created_at_ms, \
             revoked_at_ms IS NOT NULL AS revoked, role, mask_suffix FROM api_keys ORDER BY id"
        );
    }
}
