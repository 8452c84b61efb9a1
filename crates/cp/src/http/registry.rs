//! The fleet registry (`wrenn.agent.v1.HostRegistry`), served over Connect on the fleet's
//! mutual-TLS listener: agents register (first with the join token and a certificate request,
//! then with their certificate), heartbeat with their certificate and their host's token, and
//! renew their certificate. On the API's plain listener its paths answer how to reach it. Here a
//! cause of [`crate::Error`] becomes a Connect code, as [`super::ApiError`] makes it a status
//! for REST.

use super::*;

use crate::fleet::FleetPeer;
use wrenn_agent_api::join::{HeartbeatResponse, RenewCertificateResponse, host_registry as rpc};
use wrenn_connect::server::{serve_unary, unary_error};
use wrenn_connect::{Code, ConnectError, DEFAULT_MAX_MESSAGE_BYTES};
use wrenn_proto::Rpc;

/// The registry's paths on a listener without the fleet's TLS: each answers where agents join.
pub(super) fn plain_http_refusal() -> Router<Arc<ControlPlane>> {
    Router::new().route(
        &format!("{}/{{method}}", rpc::SERVICE),
        post(|| async {
            unary_error(&ConnectError::new(
                Code::FailedPrecondition,
                "agents join over the fleet's mutual TLS, not here: --join https://<control plane>:<its --fleet-listen port> --control-plane-ca sha256:<the fingerprint wrenn server prints>",
            ))
        }),
    )
}

/// The host id the caller's certificate names, as the fleet's listener found it.
fn peer(peer: &Option<axum::Extension<FleetPeer>>) -> Option<&str> {
    peer.as_ref()
        .and_then(|axum::Extension(peer)| peer.0.as_deref())
}

/// The registry's methods; anything else under its service path is NotFound.
pub(super) fn router() -> Router<Arc<ControlPlane>> {
    Router::new()
        .route(rpc::Register::PATH, post(register))
        .route(rpc::Heartbeat::PATH, post(heartbeat))
        .route(rpc::RenewCertificate::PATH, post(renew_certificate))
        .route(
            &format!("{}/{{method}}", rpc::SERVICE),
            post(|| async {
                unary_error(&ConnectError::new(
                    Code::NotFound,
                    "no such method of wrenn.agent.v1.HostRegistry",
                ))
            }),
        )
}

/// `Register`: an agent joins (again) with the join token, or with its certificate.
async fn register(
    State(plane): State<Arc<ControlPlane>>,
    fleet_peer: Option<axum::Extension<FleetPeer>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let peer = peer(&fleet_peer);
    // The credentials first: a stranger learns nothing of what a registration looks like.
    let known = peer.is_some_and(|id| plane.fleet.host(id).is_some());
    if !known && let Err(error) = plane.fleet.check_join_token(bearer(&headers)) {
        return unary_error(&connect_error(error)).into_response();
    }
    serve_unary(&headers, body, DEFAULT_MAX_MESSAGE_BYTES, |request| async {
        let (answer, _) = plane
            .fleet
            .register(&plane.store, bearer(&headers), peer, request)
            .await
            .map_err(connect_error)?;
        let _ = plane.reconcile_now.try_send(answer.host_id.clone());
        Ok(answer)
    })
    .await
    .into_response()
}

/// `Heartbeat`: a host's report, with its certificate and its heartbeat token.
async fn heartbeat(
    State(plane): State<Arc<ControlPlane>>,
    fleet_peer: Option<axum::Extension<FleetPeer>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let peer = peer(&fleet_peer);
    serve_unary(
        &headers,
        body,
        DEFAULT_MAX_MESSAGE_BYTES,
        |request: wrenn_agent_api::join::HeartbeatRequest| async {
            let came_back = plane
                .fleet
                .heartbeat(
                    &plane.store,
                    &request.host_id,
                    bearer(&headers),
                    peer,
                    request.report.unwrap_or_default(),
                )
                .await
                .map_err(connect_error)?;
            if came_back {
                let _ = plane.reconcile_now.try_send(request.host_id);
            }
            Ok(HeartbeatResponse {})
        },
    )
    .await
    .into_response()
}

/// `RenewCertificate`: a host's new key certified, the host presenting its present certificate.
async fn renew_certificate(
    State(plane): State<Arc<ControlPlane>>,
    fleet_peer: Option<axum::Extension<FleetPeer>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let peer = peer(&fleet_peer);
    serve_unary(
        &headers,
        body,
        DEFAULT_MAX_MESSAGE_BYTES,
        |request: wrenn_agent_api::join::RenewCertificateRequest| async move {
            let certificate_chain = plane
                .fleet
                .renew_certificate(peer, &request.host_id, &request.certificate_request)
                .map_err(connect_error)?;
            Ok(RenewCertificateResponse { certificate_chain })
        },
    )
    .await
    .into_response()
}

/// The Connect code of a cause; the store's own words go to the log, not to the caller.
fn connect_error(error: crate::Error) -> ConnectError {
    use crate::Error as E;
    let code = match &error {
        E::HostNotFound(_)
        | E::SandboxNotFound(_)
        | E::TemplateNotFound(_)
        | E::KeyNotFound(_)
        | E::TeamNotFound(_)
        | E::ChannelNotFound(_)
        | E::TokenNotFound(_)
        | E::MemberNotFound(_) => Code::NotFound,
        E::RateLimited { .. } => Code::ResourceExhausted,
        E::InvalidRequest(_) | E::Unsupported(_) => Code::InvalidArgument,
        E::Unauthenticated(_) => Code::Unauthenticated,
        E::Forbidden(_) | E::Refused(_) => Code::PermissionDenied,
        E::Conflict(_) => Code::AlreadyExists,
        E::QuotaExceeded(_) => Code::ResourceExhausted,
        E::NoCapacity(_) | E::HostDown(_) => Code::Unavailable,
        E::HostTimedOut { .. } => Code::DeadlineExceeded,
        E::Store(cause) => {
            tracing::error!(error = %cause, "store failure");
            Code::Internal
        }
        E::Host { .. } | E::NoRandomness(_) | E::Internal(_) => Code::Internal,
    };
    ConnectError::new(code, error.to_string())
}
