//! The agent's sandbox proxy as its callers see it: the headers that name the sandbox, the port
//! and the agent's token, and E2B's answers when a sandbox's port cannot be reached.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Names the sandbox a request to the agent's proxy is for.
pub const SANDBOX_ID_HEADER: &str = "x-wrenn-sandbox-id";
/// Names the guest port a request to the agent's proxy is for.
pub const SANDBOX_PORT_HEADER: &str = "x-wrenn-sandbox-port";
/// The agent's token, which a request to its proxy must carry.
pub const AGENT_TOKEN_HEADER: &str = "x-wrenn-agent-token";

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
