//! Joining a control plane: what a host reports of itself ([`HostReport`], built by [`report`]),
//! the registration and heartbeat messages, and [`run`], the loop that registers with a join
//! token and then heartbeats the host's capacity, registering again whenever the control plane
//! has forgotten the host (NotFound) or the heartbeat token stops working (Unauthenticated). Both
//! calls are the control plane's `wrenn.agent.v1.HostRegistry` RPCs, over Connect.
//!
//! **Identity**: at its first registration the control plane gives the host an identity (its
//! host id and a secret), which the agent keeps in its data directory ([`IDENTITY_FILE`],
//! written atomically, 0600) and presents at every later registration, across restarts. The
//! control plane refuses (AlreadyExists) a registration that claims a known host's name without that
//! host's identity, so a second agent cannot take over a live host, nor a dead one's name.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::manager::Manager;
use crate::store::SandboxState;

use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_connect::{Code, Codec, ConnectError};

pub use wrenn_agent_api::join::{
    HeartbeatRequest, HostIdentity, HostReport, IDENTITY_FILE, RegisterRequest, RegisterResponse,
    TemplateReport, host_registry,
};

pub(crate) fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find(|line| line.starts_with(key))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// This host's report, read now.
pub fn report(manager: &Manager) -> HostReport {
    let records = manager.list();
    let running: Vec<_> = records
        .iter()
        .filter(|r| r.state == SandboxState::Running)
        .collect();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let disk_available = nix::sys::statvfs::statvfs(&manager.config().data_dir)
        .map(|stats| stats.blocks_available() * stats.fragment_size())
        .unwrap_or(0);
    HostReport {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        vmm: manager.vmm_name().into(),
        accel: manager.accel().as_str().into(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: meminfo_kib(&meminfo, "MemTotal:") * 1024,
        memory_available_bytes: meminfo_kib(&meminfo, "MemAvailable:") * 1024,
        sandboxes_running: running.len() as u32,
        sandboxes_paused: records
            .iter()
            .filter(|r| r.state == SandboxState::Paused)
            .count() as u32,
        memory_committed_mib: running
            .iter()
            .map(|r| u64::from(r.machine.memory_mib))
            .sum(),
        slots_total: manager.slots.config().capacity,
        // A warm VMM's slot is free for a create (which takes the VMM, or its slot).
        slots_in_use: manager.slots.in_use().saturating_sub(manager.warm_slots()),
        slots_starting: manager.slots_starting(),
        disk_available_bytes: disk_available,
        agent_rss_bytes: wrenn_vmm::process::usage(std::process::id())
            .map(|u| u.rss_bytes)
            .unwrap_or(0),
        templates: manager
            .list_templates()
            .into_iter()
            .map(|t| t.report())
            .collect(),
        template_store: manager.config().template_store.clone().unwrap_or_default(),
    }
}

/// Where and how an agent joins.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    /// The control plane's REST API (`http://host:port`).
    pub control_plane_url: String,
    pub join_token: String,
    pub name: String,
    pub api_url: String,
    pub proxy_address: String,
    pub agent_token: String,
    /// Where the host's identity is kept (`<data>/`[`IDENTITY_FILE`]).
    pub identity_file: PathBuf,
}

/// How long a registration or heartbeat may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The control plane's fleet registry, called with `bearer`, over the Connect client the
/// join loop keeps for its life.
async fn call<M>(
    registry: &ConnectClient,
    bearer: &str,
    request: &M::Request,
) -> Result<M::Response, ConnectError>
where
    M: wrenn_proto::Rpc,
    M::Request: wrenn_connect::Message,
    M::Response: wrenn_connect::Message,
{
    let mut headers = http::HeaderMap::new();
    let value = http::HeaderValue::from_str(&format!("Bearer {bearer}"))
        .map_err(|_| ConnectError::new(Code::InvalidArgument, "the token is not a header value"))?;
    headers.insert(http::header::AUTHORIZATION, value);
    tokio::time::timeout(CALL_TIMEOUT, registry.call::<M>(request, &headers))
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::new(
                Code::DeadlineExceeded,
                format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
            ))
        })
}

/// The identity kept in `file`, if there is one.
pub fn read_identity(file: &Path) -> Result<Option<HostIdentity>, String> {
    match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|error| {
            format!(
                "the host identity in {} is unreadable ({error}): restore it, or remove it to join as a new host",
                file.display()
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(format!("reading {}: {error}", file.display())),
    }
}

/// Keeps `identity` in `file` (0600, written atomically: a crash leaves the old identity or
/// the new one, never a torn one).
pub fn write_identity(file: &Path, identity: &HostIdentity) -> Result<(), crate::AgentError> {
    crate::store::write_atomically(file, identity, 0o600)
}

async fn register(
    config: &JoinConfig,
    registry: &ConnectClient,
    manager: &Manager,
) -> Result<RegisterResponse, String> {
    let identity = read_identity(&config.identity_file)?;
    let request = RegisterRequest {
        name: config.name.clone(),
        api_url: config.api_url.clone(),
        proxy_address: config.proxy_address.clone(),
        agent_token: config.agent_token.clone(),
        report: Some(report(manager)),
        identity,
    };
    let answer = call::<host_registry::Register>(registry, &config.join_token, &request)
        .await
        .map_err(|error| {
            format!(
                "the control plane at {} refused the registration: {error}",
                config.control_plane_url
            )
        })?;
    if let Some(secret) = &answer.host_secret {
        let identity = HostIdentity {
            host_id: answer.host_id.clone(),
            secret: secret.clone(),
        };
        write_identity(&config.identity_file, &identity).map_err(|error| {
            format!(
                "cannot keep the host identity in {}: {error}",
                config.identity_file.display()
            )
        })?;
        tracing::info!(host = %answer.host_id, file = %config.identity_file.display(), "host identity kept");
    }
    Ok(answer)
}

/// Registers, then heartbeats until `shutdown` resolves. Failures are logged and retried with a
/// capped backoff: the agent keeps serving its sandboxes whether or not a control plane listens.
pub async fn run(
    config: JoinConfig,
    manager: Arc<Manager>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // One client for the loop's life; a connection a restarted control plane closed is
    // replaced by the pool on the next call.
    let registry = ConnectClient::new(&config.control_plane_url, HttpVersion::Http1, Codec::Proto)
        .with_connect_timeout(CALL_TIMEOUT);
    let mut backoff = Duration::from_millis(500);
    let mut registration: Option<RegisterResponse> = None;
    loop {
        let wait = match &registration {
            None => match register(&config, &registry, &manager).await {
                Ok(answer) => {
                    tracing::info!(host = %answer.host_id, control_plane = %config.control_plane_url, "registered with the control plane");
                    backoff = Duration::from_millis(500);
                    let wait = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
                    registration = Some(answer);
                    wait
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot register with the control plane; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    backoff
                }
            },
            Some(answer) => {
                let interval = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
                match heartbeat(&registry, answer, &manager).await {
                    Ok(()) => interval,
                    Err(HeartbeatError::Forgotten(why)) => {
                        tracing::warn!(%why, "the control plane no longer knows this host: registering again");
                        registration = None;
                        Duration::ZERO
                    }
                    Err(HeartbeatError::Failed(error)) => {
                        tracing::warn!(%error, "heartbeat failed");
                        interval
                    }
                }
            }
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

enum HeartbeatError {
    Forgotten(String),
    Failed(String),
}

async fn heartbeat(
    registry: &ConnectClient,
    registration: &RegisterResponse,
    manager: &Manager,
) -> Result<(), HeartbeatError> {
    let request = HeartbeatRequest {
        host_id: registration.host_id.clone(),
        report: Some(report(manager)),
    };
    match call::<host_registry::Heartbeat>(registry, &registration.heartbeat_token, &request).await
    {
        Ok(_) => Ok(()),
        Err(error) if matches!(error.code, Code::Unauthenticated | Code::NotFound) => {
            Err(HeartbeatError::Forgotten(error.to_string()))
        }
        Err(error) => Err(HeartbeatError::Failed(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_read_with_missing_fields_as_defaults() {
        let report: HostReport = serde_json::from_str(r#"{"cpus":4,"templates":[]}"#).unwrap();
        assert_eq!(report.cpus, 4);
        assert_eq!(report.slots_total, 0);
    }

    #[test]
    fn identities_are_kept_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent").join(IDENTITY_FILE);
        assert_eq!(read_identity(&file), Ok(None));
        let identity = HostIdentity {
            host_id: "h1".into(),
            secret: "s".into(),
        };
        write_identity(&file, &identity).unwrap();
        assert_eq!(read_identity(&file), Ok(Some(identity.clone())));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let newer = HostIdentity {
            secret: "t".into(),
            ..identity
        };
        write_identity(&file, &newer).unwrap();
        assert_eq!(read_identity(&file), Ok(Some(newer)));
        assert_eq!(
            std::fs::read_dir(file.parent().unwrap()).unwrap().count(),
            1,
            "no temporary left"
        );
        std::fs::write(&file, "{").unwrap();
        assert!(read_identity(&file).unwrap_err().contains("remove it"));
    }

    #[test]
    fn meminfo_fields_are_read_in_kib() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal:"), 24_000_000);
        assert_eq!(meminfo_kib(text, "MemAvailable:"), 1000);
        assert_eq!(meminfo_kib(text, "Nope:"), 0);
    }
}
