//! Templates a team builds (E2B's template build API): a template is asked for by name
//! ([`ControlPlane::request_build`], which also makes its first or next build), its build
//! started from a template the fleet has or from a registry's image ([`ControlPlane::start_build`];
//! an image gets the base template's kernel and guest files on the host) and run as a job on a
//! host that has that template and room for the VM, its log kept in the store as the host
//! streams it ([`ControlPlane::build_status`] reads it from an offset). A ready build is what
//! the template's sandboxes start from: a create names the template by its id or name and
//! runs on a host that has the build ([`ControlPlane::resolve_template`]).

use std::sync::Arc;

use wrenn_agent_api::HostAgentError;
use wrenn_agent_api::build::{
    BuildLog, BuildStep, DEFAULT_BUILD_DEADLINE, ImageSource, StepKind, TemplateBuild,
};
use wrenn_agent_api::image_reference::ImageReference;
use wrenn_core::now_ms;

use super::{ControlPlane, Error};
use crate::auth;
use crate::events::EventKind;
use crate::store::{BuildLogRow, BuildRow, BuildStatus, TemplateRow};
use serde_json::json;

/// The image the SDKs' `from_base_image()` names (on Docker Hub): built as wrenn's base.
const E2B_BASE_IMAGE: &str = "e2bdev/base";
/// The host template whose kernel and guest files builds from images take.
const BASE_TEMPLATE: &str = "base";
/// The longest template name.
const MAX_NAME: usize = 128;
/// The most log lines one status answer carries.
pub const MAX_LOG_PAGE: i64 = 100;

/// A template asked for by `POST /v3/templates`.
#[derive(Debug, Clone, Default)]
pub struct NewBuild {
    /// `name` or `name:tag`.
    pub name: String,
    pub tags: Vec<String>,
    pub cpu_count: Option<u32>,
    pub memory_mb: Option<u32>,
}

/// What a build does, as `POST /v2/templates/{id}/builds/{bid}` asks it.
#[derive(Debug, Clone, Default)]
pub struct BuildSpec {
    pub from_template: Option<String>,
    pub from_image: Option<String>,
    /// A login for `from_image`'s registry: username and password.
    pub registry_login: Option<(String, String)>,
    /// Run every step even when a host has a template built of the same.
    pub force: bool,
    pub steps: Vec<(String, Vec<String>, Option<String>, bool)>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
}

/// The files template builds copy (E2B's `filesHash` uploads): one file a team and hash, in
/// `<dir>/<team id>/<hash>`, written whole or not at all. An upload is authorised by a token
/// the files route handed out, good for [`UPLOAD_TOKEN_LIFE`].
#[derive(Debug)]
pub struct TemplateFiles {
    dir: std::path::PathBuf,
    uploads: std::sync::Mutex<std::collections::HashMap<String, PendingUpload>>,
    /// The most a team's files may hold: past it, no upload link is handed out.
    team_limit_bytes: u64,
}

/// The most a team's uploaded files may hold, by default.
pub const TEAM_FILES_BYTES: u64 = 4 << 30;
/// Uploaded files that no build used for this long are removed.
pub const UNUSED_FILES_LIFE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// How long an upload link works.
pub const UPLOAD_TOKEN_LIFE: std::time::Duration = std::time::Duration::from_secs(3600);
/// The largest upload taken.
pub const MAX_UPLOAD_BYTES: u64 = wrenn_agent_api::build::MAX_BUILD_FILES_BYTES as u64;

#[derive(Debug, Clone)]
struct PendingUpload {
    team_id: String,
    hash: String,
    expires: std::time::Instant,
}

/// Whether `hash` is a SHA-256 in lowercase hex, as the SDKs send it.
fn valid_hash(hash: &str) -> bool {
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TemplateFiles {
    pub fn new(dir: std::path::PathBuf) -> TemplateFiles {
        TemplateFiles {
            dir,
            uploads: Default::default(),
            team_limit_bytes: TEAM_FILES_BYTES,
        }
    }

    /// The same, with every team's files limited to `bytes`.
    pub fn with_team_limit(self, bytes: u64) -> TemplateFiles {
        TemplateFiles {
            team_limit_bytes: bytes,
            ..self
        }
    }

    /// What team `team_id`'s files hold.
    pub fn team_bytes(&self, team_id: &str) -> u64 {
        std::fs::read_dir(self.dir.join(team_id))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| entry.metadata().ok())
                    .filter(|meta| meta.is_file())
                    .map(|meta| meta.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Notes that a build used the team's files of `hash` (they are kept
    /// [`UNUSED_FILES_LIFE`] from now).
    pub fn used(&self, team_id: &str, hash: &str) {
        let path = self.path(team_id, hash);
        let touched = std::fs::File::options()
            .append(true)
            .open(&path)
            .and_then(|file| file.set_modified(std::time::SystemTime::now()));
        if let Err(error) = touched {
            tracing::warn!(path = %path.display(), %error, "could not mark template files used");
        }
    }

    /// Removes the files (and broken-off uploads) not written or used for `life`: how many.
    pub fn remove_unused(&self, life: std::time::Duration) -> u64 {
        let Some(oldest) = std::time::SystemTime::now().checked_sub(life) else {
            return 0;
        };
        let mut removed = 0;
        let Ok(teams) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        for team in teams.flatten() {
            let Ok(files) = std::fs::read_dir(team.path()) else {
                continue;
            };
            for file in files.flatten() {
                let old = file
                    .metadata()
                    .and_then(|meta| meta.modified())
                    .is_ok_and(|modified| modified < oldest);
                if old && std::fs::remove_file(file.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Where team `team_id`'s files of `hash` are kept (`hash` must be a SHA-256 in hex:
    /// nothing else names a path here).
    pub fn path(&self, team_id: &str, hash: &str) -> std::path::PathBuf {
        assert!(
            valid_hash(hash),
            "a files hash that is no SHA-256 reached the files store"
        );
        self.dir.join(team_id).join(hash)
    }

    /// Whether they are there.
    pub fn present(&self, team_id: &str, hash: &str) -> bool {
        self.path(team_id, hash).is_file()
    }

    /// A token authorising one upload of `hash` for the team.
    pub fn upload_token(&self, team_id: &str, hash: &str) -> Result<String, Error> {
        // The links handed out and not used yet count as full uploads.
        let pending = {
            let mut uploads = self.uploads.lock().expect("uploads lock");
            let now = std::time::Instant::now();
            uploads.retain(|_, pending| pending.expires > now);
            uploads
                .values()
                .filter(|pending| pending.team_id == team_id)
                .count() as u64
        };
        let used = self.team_bytes(team_id) + pending * MAX_UPLOAD_BYTES;
        if used >= self.team_limit_bytes {
            return Err(crate::quota::QuotaExceeded::TemplateFiles {
                team: team_id.to_string(),
                used_mib: used >> 20,
                unused_days: UNUSED_FILES_LIFE.as_secs() / 86400,
            }
            .into());
        }
        let token = wrenn_core::random::hex_token(24)?;
        let mut uploads = self.uploads.lock().expect("uploads lock");
        let now = std::time::Instant::now();
        uploads.retain(|_, pending| pending.expires > now);
        uploads.insert(
            token.clone(),
            PendingUpload {
                team_id: team_id.to_string(),
                hash: hash.to_string(),
                expires: now + UPLOAD_TOKEN_LIFE,
            },
        );
        Ok(token)
    }

    /// Takes an upload `token` authorises: the file's final path, and a temporary one to write
    /// first (rename it over the final one once whole).
    pub fn take_upload(
        &self,
        token: &str,
    ) -> Result<(std::path::PathBuf, std::path::PathBuf), Error> {
        let pending = self
            .uploads
            .lock()
            .expect("uploads lock")
            .remove(token)
            .filter(|pending| pending.expires > std::time::Instant::now())
            .ok_or_else(|| {
                Error::Unauthenticated("this upload link is unknown, used or expired".into())
            })?;
        let path = self.path(&pending.team_id, &pending.hash);
        let dir = path.parent().expect("a team's directory");
        std::fs::create_dir_all(dir)
            .map_err(|error| Error::Internal(format!("the template files directory: {error}")))?;
        let temporary = dir.join(format!(".{}.{token}.part", pending.hash));
        Ok((path, temporary))
    }
}

/// How long a template's delete waits for the builds it cancels to end.
const BUILD_CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A template as the API names it, and as the hosts do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTemplate {
    /// The hosts' name of it (its ready build's template, or `base`).
    pub on_hosts: String,
    /// Its id in the API.
    pub id: String,
    pub alias: Option<String>,
    /// Its figures when it is a ready build's, which the template store has (hosts with
    /// a store may pull it): placement may then take a host that lacks it.
    pub stored: Option<wrenn_agent_api::join::TemplateReport>,
    /// A snapshot's network settings, which its sandboxes start with unless their create
    /// sets their own.
    pub network: Option<crate::store::StoredNetwork>,
}

/// A template's name split into its alias and its tag (`default` when none is given).
pub fn split_name(name: &str) -> Result<(String, String), Error> {
    let name = name.trim();
    if name.is_empty() {
        return Err(Error::InvalidRequest("a template needs a name".into()));
    }
    if name.len() > MAX_NAME {
        return Err(Error::InvalidRequest(format!(
            "a template name is at most {MAX_NAME} characters"
        )));
    }
    let (alias, tag) = match name.split_once(':') {
        Some((alias, tag)) => (alias, tag),
        None => (name, "default"),
    };
    let alias = alias.to_ascii_lowercase();
    let tag = tag.to_ascii_lowercase();
    let fits = |text: &str, extra: &[u8]| {
        !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
    };
    if !fits(&alias, b"-_") {
        return Err(Error::InvalidRequest(format!(
            "template name {alias:?}: use lowercase letters, digits, '-' and '_'"
        )));
    }
    if !fits(&tag, b"-_.") {
        return Err(Error::InvalidRequest(format!(
            "template tag {tag:?}: use lowercase letters, digits, '-', '_' and '.'"
        )));
    }
    Ok((alias, tag))
}

/// A new build id: a random (version 4) UUID.
pub(super) fn new_build_id() -> Result<String, Error> {
    Ok(crate::auth::random_uuid()?)
}

/// The name a build's template has on the hosts.
pub(super) fn host_template_id(build_id: &str) -> String {
    format!("b{}", build_id.replace('-', ""))
}

/// Tags as a request gives them, checked and lowercased; at least one.
fn checked_tags(tags: Vec<String>) -> Result<Vec<String>, Error> {
    let mut checked = Vec::new();
    for tag in tags {
        let (_, tag) = split_name(&format!("x:{tag}"))?;
        if !checked.contains(&tag) {
            checked.push(tag);
        }
    }
    if checked.is_empty() {
        return Err(Error::InvalidRequest("no tags given".into()));
    }
    Ok(checked)
}

/// Whether a template of the hosts is a build's (`b` and a UUID's 32 hex digits): those belong
/// to their team's template, and are neither listed nor named as the hosts' own.
pub fn is_build_template(host_template: &str) -> bool {
    host_template.len() == 33
        && host_template.starts_with('b')
        && host_template[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The step (1-based) an agent's build error names (`step 3 (RUN …): …`), if any.
fn failed_step(message: &str) -> Option<String> {
    let rest = message.split("step ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

impl ControlPlane {
    /// `POST /v3/templates`: the team's template of that name (made now if it has none) and a
    /// new build of it, waiting to be started.
    pub async fn request_build(
        &self,
        team_id: &str,
        request: NewBuild,
    ) -> Result<(TemplateRow, BuildRow, Vec<String>), Error> {
        let (alias, tag) = split_name(&request.name)?;
        if let Some(cpus) = request.cpu_count
            && !(1..=64).contains(&cpus)
        {
            return Err(Error::InvalidRequest(format!(
                "cpuCount must be 1 to 64 (got {cpus})"
            )));
        }
        if let Some(memory) = request.memory_mb
            && memory < 128
        {
            return Err(Error::InvalidRequest(format!(
                "memoryMB must be at least 128 (got {memory})"
            )));
        }
        // A tag in the name comes first; `default` only when no tag is given at all (as E2B:
        // a build tagged `staging` does not move what the bare name starts).
        let named_tag = request.name.contains(':');
        let mut tags = if named_tag || request.tags.is_empty() {
            vec![tag]
        } else {
            Vec::new()
        };
        for tag in request.tags {
            let (_, tag) = split_name(&format!("x:{tag}"))?;
            if !tags.contains(&tag) {
                tags.push(tag);
            }
        }
        let _turn = self.turn(&format!("template-name:{alias}")).await?;
        let now = now_ms();
        // An existing template is changed in its own turn, which a build's end and a delete
        // take too, and read again in it.
        let mut _template_turn = None;
        let existing = match self.store.template_by_alias(&alias).await? {
            Some(template) if template.team_id == team_id => {
                _template_turn = Some(self.turn(&format!("template:{}", template.id)).await?);
                self.store.template(&template.id).await?
            }
            other => other,
        };
        let template = match existing {
            Some(template) if template.team_id == team_id => TemplateRow {
                cpu_count: request.cpu_count.unwrap_or(template.cpu_count),
                memory_mb: request.memory_mb.unwrap_or(template.memory_mb),
                updated_at_ms: now,
                ..template
            },
            Some(_) => {
                return Err(Error::Conflict(format!(
                    "template name {alias:?} is taken by another team"
                )));
            }
            None => TemplateRow {
                id: auth::random_id(20)?,
                team_id: team_id.to_string(),
                alias: Some(alias),
                public: false,
                // 0: the template it is built from decides.
                cpu_count: request.cpu_count.unwrap_or(0),
                memory_mb: request.memory_mb.unwrap_or(0),
                created_at_ms: now,
                updated_at_ms: now,
                ready_build_id: None,
                source_sandbox_id: None,
                network: Default::default(),
            },
        };
        self.store.put_template(template.clone()).await?;
        let build_id = new_build_id()?;
        let build = BuildRow {
            host_template_id: host_template_id(&build_id),
            id: build_id,
            template_id: template.id.clone(),
            status: BuildStatus::Waiting,
            reason: None,
            reason_step: None,
            from_template: String::new(),
            host_id: None,
            cpu_count: template.cpu_count,
            memory_mb: template.memory_mb,
            disk_size_mb: 0,
            envd_version: String::new(),
            created_at_ms: now,
            finished_at_ms: 0,
            tags: tags.clone(),
        };
        self.store.put_build(build.clone()).await?;
        Ok((template, build, tags))
    }

    /// A template the team may use, by its id or its name (`name` or `name:tag`).
    pub async fn team_template(&self, team_id: &str, named: &str) -> Result<TemplateRow, Error> {
        let by_id = self.store.template(named).await?;
        let template = match by_id {
            Some(template) => Some(template),
            // `name`, `name:tag`, or an id with a tag (a snapshot's id is `<id>:<tag>`).
            None => match split_name(named) {
                Ok((alias, _)) => match self.store.template_by_alias(&alias).await? {
                    Some(template) => Some(template),
                    None if named.contains(':') => {
                        let id = named.split_once(':').map_or(named, |(id, _)| id);
                        self.store.template(id).await?
                    }
                    None => None,
                },
                Err(_) => None,
            },
        };
        template
            .filter(|template| template.team_id == team_id || template.public)
            .ok_or_else(|| Error::TemplateNotFound(named.to_string()))
    }

    /// The template a create or a build names: a team's template (its ready build), or a
    /// template the hosts have themselves (`base`).
    pub async fn resolve_template(
        &self,
        team_id: &str,
        named: &str,
    ) -> Result<ResolvedTemplate, Error> {
        match self.team_template(team_id, named).await {
            Ok(template) => {
                let build_id = self.build_named(&template, named).await?;
                let stored = self
                    .store
                    .build(&build_id)
                    .await?
                    .filter(|build| build.status == BuildStatus::Ready)
                    // Put in a store only if the host that built it has one.
                    .filter(|build| {
                        build
                            .host_id
                            .as_deref()
                            .and_then(|id| self.fleet.host(id))
                            .is_some_and(|host| !host.row().report.template_store.is_empty())
                    })
                    .map(|build| wrenn_agent_api::join::TemplateReport {
                        template_id: build.host_template_id.clone(),
                        memory_mib: build.memory_mb,
                        vcpus: build.cpu_count,
                        envd_version: build.envd_version.clone(),
                        image_key: String::new(),
                        created_at_ms: build.finished_at_ms,
                        disk_size_mb: u64::from(build.disk_size_mb),
                        // Not known before a host has it: counted as a classic one.
                        memory_mapped: false,
                    });
                Ok(ResolvedTemplate {
                    on_hosts: host_template_id(&build_id),
                    network: template
                        .source_sandbox_id
                        .is_some()
                        .then_some(template.network),
                    id: template.id,
                    alias: template.alias,
                    stored,
                })
            }
            // A build's own template on the hosts is reached through its template only.
            Err(Error::TemplateNotFound(_)) if is_build_template(named) => {
                Err(Error::TemplateNotFound(named.to_string()))
            }
            Err(Error::TemplateNotFound(_)) => Ok(ResolvedTemplate {
                on_hosts: named.to_string(),
                id: named.to_string(),
                alias: Some(named.to_string()),
                stored: None,
                network: None,
            }),
            Err(error) => Err(error),
        }
    }

    /// The build `named` (`name:tag`, `name` or the template's id) means: its tag's, or for
    /// no tag the `default` tag's, else the template's last ready build.
    async fn build_named(&self, template: &TemplateRow, named: &str) -> Result<String, Error> {
        let tag = named
            .split_once(':')
            .map(|(_, tag)| tag.to_ascii_lowercase());
        let tags = self.store.tags_of(&template.id).await?;
        let tagged = |wanted: &str| {
            tags.iter()
                .find(|row| row.tag == wanted)
                .map(|row| row.build_id.clone())
        };
        match tag {
            Some(tag) => tagged(&tag).ok_or_else(|| Error::TemplateNotFound(named.to_string())),
            None => tagged("default")
                .or_else(|| template.ready_build_id.clone())
                .ok_or_else(|| {
                    Error::Conflict(format!("template {named:?} has no ready build yet"))
                }),
        }
    }

    /// `POST /templates/tags`: `tags` of the template `target` names now name the build it
    /// names (see [`Self::build_named`]): that build, and the tags as stored.
    pub async fn assign_tags(
        &self,
        team_id: &str,
        target: &str,
        tags: Vec<String>,
    ) -> Result<(String, Vec<String>), Error> {
        let template = self.own_template(team_id, target).await?;
        let build_id = self.build_named(&template, target).await?;
        let tags = checked_tags(tags)?;
        let now = now_ms();
        for tag in &tags {
            let row = crate::store::TagRow {
                template_id: template.id.clone(),
                tag: tag.clone(),
                build_id: build_id.clone(),
                created_at_ms: now,
            };
            self.store.put_tag(row).await?;
        }
        Ok((build_id, tags))
    }

    /// `DELETE /templates/tags`: removes tags of the team's template `name`.
    pub async fn remove_tags(
        &self,
        team_id: &str,
        name: &str,
        tags: Vec<String>,
    ) -> Result<(), Error> {
        let template = self.own_template(team_id, name).await?;
        let tags = checked_tags(tags)?;
        self.store.delete_tags(&template.id, tags).await?;
        Ok(())
    }

    /// `GET /templates/{templateID}/tags`.
    pub async fn tags(
        &self,
        team_id: &str,
        named: &str,
    ) -> Result<Vec<crate::store::TagRow>, Error> {
        let template = self.team_template(team_id, named).await?;
        Ok(self.store.tags_of(&template.id).await?)
    }

    /// A template of the team's own (another team's public one is a 403).
    async fn own_template(&self, team_id: &str, named: &str) -> Result<TemplateRow, Error> {
        let template = self.team_template(team_id, named).await?;
        if template.team_id != team_id {
            return Err(Error::Forbidden(format!(
                "template {named:?} belongs to another team"
            )));
        }
        Ok(template)
    }

    /// `POST /v2/templates/{templateID}/builds/{buildID}`: starts a waiting build as a job on
    /// a host that has the template it starts from; returns once it runs.
    pub async fn start_build(
        self: &Arc<Self>,
        team_id: &str,
        template_id: &str,
        build_id: &str,
        spec: BuildSpec,
    ) -> Result<(), Error> {
        let template = self.own_template(team_id, template_id).await?;
        // The template's turn: a delete does not run between the checks and the job's start.
        let _turn = self.turn(&format!("template:{}", template.id)).await?;
        if self.store.template(&template.id).await?.is_none() {
            return Err(Error::TemplateNotFound(template_id.to_string()));
        }
        let build = self
            .store
            .build(build_id)
            .await?
            .filter(|build| build.template_id == template.id)
            .ok_or_else(|| Error::InvalidRequest(format!("build {build_id:?} not found")))?;
        if build.status != BuildStatus::Waiting {
            return Err(Error::Conflict(format!(
                "build {build_id} is {} already",
                build.status.as_str()
            )));
        }
        let (from, image) = match (
            spec.from_template.filter(|from| !from.is_empty()),
            spec.from_image.filter(|image| !image.is_empty()),
        ) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidRequest(
                    "give fromTemplate or fromImage, not both".into(),
                ));
            }
            (None, None) => {
                return Err(Error::InvalidRequest(
                    "fromTemplate or fromImage is required".into(),
                ));
            }
            (Some(from), None) => (from, None),
            (None, Some(image)) => {
                let reference = ImageReference::parse(&image)
                    .map_err(|why| Error::InvalidRequest(format!("fromImage: {why}")))?;
                if reference.registry == "docker.io" && reference.repository == E2B_BASE_IMAGE {
                    // The SDKs' default base image is wrenn's own base template.
                    (BASE_TEMPLATE.to_string(), None)
                } else {
                    let (username, password) = spec.registry_login.unzip();
                    let image = ImageSource {
                        reference: image,
                        username,
                        password,
                    };
                    // The image gets envd, the init and the kernel of the base template.
                    (BASE_TEMPLATE.to_string(), Some(image))
                }
            }
        };
        let steps = spec
            .steps
            .into_iter()
            .enumerate()
            .map(|(index, (kind, args, files_hash, force))| {
                let kind = StepKind::from_name(&kind).ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "step {}: unknown type {kind:?} (RUN, COPY, ENV, WORKDIR and USER are known)",
                        index + 1
                    ))
                })?;
                let step = BuildStep {
                    kind,
                    args,
                    files_hash,
                    force,
                };
                step.check(index + 1).map_err(Error::InvalidRequest)?;
                Ok(step)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let files = self.files_of(team_id, &steps).await?;
        let from = self.resolve_template(team_id, &from).await?;
        let from_host_template = from.on_hosts.clone();
        // A build runs a VM as a sandbox does: it counts as one of the team's running
        // sandboxes, with its parent's disk, until it ends.
        let disk_mib = match self.fleet.template_disk_mib(&from_host_template) {
            0 => from.stored.as_ref().map_or(0, |t| t.disk_size_mb),
            known => known,
        };
        let admitted = self
            .admit(team_id, crate::quota::Change::Create { disk_mib })
            .await?;
        let placed = self
            .fleet
            .place(&from_host_template, from.stored.as_ref(), &[])?;
        let parent = placed.template.clone();
        let job = TemplateBuild {
            template_id: build.host_template_id.clone(),
            from_template: from_host_template.clone(),
            steps,
            start_cmd: spec.start_cmd.filter(|c| !c.is_empty()),
            ready_cmd: spec.ready_cmd.filter(|c| !c.is_empty()),
            memory_mib: (build.memory_mb > 0).then_some(build.memory_mb),
            vcpus: (build.cpu_count > 0).then_some(build.cpu_count),
            deadline: DEFAULT_BUILD_DEADLINE,
            files,
            allow_internet: self.internet,
            from_image: image,
            force: spec.force,
            cache_scope: team_id.to_string(),
        };
        let build = BuildRow {
            status: BuildStatus::Building,
            from_template: from_host_template,
            host_id: Some(placed.host.id()),
            cpu_count: job.vcpus.unwrap_or(parent.vcpus),
            memory_mb: job.memory_mib.unwrap_or(parent.memory_mib),
            ..build
        };
        // Among replicas, the build is this one's while its job runs (see
        // `fail_interrupted_builds`): held before the row says it is building.
        let running = self.hold_build(&build.id).await?;
        self.store.put_build(build.clone()).await?;
        let cancel = tokio_util::sync::CancellationToken::new();
        self.build_jobs
            .lock()
            .expect("build jobs lock")
            .insert(build.id.clone(), cancel.clone());
        let plane = self.clone();
        // Its events are its starter's.
        let actor = crate::events::current_actor();
        tokio::spawn(crate::events::acting_as(actor, async move {
            let host = placed.host.clone();
            let build_id = build.id.clone();
            plane.run_build_job(&host, build, job, cancel).await;
            plane
                .build_jobs
                .lock()
                .expect("build jobs lock")
                .remove(&build_id);
            drop((placed, admitted, running));
        }));
        Ok(())
    }

    /// The files the COPY steps copy, read from the team's uploads: a 400 naming the step whose
    /// files were not uploaded.
    async fn files_of(
        &self,
        team_id: &str,
        steps: &[BuildStep],
    ) -> Result<std::collections::BTreeMap<String, Vec<u8>>, Error> {
        let mut files = std::collections::BTreeMap::new();
        let mut total = 0u64;
        for (index, step) in steps.iter().enumerate() {
            let Some(hash) = step
                .files_hash
                .as_ref()
                .filter(|_| step.kind == StepKind::Copy)
            else {
                continue;
            };
            if !valid_hash(hash) {
                return Err(Error::InvalidRequest(format!(
                    "step {} (COPY): filesHash {hash:?} is not a SHA-256 in lowercase hex",
                    index + 1
                )));
            }
            if files.contains_key(hash) {
                continue;
            }
            let store = self.template_files.as_ref().ok_or_else(|| {
                Error::InvalidRequest("COPY: this control plane keeps no uploaded files".into())
            })?;
            let path = store.path(team_id, hash);
            let bytes = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::InvalidRequest(format!(
                        "step {} (COPY): its files ({hash}) were not uploaded",
                        index + 1
                    )));
                }
                Err(error) => {
                    return Err(Error::Internal(format!(
                        "reading the uploaded files {hash}: {error}"
                    )));
                }
            };
            store.used(team_id, hash);
            total += bytes.len() as u64;
            if total > MAX_UPLOAD_BYTES {
                return Err(Error::InvalidRequest(format!(
                    "the build's COPY files weigh more than {} MiB in all",
                    MAX_UPLOAD_BYTES >> 20
                )));
            }
            files.insert(hash.clone(), bytes);
        }
        Ok(files)
    }

    /// `GET /templates/{templateID}/files/{hash}`: whether the team's files of `hash` are
    /// there, and if not, a token to upload them with.
    pub async fn files_upload(
        &self,
        team_id: &str,
        template_id: &str,
        hash: &str,
    ) -> Result<(bool, Option<String>), Error> {
        self.own_template(team_id, template_id).await?;
        if !valid_hash(hash) {
            return Err(Error::InvalidRequest(format!(
                "{hash:?} is not a SHA-256 in lowercase hex"
            )));
        }
        let store = self.template_files.as_ref().ok_or_else(|| {
            Error::InvalidRequest("this control plane keeps no uploaded files".into())
        })?;
        if store.present(team_id, hash) {
            return Ok((true, None));
        }
        Ok((false, Some(store.upload_token(team_id, hash)?)))
    }

    /// Runs a started build on `host` to its end: its log into the store as it comes, then its
    /// outcome (a ready build becomes its template's).
    async fn run_build_job(
        &self,
        host: &crate::fleet::Host,
        build: BuildRow,
        job: TemplateBuild,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let (logs, mut lines) = tokio::sync::mpsc::unbounded_channel::<BuildLog>();
        let store = self.store.clone();
        let build_id = build.id.clone();
        // Lines are written in batches, in order, while the build runs.
        let writer = tokio::spawn(async move {
            while let Some(first) = lines.recv().await {
                let mut batch = vec![first];
                while let Ok(line) = lines.try_recv() {
                    batch.push(line);
                }
                let rows = batch.into_iter().map(log_row).collect();
                if let Err(error) = store.add_build_logs(&build_id, rows).await {
                    tracing::warn!(build = %build_id, %error, "a build's log lines were not kept");
                }
            }
        });
        // Cancelled, the build's call is dropped: the host stops the build and cleans up.
        let outcome = tokio::select! {
            outcome = host.build_template(job, logs) => outcome,
            () = cancel.cancelled() => Err(Error::Conflict(
                "the build was cancelled: its template is being deleted".into(),
            )),
        };
        if let Ok(report) = &outcome {
            host.learned_template(report.clone());
        }
        if cancel.is_cancelled() {
            // The host may log a while longer as it stops; its template is going anyway.
            writer.abort();
        } else {
            // Every line is stored before the build's end is: a reader that sees the end has
            // seen the whole log.
            let _ = writer.await;
        }
        let now = now_ms();
        let ended = match outcome {
            Ok(report) => BuildRow {
                status: BuildStatus::Ready,
                cpu_count: report.vcpus,
                memory_mb: report.memory_mib,
                disk_size_mb: u32::try_from(report.disk_size_mb).unwrap_or(u32::MAX),
                envd_version: report.envd_version,
                finished_at_ms: now,
                ..build
            },
            Err(error) => {
                let message = match &error {
                    Error::Host { source, .. } => source.to_string(),
                    other => other.to_string(),
                };
                let step = failed_step(&message).or_else(|| Some("base".into()));
                let line = BuildLogRow {
                    seq: 0,
                    timestamp_ms: now,
                    level: "error".into(),
                    message: format!("build failed: {message}"),
                    step: step.clone(),
                };
                if let Err(error) = self.store.add_build_logs(&build.id, vec![line]).await {
                    tracing::warn!(build = %build.id, %error, "a build's last log line was not kept");
                }
                BuildRow {
                    status: BuildStatus::Error,
                    reason: Some(message),
                    reason_step: step,
                    finished_at_ms: now,
                    ..build
                }
            }
        };
        let ready = (ended.status == BuildStatus::Ready).then(|| ended.clone());
        // A build whose end is not stored would read `building` for good: retried for a while.
        let mut attempt = 0;
        while let Err(error) = self.store.put_build(ended.clone()).await {
            attempt += 1;
            if attempt == 10 {
                tracing::error!(build = %ended.id, %error, "a build's end was not kept");
                return;
            }
            tracing::warn!(build = %ended.id, %error, "a build's end was not kept: retrying");
            tokio::time::sleep(std::time::Duration::from_secs(1 << attempt.min(4))).await;
        }
        if let Ok(Some(template)) = self.store.template(&ended.template_id).await {
            let (kind, data) = if ended.status == BuildStatus::Ready {
                (EventKind::TemplateBuilt, json!({ "buildID": ended.id }))
            } else {
                let data = json!({
                    "buildID": ended.id,
                    "reason": ended.reason,
                    "step": ended.reason_step,
                });
                (EventKind::TemplateBuildFailed, data)
            };
            self.store
                .publish(kind, &template.team_id, &template.id, data)
                .await;
        }
        if let Some(ready) = ready {
            let turn = self.turn(&format!("template:{}", ready.template_id)).await;
            if let Err(error) = &turn {
                tracing::warn!(build = %ready.id, %error, "cannot take the template's turn: its ready build is set without it");
            }
            match self.store.template(&ready.template_id).await {
                Ok(Some(template)) => {
                    let template = TemplateRow {
                        ready_build_id: Some(ready.id.clone()),
                        cpu_count: ready.cpu_count,
                        memory_mb: ready.memory_mb,
                        updated_at_ms: now,
                        ..template
                    };
                    if let Err(error) = self.store.put_template(template).await {
                        tracing::warn!(build = %ready.id, %error, "a ready build was not made its template's");
                    }
                    for tag in &ready.tags {
                        let row = crate::store::TagRow {
                            template_id: ready.template_id.clone(),
                            tag: tag.clone(),
                            build_id: ready.id.clone(),
                            created_at_ms: now,
                        };
                        if let Err(error) = self.store.put_tag(row).await {
                            tracing::warn!(build = %ready.id, %tag, %error, "a ready build's tag was not kept");
                        }
                    }
                }
                Ok(None) => tracing::info!(build = %ready.id, "built a template deleted meanwhile"),
                Err(error) => {
                    tracing::warn!(build = %ready.id, %error, "a ready build was not made its template's")
                }
            }
            tracing::info!(template = %ready.template_id, build = %ready.id, "template built");
        }
    }

    /// `DELETE /templates/{templateID}`: the team's template, its builds on their hosts and in
    /// the template store, and their logs; refused while a build of another template stands on
    /// it. Its running builds are cancelled first. Its sandboxes go on: a host where they run
    /// or are paused keeps its copy until they are gone (the reconcile pass deletes it then).
    pub async fn delete_template(&self, team_id: &str, named: &str) -> Result<(), Error> {
        let template = self.own_template(team_id, named).await?;
        let _turn = self.turn(&format!("template:{}", template.id)).await?;
        // A template's sandboxes outlive it (E2B's rule); a snapshot's do not let it go.
        self.check_snapshot_unused(&template).await?;
        let mut builds = self.store.builds_of(&template.id).await?;
        // Its running builds are cancelled, and waited for (their end is stored first).
        let running: Vec<String> = builds
            .iter()
            .filter(|build| build.status == BuildStatus::Building)
            .map(|build| build.id.clone())
            .collect();
        if !running.is_empty() {
            let deadline = tokio::time::Instant::now() + BUILD_CANCEL_WAIT;
            for id in &running {
                let job = self
                    .build_jobs
                    .lock()
                    .expect("build jobs lock")
                    .get(id)
                    .cloned();
                match job {
                    Some(cancel) => cancel.cancel(),
                    // Another control plane runs it (or ran it and went): not ours to stop.
                    None => {
                        return Err(Error::Conflict(format!(
                            "template {named:?} has a build running elsewhere: wait for it to end"
                        )));
                    }
                }
            }
            loop {
                builds = self.store.builds_of(&template.id).await?;
                if !builds
                    .iter()
                    .any(|build| build.status == BuildStatus::Building)
                {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Conflict(format!(
                        "template {named:?}: its build did not stop within {} s; try again",
                        BUILD_CANCEL_WAIT.as_secs()
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            tracing::info!(template = %template.id, builds = ?running, "builds cancelled by the template's delete");
        }
        // Refused here, before any host is asked: a host that lacks the template takes it out
        // of the template store at once, which must not happen while another template stands
        // on it.
        let host_templates: Vec<&str> = builds
            .iter()
            .filter(|build| build.status == BuildStatus::Ready)
            .map(|build| build.host_template_id.as_str())
            .collect();
        // Ready builds stand on it, and running or waiting ones will.
        let mut others = self.store.builds_in(BuildStatus::Ready).await?;
        others.extend(self.store.builds_in(BuildStatus::Building).await?);
        others.extend(self.store.builds_in(BuildStatus::Waiting).await?);
        let children: Vec<String> = others
            .into_iter()
            .filter(|build| build.template_id != template.id)
            .filter(|build| host_templates.contains(&build.from_template.as_str()))
            .map(|build| build.template_id)
            .collect();
        if !children.is_empty() {
            return Err(Error::Conflict(format!(
                "template {named:?} is the parent of templates {}: delete them first",
                children.join(", ")
            )));
        }
        // Newest first: a build made from an older one of the same template stands on it.
        for build in builds
            .iter()
            .rev()
            .filter(|b| b.status == BuildStatus::Ready)
        {
            let builder = build.host_id.as_deref().and_then(|id| self.fleet.host(id));
            if let Some(host) = builder.as_ref().filter(|host| !host.is_up()) {
                return Err(Error::HostDown(format!(
                    "template {named:?} is on host {}, which is down: delete it once the host is back",
                    host.row().name
                )));
            }
            // The hosts that pulled it first, then the one that built it, which takes it out
            // of the template store too (any host with the store does, when it is gone).
            let builder_id = builder.as_ref().map(|host| host.id());
            let mut holders: Vec<_> = self
                .fleet
                .hosts()
                .into_iter()
                .filter(|host| host.is_up() && Some(host.id()) != builder_id)
                .filter(|host| {
                    // A host with a store may have pulled it since its last report.
                    let row = host.row();
                    !row.report.template_store.is_empty()
                        || row
                            .report
                            .templates
                            .iter()
                            .any(|t| t.template_id == build.host_template_id)
                })
                .collect();
            holders.extend(builder);
            for host in holders {
                match host.delete_template(&build.host_template_id).await {
                    // Sandboxes of it run or are paused there, or a create or build from it is
                    // in flight: they keep the host's copy, which the reconcile pass deletes
                    // (with the store's, if that host has it) once they are gone.
                    Err(Error::Host {
                        source: HostAgentError::Conflict(why),
                        ..
                    }) => {
                        tracing::info!(template = %template.id, host = %host.row().name, %why, "the host keeps the deleted template while its sandboxes use it")
                    }
                    other => other?,
                }
            }
        }
        self.store.delete_template(&template.id).await?;
        tracing::info!(template = %template.id, "template deleted");
        Ok(())
    }

    /// Among replicas, marks build `build_id` as this replica's while the answer is held (a
    /// lease renewed while its job runs); alone on its store, nothing.
    pub(crate) async fn hold_build(
        &self,
        build_id: &str,
    ) -> Result<Option<crate::replica::SharedTurn>, Error> {
        Ok(match &self.replica {
            Some(replica) => Some(replica.turn(&self.store, &build_lease(build_id)).await?),
            None => None,
        })
    }

    /// Ends the builds whose job is gone: alone on its store, every build a previous run left
    /// building (a host's build stops when its caller goes); among replicas, those whose
    /// replica holds them no more (it died: the lifecycle's replica sweeps them). How many.
    pub async fn fail_interrupted_builds(&self) -> Result<usize, Error> {
        let mut interrupted = Vec::new();
        for build in self.store.builds_in(BuildStatus::Building).await? {
            let running_elsewhere = self.replica.is_some()
                && self
                    .store
                    .lease_held(&crate::replica::turn_lease_name(&build_lease(&build.id)))
                    .await?;
            if !running_elsewhere && !self.build_jobs_running().contains(&build.id) {
                interrupted.push(build);
            }
        }
        let now = now_ms();
        for build in &interrupted {
            let message = if self.replica.is_some() {
                "the control plane replica running the build stopped: start a new one"
            } else {
                "the control plane restarted during the build: start a new one"
            }
            .to_string();
            let line = BuildLogRow {
                seq: 0,
                timestamp_ms: now,
                level: "error".into(),
                message: format!("build failed: {message}"),
                step: Some("base".into()),
            };
            self.store.add_build_logs(&build.id, vec![line]).await?;
            self.store
                .put_build(BuildRow {
                    status: BuildStatus::Error,
                    reason: Some(message),
                    reason_step: Some("base".into()),
                    finished_at_ms: now,
                    ..build.clone()
                })
                .await?;
        }
        Ok(interrupted.len())
    }

    /// `GET /templates/{templateID}/builds/{buildID}/status`: the build and its log from the
    /// `offset`th line on (at most `limit`, at most [`MAX_LOG_PAGE`]).
    pub async fn build_status(
        &self,
        team_id: &str,
        template_id: &str,
        build_id: &str,
        offset: i64,
        limit: i64,
    ) -> Result<(BuildRow, Vec<BuildLogRow>), Error> {
        let template = self.team_template(team_id, template_id).await?;
        let build = self
            .store
            .build(build_id)
            .await?
            .filter(|build| build.template_id == template.id)
            .ok_or_else(|| Error::InvalidRequest(format!("build {build_id:?} not found")))?;
        let lines = self
            .store
            .build_logs(build_id, offset.max(0), limit.clamp(0, MAX_LOG_PAGE))
            .await?;
        Ok((build, lines))
    }
}

fn log_row(line: BuildLog) -> BuildLogRow {
    BuildLogRow {
        seq: 0,
        timestamp_ms: line.timestamp_ms,
        level: line.level.name().into(),
        message: line.message,
        step: line.step,
    }
}

/// The name of the turn a replica holds while it runs build `build_id`.
fn build_lease(build_id: &str) -> String {
    format!("build:{build_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploaded_files_have_a_team_limit_and_go_when_no_build_used_them_for_a_week() {
        // Links handed out and not used yet count as full uploads.
        let dir = tempfile::tempdir().unwrap();
        let files =
            TemplateFiles::new(dir.path().to_path_buf()).with_team_limit(MAX_UPLOAD_BYTES + 10);
        let (a, b, c) = ("ab".repeat(32), "cd".repeat(32), "ef".repeat(32));
        files.upload_token("team", &a).unwrap();
        files.upload_token("team", &b).unwrap();
        let refused = files.upload_token("team", &c).unwrap_err();
        assert!(
            refused.to_string().contains("uploaded template files hold"),
            "{refused}"
        );
        files.upload_token("other-team", &c).unwrap();

        // Files written count as they are.
        let dir = tempfile::tempdir().unwrap();
        let files = TemplateFiles::new(dir.path().to_path_buf()).with_team_limit(10);
        std::fs::create_dir_all(dir.path().join("team")).unwrap();
        std::fs::write(files.path("team", &a), b"12345678").unwrap();
        std::fs::write(files.path("team", &b), b"12345678").unwrap();
        assert_eq!(files.team_bytes("team"), 16);
        assert!(files.upload_token("team", &c).is_err());

        // Both written eight days ago; a build has used b since.
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(8 * 86400);
        for hash in [&a, &b] {
            let file = std::fs::File::options()
                .append(true)
                .open(files.path("team", hash))
                .unwrap();
            file.set_modified(long_ago).unwrap();
        }
        files.used("team", &b);
        assert_eq!(files.remove_unused(UNUSED_FILES_LIFE), 1);
        assert!(!files.present("team", &a));
        assert!(files.present("team", &b));
        files.upload_token("team", &c).unwrap();
    }

    #[test]
    fn names_split_into_alias_and_tag() {
        assert_eq!(
            split_name("My-App").unwrap(),
            ("my-app".into(), "default".into())
        );
        assert_eq!(
            split_name("app:v1.2").unwrap(),
            ("app".into(), "v1.2".into())
        );
        for bad in ["", "a b", "app:", ":v1", "ns/app", "app:v 1"] {
            assert!(split_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn build_ids_are_uuids_and_name_host_templates() {
        let id = new_build_id().unwrap();
        let parts: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&id[14..15], "4");
        let host = host_template_id(&id);
        assert_eq!(host.len(), 33);
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }

    #[test]
    fn an_agents_error_names_the_failed_step() {
        assert_eq!(
            failed_step("step 12 (RUN make): exited with code 2").as_deref(),
            Some("12")
        );
        assert_eq!(failed_step("the VM did not start"), None);
    }
}
