//! The store's rows of notification channels ([`ChannelRow`]) and of their outbox
//! ([`DeliveryRow`]: one per event a channel is to get, made by the store in the event's own
//! transaction, migration 0010). What a channel is and how a delivery is made are
//! `crate::channels`'; this holds only what is kept.

use serde::{Deserialize, Serialize};

/// A team's notification channel, as stored: its URL and secret sealed (`crate::channels::secrets`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRow {
    pub id: String,
    pub team_id: String,
    pub name: String,
    /// `webhook`, `slack` or `discord` (`crate::channels::ChannelKind`).
    pub kind: String,
    pub url_sealed: String,
    /// The webhook's signing secret, sealed; empty for a kind that does not sign.
    pub secret_sealed: String,
    /// The event types it gets, as `,type,type,` (see [`ChannelRow::filter_of`]); empty for all.
    pub events: String,
    pub enabled: bool,
    /// Deliveries given up in a row; reset by one delivered or by enabling the channel.
    pub consecutive_failures: i64,
    /// Why the control plane disabled it (empty when it did not).
    pub disabled_reason: String,
    pub created_at_ms: i64,
}

impl ChannelRow {
    /// The stored filter of these event types: `,a,b,`, or empty (every type) for none.
    pub fn filter_of(kinds: &[String]) -> String {
        if kinds.is_empty() {
            String::new()
        } else {
            format!(",{},", kinds.join(","))
        }
    }

    /// The event types of its filter (empty: every type).
    pub fn event_kinds(&self) -> Vec<String> {
        self.events
            .split(',')
            .filter(|kind| !kind.is_empty())
            .map(str::to_string)
            .collect()
    }
}

wrenn_core::named_enum! {
    /// Where a delivery is: waiting for its (next) attempt, delivered, or given up.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum DeliveryState {
        #[default]
        Pending = "pending",
        Delivered = "delivered",
        Failed = "failed",
    }
}

/// One event to deliver to one channel: a row of the outbox and, once done, of its log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRow {
    pub id: i64,
    pub channel_id: String,
    /// The event's `seq` (`crate::store::EventRow`): the order a channel gets its events in.
    pub event_seq: i64,
    /// `pending`, `delivered` or `failed` ([`DeliveryState`]).
    pub state: String,
    pub attempts: i64,
    /// When its next attempt may start (0: at once).
    pub next_attempt_at_ms: i64,
    /// The receiver's last HTTP status (0: none, the attempt failed before an answer).
    pub last_status: i64,
    pub last_error: String,
    pub updated_at_ms: i64,
}

/// The clause of every enabled channel's oldest pending delivery (`pending_heads`).
pub(super) const PENDING_HEADS: &str = "WHERE state = 'pending'
    AND channel_id IN (SELECT id FROM channels WHERE enabled = TRUE)
    AND event_seq = (SELECT MIN(o.event_seq) FROM channel_deliveries o
        WHERE o.channel_id = channel_deliveries.channel_id AND o.state = 'pending')
    ORDER BY channel_id";

/// `count_delivery`'s statement, its placeholders made by `mark` (1-based): the channel's id,
/// whether the delivery was made, how many failures in a row disable it, the reason.
pub(super) fn count_delivery_sql(mark: fn(usize) -> String) -> String {
    let (id, delivered, after, reason) = (mark(1), mark(2), mark(3), mark(4));
    let disables = format!("NOT {delivered} AND consecutive_failures + 1 >= {after}");
    format!(
        "UPDATE channels SET
            consecutive_failures = CASE WHEN {delivered} THEN 0 ELSE consecutive_failures + 1 END,
            enabled = CASE WHEN {disables} THEN FALSE ELSE enabled END,
            disabled_reason = CASE WHEN {disables} THEN {reason} ELSE disabled_reason END
         WHERE id = {id}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EventRow, Store};

    fn channel(id: &str, team: &str, events: &[&str], enabled: bool) -> ChannelRow {
        let kinds: Vec<String> = events.iter().map(|kind| kind.to_string()).collect();
        ChannelRow {
            id: id.into(),
            team_id: team.into(),
            name: id.into(),
            kind: "webhook".into(),
            url_sealed: "v1:sealed".into(),
            events: ChannelRow::filter_of(&kinds),
            enabled,
            created_at_ms: 1,
            ..ChannelRow::default()
        }
    }

    async fn seqs(store: &Store, channel: &str) -> Vec<i64> {
        let rows = store.deliveries_of(channel, 100).await.unwrap();
        rows.into_iter().map(|row| row.event_seq).collect()
    }

    async fn heads(store: &Store) -> Vec<(String, i64)> {
        let rows = store.pending_heads().await.unwrap();
        rows.into_iter()
            .map(|row| (row.channel_id, row.event_seq))
            .collect()
    }

    #[tokio::test]
    async fn events_fan_out_to_their_teams_matching_enabled_channels_in_order() {
        for (backend, store, _dir) in super::super::tests::backends().await {
            store
                .add_channel(channel("c1", "a", &[], true))
                .await
                .unwrap();
            let killed = channel("c2", "a", &["sandbox.killed"], true);
            store.add_channel(killed.clone()).await.unwrap();
            store
                .add_channel(channel("c3", "a", &[], false))
                .await
                .unwrap();
            store
                .add_channel(channel("c4", "b", &[], true))
                .await
                .unwrap();
            assert_eq!(killed.event_kinds(), ["sandbox.killed"]);
            for (i, (team, kind, subject)) in [
                ("a", "sandbox.created", "s1"),
                ("a", "sandbox.killed", "s1"),
                ("", "host.down", "h1"),
                ("b", "sandbox.created", "s2"),
                ("a", "channel.test", "c2"),
            ]
            .into_iter()
            .enumerate()
            {
                let event = EventRow {
                    id: format!("e{i}"),
                    at_ms: 10 + i as i64,
                    team_id: team.into(),
                    kind: kind.into(),
                    subject: subject.into(),
                    ..EventRow::default()
                };
                assert_eq!(store.add_event(event).await.unwrap(), i as i64 + 1);
            }
            assert_eq!(seqs(&store, "c1").await, [2, 1], "{backend}: newest first");
            assert_eq!(
                seqs(&store, "c2").await,
                [5, 2],
                "{backend}: its type, and its test"
            );
            assert!(seqs(&store, "c3").await.is_empty(), "{backend}: disabled");
            assert_eq!(
                seqs(&store, "c4").await,
                [4],
                "{backend}: the fleet's go nowhere"
            );
            let expected = |list: &[(&str, i64)]| -> Vec<(String, i64)> {
                list.iter().map(|(c, s)| (c.to_string(), *s)).collect()
            };
            assert_eq!(
                heads(&store).await,
                expected(&[("c1", 1), ("c2", 2), ("c4", 4)]),
                "{backend}"
            );

            let mut first = store.deliveries_of("c1", 100).await.unwrap().pop().unwrap();
            first.state = DeliveryState::Delivered.as_str().into();
            first.attempts = 2;
            first.last_status = 204;
            store.update_delivery(first.clone()).await.unwrap();
            assert_eq!(
                heads(&store).await,
                expected(&[("c1", 2), ("c2", 2), ("c4", 4)]),
                "{backend}: a channel's next row waits for the one before"
            );
            assert_eq!(store.deliveries_of("c1", 100).await.unwrap()[1], first);

            for _ in 0..2 {
                store
                    .count_delivery("c2", false, 2, "it failed")
                    .await
                    .unwrap();
            }
            let c2 = store.channel("c2").await.unwrap().unwrap();
            assert_eq!(
                (
                    c2.enabled,
                    c2.consecutive_failures,
                    c2.disabled_reason.as_str()
                ),
                (false, 2, "it failed"),
                "{backend}"
            );
            assert_eq!(
                heads(&store).await,
                expected(&[("c1", 2), ("c4", 4)]),
                "{backend}"
            );
            store.count_delivery("c4", false, 2, "x").await.unwrap();
            store.count_delivery("c4", true, 2, "").await.unwrap();
            let c4 = store.channel("c4").await.unwrap().unwrap();
            assert_eq!(
                (c4.enabled, c4.consecutive_failures),
                (true, 0),
                "{backend}"
            );

            let enabled = ChannelRow {
                enabled: true,
                consecutive_failures: 0,
                disabled_reason: String::new(),
                ..c2
            };
            assert!(store.update_channel(enabled.clone()).await.unwrap());
            assert_eq!(store.channel("c2").await.unwrap(), Some(enabled));
            assert_eq!(store.channels_of("a").await.unwrap().len(), 3, "{backend}");
            assert!(store.delete_channel("c1").await.unwrap());
            assert!(!store.delete_channel("c1").await.unwrap());
            assert!(
                seqs(&store, "c1").await.is_empty(),
                "{backend}: its log too"
            );
            assert_eq!(
                heads(&store).await,
                expected(&[("c2", 2), ("c4", 4)]),
                "{backend}"
            );
        }
    }

    #[tokio::test]
    async fn pruning_forgets_old_finished_deliveries_and_keeps_pending_ones() {
        for (backend, store, _dir) in super::super::tests::backends().await {
            store
                .add_channel(channel("p1", "a", &[], true))
                .await
                .unwrap();
            for i in 0..3 {
                let event = EventRow {
                    id: format!("p{i}"),
                    at_ms: 10,
                    team_id: "a".into(),
                    kind: "sandbox.created".into(),
                    ..EventRow::default()
                };
                store.add_event(event).await.unwrap();
            }
            let mut rows = store.deliveries_of("p1", 100).await.unwrap();
            rows.sort_by_key(|row| row.event_seq);
            // The first delivered long ago, the second given up lately, the third pending.
            for (row, state, at) in [
                (&rows[0], DeliveryState::Delivered, 100),
                (&rows[1], DeliveryState::Failed, 5_000),
            ] {
                let mut row = row.clone();
                row.state = state.as_str().into();
                row.updated_at_ms = at;
                store.update_delivery(row).await.unwrap();
            }
            assert_eq!(store.prune_deliveries(1_000).await.unwrap(), 1, "{backend}");
            let left: Vec<i64> = seqs(&store, "p1").await;
            assert_eq!(left, [rows[2].event_seq, rows[1].event_seq], "{backend}");
            assert_eq!(
                store.prune_deliveries(i64::MAX).await.unwrap(),
                1,
                "{backend}: pending stays"
            );
            assert_eq!(seqs(&store, "p1").await, [rows[2].event_seq], "{backend}");
        }
    }
}
