//! Pause (prepare, freeze, snapshot to the sandbox's own files, stop the VM) and resume (restore
//! those, `/init`).

use super::*;

impl Manager {
    /// Snapshots a running sandbox to its own files and stops its VM.
    pub async fn pause(&self, sandbox_id: &str) -> Result<SandboxRecord, AgentError> {
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
                let _ =
                    envd_client::init(address, self.init_body(&record), DEFAULT_INIT_TIMEOUT).await;
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
        require_state(&record, SandboxState::Paused, "resumed")?;
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
