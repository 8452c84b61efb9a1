//! Who may call envd and as whom: the sandbox's access token (`X-Access-Token`, compared in
//! constant time), and the user a call runs as (`Authorization: Basic base64("<user>:")`, or the
//! default user).

use base64::Engine as _;
use http::HeaderMap;
use subtle::ConstantTimeEq;

/// The header carrying the sandbox's access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// The body of every 401 for a missing or wrong access token (E2B's text).
pub const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// Compares two secrets in time that does not depend on where they differ.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    given.ct_eq(expected).into()
}

/// Whether the request carries `expected` as its access token. No token configured means open.
pub fn token_matches(headers: &HeaderMap, expected: Option<&str>) -> bool {
    match expected {
        None => true,
        Some(expected) => headers
            .get(ACCESS_TOKEN_HEADER)
            .is_some_and(|given| secrets_equal(given.as_bytes(), expected.as_bytes())),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BasicAuthError {
    #[error("invalid Authorization header: expected Basic credentials")]
    NotBasic,
    #[error("invalid Authorization header: credentials are not base64")]
    NotBase64,
    #[error("invalid Authorization header: credentials are not 'user:password' text")]
    Malformed,
}

/// The user named by an `Authorization: Basic` header, `Ok(None)` without one.
pub fn basic_username(headers: &HeaderMap) -> Result<Option<String>, BasicAuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| BasicAuthError::NotBasic)?.trim();
    let (scheme, credentials) = text.split_once(' ').ok_or(BasicAuthError::NotBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(BasicAuthError::NotBasic);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(credentials.trim())
        .map_err(|_| BasicAuthError::NotBase64)?;
    let decoded = String::from_utf8(decoded).map_err(|_| BasicAuthError::Malformed)?;
    let (user, _password) = decoded.split_once(':').ok_or(BasicAuthError::Malformed)?;
    if user.is_empty() {
        return Ok(None);
    }
    Ok(Some(user.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn token_checks() {
        assert!(token_matches(&HeaderMap::new(), None));
        assert!(!token_matches(&HeaderMap::new(), Some("secret")));
        assert!(token_matches(
            &with(ACCESS_TOKEN_HEADER, "secret"),
            Some("secret")
        ));
        assert!(!token_matches(
            &with(ACCESS_TOKEN_HEADER, "secreT"),
            Some("secret")
        ));
        assert!(!token_matches(
            &with(ACCESS_TOKEN_HEADER, "secret2"),
            Some("secret")
        ));
    }

    #[test]
    fn basic_user() {
        // base64("user:")
        assert_eq!(
            basic_username(&with("authorization", "Basic dXNlcjo=")),
            Ok(Some("user".into()))
        );
        assert_eq!(basic_username(&HeaderMap::new()), Ok(None));
        assert_eq!(
            basic_username(&with("authorization", "Bearer x")),
            Err(BasicAuthError::NotBasic)
        );
        assert_eq!(
            basic_username(&with("authorization", "Basic !!!")),
            Err(BasicAuthError::NotBase64)
        );
        // base64("nocolon")
        assert_eq!(
            basic_username(&with("authorization", "Basic bm9jb2xvbg==")),
            Err(BasicAuthError::Malformed)
        );
    }
}
