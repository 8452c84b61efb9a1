//! Egress beyond addresses: what a slot's domain rules decide of a guest's connection.
//!
//! Address lists are the slot firewall's ([`crate::firewall`]). Domain rules cannot be: a
//! packet carries no name. When a sandbox's `allowOut` names domains, its TCP connections to
//! ports 80 and 443 that no address entry allows go to the agent instead, which reads the name
//! they ask for ([`sniff`]: the TLS server name, the HTTP `Host`) and admits the connection only
//! if an allowed domain matches it **and** the address dialled is one that name resolved to
//! through the sandbox's resolver ([`dns`], [`SlotEgress::learn`]). So a guest that resolves a
//! name itself, sends an allowed name to another address, or dials an address literal, gets
//! nothing the rules did not give.
//!
//! [`SlotEgress`] holds one slot's rules, the names its resolver handed out, and the
//! connections it admitted; replacing the rules ([`SlotEgress::set_policy`]) ends the admitted
//! connections the new ones forbid.

pub mod dns;
pub mod service;
pub mod sniff;
pub mod transform;
pub mod tunnel;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wrenn_agent_api::network::{AddressVerdict, EgressPolicy};

/// How long an address a name resolved to stays that name's beyond its TTL (clients cache
/// answers a little longer than they are told to).
pub const RESOLUTION_GRACE: Duration = Duration::from_secs(300);
/// The shortest life of a resolution, whatever its TTL.
pub const SHORTEST_RESOLUTION: Duration = Duration::from_secs(30);

/// A connection out of a slot: plain TCP, or TLS to an egress proxy.
pub type Upstream = Box<dyn UpstreamStream>;

/// What an [`Upstream`] is.
pub trait UpstreamStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> UpstreamStream for T {}

/// What the rules say of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused, and why (for the agent's log; the guest sees its connection closed).
    Deny(&'static str),
}

/// Decides a connection to `address` asking for `name` (none: not HTTP or TLS, or nameless).
/// `resolved` says whether `name` resolved to `address` through the sandbox's resolver;
/// `closed` whether the operator closes `address` whatever a sandbox's rules say.
pub fn decide(
    policy: &EgressPolicy,
    address: IpAddr,
    name: Option<&str>,
    resolved: impl Fn(&str, IpAddr) -> bool,
    closed: impl Fn(IpAddr) -> bool,
) -> Decision {
    if closed(address) {
        return Decision::Deny("the address is in a range the operator closes");
    }
    let verdict = policy.address_verdict(address);
    if verdict == AddressVerdict::Allowed {
        return Decision::Allow;
    }
    if let Some(name) = name
        && policy.allows_domain(name)
    {
        if resolved(name, address) {
            return Decision::Allow;
        }
        if verdict == AddressVerdict::Denied {
            return Decision::Deny("an allowed name, but not at an address it resolved to");
        }
    }
    match verdict {
        AddressVerdict::Denied if name.is_none() => {
            Decision::Deny("no allowed name (not HTTP or TLS, or no name sent)")
        }
        AddressVerdict::Denied => Decision::Deny("the name is not an allowed domain"),
        _ => Decision::Allow,
    }
}

/// A connection [`SlotEgress`] admitted.
#[derive(Debug)]
struct Admitted {
    address: IpAddr,
    name: Option<String>,
    ends: CancellationToken,
    /// Gone when the connection's [`Admission`] (and every clone of its keep) is dropped.
    alive: std::sync::Weak<()>,
}

impl Admitted {
    fn open(&self) -> bool {
        !self.ends.is_cancelled() && self.alive.strong_count() > 0
    }
}

/// An admitted connection, held by whatever carries it: while it (or a clone of `keep`) lives,
/// the slot tracks the connection; `ends` is cancelled when the rules stop allowing it.
#[derive(Debug)]
pub struct Admission {
    pub ends: CancellationToken,
    pub keep: Arc<()>,
}

/// One slot's egress state.
#[derive(Debug)]
pub struct SlotEgress {
    policy: Mutex<Arc<EgressPolicy>>,
    /// Address -> the names that resolved to it, and until when.
    resolved: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
    admitted: Mutex<Vec<Admitted>>,
    /// Cancelled when the slot's sandbox ends: every admitted connection ends.
    ends: CancellationToken,
    /// With header transforms: what intercepts the connections they apply to.
    interceptor: Mutex<Option<Arc<transform::Interceptor>>>,
}

impl SlotEgress {
    pub fn new(policy: EgressPolicy) -> Self {
        SlotEgress {
            policy: Mutex::new(Arc::new(policy)),
            resolved: Mutex::new(HashMap::new()),
            admitted: Mutex::new(Vec::new()),
            ends: CancellationToken::new(),
            interceptor: Mutex::new(None),
        }
    }

    pub fn interceptor(&self) -> Option<Arc<transform::Interceptor>> {
        self.interceptor.lock().expect("interceptor lock").clone()
    }

    pub fn set_interceptor(&self, interceptor: Option<Arc<transform::Interceptor>>) {
        *self.interceptor.lock().expect("interceptor lock") = interceptor;
    }

    pub fn policy(&self) -> Arc<EgressPolicy> {
        self.policy.lock().expect("egress policy lock").clone()
    }

    /// Replaces the rules; the admitted connections they forbid now are ended (their tokens
    /// cancelled). Returns how many were.
    pub fn set_policy(&self, policy: EgressPolicy, closed: impl Fn(IpAddr) -> bool) -> usize {
        let policy = Arc::new(policy);
        *self.policy.lock().expect("egress policy lock") = policy.clone();
        let mut admitted = self.admitted.lock().expect("admitted lock");
        admitted.retain(Admitted::open);
        let mut cut = 0;
        for connection in admitted.iter() {
            let decision = decide(
                &policy,
                connection.address,
                connection.name.as_deref(),
                |name, address| self.resolved_to(name, address),
                &closed,
            );
            if decision != Decision::Allow {
                connection.ends.cancel();
                cut += 1;
            }
        }
        admitted.retain(Admitted::open);
        cut
    }

    /// Records what the sandbox's resolver answered: `name` is at these addresses.
    pub fn learn(&self, name: &str, addresses: &[(IpAddr, u32)]) {
        let now = Instant::now();
        let mut resolved = self.resolved.lock().expect("resolved lock");
        resolved.retain(|_, names| {
            names.retain(|(_, until)| *until > now);
            !names.is_empty()
        });
        for (address, ttl) in addresses {
            let life =
                Duration::from_secs(u64::from(*ttl)).max(SHORTEST_RESOLUTION) + RESOLUTION_GRACE;
            let names = resolved.entry(*address).or_default();
            names.retain(|(known, _)| known != name);
            names.push((name.to_string(), now + life));
        }
    }

    /// Whether `name` resolved to `address` (and has not expired since).
    pub fn resolved_to(&self, name: &str, address: IpAddr) -> bool {
        let now = Instant::now();
        self.resolved
            .lock()
            .expect("resolved lock")
            .get(&address)
            .is_some_and(|names| {
                names
                    .iter()
                    .any(|(known, until)| known == name && *until > now)
            })
    }

    /// Decides a connection by the current rules; an admitted one is tracked, and its token
    /// (cancelled when the rules stop allowing it, or the slot ends) returned.
    pub fn admit(
        &self,
        destination: SocketAddr,
        name: Option<&str>,
        closed: impl Fn(IpAddr) -> bool,
    ) -> Result<Admission, &'static str> {
        let policy = self.policy();
        match decide(
            &policy,
            destination.ip(),
            name,
            |name, address| self.resolved_to(name, address),
            closed,
        ) {
            Decision::Allow => {
                let ends = self.ends.child_token();
                let keep = Arc::new(());
                let mut admitted = self.admitted.lock().expect("admitted lock");
                // Connections that ended are forgotten here (the list does not grow with them).
                admitted.retain(Admitted::open);
                admitted.push(Admitted {
                    address: destination.ip(),
                    name: name.map(str::to_string),
                    ends: ends.clone(),
                    alive: Arc::downgrade(&keep),
                });
                Ok(Admission { ends, keep })
            }
            Decision::Deny(why) => Err(why),
        }
    }

    /// Ends every admitted connection (the sandbox stopped).
    pub fn end(&self) {
        self.ends.cancel();
    }

    /// Admitted connections still open.
    pub fn open_connections(&self) -> usize {
        let mut admitted = self.admitted.lock().expect("admitted lock");
        admitted.retain(Admitted::open);
        admitted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wrenn_agent_api::network::EgressSettings;

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressSettings {
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .parse()
        .unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn open(_: IpAddr) -> bool {
        false
    }

    #[test]
    fn an_allowed_name_admits_only_the_addresses_it_resolved_to() {
        let rules = policy(&["api.test", "*.wild.test", "9.9.9.9"], &["0.0.0.0/0"]);
        let resolved = |name: &str, address: IpAddr| name == "api.test" && address == ip("1.2.3.4");
        let decide =
            |address: &str, name: Option<&str>| decide(&rules, ip(address), name, resolved, open);
        assert_eq!(decide("1.2.3.4", Some("api.test")), Decision::Allow);
        // The same name at another address: refused (SNI sent to an address of the guest's
        // choosing).
        assert!(matches!(
            decide("5.6.7.8", Some("api.test")),
            Decision::Deny(_)
        ));
        // Another name at the allowed name's address: refused.
        assert!(matches!(
            decide("1.2.3.4", Some("other.test")),
            Decision::Deny(_)
        ));
        // No name (an address literal, or not HTTP/TLS): refused.
        assert!(matches!(decide("1.2.3.4", None), Decision::Deny(_)));
        // An allowed address needs no name.
        assert_eq!(decide("9.9.9.9", None), Decision::Allow);
        // A wildcard's name that did not resolve through the resolver: refused.
        assert!(matches!(
            decide("1.2.3.4", Some("a.wild.test")),
            Decision::Deny(_)
        ));
        // Without a deny, unlisted addresses pass whatever their name.
        let open_rules = policy(&["api.test"], &[]);
        assert_eq!(
            super::decide(&open_rules, ip("5.6.7.8"), Some("x.test"), resolved, open),
            Decision::Allow
        );
        // The operator's closed ranges stay closed, names or not.
        assert!(matches!(
            super::decide(&rules, ip("9.9.9.9"), None, resolved, |_| true),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn resolutions_are_learned_and_new_rules_cut_what_they_forbid() {
        let egress = SlotEgress::new(policy(&["api.test"], &["0.0.0.0/0"]));
        let at = SocketAddr::from(([1, 2, 3, 4], 443));
        assert!(
            egress.admit(at, Some("api.test"), open).is_err(),
            "not resolved yet"
        );
        egress.learn("api.test", &[(ip("1.2.3.4"), 60)]);
        assert!(egress.resolved_to("api.test", ip("1.2.3.4")));
        assert!(!egress.resolved_to("api.test", ip("1.2.3.5")));
        let first = egress.admit(at, Some("api.test"), open).unwrap();
        // A connection that ended (its admission dropped) is no longer counted.
        drop(egress.admit(at, Some("api.test"), open).unwrap());
        let other = SocketAddr::from(([7, 7, 7, 7], 80));
        assert!(egress.admit(other, None, open).is_err());
        assert_eq!(egress.open_connections(), 1);
        // Rules that still allow it keep it.
        assert_eq!(
            egress.set_policy(policy(&["*.test", "api.test"], &["0.0.0.0/0"]), open),
            0
        );
        assert!(!first.ends.is_cancelled());
        // Rules that no longer do end it.
        assert_eq!(egress.set_policy(policy(&[], &["1.0.0.0/8"]), open), 1);
        assert!(first.ends.is_cancelled());
        assert_eq!(egress.open_connections(), 0);
        // The slot's end ends them all.
        let second = egress.admit(other, None, open).unwrap();
        egress.end();
        assert!(second.ends.is_cancelled());
    }
}
