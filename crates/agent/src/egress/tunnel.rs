//! Connections through a sandbox's egress proxy (E2B's `egressProxy`): SOCKS5 (RFC 1928, with
//! RFC 1929's username and password when given) or HTTP `CONNECT`. A connection admitted by a
//! domain rule asks the proxy for the name (SOCKS5's ATYP domain: the proxy resolves it);
//! any other asks for the address. The proxy's own address is resolved when dialled, and one in
//! a range the operator closes is refused: egress fails closed, never around the proxy. With
//! `tls`, the handshake and the tunnelled bytes run inside TLS to the proxy (verified; no
//! fallback to plain TCP).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use wrenn_agent_api::network::{ProxyKind, ProxyTarget, ProxyTls};

use super::Upstream;
use super::service::ClosedRanges;
use crate::host_network::SlotDialer;

/// The whole of a tunnel's setup (dial and handshake).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

fn refused(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, why.into())
}

/// A connection to `destination` (asked for by `name` when a domain rule admitted it) through
/// `proxy`.
pub async fn open(
    proxy: &ProxyTarget,
    destination: SocketAddr,
    name: Option<&str>,
    dialer: &SlotDialer,
    closed: &ClosedRanges,
) -> io::Result<Upstream> {
    tokio::time::timeout(SETUP_TIMEOUT, async {
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((proxy.host.as_str(), proxy.port))
            .await?
            .collect();
        let address = addresses
            .iter()
            .find(|address| !closed.contains(address.ip()))
            .ok_or_else(|| {
                refused(format!(
                    "the egress proxy {} resolves to no address guests may reach",
                    proxy.host
                ))
            })?;
        let tcp = dialer.connect(*address, SETUP_TIMEOUT).await?;
        let _ = tcp.set_nodelay(true);
        let mut stream: Upstream = match &proxy.tls {
            None => Box::new(tcp),
            Some(tls) => Box::new(tls_to(tcp, tls).await?),
        };
        match proxy.kind {
            ProxyKind::Socks5 => socks5(&mut stream, proxy, destination, name).await?,
            ProxyKind::HttpConnect => http_connect(&mut stream, proxy, destination, name).await?,
        }
        Ok(stream)
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the egress proxy took too long"))?
}

/// TLS to the proxy: verified against its `caCert` (which replaces the system's trust store)
/// or the system's, for its server name; TLS 1.2 or newer; never a fallback to plain TCP.
async fn tls_to(
    tcp: TcpStream,
    tls: &ProxyTls,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let roots = match &tls.ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| refused(format!("the proxy's caCert: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| refused(format!("the proxy's caCert: {e}")))?;
            }
            Arc::new(roots)
        }
        None => system_roots(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| refused(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| refused(format!("the proxy's server name: {e}")))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| refused(format!("TLS with the egress proxy: {e}")))
}

/// The host's trust store, read once (for TLS to egress proxies and to transformed
/// destinations).
pub(crate) fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            Arc::new(roots)
        })
        .clone()
}

async fn socks5<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    proxy: &ProxyTarget,
    destination: SocketAddr,
    name: Option<&str>,
) -> io::Result<()> {
    let with_login = proxy.username.is_some();
    // Greeting: version 5, the methods we offer (0: none, 2: username/password).
    let greeting: &[u8] = if with_login { &[5, 1, 2] } else { &[5, 1, 0] };
    stream.write_all(greeting).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    match (choice, with_login) {
        ([5, 0], false) => {}
        ([5, 2], true) => {
            let user = proxy.username.as_deref().unwrap_or("").as_bytes();
            let password = proxy.password.as_deref().unwrap_or("").as_bytes();
            let mut login = vec![1, user.len() as u8];
            login.extend(user);
            login.push(password.len() as u8);
            login.extend(password);
            stream.write_all(&login).await?;
            let mut status = [0u8; 2];
            stream.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(refused("the egress proxy refused the login"));
            }
        }
        _ => return Err(refused("the egress proxy does not speak SOCKS5 as asked")),
    }
    let mut request = vec![5, 1, 0];
    match (name, destination) {
        (Some(name), _) => {
            request.push(3);
            request.push(name.len() as u8);
            request.extend(name.as_bytes());
        }
        (None, SocketAddr::V4(v4)) => {
            request.push(1);
            request.extend(v4.ip().octets());
        }
        (None, SocketAddr::V6(v6)) => {
            request.push(4);
            request.extend(v6.ip().octets());
        }
    }
    request.extend(destination.port().to_be_bytes());
    stream.write_all(&request).await?;
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await?;
    if reply[0] != 5 || reply[1] != 0 {
        return Err(refused(format!(
            "the egress proxy did not connect (SOCKS5 reply {})",
            reply[1]
        )));
    }
    // The bound address, which we do not need.
    let skip = match reply[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut len = [0u8; 1];
            stream.read_exact(&mut len).await?;
            usize::from(len[0])
        }
        _ => return Err(refused("the egress proxy's reply is malformed")),
    };
    let mut bound = vec![0u8; skip + 2];
    stream.read_exact(&mut bound).await?;
    Ok(())
}

async fn http_connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    proxy: &ProxyTarget,
    destination: SocketAddr,
    name: Option<&str>,
) -> io::Result<()> {
    let target = match name {
        Some(name) => format!("{name}:{}", destination.port()),
        None => destination.to_string(),
    };
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(user) = &proxy.username {
        let login = format!("{user}:{}", proxy.password.as_deref().unwrap_or(""));
        request.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(login)
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The answer's head, read a byte at a time so nothing of the tunnel is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(refused("the egress proxy's answer is too long"));
        }
        stream.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    let status_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(200..=299) => Ok(()),
        Some(code) => Err(refused(format!(
            "the egress proxy answered CONNECT with {code}"
        ))),
        None => Err(refused("the egress proxy does not speak HTTP CONNECT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn target(kind: ProxyKind, port: u16, login: bool) -> ProxyTarget {
        ProxyTarget {
            kind,
            host: "127.0.0.1".into(),
            port,
            username: login.then(|| "user".into()),
            password: login.then(|| "secret".into()),
            tls: None,
        }
    }

    /// A SOCKS5 server that wants a login and records what it was asked for, then echoes.
    async fn socks5_server() -> (u16, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        socks5_server_over(None).await
    }

    /// The same, over TLS with `tls` when given.
    async fn socks5_server_over(
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (u16, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (told, asked) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s: Upstream = match tls {
                None => Box::new(tcp),
                Some(config) => match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                    Ok(stream) => Box::new(stream),
                    Err(_) => return,
                },
            };
            let mut greeting = [0u8; 3];
            s.read_exact(&mut greeting).await.unwrap();
            assert_eq!(greeting, [5, 1, 2]);
            s.write_all(&[5, 2]).await.unwrap();
            let mut login = [0u8; 2 + 4 + 1 + 6];
            s.read_exact(&mut login).await.unwrap();
            assert_eq!(&login, b"\x01\x04user\x06secret");
            s.write_all(&[1, 0]).await.unwrap();
            let mut head = [0u8; 5];
            s.read_exact(&mut head).await.unwrap();
            let mut rest = vec![0u8; usize::from(head[4]) + 2];
            s.read_exact(&mut rest).await.unwrap();
            let mut request = head.to_vec();
            request.extend(rest);
            told.send(request).unwrap();
            s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 80])
                .await
                .unwrap();
            let mut buffer = [0u8; 5];
            s.read_exact(&mut buffer).await.unwrap();
            s.write_all(&buffer).await.unwrap();
        });
        (port, asked)
    }

    #[tokio::test]
    async fn socks5_asks_for_the_name_with_the_login_and_then_carries_the_bytes() {
        let (port, asked) = socks5_server().await;
        let destination: SocketAddr = "10.9.9.9:443".parse().unwrap();
        let mut stream = open(
            &target(ProxyKind::Socks5, port, true),
            destination,
            Some("api.test"),
            &SlotDialer::Host,
            &ClosedRanges::new(vec!["127.0.0.0/8".parse().unwrap()]),
        )
        .await
        .unwrap();
        let request = asked.await.unwrap();
        assert_eq!(&request[..5], &[5, 1, 0, 3, 8]);
        assert_eq!(&request[5..13], b"api.test");
        assert_eq!(&request[13..], &443u16.to_be_bytes());
        stream.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"hello");
    }

    #[tokio::test]
    async fn http_connect_asks_for_the_address_and_fails_closed_on_a_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let opened = ClosedRanges::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let server = tokio::spawn(async move {
            let mut asked = Vec::new();
            for answer in [
                "HTTP/1.1 200 Connection established\r\n\r\n",
                "HTTP/1.1 403 Forbidden\r\n\r\n",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    s.read_exact(&mut byte).await.unwrap();
                    head.push(byte[0]);
                }
                asked.push(String::from_utf8(head).unwrap());
                s.write_all(answer.as_bytes()).await.unwrap();
            }
            asked
        });
        let proxy = target(ProxyKind::HttpConnect, port, true);
        let destination: SocketAddr = "10.9.9.9:7000".parse().unwrap();
        open(&proxy, destination, None, &SlotDialer::Host, &opened)
            .await
            .unwrap();
        let error = open(&proxy, destination, None, &SlotDialer::Host, &opened)
            .await
            .err()
            .expect("refused");
        assert!(error.to_string().contains("403"), "{error}");
        let asked = server.await.unwrap();
        assert!(
            asked[0].starts_with("CONNECT 10.9.9.9:7000 HTTP/1.1\r\n"),
            "{}",
            asked[0]
        );
        assert!(asked[0].contains("Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n"));
        // A proxy in a closed range is never dialled.
        let closed = ClosedRanges::new(Vec::new());
        let error = open(&proxy, destination, None, &SlotDialer::Host, &closed)
            .await
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains("no address guests may reach"),
            "{error}"
        );
    }

    /// TLS to the proxy: verified against its caCert for its server name, and the SOCKS5
    /// handshake inside; a proxy whose certificate does not verify gets nothing.
    #[tokio::test]
    async fn tls_to_the_proxy_is_verified_and_carries_the_handshake() {
        use crate::egress::transform::{Interceptor, SandboxCa, upstream_tls};
        let authority = SandboxCa::generate("proxy-authority").unwrap();
        let server = Interceptor::new(&authority, upstream_tls(None).unwrap())
            .unwrap()
            .server_config("proxy.test")
            .unwrap();
        let destination: SocketAddr = "10.9.9.9:443".parse().unwrap();
        let with_tls = |port, ca: Option<&str>, server_name: &str| ProxyTarget {
            tls: Some(ProxyTls {
                server_name: server_name.into(),
                ca_pem: ca.map(str::to_string),
            }),
            ..target(ProxyKind::Socks5, port, true)
        };
        let opened = ClosedRanges::new(vec!["127.0.0.0/8".parse().unwrap()]);

        let (port, asked) = socks5_server_over(Some(server.clone())).await;
        let mut stream = open(
            &with_tls(port, Some(&authority.cert_pem), "proxy.test"),
            destination,
            Some("api.test"),
            &SlotDialer::Host,
            &opened,
        )
        .await
        .unwrap();
        assert_eq!(&asked.await.unwrap()[5..13], b"api.test");
        stream.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"hello");

        // The system's trust store does not know the proxy's authority; nor does a certificate
        // for another name pass: refused, and the proxy hears no SOCKS5.
        for (ca, name) in [
            (None, "proxy.test"),
            (Some(authority.cert_pem.as_str()), "other.test"),
        ] {
            let (port, asked) = socks5_server_over(Some(server.clone())).await;
            let error = open(
                &with_tls(port, ca, name),
                destination,
                None,
                &SlotDialer::Host,
                &opened,
            )
            .await
            .err()
            .expect("refused");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
            assert!(asked.await.is_err(), "the proxy was asked for something");
        }
    }
}
