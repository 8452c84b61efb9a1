//! Signed `/files` URLs (E2B's `v1_` scheme), which let a browser or `curl` read or write one
//! path as one user without the access token:
//! `v1_` + base64 (standard alphabet, no padding) of
//! SHA-256(`{path}:{operation}:{username}:{token}[:{expiration}]`).

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::auth::secrets_equal;

/// What a signature allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Read,
    Write,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// Why a signed request is refused (the texts are E2B's, which clients match).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature query parameter")]
    Missing,
    #[error("invalid signature")]
    Invalid,
    #[error("signature is already expired")]
    Expired,
    #[error("invalid signature expiration")]
    BadExpiration,
}

/// The signature of `path` (the raw query value), `operation`, `username` (raw, `""` when
/// absent) under `token`, optionally expiring at `expiration` (unix seconds).
pub fn sign(
    path: &str,
    operation: Operation,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let raw = match expiration {
        Some(expiration) => format!(
            "{path}:{}:{username}:{token}:{expiration}",
            operation.as_str()
        ),
        None => format!("{path}:{}:{username}:{token}", operation.as_str()),
    };
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Checks a request's `signature` and `signature_expiration` query values at time `now`.
pub fn verify(
    path: &str,
    operation: Operation,
    username: &str,
    token: &str,
    signature: Option<&str>,
    expiration: Option<&str>,
    now_unix: i64,
) -> Result<(), SignatureError> {
    let signature = signature
        .filter(|s| !s.is_empty())
        .ok_or(SignatureError::Missing)?;
    let expiration = match expiration.filter(|e| !e.is_empty()) {
        Some(text) => Some(
            text.parse::<i64>()
                .map_err(|_| SignatureError::BadExpiration)?,
        ),
        None => None,
    };
    let expected = sign(path, operation, username, token, expiration);
    if !secrets_equal(signature.as_bytes(), expected.as_bytes()) {
        return Err(SignatureError::Invalid);
    }
    if expiration.is_some_and(|expiration| expiration < now_unix) {
        return Err(SignatureError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // sha256("/home/user/a.txt:read:user:tok") computed independently with Python's hashlib.
        let signature = sign("/home/user/a.txt", Operation::Read, "user", "tok", None);
        assert_eq!(signature, "v1_p0WqJQYCLtO6YX+e4h7VbpybRsdJbMbIw7clYpulIJk");
    }

    #[test]
    fn verification() {
        let now = 1_700_000_000;
        let good = sign("a.txt", Operation::Write, "", "tok", Some(now + 60));
        let expiration = (now + 60).to_string();
        let (write, read) = (Operation::Write, Operation::Read);
        // (path, operation, user, signature, expiration, now): what verify says.
        type Case<'a> = (
            &'a str,
            Operation,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            i64,
        );
        use SignatureError::{BadExpiration, Expired, Invalid, Missing};
        #[rustfmt::skip]
        let cases: [(Case, Result<(), SignatureError>); 8] = [
            (("a.txt", write, "", Some(&good), Some(&expiration), now), Ok(())),
            // Any field that differs breaks the signature.
            (("a.txt", read, "", Some(&good), Some(&expiration), now), Err(Invalid)),
            (("b.txt", write, "", Some(&good), Some(&expiration), now), Err(Invalid)),
            (("a.txt", write, "user", Some(&good), Some(&expiration), now), Err(Invalid)),
            (("a.txt", write, "", Some(&good), None, now), Err(Invalid)),
            (("a.txt", write, "", Some(&good), Some(&expiration), now + 61), Err(Expired)),
            (("a.txt", write, "", None, None, now), Err(Missing)),
            (("a.txt", write, "", Some(&good), Some("soon"), now), Err(BadExpiration)),
        ];
        for ((path, operation, user, signature, expiration, at), expected) in cases {
            assert_eq!(
                verify(path, operation, user, "tok", signature, expiration, at),
                expected,
                "{path} {operation:?} {user:?} {signature:?} {expiration:?} {at}"
            );
        }
    }
}
