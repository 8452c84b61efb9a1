//! `POST /snapshot/prepare`: the host agent calls it right before pausing the VM. envd freezes
//! the user and terminal cgroups (when it has them), stops its port subsystem (no forwarded connection is half-open in the snapshot), closes its idle
//! connections, turns keep-alive off on the busy ones (this request's own included), and marks
//! itself as awaiting a restore, which the next `/init` completes. It answers only when that is
//! done, so the VM can be paused right after the answer.
//!
//! `POST /snapshot/continue`: the host agent calls it when the VM it prepared goes on running
//! instead of being stopped (a checkpoint: the snapshot is for other sandboxes, or it failed):
//! envd thaws the user processes and restarts its port subsystem, and keeps its connections
//! (they are this VM's, alive); the snapshot's copies of envd complete their restore at their
//! own first `/init`.
//!
//! Like `/init`, the routes are internal: the edge proxy must not forward them.

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

/// What `/snapshot/prepare` may be asked (the body is optional).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PrepareRequest {
    /// Write every dirty page to the disks once the processes are frozen: the VM is about to
    /// be stopped without its memory, and its disk must hold everything.
    #[serde(default)]
    sync_disks: bool,
}

pub(crate) async fn prepare(
    State(envd): State<Arc<Envd>>,
    connection: Option<axum::Extension<ConnectionId>>,
    body: bytes::Bytes,
) -> Response {
    let request: PrepareRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PrepareRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => {
                return super::json_error(
                    http::StatusCode::BAD_REQUEST,
                    format!("invalid /snapshot/prepare body: {error}"),
                );
            }
        }
    };
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
    if request.sync_disks {
        // SAFETY: sync(2) takes no arguments and cannot fail; it only blocks this thread.
        let synced = tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await;
        if let Err(error) = synced {
            tracing::warn!(%error, "the disks' sync did not finish");
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

pub(crate) async fn continue_running(State(envd): State<Arc<Envd>>) -> Response {
    if let Some(cgroups) = &envd.cgroups
        && let Err(error) = cgroups.set_frozen(false)
    {
        tracing::warn!(%error, "could not thaw the user cgroups");
    }
    if envd.connections.continue_after_snapshot() {
        envd.ports.start().await;
        tracing::info!("continuing after a snapshot");
    }
    http::StatusCode::NO_CONTENT.into_response()
}
