//! [`FakeAgent`]: an in-memory [`HostAgent`] for the control plane's fast tests, which run
//! without root, QEMU or a guest. Its semantics are the real agent's: sandboxes move through
//! the same states, an operation in the wrong state is refused as the agent refuses it
//! ([`HostAgentError::Conflict`]), a host with no free slot says so
//! ([`HostAgentError::NoCapacity`]), an unknown template or sandbox is
//! [`HostAgentError::NotFound`]. A test can inject what a real host does on a bad day: an error
//! for the next call of an operation, a delay, a VM that dies, a sandbox the agent lost, one the
//! control plane never knew; and read back every call the control plane made. Like the real
//! agent's, an operation runs to its end even if its caller stops waiting (a deadline passed).
//! [`FakeAgent::router`] serves it over the agent's Connect API, so that it can join a control
//! plane's fleet as a host in another process would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wrenn_connect::server::{serve_unary, unary_error};
use wrenn_connect::{Code, ConnectError, DEFAULT_MAX_MESSAGE_BYTES, Message};
use wrenn_proto::Rpc;
use wrenn_proto::agent as pb;

use crate::build::{BuildLog, LogLevel, TemplateBuild};
use crate::join::{HostReport, TemplateReport};
use crate::{
    CreateOptions, CreateTimings, GuestRoute, HostAgent, HostAgentError, SandboxState,
    SandboxSummary,
};

/// An operation of the [`HostAgent`] trait, to inject a failure or a delay into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    Create,
    Pause,
    Resume,
    Destroy,
    List,
    Report,
    Build,
    DeleteTemplate,
    /// A template taken from the store (by a create that needed it).
    Pull,
    Checkpoint,
    UpdateNetwork,
}

/// A sandbox the fake holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSandbox {
    pub template_id: String,
    pub state: SandboxState,
    pub created_at_ms: i64,
    pub options: CreateOptions,
    /// Paused without its memory.
    pub disk_only: bool,
    /// The checkpoints taken of it, which its disk stands on.
    pub layered_on: Vec<String>,
}

impl FakeSandbox {
    fn stands_on(&self, template_id: &str) -> bool {
        self.template_id == template_id || self.layered_on.iter().any(|id| id == template_id)
    }
}

#[derive(Debug, Default)]
struct State {
    templates: Vec<TemplateReport>,
    slots_total: u32,
    memory_bytes: u64,
    disk_bytes: u64,
    sandboxes: BTreeMap<String, FakeSandbox>,
    failures: BTreeMap<Operation, Vec<HostAgentError>>,
    delays: BTreeMap<Operation, Duration>,
    calls: Vec<(Operation, String)>,
    next_id: u64,
    /// Each built template's parent.
    parents: BTreeMap<String, String>,
    /// Every build asked for, in order.
    builds: Vec<TemplateBuild>,
    /// The template store it puts its builds in and pulls missing templates from.
    store: Option<FakeTemplateStore>,
    /// Its forks' checkpoints, removed once nothing stands on them.
    ephemeral: Vec<String>,
}

/// A template store fakes share (as the real agents of a fleet share one): the templates
/// their builds put there, by location.
#[derive(Debug, Clone, Default)]
pub struct FakeTemplateStore {
    pub location: String,
    templates: Arc<Mutex<Vec<TemplateReport>>>,
}

impl FakeTemplateStore {
    pub fn new(location: &str) -> FakeTemplateStore {
        FakeTemplateStore {
            location: location.into(),
            templates: Arc::default(),
        }
    }

    /// The ids of the templates in it.
    pub fn template_ids(&self) -> Vec<String> {
        let templates = self.templates.lock().expect("fake store lock");
        templates.iter().map(|t| t.template_id.clone()).collect()
    }
}

/// An in-memory host agent.
#[derive(Debug)]
pub struct FakeAgent {
    state: Arc<Mutex<State>>,
    /// What its tests record of its sandboxes, for the control plane to collect.
    telemetry: crate::telemetry::TelemetryBuffer,
}

/// A template as the fake's hosts report it: `memory_mib` of memory, a 2 GiB disk.
pub fn template(template_id: &str, memory_mib: u32) -> TemplateReport {
    TemplateReport {
        template_id: template_id.into(),
        memory_mib,
        vcpus: 1,
        envd_version: "0.0.0-fake".into(),
        image_key: "fake".into(),
        created_at_ms: 0,
        disk_size_mb: 2048,
        memory_mapped: false,
    }
}

use wrenn_core::now_ms;

impl FakeAgent {
    /// Where its tests record samples and log lines of its sandboxes, as a real host's agent
    /// does of its guests.
    pub fn telemetry_buffer(&self) -> &crate::telemetry::TelemetryBuffer {
        &self.telemetry
    }

    /// A host with `slots_total` network slots, 64 GiB of memory, 1 TiB of disk, and
    /// `templates`.
    pub fn new(slots_total: u32, templates: Vec<TemplateReport>) -> FakeAgent {
        FakeAgent {
            telemetry: crate::telemetry::TelemetryBuffer::new(
                Duration::from_secs(5),
                crate::telemetry::BUFFER_ENTRIES,
            ),
            state: Arc::new(Mutex::new(State {
                templates,
                slots_total,
                memory_bytes: 64 << 30,
                disk_bytes: 1 << 40,
                ..State::default()
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake agent lock")
    }

    /// The next call of `operation` fails with `error` (errors queue up, first in first out).
    pub fn fail_next(&self, operation: Operation, error: HostAgentError) {
        self.lock()
            .failures
            .entry(operation)
            .or_default()
            .push(error);
    }

    /// Every later call of `operation` takes `delay` before it does anything (`Duration::ZERO`
    /// for none).
    pub fn delay(&self, operation: Operation, delay: Duration) {
        self.lock().delays.insert(operation, delay);
    }

    /// Puts its builds in `store`, and pulls the templates it lacks from there.
    pub fn use_store(&self, store: &FakeTemplateStore) {
        self.lock().store = Some(store.clone());
    }

    /// Sets the free memory and disk the host reports.
    pub fn set_free(&self, memory_bytes: u64, disk_bytes: u64) {
        let mut state = self.lock();
        state.memory_bytes = memory_bytes;
        state.disk_bytes = disk_bytes;
    }

    /// The sandbox's VM dies: the agent reports it failed.
    pub fn kill_vm(&self, sandbox_id: &str) -> bool {
        match self.lock().sandboxes.get_mut(sandbox_id) {
            Some(sandbox) => {
                sandbox.state = SandboxState::Failed;
                true
            }
            None => false,
        }
    }

    /// The agent loses the sandbox (its records are gone, as after a disk was wiped).
    pub fn lose(&self, sandbox_id: &str) -> bool {
        self.lock().sandboxes.remove(sandbox_id).is_some()
    }

    /// A running sandbox the control plane never asked for, created `age` ago.
    /// The host has `template` too (as if it had built or pulled it).
    pub fn add_template(&self, template: TemplateReport) {
        self.lock().templates.push(template);
    }

    /// Makes the host's template `template_id` as old as `age` (past the reconcile pass's
    /// grace, say).
    pub fn age_template(&self, template_id: &str, age: Duration) {
        for template in &mut self.lock().templates {
            if template.template_id == template_id {
                template.created_at_ms = now_ms() - age.as_millis() as i64;
            }
        }
    }

    pub fn add_orphan(&self, sandbox_id: &str, template_id: &str, age: Duration) {
        let created_at_ms = now_ms() - age.as_millis() as i64;
        self.lock().sandboxes.insert(
            sandbox_id.into(),
            FakeSandbox {
                template_id: template_id.into(),
                state: SandboxState::Running,
                created_at_ms,
                options: CreateOptions {
                    template_id: template_id.into(),
                    sandbox_id: Some(sandbox_id.into()),
                    ..CreateOptions::default()
                },
                disk_only: false,
                layered_on: Vec::new(),
            },
        );
    }

    /// The sandbox as the agent holds it.
    pub fn sandbox(&self, sandbox_id: &str) -> Option<FakeSandbox> {
        self.lock().sandboxes.get(sandbox_id).cloned()
    }

    /// Every sandbox's id and state.
    pub fn states(&self) -> BTreeMap<String, SandboxState> {
        self.lock()
            .sandboxes
            .iter()
            .map(|(id, sandbox)| (id.clone(), sandbox.state))
            .collect()
    }

    /// Every build the control plane asked for, in order (files included).
    pub fn builds(&self) -> Vec<TemplateBuild> {
        self.lock().builds.clone()
    }

    /// Every call the control plane made, in order, with the sandbox (or template) it named.
    pub fn calls(&self) -> Vec<(Operation, String)> {
        self.lock().calls.clone()
    }

    /// Runs one call as the real agent does, on a task of its own that finishes even if the
    /// caller stops waiting: the call recorded, its delay waited, its injected failure returned
    /// if there is one, else `work` done on the state.
    async fn run<T: Send + 'static>(
        &self,
        operation: Operation,
        subject: &str,
        work: impl FnOnce(&mut State) -> Result<T, HostAgentError> + Send + 'static,
    ) -> Result<T, HostAgentError> {
        let delay = {
            let mut state = self.lock();
            state.calls.push((operation, subject.to_string()));
            state.delays.get(&operation).copied()
        };
        let state = self.state.clone();
        let task = tokio::spawn(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let mut state = state.lock().expect("fake agent lock");
            match state.failures.get_mut(&operation) {
                Some(queue) if !queue.is_empty() => Err(queue.remove(0)),
                _ => work(&mut state),
            }
        });
        match task.await {
            Ok(answer) => answer,
            Err(error) => Err(HostAgentError::Failed(format!(
                "the operation's task failed: {error}"
            ))),
        }
    }
}

impl State {
    fn running(&self) -> u32 {
        self.sandboxes
            .values()
            .filter(|s| s.state == SandboxState::Running)
            .count() as u32
    }

    /// Creates the sandbox: its id.
    fn create(&mut self, options: CreateOptions) -> Result<String, HostAgentError> {
        self.pull(&options.template_id);
        if !self
            .templates
            .iter()
            .any(|t| t.template_id == options.template_id)
        {
            return Err(HostAgentError::NotFound(format!(
                "no template {}",
                options.template_id
            )));
        }
        let id = match &options.sandbox_id {
            Some(id) => id.clone(),
            None => {
                self.next_id += 1;
                format!("fake{}", self.next_id)
            }
        };
        if self.sandboxes.contains_key(&id) {
            return Err(HostAgentError::Conflict(format!(
                "sandbox {id} already exists"
            )));
        }
        if self.running() >= self.slots_total {
            return Err(HostAgentError::NoCapacity(
                "no free network slot on this host".into(),
            ));
        }
        self.sandboxes.insert(
            id.clone(),
            FakeSandbox {
                template_id: options.template_id.clone(),
                state: SandboxState::Running,
                created_at_ms: now_ms(),
                options,
                disk_only: false,
                layered_on: Vec::new(),
            },
        );
        Ok(id)
    }

    /// Takes a checkpoint of a running sandbox as the template `template_id`, over the
    /// sandbox's template (and its earlier checkpoints), which it then stands on.
    fn checkpoint(
        &mut self,
        sandbox_id: &str,
        template_id: &str,
        ephemeral: bool,
    ) -> Result<crate::Checkpoint, HostAgentError> {
        if self.templates.iter().any(|t| t.template_id == template_id) {
            return Err(HostAgentError::Conflict(format!(
                "template {template_id} already exists"
            )));
        }
        let sandbox = self
            .sandboxes
            .get_mut(sandbox_id)
            .ok_or_else(|| HostAgentError::NotFound(format!("no sandbox {sandbox_id}")))?;
        if sandbox.state != SandboxState::Running {
            return Err(HostAgentError::Conflict(format!(
                "sandbox {sandbox_id} is {}: only a running sandbox can be snapshotted or forked",
                sandbox.state
            )));
        }
        let parent = sandbox
            .layered_on
            .last()
            .cloned()
            .unwrap_or_else(|| sandbox.template_id.clone());
        sandbox.layered_on.push(template_id.to_string());
        let of = self
            .templates
            .iter()
            .find(|t| t.template_id == sandbox.template_id)
            .cloned()
            .unwrap_or_else(|| template(&sandbox.template_id, 512));
        // A checkpoint's memory is in its stream (as a real host writes it).
        let made = TemplateReport {
            template_id: template_id.to_string(),
            created_at_ms: now_ms(),
            memory_mapped: false,
            ..of
        };
        self.templates.push(made.clone());
        self.parents.insert(template_id.to_string(), parent);
        if ephemeral {
            self.ephemeral.push(template_id.to_string());
        } else if let Some(store) = &self.store {
            store
                .templates
                .lock()
                .expect("fake store lock")
                .push(made.clone());
        }
        Ok(crate::Checkpoint {
            snapshot_bytes: u64::from(made.memory_mib) << 20,
            template: made,
            paused: Duration::from_millis(1),
            total: Duration::from_millis(2),
        })
    }

    /// Removes the forks' checkpoints nothing stands on any more.
    fn collect_ephemeral(&mut self) {
        loop {
            let unused = self.ephemeral.iter().find(|id| {
                !self.sandboxes.values().any(|s| s.stands_on(id))
                    && !self.parents.values().any(|parent| parent == *id)
            });
            let Some(id) = unused.cloned() else { return };
            self.ephemeral.retain(|other| *other != id);
            self.templates.retain(|t| t.template_id != id);
            self.parents.remove(&id);
        }
    }

    /// Moves a sandbox from `from` to `to`, or says why it cannot.
    fn transition(
        &mut self,
        sandbox_id: &str,
        from: SandboxState,
        to: SandboxState,
    ) -> Result<(), HostAgentError> {
        let running = self.running();
        let slots_total = self.slots_total;
        let sandbox = self
            .sandboxes
            .get_mut(sandbox_id)
            .ok_or_else(|| HostAgentError::NotFound(format!("no sandbox {sandbox_id}")))?;
        if sandbox.state != from {
            return Err(HostAgentError::Conflict(format!(
                "sandbox {sandbox_id} is {}, not {from}",
                sandbox.state
            )));
        }
        if to == SandboxState::Running && running >= slots_total {
            return Err(HostAgentError::NoCapacity(
                "no free network slot on this host".into(),
            ));
        }
        sandbox.state = to;
        Ok(())
    }

    fn destroy(&mut self, sandbox_id: &str) -> Result<(), HostAgentError> {
        match self.sandboxes.remove(sandbox_id) {
            Some(_) => {
                self.collect_ephemeral();
                Ok(())
            }
            None => Err(HostAgentError::NotFound(format!("no sandbox {sandbox_id}"))),
        }
    }

    /// How many pulls it made.
    fn pulls(&self) -> usize {
        let calls = self.calls.iter();
        calls.filter(|(op, _)| *op == Operation::Pull).count()
    }

    /// Takes `template_id` from the store when it lacks it and the store has it.
    fn pull(&mut self, template_id: &str) {
        if self.templates.iter().any(|t| t.template_id == template_id) {
            return;
        }
        let Some(store) = &self.store else { return };
        let stored = store
            .templates
            .lock()
            .expect("fake store lock")
            .iter()
            .find(|t| t.template_id == template_id)
            .cloned();
        if let Some(template) = stored {
            self.calls.push((Operation::Pull, template_id.to_string()));
            self.templates.push(template);
        }
    }

    fn delete_template(&mut self, template_id: &str) -> Result<(), HostAgentError> {
        // As the agent does: a copy the host cannot remove leaves the store's alone.
        let local = self.templates.iter().any(|t| t.template_id == template_id);
        if local
            && let Some((id, _)) = self
                .sandboxes
                .iter()
                .find(|(_, sandbox)| sandbox.stands_on(template_id))
        {
            return Err(HostAgentError::Conflict(format!(
                "template {template_id} is in use by sandboxes {id}: destroy them first"
            )));
        }
        let stored = self.store.as_ref().is_some_and(|store| {
            let mut templates = store.templates.lock().expect("fake store lock");
            let before = templates.len();
            templates.retain(|t| t.template_id != template_id);
            templates.len() != before
        });
        if stored && !self.templates.iter().any(|t| t.template_id == template_id) {
            return Ok(());
        }
        if !self.templates.iter().any(|t| t.template_id == template_id) {
            return Err(HostAgentError::NotFound(format!(
                "template {template_id} not found"
            )));
        }
        if let Some((id, _)) = self
            .sandboxes
            .iter()
            .find(|(_, sandbox)| sandbox.template_id == template_id)
        {
            return Err(HostAgentError::Conflict(format!(
                "template {template_id} is in use by sandboxes {id}: destroy them first"
            )));
        }
        if let Some(child) = self
            .parents
            .iter()
            .find(|(_, parent)| *parent == template_id)
        {
            return Err(HostAgentError::Conflict(format!(
                "template {template_id} is the parent of templates {}: delete them first",
                child.0
            )));
        }
        self.templates.retain(|t| t.template_id != template_id);
        self.parents.remove(template_id);
        Ok(())
    }

    fn build(
        &mut self,
        build: TemplateBuild,
        logs: &tokio::sync::mpsc::UnboundedSender<BuildLog>,
    ) -> Result<TemplateReport, HostAgentError> {
        let parent = self
            .templates
            .iter()
            .find(|t| t.template_id == build.from_template)
            .cloned()
            .ok_or_else(|| {
                HostAgentError::NotFound(format!("template {} not found", build.from_template))
            })?;
        if self
            .templates
            .iter()
            .any(|t| t.template_id == build.template_id)
        {
            return Err(HostAgentError::Conflict(format!(
                "template {} already exists",
                build.template_id
            )));
        }
        if let Some(image) = &build.from_image {
            let login = image
                .username
                .as_ref()
                .map(|user| format!(" (login as {user})"))
                .unwrap_or_default();
            let _ = logs.send(BuildLog::now(
                LogLevel::Info,
                Some("base".into()),
                format!("pulling {}{login}", image.reference),
            ));
        }
        let total = build.steps.len();
        for (index, step) in build.steps.iter().enumerate() {
            step.check(index + 1)
                .map_err(HostAgentError::InvalidArgument)?;
            if let Some(hash) = &step.files_hash
                && !build.files.contains_key(hash)
            {
                return Err(HostAgentError::InvalidArgument(format!(
                    "step {} (COPY): the build carries no files {hash}",
                    index + 1
                )));
            }
            let line = format!("[{}/{total}] {}", index + 1, step.describe());
            let _ = logs.send(BuildLog::now(
                LogLevel::Info,
                Some((index + 1).to_string()),
                line,
            ));
        }
        let template = TemplateReport {
            template_id: build.template_id,
            memory_mib: build.memory_mib.unwrap_or(parent.memory_mib),
            vcpus: build.vcpus.unwrap_or(parent.vcpus),
            created_at_ms: now_ms(),
            ..parent
        };
        self.templates.push(template.clone());
        if let Some(store) = &self.store {
            store
                .templates
                .lock()
                .expect("fake store lock")
                .push(template.clone());
        }
        // A template from an image stands on no other (it took only the base's kernel).
        if build.from_image.is_none() {
            self.parents
                .insert(template.template_id.clone(), build.from_template.clone());
        }
        Ok(template)
    }

    fn list(&self) -> Vec<SandboxSummary> {
        self.sandboxes
            .iter()
            .map(|(id, sandbox)| SandboxSummary {
                sandbox_id: id.clone(),
                state: sandbox.state,
                created_at_ms: sandbox.created_at_ms,
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl HostAgent for FakeAgent {
    async fn create(&self, options: CreateOptions) -> Result<CreateTimings, HostAgentError> {
        let subject = options.sandbox_id.clone().unwrap_or_default();
        self.run(Operation::Create, &subject, move |state| {
            let before = state.pulls();
            state.create(options)?;
            // A pull takes time, however little.
            let pulled = state.pulls() > before;
            Ok(CreateTimings {
                pull: Duration::from_millis(u64::from(pulled)),
                ..CreateTimings::default()
            })
        })
        .await
    }

    async fn pause(&self, sandbox_id: &str, disk_only: bool) -> Result<(), HostAgentError> {
        let id = sandbox_id.to_string();
        self.run(Operation::Pause, sandbox_id, move |state| {
            state.transition(&id, SandboxState::Running, SandboxState::Paused)?;
            if let Some(sandbox) = state.sandboxes.get_mut(&id) {
                sandbox.disk_only = disk_only;
            }
            Ok(())
        })
        .await
    }

    async fn checkpoint(
        &self,
        sandbox_id: &str,
        template_id: &str,
        ephemeral: bool,
    ) -> Result<crate::Checkpoint, HostAgentError> {
        let (id, template_id) = (sandbox_id.to_string(), template_id.to_string());
        self.run(Operation::Checkpoint, sandbox_id, move |state| {
            state.checkpoint(&id, &template_id, ephemeral)
        })
        .await
    }

    async fn resume(&self, sandbox_id: &str, _from_disk: bool) -> Result<(), HostAgentError> {
        let id = sandbox_id.to_string();
        self.run(Operation::Resume, sandbox_id, move |state| {
            state.transition(&id, SandboxState::Paused, SandboxState::Running)?;
            if let Some(sandbox) = state.sandboxes.get_mut(&id) {
                sandbox.disk_only = false;
            }
            Ok(())
        })
        .await
    }

    async fn update_network(
        &self,
        sandbox_id: &str,
        allow_internet: bool,
        egress: &crate::network::EgressSettings,
    ) -> Result<(), HostAgentError> {
        let (id, egress) = (sandbox_id.to_string(), egress.clone());
        self.run(Operation::UpdateNetwork, sandbox_id, move |state| {
            egress
                .parse()
                .map_err(|error| HostAgentError::InvalidArgument(error.to_string()))?;
            let sandbox = state
                .sandboxes
                .get_mut(&id)
                .ok_or_else(|| HostAgentError::NotFound(format!("no sandbox {id}")))?;
            sandbox.options.allow_internet = allow_internet;
            sandbox.options.egress = egress;
            Ok(())
        })
        .await
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), HostAgentError> {
        let id = sandbox_id.to_string();
        self.run(Operation::Destroy, sandbox_id, move |state| {
            state.destroy(&id)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<SandboxSummary>, HostAgentError> {
        self.run(Operation::List, "", |state| Ok(state.list()))
            .await
    }

    async fn report(&self) -> Result<HostReport, HostAgentError> {
        self.run(Operation::Report, "", |state| Ok(state.report()))
            .await
    }

    fn report_in_process(&self) -> Option<HostReport> {
        Some(self.report_now())
    }

    async fn telemetry(
        &self,
        request: pb::CollectTelemetryRequest,
    ) -> Result<pb::CollectTelemetryResponse, HostAgentError> {
        // Not among its recorded calls: the control plane collects on its own schedule.
        Ok(self.telemetry.collect(&request))
    }

    /// The fake runs no guest: there is no port to reach.
    fn route(&self, _sandbox_id: &str, _port: u16) -> Option<GuestRoute> {
        None
    }

    /// Refuses a template a sandbox or another template (built from it) stands on, as the
    /// real agent does.
    async fn delete_template(&self, template_id: &str) -> Result<(), HostAgentError> {
        let id = template_id.to_string();
        self.run(Operation::DeleteTemplate, template_id, move |state| {
            state.delete_template(&id)
        })
        .await
    }

    /// Checks the build as the real agent does, logs a line per step, and adds the template
    /// (its size the parent's unless the build names one). No step runs: an injected failure
    /// stands for one that fails.
    async fn build_template(
        &self,
        build: TemplateBuild,
        logs: tokio::sync::mpsc::UnboundedSender<BuildLog>,
    ) -> Result<TemplateReport, HostAgentError> {
        let subject = build.template_id.clone();
        self.lock().builds.push(build.clone());
        self.run(Operation::Build, &subject, move |state| {
            state.build(build, &logs)
        })
        .await
    }
}

/// What the fake's Connect API serves from.
#[derive(Debug, Clone)]
struct Served {
    agent: Arc<FakeAgent>,
    token: Arc<str>,
}

impl FakeAgent {
    /// The fake's Connect API (`wrenn.agent.v1.HostAgent`), as a host agent in another process
    /// serves it to the control plane: every call needs `Authorization: Bearer <token>`, each
    /// method is the fake's operation (injected failures and delays included), an error is the
    /// Connect code the real agent answers it with, an unknown method is NotFound.
    pub fn router(self: &Arc<Self>, token: &str) -> axum::Router {
        use wrenn_proto::agent::host_agent as rpc;
        let router = axum::Router::new();
        let router = serve::<rpc::CreateSandbox, _, _>(router, |agent, request| async move {
            required("template_id", &request.template_id)?;
            let options = CreateOptions::try_from(request)?;
            let subject = options.sandbox_id.clone().unwrap_or_default();
            let (id, pulled) = agent
                .run(Operation::Create, &subject, move |state| {
                    let before = state.pulls();
                    let id = state.create(options)?;
                    Ok((id, state.pulls() > before))
                })
                .await?;
            Ok(pb::CreateSandboxResponse {
                sandbox: agent.sandbox_message(&id),
                // A pull takes time, however little.
                pull_ms: u64::from(pulled),
                ..Default::default()
            })
        });
        let router = serve::<rpc::DeleteTemplate, _, _>(router, |agent, request| async move {
            required("template_id", &request.template_id)?;
            agent.delete_template(&request.template_id).await?;
            Ok(pb::DeleteTemplateResponse {})
        });
        let router = serve::<rpc::PauseSandbox, _, _>(router, |agent, request| async move {
            let operation = Operation::Pause;
            let sandbox = agent.pause_or_resume(operation, &request.sandbox_id, request.disk_only);
            Ok(pb::PauseSandboxResponse {
                sandbox: sandbox.await?,
                ..Default::default()
            })
        });
        let router = serve::<rpc::ResumeSandbox, _, _>(router, |agent, request| async move {
            let sandbox =
                agent.pause_or_resume(Operation::Resume, &request.sandbox_id, request.from_disk);
            Ok(pb::ResumeSandboxResponse {
                sandbox: sandbox.await?,
            })
        });
        let router = serve::<rpc::CheckpointSandbox, _, _>(router, |agent, request| async move {
            required("sandbox_id", &request.sandbox_id)?;
            required("template_id", &request.template_id)?;
            let checkpoint = agent
                .checkpoint(&request.sandbox_id, &request.template_id, request.ephemeral)
                .await?;
            Ok(pb::CheckpointSandboxResponse::from(checkpoint))
        });
        let router = serve::<rpc::DestroySandbox, _, _>(router, |agent, request| async move {
            required("sandbox_id", &request.sandbox_id)?;
            agent.destroy(&request.sandbox_id).await?;
            Ok(pb::DestroySandboxResponse {})
        });
        let router =
            serve::<rpc::UpdateSandboxNetwork, _, _>(router, |agent, request| async move {
                required("sandbox_id", &request.sandbox_id)?;
                let egress = crate::egress_from_json(&request.egress_json)?;
                agent
                    .update_network(&request.sandbox_id, request.allow_internet_access, &egress)
                    .await?;
                Ok(pb::UpdateSandboxNetworkResponse {})
            });
        let router = serve::<rpc::ListSandboxes, _, _>(router, |agent, _| async move {
            let listed = agent.list().await?;
            Ok(pb::ListSandboxesResponse {
                sandboxes: listed
                    .iter()
                    .filter_map(|s| agent.sandbox_message(&s.sandbox_id))
                    .collect(),
            })
        });
        let router = serve::<rpc::CollectTelemetry, _, _>(router, |agent, request| async move {
            agent.telemetry(request).await
        });
        let router = serve::<rpc::HostInfo, _, _>(router, |agent, _| async move {
            Ok(pb::HostInfoResponse {
                report: Some(agent.report().await?),
            })
        });
        router
            .fallback(|| async {
                unary_error(&ConnectError::new(
                    Code::NotFound,
                    "no such method of wrenn.agent.v1.HostAgent",
                ))
            })
            .with_state(Served {
                agent: self.clone(),
                token: token.into(),
            })
    }

    /// Pauses sandbox `sandbox_id` (a required field), or resumes it, as `operation` says
    /// (`disk_only`: a pause without memory, a resume from the disk): the sandbox as the
    /// agent's API shows it then.
    async fn pause_or_resume(
        &self,
        operation: Operation,
        sandbox_id: &str,
        disk_only: bool,
    ) -> Result<Option<pb::Sandbox>, HostAgentError> {
        required("sandbox_id", sandbox_id)?;
        if operation == Operation::Pause {
            self.pause(sandbox_id, disk_only).await?;
        } else {
            self.resume(sandbox_id, disk_only).await?;
        }
        Ok(self.sandbox_message(sandbox_id))
    }

    /// A sandbox as the agent's API shows it.
    fn sandbox_message(&self, sandbox_id: &str) -> Option<pb::Sandbox> {
        let state = self.lock();
        let sandbox = state.sandboxes.get(sandbox_id)?;
        let template = state
            .templates
            .iter()
            .find(|t| t.template_id == sandbox.template_id);
        Some(pb::Sandbox {
            sandbox_id: sandbox_id.to_string(),
            template_id: sandbox.template_id.clone(),
            state: sandbox.state.as_str().into(),
            memory_mib: template.map(|t| t.memory_mib).unwrap_or(0),
            vcpus: template.map(|t| t.vcpus).unwrap_or(0),
            created_at_unix_ms: sandbox.created_at_ms,
            metadata: sandbox.options.metadata.clone().into_iter().collect(),
            allow_internet_access: sandbox.options.allow_internet,
            ..Default::default()
        })
    }
}

/// The real agent's check of a required field.
fn required(field: &str, value: &str) -> Result<(), HostAgentError> {
    if value.is_empty() {
        Err(HostAgentError::InvalidArgument(format!(
            "{field} is required"
        )))
    } else {
        Ok(())
    }
}

/// Adds the unary method `M` to `router`: the token checked, then `handler` on the fake.
fn serve<M, F, Fut>(router: axum::Router<Served>, handler: F) -> axum::Router<Served>
where
    M: Rpc,
    M::Request: Message,
    M::Response: Message + Send + 'static,
    F: FnOnce(Arc<FakeAgent>, M::Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<M::Response, HostAgentError>> + Send + 'static,
{
    let call = move |axum::extract::State(served): axum::extract::State<Served>,
                     headers: axum::http::HeaderMap,
                     body: axum::body::Body| async move {
        let authorized = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            == Some(&*served.token);
        if !authorized {
            return unary_error(&ConnectError::new(
                Code::Unauthenticated,
                "a valid bearer token is required",
            ));
        }
        serve_unary(&headers, body, DEFAULT_MAX_MESSAGE_BYTES, |request| async {
            handler(served.agent.clone(), request)
                .await
                .map_err(|error| ConnectError::new(error.connect_code(), error.to_string()))
        })
        .await
    };
    router.route(M::PATH, axum::routing::post(call))
}

impl FakeAgent {
    fn report_now(&self) -> HostReport {
        self.lock().report()
    }
}

impl State {
    fn report(&self) -> HostReport {
        let count = |wanted: SandboxState| {
            self.sandboxes
                .values()
                .filter(|s| s.state == wanted)
                .count() as u32
        };
        let running = count(SandboxState::Running);
        let committed_mib: u64 = self
            .sandboxes
            .values()
            .filter(|s| s.state == SandboxState::Running)
            .filter_map(|s| {
                self.templates
                    .iter()
                    .find(|t| t.template_id == s.template_id)
            })
            .map(|t| u64::from(t.memory_mib))
            .sum();
        HostReport {
            agent_version: "fake".into(),
            vmm: "fake".into(),
            accel: "none".into(),
            cpus: 2,
            memory_bytes: self.memory_bytes,
            memory_available_bytes: self.memory_bytes.saturating_sub(committed_mib << 20),
            sandboxes_running: running,
            sandboxes_paused: count(SandboxState::Paused),
            memory_committed_mib: committed_mib,
            slots_total: self.slots_total,
            slots_in_use: running,
            slots_starting: 0,
            disk_available_bytes: self.disk_bytes,
            agent_rss_bytes: 0,
            templates: self.templates.clone(),
            template_store: self
                .store
                .as_ref()
                .map(|store| store.location.clone())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(id: &str) -> CreateOptions {
        CreateOptions {
            template_id: "base".into(),
            sandbox_id: Some(id.into()),
            ..CreateOptions::default()
        }
    }

    /// Through `agent` (the fake itself, or a client of its Connect API), with one free slot:
    /// `a` is created, a second create finds no room, a running sandbox cannot be resumed, and
    /// `a` is paused, which the host's report counts.
    async fn first_moves(agent: &dyn HostAgent) {
        agent.create(options("a")).await.unwrap();
        assert!(matches!(
            agent.create(options("b")).await,
            Err(HostAgentError::NoCapacity(_))
        ));
        assert!(matches!(
            agent.resume("a", false).await,
            Err(HostAgentError::Conflict(_))
        ));
        agent.pause("a", false).await.unwrap();
        assert_eq!(agent.report().await.unwrap().sandboxes_paused, 1);
    }

    #[tokio::test]
    async fn states_move_as_the_agents_do_and_wrong_moves_are_refused() {
        let agent = FakeAgent::new(1, vec![template("base", 512)]);
        first_moves(&agent).await;
        agent.create(options("b")).await.unwrap();
        assert!(
            matches!(
                agent.resume("a", false).await,
                Err(HostAgentError::NoCapacity(_))
            ),
            "b holds the only slot"
        );
        agent.destroy("b").await.unwrap();
        agent.resume("a", false).await.unwrap();
        assert!(matches!(
            agent.destroy("b").await,
            Err(HostAgentError::NotFound(_))
        ));
        let unknown = CreateOptions {
            template_id: "nope".into(),
            ..options("c")
        };
        assert!(matches!(
            agent.create(unknown).await,
            Err(HostAgentError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn injected_failures_come_once_each_in_order() {
        let agent = FakeAgent::new(4, vec![template("base", 512)]);
        agent.fail_next(Operation::Create, HostAgentError::Failed("one".into()));
        agent.fail_next(Operation::Create, HostAgentError::TimedOut("two".into()));
        assert_eq!(
            agent.create(options("a")).await,
            Err(HostAgentError::Failed("one".into()))
        );
        assert_eq!(
            agent.create(options("a")).await,
            Err(HostAgentError::TimedOut("two".into()))
        );
        agent.create(options("a")).await.unwrap();
        assert_eq!(agent.calls().len(), 3);
        assert!(agent.kill_vm("a"));
        assert_eq!(agent.states()["a"], SandboxState::Failed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_operation_runs_to_its_end_when_its_caller_stops_waiting() {
        let agent = FakeAgent::new(4, vec![template("base", 512)]);
        agent.delay(Operation::Create, Duration::from_secs(60));
        let cut = tokio::time::timeout(Duration::from_secs(1), agent.create(options("a"))).await;
        assert!(cut.is_err(), "the caller stopped waiting");
        assert!(agent.sandbox("a").is_none(), "not made yet");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(agent.sandbox("a").unwrap().state, SandboxState::Running);
    }

    #[tokio::test]
    async fn over_its_connect_api_the_fake_answers_as_it_does_in_process() {
        let agent = Arc::new(FakeAgent::new(1, vec![template("base", 512)]));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (served, tls) = crate::fleet_tls::test_fleet();
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let _server = wrenn_http::server::spawn_tls_until_stopped(
            listener,
            Arc::new(served),
            agent.router("secret"),
            wrenn_http::server::ServerTimeouts::default(),
            stopped,
            |router, _| router,
        );
        let proxy = "127.0.0.1:1".parse().unwrap();
        let remote = |token| {
            crate::RemoteAgent::new(&url, proxy, token, Duration::from_secs(5), tls.clone())
                .unwrap()
        };
        // Plain HTTP is not an agent's API.
        assert!(
            crate::RemoteAgent::new(
                &url.replace("https", "http"),
                proxy,
                "secret",
                Duration::from_secs(5),
                tls.clone()
            )
            .is_err()
        );

        let stranger = remote("wrong").create(options("a")).await.unwrap_err();
        assert!(
            matches!(&stranger, HostAgentError::Failed(m) if m.contains("bearer token")),
            "{stranger:?}"
        );
        assert!(agent.calls().is_empty(), "a stranger reaches nothing");

        let remote = remote("secret");
        first_moves(&remote).await;
        let listed = remote.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].sandbox_id.as_str(), listed[0].state),
            ("a", SandboxState::Paused)
        );
        agent.fail_next(Operation::Resume, HostAgentError::TimedOut("slow".into()));
        assert_eq!(
            remote.resume("a", false).await,
            Err(HostAgentError::TimedOut("slow".into()))
        );
        remote.destroy("a").await.unwrap();
        assert!(matches!(
            remote.destroy("a").await,
            Err(HostAgentError::NotFound(_))
        ));
    }
}
