//! The one HTTP client. Every call wrenn makes over HTTP (the CLI, benchmarks and tests to the REST
//! API, an agent's registration and heartbeats, Connect calls to agents and to envd, an agent's
//! control calls to envd) goes through a `reqwest::Client` built by [`client`], so connect
//! deadlines, proxies and pooling are decided here once, and answers are read with a bound
//! ([`read_bounded`]). Calls to the internet (an agent pulling images from registries) use
//! [`internet_client_builder`]: HTTPS checked against the host's trusted authorities.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

pub use reqwest;

/// How a client connects and whether it keeps connections.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Give up on a connection not made within this (the OS's own limit is minutes).
    pub connect_timeout: Option<Duration>,
    /// Keep idle connections for reuse. Off where a connection must not outlive its call: the
    /// agent's calls to envd (an idle connection across a snapshot is a zombie in every clone).
    pub keep_idle: bool,
    /// Speak HTTP/2 without upgrade (h2c, prior knowledge) instead of HTTP/1.1.
    pub http2_prior_knowledge: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Some(Duration::from_secs(10)),
            keep_idle: true,
            http2_prior_knowledge: false,
        }
    }
}

/// An idle pooled connection is closed after this.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A client with `options`. It ignores proxy settings in the environment: wrenn's calls go to
/// its own hosts and guests, never through a proxy meant for the internet.
pub fn client(options: ClientOptions) -> reqwest::Client {
    // Building fails only for TLS back-ends and resolvers, and this client configures neither.
    builder(options)
        .build()
        .expect("a plain-HTTP reqwest client always builds")
}

/// A client with `options` speaking HTTPS only as `tls` says (the fleet's mutual TLS: its
/// roots, its name check, the certificate it presents; ALPN as `tls` offers it).
pub fn tls_client(
    options: ClientOptions,
    tls: rustls::ClientConfig,
) -> Result<reqwest::Client, reqwest::Error> {
    builder(options)
        .https_only(true)
        .tls_backend_preconfigured(tls)
        .build()
}

fn builder(options: ClientOptions) -> reqwest::ClientBuilder {
    use_ring_for_tls();
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT);
    if let Some(timeout) = options.connect_timeout {
        builder = builder.connect_timeout(timeout);
    }
    if !options.keep_idle {
        builder = builder.pool_max_idle_per_host(0);
    }
    if options.http2_prior_knowledge {
        builder = builder.http2_prior_knowledge();
    }
    builder
}

/// A client builder for calls to the internet: HTTPS verified against the host's trusted
/// authorities (the system's store, as `ca-certificates` keeps it), no environment proxies, a
/// connect deadline; the caller adds its resolver and redirect policy.
pub fn internet_client_builder() -> reqwest::ClientBuilder {
    use_ring_for_tls();
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(15))
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tls_backend_rustls()
}

/// Makes _ring_ the process's TLS crypto provider (the one wrenn builds rustls with), once:
/// reqwest takes it from there.
pub fn use_ring_for_tls() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Another provider installed first (a test's, say) serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Why an answer's body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the answer broke off: {0}")]
    Broken(#[source] reqwest::Error),
}

/// Reads `response`'s body whole, refusing one longer than `limit` bytes as soon as it is (a
/// peer cannot make the reader hold more than `limit`).
pub async fn read_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Broken)? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// What a failed call's error says, with its causes: reqwest's own message is often only
/// "error sending request".
pub fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every connection with `answer`.
    async fn serve_once(answer: &'static [u8]) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(answer).await;
            }
        });
        address
    }

    /// Reads the body of `answer`, served once, with a bound of `limit`.
    async fn read_answer(answer: &'static [u8], limit: usize) -> Result<Bytes, BodyError> {
        let address = serve_once(answer).await;
        let response = client(ClientOptions::default())
            .get(format!("http://{address}/"))
            .send()
            .await
            .unwrap();
        read_bounded(response, limit).await
    }

    #[tokio::test]
    async fn a_body_within_the_bound_is_read_whole() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";
        assert_eq!(&read_answer(answer, 5).await.unwrap()[..], b"hello");
    }

    #[tokio::test]
    async fn a_body_over_the_bound_is_refused_declared_or_not() {
        let declared = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello!";
        assert!(matches!(
            read_answer(declared, 5).await,
            Err(BodyError::TooLarge { limit: 5 })
        ));
        // No length given: the body ends when the connection closes.
        let undeclared = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello, world";
        assert!(matches!(
            read_answer(undeclared, 5).await,
            Err(BodyError::TooLarge { limit: 5 })
        ));
    }
}
