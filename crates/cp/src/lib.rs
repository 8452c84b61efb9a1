//! wrenn's control plane: the E2B-compatible REST API ([`api`]) over a store ([`store`]) of
//! teams, hashed API keys ([`auth`]) and sandboxes, sandbox lifecycles (end times, kill or pause
//! on timeout), and the edge proxy ([`proxy`]) to sandbox ports. Today it drives one host agent
//! embedded in the same process (`wrenn up`).

pub mod api;
pub mod auth;
pub mod proxy;
pub mod store;
pub mod store_pg;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use wrenn_agent::Manager;

use crate::api::ApiError;
use crate::store::{SandboxRow, Store};

/// The control plane's state, shared by the API, the proxy and the lifecycle loop.
#[derive(Debug)]
pub struct ControlPlane {
    pub store: Store,
    pub manager: Arc<Manager>,
    /// The domain sandboxes are reached under, returned to the SDKs (`domain`).
    pub domain: Option<String>,
    /// Whether sandboxes may reach the internet at all on this host.
    pub internet: bool,
    pub disk_size_mb: u64,
    /// Creates by (team, Idempotency-Key): the sandbox each made.
    pub idempotency: std::sync::Mutex<std::collections::HashMap<(String, String), String>>,
}

impl ControlPlane {
    /// Kills a sandbox: its VM and its record.
    pub async fn kill(&self, id: &str) -> Result<(), ApiError> {
        match self.manager.destroy(id).await {
            Ok(()) | Err(wrenn_agent::AgentError::NotFound(_)) => {}
            Err(error) => return Err(error.into()),
        }
        self.store.delete_sandbox(id).await?;
        tracing::info!(sandbox = id, "sandbox killed");
        Ok(())
    }

    /// Pauses a running sandbox.
    pub async fn pause(&self, row: &SandboxRow) -> Result<(), ApiError> {
        self.manager.pause(&row.id).await?;
        self.store
            .set_state(&row.id, "paused", row.end_at_ms)
            .await?;
        Ok(())
    }

    /// Resumes a paused sandbox until `end_at_ms`.
    pub async fn resume(
        &self,
        row: &SandboxRow,
        end_at_ms: i64,
        auto_pause: Option<bool>,
    ) -> Result<SandboxRow, ApiError> {
        self.manager.resume(&row.id, None, None, None).await?;
        let mut row = row.clone();
        row.state = "running".into();
        row.end_at_ms = end_at_ms;
        if let Some(auto_pause) = auto_pause {
            row.auto_pause = auto_pause;
        }
        self.store.put_sandbox(row.clone()).await?;
        Ok(row)
    }

    /// Ends sandboxes whose time is up, once a second: paused if they asked for it, else
    /// killed. Runs until the process ends.
    pub async fn run_lifecycle(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = chrono::Utc::now().timestamp_millis();
            let expired = match self.store.expired(now).await {
                Ok(expired) => expired,
                Err(error) => {
                    tracing::warn!(%error, "lifecycle: cannot read the store");
                    continue;
                }
            };
            for row in expired {
                let outcome = if row.auto_pause {
                    tracing::info!(sandbox = %row.id, "timeout: pausing");
                    self.pause(&row).await
                } else {
                    tracing::info!(sandbox = %row.id, "timeout: killing");
                    self.kill(&row.id).await
                };
                if let Err(error) = outcome {
                    tracing::warn!(sandbox = %row.id, ?error, "lifecycle action failed");
                }
            }
        }
    }
}

/// envd's `/metrics` of a guest, if it answers.
pub async fn envd_metrics(
    address: Ipv4Addr,
    token: Option<&str>,
    timeout: Duration,
) -> Option<serde_json::Value> {
    use http_body_util::BodyExt;
    let attempt = async {
        let stream = tokio::net::TcpStream::connect((address, 49983))
            .await
            .ok()?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(connection);
        let mut request = http::Request::get("/metrics").header("host", format!("{address}:49983"));
        if let Some(token) = token {
            request = request.header("x-access-token", token);
        }
        let response = sender
            .send_request(
                request
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .ok()?,
            )
            .await
            .ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}
