//! Leases on the store: which control plane replica runs each background duty (#23). A
//! [`KeptLease`] is one replica's hold on one lease: a task takes it when it is free and
//! renews it every third of its life while held; the duty asks [`KeptLease::token`] before
//! each round and acts only while it has one. A replica that stops renewing (dead, or cut off
//! from the store) loses the lease when it expires, and another takes it with a higher fencing
//! token; a replica whose renewals fail stops counting itself the holder two thirds into the
//! lease, before anyone else may take it. A replica that stops cleanly gives its leases up.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How long a lease lasts unless renewed, by default: a dead holder's duty resumes elsewhere
/// within this and one renewal round.
pub const DEFAULT_LEASE_LIFE: Duration = Duration::from_secs(10);
/// The shortest life a lease may be kept with (each renewal is a store call).
pub const MIN_LEASE_LIFE: Duration = Duration::from_millis(300);

/// A hold: the fencing token, and until when this replica may count on it (two thirds of the
/// life from when its last renewal was asked: the store counts the life from later).
type Hold = Option<(i64, Instant)>;

/// One replica's hold on one lease, kept by a task of [`keep`].
#[derive(Debug, Clone)]
pub struct KeptLease {
    name: &'static str,
    held: watch::Receiver<Hold>,
}

impl KeptLease {
    /// The lease's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The fencing token while this replica holds the lease; `None` while it does not, and
    /// from two thirds into a hold whose renewal has not come back (stalled or failed), before
    /// any other replica may take the lease.
    pub fn token(&self) -> Option<i64> {
        let held = *self.held.borrow();
        held.and_then(|(token, until)| (Instant::now() < until).then_some(token))
    }

    /// Waits until this replica holds the lease (its token), or the keeping stopped (`None`).
    pub async fn held(&mut self) -> Option<i64> {
        loop {
            if let Some(token) = self.token() {
                return Some(token);
            }
            self.held.changed().await.ok()?;
        }
    }
}

/// Keeps lease `name` for `holder` (one run of one replica: a restarted process must be a new
/// holder) on `store`, each hold lasting `life` (at least [`MIN_LEASE_LIFE`]), until `stop`:
/// the hold, and the keeping task, which gives the lease up as it ends. Stop and await the
/// duties run under the lease before cancelling `stop`: once given up, another replica may
/// start at once.
pub fn keep(
    store: Store,
    name: &'static str,
    holder: String,
    life: Duration,
    stop: CancellationToken,
) -> (KeptLease, tokio::task::JoinHandle<()>) {
    let life = life.max(MIN_LEASE_LIFE);
    let (held_sender, held) = watch::channel(None);
    let task = tokio::spawn(async move {
        let life_ms = i64::try_from(life.as_millis()).unwrap_or(i64::MAX);
        let mut holding = false;
        loop {
            let asked = Instant::now();
            // A call that does not come back within a renewal round counts as failed.
            let taken = tokio::time::timeout(life / 3, store.take_lease(name, &holder, life_ms))
                .await
                .map_err(|_| "the store did not answer in time".to_string())
                .and_then(|answer| answer.map_err(|error| error.to_string()));
            match taken {
                Ok(Some(token)) => {
                    if !holding {
                        tracing::info!(lease = name, token, "took the lease");
                    }
                    holding = true;
                    held_sender.send_replace(Some((token, asked + life * 2 / 3)));
                }
                Ok(None) => {
                    if holding {
                        tracing::warn!(lease = name, "lost the lease to another replica");
                    }
                    holding = false;
                    held_sender.send_if_modified(|held| held.take().is_some());
                }
                // The hold's own deadline ends it if this goes on; a holder says so.
                Err(error) if holding => {
                    tracing::warn!(lease = name, %error, "cannot renew the lease");
                }
                Err(error) => tracing::debug!(lease = name, %error, "cannot take the lease"),
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(life / 3) => {}
            }
        }
        held_sender.send_if_modified(|held| held.take().is_some());
        if holding && let Err(error) = store.release_lease(name, &holder).await {
            tracing::warn!(lease = name, %error, "cannot give the lease up: it lapses");
        }
    });
    (KeptLease { name, held }, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        (store, dir)
    }

    #[tokio::test]
    async fn one_replica_holds_a_lease_and_another_takes_it_when_it_stops_or_dies() {
        let (store, _dir) = store().await;
        let life = Duration::from_secs(2);
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let (mut a, a_task) = keep(store.clone(), "duty", "a".into(), life, stop_a.clone());
        let first = a.held().await.expect("a free lease is taken");
        let (b, b_task) = keep(store.clone(), "duty", "b".into(), life, stop_b.clone());
        tokio::time::sleep(life * 2).await;
        assert_eq!(a.token(), Some(first), "renewed, the hold stays");
        assert_eq!(b.token(), None, "one holder at a time");

        // A clean stop gives the lease up: the other takes it.
        stop_a.cancel();
        a_task.await.unwrap();
        assert_eq!(a.token(), None);
        let mut b = b;
        let second = within(b.held()).await.unwrap();
        assert!(second > first, "a new holder, a higher token");

        // A holder that dies (its task gone, nothing given up) loses it when it lapses.
        let (mut c, _c_task) = keep(store.clone(), "duty", "c".into(), life, stop_b.clone());
        b_task.abort();
        let taken = within(c.held()).await.unwrap();
        assert!(taken > second);
        stop_b.cancel();
    }

    #[test]
    fn a_hold_whose_renewal_did_not_come_back_stops_counting_at_its_deadline() {
        let (sender, held) = watch::channel(Some((7, Instant::now() + Duration::from_secs(60))));
        let lease = KeptLease { name: "duty", held };
        assert_eq!(lease.token(), Some(7));
        sender.send_replace(Some((7, Instant::now() - Duration::from_millis(1))));
        assert_eq!(
            lease.token(),
            None,
            "past its deadline, with no renewal since"
        );
    }

    /// `future`'s answer, which must come within five seconds.
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("within five seconds")
    }
}
