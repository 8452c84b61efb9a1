//! Network slots, the E2B/wrenn layout: each slot is a network namespace with a veth pair to the
//! host and a tap `tap0` at 169.254.0.22/30 for the guest, which is always 169.254.0.21. NAT in
//! the namespace maps the slot's unique address (reached from the host through a route over the
//! veth) to the guest and back, so every clone of one snapshot finds the network it was
//! snapshotted with. The guest's metadata requests (169.254.169.254:80) are sent to the agent's
//! MMDS; its other outbound traffic passes only when the sandbox may reach the internet.
//! Slots are created ahead of demand and recycled clean (a fresh tap, egress closed).

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::error::AgentError;

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
    state: Mutex<PoolState>,
}

impl SlotPool {
    pub fn new(config: SlotConfig) -> Result<Self, AgentError> {
        config.validate()?;
        Ok(Self {
            config,
            state: Mutex::new(PoolState::default()),
        })
    }

    pub fn config(&self) -> &SlotConfig {
        &self.config
    }

    /// Slots leased now.
    pub fn in_use(&self) -> u32 {
        self.state.lock().expect("slot pool lock").leased.len() as u32
    }

    /// Leases a slot (a ready one, or a new one) with egress set as asked.
    pub async fn lease(&self, allow_internet: bool) -> Result<Slot, AgentError> {
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
            if allow_internet {
                set_egress(&slot, true).await?;
            }
            Ok::<_, AgentError>(())
        }
        .await;
        if let Err(error) = prepared {
            self.state
                .lock()
                .expect("slot pool lock")
                .leased
                .remove(&index);
            let _ = self.delete(&slot).await;
            return Err(error);
        }
        Ok(slot)
    }

    /// Marks a slot leased without touching it (a sandbox adopted after an agent restart).
    pub fn claim(&self, index: u32) -> Slot {
        let mut state = self.state.lock().expect("slot pool lock");
        state.ready.retain(|&i| i != index);
        state.leased.insert(index);
        Slot::new(&self.config.prefix, index)
    }

    /// Returns a slot: its tap is recreated and egress closed, then it is ready again. A slot
    /// that cannot be cleaned is deleted instead.
    pub async fn release(&self, index: u32) {
        let slot = Slot::new(&self.config.prefix, index);
        let clean = recycle(&slot).await.is_ok();
        if !clean {
            let _ = self.delete(&slot).await;
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
                let _ = self.delete(&Slot::new(&self.config.prefix, index)).await;
                removed += 1;
            }
        }
        removed
    }

    /// Deletes every slot of this agent (shutdown of a test agent; not on a normal stop, when
    /// running sandboxes keep their network).
    pub async fn delete_all(&self) {
        for index in self.existing_namespaces() {
            let _ = self.delete(&Slot::new(&self.config.prefix, index)).await;
        }
        let mut state = self.state.lock().expect("slot pool lock");
        state.ready.clear();
        state.leased.clear();
    }

    /// Deletes the ready (unleased) slots.
    pub async fn delete_ready(&self) {
        let ready: Vec<u32> = std::mem::take(&mut self.state.lock().expect("slot pool lock").ready);
        for index in ready {
            let _ = self.delete(&Slot::new(&self.config.prefix, index)).await;
        }
    }

    /// Slot indexes whose namespace exists now.
    pub fn existing_namespaces(&self) -> Vec<u32> {
        let prefix = format!("{}-", self.config.prefix);
        std::fs::read_dir("/run/netns")
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|entry| {
                        entry
                            .file_name()
                            .to_str()?
                            .strip_prefix(&prefix)?
                            .parse()
                            .ok()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn create(&self, slot: &Slot) -> Result<(), AgentError> {
        let slot = slot.clone();
        let mmds_port = self.config.mmds_port;
        run_blocking(move || create_slot(&slot, mmds_port)).await
    }

    async fn delete(&self, slot: &Slot) -> Result<(), AgentError> {
        let slot = slot.clone();
        run_blocking(move || {
            let _ = ip(&["link", "del", &slot.veth_host]);
            ip(&["netns", "del", &slot.netns])
        })
        .await
    }
}

async fn run_blocking(
    work: impl FnOnce() -> Result<(), AgentError> + Send + 'static,
) -> Result<(), AgentError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| AgentError::internal("a network task panicked", error))?
}

fn ip(args: &[&str]) -> Result<(), AgentError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| AgentError::internal("running ip", error))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(AgentError::Internal(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn in_namespace(
    netns: &str,
    program: &str,
    args: &[&str],
    input: Option<&str>,
) -> Result<(), AgentError> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, program])
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
            "{program} in {netns}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The namespace's firewall and NAT, loaded in one `iptables-restore`.
pub fn namespace_rules(slot: &Slot, mmds_port: u16) -> String {
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -i {guest_side} -d {address}/32 -j DNAT --to-destination {GUEST_IP}
-A PREROUTING -i tap0 -d {MMDS_IP}/32 -p tcp --dport 80 -j DNAT --to-destination {host_ip}:{mmds_port}
-A POSTROUTING -o {guest_side} -s {GUEST_IP}/32 -j SNAT --to-source {address}
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:wrenn-egress - [0:0]
-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A FORWARD -i tap0 -d {host_ip}/32 -j ACCEPT
-A FORWARD -i tap0 -j wrenn-egress
-A wrenn-egress -j DROP
COMMIT
",
        guest_side = slot.veth_guest,
        address = slot.address,
        host_ip = slot.host_ip,
    )
}

fn create_slot(slot: &Slot, mmds_port: u16) -> Result<(), AgentError> {
    let _ = ip(&["link", "del", &slot.veth_host]);
    let _ = ip(&["netns", "del", &slot.netns]);
    let built = (|| {
        let ns = slot.netns.as_str();
        ip(&["netns", "add", ns])?;
        ip(&[
            "link",
            "add",
            &slot.veth_host,
            "type",
            "veth",
            "peer",
            "name",
            &slot.veth_guest,
            "netns",
            ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", slot.host_ip),
            "dev",
            &slot.veth_host,
        ])?;
        ip(&["link", "set", &slot.veth_host, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/30", slot.namespace_ip),
            "dev",
            &slot.veth_guest,
        ])?;
        ip(&["-n", ns, "link", "set", &slot.veth_guest, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &slot.host_ip.to_string(),
        ])?;
        add_tap(ns)?;
        in_namespace(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"], None)?;
        in_namespace(
            ns,
            "iptables-restore",
            &[],
            Some(&namespace_rules(slot, mmds_port)),
        )?;
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
        let _ = ip(&["link", "del", &slot.veth_host]);
        let _ = ip(&["netns", "del", &slot.netns]);
    }
    built
}

fn add_tap(ns: &str) -> Result<(), AgentError> {
    ip(&["-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
    ip(&["-n", ns, "link", "set", "tap0", "address", TAP_MAC])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{TAP_IP}/30"),
        "dev",
        "tap0",
    ])?;
    ip(&["-n", ns, "link", "set", "tap0", "up"])
}

async fn recycle(slot: &Slot) -> Result<(), AgentError> {
    let slot = slot.clone();
    run_blocking(move || {
        let _ = ip(&["-n", &slot.netns, "link", "del", "tap0"]);
        add_tap(&slot.netns)?;
        in_namespace(&slot.netns, "iptables", &["-F", "wrenn-egress"], None)?;
        in_namespace(
            &slot.netns,
            "iptables",
            &["-A", "wrenn-egress", "-j", "DROP"],
            None,
        )
    })
    .await
}

async fn set_egress(slot: &Slot, allow: bool) -> Result<(), AgentError> {
    let slot = slot.clone();
    run_blocking(move || {
        in_namespace(&slot.netns, "iptables", &["-F", "wrenn-egress"], None)?;
        let verdict = if allow { "ACCEPT" } else { "DROP" };
        in_namespace(
            &slot.netns,
            "iptables",
            &["-A", "wrenn-egress", "-j", verdict],
            None,
        )
    })
    .await
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

    #[test]
    fn rules_map_the_slot_address_and_send_metadata_to_the_agent() {
        let rules = namespace_rules(&Slot::new("wr", 3), 4242);
        assert!(rules.contains("-d 10.201.0.3/32 -j DNAT --to-destination 169.254.0.21"));
        assert!(rules.contains("--dport 80 -j DNAT --to-destination 10.200.0.13:4242"));
        assert!(rules.contains("-j SNAT --to-source 10.201.0.3"));
        assert!(rules.contains("-A wrenn-egress -j DROP"));
    }
}
