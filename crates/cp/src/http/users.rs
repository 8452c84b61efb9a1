//! Users' routes: signing in and out (`/v1/auth/login|logout`: sessions for the dashboard),
//! `GET /v1/me`, teams (`POST /v1/teams`, `DELETE /v1/teams/{team_id}`), their members and
//! roles, invitations by one-time link, and E2B's `/access-tokens`. A route naming a team acts
//! with the caller's role in that team (a user's membership; an operator as an owner; a key
//! only in its own team).

use super::*;
use crate::service::users::Caller as Acting;
use crate::store::{Role, UserRow, UserTokenRow};

fn user_body(user: &UserRow) -> wrenn_api::User {
    wrenn_api::User {
        user_id: user.id.clone(),
        email: user.email.clone(),
        operator: user.operator,
        created_at: rfc3339(user.created_at_ms),
    }
}

fn role_named(name: &str) -> Result<Role, ApiError> {
    Role::from_name(name).ok_or_else(|| {
        ApiError::bad_request(format!("role {name:?} is not one of owner, admin, member"))
    })
}

/// The signed-in user calling, or a 403 for a key.
fn signed_in<'a>(caller: &'a Caller, doing: &str) -> Result<&'a UserRow, ApiError> {
    caller.user().ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{doing} is for signed-in users (Authorization: Bearer), not API keys"),
        )
    })
}

/// The caller acting in team `team_id`: its role there, or a 404 for a team it is not in.
async fn in_team(plane: &ControlPlane, caller: &Caller, team_id: &str) -> Result<Acting, ApiError> {
    let mut acting = (**caller).clone();
    if team_id == caller.team_id() {
        return Ok(acting);
    }
    let not_found = || ApiError::from(crate::Error::TeamNotFound(team_id.to_string()));
    let membership = match caller.user() {
        Some(user) => plane
            .store
            .members_where("user_id", &user.id)
            .await?
            .into_iter()
            .find(|member| member.team_id == team_id),
        None => None,
    };
    acting.role = match membership {
        Some(member) => member.role,
        // An operator (user) acts as an owner; an operators' team's key with its own role.
        None if caller.operator && plane.store.team_by_id(team_id).await?.is_some() => {
            match caller.user() {
                Some(_) => Role::Owner,
                None => caller.role,
            }
        }
        None => return Err(not_found()),
    };
    acting.team_id = team_id.to_string();
    Ok(acting)
}

/// `POST /v1/auth/login`: a session for a user's email and password.
#[utoipa::path(post, path = "/v1/auth/login", tag = "users",
    request_body = wrenn_api::Login,
    responses(
        (status = 200, description = "Signed in: the session token, shown once", body = wrenn_api::Session),
        (status = 401, description = "A wrong email or password", body = wrenn_api::Error),
        (status = 429, description = "Too many failures for this email (Retry-After)", body = wrenn_api::Error),
    ))]
pub(super) async fn login(
    State(plane): State<Arc<ControlPlane>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let asked: wrenn_api::Login = body_json(&body)?;
    let (token, user) = plane.login(&asked.email, &asked.password).await?;
    let expires = now_ms() + crate::service::users::SESSION_LIFETIME.as_millis() as i64;
    let session = wrenn_api::Session {
        token,
        expires_at: rfc3339(expires),
        user: user_body(&user),
    };
    Ok(axum::Json(session).into_response())
}

/// `POST /v1/auth/logout`: ends the session (or access token) the call is made with.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "users", security(("bearer" = [])),
    responses((status = 204, description = "Signed out")))]
pub(super) async fn logout(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let user = signed_in(&caller, "signing out")?;
    if let crate::service::users::Principal::User { token, .. } = &caller.principal {
        plane.revoke_user_token(user, &token.id).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/me`: the signed-in user and their teams.
#[utoipa::path(get, path = "/v1/me", tag = "users", security(("bearer" = [])),
    responses((status = 200, description = "The user and their teams", body = wrenn_api::Me)))]
pub(super) async fn me(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let user = signed_in(&caller, "GET /v1/me")?;
    let mut teams = Vec::new();
    for member in plane.store.members_where("user_id", &user.id).await? {
        if let Some(team) = plane.store.team_by_id(&member.team_id).await? {
            teams.push(wrenn_api::Membership {
                team_id: team.id,
                name: team.name,
                role: member.role.as_str().into(),
            });
        }
    }
    let me = wrenn_api::Me {
        user: user_body(user),
        teams,
    };
    Ok(axum::Json(me).into_response())
}

/// `POST /v1/teams`: a new team, whose owner is the signed-in user.
#[utoipa::path(post, path = "/v1/teams", tag = "users", security(("bearer" = [])),
    request_body = wrenn_api::NewTeam,
    responses(
        (status = 201, description = "The team", body = wrenn_api::Membership),
        (status = 400, description = "A bad name", body = wrenn_api::Error),
        (status = 403, description = "An API key (teams are made by users)", body = wrenn_api::Error),
        (status = 409, description = "The name is taken", body = wrenn_api::Error),
    ))]
pub(super) async fn create_team(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let user = signed_in(&caller, "making a team")?;
    let asked: wrenn_api::NewTeam = body_json(&body)?;
    let team = plane.create_team(user, &asked.name).await?;
    let made = wrenn_api::Membership {
        team_id: team.id.clone(),
        name: team.name,
        role: Role::Owner.as_str().into(),
    };
    let mut response = (StatusCode::CREATED, axum::Json(made)).into_response();
    response
        .extensions_mut()
        .insert(AuditResource(format!("/v1/teams/{}", team.id)));
    Ok(response)
}

/// `DELETE /v1/teams/{team_id}`: deletes a team with its keys, members and invitations
/// (owners; operators any team but theirs), once it has no sandbox or template.
#[utoipa::path(delete, path = "/v1/teams/{team_id}", tag = "users", security(("api_key" = []), ("bearer" = [])),
    params(("team_id" = String, Path, description = "The team")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not an owner", body = wrenn_api::Error),
        (status = 404, description = "No such team of the caller's", body = wrenn_api::Error),
        (status = 409, description = "It still has sandboxes or templates", body = wrenn_api::Error),
    ))]
pub(super) async fn delete_team(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(team_id): Path<String>,
) -> Result<Response, ApiError> {
    let acting = in_team(&plane, &caller, &team_id).await?;
    plane.delete_team(&acting, &team_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/teams/{team_id}/members`.
#[utoipa::path(get, path = "/v1/teams/{team_id}/members", tag = "users", security(("api_key" = []), ("bearer" = [])),
    params(("team_id" = String, Path, description = "The team")),
    responses(
        (status = 200, description = "The team's members", body = Vec<wrenn_api::Member>),
        (status = 404, description = "No such team of the caller's", body = wrenn_api::Error),
    ))]
pub(super) async fn list_members(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(team_id): Path<String>,
) -> Result<Response, ApiError> {
    let acting = in_team(&plane, &caller, &team_id).await?;
    let members: Vec<_> = plane
        .members(&acting.team_id)
        .await?
        .into_iter()
        .map(|(member, email)| wrenn_api::Member {
            user_id: member.user_id,
            email,
            role: member.role.as_str().into(),
            joined_at: rfc3339(member.created_at_ms),
        })
        .collect();
    Ok(axum::Json(members).into_response())
}

/// `PATCH /v1/teams/{team_id}/members/{user_id}`: a member's new role.
#[utoipa::path(patch, path = "/v1/teams/{team_id}/members/{user_id}", tag = "users", security(("api_key" = []), ("bearer" = [])),
    params(("team_id" = String, Path, description = "The team"), ("user_id" = String, Path, description = "The member")),
    request_body = wrenn_api::MemberRole,
    responses(
        (status = 204, description = "Changed"),
        (status = 400, description = "An unknown role", body = wrenn_api::Error),
        (status = 403, description = "Not allowed to the caller's role", body = wrenn_api::Error),
        (status = 404, description = "No such member", body = wrenn_api::Error),
        (status = 409, description = "The team's last owner", body = wrenn_api::Error),
    ))]
pub(super) async fn set_member_role(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path((team_id, user_id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let acting = in_team(&plane, &caller, &team_id).await?;
    let asked: wrenn_api::MemberRole = body_json(&body)?;
    let role = role_named(&asked.role)?;
    plane.set_member_role(&acting, &user_id, role).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /v1/teams/{team_id}/members/{user_id}`: removes a member (or the caller leaves).
#[utoipa::path(delete, path = "/v1/teams/{team_id}/members/{user_id}", tag = "users", security(("api_key" = []), ("bearer" = [])),
    params(("team_id" = String, Path, description = "The team"), ("user_id" = String, Path, description = "The member")),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "Not allowed to the caller's role", body = wrenn_api::Error),
        (status = 404, description = "No such member", body = wrenn_api::Error),
        (status = 409, description = "The team's last owner", body = wrenn_api::Error),
    ))]
pub(super) async fn remove_member(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path((team_id, user_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let acting = in_team(&plane, &caller, &team_id).await?;
    plane.remove_member(&acting, &user_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/teams/{team_id}/invitations`: a one-time link's token for `email` to join.
#[utoipa::path(post, path = "/v1/teams/{team_id}/invitations", tag = "users", security(("api_key" = []), ("bearer" = [])),
    params(("team_id" = String, Path, description = "The team")),
    request_body = wrenn_api::NewInvitation,
    responses(
        (status = 201, description = "The invitation, its token shown once", body = wrenn_api::Invitation),
        (status = 400, description = "A bad email or role", body = wrenn_api::Error),
        (status = 403, description = "A member, or a role above the caller's", body = wrenn_api::Error),
        (status = 404, description = "No such team of the caller's", body = wrenn_api::Error),
    ))]
pub(super) async fn invite(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(team_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let acting = in_team(&plane, &caller, &team_id).await?;
    let asked: wrenn_api::NewInvitation = body_json(&body)?;
    let role = match asked.role.as_deref() {
        None => Role::Member,
        Some(name) => role_named(name)?,
    };
    let (token, invitation) = plane.invite(&acting, &asked.email, role).await?;
    let made = wrenn_api::Invitation {
        id: invitation.id.clone(),
        token,
        email: invitation.email,
        role: invitation.role.as_str().into(),
        expires_at: rfc3339(invitation.expires_at_ms),
    };
    let mut response = (StatusCode::CREATED, axum::Json(made)).into_response();
    response
        .extensions_mut()
        .insert(AuditResource(format!("/v1/invitations/{}", invitation.id)));
    Ok(response)
}

/// `POST /v1/invitations/{token}/accept`: joins the invitation's team, as the signed-in user
/// (`Authorization: Bearer`) or as a new user with the invitation's email and `password`.
/// The token is the credential; it works once.
#[utoipa::path(post, path = "/v1/invitations/{token}/accept", tag = "users",
    params(("token" = String, Path, description = "The invitation's one-time token")),
    request_body = wrenn_api::AcceptInvitation,
    responses(
        (status = 200, description = "Joined", body = wrenn_api::Accepted),
        (status = 400, description = "A new user's password is too short", body = wrenn_api::Error),
        (status = 401, description = "Unknown, used or expired", body = wrenn_api::Error),
        (status = 409, description = "The email has an account: sign in first", body = wrenn_api::Error),
    ))]
pub(super) async fn accept_invitation(
    State(plane): State<Arc<ControlPlane>>,
    Path(token): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let asked: wrenn_api::AcceptInvitation = body_json(&body)?;
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let user = match bearer {
        None => None,
        Some(bearer) => match plane.authenticate_user(bearer.trim(), None).await? {
            Some(caller) => caller.user().cloned(),
            None => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "Invalid access token",
                ));
            }
        },
    };
    let (member, user) = plane
        .accept_invitation(&token, user.as_ref(), asked.password.as_deref())
        .await?;
    let accepted = wrenn_api::Accepted {
        team_id: member.team_id,
        role: member.role.as_str().into(),
        user: user_body(&user),
    };
    Ok(axum::Json(accepted).into_response())
}

/// How a user's token is shown: its prefix, two characters, and its last four.
fn token_mask(token: &UserTokenRow) -> wrenn_api::IdentifierMaskingDetails {
    let prefix = crate::service::users::ACCESS_TOKEN_PREFIX;
    wrenn_api::IdentifierMaskingDetails {
        prefix: prefix.into(),
        value_length: 40,
        masked_value_prefix: token
            .prefix
            .get(prefix.len()..prefix.len() + 2)
            .unwrap_or_default()
            .to_string(),
        masked_value_suffix: token.mask_suffix.clone(),
    }
}

/// `POST /access-tokens`: a new access token of the signed-in user (E2B's), shown once.
#[utoipa::path(post, path = "/access-tokens", tag = "users", security(("bearer" = [])),
    request_body = wrenn_api::NewAccessToken,
    responses(
        (status = 201, description = "The token, shown once", body = wrenn_api::CreatedAccessToken),
        (status = 400, description = "A bad name", body = wrenn_api::Error),
        (status = 403, description = "An API key (tokens are users')", body = wrenn_api::Error),
    ))]
pub(super) async fn create_access_token(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let user = signed_in(&caller, "making an access token")?;
    let asked: wrenn_api::NewAccessToken = body_json(&body)?;
    let (token, row) = plane.user_token(user, "access", &asked.name, 0).await?;
    let made = wrenn_api::CreatedAccessToken {
        id: row.id.clone(),
        name: row.name.clone(),
        token,
        mask: token_mask(&row),
        created_at: rfc3339(row.created_at_ms),
    };
    let mut response = (StatusCode::CREATED, axum::Json(made)).into_response();
    response
        .extensions_mut()
        .insert(AuditResource(format!("/access-tokens/{}", row.id)));
    Ok(response)
}

/// `DELETE /access-tokens/{access_token_id}`: revokes one of the user's tokens at once.
#[utoipa::path(delete, path = "/access-tokens/{access_token_id}", tag = "users", security(("bearer" = [])),
    params(("access_token_id" = String, Path, description = "The token's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "An API key", body = wrenn_api::Error),
        (status = 404, description = "No such token of the user's", body = wrenn_api::Error),
    ))]
pub(super) async fn delete_access_token(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Path(token_id): Path<String>,
) -> Result<Response, ApiError> {
    let user = signed_in(&caller, "revoking an access token")?;
    plane.revoke_user_token(user, &token_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
