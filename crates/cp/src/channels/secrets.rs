//! What keeps channels' secrets secret: the sealing key of the control plane ([`SecretBox`],
//! XChaCha20-Poly1305 under 32 bytes kept in `<data>/cp/secrets.key`, mode 0600), which seals
//! a channel's URL (Slack's and Discord's carry their credential in it) and its webhook
//! secret before the store sees them; and the webhook secrets themselves ([`new_webhook_secret`],
//! [`sign`]: the Standard Webhooks signature). It knows nothing of HTTP or of the store.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};

/// What a sealed value starts with: the scheme's version.
const SEALED_PREFIX: &str = "v1:";
/// What a webhook secret starts with (as Standard Webhooks' senders write it).
pub const SECRET_PREFIX: &str = "whsec_";
/// XChaCha20's nonce: 24 bytes, random for every seal (too long to repeat by chance).
const NONCE_LEN: usize = 24;

/// Why a secret could not be kept, read or made.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("the secrets key {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the secrets key {0} is not 32 bytes: replace it from a backup (the channels it sealed are unreadable without it)"
    )]
    KeyLength(String),
    /// A sealed value that is not one, or sealed under another key.
    #[error("a sealed secret cannot be opened: it was sealed under another key, or damaged")]
    Unreadable,
    #[error("{0}")]
    NoRandomness(#[from] wrenn_core::random::NoRandomness),
    /// A webhook secret that is not `whsec_` and the base64 of 24 to 64 bytes.
    #[error("a webhook secret is \"whsec_\" and the base64 of 24 to 64 random bytes")]
    BadWebhookSecret,
}

/// The control plane's sealing key: it seals values for the store and opens them again.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// A box over this key.
    pub fn from_key(key: [u8; 32]) -> Self {
        SecretBox {
            cipher: XChaCha20Poly1305::new(&key.into()),
        }
    }

    /// The box whose key is the file at `path`, made (32 random bytes, 0600, in a private
    /// directory) if there is none. Two control planes making it at once keep one key: each
    /// writes its own beside it and links it into place, which only the first can.
    pub fn open_or_create(path: &Path) -> Result<Self, SecretsError> {
        let failed = |source| SecretsError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        if !path.exists() {
            let mut key = [0u8; 32];
            wrenn_core::random::fill(&mut key)?;
            if let Some(dir) = path.parent() {
                crate::store::private_dir(dir).map_err(failed)?;
            }
            let own = path.with_extension(format!("new.{}", std::process::id()));
            crate::store::write_file_atomically(&own, &key, 0o600).map_err(failed)?;
            let linked = std::fs::hard_link(&own, path);
            let _ = std::fs::remove_file(&own);
            match linked {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(failed(error)),
            }
        }
        let bytes = std::fs::read(path).map_err(failed)?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| SecretsError::KeyLength(path.display().to_string()))?;
        Ok(SecretBox::from_key(key))
    }

    /// `v1:` and the base64 of a fresh nonce and the sealed text.
    pub fn seal(&self, plain: &str) -> Result<String, SecretsError> {
        let mut nonce = [0u8; NONCE_LEN];
        wrenn_core::random::fill(&mut nonce)?;
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), plain.as_bytes())
            .map_err(|_| SecretsError::Unreadable)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{}", BASE64.encode(out)))
    }

    /// The text [`Self::seal`] sealed.
    pub fn open(&self, sealed: &str) -> Result<String, SecretsError> {
        let raw = sealed
            .strip_prefix(SEALED_PREFIX)
            .and_then(|text| BASE64.decode(text).ok())
            .filter(|raw| raw.len() > NONCE_LEN)
            .ok_or(SecretsError::Unreadable)?;
        let (nonce, text) = raw.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), text)
            .map_err(|_| SecretsError::Unreadable)?;
        String::from_utf8(plain).map_err(|_| SecretsError::Unreadable)
    }
}

/// A new webhook secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_webhook_secret() -> Result<String, SecretsError> {
    let mut key = [0u8; 32];
    wrenn_core::random::fill(&mut key)?;
    Ok(format!("{SECRET_PREFIX}{}", BASE64.encode(key)))
}

/// The signing key a webhook secret stands for, if it is one.
fn secret_key(secret: &str) -> Result<Vec<u8>, SecretsError> {
    secret
        .strip_prefix(SECRET_PREFIX)
        .and_then(|text| BASE64.decode(text).ok())
        .filter(|key| (24..=64).contains(&key.len()))
        .ok_or(SecretsError::BadWebhookSecret)
}

/// Refuses a webhook secret a caller gave that is not one.
pub fn check_webhook_secret(secret: &str) -> Result<(), SecretsError> {
    secret_key(secret).map(drop)
}

/// The `webhook-signature` of a message, as Standard Webhooks defines it: `v1,` and the
/// base64 of HMAC-SHA256 under the secret's key of `{id}.{timestamp}.{body}`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SecretsError> {
    let key = secret_key(secret)?;
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key)
        .map_err(|_| SecretsError::BadWebhookSecret)?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_example() {
        // The specification's published example (its reference libraries' test vector).
        let signature = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let secret = new_webhook_secret().unwrap();
        assert_eq!(secret.len(), SECRET_PREFIX.len() + 44);
        check_webhook_secret(&secret).unwrap();
        assert!(check_webhook_secret("whsec_c2hvcnQ=").is_err(), "too short");
        assert!(check_webhook_secret("secret").is_err());
    }

    #[test]
    fn sealed_values_open_under_their_key_only_and_the_key_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp/secrets.key");
        let secrets = SecretBox::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = secrets
            .seal("https://hooks.slack.com/services/T/B/x")
            .unwrap();
        assert!(
            sealed.starts_with("v1:") && !sealed.contains("slack"),
            "{sealed}"
        );
        assert_ne!(
            sealed,
            secrets
                .seal("https://hooks.slack.com/services/T/B/x")
                .unwrap()
        );
        let again = SecretBox::open_or_create(&path).unwrap();
        assert_eq!(
            again.open(&sealed).unwrap(),
            "https://hooks.slack.com/services/T/B/x"
        );
        let other = SecretBox::from_key([7; 32]);
        assert!(matches!(other.open(&sealed), Err(SecretsError::Unreadable)));
        assert!(matches!(
            secrets.open("v1:AAAA"),
            Err(SecretsError::Unreadable)
        ));
    }
}
