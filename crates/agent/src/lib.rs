//! wrenn's host agent: it turns "give me a sandbox" into a running VM on this host by restoring a
//! template snapshot, and owns the VMs, their network slots, disks and snapshots.
//! - [`manager`]: templates, sandboxes, pause and resume, recovery after a restart;
//! - [`network`]: network namespaces with veth, tap and NAT, pooled and recycled;
//! - [`disk`]: copy-on-write disks; [`store`]: state on disk;
//! - [`mmds`]: the metadata service for guests of VMMs that have none (QEMU);
//! - [`envd_client`]: the agent's calls to envd; [`api`]: the Connect API.

pub mod api;
pub mod disk;
pub mod envd_client;
pub mod error;
pub mod manager;
pub mod mmds;
pub mod network;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

pub use error::AgentError;
pub use manager::{AgentConfig, Manager};

/// Serves the agent's API on `api` and its metadata service on `mmds` until `shutdown`.
pub async fn serve(
    manager: Arc<Manager>,
    api: tokio::net::TcpListener,
    mmds: tokio::net::TcpListener,
    token: &str,
    timeouts: wrenn_envd::server::ServerTimeouts,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut mmds_stop = stop_rx.clone();
    let mmds_server = tokio::spawn(wrenn_envd::server::serve(
        mmds,
        manager.mmds.router(),
        Arc::new(wrenn_envd::server::ConnectionTracker::default()),
        timeouts.clone(),
        async move {
            let _ = mmds_stop.wait_for(|stop| *stop).await;
        },
    ));
    let api_server = wrenn_envd::server::serve(
        api,
        api::router(manager.clone(), token),
        Arc::new(wrenn_envd::server::ConnectionTracker::default()),
        timeouts,
        shutdown,
    );
    api_server.await;
    let _ = stop_tx.send(true);
    let _ = mmds_server.await;
}

/// The address the MMDS listens on: every host-side veth address, one port.
pub fn mmds_bind_address(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}
