//! Mutual TLS between the control plane and its agents: what both sides build their TLS from.
//!
//! The control plane keeps two certificate authorities (`wrenn_cp::fleet::pki`): the **plane
//! authority** certifies the control plane itself (as server, to joining agents, and as client,
//! when it calls them), the **hosts authority** certifies each host. An agent trusts the plane
//! authority alone, so only the control plane can call it; the control plane trusts the hosts
//! authority, and reads which host a peer is from the name its certificate carries
//! ([`host_name`]). Names are checked whatever address was dialled ([`PinnedName`]): an agent
//! is reached by IP as often as by name, and its certificate names its host id, not an address.
//!
//! An agent makes its own key and sends a certificate request ([`CertificateRequest`]); its
//! private key never leaves it. [`Identity`] is the certificate in use, swapped whole at a
//! rotation: new handshakes present the new one, open connections keep theirs.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The name the control plane's certificate carries.
pub const PLANE_NAME: &str = "control-plane.wrenn.internal";
/// A host's certificate names it `<host id>` + this.
const HOST_NAME_SUFFIX: &str = ".host.wrenn.internal";

/// The name a host's certificate carries.
pub fn host_name(host_id: &str) -> String {
    format!("{host_id}{HOST_NAME_SUFFIX}")
}

/// The host id a host certificate's name stands for.
pub fn host_id_of(name: &str) -> Option<&str> {
    name.strip_suffix(HOST_NAME_SUFFIX)
        .filter(|id| !id.is_empty() && !id.contains('.'))
}

/// Why fleet TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FleetTlsError {
    #[error("{what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("making a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("reading a certificate: {0}")]
    Unreadable(String),
    #[error("the certificate authority: {0}")]
    Verifier(String),
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in a PEM text, in order.
pub fn certificates(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, FleetTlsError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| FleetTlsError::Pem {
            what,
            detail: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(FleetTlsError::Pem {
            what,
            detail: "no certificate in it".into(),
        });
    }
    Ok(chain)
}

/// A certificate authority's PEM as the roots a peer is checked against.
pub fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>, FleetTlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certificates(ca_pem, "the certificate authority")? {
        store
            .add(cert)
            .map_err(|error| FleetTlsError::Verifier(error.to_string()))?;
    }
    Ok(Arc::new(store))
}

/// The SHA-256 of a certificate's DER, in lowercase hex: how an agent that has not joined yet
/// pins the control plane's authority (`--control-plane-ca sha256:…`).
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The certificate (chain and key) one side presents, replaced whole at a rotation.
pub struct Identity {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("set", &self.is_set())
            .finish()
    }
}

impl Identity {
    /// No certificate yet (an agent before its first registration presents none).
    pub fn none() -> Arc<Identity> {
        Arc::new(Identity {
            current: RwLock::new(None),
        })
    }

    /// The chain in `chain_pem` (the end entity first) with the key in `key_pem`.
    pub fn new(chain_pem: &str, key_pem: &str) -> Result<Arc<Identity>, FleetTlsError> {
        let identity = Identity::none();
        identity.set(chain_pem, key_pem)?;
        Ok(identity)
    }

    /// Presents this chain and key from the next handshake on (checked to be a pair first;
    /// on an error the previous one stays).
    pub fn set(&self, chain_pem: &str, key_pem: &str) -> Result<(), FleetTlsError> {
        let chain = certificates(chain_pem, "the certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|error| {
            FleetTlsError::Pem {
                what: "the private key",
                detail: error.to_string(),
            }
        })?;
        let certified = CertifiedKey::from_der(chain, key, &ring())?;
        *self.current.write().expect("identity lock") = Some(Arc::new(certified));
        Ok(())
    }

    /// Presents nothing from the next handshake (a certificate past its end).
    pub fn clear(&self) {
        *self.current.write().expect("identity lock") = None;
    }

    /// Whether there is a certificate to present.
    pub fn is_set(&self) -> bool {
        self.current.read().expect("identity lock").is_some()
    }

    /// The end-entity certificate presented now.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current
            .read()
            .expect("identity lock")
            .as_ref()
            .map(|key| key.cert[0].clone())
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("identity lock").clone()
    }
}

impl rustls::server::ResolvesServerCert for Identity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

/// Checks a server's chain against the roots and its name against one fixed name, whatever
/// name or address the client dialled.
#[derive(Debug)]
pub struct PinnedName {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl PinnedName {
    pub fn new(
        roots: Arc<rustls::RootCertStore>,
        name: &str,
    ) -> Result<Arc<PinnedName>, FleetTlsError> {
        let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, ring())
            .build()
            .map_err(|error| FleetTlsError::Verifier(error.to_string()))?;
        let name = ServerName::try_from(name.to_string())
            .map_err(|error| FleetTlsError::Verifier(format!("{name:?}: {error}")))?;
        Ok(Arc::new(PinnedName { chain, name }))
    }
}

impl ServerCertVerifier for PinnedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// An agent's check of the control plane at its first registration, before it has the
/// control plane's authority: the chain the server presents must hold the authority whose
/// fingerprint the operator gave (`--control-plane-ca sha256:…`), and the server's certificate
/// must be that authority's for [`PLANE_NAME`]. The authority it found is kept
/// ([`FirstContact::authority`]) for every later connection.
#[derive(Debug)]
pub struct FirstContact {
    fingerprint: String,
    name: ServerName<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: std::sync::Mutex<Option<CertificateDer<'static>>>,
}

impl FirstContact {
    /// Checks servers against the authority of this SHA-256 fingerprint (hex).
    pub fn new(fingerprint: &str) -> Arc<FirstContact> {
        Arc::new(FirstContact {
            fingerprint: fingerprint.to_ascii_lowercase(),
            name: ServerName::try_from(PLANE_NAME).expect("a valid DNS name"),
            provider: ring(),
            found: std::sync::Mutex::new(None),
        })
    }

    /// The authority a server presented and passed with (PEM), once one did.
    pub fn authority(&self) -> Option<String> {
        let found = self.found.lock().expect("found lock");
        found.as_ref().map(|der| {
            let body: String = base64_lines(der);
            format!("-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n")
        })
    }
}

/// DER as PEM's body: base64 in lines of 64.
fn base64_lines(der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut lines = String::new();
    for line in text.as_bytes().chunks(64) {
        lines.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        lines.push('\n');
    }
    lines
}

impl ServerCertVerifier for FirstContact {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let authority = intermediates
            .iter()
            .find(|cert| fingerprint(cert) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the control plane's certificate authority is not the one --control-plane-ca names"
                        .into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(authority.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|error| rustls::Error::General(error.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], &self.name, ocsp_response, now)?;
        *self.found.lock().expect("found lock") = Some(authority.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client's TLS settings for an agent's first registration: the server checked by
/// [`FirstContact`]; `identity` presented when set.
pub fn first_contact_config(
    check: Arc<FirstContact>,
    identity: Arc<Identity>,
) -> Result<rustls::ClientConfig, FleetTlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(check)
        .with_client_cert_resolver(identity);
    config.alpn_protocols = Alpn::Http1.protocols();
    Ok(config)
}

/// The application protocols a fleet connection offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2 alone (Connect calls; a forwarded HTTP/2 request).
    Http2,
    /// HTTP/1.1 alone (a forwarded HTTP/1.1 request, which may upgrade to a WebSocket).
    Http1,
    /// Either, as the server prefers.
    Both,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::Http2 => vec![b"h2".to_vec()],
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

/// A client's TLS settings: the server's chain checked against `server_roots` and its name
/// against `server_name`; `identity` presented when the server asks (none while unset).
pub fn client_config(
    server_roots: Arc<rustls::RootCertStore>,
    server_name: &str,
    identity: Arc<Identity>,
    alpn: Alpn,
) -> Result<rustls::ClientConfig, FleetTlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(PinnedName::new(server_roots, server_name)?)
        .with_client_cert_resolver(identity);
    config.alpn_protocols = alpn.protocols();
    Ok(config)
}

/// The TLS settings of calls to one host: one per protocol the call speaks (a forwarded
/// HTTP/2 request must reach the host's proxy over HTTP/2, an HTTP/1.1 one over HTTP/1.1).
#[derive(Debug, Clone)]
pub struct HostTls {
    pub http1: Arc<rustls::ClientConfig>,
    pub http2: Arc<rustls::ClientConfig>,
    /// The name the host's certificate carries (sent as SNI; checked whatever was dialled).
    pub name: ServerName<'static>,
}

/// Whether a server takes clients without a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Every client presents one the roots certify (an agent's API and proxy).
    Required,
    /// A client may present none (the control plane's registry, where an agent's first
    /// registration comes with the join token alone); one it presents is checked all the same.
    Optional,
}

/// A server's TLS settings: `identity` presented, clients checked against `client_roots`,
/// HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(
    client_roots: Arc<rustls::RootCertStore>,
    clients: ClientCertificates,
    identity: Arc<Identity>,
) -> Result<rustls::ServerConfig, FleetTlsError> {
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(client_roots, ring());
    let verifier = match clients {
        ClientCertificates::Required => builder.build(),
        ClientCertificates::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|error| FleetTlsError::Verifier(error.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = Alpn::Both.protocols();
    Ok(config)
}

/// A new private key and a request to certify it.
#[derive(Debug)]
pub struct CertificateRequest {
    /// The private key (PKCS#8 PEM): kept by its maker, never sent.
    pub key_pem: String,
    /// The signed request (DER), sent to the authority.
    pub csr_der: Vec<u8>,
}

/// Makes a key (ECDSA P-256) and a request for it. The authority decides the certificate's
/// names and life; the request proves only the key.
pub fn certificate_request() -> Result<CertificateRequest, FleetTlsError> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    Ok(CertificateRequest {
        key_pem: key.serialize_pem(),
        csr_der: csr.der().to_vec(),
    })
}

/// What a certificate says of itself that its holders act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Its subject alternative DNS names.
    pub dns_names: Vec<String>,
}

impl CertificateFacts {
    /// When its holder asks for the next one: two thirds into its life, so that a host that
    /// misses a renewal has a third of it to try again.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life * 2 / 3
    }
}

/// Reads a certificate's life and names.
pub fn certificate_facts(der: &[u8]) -> Result<CertificateFacts, FleetTlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|error| FleetTlsError::Unreadable(error.to_string()))?;
    let at = |time: x509_parser::time::ASN1Time| {
        let seconds = time.timestamp();
        if seconds >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let validity = cert.validity();
    let dns_names = cert
        .subject_alternative_name()
        .map_err(|error| FleetTlsError::Unreadable(error.to_string()))?
        .map(|names| {
            names
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertificateFacts {
        not_before: at(validity.not_before),
        not_after: at(validity.not_after),
        dns_names,
    })
}

/// The host id a peer's (already verified) certificate names, if it names one.
pub fn peer_host_id(der: &[u8]) -> Option<String> {
    certificate_facts(der)
        .ok()?
        .dns_names
        .iter()
        .find_map(|name| host_id_of(name).map(str::to_string))
}

/// A fleet's two authorities made in memory, for this crate's tests: an agent's server
/// settings for host `h1`, and the control plane's settings to call it.
#[cfg(test)]
pub(crate) fn test_fleet() -> (rustls::ServerConfig, HostTls) {
    let authority = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (key, params, cert.pem())
    };
    let certified =
        |(ca_key, ca_params, ca_pem): &(rcgen::KeyPair, rcgen::CertificateParams, String),
         name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            let issuer = rcgen::Issuer::from_params(ca_params, ca_key);
            let cert = params.signed_by(&key, &issuer).unwrap();
            Identity::new(&format!("{}{ca_pem}", cert.pem()), &key.serialize_pem()).unwrap()
        };
    let (plane, hosts) = (authority("plane"), authority("hosts"));
    let agent = server_config(
        roots(&plane.2).unwrap(),
        ClientCertificates::Required,
        certified(&hosts, &host_name("h1")),
    )
    .unwrap();
    let plane_identity = certified(&plane, PLANE_NAME);
    let config = |alpn| {
        Arc::new(
            client_config(
                roots(&hosts.2).unwrap(),
                &host_name("h1"),
                plane_identity.clone(),
                alpn,
            )
            .unwrap(),
        )
    };
    let tls = HostTls {
        http1: config(Alpn::Http1),
        http2: config(Alpn::Http2),
        name: ServerName::try_from(host_name("h1")).unwrap(),
    };
    (agent, tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_carry_the_host_id_and_nothing_else_passes_for_one() {
        assert_eq!(host_name("h123"), "h123.host.wrenn.internal");
        assert_eq!(host_id_of("h123.host.wrenn.internal"), Some("h123"));
        for not in [
            PLANE_NAME,
            ".host.wrenn.internal",
            "a.b.host.wrenn.internal",
            "h123.host.wrenn.internal.evil",
        ] {
            assert_eq!(host_id_of(not), None, "{not}");
        }
    }

    #[test]
    fn a_request_proves_its_key_and_an_identity_refuses_a_key_not_its_certificates() {
        let request = certificate_request().unwrap();
        assert!(request.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let parsed =
            rcgen::CertificateSigningRequestParams::from_der(&request.csr_der.clone().into())
                .unwrap();
        // A self-signed certificate for the requested key is an identity with that key...
        let key = rcgen::KeyPair::from_pem(&request.key_pem).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
        let identity = Identity::new(&cert.pem(), &request.key_pem).unwrap();
        assert!(identity.is_set());
        // ...and not with another.
        let other = certificate_request().unwrap();
        assert!(identity.set(&cert.pem(), &other.key_pem).is_err());
        assert_eq!(identity.leaf().unwrap().to_vec(), cert.der().to_vec());
        let facts = certificate_facts(cert.der()).unwrap();
        assert_eq!(facts.dns_names, ["x.example"]);
        assert!(facts.renew_at() > facts.not_before && facts.renew_at() < facts.not_after);
    }
}
