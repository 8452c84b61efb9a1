//! Templates and the template store ([`crate::template_store`]): a build's template is put
//! there, a template this host lacks is pulled from there before a create or a build stands on
//! it, a delete removes it from there, and the templates from there are a cache on this host,
//! kept under its size by removing the least recently used that nothing stands on.
//!
//! A pulled template is whole in its own directory: its disk's chain (the layers of the
//! templates it was built on, on the host that built it) comes along, each layer pointed at
//! the one below it there. A file this host already has (the same bytes, by SHA-256: the base
//! image's root filesystem, a kernel) is linked or copied instead of fetched.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use super::*;
use crate::template_store::{Artifact, Moved, StoredFile, UNREFERENCED_BLOB_AGE, hash_file};

/// The names of a template's files in its directory, and in the store.
const KERNEL: &str = "vmlinuz";
const INITRD: &str = "initrd.img";
const MEMORY: &str = "memory.snap";
const RAM: &str = "memory.ram";
const DISK: &str = "disk.qcow2";

/// How often a host collects the template store's unnamed blobs.
pub(super) const STORE_COLLECTION_INTERVAL: Duration = Duration::from_secs(3600);

/// The layers of the layered memory header `ram`, all in its own directory: layers elsewhere
/// (a checkpoint's, over its template's) are merged into one beside it first, so that the
/// template stands on its own in the store.
async fn self_contained_layers(ram: &Path, state: &Path) -> Result<Vec<PathBuf>, AgentError> {
    let ram = ram.to_path_buf();
    let state = state.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use wrenn_vmm::layers::{LayerHeader, layer_path, merge};
        let read = |path: &Path| {
            LayerHeader::read(path).map_err(|error| {
                AgentError::Internal(format!("reading the template's memory: {error}"))
            })
        };
        let header = read(&ram)?;
        let directory = ram.parent().map(Path::to_path_buf).unwrap_or_default();
        let paths = header.layer_paths(&ram);
        if paths
            .iter()
            .all(|path| path.parent() == Some(directory.as_path()))
        {
            return Ok(paths);
        }
        let merged =
            merge(&ram, &ram, &layer_path(&state, header.generation)).map_err(|error| {
                AgentError::Internal(format!("merging the template's memory: {error}"))
            })?;
        Ok(merged.layer_paths(&ram))
    })
    .await
    .map_err(|error| AgentError::Internal(format!("merging the template's memory: {error}")))?
}

impl Manager {
    /// The template store, if this host has one.
    pub fn template_store(&self) -> Option<&crate::template_store::TemplateStore> {
        self.template_store.as_ref()
    }

    /// Puts `template_id` in the template store (the files the store lacks, then its record).
    /// Nothing when the host has no store.
    pub async fn push_template(
        &self,
        template_id: &str,
        stop: &CancellationToken,
    ) -> Result<Moved, AgentError> {
        let Some(store) = &self.template_store else {
            return Ok(Moved::default());
        };
        let record = self.template(template_id)?;
        let started = Instant::now();
        let mut files = Vec::new();
        for (path, name) in [
            (Some(&record.machine.kernel), KERNEL),
            (record.machine.initrd.as_ref(), INITRD),
            (Some(&record.snapshot.memory), MEMORY),
            (record.snapshot.ram.as_ref(), RAM),
        ] {
            let Some(path) = path else { continue };
            files.push((path.clone(), self.stored_file(path, name).await?));
        }
        // A layered memory file (Firecracker's) goes with its layers, under their own names (the
        // header names them so); layers of another template's are merged into this one's first.
        if let Some(ram) = record
            .snapshot
            .ram
            .as_ref()
            .filter(|ram| wrenn_vmm::layers::is_header(ram))
        {
            for layer in self_contained_layers(ram, &record.snapshot.memory).await? {
                let name = layer
                    .file_name()
                    .and_then(|name| name.to_str())
                    .ok_or_else(|| {
                        AgentError::Internal(format!("{} names no file", layer.display()))
                    })?
                    .to_string();
                files.push((layer.clone(), self.stored_file(&layer, &name).await?));
            }
        }
        let chain = wrenn_vmm::qcow2::chain(&record.machine.disk)
            .map_err(|error| AgentError::internal("reading the template's disk chain", error))?;
        let mut disk = Vec::new();
        for (index, layer) in chain.iter().enumerate() {
            let name = if index == 0 {
                DISK.to_string()
            } else {
                format!("disk-{index}.{}", layer.format)
            };
            let file = self.stored_file(&layer.path, &name).await?;
            disk.push((layer.path.clone(), file, layer.format.to_string()));
        }
        let mut moved = Moved::default();
        // A stop ends the put before its record is written (blobs sent meanwhile are
        // collected later); once the record is written, the put finishes.
        let send = async {
            for (path, file) in files
                .iter()
                .map(|(path, file)| (path, file))
                .chain(disk.iter().map(|(path, file, _)| (path, file)))
            {
                moved += store.put_blob(path, file).await?;
            }
            Ok::<_, AgentError>(())
        };
        tokio::select! {
            sent = send => sent?,
            () = stop.cancelled() => {
                return Err(AgentError::Cancelled("the put was stopped".into()));
            }
        }
        let artifact = Artifact {
            // Older agents read a template whose memory is in its stream.
            format: if record.snapshot.ram.is_some() {
                crate::template_store::ARTIFACT_FORMAT
            } else {
                crate::template_store::OLDEST_ARTIFACT_FORMAT
            },
            record: TemplateRecord {
                machine: MachineSpec {
                    kernel: KERNEL.into(),
                    initrd: record.machine.initrd.as_ref().map(|_| INITRD.into()),
                    disk: DISK.into(),
                    netns: None,
                    vmm_user: None,
                    ..record.machine.clone()
                },
                snapshot: SnapshotFiles {
                    memory: MEMORY.into(),
                    ram: record.snapshot.ram.as_ref().map(|_| RAM.into()),
                    ..record.snapshot.clone()
                },
                parent: None,
                digests: BTreeMap::new(),
                pulled_digests: BTreeMap::new(),
                stored: true,
                ..record.clone()
            },
            files: files.iter().map(|(_, file)| file.clone()).collect(),
            disk: disk
                .iter()
                .map(|(_, file, format)| (file.clone(), format.clone()))
                .collect(),
        };
        store.put_artifact(&artifact).await?;
        // A blob found in the store was named by no record of this template until now: another
        // host's garbage collection may have taken it meanwhile. Now named, it stays: any it
        // took is sent again.
        for (path, file) in files
            .iter()
            .map(|(path, file)| (path, file))
            .chain(disk.iter().map(|(path, file, _)| (path, file)))
        {
            moved += store.put_blob(path, file).await?;
        }
        self.update_template(template_id, |record| record.stored = true);
        tracing::info!(
            template = template_id,
            store = store.location(),
            files = moved.files,
            mib = moved.bytes >> 20,
            stored_mib = moved.stored_bytes >> 20,
            ms = started.elapsed().as_millis() as u64,
            "template put in the store"
        );
        Ok(moved)
    }

    /// The template `template_id`, pulled from the store first if the host lacks it: the
    /// record, and how long the pull took (zero when the host had it).
    pub async fn template_or_pull(
        &self,
        template_id: &str,
    ) -> Result<(TemplateRecord, Duration), AgentError> {
        if let Ok(record) = self.template(template_id) {
            self.touch_template(template_id);
            return Ok((record, Duration::ZERO));
        }
        if self.template_store.is_none() {
            return Err(AgentError::NotFound(format!(
                "template {template_id} not found"
            )));
        }
        let started = Instant::now();
        let (record, _) = self.pull_template(template_id).await?;
        Ok((record, started.elapsed()))
    }

    /// Pulls `template_id` from the store (one pull of a template at a time; a template
    /// another pull brought meanwhile is taken as it is): the record and what was fetched.
    pub async fn pull_template(
        &self,
        template_id: &str,
    ) -> Result<(TemplateRecord, Moved), AgentError> {
        validate_id("template", template_id)?;
        if self.template_store.is_none() {
            return Err(AgentError::FailedPrecondition(
                "this host has no template store".into(),
            ));
        }
        let turn = PullTurn::take(self, template_id);
        let _pulling = turn
            .lock
            .as_ref()
            .expect("a lock until dropped")
            .lock()
            .await;
        self.pull_template_locked(template_id).await
    }

    async fn pull_template_locked(
        &self,
        template_id: &str,
    ) -> Result<(TemplateRecord, Moved), AgentError> {
        let store = self.template_store.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition("this host has no template store".into())
        })?;
        if let Ok(record) = self.template(template_id) {
            self.touch_template(template_id);
            return Ok((record, Moved::default()));
        }
        let started = Instant::now();
        let artifact = store.artifact(template_id).await?.ok_or_else(|| {
            AgentError::NotFound(format!(
                "template {template_id} not found (on this host or in its template store)"
            ))
        })?;
        if artifact.record.accel != self.accel {
            return Err(AgentError::FailedPrecondition(format!(
                "template {template_id} was snapshotted under {}, this host runs {}: it cannot \
                 run here",
                artifact.record.accel.as_str(),
                self.accel.as_str()
            )));
        }
        let names: Vec<&str> = artifact.all_files().map(|f| f.name.as_str()).collect();
        let unsafe_name = |name: &str| {
            name.is_empty()
                || name.contains('/')
                || name.starts_with('.')
                || name == crate::store::TEMPLATE_FILE
        };
        if artifact.disk.is_empty()
            || artifact.disk[0].0.name != DISK
            || (artifact.record.snapshot.ram.is_some() && !names.contains(&RAM))
            || names.iter().any(|name| unsafe_name(name))
            || (1..names.len()).any(|i| names[..i].contains(&names[i]))
        {
            return Err(AgentError::Internal(format!(
                "the template store's record of {template_id} names files it may not: {names:?}"
            )));
        }
        self.reserve_template(template_id, None)?;
        let dir = self.store.template_dir(template_id);
        let result = async {
            let _ = std::fs::remove_dir_all(&dir);
            crate::store::private_dir(&dir)?;
            let mut moved = Moved::default();
            let rebased: Vec<&str> = artifact.disk[..artifact.disk.len() - 1]
                .iter()
                .map(|(file, _)| file.name.as_str())
                .collect();
            for file in artifact.all_files() {
                let target = dir.join(&file.name);
                // A layer pointed at the one below is changed: it must be a copy of its own.
                let writable = rebased.contains(&file.name.as_str());
                if !self.take_local_copy(file, &target, writable).await? {
                    moved += store.get_blob(file, &target).await?;
                }
            }
            for pair in artifact.disk.windows(2) {
                let ((upper, _), (lower, lower_format)) = (&pair[0], &pair[1]);
                crate::disk::rebase(&dir.join(&upper.name), &dir.join(&lower.name), lower_format)
                    .await?;
            }
            for public in [KERNEL, INITRD] {
                let path = dir.join(public);
                if path.exists() {
                    std::fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o644),
                    )
                    .map_err(|error| AgentError::internal("opening the kernel to VMMs", error))?;
                }
            }
            let pulled = artifact.record.clone();
            let record = TemplateRecord {
                template_id: template_id.to_string(),
                machine: MachineSpec {
                    kernel: dir.join(KERNEL),
                    initrd: pulled.machine.initrd.as_ref().map(|_| dir.join(INITRD)),
                    disk: dir.join(DISK),
                    ..pulled.machine.clone()
                },
                snapshot: SnapshotFiles {
                    memory: dir.join(MEMORY),
                    ram: pulled.snapshot.ram.as_ref().map(|_| dir.join(RAM)),
                    ..pulled.snapshot.clone()
                },
                parent: None,
                // The layers pointed at their neighbours are not their blobs' bytes any more.
                digests: artifact
                    .all_files()
                    .filter(|file| !rebased.contains(&file.name.as_str()))
                    .map(|file| (file.name.clone(), file.sha256.clone()))
                    .collect(),
                pulled_digests: artifact
                    .all_files()
                    .filter(|file| rebased.contains(&file.name.as_str()))
                    .map(|file| (file.name.clone(), file.sha256.clone()))
                    .collect(),
                stored: true,
                ..pulled
            };
            self.store.save_template(&record)?;
            Ok::<_, AgentError>((record, moved))
        }
        .await;
        self.building
            .lock()
            .expect("building lock")
            .remove(template_id);
        match result {
            Ok((record, moved)) => {
                self.templates
                    .lock()
                    .expect("templates lock")
                    .insert(template_id.to_string(), record.clone());
                self.touch_template(template_id);
                let took = started.elapsed();
                tracing::info!(
                    template = template_id,
                    store = store.location(),
                    files = moved.files,
                    mib = moved.bytes >> 20,
                    stored_mib = moved.stored_bytes >> 20,
                    ms = took.as_millis() as u64,
                    "template pulled from the store"
                );
                self.trim_template_cache(Some(template_id));
                Ok((record, moved))
            }
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(error)
            }
        }
    }

    /// Deletes `template_id` from this host (refused while a sandbox or a template stands on
    /// it) and from the template store, with the blobs no other template names. NotFound
    /// when neither has it. A checkpoint (a snapshot) that no sandbox was made from, but that
    /// its source or later checkpoints stand on, is deleted all the same: it is made ephemeral,
    /// hidden from then on and removed from the host as soon as nothing stands on it (its
    /// layer is theirs too), and its store record goes now (the others' records name every
    /// blob they need).
    pub async fn delete_template(&self, template_id: &str) -> Result<(), AgentError> {
        let found = self.template(template_id).ok();
        let local = found.is_some();
        if let Some(template) = found {
            match self.remove_template(template_id) {
                Ok(()) => self.collect_ephemeral(),
                // Sandboxes made from it (or being made) keep it a template: refused.
                Err(AgentError::FailedPrecondition(why))
                    if template.source_sandbox.is_some() && !self.made_from(template_id) =>
                {
                    self.update_template(template_id, |record| record.ephemeral = true);
                    tracing::info!(template = template_id, %why, "checkpoint deleted: kept on the host while its layer is in use");
                }
                Err(error) => return Err(error),
            }
        }
        let stored = match &self.template_store {
            Some(store) => store.delete(template_id, UNREFERENCED_BLOB_AGE).await?,
            None => false,
        };
        if !local && !stored {
            return Err(AgentError::NotFound(format!(
                "template {template_id} not found"
            )));
        }
        tracing::info!(
            template = template_id,
            from_host = local,
            from_store = stored,
            "template deleted"
        );
        Ok(())
    }

    /// Whether a sandbox was made from `template_id`, or a create or build from it is in
    /// flight.
    fn made_from(&self, template_id: &str) -> bool {
        let creating = self
            .creating_from
            .lock()
            .expect("creating lock")
            .get(template_id)
            .is_some_and(|count| *count > 0);
        creating
            || self
                .sandboxes
                .lock()
                .expect("sandboxes lock")
                .values()
                .any(|entry| entry.snapshot().template_id == template_id)
    }

    /// Takes out of the template store the blobs no template names, older than
    /// [`UNREFERENCED_BLOB_AGE`] (a put that failed half-way leaves some): every host with the
    /// store does it about hourly; collections at once are safe, each removing only what no
    /// record names.
    pub(super) async fn collect_store_garbage(&self) {
        let Some(store) = &self.template_store else {
            return;
        };
        match store.collect_garbage(UNREFERENCED_BLOB_AGE).await {
            Ok(0) => tracing::debug!(store = store.location(), "no blob to collect"),
            Ok(removed) => {
                tracing::info!(
                    store = store.location(),
                    removed,
                    "blobs no template names collected"
                )
            }
            Err(error) => {
                tracing::warn!(store = store.location(), %error, "the template store's collection failed")
            }
        }
    }

    /// Removes the templates from the store that nothing stands on, least recently used
    /// first, until those from the store take at most the cache's size (`keep` is never
    /// removed: it was just pulled for a create).
    pub(super) fn trim_template_cache(&self, keep: Option<&str>) {
        let limit = self.config.template_cache_bytes;
        if self.template_store.is_none() || limit == 0 {
            return;
        }
        let stored: Vec<TemplateRecord> = self
            .list_templates()
            .into_iter()
            .filter(|template| template.stored)
            .collect();
        let sizes: HashMap<String, u64> = stored
            .iter()
            .map(|template| {
                let size = dir_bytes(&self.store.template_dir(&template.template_id));
                (template.template_id.clone(), size)
            })
            .collect();
        let mut total: u64 = sizes.values().sum();
        if total <= limit {
            return;
        }
        let used = self.template_used_ms.lock().expect("used lock").clone();
        // One a create is on its way to a sandbox from stays.
        let creating = self.creating_from.lock().expect("creating lock").clone();
        let mut candidates: Vec<&TemplateRecord> = stored
            .iter()
            .filter(|template| Some(template.template_id.as_str()) != keep)
            .filter(|template| !creating.contains_key(&template.template_id))
            .collect();
        candidates.sort_by_key(|template| {
            used.get(&template.template_id)
                .copied()
                .unwrap_or(template.created_at_ms)
        });
        for template in candidates {
            if total <= limit {
                break;
            }
            // Refused while a sandbox or a template stands on it: the next one is tried.
            match self.remove_template(&template.template_id) {
                Ok(()) => {
                    total = total.saturating_sub(sizes[&template.template_id]);
                    tracing::info!(
                        template = %template.template_id,
                        "template removed from the host's cache (the store keeps it)"
                    );
                }
                Err(error) => {
                    tracing::debug!(template = %template.template_id, %error, "kept in the cache")
                }
            }
        }
    }

    /// The template `template_id` of this host.
    pub(super) fn template(&self, template_id: &str) -> Result<TemplateRecord, AgentError> {
        self.templates
            .lock()
            .expect("templates lock")
            .get(template_id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("template {template_id} not found")))
    }

    /// Counts a create from `template_id` in flight until the guard is dropped: the cache
    /// keeps the template meanwhile.
    pub(super) fn creating_from(&self, template_id: &str) -> CreatingFrom<'_> {
        *self
            .creating_from
            .lock()
            .expect("creating lock")
            .entry(template_id.to_string())
            .or_default() += 1;
        CreatingFrom {
            manager: self,
            template_id: template_id.to_string(),
        }
    }

    /// Notes that `template_id` was used now.
    pub(super) fn touch_template(&self, template_id: &str) {
        self.template_used_ms
            .lock()
            .expect("used lock")
            .insert(template_id.to_string(), now_ms());
    }

    /// Changes the record of `template_id` and saves it.
    pub(super) fn update_template(
        &self,
        template_id: &str,
        change: impl FnOnce(&mut TemplateRecord),
    ) {
        let mut templates = self.templates.lock().expect("templates lock");
        if let Some(record) = templates.get_mut(template_id) {
            change(record);
            if let Err(error) = self.store.save_template(record) {
                tracing::warn!(template = template_id, %error, "could not save the template record");
            }
        }
    }

    /// The template whose directory holds `path`, and the file's name there.
    fn owner_of(&self, path: &Path) -> Option<(String, String)> {
        let name = path.file_name()?.to_str()?.to_string();
        let dir = path.parent()?;
        let id = dir.file_name()?.to_str()?.to_string();
        (self.store.template_dir(&id) == dir).then_some((id, name))
    }

    /// `path` as the store names it (`name`): its SHA-256 (from its template's record when it
    /// was hashed before; hashed now, and remembered, when not) and size.
    async fn stored_file(&self, path: &Path, name: &str) -> Result<StoredFile, AgentError> {
        let size = std::fs::metadata(path)
            .map_err(|error| AgentError::internal(&format!("reading {}", path.display()), error))?
            .len();
        let owner = self.owner_of(path);
        let known = owner.as_ref().and_then(|(id, file)| {
            self.template(id)
                .ok()
                .and_then(|record| record.digests.get(file).cloned())
        });
        let sha256 = match known {
            Some(sha256) => sha256,
            None => {
                let hashed = path.to_path_buf();
                let (sha256, hashed_size) = tokio::task::spawn_blocking(move || hash_file(&hashed))
                    .await
                    .map_err(|error| AgentError::internal("the hashing thread", error))??;
                if hashed_size != size {
                    return Err(AgentError::Internal(format!(
                        "{} changed while it was hashed",
                        path.display()
                    )));
                }
                if let Some((id, file)) = &owner {
                    self.update_template(id, |record| {
                        record.digests.insert(file.clone(), sha256.clone());
                    });
                }
                sha256
            }
        };
        Ok(StoredFile {
            name: name.to_string(),
            sha256,
            size,
        })
    }

    /// Takes `file` from a template of this host that has the same bytes, into `target`:
    /// linked, or copied when `writable`. Files of the same size whose hash is not known yet
    /// are hashed (and the hash remembered). Whether one was found.
    async fn take_local_copy(
        &self,
        file: &StoredFile,
        target: &Path,
        writable: bool,
    ) -> Result<bool, AgentError> {
        let mut candidates = Vec::new();
        for template in self.list_templates() {
            let dir = self.store.template_dir(&template.template_id);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let same_size = entry
                    .metadata()
                    .is_ok_and(|meta| meta.is_file() && meta.len() == file.size);
                if !same_size || name == crate::store::TEMPLATE_FILE {
                    continue;
                }
                // A layer a pull pointed at its neighbour was that blob before: a copy of it,
                // pointed anew, is what this pull would make of the blob.
                if writable && template.pulled_digests.get(&name) == Some(&file.sha256) {
                    candidates.insert(0, (path, true));
                    continue;
                }
                match template.digests.get(&name) {
                    Some(sha256) if *sha256 == file.sha256 => candidates.insert(0, (path, false)),
                    Some(_) => {}
                    None => candidates.push((path, false)),
                }
            }
        }
        for (candidate, as_pulled) in candidates {
            if !as_pulled {
                let Ok(found) = self.stored_file(&candidate, &file.name).await else {
                    continue;
                };
                if found.sha256 != file.sha256 {
                    continue;
                }
            }
            let taken = if writable {
                crate::disk::copy_file(&candidate, target).await
            } else {
                std::fs::hard_link(&candidate, target)
                    .map_err(|error| AgentError::internal("linking a template's file", error))
            };
            match taken {
                Ok(()) => return Ok(true),
                Err(error) => {
                    tracing::debug!(%error, "could not take a local copy: fetching instead");
                    let _ = std::fs::remove_file(target);
                }
            }
        }
        Ok(false)
    }
}

/// The disk removing `dir` would free: the allocated blocks of the files directly in it that
/// no other directory links (a file linked from another template stays with it).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|entry| entry.metadata().ok())
                .filter(|meta| meta.is_file() && meta.nlink() == 1)
                .map(|meta| meta.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// A pull's place in its template's lock ([`Manager::pulling`]): the last one out takes the
/// lock away, under the map's lock, where alone the locks are cloned (so a count of two, the
/// map's and this one's, means no one else waits), even when the pull is dropped half-way.
struct PullTurn<'a> {
    manager: &'a Manager,
    template_id: String,
    lock: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<'a> PullTurn<'a> {
    fn take(manager: &'a Manager, template_id: &str) -> PullTurn<'a> {
        let lock = manager
            .pulling
            .lock()
            .expect("pulling lock")
            .entry(template_id.to_string())
            .or_default()
            .clone();
        PullTurn {
            manager,
            template_id: template_id.to_string(),
            lock: Some(lock),
        }
    }
}

impl Drop for PullTurn<'_> {
    fn drop(&mut self) {
        let mut pulling = self.manager.pulling.lock().expect("pulling lock");
        if let Some(lock) = self.lock.take()
            && Arc::strong_count(&lock) == 2
        {
            pulling.remove(&self.template_id);
        }
    }
}

/// A create from a template in flight (see [`Manager::creating_from`]).
pub(super) struct CreatingFrom<'a> {
    manager: &'a Manager,
    template_id: String,
}

impl Drop for CreatingFrom<'_> {
    fn drop(&mut self) {
        let mut creating = self.manager.creating_from.lock().expect("creating lock");
        if let Some(count) = creating.get_mut(&self.template_id) {
            *count -= 1;
            if *count == 0 {
                creating.remove(&self.template_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use wrenn_vmm::layers::{self, Changed, LayerHeader, MemoryImage};

    use super::*;

    /// A checkpoint's memory stands on its template's layer: before the store takes it, it is
    /// merged into one layer beside its header, which reads the same; a template's own layers
    /// are taken as they are.
    #[tokio::test]
    async fn a_template_put_in_the_store_takes_only_layers_of_its_own() {
        let root = tempfile::tempdir().unwrap();
        let (parent_dir, own_dir) = (root.path().join("base"), root.path().join("checkpoint"));
        std::fs::create_dir(&parent_dir).unwrap();
        std::fs::create_dir(&own_dir).unwrap();
        let page = 4096usize;
        let mut memory = vec![0u8; 16 * page];
        memory[2 * page..3 * page].fill(5);
        let full = root.path().join("full.mem");
        std::fs::write(&full, &memory).unwrap();
        let parent_state = parent_dir.join("memory.snap");
        let parent = parent_dir.join("memory.header");
        layers::write_base(
            &full,
            memory.len() as u64,
            4096,
            &parent,
            &layers::layer_path(&parent_state, 0),
        )
        .unwrap();
        let own = self_contained_layers(&parent, &parent_state).await.unwrap();
        assert_eq!(own, vec![parent_dir.join("memory.g0.layer")]);

        // The checkpoint changed page 7 (a Diff: that page in a sparse file).
        memory[7 * page..8 * page].fill(9);
        let diff = root.path().join("diff.mem");
        let file = std::fs::File::create(&diff).unwrap();
        file.set_len(memory.len() as u64).unwrap();
        std::os::unix::fs::FileExt::write_all_at(
            &file,
            &memory[7 * page..8 * page],
            7 * page as u64,
        )
        .unwrap();
        let state = own_dir.join("memory.snap");
        let header = own_dir.join("memory.header");
        layers::write_layer(
            &parent,
            &diff,
            Changed::DataOnly,
            &header,
            &layers::layer_path(&state, 1),
            8,
        )
        .unwrap();
        assert_eq!(LayerHeader::read(&header).unwrap().layers.len(), 2);

        let taken = self_contained_layers(&header, &state).await.unwrap();
        assert_eq!(taken, vec![own_dir.join("memory.g1.layer")]);
        let merged = LayerHeader::read(&header).unwrap();
        assert_eq!(merged.layers, vec!["memory.g1.layer".to_string()]);
        let mut read = vec![0u8; memory.len()];
        MemoryImage::open(&header).unwrap().read_at(0, &mut read);
        assert_eq!(read, memory);
    }
}
