//! Checkpoints: a running sandbox's memory and disk saved in place as a template of this host
//! (a persistent snapshot, or the checkpoint its forks start from) while the sandbox goes on.
//!
//! The sandbox is prepared (envd freezes its processes), its VM stopped, its disk's top frozen
//! as the new template's disk (renamed into the template's directory: QEMU holds it open) with a
//! new top over it for the sandbox, its memory written, and the VM continued
//! (`/snapshot/continue`: envd thaws its processes and keeps its connections). Nothing is
//! copied: the sandbox's disk then stands on the checkpoint's layer, as every sandbox made from
//! the checkpoint does, so the checkpoint stays on the host while the sandbox exists
//! ([`SandboxRecord::layered_on`]) even once it is deleted for the API. Each checkpoint adds
//! a layer to the sandbox's chain, up to [`wrenn_vmm::qcow2::MAX_LAYERS`].
//!
//! A fork's checkpoint is [`TemplateRecord::ephemeral`]: it goes from the host as soon as no
//! sandbox or template stands on it ([`Manager::collect_ephemeral`]).

use std::collections::BTreeMap;

use super::*;

/// How long envd may take to prepare for, or continue after, a checkpoint.
const ENVD_CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a checkpoint makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// The new template's id.
    pub template_id: String,
    /// A fork's checkpoint: removed from the host once nothing stands on it, never put in the
    /// template store.
    pub ephemeral: bool,
}

impl Manager {
    /// Saves the running sandbox's memory and disk as the template `options.template_id`
    /// while the sandbox goes on (it is stopped only while its memory is written). A template
    /// that is not ephemeral is put in the template store (when the host has one) before this
    /// returns.
    pub async fn checkpoint(
        &self,
        sandbox_id: &str,
        options: CheckpointOptions,
    ) -> Result<(TemplateRecord, Duration), AgentError> {
        let template_id = options.template_id.as_str();
        validate_id("template", template_id)?;
        let entry = self.entry(sandbox_id)?;
        let (record, paused) = {
            let _operation = entry.operation.lock().await;
            self.checkpoint_locked(&entry, &options).await?
        };
        if options.ephemeral {
            return Ok((record, paused));
        }
        let stop = CancellationToken::new();
        if let Err(error) = self.push_template(template_id, &stop).await {
            // The sandbox stands on the checkpoint's layer: it stays, hidden, until the
            // sandbox goes.
            self.update_template(template_id, |record| record.ephemeral = true);
            self.collect_ephemeral();
            return Err(AgentError::Internal(format!(
                "the snapshot was taken but could not be put in the template store: {error}"
            )));
        }
        Ok((self.template(template_id)?, paused))
    }

    async fn checkpoint_locked(
        &self,
        entry: &SandboxEntry,
        options: &CheckpointOptions,
    ) -> Result<(TemplateRecord, Duration), AgentError> {
        let template_id = options.template_id.as_str();
        let record = entry.snapshot();
        if record.state != SandboxState::Running {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {} is {}: only a running sandbox can be snapshotted or forked",
                record.sandbox_id,
                record.state.as_str()
            )));
        }
        let (Some(vm), Some(slot)) = (record.vm.clone(), record.slot) else {
            return Err(AgentError::Internal(format!(
                "sandbox {} runs without a VM",
                record.sandbox_id
            )));
        };
        if !self.vmm.can_layer_disk() {
            return Err(AgentError::FailedPrecondition(format!(
                "{} cannot checkpoint a running VM's disk",
                self.vmm.name()
            )));
        }
        let top = record.machine.disk.clone();
        let depth = wrenn_vmm::qcow2::chain(&top)
            .map_err(|error| AgentError::internal("reading the sandbox's disk", error))?
            .len();
        if depth + 1 > wrenn_vmm::qcow2::MAX_LAYERS {
            return Err(AgentError::FailedPrecondition(format!(
                "sandbox {}'s disk has {depth} layers (one more for each snapshot or fork taken \
                 of it and of the sandboxes it comes from), the most a disk may have is {}: \
                 snapshot it no more, or start a new sandbox from its latest snapshot",
                record.sandbox_id,
                wrenn_vmm::qcow2::MAX_LAYERS
            )));
        }
        let template = self.template(&record.template_id)?;
        // The template whose disk the sandbox's top is over, which the new one is over too.
        let parent = record
            .layered_on
            .last()
            .cloned()
            .unwrap_or_else(|| record.template_id.clone());
        self.reserve_template(template_id, Some(parent.clone()))?;
        let dir = self.store.template_dir(template_id);
        let started = Instant::now();
        // Saved as soon as the sandbox stands on the layer (an agent that stops then finds
        // it at start, ephemeral, and keeps it while the sandbox does); made whole at the end.
        let provisional = TemplateRecord {
            template_id: template_id.to_string(),
            machine: MachineSpec {
                kernel: dir.join("vmlinuz"),
                initrd: template
                    .machine
                    .initrd
                    .as_ref()
                    .map(|_| dir.join("initrd.img")),
                disk: dir.join("disk.qcow2"),
                netns: None,
                vmm_user: None,
                ..record.machine.clone()
            },
            accel: self.accel,
            snapshot: SnapshotFiles {
                memory: dir.join("memory.snap"),
                bytes: 0,
                ram: None,
                memory_object: false,
            },
            created_at_ms: now_ms(),
            image_key: template.image_key.clone(),
            envd_version: template.envd_version.clone(),
            build_ms: 0,
            parent: Some(parent),
            default_user: template.default_user.clone(),
            default_workdir: template.default_workdir.clone(),
            start_cmd: None,
            build_key: None,
            digests: template
                .digests
                .iter()
                .filter(|(name, _)| ["vmlinuz", "initrd.img"].contains(&name.as_str()))
                .map(|(name, sha256)| (name.clone(), sha256.clone()))
                .collect(),
            pulled_digests: BTreeMap::new(),
            stored: false,
            steps: Vec::new(),
            env_vars: record.env_vars.clone(),
            ephemeral: true,
            source_sandbox: Some(record.sandbox_id.clone()),
        };
        let made = self
            .checkpoint_files(entry, &record, &template, (&vm, slot), &provisional)
            .await;
        let mut paused = Duration::ZERO;
        let outcome = match made {
            Ok((snapshot, stopped)) => {
                paused = stopped;
                let new = TemplateRecord {
                    snapshot: snapshot.clone().unwrap_or(provisional.snapshot.clone()),
                    build_ms: started.elapsed().as_millis() as u64,
                    // Without its memory it is only the layer the sandbox stands on.
                    ephemeral: options.ephemeral || snapshot.is_none(),
                    ..provisional
                };
                match self.store.save_template(&new) {
                    Ok(()) => {
                        self.templates
                            .lock()
                            .expect("templates lock")
                            .insert(template_id.to_string(), new.clone());
                        if snapshot.is_some() {
                            Ok(new)
                        } else {
                            Err(AgentError::Internal(format!(
                                "sandbox {}'s memory could not be written (see the agent's \
                                 log); it goes on",
                                record.sandbox_id
                            )))
                        }
                    }
                    Err(error) => Err(error),
                }
            }
            Err(error) => Err(error),
        };
        self.building
            .lock()
            .expect("building lock")
            .remove(template_id);
        if outcome.is_err()
            && !self
                .templates
                .lock()
                .expect("templates lock")
                .contains_key(template_id)
            && !entry
                .snapshot()
                .layered_on
                .iter()
                .any(|id| id == template_id)
        {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if let Ok(new) = &outcome {
            tracing::info!(
                sandbox = %record.sandbox_id,
                template = template_id,
                ms = new.build_ms,
                ephemeral = new.ephemeral,
                "checkpoint taken"
            );
        }
        outcome.map(|record| (record, paused))
    }

    /// The checkpoint's files in its directory: the kernel and initramfs linked from the
    /// sandbox's template, the frozen disk, the memory (`None` when only the disk could be
    /// frozen: the sandbox then stands on it all the same), and `provisional` as its record
    /// once the sandbox stands on its disk.
    async fn checkpoint_files(
        &self,
        entry: &SandboxEntry,
        record: &SandboxRecord,
        template: &TemplateRecord,
        (vm, slot): (&wrenn_vmm::VmProcess, u32),
        provisional: &TemplateRecord,
    ) -> Result<(Option<SnapshotFiles>, Duration), AgentError> {
        let template_id = provisional.template_id.as_str();
        let dir = self.store.template_dir(template_id);
        crate::store::private_dir(&dir)?;
        let link = |source: &Path, name: &str| -> Result<(), AgentError> {
            let target = dir.join(name);
            std::fs::hard_link(source, &target)
                .or_else(|_| std::fs::copy(source, &target).map(drop))
                .map_err(|error| AgentError::internal(&format!("taking {name}"), error))
        };
        link(&template.machine.kernel, "vmlinuz")?;
        if let Some(initrd) = &template.machine.initrd {
            link(initrd, "initrd.img")?;
        }
        let top = record.machine.disk.clone();
        let frozen = dir.join("disk.qcow2");
        let next = top.with_file_name("disk.next.qcow2");
        let _ = std::fs::remove_file(&next);
        let size = wrenn_vmm::qcow2::virtual_size(&top)
            .map_err(|error| AgentError::internal("reading the disk's size", error))?;
        // Made before the VM stops: the pause is only the freeze and the memory.
        crate::disk::create_overlay_unopened(&frozen, "qcow2", &next, size).await?;
        let address = envd_address(slot);
        let token = record.access_token.as_deref();
        if let Err(error) =
            envd_client::prepare_snapshot(address, token, ENVD_CHECKPOINT_TIMEOUT).await
        {
            let _ = std::fs::remove_file(&next);
            let _ =
                envd_client::continue_after_snapshot(address, token, ENVD_CHECKPOINT_TIMEOUT).await;
            return Err(error);
        }
        let goes_on = || async {
            let resumed = self.vmm.resume(vm).await;
            let continued =
                envd_client::continue_after_snapshot(address, token, ENVD_CHECKPOINT_TIMEOUT).await;
            if let Err(error) = continued {
                // An envd that cannot continue (one older than the route) is thawed by an
                // `/init`, which closes the connections it had before the checkpoint.
                tracing::warn!(sandbox = %record.sandbox_id, %error, "envd did not continue after the checkpoint: /init instead");
                if let Err(error) =
                    envd_client::init(address, self.init_body(record), DEFAULT_INIT_TIMEOUT).await
                {
                    tracing::error!(sandbox = %record.sandbox_id, %error, "envd did not take /init after the checkpoint");
                }
            }
            resumed
        };
        let stopped = Instant::now();
        if let Err(error) = self.vmm.pause(vm).await {
            let _ = std::fs::remove_file(&next);
            let _ = goes_on().await;
            return Err(error.into());
        }
        let layered = async {
            std::fs::rename(&top, &frozen)
                .map_err(|error| AgentError::internal("freezing the disk's top", error))?;
            if let Err(error) = std::fs::rename(&next, &top) {
                let _ = std::fs::rename(&frozen, &top);
                return Err(AgentError::internal("placing the disk's new top", error));
            }
            if let Err(error) = self.vmm.layer_disk(vm, &top).await {
                // The VMM's graph is as it was (a failed blockdev-snapshot adds nothing).
                let _ = std::fs::remove_file(&top);
                let _ = std::fs::rename(&frozen, &top);
                return Err(AgentError::Internal(format!(
                    "the sandbox's disk could not be frozen: {error}"
                )));
            }
            Ok(())
        }
        .await;
        if let Err(error) = layered {
            let _ = std::fs::remove_file(&next);
            let _ = goes_on().await;
            return Err(error);
        }
        // From here the sandbox's disk stands on the frozen layer.
        if let Err(error) = self.store.save_template(provisional) {
            tracing::error!(sandbox = %record.sandbox_id, %error, "the checkpoint's first record could not be written");
        }
        self.save(entry, |record| {
            record.layered_on.push(template_id.to_string())
        });
        let memory = self.vmm.snapshot(vm, &dir.join("memory.snap")).await;
        if let Err(error) = goes_on().await {
            tracing::error!(sandbox = %record.sandbox_id, %error, "the VM did not go on after its checkpoint");
        }
        let stopped = stopped.elapsed();
        // The frozen layer is the checkpoint's disk, which its sandboxes open while this VM
        // runs on: it must hold it read-only.
        if let Err(error) = self.vmm.seal_layers(vm).await {
            tracing::error!(sandbox = %record.sandbox_id, %error, "the frozen layer stays open for writing: sandboxes from the checkpoint cannot start while this one runs");
        }
        match memory {
            Ok(snapshot) => Ok((Some(snapshot), stopped)),
            Err(error) => {
                tracing::error!(sandbox = %record.sandbox_id, %error, "the checkpoint's memory could not be written");
                let _ = std::fs::remove_file(dir.join("memory.snap"));
                Ok((None, stopped))
            }
        }
    }

    /// Removes the ephemeral templates (forks' checkpoints) nothing stands on any more: no
    /// sandbox, no template, no create or build in flight.
    pub fn collect_ephemeral(&self) {
        loop {
            let ephemeral: Vec<String> = self
                .templates
                .lock()
                .expect("templates lock")
                .values()
                .filter(|template| template.ephemeral)
                .map(|template| template.template_id.clone())
                .collect();
            let mut removed = false;
            for template_id in ephemeral {
                if self.remove_template(&template_id).is_ok() {
                    tracing::info!(template = %template_id, "checkpoint removed: nothing stands on it");
                    removed = true;
                }
            }
            // A removed checkpoint may have been the last child of another.
            if !removed {
                return;
            }
        }
    }
}
