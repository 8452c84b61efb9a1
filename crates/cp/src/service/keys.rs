//! A team's API keys: made (shown once, stored hashed, with a role no higher than their
//! maker's), listed, renamed and revoked; each made or revoked key is an event. A revoked key
//! fails its next call: keys are read from the store at every call, never cached.

use serde_json::json;
use wrenn_core::now_ms;

use super::{ControlPlane, Error};
use crate::auth;
use crate::events::EventKind;
use crate::store::{ApiKey, Role, Store};

/// The longest name a key may have.
pub const MAX_KEY_NAME: usize = 100;

/// A key's name: 1 to [`MAX_KEY_NAME`] characters, no control characters.
pub fn check_key_name(name: &str) -> Result<(), Error> {
    if name.trim().is_empty() || name.chars().count() > MAX_KEY_NAME {
        return Err(Error::InvalidRequest(format!(
            "a key's name is 1 to {MAX_KEY_NAME} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(
            "a key's name has no control characters".into(),
        ));
    }
    Ok(())
}

/// Makes a key of team `team_id` with `role` in the store: the key (shown once) and its row.
/// Publishes `key.created`.
pub async fn make_key(
    store: &Store,
    team_id: &str,
    name: &str,
    role: Role,
) -> Result<(String, ApiKey), Error> {
    check_key_name(name)?;
    let (key, hash) = auth::new_key()?;
    let record = ApiKey {
        id: auth::random_uuid()?,
        team_id: team_id.to_string(),
        name: name.to_string(),
        prefix: key[..10].to_string(),
        created_at_ms: now_ms(),
        revoked: false,
        role,
        mask_suffix: key[key.len() - 4..].to_string(),
    };
    store.add_key(record.clone(), hash).await?;
    let data = json!({ "name": record.name, "role": role.as_str() });
    store
        .publish(EventKind::KeyCreated, team_id, &record.id, data)
        .await;
    Ok((key, record))
}

impl ControlPlane {
    /// A new key of the caller's team, by a caller with `caller_role` (an admin at least),
    /// with `role` (the caller's when none is asked; never above it).
    pub async fn create_key(
        &self,
        team_id: &str,
        caller_role: Role,
        name: &str,
        role: Option<Role>,
    ) -> Result<(String, ApiKey), Error> {
        require_role(caller_role, Role::Admin, "make keys")?;
        let role = role.unwrap_or(caller_role);
        if !caller_role.at_least(role) {
            return Err(Error::Forbidden(format!(
                "a key with role {caller_role} cannot make a key with role {role}"
            )));
        }
        make_key(&self.store, team_id, name, role).await
    }

    /// The team's live keys, oldest first.
    pub async fn team_keys(&self, team_id: &str) -> Result<Vec<ApiKey>, Error> {
        let keys = self.store.list_keys(team_id).await?;
        Ok(keys.into_iter().filter(|key| !key.revoked).collect())
    }

    /// The team's live key `key_id` (another team's is not found).
    async fn team_key(&self, team_id: &str, key_id: &str) -> Result<ApiKey, Error> {
        self.store
            .key(key_id)
            .await?
            .filter(|key| key.team_id == team_id && !key.revoked)
            .ok_or_else(|| Error::KeyNotFound(key_id.to_string()))
    }

    /// Renames a key of the team (an admin at least; not a key above the caller's role).
    pub async fn rename_key(
        &self,
        team_id: &str,
        caller_role: Role,
        key_id: &str,
        name: &str,
    ) -> Result<(), Error> {
        require_role(caller_role, Role::Admin, "rename keys")?;
        check_key_name(name)?;
        let key = self.team_key(team_id, key_id).await?;
        require_above(caller_role, &key)?;
        if !self.store.rename_key(&key.id, name).await? {
            return Err(Error::KeyNotFound(key_id.to_string()));
        }
        Ok(())
    }

    /// Revokes a key of the team at once (an admin at least; not a key above the caller's
    /// role). Publishes `key.revoked`.
    pub async fn revoke_key(
        &self,
        team_id: &str,
        caller_role: Role,
        key_id: &str,
    ) -> Result<(), Error> {
        require_role(caller_role, Role::Admin, "revoke keys")?;
        let key = self.team_key(team_id, key_id).await?;
        require_above(caller_role, &key)?;
        if !self.store.revoke_key(&key.id, now_ms()).await? {
            return Err(Error::KeyNotFound(key_id.to_string()));
        }
        let data = json!({ "name": key.name });
        self.store
            .publish(EventKind::KeyRevoked, team_id, &key.id, data)
            .await;
        Ok(())
    }
}

/// A 403 unless `role` is at least `needed`.
pub fn require_role(role: Role, needed: Role, doing: &str) -> Result<(), Error> {
    if role.at_least(needed) {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "a {role} cannot {doing}: it takes an {needed} or more of the team"
        )))
    }
}

/// A 403 when `key` has a role above `role`.
fn require_above(role: Role, key: &ApiKey) -> Result<(), Error> {
    if role.at_least(key.role) {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "a {role} cannot change a key with role {}",
            key.role
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_names_checked() {
        assert!(Role::Owner.at_least(Role::Admin) && Role::Admin.at_least(Role::Admin));
        assert!(!Role::Member.at_least(Role::Admin) && !Role::Admin.at_least(Role::Owner));
        assert!(require_role(Role::Member, Role::Admin, "x").is_err());
        assert!(check_key_name("ci deploy").is_ok());
        for bad in ["", "  ", "a\nb", &"x".repeat(101)] {
            assert!(check_key_name(bad).is_err(), "{bad:?}");
        }
    }
}
