//! Identifiers and tokens from the operating system's randomness (`getrandom`).

/// The system gave no randomness: no id or token can be made.
#[derive(Debug, thiserror::Error)]
#[error("the system gave no randomness: {0}")]
pub struct NoRandomness(getrandom::Error);

/// Fills `out` with random bytes.
pub fn fill(out: &mut [u8]) -> Result<(), NoRandomness> {
    getrandom::fill(out).map_err(NoRandomness)
}

/// `prefix` and then `len` characters of `[a-z0-9]`, each equally likely.
pub fn id(prefix: &str, len: usize) -> Result<String, NoRandomness> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    // 252 is 7 × 36: bytes from it up are dropped so that no character is likelier.
    const FAIR_BELOW: u8 = 252;
    let mut id = String::with_capacity(prefix.len() + len);
    id.push_str(prefix);
    let mut pool = [0u8; 64];
    while id.len() < prefix.len() + len {
        fill(&mut pool)?;
        let wanted = prefix.len() + len - id.len();
        id.extend(
            pool.iter()
                .filter(|byte| **byte < FAIR_BELOW)
                .take(wanted)
                .map(|byte| ALPHABET[usize::from(*byte) % ALPHABET.len()] as char),
        );
    }
    Ok(id)
}

/// `bytes` random bytes in lowercase hex.
pub fn hex_token(bytes: usize) -> Result<String, NoRandomness> {
    let mut raw = vec![0u8; bytes];
    fill(&mut raw)?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_prefix_length_and_alphabet_and_differ() {
        let a = id("w", 20).unwrap();
        let b = id("w", 20).unwrap();
        assert_eq!(a.len(), 21);
        assert!(a.starts_with('w'));
        assert!(
            a[1..]
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_ne!(a, b);
        assert_eq!(id("", 0).unwrap(), "");
    }

    #[test]
    fn every_character_is_about_as_likely() {
        let mut counts = [0u32; 36];
        let sample = id("", 360_000).unwrap();
        for c in sample.bytes() {
            let index = if c.is_ascii_digit() {
                26 + (c - b'0')
            } else {
                c - b'a'
            };
            counts[usize::from(index)] += 1;
        }
        // 10,000 expected each; a plain modulo (256 = 7 × 36 + 4: four characters 8/7 as likely)
        // would put four of them near 11,250. Allowed: 6 standard deviations (600) either way.
        for (index, count) in counts.iter().enumerate() {
            assert!(
                (9_400..=10_600).contains(count),
                "character {index}: {count} of 360,000"
            );
        }
    }

    #[test]
    fn tokens_are_hex_of_the_asked_length() {
        let token = hex_token(24).unwrap();
        assert_eq!(token.len(), 48);
        assert!(
            token
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
}
