//! envd against a metadata service that follows Firecracker's MMDS version 2 protocol (session
//! token by PUT, then GET with the token; 401 without a valid one): identity files and
//! variables, and `/init` token changes authorised by the SHA-512 hash in the metadata.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};
use common::Envd;
use wrenn_envd::mmds::token_hash;

#[derive(Default)]
struct Mmds {
    document: serde_json::Value,
    tokens: Vec<String>,
    token_requests: usize,
    refused: usize,
}

type Shared = Arc<Mutex<Mmds>>;

async fn issue_token(State(mmds): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    let ttl = headers
        .get("x-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if !matches!(ttl, Some(1..=21600)) {
        return (StatusCode::BAD_REQUEST, "invalid ttl".into());
    }
    let mut mmds = mmds.lock().unwrap();
    mmds.token_requests += 1;
    let token = format!("session-{}", mmds.token_requests);
    mmds.tokens.push(token.clone());
    (StatusCode::OK, token)
}

async fn serve_document(State(mmds): State<Shared>, headers: HeaderMap) -> (StatusCode, String) {
    let mut mmds = mmds.lock().unwrap();
    let token = headers
        .get("x-metadata-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !mmds.tokens.iter().any(|t| t == token) {
        mmds.refused += 1;
        return (StatusCode::UNAUTHORIZED, String::new());
    }
    (StatusCode::OK, mmds.document.to_string())
}

async fn start_mmds(document: serde_json::Value) -> (Shared, u16) {
    let shared: Shared = Arc::new(Mutex::new(Mmds {
        document,
        ..Default::default()
    }));
    let app = axum::Router::new()
        .route("/latest/api/token", put(issue_token))
        .route("/", get(serve_document))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (shared, port)
}

fn set_hash(mmds: &Shared, token: &str) {
    mmds.lock().unwrap().document["accessTokenHash"] = serde_json::Value::String(token_hash(token));
}

/// An envd reading its metadata from `127.0.0.1:port`, and its run directory.
fn envd_with_mmds_at(port: u16) -> (Envd, tempfile::TempDir) {
    let run_dir = tempfile::tempdir().unwrap();
    let envd = Envd::start_with(&[
        "--mmds-address",
        &format!("127.0.0.1:{port}"),
        "--run-dir",
        run_dir.path().to_str().unwrap(),
    ]);
    (envd, run_dir)
}

#[tokio::test]
async fn identity_and_token_changes_through_mmds() {
    let document = serde_json::json!({"instanceID": "sbxmmds1", "envID": "base", "address": "", "accessTokenHash": token_hash("first")});
    let (mmds, port) = start_mmds(document).await;
    let (envd, run_dir) = envd_with_mmds_at(port);

    let id_file = run_dir.path().join("e2b/.E2B_SANDBOX_ID");
    wrenn_testkit::wait_until(
        "envd writing the identity files",
        Duration::from_secs(5),
        async || id_file.exists(),
    )
    .await;
    assert_eq!(std::fs::read_to_string(&id_file).unwrap(), "sbxmmds1");
    assert_eq!(
        std::fs::read_to_string(run_dir.path().join("wrenn/template-id")).unwrap(),
        "base"
    );

    let init = |token: Option<&str>| {
        let body = match token {
            Some(token) => format!(r#"{{"accessToken":"{token}"}}"#),
            None => "{}".to_owned(),
        };
        envd.request("POST", "/init", &[], body)
    };
    let envs_status =
        async |headers: &[(&str, &str)]| envd.request("GET", "/envs", headers, "").await.status;
    // The token whose hash MMDS holds is accepted; another is refused.
    assert_eq!(init(Some("wrong")).await.status, 401);
    assert_eq!(init(Some("first")).await.status, 204);
    let envs = envd
        .request("GET", "/envs", &[("x-access-token", "first")], "")
        .await;
    assert_eq!(envs.json()["E2B_SANDBOX_ID"], "sbxmmds1");
    assert_eq!(envs.json()["E2B_TEMPLATE_ID"], "base");

    // A restored clone gets a new token: only the new hash authorises it.
    assert_eq!(init(Some("second")).await.status, 401);
    set_hash(&mmds, "second");
    assert_eq!(init(Some("second")).await.status, 204);
    assert_eq!(envs_status(&[("x-access-token", "first")]).await, 401);
    assert_eq!(envs_status(&[("x-access-token", "second")]).await, 200);

    // Clearing the token needs the hash of "".
    let reply = init(None).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (401, "access token reset not authorized")
    );
    set_hash(&mmds, "");
    assert_eq!(init(None).await.status, 204);
    assert_eq!(envs_status(&[]).await, 200);

    let mmds = mmds.lock().unwrap();
    assert!(
        mmds.token_requests >= 3,
        "envd did not use the V2 token flow"
    );
    assert_eq!(
        mmds.refused, 0,
        "envd read metadata without a valid session token"
    );
}

#[tokio::test]
async fn without_mmds_envd_runs_and_init_keeps_e2b_rules() {
    // An address where nothing answers: envd must still serve, and /init falls back to the
    // no-MMDS rules.
    let (envd, run_dir) = envd_with_mmds_at(wrenn_testkit::free_port());
    assert_eq!(envd.request("GET", "/health", &[], "").await.status, 204);
    // The first token is taken; another is refused.
    for (body, status) in [
        (r#"{"accessToken":"t1"}"#, 204),
        (r#"{"accessToken":"t2"}"#, 401),
    ] {
        let reply = envd.request("POST", "/init", &[], body).await;
        assert_eq!(reply.status, status, "/init with {body}");
    }
    assert!(!run_dir.path().join("e2b").exists());

    // The identity an /init carries is taken at once (the metadata service is not waited for).
    let body = r#"{"accessToken":"t1","metadata":{"instanceID":"sbxgiven","envID":"tpl","address":"","accessTokenHash":""}}"#;
    assert_eq!(envd.request("POST", "/init", &[], body).await.status, 204);
    assert_eq!(
        std::fs::read_to_string(run_dir.path().join("e2b/.E2B_SANDBOX_ID")).unwrap(),
        "sbxgiven"
    );
    let envs = envd
        .request("GET", "/envs", &[("x-access-token", "t1")], "")
        .await;
    assert_eq!(envs.json()["E2B_SANDBOX_ID"], "sbxgiven");
    assert_eq!(envs.json()["E2B_TEMPLATE_ID"], "tpl");
}
