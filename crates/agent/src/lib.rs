//! wrenn's host agent: it turns "give me a sandbox" into a running VM on this host by restoring a
//! template snapshot, and owns the VMs, their network slots, disks and snapshots.
//! - [`manager`]: templates, sandboxes, pause and resume, recovery after a restart;
//! - [`network`]: network namespaces with veth, tap and NAT, pooled and recycled;
//! - [`firewall`]: every firewall rule the agent installs (the sandbox boundary and each
//!   sandbox's address lists), as text; [`egress`]: what domain rules decide of a connection;
//! - [`disk`]: copy-on-write disks; [`store`]: state on disk;
//! - [`template_store`]: the store of templates every host of a fleet pulls from;
//! - [`oci`]: images pulled from registries and made root filesystems, for template builds;
//! - [`mmds`]: the metadata service for guests of VMMs that have none (QEMU);
//! - [`envd_client`]: the agent's calls to envd; [`api`]: the Connect API;
//! - [`proxy`]: forwarding to guest ports, and the agent's sandbox proxy;
//! - [`join`]: registering with a control plane and heartbeating capacity;
//! - [`local`]: this agent as the control plane's `HostAgent` when both run in one process.

pub mod api;
pub mod disk;
pub mod egress;
pub mod envd_client;
pub mod error;
pub mod firewall;
pub mod host_network;
pub mod join;
pub mod local;
pub mod manager;
pub mod metrics;
pub mod mmds;
pub mod network;
pub mod oci;
pub mod proxy;
pub mod store;
pub mod telemetry;
pub mod template_store;

use std::net::SocketAddr;
use std::sync::Arc;

pub use error::AgentError;
pub use local::LocalAgent;
pub use manager::{AgentConfig, Manager};

/// The agent's listeners.
#[derive(Debug)]
pub struct Listeners {
    /// The Connect API.
    pub api: tokio::net::TcpListener,
    /// The metadata service guests reach as 169.254.169.254.
    pub mmds: tokio::net::TcpListener,
    /// The sandbox proxy the control plane's edge proxy forwards to.
    pub proxy: tokio::net::TcpListener,
}

/// Serves the agent's API, metadata service and sandbox proxy until `shutdown`. With
/// `fleet_tls` (an agent that joins a control plane), the API and the proxy are served over the
/// fleet's mutual TLS alone, once its settings come (until then connections wait); without
/// it, over plain HTTP (a standalone agent, on its own machine).
pub async fn serve(
    manager: Arc<Manager>,
    listeners: Listeners,
    token: &str,
    timeouts: wrenn_http::server::ServerTimeouts,
    fleet_tls: Option<tokio::sync::watch::Receiver<Option<Arc<rustls::ServerConfig>>>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let spawn = |listener: tokio::net::TcpListener, router: axum::Router| {
        wrenn_http::server::spawn_until_stopped(listener, router, timeouts.clone(), stop_rx.clone())
    };
    let mmds_server = spawn(listeners.mmds, manager.mmds.router());
    let (proxy_router, api_router) = (
        proxy::router(manager.clone(), token),
        api::router(manager.clone(), token),
    );
    let (proxy_server, api_server) = match fleet_tls {
        None => (
            spawn(listeners.proxy, proxy_router),
            spawn(listeners.api, api_router),
        ),
        Some(mut settings) => {
            let (timeouts, mut stop) = (timeouts.clone(), stop_rx.clone());
            let served = tokio::spawn(async move {
                let config = tokio::select! {
                    known = settings.wait_for(Option::is_some) => match known {
                        Ok(config) => config.clone().expect("waited for it"),
                        Err(_) => return,
                    },
                    _ = stop.wait_for(|stop| *stop) => return,
                };
                let tls = |listener, router| {
                    wrenn_http::server::spawn_tls_until_stopped(
                        listener,
                        config.clone(),
                        router,
                        timeouts.clone(),
                        stop.clone(),
                        |router, _| router,
                    )
                };
                let proxy = tls(listeners.proxy, proxy_router);
                let api = tls(listeners.api, api_router);
                let _ = tokio::join!(proxy, api);
            });
            (served, tokio::spawn(async {}))
        }
    };
    shutdown.await;
    let _ = stop_tx.send(true);
    let _ = tokio::join!(api_server, proxy_server, mmds_server);
    // Warm VMMs have no sandbox to outlive the agent for.
    manager.close_warm_pool().await;
}

/// Runs `work` to its end on a task of its own, even if the caller stops waiting (a client that
/// hangs up, a request that times out): a VM operation cut off halfway would leave a VM, a slot
/// or a snapshot behind.
pub async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, AgentError>> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::spawn(work)
        .await
        .map_err(|error| AgentError::Internal(format!("the operation's task failed: {error}")))?
}

/// The address the MMDS listens on: every host-side veth address, one port.
pub fn mmds_bind_address(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}
