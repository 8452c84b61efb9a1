//! The messages of joining a control plane, defined in `agent.proto` (`wrenn.agent.v1.HostRegistry`) and
//! re-exported here: what a host reports of itself ([`HostReport`]), the identity the control
//! plane gives it ([`HostIdentity`], kept in [`IDENTITY_FILE`]), and the registration
//! ([`RegisterRequest`], [`RegisterResponse`]). Heartbeats carry a [`HostReport`] in a
//! [`HeartbeatRequest`]. The RPCs are [`wrenn_proto::agent::host_registry`]'s.

pub use wrenn_proto::agent::{
    HeartbeatRequest, HeartbeatResponse, HostIdentity, HostReport, RegisterRequest,
    RegisterResponse, TemplateReport, host_registry,
};

/// The file, in the agent's data directory, that holds its [`HostIdentity`] (proto3 JSON).
pub const IDENTITY_FILE: &str = "host-identity.json";
