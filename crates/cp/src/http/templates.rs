//! The template routes: the templates up hosts have, and alias lookups.

use super::*;

#[utoipa::path(get, path = "/templates", tag = "templates", security(("api_key" = [])),
    responses(
        (status = 200, description = "The templates up hosts have", body = Vec<wrenn_api::Template>),
    ))]
pub(super) async fn list_templates(State(plane): State<Arc<ControlPlane>>) -> Response {
    let templates: Vec<wrenn_api::Template> = plane
        .fleet
        .templates()
        .iter()
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
    axum::Json(templates).into_response()
}

#[utoipa::path(get, path = "/templates/aliases/{alias}", tag = "templates", security(("api_key" = [])),
    responses(
        (status = 200, description = "The template", body = wrenn_api::TemplateAlias),
    ))]
pub(super) async fn template_alias(
    State(plane): State<Arc<ControlPlane>>,
    Path(alias): Path<String>,
) -> Result<Response, ApiError> {
    plane
        .fleet
        .templates()
        .iter()
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
