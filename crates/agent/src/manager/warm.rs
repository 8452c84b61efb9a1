//! The warm pool: for each template created from lately, a few VMMs started ahead of demand and
//! waiting for its snapshot (a slot leased with egress closed, a disk overlay made, the VMM at
//! the first half of a restore, [`wrenn_vmm::Vmm::start_restore`]), so that a create pays only
//! the snapshot's load. A create takes one and renames its directory to the sandbox's; the pool
//! is filled again off the hot path, after the create has answered.
//!
//! Its size is [`AgentConfig::warm_pool`] VMMs per template. It is emptied, wholly or in part,
//! when the host's available memory falls below [`AgentConfig::warm_pool_min_free_mib`], when
//! a template goes unused for [`WARM_POOL_IDLE`], when a template is removed, when a create
//! finds every slot taken (a warm VMM gives its slot back), and at shutdown. A warm VMM has no
//! record: a restarted agent finds the previous run's as VMMs and directories that no record
//! accounts for, and recovery kills and removes them.

use std::sync::atomic::{AtomicBool, Ordering};

use wrenn_vmm::VmProcess;

use super::*;
use crate::firewall::Egress;

/// How long a template's warm VMMs wait for a create before they are stopped.
pub const WARM_POOL_IDLE: Duration = Duration::from_secs(600);
/// How often the pool is checked against memory, idleness and dead VMMs.
pub(super) const WARM_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Warm VMMs' directories are sandbox directories named so; no sandbox id has a `-` there.
const WARM_DIR_PREFIX: &str = "warm-";

/// A VMM waiting for a template's snapshot.
#[derive(Debug)]
pub(super) struct WarmVm {
    /// The snapshot it was started for (a template rebuilt under the same id has another).
    snapshot: SnapshotFiles,
    /// Its directory (disk overlay, VMM files), renamed to the sandbox's by the create.
    dir: PathBuf,
    slot: Slot,
    vm: VmProcess,
}

/// The pool's state (see the module's documentation).
#[derive(Debug, Default)]
pub(super) struct WarmPool {
    ready: Mutex<HashMap<String, Vec<WarmVm>>>,
    /// Templates whose pool is being filled now.
    filling: Mutex<HashSet<String>>,
    /// When each template was last created from.
    used: Mutex<HashMap<String, Instant>>,
    /// Set at shutdown: nothing is added any more.
    closed: AtomicBool,
}

impl Manager {
    /// How many warm VMMs wait, of every template.
    pub fn warm_vmms(&self) -> usize {
        let ready = self.warm.ready.lock().expect("warm lock");
        ready.values().map(Vec::len).sum()
    }
}

impl Manager {
    /// A warm VMM for `template_id`'s snapshot `snapshot`, if one waits; one that died or was
    /// started for another snapshot is discarded on the way.
    pub(super) async fn take_warm(
        &self,
        template_id: &str,
        snapshot: &SnapshotFiles,
    ) -> Option<WarmVm> {
        if self.config.warm_pool == 0 {
            return None;
        }
        loop {
            let taken = self
                .warm
                .ready
                .lock()
                .expect("warm pool lock")
                .get_mut(template_id)
                .and_then(Vec::pop);
            let warm = taken?;
            if warm.snapshot == *snapshot && warm.vm.is_alive() {
                return Some(warm);
            }
            self.discard_warm(warm).await;
        }
    }

    /// Makes a warm VMM a sandbox's: its directory becomes `dir` (which must not exist), its
    /// slot gets the sandbox's egress. Returns the VMM, moved. On an error the warm VMM is
    /// discarded.
    pub(super) async fn adopt_warm(
        &self,
        warm: WarmVm,
        dir: &Path,
        egress: &Egress,
    ) -> Result<(Slot, VmProcess), AgentError> {
        let adopted = async {
            std::fs::rename(&warm.dir, dir).map_err(|error| {
                AgentError::internal("moving a warm VM to its sandbox's directory", error)
            })?;
            if *egress != Egress::Closed {
                self.slots.set_egress(warm.slot.index, egress).await?;
            }
            Ok::<_, AgentError>(())
        }
        .await;
        match adopted {
            Ok(()) => {
                let vm = warm.vm.moved_to(&dir.join("vm"));
                Ok((warm.slot, vm))
            }
            Err(error) => {
                // Wherever its directory is now, it goes with it.
                let moved = WarmVm {
                    dir: if dir.exists() {
                        dir.to_path_buf()
                    } else {
                        warm.dir.clone()
                    },
                    ..warm
                };
                self.discard_warm(moved).await;
                Err(error)
            }
        }
    }

    /// Stops a warm VMM and gives back what it had.
    async fn discard_warm(&self, warm: WarmVm) {
        if let Err(error) = self.vmm.destroy(&warm.vm).await {
            tracing::warn!(%error, pid = warm.vm.pid, "could not stop a warm VM");
        }
        self.slots.release(warm.slot.index).await;
        let _ = std::fs::remove_dir_all(&warm.dir);
    }

    /// Notes a create from `template_id` and fills its pool again, in the background.
    pub(super) fn refill_warm(&self, template_id: &str) {
        if self.config.warm_pool == 0 || self.warm.closed.load(Ordering::SeqCst) {
            return;
        }
        self.warm
            .used
            .lock()
            .expect("warm pool lock")
            .insert(template_id.to_string(), Instant::now());
        if !self
            .warm
            .filling
            .lock()
            .expect("warm pool lock")
            .insert(template_id.to_string())
        {
            return;
        }
        let Some(manager) = self.me.upgrade() else {
            return;
        };
        let template_id = template_id.to_string();
        tokio::spawn(async move {
            manager.fill_warm(&template_id).await;
            manager
                .warm
                .filling
                .lock()
                .expect("warm pool lock")
                .remove(&template_id);
        });
    }

    async fn fill_warm(&self, template_id: &str) {
        loop {
            let waiting = self
                .warm
                .ready
                .lock()
                .expect("warm pool lock")
                .get(template_id)
                .map_or(0, Vec::len);
            if waiting >= self.config.warm_pool as usize || !self.warm_has_room() {
                return;
            }
            let warm = match self.start_warm(template_id).await {
                Ok(warm) => warm,
                Err(error) => {
                    tracing::warn!(%error, template = template_id, "could not start a warm VM");
                    return;
                }
            };
            // The template may have gone, or been made again, meanwhile; the agent may be
            // stopping.
            let current = self
                .templates
                .lock()
                .expect("templates lock")
                .get(template_id)
                .is_some_and(|template| template.snapshot == warm.snapshot);
            if !current || self.warm.closed.load(Ordering::SeqCst) {
                self.discard_warm(warm).await;
                return;
            }
            self.warm
                .ready
                .lock()
                .expect("warm pool lock")
                .entry(template_id.to_string())
                .or_default()
                .push(warm);
        }
    }

    /// Whether one more warm VMM may start: the host keeps the memory asked to stay free,
    /// and a slot besides it for a create.
    fn warm_has_room(&self) -> bool {
        let slots = self.slots.config().capacity;
        if self.slots.in_use() + 2 > slots {
            return false;
        }
        available_memory_mib() >= self.config.warm_pool_min_free_mib
    }

    /// Starts a VMM waiting for `template_id`'s snapshot, in a slot and directory of its own.
    async fn start_warm(&self, template_id: &str) -> Result<WarmVm, AgentError> {
        let template = self
            .templates
            .lock()
            .expect("templates lock")
            .get(template_id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("template {template_id} not found")))?;
        let dir = self
            .store
            .sandbox_dir(&format!("{WARM_DIR_PREFIX}{}", new_id()?));
        crate::store::private_dir(&dir)?;
        let disk = dir.join(self.disk_name());
        let started = async {
            let (overlay, slot) = tokio::join!(
                crate::disk::create_sandbox_disk(
                    self.vmm.needs_raw_disk(),
                    &template.machine.disk,
                    &disk
                ),
                self.slots.lease(&Egress::Closed)
            );
            let slot = match (overlay, slot) {
                (Ok(()), Ok(slot)) => slot,
                (Err(error), slot) => {
                    if let Ok(slot) = slot {
                        self.slots.release(slot.index).await;
                    }
                    return Err(error);
                }
                (Ok(()), Err(error)) => return Err(error),
            };
            let vm = async {
                let mapped = template
                    .snapshot
                    .ram
                    .as_deref()
                    .filter(|_| self.vmm.maps_memory_files());
                let memory = match mapped {
                    Some(ram) => GuestMemory::Private(
                        self.mapped_memory(ram, template.machine.memory_mib).await?,
                    ),
                    None => GuestMemory::Anonymous,
                };
                let machine = MachineSpec {
                    disk,
                    netns: Some(slot.netns.clone()),
                    vmm_user: self.vmm_user(slot.index),
                    memory,
                    ..template.machine.clone()
                };
                Ok::<_, AgentError>(
                    self.vmm
                        .start_restore(&machine, &template.snapshot, &dir.join("vm"))
                        .await?,
                )
            }
            .await;
            match vm {
                Ok(vm) => Ok(WarmVm {
                    snapshot: template.snapshot.clone(),
                    dir: dir.clone(),
                    slot,
                    vm,
                }),
                Err(error) => {
                    self.slots.release(slot.index).await;
                    Err(error)
                }
            }
        }
        .await;
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started
    }

    /// Takes every warm VMM of `template_id` out of the pool and stops them in the background
    /// (the template is going).
    pub(super) fn drain_warm(&self, template_id: &str) {
        let drained = self
            .warm
            .ready
            .lock()
            .expect("warm pool lock")
            .remove(template_id)
            .unwrap_or_default();
        self.discard_warm_later(drained);
    }

    fn discard_warm_later(&self, drained: Vec<WarmVm>) {
        if drained.is_empty() {
            return;
        }
        let Some(manager) = self.me.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            for warm in drained {
                manager.discard_warm(warm).await;
            }
        });
    }

    /// Gives back one warm VMM's slot (a create found none free); whether there was one.
    pub(super) async fn release_a_warm_slot(&self) -> bool {
        let taken = {
            let mut ready = self.warm.ready.lock().expect("warm pool lock");
            ready.values_mut().find_map(Vec::pop)
        };
        match taken {
            Some(warm) => {
                self.discard_warm(warm).await;
                true
            }
            None => false,
        }
    }

    /// Stops the warm VMMs of templates unused for [`WARM_POOL_IDLE`], those that died, and,
    /// while the host has less memory available than it keeps free, one more at each call.
    pub(super) async fn check_warm(&self) {
        let now = Instant::now();
        let idle: Vec<String> = self
            .warm
            .used
            .lock()
            .expect("warm pool lock")
            .iter()
            .filter(|(_, used)| now.duration_since(**used) >= WARM_POOL_IDLE)
            .map(|(template, _)| template.clone())
            .collect();
        let mut discarded = Vec::new();
        {
            let mut ready = self.warm.ready.lock().expect("warm pool lock");
            for template in &idle {
                discarded.extend(ready.remove(template).unwrap_or_default());
            }
            for waiting in ready.values_mut() {
                let (alive, dead): (Vec<_>, Vec<_>) =
                    waiting.drain(..).partition(|warm| warm.vm.is_alive());
                *waiting = alive;
                discarded.extend(dead);
            }
            if available_memory_mib() < self.config.warm_pool_min_free_mib
                && let Some(warm) = ready.values_mut().find_map(Vec::pop)
            {
                tracing::info!("memory is short: a warm VM is stopped");
                discarded.push(warm);
            }
            ready.retain(|_, waiting| !waiting.is_empty());
        }
        if !idle.is_empty() {
            let mut used = self.warm.used.lock().expect("warm pool lock");
            for template in &idle {
                used.remove(template);
            }
        }
        for warm in discarded {
            self.discard_warm(warm).await;
        }
    }

    /// Stops every warm VMM; nothing is added after (the agent is stopping).
    pub async fn close_warm_pool(&self) {
        self.warm.closed.store(true, Ordering::SeqCst);
        // A fill in flight adds its last VMM or discards it; wait for the fills to end.
        for _ in 0..600 {
            if self.warm.filling.lock().expect("warm pool lock").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let drained: Vec<WarmVm> = self
            .warm
            .ready
            .lock()
            .expect("warm pool lock")
            .drain()
            .flat_map(|(_, waiting)| waiting)
            .collect();
        for warm in drained {
            self.discard_warm(warm).await;
        }
    }

    /// Slots held by warm VMMs (free for creates: a create takes a warm VMM or its slot).
    pub fn warm_slots(&self) -> u32 {
        self.warm
            .ready
            .lock()
            .expect("warm pool lock")
            .values()
            .map(Vec::len)
            .sum::<usize>() as u32
    }
}

/// The host's available memory (`MemAvailable`), in MiB.
fn available_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    crate::join::meminfo_kib(&meminfo, "MemAvailable:") / 1024
}
