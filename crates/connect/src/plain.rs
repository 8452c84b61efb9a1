//! Plain HTTP/1.1 calls that are not Connect RPCs: JSON APIs (the control plane's REST API, a host
//! agent's registration and heartbeats) and health checks. One call, one connection, a deadline
//! over the whole exchange, and the body read whole up to a bound.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

/// Why a plain call failed before an answer came.
#[derive(Debug, thiserror::Error)]
pub enum PlainError {
    #[error("invalid URL {0:?}: use http://host:port/path")]
    InvalidUrl(String),
    #[error("cannot reach {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} did not answer within {seconds} s")]
    Timeout { url: String, seconds: u64 },
    #[error("the answer of {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
}

/// An answer: status and whole body.
#[derive(Debug, Clone)]
pub struct PlainResponse {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl PlainResponse {
    /// The body as text (lossy), for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The largest answer read: 16 MiB.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Sends one request to `url` (`http://host:port/path?query`) and reads the answer.
pub async fn call(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
    timeout: Duration,
) -> Result<PlainResponse, PlainError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| PlainError::InvalidUrl(url.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(PlainError::InvalidUrl(url.to_string()));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| PlainError::InvalidUrl(url.to_string()))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority.as_str());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(body.into()))
        .map_err(|_| PlainError::InvalidUrl(url.to_string()))?;
    let unreachable = |message: String| PlainError::Unreachable {
        url: url.to_string(),
        message,
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<http_body_util::LengthLimitError>() {
                    PlainError::TooLarge {
                        url: url.to_string(),
                        limit: MAX_RESPONSE_BYTES,
                    }
                } else {
                    unreachable(error.to_string())
                }
            })?
            .to_bytes();
        Ok(PlainResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| PlainError::Timeout {
            url: url.to_string(),
            seconds: timeout.as_secs(),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_urls_it_cannot_call() {
        for bad in ["ftp://x/", "not a url", "https://example.com/"] {
            let error = call(Method::GET, bad, &[], Bytes::new(), Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(matches!(error, PlainError::InvalidUrl(_)), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn reads_a_whole_answer_and_reports_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = vec![0u8; 4096];
            let read = socket.read(&mut buffer).await.unwrap();
            let request = String::from_utf8_lossy(&buffer[..read]).to_string();
            assert!(request.starts_with("POST /x?y=1 HTTP/1.1"), "{request}");
            assert!(
                request.to_ascii_lowercase().contains("x-test: 1"),
                "{request}"
            );
            socket
                .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
        });
        let response = call(
            Method::POST,
            &format!("http://{address}/x?y=1"),
            &[("x-test", "1")],
            "{}",
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(response.status, StatusCode::CREATED);
        assert_eq!(response.text(), "hello");
        let closed = call(
            Method::GET,
            &format!("http://{address}/"),
            &[],
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(closed, PlainError::Unreachable { .. }), "{closed}");
    }
}
