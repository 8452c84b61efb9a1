//! The REST API's OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations
//! and the `wrenn-api` types. It is served at `GET /openapi.json` and checked in as
//! `docs/openapi.json`; a test fails when the two differ, and the API tests validate every
//! answer they get against it.

use utoipa::OpenApi;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};

use super::{
    audit, channels, events, hosts, keys, sandboxes, snapshots, telemetry, templates, users,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "wrenn",
        description = "wrenn's control plane: E2B's sandbox REST API (the `e2b` SDKs work against it unmodified) and wrenn's fleet routes.",
        license(name = "Apache-2.0"),
    ),
    paths(
        sandboxes::create_sandbox,
        sandboxes::list_v1,
        sandboxes::list_v2,
        sandboxes::get_sandbox,
        sandboxes::kill_sandbox,
        sandboxes::set_timeout,
        sandboxes::refresh,
        sandboxes::pause,
        sandboxes::connect,
        sandboxes::resume,
        sandboxes::update_network,
        telemetry::metrics,
        telemetry::metrics_of_many,
        telemetry::logs_v1,
        telemetry::logs_v2,
        telemetry::usage,
        snapshots::create_snapshot,
        snapshots::list_snapshots,
        snapshots::fork,
        templates::list_templates,
        templates::request_build,
        templates::start_build,
        templates::build_status,
        templates::delete_template,
        templates::assign_tags,
        templates::remove_tags,
        templates::template_tags,
        templates::template_files,
        templates::upload_template_files,
        templates::template_alias,
        hosts::list_hosts,
        hosts::forget_host,
        keys::list_keys,
        keys::create_key,
        keys::rename_key,
        keys::revoke_key,
        keys::list_teams,
        events::list_events,
        events::stream_events,
        audit::list_audit,
        users::login,
        users::logout,
        users::me,
        users::create_team,
        users::delete_team,
        users::list_members,
        users::set_member_role,
        users::remove_member,
        users::invite,
        users::accept_invitation,
        users::create_access_token,
        users::delete_access_token,
        channels::list_channels,
        channels::create_channel,
        channels::get_channel,
        channels::update_channel,
        channels::delete_channel,
        channels::test_channel,
        channels::list_deliveries,
        super::health,
        super::openapi_document,
        super::prometheus_metrics,
    ),
    modifiers(&Security, &V2Aliases, &PathNames, &KeyErrors, &OtherErrors),
    tags(
        (name = "sandboxes", description = "Sandboxes: create, list, pause, resume, kill, metrics, logs"),
        (name = "usage", description = "A team's use by day: sandbox-seconds and GiB-seconds"),
        (name = "templates", description = "The templates sandboxes start from"),
        (name = "snapshots", description = "Persistent snapshots of running sandboxes (deleted as templates are)"),
        (name = "hosts", description = "The fleet of host agents (admin teams; agents join over Connect, wrenn.agent.v1.HostRegistry)"),
        (name = "api-keys", description = "A team's API keys (E2B's routes): members list them, admins and owners make, rename and revoke them"),
        (name = "teams", description = "The caller's teams (E2B's route)"),
        (name = "events", description = "Lifecycle events: sandboxes, snapshots, hosts, templates, keys"),
        (name = "audit", description = "The audit log of every call that changes state (a team's admins and owners; operators)"),
        (name = "users", description = "Users (email and password; sessions and access tokens as `Authorization: Bearer`), their teams, members, roles and invitations"),
        (name = "channels", description = "Notification channels: where a team's events go (signed webhooks, Slack, Discord), with their delivery logs"),
        (name = "service", description = "The control plane itself"),
    )
)]
struct ApiDoc;

/// The security scheme: a team's API key.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(utoipa::openapi::security::Http::new(
                utoipa::openapi::security::HttpAuthScheme::Bearer,
            )),
        );
    }
}

/// The SDKs' newer paths that are the same operation as an older one (one handler serves both):
/// `(new path, old path)`, both `POST`.
const V2_ALIASES: [(&str, &str); 2] = [
    ("/v2/sandboxes", "/sandboxes"),
    ("/v2/sandboxes/{id}/connect", "/sandboxes/{id}/connect"),
];

/// Documents each [`V2_ALIASES`] path as a copy of its old path's operation.
struct V2Aliases;

impl utoipa::Modify for V2Aliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (new, old) in V2_ALIASES {
            let Some(mut operation) = openapi
                .paths
                .paths
                .get(old)
                .and_then(|item| item.post.clone())
            else {
                continue;
            };
            operation.operation_id = operation.operation_id.map(|id| format!("{id}_v2"));
            operation.summary = Some(format!("`POST {new}`: the same as `POST {old}`."));
            let item = openapi.paths.paths.entry(new.to_string()).or_default();
            item.post = Some(operation);
        }
    }
}

/// An answer with the `Error` body.
fn error_answer(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let body = ContentBuilder::new()
        .schema(Some(RefOr::Ref(Ref::from_schema_name("Error"))))
        .build();
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content("application/json", body)
            .build(),
    )
}

/// Every operation of the document, with its path.
fn operations(
    openapi: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = (&String, &mut utoipa::openapi::path::Operation)> {
    openapi.paths.paths.iter_mut().flat_map(|(path, item)| {
        [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        .map(move |operation| (path, operation))
    })
}

/// The answers every route of a kind has, written once: 401 on every route that takes an API
/// key, and 403 on every fleet (`hosts`) route, which only an admin team may call.
struct KeyErrors;

impl utoipa::Modify for KeyErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (_, operation) in operations(openapi) {
            let takes_key = operation.security.iter().flatten().any(|requirement| {
                serde_json::to_value(requirement).is_ok_and(|value| value.get("api_key").is_some())
            });
            let admin_only = operation
                .tags
                .as_ref()
                .is_some_and(|tags| tags.iter().any(|t| t == "hosts"));
            let answers = &mut operation.responses.responses;
            if takes_key {
                answers
                    .entry("401".into())
                    .or_insert_with(|| error_answer("No valid API key"));
            }
            if admin_only {
                answers
                    .entry("403".into())
                    .or_insert_with(|| error_answer("The key's team is not an admin"));
            }
        }
    }
}

/// What a path parameter names, the same on every route that has it: `(parameter, its
/// description, the description of the 404 when there is no such thing)`.
const PATH_NAMES: [(&str, &str, &str); 7] = [
    // Another team's sandbox is not found either.
    ("id", "The sandbox's id", "No such sandbox of the team"),
    ("alias", "A template's alias", "No such template"),
    ("name", "The host's name", "No such host"),
    (
        "api_key_id",
        "The API key's id",
        "No such live key of the team",
    ),
    (
        "template_id",
        "A template's id or name",
        "No such template of the team",
    ),
    (
        "build_id",
        "A build of the template (a UUID)",
        "No such template",
    ),
    (
        "channel_id",
        "The channel's id",
        "No such channel of the team",
    ),
];

/// Documents each route's path parameters ([`PATH_NAMES`]): the parameter, and the 404 of a
/// name that names nothing.
struct PathNames;

impl utoipa::Modify for PathNames {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::{ObjectBuilder, Required, Type};
        for (path, operation) in operations(openapi) {
            let named = PATH_NAMES
                .iter()
                .filter(|(name, _, _)| path.contains(&format!("{{{name}}}")));
            for (index, (name, description, missing)) in named.enumerate() {
                let parameter = ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Path)
                    .description(Some(*description))
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .build();
                // Path parameters first, before any of the handler's own.
                let parameters = operation.parameters.get_or_insert_with(Vec::new);
                parameters.insert(index, parameter);
                operation
                    .responses
                    .responses
                    .entry("404".into())
                    .or_insert_with(|| error_answer(missing));
            }
        }
    }
}

/// Every operation's `default` answer: any other error (a host that failed, timed out or had
/// no room; a store that failed) has the same body.
struct OtherErrors;

impl utoipa::Modify for OtherErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let error = error_answer(
            "Any other error (a host that failed, timed out or had no room; a store that failed): the message says what happened",
        );
        for (_, operation) in operations(openapi) {
            let service = operation
                .tags
                .as_ref()
                .is_some_and(|tags| tags.iter().any(|t| t == "service"));
            if !service {
                operation
                    .responses
                    .responses
                    .insert("default".into(), error.clone());
            }
        }
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    // The crate's version, not utoipa's default (the package version of this crate anyway),
    // set here so it is one place.
    document.info.version = env!("CARGO_PKG_VERSION").to_string();
    document
}

/// The document as served and checked in: pretty JSON with a final newline.
pub fn document_json() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("an OpenAPI document always serializes");
    text.push('\n');
    text
}
