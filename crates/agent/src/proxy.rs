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

pub use wrenn_agent_api::proxy::{
    AGENT_TOKEN_HEADER, SANDBOX_ID_HEADER, SANDBOX_NOT_FOUND, SANDBOX_PORT_HEADER, bad_gateway,
};

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
