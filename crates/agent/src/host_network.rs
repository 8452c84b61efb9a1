//! The seam between the slot pool's bookkeeping ([`crate::network::SlotPool`]: which slots are
//! ready, leased, made ahead of demand) and what it does to the host: [`HostNetwork`].
//! [`LinuxNetwork`] does it (namespaces, veths, taps, iptables; root); [`RecordingNetwork`]
//! records the calls over an in-memory set of namespaces and fails on request, so the pool's
//! logic is tested without root.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use crate::error::AgentError;
use crate::firewall::{self, Egress};
use crate::network::{
    NO_IPV6, Slot, SlotConfig, add_tap, create_slot_blocking, delete_slot_blocking, in_namespace,
    install_host_chains, ip, load_firewall, remove_host_chains, run_blocking,
};

/// What the slot pool does to the host's network.
#[async_trait::async_trait]
pub trait HostNetwork: Send + Sync + std::fmt::Debug {
    /// Makes a slot: namespace, veth, firewall with egress closed, tap.
    async fn create_slot(&self, slot: &Slot, mmds_port: u16) -> Result<(), AgentError>;
    /// Removes a slot's namespace and veth; nothing happens to what is not there.
    async fn delete_slot(&self, slot: &Slot);
    /// Makes a used slot clean: a fresh tap, egress closed.
    async fn recycle_slot(&self, slot: &Slot) -> Result<(), AgentError>;
    /// Rewrites a slot's egress.
    async fn set_egress(&self, slot: &Slot, egress: &Egress) -> Result<(), AgentError>;
    /// Loads the current firewall into an existing slot (one adopted after a restart).
    async fn reload_firewall(
        &self,
        slot: &Slot,
        mmds_port: u16,
        egress: &Egress,
    ) -> Result<(), AgentError>;
    /// Installs the host's chains of an agent's slots, replacing an earlier run's.
    async fn install_host_rules(&self, config: &SlotConfig) -> Result<(), AgentError>;
    /// Removes the host's chains of an agent's slots.
    async fn remove_host_rules(&self, config: &SlotConfig);
    /// The indexes of the slots named with `prefix` whose namespace exists now.
    fn existing_slots(&self, prefix: &str) -> Vec<u32>;
    /// A TCP listener and a UDP socket inside a slot's namespace, on its egress proxy's and
    /// resolver's ports ([`crate::firewall::PROXY_PORT`], [`crate::firewall::DNS_PORT`]), and
    /// the dialer of the proxy's own connections out of it.
    async fn bind_in_slot(&self, slot: &Slot) -> Result<SlotSockets, AgentError>;
}

/// What the agent serves a slot's domain rules with: its sockets inside the slot's namespace.
#[derive(Debug)]
pub struct SlotSockets {
    pub proxy: std::net::TcpListener,
    pub resolver: std::net::UdpSocket,
    pub dialer: SlotDialer,
}

/// Opens the egress proxy's connections **from inside the slot's namespace**, so they leave
/// as the guest's own do: through the namespace's firewall and, on the host, the chains that
/// keep every host address (the agent's ports, the host's public address, an opened range's
/// host side) out of a guest's reach. (A connection dialled from the host's namespace would
/// be the host's own, and reach all of them.)
#[derive(Debug, Clone)]
pub enum SlotDialer {
    /// A thread that entered the namespace makes the sockets (a socket belongs to the
    /// namespace it was made in); it ends when the last dialer is dropped.
    InNamespace(std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<std::io::Result<OwnedFd>>>),
    /// The agent's own namespace (tests without namespaces).
    Host,
}

impl SlotDialer {
    /// A dialer whose sockets are made inside the namespace at `path`.
    fn in_namespace(path: String) -> Result<SlotDialer, AgentError> {
        let namespace = std::fs::File::open(&path)
            .map_err(|e| AgentError::internal("opening the slot's namespace", e))?;
        let (requests, waiting) =
            std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<std::io::Result<OwnedFd>>>();
        let (entered, entering) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("slot-dialer".into())
            .spawn(move || {
                let result = nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET);
                drop(namespace);
                let ok = result.is_ok();
                let _ = entered.send(result);
                if !ok {
                    return;
                }
                while let Ok(reply) = waiting.recv() {
                    let socket = nix::sys::socket::socket(
                        nix::sys::socket::AddressFamily::Inet,
                        nix::sys::socket::SockType::Stream,
                        nix::sys::socket::SockFlag::SOCK_NONBLOCK
                            | nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                        None,
                    )
                    .map_err(std::io::Error::from);
                    let _ = reply.send(socket);
                }
            })
            .map_err(|e| AgentError::internal("starting the slot's dialer", e))?;
        match entering.recv() {
            Ok(Ok(())) => Ok(SlotDialer::InNamespace(requests)),
            Ok(Err(e)) => Err(AgentError::internal("entering the slot's namespace", e)),
            Err(_) => Err(AgentError::Internal("the slot's dialer failed".into())),
        }
    }

    /// A TCP connection to `destination` (IPv4: slots have no IPv6), within `timeout`.
    pub async fn connect(
        &self,
        destination: std::net::SocketAddr,
        timeout: std::time::Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        if !destination.is_ipv4() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "sandboxes have no IPv6",
            ));
        }
        let socket = match self {
            SlotDialer::Host => tokio::net::TcpSocket::new_v4()?,
            SlotDialer::InNamespace(requests) => {
                let (reply, made) = tokio::sync::oneshot::channel();
                requests.send(reply).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the slot's dialer ended")
                })?;
                let socket = made.await.map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the slot's dialer ended")
                })??;
                tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket))
            }
        };
        tokio::time::timeout(timeout, socket.connect(destination))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{destination} took too long to answer"),
                ))
            })
    }
}

/// The host's real network, through `ip`, `iptables-restore` and `sysctl`.
#[derive(Debug, Default)]
pub struct LinuxNetwork;

#[async_trait::async_trait]
impl HostNetwork for LinuxNetwork {
    async fn create_slot(&self, slot: &Slot, mmds_port: u16) -> Result<(), AgentError> {
        let slot = slot.clone();
        run_blocking(move || create_slot_blocking(&slot, mmds_port)).await
    }

    async fn delete_slot(&self, slot: &Slot) {
        let slot = slot.clone();
        best_effort(move || delete_slot_blocking(&slot)).await;
    }

    async fn recycle_slot(&self, slot: &Slot) -> Result<(), AgentError> {
        let slot = slot.clone();
        run_blocking(move || {
            let _ = ip(&["-n", &slot.netns, "link", "del", "tap0"]);
            in_namespace(
                &slot.netns,
                "iptables-restore",
                &["--noflush"],
                Some(&firewall::egress_update(&Egress::Closed)),
            )?;
            add_tap(&slot.netns)
        })
        .await
    }

    async fn set_egress(&self, slot: &Slot, egress: &Egress) -> Result<(), AgentError> {
        let netns = slot.netns.clone();
        let rules = firewall::egress_update(egress);
        run_blocking(move || in_namespace(&netns, "iptables-restore", &["--noflush"], Some(&rules)))
            .await
    }

    async fn reload_firewall(
        &self,
        slot: &Slot,
        mmds_port: u16,
        egress: &Egress,
    ) -> Result<(), AgentError> {
        let rules = firewall::namespace_rules(slot, mmds_port, egress);
        let netns = slot.netns.clone();
        run_blocking(move || {
            // An older agent's slot may still have IPv6.
            let mut sysctl = vec!["-qw"];
            sysctl.extend(NO_IPV6);
            in_namespace(&netns, "sysctl", &sysctl, None)?;
            load_firewall(&netns, &rules)
        })
        .await
    }

    async fn install_host_rules(&self, config: &SlotConfig) -> Result<(), AgentError> {
        let config = config.clone();
        run_blocking(move || install_host_chains(&config)).await
    }

    async fn remove_host_rules(&self, config: &SlotConfig) {
        let config = config.clone();
        best_effort(move || remove_host_chains(&config)).await;
    }

    async fn bind_in_slot(&self, slot: &Slot) -> Result<SlotSockets, AgentError> {
        let path = format!("/run/netns/{}", slot.netns);
        // A thread of its own enters the namespace (a socket belongs to the namespace it was
        // made in) and ends with it: no thread of the runtime ever leaves the host's.
        let bound = tokio::task::spawn_blocking(move || {
            let dialer = SlotDialer::in_namespace(path.clone())?;
            std::thread::spawn(move || {
                let namespace = std::fs::File::open(&path)
                    .map_err(|e| AgentError::internal("opening the slot's namespace", e))?;
                nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| AgentError::internal("entering the slot's namespace", e))?;
                let listener = std::net::TcpListener::bind((
                    std::net::Ipv4Addr::UNSPECIFIED,
                    firewall::PROXY_PORT,
                ))
                .map_err(|e| AgentError::internal("binding the slot's egress proxy", e))?;
                let dns = std::net::UdpSocket::bind((
                    std::net::Ipv4Addr::UNSPECIFIED,
                    firewall::DNS_PORT,
                ))
                .map_err(|e| AgentError::internal("binding the slot's resolver", e))?;
                Ok(SlotSockets {
                    proxy: listener,
                    resolver: dns,
                    dialer,
                })
            })
            .join()
            .unwrap_or_else(|_| Err(AgentError::Internal("the binding thread panicked".into())))
        })
        .await;
        match bound {
            Ok(result) => result,
            _ => Err(AgentError::Internal(
                "the thread binding a slot's sockets failed".into(),
            )),
        }
    }

    fn existing_slots(&self, prefix: &str) -> Vec<u32> {
        let prefix = format!("{prefix}-");
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
}

/// Runs blocking clean-up work that cannot fail (what is not there is not removed).
async fn best_effort(work: impl FnOnce() + Send + 'static) {
    let _ = run_blocking(move || {
        work();
        Ok(())
    })
    .await;
}

/// One call a [`RecordingNetwork`] took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkCall {
    Create(u32),
    Delete(u32),
    Recycle(u32),
    SetEgress(u32, Egress),
    ReloadFirewall(u32, Egress),
    InstallHostRules,
    RemoveHostRules,
}

/// A host network in memory: namespaces are a set of indexes, every call is recorded, and the
/// next create, recycle or egress change can be made to fail.
#[derive(Debug, Default)]
pub struct RecordingNetwork {
    state: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    namespaces: BTreeSet<u32>,
    calls: Vec<NetworkCall>,
    fail_create: bool,
    fail_recycle: bool,
    fail_egress: bool,
}

impl RecordingNetwork {
    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<NetworkCall> {
        self.state.lock().expect("network lock").calls.clone()
    }

    /// The slots whose namespace exists.
    pub fn namespaces(&self) -> BTreeSet<u32> {
        self.state.lock().expect("network lock").namespaces.clone()
    }

    /// A namespace some earlier process left (as a crashed agent would).
    pub fn leave_namespace(&self, index: u32) {
        self.state
            .lock()
            .expect("network lock")
            .namespaces
            .insert(index);
    }

    pub fn fail_next_create(&self) {
        self.state.lock().expect("network lock").fail_create = true;
    }

    pub fn fail_next_recycle(&self) {
        self.state.lock().expect("network lock").fail_recycle = true;
    }

    pub fn fail_next_egress(&self) {
        self.state.lock().expect("network lock").fail_egress = true;
    }

    fn record(&self, call: NetworkCall) -> std::sync::MutexGuard<'_, Recorded> {
        let mut state = self.state.lock().expect("network lock");
        state.calls.push(call);
        state
    }
}

fn injected(what: &str) -> AgentError {
    AgentError::Internal(format!("{what} failed (injected)"))
}

#[async_trait::async_trait]
impl HostNetwork for RecordingNetwork {
    async fn create_slot(&self, slot: &Slot, _mmds_port: u16) -> Result<(), AgentError> {
        let mut state = self.record(NetworkCall::Create(slot.index));
        if std::mem::take(&mut state.fail_create) {
            return Err(injected("creating a slot"));
        }
        state.namespaces.insert(slot.index);
        Ok(())
    }

    async fn delete_slot(&self, slot: &Slot) {
        self.record(NetworkCall::Delete(slot.index))
            .namespaces
            .remove(&slot.index);
    }

    async fn recycle_slot(&self, slot: &Slot) -> Result<(), AgentError> {
        let mut state = self.record(NetworkCall::Recycle(slot.index));
        if std::mem::take(&mut state.fail_recycle) {
            return Err(injected("recycling a slot"));
        }
        Ok(())
    }

    async fn set_egress(&self, slot: &Slot, egress: &Egress) -> Result<(), AgentError> {
        let mut state = self.record(NetworkCall::SetEgress(slot.index, egress.clone()));
        if std::mem::take(&mut state.fail_egress) {
            return Err(injected("opening egress"));
        }
        Ok(())
    }

    async fn reload_firewall(
        &self,
        slot: &Slot,
        _mmds_port: u16,
        egress: &Egress,
    ) -> Result<(), AgentError> {
        drop(self.record(NetworkCall::ReloadFirewall(slot.index, egress.clone())));
        Ok(())
    }

    async fn install_host_rules(&self, _config: &SlotConfig) -> Result<(), AgentError> {
        drop(self.record(NetworkCall::InstallHostRules));
        Ok(())
    }

    async fn remove_host_rules(&self, _config: &SlotConfig) {
        drop(self.record(NetworkCall::RemoveHostRules));
    }

    fn existing_slots(&self, _prefix: &str) -> Vec<u32> {
        self.namespaces().into_iter().collect()
    }

    /// Sockets on the loopback (there are no namespaces here).
    async fn bind_in_slot(&self, _slot: &Slot) -> Result<SlotSockets, AgentError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| AgentError::internal("binding", e))?;
        let dns = std::net::UdpSocket::bind("127.0.0.1:0")
            .map_err(|e| AgentError::internal("binding", e))?;
        Ok(SlotSockets {
            proxy: listener,
            resolver: dns,
            dialer: SlotDialer::Host,
        })
    }
}
