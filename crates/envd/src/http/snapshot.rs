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

use crate::cgroups::Group;
use crate::server::ConnectionId;

/// How long `/snapshot/prepare` waits for the user processes to freeze.
const FREEZE_DEADLINE: std::time::Duration = std::time::Duration::from_millis(500);
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
    // Freezing is asynchronous in the kernel: wait (briefly) until it has happened.
    if let Some(cgroups) = &envd.cgroups {
        match cgroups.set_frozen(true) {
            Ok(()) => {
                let deadline = Instant::now() + FREEZE_DEADLINE;
                while !(cgroups.is_frozen(Group::User) && cgroups.is_frozen(Group::Ptys)) {
                    if Instant::now() >= deadline {
                        tracing::warn!(
                            "the user cgroups did not freeze within {FREEZE_DEADLINE:?}"
                        );
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            Err(error) => tracing::warn!(%error, "could not freeze the user cgroups"),
        }
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
