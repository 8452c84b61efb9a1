//! The server side of the protocol: reading a request's codec, deadline and message, and building
//! unary and streaming responses. Routing and handlers belong to the caller.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};

use crate::envelope::{self, EnvelopeDecoder, FLAG_END_STREAM};
use crate::{Code, Codec, ConnectError, Message};

/// The body of every response built here.
pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// The header that carries the client's deadline in milliseconds.
pub const TIMEOUT_HEADER: &str = "connect-timeout-ms";

/// The codec of a unary request, or the 415 response to send back.
pub fn unary_codec(headers: &HeaderMap) -> Result<Codec, Box<Response<ResponseBody>>> {
    content_type(headers)
        .and_then(Codec::from_unary_content_type)
        .ok_or_else(|| {
            Box::new(unsupported_media_type(
                "application/json, application/proto",
            ))
        })
}

/// The codec of a streaming request, or the 415 response to send back.
pub fn streaming_codec(headers: &HeaderMap) -> Result<Codec, Box<Response<ResponseBody>>> {
    content_type(headers)
        .and_then(Codec::from_streaming_content_type)
        .ok_or_else(|| {
            Box::new(unsupported_media_type(
                "application/connect+json, application/connect+proto",
            ))
        })
}

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::CONTENT_TYPE)?.to_str().ok()
}

fn unsupported_media_type(accepted: &'static str) -> Response<ResponseBody> {
    Response::builder()
        .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        .header("accept-post", accepted)
        .body(full(Bytes::new()))
        .expect("static response parts are valid")
}

/// The `Connect-Timeout-Ms` deadline: at most 10 ASCII digits, as the protocol says.
pub fn timeout(headers: &HeaderMap) -> Result<Option<Duration>, ConnectError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let invalid =
        || ConnectError::invalid_argument(format!("invalid {TIMEOUT_HEADER} header {value:?}"));
    let text = value.to_str().map_err(|_| invalid())?;
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let millis: u64 = text.parse().map_err(|_| invalid())?;
    Ok(Some(Duration::from_millis(millis)))
}

/// Refuses request compression, which wrenn never negotiates.
pub fn check_no_compression(headers: &HeaderMap, streaming: bool) -> Result<(), ConnectError> {
    let name = if streaming {
        "connect-content-encoding"
    } else {
        "content-encoding"
    };
    match headers.get(name).map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(()),
        Some(other) => Err(ConnectError::new(
            Code::Unimplemented,
            format!(
                "unsupported compression {:?}: only identity is accepted",
                String::from_utf8_lossy(other)
            ),
        )),
    }
}

/// Decodes a unary request body of at most `max_bytes`.
pub fn decode_unary<M: Message>(
    codec: Codec,
    body: &[u8],
    max_bytes: usize,
) -> Result<M, ConnectError> {
    if body.len() > max_bytes {
        return Err(ConnectError::new(
            Code::ResourceExhausted,
            format!(
                "message of {} bytes exceeds the limit of {max_bytes} bytes",
                body.len()
            ),
        ));
    }
    Ok(codec.decode(body)?)
}

/// Decodes the single enveloped message of a server-streaming request.
pub fn decode_single_envelope<M: Message>(
    codec: Codec,
    body: &[u8],
    max_bytes: usize,
) -> Result<M, ConnectError> {
    let mut decoder = EnvelopeDecoder::new(max_bytes);
    decoder.push(body);
    let envelope = decoder
        .next_envelope()
        .map_err(envelope_error)?
        .ok_or_else(|| ConnectError::invalid_argument("request body holds no complete envelope"))?;
    if envelope.is_end_stream() {
        return Err(ConnectError::invalid_argument(
            "request envelope is marked end-stream",
        ));
    }
    if decoder.next_envelope().map_err(envelope_error)?.is_some() {
        return Err(ConnectError::invalid_argument(
            "server-streaming request holds more than one message",
        ));
    }
    decoder.finish().map_err(envelope_error)?;
    Ok(codec.decode(&envelope.payload)?)
}

/// Maps an envelope parse failure to its Connect error.
pub fn envelope_error(error: envelope::EnvelopeError) -> ConnectError {
    let code = match error {
        envelope::EnvelopeError::TooLarge { .. } => Code::ResourceExhausted,
        envelope::EnvelopeError::Compressed => Code::Unimplemented,
        _ => Code::InvalidArgument,
    };
    ConnectError::new(code, error.to_string())
}

/// Reads a request body of at most `max_bytes` (plus `slack`, e.g. an envelope's prefix around a
/// message of the limit): ResourceExhausted past it, Canceled when the client's body fails.
pub async fn read_body<B>(body: B, max_bytes: usize, slack: usize) -> Result<Bytes, ConnectError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match http_body_util::Limited::new(body, max_bytes + slack)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("request body exceeds the limit of {max_bytes} bytes"),
        )),
        Err(error) => Err(ConnectError::new(
            Code::Canceled,
            format!("reading the request failed: {error}"),
        )),
    }
}

/// Serves one unary call whole: the codec from the headers (415 for another content type), the
/// body read up to `max_bytes` and decoded, then `handler`'s answer or error encoded. Checks
/// that come before decoding (a bearer token, a deadline) are the caller's.
pub async fn serve_unary<Req, Resp, B, Fut>(
    headers: &HeaderMap,
    body: B,
    max_bytes: usize,
    handler: impl FnOnce(Req) -> Fut,
) -> Response<ResponseBody>
where
    Req: Message,
    Resp: Message,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Resp, ConnectError>>,
{
    let codec = match unary_codec(headers) {
        Ok(codec) => codec,
        Err(response) => return *response,
    };
    let answer = async {
        let bytes = read_body(body, max_bytes, 0).await?;
        let request: Req = decode_unary(codec, &bytes, max_bytes)?;
        handler(request).await
    }
    .await;
    match answer {
        Ok(response) => unary_response(codec, &response),
        Err(error) => unary_error(&error),
    }
}

/// Serves one server-streaming call: the codec from the headers (415 for another content
/// type), the body read up to `max_bytes` and its one enveloped message decoded, then
/// `handler`'s stream sent, or its error as the stream's end. Checks that come before decoding
/// (a bearer token) are the caller's.
pub async fn serve_server_streaming<Req, Resp, B, Fut, S>(
    headers: &HeaderMap,
    body: B,
    max_bytes: usize,
    handler: impl FnOnce(Req) -> Fut,
) -> Response<ResponseBody>
where
    Req: Message,
    Resp: Message,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<S, ConnectError>>,
    S: Stream<Item = Result<Resp, ConnectError>> + Send + 'static,
{
    let codec = match streaming_codec(headers) {
        Ok(codec) => codec,
        Err(response) => return *response,
    };
    let answer = async {
        let bytes = read_body(body, max_bytes, envelope::PREFIX_LEN).await?;
        let request: Req = decode_single_envelope(codec, &bytes, max_bytes)?;
        handler(request).await
    }
    .await;
    match answer {
        Ok(messages) => streaming_response(codec, messages),
        Err(error) => streaming_error(codec, &error),
    }
}

/// A successful unary response.
pub fn unary_response<M: Message>(codec: Codec, message: &M) -> Response<ResponseBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, codec.unary_content_type())
        .body(full(Bytes::from(codec.encode(message))))
        .expect("static response parts are valid")
}

/// A failed unary response: the code's HTTP status and the JSON error body.
pub fn unary_error(error: &ConnectError) -> Response<ResponseBody> {
    Response::builder()
        .status(error.code.http_status())
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(error.to_json())))
        .expect("static response parts are valid")
}

/// A streaming response: an envelope per message, then the end-stream message, which carries the
/// error if the stream yields one (nothing after an error is sent).
pub fn streaming_response<M, S>(codec: Codec, messages: S) -> Response<ResponseBody>
where
    M: Message,
    S: Stream<Item = Result<M, ConnectError>> + Send + 'static,
{
    let frames = futures_util::stream::unfold(Some(Box::pin(messages)), move |state| async move {
        let mut messages = state?;
        match messages.next().await {
            Some(Ok(message)) => {
                let frame = envelope::encode(0, &codec.encode(&message));
                Some((Ok::<_, Infallible>(Frame::data(frame)), Some(messages)))
            }
            Some(Err(error)) => Some((Ok(Frame::data(end_stream(Some(&error)))), None)),
            None => Some((Ok(Frame::data(end_stream(None))), None)),
        }
    });
    streaming_response_from_frames(codec, frames)
}

/// A streaming response that fails at once (streaming errors travel with HTTP 200).
pub fn streaming_error(codec: Codec, error: &ConnectError) -> Response<ResponseBody> {
    let frame = end_stream(Some(error));
    streaming_response_from_frames(
        codec,
        futures_util::stream::once(async move { Ok::<_, Infallible>(Frame::data(frame)) }),
    )
}

fn streaming_response_from_frames<S>(codec: Codec, frames: S) -> Response<ResponseBody>
where
    S: Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static,
{
    Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static(codec.streaming_content_type()),
        )
        .body(UnsyncBoxBody::new(StreamBody::new(frames)))
        .expect("static response parts are valid")
}

fn end_stream(error: Option<&ConnectError>) -> Bytes {
    envelope::encode(FLAG_END_STREAM, &ConnectError::end_stream_json(error))
}

fn full(bytes: Bytes) -> ResponseBody {
    UnsyncBoxBody::new(Full::new(bytes).map_err(|never| match never {}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_proto::filesystem::StatRequest;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn timeout_header_parsing() {
        assert_eq!(timeout(&headers(&[])).unwrap(), None);
        assert_eq!(
            timeout(&headers(&[(TIMEOUT_HEADER, "1500")])).unwrap(),
            Some(Duration::from_millis(1500))
        );
        for bad in ["", "-1", "1.5", "12345678901", "abc"] {
            let mut map = HeaderMap::new();
            map.insert(TIMEOUT_HEADER, HeaderValue::from_str(bad).unwrap());
            assert_eq!(
                timeout(&map).unwrap_err().code,
                Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn single_envelope_requests() {
        let payload = Codec::Json.encode(&StatRequest {
            path: "/tmp".into(),
        });
        let body = envelope::encode(0, &payload);
        let request: StatRequest = decode_single_envelope(Codec::Json, &body, 1024).unwrap();
        assert_eq!(request.path, "/tmp");

        let mut two = body.to_vec();
        two.extend_from_slice(&body);
        assert!(decode_single_envelope::<StatRequest>(Codec::Json, &two, 1024).is_err());
        assert!(decode_single_envelope::<StatRequest>(Codec::Json, &body[..4], 1024).is_err());
        assert_eq!(
            decode_single_envelope::<StatRequest>(Codec::Json, &body, 2)
                .unwrap_err()
                .code,
            Code::ResourceExhausted
        );
    }

    #[test]
    fn compression_is_refused() {
        assert!(check_no_compression(&headers(&[("content-encoding", "identity")]), false).is_ok());
        assert_eq!(
            check_no_compression(&headers(&[("connect-content-encoding", "gzip")]), true)
                .unwrap_err()
                .code,
            Code::Unimplemented
        );
    }
}
