//! The messages of joining a control plane, defined in `fleet.proto` (`wrenn.fleet.v1`) and
//! re-exported here: what a host reports of itself ([`HostReport`]), the identity the control
//! plane gives it ([`HostIdentity`], kept in [`IDENTITY_FILE`]), and the registration
//! ([`RegisterRequest`], [`RegisterResponse`]). Heartbeats carry a [`HostReport`] in a
//! [`HeartbeatRequest`]. The RPCs are [`wrenn_proto::fleet::host_registry`]'s.

pub use wrenn_proto::fleet::{
    HeartbeatRequest, HeartbeatResponse, HostIdentity, HostReport, RegisterRequest,
    RegisterResponse, TemplateReport, host_registry,
};

/// The file, in the agent's data directory, that holds its [`HostIdentity`] (proto3 JSON).
pub const IDENTITY_FILE: &str = "host-identity.json";
