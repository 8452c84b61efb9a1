//! Hosts joining and leaving: the join token, registration (a known name only with its host's
//! identity), heartbeats, hosts marked down when silent, and hosts forgotten for good.

use super::*;
use crate::events::EventKind;
use serde_json::json;

impl Fleet {
    /// Whether `bearer` is the fleet's join token (Unauthenticated if not, Forbidden if agents cannot join).
    pub fn check_join_token(&self, bearer: Option<&str>) -> Result<(), Error> {
        use subtle::ConstantTimeEq;
        let Some(expected) = &self.config.join_token else {
            return Err(Error::Forbidden(
                "this control plane takes no agents (it has no join token)".into(),
            ));
        };
        let given = bearer.unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return Err(Error::Unauthenticated("invalid join token".into()));
        }
        Ok(())
    }

    /// Takes an agent's registration: the host is (again) up under its name's id. `peer` is
    /// the host id the caller's verified certificate names (the fleet's TLS listener read it),
    /// if it presented one. A known host proves itself with its certificate; without one the
    /// join token is required, and a name the fleet knows is taken only with that host's
    /// identity (409 otherwise, and nothing of the host changes); a new name gets a new
    /// identity, whose secret the answer carries. A registration with a certificate request
    /// is answered with the host's certificate. Registrations are taken one at a time.
    pub async fn register(
        &self,
        store: &Store,
        bearer: Option<&str>,
        peer: Option<&str>,
        request: RegisterRequest,
    ) -> Result<(RegisterResponse, bool), Error> {
        use subtle::ConstantTimeEq;
        let by_certificate = peer.and_then(|id| self.host(id));
        if by_certificate.is_none() {
            self.check_join_token(bearer)?;
        }
        let authority = self.authority()?;
        if request.name.is_empty()
            || request.name.len() > 64
            || !request
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(Error::InvalidRequest(
                "a host name is 1 to 64 letters, digits, '-', '.' or '_'".into(),
            ));
        }
        if request.agent_token.is_empty() {
            return Err(Error::InvalidRequest("agentToken is required".into()));
        }
        if !request.api_url.starts_with("https://") {
            return Err(Error::InvalidRequest(format!(
                "the agent's API URL {:?} is not https://host:port: agents serve the control plane over mutual TLS only",
                request.api_url
            )));
        }
        if request.certificate_request.is_empty() && by_certificate.is_none() {
            return Err(Error::InvalidRequest(
                "certificateRequest is required: a host without a certificate of this fleet asks for one at its registration".into(),
            ));
        }
        let _registering = self.registering.lock().await;
        let existing = self
            .hosts()
            .into_iter()
            .find(|host| host.row().name == request.name);
        let name = request.name.clone();
        let (id, new_secret, was_down) = match &existing {
            Some(host) if host.in_process => {
                return Err(Error::Conflict(format!(
                    "{name} is the control plane's own host"
                )));
            }
            Some(host) => {
                let row = host.row();
                let certified = by_certificate
                    .as_ref()
                    .is_some_and(|known| known.id() == row.id);
                let proven = certified
                    || request.identity.as_ref().is_some_and(|identity| {
                        let given = auth::hash_key(&identity.secret);
                        identity.host_id == row.id
                            && bool::from(given.as_bytes().ct_eq(row.identity_hash.as_bytes()))
                    });
                // A host registered before identities existed: its next registration sets one.
                let unclaimed = row.identity_hash.is_empty();
                if !proven && !unclaimed {
                    tracing::warn!(host = %name, api = %request.api_url, up = host.is_up(), "registration refused: another identity claims the host's name");
                    let message = if host.is_up() {
                        format!(
                            "host {name} is up under another identity: another agent cannot take its name (give this one another --host-name)"
                        )
                    } else {
                        format!(
                            "host {name} is down, and only its own agent (with the identity in its data directory's {}) may bring it back; to replace it for good, forget it first: `wrenn host forget {name}`",
                            IDENTITY_FILE
                        )
                    };
                    return Err(Error::Conflict(message));
                }
                let secret = unclaimed.then(auth::random_token).transpose()?;
                (row.id, secret, !host.is_up())
            }
            None => {
                let claimed = request
                    .identity
                    .as_ref()
                    .and_then(|identity| self.host(&identity.host_id))
                    .or(by_certificate.clone());
                if let Some(other) = claimed {
                    // The agent is a known host that changed its --host-name.
                    return Err(Error::Conflict(format!(
                        "this agent is host {} (its identity says so), not {name}: register under that name, or forget that host first (`wrenn host forget {}`)",
                        other.row().name,
                        other.row().name
                    )));
                }
                let id = format!("h{}", auth::random_id(11)?);
                (id, Some(auth::random_token()?), false)
            }
        };
        let certificate_chain = if request.certificate_request.is_empty() {
            String::new()
        } else {
            let (chain, facts) = authority
                .certify_host(&id, &request.certificate_request)
                .map_err(|error| match error {
                    pki::PkiError::Request(detail) => Error::InvalidRequest(format!(
                        "certificateRequest is not a signed certificate request: {detail}"
                    )),
                    other => Error::Internal(other.to_string()),
                })?;
            tracing::info!(host = %name, id = %id, until = ?facts.not_after, "certified the host");
            chain
        };
        let identity_hash = match &new_secret {
            Some(secret) => auth::hash_key(secret),
            None => existing
                .as_ref()
                .map(|host| host.row().identity_hash)
                .unwrap_or_default(),
        };
        let heartbeat_token = auth::random_token()?;
        let now = now_ms();
        let row = HostRow {
            id: id.clone(),
            name: request.name,
            api_url: request.api_url,
            proxy_address: request.proxy_address,
            agent_token: request.agent_token,
            heartbeat_hash: auth::hash_key(&heartbeat_token),
            state: HostState::Up,
            report: request.report.unwrap_or_default(),
            last_heartbeat_ms: now,
            registered_at_ms: now,
            identity_hash,
        };
        let agent = self
            .remote_agent(&row)
            .await
            .map_err(Error::InvalidRequest)?;
        store.put_host(row.clone()).await?;
        tracing::info!(host = %row.name, id = %id, api = %row.api_url, new = new_secret.is_some(), "host registered");
        let data = json!({ "name": row.name, "registered": true, "new": existing.is_none() });
        store.publish(EventKind::HostUp, "", &id, data).await;
        self.insert(row, Arc::new(agent), false);
        Ok((
            RegisterResponse {
                host_id: id,
                heartbeat_token,
                heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
                host_secret: new_secret,
                certificate_chain,
            },
            was_down,
        ))
    }

    /// The fleet's authority, or why agents cannot join without one.
    fn authority(&self) -> Result<&Arc<pki::FleetAuthority>, Error> {
        self.config.authority.as_ref().ok_or_else(|| {
            Error::Forbidden(
                "this control plane takes no agents (it has no fleet authority)".into(),
            )
        })
    }

    /// Certifies a known host's new key: `peer` (the host its present certificate names) must
    /// be `host_id`. The new chain (PEM).
    pub fn renew_certificate(
        &self,
        peer: Option<&str>,
        host_id: &str,
        csr_der: &[u8],
    ) -> Result<String, Error> {
        let refused =
            || Error::Unauthenticated("a host renews its own certificate, presenting it".into());
        if peer != Some(host_id) {
            return Err(refused());
        }
        let host = self.host(host_id).ok_or_else(refused)?;
        let (chain, facts) = self
            .authority()?
            .certify_host(host_id, csr_der)
            .map_err(|error| match error {
                pki::PkiError::Request(detail) => Error::InvalidRequest(format!(
                    "certificateRequest is not a signed certificate request: {detail}"
                )),
                other => Error::Internal(other.to_string()),
            })?;
        tracing::info!(host = %host.row().name, until = ?facts.not_after, "renewed the host's certificate");
        Ok(chain)
    }

    /// Forgets a host that is down, for good (it will not come back, or is replaced by a new
    /// agent under its name): its entry and its sandboxes' rows go. How many sandboxes it had.
    pub async fn forget_host(&self, store: &Store, name: &str) -> Result<u64, Error> {
        let _registering = self.registering.lock().await;
        let host = self
            .hosts()
            .into_iter()
            .find(|host| host.row().name == name)
            .ok_or_else(|| Error::HostNotFound(format!("no host {name}")))?;
        if host.in_process || host.is_up() {
            return Err(Error::Conflict(format!(
                "host {name} is up: stop its agent first (only a down host is forgotten)"
            )));
        }
        let id = host.id();
        let sandboxes = store.forget_host(&id).await?;
        self.hosts.write().expect("fleet lock").remove(&id);
        self.routes.forget_host(&id);
        tracing::warn!(host = %name, id = %id, sandboxes, "host forgotten");
        Ok(sandboxes)
    }

    /// Takes a heartbeat: whether the host was down until now. A host registered with
    /// another replica (or registered again there, with a new token) is read from the store.
    pub async fn heartbeat(
        &self,
        store: &Store,
        host_id: &str,
        bearer: Option<&str>,
        peer: Option<&str>,
        report: HostReport,
    ) -> Result<bool, Error> {
        use subtle::ConstantTimeEq;
        // An unknown host and a wrong token get the same answer, so that a caller without a
        // host's token learns nothing, not even whether the host exists; either way the agent
        // registers again.
        let refused = || Error::Unauthenticated("invalid heartbeat token: register again".into());
        let given = auth::hash_key(bearer.unwrap_or(""));
        // Only the host itself: the certificate it presented names it.
        if peer != Some(host_id) {
            return Err(refused());
        }
        let matches = |host: &Host| {
            let row = host.row.lock().expect("host lock");
            bool::from(given.as_bytes().ct_eq(row.heartbeat_hash.as_bytes()))
        };
        let host = match self.host(host_id) {
            Some(host) if matches(&host) => host,
            _ => {
                self.refresh(store).await?;
                self.host(host_id)
                    .filter(|host| matches(host))
                    .ok_or_else(refused)?
            }
        };
        // Read and changed at once in the store: a replica marking the host down meanwhile
        // either sees this heartbeat and does not, or goes first and this one brings it back.
        let at_ms = now_ms();
        let before = store
            .host_heartbeat(host_id, &given, &report, at_ms)
            .await?
            .ok_or_else(refused)?;
        let was_down = before != HostState::Up;
        let row = {
            let mut row = host.row.lock().expect("host lock");
            row.state = HostState::Up;
            row.report = report;
            row.last_heartbeat_ms = at_ms;
            *host.last_seen.lock().expect("host lock") = Instant::now();
            row.clone()
        };
        if was_down {
            tracing::info!(host = %row.name, "host is back");
            let data = json!({ "name": row.name, "registered": false });
            store.publish(EventKind::HostUp, "", &row.id, data).await;
        }
        Ok(was_down)
    }

    /// Reads the hosts from the store (replicas: another may have registered, heard or marked
    /// down a host): new hosts are added, forgotten ones removed, the others' rows replaced (a
    /// host registered again elsewhere gets an agent at its new address); a host heard from
    /// since the last read counts as seen now. The hosts that registered or came back since:
    /// to reconcile.
    pub async fn refresh(&self, store: &Store) -> Result<Vec<String>, crate::store::StoreError> {
        let rows = store.hosts().await?;
        let mut woken = Vec::new();
        let stored: HashSet<String> = rows.iter().map(|row| row.id.clone()).collect();
        for row in rows {
            if row.api_url == EMBEDDED_API_URL {
                continue;
            }
            let Some(host) = self.host(&row.id) else {
                match self.remote_agent(&row).await {
                    Ok(agent) => {
                        if row.state == HostState::Up {
                            woken.push(row.id.clone());
                        }
                        self.insert(row, Arc::new(agent), false);
                    }
                    Err(error) => {
                        tracing::warn!(host = %row.name, %error, "cannot reach a host another replica registered");
                    }
                }
                continue;
            };
            if host.in_process {
                continue;
            }
            let (moved, came_up, went_down, heard) = {
                let mut known = host.row.lock().expect("host lock");
                let moved = known.api_url != row.api_url
                    || known.proxy_address != row.proxy_address
                    || known.agent_token != row.agent_token;
                let came_up = row.state == HostState::Up
                    && (known.state != HostState::Up
                        || known.registered_at_ms != row.registered_at_ms);
                let went_down = known.state == HostState::Up && row.state != HostState::Up;
                let heard = row.last_heartbeat_ms > known.last_heartbeat_ms;
                if !moved {
                    *known = row.clone();
                }
                (moved, came_up, went_down, heard)
            };
            if heard {
                *host.last_seen.lock().expect("host lock") = Instant::now();
            }
            if went_down {
                self.routes.forget_host(&row.id);
            }
            if came_up {
                woken.push(row.id.clone());
            }
            if moved {
                match self.remote_agent(&row).await {
                    Ok(agent) => {
                        self.routes.forget_host(&row.id);
                        self.insert(row, Arc::new(agent), false);
                    }
                    Err(error) => {
                        tracing::warn!(host = %row.name, %error, "cannot reach a host registered again at another replica");
                    }
                }
            }
        }
        let forgotten: Vec<String> = self
            .hosts()
            .into_iter()
            .filter(|host| !host.in_process && !stored.contains(&host.id()))
            .map(|host| host.id())
            .collect();
        for id in forgotten {
            self.hosts.write().expect("fleet lock").remove(&id);
            self.routes.forget_host(&id);
        }
        Ok(woken)
    }

    pub(super) async fn mark_down(
        &self,
        store: &Store,
        mut row: HostRow,
    ) -> Result<(), crate::store::StoreError> {
        row.state = HostState::Down;
        store.put_host(row.clone()).await?;
        let lost = store.mark_host_lost(&row.id).await?;
        self.went_down(store, &row, lost).await;
        Ok(())
    }

    /// A host marked down in the store, its `lost` sandboxes with it: its routes go, and the
    /// event is recorded.
    async fn went_down(&self, store: &Store, row: &HostRow, lost: u64) {
        self.routes.forget_host(&row.id);
        tracing::warn!(host = %row.name, lost, "host is down: its sandboxes are lost");
        let data = json!({ "name": row.name, "lostSandboxes": lost });
        store.publish(EventKind::HostDown, "", &row.id, data).await;
    }

    /// One pass of the heartbeat watch: the embedded host reports itself, silent hosts go down.
    pub async fn check_heartbeats(&self, store: &Store) {
        for host in self.hosts() {
            // This process's own agent: its report is kept in memory only (the stored row is
            // written anew at every start, and nothing else reads it).
            if let Some(report) = host.agent.report_in_process() {
                let mut row = host.row.lock().expect("host lock");
                row.report = report;
                row.last_heartbeat_ms = now_ms();
                continue;
            }
            let silent = host.last_seen.lock().expect("host lock").elapsed();
            if !host.is_up() || silent < self.config.down_after {
                continue;
            }
            let row = host.row();
            // Down only if no heartbeat reached the store since (at another replica, say).
            match store
                .mark_host_down_if_silent(&row.id, row.last_heartbeat_ms)
                .await
            {
                Ok(Some(lost)) => {
                    host.row.lock().expect("host lock").state = HostState::Down;
                    self.went_down(store, &row, lost).await;
                }
                Ok(None) => {
                    tracing::debug!(host = %row.name, "a host found silent was heard from meanwhile");
                }
                Err(error) => tracing::warn!(%error, "cannot mark a host down"),
            }
        }
    }
}
