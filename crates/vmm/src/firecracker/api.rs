//! A typed client of Firecracker's API: HTTP/1.1 with JSON bodies over the Unix socket the VMM
//! was started with (`--api-sock`). Every request the backend sends is a [`Request`]: its
//! method, path and body are made in one place, which the contract test checks against
//! Firecracker's published Swagger description (v1.16.1). A refusal carries Firecracker's
//! `fault_message`.
//!
//! Facts from `../shared/spec/firecracker.md` §1 and the Swagger file: success is `204` (`200`
//! with a body for the GETs), errors are `4xx` with `{"fault_message": …}`; most resources can
//! be set only before `InstanceStart`; `/snapshot/load` only on a fresh process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::VmmError;

/// The longest answer read from the API (its bodies are small; the MMDS store is at most
/// 51,200 bytes by default).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// How long a request may take before the VMM counts as hung.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a snapshot may take to write or load (a full snapshot writes all guest memory).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The kernel and its command line (`PUT /boot-source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// How a block device caches writes (`Drive.cache_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored (Firecracker's default).
    Unsafe,
    /// The guest's flushes reach the host file.
    Writeback,
}

/// How a block device does its I/O (`Drive.io_engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    Sync,
    /// io_uring (host kernels after 5.10.51).
    Async,
}

/// A virtio block device (`PUT /drives/{drive_id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    pub path_on_host: String,
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// What may change of a drive after boot (`PATCH /drives/{drive_id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveUpdate {
    pub drive_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Guest memory backed by huge pages (`MachineConfiguration.huge_pages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    #[serde(rename = "2M")]
    TwoMiB,
}

/// The VM's size (`PUT /machine-config`, `GET /machine-config`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// 1, or an even number up to 32.
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Whether KVM logs written pages, so that a Diff snapshot writes only those.
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// A token bucket of a rate limiter: `size` tokens refilled in `refill_time` milliseconds,
/// and a first burst of `one_time_burst` beyond them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

/// A device's limits: bytes (`bandwidth`) and operations (`ops`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// A virtio network device on a tap (`PUT /network-interfaces/{iface_id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    /// The tap device's name (in the VMM's network namespace).
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// A network device's new limits after boot (`PATCH /network-interfaces/{iface_id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterfaceUpdate {
    pub iface_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// The metadata service's protocol (`MmdsConfig.version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain GETs (deprecated).
    V1,
    /// A session token first (`PUT /latest/api/token`), as EC2's IMDSv2.
    V2,
}

/// The metadata service's set-up (`PUT /mmds/config`): the interfaces it answers on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmdsConfig {
    pub network_interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<MmdsVersion>,
    /// A link-local address (169.254.169.254 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_compat: Option<bool>,
}

/// The virtio-rng device (`PUT /entropy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Firecracker's own log's level (`Logger.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// Where Firecracker logs (`PUT /logger`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// Where Firecracker writes its metrics (`PUT /metrics`; flushed every minute and by
/// [`Action::FlushMetrics`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub metrics_path: String,
}

/// Where the guest's serial console goes (`PUT /serial`; Firecracker's standard output when
/// not set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDevice {
    pub serial_out_path: String,
    /// Bytes the guest may write (beyond it they are dropped): one bucket, not a
    /// [`RateLimiter`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// The memory balloon (`PUT /balloon`): pages the guest gives back reach the page server as
/// removals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
}

/// The balloon's new target (`PATCH /balloon`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Boots the configured VM.
    InstanceStart,
    /// Writes the metrics now.
    FlushMetrics,
    /// Presses Ctrl+Alt+Del on the guest's keyboard (x86).
    SendCtrlAltDel,
}

/// `PATCH /vm`: the guest's vCPUs stopped or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// What a snapshot writes of the memory (`SnapshotCreateParams.snapshot_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of it.
    Full,
    /// The pages written since the last snapshot (those KVM logged, with
    /// `track_dirty_pages`), into a memory file that holds the rest already.
    Diff,
}

/// `PUT /snapshot/create`, on a paused VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreate {
    pub snapshot_type: SnapshotType,
    /// The device state.
    pub snapshot_path: String,
    /// The guest's memory.
    pub mem_file_path: String,
}

/// Where a restored VM's memory comes from (`MemoryBackend.backend_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// The memory file, mapped privately.
    File,
    /// A page server listening on a Unix socket ([`crate::uffd`]).
    Uffd,
}

/// `MemoryBackend`: the file's path, or the page server's socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: String,
}

/// A network device whose tap has another name on the restoring host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`, on a fresh Firecracker process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    /// Not kept in the snapshot: given again at every load for Diff snapshots to stay small.
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Advance the guest's kvmclock by the time since the snapshot (x86, host ≥ 5.16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

/// An HTTP method of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
        }
    }
}

/// Every request wrenn sends to Firecracker.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    DescribeInstance,
    Version,
    PutBootSource(BootSource),
    PutDrive(Drive),
    PatchDrive(DriveUpdate),
    PutMachineConfig(MachineConfig),
    GetMachineConfig,
    PutNetworkInterface(NetworkInterface),
    PatchNetworkInterface(NetworkInterfaceUpdate),
    PutMmdsConfig(MmdsConfig),
    /// Replaces the metadata store (a JSON object).
    PutMmds(Value),
    /// Merges into the metadata store.
    PatchMmds(Value),
    GetMmds,
    PutEntropy(EntropyDevice),
    PutLogger(Logger),
    PutMetrics(Metrics),
    PutSerial(SerialDevice),
    PutBalloon(Balloon),
    PatchBalloon(BalloonUpdate),
    Action(Action),
    PatchVm(VmState),
    CreateSnapshot(SnapshotCreate),
    LoadSnapshot(SnapshotLoad),
}

impl Request {
    pub fn method(&self) -> Method {
        match self {
            Request::DescribeInstance
            | Request::Version
            | Request::GetMachineConfig
            | Request::GetMmds => Method::Get,
            Request::PatchDrive(_)
            | Request::PatchNetworkInterface(_)
            | Request::PatchMmds(_)
            | Request::PatchBalloon(_)
            | Request::PatchVm(_) => Method::Patch,
            Request::PutBootSource(_)
            | Request::PutDrive(_)
            | Request::PutMachineConfig(_)
            | Request::PutNetworkInterface(_)
            | Request::PutMmdsConfig(_)
            | Request::PutMmds(_)
            | Request::PutEntropy(_)
            | Request::PutLogger(_)
            | Request::PutMetrics(_)
            | Request::PutSerial(_)
            | Request::PutBalloon(_)
            | Request::Action(_)
            | Request::CreateSnapshot(_)
            | Request::LoadSnapshot(_) => Method::Put,
        }
    }

    /// The request's path (ids percent-encoded where they are not plain).
    pub fn path(&self) -> String {
        match self {
            Request::DescribeInstance => "/".into(),
            Request::Version => "/version".into(),
            Request::PutBootSource(_) => "/boot-source".into(),
            Request::PutDrive(drive) => format!("/drives/{}", path_segment(&drive.drive_id)),
            Request::PatchDrive(drive) => format!("/drives/{}", path_segment(&drive.drive_id)),
            Request::PutMachineConfig(_) | Request::GetMachineConfig => "/machine-config".into(),
            Request::PutNetworkInterface(net) => {
                format!("/network-interfaces/{}", path_segment(&net.iface_id))
            }
            Request::PatchNetworkInterface(net) => {
                format!("/network-interfaces/{}", path_segment(&net.iface_id))
            }
            Request::PutMmdsConfig(_) => "/mmds/config".into(),
            Request::PutMmds(_) | Request::PatchMmds(_) | Request::GetMmds => "/mmds".into(),
            Request::PutEntropy(_) => "/entropy".into(),
            Request::PutLogger(_) => "/logger".into(),
            Request::PutMetrics(_) => "/metrics".into(),
            Request::PutSerial(_) => "/serial".into(),
            Request::PutBalloon(_) | Request::PatchBalloon(_) => "/balloon".into(),
            Request::Action(_) => "/actions".into(),
            Request::PatchVm(_) => "/vm".into(),
            Request::CreateSnapshot(_) => "/snapshot/create".into(),
            Request::LoadSnapshot(_) => "/snapshot/load".into(),
        }
    }

    /// The request's JSON body, if it has one.
    pub fn body(&self) -> Option<Value> {
        fn json(value: &impl Serialize) -> Option<Value> {
            // A struct of strings, numbers, booleans and enums always serializes.
            Some(serde_json::to_value(value).unwrap_or(Value::Null))
        }
        match self {
            Request::DescribeInstance
            | Request::Version
            | Request::GetMachineConfig
            | Request::GetMmds => None,
            Request::PutBootSource(body) => json(body),
            Request::PutDrive(body) => json(body),
            Request::PatchDrive(body) => json(body),
            Request::PutMachineConfig(body) => json(body),
            Request::PutNetworkInterface(body) => json(body),
            Request::PatchNetworkInterface(body) => json(body),
            Request::PutMmdsConfig(body) => json(body),
            Request::PutMmds(body) | Request::PatchMmds(body) => Some(body.clone()),
            Request::PutEntropy(body) => json(body),
            Request::PutLogger(body) => json(body),
            Request::PutMetrics(body) => json(body),
            Request::PutSerial(body) => json(body),
            Request::PutBalloon(body) => json(body),
            Request::PatchBalloon(body) => json(body),
            Request::Action(action) => Some(serde_json::json!({ "action_type": action })),
            Request::PatchVm(state) => Some(serde_json::json!({ "state": state })),
            Request::CreateSnapshot(body) => json(body),
            Request::LoadSnapshot(body) => json(body),
        }
    }

    /// What the request does, for errors and logs ("PUT /snapshot/load").
    pub fn describe(&self) -> String {
        format!("{} {}", self.method().as_str(), self.path())
    }

    fn timeout(&self) -> Duration {
        match self {
            Request::CreateSnapshot(_) | Request::LoadSnapshot(_) => SNAPSHOT_TIMEOUT,
            _ => REQUEST_TIMEOUT,
        }
    }
}

/// An id as a path segment: Firecracker's ids are plain (letters, digits, `_`), anything else
/// is percent-encoded so that it cannot change the path.
fn path_segment(id: &str) -> String {
    let mut segment = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.') {
            segment.push(byte as char);
        } else {
            segment.push_str(&format!("%{byte:02X}"));
        }
    }
    segment
}

/// A client of one Firecracker process's API socket. Each request opens a connection of its
/// own (Firecracker serves one at a time; a connection left broken by a timeout is never
/// reused).
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
}

impl FirecrackerClient {
    pub fn new(socket: &Path) -> Self {
        FirecrackerClient {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits until the API answers (a VMM that just started), for at most `within`.
    pub async fn wait_ready(&self, within: Duration) -> Result<InstanceInfo, VmmError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.describe_instance().await {
                Ok(info) => return Ok(info),
                Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Sends `request` and returns the body of its answer (`Value::Null` when it has none).
    pub async fn send(&self, request: &Request) -> Result<Value, VmmError> {
        let command = request.describe();
        match tokio::time::timeout(request.timeout(), self.exchange(request)).await {
            Ok(answer) => answer,
            Err(_) => Err(VmmError::Timeout {
                operation: format!("Firecracker's {command}"),
                seconds: request.timeout().as_secs(),
            }),
        }
    }

    async fn exchange(&self, request: &Request) -> Result<Value, VmmError> {
        let command = request.describe();
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|error| {
                VmmError::io(
                    format!(
                        "connecting to Firecracker's API at {}",
                        self.socket.display()
                    ),
                    error,
                )
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| http_error(&command, error))?;
        let connection = tokio::spawn(connection);
        let body = match request.body() {
            Some(body) => Bytes::from(body.to_string()),
            None => Bytes::new(),
        };
        let mut builder = http::Request::builder()
            .method(request.method().as_str())
            .uri(request.path())
            .header(http::header::HOST, "localhost")
            .header(http::header::ACCEPT, "application/json");
        if !body.is_empty() {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let http_request = builder
            .body(Full::new(body))
            .map_err(|error| VmmError::Invalid(format!("{command}: {error}")))?;
        let answer = sender.send_request(http_request).await;
        let outcome = match answer {
            Ok(response) => {
                let status = response.status();
                match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                {
                    Ok(body) => answer_of(&command, status, &body.to_bytes()),
                    Err(error) => Err(VmmError::Invalid(format!(
                        "reading Firecracker's answer to {command}: {error}"
                    ))),
                }
            }
            Err(error) => Err(http_error(&command, error)),
        };
        drop(sender);
        connection.abort();
        outcome
    }

    pub async fn describe_instance(&self) -> Result<InstanceInfo, VmmError> {
        let answer = self.send(&Request::DescribeInstance).await?;
        typed_answer("GET /", answer)
    }

    pub async fn version(&self) -> Result<FirecrackerVersion, VmmError> {
        let answer = self.send(&Request::Version).await?;
        typed_answer("GET /version", answer)
    }

    pub async fn machine_config(&self) -> Result<MachineConfig, VmmError> {
        let answer = self.send(&Request::GetMachineConfig).await?;
        typed_answer("GET /machine-config", answer)
    }

    pub async fn mmds(&self) -> Result<Value, VmmError> {
        self.send(&Request::GetMmds).await
    }

    /// Sends a request that answers with no body.
    pub async fn apply(&self, request: Request) -> Result<(), VmmError> {
        self.send(&request).await.map(|_| ())
    }
}

fn http_error(command: &str, error: hyper::Error) -> VmmError {
    VmmError::Invalid(format!("Firecracker's API failed {command}: {error}"))
}

/// The body of a successful answer, or the refusal with Firecracker's `fault_message`.
fn answer_of(command: &str, status: http::StatusCode, body: &[u8]) -> Result<Value, VmmError> {
    if status.is_success() {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        return serde_json::from_slice(body).map_err(|error| {
            VmmError::Invalid(format!(
                "Firecracker answered {command} with a body that is not JSON: {error}"
            ))
        });
    }
    let fault = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| {
            value
                .get("fault_message")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    Err(VmmError::Refused {
        command: command.to_string(),
        message: format!(
            "{} ({status})",
            if fault.is_empty() {
                "no reason given"
            } else {
                &fault
            }
        ),
    })
}

fn typed_answer<T: serde::de::DeserializeOwned>(
    command: &str,
    answer: Value,
) -> Result<T, VmmError> {
    serde_json::from_value(answer.clone()).map_err(|error| {
        VmmError::Invalid(format!(
            "Firecracker's answer to {command} is not as documented ({error}): {answer}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_change_the_path() {
        assert_eq!(path_segment("rootfs"), "rootfs");
        assert_eq!(path_segment("../vm"), "..%2Fvm");
        assert_eq!(path_segment("a b?c"), "a%20b%3Fc");
    }

    #[test]
    fn refusals_carry_the_fault_message() {
        let refused = answer_of(
            "PUT /snapshot/load",
            http::StatusCode::BAD_REQUEST,
            br#"{"fault_message":"Cannot load snapshot: the VM was started"}"#,
        )
        .unwrap_err();
        let text = refused.to_string();
        assert!(
            text.contains("Cannot load snapshot: the VM was started"),
            "{text}"
        );
        assert!(
            text.contains("PUT /snapshot/load") && text.contains("400"),
            "{text}"
        );
        let plain = answer_of("PUT /mmds", http::StatusCode::PAYLOAD_TOO_LARGE, b"too big")
            .unwrap_err()
            .to_string();
        assert!(
            plain.contains("too big") && plain.contains("413"),
            "{plain}"
        );
        assert_eq!(
            answer_of("PATCH /vm", http::StatusCode::NO_CONTENT, b"").unwrap(),
            Value::Null
        );
    }
}
