//! The `filesystem.Filesystem` service: maps Connect messages to `fs` and back.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::Stream;
use wrenn_connect::{Code, ConnectError};
use wrenn_proto::filesystem as pb;

use super::{CallContext, with_keepalive};
use crate::fs::watch::{FsEvent, WatchError, WatchSpec};
use crate::fs::{self, FsError};
use crate::state::Envd;

fn fs_error(error: FsError) -> ConnectError {
    let code = match &error {
        FsError::NotFound(_) => Code::NotFound,
        FsError::AlreadyExists(_) => Code::AlreadyExists,
        FsError::NotADirectory(_) | FsError::IsADirectory(_) => Code::InvalidArgument,
        FsError::PermissionDenied { .. } => Code::PermissionDenied,
        FsError::Io { source, .. } if source.raw_os_error() == Some(libc::ELOOP) => {
            Code::FailedPrecondition
        }
        FsError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            Code::ResourceExhausted
        }
        FsError::Io { .. } => Code::Internal,
    };
    ConnectError::new(code, error.to_string())
}

fn watch_error(error: WatchError) -> ConnectError {
    let code = match &error {
        WatchError::NotFound(_) | WatchError::UnknownWatcher(_) => Code::NotFound,
        WatchError::NotADirectory(_) | WatchError::NetworkMount(_) => Code::InvalidArgument,
        WatchError::Inotify { .. }
        | WatchError::RootGone(_)
        | WatchError::NoRandomness(_)
        | WatchError::Overflow
        | WatchError::Ended(_) => Code::Internal,
    };
    ConnectError::new(code, error.to_string())
}

fn resolve(envd: &Envd, path: &str, context: &CallContext) -> Result<PathBuf, ConnectError> {
    envd.resolve_path(path, &context.user)
        .map_err(|e| ConnectError::invalid_argument(e.to_string()))
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| {
            Err(ConnectError::internal(format!(
                "filesystem task failed: {error}"
            )))
        })
}

pub(crate) async fn stat(
    envd: Arc<Envd>,
    request: pb::StatRequest,
    context: CallContext,
) -> Result<pb::StatResponse, ConnectError> {
    let path = resolve(&envd, &request.path, &context)?;
    blocking(move || {
        let entry = fs::entry_info(&path, &envd.accounts).map_err(|error| match error {
            FsError::NotFound(path) => {
                ConnectError::not_found(format!("file not found: '{}'", path.display()))
            }
            other => fs_error(other),
        })?;
        Ok(pb::StatResponse { entry: Some(entry) })
    })
    .await
}

pub(crate) async fn make_dir(
    envd: Arc<Envd>,
    request: pb::MakeDirRequest,
    context: CallContext,
) -> Result<pb::MakeDirResponse, ConnectError> {
    let path = resolve(&envd, &request.path, &context)?;
    blocking(move || {
        let entry =
            fs::make_dir(&path, &context.user, &envd.accounts).map_err(|error| match error {
                FsError::AlreadyExists(path) => ConnectError::new(
                    Code::AlreadyExists,
                    format!("directory already exists: {}", path.display()),
                ),
                FsError::NotADirectory(path) => ConnectError::invalid_argument(format!(
                    "path already exists but it is not a directory: {}",
                    path.display()
                )),
                other => fs_error(other),
            })?;
        Ok(pb::MakeDirResponse { entry: Some(entry) })
    })
    .await
}

pub(crate) async fn move_entry(
    envd: Arc<Envd>,
    request: pb::MoveRequest,
    context: CallContext,
) -> Result<pb::MoveResponse, ConnectError> {
    let source = resolve(&envd, &request.source, &context)?;
    let destination = resolve(&envd, &request.destination, &context)?;
    blocking(move || {
        let entry = fs::move_entry(&source, &destination, &context.user, &envd.accounts).map_err(
            |error| match error {
                FsError::NotFound(path) => {
                    ConnectError::not_found(format!("source file not found: '{}'", path.display()))
                }
                other => fs_error(other),
            },
        )?;
        Ok(pb::MoveResponse { entry: Some(entry) })
    })
    .await
}

pub(crate) async fn list_dir(
    envd: Arc<Envd>,
    request: pb::ListDirRequest,
    context: CallContext,
) -> Result<pb::ListDirResponse, ConnectError> {
    let path = resolve(&envd, &request.path, &context)?;
    blocking(move || {
        let entries =
            fs::list_dir(&path, request.depth, &context.user, &envd.accounts).map_err(|error| {
                match error {
                    FsError::NotFound(path) => {
                        ConnectError::not_found(format!("path not found: '{}'", path.display()))
                    }
                    FsError::NotADirectory(path) => ConnectError::invalid_argument(format!(
                        "path is not a directory: {}",
                        path.display()
                    )),
                    other => fs_error(other),
                }
            })?;
        Ok(pb::ListDirResponse { entries })
    })
    .await
}

pub(crate) async fn remove(
    envd: Arc<Envd>,
    request: pb::RemoveRequest,
    context: CallContext,
) -> Result<pb::RemoveResponse, ConnectError> {
    // An empty path would resolve to the working directory: refuse rather than delete it.
    if request.path.trim().is_empty() {
        return Err(ConnectError::invalid_argument("path is required"));
    }
    let path = resolve(&envd, &request.path, &context)?;
    if path == std::path::Path::new("/") {
        return Err(ConnectError::invalid_argument("refusing to remove '/'"));
    }
    blocking(move || {
        fs::remove(&path, &context.user).map_err(fs_error)?;
        Ok(pb::RemoveResponse {})
    })
    .await
}

fn watch_spec(
    envd: &Envd,
    path: &str,
    recursive: bool,
    include_entry: bool,
    allow_network_mounts: bool,
    context: &CallContext,
) -> Result<WatchSpec, ConnectError> {
    let root = resolve(envd, path, context)?;
    match std::fs::metadata(&root) {
        Ok(metadata)
            if !crate::fs::access::allowed(
                &metadata,
                &context.user,
                crate::fs::access::Want::Read,
            ) =>
        {
            return Err(ConnectError::new(
                Code::PermissionDenied,
                format!(
                    "user '{}' may not access '{}'",
                    context.user.name,
                    root.display()
                ),
            ));
        }
        _ => {}
    }
    Ok(WatchSpec {
        root,
        recursive,
        include_entry,
        allow_network_mounts,
    })
}

fn event_message(event: FsEvent) -> pb::FilesystemEvent {
    pb::FilesystemEvent {
        name: event.name,
        r#type: event.kind as i32,
        entry: event.entry,
    }
}

pub(crate) async fn watch_dir(
    envd: Arc<Envd>,
    request: pb::WatchDirRequest,
    context: CallContext,
) -> Result<
    impl Stream<Item = Result<pb::WatchDirResponse, ConnectError>> + Send + 'static,
    ConnectError,
> {
    use pb::watch_dir_response::{Event, KeepAlive, StartEvent};
    let spec = watch_spec(
        &envd,
        &request.path,
        request.recursive,
        request.include_entry,
        request.allow_network_mounts,
        &context,
    )?;
    let receiver = crate::fs::watch::watch(spec, envd.accounts.clone()).map_err(watch_error)?;
    let start = pb::WatchDirResponse {
        event: Some(Event::Start(StartEvent {})),
    };
    let events = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let item = receiver.recv().await?;
        let message = item
            .map(|event| pb::WatchDirResponse {
                event: Some(Event::Filesystem(event_message(event))),
            })
            .map_err(watch_error);
        Some((message, receiver))
    });
    let stream = futures_util::StreamExt::chain(
        futures_util::stream::once(async move { Ok(start) }),
        events,
    );
    let stream = super::with_deadline(stream, context.deadline);
    Ok(with_keepalive(stream, context.keepalive, || {
        pb::WatchDirResponse {
            event: Some(Event::Keepalive(KeepAlive {})),
        }
    }))
}

pub(crate) async fn create_watcher(
    envd: Arc<Envd>,
    request: pb::CreateWatcherRequest,
    context: CallContext,
) -> Result<pb::CreateWatcherResponse, ConnectError> {
    let spec = watch_spec(
        &envd,
        &request.path,
        request.recursive,
        request.include_entry,
        request.allow_network_mounts,
        &context,
    )?;
    let watcher_id = envd
        .watchers
        .create(spec, envd.accounts.clone())
        .map_err(watch_error)?;
    Ok(pb::CreateWatcherResponse { watcher_id })
}

pub(crate) async fn get_watcher_events(
    envd: Arc<Envd>,
    request: pb::GetWatcherEventsRequest,
    _context: CallContext,
) -> Result<pb::GetWatcherEventsResponse, ConnectError> {
    let events = envd
        .watchers
        .take_events(&request.watcher_id)
        .map_err(watch_error)?;
    Ok(pb::GetWatcherEventsResponse {
        events: events.into_iter().map(event_message).collect(),
    })
}

pub(crate) async fn remove_watcher(
    envd: Arc<Envd>,
    request: pb::RemoveWatcherRequest,
    _context: CallContext,
) -> Result<pb::RemoveWatcherResponse, ConnectError> {
    envd.watchers
        .remove(&request.watcher_id)
        .map_err(watch_error)?;
    Ok(pb::RemoveWatcherResponse {})
}
