//! envd's plain HTTP routes: `/health`, `/files` (download and upload), `/envs`, `/metrics` and
//! `/init`, plus the middleware that guards every route (access token, Basic user).

pub mod files;
pub mod init;
pub mod signature;
pub mod snapshot;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, Method, StatusCode, header};

use crate::auth;
use crate::state::Envd;
use crate::users::UserError;

/// The plain HTTP routes.
pub fn router() -> Router<Arc<Envd>> {
    Router::new()
        .route("/health", get(health))
        .route("/files", get(files::download).post(files::upload))
        .route("/envs", get(envs))
        .route("/metrics", get(metrics))
        .route("/init", post(init::init))
        .route("/snapshot/prepare", post(snapshot::prepare))
        .route("/snapshot/continue", post(snapshot::continue_running))
}

/// A JSON error in E2B's plain-HTTP form: `{"code":<status>,"message":"..."}`.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    let mut text = body.to_string();
    text.push('\n');
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        text,
    )
        .into_response()
}

fn no_store() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))]
}

async fn health() -> Response {
    (StatusCode::NO_CONTENT, no_store()).into_response()
}

async fn envs(State(envd): State<Arc<Envd>>) -> Response {
    (no_store(), axum::Json(envd.sandbox_env())).into_response()
}

async fn metrics(State(envd): State<Arc<Envd>>) -> Response {
    let envd = envd.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut cpu = envd.cpu.lock().expect("cpu sampler lock");
        crate::metrics::collect(&mut cpu, envd.cgroups.as_ref())
    })
    .await;
    match result {
        Ok(metrics) => (no_store(), axum::Json(metrics)).into_response(),
        Err(error) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("collecting metrics failed: {error}"),
        ),
    }
}

/// Routes reachable without the access token (`/files` checks it or a signature itself, and
/// `/init` authenticates its own way).
fn exempt_from_token(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::GET, "/health")
            | (&Method::GET, "/files")
            | (&Method::POST, "/files")
            | (&Method::POST, "/init")
    )
}

/// Guards every route: the access token (once `/init` set one), and a Basic user that must
/// exist.
pub async fn guard(State(envd): State<Arc<Envd>>, request: Request, next: Next) -> Response {
    let refusal = if !exempt_from_token(request.method(), request.uri().path())
        && !auth::token_matches(request.headers(), envd.access_token().as_deref())
    {
        Some(json_error(
            StatusCode::UNAUTHORIZED,
            auth::UNAUTHORIZED_MESSAGE,
        ))
    } else {
        match auth::basic_username(request.headers()) {
            Err(error) => Some(unauthenticated(error.to_string())),
            Ok(Some(name)) => envd.accounts.user(&name).err().map(|error| {
                unauthenticated(match error {
                    UserError::UnknownUser(name) => format!("invalid username: '{name}'"),
                    other => other.to_string(),
                })
            }),
            Ok(None) => None,
        }
    };
    match refusal {
        Some(response) => {
            drain_body(request.into_body()).await;
            response
        }
        None => next.run(request).await,
    }
}

/// Reads (a bounded amount of) a refused request's body before answering. Answering first makes
/// hyper drop the connection while a client may still be sending a chunked body: the client then
/// sees a broken pipe instead of our 401.
pub async fn drain_body(body: axum::body::Body) {
    const MAX_DRAIN_BYTES: usize = 1024 * 1024;
    let limited = http_body_util::Limited::new(body, MAX_DRAIN_BYTES);
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        http_body_util::BodyExt::collect(limited),
    )
    .await;
}

/// A Connect-style `unauthenticated` error, which both RPC and plain clients understand.
fn unauthenticated(message: String) -> Response {
    let body =
        wrenn_connect::ConnectError::new(wrenn_connect::Code::Unauthenticated, message).to_json();
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}
