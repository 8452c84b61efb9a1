//! HTTP plumbing shared by envd, the host agent and the control plane, so that none of them
//! links another for it: [`server`] (every listener: HTTP/1.1 and h2c, header-read, idle and
//! keepalive limits, and the connection tracker that makes envd safe to snapshot) and
//! [`forward`] (streaming one request to a guest port and its answer back, ended when the
//! guest's VM stops) and [`client`] (the one HTTP client, and bounded reads of its answers).

pub mod client;
pub mod forward;
pub mod metrics;
pub mod server;
