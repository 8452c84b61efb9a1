//! Where the control plane is and who is asking: the flags every CLI command over a control plane
//! takes (`--api-url`, `--sandbox-url`, `--api-key`, `--api-key-file`, `--json`), the typed REST
//! client they give, and the Connect client of a sandbox's envd through the edge proxy.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use wrenn_api::client::Client;
use wrenn_connect::Codec;
use wrenn_connect::client::{ConnectClient, HttpVersion};

/// Where the control plane is, and who is asking.
#[derive(Debug, Args, Clone)]
pub struct Connection {
    /// The control plane's REST API.
    #[arg(
        long,
        global = true,
        env = "WRENN_API_URL",
        default_value = "http://127.0.0.1:3000"
    )]
    pub api_url: String,
    /// The edge proxy (for exec, shell and cp).
    #[arg(
        long,
        global = true,
        env = "WRENN_SANDBOX_URL",
        default_value = "http://127.0.0.1:3001"
    )]
    pub sandbox_url: String,
    /// An API key [default: $E2B_API_KEY, else the key `wrenn up` wrote to
    /// /var/lib/wrenn/cp/initial-api-key].
    #[arg(long, global = true, env = "WRENN_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file holding the API key.
    #[arg(long, global = true, env = "WRENN_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

const DEFAULT_KEY_FILE: &str = crate::paths::INITIAL_KEY_FILE;

impl Connection {
    fn key(&self) -> anyhow::Result<String> {
        if let Some(key) = crate::secrets::resolve(
            "--api-key",
            self.api_key.clone(),
            self.api_key_file.as_deref(),
        )? {
            return Ok(key);
        }
        if let Ok(key) = std::env::var("E2B_API_KEY")
            && !key.is_empty()
        {
            return Ok(key);
        }
        std::fs::read_to_string(DEFAULT_KEY_FILE)
            .map(|key| key.trim().to_string())
            .map_err(|_| {
                anyhow::anyhow!(
                    "no API key: pass --api-key or --api-key-file, set WRENN_API_KEY or E2B_API_KEY, or run where `wrenn up` wrote {DEFAULT_KEY_FILE}"
                )
            })
    }

    /// The REST client, with the key.
    pub fn api(&self) -> anyhow::Result<Client> {
        let key = self.key()?;
        Client::new(&self.api_url, Some(&key))
            .with_context(|| format!("--api-url {:?}", self.api_url))
    }

    /// The edge proxy's `host:port`.
    pub fn proxy_authority(&self) -> anyhow::Result<String> {
        let url = self.sandbox_url.trim_end_matches('/');
        url.strip_prefix("http://")
            .map(str::to_string)
            .with_context(|| format!("--sandbox-url {url:?} must be http://host:port"))
    }

    /// envd's access token of a sandbox, if it has one.
    pub async fn access_token(&self, id: &str) -> anyhow::Result<Option<String>> {
        Ok(self.api()?.sandbox(id).await?.envd_access_token)
    }

    /// A Connect client for a sandbox's envd, through the proxy, and the headers its calls carry.
    pub async fn envd(&self, id: &str) -> anyhow::Result<(ConnectClient, http::HeaderMap)> {
        let token = self.access_token(id).await?;
        let client = ConnectClient::new(
            format!("http://{}", self.proxy_authority()?),
            HttpVersion::Http1,
            Codec::Json,
        )
        .with_header("e2b-sandbox-id", id)
        .with_header("e2b-sandbox-port", &wrenn_proto::ENVD_PORT.to_string());
        let mut headers = http::HeaderMap::new();
        if let Some(token) = token {
            headers.insert("x-access-token", token.parse()?);
        }
        Ok((client, headers))
    }
}

/// An `Authorization` header naming the guest user a command runs as, as the SDKs send it.
pub fn basic_user(user: &str) -> anyhow::Result<http::HeaderValue> {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
    Ok(format!("Basic {encoded}").parse()?)
}
