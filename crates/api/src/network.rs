//! A sandbox's egress settings as E2B's API spells them (`allowOut`, `denyOut`, `rules`,
//! `egressProxy`, `dnsServers`), their validation, and the address decision they make.
//!
//! The control plane validates a create's or an update's settings with [`EgressSettings::parse`]
//! (every refusal names the entry it refuses) and hands the settings to the host agent, which
//! parses them again before it enforces them: the agent trusts no caller's parsing.
//!
//! E2B's semantics, kept here:
//! - `allowOut` holds CIDRs, bare addresses and domain names (`example.com`, and `*.example.com`
//!   for every name under `example.com`, not `example.com` itself); `denyOut` holds CIDRs and
//!   addresses only.
//! - **An allowed entry always wins over a denied one**; what neither list names is allowed.
//!   `allow_internet_access: false` is `denyOut: ["0.0.0.0/0"]` (and `::/0`).
//! - Domains are matched on connections to ports 80 (the HTTP `Host`) and 443 (the TLS server
//!   name); other ports are decided by address alone.
//! - A domain in `rules` is not allowed by being listed there.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// At most this many entries in `allowOut` and `denyOut` together.
pub const MAX_ADDRESS_ENTRIES: usize = 500;
/// At most this many domains in `rules`, and this many headers over all of them.
pub const MAX_RULE_DOMAINS: usize = 100;
pub const MAX_RULE_HEADERS: usize = 200;
/// At most this many `dnsServers`.
pub const MAX_DNS_SERVERS: usize = 10;

/// The egress settings of a sandbox, as the REST API carries them (and as they are stored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressSettings {
    /// CIDRs, addresses and domains (`example.com`, `*.example.com`) the sandbox may reach;
    /// they win over `denyOut`.
    #[serde(default, alias = "allow_out", skip_serializing_if = "Vec::is_empty")]
    pub allow_out: Vec<String>,
    /// CIDRs and addresses it may not reach (`0.0.0.0/0`: everything not allowed).
    #[serde(default, alias = "deny_out", skip_serializing_if = "Vec::is_empty")]
    pub deny_out: Vec<String>,
    /// Per-domain transforms of matching HTTP and HTTPS requests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, Vec<NetworkRule>>,
    #[serde(
        default,
        alias = "egress_proxy",
        skip_serializing_if = "Option::is_none"
    )]
    pub egress_proxy: Option<EgressProxy>,
    /// Addresses all of whose traffic a sandbox with domain rules may reach (E2B: its DNS
    /// servers; at most 10 IPv4 addresses). Its DNS is answered by the agent's resolver all the
    /// same.
    #[serde(
        default,
        alias = "dns_servers",
        skip_serializing_if = "Option::is_none"
    )]
    pub dns_servers: Option<Vec<String>>,
}

/// One rule of a domain: what is done to its requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<NetworkTransform>,
}

/// Headers set on a matching request (an existing header of the same name is replaced).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkTransform {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// A proxy all of a sandbox's TCP egress is tunnelled through, after the allow and deny lists.
/// `address` is `host:port` (SOCKS5, E2B's kind), or `socks5://host:port` or
/// `http://host:port` (HTTP `CONNECT`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EgressProxy {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// TLS to the proxy (the SOCKS5 or CONNECT handshake and the tunnelled bytes inside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EgressProxyTls>,
}

/// TLS to an egress proxy, as E2B spells it: the certificate is always verified (against
/// `caCert` when given, which replaces the system's trust store, else the system's), against
/// `serverName` (default: the address's host), which is also sent as SNI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressProxyTls {
    pub enabled: bool,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "server_name"
    )]
    pub server_name: Option<String>,
    /// PEM certificates, at most 8 KiB; never returned.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "ca_cert")]
    pub ca_cert: Option<String>,
}

/// The most bytes of an egress proxy's `tls.caCert`.
pub const MAX_PROXY_CA_BYTES: usize = 8192;

/// A parsed [`EgressProxyTls`] that is enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTls {
    /// Verified against, and sent as SNI.
    pub server_name: String,
    /// PEM certificates that replace the system's trust store.
    pub ca_pem: Option<String>,
}

/// Why settings were refused: the message names the field and the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// A domain entry: `example.com`, or `*.example.com` (every name under it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DomainPattern {
    /// Lower case, without a trailing dot, without the `*.`.
    pub name: String,
    pub wildcard: bool,
}

impl DomainPattern {
    /// Whether `host` (a server name or an HTTP host, without its port) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.wildcard {
            host.len() > self.name.len() + 1
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host == self.name
        }
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

impl FromStr for DomainPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err("an empty domain".into());
        }
        let (wildcard, rest) = match trimmed.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let name = rest.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.len() > 253 {
            return Err(format!("{text:?} is not a domain name"));
        }
        for label in name.split('.') {
            let valid = !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(format!(
                    "{text:?} is not a domain name (labels of letters, digits and hyphens; \
                     a wildcard only as a leading \"*.\")"
                ));
            }
        }
        Ok(DomainPattern { name, wildcard })
    }
}

/// An address entry: a CIDR, or a bare address (a /32 or /128). A CIDR with host bits set is
/// refused (its network address is what the caller meant, or not: we do not guess).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let trimmed = text.trim();
    if let Ok(address) = trimmed.parse::<IpAddr>() {
        return Ok(IpNet::from(address));
    }
    let net = trimmed.parse::<IpNet>().map_err(|_| {
        format!("{text:?} is not an IP address or a CIDR (such as 10.0.0.0/8 or 2001:db8::/32)")
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{text:?} has host bits set: write its network address, {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Whether an `allowOut` entry looks like an address (so its errors speak of addresses).
fn looks_like_address(text: &str) -> bool {
    let text = text.trim();
    text.contains('/')
        || text.contains(':')
        || text
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// A header name a transform may set: a token, and not one that frames the message.
fn check_header(name: &str, value: &str) -> Result<(), String> {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("{name:?} is not a header name"));
    }
    const FRAMING: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-connection",
    ];
    if FRAMING.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "{name:?} cannot be set by a transform: it frames the request"
        ));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!(
            "the value of header {name:?} holds a line break or a NUL"
        ));
    }
    // What every HTTP/1.1 implementation sends as is: visible ASCII, spaces and tabs.
    if !value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return Err(format!(
            "the value of header {name:?} holds a character other than visible ASCII, spaces and tabs"
        ));
    }
    if value.len() > 8192 {
        return Err(format!("the value of header {name:?} is over 8 KiB"));
    }
    Ok(())
}

/// The kind of proxy an [`EgressProxy`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Socks5,
    HttpConnect,
}

/// A parsed [`EgressProxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTarget {
    pub kind: ProxyKind,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<ProxyTls>,
}

impl EgressProxyTls {
    /// The TLS settings in force (`None`: plain TCP), for a proxy at `host`.
    fn parse(&self, host: &str) -> Result<Option<ProxyTls>, String> {
        if !self.enabled {
            if self.server_name.is_some() || self.ca_cert.is_some() {
                return Err("egressProxy.tls: with enabled false no other field may be set".into());
            }
            return Ok(None);
        }
        let server_name = match &self.server_name {
            Some(name) => {
                let valid = name.len() <= 253
                    && (name.parse::<IpAddr>().is_ok()
                        || name
                            .parse::<DomainPattern>()
                            .is_ok_and(|pattern| !pattern.wildcard));
                if !valid {
                    return Err(format!(
                        "egressProxy.tls.serverName {name:?} is not a host name"
                    ));
                }
                name.clone()
            }
            None => host.to_string(),
        };
        if let Some(pem) = &self.ca_cert {
            if pem.len() > MAX_PROXY_CA_BYTES {
                return Err(format!(
                    "egressProxy.tls.caCert is over {MAX_PROXY_CA_BYTES} bytes"
                ));
            }
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err("egressProxy.tls.caCert holds no PEM certificate".into());
            }
        }
        Ok(Some(ProxyTls {
            server_name,
            ca_pem: self.ca_cert.clone(),
        }))
    }
}

impl EgressProxy {
    pub fn parse(&self) -> Result<ProxyTarget, String> {
        let address = self.address.trim();
        let (kind, rest) = if let Some(rest) = address.strip_prefix("socks5://") {
            (ProxyKind::Socks5, rest)
        } else if let Some(rest) = address.strip_prefix("http://") {
            (ProxyKind::HttpConnect, rest)
        } else if address.contains("://") {
            return Err(format!(
                "egressProxy.address {address:?}: the scheme must be socks5:// or http://"
            ));
        } else {
            (ProxyKind::Socks5, address)
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .filter(|(host, port)| !host.is_empty() && *port != 0)
            .ok_or_else(|| {
                format!("egressProxy.address {address:?} must be host:port, such as proxy.example.com:1080")
            })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.parse::<IpAddr>().is_err() {
            host.parse::<DomainPattern>()
                .ok()
                .filter(|pattern| !pattern.wildcard)
                .ok_or_else(|| {
                    format!("egressProxy.address {address:?}: {host:?} is not a host name")
                })?;
        }
        for (field, value) in [("username", &self.username), ("password", &self.password)] {
            if value.as_ref().is_some_and(|v| v.len() > 255) {
                return Err(format!("egressProxy.{field} is over 255 bytes"));
            }
        }
        if self.password.is_some() && self.username.is_none() {
            return Err("egressProxy.password needs a username".into());
        }
        let tls = match &self.tls {
            Some(tls) => tls.parse(host)?,
            None => None,
        };
        Ok(ProxyTarget {
            kind,
            host: host.to_string(),
            port,
            username: self.username.clone(),
            password: self.password.clone(),
            tls,
        })
    }
}

/// Validated settings: what the agent enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow_nets: Vec<IpNet>,
    pub allow_domains: Vec<DomainPattern>,
    pub deny_nets: Vec<IpNet>,
    /// Headers set on requests to each domain, in the order the settings give them.
    pub transforms: Vec<(DomainPattern, Vec<(String, String)>)>,
    pub egress_proxy: Option<ProxyTarget>,
    /// `None`: E2B's default resolver.
    pub dns_servers: Option<Vec<Ipv4Addr>>,
}

/// What the policy says of an address (before any domain is known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressVerdict {
    /// An `allowOut` address entry holds it.
    Allowed,
    /// A `denyOut` entry holds it and no `allowOut` entry does.
    Denied,
    /// Neither list names it: allowed.
    Unlisted,
}

impl EgressSettings {
    /// Whether the settings restrict or redirect nothing (no lists, rules or proxy).
    pub fn is_empty(&self) -> bool {
        *self == EgressSettings::default()
    }

    /// Validates the settings; the error names the field and the entry.
    pub fn parse(&self) -> Result<EgressPolicy, PolicyError> {
        let entries = self.allow_out.len() + self.deny_out.len();
        if entries > MAX_ADDRESS_ENTRIES {
            return Err(PolicyError(format!(
                "allowOut and denyOut hold {entries} entries: at most {MAX_ADDRESS_ENTRIES}"
            )));
        }
        let mut policy = EgressPolicy::default();
        for entry in &self.allow_out {
            if looks_like_address(entry) {
                let net = parse_net(entry).map_err(|e| PolicyError(format!("allowOut: {e}")))?;
                policy.allow_nets.push(net);
            } else {
                let domain = entry
                    .parse::<DomainPattern>()
                    .map_err(|e| PolicyError(format!("allowOut: {e}")))?;
                policy.allow_domains.push(domain);
            }
        }
        for entry in &self.deny_out {
            if !looks_like_address(entry) && entry.parse::<DomainPattern>().is_ok() {
                return Err(PolicyError(format!(
                    "denyOut: {entry:?} is a domain; denyOut takes CIDRs and IP addresses only \
                     (deny everything with 0.0.0.0/0 and allow the domain in allowOut)"
                )));
            }
            let net = parse_net(entry).map_err(|e| PolicyError(format!("denyOut: {e}")))?;
            policy.deny_nets.push(net);
        }
        if self.rules.len() > MAX_RULE_DOMAINS {
            return Err(PolicyError(format!(
                "rules name {} domains: at most {MAX_RULE_DOMAINS}",
                self.rules.len()
            )));
        }
        let mut header_count = 0;
        for (domain, rules) in &self.rules {
            let pattern = domain
                .parse::<DomainPattern>()
                .map_err(|e| PolicyError(format!("rules: {e}")))?;
            let mut headers = Vec::new();
            for rule in rules {
                for (name, value) in rule.transform.iter().flat_map(|t| &t.headers) {
                    check_header(name, value)
                        .map_err(|e| PolicyError(format!("rules[{domain:?}]: {e}")))?;
                    headers.retain(|(existing, _): &(String, String)| {
                        !existing.eq_ignore_ascii_case(name)
                    });
                    headers.push((name.clone(), value.clone()));
                    header_count += 1;
                }
            }
            policy.transforms.push((pattern, headers));
        }
        if header_count > MAX_RULE_HEADERS {
            return Err(PolicyError(format!(
                "rules set {header_count} headers: at most {MAX_RULE_HEADERS}"
            )));
        }
        if let Some(proxy) = &self.egress_proxy {
            policy.egress_proxy = Some(proxy.parse().map_err(PolicyError)?);
        }
        if let Some(servers) = &self.dns_servers {
            if servers.len() > MAX_DNS_SERVERS {
                return Err(PolicyError(format!(
                    "dnsServers holds {} entries: at most {MAX_DNS_SERVERS}",
                    servers.len()
                )));
            }
            let parsed = servers
                .iter()
                .map(|server| {
                    server.trim().parse::<Ipv4Addr>().map_err(|_| {
                        PolicyError(format!("dnsServers: {server:?} is not an IPv4 address"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            policy.dns_servers = Some(parsed);
        }
        // E2B: with domain rules, all traffic to the named DNS servers is allowed. (Their DNS
        // is answered by the agent's resolver all the same: DNS cannot be used around the
        // rules. Without `dnsServers` nothing more is opened: the agent answers the guest's
        // resolver itself.)
        if !policy.allow_domains.is_empty() {
            for server in policy.dns_servers.iter().flatten() {
                let net = IpNet::from(IpAddr::V4(*server));
                if !policy.allow_nets.contains(&net) {
                    policy.allow_nets.push(net);
                }
            }
        }
        Ok(policy)
    }
}

impl EgressPolicy {
    /// The policy of a sandbox: its settings' with, when internet access is off, everything
    /// denied (E2B: `allow_internet_access: false` is `denyOut: ["0.0.0.0/0"]`).
    pub fn with_internet(mut self, allow_internet: bool) -> Self {
        if !allow_internet {
            for all in ["0.0.0.0/0", "::/0"] {
                let net: IpNet = all.parse().expect("a valid network");
                if !self.deny_nets.contains(&net) {
                    self.deny_nets.push(net);
                }
            }
        }
        self
    }

    /// What the address lists say of `address`.
    pub fn address_verdict(&self, address: IpAddr) -> AddressVerdict {
        if self.allow_nets.iter().any(|net| net.contains(&address)) {
            AddressVerdict::Allowed
        } else if self.deny_nets.iter().any(|net| net.contains(&address)) {
            AddressVerdict::Denied
        } else {
            AddressVerdict::Unlisted
        }
    }

    /// Whether a domain entry allows `host`.
    pub fn allows_domain(&self, host: &str) -> bool {
        self.allow_domains.iter().any(|d| d.matches(host))
    }

    /// The headers to set on a request to `host` (none when no rule names it).
    pub fn headers_for(&self, host: &str) -> Option<&[(String, String)]> {
        self.transforms
            .iter()
            .find(|(pattern, _)| pattern.matches(host))
            .map(|(_, headers)| headers.as_slice())
    }
}

impl EgressSettings {
    /// The settings as shown to their owner: the proxy's password is never returned, and the
    /// transforms' header values (often credentials) are shown as `***`.
    pub fn redacted(&self) -> EgressSettings {
        let mut shown = self.clone();
        if let Some(proxy) = &mut shown.egress_proxy {
            proxy.password = None;
            if let Some(tls) = &mut proxy.tls {
                tls.ca_cert = None;
            }
        }
        for rules in shown.rules.values_mut() {
            for rule in rules {
                if let Some(transform) = &mut rule.transform {
                    for value in transform.headers.values_mut() {
                        *value = "***".into();
                    }
                }
            }
        }
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(allow: &[&str], deny: &[&str]) -> EgressSettings {
        EgressSettings {
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn allowed_entries_win_over_denied_ones_and_unlisted_addresses_pass() {
        let policy = settings(
            &["10.1.2.3", "192.0.2.0/24", "2001:db8::/32"],
            &["0.0.0.0/0"],
        )
        .parse()
        .unwrap();
        let verdict = |a: &str| policy.address_verdict(a.parse().unwrap());
        assert_eq!(verdict("10.1.2.3"), AddressVerdict::Allowed);
        assert_eq!(verdict("192.0.2.77"), AddressVerdict::Allowed);
        assert_eq!(verdict("10.1.2.4"), AddressVerdict::Denied);
        assert_eq!(verdict("2001:db8::1"), AddressVerdict::Allowed);
        // 0.0.0.0/0 is IPv4 only.
        assert_eq!(verdict("2001:db9::1"), AddressVerdict::Unlisted);
        let off = EgressPolicy::default().with_internet(false);
        assert_eq!(
            off.address_verdict("2001:db9::1".parse().unwrap()),
            AddressVerdict::Denied
        );
        assert_eq!(
            EgressPolicy::default().address_verdict("8.8.8.8".parse().unwrap()),
            AddressVerdict::Unlisted
        );
    }

    #[test]
    fn domains_and_wildcards_match_as_e2b_defines_them() {
        let policy = settings(&["Example.COM.", "*.api.test"], &[])
            .parse()
            .unwrap();
        assert!(policy.allows_domain("example.com"));
        assert!(policy.allows_domain("EXAMPLE.com."));
        assert!(!policy.allows_domain("www.example.com"));
        assert!(policy.allows_domain("a.api.test"));
        assert!(policy.allows_domain("a.b.api.test"));
        assert!(!policy.allows_domain("api.test"));
        assert!(!policy.allows_domain("evilapi.test"));
        assert!(!policy.allows_domain("api.test.evil"));
        assert_eq!(policy.allow_domains[1].to_string(), "*.api.test");
    }

    #[test]
    fn bad_entries_are_refused_naming_them() {
        let refused = |allow: &[&str], deny: &[&str]| {
            settings(allow, deny)
                .parse()
                .expect_err("must be refused")
                .0
        };
        assert!(refused(&["10.0.0.0/33"], &[]).contains("10.0.0.0/33"));
        assert!(refused(&["10.0.0.1/8"], &[]).contains("host bits"));
        assert!(refused(&[""], &[]).contains("empty domain"));
        assert!(refused(&["exa mple.com"], &[]).contains("not a domain"));
        assert!(refused(&["*"], &[]).contains("not a domain"));
        assert!(refused(&["a.*.com"], &[]).contains("not a domain"));
        assert!(refused(&[], &["example.com"]).contains("denyOut takes CIDRs"));
        assert!(refused(&[], &["300.1.1.1"]).contains("300.1.1.1"));
        let many: Vec<String> = (0..=MAX_ADDRESS_ENTRIES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(refused(&many, &[]).contains("at most"));
        // Good ones pass.
        settings(
            &[
                "1.1.1.1",
                "8.8.8.0/24",
                "::1",
                "fd00::/8",
                "a-b.example.org",
                "*.x.io",
            ],
            &["0.0.0.0/0", "::/0"],
        )
        .parse()
        .unwrap();
    }

    #[test]
    fn transforms_validate_their_headers_and_the_last_of_a_name_wins() {
        let mut with_rules = EgressSettings::default();
        with_rules.rules.insert(
            "api.example.com".into(),
            vec![
                NetworkRule {
                    transform: Some(NetworkTransform {
                        headers: [("X-Key".to_string(), "one".to_string())].into(),
                    }),
                },
                NetworkRule {
                    transform: Some(NetworkTransform {
                        headers: [("x-key".to_string(), "two".to_string())].into(),
                    }),
                },
            ],
        );
        let policy = with_rules.parse().unwrap();
        assert_eq!(
            policy.headers_for("API.example.com"),
            Some(&[("x-key".to_string(), "two".to_string())][..])
        );
        assert_eq!(policy.headers_for("example.com"), None);
        // Rules do not allow.
        assert!(!policy.allows_domain("api.example.com"));
        for (name, value) in [
            ("Host", "x"),
            ("Content-Length", "1"),
            ("X Bad", "x"),
            ("X-Ok", "a\r\nb"),
            ("X-Ok", "caf\u{e9}"),
            ("X-Ok", "a\u{7}b"),
        ] {
            let mut bad = EgressSettings::default();
            bad.rules.insert(
                "a.com".into(),
                vec![NetworkRule {
                    transform: Some(NetworkTransform {
                        headers: [(name.to_string(), value.to_string())].into(),
                    }),
                }],
            );
            assert!(bad.parse().is_err(), "{name}: {value:?}");
        }
        let shown = with_rules.redacted();
        assert_eq!(
            shown.rules["api.example.com"][0]
                .transform
                .as_ref()
                .unwrap()
                .headers["X-Key"],
            "***"
        );
    }

    #[test]
    fn proxies_and_resolvers_parse() {
        let proxy = |address: &str| EgressProxy {
            address: address.into(),
            ..Default::default()
        };
        let socks = proxy("proxy.example.com:1080").parse().unwrap();
        assert_eq!((socks.kind, socks.port), (ProxyKind::Socks5, 1080));
        let connect = proxy("http://10.0.0.1:3128").parse().unwrap();
        assert_eq!(
            (connect.kind, connect.host.as_str()),
            (ProxyKind::HttpConnect, "10.0.0.1")
        );
        assert_eq!(proxy("[::1]:1080").parse().unwrap().host, "::1");
        for bad in ["", "proxy", "proxy:0", "ftp://p:1", "p:99999", "*.p:1"] {
            assert!(proxy(bad).parse().is_err(), "{bad}");
        }
        let no_user = EgressProxy {
            password: Some("x".into()),
            ..proxy("p:1")
        };
        assert!(no_user.parse().is_err());
        // TLS to the proxy: the server name defaults to the host; a CA is checked and never shown.
        let tls = |tls: EgressProxyTls| EgressProxy {
            tls: Some(tls),
            ..proxy("proxy.example.com:1080")
        };
        let on = tls(EgressProxyTls {
            enabled: true,
            ..Default::default()
        });
        assert_eq!(
            on.parse().unwrap().tls.unwrap().server_name,
            "proxy.example.com"
        );
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let custom = tls(EgressProxyTls {
            enabled: true,
            server_name: Some("edge.example.com".into()),
            ca_cert: Some(pem.into()),
        });
        let parsed = custom.parse().unwrap().tls.unwrap();
        assert_eq!(parsed.server_name, "edge.example.com");
        assert_eq!(parsed.ca_pem.as_deref(), Some(pem));
        let settings = EgressSettings {
            egress_proxy: Some(custom),
            ..Default::default()
        };
        let shown = settings.redacted();
        assert_eq!(
            shown
                .egress_proxy
                .as_ref()
                .unwrap()
                .tls
                .as_ref()
                .unwrap()
                .ca_cert,
            None
        );
        assert!(
            tls(EgressProxyTls::default())
                .parse()
                .unwrap()
                .tls
                .is_none()
        );
        for bad in [
            EgressProxyTls {
                enabled: false,
                server_name: Some("x.example.com".into()),
                ca_cert: None,
            },
            EgressProxyTls {
                enabled: true,
                server_name: Some("not a name".into()),
                ca_cert: None,
            },
            EgressProxyTls {
                enabled: true,
                server_name: None,
                ca_cert: Some("garbage".into()),
            },
            EgressProxyTls {
                enabled: true,
                server_name: None,
                ca_cert: Some(pem.repeat(200)),
            },
        ] {
            assert!(tls(bad.clone()).parse().is_err(), "{bad:?}");
        }
        // With domain rules, the DNS servers are allowed addresses; without, they change nothing.
        let mut resolvers = EgressSettings {
            dns_servers: Some(vec!["1.1.1.1".into()]),
            deny_out: vec!["0.0.0.0/0".into()],
            ..Default::default()
        };
        let one = "1.1.1.1".parse().unwrap();
        assert_eq!(
            resolvers.parse().unwrap().address_verdict(one),
            AddressVerdict::Denied
        );
        resolvers.allow_out = vec!["example.com".into()];
        assert_eq!(
            resolvers.parse().unwrap().address_verdict(one),
            AddressVerdict::Allowed
        );
        let bad = EgressSettings {
            dns_servers: Some(vec!["::1".into()]),
            ..Default::default()
        };
        assert!(bad.parse().is_err());
    }
}
