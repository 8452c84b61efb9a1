//! Snapshots and forks of running sandboxes (E2B's `create_snapshot`, `list_snapshots`, `fork`).
//!
//! A snapshot is a template of the team (E2B's snapshot template): a template row whose
//! `source_sandbox_id` names the sandbox it was taken of, and a ready build whose template on
//! the hosts is the checkpoint the sandbox's host took ([`fleet::Host::checkpoint`]) and put in
//! the template store; a create names it by its id or name like any template, and runs on any
//! host (one without it pulls it). It is deleted as a template is (`DELETE /templates/{id}`),
//! which is refused while a sandbox made from it exists.
//!
//! A fork is one checkpoint, ephemeral (on the source's host only, gone once nothing stands on
//! it), and `count` sandboxes created from it there, each with its own id, slot, token and
//! timeout; each succeeds or fails alone.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use wrenn_core::now_ms;

use super::create::{Created, SandboxRequest};
use super::templates::{ResolvedTemplate, split_name};
use super::{ControlPlane, Error};
use crate::quota::Change;
use crate::store::{BuildRow, BuildStatus, SandboxState, TagRow, TemplateRow};

/// The most forks one request makes (E2B's limit).
pub const MAX_FORKS: u32 = 100;
/// Forks started at once on their host.
const FORKS_AT_ONCE: usize = 4;
/// The most snapshots one page lists.
pub const MAX_SNAPSHOT_PAGE: usize = 100;

/// A snapshot as the API names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// What a create names it by: its name and tag, or its id and tag.
    pub snapshot_id: String,
    /// Its full names (`name:tag`), none for a snapshot without a name.
    pub names: Vec<String>,
    pub template: TemplateRow,
}

/// A page of the team's snapshots.
#[derive(Debug, Clone, Default)]
pub struct SnapshotPage {
    pub snapshots: Vec<Snapshot>,
    /// Where the next page starts, if there is one.
    pub next_token: Option<String>,
}

/// Which snapshots a listing wants.
#[derive(Debug, Clone, Default)]
pub struct SnapshotQuery {
    pub sandbox_id: Option<String>,
    /// A name or id, optionally with a tag.
    pub name: Option<String>,
    pub limit: usize,
    pub next_token: Option<String>,
}

impl ControlPlane {
    /// `POST /sandboxes/{id}/snapshots`: a persistent snapshot of the team's running sandbox,
    /// named `name` (`name` or `name:tag`; a snapshot of that name the team has gets a new
    /// build, tagged) or known by its id. The sandbox goes on.
    pub async fn create_snapshot(
        &self,
        team_id: &str,
        sandbox_id: &str,
        name: Option<String>,
    ) -> Result<Snapshot, Error> {
        let named = name
            .as_deref()
            .filter(|name| !name.trim().is_empty())
            .map(split_name)
            .transpose()?;
        let _turn = self.turn(sandbox_id).await?;
        let row = self.team_sandbox(team_id, sandbox_id).await?;
        if row.state != SandboxState::Running {
            return Err(Error::Conflict(format!(
                "sandbox \"{sandbox_id}\" is {}: only a running sandbox can be snapshotted",
                row.state.as_str()
            )));
        }
        let host = self.fleet.up_host(&row)?;
        // The template the sandbox came from, as the hosts name it (its build's parent).
        let from_template = self
            .resolve_template(team_id, &row.template_id)
            .await
            .map(|resolved| resolved.on_hosts)
            .unwrap_or_default();
        let disk_mib = u64::from(row.memory_mb) + self.fleet.template_disk_mib(&from_template);
        let admitted = self.admit(team_id, Change::Snapshot { disk_mib }).await?;
        // The name's turn: two snapshots of one name do not both make its template.
        let _name_turn = match &named {
            Some((alias, _)) => Some(self.turn(&format!("template-name:{alias}")).await?),
            None => None,
        };
        let now = now_ms();
        let existing = match &named {
            Some((alias, _)) => self.store.template_by_alias(alias).await?,
            None => None,
        };
        let template = match existing {
            Some(template) if template.team_id != team_id => {
                return Err(Error::Conflict(format!(
                    "the name {:?} is taken by another team's template",
                    template.alias.unwrap_or_default()
                )));
            }
            Some(template) if template.source_sandbox_id.is_none() => {
                return Err(Error::Conflict(format!(
                    "the name {:?} is a template's, not a snapshot's: choose another",
                    template.alias.unwrap_or_default()
                )));
            }
            Some(template) => TemplateRow {
                source_sandbox_id: Some(row.id.clone()),
                network: crate::store::StoredNetwork {
                    allow_internet: Some(row.allow_internet),
                    ..row.network.clone()
                },
                cpu_count: row.cpu_count,
                memory_mb: row.memory_mb,
                updated_at_ms: now,
                ..template
            },
            None => TemplateRow {
                id: crate::auth::random_id(20)?,
                team_id: team_id.to_string(),
                alias: named.as_ref().map(|(alias, _)| alias.clone()),
                public: false,
                cpu_count: row.cpu_count,
                memory_mb: row.memory_mb,
                created_at_ms: now,
                updated_at_ms: now,
                ready_build_id: None,
                source_sandbox_id: Some(row.id.clone()),
                network: crate::store::StoredNetwork {
                    allow_internet: Some(row.allow_internet),
                    ..row.network.clone()
                },
            },
        };
        let is_new = template.ready_build_id.is_none();
        self.store.put_template(template.clone()).await?;
        let build_id = super::templates::new_build_id()?;
        let mut build = BuildRow {
            host_template_id: super::templates::host_template_id(&build_id),
            id: build_id,
            template_id: template.id.clone(),
            status: BuildStatus::Building,
            reason: None,
            reason_step: None,
            from_template,
            host_id: Some(host.id()),
            cpu_count: row.cpu_count,
            memory_mb: row.memory_mb,
            disk_size_mb: 0,
            envd_version: row.envd_version.clone(),
            created_at_ms: now,
            finished_at_ms: 0,
            tags: vec![
                named
                    .as_ref()
                    .map_or("default".to_string(), |(_, tag)| tag.clone()),
            ],
        };
        // Among replicas, the build is this one's while it runs (see `fail_interrupted_builds`).
        let _running = self.hold_build(&build.id).await?;
        self.store.put_build(build.clone()).await?;
        let checkpoint = host
            .checkpoint(&row.id, &build.host_template_id, false)
            .await;
        build.finished_at_ms = now_ms();
        let made = match checkpoint {
            Ok(made) => made,
            Err(error) => {
                build.status = BuildStatus::Error;
                build.reason = Some(error.to_string());
                self.store.put_build(build).await?;
                if is_new {
                    self.store.delete_template(&template.id).await?;
                }
                return Err(error);
            }
        };
        build.status = BuildStatus::Ready;
        build.disk_size_mb = u32::try_from(made.template.disk_size_mb).unwrap_or(u32::MAX);
        build.envd_version = made.template.envd_version.clone();
        self.store.put_build(build.clone()).await?;
        let tag = build.tags[0].clone();
        self.store
            .put_tag(TagRow {
                template_id: template.id.clone(),
                tag: tag.clone(),
                build_id: build.id.clone(),
                created_at_ms: build.finished_at_ms,
            })
            .await?;
        let template = TemplateRow {
            ready_build_id: Some(build.id.clone()),
            ..template
        };
        admitted
            .settle(self.store.put_template(template.clone()))
            .await?;
        tracing::info!(
            sandbox = %row.id,
            snapshot = %template.id,
            paused_ms = made.paused.as_millis() as u64,
            total_ms = made.total.as_millis() as u64,
            "snapshot taken"
        );
        let data = serde_json::json!({ "sandboxID": row.id, "buildID": build.id });
        self.store
            .publish(
                crate::events::EventKind::SnapshotCreated,
                &template.team_id,
                &template.id,
                data,
            )
            .await;
        Ok(snapshot_of(template, &tag))
    }

    /// `GET /snapshots`: the team's snapshots, oldest first, a page at a time.
    pub async fn list_snapshots(
        &self,
        team_id: &str,
        query: SnapshotQuery,
    ) -> Result<SnapshotPage, Error> {
        let limit = query.limit.clamp(1, MAX_SNAPSHOT_PAGE);
        let wanted = query
            .name
            .as_deref()
            .filter(|name| !name.is_empty())
            .map(|name| match name.split_once(':') {
                Some((name, tag)) => (name.to_ascii_lowercase(), Some(tag.to_ascii_lowercase())),
                None => (name.to_ascii_lowercase(), None),
            });
        let mut snapshots = Vec::new();
        for template in self.store.templates_for(team_id).await? {
            if template.team_id != team_id || template.ready_build_id.is_none() {
                continue;
            }
            let Some(source) = &template.source_sandbox_id else {
                continue;
            };
            if query.sandbox_id.as_ref().is_some_and(|id| id != source) {
                continue;
            }
            let tags = self.store.tags_of(&template.id).await?;
            let tag = match &wanted {
                Some((name, tag)) => {
                    if template.id != *name && template.alias.as_deref() != Some(name) {
                        continue;
                    }
                    match tag {
                        Some(tag) if !tags.iter().any(|row| &row.tag == tag) => continue,
                        Some(tag) => tag.clone(),
                        None => default_tag(&template, &tags),
                    }
                }
                None => default_tag(&template, &tags),
            };
            snapshots.push(snapshot_of(template, &tag));
        }
        snapshots.sort_by(|a, b| {
            (a.template.created_at_ms, &a.template.id)
                .cmp(&(b.template.created_at_ms, &b.template.id))
        });
        if let Some(after) = &query.next_token {
            let start = snapshots
                .iter()
                .position(|snapshot| &snapshot.template.id == after)
                .map(|at| at + 1)
                .ok_or_else(|| {
                    Error::InvalidRequest(format!(
                        "nextToken {after:?} is not one this listing gave"
                    ))
                })?;
            snapshots.drain(..start);
        }
        let next_token =
            (snapshots.len() > limit).then(|| snapshots[limit - 1].template.id.clone());
        snapshots.truncate(limit);
        Ok(SnapshotPage {
            snapshots,
            next_token,
        })
    }

    /// `POST /sandboxes/{id}/fork`: one checkpoint of the team's running sandbox (which goes
    /// on, keeping its id and end), then `count` sandboxes from it on its host, each living
    /// `timeout_seconds`; one outcome per fork.
    pub async fn fork(
        &self,
        team_id: &str,
        sandbox_id: &str,
        count: u32,
        timeout_seconds: u64,
    ) -> Result<Vec<Result<Created, Error>>, Error> {
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(Error::InvalidRequest(format!(
                "count must be 1 to {MAX_FORKS} (got {count})"
            )));
        }
        // Held to the end: the source is not killed or paused between its checkpoint and the
        // forks' creates.
        let _turn = self.turn(sandbox_id).await?;
        let row = self.team_sandbox(team_id, sandbox_id).await?;
        if row.state != SandboxState::Running {
            return Err(Error::Conflict(format!(
                "sandbox \"{sandbox_id}\" is {}: only a running sandbox can be forked",
                row.state.as_str()
            )));
        }
        let host = self.fleet.up_host(&row)?;
        let checkpoint_id = super::templates::host_template_id(&super::templates::new_build_id()?);
        let made = host.checkpoint(&row.id, &checkpoint_id, true).await?;
        tracing::info!(
            sandbox = %row.id,
            checkpoint = %checkpoint_id,
            paused_ms = made.paused.as_millis() as u64,
            forks = count,
            "checkpoint taken for forks"
        );
        let template = ResolvedTemplate {
            on_hosts: checkpoint_id,
            id: row.template_id.clone(),
            alias: row.alias.clone(),
            stored: None,
            // The forks get the source's rules as they are now.
            network: None,
        };
        let request = SandboxRequest {
            template: row.template_id.clone(),
            timeout_seconds,
            secure: row.envd_access_token.is_some(),
            public_traffic: row.traffic_access_token.is_none(),
            allow_internet: row.allow_internet,
            metadata: row.metadata.clone(),
            // The checkpoint carries the source's.
            env_vars: BTreeMap::new(),
            auto_pause: row.auto_pause,
            auto_pause_memory: row.auto_pause_memory,
            auto_resume: row.auto_resume,
            network: row.network.clone(),
        };
        let forks = futures_util::stream::iter(0..count)
            .map(|_| self.create_from(team_id, request.clone(), template.clone()))
            .buffered(FORKS_AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        let started = forks.iter().filter(|fork| fork.is_ok()).count();
        tracing::info!(sandbox = %row.id, started, asked = count, "forked");
        Ok(forks)
    }

    /// Refuses the delete of a snapshot a sandbox made from it still stands on.
    pub(super) async fn check_snapshot_unused(&self, template: &TemplateRow) -> Result<(), Error> {
        if template.source_sandbox_id.is_none() {
            return Ok(());
        }
        let users: Vec<String> = self
            .store
            .all_sandboxes()
            .await?
            .into_iter()
            .filter(|row| row.template_id == template.id)
            .map(|row| row.id)
            .collect();
        if users.is_empty() {
            return Ok(());
        }
        Err(Error::Conflict(format!(
            "snapshot {} is in use by sandboxes {}: kill them first",
            template.id,
            users.join(", ")
        )))
    }
}

/// The tag a snapshot is listed under: `default` when it has it, else its ready build's.
fn default_tag(template: &TemplateRow, tags: &[TagRow]) -> String {
    if tags.iter().any(|row| row.tag == "default") {
        return "default".into();
    }
    tags.iter()
        .find(|row| Some(&row.build_id) == template.ready_build_id.as_ref())
        .map_or("default".into(), |row| row.tag.clone())
}

/// A snapshot template as the API names it under `tag`.
fn snapshot_of(template: TemplateRow, tag: &str) -> Snapshot {
    let names: Vec<String> = template
        .alias
        .iter()
        .map(|alias| format!("{alias}:{tag}"))
        .collect();
    let snapshot_id = names
        .first()
        .cloned()
        .unwrap_or_else(|| format!("{}:{tag}", template.id));
    Snapshot {
        snapshot_id,
        names,
        template,
    }
}
