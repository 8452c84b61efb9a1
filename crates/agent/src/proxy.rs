//! The agent's sandbox proxy: requests for this host's guests from the control plane's edge
//! proxy. [`router`] takes the sandbox and port from the `X-Wrenn-Sandbox-Id`/`-Port` headers,
//! checks the agent's token in `X-Wrenn-Agent-Token`, strips all three and forwards to the
//! guest with [`wrenn_http::forward`], until the sandbox's VM stops (the manager cancels the
//! sandbox's token then).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use wrenn_http::forward::forward;

use crate::manager::Manager;

/// Names the sandbox a request to the agent's proxy is for.
pub const SANDBOX_ID_HEADER: &str = "x-wrenn-sandbox-id";
/// Names the guest port a request to the agent's proxy is for.
pub const SANDBOX_PORT_HEADER: &str = "x-wrenn-sandbox-port";
/// The agent's token, which a request to its proxy must carry.
pub const AGENT_TOKEN_HEADER: &str = "x-wrenn-agent-token";

#[derive(Debug, Clone)]
struct ProxyState {
    manager: Arc<Manager>,
    token: Arc<str>,
}

/// The agent's sandbox proxy: requests for this host's guests, from the control plane's proxy.
pub fn router(manager: Arc<Manager>, token: &str) -> axum::Router {
    axum::Router::new()
        .fallback(proxy_request)
        .with_state(ProxyState {
            manager,
            token: token.into(),
        })
}

fn refusal(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "code": status.as_u16(), "message": message })),
    )
        .into_response()
}

async fn proxy_request(
    axum::extract::State(state): axum::extract::State<ProxyState>,
    mut request: Request<Body>,
) -> Response {
    use subtle::ConstantTimeEq;
    let headers = request.headers_mut();
    let given = headers
        .remove(AGENT_TOKEN_HEADER)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    if !bool::from(given.ct_eq(state.token.as_bytes())) {
        return refusal(StatusCode::UNAUTHORIZED, "a valid agent token is required");
    }
    let text =
        |value: Option<http::HeaderValue>| value.and_then(|v| v.to_str().ok().map(str::to_string));
    let sandbox_id = text(headers.remove(SANDBOX_ID_HEADER));
    let port = text(headers.remove(SANDBOX_PORT_HEADER)).and_then(|p| p.parse::<u16>().ok());
    let (Some(sandbox_id), Some(port)) = (sandbox_id, port) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "x-wrenn-sandbox-id and x-wrenn-sandbox-port are required",
        );
    };
    let Some((address, ends)) = state.manager.guest_route(&sandbox_id, port) else {
        return bad_gateway(&sandbox_id, SANDBOX_NOT_FOUND, None);
    };
    match forward(address, request, ends).await {
        Ok(response) => response,
        Err(error) => bad_gateway(&sandbox_id, error.message(), Some(port)),
    }
}

/// E2B's text for a sandbox the proxy cannot find.
pub const SANDBOX_NOT_FOUND: &str = "The sandbox was not found";

/// E2B's 502 answer: `{sandboxId, message, code, port}`.
pub fn bad_gateway(sandbox_id: &str, message: &str, port: Option<u16>) -> Response {
    let mut body = serde_json::json!({ "sandboxId": sandbox_id, "message": message, "code": 502 });
    if let Some(port) = port {
        body["port"] = serde_json::json!(port);
    }
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}
