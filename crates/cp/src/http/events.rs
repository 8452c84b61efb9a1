//! The events' edge: `GET /v1/events` (a page from a cursor, with filters) and
//! `GET /v1/events/stream` (Server-Sent Events: each event once, in order, from the caller's
//! cursor or from now). A team's keys see its events; operators (admin teams) any team's, or
//! all with the fleet's own (`team=all`).

use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};

use super::*;
use crate::store::EventRow;

/// How many events a stream reads from the store at once.
const STREAM_PAGE: usize = 100;

fn event_body(row: EventRow) -> wrenn_api::Event {
    wrenn_api::Event {
        id: row.id,
        seq: row.seq,
        timestamp: rfc3339(row.at_ms),
        kind: row.kind,
        team_id: row.team_id,
        actor: row.actor,
        subject: row.subject,
        data: row.data,
    }
}

/// `GET /v1/events`: events oldest first from a cursor (`after`), with filters.
#[utoipa::path(get, path = "/v1/events", tag = "events", security(("api_key" = [])),
    params(LogFilters),
    responses(
        (status = 200, description = "A page of events", body = wrenn_api::Events),
        (status = 403, description = "Another team asked for by a non-operator", body = wrenn_api::Error),
    ))]
pub(super) async fn list_events(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    Query(filters): Query<LogFilters>,
) -> Result<Response, ApiError> {
    let query = filters.query(&plane, &caller).await?;
    let after = query.after;
    let rows = plane.store.events(query).await?;
    let next = rows.last().map_or(after, |row| row.seq);
    let events = rows.into_iter().map(event_body).collect();
    Ok(axum::Json(wrenn_api::Events { events, next }).into_response())
}

/// `GET /v1/events/stream`: Server-Sent Events, each an event (`id:` its `seq`, `event:` its
/// type, `data:` the event as `GET /v1/events` lists it), from `Last-Event-ID` or `after`
/// when given, else from now; a comment every 15 s keeps the connection alive.
#[utoipa::path(get, path = "/v1/events/stream", tag = "events", security(("api_key" = [])),
    params(LogFilters),
    responses(
        (status = 200, description = "An endless text/event-stream of events", content_type = "text/event-stream", body = String),
        (status = 403, description = "Another team asked for by a non-operator", body = wrenn_api::Error),
    ))]
pub(super) async fn stream_events(
    State(plane): State<Arc<ControlPlane>>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    Query(filters): Query<LogFilters>,
) -> Result<Response, ApiError> {
    let resume_from = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
                .filter(|seq| *seq >= 0)
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID is an event's seq"))?,
        ),
    };
    let given_after = filters.after;
    let mut query = filters.query(&plane, &caller).await?;
    // Subscribed before the store is read: nothing recorded in between is missed.
    let bus = plane.store.bus().subscribe();
    query.after = match resume_from.or(given_after) {
        Some(seq) => seq,
        None => plane.store.last_event_seq().await?,
    };
    query.limit = STREAM_PAGE;
    let follower = crate::events::Follower::new(plane.store.clone(), query, bus);
    let stream = futures_util::stream::unfold(follower, |mut follower| async move {
        let row = follower.next().await?;
        let event = SseEvent::default()
            .id(row.seq.to_string())
            .event(row.kind.clone())
            .json_data(event_body(row))
            .unwrap_or_else(|_| SseEvent::default().comment("an event that is not JSON"));
        Some((Ok::<_, std::convert::Infallible>(event), follower))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
