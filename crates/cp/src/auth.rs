//! API keys: `e2b_` + 40 hex characters (the format the `e2b` SDKs check by default), shown
//! once, stored as a SHA-256 hash; the `X-API-KEY` header names the caller's team.

use sha2::Digest;

/// A new key and its stored hash.
pub fn new_key() -> (String, String) {
    let mut bytes = [0u8; 20];
    random_bytes(&mut bytes);
    let key = format!("e2b_{}", hex(&bytes));
    let hash = hash_key(&key);
    (key, hash)
}

/// The stored form of a key.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex(&sha2::Sha256::digest(key.as_bytes())))
}

/// Random identifiers: `len` characters of `[a-z0-9]`.
pub fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    random_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// A random token in hex (envd access tokens).
pub fn random_token() -> String {
    let mut bytes = [0u8; 24];
    random_bytes(&mut bytes);
    hex(&bytes)
}

fn random_bytes(out: &mut [u8]) {
    let file = std::fs::File::open("/dev/urandom")
        .and_then(|mut file| std::io::Read::read_exact(&mut file, out));
    file.expect("/dev/urandom is readable");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_sdk_format_and_distinct_hashes() {
        let (key, hash) = new_key();
        assert!(key.starts_with("e2b_") && key.len() == 44);
        assert!(
            key[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(hash, hash_key(&key));
        assert_ne!(new_key().1, hash);
        let id = random_id(20);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }
}
