//! Notification channels: where a team's events go besides the event log. A channel is a
//! webhook (the event as JSON, signed as Standard Webhooks sign), or a Slack- or
//! Discord-compatible incoming webhook (one readable line) ([`ChannelKind`]), with an optional
//! filter of event types. Its URL and secret are sealed before the store keeps them
//! ([`secrets`]). Each event a channel is to get is a row of the store's outbox, made in the
//! event's own transaction; the [`Deliverer`] ([`run_deliveries`], a background task, never
//! the API's request path) sends each channel its rows in event order, retries with
//! exponential back-off, gives a row up after [`ChannelPolicy::max_attempts`], and disables a
//! channel whose deliveries keep failing. A restart loses nothing: the rows wait in the store.
//! The team's calls on its channels (create, change, test, …) are [`manage`]'s; the HTTP
//! sending and the payloads [`deliver`]'s. The REST routes are `crate::http`'s.

pub mod deliver;
pub mod manage;
pub mod secrets;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wrenn_core::now_ms;

use crate::events::EventKind;
use crate::store::{DeliveryRow, DeliveryState, LogQuery, Store, StoreResult};
pub use deliver::Failure;
pub use secrets::SecretBox;

wrenn_core::named_enum! {
    /// What a channel sends and how.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum ChannelKind {
        /// The event as JSON, signed (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
        Webhook = "webhook",
        /// A Slack incoming webhook: `{"text": …}`.
        Slack = "slack",
        /// A Discord webhook: `{"content": …}`.
        Discord = "discord",
    }
}

/// How channels are delivered to; the defaults are production's, tests shorten them.
#[derive(Debug, Clone)]
pub struct ChannelPolicy {
    /// The longest one attempt may take, answer included.
    pub timeout: Duration,
    /// The wait before the second attempt; each later one waits twice the one before …
    pub first_retry: Duration,
    /// … up to this.
    pub max_retry: Duration,
    /// Attempts of one delivery before it is given up (`failed`).
    pub max_attempts: u32,
    /// Deliveries given up in a row that disable their channel.
    pub disable_after: u32,
    /// Whether channels may point at loopback, private or link-local addresses. Off, a URL
    /// whose host resolves to one is refused at create and at every delivery (DNS may change).
    pub allow_private: bool,
    /// How often the deliverer reads the outbox though nothing woke it (another replica's
    /// events reach it so).
    pub poll: Duration,
    /// How long the delivery log keeps a delivered or given-up delivery (pruned hourly).
    pub log_retention: Duration,
}

impl Default for ChannelPolicy {
    fn default() -> Self {
        ChannelPolicy {
            timeout: Duration::from_secs(10),
            first_retry: Duration::from_secs(1),
            max_retry: Duration::from_secs(300),
            max_attempts: 8,
            disable_after: 5,
            allow_private: false,
            poll: Duration::from_secs(5),
            log_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl ChannelPolicy {
    /// The wait after the `attempts`th failed attempt: `first_retry` doubled each time, at
    /// most `max_retry`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        self.first_retry
            .saturating_mul(1 << doublings)
            .min(self.max_retry)
    }
}

/// What the control plane's channel calls need: the sealing key and the policy.
#[derive(Debug, Clone)]
pub struct Channels {
    pub secrets: SecretBox,
    pub policy: ChannelPolicy,
}

/// Sends the outbox's rows ([`run_deliveries`] runs one).
#[derive(Debug)]
pub struct Deliverer {
    store: Store,
    secrets: SecretBox,
    policy: ChannelPolicy,
    client: deliver::Sender,
    /// The channels with an attempt under way: a channel has one at a time (its order), the
    /// channels run side by side (a slow receiver delays only its own channel).
    in_flight: Mutex<InFlight>,
    /// Told when an attempt ends: its channel's next row may be due.
    ended: Notify,
}

/// The attempts under way, and when each channel's last one ended.
#[derive(Debug, Default)]
struct InFlight {
    running: HashSet<String>,
    /// Counts ended attempts: a head read before its channel's last attempt ended is stale
    /// (that attempt may have delivered it).
    ended: u64,
    last_ended: HashMap<String, u64>,
}

impl Deliverer {
    pub fn new(store: Store, secrets: SecretBox, policy: ChannelPolicy) -> Result<Self, String> {
        let client = deliver::Sender::new(&policy)?;
        Ok(Deliverer {
            store,
            secrets,
            policy,
            client,
            in_flight: Mutex::default(),
            ended: Notify::new(),
        })
    }

    /// Starts, in `tasks`, an attempt of every channel's next delivery that is due and whose
    /// channel has none under way. Its answer: when the next one not yet due is (`None`:
    /// none is waiting).
    pub async fn start_due(self: &Arc<Self>, tasks: &mut JoinSet<()>) -> StoreResult<Option<i64>> {
        let read_at = self.in_flight.lock().expect("in-flight lock").ended;
        let heads = self.store.pending_heads().await?;
        let now = now_ms();
        let mut next = None;
        let mut in_flight = self.in_flight.lock().expect("in-flight lock");
        for head in heads {
            let stale =
                (in_flight.last_ended.get(&head.channel_id)).is_some_and(|at| *at > read_at);
            if in_flight.running.contains(&head.channel_id) || stale {
                continue;
            }
            if head.next_attempt_at_ms > now {
                next = Some(next.map_or(head.next_attempt_at_ms, |at: i64| {
                    at.min(head.next_attempt_at_ms)
                }));
                continue;
            }
            in_flight.running.insert(head.channel_id.clone());
            let deliverer = self.clone();
            tasks.spawn(async move {
                let channel = head.channel_id.clone();
                if let Err(error) = deliverer.attempt(head).await {
                    tracing::warn!(%channel, %error, "a channel delivery could not be recorded");
                }
                {
                    let mut in_flight = deliverer.in_flight.lock().expect("in-flight lock");
                    in_flight.running.remove(&channel);
                    in_flight.ended += 1;
                    let ended = in_flight.ended;
                    in_flight.last_ended.insert(channel, ended);
                }
                deliverer.ended.notify_one();
            });
        }
        Ok(next)
    }

    /// One attempt of `delivery`, recorded.
    async fn attempt(&self, mut delivery: DeliveryRow) -> StoreResult<()> {
        let Some(channel) = self.store.channel(&delivery.channel_id).await? else {
            return Ok(());
        };
        let query = LogQuery {
            after: delivery.event_seq - 1,
            limit: 1,
            ..LogQuery::default()
        };
        let event = (self.store.events(query).await?)
            .into_iter()
            .find(|event| event.seq == delivery.event_seq);
        let outcome = match event {
            Some(event) => {
                self.client
                    .send(&channel, &event, &self.secrets, &self.policy)
                    .await
            }
            None => Err(Failure::permanent("the event is no longer stored")),
        };
        let now = now_ms();
        delivery.attempts += 1;
        delivery.updated_at_ms = now;
        match outcome {
            Ok(status) => {
                delivery.state = DeliveryState::Delivered.as_str().into();
                delivery.last_status = i64::from(status);
                delivery.last_error = String::new();
                self.store.update_delivery(delivery).await?;
                self.store.count_delivery(&channel.id, true, 0, "").await
            }
            Err(failure) => {
                delivery.last_status = i64::from(failure.status);
                delivery.last_error = failure.error.clone();
                let attempts = u32::try_from(delivery.attempts).unwrap_or(u32::MAX);
                if !failure.permanent && attempts < self.policy.max_attempts {
                    let wait = self.policy.backoff(attempts).as_millis() as i64;
                    delivery.next_attempt_at_ms = now + wait;
                    tracing::debug!(channel = %channel.id, seq = delivery.event_seq, attempts, error = %failure.error, "a channel delivery failed: retried");
                    return self.store.update_delivery(delivery).await;
                }
                tracing::warn!(channel = %channel.id, seq = delivery.event_seq, attempts, error = %failure.error, "a channel delivery is given up");
                delivery.state = DeliveryState::Failed.as_str().into();
                self.store.update_delivery(delivery).await?;
                let reason = format!(
                    "{} deliveries in a row failed (the last: {})",
                    self.policy.disable_after, failure.error
                );
                let disable_after = i64::from(self.policy.disable_after.max(1));
                self.store
                    .count_delivery(&channel.id, false, disable_after, &reason)
                    .await?;
                let now_disabled = (self.store.channel(&channel.id).await?)
                    .is_some_and(|after| channel.enabled && !after.enabled);
                if now_disabled {
                    tracing::warn!(channel = %channel.id, team = %channel.team_id, %reason, "a channel is disabled");
                    self.store
                        .publish(
                            EventKind::ChannelDisabled,
                            &channel.team_id,
                            &channel.id,
                            json!({ "name": channel.name, "reason": reason }),
                        )
                        .await;
                }
                Ok(())
            }
        }
    }
}

/// How often the deliverer prunes the delivery log ([`ChannelPolicy::log_retention`]).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Delivers the outbox until `shutdown`: woken by every event the store's bus carries, when
/// an attempt ends, when a retry is due, and every [`ChannelPolicy::poll`] in any case. An
/// attempt cut short by `shutdown` stays pending and is made again by the next deliverer (a
/// receiver may get an event twice, never none: `webhook-id` tells repeats apart).
pub async fn run_deliveries(
    store: Store,
    secrets: SecretBox,
    policy: ChannelPolicy,
    shutdown: CancellationToken,
) {
    let mut bus = store.bus().subscribe();
    let poll = policy.poll;
    let deliverer = match Deliverer::new(store, secrets, policy) {
        Ok(deliverer) => Arc::new(deliverer),
        Err(error) => {
            tracing::error!(%error, "no channel deliveries: the HTTP client could not be made");
            return;
        }
    };
    // Dropped (every attempt under way aborted) when this returns.
    let mut tasks = JoinSet::new();
    let mut pruned_at: Option<std::time::Instant> = None;
    loop {
        if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            pruned_at = Some(std::time::Instant::now());
            let retention = deliverer.policy.log_retention.as_millis() as i64;
            match deliverer.store.prune_deliveries(now_ms() - retention).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "old deliveries left the delivery log"),
                Err(error) => tracing::warn!(%error, "the delivery log could not be pruned"),
            }
        }
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = deliverer.start_due(&mut tasks) => next,
        };
        while tasks.try_join_next().is_some() {}
        let wait = match next {
            Ok(Some(at)) => Duration::from_millis((at - now_ms()).max(0) as u64).min(poll),
            Ok(None) => poll,
            Err(error) => {
                tracing::warn!(%error, "the channel outbox could not be read");
                poll
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            woken = bus.recv() => {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = woken {
                    tokio::time::sleep(wait).await;
                }
            }
            () = deliverer.ended.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_up_to_its_cap() {
        let policy = ChannelPolicy::default();
        let waits: Vec<u64> = (1..=11).map(|n| policy.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(policy.backoff(u32::MAX).as_secs(), 300);
    }
}
