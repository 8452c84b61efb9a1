//! Control plane replicas (#23): several `wrenn server` processes on one PostgreSQL store.
//! This module owns what a replica shares with the others beyond the store's rows: which of
//! them runs each background [`Duty`] (one lease each, [`crate::lease`]), and each sandbox's
//! turn for a change of its state ([`Replica::turn`], a short lease named after it), so that
//! a pause and a kill sent to two replicas at once are done one after the other, the second
//! seeing what the first did. A control plane alone on its store (SQLite, `wrenn up`) has no
//! [`Replica`]: it holds every duty, and its in-process turns suffice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::lease::{self, KeptLease};
use crate::store::{Store, StoreError};

/// A background duty that one replica at a time runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Duty {
    /// Sandboxes' timeouts (kill or pause), and old Idempotency-Keys.
    Lifecycle,
    /// Hosts marked down when silent.
    FleetWatch,
    /// Hosts' sandboxes compared with the store.
    Reconcile,
    /// Hosts' samples and log lines collected, and their retention.
    Telemetry,
    /// Notification channels' deliveries.
    Deliveries,
    /// Extensions' event hooks (each event told once, by one replica).
    EventHooks,
}

impl Duty {
    /// Every duty.
    pub const ALL: [Duty; 6] = [
        Duty::Lifecycle,
        Duty::FleetWatch,
        Duty::Reconcile,
        Duty::Telemetry,
        Duty::Deliveries,
        Duty::EventHooks,
    ];

    /// Its lease's name in the store.
    pub fn lease_name(self) -> &'static str {
        match self {
            Duty::Lifecycle => "lifecycle",
            Duty::FleetWatch => "fleet-watch",
            Duty::Reconcile => "reconcile",
            Duty::Telemetry => "telemetry",
            Duty::Deliveries => "deliveries",
            Duty::EventHooks => "event-hooks",
        }
    }
}

/// How this process runs as one of several replicas.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// This run of this process (unique among replicas, new at each start).
    pub id: String,
    /// How long a lease lasts unless renewed: a dead replica's duties are taken over within
    /// it and one renewal round.
    pub lease_life: Duration,
}

/// Why a process cannot be a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(
        "control plane replicas share a PostgreSQL store (DATABASE_URL=postgres://…): SQLite is one process's, and `wrenn up` runs alone on it"
    )]
    StoreNotShared,
}

/// One replica among several on a shared store.
#[derive(Debug)]
pub struct Replica {
    settings: ReplicaSettings,
    /// The duties' leases, once kept ([`Replica::keep_duties`]).
    duties: OnceLock<HashMap<Duty, KeptLease>>,
    /// Ends the keeping of the duties' leases (they are given up).
    stop: CancellationToken,
    keepers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Numbers this replica's turns (each turn is a holder of its own).
    turns: AtomicU64,
}

/// How long a replica's proxy keeps a sandbox's route: a pause or kill another replica made
/// is not forgotten in this one, so its traffic reads the store again this soon.
pub const ROUTE_LIFE: Duration = Duration::from_secs(1);

/// How often a replica waiting for a sandbox's turn asks again.
const TURN_POLL: Duration = Duration::from_millis(50);

impl Replica {
    /// A replica on `store`, which must be shared.
    pub fn new(store: &Store, settings: ReplicaSettings) -> Result<Replica, ReplicaError> {
        if !store.shared() {
            return Err(ReplicaError::StoreNotShared);
        }
        Ok(Replica {
            settings: ReplicaSettings {
                lease_life: settings.lease_life.max(lease::MIN_LEASE_LIFE),
                ..settings
            },
            duties: OnceLock::new(),
            stop: CancellationToken::new(),
            keepers: Mutex::new(Vec::new()),
            turns: AtomicU64::new(0),
        })
    }

    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.settings.id
    }

    /// How long its leases last unless renewed.
    pub fn lease_life(&self) -> Duration {
        self.settings.lease_life
    }

    /// Starts keeping every duty's lease (once; later calls do nothing).
    pub fn keep_duties(&self, store: &Store) {
        let mut keepers = self.keepers.lock().expect("keepers lock");
        if self.duties.get().is_some() {
            return;
        }
        let mut duties = HashMap::new();
        for duty in Duty::ALL {
            let (kept, keeper) = lease::keep(
                store.clone(),
                duty.lease_name(),
                self.settings.id.clone(),
                self.settings.lease_life,
                self.stop.clone(),
            );
            duties.insert(duty, kept);
            keepers.push(keeper);
        }
        let _ = self.duties.set(duties);
    }

    /// Whether this replica runs `duty` now (its lease's fencing token while it does).
    pub fn holds(&self, duty: Duty) -> Option<i64> {
        self.duties.get()?.get(&duty)?.token()
    }

    /// Gives every duty's lease up, once the duties have stopped, and waits for that.
    pub async fn give_up_duties(&self) {
        self.stop.cancel();
        let keepers = std::mem::take(&mut *self.keepers.lock().expect("keepers lock"));
        for keeper in keepers {
            let _ = keeper.await;
        }
    }

    /// Waits for `name`'s turn among the replicas (a sandbox, a template name, a build) and
    /// holds it, renewed, until the turn is dropped. A store that does not answer for a whole
    /// lease life is an error: a change never goes ahead without its turn.
    pub async fn turn(&self, store: &Store, name: &str) -> Result<SharedTurn, StoreError> {
        let lease_name = turn_lease_name(name);
        let holder = format!(
            "{}/{}",
            self.settings.id,
            self.turns.fetch_add(1, Ordering::Relaxed)
        );
        let life = self.settings.lease_life;
        let life_ms = i64::try_from(life.as_millis()).unwrap_or(i64::MAX);
        // Since when the store has failed without a break (none: it answers).
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            let taken =
                tokio::time::timeout(life / 3, store.take_lease(&lease_name, &holder, life_ms))
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::Unavailable(
                            "the store did not answer in time".into(),
                        ))
                    });
            match taken {
                Ok(Some(_)) => break,
                Ok(None) => failing_since = None,
                Err(error) => {
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > life {
                        tracing::warn!(turn = %lease_name, %error, "cannot take a turn in the store");
                        return Err(error);
                    }
                }
            }
            tokio::time::sleep(TURN_POLL).await;
        }
        // Renewed every third of its life until dropped, then removed at once.
        let done = CancellationToken::new();
        {
            let (store, done) = (store.clone(), done.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = done.cancelled() => break,
                        () = tokio::time::sleep(life / 3) => {
                            match store.take_lease(&lease_name, &holder, life_ms).await {
                                Ok(Some(_)) => {}
                                Ok(None) => tracing::error!(turn = %lease_name, "a turn lapsed while held (its renewals were late): another replica may change the same thing"),
                                Err(error) => tracing::warn!(turn = %lease_name, %error, "cannot renew a turn"),
                            }
                        }
                    }
                }
                if let Err(error) = store.drop_lease(&lease_name, &holder).await {
                    tracing::warn!(turn = %lease_name, %error, "cannot give a turn up: it lapses");
                }
            });
        }
        Ok(SharedTurn { renewal: done })
    }
}

/// The name of the lease that is `name`'s turn among replicas.
pub fn turn_lease_name(name: &str) -> String {
    format!("turn:{name}")
}

/// A turn among replicas, given up when dropped.
#[derive(Debug)]
pub struct SharedTurn {
    renewal: CancellationToken,
}

impl Drop for SharedTurn {
    fn drop(&mut self) {
        self.renewal.cancel();
    }
}
