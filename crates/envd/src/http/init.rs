//! `POST /init`: the host agent hands a started or restored sandbox its settings: environment
//! variables, access token, default user and working directory, the current time (a
//! restored snapshot's clock is stale), and the sandbox's certificate authority when its
//! egress rules need one ([`crate::trust`]).
//!
//! After a snapshot was prepared, the first authorised `/init` completes the restore (see
//! `server`): connections from before the snapshot are closed and port forwarding restarts.
//!
//! Token rules (E2B's): an `/init` carrying the stored token is accepted; so is one whose token
//! hashes (SHA-512) to the `accessTokenHash` the host put in MMDS, which is how a restored clone
//! gets a new token (the hash of `""` authorises clearing it). Without a stored token and without
//! MMDS, the first `/init` may set any token. Inits are serialised, and one carrying a timestamp older
//! than the newest applied one changes nothing (a retried, delayed request must not roll back a
//! newer one).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderValue, StatusCode, header};
use serde::Deserialize;

use crate::auth::secrets_equal;
use crate::state::{ENVD_VERSION, Envd};

/// Variables envd owns; `/init` cannot override them.
const INTERNAL_VARS: [&str; 4] = [
    "E2B_SANDBOX",
    "E2B_SANDBOX_ID",
    "E2B_TEMPLATE_ID",
    "E2B_EVENTS_ADDRESS",
];

/// The clock is set when it is behind the given time by more than this...
const MAX_CLOCK_BEHIND_MS: i64 = 50;
/// ...or ahead of it by more than this.
const MAX_CLOCK_AHEAD_MS: i64 = 5_000;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    env_vars: Option<BTreeMap<String, String>>,
    access_token: Option<String>,
    timestamp: Option<DateTime<Utc>>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    /// The sandbox's certificate authority (PEM), added to the trust store.
    ca_bundle: Option<String>,
    /// The sandbox's identity as the metadata service holds it (wrenn's agent sends it with
    /// a restore's `/init`, so that the first command sees it without a round trip to the
    /// service; the service is read afterwards all the same).
    metadata: Option<crate::mmds::SandboxMetadata>,
}

/// Whether the clock (`now`) is far enough from `given` to be set (both in unix ms).
pub fn should_set_clock(now_ms: i64, given_ms: i64) -> bool {
    now_ms < given_ms - MAX_CLOCK_BEHIND_MS || now_ms > given_ms + MAX_CLOCK_AHEAD_MS
}

fn respond(status: StatusCode, body: &'static str) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert("x-envd-version", HeaderValue::from_static(ENVD_VERSION));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !body.is_empty() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}

pub(crate) async fn init(
    State(envd): State<Arc<Envd>>,
    connection: Option<axum::Extension<crate::server::ConnectionId>>,
    body: Bytes,
) -> Response {
    let mut phases = Phases::new();
    let request: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(%error, "rejecting /init with an invalid body");
                return respond(StatusCode::BAD_REQUEST, "");
            }
        }
    };
    if request.access_token.as_deref() == Some("") {
        return respond(StatusCode::BAD_REQUEST, "empty token not allowed");
    }

    let _serialised = envd.init_lock.lock().await;
    phases.lap();
    let clear_token = match authorize(&envd, request.access_token.as_deref()).await {
        Ok(decision) => decision == Authorized::ClearToken,
        Err(message) => return respond(StatusCode::UNAUTHORIZED, message),
    };

    phases.authorize = phases.lap();
    // Every authorised /init thaws the user processes (frozen by /snapshot/prepare).
    if let Some(cgroups) = &envd.cgroups
        && let Err(error) = cgroups.set_frozen(false)
    {
        tracing::warn!(%error, "could not thaw the user cgroups");
    }

    phases.thaw = phases.lap();
    // The first /init after a restore: the connections from before the snapshot are zombies.
    let restored = envd.connections.awaiting_restore();
    let mut sweep = None;
    if restored {
        sweep = Some(envd.connections.complete_restore(connection.map(|c| c.0)));
        phases.sweep = phases.lap();
        envd.ports.start().await;
        phases.ports = phases.lap();
    }

    // Before the timestamp's check: an /init older than the last one still brings the
    // sandbox's authority (a restored clone's clock may be behind the host's).
    let mut ca_variables = Vec::new();
    if let Some(pem) = request
        .ca_bundle
        .clone()
        .filter(|pem| !pem.trim().is_empty())
    {
        let store = envd.config.trust_store.clone();
        let installed =
            tokio::task::spawn_blocking(move || crate::trust::install(&store, &pem)).await;
        match installed {
            Ok(Ok(installed)) => {
                if installed.changed {
                    tracing::info!(
                        in_bundle = installed.in_bundle,
                        "the sandbox's certificate authority is trusted"
                    );
                }
                ca_variables = crate::trust::variables(&envd.config.trust_store, installed);
            }
            Ok(Err(error @ crate::trust::TrustError::Invalid(_))) => {
                tracing::warn!(%error, "rejecting /init");
                return respond(StatusCode::BAD_REQUEST, "caBundle is not PEM certificates");
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "could not install the sandbox's certificate authority");
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "could not install caBundle in the trust store",
                );
            }
            Err(_) => {
                return respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "could not install caBundle in the trust store",
                );
            }
        }
    }

    if let Some(timestamp) = request.timestamp {
        let given_ns = timestamp.timestamp_nanos_opt().unwrap_or(i64::MAX);
        let mut last = envd.last_init_ns.lock().expect("init time lock");
        if given_ns < *last {
            tracing::info!(%timestamp, "ignoring an /init older than the last applied one");
            phases.log_restore(sweep);
            return respond(StatusCode::NO_CONTENT, "");
        }
        *last = given_ns;
        drop(last);
        let now_ms = Utc::now().timestamp_millis();
        if envd.config.sync_clock && should_set_clock(now_ms, timestamp.timestamp_millis()) {
            set_clock(timestamp);
        }
    }

    phases.clock = phases.lap();
    envd.update_session(|session| {
        if let Some(vars) = request.env_vars {
            session.env_vars = vars
                .into_iter()
                .filter(|(key, _)| !INTERNAL_VARS.contains(&key.as_str()))
                .collect();
        }
        // The authority's variables, unless the sandbox sets its own.
        for (name, value) in ca_variables {
            session.env_vars.entry(name).or_insert(value);
        }
        if let Some(token) = request.access_token {
            session.access_token = Some(token);
        } else if clear_token {
            session.access_token = None;
        }
        if let Some(user) = request.default_user.filter(|u| !u.is_empty()) {
            session.default_user = Some(user);
        }
        if let Some(workdir) = request.default_workdir.filter(|w| !w.is_empty()) {
            session.default_workdir = Some(workdir.into());
        }
    });
    // A restored clone has a new identity: it is read before /init answers, so the first
    // command already sees it (E2B_SANDBOX_ID); other /inits refresh it in the background.
    let given = request
        .metadata
        .filter(|metadata| !metadata.sandbox_id.is_empty());
    if let Some(metadata) = &given {
        envd.set_identity(metadata, "/init");
    }
    phases.identity = phases.lap();
    if envd.mmds.is_some() {
        if restored && given.is_none() {
            envd.refresh_identity(MMDS_DEADLINE).await;
        } else {
            let envd = envd.clone();
            tokio::spawn(async move { envd.refresh_identity(MMDS_DEADLINE).await });
        }
    }
    phases.log_restore(sweep);
    respond(StatusCode::NO_CONTENT, "")
}

/// Where a restore's `/init` spends its time in the guest, logged with its end (the agent
/// measures the whole round trip; the difference is the guest's network and HTTP handling).
struct Phases {
    started: Instant,
    lap: Instant,
    authorize: Duration,
    thaw: Duration,
    sweep: Duration,
    ports: Duration,
    clock: Duration,
    identity: Duration,
}

impl Phases {
    fn new() -> Self {
        let now = Instant::now();
        Phases {
            started: now,
            lap: now,
            authorize: Duration::ZERO,
            thaw: Duration::ZERO,
            sweep: Duration::ZERO,
            ports: Duration::ZERO,
            clock: Duration::ZERO,
            identity: Duration::ZERO,
        }
    }

    /// The time since the previous lap, and a new lap started.
    fn lap(&mut self) -> Duration {
        let now = Instant::now();
        let since = now - self.lap;
        self.lap = now;
        since
    }

    /// Logs the restore's sweep of connections and the phases, if this `/init` completed a
    /// restore.
    fn log_restore(&self, sweep: Option<crate::server::ConnectionSweep>) {
        let Some(sweep) = sweep else { return };
        let us = |phase: Duration| phase.as_micros() as u64;
        tracing::info!(
            closed = sweep.closed,
            kept = sweep.kept,
            total_us = us(self.started.elapsed()),
            authorize_us = us(self.authorize),
            thaw_us = us(self.thaw),
            sweep_us = us(self.sweep),
            ports_us = us(self.ports),
            clock_us = us(self.clock),
            identity_us = us(self.identity),
            "restored: closed the connections from before the snapshot; /init's phases"
        );
    }
}

/// How long `/init` waits for the metadata service. A restored clone's first connections
/// go through a guest that may share its CPU with many others (software emulation): 1 s was
/// missed under load, and the clone then kept its template's identity. The agent's `/init`
/// deadline (10 s) stays well above this.
const MMDS_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
enum Authorized {
    Yes,
    /// Authorised by the MMDS hash of the empty token: the stored token is cleared.
    ClearToken,
}

/// E2B's token rules: the stored token itself; else the MMDS hash of the given token (or of
/// `""`, which authorises clearing it); else, on first setup, anything.
async fn authorize(envd: &Envd, given: Option<&str>) -> Result<Authorized, &'static str> {
    let current = envd.access_token();
    if current.is_none() && given.is_none() {
        // Nothing to check and nothing to clear: whatever the metadata says, this is allowed.
        return Ok(Authorized::Yes);
    }
    if let (Some(current), Some(given)) = (&current, given)
        && secrets_equal(given.as_bytes(), current.as_bytes())
    {
        return Ok(Authorized::Yes);
    }
    let hash = envd
        .refresh_identity(MMDS_DEADLINE)
        .await
        .map(|m| m.access_token_hash)
        .filter(|h| !h.is_empty());
    match (hash, given) {
        (Some(hash), None)
            if secrets_equal(hash.as_bytes(), crate::mmds::token_hash("").as_bytes()) =>
        {
            Ok(Authorized::ClearToken)
        }
        (Some(hash), Some(given))
            if secrets_equal(hash.as_bytes(), crate::mmds::token_hash(given).as_bytes()) =>
        {
            Ok(Authorized::Yes)
        }
        (Some(_), None) => Err("access token reset not authorized"),
        (Some(_), Some(_)) => Err("access token validation failed"),
        (None, _) if current.is_none() => Ok(Authorized::Yes),
        (None, None) => Err("access token reset not authorized"),
        (None, Some(_)) => Err("access token validation failed"),
    }
}

fn set_clock(timestamp: DateTime<Utc>) {
    let spec = nix::sys::time::TimeSpec::new(
        timestamp.timestamp(),
        i64::from(timestamp.timestamp_subsec_nanos()),
    );
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec) {
        Ok(()) => tracing::info!(%timestamp, "set the system clock"),
        Err(error) => tracing::warn!(%timestamp, %error, "could not set the system clock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_window() {
        assert!(!should_set_clock(1_000, 1_000));
        assert!(!should_set_clock(1_000, 1_040));
        assert!(should_set_clock(1_000, 1_051));
        assert!(!should_set_clock(6_000, 1_000));
        assert!(should_set_clock(6_001, 1_000));
    }

    #[test]
    fn request_fields() {
        let request: InitRequest = serde_json::from_str(
            r#"{"envVars":{"A":"1"},"accessToken":"t","timestamp":"2026-11-28T10:00:00.5Z","defaultUser":"user","defaultWorkdir":"/w","hyperloopIP":"1.2.3.4"}"#,
        )
        .unwrap();
        assert_eq!(request.env_vars.unwrap()["A"], "1");
        assert_eq!(request.timestamp.unwrap().timestamp_subsec_millis(), 500);
        assert_eq!(request.default_user.as_deref(), Some("user"));
    }
}
