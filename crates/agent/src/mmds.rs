//! A metadata service compatible with Firecracker's MMDS V2, served by the agent to QEMU guests:
//! every slot's namespace sends the guest's `169.254.169.254:80` here, with the slot address as
//! the source, which says whose metadata to answer with. `PUT /latest/api/token` (with a TTL
//! header) gives a session token; `GET` with that token gives the JSON document (E2B's keys).
//! Requests from addresses that are no sandbox's get 403.

use std::collections::HashMap;
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

/// Hex SHA-512 of a token, as envd checks it.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha512::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[derive(Debug, Default)]
struct Registry {
    by_slot: HashMap<u32, Metadata>,
    /// Session tokens: token → (slot, expiry).
    tokens: HashMap<String, (u32, Instant)>,
}

/// The metadata of every sandbox, by slot.
#[derive(Debug, Clone, Default)]
pub struct MmdsRegistry {
    inner: Arc<Mutex<Registry>>,
}

const MAX_TTL_SECONDS: u64 = 21_600;

impl MmdsRegistry {
    pub fn set(&self, slot: u32, metadata: Metadata) {
        self.inner
            .lock()
            .expect("mmds lock")
            .by_slot
            .insert(slot, metadata);
    }

    pub fn remove(&self, slot: u32) {
        let mut registry = self.inner.lock().expect("mmds lock");
        registry.by_slot.remove(&slot);
        registry.tokens.retain(|_, (owner, _)| *owner != slot);
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
    let mut inner = registry.inner.lock().expect("mmds lock");
    let now = Instant::now();
    inner.tokens.retain(|_, (_, expiry)| *expiry > now);
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
            let token = new_token();
            inner
                .tokens
                .insert(token.clone(), (slot, now + Duration::from_secs(ttl)));
            token.into_response()
        }
        (Method::GET, path) => {
            let token = header(&headers, &["x-metadata-token", "x-aws-ec2-metadata-token"]);
            let valid = token
                .and_then(|token| inner.tokens.get(token))
                .is_some_and(|(owner, _)| *owner == slot);
            if !valid {
                return (
                    StatusCode::UNAUTHORIZED,
                    "a valid session token is required",
                )
                    .into_response();
            }
            let Some(metadata) = inner.by_slot.get(&slot) else {
                return (StatusCode::NOT_FOUND, "no metadata for this sandbox").into_response();
            };
            let document = serde_json::to_value(metadata).unwrap_or_default();
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

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut random, &mut bytes);
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_envds() {
        assert!(token_hash("").starts_with("cf83e1357eefb8bd"));
        assert_eq!(token_hash("x").len(), 128);
    }

    #[test]
    fn only_slot_addresses_are_served() {
        assert_eq!(slot_of("10.201.0.7:5000".parse().unwrap()), Some(7));
        assert_eq!(slot_of("127.0.0.1:5000".parse().unwrap()), None);
    }
}
