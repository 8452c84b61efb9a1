//! E2B's key and team routes: `GET|POST /api-keys`, `PATCH|DELETE /api-keys/{apiKeyID}` and
//! `GET /teams`, for the caller's team, by the caller's key's role (members list keys; admins
//! and owners make, rename and revoke them).

use super::*;
use crate::store::{ApiKey, Role};

/// How a stored key is shown: `e2b_` + its first two and last four characters.
fn mask(key: &ApiKey) -> wrenn_api::IdentifierMaskingDetails {
    wrenn_api::IdentifierMaskingDetails {
        prefix: "e2b_".into(),
        value_length: 40,
        masked_value_prefix: key.prefix.get(4..6).unwrap_or_default().to_string(),
        masked_value_suffix: key.mask_suffix.clone(),
    }
}

fn key_body(key: ApiKey) -> wrenn_api::TeamApiKey {
    wrenn_api::TeamApiKey {
        mask: mask(&key),
        created_at: rfc3339(key.created_at_ms),
        created_by: None,
        last_used: None,
        role: key.role.as_str().into(),
        id: key.id,
        name: key.name,
    }
}

/// `GET /api-keys`: the team's live keys, oldest first.
#[utoipa::path(get, path = "/api-keys", tag = "api-keys", security(("api_key" = [])),
    responses((status = 200, description = "The team's keys", body = Vec<wrenn_api::TeamApiKey>)))]
pub(super) async fn list_keys(
    TeamCall { plane, team, .. }: TeamCall,
) -> Result<Response, ApiError> {
    let keys: Vec<_> = plane
        .team_keys(&team.0)
        .await?
        .into_iter()
        .map(key_body)
        .collect();
    Ok(axum::Json(keys).into_response())
}

/// `POST /api-keys`: a new key of the team, shown this once (admins and owners; its role at
/// most the caller's).
#[utoipa::path(post, path = "/api-keys", tag = "api-keys", security(("api_key" = [])),
    request_body = wrenn_api::NewTeamApiKey,
    responses(
        (status = 201, description = "The key, shown once", body = wrenn_api::CreatedTeamApiKey),
        (status = 400, description = "A bad name or role", body = wrenn_api::Error),
        (status = 403, description = "A member's key, or a role above the caller's", body = wrenn_api::Error),
    ))]
pub(super) async fn create_key(
    TeamCall { plane, team, .. }: TeamCall,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let asked: wrenn_api::NewTeamApiKey = body_json(&body)?;
    let role = match asked.role.as_deref() {
        None => None,
        Some(name) => Some(Role::from_name(name).ok_or_else(|| {
            ApiError::bad_request(format!("role {name:?} is not one of owner, admin, member"))
        })?),
    };
    let (key, record) = plane
        .create_key(&team.0, caller.role(), &asked.name, role)
        .await?;
    let listed = key_body(record);
    let created = wrenn_api::CreatedTeamApiKey {
        id: listed.id.clone(),
        key,
        mask: listed.mask,
        name: listed.name,
        created_at: listed.created_at,
        created_by: None,
        last_used: None,
        role: listed.role,
    };
    let mut response = (StatusCode::CREATED, axum::Json(created)).into_response();
    response
        .extensions_mut()
        .insert(AuditResource(format!("/api-keys/{}", listed.id)));
    Ok(response)
}

/// `PATCH /api-keys/{apiKeyID}`: renames a key of the team (admins and owners).
#[utoipa::path(patch, path = "/api-keys/{api_key_id}", tag = "api-keys", security(("api_key" = [])),
    request_body = wrenn_api::UpdateTeamApiKey,
    responses(
        (status = 200, description = "Renamed"),
        (status = 403, description = "A member's key, or a key above the caller's role", body = wrenn_api::Error),
    ))]
pub(super) async fn rename_key(
    SandboxCall { plane, team, id }: SandboxCall,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let asked: wrenn_api::UpdateTeamApiKey = body_json(&body)?;
    plane
        .rename_key(&team.0, caller.role(), &id, &asked.name)
        .await?;
    Ok(StatusCode::OK.into_response())
}

/// `DELETE /api-keys/{apiKeyID}`: revokes a key of the team at once (admins and owners; a
/// key may revoke itself).
#[utoipa::path(delete, path = "/api-keys/{api_key_id}", tag = "api-keys", security(("api_key" = [])),
    responses(
        (status = 204, description = "Revoked: its next call gets 401"),
        (status = 403, description = "A member's key, or a key above the caller's role", body = wrenn_api::Error),
    ))]
pub(super) async fn revoke_key(
    SandboxCall { plane, team, id }: SandboxCall,
    caller: Caller,
) -> Result<Response, ApiError> {
    plane.revoke_key(&team.0, caller.role(), &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /teams`: the caller's team; an operator's key (an admin team's) sees every team.
#[utoipa::path(get, path = "/teams", tag = "teams", security(("api_key" = [])),
    responses((status = 200, description = "The caller's teams", body = Vec<wrenn_api::Team>)))]
pub(super) async fn list_teams(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let own = &caller.team_id().to_string();
    let teams = if caller.is_operator(&plane).await? {
        plane.store.teams().await?
    } else if let Some(user) = caller.user() {
        let mut teams = Vec::new();
        for member in plane.store.members_where("user_id", &user.id).await? {
            teams.extend(plane.store.team_by_id(&member.team_id).await?);
        }
        teams
    } else {
        plane.store.team_by_id(own).await?.into_iter().collect()
    };
    let teams: Vec<_> = teams
        .into_iter()
        .map(|team| wrenn_api::Team {
            is_default: &team.id == own,
            api_key: if &team.id == own {
                caller.presented.clone()
            } else {
                String::new()
            },
            team_id: team.id,
            name: team.name,
        })
        .collect();
    Ok(axum::Json(teams).into_response())
}
