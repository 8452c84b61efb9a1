//! A host of the fleet: its last row and its agent, with the deadlines and the host's name put on
//! every call ([`Host::create`], pause, resume, destroy, list).

use super::*;

impl Fleet {
    /// The agent of a host in another process, as it registered (`row`'s URL, proxy and
    /// token), reached over mutual TLS as the host `row.id` names.
    pub(super) async fn remote_agent(&self, row: &HostRow) -> Result<RemoteAgent, String> {
        let authority = self.config.authority.as_ref().ok_or_else(|| {
            "this control plane has no fleet authority: it reaches no agent in another process"
                .to_string()
        })?;
        let tls = authority
            .host_tls(&row.id)
            .map_err(|error| error.to_string())?;
        RemoteAgent::resolve(
            &row.api_url,
            &row.proxy_address,
            &row.agent_token,
            deadlines::CONNECT,
            tls,
        )
        .await
    }
}

/// Waits at most `deadline` for an agent's operation (an agent in this process finishes it
/// anyway; a call to one elsewhere is dropped).
pub(super) async fn within<T>(
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
    pub(super) row: Mutex<HostRow>,
    pub(super) agent: Arc<dyn HostAgent>,
    /// The agent runs in this process (`wrenn up`): it does not heartbeat, and is never down.
    pub(super) in_process: bool,
    /// Creates placed here and not finished.
    pub(super) inflight: AtomicU32,
    pub(super) last_seen: Mutex<Instant>,
}

impl Host {
    pub fn row(&self) -> HostRow {
        self.row.lock().expect("host lock").clone()
    }
    pub fn id(&self) -> String {
        self.row.lock().expect("host lock").id.clone()
    }
    pub fn name(&self) -> String {
        self.row.lock().expect("host lock").name.clone()
    }
    pub fn is_up(&self) -> bool {
        self.row.lock().expect("host lock").state == HostState::Up
    }
    /// Whether the host's agent runs in this process.
    pub fn in_process(&self) -> bool {
        self.in_process
    }

    /// Starts a sandbox on the host: how long its steps took there.
    pub async fn create(
        &self,
        options: CreateOptions,
    ) -> Result<wrenn_agent_api::CreateTimings, Error> {
        let create = self.agent.create(options);
        within(
            &self.name(),
            "CreateSandbox",
            deadlines::VM_OPERATION,
            create,
        )
        .await
    }

    /// Pauses a sandbox, with its memory or (`disk_only`) without.
    pub async fn pause(&self, sandbox_id: &str, disk_only: bool) -> Result<(), Error> {
        let pause = self.agent.pause(sandbox_id, disk_only);
        within(&self.name(), "PauseSandbox", deadlines::VM_OPERATION, pause).await
    }

    /// Saves a running sandbox as the host's template `template_id` (see
    /// [`HostAgent::checkpoint`]); the host knows the template at once. A persistent one's put
    /// in the template store is bounded by the build deadline's minute.
    pub async fn checkpoint(
        &self,
        sandbox_id: &str,
        template_id: &str,
        ephemeral: bool,
    ) -> Result<wrenn_agent_api::Checkpoint, Error> {
        let deadline = if ephemeral {
            deadlines::VM_OPERATION
        } else {
            deadlines::VM_OPERATION * 2
        };
        let checkpoint = self.agent.checkpoint(sandbox_id, template_id, ephemeral);
        let made = within(&self.name(), "CheckpointSandbox", deadline, checkpoint).await?;
        self.learned_template(made.template.clone());
        Ok(made)
    }

    /// Resumes a sandbox: its memory restored, or (`from_disk`) booted from its disk.
    pub async fn resume(&self, sandbox_id: &str, from_disk: bool) -> Result<(), Error> {
        let resume = self.agent.resume(sandbox_id, from_disk);
        within(
            &self.name(),
            "ResumeSandbox",
            deadlines::VM_OPERATION,
            resume,
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

    /// Replaces a sandbox's egress rules on the host.
    pub async fn update_network(
        &self,
        sandbox_id: &str,
        allow_internet: bool,
        egress: &wrenn_agent_api::network::EgressSettings,
    ) -> Result<(), Error> {
        let update = self
            .agent
            .update_network(sandbox_id, allow_internet, egress);
        within(
            &self.name(),
            "UpdateSandboxNetwork",
            deadlines::CONTROL_CALL,
            update,
        )
        .await
    }

    /// Builds a template on the host, its log to `logs`; the build's own deadline, and a
    /// minute for the snapshot after it, bound the wait.
    pub async fn build_template(
        &self,
        build: wrenn_agent_api::build::TemplateBuild,
        logs: tokio::sync::mpsc::UnboundedSender<wrenn_agent_api::build::BuildLog>,
    ) -> Result<wrenn_agent_api::join::TemplateReport, Error> {
        let deadline = build.deadline + deadlines::VM_OPERATION;
        let run = self.agent.build_template(build, logs);
        within(&self.name(), "RunTemplateBuild", deadline, run).await
    }

    /// Deletes a template of the host; one the host does not have is already gone.
    pub async fn delete_template(&self, template_id: &str) -> Result<(), Error> {
        let delete = async {
            match self.agent.delete_template(template_id).await {
                Err(HostAgentError::NotFound(_)) => Ok(()),
                other => other,
            }
        };
        within(
            &self.name(),
            "DeleteTemplate",
            deadlines::CONTROL_CALL,
            delete,
        )
        .await?;
        self.row
            .lock()
            .expect("host lock")
            .report
            .templates
            .retain(|known| known.template_id != template_id);
        Ok(())
    }

    /// Takes a template the host has just built into its last report, so that creates find
    /// it before the host's next heartbeat says so.
    pub fn learned_template(&self, template: wrenn_agent_api::join::TemplateReport) {
        let mut row = self.row.lock().expect("host lock");
        let templates = &mut row.report.templates;
        templates.retain(|known| known.template_id != template.template_id);
        templates.push(template);
    }

    /// Every sandbox the agent has.
    pub async fn list(&self) -> Result<Vec<SandboxSummary>, Error> {
        let deadline = deadlines::CONTROL_CALL;
        within(&self.name(), "ListSandboxes", deadline, self.agent.list()).await
    }

    /// What the host saw of its sandboxes after a cursor (`HostAgent::telemetry`).
    pub async fn telemetry(
        &self,
        request: wrenn_proto::agent::CollectTelemetryRequest,
    ) -> Result<wrenn_proto::agent::CollectTelemetryResponse, Error> {
        let deadline = deadlines::CONTROL_CALL;
        let collect = self.agent.telemetry(request);
        within(&self.name(), "CollectTelemetry", deadline, collect).await
    }

    /// How to reach `port` of a running sandbox on this host.
    pub fn route(&self, sandbox_id: &str, port: u16) -> Option<GuestRoute> {
        self.agent.route(sandbox_id, port)
    }
}
