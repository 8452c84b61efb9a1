//! Sandboxes: created by restoring a template snapshot with a fresh copy-on-write disk and network
//! slot and then calling envd's `/init`; looked up, routed to, measured and destroyed.

use super::*;
use crate::egress::transform::SandboxCa;

impl Manager {
    /// Restores a template into a new sandbox and hands it its settings through `/init`.
    pub async fn create(
        &self,
        options: CreateOptions,
    ) -> Result<(SandboxRecord, CreateTimings), AgentError> {
        let created = self.create_sandbox(options).await;
        if let Ok((_, timings)) = &created {
            crate::metrics::observe_create(timings);
        }
        created
    }

    async fn create_sandbox(
        &self,
        options: CreateOptions,
    ) -> Result<(SandboxRecord, CreateTimings), AgentError> {
        validate_id("template", &options.template_id)?;
        let _creating = self.creating_from(&options.template_id);
        let (template, pulled_in) = self.template_or_pull(&options.template_id).await?;
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
        let policy = options
            .egress
            .parse()
            .map_err(|error| AgentError::InvalidArgument(error.to_string()))?;
        // Header transforms need the sandbox's own authority, trusted by its guest from /init.
        let egress_ca = if policy.transforms.is_empty() {
            None
        } else {
            Some(SandboxCa::generate(&sandbox_id)?)
        };
        let dir = self.store.sandbox_dir(&sandbox_id);
        let record = SandboxRecord {
            sandbox_id: sandbox_id.clone(),
            template_id: template.template_id.clone(),
            state: SandboxState::Starting,
            slot: None,
            vm: None,
            machine: MachineSpec {
                disk: dir.join(self.disk_name()),
                ..template.machine.clone()
            },
            created_at_ms: now_ms(),
            // A checkpoint's sandboxes start with its sandbox's variables; the create's win.
            env_vars: template
                .env_vars
                .iter()
                .chain(&options.env_vars)
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            access_token: options.access_token.clone(),
            allow_internet: options.allow_internet,
            egress: options.egress.clone(),
            egress_ca,
            metadata: options.metadata.clone(),
            error: None,
            snapshot: None,
            disk_only: false,
            layered_on: Vec::new(),
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
            .start_vm(&entry, Some(&template.snapshot), &options, true)
            .await;
        // The template's warm VMMs are made again in the background.
        self.refill_warm(&template.template_id);
        match result {
            Ok(timings) => Ok((
                entry.snapshot(),
                CreateTimings {
                    pull: pulled_in,
                    ..timings
                },
            )),
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

    /// Restores `snapshot` into the entry's machine with a new slot (or, for `None`, boots the
    /// machine from its disk), waits for envd, `/init`s. On failure everything it took is given
    /// back (the VM, the slot) and the error returned.
    pub(super) async fn start_vm(
        &self,
        entry: &SandboxEntry,
        snapshot: Option<&SnapshotFiles>,
        options: &CreateOptions,
        fresh_disk: bool,
    ) -> Result<CreateTimings, AgentError> {
        let prepared = Instant::now();
        let record = entry.snapshot();
        let dir = self.store.sandbox_dir(&record.sandbox_id);
        let egress = self.egress_of(&record);
        // A create's slot is reported apart from the settled ones from before it is leased
        // until the VM is up or the slot given back: the control plane counts the create in
        // flight meanwhile, and must not count its slot a second time as a settled one.
        let _started = fresh_disk.then(|| {
            self.slots_starting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            SlotStarting(&self.slots_starting)
        });
        // A create from a template takes a warm VMM when one waits for its snapshot.
        let warm = match snapshot {
            Some(snapshot) if fresh_disk => self.take_warm(&record.template_id, snapshot).await,
            _ => None,
        };
        let mut warm_vm = None;
        let slot = if let Some(warm) = warm {
            let (slot, vm) = self.adopt_warm(warm, &dir, &egress).await?;
            if let Err(error) = self.store.save_sandbox(&record) {
                let _ = self.vmm.destroy(&vm).await;
                self.slots.release(slot.index).await;
                return Err(error);
            }
            warm_vm = Some(vm);
            slot
        } else if fresh_disk {
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
                crate::disk::create_sandbox_disk(
                    self.vmm.needs_raw_disk(),
                    &template_disk,
                    &record.machine.disk
                ),
                self.slots.lease(&egress)
            );
            if let Err(error) = disk {
                if let Ok(slot) = slot {
                    self.slots.release(slot.index).await;
                }
                return Err(error);
            }
            match slot {
                // Warm VMMs hold slots a create may have: one gives its slot back.
                Err(AgentError::ResourceExhausted(_)) if self.release_a_warm_slot().await => {
                    self.slots.lease(&egress).await?
                }
                slot => slot?,
            }
        } else {
            match self.slots.lease(&egress).await {
                Err(AgentError::ResourceExhausted(_)) if self.release_a_warm_slot().await => {
                    self.slots.lease(&egress).await?
                }
                slot => slot?,
            }
        };
        self.mmds.set(slot.index, Self::metadata(&record));
        // Its turn to start (see `Manager::starting`); the wait counts in `prepare`.
        let _turn = self
            .starting
            .acquire()
            .await
            .expect("the start semaphore is never closed");
        let mut timings = CreateTimings {
            prepare: prepared.elapsed(),
            warm: warm_vm.is_some(),
            ..CreateTimings::default()
        };
        let started = Instant::now();
        let outcome = async {
            let vm = match (warm_vm, snapshot) {
                // The warm VMM waits for the snapshot: only its load is left.
                (Some(vm), Some(snapshot)) => {
                    if let Err(error) = self.vmm.finish_restore(&vm, snapshot).await {
                        let _ = self.vmm.destroy(&vm).await;
                        return Err(error.into());
                    }
                    vm
                }
                _ => {
                    let mapped = snapshot
                        .and_then(|snapshot| snapshot.ram.as_deref())
                        .filter(|_| self.vmm.maps_memory_files());
                    let memory = match mapped {
                        Some(ram) => GuestMemory::Private(
                            self.mapped_memory(ram, record.machine.memory_mib).await?,
                        ),
                        None => GuestMemory::Anonymous,
                    };
                    let machine = MachineSpec {
                        netns: Some(slot.netns.clone()),
                        vmm_user: self.vmm_user(slot.index),
                        memory,
                        ..record.machine.clone()
                    };
                    match snapshot {
                        Some(snapshot) => {
                            self.vmm
                                .restore(&machine, snapshot, &dir.join("vm"))
                                .await?
                        }
                        None => self.vmm.boot(&machine, &dir.join("vm")).await?,
                    }
                }
            };
            timings.restore = started.elapsed();
            self.save(entry, |record| {
                record.vm = Some(vm.clone());
                record.slot = Some(slot.index);
            });
            let ready = async {
                let address = envd_address(slot.index);
                let ready_timeout = match snapshot {
                    Some(_) => options.ready_timeout.unwrap_or(DEFAULT_READY_TIMEOUT),
                    // A boot takes as long as a template's first one.
                    None => options
                        .ready_timeout
                        .unwrap_or(DEFAULT_BOOT_TIMEOUT)
                        .max(DEFAULT_BOOT_TIMEOUT),
                };
                let init_timeout = options.init_timeout.unwrap_or(DEFAULT_INIT_TIMEOUT);
                match snapshot {
                    // The guest's envd listened when it was snapshotted: its accepting a
                    // connection is its readiness, and `/init` goes out on that connection.
                    Some(_) => {
                        let connection =
                            envd_client::wait_accepting(address, ready_timeout, || vm.is_alive())
                                .await?;
                        timings.ready = started.elapsed() - timings.restore;
                        let init = Instant::now();
                        let body = self.init_body(&entry.snapshot());
                        envd_client::init_on(connection, address, body, init_timeout).await?;
                        timings.init = init.elapsed();
                    }
                    None => {
                        envd_client::wait_ready(address, ready_timeout, || vm.is_alive()).await?;
                        timings.ready = started.elapsed() - timings.restore;
                        let init = Instant::now();
                        let body = self.init_body(&entry.snapshot());
                        envd_client::init(address, body, init_timeout).await?;
                        timings.init = init.elapsed();
                    }
                };
                Ok(())
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

    /// Replaces a sandbox's egress rules. A running sandbox's slot gets them at once, in one
    /// atomic change of its firewall (a packet of a connection they now forbid is answered
    /// with a reset); a paused sandbox's are kept for its resume. Rules that do not parse are
    /// refused and the old ones stay.
    pub async fn update_network(
        &self,
        sandbox_id: &str,
        allow_internet: bool,
        egress: EgressSettings,
    ) -> Result<SandboxRecord, AgentError> {
        let policy = egress
            .parse()
            .map_err(|error| AgentError::InvalidArgument(error.to_string()))?;
        let entry = self.entry(sandbox_id)?;
        let _operation = entry.operation.lock().await;
        let mut changed = entry.snapshot();
        changed.allow_internet = allow_internet;
        changed.egress = egress.clone();
        let new_ca = changed.egress_ca.is_none() && !policy.transforms.is_empty();
        if new_ca {
            changed.egress_ca = Some(SandboxCa::generate(sandbox_id)?);
        }
        if changed.state == SandboxState::Running
            && let Some(slot) = changed.slot
        {
            if new_ca {
                // The guest trusts the new authority before any connection is intercepted.
                envd_client::init(
                    envd_address(slot),
                    self.init_body(&changed),
                    DEFAULT_INIT_TIMEOUT,
                )
                .await?;
            }
            self.slots
                .set_egress(slot, &self.egress_of(&changed))
                .await?;
        }
        tracing::info!(sandbox = sandbox_id, "egress rules replaced");
        let egress_ca = changed.egress_ca;
        Ok(self.save(&entry, |record| {
            record.allow_internet = allow_internet;
            record.egress = egress;
            record.egress_ca = egress_ca;
        }))
    }

    /// Stops a sandbox's VM and frees everything it had.
    pub async fn destroy(&self, sandbox_id: &str) -> Result<(), AgentError> {
        let started = Instant::now();
        self.destroy_sandbox(sandbox_id).await?;
        crate::metrics::observe_operation("destroy", started.elapsed());
        Ok(())
    }

    async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), AgentError> {
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
        if let Some(vm) = &record.vm {
            self.telemetry.finish_console(sandbox_id, &vm.console_log());
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
        // After it left the sandboxes: no sampler's tick follows its console again.
        self.telemetry.forget_console(sandbox_id);
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
        if !record.layered_on.is_empty()
            || self
                .templates
                .lock()
                .expect("templates lock")
                .get(&record.template_id)
                .is_some_and(|template| template.ephemeral)
        {
            self.collect_ephemeral();
        }
        Ok(())
    }
}

/// A slot leased by a VM being started (see [`Manager::slots_starting`]): uncounted when
/// dropped.
struct SlotStarting<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for SlotStarting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
