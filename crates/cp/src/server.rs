//! The control plane as a library: [`Server::builder`] takes a [`ControlPlane`] and the
//! [`Extension`]s to add to it, and gives the API's and the proxy's routers and the plane's
//! background work. An extension adds routes (under `/ext/<name>`, behind the API's key check
//! and audit log), background workers (stopped by the server's shutdown token) and hooks
//! ([`crate::service::hooks`]: before a sandbox is created, on every event). `wrenn server`
//! and `wrenn up` are this builder with no extension; `examples/template-allowlist` adds one.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ControlPlane;
use crate::replica::Duty;
use crate::service::hooks::Hooks;

/// The router an extension's routes are: handlers see the control plane as their state, and
/// may take [`crate::http::Caller`] (the key that called).
pub type ExtensionRouter = axum::Router<Arc<ControlPlane>>;

/// What code built on the control plane adds to it. Only [`Extension::name`] is required.
pub trait Extension: Send + Sync + 'static {
    /// Its name: its routes are served under `/ext/<name>`. Lowercase letters, digits and
    /// `-`, at most 32; unique among a server's extensions.
    fn name(&self) -> &str;

    /// Its routes, served under `/ext/<name>` with the API's own rules: an `X-API-KEY` is
    /// required, every call that may change state is audited, bodies are limited to 1 MiB.
    fn routes(&self) -> Option<ExtensionRouter> {
        None
    }

    /// Its hooks, asked with every other extension's in the order they were added.
    fn hooks(&self) -> Option<Arc<dyn Hooks>> {
        None
    }

    /// Its background work, started with the server's and run until `shutdown` is cancelled;
    /// the server waits for each to return.
    fn workers(
        &self,
        _plane: &Arc<ControlPlane>,
        _shutdown: &CancellationToken,
    ) -> Vec<BoxFuture<'static, ()>> {
        Vec::new()
    }
}

/// Why a server cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "extension name {0:?}: use 1 to 32 lowercase letters, digits and '-' (it is a path segment)"
    )]
    BadName(String),
    #[error("two extensions are named {0:?}: their routes would overlap")]
    DuplicateName(String),
}

/// A control plane and its extensions, not yet built.
pub struct ServerBuilder {
    plane: ControlPlane,
    wake: tokio::sync::mpsc::Receiver<String>,
    extensions: Vec<Arc<dyn Extension>>,
}

/// A control plane ready to serve: its routers, and its background work to start.
pub struct Server {
    plane: Arc<ControlPlane>,
    wake: tokio::sync::mpsc::Receiver<String>,
    extensions: Vec<Arc<dyn Extension>>,
    api: axum::Router,
}

impl Server {
    /// A builder over `plane` and its fleet's wake-ups (both from [`ControlPlane::new`]).
    pub fn builder(
        plane: ControlPlane,
        wake: tokio::sync::mpsc::Receiver<String>,
    ) -> ServerBuilder {
        ServerBuilder {
            plane,
            wake,
            extensions: Vec::new(),
        }
    }

    /// The control plane.
    pub fn plane(&self) -> &Arc<ControlPlane> {
        &self.plane
    }

    /// The REST API's routes, the extensions' with them.
    pub fn api_router(&self) -> axum::Router {
        self.api.clone()
    }

    /// The edge proxy's routes (sandbox ports and envd).
    pub fn proxy_router(&self) -> axum::Router {
        crate::proxy::router(self.plane.clone())
    }

    /// Starts the control plane's loops (lifecycles and timeouts, the fleet's watch and
    /// reconcile: they end with the process), the event hooks, the notification channels'
    /// deliveries and the extensions' workers (they end at `shutdown`: wait for them with
    /// [`Started::stopped`]).
    pub fn start(self, shutdown: CancellationToken) -> Started {
        crate::metrics::register_all();
        // Among replicas, each duty runs where its lease is held (the loops ask before each
        // round; the telemetry collection and the deliveries are started and stopped with it).
        if let Some(replica) = &self.plane.replica {
            replica.keep_duties(&self.plane.store);
        }
        tokio::spawn(self.plane.clone().run_lifecycle());
        tokio::spawn(self.plane.clone().run_fleet(self.wake));
        let plane = self.plane.clone();
        let hooked = self.plane.clone();
        let mut workers = vec![
            tokio::spawn(while_held(
                self.plane.clone(),
                Duty::EventHooks,
                shutdown.clone(),
                move |stop| hooked.clone().run_event_hooks(stop),
            )),
            tokio::spawn(while_held(
                self.plane.clone(),
                Duty::Telemetry,
                shutdown.clone(),
                move |stop| plane.clone().run_telemetry(stop),
            )),
        ];
        // Notification channels' deliveries; one cut short is made again at the next start.
        if let Some(channels) = &self.plane.channels {
            let (store, channels) = (self.plane.store.clone(), channels.clone());
            workers.push(tokio::spawn(while_held(
                self.plane.clone(),
                Duty::Deliveries,
                shutdown.clone(),
                move |stop| {
                    crate::channels::run_deliveries(
                        store.clone(),
                        channels.secrets.clone(),
                        channels.policy.clone(),
                        stop,
                    )
                },
            )));
        }
        for extension in &self.extensions {
            for work in extension.workers(&self.plane, &shutdown) {
                workers.push(tokio::spawn(work));
            }
        }
        Started {
            plane: self.plane,
            api: self.api,
            workers,
        }
    }
}

/// A started server.
pub struct Started {
    pub plane: Arc<ControlPlane>,
    api: axum::Router,
    workers: Vec<JoinHandle<()>>,
}

impl Started {
    /// The REST API's routes, the extensions' with them.
    pub fn api_router(&self) -> axum::Router {
        self.api.clone()
    }

    /// The edge proxy's routes.
    pub fn proxy_router(&self) -> axum::Router {
        crate::proxy::router(self.plane.clone())
    }

    /// Waits for the event hooks, the deliveries and the extensions' workers to return (cancel
    /// the shutdown token first); then a replica gives its duties' leases up, for another to
    /// take at once.
    pub async fn stopped(self) {
        for worker in self.workers {
            if let Err(error) = worker.await {
                tracing::error!(%error, "a server worker panicked");
            }
        }
        if let Some(replica) = &self.plane.replica {
            replica.give_up_duties().await;
        }
    }
}

/// How long a duty that returned by itself waits before it is started again.
const DUTY_RESTART_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often a replica not holding a duty's lease looks whether it does now.
const DUTY_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs the duty `work` makes (until the token it is given is cancelled) while `plane` holds
/// `duty` (always, alone on its store): started when the lease is taken, stopped when it is
/// lost, until `shutdown`.
async fn while_held<W, F>(
    plane: Arc<ControlPlane>,
    duty: Duty,
    shutdown: CancellationToken,
    work: W,
) where
    W: Fn(CancellationToken) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if plane.replica.is_none() {
        return work(shutdown).await;
    }
    loop {
        while !plane.holds(duty) {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(DUTY_POLL) => {}
            }
        }
        let stop = shutdown.child_token();
        let mut running = tokio::spawn(work(stop.clone()));
        loop {
            tokio::select! {
                _ = &mut running => break,
                () = tokio::time::sleep(DUTY_POLL) => {
                    if !plane.holds(duty) && !stop.is_cancelled() {
                        tracing::info!(duty = duty.lease_name(), "this replica no longer holds the duty: stopping it");
                        stop.cancel();
                    }
                }
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
        // A duty that ended by itself (nothing to do, or it could not start) is not started
        // again at once.
        if !stop.is_cancelled() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(DUTY_RESTART_PAUSE) => {}
            }
        }
    }
}

/// The names of extensions, for `Debug`.
fn names(extensions: &[Arc<dyn Extension>]) -> Vec<&str> {
    extensions
        .iter()
        .map(|extension| extension.name())
        .collect()
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("extensions", &names(&self.extensions))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("extensions", &names(&self.extensions))
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// Adds `extension`: its hooks after those already added.
    pub fn extension(mut self, extension: Arc<dyn Extension>) -> Self {
        self.extensions.push(extension);
        self
    }

    /// The server, its extensions' names checked.
    pub fn build(self) -> Result<Server, ServerError> {
        let mut plane = self.plane;
        let mut names = std::collections::HashSet::new();
        let mut routes = Vec::new();
        for extension in &self.extensions {
            let name = extension.name().to_string();
            let valid = !name.is_empty()
                && name.len() <= 32
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(ServerError::BadName(name));
            }
            if !names.insert(name.clone()) {
                return Err(ServerError::DuplicateName(name));
            }
            if let Some(hooks) = extension.hooks() {
                plane = plane.with_hooks(hooks);
            }
            if let Some(router) = extension.routes() {
                routes.push((name, router));
            }
        }
        let plane = Arc::new(plane);
        let api = crate::http::router_with(plane.clone(), routes);
        Ok(Server {
            plane,
            wake: self.wake,
            extensions: self.extensions,
            api,
        })
    }
}
