//! A team's calls on its notification channels, as the control plane answers them: create
//! (the webhook secret made and shown once), list, read, change (enabling again clears the
//! failures), delete, test (a `channel.test` event for that channel alone) and the delivery
//! log. Writes take an admin or owner key; another team's channel is not found. It returns
//! [`Error`] by cause and knows no HTTP.

use serde_json::json;

use super::{ChannelKind, Channels, deliver, secrets};
use crate::events::EventKind;
use crate::service::keys::require_role;
use crate::store::{ChannelRow, DeliveryRow, Role};
use crate::{ControlPlane, Error};

/// The longest channel name.
const MAX_NAME: usize = 100;

/// A channel a team asks for.
#[derive(Debug, Clone, Default)]
pub struct NewChannel {
    pub name: String,
    /// `webhook`, `slack` or `discord`.
    pub kind: String,
    pub url: String,
    /// The event types it gets (empty: every type).
    pub events: Vec<String>,
    /// A webhook's signing secret (`whsec_…`); made when not given.
    pub secret: Option<String>,
}

/// A change of a channel: what is given changes.
#[derive(Debug, Clone, Default)]
pub struct ChannelChange {
    pub name: Option<String>,
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

/// A channel as its team sees it: the row with its URL opened (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    pub row: ChannelRow,
    pub url: String,
}

fn check_name(name: &str) -> Result<String, Error> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(Error::InvalidRequest(format!(
            "a channel's name is 1 to {MAX_NAME} characters"
        )));
    }
    Ok(name.to_string())
}

/// The stored filter of `events`, each an event type wrenn records.
fn check_events(events: &[String]) -> Result<String, Error> {
    let mut kinds: Vec<String> = Vec::new();
    for name in events {
        if EventKind::from_name(name).is_none() {
            let known: Vec<&str> = EventKind::ALL.iter().map(|kind| kind.as_str()).collect();
            return Err(Error::InvalidRequest(format!(
                "unknown event type {name:?}: one of {}",
                known.join(", ")
            )));
        }
        if !kinds.contains(name) {
            kinds.push(name.clone());
        }
    }
    Ok(ChannelRow::filter_of(&kinds))
}

impl ControlPlane {
    /// The channels' key and policy, if this control plane delivers to channels.
    fn channel_settings(&self) -> Result<&Channels, Error> {
        self.channels.as_ref().ok_or_else(|| {
            Error::Internal("notification channels are not configured on this control plane".into())
        })
    }

    async fn checked_url(&self, url: &str) -> Result<String, Error> {
        let settings = self.channel_settings()?;
        let url = url.trim();
        deliver::check_url(url, settings.policy.allow_private)
            .await
            .map_err(Error::InvalidRequest)?;
        Ok(url.to_string())
    }

    fn view(&self, row: ChannelRow) -> Result<ChannelView, Error> {
        let url = (self.channel_settings()?.secrets)
            .open(&row.url_sealed)
            .map_err(|error| Error::Internal(error.to_string()))?;
        Ok(ChannelView { row, url })
    }

    /// Team `team_id`'s channel `id` (another team's is not found).
    async fn own_channel(&self, team_id: &str, id: &str) -> Result<ChannelRow, Error> {
        match self.store.channel(id).await? {
            Some(row) if row.team_id == team_id => Ok(row),
            _ => Err(Error::ChannelNotFound(id.to_string())),
        }
    }

    /// Makes a channel of the team (admins and owners): it, and its webhook secret, which is
    /// shown this once.
    pub async fn create_channel(
        &self,
        team_id: &str,
        role: Role,
        new: NewChannel,
    ) -> Result<(ChannelView, Option<String>), Error> {
        require_role(role, Role::Admin, "make notification channels")?;
        let name = check_name(&new.name)?;
        let kind = ChannelKind::from_name(&new.kind).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "a channel's kind is webhook, slack or discord, not {:?}",
                new.kind
            ))
        })?;
        let events = check_events(&new.events)?;
        let url = self.checked_url(&new.url).await?;
        let secret = match (kind, new.secret) {
            (ChannelKind::Webhook, Some(secret)) => {
                secrets::check_webhook_secret(&secret)
                    .map_err(|error| Error::InvalidRequest(error.to_string()))?;
                Some(secret)
            }
            (ChannelKind::Webhook, None) => Some(
                secrets::new_webhook_secret()
                    .map_err(|error| Error::Internal(error.to_string()))?,
            ),
            (_, Some(_)) => {
                return Err(Error::InvalidRequest(
                    "only webhook channels are signed: a secret is for those".into(),
                ));
            }
            (_, None) => None,
        };
        let seal = |text: &str| {
            (self.channel_settings()?.secrets)
                .seal(text)
                .map_err(|error| Error::Internal(error.to_string()))
        };
        let row = ChannelRow {
            id: crate::auth::random_uuid()?,
            team_id: team_id.to_string(),
            name,
            kind: kind.as_str().to_string(),
            url_sealed: seal(&url)?,
            secret_sealed: match &secret {
                Some(secret) => seal(secret)?,
                None => String::new(),
            },
            events,
            enabled: true,
            consecutive_failures: 0,
            disabled_reason: String::new(),
            created_at_ms: wrenn_core::now_ms(),
        };
        self.store.add_channel(row.clone()).await?;
        Ok((ChannelView { row, url }, secret))
    }

    /// The team's channels, oldest first.
    pub async fn team_channels(&self, team_id: &str) -> Result<Vec<ChannelView>, Error> {
        let rows = self.store.channels_of(team_id).await?;
        rows.into_iter().map(|row| self.view(row)).collect()
    }

    /// One channel of the team.
    pub async fn team_channel(&self, team_id: &str, id: &str) -> Result<ChannelView, Error> {
        let row = self.own_channel(team_id, id).await?;
        self.view(row)
    }

    /// Changes a channel of the team (admins and owners). Enabling it clears its failures
    /// and the reason it was disabled; its pending deliveries go out again.
    pub async fn change_channel(
        &self,
        team_id: &str,
        role: Role,
        id: &str,
        change: ChannelChange,
    ) -> Result<ChannelView, Error> {
        require_role(role, Role::Admin, "change notification channels")?;
        let mut row = self.own_channel(team_id, id).await?;
        if let Some(name) = &change.name {
            row.name = check_name(name)?;
        }
        if let Some(events) = &change.events {
            row.events = check_events(events)?;
        }
        if let Some(url) = &change.url {
            let url = self.checked_url(url).await?;
            row.url_sealed = (self.channel_settings()?.secrets)
                .seal(&url)
                .map_err(|error| Error::Internal(error.to_string()))?;
        }
        if let Some(enabled) = change.enabled {
            if enabled {
                row.consecutive_failures = 0;
                row.disabled_reason = String::new();
            }
            row.enabled = enabled;
        }
        if !self.store.update_channel(row.clone()).await? {
            return Err(Error::ChannelNotFound(id.to_string()));
        }
        self.view(row)
    }

    /// Deletes a channel of the team with its delivery log (admins and owners).
    pub async fn delete_channel(&self, team_id: &str, role: Role, id: &str) -> Result<(), Error> {
        require_role(role, Role::Admin, "delete notification channels")?;
        self.own_channel(team_id, id).await?;
        if !self.store.delete_channel(id).await? {
            return Err(Error::ChannelNotFound(id.to_string()));
        }
        Ok(())
    }

    /// Records a `channel.test` event that goes to this channel alone (admins and owners);
    /// it is delivered as any other, in order after those before it.
    pub async fn test_channel(&self, team_id: &str, role: Role, id: &str) -> Result<(), Error> {
        require_role(role, Role::Admin, "test notification channels")?;
        let row = self.own_channel(team_id, id).await?;
        if !row.enabled {
            return Err(Error::Conflict(format!(
                "channel {id} is disabled: enable it to test it"
            )));
        }
        self.store
            .publish(
                EventKind::ChannelTest,
                team_id,
                id,
                json!({ "name": row.name }),
            )
            .await;
        Ok(())
    }

    /// A channel's delivery log, newest first, at most `limit` rows.
    pub async fn channel_deliveries(
        &self,
        team_id: &str,
        id: &str,
        limit: usize,
    ) -> Result<Vec<DeliveryRow>, Error> {
        self.own_channel(team_id, id).await?;
        Ok(self.store.deliveries_of(id, limit).await?)
    }
}
