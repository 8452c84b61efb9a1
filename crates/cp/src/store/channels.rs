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
