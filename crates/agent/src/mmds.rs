//! A metadata service compatible with Firecracker's MMDS V2, served by the agent to QEMU guests:
//! every slot's namespace sends the guest's `169.254.169.254:80` here, with the slot address as
//! the source, which says whose metadata to answer with. `PUT /latest/api/token` (with a TTL
//! header) gives a session token; `GET` with that token gives the JSON document (E2B's keys).
//! Requests from addresses that are no sandbox's get 403.
//!
//! A guest may ask for tokens without end, so a slot holds at most [`MAX_TOKENS_PER_SLOT`]
//! (asking for another retires its oldest), tokens are found by hash lookup, and the lock is
//! held only for a few map operations, never across I/O: the memory of the registry is bounded
//! by the number of slots, and one guest's flood costs the others nothing but CPU time.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::network::Slot;

/// A sandbox's metadata document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metadata {
    #[serde(rename = "instanceID")]
    pub instance_id: String,
    #[serde(rename = "envID")]
    pub env_id: String,
    /// Where envd sends logs (none here).
    pub address: String,
    /// Hex SHA-512 of the sandbox's envd access token (of "" when it has none).
    #[serde(rename = "accessTokenHash")]
    pub access_token_hash: String,
}

/// Hex SHA-512 of a token, as envd checks it (one definition for both: wrenn-core's).
pub use wrenn_core::access_token_hash as token_hash;

/// Session tokens a slot may hold at once.
pub const MAX_TOKENS_PER_SLOT: usize = 8;

#[derive(Debug, Default)]
struct SlotEntry {
    metadata: Option<Metadata>,
    /// Its tokens, oldest first.
    tokens: VecDeque<String>,
}

#[derive(Debug, Default)]
struct Registry {
    by_slot: HashMap<u32, SlotEntry>,
    /// Session tokens: token → (slot, expiry).
    tokens: HashMap<String, (u32, Instant)>,
}

/// The metadata of every sandbox, by slot.
#[derive(Debug, Clone, Default)]
pub struct MmdsRegistry {
    inner: Arc<Mutex<Registry>>,
}

const MAX_TTL_SECONDS: u64 = 21_600;

/// Why a token is not given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no sandbox runs in this slot")]
    UnknownSlot,
    #[error("no randomness for a token: {0}")]
    NoRandomness(String),
}

impl MmdsRegistry {
    pub fn set(&self, slot: u32, metadata: Metadata) {
        self.inner
            .lock()
            .expect("mmds lock")
            .by_slot
            .entry(slot)
            .or_default()
            .metadata = Some(metadata);
    }

    pub fn remove(&self, slot: u32) {
        let mut registry = self.inner.lock().expect("mmds lock");
        if let Some(entry) = registry.by_slot.remove(&slot) {
            for token in entry.tokens {
                registry.tokens.remove(&token);
            }
        }
    }

    /// A new session token for `slot`, valid for `ttl`; the slot's oldest goes if it holds
    /// [`MAX_TOKENS_PER_SLOT`] already.
    pub fn issue_token(&self, slot: u32, ttl: Duration) -> Result<String, TokenError> {
        let token = new_token()?;
        let mut guard = self.inner.lock().expect("mmds lock");
        let registry = &mut *guard;
        let entry = registry
            .by_slot
            .get_mut(&slot)
            .filter(|entry| entry.metadata.is_some())
            .ok_or(TokenError::UnknownSlot)?;
        while entry.tokens.len() >= MAX_TOKENS_PER_SLOT {
            if let Some(oldest) = entry.tokens.pop_front() {
                registry.tokens.remove(&oldest);
            }
        }
        entry.tokens.push_back(token.clone());
        registry
            .tokens
            .insert(token.clone(), (slot, Instant::now() + ttl));
        Ok(token)
    }

    /// The metadata of `slot` if `token` is one of its live tokens.
    pub fn metadata_for(&self, slot: u32, token: &str) -> Option<Metadata> {
        let mut guard = self.inner.lock().expect("mmds lock");
        let registry = &mut *guard;
        let (owner, expiry) = *registry.tokens.get(token)?;
        if owner != slot {
            return None;
        }
        if expiry <= Instant::now() {
            registry.tokens.remove(token);
            if let Some(entry) = registry.by_slot.get_mut(&owner) {
                entry.tokens.retain(|held| held != token);
            }
            return None;
        }
        registry.by_slot.get(&slot)?.metadata.clone()
    }

    /// How many tokens are held now, all slots together.
    pub fn token_count(&self) -> usize {
        self.inner.lock().expect("mmds lock").tokens.len()
    }

    /// The service's routes (serve with `into_make_service_with_connect_info::<SocketAddr>`).
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .fallback(handle)
            .with_state(self.clone())
    }
}

fn slot_of(peer: SocketAddr) -> Option<u32> {
    match peer.ip() {
        IpAddr::V4(address) => Slot::index_of_address(address),
        IpAddr::V6(address) => address.to_ipv4_mapped().and_then(Slot::index_of_address),
    }
}

fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|name| headers.get(*name)?.to_str().ok())
}

async fn handle(
    State(registry): State<MmdsRegistry>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let Some(slot) = slot_of(peer) else {
        return (StatusCode::FORBIDDEN, "not a sandbox").into_response();
    };
    match (method, uri.path()) {
        (Method::PUT, "/latest/api/token") => {
            let ttl = header(
                &headers,
                &[
                    "x-metadata-token-ttl-seconds",
                    "x-aws-ec2-metadata-token-ttl-seconds",
                ],
            )
            .and_then(|value| value.parse::<u64>().ok());
            let Some(ttl) = ttl.filter(|ttl| (1..=MAX_TTL_SECONDS).contains(ttl)) else {
                return (
                    StatusCode::BAD_REQUEST,
                    "token TTL must be 1 to 21600 seconds",
                )
                    .into_response();
            };
            match registry.issue_token(slot, Duration::from_secs(ttl)) {
                Ok(token) => token.into_response(),
                Err(TokenError::UnknownSlot) => {
                    (StatusCode::FORBIDDEN, "no sandbox runs here").into_response()
                }
                Err(error) => {
                    tracing::error!(%error, "could not issue an MMDS token");
                    (StatusCode::INTERNAL_SERVER_ERROR, "no token").into_response()
                }
            }
        }
        (Method::GET, path) => {
            let token = header(&headers, &["x-metadata-token", "x-aws-ec2-metadata-token"]);
            let Some(metadata) = token.and_then(|token| registry.metadata_for(slot, token)) else {
                return (
                    StatusCode::UNAUTHORIZED,
                    "a valid session token is required",
                )
                    .into_response();
            };
            let document = serde_json::to_value(&metadata).unwrap_or_default();
            let key = path.trim_matches('/');
            let value = if key.is_empty() {
                Some(&document)
            } else {
                document.get(key)
            };
            match value {
                Some(value) => axum::Json(value.clone()).into_response(),
                None => (StatusCode::NOT_FOUND, "no such key").into_response(),
            }
        }
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "MMDS V2 accepts PUT for tokens and GET",
        )
            .into_response(),
    }
}

fn new_token() -> Result<String, TokenError> {
    wrenn_core::random::hex_token(32).map_err(|error| TokenError::NoRandomness(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slot_addresses_are_served() {
        assert_eq!(slot_of("10.201.0.7:5000".parse().unwrap()), Some(7));
        assert_eq!(slot_of("127.0.0.1:5000".parse().unwrap()), None);
    }

    fn metadata(id: &str) -> Metadata {
        Metadata {
            instance_id: id.into(),
            env_id: "base".into(),
            address: String::new(),
            access_token_hash: token_hash(""),
        }
    }

    #[test]
    fn a_token_flood_keeps_the_registry_bounded_and_other_slots_served() {
        let registry = MmdsRegistry::default();
        registry.set(1, metadata("flooder"));
        registry.set(2, metadata("neighbour"));
        let neighbours = registry.issue_token(2, Duration::from_secs(60)).unwrap();
        let mut last = String::new();
        for _ in 0..100_000 {
            last = registry.issue_token(1, Duration::from_secs(60)).unwrap();
        }
        assert_eq!(registry.token_count(), MAX_TOKENS_PER_SLOT + 1);
        assert_eq!(
            registry.metadata_for(1, &last).unwrap().instance_id,
            "flooder"
        );
        assert_eq!(
            registry.metadata_for(2, &neighbours).unwrap().instance_id,
            "neighbour"
        );
        // A token answers only in its own slot.
        assert!(registry.metadata_for(2, &last).is_none());
        assert!(registry.metadata_for(1, &neighbours).is_none());
        // No token for a slot without a sandbox; none left after a slot goes.
        assert_eq!(
            registry.issue_token(3, Duration::from_secs(60)),
            Err(TokenError::UnknownSlot)
        );
        registry.remove(1);
        assert_eq!(registry.token_count(), 1);
    }

    #[test]
    fn the_oldest_token_retires_and_expired_ones_fail() {
        let registry = MmdsRegistry::default();
        registry.set(1, metadata("a"));
        let first = registry.issue_token(1, Duration::from_secs(60)).unwrap();
        for _ in 0..MAX_TOKENS_PER_SLOT {
            registry.issue_token(1, Duration::from_secs(60)).unwrap();
        }
        assert!(registry.metadata_for(1, &first).is_none(), "retired");
        let short = registry.issue_token(1, Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(registry.metadata_for(1, &short).is_none(), "expired");
        assert_eq!(registry.token_count(), MAX_TOKENS_PER_SLOT - 1);
    }
}
