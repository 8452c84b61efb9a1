//! wrenn's control plane: the E2B-compatible REST API ([`api`]) over a store ([`store`]) of
//! teams, hashed API keys ([`auth`]), hosts and sandboxes; the fleet of host agents
//! ([`fleet`]: registration, heartbeats, placement, reconciliation); sandbox lifecycles (end
//! times, kill or pause on timeout); and the edge proxy ([`proxy`]) to sandbox ports.

pub mod api;
pub mod auth;
pub mod fleet;
pub mod proxy;
pub mod store;
pub mod store_pg;

use std::sync::Arc;
use std::time::Duration;

use crate::api::ApiError;
use crate::fleet::Fleet;
use crate::store::{SandboxRow, Store};

/// The control plane's state, shared by the API, the proxy and the background loops.
#[derive(Debug)]
pub struct ControlPlane {
    pub store: Store,
    pub fleet: Fleet,
    /// The domain sandboxes are reached under, returned to the SDKs (`domain`).
    pub domain: Option<String>,
    /// Whether sandboxes may reach the internet at all.
    pub internet: bool,
    /// Creates by (team, Idempotency-Key): the sandbox each made.
    pub idempotency: std::sync::Mutex<std::collections::HashMap<(String, String), String>>,
    /// Asks the fleet loop to reconcile a host now (it registered or came back).
    pub reconcile_now: tokio::sync::mpsc::Sender<String>,
}

impl ControlPlane {
    /// A control plane over `store` and `fleet`; the receiver goes to [`Self::run_fleet`].
    pub fn new(
        store: Store,
        fleet: Fleet,
        domain: Option<String>,
        internet: bool,
    ) -> (ControlPlane, tokio::sync::mpsc::Receiver<String>) {
        let (reconcile_now, wake) = tokio::sync::mpsc::channel(64);
        let plane = ControlPlane {
            store,
            fleet,
            domain,
            internet,
            idempotency: Default::default(),
            reconcile_now,
        };
        (plane, wake)
    }

    /// Kills the sandbox with this id, if there is one: whether there was.
    pub async fn kill_by_id(&self, id: &str) -> Result<bool, ApiError> {
        match self.store.sandbox(id).await? {
            Some(row) => self.kill(&row).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// Kills a sandbox: its VM (when its host is up; a lost sandbox's host may be gone for
    /// good) and its record.
    pub async fn kill(&self, row: &SandboxRow) -> Result<(), ApiError> {
        if let Some(host) = self.fleet.host(&row.host_id)
            && host.is_up()
        {
            host.link.destroy(&host.row().name, &row.id).await?;
        } else if row.state != "lost" {
            self.fleet.up_host(row)?;
        }
        self.fleet.forget(&row.id);
        self.store.delete_sandbox(&row.id).await?;
        tracing::info!(sandbox = %row.id, "sandbox killed");
        Ok(())
    }

    /// Pauses a running sandbox.
    pub async fn pause(&self, row: &SandboxRow) -> Result<(), ApiError> {
        let host = self.fleet.up_host(row)?;
        self.fleet.forget(&row.id);
        host.link.pause(&host.row().name, &row.id).await?;
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
        let host = self.fleet.up_host(row)?;
        host.link.resume(&host.row().name, &row.id).await?;
        let mut row = row.clone();
        row.state = "running".into();
        row.end_at_ms = end_at_ms;
        if let Some(auto_pause) = auto_pause {
            row.auto_pause = auto_pause;
        }
        self.store.put_sandbox(row.clone()).await?;
        Ok(row)
    }

    /// Resumes a paused sandbox that asked to be resumed by traffic (for five minutes): whether
    /// it runs now.
    pub async fn resume_on_traffic(&self, id: &str) -> bool {
        const AUTO_RESUME_TIMEOUT_MS: i64 = 5 * 60 * 1000;
        let Ok(Some(row)) = self.store.sandbox(id).await else {
            return false;
        };
        if row.state != "paused" || !row.auto_resume {
            return row.state == "running";
        }
        let end = chrono::Utc::now().timestamp_millis() + AUTO_RESUME_TIMEOUT_MS;
        match self.resume(&row, end, None).await {
            Ok(_) => {
                tracing::info!(sandbox = id, "resumed by traffic");
                true
            }
            Err(error) => {
                // Another request may have resumed it first.
                tracing::debug!(sandbox = id, ?error, "resume on traffic failed");
                matches!(self.store.sandbox(id).await, Ok(Some(row)) if row.state == "running")
            }
        }
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
                    self.kill(&row).await
                };
                if let Err(error) = outcome {
                    tracing::warn!(sandbox = %row.id, ?error, "lifecycle action failed");
                }
            }
        }
    }

    /// Watches heartbeats (half the interval) and reconciles every up host (each
    /// `reconcile_interval`, and at once when a host registers or comes back). Runs until the
    /// process ends.
    pub async fn run_fleet(self: Arc<Self>, mut wake: tokio::sync::mpsc::Receiver<String>) {
        let tick = (self.fleet.config.heartbeat_interval / 2).max(Duration::from_millis(100));
        let mut heartbeats = tokio::time::interval(tick);
        let mut reconcile = tokio::time::interval(self.fleet.config.reconcile_interval);
        loop {
            tokio::select! {
                _ = heartbeats.tick() => self.fleet.check_heartbeats(&self.store).await,
                _ = reconcile.tick() => {
                    for host in self.fleet.hosts() {
                        if host.is_up() {
                            self.reconcile(&host).await;
                        }
                    }
                }
                Some(host_id) = wake.recv() => {
                    if let Some(host) = self.fleet.host(&host_id) {
                        self.reconcile(&host).await;
                    }
                }
            }
        }
    }

    async fn reconcile(&self, host: &fleet::Host) {
        match fleet::reconcile_host(&self.store, &self.fleet, host).await {
            Ok(done) if done != fleet::Reconciled::default() => {
                tracing::info!(host = %host.row().name, ?done, "reconciled");
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(host = %host.row().name, ?error, "cannot reconcile the host");
            }
        }
    }
}

/// envd's `/metrics` of a guest, if it answers.
/// The most the control plane reads of a guest's `/metrics` answer.
pub const MAX_METRICS_ANSWER: usize = 64 * 1024;

pub async fn envd_metrics(
    route: &fleet::GuestRoute,
    token: Option<&str>,
    timeout: Duration,
) -> Option<serde_json::Value> {
    use http_body_util::BodyExt;
    let attempt = async {
        let mut request = http::Request::get("/metrics").header("host", "envd");
        if let Some(token) = token {
            request = request.header("x-access-token", token);
        }
        let response = route
            .forward(request.body(axum::body::Body::empty()).ok()?)
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        // The guest's root can serve anything here: read at most 64 KiB of it.
        let body = http_body_util::Limited::new(response.into_body(), MAX_METRICS_ANSWER)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    };
    tokio::time::timeout(timeout, attempt).await.ok().flatten()
}
