//! An example extension of wrenn's control plane (`wrenn_cp::server`): a per-team allow-list
//! of templates. A team with a list may create sandboxes only from the templates on it (named
//! as the create names them: an id or an alias); a team without one is not restricted. Its
//! route, `/ext/allowlist/templates` on the API, reads the caller's team's list (`GET`), sets
//! it (`PUT {"templates": [...]}`, admins and owners) or removes it (`DELETE`). The lists are
//! kept in a JSON file, written atomically.
//!
//! It uses what any extension may: a hook before every create (its refusal is the caller's
//! 403, with the reason), keyed and audited routes, the caller's key and role.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use wrenn_cp::http::{ApiError, Caller};
use wrenn_cp::server::{Extension, ExtensionRouter};
use wrenn_cp::service::SandboxRequest;
use wrenn_cp::service::hooks::{Hooks, Refusal};
use wrenn_cp::store::Role;

/// The extension's name: its routes are under `/ext/allowlist`.
pub const NAME: &str = "allowlist";
/// The most templates a list may hold.
pub const MAX_TEMPLATES: usize = 1000;
/// The longest template name a list takes.
const MAX_NAME: usize = 128;

/// Why the lists cannot be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an allow-list file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The file's content: every team's list, by team id.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Lists {
    teams: BTreeMap<String, BTreeSet<String>>,
}

/// The allow-lists, kept in a file.
#[derive(Debug)]
pub struct AllowList {
    file: PathBuf,
    lists: Mutex<Lists>,
}

impl AllowList {
    /// The lists kept in `file` (none yet when it does not exist).
    pub fn open(file: PathBuf) -> Result<Arc<AllowList>, AllowListError> {
        let lists = match std::fs::read(&file) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| AllowListError::Parse {
                    path: file.clone(),
                    source,
                })?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Lists::default(),
            Err(source) => return Err(AllowListError::Read { path: file, source }),
        };
        Ok(Arc::new(AllowList {
            file,
            lists: Mutex::new(lists),
        }))
    }

    /// Team `team_id`'s list, if it has one.
    pub fn list(&self, team_id: &str) -> Option<BTreeSet<String>> {
        let lists = self.lists.lock().expect("allow-list lock");
        lists.teams.get(team_id).cloned()
    }

    /// Sets (or, with None, removes) team `team_id`'s list, kept in the file before it holds.
    pub fn set(
        &self,
        team_id: &str,
        templates: Option<BTreeSet<String>>,
    ) -> Result<(), AllowListError> {
        let mut lists = self.lists.lock().expect("allow-list lock");
        let mut changed = lists.clone();
        match templates {
            Some(templates) => changed.teams.insert(team_id.to_string(), templates),
            None => changed.teams.remove(team_id),
        };
        let bytes = serde_json::to_vec_pretty(&changed).expect("the lists are JSON");
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(|source| AllowListError::Write {
                path: self.file.clone(),
                source,
            })?;
        }
        wrenn_cp::store::write_file_atomically(&self.file, &bytes, 0o600).map_err(|source| {
            AllowListError::Write {
                path: self.file.clone(),
                source,
            }
        })?;
        *lists = changed;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Hooks for AllowList {
    async fn before_create(&self, team_id: &str, request: &SandboxRequest) -> Result<(), Refusal> {
        let Some(allowed) = self.list(team_id) else {
            return Ok(());
        };
        if allowed.contains(&request.template) {
            return Ok(());
        }
        let names: Vec<&str> = allowed.iter().map(String::as_str).collect();
        let allowed = if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        };
        Err(Refusal(format!(
            "template \"{}\" is not on this team's template allow-list (allowed: {allowed}); \
             a team admin sets the list with PUT /ext/{NAME}/templates",
            request.template
        )))
    }
}

/// The extension: the lists' hook and route.
#[derive(Debug, Clone)]
pub struct AllowListExtension(pub Arc<AllowList>);

impl Extension for AllowListExtension {
    fn name(&self) -> &str {
        NAME
    }

    fn routes(&self) -> Option<ExtensionRouter> {
        let lists = self.0.clone();
        let (read, write, remove) = (lists.clone(), lists.clone(), lists);
        Some(
            axum::Router::new().route(
                "/templates",
                get(move |caller: Caller| read_list(read, caller))
                    .put(move |caller: Caller, body: axum::body::Bytes| {
                        write_list(write, caller, body)
                    })
                    .delete(move |caller: Caller| remove_list(remove, caller)),
            ),
        )
    }

    fn hooks(&self) -> Option<Arc<dyn Hooks>> {
        Some(self.0.clone())
    }
}

/// A team's list as the route answers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListBody {
    /// Whether the team is restricted to `templates` (false: it has no list).
    #[serde(default)]
    pub enforced: bool,
    pub templates: Vec<String>,
}

fn answer(list: Option<BTreeSet<String>>) -> Response {
    let body = ListBody {
        enforced: list.is_some(),
        templates: list.unwrap_or_default().into_iter().collect(),
    };
    axum::Json(body).into_response()
}

fn admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.role().at_least(Role::Admin) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "only a team's admins and owners may change its template allow-list",
    ))
}

fn kept(error: AllowListError) -> ApiError {
    tracing::error!(%error, "the template allow-list was not kept");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the template allow-list could not be saved; it is unchanged",
    )
}

async fn read_list(lists: Arc<AllowList>, caller: Caller) -> Response {
    answer(lists.list(caller.team_id()))
}

async fn write_list(
    lists: Arc<AllowList>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    admin(&caller)?;
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        templates: Vec<String>,
    }
    let Body { templates } = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be {{\"templates\": [\"<template>\", ...]}}: {error}"
        ))
    })?;
    if templates.len() > MAX_TEMPLATES {
        return Err(ApiError::bad_request(format!(
            "a list holds at most {MAX_TEMPLATES} templates, not {}",
            templates.len()
        )));
    }
    for name in &templates {
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "{name:?} is not a template name (1 to {MAX_NAME} characters, no control characters)"
            )));
        }
    }
    let templates: BTreeSet<String> = templates.into_iter().collect();
    lists
        .set(caller.team_id(), Some(templates.clone()))
        .map_err(kept)?;
    Ok(answer(Some(templates)))
}

async fn remove_list(lists: Arc<AllowList>, caller: Caller) -> Result<Response, ApiError> {
    admin(&caller)?;
    lists.set(caller.team_id(), None).map_err(kept)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Where the binary keeps the lists: `$WRENN_ALLOWLIST_FILE`, else
/// `<$WRENN_DATA_DIR or /var/lib/wrenn>/cp/template-allowlist.json`.
pub fn default_file() -> PathBuf {
    if let Some(file) = std::env::var_os("WRENN_ALLOWLIST_FILE") {
        return PathBuf::from(file);
    }
    let data = std::env::var_os("WRENN_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/wrenn"));
    data.join("cp/template-allowlist.json")
}
