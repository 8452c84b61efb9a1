//! Users, teams, roles, invitations and access tokens through the REST API, over an in-memory
//! host and a real SQLite store: signing in, making a team, inviting by one-time link, what
//! each role may do (a member cannot make keys or delete the team; an owner can; operators
//! see every team), and tokens that stop working at once when revoked or signed out.

use std::sync::Arc;

use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use wrenn_agent_api::fake::{FakeAgent, template};
use wrenn_cp::ControlPlane;
use wrenn_cp::fleet::{Fleet, FleetConfig, LeastLoaded};
use wrenn_cp::service::users::make_user;
use wrenn_cp::store::{Store, Team};

struct Kit {
    plane: Arc<ControlPlane>,
    _dir: tempfile::TempDir,
}

/// How a call authenticates.
#[derive(Clone, Copy)]
enum As<'a> {
    Nobody,
    Key(&'a str),
    /// A bearer token, acting in the named team (or the user's first).
    Bearer(&'a str, Option<&'a str>),
}

impl Kit {
    async fn new() -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cp.db")).unwrap();
        // The operators' team, as `wrenn up` makes it.
        let operators = Team {
            id: "ops".into(),
            name: "default".into(),
            created_at_ms: 0,
            admin: true,
        };
        store.create_team(operators).await.unwrap();
        let agent = Arc::new(FakeAgent::new(4, vec![template("base", 512)]));
        let fleet = Fleet::load(
            &store,
            FleetConfig::default(),
            Box::new(LeastLoaded),
            Some(agent),
        )
        .await
        .unwrap();
        let (plane, _wake) = ControlPlane::new(store, fleet, None, true);
        Kit {
            plane: Arc::new(plane),
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        who: As<'_>,
        body: Value,
    ) -> (StatusCode, Value) {
        let (status, _, body) = self.call_full(method, path, who, body).await;
        (status, body)
    }

    async fn call_full(
        &self,
        method: &str,
        path: &str,
        who: As<'_>,
        body: Value,
    ) -> (StatusCode, http::HeaderMap, Value) {
        let mut request = Request::builder().method(method).uri(path);
        match who {
            As::Nobody => {}
            As::Key(key) => request = request.header("x-api-key", key),
            As::Bearer(token, team) => {
                request = request.header("authorization", format!("Bearer {token}"));
                if let Some(team) = team {
                    request = request.header("x-team-id", team);
                }
            }
        }
        let body = if body.is_null() {
            axum::body::Body::empty()
        } else {
            request = request.header("content-type", "application/json");
            axum::body::Body::from(body.to_string())
        };
        let response = wrenn_cp::http::router(self.plane.clone())
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        // Every answer is what the OpenAPI document says it is.
        let document = serde_json::to_value(wrenn_cp::http::openapi::document()).unwrap();
        let route = path.split('?').next().unwrap_or(path);
        if let Err(problem) =
            wrenn_api::conformance::check(&document, method, route, status.as_u16(), &value)
        {
            panic!("{method} {path} -> {status}: breaks the OpenAPI document: {problem}\n{value}");
        }
        (status, headers, value)
    }

    /// Signs `email` in: the session token.
    async fn login(&self, email: &str, password: &str) -> String {
        let body = json!({"email": email, "password": password});
        let (status, session) = self.call("POST", "/v1/auth/login", As::Nobody, body).await;
        assert_eq!(status, StatusCode::OK, "{session}");
        session["token"].as_str().unwrap().to_string()
    }
}

const PASSWORD: &str = "correct horse battery";

#[tokio::test]
async fn users_make_teams_invite_by_link_and_act_by_their_role() {
    let kit = Kit::new().await;
    make_user(&kit.plane.store, "Owner@Example.com", PASSWORD, false)
        .await
        .unwrap();
    let owner = kit.login("owner@example.com", PASSWORD).await;

    // A user of no team may make one, and nothing else that acts in a team.
    let (status, body) = kit
        .call("GET", "/sandboxes", As::Bearer(&owner, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("no team yet"),
        "{body}"
    );
    let (status, team) = kit
        .call(
            "POST",
            "/v1/teams",
            As::Bearer(&owner, None),
            json!({"name": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{team}");
    assert_eq!(team["role"], "owner");
    let team_id = team["teamID"].as_str().unwrap().to_string();
    let (status, me) = kit
        .call("GET", "/v1/me", As::Bearer(&owner, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user"]["email"], "owner@example.com");
    assert_eq!(me["teams"][0]["teamID"], team_id.as_str());

    // The owner uses the team's API like a key: sandboxes, keys.
    let (status, created) = kit
        .call(
            "POST",
            "/sandboxes",
            As::Bearer(&owner, None),
            json!({"templateID": "base"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sandbox = created["sandboxID"].as_str().unwrap().to_string();
    let (status, key) = kit
        .call(
            "POST",
            "/api-keys",
            As::Bearer(&owner, None),
            json!({"name": "ci"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    assert_eq!(key["role"], "owner");

    // An invitation is a one-time link; a new user joins with a password.
    let members_path = format!("/v1/teams/{team_id}/invitations");
    let invite = json!({"email": "dev@example.com", "role": "member"});
    let (status, invitation) = kit
        .call("POST", &members_path, As::Bearer(&owner, None), invite)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{invitation}");
    let token = invitation["token"].as_str().unwrap().to_string();
    let accept = format!("/v1/invitations/{token}/accept");
    let (status, body) = kit
        .call("POST", &accept, As::Nobody, json!({"password": "short"}))
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a refused password leaves it usable: {body}"
    );
    let (status, joined) = kit
        .call("POST", &accept, As::Nobody, json!({"password": PASSWORD}))
        .await;
    assert_eq!(status, StatusCode::OK, "{joined}");
    assert_eq!(
        (joined["teamID"].as_str(), joined["role"].as_str()),
        (Some(team_id.as_str()), Some("member"))
    );
    let (status, _) = kit
        .call("POST", &accept, As::Nobody, json!({"password": PASSWORD}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an invitation works once");
    let member = kit.login("dev@example.com", PASSWORD).await;
    let member_id = joined["user"]["userID"].as_str().unwrap().to_string();

    // A member uses sandboxes, but cannot make keys, invite, change roles or delete the team.
    let (status, listed) = kit
        .call("GET", "/sandboxes", As::Bearer(&member, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed[0]["sandboxID"], sandbox.as_str());
    let refused = [
        ("POST", "/api-keys".to_string(), json!({"name": "mine"})),
        (
            "POST",
            members_path.clone(),
            json!({"email": "x@example.com"}),
        ),
        (
            "PATCH",
            format!("/v1/teams/{team_id}/members/{member_id}"),
            json!({"role": "admin"}),
        ),
        ("DELETE", format!("/v1/teams/{team_id}"), Value::Null),
    ];
    for (method, path, body) in refused {
        let (status, answer) = kit
            .call(method, &path, As::Bearer(&member, None), body)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
    }
    // The owner makes them an admin; an admin still cannot delete the team or make an owner.
    let role_path = format!("/v1/teams/{team_id}/members/{member_id}");
    let (status, _) = kit
        .call(
            "PATCH",
            &role_path,
            As::Bearer(&owner, None),
            json!({"role": "admin"}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = kit
        .call(
            "POST",
            "/api-keys",
            As::Bearer(&member, None),
            json!({"name": "mine"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let owner_id = me["user"]["userID"].as_str().unwrap().to_string();
    let (status, _) = kit
        .call(
            "PATCH",
            &format!("/v1/teams/{team_id}/members/{owner_id}"),
            As::Bearer(&member, None),
            json!({"role": "member"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The last owner cannot leave or be demoted.
    let (status, body) = kit
        .call(
            "DELETE",
            &format!("/v1/teams/{team_id}/members/{owner_id}"),
            As::Bearer(&owner, None),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Another user sees nothing of the team.
    make_user(&kit.plane.store, "other@example.com", PASSWORD, false)
        .await
        .unwrap();
    let other = kit.login("other@example.com", PASSWORD).await;
    let (status, _) = kit
        .call(
            "POST",
            "/v1/teams",
            As::Bearer(&other, None),
            json!({"name": "other"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = kit
        .call(
            "GET",
            &format!("/v1/teams/{team_id}/members"),
            As::Bearer(&other, None),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = kit
        .call(
            "GET",
            "/sandboxes",
            As::Bearer(&other, Some(&team_id)),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // An operator sees every team and its members.
    make_user(&kit.plane.store, "ops@example.com", PASSWORD, true)
        .await
        .unwrap();
    let operator = kit.login("ops@example.com", PASSWORD).await;
    let (status, teams) = kit
        .call("GET", "/teams", As::Bearer(&operator, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = teams
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"acme") && names.contains(&"default"),
        "{names:?}"
    );
    let (status, members) = kit
        .call(
            "GET",
            &format!("/v1/teams/{team_id}/members"),
            As::Bearer(&operator, None),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(members.as_array().unwrap().len(), 2, "{members}");

    // The owner deletes the team once it is empty; its keys stop at once.
    let team_path = format!("/v1/teams/{team_id}");
    let (status, body) = kit
        .call("DELETE", &team_path, As::Bearer(&owner, None), Value::Null)
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a team with a sandbox: {body}"
    );
    let (status, _) = kit
        .call(
            "DELETE",
            &format!("/sandboxes/{sandbox}"),
            As::Bearer(&owner, None),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = kit
        .call("DELETE", &team_path, As::Bearer(&owner, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let team_key = key["key"].as_str().unwrap();
    let (status, _) = kit
        .call("GET", "/sandboxes", As::Key(team_key), Value::Null)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Every change a user made is audited as theirs.
    let query = wrenn_cp::store::LogQuery {
        team_id: Some(team_id.clone()),
        limit: 100,
        ..Default::default()
    };
    let audit = kit.plane.store.audit(query).await.unwrap();
    let actor = format!("user:{owner_id}");
    assert!(
        audit
            .iter()
            .any(|row| row.actor == actor && row.action == "POST /v1/teams/{team_id}/invitations"),
        "{audit:?}"
    );
}

#[tokio::test]
async fn sign_in_failures_are_limited_and_tokens_end_when_revoked_or_signed_out() {
    let kit = Kit::new().await;
    make_user(&kit.plane.store, "a@example.com", PASSWORD, false)
        .await
        .unwrap();
    // A wrong password and an unknown email get the same answer.
    for email in ["a@example.com", "nobody@example.com"] {
        let body = json!({"email": email, "password": "wrong password!"});
        let (status, answer) = kit.call("POST", "/v1/auth/login", As::Nobody, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer["message"], "wrong email or password");
    }
    for _ in 0..4 {
        let body = json!({"email": "a@example.com", "password": "wrong password!"});
        kit.call("POST", "/v1/auth/login", As::Nobody, body).await;
    }
    let body = json!({"email": "a@example.com", "password": PASSWORD});
    let (status, headers, answer) = kit
        .call_full("POST", "/v1/auth/login", As::Nobody, body)
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    assert!(headers.contains_key("retry-after"));
    // Another email is not held back.
    make_user(&kit.plane.store, "b@example.com", PASSWORD, false)
        .await
        .unwrap();
    let session = kit.login("b@example.com", PASSWORD).await;
    assert!(session.starts_with("wrenn_s_"));

    // An access token (E2B's) works as a bearer until it is revoked.
    let (status, made) = kit
        .call(
            "POST",
            "/access-tokens",
            As::Bearer(&session, None),
            json!({"name": "laptop"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let access = made["token"].as_str().unwrap().to_string();
    assert!(access.starts_with("sk_e2b_"));
    let (status, _) = kit
        .call("GET", "/v1/me", As::Bearer(&access, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = made["id"].as_str().unwrap();
    let (status, _) = kit
        .call(
            "DELETE",
            &format!("/access-tokens/{id}"),
            As::Bearer(&session, None),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = kit
        .call("GET", "/v1/me", As::Bearer(&access, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Keys cannot make access tokens or teams.
    let (status, _) = kit
        .call(
            "POST",
            "/v1/auth/logout",
            As::Bearer(&session, None),
            Value::Null,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = kit
        .call("GET", "/v1/me", As::Bearer(&session, None), Value::Null)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A user owns at most so many teams (quotas are per team).
    make_user(&kit.plane.store, "many@example.com", PASSWORD, false)
        .await
        .unwrap();
    let many = kit.login("many@example.com", PASSWORD).await;
    let mut made = 0;
    let refused = loop {
        let body = json!({"name": format!("team-{made}")});
        let (status, answer) = kit
            .call("POST", "/v1/teams", As::Bearer(&many, None), body)
            .await;
        if status != StatusCode::CREATED {
            break (status, answer);
        }
        made += 1;
        assert!(made <= wrenn_cp::service::users::TEAMS_PER_USER, "no limit");
    };
    assert_eq!(made, wrenn_cp::service::users::TEAMS_PER_USER);
    assert_eq!(refused.0, StatusCode::FORBIDDEN, "{}", refused.1);
    assert!(
        refused.1["message"]
            .as_str()
            .unwrap()
            .contains("at most 10 teams"),
        "{}",
        refused.1
    );
    // Bad input: a bad email, a short password.
    assert!(
        make_user(&kit.plane.store, "not-an-email", PASSWORD, false)
            .await
            .is_err()
    );
    assert!(
        make_user(&kit.plane.store, "c@example.com", "short", false)
            .await
            .is_err()
    );
    assert!(
        make_user(&kit.plane.store, "B@example.com", PASSWORD, false)
            .await
            .is_err(),
        "taken"
    );
}
