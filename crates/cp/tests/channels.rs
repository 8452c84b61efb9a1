//! Notification channels end to end, fast and without root: a control plane over a real SQLite
//! store (no hosts: events are published as the lifecycle publishes them), its REST API through
//! the router, the deliverer running as `wrenn server` runs it, and real HTTP receivers on
//! 127.0.0.1 that verify the signatures with the secret the create answer gave.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use wrenn_agent_api::fake::{FakeAgent, template};
use wrenn_cp::ControlPlane;
use wrenn_cp::channels::{ChannelPolicy, Channels, SecretBox, run_deliveries, secrets};
use wrenn_cp::events::EventKind;
use wrenn_cp::fleet::{Fleet, FleetConfig, LeastLoaded};
use wrenn_cp::store::{ApiKey, LogQuery, Role, Store, Team};

/// A policy in milliseconds: retries at 30, 60, 120 ms …; five attempts; two deliveries
/// given up in a row disable a channel; receivers on loopback allowed.
fn fast_policy() -> ChannelPolicy {
    ChannelPolicy {
        timeout: Duration::from_secs(2),
        first_retry: Duration::from_millis(30),
        max_retry: Duration::from_millis(120),
        max_attempts: 5,
        disable_after: 2,
        allow_private: true,
        poll: Duration::from_millis(200),
        log_retention: Duration::from_secs(3600),
    }
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Value,
}

/// An HTTP receiver on 127.0.0.1: it answers 500 to its first `fail_first` requests (and to
/// every one while `failing` is above 0), 204 to the rest, and keeps every request.
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    fail_first: Arc<AtomicUsize>,
    failing: Arc<AtomicUsize>,
    /// Its first this many requests get no answer for 5 s.
    hang_first: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            got: Default::default(),
            fail_first: Arc::new(AtomicUsize::new(fail_first)),
            failing: Arc::new(AtomicUsize::new(0)),
            hang_first: Arc::new(AtomicUsize::new(0)),
        };
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    state.got.lock().unwrap().push(Received { headers, body });
                    let hang = state
                        .hang_first
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if hang {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    let first = state
                        .fail_first
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if first || state.failing.load(Ordering::SeqCst) > 0 {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until it has got `count` requests.
    async fn wait_for(&self, count: usize) -> Vec<Received> {
        for _ in 0..1000 {
            let got = self.got();
            if got.len() >= count {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the receiver got {:?}, not {count} requests", self.got());
    }
}

/// A control plane over a SQLite file with channels, two teams (`a`: an owner's and a
/// member's key; `b`: an owner's) and a running deliverer.
struct Kit {
    plane: Arc<ControlPlane>,
    owner_a: String,
    member_a: String,
    owner_b: String,
    deliverer: CancellationToken,
    /// The deliverer's task, to wait for after cancelling it.
    delivering: tokio::task::JoinHandle<()>,
    dir: Arc<tempfile::TempDir>,
}

async fn add_key(store: &Store, team: &str, name: &str, role: Role) -> String {
    let (key, hash) = wrenn_cp::auth::new_key().unwrap();
    let record = ApiKey {
        id: format!("key-{name}"),
        team_id: team.into(),
        name: name.into(),
        prefix: key[..10].into(),
        created_at_ms: 0,
        revoked: false,
        role,
        mask_suffix: key[40..].into(),
    };
    store.add_key(record, hash).await.unwrap();
    key
}

impl Kit {
    async fn new(policy: ChannelPolicy) -> Kit {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let store = Store::open(&dir.path().join("cp.db")).unwrap();
        let mut keys = Vec::new();
        for team in ["a", "b"] {
            let record = Team {
                id: format!("team-{team}"),
                name: team.into(),
                created_at_ms: 0,
                admin: false,
            };
            store.create_team(record).await.unwrap();
            let owner = format!("owner-{team}");
            keys.push(add_key(&store, &format!("team-{team}"), &owner, Role::Owner).await);
        }
        let member = add_key(&store, "team-a", "member-a", Role::Member).await;
        Kit::over(dir, store, policy, keys[0].clone(), member, keys[1].clone()).await
    }

    /// A kit over the store (and secrets key) in `dir`, as a restarted control plane is.
    async fn over(
        dir: Arc<tempfile::TempDir>,
        store: Store,
        policy: ChannelPolicy,
        owner_a: String,
        member_a: String,
        owner_b: String,
    ) -> Kit {
        let agent = Arc::new(FakeAgent::new(1, vec![template("base", 512)]));
        let fleet = Fleet::load(
            &store,
            FleetConfig::default(),
            Box::new(LeastLoaded),
            Some(agent),
        )
        .await
        .unwrap();
        let secrets = SecretBox::open_or_create(&dir.path().join("cp/secrets.key")).unwrap();
        let channels = Channels {
            secrets: secrets.clone(),
            policy: policy.clone(),
        };
        let (plane, _wake) = ControlPlane::new(store.clone(), fleet, None, true);
        let plane = Arc::new(plane.with_channels(channels));
        let deliverer = CancellationToken::new();
        let delivering = tokio::spawn(run_deliveries(store, secrets, policy, deliverer.clone()));
        Kit {
            plane,
            owner_a,
            member_a,
            owner_b,
            deliverer,
            delivering,
            dir,
        }
    }

    /// Stops the deliverer and the control plane, and starts both again over the same store
    /// file and secrets key.
    async fn restart(self) -> Kit {
        let Kit {
            plane,
            owner_a,
            member_a,
            owner_b,
            deliverer,
            delivering,
            dir,
        } = self;
        deliverer.cancel();
        let policy = plane.channels.as_ref().unwrap().policy.clone();
        drop(plane);
        // The fleet's loops are not running: dropping the plane drops the store's last handle
        // but the deliverer's, which has stopped once its task has ended.
        delivering.await.unwrap();
        let store = Store::open(&dir.path().join("cp.db")).unwrap();
        Kit::over(dir, store, policy, owner_a, member_a, owner_b).await
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(if body.is_null() {
                Vec::new()
            } else {
                body.to_string().into_bytes()
            }))
            .unwrap();
        let response = wrenn_cp::http::router(self.plane.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    /// Makes a channel of team `a`: its answer.
    async fn channel(&self, kind: &str, url: &str, events: &[&str]) -> Value {
        let body = json!({ "name": format!("{kind} channel"), "kind": kind, "url": url, "events": events });
        let (status, made) = self.call("POST", "/v1/channels", &self.owner_a, body).await;
        assert_eq!(status, StatusCode::CREATED, "{made}");
        made
    }

    /// Records an event of team `a` as the lifecycle does: its id.
    async fn event(&self, kind: EventKind, subject: &str) -> String {
        self.plane
            .store
            .publish(kind, "team-a", subject, json!({ "subject": subject }))
            .await;
        let query = LogQuery {
            team_id: Some("team-a".into()),
            subject: Some(subject.into()),
            limit: 1000,
            ..LogQuery::default()
        };
        let events = self.plane.store.events(query).await.unwrap();
        events.last().unwrap().id.clone()
    }

    async fn deliveries(&self, channel: &str) -> Vec<Value> {
        let path = format!("/v1/channels/{channel}/deliveries");
        let (status, log) = self.call("GET", &path, &self.owner_a, Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{log}");
        log.as_array().unwrap().clone()
    }

    /// The channel's delivery log once `settled` holds of it (the deliverer records an
    /// attempt just after the receiver answered it).
    async fn settled_log(&self, channel: &str, settled: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..500 {
            let log = self.deliveries(channel).await;
            if settled(&log) {
                return log;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the delivery log never settled: {:?}",
            self.deliveries(channel).await
        );
    }
}

fn all_delivered(log: &[Value]) -> bool {
    log.iter().all(|d| d["state"] == "delivered")
}

/// Checks a webhook request's signature with `secret`, as a receiver following Standard
/// Webhooks does: the request's event.
fn verified(received: &Received, secret: &str) -> Value {
    let header = |name: &str| {
        received
            .headers
            .get(name)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    let id = header("webhook-id");
    let timestamp: i64 = header("webhook-timestamp").parse().unwrap();
    assert!((wrenn_core::now_ms() / 1000 - timestamp).abs() < 60);
    let body = received.body.to_string();
    let expected = secrets::sign(secret, &id, timestamp, body.as_bytes()).unwrap();
    assert_eq!(header("webhook-signature"), expected, "a bad signature");
    assert_eq!(received.body["id"], id.as_str());
    received.body.clone()
}

#[tokio::test]
async fn a_webhook_receiver_gets_the_teams_events_signed_and_in_order() {
    let kit = Kit::new(fast_policy()).await;
    let all = Receiver::start(0).await;
    let killed_only = Receiver::start(0).await;
    let made = kit.channel("webhook", &all.url, &[]).await;
    let secret = made["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{made}");
    let filtered = kit
        .channel("webhook", &killed_only.url, &["sandbox.killed"])
        .await;
    assert_eq!(filtered["events"], json!(["sandbox.killed"]));

    let mut ids = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 {
            EventKind::SandboxCreated
        } else {
            EventKind::SandboxKilled
        };
        ids.push(kit.event(kind, &format!("sb{i}")).await);
    }
    // Another team's event and the fleet's go to no channel of team a.
    let plane = &kit.plane;
    plane
        .store
        .publish(EventKind::SandboxCreated, "team-b", "other", json!({}))
        .await;
    plane
        .store
        .publish(EventKind::HostDown, "", "h1", json!({}))
        .await;

    let got = all.wait_for(5).await;
    let events: Vec<Value> = got.iter().map(|r| verified(r, &secret)).collect();
    let got_ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids, "each event once, in the order recorded");
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(events[0]["type"], "sandbox.created");
    assert_eq!(events[0]["team"], "team-a");
    assert_eq!(events[0]["subject"], "sb0");
    assert_eq!(events[0]["data"], json!({ "subject": "sb0" }));
    assert!(events[0]["at"].as_str().unwrap().ends_with('Z'));

    let got = killed_only.wait_for(2).await;
    let kinds: Vec<&str> = got
        .iter()
        .map(|r| r.body["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sandbox.killed", "sandbox.killed"]);
    // The other team's event and the fleet's never come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(all.got().len(), 5);

    let log = kit
        .settled_log(made["id"].as_str().unwrap(), all_delivered)
        .await;
    assert_eq!(log.len(), 5);
    assert!(
        log.iter()
            .all(|d| d["state"] == "delivered" && d["lastStatus"] == 204)
    );
    assert!(
        log[0]["eventSeq"].as_i64() > log[4]["eventSeq"].as_i64(),
        "newest first"
    );
    // The secret is shown once: never in a listing or a read.
    let (_, listed) = kit
        .call("GET", "/v1/channels", &kit.member_a, Value::Null)
        .await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(listed[0].get("secret").is_none() && listed[0]["url"] == all.url.as_str());
    // The writes are in the audit log, the channel made as their resource.
    let audit = LogQuery {
        team_id: Some("team-a".into()),
        limit: 100,
        ..LogQuery::default()
    };
    let rows = kit.plane.store.audit(audit).await.unwrap();
    let resource = format!("/v1/channels/{}", made["id"].as_str().unwrap());
    assert!(
        rows.iter()
            .any(|r| r.action == "POST /v1/channels" && r.resource == resource && r.outcome == 201),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_failing_receiver_gets_retries_and_later_events_wait_their_turn() {
    let kit = Kit::new(fast_policy()).await;
    let receiver = Receiver::start(3).await;
    let made = kit.channel("webhook", &receiver.url, &[]).await;
    let secret = made["secret"].as_str().unwrap().to_string();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            kit.event(EventKind::SandboxCreated, &format!("sb{i}"))
                .await,
        );
    }
    let got = receiver.wait_for(6).await;
    let order: Vec<String> = got
        .iter()
        .map(|r| verified(r, &secret)["id"].as_str().unwrap().to_string())
        .collect();
    // The first event three times refused, then taken; the others after it, once each.
    let expected: Vec<String> = [&ids[0], &ids[0], &ids[0], &ids[0], &ids[1], &ids[2]]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(order, expected);
    let log = kit
        .settled_log(made["id"].as_str().unwrap(), all_delivered)
        .await;
    let attempts: Vec<i64> = log
        .iter()
        .map(|d| d["attempts"].as_i64().unwrap())
        .collect();
    assert_eq!(attempts, [1, 1, 4], "newest first");
    assert!(log.iter().all(|d| d["state"] == "delivered"));
    let (_, channel) = kit
        .call(
            "GET",
            &format!("/v1/channels/{}", made["id"].as_str().unwrap()),
            &kit.owner_a,
            Value::Null,
        )
        .await;
    assert_eq!(channel["consecutiveFailures"], 0);
    assert_eq!(channel["enabled"], true);
}

#[tokio::test]
async fn a_control_plane_restart_mid_retry_still_delivers() {
    let policy = ChannelPolicy {
        // Long enough that the restart comes between two attempts.
        max_attempts: 100,
        ..fast_policy()
    };
    let kit = Kit::new(policy).await;
    let receiver = Receiver::start(0).await;
    receiver.failing.store(1, Ordering::SeqCst);
    let made = kit.channel("webhook", &receiver.url, &[]).await;
    let channel = made["id"].as_str().unwrap().to_string();
    let secret = made["secret"].as_str().unwrap().to_string();
    let id = kit.event(EventKind::SandboxPaused, "sb1").await;
    let refused = receiver.wait_for(2).await;
    let kit = kit.restart().await;
    let before = receiver.got().len();
    receiver.failing.store(0, Ordering::SeqCst);

    let got = receiver.wait_for(before + 1).await;
    let last = got.last().unwrap();
    assert_eq!(verified(last, &secret)["id"], id.as_str());
    assert_eq!(
        last.body, refused[0].body,
        "the very event that was pending, unchanged"
    );
    let log = kit.settled_log(&channel, all_delivered).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["state"], "delivered");
    assert!(log[0]["attempts"].as_i64().unwrap() >= 3, "{log:?}");
    // Delivered once: nothing more comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.got().len(), got.len());
}

#[tokio::test]
async fn repeated_failures_disable_a_channel_and_enabling_it_resumes_deliveries() {
    let policy = ChannelPolicy {
        max_attempts: 2,
        ..fast_policy()
    };
    let kit = Kit::new(policy).await;
    let receiver = Receiver::start(0).await;
    receiver.failing.store(1, Ordering::SeqCst);
    let made = kit.channel("webhook", &receiver.url, &[]).await;
    let channel = made["id"].as_str().unwrap().to_string();
    let path = format!("/v1/channels/{channel}");
    kit.event(EventKind::SandboxCreated, "sb1").await;
    kit.event(EventKind::SandboxCreated, "sb2").await;
    receiver.wait_for(4).await;
    let mut disabled = Value::Null;
    for _ in 0..200 {
        disabled = kit.call("GET", &path, &kit.owner_a, Value::Null).await.1;
        if disabled["enabled"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(disabled["enabled"], false, "{disabled}");
    assert_eq!(disabled["consecutiveFailures"], 2);
    let reason = disabled["disabledReason"].as_str().unwrap();
    assert!(reason.contains("500"), "{reason}");
    let log = kit
        .settled_log(&channel, |log| log.iter().all(|d| d["state"] == "failed"))
        .await;
    assert!(log.iter().all(|d| d["attempts"] == 2), "{log:?}");
    // The team learns of it from its events.
    let query = LogQuery {
        team_id: Some("team-a".into()),
        kinds: vec!["channel.disabled".into()],
        limit: 10,
        ..LogQuery::default()
    };
    assert_eq!(kit.plane.store.events(query).await.unwrap().len(), 1);
    // A disabled channel gets nothing, and cannot be tested.
    kit.event(EventKind::SandboxCreated, "sb3").await;
    let test = format!("{path}/test");
    let (status, _) = kit.call("POST", &test, &kit.owner_a, Value::Null).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(kit.deliveries(&channel).await.len(), 2);

    receiver.failing.store(0, Ordering::SeqCst);
    let before = receiver.got().len();
    let (status, enabled) = kit
        .call("PATCH", &path, &kit.owner_a, json!({ "enabled": true }))
        .await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert_eq!(enabled["consecutiveFailures"], 0);
    assert!(enabled.get("disabledReason").is_none(), "{enabled}");
    let id = kit.event(EventKind::SandboxKilled, "sb4").await;
    let got = receiver.wait_for(before + 1).await;
    assert_eq!(got.last().unwrap().body["id"], id.as_str());
}

#[tokio::test]
async fn slack_and_discord_channels_get_their_shapes_and_tests_go_to_one_channel() {
    let kit = Kit::new(fast_policy()).await;
    let slack = Receiver::start(0).await;
    let discord = Receiver::start(0).await;
    let slack_made = kit.channel("slack", &slack.url, &[]).await;
    assert!(slack_made.get("secret").is_none(), "{slack_made}");
    kit.channel("discord", &discord.url, &["sandbox.killed"])
        .await;

    kit.event(EventKind::SandboxKilled, "sb1").await;
    let test = format!("/v1/channels/{}/test", slack_made["id"].as_str().unwrap());
    let (status, _) = kit.call("POST", &test, &kit.owner_a, Value::Null).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let got = slack.wait_for(2).await;
    let texts: Vec<&str> = got
        .iter()
        .map(|r| r.body["text"].as_str().unwrap())
        .collect();
    assert!(texts[0].contains("sandbox.killed sb1"), "{texts:?}");
    assert!(texts[1].contains("a test"), "{texts:?}");
    assert!(got.iter().all(|r| r.body.as_object().unwrap().len() == 1));
    assert!(got[0].headers.get("webhook-signature").is_none());

    let got = discord.wait_for(1).await;
    assert!(
        got[0].body["content"]
            .as_str()
            .unwrap()
            .contains("sandbox.killed sb1")
    );
    assert_eq!(got[0].body.as_object().unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        discord.got().len(),
        1,
        "the test went to the slack channel only"
    );
}

#[tokio::test]
async fn bad_and_private_urls_bad_kinds_names_and_event_types_are_refused() {
    let strict = ChannelPolicy {
        allow_private: false,
        ..fast_policy()
    };
    let kit = Kit::new(strict).await;
    for (body, says) in [
        (
            json!({"name": "x", "kind": "webhook", "url": "http://127.0.0.1:9/hook"}),
            "not a public address",
        ),
        (
            json!({"name": "x", "kind": "webhook", "url": "http://localhost:9/hook"}),
            "not a public address",
        ),
        (
            json!({"name": "x", "kind": "webhook", "url": "ftp://example.com/"}),
            "http or https",
        ),
        (
            json!({"name": "x", "kind": "email", "url": "https://93.184.215.14/"}),
            "webhook, slack or discord",
        ),
        (
            json!({"name": " ", "kind": "webhook", "url": "https://93.184.215.14/"}),
            "name",
        ),
        (
            json!({"name": "x", "kind": "webhook", "url": "https://93.184.215.14/", "events": ["sandbox.exploded"]}),
            "unknown event type",
        ),
        (
            json!({"name": "x", "kind": "webhook", "url": "https://93.184.215.14/", "secret": "hunter2"}),
            "whsec_",
        ),
        (
            json!({"name": "x", "kind": "slack", "url": "https://93.184.215.14/", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}),
            "only webhook",
        ),
    ] {
        let (status, answer) = kit
            .call("POST", "/v1/channels", &kit.owner_a, body.clone())
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    // A caller's own secret is kept; a public address is taken.
    let body = json!({"name": "x", "kind": "webhook", "url": "https://93.184.215.14/",
        "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"});
    let (status, made) = kit.call("POST", "/v1/channels", &kit.owner_a, body).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["secret"], "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let path = format!("/v1/channels/{}", made["id"].as_str().unwrap());
    let (status, _) = kit
        .call(
            "PATCH",
            &path,
            &kit.owner_a,
            json!({"url": "http://10.0.0.1/"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a change is checked too");
    // Sealed at rest: the store holds neither the URL nor the secret in the clear.
    let row = kit
        .plane
        .store
        .channel(made["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(row.url_sealed.starts_with("v1:") && !row.url_sealed.contains("93.184"));
    assert!(!row.secret_sealed.contains("MfKQ9r8"));
    let database = std::fs::read(kit.dir.path().join("cp.db")).unwrap();
    let text = String::from_utf8_lossy(&database);
    assert!(!text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
}

#[tokio::test]
async fn other_teams_do_not_see_channels_and_members_cannot_change_them() {
    let kit = Kit::new(fast_policy()).await;
    let receiver = Receiver::start(0).await;
    let made = kit.channel("webhook", &receiver.url, &[]).await;
    let path = format!("/v1/channels/{}", made["id"].as_str().unwrap());
    for (method, path) in [
        ("GET", path.clone()),
        ("PATCH", path.clone()),
        ("DELETE", path.clone()),
        ("POST", format!("{path}/test")),
        ("GET", format!("{path}/deliveries")),
    ] {
        let body = if method == "PATCH" {
            json!({"name": "mine"})
        } else {
            Value::Null
        };
        let (status, answer) = kit.call(method, &path, &kit.owner_b, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
    }
    let (_, listed) = kit
        .call("GET", "/v1/channels", &kit.owner_b, Value::Null)
        .await;
    assert_eq!(listed, json!([]));

    let body = json!({"name": "x", "kind": "webhook", "url": receiver.url});
    let (status, _) = kit.call("POST", "/v1/channels", &kit.member_a, body).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for (method, path) in [
        ("PATCH", path.clone()),
        ("DELETE", path.clone()),
        ("POST", format!("{path}/test")),
    ] {
        let (status, _) = kit.call(method, &path, &kit.member_a, json!({})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    let (status, read) = kit.call("GET", &path, &kit.member_a, Value::Null).await;
    assert_eq!(
        (status, read["name"].clone()),
        (StatusCode::OK, json!("webhook channel"))
    );

    let (status, _) = kit.call("DELETE", &path, &kit.owner_a, Value::Null).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = kit.call("GET", &path, &kit.owner_a, Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_receiver_that_hangs_delays_neither_the_api_nor_other_channels() {
    // Attempts time out after 4 s (the receiver hangs for 5 s): until then the slow
    // channel's receiver has seen its one request, and nothing else may wait for it.
    let policy = ChannelPolicy {
        timeout: Duration::from_secs(4),
        ..fast_policy()
    };
    let kit = Kit::new(policy).await;
    let slow = Receiver::start(0).await;
    slow.hang_first.store(1, Ordering::SeqCst);
    let fast = Receiver::start(0).await;
    let made = kit.channel("webhook", &slow.url, &[]).await;
    kit.channel("webhook", &fast.url, &[]).await;
    let id = kit.event(EventKind::SandboxCreated, "sb1").await;
    slow.wait_for(1).await;
    // The slow channel's attempt hangs: the API answers, and the other channel gets its event.
    let test = format!("/v1/channels/{}/test", made["id"].as_str().unwrap());
    let (status, _) = kit.call("POST", &test, &kit.owner_a, Value::Null).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(fast.wait_for(1).await[0].body["id"], id.as_str());
    let second = kit.event(EventKind::SandboxKilled, "sb1").await;
    assert_eq!(fast.wait_for(2).await[1].body["id"], second.as_str());
    assert_eq!(
        slow.got().len(),
        1,
        "the API and the other channel answered only once the hung attempt had timed out"
    );
    // The hung attempt times out and is made again; the rest follow it, in order.
    let got = slow.wait_for(4).await;
    let ids: Vec<&str> = got.iter().map(|r| r.body["id"].as_str().unwrap()).collect();
    assert_eq!(ids[..2], [id.as_str(), id.as_str()]);
    assert_eq!(got[2].body["type"], "channel.test");
    assert_eq!(ids[3], second.as_str());
    let log = kit
        .settled_log(made["id"].as_str().unwrap(), |log| {
            log.len() == 3 && all_delivered(log)
        })
        .await;
    assert_eq!(log[2]["attempts"], 2, "{log:?}");
}
