//! wrenn's REST API as types: the bodies the E2B SDKs send and read (field names are E2B's wire
//! contract: `sandboxID`, `templateID`, `envdVersion`…), and wrenn's own fleet routes. The
//! control plane answers with these types, its OpenAPI document (`docs/openapi.json`, served at
//! `GET /openapi.json`) is generated from them, and clients read them back with [`client`].

pub mod channels;
pub mod client;
pub mod conformance;
pub mod network;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Error {
    /// The HTTP status again.
    pub code: u16,
    pub message: String,
}

/// `POST /sandboxes`: a new sandbox.
// Absent settings are left out of the body, not sent as null.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// The template (or its alias) to start from.
    #[serde(rename = "templateID")]
    pub template_id: Option<String>,
    /// Seconds until the sandbox ends (default 15, at most 86400).
    pub timeout: Option<u64>,
    /// Pause instead of kill when the timeout comes.
    pub auto_pause: Option<bool>,
    /// Whether that pause keeps the memory (default true); `false` keeps the disk alone, and
    /// the resume boots from it (which traffic cannot trigger: not with `autoResume`).
    pub auto_pause_memory: Option<bool>,
    /// envd requires an access token (returned as `envdAccessToken`); default true, an
    /// explicit `false` makes an unsecured sandbox.
    pub secure: Option<bool>,
    #[serde(rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub env_vars: Option<BTreeMap<String, String>>,
    pub network: Option<NetworkRequest>,
    pub auto_resume: Option<AutoResumeRequest>,
}

/// The network settings of a new sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkRequest {
    /// Whether the sandbox's ports are reached without a traffic token (default true).
    #[serde(
        default,
        alias = "allow_public_traffic",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_public_traffic: Option<bool>,
    /// Its egress rules.
    #[serde(flatten)]
    pub egress: network::EgressSettings,
    /// The `Host` its ports' requests reach it with (`${PORT}` is the port), instead of the
    /// proxy's.
    #[serde(
        default,
        alias = "mask_request_host",
        skip_serializing_if = "Option::is_none"
    )]
    pub mask_request_host: Option<String>,
}

/// `PUT /sandboxes/{id}/network`: the sandbox's new egress rules, replacing all of its old
/// ones (a field left out is cleared).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkUpdate {
    #[serde(flatten)]
    pub egress: network::EgressSettings,
    /// `false` is `denyOut: ["0.0.0.0/0"]` (default true).
    #[serde(
        default,
        rename = "allow_internet_access",
        alias = "allowInternetAccess",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
}

/// Whether traffic to a paused sandbox resumes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AutoResumeRequest {
    pub enabled: Option<bool>,
}

/// `POST /sandboxes/{id}/timeout`, `/connect`, `/resume`: a new timeout in seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimeoutRequest {
    pub timeout: Option<u64>,
    /// Accepted from older SDKs' resume; the sandbox keeps its own setting.
    #[serde(rename = "autoPause", default, skip_serializing_if = "Option::is_none")]
    pub auto_pause: Option<bool>,
    /// `false`: a paused sandbox is booted from its disk, its pause's memory left aside (a
    /// no-op for a pause that kept none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/refreshes`: keep the sandbox alive `duration` more seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RefreshRequest {
    pub duration: Option<u64>,
}

/// The answer of create, connect and resume: how to reach the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    pub envd_version: String,
    /// The token a request to a sandbox port must carry when public traffic is off.
    pub traffic_access_token: Option<String>,
    /// The domain sandboxes are reached under (the SDKs' default when null).
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// envd's access token, for a secure sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
}

wrenn_core::named_enum! {
    /// Where a sandbox is in its life.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum SandboxState {
        #[default]
        Running = "running",
        Paused = "paused",
        /// Its host stopped answering; it may come back with its host.
        Lost = "lost",
    }
}

/// A sandbox in a listing (`GET /v2/sandboxes`, `GET /sandboxes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339.
    pub end_at: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub state: SandboxState,
    pub envd_version: String,
    pub metadata: BTreeMap<String, String>,
    /// Always empty: wrenn has no volumes.
    pub volume_mounts: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
}

/// `GET /sandboxes/{id}`: a listed sandbox with its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxDetail {
    #[serde(flatten)]
    pub listed: ListedSandbox,
    pub allow_internet_access: bool,
    pub lifecycle: Lifecycle,
    pub network: SandboxNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// What a paused sandbox's pause kept: `full` (memory and disk: the resume restores it
    /// where it was) or `filesystem` (the disk: the resume boots it). Absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_mode: Option<String>,
}

/// `POST /sandboxes/{id}/pause`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PauseRequest {
    /// Keep the memory (default true); `false` keeps the disk alone (synced first), and the
    /// resume boots from it: files stay, processes do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    /// Accepted; the pause always needs envd to answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_healthy_guest: Option<bool>,
}

/// `POST /sandboxes/{id}/snapshots`: a persistent snapshot of a running sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotRequest {
    /// The snapshot template's name (`name` or `name:tag`): a snapshot of that name the team
    /// has gets a new build, as E2B's do. None: the snapshot is known by its id alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Must be true (the default): wrenn's snapshots keep the memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
}

/// A snapshot: `POST /sandboxes/{id}/snapshots`'s answer and `GET /snapshots`'s items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotInfo {
    /// What a create names it by: its name with its tag, or its id with the tag.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// Its full names (`team/name:tag`).
    pub names: Vec<String>,
}

/// `POST /sandboxes/{id}/fork`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkRequest {
    /// Seconds until each fork ends (default 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// How many forks (1 to 100, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// One fork's outcome: its sandbox, or why it did not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForkResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
}

/// What happens at a sandbox's timeout, and whether traffic resumes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    pub auto_resume: bool,
    /// `kill` or `pause`.
    pub on_timeout: String,
}

/// A sandbox's network settings, as in force (a transform's header values and the egress
/// proxy's password are not shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxNetwork {
    pub allow_public_traffic: bool,
    #[serde(flatten)]
    pub egress: network::EgressSettings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_request_host: Option<String>,
}

/// One sample of a sandbox's resource use (the guest's view, from its envd), as taken or
/// averaged over a minute or ten (older history).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxMetric {
    /// RFC 3339.
    pub timestamp: String,
    pub timestamp_unix: i64,
    pub cpu_count: u64,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
    /// Bytes the guest received since its VM started, as its host counts them (wrenn's; not
    /// in a sample read live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_rx_bytes: Option<u64>,
    /// Bytes the guest sent since its VM started, as its host counts them (wrenn's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_tx_bytes: Option<u64>,
}

/// One line of a sandbox's log: its console's, envd's, or wrenn's about it (`fields.source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxLogEntry {
    /// RFC 3339 with milliseconds.
    pub timestamp: String,
    pub message: String,
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub fields: BTreeMap<String, String>,
}

/// A line of `GET /sandboxes/{id}/logs` (v1): the time and the text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxLog {
    pub timestamp: String,
    pub line: String,
}

/// `GET /sandboxes/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxLogs {
    pub logs: Vec<SandboxLog>,
    pub log_entries: Vec<SandboxLogEntry>,
}

/// `GET /v2/sandboxes/{id}/logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxLogsV2 {
    pub logs: Vec<SandboxLogEntry>,
}

/// A team's use on one UTC day (`GET /v1/usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageDay {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Seconds its sandboxes ran, summed.
    pub sandbox_seconds: f64,
    /// The same, each weighted by its sandbox's memory in GiB.
    pub gib_seconds: f64,
}

/// `GET /v1/usage`: a team's use by day, oldest first (days without use are left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamUsage {
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub days: Vec<UsageDay>,
    pub total_sandbox_seconds: f64,
    pub total_gib_seconds: f64,
}

/// `GET /sandboxes/metrics`: the latest sample of each running sandbox asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxesMetrics {
    pub sandboxes: BTreeMap<String, SandboxMetric>,
}

/// A template in `GET /templates`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub cpu_count: u32,
    #[serde(rename = "memoryMB")]
    pub memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    pub public: bool,
    pub aliases: Vec<String>,
    pub names: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    pub last_spawned_at: Option<String>,
    pub spawn_count: u64,
    pub build_count: u64,
    pub envd_version: String,
    /// Always `ready`: wrenn lists built templates only.
    pub build_status: String,
}

/// `GET /templates/aliases/{alias}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateAlias {
    #[serde(rename = "templateID")]
    pub template_id: String,
    pub public: bool,
}

/// `POST /v3/templates`: a template (new, or one of the team's by its name) and a build of it
/// to start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildRequest {
    /// `name` or `name:tag`.
    #[serde(default)]
    pub name: Option<String>,
    /// The old spelling of `name`.
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub cpu_count: Option<u32>,
    #[serde(rename = "memoryMB", default)]
    pub memory_mb: Option<u32>,
    /// Free disk the build's host must have (wrenn refuses any but 0: placement already asks
    /// for the template's disk).
    #[serde(rename = "minFreeDiskMb", default)]
    pub min_free_disk_mb: Option<u64>,
}

/// The answer of `POST /v3/templates` (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateBuildRequested {
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// A UUID.
    #[serde(rename = "buildID")]
    pub build_id: String,
    pub public: bool,
    pub names: Vec<String>,
    pub tags: Vec<String>,
    pub aliases: Vec<String>,
}

/// One step of a build (`TemplateStep`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateStep {
    /// RUN, COPY, ENV, WORKDIR or USER.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub files_hash: Option<String>,
    #[serde(default)]
    pub force: bool,
}

/// `POST /v2/templates/{templateID}/builds/{buildID}`: what the build starts from and does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildStart {
    /// A template (its name, `name:tag`, or id) to build on.
    #[serde(default)]
    pub from_template: Option<String>,
    /// An OCI image to build from.
    #[serde(default)]
    pub from_image: Option<String>,
    /// Credentials for `fromImage`'s registry.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub from_image_registry: Option<serde_json::Value>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub steps: Vec<TemplateStep>,
    #[serde(default)]
    pub start_cmd: Option<String>,
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

/// A line of a build's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BuildLogEntry {
    /// RFC 3339.
    pub timestamp: String,
    pub message: String,
    /// debug, info, warn or error.
    pub level: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Why a build failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusReason {
    pub message: String,
    /// The step it failed at: 1-based, `base` or `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default)]
    pub log_entries: Vec<BuildLogEntry>,
}

/// `GET /templates/{templateID}/builds/{buildID}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateBuildInfo {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// waiting, building, ready or error.
    pub status: String,
    /// Always empty (the lines are in `logEntries`).
    pub logs: Vec<String>,
    /// The build's log from `logsOffset` on, at most `limit` lines.
    pub log_entries: Vec<BuildLogEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildStatusReason>,
}

/// `GET /templates/{templateID}/files/{hash}` (201): whether a COPY step's files are there
/// already, and if not, where to `PUT` them (a link that authorises itself, good for an hour).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateFilesUpload {
    pub present: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `POST /templates/tags`: tags to point at the build `target` (`name:tag` or `name`) names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AssignTags {
    pub target: String,
    pub tags: Vec<String>,
}

/// The answer of `POST /templates/tags` (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AssignedTags {
    pub tags: Vec<String>,
    /// The build the tags name (a UUID).
    #[serde(rename = "buildID")]
    pub build_id: String,
}

/// `DELETE /templates/tags`: tags to remove from the template `name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RemoveTags {
    pub name: String,
    pub tags: Vec<String>,
}

/// A tag in `GET /templates/{templateID}/tags`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateTag {
    pub tag: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// RFC 3339.
    pub created_at: String,
}

/// A host of the fleet in `GET /hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Host {
    #[serde(rename = "hostID")]
    pub host_id: String,
    pub name: String,
    /// `up` or `down`.
    pub state: String,
    /// The agent runs in the control plane's process (`wrenn up`).
    pub embedded: bool,
    #[serde(rename = "apiURL")]
    pub api_url: String,
    /// RFC 3339.
    pub last_heartbeat_at: String,
    /// RFC 3339.
    pub registered_at: String,
    /// The host's last report of its capacity, use and templates: `wrenn.agent.v1.HostReport`
    /// in the proto3 JSON mapping (lowerCamelCase names, 64-bit numbers as strings, fields at
    /// their default left out).
    #[schema(value_type = Object)]
    pub report: serde_json::Value,
}

/// `GET /hosts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Hosts {
    /// The placement strategy: `least-loaded` or `binpack`.
    pub placement: String,
    pub hosts: Vec<Host>,
}

/// `DELETE /hosts/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ForgottenHost {
    pub forgotten: String,
    /// How many sandboxes' rows went with it.
    pub sandboxes: u64,
}

/// How a key or token is shown without its secret part (E2B's `IdentifierMaskingDetails`):
/// `e2b_` + `ab` + `…` + `wxyz` for a 40-character value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentifierMaskingDetails {
    /// The kind's prefix (`e2b_`).
    pub prefix: String,
    /// The length of the value after the prefix.
    pub value_length: u32,
    pub masked_value_prefix: String,
    pub masked_value_suffix: String,
}

/// A user, as E2B names a key's maker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TeamUser {
    pub id: String,
    pub email: Option<String>,
}

/// One of a team's API keys (E2B's `TeamAPIKey`), never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamApiKey {
    pub id: String,
    pub name: String,
    pub mask: IdentifierMaskingDetails,
    /// RFC 3339.
    pub created_at: String,
    pub created_by: Option<TeamUser>,
    /// RFC 3339; wrenn does not track it (always null).
    pub last_used: Option<String>,
    /// wrenn's: what the key may do in its team (`owner`, `admin`, `member`).
    pub role: String,
}

/// `POST /api-keys`'s answer (E2B's `CreatedTeamAPIKey`): the key, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedTeamApiKey {
    pub id: String,
    pub key: String,
    pub mask: IdentifierMaskingDetails,
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    pub created_by: Option<TeamUser>,
    pub last_used: Option<String>,
    pub role: String,
}

/// `POST /api-keys`'s body (E2B's `NewTeamAPIKey`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NewTeamApiKey {
    pub name: String,
    /// wrenn's: the new key's role, at most the caller's (the caller's by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// `PATCH /api-keys/{apiKeyID}`'s body (E2B's `UpdateTeamAPIKey`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UpdateTeamApiKey {
    pub name: String,
}

/// One of the caller's teams (E2B's `Team`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Team {
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub name: String,
    /// The key the caller called with, for its own team (wrenn keeps no other key readable);
    /// empty for another team an operator sees.
    pub api_key: String,
    /// The caller's own team.
    pub is_default: bool,
}

/// One event (`GET /v1/events`, `GET /v1/events/stream`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    /// Its place in the store's order: the cursor (`after`, SSE's `Last-Event-ID`).
    pub seq: i64,
    /// RFC 3339.
    pub timestamp: String,
    /// `sandbox.created`, `sandbox.paused`, `sandbox.resumed`, `sandbox.timed_out`,
    /// `sandbox.killed`, `sandbox.failed`, `snapshot.created`, `host.up`, `host.down`,
    /// `template.built`, `template.build_failed`, `key.created`, `key.revoked`,
    /// `channel.test` or `channel.disabled`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The team it concerns (empty for the fleet's own events).
    #[serde(rename = "teamID")]
    pub team_id: String,
    /// `key:<id>`, `system`.
    pub actor: String,
    /// The id of the sandbox, host, template or key it happened to.
    pub subject: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Events {
    pub events: Vec<Event>,
    /// The cursor of the next page (`after`): the last event's `seq`, or the one given.
    pub next: i64,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub id: String,
    pub seq: i64,
    /// RFC 3339.
    pub timestamp: String,
    #[serde(rename = "teamID")]
    pub team_id: String,
    /// Who: `key:<id>`.
    pub actor: String,
    /// What: the method and route, `POST /sandboxes/{sandboxID}/pause`.
    pub action: String,
    /// Which resource: the path called, or what the call made.
    pub resource: String,
    /// The answer's HTTP status.
    pub outcome: u16,
    /// The caller's address.
    pub client: String,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
    /// The cursor of the next page (`after`).
    pub next: i64,
}

/// `POST /v1/auth/login`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub email: String,
    pub password: String,
}

/// A user as the API shows them (never the password's hash).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(rename = "userID")]
    pub user_id: String,
    pub email: String,
    /// Operators see and act in every team.
    pub operator: bool,
    /// RFC 3339.
    pub created_at: String,
}

/// `POST /v1/auth/login`'s answer: a session token (shown once; `Authorization: Bearer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub token: String,
    /// RFC 3339.
    pub expires_at: String,
    pub user: User,
}

/// One of a user's teams, with their role in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Membership {
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub name: String,
    pub role: String,
}

/// `GET /v1/me`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Me {
    pub user: User,
    pub teams: Vec<Membership>,
}

/// `POST /v1/teams`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    pub name: String,
}

/// A team's member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    #[serde(rename = "userID")]
    pub user_id: String,
    pub email: String,
    pub role: String,
    /// RFC 3339.
    pub joined_at: String,
}

/// `PATCH /v1/teams/{teamID}/members/{userID}`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberRole {
    pub role: String,
}

/// `POST /v1/teams/{teamID}/invitations`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewInvitation {
    pub email: String,
    /// `owner`, `admin` or `member` (the default), at most the inviter's.
    #[serde(default)]
    pub role: Option<String>,
}

/// An invitation made: its one-time token (shown once) for the link
/// `POST /v1/invitations/{token}/accept`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Invitation {
    pub id: String,
    pub token: String,
    pub email: String,
    pub role: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// `POST /v1/invitations/{token}/accept`'s body: a password for a new account (none when a
/// signed-in user accepts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvitation {
    #[serde(default)]
    pub password: Option<String>,
}

/// `POST /v1/invitations/{token}/accept`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    #[serde(rename = "teamID")]
    pub team_id: String,
    pub role: String,
    pub user: User,
}

/// `POST /access-tokens`'s body (E2B's `NewAccessToken`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccessToken {
    pub name: String,
}

/// `POST /access-tokens`'s answer (E2B's `CreatedAccessToken`): the token, shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedAccessToken {
    pub id: String,
    pub name: String,
    pub token: String,
    pub mask: IdentifierMaskingDetails,
    /// RFC 3339.
    pub created_at: String,
}
