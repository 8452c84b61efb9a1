//! `POST /snapshot/prepare`: the host agent calls it right before pausing the VM. envd freezes
//! the user and terminal cgroups (when it has them), stops its port subsystem (no forwarded connection is half-open in the snapshot), closes its idle
//! connections, turns keep-alive off on the busy ones (this request's own included), and marks
//! itself as awaiting a restore, which the next `/init` completes. It answers only when that is
//! done, so the VM can be paused right after the answer.
//!
//! Like `/init`, the route is internal: the edge proxy must not forward it.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::server::ConnectionId;
use crate::state::Envd;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Prepared {
    closed_connections: usize,
    draining_connections: usize,
    elapsed_ms: f64,
}

pub(crate) async fn prepare(
    State(envd): State<Arc<Envd>>,
    connection: Option<axum::Extension<ConnectionId>>,
) -> Response {
    let started = Instant::now();
    envd.ports.stop().await;
    // User processes must not be mid-write when the VM freezes; /init thaws them.
    if let Some(cgroups) = &envd.cgroups
        && let Err(error) = cgroups.set_frozen(true)
    {
        tracing::warn!(%error, "could not freeze the user cgroups");
    }
    let sweep = envd.connections.prepare_snapshot(connection.map(|c| c.0));
    let prepared = Prepared {
        closed_connections: sweep.closed,
        draining_connections: sweep.drained,
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
    };
    tracing::info!(?prepared, "prepared for a snapshot");
    axum::Json(prepared).into_response()
}
