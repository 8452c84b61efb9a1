//! The sandbox routes: create, list (v1 and v2, filters, pages), get, kill, timeout, refreshes,
//! pause, connect, resume, network, metrics.

use super::*;

#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::NewSandbox,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retried create with the same key gets the sandbox the first one made")),
    responses(
        (status = 201, description = "The sandbox runs", body = wrenn_api::Sandbox),
        (status = 400, description = "A bad body or a setting wrenn does not enforce", body = wrenn_api::Error),
        (status = 403, description = "An extension's hook refused it (the reason in the message)", body = wrenn_api::Error),
        (status = 404, description = "No host has the template", body = wrenn_api::Error),
        (status = 429, description = "A team quota is reached, or the key's create rate (then with Retry-After)", body = wrenn_api::Error),
        (status = 503, description = "No host has room now", body = wrenn_api::Error),
    ))]
pub(super) async fn create_sandbox(
    TeamCall { plane, team, .. }: TeamCall,
    caller: Caller,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let handler_started = std::time::Instant::now();
    if let Err(wait) = plane.create_limit.take(&caller.actor()) {
        return Ok(rate_limited(wait, "sandbox creates"));
    }
    let request: wrenn_api::NewSandbox = checked_body(&body, crate::unsupported::check_create)?;
    // A retried create (same Idempotency-Key) gets the sandbox the first one made.
    let idempotency_key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|key| !key.is_empty() && key.len() <= 200)
        .map(str::to_string);
    let template = request
        .template_id
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("templateID is required"))?;
    let asked = crate::service::SandboxRequest {
        template,
        timeout_seconds: check_timeout(request.timeout.unwrap_or(15))?,
        // The SDKs since 2.x send no `secure` (E2B: "Ignored. All system communication with the
        // sandbox is always secured"): an absent `secure` is a secured sandbox, with an envd
        // access token. An explicit `false` (older SDKs, `wrenn sandbox create` without
        // `--secure`) still makes one without.
        secure: request.secure.unwrap_or(true),
        public_traffic: request
            .network
            .as_ref()
            .and_then(|n| n.allow_public_traffic)
            .unwrap_or(true),
        allow_internet: request.allow_internet_access.unwrap_or(true),
        metadata: request.metadata.unwrap_or_default(),
        env_vars: request.env_vars.unwrap_or_default(),
        auto_pause: request.auto_pause.unwrap_or(false),
        auto_pause_memory: request.auto_pause_memory.unwrap_or(true),
        auto_resume: request.auto_resume.and_then(|a| a.enabled).unwrap_or(false),
        network: request
            .network
            .map(|network| crate::store::StoredNetwork {
                egress: network.egress,
                mask_request_host: network.mask_request_host.filter(|mask| !mask.is_empty()),
                allow_internet: None,
            })
            .unwrap_or_default(),
    };
    if !asked.auto_pause_memory && asked.auto_resume {
        return Err(ApiError::bad_request(
            "autoResume cannot be combined with autoPauseMemory false: a sandbox paused without \
             its memory is resumed by an explicit connect or resume, never by traffic",
        ));
    }
    let crate::service::Created {
        row,
        agent_time,
        pull_time,
    } = match plane
        .create_once(&team.0, idempotency_key.as_deref(), asked)
        .await?
    {
        crate::service::CreatedOnce::Made(created) => created,
        crate::service::CreatedOnce::Earlier(row) => {
            return Ok(
                (StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response(),
            );
        }
    };
    let id = row.id.clone();
    let mut response =
        (StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response();
    // The agent's share of the create (and of that, the template's pull from the store) and
    // the handler's whole time, for `wrenn bench api`.
    let timing = format!(
        "agent;dur={:.3}, pull;dur={:.3}, total;dur={:.3}",
        agent_time.as_secs_f64() * 1000.0,
        pull_time.as_secs_f64() * 1000.0,
        handler_started.elapsed().as_secs_f64() * 1000.0
    );
    if let Ok(value) = HeaderValue::from_str(&timing) {
        response.headers_mut().insert("server-timing", value);
    }
    response
        .extensions_mut()
        .insert(AuditResource(format!("/sandboxes/{id}")));
    Ok(response)
}

/// Parses E2B's metadata filter: the whole value URL-decoded, split on `&` and `=`, and each
/// key and value URL-decoded again.
pub fn parse_metadata_filter(raw: &str) -> BTreeMap<String, String> {
    decode_query_text(raw)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (decode_query_text(key), decode_query_text(value)))
        .collect()
}

/// A query string's text decoded (`+` is a space, then percent-escapes).
pub(super) fn decode_query_text(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListParams {
    metadata: Option<String>,
    state: Option<String>,
    order: Option<String>,
    started_after: Option<String>,
    template: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

pub(super) fn encode_token(row: &SandboxRow) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{}", row.started_at_ms, row.id))
}

pub(super) fn decode_token(token: &str) -> Result<(i64, String), ApiError> {
    use base64::Engine;
    let invalid = || ApiError::bad_request("invalid nextToken");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (started, id) = text.split_once(':').ok_or_else(invalid)?;
    Ok((started.parse().map_err(|_| invalid())?, id.to_string()))
}

#[utoipa::path(get, path = "/v2/sandboxes", tag = "sandboxes", security(("api_key" = [])),
    params(
        ("metadata" = Option<String>, Query, description = "URL-encoded key=value pairs every listed sandbox has"),
        ("state" = Option<Vec<wrenn_api::SandboxState>>, Query, description = "Comma-separated states (default running,paused)"),
        ("limit" = Option<usize>, Query, description = "Page size (default 100, at most 100)"),
        ("nextToken" = Option<String>, Query, description = "The X-Next-Token of the previous page"),
        ("order" = Option<String>, Query, description = "asc or desc by start time (default desc)"),
        ("startedAfter" = Option<String>, Query, description = "RFC 3339: sandboxes started at or after it"),
        ("template" = Option<String>, Query, description = "Only sandboxes of this template"),
    ),
    responses(
        (status = 200, description = "A page of the team's sandboxes", body = Vec<wrenn_api::ListedSandbox>,
            headers(("X-Next-Token" = String, description = "The next page's token, when there is one"))),
        (status = 400, description = "A bad filter or token", body = wrenn_api::Error),
    ))]
pub(super) async fn list_v2(
    TeamCall { plane, team, .. }: TeamCall,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 100"));
    }
    let states: Vec<SandboxState> = params
        .state
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|name| match SandboxState::from_name(name) {
                    Some(state @ (SandboxState::Running | SandboxState::Paused)) => Ok(state),
                    _ => Err(ApiError::bad_request(format!(
                        "unknown state {name:?}: use running or paused"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_else(|| vec![SandboxState::Running, SandboxState::Paused]);
    let started_after_ms = match params.started_after.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|_| ApiError::bad_request("startedAfter must be RFC 3339"))?
                .timestamp_millis(),
        ),
    };
    // E2B lists newest first unless asked otherwise.
    let descending = match params.order.as_deref() {
        None | Some("") | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "order must be asc or desc, not {other:?}"
            )));
        }
    };
    let query = ListQuery {
        team_id: team.0,
        states,
        metadata: params
            .metadata
            .as_deref()
            .map(parse_metadata_filter)
            .unwrap_or_default(),
        template_id: params.template.filter(|t| !t.is_empty()),
        started_after_ms,
        descending,
        limit: limit + 1,
        after: params
            .next_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(decode_token)
            .transpose()?,
    };
    let (mut rows, total_running) = plane.store.list(query).await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let body: Vec<wrenn_api::ListedSandbox> =
        rows.iter().map(|row| listed_body(&plane, row)).collect();
    let mut response = axum::Json(body).into_response();
    let headers = response.headers_mut();
    if more && let Some(last) = rows.last() {
        headers.insert(
            "x-next-token",
            HeaderValue::from_str(&encode_token(last)).expect("base64 is a header value"),
        );
    }
    headers.insert("x-total-running", HeaderValue::from(total_running));
    Ok(response)
}

#[utoipa::path(get, path = "/sandboxes", tag = "sandboxes", security(("api_key" = [])),
    params(("metadata" = Option<String>, Query, description = "URL-encoded key=value pairs every listed sandbox has")),
    responses(
        (status = 200, description = "The team's running sandboxes", body = Vec<wrenn_api::ListedSandbox>),
    ))]
pub(super) async fn list_v1(
    TeamCall { plane, team, .. }: TeamCall,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let query = ListQuery {
        team_id: team.0,
        states: vec![SandboxState::Running],
        metadata: params
            .metadata
            .as_deref()
            .map(parse_metadata_filter)
            .unwrap_or_default(),
        limit: 10_000,
        ..ListQuery::default()
    };
    let (rows, _) = plane.store.list(query).await?;
    Ok(axum::Json(
        rows.iter()
            .map(|row| listed_body(&plane, row))
            .collect::<Vec<_>>(),
    )
    .into_response())
}

#[utoipa::path(get, path = "/sandboxes/{id}", tag = "sandboxes", security(("api_key" = [])),
    responses(
        (status = 200, description = "The sandbox", body = wrenn_api::SandboxDetail),
    ))]
pub(super) async fn get_sandbox(
    SandboxCall { plane, team, id }: SandboxCall,
) -> Result<Response, ApiError> {
    let row = owned(&plane, &team, &id).await?;
    Ok(axum::Json(detail_body(&plane, &row)).into_response())
}

#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "sandboxes", security(("api_key" = [])),
    responses(
        (status = 204, description = "Killed: its VM, disk and snapshot are gone"),
    ))]
pub(super) async fn kill_sandbox(
    SandboxCall { plane, team, id }: SandboxCall,
) -> Result<Response, ApiError> {
    let _turn = plane.turn(id.split('-').next().unwrap_or(&id)).await?;
    let row = owned_any(&plane, &team, &id).await?;
    plane.kill(&row).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/timeout", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::TimeoutRequest,
    responses(
        (status = 204, description = "The sandbox ends `timeout` seconds from now"),
        (status = 400, description = "No timeout, or more than 24 hours", body = wrenn_api::Error),
    ))]
pub(super) async fn set_timeout(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: wrenn_api::TimeoutRequest = body_json(&body)?;
    let timeout = check_timeout(
        body.timeout
            .ok_or_else(|| ApiError::bad_request("timeout is required"))?,
    )?;
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    plane
        .store
        .set_state(&row.id, row.state, now_ms() + timeout as i64 * 1000)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/refreshes", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::RefreshRequest,
    responses(
        (status = 204, description = "The sandbox lives `duration` more seconds"),
        (status = 400, description = "More than 24 hours", body = wrenn_api::Error),
    ))]
pub(super) async fn refresh(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: wrenn_api::RefreshRequest = body_json(&body)?;
    let duration = body.duration.unwrap_or(15);
    if duration > 3600 {
        return Err(ApiError::bad_request("duration must be 0 to 3600 seconds"));
    }
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    let end = row.end_at_ms.max(now_ms() + duration as i64 * 1000);
    plane.store.set_state(&row.id, row.state, end).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/pause", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::PauseRequest,
    responses(
        (status = 204, description = "Paused: memory, processes and files kept (with memory false, the files alone)"),
        (status = 409, description = "Already paused", body = wrenn_api::Error),
    ))]
pub(super) async fn pause(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: wrenn_api::PauseRequest = body_json(&body)?;
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    if row.state == SandboxState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox \"{}\" is already paused", row.id),
        ));
    }
    plane.pause(&row, request.memory.unwrap_or(true)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/connect", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::TimeoutRequest,
    responses(
        (status = 200, description = "It was running: its timeout is at least `timeout` from now", body = wrenn_api::Sandbox),
        (status = 201, description = "It was paused: resumed", body = wrenn_api::Sandbox),
    ))]
pub(super) async fn connect(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (body, timeout) = wake_request(&body)?;
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    let end = now_ms() + timeout as i64 * 1000;
    if row.state == SandboxState::Running {
        let end = end.max(row.end_at_ms);
        plane
            .store
            .set_state(&row.id, SandboxState::Running, end)
            .await?;
        return Ok((StatusCode::OK, axum::Json(sandbox_body(&plane, &row))).into_response());
    }
    let from_disk = body.memory == Some(false);
    let row = plane.resume(&row, end, None, from_disk).await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/resume", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::TimeoutRequest,
    responses(
        (status = 201, description = "Resumed", body = wrenn_api::Sandbox),
        (status = 409, description = "Not paused", body = wrenn_api::Error),
    ))]
pub(super) async fn resume(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (body, timeout) = wake_request(&body)?;
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    if row.state == SandboxState::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox \"{}\" is already running", row.id),
        ));
    }
    let from_disk = body.memory == Some(false);
    let row = plane
        .resume(
            &row,
            now_ms() + timeout as i64 * 1000,
            body.auto_pause,
            from_disk,
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response())
}

/// `PUT /sandboxes/{id}/network`: replaces the sandbox's egress rules, all of them (a field
/// left out is cleared). A running sandbox gets them at once and loses the connections they
/// now forbid; a paused one gets them at its resume.
#[utoipa::path(put, path = "/sandboxes/{id}/network", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::NetworkUpdate,
    responses(
        (status = 204, description = "The rules are in force (or will be at the resume)"),
        (status = 400, description = "A bad rule (the message names it), or one wrenn does not enforce", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
        (status = 409, description = "The sandbox is changing state", body = wrenn_api::Error),
    ))]
pub(super) async fn update_network(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let update: wrenn_api::NetworkUpdate =
        checked_body(&body, crate::unsupported::check_network_update)?;
    plane
        .update_network(
            &team.0,
            &id,
            update.allow_internet_access.unwrap_or(true),
            update.egress,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The decoded `key=value` pairs of a query string (a bare `key` has an empty value).
pub(super) fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_query_text(key), decode_query_text(value))
        })
        .collect()
}

/// One E2B `SandboxMetric` read from a running sandbox's envd now, or `None` when it does
/// not run or does not answer within 5 s.
pub(super) async fn live_metric(
    plane: &ControlPlane,
    row: &SandboxRow,
) -> Option<wrenn_api::SandboxMetric> {
    if row.state != SandboxState::Running {
        return None;
    }
    let (route, _) = plane
        .fleet
        .route(&plane.store, &row.id, wrenn_proto::ENVD_PORT)
        .await?;
    let m = envd_metrics(
        &route,
        row.envd_access_token.as_deref(),
        Duration::from_secs(5),
    )
    .await?;
    let now = chrono::Utc::now();
    let count = |key: &str| m.get(key).and_then(Value::as_u64).unwrap_or(0);
    Some(wrenn_api::SandboxMetric {
        timestamp: now.to_rfc3339(),
        timestamp_unix: now.timestamp(),
        cpu_count: m
            .get("cpu_count")
            .and_then(Value::as_u64)
            .unwrap_or(u64::from(row.cpu_count)),
        cpu_used_pct: m.get("cpu_used_pct").and_then(Value::as_f64).unwrap_or(0.0),
        mem_used: count("mem_used"),
        mem_total: count("mem_total"),
        mem_cache: count("mem_cache"),
        disk_used: count("disk_used"),
        disk_total: count("disk_total"),
        net_rx_bytes: None,
        net_tx_bytes: None,
    })
}

/// The most the control plane reads of a guest's `/metrics` answer.
pub const MAX_METRICS_ANSWER: usize = 64 * 1024;

/// envd's `/metrics` of a guest, if it answers.
pub async fn envd_metrics(
    route: &wrenn_agent_api::GuestRoute,
    token: Option<&str>,
    timeout: Duration,
) -> Option<serde_json::Value> {
    use http_body_util::BodyExt;
    let attempt = async {
        let mut request = http::Request::get("/metrics").header("host", "envd");
        if let Some(token) = token {
            request = request.header("x-access-token", token);
        }
        let response = route
            .forward(
                request.body(axum::body::Body::empty()).ok()?,
                crate::deadlines::PROXY_RESPONSE,
            )
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        // The guest's root can serve anything here: read at most 64 KiB of it.
        let body = http_body_util::Limited::new(response.into_body(), MAX_METRICS_ANSWER)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_filters_are_decoded_twice() {
        // The SDK sends urlencode({quote(k): quote(v)}).
        let raw = "user%3Dalice%2520b%26team%3Dx%2526y";
        let parsed = parse_metadata_filter(raw);
        assert_eq!(parsed.get("user").map(String::as_str), Some("alice b"));
        assert_eq!(parsed.get("team").map(String::as_str), Some("x&y"));
    }

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let row = SandboxRow {
            id: "abc".into(),
            team_id: "t".into(),
            template_id: "base".into(),
            alias: None,
            state: SandboxState::Running,
            started_at_ms: 42,
            end_at_ms: 0,
            ..SandboxRow::default()
        };
        assert_eq!(
            decode_token(&encode_token(&row)).unwrap(),
            (42, "abc".to_string())
        );
        assert!(decode_token("!!!").is_err());
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A guest whose envd answers `/metrics` with a JSON body that never ends.
    async fn endless_metrics() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                    if stream.write_all(head).await.is_err() {
                        return;
                    }
                    let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
                    chunk.extend(std::iter::repeat_n(b' ', 64 * 1024));
                    chunk.extend_from_slice(b"\r\n");
                    while stream.write_all(&chunk).await.is_ok() {}
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn an_endless_metrics_answer_is_cut_at_the_cap() {
        let route = wrenn_agent_api::GuestRoute::Direct {
            address: endless_metrics().await,
            ends: tokio_util::sync::CancellationToken::new(),
        };
        let started = std::time::Instant::now();
        let metrics = envd_metrics(&route, None, Duration::from_secs(20)).await;
        assert!(metrics.is_none());
        // Cut at 64 KiB, not at the deadline (which an unbounded read would have reached,
        // holding everything it read).
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}

/// The body of a connect or a resume, and its timeout (15 s by default): how long the sandbox
/// lives from now.
fn wake_request(body: &[u8]) -> Result<(wrenn_api::TimeoutRequest, u64), ApiError> {
    let body: wrenn_api::TimeoutRequest = body_json(body)?;
    let timeout = check_timeout(body.timeout.unwrap_or(15))?;
    Ok((body, timeout))
}
