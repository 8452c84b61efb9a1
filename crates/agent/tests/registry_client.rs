//! The agent's registry client against a registry served here over the distribution API, with
//! what Debian's registry (the VM tests' one) does not do: a bearer-token login from a realm,
//! an index of several platforms, and blobs that do not match their digest. No root, no VM.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use wrenn_agent::oci::{BlobCache, Credentials, ImageReference, OciError, Registries, layers};

/// What the test registry serves: documents and blobs by digest, manifests by tag too.
#[derive(Default)]
struct Served {
    blobs: HashMap<String, Vec<u8>>,
    tags: HashMap<String, (String, String)>,
    token_requests: AtomicUsize,
    blob_requests: AtomicUsize,
    port: u16,
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A gzipped tar layer holding `files`.
fn layer(files: &[(&str, &str)]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_uid(u64::from(nix::unistd::geteuid().as_raw()));
        header.set_gid(u64::from(nix::unistd::getegid().as_raw()));
        header.set_size(body.len() as u64);
        tar.append_data(&mut header, path, body.as_bytes()).unwrap();
    }
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&tar.into_inner().unwrap()).unwrap();
    gzip.finish().unwrap()
}

impl Served {
    fn add(&mut self, bytes: Vec<u8>) -> String {
        let digest = digest(&bytes);
        self.blobs.insert(digest.clone(), bytes);
        digest
    }

    /// An image: its manifest's digest. `corrupt` serves a layer whose bytes are not its digest.
    fn image(&mut self, files: &[(&str, &str)], corrupt: bool) -> String {
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "WorkingDir": "/srv", "User": "svc"},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = self.add(config_bytes.clone());
        let layer_bytes = layer(files);
        let layer_digest = self.add(layer_bytes.clone());
        if corrupt {
            let mut bad = layer_bytes.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0xff;
            self.blobs.insert(layer_digest.clone(), bad);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_bytes.len()}],
        });
        self.add(serde_json::to_vec(&manifest).unwrap())
    }
}

async fn manifest(
    State(served): State<Arc<Served>>,
    Path((namespace, repository, reference)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = challenge(&served, &headers, &format!("{namespace}/{repository}")) {
        return refused;
    }
    let (media_type, digest) = match served
        .tags
        .get(&format!("{namespace}/{repository}:{reference}"))
    {
        Some(tagged) => tagged.clone(),
        None if served.blobs.contains_key(&reference) => (MANIFEST.to_string(), reference),
        None => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [(header::CONTENT_TYPE, media_type)],
        served.blobs[&digest].clone(),
    )
        .into_response()
}

async fn blob(
    State(served): State<Arc<Served>>,
    Path((namespace, repository, digest)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = challenge(&served, &headers, &format!("{namespace}/{repository}")) {
        return refused;
    }
    served.blob_requests.fetch_add(1, Ordering::Relaxed);
    match served.blobs.get(&digest) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A 401 asking for a bearer token from this registry's realm, unless the request has one.
fn challenge(served: &Served, headers: &HeaderMap, repository: &str) -> Option<Response> {
    let authorized = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|value| value == "Bearer token-for-robot");
    (!authorized).then(|| {
        let value = format!(
            "Bearer realm=\"http://127.0.0.1:{}/token\",service=\"test-registry\",scope=\"repository:{repository}:pull\"",
            served.port
        );
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, value)]).into_response()
    })
}

async fn token(
    State(served): State<Arc<Served>>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    served.token_requests.fetch_add(1, Ordering::Relaxed);
    // robot:s3cret
    let expected = "Basic cm9ib3Q6czNjcmV0";
    if query.get("service").map(String::as_str) != Some("test-registry")
        || !query
            .get("scope")
            .is_some_and(|scope| scope.ends_with(":pull"))
    {
        return StatusCode::BAD_REQUEST.into_response();
    }
    if headers
        .get(header::AUTHORIZATION)
        .is_none_or(|value| value != expected)
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    axum::Json(serde_json::json!({"token": "token-for-robot"})).into_response()
}

/// Serves `served` on a loopback port; the registry's `host:port`.
async fn serve(mut served: Served) -> (String, Arc<Served>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    served.port = listener.local_addr().unwrap().port();
    let served = Arc::new(served);
    let router = axum::Router::new()
        .route(
            "/v2/{namespace}/{repository}/manifests/{reference}",
            get(manifest),
        )
        .route("/v2/{namespace}/{repository}/blobs/{digest}", get(blob))
        .route("/token", get(token))
        .with_state(served.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("127.0.0.1:{}", served.port), served)
}

fn robot() -> Credentials {
    Credentials {
        username: "robot".into(),
        password: "s3cret".into(),
    }
}

#[tokio::test]
async fn an_index_is_narrowed_to_amd64_with_a_bearer_login_and_layers_are_cached() {
    let mut served = Served::default();
    let amd64 = served.image(&[("srv/which", "amd64\n")], false);
    let arm64 = served.image(&[("srv/which", "arm64\n")], false);
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": INDEX,
        "manifests": [
            {"mediaType": MANIFEST, "digest": arm64, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": MANIFEST, "digest": amd64, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    });
    let index_digest = served.add(serde_json::to_vec(&index).unwrap());
    served
        .tags
        .insert("team/app:v1".into(), (INDEX.into(), index_digest));
    let (registry, served) = serve(served).await;
    let registries = Registries::new(std::slice::from_ref(&registry)).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(cache_dir.path(), 1 << 30).unwrap();
    let reference = ImageReference::parse(&format!("{registry}/team/app:v1")).unwrap();
    let progress = |_: String| {};

    let error = registries
        .pull(&reference, None, &cache, &progress)
        .await
        .unwrap_err();
    assert!(matches!(error, OciError::Unauthorized(_)), "{error}");
    assert!(error.to_string().contains("needs credentials"), "{error}");
    let wrong = Credentials {
        password: "guess".into(),
        ..robot()
    };
    let error = registries
        .pull(&reference, Some(&wrong), &cache, &progress)
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("refused the credentials"),
        "{error}"
    );

    let lines = std::sync::Mutex::new(Vec::new());
    let record = |line: String| lines.lock().unwrap().push(line);
    let image = registries
        .pull(&reference, Some(&robot()), &cache, &record)
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, amd64);
    assert_eq!(image.config.user.as_deref(), Some("svc"));
    assert_eq!(image.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(image.config.env, vec!["PATH=/bin", "FROM_IMAGE=yes"]);
    let tree = tempfile::tempdir().unwrap();
    layers::unpack_layers(
        &image.layers,
        tree.path(),
        &AtomicBool::new(false),
        u64::MAX,
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(tree.path().join("srv/which")).unwrap(),
        "amd64\n"
    );
    let fetched = served.blob_requests.load(Ordering::Relaxed);
    assert_eq!(fetched, 2, "the config and the one layer");

    // Again: the layer is the cache's (only the config is fetched).
    let again = registries
        .pull(&reference, Some(&robot()), &cache, &record)
        .await
        .unwrap();
    assert_eq!(served.blob_requests.load(Ordering::Relaxed), fetched + 1);
    assert_eq!(again.layers[0].path, image.layers[0].path);
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(": cached (")),
        "{:?}",
        lines.lock().unwrap()
    );

    // Pinned by digest, the manifest is fetched by it and checked.
    let pinned = ImageReference::parse(&format!("{registry}/team/app@{amd64}")).unwrap();
    let image = registries
        .pull(&pinned, Some(&robot()), &cache, &progress)
        .await
        .unwrap();
    assert_eq!(image.manifest_digest, amd64);
}

#[tokio::test]
async fn a_layer_that_is_not_its_digest_is_refused_and_not_kept() {
    let mut served = Served::default();
    let manifest = served.image(&[("etc/x", "x")], true);
    served
        .tags
        .insert("team/bad:v1".into(), (MANIFEST.into(), manifest));
    let (registry, _served) = serve(served).await;
    let registries = Registries::new(std::slice::from_ref(&registry)).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(cache_dir.path(), 1 << 30).unwrap();
    let reference = ImageReference::parse(&format!("{registry}/team/bad:v1")).unwrap();
    let error = registries
        .pull(&reference, Some(&robot()), &cache, &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(error, OciError::DigestMismatch(_)), "{error}");
    let kept: Vec<_> = walk(cache_dir.path());
    assert!(kept.is_empty(), "nothing kept: {kept:?}");
}

#[tokio::test]
async fn unlisted_registries_are_https_on_public_addresses_only() {
    let (registry, served) = serve(Served::default()).await;
    // Not listed as insecure: the loopback is refused before any request.
    let registries = Registries::new(&[]).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(cache_dir.path(), 1 << 30).unwrap();
    for image in [
        format!("{registry}/team/app:v1"),
        "localhost:1/team/app:v1".to_string(),
        "169.254.169.254/latest/meta-data:v1".to_string(),
    ] {
        let reference = ImageReference::parse(&image).unwrap();
        let error = registries
            .pull(&reference, None, &cache, &|_| {})
            .await
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("not a public address") || text.contains("no public address"),
            "{image}: {text}"
        );
    }
    assert_eq!(served.token_requests.load(Ordering::Relaxed), 0);
    assert_eq!(served.blob_requests.load(Ordering::Relaxed), 0);
}

/// The files under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            found.extend(walk(&entry.path()));
        } else {
            found.push(entry.path());
        }
    }
    found
}
