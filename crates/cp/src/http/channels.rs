//! The notification channels' routes: `GET|POST /v1/channels`,
//! `GET|PATCH|DELETE /v1/channels/{channel_id}`, `POST /v1/channels/{channel_id}/test` and
//! `GET /v1/channels/{channel_id}/deliveries`, for the caller's team (members list and read;
//! admins and owners make, change, delete and test). They parse and answer; the calls are
//! `crate::channels::manage`'s.

use super::*;
use crate::channels::manage::{ChannelChange, ChannelView, NewChannel};
use crate::store::DeliveryRow;
use wrenn_api::channels as body;

/// The longest delivery log one call reads.
const MAX_DELIVERIES: usize = 1000;

fn channel_body(view: ChannelView, secret: Option<String>) -> body::Channel {
    let events = view.row.event_kinds();
    let row = view.row;
    body::Channel {
        id: row.id,
        name: row.name,
        kind: row.kind,
        url: view.url,
        events,
        enabled: row.enabled,
        consecutive_failures: row.consecutive_failures,
        disabled_reason: Some(row.disabled_reason).filter(|reason| !reason.is_empty()),
        created_at: rfc3339(row.created_at_ms),
        secret,
    }
}

fn delivery_body(row: DeliveryRow) -> body::ChannelDelivery {
    body::ChannelDelivery {
        id: row.id,
        event_seq: row.event_seq,
        state: row.state,
        attempts: row.attempts,
        next_attempt_at: rfc3339(row.next_attempt_at_ms),
        last_status: row.last_status,
        last_error: row.last_error,
        updated_at: rfc3339(row.updated_at_ms),
    }
}

/// `GET /v1/channels`: the team's channels, oldest first.
#[utoipa::path(get, path = "/v1/channels", tag = "channels", security(("api_key" = [])),
    responses((status = 200, description = "The team's channels", body = Vec<body::Channel>)))]
pub(super) async fn list_channels(
    TeamCall { plane, team, .. }: TeamCall,
) -> Result<Response, ApiError> {
    let channels: Vec<_> = (plane.team_channels(&team.0).await?)
        .into_iter()
        .map(|view| channel_body(view, None))
        .collect();
    Ok(axum::Json(channels).into_response())
}

/// `POST /v1/channels`: a new channel of the team (admins and owners); a webhook's signing
/// secret is in this answer only.
#[utoipa::path(post, path = "/v1/channels", tag = "channels", security(("api_key" = [])),
    request_body = body::NewChannel,
    responses(
        (status = 201, description = "The channel, with its webhook secret (shown once)", body = body::Channel),
        (status = 400, description = "A bad name, kind, URL (not http(s), or a private address), event type or secret", body = wrenn_api::Error),
        (status = 403, description = "A member's key", body = wrenn_api::Error),
    ))]
pub(super) async fn create_channel(
    TeamCall { plane, team, .. }: TeamCall,
    caller: Caller,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let asked: body::NewChannel = body_json(&bytes)?;
    let new = NewChannel {
        name: asked.name,
        kind: asked.kind,
        url: asked.url,
        events: asked.events,
        secret: asked.secret,
    };
    let (view, secret) = plane.create_channel(&team.0, caller.role(), new).await?;
    let made = channel_body(view, secret);
    let resource = format!("/v1/channels/{}", made.id);
    let mut response = (StatusCode::CREATED, axum::Json(made)).into_response();
    response.extensions_mut().insert(AuditResource(resource));
    Ok(response)
}

/// `GET /v1/channels/{channel_id}`: one channel of the team.
#[utoipa::path(get, path = "/v1/channels/{channel_id}", tag = "channels", security(("api_key" = [])),
    responses((status = 200, description = "The channel", body = body::Channel)))]
pub(super) async fn get_channel(
    SandboxCall { plane, team, id }: SandboxCall,
) -> Result<Response, ApiError> {
    let view = plane.team_channel(&team.0, &id).await?;
    Ok(axum::Json(channel_body(view, None)).into_response())
}

/// `PATCH /v1/channels/{channel_id}`: changes a channel's name, URL, event types or state
/// (admins and owners); enabling it clears its failures.
#[utoipa::path(patch, path = "/v1/channels/{channel_id}", tag = "channels", security(("api_key" = [])),
    request_body = body::UpdateChannel,
    responses(
        (status = 200, description = "The channel as changed", body = body::Channel),
        (status = 400, description = "A bad name, URL or event type", body = wrenn_api::Error),
        (status = 403, description = "A member's key", body = wrenn_api::Error),
    ))]
pub(super) async fn update_channel(
    SandboxCall { plane, team, id }: SandboxCall,
    caller: Caller,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let asked: body::UpdateChannel = body_json(&bytes)?;
    let change = ChannelChange {
        name: asked.name,
        url: asked.url,
        events: asked.events,
        enabled: asked.enabled,
    };
    let view = plane
        .change_channel(&team.0, caller.role(), &id, change)
        .await?;
    Ok(axum::Json(channel_body(view, None)).into_response())
}

/// `DELETE /v1/channels/{channel_id}`: deletes a channel and its delivery log (admins and
/// owners).
#[utoipa::path(delete, path = "/v1/channels/{channel_id}", tag = "channels", security(("api_key" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "A member's key", body = wrenn_api::Error),
    ))]
pub(super) async fn delete_channel(
    SandboxCall { plane, team, id }: SandboxCall,
    caller: Caller,
) -> Result<Response, ApiError> {
    plane.delete_channel(&team.0, caller.role(), &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/channels/{channel_id}/test`: a `channel.test` event for this channel alone,
/// delivered as any other (admins and owners).
#[utoipa::path(post, path = "/v1/channels/{channel_id}/test", tag = "channels", security(("api_key" = [])),
    responses(
        (status = 202, description = "The test event is queued for the channel"),
        (status = 403, description = "A member's key", body = wrenn_api::Error),
        (status = 409, description = "The channel is disabled", body = wrenn_api::Error),
    ))]
pub(super) async fn test_channel(
    SandboxCall { plane, team, id }: SandboxCall,
    caller: Caller,
) -> Result<Response, ApiError> {
    plane.test_channel(&team.0, caller.role(), &id).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// How many deliveries to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeliveryLimit {
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<usize>,
}

/// `GET /v1/channels/{channel_id}/deliveries`: the channel's delivery log, newest first.
#[utoipa::path(get, path = "/v1/channels/{channel_id}/deliveries", tag = "channels", security(("api_key" = [])),
    params(DeliveryLimit),
    responses((status = 200, description = "The channel's deliveries, newest first", body = Vec<body::ChannelDelivery>)))]
pub(super) async fn list_deliveries(
    SandboxCall { plane, team, id }: SandboxCall,
    Query(limit): Query<DeliveryLimit>,
) -> Result<Response, ApiError> {
    let limit = limit.limit.unwrap_or(100).clamp(1, MAX_DELIVERIES);
    let rows = plane.channel_deliveries(&team.0, &id, limit).await?;
    let deliveries: Vec<_> = rows.into_iter().map(delivery_body).collect();
    Ok(axum::Json(deliveries).into_response())
}
