//! The E2B-compatible REST API (`e2b-compat.md` §2): sandboxes (create, list v1 and v2 with
//! filters and pagination, get, kill, timeout, refreshes, pause, connect, resume, metrics) and
//! templates, with E2B's field names, status codes and `{code, message}` error bodies. Every
//! call needs `X-API-KEY`; a team sees only its own sandboxes (another team's are 404).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use wrenn_agent_api::CreateOptions;
use wrenn_agent_api::join::{HostReport, RegisterRequest};

use crate::ControlPlane;
use crate::auth;
use crate::store::{ListQuery, SandboxRow, SandboxState, StoreError};

/// E2B's constant client id, which the Python SDK requires in every `Sandbox`.
pub const CLIENT_ID: &str = "6532622b";
/// The longest timeout a sandbox may have.
pub const MAX_TIMEOUT_SECONDS: u64 = 24 * 3600;

/// An API error: its status and message, as `{code, message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Sent as `Should-Retry` (the SDKs retry a 429, 502, 503 or 504 unless told not to).
    should_retry: Option<bool>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            should_retry: None,
        }
    }
    /// Tells clients that trying again will not help (a limit, not a passing state).
    pub fn final_answer(mut self) -> Self {
        self.should_retry = Some(false);
        self
    }
    fn not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("sandbox \"{id}\" not found"))
    }
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = wrenn_api::Error {
            code: self.status.as_u16(),
            message: self.message,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(retry) = self.should_retry {
            response.headers_mut().insert(
                "should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        response
    }
}

/// The one place a cause becomes a status code.
impl From<crate::Error> for ApiError {
    fn from(error: crate::Error) -> Self {
        use crate::Error as E;
        use wrenn_agent_api::HostAgentError as H;
        let status = match &error {
            E::SandboxNotFound(_) | E::TemplateNotFound(_) | E::HostNotFound(_) => {
                StatusCode::NOT_FOUND
            }
            E::InvalidRequest(_) | E::Unsupported(_) => StatusCode::BAD_REQUEST,
            E::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            E::Forbidden(_) => StatusCode::FORBIDDEN,
            E::Conflict(_) => StatusCode::CONFLICT,
            // A quota holds until the team frees something: retrying does not help.
            E::QuotaExceeded(_) => {
                return Self::new(StatusCode::TOO_MANY_REQUESTS, error.to_string()).final_answer();
            }
            E::NoCapacity(_) | E::HostDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            E::Host { source, .. } => match source {
                H::NotFound(_) => StatusCode::NOT_FOUND,
                H::InvalidArgument(_) => StatusCode::BAD_REQUEST,
                H::Conflict(_) => StatusCode::CONFLICT,
                H::NoCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
                H::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
                H::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            E::HostTimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
            // The store's own words go to the log, not to a caller.
            E::Store(cause) => {
                tracing::error!(error = %cause, "store failure");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            E::NoRandomness(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        crate::Error::from(error).into()
    }
}

impl From<crate::quota::QuotaExceeded> for ApiError {
    fn from(exceeded: crate::quota::QuotaExceeded) -> Self {
        crate::Error::from(exceeded).into()
    }
}

impl From<crate::unsupported::Unsupported> for ApiError {
    fn from(refused: crate::unsupported::Unsupported) -> Self {
        crate::Error::from(refused).into()
    }
}

impl From<crate::auth::NoRandomness> for ApiError {
    fn from(error: crate::auth::NoRandomness) -> Self {
        crate::Error::from(error).into()
    }
}

/// The caller's team, set by the key check.
#[derive(Debug, Clone)]
struct TeamId(String);

/// The API's routes.
pub fn router(plane: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_v1))
        .route("/v2/sandboxes", get(list_v2).post(create_sandbox_v2))
        .route("/v2/sandboxes/{id}/connect", post(connect_v2))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/metrics", get(metrics_of_many))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(update_network),
        )
        .route("/templates", get(list_templates))
        .route("/templates/aliases/{alias}", get(template_alias))
        .route("/hosts", get(list_hosts))
        .route("/hosts/{name}", axum::routing::delete(forget_host))
        .layer(middleware::from_fn_with_state(plane.clone(), require_key))
        .route("/hosts/register", post(register_host))
        .route("/hosts/{id}/heartbeat", post(host_heartbeat))
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_document))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(plane)
}

/// `POST /v2/sandboxes`: the same as `POST /sandboxes` (the SDKs' newer path).
#[utoipa::path(post, path = "/v2/sandboxes", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::NewSandbox,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retried create with the same key gets the sandbox the first one made")),
    responses(
        (status = 201, description = "The sandbox runs", body = wrenn_api::Sandbox),
        (status = 400, description = "A bad body or a setting wrenn does not enforce", body = wrenn_api::Error),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No host has the template", body = wrenn_api::Error),
        (status = 429, description = "A team quota is reached", body = wrenn_api::Error),
        (status = 503, description = "No host has room now", body = wrenn_api::Error),
    ))]
async fn create_sandbox_v2(
    state: State<Arc<ControlPlane>>,
    team: axum::Extension<TeamId>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    create_sandbox(state, team, headers, body).await
}

/// `POST /v2/sandboxes/{id}/connect`: the same as `POST /sandboxes/{id}/connect`.
#[utoipa::path(post, path = "/v2/sandboxes/{id}/connect", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = wrenn_api::TimeoutRequest,
    responses(
        (status = 200, description = "It was running: its timeout is at least `timeout` from now", body = wrenn_api::Sandbox),
        (status = 201, description = "It was paused: resumed", body = wrenn_api::Sandbox),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn connect_v2(
    state: State<Arc<ControlPlane>>,
    team: axum::Extension<TeamId>,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    connect(state, team, id, body).await
}

/// `GET /health`: 204 while the control plane serves.
#[utoipa::path(get, path = "/health", tag = "service", responses((status = 204, description = "Serving")))]
async fn health() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `GET /openapi.json`: this API's OpenAPI document (the same as `docs/openapi.json`).
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
async fn openapi_document() -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}

/// A path wrenn does not serve: 404 saying so (not "sandbox not found", which the SDKs
/// read into a 404 of a sandbox route).
async fn unknown_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such route: {method} {} is not part of this API",
            uri.path()
        ),
    )
}

/// A path wrenn serves, with a method it does not take: 405.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn require_key(
    State(plane): State<Arc<ControlPlane>>,
    mut request: Request,
    next: Next,
) -> Response {
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(key) = key else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing X-API-KEY header").into_response();
    };
    match plane.store.team_of_key(&auth::hash_key(&key)).await {
        Ok(Some(team)) => {
            request.extensions_mut().insert(TeamId(team));
            next.run(request).await
        }
        Ok(None) => ApiError::new(StatusCode::UNAUTHORIZED, "Invalid API key").into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

use wrenn_core::now_ms;

/// The `Sandbox` answer of create, connect and resume.
fn sandbox_body(plane: &ControlPlane, row: &SandboxRow) -> wrenn_api::Sandbox {
    wrenn_api::Sandbox {
        template_id: row.template_id.clone(),
        sandbox_id: row.id.clone(),
        client_id: CLIENT_ID.into(),
        envd_version: row.envd_version.clone(),
        traffic_access_token: row.traffic_access_token.clone(),
        domain: plane.domain.clone(),
        alias: row.alias.clone(),
        envd_access_token: row.envd_access_token.clone(),
    }
}

/// A row as `ListedSandbox`.
fn listed_body(plane: &ControlPlane, row: &SandboxRow) -> wrenn_api::ListedSandbox {
    wrenn_api::ListedSandbox {
        template_id: row.template_id.clone(),
        sandbox_id: row.id.clone(),
        client_id: CLIENT_ID.into(),
        started_at: rfc3339(row.started_at_ms),
        end_at: rfc3339(row.end_at_ms),
        cpu_count: row.cpu_count,
        memory_mb: row.memory_mb,
        disk_size_mb: disk_size_mb(plane, &row.template_id),
        state: row.state,
        envd_version: row.envd_version.clone(),
        metadata: row.metadata.clone(),
        volume_mounts: Vec::new(),
        alias: row.alias.clone(),
    }
}

/// A row as `SandboxDetail`.
fn detail_body(plane: &ControlPlane, row: &SandboxRow) -> wrenn_api::SandboxDetail {
    wrenn_api::SandboxDetail {
        listed: listed_body(plane, row),
        allow_internet_access: row.allow_internet,
        lifecycle: wrenn_api::Lifecycle {
            auto_resume: row.auto_resume,
            on_timeout: if row.auto_pause { "pause" } else { "kill" }.into(),
        },
        network: wrenn_api::SandboxNetwork {
            allow_public_traffic: row.traffic_access_token.is_none(),
        },
        envd_access_token: row.envd_access_token.clone(),
        domain: plane.domain.clone(),
    }
}

fn disk_size_mb(plane: &ControlPlane, template_id: &str) -> u64 {
    plane
        .fleet
        .templates()
        .iter()
        .find(|t| t.template_id == template_id)
        .map(|t| t.disk_size_mb)
        .unwrap_or(0)
}

/// A sandbox of the caller's team (the legacy `<id>-<clientID>` form accepted), running or
/// paused: a lost one (its host went down) is not found, with the reason.
async fn owned(plane: &ControlPlane, team: &TeamId, id: &str) -> Result<SandboxRow, ApiError> {
    let row = owned_any(plane, team, id).await?;
    if row.state == SandboxState::Lost {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "sandbox \"{}\" was lost: its host stopped answering (kill it to forget it)",
                row.id
            ),
        ));
    }
    Ok(row)
}

/// A sandbox of the caller's team (not lost), read in its turn of
/// [`ControlPlane::changes`]: hold the turn while changing its state.
async fn owned_in_turn(
    plane: &ControlPlane,
    team: &TeamId,
    id: &str,
) -> Result<(crate::busy::Turn, SandboxRow), ApiError> {
    let turn = plane.changes.turn(id.split('-').next().unwrap_or(id)).await;
    Ok((turn, owned(plane, team, id).await?))
}

/// A sandbox of the caller's team in any state, lost included.
async fn owned_any(plane: &ControlPlane, team: &TeamId, id: &str) -> Result<SandboxRow, ApiError> {
    let id = id.split('-').next().unwrap_or(id);
    match plane.store.sandbox(id).await? {
        Some(row) if row.team_id == team.0 => Ok(row),
        _ => Err(ApiError::not_found(id)),
    }
}

fn body_json<T: for<'de> Deserialize<'de> + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {error}"),
        )
    })
}

/// A body as a JSON value (`{}` when empty), for the checks of [`crate::unsupported`].
fn body_value(bytes: &[u8]) -> Result<Value, ApiError> {
    body_json::<Option<Value>>(bytes).map(|value| value.unwrap_or_else(|| json!({})))
}

/// A body read first as a value, checked by `check`, then as `T`.
fn checked_body<T: for<'de> Deserialize<'de> + Default>(
    bytes: &[u8],
    check: impl FnOnce(&Value) -> Result<(), crate::unsupported::Unsupported>,
) -> Result<T, ApiError> {
    let value = body_value(bytes)?;
    check(&value)?;
    serde_json::from_value(value).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {error}"),
        )
    })
}

fn check_timeout(seconds: u64) -> Result<u64, ApiError> {
    if seconds > MAX_TIMEOUT_SECONDS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "Timeout cannot be greater than 24 hours",
        ));
    }
    Ok(seconds)
}

#[utoipa::path(post, path = "/sandboxes", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::NewSandbox,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retried create with the same key gets the sandbox the first one made")),
    responses(
        (status = 201, description = "The sandbox runs", body = wrenn_api::Sandbox),
        (status = 400, description = "A bad body or a setting wrenn does not enforce", body = wrenn_api::Error),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No host has the template", body = wrenn_api::Error),
        (status = 429, description = "A team quota is reached", body = wrenn_api::Error),
        (status = 503, description = "No host has room now", body = wrenn_api::Error),
    ))]
async fn create_sandbox(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let handler_started = std::time::Instant::now();
    let request: wrenn_api::NewSandbox = checked_body(&body, crate::unsupported::check_create)?;
    // A retried create (same Idempotency-Key) gets the sandbox the first one made.
    let idempotency = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|key| !key.is_empty() && key.len() <= 200)
        .map(|key| (team.0.clone(), key.to_string()));
    if let Some(key) = &idempotency {
        let existing = plane
            .idempotency
            .lock()
            .expect("idempotency lock")
            .get(key)
            .cloned();
        if let Some(id) = existing
            && let Some(row) = plane.store.sandbox(&id).await?
        {
            return Ok(
                (StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response(),
            );
        }
    }
    let requested = request
        .template_id
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "templateID is required"))?;
    let timeout = check_timeout(request.timeout.unwrap_or(15))?;
    let id = auth::random_id(20)?;
    let secure = request.secure.unwrap_or(false);
    let public_traffic = request
        .network
        .as_ref()
        .and_then(|n| n.allow_public_traffic)
        .unwrap_or(true);
    if !public_traffic && !secure {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a sandbox without public traffic must be secure (secure: true)",
        ));
    }
    let token = secure.then(auth::random_token).transpose()?;
    let traffic_access_token = (!public_traffic).then(auth::random_token).transpose()?;
    let allow_internet = request.allow_internet_access.unwrap_or(true) && plane.internet;
    let metadata = request.metadata.unwrap_or_default();
    let env_vars = request.env_vars.unwrap_or_default();
    // Counted against the team's quotas until its row is written (or the create fails).
    let disk_mib = plane.fleet.template_disk_mib(&requested);
    let admitted = plane
        .admit(&team.0, crate::quota::Change::Create { disk_mib })
        .await?;
    // On a host before it is in the store: reconcile must not take it for an orphan.
    let _creating = plane.fleet.creating(&id);
    // A host that cannot take it (full, or not answering) passes it to the next one.
    let mut excluded = Vec::new();
    let mut agent_time = Duration::ZERO;
    let placed = loop {
        let placed = plane.fleet.place(&requested, &excluded)?;
        let options = CreateOptions {
            template_id: placed.template.template_id.clone(),
            sandbox_id: Some(id.clone()),
            env_vars: env_vars.clone(),
            access_token: token.clone(),
            allow_internet,
            metadata: metadata.clone(),
            ready_timeout: None,
            init_timeout: None,
        };
        let host = placed.host.row();
        let agent_started = std::time::Instant::now();
        let created = placed.host.create(options).await;
        agent_time += agent_started.elapsed();
        match created {
            Ok(()) => break placed,
            Err(
                error @ crate::Error::Host {
                    source: wrenn_agent_api::HostAgentError::NoCapacity(_),
                    ..
                },
            ) if excluded.len() < 2 => {
                tracing::warn!(host = %host.name, %error, "create failed on a host: trying another");
                excluded.push(host.id);
            }
            Err(error) => return Err(error.into()),
        }
    };
    plane.fleet.created(&placed);
    let template = &placed.template;
    let now = now_ms();
    let row = SandboxRow {
        id: id.clone(),
        team_id: team.0,
        template_id: template.template_id.clone(),
        alias: Some(template.template_id.clone()),
        state: SandboxState::Running,
        started_at_ms: now,
        end_at_ms: now + (timeout as i64) * 1000,
        metadata,
        envd_access_token: token,
        auto_pause: request.auto_pause.unwrap_or(false),
        allow_internet,
        cpu_count: template.vcpus,
        memory_mb: template.memory_mib,
        envd_version: template.envd_version.clone(),
        host_id: placed.host.id(),
        traffic_access_token,
        auto_resume: request.auto_resume.and_then(|a| a.enabled).unwrap_or(false),
    };
    if let Err(error) = admitted.settle(plane.store.put_sandbox(row.clone())).await {
        let _ = placed.host.destroy(&id).await;
        plane.fleet.forget(&id);
        return Err(error.into());
    }
    if let Some(key) = idempotency {
        let mut remembered = plane.idempotency.lock().expect("idempotency lock");
        if remembered.len() > 10_000 {
            remembered.clear();
        }
        remembered.insert(key, id.clone());
    }
    tracing::info!(sandbox = %id, template = %template.template_id, host = %row.host_id, "sandbox created");
    let mut response =
        (StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response();
    // The agent's share of the create and the handler's whole time, for `wrenn bench api`.
    let timing = format!(
        "agent;dur={:.3}, total;dur={:.3}",
        agent_time.as_secs_f64() * 1000.0,
        handler_started.elapsed().as_secs_f64() * 1000.0
    );
    if let Ok(value) = HeaderValue::from_str(&timing) {
        response.headers_mut().insert("server-timing", value);
    }
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
fn decode_query_text(text: &str) -> String {
    percent_encoding::percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListParams {
    metadata: Option<String>,
    state: Option<String>,
    order: Option<String>,
    started_after: Option<String>,
    template: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

fn encode_token(row: &SandboxRow) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}:{}", row.started_at_ms, row.id))
}

fn decode_token(token: &str) -> Result<(i64, String), ApiError> {
    use base64::Engine;
    let invalid = || ApiError::new(StatusCode::BAD_REQUEST, "invalid nextToken");
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
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
    ))]
async fn list_v2(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Query(params): Query<ListParams>,
) -> Result<Response, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 100",
        ));
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
                    _ => Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("unknown state {name:?}: use running or paused"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_else(|| vec![SandboxState::Running, SandboxState::Paused]);
    let started_after_ms = match params.started_after.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|_| {
                    ApiError::new(StatusCode::BAD_REQUEST, "startedAfter must be RFC 3339")
                })?
                .timestamp_millis(),
        ),
    };
    // E2B lists newest first unless asked otherwise.
    let descending = match params.order.as_deref() {
        None | Some("") | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("order must be asc or desc, not {other:?}"),
            ));
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
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
    ))]
async fn list_v1(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
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
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 200, description = "The sandbox", body = wrenn_api::SandboxDetail),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn get_sandbox(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = owned(&plane, &team, &id).await?;
    Ok(axum::Json(detail_body(&plane, &row)).into_response())
}

#[utoipa::path(delete, path = "/sandboxes/{id}", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Killed: its VM, disk and snapshot are gone"),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn kill_sandbox(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let _turn = plane
        .changes
        .turn(id.split('-').next().unwrap_or(&id))
        .await;
    let row = owned_any(&plane, &team, &id).await?;
    plane.kill(&row).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/timeout", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = wrenn_api::TimeoutRequest,
    responses(
        (status = 204, description = "The sandbox ends `timeout` seconds from now"),
        (status = 400, description = "No timeout, or more than 24 hours", body = wrenn_api::Error),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn set_timeout(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: wrenn_api::TimeoutRequest = body_json(&body)?;
    let timeout = check_timeout(
        body.timeout
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "timeout is required"))?,
    )?;
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    plane
        .store
        .set_state(&row.id, row.state, now_ms() + timeout as i64 * 1000)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/refreshes", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = wrenn_api::RefreshRequest,
    responses(
        (status = 204, description = "The sandbox lives `duration` more seconds"),
        (status = 400, description = "More than 24 hours", body = wrenn_api::Error),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn refresh(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: wrenn_api::RefreshRequest = body_json(&body)?;
    let duration = body.duration.unwrap_or(15);
    if duration > 3600 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "duration must be 0 to 3600 seconds",
        ));
    }
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    let end = row.end_at_ms.max(now_ms() + duration as i64 * 1000);
    plane.store.set_state(&row.id, row.state, end).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/pause", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 204, description = "Paused: memory, processes and files kept"),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
        (status = 409, description = "Already paused", body = wrenn_api::Error),
    ))]
async fn pause(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    crate::unsupported::check_memory(&body_value(&body)?)?;
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    if row.state == SandboxState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox \"{}\" is already paused", row.id),
        ));
    }
    plane.pause(&row).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/connect", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = wrenn_api::TimeoutRequest,
    responses(
        (status = 200, description = "It was running: its timeout is at least `timeout` from now", body = wrenn_api::Sandbox),
        (status = 201, description = "It was paused: resumed", body = wrenn_api::Sandbox),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn connect(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: wrenn_api::TimeoutRequest = checked_body(&body, crate::unsupported::check_memory)?;
    let timeout = check_timeout(body.timeout.unwrap_or(15))?;
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
    let row = plane.resume(&row, end, None).await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response())
}

#[utoipa::path(post, path = "/sandboxes/{id}/resume", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body = wrenn_api::TimeoutRequest,
    responses(
        (status = 201, description = "Resumed", body = wrenn_api::Sandbox),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
        (status = 409, description = "Not paused", body = wrenn_api::Error),
    ))]
async fn resume(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: wrenn_api::TimeoutRequest = checked_body(&body, crate::unsupported::check_memory)?;
    let timeout = check_timeout(body.timeout.unwrap_or(15))?;
    let (_turn, row) = owned_in_turn(&plane, &team, &id).await?;
    if row.state == SandboxState::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox \"{}\" is already running", row.id),
        ));
    }
    let row = plane
        .resume(&row, now_ms() + timeout as i64 * 1000, body.auto_pause)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(sandbox_body(&plane, &row))).into_response())
}

/// `PUT /sandboxes/{id}/network`: refused (400, naming the field), since a sandbox's network
/// is set at its create and never changed.
#[utoipa::path(put, path = "/sandboxes/{id}/network", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    request_body(content = Object, description = "E2B's network update"),
    responses(
        (status = 400, description = "wrenn does not change a running sandbox's network yet", body = wrenn_api::Error),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn update_network(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    owned(&plane, &team, &id).await?;
    Err(crate::unsupported::check_network_update(&body_value(&body)?).into())
}

#[utoipa::path(get, path = "/sandboxes/{id}/metrics", tag = "sandboxes", security(("api_key" = [])),
    params(("id" = String, Path, description = "The sandbox's id")),
    responses(
        (status = 200, description = "Its latest sample (none when it does not run)", body = Vec<wrenn_api::SandboxMetric>),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox of the team", body = wrenn_api::Error),
    ))]
async fn metrics(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = owned(&plane, &team, &id).await?;
    let samples: Vec<wrenn_api::SandboxMetric> =
        live_metric(&plane, &row).await.into_iter().collect();
    Ok(axum::Json(samples).into_response())
}

/// The most sandboxes one `GET /sandboxes/metrics` may name.
const MAX_METRICS_SANDBOXES: usize = 100;

/// `GET /sandboxes/metrics?sandbox_ids=a,b`: the latest sample of each named sandbox of the
/// caller's team that runs (`{"sandboxes": {id: SandboxMetric}}`); the others are left out.
#[utoipa::path(get, path = "/sandboxes/metrics", tag = "sandboxes", security(("api_key" = [])),
    params(("sandbox_ids" = String, Query, description = "Comma-separated sandbox ids, at most 100")),
    responses(
        (status = 200, description = "The latest sample of each that runs", body = wrenn_api::SandboxesMetrics),
        (status = 400, description = "No ids, or too many", body = wrenn_api::Error),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
    ))]
async fn metrics_of_many(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let mut ids: Vec<String> = Vec::new();
    for (key, value) in url_pairs(query.as_deref().unwrap_or("")) {
        if key == "sandbox_ids" || key == "sandboxIds" {
            ids.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|id| !id.is_empty())
                    .map(str::to_string),
            );
        }
    }
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "sandbox_ids is required: a comma-separated list of sandbox IDs",
        ));
    }
    if ids.len() > MAX_METRICS_SANDBOXES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "sandbox_ids names {} sandboxes; at most {MAX_METRICS_SANDBOXES} at once",
                ids.len()
            ),
        ));
    }
    let mut rows = Vec::new();
    for id in &ids {
        if let Ok(row) = owned(&plane, &team, id).await {
            rows.push(row);
        }
    }
    let samples =
        futures_util::future::join_all(rows.iter().map(|row| live_metric(&plane, row))).await;
    let sandboxes = rows
        .iter()
        .zip(samples)
        .filter_map(|(row, sample)| Some((row.id.clone(), sample?)))
        .collect();
    Ok(axum::Json(wrenn_api::SandboxesMetrics { sandboxes }).into_response())
}

/// The decoded `key=value` pairs of a query string (a bare `key` has an empty value).
fn url_pairs(query: &str) -> Vec<(String, String)> {
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
async fn live_metric(plane: &ControlPlane, row: &SandboxRow) -> Option<wrenn_api::SandboxMetric> {
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
    })
}

#[utoipa::path(get, path = "/templates", tag = "templates", security(("api_key" = [])),
    responses(
        (status = 200, description = "The templates up hosts have", body = Vec<wrenn_api::Template>),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
    ))]
async fn list_templates(State(plane): State<Arc<ControlPlane>>) -> Response {
    let templates: Vec<wrenn_api::Template> = plane
        .fleet
        .templates()
        .iter()
        .map(|t| wrenn_api::Template {
            template_id: t.template_id.clone(),
            build_id: t.image_key.get(..16).unwrap_or("").into(),
            cpu_count: t.vcpus,
            memory_mb: t.memory_mib,
            disk_size_mb: t.disk_size_mb,
            public: true,
            aliases: vec![t.template_id.clone()],
            names: vec![t.template_id.clone()],
            created_at: rfc3339(t.created_at_ms),
            updated_at: rfc3339(t.created_at_ms),
            last_spawned_at: None,
            spawn_count: 0,
            build_count: 1,
            envd_version: t.envd_version.clone(),
            build_status: "ready".into(),
        })
        .collect();
    axum::Json(templates).into_response()
}

#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = "templates", security(("api_key" = [])),
    params(("alias" = String, Path, description = "A template's alias")),
    responses(
        (status = 200, description = "The template", body = wrenn_api::TemplateAlias),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 404, description = "No such template", body = wrenn_api::Error),
    ))]
async fn template_alias(
    State(plane): State<Arc<ControlPlane>>,
    Path(alias): Path<String>,
) -> Result<Response, ApiError> {
    plane
        .fleet
        .templates()
        .iter()
        .find(|t| t.template_id == alias)
        .map(|t| {
            axum::Json(wrenn_api::TemplateAlias {
                template_id: t.template_id.clone(),
                public: true,
            })
            .into_response()
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("template alias '{alias}' not found"),
            )
        })
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// `POST /hosts/register`: an agent joins with the join token.
#[utoipa::path(post, path = "/hosts/register", tag = "hosts", security(("join_token" = [])),
    request_body(content = Object, description = "The agent's RegisterRequest (wrenn_agent_api::join)"),
    responses(
        (status = 200, description = "Registered: the agent's RegisterResponse", body = Object),
        (status = 400, description = "A bad name, URL or token", body = wrenn_api::Error),
        (status = 401, description = "No valid join token", body = wrenn_api::Error),
        (status = 409, description = "The name belongs to another host", body = wrenn_api::Error),
    ))]
async fn register_host(
    State(plane): State<Arc<ControlPlane>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // The token first: a stranger learns nothing of what a registration looks like.
    plane.fleet.check_join_token(bearer(&headers))?;
    let request: RegisterRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid registration: {error}"),
        )
    })?;
    let (answer, _) = plane
        .fleet
        .register(&plane.store, bearer(&headers), request)
        .await?;
    let _ = plane.reconcile_now.try_send(answer.host_id.clone());
    Ok(axum::Json(answer).into_response())
}

/// `POST /hosts/{id}/heartbeat`: a host's report, with its heartbeat token.
#[utoipa::path(post, path = "/hosts/{id}/heartbeat", tag = "hosts", security(("heartbeat_token" = [])),
    params(("id" = String, Path, description = "The host's id")),
    request_body(content = Object, description = "The host's HostReport (wrenn_agent_api::join)"),
    responses(
        (status = 204, description = "Taken"),
        (status = 401, description = "No valid heartbeat token: register again", body = wrenn_api::Error),
        (status = 404, description = "The host is not registered: register again", body = wrenn_api::Error),
    ))]
async fn host_heartbeat(
    State(plane): State<Arc<ControlPlane>>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let report: HostReport = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid report: {error}"))
    })?;
    let came_back = plane
        .fleet
        .heartbeat(&plane.store, &id, bearer(&headers), report)
        .await?;
    if came_back {
        let _ = plane.reconcile_now.try_send(id);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A 403 unless the caller's team is an admin.
async fn require_admin(plane: &ControlPlane, team: &TeamId) -> Result<(), ApiError> {
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
    params(("name" = String, Path, description = "The host's name")),
    responses(
        (status = 200, description = "Forgotten, with its sandboxes' rows", body = wrenn_api::ForgottenHost),
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 403, description = "The key's team is not an admin", body = wrenn_api::Error),
        (status = 404, description = "No such host", body = wrenn_api::Error),
        (status = 409, description = "The host is up", body = wrenn_api::Error),
    ))]
async fn forget_host(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
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
        (status = 401, description = "No valid API key", body = wrenn_api::Error),
        (status = 403, description = "The key's team is not an admin", body = wrenn_api::Error),
    ))]
async fn list_hosts(
    State(plane): State<Arc<ControlPlane>>,
    axum::Extension(team): axum::Extension<TeamId>,
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
