//! The agent's per-slot proxy and resolver for domain rules: a TCP listener and a UDP socket
//! made inside the slot's namespace (where the firewall's redirect chain sends the guest's
//! named connections and DNS), served by the agent's runtime. The proxy's own connections
//! leave from the slot's namespace too ([`SlotDialer`]), under the same firewall as the guest's;
//! the resolver's queries go from the host to the operator's upstream.
//!
//! - **Proxy**: a connection's original destination is read from the connection tracker
//!   (`SO_ORIGINAL_DST`), its first bytes are read for a name ([`super::sniff`]), the slot's
//!   [`SlotEgress`] decides; an admitted one is joined to a connection to its destination and
//!   ended (reset) when the rules stop allowing it or the sandbox stops; a refused one is reset.
//! - **Resolver**: a query for an allowed domain is forwarded upstream and the addresses of the
//!   answer learned (they are the addresses that name may be reached at); another name is
//!   forwarded only when the guest could have reached its own resolver anyway (its address not
//!   denied by the lists), else answered REFUSED. So DNS cannot be used to reach, or learn,
//!   names the rules do not give.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use wrenn_agent_api::network::{AddressVerdict, EgressPolicy};

use super::SlotEgress;
use super::sniff::{self, Sniffed};
use super::transform::{Intercepted, Interceptor, Prefixed, upstream_tls};
use crate::error::AgentError;
use crate::firewall::{CLOSED_RANGES, Egress, Ipv4Cidr};
use crate::host_network::{HostNetwork, SlotDialer, SlotSockets};
use crate::network::Slot;

/// How long a connection's first bytes may take to name what it asks for.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection to a destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the upstream resolver may take to answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);
/// The most queries a slot's resolver answers at once.
const DNS_AT_ONCE: usize = 64;

/// Whether the operator closes an address to every guest (its closed ranges minus the ranges
/// it opened; IPv6, which slots do not have, is closed).
#[derive(Debug, Clone)]
pub struct ClosedRanges {
    opened: Vec<Ipv4Cidr>,
}

impl ClosedRanges {
    pub fn new(opened: Vec<Ipv4Cidr>) -> Self {
        ClosedRanges { opened }
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        match address {
            IpAddr::V4(v4) => {
                CLOSED_RANGES.iter().any(|(range, _)| range.contains(v4))
                    && !self.opened.iter().any(|range| range.contains(v4))
            }
            IpAddr::V6(_) => true,
        }
    }
}

/// A slot whose domain rules are served.
#[derive(Debug)]
struct Served {
    state: Arc<SlotEgress>,
    stop: CancellationToken,
    /// The proxy's and the resolver's tasks: each owns its socket, closed when it ends.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Served {
    /// Ends the admitted connections and the tasks, and waits until the tasks (and so the
    /// sockets) are gone: the slot's ports are free again when this returns.
    async fn end(self) {
        self.state.end();
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The proxies and resolvers of an agent's slots.
#[derive(Debug)]
pub struct EgressService {
    network: Arc<dyn HostNetwork>,
    upstream_dns: SocketAddr,
    closed: ClosedRanges,
    /// Authorities (PEM) the agent trusts besides the host's when it opens TLS for a header
    /// transform (`--egress-ca-file`).
    extra_authorities: Option<PathBuf>,
    /// Those TLS settings, made on first use.
    upstream_tls: OnceLock<Arc<rustls::ClientConfig>>,
    served: Mutex<HashMap<u32, Served>>,
}

impl EgressService {
    pub fn new(
        network: Arc<dyn HostNetwork>,
        upstream_dns: SocketAddr,
        closed: ClosedRanges,
        extra_authorities: Option<PathBuf>,
    ) -> Self {
        EgressService {
            network,
            upstream_dns,
            closed,
            extra_authorities,
            upstream_tls: OnceLock::new(),
            served: Mutex::new(HashMap::new()),
        }
    }

    /// The interceptor of a slot whose egress has header transforms.
    fn interceptor(&self, egress: &Egress) -> Result<Option<Arc<Interceptor>>, AgentError> {
        let Egress::Internet { ca: Some(ca), .. } = egress else {
            return Ok(None);
        };
        let upstream = match self.upstream_tls.get() {
            Some(config) => config.clone(),
            None => {
                let config = upstream_tls(self.extra_authorities.as_deref())?;
                self.upstream_tls.get_or_init(|| config).clone()
            }
        };
        Ok(Some(Arc::new(Interceptor::new(ca, upstream)?)))
    }

    /// Makes a slot's domain rules `egress`'s: served from now on (the proxy and resolver made
    /// the first time), replaced (admitted connections they forbid now are cut), or, for
    /// egress without domain rules, no longer served (every connection admitted through the
    /// proxy is cut; the guest's next ones go out directly under the address lists).
    pub async fn apply(&self, slot: &Slot, egress: &Egress) -> Result<(), AgentError> {
        let Egress::Internet {
            proxied: Some(policy),
            resolver,
            ..
        } = egress
        else {
            self.release(slot.index).await;
            return Ok(());
        };
        let interceptor = self.interceptor(egress)?;
        let existing = self
            .served
            .lock()
            .expect("served lock")
            .get(&slot.index)
            .map(|served| served.state.clone());
        if let Some(state) = existing {
            state.set_interceptor(interceptor);
            let closed = self.closed.clone();
            let cut = state.set_policy((**policy).clone(), |a| closed.contains(a));
            if cut > 0 {
                tracing::info!(
                    slot = slot.index,
                    cut,
                    "connections the new rules forbid were cut"
                );
            }
            return Ok(());
        }
        let SlotSockets {
            proxy: listener,
            resolver: dns,
            dialer,
        } = self.network.bind_in_slot(slot).await?;
        listener
            .set_nonblocking(true)
            .and_then(|()| dns.set_nonblocking(true))
            .map_err(|e| AgentError::internal("making the slot's sockets non-blocking", e))?;
        let listener = TcpListener::from_std(listener)
            .map_err(|e| AgentError::internal("serving the slot's proxy", e))?;
        let dns = UdpSocket::from_std(dns)
            .map_err(|e| AgentError::internal("serving the slot's resolver", e))?;
        let state = Arc::new(SlotEgress::new((**policy).clone()));
        state.set_interceptor(interceptor);
        let stop = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(serve_proxy(
                listener,
                dialer,
                state.clone(),
                self.closed.clone(),
                stop.clone(),
            )),
            tokio::spawn(serve_resolver(
                dns,
                state.clone(),
                self.upstream_dns,
                *resolver,
                self.closed.clone(),
                stop.clone(),
            )),
        ];
        let previous = self
            .served
            .lock()
            .expect("served lock")
            .insert(slot.index, Served { state, stop, tasks });
        if let Some(previous) = previous {
            previous.end().await;
        }
        tracing::debug!(slot = slot.index, "domain rules served");
        Ok(())
    }

    /// Stops serving a slot: its proxy and resolver close (their ports are free when this
    /// returns) and their connections end.
    pub async fn release(&self, index: u32) {
        let served = self.served.lock().expect("served lock").remove(&index);
        if let Some(served) = served {
            served.end().await;
        }
    }

    /// The slot's state, while its domain rules are served.
    pub fn state(&self, index: u32) -> Option<Arc<SlotEgress>> {
        self.served
            .lock()
            .expect("served lock")
            .get(&index)
            .map(|served| served.state.clone())
    }
}

async fn serve_proxy(
    listener: TcpListener,
    dialer: SlotDialer,
    state: Arc<SlotEgress>,
    closed: ClosedRanges,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (dialer, state, closed, stop) =
            (dialer.clone(), state.clone(), closed.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = proxy_connection(stream, &dialer, &state, &closed) => {}
            }
        });
    }
}

/// The destination a redirected connection was sent to.
fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let address = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)?;
    let ip = Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr));
    Ok(SocketAddr::from((ip, u16::from_be(address.sin_port))))
}

/// Ends a connection with a reset (the guest's socket sees it refused or cut, not finished).
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn proxy_connection(
    mut guest: TcpStream,
    dialer: &SlotDialer,
    state: &Arc<SlotEgress>,
    closed: &ClosedRanges,
) {
    let Ok(destination) = original_destination(&guest) else {
        return reset(guest);
    };
    let mut first = Vec::new();
    let name = sniff_name(&mut guest, destination.port(), &mut first).await;
    let admission = match state.admit(destination, name.as_deref(), |a| closed.contains(a)) {
        Ok(admission) => admission,
        Err(why) => {
            tracing::debug!(%destination, name = name.as_deref().unwrap_or(""), why, "egress refused");
            return reset(guest);
        }
    };
    let ends = admission.ends.clone();
    let policy = state.policy();
    let upstream = match &policy.egress_proxy {
        // A name is asked for only when a domain rule admitted it by that name.
        Some(proxy) => {
            let by_name = name.as_deref().filter(|name| policy.allows_domain(name));
            super::tunnel::open(proxy, destination, by_name, dialer, closed).await
        }
        None => dialer
            .connect(destination, CONNECT_TIMEOUT)
            .await
            .map(|tcp| {
                let _ = tcp.set_nodelay(true);
                Box::new(tcp) as super::Upstream
            }),
    };
    let mut upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::debug!(%destination, %error, "egress connection failed");
            return reset(guest);
        }
    };
    // A transformed name, at an address the sandbox's resolver gave for it: relayed request
    // by request, its headers set.
    if let Some(name) = &name
        && policy.headers_for(name).is_some()
        && let Some(interceptor) = state.interceptor()
        && state.resolved_to(name, destination.ip())
    {
        let headers: super::transform::HeaderSource = {
            let (state, name) = (state.clone(), name.clone());
            Arc::new(move || {
                state
                    .policy()
                    .headers_for(&name)
                    .map(<[_]>::to_vec)
                    .unwrap_or_default()
            })
        };
        let relay = super::transform::relay(Intercepted {
            guest: Prefixed::new(first, guest),
            upstream,
            name: name.clone(),
            tls: destination.port() == 443,
            headers,
            interceptor: &interceptor,
            ends: ends.clone(),
            keep: admission.keep.clone(),
        });
        tokio::select! {
            () = ends.cancelled() => {}
            relayed = relay => {
                if let Err(error) = relayed {
                    tracing::debug!(%destination, name, %error, "a transformed connection failed");
                }
            }
        }
        return;
    }
    if upstream.write_all(&first).await.is_err() {
        return reset(guest);
    }
    tokio::select! {
        () = ends.cancelled() => reset(guest),
        _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream) => {}
    }
}

/// Reads a connection's first bytes (kept in `first`) until they name what they ask for, or
/// say they will not; `None` for no name.
async fn sniff_name(guest: &mut TcpStream, port: u16, first: &mut Vec<u8>) -> Option<String> {
    let read: fn(&[u8]) -> Sniffed = match port {
        443 => sniff::tls_server_name,
        80 => sniff::http_host,
        _ => return None,
    };
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut buffer = [0u8; 4096];
    loop {
        match read(first) {
            Sniffed::Name(name) => return Some(name),
            Sniffed::Nameless | Sniffed::Unrecognised => return None,
            Sniffed::NeedMore if first.len() >= sniff::MOST_BYTES => return None,
            Sniffed::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, guest.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => first.extend_from_slice(&buffer[..n]),
            _ => return None,
        }
    }
}

async fn serve_resolver(
    socket: UdpSocket,
    state: Arc<SlotEgress>,
    upstream: SocketAddr,
    guest_resolver: Ipv4Addr,
    closed: ClosedRanges,
    stop: CancellationToken,
) {
    let socket = Arc::new(socket);
    let at_once = Arc::new(tokio::sync::Semaphore::new(DNS_AT_ONCE));
    let mut buffer = vec![0u8; 4096];
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            received = socket.recv_from(&mut buffer) => received,
        };
        let Ok((len, from)) = received else {
            continue;
        };
        let Ok(permit) = at_once.clone().try_acquire_owned() else {
            continue; // Too many at once: dropped, as a busy resolver does.
        };
        let query = buffer[..len].to_vec();
        let (socket, state, closed) = (socket.clone(), state.clone(), closed.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = resolve(&query, &state, upstream, guest_resolver, &closed).await {
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }
}

/// The answer to a guest's query (`None`: none, as for garbage or an upstream that is silent).
async fn resolve(
    query: &[u8],
    state: &SlotEgress,
    upstream: SocketAddr,
    guest_resolver: Ipv4Addr,
    closed: &ClosedRanges,
) -> Option<Vec<u8>> {
    let question = super::dns::question(query)?;
    let policy: Arc<EgressPolicy> = state.policy();
    let allowed = policy.allows_domain(&question.name);
    // A transformed name's addresses are learned too: its headers go only there.
    let learned = allowed || policy.headers_for(&question.name).is_some();
    let resolver = IpAddr::V4(guest_resolver);
    let resolver_open =
        policy.address_verdict(resolver) != AddressVerdict::Denied && !closed.contains(resolver);
    if !allowed && !resolver_open {
        return super::dns::refused(query);
    }
    let socket = UdpSocket::bind(if upstream.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await
    .ok()?;
    socket.connect(upstream).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buffer = vec![0u8; 4096];
    let len = tokio::time::timeout(DNS_TIMEOUT, socket.recv(&mut buffer))
        .await
        .ok()?
        .ok()?;
    buffer.truncate(len);
    if learned {
        state.learn(&question.name, &super::dns::addresses(&buffer));
    }
    Some(buffer)
}

/// The resolver the agent forwards guests' DNS to: the host's first `nameserver`, else
/// `8.8.8.8`.
pub fn host_resolver() -> SocketAddr {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some("nameserver"))
                    .then(|| words.next()?.parse::<IpAddr>().ok())
                    .flatten()
            })
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .unwrap_or_else(|| SocketAddr::from(([8, 8, 8, 8], 53)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_ranges_less_the_opened_ones_are_closed() {
        let closed = ClosedRanges::new(vec!["10.252.0.0/16".parse().unwrap()]);
        assert!(closed.contains("10.1.2.3".parse().unwrap()));
        assert!(!closed.contains("10.252.3.4".parse().unwrap()));
        assert!(!closed.contains("1.1.1.1".parse().unwrap()));
        assert!(closed.contains("169.254.169.254".parse().unwrap()));
        assert!(closed.contains("2001:db8::1".parse().unwrap()));
    }

    /// A query resolved for an allowed name is forwarded and its addresses learned; another
    /// name is refused when the guest's own resolver is denied, forwarded when it is not.
    #[tokio::test]
    async fn the_resolver_answers_allowed_names_and_learns_their_addresses() {
        use super::super::dns::tests::{answer, query};
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream_address = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 512];
            loop {
                let (len, from) = upstream.recv_from(&mut buffer).await.unwrap();
                let reply = answer(&buffer[..len], &[(Ipv4Addr::new(203, 0, 113, 9), 60)]);
                upstream.send_to(&reply, from).await.unwrap();
            }
        });
        let policy = wrenn_agent_api::network::EgressSettings {
            allow_out: vec!["api.test".into()],
            deny_out: vec!["0.0.0.0/0".into()],
            ..Default::default()
        }
        .parse()
        .unwrap();
        let state = SlotEgress::new(policy);
        let closed = ClosedRanges::new(Vec::new());
        let resolver = Ipv4Addr::new(8, 8, 8, 8);
        let allowed = resolve(
            &query(7, "api.test", super::super::dns::TYPE_A),
            &state,
            upstream_address,
            resolver,
            &closed,
        )
        .await
        .unwrap();
        assert_eq!(super::super::dns::addresses(&allowed).len(), 1);
        assert!(state.resolved_to("api.test", "203.0.113.9".parse().unwrap()));
        let other = resolve(
            &query(8, "other.test", super::super::dns::TYPE_A),
            &state,
            upstream_address,
            resolver,
            &closed,
        )
        .await
        .unwrap();
        assert_eq!(other[3] & 0x0f, 5, "REFUSED");
        assert!(!state.resolved_to("other.test", "203.0.113.9".parse().unwrap()));
        // The guest's resolver not denied: other names are answered (but not learned).
        state.set_policy(
            wrenn_agent_api::network::EgressSettings {
                allow_out: vec!["api.test".into()],
                ..Default::default()
            }
            .parse()
            .unwrap(),
            |_| false,
        );
        let other = resolve(
            &query(9, "other.test", super::super::dns::TYPE_A),
            &state,
            upstream_address,
            resolver,
            &closed,
        )
        .await
        .unwrap();
        assert_eq!(super::super::dns::addresses(&other).len(), 1);
        assert!(!state.resolved_to("other.test", "203.0.113.9".parse().unwrap()));
    }
}
