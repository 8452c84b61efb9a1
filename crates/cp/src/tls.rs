//! HTTPS for the control plane: the certificate it serves under its domain, and the TLS front
//! that serves the REST API (`api.<domain>`) and the edge proxy (`<port>-<id>.<domain>`) on
//! one port, as the E2B SDKs expect when they are given only a domain.
//!
//! Without a certificate of the operator's, a **local certificate authority** is made once in
//! the TLS directory (`ca.pem`, its key `ca-key.pem` private to root) and signs a server
//! certificate for `<domain>` and `*.<domain>` (`server.pem`, `server-key.pem`), renewed when
//! the domain changes or a month before it expires. `ca-bundle.pem` is the system's trusted
//! certificates plus the local authority's: point `SSL_CERT_FILE` at it (Python and the SDK's
//! Rust transport; `CURL_CA_BUNDLE` for curl), or `NODE_EXTRA_CA_CERTS` at `ca.pem` (Node), or
//! install `ca.pem` system-wide, and the SDKs trust wrenn's HTTPS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where Debian keeps the system's trusted certificates, one PEM bundle.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The local authority's name.
const CA_NAME: &str = "wrenn local certificate authority";
/// How long the local authority is valid.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a server certificate is valid (under the 398 days clients accept).
const SERVER_VALIDITY_DAYS: i64 = 390;
/// A server certificate this close to its end is renewed at start.
const RENEW_BEFORE_DAYS: i64 = 30;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("making a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("reading {}: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error("the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid domain {0:?}: a DNS name such as wrenn.localhost or sandboxes.example.com")]
    Domain(String),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Io { what, path, source }
}

/// The files of a local authority and the server certificate it signed.
#[derive(Debug, Clone)]
pub struct LocalAuthority {
    /// The authority's certificate: what clients must trust.
    pub ca_cert: PathBuf,
    /// The system's trusted certificates plus the authority's (for `SSL_CERT_FILE`).
    pub bundle: PathBuf,
    /// The server's certificate chain (server, then authority).
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
}

/// The domain's host name: `domain` without a `:port`, checked to be a DNS name.
pub fn domain_host(domain: &str) -> Result<&str, TlsError> {
    let host = match domain.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => domain,
    };
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if host.len() > 253 || host.split('.').count() < 2 || !host.split('.').all(valid_label) {
        return Err(TlsError::Domain(domain.to_string()));
    }
    Ok(host)
}

/// Makes (once) the local authority in `dir` and (when missing, for another domain, or near
/// its end) a server certificate for `host` and `*.host`.
pub fn local_authority(dir: &Path, host: &str) -> Result<LocalAuthority, TlsError> {
    crate::store::private_dir(dir).map_err(io_error("creating", dir))?;
    let files = LocalAuthority {
        ca_cert: dir.join("ca.pem"),
        bundle: dir.join("ca-bundle.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
    };
    let ca_key_path = dir.join("ca-key.pem");
    let made_for = dir.join("server.for");
    let (ca_key, ca_pem) = if files.ca_cert.exists() && ca_key_path.exists() {
        let key_pem =
            std::fs::read_to_string(&ca_key_path).map_err(io_error("reading", &ca_key_path))?;
        let key = rcgen::KeyPair::from_pem(&key_pem)?;
        let cert_pem =
            std::fs::read_to_string(&files.ca_cert).map_err(io_error("reading", &files.ca_cert))?;
        (key, cert_pem)
    } else {
        let key = rcgen::KeyPair::generate()?;
        let now = time_now();
        let mut params = authority_params();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        write_file(&ca_key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&files.ca_cert, cert.pem().as_bytes(), 0o644)?;
        // A new authority: whatever it signed before is not its.
        let _ = std::fs::remove_file(&made_for);
        tracing::info!(path = %files.ca_cert.display(), "made a local certificate authority");
        (key, cert.pem())
    };
    let wanted = format!("{host}\n");
    let current = std::fs::read_to_string(&made_for).unwrap_or_default();
    let (current_host, renew_at) = current.split_once('\n').unwrap_or(("", ""));
    let still_good = format!("{current_host}\n") == wanted
        && renew_at
            .trim()
            .parse::<i64>()
            .is_ok_and(|at| at > time_now().unix_timestamp())
        && files.server_cert.exists()
        && files.server_key.exists();
    if !still_good {
        let key = rcgen::KeyPair::generate()?;
        let now = time_now();
        let mut params =
            rcgen::CertificateParams::new(vec![host.to_string(), format!("*.{host}")])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host);
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(SERVER_VALIDITY_DAYS);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let issuer = rcgen::Issuer::new(authority_params(), &ca_key);
        let cert = params.signed_by(&key, &issuer)?;
        write_file(&files.server_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(
            &files.server_cert,
            format!("{}{}", cert.pem(), ca_pem).as_bytes(),
            0o644,
        )?;
        let renew_at =
            (params.not_after - time::Duration::days(RENEW_BEFORE_DAYS)).unix_timestamp();
        write_file(&made_for, format!("{host}\n{renew_at}\n").as_bytes(), 0o644)?;
        tracing::info!(
            host,
            "issued the server certificate from the local authority"
        );
    }
    let system = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
    let mut bundle = system;
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&ca_pem);
    write_file(&files.bundle, bundle.as_bytes(), 0o644)?;
    Ok(files)
}

/// The authority's parameters: the same each time, so that a certificate it signs names it
/// exactly as its own certificate does.
fn authority_params() -> rcgen::CertificateParams {
    authority_params_named(CA_NAME)
}

/// The parameters of a wrenn certificate authority named `common_name` (the local HTTPS one,
/// the fleet's two): it signs end entities only.
pub(crate) fn authority_params_named(common_name: &str) -> rcgen::CertificateParams {
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
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Writes `bytes` to `path` atomically with `mode` ([`crate::store::write_file_atomically`]).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::store::write_file_atomically(path, bytes, mode).map_err(io_error("writing", path))
}

/// How often the served certificate's files are looked at for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// A served certificate chain and key, read from their PEM files and read again when either
/// file changes (a renewal by certbot or the local authority): new handshakes get the new
/// certificate, open connections keep theirs. Files caught half-written, or a key that does
/// not match its certificate, leave the one being served in place until a later look finds
/// them whole.
#[derive(Debug)]
pub struct ServedCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
    /// The files' stamps when `current` was read from them.
    read_at: std::sync::Mutex<[FileStamp; 2]>,
}

/// What tells a file's change: its inode (a rename), size and times of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct FileStamp {
    inode: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

fn stamp(path: &Path) -> Result<FileStamp, TlsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(io_error("reading", path))?;
    Ok(FileStamp {
        inode: meta.ino(),
        size: meta.size(),
        modified: (meta.mtime(), meta.mtime_nsec()),
        changed: (meta.ctime(), meta.ctime_nsec()),
    })
}

impl ServedCertificate {
    /// The certificate chain in `cert_path` with its key in `key_path` (PEM), checked to
    /// belong together.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<ServedCertificate>, TlsError> {
        let stamps = [stamp(cert_path)?, stamp(key_path)?];
        let certified = certified_key(cert_path, key_path)?;
        Ok(Arc::new(ServedCertificate {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: std::sync::RwLock::new(certified),
            read_at: std::sync::Mutex::new(stamps),
        }))
    }

    /// Reads the files again if either changed since they were last read: `Ok(true)` when a
    /// new certificate is served from now on, an error (and the old one served) when the
    /// changed files are not a whole certificate and its key.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = [stamp(&self.cert_path)?, stamp(&self.key_path)?];
        if *self.read_at.lock().expect("stamps lock") == stamps {
            return Ok(false);
        }
        let certified = certified_key(&self.cert_path, &self.key_path)?;
        *self.current.write().expect("certificate lock") = certified;
        *self.read_at.lock().expect("stamps lock") = stamps;
        tracing::info!(path = %self.cert_path.display(), "serving the changed TLS certificate");
        Ok(true)
    }

    /// The chain served now (the server's certificate first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.read().expect("certificate lock").cert.clone()
    }

    /// The TLS settings of a server serving this certificate (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Looks at the files every `interval` until `stop` turns true, and before that (when
    /// `authority` is given: the local authority's own files) renews them once a day, so that
    /// a control plane running for a year keeps a valid certificate.
    pub fn watch(
        self: Arc<Self>,
        interval: Duration,
        authority: Option<(PathBuf, String)>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => return,
                    () = tokio::time::sleep(interval) => {}
                }
                if let Some((dir, host)) = &authority
                    && renewed.elapsed() >= Duration::from_secs(24 * 3600)
                {
                    renewed = tokio::time::Instant::now();
                    let (dir, host) = (dir.clone(), host.clone());
                    match tokio::task::spawn_blocking(move || local_authority(&dir, &host)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "cannot renew the local certificate")
                        }
                        Err(error) => tracing::warn!(%error, "the renewal stopped"),
                    }
                }
                match self.reload_if_changed() {
                    Ok(_) => failing = false,
                    // Said once, not every look, while the files stay bad.
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "the changed TLS certificate files are not usable yet: serving the previous certificate");
                    }
                    Err(_) => {}
                }
            }
        })
    }
}

impl rustls::server::ResolvesServerCert for ServedCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

/// The chain in `cert_path` and the key in `key_path`, as rustls signs with them, checked to
/// be a pair.
fn certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let pem_error = |path: &Path| {
        let path = path.to_owned();
        move |error: rustls::pki_types::pem::Error| TlsError::Pem {
            path,
            detail: error.to_string(),
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(pem_error(cert_path))?
        .collect::<Result<_, _>>()
        .map_err(pem_error(cert_path))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path.to_owned(),
            detail: "no certificate in it".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(pem_error(key_path))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|error| {
            TlsError::Pem {
                path: key_path.to_owned(),
                detail: format!("not the key of {}: {error}", cert_path.display()),
            }
        })?;
    Ok(Arc::new(certified))
}

/// One router for the TLS front: requests for `api.<domain>` go to `api`, all others to
/// `proxy` (which reads the sandbox and port from the host name).
pub fn front_router(domain_host: &str, api: axum::Router, proxy: axum::Router) -> axum::Router {
    let api_host: Arc<str> = format!("api.{domain_host}").into();
    axum::Router::new().fallback_service(tower::service_fn(
        move |mut request: http::Request<axum::body::Body>| {
            let to_api = request_host(&request).is_some_and(|host| host == *api_host);
            // The API's answers that name its own URLs (upload links) name them over HTTPS.
            request
                .headers_mut()
                .insert("x-forwarded-proto", http::HeaderValue::from_static("https"));
            let router = if to_api { api.clone() } else { proxy.clone() };
            async move {
                use tower::ServiceExt;
                router.oneshot(request).await
            }
        },
    ))
}

/// The host a request is for (HTTP/1.1 `Host`, or the HTTP/2 `:authority`), without a port.
fn request_host(request: &http::Request<axum::body::Body>) -> Option<String> {
    let raw = request
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()))?;
    let host = match raw.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => raw.as_str(),
    };
    Some(host.to_ascii_lowercase())
}

/// Serves `app` over TLS on `listener` until `stop` turns true: each connection's handshake
/// within [`wrenn_http::server::TLS_HANDSHAKE_TIMEOUT`], then HTTP/2 or HTTP/1.1 with the limits of `timeouts`.
pub fn spawn_tls_until_stopped(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: axum::Router,
    timeouts: wrenn_http::server::ServerTimeouts,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    wrenn_http::server::spawn_tls_until_stopped(listener, config, app, timeouts, stop, |app, _| app)
}

/// Serves the fleet registry (`app`) over the fleet's mutual TLS on `listener` until `stop`
/// turns true: each request carries the [`crate::fleet::FleetPeer`] its connection's verified
/// certificate names.
pub fn spawn_fleet_until_stopped(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    app: axum::Router,
    timeouts: wrenn_http::server::ServerTimeouts,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    wrenn_http::server::spawn_tls_until_stopped(
        listener,
        config,
        app,
        timeouts,
        stop,
        |app, session| {
            let host = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| wrenn_agent_api::fleet_tls::peer_host_id(leaf));
            app.layer(axum::Extension(crate::fleet::FleetPeer(host)))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_dns_names_with_an_optional_port() {
        assert_eq!(domain_host("wrenn.localhost").unwrap(), "wrenn.localhost");
        assert_eq!(
            domain_host("wrenn.localhost:8443").unwrap(),
            "wrenn.localhost"
        );
        for bad in [
            "localhost",
            "",
            "a..b",
            "-a.b",
            "Wrenn.localhost",
            "a.b:x",
            "a_b.c",
        ] {
            assert!(domain_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_local_authority_is_made_once_and_its_server_certificate_follows_the_domain() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let first = local_authority(&tls, "wrenn.localhost").unwrap();
        let ca = std::fs::read(&first.ca_cert).unwrap();
        let server = std::fs::read(&first.server_cert).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for private in [tls.join("ca-key.pem"), first.server_key.clone()] {
            let mode = std::fs::metadata(&private).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", private.display());
        }
        // The same domain again: nothing new.
        let again = local_authority(&tls, "wrenn.localhost").unwrap();
        assert_eq!(std::fs::read(&again.ca_cert).unwrap(), ca);
        assert_eq!(std::fs::read(&again.server_cert).unwrap(), server);
        // Another domain: a new server certificate from the same authority.
        let other = local_authority(&tls, "sandboxes.example.com").unwrap();
        assert_eq!(std::fs::read(&other.ca_cert).unwrap(), ca);
        assert_ne!(std::fs::read(&other.server_cert).unwrap(), server);
        // The bundle ends with the authority, and the settings load.
        let bundle = std::fs::read_to_string(&other.bundle).unwrap();
        assert!(bundle.ends_with(std::str::from_utf8(&ca).unwrap()));
        ServedCertificate::load(&other.server_cert, &other.server_key)
            .unwrap()
            .server_config()
            .unwrap();
    }

    /// The end-entity certificate a TLS client trusting `roots` is served at `address`.
    async fn served_certificate(address: std::net::SocketAddr, roots: &[&Path]) -> Vec<u8> {
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            for cert in CertificateDer::pem_file_iter(root).unwrap() {
                store.add(cert.unwrap()).unwrap();
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("api.wrenn.localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn a_changed_certificate_is_served_to_new_handshakes_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let first = local_authority(&dir.path().join("first"), "wrenn.localhost").unwrap();
        let second = local_authority(&dir.path().join("second"), "wrenn.localhost").unwrap();
        let live = dir.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let (cert, key) = (live.join("cert.pem"), live.join("key.pem"));
        std::fs::copy(&first.server_cert, &cert).unwrap();
        std::fs::copy(&first.server_key, &key).unwrap();

        let served = ServedCertificate::load(&cert, &key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(served.server_config().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        use tokio::io::AsyncReadExt;
                        let _ = tls.read(&mut [0u8; 1]).await;
                    }
                });
            }
        });
        let roots = [first.ca_cert.as_path(), second.ca_cert.as_path()];
        let der = |path: &Path| {
            CertificateDer::pem_file_iter(path)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .to_vec()
        };
        assert_eq!(
            served_certificate(address, &roots).await,
            der(&first.server_cert)
        );
        assert!(!served.reload_if_changed().unwrap(), "nothing changed yet");

        // A renewal caught half-way (a new certificate, the old key): still the old one.
        std::fs::copy(&second.server_cert, &cert).unwrap();
        let error = served.reload_if_changed().unwrap_err();
        assert!(error.to_string().contains("not the key of"), "{error}");
        assert_eq!(
            served_certificate(address, &roots).await,
            der(&first.server_cert)
        );
        // Whole: the new one, with no restart.
        std::fs::copy(&second.server_key, &key).unwrap();
        assert!(served.reload_if_changed().unwrap());
        assert_eq!(
            served_certificate(address, &roots).await,
            der(&second.server_cert)
        );
        assert_eq!(served.chain()[0].to_vec(), der(&second.server_cert));
    }
}
