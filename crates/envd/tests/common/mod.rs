//! Starting the real envd binary on a free port for a test, small HTTP helpers, and the
//! process calls the suites share: starting a command, collecting its stream, signalling it.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wrenn_connect::client::{ConnectClient, HttpVersion, ResponseStream};
use wrenn_connect::{Codec, ConnectError};
use wrenn_proto::process as pb;
use wrenn_proto::process::process_event::{Event, data_event::Output};

/// A running envd, killed on drop.
pub struct Envd {
    child: Child,
    pub port: u16,
}

impl Envd {
    pub fn start() -> Envd {
        Envd::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Envd {
        let port = wrenn_testkit::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_envd"))
            .args(wrenn_envd::loopback_args(port))
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting envd");
        let envd = Envd { child, port };
        wait_for("envd listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        envd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends one plain HTTP/1.1 request for `path` (with its query) to this envd.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        request(method, &format!("{}{path}", self.url()), headers, body).await
    }

    pub fn client(&self, version: HttpVersion, codec: Codec) -> ConnectClient {
        ConnectClient::new(self.url(), version, codec)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP response, collected.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends one plain HTTP/1.1 request.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut builder = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client
        .request(builder.body(Full::new(body.into())).unwrap())
        .await
        .expect("request failed");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Uploads `body` raw (`application/octet-stream`) to `url` (`/files?path=...`), with `headers`
/// besides the content type.
pub async fn upload(url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let mut all = vec![("content-type", "application/octet-stream")];
    all.extend_from_slice(headers);
    request("POST", url, &all, body).await
}

/// Waits (blocking the thread) until `condition` holds, polling every 10 ms; panics naming
/// `what` after `within`.
pub fn wait_for(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `Start` request for `cmd` with `args`, envd's defaults for everything else.
pub fn start_request(cmd: &str, args: &[&str]) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A terminal of `cols` by `rows`, for a `Start` or `Update` request.
pub fn pty(cols: u32, rows: u32) -> Option<pb::Pty> {
    Some(pb::Pty {
        size: Some(pb::pty::Size { cols, rows }),
    })
}

/// The selector of the process `pid`.
pub fn pid_selector(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(pb::process_selector::Selector::Pid(pid)),
    })
}

/// The response stream of `Start` with `request` and `headers`; panics if the call is refused.
pub async fn start_stream(
    client: &ConnectClient,
    request: &pb::StartRequest,
    headers: &HeaderMap,
) -> ResponseStream<pb::StartResponse> {
    client
        .call_streaming::<pb::process::Start>(request, headers)
        .await
        .expect("Start failed")
}

/// Sends `signal` to the process `pid`.
pub async fn send_signal(
    client: &ConnectClient,
    pid: u32,
    signal: pb::Signal,
) -> Result<pb::SendSignalResponse, ConnectError> {
    let request = pb::SendSignalRequest {
        process: pid_selector(pid),
        signal: signal as i32,
    };
    client
        .call::<pb::process::SendSignal>(&request, &HeaderMap::new())
        .await
}

/// The collected events of a process stream.
#[derive(Debug, Default)]
pub struct Collected {
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub keepalives: usize,
    pub end: Option<pb::process_event::EndEvent>,
    pub error: Option<ConnectError>,
}

/// Everything a process stream brings until it ends (`event_of` takes the event out of each
/// message); fails if it stalls for 20 s.
pub async fn collect<M: wrenn_connect::Message>(
    stream: ResponseStream<M>,
    event_of: fn(M) -> Option<pb::ProcessEvent>,
) -> Collected {
    collect_from(stream, event_of, Collected::default()).await
}

/// The rest of a stream whose `start` the caller already read.
pub async fn collect_rest(stream: ResponseStream<pb::StartResponse>, pid: u32) -> Collected {
    collect_from(
        stream,
        start_event,
        Collected {
            pid: Some(pid),
            ..Collected::default()
        },
    )
    .await
}

/// [`collect`], adding to what `collected` already holds.
pub async fn collect_from<M: wrenn_connect::Message>(
    mut stream: ResponseStream<M>,
    event_of: fn(M) -> Option<pb::ProcessEvent>,
    mut collected: Collected,
) -> Collected {
    while let Some(message) = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("stream stalled")
    {
        match message {
            Err(error) => {
                collected.error = Some(error);
                break;
            }
            Ok(message) => match event_of(message).and_then(|e| e.event) {
                Some(Event::Start(start)) => {
                    assert!(collected.pid.is_none(), "two start events");
                    collected.pid = Some(start.pid);
                }
                Some(Event::Data(data)) => {
                    assert!(collected.pid.is_some(), "data before start");
                    match data.output {
                        Some(Output::Stdout(b)) => collected.stdout.extend(b),
                        Some(Output::Stderr(b)) => collected.stderr.extend(b),
                        Some(Output::Pty(b)) => collected.pty.extend(b),
                        None => panic!("empty data event"),
                    }
                }
                Some(Event::End(end)) => collected.end = Some(end),
                Some(Event::Keepalive(_)) => collected.keepalives += 1,
                None => panic!("empty event"),
            },
        }
    }
    collected
}

/// The event of a `Start` response.
pub fn start_event(message: pb::StartResponse) -> Option<pb::ProcessEvent> {
    message.event
}

/// The event of a `Connect` response.
pub fn connect_event(message: pb::ConnectResponse) -> Option<pb::ProcessEvent> {
    message.event
}

/// Runs `request` through `Start` with `headers` and collects its stream.
pub async fn run(
    client: &ConnectClient,
    request: &pb::StartRequest,
    headers: &HeaderMap,
) -> Collected {
    collect(start_stream(client, request, headers).await, start_event).await
}

/// Whether the test user `user` exists here (the CI set-up creates it).
pub fn test_user_exists() -> bool {
    std::fs::read_to_string("/etc/passwd").is_ok_and(|p| p.lines().any(|l| l.starts_with("user:")))
}

/// The uid and gid of the test user `user`, if it exists.
pub fn test_user_ids() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("user:"))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

/// The user envd runs calls as when neither the call nor `/init` names one, and its home:
/// `user` where that account exists (the CI set-up creates it), else root.
pub fn default_account() -> (&'static str, &'static str) {
    if test_user_exists() {
        ("user", "/home/user")
    } else {
        ("root", "/root")
    }
}

/// Whether the tests run as root (needed to switch users and mount filesystems).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A temporary directory every user may write in (the calls of a test may name no user, and
/// envd's default user is `user` where it exists).
pub fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    dir
}
