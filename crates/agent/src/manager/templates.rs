//! Templates: an image (or another template's disk) booted once, envd healthy, work done in
//! the guest (a build's steps, see [`super::build`]), prepared and snapshotted; listed and
//! deleted (never while a sandbox or another template stands on one).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use super::*;
use crate::store::StepLayer;

/// What a template's files come from.
pub(super) enum TemplateSource {
    /// An image directory (`wrenn image build`): its kernel, initramfs and root filesystem are
    /// copied, and the disk is a new layer over the copy.
    Image(PathBuf),
    /// A template of this host: its kernel and initramfs are linked, and the disk is a new
    /// layer over the parent's disk (which is kept while the child exists).
    Template(Box<TemplateRecord>),
    /// A root filesystem made from a registry's image ([`crate::oci`]), moved into the
    /// template; the kernel and initramfs are linked from `kernel_from`, a template of this
    /// host, which the new one does not depend on.
    Rootfs {
        rootfs: PathBuf,
        kernel_from: Box<TemplateRecord>,
    },
    /// The bottom of another template's disk chain, as one of its build's steps left it (see
    /// [`StepLayer`]): the layers of it in `from`'s directory are taken (linked, or copied and
    /// pointed at their neighbours' copies), those below stay its parent's; the kernel and
    /// initramfs are linked from `from`.
    Layers {
        from: Box<TemplateRecord>,
        /// The chain's bottom, top first.
        layers: Vec<wrenn_vmm::qcow2::Layer>,
        /// `from`'s directory.
        from_dir: PathBuf,
    },
}

impl TemplateSource {
    /// The template the new one stands on (and which is kept while it exists).
    fn parent(&self) -> Option<String> {
        match self {
            TemplateSource::Template(parent) => Some(parent.template_id.clone()),
            TemplateSource::Image(_) | TemplateSource::Rootfs { .. } => None,
            // Layers below `from`'s own are its parent's, which the new template then stands on.
            TemplateSource::Layers {
                from,
                layers,
                from_dir,
            } => layers
                .iter()
                .any(|layer| layer.path.parent() != Some(from_dir.as_path()))
                .then(|| from.parent.clone())
                .flatten(),
        }
    }

    /// The bottom `count` layers of `from`'s disk chain (see [`StepLayer::layers`]), whose
    /// directory is `from_dir`.
    pub(super) fn layers_of(
        from: TemplateRecord,
        count: usize,
        from_dir: PathBuf,
    ) -> Result<TemplateSource, AgentError> {
        let chain = wrenn_vmm::qcow2::chain(&from.machine.disk)
            .map_err(|error| AgentError::internal("reading a cached layer's chain", error))?;
        if count == 0 || count >= chain.len() {
            return Err(AgentError::Internal(format!(
                "template {} keeps no step layer {count} in its chain of {}",
                from.template_id,
                chain.len()
            )));
        }
        let layers = chain[chain.len() - count..].to_vec();
        Ok(TemplateSource::Layers {
            from: Box::new(from),
            layers,
            from_dir,
        })
    }
}

/// The disk of a VM a template is being made from, as the work in its guest sees it: its
/// layers can be frozen as they are ([`VmDisk::freeze`]).
pub(super) struct VmDisk<'a> {
    vmm: &'a dyn Vmm,
    vm: &'a wrenn_vmm::VmProcess,
    /// The top, which the VM writes (the template's `disk.qcow2`).
    top: &'a Path,
}

impl VmDisk<'_> {
    /// How many layers the disk's chain has below its top.
    pub fn layers_below_top(&self) -> Result<usize, AgentError> {
        wrenn_vmm::qcow2::chain(self.top)
            .map(|layers| layers.len() - 1)
            .map_err(|error| AgentError::internal("reading the disk's chain", error))
    }

    /// Whether this host's VMM can freeze a running VM's disk.
    pub fn can_freeze(&self) -> bool {
        self.vmm.can_layer_disk()
    }

    /// Freezes the disk as it is now (the guest's writes synced) as `name` in the template's
    /// directory: the top is renamed (the VMM holds it open), a new top made over it, and the
    /// VM moved onto that. Returns how many layers, from the base, make the frozen disk. A
    /// failure before the VMM is asked leaves the disk as it was; one after leaves it in doubt
    /// (the VM may write to either file), and the template must not be made.
    pub async fn freeze(&self, name: &str) -> Result<usize, AgentError> {
        let frozen = self.top.with_file_name(name);
        if frozen.exists() {
            return Err(AgentError::Internal(format!(
                "the layer {} exists already",
                frozen.display()
            )));
        }
        let size = wrenn_vmm::qcow2::virtual_size(self.top)
            .map_err(|error| AgentError::internal("reading the disk's size", error))?;
        std::fs::rename(self.top, &frozen)
            .map_err(|error| AgentError::internal("naming the frozen layer", error))?;
        if let Err(error) =
            crate::disk::create_overlay_unopened(&frozen, "qcow2", self.top, size).await
        {
            let _ = std::fs::remove_file(self.top);
            let _ = std::fs::rename(&frozen, self.top);
            return Err(error);
        }
        self.vmm
            .layer_disk(self.vm, self.top)
            .await
            .map_err(|error| {
                AgentError::Internal(format!(
                    "the build's disk could not be frozen after a step, and the build cannot \
                     go on: {error}"
                ))
            })?;
        wrenn_vmm::qcow2::chain(&frozen)
            .map(|layers| layers.len())
            .map_err(|error| AgentError::internal("reading the frozen layer's chain", error))
    }
}

/// What a template's first boot does in the guest before the snapshot.
#[async_trait::async_trait]
pub(super) trait VmWork: Sync {
    /// Stops the work (and the boot's wait for envd) when cancelled.
    fn stop(&self) -> Option<&CancellationToken> {
        None
    }
    /// Told when envd answers, `took` after the VM started.
    fn booted(&self, _took: Duration) {}
    /// What the template's build was made of, hashed (see [`TemplateRecord::build_key`]).
    fn build_key(&self) -> Option<String> {
        None
    }
    /// Runs in the booted guest, whose envd is at `address` and whose disk is `disk`.
    async fn in_guest(
        &self,
        _address: SocketAddr,
        _disk: &VmDisk<'_>,
    ) -> Result<super::build::TemplateDefaults, AgentError> {
        Ok(super::build::TemplateDefaults::default())
    }
    /// The steps whose disks the template's chain keeps (see [`StepLayer`]).
    fn step_layers(&self) -> Vec<StepLayer> {
        Vec::new()
    }
}

/// Nothing but the boot.
struct BootOnly;

impl VmWork for BootOnly {}

impl Manager {
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
        let source =
            TemplateSource::Image(image_dir.unwrap_or(&self.config.image_dir).to_path_buf());
        self.make_template(
            template_id,
            source,
            memory_mib,
            vcpus,
            boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT),
            false,
            &BootOnly,
        )
        .await
    }

    /// Makes a template from `source`: its files, a first boot (on a slot open to the
    /// internet when `internet`) with `work` done in the guest, then prepare and snapshot. The
    /// id is taken for the length of the build; on failure nothing of it is left.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn make_template(
        &self,
        template_id: &str,
        source: TemplateSource,
        memory_mib: u32,
        vcpus: u32,
        boot_timeout: Duration,
        internet: bool,
        work: &dyn VmWork,
    ) -> Result<TemplateRecord, AgentError> {
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
        self.reserve_template(template_id, source.parent())?;
        let result = self
            .make_template_inner(
                template_id,
                source,
                memory_mib,
                vcpus,
                boot_timeout,
                internet,
                work,
            )
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

    /// Takes `template_id` for a template being made on `parent` (kept meanwhile): refused when
    /// it exists or is being made, or when `parent` does not exist. [`Manager::building`] holds
    /// it until the maker removes it.
    pub(super) fn reserve_template(
        &self,
        template_id: &str,
        parent: Option<String>,
    ) -> Result<(), AgentError> {
        // Locks in this order (templates, then building), as a delete takes them.
        let templates = self.templates.lock().expect("templates lock");
        let mut building = self.building.lock().expect("building lock");
        if templates.contains_key(template_id) || building.contains_key(template_id) {
            return Err(AgentError::AlreadyExists(format!(
                "template {template_id} already exists"
            )));
        }
        if let Some(parent) = &parent
            && !templates.contains_key(parent)
        {
            return Err(AgentError::NotFound(format!("template {parent} not found")));
        }
        building.insert(template_id.to_string(), parent);
        Ok(())
    }

    /// Makes `template_id` the same template as `cached` (a build of the same, see
    /// [`TemplateRecord::build_key`]): its files linked (a template's files never change), but
    /// for the disk's own layer, which is copied and, when its backing file is `cached`'s own,
    /// pointed at the new template's link of it.
    pub(super) async fn clone_template(
        &self,
        template_id: &str,
        cached: &TemplateRecord,
    ) -> Result<TemplateRecord, AgentError> {
        validate_id("template", template_id)?;
        self.reserve_template(template_id, cached.parent.clone())?;
        let dir = self.store.template_dir(template_id);
        let result = async {
            let _ = std::fs::remove_dir_all(&dir);
            crate::store::private_dir(&dir)?;
            let from = self.store.template_dir(&cached.template_id);
            let moved = |path: &Path| -> Result<PathBuf, AgentError> {
                let name = path.file_name().ok_or_else(|| {
                    AgentError::Internal(format!("{} names no file", path.display()))
                })?;
                Ok(dir.join(name))
            };
            let layers = wrenn_vmm::qcow2::chain(&cached.machine.disk)
                .map_err(|error| AgentError::internal("reading the cached disk's chain", error))?;
            // The layers in the cached template's own directory that stand on another (its top,
            // and a pulled template's whole chain): copied, and pointed at the new template's
            // files, so that the new one never depends on the cached one's directory.
            let pointed: Vec<usize> = (0..layers.len().saturating_sub(1))
                .filter(|&i| layers[i].path.parent() == Some(from.as_path()))
                .collect();
            let entries = std::fs::read_dir(&from)
                .map_err(|error| AgentError::internal("listing the cached template", error))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let target = dir.join(&name);
                if entry.path() == cached.machine.disk
                    || pointed.iter().any(|&i| layers[i].path == entry.path())
                {
                    crate::disk::copy_file(&entry.path(), &target).await?;
                } else if entry.file_type().is_ok_and(|kind| kind.is_file())
                    && name != std::ffi::OsStr::new(crate::store::TEMPLATE_FILE)
                {
                    std::fs::hard_link(entry.path(), &target).map_err(|error| {
                        AgentError::internal("linking the cached template", error)
                    })?;
                }
            }
            let disk = moved(&cached.machine.disk)?;
            for &i in &pointed {
                let below = &layers[i + 1];
                if below.path.parent() == Some(from.as_path()) {
                    let layer = moved(&layers[i].path)?;
                    crate::disk::rebase(&layer, &moved(&below.path)?, below.format).await?;
                }
            }
            // Their bytes changed (the backing file's name): hashed anew when needed.
            let rewritten: Vec<String> = pointed
                .iter()
                .filter_map(|&i| layers[i].path.file_name()?.to_str().map(str::to_string))
                .collect();
            let record = TemplateRecord {
                template_id: template_id.to_string(),
                machine: MachineSpec {
                    kernel: moved(&cached.machine.kernel)?,
                    initrd: cached.machine.initrd.as_deref().map(moved).transpose()?,
                    disk,
                    ..cached.machine.clone()
                },
                snapshot: SnapshotFiles {
                    memory: moved(&cached.snapshot.memory)?,
                    ram: cached.snapshot.ram.as_deref().map(moved).transpose()?,
                    ..cached.snapshot.clone()
                },
                created_at_ms: now_ms(),
                build_ms: 0,
                digests: cached
                    .digests
                    .iter()
                    .filter(|(name, _)| !rewritten.contains(name))
                    .map(|(name, sha256)| (name.clone(), sha256.clone()))
                    .collect(),
                stored: false,
                ..cached.clone()
            };
            self.store.save_template(&record)?;
            Ok(record)
        }
        .await;
        self.building
            .lock()
            .expect("building lock")
            .remove(template_id);
        match result {
            Ok(record) => {
                self.templates
                    .lock()
                    .expect("templates lock")
                    .insert(template_id.to_string(), record.clone());
                Ok(record)
            }
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(error)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn make_template_inner(
        &self,
        template_id: &str,
        source: TemplateSource,
        memory_mib: u32,
        vcpus: u32,
        boot_timeout: Duration,
        internet: bool,
        work: &dyn VmWork,
    ) -> Result<TemplateRecord, AgentError> {
        let started = Instant::now();
        let dir = self.store.template_dir(template_id);
        let _ = std::fs::remove_dir_all(&dir);
        crate::store::private_dir(&dir)?;
        let files = self.template_files(&dir, &source).await?;
        let egress = if internet {
            self.slots.egress(
                &Default::default(),
                crate::firewall::guest_resolver(&files.cmdline),
                None,
            )
        } else {
            crate::firewall::Egress::Closed
        };
        let slot = self.slots.lease(&egress).await?;
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
            kernel: files.kernel,
            initrd: files.initrd,
            cmdline: files.cmdline,
            disk: files.disk,
            memory_mib,
            vcpus,
            netns: Some(slot.netns.clone()),
            tap: "tap0".into(),
            mac: GUEST_MAC.into(),
            vmm_user: self.vmm_user(slot.index),
            memory: self.template_memory(template_id, memory_mib),
        };
        let workdir = dir.join("vm");
        let outcome = async {
            let vm = self.vmm.boot(&machine, &workdir).await?;
            let snapshot = async {
                let address = envd_address(slot.index);
                let ready = envd_client::wait_ready(address, boot_timeout, || vm.is_alive());
                let took = match work.stop() {
                    Some(stop) => tokio::select! {
                        took = ready => took,
                        () = stop.cancelled() => Err(AgentError::Cancelled("the build was stopped".into())),
                    },
                    None => ready.await,
                }
                .map_err(|error| match error {
                    AgentError::Cancelled(_) => error,
                    error => AgentError::Internal(format!(
                        "{error}; guest console: {}",
                        log_tail(&vm.console_log())
                    )),
                })?;
                work.booted(took);
                let disk = VmDisk {
                    vmm: self.vmm.as_ref(),
                    vm: &vm,
                    top: &machine.disk,
                };
                let defaults = work.in_guest(address, &disk).await?;
                envd_client::prepare_snapshot(address, None, Duration::from_secs(30)).await?;
                self.vmm.pause(&vm).await?;
                let snapshot = self.vmm.snapshot(&vm, &dir.join("memory.snap")).await?;
                Ok::<_, AgentError>((snapshot, defaults))
            }
            .await;
            let _ = self.vmm.destroy(&vm).await;
            snapshot
        }
        .await;
        self.mmds.remove(slot.index);
        self.slots.release(slot.index).await;
        let (snapshot, defaults) = outcome?;
        // The VM has ended: nothing writes its memory file any more. Kept sealed for its
        // sandboxes (a file that cannot be sealed is loaded from the saved one instead).
        if let (Some(ram), GuestMemory::Shared(memory)) = (&snapshot.ram, &machine.memory) {
            match wrenn_vmm::memory::seal(memory) {
                Ok(()) => {
                    self.memory_files
                        .lock()
                        .expect("memory files lock")
                        .insert(ram.clone(), memory.clone());
                }
                Err(error) => {
                    tracing::warn!(template = template_id, %error, "memory file not kept")
                }
            }
        }
        let record = TemplateRecord {
            template_id: template_id.to_string(),
            machine: MachineSpec {
                netns: None,
                vmm_user: None,
                memory: GuestMemory::Anonymous,
                ..machine
            },
            accel: self.accel,
            snapshot,
            created_at_ms: now_ms(),
            image_key: files.image_key,
            envd_version: files.envd_version,
            build_ms: started.elapsed().as_millis() as u64,
            parent: source.parent(),
            default_user: defaults.user,
            default_workdir: defaults.workdir,
            start_cmd: defaults.start_cmd,
            build_key: work.build_key(),
            digests: files.digests,
            pulled_digests: BTreeMap::new(),
            stored: false,
            steps: work.step_layers(),
            env_vars: BTreeMap::new(),
            ephemeral: false,
            source_sandbox: None,
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

    /// The template's kernel, initramfs and disk in `dir`, from `source`.
    async fn template_files(
        &self,
        dir: &Path,
        source: &TemplateSource,
    ) -> Result<TemplateFiles, AgentError> {
        let files = match source {
            TemplateSource::Image(image_dir) => {
                let manifest = Manifest::read(image_dir).map_err(|error| {
                    AgentError::FailedPrecondition(format!(
                        "no usable image in {} ({error}): run `wrenn image build`",
                        image_dir.display()
                    ))
                })?;
                // The template owns copies of the image's files: a rebuilt image never
                // changes it.
                let copy_as = |name: &str, target_name: &str| -> Result<PathBuf, AgentError> {
                    let target = dir.join(target_name);
                    if !image_dir.join(name).is_file() && name == FIRECRACKER_KERNEL {
                        return Err(AgentError::FailedPrecondition(format!(
                            "the image in {} has no Firecracker kernel ({FIRECRACKER_KERNEL}): run \
                             `wrenn image firecracker-kernel --out {}`",
                            image_dir.display(),
                            image_dir.display()
                        )));
                    }
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
                let copy = |name: &str| copy_as(name, name);
                let base = copy("rootfs.ext4")?;
                let disk = dir.join("disk.qcow2");
                crate::disk::create_overlay(&base, "raw", &disk).await?;
                // Firecracker boots its own kernel (virtio over MMIO built in) with no
                // initramfs: the kernel mounts the root disk and starts wrenn-init itself.
                let firecracker = self.vmm.needs_raw_disk();
                TemplateFiles {
                    kernel: if firecracker {
                        copy_as(FIRECRACKER_KERNEL, "vmlinuz")?
                    } else {
                        copy("vmlinuz")?
                    },
                    initrd: if firecracker {
                        None
                    } else {
                        Some(copy("initrd.img")?)
                    },
                    disk,
                    cmdline: if firecracker {
                        firecracker_cmdline(&manifest.kernel.cmdline)
                    } else {
                        manifest.kernel.cmdline.clone()
                    },
                    image_key: manifest.inputs_key.clone(),
                    envd_version: manifest.envd.version.clone(),
                    digests: BTreeMap::new(),
                }
            }
            TemplateSource::Template(parent) => {
                let disk = dir.join("disk.qcow2");
                crate::disk::create_overlay(&parent.machine.disk, "qcow2", &disk).await?;
                linked_files(parent, dir, disk)?
            }
            TemplateSource::Layers {
                from,
                layers,
                from_dir,
            } => {
                let (base, format, linked) = take_layers(layers, from_dir, dir).await?;
                let disk = dir.join("disk.qcow2");
                crate::disk::create_overlay(&base, format, &disk).await?;
                let mut files = linked_files(from, dir, disk)?;
                for name in linked {
                    if let Some(sha256) = from.digests.get(&name) {
                        files.digests.insert(name, sha256.clone());
                    }
                }
                files
            }
            TemplateSource::Rootfs {
                rootfs,
                kernel_from,
            } => {
                let base = dir.join("rootfs.ext4");
                std::fs::rename(rootfs, &base)
                    .map_err(|error| AgentError::internal("taking the root filesystem", error))?;
                crate::store::private_file(&base)?;
                let disk = dir.join("disk.qcow2");
                crate::disk::create_overlay(&base, "raw", &disk).await?;
                linked_files(kernel_from, dir, disk)?
            }
        };
        // A VMM whose disk is one raw file (Firecracker) gets the chain flattened into one.
        let mut files = files;
        if self.vmm.needs_raw_disk() {
            let raw = dir.join("disk.raw");
            crate::disk::flatten_to_raw(&files.disk, &raw).await?;
            let _ = std::fs::remove_file(&files.disk);
            // The image's root filesystem this template copied is in the raw disk now.
            let _ = std::fs::remove_file(dir.join("rootfs.ext4"));
            files.disk = raw;
        }
        // A confined VMM reads these through /proc/self/fd, which checks their own mode: they
        // are Debian's kernel and our initramfs, nothing secret.
        for public in std::iter::once(&files.kernel).chain(files.initrd.as_ref()) {
            std::fs::set_permissions(public, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .map_err(|error| AgentError::internal("opening the kernel to VMMs", error))?;
        }
        Ok(files)
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

    /// Removes the template from this host (not from the template store): refused while a
    /// sandbox or another template stands on it.
    pub(super) fn remove_template(&self, template_id: &str) -> Result<(), AgentError> {
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
            .filter(|record| record.stands_on(template_id))
            .map(|record| record.sandbox_id)
            .collect();
        let children: Vec<String> = {
            let templates = self.templates.lock().expect("templates lock");
            let building = self.building.lock().expect("building lock");
            templates
                .values()
                .filter(|template| template.parent.as_deref() == Some(template_id))
                .map(|template| template.template_id.clone())
                .chain(
                    building
                        .iter()
                        .filter(|(_, parent)| parent.as_deref() == Some(template_id))
                        .map(|(child, _)| format!("{child} (being built)")),
                )
                .collect()
        };
        if !children.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "template {template_id} is the parent of templates {}: delete them first",
                children.join(", ")
            )));
        }
        if !users.is_empty() {
            return Err(AgentError::FailedPrecondition(format!(
                "template {template_id} is in use by sandboxes {}: destroy them first",
                users.join(", ")
            )));
        }
        let in_flight = self
            .creating_from
            .lock()
            .expect("creating lock")
            .get(template_id)
            .copied()
            .unwrap_or(0);
        if in_flight > 0 {
            return Err(AgentError::FailedPrecondition(format!(
                "template {template_id} is in use by {in_flight} create(s) or build(s) in \
                 flight: try again once they end"
            )));
        }
        self.templates
            .lock()
            .expect("templates lock")
            .remove(template_id);
        self.drain_warm(template_id);
        let dir = self.store.template_dir(template_id);
        self.memory_files
            .lock()
            .expect("memory files lock")
            .retain(|ram, _| !ram.starts_with(&dir));
        std::fs::remove_dir_all(&dir)
            .map_err(|error| AgentError::internal("removing the template", error))
    }

    /// The memory a template's build VM runs with: a new memory file when templates keep
    /// their memory in one (QEMU's own memory otherwise, or when the file cannot be made).
    fn template_memory(&self, template_id: &str, memory_mib: u32) -> GuestMemory {
        if !self.config.mapped_memory || !self.vmm.maps_memory_files() {
            return GuestMemory::Anonymous;
        }
        match wrenn_vmm::memory::create(template_id, u64::from(memory_mib) << 20) {
            Ok(memory) => GuestMemory::Shared(Arc::new(memory)),
            Err(error) => {
                tracing::warn!(template = template_id, %error, "the template's memory stays in its snapshot");
                GuestMemory::Anonymous
            }
        }
    }

    /// The sealed memory file holding `ram` (a template's memory, see
    /// [`wrenn_vmm::memory`]) for a restore of `memory_mib`: loaded from the file on its first
    /// use since the agent started, then shared by every restore.
    pub(super) async fn mapped_memory(
        &self,
        ram: &Path,
        memory_mib: u32,
    ) -> Result<Arc<OwnedFd>, AgentError> {
        let cached = || {
            self.memory_files
                .lock()
                .expect("memory files lock")
                .get(ram)
                .cloned()
        };
        let memory = match cached() {
            Some(memory) => memory,
            None => {
                // One load per file at a time; the others wait for it.
                let _loading = self.memory_loading.lock().await;
                match cached() {
                    Some(memory) => memory,
                    None => {
                        let path = ram.to_path_buf();
                        let name = path
                            .parent()
                            .and_then(Path::file_name)
                            .map(|name| name.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let started = Instant::now();
                        let memory = tokio::task::spawn_blocking(move || {
                            wrenn_vmm::memory::load(&path, &name)
                        })
                        .await
                        .map_err(|error| AgentError::internal("loading a memory file", error))?
                        .map_err(|error| AgentError::internal("loading a memory file", error))?;
                        tracing::info!(ram = %ram.display(), ms = started.elapsed().as_millis() as u64, "memory file loaded");
                        let memory = Arc::new(memory);
                        self.memory_files
                            .lock()
                            .expect("memory files lock")
                            .insert(ram.to_path_buf(), memory.clone());
                        memory
                    }
                }
            }
        };
        let length = wrenn_vmm::memory::len(&memory)
            .map_err(|error| AgentError::internal("reading a memory file", error))?;
        if length != u64::from(memory_mib) << 20 {
            return Err(AgentError::Internal(format!(
                "{} holds {length} bytes of memory, not the machine's {memory_mib} MiB",
                ram.display()
            )));
        }
        Ok(memory)
    }
}

/// A template's files with `disk`, the kernel and initramfs linked from `from` (a template's
/// files never change while it exists), as is the command line and the guest's versions.
fn linked_files(
    from: &TemplateRecord,
    dir: &Path,
    disk: PathBuf,
) -> Result<TemplateFiles, AgentError> {
    let link = |source: &Path, name: &str| -> Result<PathBuf, AgentError> {
        let target = dir.join(name);
        std::fs::hard_link(source, &target)
            .or_else(|_| std::fs::copy(source, &target).map(drop))
            .map_err(|error| {
                AgentError::internal(&format!("taking {name} from {}", from.template_id), error)
            })?;
        Ok(target)
    };
    let initrd = from.machine.initrd.as_ref();
    let mut digests = BTreeMap::new();
    for (source, name) in std::iter::once((&from.machine.kernel, "vmlinuz"))
        .chain(initrd.map(|initrd| (initrd, "initrd.img")))
    {
        let known = source
            .file_name()
            .and_then(|own| from.digests.get(own.to_str()?));
        if let Some(sha256) = known {
            digests.insert(name.to_string(), sha256.clone());
        }
    }
    Ok(TemplateFiles {
        kernel: link(&from.machine.kernel, "vmlinuz")?,
        initrd: initrd
            .map(|initrd| link(initrd, "initrd.img"))
            .transpose()?,
        disk,
        cmdline: from.machine.cmdline.clone(),
        image_key: from.image_key.clone(),
        envd_version: from.envd_version.clone(),
        digests,
    })
}

/// Takes a chain's bottom `layers` (top first) into `dir`: those in `from_dir` are linked (a
/// template's files never change while it exists) when nothing of `from_dir` is below them, and
/// copied and pointed at the copy below otherwise; those elsewhere (a parent's) stay. Returns
/// the top as the new template finds it, with its format, and the names of the layers linked.
async fn take_layers(
    layers: &[wrenn_vmm::qcow2::Layer],
    from_dir: &Path,
    dir: &Path,
) -> Result<(PathBuf, &'static str, Vec<String>), AgentError> {
    let mut linked = Vec::new();
    let mut below: Option<PathBuf> = None;
    let mut below_taken = false;
    for (index, layer) in layers.iter().enumerate().rev() {
        if layer.path.parent() != Some(from_dir) {
            below = Some(layer.path.clone());
            below_taken = false;
            continue;
        }
        let name = layer.path.file_name().ok_or_else(|| {
            AgentError::Internal(format!("{} names no file", layer.path.display()))
        })?;
        let target = dir.join(name);
        if below_taken {
            crate::disk::copy_file(&layer.path, &target).await?;
            let lower = &layers[index + 1];
            let lower_copy = below.as_deref().expect("a layer below");
            crate::disk::rebase(&target, lower_copy, lower.format).await?;
        } else {
            std::fs::hard_link(&layer.path, &target)
                .or_else(|_| std::fs::copy(&layer.path, &target).map(drop))
                .map_err(|error| AgentError::internal("linking a cached layer", error))?;
            linked.extend(name.to_str().map(str::to_string));
        }
        below = Some(target);
        below_taken = true;
    }
    let top = below.ok_or_else(|| AgentError::Internal("no layers to take".into()))?;
    Ok((top, layers[0].format, linked))
}

/// A template's files in its directory.
struct TemplateFiles {
    kernel: PathBuf,
    /// None where the VMM boots without one (Firecracker).
    initrd: Option<PathBuf>,
    disk: PathBuf,
    cmdline: String,
    image_key: String,
    envd_version: String,
    /// The hashes the template's source had of the files it linked (the same bytes), by
    /// name: a put need not hash them again.
    digests: BTreeMap<String, String>,
}

/// The file of an image holding the Firecracker kernel (`wrenn image firecracker-kernel`).
pub const FIRECRACKER_KERNEL: &str = "vmlinux";

/// The kernel command line of a Firecracker guest, from the image's (made for QEMU's
/// initramfs): the kernel itself starts wrenn-init on the root disk, a reboot ends Firecracker
/// (`reboot=k`), and there is no PCI bus to probe (its devices are virtio over MMIO).
pub fn firecracker_cmdline(image_cmdline: &str) -> String {
    let mut words: Vec<String> = image_cmdline
        .split_whitespace()
        .filter(|word| {
            !word.starts_with("init=")
                && !word.starts_with("reboot=")
                && !word.starts_with("pci=")
                && !word.starts_with("panic=")
        })
        .map(str::to_owned)
        .collect();
    words.extend(
        ["panic=1", "reboot=k", "pci=off", "init=/sbin/wrenn-init"]
            .into_iter()
            .map(str::to_owned),
    );
    words.join(" ")
}

#[cfg(test)]
mod firecracker_tests {
    use super::*;

    #[test]
    fn a_firecracker_guest_boots_straight_into_wrenn_init() {
        let qemu = "console=ttyS0 root=/dev/vda rw panic=-1 quiet ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off";
        let firecracker = firecracker_cmdline(qemu);
        assert_eq!(
            firecracker,
            "console=ttyS0 root=/dev/vda rw quiet ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off panic=1 reboot=k pci=off init=/sbin/wrenn-init"
        );
        // Made again from its own output, it does not change.
        assert_eq!(firecracker_cmdline(&firecracker), firecracker);
    }
}
