//! The Connect error: a code and a message, with its JSON wire form
//! (`{"code":"not_found","message":"..."}`), used both as a unary error body and inside a
//! streaming end-stream message.

use serde::{Deserialize, Serialize};

use crate::Code;

/// An RPC failure as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    pub code: Code,
    pub message: String,
}

#[derive(Serialize, Deserialize)]
struct WireError {
    code: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    message: String,
}

/// The JSON payload of an end-stream envelope.
#[derive(Serialize, Deserialize, Default)]
struct EndStream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<WireError>,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// The unary error body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.wire()).expect("a struct of two strings always serializes")
    }

    /// Parses a unary error body; `None` when it is not a Connect error (e.g. a proxy's page).
    pub fn from_json(body: &[u8]) -> Option<ConnectError> {
        let wire: WireError = serde_json::from_slice(body).ok()?;
        Some(ConnectError {
            code: wire.code.parse().ok()?,
            message: wire.message,
        })
    }

    /// The payload of an end-stream envelope that carries `error` (or success when `None`).
    pub fn end_stream_json(error: Option<&ConnectError>) -> Vec<u8> {
        let end = EndStream {
            error: error.map(ConnectError::wire),
        };
        serde_json::to_vec(&end).expect("the end-stream message always serializes")
    }

    /// Parses an end-stream payload: `Ok(None)` for success, `Ok(Some)` for an error.
    pub fn parse_end_stream(payload: &[u8]) -> Result<Option<ConnectError>, ConnectError> {
        let end: EndStream = serde_json::from_slice(payload).map_err(|error| {
            ConnectError::new(
                Code::Internal,
                format!("malformed end-stream message: {error}"),
            )
        })?;
        Ok(end.error.map(|wire| ConnectError {
            code: wire.code.parse().unwrap_or(Code::Unknown),
            message: wire.message,
        }))
    }

    fn wire(&self) -> WireError {
        WireError {
            code: self.code.as_str().to_owned(),
            message: self.message.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unary_body_round_trips() {
        let error = ConnectError::not_found("process with pid 7 not found");
        let body = error.to_json();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"code":"not_found","message":"process with pid 7 not found"}"#
        );
        assert_eq!(ConnectError::from_json(&body), Some(error));
    }

    #[test]
    fn non_connect_bodies_are_rejected() {
        assert_eq!(
            ConnectError::from_json(br#"{"code":502,"message":"x"}"#),
            None
        );
        assert_eq!(ConnectError::from_json(b"<html>"), None);
    }

    #[test]
    fn end_stream_payloads() {
        assert_eq!(ConnectError::end_stream_json(None), b"{}");
        let error = ConnectError::new(Code::DeadlineExceeded, "too slow");
        let payload = ConnectError::end_stream_json(Some(&error));
        assert_eq!(ConnectError::parse_end_stream(&payload), Ok(Some(error)));
        assert_eq!(ConnectError::parse_end_stream(b"{}"), Ok(None));
        assert!(ConnectError::parse_end_stream(b"not json").is_err());
    }
}
