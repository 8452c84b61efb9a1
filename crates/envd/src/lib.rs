//! envd: the agent inside every wrenn sandbox VM, wire-compatible with E2B's envd so that the
//! official `e2b` SDKs work against it unmodified.
//!
//! - [`rpc`]: the Connect services `process.Process` and `filesystem.Filesystem`;
//! - [`http`]: `/health`, `/files`, `/envs`, `/metrics`, `/init` and the auth middleware;
//! - [`process`], [`fs`]: the work itself, knowing nothing of the wire;
//! - [`users`], [`paths`], [`envs`], [`auth`]: who a call runs as, where its paths lead, what
//!   environment its processes get;
//! - [`server`]: the listener (HTTP/1.1 + h2c, timeouts, the connection tracker);
//! - [`ports`]: forwarding loopback-only ports to the external address;
//! - [`trust`]: the sandbox's certificate authority in the guest's trust store;
//! - `http::snapshot`: `/snapshot/prepare`, which with `/init` makes envd safe to snapshot.

pub mod auth;
pub mod cgroups;
pub mod envs;
pub mod fs;
pub mod http;
pub mod metrics;
pub mod mmds;
pub mod paths;
pub mod ports;
pub mod poweroff;
pub mod process;
pub mod reaper;
pub mod rpc;
/// The listener and connection tracker envd serves with (shared with the host: see
/// [`wrenn_http::server`]).
pub use wrenn_http::server;
pub mod state;
pub mod trust;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use ::http::{HeaderName, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

pub use state::{ENVD_VERSION, Envd, EnvdConfig, VERSION_MARKER_PREFIX};

/// The address of every sandbox guest (the same inside every clone of a snapshot).
pub const GUEST_ADDRESS: [u8; 4] = [169, 254, 0, 21];

/// The port envd listens on by default (E2B's).
pub const DEFAULT_PORT: u16 = wrenn_proto::ENVD_PORT;

/// The flags that run the envd binary as a process of this host, as its tests and benchmarks
/// do: serving on 127.0.0.1:`port` only, and never letting `/init` set this machine's clock.
pub fn loopback_args(port: u16) -> [String; 5] {
    [
        "--port",
        &port.to_string(),
        "--listen",
        "127.0.0.1",
        "--no-clock-sync",
    ]
    .map(String::from)
}

/// envd's whole HTTP application: Connect services, plain routes, auth and CORS.
pub fn app(envd: Arc<Envd>) -> axum::Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_headers(AllowHeaders::mirror_request())
        .allow_methods([
            Method::HEAD,
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .expose_headers([
            HeaderName::from_static("location"),
            HeaderName::from_static("cache-control"),
            HeaderName::from_static("x-content-type-options"),
            HeaderName::from_static("connect-content-encoding"),
            HeaderName::from_static("connect-accept-encoding"),
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(2 * 60 * 60));
    rpc::router()
        .merge(http::router())
        .layer(axum::middleware::from_fn_with_state(
            envd.clone(),
            http::guard,
        ))
        .layer(cors)
        .with_state(envd)
}
