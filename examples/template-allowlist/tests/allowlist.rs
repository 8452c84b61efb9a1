//! The allow-list extension on a control plane over an in-memory host and a real SQLite
//! store: its route edits a team's list (admins only), its hook refuses a create off the list
//! with a reason, and the lists outlive the process (kept in their file).

use std::sync::Arc;

use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use wrenn_agent_api::fake::{FakeAgent, template};
use wrenn_cp::ControlPlane;
use wrenn_cp::fleet::{Fleet, FleetConfig, LeastLoaded};
use wrenn_cp::server::Server;
use wrenn_cp::store::{Role, Store, Team};
use wrenn_template_allowlist::{AllowList, AllowListExtension};

struct Kit {
    api: axum::Router,
    owner: String,
    member: String,
    other_team: String,
    lists_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn team(store: &Store, id: &str) {
    let team = Team {
        id: id.into(),
        name: id.into(),
        created_at_ms: 0,
        admin: false,
    };
    store.create_team(team).await.unwrap();
}

async fn key(store: &Store, team: &str, role: Role) -> String {
    let made = wrenn_cp::service::keys::make_key(store, team, "k", role).await;
    made.unwrap().0
}

impl Kit {
    async fn new() -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cp.db")).unwrap();
        team(&store, "team-a").await;
        team(&store, "team-b").await;
        let owner = key(&store, "team-a", Role::Owner).await;
        let member = key(&store, "team-a", Role::Member).await;
        let other_team = key(&store, "team-b", Role::Owner).await;
        let templates = vec![template("base", 512), template("python", 512)];
        let agent = Arc::new(FakeAgent::new(8, templates));
        let fleet = Fleet::load(
            &store,
            FleetConfig::default(),
            Box::new(LeastLoaded),
            Some(agent),
        )
        .await
        .unwrap();
        let (plane, wake) = ControlPlane::new(store, fleet, None, true);
        let lists_file = dir.path().join("lists/allowlist.json");
        let lists = AllowList::open(lists_file.clone()).unwrap();
        let server = Server::builder(plane, wake)
            .extension(Arc::new(AllowListExtension(lists)))
            .build()
            .unwrap();
        Kit {
            api: server.api_router(),
            owner,
            member,
            other_team,
            lists_file,
            _dir: dir,
        }
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("x-api-key", key);
        let body = match body {
            Value::Null => axum::body::Body::empty(),
            Value::String(text) => axum::body::Body::from(text),
            body => {
                request = request.header("content-type", "application/json");
                axum::body::Body::from(body.to_string())
            }
        };
        let response = self
            .api
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

    async fn create(&self, key: &str, template: &str) -> (StatusCode, Value) {
        let body = json!({ "templateID": template });
        self.call("POST", "/sandboxes", key, body).await
    }
}

const LIST: &str = "/ext/allowlist/templates";

#[tokio::test]
async fn a_team_with_a_list_creates_only_from_it_and_only_its_admins_change_it() {
    let kit = Kit::new().await;
    // No list: no restriction.
    let (status, body) = kit.call("GET", LIST, &kit.member, Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"enforced": false, "templates": []}));
    assert_eq!(
        kit.create(&kit.member, "python").await.0,
        StatusCode::CREATED
    );

    // A member may not set it; an owner may.
    let list = json!({"templates": ["base"]});
    let (status, body) = kit.call("PUT", LIST, &kit.member, list.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = kit.call("PUT", LIST, &kit.owner, list).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"enforced": true, "templates": ["base"]}));

    // Off the list: refused with the reason, for every key of the team; on it: created.
    let (status, body) = kit.create(&kit.member, "python").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "template \"python\" is not on this team's template allow-list (allowed: base)"
        ),
        "{message}"
    );
    assert_eq!(
        kit.create(&kit.owner, "python").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(kit.create(&kit.member, "base").await.0, StatusCode::CREATED);
    // Another team's list is its own.
    let (_, body) = kit.call("GET", LIST, &kit.other_team, Value::Null).await;
    assert_eq!(body["enforced"], false);
    assert_eq!(
        kit.create(&kit.other_team, "python").await.0,
        StatusCode::CREATED
    );

    // An empty list allows nothing; removing the list lifts the restriction.
    let empty = json!({"templates": []});
    assert_eq!(
        kit.call("PUT", LIST, &kit.owner, empty).await.0,
        StatusCode::OK
    );
    let (status, body) = kit.create(&kit.owner, "base").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("(allowed: none)"),
        "{body}"
    );
    let (status, _) = kit.call("DELETE", LIST, &kit.member, Value::Null).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = kit.call("DELETE", LIST, &kit.owner, Value::Null).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        kit.create(&kit.owner, "python").await.0,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn bad_lists_are_refused_and_change_nothing_and_lists_are_kept_in_their_file() {
    let kit = Kit::new().await;
    let list = json!({"templates": ["base", "python"]});
    assert_eq!(
        kit.call("PUT", LIST, &kit.owner, list).await.0,
        StatusCode::OK
    );
    let bad = [
        Value::String("not json".into()),
        json!({"templates": "base"}),
        json!({"templates": ["base"], "extra": 1}),
        json!({"templates": [""]}),
        json!({"templates": ["a\nb"]}),
        json!({"templates": vec!["t"; 1001]}),
    ];
    for body in bad {
        let (status, answer) = kit.call("PUT", LIST, &kit.owner, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(!answer["message"].as_str().unwrap().is_empty());
    }
    let (_, body) = kit.call("GET", LIST, &kit.owner, Value::Null).await;
    assert_eq!(
        body,
        json!({"enforced": true, "templates": ["base", "python"]})
    );

    // A new process reads the same lists.
    let reopened = AllowList::open(kit.lists_file.clone()).unwrap();
    let kept: Vec<String> = reopened.list("team-a").unwrap().into_iter().collect();
    assert_eq!(kept, ["base", "python"]);
    assert!(reopened.list("team-b").is_none());
    // A file that is not a list is an error, not an empty list.
    std::fs::write(&kit.lists_file, "{").unwrap();
    let error = AllowList::open(kit.lists_file.clone()).unwrap_err();
    assert!(
        error.to_string().contains("is not an allow-list file"),
        "{error}"
    );
}
