//! The control plane end to end: `wrenn server` as a process of its own, with real host agents
//! (`wrenn agent serve --join`, QEMU guests) joined to it, driven through its REST API and edge
//! proxy:
//! - the E2B REST API, every route, its codes and error bodies, on SQLite and on PostgreSQL
//!   (`WRENN_TEST_DATABASE_URL`, started by scripts/postgres.sh), HTTP/1.1, WebSocket-free h2c
//!   through the proxy, and a control-plane restart that loses nothing;
//! - the fleet: placement over two hosts, drift corrected by the reconcile loop (a sandbox gone
//!   from its host, an orphan the store does not know), a host that dies marked down with its
//!   sandboxes lost, and the same host coming back with them;
//! - without VMs, against fake agents registered through the real route: a host that accepts
//!   connections and never answers delays no other host's timeouts nor the heartbeat watch,
//!   and a host's name is taken only with its identity (409 otherwise; `wrenn host forget`).
//!
//! Needs root, QEMU and the built image; see `support::prerequisites`.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::*;
use wrenn_proto::Rpc;
use wrenn_proto::agent as pb;
use wrenn_proto::agent::host_agent;
use wrenn_proto::agent::host_registry::{Heartbeat, Register};

/// A `wrenn server` process with its own data directory (and database, when given).
struct Server {
    child: Option<Child>,
    data: tempfile::TempDir,
    api: SocketAddr,
    proxy: SocketAddr,
    /// The fleet registry's listener (mutual TLS).
    fleet: SocketAddr,
    database_url: Option<String>,
    join_token: String,
    key: String,
    /// More arguments of `wrenn server`.
    extra_args: Vec<String>,
    /// The directory given as `--shared-dir`'s parent (replicas share it), if any.
    shared: Option<PathBuf>,
}

impl Server {
    fn start(database_url: Option<String>) -> Server {
        Self::start_with(database_url, &[])
    }

    fn start_with(database_url: Option<String>, extra_args: &[&str]) -> Server {
        let mut server = Server {
            child: None,
            data: tempfile::tempdir().unwrap(),
            api: SocketAddr::from(([127, 0, 0, 1], free_port())),
            proxy: SocketAddr::from(([127, 0, 0, 1], free_port())),
            fleet: SocketAddr::from(([127, 0, 0, 1], free_port())),
            database_url,
            join_token: format!("join-{}", free_port()),
            key: String::new(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            shared: None,
        };
        server.spawn();
        server.key = std::fs::read_to_string(server.data.path().join("cp/initial-api-key"))
            .expect("the server writes the first key");
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// One of several replicas on `database_url` (leases of 1.5 s), sharing `shared`'s `cp`
    /// directory and `join_token`, with the key `key` (the first replica's) or, for the first,
    /// its own.
    fn start_replica(
        database_url: &str,
        shared: &std::path::Path,
        join_token: &str,
        key: Option<&str>,
    ) -> Server {
        let mut server = Server {
            child: None,
            data: tempfile::tempdir().unwrap(),
            api: SocketAddr::from(([127, 0, 0, 1], free_port())),
            proxy: SocketAddr::from(([127, 0, 0, 1], free_port())),
            fleet: SocketAddr::from(([127, 0, 0, 1], free_port())),
            database_url: Some(database_url.to_string()),
            join_token: join_token.to_string(),
            key: String::new(),
            extra_args: vec![
                "--replica".into(),
                "--lease-life-ms".into(),
                REPLICA_LEASE_MS.to_string(),
                "--shared-dir".into(),
                shared.join("cp").display().to_string(),
            ],
            shared: Some(shared.to_path_buf()),
        };
        server.spawn();
        server.key = match key {
            Some(key) => key.to_string(),
            None => std::fs::read_to_string(server.data.path().join("cp/initial-api-key"))
                .expect("the first replica writes the first key"),
        };
        server
    }

    /// Its process id (while it runs).
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How agents join it.
    fn fleet(&self) -> FleetAccess {
        FleetAccess {
            url: format!("https://{}", self.fleet),
            cp_data: self.shared.clone().unwrap_or_else(|| self.data_dir()),
            join_token: self.join_token.clone(),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.data.path().to_path_buf()
    }

    fn spawn(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrenn"));
        command
            .args(["server", "--no-internet"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--api-listen", &self.api.to_string()])
            .args(["--proxy-listen", &self.proxy.to_string()])
            .args(["--fleet-listen", &self.fleet.to_string()])
            .args(["--heartbeat-interval-ms", "300"])
            // Hosts go down after 3 s of silence, unless the test says otherwise.
            .args(
                if self.extra_args.iter().any(|arg| arg == "--down-after-ms") {
                    &[][..]
                } else {
                    &["--down-after-ms", "3000"][..]
                },
            )
            .args(["--reconcile-interval-secs", "2"])
            .args(["--orphan-grace-secs", "3"])
            .args(&self.extra_args)
            .env("WRENN_JOIN_TOKEN", &self.join_token)
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(url) = &self.database_url {
            command.env("DATABASE_URL", url);
        }
        self.child = Some(command.spawn().expect("starting wrenn server"));
        // The wait blocks this thread: in a test's runtime, its other tasks move to other
        // workers.
        tokio::task::block_in_place(|| self.wait_until_healthy());
    }

    fn wait_until_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut stream) = std::net::TcpStream::connect(self.api) {
                use std::io::{Read, Write};
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream
                    .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                if answer.starts_with("HTTP/1.1 204") {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("wrenn server exited while starting: {status}");
            }
            assert!(Instant::now() < deadline, "wrenn server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: nothing is flushed on the way out.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A key of another team.
    fn key_of_team(&self, team: &str) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_wrenn"));
        command
            .args(["key", "create", "--local", "--team", team, "--json"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .env_remove("DATABASE_URL");
        if let Some(url) = &self.database_url {
            command.env("DATABASE_URL", url);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        let created: Value = serde_json::from_slice(&output.stdout).unwrap();
        created["key"].as_str().unwrap().to_string()
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (StatusCode, Value, http::HeaderMap) {
        let api = wrenn_api::client::Client::new(&self.url(), key)
            .unwrap()
            .with_deadline(Duration::from_secs(120));
        let response = api
            .send(
                method.clone(),
                path,
                &http::HeaderMap::new(),
                Some(bytes::Bytes::from(body.to_string())),
            )
            .await
            .unwrap();
        let value = response.json();
        // Every answer is what the OpenAPI document says it is.
        static DOCUMENT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        let document = DOCUMENT
            .get_or_init(|| serde_json::to_value(wrenn_cp::http::openapi::document()).unwrap());
        let route = path.split('?').next().unwrap_or(path);
        let status = response.status.as_u16();
        if let Err(problem) =
            wrenn_api::conformance::check(document, method.as_str(), route, status, &value)
        {
            let shown: String = value.to_string().chars().take(600).collect();
            panic!(
                "{method} {path} -> {status}: the answer breaks the OpenAPI document: {problem}\n{shown}"
            );
        }
        (response.status, value, response.headers)
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> (StatusCode, Value) {
        let (status, value, _) = self
            .call_with(method, path, Some(&self.key), &json_text(&body))
            .await;
        (status, value)
    }

    /// A call with `key` that must answer `expected`: the answer's body and headers.
    async fn expect_with(
        &self,
        expected: StatusCode,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> (Value, http::HeaderMap) {
        let (status, answer, headers) = self.call_with(method.clone(), path, key, body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        (answer, headers)
    }

    /// A call with the first key that must answer `expected`: the answer's body.
    async fn expect(&self, expected: StatusCode, method: Method, path: &str, body: Value) -> Value {
        let (answer, _) = self
            .expect_with(expected, method, path, Some(&self.key), &json_text(&body))
            .await;
        answer
    }

    /// `GET path` with the first key, which must answer `expected`: the answer's body.
    async fn get(&self, expected: StatusCode, path: &str) -> Value {
        self.expect(expected, Method::GET, path, Value::Null).await
    }

    /// `GET /v2/sandboxes<query>` with the first key, which must answer 200: the listing and
    /// its headers.
    async fn list(&self, query: &str) -> (Value, http::HeaderMap) {
        let path = format!("/v2/sandboxes{query}");
        self.expect_with(StatusCode::OK, Method::GET, &path, Some(&self.key), "")
            .await
    }

    /// Sandbox `id`'s routes, called with the first key.
    fn sandbox(&self, id: &str) -> SandboxRoutes<'_> {
        self.sandbox_as(id, &self.key)
    }

    /// Sandbox `id`'s routes, called with `key`.
    fn sandbox_as(&self, id: &str, key: &str) -> SandboxRoutes<'_> {
        SandboxRoutes {
            server: self,
            path: format!("/sandboxes/{id}"),
            key: key.to_string(),
        }
    }

    async fn create(&self, body: Value) -> Value {
        let (status, created) = self.call(Method::POST, "/sandboxes", body).await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created
    }

    /// Creates a sandbox (201): its id.
    async fn create_id(&self, body: Value) -> String {
        sandbox_id(&self.create(body).await)
    }

    /// Creates `count` sandboxes (201 each) one after another: their ids.
    async fn create_ids(&self, count: usize, body: Value) -> Vec<String> {
        let mut ids = Vec::new();
        for _ in 0..count {
            ids.push(self.create_id(body.clone()).await);
        }
        ids
    }

    async fn hosts(&self) -> Vec<Value> {
        let (status, body) = self.call(Method::GET, "/hosts", Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["hosts"].as_array().cloned().unwrap_or_default()
    }

    /// Waits up to `within_secs` until sandbox `id` reads as `state` through the API, or is gone
    /// (404) when `state` is `"gone"`; `what` names the wait when it times out.
    async fn wait_sandbox(&self, what: &str, id: &str, state: &str, within_secs: u64) {
        let within = Duration::from_secs(within_secs);
        wait_until(what, within, async || {
            let (status, body) = self
                .call(Method::GET, &format!("/sandboxes/{id}"), Value::Null)
                .await;
            match state {
                "gone" => status == StatusCode::NOT_FOUND,
                _ => body["state"] == state,
            }
        })
        .await;
    }

    /// Waits until host `name` is in `state` and (when up) reports the template `base`.
    async fn wait_host(&self, name: &str, state: &str, within: Duration) {
        wait_until(&format!("host {name} {state}"), within, async || {
            self.hosts().await.iter().any(|host| {
                host["name"] == name
                    && host["state"] == state
                    && (state != "up"
                        || host["report"]["templates"]
                            .as_array()
                            .is_some_and(|t| t.iter().any(|t| t["templateId"] == "base")))
            })
        })
        .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One sandbox's routes (`/sandboxes/{id}…`) on a server, called with one key.
struct SandboxRoutes<'a> {
    server: &'a Server,
    /// `/sandboxes/{id}`.
    path: String,
    key: String,
}

impl SandboxRoutes<'_> {
    /// `method /sandboxes/{id}<route>`, which must answer `expected`: the answer's body.
    async fn expect(
        &self,
        expected: StatusCode,
        method: Method,
        route: &str,
        body: Value,
    ) -> Value {
        let path = format!("{}{route}", self.path);
        let (answer, _) = self
            .server
            .expect_with(expected, method, &path, Some(&self.key), &json_text(&body))
            .await;
        answer
    }

    /// `POST /sandboxes/{id}<route>`, which must answer `expected`: the answer's body.
    async fn post(&self, expected: StatusCode, route: &str, body: Value) -> Value {
        self.expect(expected, Method::POST, route, body).await
    }

    /// `GET /sandboxes/{id}`, which must answer `expected`: the answer's body.
    async fn detail(&self, expected: StatusCode) -> Value {
        self.expect(expected, Method::GET, "", Value::Null).await
    }

    /// `POST /sandboxes/{id}/pause` without a body, which must answer `expected`.
    async fn pause(&self, expected: StatusCode) -> Value {
        self.post(expected, "/pause", Value::Null).await
    }

    /// `DELETE /sandboxes/{id}`, which must answer `expected`.
    async fn kill(&self, expected: StatusCode) -> Value {
        self.expect(expected, Method::DELETE, "", Value::Null).await
    }
}

/// A request body: `body` as JSON text, nothing when it is null.
fn json_text(body: &Value) -> String {
    if body.is_null() {
        String::new()
    } else {
        body.to_string()
    }
}

/// The `sandboxID` of a created sandbox.
fn sandbox_id(created: &Value) -> String {
    created["sandboxID"].as_str().unwrap().to_string()
}

/// The `sandboxID`s of a listing, in its order.
fn ids_of(listing: &Value) -> Vec<&str> {
    listing
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandboxID"].as_str().unwrap())
        .collect()
}

/// Asserts that an error answer's message contains `words`.
fn assert_message(answer: &Value, words: &str) {
    assert!(
        answer["message"].as_str().unwrap().contains(words),
        "{answer}"
    );
}

/// The headers that route a request through the edge proxy to envd in sandbox `id`.
fn envd_route(id: &str) -> [(&'static str, &str); 2] {
    [("e2b-sandbox-id", id), ("e2b-sandbox-port", "49983")]
}

/// `method path` through `server`'s edge proxy with `headers`, answered whole (two minutes at
/// the most).
async fn proxy_call(
    server: &Server,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> wrenn_api::client::Answer {
    let url = format!("http://{}{path}", server.proxy);
    http_call(method, &url, headers, body, Duration::from_secs(120))
        .await
        .unwrap()
}

/// POSTs `body` (JSON) to a route of the fleet registry at `url`, with `token` as the bearer
/// when given.
async fn registry_post(
    url: &str,
    token: Option<&str>,
    body: String,
) -> Result<wrenn_api::client::Answer, String> {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer));
    }
    http_call(Method::POST, url, &headers, body, Duration::from_secs(5)).await
}

/// For a VM test on PostgreSQL: a fresh schema's URL when the VM prerequisites and the
/// database are both there (else the test is skipped, or fails under the switch, saying why).
async fn vm_test_on_postgres() -> Option<String> {
    prerequisites()?;
    postgres_database().await
}

/// A fresh database for one test: a schema of its own in `WRENN_TEST_DATABASE_URL`.
async fn postgres_database() -> Option<String> {
    let Ok(url) = std::env::var("WRENN_TEST_DATABASE_URL") else {
        wrenn_testkit::missing_prerequisite(
            "the API tests on PostgreSQL",
            "WRENN_TEST_DATABASE_URL is not set (scripts/postgres.sh starts the server)",
        );
        return None;
    };
    let schema = format!("api_{}", free_port());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}options=-csearch_path%3D{schema}"))
}

/// An agent joined to `server` as `name`, with the template `base` built and reported.
async fn joined_agent(server: &Server, prefix: &str, first_slot: u32, name: &str) -> Agent {
    let agent = Agent::start_joined(prefix, first_slot, &server.fleet(), name);
    agent.build_template("base").await;
    server.wait_host(name, "up", Duration::from_secs(30)).await;
    agent
}

/// How a request through the edge proxy names its sandbox and port.
#[derive(Debug, Clone, Copy)]
enum Naming {
    /// The `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers.
    Headers,
    /// The host (HTTP/2's `:authority`), `<port>-<id>.<domain>`.
    Host,
}

/// A GET over HTTP/2 with prior knowledge (h2c) through the proxy to `port` of a sandbox.
async fn h2c_get(
    proxy: SocketAddr,
    sandbox_id: &str,
    port: u16,
    naming: Naming,
) -> (http::Version, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = match naming {
        Naming::Headers => http::Request::get(format!("http://{proxy}/h2"))
            .header("e2b-sandbox-id", sandbox_id)
            .header("e2b-sandbox-port", port.to_string()),
        Naming::Host => {
            http::Request::get(format!("http://{port}-{sandbox_id}.wrenn.localhost/h2"))
        }
    };
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let version = response.version();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (version, String::from_utf8_lossy(&body).into_owned())
}

/// Runs `start` in sandbox `id` through the edge proxy at `proxy` and waits (10 s at the most)
/// for what it starts to listen on `port` of the guest's loopback; when nothing does, the
/// test fails with the guest file `log`.
async fn start_guest_server(
    proxy: SocketAddr,
    id: &str,
    token: Option<&str>,
    start: &str,
    port: u16,
    log: &str,
) {
    let script = format!(
        "{start}\n\
         for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && exit 0; sleep 0.1; done; cat {log}; exit 1"
    );
    let ran = run_via_proxy(proxy, id, token, &script).await;
    assert_eq!(ran.exit_code, Some(0), "{ran:?}");
}

/// Starts an HTTP/2 (h2c) server on `port` in the sandbox: it answers with the request's
/// HTTP version.
async fn start_h2c_server(proxy: SocketAddr, sandbox_id: &str, token: Option<&str>, port: u16) {
    let start = format!(
        "nohup node -e \"require('http2').createServer((q, s) => s.end('h2c ' + q.httpVersion)).listen({port})\" >/tmp/h2c.log 2>&1 &"
    );
    start_guest_server(proxy, sandbox_id, token, &start, port, "/tmp/h2c.log").await;
}

/// Runs `wrenn <args>` against `server`, with `stdin` piped in: (exit code, stdout, stderr).
async fn wrenn_cli(server: &Server, args: &[&str], stdin: &str) -> (i32, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wrenn"))
        .args(args)
        .env("WRENN_API_URL", server.url())
        .env("WRENN_SANDBOX_URL", format!("http://{}", server.proxy))
        .env("WRENN_API_KEY", &server.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the CLI finished")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `wrenn <args>` against `server`, which must succeed: its stdout.
async fn wrenn_ok(server: &Server, args: &[&str]) -> String {
    let (code, out, err) = wrenn_cli(server, args, "").await;
    assert_eq!(code, 0, "wrenn {args:?}: {err}");
    out
}

/// Runs `wrenn <args>` against `server`, which must fail (exit code 1): its stderr.
async fn wrenn_fails(server: &Server, args: &[&str]) -> String {
    let (code, out, err) = wrenn_cli(server, args, "").await;
    assert_eq!(code, 1, "wrenn {args:?}: {out}");
    err
}

/// The arguments of `wrenn sandbox exec <id> -- <command>`.
fn exec_args<'a>(id: &'a str, command: &[&'a str]) -> Vec<&'a str> {
    [&["sandbox", "exec", id, "--"], command].concat()
}

/// The CLI: every `wrenn sandbox` command, `wrenn template list` and `wrenn host list`.
async fn cli_end_to_end(server: &Server, host_name: &str) {
    let out = wrenn_ok(
        server,
        &[
            "sandbox",
            "create",
            "base",
            "--metadata",
            "owner=cli",
            "--env",
            "GREETING=hey",
            "--secure",
            "--json",
        ],
    )
    .await;
    let created: Value = serde_json::from_str(&out).unwrap();
    let id = sandbox_id(&created);
    assert!(created["envdAccessToken"].is_string(), "{created}");

    let out = wrenn_ok(
        server,
        &["sandbox", "list", "--metadata", "owner=cli", "--json"],
    )
    .await;
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["sandboxID"], id.as_str());
    let table = wrenn_ok(server, &["sandbox", "list"]).await;
    assert!(
        table.contains(&id) && table.contains("running") && table.contains("owner=cli"),
        "{table}"
    );
    let info = wrenn_ok(server, &["sandbox", "info", &id]).await;
    assert!(
        info.contains("owner=cli") && info.contains("allowInternetAccess"),
        "{info}"
    );

    // exec: output, stderr, env, exit code (through the secure sandbox's token).
    let greet = "echo \"$GREETING from $(whoami)\"; echo oops >&2; exit 7";
    let (code, out, err) = wrenn_cli(server, &exec_args(&id, &["bash", "-c", greet]), "").await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (7, "hey from user\n", "oops\n")
    );

    // cp both ways, byte for byte; a missing file fails and leaves nothing behind.
    let work = tempfile::tempdir().unwrap();
    let local = work.path().join("up.bin");
    let content: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&local, &content).unwrap();
    let remote = format!("{id}:/home/user/up.bin");
    wrenn_ok(server, &["sandbox", "cp", local.to_str().unwrap(), &remote]).await;
    let stat = ["stat", "-c", "%U %s", "/home/user/up.bin"];
    let owner = wrenn_ok(server, &exec_args(&id, &stat)).await;
    assert_eq!(owner.trim(), "user 3000000");
    let back = work.path().join("back");
    std::fs::create_dir(&back).unwrap();
    wrenn_ok(server, &["sandbox", "cp", &remote, back.to_str().unwrap()]).await;
    assert!(
        std::fs::read(back.join("up.bin")).unwrap() == content,
        "the download differs"
    );
    let missing = work.path().join("missing");
    let nope = format!("{id}:/nope");
    let err = wrenn_fails(server, &["sandbox", "cp", &nope, missing.to_str().unwrap()]).await;
    assert!(err.contains("404"), "{err}");
    assert_eq!(
        std::fs::read_dir(work.path()).unwrap().count(),
        2,
        "no partial file is left"
    );

    // shell on a PTY, fed from a pipe.
    let (code, out, err) = wrenn_cli(
        server,
        &["sandbox", "shell", &id],
        "echo shell-$((6*7))\nexit 5\n",
    )
    .await;
    assert_eq!(code, 5, "{out} {err}");
    assert!(out.contains("shell-42"), "{out}");

    // timeout, pause, resume, kill.
    wrenn_ok(server, &["sandbox", "timeout", &id, "600"]).await;
    let out = wrenn_ok(server, &["sandbox", "pause", &id, "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["state"],
        "paused"
    );
    let out = wrenn_ok(server, &["sandbox", "list", "--state", "paused", "--json"]).await;
    assert!(out.contains(&id), "{out}");
    wrenn_ok(server, &["sandbox", "resume", &id]).await;
    let out = wrenn_ok(server, &exec_args(&id, &["wc", "-c", "/home/user/up.bin"])).await;
    assert_eq!(
        out.trim(),
        "3000000 /home/user/up.bin",
        "the file outlived the pause"
    );
    wrenn_ok(server, &["sandbox", "kill", &id]).await;
    let err = wrenn_fails(server, &["sandbox", "info", &id]).await;
    assert!(err.contains("404 Not Found"), "{err}");

    // Templates, hosts, and a bad key.
    let out = wrenn_ok(server, &["template", "list"]).await;
    assert!(out.contains("base") && out.contains("512 MiB"), "{out}");
    let out = wrenn_ok(server, &["host", "list", "--json"]).await;
    let fleet: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(fleet["hosts"][0]["name"], host_name);
    assert_eq!(fleet["hosts"][0]["state"], "up");
    let out = wrenn_ok(server, &["host", "list"]).await;
    assert!(
        out.contains(host_name) && out.contains("least-loaded"),
        "{out}"
    );
    let err = wrenn_fails(server, &["sandbox", "list", "--api-key", "e2b_bad"]).await;
    assert!(err.contains("Invalid API key"), "{err}");

    // What the CLI did is in the audit log, from this machine's address, and its events.
    let out = wrenn_ok(server, &["audit", "--json", "--type", "delete"]).await;
    let log: Value = serde_json::from_str(&out).unwrap();
    let kill = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["resource"] == format!("/sandboxes/{id}"))
        .unwrap_or_else(|| panic!("the kill is audited: {log}"));
    assert_eq!(kill["action"], "DELETE /sandboxes/{id}");
    assert_eq!(kill["outcome"], 204);
    assert_eq!(kill["client"], "127.0.0.1");
    let out = wrenn_ok(server, &["events", "--subject", &id]).await;
    for kind in [
        "sandbox.created",
        "sandbox.paused",
        "sandbox.resumed",
        "sandbox.killed",
    ] {
        assert!(out.contains(kind), "{kind}: {out}");
    }
}

/// An upgrade echo server in the guest on port 8766: it answers 101 and then echoes bytes.
const UPGRADE_ECHO: &str = r#"
import socket, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 8766))
server.listen()
def serve(conn):
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            return
        head += data
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    while True:
        data = conn.recv(4096)
        if not data:
            break
        conn.sendall(data)
    conn.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// Upgrades a connection through the proxy to the guest's echo server and echoes bytes.
async fn upgrade_echo(proxy: SocketAddr, sandbox_id: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = format!(
        "cat > /tmp/echo.py <<'EOF'\n{UPGRADE_ECHO}\nEOF\n(nohup python3 /tmp/echo.py >/tmp/echo.log 2>&1 &)"
    );
    start_guest_server(proxy, sandbox_id, None, &start, 8766, "/tmp/echo.log").await;
    // envd's port scanner forwards a new loopback listener within about a second.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut connection, rest) = loop {
        let mut connection = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let request = format!(
            "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nE2b-Sandbox-Id: {sandbox_id}\r\nE2b-Sandbox-Port: 8766\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        );
        connection.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buffer = [0u8; 1024];
            let read = connection.read(&mut buffer).await.unwrap();
            assert!(read > 0, "the proxy closed the connection");
            head.extend_from_slice(&buffer[..read]);
        }
        let text = String::from_utf8_lossy(&head).to_string();
        if text.starts_with("HTTP/1.1 502") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        let split = text.find("\r\n\r\n").unwrap() + 4;
        break (connection, head[split..].to_vec());
    };
    assert!(rest.is_empty());
    for message in [&b"ping through two proxies"[..], &[0u8, 255, 10, 13][..]] {
        connection.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        connection.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    }
}

async fn rest_api_end_to_end(database_url: Option<String>, prefix: &str, first_slot: u32) {
    let mut server = Server::start(database_url);
    let host_name = format!("{prefix}-host");
    let agent = joined_agent(&server, prefix, first_slot, &host_name).await;
    cli_end_to_end(&server, &host_name).await;

    templates_are_listed_with_their_sizes(&server).await;
    keys_and_bad_requests_are_refused(&server).await;
    let sandboxes = two_sandboxes_are_created(&server).await;
    commands_and_files_reach_a_sandbox(&server, &sandboxes).await;
    listings_filter_page_and_order(&server, &sandboxes).await;
    routes_and_methods_are_checked(&server, &sandboxes).await;
    let other_team = details_are_per_team(&server, &sandboxes).await;
    timeouts_and_refreshes_move_the_end(&server, &sandboxes).await;
    metrics_come_from_envd(&server, &sandboxes).await;
    upgraded_and_private_traffic(&server, &sandboxes).await;
    pause_and_connect_resume(&server, &sandboxes).await;
    a_restart_loses_nothing(&mut server, &sandboxes, &other_team).await;
    timeout_expiry_kills(&server).await;
    kill_then_404(&server, &sandboxes).await;
    // Nothing is left once the agent stops: no VM, namespace, interface or sandbox file.
    let mut agent = agent;
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// The two sandboxes the REST test's phases share: alice's is secure.
struct TwoSandboxes {
    alice_id: String,
    alice_token: String,
    bob_id: String,
}

/// Templates.
async fn templates_are_listed_with_their_sizes(server: &Server) {
    let templates = server.get(StatusCode::OK, "/templates").await;
    let base = templates
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == "base")
        .expect("base is listed")
        .clone();
    assert_eq!(
        (base["cpuCount"].clone(), base["memoryMB"].clone()),
        (json!(1), json!(512))
    );
    assert!(base["diskSizeMB"].as_u64().unwrap() > 0, "{base}");
    server.get(StatusCode::OK, "/templates/aliases/base").await;
    let missing = server
        .get(StatusCode::NOT_FOUND, "/templates/aliases/nope")
        .await;
    assert_eq!(missing["code"], json!(404));
}

/// Keys and bad requests.
async fn keys_and_bad_requests_are_refused(server: &Server) {
    let unauthorized = StatusCode::UNAUTHORIZED;
    server
        .expect_with(unauthorized, Method::GET, "/v2/sandboxes", None, "")
        .await;
    let bad_key = format!("e2b_{}", "0".repeat(40));
    let (body, _) = server
        .expect_with(
            unauthorized,
            Method::GET,
            "/v2/sandboxes",
            Some(&bad_key),
            "",
        )
        .await;
    assert_eq!(body["message"], "Invalid API key");
    let (body, _) = server
        .expect_with(
            StatusCode::BAD_REQUEST,
            Method::POST,
            "/sandboxes",
            Some(&server.key),
            "{",
        )
        .await;
    assert_message(&body, "invalid request body");
    for (request, code, words) in [
        (json!({}), StatusCode::BAD_REQUEST, "templateID is required"),
        (
            json!({"templateID": "nope"}),
            StatusCode::NOT_FOUND,
            "template 'nope' not found",
        ),
        (
            json!({"templateID": "base", "timeout": 100000}),
            StatusCode::BAD_REQUEST,
            "24 hours",
        ),
    ] {
        let body = server
            .expect(code, Method::POST, "/sandboxes", request)
            .await;
        assert_message(&body, words);
    }
    for query in ["limit=0", "state=weird"] {
        let path = format!("/v2/sandboxes?{query}");
        server.get(StatusCode::BAD_REQUEST, &path).await;
    }
}

/// Create: secure with metadata and env vars, and a plain one.
async fn two_sandboxes_are_created(server: &Server) -> TwoSandboxes {
    let alice = server
        .create(json!({"templateID": "base", "timeout": 120, "secure": true,
            "metadata": {"user": "alice", "n": "1"}, "envVars": {"GREETING": "hello there"}}))
        .await;
    assert_eq!(alice["clientID"], "6532622b");
    assert_eq!(alice["templateID"], "base");
    assert!(alice["envdVersion"].as_str().is_some_and(|v| !v.is_empty()));
    let alice_id = sandbox_id(&alice);
    let alice_token = alice["envdAccessToken"]
        .as_str()
        .expect("secure gives a token")
        .to_string();
    let bob = server
        .create(
            json!({"templateID": "base", "timeout": 120, "secure": false,
                       "metadata": {"user": "bob"}}),
        )
        .await;
    assert!(bob.get("envdAccessToken").is_none(), "{bob}");
    let bob_id = sandbox_id(&bob);

    TwoSandboxes {
        alice_id,
        alice_token,
        bob_id,
    }
}

/// Commands and files through the proxy (then through the agent's proxy to the guest).
async fn commands_and_files_reach_a_sandbox(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes {
        alice_id,
        alice_token,
        ..
    } = sandboxes;
    let ran = run_via_proxy(
        server.proxy,
        alice_id,
        Some(alice_token),
        "echo \"$GREETING\" > /home/user/before-pause.txt; cat /home/user/before-pause.txt",
    )
    .await;
    assert_eq!(
        (ran.stdout.trim(), ran.exit_code),
        ("hello there", Some(0)),
        "{ran:?}"
    );
    let to_envd = envd_route(alice_id);
    let files = "/files?path=/etc/hostname&username=user";
    let unauthorised = proxy_call(server, Method::GET, files, &to_envd, "").await;
    assert_eq!(
        unauthorised.status,
        StatusCode::UNAUTHORIZED,
        "envd needs the access token"
    );
    let init = proxy_call(server, Method::POST, "/init", &to_envd, "{}").await;
    assert_eq!(
        init.status,
        StatusCode::FORBIDDEN,
        "envd's /init is internal"
    );
}

/// Listing: filters, pagination, the running count.
async fn listings_filter_page_and_order(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes {
        alice_id, bob_id, ..
    } = sandboxes;
    let (listed, headers) = server.list("?metadata=user%3Dalice").await;
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["sandboxID"], alice_id.as_str());
    assert_eq!(listed[0]["metadata"]["n"], "1");
    assert_eq!(headers["x-total-running"], "1");
    let (first, headers) = server.list("?limit=1").await;
    let token = headers["x-next-token"].to_str().unwrap().to_string();
    let (second, headers) = server.list(&format!("?limit=1&nextToken={token}")).await;
    assert!(
        headers.get("x-next-token").is_none(),
        "two sandboxes, two pages"
    );
    // Newest first by default (bob was created after alice), oldest first when asked.
    let ids = [ids_of(&first), ids_of(&second)].concat();
    assert_eq!(ids, vec![bob_id.as_str(), alice_id.as_str()]);
    let (ascending, _) = server.list("?order=asc").await;
    assert_eq!(ids_of(&ascending), vec![alice_id.as_str(), bob_id.as_str()]);
    server
        .get(StatusCode::BAD_REQUEST, "/v2/sandboxes?order=sideways")
        .await;
    // startedAfter is inclusive: bob's own start time lists bob.
    let bob_started = first[0]["startedAt"].as_str().unwrap().to_string();
    let after = bob_started.replace('+', "%2B");
    let (since, _) = server.list(&format!("?startedAfter={after}")).await;
    let since = ids_of(&since);
    assert!(
        since.contains(&bob_id.as_str()),
        "{since:?} from {bob_started}"
    );
}

/// Routes: the many-sandbox metrics route is not a sandbox id; a wrong method is a 405;
async fn routes_and_methods_are_checked(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes {
        alice_id, bob_id, ..
    } = sandboxes;
    // an unknown route says so.
    let metrics = server
        .get(
            StatusCode::OK,
            &format!("/sandboxes/metrics?sandbox_ids={alice_id},{bob_id},nosuchsandbox"),
        )
        .await;
    let sampled = metrics["sandboxes"].as_object().unwrap();
    assert!(
        sampled[alice_id.as_str()]["memTotal"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(sampled.contains_key(bob_id.as_str()) && !sampled.contains_key("nosuchsandbox"));
    server
        .get(StatusCode::BAD_REQUEST, "/sandboxes/metrics")
        .await;
    let body = server
        .sandbox(alice_id)
        .expect(
            StatusCode::METHOD_NOT_ALLOWED,
            Method::PUT,
            "/pause",
            Value::Null,
        )
        .await;
    assert_message(&body, "not allowed");
    let body = server.get(StatusCode::NOT_FOUND, "/v3/no/such/thing").await;
    assert_message(&body, "no such route");
    let (_, v1) = server.call(Method::GET, "/sandboxes", Value::Null).await;
    assert_eq!(v1.as_array().unwrap().len(), 2);
}

/// Details, and another team sees nothing.
/// (The other team's key is returned: the restart checks it still works.)
async fn details_are_per_team(server: &Server, sandboxes: &TwoSandboxes) -> String {
    let TwoSandboxes {
        alice_id,
        alice_token,
        ..
    } = sandboxes;
    let detail = server.sandbox(alice_id).detail(StatusCode::OK).await;
    assert_eq!(
        (detail["state"].clone(), detail["cpuCount"].clone()),
        (json!("running"), json!(1))
    );
    assert_eq!(detail["envdAccessToken"], alice_token.as_str());
    let other = server.key_of_team("other");
    let theirs = server.sandbox_as(alice_id, &other);
    theirs.detail(StatusCode::NOT_FOUND).await;
    theirs.kill(StatusCode::NOT_FOUND).await;
    theirs.pause(StatusCode::NOT_FOUND).await;
    let (listed, _) = server
        .expect_with(
            StatusCode::OK,
            Method::GET,
            "/v2/sandboxes",
            Some(&other),
            "",
        )
        .await;
    assert_eq!(listed, json!([]));
    let (status, body, _) = server
        .call_with(Method::GET, "/hosts", Some(&other), "")
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "only the admin team reads the fleet: {body}"
    );

    other
}

/// Timeout and refreshes move the end time.
async fn timeouts_and_refreshes_move_the_end(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes {
        alice_id, bob_id, ..
    } = sandboxes;
    let alice = server.sandbox(alice_id);
    alice
        .post(StatusCode::NO_CONTENT, "/timeout", json!({"timeout": 600}))
        .await;
    let detail = alice.detail(StatusCode::OK).await;
    let end = chrono::DateTime::parse_from_rfc3339(detail["endAt"].as_str().unwrap()).unwrap();
    assert!(
        end.timestamp() - chrono::Utc::now().timestamp() > 500,
        "{detail}"
    );
    for (duration, expected) in [
        (60, StatusCode::NO_CONTENT),
        (4000, StatusCode::BAD_REQUEST),
    ] {
        let refresh = json!({ "duration": duration });
        server
            .sandbox(bob_id)
            .post(expected, "/refreshes", refresh)
            .await;
    }
}

/// Metrics from envd.
async fn metrics_come_from_envd(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes {
        alice_id, bob_id, ..
    } = sandboxes;
    let metrics = server
        .sandbox(alice_id)
        .expect(StatusCode::OK, Method::GET, "/metrics", Value::Null)
        .await;
    assert!(metrics[0]["memTotal"].as_u64().unwrap() > 0, "{metrics}");

    // h2c through the proxy (and the agent's proxy) to a server in the guest.
    start_h2c_server(server.proxy, bob_id, None, 8081).await;
    for naming in [Naming::Headers, Naming::Host] {
        let (version, body) = h2c_get(server.proxy, bob_id, 8081, naming).await;
        let answer = (version, body.as_str());
        assert_eq!(answer, (http::Version::HTTP_2, "h2c 2.0"), "{naming:?}");
    }
}

/// An upgraded connection (WebSocket's handshake, then raw bytes) through both proxies.
async fn upgraded_and_private_traffic(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes { bob_id, .. } = sandboxes;
    upgrade_echo(server.proxy, bob_id).await;

    // No public traffic: needs secure (an explicit `secure: false` is refused; an absent one
    // is secure), gets a traffic token the proxy asks for on other ports than envd's; with
    // autoResume, traffic to it paused resumes it.
    server
        .expect(
            StatusCode::BAD_REQUEST,
            Method::POST,
            "/sandboxes",
            json!({"templateID": "base", "secure": false, "network": {"allowPublicTraffic": false}}),
        )
        .await;
    let carol = server
        .create(json!({"templateID": "base", "timeout": 120, "secure": true,
            "network": {"allowPublicTraffic": false}, "autoResume": {"enabled": true}}))
        .await;
    let carol_id = sandbox_id(&carol);
    let carol_envd = carol["envdAccessToken"].as_str().unwrap().to_string();
    let traffic = carol["trafficAccessToken"]
        .as_str()
        .expect("a traffic token")
        .to_string();
    start_guest_server(
        server.proxy,
        &carol_id,
        Some(&carol_envd),
        "cd /tmp && echo served > index.html && (nohup python3 -m http.server 8000 >/tmp/page.log 2>&1 &)",
        8000,
        "/tmp/page.log",
    )
    .await;
    let get_page = async |token: Option<&str>| {
        let mut headers = vec![
            ("e2b-sandbox-id", carol_id.as_str()),
            ("e2b-sandbox-port", "8000"),
        ];
        if let Some(token) = token {
            headers.push(("e2b-traffic-access-token", token));
        }
        proxy_call(server, Method::GET, "/index.html", &headers, "").await
    };
    assert_eq!(get_page(None).await.status, StatusCode::FORBIDDEN);
    assert_eq!(get_page(Some("wrong")).await.status, StatusCode::FORBIDDEN);
    let page = get_page(Some(&traffic)).await;
    assert_eq!(
        (page.status, page.text().trim()),
        (StatusCode::OK, "served")
    );
    let carol = server.sandbox(&carol_id);
    carol.pause(StatusCode::NO_CONTENT).await;
    let page = get_page(Some(&traffic)).await;
    assert_eq!(
        (page.status, page.text().trim()),
        (StatusCode::OK, "served"),
        "resumed by traffic"
    );
    let detail = carol.detail(StatusCode::OK).await;
    assert_eq!(detail["state"], "running");
    assert_eq!(detail["lifecycle"]["autoResume"], true);
    carol.kill(StatusCode::NO_CONTENT).await;
}

/// Pause (twice: 409), the proxy refuses a paused sandbox, connect resumes (201), then 200.
async fn pause_and_connect_resume(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes {
        alice_id,
        alice_token,
        ..
    } = sandboxes;
    let alice = server.sandbox(alice_id);
    alice.pause(StatusCode::NO_CONTENT).await;
    alice.pause(StatusCode::CONFLICT).await;
    let (paused, _) = server.list("?state=paused").await;
    assert_eq!(paused[0]["sandboxID"], alice_id.as_str());
    let paused_proxy = proxy_call(server, Method::GET, "/health", &envd_route(alice_id), "").await;
    assert_eq!(
        paused_proxy.status,
        StatusCode::BAD_GATEWAY,
        "a paused sandbox is not served"
    );
    let two_minutes = json!({"timeout": 120});
    let resumed = alice
        .post(StatusCode::CREATED, "/connect", two_minutes.clone())
        .await;
    assert_eq!(resumed["envdAccessToken"], alice_token.as_str());
    alice
        .post(StatusCode::OK, "/connect", two_minutes.clone())
        .await;
    let file = "cat /home/user/before-pause.txt";
    run_via_proxy_expecting(
        server.proxy,
        alice_id,
        Some(alice_token),
        file,
        "hello there",
    )
    .await;
    // resume: 409 while running, 201 after a pause.
    alice.post(StatusCode::CONFLICT, "/resume", json!({})).await;
    alice.pause(StatusCode::NO_CONTENT).await;
    alice
        .post(StatusCode::CREATED, "/resume", two_minutes)
        .await;
}

/// A control-plane restart (SIGKILL) loses nothing: the sandboxes, the host, the keys.
async fn a_restart_loses_nothing(server: &mut Server, sandboxes: &TwoSandboxes, other: &str) {
    let TwoSandboxes {
        alice_id,
        alice_token,
        ..
    } = sandboxes;
    server.kill();
    server.spawn();
    let (listed, _) = server.list("").await;
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let ran = run_via_proxy(
        server.proxy,
        alice_id,
        Some(alice_token),
        "cat /home/user/before-pause.txt",
    )
    .await;
    assert_eq!(ran.stdout.trim(), "hello there", "after a restart: {ran:?}");
    let (status, _, _) = server
        .call_with(Method::GET, "/v2/sandboxes", Some(other), "")
        .await;
    assert_eq!(status, StatusCode::OK, "the other team's key survived too");
}

/// Timeout expiry kills.
async fn timeout_expiry_kills(server: &Server) {
    let short_id = server
        .create_id(json!({"templateID": "base", "timeout": 2}))
        .await;
    let what = "the short sandbox's timeout";
    server.wait_sandbox(what, &short_id, "gone", 20).await;
}

/// Kill: 204, then 404.
async fn kill_then_404(server: &Server, sandboxes: &TwoSandboxes) {
    let TwoSandboxes {
        alice_id, bob_id, ..
    } = sandboxes;
    for id in [&alice_id, &bob_id] {
        let sandbox = server.sandbox(id);
        sandbox.kill(StatusCode::NO_CONTENT).await;
        sandbox.kill(StatusCode::NOT_FOUND).await;
    }
    let body = server.sandbox(alice_id).detail(StatusCode::NOT_FOUND).await;
    assert_eq!(body["code"], json!(404));
}

/// Fifty creates at once through the REST API (fifty SDK `Sandbox.create` calls at once) all
/// succeed and each sandbox answers with its own identity; once they are killed the host keeps
/// no VM, no sandbox file and no leased slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_creates_at_once_through_the_rest_api_succeed_and_leave_nothing() {
    if prerequisites().is_none() {
        return;
    }
    const COUNT: usize = 50;
    // Fifty guests starting under TCG on two cores starve the host's heartbeats for seconds
    // (seen in CI): the host is given the production default and more before it is down.
    let server = Server::start_with(None, &["--quota-running", "0", "--down-after-ms", "30000"]);
    let mut agent = Agent::start_joined_with(
        "wff",
        1700,
        &server.fleet(),
        "fifty",
        ["--slots", "64", "--slots-ahead", "4"]
            .map(String::from)
            .to_vec(),
    );
    agent.build_template("base").await;
    server
        .wait_host("fifty", "up", Duration::from_secs(30))
        .await;

    let creates = (0..COUNT).map(|n| {
        server.call(
            Method::POST,
            "/sandboxes",
            json!({"templateID": "base", "timeout": 600, "secure": false,
                "metadata": {"n": n.to_string()}}),
        )
    });
    let mut ids = Vec::new();
    let mut failed = Vec::new();
    for (status, body) in futures_util::future::join_all(creates).await {
        if status == StatusCode::CREATED {
            ids.push(sandbox_id(&body));
        } else {
            failed.push(format!("{status}: {body}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {COUNT} creates failed: {failed:?}",
        failed.len()
    );
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), COUNT);
    for batch in ids.chunks(10) {
        let runs = batch
            .iter()
            .map(|id| run_via_proxy_expecting(server.proxy, id, None, "echo $E2B_SANDBOX_ID", id));
        futures_util::future::join_all(runs).await;
    }
    assert_eq!(agent.host_info().await.sandboxes_running, COUNT as u32);

    let server = &server;
    let kills = ids
        .iter()
        .map(|id| async move { server.sandbox(id).kill(StatusCode::NO_CONTENT).await });
    futures_util::future::join_all(kills).await;
    let info = agent.host_info().await;
    assert_eq!((info.sandboxes_running, info.slots_in_use), (0, 0));
    assert_eq!(
        vmm_pids_matching(&agent.data_dir().display().to_string()),
        Vec::<i32>::new()
    );
    let files = std::fs::read_dir(agent.data_dir().join("sandboxes"))
        .map(|dir| dir.count())
        .unwrap_or(0);
    assert_eq!(files, 0, "sandbox directories are left");
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_on_sqlite() {
    if prerequisites().is_none() {
        return;
    }
    rest_api_end_to_end(None, "wapis", 1400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_on_postgres() {
    let Some(url) = vm_test_on_postgres().await else {
        return;
    };
    rest_api_end_to_end(Some(url), "wapip", 1420).await;
}

async fn agent_sandboxes(agent: &Agent) -> Vec<String> {
    let listed: pb::ListSandboxesResponse = agent
        .call::<host_agent::ListSandboxes>(&pb::ListSandboxesRequest {})
        .await
        .unwrap();
    let mut ids: Vec<String> = listed.sandboxes.into_iter().map(|s| s.sandbox_id).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_places_reconciles_and_survives_a_dead_host_on_sqlite() {
    if prerequisites().is_none() {
        return;
    }
    fleet_end_to_end(None, [("wfla", 1440), ("wflb", 1460)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_places_reconciles_and_survives_a_dead_host_on_postgres() {
    let Some(url) = vm_test_on_postgres().await else {
        return;
    };
    fleet_end_to_end(Some(url), [("wfpa", 1480), ("wfpb", 1540)]).await;
}

/// Two real hosts join a control plane on the store `database_url` names (SQLite when
/// `None`), each with its slot prefix and first slot: placement, reconcile, a host that dies
/// and comes back.
async fn fleet_end_to_end(database_url: Option<String>, slots: [(&str, u32); 2]) {
    let [(prefix_a, first_a), (prefix_b, first_b)] = slots;
    let server = Server::start(database_url);
    let host_a = joined_agent(&server, prefix_a, first_a, "fleet-a").await;
    let mut host_b = joined_agent(&server, prefix_b, first_b, "fleet-b").await;

    // The API's plain port takes no registrations: agents join over the fleet's mutual TLS
    // (the registry's own refusals are the fast tests'). (The registry speaks Connect, not
    // the REST API: its answers are not in the OpenAPI document, so these calls go around
    // the checking `Server::call`.)
    let registration = json!({"name": "x", "apiUrl": "https://127.0.0.1:1",
        "proxyAddress": "127.0.0.1:1", "agentToken": "t", "report": {}});
    for path in [Register::PATH, Heartbeat::PATH] {
        let answer = registry_post(
            &format!("{}{path}", server.url()),
            Some(server.join_token.as_str()),
            registration.to_string(),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text());
        assert!(answer.text().contains("mutual TLS"), "{}", answer.text());
    }
    // A plain-HTTP client of the fleet's port gets no answer at all.
    let plain = registry_post(
        &format!("http://{}{}", server.fleet, Register::PATH),
        Some(server.join_token.as_str()),
        registration.to_string(),
    )
    .await;
    assert!(plain.is_err(), "{:?}", plain.map(|answer| answer.status));

    // Least-loaded placement: two sandboxes, one on each host.
    // Unsecured (explicit `secure: false`): the scripts below reach envd without a token.
    let five_minutes = json!({"templateID": "base", "timeout": 300, "secure": false});
    let first_id = server.create_id(five_minutes.clone()).await;
    let second_id = server.create_id(five_minutes.clone()).await;
    let (on_a, on_b) = (
        agent_sandboxes(&host_a).await,
        agent_sandboxes(&host_b).await,
    );
    assert_eq!(on_a.len(), 1, "a: {on_a:?}, b: {on_b:?}");
    assert_eq!(on_b.len(), 1, "a: {on_a:?}, b: {on_b:?}");
    let (id_a, id_b) = (on_a[0].clone(), on_b[0].clone());
    let mut placed = vec![id_a.clone(), id_b.clone()];
    placed.sort();
    let mut created = vec![first_id, second_id];
    created.sort();
    assert_eq!(placed, created);
    // Both answer through the one edge proxy.
    for id in [&id_a, &id_b] {
        run_via_proxy_expecting(server.proxy, id, None, "echo $E2B_SANDBOX_ID", id).await;
    }

    // Drift: a sandbox destroyed behind the control plane's back is removed from the store.
    host_a.destroy(&id_a).await.unwrap();
    let what = "the reconcile to drop the destroyed sandbox";
    server.wait_sandbox(what, &id_a, "gone", 15).await;
    // An orphan (created on the host, unknown to the store) is destroyed after the grace.
    host_a.create("base", "orphan1", None).await;
    wait_until(
        "the reconcile to destroy the orphan",
        Duration::from_secs(30),
        async || agent_sandboxes(&host_a).await.is_empty(),
    )
    .await;

    // Host b dies (SIGKILL, its VM keeps running): down, its sandbox lost, creates go to a.
    host_b.kill();
    server
        .wait_host("fleet-b", "down", Duration::from_secs(15))
        .await;
    let body = server.sandbox(&id_b).detail(StatusCode::NOT_FOUND).await;
    assert_message(&body, "lost");
    let (listed, _) = server.list("").await;
    assert_eq!(listed, json!([]), "a lost sandbox is not listed");
    let third_id = server.create_id(five_minutes).await;
    assert_eq!(agent_sandboxes(&host_a).await, vec![third_id.clone()]);

    // Host b comes back with its VM: up again, the lost sandbox running and answering.
    host_b.spawn();
    server
        .wait_host("fleet-b", "up", Duration::from_secs(30))
        .await;
    let what = "the lost sandbox to come back";
    server.wait_sandbox(what, &id_b, "running", 15).await;
    run_via_proxy_expecting(server.proxy, &id_b, None, "echo back", "back").await;

    for id in [&id_b, &third_id] {
        server.sandbox(id).kill(StatusCode::NO_CONTENT).await;
    }
    let mut host_a = host_a;
    for agent in [&mut host_a, &mut host_b] {
        agent.stop();
        assert_eq!(agent.leftovers(), Vec::<String>::new());
    }
}

/// A snapshot taken on one host starts on another: its host goes down, and a second host,
/// which shares its template store, pulls the snapshot and starts it with the files and the
/// running processes of its moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_on_one_host_starts_on_another() {
    if prerequisites().is_none() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let with_store = vec![
        "--template-store".to_string(),
        store.path().display().to_string(),
    ];
    let server = Server::start(None);
    let join = |prefix: &str, slot: u32, name: &str| {
        Agent::start_joined_with(prefix, slot, &server.fleet(), name, with_store.clone())
    };
    let mut host_a = join("wxa", 1600, "snap-a");
    host_a.build_template("base").await;
    server
        .wait_host("snap-a", "up", Duration::from_secs(30))
        .await;
    let created = server
        .create(json!({"templateID": "base", "timeout": 300}))
        .await;
    let source = sandbox_id(&created);
    let token = created["envdAccessToken"].as_str().unwrap().to_string();
    let ran = run_via_proxy(
        server.proxy,
        &source,
        Some(&token),
        "echo snapshotted > /home/user/moment.txt; nohup sleep 3600 >/dev/null 2>&1 & echo $!",
    )
    .await;
    let pid = ran.stdout.trim().to_string();
    let taken = server
        .expect(
            StatusCode::CREATED,
            Method::POST,
            &format!("/sandboxes/{source}/snapshots"),
            json!({"name": "moved"}),
        )
        .await;
    assert_eq!(taken["snapshotID"], json!("moved:default"));

    let mut host_b = join("wxb", 1620, "snap-b");
    host_b.build_template("base").await;
    server
        .wait_host("snap-b", "up", Duration::from_secs(30))
        .await;
    host_a.kill();
    server
        .wait_host("snap-a", "down", Duration::from_secs(15))
        .await;
    let created = server
        .create(json!({"templateID": "moved:default", "timeout": 120}))
        .await;
    let moved = sandbox_id(&created);
    let moved_token = created["envdAccessToken"].as_str().unwrap().to_string();
    assert_eq!(agent_sandboxes(&host_b).await, vec![moved.clone()]);
    let ran = run_via_proxy(
        server.proxy,
        &moved,
        Some(&moved_token),
        &format!("cat /home/user/moment.txt; kill -0 {pid} && echo running"),
    )
    .await;
    assert_eq!(ran.stdout, "snapshotted\nrunning\n", "{ran:?}");
    server.sandbox(&moved).kill(StatusCode::NO_CONTENT).await;

    // Its builder back, the source runs on; once it is gone the snapshot is deleted
    // everywhere.
    host_a.spawn();
    server
        .wait_host("snap-a", "up", Duration::from_secs(30))
        .await;
    server
        .wait_sandbox("the source to come back", &source, "running", 15)
        .await;
    server.sandbox(&source).kill(StatusCode::NO_CONTENT).await;
    server
        .expect(
            StatusCode::NO_CONTENT,
            Method::DELETE,
            "/templates/moved",
            Value::Null,
        )
        .await;
    for agent in [&mut host_a, &mut host_b] {
        agent.stop();
        assert_eq!(agent.leftovers(), Vec::<String>::new());
    }
    let stored: Vec<_> = std::fs::read_dir(store.path().join("templates"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name())
        .collect();
    assert_eq!(stored, Vec::<std::ffi::OsString>::new());
}

/// A host agent that is not one, for the fleet's failure cases without VMs: it registers
/// through the real route with the join token (keeping the identity it is given, like an
/// agent), heartbeats a report with the template `base`, and serves the Connect calls the
/// control plane makes (binary protobuf) from a table of sandboxes. A `stuck` one accepts
/// connections and answers nothing but creates.
struct FakeAgent {
    address: SocketAddr,
    name: String,
    sandboxes: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// Those of them paused.
    paused: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    /// When each sandbox was destroyed.
    destroyed: std::sync::Arc<std::sync::Mutex<Vec<(String, Instant)>>>,
    /// Report every slot in use.
    full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
    identity: Option<wrenn_agent::join::HostIdentity>,
    /// The certificate it presents (once registered), and how it reaches the control plane.
    certificate: std::sync::Arc<wrenn_agent_api::fleet_tls::Identity>,
    fleet: FleetAccess,
}

/// POSTs `body` (JSON) to the fleet registry's `path` over the fleet's TLS, presenting
/// `certificate` when set, with `token` as the bearer when given.
async fn fleet_post(
    fleet: &FleetAccess,
    certificate: &std::sync::Arc<wrenn_agent_api::fleet_tls::Identity>,
    path: &str,
    token: Option<&str>,
    body: String,
) -> Result<(StatusCode, Vec<u8>), String> {
    use wrenn_agent_api::fleet_tls;
    let ca = std::fs::read_to_string(fleet.plane_ca()).unwrap();
    let settings = fleet_tls::client_config(
        fleet_tls::roots(&ca).unwrap(),
        fleet_tls::PLANE_NAME,
        certificate.clone(),
        fleet_tls::Alpn::Http1,
    )
    .unwrap();
    let client = wrenn_http::client::tls_client(Default::default(), settings).unwrap();
    let mut request = client
        .post(format!("{}{path}", fleet.url))
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(5))
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|error| error.to_string())?;
    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
    let bytes = response.bytes().await.map_err(|error| error.to_string())?;
    Ok((status, bytes.to_vec()))
}

impl FakeAgent {
    async fn start(name: &str, stuck: bool, server: &Server) -> FakeAgent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = FakeAgent {
            address: listener.local_addr().unwrap(),
            name: name.to_string(),
            sandboxes: Default::default(),
            paused: Default::default(),
            destroyed: Default::default(),
            full: Default::default(),
            heartbeats: None,
            identity: None,
            certificate: wrenn_agent_api::fleet_tls::Identity::none(),
            fleet: server.fleet(),
        };
        let (sandboxes, destroyed) = (agent.sandboxes.clone(), agent.destroyed.clone());
        let paused = agent.paused.clone();
        // It serves its control plane alone, over the fleet's TLS, as an agent does.
        let settings = {
            use wrenn_agent_api::fleet_tls;
            let ca = std::fs::read_to_string(agent.fleet.plane_ca()).unwrap();
            fleet_tls::server_config(
                fleet_tls::roots(&ca).unwrap(),
                fleet_tls::ClientCertificates::Required,
                agent.certificate.clone(),
            )
            .unwrap()
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(settings));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let Ok(stream) = acceptor.accept(stream).await else {
                    continue;
                };
                let (sandboxes, destroyed) = (sandboxes.clone(), destroyed.clone());
                let paused = paused.clone();
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let (sandboxes, destroyed) = (sandboxes.clone(), destroyed.clone());
                        let paused = paused.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let method = request
                                .uri()
                                .path()
                                .rsplit('/')
                                .next()
                                .unwrap_or("")
                                .to_string();
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let codec = wrenn_connect::Codec::Proto;
                            let answer = match method.as_str() {
                                "CreateSandbox" => {
                                    let create: pb::CreateSandboxRequest =
                                        codec.decode(&body).unwrap();
                                    sandboxes.lock().unwrap().insert(create.sandbox_id);
                                    codec.encode(&pb::CreateSandboxResponse::default())
                                }
                                _ if stuck => std::future::pending().await,
                                "ListSandboxes" => {
                                    let listed = sandboxes
                                        .lock()
                                        .unwrap()
                                        .iter()
                                        .map(|id| pb::Sandbox {
                                            sandbox_id: id.clone(),
                                            state: if paused.lock().unwrap().contains(id) {
                                                "paused".into()
                                            } else {
                                                "running".into()
                                            },
                                            created_at_unix_ms: chrono::Utc::now()
                                                .timestamp_millis(),
                                            ..Default::default()
                                        })
                                        .collect();
                                    codec.encode(&pb::ListSandboxesResponse { sandboxes: listed })
                                }
                                "DestroySandbox" => {
                                    let destroy: pb::DestroySandboxRequest =
                                        codec.decode(&body).unwrap();
                                    sandboxes.lock().unwrap().remove(&destroy.sandbox_id);
                                    destroyed
                                        .lock()
                                        .unwrap()
                                        .push((destroy.sandbox_id, Instant::now()));
                                    codec.encode(&pb::DestroySandboxResponse::default())
                                }
                                "PauseSandbox" => {
                                    let pause: pb::PauseSandboxRequest =
                                        codec.decode(&body).unwrap();
                                    paused.lock().unwrap().insert(pause.sandbox_id);
                                    codec.encode(&pb::PauseSandboxResponse::default())
                                }
                                "ResumeSandbox" => {
                                    let resume: pb::ResumeSandboxRequest =
                                        codec.decode(&body).unwrap();
                                    paused.lock().unwrap().remove(&resume.sandbox_id);
                                    codec.encode(&pb::ResumeSandboxResponse::default())
                                }
                                _ => Vec::new(),
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/proto")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(answer)))
                                    .unwrap(),
                            )
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        agent
    }

    fn report(&self) -> wrenn_agent::join::HostReport {
        let full = self.full.load(std::sync::atomic::Ordering::SeqCst);
        wrenn_agent::join::HostReport {
            cpus: 4,
            memory_bytes: 16 << 30,
            memory_available_bytes: 16 << 30,
            slots_total: 8,
            slots_in_use: if full { 8 } else { 0 },
            disk_available_bytes: 1 << 40,
            templates: vec![wrenn_agent_api::fake::template("base", 512)],
            ..Default::default()
        }
    }

    /// One registration under `name` with `identity`, which must answer `expected`: the
    /// answer.
    async fn register_as(
        &self,
        server: &Server,
        name: &str,
        identity: Option<&wrenn_agent::join::HostIdentity>,
        expected: StatusCode,
    ) -> Value {
        let key = wrenn_agent_api::fleet_tls::certificate_request().unwrap();
        let request = wrenn_agent::join::RegisterRequest {
            name: name.into(),
            api_url: format!("https://{}", self.address),
            proxy_address: self.address.to_string(),
            agent_token: "fake".into(),
            report: Some(self.report()),
            identity: identity.cloned(),
            certificate_request: key.csr_der,
        };
        let (status, body) = fleet_post(
            &self.fleet,
            &self.certificate,
            Register::PATH,
            Some(&server.join_token),
            serde_json::to_string(&request).unwrap(),
        )
        .await
        .unwrap();
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(status, expected, "{name}: {answer}");
        if let Some(chain) = answer["certificateChain"].as_str() {
            self.certificate.set(chain, &key.key_pem).unwrap();
        }
        answer
    }

    /// Registers under its name (with its identity, once it has one) and heartbeats every
    /// 200 ms until [`Self::stop_heartbeats`].
    async fn join(&mut self, server: &Server) {
        let answer = self
            .register_as(
                server,
                &self.name.clone(),
                self.identity.as_ref(),
                StatusCode::OK,
            )
            .await;
        let host_id = answer["hostId"].as_str().unwrap().to_string();
        if let Some(secret) = answer["hostSecret"].as_str() {
            self.identity = Some(wrenn_agent::join::HostIdentity {
                host_id: host_id.clone(),
                secret: secret.into(),
            });
        }
        let token = answer["heartbeatToken"].as_str().unwrap().to_string();
        let (fleet, certificate) = (self.fleet.clone(), self.certificate.clone());
        let this = FakeAgent {
            address: self.address,
            name: self.name.clone(),
            sandboxes: self.sandboxes.clone(),
            paused: self.paused.clone(),
            destroyed: self.destroyed.clone(),
            full: self.full.clone(),
            heartbeats: None,
            identity: None,
            certificate: self.certificate.clone(),
            fleet: self.fleet.clone(),
        };
        self.stop_heartbeats();
        self.heartbeats = Some(tokio::spawn(async move {
            loop {
                let beat = wrenn_agent::join::HeartbeatRequest {
                    host_id: host_id.clone(),
                    report: Some(this.report()),
                };
                let beat = serde_json::to_string(&beat).unwrap();
                let _ = fleet_post(&fleet, &certificate, Heartbeat::PATH, Some(&token), beat).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
        server
            .wait_host(&self.name, "up", Duration::from_secs(10))
            .await;
    }

    fn stop_heartbeats(&mut self) {
        if let Some(task) = self.heartbeats.take() {
            task.abort();
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop_heartbeats();
    }
}

/// The API's view of one host.
async fn host_view(server: &Server, name: &str) -> Value {
    server
        .hosts()
        .await
        .into_iter()
        .find(|host| host["name"] == name)
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_never_answers_delays_no_other_hosts_work() {
    let server = Server::start(None);
    // The control plane's files are its own (0600 in a 0700 directory).
    {
        use std::os::unix::fs::PermissionsExt;
        let cp = server.data_dir().join("cp");
        let mode =
            |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cp), 0o700);
        for entry in std::fs::read_dir(&cp).unwrap() {
            let path = entry.unwrap().path();
            let private = if path.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&path), private, "{}", path.display());
        }
    }
    // A host that takes creates and then never answers again, with two sandboxes that time out
    // first; then it reports itself full, so that later creates go elsewhere.
    let mut slow = FakeAgent::start("slow", true, &server).await;
    slow.join(&server).await;
    let stuck_ids = server
        .create_ids(2, json!({"templateID": "base", "timeout": 1}))
        .await;
    assert_eq!(slow.sandboxes.lock().unwrap().len(), 2);
    slow.full.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until(
        "the slow host to report itself full",
        Duration::from_secs(5),
        async || host_view(&server, "slow").await["report"]["slotsInUse"] == 8,
    )
    .await;

    // A healthy host: its sandboxes end on time although the slow host's kills (and its
    // reconciles) hang.
    let mut quick = FakeAgent::start("quick", false, &server).await;
    quick.join(&server).await;
    let quick_ids = server
        .create_ids(3, json!({"templateID": "base", "timeout": 2}))
        .await;
    let ends = Instant::now() + Duration::from_secs(2);
    assert_eq!(
        quick
            .sandboxes
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        quick_ids.iter().cloned().collect(),
        "the slow host is full: every create went to the quick one"
    );
    wait_until(
        "the quick host's sandboxes to be killed",
        Duration::from_secs(10),
        async || quick.sandboxes.lock().unwrap().is_empty(),
    )
    .await;
    // Held up by the slow host, a kill would wait out that host's deadline: half of it tells
    // the two apart with room to spare on a loaded machine.
    let held_up = wrenn_cp::deadlines::CONTROL_CALL / 2;
    for (id, at) in quick.destroyed.lock().unwrap().iter() {
        let late = at.saturating_duration_since(ends);
        assert!(late < held_up, "{id} was killed {late:?} after its end");
    }
    for id in &quick_ids {
        server.sandbox(id).detail(StatusCode::NOT_FOUND).await;
    }
    // The slow host's sandboxes are still there: their kills wait on their deadline.
    for id in &stuck_ids {
        server.sandbox(id).detail(StatusCode::OK).await;
    }

    // The heartbeat watch is not held up by the slow host's reconciles: a silent host goes
    // down (after 3 s), long before the slow host's deadline would let a held-up watch go on.
    quick.stop_heartbeats();
    server.wait_host("quick", "down", held_up).await;
    assert_eq!(host_view(&server, "slow").await["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_name_is_taken_only_with_its_identity() {
    let server = Server::start(None);
    let mut owner = FakeAgent::start("owned", false, &server).await;
    owner.join(&server).await;
    let identity = owner
        .identity
        .clone()
        .expect("a first registration gives an identity");
    let id = server
        .create_id(json!({"templateID": "base", "timeout": 300}))
        .await;
    let before = host_view(&server, "owned").await;

    // A second agent under the live host's name, with no identity or a wrong one: 409, and
    // nothing of the host changes (its address, its heartbeats, its sandbox).
    let intruder = FakeAgent::start("intruder", false, &server).await;
    let forged = wrenn_agent::join::HostIdentity {
        host_id: identity.host_id.clone(),
        secret: "guess".into(),
    };
    for claim in [None, Some(&forged)] {
        let answer = intruder
            .register_as(&server, "owned", claim, StatusCode::CONFLICT)
            .await;
        assert_message(&answer, "is up under another identity");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = host_view(&server, "owned").await;
    assert_eq!(after["hostID"], before["hostID"]);
    assert_eq!(after["apiURL"], before["apiURL"]);
    assert_eq!(after["state"], "up", "the owner's heartbeats still count");
    server.sandbox(&id).detail(StatusCode::OK).await;
    assert_eq!(owner.sandboxes.lock().unwrap().len(), 1);
    assert!(intruder.sandboxes.lock().unwrap().is_empty());

    // Down: still not the intruder's; its own agent takes it back, with its sandbox.
    owner.stop_heartbeats();
    server
        .wait_host("owned", "down", Duration::from_secs(8))
        .await;
    let answer = intruder
        .register_as(&server, "owned", None, StatusCode::CONFLICT)
        .await;
    assert_message(&answer, "wrenn host forget owned");
    // An identity is one host's: it cannot register under another name.
    intruder
        .register_as(&server, "renamed", Some(&identity), StatusCode::CONFLICT)
        .await;
    owner.join(&server).await;
    assert_eq!(
        owner.identity.as_ref(),
        Some(&identity),
        "the identity is kept, not renewed"
    );
    server
        .wait_sandbox("the sandbox to come back", &id, "running", 10)
        .await;

    // Replaced for good: forgetting needs an admin key and a down host; then the name is free.
    let other_key = server.key_of_team("not-admin");
    server
        .expect_with(
            StatusCode::FORBIDDEN,
            Method::DELETE,
            "/hosts/owned",
            Some(&other_key),
            "",
        )
        .await;
    let (status, body) = server
        .call(Method::DELETE, "/hosts/owned", Value::Null)
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an up host is not forgotten: {body}"
    );
    owner.stop_heartbeats();
    server
        .wait_host("owned", "down", Duration::from_secs(8))
        .await;
    let out = wrenn_ok(&server, &["host", "forget", "owned", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["sandboxes"],
        1,
        "{out}"
    );
    server.sandbox(&id).detail(StatusCode::NOT_FOUND).await;
    let answer = intruder
        .register_as(&server, "owned", None, StatusCode::OK)
        .await;
    assert_ne!(answer["hostId"], json!(identity.host_id), "a new identity");
    assert!(answer["hostSecret"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_cannot_take_a_hosts_name() {
    if prerequisites().is_none() {
        return;
    }
    let server = Server::start(None);
    let mut owner = joined_agent(&server, "wida", 1500, "ident-a").await;
    // The agent keeps the identity it was given, privately.
    let identity_file = owner.data_dir().join(wrenn_agent::join::IDENTITY_FILE);
    let kept = wrenn_agent::join::read_identity(&identity_file)
        .unwrap()
        .expect("the identity is kept");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&identity_file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    let id = server
        .create_id(json!({"templateID": "base", "timeout": 300, "secure": false}))
        .await;
    let before = host_view(&server, "ident-a").await;
    assert_eq!(before["hostID"], json!(kept.host_id));

    // A second real agent under the same name keeps being refused (409): the host, its
    // heartbeats and its sandbox are untouched, up and down.
    let mut intruder = Agent::start_refused("widb", 1520, &server.fleet(), "ident-a");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = host_view(&server, "ident-a").await;
    assert_eq!(
        (&after["hostID"], &after["apiURL"], &after["state"]),
        (&before["hostID"], &before["apiURL"], &json!("up"))
    );
    assert!(
        !intruder
            .data_dir()
            .join(wrenn_agent::join::IDENTITY_FILE)
            .exists(),
        "the intruder was given no identity"
    );
    let on_owner = agent_sandboxes(&owner).await;
    if on_owner != vec![id.clone()] {
        let detail = owner.get(&id).await;
        panic!("the owner runs {on_owner:?}, not [{id}]: {detail:?}");
    }
    run_via_proxy_expecting(server.proxy, &id, None, "echo intact", "intact").await;

    owner.kill();
    server
        .wait_host("ident-a", "down", Duration::from_secs(15))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let down = host_view(&server, "ident-a").await;
    assert_eq!(
        (&down["state"], &down["apiURL"]),
        (&json!("down"), &before["apiURL"]),
        "a down host is not the intruder's either"
    );
    // Its own agent, restarted, takes it back with the kept identity, and the sandbox with it.
    owner.spawn();
    server
        .wait_host("ident-a", "up", Duration::from_secs(30))
        .await;
    assert_eq!(
        wrenn_agent::join::read_identity(&identity_file).unwrap(),
        Some(kept)
    );
    server
        .wait_sandbox("the sandbox to come back", &id, "running", 15)
        .await;
    run_via_proxy_expecting(server.proxy, &id, None, "echo back", "back").await;

    server.sandbox(&id).kill(StatusCode::NO_CONTENT).await;
    for agent in [&mut owner, &mut intruder] {
        agent.stop();
        assert_eq!(agent.leftovers(), Vec::<String>::new());
    }
}

/// The fingerprint of the certificate host `host_id`'s agent at `address` serves its control
/// plane on a new connection (checked as the control plane checks it).
async fn served_host_certificate(
    fleet: &FleetAccess,
    host_id: &str,
    address: SocketAddr,
) -> String {
    use wrenn_agent_api::fleet_tls;
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(fleet.as_control_plane(host_id)));
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(fleet_tls::host_name(host_id)).unwrap();
    let connection = connector
        .connect(name, stream)
        .await
        .expect("the agent's certificate is the fleet's");
    let (_, session) = connection.get_ref();
    fleet_tls::fingerprint(&session.peer_certificates().unwrap()[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_certificates_rotate_while_a_sandbox_streams_and_takes_new_commands() {
    use wrenn_agent_api::fleet_tls;
    if prerequisites().is_none() {
        return;
    }
    // Host certificates of the least life allowed, 30 s: renewed about every 20 s.
    let server = Server::start_with(None, &["--host-certificate-life-secs", "30"]);
    let fleet = server.fleet();
    let agent = joined_agent(&server, "wrot", 1560, "rotating").await;
    let host = host_view(&server, "rotating").await;
    let host_id = host["hostID"].as_str().unwrap().to_string();
    let api_url = host["apiURL"].as_str().unwrap();
    let api: SocketAddr = api_url.trim_start_matches("https://").parse().unwrap();
    let kept_certificate = || {
        let chain =
            std::fs::read_to_string(agent.data_dir().join(wrenn_agent::join::CERTIFICATE_FILE))
                .unwrap();
        fleet_tls::fingerprint(&fleet_tls::certificates(&chain, "kept").unwrap()[0])
    };
    let id = server
        .create_id(json!({"templateID": "base", "timeout": 300, "secure": false}))
        .await;

    // One command streams its output through the edge proxy for the whole test, on the
    // connections it opened before any renewal.
    const TICKS: usize = 55;
    let streaming = {
        let (proxy, id) = (server.proxy, id.clone());
        tokio::spawn(async move {
            let script = format!("for i in $(seq 1 {TICKS}); do echo tick $i; sleep 1; done");
            run_via_proxy(proxy, &id, None, &script).await
        })
    };

    // Two renewals; after each, the agent serves the new certificate, keeps it, and the
    // sandbox takes a new command (new connections, over the new certificate).
    let mut served = vec![served_host_certificate(&fleet, &host_id, api).await];
    let deadline = Instant::now() + Duration::from_secs(50);
    while served.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "{} renewals of the host's certificate in 50 s",
            served.len() - 1
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = served_host_certificate(&fleet, &host_id, api).await;
        if served.last() == Some(&now) {
            continue;
        }
        assert!(!served.contains(&now), "a new certificate each time");
        // The agent keeps what it serves (written just after it is served).
        let kept_by = Instant::now() + Duration::from_secs(5);
        while kept_certificate() != now {
            assert!(
                Instant::now() < kept_by,
                "the agent did not keep its new certificate"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        served.push(now);
        let word = format!("renewal-{}", served.len() - 1);
        run_via_proxy_expecting(server.proxy, &id, None, &format!("echo {word}"), &word).await;
        assert_eq!(host_view(&server, "rotating").await["state"], "up");
    }

    // The stream went on through both: every line, in order, and its end.
    let ran = streaming.await.unwrap();
    let expected: Vec<String> = (1..=TICKS).map(|i| format!("tick {i}")).collect();
    assert_eq!(ran.stdout.lines().collect::<Vec<_>>(), expected, "{ran:?}");
    assert_eq!(ran.exit_code, Some(0), "{ran:?}");
    let detail = server.sandbox(&id).detail(StatusCode::OK).await;
    assert_eq!(detail["state"], "running", "{detail}");
    assert_eq!(
        host_view(&server, "rotating").await["hostID"],
        json!(host_id)
    );

    server.sandbox(&id).kill(StatusCode::NO_CONTENT).await;
    let mut agent = agent;
    agent.stop();
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_refused_settings_through_the_real_api() {
    let server = Server::start_with(
        None,
        &[
            "--quota-running",
            "2",
            "--quota-paused",
            "1",
            "--quota-disk-gib",
            "6",
        ],
    );
    let mut host = FakeAgent::start("quota-host", false, &server).await;
    host.join(&server).await;
    let key = server.key_of_team("limited");

    // Settings wrenn does not enforce: 400 naming the field, and nothing is created.
    for (body, field) in [
        (
            json!({"templateID": "base", "network": {"httpsPorts": [3000]}}),
            "network.httpsPorts",
        ),
        (
            json!({"templateID": "base", "volumeMounts": [{"name": "v", "path": "/v"}]}),
            "volumeMounts",
        ),
        (
            json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false,
                "autoResume": {"enabled": true}}),
            "autoResume",
        ),
    ] {
        let (answer, _) = server
            .expect_with(
                StatusCode::BAD_REQUEST,
                Method::POST,
                "/v2/sandboxes",
                Some(&key),
                &body.to_string(),
            )
            .await;
        assert!(
            answer["message"].as_str().unwrap().starts_with(field),
            "{answer}"
        );
    }
    assert!(host.sandboxes.lock().unwrap().is_empty());

    // Six creates at once for a team allowed two running: exactly two are made.
    let body =
        json!({"templateID": "base", "timeout": 300, "network": {"allowOut": [], "denyOut": []},
        "mcp": null, "volumeMounts": [], "autoPauseMemory": true})
        .to_string();
    let attempts =
        (0..6).map(|_| server.call_with(Method::POST, "/v2/sandboxes", Some(&key), &body));
    let answers = futures_util::future::join_all(attempts).await;
    let mut made = Vec::new();
    let running_limit = "team limited has 2 running sandboxes, the limit: kill or pause one first";
    for (status, answer, headers) in answers {
        match status {
            StatusCode::CREATED => made.push(sandbox_id(&answer)),
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(answer["message"], running_limit);
                assert_eq!(headers["should-retry"], "false");
            }
            other => panic!("{other}: {answer}"),
        }
    }
    assert_eq!(made.len(), 2, "{made:?}");
    assert_eq!(host.sandboxes.lock().unwrap().len(), 2);
    // Another team has limits of its own.
    let other = server
        .create(json!({"templateID": "base", "timeout": 300}))
        .await;
    // The team's creates of `body`, which must answer `expected`.
    let create = async |expected: StatusCode| {
        let (answer, _) = server
            .expect_with(expected, Method::POST, "/sandboxes", Some(&key), &body)
            .await;
        answer
    };

    // One pause fits the paused limit, a second does not.
    let (first, second) = (
        server.sandbox_as(&made[0], &key),
        server.sandbox_as(&made[1], &key),
    );
    first
        .post(StatusCode::NO_CONTENT, "/pause", json!({"memory": true}))
        .await;
    let answer = second.pause(StatusCode::TOO_MANY_REQUESTS).await;
    assert_message(&answer, "1 paused sandboxes, the limit");
    // Disk: a running sandbox counts its template's 2 GiB, a paused one also its 512 MiB of
    // memory: 4608 MiB held, and 2048 more would pass 6 GiB.
    let answer = create(StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(
        answer["message"],
        "team limited's sandboxes hold 4608 MiB of disk; 2048 MiB more would pass the limit of 6144 MiB"
    );
    // A connect that leaves the memory aside resumes it from its disk (running 2 of 2 again),
    // and its network rules change (a bad one is refused, naming it).
    first
        .post(
            StatusCode::CREATED,
            "/connect",
            json!({"timeout": 60, "memory": false}),
        )
        .await;
    let answer = first
        .expect(
            StatusCode::BAD_REQUEST,
            Method::PUT,
            "/network",
            json!({"allowOut": ["10.0.0.0/33"]}),
        )
        .await;
    assert_message(&answer, "10.0.0.0/33");
    first
        .expect(
            StatusCode::NO_CONTENT,
            Method::PUT,
            "/network",
            json!({"allowOut": ["10.0.0.0/8"], "denyOut": ["0.0.0.0/0"]}),
        )
        .await;
    // Killing one frees its slot.
    second.kill(StatusCode::NO_CONTENT).await;
    create(StatusCode::CREATED).await;
    // A host that stops answering leaves its sandboxes lost, and lost ones still count: the
    // team is at its limit, so a create is refused for the quota, not let through.
    host.stop_heartbeats();
    server
        .wait_host("quota-host", "down", Duration::from_secs(30))
        .await;
    let answer = create(StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(answer["message"], running_limit);
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_takes_its_api_key_from_a_file() {
    let server = Server::start(None);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{}\n", server.key)).unwrap();
    let run = |args: Vec<String>, env_key: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_wrenn"));
        command
            .args(&args)
            .env("WRENN_API_URL", server.url())
            .env_remove("WRENN_API_KEY")
            .env_remove("E2B_API_KEY");
        if let Some(key) = env_key {
            command.env("WRENN_API_KEY", key);
        }
        command.output().unwrap()
    };
    let file_arg = key_file.display().to_string();
    let listed = run(
        vec![
            "host".into(),
            "list".into(),
            "--json".into(),
            "--api-key-file".into(),
            file_arg.clone(),
        ],
        None,
    );
    assert!(listed.status.success(), "{listed:?}");
    let fleet: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(fleet["placement"], "least-loaded");
    let both = run(
        vec![
            "host".into(),
            "list".into(),
            "--api-key-file".into(),
            file_arg,
        ],
        Some(&server.key),
    );
    assert!(!both.status.success());
    assert!(
        String::from_utf8_lossy(&both.stderr).contains("not both"),
        "{both:?}"
    );
}

/// How long the replicas' leases last in the tests (renewed every 500 ms).
const REPLICA_LEASE_MS: u64 = 1500;

/// The store of replicas, read directly: who holds each lease, what was recorded.
struct ReplicaStore(tokio_postgres::Client);

impl ReplicaStore {
    async fn open(url: &str) -> ReplicaStore {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        ReplicaStore(client)
    }

    /// The process id in the holder of lease `name`, while it is held.
    async fn holder_pid(&self, name: &str) -> Option<u32> {
        let row = self
            .0
            .query_opt(
                "SELECT holder FROM leases WHERE name = $1
                 AND expires_at_ms >= (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
                &[&name],
            )
            .await
            .unwrap()?;
        // `<host name>-<pid>-<random>`
        let holder: String = row.get(0);
        holder.rsplit('-').nth(1)?.parse().ok()
    }

    /// Waits until lease `name` is held by one of `replicas`: its index.
    async fn holder(&self, name: &str, replicas: &[Server]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(pid) = self.holder_pid(name).await
                && let Some(index) = replicas.iter().position(|r| r.pid() == Some(pid))
            {
                return index;
            }
            assert!(
                Instant::now() < deadline,
                "no live replica took lease {name}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many events of `kind` name `subject`.
    async fn events(&self, kind: &str, subject: &str) -> i64 {
        self.0
            .query_one(
                "SELECT COUNT(*) FROM events WHERE kind = $1 AND subject = $2",
                &[&kind, &subject],
            )
            .await
            .unwrap()
            .get(0)
    }
}

/// `POST /sandboxes` with an Idempotency-Key: the status and the sandbox's id.
async fn create_with_key(server: &Server, key: &str) -> (StatusCode, String) {
    let api = wrenn_api::client::Client::new(&server.url(), Some(&server.key))
        .unwrap()
        .with_deadline(Duration::from_secs(120));
    let mut headers = http::HeaderMap::new();
    headers.insert("idempotency-key", key.parse().unwrap());
    let body = json!({"templateID": "base", "timeout": 300}).to_string();
    let response = api
        .send(
            Method::POST,
            "/sandboxes",
            &headers,
            Some(bytes::Bytes::from(body)),
        )
        .await
        .unwrap();
    let status = StatusCode::from_u16(response.status.as_u16()).unwrap();
    let id = response.json()["sandboxID"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, id)
}

/// Control plane replicas (#23) without VMs: three `wrenn server --replica` on one PostgreSQL
/// database, two fake hosts heartbeating to different replicas. Any replica serves any call
/// and sees every host; creates, pauses, resumes and kills spread over them work; a create
/// retried with its Idempotency-Key at another replica (or sent to two at once) makes one
/// sandbox; a pause and a kill sent at once to two replicas end with the sandbox killed once.
/// Then the replicas holding the duties are SIGKILLed one after the other: sandboxes whose
/// timeout passes during the handover are killed exactly once, a silent host is marked down
/// exactly once, and a drift is reconciled by the survivor. SQLite is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_any_call_and_hand_their_duties_over_when_one_dies() {
    // Refused on SQLite, with the reason.
    let data = tempfile::tempdir().unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_wrenn"))
        .args(["server", "--replica", "--no-internet"])
        .arg("--data-dir")
        .arg(data.path())
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--proxy-listen", &format!("127.0.0.1:{}", free_port())])
        .env_remove("DATABASE_URL")
        .env("WRENN_JOIN_TOKEN", "join")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("PostgreSQL"), "{said}");

    let Some(database) = postgres_database().await else {
        return;
    };
    let store = ReplicaStore::open(&database).await;
    let shared = tempfile::tempdir().unwrap();
    let join_token = format!("join-{}", free_port());
    let mut replicas = vec![Server::start_replica(
        &database,
        shared.path(),
        &join_token,
        None,
    )];
    let key = replicas[0].key.clone();
    for _ in 0..2 {
        replicas.push(Server::start_replica(
            &database,
            shared.path(),
            &join_token,
            Some(&key),
        ));
    }
    // Each host registers and heartbeats at a replica of its own; every replica sees both.
    let mut host_a = FakeAgent::start("replica-host-a", false, &replicas[1]).await;
    host_a.join(&replicas[1]).await;
    let mut host_b = FakeAgent::start("replica-host-b", false, &replicas[2]).await;
    host_b.join(&replicas[2]).await;
    for replica in &replicas {
        for host in ["replica-host-a", "replica-host-b"] {
            replica.wait_host(host, "up", Duration::from_secs(10)).await;
        }
    }
    let tables = [host_a.sandboxes.clone(), host_b.sandboxes.clone()];
    let on_hosts = || {
        let mut ids: Vec<String> = tables
            .iter()
            .flat_map(|table| table.lock().unwrap().iter().cloned().collect::<Vec<_>>())
            .collect();
        ids.sort();
        ids
    };
    let kills = [host_a.destroyed.clone(), host_b.destroyed.clone()];
    let destroyed = |id: &str| {
        kills
            .iter()
            .map(|kills| {
                kills
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(gone, _)| gone == id)
                    .count()
            })
            .sum::<usize>()
    };

    // Creates, reads, pauses, resumes and kills spread over the replicas.
    let mut ids = Vec::new();
    for index in 0..4 {
        let body = json!({"templateID": "base", "timeout": 300});
        ids.push(replicas[index % 3].create_id(body).await);
    }
    for replica in &replicas {
        for id in &ids {
            replica.sandbox(id).detail(StatusCode::OK).await;
        }
    }
    replicas[0]
        .sandbox(&ids[1])
        .pause(StatusCode::NO_CONTENT)
        .await;
    replicas[2]
        .wait_sandbox("the pause seen by another replica", &ids[1], "paused", 5)
        .await;
    replicas[2]
        .sandbox(&ids[1])
        .post(StatusCode::CREATED, "/resume", json!({"timeout": 300}))
        .await;
    replicas[1]
        .wait_sandbox("the resume seen by another replica", &ids[1], "running", 5)
        .await;
    replicas[1]
        .sandbox(&ids[1])
        .kill(StatusCode::NO_CONTENT)
        .await;
    for replica in &replicas {
        replica.sandbox(&ids[1]).detail(StatusCode::NOT_FOUND).await;
    }

    // A create retried at another replica with its key gets the first one's sandbox; two sent
    // at once to two replicas make one.
    let (status, first) = create_with_key(&replicas[0], "retried").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, again) = create_with_key(&replicas[2], "retried").await;
    assert_eq!((status, &again), (StatusCode::CREATED, &first));
    let before = on_hosts().len();
    let (one, other) = tokio::join!(
        create_with_key(&replicas[1], "at-once"),
        create_with_key(&replicas[2], "at-once")
    );
    assert_eq!(one.0, StatusCode::CREATED);
    assert_eq!(
        one, other,
        "two creates with one key at once made one sandbox"
    );
    assert_eq!(on_hosts().len(), before + 1);

    // A pause and a kill at once, at two replicas: one after the other, the sandbox killed once.
    let raced = ids[2].clone();
    let pause_path = format!("/sandboxes/{raced}/pause");
    let kill_path = format!("/sandboxes/{raced}");
    let (paused, killed) = tokio::join!(
        replicas[0].call(Method::POST, &pause_path, json!({})),
        replicas[1].call(Method::DELETE, &kill_path, Value::Null)
    );
    assert_eq!(killed.0, StatusCode::NO_CONTENT, "{}", killed.1);
    assert!(
        [StatusCode::NO_CONTENT, StatusCode::NOT_FOUND].contains(&paused.0),
        "the pause either came first or found the sandbox killed: {paused:?}"
    );
    for replica in &replicas {
        replica.sandbox(&raced).detail(StatusCode::NOT_FOUND).await;
    }
    assert_eq!(destroyed(&raced), 1);
    assert!(!on_hosts().contains(&raced));

    // The lifecycle's replica dies while two sandboxes' timeouts pass: each is killed once.
    let lifecycle = store.holder("lifecycle", &replicas).await;
    let creator = (lifecycle + 1) % 3;
    // The hosts heartbeat to a replica that stays (registering there again).
    for host in [&mut host_a, &mut host_b] {
        host.fleet = replicas[creator].fleet();
        host.join(&replicas[creator]).await;
    }
    let expiring = replicas[creator]
        .create_ids(2, json!({"templateID": "base", "timeout": 2}))
        .await;
    replicas[lifecycle].kill();
    let survivor = &replicas[creator];
    wait_until(
        "the sandboxes timed out in the handover to be killed",
        Duration::from_millis(REPLICA_LEASE_MS) + Duration::from_secs(10),
        async || expiring.iter().all(|id| destroyed(id) >= 1),
    )
    .await;
    // Killed once, and nothing more happens to them.
    tokio::time::sleep(Duration::from_millis(REPLICA_LEASE_MS * 2)).await;
    for id in &expiring {
        assert_eq!(destroyed(id), 1, "{id} was destroyed once");
        assert_eq!(store.events("sandbox.timed_out", id).await, 1, "{id}");
        assert_eq!(store.events("sandbox.killed", id).await, 1, "{id}");
        survivor.sandbox(id).detail(StatusCode::NOT_FOUND).await;
    }

    // The fleet watch's replica dies as a host goes silent: the other marks it down, once. The
    // host that stays heartbeats to the replica that stays (registering there again).
    let watch = store.holder("fleet-watch", &replicas).await;
    let stays = (0..3)
        .find(|&index| index != watch && replicas[index].pid().is_some())
        .unwrap();
    host_a.fleet = replicas[stays].fleet();
    host_a.join(&replicas[stays]).await;
    host_b.stop_heartbeats();
    replicas[watch].kill();
    let last = &replicas[stays];
    last.wait_host("replica-host-b", "down", Duration::from_secs(15))
        .await;
    tokio::time::sleep(Duration::from_millis(REPLICA_LEASE_MS * 2)).await;
    let host_b_id = host_view(last, "replica-host-b").await["hostID"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_default();
    assert_eq!(store.events("host.down", &host_b_id).await, 1);
    assert_eq!(host_view(last, "replica-host-a").await["state"], "up");

    // Reconcile runs at the last replica: a sandbox gone from its host leaves the store.
    assert_eq!(store.holder("reconcile", &replicas).await, stays);
    let drifted = last
        .create_id(json!({"templateID": "base", "timeout": 300}))
        .await;
    assert!(
        host_a.sandboxes.lock().unwrap().remove(&drifted),
        "the only host up has it"
    );
    last.wait_sandbox("the drift to be reconciled", &drifted, "gone", 15)
        .await;

    // Nothing is left on the hosts once the rest is killed.
    // (Copied out: the fake host's handlers take the table's lock.)
    let remaining: Vec<String> = host_a.sandboxes.lock().unwrap().iter().cloned().collect();
    for id in remaining {
        last.sandbox(&id).kill(StatusCode::NO_CONTENT).await;
    }
    assert!(host_a.sandboxes.lock().unwrap().is_empty());
}
