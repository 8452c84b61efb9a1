//! The edge proxy to sandbox ports (`e2b-compat.md` §3): a request names its sandbox and port by
//! host (`<port>-<sandboxID>.<domain>`) or, when the host is `localhost`, an IP address or
//! `sandbox.*`, by the `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers. It is streamed both ways
//! without buffering to the guest's port (envd forwards the guest's loopback ports there):
//! straight to the guest when its host is this machine, else through the sandbox proxy of the
//! agent on its host. HTTP/1.1 with upgrades (WebSocket) and HTTP/2 with prior knowledge (h2c)
//! both pass. envd's internal routes are refused. A sandbox created without public traffic needs
//! its traffic token on every port but envd's; a paused sandbox created with `autoResume` is
//! resumed by the first request that comes for it.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use wrenn_agent_api::proxy::{SANDBOX_NOT_FOUND, bad_gateway};

use wrenn_proto::ENVD_PORT;

use crate::ControlPlane;

/// envd's routes that are not for the outside (on [`ENVD_PORT`]).
const INTERNAL_ROUTES: &[&str] = &["/init", "/snapshot/prepare", "/snapshot/continue"];
/// The header carrying a sandbox's traffic token (when it takes no public traffic).
const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
}

fn plain(status: StatusCode, text: &'static str) -> Box<Response> {
    Box::new((status, text).into_response())
}

/// Reads the target from the host or the routing headers, with E2B's error texts.
pub fn route(
    request_host: Option<&str>,
    id_header: Option<&str>,
    port_header: Option<&str>,
) -> Result<Target, Box<Response>> {
    let host = request_host.unwrap_or("");
    let name = host
        .rsplit_once(':')
        .map(|(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                host
            }
        })
        .unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let by_headers =
        name == "localhost" || name.parse::<IpAddr>().is_ok() || name.starts_with("sandbox.");
    let (id, port) = if by_headers {
        match (id_header, port_header) {
            (Some(id), Some(port)) => (id.to_string(), port.to_string()),
            (None, None) => return Err(plain(StatusCode::BAD_REQUEST, "Invalid host")),
            _ => return Err(plain(StatusCode::BAD_REQUEST, "missing header")),
        }
    } else {
        let label = name.split('.').next().unwrap_or("");
        let Some((port, id)) = label.split_once('-') else {
            return Err(plain(StatusCode::BAD_REQUEST, "Invalid host"));
        };
        (id.to_string(), port.to_string())
    };
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(plain(StatusCode::BAD_REQUEST, "Invalid sandbox ID"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| plain(StatusCode::BAD_REQUEST, "Invalid sandbox port"))?;
    Ok(Target {
        sandbox_id: id,
        port,
    })
}

/// The proxy's routes: everything goes through [`forward`].
pub fn router(plane: Arc<ControlPlane>) -> axum::Router {
    axum::Router::new().fallback(forward).with_state(plane)
}

async fn forward(
    axum::extract::State(plane): axum::extract::State<Arc<ControlPlane>>,
    mut request: Request<Body>,
) -> Response {
    let (host, id_header, port_header) = {
        let header_text = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        (
            header_text("host").or_else(|| request.uri().authority().map(|a| a.to_string())),
            header_text("e2b-sandbox-id"),
            header_text("e2b-sandbox-port"),
        )
    };
    let target = match route(
        host.as_deref(),
        id_header.as_deref(),
        port_header.as_deref(),
    ) {
        Ok(target) => target,
        Err(response) => return *response,
    };
    if target.port == ENVD_PORT && INTERNAL_ROUTES.contains(&request.uri().path()) {
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({ "code": 403, "message": "this envd route is internal" })),
        )
            .into_response();
    }
    let mut routed = plane
        .fleet
        .route(&plane.store, &target.sandbox_id, target.port)
        .await;
    if routed.is_none() && plane.resume_on_traffic(&target.sandbox_id).await {
        routed = plane
            .fleet
            .route(&plane.store, &target.sandbox_id, target.port)
            .await;
    }
    let Some((guest, route)) = routed else {
        return bad_gateway(&target.sandbox_id, SANDBOX_NOT_FOUND, None);
    };
    let given = request.headers_mut().remove(TRAFFIC_TOKEN_HEADER);
    if target.port != ENVD_PORT
        && let Some(expected) = route.traffic_token
    {
        use subtle::ConstantTimeEq;
        let given = given.as_ref().map(|v| v.as_bytes()).unwrap_or_default();
        if !bool::from(given.ct_eq(expected.as_bytes())) {
            return (
                StatusCode::FORBIDDEN,
                axum::Json(json!({
                    "code": 403,
                    "message": "this sandbox takes no public traffic: send its trafficAccessToken in e2b-traffic-access-token",
                })),
            )
                .into_response();
        }
    }
    if let Some(original) = host
        .as_deref()
        .and_then(|host| HeaderValue::from_str(host).ok())
    {
        request.headers_mut().insert("x-forwarded-host", original);
    }
    // E2B's maskRequestHost: the guest's server sees the mask as the Host (envd's own port
    // keeps the proxy's).
    if target.port != ENVD_PORT
        && let Some(mask) = &route.host_mask
        && let Ok(masked) =
            HeaderValue::from_str(&mask.replace("${PORT}", &target.port.to_string()))
    {
        request
            .headers_mut()
            .insert(axum::http::header::HOST, masked);
    }
    let via_agent = matches!(guest, wrenn_agent_api::GuestRoute::ViaAgent { .. });
    match guest
        .forward(request, crate::deadlines::PROXY_RESPONSE)
        .await
    {
        Ok(response) => response,
        // The agent's proxy answers for the guest itself; failing to reach it is the host's fault.
        Err(_) if via_agent => bad_gateway(
            &target.sandbox_id,
            "The sandbox's host does not answer",
            Some(target.port),
        ),
        Err(error) => bad_gateway(&target.sandbox_id, error.message(), Some(target.port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_headers_route_as_e2b_does() {
        assert_eq!(
            route(Some("8080-abc123.wrenn.local"), None, None).unwrap(),
            Target {
                sandbox_id: "abc123".into(),
                port: 8080
            }
        );
        assert_eq!(
            route(Some("127.0.0.1:3001"), Some("abc"), Some("49983")).unwrap(),
            Target {
                sandbox_id: "abc".into(),
                port: 49983
            }
        );
        assert_eq!(
            route(Some("sandbox.wrenn.dev"), Some("x1"), Some("80"))
                .unwrap()
                .port,
            80
        );
        assert_eq!(
            route(Some("localhost:3001"), Some("abc"), None)
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
        for bad in [
            "nolabel.example.com",
            "80-ABC.example.com",
            "99999-abc.example.com",
        ] {
            assert_eq!(
                route(Some(bad), None, None).unwrap_err().status(),
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }
}
