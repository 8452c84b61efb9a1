//! The fleet routes of the REST API: admin teams list and forget hosts (agents join through
//! [`super::registry`]).

use super::*;

pub(super) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// A 403 unless the caller's team is an admin.
pub(super) async fn require_admin(plane: &ControlPlane, team: &TeamId) -> Result<(), ApiError> {
    let admin = plane
        .store
        .team_by_id(&team.0)
        .await?
        .is_some_and(|team| team.admin);
    if !admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "only an admin team's key may read or change the fleet",
        ));
    }
    Ok(())
}

/// `DELETE /hosts/{name}`: forgets a host that is down, with its sandboxes, so that a new
/// agent may take its name (admin teams only).
#[utoipa::path(delete, path = "/hosts/{name}", tag = "hosts", security(("api_key" = [])),
    responses(
        (status = 200, description = "Forgotten, with its sandboxes' rows", body = wrenn_api::ForgottenHost),
        (status = 409, description = "The host is up", body = wrenn_api::Error),
    ))]
pub(super) async fn forget_host(
    TeamCall { plane, team, .. }: TeamCall,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&plane, &team).await?;
    let sandboxes = plane.fleet.forget_host(&plane.store, &name).await?;
    Ok(axum::Json(wrenn_api::ForgottenHost {
        forgotten: name,
        sandboxes,
    })
    .into_response())
}

/// `GET /hosts`: the fleet, with each host's last report (admin teams only).
#[utoipa::path(get, path = "/hosts", tag = "hosts", security(("api_key" = [])),
    responses(
        (status = 200, description = "The fleet", body = wrenn_api::Hosts),
    ))]
pub(super) async fn list_hosts(
    TeamCall { plane, team, .. }: TeamCall,
) -> Result<Response, ApiError> {
    require_admin(&plane, &team).await?;
    let hosts = plane
        .fleet
        .hosts()
        .iter()
        .map(|host| {
            let row = host.row();
            wrenn_api::Host {
                embedded: row.api_url == crate::store::EMBEDDED_API_URL,
                last_heartbeat_at: rfc3339(row.last_heartbeat_ms),
                registered_at: rfc3339(row.registered_at_ms),
                report: serde_json::to_value(&row.report).unwrap_or_default(),
                host_id: row.id,
                name: row.name,
                state: row.state.as_str().into(),
                api_url: row.api_url,
            }
        })
        .collect();
    Ok(axum::Json(wrenn_api::Hosts {
        placement: plane.fleet.placement_name().into(),
        hosts,
    })
    .into_response())
}
