//! Events: every lifecycle change (a sandbox created, paused, resumed, timed out, killed or
//! failed; a host up or down; a snapshot taken; a template built; a key made or revoked) is
//! recorded once in the store ([`crate::store::EventRow`]) with its time, team, actor and
//! subject, and published on the store's in-process bus, which live streams and (later)
//! notification channels follow. The actor is the caller the API authenticated, set for the
//! request's task by [`acting_as`]; work of the plane's own loops is `system`'s.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use serde_json::Value;

use crate::store::{EventRow, LogQuery, Store};

wrenn_core::named_enum! {
    /// What an event says happened.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum EventKind {
        SandboxCreated = "sandbox.created",
        SandboxPaused = "sandbox.paused",
        SandboxResumed = "sandbox.resumed",
        SandboxTimedOut = "sandbox.timed_out",
        SandboxKilled = "sandbox.killed",
        /// A create no host could carry out.
        SandboxFailed = "sandbox.failed",
        SnapshotCreated = "snapshot.created",
        HostUp = "host.up",
        HostDown = "host.down",
        TemplateBuilt = "template.built",
        TemplateBuildFailed = "template.build_failed",
        KeyCreated = "key.created",
        KeyRevoked = "key.revoked",
        /// A test a team asked one of its notification channels for (`crate::channels`).
        ChannelTest = "channel.test",
        /// A notification channel the control plane disabled after deliveries failed.
        ChannelDisabled = "channel.disabled",
    }
}

/// The actor of work no caller asked for (timeouts, the fleet's watch).
pub const SYSTEM_ACTOR: &str = "system";

tokio::task_local! {
    static ACTOR: String;
}

/// Runs `work` with `actor` as the actor of the events it records.
pub async fn acting_as<F: Future>(actor: String, work: F) -> F::Output {
    ACTOR.scope(actor, work).await
}

/// The actor of the current task's events: the API's caller, or [`SYSTEM_ACTOR`].
pub fn current_actor() -> String {
    ACTOR
        .try_with(Clone::clone)
        .unwrap_or_else(|_| SYSTEM_ACTOR.to_string())
}

/// How many events the bus holds for a slow follower before it must read the store again.
pub const BUS_CAPACITY: usize = 1024;

impl Store {
    /// Records an event by the current actor and publishes it on the bus. The change it
    /// reports has happened: a store that cannot keep the event is logged, not returned.
    pub async fn publish(&self, kind: EventKind, team_id: &str, subject: &str, data: Value) {
        let Ok(id) = crate::auth::random_uuid() else {
            tracing::error!(event = %kind, subject, "no randomness for an event's id: not recorded");
            return;
        };
        let mut event = EventRow {
            seq: 0,
            id,
            at_ms: wrenn_core::now_ms(),
            team_id: team_id.to_string(),
            actor: current_actor(),
            kind: kind.as_str().to_string(),
            subject: subject.to_string(),
            data,
        };
        match self.add_event(event.clone()).await {
            Ok(seq) => {
                event.seq = seq;
                // No follower is no error.
                let _ = self.bus().send(event);
            }
            Err(error) => {
                tracing::error!(event = %kind, subject, %error, "an event was not recorded")
            }
        }
    }
}

/// How often a follower reads the store though its bus said nothing (events another replica
/// of the control plane recorded reach it so).
pub const FOLLOW_POLL: Duration = Duration::from_secs(2);

/// A reader of the events after a cursor, in order, each once: it reads the store, and waits
/// on the bus (or [`FOLLOW_POLL`]) when it has read everything. A follower that lags behind
/// the bus loses nothing: the store has every event.
#[derive(Debug)]
pub struct Follower {
    store: Store,
    query: LogQuery,
    bus: tokio::sync::broadcast::Receiver<EventRow>,
    ready: VecDeque<EventRow>,
}

impl Follower {
    /// Follows the events `query` selects after `query.after`, `query.limit` read at a time.
    /// Subscribe `bus` before reading the cursor, so nothing recorded in between is missed.
    pub fn new(
        store: Store,
        query: LogQuery,
        bus: tokio::sync::broadcast::Receiver<EventRow>,
    ) -> Follower {
        Follower {
            store,
            query,
            bus,
            ready: VecDeque::new(),
        }
    }

    /// The next event after the cursor, waiting for one; None when the store fails.
    pub async fn next(&mut self) -> Option<EventRow> {
        loop {
            if let Some(row) = self.ready.pop_front() {
                self.query.after = row.seq;
                return Some(row);
            }
            match self.store.events(self.query.clone()).await {
                Ok(rows) if !rows.is_empty() => {
                    self.ready.extend(rows);
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "an event follower cannot read the store: ended");
                    return None;
                }
            }
            // Woken by the bus (or its lag, which the store's read makes up for), or by the
            // poll for other replicas' events.
            let _ = tokio::time::timeout(FOLLOW_POLL, self.bus.recv()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_carry_the_scoped_actor_and_reach_the_bus_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut bus = store.bus().subscribe();
        store
            .publish(
                EventKind::HostUp,
                "",
                "h1",
                serde_json::json!({"name": "a"}),
            )
            .await;
        acting_as("key:k1".into(), async {
            store
                .publish(EventKind::SandboxCreated, "t1", "sb1", Value::Null)
                .await
        })
        .await;
        let first = bus.recv().await.unwrap();
        let second = bus.recv().await.unwrap();
        assert_eq!(
            (first.kind.as_str(), first.actor.as_str()),
            ("host.up", "system")
        );
        assert_eq!(
            (second.kind.as_str(), second.actor.as_str()),
            ("sandbox.created", "key:k1")
        );
        assert!(second.seq > first.seq);
        let query = crate::store::LogQuery {
            team_id: Some("t1".into()),
            limit: 10,
            ..Default::default()
        };
        assert_eq!(store.events(query).await.unwrap(), vec![second]);
        assert_eq!(store.last_event_seq().await.unwrap(), 2);
    }
}
