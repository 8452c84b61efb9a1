//! The messages of joining a control plane: what a host reports of itself ([`HostReport`]), the
//! identity the control plane gives it ([`HostIdentity`], kept in [`IDENTITY_FILE`]), and the
//! registration ([`RegisterRequest`], [`RegisterResponse`]). Heartbeats carry a [`HostReport`].

use serde::{Deserialize, Serialize};

/// A template as a host reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateReport {
    pub template_id: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub envd_version: String,
    pub image_key: String,
    pub created_at_ms: i64,
    /// The size of the template's root filesystem.
    pub disk_size_mb: u64,
}

/// A host's capacity and use, sent with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HostReport {
    pub agent_version: String,
    pub vmm: String,
    pub accel: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub sandboxes_running: u32,
    pub sandboxes_paused: u32,
    /// Guest memory promised to running sandboxes.
    pub memory_committed_mib: u64,
    pub slots_total: u32,
    pub slots_in_use: u32,
    pub disk_available_bytes: u64,
    pub agent_rss_bytes: u64,
    pub templates: Vec<TemplateReport>,
}

/// The file, in the agent's data directory, that holds its [`HostIdentity`].
pub const IDENTITY_FILE: &str = "host-identity.json";

/// Who a host is to the control plane it joined: given at its first registration, kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostIdentity {
    pub host_id: String,
    pub secret: String,
}

/// What an agent sends to register (`POST /hosts/register`, bearer: the join token).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// The host's name, unique in the fleet: only the agent holding the host's identity may
    /// register under it again.
    pub name: String,
    /// The agent's Connect API (`http://host:port`), reachable from the control plane.
    pub api_url: String,
    /// The agent's sandbox proxy (`host:port`), reachable from the control plane's proxy.
    pub proxy_address: String,
    /// The bearer token of the agent's API and proxy.
    pub agent_token: String,
    pub report: HostReport,
    /// The identity the control plane gave this host before; none at a first registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<HostIdentity>,
}

/// The control plane's answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub host_id: String,
    /// The bearer token of this host's heartbeats.
    pub heartbeat_token: String,
    pub heartbeat_interval_ms: u64,
    /// A new identity's secret (with `host_id`): given when the host had none, to be kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_secret: Option<String>,
}
