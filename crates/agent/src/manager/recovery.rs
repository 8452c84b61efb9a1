//! Recovery after an agent restart (adopt live VMs, mark dead ones failed, remove what no record
//! accounts for, kill VMMs nothing owns) and the clean stop.

use super::*;

impl Manager {
    /// Reads the records a previous run left: adopts live VMs, marks dead ones failed, removes
    /// stray directories, namespaces and VMM processes that no record accounts for.
    pub(super) async fn recover(&self) {
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
                // Why a VM is not taken back: it is gone (None), or it runs and will not answer.
                let adopted = if vm.is_alive() {
                    self.vmm.adopt(&vm).await.map_err(Some)
                } else {
                    Err(None)
                };
                let alive = adopted.is_ok();
                if alive {
                    self.telemetry
                        .follow_console_from_end(&record.sandbox_id, &vm.console_log());
                }
                match (alive, record.state, record.slot) {
                    (true, SandboxState::Running, Some(slot)) => {
                        if let Err(error) = self.slots.claim(slot, &self.egress_of(&record)).await {
                            tracing::error!(%error, sandbox = %record.sandbox_id, "could not load the current firewall into an adopted sandbox's slot");
                        }
                        self.mmds.set(slot, Self::metadata(&record));
                        adopted_pids.insert(vm.pid);
                        // The previous agent may have stopped mid-checkpoint, the VM stopped
                        // and envd's processes frozen: both go on (a no-op otherwise).
                        if let Err(error) = self.vmm.resume(&vm).await {
                            tracing::warn!(%error, sandbox = %record.sandbox_id, "an adopted VM did not take cont");
                        }
                        let _ = envd_client::continue_after_snapshot(
                            envd_address(slot),
                            record.access_token.as_deref(),
                            Duration::from_secs(5),
                        )
                        .await;
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
                                self.init_body(&record),
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
                        } else if let Err(Some(error)) = &adopted {
                            // Killed below with the other VMMs no sandbox owns.
                            format!("the agent restarted and could not take the VMM back: {error}")
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
                            match self.vmm.written_snapshot(&written) {
                                Ok(snapshot) => record.snapshot = Some(snapshot),
                                Err(error) => {
                                    tracing::warn!(sandbox = %record.sandbox_id, %error, "a pause's snapshot is unusable")
                                }
                            }
                        }
                        record.state =
                            after_restart(state, record.snapshot.is_some() || record.disk_only);
                        if record.state == SandboxState::Paused {
                            record.error = None;
                        }
                        tracing::warn!(sandbox = %record.sandbox_id, state = record.state.as_str(), "sandbox not adopted");
                    }
                }
            } else if matches!(
                record.state,
                SandboxState::Starting
                    | SandboxState::Running
                    | SandboxState::Pausing
                    | SandboxState::Resuming
            ) {
                // The previous agent stopped before the VM was recorded (a VMM it had started
                // is an orphan, killed below).
                record.state =
                    after_restart(record.state, record.snapshot.is_some() || record.disk_only);
                if record.state == SandboxState::Failed {
                    record.error =
                        Some("the agent stopped before the sandbox's VM was recorded".into());
                }
                tracing::warn!(sandbox = %record.sandbox_id, state = record.state.as_str(), "an operation the previous agent left unfinished is undone");
            }
            let _ = self.store.save_sandbox(&record);
            self.sandboxes.lock().expect("sandboxes lock").insert(
                record.sandbox_id.clone(),
                Arc::new(SandboxEntry::new(record)),
            );
        }
        // Forks' checkpoints whose sandboxes went while the agent was down.
        self.collect_ephemeral();
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

/// What a sandbox whose VM is not taken back is after a restart that cut off an operation in
/// `state`: paused if it was pausing or resuming and its snapshot is whole (or it was paused
/// without memory, its disk all it needs), else failed.
fn after_restart(state: SandboxState, has_snapshot: bool) -> SandboxState {
    if matches!(state, SandboxState::Resuming | SandboxState::Pausing) && has_snapshot {
        SandboxState::Paused
    } else {
        SandboxState::Failed
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
