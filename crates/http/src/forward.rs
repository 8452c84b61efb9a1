//! Streaming one request to an address (a guest's port) and the answer back, unbuffered both
//! ways: an HTTP/2 request (h2c) goes on over HTTP/2 with prior knowledge, anything else over
//! HTTP/1.1, with upgrades (WebSocket) spliced into a byte pipe. A forwarded exchange ends (its
//! body with an error, its upgraded pipe closed) when the token it was given is cancelled: the
//! host agent cancels a sandbox's when its VM stops, so a client streaming from a killed or
//! paused sandbox learns at once, as with E2B.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::{Request, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

/// How long a connection to a guest port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request could not be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardError {
    /// Nothing listens on the port (or it did not answer the handshake).
    PortClosed,
    /// The far side closed the connection before answering.
    Closed,
}

/// Streams `request` to `address` and returns the answer as it comes, until `ends` is
/// cancelled.
pub async fn forward(
    address: SocketAddr,
    request: Request<Body>,
    ends: CancellationToken,
) -> Result<Response, ForwardError> {
    forward_over(connect(address), address, request, ends).await
}

/// A TCP connection to `address` (no delay), within [`CONNECT_TIMEOUT`].
pub async fn connect(address: SocketAddr) -> Option<tokio::net::TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
        .await
        .ok()?
        .ok()?;
    let _ = stream.set_nodelay(true);
    Some(stream)
}

/// [`forward`] over the stream `connection` makes (none: the port is closed), a TCP
/// connection to `address` or a TLS session over one.
pub async fn forward_over<S>(
    connection: impl std::future::Future<Output = Option<S>>,
    address: SocketAddr,
    request: Request<Body>,
    ends: CancellationToken,
) -> Result<Response, ForwardError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let exchange = async {
        let Some(stream) = connection.await else {
            return Err(ForwardError::PortClosed);
        };
        forward_until(stream, address, request, ends.clone()).await
    };
    tokio::select! {
        answer = exchange => answer,
        () = ends.cancelled() => Err(ForwardError::Closed),
    }
}

async fn forward_until<S>(
    stream: S,
    address: SocketAddr,
    mut request: Request<Body>,
    ends: CancellationToken,
) -> Result<Response, ForwardError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if request.version() == http::Version::HTTP_2 {
        // HTTP/2 wants an absolute URI: the authority becomes the :authority pseudo-header.
        let authority = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| request.uri().authority().map(|a| a.to_string()))
            .unwrap_or_else(|| address.to_string());
        *request.uri_mut() = format!("http://{authority}{path}")
            .parse()
            .unwrap_or_default();
        request.headers_mut().remove(header::HOST);
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|_| ForwardError::PortClosed)?;
        tokio::spawn(ends.clone().run_until_cancelled_owned(connection));
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| ForwardError::Closed)?;
        return Ok(response.map(|body| Body::new(UntilEnded::new(body, ends))));
    }
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ForwardError::PortClosed)?;
    tokio::spawn(
        ends.clone()
            .run_until_cancelled_owned(connection.with_upgrades()),
    );
    let client_upgrade = request
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut request));
    *request.uri_mut() = path.parse().unwrap_or_default();
    let mut response = sender.send_request(request).await.map_err(|error| {
        tracing::debug!(%error, %address, "forwarded request failed");
        ForwardError::Closed
    })?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let server_upgrade = hyper::upgrade::on(&mut response);
        let pipe_ends = ends.clone();
        tokio::spawn(pipe_ends.run_until_cancelled_owned(async move {
            if let (Ok(client), Ok(server)) = (client_upgrade.await, server_upgrade.await) {
                let mut client = TokioIo::new(client);
                let mut server = TokioIo::new(server);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        }));
    }
    Ok(response.map(|body| Body::new(UntilEnded::new(body, ends))))
}

/// A forwarded answer's body, cut with an error when its token is cancelled: the server then
/// aborts the client's stream (an HTTP/2 reset, or an HTTP/1.1 connection closed before the
/// body's end), which the SDKs read as a connection lost mid-request.
struct UntilEnded<B> {
    body: B,
    ended: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    done: bool,
}

impl<B> UntilEnded<B> {
    fn new(body: B, ends: CancellationToken) -> Self {
        UntilEnded {
            body,
            ended: Box::pin(ends.cancelled_owned()),
            done: false,
        }
    }
}

impl<B> http_body::Body for UntilEnded<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if self.ended.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err("the sandbox stopped".into())));
        }
        std::pin::Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl ForwardError {
    /// E2B's text for this failure.
    pub fn message(self) -> &'static str {
        match self {
            ForwardError::PortClosed => "The sandbox is running but port is not open",
            ForwardError::Closed => "The sandbox closed the connection",
        }
    }
}
