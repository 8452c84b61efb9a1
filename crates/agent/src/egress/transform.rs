//! Header transforms (E2B's `network.rules`): requests a guest sends to a named domain get
//! headers the guest never sees, typically credentials.
//!
//! A sandbox with transforms has its own certificate authority ([`SandboxCa`]), made by the
//! agent and kept in its record; only its certificate goes to the guest (envd's `/init`
//! `caBundle`, which adds it to the guest's trust store), its key never leaves the agent. A
//! connection the egress proxy admitted under a name some transform names is not joined byte
//! for byte: the agent ends the guest's TLS with a certificate for that name signed by the
//! sandbox's authority ([`Interceptor`]), opens its own TLS to the destination (verified
//! against the host's trust store and the operator's extra authorities), and relays HTTP/1.1
//! request by request, setting the transform's headers on each request **whose `Host` is the
//! name the connection was admitted for** (a request for another host on the same connection
//! is answered 421, so a credential cannot be sent where its rule does not say). Plain HTTP on
//! port 80 is relayed the same way without TLS.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::error::AgentError;

/// How long a guest may take to send a request's head on an intercepted connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the TLS handshakes (the guest's and the destination's) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a sandbox's authority is valid (it lives as long as the sandbox: a resume a year
/// later still has it).
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a certificate it signs for a name is valid.
const LEAF_VALIDITY_DAYS: i64 = 30;
/// A sandbox's certificate authority (PEM), kept in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCa {
    /// Its subject's common name (a certificate it signs names its issuer so).
    pub common_name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// The authority's parameters: the same each time, so a certificate it signs names it exactly
/// as its own certificate does.
fn authority_params(common_name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "wrenn");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn certificate_error(error: impl std::fmt::Display) -> AgentError {
    AgentError::Internal(format!("the sandbox's certificate authority: {error}"))
}

impl SandboxCa {
    /// A new authority for `sandbox_id`.
    pub fn generate(sandbox_id: &str) -> Result<SandboxCa, AgentError> {
        let key = rcgen::KeyPair::generate().map_err(certificate_error)?;
        let now = time::OffsetDateTime::now_utc();
        let common_name = format!("wrenn sandbox {sandbox_id}");
        let mut params = authority_params(&common_name);
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(certificate_error)?;
        Ok(SandboxCa {
            common_name,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What the egress proxy intercepts a slot's transformed connections with: its sandbox's
/// authority (certificates for names are made on first use and kept) and the TLS settings
/// of its connections to destinations.
pub struct Interceptor {
    ca_der: CertificateDer<'static>,
    ca_key: rcgen::KeyPair,
    issuer_params: rcgen::CertificateParams,
    /// A name's TLS settings, and when to make new ones (before its certificate ends).
    leaves: Mutex<HashMap<String, (Arc<rustls::ServerConfig>, std::time::Instant)>>,
    upstream: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor").finish_non_exhaustive()
    }
}

impl Interceptor {
    pub fn new(
        ca: &SandboxCa,
        upstream: Arc<rustls::ClientConfig>,
    ) -> Result<Interceptor, AgentError> {
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())
            .map_err(certificate_error)?
            .into_owned();
        let ca_key = rcgen::KeyPair::from_pem(&ca.key_pem).map_err(certificate_error)?;
        Ok(Interceptor {
            ca_der,
            ca_key,
            issuer_params: authority_params(&ca.common_name),
            leaves: Mutex::new(HashMap::new()),
            upstream,
        })
    }

    /// The TLS settings that present a certificate for `name` (made once per name).
    pub(crate) fn server_config(
        &self,
        name: &str,
    ) -> Result<Arc<rustls::ServerConfig>, AgentError> {
        if let Some((config, renew_at)) = self.leaves.lock().expect("leaves lock").get(name)
            && *renew_at > std::time::Instant::now()
        {
            return Ok(config.clone());
        }
        let key = rcgen::KeyPair::generate().map_err(certificate_error)?;
        let now = time::OffsetDateTime::now_utc();
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_string()]).map_err(certificate_error)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let issuer = rcgen::Issuer::from_params(&self.issuer_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(certificate_error)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(certificate_error)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), self.ca_der.clone()], key_der)
        .map_err(certificate_error)?;
        // HTTP/1.1 only: the relay is HTTP/1.1's (a client offering h2 falls back).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut leaves = self.leaves.lock().expect("leaves lock");
        if leaves.len() >= 256 {
            leaves.clear();
        }
        // Renewed a day before it ends (a sandbox may run for longer than a certificate).
        let renew_at = std::time::Instant::now()
            + Duration::from_secs((LEAF_VALIDITY_DAYS as u64 - 1) * 24 * 3600);
        leaves.insert(name.to_string(), (config.clone(), renew_at));
        Ok(config)
    }
}

/// The TLS settings of the agent's connections to transformed destinations: the host's trust
/// store, plus the authorities in `extra` (PEM) when given.
pub fn upstream_tls(extra: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    let mut roots = (*super::tunnel::system_roots()).clone();
    let added = roots.len();
    if let Some(path) = extra {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                AgentError::Internal(format!(
                    "reading the authorities in {}: {e}",
                    path.display()
                ))
            })?;
        if certs.is_empty() {
            return Err(AgentError::Internal(format!(
                "{} holds no certificate",
                path.display()
            )));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| {
                AgentError::Internal(format!("an authority in {}: {e}", path.display()))
            })?;
        }
    } else if added == 0 {
        tracing::warn!(
            "the host's trust store has no authority: transformed HTTPS will fail until one is given"
        );
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(certificate_error)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A stream whose first bytes were already read (`prefix`) and are read again first.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One intercepted connection.
pub struct Intercepted<'a> {
    /// The guest's side, with the bytes the proxy read to name it.
    pub guest: Prefixed<TcpStream>,
    /// The connection to the destination (direct, or through the egress proxy).
    pub upstream: super::Upstream,
    /// The name it was admitted for (lower case).
    pub name: String,
    /// Whether it is TLS (port 443) or plain HTTP (port 80).
    pub tls: bool,
    /// The transform's headers for the name **now** (asked at each request: an update that
    /// changes or removes them applies to connections already open).
    pub headers: HeaderSource,
    pub interceptor: &'a Interceptor,
    /// Cancelled when the rules stop allowing it or the sandbox ends (a switched protocol's
    /// joined bytes end with it too).
    pub ends: CancellationToken,
    /// Held while the connection (or a protocol switch's joined bytes) lives: the slot
    /// tracks it until then.
    pub keep: Arc<()>,
}

impl std::fmt::Debug for Intercepted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The headers' values are credentials: never shown.
        f.debug_struct("Intercepted")
            .field("name", &self.name)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

type RelayBody = BoxBody<Bytes, hyper::Error>;

/// Where a relay reads the headers to set (none: the rules set none any more).
pub type HeaderSource = Arc<dyn Fn() -> Vec<(String, String)> + Send + Sync>;

/// The headers as hyper takes them (the API validated them; one that would not pass is left out).
fn header_pairs(headers: &[(String, String)]) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter_map(|(key, value)| {
            Some((
                HeaderName::from_bytes(key.as_bytes()).ok()?,
                HeaderValue::from_str(value).ok()?,
            ))
        })
        .collect()
}

fn answer(status: StatusCode, text: &'static str) -> Response<RelayBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A `Host` value's name, normalised as the proxy's names are (its port left out).
fn host_value_name(value: &HeaderValue) -> Option<String> {
    let host = value.to_str().ok()?;
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    super::sniff::host_name(name.as_bytes())
}

/// Whether a request is for `name` alone: exactly one `Host`, naming it, and no other
/// authority in its URI (a server that routes by one or the other must not be told another
/// host).
fn for_name<B>(request: &Request<B>, name: &str) -> bool {
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return false;
    };
    if host_value_name(host).as_deref() != Some(name) {
        return false;
    }
    match request.uri().authority() {
        Some(authority) => {
            super::sniff::host_name(authority.host().as_bytes()).as_deref() == Some(name)
        }
        None => true,
    }
}

/// Relays an intercepted connection until either side ends it.
pub async fn relay(connection: Intercepted<'_>) -> Result<(), AgentError> {
    let Intercepted {
        guest,
        upstream,
        name,
        tls,
        headers,
        interceptor,
        ends,
        keep,
    } = connection;
    let handshake_failed = |side: &'static str| {
        move |e: std::io::Error| AgentError::Internal(format!("TLS with the {side}: {e}"))
    };
    let timed_out = |side: &'static str| {
        move |_| AgentError::Internal(format!("TLS with the {side} took too long"))
    };
    if tls {
        let server = interceptor.server_config(&name)?;
        let guest = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsAcceptor::from(server).accept(guest),
        )
        .await
        .map_err(timed_out("guest"))?
        .map_err(handshake_failed("guest"))?;
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| AgentError::Internal(format!("{name:?}: {e}")))?;
        let upstream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(interceptor.upstream.clone())
                .connect(server_name, upstream),
        )
        .await
        .map_err(timed_out("destination"))?
        .map_err(handshake_failed("destination"))?;
        relay_http(guest, upstream, name, headers, ends, keep).await
    } else {
        relay_http(guest, upstream, name, headers, ends, keep).await
    }
}

/// Relays HTTP/1.1 requests from `guest` to `upstream`, setting `headers` on those for `name`.
async fn relay_http<G, U>(
    guest: G,
    upstream: U,
    name: String,
    headers: HeaderSource,
    ends: CancellationToken,
    keep: Arc<()>,
) -> Result<(), AgentError>
where
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, upstream_connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(upstream))
            .await
            .map_err(|e| AgentError::Internal(format!("HTTP with the destination: {e}")))?;
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let name: Arc<str> = name.into();
    let upgraded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upgrades = upgraded.clone();
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let (sender, name, headers) = (sender.clone(), name.clone(), headers.clone());
        let (upgraded, ends, keep) = (upgrades.clone(), ends.clone(), keep.clone());
        async move {
            if !for_name(&request, &name) {
                return Ok::<_, std::convert::Infallible>(answer(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this connection was opened for another host\n",
                ));
            }
            // TRACE echoes the request (the headers set here included) back to the guest.
            if request.method() == http::Method::TRACE || request.method() == http::Method::CONNECT
            {
                return Ok(answer(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "TRACE and CONNECT are not relayed on a connection whose requests get headers\n",
                ));
            }
            // Origin-form from here on: the destination sees no other authority than the name.
            if request.uri().authority().is_some() {
                let origin = request
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into());
                if let Ok(uri) = origin.parse() {
                    *request.uri_mut() = uri;
                }
            }
            for (key, value) in header_pairs(&headers()) {
                request.headers_mut().insert(key, value);
            }
            let mut sender = sender.lock().await;
            if sender.ready().await.is_err() {
                return Ok(answer(
                    StatusCode::BAD_GATEWAY,
                    "the destination closed the connection\n",
                ));
            }
            // A protocol switch (WebSocket): once both sides have switched, their bytes are
            // joined as they are (the headers went with the request that asked for it).
            let guest_side = hyper::upgrade::on(&mut request);
            Ok(match sender.send_request(request).await {
                Ok(mut response) => {
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        upgraded.store(true, std::sync::atomic::Ordering::SeqCst);
                        let upstream_side = hyper::upgrade::on(&mut response);
                        tokio::spawn(async move {
                            let _keep = keep;
                            let (Ok(guest), Ok(upstream)) = tokio::join!(guest_side, upstream_side)
                            else {
                                return;
                            };
                            let (mut guest, mut upstream) =
                                (TokioIo::new(guest), TokioIo::new(upstream));
                            tokio::select! {
                                () = ends.cancelled() => {}
                                _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream) => {}
                            }
                        });
                    }
                    response.map(BodyExt::boxed)
                }
                Err(error) => {
                    tracing::debug!(%error, "a transformed request failed");
                    answer(StatusCode::BAD_GATEWAY, "the destination failed\n")
                }
            })
        }
    });
    let guest_connection = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(guest), service)
        .with_upgrades();
    let upstream_connection = upstream_connection.with_upgrades();
    tokio::pin!(guest_connection);
    tokio::pin!(upstream_connection);
    tokio::select! {
        _ = &mut guest_connection => {}
        _ = &mut upstream_connection => {
            // Switched protocols: the guest's side hands its connection over once the answer
            // is written. Else the destination closed: the guest's connection ends once its
            // request is answered.
            if !upgraded.load(std::sync::atomic::Ordering::SeqCst) {
                guest_connection.as_mut().graceful_shutdown();
            }
            let _ = guest_connection.await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Reads one request head (up to the blank line).
    async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8(head).unwrap())
    }

    /// A destination that records every request head it gets and answers `ok`.
    async fn destination(
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (tls, seen) = (tls.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut stream: Box<dyn AsyncReadWrite> = match tls {
                        Some(config) => Box::new(
                            tokio_rustls::TlsAcceptor::from(config)
                                .accept(stream)
                                .await
                                .unwrap(),
                        ),
                        None => Box::new(stream),
                    };
                    while let Some(head) = read_head(&mut stream).await {
                        let upgrade = head.to_ascii_lowercase().contains("upgrade: websocket");
                        seen.lock().unwrap().push(head);
                        if upgrade {
                            // Switched: from now on an echo of raw bytes.
                            stream
                                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                                .await
                                .unwrap();
                            let mut buffer = [0u8; 64];
                            loop {
                                match stream.read(&mut buffer).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => stream.write_all(&buffer[..n]).await.unwrap(),
                                }
                            }
                        }
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (address, recorded)
    }

    trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

    /// A guest's connection handed to the relay: the guest's end, and the relay's task.
    async fn intercepted(
        interceptor: Arc<Interceptor>,
        upstream: std::net::SocketAddr,
        tls: bool,
    ) -> TcpStream {
        intercepted_with(
            interceptor,
            upstream,
            tls,
            Arc::new(|| vec![("X-Secret".into(), "s3cret".into())]),
        )
        .await
    }

    async fn intercepted_with(
        interceptor: Arc<Interceptor>,
        upstream: std::net::SocketAddr,
        tls: bool,
        headers: HeaderSource,
    ) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let guest = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let upstream: super::super::Upstream =
            Box::new(TcpStream::connect(upstream).await.unwrap());
        tokio::spawn(async move {
            let _ = relay(Intercepted {
                guest: Prefixed::new(Vec::new(), accepted),
                upstream,
                name: "api.test".into(),
                tls,
                headers,
                interceptor: &interceptor,
                ends: CancellationToken::new(),
                keep: Arc::new(()),
            })
            .await;
        });
        guest
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, host: &str) -> String {
        raw_exchange(
            stream,
            &format!("GET /x HTTP/1.1\r\nHost: {host}\r\nX-Secret: mine\r\n\r\n"),
        )
        .await
    }

    /// An interceptor with a new sandbox authority, trusting the host's store upstream.
    fn sandbox_interceptor() -> Arc<Interceptor> {
        let ca = SandboxCa::generate("sbx").unwrap();
        Arc::new(Interceptor::new(&ca, upstream_tls(None).unwrap()).unwrap())
    }

    /// The destination's own authority and a certificate for `api.test` it signed.
    fn destination_tls(dir: &Path) -> (Arc<rustls::ServerConfig>, std::path::PathBuf) {
        let ca = SandboxCa::generate("destination").unwrap();
        let interceptor = Interceptor::new(&ca, upstream_tls(None).unwrap()).unwrap();
        let path = dir.join("destination-ca.pem");
        std::fs::write(&path, &ca.cert_pem).unwrap();
        (interceptor.server_config("api.test").unwrap(), path)
    }

    #[tokio::test]
    async fn plain_http_requests_for_the_name_get_the_headers_and_others_get_421() {
        let (address, seen) = destination(None).await;
        let interceptor = sandbox_interceptor();
        let mut guest = intercepted(interceptor, address, false).await;
        let answer = exchange(&mut guest, "api.test:80").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        // Another host on the same connection: refused, nothing reaches the destination.
        let answer = exchange(&mut guest, "other.test").await;
        assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        // The transform's value replaced the guest's own.
        assert!(
            seen[0]
                .to_ascii_lowercase()
                .contains("x-secret: s3cret\r\n"),
            "{}",
            seen[0]
        );
        assert!(!seen[0].contains("mine"), "{}", seen[0]);
    }

    async fn raw_exchange<S: AsyncRead + AsyncWrite + Unpin>(
        stream: &mut S,
        request: &str,
    ) -> String {
        stream.write_all(request.as_bytes()).await.unwrap();
        let head = read_head(stream).await.unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| {
                line.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
        format!("{head}{}", String::from_utf8(body).unwrap())
    }

    /// A request naming another host anywhere (its URI, a second `Host`) or one that would
    /// echo the headers back (TRACE) is not sent; the headers are the rules' at each request.
    #[tokio::test]
    async fn only_requests_for_the_name_alone_get_the_current_headers() {
        let (address, seen) = destination(None).await;
        let interceptor = sandbox_interceptor();
        let value = Arc::new(Mutex::new("one".to_string()));
        let current = value.clone();
        let source: HeaderSource =
            Arc::new(move || vec![("X-Secret".into(), current.lock().unwrap().clone())]);
        let mut guest = intercepted_with(interceptor, address, false, source).await;
        for (request, status) in [
            (
                "GET http://evil.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
                "421",
            ),
            (
                "GET http://api.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
                "421",
            ),
            (
                "GET / HTTP/1.1\r\nHost: api.test\r\nHost: evil.test\r\n\r\n",
                "421",
            ),
            ("TRACE / HTTP/1.1\r\nHost: api.test\r\n\r\n", "405"),
            (
                "GET http://api.test/absolute HTTP/1.1\r\nHost: api.test\r\n\r\n",
                "200",
            ),
        ] {
            let head = raw_exchange(&mut guest, request).await;
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}")),
                "{request:?}: {head}"
            );
        }
        // Rotated: the next request on the same connection carries the new value.
        *value.lock().unwrap() = "two".into();
        let head = raw_exchange(
            &mut guest,
            "GET /rotated HTTP/1.1\r\nHost: api.test\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        // Sent in origin form, with the value of its moment.
        assert!(
            seen[0].starts_with("GET /absolute HTTP/1.1\r\n"),
            "{}",
            seen[0]
        );
        assert!(
            seen[0].to_ascii_lowercase().contains("x-secret: one\r\n"),
            "{}",
            seen[0]
        );
        assert!(
            seen[1].to_ascii_lowercase().contains("x-secret: two\r\n"),
            "{}",
            seen[1]
        );
    }

    #[tokio::test]
    async fn a_protocol_switch_joins_the_two_sides_after_the_headers_went() {
        let (address, seen) = destination(None).await;
        let interceptor = sandbox_interceptor();
        let mut guest = intercepted(interceptor, address, false).await;
        guest
            .write_all(b"GET /socket HTTP/1.1\r\nHost: api.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut guest).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        for message in [&b"ping"[..], b"pong!"] {
            guest.write_all(message).await.unwrap();
            let mut echoed = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(5), guest.read_exact(&mut echoed))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(echoed, message);
        }
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen[0]
                .to_ascii_lowercase()
                .contains("x-secret: s3cret\r\n"),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn https_is_ended_with_the_sandbox_authority_and_verified_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let (server, destination_ca) = destination_tls(dir.path());
        let (address, seen) = destination(Some(server)).await;
        let ca = SandboxCa::generate("sbx").unwrap();
        // The guest trusts only the sandbox's authority.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let guest_tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        let connect = |interceptor: Arc<Interceptor>| {
            let guest_tls = guest_tls.clone();
            async move {
                let guest = intercepted(interceptor, address, true).await;
                tokio_rustls::TlsConnector::from(guest_tls)
                    .connect(ServerName::try_from("api.test").unwrap(), guest)
                    .await
            }
        };
        // Upstream verified against the operator's extra authority: the request goes through.
        let trusting =
            Arc::new(Interceptor::new(&ca, upstream_tls(Some(&destination_ca)).unwrap()).unwrap());
        let mut guest = connect(trusting).await.unwrap();
        let answer = exchange(&mut guest, "api.test").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(!answer.contains("s3cret"));
        assert!(
            seen.lock().unwrap()[0]
                .to_ascii_lowercase()
                .contains("x-secret: s3cret\r\n")
        );
        // A destination whose certificate the agent cannot verify gets no request.
        let untrusting = Arc::new(Interceptor::new(&ca, upstream_tls(None).unwrap()).unwrap());
        let refused = match connect(untrusting).await {
            Ok(mut guest) => {
                let mut rest = Vec::new();
                let _ = guest
                    .write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
                    .await;
                let _ = guest.read_to_end(&mut rest).await;
                rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 502")
            }
            Err(_) => true,
        };
        assert!(refused);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }
}
