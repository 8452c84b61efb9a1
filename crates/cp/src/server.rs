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
        tokio::spawn(self.plane.clone().run_lifecycle());
        tokio::spawn(self.plane.clone().run_fleet(self.wake));
        let mut workers = vec![
            tokio::spawn(self.plane.clone().run_event_hooks(shutdown.clone())),
            tokio::spawn(self.plane.clone().run_telemetry(shutdown.clone())),
        ];
        // Notification channels' deliveries; one cut short is made again at the next start.
        if let Some(channels) = &self.plane.channels {
            workers.push(tokio::spawn(crate::channels::run_deliveries(
                self.plane.store.clone(),
                channels.secrets.clone(),
                channels.policy.clone(),
                shutdown.clone(),
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

    /// Waits for the event hooks, the deliveries and the extensions' workers to return (cancel the shutdown
    /// token first).
    pub async fn stopped(self) {
        for worker in self.workers {
            if let Err(error) = worker.await {
                tracing::error!(%error, "a server worker panicked");
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
