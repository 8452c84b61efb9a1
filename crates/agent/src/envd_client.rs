//! The agent's calls to envd in a guest: `/health`, `/init`, `/snapshot/prepare` and
//! `/snapshot/continue`. Every call opens its own connection and closes it (a client with no
//! idle pool, `Connection: close`), so the agent never holds an idle connection to envd across
//! a snapshot (it would be a zombie in every clone); a restore's `/init` goes out on the
//! connection that showed the guest ready ([`init_on`]), closed likewise.
//!
//! A guest is not trusted: its root can serve anything on envd's port. So every answer is read
//! within a deadline and up to [`MAX_CONTROL_ANSWER`] bytes, and the guest's text is shortened
//! and escaped ([`guest_text`]) before it goes into an error or a log line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::AgentError;

/// The most the agent reads of one control answer from a guest.
pub const MAX_CONTROL_ANSWER: usize = 64 * 1024;
/// The most of a guest's text placed in an error or a log line.
const MAX_GUEST_TEXT: usize = 200;

/// A guest's bytes made safe to show: at most 200 characters, control characters and quotes
/// escaped (no forged log lines, no terminal escapes), and a mark where it was cut.
pub fn guest_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let mut shown: String = text
        .chars()
        .take(MAX_GUEST_TEXT)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(MAX_GUEST_TEXT).is_some() {
        shown.push('…');
    }
    shown
}

/// A GET of `path` without a body or a token: its status and body.
async fn get(address: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    call(address, http::Method::GET, path, None, None, timeout).await
}

/// One request on a fresh connection, within `timeout` (connect included); the answer's body is read up to
/// [`MAX_CONTROL_ANSWER`] bytes (a longer one is an error) and returned as [`guest_text`].
async fn call(
    address: SocketAddr,
    method: http::Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let (status, body) = call_bytes(address, method, path, body, token, timeout).await?;
    Ok((status, guest_text(&body)))
}

/// envd's `GET /metrics` (the guest's CPU, memory and disk), within `timeout`; `None` when it
/// does not answer with a JSON object.
pub async fn metrics(
    address: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Option<serde_json::Map<String, Value>> {
    match call_bytes(address, http::Method::GET, "/metrics", None, token, timeout).await {
        Ok((200, body)) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

/// [`call`]'s request, its answer's body as the guest sent it (at most [`MAX_CONTROL_ANSWER`]
/// bytes).
async fn call_bytes(
    address: SocketAddr,
    method: http::Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    use wrenn_http::client::{BodyError, describe, read_bounded};
    let url = format!("http://{address}{path}");
    let mut request = control_client()
        .request(method, &url)
        .timeout(timeout)
        .header("connection", "close");
    if let Some(token) = token {
        request = request.header("x-access-token", token);
    }
    if let Some(body) = &body {
        request = request.json(body);
    }
    let no_answer = |error: wrenn_http::client::reqwest::Error| {
        if error.is_timeout() {
            format!("no answer within {timeout:?}")
        } else {
            describe(&error)
        }
    };
    let response = request.send().await.map_err(no_answer)?;
    let status = response.status().as_u16();
    let body = read_bounded(response, MAX_CONTROL_ANSWER)
        .await
        .map_err(|error| match error {
            BodyError::TooLarge { .. } => format!(
                "the answer is larger than {} KiB",
                MAX_CONTROL_ANSWER / 1024
            ),
            BodyError::Broken(error) => no_answer(error),
        })?;
    Ok((status, body.to_vec()))
}

/// The client of every control call: it keeps no connection once a call ends.
fn control_client() -> &'static wrenn_http::client::reqwest::Client {
    static CLIENT: std::sync::OnceLock<wrenn_http::client::reqwest::Client> =
        std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        wrenn_http::client::client(wrenn_http::client::ClientOptions {
            connect_timeout: None,
            keep_idle: false,
            http2_prior_knowledge: false,
        })
    })
}

/// Waits until envd answers `/health`, giving up early if `alive` says the VM is gone.
pub async fn wait_ready(
    address: SocketAddr,
    within: Duration,
    alive: impl Fn() -> bool,
) -> Result<Duration, AgentError> {
    let started = Instant::now();
    let mut last = String::from("no attempt");
    while started.elapsed() < within {
        if !alive() {
            return Err(AgentError::Internal(format!(
                "the VM exited before envd answered (last attempt: {last})"
            )));
        }
        match get(address, "/health", Duration::from_secs(2)).await {
            Ok((status, _)) if (200..300).contains(&status) => return Ok(started.elapsed()),
            Ok((status, body)) => last = format!("HTTP {status}: {body}"),
            Err(error) => last = error,
        }
        tokio::time::sleep(Duration::from_millis(
            if started.elapsed() < Duration::from_secs(2) {
                5
            } else {
                100
            },
        ))
        .await;
    }
    Err(AgentError::DeadlineExceeded(format!(
        "envd at {address} did not answer within {within:?} (last attempt: {last})"
    )))
}

/// Waits until the guest accepts a connection on envd's port, giving up early if `alive` says
/// the VM is gone. After a restore envd listens already (it did when the snapshot was taken):
/// the first connection's handshake waits in the tap until the guest runs and completes the
/// moment its network does, the guest's own answer rather than a poll. An attempt refused or
/// unanswered for a second (a guest not there yet, a packet lost) is made again. Returns the
/// accepted connection, on which `/init` goes out at once ([`init_on`]).
pub async fn wait_accepting(
    address: SocketAddr,
    within: Duration,
    alive: impl Fn() -> bool,
) -> Result<tokio::net::TcpStream, AgentError> {
    let started = Instant::now();
    let mut last = String::from("no attempt");
    while started.elapsed() < within {
        if !alive() {
            return Err(AgentError::Internal(format!(
                "the VM exited before envd answered (last attempt: {last})"
            )));
        }
        let attempt = within
            .saturating_sub(started.elapsed())
            .min(Duration::from_secs(1));
        match tokio::time::timeout(attempt, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(connection)) => {
                // `/init` follows on it: its request must not wait on an acknowledgement.
                let _ = connection.set_nodelay(true);
                return Ok(connection);
            }
            Ok(Err(error)) => {
                last = error.to_string();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => last = format!("no answer within {attempt:?}"),
        }
    }
    Err(AgentError::DeadlineExceeded(format!(
        "envd at {address} did not answer within {within:?} (last attempt: {last})"
    )))
}

/// `POST /init`.
pub async fn init(address: SocketAddr, body: Value, timeout: Duration) -> Result<(), AgentError> {
    control_post(address, "/init", Some(body), None, timeout).await
}

/// `POST /init` on `connection`, which envd has just accepted (a restore's readiness,
/// [`wait_accepting`]): the guest, whose every path runs for the first time after a restore,
/// does not set up a second connection first. The connection is closed after the answer, which
/// is read as [`init`]'s is (within `timeout`, up to [`MAX_CONTROL_ANSWER`] bytes).
pub async fn init_on(
    connection: tokio::net::TcpStream,
    address: SocketAddr,
    body: Value,
    timeout: Duration,
) -> Result<(), AgentError> {
    use http_body_util::BodyExt;
    let exchange = async {
        let (mut sender, driver) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(connection))
                .await
                .map_err(|error| error.to_string())?;
        // The connection's own task, ended with this call whatever happens.
        let driver = AbortOnDrop(tokio::spawn(driver));
        let request = http::Request::post("/init")
            .header(http::header::HOST, address.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONNECTION, "close")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .map_err(|error| error.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let text = http_body_util::Limited::new(response.into_body(), MAX_CONTROL_ANSWER)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    format!(
                        "the answer is larger than {} KiB",
                        MAX_CONTROL_ANSWER / 1024
                    )
                } else {
                    error.to_string()
                }
            })?
            .to_bytes();
        drop(driver);
        Ok::<_, String>((status, guest_text(&text)))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, _))) if (200..300).contains(&status) => Ok(()),
        Ok(Ok((status, text))) => Err(AgentError::Internal(format!(
            "envd refused /init: HTTP {status}: {text}"
        ))),
        Ok(Err(error)) => Err(AgentError::DeadlineExceeded(format!(
            "envd's /init: {error}"
        ))),
        Err(_) => Err(AgentError::DeadlineExceeded(format!(
            "envd's /init: no answer within {timeout:?}"
        ))),
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes `bytes` to `path` in the guest as root (envd's raw `POST /files`), within
/// `timeout`.
pub async fn upload_as_root(
    address: SocketAddr,
    path: &str,
    bytes: Vec<u8>,
    timeout: Duration,
) -> Result<(), AgentError> {
    let url = format!("http://{address}/files");
    let sent = control_client()
        .post(&url)
        .query(&[("path", path), ("username", "root")])
        .timeout(timeout)
        .header("connection", "close")
        .header("content-type", "application/octet-stream")
        .body(bytes)
        .send()
        .await
        .map_err(|error| {
            AgentError::FailedPrecondition(format!(
                "uploading {path} to the guest: {}",
                wrenn_http::client::describe(&error)
            ))
        })?;
    let status = sent.status();
    if status.is_success() {
        return Ok(());
    }
    let body = wrenn_http::client::read_bounded(sent, MAX_CONTROL_ANSWER)
        .await
        .unwrap_or_default();
    Err(AgentError::FailedPrecondition(format!(
        "envd refused the upload of {path}: HTTP {status}: {}",
        guest_text(&body)
    )))
}

/// `POST /snapshot/prepare`: envd stops its scanners and idle connections and freezes the
/// sandbox's processes.
pub async fn prepare_snapshot(
    address: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(), AgentError> {
    control_post(address, "/snapshot/prepare", None, token, timeout).await
}

/// `POST /snapshot/prepare` before a stop that keeps no memory: envd also writes every dirty
/// page to the disks once the processes are frozen.
pub async fn prepare_disk_only(
    address: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(), AgentError> {
    let body = serde_json::json!({ "syncDisks": true });
    control_post(address, "/snapshot/prepare", Some(body), token, timeout).await
}

/// `POST /snapshot/continue`: the prepared VM goes on running (a checkpoint was taken of it):
/// envd thaws the sandbox's processes and keeps its connections.
pub async fn continue_after_snapshot(
    address: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(), AgentError> {
    control_post(address, "/snapshot/continue", None, token, timeout).await
}

/// A control `POST` that must be answered with a 2xx: a refusal is an internal error, no
/// answer a deadline exceeded.
async fn control_post(
    address: SocketAddr,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(), AgentError> {
    match call(address, http::Method::POST, path, body, token, timeout).await {
        Ok((status, _)) if (200..300).contains(&status) => Ok(()),
        Ok((status, text)) => Err(AgentError::Internal(format!(
            "envd refused {path}: HTTP {status}: {text}"
        ))),
        Err(error) => Err(AgentError::DeadlineExceeded(format!(
            "envd's {path}: {error}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A "guest" whose envd answers every request with headers, then body bytes without end.
    async fn endless_envd(chunked: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    let head: &[u8] = if chunked {
                        b"HTTP/1.1 500 Oops\r\ntransfer-encoding: chunked\r\n\r\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n"
                    };
                    if stream.write_all(head).await.is_err() {
                        return;
                    }
                    let block = vec![b'\x1b'; 64 * 1024];
                    loop {
                        let written = if chunked {
                            let mut chunk = format!("{:x}\r\n", block.len()).into_bytes();
                            chunk.extend_from_slice(&block);
                            chunk.extend_from_slice(b"\r\n");
                            stream.write_all(&chunk).await
                        } else {
                            stream.write_all(&block).await
                        };
                        if written.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap();
        kib * 1024
    }

    #[tokio::test]
    async fn endless_answers_fail_at_the_cap_and_memory_stays_flat() {
        let before = rss_bytes();
        for chunked in [false, true] {
            let address = endless_envd(chunked).await;
            let started = Instant::now();
            let error = get(address, "/metrics", Duration::from_secs(20))
                .await
                .unwrap_err();
            assert!(error.contains("larger than 64 KiB"), "{error}");
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "cut at the cap, not the deadline"
            );
            let init = init(address, serde_json::json!({}), Duration::from_secs(20))
                .await
                .unwrap_err();
            assert!(init.to_string().contains("larger than 64 KiB"), "{init}");
            let prepare = prepare_snapshot(address, None, Duration::from_secs(20))
                .await
                .unwrap_err();
            assert!(
                prepare.to_string().contains("larger than 64 KiB"),
                "{prepare}"
            );
            // /health never succeeds either; the wait gives up with the cap as its reason.
            let health = wait_ready(address, Duration::from_millis(600), || true)
                .await
                .unwrap_err();
            assert!(
                health.to_string().contains("larger than 64 KiB"),
                "{health}"
            );
        }
        // Uncapped, any one of those calls would have buffered the stream until its deadline.
        let grown = rss_bytes().saturating_sub(before);
        assert!(grown < 32 << 20, "the agent's memory grew by {grown} bytes");
    }

    #[tokio::test]
    async fn readiness_is_the_first_accepted_connection_and_a_dead_vm_ends_the_wait() {
        // A port nothing listens on yet: refused, tried again, accepted once it listens.
        let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = reserved.local_addr().unwrap();
        drop(reserved);
        let opened = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = tokio::net::TcpListener::bind(address).await.unwrap();
            let (mut accepted, _) = listener.accept().await.unwrap();
            // The connection it returns is the one accepted: `/init` goes out on it.
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !String::from_utf8_lossy(&request).contains("\"ok\":true") {
                let read = accepted.read(&mut chunk).await.unwrap();
                assert!(read > 0, "closed before the body");
                request.extend_from_slice(&chunk[..read]);
            }
            accepted
                .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(request).unwrap()
        });
        let started = Instant::now();
        let connection = wait_accepting(address, Duration::from_secs(10), || true)
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        init_on(
            connection,
            address,
            serde_json::json!({"ok": true}),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let request = opened.await.unwrap();
        assert!(request.starts_with("POST /init HTTP/1.1\r\n"), "{request}");
        // Nothing listens and the VM is gone: the wait ends with that reason.
        let error = wait_accepting(address, Duration::from_secs(10), || false)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("the VM exited"), "{error}");
        let error = wait_accepting(address, Duration::from_millis(200), || true)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("did not answer within"),
            "{error}"
        );
    }

    #[test]
    fn guest_text_is_short_and_escaped() {
        assert_eq!(guest_text(b"  plain  "), "plain");
        let forged = guest_text(b"oops\n2026-01-01 INFO forged line\x1b[31m");
        assert!(
            !forged.contains('\n') && !forged.contains('\x1b'),
            "{forged}"
        );
        assert!(
            forged.contains("\\n") && forged.contains("\\u{1b}"),
            "{forged}"
        );
        let long = guest_text(&[b'a'; 10_000]);
        assert_eq!(long, format!("{}…", "a".repeat(200)));
    }
}
