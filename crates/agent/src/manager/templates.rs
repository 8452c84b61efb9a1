//! Templates: an image booted once, envd healthy, prepared and snapshotted; listed and deleted.

use super::*;

/// A template build's inputs, checked and with the agent's defaults filled in.
pub(super) struct TemplateBuild {
    /// The image directory (`wrenn image build`) the template's files are copied from.
    pub(super) image_dir: PathBuf,
    pub(super) memory_mib: u32,
    pub(super) vcpus: u32,
    /// How long the first boot may take to reach envd.
    pub(super) boot_timeout: Duration,
}

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
        let build = TemplateBuild {
            image_dir: image_dir.unwrap_or(&self.config.image_dir).to_path_buf(),
            memory_mib,
            vcpus,
            boot_timeout: boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT),
        };
        let result = self.build_template_inner(template_id, build).await;
        self.building
            .lock()
            .expect("building lock")
            .remove(template_id);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(self.store.template_dir(template_id));
        }
        result
    }

    pub(super) async fn build_template_inner(
        &self,
        template_id: &str,
        build: TemplateBuild,
    ) -> Result<TemplateRecord, AgentError> {
        let started = Instant::now();
        let TemplateBuild {
            image_dir,
            memory_mib,
            vcpus,
            boot_timeout,
        } = build;
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
}
