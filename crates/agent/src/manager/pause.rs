//! Pause (prepare, freeze, snapshot to the sandbox's own files, stop the VM) and resume (restore
//! those, `/init`); a pause without memory (prepare with the guest's disks synced, stop the VM:
//! the disk is all that is kept) and its resume (a boot from the disk, `/init`).

use super::*;

impl Manager {
    /// Snapshots a running sandbox to its own files and stops its VM; with `disk_only`, syncs
    /// the guest's disks and stops the VM keeping no memory.
    pub async fn pause(
        &self,
        sandbox_id: &str,
        disk_only: bool,
    ) -> Result<SandboxRecord, AgentError> {
        let started = Instant::now();
        let paused = self.pause_sandbox(sandbox_id, disk_only).await?;
        crate::metrics::observe_operation("pause", started.elapsed());
        Ok(paused)
    }

    async fn pause_sandbox(
        &self,
        sandbox_id: &str,
        disk_only: bool,
    ) -> Result<SandboxRecord, AgentError> {
        let entry = self.entry(sandbox_id)?;
        let _operation = entry.operation.lock().await;
        let record = entry.snapshot();
        require_state(&record, SandboxState::Running, "paused")?;
        let (Some(vm), Some(slot)) = (record.vm.clone(), record.slot) else {
            return Err(AgentError::Internal(format!(
                "sandbox {sandbox_id} runs without a VM"
            )));
        };
        self.save(&entry, |record| record.state = SandboxState::Pausing);
        let dir = self.store.sandbox_dir(sandbox_id);
        let address = envd_address(slot);
        let snapshot = async {
            let token = record.access_token.as_deref();
            if disk_only {
                // Stopping drains and flushes the VM's disk: what the guest synced is on it.
                envd_client::prepare_disk_only(address, token, Duration::from_secs(120)).await?;
                self.vmm.pause(&vm).await?;
                return Ok(None);
            }
            envd_client::prepare_snapshot(address, token, Duration::from_secs(30)).await?;
            self.vmm.pause(&vm).await?;
            Ok::<_, AgentError>(Some(
                self.vmm.snapshot(&vm, &dir.join("memory.snap")).await?,
            ))
        }
        .await;
        match snapshot {
            Ok(snapshot) => {
                let _ = self.vmm.destroy(&vm).await;
                self.telemetry.finish_console(sandbox_id, &vm.console_log());
                entry.end_connections();
                self.mmds.remove(slot);
                self.slots.release(slot).await;
                Ok(self.save(&entry, |record| {
                    record.state = SandboxState::Paused;
                    record.vm = None;
                    record.slot = None;
                    record.disk_only = snapshot.is_none();
                    record.snapshot = snapshot;
                }))
            }
            Err(error) => {
                // Back to running: the VM continues and /init thaws what prepare froze.
                let _ = self.vmm.resume(&vm).await;
                let _ =
                    envd_client::init(address, self.init_body(&record), DEFAULT_INIT_TIMEOUT).await;
                let _ = std::fs::remove_file(dir.join("memory.snap"));
                self.save(&entry, |record| record.state = SandboxState::Running);
                Err(error)
            }
        }
    }

    /// Restores a paused sandbox from its own files (or boots it from its disk: see
    /// [`ResumeOptions::from_disk`]).
    pub async fn resume(
        &self,
        sandbox_id: &str,
        options: ResumeOptions,
    ) -> Result<SandboxRecord, AgentError> {
        let started = Instant::now();
        let resumed = self.resume_sandbox(sandbox_id, options).await?;
        crate::metrics::observe_operation("resume", started.elapsed());
        Ok(resumed)
    }

    async fn resume_sandbox(
        &self,
        sandbox_id: &str,
        options: ResumeOptions,
    ) -> Result<SandboxRecord, AgentError> {
        let ResumeOptions {
            access_token,
            ready_timeout,
            init_timeout,
            from_disk,
        } = options;
        let entry = self.entry(sandbox_id)?;
        let _operation = entry.operation.lock().await;
        let record = entry.snapshot();
        require_state(&record, SandboxState::Paused, "resumed")?;
        // None: paused without memory, booted from its disk.
        let snapshot = match (&record.snapshot, record.disk_only) {
            (Some(_), _) if from_disk => None,
            (Some(snapshot), _) => Some(snapshot.clone()),
            (None, true) => None,
            (None, false) => {
                return Err(AgentError::Internal(format!(
                    "paused sandbox {sandbox_id} has no snapshot"
                )));
            }
        };
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
        match self
            .start_vm(&entry, snapshot.as_ref(), &options, false)
            .await
        {
            Ok(_) => {
                if let Some(snapshot) = &record.snapshot {
                    let _ = std::fs::remove_file(&snapshot.memory);
                }
                Ok(self.save(&entry, |record| {
                    record.snapshot = None;
                    record.disk_only = false;
                }))
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
}

/// How a paused sandbox is resumed.
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// A new access token for envd (`None` keeps the current one).
    pub access_token: Option<String>,
    pub ready_timeout: Option<Duration>,
    pub init_timeout: Option<Duration>,
    /// Boot from the disk, leaving the pause's memory aside (it is then removed, as every
    /// resume removes it): the guest finds its files as a crash would leave them.
    pub from_disk: bool,
}

/// Refuses a change a sandbox in its state cannot take: only a `wanted` one can be `changed`.
fn require_state(
    record: &SandboxRecord,
    wanted: SandboxState,
    changed: &str,
) -> Result<(), AgentError> {
    if record.state == wanted {
        return Ok(());
    }
    Err(AgentError::FailedPrecondition(format!(
        "sandbox {} is {}: only a {} sandbox can be {changed}",
        record.sandbox_id,
        record.state.as_str(),
        wanted.as_str()
    )))
}
