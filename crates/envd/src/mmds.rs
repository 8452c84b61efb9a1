//! A client of Firecracker's metadata service (MMDS, version 2), from which envd learns the
//! sandbox's identity and the hash of its access token. The host agent serves the same
//! interface to QEMU guests, so this one code path serves both.
//!
//! V2 flow: `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` gives a session token;
//! `GET /` with `X-metadata-token` and `Accept: application/json` gives the metadata document
//! `{"instanceID", "envID", "address", "accessTokenHash"}` (E2B's keys).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// Firecracker's default MMDS address.
pub const DEFAULT_MMDS_ADDRESS: &str = "169.254.169.254:80";
/// The lifetime asked for a session token.
const TOKEN_TTL_SECONDS: u32 = 60;

/// The metadata envd reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SandboxMetadata {
    #[serde(rename = "instanceID", default)]
    pub sandbox_id: String,
    #[serde(rename = "envID", default)]
    pub template_id: String,
    #[serde(default)]
    pub address: String,
    /// Hex SHA-512 of the sandbox's access token (of `""` to allow clearing it).
    #[serde(rename = "accessTokenHash", default)]
    pub access_token_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MmdsError {
    #[error("MMDS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("MMDS request failed: {0}")]
    Request(String),
    #[error("MMDS answered {status} to {what}")]
    Status { what: &'static str, status: u16 },
    #[error("MMDS metadata is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// An MMDS client.
#[derive(Debug, Clone)]
pub struct MmdsClient {
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl MmdsClient {
    /// A client of the MMDS at `address` (`host:port`).
    pub fn new(address: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        MmdsClient {
            base: format!("http://{address}"),
            // No idle connections kept: one kept across a snapshot would be a zombie in every
            // clone (its peer, the old slot's NAT, is gone), stalling the next /init.
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector),
        }
    }

    /// Fetches the metadata, within `deadline`.
    pub async fn fetch(&self, deadline: Duration) -> Result<SandboxMetadata, MmdsError> {
        tokio::time::timeout(deadline, self.fetch_unbounded())
            .await
            .map_err(|_| MmdsError::Timeout(deadline))?
    }

    async fn fetch_unbounded(&self) -> Result<SandboxMetadata, MmdsError> {
        let request = http::Request::put(format!("{}/latest/api/token", self.base))
            .header("x-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
            .body(Full::new(Bytes::new()))
            .map_err(|e| MmdsError::Request(e.to_string()))?;
        let token = self.send(request, "the token request").await?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let request = http::Request::get(format!("{}/", self.base))
            .header("x-metadata-token", token)
            .header("accept", "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| MmdsError::Request(e.to_string()))?;
        let document = self.send(request, "the metadata request").await?;
        Ok(serde_json::from_slice(&document)?)
    }

    async fn send(
        &self,
        request: http::Request<Full<Bytes>>,
        what: &'static str,
    ) -> Result<Bytes, MmdsError> {
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| MmdsError::Request(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| MmdsError::Request(e.to_string()))?
            .to_bytes();
        if status != 200 {
            return Err(MmdsError::Status { what, status });
        }
        Ok(body)
    }
}

/// Hex SHA-512 of a token, as the host agent puts it in `accessTokenHash` (one definition for
/// both: wrenn-core's).
pub use wrenn_core::access_token_hash as token_hash;

/// Writes the sandbox's identity where processes can read it: `<run>/wrenn/sandbox-id`,
/// `<run>/wrenn/template-id`, and E2B's `<run>/e2b/.E2B_SANDBOX_ID`, `.E2B_TEMPLATE_ID`,
/// `.E2B_SANDBOX`. Each file is replaced atomically, and only when its content changes (a
/// template's clone keeps its template id and `.E2B_SANDBOX`; a restore's `/init` waits on this).
pub fn write_identity(run_dir: &Path, metadata: &SandboxMetadata) -> std::io::Result<()> {
    let files: [(PathBuf, &str); 5] = [
        (run_dir.join("wrenn/sandbox-id"), &metadata.sandbox_id),
        (run_dir.join("wrenn/template-id"), &metadata.template_id),
        (run_dir.join("e2b/.E2B_SANDBOX_ID"), &metadata.sandbox_id),
        (run_dir.join("e2b/.E2B_TEMPLATE_ID"), &metadata.template_id),
        (run_dir.join("e2b/.E2B_SANDBOX"), "true"),
    ];
    for (path, content) in files {
        if std::fs::read(&path).is_ok_and(|current| current == content.as_bytes()) {
            continue;
        }
        let parent = path.parent().expect("identity files have a parent");
        std::fs::create_dir_all(parent)?;
        let temp = parent.join(format!(
            ".{}.tmp",
            path.file_name().expect("named").to_string_lossy()
        ));
        std::fs::write(&temp, content)?;
        std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        std::fs::rename(&temp, &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_document() {
        let metadata: SandboxMetadata = serde_json::from_str(
            r#"{"instanceID":"sbx1","envID":"base","address":"http://x/logs","accessTokenHash":"ab","extra":1}"#,
        )
        .unwrap();
        assert_eq!(metadata.sandbox_id, "sbx1");
        assert_eq!(metadata.template_id, "base");
        assert_eq!(metadata.access_token_hash, "ab");
    }

    #[test]
    fn identity_files() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = SandboxMetadata {
            sandbox_id: "sbx1".into(),
            template_id: "base".into(),
            ..Default::default()
        };
        write_identity(dir.path(), &metadata).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("e2b/.E2B_SANDBOX_ID")).unwrap(),
            "sbx1"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("wrenn/template-id")).unwrap(),
            "base"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("e2b/.E2B_SANDBOX")).unwrap(),
            "true"
        );
        // A clone: its sandbox id is replaced, the files that stay the same are left alone.
        use std::os::unix::fs::MetadataExt;
        let inode = |name: &str| std::fs::metadata(dir.path().join(name)).unwrap().ino();
        let template_file = inode("wrenn/template-id");
        let sandbox_file = inode("wrenn/sandbox-id");
        let clone = SandboxMetadata {
            sandbox_id: "sbx2".into(),
            ..metadata
        };
        write_identity(dir.path(), &clone).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("e2b/.E2B_SANDBOX_ID")).unwrap(),
            "sbx2"
        );
        assert_ne!(inode("wrenn/sandbox-id"), sandbox_file, "replaced");
        assert_eq!(inode("wrenn/template-id"), template_file, "left alone");
    }
}
