//! Every firewall rule the agent installs, generated as text in this one module (and applied by
//! [`crate::network`] with `iptables-restore`, so each set changes atomically). Nothing here runs
//! a command: the rules are unit tested as text.
//!
//! The sandbox boundary, default deny:
//! - **In the slot's namespace** (IPv4; IPv6 is switched off there, see
//!   [`crate::network::NAMESPACE_SYSCTLS`]: the kernel drops IPv6 on such interfaces), every
//!   chain's policy is DROP. A frame from the guest (`tap0`) must carry the guest's own address
//!   (no spoofing). The guest may open: its MMDS (`169.254.169.254:80`, DNAT'd to the agent),
//!   and, only while internet access is on, the resolver it was given (port 53) and public
//!   addresses. Private and special ranges (RFC 1918, CGNAT, link-local, loopback, multicast,
//!   reserved, the cloud metadata endpoints) stay closed unless the operator opens a range.
//!   Inbound, only the host itself (packets from the host side of the slot's veth, which is
//!   what the agent's proxy and API send from) reaches the guest.
//! - **On the host**, two chains per agent (`wrenn-in-<prefix>`, `wrenn-fwd-<prefix>`), jumped to
//!   by the agent's slot addresses: packets from guests reach no host port but the MMDS (nor any
//!   other address of the host, which the namespace cannot know), and no packet is forwarded to
//!   a slot address unless it answers a connection the guest opened. So another guest, or a
//!   machine on the host's network that routes to a slot address, gets nothing.

use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use wrenn_agent_api::network::EgressPolicy;

use crate::network::{GUEST_IP, MMDS_IP, Slot};

/// An IPv4 network in CIDR notation (`10.0.0.0/8`; a bare address is a /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub const fn new(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Self {
        Self {
            address: Ipv4Addr::new(a, b, c, d),
            prefix,
        }
    }

    /// Whether `address` is inside this network.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        let mask = mask(self.prefix);
        u32::from(address) & mask == u32::from(self.address) & mask
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (
                address,
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|prefix| *prefix <= 32)
                    .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to 32"))?,
            ),
            None => (text, 32),
        };
        let address = address
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("{text:?} is not an IPv4 address or network"))?;
        if u32::from(address) & !mask(prefix) != 0 {
            return Err(format!(
                "{text:?} has host bits set: write its network address"
            ));
        }
        Ok(Ipv4Cidr { address, prefix })
    }
}

/// The network mask of a prefix length.
fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// What a guest may not reach even with internet access, unless the operator opens a range:
/// every non-public IPv4 range, and the metadata endpoints of clouds that sit on public
/// addresses.
pub const CLOSED_RANGES: &[(Ipv4Cidr, &str)] = &[
    (Ipv4Cidr::new(0, 0, 0, 0, 8), "this network"),
    (Ipv4Cidr::new(10, 0, 0, 0, 8), "private (RFC 1918)"),
    (
        Ipv4Cidr::new(100, 64, 0, 0, 10),
        "shared CGNAT space (Alibaba's metadata at 100.100.100.200)",
    ),
    (Ipv4Cidr::new(127, 0, 0, 0, 8), "loopback"),
    (
        Ipv4Cidr::new(169, 254, 0, 0, 16),
        "link-local (AWS ECS's metadata at 169.254.170.2)",
    ),
    (Ipv4Cidr::new(172, 16, 0, 0, 12), "private (RFC 1918)"),
    (Ipv4Cidr::new(192, 0, 0, 0, 24), "IETF protocol assignments"),
    (Ipv4Cidr::new(192, 0, 2, 0, 24), "documentation"),
    (Ipv4Cidr::new(192, 168, 0, 0, 16), "private (RFC 1918)"),
    (Ipv4Cidr::new(198, 18, 0, 0, 15), "benchmarking"),
    (Ipv4Cidr::new(198, 51, 100, 0, 24), "documentation"),
    (Ipv4Cidr::new(203, 0, 113, 0, 24), "documentation"),
    (Ipv4Cidr::new(224, 0, 0, 0, 4), "multicast"),
    (Ipv4Cidr::new(240, 0, 0, 0, 4), "reserved and broadcast"),
    (
        Ipv4Cidr::new(168, 63, 129, 16, 32),
        "Azure's wire server and metadata",
    ),
];

/// The guest's DNS resolver when its kernel command line names none (wrenn-init's default).
pub const DEFAULT_GUEST_RESOLVER: Ipv4Addr = Ipv4Addr::new(8, 8, 8, 8);

/// The resolver a guest was given: the eighth field of the kernel's `ip=` argument, else
/// wrenn-init's default.
pub fn guest_resolver(cmdline: &str) -> Ipv4Addr {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("ip="))
        .and_then(|spec| spec.split(':').nth(7))
        .and_then(|dns| dns.parse().ok())
        .unwrap_or(DEFAULT_GUEST_RESOLVER)
}

/// The name of the namespace's egress chain, rewritten whenever a slot's egress changes: it
/// sees every packet of the guest's own connections, not only their first, so a change of the
/// lists cuts a connection they now forbid.
pub const EGRESS_CHAIN: &str = "wrenn-egress";
/// The sandbox's own lists, jumped to from [`EGRESS_CHAIN`].
pub const LISTS_CHAIN: &str = "wrenn-lists";
/// Where a denied packet goes: a TCP packet of an established connection is answered with a
/// reset (the guest's connection ends at once), anything else is dropped (a new connection
/// times out, as E2B's do).
pub const DENY_CHAIN: &str = "wrenn-deny";

/// The chain of what the agent itself dials out of the namespace (its egress proxy's
/// connections, [`crate::host_network::SlotDialer`]): the operator's closed ranges stay closed
/// to it as to the guest (the proxy checks them too), and nothing leaves while egress is closed.
pub const AGENT_OUT_CHAIN: &str = "wrenn-agent-out";

/// What a slot's guest may open beyond its MMDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// Nothing (internet access off with no allowed address, and every slot between two
    /// sandboxes).
    Closed,
    /// Public addresses and the given resolver, as the sandbox's own lists narrow them;
    /// `opened` are ranges the operator allows although they are closed by default.
    Internet {
        resolver: Ipv4Addr,
        opened: Vec<Ipv4Cidr>,
        lists: AddressLists,
        /// The sandbox's whole policy when the agent must see its connections
        /// ([`crate::egress`], listening in the namespace on [`PROXY_PORT`] and [`DNS_PORT`]):
        /// with domain rules, its DNS and its connections to ports 80 and 443 that no address
        /// entry allows go there; with an egress proxy, all of its TCP does.
        proxied: Option<std::sync::Arc<EgressPolicy>>,
        /// The sandbox's certificate authority, with which the proxy intercepts the
        /// connections its header transforms apply to ([`crate::egress::transform`]).
        ca: Option<std::sync::Arc<crate::egress::transform::SandboxCa>>,
    },
}

/// Where the agent's egress proxy listens in a slot's namespace (its connections come there
/// redirected, with their original destination kept by the connection tracker).
pub const PROXY_PORT: u16 = 15001;
/// Where the agent's resolver for a slot listens in its namespace (UDP).
pub const DNS_PORT: u16 = 15053;
/// The guest's ports whose connections domain rules decide (E2B: HTTP by `Host`, TLS by SNI).
pub const NAMED_PORTS: &str = "80,443";
/// The namespace's NAT chain that sends the guest's DNS and named connections to the agent.
pub const REDIRECT_CHAIN: &str = "wrenn-redirect";

/// A sandbox's own address lists (E2B's `allowOut` and `denyOut`, their IPv4 entries): an
/// allowed entry wins over a denied one, and what neither names is allowed. They narrow what
/// the operator lets guests reach, never widen it: a closed range stays closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressLists {
    pub allow: Vec<Ipv4Net>,
    pub deny: Vec<Ipv4Net>,
}

impl AddressLists {
    /// The IPv4 entries of a sandbox's policy.
    pub fn of(policy: &EgressPolicy) -> Self {
        let v4 = |nets: &[IpNet]| {
            nets.iter()
                .filter_map(|net| match net {
                    IpNet::V4(net) => Some(*net),
                    IpNet::V6(_) => None,
                })
                .collect()
        };
        AddressLists {
            allow: v4(&policy.allow_nets),
            deny: v4(&policy.deny_nets),
        }
    }

    /// Whether the lists deny every IPv4 address and allow none: the guest reaches nothing
    /// (unless domain rules admit some).
    pub fn deny_everything(&self) -> bool {
        self.allow.is_empty() && self.deny.iter().any(|net| net.prefix_len() == 0)
    }
}

/// The namespace's IPv4 NAT and filter tables, loaded whole by `iptables-restore`.
pub fn namespace_rules(slot: &Slot, mmds_port: u16, egress: &Egress) -> String {
    let veth = &slot.veth_guest;
    let host_ip = slot.host_ip;
    let address = slot.address;
    let namespace_ip = slot.namespace_ip;
    let redirect = redirect_rules(egress);
    let mut rules = format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:{REDIRECT_CHAIN} - [0:0]
# The host reaches the guest at the slot's address.
-A PREROUTING -i {veth} -d {address}/32 -j DNAT --to-destination {GUEST_IP}
# The guest's metadata requests go to the agent's MMDS.
-A PREROUTING -i tap0 -s {GUEST_IP}/32 -d {MMDS_IP}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {host_ip}:{mmds_port}
# Domain rules: the guest's DNS and named connections go to the agent.
-A PREROUTING -i tap0 -s {GUEST_IP}/32 -j {REDIRECT_CHAIN}
# The guest's packets leave with the slot's address: it names the slot to the MMDS and the host.
-A POSTROUTING -o {veth} -s {GUEST_IP}/32 -j SNAT --to-source {address}
# So do the agent's egress proxy's (dialled from inside the namespace): the host treats them
# as the guest's.
-A POSTROUTING -o {veth} -s {namespace_ip}/32 -j SNAT --to-source {address}
{redirect}COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:{EGRESS_CHAIN} - [0:0]
:{LISTS_CHAIN} - [0:0]
:{DENY_CHAIN} - [0:0]
:{AGENT_OUT_CHAIN} - [0:0]
# What the agent's egress proxy dials from the namespace.
-A OUTPUT -o {veth} -j {AGENT_OUT_CHAIN}
# Nothing from the guest or the host opens a connection to the namespace itself.
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
# Only what the redirect chain sent reaches the agent's proxy and resolver.
-A INPUT -i tap0 -p tcp -m tcp --dport {PROXY_PORT} -m conntrack --ctstate DNAT -j ACCEPT
-A INPUT -i tap0 -p udp -m udp --dport {DNS_PORT} -m conntrack --ctstate DNAT -j ACCEPT
# A guest sends with its own address only.
-A FORWARD -i tap0 ! -s {GUEST_IP}/32 -j DROP
-A FORWARD -m conntrack --ctstate INVALID -j DROP
# Answers to the guest, and the guest's answers to the host's connections.
-A FORWARD -i {veth} -o tap0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i tap0 -o {veth} -m conntrack --ctstate ESTABLISHED,RELATED --ctdir REPLY -j ACCEPT
# Inbound: the host itself (its side of the veth), nobody else.
-A FORWARD -i {veth} -o tap0 -s {host_ip}/32 -d {GUEST_IP}/32 -j ACCEPT
# The MMDS, reached only as 169.254.169.254:80.
-A FORWARD -i tap0 -o {veth} -d {host_ip}/32 -p tcp -m tcp --dport {mmds_port} -m conntrack --ctstate DNAT --ctorigdst {MMDS_IP}/32 -j ACCEPT
# Every packet of the guest's own connections, the first and the rest.
-A FORWARD -i tap0 -o {veth} -j {EGRESS_CHAIN}
"
    );
    rules.push_str(&egress_rules(egress));
    rules.push_str("COMMIT\n");
    rules
}

/// The rules of the egress, lists and deny chains (without a table header).
fn egress_rules(egress: &Egress) -> String {
    let mut rules = String::new();
    let mut line = |text: String| {
        rules.push_str(&text);
        rules.push('\n');
    };
    line(format!(
        "-A {DENY_CHAIN} -p tcp -m conntrack --ctstate ESTABLISHED -j REJECT --reject-with tcp-reset"
    ));
    line(format!("-A {DENY_CHAIN} -j DROP"));
    line(format!(
        "-A {AGENT_OUT_CHAIN} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    ));
    match egress {
        Egress::Closed => {
            line(format!("-A {EGRESS_CHAIN} -j {DENY_CHAIN}"));
            line(format!("-A {AGENT_OUT_CHAIN} -j DROP"));
        }
        Egress::Internet {
            resolver,
            opened,
            lists,
            ..
        } => {
            // The resolver and the operator's ranges are open unless the lists close them.
            for protocol in ["udp", "tcp"] {
                line(format!(
                    "-A {EGRESS_CHAIN} -d {resolver}/32 -p {protocol} -m {protocol} --dport 53 -j {LISTS_CHAIN}"
                ));
            }
            for range in opened {
                line(format!("-A {EGRESS_CHAIN} -d {range} -j {LISTS_CHAIN}"));
            }
            // Closed ranges stay closed whatever the lists say.
            for (range, _) in CLOSED_RANGES {
                line(format!("-A {EGRESS_CHAIN} -d {range} -j {DENY_CHAIN}"));
            }
            line(format!("-A {EGRESS_CHAIN} -j {LISTS_CHAIN}"));
            for range in opened {
                line(format!("-A {AGENT_OUT_CHAIN} -d {range} -j ACCEPT"));
            }
            for (range, _) in CLOSED_RANGES {
                line(format!("-A {AGENT_OUT_CHAIN} -d {range} -j DROP"));
            }
            line(format!("-A {AGENT_OUT_CHAIN} -j ACCEPT"));
            // An allowed entry wins over a denied one; what neither names passes.
            for net in &lists.allow {
                line(format!("-A {LISTS_CHAIN} -d {net} -j ACCEPT"));
            }
            for net in &lists.deny {
                line(format!("-A {LISTS_CHAIN} -d {net} -j {DENY_CHAIN}"));
            }
            line(format!("-A {LISTS_CHAIN} -j ACCEPT"));
        }
    }
    rules
}

/// The rules of the redirect chain (NAT): with domain rules, the guest's DNS goes to the
/// agent's resolver, and its connections to the named ports that no allowed address entry
/// takes go to the agent's proxy; with an egress proxy, every TCP connection goes to the
/// agent's proxy (which applies the lists itself, then tunnels). Otherwise nothing.
fn redirect_rules(egress: &Egress) -> String {
    let Egress::Internet {
        lists,
        proxied: Some(policy),
        ..
    } = egress
    else {
        return String::new();
    };
    let mut rules = String::new();
    // Transforms need the resolver too: a name's headers go only to an address it resolved to.
    if !policy.allow_domains.is_empty() || !policy.transforms.is_empty() {
        rules.push_str(&format!(
            "-A {REDIRECT_CHAIN} -p udp -m udp --dport 53 -j REDIRECT --to-ports {DNS_PORT}\n"
        ));
    }
    if policy.egress_proxy.is_some() {
        rules.push_str(&format!(
            "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {PROXY_PORT}\n"
        ));
        return rules;
    }
    // With transforms, even an allowed address's named connections go to the proxy (the
    // request may be for a transformed name); it decides them by address as the lists would.
    if policy.transforms.is_empty() {
        for net in &lists.allow {
            rules.push_str(&format!("-A {REDIRECT_CHAIN} -d {net} -j RETURN\n"));
        }
    }
    rules.push_str(&format!(
        "-A {REDIRECT_CHAIN} -p tcp -m multiport --dports {NAMED_PORTS} -j REDIRECT --to-ports {PROXY_PORT}\n"
    ));
    rules
}

/// A change of the egress chains alone, for `iptables-restore --noflush` (a chain declared in
/// the input is flushed and refilled in the same commit: the guest never sees it half written).
pub fn egress_update(egress: &Egress) -> String {
    format!(
        "*nat\n:{REDIRECT_CHAIN} - [0:0]\n{}COMMIT\n*filter\n:{EGRESS_CHAIN} - [0:0]\n:{LISTS_CHAIN} - [0:0]\n:{DENY_CHAIN} - [0:0]\n:{AGENT_OUT_CHAIN} - [0:0]\n{}COMMIT\n",
        redirect_rules(egress),
        egress_rules(egress)
    )
}

/// The host's chains for one agent, by its slot prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostChains {
    /// Jumped to from INPUT by packets whose source is one of the agent's slot addresses.
    pub input: String,
    /// Jumped to from FORWARD by packets whose destination is one of them.
    pub forward: String,
    /// The agent's slot addresses, as `iptables`'s iprange writes them (`first-last`).
    pub range: String,
}

impl HostChains {
    pub fn new(prefix: &str, first_index: u32, capacity: u32) -> Self {
        let first = Slot::address_of(first_index);
        let last = Slot::address_of(first_index + capacity.max(1) - 1);
        Self {
            input: format!("wrenn-in-{prefix}"),
            forward: format!("wrenn-fwd-{prefix}"),
            range: format!("{first}-{last}"),
        }
    }

    /// The two chains' contents, for `iptables-restore --noflush` (declaring them flushes them).
    pub fn rules(&self, mmds_port: u16) -> String {
        let Self { input, forward, .. } = self;
        format!(
            "*filter
:{input} - [0:0]
:{forward} - [0:0]
# From a guest: answers to the host's own connections (the agent's proxy and API), and the MMDS
# (which the namespace DNATs to the host side of its veth, a 10.200.0.0/16 address).
-A {input} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A {input} -d 10.200.0.0/16 -p tcp -m tcp --dport {mmds_port} -j ACCEPT
-A {input} -j DROP
# To a guest through the host: answers to what the guest opened; never a new connection.
-A {forward} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A {forward} -j DROP
COMMIT
"
        )
    }

    /// The arguments (after `-I INPUT 1` / `-D INPUT` / `-C INPUT`) of the jump to the input
    /// chain: what comes from the slots' range.
    pub fn input_jump(&self) -> Vec<String> {
        self.range_jump("--src-range", &self.input)
    }

    /// The same for the jump from FORWARD: what goes to the slots' range.
    pub fn forward_jump(&self) -> Vec<String> {
        self.range_jump("--dst-range", &self.forward)
    }

    /// `-m iprange <side> <range> -j <chain>`.
    fn range_jump(&self, side: &str, chain: &str) -> Vec<String> {
        ["-m", "iprange", side, &self.range, "-j", chain]
            .map(String::from)
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internet() -> Egress {
        Egress::Internet {
            resolver: Ipv4Addr::new(8, 8, 8, 8),
            opened: Vec::new(),
            lists: AddressLists::default(),
            proxied: None,
            ca: None,
        }
    }

    #[test]
    fn cidrs_parse_and_refuse_nonsense() {
        let cidr: Ipv4Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(cidr, Ipv4Cidr::new(10, 0, 0, 0, 8));
        assert!(cidr.contains(Ipv4Addr::new(10, 201, 0, 3)));
        assert!(!cidr.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert_eq!(
            "1.2.3.4".parse::<Ipv4Cidr>().unwrap().to_string(),
            "1.2.3.4/32"
        );
        assert!(
            "0.0.0.0/0"
                .parse::<Ipv4Cidr>()
                .unwrap()
                .contains(Ipv4Addr::new(9, 9, 9, 9))
        );
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "nope", "10.0.0.0/", "::1/128"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_special_range_and_metadata_endpoint_is_closed() {
        let closed = |address: Ipv4Addr| CLOSED_RANGES.iter().any(|(r, _)| r.contains(address));
        for address in [
            "10.201.0.7",      // another slot
            "10.200.0.5",      // a slot's host side
            "192.168.1.1",     // the host's LAN
            "172.17.0.1",      // a container bridge
            "127.0.0.1",       // loopback
            "169.254.169.254", // metadata (reached only through the DNAT, before this chain)
            "169.254.170.2",   // AWS ECS
            "100.100.100.200", // Alibaba
            "168.63.129.16",   // Azure
            "224.0.0.251",     // multicast
            "255.255.255.255", // broadcast
            "0.0.0.0",
        ] {
            assert!(closed(address.parse().unwrap()), "{address} must be closed");
        }
        for address in ["8.8.8.8", "1.1.1.1", "151.101.1.1", "100.128.0.1"] {
            assert!(!closed(address.parse().unwrap()), "{address} must be open");
        }
    }

    #[test]
    fn namespace_rules_deny_by_default_and_admit_only_the_host_inbound() {
        let slot = Slot::new("wr", 3);
        let rules = namespace_rules(&slot, 4242, &Egress::Closed);
        // Policies: nothing passes that no rule admits.
        assert!(rules.contains(":INPUT DROP [0:0]"));
        assert!(rules.contains(":FORWARD DROP [0:0]"));
        // NAT as before: slot address to guest, metadata to the agent, guest to slot address.
        assert!(rules.contains(
            "-A PREROUTING -i wrg3 -d 10.201.0.3/32 -j DNAT --to-destination 169.254.0.21"
        ));
        assert!(rules.contains("--dport 80 -j DNAT --to-destination 10.200.0.13:4242"));
        assert!(
            rules.contains(
                "-A POSTROUTING -o wrg3 -s 169.254.0.21/32 -j SNAT --to-source 10.201.0.3"
            )
        );
        // Anti-spoofing comes before anything that accepts.
        let spoof = rules
            .find("-A FORWARD -i tap0 ! -s 169.254.0.21/32 -j DROP")
            .unwrap();
        let first_accept = rules.find("-A FORWARD").unwrap();
        assert_eq!(spoof, first_accept);
        // Inbound only from the host side of the veth.
        assert!(
            rules.contains(
                "-A FORWARD -i wrg3 -o tap0 -s 10.200.0.13/32 -d 169.254.0.21/32 -j ACCEPT"
            )
        );
        // The MMDS port only, and only as the metadata address.
        assert!(rules.contains("-d 10.200.0.13/32 -p tcp -m tcp --dport 4242 -m conntrack --ctstate DNAT --ctorigdst 169.254.169.254/32 -j ACCEPT"));
        assert!(
            !rules.contains("-d 10.200.0.13/32 -j ACCEPT"),
            "no open door to the host"
        );
        // Closed egress: everything to the deny chain, no resolver.
        assert!(rules.contains("-A wrenn-egress -j wrenn-deny\n"));
        assert!(!rules.contains("--dport 53"));
        // Nothing the agent dials leaves the namespace either; what it would dial leaves with
        // the slot's address (the host's chains for guests apply to it).
        assert!(rules.contains("-A OUTPUT -o wrg3 -j wrenn-agent-out\n"));
        assert!(rules.contains("-A wrenn-agent-out -j DROP\nCOMMIT"));
        assert!(
            rules.contains(
                "-A POSTROUTING -o wrg3 -s 10.200.0.14/32 -j SNAT --to-source 10.201.0.3\n"
            )
        );
    }

    #[test]
    fn internet_egress_opens_public_addresses_after_closing_special_ones() {
        let rules = egress_update(&Egress::Internet {
            resolver: Ipv4Addr::new(10, 0, 0, 2),
            opened: vec!["192.168.50.0/24".parse().unwrap()],
            lists: AddressLists::default(),
            proxied: None,
            ca: None,
        });
        assert!(rules.starts_with("*nat\n:wrenn-redirect - [0:0]\nCOMMIT\n*filter\n:wrenn-egress - [0:0]\n:wrenn-lists - [0:0]\n:wrenn-deny - [0:0]\n"));
        let position = |needle: &str| {
            rules
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} missing from\n{rules}"))
        };
        // The resolver and the operator's range come before the closed ranges that hold them.
        let resolver =
            position("-A wrenn-egress -d 10.0.0.2/32 -p udp -m udp --dport 53 -j wrenn-lists");
        position("-A wrenn-egress -d 10.0.0.2/32 -p tcp -m tcp --dport 53 -j wrenn-lists");
        let opened = position("-A wrenn-egress -d 192.168.50.0/24 -j wrenn-lists");
        let private = position("-A wrenn-egress -d 10.0.0.0/8 -j wrenn-deny");
        let lan = position("-A wrenn-egress -d 192.168.0.0/16 -j wrenn-deny");
        assert!(resolver < private && opened < lan);
        for (range, _) in CLOSED_RANGES {
            position(&format!("-A wrenn-egress -d {range} -j wrenn-deny"));
        }
        // Public addresses next, then (no lists) everything passes.
        let public = position("-A wrenn-egress -j wrenn-lists\n");
        assert!(lan < public);
        assert!(rules.ends_with("-A wrenn-lists -j ACCEPT\nCOMMIT\n"));
        // What the agent's proxy dials: the operator's ranges open, the closed ones closed,
        // the rest (the proxy decided) open.
        let out_opened = position("-A wrenn-agent-out -d 192.168.50.0/24 -j ACCEPT");
        let out_lan = position("-A wrenn-agent-out -d 192.168.0.0/16 -j DROP");
        for (range, _) in CLOSED_RANGES {
            position(&format!("-A wrenn-agent-out -d {range} -j DROP"));
        }
        assert!(out_opened < out_lan && out_lan < position("-A wrenn-agent-out -j ACCEPT"));
        // A denied established TCP connection is reset, anything else denied is dropped.
        let reset = position(
            "-A wrenn-deny -p tcp -m conntrack --ctstate ESTABLISHED -j REJECT --reject-with tcp-reset",
        );
        assert!(reset < position("-A wrenn-deny -j DROP"));
        // Full namespace rules carry the same chains.
        let full = namespace_rules(&Slot::new("wr", 1), 1, &internet());
        assert!(full.contains("-A wrenn-egress -d 168.63.129.16/32 -j wrenn-deny"));
        assert!(full.contains(":wrenn-lists - [0:0]"));
    }

    #[test]
    fn transforms_send_even_allowed_addresses_named_connections_and_dns_to_the_agent() {
        let policy = wrenn_agent_api::network::EgressSettings {
            allow_out: vec!["1.2.3.0/24".into()],
            rules: [(
                "api.test".to_string(),
                vec![wrenn_agent_api::network::NetworkRule {
                    transform: Some(wrenn_agent_api::network::NetworkTransform {
                        headers: [("X-Key".to_string(), "v".to_string())].into(),
                    }),
                }],
            )]
            .into(),
            ..Default::default()
        }
        .parse()
        .unwrap();
        let rules = egress_update(&Egress::Internet {
            resolver: Ipv4Addr::new(8, 8, 8, 8),
            opened: Vec::new(),
            lists: AddressLists::of(&policy),
            proxied: Some(std::sync::Arc::new(policy)),
            ca: None,
        });
        assert!(
            rules.contains(
                "-A wrenn-redirect -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053\n"
            )
        );
        assert!(rules.contains("--dports 80,443 -j REDIRECT --to-ports 15001\n"));
        assert!(!rules.contains("-j RETURN"), "{rules}");
    }

    #[test]
    fn the_lists_allow_before_they_deny_and_never_open_a_closed_range() {
        let policy = wrenn_agent_api::network::EgressSettings {
            allow_out: vec![
                "203.0.113.7".into(),
                "8.8.8.0/24".into(),
                "2001:db8::/32".into(),
                "example.com".into(),
            ],
            deny_out: vec!["0.0.0.0/0".into(), "1.1.1.1".into()],
            ..Default::default()
        }
        .parse()
        .unwrap();
        let lists = AddressLists::of(&policy);
        // IPv4 entries only: slots have no IPv6, and domains are not addresses.
        assert_eq!(lists.allow.len(), 2);
        assert!(!lists.deny_everything());
        let rules = egress_update(&Egress::Internet {
            resolver: Ipv4Addr::new(8, 8, 8, 8),
            opened: Vec::new(),
            lists: lists.clone(),
            proxied: None,
            ca: None,
        });
        let position = |needle: &str| {
            rules
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} missing from\n{rules}"))
        };
        let allow = position("-A wrenn-lists -d 8.8.8.0/24 -j ACCEPT");
        let deny_all = position("-A wrenn-lists -d 0.0.0.0/0 -j wrenn-deny");
        position("-A wrenn-lists -d 1.1.1.1/32 -j wrenn-deny");
        assert!(allow < deny_all);
        // 203.0.113.7 is in a closed range (documentation): the egress chain denies it before
        // the lists are read.
        let closed = position("-A wrenn-egress -d 203.0.113.0/24 -j wrenn-deny");
        let lists_jump = position("-A wrenn-egress -j wrenn-lists\n");
        assert!(closed < lists_jump);
        // No domain rules: nothing is redirected.
        assert!(!rules.contains("REDIRECT"));
        // With them: DNS to the agent, the named ports to its proxy unless an allowed address
        // takes them first.
        let with_domains = egress_update(&Egress::Internet {
            resolver: Ipv4Addr::new(8, 8, 8, 8),
            opened: Vec::new(),
            lists,
            proxied: Some(std::sync::Arc::new(policy)),
            ca: None,
        });
        let dns = with_domains
            .find("-A wrenn-redirect -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053")
            .unwrap();
        let allowed = with_domains
            .find("-A wrenn-redirect -d 8.8.8.0/24 -j RETURN")
            .unwrap();
        let proxy = with_domains
            .find("-A wrenn-redirect -p tcp -m multiport --dports 80,443 -j REDIRECT --to-ports 15001")
            .unwrap();
        assert!(dns < allowed && allowed < proxy);
        // Internet off and nothing allowed: nothing at all.
        let off = AddressLists::of(
            &wrenn_agent_api::network::EgressPolicy::default().with_internet(false),
        );
        assert!(off.deny_everything());
    }

    #[test]
    fn host_chains_cover_exactly_the_agents_slots() {
        let chains = HostChains::new("wta", 200, 16);
        assert_eq!(chains.range, "10.201.0.200-10.201.0.215");
        assert_eq!(chains.input, "wrenn-in-wta");
        let rules = chains.rules(5555);
        assert!(rules.contains(":wrenn-in-wta - [0:0]"));
        assert!(
            rules.contains("-A wrenn-in-wta -d 10.200.0.0/16 -p tcp -m tcp --dport 5555 -j ACCEPT")
        );
        assert!(rules.contains("-A wrenn-in-wta -j DROP"));
        assert!(rules.contains("-A wrenn-fwd-wta -j DROP"));
        // The DROPs are each chain's last rule.
        let input_rules: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A wrenn-in-wta"))
            .collect();
        assert_eq!(input_rules.last(), Some(&"-A wrenn-in-wta -j DROP"));
        assert_eq!(
            chains.forward_jump().join(" "),
            "-m iprange --dst-range 10.201.0.200-10.201.0.215 -j wrenn-fwd-wta"
        );
        assert_eq!(
            HostChains::new("x", 300, 1).range,
            "10.201.1.44-10.201.1.44"
        );
    }

    #[test]
    fn the_resolver_comes_from_the_kernel_command_line() {
        assert_eq!(
            guest_resolver("console=ttyS0 ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off"),
            DEFAULT_GUEST_RESOLVER
        );
        assert_eq!(
            guest_resolver(
                "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off:10.0.0.2 quiet"
            ),
            Ipv4Addr::new(10, 0, 0, 2)
        );
        assert_eq!(guest_resolver(""), DEFAULT_GUEST_RESOLVER);
    }

    #[test]
    fn slots_have_no_ipv6_now_or_later() {
        let sysctls = crate::network::NAMESPACE_SYSCTLS;
        assert!(sysctls.contains(&"net.ipv6.conf.all.disable_ipv6=1"));
        assert!(sysctls.contains(&"net.ipv6.conf.default.disable_ipv6=1"));
        assert!(sysctls.contains(&"net.ipv4.ip_forward=1"));
    }
}
