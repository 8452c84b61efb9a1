//! The control plane's HTTP edge: the E2B-compatible REST API (`e2b-compat.md` §2) with E2B's
//! field names, status codes and `{code, message}` error bodies, and wrenn's fleet routes. Every
//! call needs `X-API-KEY` (agents call the fleet registry, [`registry`], on the fleet's own
//! mutual-TLS listener: [`registry_router`]); a team sees only its own
//! sandboxes (another team's are 404). This module holds the router, [`ApiError`] (the one
//! place a cause of [`crate::Error`] becomes a status code), authentication and the bodies'
//! shared helpers; the handlers are in [`sandboxes`], [`snapshots`], [`templates`], [`hosts`] and
//! [`registry`], and the
//! OpenAPI document made from their annotations in [`openapi`].

mod audit;
mod channels;
mod events;
mod hosts;
mod keys;
pub mod openapi;
mod registry;
mod sandboxes;
mod snapshots;
mod telemetry;
mod templates;
mod users;

use audit::*;
use channels::*;
use events::*;
use hosts::*;
use keys::*;
use sandboxes::*;
pub use sandboxes::{MAX_METRICS_ANSWER, envd_metrics, parse_metadata_filter};
use snapshots::*;
use telemetry::*;
use templates::*;
use users::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

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
    /// Sent as `Retry-After` (seconds).
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            should_retry: None,
            retry_after: None,
        }
    }
    /// A request the API cannot take as it is (400).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    /// Tells clients when to try again (`Retry-After`, whole seconds, at least 1).
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        self
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
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
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
            E::SandboxNotFound(_)
            | E::TemplateNotFound(_)
            | E::HostNotFound(_)
            | E::KeyNotFound(_)
            | E::TeamNotFound(_)
            | E::ChannelNotFound(_)
            | E::TokenNotFound(_)
            | E::MemberNotFound(_) => StatusCode::NOT_FOUND,
            E::RateLimited { retry_after, .. } => {
                return Self::new(StatusCode::TOO_MANY_REQUESTS, error.to_string())
                    .retry_after(*retry_after);
            }
            E::InvalidRequest(_) | E::Unsupported(_) => StatusCode::BAD_REQUEST,
            E::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            E::Forbidden(_) | E::Refused(_) => StatusCode::FORBIDDEN,
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
            E::NoRandomness(_) | E::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
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

/// What a keyed route starts from: the control plane, the caller's team and `id`, what the
/// route's path names ([`PathId`]).
struct KeyedCall<Id> {
    plane: Arc<ControlPlane>,
    team: TeamId,
    id: Id,
}

/// What a keyed route starts from: the control plane and the caller's team.
type TeamCall = KeyedCall<()>;

/// What a `/sandboxes/{id}…` route starts from: [`TeamCall`] and the id in the path.
type SandboxCall = KeyedCall<String>;

/// What a keyed route's path names, read by [`KeyedCall`]: nothing (`()`), or one id (a path
/// that does not give one is a 400).
trait PathId: Sized {
    fn from_path(
        parts: &mut axum::http::request::Parts,
    ) -> impl Future<Output = Result<Self, ApiError>> + Send;
}

impl PathId for () {
    async fn from_path(_: &mut axum::http::request::Parts) -> Result<Self, ApiError> {
        Ok(())
    }
}

impl PathId for String {
    async fn from_path(parts: &mut axum::http::request::Parts) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, &())
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        Ok(id)
    }
}

impl PathId for (String, String) {
    async fn from_path(parts: &mut axum::http::request::Parts) -> Result<Self, ApiError> {
        let Path(ids) = Path::<(String, String)>::from_request_parts(parts, &())
            .await
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
        Ok(ids)
    }
}

impl<Id: PathId> FromRequestParts<Arc<ControlPlane>> for KeyedCall<Id> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        plane: &Arc<ControlPlane>,
    ) -> Result<Self, ApiError> {
        // `require_key` sets the team on every keyed route; its absence is a routing bug.
        let team = parts.extensions.get::<TeamId>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the route has no key check",
            )
        })?;
        let id = Id::from_path(parts).await?;
        Ok(KeyedCall {
            plane: plane.clone(),
            team,
            id,
        })
    }
}

/// The API's routes.
pub fn router(plane: Arc<ControlPlane>) -> Router {
    router_with(plane, Vec::new())
}

/// The fleet registry alone (`wrenn.agent.v1.HostRegistry`), for the fleet's TLS listener,
/// which gives each request the [`crate::fleet::FleetPeer`] its connection's certificate names.
pub fn registry_router(plane: Arc<ControlPlane>) -> Router {
    registry::router().fallback(unknown_route).with_state(plane)
}

/// The API's routes and, under `/ext/<name>`, each extension's (`crate::server`), behind the
/// same key check and audit log.
pub fn router_with(
    plane: Arc<ControlPlane>,
    extensions: Vec<(String, Router<Arc<ControlPlane>>)>,
) -> Router {
    let mut keyed = Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_v1))
        .route("/v2/sandboxes", get(list_v2).post(create_sandbox))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/logs", get(logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(logs_v2))
        .route("/v1/usage", get(usage))
        .route("/sandboxes/{id}/snapshots", post(create_snapshot))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/snapshots", get(list_snapshots))
        .route("/sandboxes/metrics", get(metrics_of_many))
        .route(
            "/sandboxes/{id}/network",
            axum::routing::put(update_network),
        )
        .route("/templates", get(list_templates))
        .route("/v3/templates", post(request_build))
        .route("/templates/tags", post(assign_tags).delete(remove_tags))
        .route("/templates/{template_id}/tags", get(template_tags))
        .route("/templates/{template_id}/files/{hash}", get(template_files))
        .route(
            "/templates/{template_id}",
            axum::routing::delete(delete_template),
        )
        .route(
            "/v2/templates/{template_id}/builds/{build_id}",
            post(start_build),
        )
        .route(
            "/templates/{template_id}/builds/{build_id}/status",
            get(build_status),
        )
        .route("/templates/aliases/{alias}", get(template_alias))
        .route("/hosts", get(list_hosts))
        .route("/api-keys", get(list_keys).post(create_key))
        .route(
            "/api-keys/{api_key_id}",
            axum::routing::patch(rename_key).delete(revoke_key),
        )
        .route("/teams", get(list_teams))
        .route("/v1/events", get(list_events))
        .route("/v1/events/stream", get(stream_events))
        .route("/v1/audit", get(list_audit))
        .route("/v1/channels", get(list_channels).post(create_channel))
        .route(
            "/v1/channels/{channel_id}",
            get(get_channel)
                .patch(update_channel)
                .delete(delete_channel),
        )
        .route("/v1/channels/{channel_id}/test", post(test_channel))
        .route("/v1/channels/{channel_id}/deliveries", get(list_deliveries))
        .route("/hosts/{name}", axum::routing::delete(forget_host))
        .route("/v1/auth/logout", post(logout))
        .route("/v1/me", get(me))
        .route("/v1/teams", post(create_team))
        .route("/v1/teams/{team_id}", axum::routing::delete(delete_team))
        .route("/v1/teams/{team_id}/members", get(list_members))
        .route(
            "/v1/teams/{team_id}/members/{user_id}",
            axum::routing::patch(set_member_role).delete(remove_member),
        )
        .route("/v1/teams/{team_id}/invitations", post(invite))
        .route("/access-tokens", post(create_access_token))
        .route(
            "/access-tokens/{access_token_id}",
            axum::routing::delete(delete_access_token),
        );
    for (name, routes) in extensions {
        keyed = keyed.nest(&format!("/ext/{name}"), routes);
    }
    keyed
        .layer(middleware::from_fn_with_state(plane.clone(), require_key))
        .merge(registry::plain_http_refusal())
        // Their credentials are in their bodies and paths.
        .route("/v1/auth/login", post(login))
        .route("/v1/invitations/{token}/accept", post(accept_invitation))
        // Uploads authorise themselves (the link's token), and may be large.
        .route(
            "/templates/files/uploads/{token}",
            axum::routing::put(upload_template_files)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_document))
        .route("/metrics", get(prometheus_metrics))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .layer(middleware::from_fn(|request, next| {
            wrenn_http::metrics::track_requests("api", request, next)
        }))
        .with_state(plane)
}

/// `GET /metrics`: the process's Prometheus metrics (OpenMetrics text), to the loopback, or to
/// a caller with the metrics token when one is set (`--metrics-token`).
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "The metrics, in the OpenMetrics text format", content_type = "application/openmetrics-text", body = String),
        (status = 401, description = "A metrics token is set and the caller did not send it"),
        (status = 403, description = "No metrics token is set and the caller is not on the loopback"),
    ))]
async fn prometheus_metrics(State(plane): State<Arc<ControlPlane>>, request: Request) -> Response {
    let peer = wrenn_http::metrics::peer_of(&request);
    let token = plane.metrics_token.as_deref();
    if wrenn_http::metrics::may_scrape(request.headers(), peer, token)
        && let Err(error) = crate::metrics::refresh(&plane).await
    {
        tracing::warn!(%error, "the metrics' sandbox and host counts could not be read");
    }
    wrenn_http::metrics::answer(request.headers(), peer, token)
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
        crate::http::openapi::document_json(),
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

/// The routes a signed-in user of no team may call (every other route acts in a team).
const NO_TEAM_ROUTES: &[&str] = &[
    "/v1/me",
    "/v1/teams",
    "/teams",
    "/v1/auth/logout",
    "/v1/invitations/{token}/accept",
    "/access-tokens",
    "/access-tokens/{access_token_id}",
];

/// Authenticates a keyed route's caller, read from the store at every call (a revoked key or
/// token fails at once): by `X-API-KEY` (a team's key), else by `Authorization: Bearer` (a
/// user's session or access token, acting in the team `X-Team-ID` names or their first).
/// It runs the route as the caller's actor ([`crate::events::acting_as`]) and appends every
/// call that may change state (any method but GET, HEAD and OPTIONS) to the audit log, with
/// its outcome, once the route answered.
async fn require_key(
    State(plane): State<Arc<ControlPlane>>,
    mut request: Request,
    next: Next,
) -> Response {
    let (presented_key, authorization, team_asked) = {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        (
            header("x-api-key"),
            header("authorization"),
            header("x-team-id"),
        )
    };
    let bearer = authorization.and_then(|value| {
        value
            .strip_prefix("Bearer ")
            .map(|token| token.trim().to_string())
    });
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_string())
        .unwrap_or_else(|| request.uri().path().to_string());
    let authenticated = match (presented_key, bearer) {
        (Some(presented), _) => key_caller(&plane, presented).await,
        (None, Some(token)) => match plane.authenticate_user(&token, team_asked.as_deref()).await {
            Ok(Some(caller)) => Ok(Caller {
                inner: caller,
                presented: String::new(),
            }),
            Ok(None) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Invalid access token",
            )),
            Err(error) => Err(error.into()),
        },
        (None, None) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing X-API-KEY header (or Authorization: Bearer with a user's token)",
        )),
    };
    let caller = match authenticated {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    if caller.team_id.is_empty() && !NO_TEAM_ROUTES.contains(&route.as_str()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "you belong to no team yet: create one (POST /v1/teams) or accept an invitation",
        )
        .into_response();
    }
    let actor = caller.actor();
    let method = request.method().clone();
    let changes = !matches!(
        method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    let path = request.uri().path().to_string();
    let client = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip().to_string())
        .unwrap_or_default();
    let team_id = caller.team_id.clone();
    request.extensions_mut().insert(TeamId(team_id.clone()));
    request.extensions_mut().insert(caller);
    let response = crate::events::acting_as(actor.clone(), next.run(request)).await;
    if changes {
        let resource = response
            .extensions()
            .get::<AuditResource>()
            .map(|made| made.0.clone())
            .unwrap_or(path);
        audit::record(
            &plane,
            crate::store::AuditRow {
                team_id,
                actor,
                action: format!("{method} {route}"),
                resource,
                outcome: i64::from(response.status().as_u16()),
                client,
                ..Default::default()
            },
        )
        .await;
    }
    response
}

/// The caller an API key names, or a 401.
async fn key_caller(plane: &ControlPlane, presented: String) -> Result<Caller, ApiError> {
    let Some(key) = plane.store.key_by_hash(&auth::hash_key(&presented)).await? else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "Invalid API key"));
    };
    let operator = plane
        .store
        .team_by_id(&key.team_id)
        .await?
        .is_some_and(|team| team.admin);
    Ok(Caller {
        inner: crate::service::users::Caller {
            team_id: key.team_id.clone(),
            role: key.role,
            operator,
            principal: crate::service::users::Principal::Key(key),
        },
        presented,
    })
}

/// The caller of a keyed route (set by [`require_key`]): a key, or a user with a token, the
/// team and role they act in; and the key as presented. Extensions' handlers take it too
/// (`crate::server`).
#[derive(Debug, Clone)]
pub struct Caller {
    inner: crate::service::users::Caller,
    presented: String,
}

impl std::ops::Deref for Caller {
    type Target = crate::service::users::Caller;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl Caller {
    /// The role the caller acts with in its team.
    pub fn role(&self) -> crate::store::Role {
        self.inner.role
    }

    /// The team the caller acts in.
    pub fn team_id(&self) -> &str {
        &self.inner.team_id
    }

    /// The key's id, when a key calls.
    pub fn key_id(&self) -> Option<&str> {
        match &self.inner.principal {
            crate::service::users::Principal::Key(key) => Some(&key.id),
            crate::service::users::Principal::User { .. } => None,
        }
    }

    /// Whether the caller sees every team (a key of an admin team, or an operator).
    pub async fn is_operator(&self, _plane: &ControlPlane) -> Result<bool, ApiError> {
        Ok(self.inner.operator)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the route has no key check",
            )
        })
    }
}

/// A 429 for a key past its rate of `what`: when it may try again, in `Retry-After`
/// (whole seconds, at least 1) and the message.
fn rate_limited(wait: Duration, what: &str) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let message = format!("this API key is over its rate of {what}: try again in {seconds} s");
    let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, message).into_response();
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// Set on an answer by a route that made something: the audit log's resource is what it made.
#[derive(Debug, Clone)]
struct AuditResource(String);

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
            egress: row.network.egress.redacted(),
            mask_request_host: row.network.mask_request_host.clone(),
        },
        envd_access_token: row.envd_access_token.clone(),
        domain: plane.domain.clone(),
        pause_mode: (row.state == SandboxState::Paused).then(|| {
            if row.paused_disk_only {
                "filesystem"
            } else {
                "full"
            }
            .to_string()
        }),
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

/// A sandbox of the caller's team (not lost), read in its turn ([`ControlPlane::turn`]):
/// hold the turn while changing its state.
async fn owned_in_turn(
    plane: &ControlPlane,
    team: &TeamId,
    id: &str,
) -> Result<(crate::service::ChangeTurn, SandboxRow), ApiError> {
    let turn = plane.turn(id.split('-').next().unwrap_or(id)).await?;
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
    serde_json::from_slice(bytes)
        .map_err(|error| ApiError::bad_request(format!("invalid request body: {error}")))
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
    serde_json::from_value(value)
        .map_err(|error| ApiError::bad_request(format!("invalid request body: {error}")))
}

fn check_timeout(seconds: u64) -> Result<u64, ApiError> {
    if seconds > MAX_TIMEOUT_SECONDS {
        return Err(ApiError::bad_request(
            "Timeout cannot be greater than 24 hours",
        ));
    }
    Ok(seconds)
}
