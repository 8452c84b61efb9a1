//! A small Connect client for unary and server-streaming calls, over HTTP/1.1 or HTTP/2 with
//! prior knowledge (h2c), on wrenn's one HTTP client (`wrenn_http::client`). The control plane
//! calls agents with it; the CLI, tests and benchmarks call envd and agents.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use wrenn_http::client::{BodyError, ClientOptions, describe, read_bounded, reqwest};

use crate::envelope::{self, EnvelopeDecoder};
use crate::{Code, Codec, ConnectError, DEFAULT_MAX_MESSAGE_BYTES, Message};

/// Which HTTP version the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2 over plaintext TCP, without upgrade (prior knowledge).
    Http2,
}

/// A client bound to one base URL (`http://host:port`, or `https://` with [`ConnectClient::with_tls`]).
#[derive(Debug, Clone)]
pub struct ConnectClient {
    base_url: String,
    version: HttpVersion,
    codec: Codec,
    headers: HeaderMap,
    http: reqwest::Client,
    connect_timeout: Option<Duration>,
    tls: Option<rustls::ClientConfig>,
}

fn http_client(
    version: HttpVersion,
    connect_timeout: Option<Duration>,
    tls: Option<&rustls::ClientConfig>,
) -> Result<reqwest::Client, ConnectError> {
    let options = ClientOptions {
        connect_timeout,
        keep_idle: true,
        http2_prior_knowledge: version == HttpVersion::Http2 && tls.is_none(),
    };
    match tls {
        None => Ok(wrenn_http::client::client(options)),
        Some(tls) => wrenn_http::client::tls_client(options, tls.clone())
            .map_err(|error| ConnectError::new(Code::Internal, format!("the TLS client: {error}"))),
    }
}

impl ConnectClient {
    pub fn new(base_url: impl Into<String>, version: HttpVersion, codec: Codec) -> Self {
        ConnectClient {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            version,
            codec,
            headers: HeaderMap::new(),
            http: wrenn_http::client::client(ClientOptions {
                connect_timeout: None,
                keep_idle: true,
                http2_prior_knowledge: version == HttpVersion::Http2,
            }),
            connect_timeout: None,
            tls: None,
        }
    }

    /// The same client, giving up on a connection not made within `timeout` (without it, the
    /// operating system's own connect timeout applies: minutes).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self.http = http_client(self.version, self.connect_timeout, self.tls.as_ref())
            .expect("the client built before with these TLS settings");
        self
    }

    /// The same client over HTTPS alone, with these TLS settings (the HTTP version is the one
    /// their ALPN offers).
    pub fn with_tls(mut self, tls: rustls::ClientConfig) -> Result<Self, ConnectError> {
        self.http = http_client(self.version, self.connect_timeout, Some(&tls))?;
        self.tls = Some(tls);
        Ok(self)
    }

    /// Adds a header sent with every call (e.g. `X-Access-Token`).
    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("header values given by callers are valid"),
        );
        self
    }

    /// Calls the unary RPC `M` (e.g. `wrenn_proto::agent::host_agent::HostInfo`).
    pub async fn call<M>(
        &self,
        request: &M::Request,
        extra_headers: &HeaderMap,
    ) -> Result<M::Response, ConnectError>
    where
        M: wrenn_proto::Rpc,
        M::Request: Message,
        M::Response: Message,
    {
        debug_assert!(
            !M::CLIENT_STREAMING && !M::SERVER_STREAMING,
            "{} streams",
            M::PATH
        );
        self.unary(M::PATH, request, extra_headers).await
    }

    /// Calls the server-streaming RPC `M` (e.g. `wrenn_proto::process::process::Start`).
    pub async fn call_streaming<M>(
        &self,
        request: &M::Request,
        extra_headers: &HeaderMap,
    ) -> Result<ResponseStream<M::Response>, ConnectError>
    where
        M: wrenn_proto::Rpc,
        M::Request: Message,
        M::Response: Message,
    {
        debug_assert!(
            M::SERVER_STREAMING && !M::CLIENT_STREAMING,
            "{} is not server-streaming",
            M::PATH
        );
        self.server_stream(M::PATH, request, extra_headers).await
    }

    /// Calls a unary RPC at `path` (`/package.Service/Method`).
    pub async fn unary<Req: Message, Resp: Message>(
        &self,
        path: &str,
        request: &Req,
        extra_headers: &HeaderMap,
    ) -> Result<Resp, ConnectError> {
        let body = Bytes::from(self.codec.encode(request));
        let response = self
            .send(path, self.codec.unary_content_type(), body, extra_headers)
            .await?;
        let status = response.status();
        let bytes = collect(response).await?;
        if !status.is_success() {
            return Err(ConnectError::from_json(&bytes).unwrap_or_else(|| {
                ConnectError::new(
                    Code::from_http_status(status.as_u16()),
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                )
            }));
        }
        Ok(self.codec.decode(&bytes)?)
    }

    /// Calls a server-streaming RPC; the messages are read from the returned stream.
    pub async fn server_stream<Req: Message, Resp: Message>(
        &self,
        path: &str,
        request: &Req,
        extra_headers: &HeaderMap,
    ) -> Result<ResponseStream<Resp>, ConnectError> {
        let body = envelope::encode(0, &self.codec.encode(request));
        let response = self
            .send(
                path,
                self.codec.streaming_content_type(),
                body,
                extra_headers,
            )
            .await?;
        let status = response.status();
        if !status.is_success() {
            let bytes = collect(response).await?;
            return Err(ConnectError::from_json(&bytes).unwrap_or_else(|| {
                ConnectError::new(
                    Code::from_http_status(status.as_u16()),
                    format!("HTTP {status}"),
                )
            }));
        }
        Ok(ResponseStream {
            codec: self.codec,
            body: response,
            decoder: EnvelopeDecoder::new(DEFAULT_MAX_MESSAGE_BYTES),
            finished: false,
            _message: std::marker::PhantomData,
        })
    }

    async fn send(
        &self,
        path: &str,
        content_type: &'static str,
        body: Bytes,
        extra_headers: &HeaderMap,
    ) -> Result<reqwest::Response, ConnectError> {
        let mut headers = self.headers.clone();
        for (name, value) in extra_headers {
            headers.insert(name.clone(), value.clone());
        }
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(
            HeaderName::from_static("connect-protocol-version"),
            HeaderValue::from_static("1"),
        );
        self.http
            .post(format!("{}{path}", self.base_url))
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|error| {
                ConnectError::new(
                    Code::Unavailable,
                    format!("request failed: {}", describe(&error)),
                )
            })
    }
}

/// A unary answer or an error answer, read whole up to the largest message.
async fn collect(response: reqwest::Response) -> Result<Bytes, ConnectError> {
    read_bounded(response, DEFAULT_MAX_MESSAGE_BYTES)
        .await
        .map_err(|error| match error {
            BodyError::TooLarge { .. } => {
                ConnectError::new(Code::ResourceExhausted, format!("response: {error}"))
            }
            BodyError::Broken(error) => ConnectError::new(
                Code::Unavailable,
                format!("reading response: {}", describe(&error)),
            ),
        })
}

/// The messages of a server-streaming response.
#[derive(Debug)]
pub struct ResponseStream<M> {
    codec: Codec,
    body: reqwest::Response,
    decoder: EnvelopeDecoder,
    finished: bool,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M: Message> ResponseStream<M> {
    /// The next message; `None` after a successful end-stream, `Some(Err)` for the stream's error
    /// (or a broken stream).
    pub async fn message(&mut self) -> Option<Result<M, ConnectError>> {
        loop {
            if self.finished {
                return None;
            }
            match self.decoder.next_envelope() {
                Err(error) => {
                    self.finished = true;
                    return Some(Err(crate::server::envelope_error(error)));
                }
                Ok(Some(envelope)) if envelope.is_end_stream() => {
                    self.finished = true;
                    return match ConnectError::parse_end_stream(&envelope.payload) {
                        Ok(None) => None,
                        Ok(Some(error)) | Err(error) => Some(Err(error)),
                    };
                }
                Ok(Some(envelope)) => {
                    return Some(self.codec.decode(&envelope.payload).map_err(Into::into));
                }
                Ok(None) => {}
            }
            match self.body.chunk().await {
                Ok(Some(data)) => self.decoder.push(&data),
                Err(error) => {
                    self.finished = true;
                    return Some(Err(ConnectError::new(
                        Code::Unavailable,
                        format!("stream broken: {}", describe(&error)),
                    )));
                }
                Ok(None) => {
                    self.finished = true;
                    return Some(Err(ConnectError::new(
                        Code::Internal,
                        "stream ended without an end-stream message",
                    )));
                }
            }
        }
    }
}
