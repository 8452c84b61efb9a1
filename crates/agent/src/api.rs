//! The agent's Connect API (`wrenn.agent.v1.HostAgent`): unary RPCs in JSON or binary, and the
//! server-streaming template build, guarded by a bearer token compared in constant time, each
//! mapped onto the sandbox manager.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::post;
use wrenn_connect::Message;
use wrenn_connect::server::{serve_server_streaming, serve_unary, unary_error};
use wrenn_connect::{Code, ConnectError, DEFAULT_MAX_MESSAGE_BYTES};
use wrenn_proto::Rpc;
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent as rpc;

use crate::error::AgentError;
use crate::manager::{CreateOptions, Manager};
use crate::store::{SandboxRecord, TemplateRecord};
use wrenn_agent_api::timeout_from_millis;

#[derive(Debug, Clone)]
struct ApiState {
    manager: Arc<Manager>,
    token: Arc<str>,
}

/// The API's routes.
pub fn router(manager: Arc<Manager>, token: &str) -> Router {
    let state = ApiState {
        manager,
        token: token.into(),
    };
    let router = Router::new();
    let router = serve(router, rpc::CreateSandbox, create_sandbox);
    let router = serve(router, rpc::GetSandbox, get_sandbox);
    let router = serve(router, rpc::ListSandboxes, list_sandboxes);
    let router = serve(router, rpc::PauseSandbox, pause_sandbox);
    let router = serve(router, rpc::ResumeSandbox, resume_sandbox);
    let router = serve(router, rpc::CheckpointSandbox, checkpoint_sandbox);
    let router = serve(router, rpc::DestroySandbox, destroy_sandbox);
    let router = serve(router, rpc::UpdateSandboxNetwork, update_sandbox_network);
    let router = serve(router, rpc::BuildTemplate, build_template);
    let router = serve(router, rpc::ListTemplates, list_templates);
    let router = serve(router, rpc::DeleteTemplate, delete_template);
    let router = serve(router, rpc::HostInfo, host_info);
    let router = serve(router, rpc::CollectTelemetry, collect_telemetry);
    let router = router.route(rpc::RunTemplateBuild::PATH, post(run_template_build));
    router
        .route("/metrics", axum::routing::get(prometheus_metrics))
        .layer(axum::middleware::from_fn(|request, next| {
            wrenn_http::metrics::track_requests("agent", request, next)
        }))
        .fallback(|| async {
            unary_error(&ConnectError::new(
                Code::NotFound,
                "no such method of wrenn.agent.v1.HostAgent",
            ))
        })
        .with_state(state)
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes())))
}

/// Adds the unary method `M` to `router`: the token checked, then `handler` on the manager.
fn serve<M, F, Fut>(router: Router<ApiState>, _method: M, handler: F) -> Router<ApiState>
where
    M: Rpc,
    M::Request: Message,
    M::Response: Message + Send + 'static,
    F: FnOnce(Arc<Manager>, M::Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<M::Response, AgentError>> + Send + 'static,
{
    let call = move |State(state): State<ApiState>, headers: HeaderMap, body: Body| async move {
        if !authorized(&headers, &state.token) {
            return unary_error(&ConnectError::new(
                Code::Unauthenticated,
                "a valid bearer token is required",
            ));
        }
        serve_unary(&headers, body, DEFAULT_MAX_MESSAGE_BYTES, |request| async {
            // The call runs to its end even if the caller hangs up: a create, pause or build
            // cut off halfway would leave a VM, a slot or a snapshot behind.
            crate::detached(handler(state.manager.clone(), request))
                .await
                .map_err(|error| {
                    tracing::info!(%error, code = ?error.code(), "agent call failed");
                    ConnectError::from(error)
                })
        })
        .await
    };
    router.route(M::PATH, post(call))
}

/// A sandbox as the API shows it.
pub fn sandbox_message(manager: &Manager, record: &SandboxRecord) -> pb::Sandbox {
    let usage = manager.usage(record).unwrap_or_default();
    pb::Sandbox {
        sandbox_id: record.sandbox_id.clone(),
        template_id: record.template_id.clone(),
        state: record.state.as_str().into(),
        envd_address: record
            .slot
            .map(|slot| {
                format!(
                    "{}:{}",
                    crate::network::Slot::address_of(slot),
                    crate::manager::ENVD_PORT
                )
            })
            .unwrap_or_default(),
        memory_mib: record.machine.memory_mib,
        vcpus: record.machine.vcpus,
        created_at_unix_ms: record.created_at_ms,
        error: record.error.clone().unwrap_or_default(),
        metadata: record.metadata.clone().into_iter().collect(),
        slot: record.slot.unwrap_or(0),
        rss_bytes: usage.rss_bytes,
        cpu_millis: usage.cpu_millis,
        pid: record.vm.as_ref().map(|vm| vm.pid).unwrap_or(0),
        allow_internet_access: record.allow_internet,
    }
}

fn template_message(record: &TemplateRecord) -> pb::Template {
    pb::Template {
        template_id: record.template_id.clone(),
        memory_mib: record.machine.memory_mib,
        vcpus: record.machine.vcpus,
        accel: record.accel.as_str().into(),
        created_at_unix_ms: record.created_at_ms,
        snapshot_bytes: record.snapshot.bytes,
        envd_version: record.envd_version.clone(),
        image_key: record.image_key.clone(),
        build_ms: record.build_ms,
        disk_size_mb: record.disk_size_mb(),
    }
}

fn required(field: &str, value: &str) -> Result<(), AgentError> {
    if value.is_empty() {
        Err(AgentError::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

async fn create_sandbox(
    manager: Arc<Manager>,
    request: pb::CreateSandboxRequest,
) -> Result<pb::CreateSandboxResponse, AgentError> {
    required("template_id", &request.template_id)?;
    let options = CreateOptions::try_from(request)
        .map_err(|error| AgentError::InvalidArgument(error.to_string()))?;
    let (record, timings) = manager.create(options).await?;
    Ok(pb::CreateSandboxResponse {
        sandbox: Some(sandbox_message(&manager, &record)),
        restore_ms: timings.restore.as_millis() as u64,
        ready_ms: timings.ready.as_millis() as u64,
        pull_ms: timings.pull.as_millis() as u64,
        prepare_ms: timings.prepare.as_millis() as u64,
        init_ms: timings.init.as_millis() as u64,
        warm: timings.warm,
    })
}

async fn get_sandbox(
    manager: Arc<Manager>,
    request: pb::GetSandboxRequest,
) -> Result<pb::GetSandboxResponse, AgentError> {
    required("sandbox_id", &request.sandbox_id)?;
    let record = manager.get(&request.sandbox_id)?;
    Ok(pb::GetSandboxResponse {
        sandbox: Some(sandbox_message(&manager, &record)),
    })
}

async fn list_sandboxes(
    manager: Arc<Manager>,
    _: pb::ListSandboxesRequest,
) -> Result<pb::ListSandboxesResponse, AgentError> {
    Ok(pb::ListSandboxesResponse {
        sandboxes: manager
            .list()
            .iter()
            .map(|record| sandbox_message(&manager, record))
            .collect(),
    })
}

async fn pause_sandbox(
    manager: Arc<Manager>,
    request: pb::PauseSandboxRequest,
) -> Result<pb::PauseSandboxResponse, AgentError> {
    required("sandbox_id", &request.sandbox_id)?;
    let record = manager
        .pause(&request.sandbox_id, request.disk_only)
        .await?;
    Ok(pb::PauseSandboxResponse {
        snapshot_bytes: record.snapshot.as_ref().map(|s| s.bytes).unwrap_or(0),
        sandbox: Some(sandbox_message(&manager, &record)),
    })
}

async fn checkpoint_sandbox(
    manager: Arc<Manager>,
    request: pb::CheckpointSandboxRequest,
) -> Result<pb::CheckpointSandboxResponse, AgentError> {
    required("sandbox_id", &request.sandbox_id)?;
    required("template_id", &request.template_id)?;
    let started = std::time::Instant::now();
    let options = crate::manager::CheckpointOptions {
        template_id: request.template_id.clone(),
        ephemeral: request.ephemeral,
    };
    let (record, paused) = manager.checkpoint(&request.sandbox_id, options).await?;
    Ok(pb::CheckpointSandboxResponse {
        template: Some(record.report()),
        snapshot_bytes: record.snapshot.bytes,
        paused_ms: paused.as_millis() as u64,
        total_ms: started.elapsed().as_millis() as u64,
    })
}

async fn resume_sandbox(
    manager: Arc<Manager>,
    request: pb::ResumeSandboxRequest,
) -> Result<pb::ResumeSandboxResponse, AgentError> {
    required("sandbox_id", &request.sandbox_id)?;
    let options = crate::manager::ResumeOptions {
        access_token: (!request.envd_access_token.is_empty()).then_some(request.envd_access_token),
        ready_timeout: timeout_from_millis(request.ready_timeout_ms),
        init_timeout: timeout_from_millis(request.init_timeout_ms),
        from_disk: request.from_disk,
    };
    let record = manager.resume(&request.sandbox_id, options).await?;
    Ok(pb::ResumeSandboxResponse {
        sandbox: Some(sandbox_message(&manager, &record)),
    })
}

async fn destroy_sandbox(
    manager: Arc<Manager>,
    request: pb::DestroySandboxRequest,
) -> Result<pb::DestroySandboxResponse, AgentError> {
    required("sandbox_id", &request.sandbox_id)?;
    manager.destroy(&request.sandbox_id).await?;
    Ok(pb::DestroySandboxResponse {})
}

async fn update_sandbox_network(
    manager: Arc<Manager>,
    request: pb::UpdateSandboxNetworkRequest,
) -> Result<pb::UpdateSandboxNetworkResponse, AgentError> {
    required("sandbox_id", &request.sandbox_id)?;
    let egress = wrenn_agent_api::egress_from_json(&request.egress_json)
        .map_err(|error| AgentError::InvalidArgument(error.to_string()))?;
    manager
        .update_network(&request.sandbox_id, request.allow_internet_access, egress)
        .await?;
    Ok(pb::UpdateSandboxNetworkResponse {})
}

async fn build_template(
    manager: Arc<Manager>,
    request: pb::BuildTemplateRequest,
) -> Result<pb::BuildTemplateResponse, AgentError> {
    required("template_id", &request.template_id)?;
    let image_dir =
        (!request.image_dir.is_empty()).then(|| std::path::PathBuf::from(&request.image_dir));
    let record = manager
        .build_template(
            &request.template_id,
            image_dir.as_deref(),
            request.memory_mib,
            request.vcpus,
            timeout_from_millis(request.boot_timeout_ms),
        )
        .await?;
    Ok(pb::BuildTemplateResponse {
        template: Some(template_message(&record)),
    })
}

/// `RunTemplateBuild`: the build's log as it is written, then the template (or the build's
/// error). The build runs on a task of its own; a caller that hangs up stops it, and it then
/// cleans up on that task.
async fn run_template_build(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> axum::response::Response {
    use wrenn_agent_api::build::TemplateBuild;
    let authorized = authorized(&headers, &state.token);
    // The request carries the build's COPY files.
    let most = wrenn_agent_api::build::MAX_BUILD_FILES_BYTES + DEFAULT_MAX_MESSAGE_BYTES;
    serve_server_streaming(
        &headers,
        body,
        most,
        |request: pb::RunTemplateBuildRequest| async move {
            if !authorized {
                return Err(ConnectError::new(
                    Code::Unauthenticated,
                    "a valid bearer token is required",
                ));
            }
            required("template_id", &request.template_id)?;
            required("from_template", &request.from_template)?;
            let build = TemplateBuild::try_from(request).map_err(ConnectError::invalid_argument)?;
            let (logs, lines) = tokio::sync::mpsc::unbounded_channel();
            let stop = tokio_util::sync::CancellationToken::new();
            let stop_when_dropped = stop.clone().drop_guard();
            let manager = state.manager.clone();
            let task = tokio::spawn(async move { manager.run_build(build, logs, stop).await });
            let events = futures_util::stream::unfold(
                Some((lines, task, stop_when_dropped)),
                |progress| async move {
                    let (mut lines, task, guard) = progress?;
                    if let Some(line) = lines.recv().await {
                        let event = pb::run_template_build_event::Event::Log(line.into());
                        let message = pb::RunTemplateBuildEvent { event: Some(event) };
                        return Some((Ok(message), Some((lines, task, guard))));
                    }
                    // Every sender is gone: the build has ended.
                    let ended = match task.await {
                        Ok(Ok(record)) => Ok(pb::RunTemplateBuildEvent {
                            event: Some(pb::run_template_build_event::Event::Template(
                                record.report(),
                            )),
                        }),
                        Ok(Err(error)) => {
                            tracing::info!(%error, "template build failed");
                            Err(ConnectError::from(error))
                        }
                        Err(error) => Err(ConnectError::new(
                            Code::Internal,
                            format!("the build's task failed: {error}"),
                        )),
                    };
                    drop(guard);
                    Some((ended, None))
                },
            );
            Ok(events)
        },
    )
    .await
    .into_response()
}

async fn list_templates(
    manager: Arc<Manager>,
    _: pb::ListTemplatesRequest,
) -> Result<pb::ListTemplatesResponse, AgentError> {
    Ok(pb::ListTemplatesResponse {
        templates: manager
            .list_templates()
            .iter()
            .map(template_message)
            .collect(),
    })
}

async fn delete_template(
    manager: Arc<Manager>,
    request: pb::DeleteTemplateRequest,
) -> Result<pb::DeleteTemplateResponse, AgentError> {
    required("template_id", &request.template_id)?;
    manager.delete_template(&request.template_id).await?;
    Ok(pb::DeleteTemplateResponse {})
}

/// `GET /metrics`: the process's Prometheus metrics, to the loopback or to a caller with the
/// agent's metrics token (`--metrics-token`).
async fn prometheus_metrics(
    State(state): State<ApiState>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let peer = wrenn_http::metrics::peer_of(&request);
    let token = state.manager.config().metrics_token.as_deref();
    wrenn_http::metrics::answer(request.headers(), peer, token)
}

async fn collect_telemetry(
    manager: Arc<Manager>,
    request: pb::CollectTelemetryRequest,
) -> Result<pb::CollectTelemetryResponse, AgentError> {
    Ok(manager.telemetry.collect(&request))
}

async fn host_info(
    manager: Arc<Manager>,
    _: pb::HostInfoRequest,
) -> Result<pb::HostInfoResponse, AgentError> {
    Ok(pb::HostInfoResponse {
        report: Some(crate::join::report(&manager)),
    })
}
