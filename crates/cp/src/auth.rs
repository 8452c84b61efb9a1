//! API keys: `e2b_` + 40 hex characters (the format the `e2b` SDKs check by default), shown
//! once, stored as a SHA-256 hash; the `X-API-KEY` header names the caller's team.

use sha2::Digest;

pub use wrenn_core::random::NoRandomness;

/// A new key and its stored hash.
pub fn new_key() -> Result<(String, String), NoRandomness> {
    let mut bytes = [0u8; 20];
    wrenn_core::random::fill(&mut bytes)?;
    let key = format!("e2b_{}", hex(&bytes));
    let hash = hash_key(&key);
    Ok((key, hash))
}

/// The stored form of a key.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex(&sha2::Sha256::digest(key.as_bytes())))
}

/// Random identifiers: `len` characters of `[a-z0-9]`, each equally likely.
pub fn random_id(len: usize) -> Result<String, NoRandomness> {
    wrenn_core::random::id("", len)
}

/// A random (version 4) UUID, as E2B's ids of builds and keys are.
pub fn random_uuid() -> Result<String, NoRandomness> {
    let mut bytes = [0u8; 16];
    wrenn_core::random::fill(&mut bytes)?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex(&bytes);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// A random token in hex (envd access tokens).
pub fn random_token() -> Result<String, NoRandomness> {
    wrenn_core::random::hex_token(24)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_sdk_format_and_distinct_hashes() {
        let (key, hash) = new_key().unwrap();
        assert!(key.starts_with("e2b_") && key.len() == 44);
        assert!(
            key[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(hash, hash_key(&key));
        assert_ne!(new_key().unwrap().1, hash);
        let id = random_id(20).unwrap();
        assert_eq!(id.len(), 20);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }
}
