//! People: users with an email and a password (argon2id hashes), their sessions (signing in
//! for the dashboard) and access tokens (E2B's `/access-tokens`), their teams (members with a
//! role: owner, admin, member; a team always keeps an owner), invitations taken once by their
//! link, and operators, who see and act in every team. A bearer token is read from the store
//! at every call, as keys are: a revoked or expired one fails at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use wrenn_core::now_ms;

use super::{ControlPlane, Error};
use crate::auth;
use crate::store::{InvitationRow, MemberRow, Role, Store, Team, UserRow, UserTokenRow};

/// A session lasts this long after signing in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// An invitation's link works this long.
pub const INVITATION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest password a user may set.
pub const MIN_PASSWORD: usize = 10;
/// The longest password hashed (longer ones are refused, not cut).
pub const MAX_PASSWORD: usize = 1024;
/// Failed sign-ins of one email in a window before it must wait.
const LOGIN_FAILURES: u32 = 5;
const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// How many teams a user may own by default (`ControlPlane::teams_per_user`).
pub const TEAMS_PER_USER: usize = 10;

/// The prefix of sessions' tokens.
pub const SESSION_PREFIX: &str = "wrenn_s_";
/// The prefix of access tokens (E2B's).
pub const ACCESS_TOKEN_PREFIX: &str = "sk_e2b_";
/// The prefix of invitations' tokens.
pub const INVITATION_PREFIX: &str = "wrenn_i_";

/// Who a call is made by: a team's API key, or a user signed in (a session or an access
/// token) acting in one of their teams.
#[derive(Debug, Clone)]
pub enum Principal {
    Key(crate::store::ApiKey),
    User { user: UserRow, token: UserTokenRow },
}

/// An authenticated caller: who, and the team and role they act in. A user's team is the one
/// they named (`X-Team-ID`) or their first; `team_id` is empty for a user of no team yet.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub team_id: String,
    pub role: Role,
    /// Whether the caller sees every team: a key of an admin team, or an operator.
    pub operator: bool,
}

impl Caller {
    /// `key:<id>` or `user:<id>`: the actor of its events and audit rows.
    pub fn actor(&self) -> String {
        match &self.principal {
            Principal::Key(key) => format!("key:{}", key.id),
            Principal::User { user, .. } => format!("user:{}", user.id),
        }
    }

    /// The user, when a user calls.
    pub fn user(&self) -> Option<&UserRow> {
        match &self.principal {
            Principal::User { user, .. } => Some(user),
            Principal::Key(_) => None,
        }
    }
}

/// Sign-in failures by email, for [`ControlPlane::login`]'s limit.
#[derive(Debug, Default)]
pub struct LoginLimit {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl LoginLimit {
    /// Counts an attempt of `email`'s, checked and counted at once (concurrent attempts
    /// cannot all pass): Err(how long to wait) past the limit.
    fn attempt(&self, email: &str) -> Result<(), Duration> {
        let mut failures = self.failures.lock().expect("login limit lock");
        if failures.len() > 10_000 {
            failures.retain(|_, (_, since)| since.elapsed() < LOGIN_WINDOW);
        }
        let entry = failures
            .entry(email.to_string())
            .or_insert((0, Instant::now()));
        if entry.1.elapsed() >= LOGIN_WINDOW {
            *entry = (0, Instant::now());
        }
        if entry.0 >= LOGIN_FAILURES {
            return Err(LOGIN_WINDOW.saturating_sub(entry.1.elapsed()));
        }
        entry.0 += 1;
        Ok(())
    }

    /// A successful sign-in clears the email's count.
    fn succeeded(&self, email: &str) {
        self.failures
            .lock()
            .expect("login limit lock")
            .remove(email);
    }
}

/// An email as kept: trimmed, lowercase; refused unless it looks like one.
pub fn normalize_email(email: &str) -> Result<String, Error> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
    if !valid {
        return Err(Error::InvalidRequest(format!(
            "{email:?} is not an email address"
        )));
    }
    Ok(email)
}

/// A password of acceptable length, or why not.
pub fn check_password(password: &str) -> Result<(), Error> {
    if password.chars().count() < MIN_PASSWORD || password.len() > MAX_PASSWORD {
        return Err(Error::InvalidRequest(format!(
            "a password is {MIN_PASSWORD} to {MAX_PASSWORD} characters"
        )));
    }
    Ok(())
}

/// [`hash_password`] off the async threads (argon2 takes tens of milliseconds of CPU).
async fn hash_password_off_thread(password: &str) -> Result<String, Error> {
    let password = password.to_string();
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|error| Error::Internal(format!("hashing a password: {error}")))?
}

/// Whether `password` matches `hash`, off the async threads; a missing user is checked
/// against a hash of nothing, so that both answers take as long.
async fn password_matches_off_thread(password: &str, hash: Option<String>) -> bool {
    static NOBODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let password = password.to_string();
    tokio::task::spawn_blocking(move || {
        let hash = match hash {
            Some(hash) => hash,
            None => NOBODY
                .get_or_init(|| hash_password("no user has this password").unwrap_or_default())
                .clone(),
        };
        password_matches(&password, &hash)
    })
    .await
    .unwrap_or(false)
}

/// The argon2id hash (PHC string) of a password of acceptable length.
pub fn hash_password(password: &str) -> Result<String, Error> {
    check_password(password)?;
    let mut salt = [0u8; 16];
    wrenn_core::random::fill(&mut salt)?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|error| Error::Internal(format!("a password's salt: {error}")))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| Error::Internal(format!("hashing a password: {error}")))
}

/// Whether `password` is the one `hash` was made from.
fn password_matches(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A new token with `prefix` and its stored hash.
fn new_token(prefix: &str) -> Result<(String, String), Error> {
    let token = format!("{prefix}{}", wrenn_core::random::hex_token(20)?);
    let hash = auth::hash_key(&token);
    Ok((token, hash))
}

/// Makes a user (for `wrenn user create` and invitations): refused when the email is taken.
pub async fn make_user(
    store: &Store,
    email: &str,
    password: &str,
    operator: bool,
) -> Result<UserRow, Error> {
    let email = normalize_email(email)?;
    if store.user_where("email", &email).await?.is_some() {
        return Err(Error::Conflict(format!("a user with email {email} exists")));
    }
    let user = UserRow {
        id: auth::random_uuid()?,
        email,
        password_hash: hash_password_off_thread(password).await?,
        operator,
        created_at_ms: now_ms(),
    };
    store.create_user(user.clone()).await?;
    Ok(user)
}

/// A team's name: 1 to 100 characters, no control characters.
fn check_team_name(name: &str) -> Result<(), Error> {
    if name.trim().is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(
            "a team's name is 1 to 100 characters".into(),
        ));
    }
    Ok(())
}

impl ControlPlane {
    /// Signs a user in: a new session token (shown once) and the user. Wrong emails and
    /// passwords get the same answer; an email failing too often must wait.
    pub async fn login(&self, email: &str, password: &str) -> Result<(String, UserRow), Error> {
        let email = email.trim().to_lowercase();
        if let Err(wait) = self.login_limit.attempt(&email) {
            return Err(Error::RateLimited {
                what: "sign-ins of this email".into(),
                retry_after: wait,
            });
        }
        let user = self.store.user_where("email", &email).await?;
        let hash = user.as_ref().map(|user| user.password_hash.clone());
        let matches = password_matches_off_thread(password, hash).await;
        let Some(user) = user.filter(|_| matches) else {
            return Err(Error::Unauthenticated("wrong email or password".into()));
        };
        self.login_limit.succeeded(&email);
        let lifetime = SESSION_LIFETIME.as_millis() as i64;
        let (token, _) = self
            .user_token(&user, "session", "session", now_ms() + lifetime)
            .await?;
        Ok((token, user))
    }

    /// A new token of the user's (`session` or `access`): the token, shown once, and its row.
    pub async fn user_token(
        &self,
        user: &UserRow,
        kind: &str,
        name: &str,
        expires_at_ms: i64,
    ) -> Result<(String, UserTokenRow), Error> {
        super::keys::check_key_name(name)?;
        let prefix = if kind == "session" {
            SESSION_PREFIX
        } else {
            ACCESS_TOKEN_PREFIX
        };
        let (token, hash) = new_token(prefix)?;
        let row = UserTokenRow {
            id: auth::random_uuid()?,
            user_id: user.id.clone(),
            kind: kind.to_string(),
            name: name.to_string(),
            prefix: token[..prefix.len() + 4].to_string(),
            mask_suffix: token[token.len() - 4..].to_string(),
            created_at_ms: now_ms(),
            expires_at_ms,
            revoked: false,
        };
        self.store.add_user_token(row.clone(), hash).await?;
        Ok((token, row))
    }

    /// Revokes one of the user's tokens (a session: signing out).
    pub async fn revoke_user_token(&self, user: &UserRow, token_id: &str) -> Result<(), Error> {
        if !self
            .store
            .revoke_user_token(&user.id, token_id, now_ms())
            .await?
        {
            return Err(Error::TokenNotFound(token_id.to_string()));
        }
        Ok(())
    }

    /// The caller a bearer token (session or access token) names, acting in `team` (their
    /// first team when None): None when the token is unknown, revoked or expired.
    pub async fn authenticate_user(
        &self,
        token: &str,
        team: Option<&str>,
    ) -> Result<Option<Caller>, Error> {
        let Some(row) = self
            .store
            .user_token_by_hash(&auth::hash_key(token))
            .await?
        else {
            return Ok(None);
        };
        if row.expires_at_ms != 0 && row.expires_at_ms <= now_ms() {
            return Ok(None);
        }
        let Some(user) = self.store.user_where("id", &row.user_id).await? else {
            return Ok(None);
        };
        let memberships = self.store.members_where("user_id", &user.id).await?;
        let (team_id, role) = match team {
            Some(team) => match memberships.iter().find(|m| m.team_id == team) {
                Some(member) => (member.team_id.clone(), member.role),
                None if user.operator && self.store.team_by_id(team).await?.is_some() => {
                    (team.to_string(), Role::Owner)
                }
                None => {
                    return Err(Error::Forbidden(format!(
                        "you are not a member of team {team}"
                    )));
                }
            },
            None => match memberships.first() {
                Some(member) => (member.team_id.clone(), member.role),
                // An operator of no team acts in the operators' (admin) team.
                None if user.operator => {
                    let teams = self.store.teams().await?;
                    match teams.into_iter().find(|team| team.admin) {
                        Some(team) => (team.id, Role::Owner),
                        None => (String::new(), Role::Member),
                    }
                }
                None => (String::new(), Role::Member),
            },
        };
        let operator = user.operator;
        Ok(Some(Caller {
            principal: Principal::User { user, token: row },
            team_id,
            role,
            operator,
        }))
    }

    /// A new team made by a signed-in user, who is its owner.
    pub async fn create_team(&self, user: &UserRow, name: &str) -> Result<Team, Error> {
        check_team_name(name)?;
        let owned = (self.store.members_where("user_id", &user.id).await?)
            .iter()
            .filter(|member| member.role == Role::Owner)
            .count();
        if self.teams_per_user > 0 && owned >= self.teams_per_user && !user.operator {
            return Err(Error::Forbidden(format!(
                "a user owns at most {} teams (this one owns {owned}): delete one first",
                self.teams_per_user
            )));
        }
        if self.store.team_by_name(name).await?.is_some() {
            return Err(Error::Conflict(format!("a team named {name:?} exists")));
        }
        let team = Team {
            id: auth::random_id(16)?,
            name: name.to_string(),
            created_at_ms: now_ms(),
            admin: false,
        };
        self.store.create_team(team.clone()).await?;
        let owner = MemberRow {
            team_id: team.id.clone(),
            user_id: user.id.clone(),
            role: Role::Owner,
            created_at_ms: now_ms(),
        };
        self.store.put_member(owner).await?;
        Ok(team)
    }

    /// The team's members with their emails, oldest first.
    pub async fn members(&self, team_id: &str) -> Result<Vec<(MemberRow, String)>, Error> {
        let mut members = Vec::new();
        for member in self.store.members_where("team_id", team_id).await? {
            let email = self
                .store
                .user_where("id", &member.user_id)
                .await?
                .map(|user| user.email)
                .unwrap_or_default();
            members.push((member, email));
        }
        Ok(members)
    }

    /// A member of the team (another team's is not found).
    async fn member(&self, team_id: &str, user_id: &str) -> Result<MemberRow, Error> {
        self.store
            .members_where("team_id", team_id)
            .await?
            .into_iter()
            .find(|member| member.user_id == user_id)
            .ok_or_else(|| Error::MemberNotFound(user_id.to_string()))
    }

    /// Whether the team keeps an owner if `leaving` is no longer one.
    async fn keeps_an_owner(&self, team_id: &str, leaving: &str) -> Result<bool, Error> {
        let members = self.store.members_where("team_id", team_id).await?;
        Ok(members
            .iter()
            .any(|m| m.role == Role::Owner && m.user_id != leaving))
    }

    /// Gives a member another role (an admin at least; owners alone make or unmake owners;
    /// the last owner stays one).
    pub async fn set_member_role(
        &self,
        caller: &Caller,
        user_id: &str,
        role: Role,
    ) -> Result<(), Error> {
        super::keys::require_role(caller.role, Role::Admin, "change members' roles")?;
        let mut member = self.member(&caller.team_id, user_id).await?;
        if (member.role == Role::Owner || role == Role::Owner) && caller.role != Role::Owner {
            return Err(Error::Forbidden(
                "only an owner makes or unmakes owners".into(),
            ));
        }
        if member.role == Role::Owner
            && role != Role::Owner
            && !self.keeps_an_owner(&caller.team_id, user_id).await?
        {
            return Err(Error::Conflict("a team keeps at least one owner".into()));
        }
        member.role = role;
        self.store.put_member(member).await?;
        Ok(())
    }

    /// Removes a member (an admin at least, not an owner unless an owner; anyone may leave;
    /// the last owner may not).
    pub async fn remove_member(&self, caller: &Caller, user_id: &str) -> Result<(), Error> {
        let leaving = caller.user().is_some_and(|user| user.id == user_id);
        if !leaving {
            super::keys::require_role(caller.role, Role::Admin, "remove members")?;
        }
        let member = self.member(&caller.team_id, user_id).await?;
        if member.role == Role::Owner && !leaving && caller.role != Role::Owner {
            return Err(Error::Forbidden("only an owner removes an owner".into()));
        }
        if member.role == Role::Owner && !self.keeps_an_owner(&caller.team_id, user_id).await? {
            return Err(Error::Conflict("a team keeps at least one owner".into()));
        }
        self.store.delete_member(&caller.team_id, user_id).await?;
        Ok(())
    }

    /// Deletes the caller's team (an owner only): refused while it has sandboxes or
    /// templates.
    pub async fn delete_team(&self, caller: &Caller, team_id: &str) -> Result<(), Error> {
        if team_id != caller.team_id && !caller.operator {
            return Err(Error::TeamNotFound(team_id.to_string()));
        }
        if team_id == caller.team_id {
            super::keys::require_role(caller.role, Role::Owner, "delete the team")?;
        }
        let team = self
            .store
            .team_by_id(team_id)
            .await?
            .ok_or_else(|| Error::TeamNotFound(team_id.to_string()))?;
        if team.admin {
            return Err(Error::Forbidden(
                "the operators' team cannot be deleted".into(),
            ));
        }
        let sandboxes = self.store.all_sandboxes().await?;
        let templates = self.store.templates_for(team_id).await?;
        if sandboxes.iter().any(|s| s.team_id == team_id)
            || templates.iter().any(|t| t.team_id == team_id)
        {
            return Err(Error::Conflict(
                "the team still has sandboxes or templates: delete them first".into(),
            ));
        }
        if !self.store.delete_team(team_id).await? {
            return Err(Error::TeamNotFound(team_id.to_string()));
        }
        Ok(())
    }

    /// An invitation to the caller's team for `email` with `role` (an admin at least, a role
    /// at most the caller's): the one-time token of its link, and its row.
    pub async fn invite(
        &self,
        caller: &Caller,
        email: &str,
        role: Role,
    ) -> Result<(String, InvitationRow), Error> {
        super::keys::require_role(caller.role, Role::Admin, "invite")?;
        if !caller.role.at_least(role) {
            return Err(Error::Forbidden(format!(
                "a {} cannot invite a {role}",
                caller.role
            )));
        }
        let (token, hash) = new_token(INVITATION_PREFIX)?;
        let now = now_ms();
        let invitation = InvitationRow {
            id: auth::random_uuid()?,
            team_id: caller.team_id.clone(),
            email: normalize_email(email)?,
            role,
            created_by: caller.actor(),
            created_at_ms: now,
            expires_at_ms: now + INVITATION_LIFETIME.as_millis() as i64,
            accepted: false,
        };
        self.store.add_invitation(invitation.clone(), hash).await?;
        Ok((token, invitation))
    }

    /// Takes an invitation: its team gains the user (`user`, signed in; else a new user with
    /// the invitation's email and `password`). A token used, expired or unknown is refused.
    pub async fn accept_invitation(
        &self,
        token: &str,
        user: Option<&UserRow>,
        password: Option<&str>,
    ) -> Result<(MemberRow, UserRow), Error> {
        // Checked before the invitation is taken: a refused new user leaves it usable.
        let hash = auth::hash_key(token);
        if user.is_none() {
            check_password(password.unwrap_or(""))?;
            let pending = self.store.invitation_by_hash(&hash).await?;
            if let Some(pending) = pending.filter(|i| !i.accepted && i.expires_at_ms > now_ms())
                && self
                    .store
                    .user_where("email", &pending.email)
                    .await?
                    .is_some()
            {
                return Err(Error::Conflict(format!(
                    "{} has an account: sign in and accept the invitation as that user",
                    pending.email
                )));
            }
        }
        let invitation = self
            .store
            .take_invitation(&hash, now_ms())
            .await?
            .ok_or_else(|| {
                Error::Unauthenticated("this invitation is unknown, used or expired".into())
            })?;
        let user = match user {
            Some(user) => user.clone(),
            None => {
                make_user(
                    &self.store,
                    &invitation.email,
                    password.unwrap_or(""),
                    false,
                )
                .await?
            }
        };
        // A member already keeps the higher of their role and the invitation's.
        let existing = self.member(&invitation.team_id, &user.id).await.ok();
        let member = match existing {
            Some(member) if member.role.at_least(invitation.role) => member,
            _ => MemberRow {
                team_id: invitation.team_id.clone(),
                user_id: user.id.clone(),
                role: invitation.role,
                created_at_ms: now_ms(),
            },
        };
        self.store.put_member(member.clone()).await?;
        Ok((member, user))
    }
}
