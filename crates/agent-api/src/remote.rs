//! [`RemoteAgent`]: the [`HostAgent`] of a host agent in another process, reached over its
//! Connect API (`wrenn.agent.v1.HostAgent`) and its sandbox proxy, both over the fleet's mutual
//! TLS ([`crate::fleet_tls`]), with the agent's bearer token.

use std::net::SocketAddr;
use std::time::Duration;

use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_proto::agent as pb;

use crate::build::{BuildLog, TemplateBuild};
use crate::fleet_tls::HostTls;
use crate::join::{HostReport, TemplateReport};
use crate::{
    CreateOptions, CreateTimings, GuestRoute, HostAgent, HostAgentError, SandboxState,
    SandboxSummary,
};

use pb::host_agent as rpc;

/// A host agent in another process.
#[derive(Debug)]
pub struct RemoteAgent {
    api: ConnectClient,
    proxy: SocketAddr,
    token: String,
    tls: HostTls,
}

impl RemoteAgent {
    /// The agent whose Connect API is at `api_url` (`https://host:port`) and whose sandbox
    /// proxy is at `proxy`, both reached with `tls`; connections to its API give up after
    /// `connect_timeout`.
    pub fn new(
        api_url: &str,
        proxy: SocketAddr,
        token: &str,
        connect_timeout: Duration,
        tls: HostTls,
    ) -> Result<RemoteAgent, String> {
        let Some(authority) = api_url.strip_prefix("https://") else {
            return Err(format!(
                "the agent's API URL {api_url:?} is not https://host:port: agents serve the control plane over mutual TLS only"
            ));
        };
        if authority.is_empty() || authority.contains('/') {
            return Err(format!(
                "the agent's API URL {api_url:?} is not https://host:port"
            ));
        }
        let api = ConnectClient::new(api_url, HttpVersion::Http1, Codec::Proto)
            .with_connect_timeout(connect_timeout)
            .with_header("authorization", &format!("Bearer {token}"))
            .with_tls((*tls.http1).clone())
            .map_err(|error| error.message)?;
        Ok(RemoteAgent {
            api,
            proxy,
            token: token.to_string(),
            tls,
        })
    }

    /// [`RemoteAgent::new`], with the proxy given as `host:port` and resolved now (within
    /// `connect_timeout`).
    pub async fn resolve(
        api_url: &str,
        proxy: &str,
        token: &str,
        connect_timeout: Duration,
        tls: HostTls,
    ) -> Result<RemoteAgent, String> {
        let address = tokio::time::timeout(connect_timeout, tokio::net::lookup_host(proxy))
            .await
            .map_err(|_| format!("resolving the agent's proxy address {proxy:?} took too long"))?
            .map_err(|e| format!("cannot resolve the agent's proxy address {proxy:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("the agent's proxy address {proxy:?} resolves to nothing"))?;
        RemoteAgent::new(api_url, address, token, connect_timeout, tls)
    }

    async fn call<M>(&self, request: &M::Request) -> Result<M::Response, HostAgentError>
    where
        M: wrenn_proto::Rpc,
        M::Request: wrenn_connect::Message,
        M::Response: wrenn_connect::Message,
    {
        Ok(self.api.call::<M>(request, &http::HeaderMap::new()).await?)
    }
}

#[async_trait::async_trait]
impl HostAgent for RemoteAgent {
    async fn create(&self, options: CreateOptions) -> Result<CreateTimings, HostAgentError> {
        let request = pb::CreateSandboxRequest::from(options);
        let response = self.call::<rpc::CreateSandbox>(&request).await?;
        Ok(CreateTimings {
            pull: Duration::from_millis(response.pull_ms),
            prepare: Duration::from_millis(response.prepare_ms),
            restore: Duration::from_millis(response.restore_ms),
            ready: Duration::from_millis(response.ready_ms),
            init: Duration::from_millis(response.init_ms),
            warm: response.warm,
        })
    }

    async fn pause(&self, sandbox_id: &str, disk_only: bool) -> Result<(), HostAgentError> {
        let request = pb::PauseSandboxRequest {
            sandbox_id: sandbox_id.into(),
            disk_only,
        };
        self.call::<rpc::PauseSandbox>(&request).await.map(drop)
    }

    async fn checkpoint(
        &self,
        sandbox_id: &str,
        template_id: &str,
        ephemeral: bool,
    ) -> Result<crate::Checkpoint, HostAgentError> {
        let request = pb::CheckpointSandboxRequest {
            sandbox_id: sandbox_id.into(),
            template_id: template_id.into(),
            ephemeral,
        };
        let response = self.call::<rpc::CheckpointSandbox>(&request).await?;
        if response.template.is_none() {
            return Err(HostAgentError::Failed(
                "the agent's checkpoint answer carries no template".into(),
            ));
        }
        Ok(crate::Checkpoint::from(response))
    }

    async fn resume(&self, sandbox_id: &str, from_disk: bool) -> Result<(), HostAgentError> {
        let request = pb::ResumeSandboxRequest {
            sandbox_id: sandbox_id.into(),
            from_disk,
            ..Default::default()
        };
        self.call::<rpc::ResumeSandbox>(&request).await.map(drop)
    }

    async fn update_network(
        &self,
        sandbox_id: &str,
        allow_internet: bool,
        egress: &crate::network::EgressSettings,
    ) -> Result<(), HostAgentError> {
        let request = pb::UpdateSandboxNetworkRequest {
            sandbox_id: sandbox_id.into(),
            allow_internet_access: allow_internet,
            egress_json: crate::egress_to_json(egress),
        };
        self.call::<rpc::UpdateSandboxNetwork>(&request)
            .await
            .map(drop)
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), HostAgentError> {
        let request = pb::DestroySandboxRequest {
            sandbox_id: sandbox_id.into(),
        };
        self.call::<rpc::DestroySandbox>(&request).await.map(drop)
    }

    async fn list(&self) -> Result<Vec<SandboxSummary>, HostAgentError> {
        let response = self
            .call::<rpc::ListSandboxes>(&pb::ListSandboxesRequest {})
            .await?;
        response
            .sandboxes
            .into_iter()
            .map(|sandbox| {
                let state = SandboxState::from_name(&sandbox.state).ok_or_else(|| {
                    HostAgentError::Failed(format!(
                        "the agent lists sandbox {} in a state this control plane does not know: {:?}",
                        sandbox.sandbox_id, sandbox.state
                    ))
                })?;
                Ok(SandboxSummary {
                    sandbox_id: sandbox.sandbox_id,
                    state,
                    created_at_ms: sandbox.created_at_unix_ms,
                })
            })
            .collect()
    }

    async fn report(&self) -> Result<HostReport, HostAgentError> {
        let info = self.call::<rpc::HostInfo>(&pb::HostInfoRequest {}).await?;
        info.report.ok_or_else(|| {
            HostAgentError::Failed("the agent's HostInfo answer carries no report".into())
        })
    }

    fn report_in_process(&self) -> Option<HostReport> {
        None
    }

    async fn telemetry(
        &self,
        request: pb::CollectTelemetryRequest,
    ) -> Result<pb::CollectTelemetryResponse, HostAgentError> {
        self.call::<rpc::CollectTelemetry>(&request).await
    }

    async fn delete_template(&self, template_id: &str) -> Result<(), HostAgentError> {
        let request = pb::DeleteTemplateRequest {
            template_id: template_id.into(),
        };
        self.call::<rpc::DeleteTemplate>(&request).await.map(drop)
    }

    async fn build_template(
        &self,
        build: TemplateBuild,
        logs: tokio::sync::mpsc::UnboundedSender<BuildLog>,
    ) -> Result<TemplateReport, HostAgentError> {
        let request = pb::RunTemplateBuildRequest::from(build);
        let mut stream = self
            .api
            .call_streaming::<rpc::RunTemplateBuild>(&request, &http::HeaderMap::new())
            .await?;
        while let Some(event) = stream.message().await {
            match event?.event {
                Some(pb::run_template_build_event::Event::Log(entry)) => {
                    let _ = logs.send(BuildLog::from(entry));
                }
                Some(pb::run_template_build_event::Event::Template(template)) => {
                    return Ok(template);
                }
                None => {}
            }
        }
        Err(HostAgentError::Failed(
            "the agent's build stream ended without a template".into(),
        ))
    }

    fn route(&self, sandbox_id: &str, port: u16) -> Option<GuestRoute> {
        Some(GuestRoute::ViaAgent {
            proxy: self.proxy,
            token: self.token.clone(),
            sandbox_id: sandbox_id.to_string(),
            port,
            tls: self.tls.clone(),
        })
    }
}
