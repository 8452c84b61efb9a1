//! [`LocalAgent`]: the [`HostAgent`] of the agent in this process (`wrenn up` runs the control
//! plane and one host's agent together). Each operation runs to its end on a task of its own
//! ([`crate::detached`]), even if the control plane stops waiting: a VM operation cut off
//! halfway would leave a VM, a slot or a snapshot behind.

use std::sync::Arc;

use wrenn_agent_api::build::{BuildLog, TemplateBuild};
use wrenn_agent_api::join::{HostReport, TemplateReport};
use wrenn_agent_api::{
    Checkpoint, CreateOptions, CreateTimings, GuestRoute, HostAgent, HostAgentError, SandboxSummary,
};

use crate::manager::Manager;

/// The agent in this process, as the control plane uses it.
#[derive(Debug, Clone)]
pub struct LocalAgent {
    manager: Arc<Manager>,
}

impl LocalAgent {
    pub fn new(manager: Arc<Manager>) -> LocalAgent {
        LocalAgent { manager }
    }
}

#[async_trait::async_trait]
impl HostAgent for LocalAgent {
    async fn create(&self, options: CreateOptions) -> Result<CreateTimings, HostAgentError> {
        let manager = self.manager.clone();
        crate::detached(async move { manager.create(options).await })
            .await
            .map(|(_, timings)| timings)
            .map_err(HostAgentError::from)
    }

    async fn pause(&self, sandbox_id: &str, disk_only: bool) -> Result<(), HostAgentError> {
        let (manager, id) = (self.manager.clone(), sandbox_id.to_string());
        finished(async move { manager.pause(&id, disk_only).await }).await
    }

    async fn checkpoint(
        &self,
        sandbox_id: &str,
        template_id: &str,
        ephemeral: bool,
    ) -> Result<Checkpoint, HostAgentError> {
        let (manager, id) = (self.manager.clone(), sandbox_id.to_string());
        let options = crate::manager::CheckpointOptions {
            template_id: template_id.to_string(),
            ephemeral,
        };
        let started = std::time::Instant::now();
        let (record, paused) =
            crate::detached(async move { manager.checkpoint(&id, options).await })
                .await
                .map_err(HostAgentError::from)?;
        Ok(Checkpoint {
            snapshot_bytes: record.snapshot.bytes,
            template: record.report(),
            paused,
            total: started.elapsed(),
        })
    }

    async fn resume(&self, sandbox_id: &str, from_disk: bool) -> Result<(), HostAgentError> {
        let (manager, id) = (self.manager.clone(), sandbox_id.to_string());
        let options = crate::manager::ResumeOptions {
            from_disk,
            ..Default::default()
        };
        finished(async move { manager.resume(&id, options).await }).await
    }

    async fn update_network(
        &self,
        sandbox_id: &str,
        allow_internet: bool,
        egress: &wrenn_agent_api::network::EgressSettings,
    ) -> Result<(), HostAgentError> {
        let (manager, id, egress) = (self.manager.clone(), sandbox_id.to_string(), egress.clone());
        crate::detached(async move { manager.update_network(&id, allow_internet, egress).await })
            .await
            .map(drop)
            .map_err(HostAgentError::from)
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), HostAgentError> {
        let (manager, id) = (self.manager.clone(), sandbox_id.to_string());
        crate::detached(async move { manager.destroy(&id).await })
            .await
            .map_err(HostAgentError::from)
    }

    async fn list(&self) -> Result<Vec<SandboxSummary>, HostAgentError> {
        Ok(self
            .manager
            .list()
            .into_iter()
            .map(|record| SandboxSummary {
                sandbox_id: record.sandbox_id,
                state: record.state,
                created_at_ms: record.created_at_ms,
            })
            .collect())
    }

    async fn report(&self) -> Result<HostReport, HostAgentError> {
        Ok(crate::join::report(&self.manager))
    }

    fn report_in_process(&self) -> Option<HostReport> {
        Some(crate::join::report(&self.manager))
    }

    async fn telemetry(
        &self,
        request: wrenn_proto::agent::CollectTelemetryRequest,
    ) -> Result<wrenn_proto::agent::CollectTelemetryResponse, HostAgentError> {
        Ok(self.manager.telemetry.collect(&request))
    }

    fn route(&self, sandbox_id: &str, port: u16) -> Option<GuestRoute> {
        let (address, ends) = self.manager.guest_route(sandbox_id, port)?;
        Some(GuestRoute::Direct { address, ends })
    }

    async fn delete_template(&self, template_id: &str) -> Result<(), HostAgentError> {
        self.manager
            .delete_template(template_id)
            .await
            .map_err(HostAgentError::from)
    }

    /// The build runs on a task of its own; dropping this future stops it (it then cleans up
    /// on that task).
    async fn build_template(
        &self,
        build: TemplateBuild,
        logs: tokio::sync::mpsc::UnboundedSender<BuildLog>,
    ) -> Result<TemplateReport, HostAgentError> {
        let stop = tokio_util::sync::CancellationToken::new();
        let _stop_when_dropped = stop.clone().drop_guard();
        let manager = self.manager.clone();
        let record = crate::detached(async move { manager.run_build(build, logs, stop).await })
            .await
            .map_err(HostAgentError::from)?;
        Ok(record.report())
    }
}

/// Runs an operation detached (it finishes even if the caller gives up) and keeps only whether
/// it succeeded.
async fn finished<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, crate::AgentError>> + Send + 'static,
) -> Result<(), HostAgentError> {
    crate::detached(work)
        .await
        .map(drop)
        .map_err(HostAgentError::from)
}
