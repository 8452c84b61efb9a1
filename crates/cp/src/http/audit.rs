//! The audit log's edge: [`record`] (called by `require_key` for every call that may change
//! state) and `GET /v1/audit`, which a team's admins and owners read for their team, and
//! operators (admin teams) for any team or all.

use super::*;

/// Appends a row to the audit log. The call it records has been answered: a store that
/// cannot keep the row is logged loudly, not turned into the call's failure.
pub(super) async fn record(plane: &ControlPlane, mut row: crate::store::AuditRow) {
    row.at_ms = now_ms();
    row.id = match auth::random_uuid() {
        Ok(id) => id,
        Err(error) => {
            tracing::error!(%error, action = %row.action, "an audit row has no id: not kept");
            return;
        }
    };
    if let Err(error) = plane.store.add_audit(row.clone()).await {
        tracing::error!(%error, action = %row.action, actor = %row.actor, resource = %row.resource, "an audit row was not kept");
    }
}

/// The filters of `GET /v1/audit` and `GET /v1/events`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct LogFilters {
    /// Rows after this cursor (a `seq`; 0, the default, is the first).
    pub(super) after: Option<i64>,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
    /// Events: their types, comma-separated (`sandbox.created,sandbox.killed`); audit: the
    /// methods (`POST,DELETE`).
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Events: the id they happened to; audit: the resource.
    subject: Option<String>,
    /// Only this actor's (`key:<id>`, `system`).
    actor: Option<String>,
    /// Only rows at or after this time (RFC 3339, or milliseconds since the epoch).
    since: Option<String>,
    /// Operators only: another team's id, or `all` (every team's, and the fleet's events).
    team: Option<String>,
}

impl LogFilters {
    /// The store's query for `caller`: its own team's rows unless an operator asked for more.
    pub(super) async fn query(
        self,
        plane: &ControlPlane,
        caller: &Caller,
    ) -> Result<crate::store::LogQuery, ApiError> {
        let team_id = match self.team.as_deref() {
            None => Some(caller.team_id().to_string()),
            Some(team) if team == caller.team_id() => Some(team.to_string()),
            Some(team) => {
                if !caller.is_operator(plane).await? {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "only an operator's key (an admin team's) reads another team's log",
                    ));
                }
                (team != "all").then(|| team.to_string())
            }
        };
        let since_ms = match self.since.as_deref() {
            None => None,
            Some(text) => Some(match text.parse::<i64>() {
                Ok(ms) => ms,
                Err(_) => chrono::DateTime::parse_from_rfc3339(text)
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "since {text:?} is neither RFC 3339 nor milliseconds since the epoch"
                        ))
                    })?
                    .timestamp_millis(),
            }),
        };
        let after = self.after.unwrap_or(0);
        if after < 0 {
            return Err(ApiError::bad_request("after is a cursor: 0 or more"));
        }
        Ok(crate::store::LogQuery {
            team_id,
            after,
            limit: self.limit.unwrap_or(100).clamp(1, 1000),
            kinds: self
                .kind
                .iter()
                .flat_map(|kinds| kinds.split(','))
                .map(str::trim)
                .filter(|kind| !kind.is_empty())
                .map(str::to_string)
                .collect(),
            subject: self.subject.filter(|subject| !subject.is_empty()),
            actor: self.actor.filter(|actor| !actor.is_empty()),
            since_ms,
        })
    }
}

/// `GET /v1/audit`: the audit log, oldest first from a cursor (a team's admins and owners;
/// operators may read any team's).
#[utoipa::path(get, path = "/v1/audit", tag = "audit", security(("api_key" = [])),
    params(LogFilters),
    responses(
        (status = 200, description = "A page of the audit log", body = wrenn_api::AuditLog),
        (status = 403, description = "A member's key, or another team asked for by a non-operator", body = wrenn_api::Error),
    ))]
pub(super) async fn list_audit(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Query(filters): Query<LogFilters>,
) -> Result<Response, ApiError> {
    crate::service::keys::require_role(
        caller.role(),
        crate::store::Role::Admin,
        "read the audit log",
    )?;
    let query = filters.query(&plane, &caller).await?;
    let after = query.after;
    let kinds: Vec<String> = query.kinds.iter().map(|kind| kind.to_uppercase()).collect();
    let query = crate::store::LogQuery { kinds, ..query };
    let rows = plane.store.audit(query).await?;
    let next = rows.last().map_or(after, |row| row.seq);
    let entries = rows
        .into_iter()
        .map(|row| wrenn_api::AuditEntry {
            id: row.id,
            seq: row.seq,
            timestamp: rfc3339(row.at_ms),
            team_id: row.team_id,
            actor: row.actor,
            action: row.action,
            resource: row.resource,
            outcome: u16::try_from(row.outcome).unwrap_or(0),
            client: row.client,
        })
        .collect();
    Ok(axum::Json(wrenn_api::AuditLog { entries, next }).into_response())
}
