//! Extensions (`wrenn_cp::server`): a server built with one serves its routes under
//! `/ext/<name>` behind the key check and the audit log, asks its hook before every create
//! (a refusal is the caller's 403 and nothing is made), tells it every event in order, and
//! runs its workers until shutdown. Over an in-memory host agent and a real SQLite store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use wrenn_agent_api::fake::{FakeAgent, template};
use wrenn_cp::ControlPlane;
use wrenn_cp::fleet::{Fleet, FleetConfig, LeastLoaded};
use wrenn_cp::http::Caller;
use wrenn_cp::server::{Extension, ExtensionRouter, Server, ServerError};
use wrenn_cp::service::SandboxRequest;
use wrenn_cp::service::hooks::{Hooks, Refusal};
use wrenn_cp::store::{EventRow, Role, Store, Team};

/// What the probe extension saw.
#[derive(Debug, Default)]
struct Seen {
    /// The templates `before_create` was asked about.
    asked: Mutex<Vec<String>>,
    /// Every event's kind and subject, in the order it was told.
    events: Mutex<Vec<(String, String)>>,
    /// Its worker's rounds, and whether it returned.
    rounds: AtomicUsize,
    stopped: AtomicUsize,
}

/// An extension that refuses template `forbidden`, records what it is told, and has a route
/// and a worker.
#[derive(Debug, Default, Clone)]
struct Probe(Arc<Seen>);

#[async_trait::async_trait]
impl Hooks for Probe {
    async fn before_create(&self, _team: &str, request: &SandboxRequest) -> Result<(), Refusal> {
        self.0.asked.lock().unwrap().push(request.template.clone());
        if request.template == "forbidden" {
            return Err(Refusal("the probe forbids this template".into()));
        }
        Ok(())
    }

    async fn on_event(&self, event: &EventRow) {
        let seen = (event.kind.clone(), event.subject.clone());
        self.0.events.lock().unwrap().push(seen);
    }
}

impl Extension for Probe {
    fn name(&self) -> &str {
        "probe"
    }

    fn routes(&self) -> Option<ExtensionRouter> {
        let router = axum::Router::new()
            .route(
                "/whoami",
                axum::routing::get(|caller: Caller| async move {
                    axum::Json(json!({
                        "team": caller.team_id(),
                        "key": caller.key_id(),
                        "admin": caller.role().at_least(Role::Admin),
                    }))
                }),
            )
            .route(
                "/things/{id}",
                axum::routing::post(
                    |axum::extract::Path(id): axum::extract::Path<String>| async move {
                        (StatusCode::ACCEPTED, axum::Json(json!({ "id": id })))
                    },
                ),
            );
        Some(router)
    }

    fn hooks(&self) -> Option<Arc<dyn Hooks>> {
        Some(Arc::new(self.clone()))
    }

    fn workers(
        &self,
        plane: &Arc<ControlPlane>,
        shutdown: &CancellationToken,
    ) -> Vec<BoxFuture<'static, ()>> {
        let (seen, shutdown, _plane) = (self.0.clone(), shutdown.clone(), plane.clone());
        vec![Box::pin(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {
                        seen.rounds.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            seen.stopped.fetch_add(1, Ordering::SeqCst);
        })]
    }
}

/// A control plane over one in-memory host, with team `a` and its owner key.
async fn new_plane() -> (
    ControlPlane,
    tokio::sync::mpsc::Receiver<String>,
    String,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cp.db")).unwrap();
    store
        .create_team(Team {
            id: "team-a".into(),
            name: "a".into(),
            created_at_ms: 0,
            admin: false,
        })
        .await
        .unwrap();
    let (key, _) = wrenn_cp::service::keys::make_key(&store, "team-a", "a", Role::Owner)
        .await
        .unwrap();
    let agent = Arc::new(FakeAgent::new(4, vec![template("base", 512)]));
    let fleet = Fleet::load(
        &store,
        FleetConfig::default(),
        Box::new(LeastLoaded),
        Some(agent),
    )
    .await
    .unwrap();
    let (plane, wake) = ControlPlane::new(store, fleet, None, true);
    (plane, wake, key, dir)
}

/// One request through `router`: its status and JSON body.
async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    let body = if body.is_null() {
        axum::body::Body::empty()
    } else {
        request = request.header("content-type", "application/json");
        axum::body::Body::from(body.to_string())
    };
    let response = router
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn an_extensions_routes_hook_and_worker_run_with_the_server_and_stop_with_it() {
    let (plane, wake, key, _dir) = new_plane().await;
    let probe = Probe::default();
    let server = Server::builder(plane, wake)
        .extension(Arc::new(probe.clone()))
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let started = server.start(shutdown.clone());
    let api = started.api_router();

    // Its routes are keyed: no key, no answer; the caller is the key's.
    let (status, _) = call(&api, "GET", "/ext/probe/whoami", None, Value::Null).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = call(&api, "GET", "/ext/probe/whoami", Some(&key), Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["team"], "team-a");
    assert_eq!(body["admin"], true);
    let (status, _) = call(&api, "GET", "/ext/other/whoami", Some(&key), Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A call that may change state is audited with the route it took.
    let (status, _) = call(
        &api,
        "POST",
        "/ext/probe/things/t1",
        Some(&key),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let audit = started
        .plane
        .store
        .audit(wrenn_cp::store::LogQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0].action, "POST /ext/probe/things/{id}");
    assert_eq!(audit[0].outcome, 202);
    assert_eq!(audit[0].team_id, "team-a");

    // The hook refuses before anything is made: a 403 with its reason, no sandbox, no
    // event; an allowed create goes on.
    let refused = json!({"templateID": "forbidden"});
    let (status, body) = call(&api, "POST", "/sandboxes", Some(&key), refused).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["message"], "the probe forbids this template");
    let (status, body) = call(&api, "GET", "/sandboxes", Some(&key), Value::Null).await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    let (status, body) = call(
        &api,
        "POST",
        "/sandboxes",
        Some(&key),
        json!({"templateID": "base"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["sandboxID"].as_str().unwrap().to_string();
    let (status, _) = call(
        &api,
        "DELETE",
        &format!("/sandboxes/{id}"),
        Some(&key),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(*probe.0.asked.lock().unwrap(), ["forbidden", "base"]);

    // Every event reaches the hook, in order.
    let expected = vec![
        ("sandbox.created".to_string(), id.clone()),
        ("sandbox.killed".to_string(), id.clone()),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = probe.0.events.lock().unwrap().clone();
        if events.len() >= expected.len() {
            assert_eq!(events, expected);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events told: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The worker ran, and returns at shutdown; the server waits for it.
    while probe.0.rounds.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(probe.0.stopped.load(Ordering::SeqCst), 0);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), started.stopped())
        .await
        .expect("the workers stop at shutdown");
    assert_eq!(probe.0.stopped.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn extensions_with_bad_or_shared_names_are_refused() {
    #[derive(Debug)]
    struct Named(&'static str);
    impl Extension for Named {
        fn name(&self) -> &str {
            self.0
        }
    }
    for bad in ["", "Upper", "a/b", "x".repeat(33).leak()] {
        let (plane, wake, _, _dir) = new_plane().await;
        let built = Server::builder(plane, wake)
            .extension(Arc::new(Named(bad)))
            .build();
        assert!(
            matches!(built, Err(ServerError::BadName(ref name)) if name == bad),
            "{bad:?}"
        );
    }
    let (plane, wake, _, _dir) = new_plane().await;
    let built = Server::builder(plane, wake)
        .extension(Arc::new(Named("twice")))
        .extension(Arc::new(Named("twice")))
        .build();
    assert!(matches!(built, Err(ServerError::DuplicateName(_))));
    let (plane, wake, _, _dir) = new_plane().await;
    let server = Server::builder(plane, wake)
        .extension(Arc::new(Named("quiet-1")))
        .build()
        .unwrap();
    // An extension without routes adds none.
    let (status, body) = call(
        &server.api_router(),
        "GET",
        "/ext/quiet-1/x",
        None,
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("no such route"),
        "{body}"
    );
}

#[tokio::test]
async fn a_key_past_its_create_rate_gets_a_429_with_retry_after_and_other_keys_do_not() {
    let (plane, _wake, key, _dir) = new_plane().await;
    let (other, _) = wrenn_cp::service::keys::make_key(&plane.store, "team-a", "b", Role::Member)
        .await
        .unwrap();
    // A token every 1000 s: the third create is refused however slow the machine.
    let plane = plane.with_create_limit(wrenn_cp::ratelimit::RateLimit::new(0.001, 2));
    let api = wrenn_cp::http::router(Arc::new(plane));
    let base = json!({"templateID": "base"});
    for _ in 0..2 {
        let (status, body) = call(&api, "POST", "/sandboxes", Some(&key), base.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let request = Request::builder()
        .method("POST")
        .uri("/sandboxes")
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(base.to_string()))
        .unwrap();
    let response = api.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&retry_after), "{retry_after}");
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("over its rate of sandbox creates"),
        "{body}"
    );
    // The refused create made nothing; another key of the same team has its own rate.
    let (_, listed) = call(&api, "GET", "/sandboxes", Some(&key), Value::Null).await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let (status, body) = call(&api, "POST", "/sandboxes", Some(&other), base).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
