//! Pulling an image from a registry over the distribution API: the manifest (an index narrowed
//! to linux/amd64), the config and the layers, each checked against its digest and kept in the
//! host's [`BlobCache`]. Registries that ask for it get a login: basic, or a bearer token from
//! the realm their challenge names, with the build's credentials when it has some.
//!
//! A user names the registry, so the agent guards where it goes: HTTPS only, and only to public
//! addresses (names are resolved through a filter, literal addresses and redirects are checked),
//! except for the registries the operator lists as insecure (`--insecure-registry`), which are
//! reached over plain HTTP wherever they are.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use wrenn_http::client::reqwest;

use super::OciError;
use super::cache::BlobCache;
use super::reference::{ImageReference, check_digest};

/// The largest manifest or image config read.
const MAX_DOCUMENT_BYTES: usize = 4 << 20;
/// The largest image pulled (its layers compressed, as the manifest declares them).
const MAX_IMAGE_BYTES: u64 = 32 << 30;
/// A blob whose bytes stop coming for this long is given up.
const READ_STALL: Duration = Duration::from_secs(60);

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A login for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// How a layer's bytes are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// A layer of a pulled image, in the blob cache.
#[derive(Debug, Clone)]
pub struct PulledLayer {
    pub digest: String,
    pub size: u64,
    pub compression: Compression,
    pub path: PathBuf,
}

/// What an image's config says its containers run with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `NAME=value` pairs.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// An image on this host: its layers (bottom first) and its config.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub manifest_digest: String,
    pub config: ImageConfig,
    pub layers: Vec<PulledLayer>,
}

/// The agent's registry client.
#[derive(Clone, Debug)]
pub struct Registries {
    http: reqwest::Client,
    /// `host[:port]` of registries reached over plain HTTP.
    plain_http: Arc<HashSet<String>>,
    /// The hosts of those registries, which may be on private addresses.
    private_hosts: Arc<HashSet<String>>,
}

impl Registries {
    /// A client; `insecure` lists the registries (`host[:port]`) reached over plain HTTP and
    /// allowed on private addresses.
    pub fn new(insecure: &[String]) -> Result<Registries, OciError> {
        let plain_http: Arc<HashSet<String>> =
            Arc::new(insecure.iter().map(|r| r.to_ascii_lowercase()).collect());
        let private_hosts: Arc<HashSet<String>> = Arc::new(
            plain_http
                .iter()
                .map(|registry| host_of(registry).to_string())
                .collect(),
        );
        let redirect_hosts = private_hosts.clone();
        let redirect_plain = plain_http.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                return attempt.error("more than 10 redirects");
            }
            match allowed(attempt.url(), &redirect_plain, &redirect_hosts) {
                Ok(()) => attempt.follow(),
                Err(why) => attempt.error(why),
            }
        });
        let http = wrenn_http::client::internet_client_builder()
            .redirect(policy)
            .dns_resolver(Arc::new(PublicResolver {
                private_hosts: private_hosts.clone(),
            }))
            .build()
            .map_err(|error| {
                OciError::Network(format!(
                    "making the registry client: {}",
                    wrenn_http::client::describe(&error)
                ))
            })?;
        Ok(Registries {
            http,
            plain_http,
            private_hosts,
        })
    }

    /// Pulls `reference` into `cache` (layers already there are not fetched again), telling
    /// `progress` what it does.
    pub async fn pull(
        &self,
        reference: &ImageReference,
        credentials: Option<&Credentials>,
        cache: &BlobCache,
        progress: &(dyn Fn(String) + Sync),
    ) -> Result<PulledImage, OciError> {
        let scheme = if self
            .plain_http
            .contains(&reference.api_host().to_ascii_lowercase())
        {
            "http"
        } else {
            "https"
        };
        let mut session = Session {
            base: format!(
                "{scheme}://{}/v2/{}",
                reference.api_host(),
                reference.repository
            ),
            repository: reference.repository.clone(),
            credentials: credentials.cloned(),
            authorization: None,
        };
        let (manifest_digest, manifest) = self
            .manifest(&mut session, reference.manifest_reference(), reference)
            .await?;
        let declared: u64 = manifest
            .layers
            .iter()
            .map(|layer| layer.size.max(0) as u64)
            .sum();
        if declared > MAX_IMAGE_BYTES {
            return Err(OciError::TooLarge(format!(
                "{reference} is {} MiB of layers; the most taken is {} MiB",
                declared >> 20,
                MAX_IMAGE_BYTES >> 20
            )));
        }
        progress(format!(
            "{reference}: manifest {manifest_digest}, {} layers, {:.1} MiB",
            manifest.layers.len(),
            declared as f64 / 1048576.0
        ));
        let config_bytes = self
            .document(&mut session, "blobs", &manifest.config.digest, None)
            .await?
            .1;
        let config = parse_config(&config_bytes)?;
        let mut layers = Vec::new();
        let count = manifest.layers.len();
        for (index, layer) in manifest.layers.iter().enumerate() {
            check_digest(&layer.digest).map_err(OciError::Invalid)?;
            let compression = compression_of(&layer.media_type)?;
            let size = u64::try_from(layer.size).map_err(|_| {
                OciError::Invalid(format!("layer {} has a negative size", layer.digest))
            })?;
            let path = match cache.get(&layer.digest) {
                Some(path) => {
                    progress(format!(
                        "layer {}/{count} {}: cached ({:.1} MiB)",
                        index + 1,
                        short(&layer.digest),
                        size as f64 / 1048576.0
                    ));
                    path
                }
                None => {
                    let started = Instant::now();
                    let path = self
                        .blob_to_cache(&mut session, &layer.digest, size, cache)
                        .await?;
                    let seconds = started.elapsed().as_secs_f64().max(0.001);
                    progress(format!(
                        "layer {}/{count} {}: {:.1} MiB in {:.1} s ({:.1} MiB/s)",
                        index + 1,
                        short(&layer.digest),
                        size as f64 / 1048576.0,
                        seconds,
                        size as f64 / 1048576.0 / seconds
                    ));
                    path
                }
            };
            layers.push(PulledLayer {
                digest: layer.digest.clone(),
                size,
                compression,
                path,
            });
        }
        Ok(PulledImage {
            manifest_digest,
            config,
            layers,
        })
    }

    /// The image manifest for linux/amd64: the one named, or the one an index names for it.
    async fn manifest(
        &self,
        session: &mut Session,
        reference_text: &str,
        reference: &ImageReference,
    ) -> Result<(String, Manifest), OciError> {
        let accept = [INDEX_TYPES, MANIFEST_TYPES].concat().join(", ");
        let expected = reference_text
            .starts_with("sha256:")
            .then_some(reference_text);
        let (media_type, bytes) = self
            .document(
                session,
                "manifests",
                reference_text,
                Some((&accept, expected)),
            )
            .await
            .map_err(|error| match error {
                OciError::NotFound(_) => {
                    OciError::NotFound(format!("the registry has no image {reference}"))
                }
                error => error,
            })?;
        let digest = sha256_digest(&bytes);
        let document: Document = serde_json::from_slice(&bytes)
            .map_err(|error| OciError::Invalid(format!("{reference}'s manifest: {error}")))?;
        if document.schema_version == Some(1) {
            return Err(OciError::Unsupported(format!(
                "{reference} has a schema 1 manifest, which is not supported: push it again with a current tool"
            )));
        }
        let media_type = document.media_type.clone().unwrap_or(media_type);
        let is_index = INDEX_TYPES.contains(&media_type.as_str())
            || (document.manifests.is_some() && document.layers.is_none());
        if !is_index {
            let manifest = Manifest::from_document(document, reference)?;
            return Ok((digest, manifest));
        }
        let entries = document.manifests.unwrap_or_default();
        let chosen = entries
            .iter()
            .filter(|entry| {
                entry.platform.as_ref().is_some_and(|platform| {
                    platform.os == "linux" && platform.architecture == "amd64"
                })
            })
            .min_by_key(|entry| {
                entry
                    .platform
                    .as_ref()
                    .and_then(|platform| platform.variant.clone())
                    .unwrap_or_default()
            })
            .ok_or_else(|| {
                let platforms: Vec<String> = entries
                    .iter()
                    .filter_map(|entry| entry.platform.as_ref())
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect();
                OciError::Unsupported(format!(
                    "{reference} has no linux/amd64 image (it has {})",
                    if platforms.is_empty() {
                        "none named".to_string()
                    } else {
                        platforms.join(", ")
                    }
                ))
            })?;
        check_digest(&chosen.digest).map_err(OciError::Invalid)?;
        let (media_type, bytes) = self
            .document(
                session,
                "manifests",
                &chosen.digest,
                Some((&accept, Some(&chosen.digest))),
            )
            .await?;
        let document: Document = serde_json::from_slice(&bytes)
            .map_err(|error| OciError::Invalid(format!("{reference}'s manifest: {error}")))?;
        if document.manifests.is_some() && document.layers.is_none() {
            return Err(OciError::Invalid(format!(
                "{reference}: an index names another index ({media_type})"
            )));
        }
        Ok((
            chosen.digest.clone(),
            Manifest::from_document(document, reference)?,
        ))
    }

    /// A manifest or a blob read whole (bounded): its media type and bytes. A blob, and a
    /// manifest asked for by digest, must hash to it.
    async fn document(
        &self,
        session: &mut Session,
        kind: &str,
        name: &str,
        manifest: Option<(&str, Option<&str>)>,
    ) -> Result<(String, Vec<u8>), OciError> {
        let url = format!("{}/{kind}/{name}", session.base);
        let accept = manifest.map(|(accept, _)| accept);
        let response = self.get(session, &url, accept).await?;
        let media_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let bytes = wrenn_http::client::read_bounded(response, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|error| OciError::Network(format!("reading {url}: {error}")))?;
        let expected = match manifest {
            Some((_, expected)) => expected,
            None => Some(name),
        };
        if let Some(expected) = expected
            && sha256_digest(&bytes) != expected
        {
            return Err(OciError::DigestMismatch(format!(
                "{url} does not hash to {expected}"
            )));
        }
        Ok((media_type, bytes.to_vec()))
    }

    /// Streams a layer into the cache, checking its size and digest on the way.
    async fn blob_to_cache(
        &self,
        session: &mut Session,
        digest: &str,
        size: u64,
        cache: &BlobCache,
    ) -> Result<PathBuf, OciError> {
        let url = format!("{}/blobs/{digest}", session.base);
        let mut response = self.get(session, &url, None).await?;
        let (part, mut file) = cache.create_part().await?;
        let mut hasher = Sha256::new();
        let mut written: u64 = 0;
        let copied = async {
            loop {
                let chunk = tokio::time::timeout(READ_STALL, response.chunk())
                    .await
                    .map_err(|_| {
                        OciError::Network(format!(
                            "{url}: no bytes for {} s",
                            READ_STALL.as_secs()
                        ))
                    })?
                    .map_err(|error| {
                        OciError::Network(format!(
                            "reading {url}: {}",
                            wrenn_http::client::describe(&error)
                        ))
                    })?;
                let Some(chunk) = chunk else { break };
                written += chunk.len() as u64;
                if written > size {
                    return Err(OciError::DigestMismatch(format!(
                        "{url} is longer than the {size} bytes its manifest declares"
                    )));
                }
                hasher.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|error| OciError::io("writing a layer to the cache", error))?;
            }
            file.flush()
                .await
                .map_err(|error| OciError::io("writing a layer to the cache", error))?;
            file.sync_all()
                .await
                .map_err(|error| OciError::io("writing a layer to the cache", error))?;
            let actual = format!("sha256:{:x}", hasher.finalize());
            if written != size || actual != digest {
                return Err(OciError::DigestMismatch(format!(
                    "{url}: got {written} bytes hashing to {actual}; the manifest declares {size} bytes, {digest}"
                )));
            }
            Ok(())
        }
        .await;
        drop(file);
        match copied {
            Ok(()) => cache.commit(&part, digest),
            Err(error) => {
                let _ = std::fs::remove_file(&part);
                Err(error)
            }
        }
    }

    /// GETs `url` with the session's authorization, logging in once when challenged.
    async fn get(
        &self,
        session: &mut Session,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, OciError> {
        self.check_url(url)?;
        let mut challenged = false;
        loop {
            let mut request = self.http.get(url);
            if let Some(accept) = accept {
                request = request.header(ACCEPT, accept);
            }
            if let Some(authorization) = &session.authorization {
                request = request.header(AUTHORIZATION, authorization);
            }
            let response = request.send().await.map_err(|error| {
                OciError::Network(format!(
                    "GET {url}: {}",
                    wrenn_http::client::describe(&error)
                ))
            })?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status == reqwest::StatusCode::UNAUTHORIZED && !challenged {
                challenged = true;
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                session.authorization = Some(self.login(session, &challenge).await?);
                continue;
            }
            let body = wrenn_http::client::read_bounded(response, 4096)
                .await
                .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
                .unwrap_or_default();
            let said = if body.is_empty() {
                String::new()
            } else {
                format!(": {}", excerpt(&body))
            };
            return Err(match status {
                reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN
                    if session.credentials.is_some() =>
                {
                    OciError::Unauthorized(format!(
                        "the registry refused the credentials for {} ({status}{said})",
                        session.repository
                    ))
                }
                reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::FORBIDDEN => {
                    OciError::Unauthorized(format!(
                        "{} needs credentials (fromImageRegistry), or does not exist ({status})",
                        session.repository
                    ))
                }
                reqwest::StatusCode::NOT_FOUND => OciError::NotFound(format!("{url}: not found")),
                status => OciError::Refused(format!("GET {url}: {status}{said}")),
            });
        }
    }

    /// The Authorization value a challenge asks for.
    async fn login(&self, session: &Session, challenge: &str) -> Result<String, OciError> {
        let (scheme, params) = parse_challenge(challenge);
        let basic = session.credentials.as_ref().map(|credentials| {
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", credentials.username, credentials.password))
        });
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => basic
                .map(|encoded| format!("Basic {encoded}"))
                .ok_or_else(|| {
                    OciError::Unauthorized(format!(
                        "{} needs credentials (fromImageRegistry)",
                        session.repository
                    ))
                }),
            "bearer" => {
                let realm = params
                    .iter()
                    .find(|(key, _)| key == "realm")
                    .map(|(_, value)| value.clone())
                    .ok_or_else(|| {
                        OciError::Invalid(format!(
                            "the registry's challenge names no realm: {challenge}"
                        ))
                    })?;
                let mut query: Vec<(String, String)> = params
                    .into_iter()
                    .filter(|(key, _)| key == "service" || key == "scope")
                    .collect();
                if !query.iter().any(|(key, _)| key == "scope") {
                    query.push((
                        "scope".into(),
                        format!("repository:{}:pull", session.repository),
                    ));
                }
                self.check_url(&realm)?;
                let mut request = self.http.get(&realm).query(&query);
                if let Some(encoded) = &basic {
                    request = request.header(AUTHORIZATION, format!("Basic {encoded}"));
                }
                let response = request.send().await.map_err(|error| {
                    OciError::Network(format!(
                        "asking {realm} for a token: {}",
                        wrenn_http::client::describe(&error)
                    ))
                })?;
                let status = response.status();
                if status == reqwest::StatusCode::UNAUTHORIZED
                    || status == reqwest::StatusCode::FORBIDDEN
                {
                    return Err(OciError::Unauthorized(if basic.is_some() {
                        format!(
                            "the registry refused the credentials for {} ({status})",
                            session.repository
                        )
                    } else {
                        format!(
                            "{} needs credentials (fromImageRegistry) ({status})",
                            session.repository
                        )
                    }));
                }
                if !status.is_success() {
                    return Err(OciError::Refused(format!(
                        "{realm} answered {status} to a token request"
                    )));
                }
                let bytes = wrenn_http::client::read_bounded(response, 1 << 20)
                    .await
                    .map_err(|error| {
                        OciError::Network(format!("reading a token from {realm}: {error}"))
                    })?;
                let token: TokenAnswer = serde_json::from_slice(&bytes).map_err(|error| {
                    OciError::Invalid(format!("{realm}'s token answer: {error}"))
                })?;
                let token = token
                    .token
                    .or(token.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| OciError::Invalid(format!("{realm} answered no token")))?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(OciError::Unsupported(format!(
                "the registry asks for a login this agent does not speak: {challenge:?}"
            ))),
        }
    }

    /// Refuses a URL the agent must not fetch (see the module's documentation).
    fn check_url(&self, url: &str) -> Result<(), OciError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|error| OciError::Invalid(format!("{url:?} is not a URL: {error}")))?;
        allowed(&parsed, &self.plain_http, &self.private_hosts).map_err(OciError::Refused)
    }
}

/// Whether the agent may fetch `url`: HTTPS to a public address, or a listed insecure registry.
fn allowed(
    url: &reqwest::Url,
    plain_http: &HashSet<String>,
    private_hosts: &HashSet<String>,
) -> Result<(), String> {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    let host_port = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.clone(),
    };
    let listed = plain_http.contains(&host_port) || private_hosts.contains(&host);
    match url.scheme() {
        "https" => {}
        "http" if listed => {}
        scheme => {
            return Err(format!(
                "{url} is refused: only HTTPS is used ({scheme} is allowed only for registries the agent lists with --insecure-registry)"
            ));
        }
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(address) = literal.parse::<IpAddr>()
        && !listed
        && !is_public(address)
    {
        return Err(format!(
            "{url} is refused: {address} is not a public address (list the registry with --insecure-registry to allow it)"
        ));
    }
    Ok(())
}

/// Resolves names to their public addresses only (but for the listed registries' hosts).
struct PublicResolver {
    private_hosts: Arc<HashSet<String>>,
}

impl reqwest::dns::Resolve for PublicResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let allow_private = self.private_hosts.contains(&host);
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = addresses
                .iter()
                .copied()
                .filter(|address| allow_private || is_public(address.ip()))
                .collect();
            if kept.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = format!(
                    "{host} resolves to no public address (list the registry with --insecure-registry to allow it)"
                )
                .into();
                return Err(error);
            }
            let addresses: reqwest::dns::Addrs = Box::new(kept.into_iter());
            Ok(addresses)
        })
    }
}

/// Whether `address` is on the internet: not loopback, private, link-local, shared (CGNAT),
/// multicast, documentation or unspecified.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

/// `host` of `host[:port]` (and `[v6]:port`).
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// A challenge's scheme and its `key="value"` parameters.
fn parse_challenge(challenge: &str) -> (String, Vec<(String, String)>) {
    let challenge = challenge.trim();
    let (scheme, rest) = challenge.split_once(' ').unwrap_or((challenge, ""));
    let mut params = Vec::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (quoted[..end].to_string(), &quoted[end + 1..]),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        params.push((key, value));
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_string(), params)
}

fn compression_of(media_type: &str) -> Result<Compression, OciError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Compression::Gzip),
        other if other.ends_with("+zstd") => Err(OciError::Unsupported(format!(
            "zstd-compressed layers ({other}) are not supported yet: push the image with gzip layers"
        ))),
        other => Err(OciError::Unsupported(format!(
            "a layer of media type {other:?} is not an image layer this agent unpacks"
        ))),
    }
}

fn parse_config(bytes: &[u8]) -> Result<ImageConfig, OciError> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        architecture: Option<String>,
        #[serde(default)]
        os: Option<String>,
        #[serde(default)]
        config: Option<Runtime>,
    }
    #[derive(Deserialize)]
    struct Runtime {
        #[serde(rename = "Env", default)]
        env: Option<Vec<String>>,
        #[serde(rename = "WorkingDir", default)]
        working_dir: Option<String>,
        #[serde(rename = "User", default)]
        user: Option<String>,
    }
    let config: Config = serde_json::from_slice(bytes)
        .map_err(|error| OciError::Invalid(format!("the image's config: {error}")))?;
    if let Some(os) = config.os.as_deref().filter(|os| *os != "linux") {
        return Err(OciError::Unsupported(format!(
            "the image is for {os}, not linux"
        )));
    }
    if let Some(arch) = config
        .architecture
        .as_deref()
        .filter(|arch| *arch != "amd64")
    {
        return Err(OciError::Unsupported(format!(
            "the image is for {arch}; wrenn's guests are amd64"
        )));
    }
    let runtime = config.config;
    let nonempty = |value: Option<String>| value.filter(|text| !text.trim().is_empty());
    Ok(ImageConfig {
        env: runtime
            .as_ref()
            .and_then(|runtime| runtime.env.clone())
            .unwrap_or_default(),
        working_dir: nonempty(runtime.as_ref().and_then(|r| r.working_dir.clone())),
        user: nonempty(runtime.and_then(|r| r.user)),
    })
}

/// What a registry session knows: where, who, and the login it holds.
struct Session {
    base: String,
    repository: String,
    credentials: Option<Credentials>,
    authorization: Option<String>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
}

/// A manifest or an index, as far as it is read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    schema_version: Option<u32>,
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<IndexEntry>>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: i64,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

impl Manifest {
    fn from_document(document: Document, reference: &ImageReference) -> Result<Manifest, OciError> {
        let config = document
            .config
            .ok_or_else(|| OciError::Invalid(format!("{reference}'s manifest names no config")))?;
        check_digest(&config.digest).map_err(OciError::Invalid)?;
        Ok(Manifest {
            config,
            layers: document.layers.unwrap_or_default(),
        })
    }
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn excerpt(text: &str) -> String {
    let mut kept: String = text.chars().take(300).collect();
    if kept.len() < text.len() {
        kept.push('…');
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_parsed_with_quoted_commas() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            params,
            vec![
                (
                    "realm".to_string(),
                    "https://auth.example.com/token".to_string()
                ),
                ("service".to_string(), "registry.example.com".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string()),
            ]
        );
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "Basic");
        assert_eq!(params[0].1, "Registry Realm");
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "224.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "151.101.1.1", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn urls_are_checked_for_scheme_and_address() {
        let plain: HashSet<String> = ["127.0.0.1:5000".to_string()].into();
        let hosts: HashSet<String> = ["127.0.0.1".to_string()].into();
        let check = |url: &str| allowed(&reqwest::Url::parse(url).unwrap(), &plain, &hosts);
        assert!(check("http://127.0.0.1:5000/v2/a/manifests/b").is_ok());
        assert!(check("https://registry.example.com/v2/").is_ok());
        let error = check("http://registry.example.com/v2/").unwrap_err();
        assert!(error.contains("only HTTPS"), "{error}");
        let error = check("https://169.254.169.254/latest").unwrap_err();
        assert!(error.contains("not a public address"), "{error}");
        let error = check("https://[::1]:8443/").unwrap_err();
        assert!(error.contains("not a public address"), "{error}");
    }

    #[test]
    fn configs_give_env_workdir_and_user_and_refuse_other_platforms() {
        let config = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=1"],"WorkingDir":"/app","User":"app"}}"#,
        )
        .unwrap();
        assert_eq!(config.env, vec!["PATH=/bin", "A=1"]);
        assert_eq!(config.working_dir.as_deref(), Some("/app"));
        assert_eq!(config.user.as_deref(), Some("app"));
        assert_eq!(
            parse_config(br#"{"config":{"User":""}}"#).unwrap(),
            ImageConfig::default()
        );
        let error = parse_config(br#"{"architecture":"arm64","os":"linux"}"#).unwrap_err();
        assert!(error.to_string().contains("arm64"), "{error}");
        let error = compression_of("application/vnd.oci.image.layer.v1.tar+zstd").unwrap_err();
        assert!(error.to_string().contains("zstd"), "{error}");
    }
}
