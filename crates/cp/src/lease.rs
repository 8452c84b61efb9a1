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

/// One replica's hold on one lease, kept by a task of [`keep`].
#[derive(Debug, Clone)]
pub struct KeptLease {
    name: &'static str,
    held: watch::Receiver<Option<i64>>,
}

impl KeptLease {
    /// The lease's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The fencing token while this replica holds the lease; `None` while it does not.
    pub fn token(&self) -> Option<i64> {
        *self.held.borrow()
    }

    /// Waits until this replica holds the lease (its token), or the keeping stopped (`None`).
    pub async fn held(&mut self) -> Option<i64> {
        let held = self.held.wait_for(Option::is_some).await.ok()?;
        *held
    }
}

/// Keeps lease `name` for `holder` (a replica's id) on `store`, each hold lasting `life`,
/// until `stop`: the hold, and the keeping task (which gives the lease up as it ends).
pub fn keep(
    store: Store,
    name: &'static str,
    holder: String,
    life: Duration,
    stop: CancellationToken,
) -> (KeptLease, tokio::task::JoinHandle<()>) {
    let (held_sender, held) = watch::channel(None);
    let task = tokio::spawn(async move {
        let life_ms = i64::try_from(life.as_millis()).unwrap_or(i64::MAX);
        // When the last successful take was asked: the hold lasts `life` from then at least.
        let mut taken_at: Option<Instant> = None;
        loop {
            let asked = Instant::now();
            match store.take_lease(name, &holder, life_ms).await {
                Ok(Some(token)) => {
                    if taken_at.is_none() {
                        tracing::info!(lease = name, token, "took the lease");
                    }
                    taken_at = Some(asked);
                    held_sender.send_if_modified(|held| replace(held, Some(token)));
                }
                Ok(None) => {
                    if taken_at.take().is_some() {
                        tracing::warn!(lease = name, "lost the lease to another replica");
                    }
                    held_sender.send_if_modified(|held| replace(held, None));
                }
                Err(error) => {
                    tracing::warn!(lease = name, %error, "cannot renew the lease");
                    // Not renewed: stop acting two thirds in, before another may take it.
                    if taken_at.is_some_and(|at| at.elapsed() >= life * 2 / 3) {
                        taken_at = None;
                        held_sender.send_if_modified(|held| replace(held, None));
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(life / 3) => {}
            }
        }
        held_sender.send_if_modified(|held| replace(held, None));
        if taken_at.is_some()
            && let Err(error) = store.release_lease(name, &holder).await
        {
            tracing::warn!(lease = name, %error, "cannot give the lease up: it lapses");
        }
    });
    (KeptLease { name, held }, task)
}

/// Sets `held` to `value`: whether it changed.
fn replace(held: &mut Option<i64>, value: Option<i64>) -> bool {
    let changed = *held != value;
    *held = value;
    changed
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
        let life = Duration::from_millis(300);
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

    /// `future`'s answer, which must come within five seconds.
    async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("within five seconds")
    }
}
