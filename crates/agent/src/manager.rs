//! The sandbox manager: templates (an image booted once, envd healthy, prepared, snapshotted),
//! sandboxes created by restoring a template snapshot with a fresh copy-on-write disk and network
//! slot and then calling envd's `/init`, pause (prepare, freeze, snapshot to the sandbox's own
//! files, stop the VM) and resume (restore those, `/init`), destroy, and recovery after an agent
//! restart (adopt live VMs, mark dead ones failed, remove what no record accounts for). A monitor
//! notices a VMM that dies within a quarter of a second and frees its slot.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use wrenn_image::Manifest;
use wrenn_vmm::accel::{Accel, AccelSetting};
use wrenn_vmm::qemu::{Qemu, log_tail};
use wrenn_vmm::{MachineSpec, SnapshotFiles, Vmm};

use tokio_util::sync::CancellationToken;

use crate::envd_client;
use crate::error::AgentError;
use crate::mmds::{Metadata, MmdsRegistry, token_hash};
use crate::network::{GUEST_MAC, Slot, SlotConfig, SlotPool};
use crate::store::{SandboxRecord, SandboxState, Store, TemplateRecord};

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
    pub qemu_binary: PathBuf,
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
}

/// The default first VMM uid: far above the ranges distributions hand to people and to
/// container user namespaces.
pub const DEFAULT_VMM_UID_BASE: u32 = 1_900_000_000;

pub use wrenn_agent_api::CreateOptions;

/// How long the steps of a create took.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateTimings {
    pub restore: Duration,
    pub ready: Duration,
}

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
    building: Mutex<HashSet<String>>,
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

impl Manager {
    /// Opens the data directory, chooses the accelerator, recovers what a previous run left.
    pub async fn start(config: AgentConfig) -> Result<Arc<Manager>, AgentError> {
        let store = Store::open(&config.data_dir)?;
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
                "guests run under software emulation (QEMU TCG), not KVM: slower, and a weaker \
                 boundary (a guest faces QEMU's emulator, not a hardware-enforced hypervisor)"
            );
        }
        let vmm: Arc<dyn Vmm> = Arc::new(Qemu::new(&config.qemu_binary, accel));
        let slots = Arc::new(SlotPool::new(config.slots.clone())?);
        slots.install_host_rules().await?;
        if config.host_nat {
            crate::network::enable_host_nat()?;
        }
        let manager = Arc::new(Manager {
            config,
            vmm,
            accel,
            slots,
            store,
            mmds: MmdsRegistry::default(),
            sandboxes: Mutex::new(HashMap::new()),
            templates: Mutex::new(HashMap::new()),
            building: Mutex::new(HashSet::new()),
        });
        manager.recover().await;
        let monitor = Arc::downgrade(&manager);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(MONITOR_INTERVAL).await;
                let Some(manager) = monitor.upgrade() else {
                    return;
                };
                manager.check_vmms().await;
            }
        });
        let warm = manager.clone();
        tokio::spawn(async move { warm.slots.warm(warm.config.slots_ahead).await });
        Ok(manager)
    }

    /// Tops the ready slots back up in the background after a lease.
    fn keep_slots_ready(&self) {
        let pool = self.slots.clone();
        let count = self.config.slots_ahead;
        tokio::spawn(async move { pool.warm(count).await });
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn vmm_name(&self) -> &'static str {
        self.vmm.name()
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
    fn egress_of(&self, record: &SandboxRecord) -> crate::firewall::Egress {
        self.slots.egress(
            record.allow_internet,
            crate::firewall::guest_resolver(&record.machine.cmdline),
        )
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
    /// create set `LANG`, as in E2B's templates), `user` in `/home/user`, the time, the token.
    fn init_body(record: &SandboxRecord) -> serde_json::Value {
        let mut env_vars = record.env_vars.clone();
        env_vars
            .entry("LANG".to_string())
            .or_insert_with(|| "C.UTF-8".to_string());
        let mut body = json!({
            "envVars": env_vars,
            "defaultUser": "user",
            "defaultWorkdir": "/home/user",
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        if let Some(token) = &record.access_token {
            body["accessToken"] = json!(token);
        }
        body
    }

    // ----- templates -----

    /// Boots an image once, waits for envd, prepares and snapshots it as a template.
    pub async fn build_template(
        &self,
        template_id: &str,
        image_dir: Option<&Path>,
        memory_mib: u32,
        vcpus: u32,
        boot_timeout: Option<Duration>,
    ) -> Result<TemplateRecord, AgentError> {
        validate_id("template", template_id)?;
        if memory_mib < MIN_MEMORY_MIB {
            return Err(AgentError::InvalidArgument(format!(
                "memory_mib must be at least {MIN_MEMORY_MIB} (got {memory_mib})"
            )));
        }
        let vcpus = vcpus.max(1);
        if vcpus > 64 {
            return Err(AgentError::InvalidArgument(format!(
                "vcpus must be 1 to 64 (got {vcpus})"
            )));
        }
        if self
            .templates
            .lock()
            .expect("templates lock")
            .contains_key(template_id)
            || !self
                .building
                .lock()
                .expect("building lock")
                .insert(template_id.to_string())
        {
            return Err(AgentError::AlreadyExists(format!(
                "template {template_id} already exists"
            )));
        }
        let result = self
            .build_template_inner(template_id, image_dir, memory_mib, vcpus, boot_timeout)
            .await;
        self.building
            .lock()
            .expect("building lock")
            .remove(template_id);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(self.store.template_dir(template_id));
        }
        result
    }

    async fn build_template_inner(
        &self,
        template_id: &str,
        image_dir: Option<&Path>,
        memory_mib: u32,
        vcpus: u32,
        boot_timeout: Option<Duration>,
    ) -> Result<TemplateRecord, AgentError> {
        let started = Instant::now();
        let image_dir = image_dir.unwrap_or(&self.config.image_dir).to_path_buf();
        let manifest = Manifest::read(&image_dir).map_err(|error| {
            AgentError::FailedPrecondition(format!(
                "no usable image in {} ({error}): run `wrenn image build`",
                image_dir.display()
            ))
        })?;
        let dir = self.store.template_dir(template_id);
        let _ = std::fs::remove_dir_all(&dir);
        crate::store::private_dir(&dir)?;
        // The template owns copies of the image's files: a rebuilt image never changes it.
        let copy = |name: &str| -> Result<PathBuf, AgentError> {
            let target = dir.join(name);
            let status = std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(image_dir.join(name))
                .arg(&target)
                .status()
                .map_err(|error| AgentError::internal("copying the image", error))?;
            if !status.success() {
                return Err(AgentError::Internal(format!(
                    "copying {name} from the image failed"
                )));
            }
            crate::store::private_file(&target)?;
            Ok(target)
        };
        let kernel = copy("vmlinuz")?;
        let initrd = copy("initrd.img")?;
        // A confined VMM reads these through /proc/self/fd, which checks their own mode: they
        // are Debian's kernel and our initramfs, nothing secret.
        for public in [&kernel, &initrd] {
            std::fs::set_permissions(public, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .map_err(|error| AgentError::internal("opening the kernel to VMMs", error))?;
        }
        let base = copy("rootfs.ext4")?;
        let disk = dir.join("disk.qcow2");
        crate::disk::create_overlay(&base, "raw", &disk).await?;

        let slot = self.slots.lease(&crate::firewall::Egress::Closed).await?;
        self.mmds.set(
            slot.index,
            Metadata {
                instance_id: format!("template-{template_id}"),
                env_id: template_id.to_string(),
                address: String::new(),
                access_token_hash: token_hash(""),
            },
        );
        let machine = MachineSpec {
            kernel,
            initrd: Some(initrd),
            cmdline: manifest.kernel.cmdline.clone(),
            disk,
            memory_mib,
            vcpus,
            netns: Some(slot.netns.clone()),
            tap: "tap0".into(),
            mac: GUEST_MAC.into(),
            vmm_user: self.vmm_user(slot.index),
        };
        let workdir = dir.join("vm");
        let outcome = async {
            let vm = self.vmm.boot(&machine, &workdir).await?;
            let snapshot = async {
                let address = envd_address(slot.index);
                let boot_timeout = boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT);
                envd_client::wait_ready(address, boot_timeout, || vm.is_alive())
                    .await
                    .map_err(|error| {
                        AgentError::Internal(format!(
                            "{error}; guest console: {}",
                            log_tail(&vm.console_log())
                        ))
                    })?;
                envd_client::prepare_snapshot(address, None, Duration::from_secs(30)).await?;
                self.vmm.pause(&vm).await?;
                Ok::<_, AgentError>(self.vmm.snapshot(&vm, &dir.join("memory.snap")).await?)
            }
            .await;
            let _ = self.vmm.destroy(&vm).await;
            snapshot
        }
        .await;
        self.mmds.remove(slot.index);
        self.slots.release(slot.index).await;
        let snapshot = outcome?;
        let record = TemplateRecord {
            template_id: template_id.to_string(),
            machine: MachineSpec {
                netns: None,
                vmm_user: None,
                ..machine
            },
            accel: self.accel,
            snapshot,
            created_at_ms: now_ms(),
            image_key: manifest.inputs_key.clone(),
            envd_version: manifest.envd.version.clone(),
            build_ms: started.elapsed().as_millis() as u64,
        };
        self.store.save_template(&record)?;
        self.templates
            .lock()
            .expect("templates lock")
            .insert(template_id.to_string(), record.clone());
        tracing::info!(
            template = template_id,
            ms = record.build_ms,
            "template built"
        );
        Ok(record)
    }

    pub fn list_templates(&self) -> Vec<TemplateRecord> {
        let mut templates: Vec<_> = self
            .templates
            .lock()
            .expect("templates lock")
            .values()
            .cloned()
            .collect();
        templates.sort_by(|a, b| a.template_id.cmp(&b.template_id));
        templates
    }

    pub fn delete_template(&self, template_id: &str) -> Result<(), AgentError> {
        if !self
            .templates
            .lock()
            .expect("templates lock")
            .contains_key(template_id)
        {
            return Err(AgentError::NotFound(format!(
                "template {template_id} not found"
            )));
        }
        let users: Vec<String> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .map(|entry| entry.snapshot())
            .filter(|record| record.template_id == template_id)
            .map(|record| record.sandbox_id)
            .collect();
        if !users.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "template {template_id} is in use by sandboxes {}: destroy them first",
                users.join(", ")
            )));
        }
        self.templates
            .lock()
            .expect("templates lock")
            .remove(template_id);
        std::fs::remove_dir_all(self.store.template_dir(template_id))
            .map_err(|error| AgentError::internal("removing the template", error))
    }

    // ----- sandboxes -----

    /// Restores a template into a new sandbox and hands it its settings through `/init`.
    pub async fn create(
        &self,
        options: CreateOptions,
    ) -> Result<(SandboxRecord, CreateTimings), AgentError> {
        let template = self
            .templates
            .lock()
            .expect("templates lock")
            .get(&options.template_id)
            .cloned()
            .ok_or_else(|| {
                AgentError::NotFound(format!("template {} not found", options.template_id))
            })?;
        if template.accel != self.accel {
            return Err(AgentError::FailedPrecondition(format!(
                "template {} was snapshotted under {}, this host runs {}: rebuild it here",
                template.template_id,
                template.accel.as_str(),
                self.accel.as_str()
            )));
        }
        let sandbox_id = match options.sandbox_id.clone() {
            Some(id) => id,
            None => new_id()?,
        };
        validate_id("sandbox", &sandbox_id)?;
        if options.access_token.as_deref() == Some("") {
            return Err(AgentError::InvalidArgument(
                "an empty envd access token is not allowed".into(),
            ));
        }
        let dir = self.store.sandbox_dir(&sandbox_id);
        let record = SandboxRecord {
            sandbox_id: sandbox_id.clone(),
            template_id: template.template_id.clone(),
            state: SandboxState::Starting,
            slot: None,
            vm: None,
            machine: MachineSpec {
                disk: dir.join("disk.qcow2"),
                ..template.machine.clone()
            },
            created_at_ms: now_ms(),
            env_vars: options.env_vars.clone(),
            access_token: options.access_token.clone(),
            allow_internet: options.allow_internet,
            metadata: options.metadata.clone(),
            error: None,
            snapshot: None,
        };
        let entry = Arc::new(SandboxEntry::new(record.clone()));
        {
            let mut sandboxes = self.sandboxes.lock().expect("sandboxes lock");
            if sandboxes.contains_key(&sandbox_id) {
                return Err(AgentError::AlreadyExists(format!(
                    "sandbox {sandbox_id} already exists"
                )));
            }
            sandboxes.insert(sandbox_id.clone(), entry.clone());
        }
        let _operation = entry.operation.lock().await;
        let result = self
            .start_vm(&entry, &template.snapshot, &options, true)
            .await;
        match result {
            Ok(timings) => Ok((entry.snapshot(), timings)),
            Err(error) => {
                self.sandboxes
                    .lock()
                    .expect("sandboxes lock")
                    .remove(&sandbox_id);
                let _ = std::fs::remove_dir_all(&dir);
                Err(error)
            }
        }
    }

    /// Restores `snapshot` into the entry's machine with a new slot, waits for envd, `/init`s.
    /// On failure everything it took is given back (the VM, the slot) and the error returned.
    async fn start_vm(
        &self,
        entry: &SandboxEntry,
        snapshot: &SnapshotFiles,
        options: &CreateOptions,
        fresh_disk: bool,
    ) -> Result<CreateTimings, AgentError> {
        let record = entry.snapshot();
        let dir = self.store.sandbox_dir(&record.sandbox_id);
        let egress = self.egress_of(&record);
        let slot = if fresh_disk {
            crate::store::private_dir(&dir)?;
            self.store.save_sandbox(&record)?;
            let template_disk = self
                .templates
                .lock()
                .expect("templates lock")
                .get(&record.template_id)
                .map(|template| template.machine.disk.clone())
                .ok_or_else(|| {
                    AgentError::NotFound(format!("template {} not found", record.template_id))
                })?;
            // The disk and the slot are made ready at the same time.
            let (disk, slot) = tokio::join!(
                crate::disk::create_overlay(&template_disk, "qcow2", &record.machine.disk),
                self.slots.lease(&egress)
            );
            if let Err(error) = disk {
                if let Ok(slot) = slot {
                    self.slots.release(slot.index).await;
                }
                return Err(error);
            }
            slot?
        } else {
            self.slots.lease(&egress).await?
        };
        self.mmds.set(slot.index, Self::metadata(&record));
        let machine = MachineSpec {
            netns: Some(slot.netns.clone()),
            vmm_user: self.vmm_user(slot.index),
            ..record.machine.clone()
        };
        let mut timings = CreateTimings::default();
        let started = Instant::now();
        let outcome = async {
            let vm = self
                .vmm
                .restore(&machine, snapshot, &dir.join("vm"))
                .await?;
            timings.restore = started.elapsed();
            self.save(entry, |record| {
                record.vm = Some(vm.clone());
                record.slot = Some(slot.index);
            });
            let ready = async {
                let address = envd_address(slot.index);
                let ready_timeout = options.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT);
                envd_client::wait_ready(address, ready_timeout, || vm.is_alive()).await?;
                timings.ready = started.elapsed() - timings.restore;
                let init_timeout = options.init_timeout.unwrap_or(DEFAULT_INIT_TIMEOUT);
                envd_client::init(address, Self::init_body(&entry.snapshot()), init_timeout).await
            }
            .await;
            if ready.is_err() {
                let _ = self.vmm.destroy(&vm).await;
            }
            ready
        }
        .await;
        // Replacing the leased slot waits until now, so it never competes with the restore.
        self.keep_slots_ready();
        match outcome {
            Ok(()) => {
                self.save(entry, |record| {
                    record.state = SandboxState::Running;
                    record.error = None;
                });
                Ok(timings)
            }
            Err(error) => {
                self.mmds.remove(slot.index);
                self.slots.release(slot.index).await;
                self.save(entry, |record| {
                    record.vm = None;
                    record.slot = None;
                });
                Err(error)
            }
        }
    }

    pub fn get(&self, sandbox_id: &str) -> Result<SandboxRecord, AgentError> {
        Ok(self.entry(sandbox_id)?.snapshot())
    }

    pub fn list(&self) -> Vec<SandboxRecord> {
        let mut records: Vec<_> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .map(|entry| entry.snapshot())
            .collect();
        records.sort_by(|a, b| {
            a.created_at_ms
                .cmp(&b.created_at_ms)
                .then(a.sandbox_id.cmp(&b.sandbox_id))
        });
        records
    }

    /// Where a running sandbox's `port` is reached, and the token that is cancelled when its VM
    /// stops (end the connection then).
    pub fn guest_route(
        &self,
        sandbox_id: &str,
        port: u16,
    ) -> Option<(SocketAddr, CancellationToken)> {
        let entry = self.entry(sandbox_id).ok()?;
        let record = entry.snapshot();
        if record.state != SandboxState::Running
            || entry.destroying.load(std::sync::atomic::Ordering::SeqCst)
        {
            return None;
        }
        let address = crate::network::Slot::address_of(record.slot?);
        let ends = entry.connections.lock().expect("connections lock").clone();
        Some((SocketAddr::from((address, port)), ends))
    }

    /// Resource use of a sandbox's VMM, if it runs.
    pub fn usage(&self, record: &SandboxRecord) -> Option<wrenn_vmm::ResourceUse> {
        record.vm.as_ref().and_then(|vm| self.vmm.usage(vm).ok())
    }

    /// Snapshots a running sandbox to its own files and stops its VM.
    pub async fn pause(&self, sandbox_id: &str) -> Result<SandboxRecord, AgentError> {
        let entry = self.entry(sandbox_id)?;
        let _operation = entry.operation.lock().await;
        let record = entry.snapshot();
        if record.state != SandboxState::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {sandbox_id} is {}: only a running sandbox can be paused",
                record.state.as_str()
            )));
        }
        let (Some(vm), Some(slot)) = (record.vm.clone(), record.slot) else {
            return Err(AgentError::Internal(format!(
                "sandbox {sandbox_id} runs without a VM"
            )));
        };
        self.save(&entry, |record| record.state = SandboxState::Pausing);
        let dir = self.store.sandbox_dir(sandbox_id);
        let address = envd_address(slot);
        let snapshot = async {
            envd_client::prepare_snapshot(
                address,
                record.access_token.as_deref(),
                Duration::from_secs(30),
            )
            .await?;
            self.vmm.pause(&vm).await?;
            Ok::<_, AgentError>(self.vmm.snapshot(&vm, &dir.join("memory.snap")).await?)
        }
        .await;
        match snapshot {
            Ok(snapshot) => {
                let _ = self.vmm.destroy(&vm).await;
                entry.end_connections();
                self.mmds.remove(slot);
                self.slots.release(slot).await;
                Ok(self.save(&entry, |record| {
                    record.state = SandboxState::Paused;
                    record.vm = None;
                    record.slot = None;
                    record.snapshot = Some(snapshot);
                }))
            }
            Err(error) => {
                // Back to running: the VM continues and /init thaws what prepare froze.
                let _ = self.vmm.resume(&vm).await;
                let _ = envd_client::init(address, Self::init_body(&record), DEFAULT_INIT_TIMEOUT)
                    .await;
                let _ = std::fs::remove_file(dir.join("memory.snap"));
                self.save(&entry, |record| record.state = SandboxState::Running);
                Err(error)
            }
        }
    }

    /// Restores a paused sandbox from its own files.
    pub async fn resume(
        &self,
        sandbox_id: &str,
        access_token: Option<String>,
        ready_timeout: Option<Duration>,
        init_timeout: Option<Duration>,
    ) -> Result<SandboxRecord, AgentError> {
        let entry = self.entry(sandbox_id)?;
        let _operation = entry.operation.lock().await;
        let record = entry.snapshot();
        if record.state != SandboxState::Paused {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {sandbox_id} is {}: only a paused sandbox can be resumed",
                record.state.as_str()
            )));
        }
        let snapshot = record.snapshot.clone().ok_or_else(|| {
            AgentError::Internal(format!("paused sandbox {sandbox_id} has no snapshot"))
        })?;
        if access_token.as_deref() == Some("") {
            return Err(AgentError::InvalidArgument(
                "an empty envd access token is not allowed".into(),
            ));
        }
        self.save(&entry, |record| {
            record.state = SandboxState::Resuming;
            if access_token.is_some() {
                record.access_token = access_token.clone();
            }
        });
        let options = CreateOptions {
            ready_timeout,
            init_timeout,
            ..CreateOptions::default()
        };
        match self.start_vm(&entry, &snapshot, &options, false).await {
            Ok(_) => {
                let _ = std::fs::remove_file(&snapshot.memory);
                Ok(self.save(&entry, |record| record.snapshot = None))
            }
            Err(error) => {
                self.save(&entry, |record| {
                    record.state = SandboxState::Paused;
                    record.access_token = record.access_token.clone();
                });
                Err(error)
            }
        }
    }

    /// Stops a sandbox's VM and frees everything it had.
    pub async fn destroy(&self, sandbox_id: &str) -> Result<(), AgentError> {
        let entry = self.entry(sandbox_id)?;
        let _operation = entry.operation.lock().await;
        // A client that sees its stream end and asks again must hear "not found", not be
        // routed to a guest that is going away.
        entry
            .destroying
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let record = entry.snapshot();
        if let Some(vm) = &record.vm
            && let Err(error) = self.vmm.destroy(vm).await
        {
            entry
                .destroying
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return Err(error.into());
        }
        entry.end_connections();
        if let Some(slot) = record.slot {
            self.mmds.remove(slot);
            self.slots.release(slot).await;
        }
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .remove(sandbox_id);
        let dir = self.store.sandbox_dir(sandbox_id);
        std::fs::remove_dir_all(&dir)
            .or_else(|error| {
                if error.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(error)
                }
            })
            .map_err(|error| AgentError::internal("removing the sandbox's files", error))?;
        tracing::info!(sandbox = sandbox_id, "sandbox destroyed");
        Ok(())
    }

    /// Marks sandboxes whose VMM died as failed and frees their slots.
    async fn check_vmms(&self) {
        let entries: Vec<Arc<SandboxEntry>> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .cloned()
            .collect();
        for entry in entries {
            let Ok(_operation) = entry.operation.try_lock() else {
                continue;
            };
            let record = entry.snapshot();
            let Some(vm) = &record.vm else { continue };
            if record.state != SandboxState::Running || vm.is_alive() {
                continue;
            }
            let reason = format!(
                "the VMM (QEMU pid {}) exited unexpectedly: {}",
                vm.pid,
                log_tail(&vm.vmm_log())
            );
            tracing::warn!(sandbox = %record.sandbox_id, %reason, "sandbox failed");
            entry.end_connections();
            if let Some(slot) = record.slot {
                self.mmds.remove(slot);
                self.slots.release(slot).await;
            }
            self.save(&entry, |record| {
                record.state = SandboxState::Failed;
                record.error = Some(reason);
                record.vm = None;
                record.slot = None;
            });
        }
    }

    /// Reads the records a previous run left: adopts live VMs, marks dead ones failed, removes
    /// stray directories, namespaces and VMM processes that no record accounts for.
    async fn recover(&self) {
        let (templates, strays) = self.store.load_templates();
        for stray in strays {
            tracing::info!(dir = %stray.display(), "removing an unfinished template");
            let _ = std::fs::remove_dir_all(stray);
        }
        for template in templates {
            self.templates
                .lock()
                .expect("templates lock")
                .insert(template.template_id.clone(), template);
        }
        let (records, strays) = self.store.load_sandboxes();
        for stray in strays {
            tracing::info!(dir = %stray.display(), "removing a sandbox directory without a record");
            let _ = std::fs::remove_dir_all(stray);
        }
        let mut adopted_pids = HashSet::new();
        for mut record in records {
            if let Some(vm) = record.vm.clone() {
                let alive = vm.is_alive() && self.vmm.adopt(&vm).await.is_ok();
                match (alive, record.state, record.slot) {
                    (true, SandboxState::Running, Some(slot)) => {
                        if let Err(error) = self.slots.claim(slot, &self.egress_of(&record)).await {
                            tracing::error!(%error, sandbox = %record.sandbox_id, "could not load the current firewall into an adopted sandbox's slot");
                        }
                        self.mmds.set(slot, Self::metadata(&record));
                        adopted_pids.insert(vm.pid);
                        tracing::info!(sandbox = %record.sandbox_id, pid = vm.pid, "adopted a running sandbox");
                    }
                    // The previous agent stopped mid-pause: the VM lives (perhaps stopped, its
                    // processes frozen by /snapshot/prepare). Nothing is lost by carrying on:
                    // it runs again, /init thaws it, and the half-written snapshot goes.
                    (true, SandboxState::Pausing, Some(slot)) => {
                        let continued = async {
                            self.slots.claim(slot, &self.egress_of(&record)).await?;
                            self.mmds.set(slot, Self::metadata(&record));
                            self.vmm.resume(&vm).await?;
                            envd_client::init(
                                envd_address(slot),
                                Self::init_body(&record),
                                DEFAULT_INIT_TIMEOUT,
                            )
                            .await
                        }
                        .await;
                        let dir = self.store.sandbox_dir(&record.sandbox_id);
                        let _ = std::fs::remove_file(dir.join("memory.partial"));
                        let _ = std::fs::remove_file(dir.join("memory.snap"));
                        match continued {
                            Ok(()) => {
                                record.state = SandboxState::Running;
                                record.snapshot = None;
                                adopted_pids.insert(vm.pid);
                                tracing::info!(sandbox = %record.sandbox_id, pid = vm.pid, "resumed a sandbox the previous agent left mid-pause");
                            }
                            Err(error) => {
                                let _ = self.vmm.destroy(&vm).await;
                                self.mmds.remove(slot);
                                self.slots.release(slot).await;
                                record.error = Some(format!(
                                    "the agent restarted mid-pause and the sandbox could not continue: {error}"
                                ));
                                record.vm = None;
                                record.slot = None;
                                record.state = SandboxState::Failed;
                                tracing::warn!(sandbox = %record.sandbox_id, %error, "sandbox not adopted");
                            }
                        }
                    }
                    (alive, state, _) => {
                        if alive {
                            let _ = self.vmm.destroy(&vm).await;
                        }
                        record.error = Some(if alive {
                            format!(
                                "the agent restarted while the sandbox was {}",
                                state.as_str()
                            )
                        } else {
                            "the VMM was gone when the agent restarted".to_string()
                        });
                        record.vm = None;
                        record.slot = None;
                        // A pause whose snapshot was complete (it is renamed into place only
                        // then) but whose record was not yet saved: the sandbox is paused.
                        let written = self
                            .store
                            .sandbox_dir(&record.sandbox_id)
                            .join("memory.snap");
                        if !alive && state == SandboxState::Pausing && written.is_file() {
                            record.snapshot = Some(SnapshotFiles {
                                bytes: std::fs::metadata(&written).map(|m| m.len()).unwrap_or(0),
                                memory: written,
                            });
                        }
                        record.state =
                            if matches!(state, SandboxState::Resuming | SandboxState::Pausing)
                                && record.snapshot.is_some()
                            {
                                SandboxState::Paused
                            } else {
                                SandboxState::Failed
                            };
                        if record.state == SandboxState::Paused {
                            record.error = None;
                        }
                        tracing::warn!(sandbox = %record.sandbox_id, state = record.state.as_str(), "sandbox not adopted");
                    }
                }
            } else if matches!(
                record.state,
                SandboxState::Starting | SandboxState::Running | SandboxState::Pausing
            ) {
                record.state = SandboxState::Failed;
                record.error =
                    Some("the agent stopped before the sandbox's VM was recorded".into());
            }
            let _ = self.store.save_sandbox(&record);
            self.sandboxes.lock().expect("sandboxes lock").insert(
                record.sandbox_id.clone(),
                Arc::new(SandboxEntry::new(record)),
            );
        }
        let killed = kill_orphan_vmms(&self.config.data_dir, &adopted_pids);
        let removed = self.slots.remove_orphans().await;
        if killed + removed > 0 {
            tracing::info!(
                vmms = killed,
                namespaces = removed,
                "removed orphans of a previous run"
            );
        }
    }

    /// Deletes the slots kept ready (at shutdown; leased ones stay with their sandboxes).
    pub async fn shutdown(&self) {
        self.slots.delete_ready().await;
    }
}

/// Kills VMM processes started for this data directory that no adopted sandbox owns.
fn kill_orphan_vmms(data_dir: &Path, adopted: &HashSet<u32>) -> usize {
    let marker = data_dir.display().to_string();
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if adopted.contains(&pid) || pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let is_qemu = args
            .first()
            .is_some_and(|program| program.contains("qemu-system"));
        let ours = args.iter().any(|arg| {
            arg.contains(&format!("{marker}/sandboxes/"))
                || arg.contains(&format!("{marker}/templates/"))
        });
        if is_qemu && ours {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed += 1;
        }
    }
    killed
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
