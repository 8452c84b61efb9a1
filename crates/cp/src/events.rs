//! Events: every lifecycle change (a sandbox created, paused, resumed, timed out, killed or
//! failed; a host up or down; a snapshot taken; a template built; a key made or revoked) is
//! recorded once in the store ([`crate::store::EventRow`]) with its time, team, actor and
//! subject, and published on the store's in-process bus, which live streams and (later)
//! notification channels follow. The actor is the caller the API authenticated, set for the
//! request's task by [`acting_as`]; work of the plane's own loops is `system`'s.

use std::future::Future;

use serde_json::Value;

use crate::store::{EventRow, Store};

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
