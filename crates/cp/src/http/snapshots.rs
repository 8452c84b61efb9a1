//! The snapshot and fork routes: `POST /sandboxes/{id}/snapshots`, `GET /snapshots`, `POST
//! /sandboxes/{id}/fork` (a snapshot is deleted as a template is: `DELETE /templates/{id}`).

use super::*;

#[utoipa::path(post, path = "/sandboxes/{id}/snapshots", tag = "snapshots", security(("api_key" = [])),
    request_body = wrenn_api::SnapshotRequest,
    responses(
        (status = 201, description = "The snapshot is taken and stored; the sandbox goes on", body = wrenn_api::SnapshotInfo),
        (status = 400, description = "A bad name, or a snapshot without memory", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox", body = wrenn_api::Error),
        (status = 409, description = "The sandbox is not running, or the name is a template's", body = wrenn_api::Error),
        (status = 429, description = "The team's disk quota is reached", body = wrenn_api::Error),
    ))]
pub(super) async fn create_snapshot(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: wrenn_api::SnapshotRequest = body_json(&body)?;
    if request.memory == Some(false) {
        return Err(ApiError::bad_request(
            "memory: false is not supported: wrenn's snapshots keep the sandbox's memory \
             (pause with memory false keeps a sandbox's disk alone)",
        ));
    }
    let row = owned(&plane, &team, &id).await?;
    let snapshot = plane
        .create_snapshot(&team.0, &row.id, request.name)
        .await?;
    let info = wrenn_api::SnapshotInfo {
        snapshot_id: snapshot.snapshot_id,
        names: snapshot.names,
    };
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SnapshotParams {
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

#[utoipa::path(get, path = "/snapshots", tag = "snapshots", security(("api_key" = [])),
    params(
        ("sandboxID" = Option<String>, Query, description = "Only the snapshots of this sandbox"),
        ("name" = Option<String>, Query, description = "Only the snapshot of this name or id (with a tag: only if it has the tag)"),
        ("limit" = Option<usize>, Query, description = "Page size (default 100, at most 100)"),
        ("nextToken" = Option<String>, Query, description = "The X-Next-Token of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of the team's snapshots, oldest first", body = Vec<wrenn_api::SnapshotInfo>,
            headers(("X-Next-Token" = String, description = "The next page's token, when there is one"))),
        (status = 400, description = "A bad limit or token", body = wrenn_api::Error),
    ))]
pub(super) async fn list_snapshots(
    TeamCall { plane, team, .. }: TeamCall,
    Query(params): Query<SnapshotParams>,
) -> Result<Response, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=crate::service::snapshots::MAX_SNAPSHOT_PAGE).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 100"));
    }
    let query = crate::service::snapshots::SnapshotQuery {
        sandbox_id: params.sandbox_id.filter(|id| !id.is_empty()),
        name: params.name,
        limit,
        next_token: params.next_token.filter(|token| !token.is_empty()),
    };
    let page = plane.list_snapshots(&team.0, query).await?;
    let items: Vec<wrenn_api::SnapshotInfo> = page
        .snapshots
        .into_iter()
        .map(|snapshot| wrenn_api::SnapshotInfo {
            snapshot_id: snapshot.snapshot_id,
            names: snapshot.names,
        })
        .collect();
    let mut response = axum::Json(items).into_response();
    if let Some(token) = page.next_token
        && let Ok(value) = HeaderValue::from_str(&token)
    {
        response.headers_mut().insert("x-next-token", value);
    }
    Ok(response)
}

#[utoipa::path(post, path = "/sandboxes/{id}/fork", tag = "sandboxes", security(("api_key" = [])),
    request_body = wrenn_api::ForkRequest,
    responses(
        (status = 201, description = "The sandbox was checkpointed and the forks tried: one outcome each", body = Vec<wrenn_api::ForkResult>),
        (status = 400, description = "A bad count or timeout", body = wrenn_api::Error),
        (status = 404, description = "No such sandbox", body = wrenn_api::Error),
        (status = 409, description = "The sandbox is not running", body = wrenn_api::Error),
    ))]
pub(super) async fn fork(
    SandboxCall { plane, team, id }: SandboxCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: wrenn_api::ForkRequest = body_json(&body)?;
    let count = request.count.unwrap_or(1);
    let timeout = check_timeout(request.timeout.unwrap_or(15))?;
    let row = owned(&plane, &team, &id).await?;
    let forks = plane.fork(&team.0, &row.id, count, timeout).await?;
    let results: Vec<wrenn_api::ForkResult> = forks
        .into_iter()
        .map(|fork| match fork {
            Ok(created) => wrenn_api::ForkResult {
                sandbox: Some(sandbox_body(&plane, &created.row)),
                error: None,
            },
            Err(error) => {
                let error = ApiError::from(error);
                wrenn_api::ForkResult {
                    sandbox: None,
                    error: Some(wrenn_api::Error {
                        code: error.status().as_u16(),
                        message: error.message().to_string(),
                    }),
                }
            }
        })
        .collect();
    Ok((StatusCode::CREATED, axum::Json(results)).into_response())
}
