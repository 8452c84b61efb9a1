//! envd's listener and its connections: HTTP/1.1 and h2c on one port (hyper's auto-detection),
//! TCP_NODELAY, a header-read timeout, an idle timeout, and a tracker of every connection that
//! makes envd safe to snapshot.
//!
//! Why the tracker exists (the original wrenn's worst bug): a TCP connection open when the VM is
//! snapshotted comes back after a restore as a zombie whose peer is long gone. Left alone, such
//! connections pile up and wedge clients that reuse them (endless loading, terminal timeouts
//! behind proxies). So `/snapshot/prepare` closes idle connections and turns keep-alive off on
//! busy ones, and the first `/init` after a restore closes every connection accepted before
//! the prepare, while keeping every later one, the `/init` request's own included.
//!
//! The idle timeout closes a connection with no request in flight for that long; a request
//! stays in flight until its response body is finished, so a long process-output or watch
//! stream is never cut by it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ServerTimeouts {
    /// How long a client may take to send a request's headers.
    pub header_read: Duration,
    /// How long a connection may stay without a request in flight before it is closed. Longer
    /// than the SDK's pool expiry (300 s), so clients never reuse a connection we just closed.
    pub idle: Duration,
    /// The interval of HTTP/2 keepalive pings (a dead peer is dropped after a missed one).
    pub h2_keepalive: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        ServerTimeouts {
            header_read: Duration::from_secs(30),
            idle: Duration::from_secs(640),
            h2_keepalive: Duration::from_secs(60),
        }
    }
}

/// The connection a request arrived on (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

/// What the tracker tells a connection to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Run,
    /// Finish the requests in flight, then close (keep-alive off).
    Drain,
    /// Close now.
    Close,
}

#[derive(Debug)]
struct Tracked {
    in_flight: Arc<AtomicUsize>,
    control: watch::Sender<Command>,
}

#[derive(Debug, Default)]
struct TrackerState {
    connections: HashMap<u64, Tracked>,
    /// Connections with an id up to this one were accepted before the snapshot was prepared.
    snapshot_boundary: Option<u64>,
}

/// Every open connection, by id (ids grow with acceptance order).
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    state: Mutex<TrackerState>,
    next_id: AtomicU64,
    awaiting_restore: AtomicBool,
}

/// What a snapshot preparation or a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionSweep {
    pub closed: usize,
    pub drained: usize,
    pub kept: usize,
}

impl ConnectionTracker {
    fn register(&self) -> (u64, Arc<AtomicUsize>, watch::Receiver<Command>) {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (control, receiver) = watch::channel(Command::Run);
        self.state.lock().expect("tracker lock").connections.insert(
            id,
            Tracked {
                in_flight: in_flight.clone(),
                control,
            },
        );
        (id, in_flight, receiver)
    }

    fn unregister(&self, id: u64) {
        self.state
            .lock()
            .expect("tracker lock")
            .connections
            .remove(&id);
    }

    /// How many connections are open.
    pub fn open_connections(&self) -> usize {
        self.state.lock().expect("tracker lock").connections.len()
    }

    /// Whether a snapshot was prepared and no `/init` has followed yet.
    pub fn awaiting_restore(&self) -> bool {
        self.awaiting_restore.load(Ordering::SeqCst)
    }

    /// Before a snapshot: closes idle connections, turns keep-alive off on busy ones (the
    /// caller's own connection is drained, so it closes after its answer), and remembers which
    /// connections existed.
    pub fn prepare_snapshot(&self, own: Option<ConnectionId>) -> ConnectionSweep {
        let mut state = self.state.lock().expect("tracker lock");
        state.snapshot_boundary = Some(self.next_id.load(Ordering::SeqCst));
        self.awaiting_restore.store(true, Ordering::SeqCst);
        let mut sweep = ConnectionSweep::default();
        for (id, tracked) in &state.connections {
            let idle = tracked.in_flight.load(Ordering::SeqCst) == 0;
            if idle && own != Some(ConnectionId(*id)) {
                tracked.control.send_replace(Command::Close);
                sweep.closed += 1;
            } else {
                tracked.control.send_replace(Command::Drain);
                sweep.drained += 1;
            }
        }
        sweep
    }

    /// The snapshot was taken (or given up) and this very VM goes on: nothing is closed (its
    /// connections are live, not zombies); the ones told to drain still close after their
    /// requests in flight. A no-op unless a snapshot was prepared.
    pub fn continue_after_snapshot(&self) -> bool {
        if !self.awaiting_restore.swap(false, Ordering::SeqCst) {
            return false;
        }
        self.state.lock().expect("tracker lock").snapshot_boundary = None;
        true
    }

    /// After a restore (the first `/init`): closes every connection accepted before the
    /// snapshot was prepared, except the caller's own; keeps the rest. A no-op unless a
    /// snapshot was prepared.
    pub fn complete_restore(&self, own: Option<ConnectionId>) -> ConnectionSweep {
        let mut sweep = ConnectionSweep::default();
        if !self.awaiting_restore.swap(false, Ordering::SeqCst) {
            return sweep;
        }
        let mut state = self.state.lock().expect("tracker lock");
        let boundary = state.snapshot_boundary.take().unwrap_or(0);
        for (id, tracked) in &state.connections {
            if *id <= boundary && own != Some(ConnectionId(*id)) {
                tracked.control.send_replace(Command::Close);
                sweep.closed += 1;
            } else {
                sweep.kept += 1;
            }
        }
        sweep
    }
}

/// Counts a request as in flight until its response body is finished or dropped.
#[derive(Debug)]
struct InFlight {
    count: Arc<AtomicUsize>,
    last_activity: Arc<Mutex<Instant>>,
}

impl InFlight {
    fn new(count: Arc<AtomicUsize>, last_activity: Arc<Mutex<Instant>>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        *last_activity.lock().expect("activity lock") = Instant::now();
        InFlight {
            count,
            last_activity,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.last_activity.lock().expect("activity lock") = Instant::now();
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request in flight.
struct TrackedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Spawns [`serve`] with a tracker of its own, until `stop` turns true: how the host agent and
/// the control plane run each of their listeners.
pub fn spawn_until_stopped(
    listener: TcpListener,
    app: Router,
    timeouts: ServerTimeouts,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve(
        listener,
        app,
        Arc::new(ConnectionTracker::default()),
        timeouts,
        async move {
            let _ = stop.wait_for(|stop| *stop).await;
        },
    ))
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tracker: Arc<ConnectionTracker>,
    timeouts: ServerTimeouts,
    shutdown: impl Future<Output = ()>,
) {
    accept_until(listener, shutdown, |stream, peer| {
        spawn_connection(stream, peer, app.clone(), tracker.clone(), &timeouts)
    })
    .await;
}

/// Accepts connections on `listener` (TCP_NODELAY set) and hands each to `accepted` until
/// `shutdown` completes: the loop of every server, plain or TLS.
pub async fn accept_until(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut accepted: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr),
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            next = listener.accept() => match next {
                Ok(next) => next,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        accepted(stream, peer);
    }
}

/// Serves `app` on one accepted connection (plain TCP, or TLS after its handshake) on a task
/// of its own, with the header-read, idle and keepalive limits of `timeouts`, tracked by
/// `tracker`.
pub fn spawn_connection<I>(
    io: I,
    peer: std::net::SocketAddr,
    app: Router,
    tracker: Arc<ConnectionTracker>,
    timeouts: &ServerTimeouts,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(timeouts.h2_keepalive)
        .keep_alive_timeout(Duration::from_secs(20));
    let (id, in_flight, mut control) = tracker.register();
    let last_activity = Arc::new(Mutex::new(Instant::now()));
    let service = {
        let (in_flight, last_activity) = (in_flight.clone(), last_activity.clone());
        tower::service_fn(move |mut request: Request<Incoming>| {
            let guard = InFlight::new(in_flight.clone(), last_activity.clone());
            request.extensions_mut().insert(ConnectionId(id));
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(Body::new)).await?;
                let response: Response<TrackedBody> = response.map(|inner| TrackedBody {
                    inner,
                    _in_flight: guard,
                });
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let idle_timeout = timeouts.idle;
    tokio::spawn(async move {
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
        tokio::pin!(connection);
        let mut idle_check =
            tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(10)));
        let mut draining = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "connection ended with an error");
                    }
                    break;
                }
                changed = control.changed() => {
                    let command = if changed.is_ok() { *control.borrow_and_update() } else { Command::Close };
                    match command {
                        Command::Close => {
                            tracing::debug!(%peer, id, "closing connection");
                            break;
                        }
                        Command::Drain if !draining => {
                            draining = true;
                            connection.as_mut().graceful_shutdown();
                        }
                        _ => {}
                    }
                }
                _ = idle_check.tick() => {
                    let idle_for = last_activity.lock().expect("activity lock").elapsed();
                    if !draining && in_flight.load(Ordering::SeqCst) == 0 && idle_for >= idle_timeout {
                        tracing::debug!(%peer, id, "closing idle connection");
                        draining = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
        tracker.unregister(id);
    });
}

/// How long a client may take over a TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `app` over TLS on `listener` until `stop` turns true: each connection's handshake
/// within [`TLS_HANDSHAKE_TIMEOUT`], then HTTP/2 or HTTP/1.1 with the limits of `timeouts`;
/// `per_connection` may give a connection's requests what its TLS session says (the peer's
/// certificate).
pub fn spawn_tls_until_stopped(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: axum::Router,
    timeouts: ServerTimeouts,
    mut stop: tokio::sync::watch::Receiver<bool>,
    per_connection: fn(axum::Router, &rustls::ServerConnection) -> axum::Router,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tracker = Arc::new(ConnectionTracker::default());
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    tokio::spawn(accept_until(listener, stopped, move |stream, peer| {
        let (acceptor, app, tracker, timeouts) = (
            acceptor.clone(),
            app.clone(),
            tracker.clone(),
            timeouts.clone(),
        );
        tokio::spawn(async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let app = per_connection(app, tls.get_ref().1);
                    spawn_connection(tls, peer, app, tracker, &timeouts)
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection of [`Named`].
    struct Connection {
        name: &'static str,
        id: u64,
        in_flight: Arc<AtomicUsize>,
        control: watch::Receiver<Command>,
    }

    /// A tracker whose connections have names, to check what each sweep tells each of them.
    #[derive(Default)]
    struct Named {
        tracker: ConnectionTracker,
        connections: Vec<Connection>,
    }

    impl Named {
        fn register(&mut self, names: &[&'static str]) {
            for name in names {
                let (id, in_flight, control) = self.tracker.register();
                let connection = Connection {
                    name,
                    id,
                    in_flight,
                    control,
                };
                self.connections.push(connection);
            }
        }

        fn connection(&self, name: &str) -> &Connection {
            let found = self.connections.iter().find(|c| c.name == name);
            found.unwrap_or_else(|| panic!("no connection {name}"))
        }

        fn id(&self, name: &str) -> ConnectionId {
            ConnectionId(self.connection(name).id)
        }

        fn unregister(&self, names: &[&str]) {
            for name in names {
                self.tracker.unregister(self.connection(name).id);
            }
        }

        /// A sweep closed, drained and kept as many connections as given, each named
        /// connection's control then holds the command given, and the tracker awaits a
        /// restore or not.
        fn assert_swept(
            &self,
            sweep: ConnectionSweep,
            [closed, drained, kept]: [usize; 3],
            commands: &[(&str, Command)],
            awaiting_restore: bool,
        ) {
            let expected = ConnectionSweep {
                closed,
                drained,
                kept,
            };
            assert_eq!(sweep, expected);
            for (name, command) in commands {
                let control = &self.connection(name).control;
                assert_eq!(
                    *control.borrow(),
                    *command,
                    "the {name} connection's command"
                );
            }
            assert_eq!(self.tracker.awaiting_restore(), awaiting_restore);
        }
    }

    #[test]
    fn restore_closes_only_connections_from_before_the_snapshot() {
        use Command::{Close, Drain, Run};
        let mut named = Named::default();
        named.register(&["idle", "busy", "own"]);
        named
            .connection("busy")
            .in_flight
            .store(1, Ordering::SeqCst);
        let sweep = named.tracker.prepare_snapshot(Some(named.id("own")));
        let told = [("idle", Close), ("busy", Drain), ("own", Drain)];
        named.assert_swept(sweep, [1, 2, 0], &told, true);
        named.unregister(&["idle", "own"]);

        named.register(&["after", "init"]);
        let sweep = named.tracker.complete_restore(Some(named.id("init")));
        let told = [("busy", Close), ("after", Run), ("init", Run)];
        named.assert_swept(sweep, [1, 0, 2], &told, false);
        // A second /init changes nothing.
        let again = named.tracker.complete_restore(None);
        assert_eq!(again, ConnectionSweep::default());
    }

    #[test]
    fn a_vm_that_goes_on_after_its_snapshot_keeps_its_connections() {
        use Command::{Close, Drain, Run};
        let mut named = Named::default();
        named.register(&["idle", "busy"]);
        named
            .connection("busy")
            .in_flight
            .store(1, Ordering::SeqCst);
        named.tracker.prepare_snapshot(None);
        assert!(named.tracker.awaiting_restore());
        assert!(named.tracker.continue_after_snapshot());
        assert!(!named.tracker.awaiting_restore());
        // A later /init (the VM's own, not a clone's) closes nothing.
        named.register(&["later"]);
        let sweep = named.tracker.complete_restore(None);
        assert_eq!(sweep, ConnectionSweep::default());
        let told = [("idle", Close), ("busy", Drain), ("later", Run)];
        for (name, command) in told {
            assert_eq!(*named.connection(name).control.borrow(), command, "{name}");
        }
        // Only once per prepared snapshot.
        assert!(!named.tracker.continue_after_snapshot());
    }
}
