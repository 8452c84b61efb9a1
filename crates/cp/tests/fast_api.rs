//! The REST API, lifecycles, placement, reconcile and auth over an in-memory host agent
//! ([`wrenn_agent_api::fake::FakeAgent`]) and a real SQLite store: no root, no QEMU, seconds.
//! The real-VM suites (`crates/wrenn/tests/api.rs`, `tests/platform`) are the end-to-end tier.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use wrenn_agent_api::fake::{FakeAgent, Operation, template};
use wrenn_agent_api::fleet_tls;
use wrenn_agent_api::join::TemplateReport;
use wrenn_agent_api::{HostAgentError, SandboxState};
use wrenn_cp::ControlPlane;
use wrenn_cp::fleet::{EMBEDDED_HOST_ID, Fleet, FleetConfig, LeastLoaded};
use wrenn_cp::quota::Quotas;
use wrenn_cp::store::{ApiKey, Store, Team};

/// The token agents join the kit's fleet with.
const JOIN_TOKEN: &str = "join-secret";

/// A control plane over one in-memory host, with two teams' keys.
struct Kit {
    plane: Arc<ControlPlane>,
    agent: Arc<FakeAgent>,
    /// Team `a`'s key, and team `b`'s.
    key_a: String,
    key_b: String,
    /// The store's SQLite file.
    database: std::path::PathBuf,
    /// The fleet's certificate authorities.
    authority: Arc<wrenn_cp::fleet::pki::FleetAuthority>,
    /// The calls made through [`Kit::call_full`] that the audit log must record: started,
    /// and answered.
    audited: (std::sync::atomic::AtomicI64, std::sync::atomic::AtomicI64),
    _dir: tempfile::TempDir,
}

/// A fake agent joined to a kit's fleet as a host in another process joins it: served over the
/// agent's Connect API with the fleet's mutual TLS, registered through the fleet registry.
struct Joined {
    agent: Arc<FakeAgent>,
    host_id: String,
    heartbeat_token: String,
    /// The registry's client, presenting the host's certificate.
    registry: wrenn_connect::client::ConnectClient,
}

/// An agent's side of the fleet's TLS in a test: the certificate it presents (none until it
/// registered) and the control plane's authority it trusts.
struct AgentTls {
    identity: Arc<fleet_tls::Identity>,
    plane_ca: String,
}

impl AgentTls {
    fn new(kit: &Kit) -> AgentTls {
        AgentTls {
            identity: fleet_tls::Identity::none(),
            plane_ca: kit.authority.plane_ca_pem().to_string(),
        }
    }

    /// The registry at `fleet_url`, called over the fleet's TLS with `codec`.
    fn registry(
        &self,
        fleet_url: &str,
        codec: wrenn_connect::Codec,
    ) -> wrenn_connect::client::ConnectClient {
        let settings = fleet_tls::client_config(
            fleet_tls::roots(&self.plane_ca).unwrap(),
            fleet_tls::PLANE_NAME,
            self.identity.clone(),
            fleet_tls::Alpn::Http1,
        )
        .unwrap();
        wrenn_connect::client::ConnectClient::new(
            fleet_url,
            wrenn_connect::client::HttpVersion::Http1,
            codec,
        )
        .with_tls(settings)
        .unwrap()
    }

    /// Serves `router` as an agent does: to the control plane alone, over the fleet's TLS.
    /// Its `https://` URL.
    async fn serve(&self, router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let settings = fleet_tls::server_config(
            fleet_tls::roots(&self.plane_ca).unwrap(),
            fleet_tls::ClientCertificates::Required,
            self.identity.clone(),
        )
        .unwrap();
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let server = wrenn_http::server::spawn_tls_until_stopped(
            listener,
            Arc::new(settings),
            router,
            wrenn_http::server::ServerTimeouts::default(),
            stopped,
            |router, _| router,
        );
        tokio::spawn(async move {
            let _stop = _stop;
            let _ = server.await;
        });
        url
    }
}

/// A registration request for `name` with a new key's certificate request: the request and
/// the key (PEM).
fn registration(name: &str, api_url: &str) -> (wrenn_agent_api::join::RegisterRequest, String) {
    let key = fleet_tls::certificate_request().unwrap();
    (
        wrenn_agent_api::join::RegisterRequest {
            name: name.into(),
            api_url: api_url.into(),
            proxy_address: "127.0.0.1:1".into(),
            agent_token: "agent-secret".into(),
            report: None,
            identity: None,
            certificate_request: key.csr_der,
        },
        key.key_pem,
    )
}

async fn add_team(store: &Store, name: &str) -> String {
    store
        .create_team(Team {
            id: format!("team-{name}"),
            name: name.into(),
            created_at_ms: 0,
            admin: false,
        })
        .await
        .unwrap();
    let (key, hash) = wrenn_cp::auth::new_key().unwrap();
    store
        .add_key(
            ApiKey {
                id: format!("key-{name}"),
                team_id: format!("team-{name}"),
                name: name.into(),
                prefix: key[..10].into(),
                created_at_ms: 0,
                revoked: false,
                role: wrenn_cp::store::Role::Owner,
                mask_suffix: key[40..].into(),
            },
            hash,
        )
        .await
        .unwrap();
    key
}

impl Kit {
    async fn new(slots: u32, quotas: Quotas) -> Kit {
        Kit::with_down_after(slots, quotas, FleetConfig::default().down_after).await
    }

    /// A kit whose teams may each run at most `running` sandboxes at once.
    async fn with_running_limit(slots: u32, running: u32) -> Kit {
        let quotas = Quotas {
            running,
            ..Quotas::default()
        };
        Kit::new(slots, quotas).await
    }

    /// A kit whose fleet marks a host down once it has been silent for `down_after`.
    async fn with_down_after(slots: u32, quotas: Quotas, down_after: Duration) -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("cp.db");
        let store = Store::open(&database).unwrap();
        let key_a = add_team(&store, "a").await;
        let key_b = add_team(&store, "b").await;
        let agent = Arc::new(FakeAgent::new(slots, vec![template("base", 512)]));
        let authority = Arc::new(
            wrenn_cp::fleet::pki::FleetAuthority::open(
                &dir.path().join("fleet-tls"),
                wrenn_cp::fleet::pki::DEFAULT_HOST_CERTIFICATE_LIFE,
            )
            .unwrap(),
        );
        let config = FleetConfig {
            authority: Some(authority.clone()),
            join_token: Some(JOIN_TOKEN.into()),
            orphan_grace: Duration::from_secs(60),
            down_after,
            ..FleetConfig::default()
        };
        let fleet = Fleet::load(&store, config, Box::new(LeastLoaded), Some(agent.clone()))
            .await
            .unwrap();
        let (plane, _wake) = ControlPlane::new(store, fleet, None, true);
        let plane = plane.with_template_files(dir.path().join("template-files"));
        Kit {
            plane: Arc::new(plane.with_quotas(quotas)),
            agent,
            key_a,
            key_b,
            database,
            authority,
            audited: Default::default(),
            _dir: dir,
        }
    }

    /// A kit served on a local port, whose fleet marks a host down once it has been silent
    /// for `down_after`, with `edge` joined as host `edge-1`: the kit, its URL, the host.
    async fn with_edge(slots: u32, down_after: Duration, edge: FakeAgent) -> (Kit, String, Joined) {
        let kit = Kit::with_down_after(slots, Quotas::default(), down_after).await;
        let url = kit.serve().await;
        let fleet = kit.serve_fleet().await;
        let edge = kit.join(&fleet, "edge-1", edge).await;
        (kit, url, edge)
    }

    /// Serves the fleet registry on a local port over the fleet's TLS: its URL.
    async fn serve_fleet(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let server = wrenn_cp::tls::spawn_fleet_until_stopped(
            listener,
            self.authority.registry_server_config().unwrap(),
            wrenn_cp::http::registry_router(self.plane.clone()),
            wrenn_http::server::ServerTimeouts::default(),
            stopped,
        );
        tokio::spawn(async move {
            let _stop = stop;
            let _ = server.await;
        });
        url
    }

    /// Serves the API on a local port: its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = wrenn_cp::http::router(self.plane.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    /// `agent` joins the fleet whose registry is at `fleet_url` as host `name`, reporting what
    /// it has: served over the fleet's TLS with the certificate its registration brought.
    async fn join(&self, fleet_url: &str, name: &str, agent: FakeAgent) -> Joined {
        use wrenn_agent_api::HostAgent;
        use wrenn_agent_api::join::host_registry::Register;

        let agent = Arc::new(agent);
        let tls = AgentTls::new(self);
        let api_url = tls.serve(agent.router("agent-secret")).await;
        let (mut request, key) = registration(name, &api_url);
        request.report = agent.report_in_process();
        let joined = tls
            .registry(fleet_url, wrenn_connect::Codec::Proto)
            .call::<Register>(&request, &bearer(JOIN_TOKEN))
            .await
            .unwrap();
        tls.identity.set(&joined.certificate_chain, &key).unwrap();
        Joined {
            agent,
            host_id: joined.host_id,
            heartbeat_token: joined.heartbeat_token,
            registry: tls.registry(fleet_url, wrenn_connect::Codec::Proto),
        }
    }

    /// The host falls silent past the fleet's `down_after`, and the heartbeat watch marks it
    /// down.
    async fn fall_silent(&self, host_id: &str) {
        tokio::time::sleep(self.plane.fleet.config.down_after + Duration::from_millis(50)).await;
        self.plane.fleet.check_heartbeats(&self.plane.store).await;
        assert!(!self.plane.fleet.host(host_id).unwrap().is_up());
        // The fleet's events (no team's): it came up when it joined, and went down now.
        let query = wrenn_cp::store::LogQuery {
            team_id: Some(String::new()),
            subject: Some(host_id.to_string()),
            limit: 100,
            ..Default::default()
        };
        let events = self.plane.store.events(query).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds.first(), Some(&"host.up"), "{events:?}");
        assert_eq!(kinds.last(), Some(&"host.down"), "{events:?}");
    }

    /// The name of the host whose agent runs in the control plane's process.
    fn own_host_name(&self) -> String {
        let host = self.plane.fleet.host(EMBEDDED_HOST_ID).unwrap();
        host.row().name
    }

    /// One request through the API's router: its status and JSON body (`Null` when empty).
    async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let (status, _, value) = self.call_full(method, path, key, body).await;
        (status, value)
    }

    /// [`Kit::call`] with the answer's headers.
    async fn call_full(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> (StatusCode, http::HeaderMap, Value) {
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
        // Every keyed call that may change state is one row of the audit log.
        let keyed_change = key.is_some()
            && !matches!(method, "GET" | "HEAD")
            && !path.starts_with("/templates/files/uploads/");
        if keyed_change {
            self.audited
                .0
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let response = wrenn_cp::http::router(self.plane.clone())
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        if keyed_change {
            // Not a keyed route's call: no key was checked (a bad key, a route that is not
            // there or takes no such method).
            let unrouted = status == StatusCode::UNAUTHORIZED
                || status == StatusCode::METHOD_NOT_ALLOWED
                || value["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no such route"));
            if unrouted {
                self.audited
                    .0
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            } else {
                self.audited
                    .1
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            self.check_audit(method, path, status).await;
        }
        // Every answer is what the OpenAPI document says it is.
        static DOCUMENT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        let document = DOCUMENT
            .get_or_init(|| serde_json::to_value(wrenn_cp::http::openapi::document()).unwrap());
        let route = path.split('?').next().unwrap_or(path);
        if let Err(problem) =
            wrenn_api::conformance::check(document, method, route, status.as_u16(), &value)
        {
            panic!(
                "{method} {path} -> {status}: the answer breaks the OpenAPI document: {problem}\n{value}"
            );
        }
        (status, headers, value)
    }

    /// The audit log has one row per keyed call that may change state: as many as were
    /// answered, no more than were started; with no other call under way, the last is this
    /// call's, with its outcome.
    async fn check_audit(&self, method: &str, path: &str, status: StatusCode) {
        use std::sync::atomic::Ordering::SeqCst;
        let query = wrenn_cp::store::LogQuery {
            limit: 10_000,
            ..Default::default()
        };
        let rows = self.plane.store.audit(query).await.unwrap();
        let (started, answered) = (self.audited.0.load(SeqCst), self.audited.1.load(SeqCst));
        let kept = rows.len() as i64;
        assert!(
            answered <= kept && kept <= started,
            "{method} {path}: {kept} audit rows for {answered} calls answered ({started} started)"
        );
        if started == answered {
            let last = rows.last().expect("a row");
            assert!(last.action.starts_with(&format!("{method} /")), "{last:?}");
            assert_eq!(
                last.outcome,
                i64::from(status.as_u16()),
                "{method} {path}: {last:?}"
            );
            assert!(last.actor.starts_with("key:"), "{last:?}");
        }
    }

    /// `POST /sandboxes` as `key`'s team, whatever the answer.
    async fn try_create(&self, key: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", "/sandboxes", Some(key), body).await
    }

    async fn create(&self, key: &str, body: Value) -> String {
        let (status, created) = self.try_create(key, body).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created["sandboxID"].as_str().unwrap().to_string()
    }

    /// A bodyless request as team `a`: its status and JSON body.
    async fn call_a(&self, method: &str, path: &str) -> (StatusCode, Value) {
        self.call(method, path, Some(&self.key_a), Value::Null)
            .await
    }

    /// `POST /sandboxes` as team `a`, which must answer `status`: the answer's body.
    async fn create_refused(&self, body: Value, status: StatusCode) -> Value {
        let (got, answer) = self.try_create(&self.key_a, body).await;
        assert_eq!(got, status, "{answer}");
        answer
    }

    /// A create as team `a` that the kit's own host fails ("the disk broke"): a 500, whose
    /// body this returns.
    async fn create_with_a_broken_disk(&self) -> Value {
        let broken = HostAgentError::Failed("the disk broke".into());
        self.agent.fail_next(Operation::Create, broken);
        let body = json!({"templateID": "base"});
        self.create_refused(body, StatusCode::INTERNAL_SERVER_ERROR)
            .await
    }

    async fn state(&self, id: &str) -> (StatusCode, Value) {
        let (status, body) = self.call_a("GET", &format!("/sandboxes/{id}")).await;
        (status, body["state"].clone())
    }

    /// One request through the control plane's proxy to port 8000 of `sandbox_id` (named by
    /// the routing headers): its status and JSON body.
    async fn through_proxy(&self, sandbox_id: &str) -> (StatusCode, Value) {
        let request = Request::builder()
            .uri("/")
            .header("host", "localhost")
            .header("e2b-sandbox-id", sandbox_id)
            .header("e2b-sandbox-port", "8000")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = wrenn_cp::proxy::router(self.plane.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

impl Joined {
    /// Waits until the control plane has asked this host for `operation` on `sandbox_id`.
    async fn asked(&self, operation: Operation, sandbox_id: &str) {
        let call = (operation, sandbox_id.to_string());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.agent.calls().contains(&call) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the host was never asked for {call:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn a_sandbox_lives_its_whole_life_on_the_host_the_api_says() {
    let kit = Kit::new(4, Quotas::default()).await;
    let id = kit
        .create(
            &kit.key_a,
            json!({"templateID": "base", "timeout": 300, "metadata": {"owner": "me"}, "envVars": {"A": "1"}}),
        )
        .await;
    let held = kit.agent.sandbox(&id).expect("the host runs it");
    assert_eq!(held.state, SandboxState::Running);
    assert_eq!(held.options.metadata["owner"], "me");
    assert_eq!(held.options.env_vars["A"], "1");
    assert_eq!(kit.state(&id).await, (StatusCode::OK, json!("running")));

    let pause = format!("/sandboxes/{id}/pause");
    assert_eq!(kit.call_a("POST", &pause).await.0, StatusCode::NO_CONTENT);
    assert_eq!(kit.agent.sandbox(&id).unwrap().state, SandboxState::Paused);
    assert_eq!(kit.state(&id).await, (StatusCode::OK, json!("paused")));
    let (again, message) = kit.call_a("POST", &pause).await;
    assert_eq!(again, StatusCode::CONFLICT, "{message}");

    let (resumed, body) = kit
        .call(
            "POST",
            &format!("/sandboxes/{id}/connect"),
            Some(&kit.key_a),
            json!({"timeout": 60}),
        )
        .await;
    assert!(resumed.is_success(), "{resumed} {body}");
    assert_eq!(kit.agent.sandbox(&id).unwrap().state, SandboxState::Running);

    let kill = kit.call_a("DELETE", &format!("/sandboxes/{id}")).await;
    assert_eq!(kill.0, StatusCode::NO_CONTENT);
    assert!(kit.agent.sandbox(&id).is_none(), "the host let it go");
    assert_eq!(kit.state(&id).await.0, StatusCode::NOT_FOUND);
    let ops: Vec<Operation> = kit.agent.calls().into_iter().map(|(op, _)| op).collect();
    assert_eq!(
        ops,
        [
            Operation::Create,
            Operation::Pause,
            Operation::Resume,
            Operation::Destroy
        ]
    );
}

#[tokio::test]
async fn keys_see_only_their_teams_sandboxes() {
    let kit = Kit::new(4, Quotas::default()).await;
    let id = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let path = format!("/sandboxes/{id}");
    assert_eq!(
        kit.call("GET", &path, None, Value::Null).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        kit.call("GET", &path, Some("e2b_not_a_key"), Value::Null)
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        kit.call("GET", &path, Some(&kit.key_b), Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        kit.call("DELETE", &path, Some(&kit.key_b), Value::Null)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    let (_, listed) = kit
        .call("GET", "/v2/sandboxes", Some(&kit.key_b), Value::Null)
        .await;
    assert_eq!(listed, json!([]));
    let (_, listed) = kit.call_a("GET", "/v2/sandboxes").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(
        kit.agent.sandbox(&id).is_some(),
        "team b's kill did not reach the host"
    );
}

#[tokio::test]
async fn a_failed_create_leaves_no_row_and_frees_its_place() {
    let kit = Kit::new(1, Quotas::default()).await;
    let body = kit
        .create_refused(json!({"templateID": "nope"}), StatusCode::NOT_FOUND)
        .await;
    assert!(body["message"].as_str().unwrap().contains("nope"), "{body}");
    assert!(
        kit.agent.calls().is_empty(),
        "an unknown template never reaches a host"
    );

    let body = kit.create_with_a_broken_disk().await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("the disk broke") && message.contains("host "),
        "{message}"
    );
    let (_, listed) = kit.call_a("GET", "/v2/sandboxes").await;
    assert_eq!(listed, json!([]));
    // The host's one slot was held while the create was in flight: it is free again.
    kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let body = kit
        .create_refused(
            json!({"templateID": "base"}),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no free network slot"),
        "{body}"
    );
}

#[tokio::test]
async fn a_teams_running_limit_is_kept_before_any_host_is_asked() {
    let kit = Kit::with_running_limit(8, 2).await;
    for _ in 0..2 {
        kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    }
    kit.create_refused(json!({"templateID": "base"}), StatusCode::TOO_MANY_REQUESTS)
        .await;
    assert_eq!(
        kit.agent.calls().len(),
        2,
        "the refused create reached no host"
    );
    kit.create(&kit.key_b, json!({"templateID": "base"})).await;
}

#[tokio::test]
async fn reconcile_drops_dead_and_lost_sandboxes_and_destroys_old_orphans() {
    let kit = Kit::new(8, Quotas::default()).await;
    let dead = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let lost = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let kept = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    assert!(kit.agent.kill_vm(&dead));
    assert!(kit.agent.lose(&lost));
    kit.agent
        .add_orphan("old-orphan", "base", Duration::from_secs(3600));
    kit.agent
        .add_orphan("young-orphan", "base", Duration::from_secs(1));

    let host = kit.plane.fleet.hosts().pop().unwrap();
    let done = wrenn_cp::fleet::reconcile_host(&kit.plane.store, &kit.plane.fleet, &host)
        .await
        .unwrap();
    let mut removed = done.removed.clone();
    removed.sort();
    let mut expected = vec![dead.clone(), lost.clone()];
    expected.sort();
    assert_eq!(removed, expected);
    assert_eq!(done.orphans, ["old-orphan"]);
    assert_eq!(kit.state(&dead).await.0, StatusCode::NOT_FOUND);
    assert_eq!(kit.state(&lost).await.0, StatusCode::NOT_FOUND);
    assert_eq!(kit.state(&kept).await, (StatusCode::OK, json!("running")));
    let on_host = kit.agent.states();
    assert!(!on_host.contains_key(&dead) && !on_host.contains_key("old-orphan"));
    assert!(
        on_host.contains_key("young-orphan"),
        "a young orphan may be a create in flight"
    );
}

#[tokio::test]
async fn a_drifted_state_is_corrected_to_the_hosts() {
    let kit = Kit::new(8, Quotas::default()).await;
    let id = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    // Paused on the host behind the control plane's back (as after a crash mid-pause).
    use wrenn_agent_api::HostAgent;
    kit.agent.pause(&id, false).await.unwrap();
    let host = kit.plane.fleet.hosts().pop().unwrap();
    let done = wrenn_cp::fleet::reconcile_host(&kit.plane.store, &kit.plane.fleet, &host)
        .await
        .unwrap();
    assert_eq!(done.corrected, std::slice::from_ref(&id));
    assert_eq!(kit.state(&id).await, (StatusCode::OK, json!("paused")));
}

#[tokio::test]
async fn an_expired_sandbox_is_ended_by_the_lifecycle_loop() {
    let kit = Kit::new(8, Quotas::default()).await;
    let short = kit
        .create(&kit.key_a, json!({"templateID": "base", "timeout": 1}))
        .await;
    let paused_at_end = kit
        .create(
            &kit.key_a,
            json!({"templateID": "base", "timeout": 1, "autoPause": true}),
        )
        .await;
    let long = kit
        .create(&kit.key_a, json!({"templateID": "base", "timeout": 600}))
        .await;
    let lifecycle = tokio::spawn(kit.plane.clone().run_lifecycle());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let states = kit.agent.states();
        if !states.contains_key(&short) && states.get(&paused_at_end) == Some(&SandboxState::Paused)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ended: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lifecycle.abort();
    assert_eq!(kit.state(&short).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        kit.state(&paused_at_end).await,
        (StatusCode::OK, json!("paused"))
    );
    assert_eq!(kit.state(&long).await, (StatusCode::OK, json!("running")));
    // Each timeout is an event of the system's, followed by what it did.
    for (id, action, then) in [
        (&short, "kill", "sandbox.killed"),
        (&paused_at_end, "pause", "sandbox.paused"),
    ] {
        let events = kit
            .call_a("GET", &format!("/v1/events?subject={id}"))
            .await
            .1;
        let seen: Vec<(&str, &str)> = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["type"].as_str().unwrap(), e["actor"].as_str().unwrap()))
            .collect();
        assert_eq!(
            seen,
            [
                ("sandbox.created", "key:key-a"),
                ("sandbox.timed_out", "system"),
                (then, "system")
            ],
            "{events}"
        );
        assert_eq!(events["events"][1]["data"]["action"], action);
    }
}

#[tokio::test]
async fn a_host_error_reaches_the_caller_by_cause() {
    let kit = Kit::new(8, Quotas::default()).await;
    let id = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let pause = format!("/sandboxes/{id}/pause");
    for (error, status) in [
        (
            HostAgentError::Conflict("busy".into()),
            StatusCode::CONFLICT,
        ),
        (
            HostAgentError::TimedOut("slow guest".into()),
            StatusCode::GATEWAY_TIMEOUT,
        ),
        (
            HostAgentError::Failed("snapshot failed".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
    ] {
        let text = error.to_string();
        kit.agent.fail_next(Operation::Pause, error);
        let (got, body) = kit.call_a("POST", &pause).await;
        assert_eq!(got, status, "{body}");
        assert!(body["message"].as_str().unwrap().contains(&text), "{body}");
        assert_eq!(
            kit.state(&id).await,
            (StatusCode::OK, json!("running")),
            "a failed pause changes nothing"
        );
    }
}

/// The checked-in OpenAPI document.
fn checked_in_document_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

#[tokio::test]
async fn the_served_openapi_document_is_the_checked_in_one() {
    let kit = Kit::new(1, Quotas::default()).await;
    let (status, served) = kit.call("GET", "/openapi.json", None, Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    let path = checked_in_document_path();
    if std::env::var_os("WRENN_WRITE_OPENAPI").is_some() {
        std::fs::write(&path, wrenn_cp::http::openapi::document_json()).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let checked_in: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    assert!(
        served == checked_in && text == wrenn_cp::http::openapi::document_json(),
        "docs/openapi.json is not the document the API serves: regenerate it with \
         `WRENN_WRITE_OPENAPI=1 cargo test -p wrenn-cp --test fast_api the_served_openapi` and commit it"
    );
    for path in [
        "/sandboxes",
        "/v2/sandboxes",
        "/sandboxes/{id}",
        "/sandboxes/{id}/pause",
        "/templates",
        "/hosts",
    ] {
        assert!(served["paths"][path].is_object(), "{path} is documented");
    }
}

/// Asserts that a call failed with `code`.
fn refused<T: std::fmt::Debug>(
    result: Result<T, wrenn_connect::ConnectError>,
    code: wrenn_connect::Code,
) {
    match result {
        Err(error) => assert_eq!(error.code, code, "{error}"),
        Ok(answer) => panic!("expected {code:?}, got {answer:?}"),
    }
}

/// `Authorization: Bearer <token>`.
fn bearer(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    headers
}

#[tokio::test]
async fn agents_join_heartbeat_and_renew_through_the_fleet_registry_over_mutual_tls() {
    use wrenn_agent_api::join::{
        HeartbeatRequest, HostReport, RegisterRequest, RenewCertificateRequest,
        host_registry::Heartbeat, host_registry::Register, host_registry::RenewCertificate,
    };
    use wrenn_connect::client::{ConnectClient, HttpVersion};
    use wrenn_connect::{Code, Codec};

    let kit = Kit::new(1, Quotas::default()).await;
    let url = kit.serve().await;
    let fleet = kit.serve_fleet().await;
    let tls = AgentTls::new(&kit);
    let api_url = tls
        .serve(Arc::new(FakeAgent::new(4, vec![template("base", 512)])).router("agent-secret"))
        .await;
    let binary = tls.registry(&fleet, Codec::Proto);
    let json = tls.registry(&fleet, Codec::Json);

    let report = HostReport {
        cpus: 2,
        slots_total: 4,
        memory_available_bytes: 8 << 30,
        templates: vec![template("base", 512)],
        ..Default::default()
    };
    let (mut request, key) = registration("edge-1", &api_url);
    request.report = Some(report.clone());
    refused(
        binary.call::<Register>(&request, &bearer("wrong")).await,
        Code::Unauthenticated,
    );
    for bad in [
        RegisterRequest {
            name: "not a name".into(),
            ..request.clone()
        },
        // An agent serving plain HTTP is not taken: the fleet speaks mutual TLS only.
        RegisterRequest {
            api_url: api_url.replace("https://", "http://"),
            ..request.clone()
        },
        // Nor one that asks for no certificate and has none.
        RegisterRequest {
            certificate_request: Vec::new(),
            ..request.clone()
        },
        // Nor a request whose signature is not its key's.
        RegisterRequest {
            certificate_request: {
                let mut forged = request.certificate_request.clone();
                let last = forged.len() - 1;
                forged[last] ^= 1;
                forged
            },
            ..request.clone()
        },
    ] {
        let answer = binary.call::<Register>(&bad, &bearer(JOIN_TOKEN)).await;
        refused(answer, Code::InvalidArgument);
    }
    assert!(kit.plane.fleet.hosts().iter().all(|host| host.in_process()));

    let joined = binary
        .call::<Register>(&request, &bearer(JOIN_TOKEN))
        .await
        .unwrap();
    let secret = joined
        .host_secret
        .clone()
        .expect("a first registration gets an identity");
    assert_eq!(joined.heartbeat_interval_ms, 2000);
    let chain = fleet_tls::certificates(&joined.certificate_chain, "chain").unwrap();
    let facts = fleet_tls::certificate_facts(&chain[0]).unwrap();
    assert_eq!(facts.dns_names, [fleet_tls::host_name(&joined.host_id)]);
    let host = kit
        .plane
        .fleet
        .host(&joined.host_id)
        .expect("the host is in the fleet");
    assert_eq!(host.row().name, "edge-1");
    assert_eq!(host.row().report, report);
    assert!(host.is_up());

    // The name is the host's: without its identity or its certificate it is refused, with
    // its identity taken again.
    refused(
        json.call::<Register>(&request, &bearer(JOIN_TOKEN)).await,
        Code::AlreadyExists,
    );
    let again = RegisterRequest {
        identity: Some(wrenn_agent_api::join::HostIdentity {
            host_id: joined.host_id.clone(),
            secret,
        }),
        ..request.clone()
    };
    let rejoined = json
        .call::<Register>(&again, &bearer(JOIN_TOKEN))
        .await
        .unwrap();
    assert_eq!(rejoined.host_id, joined.host_id);
    assert_eq!(
        rejoined.host_secret, None,
        "a kept identity is not given again"
    );

    // Heartbeats: the host's own token, from the host its certificate names.
    let busier = HostReport {
        slots_in_use: 3,
        ..report.clone()
    };
    let beat = HeartbeatRequest {
        host_id: joined.host_id.clone(),
        report: Some(busier.clone()),
    };
    refused(
        binary
            .call::<Heartbeat>(&beat, &bearer(&rejoined.heartbeat_token))
            .await,
        Code::Unauthenticated,
    );
    tls.identity.set(&rejoined.certificate_chain, &key).unwrap();
    // A new client: the old one's pooled connection was made without a certificate.
    let binary = tls.registry(&fleet, Codec::Proto);
    refused(
        binary.call::<Heartbeat>(&beat, &bearer("wrong")).await,
        Code::Unauthenticated,
    );
    refused(
        binary
            .call::<Heartbeat>(&beat, &bearer(&joined.heartbeat_token))
            .await,
        Code::Unauthenticated,
    );
    let unknown = HeartbeatRequest {
        host_id: "no-such-host".into(),
        ..beat.clone()
    };
    // An unknown host gets the answer a wrong token gets: no caller learns which hosts exist.
    let wrong_token = binary
        .call::<Heartbeat>(&beat, &bearer("wrong"))
        .await
        .unwrap_err();
    let unknown_host = binary
        .call::<Heartbeat>(&unknown, &bearer(&rejoined.heartbeat_token))
        .await
        .unwrap_err();
    assert_eq!(
        (unknown_host.code, &unknown_host.message),
        (wrong_token.code, &wrong_token.message)
    );
    binary
        .call::<Heartbeat>(&beat, &bearer(&rejoined.heartbeat_token))
        .await
        .unwrap();
    // A registration makes the host anew: read it again.
    let host = kit.plane.fleet.host(&joined.host_id).unwrap();
    assert_eq!(host.row().report, busier);

    // With its certificate the host registers again without the join token or its secret.
    let (by_certificate, _) = registration("edge-1", &api_url);
    let by_certificate = binary
        .call::<Register>(&by_certificate, &http::HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(by_certificate.host_id, joined.host_id);

    // Renewal: a new key's certificate for the host its present certificate names, only.
    let renewal = fleet_tls::certificate_request().unwrap();
    let for_another = RenewCertificateRequest {
        host_id: "h-another".into(),
        certificate_request: renewal.csr_der.clone(),
    };
    refused(
        binary
            .call::<RenewCertificate>(&for_another, &http::HeaderMap::new())
            .await,
        Code::Unauthenticated,
    );
    let renewed = binary
        .call::<RenewCertificate>(
            &RenewCertificateRequest {
                host_id: joined.host_id.clone(),
                certificate_request: renewal.csr_der,
            },
            &http::HeaderMap::new(),
        )
        .await
        .unwrap();
    tls.identity
        .set(&renewed.certificate_chain, &renewal.key_pem)
        .unwrap();
    let renewed_client = tls.registry(&fleet, Codec::Proto);
    renewed_client
        .call::<Heartbeat>(&beat, &bearer(&by_certificate.heartbeat_token))
        .await
        .unwrap();
    // Without a certificate, a renewal is refused.
    let anonymous = AgentTls::new(&kit).registry(&fleet, Codec::Proto);
    refused(
        anonymous
            .call::<RenewCertificate>(&for_another, &http::HeaderMap::new())
            .await,
        Code::Unauthenticated,
    );

    // A host certificate from another fleet's authority is refused at the handshake.
    let foreign_dir = tempfile::tempdir().unwrap();
    let foreign = wrenn_cp::fleet::pki::FleetAuthority::open(
        foreign_dir.path(),
        wrenn_cp::fleet::pki::DEFAULT_HOST_CERTIFICATE_LIFE,
    )
    .unwrap();
    let stranger = fleet_tls::certificate_request().unwrap();
    let (stranger_chain, _) = foreign
        .certify_host(&joined.host_id, &stranger.csr_der)
        .unwrap();
    let impostor = AgentTls::new(&kit);
    impostor
        .identity
        .set(&stranger_chain, &stranger.key_pem)
        .unwrap();
    let refused_handshake = impostor
        .registry(&fleet, Codec::Proto)
        .call::<Heartbeat>(&beat, &bearer(&by_certificate.heartbeat_token))
        .await
        .unwrap_err();
    assert_eq!(
        refused_handshake.code,
        Code::Unavailable,
        "{refused_handshake}"
    );

    // Plain HTTP: the API's port answers registry calls with where agents join.
    let plain = ConnectClient::new(&url, HttpVersion::Http1, Codec::Proto)
        .call::<Register>(&request, &bearer(JOIN_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(plain.code, Code::FailedPrecondition, "{plain}");
    assert!(plain.message.contains("mutual TLS"), "{plain}");

    // The REST route the registry replaced is gone (`/hosts/{name}` takes only DELETE).
    let (status, _) = kit.call("POST", "/hosts/register", None, json!({})).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// The message of an error answer.
fn message(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_create_no_host_can_take_is_a_503_naming_each_hosts_reason_and_leaves_nothing() {
    let base = FakeAgent::new(4, vec![template("base", 512)]);
    let (kit, _url, edge) = Kit::with_edge(1, Duration::from_millis(100), base).await;
    kit.fall_silent(&edge.host_id).await;
    // The control plane's own host takes one sandbox, and is then full.
    let first = kit.create(&kit.key_a, json!({"templateID": "base"})).await;

    let body = kit
        .create_refused(
            json!({"templateID": "base"}),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .await;
    assert_eq!(body["code"], 503, "{body}");
    let full = format!("{} has no free network slot", kit.own_host_name());
    for cause in [full.as_str(), "edge-1 is down"] {
        assert!(message(&body).contains(cause), "{cause}: {body}");
    }
    let (_, listed) = kit.call_a("GET", "/v2/sandboxes").await;
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [first.as_str()], "the refused create has no row");
    assert_eq!(
        kit.agent.calls().len(),
        1,
        "the refused create reached no host"
    );
    assert!(edge.agent.calls().is_empty(), "a down host is not asked");
    // Nothing of the refused create holds the host's slot.
    let kill = kit.call_a("DELETE", &format!("/sandboxes/{first}")).await;
    assert_eq!(kill.0, StatusCode::NO_CONTENT);
    kit.create(&kit.key_a, json!({"templateID": "base"})).await;
}

#[tokio::test]
async fn an_operation_on_a_sandbox_whose_host_went_down_is_a_404_saying_it_was_lost_and_a_kill_forgets_it()
 {
    // Only the edge host has the template: the sandbox is there.
    let edge_only = FakeAgent::new(4, vec![template("edge-only", 256)]);
    let (kit, _url, edge) = Kit::with_edge(8, Duration::from_millis(100), edge_only).await;
    let id = kit
        .create(&kit.key_a, json!({"templateID": "edge-only"}))
        .await;
    assert!(edge.agent.sandbox(&id).is_some());
    kit.fall_silent(&edge.host_id).await;

    let path = format!("/sandboxes/{id}");
    for (method, route, body) in [
        ("GET", path.clone(), Value::Null),
        ("POST", format!("{path}/pause"), Value::Null),
        ("POST", format!("{path}/resume"), json!({"timeout": 60})),
        ("POST", format!("{path}/connect"), json!({"timeout": 60})),
        ("POST", format!("{path}/timeout"), json!({"timeout": 60})),
        ("POST", format!("{path}/refreshes"), json!({"duration": 60})),
    ] {
        let (status, answer) = kit.call(method, &route, Some(&kit.key_a), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {route}: {answer}");
        assert!(
            message(&answer).contains("was lost: its host stopped answering"),
            "{method} {route}: {answer}"
        );
    }
    let ops: Vec<Operation> = edge.agent.calls().into_iter().map(|(op, _)| op).collect();
    assert_eq!(
        ops,
        [Operation::Create],
        "nothing was asked of the down host"
    );

    // A kill forgets it without waiting on the down host.
    assert_eq!(kit.call_a("DELETE", &path).await.0, StatusCode::NO_CONTENT);
    assert_eq!(kit.plane.store.sandbox(&id).await.unwrap(), None);
    let (status, answer) = kit.call_a("GET", &path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!message(&answer).contains("lost"), "{answer}");
    assert_eq!(edge.agent.calls().len(), 1);
}

/// A host as empty as the control plane's own, with less memory: placement asks it second.
fn second_choice() -> FakeAgent {
    let agent = FakeAgent::new(8, vec![template("base", 512)]);
    agent.set_free(8 << 30, 1 << 40);
    agent
}

#[tokio::test]
async fn a_create_a_full_host_turns_down_is_placed_on_another_host() {
    let (kit, _url, edge) =
        Kit::with_edge(8, FleetConfig::default().down_after, second_choice()).await;
    kit.agent.fail_next(
        Operation::Create,
        HostAgentError::NoCapacity("out of memory on this host".into()),
    );

    let id = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    assert_eq!(kit.agent.calls(), [(Operation::Create, id.clone())]);
    assert_eq!(edge.agent.calls(), [(Operation::Create, id.clone())]);
    assert!(kit.agent.sandbox(&id).is_none());
    assert_eq!(
        edge.agent.sandbox(&id).unwrap().state,
        SandboxState::Running
    );
    let row = kit.plane.store.sandbox(&id).await.unwrap().unwrap();
    assert_eq!(
        row.host_id, edge.host_id,
        "the row names the host it runs on"
    );
    assert_eq!(kit.state(&id).await, (StatusCode::OK, json!("running")));
}

#[tokio::test]
async fn a_create_a_host_fails_for_another_cause_than_room_is_not_tried_on_another_host() {
    let (kit, _url, edge) =
        Kit::with_edge(8, FleetConfig::default().down_after, second_choice()).await;
    let body = kit.create_with_a_broken_disk().await;
    assert!(message(&body).contains("the disk broke"), "{body}");
    assert_eq!(kit.agent.calls().len(), 1);
    assert!(
        edge.agent.calls().is_empty(),
        "a create that may have half run is not made twice"
    );
    let (_, listed) = kit.call_a("GET", "/v2/sandboxes").await;
    assert_eq!(listed, json!([]));
}

#[tokio::test]
async fn a_kill_its_host_does_not_answer_in_time_is_a_504_and_keeps_the_sandbox() {
    let kit = Kit::new(8, Quotas::default()).await;
    let id = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let path = format!("/sandboxes/{id}");
    // Longer than the control plane's deadline for a destroy.
    kit.agent
        .delay(Operation::Destroy, Duration::from_secs(3600));

    let (status, body) = kit.call_a("DELETE", &path).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let said = format!(
        "host {}: DestroySandbox got no answer within {} s",
        kit.own_host_name(),
        wrenn_cp::deadlines::CONTROL_CALL.as_secs()
    );
    assert_eq!(message(&body), said, "{body}");
    assert_eq!(
        kit.state(&id).await,
        (StatusCode::OK, json!("running")),
        "a kill that did not finish keeps the sandbox's row, to be killed again"
    );

    kit.agent.delay(Operation::Destroy, Duration::ZERO);
    assert_eq!(kit.call_a("DELETE", &path).await.0, StatusCode::NO_CONTENT);
    assert!(kit.agent.sandbox(&id).is_none());
    assert_eq!(kit.state(&id).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_store_failure_is_a_500_that_hides_the_stores_words_and_leaves_no_sandbox_behind() {
    // One slot, one running sandbox allowed: a leaked slot or reservation would refuse the
    // create that follows the failure.
    let kit = Kit::with_running_limit(1, 1).await;
    // Writes of sandboxes fail, as on a full or broken disk; reads still work.
    let other = rusqlite::Connection::open(&kit.database).unwrap();
    other
        .execute_batch(
            "CREATE TRIGGER broken_disk BEFORE INSERT ON sandboxes \
             BEGIN SELECT RAISE(ABORT, 'simulated disk failure'); END;",
        )
        .unwrap();

    let body = kit
        .create_refused(
            json!({"templateID": "base"}),
            StatusCode::INTERNAL_SERVER_ERROR,
        )
        .await;
    assert_eq!(body, json!({"code": 500, "message": "the store failed"}));
    let calls = kit.agent.calls();
    let ops: Vec<Operation> = calls.iter().map(|(op, _)| *op).collect();
    assert_eq!(ops, [Operation::Create, Operation::Destroy], "{calls:?}");
    assert_eq!(
        calls[0].1, calls[1].1,
        "the VM made for the row is destroyed"
    );
    assert!(kit.agent.states().is_empty());
    let (_, listed) = kit.call_a("GET", "/v2/sandboxes").await;
    assert_eq!(listed, json!([]));

    other.execute_batch("DROP TRIGGER broken_disk;").unwrap();
    kit.create(&kit.key_a, json!({"templateID": "base"})).await;
}

#[tokio::test]
async fn an_agent_cannot_register_under_the_control_planes_own_host_name() {
    use wrenn_agent_api::join::host_registry::Register;
    use wrenn_connect::{Code, Codec};

    let kit = Kit::new(1, Quotas::default()).await;
    let fleet = kit.serve_fleet().await;
    let own = kit.own_host_name();
    let (request, _) = registration(&own, "https://127.0.0.1:1");
    let refused = AgentTls::new(&kit)
        .registry(&fleet, Codec::Proto)
        .call::<Register>(&request, &bearer(JOIN_TOKEN))
        .await
        .unwrap_err();
    assert_eq!(refused.code, Code::AlreadyExists, "{refused}");
    assert_eq!(
        refused.message,
        format!("{own} is the control plane's own host")
    );
    let hosts = kit.plane.fleet.hosts();
    assert_eq!(hosts.len(), 1);
    assert!(hosts[0].in_process() && hosts[0].is_up());
    assert_eq!(hosts[0].id(), EMBEDDED_HOST_ID);
    let stored = kit.plane.store.hosts().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, EMBEDDED_HOST_ID);
    assert_eq!(
        stored[0].agent_token, "",
        "the intruder's token was not kept"
    );
    // The host still serves.
    kit.create(&kit.key_a, json!({"templateID": "base"})).await;
}

#[tokio::test]
async fn a_forgotten_hosts_heartbeat_is_refused_and_does_not_bring_it_back() {
    use wrenn_agent_api::HostAgent;
    use wrenn_agent_api::join::{HeartbeatRequest, host_registry::Heartbeat};
    use wrenn_connect::Code;

    let base = FakeAgent::new(4, vec![template("base", 512)]);
    let (kit, _url, edge) = Kit::with_edge(1, Duration::from_millis(100), base).await;
    kit.fall_silent(&edge.host_id).await;
    assert_eq!(
        kit.plane
            .fleet
            .forget_host(&kit.plane.store, "edge-1")
            .await
            .unwrap(),
        0
    );

    // Its agent was not stopped: it heartbeats with the token it was given.
    let beat = HeartbeatRequest {
        host_id: edge.host_id.clone(),
        report: edge.agent.report_in_process(),
    };
    let refused = edge
        .registry
        .call::<Heartbeat>(&beat, &bearer(&edge.heartbeat_token))
        .await
        .unwrap_err();
    assert_eq!(refused.code, Code::Unauthenticated, "{refused}");
    assert_eq!(refused.message, "invalid heartbeat token: register again");
    assert!(kit.plane.fleet.host(&edge.host_id).is_none());
    let stored = kit.plane.store.hosts().await.unwrap();
    assert!(
        stored.iter().all(|host| host.id != edge.host_id),
        "{stored:?}"
    );
}

/// Traffic that reaches the proxy while a sandbox is being paused (through the API or by its
/// timeout) or killed reads a route that the change is about to end, and must not keep it: the
/// next request finds a paused sandbox with autoResume paused and resumes it, and a killed one
/// not found. (The edge host's sandbox proxy does not answer, so traffic sent along a route
/// is told "The sandbox's host does not answer".)
#[tokio::test]
async fn traffic_during_a_pause_or_a_kill_leaves_no_route_behind() {
    let edge_only = FakeAgent::new(4, vec![template("edge-only", 256)]);
    let (kit, _url, edge) = Kit::with_edge(8, FleetConfig::default().down_after, edge_only).await;
    let routed_while_running = "The sandbox's host does not answer";
    let resumed_by_traffic = async |id: &str| {
        kit.through_proxy(id).await;
        assert_eq!(
            edge.agent.sandbox(id).unwrap().state,
            SandboxState::Running,
            "the paused sandbox was resumed by traffic"
        );
        assert_eq!(kit.state(id).await, (StatusCode::OK, json!("running")));
    };
    edge.agent
        .delay(Operation::Pause, Duration::from_millis(300));
    edge.agent
        .delay(Operation::Destroy, Duration::from_millis(300));

    // Paused through the API.
    let resumable = json!({"templateID": "edge-only", "autoResume": {"enabled": true}});
    let id = kit.create(&kit.key_a, resumable).await;
    let pause = format!("/sandboxes/{id}/pause");
    let (paused, during) = tokio::join!(kit.call_a("POST", &pause), async {
        edge.asked(Operation::Pause, &id).await;
        kit.through_proxy(&id).await
    });
    assert_eq!(paused.0, StatusCode::NO_CONTENT, "{}", paused.1);
    assert_eq!(message(&during.1), routed_while_running, "{}", during.1);
    resumed_by_traffic(&id).await;

    // Paused by its timeout.
    let timing_out = json!({"templateID": "edge-only", "timeout": 1, "autoPause": true,
        "autoResume": {"enabled": true}});
    let id = kit.create(&kit.key_a, timing_out).await;
    let lifecycle = tokio::spawn(kit.plane.clone().run_lifecycle());
    edge.asked(Operation::Pause, &id).await;
    let during = kit.through_proxy(&id).await;
    assert_eq!(message(&during.1), routed_while_running, "{}", during.1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while kit.state(&id).await.1 != json!("paused") {
        assert!(tokio::time::Instant::now() < deadline, "never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    resumed_by_traffic(&id).await;
    lifecycle.abort();

    // Killed.
    let id = kit
        .create(&kit.key_a, json!({"templateID": "edge-only"}))
        .await;
    let path = format!("/sandboxes/{id}");
    let (killed, during) = tokio::join!(kit.call_a("DELETE", &path), async {
        edge.asked(Operation::Destroy, &id).await;
        kit.through_proxy(&id).await
    });
    assert_eq!(killed.0, StatusCode::NO_CONTENT, "{}", killed.1);
    assert_eq!(message(&during.1), routed_while_running, "{}", during.1);
    let after = kit.through_proxy(&id).await;
    assert_eq!(
        (after.0, message(&after.1)),
        (
            StatusCode::BAD_GATEWAY,
            wrenn_agent_api::proxy::SANDBOX_NOT_FOUND
        ),
        "{}",
        after.1
    );
}

impl Kit {
    /// Polls a build's status until it ends: its last answer, and every log line read on the
    /// way (with `logsOffset` moved on as the SDKs move it).
    async fn wait_for_build(&self, template_id: &str, build_id: &str) -> (Value, Vec<Value>) {
        let mut lines = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let path = format!(
                "/templates/{template_id}/builds/{build_id}/status?logsOffset={}&limit=100",
                lines.len()
            );
            let (status, info) = self.call_a("GET", &path).await;
            assert_eq!(status, StatusCode::OK, "{info}");
            let entries = info["logEntries"].as_array().unwrap().clone();
            let ended = matches!(info["status"].as_str(), Some("ready" | "error"));
            let drained = entries.is_empty();
            lines.extend(entries);
            if ended && drained {
                return (info, lines);
            }
            assert!(tokio::time::Instant::now() < deadline, "{info}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /v3/templates` as team `a` for `name`: the template and build ids.
    async fn request_build(&self, name: &str) -> (String, String) {
        let body = json!({"name": name, "cpuCount": 1});
        let (status, answer) = self
            .call("POST", "/v3/templates", Some(&self.key_a), body)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        (
            answer["templateID"].as_str().unwrap().to_string(),
            answer["buildID"].as_str().unwrap().to_string(),
        )
    }
}

#[tokio::test]
async fn a_template_built_from_base_is_what_its_sandboxes_start_from() {
    let kit = Kit::new(8, Quotas::default()).await;
    let body = json!({"name": "My-App:v1", "tags": ["prod"], "cpuCount": 1, "memoryMB": 256});
    let (status, requested) = kit
        .call("POST", "/v3/templates", Some(&kit.key_a), body)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{requested}");
    assert_eq!(requested["names"], json!(["my-app"]));
    assert_eq!(requested["tags"], json!(["v1", "prod"]));
    let template_id = requested["templateID"].as_str().unwrap().to_string();
    let build_id = requested["buildID"].as_str().unwrap().to_string();
    assert_eq!(build_id.len(), 36, "a UUID: {build_id}");

    let start = json!({"fromTemplate": "base", "force": false, "steps": [
        {"type": "RUN", "args": ["pip install numpy"], "force": false},
        {"type": "ENV", "args": ["A", "1"], "force": false, "forceUpload": true},
    ], "startCmd": "serve", "readyCmd": "true"});
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let (status, answer) = kit
        .call("POST", &path, Some(&kit.key_a), start.clone())
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let (info, lines) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "ready", "{info}");
    let messages: Vec<&str> = lines
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["[1/2] RUN pip install numpy", "[2/2] ENV A=1"]);
    assert_eq!(lines[1]["step"], "2");
    // Paged: from the second line on, then nothing past the end.
    let page = format!("/templates/{template_id}/builds/{build_id}/status?logsOffset=1&limit=1");
    let (_, second) = kit.call_a("GET", &page).await;
    assert_eq!(second["logEntries"][0]["message"], "[2/2] ENV A=1");
    let past = format!("/templates/{template_id}/builds/{build_id}/status?logsOffset=2");
    assert_eq!(kit.call_a("GET", &past).await.1["logEntries"], json!([]));
    // Started once only.
    let (status, again) = kit.call("POST", &path, Some(&kit.key_a), start).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");

    // The host built it under the build's name, from base, as asked.
    let host_template = format!("b{}", build_id.replace('-', ""));
    let built = wrenn_agent_api::HostAgent::report_in_process(&*kit.agent)
        .unwrap()
        .templates
        .into_iter()
        .find(|t| t.template_id == host_template)
        .expect("the host has the build");
    assert_eq!((built.vcpus, built.memory_mib), (1, 256));

    // Its sandboxes, by name or id, start from that build.
    let mut sandboxes = Vec::new();
    for named in ["my-app", "my-app:v1", template_id.as_str()] {
        let id = kit.create(&kit.key_a, json!({"templateID": named})).await;
        sandboxes.push(id.clone());
        assert_eq!(kit.agent.sandbox(&id).unwrap().template_id, host_template);
        let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
        assert_eq!(
            (&detail["templateID"], &detail["alias"]),
            (&json!(template_id), &json!("my-app"))
        );
    }
    let (_, listed) = kit.call_a("GET", "/templates").await;
    let mine = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == json!(template_id))
        .expect("listed");
    assert_eq!(
        (&mine["buildStatus"], &mine["aliases"], &mine["buildID"]),
        (&json!("ready"), &json!(["my-app"]), &json!(build_id))
    );
    let (status, alias) = kit.call_a("GET", "/templates/aliases/my-app").await;
    assert_eq!(
        (status, &alias["templateID"]),
        (StatusCode::OK, &json!(template_id))
    );

    // Another team: sees it exists (403), cannot run it, cannot take its name.
    let b = Some(kit.key_b.as_str());
    let (status, _) = kit
        .call("GET", "/templates/aliases/my-app", b, Value::Null)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, refused) = kit
        .try_create(&kit.key_b, json!({"templateID": "my-app"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");
    let (status, taken) = kit
        .call("POST", "/v3/templates", b, json!({"name": "my-app"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{taken}");
    // Nor by the build's name on the hosts, which no listing shows.
    let (status, refused) = kit
        .try_create(&kit.key_b, json!({"templateID": host_template}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{refused}");
    let (_, theirs) = kit.call("GET", "/templates", b, Value::Null).await;
    assert!(!theirs.to_string().contains(&host_template), "{theirs}");
    let (status, _) = kit
        .call(
            "GET",
            &format!("/templates/aliases/{host_template}"),
            b,
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = kit
        .call("GET", "/templates/aliases/nothing", b, Value::Null)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let template_path = format!("/templates/{template_id}");
    let (status, _) = kit.call("DELETE", &template_path, b, Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not theirs to delete");

    // Deleted while its sandboxes run: gone from the API at once; its sandboxes go on, on the
    // host's copy, which the reconcile pass deletes once they are gone.
    let (status, answer) = kit.call_a("DELETE", &template_path).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    let on_host = || {
        wrenn_agent_api::HostAgent::report_in_process(&*kit.agent)
            .unwrap()
            .templates
            .iter()
            .any(|t| t.template_id == host_template)
    };
    assert!(on_host(), "its sandboxes keep the host's copy");
    kit.agent
        .age_template(&host_template, Duration::from_secs(3600));
    let host = kit.plane.fleet.hosts().pop().unwrap();
    let done = wrenn_cp::fleet::reconcile_host(&kit.plane.store, &kit.plane.fleet, &host)
        .await
        .unwrap();
    assert!(done.orphan_templates.is_empty(), "{done:?}");
    for id in &sandboxes {
        let (status, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
        assert_eq!(
            (status, &detail["state"], &detail["alias"]),
            (StatusCode::OK, &json!("running"), &json!("my-app"))
        );
        let (status, _) = kit.call_a("DELETE", &format!("/sandboxes/{id}")).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let done = wrenn_cp::fleet::reconcile_host(&kit.plane.store, &kit.plane.fleet, &host)
        .await
        .unwrap();
    assert_eq!(done.orphan_templates, std::slice::from_ref(&host_template));
    assert!(!on_host());
    assert_eq!(
        kit.call_a("GET", "/templates/aliases/my-app").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        kit.call_a("DELETE", &template_path).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, _) = kit
        .try_create(&kit.key_a, json!({"templateID": "my-app"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A build from a registry's image goes to a host with the base template, the image's name and
/// login with it; the SDKs' default base image is wrenn's base template.
#[tokio::test]
async fn builds_from_images_carry_the_image_and_its_login_to_the_host() {
    let kit = Kit::new(8, Quotas::default()).await;
    let (template_id, build_id) = kit.request_build("from-image").await;
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let body = json!({
        "fromImage": "registry.example.com/team/app:v1",
        "fromImageRegistry": {"type": "registry", "username": "robot", "password": "s3cret"},
        "steps": [{"type": "RUN", "args": ["make"]}],
    });
    let (status, answer) = kit.call("POST", &path, Some(&kit.key_a), body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let (info, lines) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "ready", "{info}");
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(
        messages.contains(&"pulling registry.example.com/team/app:v1 (login as robot)"),
        "{messages:?}"
    );

    let (template_id, build_id) = kit.request_build("from-e2b-base").await;
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let (status, answer) = kit
        .call(
            "POST",
            &path,
            Some(&kit.key_a),
            json!({"fromImage": "e2bdev/base:latest"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let (info, lines) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "ready", "{info}");
    assert!(
        !lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("pulling"))),
        "e2bdev/base is the base template, not pulled: {lines:?}"
    );
}

#[tokio::test]
async fn bad_builds_are_refused_and_a_failed_one_says_where_it_failed() {
    let kit = Kit::new(8, Quotas::default()).await;
    for (body, said) in [
        (json!({"name": ""}), "a template needs a name"),
        (json!({"name": "a b"}), "use lowercase letters"),
        (
            json!({"name": "ok", "cpuCount": 0}),
            "cpuCount must be 1 to 64",
        ),
        (
            json!({"name": "ok", "memoryMB": 64}),
            "memoryMB must be at least 128",
        ),
        (
            json!({"name": "ok", "minFreeDiskMb": 100}),
            "minFreeDiskMb is not supported",
        ),
    ] {
        let (status, answer) = kit
            .call("POST", "/v3/templates", Some(&kit.key_a), body)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(message(&answer).contains(said), "{answer}");
    }

    let (template_id, build_id) = kit.request_build("broken").await;
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    for (body, said) in [
        (json!({"fromImage": "Not An Image"}), "fromImage:"),
        (
            json!({"fromTemplate": "base", "fromImage": "python"}),
            "not both",
        ),
        (
            json!({"fromImage": "python", "fromImageRegistry": {"type": "aws", "awsAccessKeyId": "a"}}),
            "type aws is not supported",
        ),
        (
            json!({"fromImage": "python", "fromImageRegistry": {"type": "registry", "username": "u"}}),
            "password is required",
        ),
        (json!({}), "fromTemplate or fromImage is required"),
        (
            json!({"fromTemplate": "base", "steps": [{"type": "ADD", "args": ["a"]}]}),
            "step 1: unknown type \"ADD\"",
        ),
        (
            json!({"fromTemplate": "base", "steps": [{"type": "ENV", "args": ["A"]}]}),
            "step 1 (ENV): takes name and value pairs",
        ),
        (
            json!({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a", "/b", "", ""]}]}),
            "step 1 (COPY): names no uploaded files (filesHash)",
        ),
    ] {
        let (status, answer) = kit.call("POST", &path, Some(&kit.key_a), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(message(&answer).contains(said), "{answer}");
    }
    let unknown =
        format!("/v2/templates/{template_id}/builds/00000000-0000-4000-8000-000000000000");
    let (status, _) = kit
        .call(
            "POST",
            &unknown,
            Some(&kit.key_a),
            json!({"fromTemplate": "base"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = kit
        .call(
            "POST",
            &path,
            Some(&kit.key_a),
            json!({"fromTemplate": "nothing"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a source no host has");
    // Another team's key does not reach the template.
    let (status, _) = kit
        .call(
            "POST",
            &path,
            Some(&kit.key_b),
            json!({"fromTemplate": "base"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A step that fails on the host: the build ends in error, naming the step.
    kit.agent.fail_next(
        Operation::Build,
        HostAgentError::Conflict(
            "step 2 (RUN make): exited with code 2; its output ended with:\nno rule".into(),
        ),
    );
    let start = json!({"fromTemplate": "base", "steps": [
        {"type": "RUN", "args": ["true"]}, {"type": "RUN", "args": ["make"]}]});
    let (status, _) = kit.call("POST", &path, Some(&kit.key_a), start).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (info, lines) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "error", "{info}");
    assert_eq!(info["reason"]["step"], "2", "{info}");
    assert!(
        info["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 2"),
        "{info}"
    );
    let last = lines.last().unwrap();
    assert_eq!(
        (&last["level"], &last["step"]),
        (&json!("error"), &json!("2"))
    );
    let (status, answer) = kit
        .try_create(&kit.key_a, json!({"templateID": "broken"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(
        message(&answer).contains("has no ready build yet"),
        "{answer}"
    );
}

#[tokio::test]
async fn tags_name_builds_and_move_between_them() {
    let kit = Kit::new(8, Quotas::default()).await;
    let mut builds = Vec::new();
    for name in ["app:v1", "app"] {
        let (template_id, build_id) = kit.request_build(name).await;
        let path = format!("/v2/templates/{template_id}/builds/{build_id}");
        let start = json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": [name]}]});
        let (status, _) = kit.call("POST", &path, Some(&kit.key_a), start).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (info, _) = kit.wait_for_build(&template_id, &build_id).await;
        assert_eq!(info["status"], "ready");
        builds.push((template_id, build_id));
    }
    let (template_id, v1) = builds[0].clone();
    let default = builds[1].1.clone();
    assert_eq!(builds[1].0, template_id, "one template, two builds");
    let on_host = |build: &str| format!("b{}", build.replace('-', ""));
    let started_from = async |named: &str| {
        let id = kit.create(&kit.key_a, json!({"templateID": named})).await;
        kit.agent.sandbox(&id).unwrap().template_id
    };
    assert_eq!(started_from("app:v1").await, on_host(&v1));
    assert_eq!(started_from("app").await, on_host(&default));
    assert_eq!(started_from("app:default").await, on_host(&default));

    // A new tag on the build v1 names.
    let body = json!({"target": "app:v1", "tags": ["Stable"]});
    let (status, assigned) = kit
        .call("POST", "/templates/tags", Some(&kit.key_a), body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{assigned}");
    assert_eq!(assigned, json!({"tags": ["stable"], "buildID": v1}));
    assert_eq!(started_from("app:stable").await, on_host(&v1));
    let (status, listed) = kit
        .call_a("GET", &format!("/templates/{template_id}/tags"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let named: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tag"].as_str().unwrap(), t["buildID"].as_str().unwrap()))
        .collect();
    assert_eq!(
        named,
        [
            ("default", default.as_str()),
            ("stable", v1.as_str()),
            ("v1", v1.as_str())
        ]
    );

    // Removed: gone from the list and from creates.
    let body = json!({"name": "app", "tags": ["stable"]});
    let (status, _) = kit
        .call("DELETE", "/templates/tags", Some(&kit.key_a), body)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = kit
        .try_create(&kit.key_a, json!({"templateID": "app:stable"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (body, status) in [
        (
            json!({"target": "app:nope", "tags": ["x"]}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"target": "app", "tags": []}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"target": "app", "tags": ["bad tag"]}),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({"target": "nothing", "tags": ["x"]}),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (got, answer) = kit
            .call("POST", "/templates/tags", Some(&kit.key_a), body)
            .await;
        assert_eq!(got, status, "{answer}");
    }
    let body = json!({"target": "app", "tags": ["theirs"]});
    let (status, _) = kit
        .call("POST", "/templates/tags", Some(&kit.key_b), body)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another team's template");
}

#[tokio::test]
async fn copy_files_are_uploaded_once_through_their_link_and_go_with_the_build() {
    use wrenn_api::client::Client;
    let kit = Kit::new(8, Quotas::default()).await;
    let url = kit.serve().await;
    let client = Client::new(&url, Some(&kit.key_a)).unwrap();
    let anonymous = Client::new(&url, None).unwrap();
    let no_headers = http::HeaderMap::new();
    let (template_id, build_id) = kit.request_build("copier").await;
    let hash = "ab".repeat(32);
    let files = format!("/templates/{template_id}/files/{hash}");
    let answer = client
        .send(http::Method::GET, &files, &no_headers, None)
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
    let link = answer.json();
    assert_eq!(link["present"], false);
    let upload = link["url"].as_str().unwrap().to_string();
    let upload_path = upload
        .strip_prefix(&url)
        .unwrap_or_else(|| panic!("{upload} is not under {url}"))
        .to_string();
    assert!(
        upload_path.starts_with("/templates/files/uploads/"),
        "{upload}"
    );

    // A build whose COPY files were not uploaded is refused, naming the step.
    let copy = json!({"type": "COPY", "args": ["app", "/srv/app", "", "0755"], "filesHash": hash});
    let start = json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["true"]}, copy]});
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let (status, refused) = kit
        .call("POST", &path, Some(&kit.key_a), start.clone())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        message(&refused).contains("step 2 (COPY): its files"),
        "{refused}"
    );

    // A filesHash that is no SHA-256 names no file (it would name a path).
    for hash in ["../../cp.db", "/etc/passwd", "AB"] {
        let copy = json!({"type": "COPY", "args": ["app", "/srv"], "filesHash": hash});
        let body = json!({"fromTemplate": "base", "steps": [copy]});
        let (status, refused) = kit.call("POST", &path, Some(&kit.key_a), body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{hash}: {refused}");
        assert!(message(&refused).contains("is not a SHA-256"), "{refused}");
    }

    // The upload needs no key; its link works once.
    let tar = bytes::Bytes::from_static(b"a tar, as far as the control plane cares");
    for (attempt, status) in [(1, StatusCode::CREATED), (2, StatusCode::UNAUTHORIZED)] {
        let answer = anonymous
            .send(
                http::Method::PUT,
                &upload_path,
                &no_headers,
                Some(tar.clone()),
            )
            .await
            .unwrap();
        assert_eq!(answer.status, status, "upload {attempt}: {}", answer.text());
    }
    let answer = client
        .send(http::Method::GET, &files, &no_headers, None)
        .await
        .unwrap();
    assert_eq!(answer.json(), json!({"present": true}));
    let bad = format!("/templates/{template_id}/files/not-a-hash");
    let answer = client
        .send(http::Method::GET, &bad, &no_headers, None)
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let theirs = Client::new(&url, Some(&kit.key_b)).unwrap();
    let answer = theirs
        .send(http::Method::GET, &files, &no_headers, None)
        .await
        .unwrap();
    assert_eq!(
        answer.status,
        StatusCode::NOT_FOUND,
        "another team's template"
    );

    // Now the build runs, and the host gets the files with it.
    let (status, answer) = kit.call("POST", &path, Some(&kit.key_a), start).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let (info, _) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "ready", "{info}");
    let sent = kit.agent.builds().pop().unwrap();
    assert_eq!(sent.files.get(&hash).map(Vec::as_slice), Some(&tar[..]));
    assert_eq!(sent.steps[1].args, ["app", "/srv/app", "", "0755"]);
    assert!(
        sent.allow_internet,
        "the plane allows the internet, and says so to the build"
    );
}

#[tokio::test]
async fn a_build_a_previous_run_left_building_is_failed_at_start() {
    let kit = Kit::new(8, Quotas::default()).await;
    let (template_id, build_id) = kit.request_build("interrupted").await;
    let mut build = kit.plane.store.build(&build_id).await.unwrap().unwrap();
    build.status = wrenn_cp::store::BuildStatus::Building;
    kit.plane.store.put_build(build).await.unwrap();

    assert_eq!(kit.plane.fail_interrupted_builds().await.unwrap(), 1);
    let (info, lines) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "error", "{info}");
    assert!(
        info["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("the control plane restarted during the build"),
        "{info}"
    );
    assert_eq!(lines.last().unwrap()["level"], "error");
    assert_eq!(kit.plane.fail_interrupted_builds().await.unwrap(), 0);
    // It no longer holds the template: it can be deleted.
    let (status, _) = kit
        .call_a("DELETE", &format!("/templates/{template_id}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// With a template store the hosts share, a built template runs on a host that does not have
/// it (that host pulls it) when the one that has it has no room, and a delete takes it from
/// every host and from the store.
#[tokio::test]
async fn a_stored_template_runs_on_a_host_that_pulls_it_and_a_delete_takes_it_everywhere() {
    use wrenn_agent_api::HostAgent;
    use wrenn_agent_api::fake::FakeTemplateStore;
    let store = FakeTemplateStore::new("s3://fleet/templates");
    // The edge has no template: builds go to the kit's own host (which has base).
    let edge = FakeAgent::new(4, Vec::new());
    edge.use_store(&store);
    let (kit, _url, edge) = Kit::with_edge(4, FleetConfig::default().down_after, edge).await;
    kit.agent.use_store(&store);
    let (template_id, build_id) = kit.request_build("shared").await;
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let (status, answer) = kit
        .call(
            "POST",
            &path,
            Some(&kit.key_a),
            json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["make"]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let (info, _) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "ready", "{info}");
    assert_eq!(store.template_ids().len(), 1, "the build is in the store");
    let host_template = store.template_ids()[0].clone();
    let (builder, puller): (&FakeAgent, &FakeAgent) = (&kit.agent, &edge.agent);
    assert_eq!(builder.builds().len(), 1);

    // The host that has it takes it while it has room; when it says it has none, the other
    // pulls it.
    let first = kit
        .create(&kit.key_a, json!({"templateID": "shared"}))
        .await;
    assert!(builder.sandbox(&first).is_some());
    builder.fail_next(
        Operation::Create,
        wrenn_agent_api::HostAgentError::NoCapacity("full".into()),
    );
    let second = kit
        .create(&kit.key_a, json!({"templateID": "shared"}))
        .await;
    assert!(puller.sandbox(&second).is_some());
    assert!(
        puller
            .calls()
            .contains(&(Operation::Pull, host_template.clone())),
        "{:?}",
        puller.calls()
    );

    // A delete while sandboxes of it run on both hosts: the template is gone for the API at
    // once; the hosts keep their copies, and the store its artifact, while the sandboxes
    // use them; the reconcile pass takes them everywhere once they are gone.
    let (status, answer) = kit
        .call_a("DELETE", &format!("/templates/{template_id}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    assert_eq!(store.template_ids(), std::slice::from_ref(&host_template));
    for id in [&first, &second] {
        let (status, answer) = kit.call_a("DELETE", &format!("/sandboxes/{id}")).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    }
    for host in [builder, puller] {
        host.age_template(&host_template, Duration::from_secs(3600));
    }
    // The edge tells its aged template in its heartbeat (the kit's own host is read directly).
    {
        use wrenn_agent_api::join::{HeartbeatRequest, host_registry::Heartbeat};
        let beat = HeartbeatRequest {
            host_id: edge.host_id.clone(),
            report: Some(puller.report_in_process().unwrap()),
        };
        edge.registry
            .call::<Heartbeat>(&beat, &bearer(&edge.heartbeat_token))
            .await
            .unwrap();
    }
    for host in kit.plane.fleet.hosts() {
        wrenn_cp::fleet::reconcile_host(&kit.plane.store, &kit.plane.fleet, &host)
            .await
            .unwrap();
    }
    assert!(store.template_ids().is_empty());
    for host in [builder, puller] {
        let report = host.report_in_process().unwrap();
        assert!(
            report
                .templates
                .iter()
                .all(|t| t.template_id != host_template),
            "{report:?} {:?}",
            host.calls()
        );
    }
}

/// Deleting a template while it builds cancels the build (its call to the host is dropped,
/// which stops it there) instead of waiting for it.
#[tokio::test]
async fn deleting_a_template_cancels_its_running_build() {
    let kit = Kit::new(8, Quotas::default()).await;
    // Without a cancel, this build would run for ten minutes.
    kit.agent.delay(Operation::Build, Duration::from_secs(600));
    let (template_id, build_id) = kit.request_build("slow").await;
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let (status, answer) = kit
        .call(
            "POST",
            &path,
            Some(&kit.key_a),
            json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["sleep 600"]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let status_path = format!("/templates/{template_id}/builds/{build_id}/status");
    let (_, info) = kit.call_a("GET", &status_path).await;
    assert_eq!(info["status"], "building", "{info}");

    let (status, answer) = kit
        .call_a("DELETE", &format!("/templates/{template_id}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    let (status, _) = kit.call_a("GET", &status_path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The job ends with its build (it stored the build's end before the delete went on).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !kit.plane.build_jobs_running().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the build's job did not end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A build's template on a host whose build the store does not keep (its template deleted, or
/// the build failed while the host finished it) is deleted by the reconcile pass; a ready
/// build's, a young one and the hosts' own templates stay.
#[tokio::test]
async fn reconcile_deletes_build_templates_no_build_keeps() {
    let kit = Kit::new(8, Quotas::default()).await;
    let (template_id, build_id) = kit.request_build("kept").await;
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let (status, answer) = kit
        .call(
            "POST",
            &path,
            Some(&kit.key_a),
            json!({"fromTemplate": "base"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let (info, _) = kit.wait_for_build(&template_id, &build_id).await;
    assert_eq!(info["status"], "ready", "{info}");
    let kept = format!("b{}", build_id.replace('-', ""));
    let old = |id: &str| TemplateReport {
        created_at_ms: 0,
        ..template(id, 512)
    };
    let orphan = "b0123456789abcdef0123456789abcdef";
    kit.agent.add_template(old(orphan));
    let young = TemplateReport {
        created_at_ms: wrenn_core::now_ms(),
        ..template("bfedcba9876543210fedcba9876543210", 512)
    };
    kit.agent.add_template(young.clone());

    let host = kit.plane.fleet.hosts().pop().unwrap();
    let done = wrenn_cp::fleet::reconcile_host(&kit.plane.store, &kit.plane.fleet, &host)
        .await
        .unwrap();
    assert_eq!(done.orphan_templates, [orphan]);
    use wrenn_agent_api::HostAgent;
    let mut left: Vec<String> = kit
        .agent
        .report_in_process()
        .unwrap()
        .templates
        .into_iter()
        .map(|t| t.template_id)
        .collect();
    left.sort();
    let mut expected = vec!["base".to_string(), young.template_id, kept];
    expected.sort();
    assert_eq!(left, expected);
}

/// A build runs a VM as a sandbox does: it is admitted against the team's running limit, and
/// holds its place until it ends.
#[tokio::test]
async fn a_build_counts_as_a_running_sandbox_against_the_teams_quota() {
    let kit = Kit::with_running_limit(8, 1).await;
    let sandbox = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let (template_id, build_id) = kit.request_build("quota").await;
    let path = format!("/v2/templates/{template_id}/builds/{build_id}");
    let start = json!({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["make"]}]});
    let (status, answer) = kit
        .call("POST", &path, Some(&kit.key_a), start.clone())
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(
        kit.agent.builds().is_empty(),
        "the refused build reached no host"
    );

    let (status, _) = kit.call_a("DELETE", &format!("/sandboxes/{sandbox}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    kit.agent.delay(Operation::Build, Duration::from_secs(600));
    let (status, answer) = kit.call("POST", &path, Some(&kit.key_a), start).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    // While it builds, the team's one place is taken.
    kit.create_refused(json!({"templateID": "base"}), StatusCode::TOO_MANY_REQUESTS)
        .await;
    // Its end (here: its template's delete cancels it) gives the place back.
    let (status, answer) = kit
        .call_a("DELETE", &format!("/templates/{template_id}"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = kit
            .try_create(&kit.key_a, json!({"templateID": "base"}))
            .await;
        if status == StatusCode::CREATED {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The templates the kit's host has.
fn host_templates(kit: &Kit) -> Vec<String> {
    use wrenn_agent_api::HostAgent;
    let report = kit.agent.report_in_process().unwrap();
    report
        .templates
        .into_iter()
        .map(|t| t.template_id)
        .collect()
}

#[tokio::test]
async fn snapshots_are_team_templates_listed_paged_started_and_deleted() {
    let kit = Kit::new(8, Quotas::default()).await;
    let kit = &kit;
    let source = kit
        .create(
            &kit.key_a,
            json!({"templateID": "base", "envVars": {"A": "1"}}),
        )
        .await;
    let snapshot = |name: Value| {
        let path = format!("/sandboxes/{source}/snapshots");
        let body = match name {
            Value::Null => json!({}),
            name => json!({ "name": name }),
        };
        async move { kit.call("POST", &path, Some(&kit.key_a), body).await }
    };
    let (status, named) = snapshot(json!("my-snap")).await;
    assert_eq!(status, StatusCode::CREATED, "{named}");
    assert_eq!(
        named,
        json!({"snapshotID": "my-snap:default", "names": ["my-snap:default"]})
    );
    let (status, unnamed) = snapshot(Value::Null).await;
    assert_eq!(status, StatusCode::CREATED, "{unnamed}");
    let unnamed_id = unnamed["snapshotID"].as_str().unwrap().to_string();
    assert!(unnamed_id.ends_with(":default"), "{unnamed}");
    assert_eq!(unnamed["names"], json!([]));
    // Each is a checkpoint of the running source on its host, which goes on.
    let checkpoints = kit
        .agent
        .calls()
        .into_iter()
        .filter(|(op, id)| *op == Operation::Checkpoint && *id == source)
        .count();
    assert_eq!(checkpoints, 2);
    assert_eq!(kit.state(&source).await, (StatusCode::OK, json!("running")));
    // The same name again: a new build of the same snapshot.
    let (status, again) = snapshot(json!("my-snap")).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &named));
    // Of another sandbox: the name is that sandbox's snapshot from then on.
    let other = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let (status, _) = kit
        .call(
            "POST",
            &format!("/sandboxes/{other}/snapshots"),
            Some(&kit.key_a),
            json!({"name": "my-snap"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, of_other) = kit
        .call_a("GET", &format!("/snapshots?sandboxID={other}"))
        .await;
    assert_eq!(of_other, json!([named.clone()]));
    assert_eq!(
        kit.call_a("DELETE", &format!("/sandboxes/{other}")).await.0,
        StatusCode::NO_CONTENT
    );
    let again = kit
        .call(
            "POST",
            &format!("/sandboxes/{source}/snapshots"),
            Some(&kit.key_a),
            json!({"name": "my-snap"}),
        )
        .await;
    assert_eq!(again.0, StatusCode::CREATED);

    // Listed, filtered and paged.
    let list = |query: &str| {
        let path = format!("/snapshots{query}");
        async move {
            let (status, headers, body) = kit
                .call_full("GET", &path, Some(&kit.key_a), Value::Null)
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let next = headers
                .get("x-next-token")
                .map(|v| v.to_str().unwrap().to_string());
            let ids: Vec<String> = body
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["snapshotID"].as_str().unwrap().to_string())
                .collect();
            (ids, next)
        }
    };
    let (all, next) = list("").await;
    assert_eq!(all, vec!["my-snap:default".to_string(), unnamed_id.clone()]);
    assert_eq!(next, None);
    assert_eq!(list(&format!("?sandboxID={source}")).await.0.len(), 2);
    assert!(list("?sandboxID=nosuch").await.0.is_empty());
    assert_eq!(
        list("?name=my-snap").await.0,
        vec!["my-snap:default".to_string()]
    );
    assert!(list("?name=my-snap:v9").await.0.is_empty());
    let (first, next) = list("?limit=1").await;
    assert_eq!(first, vec!["my-snap:default".to_string()]);
    let next = next.expect("a next page");
    let (second, last) = list(&format!("?limit=1&nextToken={next}")).await;
    assert_eq!((second, last), (vec![unnamed_id.clone()], None));
    let (status, _) = kit.call_a("GET", "/snapshots?limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Another team sees none of them and cannot start or delete them.
    let (status, theirs) = kit
        .call("GET", "/snapshots", Some(&kit.key_b), Value::Null)
        .await;
    assert_eq!((status, theirs), (StatusCode::OK, json!([])));
    let (status, _) = kit
        .try_create(&kit.key_b, json!({"templateID": "my-snap"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = kit
        .call(
            "DELETE",
            "/templates/my-snap",
            Some(&kit.key_b),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = kit
        .call(
            "POST",
            &format!("/sandboxes/{source}/snapshots"),
            Some(&kit.key_b),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Sandboxes start from a snapshot by its name or its id.
    let by_name = kit
        .create(&kit.key_a, json!({"templateID": "my-snap"}))
        .await;
    let by_id = kit
        .create(&kit.key_a, json!({"templateID": unnamed_id}))
        .await;
    let on_host = kit.agent.sandbox(&by_name).unwrap().template_id;
    assert!(
        on_host.starts_with('b') && host_templates(kit).contains(&on_host),
        "{on_host}"
    );
    assert_ne!(kit.agent.sandbox(&by_id).unwrap().template_id, on_host);
    // A snapshot a sandbox was made from is not deleted.
    let (status, refused) = kit.call_a("DELETE", "/templates/my-snap").await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(message(&refused).contains(&by_name), "{refused}");
    assert_eq!(
        kit.call_a("DELETE", &format!("/sandboxes/{by_name}"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (status, answer) = kit.call_a("DELETE", "/templates/my-snap:default").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    assert_eq!(list("").await.0, vec![unnamed_id.clone()]);

    // Refusals: a snapshot without memory, of a paused sandbox, of an unknown one, a name
    // that is a template's.
    let (status, _) = kit
        .call(
            "POST",
            &format!("/sandboxes/{source}/snapshots"),
            Some(&kit.key_a),
            json!({"memory": false}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = kit.call_a("POST", "/sandboxes/nosuch/snapshots").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        kit.call_a("POST", &format!("/sandboxes/{source}/pause"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (status, refused) = snapshot(Value::Null).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(message(&refused).contains("paused"), "{refused}");
}

#[tokio::test]
async fn a_snapshot_counts_against_the_teams_disk_quota() {
    // base: 512 MiB of memory, a 2 GiB disk; the sandbox counts its disk.
    let quotas = Quotas {
        disk_mib: 2048 + 2048 + 512,
        ..Quotas::default()
    };
    let kit = Kit::new(8, quotas).await;
    let source = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let path = format!("/sandboxes/{source}/snapshots");
    let (status, body) = kit.call("POST", &path, Some(&kit.key_a), json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = kit.call("POST", &path, Some(&kit.key_a), json!({})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
}

#[tokio::test]
async fn a_fork_starts_count_sandboxes_from_one_checkpoint_each_reported_alone() {
    let kit = Kit::new(5, Quotas::default()).await;
    let kit = &kit;
    let source = kit
        .create(
            &kit.key_a,
            json!({"templateID": "base", "timeout": 300, "metadata": {"job": "7"}}),
        )
        .await;
    let fork = |count: Value| {
        let path = format!("/sandboxes/{source}/fork");
        async move {
            kit.call(
                "POST",
                &path,
                Some(&kit.key_a),
                json!({"count": count, "timeout": 60}),
            )
            .await
        }
    };
    let (status, forks) = fork(json!(3)).await;
    assert_eq!(status, StatusCode::CREATED, "{forks}");
    let forks = forks.as_array().unwrap().clone();
    assert_eq!(forks.len(), 3);
    let ids: std::collections::BTreeSet<String> = forks
        .iter()
        .map(|f| {
            f["sandbox"]["sandboxID"]
                .as_str()
                .expect("a sandbox")
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), 3);
    let tokens: std::collections::BTreeSet<&str> = forks
        .iter()
        .map(|f| f["sandbox"]["envdAccessToken"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 3, "each fork has a token of its own");
    // One checkpoint, which every fork starts from.
    let checkpoints = kit
        .agent
        .calls()
        .into_iter()
        .filter(|(op, _)| *op == Operation::Checkpoint)
        .count();
    assert_eq!(checkpoints, 1);
    let from: std::collections::BTreeSet<String> = ids
        .iter()
        .map(|id| kit.agent.sandbox(id).unwrap().template_id)
        .collect();
    assert_eq!(from.len(), 1, "{from:?}");
    for id in &ids {
        let (status, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (&detail["templateID"], &detail["metadata"]["job"]),
            (&json!("base"), &json!("7"))
        );
    }
    // The source keeps its id and its end.
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{source}")).await;
    assert_eq!(detail["state"], json!("running"));

    // A host with room for one more: one fork starts, the others fail, each on its own.
    let (status, forks) = fork(json!(3)).await;
    assert_eq!(status, StatusCode::CREATED, "{forks}");
    let started = forks
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.get("sandbox").is_some())
        .count();
    let failed: Vec<&Value> = forks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.get("error"))
        .collect();
    assert_eq!((started, failed.len()), (1, 2), "{forks}");
    assert_eq!(failed[0]["code"], json!(503), "{forks}");

    // Bad counts, and a source that is not running.
    for count in [json!(0), json!(101)] {
        assert_eq!(fork(count).await.0, StatusCode::BAD_REQUEST);
    }
    assert_eq!(
        kit.call_a("POST", &format!("/sandboxes/{source}/pause"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (status, refused) = fork(json!(1)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(
        kit.call_a("DELETE", &format!("/sandboxes/{source}"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(fork(json!(1)).await.0, StatusCode::NOT_FOUND);

    // Once the forks are gone too, so are the checkpoints.
    let (_, listed) = kit.call_a("GET", "/v2/sandboxes").await;
    for sandbox in listed.as_array().unwrap() {
        let id = sandbox["sandboxID"].as_str().unwrap();
        assert_eq!(
            kit.call_a("DELETE", &format!("/sandboxes/{id}")).await.0,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(host_templates(kit), vec!["base".to_string()]);
}

#[tokio::test]
async fn a_pause_may_keep_the_disk_alone_and_the_sandbox_says_which_kind() {
    let kit = Kit::new(8, Quotas::default()).await;
    let id = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    let pause = format!("/sandboxes/{id}/pause");
    let (status, _) = kit
        .call("POST", &pause, Some(&kit.key_a), json!({"memory": false}))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(kit.agent.sandbox(&id).unwrap().disk_only);
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(detail["pauseMode"], json!("filesystem"), "{detail}");
    let connect = format!("/sandboxes/{id}/connect");
    let (status, _) = kit
        .call("POST", &connect, Some(&kit.key_a), json!({"timeout": 60}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(
        (detail["state"].clone(), detail.get("pauseMode")),
        (json!("running"), None)
    );
    let (status, _) = kit.call("POST", &pause, Some(&kit.key_a), json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!kit.agent.sandbox(&id).unwrap().disk_only);
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(detail["pauseMode"], json!("full"));
    // A resume may leave the memory aside.
    let (status, _) = kit
        .call(
            "POST",
            &format!("/sandboxes/{id}/resume"),
            Some(&kit.key_a),
            json!({"timeout": 60, "memory": false}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(kit.agent.calls().contains(&(Operation::Resume, id.clone())));

    // Traffic cannot resume a disk-only pause, so the two are not combined.
    let refused = kit
        .create_refused(
            json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false, "autoResume": {"enabled": true}}),
            StatusCode::BAD_REQUEST,
        )
        .await;
    assert!(message(&refused).contains("autoPauseMemory"), "{refused}");
    // The lifecycle's pause keeps what the create asked for.
    let ends = kit
        .create(&kit.key_a, json!({"templateID": "base", "timeout": 1, "autoPause": true, "autoPauseMemory": false}))
        .await;
    let lifecycle = tokio::spawn(kit.plane.clone().run_lifecycle());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while kit.agent.sandbox(&ends).unwrap().state != SandboxState::Paused {
        assert!(tokio::time::Instant::now() < deadline, "not paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lifecycle.abort();
    assert!(kit.agent.sandbox(&ends).unwrap().disk_only);
}

#[tokio::test]
async fn egress_rules_reach_the_host_are_shown_replaced_live_and_kept_by_snapshots_and_forks() {
    let kit = Kit::new(8, Quotas::default()).await;
    let network = json!({
        "allowOut": ["203.0.114.7", "8.8.8.0/24"],
        "denyOut": ["0.0.0.0/0"],
        "maskRequestHost": "${PORT}-app.example.com",
    });
    let id = kit
        .create(
            &kit.key_a,
            json!({"templateID": "base", "network": network}),
        )
        .await;
    let held = kit.agent.sandbox(&id).unwrap();
    assert_eq!(held.options.egress.allow_out, ["203.0.114.7", "8.8.8.0/24"]);
    assert_eq!(held.options.egress.deny_out, ["0.0.0.0/0"]);
    assert!(held.options.allow_internet);
    let (status, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        detail["network"]["allowOut"],
        json!(["203.0.114.7", "8.8.8.0/24"])
    );
    assert_eq!(detail["network"]["denyOut"], json!(["0.0.0.0/0"]));
    assert_eq!(
        detail["network"]["maskRequestHost"],
        "${PORT}-app.example.com"
    );
    assert_eq!(detail["network"]["allowPublicTraffic"], true);

    // A live update replaces everything: what it leaves out is cleared; the mask stays.
    let path = format!("/sandboxes/{id}/network");
    let (status, body) = kit
        .call(
            "PUT",
            &path,
            Some(&kit.key_a),
            json!({"denyOut": ["1.1.1.1"], "allow_internet_access": true}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let held = kit.agent.sandbox(&id).unwrap();
    assert!(held.options.egress.allow_out.is_empty());
    assert_eq!(held.options.egress.deny_out, ["1.1.1.1"]);
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(detail["network"].get("allowOut"), None);
    assert_eq!(detail["network"]["denyOut"], json!(["1.1.1.1"]));
    assert_eq!(
        detail["network"]["maskRequestHost"],
        "${PORT}-app.example.com"
    );
    // Internet off, as E2B's update spells it.
    let (status, _) = kit
        .call(
            "PUT",
            &path,
            Some(&kit.key_a),
            json!({"allow_internet_access": false}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!kit.agent.sandbox(&id).unwrap().options.allow_internet);
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(detail["allowInternetAccess"], false);
    // Bad rules are refused, naming the entry, and the old ones stay.
    for (body, says) in [
        (json!({"allowOut": ["10.0.0.0/33"]}), "10.0.0.0/33"),
        (json!({"allowOut": ["10.0.0.1/8"]}), "host bits"),
        (json!({"allowOut": [""]}), "empty domain"),
        (json!({"denyOut": ["example.com"]}), "denyOut takes CIDRs"),
        (
            json!({"egressProxy": {"address": "p:1080", "tls": {"enabled": false, "serverName": "x.example.com"}}}),
            "egressProxy.tls",
        ),
        (
            json!({"egressProxy": {"address": "ftp://p:1080"}}),
            "socks5:// or http://",
        ),
        (json!({"allowOut": "1.1.1.1"}), "invalid request body"),
    ] {
        let (status, refused) = kit.call("PUT", &path, Some(&kit.key_a), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(message(&refused).contains(says), "{body}: {refused}");
    }
    let many: Vec<String> = (0..600)
        .map(|i| format!("10.1.{}.{}", i / 250, i % 250))
        .collect();
    let (status, refused) = kit
        .call("PUT", &path, Some(&kit.key_a), json!({ "allowOut": many }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&refused).contains("at most"), "{refused}");
    assert!(
        !kit.agent.sandbox(&id).unwrap().options.allow_internet,
        "the old rules stay"
    );
    // Another team's key finds no such sandbox.
    let (status, _) = kit
        .call("PUT", &path, Some(&kit.key_b), json!({"denyOut": []}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A create's bad rules are refused the same way, and nothing is made.
    for network in [
        json!({"allowOut": ["300.1.1.1"]}),
        json!({"maskRequestHost": "a b"}),
        json!({"rules": {"example.com": [{"transform": {"headers": {"Host": "1"}}}]}}),
        json!({"rules": {"": [{"transform": {"headers": {"X-A": "1"}}}]}}),
    ] {
        let refused = kit
            .create_refused(
                json!({"templateID": "base", "network": network}),
                StatusCode::BAD_REQUEST,
            )
            .await;
        assert!(!message(&refused).is_empty(), "{refused}");
    }

    // Paused: the rules are kept for the resume.
    let (status, _) = kit
        .call(
            "PUT",
            &path,
            Some(&kit.key_a),
            json!({"allowOut": ["9.9.9.9"], "denyOut": ["0.0.0.0/0"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        kit.call_a("POST", &format!("/sandboxes/{id}/pause"))
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let (status, _) = kit
        .call(
            "PUT",
            &path,
            Some(&kit.key_a),
            json!({"allowOut": ["9.9.9.10"], "denyOut": ["0.0.0.0/0"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        kit.agent.sandbox(&id).unwrap().options.egress.allow_out,
        ["9.9.9.10"]
    );
    let (status, _) = kit
        .call(
            "POST",
            &format!("/sandboxes/{id}/connect"),
            Some(&kit.key_a),
            json!({"timeout": 60}),
        )
        .await;
    assert!(status.is_success(), "{status}");
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(detail["network"]["allowOut"], json!(["9.9.9.10"]));

    // A snapshot keeps them: its sandboxes start with them unless their create sets some.
    let (status, snapshot) = kit
        .call(
            "POST",
            &format!("/sandboxes/{id}/snapshots"),
            Some(&kit.key_a),
            json!({"name": "ruled"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{snapshot}");
    let from_snapshot = kit.create(&kit.key_a, json!({"templateID": "ruled"})).await;
    let held = kit.agent.sandbox(&from_snapshot).unwrap();
    assert_eq!(held.options.egress.allow_out, ["9.9.9.10"]);
    // (The last update left allow_internet_access out: back to its default, on.)
    assert!(held.options.allow_internet);
    let (_, detail) = kit
        .call_a("GET", &format!("/sandboxes/{from_snapshot}"))
        .await;
    assert_eq!(
        detail["network"]["maskRequestHost"],
        "${PORT}-app.example.com"
    );
    let own = kit
        .create(
            &kit.key_a,
            json!({"templateID": "ruled", "network": {"denyOut": ["1.0.0.0/8"]}}),
        )
        .await;
    let held = kit.agent.sandbox(&own).unwrap();
    assert_eq!(held.options.egress.deny_out, ["1.0.0.0/8"]);
    assert!(held.options.egress.allow_out.is_empty());
    assert!(held.options.allow_internet);
    // A fork copies its source's.
    let (status, forks) = kit
        .call(
            "POST",
            &format!("/sandboxes/{id}/fork"),
            Some(&kit.key_a),
            json!({"count": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{forks}");
    let fork = forks[0]["sandbox"]["sandboxID"].as_str().unwrap();
    let held = kit.agent.sandbox(fork).unwrap();
    assert_eq!(held.options.egress.allow_out, ["9.9.9.10"]);
    assert_eq!(held.options.egress.deny_out, ["0.0.0.0/0"]);
}

/// Header transforms reach the host whole (the agent enforces them), and are never shown
/// back: `GET` and a list show their values as `***`.
#[tokio::test]
async fn header_transforms_reach_the_host_and_their_values_are_never_shown() {
    let kit = Kit::new(8, Quotas::default()).await;
    let network = json!({
        "allowOut": ["api.example.com"],
        "denyOut": ["0.0.0.0/0"],
        "rules": {"api.example.com": [{"transform": {"headers": {"Authorization": "Bearer s3cret"}}}]},
    });
    let id = kit
        .create(
            &kit.key_a,
            json!({"templateID": "base", "network": network}),
        )
        .await;
    let held = kit.agent.sandbox(&id).unwrap();
    let rule = &held.options.egress.rules["api.example.com"][0];
    assert_eq!(
        rule.transform.as_ref().unwrap().headers["Authorization"],
        "Bearer s3cret"
    );
    let (status, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        detail["network"]["rules"]["api.example.com"][0]["transform"]["headers"]["Authorization"],
        "***"
    );
    assert!(!detail.to_string().contains("s3cret"), "{detail}");
    // A live update with new values: the host has them, nobody is shown them.
    let (status, body) = kit
        .call(
            "PUT",
            &format!("/sandboxes/{id}/network"),
            Some(&kit.key_a),
            json!({"rules": {"*.example.com": [{"transform": {"headers": {"X-Key": "second-s3cret-value"}}}]}}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let held = kit.agent.sandbox(&id).unwrap();
    assert_eq!(
        held.options.egress.rules["*.example.com"][0]
            .transform
            .as_ref()
            .unwrap()
            .headers["X-Key"],
        "second-s3cret-value"
    );
    let (_, listed) = kit.call_a("GET", "/v2/sandboxes").await;
    assert!(
        !listed.to_string().contains("second-s3cret-value"),
        "{listed}"
    );
    let (_, detail) = kit.call_a("GET", &format!("/sandboxes/{id}")).await;
    assert!(
        !detail.to_string().contains("second-s3cret-value"),
        "{detail}"
    );
}

/// A key made for a new team, an operator's (an admin team's) when `operator`.
async fn team_with_key(kit: &Kit, name: &str, operator: bool) -> (String, String) {
    let team = Team {
        id: format!("team-{name}"),
        name: name.into(),
        created_at_ms: 1,
        admin: operator,
    };
    kit.plane.store.create_team(team.clone()).await.unwrap();
    let (key, _) = wrenn_cp::service::keys::make_key(
        &kit.plane.store,
        &team.id,
        "first",
        wrenn_cp::store::Role::Owner,
    )
    .await
    .unwrap();
    (team.id, key)
}

#[tokio::test]
async fn keys_are_made_listed_renamed_and_revoked_over_the_api_and_a_revoked_key_fails_at_once() {
    let kit = Kit::new(2, Quotas::default()).await;
    let (status, made) = kit
        .call(
            "POST",
            "/api-keys",
            Some(&kit.key_a),
            json!({"name": "deploy"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("e2b_") && key.len() == 44);
    assert_eq!(made["mask"]["maskedValueSuffix"], json!(key[40..]));
    assert_eq!(made["mask"]["maskedValuePrefix"], json!(key[4..6]));
    assert_eq!(made["role"], "owner", "the caller's role by default");
    // The new key works at once, for its team.
    assert_eq!(
        kit.call("GET", "/sandboxes", Some(&key), Value::Null)
            .await
            .0,
        StatusCode::OK
    );
    let listed = kit.call_a("GET", "/api-keys").await.1;
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "deploy"]);
    assert!(
        !listed.to_string().contains(&key),
        "a listing never shows a key"
    );

    let path = format!("/api-keys/{id}");
    let renamed = kit
        .call(
            "PATCH",
            &path,
            Some(&kit.key_a),
            json!({"name": "deploy-2"}),
        )
        .await;
    assert_eq!(renamed.0, StatusCode::OK, "{}", renamed.1);
    assert_eq!(
        kit.call_a("GET", "/api-keys").await.1[1]["name"],
        "deploy-2"
    );
    let bad = kit
        .call("PATCH", &path, Some(&kit.key_a), json!({"name": ""}))
        .await;
    assert_eq!(bad.0, StatusCode::BAD_REQUEST, "{}", bad.1);

    // Another team's key cannot see or touch it.
    for (method, body) in [("PATCH", json!({"name": "x"})), ("DELETE", Value::Null)] {
        let (status, _) = kit.call(method, &path, Some(&kit.key_b), body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method}");
    }
    assert_eq!(kit.call_a("DELETE", &path).await.0, StatusCode::NO_CONTENT);
    let (status, body) = kit.call("GET", "/sandboxes", Some(&key), Value::Null).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked at once: {body}");
    assert_eq!(kit.call_a("DELETE", &path).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        kit.call_a("GET", "/api-keys")
            .await
            .1
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Both ends of the key's life are events of the team, by the key that did them.
    let events = kit
        .call_a("GET", "/v1/events?type=key.created,key.revoked")
        .await
        .1;
    let seen: Vec<(&str, &str, &str)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["subject"].as_str().unwrap(),
                e["actor"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("key.created", id.as_str(), "key:key-a"),
            ("key.revoked", id.as_str(), "key:key-a")
        ]
    );
}

#[tokio::test]
async fn roles_members_cannot_make_keys_or_read_the_audit_and_operators_see_every_team() {
    let kit = Kit::new(2, Quotas::default()).await;
    let (_, member) = kit
        .call(
            "POST",
            "/api-keys",
            Some(&kit.key_a),
            json!({"name": "intern", "role": "member"}),
        )
        .await;
    let member = member["key"].as_str().unwrap().to_string();
    let call = |method: &'static str, path: &'static str, key: String, body: Value| {
        let kit = &kit;
        async move { kit.call(method, path, Some(&key), body).await }
    };
    // A member uses sandboxes and lists keys, and nothing more.
    let (status, body) = call("POST", "/api-keys", member.clone(), json!({"name": "x"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(message(&body).contains("member"), "{body}");
    assert_eq!(
        call("GET", "/api-keys", member.clone(), Value::Null)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call("GET", "/v1/audit", member.clone(), Value::Null)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    kit.create(&member, json!({"templateID": "base"})).await;
    // An owner cannot hand out more than it has, and no unknown role.
    let (status, _) = call(
        "POST",
        "/api-keys",
        member.clone(),
        json!({"name": "x", "role": "owner"}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(
        "POST",
        "/api-keys",
        kit.key_a.clone(),
        json!({"name": "x", "role": "god"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // An admin cannot revoke an owner's key.
    let (_, admin) = call(
        "POST",
        "/api-keys",
        kit.key_a.clone(),
        json!({"name": "ops", "role": "admin"}),
    )
    .await;
    let admin = admin["key"].as_str().unwrap().to_string();
    let revoke_owner = kit
        .call("DELETE", "/api-keys/key-a", Some(&admin), Value::Null)
        .await;
    assert_eq!(revoke_owner.0, StatusCode::FORBIDDEN, "{}", revoke_owner.1);

    // The owner reads its team's audit log, and only its team's; another team's is refused.
    let audit = call("GET", "/v1/audit", kit.key_a.clone(), Value::Null)
        .await
        .1;
    let entries = audit["entries"].as_array().unwrap();
    assert!(entries.iter().all(|e| e["teamID"] == "team-a"), "{audit}");
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "POST /api-keys" && e["outcome"] == 403),
        "refusals are kept too: {audit}"
    );
    let (status, _) = kit
        .call(
            "GET",
            "/v1/audit?team=team-a",
            Some(&kit.key_b),
            Value::Null,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a member of no team reads another's audit"
    );
    let b_events = kit
        .call("GET", "/v1/events", Some(&kit.key_b), Value::Null)
        .await
        .1;
    assert_eq!(
        b_events["events"],
        json!([]),
        "team b sees none of team a's events"
    );

    // An operator sees every team, and every team's log.
    let (_, operator) = team_with_key(&kit, "ops", true).await;
    let teams = kit
        .call("GET", "/teams", Some(&operator), Value::Null)
        .await
        .1;
    assert_eq!(teams.as_array().unwrap().len(), 3, "{teams}");
    let own = kit.call_a("GET", "/teams").await.1;
    assert_eq!(own.as_array().unwrap().len(), 1);
    assert_eq!(own[0]["isDefault"], true);
    assert_eq!(own[0]["apiKey"], json!(kit.key_a));
    let all = kit
        .call(
            "GET",
            "/v1/audit?team=all&type=post",
            Some(&operator),
            Value::Null,
        )
        .await
        .1;
    assert!(
        all["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["teamID"] == "team-a"),
        "{all}"
    );
    let team_a = kit
        .call(
            "GET",
            "/v1/events?team=team-a&type=sandbox.created",
            Some(&operator),
            Value::Null,
        )
        .await
        .1;
    assert_eq!(team_a["events"].as_array().unwrap().len(), 1, "{team_a}");
}

#[tokio::test]
async fn lifecycle_changes_are_events_in_order_and_a_stream_delivers_them_live() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let kit = Kit::new(2, Quotas::default()).await;
    let url = kit.serve().await;
    // A stream from now on, opened before anything happens.
    let mut stream = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "GET /v1/events/stream?type=sandbox.created,sandbox.paused,sandbox.resumed,sandbox.killed HTTP/1.1\r\nHost: x\r\nX-API-KEY: {}\r\n\r\n",
        kit.key_a
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 1024];
    let read = stream.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..read]).to_string();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"),
        "{head}"
    );

    let id = kit.create(&kit.key_a, json!({"templateID": "base"})).await;
    for (method, path) in [
        ("POST", format!("/sandboxes/{id}/pause")),
        ("POST", format!("/sandboxes/{id}/resume")),
        ("DELETE", format!("/sandboxes/{id}")),
    ] {
        let (status, body) = kit.call_a(method, &path).await;
        assert!(status.is_success(), "{method} {path}: {status} {body}");
    }
    let listed = kit
        .call_a("GET", &format!("/v1/events?subject={id}"))
        .await
        .1;
    let kinds: Vec<&str> = listed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "sandbox.created",
            "sandbox.paused",
            "sandbox.resumed",
            "sandbox.killed"
        ]
    );
    assert_eq!(listed["events"][0]["data"]["templateID"], "base");
    // Paged by the cursor: one at a time, the same order.
    let first = kit
        .call_a("GET", &format!("/v1/events?subject={id}&limit=1"))
        .await
        .1;
    let next = first["next"].as_i64().unwrap();
    let second = kit
        .call_a(
            "GET",
            &format!("/v1/events?subject={id}&limit=1&after={next}"),
        )
        .await
        .1;
    assert_eq!(second["events"][0]["type"], "sandbox.paused");

    // The stream got the same four, live, each once.
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while text.matches("event: ").count() < 4 {
        let mut chunk = vec![0u8; 4096];
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("the stream delivers the events")
            .unwrap();
        assert!(read > 0, "the stream ended: {text}");
        text.push_str(&String::from_utf8_lossy(&chunk[..read]));
    }
    let streamed: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .collect();
    assert_eq!(streamed, kinds, "{text}");
    assert!(text.contains(&format!("\"subject\":\"{id}\"")), "{text}");

    // A stream resumed from an event's id gets what followed it, and nothing before.
    let seq = listed["events"][1]["seq"].as_i64().unwrap();
    let mut resumed = tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "GET /v1/events/stream?subject={id} HTTP/1.1\r\nHost: x\r\nX-API-KEY: {}\r\nLast-Event-ID: {seq}\r\n\r\n",
        kit.key_a
    );
    resumed.write_all(request.as_bytes()).await.unwrap();
    let mut text = String::new();
    while text.matches("event: ").count() < 2 {
        let mut chunk = vec![0u8; 4096];
        let read = tokio::time::timeout_at(deadline, resumed.read(&mut chunk))
            .await
            .expect("the resumed stream delivers")
            .unwrap();
        assert!(read > 0);
        text.push_str(&String::from_utf8_lossy(&chunk[..read]));
    }
    let streamed: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("event: "))
        .collect();
    assert_eq!(streamed, ["sandbox.resumed", "sandbox.killed"], "{text}");
}
