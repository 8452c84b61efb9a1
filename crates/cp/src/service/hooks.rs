//! Hooks: what code built on the control plane (an extension, see `crate::server`) may add to
//! its work without forking it. A hook may refuse a sandbox before it is created (a quota of
//! its own, an allow-list), with a reason the caller reads; and it is told of every event, in
//! order, off the API's path ([`ControlPlane::run_event_hooks`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{ControlPlane, Error, SandboxRequest};
use crate::events::Follower;
use crate::store::{EventRow, LogQuery};

/// A hook's refusal of a sandbox: the reason the caller is given (a 403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// What an extension hooks into. Every method has a default that does nothing.
#[async_trait::async_trait]
pub trait Hooks: Send + Sync + std::fmt::Debug {
    /// Called before a team's sandbox is created, with the request as given (its template as
    /// named, before it is resolved), before quotas and placement: a refusal ends the create,
    /// and nothing was made. Forks are not asked (their sandbox's template was allowed).
    async fn before_create(
        &self,
        _team_id: &str,
        _request: &SandboxRequest,
    ) -> Result<(), Refusal> {
        Ok(())
    }

    /// Called once for every event, in the store's order, after it was recorded. It runs off
    /// the API's path: a slow hook delays the next event's hooks, never a caller.
    async fn on_event(&self, _event: &EventRow) {}
}

/// How many events the hooks' follower reads from the store at once.
const HOOK_PAGE: usize = 100;

impl ControlPlane {
    /// The hooks' verdict on a create: the first refusal, as [`Error::Refused`].
    pub(super) async fn check_create(
        &self,
        team_id: &str,
        request: &SandboxRequest,
    ) -> Result<(), Error> {
        for hooks in &self.hooks {
            if let Err(Refusal(reason)) = hooks.before_create(team_id, request).await {
                return Err(Error::Refused(reason));
            }
        }
        Ok(())
    }

    /// Tells every hook of every event recorded from now on (and those other replicas record),
    /// in order, until `shutdown`. Returns at once when there is no hook.
    pub async fn run_event_hooks(self: Arc<Self>, shutdown: CancellationToken) {
        if self.hooks.is_empty() {
            return;
        }
        let bus = self.store.bus().subscribe();
        let after = match self.store.last_event_seq().await {
            Ok(seq) => seq,
            Err(error) => {
                tracing::error!(%error, "the event hooks cannot read the store: not run");
                return;
            }
        };
        let query = LogQuery {
            team_id: None,
            after,
            limit: HOOK_PAGE,
            ..LogQuery::default()
        };
        let mut follower = Follower::new(self.store.clone(), query, bus);
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                event = follower.next() => event,
            };
            let Some(event) = event else { return };
            for hooks in &self.hooks {
                hooks.on_event(&event).await;
            }
        }
    }
}
