//! The protocol buffer messages of envd's two Connect services, `process.Process` and
//! `filesystem.Filesystem`, exactly as E2B's envd defines them (field numbers and names are part of
//! the wire contract with the `e2b` SDKs), and of wrenn's own services in `wrenn.agent.v1`: the host agent's API
//! (`HostAgent`) and the control plane's fleet registry that agents join (`HostRegistry`).
//!
//! Every message is a `prost::Message` (binary codec) and implements `serde` with the proto3 JSON
//! mapping (lowerCamelCase names with snake_case accepted, base64 bytes, int64 as strings, enum
//! names, unknown fields ignored), which is the codec the SDKs use. This crate owns no behaviour.

#![allow(missing_debug_implementations)]

/// The port envd serves on in every sandbox: part of E2B's contract (the SDKs reach envd at
/// `49983-<sandbox id>.<domain>` and name it in `E2b-Sandbox-Port`).
pub const ENVD_PORT: u16 = 49983;

/// One RPC of a Connect service, generated for every method of every service below (e.g.
/// [`agent::host_agent::CreateSandbox`]): clients and servers name a method by its type.
pub trait Rpc {
    /// `/package.Service/Method`.
    const PATH: &'static str;
    /// Whether the client sends a stream of requests.
    const CLIENT_STREAMING: bool;
    /// Whether the server answers with a stream of responses.
    const SERVER_STREAMING: bool;
    type Request;
    type Response;
}

/// `package process`: running commands and terminals.
#[allow(clippy::all, clippy::pedantic)]
pub mod process {
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

/// `package filesystem`: files, directories and watchers.
#[allow(clippy::all, clippy::pedantic)]
pub mod filesystem {
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

/// `package wrenn.agent.v1`: the host agent's API, and the fleet registry agents join.
#[allow(clippy::all, clippy::pedantic)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/wrenn.agent.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/wrenn.agent.v1.serde.rs"));
}
