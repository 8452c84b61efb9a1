//! The fleet of host agents: how the control plane reaches each one (the agent embedded in its
//! own process, or a separate agent over its Connect API and sandbox proxy), what each last
//! reported of its capacity, where a new sandbox goes ([`Placement`]), which hosts are down, and
//! the reconcile pass that makes the store agree with what each agent really runs.
//!
//! Agents join with the fleet's join token (`POST /hosts/register`) and then heartbeat their
//! [`HostReport`] (`POST /hosts/{id}/heartbeat`) with a token of their own. A host silent for
//! longer than [`FleetConfig::down_after`] is marked down and its sandboxes `lost`; when it
//! heartbeats again it is up, and the reconcile pass gives back the sandboxes it still runs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use wrenn_agent_api::join::{
    HostReport, IDENTITY_FILE, RegisterRequest, RegisterResponse, TemplateReport,
};
use wrenn_agent_api::{
    CreateOptions, GuestRoute, HostAgent, HostAgentError, RemoteAgent, SandboxState, SandboxSummary,
};

use crate::Error;
use crate::auth;
use crate::busy::{Busy, Claim};
use crate::deadlines;
use crate::store::SandboxState as RowState;
use crate::store::{EMBEDDED_API_URL, HostRow, HostState, SandboxRow, Store};

/// The id of the agent embedded in the control plane's process.
pub const EMBEDDED_HOST_ID: &str = "local";

/// Timings of the fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The token agents join with; without one, only the embedded agent serves.
    pub join_token: Option<String>,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// A host silent this long is down.
    pub down_after: Duration,
    /// How often every host's sandboxes are compared with the store.
    pub reconcile_interval: Duration,
    /// A sandbox an agent runs that the store does not know is destroyed once it is this old
    /// (younger ones may be creates whose row is being written).
    pub orphan_grace: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            join_token: None,
            heartbeat_interval: Duration::from_secs(2),
            down_after: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(30),
            orphan_grace: Duration::from_secs(60),
        }
    }
}

/// The agent of a host in another process, as it registered.
async fn remote_agent(api_url: &str, proxy: &str, token: &str) -> Result<RemoteAgent, String> {
    RemoteAgent::resolve(api_url, proxy, token, deadlines::CONNECT).await
}

/// Waits at most `deadline` for an agent's operation (an agent in this process finishes it
/// anyway; a call to one elsewhere is dropped).
async fn within<T>(
    host: &str,
    what: &'static str,
    deadline: Duration,
    work: impl std::future::Future<Output = Result<T, HostAgentError>>,
) -> Result<T, Error> {
    match tokio::time::timeout(deadline, work).await {
        Ok(answer) => answer.map_err(|source| Error::Host {
            host: host.to_string(),
            source,
        }),
        Err(_) => Err(Error::HostTimedOut {
            host: host.to_string(),
            what,
            deadline,
        }),
    }
}

/// A host of the fleet.
#[derive(Debug)]
pub struct Host {
    row: Mutex<HostRow>,
    agent: Arc<dyn HostAgent>,
    /// The agent runs in this process (`wrenn up`): it does not heartbeat, and is never down.
    in_process: bool,
    /// Creates placed here and not finished.
    inflight: AtomicU32,
    last_seen: Mutex<Instant>,
}

impl Host {
    pub fn row(&self) -> HostRow {
        self.row.lock().expect("host lock").clone()
    }
    pub fn id(&self) -> String {
        self.row.lock().expect("host lock").id.clone()
    }
    fn name(&self) -> String {
        self.row.lock().expect("host lock").name.clone()
    }
    pub fn is_up(&self) -> bool {
        self.row.lock().expect("host lock").state == HostState::Up
    }
    /// Whether the host's agent runs in this process.
    pub fn in_process(&self) -> bool {
        self.in_process
    }

    /// Starts a sandbox on the host.
    pub async fn create(&self, options: CreateOptions) -> Result<(), Error> {
        let deadline = deadlines::VM_OPERATION;
        within(
            &self.name(),
            "CreateSandbox",
            deadline,
            self.agent.create(options),
        )
        .await
    }

    pub async fn pause(&self, sandbox_id: &str) -> Result<(), Error> {
        let deadline = deadlines::VM_OPERATION;
        within(
            &self.name(),
            "PauseSandbox",
            deadline,
            self.agent.pause(sandbox_id),
        )
        .await
    }

    pub async fn resume(&self, sandbox_id: &str) -> Result<(), Error> {
        let deadline = deadlines::VM_OPERATION;
        within(
            &self.name(),
            "ResumeSandbox",
            deadline,
            self.agent.resume(sandbox_id),
        )
        .await
    }

    /// Destroys a sandbox; one the agent does not have is already gone.
    pub async fn destroy(&self, sandbox_id: &str) -> Result<(), Error> {
        let deadline = deadlines::CONTROL_CALL;
        let destroy = async {
            match self.agent.destroy(sandbox_id).await {
                Err(HostAgentError::NotFound(_)) => Ok(()),
                other => other,
            }
        };
        within(&self.name(), "DestroySandbox", deadline, destroy).await
    }

    /// Every sandbox the agent has.
    pub async fn list(&self) -> Result<Vec<SandboxSummary>, Error> {
        let deadline = deadlines::CONTROL_CALL;
        within(&self.name(), "ListSandboxes", deadline, self.agent.list()).await
    }

    /// How to reach `port` of a running sandbox on this host.
    pub fn route(&self, sandbox_id: &str, port: u16) -> Option<GuestRoute> {
        self.agent.route(sandbox_id, port)
    }
}

/// A host that could take a new sandbox, as a [`Placement`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub host_id: String,
    pub slots_total: u32,
    /// Slots in use, creates in flight included.
    pub slots_used: u32,
    pub memory_available_mib: u64,
}

impl Candidate {
    /// The share of the host's slots in use.
    pub fn load(&self) -> f64 {
        f64::from(self.slots_used) / f64::from(self.slots_total.max(1))
    }
}

/// Chooses the host of a new sandbox among hosts that can all take it.
pub trait Placement: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// The index in `candidates` of the chosen host (`candidates` is never empty).
    fn choose(&self, candidates: &[Candidate]) -> usize;
}

/// The host with the smallest share of its slots in use; then the most free memory.
#[derive(Debug, Default)]
pub struct LeastLoaded;

impl Placement for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }
    fn choose(&self, candidates: &[Candidate]) -> usize {
        (0..candidates.len())
            .min_by(|&a, &b| {
                let (a, b) = (&candidates[a], &candidates[b]);
                a.load()
                    .total_cmp(&b.load())
                    .then(b.memory_available_mib.cmp(&a.memory_available_mib))
                    .then(a.host_id.cmp(&b.host_id))
            })
            .unwrap_or(0)
    }
}

/// The fullest host that still has room: keeps other hosts empty (to drain or power down).
#[derive(Debug, Default)]
pub struct BinPack;

impl Placement for BinPack {
    fn name(&self) -> &'static str {
        "binpack"
    }
    fn choose(&self, candidates: &[Candidate]) -> usize {
        (0..candidates.len())
            .max_by(|&a, &b| {
                let (a, b) = (&candidates[a], &candidates[b]);
                a.load()
                    .total_cmp(&b.load())
                    .then(b.host_id.cmp(&a.host_id))
            })
            .unwrap_or(0)
    }
}

/// A placement strategy by name: `least-loaded` or `binpack`.
pub fn placement(name: &str) -> Result<Box<dyn Placement>, String> {
    match name {
        "least-loaded" => Ok(Box::new(LeastLoaded)),
        "binpack" => Ok(Box::new(BinPack)),
        other => Err(format!(
            "unknown placement {other:?}: use least-loaded or binpack"
        )),
    }
}

/// A create placed on a host: counted in flight until dropped.
#[derive(Debug)]
pub struct Placed {
    pub host: Arc<Host>,
    pub template: TemplateReport,
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.host.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The fleet.
#[derive(Debug)]
pub struct Fleet {
    hosts: RwLock<HashMap<String, Arc<Host>>>,
    placement: Box<dyn Placement>,
    pub config: FleetConfig,
    /// Which host each running sandbox is on, and its traffic token, for the proxy (filled
    /// from the store on demand).
    sandbox_hosts: Mutex<HashMap<String, (String, Option<String>)>>,
    /// Serialises placements, so two creates do not both take a host's last slot.
    placing: Mutex<()>,
    /// Serialises registrations (and forgetting), so two agents cannot both claim a name.
    registering: tokio::sync::Mutex<()>,
    /// Sandboxes being created: on their host already, not in the store yet. Reconcile leaves
    /// them alone however long the create takes (an orphan grace alone would not: a create under
    /// load can outlast it).
    creating: Busy,
}

use wrenn_core::now_ms;

impl Fleet {
    /// Marks `sandbox_id` as being created until the claim goes (hold it past the row's
    /// insert).
    pub fn creating(&self, sandbox_id: &str) -> Option<Claim> {
        self.creating.claim(sandbox_id)
    }

    /// The fleet as the store has it; the embedded agent, if any, becomes host `local`. Hosts
    /// are given a full `down_after` to heartbeat before they are marked down. A stored embedded
    /// host with no agent in this process is down at once.
    pub async fn load(
        store: &Store,
        config: FleetConfig,
        placement: Box<dyn Placement>,
        embedded: Option<Arc<dyn HostAgent>>,
    ) -> Result<Fleet, crate::store::StoreError> {
        let fleet = Fleet {
            hosts: RwLock::new(HashMap::new()),
            placement,
            config,
            sandbox_hosts: Mutex::new(HashMap::new()),
            placing: Mutex::new(()),
            registering: tokio::sync::Mutex::new(()),
            creating: Busy::default(),
        };
        for row in store.hosts().await? {
            if row.api_url == EMBEDDED_API_URL {
                if embedded.is_none() && row.state == HostState::Up {
                    fleet.mark_down(store, row).await?;
                }
                continue;
            }
            match remote_agent(&row.api_url, &row.proxy_address, &row.agent_token).await {
                Ok(agent) => fleet.insert(row, Arc::new(agent), false),
                Err(error) => {
                    tracing::warn!(host = %row.name, %error, "cannot reach a stored host");
                    if row.state == HostState::Up {
                        fleet.mark_down(store, row).await?;
                    }
                }
            }
        }
        if let Some(agent) = embedded {
            let now = now_ms();
            let row = HostRow {
                id: EMBEDDED_HOST_ID.into(),
                name: nix::unistd::gethostname()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "local".into()),
                api_url: EMBEDDED_API_URL.into(),
                proxy_address: String::new(),
                agent_token: String::new(),
                heartbeat_hash: String::new(),
                state: HostState::Up,
                report: agent.report_in_process().unwrap_or_default(),
                last_heartbeat_ms: now,
                registered_at_ms: now,
                identity_hash: String::new(),
            };
            store.put_host(row.clone()).await?;
            fleet.insert(row, agent, true);
        }
        Ok(fleet)
    }

    fn insert(&self, row: HostRow, agent: Arc<dyn HostAgent>, in_process: bool) {
        let id = row.id.clone();
        let host = Arc::new(Host {
            row: Mutex::new(row),
            agent,
            in_process,
            inflight: AtomicU32::new(0),
            last_seen: Mutex::new(Instant::now()),
        });
        self.hosts.write().expect("fleet lock").insert(id, host);
    }

    pub fn host(&self, id: &str) -> Option<Arc<Host>> {
        self.hosts.read().expect("fleet lock").get(id).cloned()
    }

    /// Every host, by name.
    pub fn hosts(&self) -> Vec<Arc<Host>> {
        let mut hosts: Vec<_> = self
            .hosts
            .read()
            .expect("fleet lock")
            .values()
            .cloned()
            .collect();
        hosts.sort_by_cached_key(|h| h.row().name);
        hosts
    }

    pub fn placement_name(&self) -> &'static str {
        self.placement.name()
    }

    /// The templates up hosts have (the first host's report of each).
    pub fn templates(&self) -> Vec<TemplateReport> {
        let mut seen = HashSet::new();
        let mut templates = Vec::new();
        for host in self.hosts() {
            if !host.is_up() {
                continue;
            }
            for template in host.row().report.templates {
                if seen.insert(template.template_id.clone()) {
                    templates.push(template);
                }
            }
        }
        templates.sort_by(|a, b| a.template_id.cmp(&b.template_id));
        templates
    }

    /// The disk a sandbox of `template_id` may take (its template's disk size, as the first
    /// up host that has it reports it); 0 when no up host has it.
    pub fn template_disk_mib(&self, template_id: &str) -> u64 {
        self.templates()
            .iter()
            .find(|t| t.template_id == template_id)
            .map(|t| t.disk_size_mb)
            .unwrap_or(0)
    }

    /// Picks the host for a new sandbox of `template_id`, skipping `excluded` hosts: 404 when
    /// no host has the template, 503 when none has room.
    pub fn place(&self, template_id: &str, excluded: &[String]) -> Result<Placed, Error> {
        let _placing = self.placing.lock().expect("placement lock");
        let mut candidates = Vec::new();
        let mut hosts = Vec::new();
        let mut known = false;
        let mut reasons = Vec::new();
        for host in self.hosts() {
            // This process's own agent: its report is read now, not at the last tick.
            if let Some(report) = host.agent.report_in_process() {
                host.row.lock().expect("host lock").report = report;
            }
            let row = host.row();
            let Some(template) = row
                .report
                .templates
                .iter()
                .find(|t| t.template_id == template_id)
                .cloned()
            else {
                continue;
            };
            known = true;
            if row.state != HostState::Up {
                reasons.push(format!("{} is down", row.name));
                continue;
            }
            if excluded.contains(&row.id) {
                reasons.push(format!("{} did not answer", row.name));
                continue;
            }
            let inflight = host.inflight.load(Ordering::SeqCst);
            let used = row.report.slots_in_use + inflight;
            let memory_mib = (row.report.memory_available_bytes >> 20)
                .saturating_sub(u64::from(inflight) * u64::from(template.memory_mib));
            if used >= row.report.slots_total {
                reasons.push(format!("{} has no free network slot", row.name));
                continue;
            }
            if memory_mib < u64::from(template.memory_mib) {
                reasons.push(format!(
                    "{} has {memory_mib} MiB free, {} MiB needed",
                    row.name, template.memory_mib
                ));
                continue;
            }
            // The sandbox's disk may grow to the template's size: that much must be free.
            let disk_free_mib = (row.report.disk_available_bytes >> 20)
                .saturating_sub(u64::from(inflight) * template.disk_size_mb);
            if disk_free_mib < template.disk_size_mb {
                reasons.push(format!(
                    "{} has {disk_free_mib} MiB of disk free, {} MiB needed",
                    row.name, template.disk_size_mb
                ));
                continue;
            }
            candidates.push(Candidate {
                host_id: row.id.clone(),
                slots_total: row.report.slots_total,
                slots_used: used,
                memory_available_mib: memory_mib,
            });
            hosts.push((host, template));
        }
        if !known {
            return Err(Error::TemplateNotFound(template_id.to_string()));
        }
        if candidates.is_empty() {
            return Err(Error::NoCapacity(format!(
                "no host can take a sandbox of template '{template_id}' now: {}",
                reasons.join("; ")
            )));
        }
        let chosen = self.placement.choose(&candidates).min(hosts.len() - 1);
        let (host, template) = hosts.swap_remove(chosen);
        host.inflight.fetch_add(1, Ordering::SeqCst);
        Ok(Placed { host, template })
    }

    /// Counts a finished create in the host's report until its next heartbeat says so itself.
    pub fn created(&self, placed: &Placed) {
        let mut row = placed.host.row.lock().expect("host lock");
        row.report.slots_in_use += 1;
        row.report.sandboxes_running += 1;
        row.report.memory_available_bytes = row
            .report
            .memory_available_bytes
            .saturating_sub(u64::from(placed.template.memory_mib) << 20);
        row.report.disk_available_bytes = row
            .report
            .disk_available_bytes
            .saturating_sub(placed.template.disk_size_mb << 20);
    }

    /// Forgets where a sandbox runs (it was paused, killed or lost).
    pub fn forget(&self, sandbox_id: &str) {
        self.sandbox_hosts
            .lock()
            .expect("route cache lock")
            .remove(sandbox_id);
    }

    /// How to reach `port` of a sandbox running on an up host, and its traffic token if it
    /// has one.
    pub async fn route(
        &self,
        store: &Store,
        sandbox_id: &str,
        port: u16,
    ) -> Option<(GuestRoute, Option<String>)> {
        let cached = self
            .sandbox_hosts
            .lock()
            .expect("route cache lock")
            .get(sandbox_id)
            .cloned();
        let (host_id, traffic_token) = match cached {
            Some(entry) => entry,
            None => {
                let row = store.sandbox(sandbox_id).await.ok()??;
                if row.state != RowState::Running {
                    return None;
                }
                let entry = (row.host_id, row.traffic_access_token);
                let mut cache = self.sandbox_hosts.lock().expect("route cache lock");
                if cache.len() > 100_000 {
                    cache.clear();
                }
                cache.insert(sandbox_id.to_string(), entry.clone());
                entry
            }
        };
        let host = self.host(&host_id)?;
        if !host.is_up() {
            return None;
        }
        Some((host.route(sandbox_id, port)?, traffic_token))
    }

    /// The host of a sandbox row, if it is up (else a 503 naming it).
    pub fn up_host(&self, row: &SandboxRow) -> Result<Arc<Host>, Error> {
        match self.host(&row.host_id) {
            Some(host) if host.is_up() => Ok(host),
            Some(host) => Err(Error::HostDown(format!(
                "sandbox \"{}\" is on host {}, which is down",
                row.id,
                host.row().name
            ))),
            None => Err(Error::HostDown(format!(
                "sandbox \"{}\" is on host {}, which the fleet does not know",
                row.id, row.host_id
            ))),
        }
    }

    /// Whether `bearer` is the fleet's join token (401 if not, 403 if agents cannot join).
    pub fn check_join_token(&self, bearer: Option<&str>) -> Result<(), Error> {
        use subtle::ConstantTimeEq;
        let Some(expected) = &self.config.join_token else {
            return Err(Error::Forbidden(
                "this control plane takes no agents (it has no join token)".into(),
            ));
        };
        let given = bearer.unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(Error::Unauthenticated("invalid join token".into()));
        }
        Ok(())
    }

    /// Takes an agent's registration: the host is (again) up under its name's id. A name the
    /// fleet knows is taken only with that host's identity (409 otherwise, and nothing of the
    /// host changes); a new name gets a new identity, whose secret the answer carries.
    /// Registrations are taken one at a time.
    pub async fn register(
        &self,
        store: &Store,
        bearer: Option<&str>,
        request: RegisterRequest,
    ) -> Result<(RegisterResponse, bool), Error> {
        use subtle::ConstantTimeEq;
        self.check_join_token(bearer)?;
        if request.name.is_empty()
            || request.name.len() > 64
            || !request
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(Error::InvalidRequest(
                "a host name is 1 to 64 letters, digits, '-', '.' or '_'".into(),
            ));
        }
        if request.agent_token.is_empty() {
            return Err(Error::InvalidRequest("agentToken is required".into()));
        }
        let agent = remote_agent(
            &request.api_url,
            &request.proxy_address,
            &request.agent_token,
        )
        .await
        .map_err(Error::InvalidRequest)?;
        let _registering = self.registering.lock().await;
        let existing = self
            .hosts()
            .into_iter()
            .find(|host| host.row().name == request.name);
        let name = request.name.clone();
        let (id, new_secret, was_down) = match &existing {
            Some(host) if host.in_process => {
                return Err(Error::Conflict(format!(
                    "{name} is the control plane's own host"
                )));
            }
            Some(host) => {
                let row = host.row();
                let proven = request.identity.as_ref().is_some_and(|identity| {
                    let given = auth::hash_key(&identity.secret);
                    identity.host_id == row.id
                        && bool::from(given.as_bytes().ct_eq(row.identity_hash.as_bytes()))
                });
                // A host registered before identities existed: its next registration sets one.
                let unclaimed = row.identity_hash.is_empty();
                if !proven && !unclaimed {
                    tracing::warn!(host = %name, api = %request.api_url, up = host.is_up(), "registration refused: another identity claims the host's name");
                    let message = if host.is_up() {
                        format!(
                            "host {name} is up under another identity: another agent cannot take its name (give this one another --host-name)"
                        )
                    } else {
                        format!(
                            "host {name} is down, and only its own agent (with the identity in its data directory's {}) may bring it back; to replace it for good, forget it first: `wrenn host forget {name}`",
                            IDENTITY_FILE
                        )
                    };
                    return Err(Error::Conflict(message));
                }
                let secret = unclaimed.then(auth::random_token).transpose()?;
                (row.id, secret, !host.is_up())
            }
            None => {
                if let Some(identity) = &request.identity
                    && let Some(other) = self.host(&identity.host_id)
                {
                    // The agent is a known host that changed its --host-name.
                    return Err(Error::Conflict(format!(
                        "this agent is host {} (its identity says so), not {name}: register under that name, or forget that host first (`wrenn host forget {}`)",
                        other.row().name,
                        other.row().name
                    )));
                }
                let id = format!("h{}", auth::random_id(11)?);
                (id, Some(auth::random_token()?), false)
            }
        };
        let identity_hash = match &new_secret {
            Some(secret) => auth::hash_key(secret),
            None => existing
                .as_ref()
                .map(|host| host.row().identity_hash)
                .unwrap_or_default(),
        };
        let heartbeat_token = auth::random_token()?;
        let now = now_ms();
        let row = HostRow {
            id: id.clone(),
            name: request.name,
            api_url: request.api_url,
            proxy_address: request.proxy_address,
            agent_token: request.agent_token,
            heartbeat_hash: auth::hash_key(&heartbeat_token),
            state: HostState::Up,
            report: request.report,
            last_heartbeat_ms: now,
            registered_at_ms: now,
            identity_hash,
        };
        store.put_host(row.clone()).await?;
        tracing::info!(host = %row.name, id = %id, api = %row.api_url, new = new_secret.is_some(), "host registered");
        self.insert(row, Arc::new(agent), false);
        Ok((
            RegisterResponse {
                host_id: id,
                heartbeat_token,
                heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                host_secret: new_secret,
            },
            was_down,
        ))
    }

    /// Forgets a host that is down, for good (it will not come back, or is replaced by a new
    /// agent under its name): its entry and its sandboxes' rows go. How many sandboxes it had.
    pub async fn forget_host(&self, store: &Store, name: &str) -> Result<u64, Error> {
        let _registering = self.registering.lock().await;
        let host = self
            .hosts()
            .into_iter()
            .find(|host| host.row().name == name)
            .ok_or_else(|| Error::HostNotFound(format!("no host {name}")))?;
        if host.in_process || host.is_up() {
            return Err(Error::Conflict(format!(
                "host {name} is up: stop its agent first (only a down host is forgotten)"
            )));
        }
        let id = host.id();
        let sandboxes = store.forget_host(&id).await?;
        self.hosts.write().expect("fleet lock").remove(&id);
        self.sandbox_hosts
            .lock()
            .expect("route cache lock")
            .retain(|_, (host, _)| host != &id);
        tracing::warn!(host = %name, id = %id, sandboxes, "host forgotten");
        Ok(sandboxes)
    }

    /// Takes a heartbeat: whether the host was down until now.
    pub async fn heartbeat(
        &self,
        store: &Store,
        host_id: &str,
        bearer: Option<&str>,
        report: HostReport,
    ) -> Result<bool, Error> {
        use subtle::ConstantTimeEq;
        let Some(host) = self.host(host_id) else {
            return Err(Error::HostNotFound(format!(
                "host {host_id} is not registered"
            )));
        };
        let row = {
            let mut row = host.row.lock().expect("host lock");
            let given = auth::hash_key(bearer.unwrap_or(""));
            if !bool::from(given.as_bytes().ct_eq(row.heartbeat_hash.as_bytes())) {
                return Err(Error::Unauthenticated(
                    "invalid heartbeat token: register again".into(),
                ));
            }
            let was_down = row.state != HostState::Up;
            row.state = HostState::Up;
            row.report = report;
            row.last_heartbeat_ms = now_ms();
            *host.last_seen.lock().expect("host lock") = Instant::now();
            (row.clone(), was_down)
        };
        store.put_host(row.0.clone()).await?;
        if row.1 {
            tracing::info!(host = %row.0.name, "host is back");
        }
        Ok(row.1)
    }

    async fn mark_down(
        &self,
        store: &Store,
        mut row: HostRow,
    ) -> Result<(), crate::store::StoreError> {
        row.state = HostState::Down;
        store.put_host(row.clone()).await?;
        let lost = store.mark_host_lost(&row.id).await?;
        self.sandbox_hosts
            .lock()
            .expect("route cache lock")
            .retain(|_, (host, _)| host != &row.id);
        tracing::warn!(host = %row.name, lost, "host is down: its sandboxes are lost");
        Ok(())
    }

    /// One pass of the heartbeat watch: the embedded host reports itself, silent hosts go down.
    pub async fn check_heartbeats(&self, store: &Store) {
        for host in self.hosts() {
            // This process's own agent: its report is kept in memory only (the stored row is
            // written anew at every start, and nothing else reads it).
            if let Some(report) = host.agent.report_in_process() {
                let mut row = host.row.lock().expect("host lock");
                row.report = report;
                row.last_heartbeat_ms = now_ms();
                continue;
            }
            let silent = host.last_seen.lock().expect("host lock").elapsed();
            if !host.is_up() || silent < self.config.down_after {
                continue;
            }
            let row = {
                let mut row = host.row.lock().expect("host lock");
                row.state = HostState::Down;
                row.clone()
            };
            if let Err(error) = self.mark_down(store, row).await {
                tracing::warn!(%error, "cannot mark a host down");
            }
        }
    }
}

/// What one reconcile pass of a host did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Rows whose sandbox the agent no longer has (or had failed), removed.
    pub removed: Vec<String>,
    /// Rows whose state was corrected to the agent's.
    pub corrected: Vec<String>,
    /// Sandboxes the agent ran that the store did not know, destroyed.
    pub orphans: Vec<String>,
}

/// Makes the store agree with what `host`'s agent runs. The store is read first and states are
/// changed only if unchanged since, so a pause or resume racing the pass wins.
pub async fn reconcile_host(
    store: &Store,
    fleet: &Fleet,
    host: &Host,
) -> Result<Reconciled, Error> {
    let name = host.row().name;
    let host_id = host.id();
    let rows = store.sandboxes_on_host(&host_id).await?;
    let agent: HashMap<String, SandboxSummary> = host
        .list()
        .await?
        .into_iter()
        .map(|sandbox| (sandbox.sandbox_id.clone(), sandbox))
        .collect();
    let mut done = Reconciled::default();
    let known: HashSet<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    for row in &rows {
        match agent.get(&row.id).map(|s| s.state) {
            None => {
                tracing::warn!(sandbox = %row.id, host = %name, "drift: the host no longer has the sandbox: removing it");
                store.delete_sandbox(&row.id).await?;
                fleet.forget(&row.id);
                done.removed.push(row.id.clone());
            }
            Some(SandboxState::Failed) => {
                tracing::warn!(sandbox = %row.id, host = %name, "drift: the sandbox's VM failed: removing it");
                host.destroy(&row.id).await?;
                store.delete_sandbox(&row.id).await?;
                fleet.forget(&row.id);
                done.removed.push(row.id.clone());
            }
            Some(on_host @ (SandboxState::Running | SandboxState::Paused)) => {
                let state = match on_host {
                    SandboxState::Running => RowState::Running,
                    _ => RowState::Paused,
                };
                if state == row.state {
                    continue;
                }
                let changed = store.set_state_if(&row.id, row.state, state).await?;
                if changed {
                    tracing::warn!(sandbox = %row.id, host = %name, from = %row.state, to = %state, "drift: state corrected");
                    fleet.forget(&row.id);
                    done.corrected.push(row.id.clone());
                }
            }
            _ => {}
        }
    }
    let grace = fleet.config.orphan_grace.as_millis() as i64;
    for sandbox in agent.values() {
        if known.contains(sandbox.sandbox_id.as_str())
            || fleet.creating.contains(&sandbox.sandbox_id)
            || now_ms() - sandbox.created_at_ms < grace
        {
            continue;
        }
        // Written since the rows were read?
        if store.sandbox(&sandbox.sandbox_id).await?.is_some() {
            continue;
        }
        tracing::warn!(sandbox = %sandbox.sandbox_id, host = %name, "drift: the store does not know this sandbox: destroying it");
        host.destroy(&sandbox.sandbox_id).await?;
        done.orphans.push(sandbox.sandbox_id.clone());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, total: u32, used: u32, memory: u64) -> Candidate {
        Candidate {
            host_id: id.into(),
            slots_total: total,
            slots_used: used,
            memory_available_mib: memory,
        }
    }

    #[test]
    fn least_loaded_takes_the_emptiest_share_then_the_most_memory() {
        let hosts = [
            candidate("a", 10, 5, 1000),
            candidate("b", 100, 10, 1000),
            candidate("c", 100, 10, 4000),
        ];
        assert_eq!(LeastLoaded.choose(&hosts), 2);
        assert_eq!(LeastLoaded.choose(&hosts[..2]), 1);
    }

    #[test]
    fn binpack_takes_the_fullest_host() {
        let hosts = [candidate("a", 10, 5, 1000), candidate("b", 100, 10, 1000)];
        assert_eq!(BinPack.choose(&hosts), 0);
    }

    fn fleet_of(hosts: &[(&str, &str, u32, u32, u64)]) -> Fleet {
        fleet_with_disk(
            &hosts
                .iter()
                .map(|&(name, state, total, used, memory)| {
                    (name, state, total, used, memory, 1 << 40)
                })
                .collect::<Vec<_>>(),
        )
    }

    fn fleet_with_disk(hosts: &[(&str, &str, u32, u32, u64, u64)]) -> Fleet {
        let fleet = Fleet {
            hosts: RwLock::new(HashMap::new()),
            placement: Box::new(LeastLoaded),
            config: FleetConfig::default(),
            sandbox_hosts: Mutex::new(HashMap::new()),
            placing: Mutex::new(()),
            registering: tokio::sync::Mutex::new(()),
            creating: Busy::default(),
        };
        for (name, state, total, used, memory_mib, disk_bytes) in hosts {
            let row = HostRow {
                id: format!("id-{name}"),
                name: name.to_string(),
                api_url: "http://127.0.0.1:1".into(),
                proxy_address: "127.0.0.1:1".into(),
                agent_token: "t".into(),
                heartbeat_hash: String::new(),
                state: HostState::from_name(state),
                report: HostReport {
                    slots_total: *total,
                    slots_in_use: *used,
                    memory_available_bytes: memory_mib << 20,
                    disk_available_bytes: *disk_bytes,
                    templates: vec![TemplateReport {
                        template_id: "base".into(),
                        memory_mib: 512,
                        vcpus: 1,
                        envd_version: "0.6.4".into(),
                        image_key: String::new(),
                        created_at_ms: 0,
                        disk_size_mb: 2048,
                    }],
                    ..Default::default()
                },
                last_heartbeat_ms: 0,
                registered_at_ms: 0,
                identity_hash: String::new(),
            };
            let agent = RemoteAgent::new(
                "http://127.0.0.1:1",
                "127.0.0.1:1".parse().unwrap(),
                "t",
                Duration::from_secs(1),
            )
            .unwrap();
            fleet.insert(row, Arc::new(agent), false);
        }
        fleet
    }

    #[test]
    fn placement_skips_down_full_and_excluded_hosts_and_counts_creates_in_flight() {
        let fleet = fleet_of(&[
            ("a", "up", 4, 3, 8192),
            ("b", "up", 4, 0, 8192),
            ("c", "down", 4, 0, 8192),
            ("d", "up", 4, 0, 100),
        ]);
        let first = fleet.place("base", &[]).unwrap();
        assert_eq!(first.host.row().name, "b");
        let unknown = fleet.place("nope", &[]).unwrap_err();
        assert!(matches!(unknown, Error::TemplateNotFound(ref t) if t == "nope"));
        // b holds 1 in flight of 4; a has 3 of 4: b again, until its in-flight creates fill it.
        let mut held = vec![first];
        for _ in 0..2 {
            let placed = fleet.place("base", &[]).unwrap();
            assert_eq!(placed.host.row().name, "b");
            held.push(placed);
        }
        let fourth = fleet.place("base", &[]).unwrap();
        assert_eq!(
            fourth.host.row().name,
            "a",
            "both 3/4 full: a has more memory free"
        );
        held.push(fourth);
        let excluded = vec!["id-b".to_string()];
        let full = fleet.place("base", &excluded).unwrap_err();
        assert!(matches!(full, Error::NoCapacity(_)), "{full}");
        for words in [
            "a has no free network slot",
            "b did not answer",
            "c is down",
            "d has 100 MiB free",
        ] {
            assert!(full.to_string().contains(words), "{words}: {full}");
        }
        drop(held);
        assert_eq!(
            fleet.place("base", &[]).unwrap().host.row().name,
            "b",
            "finished creates free their count"
        );
    }

    #[test]
    fn placement_skips_hosts_without_the_disk_a_sandbox_may_take() {
        let fleet = fleet_with_disk(&[
            ("small", "up", 8, 0, 8192, 1 << 30),
            ("roomy", "up", 8, 0, 8192, 3 << 30),
        ]);
        let first = fleet.place("base", &[]).unwrap();
        assert_eq!(
            first.host.row().name,
            "roomy",
            "small has 1 GiB, 2 GiB needed"
        );
        // roomy's 3 GiB hold one 2 GiB disk in flight, not two.
        let full = fleet.place("base", &[]).unwrap_err();
        assert!(matches!(full, Error::NoCapacity(_)), "{full}");
        for words in [
            "small has 1024 MiB of disk free, 2048 MiB needed",
            "roomy has 1024 MiB of disk free, 2048 MiB needed",
        ] {
            assert!(full.to_string().contains(words), "{words}: {full}");
        }
        drop(first);
        assert_eq!(fleet.place("base", &[]).unwrap().host.row().name, "roomy");
    }

    #[test]
    fn strategies_are_chosen_by_name() {
        assert_eq!(placement("binpack").unwrap().name(), "binpack");
        assert_eq!(placement("least-loaded").unwrap().name(), "least-loaded");
        assert!(placement("random").unwrap_err().contains("least-loaded"));
    }
}
