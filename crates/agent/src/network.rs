//! Network slots, the E2B/wrenn layout: each slot is a network namespace with a veth pair to the
//! host and a tap `tap0` at 169.254.0.22/30 for the guest, which is always 169.254.0.21. NAT in
//! the namespace maps the slot's unique address (reached from the host through a route over the
//! veth) to the guest and back, so every clone of one snapshot finds the network it was
//! snapshotted with. The firewall (default deny, see [`crate::firewall`]) lets the guest reach
//! its MMDS (169.254.169.254:80, sent to the agent's), and public addresses only when the sandbox
//! may reach the internet; only the host itself reaches the guest.
//! Slots are created ahead of demand and recycled clean (a fresh tap, egress closed).

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::error::AgentError;
use crate::firewall::{self, Egress, HostChains, Ipv4Cidr};
use crate::host_network::{HostNetwork, LinuxNetwork};

/// The guest's address inside every slot.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The tap's address: the guest's gateway.
pub const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// The metadata address guests ask.
pub const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The same MAC on every tap, so a guest restored into another slot finds its gateway unchanged.
pub const TAP_MAC: &str = "02:00:a9:fe:00:16";
/// The guest NIC's MAC (fixed in the machine, identical in every clone).
pub const GUEST_MAC: &str = "02:00:a9:fe:00:15";
/// Transit /30 networks between host and namespaces: 10.200.0.0/16 (slot i: 10.200.0.0 + 4i).
const TRANSIT_BASE: u32 = u32::from_be_bytes([10, 200, 0, 0]);
/// Slot addresses, by which the host reaches each guest: 10.201.0.0/16 (slot i: 10.201.0.0 + i).
const SLOT_BASE: u32 = u32::from_be_bytes([10, 201, 0, 0]);
/// The highest slot index the address plan allows.
pub const MAX_SLOT_INDEX: u32 = 16_383;

/// How slots are named and numbered.
#[derive(Debug, Clone)]
pub struct SlotConfig {
    /// Prefix of namespace and interface names (at most 6 lowercase letters or digits).
    pub prefix: String,
    /// The first slot index this agent uses (several agents on one machine use disjoint ranges).
    pub first_index: u32,
    pub capacity: u32,
    /// The port of the agent's MMDS on the host side of every veth.
    pub mmds_port: u16,
    /// Ranges closed to guests by default (private, link-local, …) that the operator opens to
    /// guests with internet access.
    pub opened_ranges: Vec<Ipv4Cidr>,
    /// The resolver the agent answers guests' DNS from when they have domain rules (`None`:
    /// the host's, [`crate::egress::service::host_resolver`]).
    pub upstream_dns: Option<std::net::SocketAddr>,
    /// Authorities (a PEM file) trusted besides the host's store when the agent opens TLS to
    /// a destination of a sandbox's header transforms.
    pub egress_authorities: Option<std::path::PathBuf>,
}

impl SlotConfig {
    pub fn validate(&self) -> Result<(), AgentError> {
        let prefix_ok = !self.prefix.is_empty()
            && self.prefix.len() <= 6
            && self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !prefix_ok {
            return Err(AgentError::InvalidArgument(format!(
                "slot prefix {:?} must be 1 to 6 lowercase letters or digits",
                self.prefix
            )));
        }
        if self.first_index == 0
            || self.capacity == 0
            || self.first_index + self.capacity - 1 > MAX_SLOT_INDEX
        {
            return Err(AgentError::InvalidArgument(format!(
                "slots {}..{} are outside 1..={MAX_SLOT_INDEX}",
                self.first_index,
                self.first_index + self.capacity
            )));
        }
        Ok(())
    }
}

/// One slot's names and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub netns: String,
    pub veth_host: String,
    pub veth_guest: String,
    /// Host side of the veth.
    pub host_ip: Ipv4Addr,
    /// Namespace side of the veth.
    pub namespace_ip: Ipv4Addr,
    /// Where the host reaches the guest.
    pub address: Ipv4Addr,
}

impl Slot {
    pub fn new(prefix: &str, index: u32) -> Slot {
        let transit = TRANSIT_BASE + index * 4;
        Slot {
            index,
            netns: format!("{prefix}-{index}"),
            veth_host: format!("{prefix}h{index}"),
            veth_guest: format!("{prefix}g{index}"),
            host_ip: Ipv4Addr::from(transit + 1),
            namespace_ip: Ipv4Addr::from(transit + 2),
            address: Slot::address_of(index),
        }
    }

    /// The address by which the host reaches the guest of slot `index` (no names needed).
    pub fn address_of(index: u32) -> Ipv4Addr {
        Ipv4Addr::from(SLOT_BASE + index)
    }

    /// The slot index a slot address belongs to.
    pub fn index_of_address(address: Ipv4Addr) -> Option<u32> {
        let value = u32::from(address);
        (SLOT_BASE..=SLOT_BASE + MAX_SLOT_INDEX)
            .contains(&value)
            .then(|| value - SLOT_BASE)
    }
}

#[derive(Debug, Default)]
struct PoolState {
    /// Created and clean (egress closed), ready to lease.
    ready: Vec<u32>,
    /// Leased to a sandbox or a template build.
    leased: BTreeSet<u32>,
}

/// The agent's slots.
#[derive(Debug)]
pub struct SlotPool {
    config: SlotConfig,
    network: Arc<dyn HostNetwork>,
    /// The proxies and resolvers of slots with domain rules.
    pub egress_service: crate::egress::service::EgressService,
    state: Mutex<PoolState>,
    /// Set when every slot is being deleted: no more are made ahead of demand.
    closing: std::sync::atomic::AtomicBool,
    /// Held while a slot is made ahead of demand, so a deletion of all waits for it.
    warming: tokio::sync::Mutex<()>,
}

impl SlotPool {
    /// A pool over the host's real network.
    pub fn new(config: SlotConfig) -> Result<Self, AgentError> {
        Self::with_network(config, Arc::new(LinuxNetwork))
    }

    /// A pool over `network` (a [`crate::host_network::RecordingNetwork`] in tests).
    pub fn with_network(
        config: SlotConfig,
        network: Arc<dyn HostNetwork>,
    ) -> Result<Self, AgentError> {
        config.validate()?;
        let egress_service = crate::egress::service::EgressService::new(
            network.clone(),
            config
                .upstream_dns
                .unwrap_or_else(crate::egress::service::host_resolver),
            crate::egress::service::ClosedRanges::new(config.opened_ranges.clone()),
            config.egress_authorities.clone(),
        );
        Ok(Self {
            egress_service,
            config,
            network,
            state: Mutex::new(PoolState::default()),
            closing: std::sync::atomic::AtomicBool::new(false),
            warming: tokio::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &SlotConfig {
        &self.config
    }

    /// Slots leased now.
    pub fn in_use(&self) -> u32 {
        self.state.lock().expect("slot pool lock").leased.len() as u32
    }

    /// What a guest may open under `policy` (internet access already folded in, see
    /// [`wrenn_agent_api::network::EgressPolicy::with_internet`]), given the resolver its
    /// kernel command line names.
    /// `ca` is the sandbox's certificate authority, which its header transforms need.
    pub fn egress(
        &self,
        policy: &wrenn_agent_api::network::EgressPolicy,
        resolver: Ipv4Addr,
        ca: Option<Arc<crate::egress::transform::SandboxCa>>,
    ) -> Egress {
        let lists = crate::firewall::AddressLists::of(policy);
        let has_domains = !policy.allow_domains.is_empty();
        if lists.deny_everything() && !has_domains {
            Egress::Closed
        } else {
            let transforms = !policy.transforms.is_empty() && ca.is_some();
            let proxied = has_domains || policy.egress_proxy.is_some() || transforms;
            Egress::Internet {
                resolver,
                opened: self.config.opened_ranges.clone(),
                lists,
                proxied: proxied.then(|| Arc::new(policy.clone())),
                ca: if transforms { ca } else { None },
            }
        }
    }

    /// Replaces the egress of a leased slot (atomically: the guest never sees half of it),
    /// domain rules included.
    pub async fn set_egress(&self, index: u32, egress: &Egress) -> Result<(), AgentError> {
        let slot = Slot::new(&self.config.prefix, index);
        // The proxy and resolver first: the redirect must find them listening.
        self.egress_service.apply(&slot, egress).await?;
        self.network.set_egress(&slot, egress).await
    }

    /// Leases a slot (a ready one, or a new one) with egress set as asked.
    pub async fn lease(&self, egress: &Egress) -> Result<Slot, AgentError> {
        let (index, needs_create) = {
            let mut state = self.state.lock().expect("slot pool lock");
            if let Some(index) = state.ready.pop() {
                state.leased.insert(index);
                (index, false)
            } else {
                let range = self.config.first_index..self.config.first_index + self.config.capacity;
                let taken: HashSet<u32> = state.leased.iter().copied().collect();
                let Some(index) = range.clone().find(|i| !taken.contains(i)) else {
                    return Err(AgentError::ResourceExhausted(format!(
                        "all {} network slots are in use",
                        self.config.capacity
                    )));
                };
                state.leased.insert(index);
                (index, true)
            }
        };
        let slot = Slot::new(&self.config.prefix, index);
        let prepared = async {
            if needs_create {
                self.create(&slot).await?;
            }
            // A new or recycled slot has egress closed: only opening it costs anything.
            if *egress != Egress::Closed {
                self.egress_service.apply(&slot, egress).await?;
                self.network.set_egress(&slot, egress).await?;
            }
            Ok::<_, AgentError>(())
        }
        .await;
        if let Err(error) = prepared {
            self.egress_service.release(index).await;
            self.state
                .lock()
                .expect("slot pool lock")
                .leased
                .remove(&index);
            self.delete(&slot).await;
            return Err(error);
        }
        Ok(slot)
    }

    /// Marks a slot leased by a sandbox adopted after an agent restart, and loads the current
    /// firewall into it (the previous agent may have been an older one). Connections the guest
    /// has open survive: the connection tracker keeps them.
    pub async fn claim(&self, index: u32, egress: &Egress) -> Result<Slot, AgentError> {
        {
            let mut state = self.state.lock().expect("slot pool lock");
            state.ready.retain(|&i| i != index);
            state.leased.insert(index);
        }
        let slot = Slot::new(&self.config.prefix, index);
        self.egress_service.apply(&slot, egress).await?;
        self.network
            .reload_firewall(&slot, self.config.mmds_port, egress)
            .await?;
        Ok(slot)
    }

    /// Installs the host's chains for this agent's slots (see [`crate::firewall`]), replacing
    /// what an earlier run installed. Idempotent.
    pub async fn install_host_rules(&self) -> Result<(), AgentError> {
        self.network.install_host_rules(&self.config).await
    }

    /// Removes the host's chains of this agent (with [`SlotPool::delete_all`]).
    pub async fn remove_host_rules(&self) {
        self.network.remove_host_rules(&self.config).await;
    }

    /// Returns a slot: its tap is recreated and egress closed, then it is ready again. A slot
    /// that cannot be cleaned is deleted instead.
    pub async fn release(&self, index: u32) {
        self.egress_service.release(index).await;
        let slot = Slot::new(&self.config.prefix, index);
        let clean = self.network.recycle_slot(&slot).await.is_ok();
        if !clean {
            self.delete(&slot).await;
        }
        let mut state = self.state.lock().expect("slot pool lock");
        state.leased.remove(&index);
        if clean {
            state.ready.push(index);
        }
    }

    /// Creates slots until `count` are ready (run in the background).
    pub async fn warm(&self, count: u32) {
        loop {
            let _warming = self.warming.lock().await;
            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let next = {
                let mut state = self.state.lock().expect("slot pool lock");
                if state.ready.len() as u32 >= count {
                    return;
                }
                let range = self.config.first_index..self.config.first_index + self.config.capacity;
                let busy: HashSet<u32> = state
                    .leased
                    .iter()
                    .chain(state.ready.iter())
                    .copied()
                    .collect();
                let Some(index) = range.clone().find(|i| !busy.contains(i)) else {
                    return;
                };
                // Held as leased while it is built, so nobody else takes the index.
                state.leased.insert(index);
                index
            };
            let slot = Slot::new(&self.config.prefix, next);
            let created = self.create(&slot).await;
            let mut state = self.state.lock().expect("slot pool lock");
            state.leased.remove(&next);
            match created {
                Ok(()) => state.ready.push(next),
                Err(error) => {
                    tracing::warn!(%error, slot = next, "could not create a network slot ahead of demand");
                    return;
                }
            }
        }
    }

    /// Deletes every namespace of this agent's prefix that no lease or ready slot accounts for
    /// (left by a crashed agent). Returns how many went.
    pub async fn remove_orphans(&self) -> usize {
        let known: HashSet<u32> = {
            let state = self.state.lock().expect("slot pool lock");
            state
                .leased
                .iter()
                .chain(state.ready.iter())
                .copied()
                .collect()
        };
        let mut removed = 0;
        for index in self.existing_namespaces() {
            if !known.contains(&index) {
                self.delete(&Slot::new(&self.config.prefix, index)).await;
                removed += 1;
            }
        }
        removed
    }

    /// Deletes every slot of this agent and its host chains (shutdown of a test agent; not on a
    /// normal stop, when running sandboxes keep their network and its rules).
    pub async fn delete_all(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A slot being made ahead of demand is finished first, then goes with the others.
        let _warming = self.warming.lock().await;
        for index in self.existing_namespaces() {
            self.delete(&Slot::new(&self.config.prefix, index)).await;
        }
        self.remove_host_rules().await;
        let mut state = self.state.lock().expect("slot pool lock");
        state.ready.clear();
        state.leased.clear();
    }

    /// Deletes the ready (unleased) slots.
    pub async fn delete_ready(&self) {
        let ready: Vec<u32> = std::mem::take(&mut self.state.lock().expect("slot pool lock").ready);
        for index in ready {
            self.delete(&Slot::new(&self.config.prefix, index)).await;
        }
    }

    /// Slot indexes whose namespace exists now.
    pub fn existing_namespaces(&self) -> Vec<u32> {
        self.network.existing_slots(&self.config.prefix)
    }

    async fn create(&self, slot: &Slot) -> Result<(), AgentError> {
        self.network.create_slot(slot, self.config.mmds_port).await
    }

    async fn delete(&self, slot: &Slot) {
        self.network.delete_slot(slot).await;
    }
}

pub(crate) async fn run_blocking(
    work: impl FnOnce() -> Result<(), AgentError> + Send + 'static,
) -> Result<(), AgentError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| AgentError::internal("a network task panicked", error))?
}

/// Runs `program`, feeding it `input`; its error output becomes the error.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<(), AgentError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| AgentError::internal(&format!("running {program}"), error))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|error| AgentError::internal(&format!("feeding {program}"), error))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|error| AgentError::internal(&format!("running {program}"), error))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(AgentError::Internal(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

pub(crate) fn ip(args: &[&str]) -> Result<(), AgentError> {
    run("ip", args, None)
}

fn iptables(args: &[&str]) -> Result<(), AgentError> {
    run("iptables", args, None)
}

/// Runs `program` in a namespace, feeding it `input`.
pub fn in_namespace(
    netns: &str,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<(), AgentError> {
    let mut command = vec!["netns", "exec", netns, program];
    command.extend_from_slice(args);
    run("ip", &command, input)
}

/// Loads a namespace's IPv4 firewall. There is no IPv6 one: IPv6 is switched off in the
/// namespace ([`NO_IPV6`]), and the kernel drops every IPv6 packet that arrives on an
/// interface where it is off, the guest's tap included.
pub(crate) fn load_firewall(netns: &str, rules: &str) -> Result<(), AgentError> {
    in_namespace(netns, "iptables-restore", &[], Some(rules))
}

/// The sysctls of a slot's namespace: forwarding on, IPv6 off on every interface there now
/// (`all`) and to come (`default`: the tap is made after this).
pub const NAMESPACE_SYSCTLS: [&str; 3] = ["net.ipv4.ip_forward=1", NO_IPV6[0], NO_IPV6[1]];

/// IPv6 off in a namespace.
pub const NO_IPV6: [&str; 2] = [
    "net.ipv6.conf.all.disable_ipv6=1",
    "net.ipv6.conf.default.disable_ipv6=1",
];

/// Makes a slot as the agent does (blocking; `wrenn bench slots` times it).
pub fn create_slot_blocking(slot: &Slot, mmds_port: u16) -> Result<(), AgentError> {
    create_slot_with(slot, |ns| {
        // The firewall goes in before the tap exists: no frame of a guest ever meets an open
        // namespace. Slots have no IPv6.
        let mut sysctl = vec!["-qw"];
        sysctl.extend(NAMESPACE_SYSCTLS);
        in_namespace(ns, "sysctl", &sysctl, None)?;
        load_firewall(
            ns,
            &firewall::namespace_rules(slot, mmds_port, &Egress::Closed),
        )?;
        add_tap(ns)
    })
}

/// Deletes a slot's namespace and veth (blocking; nothing happens to what is not there).
pub fn delete_slot_blocking(slot: &Slot) {
    let _ = ip(&["link", "del", &slot.veth_host]);
    let _ = ip(&["netns", "del", &slot.netns]);
}

/// A slot's namespace and veth pair with its addresses and routes; `inside(namespace)` adds the
/// tap and the firewall. Whatever was half made is removed on failure.
pub fn create_slot_with(
    slot: &Slot,
    inside: impl FnOnce(&str) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    delete_slot_blocking(slot);
    let built = (|| {
        let ns = slot.netns.as_str();
        // One `ip` per side and step (a batch stops at its first failing line), not one per
        // change: a slot is a handful of processes, not sixteen.
        ip_batch(
            None,
            &[
                format!("netns add {ns}"),
                format!(
                    "link add {} type veth peer name {} netns {ns}",
                    slot.veth_host, slot.veth_guest
                ),
                format!("addr add {}/30 dev {}", slot.host_ip, slot.veth_host),
                format!("link set {} up", slot.veth_host),
            ],
        )?;
        ip_batch(
            Some(ns),
            &[
                format!("addr add {}/30 dev {}", slot.namespace_ip, slot.veth_guest),
                format!("link set {} up", slot.veth_guest),
                "link set lo up".to_string(),
                format!("route add default via {}", slot.host_ip),
            ],
        )?;
        inside(ns)?;
        ip(&[
            "route",
            "replace",
            &format!("{}/32", slot.address),
            "via",
            &slot.namespace_ip.to_string(),
            "dev",
            &slot.veth_host,
        ])
    })();
    if built.is_err() {
        delete_slot_blocking(slot);
    }
    built
}

/// Runs `lines` as one `ip -batch` (in namespace `netns` when given): it stops at the first
/// line that fails, which is the error.
fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), AgentError> {
    // A line is split on white space: no argument may hold any (names and addresses do not).
    if let Some(line) = lines.iter().find(|line| line.contains('\n')) {
        return Err(AgentError::Internal(format!(
            "{line:?} is not one ip command"
        )));
    }
    let mut args = Vec::new();
    if let Some(netns) = netns {
        args.extend(["-n", netns]);
    }
    args.extend(["-batch", "-"]);
    run("ip", &args, Some(&(lines.join("\n") + "\n")))
}

/// Adds the guest's tap to a namespace.
pub fn add_tap(ns: &str) -> Result<(), AgentError> {
    ip_batch(
        Some(ns),
        &[
            "tuntap add dev tap0 mode tap".to_string(),
            format!("link set tap0 address {TAP_MAC}"),
            format!("addr add {TAP_IP}/30 dev tap0"),
            "link set tap0 up".to_string(),
        ],
    )
}

/// Deletes every rule of `chain` (INPUT, FORWARD) that jumps to `target`.
fn remove_jumps(chain: &str, target: &str) {
    let Ok(output) = Command::new("iptables")
        .args(["-S", chain])
        .stdin(Stdio::null())
        .output()
    else {
        return;
    };
    let listing = String::from_utf8_lossy(&output.stdout);
    for line in listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let jumps_there = words.windows(2).any(|pair| pair == ["-j", target]);
        if words.first() == Some(&"-A") && jumps_there {
            let mut args = vec!["-D"];
            args.extend_from_slice(&words[1..]);
            let _ = iptables(&args);
        }
    }
}

pub(crate) fn install_host_chains(config: &SlotConfig) -> Result<(), AgentError> {
    let chains = HostChains::new(&config.prefix, config.first_index, config.capacity);
    run(
        "iptables-restore",
        &["--noflush"],
        Some(&chains.rules(config.mmds_port)),
    )?;
    // One jump each, first in its chain, for the current slot range (an earlier run may have had
    // another).
    for (chain, target, jump) in [
        ("INPUT", &chains.input, chains.input_jump()),
        ("FORWARD", &chains.forward, chains.forward_jump()),
    ] {
        remove_jumps(chain, target);
        let mut args = vec!["-I", chain, "1"];
        args.extend(jump.iter().map(String::as_str));
        iptables(&args)?;
    }
    Ok(())
}

pub(crate) fn remove_host_chains(config: &SlotConfig) {
    let chains = HostChains::new(&config.prefix, config.first_index, config.capacity);
    remove_jumps("INPUT", &chains.input);
    remove_jumps("FORWARD", &chains.forward);
    for chain in [&chains.input, &chains.forward] {
        let _ = iptables(&["-F", chain]);
        let _ = iptables(&["-X", chain]);
    }
}

/// Lets guests that may reach the internet out through the host (forwarding and masquerade for
/// the slot addresses). Idempotent.
pub fn enable_host_nat() -> Result<(), AgentError> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|error| AgentError::internal("enabling IPv4 forwarding", error))?;
    let rule = [
        "-t",
        "nat",
        "POSTROUTING",
        "-s",
        "10.201.0.0/16",
        "!",
        "-d",
        "10.200.0.0/15",
        "-j",
        "MASQUERADE",
    ];
    let check = Command::new("iptables")
        .args(["-t", "nat", "-C"])
        .args(&rule[2..])
        .stderr(Stdio::null())
        .status()
        .map_err(|error| AgentError::internal("running iptables", error))?;
    if !check.success() {
        let added = Command::new("iptables")
            .args(["-t", "nat", "-A"])
            .args(&rule[2..])
            .status()
            .map_err(|error| AgentError::internal("running iptables", error))?;
        if !added.success() {
            return Err(AgentError::Internal(
                "adding the masquerade rule failed".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_per_slot_and_map_back() {
        let one = Slot::new("wr", 1);
        let two = Slot::new("wr", 2);
        assert_eq!(one.host_ip, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(one.namespace_ip, Ipv4Addr::new(10, 200, 0, 6));
        assert_eq!(two.host_ip, Ipv4Addr::new(10, 200, 0, 9));
        assert_eq!(one.address, Ipv4Addr::new(10, 201, 0, 1));
        assert_eq!(Slot::index_of_address(two.address), Some(2));
        assert_eq!(Slot::index_of_address(Ipv4Addr::new(10, 0, 0, 1)), None);
        let last = Slot::new("wrenn9", MAX_SLOT_INDEX);
        assert!(last.veth_host.len() <= 15, "{}", last.veth_host);
        assert_eq!(last.namespace_ip, Ipv4Addr::new(10, 200, 255, 254));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let good = SlotConfig {
            prefix: "wr".into(),
            first_index: 1,
            capacity: 10,
            mmds_port: 1,
            opened_ranges: Vec::new(),
            upstream_dns: None,
            egress_authorities: None,
        };
        assert!(good.validate().is_ok());
        for bad in [
            SlotConfig {
                prefix: "Too-Long!".into(),
                ..good.clone()
            },
            SlotConfig {
                first_index: 0,
                ..good.clone()
            },
            SlotConfig {
                first_index: MAX_SLOT_INDEX,
                capacity: 2,
                ..good.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    mod pool {
        use super::*;
        use crate::host_network::{NetworkCall, RecordingNetwork};

        fn pool(capacity: u32) -> (SlotPool, Arc<RecordingNetwork>) {
            let network = Arc::new(RecordingNetwork::default());
            let config = SlotConfig {
                prefix: "wt".into(),
                first_index: 10,
                capacity,
                mmds_port: 1,
                opened_ranges: Vec::new(),
                upstream_dns: None,
                egress_authorities: None,
            };
            let pool = SlotPool::with_network(config, network.clone()).unwrap();
            (pool, network)
        }

        #[tokio::test]
        async fn leases_take_ready_slots_first_and_stop_at_capacity() {
            let (pool, network) = pool(3);
            pool.warm(1).await;
            assert_eq!(network.calls(), vec![NetworkCall::Create(10)]);
            let first = pool.lease(&Egress::Closed).await.unwrap();
            assert_eq!(first.index, 10, "the ready slot");
            assert_eq!(network.calls().len(), 1, "a ready slot costs nothing");
            let second = pool.lease(&Egress::Closed).await.unwrap();
            let third = pool.lease(&Egress::Closed).await.unwrap();
            assert_eq!((second.index, third.index), (11, 12));
            assert_eq!(pool.in_use(), 3);
            let refused = pool.lease(&Egress::Closed).await.unwrap_err();
            assert!(
                refused
                    .to_string()
                    .contains("all 3 network slots are in use"),
                "{refused}"
            );
            pool.release(11).await;
            assert_eq!(pool.in_use(), 2);
            assert_eq!(
                pool.lease(&Egress::Closed).await.unwrap().index,
                11,
                "recycled"
            );
        }

        #[tokio::test]
        async fn opening_egress_costs_a_call_and_closed_costs_none() {
            let (pool, network) = pool(2);
            let open = wrenn_agent_api::network::EgressPolicy::default();
            let internet = pool.egress(&open, Ipv4Addr::new(1, 1, 1, 1), None);
            let slot = pool.lease(&internet).await.unwrap();
            assert_eq!(
                network.calls(),
                vec![
                    NetworkCall::Create(10),
                    NetworkCall::SetEgress(10, internet.clone())
                ]
            );
            pool.release(slot.index).await;
            assert_eq!(network.calls().last(), Some(&NetworkCall::Recycle(10)));
            assert_eq!(
                pool.egress(
                    &open.clone().with_internet(false),
                    Ipv4Addr::new(1, 1, 1, 1),
                    None
                ),
                Egress::Closed
            );
            // Internet off but an address allowed: the lists say what passes.
            let one = wrenn_agent_api::network::EgressSettings {
                allow_out: vec!["1.2.3.4".into()],
                ..Default::default()
            }
            .parse()
            .unwrap()
            .with_internet(false);
            let Egress::Internet { lists, .. } = pool.egress(&one, Ipv4Addr::new(1, 1, 1, 1), None)
            else {
                panic!("an allowed address keeps the slot open")
            };
            assert_eq!(lists.allow.len(), 1);
            // Granted: a live change is one call.
            pool.set_egress(slot.index, &Egress::Closed).await.unwrap();
        }

        #[tokio::test]
        async fn a_slot_that_fails_to_open_is_deleted_and_its_index_freed() {
            let (pool, network) = pool(1);
            let internet = pool.egress(&Default::default(), Ipv4Addr::new(1, 1, 1, 1), None);
            network.fail_next_egress();
            assert!(pool.lease(&internet).await.is_err());
            assert_eq!(pool.in_use(), 0);
            assert!(network.namespaces().is_empty(), "the half-made slot went");
            network.fail_next_create();
            assert!(pool.lease(&Egress::Closed).await.is_err());
            assert_eq!(pool.in_use(), 0);
            assert_eq!(pool.lease(&Egress::Closed).await.unwrap().index, 10);
        }

        #[tokio::test]
        async fn a_slot_that_cannot_be_cleaned_is_deleted_not_reused() {
            let (pool, network) = pool(2);
            pool.lease(&Egress::Closed).await.unwrap();
            network.fail_next_recycle();
            pool.release(10).await;
            assert!(!network.namespaces().contains(&10));
            assert_eq!(network.calls().last(), Some(&NetworkCall::Delete(10)));
            // Not ready: the next lease makes a slot again.
            pool.lease(&Egress::Closed).await.unwrap();
            assert_eq!(network.calls().last(), Some(&NetworkCall::Create(10)));
        }

        #[tokio::test]
        async fn orphans_go_and_claimed_or_ready_slots_stay() {
            let (pool, network) = pool(8);
            for index in [10, 11, 12] {
                network.leave_namespace(index);
            }
            let closed = Egress::Closed;
            pool.claim(11, &closed).await.unwrap();
            assert!(
                network
                    .calls()
                    .contains(&NetworkCall::ReloadFirewall(11, closed))
            );
            // Made ahead of demand at the first free index, over what was left there.
            pool.warm(1).await;
            assert!(network.calls().contains(&NetworkCall::Create(10)));
            let removed = pool.remove_orphans().await;
            assert_eq!(removed, 1, "12: no lease or ready slot accounts for it");
            let left: Vec<u32> = network.namespaces().into_iter().collect();
            assert_eq!(left, vec![10, 11]);
            pool.delete_all().await;
            assert!(network.namespaces().is_empty());
            assert_eq!(network.calls().last(), Some(&NetworkCall::RemoveHostRules));
            assert_eq!(pool.in_use(), 0);
        }
    }
}
