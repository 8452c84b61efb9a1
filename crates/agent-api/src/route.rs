//! [`GuestRoute`]: how a request reaches a guest port from this process, straight (the guest's
//! VM runs on this machine) or through the sandbox proxy of the guest's host agent.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wrenn_http::forward::{ForwardError, forward, forward_over};

/// How long the TLS handshake with an agent's proxy may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

use crate::proxy::{AGENT_TOKEN_HEADER, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER};

/// Where a guest port is reached from this process.
#[derive(Debug, Clone)]
pub enum GuestRoute {
    /// Straight to the guest (its host is this machine), until `ends` is cancelled (its VM
    /// stopped).
    Direct {
        address: SocketAddr,
        ends: CancellationToken,
    },
    /// Through the sandbox proxy of the agent on the guest's host, over the fleet's mutual TLS.
    ViaAgent {
        proxy: SocketAddr,
        token: String,
        sandbox_id: String,
        port: u16,
        tls: crate::fleet_tls::HostTls,
    },
}

impl GuestRoute {
    /// Sends `request` along the route (adding the agent proxy's headers when it goes there).
    /// Through an agent, its answer must begin within `answer_deadline`, so an agent that
    /// accepts and never answers releases the client.
    pub async fn forward(
        &self,
        mut request: http::Request<axum::body::Body>,
        answer_deadline: Duration,
    ) -> Result<axum::response::Response, ForwardError> {
        match self {
            GuestRoute::Direct { address, ends } => forward(*address, request, ends.clone()).await,
            GuestRoute::ViaAgent {
                proxy,
                token,
                sandbox_id,
                port,
                tls,
            } => {
                let headers = request.headers_mut();
                for (name, value) in [
                    (AGENT_TOKEN_HEADER, token.as_str()),
                    (SANDBOX_ID_HEADER, sandbox_id.as_str()),
                    (SANDBOX_PORT_HEADER, &port.to_string()),
                ] {
                    if let Ok(value) = http::HeaderValue::from_str(value) {
                        headers.insert(name, value);
                    }
                }
                // An HTTP/2 request goes on over HTTP/2 (ALPN h2), any other over HTTP/1.1.
                let config = if request.version() == http::Version::HTTP_2 {
                    tls.http2.clone()
                } else {
                    tls.http1.clone()
                };
                let (address, name) = (*proxy, tls.name.clone());
                let session = async move {
                    let tcp = wrenn_http::forward::connect(address).await?;
                    let connecting = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, connecting).await {
                        Ok(Ok(session)) => Some(session),
                        Ok(Err(error)) => {
                            tracing::warn!(proxy = %address, %error, "the TLS handshake with the agent's sandbox proxy failed");
                            None
                        }
                        Err(_) => None,
                    }
                };
                // The agent ends the exchange when the VM stops; this side never does.
                let forwarded = forward_over(session, *proxy, request, CancellationToken::new());
                match tokio::time::timeout(answer_deadline, forwarded).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        tracing::warn!(%proxy, sandbox = %sandbox_id, "the agent's sandbox proxy did not answer in time");
                        Err(ForwardError::Closed)
                    }
                }
            }
        }
    }
}
