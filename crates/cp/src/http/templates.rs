//! The template routes: the templates up hosts have and the team's own, alias lookups, and
//! E2B's template build API (request a build, start it, read its status and log).

use super::*;

#[utoipa::path(get, path = "/templates", tag = "templates", security(("api_key" = [])),
    responses(
        (status = 200, description = "The templates up hosts have, then the team's own and the public ones", body = Vec<wrenn_api::Template>),
    ))]
pub(super) async fn list_templates(
    TeamCall { plane, team, .. }: TeamCall,
) -> Result<Response, ApiError> {
    use crate::service::templates::is_build_template;
    let mut templates: Vec<wrenn_api::Template> = plane
        .fleet
        .templates()
        .iter()
        .filter(|t| !is_build_template(&t.template_id))
        .map(|t| wrenn_api::Template {
            template_id: t.template_id.clone(),
            build_id: t.image_key.get(..16).unwrap_or("").into(),
            cpu_count: t.vcpus,
            memory_mb: t.memory_mib,
            disk_size_mb: t.disk_size_mb,
            public: true,
            aliases: vec![t.template_id.clone()],
            names: vec![t.template_id.clone()],
            created_at: rfc3339(t.created_at_ms),
            updated_at: rfc3339(t.created_at_ms),
            last_spawned_at: None,
            spawn_count: 0,
            build_count: 1,
            envd_version: t.envd_version.clone(),
            build_status: "ready".into(),
        })
        .collect();
    for template in plane.store.templates_for(&team.0).await? {
        let builds = plane.store.builds_of(&template.id).await?;
        let ready = builds
            .iter()
            .find(|build| Some(&build.id) == template.ready_build_id.as_ref());
        let last = builds.last();
        let shown = ready.or(last);
        let alias: Vec<String> = template.alias.iter().cloned().collect();
        templates.push(wrenn_api::Template {
            template_id: template.id.clone(),
            build_id: shown.map(|b| b.id.clone()).unwrap_or_default(),
            cpu_count: shown.map_or(template.cpu_count, |b| b.cpu_count).max(1),
            memory_mb: shown.map_or(template.memory_mb, |b| b.memory_mb).max(128),
            disk_size_mb: shown.map_or(0, |b| u64::from(b.disk_size_mb)),
            public: template.public,
            names: alias.clone(),
            aliases: alias,
            created_at: rfc3339(template.created_at_ms),
            updated_at: rfc3339(template.updated_at_ms),
            last_spawned_at: None,
            spawn_count: 0,
            build_count: builds.len() as u64,
            envd_version: shown.map(|b| b.envd_version.clone()).unwrap_or_default(),
            build_status: if ready.is_some() {
                "ready".into()
            } else {
                last.map_or("waiting", |b| b.status.as_str()).into()
            },
        });
    }
    Ok(axum::Json(templates).into_response())
}

#[utoipa::path(post, path = "/v3/templates", tag = "templates", security(("api_key" = [])),
    request_body = wrenn_api::TemplateBuildRequest,
    responses(
        (status = 202, description = "The template (new, or the team's of that name) and a build of it, to start", body = wrenn_api::TemplateBuildRequested),
        (status = 400, description = "A bad name or size", body = wrenn_api::Error),
        (status = 409, description = "Another team's template has that name", body = wrenn_api::Error),
    ))]
pub(super) async fn request_build(
    TeamCall { plane, team, .. }: TeamCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: wrenn_api::TemplateBuildRequest = body_json(&body)?;
    if request.min_free_disk_mb.is_some_and(|mb| mb > 0) {
        return Err(ApiError::bad_request(
            "minFreeDiskMb is not supported by wrenn: a build's host needs the template's disk free",
        ));
    }
    let name = request
        .name
        .filter(|name| !name.is_empty())
        .or(request.alias)
        .unwrap_or_default();
    let new = crate::service::templates::NewBuild {
        name,
        tags: request.tags.unwrap_or_default(),
        cpu_count: request.cpu_count,
        memory_mb: request.memory_mb,
    };
    let (template, build, tags) = plane.request_build(&team.0, new).await?;
    let aliases: Vec<String> = template.alias.iter().cloned().collect();
    let answer = wrenn_api::TemplateBuildRequested {
        template_id: template.id,
        build_id: build.id,
        public: template.public,
        names: aliases.clone(),
        tags,
        aliases,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(answer)).into_response())
}

#[utoipa::path(post, path = "/v2/templates/{template_id}/builds/{build_id}", tag = "templates", security(("api_key" = [])),
    request_body = wrenn_api::TemplateBuildStart,
    responses(
        (status = 202, description = "The build runs"),
        (status = 400, description = "A bad step, an unknown build, or a source wrenn does not build from", body = wrenn_api::Error),
        (status = 404, description = "No such template", body = wrenn_api::Error),
        (status = 409, description = "The build was started already", body = wrenn_api::Error),
        (status = 429, description = "A team quota is reached (a build counts as a running sandbox)", body = wrenn_api::Error),
        (status = 503, description = "No host has the template it starts from, or room", body = wrenn_api::Error),
    ))]
pub(super) async fn start_build(
    KeyedCall {
        plane,
        team,
        id: (template_id, build_id),
    }: KeyedCall<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: wrenn_api::TemplateBuildStart = body_json(&body)?;
    let registry_login = match request.from_image_registry.as_ref() {
        None | Some(serde_json::Value::Null) => None,
        Some(_) if request.from_image.is_none() => {
            return Err(ApiError::bad_request(
                "fromImageRegistry is given without fromImage",
            ));
        }
        Some(registry) => Some(registry_login(registry)?),
    };
    let spec = crate::service::templates::BuildSpec {
        from_template: request.from_template,
        from_image: request.from_image,
        registry_login,
        force: request.force,
        steps: request
            .steps
            .into_iter()
            .map(|step| (step.kind, step.args, step.files_hash, step.force))
            .collect(),
        start_cmd: request.start_cmd,
        ready_cmd: request.ready_cmd,
    };
    plane
        .start_build(&team.0, &template_id, &build_id, spec)
        .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// The username and password E2B's `fromImageRegistry` gives: `registry` (a username and
/// password) or `gcp` (a service account's JSON key, Google's registries' `_json_key` login).
/// `aws` would need ECR's token exchange, which wrenn does not do: its own login is refused.
fn registry_login(registry: &serde_json::Value) -> Result<(String, String), ApiError> {
    let text = |name: &str| {
        registry
            .get(name)
            .and_then(serde_json::Value::as_str)
            .filter(|value| !value.is_empty())
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_request(format!("fromImageRegistry: {name} is required")))
    };
    match registry.get("type").and_then(serde_json::Value::as_str) {
        Some("registry") => Ok((text("username")?, text("password")?)),
        Some("gcp") => Ok(("_json_key".to_string(), text("serviceAccountJson")?)),
        Some("aws") => Err(ApiError::bad_request(
            "fromImageRegistry of type aws is not supported: give type registry, username AWS \
             and the password `aws ecr get-login-password` prints",
        )),
        other => Err(ApiError::bad_request(format!(
            "fromImageRegistry: type {other:?} is not one of registry, gcp, aws"
        ))),
    }
}

/// `GET /templates/{templateID}/builds/{buildID}/status`'s query.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase")]
pub(super) struct StatusQuery {
    /// The first log line to return (0-based).
    #[serde(default)]
    logs_offset: Option<i64>,
    /// The most log lines to return (at most 100).
    #[serde(default)]
    limit: Option<i64>,
}

#[utoipa::path(get, path = "/templates/{template_id}/builds/{build_id}/status", tag = "templates", security(("api_key" = [])),
    params(StatusQuery),
    responses(
        (status = 200, description = "The build, and its log from logsOffset on", body = wrenn_api::TemplateBuildInfo),
        (status = 400, description = "An unknown build", body = wrenn_api::Error),
        (status = 404, description = "No such template", body = wrenn_api::Error),
    ))]
pub(super) async fn build_status(
    KeyedCall {
        plane,
        team,
        id: (template_id, build_id),
    }: KeyedCall<(String, String)>,
    Query(query): Query<StatusQuery>,
) -> Result<Response, ApiError> {
    use crate::service::templates::MAX_LOG_PAGE;
    let (build, lines) = plane
        .build_status(
            &team.0,
            &template_id,
            &build_id,
            query.logs_offset.unwrap_or(0),
            query.limit.unwrap_or(MAX_LOG_PAGE),
        )
        .await?;
    let entry = |line: crate::store::BuildLogRow| wrenn_api::BuildLogEntry {
        timestamp: rfc3339(line.timestamp_ms),
        message: line.message,
        level: line.level,
        step: line.step,
    };
    let reason = build
        .reason
        .clone()
        .map(|message| wrenn_api::BuildStatusReason {
            message,
            step: build.reason_step.clone(),
            log_entries: Vec::new(),
        });
    let info = wrenn_api::TemplateBuildInfo {
        template_id: build.template_id.clone(),
        build_id: build.id.clone(),
        status: build.status.as_str().into(),
        logs: Vec::new(),
        log_entries: lines.into_iter().map(entry).collect(),
        reason,
    };
    Ok(axum::Json(info).into_response())
}

#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = "templates", security(("api_key" = [])),
    responses(
        (status = 200, description = "The template", body = wrenn_api::TemplateAlias),
        (status = 403, description = "Another team's private template has that name", body = wrenn_api::Error),
        (status = 404, description = "No template has that name", body = wrenn_api::Error),
    ))]
pub(super) async fn template_alias(
    KeyedCall {
        plane,
        team,
        id: alias,
    }: KeyedCall<String>,
) -> Result<Response, ApiError> {
    let name = alias
        .split(':')
        .next()
        .unwrap_or(&alias)
        .to_ascii_lowercase();
    if let Some(template) = plane.store.template_by_alias(&name).await? {
        if template.team_id != team.0 && !template.public {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("template alias '{alias}' belongs to another team"),
            ));
        }
        let found = wrenn_api::TemplateAlias {
            template_id: template.id,
            public: template.public,
        };
        return Ok(axum::Json(found).into_response());
    }
    plane
        .fleet
        .templates()
        .iter()
        .filter(|t| !crate::service::templates::is_build_template(&t.template_id))
        .find(|t| t.template_id == alias)
        .map(|t| {
            axum::Json(wrenn_api::TemplateAlias {
                template_id: t.template_id.clone(),
                public: true,
            })
            .into_response()
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("template alias '{alias}' not found"),
            )
        })
}

#[utoipa::path(delete, path = "/templates/{template_id}", tag = "templates", security(("api_key" = [])),
    responses(
        (status = 204, description = "Deleted, with its builds on their hosts and in the template store; its sandboxes go on, and a host keeps its copy until they are gone"),
        (status = 403, description = "Another team's public template", body = wrenn_api::Error),
        (status = 409, description = "Another template's build stands on it, or a build of it runs elsewhere or did not stop (a build this control plane runs is cancelled)", body = wrenn_api::Error),
    ))]
pub(super) async fn delete_template(
    KeyedCall {
        plane,
        team,
        id: template_id,
    }: KeyedCall<String>,
) -> Result<Response, ApiError> {
    plane.delete_template(&team.0, &template_id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/templates/tags", tag = "templates", security(("api_key" = [])),
    request_body = wrenn_api::AssignTags,
    responses(
        (status = 201, description = "The tags name the build the target names", body = wrenn_api::AssignedTags),
        (status = 400, description = "A bad tag, or none", body = wrenn_api::Error),
        (status = 403, description = "Another team's public template", body = wrenn_api::Error),
        (status = 404, description = "No such template or tag", body = wrenn_api::Error),
    ))]
pub(super) async fn assign_tags(
    TeamCall { plane, team, .. }: TeamCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: wrenn_api::AssignTags = body_json(&body)?;
    let (build_id, tags) = plane
        .assign_tags(&team.0, &request.target, request.tags)
        .await?;
    let answer = wrenn_api::AssignedTags { tags, build_id };
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

#[utoipa::path(delete, path = "/templates/tags", tag = "templates", security(("api_key" = [])),
    request_body = wrenn_api::RemoveTags,
    responses(
        (status = 204, description = "The tags are gone"),
        (status = 400, description = "A bad tag, or none", body = wrenn_api::Error),
        (status = 403, description = "Another team's public template", body = wrenn_api::Error),
        (status = 404, description = "No such template", body = wrenn_api::Error),
    ))]
pub(super) async fn remove_tags(
    TeamCall { plane, team, .. }: TeamCall,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: wrenn_api::RemoveTags = body_json(&body)?;
    plane
        .remove_tags(&team.0, &request.name, request.tags)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/templates/{template_id}/tags", tag = "templates", security(("api_key" = [])),
    responses(
        (status = 200, description = "The template's tags and the builds they name", body = Vec<wrenn_api::TemplateTag>),
    ))]
pub(super) async fn template_tags(
    KeyedCall {
        plane,
        team,
        id: template_id,
    }: KeyedCall<String>,
) -> Result<Response, ApiError> {
    let tags: Vec<wrenn_api::TemplateTag> = plane
        .tags(&team.0, &template_id)
        .await?
        .into_iter()
        .map(|row| wrenn_api::TemplateTag {
            tag: row.tag,
            build_id: row.build_id,
            created_at: rfc3339(row.created_at_ms),
        })
        .collect();
    Ok(axum::Json(tags).into_response())
}

#[utoipa::path(get, path = "/templates/{template_id}/files/{hash}", tag = "templates", security(("api_key" = [])),
    params(("hash" = String, Path, description = "The SHA-256 (lowercase hex) of a COPY step's files")),
    responses(
        (status = 201, description = "Whether the files are there, else a link to PUT them to", body = wrenn_api::TemplateFilesUpload),
        (status = 400, description = "Not a SHA-256", body = wrenn_api::Error),
        (status = 403, description = "Another team's public template", body = wrenn_api::Error),
        (status = 429, description = "The team's uploaded files hold their limit", body = wrenn_api::Error),
    ))]
pub(super) async fn template_files(
    KeyedCall {
        plane,
        team,
        id: (template_id, hash),
    }: KeyedCall<(String, String)>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let (present, token) = plane.files_upload(&team.0, &template_id, &hash).await?;
    let url = match token {
        Some(token) => {
            // HTTP/1.1's Host, or HTTP/2's :authority.
            let host = headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| uri.authority().map(|a| a.to_string()))
                .ok_or_else(|| ApiError::bad_request("the request names no host"))?;
            let scheme = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .filter(|proto| *proto == "https")
                .unwrap_or("http");
            Some(format!("{scheme}://{host}/templates/files/uploads/{token}"))
        }
        None => None,
    };
    let answer = wrenn_api::TemplateFilesUpload { present, url };
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// `PUT /templates/files/uploads/{token}`: the files of a COPY step, sent to the link `GET
/// /templates/{templateID}/files/{hash}` gave (it needs no key: the link authorises itself,
/// once). Written whole or not at all.
#[utoipa::path(put, path = "/templates/files/uploads/{token}", tag = "templates",
    params(("token" = String, Path, description = "The upload link's token")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A tar, gzipped or not"),
    responses(
        (status = 201, description = "Kept"),
        (status = 401, description = "An unknown, used or expired link", body = wrenn_api::Error),
        (status = 413, description = "Larger than 256 MiB", body = wrenn_api::Error),
    ))]
pub(super) async fn upload_template_files(
    State(plane): State<Arc<ControlPlane>>,
    Path(token): Path<String>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    let store = plane
        .template_files
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("this control plane keeps no uploaded files"))?;
    let (path, temporary) = store.take_upload(&token)?;
    let failed = |error: std::io::Error| {
        crate::Error::Internal(format!("keeping the uploaded files: {error}"))
    };
    let mut file = tokio::fs::File::create(&temporary).await.map_err(failed)?;
    let mut body = body;
    let mut written = 0u64;
    let outcome = async {
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|error| ApiError::bad_request(format!("the upload broke off: {error}")))?;
            if let Ok(data) = frame.into_data() {
                written += data.len() as u64;
                if written > crate::service::templates::MAX_UPLOAD_BYTES {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "an upload is at most {} MiB",
                            crate::service::templates::MAX_UPLOAD_BYTES >> 20
                        ),
                    ));
                }
                file.write_all(&data).await.map_err(failed)?;
            }
        }
        file.sync_all().await.map_err(failed)?;
        tokio::fs::rename(&temporary, &path).await.map_err(failed)?;
        Ok(())
    }
    .await;
    if outcome.is_err() {
        let _ = tokio::fs::remove_file(&temporary).await;
    }
    outcome?;
    Ok(StatusCode::CREATED.into_response())
}
