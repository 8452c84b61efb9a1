//! The two message codecs of the Connect protocol: proto3 JSON and binary protobuf, and how each
//! is named in `Content-Type` for unary and streaming calls.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Code, ConnectError};

/// What a Connect message must be: a protobuf message with proto3-JSON serde (as the generated
/// types of `wrenn-proto` are).
pub trait Message:
    prost::Message + Serialize + DeserializeOwned + Default + Send + 'static
{
}

impl<M> Message for M where
    M: prost::Message + Serialize + DeserializeOwned + Default + Send + 'static
{
}

/// A message codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The proto3 JSON mapping (what the `e2b` SDKs use).
    Json,
    /// Binary protobuf.
    Proto,
}

/// A message could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("invalid JSON message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid protobuf message: {0}")]
    Proto(#[from] prost::DecodeError),
}

impl From<CodecError> for ConnectError {
    fn from(error: CodecError) -> Self {
        ConnectError::new(Code::InvalidArgument, error.to_string())
    }
}

impl Codec {
    /// The codec of a unary call's `Content-Type` (`application/json`, `application/proto`),
    /// parameters such as `; charset=utf-8` ignored.
    pub fn from_unary_content_type(content_type: &str) -> Option<Codec> {
        match media_type(content_type).as_str() {
            "application/json" => Some(Codec::Json),
            "application/proto" | "application/protobuf" => Some(Codec::Proto),
            _ => None,
        }
    }

    /// The codec of a streaming call's `Content-Type` (`application/connect+json`, ...).
    pub fn from_streaming_content_type(content_type: &str) -> Option<Codec> {
        match media_type(content_type).as_str() {
            "application/connect+json" => Some(Codec::Json),
            "application/connect+proto" => Some(Codec::Proto),
            _ => None,
        }
    }

    pub fn unary_content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        }
    }

    pub fn streaming_content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/connect+json",
            Codec::Proto => "application/connect+proto",
        }
    }

    pub fn encode<M: Message>(self, message: &M) -> Vec<u8> {
        match self {
            Codec::Json => {
                serde_json::to_vec(message).expect("generated messages always serialize")
            }
            Codec::Proto => message.encode_to_vec(),
        }
    }

    /// Decodes a message; an empty body is the empty message in both codecs.
    pub fn decode<M: Message>(self, bytes: &[u8]) -> Result<M, CodecError> {
        if bytes.is_empty() {
            return Ok(M::default());
        }
        Ok(match self {
            Codec::Json => serde_json::from_slice(bytes)?,
            Codec::Proto => M::decode(bytes)?,
        })
    }
}

fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_proto::filesystem::{EntryInfo, FileType, ListDirRequest, WatchDirRequest};
    use wrenn_proto::process::{
        ProcessEvent, ProcessSelector, process_event, process_event::StartEvent, process_selector,
    };

    #[test]
    fn content_types() {
        assert_eq!(
            Codec::from_unary_content_type("application/json; charset=utf-8"),
            Some(Codec::Json)
        );
        assert_eq!(
            Codec::from_unary_content_type("Application/Proto"),
            Some(Codec::Proto)
        );
        assert_eq!(Codec::from_unary_content_type("text/plain"), None);
        assert_eq!(
            Codec::from_streaming_content_type("application/connect+json"),
            Some(Codec::Json)
        );
        assert_eq!(Codec::from_streaming_content_type("application/json"), None);
    }

    #[test]
    fn json_uses_proto3_mapping() {
        let entry = EntryInfo {
            name: "a.txt".into(),
            r#type: FileType::File as i32,
            size: 12,
            symlink_target: None,
            ..Default::default()
        };
        let json: serde_json::Value = serde_json::from_slice(&Codec::Json.encode(&entry)).unwrap();
        assert_eq!(json["type"], "FILE_TYPE_FILE");
        // int64 travels as a string
        assert_eq!(json["size"], "12");
        assert!(json.get("symlinkTarget").is_none());

        let event = ProcessEvent {
            event: Some(process_event::Event::Start(StartEvent { pid: 42 })),
        };
        assert_eq!(
            String::from_utf8(Codec::Json.encode(&event)).unwrap(),
            r#"{"start":{"pid":42}}"#
        );
    }

    #[test]
    fn json_accepts_snake_case_and_ignores_unknown_fields() {
        let camel: WatchDirRequest = Codec::Json
            .decode(br#"{"path":"/x","includeEntry":true,"future":1}"#)
            .unwrap();
        let snake: WatchDirRequest = Codec::Json
            .decode(br#"{"path":"/x","include_entry":true}"#)
            .unwrap();
        assert_eq!(camel, snake);
        assert!(camel.include_entry);
    }

    #[test]
    fn json_bytes_are_base64_and_oneofs_are_keys() {
        let selector: ProcessSelector = Codec::Json.decode(br#"{"tag":"web"}"#).unwrap();
        assert_eq!(
            selector.selector,
            Some(process_selector::Selector::Tag("web".into()))
        );
        let input: wrenn_proto::process::ProcessInput =
            Codec::Json.decode(br#"{"stdin":"aGkK"}"#).unwrap();
        assert_eq!(
            input.input,
            Some(wrenn_proto::process::process_input::Input::Stdin(
                b"hi\n".to_vec()
            ))
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(Codec::Json.decode::<ListDirRequest>(b"{").is_err());
        assert!(
            Codec::Json
                .decode::<ListDirRequest>(br#"{"depth":"many"}"#)
                .is_err()
        );
        assert!(
            Codec::Proto
                .decode::<ListDirRequest>(&[0x0a, 0x05, b'a'])
                .is_err()
        );
        let error: ConnectError = Codec::Json
            .decode::<ListDirRequest>(b"[")
            .unwrap_err()
            .into();
        assert_eq!(error.code, Code::InvalidArgument);
    }

    #[test]
    fn empty_body_is_the_empty_message() {
        assert_eq!(
            Codec::Json.decode::<ListDirRequest>(b"").unwrap(),
            ListDirRequest::default()
        );
        assert_eq!(
            Codec::Proto.decode::<ListDirRequest>(b"").unwrap(),
            ListDirRequest::default()
        );
    }
}
