//! The fleet's certificate authorities (mutual TLS between the control plane and its agents,
//! see `wrenn_agent_api::fleet_tls`): made once in `<data>/cp/fleet-tls/`, the **plane
//! authority** (`plane-ca.pem`) certifies the control plane itself (`plane.pem`, server and
//! client, renewed by the control plane before its end), the **hosts authority**
//! (`hosts-ca.pem`) certifies each host from its certificate request, naming its host id.
//! The authorities' keys are private to the control plane's user (0600).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wrenn_agent_api::fleet_tls::{
    self, Alpn, CertificateFacts, ClientCertificates, FleetTlsError, HostTls, Identity,
};

/// How long an authority is valid.
const AUTHORITY_VALIDITY_DAYS: i64 = 3650;
/// How long the control plane's own certificate is valid.
const PLANE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The shortest host certificate life an operator may set (a renewal needs a heartbeat or two).
pub const MIN_HOST_CERTIFICATE_LIFE: Duration = Duration::from_secs(30);
/// The default host certificate life.
pub const DEFAULT_HOST_CERTIFICATE_LIFE: Duration = Duration::from_secs(30 * 24 * 3600);
/// A certificate is made valid from this long ago (clocks of a fleet differ a little), or a
/// tenth of its life ago when that is less.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Why the fleet's authority could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the certificate request: {0}")]
    Request(String),
    #[error(transparent)]
    Tls(#[from] FleetTlsError),
    #[error("making a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PkiError {
    let path = path.to_owned();
    move |source| PkiError::Io { what, path, source }
}

/// One authority: its key and certificate.
struct Authority {
    key: rcgen::KeyPair,
    cert_pem: String,
}

impl Authority {
    /// The authority kept in `dir` as `<name>.pem` and `<name>-key.pem`, made when missing.
    fn open(dir: &Path, name: &str, common_name: &str) -> Result<Authority, PkiError> {
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        if cert_path.exists() && key_path.exists() {
            let read =
                |path: &Path| std::fs::read_to_string(path).map_err(io_error("reading", path));
            let key = rcgen::KeyPair::from_pem(&read(&key_path)?)?;
            return Ok(Authority {
                key,
                cert_pem: read(&cert_path)?,
            });
        }
        let key = rcgen::KeyPair::generate()?;
        let mut params = crate::tls::authority_params_named(common_name);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(AUTHORITY_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        // The key first: a certificate without its key is made again next time.
        write(&key_path, &key.serialize_pem(), 0o600)?;
        write(&cert_path, &cert.pem(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "made the fleet's {common_name}");
        Ok(Authority {
            key,
            cert_pem: cert.pem(),
        })
    }

    /// Signs a certificate for `public_key` named `name`, for servers and clients, valid
    /// `life` from now and from a little before (the clock skew allowed, at most a tenth of
    /// the life: a holder renews two thirds into the whole span, which must stay ahead).
    fn certify(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        name: &str,
        life: Duration,
    ) -> Result<String, PkiError> {
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let now = SystemTime::now();
        params.not_before = (now - CLOCK_SKEW.min(life / 10)).into();
        params.not_after = (now + life).into();
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(public_key, &issuer)?;
        // The chain a peer is given: the certificate, then its authority.
        Ok(format!("{}{}", cert.pem(), self.cert_pem))
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    crate::store::write_file_atomically(path, text.as_bytes(), mode)
        .map_err(io_error("writing", path))
}

/// The fleet's authorities and the control plane's own certificate.
pub struct FleetAuthority {
    dir: PathBuf,
    plane: Authority,
    hosts: Authority,
    /// The control plane's certificate, presented to agents both ways.
    identity: Arc<Identity>,
    /// When the control plane's certificate is to be renewed.
    plane_renew_at: Mutex<SystemTime>,
    host_life: Duration,
}

impl std::fmt::Debug for FleetAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetAuthority")
            .field("dir", &self.dir)
            .field("host_life", &self.host_life)
            .finish_non_exhaustive()
    }
}

impl FleetAuthority {
    /// The authorities kept in `dir` (made the first time), and the control plane's
    /// certificate (made, or renewed when past two thirds of its life). Hosts are certified
    /// for `host_life`.
    pub fn open(dir: &Path, host_life: Duration) -> Result<FleetAuthority, PkiError> {
        crate::store::private_dir(dir).map_err(io_error("creating", dir))?;
        let plane = Authority::open(dir, "plane-ca", "wrenn control plane authority")?;
        let hosts = Authority::open(dir, "hosts-ca", "wrenn hosts authority")?;
        let authority = FleetAuthority {
            dir: dir.to_owned(),
            plane,
            hosts,
            identity: Identity::none(),
            plane_renew_at: Mutex::new(SystemTime::UNIX_EPOCH),
            host_life: host_life.max(MIN_HOST_CERTIFICATE_LIFE),
        };
        let (cert_path, key_path) = authority.plane_files();
        let kept = match (
            std::fs::read_to_string(&cert_path),
            std::fs::read_to_string(&key_path),
        ) {
            (Ok(chain), Ok(key)) => authority
                .identity
                .set(&chain, &key)
                .ok()
                .and_then(|()| authority.identity.leaf())
                .and_then(|leaf| fleet_tls::certificate_facts(&leaf).ok()),
            _ => None,
        };
        match kept {
            Some(facts) => *authority.plane_renew_at.lock().expect("renew lock") = facts.renew_at(),
            None => authority.renew_plane()?,
        }
        authority.renew_plane_if_due()?;
        Ok(authority)
    }

    fn plane_files(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("plane.pem"), self.dir.join("plane-key.pem"))
    }

    /// Makes the control plane a new key and certificate, presented from the next handshake.
    fn renew_plane(&self) -> Result<(), PkiError> {
        let key = rcgen::KeyPair::generate()?;
        let chain = self
            .plane
            .certify(&key, fleet_tls::PLANE_NAME, PLANE_VALIDITY)?;
        let (cert_path, key_path) = self.plane_files();
        write(&key_path, &key.serialize_pem(), 0o600)?;
        write(&cert_path, &chain, 0o644)?;
        self.identity.set(&chain, &key.serialize_pem())?;
        let leaf = self.identity.leaf().expect("just set");
        *self.plane_renew_at.lock().expect("renew lock") =
            fleet_tls::certificate_facts(&leaf)?.renew_at();
        tracing::info!("made the control plane's fleet certificate");
        Ok(())
    }

    /// Renews the control plane's certificate when it is due: whether it did.
    pub fn renew_plane_if_due(&self) -> Result<bool, PkiError> {
        if SystemTime::now() < *self.plane_renew_at.lock().expect("renew lock") {
            return Ok(false);
        }
        self.renew_plane().map(|()| true)
    }

    /// The plane authority's certificate (PEM): what agents trust.
    pub fn plane_ca_pem(&self) -> &str {
        &self.plane.cert_pem
    }

    /// The SHA-256 of the plane authority's certificate: `--control-plane-ca sha256:<this>`.
    pub fn plane_ca_fingerprint(&self) -> String {
        fleet_tls::certificates(&self.plane.cert_pem, "the plane authority")
            .map(|chain| fleet_tls::fingerprint(&chain[0]))
            .unwrap_or_default()
    }

    /// How long a host's certificate is valid.
    pub fn host_life(&self) -> Duration {
        self.host_life
    }

    /// Certifies the key of `csr_der` (its signature checked: the requester holds the key)
    /// for host `host_id`: the chain (PEM, the certificate then the hosts authority's) and its
    /// facts. The request's own names and fields are ignored: the authority names the host.
    pub fn certify_host(
        &self,
        host_id: &str,
        csr_der: &[u8],
    ) -> Result<(String, CertificateFacts), PkiError> {
        let request = rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|error| PkiError::Request(error.to_string()))?;
        let chain = self.hosts.certify(
            &request.public_key,
            &fleet_tls::host_name(host_id),
            self.host_life,
        )?;
        let leaf = fleet_tls::certificates(&chain, "the host certificate")?;
        let facts = fleet_tls::certificate_facts(&leaf[0])?;
        Ok((chain, facts))
    }

    /// The TLS settings of the registry's listener: agents' certificates checked against the
    /// hosts authority when presented (a first registration comes without one).
    pub fn registry_server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        Ok(Arc::new(fleet_tls::server_config(
            fleet_tls::roots(&self.hosts.cert_pem)?,
            ClientCertificates::Optional,
            self.identity.clone(),
        )?))
    }

    /// The TLS settings of the control plane's calls to host `host_id` (its API and proxy).
    pub fn host_tls(&self, host_id: &str) -> Result<HostTls, PkiError> {
        let name = rustls::pki_types::ServerName::try_from(fleet_tls::host_name(host_id))
            .map_err(|error| PkiError::Request(format!("host id {host_id:?}: {error}")))?;
        Ok(HostTls {
            http1: self.host_client_config(host_id, Alpn::Http1)?,
            http2: self.host_client_config(host_id, Alpn::Http2)?,
            name,
        })
    }

    /// The TLS settings of the control plane's calls to host `host_id`: its certificate must
    /// be the hosts authority's for that host; the control plane presents its own.
    pub fn host_client_config(
        &self,
        host_id: &str,
        alpn: Alpn,
    ) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        Ok(Arc::new(fleet_tls::client_config(
            fleet_tls::roots(&self.hosts.cert_pem)?,
            &fleet_tls::host_name(host_id),
            self.identity.clone(),
            alpn,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server on the loopback that answers each client's byte with the host id its
    /// certificate names ("-" for none).
    async fn serve(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| fleet_tls::peer_host_id(&chain[0]))
                        .unwrap_or_else(|| "-".into());
                    let mut byte = [0u8; 1];
                    while tls.read(&mut byte).await.is_ok_and(|n| n == 1) {
                        let _ = tls.write_all(format!("{peer}\n").as_bytes()).await;
                    }
                });
            }
        });
        address
    }

    /// Connects with `config` and asks once: the answer, or the handshake's error.
    async fn ask(
        address: std::net::SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<
        (
            String,
            tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        ),
        String,
    > {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        // Dialled by address: the name checked is the pinned one.
        let dialled = rustls::pki_types::ServerName::from(address.ip());
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(dialled, tcp)
            .await
            .map_err(|error| error.to_string())?;
        tls.write_all(b"?").await.map_err(|e| e.to_string())?;
        let mut answer = vec![0u8; 64];
        // TLS 1.3: a refused client certificate shows at the first read.
        let n = tls.read(&mut answer).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        Ok((
            String::from_utf8_lossy(&answer[..n]).trim().to_string(),
            tls,
        ))
    }

    /// An agent of `authority` certified as `host_id`: its identity.
    fn certified_host(authority: &FleetAuthority, host_id: &str) -> Arc<Identity> {
        let request = fleet_tls::certificate_request().unwrap();
        let (chain, facts) = authority.certify_host(host_id, &request.csr_der).unwrap();
        assert_eq!(facts.dns_names, [fleet_tls::host_name(host_id)]);
        Identity::new(&chain, &request.key_pem).unwrap()
    }

    fn agent_server(
        authority: &FleetAuthority,
        identity: Arc<Identity>,
    ) -> Arc<rustls::ServerConfig> {
        Arc::new(
            fleet_tls::server_config(
                fleet_tls::roots(authority.plane_ca_pem()).unwrap(),
                ClientCertificates::Required,
                identity,
            )
            .unwrap(),
        )
    }

    fn agent_client(
        authority: &FleetAuthority,
        identity: Arc<Identity>,
    ) -> Arc<rustls::ClientConfig> {
        Arc::new(
            fleet_tls::client_config(
                fleet_tls::roots(authority.plane_ca_pem()).unwrap(),
                fleet_tls::PLANE_NAME,
                identity,
                Alpn::Both,
            )
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn the_control_plane_and_its_hosts_know_each_other_and_strangers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let authority =
            FleetAuthority::open(&dir.path().join("fleet"), DEFAULT_HOST_CERTIFICATE_LIFE).unwrap();
        let foreign =
            FleetAuthority::open(&dir.path().join("other"), DEFAULT_HOST_CERTIFICATE_LIFE).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for key in ["plane-ca-key.pem", "hosts-ca-key.pem", "plane-key.pem"] {
            let mode = std::fs::metadata(dir.path().join("fleet").join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }

        // The control plane calls host h1's agent.
        let h1 = certified_host(&authority, "h1");
        let agent = serve(agent_server(&authority, h1.clone())).await;
        let plane = authority.host_client_config("h1", Alpn::Both).unwrap();
        assert_eq!(ask(agent, plane.clone()).await.unwrap().0, "-");
        // Not as another host: the name is the host's.
        let as_h2 = authority.host_client_config("h2", Alpn::Both).unwrap();
        assert!(ask(agent, as_h2).await.is_err());
        // Another control plane (another authority) is refused by the agent, and its
        // calls refuse the agent too.
        let stranger = foreign.host_client_config("h1", Alpn::Both).unwrap();
        assert!(ask(agent, stranger).await.is_err());
        // Another host of the same fleet cannot call an agent: only the plane authority's
        // certificates are clients there.
        let h2 = certified_host(&authority, "h2");
        let peer_host = Arc::new(
            fleet_tls::client_config(
                fleet_tls::roots(&authority.hosts.cert_pem).unwrap(),
                &fleet_tls::host_name("h1"),
                h2.clone(),
                Alpn::Both,
            )
            .unwrap(),
        );
        assert!(ask(agent, peer_host).await.is_err());

        // The registry: a first registration without a certificate, a known host with its own.
        let registry = serve(authority.registry_server_config().unwrap()).await;
        assert_eq!(
            ask(registry, agent_client(&authority, Identity::none()))
                .await
                .unwrap()
                .0,
            "-"
        );
        assert_eq!(
            ask(registry, agent_client(&authority, h2.clone()))
                .await
                .unwrap()
                .0,
            "h2"
        );
        // A host certificate of another fleet is refused; so is a registry of another fleet.
        let foreign_host = certified_host(&foreign, "h2");
        assert!(
            ask(registry, agent_client(&authority, foreign_host))
                .await
                .is_err()
        );
        let foreign_registry = serve(foreign.registry_server_config().unwrap()).await;
        assert!(
            ask(foreign_registry, agent_client(&authority, h2))
                .await
                .is_err()
        );
        // A request whose signature is not its key's is refused.
        let mut request = fleet_tls::certificate_request().unwrap().csr_der;
        let last = request.len() - 1;
        request[last] ^= 1;
        assert!(matches!(
            authority.certify_host("h3", &request),
            Err(PkiError::Request(_))
        ));
    }

    #[tokio::test]
    async fn a_rotated_certificate_serves_new_connections_and_open_ones_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let authority = FleetAuthority::open(dir.path(), MIN_HOST_CERTIFICATE_LIFE).unwrap();
        let identity = certified_host(&authority, "h1");
        let before = identity.leaf().unwrap();
        let registry = serve(authority.registry_server_config().unwrap()).await;
        let (answer, mut open) = ask(registry, agent_client(&authority, identity.clone()))
            .await
            .unwrap();
        assert_eq!(answer, "h1");
        // The host rotates: a new key, a new certificate.
        let request = fleet_tls::certificate_request().unwrap();
        let (chain, facts) = authority.certify_host("h1", &request.csr_der).unwrap();
        let life = facts.not_after.duration_since(facts.not_before).unwrap();
        assert!(life <= MIN_HOST_CERTIFICATE_LIFE * 11 / 10, "{life:?}");
        // A short life is renewed ahead of its end, not at once.
        let renew_in = facts.renew_at().duration_since(SystemTime::now()).unwrap();
        assert!(renew_in > MIN_HOST_CERTIFICATE_LIFE / 2, "{renew_in:?}");
        identity.set(&chain, &request.key_pem).unwrap();
        assert_ne!(identity.leaf().unwrap(), before);
        assert_eq!(
            ask(registry, agent_client(&authority, identity))
                .await
                .unwrap()
                .0,
            "h1"
        );
        // The connection made before still works.
        open.write_all(b"?").await.unwrap();
        let mut answer = [0u8; 3];
        open.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"h1\n");
    }

    #[test]
    fn the_authorities_are_made_once_and_the_plane_keeps_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let first = FleetAuthority::open(dir.path(), DEFAULT_HOST_CERTIFICATE_LIFE).unwrap();
        let again = FleetAuthority::open(dir.path(), DEFAULT_HOST_CERTIFICATE_LIFE).unwrap();
        assert_eq!(first.plane_ca_pem(), again.plane_ca_pem());
        assert_eq!(first.plane_ca_fingerprint(), again.plane_ca_fingerprint());
        assert_eq!(first.plane_ca_fingerprint().len(), 64);
        assert_eq!(first.identity.leaf(), again.identity.leaf());
        assert!(!again.renew_plane_if_due().unwrap());
    }
}
