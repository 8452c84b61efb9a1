//! The bodies of the notification channel routes (`/v1/channels…`): a team's channels, the
//! one made (with its webhook secret, shown once), a change, and the delivery log.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/channels`: a new channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct NewChannel {
    /// 1 to 100 characters.
    pub name: String,
    /// `webhook` (the event as JSON, signed as Standard Webhooks sign), `slack` or `discord`
    /// (their incoming webhooks).
    pub kind: String,
    /// An http(s) URL whose host is a public address.
    pub url: String,
    /// The event types it gets (`sandbox.created`, …); absent or empty: every type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// A webhook's signing secret (`whsec_` and base64 of 24 to 64 bytes); made when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `PATCH /v1/channels/{id}`: what is given changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct UpdateChannel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The event types it gets (empty: every type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// Enabling a channel clears its failures; its pending deliveries go out again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// A channel of the team.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Channel {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub url: String,
    /// The event types it gets (empty: every type).
    pub events: Vec<String>,
    pub enabled: bool,
    /// Deliveries given up in a row.
    pub consecutive_failures: i64,
    /// Why the control plane disabled it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// The webhook's signing secret: in the answer to `POST /v1/channels` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// One event's delivery to a channel (`GET /v1/channels/{id}/deliveries`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelDelivery {
    pub id: i64,
    /// The event's `seq` (`GET /v1/events`).
    pub event_seq: i64,
    /// `pending`, `delivered` or `failed` (given up).
    pub state: String,
    pub attempts: i64,
    /// RFC 3339: when a pending delivery's next attempt may start.
    pub next_attempt_at: String,
    /// The receiver's last HTTP status (0: it did not answer).
    pub last_status: i64,
    pub last_error: String,
    /// RFC 3339.
    pub updated_at: String,
}
