//! envd's Connect services over axum: the routes `/process.Process/*` and
//! `/filesystem.Filesystem/*`, and the plumbing every call shares (codec negotiation, body
//! limits, the calling user, deadlines, keepalives). The services themselves parse requests and
//! delegate to `process` and `fs`.

pub mod filesystem;
pub mod process;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, post};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use http_body_util::BodyExt;
use wrenn_connect::{Code, Codec, ConnectError, Message, server};

use crate::auth;
use crate::state::Envd;
use crate::users::User;

/// The header a client sets to ask for keepalive messages on idle streams (seconds).
pub const KEEPALIVE_HEADER: &str = "keepalive-ping-interval";
/// The keepalive interval when the client asks for none (E2B's default).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// The Connect routes.
pub fn router() -> Router<Arc<Envd>> {
    use filesystem as fs;
    use process as p;
    use wrenn_proto::Rpc;
    use wrenn_proto::filesystem::filesystem as filesystem_rpc;
    use wrenn_proto::process::process as process_rpc;
    Router::new()
        .route(process_rpc::Start::PATH, streaming_rpc(p::start))
        .route(process_rpc::Connect::PATH, streaming_rpc(p::connect))
        .route(process_rpc::List::PATH, unary_rpc(p::list))
        .route(process_rpc::SendInput::PATH, unary_rpc(p::send_input))
        .route(process_rpc::StreamInput::PATH, post(p::stream_input))
        .route(process_rpc::Update::PATH, unary_rpc(p::update))
        .route(process_rpc::SendSignal::PATH, unary_rpc(p::send_signal))
        .route(process_rpc::CloseStdin::PATH, unary_rpc(p::close_stdin))
        .route(filesystem_rpc::Stat::PATH, unary_rpc(fs::stat))
        .route(filesystem_rpc::MakeDir::PATH, unary_rpc(fs::make_dir))
        .route(filesystem_rpc::Move::PATH, unary_rpc(fs::move_entry))
        .route(filesystem_rpc::ListDir::PATH, unary_rpc(fs::list_dir))
        .route(filesystem_rpc::Remove::PATH, unary_rpc(fs::remove))
        .route(filesystem_rpc::WatchDir::PATH, streaming_rpc(fs::watch_dir))
        .route(
            filesystem_rpc::CreateWatcher::PATH,
            unary_rpc(fs::create_watcher),
        )
        .route(
            filesystem_rpc::GetWatcherEvents::PATH,
            unary_rpc(fs::get_watcher_events),
        )
        .route(
            filesystem_rpc::RemoveWatcher::PATH,
            unary_rpc(fs::remove_watcher),
        )
}

/// The route of a unary RPC served by `handler`, within the client's deadline.
fn unary_rpc<Req, Resp, F, Fut>(handler: F) -> MethodRouter<Arc<Envd>>
where
    Req: Message,
    Resp: Message,
    F: Fn(Call<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, ConnectError>> + Send + 'static,
{
    let bounded = move |call: Call<Req>| {
        let deadline = call.context.deadline;
        let answer = handler(call);
        async move {
            match deadline {
                Some(deadline) => tokio::time::timeout(deadline, answer)
                    .await
                    .unwrap_or_else(|_| Err(deadline_passed())),
                None => answer.await,
            }
        }
    };
    rpc(false, bounded, |codec, result| match result {
        Ok(response) => server::unary_response(codec, &response),
        Err(error) => server::unary_error(&error),
    })
}

/// The route of a server-streaming RPC served by `handler`; a handler error becomes the
/// end-stream error.
fn streaming_rpc<Req, Resp, F, Fut, S>(handler: F) -> MethodRouter<Arc<Envd>>
where
    Req: Message,
    Resp: Message,
    F: Fn(Call<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<S, ConnectError>> + Send + 'static,
    S: Responses<Resp>,
{
    rpc(true, handler, |codec, result| match result {
        Ok(stream) => server::streaming_response(codec, stream),
        Err(error) => server::streaming_error(codec, &error),
    })
}

/// The route of an RPC whose request is one message (`streaming`: in an envelope, as a
/// server-streaming call sends it): negotiates the codec, receives the [`Call`], runs
/// `handler` on it and encodes its result with `respond`.
fn rpc<Req, Out, F, Fut>(
    streaming: bool,
    handler: F,
    respond: fn(Codec, Result<Out, ConnectError>) -> http::Response<server::ResponseBody>,
) -> MethodRouter<Arc<Envd>>
where
    Req: Message,
    Out: 'static,
    F: Fn(Call<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, ConnectError>> + Send + 'static,
{
    post(
        move |State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Body| {
            let handler = handler.clone();
            async move {
                let negotiated = if streaming {
                    server::streaming_codec(&headers)
                } else {
                    server::unary_codec(&headers)
                };
                let codec = match negotiated {
                    Ok(codec) => codec,
                    Err(response) => {
                        crate::http::drain_body(body).await;
                        return response.into_response();
                    }
                };
                let result = async {
                    let call = receive(envd, &headers, body, codec, streaming).await?;
                    handler(call).await
                }
                .await;
                respond(codec, result).into_response()
            }
        },
    )
}

/// What a handler knows about its call besides the message.
#[derive(Debug)]
pub struct CallContext {
    pub user: User,
    /// The client's deadline (`Connect-Timeout-Ms`).
    pub deadline: Option<Duration>,
    /// How long a stream may stay silent before a keepalive message is sent.
    pub keepalive: Duration,
}

/// One call as its handler sees it: envd, the decoded request message and its context.
#[derive(Debug)]
pub struct Call<Req> {
    pub envd: Arc<Envd>,
    pub request: Req,
    pub context: CallContext,
}

impl<Req> Call<Req> {
    /// Resolves a path the call names, for its user (see [`Envd::resolve_path`]).
    pub fn resolve(&self, path: &str) -> Result<std::path::PathBuf, ConnectError> {
        self.envd
            .resolve_path(path, &self.context.user)
            .map_err(|e| ConnectError::invalid_argument(e.to_string()))
    }
}

fn call_context(envd: &Envd, headers: &HeaderMap) -> Result<CallContext, ConnectError> {
    let requested = auth::basic_username(headers)
        .map_err(|e| ConnectError::new(Code::Unauthenticated, e.to_string()))?;
    let user = envd
        .user(requested.as_deref())
        .map_err(|e| ConnectError::new(Code::Unauthenticated, format!("invalid username: {e}")))?;
    let deadline = server::timeout(headers)?;
    // A missing, malformed or non-positive interval means the default (E2B's envd crashes on
    // zero; we don't).
    let keepalive = headers
        .get(KEEPALIVE_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .filter(|seconds| *seconds > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs);
    Ok(CallContext {
        user,
        deadline,
        keepalive,
    })
}

/// Reads a request body, with one envelope prefix of slack so that a streaming request of
/// exactly the limit passes.
async fn read_body(body: Body, max_bytes: usize) -> Result<Bytes, ConnectError> {
    server::read_body(body, max_bytes, wrenn_connect::envelope::PREFIX_LEN).await
}

/// The call whose one request message `body` holds (`streaming`: in an envelope). The body is
/// read before anything can refuse the call (see `http::drain_body`).
async fn receive<Req: Message>(
    envd: Arc<Envd>,
    headers: &HeaderMap,
    body: Body,
    codec: Codec,
    streaming: bool,
) -> Result<Call<Req>, ConnectError> {
    let body = read_body(body, envd.config.max_message_bytes).await?;
    server::check_no_compression(headers, streaming)?;
    let context = call_context(&envd, headers)?;
    let decode = if streaming {
        server::decode_single_envelope
    } else {
        server::decode_unary
    };
    let request = decode(codec, &body, envd.config.max_message_bytes)?;
    Ok(Call {
        envd,
        request,
        context,
    })
}

/// The error of a call or stream whose deadline passed.
fn deadline_passed() -> ConnectError {
    ConnectError::new(Code::DeadlineExceeded, "the call's deadline passed")
}

/// The responses of a server-streaming call, each a message or the error that ends them.
pub(crate) trait Responses<M>:
    Stream<Item = Result<M, ConnectError>> + Send + 'static
{
}

impl<M, S> Responses<M> for S where S: Stream<Item = Result<M, ConnectError>> + Send + 'static {}

/// Interleaves keepalive messages into a stream whenever it stays silent for `interval`.
pub(crate) fn with_keepalive<M, S, K>(
    stream: S,
    interval: Duration,
    keepalive: K,
) -> impl Responses<M>
where
    M: Send + 'static,
    S: Responses<M>,
    K: Fn() -> M + Send + Sync + Copy + 'static,
{
    futures_util::stream::unfold(Box::pin(stream), move |mut stream| async move {
        match tokio::time::timeout(interval, stream.next()).await {
            Ok(Some(item)) => Some((item, stream)),
            Ok(None) => None,
            Err(_silent) => Some((Ok(keepalive()), stream)),
        }
    })
}

/// Ends a stream with `deadline_exceeded` once `deadline` passes (if there is one).
pub(crate) fn with_deadline<M, S>(stream: S, deadline: Option<Duration>) -> impl Responses<M>
where
    M: Send + 'static,
    S: Responses<M>,
{
    let expiry = deadline.map(|d| tokio::time::Instant::now() + d);
    futures_util::stream::unfold(Some(Box::pin(stream)), move |state| async move {
        let mut stream = state?;
        let next = match expiry {
            Some(at) => match tokio::time::timeout_at(at, stream.next()).await {
                Ok(next) => next,
                Err(_) => return Some((Err(deadline_passed()), None)),
            },
            None => stream.next().await,
        };
        next.map(|item| (item, Some(stream)))
    })
}

/// The codec-independent decoding of a client-streaming body, one message at a time.
pub(crate) struct RequestStream {
    body: Body,
    decoder: wrenn_connect::envelope::EnvelopeDecoder,
    codec: Codec,
    done: bool,
}

impl RequestStream {
    pub(crate) fn new(body: Body, codec: Codec, max_bytes: usize) -> Self {
        RequestStream {
            body,
            decoder: wrenn_connect::envelope::EnvelopeDecoder::new(max_bytes),
            codec,
            done: false,
        }
    }

    /// The next message, `Ok(None)` at the end of the request.
    pub(crate) async fn message<M: Message>(&mut self) -> Result<Option<M>, ConnectError> {
        loop {
            if let Some(envelope) = self
                .decoder
                .next_envelope()
                .map_err(server::envelope_error)?
            {
                if envelope.is_end_stream() {
                    self.done = true;
                    return Ok(None);
                }
                return Ok(Some(self.codec.decode(&envelope.payload)?));
            }
            if self.done {
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(error)) => {
                    return Err(ConnectError::new(
                        Code::Canceled,
                        format!("reading the request failed: {error}"),
                    ));
                }
                None => {
                    self.decoder.finish().map_err(server::envelope_error)?;
                    self.done = true;
                    return Ok(None);
                }
            }
        }
    }
}
