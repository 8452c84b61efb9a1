//! The few things every wrenn crate needs the same way, defined once:
//! - [`random`]: identifiers and tokens from the operating system's randomness (a failure is an
//!   error, never a constant or a clock-made value);
//! - [`now_ms`]: the wall clock in milliseconds since the Unix epoch;
//! - [`access_token_hash`]: envd's access token as the MMDS document carries it;
//! - [`named_enum!`]: enums with names on the wire (states, kinds), their mapping written once;
//! - `logging` (with the `logging` feature): how the binaries log, to stderr.

#[cfg(feature = "logging")]
pub mod logging;
pub mod named;
pub mod random;

/// The wall clock in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// envd's access token as the MMDS document carries it (`accessTokenHash`): SHA-512 in lowercase
/// hex. The host agent writes it and envd checks `/init`'s token against it, so both call this.
pub fn access_token_hash(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha512::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_token_hash_is_sha512_in_hex() {
        // sha512("") and sha512("abc") are published test vectors.
        assert!(super::access_token_hash("").starts_with("cf83e1357eefb8bdf1542850d66d8007"));
        assert!(super::access_token_hash("abc").starts_with("ddaf35a193617abacc417349ae204131"));
        assert_eq!(super::access_token_hash("x").len(), 128);
    }
}
