//! The agent's calls to envd in a guest: `/health`, `/init`, `/snapshot/prepare`. Every call
//! opens its own connection and closes it, so the agent never holds an idle connection to envd
//! across a snapshot (it would be a zombie in every clone).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::error::AgentError;

/// One request on a fresh connection, within `timeout`.
async fn call(
    address: SocketAddr,
    method: http::Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{address}{path}"))
            .header("host", address.to_string())
            .header("connection", "close");
        if let Some(token) = token {
            request = request.header("x-access-token", token);
        }
        let bytes = match &body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(bytes)).map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        drop(sender);
        let _ = driver.await;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
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
        match call(
            address,
            http::Method::GET,
            "/health",
            None,
            None,
            Duration::from_secs(2),
        )
        .await
        {
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

/// `POST /init`.
pub async fn init(address: SocketAddr, body: Value, timeout: Duration) -> Result<(), AgentError> {
    match call(
        address,
        http::Method::POST,
        "/init",
        Some(body),
        None,
        timeout,
    )
    .await
    {
        Ok((status, _)) if (200..300).contains(&status) => Ok(()),
        Ok((status, text)) => Err(AgentError::Internal(format!(
            "envd refused /init: HTTP {status}: {}",
            text.trim()
        ))),
        Err(error) => Err(AgentError::DeadlineExceeded(format!(
            "envd's /init: {error}"
        ))),
    }
}

/// `POST /snapshot/prepare`: envd stops its scanners and idle connections and freezes the
/// sandbox's processes.
pub async fn prepare_snapshot(
    address: SocketAddr,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(), AgentError> {
    match call(
        address,
        http::Method::POST,
        "/snapshot/prepare",
        None,
        token,
        timeout,
    )
    .await
    {
        Ok((status, _)) if (200..300).contains(&status) => Ok(()),
        Ok((status, text)) => Err(AgentError::Internal(format!(
            "envd refused /snapshot/prepare: HTTP {status}: {}",
            text.trim()
        ))),
        Err(error) => Err(AgentError::DeadlineExceeded(format!(
            "envd's /snapshot/prepare: {error}"
        ))),
    }
}
