//! The host agent as the control plane sees it.
//!
//! - [`HostAgent`]: the operations the control plane asks of a host (create, pause, resume,
//!   checkpoint, destroy and list sandboxes; the host's report of its capacity and templates; the route to a
//!   guest port). The host agent's `LocalAgent` implements it in the process that runs the VMs
//!   (`wrenn up`), [`RemoteAgent`] over a separate agent's Connect API and sandbox proxy, and the
//!   control plane's tests with an in-memory fake. The control plane knows nothing else of an
//!   agent.
//! - [`build`]: template builds (their steps, their log); [`image_reference`]: the registry
//!   image names builds start from.
//! - [`join`]: the messages an agent registers and heartbeats with; [`fleet_tls`]: the mutual
//!   TLS between the control plane and its agents.
//! - [`proxy`]: the headers of the agent's sandbox proxy.
//! - [`fake`]: an in-memory agent for the control plane's fast tests.
//! - [`HostAgentError`]: why an operation failed, by cause; the edges map it to HTTP or Connect
//!   codes.

pub mod build;
pub mod fake;
pub mod fleet_tls;
pub mod image_reference;
pub mod join;
/// A sandbox's egress settings and their validation (the REST API's types, shared).
pub use wrenn_api::network;
pub mod proxy;
mod remote;
mod route;
pub mod telemetry;

use std::collections::BTreeMap;
use std::time::Duration;

pub use remote::RemoteAgent;

/// How long the steps of a create took on its host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateTimings {
    /// The template's pull from the template store (zero when the host had it).
    pub pull: std::time::Duration,
    /// The sandbox's disk and network slot made ready (at once), its record written, and its
    /// wait for a turn to start when the host starts as many guests as it can at once.
    pub prepare: std::time::Duration,
    /// The VM's restore (the template's memory loaded first, when this is its first use).
    pub restore: std::time::Duration,
    /// The wait for envd after the restore.
    pub ready: std::time::Duration,
    /// envd's `/init`.
    pub init: std::time::Duration,
    /// Whether the VMM was a warm one, started before the create (see the agent's warm pool).
    pub warm: bool,
}
pub use route::GuestRoute;

use join::HostReport;

/// A checkpoint a host took of a running sandbox (see [`HostAgent::checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The template it made.
    pub template: join::TemplateReport,
    /// The size of its memory snapshot.
    pub snapshot_bytes: u64,
    /// How long the sandbox was stopped.
    pub paused: Duration,
    /// The whole checkpoint, the template store's put included.
    pub total: Duration,
}

impl From<wrenn_proto::agent::CheckpointSandboxResponse> for Checkpoint {
    fn from(response: wrenn_proto::agent::CheckpointSandboxResponse) -> Self {
        Checkpoint {
            template: response.template.unwrap_or_default(),
            snapshot_bytes: response.snapshot_bytes,
            paused: Duration::from_millis(response.paused_ms),
            total: Duration::from_millis(response.total_ms),
        }
    }
}

impl From<Checkpoint> for wrenn_proto::agent::CheckpointSandboxResponse {
    fn from(checkpoint: Checkpoint) -> Self {
        wrenn_proto::agent::CheckpointSandboxResponse {
            template: Some(checkpoint.template),
            snapshot_bytes: checkpoint.snapshot_bytes,
            paused_ms: checkpoint.paused.as_millis() as u64,
            total_ms: checkpoint.total.as_millis() as u64,
        }
    }
}

/// What a new sandbox is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    pub template_id: String,
    /// Chosen by the caller (the control plane); the agent makes one up when `None`.
    pub sandbox_id: Option<String>,
    pub env_vars: BTreeMap<String, String>,
    /// envd's access token; `None` for an unsecured sandbox.
    pub access_token: Option<String>,
    pub allow_internet: bool,
    /// Its egress rules (what `allow_internet` leaves open, they narrow).
    pub egress: network::EgressSettings,
    pub metadata: BTreeMap<String, String>,
    /// How long to wait for envd after the restore (the agent's default when `None`).
    pub ready_timeout: Option<Duration>,
    /// How long envd's `/init` may take (the agent's default when `None`).
    pub init_timeout: Option<Duration>,
}

/// A timeout as the agent's Connect API carries it, in milliseconds: 0 is none (the default).
pub fn timeout_from_millis(ms: u32) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(u64::from(ms)))
}

/// Egress settings as the agent's Connect API carries them: JSON, empty for none.
pub fn egress_from_json(json: &str) -> Result<network::EgressSettings, HostAgentError> {
    if json.is_empty() {
        return Ok(network::EgressSettings::default());
    }
    serde_json::from_str(json)
        .map_err(|error| HostAgentError::InvalidArgument(format!("bad egress settings: {error}")))
}

/// The inverse of [`egress_from_json`].
pub fn egress_to_json(settings: &network::EgressSettings) -> String {
    if settings.is_empty() {
        String::new()
    } else {
        serde_json::to_string(settings).expect("egress settings serialize")
    }
}

/// A create as the agent's Connect API carries it: an empty id or token and a zero timeout are
/// absent. Every field is taken apart by name, so a field added to the message must be handled
/// here before this compiles. Egress settings that do not parse refuse the create.
impl TryFrom<wrenn_proto::agent::CreateSandboxRequest> for CreateOptions {
    type Error = HostAgentError;

    fn try_from(request: wrenn_proto::agent::CreateSandboxRequest) -> Result<Self, Self::Error> {
        let wrenn_proto::agent::CreateSandboxRequest {
            template_id,
            sandbox_id,
            env_vars,
            envd_access_token,
            allow_internet_access,
            metadata,
            ready_timeout_ms,
            init_timeout_ms,
            egress_json,
        } = request;
        let present = |text: String| (!text.is_empty()).then_some(text);
        Ok(CreateOptions {
            template_id,
            sandbox_id: present(sandbox_id),
            env_vars: env_vars.into_iter().collect(),
            access_token: present(envd_access_token),
            allow_internet: allow_internet_access,
            egress: egress_from_json(&egress_json)?,
            metadata: metadata.into_iter().collect(),
            ready_timeout: timeout_from_millis(ready_timeout_ms),
            init_timeout: timeout_from_millis(init_timeout_ms),
        })
    }
}

/// The create the agent's Connect API carries (the inverse of the conversion above; a timeout
/// longer than `u32::MAX` ms is that).
impl From<CreateOptions> for wrenn_proto::agent::CreateSandboxRequest {
    fn from(options: CreateOptions) -> Self {
        let millis = |d: Option<Duration>| {
            d.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
                .unwrap_or(0)
        };
        wrenn_proto::agent::CreateSandboxRequest {
            template_id: options.template_id,
            sandbox_id: options.sandbox_id.unwrap_or_default(),
            env_vars: options.env_vars.into_iter().collect(),
            envd_access_token: options.access_token.unwrap_or_default(),
            allow_internet_access: options.allow_internet,
            egress_json: egress_to_json(&options.egress),
            metadata: options.metadata.into_iter().collect(),
            ready_timeout_ms: millis(options.ready_timeout),
            init_timeout_ms: millis(options.init_timeout),
        }
    }
}

wrenn_core::named_enum! {
    /// Where a sandbox is in its life, as its agent sees it; the names are those of the agent's
    /// Connect API and its store.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum SandboxState {
        Starting = "starting",
        Running = "running",
        Pausing = "pausing",
        Paused = "paused",
        Resuming = "resuming",
        /// The VM died or never came up; only a destroy is left to do.
        Failed = "failed",
    }
}

/// A sandbox as its agent lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSummary {
    pub sandbox_id: String,
    pub state: SandboxState,
    pub created_at_ms: i64,
}

/// Why an agent's operation failed, by cause. The message says what happened, for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostAgentError {
    /// No such sandbox or template on the host.
    #[error("{0}")]
    NotFound(String),
    /// The request itself is wrong (a bad id, a missing field).
    #[error("{0}")]
    InvalidArgument(String),
    /// The sandbox is not in a state that allows the operation, or already exists.
    #[error("{0}")]
    Conflict(String),
    /// The host has no room now (slots, memory, disk), or cannot serve at all: another host, or
    /// later, may do.
    #[error("{0}")]
    NoCapacity(String),
    /// The operation ran out of time on the host (a guest that did not come up).
    #[error("{0}")]
    TimedOut(String),
    /// The host failed to do it.
    #[error("{0}")]
    Failed(String),
}

impl HostAgentError {
    /// The error as the agent's Connect API answers it.
    pub fn connect_code(&self) -> wrenn_connect::Code {
        use wrenn_connect::Code;
        match self {
            HostAgentError::NotFound(_) => Code::NotFound,
            HostAgentError::InvalidArgument(_) => Code::InvalidArgument,
            HostAgentError::Conflict(_) => Code::FailedPrecondition,
            HostAgentError::NoCapacity(_) => Code::ResourceExhausted,
            HostAgentError::TimedOut(_) => Code::DeadlineExceeded,
            HostAgentError::Failed(_) => Code::Internal,
        }
    }
}

impl From<wrenn_connect::ConnectError> for HostAgentError {
    fn from(error: wrenn_connect::ConnectError) -> Self {
        use wrenn_connect::Code;
        let message = error.message;
        match error.code {
            Code::NotFound => HostAgentError::NotFound(message),
            Code::InvalidArgument => HostAgentError::InvalidArgument(message),
            Code::FailedPrecondition | Code::AlreadyExists => HostAgentError::Conflict(message),
            Code::ResourceExhausted | Code::Unavailable => HostAgentError::NoCapacity(message),
            Code::DeadlineExceeded => HostAgentError::TimedOut(message),
            _ => HostAgentError::Failed(message),
        }
    }
}

/// A host's agent, as the control plane uses it. Every method may take as long as the host
/// needs: the caller bounds it.
#[async_trait::async_trait]
pub trait HostAgent: Send + Sync + std::fmt::Debug {
    /// Starts a sandbox from `options.template_id`; returns once envd answers in it, with how
    /// long its steps took.
    async fn create(&self, options: CreateOptions) -> Result<CreateTimings, HostAgentError>;
    /// Pauses a running sandbox: its memory, processes and files are kept on the host; with
    /// `disk_only`, its files alone (synced first), and the resume boots it from them.
    async fn pause(&self, sandbox_id: &str, disk_only: bool) -> Result<(), HostAgentError>;
    /// Resumes a paused sandbox: restores its memory, or (`from_disk`, or a pause that kept
    /// none) boots it from its disk.
    async fn resume(&self, sandbox_id: &str, from_disk: bool) -> Result<(), HostAgentError>;
    /// Saves a running sandbox's memory and disk as the host's template `template_id` while
    /// the sandbox goes on (it is stopped while its memory is written). A persistent one is in
    /// the template store (when the host has one) once this returns; an `ephemeral` one (a
    /// fork's) is not, and goes from the host as soon as nothing stands on it.
    async fn checkpoint(
        &self,
        sandbox_id: &str,
        template_id: &str,
        ephemeral: bool,
    ) -> Result<Checkpoint, HostAgentError>;
    /// Destroys a sandbox and everything it held on the host ([`HostAgentError::NotFound`] if
    /// the host has no such sandbox).
    async fn destroy(&self, sandbox_id: &str) -> Result<(), HostAgentError>;
    /// Replaces a sandbox's egress rules: a running sandbox's at once (connections they now
    /// forbid are cut), a paused one's at its resume.
    async fn update_network(
        &self,
        sandbox_id: &str,
        allow_internet: bool,
        egress: &network::EgressSettings,
    ) -> Result<(), HostAgentError>;
    /// Every sandbox the host has.
    async fn list(&self) -> Result<Vec<SandboxSummary>, HostAgentError>;
    /// The host's capacity, use and templates, read now.
    async fn report(&self) -> Result<HostReport, HostAgentError>;
    /// The host's report without a call, for an agent in this process (whose report costs
    /// nothing to read); `None` for an agent elsewhere, whose heartbeats carry its report.
    fn report_in_process(&self) -> Option<HostReport>;
    /// How this process reaches `port` of a running sandbox of the host; `None` if the host
    /// knows it has no such running sandbox.
    fn route(&self, sandbox_id: &str, port: u16) -> Option<GuestRoute>;
    /// Builds a template on the host from one it has; each line of the build's log goes to
    /// `logs` as it is written. Dropping the future cancels the build, which then leaves
    /// nothing behind.
    async fn build_template(
        &self,
        build: build::TemplateBuild,
        logs: tokio::sync::mpsc::UnboundedSender<build::BuildLog>,
    ) -> Result<join::TemplateReport, HostAgentError>;
    /// Deletes a template of the host ([`HostAgentError::Conflict`] while a sandbox or another
    /// template stands on it, [`HostAgentError::NotFound`] if the host has no such template).
    async fn delete_template(&self, template_id: &str) -> Result<(), HostAgentError>;
    /// What the host saw of its sandboxes after the request's cursor: resource samples and log
    /// lines, oldest first ([`telemetry::TelemetryBuffer::collect`]).
    async fn telemetry(
        &self,
        request: wrenn_proto::agent::CollectTelemetryRequest,
    ) -> Result<wrenn_proto::agent::CollectTelemetryResponse, HostAgentError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_proto::agent::CreateSandboxRequest;

    #[test]
    fn a_create_crosses_the_connect_api_unchanged() {
        let options = CreateOptions {
            template_id: "base".into(),
            sandbox_id: Some("sbx-1".into()),
            env_vars: BTreeMap::from([("A".into(), "1".into())]),
            access_token: Some("secret".into()),
            allow_internet: true,
            egress: network::EgressSettings {
                deny_out: vec!["0.0.0.0/0".into()],
                allow_out: vec!["1.1.1.1".into()],
                ..Default::default()
            },
            metadata: BTreeMap::from([("owner".into(), "me".into())]),
            ready_timeout: Some(Duration::from_millis(1500)),
            init_timeout: Some(Duration::from_secs(3)),
        };
        let request = CreateSandboxRequest::from(options.clone());
        assert_eq!(
            (request.ready_timeout_ms, request.envd_access_token.as_str()),
            (1500, "secret")
        );
        assert_eq!(CreateOptions::try_from(request).unwrap(), options);
        // Empty strings and zero timeouts on the wire are absent settings.
        let bare = CreateSandboxRequest {
            template_id: "base".into(),
            ..Default::default()
        };
        let expected = CreateOptions {
            template_id: "base".into(),
            ..CreateOptions::default()
        };
        assert_eq!(CreateOptions::try_from(bare).unwrap(), expected);
    }
}
