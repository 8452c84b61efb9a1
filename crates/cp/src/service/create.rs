//! Creating a sandbox: admission against the team's quotas, placement on a host that has the
//! template and room, the agent's create (passed to another host when one is full), and the
//! row written with the reservation released in one step.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wrenn_agent_api::{CreateOptions, HostAgentError};
use wrenn_core::now_ms;

use super::{ControlPlane, Error};
use crate::auth;
use crate::events::EventKind;
use crate::quota::Change;
use crate::store::{IdempotencyClaim, SandboxRow, SandboxState, StoredNetwork};
use serde_json::json;

/// A sandbox as a team asked for it (the request's defaults already applied).
#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    /// The template or its alias.
    pub template: String,
    pub timeout_seconds: u64,
    /// envd requires an access token.
    pub secure: bool,
    /// Its ports are reached without a traffic token.
    pub public_traffic: bool,
    /// It may reach the internet (if the control plane allows any sandbox to).
    pub allow_internet: bool,
    pub metadata: BTreeMap<String, String>,
    pub env_vars: BTreeMap<String, String>,
    pub auto_pause: bool,
    /// Whether a pause on timeout keeps the memory.
    pub auto_pause_memory: bool,
    pub auto_resume: bool,
    /// Its egress rules and host mask (none: a snapshot's sandbox gets the snapshot's).
    pub network: StoredNetwork,
}

/// A created sandbox, and how long its host's agent took.
#[derive(Debug, Clone)]
pub struct Created {
    pub row: SandboxRow,
    pub agent_time: Duration,
    /// The part of it the host spent pulling the template from the template store.
    pub pull_time: Duration,
}

/// How many other hosts a create that found a host full may try.
const OTHER_HOSTS_TRIED: usize = 2;

/// A create with an Idempotency-Key still running is waited for this long by a retry.
const IDEMPOTENT_WAIT: Duration = Duration::from_secs(120);
/// A create's claim of its key unsettled this long is taken for one whose replica died.
const IDEMPOTENT_STALE: Duration = Duration::from_secs(600);

/// What a create with an Idempotency-Key did.
#[derive(Debug)]
pub enum CreatedOnce {
    /// It made the sandbox.
    Made(Created),
    /// An earlier create with the key made it.
    Earlier(SandboxRow),
}

/// An Idempotency-Key's claim by a create that has not settled it: given up when dropped
/// unsettled (the create failed, or its call was cut short), so a retry creates at once.
struct UnsettledClaim {
    store: crate::store::Store,
    team_id: String,
    key: String,
    claimant: String,
    settled: bool,
}

impl Drop for UnsettledClaim {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let store = self.store.clone();
        let (team_id, key, claimant) = (
            std::mem::take(&mut self.team_id),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.claimant),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = store.drop_idempotency(&team_id, &key, &claimant).await {
                    tracing::warn!(%error, "cannot give up an unsettled idempotency key: a retry waits until it is stale");
                }
            });
        }
    }
}

impl ControlPlane {
    /// Creates a sandbox for team `team_id` unless an earlier create of the team with
    /// Idempotency-Key `key` made one (then that one, if it still exists). The keys are in the
    /// store, so a retry at another replica finds them; a retry arriving while the first create
    /// runs waits for it.
    pub async fn create_once(
        &self,
        team_id: &str,
        key: Option<&str>,
        request: SandboxRequest,
    ) -> Result<CreatedOnce, Error> {
        let Some(key) = key else {
            return self.create(team_id, request).await.map(CreatedOnce::Made);
        };
        let claimant = auth::random_token()?;
        let waited = std::time::Instant::now();
        loop {
            let claim = self
                .store
                .claim_idempotency(
                    team_id,
                    key,
                    &claimant,
                    wrenn_core::now_ms(),
                    IDEMPOTENT_STALE.as_millis() as i64,
                )
                .await?;
            match claim {
                IdempotencyClaim::Claimed => break,
                IdempotencyClaim::Made(id) => match self.store.sandbox(&id).await? {
                    Some(row) if row.team_id == team_id => {
                        return Ok(CreatedOnce::Earlier(row));
                    }
                    // Killed since: the key makes a new sandbox.
                    _ => {
                        self.store.forget_idempotency(team_id, key, &id).await?;
                    }
                },
                IdempotencyClaim::Pending if waited.elapsed() > IDEMPOTENT_WAIT => {
                    return Err(Error::Conflict(format!(
                        "a create with this Idempotency-Key has run for over {} s: try again later",
                        IDEMPOTENT_WAIT.as_secs()
                    )));
                }
                IdempotencyClaim::Pending => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Given up if this call ends before it settles the key (its caller went away).
        let mut claim = UnsettledClaim {
            store: self.store.clone(),
            team_id: team_id.to_string(),
            key: key.to_string(),
            claimant: claimant.clone(),
            settled: false,
        };
        let created = self.create(team_id, request).await?;
        // Settled, or the sandbox is answered all the same (a retry then makes another once
        // the claim is stale; the store failing thrice in a row is rare).
        for attempt in 1..=3 {
            match self
                .store
                .settle_idempotency(team_id, key, &claimant, &created.row.id)
                .await
            {
                Ok(()) => {
                    claim.settled = true;
                    break;
                }
                Err(error) if attempt == 3 => {
                    claim.settled = true;
                    tracing::warn!(sandbox = %created.row.id, %error, "cannot settle the create's idempotency key");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Ok(CreatedOnce::Made(created))
    }

    /// Creates a sandbox for team `team_id`.
    pub async fn create(&self, team_id: &str, request: SandboxRequest) -> Result<Created, Error> {
        let started = std::time::Instant::now();
        let created = self.create_checked(team_id, request).await;
        crate::metrics::count_create(&created, started.elapsed());
        created
    }

    async fn create_checked(
        &self,
        team_id: &str,
        request: SandboxRequest,
    ) -> Result<Created, Error> {
        if !request.public_traffic && !request.secure {
            return Err(Error::InvalidRequest(
                "a sandbox without public traffic must be secure (secure: true)".into(),
            ));
        }
        check_network(&request.network)?;
        self.check_create(team_id, &request).await?;
        let template = self.resolve_template(team_id, &request.template).await?;
        self.create_from(team_id, request, template).await
    }

    /// Creates a sandbox of team `team_id` from a template already resolved (a fork's comes
    /// from its checkpoint, which only its host has).
    pub(super) async fn create_from(
        &self,
        team_id: &str,
        request: SandboxRequest,
        template: super::templates::ResolvedTemplate,
    ) -> Result<Created, Error> {
        if !request.public_traffic && !request.secure {
            return Err(Error::InvalidRequest(
                "a sandbox without public traffic must be secure (secure: true)".into(),
            ));
        }
        let id = auth::random_id(20)?;
        let template_name = template.id.clone();
        let created = self.create_as(id.clone(), team_id, request, template).await;
        match &created {
            Ok(created) => {
                let data = json!({
                    "templateID": created.row.template_id,
                    "hostID": created.row.host_id,
                });
                self.store
                    .publish(EventKind::SandboxCreated, team_id, &id, data)
                    .await;
            }
            // A create no host could carry out; a refusal (a quota, a bad setting) is not one.
            Err(error @ (Error::NoCapacity(_) | Error::HostDown(_) | Error::Host { .. }))
            | Err(error @ (Error::HostTimedOut { .. } | Error::Store(_) | Error::Internal(_))) => {
                let data = json!({ "templateID": template_name, "reason": error.to_string() });
                self.store
                    .publish(EventKind::SandboxFailed, team_id, &id, data)
                    .await;
            }
            Err(_) => {}
        }
        created
    }

    /// [`Self::create_from`]'s work, for the sandbox `id`.
    async fn create_as(
        &self,
        id: String,
        team_id: &str,
        request: SandboxRequest,
        template: super::templates::ResolvedTemplate,
    ) -> Result<Created, Error> {
        let token = request.secure.then(auth::random_token).transpose()?;
        let traffic_access_token = (!request.public_traffic)
            .then(auth::random_token)
            .transpose()?;
        // A snapshot's sandbox starts with the snapshot's rules unless the create sets some.
        let (network, allow_internet) = match &template.network {
            Some(snapshot) if request.network == StoredNetwork::default() => (
                StoredNetwork {
                    allow_internet: None,
                    ..snapshot.clone()
                },
                request.allow_internet && snapshot.allow_internet.unwrap_or(true),
            ),
            _ => (request.network.clone(), request.allow_internet),
        };
        check_network(&network)?;
        let allow_internet = allow_internet && self.internet;
        // Counted against the team's quotas until its row is written (or the create fails).
        let disk_mib = match self.fleet.template_disk_mib(&template.on_hosts) {
            0 => template.stored.as_ref().map_or(0, |t| t.disk_size_mb),
            known => known,
        };
        let admitted = self.admit(team_id, Change::Create { disk_mib }).await?;
        // On a host before it is in the store: reconcile must not take it for an orphan.
        let _creating = self.fleet.creating(&id);
        // Nor another replica's (the sandbox's turn among them says it is being made).
        let _turn = match &self.replica {
            Some(replica) => Some(replica.turn(&self.store, &id).await?),
            None => None,
        };
        // A host that cannot take it (full) passes it to the next one.
        let mut excluded = Vec::new();
        let mut agent_time = Duration::ZERO;
        let mut pull_time = Duration::ZERO;
        let placed = loop {
            let placed =
                self.fleet
                    .place(&template.on_hosts, template.stored.as_ref(), &excluded)?;
            let options = CreateOptions {
                template_id: placed.template.template_id.clone(),
                sandbox_id: Some(id.clone()),
                env_vars: request.env_vars.clone(),
                access_token: token.clone(),
                allow_internet,
                egress: network.egress.clone(),
                metadata: request.metadata.clone(),
                ready_timeout: None,
                init_timeout: None,
            };
            let host = placed.host.row();
            let agent_started = Instant::now();
            let created = placed.host.create(options).await;
            agent_time += agent_started.elapsed();
            match created {
                Ok(timings) => {
                    pull_time += timings.pull;
                    if !timings.pull.is_zero() {
                        // It has the template now: creates find it there before its next
                        // heartbeat says so.
                        placed.host.learned_template(placed.template.clone());
                    }
                    break placed;
                }
                Err(
                    error @ Error::Host {
                        source: HostAgentError::NoCapacity(_),
                        ..
                    },
                ) if excluded.len() < OTHER_HOSTS_TRIED => {
                    tracing::warn!(host = %host.name, %error, "create failed on a host: trying another");
                    excluded.push(host.id);
                }
                Err(error) => return Err(error),
            }
        };
        self.fleet.created(&placed);
        let named = template;
        let template = &placed.template;
        let now = now_ms();
        let row = SandboxRow {
            id: id.clone(),
            team_id: team_id.to_string(),
            template_id: named.id,
            alias: named.alias,
            state: SandboxState::Running,
            started_at_ms: now,
            end_at_ms: now + (request.timeout_seconds as i64) * 1000,
            metadata: request.metadata,
            envd_access_token: token,
            auto_pause: request.auto_pause,
            allow_internet,
            cpu_count: template.vcpus,
            memory_mb: template.memory_mib,
            envd_version: template.envd_version.clone(),
            host_id: placed.host.id(),
            traffic_access_token,
            auto_resume: request.auto_resume,
            auto_pause_memory: request.auto_pause_memory,
            paused_disk_only: false,
            network,
        };
        if let Err(error) = admitted.settle(self.store.put_sandbox(row.clone())).await {
            let _ = placed.host.destroy(&id).await;
            self.fleet.forget(&id);
            return Err(error.into());
        }
        tracing::info!(sandbox = %id, template = %template.template_id, host = %row.host_id, "sandbox created");
        Ok(Created {
            row,
            agent_time,
            pull_time,
        })
    }
}

/// Checks a sandbox's network settings: its egress rules parse, and its host mask is a host.
pub(crate) fn check_network(network: &StoredNetwork) -> Result<(), Error> {
    network
        .egress
        .parse()
        .map_err(|error| Error::InvalidRequest(error.0))?;
    if let Some(mask) = &network.mask_request_host {
        check_host_mask(mask)?;
    }
    Ok(())
}

/// A `maskRequestHost`: a host (`${PORT}` where the port goes), fit for a `Host` header.
fn check_host_mask(mask: &str) -> Result<(), Error> {
    let valid = !mask.is_empty()
        && mask.len() <= 253
        && mask
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]${}".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "maskRequestHost {mask:?} is not a host (letters, digits, '.', '-', ':' and ${{PORT}})"
        )))
    }
}
