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
//!
//! **Mutual TLS** (`wrenn_agent_api::fleet_tls`): the agent reaches the registry over HTTPS
//! only. Before its first registration it knows the control plane's authority by the
//! fingerprint the operator gave (`--control-plane-ca sha256:…`) or its PEM file; it keeps the
//! authority it met in [`PLANE_CA_FILE`]. Every registration carries a request for a new key's
//! certificate, which the answer brings; the agent keeps chain and key together in
//! [`CERTIFICATE_FILE`] (0600, atomically), presents it to the registry, and serves its API
//! and sandbox proxy with it to the control plane alone ([`FleetTls`]). Two thirds into the
//! certificate's life it asks for the next one (`RenewCertificate`): new connections present
//! the new certificate, open ones (a sandbox's streams) go on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::manager::Manager;
use crate::store::SandboxState;

use wrenn_connect::client::{ConnectClient, HttpVersion};
use wrenn_connect::{Code, Codec, ConnectError};

use wrenn_agent_api::fleet_tls::{self, ClientCertificates, FirstContact, Identity};
pub use wrenn_agent_api::join::{
    CERTIFICATE_FILE, HeartbeatRequest, HostIdentity, HostReport, IDENTITY_FILE, PLANE_CA_FILE,
    RegisterRequest, RegisterResponse, RenewCertificateRequest, TemplateReport, host_registry,
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

/// How an agent that has not joined yet knows the control plane's authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlaneAuthority {
    /// The SHA-256 of its certificate (hex), as `wrenn server` prints it.
    Fingerprint(String),
    /// Its certificate (PEM), a copy of the control plane's `<data>/cp/fleet-tls/plane-ca.pem`.
    Pem(String),
}

impl PlaneAuthority {
    /// `sha256:<64 hex digits>`, or the path of a PEM file.
    pub fn parse(value: &str) -> Result<PlaneAuthority, String> {
        if let Some(hex) = value.strip_prefix("sha256:") {
            let hex = hex.replace(':', "").to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "--control-plane-ca {value:?}: sha256: takes the 64 hex digits wrenn server prints"
                ));
            }
            return Ok(PlaneAuthority::Fingerprint(hex));
        }
        let pem = std::fs::read_to_string(value)
            .map_err(|error| format!("--control-plane-ca: reading {value}: {error}"))?;
        fleet_tls::certificates(&pem, "--control-plane-ca").map_err(|error| error.to_string())?;
        Ok(PlaneAuthority::Pem(pem))
    }

    fn fingerprint(&self) -> Result<String, String> {
        match self {
            PlaneAuthority::Fingerprint(hex) => Ok(hex.clone()),
            PlaneAuthority::Pem(pem) => fleet_tls::certificates(pem, "--control-plane-ca")
                .map(|chain| fleet_tls::fingerprint(&chain[0]))
                .map_err(|error| error.to_string()),
        }
    }
}

/// Where and how an agent joins.
#[derive(Debug, Clone)]
pub struct JoinConfig {
    /// The control plane's fleet listener (`https://host:port`).
    pub control_plane_url: String,
    /// The join token: needed by a host the control plane cannot tell by its certificate.
    pub join_token: Option<String>,
    /// The control plane's authority as the operator gave it (needed until the agent has
    /// kept it).
    pub control_plane_ca: Option<PlaneAuthority>,
    pub name: String,
    /// This agent's API as the control plane reaches it (`https://host:port`).
    pub api_url: String,
    pub proxy_address: String,
    pub agent_token: String,
    /// Where the host's identity is kept (`<data>/`[`IDENTITY_FILE`]); its certificate and
    /// the control plane's authority are kept beside it.
    pub identity_file: PathBuf,
}

impl JoinConfig {
    fn beside(&self, name: &str) -> PathBuf {
        self.identity_file
            .parent()
            .map(|dir| dir.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    }
}

/// The agent's side of the fleet's TLS: the certificate it presents, and the settings of its
/// API and sandbox proxy once it knows the control plane's authority (the servers wait for
/// them: connections queue until then).
#[derive(Debug)]
pub struct FleetTls {
    pub identity: Arc<Identity>,
    servers: tokio::sync::watch::Sender<Option<Arc<rustls::ServerConfig>>>,
    /// The control plane's authority (PEM), once known.
    authority: std::sync::Mutex<Option<String>>,
}

impl FleetTls {
    /// The agent's TLS before anything is known, and the servers' end of it.
    pub fn new() -> (
        Arc<FleetTls>,
        tokio::sync::watch::Receiver<Option<Arc<rustls::ServerConfig>>>,
    ) {
        let (servers, settings) = tokio::sync::watch::channel(None);
        (
            Arc::new(FleetTls {
                identity: Identity::none(),
                servers,
                authority: std::sync::Mutex::new(None),
            }),
            settings,
        )
    }

    /// Takes the control plane's authority: the servers start taking its calls.
    fn know_authority(&self, pem: &str) -> Result<(), String> {
        let roots = fleet_tls::roots(pem).map_err(|error| error.to_string())?;
        let settings =
            fleet_tls::server_config(roots, ClientCertificates::Required, self.identity.clone())
                .map_err(|error| error.to_string())?;
        *self.authority.lock().expect("authority lock") = Some(pem.to_string());
        self.servers.send_replace(Some(Arc::new(settings)));
        Ok(())
    }

    fn authority(&self) -> Option<String> {
        self.authority.lock().expect("authority lock").clone()
    }
}

/// Reads what an earlier run kept (the control plane's authority, the host's certificate) and
/// checks it against `config`: an agent that cannot join (no authority known or given, or a
/// kept one the given one contradicts) is refused before it serves.
pub fn prepare(config: &JoinConfig, tls: &FleetTls) -> Result<(), String> {
    if !config.control_plane_url.starts_with("https://") {
        return Err(format!(
            "--join {:?}: agents join over the fleet's mutual TLS: https://<control plane>:<its --fleet-listen port>",
            config.control_plane_url
        ));
    }
    let ca_file = config.beside(PLANE_CA_FILE);
    let kept = match std::fs::read_to_string(&ca_file) {
        Ok(pem) => Some(pem),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(format!("reading {}: {error}", ca_file.display())),
    };
    match (&kept, &config.control_plane_ca) {
        (Some(pem), Some(given)) => {
            let kept_fingerprint = fleet_tls::certificates(pem, "the kept authority")
                .map(|chain| fleet_tls::fingerprint(&chain[0]))
                .map_err(|error| format!("{}: {error}", ca_file.display()))?;
            if kept_fingerprint != given.fingerprint()? {
                return Err(format!(
                    "this agent joined a control plane whose authority is not the one --control-plane-ca names (kept in {}): remove that file and {} to join another",
                    ca_file.display(),
                    config.beside(CERTIFICATE_FILE).display()
                ));
            }
        }
        (None, None) => {
            return Err(
                "--control-plane-ca is required to join: the sha256:… fingerprint `wrenn server` prints, or a copy of its <data>/cp/fleet-tls/plane-ca.pem".into(),
            );
        }
        _ => {}
    }
    let known = kept.or_else(|| match &config.control_plane_ca {
        Some(PlaneAuthority::Pem(pem)) => Some(pem.clone()),
        _ => None,
    });
    let certificate_file = config.beside(CERTIFICATE_FILE);
    match std::fs::read_to_string(&certificate_file) {
        Ok(pem) => {
            if let Err(error) = tls.identity.set(&pem, &pem) {
                tracing::warn!(file = %certificate_file.display(), %error, "the kept certificate is unusable: asking for a new one");
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(format!("reading {}: {error}", certificate_file.display())),
    }
    if let Some(pem) = known {
        tls.know_authority(&pem)?;
    }
    Ok(())
}

/// The registry's client: over TLS checked against the known authority, or (before one is
/// known) against the fingerprint given, with the host's certificate when it has one.
fn registry_client(
    config: &JoinConfig,
    tls: &FleetTls,
) -> Result<(ConnectClient, Option<Arc<FirstContact>>), String> {
    let (settings, first) = match tls.authority() {
        Some(pem) => (
            fleet_tls::client_config(
                fleet_tls::roots(&pem).map_err(|error| error.to_string())?,
                fleet_tls::PLANE_NAME,
                tls.identity.clone(),
                fleet_tls::Alpn::Http1,
            ),
            None,
        ),
        None => {
            let fingerprint = config
                .control_plane_ca
                .as_ref()
                .ok_or("--control-plane-ca is required to join")?
                .fingerprint()?;
            let check = FirstContact::new(&fingerprint);
            (
                fleet_tls::first_contact_config(check.clone(), tls.identity.clone()),
                Some(check),
            )
        }
    };
    let settings = settings.map_err(|error| error.to_string())?;
    let client = ConnectClient::new(&config.control_plane_url, HttpVersion::Http1, Codec::Proto)
        .with_connect_timeout(CALL_TIMEOUT)
        .with_tls(settings)
        .map_err(|error| error.message)?;
    Ok((client, first))
}

/// Keeps the host's certificate chain and key in one file (0600, atomically) and presents them
/// from the next handshake.
fn keep_certificate(
    config: &JoinConfig,
    tls: &FleetTls,
    chain: &str,
    key: &str,
) -> Result<(), String> {
    tls.identity
        .set(chain, key)
        .map_err(|error| format!("the control plane's certificate: {error}"))?;
    let file = config.beside(CERTIFICATE_FILE);
    crate::store::write_bytes_atomically(&file, format!("{chain}{key}").as_bytes(), 0o600)
        .map_err(|error| format!("keeping the certificate in {}: {error}", file.display()))
}

/// Stops presenting a certificate past its end (a host away longer than its life joins
/// again with the join token).
fn forget_expired_certificate(tls: &FleetTls) {
    let expired = tls
        .identity
        .leaf()
        .and_then(|leaf| fleet_tls::certificate_facts(&leaf).ok())
        .is_some_and(|facts| std::time::SystemTime::now() >= facts.not_after);
    if expired {
        tracing::warn!("the host's certificate has ended: registering with the join token");
        tls.identity.clear();
    }
}

/// When the host's certificate is to be renewed (none: no certificate).
fn renewal_due(tls: &FleetTls) -> bool {
    tls.identity
        .leaf()
        .and_then(|leaf| fleet_tls::certificate_facts(&leaf).ok())
        .is_some_and(|facts| std::time::SystemTime::now() >= facts.renew_at())
}

/// How long a registration or heartbeat may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The control plane's fleet registry, called with `bearer`, over the Connect client the
/// join loop keeps for its life.
async fn call<M>(
    registry: &ConnectClient,
    bearer: Option<&str>,
    request: &M::Request,
) -> Result<M::Response, ConnectError>
where
    M: wrenn_proto::Rpc,
    M::Request: wrenn_connect::Message,
    M::Response: wrenn_connect::Message,
{
    let mut headers = http::HeaderMap::new();
    if let Some(bearer) = bearer {
        let value = http::HeaderValue::from_str(&format!("Bearer {bearer}")).map_err(|_| {
            ConnectError::new(Code::InvalidArgument, "the token is not a header value")
        })?;
        headers.insert(http::header::AUTHORIZATION, value);
    }
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
    tls: &FleetTls,
    manager: &Manager,
) -> Result<RegisterResponse, String> {
    let identity = read_identity(&config.identity_file)?;
    forget_expired_certificate(tls);
    let (registry, first) = registry_client(config, tls)?;
    let request_key = fleet_tls::certificate_request().map_err(|error| error.to_string())?;
    let request = RegisterRequest {
        name: config.name.clone(),
        api_url: config.api_url.clone(),
        proxy_address: config.proxy_address.clone(),
        agent_token: config.agent_token.clone(),
        report: Some(report(manager)),
        identity,
        certificate_request: request_key.csr_der,
    };
    let answer = call::<host_registry::Register>(&registry, config.join_token.as_deref(), &request)
        .await
        .map_err(|error| {
            format!(
                "the control plane at {} refused the registration: {error}",
                config.control_plane_url
            )
        })?;
    if let Some(first) = first {
        let pem = first
            .authority()
            .ok_or("the control plane answered without its authority being checked")?;
        let file = config.beside(PLANE_CA_FILE);
        crate::store::write_bytes_atomically(&file, pem.as_bytes(), 0o644).map_err(|error| {
            format!(
                "keeping the control plane's authority in {}: {error}",
                file.display()
            )
        })?;
        tls.know_authority(&pem)?;
        tracing::info!(file = %file.display(), "kept the control plane's certificate authority");
    }
    if !answer.certificate_chain.is_empty() {
        keep_certificate(config, tls, &answer.certificate_chain, &request_key.key_pem)?;
    }
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

/// Asks for the next certificate (a new key), presenting the present one.
async fn renew_certificate(
    config: &JoinConfig,
    tls: &FleetTls,
    registry: &ConnectClient,
    host_id: &str,
) -> Result<(), String> {
    let request_key = fleet_tls::certificate_request().map_err(|error| error.to_string())?;
    let request = RenewCertificateRequest {
        host_id: host_id.to_string(),
        certificate_request: request_key.csr_der,
    };
    let answer = call::<host_registry::RenewCertificate>(registry, None, &request)
        .await
        .map_err(|error| format!("the control plane refused the renewal: {error}"))?;
    keep_certificate(config, tls, &answer.certificate_chain, &request_key.key_pem)?;
    tracing::info!(host = %host_id, "renewed the host's certificate");
    Ok(())
}

/// Registers, then heartbeats until `shutdown` resolves, renewing the host's certificate when
/// due. Failures are logged and retried with a capped backoff: the agent keeps serving its
/// sandboxes whether or not a control plane listens. Call [`prepare`] first.
pub async fn run(
    config: JoinConfig,
    manager: Arc<Manager>,
    tls: Arc<FleetTls>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(500);
    // The heartbeats' client (kept for the loop's life: a connection a restarted control
    // plane closed is replaced by the pool on the next call) and the registration.
    let mut registered: Option<(ConnectClient, RegisterResponse)> = None;
    loop {
        let wait = match &registered {
            None => match register(&config, &tls, &manager).await {
                Ok(answer) => {
                    tracing::info!(host = %answer.host_id, control_plane = %config.control_plane_url, "registered with the control plane");
                    backoff = Duration::from_millis(500);
                    let wait = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
                    match registry_client(&config, &tls) {
                        Ok((client, _)) => {
                            registered = Some((client, answer));
                            wait
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot make the registry's client");
                            backoff
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot register with the control plane; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    backoff
                }
            },
            Some((registry, answer)) => {
                let interval = Duration::from_millis(answer.heartbeat_interval_ms.max(100));
                match heartbeat(registry, answer, &manager).await {
                    Ok(()) => {
                        if renewal_due(&tls)
                            && let Err(error) =
                                renew_certificate(&config, &tls, registry, &answer.host_id).await
                        {
                            tracing::warn!(%error, "cannot renew the host's certificate yet");
                        }
                        interval
                    }
                    Err(HeartbeatError::Forgotten(why)) => {
                        tracing::warn!(%why, "the control plane no longer knows this host: registering again");
                        registered = None;
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
    match call::<host_registry::Heartbeat>(registry, Some(&registration.heartbeat_token), &request)
        .await
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
