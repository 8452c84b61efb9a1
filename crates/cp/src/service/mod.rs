//! The control plane's service: sandbox lifecycles (create with placement and retry on another
//! host, kill, pause, resume, end times, kill or pause on timeout), admission against the
//! teams' quotas, template builds ([`templates`]), snapshots and forks ([`snapshots`]), and
//! the fleet's loops (heartbeat watch,
//! reconcile). It returns [`Error`],
//! named by cause; it knows no HTTP.

mod create;
pub mod error;
pub mod hooks;
pub mod keys;
pub mod snapshots;
pub mod templates;
pub mod users;

pub use create::{Created, CreatedOnce, SandboxRequest};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::busy::{Busy, Serial};
use crate::deadlines;
use crate::events::EventKind;
use crate::fleet::{self, Fleet};
use crate::quota::{Admission, Change, Quotas, Reservation, Usage};
use crate::replica::Duty;
use crate::store::{ListQuery, SandboxRow, SandboxState, Store};
pub use error::Error;
use serde_json::json;

/// How often the lifecycle's replica looks for builds whose replica stopped.
const BUILD_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// How long an Idempotency-Key is remembered after its create.
pub const IDEMPOTENCY_KEY_LIFE: Duration = Duration::from_secs(24 * 3600);

/// The control plane's state, shared by the API, the proxy and the background loops.
#[derive(Debug)]
pub struct ControlPlane {
    pub store: Store,
    pub fleet: Fleet,
    /// The domain sandboxes are reached under, returned to the SDKs (`domain`).
    pub domain: Option<String>,
    /// Whether sandboxes may reach the internet at all.
    pub internet: bool,
    /// Asks the fleet loop to reconcile a host now (it registered or came back).
    pub reconcile_now: tokio::sync::mpsc::Sender<String>,
    /// Every team's limits (none by default; see [`Self::with_quotas`]).
    pub quotas: Quotas,
    /// Quota checks, one at a time, with the changes admitted and not yet stored.
    admission: Admission,
    /// Changes of a sandbox's state, one at a time per sandbox: take its turn, then read its
    /// row, then change it.
    changes: Serial,
    /// Where the files template builds copy are kept (see [`templates::TemplateFiles`]).
    pub template_files: Option<templates::TemplateFiles>,
    /// The build jobs running in this process, by build id: cancelling one stops its build
    /// on the host (a template's delete does).
    pub(crate) build_jobs:
        std::sync::Mutex<std::collections::HashMap<String, tokio_util::sync::CancellationToken>>,
    /// What extensions hook into creates and events ([`hooks`]).
    pub hooks: Vec<Arc<dyn hooks::Hooks>>,
    /// Creates each API key may make (none by default; see [`Self::with_create_limit`]).
    pub create_limit: crate::ratelimit::RateLimit,
    /// Failed sign-ins by email ([`users`]).
    pub login_limit: users::LoginLimit,
    /// How many teams a user may own (0: no limit): quotas are per team.
    pub teams_per_user: usize,
    /// The notification channels' key and policy (see [`Self::with_channels`]); without them
    /// the channel routes answer that channels are not configured.
    pub channels: Option<crate::channels::Channels>,
    /// The sandboxes' samples and logs collected from the hosts ([`crate::telemetry`]).
    pub telemetry: crate::telemetry::Telemetry,
    /// The bearer token `GET /metrics` asks of callers not on the loopback (none: the
    /// loopback only).
    pub metrics_token: Option<String>,
    /// This process as one of several replicas on a shared store (none: alone on its store).
    pub replica: Option<Arc<crate::replica::Replica>>,
}

/// A change's turn: in this process, and among replicas when there are others.
#[derive(Debug)]
pub struct ChangeTurn {
    // Fields drop in order: the shared turn is given up before the next waiter in this
    // process gets its local one.
    _shared: Option<crate::replica::SharedTurn>,
    _local: crate::busy::Turn,
}

impl ControlPlane {
    /// The ids of the builds whose jobs run in this process.
    pub fn build_jobs_running(&self) -> Vec<String> {
        let jobs = self.build_jobs.lock().expect("build jobs lock");
        jobs.keys().cloned().collect()
    }

    /// A control plane over `store` and `fleet`; the receiver goes to [`Self::run_fleet`].
    pub fn new(
        store: Store,
        fleet: Fleet,
        domain: Option<String>,
        internet: bool,
    ) -> (ControlPlane, tokio::sync::mpsc::Receiver<String>) {
        let (reconcile_now, wake) = tokio::sync::mpsc::channel(64);
        let plane = ControlPlane {
            store,
            fleet,
            domain,
            internet,
            reconcile_now,
            quotas: Quotas::default(),
            admission: Admission::default(),
            changes: Serial::default(),
            build_jobs: Default::default(),
            template_files: None,
            hooks: Vec::new(),
            create_limit: crate::ratelimit::RateLimit::unlimited(),
            login_limit: Default::default(),
            teams_per_user: users::TEAMS_PER_USER,
            channels: None,
            telemetry: crate::telemetry::Telemetry::default(),
            metrics_token: None,
            replica: None,
        };
        (plane, wake)
    }

    /// The same control plane keeping template builds' uploaded files in `dir`.
    pub fn with_template_files(mut self, dir: std::path::PathBuf) -> Self {
        self.template_files = Some(templates::TemplateFiles::new(dir));
        self
    }

    /// The same control plane with `hooks` asked too (after those it has).
    pub fn with_hooks(mut self, hooks: Arc<dyn hooks::Hooks>) -> Self {
        self.hooks.push(hooks);
        self
    }

    /// The same control plane with each key's creates limited by `limit`.
    pub fn with_create_limit(mut self, limit: crate::ratelimit::RateLimit) -> Self {
        self.create_limit = limit;
        self
    }

    /// The same control plane with notification channels, their URLs and secrets sealed by
    /// `channels.secrets` (deliveries are [`crate::channels::run_deliveries`]' to start).
    pub fn with_channels(mut self, channels: crate::channels::Channels) -> Self {
        self.channels = Some(channels);
        self
    }

    /// The same control plane keeping the sandboxes' telemetry as `settings` say.
    pub fn with_telemetry(mut self, settings: crate::telemetry::TelemetrySettings) -> Self {
        self.telemetry = crate::telemetry::Telemetry::new(settings);
        self
    }

    /// The same control plane serving `GET /metrics` to callers with `token` too.
    pub fn with_metrics_token(mut self, token: Option<String>) -> Self {
        self.metrics_token = token.filter(|token| !token.is_empty());
        self
    }

    /// The same control plane as one of several replicas on its store (which must be shared:
    /// PostgreSQL).
    pub fn with_replica(
        mut self,
        settings: crate::replica::ReplicaSettings,
    ) -> Result<Self, crate::replica::ReplicaError> {
        self.replica = Some(Arc::new(crate::replica::Replica::new(
            &self.store,
            settings,
        )?));
        self.fleet.set_route_life(crate::replica::ROUTE_LIFE);
        Ok(self)
    }

    /// Whether this process runs `duty` now: always when alone on its store; as one of
    /// several replicas, while it holds the duty's lease.
    pub fn holds(&self, duty: crate::replica::Duty) -> bool {
        match &self.replica {
            None => true,
            Some(replica) => replica.holds(duty).is_some(),
        }
    }

    /// Waits for `name`'s turn (a sandbox's id, `template-name:<alias>`) and holds it until
    /// dropped: changes of one thing are made one at a time, by this process and by every
    /// replica.
    pub async fn turn(&self, name: &str) -> Result<ChangeTurn, Error> {
        let local = self.changes.turn(name).await;
        let shared = match &self.replica {
            Some(replica) => Some(replica.turn(&self.store, name).await?),
            None => None,
        };
        Ok(ChangeTurn {
            _shared: shared,
            _local: local,
        })
    }

    /// The same control plane with every team limited by `quotas`.
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Admits `change` to team `team_id`'s sandboxes, or refuses it with a 429 naming the
    /// limit. The reservation counts the change until it is dropped: keep it until the store
    /// holds the change.
    pub async fn admit(&self, team_id: &str, change: Change) -> Result<Reservation, Error> {
        if self.quotas == Quotas::default() {
            let nothing = async { Ok::<_, Error>(Usage::default()) };
            return self
                .admission
                .admit(&self.quotas, team_id, team_id, change, nothing)
                .await;
        }
        let team_name = self
            .store
            .team_by_id(team_id)
            .await?
            .map(|team| team.name)
            .unwrap_or_else(|| team_id.to_string());
        self.admission
            .admit(
                &self.quotas,
                team_id,
                &team_name,
                change,
                self.team_usage(team_id),
            )
            .await
    }

    /// What a team's running and paused sandboxes hold (disk estimated: see [`quota`]). A
    /// lost sandbox (its host stopped answering) counts as running: its host may come back
    /// with it, and until it is killed it is the team's.
    async fn team_usage(&self, team_id: &str) -> Result<Usage, Error> {
        let query = ListQuery {
            team_id: team_id.to_string(),
            states: vec![
                SandboxState::Running,
                SandboxState::Paused,
                SandboxState::Lost,
            ],
            limit: 1_000_000,
            ..ListQuery::default()
        };
        let (rows, _) = self.store.list(query).await?;
        let templates = self.fleet.templates();
        let mut usage = Usage::default();
        // Its snapshots: their memory and the most their disk can hold.
        for template in self.store.templates_for(team_id).await? {
            if template.team_id != team_id || template.source_sandbox_id.is_none() {
                continue;
            }
            for build in self.store.builds_of(&template.id).await? {
                if build.status == crate::store::BuildStatus::Ready {
                    usage.disk_mib += u64::from(build.memory_mb) + u64::from(build.disk_size_mb);
                }
            }
        }
        for row in rows {
            let disk = templates
                .iter()
                .find(|t| t.template_id == row.template_id)
                .map(|t| t.disk_size_mb)
                .unwrap_or(0);
            if row.state == SandboxState::Paused {
                usage.paused += 1;
                usage.disk_mib += disk + u64::from(row.memory_mb);
            } else {
                usage.running += 1;
                usage.disk_mib += disk;
            }
        }
        Ok(usage)
    }

    /// Kills the sandbox with this id, if there is one: whether there was.
    pub async fn kill_by_id(&self, id: &str) -> Result<bool, Error> {
        let _turn = self.turn(id).await?;
        match self.store.sandbox(id).await? {
            Some(row) => self.kill(&row).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Kills a sandbox: its VM (when its host is up; a lost sandbox's host may be gone for
    /// good) and its record.
    pub async fn kill(&self, row: &SandboxRow) -> Result<(), Error> {
        let _uncached = self.fleet.hold_route(&row.id);
        if let Some(host) = self.fleet.host(&row.host_id)
            && host.is_up()
        {
            host.destroy(&row.id).await?;
            // The VM's last lines, read by its host at the destroy, collected now (a few
            // seconds at most: the kill is done); if not in time, the next collection still
            // knows whose they are. Among replicas, only the collection's own replica collects
            // (the others' would race it): its next round has them.
            self.remember_sandbox(row);
            let last = async {
                if self.holds(crate::replica::Duty::Telemetry) {
                    self.collect_telemetry(&host).await.map(drop)
                } else {
                    Ok(())
                }
            };
            match tokio::time::timeout(std::time::Duration::from_secs(5), last).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(sandbox = %row.id, %error, "the killed sandbox's last telemetry was not collected");
                }
                Err(_) => {
                    tracing::warn!(sandbox = %row.id, "the killed sandbox's last telemetry was not collected in time");
                }
            }
        } else if row.state != SandboxState::Lost {
            self.fleet.up_host(row)?;
        }
        self.store.delete_sandbox(&row.id).await?;
        tracing::info!(sandbox = %row.id, "sandbox killed");
        self.store
            .publish(EventKind::SandboxKilled, &row.team_id, &row.id, json!({}))
            .await;
        Ok(())
    }

    /// Pauses a running sandbox, with its memory or (`memory` false) its disk alone.
    pub async fn pause(&self, row: &SandboxRow, memory: bool) -> Result<(), Error> {
        let host = self.fleet.up_host(row)?;
        let snapshot_mib = if memory { u64::from(row.memory_mb) } else { 0 };
        let admitted = self
            .admit(&row.team_id, Change::Pause { snapshot_mib })
            .await?;
        // Until the store says paused, traffic is routed by the store, never by a route kept
        // from before: a stale one would never let autoResume resume it.
        let _uncached = self.fleet.hold_route(&row.id);
        host.pause(&row.id, !memory).await?;
        let paused = SandboxRow {
            state: SandboxState::Paused,
            paused_disk_only: !memory,
            ..row.clone()
        };
        admitted.settle(self.store.put_sandbox(paused)).await?;
        let data = json!({ "memory": memory });
        self.store
            .publish(EventKind::SandboxPaused, &row.team_id, &row.id, data)
            .await;
        Ok(())
    }

    /// The team's sandbox `sandbox_id` (a lost one is gone), else "not found": another team's
    /// is not told apart from none.
    pub(crate) async fn team_sandbox(
        &self,
        team_id: &str,
        sandbox_id: &str,
    ) -> Result<SandboxRow, Error> {
        self.store
            .sandbox(sandbox_id)
            .await?
            .filter(|row| row.team_id == team_id && row.state != SandboxState::Lost)
            .ok_or_else(|| Error::SandboxNotFound(sandbox_id.to_string()))
    }

    /// `PUT /sandboxes/{id}/network`: replaces the team's sandbox's egress rules (a running
    /// one's at once, a paused one's for its resume); its host mask stays.
    pub async fn update_network(
        &self,
        team_id: &str,
        sandbox_id: &str,
        allow_internet: bool,
        egress: wrenn_agent_api::network::EgressSettings,
    ) -> Result<(), Error> {
        let _turn = self.turn(sandbox_id).await?;
        let row = self.team_sandbox(team_id, sandbox_id).await?;
        let network = crate::store::StoredNetwork {
            egress,
            ..row.network.clone()
        };
        create::check_network(&network)?;
        if !matches!(row.state, SandboxState::Running | SandboxState::Paused) {
            return Err(Error::Conflict(format!(
                "sandbox \"{sandbox_id}\" is {}: its network changes once it runs or is paused",
                row.state.as_str()
            )));
        }
        let allow_internet = allow_internet && self.internet;
        let host = self.fleet.up_host(&row)?;
        host.update_network(&row.id, allow_internet, &network.egress)
            .await?;
        self.store
            .put_sandbox(SandboxRow {
                allow_internet,
                network,
                ..row
            })
            .await?;
        tracing::info!(sandbox = %sandbox_id, "network rules replaced");
        Ok(())
    }

    /// Resumes a paused sandbox until `end_at_ms`: its memory restored, or (`from_disk`, or a
    /// pause that kept none) booted from its disk.
    pub async fn resume(
        &self,
        row: &SandboxRow,
        end_at_ms: i64,
        auto_pause: Option<bool>,
        from_disk: bool,
    ) -> Result<SandboxRow, Error> {
        let host = self.fleet.up_host(row)?;
        let admitted = self.admit(&row.team_id, Change::Resume).await?;
        host.resume(&row.id, from_disk).await?;
        let mut row = row.clone();
        row.state = SandboxState::Running;
        row.paused_disk_only = false;
        row.end_at_ms = end_at_ms;
        if let Some(auto_pause) = auto_pause {
            row.auto_pause = auto_pause;
        }
        admitted.settle(self.store.put_sandbox(row.clone())).await?;
        let data = json!({ "fromDisk": from_disk });
        self.store
            .publish(EventKind::SandboxResumed, &row.team_id, &row.id, data)
            .await;
        Ok(row)
    }

    /// Resumes a paused sandbox that asked to be resumed by traffic (for five minutes): whether
    /// it runs now.
    pub async fn resume_on_traffic(&self, id: &str) -> bool {
        const AUTO_RESUME_TIMEOUT_MS: i64 = 5 * 60 * 1000;
        let Ok(_turn) = self.turn(id).await else {
            return false;
        };
        let Ok(Some(row)) = self.store.sandbox(id).await else {
            return false;
        };
        // A sandbox paused without memory is resumed by an explicit request only (E2B's rule:
        // traffic must not reboot it).
        if row.state != SandboxState::Paused || !row.auto_resume || row.paused_disk_only {
            return row.state == SandboxState::Running;
        }
        let end = chrono::Utc::now().timestamp_millis() + AUTO_RESUME_TIMEOUT_MS;
        match self.resume(&row, end, None, false).await {
            Ok(_) => {
                tracing::info!(sandbox = id, "resumed by traffic");
                true
            }
            Err(error) => {
                tracing::warn!(sandbox = id, ?error, "resume on traffic failed");
                false
            }
        }
    }

    /// Ends sandboxes whose time is up, once a second: paused if they asked for it, else
    /// killed. Each action runs on a task of its own, at most
    /// [`deadlines::ACTIONS_PER_HOST`] at once per host, so a host that does not answer delays
    /// only its own sandboxes (whose actions are retried once their calls' deadlines pass).
    /// Runs until the process ends.
    pub async fn run_lifecycle(self: Arc<Self>) {
        let busy = Busy::default();
        let mut per_host: HashMap<String, Arc<tokio::sync::Semaphore>> = HashMap::new();
        let mut files_checked: Option<std::time::Instant> = None;
        let mut keys_pruned: Option<std::time::Instant> = None;
        let mut builds_swept: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Template files no build used for a week: at the start, then hourly.
            if files_checked.is_none_or(|at| at.elapsed() > Duration::from_secs(3600)) {
                files_checked = Some(std::time::Instant::now());
                if let Some(files) = &self.template_files {
                    let removed = files.remove_unused(templates::UNUSED_FILES_LIFE);
                    if removed > 0 {
                        tracing::info!(removed, "template files no build used for a week removed");
                    }
                }
            }
            // Among replicas, one ends sandboxes at a time (each end also takes the sandbox's
            // turn, so a handover never ends one twice).
            if !self.holds(Duty::Lifecycle) {
                continue;
            }
            // Among replicas, builds whose replica died (a start sweeps them alone on a store).
            if self.replica.is_some()
                && builds_swept.is_none_or(|at| at.elapsed() > BUILD_SWEEP_INTERVAL)
            {
                builds_swept = Some(std::time::Instant::now());
                match self.fail_interrupted_builds().await {
                    Ok(0) => {}
                    Ok(failed) => tracing::warn!(failed, "builds whose replica stopped are failed"),
                    Err(error) => {
                        tracing::warn!(%error, "cannot look for builds whose replica stopped")
                    }
                }
            }
            if keys_pruned.is_none_or(|at| at.elapsed() > Duration::from_secs(3600)) {
                keys_pruned = Some(std::time::Instant::now());
                let before = wrenn_core::now_ms() - IDEMPOTENCY_KEY_LIFE.as_millis() as i64;
                match self.store.prune_idempotency(before).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::info!(pruned, "day-old idempotency keys forgotten"),
                    Err(error) => tracing::warn!(%error, "cannot forget old idempotency keys"),
                }
            }
            let now = chrono::Utc::now().timestamp_millis();
            let expired = match self.store.expired(now).await {
                Ok(expired) => expired,
                Err(error) => {
                    tracing::warn!(%error, "lifecycle: cannot read the store");
                    continue;
                }
            };
            for row in expired {
                let slots = per_host
                    .entry(row.host_id.clone())
                    .or_insert_with(|| {
                        Arc::new(tokio::sync::Semaphore::new(deadlines::ACTIONS_PER_HOST))
                    })
                    .clone();
                // Its host is busy with as many actions as it may have: next tick.
                let Ok(permit) = slots.try_acquire_owned() else {
                    continue;
                };
                // Still being ended by an earlier tick's task.
                let Some(claim) = busy.claim(&row.id) else {
                    continue;
                };
                let plane = self.clone();
                tokio::spawn(async move {
                    plane.end(&row).await;
                    drop((permit, claim));
                });
            }
        }
    }

    /// Ends a sandbox whose time is up, unless a change made while it waited for its turn
    /// (a new timeout, a pause, a kill) means it is not.
    async fn end(&self, expired: &SandboxRow) {
        // Without its turn (the store fails), the next round tries again.
        let Ok(_turn) = self.turn(&expired.id).await else {
            return;
        };
        let row = match self.store.sandbox(&expired.id).await {
            Ok(Some(row))
                if row.state == SandboxState::Running
                    && row.end_at_ms <= chrono::Utc::now().timestamp_millis() =>
            {
                row
            }
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(sandbox = %expired.id, %error, "lifecycle: cannot read the store");
                return;
            }
        };
        let row = &row;
        let action = if row.auto_pause { "pause" } else { "kill" };
        self.store
            .publish(
                EventKind::SandboxTimedOut,
                &row.team_id,
                &row.id,
                json!({ "action": action }),
            )
            .await;
        let outcome = if row.auto_pause {
            tracing::info!(sandbox = %row.id, "timeout: pausing");
            match self.pause(row, row.auto_pause_memory).await {
                // Past its team's paused (or disk) limit, a sandbox whose time is up is
                // killed: left running, it would outlive its timeout for good.
                Err(Error::QuotaExceeded(exceeded)) => {
                    tracing::warn!(sandbox = %row.id, reason = %exceeded, "timeout: cannot pause: killing");
                    self.kill(row).await
                }
                outcome => outcome,
            }
        } else {
            tracing::info!(sandbox = %row.id, "timeout: killing");
            self.kill(row).await
        };
        if let Err(error) = outcome {
            tracing::warn!(sandbox = %row.id, ?error, "lifecycle action failed");
        }
    }

    /// Watches heartbeats (half the interval) and reconciles every up host (each
    /// `reconcile_interval`, and at once when a host registers or comes back). A host's
    /// reconcile runs on a task of its own, one at a time per host, so that a host that does
    /// not answer holds up neither the heartbeat watch nor the other hosts. Runs until the
    /// process ends.
    pub async fn run_fleet(self: Arc<Self>, mut wake: tokio::sync::mpsc::Receiver<String>) {
        let tick = (self.fleet.config.heartbeat_interval / 2).max(Duration::from_millis(100));
        let mut heartbeats = tokio::time::interval(tick);
        let mut reconcile = tokio::time::interval(self.fleet.config.reconcile_interval);
        let busy = Busy::default();
        loop {
            tokio::select! {
                _ = heartbeats.tick() => {
                    // Replicas: what the others heard, registered or marked down.
                    if self.replica.is_some() {
                        match self.fleet.refresh(&self.store).await {
                            Ok(woken) if self.holds(Duty::Reconcile) => {
                                for host in woken.iter().filter_map(|id| self.fleet.host(id)) {
                                    self.spawn_reconcile(host, &busy);
                                }
                            }
                            Ok(_) => {}
                            Err(error) => tracing::warn!(%error, "cannot read the hosts from the store"),
                        }
                    }
                    if self.holds(Duty::FleetWatch) {
                        self.fleet.check_heartbeats(&self.store).await;
                    }
                }
                _ = reconcile.tick() => {
                    if self.holds(Duty::Reconcile) {
                        for host in self.fleet.hosts() {
                            if host.is_up() {
                                self.spawn_reconcile(host, &busy);
                            }
                        }
                    }
                }
                Some(host_id) = wake.recv() => {
                    if self.holds(Duty::Reconcile)
                        && let Some(host) = self.fleet.host(&host_id)
                    {
                        self.spawn_reconcile(host, &busy);
                    }
                }
            }
        }
    }

    /// Reconciles `host` on a task of its own, unless a reconcile of it still runs.
    fn spawn_reconcile(self: &Arc<Self>, host: Arc<fleet::Host>, busy: &Busy) {
        let Some(claim) = busy.claim(&host.id()) else {
            return;
        };
        let plane = self.clone();
        tokio::spawn(async move {
            plane.reconcile(&host).await;
            drop(claim);
        });
    }

    async fn reconcile(&self, host: &fleet::Host) {
        match fleet::reconcile_host(&self.store, &self.fleet, host).await {
            Ok(done) if done != fleet::Reconciled::default() => {
                tracing::info!(host = %host.row().name, ?done, "reconciled");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(host = %host.row().name, %error, "cannot reconcile the host");
            }
        }
    }
}
