//! Starting the real envd binary on a free port for a test, and small HTTP helpers.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};

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
            .args([
                "--port",
                &port.to_string(),
                "--listen",
                "127.0.0.1",
                "--no-clock-sync",
            ])
            .args(extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting envd");
        let envd = Envd { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "envd did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        envd
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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
#[allow(dead_code)]
pub fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    dir
}
