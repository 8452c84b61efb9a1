//! What wrenn's tests share, so each suite states only what it checks: running a script with
//! bash through an envd ([`run_script`], [`Ran`]), the pid a `Start` stream begins with
//! ([`started_pid`]), envd's headers for a user ([`as_user`]),
//! waiting for a condition with a deadline ([`wait_until`]), a free loopback port
//! ([`free_port`]) and the check that a VM test can run here ([`vm_prerequisites`]). A
//! dev-dependency only: no product crate links it.
//!
//! A test that needs something of its machine (root, QEMU, a built image, a writable cgroup v2
//! hierarchy, the test user, PostgreSQL...) reports a missing one with [`missing_prerequisite`]
//! and returns: with `WRENN_REQUIRE_PREREQUISITES=1` (the one switch, which scripts/test.sh and
//! so CI set) that fails the test; elsewhere the test says `SKIPPED: ...` on stderr and passes.

use std::time::{Duration, Instant};

use http::HeaderMap;
use wrenn_connect::client::ConnectClient;
use wrenn_proto::process as pb;
use wrenn_proto::process::process_event::Event;

/// What a script run through envd printed, and how it ended.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    /// None when the stream ended without an end event.
    pub exit_code: Option<i32>,
}

/// envd's headers for calls as `user` (Basic `user:`), with its access token when it has one.
pub fn as_user(user: &str, token: Option<&str>) -> HeaderMap {
    use base64::Engine;
    let mut headers = HeaderMap::new();
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Basic {credentials}")
            .parse()
            .expect("a Basic header is a header value"),
    );
    if let Some(token) = token {
        headers.insert(
            "x-access-token",
            token.parse().expect("tokens are header values"),
        );
    }
    headers
}

/// Runs `script` with `bash -l -c` through the process service of the envd `client` reaches,
/// with `headers`, and collects its output until it ends. Panics if the call is refused.
pub async fn run_script(client: &ConnectClient, headers: &HeaderMap, script: &str) -> Ran {
    let request = pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), script.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client
        .call_streaming::<pb::process::Start>(&request, headers)
        .await
        .expect("Start failed");
    let mut ran = Ran::default();
    while let Some(Ok(message)) = stream.message().await {
        match message.event.and_then(|event| event.event) {
            Some(Event::Data(data)) => match data.output {
                Some(pb::process_event::data_event::Output::Stdout(bytes)) => {
                    ran.stdout.push_str(&String::from_utf8_lossy(&bytes))
                }
                Some(pb::process_event::data_event::Output::Stderr(bytes)) => {
                    ran.stderr.push_str(&String::from_utf8_lossy(&bytes))
                }
                _ => {}
            },
            Some(Event::End(end)) => ran.exit_code = Some(end.exit_code),
            _ => {}
        }
    }
    ran
}

/// The pid in the first message of a `Start` or `Connect` stream (its start event); panics if
/// the stream begins otherwise.
pub async fn started_pid(
    stream: &mut wrenn_connect::client::ResponseStream<pb::StartResponse>,
) -> u32 {
    let first = stream
        .message()
        .await
        .expect("the stream ended before its start event")
        .expect("the stream failed before its start event");
    match first.event.and_then(|event| event.event) {
        Some(Event::Start(start)) => start.pid,
        other => panic!("the stream began with {other:?}, not a start event"),
    }
}

/// Waits until `check` holds, polling every 100 ms; panics naming `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ports [`free_port`] hands out: below the kernel's ephemeral range (32768 and up by
/// default), so that no outgoing connection of a test running beside it takes the port
/// between its choice and its use, as one did when the OS chose from that range.
const FREE_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port free now (a test binds it soon after): tried from a place that differs
/// per process and per call, so tests running at once seldom try the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(FREE_PORTS.end - FREE_PORTS.start);
    let start = std::process::id()
        .wrapping_mul(7919)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(613));
    for step in 0..span {
        let port = FREE_PORTS.start + ((start.wrapping_add(step)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FREE_PORTS:?}");
}

/// The environment variable that makes a missing prerequisite fail its test when it is `1`.
pub const REQUIRE_PREREQUISITES: &str = "WRENN_REQUIRE_PREREQUISITES";

/// Whether a test whose prerequisite is missing fails (`WRENN_REQUIRE_PREREQUISITES=1`, as
/// scripts/test.sh sets) rather than being skipped.
pub fn prerequisites_required() -> bool {
    std::env::var(REQUIRE_PREREQUISITES).is_ok_and(|value| value == "1")
}

/// Reports that `what` (a test, or a part of one) cannot run here because of `reason`: panics
/// when [`prerequisites_required`], else prints `SKIPPED: {what}: {reason}` to stderr, and the
/// caller skips what it cannot run (returns). The panic names the caller's line.
#[track_caller]
pub fn missing_prerequisite(what: &str, reason: &str) {
    if prerequisites_required() {
        panic!("prerequisite missing for {what}: {reason} ({REQUIRE_PREREQUISITES}=1)");
    }
    eprintln!("SKIPPED: {what}: {reason}");
}

/// The image directory a VM test boots, when this machine can run the test: root, QEMU and a
/// built image in `image_dir`. Otherwise it reports the missing one for `suite` through
/// [`missing_prerequisite`] (failing the test when prerequisites are required) and gives `None`.
#[track_caller]
pub fn vm_prerequisites(image_dir: std::path::PathBuf, suite: &str) -> Option<std::path::PathBuf> {
    let qemu_installed = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("qemu-system-x86_64").is_file())
    });
    let missing = if !nix::unistd::Uid::effective().is_root() {
        "not root".to_string()
    } else if !qemu_installed {
        "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)".to_string()
    } else if !image_dir.join("manifest.json").is_file() {
        format!(
            "no image in {} (run `wrenn image build`)",
            image_dir.display()
        )
    } else {
        return Some(image_dir);
    };
    missing_prerequisite(
        suite,
        &format!("needs root, QEMU and a built image: {missing}"),
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_headers_carry_basic_credentials_and_the_token() {
        let headers = as_user("user", Some("t0k"));
        assert_eq!(headers["authorization"], "Basic dXNlcjo=");
        assert_eq!(headers["x-access-token"], "t0k");
        assert!(!as_user("root", None).contains_key("x-access-token"));
        assert_eq!(as_user("root", None)["authorization"], "Basic cm9vdDo=");
    }

    #[test]
    fn a_missing_prerequisite_fails_only_when_required() {
        let required = prerequisites_required();
        let reported = std::panic::catch_unwind(|| missing_prerequisite("this test", "nothing"));
        assert_eq!(reported.is_err(), required);
    }

    #[test]
    fn free_ports_can_be_bound() {
        let port = free_port();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}
