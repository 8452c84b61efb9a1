//! Watching directories with inotify: a stream of events for `WatchDir`, and polling watchers
//! (`CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher`) that buffer events between polls.
//!
//! A recursive watch adds a watch for every subdirectory, including ones created (or moved in)
//! while it runs. Event names are relative to the watched directory. Every watch ends, and its
//! inotify descriptor closes, when its consumer goes away; a polling watcher nobody polls for
//! [`POLLING_WATCHER_IDLE_EXPIRY`] is removed.
//!
//! Events follow E2B's envd (its fsnotify fork): one inotify event may stand for several, in
//! the order CREATE, RENAME, CHMOD, WRITE, REMOVE; a move in is CREATE, a move out RENAME. An
//! upload's temporary file is never reported: its rename over the destination is reported as
//! the events E2B's envd's in-place write causes (see [`super::upload_temp`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::sync::mpsc;
use wrenn_proto::filesystem::{EntryInfo, EventType};

use super::upload_temp::{UploadKind, is_upload_temp};
use crate::users::Accounts;

/// A polling watcher is dropped when it was not polled for this long.
pub const POLLING_WATCHER_IDLE_EXPIRY: Duration = Duration::from_secs(600);
/// A polling watcher keeps at most this many unread events; later ones are dropped.
pub const POLLING_WATCHER_MAX_EVENTS: usize = 100_000;

/// Filesystem magic numbers (statfs `f_type`) of network filesystems, refused unless allowed.
const NETWORK_FILESYSTEMS: [i64; 7] = [
    0x6969,      // NFS
    0xFF53_4D42, // CIFS
    0xFE53_4D42, // SMB2
    0x517B,      // SMB
    0x0102_1997, // 9P (v9fs)
    0x6B41_4653, // AFS
    0x0BD0_0BD0, // Lustre
];

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub root: PathBuf,
    pub recursive: bool,
    pub include_entry: bool,
    pub allow_network_mounts: bool,
}

/// One change below the watched directory.
#[derive(Debug, Clone, PartialEq)]
pub struct FsEvent {
    /// The path relative to the watched directory.
    pub name: String,
    pub kind: EventType,
    pub entry: Option<EntryInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("path '{0}' does not exist")]
    NotFound(PathBuf),
    #[error("path '{0}' is not a directory")]
    NotADirectory(PathBuf),
    #[error("path '{0}' is on a network filesystem; set allow_network_mounts to watch it")]
    NetworkMount(PathBuf),
    #[error("watcher with id {0} not found")]
    UnknownWatcher(String),
    #[error("watching '{path}' failed: {source}")]
    Inotify {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the watched directory '{0}' was removed or moved away")]
    RootGone(PathBuf),
    #[error("no watcher id: {0}")]
    NoRandomness(wrenn_core::random::NoRandomness),
    #[error("{0}")]
    Ended(String),
    #[error("watcher error: the inotify queue overflowed and events were lost")]
    Overflow,
}

fn is_network_filesystem(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        Ok(stats) => NETWORK_FILESYSTEMS.contains(&{ stats.filesystem_type().0 }),
        Err(_) => false,
    }
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Starts watching; events (or the error that ended the watch) arrive on the receiver, and the
/// watch stops when the receiver is dropped.
pub fn watch(
    spec: WatchSpec,
    accounts: Accounts,
) -> Result<mpsc::Receiver<Result<FsEvent, WatchError>>, WatchError> {
    match std::fs::metadata(&spec.root) {
        Err(_) => return Err(WatchError::NotFound(spec.root)),
        Ok(metadata) if !metadata.is_dir() => return Err(WatchError::NotADirectory(spec.root)),
        Ok(_) => {}
    }
    if !spec.allow_network_mounts && is_network_filesystem(&spec.root) {
        return Err(WatchError::NetworkMount(spec.root));
    }
    let inotify_error = |source| WatchError::Inotify {
        path: spec.root.clone(),
        source,
    };
    let inotify = Inotify::init().map_err(inotify_error)?;
    let mut stream = inotify
        .into_event_stream(vec![0u8; 64 * 1024])
        .map_err(inotify_error)?;
    let mut dirs: HashMap<WatchDescriptor, PathBuf> = HashMap::new();
    let root_wd = stream
        .watches()
        .add(&spec.root, MASK)
        .map_err(inotify_error)?;
    dirs.insert(root_wd.clone(), PathBuf::new());
    if spec.recursive {
        add_subtree(
            &mut stream.watches(),
            &spec.root,
            Path::new(""),
            &mut dirs,
            &mut Vec::new(),
        );
    }

    let (sender, receiver) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut upload_renames = UploadRenames::default();
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = sender.closed() => return,
            };
            let event = match event {
                Some(Ok(event)) => event,
                Some(Err(source)) => {
                    let _ = sender
                        .send(Err(WatchError::Inotify {
                            path: spec.root.clone(),
                            source,
                        }))
                        .await;
                    return;
                }
                None => return,
            };
            if event.mask.contains(EventMask::Q_OVERFLOW) {
                let _ = sender.send(Err(WatchError::Overflow)).await;
                return;
            }
            if event.mask.contains(EventMask::IGNORED) {
                dirs.remove(&event.wd);
                if event.wd == root_wd {
                    let _ = sender
                        .send(Err(WatchError::RootGone(spec.root.clone())))
                        .await;
                    return;
                }
                continue;
            }
            let Some(relative_dir) = dirs.get(&event.wd).cloned() else {
                continue;
            };
            let relative = match event.name.as_deref() {
                Some(name) => relative_dir.join(name),
                // Events about a watched directory itself: only the root's are reported (a
                // subdirectory's are reported by its parent's watch).
                None if event.wd == root_wd => PathBuf::new(),
                None => continue,
            };
            // An upload writes a temporary file and renames it over its destination: hide the
            // temporary file and report the rename as the events E2B's envd's in-place write
            // causes.
            let name = relative.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if is_upload_temp(name) {
                if event.mask.contains(EventMask::MOVED_FROM)
                    && let Some(kind) = UploadKind::from_temp_name(name)
                {
                    upload_renames.remember(event.cookie, kind);
                }
                continue;
            }
            let full = spec.root.join(&relative);
            let upload = if event.mask.contains(EventMask::MOVED_TO) {
                upload_renames.take(event.cookie)
            } else {
                None
            };
            let kinds = match upload {
                Some(kind) => upload_event_types(kind, &full),
                None => event_types(event.mask),
            };
            let mut batch = Vec::new();
            for kind in kinds {
                batch.push(make_event(&spec, &accounts, &relative, &full, kind));
            }
            if spec.recursive
                && event.mask.contains(EventMask::ISDIR)
                && event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO)
            {
                let mut watches = stream.watches();
                if let Ok(wd) = watches.add(&full, MASK) {
                    dirs.insert(wd, relative.clone());
                }
                // What the new directory already holds is reported as created, since no
                // watch saw it arrive.
                let mut found = Vec::new();
                add_subtree(&mut watches, &full, &relative, &mut dirs, &mut found);
                for nested in found {
                    let nested_full = spec.root.join(&nested);
                    batch.push(make_event(
                        &spec,
                        &accounts,
                        &nested,
                        &nested_full,
                        EventType::Create,
                    ));
                }
            }
            for event in batch {
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok(receiver)
}

/// The uploads whose temporary file was seen leaving (`MOVED_FROM`), by rename cookie, until
/// their arrival (`MOVED_TO`) is seen. The two are consecutive in the inotify queue, so a few
/// suffice; the oldest are forgotten.
#[derive(Debug, Default)]
struct UploadRenames(Vec<(u32, UploadKind)>);

impl UploadRenames {
    const KEPT: usize = 64;

    fn remember(&mut self, cookie: u32, kind: UploadKind) {
        if self.0.len() >= Self::KEPT {
            self.0.remove(0);
        }
        self.0.push((cookie, kind));
    }

    fn take(&mut self, cookie: u32) -> Option<UploadKind> {
        let index = self.0.iter().position(|(c, _)| *c == cookie)?;
        Some(self.0.remove(index).1)
    }
}

/// What E2B's envd's upload, writing `full` in place, shows a watcher (research: open with
/// `O_CREAT` is CREATE, the chown is CHMOD, the data or the truncation of a replaced file is
/// WRITE, the metadata's extended attributes are CHMOD): CREATE, CHMOD, WRITE (none for an
/// empty new file) for a new file; CHMOD, WRITE for a replaced one; then CHMOD if metadata was
/// written. Like inotify, which merges an event into an identical one still unread (and E2B's
/// steps follow each other within microseconds), two CHMODs in a row are one.
fn upload_event_types(kind: UploadKind, full: &Path) -> Vec<EventType> {
    let mut kinds = Vec::with_capacity(4);
    if kind.creates {
        kinds.extend([EventType::Create, EventType::Chmod]);
        // The size now, as the file's content was already complete when it was renamed.
        if std::fs::symlink_metadata(full).map_or(true, |m| m.len() > 0) {
            kinds.push(EventType::Write);
        }
    } else {
        kinds.extend([EventType::Chmod, EventType::Write]);
    }
    if kind.sets_metadata && kinds.last() != Some(&EventType::Chmod) {
        kinds.push(EventType::Chmod);
    }
    kinds
}

/// The events one inotify event stands for, in E2B's order (CREATE, RENAME, CHMOD, WRITE,
/// REMOVE).
fn event_types(mask: EventMask) -> Vec<EventType> {
    let mut kinds = Vec::new();
    if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
        kinds.push(EventType::Create);
    }
    if mask.intersects(EventMask::MOVED_FROM | EventMask::MOVE_SELF) {
        kinds.push(EventType::Rename);
    }
    if mask.contains(EventMask::ATTRIB) {
        kinds.push(EventType::Chmod);
    }
    if mask.contains(EventMask::MODIFY) {
        kinds.push(EventType::Write);
    }
    if mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
        kinds.push(EventType::Remove);
    }
    kinds
}

fn make_event(
    spec: &WatchSpec,
    accounts: &Accounts,
    relative: &Path,
    full: &Path,
    kind: EventType,
) -> FsEvent {
    let entry = match kind {
        EventType::Create | EventType::Write | EventType::Chmod if spec.include_entry => {
            super::entry_info(full, accounts).ok()
        }
        _ => None,
    };
    let name = if relative.as_os_str().is_empty() {
        ".".to_owned()
    } else {
        relative.to_string_lossy().into_owned()
    };
    FsEvent { name, kind, entry }
}

/// Adds watches for every directory below `dir` (not following symlinks), and collects the
/// relative path of every entry found.
fn add_subtree(
    watches: &mut inotify::Watches,
    dir: &Path,
    relative: &Path,
    dirs: &mut HashMap<WatchDescriptor, PathBuf>,
    found: &mut Vec<PathBuf>,
) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for item in read.flatten() {
        let name: &OsStr = &item.file_name();
        let child_relative = relative.join(name);
        found.push(child_relative.clone());
        if !item.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Ok(wd) = watches.add(item.path(), MASK) {
            dirs.insert(wd, child_relative.clone());
            add_subtree(watches, &item.path(), &child_relative, dirs, found);
        }
    }
}

#[derive(Debug)]
struct PollingWatcher {
    events: Arc<Mutex<PolledEvents>>,
    task: tokio::task::AbortHandle,
    last_poll: Instant,
}

#[derive(Debug, Default)]
struct PolledEvents {
    events: Vec<FsEvent>,
    dropped: usize,
    ended: Option<String>,
}

/// The polling watchers, by id.
#[derive(Debug, Default)]
pub struct WatcherRegistry {
    watchers: Mutex<HashMap<String, PollingWatcher>>,
}

impl WatcherRegistry {
    /// Starts a watcher that buffers its events until polled; returns its id.
    pub fn create(&self, spec: WatchSpec, accounts: Accounts) -> Result<String, WatchError> {
        self.expire_idle();
        let id = new_watcher_id()?;
        let mut receiver = watch(spec, accounts)?;
        let events = Arc::new(Mutex::new(PolledEvents::default()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = receiver.recv().await {
                let mut buffer = sink.lock().expect("watcher buffer lock");
                match item {
                    Ok(event) if buffer.events.len() < POLLING_WATCHER_MAX_EVENTS => {
                        buffer.events.push(event)
                    }
                    Ok(_) => buffer.dropped += 1,
                    Err(error) => {
                        buffer.ended = Some(error.to_string());
                        return;
                    }
                }
            }
        });
        self.watchers.lock().expect("watcher registry lock").insert(
            id.clone(),
            PollingWatcher {
                events,
                task: task.abort_handle(),
                last_poll: Instant::now(),
            },
        );
        Ok(id)
    }

    /// Takes the events buffered since the last poll. `Err` carries why the watch ended, after
    /// its last events were returned.
    pub fn take_events(&self, id: &str) -> Result<Vec<FsEvent>, WatchError> {
        self.expire_idle();
        let mut watchers = self.watchers.lock().expect("watcher registry lock");
        let watcher = watchers
            .get_mut(id)
            .ok_or_else(|| WatchError::UnknownWatcher(id.to_owned()))?;
        watcher.last_poll = Instant::now();
        let mut buffer = watcher.events.lock().expect("watcher buffer lock");
        if buffer.dropped > 0 {
            tracing::warn!(
                watcher = id,
                dropped = buffer.dropped,
                "polling watcher dropped events: polled too rarely"
            );
            buffer.dropped = 0;
        }
        let events = std::mem::take(&mut buffer.events);
        match &buffer.ended {
            Some(reason) if events.is_empty() => Err(WatchError::Ended(reason.clone())),
            _ => Ok(events),
        }
    }

    pub fn remove(&self, id: &str) -> Result<(), WatchError> {
        let watcher = self
            .watchers
            .lock()
            .expect("watcher registry lock")
            .remove(id)
            .ok_or_else(|| WatchError::UnknownWatcher(id.to_owned()))?;
        watcher.task.abort();
        Ok(())
    }

    /// How many polling watchers exist.
    pub fn len(&self) -> usize {
        self.watchers.lock().expect("watcher registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expire_idle(&self) {
        self.watchers
            .lock()
            .expect("watcher registry lock")
            .retain(|id, watcher| {
                let keep = watcher.last_poll.elapsed() < POLLING_WATCHER_IDLE_EXPIRY;
                if !keep {
                    tracing::info!(watcher = id, "removing a polling watcher nobody polled");
                    watcher.task.abort();
                }
                keep
            });
    }
}

/// A watcher id: `w` and 20 lowercase letters or digits, like E2B's.
fn new_watcher_id() -> Result<String, WatchError> {
    wrenn_core::random::id("w", 20).map_err(WatchError::NoRandomness)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(receiver: &mut mpsc::Receiver<Result<FsEvent, WatchError>>) -> FsEvent {
        tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    fn spec(root: &Path, recursive: bool) -> WatchSpec {
        WatchSpec {
            root: root.into(),
            recursive,
            include_entry: false,
            allow_network_mounts: false,
        }
    }

    #[tokio::test]
    async fn recursive_watch_follows_new_directories() {
        let dir = tempfile::tempdir().unwrap();
        let spec = WatchSpec {
            include_entry: true,
            ..spec(dir.path(), true)
        };
        let mut events = watch(spec, Accounts::default()).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let created = next(&mut events).await;
        assert_eq!(
            (created.name.as_str(), created.kind),
            ("sub", EventType::Create)
        );
        assert!(created.entry.is_some());
        std::fs::write(dir.path().join("sub/f.txt"), b"hi").unwrap();
        let created = next(&mut events).await;
        assert_eq!(
            (created.name.as_str(), created.kind),
            ("sub/f.txt", EventType::Create)
        );
        let written = next(&mut events).await;
        assert_eq!(
            (written.name.as_str(), written.kind),
            ("sub/f.txt", EventType::Write)
        );
        std::fs::rename(dir.path().join("sub/f.txt"), dir.path().join("g.txt")).unwrap();
        assert_eq!(next(&mut events).await.kind, EventType::Rename);
        let moved_in = next(&mut events).await;
        assert_eq!(
            (moved_in.name.as_str(), moved_in.kind),
            ("g.txt", EventType::Create)
        );
        std::fs::remove_file(dir.path().join("g.txt")).unwrap();
        let removed = next(&mut events).await;
        assert_eq!(
            (removed.name.as_str(), removed.kind, removed.entry),
            ("g.txt", EventType::Remove, None)
        );
    }

    /// The events up to (without) the creation of a file named `sentinel`, which the caller
    /// makes after the operation under test: exactly what the operation caused.
    async fn events_before_sentinel(
        receiver: &mut mpsc::Receiver<Result<FsEvent, WatchError>>,
        dir: &Path,
    ) -> Vec<(String, EventType)> {
        std::fs::write(dir.join("sentinel"), b"").unwrap();
        let mut seen = Vec::new();
        loop {
            let event = next(receiver).await;
            if event.name == "sentinel" {
                assert_eq!(event.kind, EventType::Create);
                // Its CHMOD-free CREATE is all an empty `write` causes; leave nothing queued.
                std::fs::remove_file(dir.join("sentinel")).unwrap();
                assert_eq!(next(receiver).await.kind, EventType::Remove);
                return seen;
            }
            seen.push((event.name, event.kind));
        }
    }

    /// Writes `content` to `target` the way an upload does: a temporary file named for the
    /// upload's kind, given its mode and metadata, then renamed over the destination.
    fn upload(target: &Path, content: &[u8], sets_metadata: bool) {
        let kind = UploadKind {
            creates: !target.exists(),
            sets_metadata,
        };
        let temp = kind.temp_path(target, "1-2");
        std::fs::write(&temp, content).unwrap();
        std::fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        std::fs::rename(&temp, target).unwrap();
    }

    fn names(events: &[(String, EventType)]) -> Vec<(&str, EventType)> {
        events.iter().map(|(n, k)| (n.as_str(), *k)).collect()
    }

    #[tokio::test]
    async fn uploads_show_e2b_in_place_write_events() {
        use EventType::{Chmod, Create, Write};
        let dir = tempfile::tempdir().unwrap();
        let mut events = watch(spec(dir.path(), false), Accounts::default()).unwrap();
        let file = dir.path().join("f.txt");

        upload(&file, b"new", false);
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(
            names(&seen),
            [("f.txt", Create), ("f.txt", Chmod), ("f.txt", Write)]
        );

        upload(&file, b"replaced", false);
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(names(&seen), [("f.txt", Chmod), ("f.txt", Write)]);

        upload(&file, b"", true);
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(
            names(&seen),
            [("f.txt", Chmod), ("f.txt", Write), ("f.txt", Chmod)]
        );

        let empty = dir.path().join("empty.txt");
        upload(&empty, b"", false);
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(names(&seen), [("empty.txt", Create), ("empty.txt", Chmod)]);

        // Empty with metadata: the chown's and the metadata's CHMODs are one, as inotify
        // merges them.
        let empty_tagged = dir.path().join("empty-tagged.txt");
        upload(&empty_tagged, b"", true);
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(
            names(&seen),
            [("empty-tagged.txt", Create), ("empty-tagged.txt", Chmod)]
        );

        let tagged = dir.path().join("tagged.txt");
        upload(&tagged, b"x", true);
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(
            names(&seen),
            [
                ("tagged.txt", Create),
                ("tagged.txt", Chmod),
                ("tagged.txt", Write),
                ("tagged.txt", Chmod)
            ]
        );
    }

    #[tokio::test]
    async fn uploads_below_a_recursive_watch_show_the_same_events() {
        use EventType::{Chmod, Create, Write};
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let mut events = watch(spec(dir.path(), true), Accounts::default()).unwrap();
        upload(&dir.path().join("sub/f.txt"), b"deep", false);
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(
            names(&seen),
            [
                ("sub/f.txt", Create),
                ("sub/f.txt", Chmod),
                ("sub/f.txt", Write)
            ]
        );
    }

    #[tokio::test]
    async fn filesystem_operations_show_e2b_events() {
        use EventType::{Chmod, Create, Remove, Rename};
        let dir = tempfile::tempdir().unwrap();
        let metadata = std::fs::metadata(dir.path()).unwrap();
        // Whoever runs the test, so that giving the new directories to the user works.
        let me = crate::users::User::for_tests(
            "me",
            std::os::unix::fs::MetadataExt::uid(&metadata),
            dir.path(),
            vec![std::os::unix::fs::MetadataExt::gid(&metadata)],
        );
        let accounts = Accounts::default();
        let mut events = watch(spec(dir.path(), false), Accounts::default()).unwrap();

        // make_dir: CREATE then CHMOD (the chown) per level made in the watched directory.
        super::super::make_dir(&dir.path().join("d/e"), &me, &accounts).unwrap();
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(names(&seen), [("d", Create), ("d", Chmod)]);

        // move: RENAME the old name, CREATE the new one.
        std::fs::write(dir.path().join("a"), b"a").unwrap();
        let _ = events_before_sentinel(&mut events, dir.path()).await;
        super::super::move_entry(&dir.path().join("a"), &dir.path().join("b"), &me, &accounts)
            .unwrap();
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(names(&seen), [("a", Rename), ("b", Create)]);

        // chmod: CHMOD.
        std::fs::set_permissions(
            dir.path().join("b"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(names(&seen), [("b", Chmod)]);

        // remove: REMOVE, for a file and for a directory tree.
        super::super::remove(&dir.path().join("b"), &me).unwrap();
        super::super::remove(&dir.path().join("d"), &me).unwrap();
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        assert_eq!(names(&seen), [("b", Remove), ("d", Remove)]);
    }

    #[tokio::test]
    async fn recursive_watch_reports_removed_trees_child_first() {
        use EventType::Remove;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("t/u")).unwrap();
        std::fs::write(dir.path().join("t/u/f"), b"").unwrap();
        let mut events = watch(spec(dir.path(), true), Accounts::default()).unwrap();
        std::fs::remove_dir_all(dir.path().join("t")).unwrap();
        let seen = events_before_sentinel(&mut events, dir.path()).await;
        // A watched directory's own deletion is reported once, by its parent.
        assert_eq!(
            names(&seen),
            [("t/u/f", Remove), ("t/u", Remove), ("t", Remove)]
        );
    }

    #[tokio::test]
    async fn non_recursive_watch_ignores_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let mut events = watch(spec(dir.path(), false), Accounts::default()).unwrap();
        std::fs::write(dir.path().join("sub/hidden"), b"x").unwrap();
        std::fs::write(dir.path().join("seen"), b"x").unwrap();
        assert_eq!(next(&mut events).await.name, "seen");
    }

    #[tokio::test]
    async fn refuses_missing_and_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"").unwrap();
        assert!(matches!(
            watch(spec(&dir.path().join("nope"), false), Accounts::default()),
            Err(WatchError::NotFound(_))
        ));
        assert!(matches!(
            watch(spec(&dir.path().join("f"), false), Accounts::default()),
            Err(WatchError::NotADirectory(_))
        ));
    }

    #[tokio::test]
    async fn polling_watchers_buffer_until_polled() {
        let dir = tempfile::tempdir().unwrap();
        let registry = WatcherRegistry::default();
        let id = registry
            .create(spec(dir.path(), false), Accounts::default())
            .unwrap();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while seen.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            seen = registry.take_events(&id).unwrap();
        }
        assert_eq!(seen[0].name, "a");
        registry.remove(&id).unwrap();
        assert!(matches!(
            registry.take_events(&id),
            Err(WatchError::UnknownWatcher(_))
        ));
        assert!(registry.is_empty());
    }
}
