//! wrenn's control plane. Its core: the lifecycles and the fleet's loops ([`service`], with
//! [`Error`] named by cause), the fleet of host agents ([`fleet`]: registration, heartbeats,
//! placement, reconciliation), the store ([`store`]) of teams, hashed API keys ([`auth`]), hosts
//! and sandboxes, per-team quotas ([`quota`]), per-key rate limits ([`ratelimit`]) and the settings it refuses rather than ignore
//! ([`unsupported`]). Its HTTP edge, the only code that knows status codes: the E2B-compatible
//! REST API ([`http`]), the edge proxy ([`proxy`]) to sandbox ports, and HTTPS under its
//! domain ([`tls`]). [`server`] puts them together, with the extensions code built on this
//! crate adds (routes, workers, hooks).

pub mod auth;
pub mod busy;
pub mod channels;
pub mod deadlines;
pub mod events;
pub mod fleet;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod ratelimit;
pub mod replica;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod unsupported;

pub use service::{ControlPlane, Error};
