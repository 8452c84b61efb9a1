//! The monitor: notices a VMM that dies within a quarter of a second and frees its slot; keeps
//! network slots ready ahead of creates; runs the manager's periodic checks.

use super::*;

impl Manager {
    /// Runs `check` every `interval` while the manager lives (the task holds it only while a
    /// check runs).
    pub(super) fn repeat_while_alive<Check, Checking>(
        self: &Arc<Self>,
        interval: Duration,
        check: Check,
    ) where
        Check: Fn(Arc<Manager>) -> Checking + Send + 'static,
        Checking: std::future::Future<Output = ()> + Send,
    {
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(manager) = manager.upgrade() else {
                    return;
                };
                check(manager).await;
            }
        });
    }

    /// Tops the ready slots back up in the background after a lease.
    pub(super) fn keep_slots_ready(&self) {
        let pool = self.slots.clone();
        let count = self.config.slots_ahead;
        tokio::spawn(async move { pool.warm(count).await });
    }

    /// Samples every running sandbox (envd's `/metrics`, the host's traffic counters) and
    /// reads what its console wrote, into [`Manager::telemetry`].
    pub(super) async fn sample_sandboxes(&self) {
        // Not one being destroyed: its console's last read is the destroy's.
        let running: Vec<SandboxRecord> = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .values()
            .filter(|entry| !entry.destroying.load(std::sync::atomic::Ordering::SeqCst))
            .map(|entry| entry.snapshot())
            .filter(|record| record.state == SandboxState::Running)
            .collect();
        // A guest that does not answer within a part of the interval goes without a sample.
        let deadline = (self.config.sample_interval / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(2));
        let samples = running.iter().filter_map(|record| {
            let (vm, slot) = (record.vm.as_ref()?, record.slot?);
            self.telemetry
                .follow_console(&record.sandbox_id, &vm.console_log());
            self.telemetry.read_console(&record.sandbox_id);
            let token = record.access_token.clone();
            let pid = vm.pid;
            let tap = record.machine.tap.clone();
            Some(async move {
                let metrics =
                    envd_client::metrics(envd_address(slot), token.as_deref(), deadline).await?;
                let traffic = crate::telemetry::guest_traffic(pid, &tap);
                Some(crate::telemetry::sample_of(
                    &record.sandbox_id,
                    now_ms(),
                    &metrics,
                    record.machine.vcpus,
                    traffic,
                ))
            })
        });
        for sample in futures_util::future::join_all(samples)
            .await
            .into_iter()
            .flatten()
        {
            self.telemetry.record_sample(sample);
        }
    }

    /// Marks sandboxes whose VMM died as failed and frees their slots.
    pub(super) async fn check_vmms(&self) {
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
}
