//! The sandbox manager: templates (an image booted once, envd healthy, prepared, snapshotted),
//! sandboxes created by restoring a template snapshot with a fresh copy-on-write disk and network
//! slot and then calling envd's `/init`, pause (prepare, freeze, snapshot to the sandbox's own
//! files, stop the VM) and resume (restore those, `/init`), destroy, and recovery after an agent
//! restart (adopt live VMs, mark dead ones failed, remove what no record accounts for). A monitor
//! notices a VMM that dies within a quarter of a second and frees its slot.
//!
//! This module holds the [`Manager`], its configuration and what every concern shares; each
//! concern is a file: [`templates`], [`build`] (templates built from templates or images, step
//! by step; [`from_image`] makes an image a root filesystem),
//! [`sandboxes`], [`pause`] (and resume), [`checkpoint`] (snapshots and forks of running
//! sandboxes), [`recovery`], [`monitor`], [`warm`] (VMMs started ahead of creates).

mod build;
mod checkpoint;
mod from_image;
mod monitor;
mod pause;
mod recovery;
mod sandboxes;
mod stored;
mod templates;
mod warm;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use wrenn_image::Manifest;
use wrenn_vmm::accel::{Accel, AccelSetting};
use wrenn_vmm::qemu::log_tail;
use wrenn_vmm::{GuestMemory, MachineSpec, SnapshotFiles, Vmm};

use tokio_util::sync::CancellationToken;

use crate::envd_client;
use crate::error::AgentError;
use crate::mmds::{Metadata, MmdsRegistry, token_hash};
use crate::network::{GUEST_MAC, Slot, SlotConfig, SlotPool};
use crate::store::{SandboxRecord, SandboxState, Store, TemplateRecord};
use wrenn_agent_api::network::EgressSettings;

/// envd's port in every guest.
pub use wrenn_proto::ENVD_PORT;
/// Default wait for envd after a restore.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time `/init` may take.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for envd on a template's first boot (software emulation is slow).
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the monitor looks at the VMM processes.
const MONITOR_INTERVAL: Duration = Duration::from_millis(250);
/// The smallest guest that boots the base image.
pub const MIN_MEMORY_MIB: u32 = 128;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// The image templates are built from unless a request names another.
    pub image_dir: PathBuf,
    /// Which VMM runs the VMs.
    pub vmm: wrenn_vmm::VmmKind,
    pub qemu_binary: PathBuf,
    /// The `firecracker` binary (with `--vmm firecracker`).
    pub firecracker_binary: PathBuf,
    pub accel: AccelSetting,
    pub slots: SlotConfig,
    /// Slots kept created ahead of demand.
    pub slots_ahead: u32,
    /// Give guests that may reach the internet a way out through the host.
    pub host_nat: bool,
    /// VMMs run as uid and gid `vmm_uid_base + slot index`, each VM as a user of its own
    /// (numeric ids, no account needed; the range must be unused on the host). 0 runs them as
    /// root, which only a debugging session should want.
    pub vmm_uid_base: u32,
    /// Registries (`host[:port]`) builds from images reach over plain HTTP, on any address.
    pub insecure_registries: Vec<String>,
    /// The most the cache of image layers (`<data>/oci/blobs`) keeps.
    pub image_cache_bytes: u64,
    /// The template store ([`crate::template_store`]): where builds are put and missing
    /// templates pulled from. `None`: templates stay on the host that made them.
    pub template_store: Option<String>,
    /// The most the templates from the store may take on this host's disk: past it, the least
    /// recently used that no sandbox or template stands on are removed (the store keeps them).
    pub template_cache_bytes: u64,
    /// Templates built here keep the guest's memory in a file their sandboxes map and share
    /// (see [`wrenn_vmm::memory`]); otherwise in the snapshot's stream, which every restore
    /// reads whole.
    pub mapped_memory: bool,
    /// VMMs kept started and waiting for each template created from lately (see [`warm`]);
    /// 0 starts every VMM on its create.
    pub warm_pool: u32,
    /// The warm pool starts no VMM while the host has less memory available than this, and
    /// stops its VMMs one by one meanwhile.
    pub warm_pool_min_free_mib: u64,
    /// How often each running sandbox is sampled and its console read (see
    /// [`crate::telemetry`]).
    pub sample_interval: Duration,
    /// The bearer token `GET /metrics` asks of callers not on the loopback (none: the
    /// loopback only).
    pub metrics_token: Option<String>,
}

/// The default size of the warm pool, per template.
pub const DEFAULT_WARM_POOL: u32 = 2;
/// The default memory the warm pool leaves free.
pub const DEFAULT_WARM_POOL_MIN_FREE_MIB: u64 = 2048;

/// The default first VMM uid: far above the ranges distributions hand to people and to
/// container user namespaces.
pub const DEFAULT_VMM_UID_BASE: u32 = 1_900_000_000;

pub use wrenn_agent_api::CreateOptions;

pub use wrenn_agent_api::CreateTimings;

pub use checkpoint::CheckpointOptions;
pub use pause::ResumeOptions;

#[derive(Debug)]
struct SandboxEntry {
    /// Held for the length of an operation (create, pause, resume, destroy).
    operation: tokio::sync::Mutex<()>,
    record: Mutex<SandboxRecord>,
    /// Cancelled when the VM stops (killed, paused, died): the proxies' connections to the
    /// guest end then instead of hanging on a guest that will never answer.
    connections: Mutex<CancellationToken>,
    /// Set when a destroy begins: no new connection is routed to the guest.
    destroying: std::sync::atomic::AtomicBool,
}

impl SandboxEntry {
    fn new(record: SandboxRecord) -> SandboxEntry {
        SandboxEntry {
            operation: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
            connections: Mutex::new(CancellationToken::new()),
            destroying: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn snapshot(&self) -> SandboxRecord {
        self.record.lock().expect("record lock").clone()
    }

    /// Ends the proxied connections to the guest (the VM stopped); later ones get a new token.
    fn end_connections(&self) {
        let ended = std::mem::take(&mut *self.connections.lock().expect("connections lock"));
        ended.cancel();
    }
}

/// The host's sandboxes and templates.
#[derive(Debug)]
pub struct Manager {
    config: AgentConfig,
    vmm: Arc<dyn Vmm>,
    accel: Accel,
    pub slots: Arc<SlotPool>,
    store: Store,
    pub mmds: MmdsRegistry,
    sandboxes: Mutex<HashMap<String, Arc<SandboxEntry>>>,
    templates: Mutex<HashMap<String, TemplateRecord>>,
    /// Templates being made, and the template each is built from (which is kept meanwhile).
    building: Mutex<HashMap<String, Option<String>>>,
    /// Builds from images pull through these.
    registries: crate::oci::Registries,
    blobs: crate::oci::BlobCache,
    /// Where templates are put and pulled from, if anywhere.
    template_store: Option<crate::template_store::TemplateStore>,
    /// A lock per template being pulled: a second create of it waits for the first's pull,
    /// while pulls of other templates go on.
    pulling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When each template was last used by a create (ms), for the cache's LRU.
    template_used_ms: Mutex<HashMap<String, i64>>,
    /// Creates in flight by template: the cache does not remove those templates.
    creating_from: Mutex<HashMap<String, usize>>,
    /// The sealed memory files of templates whose memory is one, by template: loaded on the
    /// first restore after the agent starts, shared by every sandbox of the template.
    memory_files: Mutex<HashMap<PathBuf, Arc<std::os::fd::OwnedFd>>>,
    /// Held while a memory file is loaded.
    memory_loading: tokio::sync::Mutex<()>,
    /// Slots leased by creates whose VMs are not up yet.
    slots_starting: std::sync::atomic::AtomicU32,
    /// VMMs started ahead of creates.
    warm: warm::WarmPool,
    /// Held from a VM's restore or boot until its envd has answered `/init`: at most twice
    /// as many guests start at once as the host has CPUs. More at once only share the CPUs
    /// thinner, until every one of them misses its deadlines (fifty TCG guests starting on two
    /// cores each took over 10 s for `/init`); the others wait their turn, their disk and slot
    /// ready.
    starting: tokio::sync::Semaphore,
    /// The sandboxes' samples and log lines, for the control plane to collect.
    pub telemetry: crate::telemetry::Telemetry,
    /// The manager itself, for work it starts in the background.
    me: std::sync::Weak<Manager>,
}

/// A generated identifier: `i` then 19 lowercase letters or digits, each equally likely.
pub fn new_id() -> Result<String, AgentError> {
    wrenn_core::random::id("i", 19).map_err(|error| AgentError::Internal(error.to_string()))
}

/// Identifiers name directories: 1 to 64 lowercase letters, digits, `-` or `_`.
pub fn validate_id(kind: &str, id: &str) -> Result<(), AgentError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "{kind} id {id:?} must be 1 to 64 lowercase letters, digits, '-' or '_'"
        )))
    }
}

use wrenn_core::now_ms;

fn envd_address(slot: u32) -> SocketAddr {
    SocketAddr::new(Slot::address_of(slot).into(), ENVD_PORT)
}

/// What Firecracker needs of the host, checked before the agent serves: KVM (it has no
/// software emulation) and its binary.
fn check_firecracker(config: &AgentConfig) -> Result<(), AgentError> {
    if matches!(config.accel, AccelSetting::Tcg) {
        return Err(AgentError::FailedPrecondition(
            "Firecracker runs on KVM only: --accel tcg needs --vmm qemu".into(),
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|error| {
            AgentError::FailedPrecondition(format!(
                "Firecracker needs KVM, and /dev/kvm cannot be opened ({error}): use --vmm qemu"
            ))
        })?;
    let output = std::process::Command::new(&config.firecracker_binary)
        .arg("--version")
        .output()
        .map_err(|error| {
            AgentError::FailedPrecondition(format!(
                "cannot run Firecracker at {} ({error}): build it from \
                 github.com/firecracker-microvm/firecracker and give --firecracker",
                config.firecracker_binary.display()
            ))
        })?;
    let version = String::from_utf8_lossy(&output.stdout);
    tracing::info!(version = %version.lines().next().unwrap_or("").trim(), "Firecracker runs the VMs");
    Ok(())
}

impl Manager {
    /// Opens the data directory, chooses the accelerator, recovers what a previous run left.
    pub async fn start(config: AgentConfig) -> Result<Arc<Manager>, AgentError> {
        let store = Store::open(&config.data_dir)?;
        let (accel, vmm) = match config.vmm {
            wrenn_vmm::VmmKind::Qemu => {
                let kernel = config.image_dir.join("vmlinuz");
                let accel = wrenn_vmm::accel::resolve(
                    config.accel,
                    &config.qemu_binary,
                    &kernel,
                    Some(&config.data_dir.join("accel-probe.json")),
                )
                .await;
                if accel == Accel::Tcg {
                    tracing::warn!(
                        "guests run under software emulation (QEMU TCG), not KVM: slower, and a \
                         weaker boundary (a guest faces QEMU's emulator, not a hardware-enforced \
                         hypervisor)"
                    );
                }
                (
                    accel,
                    wrenn_vmm::new(config.vmm, &config.qemu_binary, accel),
                )
            }
            wrenn_vmm::VmmKind::Firecracker => {
                check_firecracker(&config)?;
                (
                    Accel::Kvm,
                    wrenn_vmm::new(config.vmm, &config.firecracker_binary, Accel::Kvm),
                )
            }
        };
        let slots = Arc::new(SlotPool::new(config.slots.clone())?);
        slots.install_host_rules().await?;
        if config.host_nat {
            crate::network::enable_host_nat()?;
        }
        let registries = crate::oci::Registries::new(&config.insecure_registries)
            .map_err(|error| AgentError::Internal(error.to_string()))?;
        // Builds are not resumed after a restart: what they staged goes.
        let _ = std::fs::remove_dir_all(from_image::staging_root(&config.data_dir));
        let blobs = crate::oci::BlobCache::open(
            &config.data_dir.join("oci").join("blobs"),
            config.image_cache_bytes,
        )
        .map_err(|error| AgentError::Internal(error.to_string()))?;
        let template_store = config
            .template_store
            .as_deref()
            .map(crate::template_store::TemplateStore::open)
            .transpose()?;
        if let Some(store) = &template_store {
            store.check().await?;
        }
        let telemetry = crate::telemetry::Telemetry::new(
            config.sample_interval,
            crate::telemetry::BUFFER_ENTRIES,
        );
        let manager = Arc::new_cyclic(|me| Manager {
            me: me.clone(),
            telemetry,
            warm: warm::WarmPool::default(),
            starting: tokio::sync::Semaphore::new(
                2 * std::thread::available_parallelism().map_or(1, |cpus| cpus.get()),
            ),
            template_store,
            pulling: Mutex::new(HashMap::new()),
            template_used_ms: Mutex::new(HashMap::new()),
            creating_from: Mutex::new(HashMap::new()),
            memory_files: Mutex::new(HashMap::new()),
            memory_loading: tokio::sync::Mutex::new(()),
            slots_starting: std::sync::atomic::AtomicU32::new(0),
            registries,
            blobs,
            config,
            vmm,
            accel,
            slots,
            store,
            mmds: MmdsRegistry::default(),
            sandboxes: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            building: Mutex::new(HashMap::new()),
        });
        manager.recover().await;
        crate::metrics::watch(&manager);
        manager.repeat_while_alive(MONITOR_INTERVAL, |manager| async move {
            manager.check_vmms().await
        });
        let sample_interval = manager
            .config
            .sample_interval
            .max(Duration::from_millis(100));
        manager.repeat_while_alive(sample_interval, |manager| async move {
            manager.sample_sandboxes().await
        });
        if manager.config.warm_pool > 0 {
            manager.repeat_while_alive(warm::WARM_CHECK_INTERVAL, |manager| async move {
                manager.check_warm().await
            });
        }
        let warm = manager.clone();
        tokio::spawn(async move { warm.slots.warm(warm.config.slots_ahead).await });
        if manager.template_store.is_some() {
            let collector = Arc::downgrade(&manager);
            tokio::spawn(async move {
                // Hosts started together collect at different times.
                let mut wait = Duration::from_millis(
                    (now_ms() as u64) % stored::STORE_COLLECTION_INTERVAL.as_millis() as u64,
                );
                loop {
                    tokio::time::sleep(wait).await;
                    wait = stored::STORE_COLLECTION_INTERVAL;
                    let Some(manager) = collector.upgrade() else {
                        return;
                    };
                    manager.collect_store_garbage().await;
                }
            });
        }
        Ok(manager)
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn vmm_name(&self) -> &'static str {
        self.vmm.name()
    }

    /// Slots leased by creates whose VMs are not up yet (reported to the control plane, which
    /// counts those creates itself while they are in flight).
    pub fn slots_starting(&self) -> u32 {
        self.slots_starting
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The name of a sandbox's disk in its directory: a qcow2 overlay, or a raw clone where
    /// the VMM needs one file (Firecracker).
    pub(crate) fn disk_name(&self) -> &'static str {
        if self.vmm.needs_raw_disk() {
            "disk.raw"
        } else {
            "disk.qcow2"
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    fn entry(&self, id: &str) -> Result<Arc<SandboxEntry>, AgentError> {
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("sandbox {id} not found")))
    }

    fn save(&self, entry: &SandboxEntry, change: impl FnOnce(&mut SandboxRecord)) -> SandboxRecord {
        let mut record = entry.record.lock().expect("record lock");
        change(&mut record);
        if let Err(error) = self.store.save_sandbox(&record) {
            tracing::error!(%error, sandbox = %record.sandbox_id, "could not save the sandbox record");
        }
        record.clone()
    }

    /// The user a VM in slot `index` runs as.
    fn vmm_user(&self, index: u32) -> Option<wrenn_vmm::launch::VmmUser> {
        (self.config.vmm_uid_base != 0).then(|| {
            let id = self.config.vmm_uid_base + index;
            wrenn_vmm::launch::VmmUser { uid: id, gid: id }
        })
    }

    /// What a sandbox's guest may open (its resolver comes from its kernel command line).
    /// Rules that no longer parse (a record from a future agent) close the guest off: egress
    /// fails closed.
    fn egress_of(&self, record: &SandboxRecord) -> crate::firewall::Egress {
        match record.egress.parse() {
            Ok(policy) => self.slots.egress(
                &policy.with_internet(record.allow_internet),
                crate::firewall::guest_resolver(&record.machine.cmdline),
                record.egress_ca.clone().map(std::sync::Arc::new),
            ),
            Err(error) => {
                tracing::error!(%error, sandbox = %record.sandbox_id, "egress rules do not parse: egress closed");
                crate::firewall::Egress::Closed
            }
        }
    }

    fn metadata(record: &SandboxRecord) -> Metadata {
        Metadata {
            instance_id: record.sandbox_id.clone(),
            env_id: record.template_id.clone(),
            address: String::new(),
            access_token_hash: token_hash(record.access_token.as_deref().unwrap_or("")),
        }
    }

    /// What `/init` tells a sandbox's envd: its environment (a UTF-8 locale unless the
    /// create set `LANG`, as in E2B's templates), its template's user and working directory,
    /// the time, the token, its certificate authority, and its identity.
    fn init_body(&self, record: &SandboxRecord) -> serde_json::Value {
        let mut env_vars = record.env_vars.clone();
        env_vars
            .entry("LANG".to_string())
            .or_insert_with(|| "C.UTF-8".to_string());
        let (user, workdir) = self
            .templates
            .lock()
            .expect("templates lock")
            .get(&record.template_id)
            .map(|template| {
                (
                    template.default_user.clone(),
                    template.default_workdir.clone(),
                )
            })
            .unwrap_or_default();
        let mut body = json!({
            "envVars": env_vars,
            "defaultUser": user.as_deref().unwrap_or(build::DEFAULT_USER),
            "defaultWorkdir": workdir.as_deref().unwrap_or(build::DEFAULT_WORKDIR),
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        if let Some(token) = &record.access_token {
            body["accessToken"] = json!(token);
        }
        // Its identity as the metadata service has it: a restored clone's first command sees
        // it without envd's round trip to the service (older envds ignore it and make it).
        body["metadata"] = json!(Self::metadata(record));
        // envd adds it to the guest's trust store (and sets the variables that point runtimes
        // with stores of their own at it).
        if let Some(ca) = &record.egress_ca {
            body["caBundle"] = json!(ca.cert_pem);
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_generated_ones_pass() {
        for _ in 0..50 {
            let id = new_id().unwrap();
            assert_eq!(id.len(), 20);
            validate_id("sandbox", &id).unwrap();
        }
        for bad in ["", "UPPER", "../x", "a b", &"x".repeat(65), "-lead"] {
            assert!(validate_id("sandbox", bad).is_err(), "{bad:?}");
        }
    }
}
