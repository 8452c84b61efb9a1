//! The messages of joining a control plane, defined in `agent.proto` (`wrenn.agent.v1.HostRegistry`) and
//! re-exported here (with the files an agent keeps them in): what a host reports of itself ([`HostReport`]), the identity the control
//! plane gives it ([`HostIdentity`], kept in [`IDENTITY_FILE`]), and the registration
//! ([`RegisterRequest`], [`RegisterResponse`]). Heartbeats carry a [`HostReport`] in a
//! [`HeartbeatRequest`]. The RPCs are [`wrenn_proto::agent::host_registry`]'s.

pub use wrenn_proto::agent::{
    HeartbeatRequest, HeartbeatResponse, HostIdentity, HostReport, RegisterRequest,
    RegisterResponse, RenewCertificateRequest, RenewCertificateResponse, TemplateReport,
    host_registry,
};

/// The file, in the agent's data directory, that holds its [`HostIdentity`] (proto3 JSON).
pub const IDENTITY_FILE: &str = "host-identity.json";

/// The file, in the agent's data directory, that holds its fleet certificate chain and its key
/// (PEM, one file so that a rotation replaces both at once; 0600).
pub const CERTIFICATE_FILE: &str = "host-certificate.pem";

/// The file, in the agent's data directory, that holds the control plane's authority (PEM),
/// learnt at the first registration (checked against `--control-plane-ca`).
pub const PLANE_CA_FILE: &str = "control-plane-ca.pem";
